"""The life of an inbox claim once its prompt file is taken: from ``.claimed/`` to ``done/``
or ``failed/``, each step safe against a crash at any point.

1. Read through ``safefile`` (no link followed, never blocking, bounded), parsed through the
   ``imagineerd_parse_prompt_file`` hook and validated job by job. Any problem, foreseen or
   not: nothing is queued, the file goes to ``failed/`` with a ``.error.txt`` note.
2. All its jobs are queued in one transaction with the claim marked submitted; the file goes
   to ``done/`` with a ``.result.yaml`` receipt, rewritten as each job finishes.

The images its jobs name (``init_image: photo.jpg``, ``mask:``) are renamed into
``.claimed/inputs-<claim id>/``, read from there (regular files only, at most
``server.max_image_bytes``) and handed to the daemon as bytes, which it checks and stores;
they go to ``done/`` or ``failed/`` beside the prompt file. The folder's contents are the
record of what was claimed, and where each image goes is recorded in the claim before
anything is moved (``final_path``, a JSON record for files with images), so a crash at any
point leaves every image in one known place and start-up moves it on.

On start-up, claims left half-way are finished: never lost, never queued twice; each on its
own guard, so no claim can stop start-up. Images left in ``.claimed/`` by a claim that is
finished or unknown go to ``failed/``.

Kept apart from the watcher in ``inbox.py`` (noticing, settling, waiting for images, taking
a file), which claims a prompt file and hands it here; :class:`ClaimedFiles` needs only the
daemon, the config, the inbox folder and where claims are recorded.
"""

from __future__ import annotations

import logging
import os
import re
import stat as stat_mod
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import Config
from .daemon import Daemon
from .errors import ValidationError
from .fsutil import atomic_write_text
from .inbox_files import (
    JobImages,
    decode_record,
    encode_record,
    error_note,
    read_image,
    read_prompt_text,
    receipt_text,
    specs_from_items,
    unexpected_problem,
    unique_name,
    unique_pair,
    write_texts_durably,
)
from .jobs import JobSpec
from .safefile import ensure_directory, kind_of
from .store import CLAIMING, DONE, FAILED_CLAIM, SUBMITTED, ClaimSubmission

# The inbox's one logger: what happens to a claim is logged as the inbox's, as it always was.
log = logging.getLogger("imagineerd.inbox")

CLAIMED = ".claimed"
RECEIPT_SUFFIX = ".result.yaml"
ERROR_SUFFIX = ".error.txt"
#: ``.claimed/inputs-<claim id>``: the images claimed with one prompt file.
_INPUTS_DIR = re.compile(r"inputs-(\d+)")


class ClaimedFiles:
    """Processes, fails, finishes and recovers the claims of one inbox, and writes their
    receipts. Claims are recorded in ``claims`` (the daemon's store, or a stand-in).

    Called from the inbox's thread (and ``write_receipt`` from the worker's, as jobs finish).
    ``forget_image`` is told of each image taken into a claim, so the watcher stops waiting
    on it.
    """

    def __init__(
        self,
        daemon: Daemon,
        config: Config,
        root: Path,
        *,
        claims: Any,
        forget_image: Callable[[Path], None],
    ) -> None:
        self.daemon = daemon
        self.config = config
        self.settings = config["inbox"]
        self.claims = claims
        self.root = root
        self.claimed_dir = root / CLAIMED
        self.done_dir = root / "done"
        self.failed_dir = root / "failed"
        self._forget_image = forget_image
        # Images lately taken with a prompt file: a second file naming one fails at once.
        self._taken_with: dict[tuple[Path, str], str] = {}
        self._receipt_lock = threading.Lock()
        # Receipts planned in done/ and not yet written (``process(later=...)``), by claim.
        self._planned: dict[int, str] = {}
        # Files queued, files failed: the inbox shows them in its health (``Inbox.status``).
        self.taken = self.failed = 0
        # Claims left half-way because the store failed (their jobs not queued, or their
        # receipts not written): the watcher runs :meth:`recover` to finish them once the
        # store answers again.
        self.stranded = False

    def went_with(self, folder: Path, name: str) -> str | None:
        """The prompt file an image ``name`` in ``folder`` was lately taken with, if any."""
        return self._taken_with.get((folder, name.casefold()))

    # -- processing claimed files --------------------------------------------------------
    def process(
        self, claim_id: int, rel: str, claimed: Path, *, later: list[int] | None = None
    ) -> None:
        """:meth:`process_all` for one file."""
        self.process_all([(claim_id, rel, claimed)], later=later)

    def process_all(
        self, items: list[tuple[int, str, Path]], *, later: list[int] | None = None
    ) -> None:
        """Turn each file claimed as ``claimed`` (dropped as ``rel``) into jobs, or a failure
        note; either way it leaves ``.claimed/``. The jobs of every file that parses are
        queued in one transaction, which also records where each file and its receipt go;
        then the files move to ``done/``. With ``later``, the receipt of a file whose jobs
        were queued is left to :meth:`finish_receipts` (its claim id is added to ``later``):
        a burst of files shares the fsync of ``done/``. A file that fails does so alone;
        if the store cannot queue the jobs, the files stay claimed and :attr:`stranded` is
        set (:meth:`recover` finishes them)."""
        planned: list[tuple[ClaimSubmission, str, Path, Path, Path]] = []
        taken: set[str] = set(self._planned.values())  # names this burst has chosen already
        for claim_id, rel, claimed in items:
            try:
                if (plan := self._parse_and_plan(claim_id, rel, claimed, taken)) is not None:
                    planned.append(plan)
            except Exception:
                log.exception("inbox: could not process %r", rel)
        if not planned:
            return
        try:
            queued = self.daemon.submit_claims([plan[0] for plan in planned])
        except Exception:  # the store is locked or unreachable: each file stays claimed
            self.stranded = True
            log.exception("inbox: could not queue the jobs of %d file(s)", len(planned))
            return
        for (item, rel, claimed, target, note), jobs in zip(planned, queued, strict=True):
            # Counted before the receipt appears, so health never lags behind it.
            self.taken += 1
            log.info("inbox: %r -> %d job(s) %s", rel, len(jobs), [j.id for j in jobs])
            try:
                self._move_to_done(item.claim_id, claimed, target, note, later=later)
            except Exception:  # its jobs are queued: start-up moves it on
                log.exception("inbox: could not move %r to done/", rel)

    def _parse_and_plan(
        self, claim_id: int, rel: str, claimed: Path, taken: set[str]
    ) -> tuple[ClaimSubmission, str, Path, Path, Path] | None:
        """Parse a claimed file and plan where it, its receipt and its images go in
        ``done/`` (names in ``taken`` avoided, and added); None if it failed instead."""
        try:
            specs, record = self.parse_claimed(claim_id, claimed, rel)
        except ValidationError as exc:
            self._fail(claim_id, rel, claimed, exc.message)
            return None
        except Exception as exc:  # a parser plugin's bug, a read error: still only this file
            log.error("inbox: unexpected error reading %r", rel, exc_info=True)
            self._fail(claim_id, rel, claimed, unexpected_problem(exc))
            return None
        target, note = unique_pair(self.done_dir, Path(rel).name, RECEIPT_SUFFIX, taken=taken)
        # What the receipt says of each job's images is part of the record, so a restart
        # after the jobs are queued finishes the claim from the store alone.
        final_path = self._plan_record(claim_id, record or {}, target, note, taken)
        item = ClaimSubmission(claim_id, specs, rel, final_path=final_path, note_path=str(note))
        return item, rel, claimed, target, note

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
            preset=self.preset_for(rel),
            validate=self.daemon.validate,
            images=images,
        )
        return specs, images.record()

    def inputs_dir(self, claim_id: int) -> Path:
        """Where the images claimed with the claim ``claim_id`` wait."""
        return self.claimed_dir / f"inputs-{claim_id}"

    def _claim_image(self, claim_id: int, folder: Path, name: str, rel: str) -> Path:
        """Move the image ``name`` from beside the prompt file into the claim (unless a
        run before a crash did already); ``ValidationError`` if it cannot be used. Only a
        regular file is moved: a link, FIFO or folder of that name is left where it is."""
        inputs = self.inputs_dir(claim_id)
        if _is_real_dir(inputs) and (found := find_entry(inputs, name)) is not None:
            return found
        source = find_entry(folder, name)
        if source is None and (other := self.went_with(folder, name)):
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
        self._forget_image(source)
        self._taken_with[folder, name.casefold()] = rel
        if len(self._taken_with) > 1000:  # only the latest matter
            del self._taken_with[next(iter(self._taken_with))]
        return target

    def preset_for(self, rel: str) -> dict[str, Any]:
        """The preset a file dropped as ``rel`` gets from its folder (none at the top)."""
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

    def _finish(
        self, claim_id: int, rel: str, claimed: Path, *, later: list[int] | None = None
    ) -> None:
        """Move a submitted claim's file to ``done/`` (start-up, after a crash)."""
        # Receipts planned but not written yet (``later``) are names taken all the same.
        target, note = unique_pair(
            self.done_dir, Path(rel).name, RECEIPT_SUFFIX, taken=self._planned.values()
        )
        # Where it goes is recorded first, so a crash after the rename is finished right.
        self._plan(claim_id, SUBMITTED, target, note)
        self._move_to_done(claim_id, claimed, target, note, later=later)

    def _move_to_done(
        self, claim_id: int, claimed: Path, target: Path, note: Path, *, later: list[int] | None
    ) -> None:
        """Rename a submitted claim's file (and images) to where its claim records, then
        write its receipt, or leave that to ``later``."""
        os.rename(claimed, target)
        self._move_inputs(claim_id, self.done_dir)
        if later is not None:  # the claim stays "submitted" until its receipt is written
            self._planned[claim_id] = str(note)
            later.append(claim_id)
            return
        self.write_receipt(claim_id)
        self.claims.update_claim(claim_id, DONE)

    def finish_receipts(self, claim_ids: list[int]) -> None:
        """Write the receipts of submitted claims whose files are in ``done/`` (each one
        fsynced, the folder once for many), then mark each claim done. A receipt that cannot
        be written leaves its claim "submitted": the next start writes it (as it would
        after a crash in between)."""
        try:
            for start in range(0, len(claim_ids), self.RECEIPTS_AT_ONCE):
                self._finish_receipts(claim_ids[start : start + self.RECEIPTS_AT_ONCE])
        finally:
            for claim_id in claim_ids:
                self._planned.pop(claim_id, None)

    #: Receipts written under one hold of the receipt lock (the workers' threads rewrite
    #: receipts as jobs end, and wait for it meanwhile).
    RECEIPTS_AT_ONCE = 32

    def _finish_receipts(self, claim_ids: list[int]) -> None:
        with self._receipt_lock:
            notes: list[tuple[int, Path, str]] = []
            done: list[int] = []
            # Read under the lock, as a job that ends meanwhile rewrites its receipt.
            found = self.claims.claims_with_jobs(claim_ids)
            for claim_id, (claim, jobs) in zip(claim_ids, found, strict=True):
                if _receipt_due(claim):
                    text = receipt_text(claim, jobs)
                    notes.append((claim_id, Path(claim["note_path"]), text))
                else:  # as write_receipt: nothing to write, the claim is done all the same
                    done.append(claim_id)
            errors = write_texts_durably([(path, text) for _, path, text in notes])
        for (claim_id, path, _), error in zip(notes, errors, strict=True):
            if error is not None:
                log.error("inbox: cannot write the receipt %r: %s", str(path), error)
            else:
                done.append(claim_id)
        try:
            self.claims.update_claims(done, DONE)
        except Exception:  # left "submitted": the next start marks them done
            log.exception("inbox: cannot mark %d claim(s) done", len(done))

    def _plan(self, claim_id: int, state: str, target: Path, note: Path) -> None:
        """Record where the prompt file, its note and each of its images will go."""
        record = decode_record(self.claims.get_claim(claim_id) or {})
        final_path = self._plan_record(claim_id, record, target, note, set())
        self.claims.update_claim(claim_id, state, final_path=final_path, note_path=str(note))

    def _plan_record(
        self, claim_id: int, record: dict[str, Any], target: Path, note: Path, taken: set[str]
    ) -> str:
        """``record`` with where the prompt file and each of its images will go, encoded
        for the claim; every name chosen is added to ``taken``."""
        record = {**record, "path": str(target)}
        taken |= {str(target), str(note)}
        inputs = {}
        for name in _entries(self.inputs_dir(claim_id)):
            inputs[name] = str(unique_name(target.parent, name, taken))
            taken.add(inputs[name])
        record["inputs"] = inputs
        return encode_record(record)

    def _move_inputs(self, claim_id: int, folder: Path) -> None:
        """Move what is left in the claim's images folder to where the record says (a name
        taken meanwhile gets another, recorded first), then remove the folder."""
        inputs = self.inputs_dir(claim_id)
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
        """Finish claims left half-way by a stop (or by a store that stopped answering);
        each on its own, so none can stop start-up."""
        try:
            # Only ours: another node sharing the inbox finishes its own claims.
            claims = self.claims.open_claims(node=self.daemon.node)
        except Exception:
            log.exception("inbox: cannot read the claims left by the last run")
            return
        self.stranded = False  # each open claim is finished below, or failed on its own
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
                self.process(claim["id"], rel, claimed)
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
        inputs = self.inputs_dir(claim_id)
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

    def write_receipt(self, claim_id: int) -> None:
        """Rewrite the receipt of a submitted claim from its jobs as they are now."""
        claim = self.claims.get_claim(claim_id)
        if not _receipt_due(claim):
            return
        with self._receipt_lock:
            text = receipt_text(claim, self.claims.claim_jobs(claim_id))
            atomic_write_text(Path(claim["note_path"]), text)


def _receipt_due(claim: dict[str, Any] | None) -> bool:
    """Whether the claim has a receipt to (re)write: submitted, its receipt planned (not a
    failure note planned before a crash, the claim not yet planned anew)."""
    if not claim or not claim["note_path"] or claim["state"] not in (SUBMITTED, DONE):
        return False
    return claim["note_path"].endswith(RECEIPT_SUFFIX)


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


def find_entry(folder: Path, name: str) -> Path | None:
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
