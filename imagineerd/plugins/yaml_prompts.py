"""Built-in parser for ``.yaml``/``.yml`` prompt files.

A file is one of:

- a mapping: one job (``prompt: a cat``, ``steps: 20``, ...);
- a list: one job per item, each a mapping or a plain prompt string;
- ``{defaults: {...}, jobs: [...]}``: the defaults apply to every job that does not set them.

Anchors and aliases (``&x``/``*x``) are refused: prompt files never need them, and alias
expansion is how a tiny file becomes a memory bomb.

Two more limits are checked on the parser's event stream, before any Python object is built,
because building them is where a small hostile file does its harm: nesting deeper than
``MAX_DEPTH`` (PyYAML composes and constructs recursively, so 10 KB of ``[`` raises
``RecursionError``, and its time grows with the square of the depth), and numbers longer than
``MAX_NUMBER_DIGITS`` (Python refuses to build an int of more than 4,300 digits with a
``ValueError``). The event parser itself keeps an explicit stack and stops at the first level
too deep, so even 1 MB of brackets is refused in a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .. import hookimpl
from ..errors import ValidationError
from .prompt_items import PromptItem

SUFFIXES = (".yaml", ".yml")
#: A prompt file needs 3-4 levels (defaults/jobs, the list, a job, a list value).
MAX_DEPTH = 20
#: Seeds have at most 20 digits; the limits of every other number are far smaller.
MAX_NUMBER_DIGITS = 30
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_RESOLVER = yaml.resolver.Resolver()


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


def check_events(text: str) -> None:
    """Refuse aliases, deep nesting and overlong numbers, walking the parser's events
    (which needs no recursion) before anything is composed or constructed."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            raise ValidationError(
                f"line {line}: YAML aliases (*name) are not allowed in prompt files; "
                "write the values out in full"
            )
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ValidationError(
                    f"line {line}: lists and mappings are nested more than {MAX_DEPTH} "
                    "levels deep; a prompt file needs 4 at most"
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        elif isinstance(event, yaml.ScalarEvent) and len(event.value) > MAX_NUMBER_DIGITS:
            tag = event.tag
            if tag in (None, "!"):
                tag = _RESOLVER.resolve(yaml.ScalarNode, event.value, event.implicit)
            digits = sum(ch.isalnum() for ch in event.value)
            if tag in _NUMBER_TAGS and digits > MAX_NUMBER_DIGITS:
                raise ValidationError(
                    f"line {line}: a number with {digits:,} digits; numbers in prompt files "
                    f"may have at most {MAX_NUMBER_DIGITS} digits"
                )


@hookimpl
def imagineerd_prompt_file_suffixes() -> list[str]:
    return list(SUFFIXES)


@hookimpl(trylast=True)
def imagineerd_parse_prompt_file(path: Path, text: str) -> list[dict[str, Any]] | None:
    if path.suffix.lower() not in SUFFIXES:
        return None
    try:
        check_events(text)
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
