"""The job store contract.

:class:`Store` is what the daemon and the inbox rely on; each method's docstring says which
state transition it performs and that it is atomic. :class:`~imagineerd.sqlite_store.SQLiteStore`
implements it on one SQLite file; another implementation (PostgreSQL, for several machines
sharing a queue) implements the same methods with the same atomicity, passes the same
contract suite (``tests/test_store.py``), and nothing else changes.

Queue order is a sequence number, not the id: a job put back (recovery, a clean stop) goes
*to the head* of the queue.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .jobs import Job, JobSpec

#: Claim states of an inbox file, in order: recorded before the rename (``claiming``), its
#: jobs queued (``submitted``), moved to ``done/`` with its receipt (``done``), or moved to
#: ``failed/`` with a note (``failed``).
CLAIMING, SUBMITTED, DONE, FAILED_CLAIM = "claiming", "submitted", "done", "failed"
OPEN_CLAIM_STATES = (CLAIMING, SUBMITTED)

#: Webhook delivery states: ``pending`` (due at ``next_at``) -> ``delivered`` | ``failed``.
PENDING, DELIVERED, GAVE_UP = "pending", "delivered", "failed"


@dataclass(frozen=True)
class Delivery:
    """One webhook call owed for one job's event (the outbox row). Times are Unix seconds."""

    id: int
    job_id: int
    event: str
    url: str
    state: str
    attempts: int
    created_at: float
    next_at: float
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: float | None = None

    def to_dict(self) -> dict[str, object]:
        return dict(vars(self))


@runtime_checkable
class Store(Protocol):
    """Durable jobs and inbox claims. Every method that changes state is one atomic
    transaction that checks the current status, so two workers (threads, processes or
    machines) never claim the same job and a job cannot be cancelled and started at once."""

    # -- jobs: transitions -------------------------------------------------------------
    def add(
        self,
        spec: JobSpec,
        *,
        submitted_at: str,
        source: str = "api",
        source_name: str | None = None,
    ) -> Job:
        """Insert a new job as ``queued`` at the tail of the queue."""
        ...

    def add_many(
        self,
        specs: Sequence[JobSpec],
        *,
        submitted_at: str,
        source: str = "api",
        source_name: str | None = None,
    ) -> list[Job]:
        """Insert several jobs at the tail in order, in one transaction: a worker sees all
        of them or none (so they can share one batch)."""
        ...

    def claim_batch(
        self,
        *,
        started_at: str,
        limit: int | Callable[[JobSpec], int],
        key: Callable[[JobSpec], Hashable] | None = None,
    ) -> list[Job]:
        """Move the head of the queue plus up to ``limit - 1`` later queued jobs with the
        head's ``key(spec)`` to ``running`` (attempts + 1), atomically; ``limit`` may depend
        on the head's spec. The head is always included (FIFO). Without ``key``, one job."""
        ...

    def claim_next(self, *, started_at: str) -> Job | None:
        """``claim_batch`` of one: the head of the queue, or ``None``."""
        ...

    def finish(
        self,
        job_id: int,
        status: str,
        *,
        completed_at: str,
        duration_seconds: float | None = None,
        output_path: str | None = None,
        error: str | None = None,
        progress: tuple[int, int] | None = None,
        webhooks: Sequence[str] = (),
    ) -> Job:
        """Move a ``running`` job to ``completed``, ``failed`` or ``cancelled``; raises
        ``RuntimeError`` if it is not running (the first finish stands). In the same
        transaction, a ``pending`` delivery of ``job.<status>`` to each of ``webhooks``."""
        ...

    def cancel_queued(
        self, job_id: int, *, completed_at: str, webhooks: Sequence[str] = ()
    ) -> Job | None:
        """Move a ``queued`` job to ``cancelled`` (with its deliveries, as :meth:`finish`);
        ``None`` if it was not queued."""
        ...

    def requeue(self, job_ids: Sequence[int], *, count_attempt: bool) -> list[Job]:
        """Put ``running`` jobs back at the head of the queue in the given order, in one
        transaction; others are left alone. ``count_attempt=False`` (a clean stop) gives
        back the attempt their claim counted."""
        ...

    def recover(
        self,
        *,
        max_attempts: int,
        completed_at: str,
        webhooks: Callable[[JobSpec], Sequence[str]] | None = None,
    ) -> list[Job]:
        """Start-up, in one transaction: every ``running`` job (its process died) goes back
        to the head in its order, or fails once interrupted ``max_attempts`` times (with the
        deliveries ``webhooks(spec)`` names for it). Returns the jobs touched, as they are
        now."""
        ...

    # -- webhook deliveries (the outbox) --------------------------------------------------
    def deliveries_due(self, now: float, limit: int) -> list[Delivery]:
        """``pending`` deliveries whose ``next_at`` has come, oldest first."""
        ...

    def record_delivery(
        self,
        delivery_id: int,
        *,
        now: float,
        delivered: bool,
        status: int | None = None,
        error: str | None = None,
        next_at: float | None = None,
    ) -> None:
        """One attempt of a ``pending`` delivery: ``delivered``; else tried again at
        ``next_at``, or ``failed`` for good when it is None."""
        ...

    def deliveries(self, limit: int) -> list[Delivery]:
        """The latest deliveries, newest first."""
        ...

    def delivery_counts(self) -> dict[str, int]:
        """Deliveries by state (``pending``, ``delivered``, ``failed``), every state present."""
        ...

    # -- jobs: queries -----------------------------------------------------------------
    def get(self, job_id: int) -> Job | None: ...
    def running(self) -> list[Job]: ...
    def queued(self, limit: int | None = None) -> list[Job]:
        """Queued jobs in queue order."""
        ...

    def history(self, limit: int, before: int | None = None) -> list[Job]:
        """Finished jobs, newest first; ``before`` (an id) pages on."""
        ...

    def overview(
        self, *, queued_limit: int, history_limit: int, before: int | None = None
    ) -> tuple[list[Job], list[Job], list[Job]]:
        """``(running, queued, history)`` read from one snapshot: a job is in exactly one."""
        ...

    def queue_position(self, job: Job) -> int:
        """1-based place of a queued job, 0 for a running one, -1 for a finished one."""
        ...

    def counts(self) -> dict[str, int]:
        """Number of jobs in each status (every status present)."""
        ...

    def recent_durations(self, spec: JobSpec, limit: int = 20) -> list[float]:
        """Durations of recent completed jobs, those like ``spec`` first (for ETAs)."""
        ...

    # -- inbox claims ------------------------------------------------------------------
    # A claim is recorded *before* the file is renamed out of the drop area, and its jobs
    # are inserted in the same transaction that marks it submitted, so a crash at any point
    # leaves a state that start-up can finish without losing or doubling a job.
    def create_claim(self, original: str, claimed: str, *, created_at: str) -> int:
        """Record the intent to claim ``original`` by renaming it to ``claimed``."""
        ...

    def submit_claim(
        self,
        claim_id: int,
        specs: list[JobSpec],
        *,
        submitted_at: str,
        source: str,
        source_name: str,
    ) -> list[Job]:
        """Queue every job of a claimed file and mark the claim ``submitted``, atomically.
        Idempotent: a claim already submitted returns its jobs and inserts nothing."""
        ...

    def update_claim(
        self,
        claim_id: int,
        state: str,
        *,
        final_path: str | None = None,
        note_path: str | None = None,
    ) -> None:
        """Set a claim's state (and where the file and its note went)."""
        ...

    def delete_claim(self, claim_id: int) -> None:
        """Forget a claim that is still ``claiming`` (the file was never renamed)."""
        ...

    def get_claim(self, claim_id: int) -> dict | None: ...
    def open_claims(self) -> list[dict]:
        """Claims a crash may have left half-way: ``claiming`` or ``submitted``."""
        ...

    def claim_jobs(self, claim_id: int) -> list[Job]: ...
    def close(self) -> None:
        """Release connections; later calls raise ``RuntimeError``."""
        ...
