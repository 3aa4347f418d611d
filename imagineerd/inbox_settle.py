"""When is a file in the inbox complete? When its size and mtime have not changed for
``inbox.settle_seconds``: network copies arrive in pieces, and a close event says nothing
about whether the client writes again (some close and reopen a file while copying it).

Prompt files wait in a :class:`Settler` until they are taken; images wait in an
:class:`ImageWatch` until a prompt file names them, and are reported once if none does."""

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
    #: Not ready before this (``time.monotonic()``): a prompt file waiting for its images.
    not_before: float = 0.0


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

    def hold(self, path: Path, seconds: float) -> None:
        """Look at ``path`` again in ``seconds`` (sooner if it changes): its images are not
        all there yet."""
        try:
            stat = regular_lstat(path)
        except OSError:
            return
        now = time.monotonic()
        with self._lock:
            self._pending[path] = _Candidate(stat.st_size, stat.st_mtime_ns, now, now + seconds)

    def ready(self, settle_seconds: float) -> tuple[list[Path], list[Path]]:
        """``(ready, changed)``: files unchanged for ``settle_seconds``, re-checked against
        the disk now, and files that changed or went away meanwhile (to be noticed again).
        Only files whose quiet period is over are looked at on the disk (a burst of a
        thousand files is not stat'ed ten times a second): a change found then starts the
        quiet period again, so a file is never taken sooner than before, at most later."""
        now = time.monotonic()
        ready, changed = [], []
        with self._lock:
            items = [
                (path, cand)
                for path, cand in self._pending.items()
                if now - cand.since >= settle_seconds and now >= cand.not_before
            ]
        for path, cand in items:
            try:
                stat = regular_lstat(path)
            except OSError:
                changed.append(path)  # gone or no longer a regular file
                continue
            if (stat.st_size, stat.st_mtime_ns) != (cand.size, cand.mtime_ns):
                changed.append(path)  # still being written: the quiet period starts again
            else:
                ready.append(path)
        return ready, changed


class ImageWatch:
    """Images in the inbox (``init_image:``/``mask:`` of prompt files), each with the size
    and mtime it had and since when. An image is taken only with a prompt file that names
    it; one that no prompt file has taken after ``inbox.orphan_seconds`` is reported once and
    left where it is. Thread-safe like :class:`Settler`."""

    def __init__(self) -> None:
        self._seen: dict[Path, _Candidate] = {}
        self._reported: set[Path] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, path: Path, stat: os.stat_result | None) -> None:
        """Record ``path`` as it is now (``None``: gone, or not a regular file)."""
        with self._lock:
            if stat is None:
                self._seen.pop(path, None)
                self._reported.discard(path)
                return
            cand = self._seen.get(path)
            if cand is None or (cand.size, cand.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                self._seen[path] = _Candidate(stat.st_size, stat.st_mtime_ns, time.monotonic())
                self._reported.discard(path)  # a new image: its own wait, its own report

    def forget(self, path: Path) -> None:
        self.seen(path, None)

    def settled(self, path: Path, settle_seconds: float) -> bool:
        """Whether ``path`` is a regular file unchanged for ``settle_seconds`` (an image
        not seen before starts its wait now)."""
        try:
            stat = regular_lstat(path)
        except OSError:
            self.forget(path)
            return False
        self.seen(path, stat)
        with self._lock:
            cand = self._seen.get(path)
            return cand is not None and time.monotonic() - cand.since >= settle_seconds

    def orphans(self, orphan_seconds: float, named: set[Path]) -> list[Path]:
        """Images unchanged for ``orphan_seconds`` that no waiting prompt file names
        (``named``), each returned once (until it changes or goes away)."""
        now = time.monotonic()
        with self._lock:
            due = [
                path
                for path, cand in self._seen.items()
                if now - cand.since >= orphan_seconds
                and path not in self._reported
                and path not in named
            ]
        orphans = []
        for path in due:
            try:
                stat = regular_lstat(path)
            except OSError:
                self.forget(path)
                continue
            with self._lock:
                cand = self._seen.get(path)
                if cand is None or (cand.size, cand.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                    self._seen[path] = _Candidate(stat.st_size, stat.st_mtime_ns, now)
                    continue
                self._reported.add(path)
            orphans.append(path)
        return orphans
