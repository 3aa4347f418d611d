"""Shared by the built-in prompt-file parsers: a job request that knows where it came from."""

from __future__ import annotations

from typing import Any


class PromptItem(dict):
    """A raw job request (a dict) with ``where``: its place in the file, e.g. ``"line 7"``,
    used in error notes. Parsers of third-party plugins may return plain dicts."""

    def __init__(self, fields: dict[str, Any], where: str | None = None) -> None:
        super().__init__(fields)
        self.where = where
