"""Workers: claim batches of compatible jobs and drive a backend, one worker per device; and
the supervisor that starts them and replaces one whose backend hangs.

A batch is the head of the queue plus later queued jobs that can share its forward passes
(the backend's :meth:`~imagineerd.backends.Backend.batch_key`). Each job keeps its own seed,
prompts, progress, output and metadata, and can be cancelled on its own: it ends at the next
step and the rest of the batch goes on. A batch that runs out of GPU memory is split in
halves and retried, and later batches of that size are capped, instead of failing its jobs.

With look-ahead (``performance.look_ahead``, on for GPUs) a worker claims its next batch
when the current batch's device work is all queued (at its last step, or when the backend
says: the diffusers backend once its decode is queued) and lets the backend prepare it (the
diffusers backend encodes its prompts) while the device works: the device goes from one
batch to the next without waiting for the store or the text encoders. Those jobs show as
running a moment early; a stop puts them back at the head of the queue, in order, and so
does the watchdog when their worker has not started them within ``AHEAD_HOLD_SECONDS``.

Workers know the daemon only through :class:`WorkerHost`: the few things a worker asks of
the rest of the program. Nothing here reaches into the daemon, and the daemon reads worker
state only through :meth:`Supervisor.states`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, Protocol

from PIL import Image

from .backends import Backend, BackendBase, StepCallback, calls_look_ahead
from .errors import BackendError, ImagineerdError, JobInterrupted, JobTimeout
from .jobs import CANCELLED, FAILED, Job, JobSpec

log = logging.getLogger(__name__)

#: The reason a shutdown gives when it stops a running job: the job goes back to the queue.
SHUTDOWN = "shutdown"

#: At most this many seconds apart, a batch's previews (each image's every few steps).
PREVIEW_INTERVAL = 0.25

#: A batch claimed ahead and not started after this many seconds goes back to the queue
#: (its worker is stuck): a decode takes a second or two, and other devices may be idle.
AHEAD_HOLD_SECONDS = 30.0

#: How a worker groups jobs before its backend is loaded (the same as the base backend's).
_DEFAULT_BACKEND = BackendBase()


class WorkerHost(Protocol):
    """What a worker needs from the program around it (the daemon implements it)."""

    stopping: threading.Event

    def load_backend(self, device: str | None) -> Backend:
        """Create the backend for ``device``; raises ``ImagineerdError`` with advice."""
        ...

    def job_timeout(self) -> float:
        """``performance.job_timeout`` now (0: no limit); read per batch, so it is live."""
        ...

    def claim_batch(
        self, limit: Callable[[JobSpec], int], key: Callable[[JobSpec], Hashable]
    ) -> list[Job]: ...
    def wait_for_work(self, timeout: float) -> None: ...
    def has_queued_jobs(self) -> bool: ...
    def job_started(self, job: Job) -> None: ...
    def report_progress(self, job_id: int, step: int, total: int) -> None: ...
    def preview_every(self) -> int:
        """``previews.every_steps`` now (0: no previews); read per batch, so it is live."""
        ...

    def report_preview(self, job_id: int, step: int, total: int, pixels: Any) -> None:
        """Publish a preview (``pixels.image()`` waits for it); must not block."""
        ...

    def interrupt_reason(self, job_id: int) -> str | None: ...
    def clear_interrupt(self, job_id: int) -> None: ...
    def job_finished(
        self,
        job: Job,
        status: str,
        *,
        duration_seconds: float | None = None,
        output_path: str | None = None,
        error: str | None = None,
    ) -> Job: ...
    def jobs_requeued(self, jobs: list[Job]) -> None:
        """Put running jobs back at the head of the queue, in their order (a clean stop)."""
        ...

    def save_later(
        self, job: Job, image: Image.Image, *, duration: float, model_label: str | None
    ) -> None:
        """Write the image off the worker thread, then finish the job."""
        ...


class Worker(threading.Thread):
    """Loads the backend once (eagerly, so the first job does not wait for it) and then runs
    batches in FIFO order until the host stops. A job's failure never stops the worker."""

    def __init__(
        self,
        host: WorkerHost,
        *,
        device: str | None = None,
        max_batch: int = 1,
        index: int = 0,
        look_ahead: bool = False,
    ) -> None:
        super().__init__(name=f"imagineerd-worker-{index}", daemon=True)
        self.host = host
        self.device = device
        self.max_batch = max_batch
        self.look_ahead = look_ahead
        #: The batch claimed ahead (see the module's docs), run next; guarded by the lock, as
        #: the supervisor takes it back from a worker it abandons.
        self._next: list[Job] = []
        self._next_since = 0.0
        self._next_lock = threading.Lock()
        #: Batches claimed ahead so far, and the seconds their claims and preparing took.
        self.looked_ahead = 0
        self.look_ahead_seconds = 0.0
        self._backend: Backend | None = None
        self.backend_state = "not loaded"
        self.backend_error: str | None = None
        # Batch size caps learnt from out-of-memory errors, per image size.
        self._caps: dict[tuple[int, int], int] = {}
        # What the supervisor looks at: the batch in hand and since when.
        self.active: dict[int, Job] = {}
        self.batch_started: float | None = None
        self.abandoned = False

    # -- backend -------------------------------------------------------------------------
    def backend(self) -> Backend:
        if self._backend is None:
            self.backend_state = "loading"
            try:
                self._backend = self.host.load_backend(self.device)
            except ImagineerdError as exc:
                self.backend_state, self.backend_error = "error", exc.message
                raise
            self.backend_state, self.backend_error = "ready", None
        return self._backend

    def state(self) -> dict[str, Any]:
        """This worker as ``/api/health`` shows it; with the backend's loaded models when it
        reports them (``status()``). A default model that cannot be loaded is an error even
        while jobs for other models run."""
        state: dict[str, Any] = {
            "device": self.device,
            "state": self.backend_state,
            "error": self.backend_error,
            "max_batch": self.max_batch,
        }
        status = getattr(self._backend, "status", None)
        if callable(status):
            try:
                models = dict(status())
            except Exception:  # a plugin's report must not break /api/health
                log.exception("%s: the backend's status() failed", self.name)
                models = {}
            default_error = models.pop("default_error", None)
            if default_error and self.backend_state == "ready":
                state["state"], state["error"] = "error", default_error
            if models:
                state["models"] = models
        return state

    def batch_key(self, spec: JobSpec) -> Hashable:
        return (self._backend or _DEFAULT_BACKEND).batch_key(spec)

    def batch_limit(self, spec: JobSpec) -> int:
        return min(self.max_batch, self._caps.get((spec.width, spec.height), self.max_batch))

    # -- loop ----------------------------------------------------------------------------
    def run(self) -> None:
        host = self.host
        try:
            self.backend()
        except Exception as exc:  # reported on each job until it loads
            log.error("backend not ready: %s", exc)
        while not host.stopping.is_set() and not self.abandoned:
            try:
                ahead = self.take_next()  # its start was announced when it was claimed
                batch = ahead or host.claim_batch(self.batch_limit, self.batch_key)
                if not batch:
                    if self._backend is not None and self._backend.idle(host.has_queued_jobs):
                        continue  # the backend used the quiet time (e.g. to compile)
                    host.wait_for_work(timeout=1.0)
                    continue
                self.process(batch, announced=bool(ahead))
            except Exception:
                # The worker must outlive anything (a locked database, a full disk): the
                # jobs it holds are finished or recovered; it tries again in a moment.
                log.exception("%s: unexpected error; carrying on", self.name)
                time.sleep(1.0)
        self.put_back(self.take_next())
        # Background threads of the backend (compile threads) stop with the worker rather
        # than being cut off at exit, perhaps in the middle of GPU work.
        close = getattr(self._backend, "close", None)
        if callable(close) and not self.abandoned:
            try:
                close()
            except Exception:
                log.exception("%s: closing the backend failed", self.name)

    # -- the batch claimed ahead ------------------------------------------------------------
    def take_next(self) -> list[Job]:
        """The batch claimed ahead, no longer this worker's to run (empty if none)."""
        with self._next_lock:
            batch, self._next = self._next, []
        return batch

    def claimed_ahead(self) -> list[Job]:
        """The batch claimed ahead, still this worker's to run next."""
        with self._next_lock:
            return list(self._next)

    def give_back_stale(self, max_age: float) -> None:
        """Put back a batch claimed ahead more than ``max_age`` seconds ago (the worker is
        stuck in its batch in hand): safe at any time, as the worker claims anew."""
        with self._next_lock:
            stale = bool(self._next) and time.monotonic() - self._next_since > max_age
            batch, self._next = (self._next, []) if stale else ([], self._next)
        if batch:
            log.warning(
                "%s: %d job(s) claimed ahead %.0f s ago have not started; putting them back",
                self.name,
                len(batch),
                max_age,
            )
            self.put_back(batch)

    def _claim_next(self) -> None:
        """Once the batch in hand has queued all its device work: claim the next batch and
        have the backend prepare it. Nothing here may fail the batch in hand; what is not
        prepared is done when the batch runs."""
        host = self.host
        if host.stopping.is_set() or self.abandoned:
            return
        began = time.monotonic()
        # The wait for the store is not the batch's time: while it lasts the supervisor sees
        # no batch in hand, and then the batch's clock resumes where it was.
        in_hand, self.batch_started = self.batch_started, None
        try:
            batch = host.claim_batch(self.batch_limit, self.batch_key)
        except Exception:
            log.exception("%s: claiming the next batch early failed", self.name)
            return
        finally:
            if in_hand is not None:
                self.batch_started = in_hand + time.monotonic() - began
        if not batch:
            return
        with self._next_lock:
            abandoned = self.abandoned  # then the supervisor no longer takes it back
            if not abandoned:
                self._next, self._next_since = batch, time.monotonic()
        if abandoned:
            self.put_back(batch)
            return
        prepare = getattr(self._backend, "prepare", None)
        if callable(prepare):
            try:
                prepare([job.spec for job in batch])
            except Exception:
                log.exception("%s: preparing the next batch failed", self.name)
        # Their start is announced now too: the job views (queue position, ETA) are made
        # while the device decodes, not between the batches (they are running already).
        try:
            for job in batch:
                host.job_started(job)
        except Exception:
            log.exception("%s: announcing the next batch failed", self.name)
        self.looked_ahead += 1
        self.look_ahead_seconds += time.monotonic() - began

    def put_back(self, jobs: list[Job], first: list[Job] | None = None) -> None:
        """Jobs claimed ahead that will not run here: back to the head of the queue, after
        ``first`` (running jobs a stop put back), in one go so the order is kept. One that
        was interrupted meanwhile ends cancelled instead: the interrupt was answered."""
        host = self.host
        stopped: list[Job] = []
        again = list(first or [])
        for job in jobs:
            (again if host.interrupt_reason(job.id) in (None, SHUTDOWN) else stopped).append(job)
        try:
            for job in stopped:
                host.job_finished(job, CANCELLED, duration_seconds=0.0)
            if again:
                host.jobs_requeued(again)
        except Exception:  # the store is away: the next start recovers them
            log.exception("%s: putting back %d job(s) failed", self.name, len(again))
        for job in jobs:
            host.clear_interrupt(job.id)

    # -- a batch -------------------------------------------------------------------------
    def process(self, jobs: list[Job], *, announced: bool = False) -> None:
        """Run one batch to the end: every job completes, fails, is cancelled or requeued.
        ``announced``: its start was published already (a batch claimed ahead)."""
        host = self.host
        if not announced:
            for job in jobs:
                host.job_started(job)
        active = self.active = {job.id: job for job in jobs}
        started = self.batch_started = time.monotonic()
        timeout = host.job_timeout()
        every = host.preview_every()
        job_of = {id(job.spec): job.id for job in jobs}
        last_preview = 0.0
        ahead = self.look_ahead  # once per batch, whatever the parts it runs in

        def elapsed() -> float:
            return round(time.monotonic() - started, 3)

        def send_previews(step: int, total: int, preview: Callable[[], list]) -> None:
            # Every ``every`` steps, at most a few a second per batch, never the last step
            # (the image itself comes next): the projection is queued behind the step on
            # the device, so this thread does not wait for it.
            now = time.monotonic()
            nonlocal last_preview
            if step % every or step >= total or now - last_preview < PREVIEW_INTERVAL:
                return
            last_preview = now
            for request, pixels in preview():
                job_id = job_of.get(id(request))
                if job_id in active:
                    host.report_preview(job_id, step, total, pixels)

        def make_on_step(ids: list[int], last: bool = True) -> StepCallback:
            def look_ahead() -> None:
                # Only the batch's last part claims (an out-of-memory split runs in parts).
                nonlocal ahead
                if ahead and last and any(job_id in active for job_id in ids):
                    ahead = False
                    self._claim_next()

            def on_step(step: int, total: int, preview: Callable[[], list] | None = None) -> None:
                if self.abandoned:  # the supervisor gave up on us: stop, touch nothing
                    raise JobInterrupted("abandoned")
                if preview is not None and every:
                    try:
                        send_previews(step, total, preview)
                    except Exception:  # a preview is a nicety: the image must still come
                        log.exception("%s: making a preview failed", self.name)
                for job_id in ids:
                    if job_id not in active:
                        continue
                    host.report_progress(job_id, step, total)
                    reason = host.interrupt_reason(job_id)
                    if reason == SHUTDOWN:
                        raise JobInterrupted(SHUTDOWN)
                    if reason is not None:  # this job alone stops; the batch goes on
                        host.job_finished(active.pop(job_id), CANCELLED, duration_seconds=elapsed())
                if not any(job_id in active for job_id in ids):
                    raise JobInterrupted("every job of the batch was interrupted")
                if timeout and time.monotonic() - started > timeout:
                    raise JobTimeout(
                        f"the job took longer than performance.job_timeout ({timeout:g} s) "
                        "and was stopped"
                    )
                if step >= total and not calls_look_ahead(self._backend):
                    look_ahead()  # what is left of this batch is its decode

            on_step.takes_preview = True  # type: ignore[attr-defined]
            on_step.look_ahead = look_ahead  # type: ignore[attr-defined]
            return on_step

        try:
            backend = self.backend()
            images = self._generate(backend, jobs, active, make_on_step)
            if self.abandoned:
                return  # its jobs were failed by the supervisor; a new worker runs the queue
        except JobInterrupted as exc:
            if self.abandoned:
                return
            if exc.message == SHUTDOWN:
                # With a batch claimed ahead behind them, in one go: the order is kept.
                self.put_back(self.take_next(), first=[j for j in jobs if j.id in active])
        except Exception as exc:
            if self.abandoned:
                return
            message = describe_failure(exc, self._backend)
            if not isinstance(exc, ImagineerdError):
                log.exception("batch of %d job(s) failed", len(active))
            for job in active.values():
                host.job_finished(job, FAILED, duration_seconds=elapsed(), error=message)
        else:
            duration = elapsed()
            for job_id, job in active.items():
                # PNG encoding and the disk write happen off this thread: the GPU goes on.
                host.save_later(
                    job, images[job_id], duration=duration, model_label=backend.model_label
                )
        finally:
            self.batch_started = None
            self.active = {}
            for job in jobs:
                host.clear_interrupt(job.id)

    def _generate(
        self,
        backend: Backend,
        jobs: list[Job],
        active: dict[int, Job],
        make_on_step: Callable[[list[int], bool], StepCallback],
        last: bool = True,
    ) -> dict[int, Image.Image]:
        live = [job for job in jobs if job.id in active]
        if not live:
            return {}
        try:
            images = backend.generate(
                [job.spec for job in live], make_on_step([j.id for j in live], last)
            )
        except Exception as exc:
            if not backend.is_out_of_memory(exc) or len(live) == 1:
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
            result = self._generate(backend, live[:half], active, make_on_step, last=False)
            result.update(self._generate(backend, live[half:], active, make_on_step, last))
            return result
        if len(images) != len(live):
            raise BackendError(
                f"the backend returned {len(images)} images for {len(live)} requests"
            )
        return {job.id: image for job, image in zip(live, images, strict=True)}


class Supervisor:
    """Starts one worker per device and watches them.

    A backend that reports steps is stopped at the next step once it passes
    ``performance.job_timeout``. One that stops calling back (a driver hang, a deadlock)
    cannot be interrupted from Python: past the limit plus a grace period its jobs fail, the
    stuck thread is abandoned and a new worker takes over the device's queue.
    """

    def __init__(
        self,
        host: WorkerHost,
        devices: list[str],
        max_batch: int | str,
        look_ahead: bool | str = False,
    ) -> None:
        self.host = host
        self.workers: list[Worker] = []
        for index, device in enumerate(devices):
            gpu = device.startswith("cuda")
            batch = max_batch
            if batch == "auto":
                # Batching pays where kernel launches dominate (GPUs), not on CPUs.
                batch = 8 if gpu else 1
            # Claiming ahead pays where the device runs while the CPU claims and encodes (a
            # GPU); on a CPU it only shows the next jobs as running for the whole decode.
            ahead = gpu if look_ahead == "auto" else bool(look_ahead)
            self.workers.append(
                Worker(host, device=device, max_batch=int(batch), index=index, look_ahead=ahead)
            )
        #: Workers given up on (their batch hung): each ends at its next step, if ever.
        self.abandoned: list[Worker] = []
        self._watchdog = threading.Thread(
            target=self._watch, name="imagineerd-watchdog", daemon=True
        )

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        self._watchdog.start()

    def join(self, timeout: float | None) -> None:
        for worker in self.workers:
            if worker.is_alive():
                worker.join(timeout)
            if worker.is_alive():
                log.error("%s did not stop within %ss", worker.name, timeout)
        # An abandoned worker stops at its next step: waited for too, as a thread left in
        # the backend's native code when the interpreter ends takes the process down with
        # it ("terminate called without an active exception").
        for worker in self.abandoned:
            if worker.is_alive():
                worker.join(timeout)
            if worker.is_alive():
                log.error("%s, abandoned, is still stuck in the backend", worker.name)

    def stuck(self) -> bool:
        """Whether a worker thread is still running after :meth:`join`."""
        return any(w.is_alive() for w in (*self.workers, *self.abandoned))

    @property
    def max_batch(self) -> int:
        return max((w.max_batch for w in self.workers), default=1)

    def states(self) -> list[dict[str, Any]]:
        """Each worker as ``/api/health`` shows it."""
        return [w.state() for w in self.workers]

    def _watch(self) -> None:
        while not self.host.stopping.wait(0.5):
            timeout = self.host.job_timeout()
            if timeout:
                self.check(timeout)
            for worker in self.workers:
                worker.give_back_stale(AHEAD_HOLD_SECONDS)

    def check(self, timeout: float) -> None:
        """Abandon and replace every worker whose batch is past ``timeout`` + grace."""
        grace = max(2.0, timeout * 0.25)
        for index, worker in enumerate(list(self.workers)):
            started = worker.batch_started
            if started is None or worker.abandoned:
                continue
            waited = time.monotonic() - started
            if waited < timeout + grace:
                continue
            worker.abandoned = True
            self.abandoned.append(worker)
            log.error("%s has not responded for %.0f s; restarting it", worker.name, waited)
            for job in list(worker.active.values()):
                self.host.job_finished(
                    job,
                    FAILED,
                    duration_seconds=round(waited, 3),
                    error=f"the backend stopped responding: no result after {waited:.0f} s "
                    f"(performance.job_timeout is {timeout:g} s); the job was stopped and "
                    "the worker restarted",
                )
            # Its batch claimed ahead never started: back to the head of the queue.
            worker.put_back(worker.take_next())
            replacement = Worker(
                self.host,
                device=worker.device,
                max_batch=worker.max_batch,
                index=len(self.workers),
                look_ahead=worker.look_ahead,
            )
            self.workers[index] = replacement
            replacement.start()


def free_gpu_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe_failure(exc: BaseException, backend: Backend | None = None) -> str:
    if isinstance(exc, ImagineerdError):
        return exc.message
    name = type(exc).__name__
    if (backend or _DEFAULT_BACKEND).is_out_of_memory(exc):
        return (
            f"out of memory on the GPU ({exc}); try a smaller width/height, or fewer "
            "steps at this size"
        )
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f" to {exc.filename}" if exc.filename else ""
        return f"could not write the image{where}: {exc.strerror}"
    text = str(exc) or name
    return f"{name}: {text}" if text != name else text
