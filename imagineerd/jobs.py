"""Job specs: the one validator every frontend (API, inbox, CLI) goes through, and job records.

A *spec* is what the user asked for (prompt and generation parameters, fully resolved: omitted
values come from config's ``generation:`` section and an omitted seed is drawn at random, so the
stored spec reproduces the image). A *job* is a spec plus its life in the queue.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from . import prompt_syntax
from .errors import ImagineerdError, ValidationError

SEED_MAX = 2_147_483_647
PROMPT_MAX = 2000
#: A model, LoRA or VAE name as ``GET /api/models`` lists it: a path inside the models folder.
NAME_MAX = 1024
#: LoRAs per job (the field and ``<lora:...>`` tags together) and the bounds of a weight.
LORAS_MAX = 16
LORA_WEIGHT = (-10.0, 10.0)
#: Choices of the option parameters.
INPAINT_AREAS = ("whole", "masked")
UPSCALERS = ("latent", "lanczos")
#: Hires fix: the bounds of its fields and what an omitted one means.
HIRES_SCALE = (1.0, 4.0)
HIRES_DEFAULTS = {"scale": 2.0, "steps": 0, "denoising_strength": 0.5, "upscaler": "latent"}

#: Scheduler ids accepted in config and jobs, with the AUTOMATIC1111 label written into PNG
#: metadata. The diffusers backend maps each id to a scheduler class.
SCHEDULERS: dict[str, str] = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "ddim": "DDIM",
    "unipc": "UniPC",
    "heun": "Heun",
}
_SCHEDULER_BY_LABEL = {label.lower(): key for key, label in SCHEDULERS.items()}

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


def _describe(value: Any) -> str:
    if isinstance(value, list | tuple | dict | set):
        # Never repr() a container: a hostile one (YAML aliases) can be enormous.
        return f"a {'mapping' if isinstance(value, dict) else 'list'} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_int(name: str, value: Any, lo: Any, hi: Any, *, multiple_of: int = 1) -> int:
    """Return ``value`` as an int within ``[lo, hi]`` or raise a message naming ``name``."""
    # bool is an int subclass in Python; "true" is never a meaningful step count.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(
            f"{name} must be a whole number from {lo} to {hi}, got {_describe(value)}",
            field=name,
        )
    if isinstance(value, float):
        if not value.is_integer():
            raise ValidationError(
                f"{name} must be a whole number from {lo} to {hi}, got {_describe(value)}",
                field=name,
            )
        value = int(value)
    if not lo <= value <= hi:
        raise ValidationError(f"{name} must be from {lo} to {hi}, got {value}", field=name)
    if value % multiple_of:
        below = value - value % multiple_of
        raise ValidationError(
            f"{name} must be divisible by {multiple_of}, got {value} "
            f"(nearest: {below} or {below + multiple_of})",
            field=name,
        )
    return value


def check_float(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(
            f"{name} must be a number from {lo:g} to {hi:g}, got {_describe(value)}", field=name
        )
    value = float(value)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ValidationError(f"{name} must be from {lo:g} to {hi:g}, got {value:g}", field=name)
    return value


def check_text(name: str, value: Any, *, required: bool, max_len: int | None = PROMPT_MAX) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be text, got {_describe(value)}", field=name)
    if "\x00" in value:
        raise ValidationError(f"{name} must not contain NUL characters", field=name)
    check_encodable(name, value)
    value = value.strip()
    if required and not value:
        raise ValidationError(f"{name} must not be empty", field=name)
    if max_len is not None and len(value) > max_len:
        raise ValidationError(
            f"{name} must be at most {max_len} characters after trimming, got {len(value)}",
            field=name,
        )
    return value


def check_encodable(
    name: str, value: str, *, error: type[ImagineerdError] = ValidationError
) -> str:
    """Refuse text that cannot be written as UTF-8.

    JSON and YAML escapes can spell lone UTF-16 surrogates (``"\\udcff"``); such a ``str``
    passes every other check and then breaks far away (the database, a PNG chunk, the next
    JSON answer), so it is stopped where it enters.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(
            f"{name} contains text that is not valid Unicode (a lone surrogate "
            f"{value[exc.start]!r} at character {exc.start + 1}); send UTF-8 text",
            field=name,
        ) from None
    return value


def check_tree(
    data: Any,
    *,
    what: str,
    max_depth: int,
    max_values: int | None = None,
    prefix: str = "",
    error: type[ImagineerdError] = ValidationError,
) -> None:
    """Refuse a parsed document (a request body, a configuration) nested more than
    ``max_depth`` levels, holding more than ``max_values`` values, or with any text, keys
    included, that cannot be stored as UTF-8; errors name the dotted path at fault.

    Iterative, so a hostile document cannot exhaust the stack here; run it before anything
    else reads the document.
    """
    stack: list[tuple[Any, str, int]] = [(data, prefix, 1)]
    count = 0
    while stack:
        value, where, depth = stack.pop()
        count += 1
        if max_values is not None and count > max_values:
            raise error(f"{what} holds more than {max_values} values")
        if isinstance(value, str):
            check_encodable(where or what, value, error=error)
            continue
        if isinstance(value, Mapping):
            for key in value:
                if isinstance(key, str):
                    try:
                        check_encodable("a field name", key, error=error)
                    except ImagineerdError as exc:  # the field at fault is the one holding it
                        raise error(
                            f"{exc.message} (in {where or what})", field=where or None
                        ) from None
            children = [
                (item, f"{where}.{key}" if where else str(key)) for key, item in value.items()
            ]
        elif isinstance(value, list):
            children = [(item, where) for item in value]  # fields are named by their key
        else:
            continue
        if depth > max_depth:
            raise error(
                f"{where or what} is nested more than {max_depth} levels deep",
                field=where or None,
            )
        stack.extend((item, path, depth + 1) for item, path in children)


def check_scheduler(name: str, value: Any) -> str:
    """Accept a scheduler id (``dpmpp_2m``) or its A1111 label (``DPM++ 2M``); return the id."""
    if isinstance(value, str):
        key = value.strip().lower()
        if key in SCHEDULERS:
            return key
        if key in _SCHEDULER_BY_LABEL:
            return _SCHEDULER_BY_LABEL[key]
    raise ValidationError(
        f"{name} must be one of {', '.join(SCHEDULERS)}, got {_describe(value)}", field=name
    )


def check_name(name: str, value: Any) -> str:
    """A model, LoRA or VAE name: text without path tricks; whether it exists is the
    daemon's question (it knows the models folder)."""
    value = check_text(name, value, required=True, max_len=NAME_MAX)
    if "\n" in value or "\r" in value:
        raise ValidationError(f"{name} must be one line, got {_describe(value)}", field=name)
    return value


def check_loras(name: str, value: Any) -> tuple[tuple[str, float], ...]:
    """``[{"name": ..., "weight": ...}, ...]`` (weight 1 when omitted), or the short forms
    ``"name"`` and ``"name:0.8"`` a YAML file or the command line may use; returns
    ``((name, weight), ...)``."""
    if isinstance(value, str | Mapping):
        value = [value]
    if not isinstance(value, list | tuple):
        raise ValidationError(
            f"{name} must be a list of {{name, weight}} objects, got {_describe(value)}",
            field=name,
        )
    if len(value) > LORAS_MAX:
        raise ValidationError(f"{name} may hold at most {LORAS_MAX} LoRAs, got {len(value)}")
    lo, hi = LORA_WEIGHT
    result: list[tuple[str, float]] = []
    for index, item in enumerate(value):
        where = f"{name}[{index}]"
        if isinstance(item, str):
            label, sep, weight = item.rpartition(":")
            if not sep or not _is_number(weight):
                label, weight = item, "1"
            item = {"name": label, "weight": float(weight)}
        if not isinstance(item, Mapping):
            raise ValidationError(
                f"{where} must be an object with name and weight, got {_describe(item)}",
                field=name,
            )
        unknown = [key for key in item if key not in ("name", "weight")]
        if unknown:
            raise ValidationError(
                f"{where}: unknown field {unknown[0]!r}; a LoRA has name and weight", field=name
            )
        if item.get("name") is None:
            raise ValidationError(f"{where}.name is required", field=name)
        label = check_name(f"{where}.name", item["name"])
        weight = item.get("weight")
        weight = 1.0 if weight is None else check_float(f"{where}.weight", weight, lo, hi)
        result.append((label, weight))
    return tuple(result)


def check_image(name: str, value: Any) -> str | bytes:
    """An image reference as sent: text (a ``data:`` URL, base64, ``sha256:<hex>`` of a
    stored input, an output's file name) or, from the inbox and the command line, the file's
    bytes. Whether it is an image is the daemon's question (``inputs.InputStore``)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if value == "":  # as a job record says "no image"
        return ""
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(
            f"{name} must be an image: a data: URL or base64 of a PNG, JPEG or WebP, or the "
            f"file name of an output image; got {_describe(value)}",
            field=name,
        )
    return check_encodable(name, value.strip())


def check_option(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    raise ValidationError(
        f"{name} must be one of {', '.join(choices)}, got {_describe(value)}", field=name
    )


def check_hires(name: str, value: Any) -> tuple[float, int, float, str] | None:
    """``{scale, steps, denoising_strength, upscaler}`` (each optional), ``true`` for the
    defaults, ``false`` or null for none; returns ``(scale, steps, denoising, upscaler)``."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if isinstance(value, list | tuple) and len(value) == 4:  # as a stored spec holds it
        value = dict(zip(HIRES_DEFAULTS, value, strict=True))
    if not isinstance(value, Mapping):
        raise ValidationError(
            f"{name} must be an object with scale, steps, denoising_strength and upscaler, "
            f"got {_describe(value)}",
            field=name,
        )
    unknown = [key for key in value if key not in HIRES_DEFAULTS]
    if unknown:
        raise ValidationError(
            f"{name}: unknown field {unknown[0]!r}; hires has {', '.join(HIRES_DEFAULTS)}",
            field=name,
        )
    given = {**HIRES_DEFAULTS, **{k: v for k, v in value.items() if v is not None}}
    return (
        check_float(f"{name}.scale", given["scale"], *HIRES_SCALE),
        check_int(f"{name}.steps", given["steps"], 0, 150),
        check_float(f"{name}.denoising_strength", given["denoising_strength"], 0.0, 1.0),
        check_option(f"{name}.upscaler", given["upscaler"], UPSCALERS),
    )


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


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
        return check_scheduler(self.name, value)

    def limits(self) -> dict[str, Any]:
        """The bounds as ``GET /api/options`` shows them (and the UI's inputs use)."""
        if self.kind in ("text", "name"):
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
        if self.kind in ("text", "name"):
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

    def active_loras(self) -> tuple[tuple[str, float], ...]:
        """The LoRAs this job applies: the ``loras`` field, then the prompt's
        ``<lora:name:weight>`` tags; one weight per name (weights of a name given twice add)."""
        tags = prompt_syntax.extract_networks(self.prompt)[1]
        return prompt_syntax.combine_loras(self.loras, tags)


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
        return body
