"""Durable file writes: a temporary file, fsync, rename, then fsync of the folder."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def atomic_write_text(path: Path, text: str, *, follow_symlinks: bool = False) -> None:
    """:func:`atomic_write_bytes` of ``text`` as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), follow_symlinks=follow_symlinks)


def atomic_write_bytes(path: Path, data: bytes, *, follow_symlinks: bool = False) -> None:
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
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
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
