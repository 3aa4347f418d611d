"""The checker of every configuration key, and bounds on a configuration's shape.

Each checker takes the dotted key and the value and returns the value (normalised) or raises
``ConfigError`` naming the key, the problem and the fix.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

from . import checks, jobs
from .errors import ConfigError, ValidationError


def _str(*, nonempty: bool = False, choices: tuple[str, ...] | None = None) -> Callable:
    def check(key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be text, got {value!r}", field=key)
        if nonempty and not value.strip():
            raise ConfigError(f"{key} must not be empty", field=key)
        if choices is not None and value not in choices:
            raise ConfigError(
                f"{key} must be one of {', '.join(choices)}, got {value!r}", field=key
            )
        return value

    return check


def _int(lo: int, hi: int) -> Callable:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(
                f"{key} must be a whole number from {lo} to {hi}, got {value!r}", field=key
            )
        return value

    return check


def _float(lo: float, hi: float) -> Callable:
    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise ConfigError(
                f"{key} must be a number from {lo:g} to {hi:g}, got {value!r}", field=key
            )
        return float(value)

    return check


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}", field=key)
    return value


def _one_device(value: Any) -> bool:
    return isinstance(value, str) and (
        value in ("auto", "cpu", "mps", "cuda") or re.fullmatch(r"cuda:\d+", value) is not None
    )


def _device(key: str, value: Any) -> str | list[str]:
    """One device, or a list of devices: one worker each, all on the same queue."""
    if _one_device(value):
        return value
    if isinstance(value, list) and value and all(_one_device(v) and v != "auto" for v in value):
        return list(value)
    raise ConfigError(
        f"{key} must be auto, cpu, mps, cuda, cuda:N or a list like [cuda:0, cuda:1], "
        f"got {value!r}",
        field=key,
    )


def _auto_or(check: Callable) -> Callable:
    def wrapped(key: str, value: Any) -> Any:
        if value == "auto":
            return value
        try:
            return check(key, value)
        except ConfigError as exc:  # the error names auto too: it is one of the choices
            must = f"{key} must be "
            choices = "auto, " if exc.message.startswith(must + "true or false") else "auto or "
            raise ConfigError(exc.message.replace(must, must + choices, 1), field=key) from None

    return wrapped


def _buckets(key: str, value: Any) -> list[int]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 64 for v in value)
    ):
        raise ConfigError(
            f"{key} must be a list of batch sizes from 1 to 64, got {value!r}", field=key
        )
    return sorted(set(value))


def _sizes(key: str, value: Any) -> list[list[int]]:
    """Image sizes ``[[width, height], ...]``, each as a job may ask for (64-2048, by 8)."""

    def size(item: Any) -> bool:
        return (
            isinstance(item, list)
            and len(item) == 2
            and all(
                isinstance(v, int) and not isinstance(v, bool) and 64 <= v <= 2048 and v % 8 == 0
                for v in item
            )
        )

    if not isinstance(value, list) or len(value) > 16 or not all(size(v) for v in value):
        raise ConfigError(
            f"{key} must be a list of up to 16 [width, height] pairs (64 to 2048, divisible "
            f"by 8), like [[512, 512], [512, 768]], got {value!r}",
            field=key,
        )
    return [list(v) for v in value]


def _rescan(key: str, value: Any) -> float:
    """0 (only at start) or a period of at least a second: a pass reads the whole folder,
    and a shorter period would keep it reading."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (value == 0 or 1 <= value <= 7 * 86400)
    ):
        raise ConfigError(
            f"{key} must be 0 (only at start) or a number of seconds from 1 to 604800, "
            f"got {show_value(value)}",
            field=key,
        )
    return float(value)


def _origins(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(
            f'{key} must be a list of origins like [http://nas.local:8080] (or ["*"]), '
            f"got {value!r}",
            field=key,
        )
    return list(value)


#: Events a webhook endpoint may ask for.
WEBHOOK_EVENTS = ("job.completed", "job.failed", "job.cancelled")


def _url(key: str, value: Any) -> str:
    """An http(s) URL, by the same check as a job's ``webhook_url``."""
    try:
        url = checks.check_url(key, value)
    except ValidationError as exc:
        raise ConfigError(exc.message, field=key) from None
    if not url:
        raise ConfigError(f"{key} must be an http:// or https:// URL", field=key)
    return url


def _webhook_secret(key: str, value: Any) -> str:
    """Standard Webhooks secrets: ``whsec_`` and base64 (what their libraries generate)."""
    if not isinstance(value, str) or not re.fullmatch(r"whsec_[A-Za-z0-9+/=]{16,}", value):
        raise ConfigError(
            f"{key} must be a Standard Webhooks secret: whsec_ and at least 16 base64 "
            "characters, e.g. the output of python -c 'import base64, os; "
            'print("whsec_" + base64.b64encode(os.urandom(24)).decode())\'',
            field=key,
        )
    return value


def _webhook_endpoints(key: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ConfigError(f"{key} must be a list of {{url, events, secret}}", field=key)
    endpoints = []
    for index, item in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where} must be a mapping with url, events, secret", field=key)
        unknown = [k for k in item if k not in ("url", "events", "secret")]
        if unknown:
            raise ConfigError(
                f"unknown key {where}.{key_name(unknown[0])}; an endpoint has url, events, secret",
                field=key,
            )
        if "url" not in item or "secret" not in item:
            raise ConfigError(f"{where} needs url and secret", field=key)
        events = item.get("events", list(WEBHOOK_EVENTS))
        if not isinstance(events, list) or not all(e in WEBHOOK_EVENTS for e in events):
            raise ConfigError(
                f"{where}.events must be a list of {', '.join(WEBHOOK_EVENTS)}, got "
                f"{show_value(events)}",
                field=key,
            )
        endpoints.append(
            {
                "url": _url(f"{where}.url", item["url"]),
                "events": list(events),
                "secret": _webhook_secret(f"{where}.secret", item["secret"]),
            }
        )
    return endpoints


def _hosts(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(
        isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9.*:\[\]_-]+", v) for v in value
    ):
        raise ConfigError(
            f"{key} must be a list of host names like [nas.example.com, imagineerd.lan], "
            f"got {value!r}",
            field=key,
        )
    return [v.lower() for v in value]


_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


def _database(key: str, value: Any) -> str:
    """Where the queue lives: empty (SQLite under paths.state), a PostgreSQL URL shared by
    several nodes, or ``sqlite:PATH``."""
    if isinstance(value, str) and (
        value == ""
        or re.fullmatch(r"postgres(?:ql)?://[^\s]*", value)
        or re.fullmatch(r"sqlite:[^\s]+", value)
    ):
        return value
    raise ConfigError(
        f"{key} must be empty (SQLite in paths.state), a PostgreSQL URL such as "
        "postgresql://imagineerd@db.lan/imagineerd, or sqlite:/path/to/jobs.db; got "
        f"{show_value(value)}",
        field=key,
    )


def _node_name(key: str, value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"|[A-Za-z0-9][A-Za-z0-9._-]{0,62}", value):
        return value
    raise ConfigError(
        f"{key} must be empty (the host name) or a name of letters, digits, '.', '_' and '-' "
        f"up to 63 characters, such as gpu-box-2; got {show_value(value)}",
        field=key,
    )


def _host(key: str, value: Any) -> str:
    """An IP address (v4 or v6) or a host name: what the server binds to."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(value.strip("[]"))
            return value
        if _HOSTNAME.fullmatch(value):
            return value
    raise ConfigError(
        f"{key} must be an IP address or a host name, such as 0.0.0.0 (every interface), "
        f"127.0.0.1 (this machine only) or nas.local; got {show_value(value)}",
        field=key,
    )


def _token(key: str, value: Any) -> str:
    """Printable ASCII without spaces: what fits an ``Authorization: Bearer`` header as is.

    A token with a space, a control character or a non-ASCII letter is stripped, folded or
    re-encoded on the way by some client or proxy, and then never matches: the owner is locked
    out by a token that looks right in the file.
    """
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be text, got {show_value(value)}", field=key)
    bad = next((ch for ch in value if not "!" <= ch <= "~"), None)
    if bad is not None:
        raise ConfigError(
            f"{key} may hold only printable ASCII letters, digits and punctuation (no spaces, "
            f"control characters or accented letters); it contains {bad!r}. Choose another "
            "token, e.g. the output of: python -c 'import secrets; print(secrets.token_urlsafe())'",
            field=key,
        )
    return value


def show_value(value: Any) -> str:
    """A value for an error message: short, and never the repr of a huge container."""
    if isinstance(value, list | tuple | dict):
        return f"a {'mapping' if isinstance(value, dict) else 'list'} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def key_name(key: Any) -> str:
    """A key for an error message: as it is when it is short text, else shortened."""
    return key if isinstance(key, str) and len(key) <= 60 else show_value(key)


def _job_field(name: str) -> Callable:
    """Config's generation defaults obey exactly the job bounds (one validator, jobs.py)."""

    def check(key: str, value: Any) -> Any:
        try:
            return jobs.CHECKS[name](value)
        except ValidationError as exc:
            raise ConfigError(f"{key}: {exc.message}", field=key) from None

    return check


SCHEMA: dict[str, dict[str, Callable]] = {
    "server": {
        "host": _host,
        "port": _int(0, 65535),
        "threads": _int(2, 256),
        "max_event_streams": _int(0, 1000),
        "max_body_bytes": _int(1024, 1 << 30),
        "max_image_bytes": _int(1024, 1 << 30),
        "auth_token": _token,
        "cors_origins": _origins,
        "allowed_hosts": _hosts,
        "connection_limit": _int(1, 10000),
        "channel_timeout": _int(1, 86400),
    },
    "paths": {
        "outputs": _str(nonempty=True),
        "inbox": _str(nonempty=True),
        "state": _str(nonempty=True),
        "models": _str(nonempty=True),
    },
    "model": {
        "backend": _str(nonempty=True),
        "name": _str(nonempty=True),
        "arch": _str(choices=("auto", "sd15", "sd2", "sdxl")),
        "device": _device,
        "dtype": _str(choices=("auto", "float32", "float16", "bfloat16")),
        "cache_dir": _str(),
        "max_loaded": _int(1, 16),
        "cpu_cache": _int(0, 16),
    },
    "generation": {name: _job_field(name) for name in jobs.DEFAULTABLE},
    "inbox": {
        "enabled": _bool,
        "settle_seconds": _float(0, 3600),
        "rescan_seconds": _float(1, 86400),
        "polling": _bool,
        "max_file_bytes": _int(1, 1 << 30),
        "max_jobs_per_file": _int(1, 100000),
        "outputs_subfolder": _bool,
        "orphan_seconds": _float(1, 86400 * 30),
    },
    "gallery": {
        "trash_days": _float(0, 3650),
        "rescan_seconds": _rescan,
    },
    "presets": {},  # free-form names; checked by check_presets
    "webhooks": {
        "endpoints": _webhook_endpoints,
        "allowed_hosts": _hosts,
        "job_secret": lambda key, value: "" if value == "" else _webhook_secret(key, value),
        "retry_hours": _float(0.01, 720),
    },
    "queue": {
        "max_attempts": _int(1, 100),
        "database": lambda key, value: _database(key, value),
        "lease_seconds": _float(2, 3600),
        "node_name": lambda key, value: _node_name(key, value),
    },
    "performance": {
        "max_batch": _auto_or(_int(1, 64)),
        "compile": _auto_or(_bool),
        "batch_buckets": _buckets,
        "channels_last": _auto_or(_bool),
        "cpu_threads": _auto_or(_int(1, 1024)),
        "max_padding": _float(0, 0.9),
        "warm_sizes": _sizes,
        "cuda_graphs": _auto_or(_bool),
        "fuse_qkv": _bool,
        "vae_upcast": _auto_or(_bool),
        "job_timeout": _float(0, 86400),
        "look_ahead": _auto_or(_bool),
    },
    "metrics": {"public": _bool},
    "previews": {"every_steps": _int(0, 1000)},
}

#: Bounds on a configuration's shape, checked before anything else looks at it. A real one
#: nests four levels (presets.<name>.<field>) and holds about a hundred values.
MAX_DEPTH = 6

MAX_VALUES = 10_000


def check_shape(data: Any) -> None:
    """Refuse absurd nesting or size, and text that cannot be stored as UTF-8, anywhere in a
    configuration; run before any other check."""
    checks.check_tree(
        data,
        what="the configuration",
        max_depth=MAX_DEPTH,
        max_values=MAX_VALUES,
        error=ConfigError,
    )


#: Inbox subfolders the daemon itself uses; they cannot name a preset.
RESERVED_FOLDERS = ("done", "failed")

#: Model names are checked against the models folder when a job uses the preset.
PRESET_FIELDS = (
    *jobs.DEFAULTABLE,
    "seed",
    "model",
    "loras",
    "vae",
    "strength",
    "mask_blur",
    "inpaint_area",
    "hires",
)


def check_presets(value: Any) -> dict[str, dict[str, Any]]:
    """``presets: {name: {job field: value}}``; each value obeys the job bounds."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError("presets must be a mapping of preset names", field="presets")
    presets = {}
    for name, fields in value.items():
        key = f"presets.{name}"
        if (
            not isinstance(name, str)
            or not name
            or name.startswith(".")
            or "/" in name
            or "\\" in name
            or any(ch < " " or ch == "\x7f" for ch in name)
            or len(name.encode("utf-8", "surrogatepass")) > 255
            or name.lower() in RESERVED_FOLDERS
        ):
            # The name is an inbox folder: it must be one a share can hold.
            raise ConfigError(
                f"presets.{key_name(name)}: a preset name must be a plain folder name (no slashes, "
                "control characters or leading dot, at most 255 bytes), not done or failed",
                field=key,
            )
        if not isinstance(fields, Mapping):
            raise ConfigError(f"{key} must be a mapping of job fields", field=key)
        checked = {}
        for field, raw in fields.items():
            dotted = f"{key}.{field}"
            if field not in PRESET_FIELDS:
                raise ConfigError(
                    f"unknown key {dotted}; a preset may set {', '.join(PRESET_FIELDS)}",
                    field=dotted,
                )
            checked[field] = _job_field(field)(dotted, raw)
            if field == "loras":  # kept as config.yaml writes it: [{name, weight}, ...]
                checked[field] = [{"name": n, "weight": w} for n, w in checked[field]]
            if field == "hires" and checked[field] is not None:  # and {scale, steps, ...}
                checked[field] = dict(zip(jobs.HIRES_DEFAULTS, checked[field], strict=True))
        presets[name] = checked
    return presets


def check_key(section: str, key: Any, value: Any) -> Any:
    """``value`` checked as ``section.key``; an unknown key names the known ones."""
    if key not in SCHEMA[section]:
        raise ConfigError(
            f"unknown key {section}.{key_name(key)}; known keys in {section}: "
            f"{', '.join(SCHEMA[section])}",
            field=f"{section}.{key}",
        )
    return SCHEMA[section][key](f"{section}.{key}", value)
