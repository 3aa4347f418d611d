"""Output images: names, atomic writes and the metadata every PNG carries.

Each PNG has two text chunks:

``parameters``
    AUTOMATIC1111's "infotext", which Civitai, A1111's PNG Info and most tools read.
``imagineerd``
    The job as exact JSON, so an image can be re-run exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from . import __version__
from .fsutil import fsync_dir
from .jobs import Job
from .safefile import open_regular

TEMP_PREFIX = ".imagineerd-"
#: The first eight bytes of every PNG file.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
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


#: A1111's "Schedule type" (since 1.9) for each scheduler: without it, A1111 reads
#: ``DPM++ 2M`` as Karras, its default for that sampler.
SCHEDULE_TYPES = {"dpmpp_2m_karras": ("DPM++ 2M", "Karras")}


def job_metadata(
    job: Job,
    *,
    model_label: str,
    model_name: str,
    backend: str,
    completed_at: str,
    duration: float,
    files: Mapping[str, Any] | None = None,
    hashes: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The two text chunks of a job's PNG: A1111's ``parameters`` and our exact JSON.

    ``files``: what ``model_choice`` says about the model files in A1111's words (``Model
    hash``, ``VAE``, ``Lora hashes``, ...); ``hashes``: their SHA-256s for the record.
    ``model_name`` is the model as a job may name it again (never an absolute path)."""
    spec = job.spec
    sampler, schedule = SCHEDULE_TYPES.get(spec.scheduler, (spec.sampler_label, "Uniform"))
    files = dict(files or {})
    model = {key: files.pop(key) for key in ("Model hash",) if key in files}
    model["Model"] = files.pop("Model", model_label)
    params: dict[str, Any] = {
        "Steps": spec.steps,
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": spec.guidance_scale,
        "Seed": spec.seed,
        "Size": f"{spec.width}x{spec.height}",
        **model,
        **{key: files.pop(key) for key in ("VAE hash", "VAE") if key in files},
    }
    if spec.mode != "txt2img":
        params["Denoising strength"] = spec.strength
    if spec.mode == "inpaint":
        params["Mask blur"] = spec.mask_blur
    if spec.hires is not None:
        scale, steps, denoise, upscaler = spec.hires
        params["Denoising strength"] = denoise
        params["Hires upscale"] = f"{scale:g}"
        if steps:
            params["Hires steps"] = steps
        params["Hires upscaler"] = upscaler.capitalize()  # A1111's names: Latent, Lanczos
    if spec.clip_skip > 1:
        params["Clip skip"] = spec.clip_skip
    params.update(files)  # TI hashes, Lora hashes
    params["RNG"] = "CPU"  # the noise is drawn on the CPU, as A1111's "CPU" setting does
    params["Version"] = f"imagineerd {__version__}"
    record = {
        "id": job.id,
        **spec.to_dict(),
        "model": model_name,
        "sampler": spec.sampler_label,
        "backend": backend,
        "source": job.source,
        "source_name": job.source_name,
        "submitted_at": job.submitted_at,
        "started_at": job.started_at,
        "completed_at": completed_at,
        "duration_seconds": duration,
        "version": __version__,
    }
    if hashes:
        record["hashes"] = dict(hashes)
    return {
        "parameters": infotext(spec.prompt, spec.negative_prompt, params),
        "imagineerd": json.dumps(record, ensure_ascii=False, sort_keys=True),
    }


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
        # The file's own fsync covers its bytes, not the directory entry that names it.
        fsync_dir(directory)
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


class NotAPng(OSError):
    """A file in outputs/ that is not a PNG we can read (other bytes under a .png name, a
    truncated write, a FIFO or device)."""


@contextlib.contextmanager
def open_png(path: Path) -> Iterator[Image.Image]:
    """``path`` as a PIL image, only if it is a regular file holding a PNG.

    Anything in outputs/ may have been put there by hand or over a share: Pillow would try
    every format it knows on other bytes (some raise ``NotImplementedError``), and opening a
    FIFO would block the thread for good. Every failure becomes ``NotAPng``.
    """
    try:
        handle = open_regular(path)
    except OSError as exc:
        raise NotAPng(f"{path} cannot be read as an image: {exc}") from None
    with handle:
        try:
            image = Image.open(handle, formats=["PNG"])
        except Exception as exc:  # Pillow's errors for bad input are of many types
            raise NotAPng(f"{path} is not a readable PNG ({type(exc).__name__})") from None
        with image:
            yield image


def read_metadata(path: Path) -> dict[str, Any]:
    """The text chunks of a PNG: ``parameters`` (str) and ``imagineerd`` (parsed JSON).
    Raises ``NotAPng`` for anything that is not a readable PNG."""
    with open_png(path) as image:
        try:
            chunks = dict(getattr(image, "text", {}))
        except Exception as exc:  # the text chunks are read lazily, and may be damaged
            raise NotAPng(f"{path} has unreadable metadata ({type(exc).__name__})") from None
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
        except NotAPng:
            continue
        if (meta.get("imagineerd") or {}).get("id") == job_id:
            return path
    return None
