"""The front door under load: submits that arrive together share one commit, lists asked
for together are built once, and views and event messages are not rebuilt for nothing.
Every test here checks a mechanism (counted calls, what each caller got), never a time."""

from __future__ import annotations

import json
import threading

from imagineerd.daemon import Daemon
from imagineerd.events import Event
from imagineerd.group_commit import GroupCommit
from imagineerd.http.coalesce import Coalesced
from imagineerd.http.streams import Events
from imagineerd.jobs import COMPLETED
from imagineerd.sqlite_store import SQLiteStore
from imagineerd.views import JobViews

from .conftest import Api, wait_for


def run_threads(count: int, target, *args) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, args=(i, *args)) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads


# -- group commit ---------------------------------------------------------------------------
class GatedCommit:
    """A commit whose first call waits for the gate: meanwhile the other callers queue up."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[tuple[object, list[int]]] = []

    def __call__(self, key, items: list[int]) -> list[int]:
        self.calls.append((key, list(items)))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.gate.wait(30)
        return [item * 10 for item in items]


def test_callers_waiting_together_share_one_commit_and_get_their_own_results():
    commit = GatedCommit()
    group = GroupCommit(commit)
    results: dict[int, list[int]] = {}

    def call(i: int) -> None:
        results[i] = group.run("api", [i, i + 100])

    first = run_threads(1, call)
    assert commit.entered.wait(30)  # the first caller commits alone: nobody waited
    rest = [threading.Thread(target=call, args=(i,)) for i in range(1, 8)]
    for thread in rest:
        thread.start()
    wait_for(lambda: group.waiting == 7, 30)
    commit.gate.set()
    for thread in first + rest:
        thread.join(30)
    assert results == {i: [i * 10, (i + 100) * 10] for i in range(8)}
    assert len(commit.calls) == group.commits == 2  # eight callers, two transactions
    assert sorted(commit.calls[1][1]) == sorted(x for i in range(1, 8) for x in (i, i + 100))
    assert group.rounds_shared == 1


def test_a_failed_commit_fails_every_caller_of_its_round_and_the_next_round_goes_on():
    calls = []
    gate = threading.Event()

    def commit(key, items):
        calls.append(list(items))
        if len(calls) == 1:
            assert gate.wait(30)
            return items
        if len(calls) == 2:
            raise OSError("disk full")
        return items

    group = GroupCommit(commit)
    outcome: dict[int, object] = {}

    def call(i: int) -> None:
        try:
            outcome[i] = group.run("k", [i])
        except OSError as exc:
            outcome[i] = exc

    threads = run_threads(1, call)
    wait_for(lambda: calls, 30)
    threads += [threading.Thread(target=call, args=(i,)) for i in (1, 2, 3)]
    for thread in threads[1:]:
        thread.start()
    wait_for(lambda: group.waiting == 3, 30)
    gate.set()
    for thread in threads:
        thread.join(30)
    assert outcome[0] == [0]
    assert all(isinstance(outcome[i], OSError) for i in (1, 2, 3))
    assert group.run("k", [9]) == [9]  # nothing is left stuck


def test_writes_of_another_key_wait_for_their_own_round():
    commit = GatedCommit()
    group = GroupCommit(commit)
    results = {}

    def call(i: int) -> None:
        results[i] = group.run("a" if i % 2 else "b", [i])

    threads = run_threads(1, call)
    assert commit.entered.wait(30)
    threads += [threading.Thread(target=call, args=(i,)) for i in range(1, 7)]
    for thread in threads[1:]:
        thread.start()
    wait_for(lambda: group.waiting == 6, 30)
    commit.gate.set()
    for thread in threads:
        thread.join(30)
    assert results == {i: [i * 10] for i in range(7)}
    assert [key for key, _ in commit.calls] == ["b", "a", "b"]  # the oldest waiting goes first
    assert all(len({i % 2 for i in items}) == 1 for _, items in commit.calls)


def test_concurrent_submits_share_transactions_and_each_is_durable_when_it_returns(
    make_config,
):
    d = Daemon(make_config())
    d.start(workers=False)
    real = d.store.add_many
    gate, calls = threading.Event(), []

    def add_many(specs, **kwargs):
        calls.append(len(specs))
        if len(calls) == 1:
            assert gate.wait(30)
        return real(specs, **kwargs)

    d.store.add_many = add_many
    seen: dict[int, object] = {}
    other = SQLiteStore(d.store.path)  # another connection, as after a kill -9

    def submit(i: int) -> None:
        job = d.submit({"prompt": f"prompt {i}", "seed": i})
        # Acknowledged: it is in the database, for any other reader, before submit returns.
        seen[i] = (job, other.get(job.id))

    try:
        threads = run_threads(1, submit)
        wait_for(lambda: calls, 30)
        threads += [threading.Thread(target=submit, args=(i,)) for i in range(1, 10)]
        for thread in threads[1:]:
            thread.start()
        wait_for(lambda: d._adder.waiting == 9, 30)
        gate.set()
        for thread in threads:
            thread.join(30)
        assert calls == [1, 9]  # ten submits, two transactions
        for i, (job, stored) in seen.items():
            assert job.spec.prompt == f"prompt {i}" and job.spec.seed == i
            assert stored is not None and stored.spec.prompt == f"prompt {i}"
        assert len({job.id for job, _ in seen.values()}) == 10
        assert d.store.counts()["queued"] == 10
    finally:
        other.close()
        d.stop()


# -- coalesced reads ------------------------------------------------------------------------
def test_reads_that_wait_together_share_one_computation_started_after_they_came():
    started = []
    gate = threading.Event()

    def compute(key):
        started.append(key)
        if len(started) == 1:
            assert gate.wait(30)
        return len(started)  # which computation answered

    reads = Coalesced(compute)
    got = {}

    def read(i: int) -> None:
        got[i] = reads.get("page")

    threads = run_threads(1, read)
    wait_for(lambda: started, 30)
    # These come while the first computation runs: it started before them, so it cannot
    # answer them (a job they saw acknowledged might not be in it); the next one does.
    threads += [threading.Thread(target=read, args=(i,)) for i in range(1, 6)]
    for thread in threads[1:]:
        thread.start()
    wait_for(lambda: reads.waiting == 5, 30)
    gate.set()
    for thread in threads:
        thread.join(30)
    assert got == {0: 1, 1: 2, 2: 2, 3: 2, 4: 2, 5: 2}
    assert (reads.computed, reads.answered) == (2, 6)


def test_a_failed_computation_fails_its_waiters_only():
    """The second round fails: the callers that shared it all get its error; the first
    round's caller has its answer, and later callers get a new computation."""
    calls = []
    gate = threading.Event()

    def compute(key):
        calls.append(key)
        if len(calls) == 1:
            assert gate.wait(30)
            return "first"
        if len(calls) == 2:
            raise ValueError("store locked")
        return "third"

    reads = Coalesced(compute)
    got: dict[int, object] = {}

    def read(i: int) -> None:
        try:
            got[i] = reads.get("page")
        except ValueError as exc:
            got[i] = exc

    threads = run_threads(1, read)
    wait_for(lambda: calls, 30)
    threads += [threading.Thread(target=read, args=(i,)) for i in range(1, 4)]
    for thread in threads[1:]:
        thread.start()
    wait_for(lambda: reads.waiting == 3, 30)
    gate.set()
    for thread in threads:
        thread.join(30)
    assert got[0] == "first"
    assert all(isinstance(got[i], ValueError) for i in (1, 2, 3))
    assert reads.get("page") == "third"


def test_job_lists_asked_for_together_are_built_once_and_each_sees_what_came_before_it(
    start_api, monkeypatch
):
    from imagineerd.http import resources

    made: list[Coalesced] = []

    class Recorded(Coalesced):
        def __init__(self, compute) -> None:
            super().__init__(compute)
            made.append(self)

    monkeypatch.setattr(resources, "Coalesced", Recorded)
    api: Api = start_api(workers=False)
    (listings,) = made
    daemon = api.daemon
    real = daemon.list_jobs
    gate, builds = threading.Event(), []

    def list_jobs(**kwargs):
        builds.append(kwargs)
        body = real(**kwargs)
        if len(builds) == 1:  # its snapshot is taken; it is answered only after the gate
            assert gate.wait(30)
        return body

    daemon.list_jobs = list_jobs
    bodies: dict[int, dict] = {}

    def get(i: int) -> None:
        response = api("GET", "/api/jobs", params={"limit": 10})
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("application/json")
        bodies[i] = response.json()

    try:
        threads = run_threads(1, get)
        wait_for(lambda: builds, 30)
        # Submitted while the first list is being built: every later request must see it.
        job = api("POST", "/api/generate", json={"prompt": "acknowledged first"}).json()
        threads += [threading.Thread(target=get, args=(i,)) for i in range(1, 6)]
        for thread in threads[1:]:
            thread.start()
        wait_for(lambda: listings.waiting == 5, 30)
        gate.set()
        for thread in threads:
            thread.join(30)
        assert len(builds) == 2  # six requests, two builds
        assert bodies[0]["queued"] == []
        for i in range(1, 6):
            assert [j["id"] for j in bodies[i]["queued"]] == [job["id"]]
            assert bodies[i] == bodies[1]
        assert set(bodies[1]) == {
            "current",
            "running",
            "queued",
            "history",
            "next_before",
            "queue_paused",
        }
    finally:
        gate.set()
        daemon.list_jobs = real


def test_the_job_list_is_the_json_falcon_would_have_made(start_api):
    api: Api = start_api(workers=False)
    for i in range(3):
        api("POST", "/api/generate", json={"prompt": f"p{i} \u00e9\u65e5"})
    response = api("GET", "/api/jobs", params={"limit": 2})
    body = api.daemon.list_jobs(limit=3)
    body["history"] = body["history"][:2]
    body["next_before"] = None
    assert response.content == json.dumps(body, ensure_ascii=False).encode()


# -- views ----------------------------------------------------------------------------------
class CountingStore:
    """The store, with the calls of some methods counted."""

    def __init__(self, store, names: tuple[str, ...]) -> None:
        self.store = store
        self.calls = {name: 0 for name in names}

    def __getattr__(self, name):
        value = getattr(self.store, name)
        if name in self.calls:
            self.calls[name] += 1
        return value


def test_eta_durations_are_read_once_a_second_and_an_empty_history_is_not_kept(make_config):
    d = Daemon(make_config())
    d.start(workers=False)
    try:
        now = [100.0]
        store = CountingStore(d.store, ("recent_durations",))
        views = JobViews(store, lambda: (1, 1), clock=lambda: now[0])
        job = d.submit({"prompt": "q"})
        assert views.view(job)["estimated_time_remaining"] is None
        assert views.view(job)["estimated_time_remaining"] is None
        assert store.calls["recent_durations"] == 2  # nothing known: asked each time
        done = d.store.claim_next(started_at=d.now_iso())
        d.store.finish(done.id, COMPLETED, completed_at=d.now_iso(), duration_seconds=4.0)
        queued = d.submit({"prompt": "r"})
        assert views.view(queued)["estimated_time_remaining"] == 4.0
        assert views.view(queued)["estimated_time_remaining"] == 4.0
        assert store.calls["recent_durations"] == 3
        now[0] += JobViews.DURATIONS_SECONDS
        views.view(queued)
        assert store.calls["recent_durations"] == 4
        # A job completing through the daemon makes its own views read the durations anew
        # within the second: the next ETA counts the job that just finished.
        last = d.submit({"prompt": "s"})
        assert d.views.view(last)["estimated_time_remaining"] == 8.0  # 2 in the queue x 4 s
        running = d.store.claim_next(started_at=d.now_iso())
        assert running.id == queued.id
        d.job_finished(running, COMPLETED, duration_seconds=8.0)
        assert d.views.view(d.job(last.id))["estimated_time_remaining"] == 6.0  # mean of 4, 8
    finally:
        d.stop()


def test_listed_jobs_are_their_records_as_they_are_now(make_config):
    d = Daemon(make_config())
    d.start(workers=False)
    try:
        jobs = [d.submit({"prompt": f"j{i}"}) for i in range(3)]
        first = d.list_jobs()
        assert first["queued"] == [
            dict(j.to_dict(), queue_position=i + 1) for i, j in enumerate(jobs)
        ]
        first["queued"][0]["prompt"] = "changed by a caller"  # a copy: the next list is not
        running = d.store.claim_next(started_at=d.now_iso())
        d.store.finish(running.id, COMPLETED, completed_at=d.now_iso(), duration_seconds=1.0)
        second = d.list_jobs()
        assert second["queued"] == [
            dict(j.to_dict(), queue_position=i + 1) for i, j in enumerate(jobs[1:])
        ]
        assert second["history"] == [d.job_view(d.job(running.id))]
        assert second["history"][0]["status"] == COMPLETED  # not the cached queued record
    finally:
        d.stop()


# -- event messages -------------------------------------------------------------------------
def test_an_event_is_encoded_once_for_every_stream():
    events = Events(None, None)  # type: ignore[arg-type]  # encoding needs no daemon
    event = Event(7, "job.completed", {"id": 1, "status": "completed"})
    message = events._encode(event)
    assert message == b'id: 7\nevent: job.completed\ndata: {"id":1,"status":"completed"}\n\n'
    assert all(events._encode(event) is message for _ in range(10))  # the same bytes
    reset = Event(7, "reset", {"reason": "r"})  # a reset may share the id of a real event
    assert events._encode(reset) == b'id: 7\nevent: reset\ndata: {"reason":"r"}\n\n'
    assert events._encode(event) == message
    for i in range(Events.ENCODED_EVENTS + 10):
        events._encode(Event(1000 + i, "job.progress", {"id": i}))
    assert len(events._encoded) == Events.ENCODED_EVENTS  # only the latest are kept
