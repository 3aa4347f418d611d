"""This daemon as one node of a queue: heartbeats, leases, interrupts from other nodes, and
the jobs of nodes that died.

Every node of a shared queue runs one :class:`NodeService` thread. Each tick it reads which
of its jobs another node asked to interrupt; every third of a lease it renews the leases of
the jobs its workers hold and records a heartbeat with what ``/api/health`` shows of it; and
it puts back the jobs whose lease ran out because their node stopped renewing (kill -9, power,
a network cut). A daemon alone on its SQLite file runs none: nobody else could take its
jobs, and its start-up recovery puts back what a crash left running.

A node that loses the database keeps its GPU busy but cannot renew: once its leases run out
another node runs those jobs, and the store refuses the late results
(:class:`~imagineerd.store.Fenced`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import ImagineerdError
from .jobs import Job
from .store import Store

log = logging.getLogger(__name__)

#: How often interrupts from other nodes are looked for (the issue: "within a second").
TICK_SECONDS = 0.5


class NodeService(threading.Thread):
    """Keeps this node's leases and heartbeat, and expires the leases of dead nodes.

    ``info()`` is what the heartbeat records (version, devices, state); ``interrupt(id,
    reason)`` stops a job this node runs; ``expired(jobs)`` announces jobs put back or failed
    because their node's lease ran out.
    """

    def __init__(
        self,
        store: Store,
        *,
        node: str,
        lease_seconds: float,
        info: Callable[[], dict[str, Any]],
        interrupt: Callable[[int, str], None],
        expire: Callable[[], list[Job]],
        expired: Callable[[list[Job]], None],
    ) -> None:
        super().__init__(name="imagineerd-node", daemon=True)
        self.store = store
        self.node = node
        self.lease_seconds = lease_seconds
        self._info = info
        self._interrupt = interrupt
        self._expire = expire
        self._expired = expired
        self._halt = threading.Event()
        #: The nodes as last read (``Store.nodes()``), for health and ETAs.
        self.nodes: list[dict[str, Any]] = []
        #: Whether the last tick reached the database (its outage and return are logged once).
        self.healthy = True

    def stop(self, timeout: float = 5.0) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        # Heartbeats well inside the lease: a third of it leaves two chances to a slow database.
        beat_every = max(min(self.lease_seconds / 3, 10.0), TICK_SECONDS)
        next_beat = next_expiry = 0.0
        while not self._halt.is_set():
            now = time.monotonic()
            try:
                # Every tick, a read: interrupts asked on other nodes arrive within a second.
                for job_id, reason in self.store.interrupts(self.node).items():
                    self._interrupt(job_id, reason)
                if now >= next_beat:
                    self.store.renew_leases(self.node, lease_seconds=self.lease_seconds)
                    self.beat()
                    next_beat = now + beat_every
                if now >= next_expiry:
                    jobs = self._expire()
                    if jobs:
                        self._expired(jobs)
                    next_expiry = now + max(self.lease_seconds / 4, 1.0)
                if not self.healthy:
                    log.warning("the job database is reachable again")
                self.healthy = True
            except ImagineerdError as exc:
                if self.healthy:
                    log.warning("node %s: %s", self.node, exc.message)
                self.healthy = False
            except Exception:  # the heartbeat must outlive anything
                log.exception("node %s: heartbeat failed", self.node)
                self.healthy = False
            self._halt.wait(TICK_SECONDS)

    def beat(self, state: str | None = None) -> None:
        """Record a heartbeat now (``state`` overrides what ``info()`` says: "stopped")."""
        info = self._info()
        if state is not None:
            info["state"] = state
        self.store.heartbeat(self.node, info)
        self.nodes = self.store.nodes()

    def live_nodes(self) -> list[dict[str, Any]]:
        """Nodes heard from within a lease that have not said they stopped."""
        return [
            n
            for n in self.nodes
            if n["age"] <= self.lease_seconds and n["info"].get("state") != "stopped"
        ]
