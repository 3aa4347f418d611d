"""The inbox's files apart from watching them: reading a claimed file into validated jobs,
the images its jobs name, and the names, notes and receipts the inbox writes.

Kept apart from the watcher in ``inbox.py`` so the rules for names (which must fit in 255
bytes however long or odd the dropped name was) and for text shown to people live in one
place.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from .errors import ValidationError
from .fsutil import fsync_dir
from .jobs import FINISHED, Job, JobSpec, bounds_summary
from .safefile import (
    NAME_MAX,
    FileTooLargeError,
    NotRegularFileError,
    cut_name,
    read_regular_file,
)

_JUNK_NAMES = {"thumbs.db", "desktop.ini", ".ds_store"}
#: Images a prompt file may name (``init_image: photo.jpg``); never parsed as prompt files.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: The job fields that hold images.
IMAGE_FIELDS = ("init_image", "mask")
#: ``init_image: outputs/<name>.png`` names an output image (the daemon gets ``<name>.png``).
OUTPUTS_PREFIX = "outputs/"
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


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def image_file_name(field: str, value: Any) -> str | None:
    """The file beside the prompt file that ``value`` (of ``field``) names, or ``None`` when
    it names none: no text, ``data:``/``sha256:`` text or ``outputs/...``, which the daemon
    takes as they are. A name that could lead anywhere else (a path, ``..``, a hidden or
    temporary name, not an image) is a ``ValidationError``: the inbox opens nothing but
    images in its own folder."""
    if not isinstance(value, str) or not value.strip():
        return None
    name = value.strip()
    if name.lower().startswith(("data:", "sha256:", OUTPUTS_PREFIX)):
        return None
    if len(os.fsencode(name)) > NAME_MAX:  # no file name is that long: pasted base64?
        raise ValidationError(
            f"{field}: {name[:40]!r}... is too long for a file name; to write the image "
            "itself into the file, give it as a data: URL (data:image/png;base64,...)",
            field=field,
        )
    if "/" in name or "\\" in name or name in (".", ".."):
        raise ValidationError(
            f"{field}: {name!r} is a path; name an image in the same folder as the prompt "
            f"file (photo.jpg), or an output image as {OUTPUTS_PREFIX}<name>.png",
            field=field,
        )
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise ValidationError(f"{field}: {name!r} is not a file name", field=field)
    if is_junk(name):
        raise ValidationError(
            f"{field}: {name!r} is a hidden or temporary name; such files are never taken "
            "from the inbox",
            field=field,
        )
    if not is_image_name(name):
        raise ValidationError(
            f"{field}: {name!r} is not a {', '.join(IMAGE_SUFFIXES)} file", field=field
        )
    return name


def daemon_value(value: Any) -> Any:
    """What the daemon gets for an image field that names no inbox file."""
    if isinstance(value, str) and value.strip().lower().startswith(OUTPUTS_PREFIX):
        return value.strip()[len(OUTPUTS_PREFIX) :]
    return value


def receipt_value(value: Any) -> str:
    """How the receipt names an input that is no inbox file (never a whole data: URL)."""
    text = str(value).strip()
    return "a data: URL" if text.lower().startswith("data:") else text[:200]


def named_image_files(items: list[Any] | None, preset: dict[str, Any]) -> list[str]:
    """The image files the jobs of a parsed file name, in order, each once; none if any name
    will be refused (then the file is taken at once, and fails with a note)."""
    names: dict[str, None] = {}
    for item in items or ():
        if not isinstance(item, dict):
            continue
        data = {**preset, **item}
        for field in IMAGE_FIELDS:
            try:
                name = image_file_name(field, data.get(field))
            except ValidationError:
                return []
            if name is not None:
                names[name] = None
    return list(names)


class JobImages:
    """The images the jobs of one claimed prompt file name (``init_image: photo.jpg``).

    ``claim(name)`` takes a file from beside the prompt file (the inbox moves it into the
    claim) and returns where it is now, raising ``ValidationError`` when it cannot be used;
    ``read(path)`` returns its bytes (bounded, regular files only). Each file is read once:
    jobs after the first that name it get the ``sha256:`` the daemon stored it under.
    """

    def __init__(self, claim: Callable[[str], Path], read: Callable[[Path], bytes]) -> None:
        self._claim, self._read = claim, read
        self.refs: list[dict[str, str]] = []  # per job: field -> file name as written
        self.paths: dict[str, Path] = {}  # file name as written -> where it is now
        self.shown: list[dict[str, str]] = []  # per job: field -> what the receipt says
        self._stored: dict[str, str] = {}  # file name -> sha256:<hex> once validated

    def collect(self, jobs: list[tuple[str, dict[str, Any]]]) -> None:
        """Find the files the jobs name and claim every one that can be; then raise the
        first problem, if any (the claimed files go to failed/ with the prompt file)."""
        problems: list[tuple[int, ValidationError]] = []
        first: dict[str, tuple[int, str, str]] = {}
        for index, (where, data) in enumerate(jobs):
            refs: dict[str, str] = {}
            shown: dict[str, str] = {}
            for field in IMAGE_FIELDS:
                value = data.get(field)
                try:
                    name = image_file_name(field, value)
                except ValidationError as exc:
                    problems.append(
                        (index, ValidationError(f"{where}: {exc.message}", field=field))
                    )
                    continue
                if name is not None:
                    refs[field] = name
                    first.setdefault(name, (index, where, field))
                elif isinstance(value, str) and value.strip():
                    shown[field] = receipt_value(value)
            self.refs.append(refs)
            self.shown.append(shown)
        for name, (index, where, field) in first.items():
            try:
                self.paths[name] = self._claim(name)
            except ValidationError as exc:
                problems.append(
                    (index, ValidationError(f"{where}: {field}: {exc.message}", field=field))
                )
        for index, refs in enumerate(self.refs):
            for field, name in refs.items():
                if name in self.paths:
                    self.shown[index][field] = self.paths[name].name
        if problems:
            raise min(problems, key=lambda problem: problem[0])[1]

    def prepare(self, index: int, data: dict[str, Any]) -> dict[str, Any]:
        """Job ``index`` as the daemon validates it: its files' bytes (or stored hashes) in
        place of their names, ``outputs/<name>`` as ``<name>``."""
        out = dict(data)
        for field in IMAGE_FIELDS:
            if field in out:
                out[field] = daemon_value(out[field])
        for field, name in self.refs[index].items():
            if name in self._stored:
                out[field] = self._stored[name]
                continue
            try:
                out[field] = self._read(self.paths[name])
            except ValidationError as exc:
                raise ValidationError(f"{field}: {name!r} {exc.message}", field=field) from None
        return out

    def explain(self, index: int, exc: ValidationError) -> ValidationError:
        """The daemon's complaint about an image, with the file's name in it."""
        name = self.refs[index].get(exc.field or "")
        if name is None:
            return exc
        prefix = f"{exc.field}:"
        if exc.message.startswith(prefix):
            message = f"{exc.field} {name!r}:{exc.message[len(prefix) :]}"
        else:
            message = f"{exc.message} ({exc.field}: {name!r})"
        return ValidationError(message, field=exc.field)

    def validated(self, index: int, spec: JobSpec) -> None:
        for field, name in self.refs[index].items():
            ref = getattr(spec, field, "")
            if isinstance(ref, str) and ref.startswith("sha256:"):
                self._stored.setdefault(name, ref)

    def record(self) -> dict[str, Any] | None:
        """What the receipt needs to name each job's inputs, or ``None`` if no job has any."""
        if not any(self.shown):
            return None
        return {"jobs": self.shown}


def read_image(path: Path, limit: int) -> bytes:
    """The bytes of a claimed image: a regular file of at most ``limit`` bytes."""
    try:
        return read_regular_file(path, limit)
    except FileTooLargeError as exc:
        raise ValidationError(
            f"is {exc.size:,} bytes; images may be at most {limit:,} bytes (server.max_image_bytes)"
        ) from None
    except NotRegularFileError as exc:
        raise ValidationError(
            f"is {exc.kind}, not a regular file, and was not read; drop the image itself"
        ) from None


def unique_name(folder: Path, name: str, avoid: set[str]) -> Path:
    """``folder/name``, with ``-2``, ``-3``... before the extension so that nothing there is
    overwritten and nothing in ``avoid`` (names chosen for the same claim) is repeated."""
    stem, suffix = os.path.splitext(name)
    if len(os.fsencode(suffix)) > 32:
        stem, suffix = name, ""
    room = NAME_MAX - len(os.fsencode(suffix))
    n = 1
    while True:
        counter = "" if n == 1 else f"-{n}"
        target = folder / f"{cut_name(stem, room - len(counter))}{counter}{suffix}"
        if str(target) not in avoid and not os.path.lexists(target):
            return target
        n += 1


def decode_record(claim: dict[str, Any]) -> dict[str, Any]:
    """A claim's ``final_path`` as a record: ``{"path": where the prompt file goes}``, for a
    file with images also ``"inputs"`` (name in the claim -> where it goes) and ``"jobs"``
    (per job, its image fields as the receipt names them). Claims without images keep a
    plain path there, as they always have."""
    raw = claim.get("final_path") or ""
    if raw.startswith("{"):  # a path is absolute: it starts with "/"
        try:
            data = json.loads(raw)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}
    return {"path": raw} if raw else {}


def encode_record(record: dict[str, Any]) -> str | None:
    if not record.get("inputs") and not record.get("jobs"):
        return record.get("path") or None
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def claim_name(name: str) -> str:
    """A unique name in ``.claimed/``: 16 random hex digits, ``-``, the name cut to fit."""
    prefix = uuid.uuid4().hex[:16] + "-"
    return prefix + cut_name(name, NAME_MAX - len(prefix))


def unique_pair(
    folder: Path, name: str, note_suffix: str, taken: Collection[str] = ()
) -> tuple[Path, Path]:
    """``folder/name`` and its note, with ``-2``, ``-3``... so nothing is overwritten (nor
    a path in ``taken``: notes planned but not yet written); the stem is cut so that both
    names, counter included, fit (the note's with room for the temporary name it is
    written under)."""
    stem, suffix = os.path.splitext(name)
    if len(os.fsencode(suffix)) > 32:  # not an extension people would recognise anyway
        stem, suffix = name, ""
    room = min(NAME_MAX - len(os.fsencode(suffix)), NOTE_NAME_MAX - len(os.fsencode(note_suffix)))
    n = 1
    while True:
        counter = "" if n == 1 else f"-{n}"
        base = cut_name(stem, room - len(counter)) + counter
        target, note = folder / f"{base}{suffix}", folder / f"{base}{note_suffix}"
        free = str(target) not in taken and str(note) not in taken
        if free and not os.path.lexists(target) and not os.path.lexists(note):
            return target, note
        n += 1


def write_texts_durably(items: list[tuple[Path, str]]) -> list[Exception | None]:
    """``fsutil.atomic_write_text`` for many files at once: each is written to a temporary
    file beside it, fsynced and renamed into place (a link at its path is replaced, never
    written through); then each folder is fsynced once for all of its files, where one
    write at a time fsyncs it once per file. The files are fsynced a few at a time, side by
    side (the file system commits its journal once for all of those waiting). Returns, per
    file, ``None`` or the error that stopped it (the others are written all the same)."""
    errors: list[Exception | None] = [None] * len(items)
    folders: dict[Path, None] = {}
    for start in range(0, len(items), FSYNC_CHUNK):  # a bounded number of open files
        chunk = list(enumerate(items[start : start + FSYNC_CHUNK], start))
        folders.update(dict.fromkeys(_write_chunk(chunk, errors)))
    for folder in folders:
        fsync_dir(folder)  # the renames, all at once
    return errors


def _write_chunk(
    chunk: list[tuple[int, tuple[Path, str]]], errors: list[Exception | None]
) -> list[Path]:
    """Write, fsync (side by side) and rename the files of ``chunk`` (errors by index into
    ``errors``); returns the folder of each file renamed into place."""
    temps: list[tuple[int, int, str]] = []  # (index, open descriptor, temporary name)
    try:
        return _write_temps(chunk, errors, temps)
    except BaseException:  # as atomic_write_text: no temporary file is left behind
        for _, _, tmp in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def _write_temps(
    chunk: list[tuple[int, tuple[Path, str]]],
    errors: list[Exception | None],
    temps: list[tuple[int, int, str]],
) -> list[Path]:
    try:
        for index, (path, text) in chunk:
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            except Exception as exc:  # this file only: a folder gone, no space
                errors[index] = exc
                continue
            temps.append((index, fd, tmp))
            try:
                data = memoryview(text.encode("utf-8"))
                while data:
                    data = data[os.write(fd, data) :]
            except Exception as exc:
                errors[index] = exc
        writing = [(index, fd) for index, fd, _ in temps if errors[index] is None]
        for (index, _), error in zip(writing, _fsync_all([fd for _, fd in writing]), strict=True):
            errors[index] = error
    finally:
        for _, fd, _ in temps:
            with contextlib.suppress(OSError):
                os.close(fd)
    paths = {index: path for index, (path, _) in chunk}
    renamed = []
    for index, _, tmp in temps:
        path = paths[index]
        try:
            if errors[index] is None:
                if path.exists():
                    os.chmod(tmp, path.stat().st_mode & 0o777)
                os.replace(tmp, path)
                renamed.append(path.parent)
                continue
        except Exception as exc:
            errors[index] = exc
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return renamed


#: Files written at once by write_texts_durably (open at once, fsynced side by side).
FSYNC_CHUNK = 32
#: Threads that fsync a burst's files side by side (each waits on the disk, not the CPU).
FSYNC_THREADS = 8
_fsync_pool: ThreadPoolExecutor | None = None
_fsync_pool_lock = threading.Lock()


def _fsync_all(fds: list[int]) -> list[Exception | None]:
    """fsync every descriptor; per descriptor ``None`` or the error."""

    def sync(fd: int) -> Exception | None:
        try:
            os.fsync(fd)
        except OSError as exc:
            return exc
        return None

    if len(fds) < 2:
        return [sync(fd) for fd in fds]
    global _fsync_pool
    with _fsync_pool_lock:
        if _fsync_pool is None:
            _fsync_pool = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="imagineerd-fsync")
        pool = _fsync_pool
    return list(pool.map(sync, fds))


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
    images: JobImages | None = None,
) -> list[JobSpec]:
    """Validate what a parser made of a file, job by job, under the folder's preset; with
    ``images``, the image files its jobs name are claimed first and read into them."""
    if items is None:
        raise ValidationError(f"no plugin reads {suffix} files")
    if not items:
        raise ValidationError("no prompts found in the file (only empty lines or comments)")
    if len(items) > max_jobs:
        raise ValidationError(
            f"the file has {len(items)} jobs; the limit is {max_jobs} "
            "per file (inbox.max_jobs_per_file). Split it"
        )
    jobs = []
    for index, item in enumerate(items):
        where = getattr(item, "where", None) or f"job {index + 1}"
        if not isinstance(item, dict):
            raise ValidationError(f"{where}: is not a job (a mapping with prompt:)")
        jobs.append((where, {**preset, **item}))
    if images is not None:
        images.collect(jobs)
    specs = []
    for index, (where, data) in enumerate(jobs):
        try:
            if images is None:
                specs.append(validate(data))
                continue
            prepared = images.prepare(index, data)  # its own complaints name the file
            try:
                spec = validate(prepared)
            except ValidationError as exc:
                raise images.explain(index, exc) from None
            images.validated(index, spec)
            specs.append(spec)
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
    record = decode_record(claim)
    shown = record.get("jobs") or []
    entries = []
    for index, job in enumerate(jobs):
        entry: dict[str, Any] = {"id": job.id, "prompt": job.spec.prompt, "seed": job.spec.seed}
        if index < len(shown) and isinstance(shown[index], dict):
            entry.update({f: str(v) for f, v in shown[index].items() if f in IMAGE_FIELDS})
        entry["status"] = job.status
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
    }
    inputs = record.get("inputs")
    if isinstance(inputs, dict) and inputs:
        # The images taken with the file, and their names beside it here (-2 if taken).
        body["inputs"] = {str(name): os.path.basename(str(to)) for name, to in inputs.items()}
    body["jobs"] = entries
    return "# imagineerd receipt: the jobs made from this file; updated as they finish\n" + (
        yaml.dump(body, Dumper=_DUMPER, sort_keys=False, allow_unicode=True, width=100)
    )


#: libyaml's emitter where PyYAML was built with it: the same YAML, written ten times
#: faster (a burst of a thousand receipts spent seconds in the pure-Python one).
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
