"""AUTOMATIC1111's ``/sdapi/v1`` API, the subset its clients use, in front of our queue.

Tools written for A1111's webui (``webuiapi``, Krita and Photoshop plugins, bots, scripts)
speak ``POST /sdapi/v1/txt2img`` and friends. Here each request becomes ordinary jobs: A1111's
field names are translated to ours, the jobs go through the same validator as every other job
(``daemon.validate``) and are queued with ``source="a1111"``; the request then waits for them
and answers as A1111 does: base64 PNGs, the request echoed as ``parameters`` and ``info``, a
JSON *string* with A1111's keys (``all_seeds``, ``infotexts``, ...).

What A1111 accepts and we cannot honour (styles, face restoration, scripts, ...) is ignored, as
A1111 ignores fields it does not know, but named in ``info``'s ``imagineerd_ignored``; a field
that we do not support but that holds the value meaning "off" (``restore_faces: false``,
``styles: []``: what clients send with every request) is not listed. A1111 answers ``422`` for
invalid input; we answer ``400`` in our one error shape, naming the A1111 field.

The token middleware guards ``/sdapi/`` (Bearer, or HTTP Basic with the token as password:
``webuiapi``'s ``set_auth(user, token)``), and ``security.SameSite`` refuses state changes
from other sites' pages here as on ``/api/`` (without its JSON rule: A1111's clients post
``interrupt`` and ``skip`` bare).
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import falcon
from PIL import Image

from .. import __version__
from ..checks import SCHEDULERS, SEED_MAX, check_int
from ..daemon import Daemon
from ..errors import BackendError, Conflict, Gone, NotFound, Unavailable, ValidationError
from ..events import Subscription
from ..jobs import CANCELLED, COMPLETED, FAILED, Job, JobSpec
from ..model_choice import label
from ..outputs import parse_infotext
from .resources import read_json_object

SOURCE = "a1111"
PREFIX = "/sdapi/v1"
#: Images one request may ask for (``batch_size * n_iter``): each is a job in the queue.
MAX_IMAGES = 100
FINISHED_EVENTS = frozenset({f"job.{COMPLETED}", f"job.{FAILED}", f"job.{CANCELLED}"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

#: A1111's sampler aliases (``modules/sd_samplers_kdiffusion.py``) for our schedulers.
SAMPLER_ALIASES: dict[str, list[str]] = {
    "euler": ["k_euler"],
    "euler_a": ["k_euler_a", "k_euler_ancestral"],
    "dpmpp_2m": ["k_dpmpp_2m"],
    "dpmpp_2m_karras": ["k_dpmpp_2m_ka"],
    "ddim": [],
    "unipc": [],
    "heun": ["k_heun"],
}
_SAMPLER_BY_NAME = {
    alias.lower(): key
    for key, label_ in SCHEDULERS.items()
    for alias in (key, label_, *SAMPLER_ALIASES.get(key, ()))
}
#: A1111's schedule types we can run: (name, label, default_rho). ``automatic`` and
#: ``uniform`` run the sampler as it is; ``karras`` only exists for DPM++ 2M here.
SCHEDULE_TYPES = (
    ("automatic", "Automatic", -1.0),
    ("uniform", "Uniform", 1.0),
    ("karras", "Karras", 7.0),
)
_SCHEDULE_BY_NAME = {key: name for name, text, _ in SCHEDULE_TYPES for key in (name, text.lower())}
KARRAS = {"dpmpp_2m": "dpmpp_2m_karras"}

#: hr_upscaler: A1111's names for our two upscalers (its "None" resizes with Lanczos).
UPSCALERS = {"latent": "latent", "lanczos": "lanczos", "none": "lanczos"}

#: Our job fields as A1111 names them, for error messages.
A1111_FIELDS = {
    "guidance_scale": "cfg_scale",
    "scheduler": "sampler_name",
    "model": "override_settings.sd_model_checkpoint",
    "clip_skip": "override_settings.CLIP_stop_at_last_layers",
    "vae": "override_settings.sd_vae",
    "init_image": "init_images",
    "strength": "denoising_strength",
    "inpaint_area": "inpaint_full_res",
    "hires": "enable_hr",
    "model.name": "sd_model_checkpoint",
    "generation.clip_skip": "CLIP_stop_at_last_layers",
}

_OFF = (None, False, 0, "", [], {})
#: Fields we do not honour, with the values that mean "off" (not worth naming as ignored).
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "styles": _OFF,
    "subseed": (None, -1),
    "subseed_strength": (None, 0),
    "seed_resize_from_h": (None, 0, -1),
    "seed_resize_from_w": (None, 0, -1),
    "restore_faces": _OFF,
    "tiling": _OFF,
    "do_not_save_samples": (None, False, True),
    "do_not_save_grid": (None, False, True),
    "save_images": (None, False, True),  # every job's image is saved in outputs/
    "eta": (None, 0, 1),
    "s_churn": (None, 0),
    "s_tmax": (None, 0),
    "s_tmin": (None, 0),
    "s_noise": (None, 1),
    "s_min_uncond": (None, 0),
    "script_name": _OFF,
    "script_args": _OFF,
    "alwayson_scripts": _OFF,
    "override_settings_restore_afterwards": (None, False, True),
    "sampler_index": None,  # read with sampler_name
    "firstphase_width": (None, 0),
    "firstphase_height": (None, 0),
    "refiner_checkpoint": (None, ""),
    "refiner_switch_at": (None, 0),
    "disable_extra_networks": (None, False),
    "comments": _OFF,
    "force_task_id": _OFF,
    "infotext": _OFF,
    "user": _OFF,
    "image_cfg_scale": None,  # instruct-pix2pix models only
    "initial_noise_multiplier": (None, 1),
    "resize_mode": (None, 0),  # 0: "just resize", what we do
    "include_init_images": None,  # read for the echo
    "send_images": None,  # read
    "latent_mask": (None, ""),
}
#: Fields that only matter with ``enable_hr`` (txt2img) or a mask (img2img), and their "off".
HIRES_ONLY: dict[str, tuple[Any, ...]] = {
    "hr_resize_x": (None, 0),
    "hr_resize_y": (None, 0),
    "hr_checkpoint_name": (None, "", "Use same checkpoint"),
    "hr_sampler_name": (None, "", "Use same sampler"),
    "hr_scheduler": (None, "", "Use same scheduler"),
    "hr_prompt": (None, ""),
    "hr_negative_prompt": (None, ""),
    "hr_cfg": (None,),
    "hr_distilled_cfg": (None,),
    "hr_additional_modules": _OFF,
}
MASK_ONLY: dict[str, tuple[Any, ...]] = {
    "inpainting_fill": (None, 1),  # 1: "original", where our repaint starts
    "inpaint_full_res_padding": (None, 0, 32),  # we pad the crop by 32
    "inpainting_mask_invert": (None, 0, False),
    "mask_round": None,
}
COMMON_FIELDS = frozenset(
    {
        "prompt",
        "negative_prompt",
        "seed",
        "steps",
        "cfg_scale",
        "width",
        "height",
        "sampler_name",
        "scheduler",
        "batch_size",
        "n_iter",
        "override_settings",
        "denoising_strength",
    }
)
TXT2IMG_FIELDS = COMMON_FIELDS | {"enable_hr", "hr_scale", "hr_second_pass_steps", "hr_upscaler"}
IMG2IMG_FIELDS = COMMON_FIELDS | {
    "init_images",
    "mask",
    "mask_blur",
    "mask_blur_x",
    "mask_blur_y",
    "inpaint_full_res",
}
VAE_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin")
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]\s*$")


def a1111_error(exc: ValidationError) -> ValidationError:
    """``exc`` with our field name turned into A1111's (``guidance_scale`` -> ``cfg_scale``)."""
    ours = exc.field or ""
    theirs = A1111_FIELDS.get(ours)
    if theirs is None:
        return exc
    message = exc.message
    message = theirs + message[len(ours) :] if message.startswith(ours) else f"{theirs}: {message}"
    return ValidationError(message, field=theirs)


def sampler_for(name: Any, schedule: Any, default: str) -> str:
    """Our scheduler id for A1111's ``sampler_name`` and ``scheduler`` (schedule type)."""
    if name is None or name == "":
        key = default
    elif isinstance(name, str) and name.strip().lower() in _SAMPLER_BY_NAME:
        key = _SAMPLER_BY_NAME[name.strip().lower()]
    else:
        shown = name if isinstance(name, str) else type(name).__name__
        raise ValidationError(
            f"sampler_name {str(shown)[:60]!r} is not a sampler here; valid names: "
            + ", ".join(SCHEDULERS.values()),
            field="sampler_name",
        )
    if schedule is None or schedule == "":
        return key
    kind = _SCHEDULE_BY_NAME.get(schedule.strip().lower()) if isinstance(schedule, str) else None
    if kind is None:
        raise ValidationError(
            f"scheduler must be one of {', '.join(t for _, t, _ in SCHEDULE_TYPES)} here, got "
            f"{str(schedule)[:60]!r}",
            field="scheduler",
        )
    if kind == "karras":
        if key in KARRAS.values():
            return key
        if key not in KARRAS:
            raise ValidationError(
                f"scheduler Karras works here only with DPM++ 2M, not {SCHEDULERS[key]}",
                field="scheduler",
            )
        return KARRAS[key]
    if kind == "uniform":  # "DPM++ 2M Karras" with Uniform: the plain sampler
        return next((plain for plain, karras in KARRAS.items() if karras == key), key)
    return key


def _whole(name: str, value: Any, lo: int, hi: int, default: int) -> int:
    return default if value is None else check_int(name, value, lo, hi)


def _memory() -> dict[str, Any]:
    page = os.sysconf("SC_PAGE_SIZE")
    total = page * os.sysconf("SC_PHYS_PAGES")
    free = page * os.sysconf("SC_AVPHYS_PAGES")
    ram = {"free": free, "used": total - free, "total": total}
    # Only a torch the backend already imported, with CUDA already set up: a request must
    # never import torch or create a CUDA context from an HTTP thread (as metrics.py).
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {"ram": ram, "cuda": {"error": "no CUDA device in use"}}
    try:
        free_b, total_b = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()

        def pair(key: str) -> dict[str, int]:
            return {
                "current": stats.get(f"{key}.all.current", 0),
                "peak": stats.get(f"{key}.all.peak", 0),
            }

        cuda = {
            "system": {"free": free_b, "used": total_b - free_b, "total": total_b},
            "active": pair("active_bytes"),
            "allocated": pair("allocated_bytes"),
            "reserved": pair("reserved_bytes"),
            "inactive": pair("inactive_split_bytes"),
            "events": {
                "retries": stats.get("num_alloc_retries", 0),
                "oom": stats.get("num_ooms", 0),
            },
        }
    except Exception as exc:  # no torch build with CUDA, a driver problem: say so
        cuda = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"ram": ram, "cuda": cuda}


class A1111Api:
    """The ``/sdapi/v1`` routes (one resource; the suffix names the route)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._lock = threading.Lock()
        #: Job ids of the txt2img/img2img requests waiting now, each its own list.
        self._requests: list[list[int]] = []
        self._interrupted: set[int] = set()

    # -- generation ----------------------------------------------------------------------
    def on_post_txt2img(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._generate(req, resp, img2img=False)

    def on_post_img2img(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._generate(req, resp, img2img=True)

    def _generate(self, req: falcon.Request, resp: falcon.Response, *, img2img: bool) -> None:
        body = read_json_object(req, text_limit=self.daemon.config["server"]["max_body_bytes"])
        fields, count, ignored = self.translate(body, img2img=img2img)
        specs = self._validate(fields, count)
        with self.daemon.events.subscribe() as events:
            # Validated first and queued in one transaction, so a worker takes them as one
            # batch (they differ only by seed).
            ids = [job.id for job in self.daemon.submit_many(specs, source=SOURCE)]
            with self._lock:
                self._requests.append(ids)
            try:
                finished = self._wait(events, ids)
            finally:
                with self._lock:
                    self._requests.remove(ids)
                    self._interrupted.difference_update(ids)
        echo = dict(body)
        if img2img and not body.get("include_init_images"):
            echo["init_images"] = None
            echo["mask"] = None
        resp.media = self._answer(finished, body, echo, ignored)

    def translate(self, body: dict[str, Any], *, img2img: bool) -> tuple[dict, int, list[str]]:
        """A1111's request as our job fields, the number of images, the fields ignored."""
        fields: dict[str, Any] = {}
        for ours, theirs in (
            ("prompt", "prompt"),
            ("negative_prompt", "negative_prompt"),
            ("steps", "steps"),
            ("guidance_scale", "cfg_scale"),
        ):
            if body.get(theirs) is not None:
                fields[ours] = body[theirs]
        if not img2img or body.get("width") is not None or body.get("height") is not None:
            # img2img without a size keeps the input's size.
            for name in ("width", "height"):
                if body.get(name) is not None:
                    fields[name] = body[name]
        default = self.daemon.config["generation"]["scheduler"]
        sampler = body.get("sampler_name") or body.get("sampler_index")
        fields["scheduler"] = sampler_for(sampler, body.get("scheduler"), default)
        batch = _whole("batch_size", body.get("batch_size"), 1, MAX_IMAGES, 1)
        n_iter = _whole("n_iter", body.get("n_iter"), 1, MAX_IMAGES, 1)
        if batch * n_iter > MAX_IMAGES:
            raise ValidationError(
                f"batch_size * n_iter is {batch * n_iter}; at most {MAX_IMAGES} images a request",
                field="batch_size",
            )
        fields["seed"] = _whole("seed", body.get("seed"), -1, SEED_MAX, -1)
        ignored = self._settings(body.get("override_settings"), fields)
        if img2img:
            known = IMG2IMG_FIELDS
            self._img2img(body, fields, ignored)
        else:
            known = TXT2IMG_FIELDS
            self._hires(body, fields, ignored)
        for key, value in body.items():
            if key in known or key in HIRES_ONLY or key in MASK_ONLY:
                continue
            neutral = NEUTRAL.get(key, ())
            if key not in NEUTRAL or (neutral is not None and value not in neutral):
                ignored.append(key)
        return fields, batch * n_iter, ignored

    def _settings(self, settings: Any, fields: dict[str, Any]) -> list[str]:
        if settings is None:
            settings = {}
        if not isinstance(settings, dict):
            raise ValidationError(
                f"override_settings must be an object, got {type(settings).__name__}",
                field="override_settings",
            )
        checkpoint = settings.get("sd_model_checkpoint")
        if checkpoint is not None:
            fields["model"] = self.checkpoint_name(checkpoint)
        else:
            current = self.current_model()
            if current is not None:
                fields["model"] = current
        if settings.get("CLIP_stop_at_last_layers") is not None:
            fields["clip_skip"] = settings["CLIP_stop_at_last_layers"]
        vae = settings.get("sd_vae")
        if isinstance(vae, str) and vae.strip().lower() not in ("", "automatic", "none"):
            stem, ext = os.path.splitext(vae.strip())
            fields["vae"] = stem if ext.lower() in VAE_EXTENSIONS else vae.strip()
        elif vae is not None and not isinstance(vae, str):
            fields["vae"] = vae  # the validator names what is wrong with it
        handled = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "sd_vae")
        return [f"override_settings.{key}" for key in settings if key not in handled]

    def _hires(self, body: dict[str, Any], fields: dict[str, Any], ignored: list[str]) -> None:
        enabled = body.get("enable_hr")
        if enabled not in (None, True, False):
            raise ValidationError("enable_hr must be true or false", field="enable_hr")
        if not enabled:
            return
        hires: dict[str, Any] = {}
        for ours, theirs in (
            ("scale", "hr_scale"),
            ("steps", "hr_second_pass_steps"),
            ("denoising_strength", "denoising_strength"),
        ):
            if body.get(theirs) is not None:
                hires[ours] = body[theirs]
        upscaler = body.get("hr_upscaler")
        if upscaler is not None:
            key = upscaler.strip().lower() if isinstance(upscaler, str) else None
            if key not in UPSCALERS:
                raise ValidationError(
                    f"hr_upscaler must be Latent, Lanczos or None here, got {str(upscaler)[:60]!r}",
                    field="hr_upscaler",
                )
            hires["upscaler"] = UPSCALERS[key]
        fields["hires"] = hires
        ignored += [k for k, off in HIRES_ONLY.items() if k in body and body[k] not in off]

    def _img2img(self, body: dict[str, Any], fields: dict[str, Any], ignored: list[str]) -> None:
        images = body.get("init_images")
        if not isinstance(images, list) or not images:
            raise ValidationError(
                "init_images must be a list holding one base64 image", field="init_images"
            )
        fields["init_image"] = images[0]
        if len(images) > 1:
            ignored.append("init_images[1:]")
        if body.get("denoising_strength") is not None:
            fields["strength"] = body["denoising_strength"]
        if body.get("mask") is None or body.get("mask") == "":
            return
        fields["mask"] = body["mask"]
        if body.get("mask_blur") is not None:
            fields["mask_blur"] = body["mask_blur"]
        full_res = body.get("inpaint_full_res", True)  # A1111's default: "only masked"
        if full_res not in (None, True, False, 0, 1):
            raise ValidationError(
                "inpaint_full_res must be true or false", field="inpaint_full_res"
            )
        fields["inpaint_area"] = "whole" if full_res in (False, 0) else "masked"
        ignored += [
            k
            for k, off in MASK_ONLY.items()
            if k in body and off is not None and body[k] not in off
        ]
        for key in ("mask_blur_x", "mask_blur_y"):
            if body.get(key) not in (None, 4, body.get("mask_blur")):
                ignored.append(key)

    def _validate(self, fields: dict[str, Any], count: int) -> list[JobSpec]:
        seed = fields.pop("seed")
        if seed == -1:
            seed = random.randint(0, SEED_MAX - count + 1)
        specs = []
        for index in range(count):
            try:
                specs.append(self.daemon.validate({**fields, "seed": seed + index}))
            except ValidationError as exc:
                raise a1111_error(exc) from None
        return specs

    def _wait(self, events: Subscription, ids: list[int]) -> list[Job]:
        """Until every job of ``ids`` has finished: from the events, checked against the
        store now and then (and only from the store once the subscription falls behind)."""
        pending = set(ids)
        live = True
        checked = time.monotonic()
        while pending:
            if self.daemon.stopping.is_set():
                raise Unavailable("the daemon is stopping; the jobs stay queued for its restart")
            event = None
            if live:
                try:
                    event = events.get(timeout=0.5)
                except Subscription.Dropped:
                    live = False
            else:
                time.sleep(0.2)
            if event is not None and event.type in FINISHED_EVENTS:
                pending.discard(event.data.get("id"))
            if event is None or time.monotonic() - checked > 2.0:
                checked = time.monotonic()
                pending = {i for i in pending if not self.daemon.job(i).finished}
        return [self.daemon.job(i) for i in ids]

    def _answer(
        self, jobs: list[Job], body: dict[str, Any], echo: dict[str, Any], ignored: list[str]
    ) -> dict[str, Any]:
        images, infotexts, done = [], [], []
        failed = [{"id": j.id, "error": j.error} for j in jobs if j.status == FAILED]
        for job in jobs:
            if job.status != COMPLETED or not job.output_path:
                continue
            try:
                data = self.daemon.output_bytes(job)
                with Image.open(io.BytesIO(data), formats=["PNG"]) as png:
                    infotexts.append(png.text.get("parameters") or "")
            except (OSError, NotFound, ValueError) as exc:
                failed.append({"id": job.id, "error": f"its image cannot be read: {exc}"})
                continue
            images.append(base64.b64encode(data).decode("ascii"))
            done.append(job)
        if failed and not done:
            raise BackendError(
                f"job {failed[0]['id']} failed: {failed[0]['error']}"
                + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else "")
            )
        first = (done or jobs)[0].spec
        record = parse_infotext(infotexts[0]) if infotexts else {}
        sampler = SCHEDULERS[first.scheduler]
        schedule = "Automatic"
        if first.scheduler in KARRAS.values():
            sampler, schedule = (
                next(SCHEDULERS[p] for p, k in KARRAS.items() if k == first.scheduler),
                "Karras",
            )
        info = {
            "prompt": first.prompt,
            "all_prompts": [j.spec.prompt for j in done],
            "negative_prompt": first.negative_prompt,
            "all_negative_prompts": [j.spec.negative_prompt for j in done],
            "seed": first.seed,
            "all_seeds": [j.spec.seed for j in done],
            "subseed": first.seed,
            "all_subseeds": [j.spec.seed for j in done],
            "subseed_strength": 0,
            "width": first.width,
            "height": first.height,
            "sampler_name": sampler,
            "scheduler": schedule,
            "cfg_scale": first.guidance_scale,
            "steps": first.steps,
            "batch_size": body.get("batch_size") or 1,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": record.get("Model") or label(first.model or self.running_model()),
            "sd_model_hash": record.get("Model hash"),
            "sd_vae_name": record.get("VAE"),
            "sd_vae_hash": record.get("VAE hash"),
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": (
                first.hires[2] if first.hires else first.strength if first.init_image else 0
            ),
            "extra_generation_params": {},
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": [],
            "job_timestamp": (done or jobs)[0].submitted_at,
            "clip_skip": first.clip_skip,
            "is_using_inpainting_conditioning": False,
            "version": f"imagineerd {__version__}",
            "imagineerd_ignored": ignored,
            "imagineerd_jobs": [j.id for j in jobs],
        }
        interrupted = [j.id for j in jobs if j.status == CANCELLED]
        if interrupted:
            info["imagineerd_interrupted"] = interrupted
        if failed:
            info["imagineerd_failed"] = failed
        if body.get("send_images") is False:
            images = []
        return {"images": images, "parameters": echo, "info": json.dumps(info)}

    # -- progress and stopping -------------------------------------------------------------
    def _request_of(self, job_id: int) -> list[int] | None:
        with self._lock:
            return next((list(ids) for ids in self._requests if job_id in ids), None)

    def on_get_progress(self, req: falcon.Request, resp: falcon.Response) -> None:
        running = self.daemon.store.running()
        ours = [j for j in running if j.source == SOURCE] or running
        counts = self.daemon.store.counts()
        state = {
            "skipped": False,
            "interrupted": False,
            "stopping_generation": False,
            "job": "",
            "job_count": 0,
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": 0,
            "sampling_steps": 0,
        }
        body: dict[str, Any] = {
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": state,
            "current_image": None,
            "textinfo": None,
            "current_task": None,
        }
        if ours:
            job = ours[0]
            view = self.daemon.job_view(job)
            step = view.get("progress", {}).get("step", 0)
            total = view.get("progress", {}).get("total", 0) or job.spec.steps
            fraction = step / total if total else 0.0
            ids = self._request_of(job.id) or [job.id]
            done = sum(1 for i in ids if i != job.id and self.daemon.job(i).finished)
            with self._lock:
                interrupted = job.id in self._interrupted
            state.update(
                job=f"Batch {done + 1} out of {len(ids)}" if len(ids) > 1 else f"job {job.id}",
                job_count=len(ids) if len(ids) > 1 else counts["running"] + counts["queued"],
                job_no=done,
                job_timestamp=job.started_at or job.submitted_at,
                sampling_step=step,
                sampling_steps=total,
                interrupted=interrupted,
                skipped=interrupted,
            )
            preview = None
            skip = (req.get_param("skip_current_image") or "").lower() in ("true", "1", "yes")
            if not skip:
                preview = self.daemon.previews.latest(job.id)
            body.update(
                # A1111 sends the bare base64 of its live preview; ours is a small JPEG.
                current_image=preview["image"].split(",", 1)[1] if preview else None,
                progress=round(min(1.0, (done + fraction) / len(ids)), 4),
                eta_relative=view.get("estimated_time_remaining") or 0.0,
                textinfo=f"job {job.id}: step {step} of {total}",
                current_task=str(job.id),
            )
        elif counts["queued"]:
            state["job_count"] = counts["queued"]
        resp.media = body

    def _stop(self, req: falcon.Request, resp: falcon.Response, *, rest: bool) -> None:
        running = self.daemon.store.running()
        if not rest:  # skip stops the images in progress, not a batch claimed to run next
            ahead = self.daemon.claimed_ahead()
            running = [j for j in running if j.id not in ahead]
        ours = [j for j in running if j.source == SOURCE] or running
        interrupted, cancelled = [], []
        for job in ours:
            try:
                self.daemon.interrupt(job.id)
                interrupted.append(job.id)
            except (Conflict, Gone, NotFound):
                pass  # finished meanwhile
        with self._lock:
            self._interrupted.update(interrupted)
            waiting = [i for ids in self._requests for i in ids] if rest else []
        for job_id in waiting:
            try:
                self.daemon.cancel(job_id)
                cancelled.append(job_id)
            except (Conflict, Gone, NotFound):
                pass  # running (interrupted above) or finished
        resp.media = {"interrupted": interrupted, "cancelled": cancelled}

    def on_post_interrupt(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Stop the running jobs (the A1111 API's, else all) and cancel the queued rest of
        the A1111 requests waiting now: A1111 ends the whole request."""
        self._stop(req, resp, rest=True)

    def on_post_skip(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Stop the running jobs; the request goes on with its next images, as in A1111."""
        self._stop(req, resp, rest=False)

    # -- models and options ------------------------------------------------------------
    def running_model(self) -> str:
        return self.daemon.config["model"]["name"]

    def current_model(self) -> str | None:
        """The model A1111 jobs run with when they name none: ``model.name`` as saved (set
        with ``POST /sdapi/v1/options``) when it is a listed checkpoint not yet in effect;
        else None (the running default)."""
        saved = self.daemon.saved_config["model"]["name"]
        if saved != self.running_model() and saved in self.daemon.models.checkpoint_names():
            return saved
        return None

    def _checkpoints(self) -> list[dict[str, Any]]:
        listing = {c["name"]: c for c in self.daemon.models.listing()["checkpoints"]}
        entries = []
        for item in self.daemon.models.files("checkpoints"):
            short = (listing.get(item.name) or {}).get("hash")
            ext = "" if item.format == "diffusers" else Path(item.path).suffix
            name = item.name + ext
            entries.append(
                {
                    "title": f"{name} [{short}]" if short else name,
                    "model_name": os.path.splitext(name.replace("/", "_"))[0],
                    "hash": short,
                    "sha256": self.daemon.models.sha256(item, compute=False),
                    "filename": item.path,
                    "config": None,
                    "imagineerd_name": item.name,
                }
            )
        default = self.daemon.saved_config["model"]["name"]
        if default not in listing:
            entries.insert(
                0,
                {
                    "title": label(default),
                    "model_name": label(default),
                    "hash": None,
                    "sha256": None,
                    "filename": default,
                    "config": None,
                    "imagineerd_name": default,
                },
            )
        return entries

    def checkpoint_name(self, value: Any) -> Any:
        """Our checkpoint name for A1111's (a title with its hash, a file name, a
        model_name); anything else as it is, for the validator to refuse by name."""
        if not isinstance(value, str):
            return value
        bare = _TITLE_HASH.sub("", value).strip()
        for entry in self._checkpoints():
            if value == entry["title"] or bare in (
                entry["title"],
                entry["imagineerd_name"],
                entry["model_name"],
                entry["title"].split(" [")[0],
            ):
                return entry["imagineerd_name"]
        return bare

    def title(self, name: str) -> str:
        return next((e["title"] for e in self._checkpoints() if e["imagineerd_name"] == name), name)

    def on_get_sd_models(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = [
            {k: v for k, v in entry.items() if k != "imagineerd_name"}
            for entry in self._checkpoints()
        ]

    def on_post_refresh_checkpoints(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.daemon.models.refresh()
        resp.media = {}

    def on_get_options(self, req: falcon.Request, resp: falcon.Response) -> None:
        saved = self.daemon.saved_config["model"]["name"]
        generation = self.daemon.config["generation"]
        resp.media = {
            "sd_model_checkpoint": self.title(saved),
            "sd_checkpoint_hash": next(
                (e["sha256"] for e in self._checkpoints() if e["imagineerd_name"] == saved), None
            ),
            "CLIP_stop_at_last_layers": generation["clip_skip"],
            "sd_vae": "Automatic",
            "samples_format": "png",
            "samples_save": True,
            "outdir_samples": str(self.daemon.outputs_dir),
            "imagineerd_model_in_effect": self.running_model(),
            "imagineerd_restart_required": self.daemon.pending_restart(),
        }

    def on_post_options(self, req: falcon.Request, resp: falcon.Response) -> None:
        """``sd_model_checkpoint`` saves ``model.name`` (only a listed checkpoint; A1111 jobs
        use it at once, everything else after a restart); ``CLIP_stop_at_last_layers`` sets
        the ``clip_skip`` default. Other options are ignored and named."""
        body = read_json_object(req)
        restart: list[str] = []
        try:
            if body.get("sd_model_checkpoint") is not None:
                name = self.checkpoint_name(body["sd_model_checkpoint"])
                if name not in self.daemon.available_models():
                    titles = ", ".join(e["title"] for e in self._checkpoints()[:20])
                    raise ValidationError(
                        f"sd_model_checkpoint {str(name)[:100]!r} is not a checkpoint in the "
                        f"models folder; available: {titles}",
                        field="sd_model_checkpoint",
                    )
                restart = self.daemon.update_config({"model": {"name": name}}, merge=True)[
                    "restart_required"
                ]
            if body.get("CLIP_stop_at_last_layers") is not None:
                self.daemon.update_generation({"clip_skip": body["CLIP_stop_at_last_layers"]})
        except ValidationError as exc:
            raise a1111_error(exc) from None
        handled = ("sd_model_checkpoint", "CLIP_stop_at_last_layers")
        message = "Options saved"
        if "model.name" in restart:
            message += (
                "; the A1111 API uses the new model now, the rest of imagineerd after a "
                "restart (model.name)"
            )
        resp.media = {
            "message": message,
            "restart_required": restart,
            "imagineerd_ignored": [key for key in body if key not in handled],
        }

    # -- lists ---------------------------------------------------------------------------
    def on_get_samplers(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = [
            {
                "name": text,
                "aliases": [key, *SAMPLER_ALIASES.get(key, [])],
                "options": {"scheduler": "karras"} if key in KARRAS.values() else {},
            }
            for key, text in SCHEDULERS.items()
        ]

    def on_get_schedulers(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = [
            {
                "name": name,
                "label": text,
                "aliases": None,
                "default_rho": rho,
                "need_inner_model": False,
            }
            for name, text, rho in SCHEDULE_TYPES
        ]

    def on_get_loras(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = [
            {"name": item.name, "alias": item.name, "path": item.path, "metadata": {}}
            for item in self.daemon.models.files("loras")
        ]

    def on_get_sd_vae(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = [
            {"model_name": item.name, "filename": item.path}
            for item in self.daemon.models.files("vaes")
        ]

    def on_get_upscalers(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = [
            {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for name in ("None", "Lanczos")
        ]

    def on_get_latent_upscale_modes(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = [{"name": "Latent"}]

    def on_get_scripts(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"txt2img": [], "img2img": []}

    def on_get_memory(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = _memory()

    def _no_route(self, req: falcon.Request, resp: falcon.Response, path: str = "") -> None:
        raise NotFound(f"no A1111 API route {req.path[:200]} here")

    on_get_unknown = on_head_unknown = on_post_unknown = on_put_unknown = _no_route
    on_patch_unknown = on_delete_unknown = _no_route


#: ``(path under /sdapi/v1, suffix)`` of every route.
ROUTES = (
    ("txt2img", "txt2img"),
    ("img2img", "img2img"),
    ("progress", "progress"),
    ("interrupt", "interrupt"),
    ("skip", "skip"),
    ("sd-models", "sd_models"),
    ("refresh-checkpoints", "refresh_checkpoints"),
    ("options", "options"),
    ("samplers", "samplers"),
    ("schedulers", "schedulers"),
    ("loras", "loras"),
    ("sd-vae", "sd_vae"),
    ("upscalers", "upscalers"),
    ("latent-upscale-modes", "latent_upscale_modes"),
    ("scripts", "scripts"),
    ("memory", "memory"),
)


def add_routes(app: falcon.App, daemon: Daemon) -> None:
    """Register the ``/sdapi/v1`` routes on ``app``; other ``/sdapi/`` paths are a JSON 404."""
    api = A1111Api(daemon)
    for path, suffix in ROUTES:
        app.add_route(f"{PREFIX}/{path}", api, suffix=suffix)
    app.add_route("/sdapi/{path:path}", api, suffix="unknown")
