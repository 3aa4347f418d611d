"""Configuration: load and validate ``config.yaml``, save changes atomically.

Every key has a default (``DEFAULTS``) and a checker (``_SCHEMA``); a file may set any subset.
Unknown keys are errors, not silently ignored, because a misspelt key that does nothing is the
hardest configuration bug to find. Relative paths are relative to the config file's folder.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from . import jobs
from .errors import ConfigError, Conflict, ValidationError

DEFAULTS: dict[str, dict[str, Any]] = {
    "server": {
        "host": "0.0.0.0",
        "port": 5000,
        "threads": 16,
        "max_event_streams": 8,
        "max_body_bytes": 1048576,
        "auth_token": "",
        "cors_origins": [],
        "allowed_hosts": [],
        "connection_limit": 100,
        "channel_timeout": 120,
    },
    "paths": {"outputs": "outputs", "inbox": "inbox", "state": "state"},
    "model": {
        "backend": "diffusers",
        "name": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "arch": "auto",
        "device": "auto",
        "dtype": "auto",
        "cache_dir": "",
    },
    "generation": {
        "steps": 30,
        "guidance_scale": 7.5,
        "width": 512,
        "height": 512,
        "negative_prompt": "",
        "scheduler": "euler",
    },
    "inbox": {
        "enabled": True,
        "settle_seconds": 2.0,
        "rescan_seconds": 30.0,
        "polling": False,
        "max_file_bytes": 1048576,
        "max_jobs_per_file": 1000,
        "outputs_subfolder": False,
    },
    "presets": {},
    "queue": {"max_attempts": 3},
    "performance": {
        "max_batch": "auto",
        "compile": "auto",
        "batch_buckets": [1, 2, 4, 8],
        "channels_last": "auto",
        "job_timeout": 0,
    },
}


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
        return value if value == "auto" else check(key, value)

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


def _origins(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(
            f'{key} must be a list of origins like [http://nas.local:8080] (or ["*"]), '
            f"got {value!r}",
            field=key,
        )
    return list(value)


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


def _job_field(name: str) -> Callable:
    """Config's generation defaults obey exactly the job bounds (one validator, jobs.py)."""

    def check(key: str, value: Any) -> Any:
        try:
            return jobs.CHECKS[name](value)
        except ValidationError as exc:
            raise ConfigError(f"{key}: {exc.message}", field=key) from None

    return check


_SCHEMA: dict[str, dict[str, Callable]] = {
    "server": {
        "host": _str(nonempty=True),
        "port": _int(0, 65535),
        "threads": _int(2, 256),
        "max_event_streams": _int(0, 1000),
        "max_body_bytes": _int(1024, 1 << 30),
        "auth_token": _str(),
        "cors_origins": _origins,
        "allowed_hosts": _hosts,
        "connection_limit": _int(1, 10000),
        "channel_timeout": _int(1, 86400),
    },
    "paths": {
        "outputs": _str(nonempty=True),
        "inbox": _str(nonempty=True),
        "state": _str(nonempty=True),
    },
    "model": {
        "backend": _str(nonempty=True),
        "name": _str(nonempty=True),
        "arch": _str(choices=("auto", "sd15", "sdxl")),
        "device": _device,
        "dtype": _str(choices=("auto", "float32", "float16", "bfloat16")),
        "cache_dir": _str(),
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
    },
    "presets": {},  # free-form names; checked by _presets
    "queue": {"max_attempts": _int(1, 100)},
    "performance": {
        "max_batch": _auto_or(_int(1, 64)),
        "compile": _auto_or(_bool),
        "batch_buckets": _buckets,
        "channels_last": _auto_or(_bool),
        "job_timeout": _float(0, 86400),
    },
}


#: Sections whose keys take effect while running; a change to any other key needs a restart.
LIVE_SECTIONS = ("generation", "queue", "presets")


def restart_required(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys that differ between two full configs and only apply after a restart."""
    return [
        f"{section}.{key}"
        for section, values in new.items()
        if section not in LIVE_SECTIONS
        for key, value in values.items()
        if old[section].get(key) != value
    ]


def validate(data: Any) -> dict[str, dict[str, Any]]:
    """Merge ``data`` over the defaults and check every key; return the full config dict."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("the configuration must be a mapping of sections (server:, model:, ...)")
    merged = copy.deepcopy(DEFAULTS)
    for section, values in data.items():
        if section == "presets":
            merged["presets"] = _presets(values)
            continue
        if section not in _SCHEMA:
            raise ConfigError(
                f"unknown section {section!r}; known sections: {', '.join(_SCHEMA)}",
                field=str(section),
            )
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{section} must be a mapping of keys", field=section)
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if key not in _SCHEMA[section]:
                raise ConfigError(
                    f"unknown key {dotted}; known keys in {section}: {', '.join(_SCHEMA[section])}",
                    field=dotted,
                )
            merged[section][key] = _SCHEMA[section][key](dotted, value)
    return merged


#: Inbox subfolders the daemon itself uses; they cannot name a preset.
RESERVED_FOLDERS = ("done", "failed")
PRESET_FIELDS = (*jobs.DEFAULTABLE, "seed")


def _presets(value: Any) -> dict[str, dict[str, Any]]:
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
            or name.lower() in RESERVED_FOLDERS
        ):
            raise ConfigError(
                f"{key}: a preset name must be a plain folder name, not done or failed", field=key
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
        presets[name] = checked
    return presets


class Config:
    """A validated configuration and the file it came from (``None`` for defaults only)."""

    def __init__(self, data: Mapping[str, Any] | None = None, path: Path | None = None) -> None:
        self.data = validate(data)
        self.path = Path(path).resolve() if path is not None else None

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path is not None else Path.cwd()

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.data[section]

    def resolve(self, value: str) -> Path:
        """A path from the config, made absolute against the config file's folder."""
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else (self.base_dir / path)

    def path_for(self, name: str) -> Path:
        """``paths.<name>`` as an absolute path (outputs, inbox, state)."""
        return self.resolve(self.data["paths"][name])

    def model_settings(self) -> dict[str, Any]:
        """The ``model:`` section as a backend receives it.

        ``name`` is made absolute when it names an existing local path relative to the config
        file; ``cache_dir`` defaults to ``<state>/models``.
        """
        settings = dict(self.data["model"])
        local = self.resolve(settings["name"])
        if local.exists():
            settings["name"] = str(local)
        cache = settings["cache_dir"]
        settings["cache_dir"] = str(
            self.resolve(cache) if cache else self.path_for("state") / "models"
        )
        return settings


def load(path: str | os.PathLike) -> Config:
    """Read and validate a config file; errors name the file, the key and the problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} not found; copy config.yaml from the imagineerd folder "
            "or pass --config PATH"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    try:
        return Config(data, path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}", field=exc.field) from None


def save(config: Config) -> None:
    """Write ``config.data`` back to its file atomically, keeping the file's comments.

    ruamel.yaml's round-trip mode is used because a config file whose comments vanish on the
    first save from the web UI is a config file nobody can read any more. Only values that
    differ from what the file holds are written; keys left at their default stay out.
    """
    from ruamel.yaml import YAML

    if config.path is None:
        raise ConfigError("this configuration has no file to save to")
    rt = YAML()
    rt.preserve_quotes = True
    try:
        doc = rt.load(config.path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        doc = {}
    except Exception as exc:  # ruamel raises several parser/scanner error types
        raise Conflict(
            f"{config.path} on disk is no longer valid YAML ({exc}); fix or replace the file, "
            "then save again"
        ) from None
    if not isinstance(doc, Mapping):
        raise Conflict(f"{config.path} on disk is not a mapping of sections; fix it first")
    for section, values in config.data.items():
        file_section = doc.get(section)
        if section == "presets":  # free-form: the section is replaced as a whole
            if (file_section or {}) != values and (values or file_section is not None):
                doc["presets"] = values
            continue
        for key, value in values.items():
            current = file_section.get(key) if isinstance(file_section, Mapping) else None
            if (
                current == value
                or (file_section is None or key not in file_section)
                and (DEFAULTS[section][key] == value)
            ):
                continue
            if not isinstance(file_section, Mapping):
                doc[section] = file_section = {}
            file_section[key] = value
    buffer = io.StringIO()
    rt.dump(doc, buffer)
    atomic_write_text(config.path, buffer.getvalue())


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
