"""The inbox: a watched drop folder (usually an SMB share) whose prompt files become jobs.

Life of a file, each step safe against a crash at any point:

1. Noticed by a watchdog event or by a rescan (at start-up and every ``inbox.rescan_seconds``:
   events can be dropped, and none fire for files that were there before we started). Only
   regular files, by ``lstat``: a link (to ``/etc/shadow``, say), FIFO or device is left alone.
2. Taken once unchanged in size and mtime for ``inbox.settle_seconds``. A close event does not
   shorten that: network copies arrive in pieces, and clients that append close every time.
3. Claimed: the claim is recorded in the store, then the file is renamed into the hidden
   ``.claimed/`` folder, so it is processed once even if it is noticed twice. If the rename
   fails the claim is removed again, so none pile up.
4. Read through ``safefile`` (no link followed, never blocking, bounded), parsed through the
   ``imagineerd_parse_prompt_file`` hook and validated job by job. Any problem, foreseen or
   not: nothing is queued, the file goes to ``failed/`` with a ``.error.txt`` note.
5. All its jobs are queued in one transaction with the claim marked submitted; the file goes
   to ``done/`` with a ``.result.yaml`` receipt, rewritten as each job finishes.

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
from .errors import ValidationError
from .fsutil import atomic_write_text
from .inbox_files import (
    claim_name,
    error_note,
    is_junk,
    read_prompt_text,
    receipt_text,
    specs_from_items,
    unexpected_problem,
    unique_pair,
)
from .inbox_settle import Settler
from .jobs import JobSpec
from .safefile import NotRegularFileError, ensure_directory, regular_lstat
from .store import CLAIMING, DONE, FAILED_CLAIM, SUBMITTED

log = logging.getLogger(__name__)

CLAIMED = ".claimed"
RECEIPT_SUFFIX = ".result.yaml"
ERROR_SUFFIX = ".error.txt"


class _Handler(FileSystemEventHandler):
    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
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
        self.claimed_dir = self.root / CLAIMED
        self.done_dir = self.root / "done"
        self.failed_dir = self.root / "failed"
        self.suffixes: tuple[str, ...] = ()
        self._settler = Settler()
        self._receipt_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._reported: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="imagineerd-inbox", daemon=True)
        self._observer: Any = None
        self.state = "stopped"
        self.restarts = self.taken = self.failed = self.rescans = 0
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
            **{name: getattr(self, name) for name in counts},
        }

    # -- noticing ------------------------------------------------------------------------
    def _classify(self, path: Path) -> tuple[str, str | None] | None:
        """``(path relative to the inbox, preset)`` for a file we should take, else None."""
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
        if path.suffix.lower() not in self.suffixes:
            self._report_once(
                f"suffix:{rel}",
                "ignoring inbox file %r: not a %s file",
                str(rel),
                "/".join(self.suffixes),
            )
            return None
        return rel.as_posix(), preset

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
                self.restarts += 1
                error = f"{type(exc).__name__}: {exc}"
                self.state = "restarting"
                if error != self.last_error:
                    log.exception("inbox: the watcher failed; restarting it")
                else:
                    log.error("inbox: the watcher failed again (%s); restarting it", error)
                self.last_error = error
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
                self.rescan()
                next_rescan = time.monotonic() + self.settings["rescan_seconds"]
            for path in self._ready():
                if self._stopping.is_set():
                    break
                self._settler.take(path)
                try:
                    self.take(path)
                except Exception:  # a file that got past every guard still must not stop us
                    log.exception("inbox: could not process %r", str(path))

    # -- taking a file -------------------------------------------------------------------
    def take(self, path: Path) -> None:
        """Claim one complete file and turn it into jobs (or a failure note)."""
        classified = self._classify(path)
        if classified is None:
            return
        # A name that is not valid UTF-8 (an old client's Latin-1, say) cannot go into the
        # database, a receipt or a JSON answer: from the claim on, the file carries a name
        # with U+FFFD in place of the bad bytes.
        rel = os.fsencode(classified[0]).decode("utf-8", "replace")
        self._ensure_folders()
        claimed = self.claimed_dir / claim_name(Path(rel).name)
        claim_id = self.claims.create_claim(rel, str(claimed), created_at=self.daemon.now_iso())
        try:
            os.rename(path, claimed)
        except OSError as exc:
            self.claims.delete_claim(claim_id)  # never renamed: there is nothing to finish
            if not isinstance(exc, FileNotFoundError):  # else: deleted, or taken already
                self._settler.refuse(path)
                log.warning("inbox: cannot claim %r (%s); left until it changes", rel, exc)
            return
        self._process_claimed(claim_id, rel, claimed)

    def _process_claimed(self, claim_id: int, rel: str, claimed: Path) -> None:
        try:
            specs = self.parse(claimed, rel)
        except ValidationError as exc:
            self._fail(claim_id, rel, claimed, exc.message)
            return
        except Exception as exc:  # a parser plugin's bug, a read error: still only this file
            log.error("inbox: unexpected error reading %r", rel, exc_info=True)
            self._fail(claim_id, rel, claimed, unexpected_problem(exc))
            return
        queued = self.daemon.submit_claim(claim_id, specs, rel)
        log.info("inbox: %r -> %d job(s) %s", rel, len(queued), [j.id for j in queued])
        self._finish(claim_id, rel, claimed)
        self.taken += 1

    def parse(self, path: Path, rel: str) -> list[JobSpec]:
        """Read, parse and validate a claimed file; ``ValidationError`` says what is wrong."""
        text = read_prompt_text(path, self.settings["max_file_bytes"])
        items = self.daemon.pm.hook.imagineerd_parse_prompt_file(path=Path(rel), text=text)
        return specs_from_items(
            items,
            suffix=Path(rel).suffix,
            max_jobs=self.settings["max_jobs_per_file"],
            preset=self._preset_for(rel),
            validate=self.daemon.validate,
        )

    def _preset_for(self, rel: str) -> dict[str, Any]:
        parts = rel.split("/")
        return dict(self.daemon.config["presets"].get(parts[0], {})) if len(parts) == 2 else {}

    def _fail(self, claim_id: int, rel: str, claimed: Path, message: str) -> None:
        target, note = unique_pair(self.failed_dir, Path(rel).name, ERROR_SUFFIX)
        atomic_write_text(note, error_note(rel, message, self.daemon.now_iso()))
        os.rename(claimed, target)  # a link or FIFO is moved itself, never its target
        self.claims.update_claim(
            claim_id, FAILED_CLAIM, final_path=str(target), note_path=str(note)
        )
        self.failed += 1
        log.warning("inbox: %r failed: %r (moved to %r)", rel, message, str(target))

    def _finish(self, claim_id: int, rel: str, claimed: Path) -> None:
        target, note = unique_pair(self.done_dir, Path(rel).name, RECEIPT_SUFFIX)
        # Where it goes is recorded first, so a crash after the rename is finished right.
        self.claims.update_claim(claim_id, SUBMITTED, final_path=str(target), note_path=str(note))
        os.rename(claimed, target)
        self.write_receipt(claim_id)
        self.claims.update_claim(claim_id, DONE)

    # -- recovery and receipts -----------------------------------------------------------
    def recover(self) -> None:
        """Finish claims left half-way by a stop; each on its own, so none can stop start-up."""
        try:
            claims = self.claims.open_claims()
        except Exception:
            log.exception("inbox: cannot read the claims left by the last run")
            return
        for claim in claims:
            try:
                self._recover_claim(claim)
            except Exception as exc:
                log.error("inbox: cannot finish the claim of %r", claim["original"], exc_info=True)
                self._fail_recovered(claim, exc)

    def _recover_claim(self, claim: dict[str, Any]) -> None:
        claimed, rel = Path(claim["claimed"]), claim["original"]
        present = os.path.lexists(claimed)  # a dangling link is still something to move
        if claim["state"] == CLAIMING:
            if present:
                log.warning("inbox: finishing %r, claimed before the last stop", rel)
                self._process_claimed(claim["id"], rel, claimed)
            else:  # never renamed: the file is still in the drop area (or gone)
                self.claims.delete_claim(claim["id"])
        elif present:  # submitted, not yet moved to done/
            self._finish(claim["id"], rel, claimed)
        else:
            self.write_receipt(claim["id"])
            self.claims.update_claim(claim["id"], DONE)

    def _fail_recovered(self, claim: dict[str, Any], exc: Exception) -> None:
        """A claim whose recovery raised: its file goes to failed/ (if nothing was queued)."""
        claim = self.claims.get_claim(claim["id"]) or claim  # it may have moved on meanwhile
        if claim["state"] != CLAIMING or not os.path.lexists(claim["claimed"]):
            return  # its jobs are queued; the next start tries to move it again
        try:
            self._fail(
                claim["id"], claim["original"], Path(claim["claimed"]), unexpected_problem(exc)
            )
        except Exception:
            log.error("inbox: cannot move %r to failed/ either", claim["original"], exc_info=True)

    @hookimpl
    def imagineerd_job_finished(self, job: dict[str, Any]) -> None:
        if job.get("source") == "inbox":
            record = self.daemon.job(job["id"])
            if record.claim_id is not None:
                self.write_receipt(record.claim_id)

    def write_receipt(self, claim_id: int) -> None:
        claim = self.claims.get_claim(claim_id)
        if not claim or not claim["note_path"] or claim["state"] == FAILED_CLAIM:
            return
        with self._receipt_lock:
            text = receipt_text(claim, self.claims.claim_jobs(claim_id))
            atomic_write_text(Path(claim["note_path"]), text)
