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
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

from .jobs import Job, JobSpec

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
    ``key``, in arrival order) in one transaction and returns their results in the same
    order; :meth:`run` hands each caller the results of its own items.

    ``split(items, results, counts)`` divides the results among the callers where the
    commit may return fewer results than items; by default they are divided by count.
    ``commits`` and ``rounds_shared`` count transactions and those that held more than one
    caller's writes (for tests and for the curious).
    """

    def __init__(
        self,
        commit: Callable[[Hashable, list[T]], list[R]],
        *,
        split: Callable[[list[T], list[R], list[int]], list[list[R]]] | None = None,
        max_items: int = 10_000,
    ) -> None:
        self._commit = commit
        self._split = split or _split_by_count
        self._max_items = max_items
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
        batch = self._take()
        items = [item for entry in batch for item in entry.items]
        self._busy = True
        self._cond.release()
        parts: list[list[R]] = []
        error: BaseException | None = None
        try:
            results = self._commit(batch[0].key, items)
            parts = self._split(items, results, [len(entry.items) for entry in batch])
        except BaseException as exc:  # every caller of the round learns what went wrong
            error = exc
        finally:
            self._cond.acquire()
            self._busy = False
            self.commits += 1
            self.rounds_shared += len(batch) > 1
            for i, entry in enumerate(batch):
                if error is None:
                    entry.result = parts[i]
                else:
                    entry.error = error
                entry.done = True
            self._cond.notify_all()

    def _take(self) -> list[_Entry[T, R]]:
        """The oldest waiting write and every later one with its key (up to ``max_items``)."""
        key = self._pending[0].key
        batch, rest, count = [], [], 0
        for entry in self._pending:
            if entry.key == key and (not batch or count + len(entry.items) <= self._max_items):
                batch.append(entry)
                count += len(entry.items)
            else:
                rest.append(entry)
        self._pending = rest
        return batch


def _split_by_count(items: list[Any], results: list[R], counts: list[int]) -> list[list[R]]:
    if len(results) != len(items):
        raise RuntimeError(f"a group commit of {len(items)} writes returned {len(results)}")
    parts, start = [], 0
    for count in counts:
        parts.append(results[start : start + count])
        start += count
    return parts


_registry: weakref.WeakKeyDictionary[Any, dict[str, GroupCommit]] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def shared(owner: Any, name: str, make: Callable[[], GroupCommit]) -> GroupCommit:
    """The one :class:`GroupCommit` called ``name`` of ``owner`` (made by ``make()`` the
    first time), so that every thread writing through ``owner`` shares it. It lives as long
    as ``owner`` (``make`` must not keep ``owner`` alive)."""
    with _registry_lock:
        groups = _registry.setdefault(owner, {})
        group = groups.get(name)
        if group is None:
            group = groups[name] = make()
        return group


def job_adder(daemon: Any) -> GroupCommit[JobSpec, Job]:
    """The daemon's group commit of new jobs: ``run((source, source_name), specs)``
    queues ``specs`` with every other submit waiting, in one ``store.add_many``. A round's
    jobs share one ``submitted_at``, read when the round is written."""
    ref = weakref.ref(daemon)

    def add(key: Hashable, specs: list[JobSpec]) -> list[Job]:
        owner = ref()
        if owner is None:  # pragma: no cover - the daemon went away mid-call
            raise RuntimeError("the daemon is gone")
        source, source_name = key
        return owner.store.add_many(
            specs, submitted_at=owner.now_iso(), source=source, source_name=source_name
        )

    return shared(daemon, "jobs", lambda: GroupCommit(add, split=_split_by_spec))


def _split_by_spec(specs: list[JobSpec], added: list[Job], counts: list[int]) -> list[list[Job]]:
    """The jobs ``add_many`` returned, to each caller its own: they come in the order of the
    specs, and one the store no longer finds is left out (so a caller gets fewer jobs, as
    it would from its own ``add_many``)."""
    if len(added) == len(specs):
        return _split_by_count(specs, added, counts)
    parts: list[list[Job]] = []
    jobs = iter(added)
    pending = next(jobs, None)
    start = 0
    for count in counts:
        part = []
        for spec in specs[start : start + count]:
            if pending is not None and pending.spec == spec:
                part.append(pending)
                pending = next(jobs, None)
        parts.append(part)
        start += count
    return parts
