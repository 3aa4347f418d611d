"""Which settings the HTTP API may change, and what a requested change amounts to."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import jobs
from .config import DEFAULTS, LIVE_SECTIONS, Config, restart_required
from .config_file import update_file
from .config_schema import SCHEMA, check_key, check_presets, check_shape, key_name, show_value
from .errors import ConfigError, Forbidden

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
    "previews": frozenset({"every_steps"}),
    "inbox": frozenset(
        {
            "settle_seconds",
            "rescan_seconds",
            "max_file_bytes",
            "max_jobs_per_file",
            "orphan_seconds",
        }
    ),
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
    "metrics": "it decides who may read the metrics",
    "webhooks": "it decides where job data is sent, and the secrets that sign it",
    "performance": "it decides how the model is compiled and run, and takes a restart",
    "queue": "it decides which database holds the queue and how this machine is named in it",
    "gallery": "it decides when deleted images are gone for good",
}


def remote_changes(
    saved: Mapping[str, Any], body: Any, *, merge: bool, models: Callable[[], Sequence[str]]
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
                f"unknown section {key_name(section)}; known sections: {', '.join(DEFAULTS)}",
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
                f"{section} must be a mapping of keys, got {show_value(values)}", field=section
            )
        if section == "presets":
            found = _preset_changes(saved["presets"], values, merge=merge)
        else:
            found = _section_changes(section, saved[section], values, models)
        if found:
            changes[section] = found
    return changes


def _section_changes(
    section: str,
    saved: Mapping[str, Any],
    values: Mapping[str, Any],
    models: Callable[[], Sequence[str]],
) -> dict[str, Any]:
    found = {}
    writable = REMOTE_KEYS.get(section, frozenset())
    for key, raw in values.items():
        dotted = f"{section}.{key}"
        if key not in SCHEMA[section]:
            check_key(section, key, raw)  # raises: an unknown key, naming the known ones
        try:
            value = SCHEMA[section][key](dotted, raw)
        except ConfigError:
            if key in writable:
                raise
            value = raw  # not a valid value, so certainly not the current one
        # True == 1 in Python, yet a flag sent as 1 is not the flag unchanged.
        if value == saved[key] and isinstance(value, bool) == isinstance(saved[key], bool):
            continue
        if key not in writable:
            raise Forbidden(
                f"{dotted} cannot be changed over the API "
                f"({_READ_ONLY_WHY.get(section, 'it is read-only')}); "
                "edit config.yaml on the server to change it, then restart imagineerd",
                field=dotted,
            )
        if dotted == "model.name" and value not in (available := models()):
            raise Forbidden(
                f"model.name can be changed over the API only to an available model "
                f"({', '.join(available)}), got {show_value(raw)}; to use another model, edit "
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
            checked = check_presets({name: fields})[name]
            if saved.get(name) != checked:
                found[name] = checked
        return found
    new = check_presets(values)
    found = {name: None for name in saved if name not in new}
    found.update({name: fields for name, fields in new.items() if saved.get(name) != fields})
    return found


class LiveSettings:
    """The running configuration and what config.yaml holds now (they differ by keys that
    wait for a restart), changed together under one lock."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.saved: dict[str, Any] = copy.deepcopy(config.data)
        self._lock = threading.RLock()

    def update(
        self, data: Any, *, merge: bool, models: Callable[[], Sequence[str]]
    ) -> tuple[dict[str, Any], list[str], bool]:
        """Apply a change from the API: ``merge`` (PATCH) changes the keys given, section by
        section; otherwise (PUT) ``data`` must carry every section and key. Only keys in
        ``REMOTE_KEYS`` may change (a read-only key sent back unchanged is fine),
        ``model.name`` only to one of ``models``. The whole resulting file is validated
        before anything is written; only the changed keys are written, atomically, keeping
        comments and hand edits. Live sections apply at once.

        Returns ``(saved config, keys waiting for a restart, whether anything changed)``.
        """
        with self._lock:
            changes = remote_changes(self.saved, data, merge=merge, models=models)
            if changes:
                saved = update_file(self.config.path, changes).data
                self.saved = copy.deepcopy(saved)
                # Nothing below may fail: the change is on disk and must be reported as saved.
                for section in LIVE_SECTIONS:
                    self.config.data[section] = copy.deepcopy(saved[section])
            saved = copy.deepcopy(self.saved)
            return saved, restart_required(self.config.data, saved), bool(changes)

    def pending_restart(self) -> list[str]:
        with self._lock:
            return restart_required(self.config.data, self.saved)
