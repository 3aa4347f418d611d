"""Live previews: a small picture of a job's latents while it denoises, without the VAE.

A fixed linear map from the four latent channels to RGB (one per architecture) gives a
recognisable, if soft, picture at one eighth of the image's size for the cost of one tiny
matmul. The numbers are the least-squares fits of VAE-decoded colours to latent channels
that Keturn published for Stable Diffusion 1.x/2.x and SDXL latents ("latent-to-RGB
approximation"), the same idea as A1111's "Approx cheap" preview.

The worker thread must never wait for the GPU because of a preview: :meth:`Previewer.start`
only queues the projection and a copy into pinned host memory behind the step that is
running; :meth:`PreviewPixels.image` (called on another thread) waits for that copy.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

#: latent channel -> (R, G, B) weight, and the RGB bias, per architecture. Results are in
#: roughly [-1, 1], like the VAE's output.
_PROJECTIONS: dict[str, tuple[tuple[tuple[float, float, float], ...], tuple[float, ...]]] = {
    "sd15": (
        (
            (0.298, 0.207, 0.208),
            (0.187, 0.286, 0.173),
            (-0.158, 0.189, 0.264),
            (-0.184, -0.271, -0.473),
        ),
        (0.0, 0.0, 0.0),
    ),
    "sdxl": (
        (
            (0.3651, 0.4232, 0.4341),
            (-0.2533, -0.0042, 0.1068),
            (0.1076, 0.1111, -0.0362),
            (-0.3165, -0.2492, -0.2188),
        ),
        (0.1084, -0.0175, -0.0011),
    ),
}
_PROJECTIONS["sd2"] = _PROJECTIONS["sd15"]  # SD2 kept SD1's VAE


class PreviewPixels:
    """One image's preview on its way to the host; :meth:`image` waits for it."""

    def __init__(self, pixels: Any, ready: Any = None) -> None:
        self._pixels = pixels  # uint8 (height, width, 3) on the CPU, perhaps still filling
        self._ready = ready  # a CUDA event recorded after the copy, or None (done already)

    def image(self) -> Image.Image:
        if self._ready is not None:
            self._ready.synchronize()
        return Image.fromarray(self._pixels.numpy(), "RGB")


class Previewer:
    """Projects a batch's latents to small RGB pictures, one per real image."""

    def __init__(self, arch: str) -> None:
        import torch

        self._torch = torch
        weights, bias = _PROJECTIONS.get(arch, _PROJECTIONS["sd15"])
        self._weights = torch.tensor(weights, dtype=torch.float32)
        self._bias = torch.tensor(bias, dtype=torch.float32)
        self._on: dict[Any, tuple[Any, Any]] = {}  # device -> (weights, bias) there

    def start(self, latents: Any, count: int) -> list[PreviewPixels] | None:
        """Previews of the first ``count`` latents (the rest is padding), or None when these
        latents are not of the four-channel kind the projection knows."""
        torch = self._torch
        if latents.ndim != 4 or latents.shape[1] != self._weights.shape[0]:
            return None
        device = latents.device
        if device not in self._on:  # where the model runs now (it may have been offloaded)
            self._on[device] = (self._weights.to(device), self._bias.to(device))
        with torch.inference_mode():
            if device.type != "cuda":  # (on MPS the copy to the host waits for the device)
                return [PreviewPixels(item) for item in self._project(latents, count, device)]
            # The worker thread's current device may be another GPU than this model's: the
            # work and the event that marks its end go on this model's device and stream.
            with torch.cuda.device(device):
                rgb = self._project(latents, count, device)
                host = torch.empty(rgb.shape, dtype=torch.uint8, pin_memory=True)
                host.copy_(rgb, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(device))
        return [PreviewPixels(item, ready) for item in host]

    def _project(self, latents: Any, count: int, device: Any) -> Any:
        weights, bias = self._on[device]
        rgb = self._torch.einsum("bchw,cr->bhwr", latents[:count].float(), weights)
        return ((rgb + bias + 1.0) * 127.5).clamp(0, 255).to(self._torch.uint8)
