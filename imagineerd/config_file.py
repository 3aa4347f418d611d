"""Writing ``config.yaml``: only what changed, comments kept, atomically."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .config import DEFAULTS, Config
from .config_schema import key_name
from .errors import ConfigError, Conflict
from .fsutil import atomic_write_text


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
                    f"{section}.{key_name(key)}: this value would not read back the same from "
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
