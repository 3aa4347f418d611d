"""Files that arrive together are taken together: their claims in one transaction, their
receipts written together; still each file exactly once, whatever moment a kill comes."""

from __future__ import annotations

import math
import os
import sqlite3
import threading
from pathlib import Path

import yaml
from watchdog.events import FileClosedEvent, FileClosedNoWriteEvent, FileOpenedEvent

from imagineerd import config as config_mod
from imagineerd.daemon import Daemon
from imagineerd.inbox import Inbox, _Handler
from imagineerd.inbox_claims import ClaimedFiles
from imagineerd.inbox_files import unique_pair, write_texts_durably
from imagineerd.inbox_settle import Settler

from .conftest import record_fsyncs, run_inbox_until_killed, wait_for, write_config
from .test_inbox import FAST, Env

RECEIPT_HEADER = "# imagineerd receipt"


class CountingClaims:
    """The store's claim methods, with ``create_claims`` calls recorded (their sizes)."""

    def __init__(self, store) -> None:
        self.store = store
        self.created: list[int] = []

    def create_claims(self, items, **kwargs):
        self.created.append(len(items))
        return self.store.create_claims(items, **kwargs)

    def __getattr__(self, name):
        return getattr(self.store, name)


def start(make_config, files: dict[str, str], claims_wrapper=None, prepare=None) -> Env:
    """A daemon (no worker) and its inbox, with ``files`` in the inbox before it starts: the
    first scan finds them all, so they settle, and are taken, together. ``prepare(daemon)``
    runs before the inbox starts."""
    config = make_config(inbox=FAST)
    root = config.path_for("inbox")
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text)
    daemon = Daemon(config)
    daemon.start(workers=False)
    if prepare is not None:
        prepare(daemon)
    claims = claims_wrapper(daemon.store) if claims_wrapper else None
    box = Inbox(daemon, config, claims=claims)
    box.start()
    return Env(daemon, box)


def receipts(done: Path) -> list[dict]:
    """The receipts in ``done/`` (not the temporary files they are written under)."""
    found = []
    for path in sorted(done.iterdir()):
        try:
            text = path.read_text()
        except FileNotFoundError:  # renamed away meanwhile
            continue
        if not path.name.startswith(".") and text.startswith(RECEIPT_HEADER):
            found.append(yaml.safe_load(text))
    return found


def test_a_burst_is_claimed_in_one_transaction_and_its_receipts_share_one_folder_sync(
    make_config, monkeypatch
):
    files = {f"burst-{i:02}.txt": f"burst prompt {i}\n" for i in range(40)}
    fsyncs = record_fsyncs(monkeypatch)
    env = start(make_config, files, CountingClaims)
    try:
        done = env.root / "done"
        wait_for(lambda: len(list(done.glob("*.result.yaml"))) == 40, 30)
        wait_for(lambda: env.daemon.store.open_claims() == [], 10)
        claims = env.inbox.claims
        assert sum(claims.created) == 40 and len(claims.created) < 40
        assert max(claims.created) > 1  # many files, one transaction
        prompts = sorted(job.spec.prompt for job in env.daemon.store.queued())
        assert prompts == sorted(text.strip() for text in files.values())  # each exactly once
        assert sorted(p.name for p in done.glob("*.txt")) == sorted(files)
        done_inode = os.stat(done).st_ino
        folder_syncs = [s for s in fsyncs if s.st_ino == done_inode]
        # One per chunk of receipts of each burst, not one per receipt.
        chunks = sum(math.ceil(n / ClaimedFiles.RECEIPTS_AT_ONCE) for n in claims.created)
        assert 0 < len(folder_syncs) <= chunks, (len(folder_syncs), claims.created)
    finally:
        env.inbox.stop()
        env.daemon.stop()


def test_a_receipt_planned_but_not_yet_written_is_never_overwritten(make_config):
    """``a.txt``'s receipt is ``done/a.result.yaml``; a prompt file of that very name in the
    same burst must not take the name while the receipt is still to be written."""
    files = {"a.txt": "from a.txt\n", "a.result.yaml": "prompt: from a.result.yaml\n"}
    env = start(make_config, files)
    try:
        done = env.root / "done"
        wait_for(lambda: len(receipts(done)) == 2, 30)
        wait_for(lambda: env.daemon.store.open_claims() == [], 10)
        kept = {
            path.read_text()
            for path in done.iterdir()
            if not path.read_text().startswith(RECEIPT_HEADER)
        }
        assert kept == set(files.values())  # both prompt files, intact
        assert {r["file"] for r in receipts(done)} == set(files)
        assert sorted(j.spec.prompt for j in env.daemon.store.queued()) == [
            "from a.result.yaml",
            "from a.txt",
        ]
    finally:
        env.inbox.stop()
        env.daemon.stop()


def test_a_burst_the_store_cannot_queue_is_finished_without_a_restart(make_config, monkeypatch):
    """The store fails the one transaction that queues a burst (locked, say): the files stay
    claimed, nothing is queued, and the watcher finishes them at its next rescan, each once."""
    files = {f"stuck-{i}.txt": f"stuck prompt {i}\n" for i in range(6)}
    failed: list[int] = []

    def fail_once(daemon: Daemon) -> None:
        real = daemon.store.submit_claims

        def fails_once(items, **kwargs):
            if not failed:
                failed.append(len(items))
                raise sqlite3.OperationalError("database is locked")
            return real(items, **kwargs)

        monkeypatch.setattr(daemon.store, "submit_claims", fails_once)

    env = start(make_config, files, prepare=fail_once)
    store, root = env.daemon.store, env.root
    try:
        wait_for(lambda: failed, 10)
        assert failed == [6]  # the whole burst in one transaction, which failed
        assert store.counts()["queued"] == 0
        assert len(list((root / ".claimed").iterdir())) == 6  # claimed, not lost
        wait_for(lambda: len(receipts(root / "done")) == 6, 30)  # the next rescan finished them
        wait_for(lambda: store.open_claims() == [], 10)
        prompts = sorted(job.spec.prompt for job in store.queued())
        assert prompts == sorted(text.strip() for text in files.values())  # each exactly once
        assert env.inbox.status()["restarts"] == 0 and not list((root / "failed").iterdir())
    finally:
        env.inbox.stop()
        env.daemon.stop()


# -- a kill at any step of a burst -----------------------------------------------------------
BURST = {"one.txt": "first file\n", "two.yaml": "- second file\n- third prompt\n"}


def run_until_killed(config, at: int) -> bool:
    """The inbox takes what is there, killed before its step ``at``; whether it was."""
    return run_inbox_until_killed(config, at, lambda root: len(receipts(root / "done")) == 2)


def check_next_start(config, at: int) -> None:
    """The next start finishes what the kill left: every file once, nothing left over."""
    root = config.path_for("inbox")
    daemon = Daemon(config)
    daemon.start(workers=False)
    box = Inbox(daemon, config)
    box.start()
    try:
        wait_for(lambda: len(receipts(root / "done")) == 2, 20)
        wait_for(lambda: daemon.store.open_claims() == [], 10)
        prompts = sorted(j.spec.prompt for j in daemon.store.queued())
        assert prompts == ["first file", "second file", "third prompt"], at
        assert [p.name for p in root.iterdir() if p.is_file()] == [], at
        assert list((root / ".claimed").iterdir()) == [], at
        assert {r["file"] for r in receipts(root / "done")} == set(BURST), at
    finally:
        box.stop()
        daemon.stop()


def test_a_kill_at_any_step_of_a_burst_loses_nothing_and_doubles_nothing(
    tiny_model, tmp_path, monkeypatch
):
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the killed thread
    at, killed = 0, True
    while killed:
        at += 1
        base = tmp_path / f"kill-{at}"
        base.mkdir()
        config = config_mod.load(write_config(base, tiny_model, inbox=FAST))
        root = config.path_for("inbox")
        root.mkdir()
        for name, text in BURST.items():
            (root / name).write_text(text)
        killed = run_until_killed(config, at)
        check_next_start(config, at)
    assert at > 10  # the burst has that many steps, and each was killed once


# -- the parts ------------------------------------------------------------------------------
def test_only_files_whose_quiet_period_is_over_are_looked_at(tmp_path, monkeypatch):
    import imagineerd.inbox_settle as settle

    settler = Settler()
    paths = []
    for i in range(50):
        path = tmp_path / f"f{i}.txt"
        path.write_text("x")
        settler.seen(path, os.lstat(path))
        paths.append(path)
    looked = []
    real = settle.regular_lstat
    monkeypatch.setattr(settle, "regular_lstat", lambda p: looked.append(p) or real(p))
    assert settler.ready(3600) == ([], []) and looked == []  # none is due: no stat at all
    paths[0].write_text("changed")  # changed while it waited: its quiet period starts again
    ready, changed = settler.ready(0)
    assert len(looked) == 50
    assert changed == [paths[0]] and sorted(ready) == sorted(paths[1:])


def test_opens_and_read_only_closes_are_not_noticed(tmp_path):
    noticed = []

    class FakeInbox:
        def notice(self, path):
            noticed.append(path)

    handler = _Handler(FakeInbox())  # type: ignore[arg-type]
    path = str(tmp_path / "a.txt")
    handler.on_any_event(FileOpenedEvent(path))
    handler.on_any_event(FileClosedNoWriteEvent(path))
    assert noticed == []
    handler.on_any_event(FileClosedEvent(path))
    assert noticed == [Path(path)]


def test_unique_pair_avoids_names_planned_but_not_yet_written(tmp_path):
    target, note = unique_pair(tmp_path, "a.txt", ".result.yaml")
    assert (target.name, note.name) == ("a.txt", "a.result.yaml")
    target, note = unique_pair(tmp_path, "a.txt", ".result.yaml", taken={str(note)})
    assert (target.name, note.name) == ("a-2.txt", "a-2.result.yaml")


def test_many_notes_are_written_durably_with_one_sync_per_folder(tmp_path, monkeypatch):
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    (first / "old.yaml").write_text("old\n")
    os.chmod(first / "old.yaml", 0o640)
    fsyncs = record_fsyncs(monkeypatch)
    items = [(first / f"n{i}.yaml", f"note {i}\n") for i in range(5)]
    items += [(first / "old.yaml", "new\n"), (tmp_path / "gone" / "x.yaml", "x\n")]
    items += [(second / "m.yaml", "m\n")]
    errors = write_texts_durably(items)
    assert [e is None for e in errors] == [True] * 6 + [False, True]
    assert isinstance(errors[6], FileNotFoundError)  # the others are written all the same
    assert [p.read_text() for p, _ in items[:6]] == [t for _, t in items[:6]]
    assert (second / "m.yaml").read_text() == "m\n"
    assert os.stat(first / "old.yaml").st_mode & 0o777 == 0o640  # as atomic_write_text
    folders = {os.stat(first).st_ino, os.stat(second).st_ino}
    assert sorted(s.st_ino for s in fsyncs if s.st_ino in folders) == sorted(folders)
    assert len([s for s in fsyncs if s.st_ino not in folders]) == 7  # each file once
    assert not [p for p in first.iterdir() if p.name.endswith(".tmp")]
