"""Writing finished images: off the worker thread, into outputs/, with their metadata.

PNG encoding and the disk write take long enough to matter next to a GPU step, so a worker
hands each image to a small pool of saver threads and starts its next batch at once.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from datetime import datetime
from pathlib import Path

from PIL import Image

from . import model_choice, outputs
from .config import Config
from .jobs import Job, iso
from .store import Fenced

log = logging.getLogger(__name__)

#: ``on_saved(job, duration, output_path, error)``: exactly one of path and error is set.
SavedCallback = Callable[[Job, float, "str | None", "BaseException | None"], None]


class ImageSaver:
    def __init__(
        self,
        config: Config,
        directory: Path,
        clock: Callable[[], datetime],
        on_saved: SavedCallback,
        choice: model_choice.ModelChoice | None = None,
        holds: Callable[[Job], bool] | None = None,
        index: Callable[[Path, Callable[[], Path]], Path] | None = None,
    ) -> None:
        self.config = config
        #: Writes each PNG through the gallery index (``GalleryIndex.write(folder, save)``),
        #: which lists it as soon as it is in place, before its job is reported finished: a
        #: client told of the job finds it in the gallery. None: a plain write.
        self.index = index
        #: Whether this process still holds the job (its lease on a shared queue): asked
        #: just before the image is published; None: always.
        self.holds = holds
        #: Names the model files of a job by hash in its PNG (None: plain metadata).
        self.choice = choice
        self.directory = directory
        self.clock = clock
        self.on_saved = on_saved
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="imagineerd-save")
        self._pending: set[Future] = set()
        self._lock = threading.Lock()

    def save_later(
        self, job: Job, image: Image.Image, *, duration: float, model_label: str | None
    ) -> None:
        def save() -> None:
            try:
                path = self.save(job, image, duration=duration, model_label=model_label)
            except Exception as exc:
                if not isinstance(exc, OSError | Fenced):
                    log.exception("job %s: writing its image failed", job.id)
                self.on_saved(job, duration, None, exc)
            else:
                self.on_saved(job, duration, path, None)

        future = self._pool.submit(save)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    def save(
        self, job: Job, image: Image.Image, *, duration: float, model_label: str | None
    ) -> str:
        """Write the job's PNG with both metadata chunks; return the path the API shows."""
        now = self.clock()
        model = self.config["model"]
        choice = self.choice
        files: dict = {}
        hashes: dict = {}
        name = job.spec.model or model["name"]
        if choice is not None:
            # Which embeddings a prompt used is known only to the backend that encoded it.
            used = list(image.info.get("imagineerd.embeddings") or [])
            files = choice.infotext_fields(job.spec, used)
            hashes = choice.hashes(job.spec, used)
            name = choice.record_name(job.spec)
            if model_label and choice.is_default(job.spec.model):
                files["Model"] = model_label  # a backend plugin's own name for its model
        text = outputs.job_metadata(
            job,
            model_label=model_label or model_choice.label(name),
            model_name=name,
            backend=model["backend"],
            completed_at=iso(now),
            duration=duration,
            files=files,
            hashes=hashes,
        )
        folder = self.directory
        if job.source == "inbox" and job.source_name and self.config["inbox"]["outputs_subfolder"]:
            folder = folder / outputs.slugify(Path(job.source_name).stem)
        name = outputs.output_name(job.id, job.spec.prompt, now)
        if self.holds is not None and not self.holds(job):
            raise Fenced(
                "this node lost the job's lease (another node runs it now); its image was "
                "not written"
            )

        def save() -> Path:
            return outputs.save_png(image, folder, name, text)

        path = save() if self.index is None else self.index(folder, save)
        return self.output_ref(path)

    def output_ref(self, path: Path) -> str:
        """``outputs/<name>.png`` (relative to the config folder) as the original API shows it."""
        base = self.config.base_dir
        try:
            if Path(path).resolve().is_relative_to(base):
                return Path(os.path.relpath(path, base)).as_posix()
        except ValueError:
            pass
        return str(path)

    def drain(self) -> None:
        """Wait until every image handed over is written and reported."""
        with self._lock:
            pending = list(self._pending)
        futures_wait(pending)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
