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

from .jobs import CANCELLED, COMPLETED, FAILED, QUEUED, RUNNING, Job, JobSpec
from .sqlite_db import SQLiteDatabase
from .store import (
    CLAIMING,
    DELIVERED,
    GAVE_UP,
    OPEN_CLAIM_STATES,
    PENDING,
    SUBMITTED,
    Delivery,
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
    claim_id         INTEGER REFERENCES claims (id)
);
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs (status, seq);
-- History and duration estimates read finished jobs newest first, new jobs take MAX(seq):
-- without these each would scan the whole table (seconds with 100 000 jobs).
CREATE INDEX IF NOT EXISTS jobs_status_id ON jobs (status, id);
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs (seq);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (claim_id) WHERE claim_id IS NOT NULL;
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
    note_path   TEXT
);
"""
#: Bumped with every schema change, which comes with a migration from the version before.
#: 2: job specs may carry model, loras, clip_skip and vae. Specs stored by version 1 read
#: with their defaults (the configured model, no LoRAs, clip skip 1, its own VAE), so the
#: migration changes no row; the number is bumped so that an older imagineerd, which cannot
#: read those fields, refuses the database instead of failing on its jobs.
#: 3: the ``deliveries`` table (webhooks); created empty on a version 2 database.
SCHEMA_VERSION = 3


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
    )


class SQLiteStore(SQLiteDatabase):
    """The job store on one SQLite file; safe to use from many threads and processes.

    Every state transition is a single ``BEGIN IMMEDIATE`` transaction that checks the
    current status in its ``WHERE`` clause, so two workers can never claim the same job and
    a job cannot be cancelled and started at once.
    """

    def __init__(self, path: str | Path, *, timeout: float = 30.0) -> None:
        super().__init__(path, _SCHEMA, SCHEMA_VERSION, timeout=timeout)

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

    def claim_next(self, *, started_at: str) -> Job | None:
        claimed = self.claim_batch(started_at=started_at, limit=1)
        return claimed[0] if claimed else None

    def claim_batch(
        self,
        *,
        started_at: str,
        limit: int | Callable[[JobSpec], int],
        key: Callable[[JobSpec], Hashable] | None = None,
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
            db.executemany(
                "UPDATE jobs SET status = ?, started_at = ?, attempts = attempts + 1,"
                " progress_step = 0, progress_total = 0 WHERE id = ? AND status = ?",
                [(RUNNING, started_at, job_id, QUEUED) for job_id in ids],
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
    ) -> Job:
        assert status in (COMPLETED, FAILED, CANCELLED)
        step, total = progress if progress else (None, None)
        with self._write() as db:
            cur = db.execute(
                "UPDATE jobs SET status = ?, completed_at = ?, duration_seconds = ?,"
                " output_path = ?, error = ?,"
                " progress_step = COALESCE(?, progress_step),"
                " progress_total = COALESCE(?, progress_total)"
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
            if cur.rowcount != 1:
                raise RuntimeError(f"job {job_id} is not running; cannot mark it {status}")
            _owe(db, job_id, status, webhooks)
        return self.get(job_id)

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

    def requeue(self, job_ids: Sequence[int], *, count_attempt: bool) -> list[Job]:
        with self._write() as db:
            head = db.execute(
                "SELECT COALESCE(MIN(seq), 1) FROM jobs WHERE status = ?", (QUEUED,)
            ).fetchone()[0]
            for offset, job_id in enumerate(job_ids):
                db.execute(
                    "UPDATE jobs SET status = ?, seq = ?, started_at = NULL,"
                    " attempts = attempts - ?, progress_step = 0, progress_total = 0"
                    " WHERE id = ? AND status = ?",
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
    ) -> list[Job]:
        with self._write() as db:
            rows = db.execute(
                "SELECT id, attempts, spec FROM jobs WHERE status = ? ORDER BY seq", (RUNNING,)
            ).fetchall()
            head = db.execute(
                "SELECT COALESCE(MIN(seq), 1) FROM jobs WHERE status = ?", (QUEUED,)
            ).fetchone()[0]
            requeue = [row["id"] for row in rows if row["attempts"] < max_attempts]
            for offset, job_id in enumerate(requeue):
                db.execute(
                    "UPDATE jobs SET status = ?, seq = ?, started_at = NULL,"
                    " progress_step = 0, progress_total = 0 WHERE id = ?",
                    (QUEUED, head - len(requeue) + offset, job_id),
                )
            for row in rows:
                if row["attempts"] >= max_attempts:
                    db.execute(
                        "UPDATE jobs SET status = ?, completed_at = ?, error = ? WHERE id = ?",
                        (
                            FAILED,
                            completed_at,
                            f"the daemon stopped unexpectedly while this job ran, "
                            f"{row['attempts']} times; giving up so the queue can go on "
                            f"(queue.max_attempts is {max_attempts})",
                            row["id"],
                        ),
                    )
                    if webhooks is not None:
                        _owe(db, row["id"], FAILED, webhooks(JobSpec.from_json(row["spec"])))
        return [self.get(row["id"]) for row in rows]

    # -- webhook deliveries --------------------------------------------------------------
    def deliveries_due(self, now: float, limit: int) -> list[Delivery]:
        rows = self._db().execute(
            "SELECT * FROM deliveries WHERE state = ? AND next_at <= ? ORDER BY next_at, id"
            " LIMIT ?",
            (PENDING, now, limit),
        )
        return [Delivery(**dict(row)) for row in rows]

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
    def create_claim(self, original: str, claimed: str, *, created_at: str) -> int:
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO claims (original, claimed, state, created_at) VALUES (?, ?, ?, ?)",
                (original, claimed, CLAIMING, created_at),
            )
            return cur.lastrowid

    def submit_claim(
        self,
        claim_id: int,
        specs: list[JobSpec],
        *,
        submitted_at: str,
        source: str,
        source_name: str,
    ) -> list[Job]:
        with self._write() as db:
            state = db.execute("SELECT state FROM claims WHERE id = ?", (claim_id,)).fetchone()[
                "state"
            ]
            if state == CLAIMING:
                for spec in specs:
                    self._insert(db, spec, submitted_at, source, source_name, claim_id)
                db.execute("UPDATE claims SET state = ? WHERE id = ?", (SUBMITTED, claim_id))
        return self.claim_jobs(claim_id)

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

    def delete_claim(self, claim_id: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM claims WHERE id = ? AND state = ?", (claim_id, CLAIMING))

    def get_claim(self, claim_id: int) -> dict | None:
        row = self._db().execute("SELECT * FROM claims WHERE id = ?", (claim_id,)).fetchone()
        return dict(row) if row else None

    def open_claims(self) -> list[dict]:
        rows = self._db().execute(
            "SELECT * FROM claims WHERE state IN (?, ?) ORDER BY id", OPEN_CLAIM_STATES
        )
        return [dict(row) for row in rows]

    def claim_jobs(self, claim_id: int) -> list[Job]:
        return self._many("SELECT * FROM jobs WHERE claim_id = ? ORDER BY id", (claim_id,))

    # -- queries -------------------------------------------------------------------------
    def get(self, job_id: int) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def running(self) -> list[Job]:
        return self._many("SELECT * FROM jobs WHERE status = ? ORDER BY seq", (RUNNING,))

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


def _owe(db: sqlite3.Connection, job_id: int, status: str, urls: Sequence[str]) -> None:
    """Outbox rows for a job that just finished, in the caller's transaction."""
    now = time.time()
    db.executemany(
        "INSERT INTO deliveries (job_id, event, url, state, created_at, next_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [(job_id, f"job.{status}", url, PENDING, now, now) for url in dict.fromkeys(urls)],
    )
