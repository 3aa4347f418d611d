"""Prometheus metrics for ``GET /metrics``: the queue, jobs, models, GPUs, the inbox, streams.

Built on ``prometheus_client`` rather than by hand: its registry, its histograms and its
text (and OpenMetrics) exposition are exactly what a scraper expects, escaping included.
Each daemon has a registry of its own (never the library's global one), so several daemons
in one process (as in the tests) keep their numbers apart.

Where each number comes from, so that nothing here slows the worker:

- **On scrape** (a custom collector): queue depth from ``store.counts()``, worker states,
  the inbox's counts from ``daemon.health()["inbox"]``, GPU memory (only when torch has
  already initialised CUDA), open event streams.
- **Finished jobs** through the ``imagineerd_job_submitted`` / ``imagineerd_job_finished``
  hooks (the daemon calls them once per job, never per step, and the inbox registers
  itself the same way): counters by source and outcome, queue-wait, run-time and
  batch-size histograms. Exact, whatever the scrape interval.
- **Model loads** from the event bus's replay buffer, read at each scrape from the last
  event seen (``subscribe(last_id)``, then closed): no thread, no standing subscription.
  Should more than the buffer's 2000 state events pass between two scrapes, the loads in
  between are lost, which is logged.

A scrape never raises: a part that fails is skipped, logged (at most once per
``ERROR_LOG_SECONDS`` for that part) and counted in ``imagineerd_metrics_errors_total``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from . import __version__, hookimpl
from .events import Subscription
from .jobs import QUEUED, RUNNING

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger(__name__)

#: Minimum seconds between two log lines for the same broken part of a scrape.
ERROR_LOG_SECONDS = 600.0
#: A batch's jobs share ``started_at``; they are counted as one batch once none of them
#: has finished for this long (their images are written on saver threads, one by one).
BATCH_SETTLE_SECONDS = 5.0

# Generation takes seconds to minutes; a queue can hold a day's work.
RUN_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
WAIT_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
LOAD_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)

#: Label values known in advance: where jobs come from, how they end, parts of a scrape.
SOURCES = ("api", "inbox", "cli")
OUTCOMES = ("completed", "failed", "cancelled")
PARTS = ("info", "queue", "health", "gpu", "streams", "events", "jobs")


class StreamCount(Protocol):
    """What the metrics read of the HTTP server's event streams (``StreamLimiter``)."""

    open: int
    limit: int


def seconds_between(start: str | None, end: str | None) -> float | None:
    """Seconds from one job timestamp (``jobs.iso``) to another; ``None`` if either is
    missing or unreadable, or the clock went backwards."""
    if not start or not end:
        return None
    try:
        seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except (TypeError, ValueError):
        return None
    return seconds if seconds >= 0 else None


class _Scrape:
    """The collector read at each scrape (prometheus_client calls ``collect``)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.collect_state()


class Metrics:
    """The daemon's metrics: create one per daemon (``Daemon.__init__`` does); the HTTP app
    serves :meth:`exposition` and tells it about event streams (:attr:`streams`)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        #: The HTTP server's stream counter, set by ``create_app``; ``None`` without one.
        self.streams: StreamCount | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self._sync_lock = threading.Lock()
        self._job_lock = threading.Lock()
        self._last_event = daemon.events.position  # count model events from here
        self._last_ready: str | None = None
        self._batches: dict[str, list[float]] = {}  # started_at -> [jobs, last finish]
        self._error_logged: dict[str, float] = {}
        r = self.registry
        # First: what it counts at a scrape (failed parts, settled batches) is in that scrape.
        r.register(_Scrape(self))
        self.submitted = Counter(
            "imagineerd_jobs_submitted_total", "Jobs queued, by source.", ["source"], registry=r
        )
        self.finished = Counter(
            "imagineerd_jobs_total",
            "Jobs finished, by source and outcome (completed, failed, cancelled).",
            ["source", "outcome"],
            registry=r,
        )
        # rate() of these gives images per minute (x60) and denoising steps per second.
        self.images = Counter("imagineerd_images_total", "Images written.", registry=r)
        self.steps = Counter(
            "imagineerd_denoising_steps_total",
            "Denoising steps run by completed jobs (a hires fix counts both passes).",
            registry=r,
        )
        self.queue_wait = Histogram(
            "imagineerd_job_queue_wait_seconds",
            "Time from submission to start, of jobs that started.",
            ["source"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.run_time = Histogram(
            "imagineerd_job_run_seconds",
            "Generation time of finished jobs that ran (a job's time is its batch's).",
            ["outcome"],
            buckets=RUN_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "imagineerd_batch_size",
            "Jobs per batch (jobs that started together and finished).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.model_loads = Counter(
            "imagineerd_model_loads_total",
            "Model loads started, by source (disk, or memory: the CPU cache).",
            ["source"],
            registry=r,
        )
        self.model_failures = Counter(
            "imagineerd_model_load_failures_total", "Model loads that failed.", registry=r
        )
        self.model_switches = Counter(
            "imagineerd_model_switches_total",
            "Models made ready that differ from the one made ready before.",
            registry=r,
        )
        self.model_load_time = Histogram(
            "imagineerd_model_load_seconds",
            "Time to make a model ready.",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "imagineerd_metrics_errors_total",
            "Parts of a scrape that failed and were left out.",
            ["part"],
            registry=r,
        )
        # Known label values start at 0, so a first job shows in rate() and no panel is
        # empty before it (Prometheus's advice on labels known in advance).
        for source in SOURCES:
            self.submitted.labels(source)
            self.queue_wait.labels(source)
            for outcome in OUTCOMES:
                self.finished.labels(source, outcome)
        for outcome in OUTCOMES:
            self.run_time.labels(outcome)
        for source in ("disk", "memory"):
            self.model_loads.labels(source)
        for part in PARTS:
            self.errors.labels(part)
        # Job hooks: the same way the inbox hears of jobs (a distinct name per daemon).
        daemon.pm.register(self, name=f"imagineerd-metrics-{id(self)}")

    # -- exposition ----------------------------------------------------------------------
    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """``(body, content type)`` for a scrape: OpenMetrics when ``accept`` asks for it
        (Prometheus does), else the text format 0.0.4."""
        encoder, content_type = choose_encoder(accept or "")
        self.read_events()
        return encoder(self.registry), content_type

    def collect_state(self) -> Iterator[Metric]:
        """The metrics read on scrape; each part on its own, so a broken one is skipped."""
        self._flush_batches(time.monotonic())
        parts: list[tuple[str, Callable[[], list[Metric]]]] = [
            ("info", self._info),
            ("queue", self._queue),
            ("health", self._health),
            ("gpu", self._gpu),
            ("streams", self._streams),
            ("webhooks", self._webhooks),
        ]
        for part, read in parts:
            try:
                found = read()
            except Exception:
                self._failed(part)
                continue
            yield from found

    def _failed(self, part: str) -> None:
        self.errors.labels(part).inc()
        now = time.monotonic()
        if now - self._error_logged.get(part, -ERROR_LOG_SECONDS) >= ERROR_LOG_SECONDS:
            self._error_logged[part] = now
            log.exception("metrics: could not read %s; left out of the scrape", part)

    # -- read on scrape --------------------------------------------------------------------
    def _info(self) -> list[Metric]:
        info = GaugeMetricFamily(
            "imagineerd_info", "This daemon: version and backend.", labels=["version", "backend"]
        )
        info.add_metric([__version__, str(self.daemon.config["model"]["backend"])], 1)
        return [info]

    def _queue(self) -> list[Metric]:
        counts = self.daemon.store.counts()
        queue = GaugeMetricFamily(
            "imagineerd_queue_jobs", "Jobs in the queue now, by state.", labels=["state"]
        )
        for state in (QUEUED, RUNNING):
            queue.add_metric([state], counts.get(state, 0))
        return [queue]

    def _webhooks(self) -> list[Metric]:
        deliveries = GaugeMetricFamily(
            "imagineerd_webhook_deliveries",
            "Webhook deliveries by state: pending (owed), delivered, failed (given up).",
            labels=["state"],
        )
        for state, count in sorted(self.daemon.store.delivery_counts().items()):
            deliveries.add_metric([state], count)
        return [deliveries]

    def _health(self) -> list[Metric]:
        health = self.daemon.health()
        found: list[Metric] = []
        workers = GaugeMetricFamily(
            "imagineerd_worker_state",
            "Each worker's backend state (1 for the current one: loading, ready, error, ...).",
            labels=["device", "state"],
        )
        for worker in health.get("workers") or []:
            workers.add_metric([str(worker.get("device")), str(worker.get("state"))], 1)
        found.append(workers)
        inbox = health.get("inbox")
        if isinstance(inbox, dict):
            found += self._inbox(inbox)
        return found

    def _inbox(self, inbox: dict[str, Any]) -> list[Metric]:
        """The inbox's own counts (``Inbox.status``): whatever numbers it reports."""
        files = CounterMetricFamily(
            "imagineerd_inbox_files",
            "Prompt files the inbox handled since start, by outcome (taken: queued; "
            "failed: moved to inbox/failed/).",
            labels=["outcome"],
        )
        for outcome in ("taken", "failed"):
            if isinstance(inbox.get(outcome), int):
                files.add_metric([outcome], inbox[outcome])
        found: list[Metric] = [files]
        for key, name, text in (
            ("rescans", "imagineerd_inbox_rescans", "Full rescans of the inbox since start."),
            ("restarts", "imagineerd_inbox_restarts", "Restarts of the inbox's file watcher."),
        ):
            if isinstance(inbox.get(key), int):
                found.append(CounterMetricFamily(name, text, value=inbox[key]))
        for key, name, text in (
            ("pending", "imagineerd_inbox_pending_files", "Files waiting to settle."),
            (
                "waiting_for_images",
                "imagineerd_inbox_waiting_files",
                "Prompt files waiting for the images they name.",
            ),
        ):
            if isinstance(inbox.get(key), int):
                found.append(GaugeMetricFamily(name, text, value=inbox[key]))
        up = GaugeMetricFamily(
            "imagineerd_inbox_up", "1 while the inbox is watching its folder, else 0."
        )
        up.add_metric([], 1 if inbox.get("state") == "watching" else 0)
        found.append(up)
        return found

    def _gpu(self) -> list[Metric]:
        # Only a torch the backend already imported, with CUDA already initialised: a scrape
        # must never import torch or create a CUDA context from an HTTP thread.
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return []
        allocated = GaugeMetricFamily(
            "imagineerd_gpu_memory_allocated_bytes",
            "GPU memory held by tensors (torch.cuda.memory_allocated).",
            labels=["device"],
        )
        reserved = GaugeMetricFamily(
            "imagineerd_gpu_memory_reserved_bytes",
            "GPU memory reserved by torch's caching allocator (torch.cuda.memory_reserved).",
            labels=["device"],
        )
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            allocated.add_metric([device], torch.cuda.memory_allocated(index))
            reserved.add_metric([device], torch.cuda.memory_reserved(index))
        return [allocated, reserved]

    def _streams(self) -> list[Metric]:
        if self.streams is None:
            return []
        return [
            GaugeMetricFamily(
                "imagineerd_event_streams_open",
                "Open event streams (GET /api/events); each holds a server thread.",
                value=self.streams.open,
            ),
            GaugeMetricFamily(
                "imagineerd_event_streams_limit",
                "Most event streams served at once (server.max_event_streams).",
                value=self.streams.limit,
            ),
        ]

    # -- model events, from the replay buffer ----------------------------------------------
    def read_events(self) -> None:
        """Count the model events published since the last scrape."""
        with self._sync_lock:
            try:
                self._read_events()
            except Exception:
                self._failed("events")

    def _read_events(self) -> None:
        sub = self.daemon.events.subscribe(self._last_event)
        try:
            # What was held when we subscribed, and what came meanwhile; never more than
            # that, so a stream of progress events cannot keep a scrape here.
            for _ in range(len(sub.backlog) + 1000):
                event = sub.get(timeout=0)
                if event is None:
                    break
                self._last_event = max(self._last_event, event.id)
                if event.type == "reset":
                    log.warning(
                        "metrics: more events came since the last scrape than the daemon "
                        "holds; model loads in between are not counted"
                    )
                elif event.type.startswith("model.") and event.node in (None, self.daemon.node):
                    # On a shared queue the bus carries every node's events; each node's
                    # /metrics counts its own model loads (Prometheus sums the nodes).
                    self._model_event(event.type, event.data)
        except Subscription.Dropped:
            pass
        finally:
            sub.close()

    def _model_event(self, type: str, data: dict[str, Any]) -> None:
        if type == "model.loading":
            self.model_loads.labels(str(data.get("from") or "unknown")).inc()
        elif type == "model.failed":
            self.model_failures.inc()
        elif type == "model.ready":
            seconds = data.get("seconds")
            if isinstance(seconds, int | float) and seconds >= 0:
                self.model_load_time.observe(seconds)
            name = data.get("name")
            if self._last_ready is not None and name != self._last_ready:
                self.model_switches.inc()
            self._last_ready = name

    # -- job hooks: called by the daemon once per job ---------------------------------------
    @hookimpl
    def imagineerd_job_submitted(self, job: dict[str, Any]) -> None:
        try:
            self.submitted.labels(str(job.get("source") or "unknown")).inc()
        except Exception:  # a hook that raises would stop the other plugins' hooks
            self._failed("jobs")

    @hookimpl
    def imagineerd_job_finished(self, job: dict[str, Any]) -> None:
        try:
            self._job_finished(job)
        except Exception:
            self._failed("jobs")

    def _job_finished(self, job: dict[str, Any]) -> None:
        source = str(job.get("source") or "unknown")
        outcome = str(job.get("status"))
        self.finished.labels(source, outcome).inc()
        if outcome == "completed":
            self.images.inc()
            progress = job.get("progress") or {}
            steps = progress.get("total") or job.get("steps")
            if isinstance(steps, int) and steps > 0:
                self.steps.inc(steps)
        started = job.get("started_at")
        if not started:
            return  # cancelled while queued: it never waited to the end, nor ran
        wait = seconds_between(job.get("submitted_at"), started)
        if wait is not None:
            self.queue_wait.labels(source).observe(wait)
        run = job.get("duration_seconds")
        if not isinstance(run, int | float):
            run = seconds_between(started, job.get("completed_at"))
        if run is not None and run >= 0:
            self.run_time.labels(outcome).observe(run)
        now = time.monotonic()
        with self._job_lock:
            batch = self._batches.setdefault(str(started), [0, now])
            batch[0] += 1
            batch[1] = now
        self._flush_batches(now)

    def _flush_batches(self, now: float) -> None:
        """Count the batches none of whose jobs finished for ``BATCH_SETTLE_SECONDS``."""
        with self._job_lock:
            settled = [
                key for key, (_, last) in self._batches.items()
                if now - last >= BATCH_SETTLE_SECONDS
            ]  # fmt: skip
            sizes = [self._batches.pop(key)[0] for key in settled]
        for size in sizes:
            self.batch_size.observe(size)
