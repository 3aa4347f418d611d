"""The worker: claims batches of compatible jobs and drives a backend, one worker per device.

A batch is the head of the queue plus later queued jobs that can share its forward passes
(same size, steps, scheduler and guidance: see :func:`batch_key`). Each job keeps its own
seed, prompts, progress, output and metadata, and can be cancelled on its own: it ends at the
next step and the rest of the batch goes on. A batch that runs out of GPU memory is split in
halves and retried, and later batches of that size are capped, instead of failing its jobs.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from PIL import Image

from .backends import Backend
from .errors import BackendError, ImagineerdError, JobInterrupted, JobTimeout
from .jobs import CANCELLED, FAILED, Job, JobSpec

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger(__name__)

#: The reason a shutdown gives when it stops a running job: the job goes back to the queue.
SHUTDOWN = "shutdown"


def batch_key(spec: JobSpec) -> Hashable:
    """Jobs with equal keys can run as one batch (one pipeline call)."""
    return (spec.width, spec.height, spec.steps, spec.scheduler, spec.guidance_scale)


def is_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return "out of memory" in str(exc).lower()


class Worker(threading.Thread):
    """Loads the backend once (eagerly, so the first job does not wait for it) and then runs
    batches in FIFO order until the daemon stops. A job's failure never stops the worker."""

    def __init__(
        self, daemon: Daemon, *, device: str | None = None, max_batch: int = 1, index: int = 0
    ) -> None:
        super().__init__(name=f"imagineerd-worker-{index}", daemon=True)
        self.daemon_ref = daemon
        self.device = device
        self.max_batch = max_batch
        self._backend: Backend | None = None
        self.backend_state = "not loaded"
        self.backend_error: str | None = None
        # Batch size caps learnt from out-of-memory errors, per image size.
        self._caps: dict[tuple[int, int], int] = {}
        # What the daemon's watchdog looks at: the batch in hand and since when.
        self.active: dict[int, Job] = {}
        self.batch_started: float | None = None
        self.abandoned = False

    # -- backend -------------------------------------------------------------------------
    def backend(self) -> Backend:
        if self._backend is None:
            settings = self.daemon_ref.backend_settings()
            if self.device is not None:
                settings["device"] = self.device
            self.backend_state = "loading"
            try:
                self._backend = self.daemon_ref.backend_factory(settings)
            except ImagineerdError as exc:
                self.backend_state, self.backend_error = "error", exc.message
                raise
            except Exception as exc:
                self.backend_state, self.backend_error = "error", str(exc)
                log.exception("backend failed to load")
                raise BackendError(
                    f"the {settings['backend']} backend failed to load: {exc}"
                ) from exc
            self.backend_state, self.backend_error = "ready", None
        return self._backend

    @property
    def model_label(self) -> str:
        label = getattr(self._backend, "model_label", None)
        return label or self.daemon_ref.config["model"]["name"]

    def batch_limit(self, spec: JobSpec) -> int:
        return min(self.max_batch, self._caps.get((spec.width, spec.height), self.max_batch))

    # -- loop ----------------------------------------------------------------------------
    def run(self) -> None:
        d = self.daemon_ref
        try:
            self.backend()
        except Exception as exc:  # reported on each job until it loads
            log.error("backend not ready: %s", exc)
        while not d.stopping.is_set() and not self.abandoned:
            try:
                batch = d.store.claim_batch(
                    started_at=d.now_iso(), limit=self.batch_limit, key=batch_key
                )
                if not batch:
                    idle = getattr(self._backend, "idle", None)
                    if idle is not None and idle(d.has_queued_jobs):
                        continue  # the backend used the quiet time (e.g. to compile)
                    d.wait_for_work(timeout=1.0)
                    continue
                self.process(batch)
            except Exception:
                # The worker must outlive anything (a locked database, a full disk): the
                # jobs it holds are finished or recovered; it tries again in a moment.
                log.exception("%s: unexpected error; carrying on", self.name)
                time.sleep(1.0)

    def process(self, jobs: list[Job]) -> None:
        """Run one batch to the end: every job completes, fails, is cancelled or requeued."""
        d = self.daemon_ref
        for job in jobs:
            d.job_started(job)
        active = self.active = {job.id: job for job in jobs}
        started = self.batch_started = time.monotonic()
        timeout = d.config["performance"]["job_timeout"]

        def elapsed() -> float:
            return round(time.monotonic() - started, 3)

        def make_on_step(ids: list[int]) -> Callable[[int, int], None]:
            def on_step(step: int, total: int) -> None:
                if self.abandoned:  # the watchdog gave up on us: stop, touch nothing
                    raise JobInterrupted("abandoned")
                for job_id in ids:
                    if job_id not in active:
                        continue
                    d.report_progress(job_id, step, total)
                    reason = d.interrupt_reason(job_id)
                    if reason == SHUTDOWN:
                        raise JobInterrupted(SHUTDOWN)
                    if reason is not None:  # this job alone stops; the batch goes on
                        d.job_finished(active.pop(job_id), CANCELLED, duration_seconds=elapsed())
                if not any(job_id in active for job_id in ids):
                    raise JobInterrupted("every job of the batch was interrupted")
                if timeout and time.monotonic() - started > timeout:
                    raise JobTimeout(
                        f"the job took longer than performance.job_timeout ({timeout:g} s) "
                        "and was stopped"
                    )

            return on_step

        try:
            backend = self.backend()
            images = self._generate(backend, jobs, active, make_on_step)
            if self.abandoned:
                return  # its jobs were failed by the watchdog; a new worker runs the queue
        except JobInterrupted as exc:
            if self.abandoned:
                return
            if exc.message == SHUTDOWN:
                for job in active.values():
                    d.job_requeued(job)
        except Exception as exc:
            if self.abandoned:
                return
            message = describe_failure(exc)
            if not isinstance(exc, ImagineerdError):
                log.exception("batch of %d job(s) failed", len(active))
            for job in active.values():
                d.job_finished(job, FAILED, duration_seconds=elapsed(), error=message)
        else:
            duration = elapsed()
            for job_id, job in active.items():
                # PNG encoding and the disk write happen off this thread: the GPU goes on.
                d.save_later(job, images[job_id], duration=duration, model_label=self.model_label)
        finally:
            self.batch_started = None
            self.active = {}
            for job in jobs:
                d.clear_interrupt(job.id)

    def _generate(
        self,
        backend: Backend,
        jobs: list[Job],
        active: dict[int, Job],
        make_on_step: Callable[[list[int]], Callable[[int, int], None]],
    ) -> dict[int, Image.Image]:
        live = [job for job in jobs if job.id in active]
        if not live:
            return {}
        try:
            images = backend.generate(
                [job.spec for job in live], make_on_step([j.id for j in live])
            )
        except Exception as exc:
            if not is_out_of_memory(exc) or len(live) == 1:
                raise
            half = len(live) // 2
            spec = live[0].spec
            self._caps[(spec.width, spec.height)] = half
            log.warning(
                "out of memory with %d images of %dx%d; retrying as %d + %d (later batches of "
                "this size are capped at %d)",
                len(live),
                spec.width,
                spec.height,
                half,
                len(live) - half,
                half,
            )
            free_gpu_memory()
            result = self._generate(backend, live[:half], active, make_on_step)
            result.update(self._generate(backend, live[half:], active, make_on_step))
            return result
        if len(images) != len(live):
            raise BackendError(
                f"the backend returned {len(images)} images for {len(live)} requests"
            )
        return {job.id: image for job, image in zip(live, images, strict=True)}


def free_gpu_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, ImagineerdError):
        return exc.message
    name = type(exc).__name__
    if is_out_of_memory(exc):
        return (
            f"out of memory on the GPU ({exc}); try a smaller width/height, or fewer "
            "steps at this size"
        )
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f" to {exc.filename}" if exc.filename else ""
        return f"could not write the image{where}: {exc.strerror}"
    text = str(exc) or name
    return f"{name}: {text}" if text != name else text
