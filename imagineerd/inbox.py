"""The inbox: a watched drop folder (usually an SMB share) whose prompt files become jobs.

Life of a file, each step safe against a crash at any point:

1. Noticed by a watchdog event or by a rescan (at start-up and every ``inbox.rescan_seconds``:
   events can be dropped, and none fire for files that were there before we started).
2. Taken only when complete: closed after writing and unchanged for a moment, or unchanged
   in size and mtime for ``inbox.settle_seconds`` (network copies arrive in pieces).
3. Claimed: the claim is recorded in the store, then the file is renamed into the hidden
   ``.claimed/`` folder, so it is processed once even if it is noticed twice.
4. Parsed through the ``imagineerd_parse_prompt_file`` hook and validated job by job with the
   API's validator. Any invalid job: nothing is queued, the file goes to ``failed/`` with a
   ``.error.txt`` note saying what is wrong and where.
5. All its jobs are queued in one transaction with the claim marked submitted; the file goes
   to ``done/`` with a ``.result.yaml`` receipt, rewritten as each job finishes.

On start-up, claims left half-way are finished: never lost, never queued twice.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from watchdog.events import (
    FileClosedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from . import hookimpl
from .config import RESERVED_FOLDERS, Config, atomic_write_text
from .daemon import Daemon
from .errors import ValidationError
from .jobs import FINISHED, JobSpec, bounds_summary

log = logging.getLogger(__name__)

CLAIMED = ".claimed"
RECEIPT_SUFFIX = ".result.yaml"
ERROR_SUFFIX = ".error.txt"
_JUNK_NAMES = {"thumbs.db", "desktop.ini", ".ds_store"}
# A file closed after writing is taken once it has been quiet this long (or settle_seconds,
# if shorter): some clients close and reopen a file while copying it.
CLOSED_GRACE_SECONDS = 0.3


def is_junk(name: str) -> bool:
    """Hidden files, editor and OS droppings, partial downloads: never prompt files."""
    lower = name.lower()
    return (
        name.startswith((".", "~$", "._"))
        or lower in _JUNK_NAMES
        or lower.endswith((".tmp", ".part"))
        or name.endswith("~")
    )


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    since: float
    closed: bool = False


class _Handler(FileSystemEventHandler):
    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        path = getattr(event, "dest_path", "") or event.src_path
        self.inbox.notice(Path(os.fsdecode(path)), closed=isinstance(event, FileClosedEvent))


class Inbox:
    """Watches ``paths.inbox``; one thread does all claiming and parsing, in order."""

    def __init__(self, daemon: Daemon, config: Config) -> None:
        self.daemon = daemon
        self.config = config
        self.settings = config["inbox"]
        self.root = config.path_for("inbox")
        self.claimed_dir = self.root / CLAIMED
        self.done_dir = self.root / "done"
        self.failed_dir = self.root / "failed"
        self.suffixes: tuple[str, ...] = ()
        self._pending: dict[Path, _Candidate] = {}
        self._lock = threading.Lock()
        self._receipt_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._reported: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="imagineerd-inbox", daemon=True)
        self._observer: Any = None

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> None:
        for folder in (self.root, self.claimed_dir, self.done_dir, self.failed_dir):
            folder.mkdir(parents=True, exist_ok=True)
        found = self.daemon.pm.hook.imagineerd_prompt_file_suffixes()
        self.suffixes = tuple(sorted({s.lower() for group in found for s in group}))
        self.daemon.pm.register(self, name="imagineerd.inbox")
        self.recover()
        observer_cls = PollingObserver if self.settings["polling"] else Observer
        self._observer = observer_cls()
        self._observer.schedule(_Handler(self), str(self.root), recursive=True)
        self._observer.start()
        self.rescan()
        self._thread.start()
        log.info(
            "watching inbox %s for %s files (%s)",
            self.root,
            ", ".join(self.suffixes),
            "polling" if self.settings["polling"] else "inotify",
        )

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(10)
        if self._thread.is_alive():
            self._thread.join(30)
        if self.daemon.pm.is_registered(self):
            self.daemon.pm.unregister(self)

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
                    "ignoring inbox folder %s: no preset of that name in config (presets:)",
                    preset,
                )
                return None
        if path.suffix.lower() not in self.suffixes:
            self._report_once(
                f"suffix:{rel}",
                "ignoring inbox file %s: not a %s file",
                rel,
                "/".join(self.suffixes),
            )
            return None
        return rel.as_posix(), preset

    def _report_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.info(message, *args)

    def notice(self, path: Path, *, closed: bool = False) -> None:
        """A file may be new or changed (an event, or a rescan found it)."""
        if self._classify(path) is None:
            return
        try:
            stat = path.stat()
        except OSError:
            with self._lock:
                self._pending.pop(path, None)
            return
        with self._lock:
            cand = self._pending.get(path)
            if cand is None or (cand.size, cand.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                self._pending[path] = _Candidate(
                    stat.st_size, stat.st_mtime_ns, time.monotonic(), closed
                )
            elif closed:
                cand.closed = True
        self._wake.set()

    def rescan(self) -> None:
        """Look at every file in the drop area and preset folders (missed events, start-up)."""
        try:
            entries = list(os.scandir(self.root))
        except OSError as exc:
            log.error("cannot read inbox %s: %s", self.root, exc)
            return
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                self.notice(Path(entry.path))
            elif (
                entry.is_dir(follow_symlinks=False) and entry.name in self.daemon.config["presets"]
            ):
                for sub in os.scandir(entry.path):
                    if sub.is_file(follow_symlinks=False):
                        self.notice(Path(sub.path))

    def _ready(self) -> list[Path]:
        """Candidates that have been quiet long enough, re-checked against the disk now."""
        settle = self.settings["settle_seconds"]
        now = time.monotonic()
        ready = []
        with self._lock:
            items = list(self._pending.items())
        for path, cand in items:
            try:
                stat = path.stat()
            except OSError:
                with self._lock:
                    self._pending.pop(path, None)
                continue
            if (stat.st_size, stat.st_mtime_ns) != (cand.size, cand.mtime_ns):
                self.notice(path)  # still being written: start the quiet period again
                continue
            quiet = now - cand.since
            if quiet >= settle or (cand.closed and quiet >= min(settle, CLOSED_GRACE_SECONDS)):
                ready.append(path)
        return ready

    def _run(self) -> None:
        next_rescan = time.monotonic() + self.settings["rescan_seconds"]
        while not self._stopping.is_set():
            self._wake.wait(0.1)
            self._wake.clear()
            if time.monotonic() >= next_rescan:
                self.rescan()
                next_rescan = time.monotonic() + self.settings["rescan_seconds"]
            for path in self._ready():
                if self._stopping.is_set():
                    break
                with self._lock:
                    self._pending.pop(path, None)
                try:
                    self.take(path)
                except Exception:  # one bad file must never stop the inbox
                    log.exception("inbox: could not process %s", path)

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
        claimed = self.claimed_dir / f"{uuid.uuid4().hex}-{Path(rel).name}"
        claim_id = self.daemon.create_claim(rel, str(claimed))
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            self.daemon.delete_claim(claim_id)  # gone (deleted, or taken already)
            return
        self._process_claimed(claim_id, rel, claimed)

    def _process_claimed(self, claim_id: int, rel: str, claimed: Path) -> None:
        try:
            specs = self.parse(claimed, rel)
        except ValidationError as exc:
            self._fail(claim_id, rel, claimed, exc.message)
            return
        queued = self.daemon.submit_claim(claim_id, specs, rel)
        log.info("inbox: %s -> %d job(s) %s", rel, len(queued), [j.id for j in queued])
        self._finish(claim_id, rel, claimed)

    def parse(self, path: Path, rel: str) -> list[JobSpec]:
        """Read, parse and validate a claimed file; ``ValidationError`` says what is wrong."""
        limit = self.settings["max_file_bytes"]
        size = path.stat().st_size
        if size > limit:
            raise ValidationError(
                f"the file is {size:,} bytes; prompt files may be at most {limit:,} bytes "
                "(inbox.max_file_bytes). Split it into smaller files"
            )
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
        text = decode_text(data)
        items = self.daemon.pm.hook.imagineerd_parse_prompt_file(path=Path(rel), text=text)
        if items is None:
            raise ValidationError(f"no plugin reads {Path(rel).suffix} files")
        if not items:
            raise ValidationError("no prompts found in the file (only empty lines or comments)")
        max_jobs = self.settings["max_jobs_per_file"]
        if len(items) > max_jobs:
            raise ValidationError(
                f"the file has {len(items)} jobs; the limit is {max_jobs} "
                "per file (inbox.max_jobs_per_file). Split it"
            )
        preset = self._preset_for(rel)
        specs = []
        for index, item in enumerate(items):
            where = getattr(item, "where", None) or f"job {index + 1}"
            try:
                if not isinstance(item, dict):
                    raise ValidationError("is not a job (a mapping with prompt:)")
                specs.append(self.daemon.validate({**preset, **item}))
            except ValidationError as exc:
                raise ValidationError(f"{where}: {exc.message}", field=exc.field) from None
        return specs

    def _preset_for(self, rel: str) -> dict[str, Any]:
        parts = rel.split("/")
        return dict(self.daemon.config["presets"].get(parts[0], {})) if len(parts) == 2 else {}

    def _fail(self, claim_id: int, rel: str, claimed: Path, message: str) -> None:
        target, note = unique_pair(self.failed_dir, Path(rel).name, ERROR_SUFFIX)
        atomic_write_text(note, error_note(rel, message, self.daemon.now_iso()))
        os.rename(claimed, target)
        self.daemon.update_claim(claim_id, "failed", final_path=str(target), note_path=str(note))
        log.warning("inbox: %s failed: %s (moved to %s)", rel, message, target)

    def _finish(self, claim_id: int, rel: str, claimed: Path) -> None:
        target, note = unique_pair(self.done_dir, Path(rel).name, RECEIPT_SUFFIX)
        # Where it goes is recorded first, so a crash after the rename is finished right.
        self.daemon.update_claim(claim_id, "submitted", final_path=str(target), note_path=str(note))
        os.rename(claimed, target)
        self.write_receipt(claim_id)
        self.daemon.update_claim(claim_id, "done")

    # -- recovery and receipts -----------------------------------------------------------
    def recover(self) -> None:
        for claim in self.daemon.open_claims():
            claimed, rel = Path(claim["claimed"]), claim["original"]
            if claim["state"] == "claiming":
                if claimed.exists():
                    log.warning("inbox: finishing %s, claimed before the last stop", rel)
                    self._process_claimed(claim["id"], rel, claimed)
                else:  # never renamed: the file is still in the drop area (or gone)
                    self.daemon.delete_claim(claim["id"])
            elif claimed.exists():  # submitted, not yet moved to done/
                self._finish(claim["id"], rel, claimed)
            else:
                self.write_receipt(claim["id"])
                self.daemon.update_claim(claim["id"], "done")

    @hookimpl
    def imagineerd_job_finished(self, job: dict[str, Any]) -> None:
        if job.get("source") == "inbox":
            record = self.daemon.job(job["id"])
            if record.claim_id is not None:
                self.write_receipt(record.claim_id)

    def write_receipt(self, claim_id: int) -> None:
        claim = self.daemon.claim(claim_id)
        if not claim or not claim["note_path"] or claim["state"] == "failed":
            return
        with self._receipt_lock:
            jobs = self.daemon.claim_jobs(claim_id)
            entries = []
            for job in jobs:
                entry: dict[str, Any] = {
                    "id": job.id,
                    "prompt": job.spec.prompt,
                    "seed": job.spec.seed,
                    "status": job.status,
                }
                if job.output_path:
                    entry["output"] = job.output_path
                if job.error:
                    entry["error"] = job.error
                entries.append(entry)
            finished = sum(j.status in FINISHED for j in jobs)
            body = {
                "file": claim["original"],
                "received": claim["created_at"],
                "finished": f"{finished} of {len(jobs)}",
                "jobs": entries,
            }
            text = (
                "# imagineerd receipt: the jobs made from this file; updated as they finish\n"
                + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=100)
            )
            atomic_write_text(Path(claim["note_path"]), text)


def decode_text(data: bytes) -> str:
    """UTF-8 (with or without BOM) or BOM-marked UTF-16, as Windows editors save text."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    if b"\x00" in data:
        raise ValidationError(
            "this is not a text file (it contains binary data); save the "
            "prompts as plain text (.txt) or YAML (.yaml)"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValidationError(
            f"line {line}: the text is not UTF-8; save the file with UTF-8 "
            "encoding (most editors offer it in 'Save as')"
        ) from None


def unique_pair(folder: Path, name: str, note_suffix: str) -> tuple[Path, Path]:
    """``folder/name`` and its note, with ``-2``, ``-3``... so nothing is overwritten."""
    stem, suffix = os.path.splitext(name)
    n = 1
    while True:
        base = stem if n == 1 else f"{stem}-{n}"
        target, note = folder / f"{base}{suffix}", folder / f"{base}{note_suffix}"
        if not target.exists() and not note.exists():
            return target, note
        n += 1


def error_note(rel: str, message: str, when: str) -> str:
    return (
        f'imagineerd could not use the prompt file "{rel}" (received {when}).\n'
        "Nothing from it was queued.\n\n"
        f"Problem: {message}\n\n"
        "Fix the file and drop it into the inbox again. Each job needs a prompt; numbers must "
        f"be within their limits ({bounds_summary()}).\n"
    )
