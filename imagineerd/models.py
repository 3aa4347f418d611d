"""The user's own models: what lies in ``paths.models``, listed without loading any weights.

People keep community models in the folder layout of AUTOMATIC1111's webui or ComfyUI, so we
read those as they are (and our own, which is ComfyUI's ``models/`` folder) rather than ask
for a copy. Each file is described from what can be read safely and quickly: the JSON header
of a ``.safetensors`` file tells the architecture from tensor names and shapes; a ``.ckpt``
or ``.pt`` is a pickle, which runs code when loaded, so it is listed but never opened. The
A1111 short hash (first 10 hex digits of the file's SHA-256) takes minutes for large files,
so a background thread computes it and caches it under ``paths.state``.

The folder may hold anything anyone put there: links that leave it are not followed, FIFOs
and devices are skipped, depth and entry count are bounded, and one bad file only loses its
own entry (its arch is ``unknown`` when its header cannot be read).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from .fsutil import atomic_write_text
from .safefile import open_regular, read_regular_file

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
#: Real headers are a few MB at most; a bigger one is a broken or hostile file.
MAX_HEADER_BYTES = 100 * 1024 * 1024
HASH_CACHE = "model-hashes.json"
CHUNK = 1 << 20

SD15_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CROSS_ATTENTION_ARCH = {768: "sd15", 1024: "sd2", 2048: "sdxl"}


# -- layouts -------------------------------------------------------------------------------
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


# -- architecture --------------------------------------------------------------------------
def read_safetensors_header(path: str, expect: os.stat_result | None = None) -> dict[str, Any]:
    """The JSON header of a .safetensors file: 8 bytes little-endian length, then JSON. Parsed
    by hand (the format is that simple) so that nothing maps or reads the weights and the
    size is bounded before anything is read. Raises ``ValueError``/``OSError`` if malformed."""
    with open_regular(path) as handle:
        st = os.fstat(handle.fileno())
        if expect is not None and (st.st_dev, st.st_ino) != (expect.st_dev, expect.st_ino):
            raise ValueError("the file was replaced while it was being listed")
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, st.st_size - 8):
            raise ValueError(f"header length {length} is impossible")
        raw = handle.read(length)
    if len(raw) != length:
        raise ValueError("truncated header")
    header = json.loads(raw.decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header


def _shapes(header: dict[str, Any]) -> tuple[dict[str, list[int] | None], dict[str, str]]:
    shapes: dict[str, list[int] | None] = {}
    for key, value in header.items():
        if key == "__metadata__":
            continue
        shape = value.get("shape") if isinstance(value, dict) else None
        ok = isinstance(shape, list) and all(isinstance(n, int) for n in shape)
        shapes[key] = shape if ok else None
    meta = header.get("__metadata__")
    metadata = (
        {k: v for k, v in meta.items() if isinstance(v, str)} if isinstance(meta, dict) else {}
    )
    return shapes, metadata


def _arch_from_metadata(metadata: dict[str, str]) -> str:
    """kohya's ``ss_base_model_version`` or the SAI model spec's architecture, if present."""
    text = metadata.get("modelspec.architecture", "") + metadata.get("ss_base_model_version", "")
    text = text.lower()
    if "xl" in text:
        return "sdxl"
    if "v2" in text or "sd_2" in text:
        return "sd2"
    if "v1" in text:
        return "sd15"
    return "unknown"


def checkpoint_arch(shapes: dict[str, list[int] | None], metadata: dict[str, str]) -> str:
    if any(
        k.startswith(("conditioner.embedders.1.", "model.diffusion_model.label_emb"))
        for k in shapes
    ):
        return "sdxl"
    width = shapes.get(SD15_KEY)
    if width and len(width) == 2 and width[1] in CROSS_ATTENTION_ARCH:
        return CROSS_ATTENTION_ARCH[width[1]]
    if any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        return "sd15"
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return "sd2"  # OpenCLIP ViT-H text encoder
    return _arch_from_metadata(metadata)


def lora_arch(shapes: dict[str, list[int] | None], metadata: dict[str, str]) -> str:
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in shapes):
        return "sdxl"
    for key, shape in shapes.items():
        # The down projection of a cross-attention key takes the text encoder's width.
        cross_key = "attn2" in key and "to_k" in key and ("down" in key or "lora_A" in key)
        if cross_key and shape and len(shape) == 2 and shape[1] in CROSS_ATTENTION_ARCH:
            return CROSS_ATTENTION_ARCH[shape[1]]
    return _arch_from_metadata(metadata)


def embedding_arch(shapes: dict[str, list[int] | None], metadata: dict[str, str]) -> str:
    if "clip_g" in shapes:
        return "sdxl"
    shape = shapes.get("emb_params")
    if shape and len(shape) == 2 and shape[1] in (768, 1024):
        return CROSS_ATTENTION_ARCH[shape[1]]
    return _arch_from_metadata(metadata)


ARCH_FROM_HEADER = {
    "checkpoints": checkpoint_arch,
    "loras": lora_arch,
    "embeddings": embedding_arch,
    # An SD1.5 and an SDXL VAE have the same tensors: only metadata can tell them apart.
    "vaes": lambda shapes, metadata: _arch_from_metadata(metadata),
}


def diffusers_arch(folder: str) -> str:
    """From model_index.json's pipeline class, and for SD1 vs SD2 the UNet's text width."""
    index = json.loads(read_regular_file(os.path.join(folder, "model_index.json"), 1 << 20))
    pipeline = index.get("_class_name", "") if isinstance(index, dict) else ""
    if not isinstance(pipeline, str) or not pipeline.startswith("StableDiffusion"):
        return "unknown"
    if "XL" in pipeline:
        return "sdxl"
    try:
        unet = json.loads(read_regular_file(os.path.join(folder, "unet", "config.json"), 1 << 20))
        width = unet.get("cross_attention_dim") if isinstance(unet, dict) else None
    except (OSError, ValueError):
        width = None
    return "sd2" if width == 1024 else "sd15"


# -- scanning ------------------------------------------------------------------------------
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
        try:
            name.encode("utf-8")  # a name that is not UTF-8 could not be shown or chosen
        except UnicodeEncodeError:
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
                shapes, metadata = _shapes(read_safetensors_header(real, st))
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


# -- the live library ----------------------------------------------------------------------
class _Handler(FileSystemEventHandler):
    #: Only changes; our own reads (headers, hashing) raise open/close events too.
    CHANGES = frozenset(
        {
            EVENT_TYPE_CREATED,
            EVENT_TYPE_DELETED,
            EVENT_TYPE_MODIFIED,
            EVENT_TYPE_MOVED,
            EVENT_TYPE_CLOSED,
        }
    )

    def __init__(self, library: ModelLibrary) -> None:
        self.library = library

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in self.CHANGES:
            self.library.changed()


class ModelLibrary:
    """The listing of ``root``, kept current: rescanned ``debounce`` seconds after the folder
    last changed, every ``rescan_seconds`` (inotify can drop events), and on :meth:`refresh`;
    hashes computed by a second thread and cached in ``state_dir/model-hashes.json``.

    ``loaded`` is the path or name of the model the daemon runs now."""

    def __init__(
        self,
        root: Path,
        state_dir: Path,
        *,
        loaded: str = "",
        debounce: float = 1.0,
        rescan_seconds: float = 300.0,
    ) -> None:
        self.root = Path(root)
        self.cache_path = Path(state_dir) / HASH_CACHE
        self.loaded = os.path.realpath(loaded) if loaded and os.path.exists(loaded) else loaded
        self.debounce = debounce
        self.rescan_seconds = rescan_seconds
        self.layout = "own"
        self.hashes_computed = 0
        self._files: dict[str, list[ModelFile]] | None = None
        self._arch_cache: dict[tuple[str, int, int], str] = {}
        self._hashes = self._load_hashes()
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._hash_wake = threading.Event()
        self._changed_at: float | None = None
        self._observer: Any = None
        self._watched: tuple[tuple[str, bool], ...] = ()
        self._threads = [
            threading.Thread(target=self._watch, name="imagineerd-models", daemon=True),
            threading.Thread(target=self._hash_loop, name="imagineerd-model-hashes", daemon=True),
        ]

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._hash_wake.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(10)
        # After the watcher thread ended: it may have been replacing the observer.
        self._stop_observer()

    # -- listing -------------------------------------------------------------------------
    def refresh(self) -> dict[str, Any]:
        """Rescan now; the new listing."""
        with self._scan_lock:
            layout, files = scan(self.root, self._arch_cache)
            # Forget the architectures of files gone or changed, so the cache cannot grow.
            live = {(m.real, m.size, m.mtime_ns) for items in files.values() for m in items}
            self._arch_cache = {k: v for k, v in self._arch_cache.items() if k in live}
            with self._lock:
                self.layout, self._files = layout, files
            self._hash_wake.set()
        return self.listing()

    def listing(self) -> dict[str, Any]:
        """``{layout, checkpoints, loras, embeddings, vaes}``: entries as the API shows them."""
        if self._files is None:
            return self.refresh()
        with self._lock:
            files, layout = self._files, self.layout
            result: dict[str, Any] = {"layout": layout}
            for category in CATEGORIES:
                result[category] = [self._entry(item) for item in files.get(category, [])]
        return copy.deepcopy(result)

    def checkpoint_names(self) -> list[str]:
        return [entry["name"] for entry in self.listing()["checkpoints"]]

    def _entry(self, item: ModelFile) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": item.name,
            "arch": item.arch,
            "format": item.format,
            "size_bytes": item.size,
            "hash": self._short_hash(item),
        }
        if item.category == "checkpoints":
            entry["loaded"] = bool(self.loaded) and self.loaded in (item.real, item.name)
        return entry

    def _short_hash(self, item: ModelFile) -> str | None:
        known = self._hashes.get(item.real)
        if item.format == "diffusers" or known is None:
            return None
        if (known.get("size"), known.get("mtime_ns")) != (item.size, item.mtime_ns):
            return None
        return str(known.get("sha256", ""))[:10] or None

    # -- watching ------------------------------------------------------------------------
    def changed(self) -> None:
        self._changed_at = time.monotonic()
        self._wake.set()

    def _watch(self) -> None:
        next_rescan = 0.0  # the first pass scans at once
        while not self._stopping.is_set():
            try:
                changed_at = self._changed_at
                now = time.monotonic()
                if changed_at is not None and now - changed_at >= self.debounce:
                    self._changed_at = None
                    next_rescan = 0.0
                if now >= next_rescan:
                    self.refresh()
                    if self._update_observer():
                        # What was made between that scan and the new watch raised no event.
                        self.refresh()
                    next_rescan = time.monotonic() + self.rescan_seconds
            except Exception:  # the watcher outlives anything one pass can raise
                log.exception("models: rescanning %s failed", self.root)
                next_rescan = time.monotonic() + self.rescan_seconds
            self._wake.wait(self.debounce / 2 if self._changed_at is not None else 5.0)
            self._wake.clear()

    def _update_observer(self) -> bool:
        """Watch the folders listed from (recursively) and the layout's top folders (not
        recursively: an A1111 root holds outputs/ and a venv we have no business watching).
        True when a new watch started."""
        _, folders = detect_layout(self.root)
        wanted = [(str(self.root), False), (str(self.root / "models"), False)]
        wanted += [(str(folder), True) for folder in folders.values()]
        present = tuple((p, r) for p, r in wanted if os.path.isdir(p))
        alive = self._observer is not None and self._observer.is_alive()
        if present == self._watched and alive:
            return False
        self._stop_observer()
        if not present or self._stopping.is_set():
            return False
        observer = Observer()
        for path, recursive in present:
            observer.schedule(_Handler(self), path, recursive=recursive)
        observer.start()
        self._observer, self._watched = observer, present
        return True

    def _stop_observer(self) -> None:
        observer, self._observer, self._watched = self._observer, None, ()
        if observer is not None:
            observer.stop()
            observer.join(10)

    # -- hashing -------------------------------------------------------------------------
    def _load_hashes(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(read_regular_file(self.cache_path, 64 << 20))
            files = data.get("files") if isinstance(data, dict) else None
            return (
                {k: v for k, v in files.items() if isinstance(v, dict)}
                if isinstance(files, dict)
                else {}
            )
        except FileNotFoundError:
            return {}
        except Exception as exc:  # a damaged cache only costs the time to hash again
            log.warning("models: ignoring the hash cache %s: %s", self.cache_path, exc)
            return {}

    def _pending(self) -> list[ModelFile]:
        with self._lock:
            files = [item for items in (self._files or {}).values() for item in items]
        return [m for m in files if m.format != "diffusers" and self._short_hash(m) is None]

    def _hash_loop(self) -> None:
        while not self._stopping.is_set():
            self._hash_wake.wait()
            self._hash_wake.clear()
            for item in self._pending():
                if self._stopping.is_set():
                    return
                try:
                    self._hash(item)
                except Exception as exc:
                    log.warning("models: cannot hash %r: %s", item.path, exc)

    def _hash(self, item: ModelFile) -> None:
        digest = sha256_file(item.real, self._stopping, item.identity)
        st = os.stat(item.real)
        if digest is None or (st.st_size, st.st_mtime_ns) != (item.size, item.mtime_ns):
            return  # stopping, or changed while hashed: the rescan brings it back
        self.hashes_computed += 1
        with self._lock:
            self._hashes[item.real] = {
                "size": item.size,
                "mtime_ns": item.mtime_ns,
                "sha256": digest,
            }
            listed = {m.real for items in (self._files or {}).values() for m in items}
            # Forget files no longer listed, so the cache stays the size of the folder.
            self._hashes = {k: v for k, v in self._hashes.items() if k in listed}
            text = json.dumps({"version": 1, "files": self._hashes}, indent=1, sort_keys=True)
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.cache_path, text)
