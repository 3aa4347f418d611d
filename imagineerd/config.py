"""Configuration: load and validate ``config.yaml``, save changes atomically.

Every key has a default (``DEFAULTS``) and a checker (``_SCHEMA``); a file may set any subset.
Unknown keys are errors, not silently ignored, because a misspelt key that does nothing is the
hardest configuration bug to find. Relative paths are relative to the config file's folder.
Beyond each key, the whole configuration is checked (folders that must not overlap, a usable
host and token, text that can be stored), both when the file is loaded and before the HTTP API
writes a change; the API may change only the keys in ``REMOTE_KEYS``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import ipaddress
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from . import jobs
from .errors import ConfigError, Conflict, Forbidden, ValidationError

log = logging.getLogger(__name__)

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


_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
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
        f"127.0.0.1 (this machine only) or nas.local; got {_show(value)}",
        field=key,
    )


def _token(key: str, value: Any) -> str:
    """Printable ASCII without spaces: what fits an ``Authorization: Bearer`` header as is.

    A token with a space, a control character or a non-ASCII letter is stripped, folded or
    re-encoded on the way by some client or proxy, and then never matches: the owner is locked
    out by a token that looks right in the file.
    """
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be text, got {_show(value)}", field=key)
    bad = next((ch for ch in value if not "!" <= ch <= "~"), None)
    if bad is not None:
        raise ConfigError(
            f"{key} may hold only printable ASCII letters, digits and punctuation (no spaces, "
            f"control characters or accented letters); it contains {bad!r}. Choose another "
            "token, e.g. the output of: python -c 'import secrets; print(secrets.token_urlsafe())'",
            field=key,
        )
    return value


def _show(value: Any) -> str:
    """A value for an error message: short, and never the repr of a huge container."""
    if isinstance(value, list | tuple | dict):
        return f"a {'mapping' if isinstance(value, dict) else 'list'} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _name(key: Any) -> str:
    """A key for an error message: as it is when it is short text, else shortened."""
    return key if isinstance(key, str) and len(key) <= 60 else _show(key)


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
        "host": _host,
        "port": _int(0, 65535),
        "threads": _int(2, 256),
        "max_event_streams": _int(0, 1000),
        "max_body_bytes": _int(1024, 1 << 30),
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

#: What the HTTP API may change: section -> keys; ``presets`` (job settings only) is writable
#: as a whole. Everything else is read-only over the API because it decides who may connect
#: and with which token (``server``), which folders are read, moved, written and published
#: (``paths``, ``inbox.enabled``/``polling``/``outputs_subfolder``) or what code and files are
#: loaded (``model``): a request from the network must never turn the daemon against the
#: machine it runs on or against the token that guards it. It is an allow-list, so a key added
#: to the schema later is read-only until someone decides otherwise here.
REMOTE_KEYS: dict[str, frozenset[str]] = {
    "generation": frozenset(jobs.DEFAULTABLE),
    "queue": frozenset({"max_attempts"}),
    "inbox": frozenset({"settle_seconds", "rescan_seconds", "max_file_bytes", "max_jobs_per_file"}),
    "performance": frozenset(
        {"max_batch", "compile", "batch_buckets", "channels_last", "job_timeout"}
    ),
    # Only to a name from Daemon.available_models(): a free name could be any file on the server.
    "model": frozenset({"name"}),
}

_READ_ONLY_WHY = {
    "server": "it decides who may connect and how",
    "paths": "it decides which folders imagineerd reads, moves and publishes",
    "model": "it decides what code and files are loaded",
    "inbox": "it decides which folders are watched and where images go",
}

#: Bounds on a configuration's shape, checked before anything else looks at it. A real one
#: nests four levels (presets.<name>.<field>) and holds about a hundred values.
MAX_DEPTH = 6
MAX_VALUES = 10_000


def restart_required(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys that differ between two full configs and only apply after a restart."""
    return [
        f"{section}.{key}"
        for section, values in new.items()
        if section not in LIVE_SECTIONS
        for key, value in values.items()
        if old[section].get(key) != value
    ]


def check_shape(data: Any) -> None:
    """Refuse absurd nesting or size, and text that cannot be stored as UTF-8, anywhere.

    Iterative, so a hostile body cannot exhaust the stack here; run before any other check so
    that nothing later meets a string that breaks when it is written out.
    """
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    count = 0
    while stack:
        value, where, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(
                f"the configuration holds more than {MAX_VALUES} values; a real one holds "
                "about a hundred"
            )
        if isinstance(value, str):
            _encodable(where or "the configuration", value)
        elif isinstance(value, Mapping | list):
            if depth >= MAX_DEPTH:
                raise ConfigError(
                    f"{where or 'the configuration'} is nested more than {MAX_DEPTH} levels "
                    "deep; no setting needs that",
                    field=where or None,
                )
            if isinstance(value, list):
                stack.extend((item, where, depth + 1) for item in value)
                continue
            for key, item in value.items():
                if isinstance(key, str):
                    _encodable(where or "the configuration", key)
                stack.append((item, f"{where}.{key}" if where else str(key), depth + 1))


def _encodable(where: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(
            f"{where} contains {text[exc.start]!r}, which cannot be stored as UTF-8 (a lone "
            "surrogate, as an escape like \\udcff spells); remove it",
            field=where,
        ) from None


def validate(data: Any) -> dict[str, dict[str, Any]]:
    """Merge ``data`` over the defaults and check every key; return the full config dict."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("the configuration must be a mapping of sections (server:, model:, ...)")
    check_shape(data)
    merged = copy.deepcopy(DEFAULTS)
    for section, values in data.items():
        if section == "presets":
            merged["presets"] = _presets(values)
            continue
        if section not in _SCHEMA:
            raise ConfigError(
                f"unknown section {_name(section)}; known sections: {', '.join(_SCHEMA)}",
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
                    f"unknown key {section}.{_name(key)}; known keys in {section}: "
                    f"{', '.join(_SCHEMA[section])}",
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
            or any(ch < " " or ch == "\x7f" for ch in name)
            or len(name.encode("utf-8", "surrogatepass")) > 255
            or name.lower() in RESERVED_FOLDERS
        ):
            # The name is an inbox folder: it must be one a share can hold.
            raise ConfigError(
                f"presets.{_name(name)}: a preset name must be a plain folder name (no slashes, "
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
        presets[name] = checked
    return presets


class Config:
    """A validated configuration and the file it came from (``None`` for defaults only)."""

    def __init__(self, data: Mapping[str, Any] | None = None, path: Path | None = None) -> None:
        self.data = validate(data)
        self.path = Path(path).resolve() if path is not None else None
        check_folders(self)

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


#: Folders no setting of paths may be: the daemon moves files out of its inbox and publishes
#: its outputs, so a system folder there is how a typo (or an attacker) ruins a machine.
#: Each also as its real path, since /bin is a link to /usr/bin on merged-/usr systems.
SYSTEM_FOLDERS = frozenset(
    q
    for p in (
        "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
        "/run", "/sbin", "/sys", "/usr", "/var",
    )
    for q in (Path(p), Path(os.path.realpath(p)))
)  # fmt: skip
#: Pseudo-filesystems: nothing inside them is a folder for files either.
PSEUDO_FOLDERS = tuple(Path(p) for p in ("/proc", "/sys", "/dev"))


def check_folders(config: Config) -> None:
    """Refuse ``paths`` that overlap in a way that breaks something.

    - No folder is the filesystem root or a system folder such as /etc or /usr.
    - outputs and inbox are apart (neither is, or is inside, the other): the inbox takes what
      is dropped into it and is usually a writable share, the outputs folder is published.
    - state (the job database) is not in outputs (it would be published) nor in the inbox (a
      writable share could replace or delete it).
    - outputs and inbox do not hold the config file: it would be published with its token,
      or taken by the inbox as a prompt file.

    state may hold the others (``state: .`` keeps the database beside config.yaml), and the
    shipped layout (outputs, inbox and state side by side next to config.yaml) passes.
    Symbolic links are followed, so a link cannot hide an overlap.
    """
    folders = {name: Path(os.path.realpath(config.path_for(name))) for name in DEFAULTS["paths"]}
    home = Path(os.path.realpath(config.base_dir))
    for name, folder in folders.items():
        key = f"paths.{name}"
        if folder.parent == folder:
            raise ConfigError(
                f"{key} is {folder}, the root of the filesystem; give it a folder of its own, "
                f"such as {name} (beside config.yaml)",
                field=key,
            )
        if folder in SYSTEM_FOLDERS or any(folder.is_relative_to(p) for p in PSEUDO_FOLDERS):
            raise ConfigError(
                f"{key} is {folder}, a system folder; give it a folder of its own, such as "
                f"{name} (beside config.yaml)",
                field=key,
            )
    for name, why in (
        ("outputs", "config.yaml and its token would be published with the images"),
        ("inbox", "the inbox would take config.yaml as a prompt file"),
    ):
        if home.is_relative_to(folders[name]):
            raise ConfigError(
                f"paths.{name} ({folders[name]}) holds this config file's folder ({home}): "
                f"{why}; use a folder of its own, e.g. {name} (beside config.yaml)",
                field=f"paths.{name}",
            )
    outputs, inbox, state = folders["outputs"], folders["inbox"], folders["state"]
    if inbox == outputs:
        raise ConfigError(
            f"paths.inbox and paths.outputs are the same folder ({inbox}): the inbox takes what "
            "is dropped there and the outputs folder is published; give each its own folder, "
            "e.g. inbox and outputs side by side",
            field="paths.inbox",
        )
    for inner, outer in (("inbox", "outputs"), ("outputs", "inbox")):
        if folders[inner].is_relative_to(folders[outer]):
            raise ConfigError(
                f"paths.{inner} ({folders[inner]}) is inside paths.{outer} "
                f"({folders[outer]}); the inbox (a drop folder, often writable by anyone on "
                "the share) and the published outputs must not overlap; put them side by "
                "side, e.g. inbox and outputs",
                field=f"paths.{inner}",
            )
    for name, why in (
        ("outputs", "the job database would be published with the images"),
        ("inbox", "anyone who can drop a file could replace or delete the job database"),
    ):
        if state.is_relative_to(folders[name]):
            raise ConfigError(
                f"paths.state ({state}) is inside paths.{name} ({folders[name]}): {why}; "
                "give state a folder of its own, e.g. state (beside config.yaml)",
                field="paths.state",
            )


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


def remote_changes(
    saved: Mapping[str, Any], body: Any, *, merge: bool, models: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """What a request to change the configuration over the API asks for, checked.

    ``saved`` is the full saved configuration (what ``GET /api/config`` shows). With ``merge``
    (PATCH) ``body`` holds any sections and keys, merged key by key; ``presets`` merge by
    preset name (a preset given replaces that preset as a whole, ``null`` removes it).
    Without (PUT) it must hold every section and key, and ``presets`` is replaced as a whole.

    Returns only what differs from ``saved``, as ``{section: {key: value}}`` with values
    normalised as the file will hold them (for presets ``{name: fields, or None to remove}``).
    Raises ConfigError (400) for a bad shape or value and Forbidden (403) for a change to a key
    outside REMOTE_KEYS or to a model outside ``models``. Sending a read-only key back
    unchanged is fine: that is what a GET, edit, PUT round trip does.
    """
    if not isinstance(body, Mapping):
        raise ConfigError(
            "the configuration must be a JSON object of sections (generation, queue, ...)"
        )
    check_shape(body)
    for section in body:
        if section not in DEFAULTS:
            raise ConfigError(
                f"unknown section {_name(section)}; known sections: {', '.join(DEFAULTS)}",
                field=str(section),
            )
    if not merge:
        missing = [s for s in DEFAULTS if s not in body] + [
            f"{s}.{k}"
            for s, keys in DEFAULTS.items()
            if isinstance(body.get(s), Mapping)
            for k in keys
            if k not in body[s]
        ]
        if missing:
            raise ConfigError(
                "PUT /api/config replaces the whole configuration, so it must carry every "
                f"section and key; missing: {', '.join(missing)}. Send back what "
                "GET /api/config returned, edited, or send only the changes with "
                "PATCH /api/config",
                field=missing[0],
            )
    changes: dict[str, dict[str, Any]] = {}
    for section, values in body.items():
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"{section} must be a mapping of keys, got {_show(values)}", field=section
            )
        if section == "presets":
            found = _preset_changes(saved["presets"], values, merge=merge)
        else:
            found = _section_changes(section, saved[section], values, models)
        if found:
            changes[section] = found
    return changes


def _section_changes(
    section: str, saved: Mapping[str, Any], values: Mapping[str, Any], models: Sequence[str]
) -> dict[str, Any]:
    found = {}
    writable = REMOTE_KEYS.get(section, frozenset())
    for key, raw in values.items():
        dotted = f"{section}.{key}"
        if key not in _SCHEMA[section]:
            raise ConfigError(
                f"unknown key {section}.{_name(key)}; known keys in {section}: "
                f"{', '.join(_SCHEMA[section])}",
                field=dotted,
            )
        try:
            value = _SCHEMA[section][key](dotted, raw)
        except ConfigError:
            if key in writable:
                raise
            value = raw  # not a valid value, so certainly not the current one
        # True == 1 in Python, yet a flag sent as 1 is not the flag unchanged.
        if value == saved[key] and isinstance(value, bool) == isinstance(saved[key], bool):
            continue
        if key not in writable:
            raise Forbidden(
                f"{dotted} cannot be changed over the API ({_READ_ONLY_WHY[section]}); "
                "edit config.yaml on the server to change it, then restart imagineerd",
                field=dotted,
            )
        if dotted == "model.name" and value not in models:
            raise Forbidden(
                f"model.name can be changed over the API only to an available model "
                f"({', '.join(models)}), got {_show(raw)}; to use another model, edit "
                "config.yaml on the server",
                field=dotted,
            )
        found[key] = value
    return found


def _preset_changes(
    saved: Mapping[str, Any], values: Mapping[str, Any], *, merge: bool
) -> dict[str, Any]:
    if merge:
        found: dict[str, Any] = {}
        for name, fields in values.items():
            if fields is None:
                if name in saved:
                    found[name] = None
                continue
            checked = _presets({name: fields})[name]
            if saved.get(name) != checked:
                found[name] = checked
        return found
    new = _presets(values)
    found = {name: None for name in saved if name not in new}
    found.update({name: fields for name, fields in new.items() if saved.get(name) != fields})
    return found


def update_file(path: Path | None, changes: Mapping[str, Mapping[str, Any]]) -> Config:
    """Write ``changes`` (as :func:`remote_changes` returns them) into the config file.

    Only the changed keys are touched: everything else stays as it is on disk, comments,
    quoting and any hand edit made while the daemon runs included. The file on disk must be
    valid now (else Conflict: fix it there first), and the whole result is validated, and
    read back to the very values sent, before it atomically replaces the file. Returns the
    configuration as saved.
    """
    if path is None:
        raise ConfigError("this configuration has no file to save to")
    rt = _round_trip()
    doc = _read_doc(path, rt, missing_ok=False)
    for section, values in changes.items():
        target = doc.get(section)
        if not isinstance(target, Mapping):
            target = doc[section] = _yaml_value({})
        for key, value in values.items():
            if value is None:  # a removed preset
                target.pop(key, None)
            else:
                target[_yaml_value(key)] = _yaml_value(value, flow=section == "presets")
    text = _dump(rt, doc)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # ruamel wrote what PyYAML cannot read: refuse, write nothing
        raise ConfigError(
            f"this change cannot be written to config.yaml so that it reads back ({exc}); "
            "edit config.yaml on the server instead"
        ) from None
    result = Config(data, path)  # the whole file: a ConfigError names the key
    for section, values in changes.items():
        for key, value in values.items():
            if result.data[section].get(key) != value:
                raise ConfigError(
                    f"{section}.{_name(key)}: this value would not read back the same from "
                    "config.yaml; edit config.yaml on the server to set it",
                    field=f"{section}.{key}",
                )
    try:
        atomic_write_text(path, text, follow_symlinks=True)
    except OSError as exc:
        raise Conflict(f"cannot write {path}: {exc.strerror or exc}; nothing was changed") from None
    return result


def save(config: Config) -> None:
    """Write ``config.data`` back to its file atomically, keeping the file's comments.

    ruamel.yaml's round-trip mode is used because a config file whose comments vanish on the
    first save from the web UI is a config file nobody can read any more. Only values that
    differ from what the file holds are written; keys left at their default stay out. The API
    uses :func:`update_file`, which writes only the keys a request changed.
    """
    if config.path is None:
        raise ConfigError("this configuration has no file to save to")
    rt = _round_trip()
    doc = _read_doc(config.path, rt, missing_ok=True)
    for section, values in config.data.items():
        file_section = doc.get(section)
        if section == "presets":  # free-form: the section is replaced as a whole
            if (file_section or {}) != values and (values or file_section is not None):
                doc["presets"] = _yaml_value(values)
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
                doc[section] = file_section = _yaml_value({})
            file_section[key] = _yaml_value(value)
    atomic_write_text(config.path, _dump(rt, doc), follow_symlinks=True)


def _round_trip() -> Any:
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    return rt


def _read_doc(path: Path, rt: Any, *, missing_ok: bool) -> Any:
    """The file as a ruamel document (comments kept), refusing one that is broken now."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return _yaml_value({})
        # Writing only the change would make a file of defaults, token included.
        raise Conflict(
            f"{path} is gone from disk; restore it (it holds settings the API cannot change, "
            "such as the token), then save again"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise Conflict(f"cannot read {path}: {exc}") from None
    try:
        doc = rt.load(text)
    except Exception as exc:  # ruamel raises several parser/scanner error types
        raise Conflict(
            f"{path} on disk is no longer valid YAML ({exc}); fix or replace the file, "
            "then save again"
        ) from None
    if doc is None:
        return _yaml_value({})
    if not isinstance(doc, Mapping):
        raise Conflict(f"{path} on disk is not a mapping of sections; fix it first")
    if not missing_ok:
        try:
            Config(yaml.safe_load(text), path)
        except yaml.YAMLError as exc:
            raise Conflict(
                f"{path} on disk is no longer valid YAML ({exc}); fix or replace the file, "
                "then save again"
            ) from None
        except ConfigError as exc:
            raise Conflict(
                f"{path} on disk has an error now ({exc.message}); fix it there, then save again",
                field=exc.field,
            ) from None
    return doc


def _dump(rt: Any, doc: Any) -> str:
    buffer = io.StringIO()
    rt.dump(doc, buffer)
    return buffer.getvalue()


def _yaml_value(value: Any, *, flow: bool = False) -> Any:
    """``value`` as ruamel should write it so that PyYAML (which :func:`load` uses) reads it
    back the same.

    ruamel writes YAML 1.2, where ``yes``, ``on`` or ``1:30`` are plain text; PyYAML reads
    YAML 1.1, where they are a boolean and a number. Text that PyYAML would read as anything
    but itself is therefore written in double quotes. Lists (and presets) use flow style, as
    the shipped config.yaml does.
    """
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    if isinstance(value, str):
        return value if _reads_back(value) else DoubleQuotedScalarString(value)
    if isinstance(value, Mapping):
        mapping = CommentedMap((_yaml_value(k), _yaml_value(v)) for k, v in value.items())
        if flow:
            mapping.fa.set_flow_style()
        return mapping
    if isinstance(value, list):
        seq = CommentedSeq(_yaml_value(v) for v in value)
        seq.fa.set_flow_style()
        return seq
    return value


def _reads_back(text: str) -> bool:
    try:
        return yaml.safe_load(text) == text and "\n" not in text
    except yaml.YAMLError:
        return False


def atomic_write_text(path: Path, text: str, *, follow_symlinks: bool = False) -> None:
    """Write to a temporary file in the same folder, fsync, rename over ``path``, then fsync
    the folder so the rename itself survives a power cut.

    With ``follow_symlinks`` a ``path`` that is a symbolic link is written through to its
    target (atomically, in the target's folder) and the link stays: config.yaml is often a
    link into a folder under version control. Without it (the inbox's receipts, in a folder
    anyone on the share may write) a link is replaced, never written through, so a link
    planted there cannot aim a write at another file.
    """
    if follow_symlinks:
        path = Path(os.path.realpath(path))
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
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """fsync a folder (its entries: a rename, a new file). The write itself has happened by
    now, so a failure is logged, not raised: the caller must not report a saved change as
    failed."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows: no directory handles to fsync
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("could not fsync folder %s: %s", folder, exc)
