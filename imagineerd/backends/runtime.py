"""One loaded pipeline and what belongs to it: its schedulers, its LoRA adapters, its prompt
encoder and its GPU fast path (the UNet compiled for a few batch sizes).

The diffusers backend keeps several of these (an LRU, ``diffusers_backend``) and hands each
batch to the one its jobs name.
"""

from __future__ import annotations

import logging
import math
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
        self.arch = arch
        self.device = device
        pipe.set_progress_bar_config(disable=True)
        self.own_vae = pipe.vae
        self.encoder = PromptEncoder(pipe, arch)
        self._base_scheduler_config = dict(pipe.scheduler.config)
        self._schedulers: dict[str, Any] = {}
        self._pipes: dict[str, Any] = {}
        self._active_loras: tuple[tuple[str, float], ...] = ()
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
        if loras != self._active_loras:
            # LoRAs on the text encoders change what even the empty prompt encodes to.
            self.encoder.forget()
            self._active_loras = loras
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

    def pipeline(self, mode: str) -> Any:
        """The pipeline for ``txt2img``, ``img2img`` or ``inpaint``, all sharing one set of
        weights (diffusers' ``from_pipe``: no second copy, no load)."""
        if mode == "txt2img":
            return self.pipe
        if mode not in self._pipes:
            import diffusers

            xl = "XL" if self.arch == "sdxl" else ""
            name = {"img2img": "Img2Img", "inpaint": "Inpaint"}[mode]
            cls = getattr(diffusers, f"StableDiffusion{xl}{name}Pipeline")
            pipe = cls.from_pipe(self.pipe)
            pipe.set_progress_bar_config(disable=True)
            self._pipes[mode] = pipe
        return self._pipes[mode]

    def run(
        self,
        batch: list[GenerationRequest],
        encoded: list[Encoded],
        on_step: StepCallback,
        unet: Any = None,
        inputs: list[tuple[Image.Image, Image.Image | None]] | None = None,
    ) -> list[Image.Image]:
        """One pipeline call for the batch (two for a hires fix). ``inputs``: each image
        job's input and mask, decoded."""
        first = batch[0]
        mode = first.mode
        unet = unet if unet is not None else self.eager_unet
        embeds = self._embeds(encoded)
        if mode != "txt2img" and first.strength <= 0:
            # Nothing to redraw: the input itself (at the job's size), as A1111 gives.
            return [_fit(image, (first.width, first.height)) for image, _ in inputs or []]
        if mode == "img2img":
            size = (first.width, first.height)
            images = [_fit(image, size) for image, _ in inputs or []]
            return self._call(
                "img2img",
                batch,
                embeds,
                on_step,
                unet,
                image=images,
                strength=first.strength,
                num_inference_steps=_at_least_one_step(first.steps, first.strength),
            )
        if mode == "inpaint":
            return self._inpaint(batch, embeds, on_step, unet, inputs or [])
        if first.hires is not None:
            return self._hires(batch, embeds, on_step, unet)
        return self._call("txt2img", batch, embeds, on_step, unet)

    def restore_vae(self) -> None:
        """Every pipeline back on the model's own VAE (after a job that chose another)."""
        for pipe in (self.pipe, *self._pipes.values()):
            pipe.vae = self.own_vae

    def _embeds(self, encoded: list[Encoded]) -> dict[str, Any]:
        torch = self._torch
        kwargs: dict[str, Any] = dict(
            prompt_embeds=torch.cat([e.prompt_embeds for e in encoded]),
            negative_prompt_embeds=torch.cat([e.negative_embeds for e in encoded]),
        )
        if self.arch == "sdxl":
            kwargs.update(
                pooled_prompt_embeds=torch.cat([e.pooled for e in encoded]),
                negative_pooled_prompt_embeds=torch.cat([e.negative_pooled for e in encoded]),
            )
        return kwargs

    def _call(
        self,
        mode: str,
        batch: list[GenerationRequest],
        embeds: dict[str, Any],
        on_step: StepCallback,
        unet: Any,
        *,
        done: int = 0,
        later: int = 0,
        output_type: str = "pil",
        **kwargs: Any,
    ) -> Any:
        """Run one pipeline. Progress counts ``done`` steps of an earlier pass and ``later``
        steps of a pass still to come, so a hires fix shows as one bar."""
        torch = self._torch
        first = batch[0]
        pipe = self.pipeline(mode)
        pipe.unet = unet
        pipe.vae = self.pipe.vae  # the job's VAE, set on the base pipeline by the backend
        pipe.scheduler = self.scheduler(first.scheduler)
        # One CPU generator per image: a seed gives the same image alone or in a batch, and
        # the same on any device (the noise is drawn on the CPU, then moved).
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in batch]

        def step_end(pipe: Any, index: int, timestep: Any, tensors: dict) -> dict:
            on_step(done + index + 1, done + pipe.num_timesteps + later)
            return tensors

        kwargs.setdefault("width", first.width)
        kwargs.setdefault("height", first.height)
        kwargs.setdefault("num_inference_steps", first.steps)
        with torch.inference_mode():
            result = pipe(
                **embeds,
                **kwargs,
                guidance_scale=first.guidance_scale,
                generator=generators,
                callback_on_step_end=step_end,
                output_type=output_type,
            )
        return list(result.images) if output_type == "pil" else result.images

    def _hires(
        self, batch: list[GenerationRequest], embeds: dict[str, Any], on_step: Any, unet: Any
    ) -> list[Image.Image]:
        """A1111's hires fix: the job's size first, upscaled (in latent space, or the image
        with Lanczos), then img2img at the larger size for ``steps`` steps."""
        from ..jobs import hires_size

        first = batch[0]
        scale, steps, denoise, upscaler = first.hires
        steps = steps or first.steps
        width, height = hires_size(first.width, first.height, scale)
        latent = upscaler == "latent"
        low = self._call(
            "txt2img",
            batch,
            embeds,
            on_step,
            unet,
            later=steps if denoise > 0 else 0,
            output_type="latent" if latent else "pil",
        )
        if latent:
            import torch.nn.functional as functional

            image: Any = functional.interpolate(
                low, size=(height // 8, width // 8), mode="bilinear", antialias=False
            )
            if denoise <= 0:  # nothing to refine: decode the upscaled latents
                return self._decode(image)
        else:
            image = [im.resize((width, height), Image.Resampling.LANCZOS) for im in low]
            if denoise <= 0:
                return image
        # diffusers runs int(num_inference_steps * strength) steps of an img2img; ask for
        # as many as make the hires steps, as A1111 runs exactly that many.
        return self._call(
            "img2img",
            batch,
            embeds,
            on_step,
            unet,
            done=first.steps,
            image=image,
            strength=denoise,
            num_inference_steps=max(steps, math.ceil(steps / denoise - 1e-9)),
            width=width,
            height=height,
        )

    def _decode(self, latents: Any) -> list[Image.Image]:
        pipe = self.pipe
        with self._torch.inference_mode():
            vae = pipe.vae
            decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return pipe.image_processor.postprocess(decoded, output_type="pil")

    def _inpaint(
        self,
        batch: list[GenerationRequest],
        embeds: dict[str, Any],
        on_step: Any,
        unet: Any,
        inputs: list[tuple[Image.Image, Image.Image | None]],
    ) -> list[Image.Image]:
        """Repaint where the mask is white; everywhere else the result *is* the input:
        A1111 pastes the original back through the blurred mask, and so do we, so pixels
        beyond the blur's reach are the input's, exactly."""
        from PIL import ImageFilter

        first = batch[0]
        size = (first.width, first.height)
        originals, masks, boxes = [], [], []
        for image, mask in inputs:
            originals.append(_fit(image, size))
            gray = _fit(mask.convert("L"), size) if mask is not None else Image.new("L", size, 255)
            binary = gray.point(lambda v: 255 if v >= 128 else 0)
            blurred = (
                binary.filter(ImageFilter.GaussianBlur(first.mask_blur))
                if first.mask_blur
                else binary
            )
            masks.append(blurred)
            # A1111's "only masked": a crop around the mask (32 px padding, widened to the
            # job's aspect), worked on at the job's resolution, then put back in place.
            boxes.append(crop_region(binary, size) if first.inpaint_area == "masked" else None)
        work = [
            (_fit(o.crop(box), size), _fit(m.crop(box), size)) if box else (o, m)
            for o, m, box in zip(originals, masks, boxes, strict=True)
        ]
        made = self._call(
            "inpaint",
            batch,
            embeds,
            on_step,
            unet,
            image=[image for image, _ in work],
            mask_image=[mask for _, mask in work],
            strength=first.strength,
            num_inference_steps=_at_least_one_step(first.steps, first.strength),
        )
        results = []
        for out, original, mask, box in zip(made, originals, masks, boxes, strict=True):
            out = out.convert("RGB")
            if box is not None:
                canvas = original.copy()
                canvas.paste(_fit(out, (box[2] - box[0], box[3] - box[1])), box[:2])
                out = canvas
            results.append(Image.composite(out, original, mask))
        return results


def _at_least_one_step(steps: int, strength: float) -> int:
    """diffusers runs ``int(steps * strength)`` steps of an img2img; a small strength of a
    few steps would run none (and fail): then as many as make one."""
    return steps if int(steps * strength) >= 1 else math.ceil(1 / strength)


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A1111's "just resize": the image stretched to ``size`` (unchanged if it fits)."""
    if image.size == size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)


def crop_region(
    mask: Image.Image, size: tuple[int, int], padding: int = 32
) -> tuple[int, int, int, int]:
    """The box around the mask's white area, ``padding`` wider on each side and widened
    further to the aspect ratio of ``size`` (so the crop scales to it undistorted), within
    the image."""
    width, height = mask.size
    box = mask.getbbox() or (0, 0, width, height)
    x1, y1 = max(0, box[0] - padding), max(0, box[1] - padding)
    x2, y2 = min(width, box[2] + padding), min(height, box[3] + padding)
    aspect = size[0] / size[1]
    w, h = x2 - x1, y2 - y1
    if w / h < aspect:  # too narrow: widen
        w = min(width, round(h * aspect))
    else:  # too flat: heighten
        h = min(height, round(w / aspect))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    x1 = int(min(max(0, round(cx - w / 2)), width - w))
    y1 = int(min(max(0, round(cy - h / 2)), height - h))
    return x1, y1, x1 + w, y1 + h
