"""Job specs: the one validator every frontend (API, inbox, CLI) goes through, and job records.

A *spec* is what the user asked for (prompt and generation parameters, fully resolved: omitted
values come from config's ``generation:`` section and an omitted seed is drawn at random, so the
stored spec reproduces the image). A *job* is a spec plus its life in the queue.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from . import prompt_syntax
from .checks import (
    HIRES_DEFAULTS,
    HIRES_SCALE,
    INPAINT_AREAS,
    LORA_WEIGHT,
    LORAS_MAX,
    NAME_MAX,
    PROMPT_MAX,
    SCHEDULERS,
    SEED_MAX,
    UPSCALERS,
    check_float,
    check_hires,
    check_image,
    check_int,
    check_loras,
    check_name,
    check_option,
    check_scheduler,
    check_text,
    check_url,
)
from .errors import ValidationError

#: Job statuses. ``queued -> running -> completed | failed | cancelled``; ``queued -> cancelled``.
QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = (
    "queued",
    "running",
    "completed",
    "failed",
    "cancelled",
)
STATUSES = (QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED)
FINISHED = (COMPLETED, FAILED, CANCELLED)


@dataclass(frozen=True)
class Param:
    """One job parameter and its bounds: the single table the validator, config's
    ``generation:`` section, ``GET /api/options``, the inbox's error notes and the README's
    job table all read, so a bound is written once."""

    name: str
    #: "text", "int", "float", "choice" (a scheduler), "option" (one of ``choices``), "name"
    #: (of a model file), "loras", "image" or "hires"
    kind: str
    lo: float | None = None
    hi: float | None = None
    multiple_of: int = 1
    max_length: int | None = None
    required: bool = False
    #: Omitted values come from config's ``generation:`` section (all but prompt and seed).
    has_default: bool = True
    #: What an omitted field without a config default means (model: the configured one).
    empty: Any = None
    choices: tuple[str, ...] = ()

    def check(self, value: Any) -> Any:
        if self.kind == "text":
            return check_text(self.name, value, required=self.required, max_len=self.max_length)
        if self.kind == "int":
            return check_int(self.name, value, self.lo, self.hi, multiple_of=self.multiple_of)
        if self.kind == "float":
            return check_float(self.name, value, self.lo, self.hi)
        if self.kind == "name":
            return check_name(self.name, value)
        if self.kind == "loras":
            return check_loras(self.name, value)
        if self.kind == "image":
            return check_image(self.name, value)
        if self.kind == "option":
            return check_option(self.name, value, self.choices)
        if self.kind == "hires":
            return check_hires(self.name, value)
        if self.kind == "url":
            return check_url(self.name, value)
        return check_scheduler(self.name, value)

    def limits(self) -> dict[str, Any]:
        """The bounds as ``GET /api/options`` shows them (and the UI's inputs use)."""
        if self.kind in ("text", "name", "url"):
            return {"max_length": self.max_length}
        if self.kind == "loras":
            return {"max_items": LORAS_MAX, "min": LORA_WEIGHT[0], "max": LORA_WEIGHT[1]}
        if self.kind == "image":
            return {"formats": ["png", "jpeg", "webp"]}
        if self.kind == "option":
            return {"choices": list(self.choices)}
        if self.kind == "hires":
            return {
                "scale": {"min": HIRES_SCALE[0], "max": HIRES_SCALE[1]},
                "steps": {"min": 0, "max": 150},
                "denoising_strength": {"min": 0.0, "max": 1.0},
                "upscaler": {"choices": list(UPSCALERS)},
                "defaults": dict(HIRES_DEFAULTS),
            }
        if self.kind == "choice":
            return {"choices": list(SCHEDULERS)}
        limits: dict[str, Any] = {"min": self.lo, "max": self.hi}
        if self.multiple_of > 1:
            limits["multiple_of"] = self.multiple_of
        return limits

    def rule(self) -> str:
        """The bounds in words: ``steps 1-150``, ``width 64-2048, divisible by 8``."""
        if self.kind in ("text", "name", "url"):
            return f"{self.name} up to {self.max_length} characters"
        if self.kind == "loras":
            lo, hi = (_number(w) for w in LORA_WEIGHT)
            return f"{self.name} up to {LORAS_MAX}, weights {lo}-{hi}"
        if self.kind == "image":
            return f"{self.name} a PNG, JPEG or WebP image"
        if self.kind == "option":
            return f"{self.name} one of {', '.join(self.choices)}"
        if self.kind == "hires":
            return f"{self.name} scale {_number(HIRES_SCALE[0])}-{_number(HIRES_SCALE[1])}"
        if self.kind == "choice":
            return f"{self.name} one of {', '.join(SCHEDULERS)}"
        text = f"{self.name} {_number(self.lo)}-{_number(self.hi)}"
        return text + (f", divisible by {self.multiple_of}" if self.multiple_of > 1 else "")


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


#: Every parameter a job may carry, in the order the API documents them.
PARAMS: dict[str, Param] = {
    p.name: p
    for p in (
        Param("prompt", "text", max_length=PROMPT_MAX, required=True, has_default=False),
        Param("negative_prompt", "text", max_length=PROMPT_MAX),
        Param("seed", "int", 0, SEED_MAX, has_default=False),
        Param("steps", "int", 1, 150),
        Param("width", "int", 64, 2048, multiple_of=8),
        Param("height", "int", 64, 2048, multiple_of=8),
        Param("guidance_scale", "float", 0.0, 30.0),
        Param("scheduler", "choice"),
        Param("model", "name", max_length=NAME_MAX, has_default=False, empty=""),
        Param("loras", "loras", has_default=False, empty=()),
        Param("clip_skip", "int", 1, 12),
        Param("vae", "name", max_length=NAME_MAX, has_default=False, empty="default"),
        Param("init_image", "image", has_default=False, empty=""),
        Param("strength", "float", 0.0, 1.0, has_default=False, empty=0.75),
        Param("mask", "image", has_default=False, empty=""),
        Param("mask_blur", "int", 0, 64, has_default=False, empty=4),
        Param("inpaint_area", "option", has_default=False, empty="whole", choices=INPAINT_AREAS),
        Param("hires", "hires", has_default=False, empty=None),
        Param("webhook_url", "url", max_length=2048, has_default=False, empty=""),
    )
}
PARAMETERS = tuple(PARAMS)
DEFAULTABLE = tuple(name for name, p in PARAMS.items() if p.has_default)
#: One checker per parameter; ``validate`` and config's ``generation:`` section share them.
CHECKS = {name: p.check for name, p in PARAMS.items()}


def limits() -> dict[str, dict[str, Any]]:
    """Bounds of every parameter, keyed by name (``GET /api/options``)."""
    return {name: p.limits() for name, p in PARAMS.items()}


def bounds_summary() -> str:
    """The numeric bounds in one sentence, for notes a person reads (inbox error notes)."""
    return "; ".join(p.rule() for p in PARAMS.values() if p.kind in ("int", "float"))


#: Keys of the ``imagineerd`` PNG chunk that record what happened rather than what was asked
#: (``outputs.job_metadata``): a pasted chunk re-runs the job, so they are accepted and ignored.
RECORD_ONLY = frozenset(
    {
        "id",
        "sampler",
        "backend",
        "source",
        "source_name",
        "submitted_at",
        "started_at",
        "completed_at",
        "duration_seconds",
        "version",
        "hashes",
        "init_image_name",  # read by the daemon when the input is no longer stored
    }
)


_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class JobSpec:
    """A fully resolved, valid generation request."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    width: int
    height: int
    guidance_scale: float
    scheduler: str
    #: A checkpoint name as ``GET /api/models`` lists it, or ``model.name``; "" (jobs
    #: stored by the first release) is the configured model.
    model: str = ""
    #: ``((name, weight), ...)`` from the ``loras`` field; ``<lora:...>`` tags in the prompt
    #: are read from the prompt itself (``prompt_syntax``).
    loras: tuple[tuple[str, float], ...] = ()
    clip_skip: int = 1
    #: A VAE name as listed, or ``default`` (the checkpoint's own).
    vae: str = "default"
    #: ``sha256:<hex>`` of the stored input image (``inputs``), or "" for text-to-image.
    init_image: str = ""
    #: The output the input came from (its file name), when it came from one.
    init_image_name: str = ""
    strength: float = 0.75
    #: ``sha256:<hex>`` of the stored mask (white: repaint), or "".
    mask: str = ""
    mask_blur: int = 4
    inpaint_area: str = "whole"
    #: ``(scale, steps, denoising_strength, upscaler)`` of A1111's hires fix, or None.
    hires: tuple[float, int, float, str] | None = None
    #: Called when the job finishes (a host in ``webhooks.allowed_hosts``), or "".
    webhook_url: str = ""

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["loras"] = [{"name": name, "weight": weight} for name, weight in self.loras]
        if self.hires is not None:
            body["hires"] = dict(zip(HIRES_DEFAULTS, self.hires, strict=True))
        return body

    @property
    def mode(self) -> str:
        """``txt2img``, ``img2img`` or ``inpaint``: what the backend is asked to do."""
        if self.mask:
            return "inpaint"
        return "img2img" if self.init_image else "txt2img"

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        """A spec as a store saved it. The first release stored text with lone surrogates
        (JSON escapes such as ``\\ud800``) that no answer can carry; they read back as
        U+FFFD so such a job can still be shown, listed and cancelled."""
        fields = json.loads(text)
        for name in ("prompt", "negative_prompt"):
            value = fields.get(name)
            if isinstance(value, str):
                fields[name] = _SURROGATE.sub("\ufffd", value)
        if "loras" in fields:
            fields["loras"] = tuple((item["name"], item["weight"]) for item in fields["loras"])
        if fields.get("hires") is not None:
            fields["hires"] = tuple(fields["hires"][key] for key in HIRES_DEFAULTS)
        return cls(**fields)

    @property
    def sampler_label(self) -> str:
        return SCHEDULERS[self.scheduler]

    @functools.cached_property
    def _active_loras(self) -> tuple[tuple[str, float], ...]:
        # Parsed once per spec: batch keys ask for it for every job a claim looks at.
        tags = prompt_syntax.extract_networks(self.prompt)[1]
        return prompt_syntax.combine_loras(self.loras, tags)

    def active_loras(self) -> tuple[tuple[str, float], ...]:
        """The LoRAs this job applies: the ``loras`` field, then the prompt's
        ``<lora:name:weight>`` tags; one weight per name (weights of a name given twice add)."""
        return self._active_loras


def validate(
    data: Any, defaults: Mapping[str, Any], *, rng: random.Random | None = None
) -> JobSpec:
    """Check a raw request (a JSON object, a YAML mapping, CLI options) and resolve it.

    ``defaults`` is config's ``generation:`` section. ``None`` for an optional field means
    "use the default" so clients may send explicit nulls. Raises :class:`ValidationError`
    naming the first offending field.
    """
    if not isinstance(data, Mapping):
        raise ValidationError(
            f"a job must be an object with at least a prompt, got {type(data).__name__}"
        )
    unknown = [key for key in data if key not in PARAMETERS and key not in RECORD_ONLY]
    if unknown:
        raise ValidationError(
            f"unknown field {unknown[0]!r}; allowed fields: {', '.join(PARAMETERS)}",
            field=str(unknown[0]),
        )
    if data.get("prompt") is None:
        raise ValidationError("prompt is required", field="prompt")
    if data.get("scheduler") is None and data.get("sampler") is not None:
        # A1111 calls it the sampler; in a pasted record it merely repeats the scheduler.
        data = {**data, "scheduler": check_scheduler("sampler", data["sampler"])}
    values: dict[str, Any] = {}
    for name in PARAMETERS:
        raw = data.get(name)
        param = PARAMS[name]
        if raw is None and name == "seed":
            raw = (rng or random).randint(0, SEED_MAX)
        elif raw is None and not param.has_default:
            values[name] = param.empty
            continue
        elif raw is None:
            raw = defaults[name]
        values[name] = CHECKS[name](raw)
    if values["hires"] is not None and (values["init_image"] or values["mask"]):
        raise ValidationError(
            "hires applies to text-to-image jobs; leave it out for a job with an init_image",
            field="hires",
        )
    if values["mask"] and not values["init_image"]:
        raise ValidationError("mask needs an init_image to repaint", field="mask")
    if values["hires"] is not None:
        scale, hi = values["hires"][0], PARAMS["width"].hi
        final = hires_size(values["width"], values["height"], scale)
        if max(final) > hi:
            raise ValidationError(
                f"hires: {values['width']}x{values['height']} scaled by {scale:g} is "
                f"{final[0]}x{final[1]}, over the limit of {hi}; lower the scale or the size",
                field="hires",
            )
    spec = JobSpec(**values)
    # The syntax is checked here, so a mistake is a 400 at submit and never a failed job.
    for name in ("prompt", "negative_prompt"):
        text, _ = prompt_syntax.extract_networks(getattr(spec, name), field=name)
        prompt_syntax.refuse_prompt_editing(text, field=name)
        prompt_syntax.parse_attention(text, field=name)
    if len(spec.active_loras()) > LORAS_MAX:
        raise ValidationError(
            f"a job may apply at most {LORAS_MAX} LoRAs (loras and <lora:...> tags together)",
            field="loras",
        )
    return spec


def round8(value: float) -> int:
    """The nearest multiple of 8 (sizes must be), at least 8."""
    return max(8, int(round(value / 8)) * 8)


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The final size of a hires-fixed job."""
    return round8(width * scale), round8(height * scale)


def iso(when: datetime) -> str:
    """A job timestamp: local time with microseconds, as the original API's examples show
    (``2025-10-13T14:32:15.123456``)."""
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f")


@dataclass
class Job:
    """A job record as the store keeps it."""

    id: int
    status: str
    spec: JobSpec
    submitted_at: str
    source: str = "api"
    source_name: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    duration_seconds: float | None = None
    output_path: str | None = None
    error: str | None = None
    attempts: int = 0
    progress_step: int = 0
    progress_total: int = 0
    claim_id: int | None = None
    #: The node (``queue.node_name``) whose worker holds or last held the job.
    node: str | None = None
    #: A running job's claim token: the node that holds it proves it with this when it
    #: finishes the job, so a late result from a node whose lease ran out is refused.
    token: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_dict(self) -> dict[str, Any]:
        """The job as the API shows it (the original API's field names), without live fields."""
        body: dict[str, Any] = {"id": self.id, "status": self.status}
        body.update(self.spec.to_dict())
        body["submitted_at"] = self.submitted_at
        body["source"] = self.source
        if self.source_name is not None:
            body["source_name"] = self.source_name
        for key in ("started_at", "completed_at", "duration_seconds", "output_path", "error"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        body["attempts"] = self.attempts
        # Stopped (interrupted while it ran: it has a start) rather than taken out of the
        # queue; a job put back in the queue loses its start, so only these two end so.
        body["stopped"] = self.status == CANCELLED and self.started_at is not None
        if self.node is not None:
            body["node"] = self.node
        return body
