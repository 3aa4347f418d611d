"""Events shared by every node of a PostgreSQL queue: an event log table, woken by NOTIFY.

Each node publishes into the ``events`` table and reads every node's events back from it,
in id order, into its own :class:`~imagineerd.events.EventBus` (which feeds its SSE
streams). The table, not the notification, is the truth: ``NOTIFY`` only says "there is
more", and a listener that missed one (its connection dropped) still finds every event by
id when it polls, which it does every second anyway. Ids come from the table, so a browser
that reconnects to another node with ``Last-Event-ID`` resumes where it was.

Publishing never blocks the caller (a worker reports every denoising step): events go into
a bounded queue that a writer thread empties, one transaction per batch. Progress is
thinned to :data:`PROGRESS_INTERVAL` per job, keeping the latest, so a node's GPU cannot
flood the database. Inserts take a transaction-level advisory lock, so ids commit in the
order they are given and a reader that has seen id N has seen every id below it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .events import Event, EventBus

log = logging.getLogger(__name__)

CHANNEL = "imagineerd_events"
#: Serialises inserts across nodes (see the module docstring); any fixed 64-bit number.
_LOCK_KEY = 0x1A6E_E5D0
#: At most one progress event per job per this many seconds goes to the log.
PROGRESS_INTERVAL = 0.1
#: The log keeps about this many events (a day of a busy queue's state changes); older ones
#: are deleted. Replay needs only what a bus holds (2,500).
KEEP_EVENTS = 20_000


class SharedEventBus(EventBus):
    """An :class:`EventBus` whose events are numbered and shared through PostgreSQL.

    ``connect()`` returns a new autocommit psycopg connection. ``on_remote(event)`` is
    called for each event another node published (the daemon wakes its workers for new
    jobs, follows remote progress, reloads shared settings).
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        *,
        node: str,
        on_remote: Callable[[Event], None] | None = None,
        outbound: int = 10_000,
    ) -> None:
        super().__init__()
        self._connect = connect
        self.node = node
        self._on_remote = on_remote
        self._outbound: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(outbound)
        self._stop = threading.Event()
        self._last_progress: dict[Any, float] = {}
        self._held_progress: dict[Any, tuple[str, dict[str, Any]]] = {}
        self._threads: list[threading.Thread] = []
        self.connected = False
        self._preload()

    # -- publishing ----------------------------------------------------------------------
    def publish(self, type: str, data: dict[str, Any]) -> None:
        try:
            self._outbound.put_nowait((type, data))
        except queue.Full:
            # The database is away for long: state is in the jobs table anyway, and a
            # client that reconnects reloads it, so a dropped event loses no job.
            log.warning("event log unreachable; dropped a %s event", type)

    def start(self) -> None:
        for target, name in ((self._write_loop, "writer"), (self._read_loop, "reader")):
            thread = threading.Thread(target=target, name=f"imagineerd-events-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Flush what is queued (best effort) and stop both threads."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def _write_loop(self) -> None:
        conn = None
        pending: list[tuple[str, dict[str, Any]]] = []
        last_trim = 0.0
        while True:
            stopping = self._stop.is_set()
            pending.extend(self._take(timeout=0.05 if pending else 0.5))
            pending.extend(self._due_progress(flush=stopping))
            if not pending:
                if stopping:
                    break
                continue
            try:
                if conn is None or conn.closed:
                    conn = self._connect()
                self._insert(conn, pending)
                pending = []
                if time.monotonic() - last_trim > 60:
                    last_trim = time.monotonic()
                    self._trim(conn)
            except Exception as exc:
                log.warning("cannot write events to the database (%s); retrying", exc)
                _close(conn)
                conn = None
                if stopping:
                    break
                self._stop.wait(1.0)
        _close(conn)

    def _take(self, timeout: float) -> list[tuple[str, dict[str, Any]]]:
        """Queued events, with progress thinned per job (the latest is held, not lost)."""
        taken: list[tuple[str, dict[str, Any]]] = []
        try:
            item = self._outbound.get(timeout=timeout)
        except queue.Empty:
            return taken
        while True:
            type_, data = item
            if type_ in self.PROGRESS_TYPES:
                self._held_progress[(type_, data.get("id"))] = item
            else:
                # A state change goes after the progress it follows, which goes first; a
                # preview held back is stale by then (the job's image would come before it).
                job_id = data.get("id")
                self._held_progress.pop(("job.preview", job_id), None)
                held = self._held_progress.pop(("job.progress", job_id), None)
                if held is not None:
                    taken.append(held)
                taken.append(item)
            try:
                item = self._outbound.get_nowait()
            except queue.Empty:
                return taken

    def _due_progress(self, *, flush: bool) -> list[tuple[str, dict[str, Any]]]:
        now = time.monotonic()
        due = []
        for key, item in list(self._held_progress.items()):
            if flush or now - self._last_progress.get(key, 0.0) >= PROGRESS_INTERVAL:
                due.append(item)
                self._last_progress[key] = now
                del self._held_progress[key]
        if len(self._last_progress) > 10_000:
            self._last_progress.clear()
        return due

    def _insert(self, conn: Any, items: list[tuple[str, dict[str, Any]]]) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO events (node, type, data) VALUES (%s, %s, %s)",
                    [(self.node, type_, json.dumps(data)) for type_, data in items],
                )
            conn.execute(f"NOTIFY {CHANNEL}")

    def _trim(self, conn: Any) -> None:
        conn.execute(
            "DELETE FROM events WHERE id < (SELECT COALESCE(MAX(id), 0) FROM events) - %s",
            (KEEP_EVENTS,),
        )

    # -- reading every node's events -----------------------------------------------------
    def _preload(self) -> None:
        """Fill the replay buffers from the log, so a client that reconnects to this node
        (just started, say) replays what it missed on another."""
        conn = self._connect()
        try:
            rows = conn.execute(
                "SELECT id, node, type, data FROM (SELECT * FROM events ORDER BY id DESC"
                " LIMIT %s) recent ORDER BY id",
                (self._state.maxlen + self._progress.maxlen,),
            ).fetchall()
            newest = conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
        finally:
            _close(conn)
        with self._lock:
            self.epoch = rows[0][0] if rows else newest + 1
            for row in rows:
                self._last_id = row[0]
                self._deliver_locked(_event(row))
            self._last_id = max(self._last_id, newest)

    def _read_loop(self) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = self._connect()
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.connected = True
                self._read_new(conn)
                # Wait for a notification; at most a second (the safety net for a missed
                # one). The generator ends after the first notification or the timeout.
                for _ in conn.notifies(timeout=1.0, stop_after=1):
                    pass
            except Exception as exc:
                if self._stop.is_set():
                    break
                if self.connected:
                    log.warning("lost the event log connection (%s); reconnecting", exc)
                self.connected = False
                _close(conn)
                conn = None
                self._stop.wait(1.0)
        _close(conn)

    def _read_new(self, conn: Any) -> None:
        while True:
            rows = conn.execute(
                "SELECT id, node, type, data FROM events WHERE id > %s ORDER BY id LIMIT 1000",
                (self._last_id,),
            ).fetchall()
            for row in rows:
                event = _event(row)
                self.deliver(event)
                if row[1] != self.node and self._on_remote is not None:
                    try:
                        self._on_remote(event)
                    except Exception:
                        log.exception("handling a %s event from node %s failed", row[2], row[1])
            if len(rows) < 1000:
                return


def _event(row: tuple) -> Event:
    event_id, node, type_, data = row
    return Event(event_id, type_, json.loads(data), node=node)


def _close(conn: Any) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):  # closing a broken connection may complain
            conn.close()
