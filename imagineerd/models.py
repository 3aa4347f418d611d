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

This module keeps the listing live (a watch on the folders, periodic rescans) and the hashes
computed; ``model_scan`` reads the folder and ``model_arch`` tells the architectures.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
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
from .model_arch import read_safetensors_header, tensor_shapes
from .model_scan import CATEGORIES, ModelFile, addnet_hash_file, detect_layout, scan, sha256_file
from .safefile import read_regular_file

log = logging.getLogger(__name__)

HASH_CACHE = "model-hashes.json"

#: Seconds between the rescans that a name not in the listing may cause.
MISS_RESCAN = 2.0


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
        #: What the workers have loaded now (names, paths or repo ids); set by the daemon
        #: once it runs workers. Until then only ``loaded`` (the default model) is marked.
        self.loaded_models: Callable[[], Iterable[str]] | None = None
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
        self._scanned_at = float("-inf")
        self._observer: Any = None
        self._watched: tuple[tuple[str, bool], ...] = ()
        self._threads = [
            threading.Thread(target=self._watch, name="imagineerd-models", daemon=True),
            threading.Thread(target=self._hash_loop, name="imagineerd-model-hashes", daemon=True),
        ]

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start watching and hashing; a second call (the daemon started again to add its
        workers) changes nothing."""
        for thread in self._threads:
            if thread.ident is None:
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
            self._scanned_at = time.monotonic()
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
        names = list(self.loaded_models()) if self.loaded_models else [self.loaded]
        loaded = {os.path.realpath(n) if os.path.exists(n) else n for n in names if n}
        with self._lock:
            files, layout = self._files, self.layout
            result: dict[str, Any] = {"layout": layout}
            for category in CATEGORIES:
                result[category] = [self._entry(item, loaded) for item in files.get(category, [])]
        return copy.deepcopy(result)

    def files(self, category: str) -> list[ModelFile]:
        """The listed files of one category (``checkpoints``, ``loras``, ...)."""
        if self._files is None:
            self.refresh()
        with self._lock:
            return list((self._files or {}).get(category, []))

    def find(self, category: str, name: str, *, rescan: bool = True) -> ModelFile | None:
        """The listed file ``name`` stands for; with ``rescan``, a name not listed is looked
        for once more after a rescan (it may have been copied in a moment ago)."""
        for attempt in range(2 if rescan else 1):
            for item in self.files(category):
                if item.name == name:
                    return item
            # At most one such rescan every few seconds: a stream of requests naming
            # models that do not exist must not turn into a stream of folder scans.
            if attempt == 0 and rescan and time.monotonic() - self._scanned_at > MISS_RESCAN:
                self.refresh()
            else:
                break
        return None

    def names(self, category: str) -> list[str]:
        return [item.name for item in self.files(category)]

    def sha256(self, item: ModelFile, *, compute: bool = True) -> str | None:
        """The file's full SHA-256 from the cache, or computed now (and cached) when asked:
        PNG metadata names the files it used by hash, and may not wait for the background
        thread. None for a diffusers folder."""
        if item.format == "diffusers":
            return None
        known = self._hashes.get(item.real)
        if known and (known.get("size"), known.get("mtime_ns")) == (item.size, item.mtime_ns):
            return str(known.get("sha256")) or None
        if not compute:
            return None
        self._hash(item)
        known = self._hashes.get(item.real) or {}
        return known.get("sha256")

    def lora_hash(self, item: ModelFile) -> str | None:
        """The hash A1111 names a LoRA by in ``Lora hashes``: the file's own
        ``sshs_model_hash`` metadata if it has one, else for ``.safetensors`` the SHA-256 of
        its tensor data (the "AddNet" hash), else the file's SHA-256. Cached as the file's
        hash is."""
        if item.format != "safetensors":
            return self.sha256(item)
        known = self._hashes.get(item.real) or {}
        if (known.get("size"), known.get("mtime_ns")) == (item.size, item.mtime_ns) and known.get(
            "addnet"
        ):
            return str(known["addnet"])
        try:
            metadata = tensor_shapes(read_safetensors_header(item.real))[1]
        except (OSError, ValueError):
            metadata = {}
        digest = metadata.get("sshs_model_hash") or addnet_hash_file(
            item.real, self._stopping, item.identity
        )
        if digest and (known.get("size"), known.get("mtime_ns")) == (item.size, item.mtime_ns):
            with self._lock:
                self._hashes[item.real] = {**known, "addnet": digest}
        return digest

    def checkpoint_names(self) -> list[str]:
        if self._files is None:
            self.refresh()
        with self._lock:
            return [item.name for item in (self._files or {}).get("checkpoints", [])]

    def _entry(self, item: ModelFile, loaded: set[str]) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": item.name,
            "arch": item.arch,
            "format": item.format,
            "size_bytes": item.size,
            "hash": self._short_hash(item),
        }
        if item.category == "checkpoints":
            entry["loaded"] = bool(loaded) and bool({item.real, item.name} & loaded)
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
