"""In-process publish/subscribe for job and config events (feeds the SSE stream).

Publishing never blocks: the worker publishes every denoising step, and a slow browser tab
must not slow the GPU. Each subscriber has a bounded queue; one that falls behind is dropped
(its stream ends and the client reconnects with ``Last-Event-ID``, replaying from the ring
buffer of recent events).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Event:
    id: int
    type: str
    data: dict[str, Any]


class Subscription:
    """An iterator of events; ``get`` returns ``None`` on timeout, raises when dropped."""

    class Dropped(Exception):
        pass

    def __init__(self, bus: EventBus, backlog: list[Event], maxsize: int) -> None:
        self._bus = bus
        self._queue: queue.Queue[Event | None] = queue.Queue(maxsize=maxsize)
        self.backlog = deque(backlog)
        self.dropped = False

    def _offer(self, event: Event) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped = True

    def get(self, timeout: float | None = None) -> Event | None:
        if self.backlog:
            return self.backlog.popleft()
        if self.dropped:
            raise Subscription.Dropped()
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._bus._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    """Numbered events, a replay buffer of the last ``history`` of them, and subscribers."""

    def __init__(self, history: int = 2000, subscriber_queue: int = 1000) -> None:
        self._ids = itertools.count(1)
        self._recent: deque[Event] = deque(maxlen=history)
        self._subscribers: list[Subscription] = []
        self._lock = threading.Lock()
        self._subscriber_queue = subscriber_queue

    def publish(self, type: str, data: dict[str, Any]) -> Event:
        with self._lock:
            event = Event(next(self._ids), type, data)
            self._recent.append(event)
            subscribers = list(self._subscribers)
        for sub in subscribers:
            sub._offer(event)
        return event

    def subscribe(self, last_event_id: int | None = None) -> Subscription:
        """Subscribe; with ``last_event_id`` the events after it still in the buffer come
        first, so a reconnecting client misses nothing recent."""
        with self._lock:
            backlog = []
            if last_event_id is not None:
                backlog = [e for e in self._recent if e.id > last_event_id]
            sub = Subscription(self, backlog, self._subscriber_queue)
            self._subscribers.append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subscribers)
