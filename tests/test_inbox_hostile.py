"""Hostile things dropped into the inbox: links, FIFOs, forged log lines, parser bombs, names
of 255 bytes. Real folders, a real daemon and real watchdog observers, as in test_inbox.py."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from imagineerd import hookimpl
from imagineerd.daemon import DB_NAME, Daemon
from imagineerd.inbox import Inbox

from .conftest import wait_for
from .test_inbox import FAST, Env
from .test_inbox import start_inbox as _start_inbox

start_inbox = _start_inbox  # the same fixture as in test_inbox.py

SECRET = "correct horse battery staple 7f3a"


def health(env: Env) -> dict:
    return env.daemon.health()["inbox"]


def wait_rescans(env: Env, count: int = 1) -> None:
    """Wait until the inbox has looked at the whole folder ``count`` more times."""
    seen = health(env)["rescans"]
    wait_for(lambda: health(env)["rescans"] >= seen + count, 20)


def call_within(seconds: float, fn, *args) -> None:
    """Run ``fn`` in a thread; fail if it has not returned after ``seconds``."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn(*args)
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__} still blocked after {seconds}s"
    if errors:
        raise errors[0]


def unblock_fifo(path: Path) -> None:
    """Give a reader stuck on ``path`` its end of file (only needed by a broken inbox)."""
    with contextlib.suppress(OSError):  # no reader: nothing is blocked on it
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def everything_written_under(root: Path) -> str:
    """The text of every regular file under ``root``, without following any link."""
    texts = []
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                texts.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(texts)


def claim_rows(env: Env) -> int:
    db = sqlite3.connect(f"file:{env.daemon.state_dir / DB_NAME}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM claims").fetchone()[0]
    finally:
        db.close()


# -- only regular files --------------------------------------------------------------------
def test_a_symlink_to_a_secret_dropped_while_running_is_never_read(start_inbox, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="imagineerd")
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    env = start_inbox()
    os.symlink(secret, env.root / "shadow.txt")
    # Dropped after the link, so it settles after it: had the link been taken, it was first.
    env.drop("after.txt", "an ordinary prompt\n")
    env.wait_done("after.txt")
    assert [j.spec.prompt for j in env.daemon.store.queued()] == ["an ordinary prompt"]
    assert SECRET not in everything_written_under(env.root)
    assert SECRET not in caplog.text
    assert (env.root / "shadow.txt").is_symlink() and secret.read_text() == SECRET + "\n"
    wait_rescans(env, 2)  # seen again, not logged again
    about_link = [r for r in caplog.records if "shadow.txt" in r.getMessage()]
    assert len(about_link) == 1 and "symbolic link" in about_link[0].getMessage()


def test_a_fifo_in_the_inbox_blocks_nothing_and_stop_returns_promptly(start_inbox):
    env = start_inbox()
    fifo = env.root / "pipe.txt"
    os.mkfifo(fifo)
    try:
        env.drop("later.txt", "taken all the same\n")
        assert env.wait_done("later.txt", 20)["jobs"][0]["prompt"] == "taken all the same"
        wait_rescans(env)
        call_within(10, env.inbox.stop)
        assert fifo.exists() and not fifo.is_file()  # left alone
    finally:
        unblock_fifo(fifo)


def test_a_fifo_or_link_left_in_claimed_by_a_crash_does_not_block_start_up(make_config, tmp_path):
    config = make_config(inbox=FAST)
    daemon = Daemon(config)
    daemon.start(workers=False)
    claimed_dir = config.path_for("inbox") / ".claimed"
    claimed_dir.mkdir(parents=True)
    fifo = claimed_dir / "0123-pipe.txt"
    os.mkfifo(fifo)
    daemon.store.create_claim("pipe.txt", str(fifo), created_at=daemon.now_iso())
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    os.symlink(secret, claimed_dir / "0456-shadow.txt")
    daemon.store.create_claim(
        "shadow.txt", str(claimed_dir / "0456-shadow.txt"), created_at=daemon.now_iso()
    )
    box = Inbox(daemon, config)
    try:
        call_within(10, box.start)
        env = Env(daemon, box)
        note = env.wait_failed("pipe.txt", 20)
        assert "FIFO" in note and "not a regular file" in note
        assert not (env.root / "failed" / "pipe.txt").is_file()  # the FIFO itself, moved
        assert "a symbolic link" in env.wait_failed("shadow.txt", 20)
        assert (env.root / "failed" / "shadow.txt").is_symlink() and secret.exists()
        assert SECRET not in everything_written_under(env.root)
        env.drop("next.txt", "the inbox goes on\n")
        env.wait_done("next.txt", 20)
        call_within(10, box.stop)
    finally:
        unblock_fifo(fifo)
        unblock_fifo(config.path_for("inbox") / "failed" / "pipe.txt")
        box.stop()
        daemon.stop()


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_a_preset_folder_that_is_a_link_is_not_followed(start_inbox, tmp_path, polling):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = start_inbox(presets={"quick": {"steps": 3}}, inbox={"polling": polling})
    os.symlink(elsewhere, env.root / "quick")
    (elsewhere / "private.txt").write_text(SECRET + "\n")
    env.drop("after.txt", "an ordinary prompt\n")
    env.wait_done("after.txt")
    wait_rescans(env)
    (elsewhere / "later.txt").write_text(SECRET + " later\n")
    env.drop("after2.txt", "another prompt\n")
    env.wait_done("after2.txt")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["later.txt", "private.txt"]
    assert SECRET not in everything_written_under(env.root)


# -- names in logs -------------------------------------------------------------------------
def test_control_characters_in_names_cannot_forge_log_lines(start_inbox, caplog):
    caplog.set_level(logging.INFO, logger="imagineerd")
    env = start_inbox()
    forged = "x\nERROR imagineerd: forged.txt"
    env.drop(forged, "a prompt\n")
    env.drop("bad\r\x1b[2K.yaml", "prompt: [unclosed\n")
    env.drop("other\n.csv", "not a prompt file\n")
    env.wait_done(forged)
    env.wait_failed("bad\r\x1b[2K.yaml")
    wait_for(lambda: any("other" in r.getMessage() for r in caplog.records), 20)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("imagineerd")]
    assert any("forged" in m for m in messages)
    for message in messages:
        assert not any(ch in message for ch in "\n\r\x1b"), message


# -- poisonous files -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("[" * 10_000, "nested more than 20 levels deep"),
        ("prompt: x\nseed: " + "9" * 5000 + "\n", "line 2: a number with 5,000 digits"),
        ("- prompt: x\n  seed: " + "1" * 31 + "\n", "at most 30 digits"),
    ],
    ids=["nested-brackets", "5000-digit-seed", "31-digit-seed"],
)
def test_a_poisonous_yaml_file_goes_to_failed_and_the_inbox_goes_on(start_inbox, content, words):
    env = start_inbox()
    env.drop("poison.yaml", content)
    note = env.wait_failed("poison.yaml", 20)
    assert words in note and "Traceback" not in note
    env.drop("after.txt", "still working\n")
    env.wait_done("after.txt", 20)
    assert health(env)["failed"] == 1 and health(env)["taken"] == 1


@pytest.mark.parametrize(
    "text",
    ["[" * 1_000_000, "{" * 1_000_000, "{a: " * 250_000, "- " * 500_000 + "x"],
    ids=["brackets", "braces", "flow-keys", "block-dashes"],
)
def test_a_megabyte_of_nesting_is_refused_quickly(text):
    from imagineerd.errors import ValidationError
    from imagineerd.plugins.yaml_prompts import imagineerd_parse_prompt_file

    started = time.perf_counter()
    with pytest.raises(ValidationError, match="nested more than 20"):
        imagineerd_parse_prompt_file(path=Path("deep.yaml"), text=text)
    assert time.perf_counter() - started < 2.0


class BrokenParser:
    """A third-party parser with a bug."""

    @hookimpl
    def imagineerd_prompt_file_suffixes(self):
        return [".boom"]

    @hookimpl
    def imagineerd_parse_prompt_file(self, path, text):
        if path.suffix == ".boom":
            return {}["no such key"]
        return None


def test_a_parser_plugin_that_raises_anything_fails_only_that_file(start_inbox, caplog):
    env = start_inbox(plugins=[BrokenParser()])
    env.drop("sheet.boom", "whatever\n")
    note = env.wait_failed("sheet.boom", 20)
    assert "KeyError: 'no such key'" in note and "Traceback" not in note
    env.drop("after.txt", "still working\n")
    env.wait_done("after.txt", 20)
    assert len([r for r in caplog.records if r.exc_info]) == 1  # one traceback, in the log


def test_an_error_in_the_watcher_loop_restarts_it_and_health_shows_it(start_inbox, caplog):
    env = start_inbox()
    real_ready, calls = env.inbox._ready, []

    def fail_once():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("injected fault in the watcher")
        return real_ready()

    env.inbox._ready = fail_once
    wait_for(lambda: health(env)["restarts"] == 1, 20)
    status = health(env)
    assert status["last_error"] == "OSError: injected fault in the watcher"
    env.drop("after.txt", "taken after the restart\n")
    env.wait_done("after.txt", 20)
    assert health(env)["state"] == "watching"
    assert any("restarting" in r.getMessage() for r in caplog.records)
    env.inbox.stop()
    assert health(env)["state"] == "stopped"


def test_a_file_watcher_that_dies_is_started_again_and_health_shows_it(start_inbox):
    env = start_inbox()
    first = env.inbox._observer
    first.stop()  # as when inotify gives up: its thread ends
    first.join(10)
    wait_for(lambda: health(env)["restarts"] == 1, 20)
    assert env.inbox._observer is not first
    wait_for(env.inbox._observer.is_alive, 10)
    assert health(env)["file_watcher"] == "running"
    assert health(env)["last_error"] == "the file watcher stopped"
    env.drop("after.txt", "seen by the new watcher\n")
    env.wait_done("after.txt", 20)
    env.inbox.stop()
    assert health(env)["file_watcher"] == "stopped"


def test_a_poison_file_left_in_claimed_by_a_crash_does_not_stop_start_up(make_config):
    config = make_config(inbox=FAST)
    daemon = Daemon(config)
    daemon.start(workers=False)
    claimed_dir = config.path_for("inbox") / ".claimed"
    claimed_dir.mkdir(parents=True)
    for name, text in (("deep.yaml", "[" * 10_000), ("seed.yaml", "seed: " + "7" * 5000)):
        (claimed_dir / f"0123-{name}").write_text(text)
        daemon.store.create_claim(name, str(claimed_dir / f"0123-{name}"), created_at="x")
    try:
        for _ in range(2):  # and again: nothing is left over to break the next start
            box = Inbox(daemon, config)
            call_within(10, box.start)
            env = Env(daemon, box)
            assert "nested" in env.wait_failed("deep.yaml", 20)
            assert "5,000 digits" in env.wait_failed("seed.yaml", 20)
            env.drop("after.txt", "start-up went on\n")
            env.wait_done("after.txt", 20)
            box.stop()
            (env.root / "done" / "after.txt").unlink()
            (env.root / "done" / "after.result.yaml").unlink()
        assert daemon.store.open_claims() == []
        assert sorted(p.name for p in (env.root / "failed").iterdir()) == [
            "deep.error.txt",
            "deep.yaml",
            "seed.error.txt",
            "seed.yaml",
        ]
    finally:
        daemon.stop()


# -- long and odd names --------------------------------------------------------------------
def drop_raw(root: Path, name: bytes, content: bytes) -> None:
    """Write under a short temp name, then rename to ``name`` (which may be 255 bytes)."""
    tmp = os.path.join(os.fsencode(root), b".incoming.part")
    with open(tmp, "wb") as handle:
        handle.write(content)
    os.rename(tmp, os.path.join(os.fsencode(root), name))


def test_names_of_255_bytes_are_taken_and_claims_do_not_pile_up(start_inbox):
    env = start_inbox()
    long_ascii = b"a" * 251 + b".txt"
    long_utf8 = "é".encode() * 125 + b"z.txt"  # 255 bytes; cut on a character boundary
    latin1 = b"\xe9" * 200 + b".txt"  # 600 bytes once each byte is shown as U+FFFD
    assert len(long_ascii) == len(long_utf8) == 255
    for number, name in enumerate((long_ascii, long_utf8, latin1)):
        drop_raw(env.root, name, b"prompt %d\n" % number)
    wait_for(lambda: len(list((env.root / "done").glob("*.result.yaml"))) == 3, 20)
    drop_raw(env.root, long_ascii, b"the same long name again\n")  # gets a -2 that fits too
    wait_for(lambda: len(list((env.root / "done").glob("*.result.yaml"))) == 4, 20)
    wait_rescans(env, 2)
    assert claim_rows(env) == 4 and env.daemon.store.open_claims() == []
    assert env.daemon.store.counts()["queued"] == 4
    names = [os.fsencode(p.name) for p in (env.root / "done").iterdir()]
    assert len(names) == 8 and all(len(n) <= 255 for n in names)
    assert all(n.decode("utf-8") for n in names)  # U+FFFD, whole characters only
    assert not list(env.root.glob("*.txt")) and not list((env.root / ".claimed").iterdir())


def test_a_file_that_cannot_be_claimed_leaves_no_claim_behind(start_inbox, caplog, monkeypatch):
    env = start_inbox()
    # Every claim gets the name of a folder that is there already: each rename fails.
    (env.root / ".claimed" / "taken-name").mkdir()  # a file cannot be renamed onto it
    monkeypatch.setattr("imagineerd.inbox.claim_name", lambda name: "taken-name")
    env.drop("stuck.txt", "waits for its claim\n")
    wait_rescans(env, 3)
    assert claim_rows(env) == 0 and (env.root / "stuck.txt").exists()
    assert len([r for r in caplog.records if "stuck.txt" in r.getMessage()]) == 1
    monkeypatch.undo()
    os.utime(env.root / "stuck.txt")  # changed: tried again
    env.wait_done("stuck.txt", 20)
    assert claim_rows(env) == 1


def test_files_and_links_named_like_the_inbox_folders_are_moved_aside(make_config, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "done").write_text("a file named done\n")
    os.symlink(elsewhere, inbox / "failed")
    os.symlink(elsewhere, inbox / ".claimed")
    (inbox / "first.txt").write_text("a prompt\n")
    (inbox / "broken.yaml").write_text("prompt: [unclosed\n")
    config = make_config(inbox=FAST)
    daemon = Daemon(config)
    daemon.start(workers=False)
    box = Inbox(daemon, config)
    try:
        call_within(10, box.start)
        env = Env(daemon, box)
        env.wait_done("first.txt", 20)
        env.wait_failed("broken.yaml", 20)
        assert list(elsewhere.iterdir()) == []  # nothing written through the links
        assert sorted(p.name.split(".not-a-folder-")[0] for p in inbox.glob("*not-a-folder*")) == [
            ".claimed",
            "done",
            "failed",
        ]
    finally:
        box.stop()
        daemon.stop()


def test_read_regular_file_reads_only_regular_files_within_the_limit(tmp_path):
    import socket

    from imagineerd.safefile import FileTooLargeError, NotRegularFileError, read_regular_file

    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"x" * 10)
    assert read_regular_file(plain, 10) == b"x" * 10
    with pytest.raises(FileTooLargeError) as too_large:
        read_regular_file(plain, 9)
    assert (too_large.value.size, too_large.value.limit) == (10, 9)
    os.symlink(plain, tmp_path / "link.txt")
    os.mkfifo(tmp_path / "fifo.txt")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock.txt"))
    try:
        for name, kind in (
            ("link.txt", "a symbolic link"),
            ("fifo.txt", "a FIFO (named pipe)"),
            ("sock.txt", "a socket"),
        ):
            with pytest.raises(NotRegularFileError) as refused:
                call_within(2, read_regular_file, tmp_path / name, 100)
            assert refused.value.kind == kind
        with pytest.raises(NotRegularFileError, match="a character device"):
            read_regular_file("/dev/null", 100)
    finally:
        server.close()
