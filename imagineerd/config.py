"""Configuration: load and validate ``config.yaml``.

Every key has a default (``DEFAULTS``) and a checker (``config_schema.SCHEMA``); a file may set
any subset.
Unknown keys are errors, not silently ignored, because a misspelt key that does nothing is the
hardest configuration bug to find. Relative paths are relative to the config file's folder.
Beyond each key, the whole configuration is checked (folders that must not overlap, a usable
host and token, text that can be stored), both when the file is loaded and before the HTTP API
writes a change. Writing the file is ``config_file``; what the API may change is
``config_remote``.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .config_schema import (
    SCHEMA,
    check_key,
    check_presets,
    check_shape,
    key_name,
)
from .errors import ConfigError
from .model_scan import find_checkpoint

log = logging.getLogger(__name__)

DEFAULTS: dict[str, dict[str, Any]] = {
    "server": {
        "host": "0.0.0.0",
        "port": 5000,
        "threads": 16,
        "max_event_streams": 8,
        "max_body_bytes": 1048576,
        "max_image_bytes": 33554432,
        "auth_token": "",
        "cors_origins": [],
        "allowed_hosts": [],
        "connection_limit": 100,
        "channel_timeout": 120,
    },
    "paths": {"outputs": "outputs", "inbox": "inbox", "state": "state", "models": "models"},
    "model": {
        "backend": "diffusers",
        "name": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "arch": "auto",
        "device": "auto",
        "dtype": "auto",
        "cache_dir": "",
        "max_loaded": 1,
        "cpu_cache": 1,
    },
    "generation": {
        "steps": 30,
        "guidance_scale": 7.5,
        "width": 512,
        "height": 512,
        "negative_prompt": "",
        "scheduler": "euler",
        "clip_skip": 1,
    },
    "inbox": {
        "enabled": True,
        "settle_seconds": 2.0,
        "rescan_seconds": 30.0,
        "polling": False,
        "max_file_bytes": 1048576,
        "max_jobs_per_file": 1000,
        "outputs_subfolder": False,
        "orphan_seconds": 600.0,
    },
    "gallery": {"trash_days": 7.0, "rescan_seconds": 600.0},
    "presets": {},
    "webhooks": {"endpoints": [], "allowed_hosts": [], "job_secret": "", "retry_hours": 24.0},
    "queue": {"max_attempts": 3, "database": "", "lease_seconds": 30.0, "node_name": ""},
    "performance": {
        "max_batch": "auto",
        "compile": "auto",
        "batch_buckets": [1, 2, 4, 8],
        "channels_last": "auto",
        "cpu_threads": "auto",
        "max_padding": 0.25,
        "warm_sizes": [],
        "cuda_graphs": "auto",
        "fuse_qkv": False,
        "vae_upcast": "auto",
        "job_timeout": 0,
        "look_ahead": "auto",
    },
    "metrics": {"public": False},
    "previews": {"every_steps": 5},
}

#: Sections whose keys take effect while running; a change to any other key needs a restart.
LIVE_SECTIONS = ("generation", "queue", "presets", "previews")
#: Keys of live sections that still need a restart: which database holds the queue and who
#: this node is are fixed for the life of the process.
RESTART_KEYS = frozenset({"queue.database", "queue.lease_seconds", "queue.node_name"})


def restart_required(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys that differ between two full configs and only apply after a restart."""
    return [
        f"{section}.{key}"
        for section, values in new.items()
        for key, value in values.items()
        if (section not in LIVE_SECTIONS or f"{section}.{key}" in RESTART_KEYS)
        and old[section].get(key) != value
    ]


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
            merged["presets"] = check_presets(values)
            continue
        if section not in SCHEMA:
            raise ConfigError(
                f"unknown section {key_name(section)}; known sections: {', '.join(SCHEMA)}",
                field=str(section),
            )
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{section} must be a mapping of keys", field=section)
        for key, value in values.items():
            merged[section][key] = check_key(section, key, value)
    return merged


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
        """``paths.<name>`` as an absolute path (outputs, inbox, state, models)."""
        return self.resolve(self.data["paths"][name])

    def node_name(self) -> str:
        """``queue.node_name``, or this machine's host name when it is empty."""
        return self.data["queue"].get("node_name") or socket.gethostname() or "imagineerd"

    def model_settings(self) -> dict[str, Any]:
        """The ``model:`` section as a backend receives it.

        ``name`` is made absolute when it names an existing local path relative to the config
        file, else made the path of the checkpoint it names in ``paths.models`` (as
        ``GET /api/models`` lists it), if any; ``cache_dir`` defaults to ``<state>/models``.
        """
        settings = dict(self.data["model"])
        local = self.resolve(settings["name"])
        if local.exists():
            settings["name"] = str(local)
        elif checkpoint := find_checkpoint(self.path_for("models"), settings["name"]):
            # A name from GET /api/models: the backend loads files by path.
            settings["name"] = str(checkpoint)
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
    - models is not in outputs (it would be published) and apart from the inbox (anyone on
      the share could add models, and a .ckpt runs code when it is loaded). outputs may be
      inside models: an A1111 webui folder holds its own outputs/.

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
    models = folders["models"]
    if models.is_relative_to(outputs):
        raise ConfigError(
            f"paths.models ({models}) is inside paths.outputs ({outputs}): the models would "
            "be published with the images; give models a folder of its own, e.g. models "
            "(beside config.yaml)",
            field="paths.models",
        )
    if models.is_relative_to(inbox) or inbox.is_relative_to(models):
        raise ConfigError(
            f"paths.models ({models}) and paths.inbox ({inbox}) overlap: anyone who can drop "
            "a file into the inbox could add or replace models (and a .ckpt runs code when it "
            "is loaded); put them side by side, e.g. models and inbox",
            field="paths.models",
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
