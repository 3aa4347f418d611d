"""The job store on PostgreSQL: one queue that several nodes (machines) share.

Connections come from a pool (``psycopg_pool``), so the HTTP threads, the workers and the
inbox share a few connections. Every method is one transaction: a claim takes the head with
``FOR UPDATE SKIP LOCKED`` (two nodes never wait for each other's claim, and never get the
same job); transitions re-check the status under the row lock. Times the contract reads from
"the store's clock" (leases, node heartbeats) are the database server's, so the nodes' own
clocks need not agree. The contract each method keeps is documented on
:class:`imagineerd.store.Store`.

Losing the server is an :class:`~imagineerd.errors.Unavailable` (the request can simply be
retried), never a raw driver error; a pooled connection found dead (the server restarted)
is replaced and the call retried once where that is safe (reads, idempotent statements,
transactions that had not reached their COMMIT). While the server is away, calls give up
within about a second (:attr:`PostgresStore.DOWN_WAIT`) instead of the pool's timeout.

Putting jobs back at the head (``requeue``, ``recover``, ``expire_leases``) takes a
transaction-level advisory lock, as two of them at once would give their jobs the same
places; claims and new jobs do not wait for it (new jobs take their place from a sequence).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
import sqlite3
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from .errors import ConfigError, StoreClosed, Unavailable
from .jobs import CANCELLED, COMPLETED, FAILED, QUEUED, RUNNING, Job, JobSpec
from .store import (
    CLAIMING,
    DELIVERED,
    GAVE_UP,
    LEASE_LOST,
    OPEN_CLAIM_STATES_SQL,
    OUTPUT_COLUMNS,
    PENDING,
    SCHEMA_VERSION,
    STOPPED,
    SUBMITTED,
    ClaimSubmission,
    Delivery,
    Fenced,
    Moved,
    OutputQuery,
    OutputRecord,
    OutputStat,
    latest_trashed,
    lost_error,
    move_target,
    output_filters,
    output_record,
    output_row,
    positions_from,
    put_outputs_sql,
    reordered,
    trashed_query,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The database server's clock, in Unix seconds: when the statement began (``now()`` would
#: be the transaction's start). Not ``clock_timestamp()``: a volatile function in a
#: ``WHERE`` is evaluated row by row and keeps the planner from using an index.
NOW = "extract(epoch FROM statement_timestamp())::float8"

#: Advisory lock keys (per database): schema creation and migration by nodes starting at
#: once, and putting jobs back at the head of the queue (``MIN(seq) - k`` must not be
#: computed by two transactions at once, or their jobs would share places).
_SCHEMA_LOCK = 0x696D_6167_0001
_HEAD_LOCK = 0x696D_6167_0002

#: Every statement ends its line with ";" (the schema is run statement by statement).
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS claims (
    id          BIGSERIAL PRIMARY KEY,
    original    TEXT NOT NULL,
    claimed     TEXT NOT NULL,
    state       TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    final_path  TEXT,
    note_path   TEXT,
    node        TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS claims_open_original ON claims (original)
    WHERE state IN {OPEN_CLAIM_STATES_SQL};
CREATE SEQUENCE IF NOT EXISTS jobs_queue_seq;
CREATE TABLE IF NOT EXISTS jobs (
    id               BIGSERIAL PRIMARY KEY,
    seq              BIGINT NOT NULL DEFAULT nextval('jobs_queue_seq'),
    status           TEXT NOT NULL,
    spec             TEXT NOT NULL,
    source           TEXT NOT NULL DEFAULT 'api',
    source_name      TEXT,
    submitted_at     TEXT NOT NULL,
    started_at       TEXT,
    completed_at     TEXT,
    duration_seconds DOUBLE PRECISION,
    output_path      TEXT,
    error            TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    progress_step    INTEGER NOT NULL DEFAULT 0,
    progress_total   INTEGER NOT NULL DEFAULT 0,
    claim_id         BIGINT REFERENCES claims (id),
    node             TEXT,
    token            TEXT,
    lease_until      DOUBLE PRECISION,
    interrupt        TEXT
);
ALTER SEQUENCE jobs_queue_seq OWNED BY jobs.seq;
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_status_id ON jobs (status, id);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (claim_id) WHERE claim_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_running_node ON jobs (node, seq) WHERE status = '{RUNNING}';
CREATE INDEX IF NOT EXISTS jobs_running_lease ON jobs (lease_until) WHERE status = '{RUNNING}';
CREATE TABLE IF NOT EXISTS deliveries (
    id           BIGSERIAL PRIMARY KEY,
    job_id       BIGINT NOT NULL REFERENCES jobs (id),
    event        TEXT NOT NULL,
    url          TEXT NOT NULL,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    created_at   DOUBLE PRECISION NOT NULL,
    next_at      DOUBLE PRECISION NOT NULL,
    last_status  INTEGER,
    last_error   TEXT,
    delivered_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_at);
CREATE TABLE IF NOT EXISTS nodes (
    name         TEXT PRIMARY KEY,
    info         TEXT NOT NULL,
    started_at   DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- Input images of queued jobs (imagineerd.inputs), by SHA-256: the node that runs a job
-- is often not the one that took the request, so the bytes travel with the queue.
CREATE TABLE IF NOT EXISTS inputs (
    digest     TEXT PRIMARY KEY,
    data       BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL DEFAULT extract(epoch FROM clock_timestamp())
);
-- The event log the nodes share (imagineerd.shared_events): only PostgreSQL has one, as
-- only its nodes need to see each other's events. ``data`` is the event's JSON.
CREATE TABLE IF NOT EXISTS events (
    id         BIGSERIAL PRIMARY KEY,
    node       TEXT NOT NULL,
    type       TEXT NOT NULL,
    data       TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL DEFAULT extract(epoch FROM clock_timestamp())
);
-- The gallery index (version 5), as in the SQLite store. Paths and names compare byte by
-- byte ("C"), as SQLite and Python compare them: pages come in the same order on both, and
-- the order does not change with the server's locale.
CREATE TABLE IF NOT EXISTS outputs (
    path            TEXT COLLATE "C" PRIMARY KEY,
    filename        TEXT COLLATE "C" NOT NULL,
    name            TEXT COLLATE "C" NOT NULL,
    job_id          BIGINT,
    created         TEXT COLLATE "C" NOT NULL,
    prompt          TEXT,
    search          TEXT,
    negative_prompt TEXT,
    model           TEXT,
    width           INTEGER,
    height          INTEGER,
    source          TEXT,
    favourite       BOOLEAN NOT NULL DEFAULT false,
    trashed_at      DOUBLE PRECISION,
    size_bytes      BIGINT NOT NULL,
    mtime_ns        BIGINT NOT NULL,
    entry           TEXT NOT NULL,
    node            TEXT
);
CREATE INDEX IF NOT EXISTS outputs_listed ON outputs (name, path) WHERE trashed_at IS NULL;
CREATE INDEX IF NOT EXISTS outputs_favourite ON outputs (name, path)
    WHERE trashed_at IS NULL AND favourite;
CREATE INDEX IF NOT EXISTS outputs_model ON outputs (model, name, path)
    WHERE trashed_at IS NULL;
CREATE INDEX IF NOT EXISTS outputs_source ON outputs (source, name, path)
    WHERE trashed_at IS NULL;
CREATE INDEX IF NOT EXISTS outputs_size ON outputs (width, height, name, path)
    WHERE trashed_at IS NULL;
CREATE INDEX IF NOT EXISTS outputs_created ON outputs (created) WHERE trashed_at IS NULL;
CREATE INDEX IF NOT EXISTS outputs_trashed ON outputs (trashed_at, path)
    WHERE trashed_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS outputs_trashed_name ON outputs (filename)
    WHERE trashed_at IS NOT NULL;
"""

_JOB_COLUMNS = [f.name for f in dataclasses.fields(Job) if f.name != "spec"]
_DELIVERY_COLUMNS = [f.name for f in dataclasses.fields(Delivery)]

#: What putting a running job back clears (as in the SQLite store): its claim, progress
#: and any interrupt asked of it; the node stays, to show where it last ran.
_RELEASED = (
    "started_at = NULL, progress_step = 0, progress_total = 0, token = NULL,"
    " lease_until = NULL, interrupt = NULL"
)


_INSERT = (
    "INSERT INTO jobs (status, spec, source, source_name, submitted_at, claim_id)"
    " VALUES (%s, %s, %s, %s, %s, %s)"
)
#: What a claim sets (parameters: started_at, node, lease_seconds); a token per job from the
#: server's random UUIDs (a fence, not a secret: 64 bits as in the SQLite store). A claim of
#: no node (NULL) has no lease, as in the SQLite store.
_CLAIMED = (
    f"status = '{RUNNING}', started_at = %s, attempts = jobs.attempts + 1, progress_step = 0,"
    " progress_total = 0, node = %s, token = substr(md5(gen_random_uuid()::text), 1, 16),"
    f" lease_until = {NOW} + %s, interrupt = NULL"
)


#: The deliveries owed for the row of ``done`` (named parameters: event, now; the caller
#: adds ``FROM done, <urls>``). Times are this node's clock, as the delivery thread that
#: compares them reads it.
_OWE = (
    "INSERT INTO deliveries (job_id, event, url, state, created_at, next_at)"
    f" SELECT done.id, %(event)s, u.url, '{PENDING}', %(now)s, %(now)s"
)


_PUT_OUTPUT = put_outputs_sql("%s")
#: A moved file's row, replacing whatever is at its new path.
_REPLACE_OUTPUT = (
    f"INSERT INTO outputs ({', '.join(OUTPUT_COLUMNS)})"
    f" VALUES ({', '.join(['%s'] * len(OUTPUT_COLUMNS))}) ON CONFLICT (path) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in OUTPUT_COLUMNS if c != "path")
    + " RETURNING *"
)
_FAVOURITE = OUTPUT_COLUMNS.index("favourite")
#: ``db copy`` of a gallery row this database has already (a node's pass indexed the file
#: before the copy): the file's metadata stays as that node read it, while what only the
#: index knows comes from the copied row: the name it is listed and restored under, its
#: favourite mark (kept if either has one) and when it went to the trash.
_COPY_OUTPUT_CONFLICT = (
    " ON CONFLICT (path) DO UPDATE SET filename = EXCLUDED.filename, name = EXCLUDED.name,"
    " favourite = outputs.favourite OR EXCLUDED.favourite,"
    " trashed_at = COALESCE(EXCLUDED.trashed_at, outputs.trashed_at)"
)


def _job(row: dict[str, Any]) -> Job:
    return Job(spec=JobSpec.from_json(row["spec"]), **{name: row[name] for name in _JOB_COLUMNS})


def _delivery(row: dict[str, Any]) -> Delivery:
    return Delivery(**{name: row[name] for name in _DELIVERY_COLUMNS})


def where(conninfo: str) -> str:
    """``host:port/database`` of a connection string, for messages (never the password)."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error:
        return "(an unreadable queue.database)"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    place = f"{host}:{params.get('port') or 5432}"
    return f"{place}/{params['dbname']}" if params.get("dbname") else place


#: What libpq puts before the reason (the address, which our messages name already).
_LIBPQ_PREFIX = re.compile(
    r"^(connection failed: )?(connection to server (at|on) .*?(, port \d+)? failed: )?"
    r"(FATAL: +)?"
)


def _reason(exc: BaseException) -> str:
    """The driver's message on one line (libpq's are several, with hints we replace)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return _LIBPQ_PREFIX.sub("", lines[0]) or lines[0] if lines else type(exc).__name__


class PostgresStore:
    """The job store in one PostgreSQL database (``conninfo``: a ``postgresql://`` URL).

    Opening creates the schema, or brings it up to date, in one transaction under an
    advisory lock, so several nodes may start at once; a database written by a newer
    imagineerd is refused, as an SQLite file is.
    """

    #: How far past the head a batch claim looks for compatible jobs.
    BATCH_LOOKAHEAD = 512
    #: Seconds a call waits for a connection while the server is known to be away.
    DOWN_WAIT = 1.0

    def __init__(
        self,
        conninfo: str,
        *,
        min_size: int = 1,
        max_size: int = 16,
        connect_timeout: float = 5.0,
        timeout: float = 10.0,
    ) -> None:
        """``max_size`` connections at most (threads beyond it wait up to ``timeout``
        seconds for one); ``connect_timeout`` bounds each new connection."""
        self.conninfo = conninfo
        self.where = where(conninfo)
        self._closed = False
        try:
            params = conninfo_to_dict(conninfo)
        except psycopg.Error as exc:
            raise ConfigError(
                f"queue.database is not a valid PostgreSQL URL: {_reason(exc)}",
                field="queue.database",
            ) from None
        # Bounds on waiting for a server that went away without a word (a cable, a crashed
        # machine): connecting, an idle connection (keepalives), data never acknowledged.
        # Whatever the URL sets itself stands.
        defaults = {
            "connect_timeout": max(2, math.ceil(connect_timeout)),
            "keepalives": 1,
            "keepalives_idle": 15,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": 30_000,
        }
        self._connect_kwargs = {k: v for k, v in defaults.items() if k not in params}
        #: False after the server could not be reached, until it answers again: calls then
        #: wait a short DOWN_WAIT for a connection, not the whole ``timeout``, so a request
        #: that reads the store a few times still answers 503 quickly.
        self._reachable = True
        try:
            first = psycopg.connect(conninfo, autocommit=True, **self._connect_kwargs)
        except psycopg.Error as exc:
            raise ConfigError(
                f"cannot reach the job database at {self.where}: {_reason(exc)}; check "
                "queue.database and that PostgreSQL is running",
                field="queue.database",
            ) from None
        try:
            with first:
                self._set_up(first)
        except psycopg.Error as exc:
            raise ConfigError(
                f"cannot set up the job database at {self.where}: {_reason(exc)}; check "
                "queue.database and that its user may create tables there",
                field="queue.database",
            ) from None
        self._pool = ConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max(min_size, max_size),
            kwargs={"autocommit": True, "row_factory": dict_row, **self._connect_kwargs},
            timeout=timeout,
            open=False,
            name="imagineerd-jobs",
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout + 5)
        except PoolTimeout:
            self._pool.close()
            raise ConfigError(
                f"cannot reach the job database at {self.where}: no connection within "
                f"{connect_timeout + 5:g}s; check queue.database and that PostgreSQL is running",
                field="queue.database",
            ) from None
        #: The pool's failed connection attempts when the server last answered.
        self._errors_seen = self._pool.get_stats().get("connections_errors", 0)

    # -- schema ----------------------------------------------------------------------------
    def _set_up(self, conn: psycopg.Connection) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            found = int(row[0]) if row else None
            if found is not None and found > SCHEMA_VERSION:
                raise ConfigError(
                    f"the job database {self.where} has schema version {found}, written by "
                    f"a newer imagineerd; this one understands up to version "
                    f"{SCHEMA_VERSION}. Upgrade imagineerd on this node, or point "
                    "queue.database at another database",
                    field="queue.database",
                )
            if found == SCHEMA_VERSION:
                return  # the usual start: no DDL, so no lock on tables other nodes use
            # Version 4 is the first PostgreSQL schema. Version 5 only adds the ``outputs``
            # table and its indexes, which the schema creates (IF NOT EXISTS) on a version 4
            # database, every job kept. A later version that changes a table alters the
            # tables of ``found`` here, before the schema runs.
            for statement in _SCHEMA.split(";\n"):  # statements end a line: see _SCHEMA
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO meta VALUES ('schema_version', %s)"
                " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (str(SCHEMA_VERSION),),
            )

    def schema_version(self) -> int:
        """The version the database is at (this imagineerd's, once opened)."""
        row = self._statement(
            lambda c: c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        )
        return int(row["value"])

    # -- connections -----------------------------------------------------------------------
    def connect(self) -> psycopg.Connection:
        """A new connection of its own (autocommit, not from the pool, rows as tuples),
        e.g. to ``LISTEN`` on; the caller closes it."""
        if self._closed:
            raise StoreClosed("the job store is closed")
        try:
            return psycopg.connect(self.conninfo, autocommit=True, **self._connect_kwargs)
        except psycopg.Error as exc:
            raise Unavailable(
                f"cannot reach the job database at {self.where} ({_reason(exc)}); try again shortly"
            ) from None

    def _run(self, work: Callable[[psycopg.Connection], T], *, tx: bool = True) -> T:
        """``work(conn)`` in one transaction (``tx``; else autocommitted: reads, and writes
        that may safely run twice), on a pooled connection. A connection that turns out dead
        before the commit (the server restarted since the pool made it) is replaced and
        ``work`` run again once: nothing of it was committed. A transaction is what makes
        that safe for a write that must not run twice (a claim, a new job): without one, a
        statement may have committed just before the connection died. Losing the server
        is :class:`Unavailable`."""
        for attempt in (1, 2):
            if self._closed:
                raise StoreClosed("the job store is closed")
            conn = self._getconn()
            committing = False
            try:
                if tx:
                    conn.execute("BEGIN")
                result = work(conn)
                if tx:
                    committing = True
                    conn.execute("COMMIT")
                if not self._reachable:
                    self._back()
                return result
            except psycopg.OperationalError as exc:
                _rollback(conn)
                if attempt == 1 and not committing and conn.broken:
                    log.info("a pooled connection to %s was dead; retrying once", self.where)
                    self._reachable = False  # until a new connection answers
                    self._pool.putconn(conn)
                    conn = None
                    self._pool.check()  # replace the other dead ones too
                    continue
                self._reachable = False
                outcome = (
                    "the change may or may not have been saved"
                    if committing
                    else "nothing was changed"
                )
                raise Unavailable(
                    f"lost the job database at {self.where} ({_reason(exc)}); {outcome}, "
                    "try again shortly"
                ) from None
            except BaseException:
                _rollback(conn)
                raise
            finally:
                if conn is not None:
                    self._pool.putconn(conn)
        raise AssertionError("unreachable")

    def _getconn(self) -> psycopg.Connection:
        """A pooled connection, waiting up to the pool's ``timeout`` while all are busy, but
        only about DOWN_WAIT once the server is known to be away (a connection died, or the
        pool failed to make one since the last call that worked)."""
        started = time.monotonic()
        while True:
            left = started + self._pool.timeout - time.monotonic()
            try:
                return self._pool.getconn(timeout=max(0.01, min(left, self.DOWN_WAIT)))
            except PoolClosed:
                raise StoreClosed("the job store is closed") from None
            except PoolTimeout:
                errors = self._pool.get_stats().get("connections_errors", 0)
                if left > self.DOWN_WAIT and self._reachable and errors <= self._errors_seen:
                    continue  # busy, not away: wait on
                self._reachable = False
                raise Unavailable(
                    f"the job database at {self.where} is not answering (no connection "
                    f"within {time.monotonic() - started:.1f}s); nothing was changed, try "
                    "again shortly"
                ) from None

    def _back(self) -> None:
        """The server answers again (after :meth:`_getconn` found it away)."""
        self._errors_seen = self._pool.get_stats().get("connections_errors", 0)
        self._reachable = True
        log.info("the job database at %s answers again", self.where)

    def _statement(self, work: Callable[[psycopg.Connection], T]) -> T:
        """One statement, atomic by itself, autocommitted (no BEGIN and COMMIT round
        trips): only for reads and for writes that may run twice (see :meth:`_run`)."""
        return self._run(work, tx=False)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.close(timeout=5)

    # -- jobs: transitions -------------------------------------------------------------------
    def add(
        self,
        spec: JobSpec,
        *,
        submitted_at: str,
        source: str = "api",
        source_name: str | None = None,
    ) -> Job:
        row = self._run(
            lambda c: c.execute(
                f"{_INSERT} RETURNING *",
                (QUEUED, json.dumps(spec.to_dict()), source, source_name, submitted_at, None),
            ).fetchone()
        )
        return _job(row)

    def add_many(
        self,
        specs: Sequence[JobSpec],
        *,
        submitted_at: str,
        source: str = "api",
        source_name: str | None = None,
    ) -> list[Job]:
        if not specs:
            return []
        return self._run(lambda c: _insert(c, specs, submitted_at, source, source_name, None))

    def claim_next(
        self, *, started_at: str, node: str = "", lease_seconds: float = 30.0
    ) -> Job | None:
        claimed = self.claim_batch(
            started_at=started_at, limit=1, node=node, lease_seconds=lease_seconds
        )
        return claimed[0] if claimed else None

    def claim_batch(
        self,
        *,
        started_at: str,
        limit: int | Callable[[JobSpec], int],
        key: Callable[[JobSpec], Hashable] | None = None,
        node: str = "",
        lease_seconds: float = 30.0,
    ) -> list[Job]:
        # NULL + seconds is NULL: without a node, no lease.
        claimed = (started_at, node or None, float(lease_seconds) if node else None)
        if key is None or (not callable(limit) and limit <= 1):
            # One job: one statement, the hot path of every worker.
            rows = self._run(
                lambda c: c.execute(
                    f"UPDATE jobs SET {_CLAIMED} FROM (SELECT id FROM jobs"
                    f" WHERE status = '{QUEUED}' ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED)"
                    " AS head WHERE jobs.id = head.id RETURNING jobs.*",
                    claimed,
                ).fetchall()
            )
            return [_job(row) for row in rows]

        def work(c: psycopg.Connection) -> list[Job]:
            # Only the head is locked first: locking the whole lookahead would make every
            # other node skip past it, and the queue would no longer run in order.
            head = c.execute(
                f"SELECT id, seq, spec FROM jobs WHERE status = '{QUEUED}' ORDER BY seq"
                " LIMIT 1 FOR UPDATE SKIP LOCKED"
            ).fetchone()
            if head is None:
                return []
            head_spec = JobSpec.from_json(head["spec"])
            size = limit(head_spec) if callable(limit) else limit
            fits: list[int] = []
            if size > 1:
                # The compatible jobs behind the head, read in growing pages up to the
                # lookahead: twice as many as needed, as another node may be taking some.
                wanted, after, looked, page = key(head_spec), head["seq"], 0, 4 * size
                while len(fits) < 2 * (size - 1) and looked < self.BATCH_LOOKAHEAD:
                    page = min(page, self.BATCH_LOOKAHEAD - looked)
                    rows = c.execute(
                        f"SELECT id, seq, spec FROM jobs WHERE status = '{QUEUED}' AND seq > %s"
                        " ORDER BY seq LIMIT %s",
                        (after, page),
                    ).fetchall()
                    fits += [r["id"] for r in rows if key(JobSpec.from_json(r["spec"])) == wanted]
                    if len(rows) < page:
                        break
                    after, looked, page = rows[-1]["seq"], looked + len(rows), page * 4
            # The head (locked already) and the first compatible jobs no other node is
            # taking right now, claimed in one statement.
            rows = c.execute(
                f"UPDATE jobs SET {_CLAIMED} FROM (SELECT id FROM jobs"
                f" WHERE (id = %s OR id = ANY(%s)) AND status = '{QUEUED}'"
                " ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED)"
                " AS picked WHERE jobs.id = picked.id RETURNING jobs.*",
                (*claimed, head["id"], fits, max(1, size)),
            ).fetchall()
            return [_job(row) for row in sorted(rows, key=lambda row: row["seq"])]

        return self._run(work)

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
        assert status in (COMPLETED, FAILED, CANCELLED)
        step, total = progress if progress else (None, None)

        # One statement (the UPDATE and its deliveries together): the hot path.
        done = self._run(
            lambda c: c.execute(
                "WITH done AS (UPDATE jobs SET status = %(status)s, completed_at = %(at)s,"
                " duration_seconds = %(duration)s, output_path = %(output)s, error = %(error)s,"
                " progress_step = COALESCE(%(step)s, progress_step),"
                " progress_total = COALESCE(%(total)s, progress_total), lease_until = NULL"
                f" WHERE id = %(id)s AND status = '{RUNNING}'"
                " AND (%(token)s::text IS NULL OR token = %(token)s) RETURNING *),"
                f" owed AS ({_OWE} FROM done, unnest(%(urls)s::text[]) WITH ORDINALITY"
                " AS u (url, n) ORDER BY u.n) SELECT * FROM done",
                {
                    "status": status,
                    "at": completed_at,
                    "duration": duration_seconds,
                    "output": output_path,
                    "error": error,
                    "step": step,
                    "total": total,
                    "id": job_id,
                    "token": token,
                    "urls": list(dict.fromkeys(webhooks)),
                    "event": f"job.{status}",
                    "now": time.time(),
                },
            ).fetchone()
        )
        if done is not None:
            return _job(done)
        # Nothing changed: say why (the row as it is now).
        row = self._statement(
            lambda c: c.execute(
                "SELECT status, token FROM jobs WHERE id = %s", (job_id,)
            ).fetchone()
        )
        if row is not None and token is not None and row["token"] != token:
            raise Fenced(
                f"job {job_id} is no longer held by this claim (its lease ran out and it "
                f"went back to the queue or to another node); not marking it {status}"
            )
        raise RuntimeError(f"job {job_id} is not running; cannot mark it {status}")

    def holds(self, job_id: int, token: str) -> bool:
        row = self._statement(
            lambda c: c.execute(
                "SELECT 1 AS held FROM jobs WHERE id = %s AND status = %s AND token = %s",
                (job_id, RUNNING, token),
            ).fetchone()
        )
        return row is not None

    # -- leases and nodes ------------------------------------------------------------------
    def renew_leases(self, node: str, *, lease_seconds: float) -> None:
        self._statement(
            lambda c: c.execute(
                f"UPDATE jobs SET lease_until = {NOW} + %s"
                f" WHERE status = '{RUNNING}' AND node = %s",
                (float(lease_seconds), node),
            )
        )

    def interrupts(self, node: str) -> dict[int, str]:
        rows = self._statement(
            lambda c: c.execute(
                f"SELECT id, interrupt FROM jobs WHERE status = '{RUNNING}' AND node = %s"
                " AND interrupt IS NOT NULL ORDER BY seq",
                (node,),
            ).fetchall()
        )
        return {row["id"]: row["interrupt"] for row in rows}

    def request_interrupt(self, job_id: int, reason: str) -> bool:
        row = self._statement(
            lambda c: c.execute(
                "UPDATE jobs SET interrupt = COALESCE(interrupt, %s)"
                " WHERE id = %s AND status = %s RETURNING id",
                (reason, job_id, RUNNING),
            ).fetchone()
        )
        return row is not None

    def expire_leases(
        self,
        *,
        max_attempts: int,
        completed_at: str,
        webhooks: Callable[[JobSpec], Sequence[str]] | None = None,
    ) -> list[Job]:
        def work(c: psycopg.Connection) -> list[Job]:
            c.execute("SELECT pg_advisory_xact_lock(%s)", (_HEAD_LOCK,))
            # SKIP LOCKED: a job whose node is renewing or finishing it right now is not
            # waited for (that node is alive); the next look decides.
            rows = c.execute(
                f"SELECT id, attempts, spec FROM jobs WHERE status = '{RUNNING}'"
                f" AND lease_until < {NOW} ORDER BY seq FOR UPDATE SKIP LOCKED"
            ).fetchall()
            return _put_back(c, rows, max_attempts, completed_at, webhooks, LEASE_LOST)

        return self._run(work)

    def heartbeat(self, node: str, info: dict[str, Any]) -> None:
        self._statement(
            lambda c: c.execute(
                "INSERT INTO nodes (name, info, started_at, heartbeat_at)"
                f" VALUES (%s, %s, {NOW}, {NOW}) ON CONFLICT (name) DO UPDATE"
                " SET info = EXCLUDED.info, heartbeat_at = EXCLUDED.heartbeat_at",
                (node, json.dumps(info)),
            )
        )

    def nodes(self) -> list[dict[str, Any]]:
        rows = self._statement(
            lambda c: c.execute(
                "SELECT name, info, started_at, heartbeat_at,"
                f" GREATEST(0, {NOW} - heartbeat_at) AS age FROM nodes ORDER BY name"
            ).fetchall()
        )
        return [{**row, "info": json.loads(row["info"])} for row in rows]

    # -- settings shared by every node -----------------------------------------------------
    def get_setting(self, key: str) -> Any | None:
        row = self._statement(
            lambda c: c.execute("SELECT value FROM settings WHERE key = %s", (key,)).fetchone()
        )
        return json.loads(row["value"]) if row else None

    def put_setting(self, key: str, value: Any) -> None:
        self._statement(
            lambda c: c.execute(
                "INSERT INTO settings (key, value) VALUES (%s, %s)"
                " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (key, json.dumps(value)),
            )
        )

    # -- input images every node can read (not part of the Store contract: only a store
    # that several machines share needs them; see imagineerd.inputs) ------------------------
    def put_input(self, digest: str, data: bytes) -> None:
        """Keep an input image's bytes for every node (once per digest: an image sent again,
        the usual case for a re-run, only renews its row and crosses the network once)."""

        def work(c: psycopg.Connection) -> None:
            renewed = c.execute(
                f"UPDATE inputs SET created_at = {NOW} WHERE digest = %s", (digest,)
            ).rowcount
            if not renewed:
                c.execute(
                    "INSERT INTO inputs (digest, data) VALUES (%s, %s)"
                    " ON CONFLICT (digest) DO NOTHING",
                    (digest, data),
                )

        self._statement(work)

    def get_input(self, digest: str) -> bytes | None:
        row = self._statement(
            lambda c: c.execute("SELECT data FROM inputs WHERE digest = %s", (digest,)).fetchone()
        )
        return bytes(row["data"]) if row else None

    def collect_inputs(self, keep: Sequence[str], *, older_than: float) -> int:
        """Delete the input images not in ``keep`` stored more than ``older_than`` seconds
        ago (younger ones may belong to a request another node has not queued yet)."""
        return self._statement(
            lambda c: (
                c.execute(
                    f"DELETE FROM inputs WHERE NOT (digest = ANY(%s)) AND created_at < {NOW} - %s",
                    (list(keep), older_than),
                ).rowcount
            )
        )

    def cancel_queued(
        self, job_id: int, *, completed_at: str, webhooks: Sequence[str] = ()
    ) -> Job | None:
        def work(c: psycopg.Connection) -> Job | None:
            row = c.execute(
                "UPDATE jobs SET status = %s, completed_at = %s WHERE id = %s AND status = %s"
                " RETURNING *",
                (CANCELLED, completed_at, job_id, QUEUED),
            ).fetchone()
            if row is None:
                return None
            _owe(c, job_id, CANCELLED, webhooks)
            return _job(row)

        return self._run(work)

    def move(self, job_id: int, to: str | int) -> Moved | None:
        move_target(to, 0, 1)  # a bad target is refused whatever the job

        def work(c: psycopg.Connection) -> Moved | None:
            # Moves and put-backs one at a time: each deals out sequence numbers it read.
            c.execute("SELECT pg_advisory_xact_lock(%s)", (_HEAD_LOCK,))
            rows = c.execute(
                f"SELECT id, seq FROM jobs WHERE status = '{QUEUED}' ORDER BY seq"
            ).fetchall()
            ids = [row["id"] for row in rows]
            if job_id not in ids:
                return None
            place = ids.index(job_id)
            target = move_target(to, place, len(ids))
            low, high = sorted((place, target))
            # The window's rows, locked; one a worker claimed since the read is left out
            # (FOR UPDATE waits for the claim, then reads the row's status again).
            window = [
                (row["id"], row["seq"])
                for row in c.execute(
                    f"SELECT id, seq FROM jobs WHERE id = ANY(%s) AND status = '{QUEUED}'"
                    " ORDER BY seq FOR UPDATE",
                    (ids[low : high + 1],),
                )
            ]
            if job_id not in (row[0] for row in window):
                return None
            moves = reordered(window, job_id, 0 if target < place else len(window) - 1)
            if target == 0 and place != 0:
                # To the head as a put-back goes there: one row changes, not the window.
                c.execute("UPDATE jobs SET seq = %s WHERE id = %s", (_head(c) - 1, job_id))
            elif target != place:
                c.execute(
                    "UPDATE jobs SET seq = v.seq FROM unnest(%s::bigint[], %s::bigint[])"
                    " AS v (seq, id) WHERE jobs.id = v.id",
                    ([seq for seq, _ in moves], [id_ for _, id_ in moves]),
                )
            return Moved(job_id, place + 1, target + 1, [id_ for _, id_ in moves])

        return self._run(work)

    def requeue(self, job_ids: Sequence[int], *, count_attempt: bool) -> list[Job]:
        ids = list(job_ids)

        def work(c: psycopg.Connection) -> list[Job]:
            c.execute("SELECT pg_advisory_xact_lock(%s)", (_HEAD_LOCK,))
            head = _head(c)
            c.execute(
                f"UPDATE jobs SET status = %s, seq = %s + v.offs, {_RELEASED},"
                " attempts = attempts - %s"
                " FROM unnest(%s::bigint[]) WITH ORDINALITY AS v (id, offs)"
                " WHERE jobs.id = v.id AND jobs.status = %s",
                (QUEUED, head - len(ids) - 1, 0 if count_attempt else 1, ids, RUNNING),
            )
            return _jobs_by_id(c, ids)

        return self._run(work)

    def recover(
        self,
        *,
        max_attempts: int,
        completed_at: str,
        webhooks: Callable[[JobSpec], Sequence[str]] | None = None,
        node: str = "",
    ) -> list[Job]:
        def work(c: psycopg.Connection) -> list[Job]:
            c.execute("SELECT pg_advisory_xact_lock(%s)", (_HEAD_LOCK,))
            rows = c.execute(
                f"SELECT id, attempts, spec FROM jobs WHERE status = '{RUNNING}'"
                " AND (node = %s OR node IS NULL) ORDER BY seq FOR UPDATE",
                (node,),
            ).fetchall()
            return _put_back(c, rows, max_attempts, completed_at, webhooks, STOPPED)

        return self._run(work)

    # -- webhook deliveries ----------------------------------------------------------------
    def deliveries_due(self, now: float, limit: int, *, hold: float = 0.0) -> list[Delivery]:
        if not hold:
            rows = self._statement(
                lambda c: c.execute(
                    "SELECT * FROM deliveries WHERE state = %s AND next_at <= %s"
                    " ORDER BY next_at, id LIMIT %s",
                    (PENDING, now, limit),
                ).fetchall()
            )
            return [_delivery(row) for row in rows]
        # Taken with SKIP LOCKED: two nodes' delivery threads polling at once get different
        # deliveries, never the same one twice.
        rows = self._run(
            lambda c: c.execute(
                "UPDATE deliveries SET next_at = %(until)s FROM (SELECT id FROM deliveries"
                " WHERE state = %(pending)s AND next_at <= %(now)s ORDER BY next_at, id"
                " LIMIT %(limit)s FOR UPDATE SKIP LOCKED) AS due WHERE deliveries.id = due.id"
                " RETURNING deliveries.*",
                {"until": now + hold, "pending": PENDING, "now": now, "limit": limit},
            ).fetchall()
        )
        return sorted((_delivery(row) for row in rows), key=lambda d: d.id)

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
        state = DELIVERED if delivered else (PENDING if next_at is not None else GAVE_UP)
        self._run(  # a transaction: counting the attempt twice must not happen
            lambda c: c.execute(
                "UPDATE deliveries SET state = %s, attempts = attempts + 1, last_status = %s,"
                " last_error = %s, next_at = COALESCE(%s, next_at), delivered_at = %s"
                " WHERE id = %s AND state = %s",
                (
                    state,
                    status,
                    error,
                    next_at,
                    now if delivered else None,
                    delivery_id,
                    PENDING,
                ),
            )
        )

    def deliveries(self, limit: int) -> list[Delivery]:
        rows = self._statement(
            lambda c: c.execute(
                "SELECT * FROM deliveries ORDER BY id DESC LIMIT %s", (limit,)
            ).fetchall()
        )
        return [_delivery(row) for row in rows]

    def delivery_counts(self) -> dict[str, int]:
        rows = self._statement(
            lambda c: c.execute(
                "SELECT state, COUNT(*) AS n FROM deliveries GROUP BY state"
            ).fetchall()
        )
        return {PENDING: 0, DELIVERED: 0, GAVE_UP: 0, **{r["state"]: r["n"] for r in rows}}

    # -- jobs: queries ---------------------------------------------------------------------
    def get(self, job_id: int) -> Job | None:
        row = self._statement(
            lambda c: c.execute("SELECT * FROM jobs WHERE id = %s", (job_id,)).fetchone()
        )
        return _job(row) if row else None

    def running(self, node: str | None = None) -> list[Job]:
        return self._statement(lambda c: _running(c, node))

    def queued(self, limit: int | None = None) -> list[Job]:
        return self._statement(lambda c: _queued(c, limit))

    def history(self, limit: int, before: int | None = None) -> list[Job]:
        return self._statement(lambda c: _history(c, limit, before))

    def overview(
        self, *, queued_limit: int, history_limit: int, before: int | None = None
    ) -> tuple[list[Job], list[Job], list[Job]]:
        def work(c: psycopg.Connection) -> tuple[list[Job], list[Job], list[Job]]:
            # One REPEATABLE READ snapshot for the three reads (taken at the first SELECT):
            # a job that moves meanwhile is in exactly one list, as it was then.
            c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            return (
                _running(c, None),
                _queued(c, queued_limit),
                _history(c, history_limit, before),
            )

        return self._run(work)

    def queue_position(self, job: Job) -> int:
        if job.status == RUNNING:
            return 0
        if job.status != QUEUED:
            return -1
        row = self._statement(
            lambda c: c.execute(
                "SELECT COUNT(*) AS n FROM jobs WHERE status = %s AND seq <"
                " (SELECT seq FROM jobs WHERE id = %s)",
                (QUEUED, job.id),
            ).fetchone()
        )
        return row["n"] + 1

    def queue_positions(self, jobs: Sequence[Job]) -> list[int]:
        def queued_between(ids: list[int]) -> tuple[int, list[int]]:
            def work(c: psycopg.Connection) -> tuple[int, list[int]]:
                # One snapshot for the three reads, as the overview's.
                c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                low, high = (
                    c.execute(
                        "SELECT MIN(seq) AS low, MAX(seq) AS high FROM jobs WHERE id = ANY(%s)",
                        (ids,),
                    )
                    .fetchone()
                    .values()
                )
                ahead = c.execute(
                    "SELECT COUNT(*) AS n FROM jobs WHERE status = %s AND seq < %s",
                    (QUEUED, low),
                ).fetchone()["n"]
                rows = c.execute(
                    "SELECT id FROM jobs WHERE status = %s AND seq BETWEEN %s AND %s ORDER BY seq",
                    (QUEUED, low, high),
                )
                return ahead, [row["id"] for row in rows]

            return self._run(work)

        return positions_from(jobs, queued_between)

    def counts(self) -> dict[str, int]:
        rows = self._statement(
            lambda c: c.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        )
        counts = {status: 0 for status in (QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED)}
        counts.update({row["status"]: row["n"] for row in rows})
        return counts

    def recent_durations(self, spec: JobSpec, limit: int = 20) -> list[float]:
        rows = self._statement(
            lambda c: c.execute(
                "SELECT duration_seconds, spec FROM jobs WHERE status = %s"
                " AND duration_seconds IS NOT NULL ORDER BY id DESC LIMIT 200",
                (COMPLETED,),
            ).fetchall()
        )
        similar, other = [], []
        for row in rows:
            s, duration = json.loads(row["spec"]), row["duration_seconds"]
            if (s["width"], s["height"], s["steps"]) == (spec.width, spec.height, spec.steps):
                similar.append(duration)
            else:
                work = s["width"] * s["height"] * s["steps"]
                other.append(duration * spec.width * spec.height * spec.steps / work)
        return (similar or other)[:limit]

    # -- inbox claims ----------------------------------------------------------------------
    def create_claim(
        self, original: str, claimed: str, *, created_at: str, node: str = ""
    ) -> int | None:
        return self.create_claims([(original, claimed)], created_at=created_at, node=node)[0]

    def create_claims(
        self, items: Sequence[tuple[str, str]], *, created_at: str, node: str = ""
    ) -> list[int | None]:
        items = list(items)

        def work(c: psycopg.Connection) -> list[int | None]:
            ids: list[int | None] = [None] * len(items)
            # In the order of the file names: two nodes claiming overlapping bursts then
            # wait for each other in the same order, and cannot deadlock.
            for index in sorted(range(len(items)), key=lambda i: items[i][0]):
                original, claimed = items[index]
                row = c.execute(
                    "INSERT INTO claims (original, claimed, state, created_at, node)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (original)"
                    f" WHERE state IN {OPEN_CLAIM_STATES_SQL} DO NOTHING RETURNING id",
                    (original, claimed, CLAIMING, created_at, node or None),
                ).fetchone()
                ids[index] = row["id"] if row else None
            return ids

        return self._run(work) if items else []

    def submit_claim(
        self,
        claim_id: int,
        specs: list[JobSpec],
        *,
        submitted_at: str,
        source: str,
        source_name: str,
    ) -> list[Job]:
        item = ClaimSubmission(claim_id, specs, source_name)
        return self.submit_claims([item], submitted_at=submitted_at, source=source)[0]

    def submit_claims(
        self, items: Sequence[ClaimSubmission], *, submitted_at: str, source: str
    ) -> list[list[Job]]:
        ids = [item.claim_id for item in items]

        def work(c: psycopg.Connection) -> list[list[Job]]:
            # Locked in id order: two transactions locking several claims never wait on each
            # other in a circle.
            rows = c.execute(
                "SELECT id, state FROM claims WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (ids,)
            ).fetchall()
            open_ids = {row["id"] for row in rows if row["state"] == CLAIMING}
            taken: list[ClaimSubmission] = []
            for item in items:
                if item.claim_id in open_ids:  # else submitted before: it stays as it is
                    open_ids.discard(item.claim_id)
                    taken.append(item)
            with c.cursor() as cur:  # one pipelined round of statements for the whole burst
                cur.executemany(
                    _INSERT,
                    [
                        (
                            QUEUED,
                            json.dumps(s.to_dict()),
                            source,
                            i.source_name,
                            submitted_at,
                            i.claim_id,
                        )
                        for i in taken
                        for s in i.specs
                    ],
                )
                cur.executemany(
                    "UPDATE claims SET state = %s, final_path = COALESCE(%s, final_path),"
                    " note_path = COALESCE(%s, note_path) WHERE id = %s",
                    [(SUBMITTED, i.final_path, i.note_path, i.claim_id) for i in taken],
                )
            return _jobs_of_claims(c, ids)

        return self._run(work)

    def update_claim(
        self,
        claim_id: int,
        state: str,
        *,
        final_path: str | None = None,
        note_path: str | None = None,
    ) -> None:
        self._statement(
            lambda c: c.execute(
                "UPDATE claims SET state = %s, final_path = COALESCE(%s, final_path),"
                " note_path = COALESCE(%s, note_path) WHERE id = %s",
                (state, final_path, note_path, claim_id),
            )
        )

    def update_claims(self, claim_ids: Sequence[int], state: str) -> None:
        self._statement(
            lambda c: c.execute(
                "UPDATE claims SET state = %s WHERE id = ANY(%s)", (state, list(claim_ids))
            )
        )

    def delete_claim(self, claim_id: int) -> None:
        self._statement(
            lambda c: c.execute(
                "DELETE FROM claims WHERE id = %s AND state = %s", (claim_id, CLAIMING)
            )
        )

    def get_claim(self, claim_id: int) -> dict | None:
        return self._statement(
            lambda c: c.execute("SELECT * FROM claims WHERE id = %s", (claim_id,)).fetchone()
        )

    def open_claims(self, node: str | None = None) -> list[dict]:
        sql = f"SELECT * FROM claims WHERE state IN {OPEN_CLAIM_STATES_SQL}"
        if node is None:
            return self._statement(lambda c: c.execute(sql + " ORDER BY id").fetchall())
        return self._statement(
            lambda c: c.execute(
                sql + " AND (node = %s OR node IS NULL) ORDER BY id", (node,)
            ).fetchall()
        )

    def claim_jobs(self, claim_id: int) -> list[Job]:
        return self._statement(lambda c: _jobs_of_claims(c, [claim_id])[0])

    def claims_with_jobs(self, claim_ids: Sequence[int]) -> list[tuple[dict | None, list[Job]]]:
        ids = list(claim_ids)

        def work(c: psycopg.Connection) -> list[tuple[dict | None, list[Job]]]:
            c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            rows = c.execute("SELECT * FROM claims WHERE id = ANY(%s)", (ids,)).fetchall()
            claims = {row["id"]: dict(row) for row in rows}
            return list(zip([claims.get(i) for i in ids], _jobs_of_claims(c, ids), strict=True))

        return self._run(work) if ids else []

    # -- the gallery index -------------------------------------------------------------------
    def put_outputs(self, records: Sequence[OutputRecord]) -> None:
        # In path order: two nodes indexing overlapping files wait for each other in the
        # same order, and cannot deadlock.
        rows = [output_row(r) for r in sorted(records, key=lambda r: r.path)]

        def work(c: psycopg.Connection) -> None:
            with c.cursor() as cur:
                cur.executemany(_PUT_OUTPUT, rows)

        if rows:
            self._run(work)

    def move_output(self, old_path: str, record: OutputRecord) -> OutputRecord:
        def work(c: psycopg.Connection) -> OutputRecord:
            row = list(output_row(record))
            old = c.execute(
                "DELETE FROM outputs WHERE path = %s RETURNING favourite", (old_path,)
            ).fetchone()
            if old is not None:
                row[_FAVOURITE] = old["favourite"]
            return output_record(c.execute(_REPLACE_OUTPUT, row).fetchone())

        return self._run(work)

    def drop_outputs(self, paths: Sequence[str]) -> int:
        paths = list(paths)
        if not paths:
            return 0
        return self._statement(
            lambda c: c.execute("DELETE FROM outputs WHERE path = ANY(%s)", (paths,)).rowcount
        )

    def output_stats(self) -> dict[str, OutputStat]:
        rows = self._statement(
            lambda c: c.execute("SELECT path, size_bytes, mtime_ns, node FROM outputs").fetchall()
        )
        return {
            row["path"]: OutputStat(row["size_bytes"], row["mtime_ns"], row["node"]) for row in rows
        }

    def list_outputs(
        self, query: OutputQuery, *, limit: int, before: str | None = None
    ) -> list[OutputRecord]:
        where, args = output_filters(
            query, before, mark="%s", contains="strpos(search, {}) > 0", true="true"
        )
        rows = self._statement(
            lambda c: c.execute(
                f"SELECT * FROM outputs WHERE {where} ORDER BY name DESC, path DESC LIMIT %s",
                (*args, limit),
            ).fetchall()
        )
        return [output_record(row) for row in rows]

    def find_outputs(
        self, filenames: Sequence[str], *, trashed: bool = False
    ) -> dict[str, OutputRecord]:
        names = list(dict.fromkeys(filenames))
        where = (
            "filename = ANY(%s) AND trashed_at IS NOT NULL"
            if trashed
            else "path = ANY(%s) AND trashed_at IS NULL"
        )
        rows = self._statement(
            lambda c: c.execute(f"SELECT * FROM outputs WHERE {where}", (names,)).fetchall()
        )
        records = [output_record(row) for row in rows]
        if trashed:
            return latest_trashed(records)
        return {record.filename: record for record in records}

    def outputs_at(self, paths: Sequence[str]) -> dict[str, OutputRecord]:
        paths = list(paths)
        rows = self._statement(
            lambda c: c.execute("SELECT * FROM outputs WHERE path = ANY(%s)", (paths,)).fetchall()
        )
        return {row["path"]: output_record(row) for row in rows}

    def set_favourite(self, filename: str, favourite: bool) -> OutputRecord | None:
        row = self._statement(
            lambda c: c.execute(
                "UPDATE outputs SET favourite = %s WHERE path = %s AND trashed_at IS NULL"
                " RETURNING *",
                (bool(favourite), filename),
            ).fetchone()
        )
        return output_record(row) if row else None

    def trashed_outputs(
        self,
        *,
        limit: int,
        trashed_before: float | None = None,
        after: tuple[float, str] | None = None,
    ) -> list[OutputRecord]:
        sql, args = trashed_query(
            limit=limit, trashed_before=trashed_before, after=after, mark="%s"
        )
        rows = self._statement(lambda c: c.execute(sql, args).fetchall())
        return [output_record(row) for row in rows]

    # -- moving a queue here -----------------------------------------------------------------
    def copy_from_sqlite(self, path: str | Path) -> dict[str, int]:
        """Copy every job (any status, with its id, queue order, attempts, times and
        output), claim, delivery, setting and gallery index row (favourites and trash marks
        live only there) of the SQLite job database at ``path`` into this one, in one
        transaction, and move the id sequences past them. Refused (nothing copied) if this
        database has a job already. A gallery row this database holds already (a node indexed
        the folder before the copy) takes the copied row's name, favourite and trash mark.
        Returns the number of rows written per table."""
        source = _read_sqlite(Path(path))

        def work(c: psycopg.Connection) -> dict[str, int]:
            c.execute("LOCK TABLE jobs, claims, deliveries, settings, outputs IN EXCLUSIVE MODE")
            has = c.execute("SELECT COUNT(*) AS n FROM jobs").fetchone()["n"]
            if has:
                raise ConfigError(
                    f"the job database {self.where} has {has} jobs already; copying would "
                    "mix two queues. Copy into an empty database (queue.database)",
                    field="queue.database",
                )
            counts = {}
            for table in ("claims", "jobs", "deliveries", "settings", "outputs"):
                rows, columns = source[table]
                counts[table] = 0
                if not rows:
                    continue
                if table == "outputs":  # SQLite keeps the flag as 0 or 1
                    f = _FAVOURITE
                    rows = [(*r[:f], bool(r[f]), *r[f + 1 :]) for r in rows]
                names = ", ".join(columns)
                marks = ", ".join(["%s"] * len(columns))
                conflict = {
                    "settings": " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    "outputs": _COPY_OUTPUT_CONFLICT,
                }.get(table, "")
                with c.cursor() as cur:
                    cur.executemany(
                        f"INSERT INTO {table} ({names}) VALUES ({marks}){conflict}", rows
                    )
                    counts[table] = cur.rowcount  # the rows written, summed over the batch
            for table in ("claims", "jobs", "deliveries"):
                c.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                    f" COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
                )
            c.execute(
                "SELECT setval('jobs_queue_seq', COALESCE((SELECT MAX(seq) FROM jobs), 0) + 1,"
                " false)"
            )
            return counts

        try:
            return self._run(work)
        except psycopg.Error as exc:  # rows this schema refuses (two open claims of a file)
            raise ConfigError(
                f"cannot copy {path} into {self.where}: {_reason(exc)}; nothing was copied",
                field="--from",
            ) from None


# -- helpers, each inside the caller's transaction -----------------------------------------
def _rollback(conn: psycopg.Connection) -> None:
    if not conn.broken and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        with contextlib.suppress(psycopg.Error):
            conn.execute("ROLLBACK")


def _insert(
    c: psycopg.Connection,
    specs: Sequence[JobSpec],
    submitted_at: str,
    source: str,
    source_name: str | None,
    claim_id: int | None,
) -> list[Job]:
    with c.cursor() as cur:
        cur.executemany(
            f"{_INSERT} RETURNING *",
            [
                (QUEUED, json.dumps(spec.to_dict()), source, source_name, submitted_at, claim_id)
                for spec in specs
            ],
            returning=True,
        )
        jobs = []
        while True:
            jobs.append(_job(cur.fetchone()))
            if not cur.nextset():
                return jobs


def _head(c: psycopg.Connection) -> int:
    """The queue order of the head of the queue (1 when it is empty)."""
    return c.execute(
        f"SELECT COALESCE(MIN(seq), 1) AS head FROM jobs WHERE status = '{QUEUED}'"
    ).fetchone()["head"]


def _put_back(
    c: psycopg.Connection,
    rows: Sequence[dict[str, Any]],
    max_attempts: int,
    completed_at: str,
    webhooks: Callable[[JobSpec], Sequence[str]] | None,
    why: str,
) -> list[Job]:
    """As the SQLite store's: the jobs of ``rows`` go back to the head in their order, or
    fail once ``max_attempts`` are used. The caller holds the head lock and the rows."""
    requeue = [row["id"] for row in rows if row["attempts"] < max_attempts]
    if requeue:
        c.execute(
            f"UPDATE jobs SET status = %s, seq = %s + v.offs, {_RELEASED}"
            " FROM unnest(%s::bigint[]) WITH ORDINALITY AS v (id, offs) WHERE jobs.id = v.id",
            (QUEUED, _head(c) - len(requeue) - 1, requeue),
        )
    for row in rows:
        if row["attempts"] >= max_attempts:
            c.execute(
                "UPDATE jobs SET status = %s, completed_at = %s, error = %s, token = NULL,"
                " lease_until = NULL, interrupt = NULL WHERE id = %s",
                (FAILED, completed_at, lost_error(why, row["attempts"], max_attempts), row["id"]),
            )
            if webhooks is not None:
                _owe(c, row["id"], FAILED, webhooks(JobSpec.from_json(row["spec"])))
    return _jobs_by_id(c, [row["id"] for row in rows])


def _jobs_by_id(c: psycopg.Connection, ids: Sequence[int]) -> list[Job]:
    rows = c.execute("SELECT * FROM jobs WHERE id = ANY(%s)", (list(ids),)).fetchall()
    by_id = {row["id"]: _job(row) for row in rows}
    return [by_id[job_id] for job_id in ids if job_id in by_id]


def _owe(c: psycopg.Connection, job_id: int, status: str, urls: Sequence[str]) -> None:
    """Outbox rows for a job that just finished, in the caller's transaction."""
    urls = list(dict.fromkeys(urls))
    if urls:
        c.execute(
            "WITH done AS (SELECT %(id)s::bigint AS id)"
            f" {_OWE} FROM done, unnest(%(urls)s::text[]) WITH ORDINALITY AS u (url, n)"
            " ORDER BY u.n",
            {"id": job_id, "event": f"job.{status}", "now": time.time(), "urls": urls},
        )


def _running(c: psycopg.Connection, node: str | None) -> list[Job]:
    if node is None:
        rows = c.execute(f"SELECT * FROM jobs WHERE status = '{RUNNING}' ORDER BY seq")
    else:
        rows = c.execute(
            f"SELECT * FROM jobs WHERE status = '{RUNNING}' AND (node = %s OR node IS NULL)"
            " ORDER BY seq",
            (node,),
        )
    return [_job(row) for row in rows.fetchall()]


def _queued(c: psycopg.Connection, limit: int | None) -> list[Job]:
    rows = c.execute(
        f"SELECT * FROM jobs WHERE status = '{QUEUED}' ORDER BY seq LIMIT %s", (limit,)
    ).fetchall()
    return [_job(row) for row in rows]


def _history(c: psycopg.Connection, limit: int, before: int | None) -> list[Job]:
    rows = c.execute(
        "SELECT * FROM jobs WHERE id < %s AND status NOT IN (%s, %s) ORDER BY id DESC LIMIT %s",
        (before if before is not None else 2**63 - 1, QUEUED, RUNNING, limit),
    ).fetchall()
    return [_job(row) for row in rows]


def _jobs_of_claims(c: psycopg.Connection, claim_ids: list[int]) -> list[list[Job]]:
    """Each claim's jobs, in id order, in one query."""
    found: dict[int, list[Job]] = {claim_id: [] for claim_id in claim_ids}
    rows = c.execute("SELECT * FROM jobs WHERE claim_id = ANY(%s) ORDER BY id", (claim_ids,))
    for row in rows.fetchall():
        found[row["claim_id"]].append(_job(row))
    return [found[claim_id] for claim_id in claim_ids]


#: The columns copied from an SQLite job database, per table (those an older version lacks
#: are copied as NULL).
_COPIED = {
    "claims": (
        "id",
        "original",
        "claimed",
        "state",
        "created_at",
        "final_path",
        "note_path",
        "node",
    ),
    "jobs": ("seq", *_JOB_COLUMNS, "spec", "lease_until", "interrupt"),
    "deliveries": tuple(_DELIVERY_COLUMNS),
    "settings": ("key", "value"),
    "outputs": OUTPUT_COLUMNS,
}


def _read_sqlite(path: Path) -> dict[str, tuple[list[tuple], tuple[str, ...]]]:
    """Every row to copy from the SQLite job database at ``path``, read in one snapshot
    without changing the file (it is not migrated: columns it lacks read as NULL)."""
    if not path.is_file():
        raise ConfigError(f"no SQLite job database at {path}", field="--from")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot open {path}: {exc}", field="--from") from None
    try:
        db.execute("BEGIN")
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        if "jobs" not in tables:
            raise ConfigError(f"{path} is not an imagineerd job database", field="--from")
        if "meta" in tables:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row and int(row[0]) > SCHEMA_VERSION:
                raise ConfigError(
                    f"{path} has schema version {row[0]}, written by a newer imagineerd; "
                    f"this one understands up to version {SCHEMA_VERSION}. Upgrade imagineerd",
                    field="--from",
                )
        out: dict[str, tuple[list[tuple], tuple[str, ...]]] = {}
        for table, columns in _COPIED.items():
            if table not in tables:
                out[table] = ([], columns)
                continue
            have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            select = ", ".join(name if name in have else "NULL" for name in columns)
            order = {"settings": "key", "outputs": "path"}.get(table, "id")
            rows = db.execute(f"SELECT {select} FROM {table} ORDER BY {order}").fetchall()
            out[table] = (rows, columns)
        return out
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot read {path}: {exc}", field="--from") from None
    finally:
        db.close()
