"""The daemon: the one object every frontend talks to.

Frontends call :meth:`Daemon.submit`, :meth:`cancel`, :meth:`interrupt`, :meth:`job`,
:meth:`list_jobs`, :meth:`health` and subscribe to :attr:`events`; they never touch the store
or a backend. Data flows one way: validate -> store (queued) -> worker -> backend -> outputs ->
store (finished) -> events and hooks.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Hashable
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

from . import __version__, backends, config_remote, jobs, outputs
from .backends import Backend, build_registry
from .config import Config
from .errors import Conflict, Gone, NotFound, Unavailable, ValidationError
from .events import Event, EventBus
from .gallery import Gallery
from .gallery_index import GalleryIndex
from .group_commit import GroupCommit
from .inputs import InputStore
from .jobs import CANCELLED, COMPLETED, FAILED, QUEUED, RUNNING, Job, iso
from .metrics import Metrics
from .model_choice import ModelChoice
from .models import ModelLibrary
from .nodes import NodeService
from .plugins import get_plugin_manager
from .preview_feed import PreviewFeed
from .safefile import read_regular_file
from .saver import ImageSaver
from .shared_events import SharedEventBus
from .store import MOVE_WORDS, ClaimSubmission, Fenced, Store
from .stores import open_store
from .views import JobViews, progress_dict
from .webhooks import Webhooks
from .worker import SHUTDOWN, Supervisor, Worker, describe_failure

log = logging.getLogger(__name__)

DB_NAME = "imagineerd.db"
#: How a stopped node's heartbeat leaves it in ``/api/health`` until it starts again.
STOPPED = "stopped"
#: No PNG we write comes near this (2048 x 2048 RGB uncompressed is 12 MiB).
MAX_OUTPUT_BYTES = 64 << 20
#: The store setting that says whether the queue is paused: in the store, not in memory, so
#: a restart and every node of a shared queue see it.
QUEUE_SETTING = "queue"
#: A running job's progress events are at most this many seconds apart (first and last
#: step always sent); its view in the API has every step.
PROGRESS_EVENT_INTERVAL = 0.1


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
        self.store: Store = store if store is not None else open_store(config)
        self.clock = clock
        #: This daemon's name in the queue (``queue.node_name``, or the host name).
        self.node = config.node_name()
        self.lease_seconds = float(config["queue"]["lease_seconds"])
        # A store other daemons share (PostgreSQL) hands out a connection for the event log;
        # then events, leases and settings are shared by every node.
        connect = getattr(self.store, "connect", None)
        self.shared = callable(connect)
        self.events: EventBus = (
            SharedEventBus(connect, node=self.node, on_remote=self._remote_event)
            if self.shared
            else EventBus()
        )
        self.gallery = Gallery(self.outputs_dir, self.state_dir / "thumbnails")
        # GET /api/outputs lists from this index in the store, kept true by the saver and by
        # a pass over the folder at start and every gallery.rescan_seconds (gallery_index).
        self.gallery_index = GalleryIndex(
            self.gallery,
            self.store,
            trash_days=config["gallery"]["trash_days"],
            rescan_seconds=config["gallery"]["rescan_seconds"],
            spool=self.state_dir / "tmp",
            node=self.node,
        )
        self.inputs = InputStore(
            self.state_dir / "inputs",
            self.gallery,
            max_bytes=config["server"]["max_image_bytes"],
            # Another node may run the job: its input images travel with the queue.
            shared=self.store if self.shared else None,
        )
        #: New at each start of the process: a client that sees it change knows the server
        #: restarted (and that what ran then was interrupted and put back).
        self.boot_id = secrets.token_hex(8)
        self._default_arch: str | None = None
        self.stopping = threading.Event()
        self.supervisor: Supervisor | None = None
        self._work = threading.Condition()
        self._work_pending = False
        self._lock = threading.Lock()
        self.views = JobViews(
            self.store,
            self._capacity,
            paused=self.queue_paused,
            output_file=self._output_name,
            # A page opened mid-run shows the last preview at once, not at the next one.
            preview=lambda job_id: self.previews.latest(job_id),
        )
        self._interrupts: dict[int, str] = {}
        self._progress_sent: dict[int, float] = {}  # job id -> its last progress event's time
        self._started = False
        self._stopped = False
        self.settings = config_remote.LiveSettings(config)
        default_path = config.model_settings()["name"]
        self.models = ModelLibrary(config.path_for("models"), self.state_dir, loaded=default_path)
        self.model_choice = ModelChoice(self.models, config["model"]["name"], default_path)
        self.webhooks = Webhooks(self.store, config["webhooks"])
        self.saver = ImageSaver(
            config,
            self.outputs_dir,
            clock,
            self._image_saved,
            choice=self.model_choice,
            # On a shared queue a node that lost its lease must not publish a second image
            # of a job another node now runs (its finish would be refused anyway).
            holds=self._holds if self.shared else None,
            index=self.gallery_index.write,
        )
        # Services beside the workers (the inbox, ...) report their state in /api/health.
        self._status_providers: dict[str, Callable[[], dict[str, Any]]] = {}
        self.node_service = NodeService(
            self.store,
            node=self.node,
            lease_seconds=self.lease_seconds,
            info=self._node_info,
            interrupt=self._interrupt_here,
            expire=self._expire_leases,
            expired=self._announce_recovered,
        )
        #: New jobs submitted at the same moment share one transaction (one fsync); a
        #: round's jobs share one ``submitted_at``, read when the round is written.
        self._adder: GroupCommit[jobs.JobSpec, Job] = GroupCommit(
            lambda key, specs: self.store.add_many(
                specs, submitted_at=self.now_iso(), source=key[0], source_name=key[1]
            )
        )
        self.metrics = Metrics(self)  # GET /metrics; read on scrape and from job hooks
        self.previews = PreviewFeed(self.events.publish)

    # -- life cycle ----------------------------------------------------------------------
    def now_iso(self) -> str:
        return iso(self.clock())

    def start(self, *, workers: bool = True) -> None:
        """Recover from an unclean stop, then start one worker per device."""
        if self.shared:
            self.events.start()
            self._apply_shared_generation()
        self.recover()
        self.collect_inputs()
        self.models.start()
        self.webhooks.start()
        self.gallery_index.start()
        if workers:
            performance = self.config["performance"]
            self.supervisor = Supervisor(
                self, self.devices(), performance["max_batch"], performance["look_ahead"]
            )
            self.models.loaded_models = self.loaded_models
            self.previews.start()
            self.supervisor.start()
        self._started = True
        if self.shared:
            # Alone on its SQLite file a node needs no heartbeat: nobody else could take its
            # jobs, and a restart's recover() puts back what a crash left running.
            self.node_service.beat()
            self.node_service.start()

    @property
    def workers(self) -> list[Worker]:
        return self.supervisor.workers if self.supervisor is not None else []

    def claimed_ahead(self) -> set[int]:
        """Jobs running in the store's eyes that no step has touched yet: each worker's batch
        claimed ahead (``performance.look_ahead``)."""
        return {job.id for worker in self.workers for job in worker.claimed_ahead()}

    def devices(self) -> list[str]:
        return backends.devices(self.config["model"]["device"])

    def load_backend(self, device: str | None) -> Backend:
        """A new backend for ``device`` (called on the worker's own thread)."""
        settings = backends.settings(self.config, device)
        # The backend resolves job's model names in the models folder and announces its
        # model switches (the UI shows them).
        settings["library"] = self.models
        settings["on_event"] = self.events.publish
        settings["inputs"] = self.inputs
        return backends.create(self.backend_factory, settings)

    def job_timeout(self) -> float:
        return self.config["performance"]["job_timeout"]

    def preview_every(self) -> int:
        return self.config["previews"]["every_steps"]

    def recover(self) -> None:
        """Finish what a crash left: partial images are removed; a job that was ``running``
        and whose image was already written is completed; others go back to the head of the
        queue (or fail after ``queue.max_attempts`` interruptions). Each outcome is announced
        like any other (events, the ``imagineerd_job_finished`` hook, inbox receipts)."""
        for path in outputs.remove_partial_files(self.outputs_dir):
            log.warning("removed partial output %s", path)
        self._complete_written(self.store.running(self.node))
        self._announce_recovered(
            self.store.recover(
                max_attempts=self.config["queue"]["max_attempts"],
                completed_at=self.now_iso(),
                webhooks=lambda spec: self.webhooks.targets(spec, FAILED),
                node=self.node,
            )
        )

    def _complete_written(self, running: list[Job]) -> None:
        """Complete the jobs among ``running`` whose image is on disk already (their node
        stopped after the rename, before the store heard of it)."""
        for job in running:
            found = outputs.find_output_for_job(self.outputs_dir, job.id)
            if found is None:
                continue
            meta = outputs.read_metadata(found)["imagineerd"] or {}
            try:
                done = self.store.finish(
                    job.id,
                    COMPLETED,
                    completed_at=meta.get("completed_at") or self.now_iso(),
                    duration_seconds=meta.get("duration_seconds"),
                    output_path=self.saver.output_ref(found),
                    webhooks=self.webhooks.targets(job.spec, COMPLETED),
                )
            except RuntimeError:  # its node finished it meanwhile
                continue
            log.warning("job %s had finished its image before the stop; completed", job.id)
            self._announce_finished(done)

    def _announce_recovered(self, jobs_: list[Job]) -> None:
        for job in jobs_:
            if job.status == FAILED:
                log.error("job %s failed: %s", job.id, job.error)
                self._announce_finished(job)
            else:
                log.warning(
                    "job %s was interrupted by a stop; back at the head of the queue", job.id
                )
                self.events.publish("job.requeued", self.job_view(job))

    def _expire_leases(self) -> list[Job]:
        """Put back the jobs of nodes whose lease ran out (they died): called by the node
        service on a shared queue."""
        return self.store.expire_leases(
            max_attempts=self.config["queue"]["max_attempts"],
            completed_at=self.now_iso(),
            webhooks=lambda spec: self.webhooks.targets(spec, FAILED),
        )

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop taking jobs; a running job is interrupted at its next step and put back in the
        queue (without counting an attempt); then close the store. A second call does
        nothing (a test, or a signal handler and the main thread, may both stop it)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self.stopping.set()
        self.models.stop()
        self.node_service.stop()
        held = {job_id for worker in self.workers for job_id in worker.active}
        if self._started:
            try:
                held.update(job.id for job in self.store.running(self.node))
            except Unavailable as exc:  # the database is away: stop what the workers hold
                log.warning("stopping without the job database: %s", exc.message)
        with self._lock:
            for job_id in held:
                # An interrupt asked for already is still answered: that job ends cancelled.
                self._interrupts.setdefault(job_id, SHUTDOWN)
        self.wake()
        if self.supervisor is not None:
            self.supervisor.join(timeout)
        self.previews.stop()
        self.saver.shutdown()  # images already generated are still written
        self.webhooks.stop()  # what is still owed is sent after the next start
        if self._started and self.shared:
            try:
                self.node_service.beat(STOPPED)
            except Exception as exc:  # the database may be gone: the lease says the rest
                log.warning("could not record that node %s stopped: %s", self.node, exc)
        if self.shared:
            self.events.stop()
        self.gallery_index.stop()
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
        """A raw request as a job spec, its model files checked against the models folder
        (``ValidationError`` naming the field and the closest names) and its input images
        checked and stored."""
        spec = self.model_choice.check(jobs.validate(data, self.generation_defaults))
        self.webhooks.check(spec)
        return self.inputs.resolve(spec, data) if spec.init_image else spec

    def collect_inputs(self) -> None:
        """Delete stored input images no queued or running job needs any more."""
        try:
            # Running, queued, running again: a job that moves between the two while they
            # are read is in one of the three.
            live = self.store.running() + self.store.queued() + self.store.running()
            self.inputs.collect(ref for job in live for ref in (job.spec.init_image, job.spec.mask))
        except Exception:  # tidying up must never break finishing a job
            log.exception("could not tidy the stored input images")

    def submit(self, data: Any, *, source: str = "api", source_name: str | None = None) -> Job:
        """Validate a raw request and queue it; raises ``ValidationError`` naming the field."""
        return self.submit_spec(self.validate(data), source=source, source_name=source_name)

    def submit_spec(
        self, spec: jobs.JobSpec, *, source: str = "api", source_name: str | None = None
    ) -> Job:
        return self.submit_many([spec], source=source, source_name=source_name)[0]

    def submit_many(
        self, specs: list[jobs.JobSpec], *, source: str = "api", source_name: str | None = None
    ) -> list[Job]:
        """Queue validated specs together (one transaction, one wake-up), so that a worker
        takes them as one batch where they are compatible: copies of one request. Submits
        arriving together share that transaction (``group_commit``): it has committed, so
        the jobs are durable, before this returns."""
        queued = self._adder.run((source, source_name), specs)
        self.inputs.release(ref for spec in specs for ref in (spec.init_image, spec.mask))
        self._announce_submitted(queued)
        self.wake()
        return queued

    def _announce_submitted(self, queued: list[Job]) -> None:
        for view in self.views.views(queued):
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
            cancelled = self.store.cancel_queued(
                job_id,
                completed_at=self.now_iso(),
                webhooks=self.webhooks.targets(job.spec, CANCELLED),
            )
            if cancelled is not None:
                self._announce_finished(cancelled)
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
            reason = "interrupted by request"
            if job.node in (None, self.node):
                self._interrupt_here(job_id, reason)
            else:
                # Its node sees the request at its next lease renewal (twice a second).
                self.store.request_interrupt(job_id, reason)
            return job
        if job.status == QUEUED:
            raise Conflict(
                f"job {job_id} is queued, not running; DELETE /api/jobs/{job_id} cancels it"
            )
        raise Gone(f"job {job_id} is already {job.status}")

    def move(self, job_id: int, to: Any) -> dict[str, Any]:
        """Move a queued job (``to``: ``top``, ``up``, ``down`` or a 1-based place; past the
        tail is the tail). 400 naming ``to``, 404 unknown, 409 not queued. Returns the job's
        view with ``move``: its place before and after and the ids now at the places from
        the nearer of the two to the farther (``job.moved`` carries the same)."""
        if not (to in MOVE_WORDS or (isinstance(to, int) and not isinstance(to, bool) and to >= 1)):
            shown = repr(to)[:40] if isinstance(to, str | int | float) else type(to).__name__
            raise ValidationError(
                f'to must be "top", "up", "down" or a place in the queue (a whole number '
                f"from 1), got {shown}",
                field="to",
            )
        job = self.job(job_id)
        moved = self.store.move(job_id, min(to, 2**31) if isinstance(to, int) else to)
        if moved is None:
            job = self.job(job_id)
            raise Conflict(
                f"job {job_id} is {job.status}, not queued; only a queued job can be moved"
            )
        view = self.job_view(self.job(job_id))
        view["move"] = {
            "from": moved.old,
            "to": moved.new,
            "first": min(moved.old, moved.new),
            "order": moved.order,
        }
        if moved.old != moved.new:
            self.events.publish("job.moved", view)
        return view

    def queue_state(self) -> dict[str, Any]:
        """``{"paused", "since", "by"}``: whether the queue is paused, since when and by
        which node, as the store says now (every node reads the same)."""
        state = self.store.get_setting(QUEUE_SETTING) or {}
        paused = bool(state.get("paused"))
        return {
            "paused": paused,
            "since": state.get("since") if paused else None,
            "by": state.get("by") if paused else None,
        }

    def queue_paused(self) -> bool:
        return self.queue_state()["paused"]

    def pause(self) -> dict[str, Any]:
        """Pause the queue: workers (of every node sharing it) claim nothing more; what runs
        now finishes. Idempotent: pausing a paused queue keeps its ``since``."""
        state = self.queue_state()
        if not state["paused"]:
            state = {"paused": True, "since": self.now_iso(), "by": self.node}
            self.store.put_setting(QUEUE_SETTING, state)
            self.events.publish("queue.paused", state)
        return state

    def resume(self) -> dict[str, Any]:
        """Resume a paused queue (idempotent); workers take jobs again at once."""
        state = self.queue_state()
        if state["paused"]:
            state = {"paused": False, "since": None, "by": None}
            self.store.put_setting(QUEUE_SETTING, state)
            self.events.publish("queue.resumed", {**state, "resumed_by": self.node})
        self.wake()
        return state

    def _interrupt_here(self, job_id: int, reason: str) -> None:
        with self._lock:
            self._interrupts.setdefault(job_id, reason)

    def job_view(self, job: Job) -> dict[str, Any]:
        """A job as the API shows it: the record plus queue position, ETA and live progress."""
        return self.views.view(job)

    def list_jobs(
        self, *, limit: int = 50, before: int | None = None, queued_limit: int = 1000
    ) -> dict[str, Any]:
        body = self.views.overview(limit=limit, before=before, queued_limit=queued_limit)
        body["queue_paused"] = self.queue_paused()
        return body

    def output_bytes(self, job: Job) -> bytes:
        """A completed job's PNG, read as the gallery reads outputs (inside outputs/, a
        regular file, bounded); ``OSError`` or ``NotFound`` when it is gone."""
        name = self._output_name(job.output_path or "")
        try:
            return read_regular_file(self.gallery.resolve(name), MAX_OUTPUT_BYTES)
        except (OSError, NotFound) as exc:
            if job.node in (None, self.node):
                raise
            raise NotFound(
                f"the image of job {job.id} was written by node {job.node} and is not in "
                f"this node's outputs folder ({self.outputs_dir}); share paths.outputs between "
                f"the nodes, or ask {job.node}"
            ) from exc

    def loaded_models(self) -> list[str]:
        """The models the workers hold on their devices now (the default one by the path or
        repo id it was loaded from, others by their listed names)."""
        return [
            name
            for state in (self.supervisor.states() if self.supervisor is not None else [])
            for name in state.get("models", {}).get("loaded", [])
        ]

    def register_status(self, name: str, provider: Callable[[], dict[str, Any]]) -> None:
        """Show ``provider()`` under ``name`` in :meth:`health`."""
        self._status_providers[name] = provider

    def health(self) -> dict[str, Any]:
        counts = self.store.counts()
        workers = self.supervisor.states() if self.supervisor is not None else []
        first = workers[0] if workers else {"state": "no worker", "error": None}
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
                "arch": self.default_arch(),
                "state": first["state"],
                "error": first["error"],
            },
            "boot_id": self.boot_id,
            "queue_paused": self.queue_paused(),
            "workers": workers,
            "node": self.node,
            "nodes": self.nodes(),
            **{name: provider() for name, provider in list(self._status_providers.items())},
        }

    def default_arch(self) -> str:
        """The default model's architecture (``sd15``, ``sd2``, ``sdxl``), or ``unknown``:
        as the models listing tells it, else as the backend reads the model itself (once:
        the model does not change while the daemon runs)."""
        found = self.models.find("checkpoints", self.config["model"]["name"], rescan=False)
        if found is not None:
            return found.arch
        if self._default_arch is None:
            try:
                from .backends.diffusers_backend import detect_arch

                self._default_arch = detect_arch(
                    self.config.model_settings()["name"], self.config["model"]["arch"]
                )
            except Exception:  # another backend's model, or no diffusers here: not known
                self._default_arch = "unknown"
        return self._default_arch

    def nodes(self) -> list[dict[str, Any]]:
        """Every node of the queue as ``/api/health`` lists it, this one included (alone on
        its SQLite file, a node is the whole list, as of now)."""
        records = (
            self.node_service.nodes
            if self.shared
            else [
                {
                    "name": self.node,
                    "info": self._node_info(),
                    "heartbeat_at": time.time(),
                    "age": 0.0,
                }
            ]
        )
        return [
            {
                "name": n["name"],
                "state": n["info"].get("state", "unknown")
                if n["age"] <= self.lease_seconds or n["info"].get("state") == STOPPED
                else "unreachable",
                "version": n["info"].get("version"),
                "devices": n["info"].get("devices", []),
                "last_heartbeat": datetime.fromtimestamp(n["heartbeat_at"]).isoformat(
                    timespec="seconds"
                ),
                "seconds_since_heartbeat": round(n["age"], 1),
            }
            for n in records
        ]

    def _node_info(self) -> dict[str, Any]:
        """What this node's heartbeat records for the others to show."""
        workers = self.supervisor.states() if self.supervisor is not None else []
        return {
            "version": __version__,
            "state": STOPPED if self.stopping.is_set() else ("running" if workers else "idle"),
            "devices": [
                {"device": w["device"], "state": w["state"], "max_batch": w["max_batch"]}
                for w in workers
            ],
        }

    @property
    def saved_config(self) -> dict[str, Any]:
        """What config.yaml says now; differs from ``config`` by keys that need a restart."""
        return self.settings.saved

    def update_config(self, data: Any, *, merge: bool = False) -> dict[str, Any]:
        """Change the saved configuration from a frontend (the HTTP API): see
        :meth:`imagineerd.config_remote.LiveSettings.update`. Returns the saved config and the
        keys that take effect only after a restart."""
        saved, restart, changed = self.settings.update(
            data, merge=merge, models=self.available_models
        )
        if changed:
            if self.shared:
                # Generation defaults are the queue's, not this node's: every node applies
                # them when the event below reaches it.
                self.store.put_setting("generation", saved["generation"])
            self.events.publish("config.changed", {"restart_required": restart})
        return {"config": saved, "restart_required": restart}

    def _apply_shared_generation(self) -> None:
        """Take the queue's generation defaults (saved into this node's config.yaml too, so
        the settings page shows them); the first node to start shares its own."""
        shared = self.store.get_setting("generation")
        if shared is None:
            self.store.put_setting("generation", self.saved_config["generation"])
        elif shared != self.saved_config["generation"]:
            self.settings.update({"generation": shared}, merge=True, models=self.available_models)

    def _remote_event(self, event: Event) -> None:
        """Another node's event, before this node's subscribers see it."""
        data = event.data
        if event.type in ("job.submitted", "job.requeued"):
            self.wake()  # our workers may take it
        elif event.type == "job.progress":
            self.views.progress[data["id"]] = (data["step"], data["total"])
        elif event.type.startswith("job.") and data.get("status") not in (QUEUED, RUNNING):
            self.views.progress.pop(data.get("id"), None)
            if data.get("status") == COMPLETED:
                self.views.forget_durations()
        elif event.type == "config.changed":
            self._apply_shared_generation()
        elif event.type == "queue.resumed":
            self.wake()  # the pause is read from the store at each claim; this saves a poll

    def pending_restart(self) -> list[str]:
        """Saved config keys that differ from the running ones until the next restart."""
        return self.settings.pending_restart()

    def update_generation(self, values: Any) -> dict[str, Any]:
        """Change some generation defaults (validated with the job bounds) and save: a PATCH
        of the ``generation`` section, so errors name ``generation.<key>``."""
        return self.update_config({"generation": values}, merge=True)

    def available_models(self) -> list[str]:
        """The values ``model.name`` may take over the API: the model saved in config.yaml
        and the checkpoints listed from ``paths.models`` (any other name could be any file
        on the server; other models are set in config.yaml on the server)."""
        saved = self.saved_config["model"]["name"]
        return [saved, *(name for name in self.models.checkpoint_names() if name != saved)]

    # -- inbox: a claimed file's jobs, queued at once (see store.py) -------------------
    def submit_claim(self, claim_id: int, specs: list[jobs.JobSpec], source_name: str) -> list[Job]:
        """Queue all jobs of one inbox file at once (all or none, never twice)."""
        return self.submit_claims([ClaimSubmission(claim_id, specs, source_name)])[0]

    def submit_claims(self, items: list[ClaimSubmission]) -> list[list[Job]]:
        """Queue the jobs of many inbox files in one transaction, each file's all or none
        and never twice (see ``Store.submit_claims``); each file's jobs, in order."""
        queued = self.store.submit_claims(items, submitted_at=self.now_iso(), source="inbox")
        self.inputs.release(
            ref for item in items for spec in item.specs for ref in (spec.init_image, spec.mask)
        )
        self._announce_submitted([job for file_jobs in queued for job in file_jobs])
        self.wake()
        return queued

    # -- WorkerHost: called by workers -------------------------------------------------
    def claim_batch(
        self, limit: Callable[[jobs.JobSpec], int], key: Callable[[jobs.JobSpec], Hashable]
    ) -> list[Job]:
        # Read from the store at each claim (one small read per batch, or per second while
        # idle): a pause asked on any node holds every node's workers from its next claim.
        if self.queue_paused():
            return []
        return self.store.claim_batch(
            started_at=self.now_iso(),
            limit=limit,
            key=key,
            node=self.node,
            lease_seconds=self.lease_seconds,
        )

    def job_started(self, job: Job) -> None:
        self.views.progress[job.id] = (0, job.spec.steps)
        self.events.publish("job.started", self.job_view(job))

    def report_progress(self, job_id: int, step: int, total: int) -> None:
        # A dict store and a non-blocking publish: nothing here may slow a denoising step.
        # The view always has the step; the event stream gets the first and last steps and
        # at most PROGRESS_EVENT_INTERVAL apart between (a fast batch makes hundreds of
        # steps a second, more than any screen shows and than every stream should carry).
        self.views.progress[job_id] = (step, total)
        now = time.monotonic()
        recent = now - self._progress_sent.get(job_id, 0.0) < PROGRESS_EVENT_INTERVAL
        if recent and 1 < step < total:
            return
        self._progress_sent[job_id] = now
        self.events.publish("job.progress", {"id": job_id, **progress_dict(step, total)})

    def report_preview(self, job_id: int, step: int, total: int, pixels: Any) -> None:
        self.previews.offer(job_id, step, total, pixels)

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
        return self._until_available(
            f"record the end of job {job.id}",
            lambda: self._finish(job, status, duration_seconds, output_path, error),
        )

    def _until_available(self, what: str, work: Callable[[], Any]) -> Any:
        """``work()``, retried once a second for up to ten minutes while the job database
        is unavailable (locked by another program past its busy timeout, or a shared one
        unreachable): the work is done on the GPU already, so wait rather than lose it or
        leave its job "running" until a restart. A stopping daemon gives up sooner."""
        for attempt in range(600):
            try:
                return work()
            except Unavailable:
                if self.stopping.is_set() and attempt > 10:
                    raise
                if attempt == 0:
                    log.warning("the job database is unavailable; retrying to %s", what)
                time.sleep(1.0)
        raise Unavailable(f"could not {what}: the job database stays unavailable")

    def _finish(
        self,
        job: Job,
        status: str,
        duration_seconds: float | None,
        output_path: str | None,
        error: str | None,
    ) -> Job:
        self._progress_sent.pop(job.id, None)
        self.previews.forget(job.id)  # before its end is announced: no preview after it
        try:
            done = self.store.finish(
                job.id,
                status,
                completed_at=self.now_iso(),
                duration_seconds=duration_seconds,
                output_path=output_path,
                error=error,
                progress=self.views.progress.pop(job.id, None),
                webhooks=self.webhooks.targets(job.spec, status),
                token=job.token,
            )
        except Fenced:
            # Our lease ran out (the database was away, or we stalled) and another node has
            # the job now: its result stands, ours is dropped, image included.
            log.warning("job %s: this node lost its lease; dropping its late result", job.id)
            if output_path:
                self._discard_output(output_path)
            return self.job(job.id)
        except RuntimeError:
            # Already finished elsewhere (e.g. failed by the watchdog): the first word stands.
            log.warning("job %s was already finished; ignoring a late %s", job.id, status)
            return self.job(job.id)
        self._announce_finished(done)
        return done

    def _output_name(self, output_path: str) -> str:
        """A job's ``output_path`` (relative to the config folder of the node that wrote it,
        or absolute when outside it) as a name inside this node's outputs folder."""
        path = Path(output_path)
        if path.is_absolute():
            try:
                return path.relative_to(self.outputs_dir).as_posix()
            except ValueError:
                with contextlib.suppress(OSError, ValueError):  # a link on the way, say
                    return path.resolve().relative_to(self.outputs_dir.resolve()).as_posix()
                return path.name
        return path.as_posix().removeprefix("outputs/")

    def _holds(self, job: Job) -> bool:
        """Whether this node still holds ``job`` (asked before its image is published). A
        database that is away is waited for, as for finishing a job: the image is done."""
        if job.token is None:
            return True
        return self._until_available(
            f"check the lease of job {job.id}", lambda: self.store.holds(job.id, job.token)
        )

    def _discard_output(self, output_path: str) -> None:
        try:
            self.gallery.resolve(self._output_name(output_path)).unlink()
        except (OSError, NotFound) as exc:
            log.warning("could not remove the dropped image %s: %s", output_path, exc)
        self.gallery_index.forget(self._output_name(output_path))

    def _announce_finished(self, job: Job) -> None:
        """The one way a finished job is made known: an event, the plugin hook, and the
        webhooks (their deliveries were written with the job's end)."""
        self.webhooks.wake()
        if job.status == COMPLETED:
            self.views.forget_durations()
        if job.spec.init_image:
            self.collect_inputs()
        view = self.job_view(job)
        self.events.publish(f"job.{job.status}", view)
        self._hook("imagineerd_job_finished", job=view)

    def save_later(
        self, job: Job, image: Image.Image, *, duration: float, model_label: str | None
    ) -> None:
        """Write a finished job's image on a saver thread, then mark the job completed (or
        failed, if the write fails), so the worker can start its next batch at once."""
        self.saver.save_later(job, image, duration=duration, model_label=model_label)

    def drain_saves(self) -> None:
        """Wait until every image handed to the saver is written and its job finished."""
        self.saver.drain()

    def has_queued_jobs(self) -> bool:
        return bool(self.store.queued(1))

    def jobs_requeued(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.views.progress.pop(job.id, None)
            self._progress_sent.pop(job.id, None)
            self.previews.forget(job.id)
        for job in self.store.requeue([job.id for job in jobs], count_attempt=False):
            self.events.publish("job.requeued", self.job_view(job))

    def _image_saved(
        self, job: Job, duration: float, output_path: str | None, error: BaseException | None
    ) -> None:
        if error is None:
            self.job_finished(job, COMPLETED, duration_seconds=duration, output_path=output_path)
        elif isinstance(error, Fenced):
            log.warning("job %s: %s", job.id, error)
        else:
            self.job_finished(job, FAILED, duration_seconds=duration, error=describe_failure(error))

    def _capacity(self) -> tuple[int, int]:
        """``(workers, images per batch)``: how fast the queue drains, for ETAs."""
        if self.shared:
            # Every live node's devices drain the one queue.
            live = self.node_service.live_nodes()
            devices = [d for n in live for d in n["info"].get("devices", [])]
            if devices:
                return len(devices), max(d.get("max_batch", 1) for d in devices)
        if self.supervisor is None:
            return 0, 1
        return len(self.supervisor.workers), self.supervisor.max_batch

    def _hook(self, name: str, **kwargs: Any) -> None:
        try:
            getattr(self.pm.hook, name)(**kwargs)
        except Exception:
            log.exception("plugin hook %s failed", name)
