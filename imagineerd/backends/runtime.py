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
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import BackendError
from . import GenerationRequest, StepCallback, wants_previews
from .fast_path import COND_LENGTH, FastKey, ShapeCompiler, UNetInputs, plan_parts
from .previews import Previewer, PreviewPixels
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

#: Image sizes a model compiles because jobs asked for them, beyond ``warm_sizes``: each
#: costs a compile per bucket and CUDA-graph memory, so later sizes run on the plain UNet.
MAX_JOB_SIZES = 4


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
        gpu_lock: Any = None,
        compile_backend: Any = None,
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
        self.previewer = Previewer(arch)
        self._base_scheduler_config = dict(pipe.scheduler.config)
        self._schedulers: dict[str, Any] = {}
        self._pipes: dict[str, Any] = {}
        self._active_loras: tuple[tuple[str, float], ...] = ()
        #: LoRA name -> adapter name in the pipeline, least recently used first.
        self.adapters: OrderedDict[str, str] = OrderedDict()
        #: The device's GPU lock, shared by every model on it (the backend owns it): held
        #: by the worker for a batch and by a compile thread for its GPU work, so neither a
        #: capture nor a compile thread's forward ever overlaps a batch or another capture.
        self.gpu_lock = gpu_lock if gpu_lock is not None else threading.RLock()
        self._setup_fast_path(performance, state_dir, warm_sizes, compile_backend)

    # -- GPU fast path -------------------------------------------------------------------
    def _setup_fast_path(
        self,
        perf: dict[str, Any],
        state_dir: str | None,
        warm_sizes: list[list[int]],
        compile_backend: Any = None,
    ) -> None:
        """channels-last, TF32, fused QKV, and the UNet compiled per shape in the background.

        Compiled graphs need static shapes, so the UNet is compiled for a few batch-size
        *buckets* per image size and CFG on/off (:mod:`.fast_path`); a batch is padded up to
        its bucket when little would be padding, and split into buckets otherwise. The
        compiling runs on a thread of its own from the start: jobs never wait for it, and
        run on the plain UNet until their shape is ready.
        """
        torch = self._torch
        cuda = self.device.startswith("cuda")

        def wanted(key: str, default: bool = cuda) -> bool:
            value = perf.get(key, "auto")
            return default if value == "auto" else bool(value)

        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if wanted("channels_last"):
            self.pipe.unet.to(memory_format=torch.channels_last)
        self.fused_qkv = False
        self.want_fused = perf.get("fuse_qkv") is True and hasattr(
            self.pipe, "fuse_qkv_projections"
        )
        self._fuse()
        #: ``auto``: the VAE's own say for SDXL (``force_upcast``; fp16-fix VAEs say no),
        #: never for SD1.5/2 (their VAEs are fp16-safe; diffusers does not upcast them).
        self.vae_upcast = perf.get("vae_upcast", "auto")
        self._upcast_vaes: weakref.WeakSet[Any] = weakref.WeakSet()  # fp16 decode overflowed
        self.buckets: list[int] = sorted(perf.get("batch_buckets") or [1, 2, 4, 8])
        self.max_padding = float(perf.get("max_padding", 0.25))
        self.eager_unet = self.pipe.unet
        self.warm_sizes = {tuple(size) for size in warm_sizes}
        self.job_sizes: set[tuple[int, int]] = set()  # sizes compiled because jobs asked
        self.compiler: ShapeCompiler | None = None
        if not wanted("compile"):
            return
        state = Path(state_dir or ".")
        # The compiled kernels are kept on disk: a restart recompiles in seconds, not minutes.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(state / "compile" / "inductor"))
        os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
        os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
        self.compiler = ShapeCompiler(
            self.eager_unet,
            self.pipe,
            device=self.device,
            # Inductor without its own CUDA graphs: the fast path records them itself, on
            # its own thread (cudagraph trees are per thread: they would record on the
            # worker).
            backend=compile_backend or "inductor",
            # SDXL's steps are long enough that launch overhead is a small share, while its
            # graphs' static inputs, outputs and pool (sized by the largest bucket's
            # activations, gigabytes at 1024²) stay on the GPU: graphs pay for SD1.5/2.
            cuda_graphs=wanted("cuda_graphs", self.arch != "sdxl"),
            gpu_lock=self.gpu_lock,
            name=re.sub(r"[^0-9A-Za-z]+", "-", Path(self.name).name)[:40],
        )
        for width, height in warm_sizes:
            self.want_shapes(width, height, cfg=True)

    @property
    def ready_shapes(self) -> set[FastKey]:
        return self.compiler.ready() if self.compiler is not None else set()

    @property
    def pending_shapes(self) -> list[FastKey]:
        return self.compiler.pending() if self.compiler is not None else []

    def want_shapes(self, width: int, height: int, cfg: bool = True) -> None:
        """Compile every bucket of this size in the background: a warm size, or one of the
        first :data:`MAX_JOB_SIZES` other sizes jobs ask for (later ones stay eager)."""
        if self.compiler is None or self.adapters:
            return
        size = (width, height)
        if size not in self.warm_sizes and size not in self.job_sizes:
            if len(self.job_sizes) >= MAX_JOB_SIZES:
                return
            self.job_sizes.add(size)
            if len(self.job_sizes) == MAX_JOB_SIZES:
                log.info(
                    "model %s: %d image sizes beyond warm_sizes are compiled; other sizes run "
                    "on the plain UNet (list them in performance.warm_sizes to compile them)",
                    self.name,
                    MAX_JOB_SIZES,
                )
        for bucket in self.buckets:
            self.compiler.want((bucket, width, height, cfg))

    def pause_fast_path(self) -> None:
        """Before the weights move off the device or the UNet's modules change (graphs hold
        their addresses). Waits for a GPU phase of the compile thread, never a compile."""
        if self.compiler is not None:
            self.compiler.pause()

    def resume_fast_path(self) -> None:
        """The weights are back: the shapes that were ready are compiled (captured) again."""
        if self.compiler is not None and not self.adapters:
            self.compiler.resume()

    def _fuse(self) -> None:
        """Fused QKV projections when asked for and no LoRA is loaded (they load into the
        separate projections)."""
        if self.want_fused and not self.fused_qkv and not self.adapters:
            # One matmul for Q, K and V in every self-attention (UNet and VAE).
            self.pipe.fuse_qkv_projections()
            self.fused_qkv = True

    def close(self) -> None:
        if self.compiler is not None:
            self.compiler.close()

    def plan(
        self, batch: list[GenerationRequest], encoded: list[Encoded]
    ) -> list[tuple[list[int], int | None, Any]]:
        """How to run a txt2img batch: ``(indices, bucket, runner)`` per pipeline call.

        Ready keys run compiled, padded to their bucket; every other item runs in one
        eager call. A key not ready has its size wanted, for later batches. Without a fast
        path (or with LoRAs, or prompts longer than one chunk) it is one eager call.
        """
        everything: list[tuple[list[int], int | None, Any]] = [
            (list(range(len(batch))), None, None)
        ]
        first = batch[0]
        if (
            self.compiler is None
            or self.adapters
            or any(e.prompt_embeds.shape[1] != COND_LENGTH for e in encoded)
        ):
            return everything
        cfg = first.guidance_scale > 1
        calls: list[tuple[list[int], int | None, Any]] = []
        eager: list[int] = []
        start = 0
        for real, bucket in plan_parts(len(batch), self.buckets, self.max_padding):
            indices = list(range(start, start + real))
            start += real
            runner = None
            if bucket is not None:
                key = (bucket, first.width, first.height, cfg)
                runner = self.compiler.runner(key)
                if runner is None:  # for later batches of this shape: every bucket of it
                    self.want_shapes(first.width, first.height, cfg)
            if runner is None:
                eager += indices
            else:
                calls.append((indices, bucket, runner))
        if eager:
            calls.append((eager, None, None))
        return calls

    def run_txt2img(
        self, batch: list[GenerationRequest], encoded: list[Encoded], on_step: StepCallback
    ) -> list[Image.Image]:
        """A txt2img batch along :meth:`plan`; progress counts every call's steps as one
        bar. Padding repeats the last request: every item has its own generator, so it
        cannot change the real images, and it is never decoded."""
        calls = self.plan(batch, encoded)
        images: list[Image.Image | None] = [None] * len(batch)
        done = 0
        for number, (indices, bucket, runner) in enumerate(calls):
            part = [batch[i] for i in indices]
            conditioning = [encoded[i] for i in indices]
            extra = (bucket or len(part)) - len(part)
            part += [part[-1]] * extra
            conditioning += [conditioning[-1]] * extra
            made = self._call(
                "txt2img",
                part,
                self._embeds(conditioning),
                on_step,
                UNetInputs(self.eager_unet, runner),
                done=done,
                later_calls=len(calls) - 1 - number,
                real=len(indices),
            )
            done += self.last_timesteps
            for i, image in zip(indices, made, strict=True):
                images[i] = image
        assert all(image is not None for image in images), "a plan left an image out"
        return images  # type: ignore[return-value]

    # -- per batch -----------------------------------------------------------------------
    def scheduler(self, key: str) -> Any:
        """A scheduler instance per id, built once from the model's own scheduler config."""
        if key not in self._schedulers:
            import diffusers

            class_name, extra = SCHEDULER_CLASSES[key]
            cls = getattr(diffusers, class_name)
            if key == "euler_a":
                from .ancestral import PrefetchedEulerAncestral

                cls = PrefetchedEulerAncestral  # the same images, no host sync per step
            self._schedulers[key] = cls.from_config(self._base_scheduler_config, **extra)
        return self._schedulers[key]

    @property
    def active_loras(self) -> tuple[tuple[str, float], ...]:
        """The LoRAs and weights the model runs with now (none: ``()``)."""
        return self._active_loras

    def set_loras(self, loras: tuple[tuple[str, float], ...], path_of: Callable[[str], Path]):
        """Load (once) and activate exactly these LoRAs at these weights; none: all off.

        A LoRA changes the UNet's modules, so while any is loaded the model runs on the
        plain UNet. With a fast path, a batch without LoRAs therefore unloads them all and
        gets the compiled UNet back (a later LoRA job loads its file again); without one
        they stay loaded, only disabled, for the next job that uses them.
        """
        pipe = self.pipe
        if loras != self._active_loras:
            # LoRAs on the text encoders change what even the empty prompt encodes to.
            self.encoder.forget()
            self._active_loras = loras
        if not loras:
            if self.adapters and self.compiler is not None:
                self.pause_fast_path()  # the modules change back: nothing traces meanwhile
                pipe.unload_lora_weights()
                self.adapters.clear()
                self._fuse()
                self.resume_fast_path()
            elif self.adapters:
                pipe.disable_lora()
            return
        for name, _ in loras:
            if name in self.adapters:
                self.adapters.move_to_end(name)
                continue
            adapter = f"lora{len(self.adapters)}_{re.sub(r'[^0-9A-Za-z]', '_', name)[:40]}"
            while adapter in self.adapters.values():
                adapter += "_"
            path = path_of(name)
            # The compile thread must not trace or capture the UNet while its modules change;
            # compiled graphs do not apply to it while LoRAs are loaded.
            self.pause_fast_path()
            if self.fused_qkv:
                pipe.unfuse_qkv_projections()  # LoRAs load into the separate projections
                self.fused_qkv = False
            try:
                pipe.load_lora_weights(str(path), adapter_name=adapter)
            except Exception as exc:
                # Nothing of it stays loaded (diffusers removes a partly loaded adapter):
                # with no other LoRA, the model gets its fused projections and fast path back.
                self._fuse()
                self.resume_fast_path()
                raise BackendError(f"the LoRA {path.name} could not be loaded: {exc}") from exc
            self.adapters[name] = adapter
            while len(self.adapters) > MAX_ADAPTERS:
                old, old_adapter = next(iter(self.adapters.items()))
                if old in dict(loras):
                    break
                pipe.delete_adapters([old_adapter])
                del self.adapters[old]
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
        inputs: list[tuple[Image.Image, Image.Image | None]] | None = None,
    ) -> list[Image.Image]:
        """One pipeline call for the batch (two for a hires fix), on the plain UNet: image
        jobs and hires fixes change the UNet's input size mid-job. ``inputs``: each image
        job's input and mask, decoded."""
        first = batch[0]
        mode = first.mode
        unet = self.eager_unet
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
        later_calls: int = 0,
        output_type: str = "pil",
        real: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run one pipeline. Progress counts ``done`` steps of earlier passes, ``later``
        steps of a pass still to come and ``later_calls`` more calls like this one, so a
        hires fix or a split batch shows as one bar. A call counts its scheduler's own
        steps (Heun makes two UNet passes of most steps: 2N - 1), and leaves the count in
        ``last_timesteps``. A txt2img pass decodes its latents itself, only the first
        ``real`` ones (the rest is padding)."""
        torch = self._torch
        first = batch[0]
        pipe = self.pipeline(mode)
        own_decode = mode == "txt2img" and output_type == "pil"
        pipe.vae = self.pipe.vae  # the job's VAE, set on the base pipeline by the backend
        pipe.scheduler = self.scheduler(first.scheduler)
        # One CPU generator per image: a seed gives the same image alone or in a batch, and
        # the same on any device (the noise is drawn on the CPU, then moved).
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in batch]

        count = len(batch) if real is None else real  # previews of real images only
        previews = wants_previews(on_step)
        # The worker's claim of the next batch (performance.look_ahead), once this batch's
        # device work is all queued: after its last step when the pipeline decodes, after
        # queuing the decode when we do (so the claim and encoding overlap the decode).
        look_ahead = getattr(on_step, "look_ahead", None)
        final = False

        def step_end(pipe: Any, index: int, timestep: Any, tensors: dict) -> dict:
            nonlocal final
            latents = tensors["latents"]

            def preview() -> list[tuple[GenerationRequest, PreviewPixels]]:
                made = self.previewer.start(latents, count)
                return [] if made is None else list(zip(batch, made, strict=False))

            step, total = done + index + 1, done + pipe.num_timesteps * (1 + later_calls) + later
            if previews:
                on_step(step, total, preview=preview)
            else:
                on_step(step, total)
            if step >= total:
                final = True
                if look_ahead is not None and not own_decode:
                    look_ahead()
            return tensors

        kwargs.setdefault("width", first.width)
        kwargs.setdefault("height", first.height)
        kwargs.setdefault("num_inference_steps", first.steps)
        pipe.unet = unet
        try:
            with torch.inference_mode():
                result = pipe(
                    **embeds,
                    **kwargs,
                    guidance_scale=first.guidance_scale,
                    generator=generators,
                    callback_on_step_end=step_end,
                    output_type="latent" if own_decode else output_type,
                )
        finally:
            # The pipeline keeps its own UNet between calls (LoRA loading, from_pipe and
            # device moves see the real module, never a wrapper).
            pipe.unet = self.eager_unet
        self.last_timesteps = pipe.num_timesteps
        if own_decode:
            return self._decode(result.images[:real], queued=look_ahead if final else None)
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
            done=self.last_timesteps,
            image=image,
            strength=denoise,
            num_inference_steps=max(steps, math.ceil(steps / denoise - 1e-9)),
            width=width,
            height=height,
        )

    def _decode(self, latents: Any, queued: Callable[[], None] | None = None) -> list[Image.Image]:
        """Latents to images as diffusers makes them, with the conversion to 8 bits on the
        device (a quarter of the bytes cross to the host) and PNG encoding left to the
        saver threads. An fp16 decode that overflows (a VAE that is not fp16-safe) is done
        again in fp32, and that VAE is upcast from then on. ``queued`` is called once the
        decode is queued on the device, before anything waits for it."""
        torch = self._torch
        vae = self.pipe.vae
        config = vae.config
        with torch.inference_mode():
            mean = getattr(config, "latents_mean", None)
            std = getattr(config, "latents_std", None)
            if mean is not None and std is not None:
                shape = (1, len(mean), 1, 1)
                mean_t = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
                std_t = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
                latents = latents * std_t / config.scaling_factor + mean_t
            else:
                latents = latents / config.scaling_factor
            half = vae.dtype == torch.float16
            decoded = self._vae_decode(vae, latents, upcast=half and self._upcast(vae))
            if queued is not None:
                queued()
            if half and not self._upcast(vae) and not bool(torch.isfinite(decoded).all()):
                log.warning("the VAE overflowed in fp16; decoding in fp32 from now on")
                self._upcast_vaes.add(vae)
                decoded = self._vae_decode(vae, latents, upcast=True)
            pixels = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(array) for array in arrays]

    def _upcast(self, vae: Any) -> bool:
        """Whether to decode in fp32: ``performance.vae_upcast``."""
        if vae in self._upcast_vaes or self.vae_upcast is True:
            return True
        if self.vae_upcast is False:
            return False
        return self.arch == "sdxl" and bool(getattr(vae.config, "force_upcast", False))

    def _vae_decode(self, vae: Any, latents: Any, *, upcast: bool) -> Any:
        if not upcast:
            return vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        dtype = vae.dtype
        vae.to(self._torch.float32)  # as diffusers' SDXL pipeline upcasts, for the decode
        try:
            return vae.decode(latents.float(), return_dict=False)[0]
        finally:
            vae.to(dtype)

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
