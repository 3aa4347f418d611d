"""What only the PostgreSQL store has: a server that can be away, a schema several nodes
create at once, ``open_store`` choosing the store, and the ``imagineerd db`` commands. The
contract both stores keep is tested in test_store.py."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from imagineerd import cli
from imagineerd import config as config_mod
from imagineerd.errors import ConfigError, StoreClosed, Unavailable
from imagineerd.jobs import CANCELLED, COMPLETED, FAILED, QUEUED, RUNNING, validate
from imagineerd.pg_store import NOW, PostgresStore
from imagineerd.sqlite_store import SCHEMA_VERSION, SQLiteStore
from imagineerd.stores import open_store, redact

from .conftest import Relay, reset_postgres, wait_for, with_address, write_config

T = "2026-01-01T00:00:00.000000"
DATA = Path(__file__).parent / "data"


def spec(prompt: str = "p", **fields):
    return validate({"prompt": prompt, "seed": 1, **fields}, config_mod.DEFAULTS["generation"])


@pytest.fixture
def pg_url(postgres_url: str) -> str:
    """The session's database, emptied for this test."""
    reset_postgres(postgres_url)
    return postgres_url


@pytest.fixture
def pg(pg_url: str) -> Iterator[PostgresStore]:
    store = PostgresStore(pg_url)
    yield store
    store.close()


# -- opening ---------------------------------------------------------------------------------
def test_an_unreachable_server_is_a_plain_config_error_within_seconds():
    url = "postgresql://imagineerd:sekrit-pw@127.0.0.1:1/imagineerd"
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        PostgresStore(url, connect_timeout=2)
    assert time.monotonic() - started < 10
    message = info.value.message
    assert message.startswith("cannot reach the job database at 127.0.0.1:1/imagineerd: ")
    assert message.endswith("check queue.database and that PostgreSQL is running")
    assert "sekrit-pw" not in message and "\n" not in message
    assert info.value.field == "queue.database"


def test_nodes_starting_at_once_create_the_schema_once(pg_url: str):
    opened: list[Any] = []
    start = threading.Barrier(6)

    def node() -> None:
        start.wait()
        try:
            opened.append(PostgresStore(pg_url))
        except Exception as exc:  # noqa: BLE001 - the test reports whatever it was
            opened.append(exc)

    threads = [threading.Thread(target=node) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert all(isinstance(s, PostgresStore) for s in opened), opened
        job = opened[0].add(spec("a"), submitted_at=T)
        assert opened[-1].get(job.id).spec.prompt == "a"
        assert {s.schema_version() for s in opened} == {SCHEMA_VERSION}
    finally:
        for s in opened:
            if isinstance(s, PostgresStore):
                s.close()


def test_a_database_of_a_newer_schema_is_refused_by_message_and_left_alone(pg_url: str):
    store = PostgresStore(pg_url)
    job = store.add(spec("kept"), submitted_at=T)
    store.close()
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    with pytest.raises(ConfigError) as info:
        PostgresStore(pg_url)
    message = info.value.message
    assert "schema version 6" in message and f"up to version {SCHEMA_VERSION}" in message
    assert "Upgrade imagineerd" in message and info.value.field == "queue.database"
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT value FROM meta").fetchone()[0] == "6"
        assert db.execute("SELECT COUNT(*) FROM jobs WHERE id = %s", (job.id,)).fetchone()[0]


def test_the_last_release_database_migrates_to_version_5_keeping_every_job(pg_url: str):
    """tests/data/release-7dabdcc-v4-pg.sql is the database the last release (7dabdcc,
    schema 4) wrote (tests/data/make-release-7dabdcc-v4.py): its schema and its rows. This
    release adds the gallery index to it and changes no row."""
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute((DATA / "release-7dabdcc-v4-pg.sql").read_text())

    def rows(table: str) -> list[tuple]:
        with psycopg.connect(pg_url) as db:
            return db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()

    before = {t: rows(t) for t in ("jobs", "claims", "deliveries", "nodes", "settings")}
    assert rows("meta") == [("schema_version", "4")]
    store = PostgresStore(pg_url)
    try:
        assert {t: rows(t) for t in before} == before
        assert store.schema_version() == SCHEMA_VERSION == 5
        assert store.counts() == {QUEUED: 2, RUNNING: 1, COMPLETED: 3, FAILED: 2, CANCELLED: 1}
        assert [j.output_path for j in store.history(10) if j.status == COMPLETED] == [
            f"outputs/20260301_100000_a_fox_{i}_{i + 1}.png" for i in (2, 1, 0)
        ]
        assert len(store.deliveries(10)) == 3 and store.get_setting("generation") == {"steps": 20}
        assert [j.spec.prompt for j in store.claim_jobs(1)] == ["from the inbox", "second line"]
        (back,) = store.recover(max_attempts=3, completed_at=T, node="gpu-1")
        assert back.id == 7 and [j.id for j in store.queued()] == [7, 8, 9]
        # The sequences go on past the old rows, and the gallery index is there, empty.
        assert store.add(spec("new"), submitted_at=T).id == 10
        assert store.output_stats() == {}
    finally:
        store.close()
    with psycopg.connect(pg_url) as db:
        tables = {r[0] for r in db.execute("SELECT tablename FROM pg_tables")}
        assert "outputs" in tables


def test_the_last_release_refuses_a_version_5_database_by_its_own_message(pg_url, monkeypatch):
    """A node of the last release (schema 4) on a database this one upgraded stops with its
    own message: its check is this store's, at version 4."""
    import imagineerd.pg_store as pg_store

    PostgresStore(pg_url).close()
    monkeypatch.setattr(pg_store, "SCHEMA_VERSION", 4)  # what the last release understood
    with pytest.raises(ConfigError) as info:
        PostgresStore(pg_url)
    assert info.value.message == (
        f"the job database {pg_store.where(pg_url)} has schema version 5, written by a newer "
        "imagineerd; this one understands up to version 4. Upgrade imagineerd on this node, "
        "or point queue.database at another database"
    )


# -- a server that goes away ------------------------------------------------------------------
def test_dead_pooled_connections_are_replaced_without_the_caller_noticing(pg_url: str):
    store = PostgresStore(pg_url, min_size=2)
    try:
        job = store.add(spec("a"), submitted_at=T)
        dbname = urlsplit(pg_url).path.lstrip("/")

        def kill_connections() -> None:  # what a server restart does to a pool
            with psycopg.connect(pg_url, autocommit=True) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (dbname,),
                )

        kill_connections()
        assert store.get(job.id).spec.prompt == "a"  # a read
        kill_connections()
        claimed = store.claim_next(started_at=T, node="n")  # a write, before its commit
        assert claimed.id == job.id
        kill_connections()
        store.finish(job.id, COMPLETED, completed_at=T, token=claimed.token)
        assert store.get(job.id).status == COMPLETED
    finally:
        store.close()


def test_losing_the_server_is_unavailable_naming_it_and_work_resumes_after(pg_url: str):
    relay = Relay(pg_url)
    url = with_address(pg_url, "127.0.0.1", relay.port)
    store = PostgresStore(url, timeout=3)
    try:
        job = store.add(spec("before"), submitted_at=T)
        relay.cut()
        for call in (
            lambda: store.add(spec("during"), submitted_at=T),
            lambda: store.get(job.id),
            lambda: store.claim_next(started_at=T, node="n"),
            lambda: store.overview(queued_limit=10, history_limit=10),
        ):
            started = time.monotonic()
            with pytest.raises(Unavailable) as info:
                call()
            # Once a connection has died or could not be made, a call gives up within about
            # a second (not the pool's timeout, kept for when every connection is busy).
            assert time.monotonic() - started < 2.5
            message = info.value.message
            assert f"127.0.0.1:{relay.port}" in message and "try again" in message
            assert "nothing was changed" in message
            assert info.value.status == 503
        relay.restore()
        queued = wait_for(lambda: _or_none(store.queued), timeout=30)
        assert [j.spec.prompt for j in queued] == ["before"]  # "during" was never added
        assert store.claim_next(started_at=T, node="n").id == job.id
    finally:
        store.close()
        relay.close()


def test_a_busy_pool_is_waited_for_not_taken_for_a_lost_server(pg_url: str):
    store = PostgresStore(pg_url, max_size=1, timeout=20)
    try:
        job = store.add(spec("a"), submitted_at=T)
        claimed = store.claim_next(started_at=T, node="n")
        with psycopg.connect(pg_url) as other:  # holds the job's row for a while
            other.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (job.id,))
            finishing = threading.Thread(
                target=store.finish,
                args=(job.id, COMPLETED),
                kwargs={"completed_at": T, "token": claimed.token},
            )
            finishing.start()  # takes the one connection and waits for the row
            threading.Timer(2.5, other.commit).start()
            time.sleep(0.5)
            started = time.monotonic()
            assert store.get(job.id) is not None  # waited for the connection, well past 1 s
            assert time.monotonic() - started > 1.5
            finishing.join()
        assert store.get(job.id).status == COMPLETED
    finally:
        store.close()


def _or_none(read):
    try:
        return read()
    except Unavailable:
        return None


def test_a_closed_store_says_so_and_connect_gives_a_connection_of_its_own(pg: PostgresStore):
    conn = pg.connect()
    try:
        assert conn.autocommit
        conn.execute("LISTEN imagineerd_test")  # what the event relay does with it
        conn.execute("INSERT INTO events (node, type, data) VALUES ('n', 't', '{}')")
        assert conn.execute("SELECT id, node, type, data FROM events").fetchall() == [
            (1, "n", "t", "{}")
        ]
    finally:
        conn.close()
    assert pg.conninfo.startswith("postgresql://")
    pg.close()
    with pytest.raises(StoreClosed):
        pg.get(1)
    with pytest.raises(StoreClosed):
        pg.connect()
    pg.close()  # twice is harmless


def test_hot_queries_of_the_postgres_store_use_indexes(pg: PostgresStore, pg_url: str):
    """With many finished jobs, a claim, the queue and a node's running jobs do not read the
    whole table."""
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute(
            "INSERT INTO jobs (status, spec, submitted_at, completed_at)"
            " SELECT 'completed', '{}', 'T', 'T' FROM generate_series(1, 20000)"
        )
        db.execute("ANALYZE jobs")
    pg.add(spec("a"), submitted_at=T)
    with psycopg.connect(pg_url, autocommit=True) as db:
        for sql in (
            "SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1"
            " FOR UPDATE SKIP LOCKED",
            "SELECT * FROM jobs WHERE status = 'running' AND node = 'n' ORDER BY seq",
            f"SELECT id FROM jobs WHERE status = 'running' AND lease_until < {NOW}",
            "SELECT * FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 100",
        ):
            plan = "\n".join(row[0] for row in db.execute(f"EXPLAIN {sql}"))
            assert "Seq Scan" not in plan, (sql, plan)


# -- choosing the store -------------------------------------------------------------------------
class FakeConfig:
    def __init__(self, base: Path, database: Any) -> None:
        self.base = base
        self.queue = {} if database is None else {"database": database}

    def __getitem__(self, section: str) -> dict:
        return {"queue": self.queue}[section]

    def path_for(self, name: str) -> Path:
        return self.base / name

    def resolve(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else self.base / path


def test_queue_database_chooses_the_store(tmp_path: Path):
    for value in (None, "", "  "):
        store = open_store(FakeConfig(tmp_path, value))
        assert isinstance(store, SQLiteStore) and store.path == tmp_path / "state/imagineerd.db"
        store.close()
    store = open_store(FakeConfig(tmp_path, "sqlite:queue/jobs.db"))
    assert isinstance(store, SQLiteStore) and store.path == tmp_path / "queue/jobs.db"
    store.close()
    for wrong in ("mysql://db/x", "jobs.db", "sqlite:"):
        with pytest.raises(ConfigError) as info:
            open_store(FakeConfig(tmp_path, wrong))
        assert info.value.field == "queue.database" and "postgresql://" in info.value.message
    with pytest.raises(ConfigError) as info:
        open_store(FakeConfig(tmp_path, "mysql://me:hunter2@db/x"))
    assert "hunter2" not in info.value.message


def test_a_postgres_url_opens_the_postgres_store(tmp_path: Path, pg_url: str):
    for url in (pg_url, pg_url.replace("postgresql://", "postgres://", 1)):
        store = open_store(FakeConfig(tmp_path, url))
        try:
            assert isinstance(store, PostgresStore) and store.conninfo == url
        finally:
            store.close()


def test_redact_hides_passwords_only():
    assert redact("postgresql://u:pw@db.lan:5432/q") == "postgresql://u:***@db.lan:5432/q"
    assert redact("postgresql://u@db.lan/q") == "postgresql://u@db.lan/q"
    assert redact("postgres://db/q?sslmode=require&password=pw") == (
        "postgres://db/q?sslmode=require&password=***"
    )
    assert redact("postgresql://u:p%40ss@[::1]:5/q") == "postgresql://u:***@[::1]:5/q"
    assert redact("sqlite:/var/lib/jobs.db") == "sqlite:/var/lib/jobs.db"


# -- imagineerd db ---------------------------------------------------------------------------
def config_for(tmp_path: Path, database: str) -> str:
    return str(write_config(tmp_path, "no-model-needed", queue={"database": database}))


def test_db_upgrade_creates_the_schema_and_prints_its_version(tmp_path, pg_url, capsys):
    assert cli.main(["db", "upgrade", "--config", config_for(tmp_path, pg_url)]) == 0
    out = capsys.readouterr().out
    assert f"schema version {SCHEMA_VERSION}" in out and urlsplit(pg_url).path in out
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION)
    assert cli.main(["db", "upgrade", "--config", config_for(tmp_path, "")]) == 0  # SQLite
    assert (tmp_path / "state" / "imagineerd.db").is_file()


def test_db_upgrade_of_an_unreachable_database_is_one_line_and_exit_1(tmp_path, capsys):
    config = config_for(tmp_path, "postgresql://u:hidden@127.0.0.1:1/q")
    assert cli.main(["db", "upgrade", "--config", config]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("imagineerd: error: cannot reach the job database at 127.0.0.1:1/q")
    assert "\n" not in err and "hidden" not in err


def make_source(path: Path) -> dict[str, Any]:
    """An SQLite job database with a job of every status, a claim, deliveries, settings."""
    store = SQLiteStore(path)
    claim = store.create_claim("a.txt", "/inbox/.claimed/1-a.txt", created_at=T, node="old")
    store.submit_claim(
        claim, [spec("c1"), spec("c2")], submitted_at=T, source="inbox", source_name="a.txt"
    )
    done = store.claim_next(started_at=T, node="old")
    store.finish(
        done.id,
        COMPLETED,
        completed_at=T,
        duration_seconds=2.5,
        output_path="outputs/1.png",
        webhooks=["http://hook/"],
    )
    failed = store.claim_next(started_at=T, node="old")
    store.finish(failed.id, FAILED, completed_at=T, error="boom")
    gone = store.add(spec("cancelled"), submitted_at=T)
    store.cancel_queued(gone.id, completed_at=T)
    store.add_many([spec("q1"), spec("q2")], submitted_at=T)
    running = store.claim_next(started_at=T, node="old")
    store.requeue([running.id], count_attempt=True)  # back at the head: a low seq
    store.claim_next(started_at=T, node="old")  # and running again
    store.put_setting("generation", {"steps": 9})
    store.update_claim(claim, "done", final_path="/inbox/done/a.txt")
    snapshot = {
        "jobs": [store.get(i) for i in range(1, 6)],
        "queued": [j.id for j in store.queued()],
        "deliveries": store.deliveries(10),
    }
    store.close()
    return snapshot


def test_db_copy_moves_a_whole_sqlite_queue_into_postgres(tmp_path, pg_url, capsys):
    source = tmp_path / "old.db"
    before = make_source(source)
    config = config_for(tmp_path, pg_url)
    assert cli.main(["db", "copy", "--from", f"sqlite:{source}", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "copied 5 jobs, 1 inbox claims, 1 webhook deliveries and 1 settings" in out
    store = PostgresStore(pg_url)
    try:
        assert [store.get(i) for i in range(1, 6)] == before["jobs"]
        assert [j.id for j in store.queued()] == before["queued"]
        assert store.deliveries(10) == before["deliveries"]
        assert store.get_setting("generation") == {"steps": 9}
        assert store.get_claim(1)["final_path"] == "/inbox/done/a.txt"
        assert store.counts() == {QUEUED: 1, RUNNING: 1, COMPLETED: 1, FAILED: 1, CANCELLED: 1}
        new = store.add(spec("new"), submitted_at=T)  # the sequences went past the copy
        assert new.id == 6 and [j.id for j in store.queued()] == [*before["queued"], 6]
        assert store.create_claim("b.txt", "/c/b", created_at=T) == 2
        (recovered,) = store.recover(max_attempts=3, completed_at=T, node="old")
        assert recovered.status == QUEUED
    finally:
        store.close()
    # A second copy would mix two queues: refused, nothing changed.
    assert cli.main(["db", "copy", "--from", f"sqlite:{source}", "--config", config]) == 1
    assert "has 6 jobs already" in capsys.readouterr().err


def test_db_copy_takes_the_gallery_index_with_its_favourites_and_trash(tmp_path, pg_url):
    """Favourites and trash marks live only in the index: a queue moved to PostgreSQL keeps
    them (the rest of a row a pass over the folder could read again)."""
    from imagineerd.store import OutputQuery, OutputRecord

    source = tmp_path / "old.db"
    make_source(source)
    old = SQLiteStore(source)

    def row(path: str, **fields) -> OutputRecord:
        entry = {"filename": path.removeprefix(".trash/")}
        return OutputRecord(path, entry["filename"], T, 1, 2, entry, prompt="p", **fields)

    old.put_outputs([row("a.png"), row("b.png"), row(".trash/c.png", trashed_at=5.0)])
    old.set_favourite("b.png", True)
    old.close()
    store = PostgresStore(pg_url)
    try:
        assert store.copy_from_sqlite(source)["outputs"] == 3
        listed = store.list_outputs(OutputQuery(), limit=10)
        assert [(r.path, r.favourite) for r in listed] == [("b.png", True), ("a.png", False)]
        (trashed,) = store.trashed_outputs(limit=10)
        assert (trashed.path, trashed.filename, trashed.trashed_at) == (
            ".trash/c.png",
            "c.png",
            5.0,
        )
    finally:
        store.close()


def test_db_copy_onto_rows_a_node_indexed_keeps_the_favourites_and_trash_marks(tmp_path, pg_url):
    """A node started once on the new database indexed the folder before the copy: its rows
    know no favourite and take a file found in the trash for one trashed now. The copied
    rows' marks win, and the count says what was written."""
    from imagineerd.store import OutputQuery, OutputRecord

    def row(path: str, **fields) -> OutputRecord:
        name = path.removeprefix(".trash/")
        entry = {"filename": name}
        return OutputRecord(path, fields.pop("filename", name), T, 1, 2, entry, **fields)

    source = tmp_path / "old.db"
    old = SQLiteStore(source)
    old.put_outputs([row("a.png"), row("b.png"), row("c.png")])
    old.set_favourite("a.png", True)
    old.move_output("b.png", row(".trash/b-1.png", filename="b.png", trashed_at=1000.0))
    old.close()
    store = PostgresStore(pg_url)
    try:
        store.put_outputs(
            [
                row("a.png", node="gpu-1"),
                row(".trash/b-1.png", trashed_at=9999.0, node="gpu-1"),
            ]
        )
        assert store.copy_from_sqlite(source)["outputs"] == 3
        (a,) = store.find_outputs(["a.png"]).values()
        assert a.favourite and a.node == "gpu-1"
        (b,) = store.trashed_outputs(limit=10)
        assert (b.path, b.filename, b.trashed_at) == (".trash/b-1.png", "b.png", 1000.0)
        assert [r.path for r in store.list_outputs(OutputQuery(), limit=10)] == ["c.png", "a.png"]
        assert store.find_outputs(["b.png"], trashed=True)["b.png"].path == ".trash/b-1.png"
    finally:
        store.close()


def test_db_copy_reads_a_first_release_database_without_changing_it(tmp_path, pg_url, capsys):
    source = tmp_path / "imagineerd.db"
    shutil.copy(DATA / "release-0.1.0.db", source)
    config = config_for(tmp_path, pg_url)
    assert cli.main(["db", "copy", "--from", f"sqlite:{source}", "--config", config]) == 0
    assert "copied 3 jobs, 1 inbox claims, 0 webhook deliveries and 0 settings" in (
        capsys.readouterr().out
    )
    raw = sqlite3.connect(source)
    assert raw.execute("SELECT value FROM meta").fetchone()[0] == "1"  # not migrated
    raw.close()
    store = PostgresStore(pg_url)
    try:
        assert store.counts() == {QUEUED: 1, RUNNING: 1, COMPLETED: 1, FAILED: 0, CANCELLED: 0}
        (recovered,) = store.recover(max_attempts=3, completed_at=T, node="any")
        assert [j.spec.prompt for j in store.queued()] == ["was running", "was queued"]
        assert recovered.node is None and store.get_claim(1)["state"] == "done"
    finally:
        store.close()


def test_db_copy_refuses_what_it_cannot_copy(tmp_path, pg_url, capsys):
    config = config_for(tmp_path, pg_url)
    assert cli.main(["db", "copy", "--from", str(tmp_path / "x.db"), "--config", config]) == 1
    assert "--from must be sqlite:PATH" in capsys.readouterr().err
    assert cli.main(["db", "copy", "--from", f"sqlite:{tmp_path}/none.db", "--config", config]) == 1
    assert "no SQLite job database at" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    sqlite_config = config_for(tmp_path / "other", "")
    assert cli.main(["db", "copy", "--from", "sqlite:x.db", "--config", sqlite_config]) == 1
    assert "must name the PostgreSQL database" in capsys.readouterr().err
    # Refused before anything was opened: the configured SQLite file (which may be the
    # source of the copy) is neither created nor migrated.
    assert not (tmp_path / "other" / "state" / "imagineerd.db").exists()
    newer = tmp_path / "newer.db"
    SQLiteStore(newer).close()
    raw = sqlite3.connect(newer)
    raw.execute("UPDATE meta SET value = '6'")
    raw.commit()
    raw.close()
    assert cli.main(["db", "copy", "--from", f"sqlite:{newer}", "--config", config]) == 1
    assert "schema version 6" in capsys.readouterr().err
