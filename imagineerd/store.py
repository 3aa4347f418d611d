"""The job store contract.

:class:`Store` is what the daemon and the inbox rely on; each method's docstring says which
state transition it performs and that it is atomic. :class:`~imagineerd.sqlite_store.SQLiteStore`
implements it on one SQLite file; :class:`~imagineerd.pg_store.PostgresStore` on a PostgreSQL
database that several machines share. Both pass the same contract suite
(``tests/test_store.py``); :func:`imagineerd.stores.open_store` picks one by
``queue.database``, and nothing else changes.

Queue order is a sequence number, not the id: a job put back (recovery, a clean stop) goes
*to the head* of the queue.

Several daemons ("nodes", each named by ``queue.node_name``) may share one store. A claim
gives the running job to a node with a *lease* and a *token*: the node's heartbeat renews
the lease (:meth:`Store.renew_leases`); when a node dies its leases run out and another node
puts the jobs back (:meth:`Store.expire_leases`); a late result from the dead node is
refused because it no longer holds the token (:meth:`Store.finish` with ``token``). Lease
times are read from the store's own clock, so nodes need not agree on the time.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from .jobs import QUEUED, RUNNING, Job, JobSpec

#: Claim states of an inbox file, in order: recorded before the rename (``claiming``), its
#: jobs queued (``submitted``), moved to ``done/`` with its receipt (``done``), or moved to
#: ``failed/`` with a note (``failed``).
CLAIMING, SUBMITTED, DONE, FAILED_CLAIM = "claiming", "submitted", "done", "failed"
OPEN_CLAIM_STATES = (CLAIMING, SUBMITTED)
#: The same, as SQL literals (partial indexes match literals, not parameters).
OPEN_CLAIM_STATES_SQL = "('claiming', 'submitted')"

#: Webhook delivery states: ``pending`` (due at ``next_at``) -> ``delivered`` | ``failed``.
PENDING, DELIVERED, GAVE_UP = "pending", "delivered", "failed"


#: Bumped with every schema change, which comes with a migration from the version before.
#: 2: job specs may carry model, loras, clip_skip and vae. Specs stored by version 1 read
#: with their defaults (the configured model, no LoRAs, clip skip 1, its own VAE), so the
#: migration changes no row; the number is bumped so that an older imagineerd, which cannot
#: read those fields, refuses the database instead of failing on its jobs.
#: 3: the ``deliveries`` table (webhooks); created empty on a version 2 database.
#: 4: nodes sharing a queue: ``jobs.node``/``token``/``lease_until``/``interrupt``,
#: ``claims.node`` (added empty to older rows: no node, no lease), the ``nodes`` and
#: ``settings`` tables, and one open claim per inbox file. The PostgreSQL store has the
#: same number for the same schema (the tables the SQLite one has, in its types).
#: 5: the gallery index, the ``outputs`` table (one row per PNG of the outputs folder, with
#: its favourite and trash marks and the node that indexed it); created empty on a version 4
#: database, which changes no job, and filled by the daemon's first pass over the folder.
SCHEMA_VERSION = 5


def new_token() -> str:
    """A fresh claim token: 64 random bits, never reused in practice."""
    return secrets.token_hex(8)


#: Why a job was taken from its node: the daemon died (found at its start-up), or its node
#: stopped renewing the lease (found by another node).
STOPPED = "the daemon stopped unexpectedly while this job ran"
LEASE_LOST = "the node running this job stopped answering (its lease ran out)"


def lost_error(why: str, attempts: int, max_attempts: int) -> str:
    """Why a job failed whose node kept dying (or losing its lease) while it ran."""
    return (
        f"{why}, {attempts} times; giving up so the queue can go on "
        f"(queue.max_attempts is {max_attempts})"
    )


def positions_from(
    jobs: Sequence[Job], queued_between: Callable[[list[int]], tuple[int, list[int]]]
) -> list[int]:
    """:meth:`Store.queue_positions` from one look at the queue around the queued ones:
    ``queued_between(ids)`` is how many queued jobs are ahead of the first of them, and the
    ids of the queued jobs from the first of them to the last, in queue order."""
    queued = [job.id for job in jobs if job.status == QUEUED]
    ahead, order = queued_between(queued) if queued else (0, [])
    places = {job_id: ahead + i + 1 for i, job_id in enumerate(order)}
    return [
        # One that left the queue meanwhile was at its head.
        places.get(job.id, ahead + 1)
        if job.status == QUEUED
        else 0
        if job.status == RUNNING
        else -1
        for job in jobs
    ]


#: Where :meth:`Store.move` may send a queued job: the head, one place either way, or a
#: 1-based place (an int).
MOVE_WORDS = ("top", "up", "down")


@dataclass(frozen=True)
class Moved:
    """What :meth:`Store.move` did: the job's place before and after (1-based, among the
    queued jobs), and the ids of the queued jobs from the nearer of the two places to the
    farther, in their new order (every other job kept its place)."""

    job_id: int
    old: int
    new: int
    order: list[int]


def move_target(to: str | int, place: int, length: int) -> int:
    """The 0-based index a job at 0-based ``place`` of a queue ``length`` long goes to."""
    if to == "top":
        return 0
    if to == "up":
        return max(place - 1, 0)
    if to == "down":
        return min(place + 1, length - 1)
    if isinstance(to, bool) or not isinstance(to, int) or to < 1:
        raise ValueError(f"cannot move a job to {to!r}")
    return min(to, length) - 1  # past the tail: the tail


def reordered(rows: Sequence[tuple[int, int]], job_id: int, target: int) -> list[tuple[int, int]]:
    """``(seq, id)`` pairs that give job ``job_id`` the 0-based place ``target`` among
    ``rows`` (the queued ``(id, seq)`` from the nearer place to the farther, in queue
    order): the window's own sequence numbers, dealt out again in the new order. No number
    outside the window is taken, so a job added at the tail or put back at the head
    meanwhile cannot share a place with one of them."""
    ids = [job_id_ for job_id_, _ in rows]
    ids.remove(job_id)
    ids.insert(target, job_id)
    return list(zip((seq for _, seq in rows), ids, strict=True))


@dataclass(frozen=True)
class ClaimSubmission:
    """One claimed inbox file's jobs, for :meth:`Store.submit_claims`, and where the file and
    its receipt will go (recorded with the jobs, so a crash after the commit knows)."""

    claim_id: int
    specs: list[JobSpec]
    source_name: str
    final_path: str | None = None
    note_path: str | None = None


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


class Fenced(RuntimeError):
    """A node finished (or checked) a job whose claim it no longer holds: its lease ran
    out and the job went back to the queue or to another node. The late result is dropped."""


@dataclass(frozen=True)
class OutputRecord:
    """One PNG of the outputs folder as the gallery index holds it (the ``outputs`` table).

    ``path`` is where the file is now, relative to the outputs folder with ``/`` between
    folders: ``.trash/...`` once it was deleted. ``filename`` is the name it is listed (and
    restored) under; the two are equal outside the trash. ``entry`` is the gallery entry the
    API answers with (``Gallery.read_own_entry``); the other fields are what listings filter on, and
    ``size_bytes``/``mtime_ns`` tell a file changed since it was read. ``node`` is the node
    that read the file last: nodes of one queue may each have an outputs folder of their own,
    and a node drops only the rows it indexed (it cannot tell another node's file is gone)."""

    path: str
    filename: str
    created: str
    size_bytes: int
    mtime_ns: int
    entry: dict[str, Any]
    job_id: int | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    model: str | None = None
    width: int | None = None
    height: int | None = None
    source: str | None = None
    favourite: bool = False
    #: Unix seconds when it went to the trash; ``None`` while it is listed.
    trashed_at: float | None = None
    node: str | None = None

    @property
    def name(self) -> str:
        """The last part of ``filename``: listings go newest first by it, as our file names
        start with their time."""
        return self.filename.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class OutputQuery:
    """What a gallery listing keeps (every field given must hold): ``text`` a substring of
    the prompt, compared case-folded (``str.casefold``); ``since``/``until`` bounds on
    ``created`` as the entry writes it (``YYYY-MM-DDTHH:MM:SS.ffffff``, local time),
    inclusive."""

    text: str | None = None
    model: str | None = None
    source: str | None = None
    favourite: bool | None = None
    width: int | None = None
    height: int | None = None
    since: str | None = None
    until: str | None = None


#: The ``outputs`` columns in table order, as :func:`output_row` gives them. ``search`` is
#: the prompt case-folded, so a substring search is the same on both stores and ignores
#: case beyond ASCII (SQLite's ``LIKE`` and ``lower`` fold ASCII only).
OUTPUT_COLUMNS = (
    "path",
    "filename",
    "name",
    "job_id",
    "created",
    "prompt",
    "search",
    "negative_prompt",
    "model",
    "width",
    "height",
    "source",
    "favourite",
    "trashed_at",
    "size_bytes",
    "mtime_ns",
    "entry",
    "node",
)


class OutputStat(NamedTuple):
    """What a pass compares a file with (:meth:`Store.output_stats`): the size and mtime it
    had when it was read, and the node that read it."""

    size_bytes: int
    mtime_ns: int
    node: str | None


def output_row(record: OutputRecord) -> tuple[Any, ...]:
    """The values of :data:`OUTPUT_COLUMNS` for one record."""
    return (
        record.path,
        record.filename,
        record.name,
        record.job_id,
        record.created,
        record.prompt,
        record.prompt.casefold() if record.prompt else None,
        record.negative_prompt,
        record.model,
        record.width,
        record.height,
        record.source,
        bool(record.favourite),
        record.trashed_at,
        record.size_bytes,
        record.mtime_ns,
        json.dumps(record.entry, ensure_ascii=False),
        record.node,
    )


def output_record(row: Mapping[str, Any]) -> OutputRecord:
    """A row of the ``outputs`` table (by column name) as a record."""
    return OutputRecord(
        path=row["path"],
        filename=row["filename"],
        created=row["created"],
        size_bytes=row["size_bytes"],
        mtime_ns=row["mtime_ns"],
        entry=json.loads(row["entry"]),
        job_id=row["job_id"],
        prompt=row["prompt"],
        negative_prompt=row["negative_prompt"],
        model=row["model"],
        width=row["width"],
        height=row["height"],
        source=row["source"],
        favourite=bool(row["favourite"]),
        trashed_at=row["trashed_at"],
        node=row["node"],
    )


def put_outputs_sql(mark: str) -> str:
    """The upsert of :meth:`Store.put_outputs` with ``mark`` as the parameter placeholder
    (both stores speak this SQL): what the file says is replaced, and the node is the one
    that read it now; what only the index knows (name listed under, favourite, time trashed)
    is kept."""
    kept = {"path", "filename", "name", "favourite", "trashed_at"}
    updated = ", ".join(f"{c} = EXCLUDED.{c}" for c in OUTPUT_COLUMNS if c not in kept)
    return (
        f"INSERT INTO outputs ({', '.join(OUTPUT_COLUMNS)})"
        f" VALUES ({', '.join([mark] * len(OUTPUT_COLUMNS))})"
        f" ON CONFLICT (path) DO UPDATE SET {updated},"
        " trashed_at = COALESCE(outputs.trashed_at, EXCLUDED.trashed_at)"
    )


def output_filters(
    query: OutputQuery, before: str | None, *, mark: str, contains: str, true: str
) -> tuple[str, list[Any]]:
    """The ``WHERE`` clause (and its parameters) of :meth:`Store.list_outputs`: ``contains``
    is the engine's substring test with ``{}`` for the placeholder, ``true`` its literal for
    true (the partial index of favourites names it, and a parameter would not match it)."""
    clauses, args = ["trashed_at IS NULL"], []
    if before is not None:
        clauses.append(f"(name, path) < ({mark}, {mark})")
        args += [before.rsplit("/", 1)[-1], before]
    if query.text:
        clauses.append(contains.format(mark))
        args.append(query.text.casefold())
    for column in ("model", "source", "width", "height"):
        value = getattr(query, column)
        if value is not None:
            clauses.append(f"{column} = {mark}")
            args.append(value)
    if query.favourite is not None:
        clauses.append(f"favourite = {true}" if query.favourite else f"NOT favourite = {true}")
    if query.since is not None:
        clauses.append(f"created >= {mark}")
        args.append(query.since)
    if query.until is not None:
        clauses.append(f"created <= {mark}")
        args.append(query.until)
    return " AND ".join(clauses), args


def trashed_query(
    *, limit: int, trashed_before: float | None, after: tuple[float, str] | None, mark: str
) -> tuple[str, list[Any]]:
    """The ``SELECT`` (and its parameters) of :meth:`Store.trashed_outputs`, last trashed
    first, paged by ``after``: the ``(trashed_at, path)`` of the previous page's last row."""
    where, args = "trashed_at IS NOT NULL", []
    if trashed_before is not None:
        where += f" AND trashed_at < {mark}"
        args.append(trashed_before)
    if after is not None:
        where += f" AND (trashed_at, path) < ({mark}, {mark})"
        args += list(after)
    sql = f"SELECT * FROM outputs WHERE {where} ORDER BY trashed_at DESC, path DESC LIMIT {mark}"
    return sql, [*args, limit]


def latest_trashed(records: Sequence[OutputRecord]) -> dict[str, OutputRecord]:
    """By ``filename``, the record of each name that went to the trash last (a name may be
    in the trash more than once: deleted, made again, deleted again)."""
    found: dict[str, OutputRecord] = {}
    for record in sorted(records, key=lambda r: (r.trashed_at or 0.0, r.path)):
        found[record.filename] = record
    return found


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
        node: str = "",
        lease_seconds: float = 30.0,
    ) -> list[Job]:
        """Move the head of the queue plus up to ``limit - 1`` later queued jobs with the
        head's ``key(spec)`` to ``running`` (attempts + 1), atomically; ``limit`` may depend
        on the head's spec. The head is always included (FIFO). Without ``key``, one job.
        The jobs get ``node``, a new ``token`` each and a lease ``lease_seconds`` long;
        without a node (``""``, a one-off claimer such as ``imagineerd generate``) they get
        no node and no lease: no other node expires them, a start-up's :meth:`recover` puts
        them back, as before nodes existed.
        Two claimers at once (threads, processes, machines) never get the same job, and
        neither waits for the other's lookahead (``SKIP LOCKED`` where the engine has it)."""
        ...

    def claim_next(
        self, *, started_at: str, node: str = "", lease_seconds: float = 30.0
    ) -> Job | None:
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
        token: str | None = None,
    ) -> Job:
        """Move a ``running`` job to ``completed``, ``failed`` or ``cancelled``; raises
        ``RuntimeError`` if it is not running (the first finish stands), and :class:`Fenced`
        (a ``RuntimeError`` too) if ``token`` is given and the job does not carry it,
        whatever its status (its lease was lost: it went back to the queue, to another
        node, or was finished there); a finished job keeps its token, so finishing twice
        under the same one is the plain ``RuntimeError``. In the same transaction, a
        ``pending`` delivery of ``job.<status>`` to each of ``webhooks``."""
        ...

    def holds(self, job_id: int, token: str) -> bool:
        """Whether the job is still ``running`` under this claim ``token`` (a node checks
        before it publishes a result; :meth:`finish` with the token is the real fence)."""
        ...

    # -- leases and nodes ----------------------------------------------------------------
    def renew_leases(self, node: str, *, lease_seconds: float) -> None:
        """Extend the lease of every job ``node`` runs to ``lease_seconds`` from now."""
        ...

    def interrupts(self, node: str) -> dict[int, str]:
        """``{job id: reason}`` for the running jobs of ``node`` another node asked to
        interrupt. A read only: a node asks twice a second, and renews far less often."""
        ...

    def request_interrupt(self, job_id: int, reason: str) -> bool:
        """Ask the node running the job to stop it (seen at its next :meth:`interrupts`);
        ``False`` if the job is not running. The first reason stands."""
        ...

    def expire_leases(
        self,
        *,
        max_attempts: int,
        completed_at: str,
        webhooks: Callable[[JobSpec], Sequence[str]] | None = None,
    ) -> list[Job]:
        """In one transaction, every ``running`` job whose lease has run out (its node died
        or lost the database) goes back to the head of the queue, its attempt counted, or
        fails once ``max_attempts`` are used (with its deliveries). Returns them as now.
        A job without a lease (claimed before leases existed) is left to :meth:`recover`."""
        ...

    def heartbeat(self, node: str, info: dict[str, Any]) -> None:
        """Record that ``node`` is alive now (the store's clock), with what it reports
        (``info``: version, devices, state); creates the node on first call."""
        ...

    def nodes(self) -> list[dict[str, Any]]:
        """Every node seen: ``name``, ``info``, ``started_at``, ``heartbeat_at`` (Unix
        seconds) and ``age`` (seconds since its last heartbeat), by name."""
        ...

    # -- settings shared by every node (generation defaults) ------------------------------
    def get_setting(self, key: str) -> Any | None:
        """A JSON value shared by every node of this store, or ``None``."""
        ...

    def put_setting(self, key: str, value: Any) -> None:
        """Store a JSON value for every node (replaces the previous one)."""
        ...

    def cancel_queued(
        self, job_id: int, *, completed_at: str, webhooks: Sequence[str] = ()
    ) -> Job | None:
        """Move a ``queued`` job to ``cancelled`` (with its deliveries, as :meth:`finish`);
        ``None`` if it was not queued."""
        ...

    def move(self, job_id: int, to: str | int) -> Moved | None:
        """Move a ``queued`` job in the queue, atomically: to the head (``"top"``), one place
        towards the head (``"up"``) or the tail (``"down"``), or to the 1-based place ``to``
        (past the tail: to the tail). The jobs in between shift by one; every other job keeps
        its place. ``None`` if the job is not queued (unknown, running or finished);
        ``ValueError`` for any other ``to``. A move to where the job is changes nothing."""
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
        node: str = "",
    ) -> list[Job]:
        """Start-up of ``node``, in one transaction: every ``running`` job its previous life
        held (or held by no node: written before nodes existed) goes back to the head in its
        order, or fails once interrupted ``max_attempts`` times (with the deliveries
        ``webhooks(spec)`` names for it). Other nodes' jobs are left to their leases.
        Returns the jobs touched, as they are now."""
        ...

    # -- webhook deliveries (the outbox) --------------------------------------------------
    def deliveries_due(self, now: float, limit: int, *, hold: float = 0.0) -> list[Delivery]:
        """``pending`` deliveries whose ``next_at`` has come, oldest first. With ``hold``,
        atomically taken for that many seconds (their ``next_at`` moves to ``now + hold``),
        so the delivery thread of another node sharing the store does not send them too; if
        this one dies before it records the attempt, they are due again after the hold."""
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
    def running(self, node: str | None = None) -> list[Job]:
        """Running jobs in queue order; when ``node`` is given, only those it holds and those
        of no node (which its start-up takes as its own, as :meth:`recover` does)."""
        ...

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

    def queue_positions(self, jobs: Sequence[Job]) -> list[int]:
        """:meth:`queue_position` of each job, read in two queries however many they are
        (the jobs of a burst, just queued together)."""
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
    def create_claim(
        self, original: str, claimed: str, *, created_at: str, node: str = ""
    ) -> int | None:
        """Record ``node``'s intent to claim ``original`` (a path relative to the inbox) by
        renaming it to ``claimed``; ``None`` if an open claim of ``original`` exists already
        (another node took it first: the file is theirs)."""
        ...

    def create_claims(
        self, items: Sequence[tuple[str, str]], *, created_at: str, node: str = ""
    ) -> list[int | None]:
        """:meth:`create_claim` for many ``(original, claimed)`` pairs in one transaction
        (a burst of files costs one commit); ``None`` where the file is claimed already."""
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

    def submit_claims(
        self, items: Sequence[ClaimSubmission], *, submitted_at: str, source: str
    ) -> list[list[Job]]:
        """:meth:`submit_claim` for many claims in one transaction (a burst of files costs
        one commit), each also recording where its file and receipt go (``final_path``,
        ``note_path``, when given) as it becomes ``submitted``. Returns each claim's jobs,
        in the order given; a claim already submitted keeps its jobs and its paths."""
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

    def update_claims(self, claim_ids: Sequence[int], state: str) -> None:
        """Set the state of many claims in one transaction (a burst's receipts written)."""
        ...

    def delete_claim(self, claim_id: int) -> None:
        """Forget a claim that is still ``claiming`` (the file was never renamed)."""
        ...

    def get_claim(self, claim_id: int) -> dict | None: ...
    def open_claims(self, node: str | None = None) -> list[dict]:
        """Claims a crash may have left half-way: ``claiming`` or ``submitted``; only
        ``node``'s (and those of no node) when given."""
        ...

    def claim_jobs(self, claim_id: int) -> list[Job]: ...
    def claims_with_jobs(self, claim_ids: Sequence[int]) -> list[tuple[dict | None, list[Job]]]:
        """:meth:`get_claim` and :meth:`claim_jobs` of many claims, in two queries (a
        burst's receipts); ``(None, [])`` for an unknown id."""
        ...

    # -- the gallery index: one row per PNG of the outputs folder ---------------------------
    # Several nodes may share the outputs folder and this index, and each reconciles the
    # folder with it: every write is an idempotent upsert or delete by path.
    def put_outputs(self, records: Sequence[OutputRecord]) -> None:
        """Insert or update rows by ``path``, in one transaction. A row there already keeps
        its ``filename``, its ``favourite`` and its ``trashed_at`` (when it has one): what a
        file's metadata cannot say; its ``node`` becomes the record's (the node that read the
        file last)."""
        ...

    def move_output(self, old_path: str, record: OutputRecord) -> OutputRecord:
        """A file moved (into the trash, or back out of it), in one transaction: the row at
        ``old_path`` goes and ``record`` takes its place (replacing any row at its path),
        with the old row's ``favourite`` when there was one. Returns the row as stored."""
        ...

    def drop_outputs(self, paths: Sequence[str]) -> int:
        """Delete the rows at ``paths`` (files found gone, or purged); how many there were."""
        ...

    def output_stats(self) -> dict[str, OutputStat]:
        """``{path: (size_bytes, mtime_ns, node)}`` of every row, trashed ones included: what
        a pass over the folder compares the files with."""
        ...

    def list_outputs(
        self, query: OutputQuery, *, limit: int, before: str | None = None
    ) -> list[OutputRecord]:
        """Rows not in the trash that match ``query``, newest first: by :attr:`OutputRecord.
        name` then ``path``, both descending; ``before`` (a filename from a previous page)
        pages on."""
        ...

    def find_outputs(
        self, filenames: Sequence[str], *, trashed: bool = False
    ) -> dict[str, OutputRecord]:
        """By filename, the rows of those names that are listed, or with ``trashed`` those
        in the trash (of a name there more than once, the one trashed last). Unknown names
        are left out."""
        ...

    def outputs_at(self, paths: Sequence[str]) -> dict[str, OutputRecord]:
        """By path, the rows at ``paths`` (listed or in the trash); unknown paths are left
        out."""
        ...

    def set_favourite(self, filename: str, favourite: bool) -> OutputRecord | None:
        """Mark a listed image a favourite or not; ``None`` if no such image is listed."""
        ...

    def trashed_outputs(
        self,
        *,
        limit: int,
        trashed_before: float | None = None,
        after: tuple[float, str] | None = None,
    ) -> list[OutputRecord]:
        """Rows in the trash, the last trashed first (by ``trashed_at``, then ``path``, both
        descending); only those trashed before ``trashed_before`` (Unix seconds) when given
        (what is due to be purged); ``after`` (the ``(trashed_at, path)`` of the last row of
        a previous page) pages on."""
        ...

    def close(self) -> None:
        """Release connections; later calls raise :class:`~imagineerd.errors.StoreClosed`
        (a ``RuntimeError``)."""
        ...
