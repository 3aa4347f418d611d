"""The backend protocol and the registry backends are added to.

A backend turns a batch of :class:`GenerationRequest` into images. It is created once, on the
worker thread, with the ``model:`` section of config, and kept resident.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Hashable
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from ..config import Config
from ..errors import BackendError, ConfigError, ImagineerdError
from ..jobs import JobSpec

log = logging.getLogger(__name__)

#: ``on_step(step, total)``: called once per denoising step (1-based). It raises
#: :class:`imagineerd.errors.JobInterrupted` to stop the generation at that step.
#:
#: The worker's callback also takes ``preview=`` (it says so with a true ``takes_preview``
#: attribute; see :func:`wants_previews`): a function that, called, returns
#: ``[(request, pixels), ...]`` for the batch's images, ``pixels.image()`` giving a small
#: PIL image (see :mod:`imagineerd.backends.previews`). It is called only on the steps a
#: preview is wanted, so a backend pays for previews only then.
#:
#: With look-ahead (``performance.look_ahead``) it also carries ``look_ahead``: a function
#: that claims the next batch (and hands it to :meth:`BackendBase.prepare`). The worker calls
#: it at the last step; a backend that knows a better moment (when the batch's device work
#: is all queued, before it waits for the images) says so with a true ``calls_look_ahead``
#: attribute and calls it then, once (later calls do nothing).
StepCallback = Callable[..., None]


def wants_previews(on_step: StepCallback) -> bool:
    """Whether ``on_step`` takes ``preview=`` (a plain ``(step, total)`` function does not)."""
    return bool(getattr(on_step, "takes_preview", False))


def to_device(tensor: Any, device: Any) -> Any:
    """A host tensor on ``device`` without the host waiting for the GPU: a copy from pinned
    memory is queued like a kernel, while one from ordinary memory first waits for the work
    queued before it (a tensor allocated pinned is not copied again)."""
    if not str(device).startswith("cuda"):
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def calls_look_ahead(backend: Any) -> bool:
    """Whether ``backend`` calls ``on_step.look_ahead()`` itself (see :data:`StepCallback`)."""
    return bool(getattr(backend, "calls_look_ahead", False))


#: One image to generate: prompt, negative_prompt, seed, steps, width, height,
#: guidance_scale, scheduler, model, loras, clip_skip, vae. A batch holds requests that share
#: everything but prompts and seeds. It is the validated job spec itself: what the user
#: asked for is what the backend gets, with nothing to copy in between.
GenerationRequest = JobSpec


@runtime_checkable
class Backend(Protocol):
    """What a worker needs from a backend. Subclass :class:`BackendBase`, which supplies
    every optional capability with a sensible default, and override what you can do better.
    """

    #: Shown in PNG metadata as ``Model:``; ``None`` uses ``model.name`` from config.
    model_label: str | None

    def generate(self, batch: list[GenerationRequest], on_step: StepCallback) -> list[Image.Image]:
        """One image per request, in order; ``on_step`` once per denoising step."""
        ...

    def batch_key(self, request: GenerationRequest) -> Hashable:
        """Requests with equal keys may share one :meth:`generate` call."""
        ...

    def is_out_of_memory(self, error: BaseException) -> bool:
        """Whether ``error`` means the batch did not fit (the worker then splits it)."""
        ...

    def idle(self, busy: Callable[[], bool]) -> bool:
        """Called while the queue is empty: do background work (compiling) and return True
        if some was done; check ``busy()`` to give way as soon as a job arrives."""
        ...


class BackendBase:
    """Defaults for every optional capability of :class:`Backend`."""

    model_label: str | None = None

    def generate(self, batch: list[GenerationRequest], on_step: StepCallback) -> list[Image.Image]:
        raise NotImplementedError

    def batch_key(self, request: GenerationRequest) -> Hashable:
        # What one diffusers pipeline call shares; prompts and seeds are per image. The
        # weights (model, LoRAs and their weights, VAE, clip skip) are shared too.
        return (
            request.width,
            request.height,
            request.steps,
            request.scheduler,
            request.guidance_scale,
            request.model,
            tuple(sorted(request.active_loras())),
            request.vae,
            request.clip_skip,
            # Image jobs share their kind of work and how strongly they change the input.
            request.mode,
            request.strength if request.mode != "txt2img" else None,
            (request.mask_blur, request.inpaint_area) if request.mode == "inpaint" else None,
            request.hires,
        )

    def is_out_of_memory(self, error: BaseException) -> bool:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(error, torch.cuda.OutOfMemoryError):
            return True
        return "out of memory" in str(error).lower()

    def idle(self, busy: Callable[[], bool]) -> bool:
        return False

    def prepare(self, batch: list[GenerationRequest]) -> None:
        """Optional: the batch the worker means to hand to :meth:`generate` next, claimed
        at the current batch's end (``performance.look_ahead``). Called on the worker
        thread from inside the current ``generate``, so work queued here on the device runs
        behind the current batch's; do what can be done ahead (the diffusers backend encodes
        the prompts). It must not change the current batch's result, and may do nothing.
        Those requests may never reach ``generate`` (a stop puts them back in the queue):
        keep nothing for them that must be freed."""


class BackendRegistry:
    """Name -> factory. Filled by the ``imagineerd_register_backends`` hook."""

    def __init__(self) -> None:
        self._factories: dict[str, Callable[[dict[str, Any]], Backend]] = {}

    def add(self, name: str, factory: Callable[[dict[str, Any]], Backend]) -> None:
        if name in self._factories:
            raise ValueError(f"a backend named {name!r} is already registered")
        self._factories[name] = factory

    def names(self) -> list[str]:
        return sorted(self._factories)

    def get(self, name: str) -> Callable[[dict[str, Any]], Backend]:
        try:
            return self._factories[name]
        except KeyError:
            raise ConfigError(
                f"model.backend: no backend named {name!r}; available: "
                f"{', '.join(self.names()) or 'none'} (is its plugin installed?)",
                field="model.backend",
            ) from None


def build_registry(pm: Any) -> BackendRegistry:
    registry = BackendRegistry()
    pm.hook.imagineerd_register_backends(registry=registry)
    return registry


def devices(setting: str | list[str]) -> list[str]:
    """``model.device`` as a list: one worker each. ``auto`` is every visible GPU (or the
    single best device when there is none)."""
    if isinstance(setting, list):
        return setting
    if setting == "auto":
        import torch

        count = torch.cuda.device_count()
        if count > 1:
            return [f"cuda:{i}" for i in range(count)]
        return ["cuda" if count else "auto"]
    return [setting]


def settings(config: Config, device: str | None) -> dict[str, Any]:
    """What a backend factory receives: the ``model:`` section (``name`` made absolute when
    local, ``cache_dir`` resolved) plus ``device``, ``performance``, ``state_dir`` and
    ``warm_sizes`` (the sizes a compiling backend prepares first: ``performance.warm_sizes``,
    or the default size when that is empty)."""
    result = config.model_settings()
    # As config.yaml says it (a relative path, a listed name): jobs name the default so.
    result["configured_name"] = config["model"]["name"]
    if device is not None:
        result["device"] = device
    result["performance"] = dict(config["performance"])
    result["state_dir"] = str(config.path_for("state"))
    generation = config["generation"]
    result["warm_sizes"] = [
        list(size) for size in config["performance"].get("warm_sizes") or []
    ] or [[generation["width"], generation["height"]]]
    return result


def create(factory: Callable[[dict[str, Any]], Backend], settings: dict[str, Any]) -> Backend:
    """Call a backend factory; any failure becomes a ``BackendError`` that jobs report."""
    name = settings["backend"]
    try:
        backend = factory(settings)
    except ImagineerdError:
        raise
    except Exception as exc:
        log.exception("backend failed to load")
        raise BackendError(f"the {name} backend failed to load: {exc}") from exc
    if not isinstance(backend, Backend):
        raise BackendError(
            f"the {name} backend does not implement the backend protocol (generate, "
            "batch_key, is_out_of_memory, idle, model_label); subclass "
            "imagineerd.backends.BackendBase"
        )
    return backend
