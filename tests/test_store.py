from __future__ import annotations

import threading
from pathlib import Path

import pytest

from imagineerd import config as config_mod
from imagineerd.jobs import CANCELLED, COMPLETED, FAILED, QUEUED, RUNNING, validate
from imagineerd.store import SQLiteStore

T = "2026-01-01T00:00:00.000000"


def spec(prompt: str = "p", **fields):
    return validate({"prompt": prompt, "seed": 1, **fields}, config_mod.DEFAULTS["generation"])


@pytest.fixture
def store(tmp_path: Path):
    s = SQLiteStore(tmp_path / "jobs.db")
    yield s
    s.close()


def test_database_is_wal_with_full_sync(store: SQLiteStore):
    db = store._db()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_fifo_order_and_positions(store: SQLiteStore):
    jobs = [store.add(spec(f"p{i}"), submitted_at=T) for i in range(5)]
    assert [store.queue_position(j) for j in jobs] == [1, 2, 3, 4, 5]
    first = store.claim_next(started_at=T)
    assert first.id == jobs[0].id and first.status == RUNNING and first.attempts == 1
    assert store.queue_position(first) == 0
    assert [store.queue_position(store.get(j.id)) for j in jobs[1:]] == [1, 2, 3, 4]
    assert [j.id for j in store.queued()] == [j.id for j in jobs[1:]]
    assert store.queued(2)[-1].id == jobs[2].id


def test_transitions_are_guarded_by_status(store: SQLiteStore):
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


def test_history_is_newest_first_and_pages_by_id(store: SQLiteStore):
    ids = []
    for i in range(7):
        job = store.add(spec(f"p{i}"), submitted_at=T)
        store.claim_next(started_at=T)
        store.finish(job.id, COMPLETED, completed_at=T)
        ids.append(job.id)
    page = store.history(3)
    assert [j.id for j in page] == ids[::-1][:3]
    assert [j.id for j in store.history(3, before=page[-1].id)] == ids[::-1][3:6]


def test_concurrent_claims_never_take_the_same_job(tmp_path: Path):
    path = tmp_path / "jobs.db"
    store = SQLiteStore(path)
    for i in range(60):
        store.add(spec(f"p{i}"), submitted_at=T)
    claimed: list[int] = []
    lock = threading.Lock()

    def claimer() -> None:
        own = SQLiteStore(path)  # a separate store object, as a second worker process has
        while (job := own.claim_next(started_at=T)) is not None:
            with lock:
                claimed.append(job.id)
        own.close()

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == list(range(1, 61))
    store.close()


def test_overview_is_one_snapshot_while_workers_move_jobs(tmp_path: Path):
    """Every job is in exactly one of running/queued/history, however the workers race."""
    path = tmp_path / "jobs.db"
    store = SQLiteStore(path)
    total = 300
    for i in range(total):
        store.add(spec(f"p{i}"), submitted_at=T)
    stop = threading.Event()

    def worker() -> None:
        own = SQLiteStore(path)
        while (job := own.claim_next(started_at=T)) is not None:
            own.finish(job.id, COMPLETED, completed_at=T)
        own.close()
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
    store.close()


def test_recovery_puts_running_jobs_back_at_the_head_in_order(tmp_path: Path):
    path = tmp_path / "jobs.db"
    store = SQLiteStore(path)
    a, b, c = (store.add(spec(p), submitted_at=T) for p in "abc")
    store.claim_next(started_at=T)  # a runs, then the process "dies"
    store.close()
    reopened = SQLiteStore(path)
    touched = reopened.recover(max_attempts=3, completed_at=T)
    assert [(j.id, j.status) for j in touched] == [(a.id, QUEUED)]
    assert [j.id for j in reopened.queued()] == [a.id, b.id, c.id]
    assert reopened.get(a.id).attempts == 1
    reopened.close()


def test_attempt_cap_fails_a_job_that_keeps_killing_the_daemon(store: SQLiteStore):
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


def test_requeue_on_clean_shutdown_does_not_count_an_attempt(store: SQLiteStore):
    store.add(spec("a"), submitted_at=T)
    b = store.add(spec("b"), submitted_at=T)
    running = store.claim_next(started_at=T)
    store.claim_next(started_at=T)  # b running too (two workers)
    back = store.requeue(running.id, count_attempt=False)
    assert back.status == QUEUED and back.attempts == 0 and back.started_at is None
    crashed = store.requeue(b.id, count_attempt=True)
    assert crashed.attempts == 1
    assert [j.id for j in store.queued()] == [b.id, running.id]  # each went to the head


def test_recent_durations_prefer_similar_jobs(store: SQLiteStore):
    for size, duration in ((512, 10.0), (1024, 40.0), (512, 12.0)):
        job = store.add(spec("x", width=size, height=size), submitted_at=T)
        store.claim_next(started_at=T)
        store.finish(job.id, COMPLETED, completed_at=T, duration_seconds=duration)
    assert sorted(store.recent_durations(spec("q", width=512, height=512))) == [10.0, 12.0]
    assert store.recent_durations(spec("q", width=256, height=256))  # scaled from others


def test_hot_queries_use_indexes_not_scans_or_sorts(store: SQLiteStore):
    """What keeps the API fast with 100 000 jobs (benchmarks/http_load.py measures it): no
    query the store runs on a request path scans the table or sorts it in a temp b-tree.
    The statements are captured from the store itself, so this follows the code."""
    ran: list[str] = []
    store._db().set_trace_callback(ran.append)
    job = store.add(spec("a"), submitted_at=T)
    store.add(spec("b"), submitted_at=T)
    store.claim_batch(started_at=T, limit=4, key=lambda s: s.width)
    store.queue_position(store.get(job.id))
    store.history(50)
    store.history(50, before=10)
    store.recent_durations(spec("c"))
    store.queued(1000)
    store.running()
    store._db().set_trace_callback(None)
    selects = {sql for sql in ran if sql.lstrip().upper().startswith("SELECT")}
    assert len(selects) >= 8
    for sql in selects:
        plan = " | ".join(row[3] for row in store._db().execute(f"EXPLAIN QUERY PLAN {sql}"))
        assert "TEMP B-TREE" not in plan, (sql, plan)
        for step in plan.split(" | "):
            assert not (step.startswith("SCAN jobs") and "INDEX" not in step), (sql, plan)
