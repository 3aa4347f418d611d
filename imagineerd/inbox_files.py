"""The inbox's files apart from watching them: reading a claimed file into validated jobs,
and the names, notes and receipts the inbox writes.

Kept apart from the watcher in ``inbox.py`` so the rules for names (which must fit in 255
bytes however long or odd the dropped name was) and for text shown to people live in one
place.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .errors import ValidationError
from .jobs import FINISHED, Job, JobSpec, bounds_summary
from .safefile import (
    NAME_MAX,
    FileTooLargeError,
    NotRegularFileError,
    cut_name,
    read_regular_file,
)

_JUNK_NAMES = {"thumbs.db", "desktop.ini", ".ds_store"}
#: Notes are written through ``atomic_write_text``, whose temporary name adds 14 bytes
#: (``.<name>.<8 random>.tmp``); the rest of the margin is for changes to it.
NOTE_NAME_MAX = NAME_MAX - 24


def is_junk(name: str) -> bool:
    """Hidden files, editor and OS droppings, partial downloads: never prompt files."""
    lower = name.lower()
    return (
        name.startswith((".", "~$", "._"))
        or lower in _JUNK_NAMES
        or lower.endswith((".tmp", ".part"))
        or name.endswith("~")
    )


def claim_name(name: str) -> str:
    """A unique name in ``.claimed/``: 16 random hex digits, ``-``, the name cut to fit."""
    prefix = uuid.uuid4().hex[:16] + "-"
    return prefix + cut_name(name, NAME_MAX - len(prefix))


def unique_pair(folder: Path, name: str, note_suffix: str) -> tuple[Path, Path]:
    """``folder/name`` and its note, with ``-2``, ``-3``... so nothing is overwritten; the
    stem is cut so that both names, counter included, fit (the note's with room for the
    temporary name it is written under)."""
    stem, suffix = os.path.splitext(name)
    if len(os.fsencode(suffix)) > 32:  # not an extension people would recognise anyway
        stem, suffix = name, ""
    room = min(NAME_MAX - len(os.fsencode(suffix)), NOTE_NAME_MAX - len(os.fsencode(note_suffix)))
    n = 1
    while True:
        counter = "" if n == 1 else f"-{n}"
        base = cut_name(stem, room - len(counter)) + counter
        target, note = folder / f"{base}{suffix}", folder / f"{base}{note_suffix}"
        if not os.path.lexists(target) and not os.path.lexists(note):
            return target, note
        n += 1


def read_prompt_text(path: Path, limit: int) -> str:
    """The text of a claimed file: a regular file of at most ``limit`` bytes, as text."""
    try:
        data = read_regular_file(path, limit)
    except FileTooLargeError as exc:
        raise ValidationError(
            f"the file is {exc.size:,} bytes; prompt files may be at most {limit:,} bytes "
            "(inbox.max_file_bytes). Split it into smaller files"
        ) from None
    except NotRegularFileError as exc:
        raise ValidationError(
            f"this is {exc.kind}, not a regular file, and was not read; drop the file itself"
        ) from None
    return decode_text(data)


def specs_from_items(
    items: list[Any] | None,
    *,
    suffix: str,
    max_jobs: int,
    preset: dict[str, Any],
    validate: Callable[[Any], JobSpec],
) -> list[JobSpec]:
    """Validate what a parser made of a file, job by job, under the folder's preset."""
    if items is None:
        raise ValidationError(f"no plugin reads {suffix} files")
    if not items:
        raise ValidationError("no prompts found in the file (only empty lines or comments)")
    if len(items) > max_jobs:
        raise ValidationError(
            f"the file has {len(items)} jobs; the limit is {max_jobs} "
            "per file (inbox.max_jobs_per_file). Split it"
        )
    specs = []
    for index, item in enumerate(items):
        where = getattr(item, "where", None) or f"job {index + 1}"
        try:
            if not isinstance(item, dict):
                raise ValidationError("is not a job (a mapping with prompt:)")
            specs.append(validate({**preset, **item}))
        except ValidationError as exc:
            raise ValidationError(f"{where}: {exc.message}", field=exc.field) from None
    return specs


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


def unexpected_problem(exc: BaseException) -> str:
    """The note for an error nobody foresaw: what it was, in one line, without a traceback."""
    detail = " ".join(str(exc).split())[:300] or "no details"
    return (
        f"reading it failed unexpectedly ({type(exc).__name__}: {detail}). This is a fault "
        "in imagineerd or one of its plugins, not necessarily in the file; the server log "
        "has the details"
    )


def error_note(rel: str, message: str, when: str) -> str:
    return (
        f'imagineerd could not use the prompt file "{rel}" (received {when}).\n'
        "Nothing from it was queued.\n\n"
        f"Problem: {message}\n\n"
        "Fix the file and drop it into the inbox again. Each job needs a prompt; numbers must "
        f"be within their limits ({bounds_summary()}).\n"
    )


def receipt_text(claim: dict[str, Any], jobs: list[Job]) -> str:
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
    return "# imagineerd receipt: the jobs made from this file; updated as they finish\n" + (
        yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=100)
    )
