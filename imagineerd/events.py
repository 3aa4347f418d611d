"""In-process publish/subscribe for job and config events (feeds the SSE stream).

Publishing never blocks: the worker publishes every denoising step, and a slow browser tab
must not slow the GPU. Each subscriber has a bounded queue; one that falls behind is dropped
(its stream ends and the client reconnects with ``Last-Event-ID``, replaying from the ring
buffers of recent events, or told to reload everything with a ``reset`` event when what it
missed is no longer held).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Event:
    id: int
    type: str
    data: dict[str, Any]
    #: The node that published it, on a shared queue (None: this process).
    node: str | None = None


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


def _now_us() -> int:
    return time.time_ns() // 1000


class EventBus:
    """Numbered events, replay buffers, and subscribers.

    Ids are unique across restarts: each is at least the current time in microseconds (and
    one more than the last), so a client that reconnects to a restarted daemon with an old
    ``Last-Event-ID`` is never handed a stale number that hides new events. (Microseconds
    since 1970 stay below 2**53, so JavaScript reads them exactly.)

    Progress events come many per second; they are kept in a buffer of their own so they
    can never push a ``job.completed`` out of the replay buffer of state events.
    """

    PROGRESS_TYPES = frozenset({"job.progress", "job.preview"})

    def __init__(
        self, history: int = 2000, progress_history: int = 500, subscriber_queue: int = 1000
    ) -> None:
        self._last_id = 0
        #: Events with an id below this were published by an earlier process (or never).
        self.epoch = _now_us()
        self._state: deque[Event] = deque(maxlen=history)
        self._progress: deque[Event] = deque(maxlen=progress_history)
        self._state_evicted_upto = 0
        self._subscribers: list[Subscription] = []
        self._lock = threading.Lock()
        self._subscriber_queue = subscriber_queue

    def publish(self, type: str, data: dict[str, Any]) -> Event | None:
        """Number and deliver an event; returns it (a shared bus numbers it later: None)."""
        # Numbering and delivery under one lock: two threads publishing at once must not
        # deliver in another order than the ids say (a client would drop the "older" one).
        # Offering never blocks (bounded queues, put_nowait), so holding the lock is cheap.
        with self._lock:
            self._last_id = max(self._last_id + 1, _now_us())
            event = Event(self._last_id, type, data)
            self._deliver_locked(event)
        return event

    def deliver(self, event: Event) -> None:
        """Hand subscribers an event numbered elsewhere (a shared queue's event log), in the
        order of its id; one not newer than the last delivered is dropped (seen already)."""
        with self._lock:
            if event.id <= self._last_id:
                return
            self._last_id = event.id
            self._deliver_locked(event)

    def _deliver_locked(self, event: Event) -> None:
        if event.type in self.PROGRESS_TYPES:
            self._progress.append(event)
        else:
            if len(self._state) == self._state.maxlen:
                self._state_evicted_upto = self._state[0].id
            self._state.append(event)
        for sub in self._subscribers:
            sub._offer(event)

    def subscribe(self, last_event_id: int | None = None) -> Subscription:
        """Subscribe; with ``last_event_id`` the held events after it come first, so a
        reconnecting client misses nothing. When events it missed are no longer held (the
        daemon restarted, or they fell out of the buffer) a ``reset`` event comes first
        instead: the client reloads the whole state from the API."""
        with self._lock:
            backlog: list[Event] = []
            if last_event_id is not None:
                missed = last_event_id < self._state_evicted_upto or not (
                    self.epoch <= last_event_id <= max(self._last_id, self.epoch)
                )
                if missed:
                    reason = (
                        "events after the one you saw are no longer held (the daemon "
                        "restarted or you were away long); reload the state from the API"
                    )
                    # Its id is where the client resumes next time: at or after our epoch.
                    reset_id = max(self._last_id, self.epoch)
                    backlog.append(Event(reset_id, "reset", {"reason": reason}))
                else:
                    backlog = sorted(
                        (e for e in (*self._state, *self._progress) if e.id > last_event_id),
                        key=lambda e: e.id,
                    )
            sub = Subscription(self, backlog, self._subscriber_queue)
            self._subscribers.append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)

    @property
    def position(self) -> int:
        """An id to subscribe from to get only events published after now."""
        with self._lock:
            return max(self.epoch, self._last_id)

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subscribers)
