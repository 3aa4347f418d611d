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

A row is dropped only on proof that its file is gone: missing from a folder read in full,
or below a folder found missing. A folder that cannot be read, a walk cut short, an outputs
folder on another file system than at the last pass, or one suddenly holding none of the
images (until a pass an hour later finds it so again) drops nothing: a share that is away
must not cost the favourite marks.

Deleting an image renames it to ``outputs/.trash/<the same path>`` (nothing is deleted on
request) and marks its row trashed: listings leave it out and restoring renames it back.
The same background pass deletes for good what has been in the trash longer than
``gallery.trash_days``. The trash is a hidden folder: never listed, never served, vetoed on
the SMB share like every hidden name.

Nodes of one PostgreSQL queue share this index, with one outputs folder or each with its
own. Each row names the node that indexed it, and a node drops only its own rows: it cannot
tell whether a file it does not see is gone or in another node's folder. In a shared folder
a node that sees a file indexed by a node gone quiet (or renamed) takes the row over, so no
row is left that nobody would drop. Every write is an idempotent upsert or delete by path.
Within one process a lock orders the writes of the passes and the requests that move files,
so neither sees the other half-done; the folders are walked without it.
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
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from .errors import Conflict, ImagineerdError, NotFound, Unavailable
from .fsutil import fsync_dir
from .gallery import Gallery, image_path
from .jobs import iso
from .outputs import PNG_SIGNATURE, TEMP_PREFIX
from .safefile import NAME_MAX, cut_name, is_utf8_name, open_own
from .store import OutputQuery, OutputRecord, OutputStat, Store

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
#: An outputs folder (or trash) found holding none of this node's images is believed only
#: when a background pass this much later finds it so again: a share away that long.
EMPTY_CONFIRM_SECONDS = 3600
#: A row indexed by a node that has not beaten for this long (or by a node the queue does
#: not know: one renamed) is taken over by a node that sees its file.
ADOPT_SECONDS = DAY
#: The most a zip of images may hold (the PNGs' bytes), and how many zips are built at once.
MAX_ZIP_BYTES = 2 * 1024**3
MAX_ZIPS = 2
#: Files seen not to be readable PNGs, remembered (by size and mtime) so that each pass does
#: not open them again; forgotten past this many.
MAX_UNREADABLE = 10_000


class ZipTooLarge(ImagineerdError):
    """The images asked for come to more than a zip may hold (MAX_ZIP_BYTES)."""

    status = 413
    code = "too_large"


@dataclass
class _Walk:
    """What one walk of folders found: ``files`` (path -> size, mtime_ns), ``listed``
    (each folder read in full -> its mtime from before it was read), ``folders`` (the real
    folders seen in those listings, entered or not), ``gone`` (folders found missing, or no
    folder any more), ``unsure`` (entries whose type or size could not be read) and whether
    it ran to its end (``complete``: not stopped half-way)."""

    files: dict[str, tuple[int, int]] = field(default_factory=dict)
    listed: dict[str, int] = field(default_factory=dict)
    folders: set[str] = field(default_factory=set)
    gone: set[str] = field(default_factory=set)
    unsure: set[str] = field(default_factory=set)
    complete: bool = True

    def shows_gone(self, path: str) -> bool:
        """Whether this walk shows the file ``path`` gone, if it did not find it: its folder
        was read in full, or a folder on its way was found missing (or, in the listing of the
        folder above it, not a folder). A folder not read (unreadable, too deep, not entered)
        says nothing about what is below it."""
        if path in self.unsure:
            return False
        folder, below = path.rpartition("/")[0], None
        while True:
            if folder in self.gone:
                return True
            if folder in self.listed:
                return below is None or (below not in self.folders and below not in self.unsure)
            if not folder:
                return False
            folder, below = folder.rpartition("/")[0], folder


class GalleryIndex:
    """The outputs folder's images as rows of ``store`` (see the module docstring).

    ``node`` names this node on the rows it indexes: it drops only those. ``clock`` gives
    Unix seconds: when an image went to the trash, what has been there long enough to
    purge, and how long the outputs folder has been found empty.
    """

    def __init__(
        self,
        gallery: Gallery,
        store: Store,
        *,
        trash_days: float = 7.0,
        rescan_seconds: float = 600.0,
        spool: Path | None = None,
        node: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.gallery = gallery
        self.store = store
        self.node = node
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
        #: ``""`` (the outputs folder) or TRASH -> when a background pass first found it
        #: holding none of this node's images (see :meth:`_hold_if_all_gone`).
        self._empty_since: dict[str, float] = {}
        #: The outputs folder's st_dev at the last background pass, and whether it was the
        #: same at the pass before (see :meth:`_note_device`).
        self._root_dev: int | None = None
        self._root_settled = True
        self._refresh_lock = threading.Lock()
        self._next_refresh = 0.0
        self._zips = threading.BoundedSemaphore(MAX_ZIPS)
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
            if not self._listable(rel):
                log.info(
                    "gallery: %s is not listed (a hidden name, too deep, or a link on its way)",
                    path,
                )
                return
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

    def _listable(self, rel: str) -> bool:
        """Whether a pass would list the file ``rel``: a name the gallery takes, no deeper
        than MAX_DEPTH, with no link on its way (an image reached through a linked folder is
        not served, so it is not listed either)."""
        try:
            _check_name(rel)
            self._check_no_links(rel.rpartition("/")[0])
        except (NotFound, OSError):
            return False
        return rel.count("/") <= MAX_DEPTH

    def reconcile(self, budget: int = PASS_FILES) -> bool:
        """Bring the index in line with the whole outputs folder and its trash: add what is
        missing, read again what changed, drop this node's rows whose file is gone. Reads at
        most ``budget`` files; whether more are waiting.

        Only a file missing from a folder read in full, or below a folder found missing
        (or no folder any more), is gone: a folder that cannot be read (no permission, an
        I/O error, a share that stopped answering) or was not reached (a stop, too deep)
        says nothing, and its rows stay. An outputs folder that cannot be read changes
        nothing; a pass in which it is on another file system than at the last pass (a
        share mounted or unmounted) drops nothing; and one found holding none of the images
        this node indexed is believed only when a background pass at least
        ``EMPTY_CONFIRM_SECONDS`` later finds it so again: a share that is not mounted must
        not cost every favourite mark."""
        dev = _device(self.root)
        if dev is None:
            log.warning("gallery: cannot read the outputs folder %s; the index is kept", self.root)
            return False
        steady = self._note_device(dev, record=True)
        more = self._sync([""], full=True, budget=budget, dev=dev, steady=steady, background=True)
        return self._sync_trash(budget, dev=dev, steady=steady) or more

    def refresh(self) -> None:
        """Read the folders that changed since they were last read, before a listing: a file
        copied in or removed by hand is listed (or gone) at once. Only a folder's own mtime is
        compared, so an image rewritten in place waits for the background pass, and at most
        once in REFRESH_SECONDS. A listing never confirms that every image vanished (only a
        background pass does), nor takes a new file system for the outputs folder. Never
        raises (the listing reads the index as it is)."""
        try:
            with self._refresh_lock:
                now = time.monotonic()
                if now < self._next_refresh:
                    return  # before any folder is looked at: a busy page costs no disk
                self._next_refresh = now + REFRESH_SECONDS
            with self._lock:
                known = dict(self._dirs)
            if known:
                changed = [
                    d for d, seen in known.items() if seen is None or _mtime(self.root, d) != seen
                ]
            else:
                changed = [""]  # nothing read yet: the first pass has not come so far
            if not changed:
                return
            dev = _device(self.root)
            if dev is None:
                return
            steady = self._note_device(dev, record=False)
            self._sync(changed, full=not known, budget=REFRESH_FILES, dev=dev, steady=steady)
        except Exception as exc:
            log.warning("gallery: could not look for new files in the outputs folder: %s", exc)

    def _note_device(self, dev: int, *, record: bool) -> bool:
        """Whether the outputs folder is on the file system it was on at the last background
        pass (or this is the first look), and was at the pass before that too: a new file
        system is believed from the background pass after the one that first saw it, never
        by a listing. A background pass (``record``) remembers it."""
        with self._lock:
            before, settled = self._root_dev, self._root_settled
            if record:
                self._root_dev = dev
                self._root_settled = before is None or before == dev
        if before is None or before == dev:
            return settled or record
        if record:
            log.warning(
                "gallery: the outputs folder %s is on another file system than at the last pass "
                "(a share mounted or unmounted?); this pass drops nothing from the index",
                self.root,
            )
        return False

    def _sync(
        self,
        tops: list[str],
        *,
        full: bool,
        budget: int,
        dev: int,
        steady: bool,
        background: bool = False,
    ) -> bool:
        """Reconcile the folders ``tops`` (their files; with ``full`` everything below them,
        else only folders not read before) with the index. The folders are walked without
        the lock (a listing or a delete does not wait for a slow share), which is taken only
        to compare and write. ``steady``: the outputs folder is on the file system ``dev``
        it was on before; if not (or it moves during the walk) nothing is dropped."""
        # The index first, the folder second: a row added in between (the saver's, another
        # node's) is not taken for one whose file is gone.
        known = self.store.output_stats()
        walk = self._walk(tops, full=full)
        if not walk.complete:  # stopped half-way: what was not reached says nothing
            return False
        if "" in tops and "" not in walk.listed:  # the outputs folder itself: not read
            return False
        steady = steady and _device(self.root) == dev
        alive = self._alive_nodes() if background else None
        with self._lock:
            if steady:
                gone = self._hold_if_all_gone(
                    "", self._gone(known, walk, trash=False), known, walk, background
                )
                if gone:
                    self.store.drop_outputs(gone)
            todo = self._changed(walk.files, known, alive)
            pending = {p.rpartition("/")[0] for p in todo}
            waiting = {p.rpartition("/")[0] for p in todo[budget:]}
            if full:
                self._dirs = {}
            for folder in walk.gone:
                for d in [d for d in self._dirs if d == folder or d.startswith(folder + "/")]:
                    del self._dirs[d]
            for folder, mtime in walk.listed.items():
                # The mtime from before the folder was listed, so a change since then shows;
                # a folder with files to read is not up to date until they are read.
                self._dirs[folder] = None if folder in pending else mtime
        self._read_all(todo[:budget])
        with self._lock:
            for folder in pending - waiting:
                if folder in walk.listed:
                    self._dirs[folder] = walk.listed[folder]
        return len(todo) > budget

    def _sync_trash(self, budget: int, *, dev: int, steady: bool) -> bool:
        """The trash's part of a pass: this node's rows of files gone from it are dropped;
        files there without a row (a crash between the rename and the store's commit, or an
        older node) get one, trashed from now. A trash that is missing, no folder any more
        (a link) or cannot be read says nothing: its rows, and when they went to the trash,
        stay (the purge drops the rows of files gone when they are due)."""
        known = self.store.output_stats()
        walk = self._walk([TRASH], full=True)
        if not walk.complete or TRASH not in walk.listed:
            return False
        steady = steady and _device(self.root) == dev
        alive = self._alive_nodes()
        with self._lock:
            if steady:
                gone = self._hold_if_all_gone(
                    TRASH, self._gone(known, walk, trash=True), known, walk, True
                )
                if gone:
                    self.store.drop_outputs(gone)
            # A file in the trash is read once: it is not listed, so its changes do not
            # matter; another node's row is read again to take it over, as in the folder.
            todo = [
                p
                for p in self._changed(walk.files, known, alive)
                if p not in known or known[p].node != self.node
            ]
        self._read_all(todo[:budget], trashed_at=self.clock())
        return len(todo) > budget

    def _gone(self, known: dict[str, OutputStat], walk: _Walk, *, trash: bool) -> list[str]:
        """This node's rows (of the trash, or of the folder) whose file the walk shows gone
        and that is not back now either: the walk ran without the lock, so a restore may
        have put a file back since. A folder whose mtime is still the one from before it was
        listed has had nothing put in it; in any other each file is looked for again. Call
        with the lock held."""
        unchanged: dict[str, bool] = {}

        def still_gone(path: str) -> bool:
            folder = path.rpartition("/")[0]
            if folder not in unchanged:
                listed = walk.listed.get(folder)
                unchanged[folder] = listed is not None and _mtime(self.root, folder) == listed
            return unchanged[folder] or not os.path.lexists(self.root / path)

        return [
            path
            for path, row in known.items()
            if path.startswith(TRASH + "/") == trash
            and row.node == self.node
            and path not in walk.files
            and walk.shows_gone(path)
            and still_gone(path)
        ]

    def _hold_if_all_gone(
        self,
        part: str,
        gone: list[str],
        known: dict[str, OutputStat],
        walk: _Walk,
        background: bool,
    ) -> list[str]:
        """``gone``, unless it is every row this node has in ``part`` (the outputs folder
        ``""``, or the trash) while the walk found no file there at all: then nothing, until
        a background pass at least EMPTY_CONFIRM_SECONDS after the first that saw it sees it
        again (a listing never does). Call with the lock held."""
        trash = part == TRASH
        own = sum(
            1
            for p, r in known.items()
            if p.startswith(TRASH + "/") == trash and r.node == self.node
        )
        found = any(p.startswith(TRASH + "/") == trash for p in walk.files)
        if not gone or found or len(gone) < own:
            if background:
                self._empty_since.pop(part, None)
            return gone
        if not background:
            return []
        now = self.clock()
        where = self.root / part if part else self.root
        since = self._empty_since.get(part)
        if since is None:
            self._empty_since[part] = now
            log.warning(
                "gallery: %s holds none of the %d images this node indexed there; they are "
                "dropped if a pass %d minutes from now finds it so too (is its share mounted?)",
                where,
                len(gone),
                EMPTY_CONFIRM_SECONDS // 60,
            )
            return []
        if now - since < EMPTY_CONFIRM_SECONDS:
            return []
        del self._empty_since[part]
        log.warning("gallery: %s is still empty; dropping its %d rows", where, len(gone))
        return gone

    def _alive_nodes(self) -> set[str | None] | None:
        """The nodes whose rows stay theirs: this one, and every node that beat within
        ADOPT_SECONDS. A row of another node whose file this node sees (a shared folder) is
        read again and so becomes this node's, which then drops it once the file is gone: a
        node gone for good, or renamed, leaves no row that nobody would drop. ``None`` (take
        nothing over) when the store cannot say."""
        try:
            nodes = self.store.nodes()
        except Exception as exc:
            log.warning("gallery: could not read the nodes of the queue: %s", exc)
            return None
        return {n["name"] for n in nodes if n["age"] < ADOPT_SECONDS} | {self.node}

    def _changed(
        self,
        files: dict[str, tuple[int, int]],
        known: dict[str, OutputStat],
        alive: set[str | None] | None = None,
    ) -> list[str]:
        """The files not indexed as they are now (nor seen unreadable as they are), and with
        ``alive`` those whose row is of a node not in it; newest first: the images people
        look for first."""

        def stale(path: str, seen: tuple[int, int]) -> bool:
            row = known.get(path)
            if row is not None and (row.size_bytes, row.mtime_ns) == seen:
                return alive is not None and row.node not in alive
            return self._unreadable.get(path) != seen

        todo = [p for p, seen in files.items() if stale(p, seen)]
        todo.sort(key=lambda p: (p.rpartition("/")[2], p), reverse=True)
        return todo

    def _walk(self, tops: Iterable[str], *, full: bool) -> _Walk:
        """The PNGs under ``tops`` that may be listed, with what the walk learnt of the
        folders on the way (:class:`_Walk`). Without ``full`` only subfolders not read
        before are entered. The gallery's rules: regular files, and links to a regular file
        inside the outputs folder (:meth:`_source`; a link out, a FIFO or a device is left
        alone), no hidden names, names in UTF-8; a folder that is a link is not entered."""
        walk = _Walk()
        stack = [(top, top.count("/") + 1 if top else 0) for top in tops]
        while stack:
            if self._stopping.is_set():
                walk.complete = False
                break
            rel, depth = stack.pop()
            where = self.root / rel if rel else self.root
            try:
                st = os.lstat(where)
                if not stat.S_ISDIR(st.st_mode):  # a file or a link now: not followed
                    walk.gone.add(rel)
                    continue
                with os.scandir(where) as it:
                    entries = list(it)
            except (FileNotFoundError, NotADirectoryError):
                walk.gone.add(rel)
                continue
            except OSError as exc:  # no permission, an I/O error: unknown, not gone
                log.warning("gallery: cannot read %s (its rows are kept): %s", where, exc)
                continue
            walk.listed[rel] = st.st_mtime_ns
            for entry in entries:
                name = entry.name
                if name.startswith(".") or not is_utf8_name(name):
                    continue
                child = f"{rel}/{name}" if rel else name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        walk.folders.add(child)
                        if depth < MAX_DEPTH and (full or child not in self._dirs):
                            stack.append((child, depth + 1))
                    elif not name.lower().endswith(".png"):
                        continue
                    elif entry.is_file(follow_symlinks=False):
                        found = entry.stat(follow_symlinks=False)
                        walk.files[child] = (found.st_size, found.st_mtime_ns)
                    elif entry.is_symlink() and (seen := self._stat(child)) is not None:
                        walk.files[child] = seen
                except FileNotFoundError:  # gone meanwhile
                    continue
                except OSError:  # cannot tell what it is now: nothing is concluded about it
                    walk.unsure.add(child)
        return walk

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
            node=self.node,
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

    def trash(
        self, filenames: Sequence[str], *, failed: list[dict[str, Any]] | None = None
    ) -> tuple[list[str], list[str], float]:
        """Move images to the trash: ``(trashed, missing, when)``. Each is renamed into
        ``.trash/`` under its own path (with ``-1``, ``-2``... before ``.png`` if that name
        is taken there, the name cut to fit), then its row is marked; if the store cannot
        take the mark the file is renamed back and the error raised. An image the file
        system will not move (another file system, no permission, read-only...) stays where
        it is: with ``failed``, as ``{filename, error, status}`` there, else raised at once
        (``Conflict`` or ``Unavailable`` naming it and the cause)."""
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
                try:
                    target = self._move_into_trash(rel)
                except OSError as exc:
                    _failed(failed, name, _move_error(name, "to the trash", exc))
                    continue
                except Conflict as exc:  # a link or a file in the way in the trash
                    where = f"could not move {name[:200]!r} to the trash: {exc.message}"
                    _failed(failed, name, Conflict(where))
                    continue
                if target is None:
                    missing.append(name)
                    continue
                moved = replace(record, path=target, trashed_at=now, node=self.node)
                try:
                    self.store.move_output(rel, moved)
                except BaseException:
                    self._put_back(target, rel)
                    raise
                self._touched(folder, before)
            trashed.append(name)
        return trashed, [n for n in names if n in missing], now

    def restore(
        self, filenames: Sequence[str], *, failed: list[dict[str, Any]] | None = None
    ) -> tuple[list[str], list[str], list[str]]:
        """Move images back out of the trash to the names they had: ``(restored, missing,
        conflicts)``. ``missing``: not in the trash; ``conflicts``: a file has that name
        again, and is never overwritten (the image stays in the trash). One the file system
        will not move back goes to ``failed`` (or is raised), as in :meth:`trash`. The
        image keeps its favourite mark."""
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
                made: list[Path] = []
                try:
                    self._make_parents(name, made)
                    moved = self._rename(record.path, name)
                except (FileExistsError, Conflict):  # taken again, or a link in the way
                    _remove_folders(made)
                    conflicts.append(name)
                    continue
                except OSError as exc:
                    _remove_folders(made)
                    _failed(failed, name, _move_error(name, "back out of the trash", exc))
                    continue
                if not moved:  # purged meanwhile
                    _remove_folders(made)
                    missing.append(name)
                    continue
                try:
                    back = self._read(name) or replace(record, path=name, filename=name)
                    # The mark is the trashed row's: a fresh read knows none, and the row
                    # may be gone by now (another node's pass over a shared folder).
                    back = replace(
                        back, trashed_at=None, favourite=record.favourite, node=self.node
                    )
                    self.store.move_output(record.path, back)
                except BaseException:
                    self._put_back(name, record.path)
                    _remove_folders(made)
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
        ``0``: everything trashed before now), with its rows; how many rows went. A file that
        cannot be deleted stays, with its row, for the next pass; the row of a file this
        node does not see is left to the node that trashed it (its own outputs folder)."""
        cutoff = self.clock() - self.trash_days * DAY
        purged = 0
        after: tuple[float, str] | None = None
        while not self._stopping.is_set():
            due = self.store.trashed_outputs(limit=BATCH, trashed_before=cutoff, after=after)
            if not due:
                break
            after = (due[-1].trashed_at or 0.0, due[-1].path)
            done = []
            with self._lock:
                # Each row again, under the lock: an image restored and deleted again since
                # the page was read has the same trash path, but is trashed now, not due.
                now = self.store.outputs_at([r.path for r in due])
                for record in due:
                    row = now.get(record.path)
                    if row is None or row.trashed_at is None or row.trashed_at >= cutoff:
                        continue
                    try:
                        deleted = self._delete_from_trash(record.path)
                    except OSError as exc:
                        log.warning("gallery: could not purge %s: %s", record.path, exc)
                        continue
                    if deleted or row.node == self.node:
                        done.append(record.path)
                if done:
                    self.store.drop_outputs(done)
            purged += len(done)
        return purged

    def _delete_from_trash(self, path: str) -> bool:
        """Delete the file ``path`` of the trash; whether there was one. Only a path
        strictly inside the trash (no ``..``, no empty part) is ever deleted."""
        parts = path.split("/")
        if len(parts) < 2 or parts[0] != TRASH or any(p in ("", ".", "..") for p in parts[1:]):
            raise OSError(f"{path!r} is not a file in the trash; left alone")
        full = self.root / path
        try:
            self._check_no_links(path.rpartition("/")[0])
            mode = os.lstat(full).st_mode
        except FileNotFoundError:
            return False  # gone already: only its row is left
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
        return True

    # -- zip -----------------------------------------------------------------------------------
    def zip(self, filenames: Sequence[str]) -> tuple[IO[bytes], int]:
        """The images as one zip (stored, not compressed: PNGs are compressed already),
        built in an unnamed temporary file under ``spool``; ``(file at its start, size)``.
        Names that are one image (``sub/a.png``, ``sub\\a.png``) are zipped once.
        ``NotFound`` naming the first name that is not an image; ``ZipTooLarge`` past
        MAX_ZIP_BYTES; ``Unavailable`` while MAX_ZIPS zips are being built."""
        paths: dict[str, str] = {}  # path -> the name it was asked by
        for name in filenames:
            try:
                paths.setdefault(self._live_path(name), name)
            except NotFound:
                raise NotFound(
                    f"no image named {name[:200]!r}; nothing was zipped", field="files"
                ) from None
        sizes = {rel: (self._stat(rel) or (0, 0))[0] for rel in paths}
        if sum(sizes.values()) > MAX_ZIP_BYTES:
            raise ZipTooLarge(_too_large(sizes), field="files")
        if not self._zips.acquire(blocking=False):
            raise Unavailable(
                f"the server is busy building {MAX_ZIPS} zips already; try again in a moment"
            )
        try:
            return self._build_zip(paths)
        finally:
            self._zips.release()

    def _build_zip(self, paths: dict[str, str]) -> tuple[IO[bytes], int]:
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
                for rel, name in paths.items():
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
            handle, st = open_own(self.root / source)
        except OSError:  # gone, a link, a FIFO...
            raise NotFound(
                f"no image named {name[:200]!r}; nothing was zipped", field="files"
            ) from None
        with handle as source:
            if source.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
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

    def _make_parents(self, rel: str, made: list[Path]) -> None:
        """Make the folders of ``rel`` one by one, each a real folder: a link or a file of
        that name is never followed nor replaced (``Conflict`` naming it). Each folder made
        is added to ``made`` as it is made, so a caller whose move then fails can remove
        them (:func:`_remove_folders`); ``OSError`` when one cannot be made."""
        folder = rel.rpartition("/")[0]
        current = self.root
        for part in folder.split("/") if folder else ():
            current = current / part
            try:
                mode = os.lstat(current).st_mode
            except FileNotFoundError:
                try:
                    os.mkdir(current)
                    made.append(current)
                except FileExistsError:
                    pass
                mode = os.lstat(current).st_mode
            if not stat.S_ISDIR(mode):
                where = current.relative_to(self.root).as_posix()
                raise Conflict(
                    f"outputs/{where} is not a plain folder (a link or a file is in the way); "
                    "move it aside on the server, then try again"
                )

    def _move_into_trash(self, rel: str) -> str | None:
        """Rename ``rel`` into the trash; the trash path it took, or ``None`` if it was gone.
        A name taken there gets ``-1``, ``-2``... before its extension, its stem cut so that
        the name still fits the file system. Folders made for it go again if it is not
        moved."""
        base = f"{TRASH}/{rel}"
        made: list[Path] = []
        try:
            self._make_parents(base, made)
            folder, _, last = base.rpartition("/")
            stem, suffix = os.path.splitext(last)
            room = NAME_MAX - len(os.fsencode(suffix))
            for n in range(10_000):
                counter = f"-{n}" if n else ""
                target = f"{folder}/{cut_name(stem, room - len(counter))}{counter}{suffix}"
                try:
                    if self._rename(rel, target):
                        return target
                    break  # gone meanwhile
                except FileExistsError:
                    continue
            else:
                raise Conflict(f"the trash holds 10000 images named {rel[:200]!r}; empty it first")
        except BaseException:
            _remove_folders(made)
            raise
        _remove_folders(made)
        return None

    def _put_back(self, moved: str, original: str) -> None:
        """Undo a rename whose row the store would not take; if even that fails the file
        stays where it went, and the next pass indexes it there."""
        try:
            self._rename(moved, original)
        except OSError as exc:
            log.error("gallery: could not move %s back to %s: %s", moved, original, exc)

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


#: errno -> (what it means here, whether trying again may help: 503, else 409).
_MOVE_ERRORS = {
    errno.EXDEV: (
        "outputs/.trash and the image's folder are on different file systems (a folder "
        "mounted on its own); move the image on the server",
        False,
    ),
    errno.EACCES: ("permission denied: the server may not change that folder", False),
    errno.EPERM: ("not permitted: the server may not change that folder", False),
    errno.EROFS: ("the file system is read-only", False),
    errno.ENAMETOOLONG: ("the path is too long for the file system", False),
    errno.ENOTDIR: ("a file is in the way of its folder", False),
    errno.EISDIR: ("a folder is in the way", False),
    errno.ELOOP: ("a link is in the way", False),
    errno.EMLINK: ("the folder holds too many entries", False),
    errno.ENOSPC: ("no space left on the device", True),
    errno.EDQUOT: ("the disk quota is used up", True),
}


def _move_error(name: str, where: str, exc: OSError) -> ImagineerdError:
    """The error answered for an image the file system would not move ``where``: a 409
    when the server's folders must change first, else a 503 (try again)."""
    cause, retry = _MOVE_ERRORS.get(exc.errno or 0, (exc.strerror or str(exc), True))
    code = errno.errorcode.get(exc.errno or 0, "")
    text = f"could not move {name[:200]!r} {where}: {cause}{f' ({code})' if code else ''}"
    if retry:
        return Unavailable(f"{text}; nothing was moved, try again")
    return Conflict(f"{text}; nothing was moved")


def _failed(failed: list[dict[str, Any]] | None, name: str, error: ImagineerdError) -> None:
    """Note an image that could not be moved in ``failed``, or raise (no list: one image)."""
    if failed is None:
        raise error
    log.warning("gallery: %s", error.message)
    failed.append({"filename": name, "error": error.message, "status": error.status})


def _remove_folders(made: list[Path]) -> None:
    """Remove the folders a move made (the last made first), if they are still empty."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            return


def _too_large(sizes: dict[str, int]) -> str:
    """Why a zip of files of ``sizes`` is refused, and what to leave out."""
    total = sum(sizes.values())
    largest = sorted(sizes, key=lambda p: (-sizes[p], p))
    over, drop = total - MAX_ZIP_BYTES, []
    for path in largest:
        if over <= 0:
            break
        drop.append(path)
        over -= sizes[path]
    shown = ", ".join(repr(p[:200]) for p in drop[:5]) + (", ..." if len(drop) > 5 else "")
    return (
        f"the {len(sizes)} images come to {total:,} bytes, more than the {_gib(MAX_ZIP_BYTES)} "
        f"a zip may hold; leave out at least {len(drop)} of them (the largest: {shown}), or "
        "zip them in parts"
    )


def _gib(size: int) -> str:
    return f"{size / 1024**3:g} GiB" if size >= 1024**3 else f"{size:,} bytes"


def entry_of(record: OutputRecord) -> dict[str, Any]:
    """A row as the API shows it: its gallery entry, and whether it is a favourite."""
    return {**record.entry, "favourite": record.favourite}


def _device(root: Path) -> int | None:
    """The st_dev of the outputs folder, or ``None`` unless it is a folder."""
    try:
        st = os.lstat(root)
    except OSError:
        return None
    return st.st_dev if stat.S_ISDIR(st.st_mode) else None


def _mtime(root: Path, folder: str) -> int | None:
    try:
        st = os.lstat(root / folder if folder else root)
    except OSError:
        return None
    return st.st_mtime_ns if stat.S_ISDIR(st.st_mode) else None


def _plausible(name: Any) -> bool:
    """Whether ``name`` may be looked up at all (the store takes no NUL, nor endless text,
    nor a lone surrogate a JSON escape may carry)."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_NAME
        and "\x00" not in name
        and is_utf8_name(name)
    )


def _check_name(filename: str) -> str:
    """``filename`` as a path inside the outputs folder (:func:`image_path`), or
    ``NotFound``; a name no store can hold is not one either."""
    if not _plausible(filename):
        raise NotFound(f"no image named {str(filename)[:200]!r}")
    return image_path(filename)


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
