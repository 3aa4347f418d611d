"""Input images of jobs (``init_image``, ``mask``): checked, stored by hash, found again.

A job's input must outlive the request that brought it, so a queued image job survives a
restart like any other: the bytes are stored under ``state/inputs/`` named by their SHA-256
(the same image sent twice is stored once) and the job holds ``sha256:<hex>``. An input is
deleted once no queued or running job needs it; a job re-run from its PNG finds its input by
hash while it is stored, else through the output it came from (``init_image_name``), else it
is told that the input is gone.

Everything sent is hostile until proven an image: the bytes are bounded, the format must be
PNG, JPEG or WebP, and the size in the header is checked against our limits *before* any
pixel is decoded (a 30,000 x 30,000 PNG is a few KB that would decode to 3.6 GB); then the
whole image is decoded once, so a truncated file is refused at submit, not when it runs.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import io
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from .errors import NotFound, ValidationError
from .fsutil import atomic_write_bytes
from .gallery import Gallery
from .jobs import PARAMS, JobSpec, round8
from .safefile import read_regular_file

FORMATS = ("PNG", "JPEG", "WEBP")
#: The largest input accepted, per side and in all: a phone photo (4032 x 3024) fits; the
#: job's own size limit applies to what is generated.
MAX_SIDE = 8192
MAX_PIXELS = 40_000_000
#: Stored inputs younger than this are never deleted: a job naming one may be about to be
#: queued (validated, not yet stored).
GRACE_SECONDS = 120.0

# Pillow refuses to open (DecompressionBombError) past twice this; ours is lower than its
# default, and our own check below names the size in words.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

_HASH = re.compile(r"sha256:([0-9a-f]{64})")
_DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,", re.IGNORECASE)
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


#: A stored input that a request has named stays at least this long after it was pinned,
#: unless released sooner (once its job is in the queue, the queue keeps it).
PIN_SECONDS = 3600.0


@dataclass(frozen=True)
class Input:
    """An input as a job holds it."""

    ref: str  # sha256:<hex>
    width: int
    height: int
    output_name: str = ""  # the output it came from, if it did
    data: bytes = dataclasses.field(default=b"", repr=False)


class SharedInputs(Protocol):
    """Where nodes sharing a queue keep input images for each other (the PostgreSQL store)."""

    def put_input(self, digest: str, data: bytes) -> None: ...
    def get_input(self, digest: str) -> bytes | None: ...
    def collect_inputs(self, keep: Sequence[str], *, older_than: float) -> int: ...


class InputStore:
    """Input images by SHA-256 under ``folder``; with ``shared``, also where every node of
    a shared queue finds them (the node that runs a job fetches its inputs on first use)."""

    def __init__(
        self,
        folder: Path,
        gallery: Gallery,
        *,
        max_bytes: int,
        shared: SharedInputs | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.gallery = gallery
        self.max_bytes = max_bytes
        self.shared = shared
        self._lock = threading.Lock()
        self._pins: dict[str, float] = {}  # digest -> when a request named it

    # -- taking an input -------------------------------------------------------------------
    def take(
        self, field: str, value: str | bytes, *, output_name: str = "", keep: bool = True
    ) -> Input:
        """Check ``value`` (bytes, a data: URL, base64, ``sha256:<hex>`` or an output's file
        name) and, with ``keep``, store and pin it (:meth:`keep`); ``ValidationError`` naming
        ``field`` when it is no usable image. ``output_name``: where a ``sha256:`` reference
        came from, to look there when the input itself is no longer stored."""
        source = ""
        if isinstance(value, bytes):
            data = value
        elif match := _HASH.fullmatch(value):
            found = self._stored(field, match.group(1), output_name)
            if keep:
                self.keep(found)
            return found
        elif _DATA_URL.match(value):
            data = self._base64(field, value[_DATA_URL.match(value).end() :])
        elif value.lower().endswith((".png", ".jpg", ".jpeg", ".webp")) and len(value) < 1024:
            data, source = self._output(field, value), value
        elif len(value) >= 64 and _BASE64.fullmatch(value[:4096]):
            data = self._base64(field, value)
        else:
            raise ValidationError(
                f"{field}: not an image: send a data: URL or base64 of a PNG, JPEG or WebP, "
                f"or the file name of an output image (got {value[:40]!r})",
                field=field,
            )
        width, height = self.check(field, data)
        found = Input(f"sha256:{hashlib.sha256(data).hexdigest()}", width, height, source, data)
        if keep:
            self.keep(found)
        return found

    def keep(self, *inputs: Input) -> None:
        """Store the inputs and pin them: :meth:`collect` leaves them alone until
        :meth:`release` (their jobs are queued) or ``PIN_SECONDS``."""
        for item in inputs:
            digest = self._put(item.data).removeprefix("sha256:")
            if self.shared is not None:
                self.shared.put_input(digest, item.data)
            with self._lock:
                self._pins[item.ref.removeprefix("sha256:")] = time.monotonic()

    def release(self, refs: Iterable[str]) -> None:
        """The jobs naming these inputs are in the queue now, which keeps them."""
        with self._lock:
            for ref in refs:
                self._pins.pop((ref or "").removeprefix("sha256:"), None)

    def check(self, field: str, data: bytes) -> tuple[int, int]:
        """The size of an image in ``data``; every way it can be no usable image is a
        ``ValidationError`` naming ``field``."""
        if len(data) > self.max_bytes:
            raise ValidationError(
                f"{field}: the image is {len(data)} bytes; the limit is {self.max_bytes} "
                "(server.max_image_bytes)",
                field=field,
            )
        try:
            image = Image.open(io.BytesIO(data), formats=list(FORMATS))
        except Image.DecompressionBombError:
            raise ValidationError(
                f"{field}: the image is far over {MAX_PIXELS // 1_000_000} megapixels, the "
                "largest input accepted; it was not decoded",
                field=field,
            ) from None
        except Exception:  # Pillow's errors for bad input are of many types
            raise ValidationError(
                f"{field}: not a PNG, JPEG or WebP image (or a damaged one)", field=field
            ) from None
        with image:
            width, height = image.size  # from the header: nothing is decoded yet
            if max(width, height) > MAX_SIDE or width * height > MAX_PIXELS:
                raise ValidationError(
                    f"{field}: the image is {width}x{height}; inputs may be at most "
                    f"{MAX_SIDE} pixels a side and {MAX_PIXELS // 1_000_000} megapixels",
                    field=field,
                )
            if min(width, height) < 8:
                raise ValidationError(f"{field}: the image is {width}x{height}", field=field)
            try:
                image.load()
            except Exception:
                raise ValidationError(
                    f"{field}: the {image.format} image is truncated or damaged", field=field
                ) from None
        return width, height

    def _base64(self, field: str, text: str) -> bytes:
        # 4 characters per 3 bytes: refuse before decoding what cannot fit anyway.
        if len(text) * 3 // 4 > self.max_bytes + 3:
            raise ValidationError(
                f"{field}: the image is larger than {self.max_bytes} bytes "
                "(server.max_image_bytes)",
                field=field,
            )
        try:
            return base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ValidationError(f"{field}: the base64 text is not valid", field=field) from None

    def _output(self, field: str, name: str) -> bytes:
        try:
            path = self.gallery.resolve(name)
            return read_regular_file(path, self.max_bytes)
        except (NotFound, OSError):
            raise ValidationError(
                f"{field}: there is no output image named {name!r} (see GET /api/outputs)",
                field=field,
            ) from None

    def _read(self, digest: str) -> bytes | None:
        """The stored bytes of ``digest``: here, or fetched from the shared store (and kept
        here, for the next use); None when neither has them."""
        try:
            return read_regular_file(self.folder / digest, self.max_bytes)
        except OSError:
            pass
        data = self.shared.get_input(digest) if self.shared is not None else None
        if data is None or hashlib.sha256(data).hexdigest() != digest:
            return None
        self._put(data)
        return data

    def _stored(self, field: str, digest: str, output_name: str) -> Input:
        data = self._read(digest)
        if data is None and output_name:
            with contextlib.suppress(ValidationError):
                candidate = self._output(field, output_name)
                if hashlib.sha256(candidate).hexdigest() == digest:
                    data = candidate
        if data is None:
            raise ValidationError(
                f"{field}: the input image sha256:{digest[:12]}... is gone (inputs are kept "
                "while a job needs them); send the image again",
                field=field,
            )
        width, height = self.check(field, data)
        return Input(f"sha256:{digest}", width, height, output_name, data)

    def _put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.folder / digest
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                os.utime(path)  # young again: the grace period protects it anew
            else:
                atomic_write_bytes(path, data)
        return f"sha256:{digest}"

    def resolve(self, spec: JobSpec, data: Mapping[str, Any]) -> JobSpec:
        """``spec`` with its images checked and stored (``sha256:`` references); its size
        follows the input's unless ``data`` (the request) gave width/height (they resize it,
        as A1111's "just resize")."""
        # Both are checked before either is stored: a refused request leaves nothing behind.
        image = self.take(
            "init_image",
            spec.init_image,
            output_name=str(data.get("init_image_name") or ""),
            keep=False,
        )
        width, height = input_size(
            image.width, image.height, data.get("width"), data.get("height"), spec
        )
        mask = ""
        if spec.mask:
            taken = self.take("mask", spec.mask, keep=False)
            if abs(taken.width * image.height - image.width * taken.height) > 0.01 * (
                image.width * taken.height
            ):
                raise ValidationError(
                    f"mask: its shape ({taken.width}x{taken.height}) is not the input's "
                    f"({image.width}x{image.height}); a mask of another size is resized, but "
                    "it must have the same aspect ratio",
                    field="mask",
                )
            mask = taken.ref
            self.keep(taken)
        self.keep(image)
        return dataclasses.replace(
            spec,
            init_image=image.ref,
            init_image_name=image.output_name,
            mask=mask,
            width=width,
            height=height,
        )

    # -- using and forgetting inputs ----------------------------------------------------------
    def open(self, ref: str) -> Image.Image:
        """The stored input as an RGB image (fully decoded)."""
        match = _HASH.fullmatch(ref)
        if match is None:
            raise ValueError(f"not a stored input: {ref!r}")
        data = self._read(match.group(1))
        if data is None:
            raise FileNotFoundError(f"the input image {ref} is no longer stored")
        with Image.open(io.BytesIO(data), formats=list(FORMATS)) as image:
            return image.convert("RGB")

    def collect(self, needed: Iterable[str]) -> list[str]:
        """Delete the stored inputs no job in ``needed`` (refs of queued and running jobs)
        names, except pinned ones (named by a request whose job is not queued yet) and those
        written in the last ``GRACE_SECONDS``; return what went."""
        keep = {m.group(1) for ref in needed if (m := _HASH.fullmatch(ref or ""))}
        removed: list[str] = []
        if not self.folder.is_dir():
            return removed
        now = time.time()
        with self._lock:
            expired = time.monotonic() - PIN_SECONDS
            self._pins = {k: t for k, t in self._pins.items() if t > expired}
            keep |= set(self._pins)
            for entry in os.scandir(self.folder):
                name = entry.name
                if name in keep or not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    if now - entry.stat(follow_symlinks=False).st_mtime < GRACE_SECONDS:
                        continue
                    os.unlink(entry.path)
                    removed.append(name)
                except FileNotFoundError:
                    continue
        if self.shared is not None:
            self.shared.collect_inputs(sorted(keep), older_than=GRACE_SECONDS)
        return removed


def input_size(
    width: int, height: int, given_width: Any, given_height: Any, spec: JobSpec
) -> tuple[int, int]:
    """The size of an image job: as given, else the input's (the other side by its aspect
    when one is given), rounded to multiples of 8 and fitted within the job bounds."""
    lo, hi = PARAMS["width"].lo, PARAMS["width"].hi
    if given_width is not None and given_height is not None:
        return spec.width, spec.height
    if given_width is not None:
        w, h = float(spec.width), spec.width * height / width
    elif given_height is not None:
        w, h = spec.height * width / height, float(spec.height)
    else:
        w, h = float(width), float(height)
    fit = min(1.0, hi / max(w, h))  # a large photo is worked on at the largest size allowed
    grow = max(1.0, lo / min(w * fit, h * fit))
    w, h = w * fit * grow, h * fit * grow
    return (
        min(hi, max(lo, round8(w))),
        min(hi, max(lo, round8(h))),
    )
