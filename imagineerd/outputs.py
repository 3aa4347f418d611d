"""Output images: names, atomic writes and the metadata every PNG carries.

Each PNG has two text chunks:

``parameters``
    AUTOMATIC1111's "infotext", which Civitai, A1111's PNG Info and most tools read.
``imagineerd``
    The job as exact JSON, so an image can be re-run exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading
import unicodedata
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .errors import NotFound

TEMP_PREFIX = ".imagineerd-"
_SLUG_MAX = 48


def slugify(text: str, max_len: int = _SLUG_MAX) -> str:
    """ASCII, lower-case, words joined by ``_``: safe on every file system and share."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")
    return slug[:max_len].rstrip("_") or "image"


def output_name(job_id: int, prompt: str, when: datetime) -> str:
    """``YYYYMMDD_HHMMSS_<slug>_<job id>.png``; the id makes it unique, case-insensitively too."""
    return f"{when:%Y%m%d_%H%M%S}_{slugify(prompt)}_{job_id}.png"


def _infotext_value(value: Any) -> str:
    text = str(value)
    # A1111's parser splits on ", " and ": "; such values are written as JSON strings.
    if any(ch in text for ch in ",:\n") or text.startswith('"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """The A1111 ``parameters`` text: prompt, optional negative line, then ``Key: value`` pairs."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_infotext_value(value)}" for key, value in params.items()))
    return "\n".join(lines)


# A1111's own pattern (modules/infotext_utils.py) for the key-value line.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, Any]:
    """Parse an A1111 infotext back into ``{"prompt", "negative_prompt", <Key>: value}``."""
    *head, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:  # no parameter line: everything is prompt
        head, last = head + [last], ""
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    result: dict[str, Any] = {
        "prompt": "\n".join(prompt_lines),
        "negative_prompt": "\n".join(negative_lines),
    }
    for key, value in _PAIR.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        result[key.strip()] = value
    return result


def save_png(image: Image.Image, directory: Path, name: str, text: Mapping[str, str]) -> Path:
    """Write ``image`` as ``directory/name`` with text chunks, atomically.

    The bytes go to a hidden temporary file that is fsynced and then renamed, so nobody on the
    share ever sees half a PNG and a crash leaves at worst a temp file, removed at start-up.
    """
    directory.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".png.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        final = directory / name
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return final


def remove_partial_files(directory: Path) -> list[Path]:
    """Delete temp files left by a write that a crash interrupted; return what was removed."""
    removed = []
    if directory.is_dir():
        for path in directory.rglob(f"{TEMP_PREFIX}*.tmp"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def read_metadata(path: Path) -> dict[str, Any]:
    """The text chunks of a PNG: ``parameters`` (str) and ``imagineerd`` (parsed JSON)."""
    with Image.open(path) as image:
        chunks = dict(image.text) if hasattr(image, "text") else {}
    meta: dict[str, Any] = {"parameters": chunks.get("parameters")}
    raw = chunks.get("imagineerd")
    try:
        meta["imagineerd"] = json.loads(raw) if raw else None
    except ValueError:
        meta["imagineerd"] = None
    return meta


def find_output_for_job(directory: Path, job_id: int) -> Path | None:
    """A complete output already written for ``job_id`` (a crash after the rename but before
    the store was updated): found by name and confirmed by the job id in its metadata."""
    for path in sorted(directory.rglob(f"*_{job_id}.png")):
        try:
            meta = read_metadata(path)
        except (OSError, SyntaxError, ValueError):
            continue
        if (meta.get("imagineerd") or {}).get("id") == job_id:
            return path
    return None


class Gallery:
    """Listing, safe lookup and thumbnails of the images in the outputs folder.

    Metadata is read from each PNG once and cached by (size, mtime), so listing a large
    gallery reads only new files. Lookups accept only paths that stay inside the outputs
    folder after resolving symlinks: no ``..``, no hidden names, no links pointing outside.
    """

    def __init__(self, directory: Path, thumbnails: Path) -> None:
        self.directory = directory
        self.thumbnails = thumbnails
        self._cache: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def _files(self) -> list[str]:
        found = []
        for root, dirs, files in os.walk(self.directory):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel_root = os.path.relpath(root, self.directory)
            for name in files:
                if name.lower().endswith(".png") and not name.startswith("."):
                    found.append(name if rel_root == "." else f"{rel_root}/{name}")
        return found

    @staticmethod
    def _order(relpath: str) -> tuple[str, str]:
        # The file name starts with its timestamp: sorting by name is sorting by time.
        return (relpath.rsplit("/", 1)[-1], relpath)

    def list(self, limit: int = 50, before: str | None = None) -> list[dict[str, Any]]:
        """Images newest first; ``before`` (a filename from a previous page) pages on."""
        files = sorted(self._files(), key=self._order, reverse=True)
        if before is not None:
            cursor = self._order(before)
            files = [f for f in files if self._order(f) < cursor]
        entries = []
        for relpath in files:
            entry = self.entry(relpath)
            if entry is not None:
                entries.append(entry)
            if len(entries) >= limit:
                break
        return entries

    def entry(self, relpath: str) -> dict[str, Any] | None:
        path = self.directory / relpath
        try:
            stat = path.stat()
        except OSError:
            return None
        key = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(relpath)
        if cached and cached[0] == key:
            return cached[1]
        entry: dict[str, Any] = {
            "filename": relpath,
            "url": f"/api/outputs/{relpath}",
            "thumbnail_url": f"/api/outputs/{relpath}?thumb=256",
            "size_bytes": stat.st_size,
            "created": datetime.fromtimestamp(stat.st_mtime).strftime("%Y-%m-%dT%H:%M:%S.%f"),
        }
        try:
            with Image.open(path) as image:
                entry["width"], entry["height"] = image.size
                text = dict(getattr(image, "text", {}))
        except (OSError, SyntaxError, ValueError):
            return None  # not a readable PNG (yet): leave it out
        record = None
        try:
            record = json.loads(text["imagineerd"]) if "imagineerd" in text else None
        except ValueError:
            record = None
        entry["parameters"] = text.get("parameters")
        if record:
            for name in (
                "prompt",
                "negative_prompt",
                "seed",
                "steps",
                "guidance_scale",
                "scheduler",
                "sampler",
                "model",
                "backend",
                "duration_seconds",
                "source",
                "source_name",
                "completed_at",
            ):
                entry[name] = record.get(name)
            entry["job_id"] = record.get("id")
        elif entry["parameters"]:
            parsed = parse_infotext(entry["parameters"])
            entry["prompt"] = parsed.get("prompt")
            entry["negative_prompt"] = parsed.get("negative_prompt")
            entry["job_id"] = None
        with self._lock:
            self._cache[relpath] = (key, entry)
        return entry

    def resolve(self, relpath: str) -> Path:
        """The real path of an image inside the outputs folder, or ``NotFound``."""
        parts = relpath.replace("\\", "/").split("/")
        if (
            not relpath
            or "\x00" in relpath
            or any(p in ("", ".", "..") or p.startswith(".") for p in parts)
            or not parts[-1].lower().endswith(".png")
        ):
            raise NotFound(f"no image named {relpath!r}")
        root = self.directory.resolve()
        real = (root / "/".join(parts)).resolve()
        if not real.is_relative_to(root) or not real.is_file():
            raise NotFound(f"no image named {relpath!r}")
        return real

    def thumbnail(self, relpath: str, size: int) -> Path:
        """A JPEG at most ``size`` pixels on its longer side, made once and cached."""
        source = self.resolve(relpath)
        stat = source.stat()
        digest = hashlib.sha1(f"{relpath}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()
        target = self.thumbnails / str(size) / f"{digest}.jpg"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(source) as image:
                image = image.convert("RGB")
                image.thumbnail((size, size))
                fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=target.parent)
                with os.fdopen(fd, "wb") as handle:
                    image.save(handle, format="JPEG", quality=85)
                os.replace(tmp, target)
        return target
