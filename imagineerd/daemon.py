"""The daemon: the one object every frontend talks to.

Frontends call :meth:`Daemon.submit`, :meth:`cancel`, :meth:`interrupt`, :meth:`job`,
:meth:`list_jobs`, :meth:`health` and subscribe to :attr:`events`; they never touch the store
or a backend. Data flows one way: validate -> store (queued) -> worker -> backend -> outputs ->
store (finished) -> events and hooks.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

from . import __version__, jobs, outputs
from . import config as config_mod
from .backends import build_registry
from .config import Config
from .errors import Conflict, Gone, NotFound, Unavailable
from .events import EventBus
from .gallery import Gallery
from .jobs import COMPLETED, FAILED, QUEUED, RUNNING, Job
from .plugins import get_plugin_manager
from .store import SQLiteStore, Store
from .worker import SHUTDOWN, Worker, describe_failure

log = logging.getLogger(__name__)

DB_NAME = "imagineerd.db"


def iso(when: datetime) -> str:
    # Always with microseconds, as the original API's examples show ("2025-10-13T14:32:15.123456").
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f")


class Daemon:
    """Owns the queue, the workers and the event bus.

    ``clock`` returns the current local time (injected so tests can pin it); ``store``
    defaults to the SQLite store under ``paths.state``.
    """

    def __init__(
        self,
        config: Config,
        *,
        plugin_manager: Any = None,
        store: Store | None = None,
        clock: Callable[[], datetime] = datetime.now,
    ) -> None:
        self.config = config
        self.pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
        self.registry = build_registry(self.pm)
        # Looked up now so an unknown model.backend fails at start-up, naming the choices.
        self.backend_factory = self.registry.get(config["model"]["backend"])
        self.outputs_dir = config.path_for("outputs")
        self.state_dir = config.path_for("state")
        for folder in (self.outputs_dir, self.state_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.store: Store = store if store is not None else SQLiteStore(self.state_dir / DB_NAME)
        self.clock = clock
        self.events = EventBus()
        self.gallery = Gallery(self.outputs_dir, self.state_dir / "thumbnails")
        self.stopping = threading.Event()
        self.workers: list[Worker] = []
        self._work = threading.Condition()
        self._work_pending = False
        self._lock = threading.Lock()
        self._progress: dict[int, tuple[int, int]] = {}
        self._interrupts: dict[int, str] = {}
        self._started = False
        self._saver = ThreadPoolExecutor(max_workers=2, thread_name_prefix="imagineerd-save")
        self._saves: set[Future] = set()
        # What config.yaml says now; differs from ``config`` by keys that need a restart.
        self.saved_config: dict[str, Any] = copy.deepcopy(config.data)
        self._config_lock = threading.RLock()
        # Services beside the workers (the inbox, ...) report their state in /api/health.
        self._status_providers: dict[str, Callable[[], dict[str, Any]]] = {}

    # -- life cycle ----------------------------------------------------------------------
    def now_iso(self) -> str:
        return iso(self.clock())

    def start(self, *, workers: bool = True) -> None:
        """Recover from an unclean stop, then start one worker per device."""
        self.recover()
        if workers:
            max_batch = self.config["performance"]["max_batch"]
            for index, device in enumerate(self.devices()):
                if max_batch == "auto":
                    # Batching pays where kernel launches dominate (GPUs), not on CPUs.
                    max_batch = 8 if device.startswith("cuda") else 1
                worker = Worker(self, device=device, max_batch=max_batch, index=index)
                self.workers.append(worker)
                worker.start()
            threading.Thread(target=self._watchdog, name="imagineerd-watchdog", daemon=True).start()
        self._started = True

    def _watchdog(self) -> None:
        """Fail the jobs of a worker whose backend hangs without calling back.

        A backend that reports steps is stopped at the next step once it passes
        ``performance.job_timeout``. One that stops calling back (a driver hang, a deadlock)
        cannot be interrupted from Python: past the limit plus a grace period its jobs fail,
        the stuck thread is abandoned and a new worker takes over the device's queue.
        """
        while not self.stopping.wait(0.5):
            timeout = self.config["performance"]["job_timeout"]
            if not timeout:
                continue
            grace = max(2.0, timeout * 0.25)
            for index, worker in enumerate(list(self.workers)):
                started = worker.batch_started
                if started is None or worker.abandoned:
                    continue
                waited = time.monotonic() - started
                if waited < timeout + grace:
                    continue
                worker.abandoned = True
                log.error("%s has not responded for %.0f s; restarting it", worker.name, waited)
                for job in list(worker.active.values()):
                    self.job_finished(
                        job,
                        FAILED,
                        duration_seconds=round(waited, 3),
                        error=f"the backend stopped responding: no result after {waited:.0f} s "
                        f"(performance.job_timeout is {timeout:g} s); the job was stopped and "
                        "the worker restarted",
                    )
                replacement = Worker(
                    self, device=worker.device, max_batch=worker.max_batch, index=len(self.workers)
                )
                self.workers[index] = replacement
                replacement.start()

    def devices(self) -> list[str]:
        """``model.device`` as a list: one worker each. ``auto`` is every visible GPU (or
        the single best device when there is none)."""
        setting = self.config["model"]["device"]
        if isinstance(setting, list):
            return setting
        if setting == "auto":
            import torch

            count = torch.cuda.device_count()
            if count > 1:
                return [f"cuda:{i}" for i in range(count)]
            return ["cuda" if count else "auto"]
        return [setting]

    def backend_settings(self) -> dict[str, Any]:
        """What a backend factory receives: the ``model:`` section (``name`` made absolute
        when local, ``cache_dir`` resolved) plus ``performance``, ``state_dir`` and
        ``warm_sizes``."""
        settings = self.config.model_settings()
        settings["performance"] = dict(self.config["performance"])
        settings["state_dir"] = str(self.state_dir)
        # Sizes a compiling backend prepares first: the default one.
        generation = self.config["generation"]
        settings["warm_sizes"] = [[generation["width"], generation["height"]]]
        return settings

    def recover(self) -> None:
        """Finish what a crash left: partial images are removed; a job that was ``running``
        and whose image was already written is completed; others go back to the head of the
        queue (or fail after ``queue.max_attempts`` interruptions)."""
        for path in outputs.remove_partial_files(self.outputs_dir):
            log.warning("removed partial output %s", path)
        for job in self.store.running():
            found = outputs.find_output_for_job(self.outputs_dir, job.id)
            if found is not None:
                meta = outputs.read_metadata(found)["imagineerd"] or {}
                self.store.finish(
                    job.id,
                    COMPLETED,
                    completed_at=meta.get("completed_at") or self.now_iso(),
                    duration_seconds=meta.get("duration_seconds"),
                    output_path=self.output_ref(found),
                )
                log.warning("job %s had finished its image before the stop; completed", job.id)
        for job in self.store.recover(
            max_attempts=self.config["queue"]["max_attempts"], completed_at=self.now_iso()
        ):
            if job.status == FAILED:
                log.error("job %s failed: %s", job.id, job.error)
                self._hook("imagineerd_job_finished", job=self.job_view(job))
            else:
                log.warning(
                    "job %s was interrupted by a stop; back at the head of the queue", job.id
                )

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop taking jobs; a running job is interrupted at its next step and put back in the
        queue (without counting an attempt); then close the store."""
        self.stopping.set()
        with self._lock:
            for job in self.store.running() if self._started else []:
                self._interrupts[job.id] = SHUTDOWN
        self.wake()
        for worker in self.workers:
            worker.join(timeout)
            if worker.is_alive():
                log.error("%s did not stop within %ss", worker.name, timeout)
        self._saver.shutdown(wait=True)  # images already generated are still written
        self.store.close()

    def wake(self) -> None:
        with self._work:
            self._work_pending = True
            self._work.notify_all()

    def wait_for_work(self, timeout: float) -> None:
        # The flag closes the gap between a worker finding the queue empty and starting to
        # wait: a job submitted in between would otherwise wait for the timeout.
        with self._work:
            if not self._work_pending:
                self._work.wait(timeout)
            self._work_pending = False

    # -- frontends -----------------------------------------------------------------------
    @property
    def generation_defaults(self) -> dict[str, Any]:
        return self.config["generation"]

    def validate(self, data: Any) -> jobs.JobSpec:
        return jobs.validate(data, self.generation_defaults)

    def submit(self, data: Any, *, source: str = "api", source_name: str | None = None) -> Job:
        """Validate a raw request and queue it; raises ``ValidationError`` naming the field."""
        return self.submit_spec(self.validate(data), source=source, source_name=source_name)

    def submit_spec(
        self, spec: jobs.JobSpec, *, source: str = "api", source_name: str | None = None
    ) -> Job:
        job = self.store.add(
            spec, submitted_at=self.now_iso(), source=source, source_name=source_name
        )
        self._announce_submitted(job)
        self.wake()
        return job

    def _announce_submitted(self, job: Job) -> None:
        view = self.job_view(job)
        self.events.publish("job.submitted", view)
        self._hook("imagineerd_job_submitted", job=view)

    def job(self, job_id: int) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return job

    def cancel(self, job_id: int) -> Job:
        """Cancel a queued job. 404 unknown, 409 running, 410 already finished."""
        job = self.job(job_id)
        if job.status == QUEUED:
            cancelled = self.store.cancel_queued(job_id, completed_at=self.now_iso())
            if cancelled is not None:
                view = self.job_view(cancelled)
                self.events.publish("job.cancelled", view)
                self._hook("imagineerd_job_finished", job=view)
                return cancelled
            job = self.job(job_id)  # a worker claimed it meanwhile
        if job.status == RUNNING:
            raise Conflict(
                f"job {job_id} is running and cannot be cancelled; "
                f"POST /api/jobs/{job_id}/interrupt stops it at the next step"
            )
        raise Gone(f"job {job_id} is already {job.status}")

    def interrupt(self, job_id: int) -> Job:
        """Stop a running job at its next step (it ends ``cancelled``)."""
        job = self.job(job_id)
        if job.status == RUNNING:
            with self._lock:
                self._interrupts.setdefault(job_id, "interrupted by request")
            return job
        if job.status == QUEUED:
            raise Conflict(
                f"job {job_id} is queued, not running; DELETE /api/jobs/{job_id} cancels it"
            )
        raise Gone(f"job {job_id} is already {job.status}")

    def job_view(self, job: Job) -> dict[str, Any]:
        """A job as the API shows it: the record plus queue position, ETA and live progress."""
        view = job.to_dict()
        if job.status in (QUEUED, RUNNING):
            view["queue_position"] = self.store.queue_position(job)
            view["estimated_time_remaining"] = self.estimate_remaining(job, view["queue_position"])
        if job.status == RUNNING:
            step, total = self._progress.get(job.id, (0, job.spec.steps))
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
        per_batch = max((w.max_batch for w in self.workers), default=1)
        batches = math.ceil(position / per_batch) / max(len(self.workers), 1)
        return round(mean * (current + batches), 1)

    def _fraction_left(self, job: Job) -> float:
        step, total = self._progress.get(job.id, (0, job.spec.steps))
        return 1 - step / max(total, 1)

    def list_jobs(
        self, *, limit: int = 50, before: int | None = None, queued_limit: int = 1000
    ) -> dict[str, Any]:
        running, queued, history = self.store.overview(
            queued_limit=queued_limit, history_limit=limit, before=before
        )
        running_views = [self.job_view(j) for j in running]
        return {
            # The original API has one running job; with batching or several GPUs there can
            # be more, so ``running`` lists them all and ``current`` stays the first.
            "current": running_views[0] if running_views else None,
            "running": running_views,
            # Positions follow from the order; asking the store per job would be O(n^2).
            "queued": [dict(j.to_dict(), queue_position=i + 1) for i, j in enumerate(queued)],
            "history": [self.job_view(j) for j in history],
        }

    def register_status(self, name: str, provider: Callable[[], dict[str, Any]] | None) -> None:
        """Show ``provider()`` under ``name`` in :meth:`health` (``None`` removes it)."""
        if provider is None:
            self._status_providers.pop(name, None)
        else:
            self._status_providers[name] = provider

    def health(self) -> dict[str, Any]:
        counts = self.store.counts()
        worker = self.workers[0] if self.workers else None
        workers = [
            {
                "device": w.device,
                "state": w.backend_state,
                "error": w.backend_error,
                "max_batch": w.max_batch,
            }
            for w in self.workers
        ]
        return {
            "status": "ok",
            "queue_size": counts[QUEUED],
            "current_job": counts[RUNNING] > 0,
            "total_completed": counts[COMPLETED],
            "total_failed": counts[FAILED],
            "version": __version__,
            "backend": {
                "name": self.config["model"]["backend"],
                "model": self.config["model"]["name"],
                "state": worker.backend_state if worker else "no worker",
                "error": worker.backend_error if worker else None,
            },
            "workers": workers,
            **{name: provider() for name, provider in list(self._status_providers.items())},
        }

    def update_config(self, data: Any, *, merge: bool = False) -> dict[str, Any]:
        """Change the saved configuration from a frontend (the HTTP API).

        ``merge`` (PATCH) changes the keys given, section by section; otherwise (PUT) ``data``
        must carry every section and key. Only keys in ``config.REMOTE_KEYS`` may change (a
        read-only key sent back unchanged is fine), ``model.name`` only to one of
        :meth:`available_models`. The whole resulting file is validated before anything is
        written; only the changed keys are written, atomically, keeping comments and hand
        edits. Live sections apply at once. Returns the saved config and the keys that take
        effect only after a restart.
        """
        with self._config_lock:
            changes = config_mod.remote_changes(
                self.saved_config, data, merge=merge, models=self.available_models()
            )
            if changes:
                saved = config_mod.update_file(self.config.path, changes).data
                self.saved_config = copy.deepcopy(saved)
                # Nothing below may fail: the change is on disk and must be reported as saved.
                for section in config_mod.LIVE_SECTIONS:
                    self.config.data[section] = copy.deepcopy(saved[section])
            saved = copy.deepcopy(self.saved_config)
            restart = config_mod.restart_required(self.config.data, saved)
        if changes:
            self.events.publish("config.changed", {"restart_required": restart})
        return {"config": saved, "restart_required": restart}

    def pending_restart(self) -> list[str]:
        """Saved config keys that differ from the running ones until the next restart."""
        with self._config_lock:
            return config_mod.restart_required(self.config.data, self.saved_config)

    def update_generation(self, values: Any) -> dict[str, Any]:
        """Change some generation defaults (validated with the job bounds) and save: a PATCH
        of the ``generation`` section, so errors name ``generation.<key>``."""
        return self.update_config({"generation": values}, merge=True)

    def available_models(self) -> list[str]:
        """The values ``model.name`` may take over the API: for now the model saved in
        config.yaml (any other name could be any file on the server; other models are set
        in config.yaml on the server)."""
        return [self.saved_config["model"]["name"]]

    # -- inbox claims (see store.py for why each step is its own transaction) -----------
    def create_claim(self, original: str, claimed: str) -> int:
        return self.store.create_claim(original, claimed, created_at=self.now_iso())

    def submit_claim(self, claim_id: int, specs: list[jobs.JobSpec], source_name: str) -> list[Job]:
        """Queue all jobs of one inbox file at once (all or none, never twice)."""
        queued = self.store.submit_claim(
            claim_id, specs, submitted_at=self.now_iso(), source="inbox", source_name=source_name
        )
        for job in queued:
            self._announce_submitted(job)
        self.wake()
        return queued

    def update_claim(self, claim_id: int, state: str, **paths: str) -> None:
        self.store.update_claim(claim_id, state, **paths)

    def delete_claim(self, claim_id: int) -> None:
        self.store.delete_claim(claim_id)

    def open_claims(self) -> list[dict[str, Any]]:
        return self.store.open_claims()

    def claim(self, claim_id: int) -> dict[str, Any] | None:
        return self.store.get_claim(claim_id)

    def claim_jobs(self, claim_id: int) -> list[Job]:
        return self.store.claim_jobs(claim_id)

    # -- called by workers ---------------------------------------------------------------
    def job_started(self, job: Job) -> None:
        self._progress[job.id] = (0, job.spec.steps)
        self.events.publish("job.started", self.job_view(job))

    def report_progress(self, job_id: int, step: int, total: int) -> None:
        # A dict store and a non-blocking publish: nothing here may slow a denoising step.
        self._progress[job_id] = (step, total)
        self.events.publish("job.progress", {"id": job_id, **progress_dict(step, total)})

    def interrupt_reason(self, job_id: int) -> str | None:
        return self._interrupts.get(job_id)

    def clear_interrupt(self, job_id: int) -> None:
        with self._lock:
            self._interrupts.pop(job_id, None)

    def job_finished(
        self,
        job: Job,
        status: str,
        *,
        duration_seconds: float | None = None,
        output_path: str | None = None,
        error: str | None = None,
    ) -> Job:
        for attempt in range(600):
            try:
                return self._finish(job, status, duration_seconds, output_path, error)
            except Unavailable:
                # The database is locked by another program past its busy timeout: the job
                # is done, so keep trying rather than leave it "running" until a restart.
                if self.stopping.is_set() and attempt > 10:
                    raise
                log.warning("job %s: the database is locked; retrying to record it", job.id)
                time.sleep(1.0)
        raise Unavailable(f"could not record the end of job {job.id}: the database stays locked")

    def _finish(
        self,
        job: Job,
        status: str,
        duration_seconds: float | None,
        output_path: str | None,
        error: str | None,
    ) -> Job:
        try:
            done = self.store.finish(
                job.id,
                status,
                completed_at=self.now_iso(),
                duration_seconds=duration_seconds,
                output_path=output_path,
                error=error,
                progress=self._progress.pop(job.id, None),
            )
        except RuntimeError:
            # Already finished elsewhere (e.g. failed by the watchdog): the first word stands.
            log.warning("job %s was already finished; ignoring a late %s", job.id, status)
            return self.job(job.id)
        view = self.job_view(done)
        self.events.publish(f"job.{status}", view)
        self._hook("imagineerd_job_finished", job=view)
        return done

    def save_later(
        self, job: Job, image: Image.Image, *, duration: float, model_label: str
    ) -> None:
        """Write a finished job's image on a saver thread, then mark the job completed (or
        failed, if the write fails), so the worker can start its next batch at once."""

        def save() -> None:
            try:
                output = self.save_output(job, image, duration=duration, model_label=model_label)
            except Exception as exc:
                self.job_finished(
                    job, FAILED, duration_seconds=duration, error=describe_failure(exc)
                )
            else:
                self.job_finished(job, COMPLETED, duration_seconds=duration, output_path=output)

        future = self._saver.submit(save)
        with self._lock:
            self._saves.add(future)
        future.add_done_callback(self._saves.discard)

    def drain_saves(self) -> None:
        """Wait until every image handed to the saver is written and its job finished."""
        with self._lock:
            pending = list(self._saves)
        futures_wait(pending)

    def has_queued_jobs(self) -> bool:
        return bool(self.store.queued(1))

    def job_requeued(self, job: Job) -> None:
        self._progress.pop(job.id, None)
        requeued = self.store.requeue(job.id, count_attempt=False)
        self.events.publish("job.requeued", self.job_view(requeued))

    def save_output(
        self, job: Job, image: Image.Image, *, duration: float, model_label: str
    ) -> str:
        """Write the job's PNG with both metadata chunks; return the path the API shows."""
        spec = job.spec
        now = self.clock()
        params = {
            "Steps": spec.steps,
            "Sampler": spec.sampler_label,
            "CFG scale": spec.guidance_scale,
            "Seed": spec.seed,
            "Size": f"{spec.width}x{spec.height}",
            "Model": model_label,
            "Version": f"imagineerd {__version__}",
        }
        record = {
            "id": job.id,
            **spec.to_dict(),
            "sampler": spec.sampler_label,
            "model": self.config["model"]["name"],
            "backend": self.config["model"]["backend"],
            "source": job.source,
            "source_name": job.source_name,
            "submitted_at": job.submitted_at,
            "started_at": job.started_at,
            "completed_at": iso(now),
            "duration_seconds": duration,
            "version": __version__,
        }
        text = {
            "parameters": outputs.infotext(spec.prompt, spec.negative_prompt, params),
            "imagineerd": json.dumps(record, ensure_ascii=False, sort_keys=True),
        }
        folder = self.outputs_dir
        if job.source == "inbox" and job.source_name and self.config["inbox"]["outputs_subfolder"]:
            folder = folder / outputs.slugify(Path(job.source_name).stem)
        path = outputs.save_png(image, folder, outputs.output_name(job.id, spec.prompt, now), text)
        return self.output_ref(path)

    def output_ref(self, path: Path) -> str:
        """``outputs/<name>.png`` (relative to the config folder) as the original API shows it."""
        try:
            return (
                Path(os.path.relpath(path, self.config.base_dir)).as_posix()
                if Path(path).resolve().is_relative_to(self.config.base_dir)
                else str(path)
            )
        except ValueError:
            return str(path)

    def _hook(self, name: str, **kwargs: Any) -> None:
        try:
            getattr(self.pm.hook, name)(**kwargs)
        except Exception:
            log.exception("plugin hook %s failed", name)


def progress_dict(step: int, total: int) -> dict[str, Any]:
    return {
        "step": step,
        "total": total,
        "percent": round(100.0 * step / total, 1) if total else 0.0,
    }
