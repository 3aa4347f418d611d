"""The job store on one SQLite file (the embedded default).

WAL journal and ``synchronous=FULL``: a job acknowledged to a client survives a power cut.
Each thread gets its own connection, and every state transition is a single ``BEGIN
IMMEDIATE`` transaction whose ``WHERE`` clause checks the current status. The contract each
method keeps is documented on :class:`imagineerd.store.Store`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .jobs import CANCELLED, COMPLETED, FAILED, QUEUED, RUNNING, Job, JobSpec
from .sqlite_db import SQLiteDatabase
from .store import (
    CLAIMING,
    DELIVERED,
    GAVE_UP,
    LEASE_LOST,
    OPEN_CLAIM_STATES,
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
    new_token,
    output_filters,
    output_record,
    output_row,
    positions_from,
    put_outputs_sql,
    reordered,
    trashed_query,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    seq              INTEGER NOT NULL,
    status           TEXT NOT NULL,
    spec             TEXT NOT NULL,
    source           TEXT NOT NULL DEFAULT 'api',
    source_name      TEXT,
    submitted_at     TEXT NOT NULL,
    started_at       TEXT,
    completed_at     TEXT,
    duration_seconds REAL,
    output_path      TEXT,
    error            TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    progress_step    INTEGER NOT NULL DEFAULT 0,
    progress_total   INTEGER NOT NULL DEFAULT 0,
    claim_id         INTEGER REFERENCES claims (id),
    node             TEXT,
    token            TEXT,
    lease_until      REAL,
    interrupt        TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs (status, seq);
-- History and duration estimates read finished jobs newest first, new jobs take MAX(seq):
-- without these each would scan the whole table (seconds with 100 000 jobs).
CREATE INDEX IF NOT EXISTS jobs_status_id ON jobs (status, id);
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs (seq);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (claim_id) WHERE claim_id IS NOT NULL;
-- A node's running jobs (lease renewal, its start-up) and the leases that ran out: only
-- running jobs are indexed, so both stay small however long the history grows.
CREATE INDEX IF NOT EXISTS jobs_running_node ON jobs (node, seq) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS jobs_running_lease ON jobs (lease_until) WHERE status = 'running';
-- The webhook outbox: a delivery owed is written in the transaction that finishes its job,
-- so a crash between the two can neither lose nor invent one.
CREATE TABLE IF NOT EXISTS deliveries (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id       INTEGER NOT NULL REFERENCES jobs (id),
    event        TEXT NOT NULL,
    url          TEXT NOT NULL,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    created_at   REAL NOT NULL,
    next_at      REAL NOT NULL,
    last_status  INTEGER,
    last_error   TEXT,
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_at);
CREATE TABLE IF NOT EXISTS claims (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    original    TEXT NOT NULL,
    claimed     TEXT NOT NULL,
    state       TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    final_path  TEXT,
    note_path   TEXT,
    node        TEXT
);
-- One open claim per inbox file: of two nodes that see the same file, one records it.
CREATE UNIQUE INDEX IF NOT EXISTS claims_open_original ON claims (original)
    WHERE state IN ('claiming', 'submitted');
CREATE TABLE IF NOT EXISTS nodes (
    name         TEXT PRIMARY KEY,
    info         TEXT NOT NULL,
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- The gallery index (imagineerd.gallery_index): one row per PNG of the outputs folder, by
-- its path there, with the node that read it (nodes may each have a folder of their own,
-- and a node drops only its own rows). The partial indexes serve newest-first pages of the
-- listed images (none in the trash), alone or with one filter, without reading the rows
-- they skip.
CREATE TABLE IF NOT EXISTS outputs (
    path            TEXT PRIMARY KEY,
    filename        TEXT NOT NULL,
    name            TEXT NOT NULL,
    job_id          INTEGER,
    created         TEXT NOT NULL,
    prompt          TEXT,
    search          TEXT,
    negative_prompt TEXT,
    model           TEXT,
    width           INTEGER,
    height          INTEGER,
    source          TEXT,
    favourite       INTEGER NOT NULL DEFAULT 0,
    trashed_at      REAL,
    size_bytes      INTEGER NOT NULL,
    mtime_ns        INTEGER NOT NULL,
    entry           TEXT NOT NULL,
    node            TEXT
);
CREATE INDEX IF NOT EXISTS outputs_listed ON outputs (name, path) WHERE trashed_at IS NULL;
CREATE INDEX IF NOT EXISTS outputs_favourite ON outputs (name, path)
    WHERE trashed_at IS NULL AND favourite = 1;
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
#: Columns version 4 added to tables that older versions have already.
_ADDED_IN_4 = {
    "jobs": ("node TEXT", "token TEXT", "lease_until REAL", "interrupt TEXT"),
    "claims": ("node TEXT",),
}


def _migrate(db: sqlite3.Connection, found: int) -> None:
    """Bring a database of version ``found`` (1-4) to the columns of this version, in the
    opening transaction; new tables and indexes then come from the schema itself (version
    5 only adds the ``outputs`` table, so a version 4 database needs nothing here)."""
    for table, columns in _ADDED_IN_4.items():
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if not have:
            continue  # the schema creates it whole
        for column in columns:
            if column.split()[0] not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
    if found < 4 and "original" in {row[1] for row in db.execute("PRAGMA table_info(claims)")}:
        twice = db.execute(
            "SELECT original, COUNT(*) FROM claims WHERE state IN (?, ?) GROUP BY original"
            " HAVING COUNT(*) > 1 LIMIT 1",
            OPEN_CLAIM_STATES,
        ).fetchone()
        if twice is not None:
            # Only an older imagineerd's crash can leave these; the unique index of version
            # 4 cannot be built over them, and which file is which is the user's to say.
            raise ConfigError(
                f"the job database has {twice[1]} unfinished inbox claims of the same file "
                f"{twice[0]!r}; start the previous imagineerd once so that it finishes them, "
                "then upgrade",
                field="paths.state",
            )


_PUT_OUTPUT = put_outputs_sql("?")
_REPLACE_OUTPUT = (
    f"INSERT OR REPLACE INTO outputs ({', '.join(OUTPUT_COLUMNS)})"
    f" VALUES ({', '.join('?' * len(OUTPUT_COLUMNS))}) RETURNING *"
)
_FAVOURITE = OUTPUT_COLUMNS.index("favourite")


def _row_to_job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        status=row["status"],
        spec=JobSpec.from_json(row["spec"]),
        submitted_at=row["submitted_at"],
        source=row["source"],
        source_name=row["source_name"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        duration_seconds=row["duration_seconds"],
        output_path=row["output_path"],
        error=row["error"],
        attempts=row["attempts"],
        progress_step=row["progress_step"],
        progress_total=row["progress_total"],
        claim_id=row["claim_id"],
        node=row["node"],
        token=row["token"],
    )


class SQLiteStore(SQLiteDatabase):
    """The job store on one SQLite file; safe to use from many threads and processes.

    Every state transition is a single ``BEGIN IMMEDIATE`` transaction that checks the
    current status in its ``WHERE`` clause, so two workers can never claim the same job and
    a job cannot be cancelled and started at once. The store's clock (leases, node
    heartbeats) is this machine's: every process using the file runs on it.
    """

    def __init__(self, path: str | Path, *, timeout: float = 30.0) -> None:
        super().__init__(path, _SCHEMA, SCHEMA_VERSION, timeout=timeout, migrate=_migrate)

    @staticmethod
    def _now() -> float:
        return time.time()

    def schema_version(self) -> int:
        """The version the file is at (this imagineerd's, once opened)."""
        row = self._db().execute("SELECT value FROM meta WHERE key = 'schema_version'")
        return int(row.fetchone()[0])

    def _one(self, sql: str, args: Iterable = ()) -> Job | None:
        row = self._db().execute(sql, tuple(args)).fetchone()
        return _row_to_job(row) if row else None

    def _many(self, sql: str, args: Iterable = ()) -> list[Job]:
        return [_row_to_job(row) for row in self._db().execute(sql, tuple(args))]

    # -- transitions ---------------------------------------------------------------------
    def add(
        self,
        spec: JobSpec,
        *,
        submitted_at: str,
        source: str = "api",
        source_name: str | None = None,
    ) -> Job:
        with self._write() as db:
            job_id = self._insert(db, spec, submitted_at, source, source_name, None)
        return self.get(job_id)

    def add_many(
        self,
        specs: Sequence[JobSpec],
        *,
        submitted_at: str,
        source: str = "api",
        source_name: str | None = None,
    ) -> list[Job]:
        with self._write() as db:
            ids = [self._insert(db, s, submitted_at, source, source_name, None) for s in specs]
        return [job for job_id in ids if (job := self.get(job_id)) is not None]

    @staticmethod
    def _insert(
        db: sqlite3.Connection,
        spec: JobSpec,
        submitted_at: str,
        source: str,
        source_name: str | None,
        claim_id: int | None,
    ) -> int:
        seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
        cur = db.execute(
            "INSERT INTO jobs (seq, status, spec, source, source_name, submitted_at, claim_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq, QUEUED, json.dumps(spec.to_dict()), source, source_name, submitted_at, claim_id),
        )
        return cur.lastrowid

    #: How far past the head a batch claim looks for compatible jobs.
    BATCH_LOOKAHEAD = 512

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
        with self._write() as db:
            rows = db.execute(
                "SELECT id, spec FROM jobs WHERE status = ? ORDER BY seq LIMIT ?",
                (QUEUED, self.BATCH_LOOKAHEAD if key is not None else 1),
            ).fetchall()
            if not rows:
                return []
            head = JobSpec.from_json(rows[0]["spec"])
            size = limit(head) if callable(limit) else limit
            ids = [rows[0]["id"]]
            if key is not None and size > 1:
                wanted = key(head)
                for row in rows[1:]:
                    if len(ids) >= size:
                        break
                    if key(JobSpec.from_json(row["spec"])) == wanted:
                        ids.append(row["id"])
            # No node, no lease: a claim of no node is put back by a start-up's recovery,
            # as before nodes existed, and never by another node.
            lease_until = self._now() + lease_seconds if node else None
            db.executemany(
                "UPDATE jobs SET status = ?, started_at = ?, attempts = attempts + 1,"
                " progress_step = 0, progress_total = 0, node = ?, token = ?,"
                " lease_until = ?, interrupt = NULL WHERE id = ? AND status = ?",
                [
                    (RUNNING, started_at, node or None, new_token(), lease_until, job_id, QUEUED)
                    for job_id in ids
                ],
            )
        return [self.get(job_id) for job_id in ids]

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
        with self._write() as db:
            row = db.execute("SELECT status, token FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None and token is not None and row["token"] != token:
                raise Fenced(
                    f"job {job_id} is no longer held by this claim (its lease ran out and it "
                    f"went back to the queue or to another node); not marking it {status}"
                )
            if row is None or row["status"] != RUNNING:
                raise RuntimeError(f"job {job_id} is not running; cannot mark it {status}")
            db.execute(
                "UPDATE jobs SET status = ?, completed_at = ?, duration_seconds = ?,"
                " output_path = ?, error = ?,"
                " progress_step = COALESCE(?, progress_step),"
                " progress_total = COALESCE(?, progress_total), lease_until = NULL"
                " WHERE id = ? AND status = ?",
                (
                    status,
                    completed_at,
                    duration_seconds,
                    output_path,
                    error,
                    step,
                    total,
                    job_id,
                    RUNNING,
                ),
            )
            _owe(db, job_id, status, webhooks)
        return self.get(job_id)

    def holds(self, job_id: int, token: str) -> bool:
        row = (
            self._db()
            .execute(
                "SELECT 1 FROM jobs WHERE id = ? AND status = ? AND token = ?",
                (job_id, RUNNING, token),
            )
            .fetchone()
        )
        return row is not None

    # -- leases and nodes ----------------------------------------------------------------
    def renew_leases(self, node: str, *, lease_seconds: float) -> None:
        with self._write() as db:
            db.execute(
                f"UPDATE jobs SET lease_until = ? WHERE status = '{RUNNING}' AND node = ?",
                (self._now() + lease_seconds, node),
            )

    def interrupts(self, node: str) -> dict[int, str]:
        rows = self._db().execute(
            f"SELECT id, interrupt FROM jobs WHERE status = '{RUNNING}' AND node = ?"
            " AND interrupt IS NOT NULL ORDER BY seq",
            (node,),
        )
        return {row["id"]: row["interrupt"] for row in rows}

    def request_interrupt(self, job_id: int, reason: str) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE jobs SET interrupt = COALESCE(interrupt, ?) WHERE id = ? AND status = ?",
                (reason, job_id, RUNNING),
            )
        return cur.rowcount == 1

    def expire_leases(
        self,
        *,
        max_attempts: int,
        completed_at: str,
        webhooks: Callable[[JobSpec], Sequence[str]] | None = None,
    ) -> list[Job]:
        with self._write() as db:
            rows = db.execute(
                f"SELECT id, seq, attempts, spec FROM jobs WHERE status = '{RUNNING}'"
                " AND lease_until < ?",
                (self._now(),),
            ).fetchall()
            rows.sort(key=lambda row: row["seq"])  # few: no index needed to order them
            _put_back(db, rows, max_attempts, completed_at, webhooks, LEASE_LOST)
        return [self.get(row["id"]) for row in rows]

    def heartbeat(self, node: str, info: dict[str, Any]) -> None:
        now = self._now()
        with self._write() as db:
            db.execute(
                "INSERT INTO nodes (name, info, started_at, heartbeat_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET info = excluded.info,"
                " heartbeat_at = excluded.heartbeat_at",
                (node, json.dumps(info), now, now),
            )

    def nodes(self) -> list[dict[str, Any]]:
        now = self._now()
        rows = self._db().execute("SELECT * FROM nodes ORDER BY name").fetchall()
        return [
            {
                "name": row["name"],
                "info": json.loads(row["info"]),
                "started_at": row["started_at"],
                "heartbeat_at": row["heartbeat_at"],
                "age": max(0.0, now - row["heartbeat_at"]),
            }
            for row in rows
        ]

    # -- settings shared by every node ---------------------------------------------------
    def get_setting(self, key: str) -> Any | None:
        row = self._db().execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_setting(self, key: str, value: Any) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )

    def cancel_queued(
        self, job_id: int, *, completed_at: str, webhooks: Sequence[str] = ()
    ) -> Job | None:
        with self._write() as db:
            cur = db.execute(
                "UPDATE jobs SET status = ?, completed_at = ? WHERE id = ? AND status = ?",
                (CANCELLED, completed_at, job_id, QUEUED),
            )
            if cur.rowcount == 1:
                _owe(db, job_id, CANCELLED, webhooks)
        return self.get(job_id) if cur.rowcount == 1 else None

    def move(self, job_id: int, to: str | int) -> Moved | None:
        move_target(to, 0, 1)  # a bad target is refused whatever the job
        with self._write() as db:
            rows = [
                (row[0], row[1])
                for row in db.execute(
                    "SELECT id, seq FROM jobs WHERE status = ? ORDER BY seq", (QUEUED,)
                )
            ]
            ids = [row[0] for row in rows]
            if job_id not in ids:
                return None
            place = ids.index(job_id)
            target = move_target(to, place, len(ids))
            low, high = sorted((place, target))
            moves = reordered(rows[low : high + 1], job_id, target - low)
            if target == 0 and place != 0:
                # To the head as a put-back goes there: one row changes, not the window.
                db.execute("UPDATE jobs SET seq = ? WHERE id = ?", (rows[0][1] - 1, job_id))
            elif target != place:
                db.executemany("UPDATE jobs SET seq = ? WHERE id = ?", moves)
        return Moved(job_id, place + 1, target + 1, [job_id_ for _, job_id_ in moves])

    def requeue(self, job_ids: Sequence[int], *, count_attempt: bool) -> list[Job]:
        with self._write() as db:
            head = db.execute(
                "SELECT COALESCE(MIN(seq), 1) FROM jobs WHERE status = ?", (QUEUED,)
            ).fetchone()[0]
            for offset, job_id in enumerate(job_ids):
                db.execute(
                    f"UPDATE jobs SET status = ?, seq = ?, {_RELEASED},"
                    " attempts = attempts - ? WHERE id = ? AND status = ?",
                    (
                        QUEUED,
                        head - len(job_ids) + offset,
                        0 if count_attempt else 1,
                        job_id,
                        RUNNING,
                    ),
                )
        return [job for job in (self.get(job_id) for job_id in job_ids) if job is not None]

    def recover(
        self,
        *,
        max_attempts: int,
        completed_at: str,
        webhooks: Callable[[JobSpec], Sequence[str]] | None = None,
        node: str = "",
    ) -> list[Job]:
        with self._write() as db:
            rows = db.execute(
                f"SELECT id, attempts, spec FROM jobs WHERE status = '{RUNNING}'"
                " AND (node = ? OR node IS NULL) ORDER BY seq",
                (node,),
            ).fetchall()
            _put_back(db, rows, max_attempts, completed_at, webhooks, STOPPED)
        return [self.get(row["id"]) for row in rows]

    # -- webhook deliveries --------------------------------------------------------------
    def deliveries_due(self, now: float, limit: int, *, hold: float = 0.0) -> list[Delivery]:
        due = (
            "SELECT * FROM deliveries WHERE state = ? AND next_at <= ? ORDER BY next_at, id LIMIT ?"
        )
        if not hold:
            return [Delivery(**dict(row)) for row in self._db().execute(due, (PENDING, now, limit))]
        if not self._db().execute(due, (PENDING, now, 1)).fetchone():
            return []  # nothing due: no write transaction (and no fsync) for each poll
        with self._write() as db:
            rows = [dict(row) for row in db.execute(due, (PENDING, now, limit))]
            db.executemany(
                "UPDATE deliveries SET next_at = ? WHERE id = ?",
                [(now + hold, row["id"]) for row in rows],
            )
        return [Delivery(**{**row, "next_at": now + hold}) for row in rows]

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
        with self._write() as db:
            db.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, last_status = ?,"
                " last_error = ?, next_at = COALESCE(?, next_at), delivered_at = ?"
                " WHERE id = ? AND state = ?",
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

    def delivery_counts(self) -> dict[str, int]:
        rows = self._db().execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state")
        return {PENDING: 0, DELIVERED: 0, GAVE_UP: 0, **{state: n for state, n in rows}}

    def deliveries(self, limit: int) -> list[Delivery]:
        rows = self._db().execute("SELECT * FROM deliveries ORDER BY id DESC LIMIT ?", (limit,))
        return [Delivery(**dict(row)) for row in rows]

    # -- claims: files taken from the inbox ---------------------------------------------
    def create_claim(
        self, original: str, claimed: str, *, created_at: str, node: str = ""
    ) -> int | None:
        return self.create_claims([(original, claimed)], created_at=created_at, node=node)[0]

    def create_claims(
        self, items: Sequence[tuple[str, str]], *, created_at: str, node: str = ""
    ) -> list[int | None]:
        ids: list[int | None] = []
        with self._write() as db:
            for original, claimed in items:
                row = db.execute(
                    "INSERT INTO claims (original, claimed, state, created_at, node)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (original)"
                    f" WHERE state IN {OPEN_CLAIM_STATES_SQL} DO NOTHING RETURNING id",
                    (original, claimed, CLAIMING, created_at, node or None),
                ).fetchone()
                ids.append(row[0] if row else None)
        return ids

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
        with self._write() as db:
            for item in items:
                claim = db.execute(
                    "SELECT state FROM claims WHERE id = ?", (item.claim_id,)
                ).fetchone()
                if claim is None or claim["state"] != CLAIMING:
                    continue  # submitted before: its jobs and paths stay as they are
                for spec in item.specs:
                    self._insert(db, spec, submitted_at, source, item.source_name, item.claim_id)
                db.execute(
                    "UPDATE claims SET state = ?, final_path = COALESCE(?, final_path),"
                    " note_path = COALESCE(?, note_path) WHERE id = ?",
                    (SUBMITTED, item.final_path, item.note_path, item.claim_id),
                )
        return self._jobs_of_claims([item.claim_id for item in items])

    def _jobs_of_claims(self, claim_ids: list[int]) -> list[list[Job]]:
        """Each claim's jobs, in id order, read in a few queries rather than one a claim."""
        found: dict[int, list[Job]] = {claim_id: [] for claim_id in claim_ids}
        for start in range(0, len(claim_ids), 500):
            chunk = claim_ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for job in self._many(
                f"SELECT * FROM jobs WHERE claim_id IN ({marks}) ORDER BY id", chunk
            ):
                found[job.claim_id].append(job)
        return [found[claim_id] for claim_id in claim_ids]

    def update_claim(
        self,
        claim_id: int,
        state: str,
        *,
        final_path: str | None = None,
        note_path: str | None = None,
    ) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE claims SET state = ?, final_path = COALESCE(?, final_path),"
                " note_path = COALESCE(?, note_path) WHERE id = ?",
                (state, final_path, note_path, claim_id),
            )

    def update_claims(self, claim_ids: Sequence[int], state: str) -> None:
        with self._write() as db:
            db.executemany(
                "UPDATE claims SET state = ? WHERE id = ?", [(state, i) for i in claim_ids]
            )

    def delete_claim(self, claim_id: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM claims WHERE id = ? AND state = ?", (claim_id, CLAIMING))

    def get_claim(self, claim_id: int) -> dict | None:
        row = self._db().execute("SELECT * FROM claims WHERE id = ?", (claim_id,)).fetchone()
        return dict(row) if row else None

    def open_claims(self, node: str | None = None) -> list[dict]:
        # The states are literals so that the partial index of open claims serves this.
        sql = f"SELECT * FROM claims WHERE state IN {OPEN_CLAIM_STATES_SQL}"
        if node is None:
            rows = self._db().execute(sql + " ORDER BY id")
        else:
            rows = self._db().execute(sql + " AND (node = ? OR node IS NULL) ORDER BY id", (node,))
        return [dict(row) for row in rows]

    def claim_jobs(self, claim_id: int) -> list[Job]:
        return self._jobs_of_claims([claim_id])[0]

    def claims_with_jobs(self, claim_ids: Sequence[int]) -> list[tuple[dict | None, list[Job]]]:
        ids = list(claim_ids)
        claims: dict[int, dict] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for row in self._db().execute(f"SELECT * FROM claims WHERE id IN ({marks})", chunk):
                claims[row["id"]] = dict(row)
        return list(zip([claims.get(i) for i in ids], self._jobs_of_claims(ids), strict=True))

    # -- the gallery index ---------------------------------------------------------------
    def put_outputs(self, records: Sequence[OutputRecord]) -> None:
        if records:
            with self._write() as db:
                db.executemany(_PUT_OUTPUT, [output_row(r) for r in records])

    def move_output(self, old_path: str, record: OutputRecord) -> OutputRecord:
        row = list(output_row(record))
        with self._write() as db:
            old = db.execute(
                "DELETE FROM outputs WHERE path = ? RETURNING favourite", (old_path,)
            ).fetchone()
            if old is not None:
                row[_FAVOURITE] = bool(old[0])
            stored = db.execute(_REPLACE_OUTPUT, row).fetchone()
        return output_record(stored)

    def drop_outputs(self, paths: Sequence[str]) -> int:
        dropped = 0
        paths = list(paths)
        if not paths:
            return 0
        with self._write() as db:
            for start in range(0, len(paths), 500):
                chunk = paths[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                gone = db.execute(f"DELETE FROM outputs WHERE path IN ({marks})", chunk)
                dropped += gone.rowcount
        return dropped

    def output_stats(self) -> dict[str, OutputStat]:
        rows = self._db().execute("SELECT path, size_bytes, mtime_ns, node FROM outputs")
        return {path: OutputStat(size, mtime, node) for path, size, mtime, node in rows}

    def list_outputs(
        self, query: OutputQuery, *, limit: int, before: str | None = None
    ) -> list[OutputRecord]:
        where, args = output_filters(
            query, before, mark="?", contains="instr(search, {}) > 0", true="1"
        )
        rows = self._db().execute(
            f"SELECT * FROM outputs WHERE {where} ORDER BY name DESC, path DESC LIMIT ?",
            (*args, limit),
        )
        return [output_record(row) for row in rows]

    def find_outputs(
        self, filenames: Sequence[str], *, trashed: bool = False
    ) -> dict[str, OutputRecord]:
        names = list(dict.fromkeys(filenames))
        where = (
            "filename IN ({}) AND trashed_at IS NOT NULL"
            if trashed
            else "path IN ({}) AND trashed_at IS NULL"
        )
        records = []
        for start in range(0, len(names), 500):
            chunk = names[start : start + 500]
            sql = f"SELECT * FROM outputs WHERE {where.format(', '.join('?' * len(chunk)))}"
            records += [output_record(row) for row in self._db().execute(sql, chunk)]
        if trashed:
            return latest_trashed(records)
        return {record.filename: record for record in records}

    def outputs_at(self, paths: Sequence[str]) -> dict[str, OutputRecord]:
        found: dict[str, OutputRecord] = {}
        paths = list(dict.fromkeys(paths))
        for start in range(0, len(paths), 500):
            chunk = paths[start : start + 500]
            sql = f"SELECT * FROM outputs WHERE path IN ({', '.join('?' * len(chunk))})"
            for row in self._db().execute(sql, chunk):
                found[row["path"]] = output_record(row)
        return found

    def set_favourite(self, filename: str, favourite: bool) -> OutputRecord | None:
        with self._write() as db:
            row = db.execute(
                "UPDATE outputs SET favourite = ? WHERE path = ? AND trashed_at IS NULL"
                " RETURNING *",
                (bool(favourite), filename),
            ).fetchone()
        return output_record(row) if row else None

    def trashed_outputs(
        self,
        *,
        limit: int,
        trashed_before: float | None = None,
        after: tuple[float, str] | None = None,
    ) -> list[OutputRecord]:
        sql, args = trashed_query(limit=limit, trashed_before=trashed_before, after=after, mark="?")
        return [output_record(row) for row in self._db().execute(sql, args)]

    # -- queries -------------------------------------------------------------------------
    def get(self, job_id: int) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def running(self, node: str | None = None) -> list[Job]:
        if node is None:
            return self._many("SELECT * FROM jobs WHERE status = ? ORDER BY seq", (RUNNING,))
        return self._many(
            f"SELECT * FROM jobs WHERE status = '{RUNNING}' AND (node = ? OR node IS NULL)"
            " ORDER BY seq",
            (node,),
        )

    def queued(self, limit: int | None = None) -> list[Job]:
        return self._many(
            "SELECT * FROM jobs WHERE status = ? ORDER BY seq LIMIT ?",
            (QUEUED, -1 if limit is None else limit),
        )

    def history(self, limit: int, before: int | None = None) -> list[Job]:
        """Finished jobs, newest (highest id) first; ``before`` pages on by id.

        Written as a walk down the primary key (most jobs are finished, so it stops after
        about ``limit`` rows); filtering by status through an index would sort them all.
        """
        return self._many(
            "SELECT * FROM jobs WHERE id < ? AND status NOT IN (?, ?) ORDER BY id DESC LIMIT ?",
            (before if before is not None else 2**63 - 1, QUEUED, RUNNING, limit),
        )

    def overview(
        self, *, queued_limit: int, history_limit: int, before: int | None = None
    ) -> tuple[list[Job], list[Job], list[Job]]:
        """``(running, queued, history)`` read from one snapshot of the database.

        Three separate reads would race the workers: a job that starts between the read of
        the running jobs and the read of the queue would be in neither list, and one that
        finishes in between would be in two.
        """
        db = self._db()
        # A deferred transaction: in WAL mode its first SELECT pins a read snapshot that
        # the following SELECTs share, without blocking any writer.
        db.execute("BEGIN")
        try:
            return (
                self.running(),
                self.queued(queued_limit),
                self.history(history_limit, before),
            )
        finally:
            db.execute("COMMIT")

    def queue_position(self, job: Job) -> int:
        if job.status == RUNNING:
            return 0
        if job.status != QUEUED:
            return -1
        row = (
            self._db()
            .execute(
                "SELECT COUNT(*) FROM jobs WHERE status = ? AND seq < "
                "(SELECT seq FROM jobs WHERE id = ?)",
                (QUEUED, job.id),
            )
            .fetchone()
        )
        return row[0] + 1

    def queue_positions(self, jobs: Sequence[Job]) -> list[int]:
        return positions_from(jobs, self._queued_between)

    def _queued_between(self, ids: list[int]) -> tuple[int, list[int]]:
        db = self._db()
        marks = ", ".join("?" * len(ids))
        low, high = db.execute(
            f"SELECT MIN(seq), MAX(seq) FROM jobs WHERE id IN ({marks})", ids
        ).fetchone()
        ahead = db.execute(
            "SELECT COUNT(*) FROM jobs WHERE status = ? AND seq < ?", (QUEUED, low)
        ).fetchone()[0]
        rows = db.execute(
            "SELECT id FROM jobs WHERE status = ? AND seq BETWEEN ? AND ? ORDER BY seq",
            (QUEUED, low, high),
        )
        return ahead, [row[0] for row in rows]

    def counts(self) -> dict[str, int]:
        rows = self._db().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        counts = {status: 0 for status in (QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED)}
        counts.update({status: n for status, n in rows})
        return counts

    def recent_durations(self, spec: JobSpec, limit: int = 20) -> list[float]:
        """Durations of the latest completed jobs; those of the same size and steps first."""
        rows = (
            self._db()
            .execute(
                "SELECT duration_seconds, spec FROM jobs WHERE status = ? AND duration_seconds"
                " IS NOT NULL ORDER BY id DESC LIMIT 200",
                (COMPLETED,),
            )
            .fetchall()
        )
        similar, other = [], []
        for duration, raw in rows:
            s = json.loads(raw)
            if (s["width"], s["height"], s["steps"]) == (spec.width, spec.height, spec.steps):
                similar.append(duration)
            else:
                # Scale by work (pixels x steps): a rough but honest estimate for a new size.
                work = s["width"] * s["height"] * s["steps"]
                other.append(duration * spec.width * spec.height * spec.steps / work)
        return (similar or other)[:limit]


#: What putting a running job back clears: its claim (node's lease and token), its progress
#: and any interrupt asked of it. The node stays: it shows where the job last ran.
_RELEASED = (
    "started_at = NULL, progress_step = 0, progress_total = 0, token = NULL,"
    " lease_until = NULL, interrupt = NULL"
)


def _put_back(
    db: sqlite3.Connection,
    rows: Sequence[sqlite3.Row],
    max_attempts: int,
    completed_at: str,
    webhooks: Callable[[JobSpec], Sequence[str]] | None,
    why: str,
) -> None:
    """Running jobs whose process is gone (``rows``: id, attempts, spec in queue order) go
    back to the head of the queue in their order, or fail once ``max_attempts`` are used."""
    head = db.execute(
        "SELECT COALESCE(MIN(seq), 1) FROM jobs WHERE status = ?", (QUEUED,)
    ).fetchone()[0]
    requeue = [row["id"] for row in rows if row["attempts"] < max_attempts]
    for offset, job_id in enumerate(requeue):
        db.execute(
            f"UPDATE jobs SET status = ?, seq = ?, {_RELEASED} WHERE id = ?",
            (QUEUED, head - len(requeue) + offset, job_id),
        )
    for row in rows:
        if row["attempts"] >= max_attempts:
            db.execute(
                "UPDATE jobs SET status = ?, completed_at = ?, error = ?, token = NULL,"
                " lease_until = NULL, interrupt = NULL WHERE id = ?",
                (FAILED, completed_at, lost_error(why, row["attempts"], max_attempts), row["id"]),
            )
            if webhooks is not None:
                _owe(db, row["id"], FAILED, webhooks(JobSpec.from_json(row["spec"])))


def _owe(db: sqlite3.Connection, job_id: int, status: str, urls: Sequence[str]) -> None:
    """Outbox rows for a job that just finished, in the caller's transaction."""
    now = time.time()
    db.executemany(
        "INSERT INTO deliveries (job_id, event, url, state, created_at, next_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [(job_id, f"job.{status}", url, PENDING, now, now) for url in dict.fromkeys(urls)],
    )
