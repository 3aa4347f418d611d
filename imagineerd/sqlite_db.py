"""One SQLite file used from many threads: a connection per thread, explicit transactions
that never leave a connection wedged, and a schema version an older program refuses."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError, StoreClosed, Unavailable


class SQLiteDatabase:
    """Connections (one per thread: sqlite3 connections must not be shared across threads
    mid-transaction), WAL with ``synchronous=FULL``, and ``_write()`` transactions."""

    def __init__(
        self,
        path: str | Path,
        schema: str,
        version: int,
        *,
        timeout: float,
        migrate: Callable[[sqlite3.Connection, int], None] | None = None,
    ) -> None:
        """Open (creating) the file and bring its schema to ``version`` in one transaction:
        ``migrate(db, found)`` first alters the tables of an older version ``found`` (columns
        ``schema`` needs and ``CREATE ... IF NOT EXISTS`` cannot add), then ``schema`` runs."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._timeout = timeout
        self._local = threading.local()
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._lock = threading.Lock()
        self._closed = False
        with self._write() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            found = int(row[0]) if row else None
            if found is not None and found > version:
                # A newer imagineerd wrote this database; guessing at its meaning could
                # corrupt the queue, so stop with the two ways out.
                raise ConfigError(
                    f"the job database {self.path} has schema version {found}, written by a "
                    f"newer imagineerd; this one understands up to version {version}. "
                    "Upgrade imagineerd, or point paths.state at another folder",
                    field="paths.state",
                )
            if found is not None and found < version and migrate is not None:
                migrate(db, found)
            for statement in schema.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(version),))

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if self._closed:
            if db is not None:  # close() left it to us: it may have been in use then
                self._local.db = None
                with contextlib.suppress(sqlite3.Error):
                    db.close()
            raise StoreClosed("the job store is closed")
        if db is None:
            # isolation_level=None: we issue BEGIN ourselves, so transactions are explicit.
            db = sqlite3.connect(
                self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
            self._local.db = db
            with self._lock:
                self._connections.append((threading.current_thread(), db))
        return db

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            try:
                self.db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    # Another process held the database past busy_timeout: say so plainly.
                    raise Unavailable(
                        "the job database is locked by another program; try again shortly"
                    ) from exc
                raise
            return self.db

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is None:
                try:
                    self.db.execute("COMMIT")
                    return
                except sqlite3.Error as error:
                    exc = error
            # A COMMIT that fails (a deferred constraint, an I/O error) can leave the
            # connection inside the transaction: without this ROLLBACK every later write on
            # this thread would fail with "cannot start a transaction within a transaction",
            # forever. SQLite may also have rolled back by itself already (a full disk), so
            # a failing ROLLBACK must not hide the error that matters.
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
                raise Unavailable(
                    f"the job database could not be written ({exc}); nothing was changed. "
                    "Free space where paths.state points, then try again"
                ) from exc
            if exc_type is None:
                raise exc

    def _write(self) -> _Tx:
        return self._Tx(self._db())

    def close(self) -> None:
        """Close this thread's connection and those of threads that ended. A connection
        another live thread owns may be in the middle of a statement: closing it under that
        thread crashes the interpreter (SQLite frees what the statement uses), so its thread
        closes it at its next call, which raises ``StoreClosed``."""
        with self._lock:
            self._closed = True
            current = threading.current_thread()
            kept = []
            for owner, db in self._connections:
                if owner is current or not owner.is_alive():
                    with contextlib.suppress(sqlite3.Error):
                        db.close()
                else:
                    kept.append((owner, db))
            self._connections = kept
        if getattr(self._local, "db", None) is not None:
            self._local.db = None
