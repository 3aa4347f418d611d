"""One loaded pipeline and what belongs to it: its schedulers, its LoRA adapters, its prompt
encoder and its GPU fast path (the UNet compiled for a few batch sizes).

The diffusers backend keeps several of these (an LRU, ``diffusers_backend``) and hands each
batch to the one its jobs name.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import BackendError
from . import GenerationRequest, StepCallback
from .prompt_encoder import Encoded, PromptEncoder

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

#: LoRA adapters kept in one pipeline; the least recently used beyond this are unloaded.
MAX_ADAPTERS = 8


class LoadedModel:
    """A pipeline on its device, ready to run batches."""

    def __init__(
        self,
        pipe: Any,
        *,
        name: str,
        label: str,
        arch: str,
        device: str,
        performance: dict[str, Any],
        state_dir: str | None,
        warm_sizes: list[list[int]],
    ) -> None:
        import torch

        self._torch = torch
        self.pipe = pipe
        self.name = name
        self.label = label
        self.arch = arch
        self.device = device
        pipe.set_progress_bar_config(disable=True)
        self.own_vae = pipe.vae
        self.encoder = PromptEncoder(pipe, arch)
        self._base_scheduler_config = dict(pipe.scheduler.config)
        self._schedulers: dict[str, Any] = {}
        #: LoRA name -> adapter name in the pipeline, least recently used first.
        self.adapters: OrderedDict[str, str] = OrderedDict()
        self._setup_fast_path(performance, state_dir, warm_sizes)

    # -- GPU fast path -------------------------------------------------------------------
    def _setup_fast_path(
        self, perf: dict[str, Any], state_dir: str | None, warm_sizes: list[list[int]]
    ) -> None:
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
        state = Path(state_dir or ".")
        # The compiled kernels are kept on disk: a restart recompiles in seconds, not minutes.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(state / "compile" / "inductor"))
        os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
        os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
        import torch._dynamo

        # One static graph per bucket; dynamic shapes compiled SDXL for minutes (DESIGN §9).
        torch._dynamo.config.automatic_dynamic_shapes = False
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.compiled_unet = torch.compile(self.eager_unet, mode="reduce-overhead", fullgraph=True)
        for width, height in warm_sizes:
            self.want_shapes(width, height)

    def want_shapes(self, width: int, height: int) -> None:
        for bucket in self.buckets:
            shape = (bucket, width, height)
            if shape not in self.ready_shapes and shape not in self._to_compile:
                self._to_compile.append(shape)

    def bucket_for(self, size: int) -> int | None:
        return next((b for b in self.buckets if b >= size), None)

    def compile_pending(self) -> bool:
        """Compile one pending shape; True if there was one."""
        if not self._to_compile or self.adapters:
            return False
        bucket, width, height = self._to_compile.pop(0)
        started = time.monotonic()
        request = GenerationRequest("warm-up", "", 0, 2, width, height, 5.0, "euler")
        encoded = [self.encoder.encode(request.prompt, request.negative_prompt)] * bucket
        try:
            # cudagraph trees record on the third call of a shape; two steps each, twice.
            for _ in range(2):
                self.run([request] * bucket, encoded, lambda *_: None, self.compiled_unet)
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

    # -- per batch -----------------------------------------------------------------------
    def scheduler(self, key: str) -> Any:
        """A scheduler instance per id, built once from the model's own scheduler config."""
        if key not in self._schedulers:
            import diffusers

            class_name, extra = SCHEDULER_CLASSES[key]
            cls = getattr(diffusers, class_name)
            self._schedulers[key] = cls.from_config(self._base_scheduler_config, **extra)
        return self._schedulers[key]

    def set_loras(self, loras: tuple[tuple[str, float], ...], path_of: Callable[[str], Path]):
        """Load (once) and activate exactly these LoRAs at these weights; none: all off."""
        pipe = self.pipe
        for name, _ in loras:
            if name in self.adapters:
                self.adapters.move_to_end(name)
                continue
            adapter = f"lora{len(self.adapters)}_{re.sub(r'[^0-9A-Za-z]', '_', name)[:40]}"
            while adapter in self.adapters.values():
                adapter += "_"
            path = path_of(name)
            try:
                pipe.load_lora_weights(str(path), adapter_name=adapter)
            except Exception as exc:
                raise BackendError(f"the LoRA {path.name} could not be loaded: {exc}") from exc
            self.adapters[name] = adapter
            while len(self.adapters) > MAX_ADAPTERS:
                old, old_adapter = next(iter(self.adapters.items()))
                if old in dict(loras):
                    break
                pipe.delete_adapters([old_adapter])
                del self.adapters[old]
        if not loras:
            if self.adapters:
                pipe.disable_lora()
            return
        pipe.enable_lora()
        pipe.set_adapters(
            [self.adapters[name] for name, _ in loras],
            adapter_weights=[weight for _, weight in loras],
        )

    def run(
        self,
        batch: list[GenerationRequest],
        encoded: list[Encoded],
        on_step: StepCallback,
        unet: Any = None,
    ) -> list[Image.Image]:
        torch = self._torch
        first = batch[0]
        pipe = self.pipe
        pipe.unet = unet if unet is not None else self.eager_unet
        pipe.scheduler = self.scheduler(first.scheduler)
        # One CPU generator per image: a seed gives the same image alone or in a batch, and
        # the same on any device (the noise is drawn on the CPU, then moved).
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in batch]

        def step_end(pipe: Any, index: int, timestep: Any, tensors: dict) -> dict:
            on_step(index + 1, pipe.num_timesteps)
            return tensors

        kwargs: dict[str, Any] = dict(
            prompt_embeds=torch.cat([e.prompt_embeds for e in encoded]),
            negative_prompt_embeds=torch.cat([e.negative_embeds for e in encoded]),
        )
        if self.arch == "sdxl":
            kwargs.update(
                pooled_prompt_embeds=torch.cat([e.pooled for e in encoded]),
                negative_pooled_prompt_embeds=torch.cat([e.negative_pooled for e in encoded]),
            )
        with torch.inference_mode():
            result = pipe(
                **kwargs,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                width=first.width,
                height=first.height,
                generator=generators,
                callback_on_step_end=step_end,
                output_type="pil",
            )
        return list(result.images)
