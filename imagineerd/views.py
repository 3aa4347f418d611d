"""How a job looks to clients: its record plus queue position, ETA and live progress.

Views are asked for far more often than jobs change (every status poll, every list, every
event), so the two costly parts are kept from being recomputed for nothing:

- The durations behind an ETA (the store reads its latest 200 finished jobs and parses
  their specs) are kept per job size for :attr:`JobViews.DURATIONS_SECONDS`: an estimate
  may count a job that finished within the last second or not; it is a mean of 20 anyway.
  Having no history yet is not kept, so the first finished job counts at once.
- A job's ``to_dict()`` is kept by id for the job list, and reused only while the record
  read from the store now is equal to the one it was made from, field for field: the list
  always shows what the store holds, only the dict is not built again.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

from .jobs import FINISHED, QUEUED, RUNNING, Job, JobSpec
from .store import Store


def progress_dict(step: int, total: int) -> dict[str, Any]:
    return {
        "step": step,
        "total": total,
        "percent": round(100.0 * step / total, 1) if total else 0.0,
    }


class _DictCache:
    """``job.to_dict()`` by job id, valid while the job record is unchanged. Bounded (the
    oldest entries go first); no lock: a list looks up a thousand jobs, and taking a lock
    for each, against every other request thread, cost more than building the dicts. Each
    step is one dict operation, atomic on its own, and a lost race costs one rebuild."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: dict[int, tuple[Job, dict[str, Any]]] = {}

    def get(self, job: Job) -> dict[str, Any]:
        """A shallow copy of ``job.to_dict()``: callers add their own top-level fields."""
        hit = self._items.get(job.id)
        if hit is not None and hit[0] == job:
            return dict(hit[1])
        body = job.to_dict()
        items = self._items
        items[job.id] = (job, body)
        while len(items) > self.size:
            try:
                items.pop(next(iter(items)), None)
            except (StopIteration, RuntimeError):  # emptied or changed by another thread
                break
        return dict(body)


#: What a running job's view shows of its latest ``job.preview`` event.
PREVIEW_KEYS = ("step", "total", "width", "height", "image")


class JobViews:
    """Builds the API's view of jobs. ``progress`` is the live step of each running job (a
    plain dict: the worker writes it every step and nothing there may slow a step);
    ``capacity()`` is ``(workers, images per batch)``, how fast the queue drains."""

    #: How long the durations behind ETAs are reused (a completed job forgets them at once:
    #: :meth:`forget_durations`).
    DURATIONS_SECONDS = 1.0
    #: Job dicts kept for the list: its 1,000 queued jobs and a page or two of history.
    DICT_CACHE_SIZE = 2048

    def __init__(
        self,
        store: Store,
        capacity: Callable[[], tuple[int, int]],
        *,
        clock: Callable[[], float] = time.monotonic,
        paused: Callable[[], bool] = lambda: False,
        output_file: Callable[[str], str] | None = None,
        preview: Callable[[int], dict[str, Any] | None] | None = None,
    ) -> None:
        self.store = store
        self.progress: dict[int, tuple[int, int]] = {}
        self._capacity = capacity
        self._paused = paused
        self._output_file = output_file
        self._preview = preview
        self._clock = clock
        # (width, height, steps) -> (read at, durations).
        self._durations: dict[tuple[int, int, int], tuple[float, list[float]]] = {}
        self._dicts = _DictCache(self.DICT_CACHE_SIZE)

    def view(self, job: Job) -> dict[str, Any]:
        position = self.store.queue_position(job) if job.status in (QUEUED, RUNNING) else -1
        return self._view(job, position)

    def views(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """:meth:`view` of many jobs (a burst just queued) from one look at the queue and
        at what runs, where one view a job would read the queue up to each of them."""
        if len(jobs) < 2:
            return [self.view(job) for job in jobs]
        positions = self.store.queue_positions(jobs)
        running, paused = self.store.running(), self._paused()
        return [
            self._view(job, position, running, paused)
            for job, position in zip(jobs, positions, strict=True)
        ]

    def _view(
        self,
        job: Job,
        position: int,
        running: list[Job] | None = None,
        paused: bool | None = None,
    ) -> dict[str, Any]:
        view = job.to_dict()
        if job.status in (QUEUED, RUNNING):
            view["queue_position"] = position
            view["estimated_time_remaining"] = self.estimate_remaining(
                job, position, running, paused=paused
            )
        self._add_progress(job, view)
        return view

    def _add_progress(self, job: Job, view: dict[str, Any]) -> None:
        """The live fields: progress, the latest live preview of a job running here, and the
        gallery's name of a finished job's image."""
        if job.output_path and self._output_file is not None:
            # As /api/outputs/<file> serves it (output_path is relative to the config).
            view["output_file"] = self._output_file(job.output_path)
        if job.status == RUNNING:
            step, total = self.progress.get(job.id, (0, job.spec.steps))
            view["progress"] = progress_dict(step, total)
            preview = self._preview(job.id) if self._preview is not None else None
            if preview is not None:
                view["preview"] = {k: preview[k] for k in PREVIEW_KEYS}
        elif job.progress_total:
            view["progress"] = progress_dict(job.progress_step, job.progress_total)

    def forget_durations(self) -> None:
        """A job completed (here or on another node): ETAs read the durations anew."""
        self._durations.clear()

    def recent_durations(self, spec: JobSpec) -> list[float]:
        """``store.recent_durations(spec)``, reused for up to :attr:`DURATIONS_SECONDS`.
        No history yet is not kept: the first finished job counts at once."""
        key = (spec.width, spec.height, spec.steps)
        now = self._clock()
        hit = self._durations.get(key)
        if hit is not None and now - hit[0] < self.DURATIONS_SECONDS:
            return hit[1]
        durations = self.store.recent_durations(spec)
        if durations:
            self._durations[key] = (now, durations)
        return durations

    def estimate_remaining(
        self,
        job: Job,
        position: int,
        running: list[Job] | None = None,
        *,
        paused: bool | None = None,
    ) -> float | None:
        """Seconds until ``job`` completes, from the mean duration of recent similar jobs (a
        job's duration is its batch's): what is left of the running batch that ends first,
        plus the batches needed for the jobs up to this one, shared among the workers.
        ``running``: the running jobs, if read already. None (not known) for a queued job
        while the queue is paused: it waits for someone to resume it."""
        if job.status == QUEUED and (self._paused() if paused is None else paused):
            return None
        durations = self.recent_durations(job.spec)
        if not durations:
            return None
        mean = statistics.fmean(durations)
        if job.status == RUNNING:
            return round(mean * self._fraction_left(job), 1)
        if running is None:
            running = self.store.running()
        current = min((self._fraction_left(r) for r in running), default=0.0)
        workers, per_batch = self._capacity()
        batches = math.ceil(position / per_batch) / max(workers, 1)
        return round(mean * (current + batches), 1)

    def _fraction_left(self, job: Job) -> float:
        step, total = self.progress.get(job.id, (0, job.spec.steps))
        return 1 - step / max(total, 1)

    def _listed(self, job: Job) -> dict[str, Any]:
        """A finished job as the list shows it (the view of a finished job, from the cache)."""
        view = self._dicts.get(job)
        self._add_progress(job, view)
        return view

    def overview(self, *, limit: int, before: int | None, queued_limit: int) -> dict[str, Any]:
        """``GET /api/jobs``: running, queued and a page of history, from one snapshot."""
        running, queued, history = self.store.overview(
            queued_limit=queued_limit, history_limit=limit, before=before
        )
        running_views = [self.view(j) for j in running]
        listed = self._dicts.get
        return {
            # The original API has one running job; with batching or several GPUs there can
            # be more, so ``running`` lists them all and ``current`` stays the first.
            "current": running_views[0] if running_views else None,
            "running": running_views,
            # Positions follow from the order; asking the store per job would be O(n^2).
            "queued": [dict(listed(j), queue_position=i + 1) for i, j in enumerate(queued)],
            "history": [self._listed(j) if j.status in FINISHED else self.view(j) for j in history],
        }
