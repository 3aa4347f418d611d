"""The built-in backend: Hugging Face diffusers, Stable Diffusion 1.5, 2.x and SDXL.

``model.name`` is the default model: a checkpoint name from the models folder, a local
diffusers folder, a single ``.safetensors``/``.ckpt`` file, or a Hugging Face repo id
(downloaded into ``model.cache_dir``). A job may name any checkpoint the models folder
lists, with LoRAs, a VAE and clip skip of its own.

Loaded pipelines are kept in an LRU: ``model.max_loaded`` on the device and
``model.cpu_cache`` more waiting in CPU memory, so a queue that alternates two models moves
weights between CPU and GPU instead of reading them from disk each time. The queue stays in
FIFO order: a switch costs a load, never a reordering. Each switch is announced
(``model.loading``, ``model.ready``) through ``settings["on_event"]``.

torch and diffusers are imported only when the backend is created, so that merely loading
plugins (the CLI, the tests of other parts) stays fast.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .. import hookimpl
from ..errors import BackendError, ConfigError
from ..model_arch import checkpoint_arch, diffusers_arch, read_safetensors_header, tensor_shapes
from ..model_choice import label
from . import BackendBase, GenerationRequest, StepCallback, wants_previews
from .embeddings import EmbeddingCache
from .loading import load_pipeline, load_vae
from .runtime import SCHEDULER_CLASSES, LoadedModel

log = logging.getLogger(__name__)

__all__ = ["SCHEDULER_CLASSES", "DiffusersBackend", "detect_arch"]

#: VAEs kept loaded besides each model's own.
MAX_VAES = 2


def pick_device(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_threads(setting: str | int, device: str, cores: int | None) -> int | None:
    """How many threads torch should compute with on the CPU (``performance.cpu_threads``),
    or None to leave torch's own choice. ``auto`` on a CPU device: every core but one, so
    the API, the inbox and the saver threads keep a core (torch's threads spin while they
    wait for work, and took both cores of a 2-core machine from the requests)."""
    if setting != "auto":
        return int(setting)
    if device != "cpu" or not cores or cores < 2:
        return None
    return cores - 1


def pick_dtype(setting: str, device: str) -> Any:
    import torch

    if setting == "auto":
        # fp16 halves memory and doubles speed on GPUs; CPUs have no fast fp16 kernels.
        return torch.float32 if device == "cpu" else torch.float16
    return getattr(torch, setting)


def detect_arch(name: str, setting: str = "auto") -> str:
    """``sd15``, ``sd2`` or ``sdxl``: from ``model.arch``, or read from
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
    return arch if arch in ("sd2", "sdxl") else "sd15"


class DiffusersBackend(BackendBase):
    """Runs StableDiffusion(XL)Pipelines; one instance per worker (per device).

    ``settings`` is the ``model:`` section plus ``device``, ``performance``, ``state_dir``,
    ``warm_sizes``, and optionally ``library`` (the models folder, to resolve names),
    ``on_event`` (``(type, data)``, for model switches) and ``compile_backend`` (the dynamo
    backend that compiles the UNet's call instead of inductor: tests use cheap ones).
    """

    #: The next batch is claimed once this batch's decode is queued, not at its last step:
    #: the claim and the next prompts' encoding then overlap the decode (see ``runtime``).
    calls_look_ahead = True

    def __init__(self, settings: dict[str, Any]) -> None:
        import torch

        self._torch = torch
        self.settings = settings
        self.default_name = settings["name"]
        self.configured_name = settings.get("configured_name") or self.default_name
        self.device = pick_device(settings.get("device", "auto"))
        performance = settings.get("performance") or {}
        threads = cpu_threads(performance.get("cpu_threads", "auto"), self.device, os.cpu_count())
        if threads is not None and threads != torch.get_num_threads():
            torch.set_num_threads(threads)  # for the whole process: set before any model runs
        self.dtype = pick_dtype(settings.get("dtype", "auto"), self.device)
        self.library = settings.get("library")
        self.on_event: Callable[[str, dict[str, Any]], None] = settings.get("on_event") or (
            lambda *_: None
        )
        self.max_loaded = max(1, int(settings.get("max_loaded", 1)))
        self.cpu_cache = max(0, int(settings.get("cpu_cache", 0)))
        self.model_label = label(self.default_name)
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()  # least recent first
        self._vaes: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.embeddings = EmbeddingCache()
        self.loading: str | None = None
        self._lock = threading.Lock()  # status() is read from other threads
        #: Conditioning encoded ahead by :meth:`prepare`, one batch's at most.
        self._prepared: _Prepared | None = None
        #: One per device, shared by every model on it: the worker holds it for a batch and
        #: each model's compile thread for its GPU work (a forward, a CUDA-graph capture),
        #: so no two of them ever overlap on the device.
        self.gpu_lock = threading.RLock()
        #: Why the default model cannot be loaded (``/api/health`` shows it), or None.
        self.default_error: str | None = None
        # The default model is loaded now, so the first job does not wait for it. If it
        # cannot be, the backend still serves jobs for the models folder's checkpoints.
        try:
            self.current: LoadedModel | None = self._get_model("")
        except BackendError as exc:
            if self.library is None or not self.library.checkpoint_names():
                raise
            self.default_error, self.current = exc.message, None

    # -- what the rest of the program sees ------------------------------------------------
    # The model that ran last (the default one at first), as tests and benchmarks see it.
    @property
    def _model(self) -> LoadedModel:
        if self.current is None:
            raise BackendError(self.default_error or "no model is loaded")
        return self.current

    @property
    def pipe(self) -> Any:
        return self._model.pipe

    @property
    def arch(self) -> str:
        return self._model.arch

    @property
    def compiling(self) -> bool:
        """Whether the current model has a fast path (``performance.compile``)."""
        return self.current is not None and self.current.compiler is not None

    @property
    def ready_shapes(self) -> set[tuple[int, int, int, bool]]:
        """``(bucket, width, height, cfg)`` keys the UNet is compiled for."""
        return self._model.ready_shapes

    @property
    def _to_compile(self) -> list[tuple[int, int, int, bool]]:
        """Keys waiting for the compile thread, or compiling now."""
        return self.current.pending_shapes if self.current is not None else []

    def scheduler(self, key: str) -> Any:
        return self._model.scheduler(key)

    def status(self) -> dict[str, Any]:
        """The loaded models for ``/api/health``: on the device, waiting in CPU memory,
        the one loading now."""
        with self._lock:
            on_device = [m.name for m in self._models.values() if m.device == self.device]
            cached = [m.name for m in self._models.values() if m.device != self.device]
            return {
                "loaded": on_device,
                "cpu_cache": cached,
                "loading": self.loading,
                "default_error": self.default_error,
            }

    # -- models ----------------------------------------------------------------------------
    def _key(self, name: str) -> str:
        """The LRU key of a job's model: "" for the default model."""
        if not name or name in (self.default_name, self.configured_name):
            return ""
        # The default's stem stands for it (a pasted record names it so), unless a listed
        # checkpoint has that very name.
        if name == self.model_label and (
            self.library is None or self.library.find("checkpoints", name, rescan=False) is None
        ):
            return ""
        return name

    def _resolve(self, key: str) -> str:
        """What to load for a model key: a path or a repo id."""
        if key == "":
            return self.default_name
        found = self.library.find("checkpoints", key) if self.library is not None else None
        if found is None:
            raise BackendError(
                f"the model {key!r} is not in the models folder (any more); see GET /api/models"
            )
        return found.path

    def _get_model(self, name: str) -> LoadedModel:
        key = self._key(name)
        model = self._models.get(key)
        if model is not None:
            with self._lock:
                self._models.move_to_end(key)
            if model.device != self.device:
                self._announce_loading(key, "memory")
                started = time.monotonic()
                self._make_room(keep=key)
                model.pipe.to(self.device)
                model.device = self.device
                model.resume_fast_path()
                self._announce_ready(key, started)
            return model
        target = self._resolve(key)
        self._announce_loading(key, "disk")
        started = time.monotonic()
        self._make_room(keep=None)
        try:
            pipe, arch = load_pipeline(
                target,
                arch_setting=self.settings.get("arch", "auto") if key == "" else "auto",
                dtype=self.dtype,
                cache_dir=self.settings.get("cache_dir"),
                state_dir=str(self.settings.get("state_dir") or "."),
            )
            try:
                pipe.to(self.device)
            except Exception as exc:
                raise BackendError(
                    f"could not move model to device {self.device!r}: {exc}"
                ) from exc
        except BackendError as exc:
            self.loading = None
            self.on_event("model.failed", {"name": key or self.default_name, "error": exc.message})
            raise
        model = LoadedModel(
            pipe,
            name=key or self.default_name,
            arch=arch,
            device=self.device,
            performance=self.settings.get("performance") or {},
            state_dir=self.settings.get("state_dir"),
            warm_sizes=self.settings.get("warm_sizes") or [],
            gpu_lock=self.gpu_lock,
            compile_backend=self.settings.get("compile_backend"),
        )
        with self._lock:
            self._models[key] = model
        if key == "":
            self.default_error = None
        self._announce_ready(key, started)
        return model

    def _make_room(self, keep: str | None) -> None:
        """Before a model comes onto the device: move the least recently used ones to CPU
        memory (up to ``cpu_cache``) or drop them, so at most ``max_loaded`` stay on it."""
        on_device = [k for k, m in self._models.items() if m.device == self.device and k != keep]
        while len(on_device) >= self.max_loaded:
            victim = on_device.pop(0)
            model = self._models[victim]
            # The model coming back from CPU memory leaves its place there free.
            cached = [k for k, m in self._models.items() if m.device != self.device and k != keep]
            if self.device != "cpu" and len(cached) < self.cpu_cache:
                # Its compile thread stops first (waiting only for a GPU phase in progress, a
                # compile is cancelled): compiled graphs hold the weights' addresses. They are
                # made again when it is back.
                model.pause_fast_path()
                model.pipe.to("cpu")
                model.device = "cpu"
                log.info("model %s moved to CPU memory", model.name)
            elif self.device == "cpu" and len(self._models) <= self.max_loaded + self.cpu_cache - 1:
                break  # on a CPU "the device" is memory: the cache allowance keeps it
            else:
                model.close()
                with self._lock:
                    del self._models[victim]
                log.info("model %s unloaded", model.name)
        from ..worker import free_gpu_memory

        free_gpu_memory()

    def _announce_loading(self, key: str, source: str) -> None:
        name = key or self.default_name
        self.loading = name
        log.info("loading model %s from %s", name, source)
        self.on_event("model.loading", {"name": name, "from": source})

    def _announce_ready(self, key: str, started: float) -> None:
        self.loading = None
        seconds = round(time.monotonic() - started, 3)
        self.on_event("model.ready", {"name": key or self.default_name, "seconds": seconds})

    def _path_of(self, category: str, name: str) -> Path:
        found = self.library.find(category, name) if self.library is not None else None
        if found is None:
            raise BackendError(f"{category[:-1]} {name!r} is not in the models folder (any more)")
        return Path(found.path)

    def _vae(self, model: LoadedModel, name: str) -> Any:
        if name in ("", "default"):
            return model.own_vae
        key = (name, model.arch)
        if key not in self._vaes:
            vae = load_vae(
                self._path_of("vaes", name),
                arch=model.arch,
                dtype=self.dtype,
                state_dir=str(self.settings.get("state_dir") or "."),
            )
            self._vaes[key] = vae.to(self.device)
            while len(self._vaes) > MAX_VAES:
                self._vaes.popitem(last=False)
        self._vaes.move_to_end(key)
        vae = self._vaes[key]
        return vae.to(model.device)

    def close(self) -> None:
        """Stop every model's compile thread (the worker calls this when it stops): none
        starts GPU work after it, though one may finish a compile in progress (CPU work)."""
        for model in list(self._models.values()):
            model.close()

    # -- generating -------------------------------------------------------------------------
    def generate(self, batch: list[GenerationRequest], on_step: StepCallback) -> list[Image.Image]:
        keys = {BackendBase.batch_key(self, r) for r in batch}
        if len(keys) != 1:
            raise ValueError(
                "a batch must share model, LoRAs, VAE, clip skip, size, steps, scheduler "
                "and guidance"
            )
        # What was encoded ahead is for this batch or for none (a stop put it back): taken
        # now, so nothing keeps a model's tensors once it is evicted.
        prepared, self._prepared = self._prepared, None
        first = batch[0]
        model = self.current = self._get_model(first.model)
        model.set_loras(first.active_loras(), lambda name: self._path_of("loras", name))
        # The whole batch holds the device's GPU lock: the compile threads' GPU work waits
        # for the batch to end instead of overlapping it.
        with self.gpu_lock:
            return self._generate(model, batch, on_step, prepared)

    def prepare(self, batch: list[GenerationRequest]) -> None:
        """Encode the prompts of the next batch (see ``BackendBase.prepare``), queued on the
        device behind the current batch. Only when it is for the model and LoRAs in use now
        (a LoRA may change the text encoders): a batch that switches them is encoded when
        it starts."""
        first = batch[0]
        model = self._models.get(self._key(first.model))
        loras = first.active_loras()
        self._prepared = None
        if model is None or model is not self.current or model.active_loras != loras:
            return
        encoded = {id(r): (r, self._encode(model, r)) for r in batch}
        self._prepared = _Prepared(model, loras, encoded)

    def _encoded(
        self, model: LoadedModel, request: GenerationRequest, prepared: _Prepared | None
    ) -> Any:
        """The request's conditioning: encoded ahead by :meth:`prepare` for this very
        request, model and LoRAs, or now."""
        if (
            prepared is not None
            and prepared.model is model
            and prepared.loras == model.active_loras
        ):
            same, encoded = prepared.encoded.get(id(request), (None, None))
            if same is request:
                return encoded
        return self._encode(model, request)

    def _generate(
        self,
        model: LoadedModel,
        batch: list[GenerationRequest],
        on_step: StepCallback,
        prepared: _Prepared | None,
    ) -> list[Image.Image]:
        first = batch[0]
        pipe = model.pipe
        pipe.vae = self._vae(model, first.vae)
        try:
            encoded = [self._encoded(model, r, prepared) for r in batch]
            # Only images with conditioning of one length run together: a shorter prompt
            # padded to a longer one's chunks would differ from the same job run alone. The
            # claim does not tokenize to tell (it looks at many jobs); the rare mixed batch
            # runs as two calls here, one progress bar.
            groups: dict[int, list[int]] = {}
            for index, item in enumerate(encoded):
                groups.setdefault(item.prompt_embeds.shape[1], []).append(index)
            images: list[Image.Image | None] = [None] * len(batch)
            inputs = [self._inputs(r) for r in batch] if first.init_image else None
            bar = _OneBar(on_step, len(groups))
            for number, indices in enumerate(groups.values()):
                part = [batch[i] for i in indices]
                part_inputs = [inputs[i] for i in indices] if inputs else None
                steps = bar.call(number) if len(groups) > 1 else on_step
                for i, image in zip(
                    indices,
                    self._run(model, part, [encoded[i] for i in indices], steps, part_inputs),
                    strict=True,
                ):
                    used = encoded[i].embeddings_used
                    if used:
                        image.info["imagineerd.embeddings"] = list(used)
                    images[i] = image
        finally:
            model.restore_vae()
        return [image for image in images if image is not None]

    def _encode(self, model: LoadedModel, request: GenerationRequest) -> Any:
        vectors = self.embeddings.for_model(
            model, self.library, f"{request.prompt}\n{request.negative_prompt}"
        )
        return model.encoder.encode(
            request.prompt,
            request.negative_prompt,
            clip_skip=request.clip_skip,
            embeddings=vectors,
        )

    def _inputs(self, request: GenerationRequest) -> tuple[Image.Image, Image.Image | None]:
        store = self.settings.get("inputs")
        if store is None:
            raise BackendError("this backend was given no input images to read")
        try:
            image = store.open(request.init_image)
            mask = store.open(request.mask) if request.mask else None
        except OSError as exc:
            raise BackendError(
                f"the job's input image is gone from the state folder ({exc.strerror or exc})"
            ) from exc
        return image, mask

    def _run(
        self,
        model: LoadedModel,
        batch: list[GenerationRequest],
        encoded: list,
        on_step: Any,
        inputs: list | None = None,
    ) -> list[Image.Image]:
        first = batch[0]
        if inputs is not None or first.hires is not None:
            # Image jobs and hires fixes change the UNet's input size mid-job: plain UNet.
            return model.run(batch, encoded, on_step, inputs=inputs)
        # Compiled buckets where they are ready, eager for the rest (LoRAs: all eager).
        return model.run_txt2img(batch, encoded, on_step)


@dataclass
class _Prepared:
    """What :meth:`DiffusersBackend.prepare` encoded: for this model with these LoRAs,
    id(request) -> (request, conditioning)."""

    model: LoadedModel
    loras: tuple[tuple[str, float], ...]
    encoded: dict[int, tuple[GenerationRequest, Any]]


class _OneBar:
    """Progress of a batch's several calls as one bar, so its last step is the last call's
    (the worker claims the next batch there). Each call's own total stands for the calls
    still to come until they report theirs."""

    def __init__(self, on_step: StepCallback, calls: int) -> None:
        self.on_step, self.calls = on_step, calls
        self.done = 0  # the steps of the calls that ended
        self.last = 0  # the total of the call in progress

    def call(self, number: int) -> StepCallback:
        if number:
            self.done += self.last

        def step(step: int, total: int, **preview: Any) -> None:
            self.last = total
            later = (self.calls - 1 - number) * total
            self.on_step(self.done + step, self.done + total + later, **preview)

        step.takes_preview = wants_previews(self.on_step)  # type: ignore[attr-defined]
        if number == self.calls - 1:  # the batch's device work is queued at the last call's end
            step.look_ahead = getattr(self.on_step, "look_ahead", None)  # type: ignore[attr-defined]
        return step


def _factory(settings: dict[str, Any]) -> DiffusersBackend:
    if not settings.get("name"):
        raise ConfigError("model.name is empty", field="model.name")
    return DiffusersBackend(settings)


@hookimpl
def imagineerd_register_backends(registry: Any) -> None:
    registry.add("diffusers", _factory)
