"""The event bus behind /api/events: numbering, replay, reset and ordering."""

from __future__ import annotations

import sys
import threading

from imagineerd.events import EventBus


def drain(sub, limit: int = 100_000) -> list:
    events = []
    while len(events) < limit and (event := sub.get(timeout=0.01)) is not None:
        events.append(event)
    return events


def test_progress_events_never_push_a_completion_out_of_the_replay_buffer():
    bus = EventBus(history=50, progress_history=20)
    first = bus.publish("job.started", {"id": 1})
    done = bus.publish("job.completed", {"id": 1})
    for step in range(5000):  # a long job's progress, many times the buffer sizes
        bus.publish("job.progress", {"id": 2, "step": step})
    with bus.subscribe(first.id) as sub:
        replay = drain(sub)
    assert replay[0] == done
    assert [e.type for e in replay[1:]] == ["job.progress"] * 20
    ids = [e.id for e in replay]
    assert ids == sorted(ids)


def test_ids_keep_growing_across_a_restart_so_an_old_id_hides_nothing():
    before = EventBus()
    old = [before.publish("job.completed", {"id": n}) for n in range(100)]
    after = EventBus()  # the daemon restarted: a new bus
    new = after.publish("job.submitted", {"id": 101})
    assert new.id > old[-1].id
    # A client that saw the last event of the old process is told to reload, not left
    # waiting for ids it will never see again.
    with after.subscribe(old[-1].id) as sub:
        (reset, *rest) = drain(sub)
    assert reset.type == "reset" and "reload" in reset.data["reason"] and rest == []


def test_reset_when_the_asked_event_fell_out_of_the_buffer():
    bus = EventBus(history=10)
    first = bus.publish("job.submitted", {"id": 0})
    for n in range(1, 30):
        bus.publish("job.submitted", {"id": n})
    with bus.subscribe(first.id) as sub:
        assert [e.type for e in drain(sub)] == ["reset"]
    # An id still held replays normally.
    held = bus.publish("job.submitted", {"id": 99})
    with bus.subscribe(held.id - 1) as sub:
        assert drain(sub) == [held]


def test_an_id_from_the_future_is_a_reset_too():
    bus = EventBus()
    last = bus.publish("job.submitted", {"id": 1})
    with bus.subscribe(last.id + 10**9) as sub:
        assert [e.type for e in drain(sub)] == ["reset"]


def test_events_from_many_threads_arrive_in_id_order():
    # Switch threads as often as possible so an unlocked gap between numbering and
    # delivery shows up.
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        received = publish_from_threads()
    finally:
        sys.setswitchinterval(old)
    ids = [e.id for e in received]
    assert len(ids) == 8000 and len(set(ids)) == len(ids)
    assert ids == sorted(ids)


def publish_from_threads() -> list:
    bus = EventBus(subscriber_queue=100_000)
    sub = bus.subscribe()
    start = threading.Barrier(4)

    def publish(n: int) -> None:
        start.wait()
        for i in range(2000):
            bus.publish("job.progress" if i % 2 else "job.started", {"thread": n, "i": i})

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    received = drain(sub)
    sub.close()
    return received


def test_a_reset_before_any_event_still_gives_an_id_to_resume_from():
    bus = EventBus()
    with bus.subscribe(1) as sub:  # an id from long ago; nothing published yet
        (reset,) = drain(sub)
    assert reset.type == "reset" and reset.id >= bus.epoch
    later = bus.publish("job.submitted", {"id": 1})
    with bus.subscribe(reset.id) as sub:  # resuming from the reset replays, no second reset
        assert drain(sub) == [later]
