"""The worker: claims jobs from the store and drives a backend, one device per worker."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from .backends import Backend, GenerationRequest
from .errors import BackendError, ImagineerdError, JobInterrupted
from .jobs import CANCELLED, COMPLETED, FAILED, Job

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger(__name__)

#: The reason a shutdown gives when it stops a running job: the job goes back to the queue.
SHUTDOWN = "shutdown"


class Worker(threading.Thread):
    """Loads the backend once (eagerly, so the first job does not wait for it) and then runs
    jobs in FIFO order until the daemon stops. A job's failure never stops the worker."""

    def __init__(self, daemon: Daemon, *, device: str | None = None, index: int = 0) -> None:
        super().__init__(name=f"imagineerd-worker-{index}", daemon=True)
        self.daemon_ref = daemon
        self.device = device
        self._backend: Backend | None = None
        self.backend_state = "not loaded"
        self.backend_error: str | None = None

    # -- backend -------------------------------------------------------------------------
    def backend(self) -> Backend:
        if self._backend is None:
            settings = self.daemon_ref.config.model_settings()
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
        return (
            getattr(self._backend, "model_label", None) or self.daemon_ref.config["model"]["name"]
        )

    # -- loop ----------------------------------------------------------------------------
    def run(self) -> None:
        d = self.daemon_ref
        try:
            self.backend()
        except Exception as exc:  # reported on each job until it loads
            log.error("backend not ready: %s", exc)
        while not d.stopping.is_set():
            job = d.store.claim_next(started_at=d.now_iso())
            if job is None:
                d.wait_for_work(timeout=1.0)
                continue
            self.process(job)

    def process(self, job: Job) -> None:
        d = self.daemon_ref
        d.job_started(job)
        started = time.monotonic()

        def on_step(step: int, total: int) -> None:
            d.report_progress(job.id, step, total)
            reason = d.interrupt_reason(job.id)
            if reason is not None:
                raise JobInterrupted(reason)

        try:
            backend = self.backend()
            spec = job.spec
            request = GenerationRequest(
                prompt=spec.prompt,
                negative_prompt=spec.negative_prompt,
                seed=spec.seed,
                steps=spec.steps,
                width=spec.width,
                height=spec.height,
                guidance_scale=spec.guidance_scale,
                scheduler=spec.scheduler,
            )
            images = backend.generate([request], on_step)
            if len(images) != 1:
                raise BackendError(f"the backend returned {len(images)} images for 1 request")
            duration = round(time.monotonic() - started, 3)
            output = d.save_output(job, images[0], duration=duration, model_label=self.model_label)
            d.job_finished(job, COMPLETED, duration_seconds=duration, output_path=output)
        except JobInterrupted as exc:
            if exc.message == SHUTDOWN:
                d.job_requeued(job)
            else:
                d.job_finished(
                    job,
                    CANCELLED,
                    duration_seconds=round(time.monotonic() - started, 3),
                    error=None,
                )
        except Exception as exc:
            message = _describe_failure(exc)
            if not isinstance(exc, ImagineerdError):
                log.exception("job %s failed", job.id)
            d.job_finished(
                job, FAILED, duration_seconds=round(time.monotonic() - started, 3), error=message
            )
        finally:
            d.clear_interrupt(job.id)


def _describe_failure(exc: Exception) -> str:
    if isinstance(exc, ImagineerdError):
        return exc.message
    name = type(exc).__name__
    if "OutOfMemory" in name:
        return (
            f"out of memory on the GPU ({exc}); try a smaller width/height, or fewer jobs at once"
        )
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f" to {exc.filename}" if exc.filename else ""
        return f"could not write the image{where}: {exc.strerror}"
    text = str(exc) or name
    return f"{name}: {text}" if text != name else text
