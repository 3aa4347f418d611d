"""Reading files that strangers drop into our folders, and naming the copies we keep.

A name in a shared folder says nothing about what it is. ``shadow.txt`` may be a symbolic
link to ``/etc/shadow`` (following it would queue the secret's lines as prompts and copy them
into receipts), ``pipe.txt`` a FIFO (opening it blocks until someone writes, forever), or a
device. So: ``lstat`` before taking anything, and read only through a descriptor opened with
``O_NOFOLLOW | O_NONBLOCK`` whose ``fstat`` says it is a regular file, never more than the
limit. A path is only checked once it has been claimed by rename (renaming a link moves the
link, not its target), so nobody can swap the file between the check and the read.

Names can be 255 bytes, and a name that is not UTF-8 grows three bytes per bad byte once its
bytes are shown as U+FFFD: every name we make from one is cut to fit, on a character
boundary.
"""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path
from typing import BinaryIO

#: Longest file name most file systems allow (ext4, XFS, btrfs, NTFS via Samba), in bytes.
NAME_MAX = 255

_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
)


class UnsafeFileError(OSError):
    """The path is not a regular file we may read, or it is larger than allowed."""


class NotRegularFileError(UnsafeFileError):
    def __init__(self, path: Path | str, kind: str) -> None:
        super().__init__(f"{os.fspath(path)!r} is {kind}, not a regular file")
        self.kind = kind


class FileTooLargeError(UnsafeFileError):
    def __init__(self, path: Path | str, size: int, limit: int) -> None:
        super().__init__(f"{os.fspath(path)!r} is {size:,} bytes; the limit is {limit:,}")
        self.size = size
        self.limit = limit


def kind_of(mode: int) -> str:
    """What a file type is called in a message: ``"a symbolic link"``, ``"a FIFO"``..."""
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "a special file"


def is_utf8_name(name: str) -> bool:
    """Whether a name read from the disk is valid UTF-8. One that is not (an old client's
    Latin-1 over SMB) arrives with surrogate escapes and cannot travel in a URL, a JSON
    answer or the database."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def regular_lstat(path: Path | str) -> os.stat_result:
    """``lstat`` of ``path``; ``NotRegularFileError`` unless it is a regular file itself."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(path, kind_of(st.st_mode))
    return st


def read_regular_file(path: Path | str, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file (not a link to one) of at most
    ``limit`` bytes; reads at most ``limit + 1`` bytes and never blocks on a FIFO or device.

    Raises ``NotRegularFileError``, ``FileTooLargeError`` or another ``OSError``.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError:
        # O_NOFOLLOW refuses a link (ELOOP on Linux), a socket cannot be opened (ENXIO):
        # name what it is rather than the errno.
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(path, kind_of(mode)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(path, kind_of(st.st_mode))
        if st.st_size > limit:
            raise FileTooLargeError(path, st.st_size, limit)
        # O_NONBLOCK means nothing for regular files; clear it anyway so a network file
        # system that honours it cannot hand back a short read.
        os.set_blocking(fd, True)
        chunks = []
        left = limit + 1  # one more than allowed shows a file that grew past the limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise FileTooLargeError(path, len(data), limit)
        return data
    finally:
        os.close(fd)


def open_regular(path: Path | str) -> BinaryIO:
    """``path`` opened for reading if it is a regular file (a link to one is followed: the
    caller checks where links may lead); never blocks on a FIFO or device."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(path, kind_of(st.st_mode))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_own(path: Path | str) -> tuple[BinaryIO, os.stat_result]:
    """``path`` opened for reading, with the stat of what was opened, only if ``path``
    itself is a regular file: a link is refused (even one swapped in after the caller
    looked) and a FIFO or device never blocks. Raises ``NotRegularFileError`` or another
    ``OSError``."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(path, kind_of(st.st_mode))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


def ensure_directory(path: Path) -> Path | None:
    """Make ``path`` a real folder, not a file or a link to one (a link named ``done`` in a
    share would send what we write there to its target). Anything else of that name is
    renamed aside first, the link itself and never its target; returns where it went."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        path.mkdir(parents=True, exist_ok=True)
        return None
    if stat.S_ISDIR(mode):
        return None
    aside = path.with_name(f"{path.name}.not-a-folder-{uuid.uuid4().hex[:8]}")
    os.rename(path, aside)
    path.mkdir()
    return aside


def cut_name(name: str, max_bytes: int) -> str:
    """``name`` cut to at most ``max_bytes`` in the file system's encoding, keeping its
    extension where that fits and never splitting a UTF-8 character."""
    raw = os.fsencode(name)
    if len(raw) <= max_bytes:
        return name
    stem, ext = os.path.splitext(raw)
    if len(ext) > min(32, max_bytes // 2):
        stem, ext = raw, b""
    return os.fsdecode(_cut_bytes(stem, max_bytes - len(ext)) + ext)


def _cut_bytes(raw: bytes, size: int) -> bytes:
    cut = max(size, 0)
    # Step back over at most three UTF-8 continuation bytes to a character's first byte.
    for _ in range(3):
        if 0 < cut < len(raw) and raw[cut] & 0xC0 == 0x80:
            cut -= 1
    return raw[:cut]
