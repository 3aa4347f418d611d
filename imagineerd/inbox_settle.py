"""When is a file in the inbox complete? When its size and mtime have not changed for
``inbox.settle_seconds``: network copies arrive in pieces, and a close event says nothing
about whether the client writes again (some close and reopen a file while copying it)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .safefile import regular_lstat


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    since: float


class Settler:
    """Files seen in the inbox, each with the size and mtime it had and since when.
    Thread-safe: watchdog's thread notices, the inbox's thread takes."""

    def __init__(self) -> None:
        self._pending: dict[Path, _Candidate] = {}
        # Files whose claim could not be renamed: not retried until size or mtime change.
        self._refused: dict[Path, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pending)

    def seen(self, path: Path, stat: os.stat_result | None) -> bool:
        """Record ``path`` as it is now (``None``: gone, or not a regular file). True when it
        is new or changed, so its quiet period starts again."""
        with self._lock:
            if stat is None:
                self._pending.pop(path, None)
                self._refused.pop(path, None)
                return False
            if self._refused.get(path) == (stat.st_size, stat.st_mtime_ns):
                return False
            self._refused.pop(path, None)
            cand = self._pending.get(path)
            if cand is not None and (cand.size, cand.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
                return False
            self._pending[path] = _Candidate(stat.st_size, stat.st_mtime_ns, time.monotonic())
            return True

    def refuse(self, path: Path) -> None:
        """Its claim failed: leave it alone until it changes."""
        with self._lock:
            self._pending.pop(path, None)
            try:
                stat = os.lstat(path)
            except OSError:
                return
            self._refused[path] = (stat.st_size, stat.st_mtime_ns)

    def take(self, path: Path) -> None:
        with self._lock:
            self._pending.pop(path, None)

    def ready(self, settle_seconds: float) -> tuple[list[Path], list[Path]]:
        """``(ready, changed)``: files unchanged for ``settle_seconds``, re-checked against
        the disk now, and files that changed or went away meanwhile (to be noticed again)."""
        now = time.monotonic()
        ready, changed = [], []
        with self._lock:
            items = list(self._pending.items())
        for path, cand in items:
            try:
                stat = regular_lstat(path)
            except OSError:
                changed.append(path)  # gone or no longer a regular file
                continue
            if (stat.st_size, stat.st_mtime_ns) != (cand.size, cand.mtime_ns):
                changed.append(path)  # still being written: the quiet period starts again
            elif now - cand.since >= settle_seconds:
                ready.append(path)
        return ready, changed
