from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imagineerd import config as config_mod
from imagineerd.errors import ConfigError, Unavailable
from imagineerd.jobs import CANCELLED, COMPLETED, FAILED, QUEUED, RUNNING, validate
from imagineerd.sqlite_db import SQLiteDatabase
from imagineerd.sqlite_store import SCHEMA_VERSION, SQLiteStore
from imagineerd.store import (
    CLAIMING,
    DELIVERED,
    DONE,
    GAVE_UP,
    PENDING,
    SUBMITTED,
    ClaimSubmission,
    Fenced,
    OutputQuery,
    Store,
)

from .conftest import reset_postgres

T = "2026-01-01T00:00:00.000000"
DATA = Path(__file__).parent / "data"


def spec(prompt: str = "p", **fields):
    return validate({"prompt": prompt, "seed": 1, **fields}, config_mod.DEFAULTS["generation"])


def open_sqlite(request: pytest.FixtureRequest, directory: Path) -> Callable[[], Store]:
    return lambda: SQLiteStore(directory / "jobs.db")


def open_postgres(request: pytest.FixtureRequest, directory: Path) -> Callable[[], Store]:
    from imagineerd.pg_store import PostgresStore

    url = request.getfixturevalue("postgres_url")  # one database per session, emptied here
    reset_postgres(url)
    return lambda: PostgresStore(url)


#: Every store implementation runs the whole contract below. Each entry is called once per
#: test with a fresh place for its data and returns an opener; calling the opener again opens
#: a second store object on the same data (as a second worker process, another node, or the
#: same daemon after a restart, would).
STORES = {"sqlite": open_sqlite, "postgres": open_postgres}
#: Marks of the stores that need a server.
STORE_MARKS = {"postgres": [pytest.mark.postgres]}


@pytest.fixture(
    params=[pytest.param(name, marks=STORE_MARKS.get(name, [])) for name in sorted(STORES)]
)
def open_store(request, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    opened: list[Store] = []
    opener = STORES[request.param](request, tmp_path)

    def open_() -> Store:
        store = opener()
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store) -> Store:
    return open_store()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "jobs.db")
    yield s
    s.close()


def test_every_store_implements_the_whole_contract(store: Store):
    assert isinstance(store, Store)


def test_the_contract_suite_exercises_every_store_method():
    """A method added to the Store protocol must get a contract test here (those of the
    gallery index have theirs in test_gallery_index.py, over the same stores)."""
    source = (
        Path(__file__).read_text() + (Path(__file__).parent / "test_gallery_index.py").read_text()
    )
    methods = [
        name for name, value in vars(Store).items() if callable(value) and not name.startswith("_")
    ]
    assert len(methods) >= 20
    untested = [name for name in methods if f"store.{name}(" not in source]
    assert not untested, f"no contract test calls {untested}"


def test_database_is_wal_with_full_sync(sqlite_store: SQLiteStore):
    db = sqlite_store._db()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_fifo_order_and_positions(store: Store):
    jobs = [store.add(spec(f"p{i}"), submitted_at=T) for i in range(5)]
    assert [store.queue_position(j) for j in jobs] == [1, 2, 3, 4, 5]
    first = store.claim_next(started_at=T)
    assert first.id == jobs[0].id and first.status == RUNNING and first.attempts == 1
    assert store.queue_position(first) == 0
    assert [store.queue_position(store.get(j.id)) for j in jobs[1:]] == [1, 2, 3, 4]
    assert [j.id for j in store.queued()] == [j.id for j in jobs[1:]]
    assert store.queued(2)[-1].id == jobs[2].id


def test_positions_of_many_jobs_at_once_are_each_ones_position(store: Store):
    jobs = [store.add(spec(f"p{i}"), submitted_at=T) for i in range(8)]
    running = store.claim_next(started_at=T)
    cancelled = store.cancel_queued(jobs[3].id, completed_at=T)
    others = store.add_many([spec("x"), spec("y")], submitted_at=T)
    now = [store.get(j.id) for j in (*jobs, *others)]
    mixed = [now[5], running, now[9], cancelled, now[1], now[2]]  # any order, any status
    assert store.queue_positions(mixed) == [store.queue_position(j) for j in mixed]
    assert store.queue_positions(mixed) == [4, 0, 8, -1, 1, 2]
    assert store.queue_positions(now[8:]) == [7, 8]  # a burst just queued, at the tail
    assert store.queue_positions([]) == []


def test_transitions_are_guarded_by_status(store: Store):
    a = store.add(spec("a"), submitted_at=T)
    b = store.add(spec("b"), submitted_at=T)
    assert store.cancel_queued(b.id, completed_at=T).status == CANCELLED
    assert store.cancel_queued(b.id, completed_at=T) is None  # already cancelled
    with pytest.raises(RuntimeError):
        store.finish(a.id, COMPLETED, completed_at=T)  # not running yet
    store.claim_next(started_at=T)
    assert store.cancel_queued(a.id, completed_at=T) is None  # running: not cancellable
    done = store.finish(
        a.id,
        COMPLETED,
        completed_at=T,
        duration_seconds=1.5,
        output_path="outputs/x.png",
        progress=(2, 2),
    )
    assert (done.status, done.output_path, done.progress_step) == (COMPLETED, "outputs/x.png", 2)
    with pytest.raises(RuntimeError):
        store.finish(a.id, FAILED, completed_at=T)  # finished is final
    assert store.claim_next(started_at=T) is None
    assert store.counts() == {QUEUED: 0, RUNNING: 0, COMPLETED: 1, FAILED: 0, CANCELLED: 1}


def test_jobs_added_together_are_queued_in_order_in_one_transaction(store: Store):
    first = store.add(spec("before"), submitted_at=T)
    together = store.add_many([spec("a"), spec("b"), spec("c")], submitted_at=T, source="a1111")
    assert [j.spec.prompt for j in together] == ["a", "b", "c"]
    assert [j.id for j in store.queued()] == [first.id] + [j.id for j in together]
    assert {j.source for j in together} == {"a1111"}
    assert store.add_many([], submitted_at=T) == []


def test_a_finished_job_owes_its_webhook_deliveries_in_the_same_transaction(store: Store):
    done = store.add(spec("done"), submitted_at=T)
    gone = store.add(spec("cancelled"), submitted_at=T)
    store.claim_next(started_at=T)
    store.finish(done.id, COMPLETED, completed_at=T, webhooks=["http://a/", "http://b/"])
    store.cancel_queued(gone.id, completed_at=T, webhooks=["http://a/"])
    owed = store.deliveries(10)
    assert [(d.job_id, d.event, d.url) for d in reversed(owed)] == [
        (done.id, "job.completed", "http://a/"),
        (done.id, "job.completed", "http://b/"),
        (gone.id, "job.cancelled", "http://a/"),
    ]
    assert {d.state for d in owed} == {PENDING}
    first, second, third = store.deliveries_due(owed[0].created_at + 1, 10)
    store.record_delivery(first.id, now=1.0, delivered=True, status=204)
    store.record_delivery(second.id, now=1.0, delivered=False, error="refused", next_at=1e12)
    store.record_delivery(third.id, now=1.0, delivered=False, status=500, next_at=None)
    states = {d.id: d for d in store.deliveries(10)}
    assert (states[first.id].state, states[first.id].delivered_at) == (DELIVERED, 1.0)
    assert (states[second.id].state, states[second.id].attempts) == (PENDING, 1)
    assert states[second.id].last_error == "refused" and states[third.id].state == GAVE_UP
    assert store.deliveries_due(1e9, 10) == []  # the pending one is due only at 1e12
    assert store.delivery_counts() == {PENDING: 1, DELIVERED: 1, GAVE_UP: 1}
    store.record_delivery(first.id, now=2.0, delivered=False, next_at=5.0)  # already delivered
    assert store.deliveries(10)[-1].state == DELIVERED


def test_deliveries_taken_with_a_hold_go_to_one_sender_only(open_store):
    """Two nodes' delivery threads poll at once: each delivery is handed to one of them;
    one not recorded (its sender died) is due again once the hold has passed."""
    first, second = open_store(), open_store()
    jobs = [first.add(spec(f"j{i}"), submitted_at=T) for i in range(6)]
    for job in jobs:
        first.claim_next(started_at=T)
        first.finish(job.id, COMPLETED, completed_at=T, webhooks=["http://a/"])
    now = max(d.created_at for d in first.deliveries(10)) + 1
    taken: list[list] = [[], []]

    def take(index: int, s: Store) -> None:
        taken[index] = s.deliveries_due(now, 4, hold=60)

    threads = [threading.Thread(target=take, args=(i, s)) for i, s in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = [d.id for batch in taken for d in batch]
    assert len(ids) == len(set(ids)) == 6  # each once, none left out
    assert all(d.next_at == now + 60 for batch in taken for d in batch)
    assert first.deliveries_due(now + 30, 10, hold=60) == []  # held
    again = second.deliveries_due(now + 61, 10)  # the hold passed: due again
    assert sorted(d.id for d in again) == sorted(ids)


def test_recovery_owes_the_deliveries_of_the_jobs_it_fails(store: Store):
    job = store.add(spec("keeps dying"), submitted_at=T)
    store.claim_next(started_at=T)
    (failed,) = store.recover(
        max_attempts=1, completed_at=T, webhooks=lambda s: [f"http://hook/{s.prompt}"]
    )
    assert failed.status == FAILED
    (owed,) = store.deliveries(10)
    assert (owed.job_id, owed.event, owed.url) == (job.id, "job.failed", "http://hook/keeps dying")


def test_history_is_newest_first_and_pages_by_id(store: Store):
    ids = []
    for i in range(7):
        job = store.add(spec(f"p{i}"), submitted_at=T)
        store.claim_next(started_at=T)
        store.finish(job.id, COMPLETED, completed_at=T)
        ids.append(job.id)
    page = store.history(3)
    assert [j.id for j in page] == ids[::-1][:3]
    assert [j.id for j in store.history(3, before=page[-1].id)] == ids[::-1][3:6]


def test_concurrent_claims_never_take_the_same_job(open_store):
    store = open_store()
    for i in range(60):
        store.add(spec(f"p{i}"), submitted_at=T)
    claimed: list[int] = []
    lock = threading.Lock()

    def claimer() -> None:
        own = open_store()  # a separate store object, as a second worker process has
        while (job := own.claim_next(started_at=T)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == list(range(1, 61))


def test_overview_is_one_snapshot_while_workers_move_jobs(open_store):
    """Every job is in exactly one of running/queued/history, however the workers race."""
    store = open_store()
    total = 300
    for i in range(total):
        store.add(spec(f"p{i}"), submitted_at=T)
    stop = threading.Event()

    def worker() -> None:
        own = open_store()
        while (job := own.claim_next(started_at=T)) is not None:
            own.finish(job.id, COMPLETED, completed_at=T)
        stop.set()

    thread = threading.Thread(target=worker)
    thread.start()
    looks = 0
    while not stop.is_set():
        running, queued, history = store.overview(
            queued_limit=total, history_limit=total, before=None
        )
        ids = [j.id for j in running + queued + history]
        assert sorted(ids) == list(range(1, total + 1)), "a job was missed or counted twice"
        looks += 1
    thread.join()
    assert looks > 1  # the worker really ran while the store was being read


def test_recovery_puts_running_jobs_back_at_the_head_in_order(open_store):
    store = open_store()
    a, b, c, d = (store.add(spec(p), submitted_at=T) for p in "abcd")
    store.claim_batch(started_at=T, limit=2, key=lambda s: 0)  # a, b run; the process "dies"
    store.close()
    reopened = open_store()
    touched = reopened.recover(max_attempts=3, completed_at=T)
    assert [(j.id, j.status) for j in touched] == [(a.id, QUEUED), (b.id, QUEUED)]
    assert [j.id for j in reopened.queued()] == [a.id, b.id, c.id, d.id]
    assert reopened.get(a.id).attempts == 1


def test_attempt_cap_fails_a_job_that_keeps_killing_the_daemon(store: Store):
    job = store.add(spec("crashy"), submitted_at=T)
    store.add(spec("next"), submitted_at=T)
    for attempt in (1, 2):
        assert store.claim_next(started_at=T).id == job.id
        store.recover(max_attempts=3, completed_at=T)
        assert store.get(job.id).status == QUEUED and store.get(job.id).attempts == attempt
    assert store.claim_next(started_at=T).id == job.id
    store.recover(max_attempts=3, completed_at=T)
    failed = store.get(job.id)
    assert failed.status == FAILED and "3 times" in failed.error
    assert store.claim_next(started_at=T).spec.prompt == "next"


def test_requeue_on_clean_shutdown_does_not_count_an_attempt(store: Store):
    store.add(spec("a"), submitted_at=T)
    b = store.add(spec("b"), submitted_at=T)
    running = store.claim_next(started_at=T)
    store.claim_next(started_at=T)  # b running too (two workers)
    (back,) = store.requeue([running.id], count_attempt=False)
    assert back.status == QUEUED and back.attempts == 0 and back.started_at is None
    (crashed,) = store.requeue([b.id], count_attempt=True)
    assert crashed.attempts == 1
    assert [j.id for j in store.queued()] == [b.id, running.id]  # each went to the head


def test_a_requeued_batch_keeps_its_queue_order_ahead_of_the_rest(store: Store):
    jobs = [store.add(spec(f"p{i}"), submitted_at=T) for i in range(6)]
    batch = store.claim_batch(started_at=T, limit=4, key=lambda s: 0)
    assert [j.id for j in batch] == [j.id for j in jobs[:4]]
    store.finish(batch[1].id, COMPLETED, completed_at=T)  # one finished meanwhile
    back = store.requeue([j.id for j in batch], count_attempt=False)
    assert [j.id for j in back] == [batch[0].id, batch[1].id, batch[2].id, batch[3].id]
    assert back[1].status == COMPLETED  # left alone: it was no longer running
    expected = [jobs[0].id, jobs[2].id, jobs[3].id, jobs[4].id, jobs[5].id]
    assert [j.id for j in store.queued()] == expected


def test_a_queued_job_moves_to_the_top_by_one_or_to_a_place(store: Store):
    jobs = [store.add(spec(f"p{i}"), submitted_at=T) for i in range(5)]
    a, b, c, d, e = (j.id for j in jobs)

    def order() -> list[int]:
        return [j.id for j in store.queued()]

    moved = store.move(d, "top")
    assert (moved.job_id, moved.old, moved.new, moved.order) == (d, 4, 1, [d, a, b, c])
    assert order() == [d, a, b, c, e]
    assert store.queue_position(store.get(d)) == 1
    assert store.queue_position(store.get(c)) == 4
    moved = store.move(a, "down")
    assert (moved.old, moved.new, moved.order) == (2, 3, [b, a])
    assert order() == [d, b, a, c, e]
    moved = store.move(a, "up")
    assert (moved.old, moved.new, moved.order) == (3, 2, [a, b])
    assert order() == [d, a, b, c, e]
    moved = store.move(d, 4)
    assert (moved.old, moved.new, moved.order) == (1, 4, [a, b, c, d])
    assert order() == [a, b, c, d, e]
    moved = store.move(e, 2)
    assert (moved.old, moved.new, moved.order) == (5, 2, [e, b, c, d])
    assert order() == [a, e, b, c, d]
    # Where it is already, or past either end: nothing changes.
    for job_id, to, place in ((a, "top", 1), (a, "up", 1), (d, "down", 5), (d, 99, 5), (b, 3, 3)):
        moved = store.move(job_id, to)
        assert moved.old == moved.new == place and moved.order == [job_id]
    assert order() == [a, e, b, c, d]
    # Claims, positions and put-backs keep to the new order.
    assert [store.queue_position(j) for j in store.queued()] == [1, 2, 3, 4, 5]
    assert store.queue_positions(store.queued()) == [1, 2, 3, 4, 5]
    first = store.claim_next(started_at=T)
    assert first.id == a
    store.move(d, "top")
    (back,) = store.requeue([a], count_attempt=False)
    assert order() == [a, d, e, b, c]
    store.add(spec("f"), submitted_at=T)
    assert order()[:5] == [a, d, e, b, c]


def test_only_a_queued_job_moves_and_only_to_a_real_place(store: Store):
    a = store.add(spec("a"), submitted_at=T)
    b = store.add(spec("b"), submitted_at=T)
    assert store.move(999, "top") is None
    running = store.claim_next(started_at=T)
    assert running.id == a.id and store.move(a.id, "down") is None
    store.finish(a.id, COMPLETED, completed_at=T)
    assert store.move(a.id, 1) is None
    for bad in ("bottom", 0, -1, 1.5, True, None, "1"):
        with pytest.raises(ValueError):
            store.move(b.id, bad)
    assert store.get(b.id).status == QUEUED and store.queue_position(store.get(b.id)) == 1


def test_moves_from_two_store_objects_at_once_keep_every_job_once(open_store):
    one, two = open_store(), open_store()
    jobs = [one.add(spec(f"p{i}"), submitted_at=T) for i in range(12)]
    errors: list[BaseException] = []

    def mover(store: Store, offset: int) -> None:
        try:
            for i in range(30):
                job = jobs[(i * 5 + offset) % len(jobs)]
                store.move(job.id, ("top", "up", "down", 1 + (i % 12))[i % 4])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=mover, args=(s, k)) for k, s in enumerate((one, two))]
    for thread in threads:
        thread.start()
    claimed = [one.claim_next(started_at=T) for _ in range(3)]
    for thread in threads:
        thread.join()
    assert not errors
    queued = one.queued()
    assert sorted(j.id for j in queued + claimed) == sorted(j.id for j in jobs)
    assert [one.queue_position(j) for j in queued] == list(range(1, len(queued) + 1))


def test_claim_batch_takes_the_head_and_compatible_jobs_up_to_the_limit(store: Store):
    sizes = [64, 128, 64, 64, 128, 64]
    jobs = [store.add(spec(f"p{i}", width=w), submitted_at=T) for i, w in enumerate(sizes)]
    batch = store.claim_batch(
        started_at=T, limit=lambda head: 3 if head.width == 64 else 1, key=lambda s: s.width
    )
    assert [j.id for j in batch] == [jobs[0].id, jobs[2].id, jobs[3].id]
    assert all(j.status == RUNNING and j.attempts == 1 for j in batch)
    (head,) = store.claim_batch(started_at=T, limit=lambda head: 1, key=lambda s: s.width)
    assert head.id == jobs[1].id  # FIFO: the head always comes first
    assert [j.id for j in store.running()] == [jobs[i].id for i in (0, 1, 2, 3)]


def test_claims_record_an_inbox_file_once_and_queue_its_jobs_once(store: Store):
    claim = store.create_claim("a.txt", "/inbox/.claimed/x-a.txt", created_at=T)
    assert store.get_claim(claim)["state"] == CLAIMING
    assert [c["id"] for c in store.open_claims()] == [claim]
    specs = [spec("one"), spec("two")]
    queued = store.submit_claim(claim, specs, submitted_at=T, source="inbox", source_name="a.txt")
    again = store.submit_claim(claim, specs, submitted_at=T, source="inbox", source_name="a.txt")
    assert [j.id for j in again] == [j.id for j in queued] and len(queued) == 2  # never twice
    assert [j.spec.prompt for j in store.claim_jobs(claim)] == ["one", "two"]
    assert all(j.claim_id == claim and j.source == "inbox" for j in queued)
    store.delete_claim(claim)  # only a claim still `claiming` can be deleted
    assert store.get_claim(claim)["state"] == SUBMITTED
    store.update_claim(claim, DONE, final_path="/inbox/done/a.txt", note_path="/n")
    assert store.get_claim(claim)["final_path"] == "/inbox/done/a.txt"
    assert store.open_claims() == []
    gone = store.create_claim("b.txt", "/inbox/.claimed/y-b.txt", created_at=T)
    store.delete_claim(gone)
    assert store.get_claim(gone) is None


def test_a_claim_gives_its_node_a_token_per_job_and_a_lease(store: Store):
    a, b, c = (store.add(spec(p), submitted_at=T) for p in "abc")
    batch = store.claim_batch(started_at=T, limit=2, key=lambda s: 0, node="gpu-1")
    assert [j.id for j in batch] == [a.id, b.id]
    assert {j.node for j in batch} == {"gpu-1"} and all(j.token for j in batch)
    assert batch[0].token != batch[1].token
    other = store.claim_next(started_at=T, node="gpu-2", lease_seconds=60)
    assert (other.id, other.node) == (c.id, "gpu-2")
    assert store.holds(a.id, batch[0].token) and not store.holds(a.id, batch[1].token)
    assert [j.id for j in store.running(node="gpu-1")] == [a.id, b.id]
    assert [j.id for j in store.running(node="gpu-2")] == [c.id]
    assert store.running(node="gpu-3") == [] and len(store.running()) == 3
    d = store.add(spec("d"), submitted_at=T)
    store.claim_next(started_at=T)  # of no node: counted as every node's own
    assert [j.id for j in store.running(node="gpu-2")] == [c.id, d.id]
    done = store.finish(a.id, COMPLETED, completed_at=T, token=batch[0].token)
    assert (done.status, done.node) == (COMPLETED, "gpu-1")  # who ran it stays on record
    assert not store.holds(a.id, batch[0].token)  # finished: nobody holds it
    with pytest.raises(RuntimeError) as twice:  # the first finish stands, as without tokens
        store.finish(a.id, FAILED, completed_at=T, token=batch[0].token)
    assert not isinstance(twice.value, Fenced)
    (back,) = store.requeue([b.id], count_attempt=False)
    assert back.token is None and not store.holds(b.id, batch[1].token)


def test_a_claim_of_no_node_has_no_lease_and_any_start_up_recovers_it(open_store):
    store, other = open_store(), open_store()
    job = store.add(spec("one-off"), submitted_at=T)
    claimed = store.claim_next(started_at=T, lease_seconds=-1)  # as `imagineerd generate`
    assert claimed.node is None and claimed.token and store.holds(job.id, claimed.token)
    assert [j.id for j in store.running(node="gpu-1")] == [job.id]  # every node's to recover
    assert other.expire_leases(max_attempts=3, completed_at=T) == []  # no lease to run out
    other.renew_leases("", lease_seconds=60)
    assert other.interrupts("") == {}
    (back,) = other.recover(max_attempts=3, completed_at=T, node="gpu-1")
    assert (back.id, back.status) == (job.id, QUEUED)


def test_renewed_leases_hold_and_run_out_ones_go_back_to_the_head(open_store):
    store, other_node = open_store(), open_store()
    a, b, c = (store.add(spec(p), submitted_at=T) for p in "abc")
    lost = store.claim_next(started_at=T, node="dead", lease_seconds=-1)  # ran out already
    kept = store.claim_next(started_at=T, node="alive", lease_seconds=-1)
    store.renew_leases("alive", lease_seconds=60)  # just in time
    (expired,) = other_node.expire_leases(max_attempts=3, completed_at=T)
    assert (expired.id, expired.status, expired.attempts) == (lost.id, QUEUED, 1)
    assert expired.token is None and not other_node.holds(a.id, lost.token)
    assert [j.id for j in store.queued()] == [a.id, c.id]  # at the head, in order
    assert store.get(kept.id).status == RUNNING and store.holds(kept.id, kept.token)
    assert other_node.expire_leases(max_attempts=3, completed_at=T) == []
    store.renew_leases("nobody", lease_seconds=60)  # renews no job of another node
    assert kept.id == b.id and store.holds(kept.id, kept.token)
    # A claim's own lease, never renewed, holds for its length too.
    fresh = store.claim_next(started_at=T, node="new", lease_seconds=60)
    assert fresh.id == a.id and other_node.expire_leases(max_attempts=3, completed_at=T) == []
    assert store.get(fresh.id).status == RUNNING


def test_a_late_result_from_a_node_whose_lease_ran_out_is_fenced(open_store):
    slow, other = open_store(), open_store()
    job = slow.add(spec("a"), submitted_at=T)
    claim = slow.claim_next(started_at=T, node="slow", lease_seconds=-1)
    other.expire_leases(max_attempts=3, completed_at=T)
    with pytest.raises(Fenced):  # back in the queue: the slow node's result is dropped
        slow.finish(job.id, COMPLETED, completed_at=T, output_path="late.png", token=claim.token)
    untouched = other.get(job.id)
    assert (untouched.status, untouched.output_path, untouched.token) == (QUEUED, None, None)
    again = other.claim_next(started_at=T, node="other", lease_seconds=60)
    assert again.id == job.id and again.attempts == 2 and again.token != claim.token
    with pytest.raises(Fenced, match="no longer held"):  # and so while another node runs it
        slow.finish(job.id, FAILED, completed_at=T, error="late", token=claim.token)
    assert not slow.holds(job.id, claim.token) and slow.holds(job.id, again.token)
    assert other.get(job.id).status == RUNNING
    done = other.finish(job.id, COMPLETED, completed_at=T, output_path="x.png", token=again.token)
    assert (done.status, done.output_path) == (COMPLETED, "x.png")
    assert issubclass(Fenced, RuntimeError)  # callers that catch RuntimeError keep working


def test_a_lease_that_keeps_running_out_fails_the_job_with_its_deliveries(store: Store):
    job = store.add(spec("unlucky"), submitted_at=T)
    store.add(spec("next"), submitted_at=T)
    for _ in range(2):
        assert store.claim_next(started_at=T, node="n", lease_seconds=-1).id == job.id
        touched = store.expire_leases(
            max_attempts=2, completed_at=T, webhooks=lambda s: [f"http://hook/{s.prompt}"]
        )
    (failed,) = touched
    assert failed.status == FAILED and "2 times" in failed.error and "lease" in failed.error
    assert failed.token is None and not store.holds(job.id, "anything")
    (owed,) = store.deliveries(10)
    assert (owed.job_id, owed.event, owed.url) == (job.id, "job.failed", "http://hook/unlucky")
    assert store.claim_next(started_at=T).spec.prompt == "next"


def test_an_interrupt_asked_through_one_store_reaches_the_node_that_runs_it(open_store):
    node, store = open_store(), open_store()  # the node, and the API of another
    job = node.add(spec("long"), submitted_at=T)
    waiting = node.add(spec("waiting"), submitted_at=T)
    node.claim_next(started_at=T, node="gpu", lease_seconds=60)
    assert node.interrupts("gpu") == {}
    assert store.request_interrupt(job.id, "cancelled by the user")
    assert store.request_interrupt(job.id, "another reason")  # still running: accepted
    assert node.interrupts("gpu") == {job.id: "cancelled by the user"}
    node.renew_leases("gpu", lease_seconds=60)  # renewing keeps the request
    assert node.interrupts("gpu") == {job.id: "cancelled by the user"}
    assert node.interrupts("other") == {}
    assert not store.request_interrupt(waiting.id, "x")  # not running: nothing to stop
    assert not store.request_interrupt(10**6, "x")
    node.requeue([job.id], count_attempt=False)  # a put back job forgets the request
    node.claim_next(started_at=T, node="gpu", lease_seconds=60)
    assert node.interrupts("gpu") == {}


def test_nodes_are_known_by_their_heartbeats_on_the_stores_clock(open_store):
    store, two = open_store(), open_store()
    assert store.nodes() == []
    store.heartbeat("gpu-b", {"version": "1", "devices": ["cuda:0"]})
    two.heartbeat("gpu-a", {"version": "1", "devices": []})
    first = {n["name"]: n for n in two.nodes()}
    assert list(first) == ["gpu-a", "gpu-b"]  # by name
    assert first["gpu-b"]["info"] == {"version": "1", "devices": ["cuda:0"]}
    assert 0 <= first["gpu-b"]["age"] < 60
    assert first["gpu-b"]["started_at"] <= first["gpu-b"]["heartbeat_at"]
    store.heartbeat("gpu-b", {"version": "2", "state": "busy"})
    later = {n["name"]: n for n in store.nodes()}["gpu-b"]
    assert later["info"] == {"version": "2", "state": "busy"}
    assert later["heartbeat_at"] >= first["gpu-b"]["heartbeat_at"]
    assert later["started_at"] == first["gpu-b"]["started_at"]


def test_settings_are_shared_by_every_node(open_store):
    store, two = open_store(), open_store()
    assert store.get_setting("generation") is None
    store.put_setting("generation", {"steps": 20, "scheduler": "euler_a"})
    assert two.get_setting("generation") == {"steps": 20, "scheduler": "euler_a"}
    two.put_setting("generation", {"steps": 12})  # replaced whole
    two.put_setting("note", ["a", 1, None, 2.5])
    assert store.get_setting("generation") == {"steps": 12}
    assert store.get_setting("note") == ["a", 1, None, 2.5]


def test_recovery_of_a_node_leaves_the_jobs_of_other_nodes_to_their_leases(open_store):
    store = open_store()
    a, b, c = (store.add(spec(p), submitted_at=T) for p in "abc")
    store.claim_next(started_at=T, node="restarted", lease_seconds=60)
    other = store.claim_next(started_at=T, node="busy", lease_seconds=60)
    store.close()
    reopened = open_store()
    (back,) = reopened.recover(max_attempts=3, completed_at=T, node="restarted")
    assert (back.id, back.status, back.token) == (a.id, QUEUED, None)
    assert [j.id for j in reopened.running()] == [b.id]
    assert reopened.holds(b.id, other.token)
    assert [j.id for j in reopened.queued()] == [a.id, c.id]


def test_one_open_claim_per_inbox_file_however_many_nodes_race_for_it(open_store):
    stores = [open_store(), open_store()]
    files = [f"drop/{i}.txt" for i in range(20)]
    won: list[tuple[str, int | None]] = []
    start = threading.Barrier(len(stores))
    lock = threading.Lock()

    def node(index: int) -> None:
        start.wait()
        for name in files:
            got = stores[index].create_claim(
                name, f"/inbox/.claimed/{index}-{name}", created_at=T, node=f"n{index}"
            )
            with lock:
                won.append((name, got))

    threads = [threading.Thread(target=node, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in files:
        ids = [got for file, got in won if file == name]
        assert len(ids) == 2 and sum(got is not None for got in ids) == 1, (name, ids)
    store = stores[0]
    assert len(store.open_claims()) == len(files)
    (first,) = [got for file, got in won if file == files[0] and got is not None]
    assert store.create_claim(files[0], "/inbox/.claimed/again", created_at=T) is None
    store.update_claim(first, DONE, final_path="/inbox/done/0.txt")  # that file is settled:
    again = store.create_claim(files[0], "/inbox/.claimed/again", created_at=T)  # a new one
    assert again is not None and again != first


def test_a_burst_of_inbox_files_is_claimed_in_one_call(store: Store):
    taken = store.create_claim("b.txt", "/c/1-b.txt", created_at=T, node="other")
    ids = store.create_claims(
        [("a.txt", "/c/2-a.txt"), ("b.txt", "/c/2-b.txt"), ("c.txt", "/c/2-c.txt")],
        created_at=T,
        node="me",
    )
    assert ids[1] is None and None not in (ids[0], ids[2]) and taken not in ids
    assert [store.get_claim(i)["claimed"] for i in (ids[0], ids[2])] == ["/c/2-a.txt", "/c/2-c.txt"]
    assert store.create_claims([("d.txt", "/c/d"), ("d.txt", "/c/d2")], created_at=T)[1] is None
    assert store.create_claims([], created_at=T) == []


def test_a_burst_of_inbox_files_is_queued_in_one_call_each_file_once(store: Store):
    a, b, c = store.create_claims(
        [("a.txt", "/c/a"), ("b.txt", "/c/b"), ("c.txt", "/c/c")], created_at=T
    )
    store.submit_claim(
        b, [spec("b, queued before")], submitted_at=T, source="inbox", source_name="b.txt"
    )
    items = [
        ClaimSubmission(a, [spec("a1"), spec("a2")], "a.txt", "/done/a.txt", "/done/a.result"),
        ClaimSubmission(b, [spec("b again")], "b.txt", "/done/b.txt", "/done/b.result"),
        ClaimSubmission(c, [], "c.txt", "/done/c.txt", "/done/c.result"),
    ]
    queued = store.submit_claims(items, submitted_at=T, source="inbox")
    # Each claim's jobs in the order given: b's from before, none twice, c has none.
    assert [[j.spec.prompt for j in jobs] for jobs in queued] == [
        ["a1", "a2"],
        ["b, queued before"],
        [],
    ]
    assert [j.source_name for j in queued[0]] == ["a.txt", "a.txt"]
    assert {store.get_claim(i)["state"] for i in (a, b, c)} == {SUBMITTED}
    # Where each file goes is recorded with its jobs; a claim submitted before keeps its own.
    assert (store.get_claim(a)["final_path"], store.get_claim(a)["note_path"]) == (
        "/done/a.txt",
        "/done/a.result",
    )
    assert store.get_claim(b)["final_path"] is None
    again = store.submit_claims(items, submitted_at=T, source="inbox")
    assert [[j.id for j in jobs] for jobs in again] == [[j.id for j in jobs] for jobs in queued]
    assert store.submit_claims([], submitted_at=T, source="inbox") == []
    read = store.claims_with_jobs([c, a, 10**9, b])  # in the order asked, unknown ids too
    assert [(cl and cl["id"], [j.id for j in jobs]) for cl, jobs in read] == [
        (c, []),
        (a, [j.id for j in queued[0]]),
        (None, []),
        (b, [j.id for j in queued[1]]),
    ]
    assert read[1][0]["note_path"] == "/done/a.result" and store.claims_with_jobs([]) == []
    store.update_claims([a, c], DONE)
    assert [store.get_claim(i)["state"] for i in (a, b, c)] == [DONE, SUBMITTED, DONE]
    store.update_claims([], DONE)
    assert [cl["id"] for cl in store.open_claims()] == [b]


def test_open_claims_of_a_node_are_its_own_and_those_of_no_node(store: Store):
    mine = store.create_claim("a.txt", "/c/a", created_at=T, node="me")
    theirs = store.create_claim("b.txt", "/c/b", created_at=T, node="them")
    assert store.get_claim(mine)["node"] == "me"
    assert [c["id"] for c in store.open_claims(node="me")] == [mine]
    assert [c["id"] for c in store.open_claims(node="them")] == [theirs]
    assert [c["id"] for c in store.open_claims()] == [mine, theirs]
    store.update_claim(mine, DONE)
    assert store.open_claims(node="me") == []


def test_four_nodes_claiming_at_once_take_every_job_exactly_once(open_store):
    store = open_store()
    total = 200
    store.add_many([spec(f"p{i}", width=64 * (1 + i % 3)) for i in range(total)], submitted_at=T)
    claimed: list[int] = []
    lock = threading.Lock()

    def node(index: int) -> None:
        own = open_store()  # its own store object (connections), as another machine has
        while True:
            if index % 2:
                batch = own.claim_batch(
                    started_at=T, limit=3, key=lambda s: s.width, node=f"n{index}"
                )
            else:
                one = own.claim_next(started_at=T, node=f"n{index}")
                batch = [one] if one else []
            if not batch:
                return
            assert all(j.node == f"n{index}" and j.attempts == 1 for j in batch)
            with lock:
                claimed.extend(j.id for j in batch)

    threads = [threading.Thread(target=node, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == total and sorted(claimed) == list(range(1, total + 1))
    assert store.counts()[RUNNING] == total and store.queued() == []


def test_cancel_history_counts_and_overview_agree(store: Store):
    a, b, c = (store.add(spec(p), submitted_at=T) for p in "abc")
    store.claim_next(started_at=T)
    store.cancel_queued(c.id, completed_at=T)
    running, queued, history = store.overview(queued_limit=10, history_limit=10)
    assert ([j.id for j in running], [j.id for j in queued], [j.id for j in history]) == (
        [a.id],
        [b.id],
        [c.id],
    )
    assert store.counts()[CANCELLED] == 1 and store.counts()[RUNNING] == 1


def test_a_closed_store_refuses_work(open_store):
    store = open_store()
    store.add(spec("a"), submitted_at=T)
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.add(spec("b"), submitted_at=T)


def test_a_commit_that_fails_does_not_wedge_the_connection(sqlite_store: SQLiteStore):
    """A real SQLite COMMIT failure that leaves the transaction open (a deferred foreign key
    check fails only at COMMIT): the next write on the same thread must still work."""
    db = sqlite_store._db()
    db.execute("PRAGMA foreign_keys = ON")
    db.execute(
        "CREATE TABLE notes (job_id INTEGER REFERENCES jobs (id) DEFERRABLE INITIALLY DEFERRED)"
    )
    with pytest.raises(sqlite3.IntegrityError), sqlite_store._write() as tx:
        tx.execute("INSERT INTO notes VALUES (12345)")  # no such job: fails at COMMIT
    assert not db.in_transaction
    job = sqlite_store.add(spec("after"), submitted_at=T)
    assert sqlite_store.get(job.id).spec.prompt == "after"


def test_a_full_state_disk_is_a_clear_retryable_error_and_writes_resume(tmpfs):
    tiny_state = tmpfs("state", "256k")
    store = SQLiteStore(tiny_state / "jobs.db")
    try:
        first = store.add(spec("before"), submitted_at=T)
        filler = tiny_state / "filler"
        with open(filler, "wb", buffering=0) as handle, contextlib.suppress(OSError):
            while True:
                handle.write(b"\0" * 4096)
        with pytest.raises(Unavailable, match="paths.state"):
            for i in range(100):
                store.add(spec("x" * 1900 + str(i)), submitted_at=T)
        filler.unlink()  # space is back: the same connection writes again
        later = store.add(spec("after"), submitted_at=T)
        assert [j.id for j in store.queued()][0] == first.id
        assert store.get(later.id).spec.prompt == "after"
    finally:
        store.close()


def test_recent_durations_prefer_similar_jobs(store: Store):
    for size, duration in ((512, 10.0), (1024, 40.0), (512, 12.0)):
        job = store.add(spec("x", width=size, height=size), submitted_at=T)
        store.claim_next(started_at=T)
        store.finish(job.id, COMPLETED, completed_at=T, duration_seconds=duration)
    assert sorted(store.recent_durations(spec("q", width=512, height=512))) == [10.0, 12.0]
    assert store.recent_durations(spec("q", width=256, height=256))  # scaled from others


def test_hot_queries_use_indexes_not_scans_or_sorts(sqlite_store: SQLiteStore):
    """What keeps the API fast with 100 000 jobs (benchmarks/http_load.py measures it): no
    query the store runs on a request path scans the table or sorts it in a temp b-tree.
    The statements are captured from the store itself, so this follows the code."""
    ran: list[str] = []
    sqlite_store._db().set_trace_callback(ran.append)
    job = sqlite_store.add(spec("a"), submitted_at=T)
    sqlite_store.add(spec("b"), submitted_at=T)
    sqlite_store.claim_batch(started_at=T, limit=4, key=lambda s: s.width)
    sqlite_store.queue_position(sqlite_store.get(job.id))
    sqlite_store.history(50)
    sqlite_store.history(50, before=10)
    sqlite_store.recent_durations(spec("c"))
    sqlite_store.queued(1000)
    sqlite_store.running()
    sqlite_store.running(node="n")
    sqlite_store.holds(job.id, "t")
    sqlite_store.renew_leases("n", lease_seconds=30)
    sqlite_store.interrupts("n")
    sqlite_store.expire_leases(max_attempts=3, completed_at=T)
    sqlite_store.recover(max_attempts=3, completed_at=T, node="n")
    sqlite_store._db().set_trace_callback(None)
    selects = {sql for sql in ran if sql.lstrip().upper().startswith("SELECT")}
    assert len(selects) >= 12
    for sql in selects:
        plan = " | ".join(row[3] for row in sqlite_store._db().execute(f"EXPLAIN QUERY PLAN {sql}"))
        assert "TEMP B-TREE" not in plan, (sql, plan)
        for step in plan.split(" | "):
            assert not (step.startswith("SCAN jobs") and "INDEX" not in step), (sql, plan)


def test_a_database_from_a_newer_version_is_refused_with_advice(tmp_path: Path):
    store = SQLiteStore(tmp_path / "jobs.db")
    job = store.add(spec("kept"), submitted_at=T)
    store._db().execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    store.close()
    with pytest.raises(ConfigError) as info:
        SQLiteStore(tmp_path / "jobs.db")
    assert "schema version 99" in info.value.message and "Upgrade imagineerd" in info.value.message
    raw = sqlite3.connect(tmp_path / "jobs.db")  # and nothing was touched
    assert raw.execute("SELECT value FROM meta").fetchone()[0] == "99"
    assert raw.execute("SELECT COUNT(*) FROM jobs WHERE id = ?", (job.id,)).fetchone()[0] == 1
    raw.close()


def test_a_database_made_by_the_last_release_opens_with_its_jobs(tmp_path: Path):
    """tests/data/release-0.1.0.db was written by the first release (schema 1): a queued, a
    running and a completed job, and an inbox claim."""
    path = tmp_path / "imagineerd.db"
    shutil.copy(DATA / "release-0.1.0.db", path)
    store = SQLiteStore(path)
    try:
        assert store.counts() == {QUEUED: 1, RUNNING: 1, COMPLETED: 1, FAILED: 0, CANCELLED: 0}
        # Its running job has no node: whichever node starts first recovers it.
        (recovered,) = store.recover(max_attempts=3, completed_at=T, node="gpu-1")
        assert recovered.status == QUEUED and recovered.node is None
        assert [j.spec.prompt for j in store.queued()] == ["was running", "was queued"]
        assert store.open_claims() == [] and store.get_claim(1)["state"] == DONE
        # Its specs predate per-job models: they read as the configured model, as they ran.
        spec = store.queued()[0].spec
        assert (spec.model, spec.loras, spec.clip_skip, spec.vae) == ("", (), 1, "default")
    finally:
        store.close()
    raw = sqlite3.connect(path)  # migrated: the first release would now refuse it
    assert raw.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION)
    raw.close()


def test_a_lone_surrogate_the_last_release_stored_reads_back_as_a_replacement(
    sqlite_store: SQLiteStore,
):
    """0.1.0 accepted {"prompt": "\\ud800 ..."} and stored the escape; every answer that
    carried that job was a 500 from then on. It now reads back as U+FFFD."""
    job = sqlite_store.add(spec("placeholder"), submitted_at=T)
    raw = json.dumps({**spec("x").to_dict(), "prompt": "a \ud800 b", "negative_prompt": "\udcff"})
    sqlite_store._db().execute("UPDATE jobs SET spec = ? WHERE id = ?", (raw, job.id))
    stored = sqlite_store.get(job.id)
    assert stored.spec.prompt == "a \ufffd b" and stored.spec.negative_prompt == "\ufffd"
    json.dumps(stored.to_dict(), ensure_ascii=False).encode("utf-8")  # any answer can carry it


#: The tables of schema version 3 (0.2, webhooks), as that release created them.
V3_SCHEMA = """
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, seq INTEGER NOT NULL, status TEXT NOT NULL,
    spec TEXT NOT NULL, source TEXT NOT NULL DEFAULT 'api', source_name TEXT,
    submitted_at TEXT NOT NULL, started_at TEXT, completed_at TEXT, duration_seconds REAL,
    output_path TEXT, error TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    progress_step INTEGER NOT NULL DEFAULT 0, progress_total INTEGER NOT NULL DEFAULT 0,
    claim_id INTEGER REFERENCES claims (id)
);
CREATE INDEX jobs_status_seq ON jobs (status, seq);
CREATE INDEX jobs_status_id ON jobs (status, id);
CREATE INDEX jobs_seq ON jobs (seq);
CREATE INDEX jobs_claim ON jobs (claim_id) WHERE claim_id IS NOT NULL;
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL REFERENCES jobs (id),
    event TEXT NOT NULL, url TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, next_at REAL NOT NULL,
    last_status INTEGER, last_error TEXT, delivered_at REAL
);
CREATE INDEX deliveries_due ON deliveries (state, next_at);
CREATE TABLE claims (
    id INTEGER PRIMARY KEY AUTOINCREMENT, original TEXT NOT NULL, claimed TEXT NOT NULL,
    state TEXT NOT NULL, created_at TEXT NOT NULL, final_path TEXT, note_path TEXT
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '3');
"""


def make_v3_database(path: Path) -> None:
    """A version 3 database with a job of every kind, a delivery and an open inbox claim."""
    raw = sqlite3.connect(path)
    raw.executescript(V3_SCHEMA)
    body = json.dumps(spec("x").to_dict())
    raw.execute(
        "INSERT INTO claims (original, claimed, state, created_at) VALUES"
        " ('a.txt', '/inbox/.claimed/1-a.txt', 'submitted', ?)",
        (T,),
    )
    for seq, status, attempts in ((1, COMPLETED, 1), (2, RUNNING, 1), (3, QUEUED, 0)):
        raw.execute(
            "INSERT INTO jobs (seq, status, spec, submitted_at, attempts, claim_id, output_path)"
            " VALUES (?, ?, ?, ?, ?, 1, ?)",
            (seq, status, body.replace('"x"', f'"{status}"'), T, attempts, f"{status}.png"),
        )
    raw.execute(
        "INSERT INTO deliveries (job_id, event, url, state, created_at, next_at)"
        " VALUES (1, 'job.completed', 'http://hook/', 'pending', 1.0, 1.0)"
    )
    raw.commit()
    raw.close()


def test_a_version_3_database_migrates_keeping_its_jobs_claims_and_deliveries(tmp_path: Path):
    path = tmp_path / "imagineerd.db"
    make_v3_database(path)
    store = SQLiteStore(path)
    try:
        assert store.counts() == {QUEUED: 1, RUNNING: 1, COMPLETED: 1, FAILED: 0, CANCELLED: 0}
        assert [j.output_path for j in store.claim_jobs(1)] == [
            "completed.png",
            "running.png",
            "queued.png",
        ]
        assert store.get(2).node is None and store.get(2).token is None
        assert [(d.job_id, d.url) for d in store.deliveries(10)] == [(1, "http://hook/")]
        (claim,) = store.open_claims(node="gpu-1")  # of no node: every node's to finish
        assert claim["original"] == "a.txt" and claim["node"] is None
        assert store.create_claim("a.txt", "/inbox/.claimed/2-a.txt", created_at=T) is None
        assert store.expire_leases(max_attempts=3, completed_at=T) == []  # no lease: kept
        (back,) = store.recover(max_attempts=3, completed_at=T, node="gpu-1")
        assert [j.spec.prompt for j in store.queued()] == ["running", "queued"]
        claimed = store.claim_next(started_at=T, node="gpu-1", lease_seconds=60)
        assert claimed.id == back.id and claimed.attempts == 2 and claimed.token
        store.heartbeat("gpu-1", {})
        store.put_setting("k", 1)
        assert store.get_setting("k") == 1 and [n["name"] for n in store.nodes()] == ["gpu-1"]
    finally:
        store.close()
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION) == "5"
    indexes = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"claims_open_original", "jobs_running_node", "jobs_running_lease"} <= indexes
    raw.close()
    SQLiteStore(path).close()  # and it opens again as it is


def test_a_version_6_database_is_refused_by_message_and_left_alone(tmp_path: Path):
    path = tmp_path / "imagineerd.db"
    make_v3_database(path)
    raw = sqlite3.connect(path)
    raw.execute("UPDATE meta SET value = '6'")
    raw.commit()
    raw.close()
    with pytest.raises(ConfigError) as info:
        SQLiteStore(path)
    message = info.value.message
    assert "schema version 6" in message and "up to version 5" in message
    assert "Upgrade imagineerd" in message and info.value.field == "paths.state"
    raw = sqlite3.connect(path)
    columns = {row[1] for row in raw.execute("PRAGMA table_info(jobs)")}
    assert "token" not in columns  # not migrated
    raw.close()


def test_the_last_release_database_migrates_to_version_5_keeping_every_job(tmp_path: Path):
    """tests/data/release-7dabdcc-v4.db was written by the last release (7dabdcc, schema 4;
    tests/data/make-release-7dabdcc-v4.py): 3 completed jobs with their deliveries, 2
    failed, 1 cancelled, an inbox file's 2 jobs (one left running, as by a crash), 1 queued,
    a node and settings. Version 5 adds the gallery index and changes no row."""
    path = tmp_path / "imagineerd.db"
    shutil.copy(DATA / "release-7dabdcc-v4.db", path)

    def rows(table: str) -> list[tuple]:
        raw = sqlite3.connect(path)
        try:
            return raw.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
        finally:
            raw.close()

    before = {t: rows(t) for t in ("jobs", "claims", "deliveries", "nodes", "settings")}
    assert rows("meta") == [("schema_version", "4")]
    SQLiteStore(path).close()
    assert {t: rows(t) for t in before} == before  # every row as it was
    assert rows("meta") == [("schema_version", "5")]
    store = SQLiteStore(path)
    try:
        assert store.schema_version() == SCHEMA_VERSION == 5
        assert store.counts() == {QUEUED: 2, RUNNING: 1, COMPLETED: 3, FAILED: 2, CANCELLED: 1}
        done = [j for j in store.history(10) if j.status == COMPLETED]
        assert [j.output_path for j in done] == [
            f"outputs/20260301_100000_a_fox_{i}_{i + 1}.png" for i in (2, 1, 0)
        ]
        assert [(d.job_id, d.state) for d in store.deliveries(10)] == [
            (3, PENDING),
            (2, PENDING),
            (1, PENDING),
        ]
        assert store.get_setting("generation") == {"steps": 20}
        assert [n["name"] for n in store.nodes()] == ["gpu-1"]
        assert store.get_claim(1)["state"] == DONE
        assert [j.spec.prompt for j in store.claim_jobs(1)] == ["from the inbox", "second line"]
        # The running job of the crash goes back to the head, as that release would have.
        (back,) = store.recover(max_attempts=3, completed_at=T, node="gpu-1")
        assert back.id == 7 and back.status == QUEUED
        assert [j.id for j in store.queued()] == [7, 8, 9]
        # The gallery index is there, empty until the daemon's first pass fills it.
        assert store.list_outputs(OutputQuery(), limit=10) == []
    finally:
        store.close()
    indexes = {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master")}
    assert {"outputs", "outputs_listed", "outputs_trashed"} <= indexes


def test_the_last_release_refuses_a_version_5_database_by_its_own_message(tmp_path: Path):
    """What this release writes is refused by the last one (schema 4), unchanged: its check
    is the generic one of SQLiteDatabase, which it opened at version 4."""
    path = tmp_path / "imagineerd.db"
    job = SQLiteStore(path)
    job.add(spec("kept"), submitted_at=T)
    job.close()
    with pytest.raises(ConfigError) as info:
        SQLiteDatabase(path, "", 4, timeout=1.0)
    assert info.value.message == (
        f"the job database {path} has schema version 5, written by a newer imagineerd; this "
        "one understands up to version 4. Upgrade imagineerd, or point paths.state at another "
        "folder"
    )
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT value FROM meta").fetchone()[0] == "5"
    assert raw.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1
    raw.close()


def test_an_older_database_with_two_open_claims_of_one_file_is_refused_plainly(tmp_path: Path):
    path = tmp_path / "imagineerd.db"
    make_v3_database(path)
    raw = sqlite3.connect(path)
    raw.execute(
        "INSERT INTO claims (original, claimed, state, created_at) VALUES"
        " ('a.txt', '/inbox/.claimed/2-a.txt', 'claiming', ?)",
        (T,),
    )
    raw.commit()
    raw.close()
    with pytest.raises(ConfigError, match="unfinished inbox claims of the same file 'a.txt'"):
        SQLiteStore(path)
    raw = sqlite3.connect(path)  # the failed migration changed nothing
    assert raw.execute("SELECT value FROM meta").fetchone()[0] == "3"
    assert "node" not in {row[1] for row in raw.execute("PRAGMA table_info(claims)")}
    raw.close()
