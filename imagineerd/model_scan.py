"""Scanning ``paths.models``: the layouts people keep models in, and what each file is.

Our own layout is ComfyUI's ``models/`` folder; an AUTOMATIC1111 webui root (or its
``models/``) and a ComfyUI root are read as they are. Links that leave the folder are not
followed, FIFOs and devices are skipped, depth and entry count are bounded, and one bad file
only loses its own entry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from .model_arch import ARCH_FROM_HEADER, diffusers_arch, read_safetensors_header, tensor_shapes
from .safefile import is_utf8_name, open_regular

log = logging.getLogger(__name__)

CATEGORIES = ("checkpoints", "loras", "embeddings", "vaes")

CHECKPOINT_SUFFIXES = {".safetensors": "safetensors", ".ckpt": "ckpt"}

#: Listed for LoRAs, embeddings and VAEs; only .safetensors is ever opened.
OTHER_SUFFIXES = {".safetensors": "safetensors", ".pt": "pt", ".bin": "bin", ".ckpt": "ckpt"}

#: Which of two files with the same name keeps the plain name (the other keeps its suffix);
#: the order in which ``find_checkpoint`` looks a name up.
FORMAT_RANK = {"safetensors": 0, "ckpt": 1, "diffusers": 2, "pt": 3, "bin": 4}

MAX_DEPTH = 8

MAX_ENTRIES = 20_000

CHUNK = 1 << 20


def detect_layout(root: Path) -> tuple[str, dict[str, Path]]:
    """``(layout name, {category: folder})`` for the folder ``paths.models`` names."""
    models = root / "models"
    if _isdir(models / "Stable-diffusion"):
        return "a1111", {
            "checkpoints": models / "Stable-diffusion",
            "loras": models / "Lora",
            "embeddings": root / "embeddings",
            "vaes": models / "VAE",
        }
    if _isdir(root / "Stable-diffusion"):
        # The webui's models/ folder itself: its embeddings sit beside it, at the webui root.
        return "a1111-models", {
            "checkpoints": root / "Stable-diffusion",
            "loras": root / "Lora",
            "embeddings": root.parent / "embeddings",
            "vaes": root / "VAE",
        }
    base, name = (models, "comfyui") if _isdir(models / "checkpoints") else (root, "own")
    return name, {
        "checkpoints": base / "checkpoints",
        "loras": base / "loras",
        "embeddings": base / "embeddings",
        "vaes": base / "vae",
    }


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _boundary(root: Path, folder: Path) -> str:
    """What links under ``folder`` may point into: the models folder, or for the webui's
    embeddings beside its models/ folder, that folder itself (if it is no link)."""
    real_root = os.path.realpath(root)
    if _inside(os.path.realpath(folder), real_root) or os.path.islink(folder):
        return real_root
    return os.path.realpath(folder)


def find_checkpoint(root: Path, name: str) -> Path | None:
    """The file or diffusers folder a checkpoint ``name`` from the listing stands for, or
    None; never a path outside the models folder."""
    if not name or name.startswith("/") or "\\" in name or "\0" in name or ".." in name.split("/"):
        return None
    folder = detect_layout(root)[1]["checkpoints"]
    boundary = _boundary(root, folder)
    if not _inside(os.path.realpath(folder), boundary):
        return None
    candidates = [folder / f"{name}{suffix}" for suffix in CHECKPOINT_SUFFIXES]
    candidates += [folder / name]
    for path in candidates:
        real = os.path.realpath(path)
        if not _inside(real, boundary):
            continue
        if path.suffix.lower() in CHECKPOINT_SUFFIXES and stat.S_ISREG(_mode(real)):
            return path
        if stat.S_ISDIR(_mode(real)) and stat.S_ISREG(
            _mode(os.path.join(real, "model_index.json"))
        ):
            return path
    return None


def _isdir(path: Path) -> bool:
    return stat.S_ISDIR(_mode(str(path)))


def _mode(path: str) -> int:
    try:
        return os.stat(path).st_mode
    except OSError:
        return 0


@dataclass
class ModelFile:
    category: str
    name: str
    path: str  # where it was found (a link inside the folder keeps its own name)
    real: str  # the file itself: what is hashed and compared
    format: str
    size: int | None
    mtime_ns: int
    arch: str
    identity: tuple[int, int] = (0, 0)  # (st_dev, st_ino) when listed


class _Scan:
    """One pass over the folder: bounded, no link followed out, one entry's failure its own."""

    def __init__(self, arch_cache: dict[tuple[str, int, int], str]) -> None:
        self.arch_cache = arch_cache
        self.seen = 0
        self.warned = False

    def category(self, category: str, folder: Path, boundary: str) -> list[ModelFile]:
        found: list[ModelFile] = []
        real_folder = os.path.realpath(folder)
        if not stat.S_ISDIR(_mode(real_folder)) or not _inside(real_folder, boundary):
            return found
        visited = {real_folder}
        stack: list[tuple[str, str, int]] = [(real_folder, "", 0)]
        while stack:
            directory, prefix, depth = stack.pop()
            try:
                entries = sorted(os.scandir(directory), key=lambda e: e.name)
            except OSError as exc:
                log.warning("models: cannot read %r: %s", directory, exc)
                continue
            for entry in entries:
                self.seen += 1
                if self.seen > MAX_ENTRIES:
                    if not self.warned:
                        self.warned = True
                        log.warning(
                            "models: more than %d entries; the rest is not listed", MAX_ENTRIES
                        )
                    return found
                try:
                    item = self.entry(category, entry, prefix, depth, boundary, visited, stack)
                except Exception:  # one bad entry never breaks the listing
                    log.warning("models: skipping %r", entry.path, exc_info=True)
                    continue
                if item is not None:
                    found.append(item)
        return found

    def entry(
        self,
        category: str,
        entry: os.DirEntry,
        prefix: str,
        depth: int,
        boundary: str,
        visited: set[str],
        stack: list[tuple[str, str, int]],
    ) -> ModelFile | None:
        name = entry.name
        if not is_utf8_name(name):  # could not be shown or chosen
            return None
        if name.startswith("."):  # partial downloads, .git and the like
            return None
        real = os.path.realpath(entry.path) if entry.is_symlink() else entry.path
        if not _inside(real, boundary):
            log.debug("models: %r links out of the models folder; not followed", entry.path)
            return None
        st = os.stat(real)
        rel = f"{prefix}{name}"
        if stat.S_ISDIR(st.st_mode):
            if category == "checkpoints" and stat.S_ISREG(
                _mode(os.path.join(real, "model_index.json"))
            ):
                return self.diffusers(rel, entry.path, real, st)
            if depth < MAX_DEPTH and real not in visited:
                visited.add(real)
                stack.append((real, f"{rel}/", depth + 1))
            return None
        if not stat.S_ISREG(st.st_mode):  # FIFOs, sockets, devices
            return None
        suffixes = CHECKPOINT_SUFFIXES if category == "checkpoints" else OTHER_SUFFIXES
        fmt = suffixes.get(os.path.splitext(name)[1].lower())
        if fmt is None:
            return None
        return ModelFile(
            category,
            os.path.splitext(rel)[0],
            entry.path,
            real,
            fmt,
            st.st_size,
            st.st_mtime_ns,
            self.arch(category, real, st) if fmt == "safetensors" else "unknown",
            (st.st_dev, st.st_ino),
        )

    def arch(self, category: str, real: str, st: os.stat_result) -> str:
        key = (real, st.st_size, st.st_mtime_ns)
        if key not in self.arch_cache:
            try:
                shapes, metadata = tensor_shapes(read_safetensors_header(real, st))
                self.arch_cache[key] = ARCH_FROM_HEADER[category](shapes, metadata)
            except Exception as exc:  # malformed, truncated, hostile: still listed
                log.info("models: cannot read the header of %r: %s", real, exc)
                self.arch_cache[key] = "unknown"
        return self.arch_cache[key]

    def diffusers(self, rel: str, path: str, real: str, st: os.stat_result) -> ModelFile:
        try:
            arch = diffusers_arch(real)
        except Exception as exc:
            log.info("models: cannot read %r/model_index.json: %s", real, exc)
            arch = "unknown"
        return ModelFile(
            "checkpoints", rel, path, real, "diffusers", _folder_size(real), st.st_mtime_ns, arch
        )


def _folder_size(folder: str) -> int:
    """Bytes of the regular files in a diffusers folder (two levels, links not followed)."""
    total, stack, seen = 0, [(folder, 0)], 0
    while stack and seen < 1000:
        directory, depth = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            seen += 1
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
            elif entry.is_dir(follow_symlinks=False) and depth < 2:
                stack.append((entry.path, depth + 1))
    return total


def scan(
    root: Path, arch_cache: dict[tuple[str, int, int], str] | None = None
) -> tuple[str, dict[str, list[ModelFile]]]:
    """``(layout, {category: [ModelFile, ...]})``; names unique within a category."""
    layout, folders = detect_layout(root)
    walker = _Scan(arch_cache if arch_cache is not None else {})
    found: dict[str, list[ModelFile]] = {}
    for category, folder in folders.items():
        items = walker.category(category, folder, _boundary(root, folder))
        items.sort(key=lambda m: (m.name, FORMAT_RANK.get(m.format, 9)))
        names: set[str] = set()
        for item in items:
            if item.name in names:  # x.safetensors and x.ckpt: the second keeps its suffix
                item.name += os.path.splitext(item.path)[1] if item.format != "diffusers" else "/"
            names.add(item.name)
        found[category] = sorted(items, key=lambda m: m.name.lower())
    return layout, found


def addnet_hash_file(
    path: str, stopping: threading.Event | None = None, identity: tuple[int, int] | None = None
) -> str | None:
    """The "AddNet" hash A1111 gives a ``.safetensors`` LoRA: the SHA-256 of the tensor
    data after the header, so that editing the metadata keeps the hash (Civitai matches
    LoRAs by it). None if ``stopping`` was set meanwhile."""
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        st = os.fstat(handle.fileno())
        if identity is not None and (st.st_dev, st.st_ino) != identity:
            raise ValueError("the file was replaced since it was listed")
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        handle.seek(8 + int.from_bytes(head, "little"))
        while chunk := handle.read(CHUNK):
            if stopping is not None and stopping.is_set():
                return None
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(
    path: str, stopping: threading.Event | None = None, identity: tuple[int, int] | None = None
) -> str | None:
    """The hex SHA-256 of a regular file, or None if ``stopping`` was set meanwhile.
    ``identity`` (device, inode) must match, so a file swapped for a link since it was
    listed is never read."""
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        st = os.fstat(handle.fileno())
        if identity is not None and (st.st_dev, st.st_ino) != identity:
            raise ValueError("the file was replaced since it was listed")
        while chunk := handle.read(CHUNK):
            if stopping is not None and stopping.is_set():
                return None
            digest.update(chunk)
    return digest.hexdigest()
