"""The backend protocol and the registry backends are added to.

A backend turns a batch of :class:`GenerationRequest` into images. It is created once, on the
worker thread, with the ``model:`` section of config, and kept resident.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from PIL import Image

from ..errors import ConfigError
from ..jobs import JobSpec

#: ``on_step(step, total)``: called once per denoising step (1-based). It raises
#: :class:`imagineerd.errors.JobInterrupted` to stop the generation at that step.
StepCallback = Callable[[int, int], None]


#: One image to generate: prompt, negative_prompt, seed, steps, width, height,
#: guidance_scale, scheduler. A batch holds requests that share size, steps, scheduler and
#: guidance. It is the validated job spec itself: what the user asked for is what the
#: backend gets, with nothing to copy in between.
GenerationRequest = JobSpec


class Backend(Protocol):
    def generate(
        self, batch: list[GenerationRequest], on_step: StepCallback
    ) -> list[Image.Image]: ...


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
