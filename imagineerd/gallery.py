"""The gallery: safe lookup, metadata and thumbnails of the images in the outputs folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import NotFound
from .outputs import TEMP_PREFIX, NotAPng, open_png, parse_infotext
from .safefile import NotRegularFileError, open_own

#: The thumbnail sizes served (longer side, pixels). A fixed few, so the cache cannot be
#: filled with one file per size a client asks for.
THUMBNAIL_SIZES = (128, 256, 512)
#: The thumbnail cache keeps at most this many files and bytes; the least recently used go.
MAX_THUMBNAIL_FILES = 5000
MAX_THUMBNAIL_BYTES = 512 * 1024 * 1024


def image_path(relpath: str) -> str:
    """A client's name of an image as a path inside the outputs folder, ``/``-separated:
    no ``..``, no empty or hidden part (the trash and our temp files are hidden), a ``.png``
    name, no NUL; otherwise ``NotFound``. Every lookup of an image by name checks this."""
    parts = relpath.replace("\\", "/").split("/")
    if (
        not relpath
        or "\x00" in relpath
        or any(p in ("", ".", "..") or p.startswith(".") for p in parts)
        or not parts[-1].lower().endswith(".png")
    ):
        raise NotFound(f"no image named {relpath[:200]!r}")
    return "/".join(parts)


class Gallery:
    """Safe lookup, metadata and thumbnails of the images in the outputs folder.

    Lookups accept only paths that stay inside the outputs folder after resolving symlinks:
    no ``..``, no hidden names, no links pointing outside. Listing is the index's in the job
    store (``gallery_index``), which reads each file's entry through :meth:`read_own_entry`.
    """

    def __init__(
        self,
        directory: Path,
        thumbnails: Path,
        *,
        max_thumbnail_files: int = MAX_THUMBNAIL_FILES,
        max_thumbnail_bytes: int = MAX_THUMBNAIL_BYTES,
    ) -> None:
        self.directory = directory
        self.thumbnails = thumbnails
        self.max_thumbnail_files = max_thumbnail_files
        self.max_thumbnail_bytes = max_thumbnail_bytes
        self._thumb_lock = threading.Lock()

    @staticmethod
    def read_own_entry(path: Path, relpath: str) -> tuple[dict[str, Any], os.stat_result] | None:
        """The gallery entry of the PNG at ``path``, listed as ``relpath``, and the stat of
        the file read; ``None`` unless ``path`` itself is a regular file holding a readable
        PNG. A link is never followed, even to a file inside the outputs folder: what the
        gallery index reads (``gallery_index``)."""
        try:
            with _open_own_png(path) as (image, stat):
                size, text = image.size, _text_chunks(image)
        except Exception:  # NotAPng, or damaged text chunks: not a readable PNG, left out
            return None
        return _entry(relpath, stat, size, text), stat

    def resolve(self, relpath: str) -> Path:
        """The real path of an image inside the outputs folder, or ``NotFound``."""
        rel = image_path(relpath)
        root = self.directory.resolve()
        try:
            real = (root / rel).resolve()
            # A link into a hidden folder (the trash) leads to no image either.
            found = (
                real.is_relative_to(root)
                and not any(p.startswith(".") for p in real.relative_to(root).parts)
                and real.is_file()
            )
        except (OSError, RuntimeError):  # a name too long for the file system, a link loop
            found = False
        if not found:
            raise NotFound(f"no image named {relpath[:200]!r}")
        return real

    def thumbnail(self, relpath: str, size: int) -> Path:
        """A JPEG at most ``size`` pixels on its longer side (one of ``THUMBNAIL_SIZES``),
        made once and cached; ``NotFound`` when the file is not a readable image."""
        if size not in THUMBNAIL_SIZES:
            raise ValueError(f"thumbnail size {size} is not one of {THUMBNAIL_SIZES}")
        source = self.resolve(relpath)
        stat = source.stat()
        digest = hashlib.sha1(f"{relpath}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()
        target = self.thumbnails / str(size) / f"{digest}.jpg"
        try:
            os.utime(target)  # a hit: now the most recently used
            return target
        except FileNotFoundError:
            pass
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle, open_png(source) as image:
                image = image.convert("RGB")
                image.thumbnail((size, size))
                image.save(handle, format="JPEG", quality=85)
            os.replace(tmp, target)
        except Exception:  # NotAPng, or pixel data Pillow cannot decode
            # A .png name on bytes that are not one (or a truncated file): the client asked
            # for something that is not an image we have, not a server fault.
            Path(tmp).unlink(missing_ok=True)
            raise NotFound(f"{relpath!r} is not a readable PNG image") from None
        self._evict(keep=target)
        return target

    def _evict(self, keep: Path) -> None:
        """Remove least recently used thumbnails until the cache is within its bounds."""
        with self._thumb_lock:
            files = []
            for folder in self.thumbnails.iterdir():
                if not folder.is_dir():
                    continue
                for entry in os.scandir(folder):
                    if entry.name.endswith(".jpg"):
                        try:
                            st = entry.stat()
                        except OSError:
                            continue
                        files.append((st.st_mtime_ns, st.st_size, entry.path))
            total = sum(size for _, size, _ in files)
            count = len(files)
            for _, size, path in sorted(files):
                if count <= self.max_thumbnail_files and total <= self.max_thumbnail_bytes:
                    break
                if path == str(keep):
                    continue
                try:
                    os.unlink(path)
                except OSError:
                    continue
                count -= 1
                total -= size


#: The fields of our ``imagineerd`` chunk a gallery entry carries.
RECORD_FIELDS = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance_scale",
    "scheduler",
    "sampler",
    "model",
    "loras",
    "clip_skip",
    "vae",
    "init_image",
    "init_image_name",
    "strength",
    "mask",
    "mask_blur",
    "inpaint_area",
    "hires",
    "backend",
    "duration_seconds",
    "source",
    "source_name",
    "completed_at",
)


def _text_chunks(image: Image.Image) -> dict[str, str]:
    """The text chunks of an open PNG. Ours come before the pixel data, where opening the
    file finds them (``info``); only a PNG without our chunk there is decoded whole, as
    others may write their text after the pixels."""
    if "imagineerd" in image.info:
        return {k: v for k, v in image.info.items() if isinstance(v, str)}
    return dict(getattr(image, "text", {}))


def _entry(
    relpath: str, stat: os.stat_result, size: tuple[int, int], text: dict[str, str]
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "filename": relpath,
        "url": f"/api/outputs/{relpath}",
        "thumbnail_url": f"/api/outputs/{relpath}?thumb=256",
        "size_bytes": stat.st_size,
        "created": datetime.fromtimestamp(stat.st_mtime).strftime("%Y-%m-%dT%H:%M:%S.%f"),
    }
    entry["width"], entry["height"] = size
    record = None
    try:
        record = json.loads(text["imagineerd"]) if "imagineerd" in text else None
    except ValueError:
        record = None
    entry["parameters"] = text.get("parameters")
    if record and isinstance(record, dict):
        for name in RECORD_FIELDS:
            entry[name] = record.get(name)
        entry["job_id"] = record.get("id")
    elif entry["parameters"]:
        parsed = parse_infotext(entry["parameters"])
        entry["prompt"] = parsed.get("prompt")
        entry["negative_prompt"] = parsed.get("negative_prompt")
        entry["job_id"] = None
    return entry


@contextlib.contextmanager
def _open_own_png(path: Path) -> Iterator[tuple[Image.Image, os.stat_result]]:
    """``path`` as a PIL image with the stat of what was opened, only if ``path`` itself is
    a regular file holding a PNG: ``O_NOFOLLOW`` refuses a link (even one swapped in after
    the caller looked), ``O_NONBLOCK`` keeps a FIFO from blocking. Failures are ``NotAPng``."""
    try:
        handle, stat = open_own(path)
    except NotRegularFileError as exc:
        raise NotAPng(f"{path} is {exc.kind}, not a regular file") from None
    except OSError as exc:
        raise NotAPng(f"{path} cannot be read as an image: {exc}") from None
    with handle:
        try:
            image = Image.open(handle, formats=["PNG"])
        except Exception as exc:  # Pillow's errors for bad input are of many types
            raise NotAPng(f"{path} is not a readable PNG ({type(exc).__name__})") from None
        with image:
            yield image, stat
