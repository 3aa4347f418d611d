"""How a job looks to clients: its record plus queue position, ETA and live progress."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from .jobs import QUEUED, RUNNING, Job
from .store import Store


def progress_dict(step: int, total: int) -> dict[str, Any]:
    return {
        "step": step,
        "total": total,
        "percent": round(100.0 * step / total, 1) if total else 0.0,
    }


class JobViews:
    """Builds the API's view of jobs. ``progress`` is the live step of each running job (a
    plain dict: the worker writes it every step and nothing there may slow a step);
    ``capacity()`` is ``(workers, images per batch)``, how fast the queue drains."""

    def __init__(self, store: Store, capacity: Callable[[], tuple[int, int]]) -> None:
        self.store = store
        self.progress: dict[int, tuple[int, int]] = {}
        self._capacity = capacity

    def view(self, job: Job) -> dict[str, Any]:
        view = job.to_dict()
        if job.status in (QUEUED, RUNNING):
            view["queue_position"] = self.store.queue_position(job)
            view["estimated_time_remaining"] = self.estimate_remaining(job, view["queue_position"])
        if job.status == RUNNING:
            step, total = self.progress.get(job.id, (0, job.spec.steps))
            view["progress"] = progress_dict(step, total)
        elif job.progress_total:
            view["progress"] = progress_dict(job.progress_step, job.progress_total)
        return view

    def estimate_remaining(self, job: Job, position: int) -> float | None:
        """Seconds until ``job`` completes, from the mean duration of recent similar jobs (a
        job's duration is its batch's): what is left of the running batch that ends first,
        plus the batches needed for the jobs up to this one, shared among the workers."""
        durations = self.store.recent_durations(job.spec)
        if not durations:
            return None
        mean = statistics.fmean(durations)
        if job.status == RUNNING:
            return round(mean * self._fraction_left(job), 1)
        running = self.store.running()
        current = min((self._fraction_left(r) for r in running), default=0.0)
        workers, per_batch = self._capacity()
        batches = math.ceil(position / per_batch) / max(workers, 1)
        return round(mean * (current + batches), 1)

    def _fraction_left(self, job: Job) -> float:
        step, total = self.progress.get(job.id, (0, job.spec.steps))
        return 1 - step / max(total, 1)

    def overview(self, *, limit: int, before: int | None, queued_limit: int) -> dict[str, Any]:
        """``GET /api/jobs``: running, queued and a page of history, from one snapshot."""
        running, queued, history = self.store.overview(
            queued_limit=queued_limit, history_limit=limit, before=before
        )
        running_views = [self.view(j) for j in running]
        return {
            # The original API has one running job; with batching or several GPUs there can
            # be more, so ``running`` lists them all and ``current`` stays the first.
            "current": running_views[0] if running_views else None,
            "running": running_views,
            # Positions follow from the order; asking the store per job would be O(n^2).
            "queued": [dict(j.to_dict(), queue_position=i + 1) for i, j in enumerate(queued)],
            "history": [self.view(j) for j in history],
        }
