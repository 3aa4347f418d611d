"""Built-in parser for ``.yaml``/``.yml`` prompt files.

A file is one of:

- a mapping: one job (``prompt: a cat``, ``steps: 20``, ...);
- a list: one job per item, each a mapping or a plain prompt string;
- ``{defaults: {...}, jobs: [...]}``: the defaults apply to every job that does not set them.

Anchors and aliases (``&x``/``*x``) are refused: prompt files never need them, and alias
expansion is how a tiny file becomes a memory bomb.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .. import hookimpl
from ..errors import ValidationError
from .prompt_items import PromptItem

SUFFIXES = (".yaml", ".yml")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _item_lines(root: yaml.Node | None) -> list[int]:
    """1-based line of each job item, from the node tree (``safe_load`` drops positions)."""
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            if isinstance(key, yaml.ScalarNode) and key.value == "jobs":
                root = value
                break
        else:
            return [root.start_mark.line + 1]
    if isinstance(root, yaml.SequenceNode):
        return [item.start_mark.line + 1 for item in root.value]
    return [root.start_mark.line + 1] if root is not None else []


@hookimpl
def imagineerd_prompt_file_suffixes() -> list[str]:
    return list(SUFFIXES)


@hookimpl(trylast=True)
def imagineerd_parse_prompt_file(path: Path, text: str) -> list[dict[str, Any]] | None:
    if path.suffix.lower() not in SUFFIXES:
        return None
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                line = event.start_mark.line + 1
                raise ValidationError(
                    f"line {line}: YAML aliases (*name) are not allowed in prompt files; "
                    "write the values out in full"
                )
        lines = _item_lines(yaml.compose(text, Loader=yaml.SafeLoader))
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise ValidationError(
            f"this is not valid YAML: at {where}, {exc.problem or exc.context}. "
            "Check the indentation (spaces, not tabs) and that text with a colon is quoted"
        ) from None
    except yaml.YAMLError as exc:
        raise ValidationError(f"this is not valid YAML: {exc}") from None

    if data is None:
        raise ValidationError("the file is empty; write at least one prompt")
    defaults: dict[str, Any] = {}
    if isinstance(data, dict) and "jobs" in data:
        extra = [k for k in data if k not in ("jobs", "defaults")]
        if extra:
            raise ValidationError(
                f"unknown top-level key {extra[0]!r}; next to jobs: only defaults: is allowed"
            )
        defaults = data.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise ValidationError(
                f"defaults: must be a mapping of job fields, not {_kind(defaults)}"
            )
        if "prompt" in defaults:
            raise ValidationError("defaults: cannot set the prompt; give each job its own")
        data = data["jobs"]
        if not isinstance(data, list):
            raise ValidationError(f"jobs: must be a list of jobs, not {_kind(data)}")
    if isinstance(data, dict | str):
        data = [data]
    if not isinstance(data, list):
        raise ValidationError(
            f"a prompt file must hold a prompt, a job or a list of jobs, not {_kind(data)}"
        )
    items = []
    for index, item in enumerate(data):
        where = f"job {index + 1}" + (f" (line {lines[index]})" if index < len(lines) else "")
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict):
            raise ValidationError(
                f"{where} is {_kind(item)}; write a prompt text or a mapping with prompt:"
            )
        items.append(PromptItem({**defaults, **item}, where))
    return items
