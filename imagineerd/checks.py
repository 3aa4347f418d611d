"""The checks every job field (and config's generation defaults) goes through, and their
bounds: one function per kind of value, each raising a message that names the field.

``jobs.PARAMS`` says which field takes which check; this module knows nothing of jobs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

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
        raise ValidationError(
            f"{name} may hold at most {LORAS_MAX} LoRAs, got {len(value)}", field=name
        )
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


def check_url(name: str, value: Any) -> str:
    """An http(s) URL (whether its host is allowed is the daemon's question)."""
    if value == "":
        return ""
    if not isinstance(value, str) or len(value) > 2048:
        raise ValidationError(
            f"{name} must be an http:// or https:// URL, got {_describe(value)}", field=name
        )
    check_encodable(name, value)
    parts = urlsplit(value.strip())
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or any(c in value for c in " \n\r\t")
    ):
        raise ValidationError(
            f"{name} must be an http:// or https:// URL, got {_describe(value)}", field=name
        )
    return value.strip()
