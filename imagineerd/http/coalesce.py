"""Identical reads that wait together are answered by one computation.

``GET /api/jobs`` reads up to a thousand queued jobs and encodes half a megabyte of JSON;
every browser tab and script polls it. Requests for the same page that arrive while one is
being built wait for the *next* build, which starts after all of them arrived and answers
them all: each answer is still a snapshot taken after its request came in (a job
acknowledged before the request is in it), but ten waiting requests cost one build, and at
most one build per page runs at a time, so the list cannot crowd out the cheap requests
(job status, submits) on the interpreter lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Round(Generic[V]):
    __slots__ = ("started", "done", "value", "error", "waiters")

    def __init__(self) -> None:
        self.started = self.done = False
        self.value: V | None = None
        self.error: BaseException | None = None
        self.waiters = 0


class Coalesced(Generic[K, V]):
    """``get(key)`` returns ``compute(key)`` from a computation that started after the
    call; callers waiting for the same key at once share it. ``computed`` and ``answered``
    count computations and the calls they answered."""

    def __init__(self, compute: Callable[[K], V]) -> None:
        self._compute = compute
        self._cond = threading.Condition(threading.Lock())
        self._next: dict[K, _Round[V]] = {}  # per key: the round not started yet
        self._running: set[K] = set()
        self.computed = self.answered = 0

    @property
    def waiting(self) -> int:
        """Callers waiting for a round that has not started."""
        with self._cond:
            return sum(round_.waiters for round_ in self._next.values())

    def get(self, key: K) -> V:
        with self._cond:
            round_ = self._next.get(key)
            if round_ is None:
                round_ = self._next[key] = _Round()
            round_.waiters += 1
            while not round_.done:
                if round_.started or key in self._running:
                    self._cond.wait()
                    continue
                # Ours is the next round and none runs for this key: compute it for all.
                round_.started = True
                del self._next[key]
                self._running.add(key)
                self._cond.release()
                try:
                    try:
                        round_.value = self._compute(key)
                    except BaseException as exc:  # each waiter of the round raises it
                        round_.error = exc
                finally:
                    self._cond.acquire()
                    self._running.discard(key)
                    round_.done = True
                    self.computed += 1
                    self.answered += round_.waiters
                    self._cond.notify_all()
        if round_.error is not None:
            raise round_.error
        return round_.value  # type: ignore[return-value]
