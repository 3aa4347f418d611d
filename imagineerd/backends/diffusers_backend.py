"""The built-in backend: Hugging Face diffusers, Stable Diffusion 1.5 and SDXL.

The model is loaded once, on the worker thread, and kept resident. ``model.name`` may be a
local diffusers folder, a single ``.safetensors``/``.ckpt`` checkpoint, or a Hugging Face repo
id (downloaded into ``model.cache_dir``). torch and diffusers are imported only when the
backend is created, so that merely loading plugins (the CLI, the tests of other parts) stays
fast.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from .. import hookimpl
from ..errors import BackendError, ConfigError
from ..model_arch import checkpoint_arch, diffusers_arch, read_safetensors_header, tensor_shapes
from . import BackendBase, GenerationRequest, StepCallback

log = logging.getLogger(__name__)

#: Scheduler id -> (diffusers class name, extra config). Labels live in ``jobs.SCHEDULERS``.
SCHEDULER_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}

_OFFLINE_HINT = (
    "If this machine cannot reach huggingface.co, download the model on one that can and set "
    "model.name in config.yaml to its local folder (a diffusers folder with model_index.json) "
    "or to a single .safetensors/.ckpt file."
)


def pick_device(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(setting: str, device: str) -> Any:
    import torch

    if setting == "auto":
        # fp16 halves memory and doubles speed on GPUs; CPUs have no fast fp16 kernels.
        return torch.float32 if device == "cpu" else torch.float16
    return getattr(torch, setting)


def detect_arch(name: str, setting: str = "auto") -> str:
    """``sd15`` or ``sdxl`` (the pipeline class to load): from ``model.arch``, or read from
    the model itself as the models listing reads it (model_index.json, or the tensor names
    of a checkpoint's header); a hub id is guessed from its name."""
    if setting != "auto":
        return setting
    path = Path(name)
    arch = "unknown"
    try:
        if (path / "model_index.json").is_file():
            arch = diffusers_arch(str(path))
        elif path.is_file() and path.suffix == ".safetensors":
            arch = checkpoint_arch(*tensor_shapes(read_safetensors_header(str(path))))
    except (OSError, ValueError):
        arch = "unknown"  # unreadable here: the pipeline load reports it properly
    if arch == "unknown":
        arch = "sdxl" if "xl" in name.lower() else "sd15"
    return "sdxl" if arch == "sdxl" else "sd15"


class DiffusersBackend(BackendBase):
    """Runs a StableDiffusion(XL)Pipeline; one instance per worker (per device)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import torch
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        self.settings = settings
        name = settings["name"]
        self.device = pick_device(settings.get("device", "auto"))
        self.dtype = pick_dtype(settings.get("dtype", "auto"), self.device)
        self.arch = detect_arch(name, settings.get("arch", "auto"))
        self.model_label = (
            Path(name.rstrip("/")).stem if Path(name).exists() else name.split("/")[-1]
        )
        cls = StableDiffusionXLPipeline if self.arch == "sdxl" else StableDiffusionPipeline
        path = Path(name)
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if self.arch == "sd15":
            # Like A1111 and ComfyUI, we do not run the NSFW safety checker.
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        log.info("loading %s model %s on %s (%s)", self.arch, name, self.device, self.dtype)
        try:
            if path.is_file():
                pipe = cls.from_single_file(str(path), **kwargs)
            elif path.is_dir():
                if not (path / "model_index.json").is_file():
                    raise BackendError(
                        f"model folder {path} has no model_index.json; point model.name at a "
                        "diffusers folder, a .safetensors/.ckpt file or a Hugging Face repo id"
                    )
                pipe = cls.from_pretrained(str(path), **kwargs)
            else:
                if name.startswith(("/", ".", "~")) or name.endswith((".safetensors", ".ckpt")):
                    raise BackendError(
                        f"model file or folder {name} does not exist; fix model.name in config.yaml"
                    )
                pipe = cls.from_pretrained(
                    name, cache_dir=settings.get("cache_dir") or None, **kwargs
                )
        except BackendError:
            raise
        except Exception as exc:  # diffusers/hub raise many types (OSError, HTTP errors, ...)
            reason = str(exc).strip().rstrip(".")
            raise BackendError(f"could not load model {name!r}: {reason}. {_OFFLINE_HINT}") from exc
        pipe.set_progress_bar_config(disable=True)
        try:
            pipe.to(self.device)
        except Exception as exc:
            raise BackendError(f"could not move model to device {self.device!r}: {exc}") from exc
        self.pipe = pipe
        self._base_scheduler_config = dict(pipe.scheduler.config)
        self._schedulers: dict[str, Any] = {}
        self._torch = torch
        self._setup_fast_path(settings.get("performance") or {}, settings)

    # -- GPU fast path -------------------------------------------------------------------
    def _setup_fast_path(self, perf: dict[str, Any], settings: dict[str, Any]) -> None:
        """channels-last, TF32, and torch.compile of the UNet with CUDA graphs.

        CUDA graphs need static shapes, so the UNet is compiled for a few batch-size
        *buckets* per image size; a batch is padded up to its bucket (extra items are
        dropped after decoding) instead of triggering a new compile. Compiling happens in
        :meth:`idle` (the worker calls it when the queue is empty): jobs never wait for a
        compile, they run on the plain UNet until their shape is ready.
        """
        torch = self._torch
        cuda = self.device.startswith("cuda")

        def wanted(key: str) -> bool:
            value = perf.get(key, "auto")
            return cuda if value == "auto" else bool(value)

        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if wanted("channels_last"):
            self.pipe.unet.to(memory_format=torch.channels_last)
        self.buckets: list[int] = sorted(perf.get("batch_buckets") or [1, 2, 4, 8])
        self.eager_unet = self.pipe.unet
        self.compiled_unet: Any = None
        self.ready_shapes: set[tuple[int, int, int]] = set()  # (bucket, width, height)
        self._to_compile: list[tuple[int, int, int]] = []
        if not wanted("compile"):
            return
        state = Path(settings.get("state_dir") or ".")
        # The compiled kernels are kept on disk: a restart recompiles in seconds, not minutes.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(state / "compile" / "inductor"))
        os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
        os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
        import torch._dynamo

        # One static graph per bucket; dynamic shapes compiled SDXL for minutes (DESIGN §9).
        torch._dynamo.config.automatic_dynamic_shapes = False
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.compiled_unet = torch.compile(self.eager_unet, mode="reduce-overhead", fullgraph=True)
        for width, height in settings.get("warm_sizes") or []:
            self._want_shapes(width, height)

    def _want_shapes(self, width: int, height: int) -> None:
        for bucket in self.buckets:
            shape = (bucket, width, height)
            if shape not in self.ready_shapes and shape not in self._to_compile:
                self._to_compile.append(shape)

    def bucket_for(self, size: int) -> int | None:
        return next((b for b in self.buckets if b >= size), None)

    def idle(self, busy: Callable[[], bool] | None = None) -> bool:
        """Compile one pending shape while nothing is queued; True if it did some work."""
        if not self._to_compile or (busy is not None and busy()):
            return False
        bucket, width, height = self._to_compile.pop(0)
        started = time.monotonic()
        request = GenerationRequest("warm-up", "", 0, 2, width, height, 5.0, "euler")
        try:
            # cudagraph trees record on the third call of a shape; two steps each, twice.
            for _ in range(2):
                self._run([request] * bucket, lambda *_: None, self.compiled_unet)
        except Exception:
            log.exception(
                "compiling the UNet for %d x %dx%d failed; that shape stays on the plain UNet",
                bucket,
                width,
                height,
            )
            return True
        self.ready_shapes.add((bucket, width, height))
        log.info(
            "UNet compiled for batch %d at %dx%d in %.1f s",
            bucket,
            width,
            height,
            time.monotonic() - started,
        )
        return True

    def scheduler(self, key: str) -> Any:
        """A scheduler instance per id, built once from the model's own scheduler config."""
        if key not in self._schedulers:
            import diffusers

            class_name, extra = SCHEDULER_CLASSES[key]
            cls = getattr(diffusers, class_name)
            self._schedulers[key] = cls.from_config(self._base_scheduler_config, **extra)
        return self._schedulers[key]

    def generate(self, batch: list[GenerationRequest], on_step: StepCallback) -> list[Image.Image]:
        shared = {(r.width, r.height, r.steps, r.scheduler, r.guidance_scale) for r in batch}
        if len(shared) != 1:
            raise ValueError("a batch must share width, height, steps, scheduler and guidance")
        first = batch[0]
        if self.compiled_unet is not None:
            bucket = self.bucket_for(len(batch))
            if bucket is not None and (bucket, first.width, first.height) in self.ready_shapes:
                # Pad to the compiled bucket with copies of the last request; every item
                # has its own generator, so padding cannot change the real images.
                padded = batch + [batch[-1]] * (bucket - len(batch))
                return self._run(padded, on_step, self.compiled_unet)[: len(batch)]
            self._want_shapes(first.width, first.height)  # compile it when idle
        return self._run(batch, on_step, self.eager_unet)

    def _run(
        self, batch: list[GenerationRequest], on_step: StepCallback, unet: Any
    ) -> list[Image.Image]:
        first = batch[0]
        self.pipe.unet = unet
        self.pipe.scheduler = self.scheduler(first.scheduler)
        # One CPU generator per image: a seed gives the same image alone or in a batch, and
        # the same on any device (the noise is drawn on the CPU, then moved).
        generators = [self._torch.Generator("cpu").manual_seed(r.seed) for r in batch]

        def step_end(pipe: Any, index: int, timestep: Any, tensors: dict) -> dict:
            on_step(index + 1, pipe.num_timesteps)
            return tensors

        with self._torch.inference_mode():
            result = self.pipe(
                prompt=[r.prompt for r in batch],
                negative_prompt=[r.negative_prompt for r in batch],
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                width=first.width,
                height=first.height,
                generator=generators,
                callback_on_step_end=step_end,
                output_type="pil",
            )
        return list(result.images)


def _factory(settings: dict[str, Any]) -> DiffusersBackend:
    if not settings.get("name"):
        raise ConfigError("model.name is empty", field="model.name")
    return DiffusersBackend(settings)


@hookimpl
def imagineerd_register_backends(registry: Any) -> None:
    registry.add("diffusers", _factory)
