"""Built-in parser for ``.txt`` prompt files: one job per non-empty line, ``#`` comments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import hookimpl
from .prompt_items import PromptItem


@hookimpl
def imagineerd_prompt_file_suffixes() -> list[str]:
    return [".txt"]


@hookimpl(trylast=True)
def imagineerd_parse_prompt_file(path: Path, text: str) -> list[dict[str, Any]] | None:
    if path.suffix.lower() != ".txt":
        return None
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        prompt = line.strip()
        if prompt and not prompt.startswith("#"):
            items.append(PromptItem({"prompt": prompt}, f"line {number}"))
    return items
