"""The inbox: a watched drop folder (usually an SMB share) whose prompt files become jobs.

Life of a file, each step safe against a crash at any point:

1. Noticed by a watchdog event or by a rescan (at start-up and every ``inbox.rescan_seconds``:
   events can be dropped, and none fire for files that were there before we started). Only
   regular files, by ``lstat``: a link (to ``/etc/shadow``, say), FIFO or device is left alone.
2. Taken once unchanged in size and mtime for ``inbox.settle_seconds``. A close event does not
   shorten that: network copies arrive in pieces, and clients that append close every time.
3. Claimed: the claim is recorded in the store, then the file is renamed into the hidden
   ``.claimed/`` folder, so it is processed once even if it is noticed twice. If the rename
   fails the claim is removed again, so none pile up. Files that settle together (a folder
   copied in) are claimed together: one transaction records all their claims, and their
   receipts are written together at the end (see :meth:`Inbox.take_all`).
4. From there ``inbox_claims`` takes it on (:class:`~.inbox_claims.ClaimedFiles`): read,
   parsed and validated, its jobs queued and the file moved to ``done/`` with a receipt, or
   to ``failed/`` with a note; and at start-up, claims left half-way are finished.

Images (``init_image: photo.jpg``, ``mask:``) travel with the prompt file that names them:

- An image alone is never taken, nor parsed: it waits for a prompt file to name it (that
  file may still be on its way) and is reported once after ``inbox.orphan_seconds``.
- A prompt file that names images not all there (or still being written) waits for them,
  for up to ``inbox.orphan_seconds``: a folder copied over SMB arrives in any order. Then
  it is taken all the same, and a missing image is a failure note naming it.
- Once the prompt file is claimed, its images are claimed with it (into
  ``.claimed/inputs-<claim id>/``) and go to ``done/`` or ``failed/`` beside it;
  ``inbox_claims`` says how, safe against a crash at any point.

On start-up, claims left half-way are finished: never lost, never queued twice. No file can
stop the inbox or start-up: each file and each recovered claim has its own guard, the watcher
loop restarts after any error, and ``/api/health`` shows its state under ``inbox``. Names are
logged with ``%r``, so a name holding a newline cannot forge a log line.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserverVFS

from . import hookimpl
from .config import Config
from .config_schema import RESERVED_FOLDERS
from .daemon import Daemon
from .inbox_claims import ClaimedFiles, find_entry
from .inbox_files import (
    IMAGE_FIELDS,
    claim_name,
    is_image_name,
    is_junk,
    named_image_files,
    read_prompt_text,
)
from .inbox_settle import ImageWatch, Settler
from .jobs import JobSpec
from .safefile import NotRegularFileError, ensure_directory, regular_lstat

log = logging.getLogger(__name__)

PROMPT, IMAGE = "prompt", "image"


class _Waiting:
    """A prompt file whose images are not all there: what it names, and since when."""

    def __init__(self, key: tuple[int, int], names: list[str]) -> None:
        self.key, self.names = key, names
        self.since = time.monotonic()
        self.logged = False


class _Handler(FileSystemEventHandler):
    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox

    #: Events that say nothing about a file's contents or name (inotify reports every open
    #: and every read-only close, a dozen per file in a burst).
    IGNORED = frozenset({"opened", "closed_no_write"})

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in self.IGNORED:
            return
        path = getattr(event, "dest_path", "") or event.src_path
        self.inbox.notice(Path(os.fsdecode(path)))


class Inbox:
    """Watches ``paths.inbox``; one thread does all claiming and parsing, in order.

    ``claims`` is where claims are recorded (the daemon's store unless given). The receipt
    hook is registered at construction, before ``start()``: the daemon's own start-up
    recovery can finish inbox jobs, and their receipts must be rewritten too.
    """

    def __init__(self, daemon: Daemon, config: Config, *, claims: Any = None) -> None:
        self.daemon = daemon
        self.claims = claims if claims is not None else daemon.store
        self.config = config
        self.settings = config["inbox"]
        self.root = config.path_for("inbox")
        self.suffixes: tuple[str, ...] = ()
        self._settler = Settler()
        self._images = ImageWatch()
        # What happens to a file once claimed (and to its images) is the claims' business.
        self._claimed = ClaimedFiles(
            daemon, config, self.root, claims=self.claims, forget_image=self._images.forget
        )
        self.claimed_dir = self._claimed.claimed_dir
        self.done_dir = self._claimed.done_dir
        self.failed_dir = self._claimed.failed_dir
        # Only the inbox's thread reads and changes it (watchdog's thread never does).
        self._waiting: dict[Path, _Waiting] = {}
        self._next_orphan_check = 0.0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._reported: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="imagineerd-inbox", daemon=True)
        self._observer: Any = None
        self.state = "stopped"
        self.restarts = self.rescans = 0
        self.last_error: str | None = None
        daemon.pm.register(self)

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._ensure_folders()
        found = self.daemon.pm.hook.imagineerd_prompt_file_suffixes()
        self.suffixes = tuple(sorted({s.lower() for group in found for s in group}))
        self.daemon.register_status("inbox", self.status)
        self.recover()
        self._start_observer()
        self.rescan()
        self.state = "watching"
        self._thread.start()
        log.info(
            "watching inbox %s for %s files (%s)",
            self.root,
            ", ".join(self.suffixes),
            "polling" if self.settings["polling"] else "inotify",
        )

    def _start_observer(self) -> None:
        # Polling with lstat: the default stat would walk into a linked folder (to / even).
        poll = self.settings["polling"]
        self._observer = PollingObserverVFS(os.lstat, os.scandir) if poll else Observer()
        self._observer.schedule(_Handler(self), str(self.root), recursive=True)
        self._observer.start()

    def _check_observer(self) -> None:
        """The file watcher's own thread can die (inotify limits, the folder replaced):
        start a new one, and rescan for what it missed meanwhile."""
        if self._observer is None or self._observer.is_alive() or self._stopping.is_set():
            return
        log.error("inbox: the file watcher stopped; starting a new one and rescanning")
        self._start_observer()
        # Counted once the new watcher runs, so health never shows a restart half-done.
        self.restarts += 1
        self.last_error = "the file watcher stopped"
        self.rescan()

    def _ensure_folders(self) -> None:
        """A file or link named ``done`` (say) dropped into the share is moved aside."""
        for folder in (self.claimed_dir, self.done_dir, self.failed_dir):
            if aside := ensure_directory(folder):
                log.warning("inbox: %r was not a folder; renamed it %r", folder.name, aside.name)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(10)
        if self._thread.is_alive():
            self._thread.join(30)
        self.state = "stopped"
        if self.daemon.pm.is_registered(self):
            self.daemon.pm.unregister(self)

    def status(self) -> dict[str, Any]:
        """Shown under ``inbox`` in ``GET /api/health``."""
        dead = self.state == "watching" and not self._thread.is_alive()
        counts = ("restarts", "last_error", "taken", "failed", "rescans")
        watcher = self._observer is not None and self._observer.is_alive()
        return {
            "state": "dead" if dead else self.state,
            "file_watcher": "running" if watcher else "stopped",
            "pending": len(self._settler),
            "waiting_for_images": len(self._waiting),
            **{name: getattr(self, name) for name in counts},
        }

    # -- noticing ------------------------------------------------------------------------
    def _classify(self, path: Path) -> tuple[str, str | None, str] | None:
        """``(path relative to the inbox, preset, PROMPT or IMAGE)`` for a file we should
        take (an image: with the prompt file that names it), else None."""
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return None
        parts = rel.parts
        if len(parts) not in (1, 2) or is_junk(parts[-1]):
            return None
        preset = parts[0] if len(parts) == 2 else None
        if preset is not None:
            if preset.startswith(".") or preset.lower() in RESERVED_FOLDERS:
                return None
            if preset not in self.daemon.config["presets"]:
                self._report_once(
                    f"preset:{preset}",
                    "ignoring inbox folder %r: no preset of that name in config (presets:)",
                    preset,
                )
                return None
        if is_image_name(path.name):
            return rel.as_posix(), preset, IMAGE
        if path.suffix.lower() not in self.suffixes:
            self._report_once(
                f"suffix:{rel}",
                "ignoring inbox file %r: not a %s file",
                str(rel),
                "/".join(self.suffixes),
            )
            return None
        return rel.as_posix(), preset, PROMPT

    def _report_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.info(message, *args)

    def notice(self, path: Path) -> None:
        """A file may be new or changed (an event, or a rescan found it)."""
        classified = self._classify(path)
        if classified is None:
            return
        try:
            stat = regular_lstat(path)
        except NotRegularFileError as exc:
            self._report_once(
                f"kind:{classified[0]}",
                "ignoring inbox entry %r: it is %s, not a regular file",
                classified[0],
                exc.kind,
            )
            stat = None
        except OSError:
            stat = None
        if classified[2] == IMAGE:
            self._images.seen(path, stat)
            return
        if self._settler.seen(path, stat):
            self._wake.set()

    def rescan(self) -> None:
        """Look at every file in the drop area and preset folders (missed events, start-up)."""
        try:
            entries = list(os.scandir(self.root))
            for entry in list(entries):
                if entry.is_dir(follow_symlinks=False) and (
                    entry.name in self.daemon.config["presets"]
                ):
                    entries.extend(os.scandir(entry.path))
        except OSError as exc:
            log.error("cannot read inbox %s: %s", self.root, exc)
            return
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                self.notice(Path(entry.path))
        self.rescans += 1

    def _ready(self) -> list[Path]:
        ready, changed = self._settler.ready(self.settings["settle_seconds"])
        for path in changed:
            self.notice(path)  # forgets (and logs) what went away, restarts what changed
        return ready

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._loop()
            except Exception as exc:  # the watcher must outlive anything one pass can raise
                error = f"{type(exc).__name__}: {exc}"
                repeated, self.last_error = error == self.last_error, error
                # Counted after the error is recorded: health never shows a restart
                # without its reason.
                self.restarts += 1
                self.state = "restarting"
                if not repeated:
                    log.exception("inbox: the watcher failed; restarting it")
                else:
                    log.error("inbox: the watcher failed again (%s); restarting it", error)
                self._stopping.wait(min(0.2 * 2**self.restarts, 10.0))  # a loop that keeps failing
        self.state = "stopped"

    def _loop(self) -> None:
        next_rescan = time.monotonic() + self.settings["rescan_seconds"]
        self.state = "watching"
        while not self._stopping.is_set():
            self._wake.wait(0.1)
            self._wake.clear()
            self._check_observer()
            if time.monotonic() >= next_rescan:
                if self._claimed.stranded:  # the store failed a burst: finish its claims
                    self.recover()
                self.rescan()
                next_rescan = time.monotonic() + self.settings["rescan_seconds"]
            self._report_orphans()
            ready = self._ready()
            for start in range(0, len(ready), self.ROUND):
                if self._stopping.is_set():
                    break
                chunk = ready[start : start + self.ROUND]
                for path in chunk:
                    self._settler.take(path)
                self.take_all(chunk)

    def _report_orphans(self) -> None:
        """Once a second: report images no prompt file has named (and forget prompt files
        that went away while they waited for theirs)."""
        now = time.monotonic()
        if now < self._next_orphan_check:
            return
        self._next_orphan_check = now + 1.0
        for path in [p for p in self._waiting if not os.path.lexists(p)]:
            del self._waiting[path]
        named = {path.parent / name for path, wait in self._waiting.items() for name in wait.names}
        for path in self._images.orphans(self.settings["orphan_seconds"], named):
            log.info(
                "inbox: no prompt file has named the image %r in %d s; it is left where it is "
                "(name it in a prompt file's init_image: or mask: beside it to use it)",
                path.relative_to(self.root).as_posix(),
                self.settings["orphan_seconds"],
            )

    # -- waiting for images ----------------------------------------------------------------
    def _waits_for_images(self, path: Path, rel: str) -> bool:
        """Whether the prompt file at ``path`` names images that are not all there (or not
        yet complete) and may still arrive: then it is looked at again shortly."""
        try:
            stat = regular_lstat(path)
        except OSError:
            self._waiting.pop(path, None)
            return False  # gone, or not a file: claiming it says what happened
        key = (stat.st_size, stat.st_mtime_ns)
        wait = self._waiting.get(path)
        if wait is None or wait.key != key:  # new, or changed: what does it name now?
            wait = _Waiting(key, self._named_images(path, rel))
            self._waiting[path] = wait
        missing = [name for name in wait.names if not self._image_ready(path.parent, name)]
        if not missing:
            self._waiting.pop(path, None)
            return False
        limit = self.settings["orphan_seconds"]
        if time.monotonic() - wait.since >= limit:
            self._waiting.pop(path, None)
            log.warning(
                "inbox: %r waited %d s for %s; taking it without", rel, limit, ", ".join(missing)
            )
            return False
        if not wait.logged:
            wait.logged = True
            log.info(
                "inbox: %r waits for %s, which it names (up to %d s, inbox.orphan_seconds)",
                rel,
                ", ".join(repr(name) for name in missing),
                limit,
            )
        self._settler.hold(path, max(self.settings["settle_seconds"], 0.25))
        return True

    def _named_images(self, path: Path, rel: str) -> list[str]:
        """The image files the (unclaimed) prompt file names. Only to decide whether to wait:
        the file is read and parsed again, from where it was claimed to, before it is used,
        so any problem here is left for that (the file is taken at once)."""
        try:
            text = read_prompt_text(path, self.settings["max_file_bytes"])
            preset = self._claimed.preset_for(rel)
            if not any(field in text or field in preset for field in IMAGE_FIELDS):
                return []  # the usual file: no plugin is asked twice
            items = self.daemon.pm.hook.imagineerd_parse_prompt_file(path=Path(rel), text=text)
            return named_image_files(items, preset)
        except Exception:
            return []

    def _image_ready(self, folder: Path, name: str) -> bool:
        """Present and complete; or present as something we will refuse (no use waiting)."""
        found = find_entry(folder, name)
        if found is None:  # gone with another file?
            return self._claimed.went_with(folder, name) is not None
        try:
            regular_lstat(found)
        except OSError:
            return True
        return self._images.settled(found, self.settings["settle_seconds"])

    # -- taking a file -------------------------------------------------------------------
    #: Files taken together at most: their claims are recorded in one transaction.
    ROUND = 256

    def take_all(self, paths: list[Path]) -> None:
        """Claim complete files and turn each into jobs (or a failure note). A burst is
        taken as one: the claims of all its files are recorded in one transaction (before
        any file is renamed, as for one file), then the files are renamed, their jobs
        queued in one transaction, and their receipts written together. A crash anywhere
        leaves each file in a state start-up finishes, as with one file at a time. No file
        can stop the others."""
        taking: list[tuple[Path, str, Path]] = []
        for path in paths:
            try:
                if (found := self._claimable(path)) is not None:
                    taking.append(found)
            except Exception:  # a file that got past every guard still must not stop us
                log.exception("inbox: could not process %r", str(path))
        if not taking:
            return
        try:
            self._ensure_folders()
            ids = self.claims.create_claims(
                [(rel, str(claimed)) for _, rel, claimed in taking],
                created_at=self.daemon.now_iso(),
                # On a shared inbox, a file another node claimed already comes back as None.
                node=self.daemon.node,
            )
        except Exception:  # the store is locked, say: the files stay, the next rescan retries
            log.exception("inbox: could not claim %d file(s)", len(taking))
            return
        claimed_ok = []
        for (path, rel, claimed), claim_id in zip(taking, ids, strict=True):
            try:
                if claim_id is not None and self._rename_claimed(path, rel, claimed, claim_id):
                    claimed_ok.append((claim_id, rel, claimed))
            except Exception:
                log.exception("inbox: could not process %r", rel)
        if self._stopping.is_set():
            return  # claimed, not processed: the next start finishes them
        later: list[int] = []
        self._claimed.process_all(claimed_ok, later=later)
        try:
            self._claimed.finish_receipts(later)
        except Exception:  # left "submitted": recovery writes them (the next rescan's)
            self._claimed.stranded = True
            log.exception("inbox: could not write %d receipt(s)", len(later))

    def _claimable(self, path: Path) -> tuple[Path, str, Path] | None:
        """``(path, name relative to the inbox, where its claim renames it)`` for a prompt
        file to take now; None for anything else, or one that waits for its images."""
        classified = self._classify(path)
        if classified is None or classified[2] != PROMPT:
            return None
        if self._waits_for_images(path, classified[0]):
            return None
        # A name that is not valid UTF-8 (an old client's Latin-1, say) cannot go into the
        # database, a receipt or a JSON answer: from the claim on, the file carries a name
        # with U+FFFD in place of the bad bytes.
        rel = os.fsencode(classified[0]).decode("utf-8", "replace")
        return path, rel, self.claimed_dir / claim_name(Path(rel).name)

    def _rename_claimed(self, path: Path, rel: str, claimed: Path, claim_id: int) -> bool:
        """Move a file whose claim is recorded into ``.claimed/``; if that fails the claim
        is removed again (there is nothing to finish) and False returned."""
        try:
            os.rename(path, claimed)
        except OSError as exc:
            self.claims.delete_claim(claim_id)  # never renamed: there is nothing to finish
            if not isinstance(exc, FileNotFoundError):  # else: deleted, or taken already
                self._settler.refuse(path)
                log.warning("inbox: cannot claim %r (%s); left until it changes", rel, exc)
            return False
        return True

    # -- what the claims do, for the daemon and plugins -----------------------------------
    @property
    def taken(self) -> int:
        """Prompt files whose jobs were queued."""
        return self._claimed.taken

    @property
    def failed(self) -> int:
        """Prompt files that went to failed/."""
        return self._claimed.failed

    def recover(self) -> None:
        """Finish claims left half-way by a stop (see ``ClaimedFiles.recover``)."""
        self._claimed.recover()

    def parse_claimed(
        self, claim_id: int, claimed: Path, rel: str
    ) -> tuple[list[JobSpec], dict[str, Any] | None]:
        """See ``ClaimedFiles.parse_claimed``."""
        return self._claimed.parse_claimed(claim_id, claimed, rel)

    def write_receipt(self, claim_id: int) -> None:
        """Rewrite the receipt of a submitted claim (see ``ClaimedFiles.write_receipt``)."""
        self._claimed.write_receipt(claim_id)

    @hookimpl
    def imagineerd_job_finished(self, job: dict[str, Any]) -> None:
        if job.get("source") == "inbox":
            record = self.daemon.job(job["id"])
            if record.claim_id is not None:
                self.write_receipt(record.claim_id)
