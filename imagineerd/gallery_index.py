"""The gallery index: a row per PNG of the outputs folder in the job store, so that listing,
filtering and paging a gallery of any size read the store, not the disk; favourites; and the
trash.

The index is kept true three ways:

- the saver adds each image it writes, as it writes it (:meth:`GalleryIndex.add`), so it is
  listed at once;
- a listing first looks whether a folder changed since it was last read (a file copied in or
  removed by hand, another node's image) and reads only those folders (:meth:`refresh`);
- a background pass, at start and every ``gallery.rescan_seconds``, reconciles the whole
  folder with the index (:meth:`reconcile`): PNGs it lacks are added (images from before the
  index, files copied in by hand), those whose size or mtime changed are read again, rows
  whose file is gone are dropped. It reads only regular files (a link is never followed),
  a bounded number per pass, and each file on its own: one bad PNG never stops it.

Deleting an image renames it to ``outputs/.trash/<the same path>`` (nothing is deleted on
request) and marks its row trashed: listings leave it out and restoring renames it back.
The same background pass deletes for good what has been in the trash longer than
``gallery.trash_days``. The trash is a hidden folder: never listed, never served, vetoed on
the SMB share like every hidden name.

Nodes sharing the outputs folder and a PostgreSQL index each reconcile it: every write is an
idempotent upsert or delete by path. Within one process a lock orders the passes and the
requests that move files, so neither sees the other half-done.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from .errors import Conflict, NotFound, Unavailable
from .fsutil import fsync_dir
from .gallery import Gallery
from .jobs import iso
from .outputs import PNG_SIGNATURE, TEMP_PREFIX
from .safefile import is_utf8_name
from .store import OutputQuery, OutputRecord, Store

log = logging.getLogger(__name__)

#: The trash, a folder of the outputs folder (hidden: the gallery and the share skip it).
TRASH = ".trash"
#: The values a job's ``source`` takes, and so what a listing may filter on.
SOURCES = ("api", "inbox", "ui", "a1111", "openai", "cli")
#: Names one bulk request (delete, restore, zip) may carry.
MAX_FILES = 500
#: Longest image name taken from a client, in characters.
MAX_NAME = 4096
#: Folders deeper than this inside the outputs folder are not read.
MAX_DEPTH = 16
#: Files read and written in one transaction of a pass.
BATCH = 100
#: Files one background pass reads at most; when more are waiting, the next pass comes after
#: CATCH_UP_SECONDS instead of ``rescan_seconds`` (the first pass after an upgrade).
PASS_FILES = 5000
CATCH_UP_SECONDS = 1.0
#: A listing reads at most this many files of the folders that changed, and reads changed
#: folders at most once in this many seconds; the background pass reads what is left.
REFRESH_FILES = 200
REFRESH_SECONDS = 1.0
#: With ``rescan_seconds: 0`` the folder is reconciled only at start; the trash is still
#: purged this often.
PURGE_SECONDS = 3600.0
DAY = 86400.0
#: Files seen not to be readable PNGs, remembered (by size and mtime) so that each pass does
#: not open them again; forgotten past this many.
MAX_UNREADABLE = 10_000


class GalleryIndex:
    """The outputs folder's images as rows of ``store`` (see the module docstring).

    ``clock`` gives Unix seconds: when an image went to the trash, and what has been there
    long enough to purge.
    """

    def __init__(
        self,
        gallery: Gallery,
        store: Store,
        *,
        trash_days: float = 7.0,
        rescan_seconds: float = 600.0,
        spool: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.gallery = gallery
        self.store = store
        self.root = gallery.directory
        self.trash_days = float(trash_days)
        self.rescan_seconds = float(rescan_seconds)
        #: Where a zip of images is built before it is sent (a temporary file, unnamed).
        self.spool = spool
        self.clock = clock
        self._lock = threading.RLock()
        #: Folder (relative, "" for the outputs folder) -> its mtime when it was last read in
        #: full; ``None`` while files of it wait to be read.
        self._dirs: dict[str, int | None] = {}
        self._unreadable: dict[str, tuple[int, int]] = {}
        #: The last full pass found the folder empty while the index listed images.
        self._seen_empty = False
        self._next_refresh = 0.0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Reconcile at once, then every ``rescan_seconds``, on a thread of its own."""
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="imagineerd-gallery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        """Run the next background pass now."""
        self._wake.set()

    def _run(self) -> None:
        reconcile = True
        while not self._stopping.is_set():
            more = self.run_pass(reconcile=reconcile)
            if self.rescan_seconds == 0 and not more:
                reconcile = False  # only at start; later passes purge the trash
            delay = CATCH_UP_SECONDS if more else (self.rescan_seconds or PURGE_SECONDS)
            self._wake.wait(delay)
            self._wake.clear()

    def run_pass(self, *, reconcile: bool = True) -> bool:
        """One background pass: reconcile the folder with the index, then purge the trash.
        Whether files were left to read (the pass reads at most PASS_FILES). Nothing raises:
        a failure is logged and the next pass tries again."""
        more = False
        if reconcile:
            try:
                more = self.reconcile()
            except Unavailable as exc:
                log.warning("gallery: could not reconcile the outputs folder: %s", exc.message)
            except Exception:
                log.exception("gallery: reconciling the outputs folder failed")
        try:
            self.purge()
        except Unavailable as exc:
            log.warning("gallery: could not purge the trash: %s", exc.message)
        except Exception:
            log.exception("gallery: purging the trash failed")
        return more

    # -- keeping the index true ---------------------------------------------------------------
    def write(self, folder: Path, save: Callable[[], Path]) -> Path:
        """``save()`` (the saver writing an image into ``folder``), then the image's row, so
        it is listed at once. What ``save`` raises is raised; indexing never raises: an
        image the index missed is found by the next pass, and must not fail its job."""
        try:
            before = _mtime(self.root, self._relative(folder))
        except ValueError:  # not in the outputs folder: nothing to list
            before = None
        path = save()
        self.add(path, folder_mtime=before)
        return path

    def add(self, path: Path, *, folder_mtime: int | None = None) -> None:
        """Index an image this process just wrote. ``folder_mtime``: its folder's mtime from
        just before the write; if the folder was up to date then, it is now (the next listing
        does not read it again). Never raises, as :meth:`write`."""
        try:
            rel = self._relative(Path(path))
            record = self._read(rel)
            with self._lock:
                if record is not None:
                    self._put([record])
                self._touched(rel.rpartition("/")[0], folder_mtime)
        except Exception as exc:
            log.warning("gallery: could not index %s (the next pass will): %s", path, exc)

    def forget(self, filename: str) -> None:
        """Drop the row of an image this process removed (a late result of a job another
        node took over). Never raises, as :meth:`write`."""
        try:
            self.store.drop_outputs([filename])
        except Exception as exc:
            log.warning("gallery: could not drop %s from the index: %s", filename, exc)

    def _relative(self, path: Path) -> str:
        rel = path.relative_to(self.root).as_posix()
        return "" if rel == "." else rel

    def reconcile(self, budget: int = PASS_FILES) -> bool:
        """Bring the index in line with the whole outputs folder and its trash: add what is
        missing, read again what changed, drop rows whose file is gone. Reads at most
        ``budget`` files; whether more are waiting.

        An outputs folder that cannot be read (gone, a file, unreadable) changes nothing,
        and one found empty while the index lists images is believed only when the next look
        (pass or listing) finds it empty too: a share that is not mounted yet must not cost
        every favourite mark."""
        if _mtime(self.root, "") is None:
            log.warning("gallery: cannot read the outputs folder %s; the index is kept", self.root)
            return False
        more = self._sync([""], full=True, budget=budget)
        return self._sync_trash(budget) or more

    def refresh(self) -> None:
        """Read the folders that changed since they were last read, before a listing: a file
        copied in or removed by hand is listed (or gone) at once. Only a folder's own mtime is
        compared, so an image rewritten in place waits for the background pass. Never raises
        (the listing reads the index as it is)."""
        try:
            with self._lock:
                known = dict(self._dirs)
            if known:
                changed = [
                    d for d, seen in known.items() if seen is None or _mtime(self.root, d) != seen
                ]
            else:
                changed = [""]  # nothing read yet: the first pass has not come so far
            now = time.monotonic()
            if not changed or now < self._next_refresh:
                return
            self._next_refresh = now + REFRESH_SECONDS
            self._sync(changed, full=not known, budget=REFRESH_FILES)
        except Exception as exc:
            log.warning("gallery: could not look for new files in the outputs folder: %s", exc)

    def _sync(self, tops: list[str], *, full: bool, budget: int) -> bool:
        """Reconcile the folders ``tops`` (their files; with ``full`` everything below them,
        else only folders not read before) with the index."""
        with self._lock:
            # The index first, the folder second: a row another node adds in between is not
            # taken for one whose file is gone.
            known = self.store.output_stats()
            files, mtimes, vanished = self._scan(tops, full=full)

            def covered(path: str) -> bool:
                if path.startswith(TRASH + "/"):
                    return False
                if full:
                    return True
                folder = path.rpartition("/")[0]
                return folder in mtimes or any(
                    folder == v or folder.startswith(v + "/") for v in vanished
                )

            if "" in vanished:  # the outputs folder itself: not read, nothing to conclude
                return False
            gone = [p for p in known if covered(p) and p not in files]
            listed = sum(1 for p in known if not p.startswith(TRASH + "/"))
            if gone and not files and len(gone) == listed:  # every image gone at once
                if not self._seen_empty:
                    self._seen_empty = True
                    log.warning(
                        "gallery: the outputs folder %s holds no image, yet the index lists "
                        "%d; they are dropped if the next look finds it empty too (is its share "
                        "mounted?)",
                        self.root,
                        len(gone),
                    )
                    return False
            else:
                self._seen_empty = False
            if gone:
                self.store.drop_outputs(gone)
            todo = self._changed(files, known)
            pending = {p.rpartition("/")[0] for p in todo}
            waiting = {p.rpartition("/")[0] for p in todo[budget:]}
            if full:
                self._dirs = {}
            for folder in vanished:
                for d in [d for d in self._dirs if d == folder or d.startswith(folder + "/")]:
                    del self._dirs[d]
            for folder, mtime in mtimes.items():
                # The mtime from before the folder was listed, so a change since then shows;
                # a folder with files to read is not up to date until they are read.
                self._dirs[folder] = None if folder in pending else mtime
        self._read_all(todo[:budget])
        with self._lock:
            for folder in pending - waiting:
                if folder in mtimes:
                    self._dirs[folder] = mtimes[folder]
        return len(todo) > budget

    def _sync_trash(self, budget: int) -> bool:
        """The trash's part of a pass: rows of files gone from it are dropped; files there
        without a row (a crash between the rename and the store's commit, or an older
        node) get one, trashed from now."""
        with self._lock:
            known = self.store.output_stats()
            files, _, _ = self._scan([TRASH], full=True)
            gone = [p for p in known if p.startswith(TRASH + "/") and p not in files]
            if gone:
                self.store.drop_outputs(gone)
            # A file in the trash is read once: it is not listed, so its changes do not matter.
            todo = [p for p in self._changed(files, known) if p not in known]
        self._read_all(todo[:budget], trashed_at=self.clock())
        return len(todo) > budget

    def _changed(
        self, files: dict[str, tuple[int, int]], known: dict[str, tuple[int, int]]
    ) -> list[str]:
        """The files not indexed as they are now (nor seen unreadable as they are), newest
        first: the images people look for first."""
        todo = [
            p
            for p, seen in files.items()
            if known.get(p) != seen and self._unreadable.get(p) != seen
        ]
        todo.sort(key=lambda p: (p.rpartition("/")[2], p), reverse=True)
        return todo

    def _scan(
        self, tops: Iterable[str], *, full: bool
    ) -> tuple[dict[str, tuple[int, int]], dict[str, int], list[str]]:
        """``(files, folders, vanished)``: the PNGs under ``tops`` that may be listed, by
        path, with their size and mtime; each folder read, with its mtime from before it was
        listed; the tops that are no longer folders. Without ``full`` only subfolders not
        read before are entered. The gallery's rules: regular files, and links to a regular
        file inside the outputs folder (:meth:`_source`; a link out, a FIFO or a device is
        left alone), no hidden names, names in UTF-8; a folder that is a link is not
        entered."""
        files: dict[str, tuple[int, int]] = {}
        mtimes: dict[str, int] = {}
        vanished: list[str] = []
        stack = [(top, top.count("/") + 1 if top else 0) for top in tops]
        while stack:
            rel, depth = stack.pop()
            if self._stopping.is_set():
                break
            try:
                st = os.lstat(self.root / rel if rel else self.root)
                if not stat.S_ISDIR(st.st_mode):  # gone, or a link: not followed
                    raise FileNotFoundError(rel)
                with os.scandir(self.root / rel if rel else self.root) as it:
                    entries = list(it)
            except OSError:
                vanished.append(rel)
                continue
            mtimes[rel] = st.st_mtime_ns
            for entry in entries:
                name = entry.name
                if name.startswith(".") or not is_utf8_name(name):
                    continue
                child = f"{rel}/{name}" if rel else name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if depth < MAX_DEPTH and (full or child not in self._dirs):
                            stack.append((child, depth + 1))
                    elif not name.lower().endswith(".png"):
                        continue
                    elif entry.is_file(follow_symlinks=False):
                        found = entry.stat(follow_symlinks=False)
                        files[child] = (found.st_size, found.st_mtime_ns)
                    elif entry.is_symlink() and (seen := self._stat(child)) is not None:
                        files[child] = seen
                except OSError:  # gone meanwhile
                    continue
        return files, mtimes, vanished

    def _read_all(self, paths: Sequence[str], *, trashed_at: float | None = None) -> None:
        """Read ``paths`` and put their rows, a batch per transaction; one file that cannot
        be read is logged and left out, never stops the others. Files are read without the
        lock (the saver's :meth:`add` must not wait for a batch), and a row is put only if
        its file is still as it was read: one moved meanwhile (to the trash) is not listed
        again."""
        for start in range(0, len(paths), BATCH):
            if self._stopping.is_set():
                return
            records = []
            for path in paths[start : start + BATCH]:
                filename = path.removeprefix(TRASH + "/") if trashed_at is not None else path
                try:
                    record = self._read(path, filename=filename, trashed_at=trashed_at)
                except Exception as exc:  # anything a hostile file may cause
                    log.warning("gallery: skipping %s: %s", path, exc)
                    record = None
                if record is not None:
                    records.append(record)
            with self._lock:
                self._put([r for r in records if self._unchanged(r)])

    def _put(self, records: list[OutputRecord]) -> None:
        """Put rows in one transaction; if the store refuses the batch (for anything but
        being away), one by one, leaving out and logging the row it refuses."""
        if not records:
            return
        try:
            self.store.put_outputs(records)
            return
        except Unavailable:
            raise
        except Exception as exc:
            log.warning("gallery: the index refused a batch (%s); putting its rows one by one", exc)
        for record in records:
            try:
                self.store.put_outputs([record])
            except Unavailable:
                raise
            except Exception as exc:
                log.warning("gallery: skipping %s: the index refused it (%s)", record.path, exc)
                self._unreadable[record.path] = (record.size_bytes, record.mtime_ns)

    def _unchanged(self, record: OutputRecord) -> bool:
        return self._stat(record.path) == (record.size_bytes, record.mtime_ns)

    def _source(self, rel: str) -> str | None:
        """The regular file the name ``rel`` stands for, relative to the outputs folder:
        ``rel`` itself, or for a link (the gallery lists links as it serves them) the regular
        file inside the outputs folder it leads to, with no hidden part on its way (a link
        into the trash is no image). ``None`` for anything else: a link out of the folder,
        a dangling one, a FIFO, a device. Only the regular file itself is ever opened."""
        try:
            mode = os.lstat(self.root / rel).st_mode
        except OSError:
            return None
        if stat.S_ISREG(mode):
            return rel
        if not stat.S_ISLNK(mode):
            return None
        root = os.path.realpath(self.root)
        real = os.path.realpath(self.root / rel)
        if not real.startswith(root + os.sep):
            return None
        target = os.path.relpath(real, root).replace(os.sep, "/")
        if any(part.startswith(".") for part in target.split("/")):
            return None
        try:
            return target if stat.S_ISREG(os.lstat(real).st_mode) else None
        except OSError:
            return None

    def _stat(self, rel: str) -> tuple[int, int] | None:
        """``(size, mtime_ns)`` of the regular file ``rel`` stands for, or ``None``."""
        source = self._source(rel)
        if source is None:
            return None
        try:
            st = os.lstat(self.root / source)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def _read(
        self, path: str, *, filename: str | None = None, trashed_at: float | None = None
    ) -> OutputRecord | None:
        """The row of the file at ``path`` (listed as ``filename``), or ``None`` when it is
        not a regular file holding a readable PNG (remembered, so it is not read again until
        it changes)."""
        filename = filename or path
        source = self._source(path)
        found = None if source is None else Gallery.read_own_entry(self.root / source, filename)
        if found is None:
            log.info("gallery: %s is not a readable PNG file; not listed", path)
            with contextlib.suppress(OSError):
                st = os.lstat(self.root / path)
                if len(self._unreadable) >= MAX_UNREADABLE:
                    self._unreadable.clear()
                self._unreadable[path] = (st.st_size, st.st_mtime_ns)
            return None
        entry, st = found
        self._unreadable.pop(path, None)
        entry = _storable(entry)
        return OutputRecord(
            path=path,
            filename=filename,
            created=entry["created"],
            size_bytes=st.st_size,
            mtime_ns=st.st_mtime_ns,
            entry=entry,
            job_id=_whole(entry.get("job_id")),
            prompt=_text(entry.get("prompt")),
            negative_prompt=_text(entry.get("negative_prompt")),
            model=_text(entry.get("model")),
            width=_whole(entry.get("width")),
            height=_whole(entry.get("height")),
            source=_text(entry.get("source")),
            trashed_at=trashed_at,
        )

    def _touched(self, folder: str, before: int | None) -> None:
        """This process changed ``folder`` itself (and indexed the change); ``before`` is the
        folder's mtime from just before. If the folder was up to date then, its new mtime is
        noted, so the next listing does not read it again; else (something else changed it
        meanwhile) it stays to be read. Call with the lock held."""
        if before is not None and self._dirs.get(folder) == before:
            mtime = _mtime(self.root, folder)
            if mtime is not None:
                self._dirs[folder] = mtime

    # -- listing and favourites --------------------------------------------------------------
    def list(
        self, query: OutputQuery, *, limit: int, before: str | None = None
    ) -> list[dict[str, Any]]:
        """Gallery entries newest first, each with ``favourite``; ``before`` (a filename
        from a previous page) pages on."""
        self.refresh()
        records = self.store.list_outputs(query, limit=limit, before=before)
        return [entry_of(record) for record in records]

    def set_favourite(self, filename: str, favourite: bool) -> dict[str, Any]:
        """Mark an image a favourite or not; its entry. ``NotFound`` if there is no such
        image (one copied in just now is indexed first)."""
        rel = _check_name(filename)
        record = self.store.set_favourite(rel, favourite)
        if record is None:
            rel = self._live_path(filename)
            with self._lock:
                found = self._read(rel)
                if found is None:
                    raise NotFound(f"{filename[:200]!r} is not a readable PNG image")
                self.store.put_outputs([found])
            record = self.store.set_favourite(rel, favourite)
            if record is None:
                raise NotFound(f"no image named {filename[:200]!r}")
        return entry_of(record)

    # -- the trash ---------------------------------------------------------------------------
    def purge_after(self, trashed_at: float) -> str:
        """When an image trashed at ``trashed_at`` is deleted for good (local time, as job
        times are written)."""
        return iso(datetime.fromtimestamp(trashed_at + self.trash_days * DAY))

    def trash(self, filenames: Sequence[str]) -> tuple[list[str], list[str], float]:
        """Move images to the trash: ``(trashed, missing, when)``. Each is renamed into
        ``.trash/`` under its own path (with ``-1``, ``-2``... before ``.png`` if that name
        is taken there), then its row is marked; if the store cannot take the mark the file
        is renamed back and the error raised."""
        names = list(dict.fromkeys(filenames))
        now = self.clock()
        trashed: list[str] = []
        missing: list[str] = []
        paths = {}
        for name in names:
            try:
                paths[name] = self._live_path(name)
                self._regular(paths[name])  # a link is not moved (see is_link)
            except (NotFound, OSError):
                paths.pop(name, None)
                missing.append(name)
        records = self.store.find_outputs(list(paths.values()))
        for name, rel in paths.items():
            with self._lock:
                record = records.get(rel) or self._read(rel)
                if record is None:  # gone meanwhile, or not a readable PNG
                    missing.append(name)
                    continue
                folder = rel.rpartition("/")[0]
                before = _mtime(self.root, folder)
                target = self._move_into_trash(rel)
                if target is None:
                    missing.append(name)
                    continue
                try:
                    self.store.move_output(rel, replace(record, path=target, trashed_at=now))
                except BaseException:
                    self._rename(target, rel)
                    raise
                self._touched(folder, before)
            trashed.append(name)
        return trashed, [n for n in names if n in missing], now

    def restore(self, filenames: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
        """Move images back out of the trash to the names they had: ``(restored, missing,
        conflicts)``. ``missing``: not in the trash; ``conflicts``: a file has that name
        again, and is never overwritten (the image stays in the trash)."""
        names = list(dict.fromkeys(filenames))
        records = self.store.find_outputs([n for n in names if _plausible(n)], trashed=True)
        restored: list[str] = []
        missing: list[str] = []
        conflicts: list[str] = []
        for name in names:
            record = records.get(name)
            if record is None:
                missing.append(name)
                continue
            with self._lock:
                try:
                    _check_name(name)
                    self._regular(record.path)
                except (NotFound, OSError):
                    missing.append(name)
                    continue
                folder = name.rpartition("/")[0]
                before = _mtime(self.root, folder)
                try:
                    self._make_parents(name)
                    moved = self._rename(record.path, name)
                except (FileExistsError, Conflict):  # taken again, or a link in the way
                    conflicts.append(name)
                    continue
                if not moved:  # purged meanwhile
                    missing.append(name)
                    continue
                try:
                    back = self._read(name) or replace(record, path=name, filename=name)
                    self.store.move_output(record.path, replace(back, trashed_at=None))
                except BaseException:
                    self._rename(name, record.path)
                    raise
                self._touched(folder, before)
            restored.append(name)
        return restored, missing, conflicts

    def trashed(self, *, limit: int) -> list[dict[str, Any]]:
        """What is in the trash, the last trashed first: each ``{filename, trashed_at,
        purge_after}``."""
        return [
            {
                "filename": record.filename,
                "trashed_at": iso(datetime.fromtimestamp(record.trashed_at or 0.0)),
                "purge_after": self.purge_after(record.trashed_at or 0.0),
            }
            for record in self.store.trashed_outputs(limit=limit)
        ]

    def purge(self) -> int:
        """Delete for good what has been in the trash longer than ``trash_days`` (with
        ``0``: everything trashed before now), with its rows; how many files. A file that
        cannot be deleted stays, with its row, for the next pass."""
        cutoff = self.clock() - self.trash_days * DAY
        purged = 0
        kept: set[str] = set()
        while not self._stopping.is_set():
            due = [
                r
                for r in self.store.trashed_outputs(limit=BATCH + len(kept), trashed_before=cutoff)
                if r.path not in kept
            ]
            if not due:
                break
            done = []
            with self._lock:
                for record in due:
                    try:
                        self._delete_from_trash(record.path)
                    except OSError as exc:
                        log.warning("gallery: could not purge %s: %s", record.path, exc)
                        kept.add(record.path)
                        continue
                    done.append(record.path)
                if done:
                    self.store.drop_outputs(done)
            purged += len(done)
        return purged

    def _delete_from_trash(self, path: str) -> None:
        if not path.startswith(TRASH + "/"):
            raise OSError(f"{path} is not in the trash")
        full = self.root / path
        try:
            self._check_no_links(path.rpartition("/")[0])
            mode = os.lstat(full).st_mode
        except FileNotFoundError:
            return  # gone already: only its row is left
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):  # unlinking a link: the link
            raise OSError(f"{path} is not a regular file; left where it is")
        os.unlink(full)
        # Empty folders of the trash go with their last file.
        folder = full.parent
        while folder != self.root / TRASH:
            try:
                folder.rmdir()
            except OSError:
                break
            folder = folder.parent

    # -- zip -----------------------------------------------------------------------------------
    def zip(self, filenames: Sequence[str]) -> tuple[IO[bytes], int]:
        """The images as one zip (stored, not compressed: PNGs are compressed already),
        built in an unnamed temporary file under ``spool``; ``(file at its start, size)``.
        ``NotFound`` naming the first name that is not an image."""
        names = list(dict.fromkeys(filenames))
        paths = []
        for name in names:
            try:
                paths.append(self._live_path(name))
            except NotFound:
                raise NotFound(
                    f"no image named {name[:200]!r}; nothing was zipped", field="files"
                ) from None
        folder = self.spool or Path(tempfile.gettempdir())
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle = tempfile.TemporaryFile(  # noqa: SIM115 - the response closes it, once sent
                prefix=TEMP_PREFIX, suffix=".zip", dir=folder
            )
        except OSError as exc:
            raise Unavailable(f"could not make a temporary file in {folder}: {exc}") from None
        try:
            with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
                for name, rel in zip(names, paths, strict=True):
                    self._add_to_zip(archive, name, rel)
            size = handle.tell()
            handle.seek(0)
            return handle, size
        except OSError as exc:
            handle.close()
            raise Unavailable(
                f"could not build the zip in {folder} ({exc}); free space there and try again"
            ) from None
        except BaseException:
            handle.close()
            raise

    def _add_to_zip(self, archive: zipfile.ZipFile, name: str, rel: str) -> None:
        source = self._source(rel) or rel
        try:
            fd = os.open(self.root / source, _NOFOLLOW)
        except OSError:
            raise NotFound(
                f"no image named {name[:200]!r}; nothing was zipped", field="files"
            ) from None
        with os.fdopen(fd, "rb") as source:
            st = os.fstat(fd)
            os.set_blocking(fd, True)
            if not stat.S_ISREG(st.st_mode) or source.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                raise NotFound(
                    f"{name[:200]!r} is not a PNG image; nothing was zipped", field="files"
                )
            source.seek(0)
            when = time.localtime(st.st_mtime)[:6]
            info = zipfile.ZipInfo(rel, date_time=max(when, (1980, 1, 1, 0, 0, 0)))
            info.compress_type = zipfile.ZIP_STORED
            with archive.open(info, "w", force_zip64=st.st_size >= zipfile.ZIP64_LIMIT) as out:
                shutil.copyfileobj(source, out, 1 << 20)

    # -- paths ----------------------------------------------------------------------------------
    def _live_path(self, filename: str) -> str:
        """The path of the image ``filename`` names: a regular file (not a link) inside the
        outputs folder, with no link on the way and no hidden name; else ``NotFound``."""
        rel = _check_name(filename)
        try:
            self._check_no_links(rel.rpartition("/")[0])
        except OSError:
            raise NotFound(f"no image named {filename[:200]!r}") from None
        if self._source(rel) is None:
            raise NotFound(f"no image named {filename[:200]!r}")
        return rel

    def is_link(self, filename: str) -> bool:
        """Whether ``filename`` names a link in the outputs folder (listed, as it is served,
        but never moved to the trash: a relative link would lead elsewhere from there)."""
        try:
            return stat.S_ISLNK(os.lstat(self.root / _check_name(filename)).st_mode)
        except (OSError, NotFound):
            return False

    def _regular(self, rel: str) -> None:
        if not stat.S_ISREG(os.lstat(self.root / rel).st_mode):
            raise FileNotFoundError(rel)

    def _check_no_links(self, folder: str) -> None:
        """``OSError`` unless ``folder`` (relative) is a real folder of the outputs folder:
        a link on the way would move or delete files somewhere else."""
        root = os.path.realpath(self.root)
        expected = os.path.join(root, folder) if folder else root
        if os.path.realpath(self.root / folder) != os.path.normpath(expected):
            raise NotADirectoryError(f"{folder} is not a plain folder of the outputs folder")
        if not os.path.isdir(expected):
            raise FileNotFoundError(folder)

    def _make_parents(self, rel: str) -> None:
        """Make the folders of ``rel`` one by one, each a real folder: a link or a file of
        that name is never followed nor replaced (``Conflict`` naming it)."""
        folder = rel.rpartition("/")[0]
        current = self.root
        for part in folder.split("/") if folder else ():
            current = current / part
            try:
                mode = os.lstat(current).st_mode
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(current)
                mode = os.lstat(current).st_mode
            if not stat.S_ISDIR(mode):
                where = current.relative_to(self.root).as_posix()
                raise Conflict(
                    f"outputs/{where} is not a plain folder (a link or a file is in the way); "
                    "move it aside on the server, then try again"
                )

    def _move_into_trash(self, rel: str) -> str | None:
        """Rename ``rel`` into the trash; the trash path it took, or ``None`` if it was gone."""
        base = f"{TRASH}/{rel}"
        self._make_parents(base)
        stem, dot, suffix = base.rpartition(".")
        for n in range(10_000):
            target = base if n == 0 else f"{stem}-{n}{dot}{suffix}"
            try:
                if self._rename(rel, target):
                    return target
                return None
            except FileExistsError:
                continue
        raise Conflict(f"the trash holds 10000 images named {rel[:200]!r}; empty it first")

    def _rename(self, source: str, target: str) -> bool:
        """Rename, never over an existing file (``FileExistsError``); ``False`` when the
        source is gone. Both folders are fsynced: the move survives a power cut."""
        src, dst = self.root / source, self.root / target
        try:
            _rename_noreplace(src, dst)
        except FileNotFoundError:
            if not os.path.lexists(src):
                return False
            raise
        fsync_dir(src.parent)
        if dst.parent != src.parent:
            fsync_dir(dst.parent)
        return True


def entry_of(record: OutputRecord) -> dict[str, Any]:
    """A row as the API shows it: its gallery entry, and whether it is a favourite."""
    return {**record.entry, "favourite": record.favourite}


def _mtime(root: Path, folder: str) -> int | None:
    try:
        st = os.lstat(root / folder if folder else root)
    except OSError:
        return None
    return st.st_mtime_ns if stat.S_ISDIR(st.st_mode) else None


def _plausible(name: Any) -> bool:
    """Whether ``name`` may be looked up at all (the store takes no NUL, nor endless text)."""
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME and "\x00" not in name


def _check_name(filename: str) -> str:
    """``filename`` as a path inside the outputs folder, by the rules of ``Gallery.resolve``
    (no ``..``, no hidden part, a ``.png`` name), or ``NotFound``."""
    if not _plausible(filename) or not is_utf8_name(filename):
        raise NotFound(f"no image named {str(filename)[:200]!r}")
    parts = filename.replace("\\", "/").split("/")
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts) or not parts[
        -1
    ].lower().endswith(".png"):
        raise NotFound(f"no image named {filename[:200]!r}")
    return "/".join(parts)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _storable(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry with any text that cannot be UTF-8 (a lone surrogate from a JSON escape in
    a PNG's chunk) replaced, so the store and every answer can carry it."""
    text = json.dumps(entry, ensure_ascii=False)
    return json.loads(_SURROGATE.sub("\ufffd", text))


def _text(value: Any) -> str | None:
    # PostgreSQL's text holds no NUL (a PNG's JSON chunk may carry an escaped one).
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else None


def _whole(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 2**63:
        return None
    return value


_NOFOLLOW = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
)
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
except (AttributeError, OSError):  # not Linux, or a C library without it
    _renameat2 = None


def _rename_noreplace(source: Path, target: Path) -> None:
    """``rename`` that fails with ``FileExistsError`` instead of replacing ``target``:
    atomic with Linux's ``renameat2(RENAME_NOREPLACE)``; elsewhere (or on a file system
    without it) a look first, which only another machine renaming at the same instant
    could defeat."""
    if _renameat2 is not None:
        src, dst = os.fsencode(source), os.fsencode(target)
        if _renameat2(_AT_FDCWD, src, _AT_FDCWD, dst, _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(source), None, str(target))
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)
