"""Two daemons in one process on one PostgreSQL queue: the shared event log, shared
generation defaults, health of every node, interrupts across nodes and images another
node wrote. (The same with real processes, kill -9 included, is tests/test_nodes.py.)"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import yaml

from imagineerd import config as config_mod
from imagineerd.daemon import Daemon
from imagineerd.errors import NotFound
from imagineerd.jobs import CANCELLED, COMPLETED, RUNNING
from imagineerd.pg_store import PostgresStore
from imagineerd.shared_events import PROGRESS_INTERVAL, SharedEventBus

from .conftest import reset_postgres, wait_for, write_config


@pytest.fixture
def pg_url(postgres_url: str) -> str:
    reset_postgres(postgres_url)
    return postgres_url


@pytest.fixture
def make_node(tmp_path: Path, tiny_model: Path, pg_url: str) -> Iterator[Callable[..., Daemon]]:
    """``make_node(name, workers=False)``: a started daemon of its own config folder and
    state, sharing the queue, the outputs folder and nothing else."""
    started: list[Daemon] = []

    def make(name: str, *, workers: bool = False, **sections) -> Daemon:
        folder = tmp_path / name
        folder.mkdir()
        config = write_config(
            folder,
            tiny_model,
            paths={"outputs": str(tmp_path / "outputs"), "state": str(folder / "state")},
            queue={"database": pg_url, "node_name": name, "lease_seconds": 3},
            **sections,
        )
        daemon = Daemon(config_mod.load(config))
        daemon.start(workers=workers)
        started.append(daemon)
        return daemon

    yield make
    for daemon in reversed(started):
        daemon.stop()


def test_events_published_on_one_node_reach_every_node_in_one_order(make_node):
    a, b = make_node("a"), make_node("b")
    with a.events.subscribe() as on_a, b.events.subscribe() as on_b:
        for i in range(20):
            (a if i % 2 else b).events.publish("job.submitted", {"id": i})

        def drain(sub) -> list:
            got: list = []
            wait_for(lambda: got.extend(filter(None, [sub.get(timeout=0.1)])) or len(got) >= 20)
            return got

        got_a, got_b = drain(on_a), drain(on_b)
    assert [e.id for e in got_a] == [e.id for e in got_b]  # one numbering for all nodes
    assert sorted(e.data["id"] for e in got_a) == list(range(20))
    assert {e.node for e in got_a} == {"a", "b"}


@pytest.fixture
def connect(pg_url: str) -> Iterator[Callable[[], psycopg.Connection]]:
    """Connections to a queue database whose schema (and event log) is made."""
    store = PostgresStore(pg_url)
    yield store.connect
    store.close()


def test_progress_is_thinned_per_job_keeping_the_last_step(connect):
    """A worker reports every step; the log gets at most one per job per interval, and
    always the last one before the job's next state change."""
    bus = SharedEventBus(connect, node="n")
    bus.start()
    try:
        with bus.subscribe() as sub:
            started = time.monotonic()
            for step in range(1, 201):
                bus.publish("job.progress", {"id": 1, "step": step, "total": 200})
            bus.publish("job.completed", {"id": 1, "status": COMPLETED})
            seen = []
            wait_for(
                lambda: (
                    seen.extend(filter(None, [sub.get(timeout=0.1)]))
                    or (seen and seen[-1].type == "job.completed")
                )
            )
            took = time.monotonic() - started
    finally:
        bus.stop()
    steps = [e.data["step"] for e in seen if e.type == "job.progress"]
    assert steps[-1] == 200 and steps == sorted(steps)
    assert len(steps) <= 2 + took / PROGRESS_INTERVAL  # thinned, not one per step
    assert len(steps) < 200


def test_previews_travel_beside_progress_and_a_stale_one_is_dropped(connect):
    """Previews are thinned like progress but on their own (one never replaces the other's
    last step), and one still held when its job finishes is dropped: it would arrive after
    the image and replace it on screen."""
    bus = SharedEventBus(connect, node="n")
    bus.start()
    try:
        with bus.subscribe() as sub:
            bus.publish("job.progress", {"id": 1, "step": 5, "total": 10})
            bus.publish("job.preview", {"id": 1, "step": 5, "image": "data:a"})
            seen: list = []
            wait_for(lambda: seen.extend(filter(None, [sub.get(timeout=0.1)])) or len(seen) >= 2)
    finally:
        bus.stop()
    assert sorted((e.type, e.data["step"]) for e in seen) == [
        ("job.preview", 5),
        ("job.progress", 5),
    ]
    # What the writer takes from its queue in one go (no thread: the order is exact).
    held = SharedEventBus(connect, node="m")
    for item in (
        ("job.preview", {"id": 1, "step": 9}),
        ("job.progress", {"id": 1, "step": 9}),
        ("job.completed", {"id": 1}),
    ):
        held.publish(*item)
    taken = held._take(timeout=0)
    assert [(t, d.get("step")) for t, d in taken] == [("job.progress", 9), ("job.completed", None)]
    assert not held._held_progress


def test_a_dropped_listener_connection_loses_no_event(connect, pg_url):
    """The reader's connection is killed by the server between events: a NOTIFY may be
    missed, but the log is read by id, so every event still arrives, once, in order."""
    writer, reader = SharedEventBus(connect, node="w"), SharedEventBus(connect, node="r")
    writer.start()
    reader.start()
    try:
        with reader.subscribe() as sub:
            got: list = []
            for i in range(30):
                writer.publish("job.submitted", {"id": i})
                if i % 10 == 5:
                    with psycopg.connect(pg_url, autocommit=True) as admin:
                        admin.execute(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE"
                            " datname = current_database() AND query LIKE 'LISTEN%%'"
                        )
            wait_for(
                lambda: got.extend(filter(None, [sub.get(timeout=0.1)])) or len(got) >= 30,
                timeout=30,
            )
    finally:
        writer.stop()
        reader.stop()
    assert [e.data["id"] for e in got] == list(range(30))


def test_generation_defaults_changed_on_one_node_apply_on_every_node(make_node):
    a, b = make_node("a"), make_node("b")
    assert a.config["generation"]["steps"] == b.config["generation"]["steps"] == 2
    a.update_generation({"steps": 7, "guidance_scale": 5.0})
    wait_for(lambda: b.config["generation"]["steps"] == 7, timeout=10)
    assert b.config["generation"]["guidance_scale"] == 5.0
    assert b.saved_config["generation"]["steps"] == 7  # its config.yaml says so too
    assert b.submit({"prompt": "defaults"}).spec.steps == 7
    c = make_node("c")  # a node started later takes the queue's defaults
    assert c.config["generation"]["steps"] == 7


def test_health_lists_every_node_and_a_job_shows_where_it_ran(make_node, tmp_path):
    a = make_node("a")
    make_node("b", workers=True)
    job = a.submit({"prompt": "on b"})
    done = wait_for(lambda: (j := a.job(job.id)).status == COMPLETED and j, timeout=60)
    assert done.node == "b" and a.job_view(done)["node"] == "b"
    # Each node reads the others at its heartbeat (a third of the lease: 1 s here).
    nodes = wait_for(
        lambda: len(found := {n["name"]: n for n in a.health()["nodes"]}) == 2 and found,
        timeout=10,
    )
    assert set(nodes) == {"a", "b"}
    assert nodes["b"]["state"] == "running" and nodes["b"]["devices"][0]["device"] == "cpu"
    assert nodes["a"]["state"] == "idle"  # no workers
    assert a.output_bytes(done).startswith(b"\x89PNG")  # the outputs folder is shared
    # Where the folder is not shared, the answer names the node that has the image.
    (tmp_path / "outputs" / Path(done.output_path).name).unlink()
    with pytest.raises(NotFound, match="written by node b"):
        a.output_bytes(done)


def test_an_interrupt_sent_to_one_node_stops_the_job_another_runs(make_node):
    a = make_node("a")
    b = make_node("b", workers=True)
    job = a.submit({"prompt": "long", "steps": 150})
    wait_for(lambda: a.job(job.id).status == RUNNING, timeout=60)
    asked = time.monotonic()
    a.interrupt(job.id)
    stopped = wait_for(lambda: (j := a.job(job.id)).finished and j, timeout=30)
    assert stopped.status == CANCELLED and stopped.node == "b"
    assert time.monotonic() - asked < 5  # seen at b's next renewal (every 0.5 s)
    # While a's views followed b's progress events, the job's view had live progress.
    assert b.job(job.id).status == CANCELLED


def test_a_job_submitted_on_one_node_wakes_an_idle_worker_on_another(make_node):
    a = make_node("a")
    b = make_node("b", workers=True)
    time.sleep(1.5)  # b's worker has found the queue empty and waits
    woke = threading.Event()
    real = b.wake

    def wake() -> None:
        woke.set()
        real()

    b.wake = wake
    a.submit({"prompt": "wake up"})
    assert woke.wait(5)


def test_an_input_image_sent_to_one_node_reaches_the_node_that_runs_the_job(make_node):
    """The request (a data URL) goes to node a; node b runs the job: it fetches the input
    from the shared store, keeps it, and the image comes out; inputs no queued or running
    job names are deleted from the shared store once past their grace period."""
    from .test_image_inputs import data_url, noise, png

    a = make_node("a")
    b = make_node("b", workers=True)
    job = a.submit({"prompt": "restyle", "init_image": data_url(png(noise())), "strength": 0.5})
    digest = job.spec.init_image.removeprefix("sha256:")
    assert not (b.inputs.folder / digest).exists()  # only a has it on disk
    done = wait_for(lambda: (j := a.job(job.id)).finished and j, timeout=60)
    assert (done.status, done.node) == (COMPLETED, "b"), done.error
    assert (b.inputs.folder / digest).is_file()  # fetched once, kept for the next use
    assert a.store.get_input(digest) is not None
    assert a.store.collect_inputs([digest], older_than=0) == 0  # still named: kept
    assert a.store.collect_inputs([], older_than=0) == 1
    assert a.store.get_input(digest) is None


@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_the_database_password_never_shows_over_the_api_and_survives_a_round_trip(
    start_api, pg_url, form
):
    """GET /api/config masks a password in the URL's user part or in ``password=``; PUT of
    what GET showed keeps the real URL (trust auth here: the password is not checked)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(pg_url)
    if form == "userinfo":
        url = urlunsplit(parts._replace(netloc=f"{parts.username}:hunter2@{parts.hostname}"))
    else:
        url = f"{pg_url}?password=hunter2"
    api = start_api(workers=False, queue={"database": url, "node_name": "solo"})
    shown = api("GET", "/api/config").json()
    assert "hunter2" not in json.dumps(shown) and "********" in shown["queue"]["database"]
    shown["generation"]["steps"] = 5
    assert api("PUT", "/api/config", json=shown).status_code == 200
    saved = yaml.safe_load(api.daemon.config.path.read_text())
    assert saved["queue"]["database"] == url and saved["generation"]["steps"] == 5


def test_a_pause_on_one_node_holds_every_node_and_a_resume_anywhere_lets_them_go(make_node):
    a, b = make_node("a"), make_node("b", workers=True)
    with a.events.subscribe() as on_a, b.events.subscribe() as on_b:
        a.pause()
        # b's subscribers hear it through the shared event log.
        wait_for(lambda: (e := on_b.get(timeout=0.2)) and e.type == "queue.paused", 10)
        assert b.health()["queue_paused"] and b.list_jobs()["queue_paused"]
        job = a.submit({"prompt": "held", "steps": 2})
        wait_for(lambda: all(w.state()["state"] == "ready" for w in b.workers), 60)
        for _ in range(3):  # b's worker asks the queue each second and after each wake-up
            b.wake()
            time.sleep(1.0)
        assert a.job(job.id).status == "queued"
        b.resume()
        wait_for(lambda: (e := on_a.get(timeout=0.2)) and e.type == "queue.resumed", 10)
    assert not a.queue_paused()
    wait_for(lambda: a.job(job.id).status == COMPLETED, 60)
    assert a.job(job.id).node == "b"


def test_a_move_on_one_node_is_the_order_every_node_claims_in(make_node):
    a, b = make_node("a"), make_node("b")
    jobs = [a.submit({"prompt": f"p{i}", "steps": 2}) for i in range(3)]
    with a.events.subscribe() as on_a:
        moved = b.move(jobs[2].id, "top")
        wait_for(lambda: (e := on_a.get(timeout=0.2)) and e.type == "job.moved", 10)
    assert moved["move"]["order"] == [jobs[2].id, jobs[0].id, jobs[1].id]
    assert [j["id"] for j in a.list_jobs()["queued"]] == moved["move"]["order"]
    (first,) = a.claim_batch(lambda spec: 1, lambda spec: 0)
    assert first.id == jobs[2].id
