"""Group commit: writes that arrive together share one transaction.

With ``synchronous=FULL`` every commit is an fsync, and SQLite lets one writer in at a time:
a second writer that finds the database locked sleeps in SQLite's busy handler (1, 2, 5,
10 ... 100 ms), not woken when the lock frees. Fifty clients submitting at once queued up
there, for seconds. Instead, each submitting thread hands its write to a
:class:`GroupCommit` and waits; whichever thread finds no commit under way becomes the
leader, takes every write waiting with the same key and makes them one call (one
transaction, one fsync), then wakes the others with their own results. Writes that come
in meanwhile wait for the next round, led by one of them. There is no thread of its own
and no delay: a lone write is committed at once, as before.

Every caller returns only after the transaction holding its write committed (or raises
what the commit raised: then none of the round's writes were made), so whatever it
acknowledges is durable as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Entry(Generic[T, R]):
    __slots__ = ("key", "items", "result", "error", "done")

    def __init__(self, key: Hashable, items: Sequence[T]) -> None:
        self.key = key
        self.items = items
        self.result: list[R] = []
        self.error: BaseException | None = None
        self.done = False


class GroupCommit(Generic[T, R]):
    """``commit(key, items)`` makes all ``items`` (of every waiting caller with that
    ``key``, in arrival order) in one transaction and returns one result per item, in the
    same order; :meth:`run` hands each caller the results of its own items.

    ``commits`` and ``rounds_shared`` count transactions and those that held more than one
    caller's writes (for tests and for the curious).
    """

    def __init__(self, commit: Callable[[Hashable, list[T]], list[R]]) -> None:
        self._commit = commit
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[_Entry[T, R]] = []
        self._busy = False
        self.commits = 0
        self.rounds_shared = 0

    @property
    def waiting(self) -> int:
        """Callers whose writes wait for a round (not the one being committed)."""
        with self._cond:
            return len(self._pending)

    def run(self, key: Hashable, items: Sequence[T]) -> list[R]:
        """Make ``items`` durable (with others' waiting writes of the same ``key``) and
        return their results; raises what the commit raised."""
        entry: _Entry[T, R] = _Entry(key, items)
        with self._cond:
            self._pending.append(entry)
            while not entry.done:
                if self._busy:
                    self._cond.wait()
                else:
                    self._lead()
        if entry.error is not None:
            raise entry.error
        return entry.result

    def _lead(self) -> None:
        """Commit one round (called with the lock held; releases it while committing)."""
        key = self._pending[0].key
        batch = [entry for entry in self._pending if entry.key == key]
        self._pending = [entry for entry in self._pending if entry.key != key]
        items = [item for entry in batch for item in entry.items]
        self._busy = True
        self._cond.release()
        results: list[R] = []
        error: BaseException | None = None
        try:
            results = self._commit(key, items)
            if len(results) != len(items):
                raise RuntimeError(f"a group commit of {len(items)} writes returned {len(results)}")
        except BaseException as exc:  # every caller of the round learns what went wrong
            error = exc
        finally:
            self._cond.acquire()
            self._busy = False
            self.commits += 1
            self.rounds_shared += len(batch) > 1
            start = 0
            for entry in batch:
                if error is None:
                    entry.result = results[start : start + len(entry.items)]
                    start += len(entry.items)
                else:
                    entry.error = error
                entry.done = True
            self._cond.notify_all()
