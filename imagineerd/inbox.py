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

Images (``init_image: photo.jpg``, ``mask:``) travel with the prompt file that names them:

- An image alone is never taken, nor parsed: it waits for a prompt file to name it (that
  file may still be on its way) and is reported once after ``inbox.orphan_seconds``.
- A prompt file that names images not all there (or still being written) waits for them,
  for up to ``inbox.orphan_seconds``: a folder copied over SMB arrives in any order. Then
  it is taken all the same, and a missing image is a failure note naming it.
- Once the prompt file is claimed, its images are renamed into ``.claimed/inputs-<claim
  id>/``, read from there (regular files only, at most ``server.max_image_bytes``) and
  handed to the daemon as bytes, which it checks and stores; they go to ``done/`` or
  ``failed/`` beside the prompt file. The folder's contents are the record of what was
  claimed, and where each image goes is recorded in the claim before anything is moved
  (``final_path``, a JSON record for files with images), so a crash at any point leaves
  every image in one known place and start-up moves it on.

On start-up, claims left half-way are finished: never lost, never queued twice. No file can
stop the inbox or start-up: each file and each recovered claim has its own guard, the watcher
loop restarts after any error, and ``/api/health`` shows its state under ``inbox``. Names are
logged with ``%r``, so a name holding a newline cannot forge a log line.
"""

from __future__ import annotations

import logging
import os
import re
import stat as stat_mod
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
    IMAGE_FIELDS,
    JobImages,
    claim_name,
    decode_record,
    encode_record,
    error_note,
    is_image_name,
    is_junk,
    named_image_files,
    read_image,
    read_prompt_text,
    receipt_text,
    specs_from_items,
    unexpected_problem,
    unique_name,
    unique_pair,
)
from .inbox_settle import ImageWatch, Settler
from .jobs import JobSpec
from .safefile import NotRegularFileError, ensure_directory, kind_of, regular_lstat
from .store import CLAIMING, DONE, FAILED_CLAIM, SUBMITTED

log = logging.getLogger(__name__)

CLAIMED = ".claimed"
RECEIPT_SUFFIX = ".result.yaml"
ERROR_SUFFIX = ".error.txt"
#: ``.claimed/inputs-<claim id>``: the images claimed with one prompt file.
_INPUTS_DIR = re.compile(r"inputs-(\d+)")
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
        self._images = ImageWatch()
        # Only the inbox's thread reads and changes it (watchdog's thread never does).
        self._waiting: dict[Path, _Waiting] = {}
        self._next_orphan_check = 0.0
        # Images lately taken with a prompt file: a second file naming one fails at once.
        self._taken_with: dict[tuple[Path, str], str] = {}
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
            self._report_orphans()
            for path in self._ready():
                if self._stopping.is_set():
                    break
                self._settler.take(path)
                try:
                    self.take(path)
                except Exception:  # a file that got past every guard still must not stop us
                    log.exception("inbox: could not process %r", str(path))

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
            preset = self._preset_for(rel)
            if not any(field in text or field in preset for field in IMAGE_FIELDS):
                return []  # the usual file: no plugin is asked twice
            items = self.daemon.pm.hook.imagineerd_parse_prompt_file(path=Path(rel), text=text)
            return named_image_files(items, preset)
        except Exception:
            return []

    def _image_ready(self, folder: Path, name: str) -> bool:
        """Present and complete; or present as something we will refuse (no use waiting)."""
        found = _find(folder, name)
        if found is None:
            return (folder, name.casefold()) in self._taken_with  # gone with another file
        try:
            regular_lstat(found)
        except OSError:
            return True
        return self._images.settled(found, self.settings["settle_seconds"])

    # -- taking a file -------------------------------------------------------------------
    def take(self, path: Path) -> None:
        """Claim one complete file and turn it into jobs (or a failure note)."""
        classified = self._classify(path)
        if classified is None or classified[2] != PROMPT:
            return
        if self._waits_for_images(path, classified[0]):
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
            specs, record = self.parse_claimed(claim_id, claimed, rel)
        except ValidationError as exc:
            self._fail(claim_id, rel, claimed, exc.message)
            return
        except Exception as exc:  # a parser plugin's bug, a read error: still only this file
            log.error("inbox: unexpected error reading %r", rel, exc_info=True)
            self._fail(claim_id, rel, claimed, unexpected_problem(exc))
            return
        if record is not None:
            # What the receipt says of each job's images, kept before the jobs are queued:
            # a restart after that finishes the claim from the store alone.
            self.claims.update_claim(claim_id, CLAIMING, final_path=encode_record(record))
        queued = self.daemon.submit_claim(claim_id, specs, rel)
        self.taken += 1  # counted before the receipt appears, so health never lags behind it
        log.info("inbox: %r -> %d job(s) %s", rel, len(queued), [j.id for j in queued])
        self._finish(claim_id, rel, claimed)

    def parse_claimed(
        self, claim_id: int, claimed: Path, rel: str
    ) -> tuple[list[JobSpec], dict[str, Any] | None]:
        """Read, parse and validate a claimed file, taking the images its jobs name into
        the claim; ``ValidationError`` says what is wrong. Returns the specs, and what the
        receipt says of each job's images (``None``: no job has any)."""
        text = read_prompt_text(claimed, self.settings["max_file_bytes"])
        items = self.daemon.pm.hook.imagineerd_parse_prompt_file(path=Path(rel), text=text)
        folder = (self.root / rel).parent
        limit = self.config["server"]["max_image_bytes"]
        images = JobImages(
            lambda name: self._claim_image(claim_id, folder, name, rel),
            lambda path: read_image(path, limit),
        )
        specs = specs_from_items(
            items,
            suffix=Path(rel).suffix,
            max_jobs=self.settings["max_jobs_per_file"],
            preset=self._preset_for(rel),
            validate=self.daemon.validate,
            images=images,
        )
        return specs, images.record()

    def _inputs_dir(self, claim_id: int) -> Path:
        return self.claimed_dir / f"inputs-{claim_id}"

    def _claim_image(self, claim_id: int, folder: Path, name: str, rel: str) -> Path:
        """Move the image ``name`` from beside the prompt file into the claim (unless a
        run before a crash did already); ``ValidationError`` if it cannot be used. Only a
        regular file is moved: a link, FIFO or folder of that name is left where it is."""
        inputs = self._inputs_dir(claim_id)
        if _is_real_dir(inputs) and (found := _find(inputs, name)) is not None:
            return found
        source = _find(folder, name)
        if source is None and (other := self._taken_with.get((folder, name.casefold()))):
            raise ValidationError(
                f"{name!r} is no longer in the inbox: it went with {other!r}, which named it "
                "too; give each prompt file its own copy of the image"
            )
        if source is None:
            raise ValidationError(
                f"{name!r} is not in the inbox: put it in the same folder as the prompt file, "
                "named so (if another prompt file named it too, it went with that one)"
            )
        try:
            mode = os.lstat(source).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and not stat_mod.S_ISREG(mode):
            raise ValidationError(
                f"{source.name!r} is {kind_of(mode)}, not a regular file, and was not read; "
                "drop the image itself"
            )
        if aside := ensure_directory(inputs):
            log.warning("inbox: %r was not a folder; renamed it %r", inputs.name, aside.name)
        target = inputs / source.name
        try:
            os.rename(source, target)  # a link swapped in meanwhile is moved, never followed
        except FileNotFoundError:
            raise ValidationError(f"{name!r} is not in the inbox (it went away)") from None
        self._images.forget(source)
        self._taken_with[folder, name.casefold()] = rel
        if len(self._taken_with) > 1000:  # only the latest matter
            del self._taken_with[next(iter(self._taken_with))]
        return target

    def _preset_for(self, rel: str) -> dict[str, Any]:
        parts = rel.split("/")
        return dict(self.daemon.config["presets"].get(parts[0], {})) if len(parts) == 2 else {}

    def _fail(self, claim_id: int, rel: str, claimed: Path, message: str) -> None:
        claim = self.claims.get_claim(claim_id) or {}
        planned, note_path = decode_record(claim).get("path"), claim.get("note_path")
        if (
            planned
            and note_path
            and Path(planned).parent == self.failed_dir
            and not os.path.lexists(planned)
        ):  # failing once more after a crash: the same names, no second note
            target, note = Path(planned), Path(note_path)
        else:
            target, note = unique_pair(self.failed_dir, Path(rel).name, ERROR_SUFFIX)
        # Where it and its images go is recorded first (the claim stays "claiming"), so a
        # crash after the rename still moves the images beside it.
        self._plan(claim_id, CLAIMING, target, note)
        atomic_write_text(note, error_note(rel, message, self.daemon.now_iso()))
        self.failed += 1  # before the file shows in failed/, as ``taken`` before the receipt
        os.rename(claimed, target)  # a link or FIFO is moved itself, never its target
        self._move_inputs(claim_id, self.failed_dir)
        self.claims.update_claim(claim_id, FAILED_CLAIM)
        log.warning("inbox: %r failed: %r (moved to %r)", rel, message, str(target))

    def _finish(self, claim_id: int, rel: str, claimed: Path) -> None:
        target, note = unique_pair(self.done_dir, Path(rel).name, RECEIPT_SUFFIX)
        # Where it goes is recorded first, so a crash after the rename is finished right.
        self._plan(claim_id, SUBMITTED, target, note)
        os.rename(claimed, target)
        self._move_inputs(claim_id, self.done_dir)
        self.write_receipt(claim_id)
        self.claims.update_claim(claim_id, DONE)

    def _plan(self, claim_id: int, state: str, target: Path, note: Path) -> None:
        """Record where the prompt file, its note and each of its images will go."""
        claim = self.claims.get_claim(claim_id) or {}
        record = decode_record(claim)
        record["path"] = str(target)
        taken = {str(target), str(note)}
        inputs = {}
        for name in _entries(self._inputs_dir(claim_id)):
            inputs[name] = str(unique_name(target.parent, name, taken))
            taken.add(inputs[name])
        record["inputs"] = inputs
        self.claims.update_claim(
            claim_id, state, final_path=encode_record(record), note_path=str(note)
        )

    def _move_inputs(self, claim_id: int, folder: Path) -> None:
        """Move what is left in the claim's images folder to where the record says (a name
        taken meanwhile gets another, recorded first), then remove the folder."""
        inputs = self._inputs_dir(claim_id)
        left = _entries(inputs)
        if not left:
            _remove_dir(inputs)
            return
        claim = self.claims.get_claim(claim_id) or {}
        record = decode_record(claim)
        planned = dict(record.get("inputs") or {})
        avoid = {str(p) for p in (record.get("path"), claim.get("note_path")) if p}
        avoid |= set(planned.values())
        changed = False
        for name in left:
            to = planned.get(name)
            if not to or os.path.lexists(to) or Path(to).parent != folder:
                planned[name] = str(unique_name(folder, name, avoid))
                avoid.add(planned[name])
                changed = True
        if changed and claim:
            record["inputs"] = planned
            self.claims.update_claim(claim_id, claim["state"], final_path=encode_record(record))
        for name in left:
            os.rename(inputs / name, planned[name])
        _remove_dir(inputs)

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
        try:
            self._recover_stray_inputs()
        except Exception:
            log.exception("inbox: cannot look for images left in %s", CLAIMED)

    def _recover_claim(self, claim: dict[str, Any]) -> None:
        claimed, rel = Path(claim["claimed"]), claim["original"]
        present = os.path.lexists(claimed)  # a dangling link is still something to move
        if claim["state"] == CLAIMING:
            if present:
                log.warning("inbox: finishing %r, claimed before the last stop", rel)
                self._process_claimed(claim["id"], rel, claimed)
            elif decode_record(claim).get("path"):  # it was being moved to failed/
                self._move_inputs(claim["id"], self.failed_dir)
                self.claims.update_claim(claim["id"], FAILED_CLAIM)
            else:  # never renamed: the file is still in the drop area (or gone)
                self._move_stray_inputs(claim["id"], rel)
                self.claims.delete_claim(claim["id"])
        elif present:  # submitted, not yet moved to done/
            self._finish(claim["id"], rel, claimed)
        else:
            self._move_inputs(claim["id"], self.done_dir)
            self.write_receipt(claim["id"])
            self.claims.update_claim(claim["id"], DONE)

    def _move_stray_inputs(self, claim_id: int, rel: str) -> None:
        """Images claimed for a prompt file that is no longer in ``.claimed/`` (someone
        removed it): they go to failed/, never lost."""
        inputs = self._inputs_dir(claim_id)
        for name in _entries(inputs):
            target = unique_name(self.failed_dir, name, set())
            os.rename(inputs / name, target)
            log.warning(
                "inbox: the prompt file %r that named %r went away; the image is in %r",
                rel,
                name,
                str(target),
            )
        _remove_dir(inputs)

    def _recover_stray_inputs(self) -> None:
        """Images folders in ``.claimed/`` whose claim is finished or unknown (anything
        unforeseen): their images go to failed/."""
        for entry in os.scandir(self.claimed_dir):
            match = _INPUTS_DIR.fullmatch(entry.name)
            if match is None or not entry.is_dir(follow_symlinks=False):
                continue
            claim = self.claims.get_claim(int(match.group(1)))
            if claim is None or claim["state"] not in (CLAIMING, SUBMITTED):
                self._move_stray_inputs(int(match.group(1)), claim["original"] if claim else "?")

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
        if not claim or not claim["note_path"] or claim["state"] not in (SUBMITTED, DONE):
            return
        if not claim["note_path"].endswith(RECEIPT_SUFFIX):
            return  # a failure note planned before a crash, the claim not yet planned anew
        with self._receipt_lock:
            text = receipt_text(claim, self.claims.claim_jobs(claim_id))
            atomic_write_text(Path(claim["note_path"]), text)


def _is_real_dir(path: Path) -> bool:
    """A folder itself, not a link to one (which would lead out of the inbox)."""
    try:
        return stat_mod.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _entries(folder: Path) -> list[str]:
    """The names in ``folder`` if it is a real folder (a link planted in its place is not
    followed), sorted."""
    if not _is_real_dir(folder):
        return []
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []


def _find(folder: Path, name: str) -> Path | None:
    """``folder/name`` if something has that name; else the one entry whose name differs
    only in case (Windows clients see ``Photo.JPG`` and ``photo.jpg`` as one file)."""
    path = folder / name
    if os.path.lexists(path):
        return path
    wanted = name.casefold()
    matches = [entry for entry in _entries(folder) if entry.casefold() == wanted]
    return folder / matches[0] if len(matches) == 1 else None


def _remove_dir(folder: Path) -> None:
    try:
        os.rmdir(folder)
    except FileNotFoundError:
        pass
    except OSError as exc:  # not empty: something appeared there; left for the next start
        log.warning("inbox: cannot remove %r: %s", str(folder), exc)
