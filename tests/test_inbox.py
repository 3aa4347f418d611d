"""The inbox watcher against a real folder, with real watchdog observers and a real store."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from imagineerd import hookimpl
from imagineerd.daemon import DB_NAME, Daemon
from imagineerd.inbox import Inbox
from imagineerd.plugins import get_plugin_manager

from .conftest import wait_for

FAST = {"settle_seconds": 0.3, "rescan_seconds": 1.0, "enabled": True}


class Env:
    def __init__(self, daemon: Daemon, inbox: Inbox) -> None:
        self.daemon, self.inbox, self.root = daemon, inbox, inbox.root

    def drop(self, name: str, content: str | bytes) -> Path:
        """Write like a network copy does: a hidden temp name, then a rename into place."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.part"
        tmp.write_bytes(content.encode() if isinstance(content, str) else content)
        os.rename(tmp, path)
        return path

    def jobs(self) -> list:
        counts = self.daemon.store.counts()
        return self.daemon.store.queued() if counts["queued"] else []

    def wait_done(self, name: str, timeout: float = 20) -> dict:
        receipt = self.root / "done" / (Path(name).stem + ".result.yaml")
        wait_for(receipt.exists, timeout)
        return yaml.safe_load(receipt.read_text())

    def wait_failed(self, name: str, timeout: float = 20) -> str:
        note = self.root / "failed" / (Path(name).stem + ".error.txt")
        # The note is written first, then the file is moved beside it (a crash in between
        # leaves the file claimed, to be finished at start-up): wait for both.
        wait_for(lambda: note.exists() and (note.parent / Path(name).name).exists(), timeout)
        return note.read_text()

    def wait_rescans(self, count: int = 1) -> None:
        """Wait until the inbox has looked at the whole folder ``count`` more times."""
        seen = self.daemon.health()["inbox"]["rescans"]
        wait_for(lambda: self.daemon.health()["inbox"]["rescans"] >= seen + count, 10)

    def claim_rows(self) -> int:
        """Every claim ever recorded, whatever its state (read beside the store)."""
        db = sqlite3.connect(f"file:{self.daemon.state_dir / DB_NAME}?mode=ro", uri=True)
        try:
            return db.execute("SELECT COUNT(*) FROM claims").fetchone()[0]
        finally:
            db.close()


@pytest.fixture
def start_inbox(make_config) -> Iterator[Callable[..., Env]]:
    running: list[tuple[Daemon, Inbox]] = []

    def start(workers: bool = False, plugins=(), inbox=None, **sections) -> Env:
        config = make_config(inbox={**FAST, **(inbox or {})}, **sections)
        pm = get_plugin_manager(list(plugins)) if plugins else None
        daemon = Daemon(config, plugin_manager=pm)
        daemon.start(workers=workers)
        box = Inbox(daemon, config)
        box.start()
        running.append((daemon, box))
        return Env(daemon, box)

    yield start
    for daemon, box in reversed(running):
        box.stop()
        daemon.stop()


def test_yaml_forms_and_txt_lines(start_inbox):
    env = start_inbox()
    env.drop("one.yaml", "prompt: a red fox\nsteps: 3\nseed: 5\n")
    env.drop("list.yml", "- a cat\n- prompt: a dog\n  width: 128\n")
    env.drop(
        "batch.YAML",
        "defaults: {steps: 7, negative_prompt: blurry}\n"
        "jobs:\n  - a house\n  - {prompt: a tree, steps: 9}\n",
    )
    env.drop("lines.txt", "# my prompts\n\nfirst prompt\n  second prompt  \n#skip\n")
    receipts = {
        name: env.wait_done(name) for name in ("one.yaml", "list.yml", "batch.YAML", "lines.txt")
    }
    assert [j["prompt"] for j in receipts["one.yaml"]["jobs"]] == ["a red fox"]
    assert receipts["one.yaml"]["jobs"][0]["seed"] == 5
    assert receipts["one.yaml"]["jobs"][0]["status"] == "queued"
    assert [j["prompt"] for j in receipts["lines.txt"]["jobs"]] == ["first prompt", "second prompt"]
    jobs = {j.spec.prompt: j for j in env.daemon.store.queued()}
    assert len(jobs) == 7
    assert jobs["a dog"].spec.width == 128 and jobs["a cat"].spec.width == 64
    assert jobs["a house"].spec.steps == 7 and jobs["a house"].spec.negative_prompt == "blurry"
    assert jobs["a tree"].spec.steps == 9
    assert all(j.source == "inbox" for j in jobs.values())
    assert jobs["a tree"].source_name == "batch.YAML"
    assert sorted(p.name for p in (env.root / "done").iterdir()) == sorted(
        [
            "one.yaml",
            "one.result.yaml",
            "list.yml",
            "list.result.yaml",
            "batch.YAML",
            "batch.result.yaml",
            "lines.txt",
            "lines.result.yaml",
        ]
    )
    assert not list(env.root.glob("*.yaml")) and not list((env.root / ".claimed").iterdir())


def test_junk_and_other_files_are_left_alone(start_inbox):
    env = start_inbox()
    junk = [
        ".hidden.yaml",
        "~$draft.txt",
        "._mac.yaml",
        "Thumbs.db",
        "desktop.ini",
        "copy.tmp",
        "big.part",
        "backup.txt~",
        "notes.csv",
        "image.png",
    ]
    for name in junk:
        (env.root / name).write_text("prompt: x\n")
    env.wait_rescans()  # seen by events and by a rescan
    # Dropped after them, so any junk file that was going to be taken has been by now.
    env.drop("real.txt", "the only prompt\n")
    env.wait_done("real.txt")
    assert [j.spec.prompt for j in env.daemon.store.queued()] == ["the only prompt"]
    for name in junk:
        assert (env.root / name).exists(), name


def test_slow_writer_is_taken_once_and_complete(start_inbox):
    env = start_inbox(inbox={"settle_seconds": 1.0})
    path = env.root / "slow.txt"
    with path.open("w") as handle:  # one open handle, like a network copy
        for i in range(6):
            handle.write(f"prompt number {i}\n")
            handle.flush()
            time.sleep(0.5)
    receipt = env.wait_done("slow.txt")
    assert [j["prompt"] for j in receipt["jobs"]] == [f"prompt number {i}" for i in range(6)]
    assert env.claim_rows() == 1 and env.daemon.store.counts()["queued"] == 6


def test_a_file_appended_and_closed_line_by_line_is_taken_once_when_unchanged(start_inbox):
    """Each append ends with a close; a close must not cut the settle time short."""
    env = start_inbox(inbox={"settle_seconds": 1.0})
    path = env.root / "growing.txt"
    lines = [f"line {i}" for i in range(8)]

    def write() -> None:
        for line in lines:
            with path.open("a") as handle:
                handle.write(line + "\n")
            time.sleep(0.4)

    writer = threading.Thread(target=write)
    writer.start()
    writer.join()
    receipt = env.wait_done("growing.txt")
    assert [j["prompt"] for j in receipt["jobs"]] == lines
    assert env.claim_rows() == 1
    assert sorted(p.name for p in (env.root / "done").iterdir()) == [
        "growing.result.yaml",
        "growing.txt",
    ]


def test_two_hundred_files_at_once_give_exactly_their_jobs(start_inbox):
    env = start_inbox()
    for i in range(200):
        env.drop(f"burst-{i:03}.txt", f"burst prompt {i}\n")
    wait_for(lambda: len(list((env.root / "done").glob("*.result.yaml"))) == 200, 120)
    prompts = [j.spec.prompt for j in env.daemon.store.queued(1000)]
    assert sorted(prompts) == sorted(f"burst prompt {i}" for i in range(200))


def test_files_present_before_start_are_taken(make_config, start_inbox, tmp_path):
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "early.txt").write_text("waiting since before\n")
    env = start_inbox()
    assert env.wait_done("early.txt")["jobs"][0]["prompt"] == "waiting since before"


def test_same_name_twice_is_processed_twice(start_inbox):
    env = start_inbox()
    env.drop("job.txt", "first\n")
    env.wait_done("job.txt")
    env.drop("job.txt", "second\n")
    receipt = env.root / "done" / "job-2.result.yaml"
    wait_for(receipt.exists, 20)
    assert (env.root / "done" / "job.txt").read_text() == "first\n"
    assert (env.root / "done" / "job-2.txt").read_text() == "second\n"
    assert sorted(j.spec.prompt for j in env.daemon.store.queued()) == ["first", "second"]


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("bad.yaml", "prompt: [unclosed\n", "not valid YAML: at line 2"),
        ("tab.yaml", "jobs:\n\t- x\n", "not valid YAML"),
        (
            "field.yaml",
            "- prompt: ok\n- prompt: too many steps\n  steps: 500\n",
            "job 2 (line 2): steps must be from 1 to 150, got 500",
        ),
        ("width.txt", "", "no prompts found"),
        ("empty.yaml", "", "the file is empty"),
        ("comments.txt", "# nothing here\n\n", "no prompts found"),
        ("unknown.yaml", "prompt: x\nsampler_name: fast\n", "unknown field 'sampler_name'"),
        ("sampler.yaml", "prompt: x\nsampler: fast\n", "sampler must be one of"),
        ("number.yaml", "- 42\n", "job 1 (line 1) is a number"),
        ("binary.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00", "not a text file"),
        ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"), "line 1: the text is not UTF-8"),
        (
            "bomb.yaml",
            "a: &a [x, x, x]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]\n",
            "aliases (*name) are not allowed",
        ),
        ("long.txt", "x" * 2001 + "\n", "line 1: prompt must be at most 2000 characters"),
        ("toplevel.yaml", "jobs: [a]\nextra: 1\n", "unknown top-level key 'extra'"),
    ],
)
def test_bad_files_go_to_failed_with_a_note_and_queue_nothing(start_inbox, name, content, words):
    env = start_inbox()
    env.drop(name, content)
    note = env.wait_failed(name)
    assert words in note, note
    assert "Nothing from it was queued" in note
    assert (env.root / "failed" / name).exists()
    assert env.daemon.store.counts()["queued"] == 0


def test_huge_file_is_refused_with_the_limit_named(start_inbox):
    env = start_inbox(inbox={"max_file_bytes": 1000})
    env.drop("huge.txt", "a prompt line\n" * 200)
    note = env.wait_failed("huge.txt")
    assert "2,800 bytes" in note and "inbox.max_file_bytes" in note


def test_too_many_jobs_per_file(start_inbox):
    env = start_inbox(inbox={"max_jobs_per_file": 3})
    env.drop("many.txt", "a\nb\nc\nd\n")
    assert "4 jobs; the limit is 3" in env.wait_failed("many.txt")


def test_utf16_from_windows_notepad_is_read(start_inbox):
    env = start_inbox()
    env.drop(
        "win.txt",
        "\ufeffun café ☃\r\nzweite Zeile\r\n".encode("utf-16-le").replace(
            b"\xff\xfe\xff\xfe", b"\xff\xfe"
        ),
    )
    receipt = env.wait_done("win.txt")
    assert [j["prompt"] for j in receipt["jobs"]] == ["un café ☃", "zweite Zeile"]


def test_presets_apply_under_the_files_own_values(start_inbox):
    env = start_inbox(presets={"quick": {"steps": 12, "scheduler": "ddim", "width": 128}})
    # Dropped first, so it would settle (and be taken) before a.yaml if it were not ignored.
    env.drop("nosuch/b.txt", "ignored\n")
    env.drop("quick/a.yaml", "- just the prompt\n- {prompt: own steps, steps: 3}\n")
    env.wait_done("a.yaml")
    assert env.claim_rows() == 1
    jobs = {j.spec.prompt: j.spec for j in env.daemon.store.queued()}
    assert set(jobs) == {"just the prompt", "own steps"}
    assert (jobs["just the prompt"].steps, jobs["just the prompt"].scheduler) == (12, "ddim")
    assert jobs["own steps"].steps == 3 and jobs["own steps"].width == 128
    assert (env.root / "nosuch" / "b.txt").exists()


def test_receipt_is_updated_as_jobs_finish(start_inbox):
    env = start_inbox(workers=True, inbox={"outputs_subfolder": True})
    env.drop("render.txt", "one\ntwo\n")
    receipt = env.root / "done" / "render.result.yaml"
    wait_for(
        lambda: receipt.exists() and yaml.safe_load(receipt.read_text())["finished"] == "2 of 2", 60
    )
    body = yaml.safe_load(receipt.read_text())
    assert [j["status"] for j in body["jobs"]] == ["completed", "completed"]
    for entry in body["jobs"]:
        assert entry["output"].startswith("outputs/render/")
        assert (env.daemon.config.base_dir / entry["output"]).is_file()


def test_crash_between_claim_and_submit_is_finished_on_restart(make_config, tmp_path):
    config = make_config(inbox=FAST)
    daemon = Daemon(config)
    daemon.start(workers=False)
    inbox_dir = config.path_for("inbox")
    (inbox_dir / ".claimed").mkdir(parents=True)
    # The process died right after renaming the file out of the drop area.
    claimed = inbox_dir / ".claimed" / "abc-crash.txt"
    claimed.write_text("survivor one\nsurvivor two\n")
    daemon.store.create_claim("crash.txt", str(claimed), created_at=daemon.now_iso())
    # ... and another died after queueing its jobs, before moving the file to done/.
    claimed2 = inbox_dir / ".claimed" / "def-late.txt"
    claimed2.write_text("already queued\n")
    cid = daemon.store.create_claim("late.txt", str(claimed2), created_at=daemon.now_iso())
    daemon.submit_claim(cid, [daemon.validate({"prompt": "already queued"})], "late.txt")
    # ... and a third recorded its claim but never renamed the file.
    (inbox_dir / "never.txt").write_text("still in the drop area\n")
    daemon.store.create_claim(
        "never.txt", str(inbox_dir / ".claimed" / "ghi-never.txt"), created_at=daemon.now_iso()
    )

    box = Inbox(daemon, config)
    box.start()
    try:
        env = Env(daemon, box)
        assert [j["prompt"] for j in env.wait_done("crash.txt")["jobs"]] == [
            "survivor one",
            "survivor two",
        ]
        assert [j["prompt"] for j in env.wait_done("late.txt")["jobs"]] == ["already queued"]
        env.wait_done("never.txt")
        prompts = sorted(j.spec.prompt for j in daemon.store.queued())
        assert prompts == sorted(
            ["survivor one", "survivor two", "already queued", "still in the drop area"]
        )  # each exactly once
        wait_for(lambda: daemon.store.open_claims() == [], 10)  # the receipt is written first
    finally:
        box.stop()
        daemon.stop()


def test_polling_observer(start_inbox):
    env = start_inbox(inbox={"polling": True, "rescan_seconds": 3600})
    env.drop("polled.txt", "seen by polling\n")
    assert env.wait_done("polled.txt")["jobs"][0]["prompt"] == "seen by polling"


class CsvPrompts:
    """A third-party parser: one prompt per row, 'prompt,steps'."""

    @hookimpl
    def imagineerd_prompt_file_suffixes(self):
        return [".csv"]

    @hookimpl
    def imagineerd_parse_prompt_file(self, path, text):
        if path.suffix != ".csv":
            return None
        rows = [line.split(",") for line in text.splitlines()[1:] if line]
        return [{"prompt": p, "steps": int(s)} for p, s in rows]


def test_a_plugin_adds_a_format_without_touching_the_watcher(start_inbox):
    env = start_inbox(plugins=[CsvPrompts()])
    env.drop("sheet.csv", "prompt,steps\na boat,4\na car,5\n")
    receipt = env.wait_done("sheet.csv")
    assert [(j["prompt"]) for j in receipt["jobs"]] == ["a boat", "a car"]
    assert sorted(j.spec.steps for j in env.daemon.store.queued()) == [4, 5]


def test_stop_and_start_do_not_double_anything(start_inbox):
    env = start_inbox()
    for i in range(20):
        env.drop(f"f{i}.txt", f"p{i}\n")
    env.inbox.stop()
    box = Inbox(env.daemon, env.daemon.config)
    box.start()
    try:
        wait_for(lambda: len(list((env.root / "done").glob("*.result.yaml"))) == 20, 60)
        assert sorted(j.spec.prompt for j in env.daemon.store.queued()) == sorted(
            f"p{i}" for i in range(20)
        )
    finally:
        box.stop()


def test_file_names_that_are_not_utf8_or_odd_still_work(start_inbox):
    env = start_inbox()
    odd = os.fsdecode(b"caf\xe9 menu.txt")  # Latin-1 bytes from an old client
    (env.root / odd).write_text("an odd name\n")
    (env.root / "日本語 プロンプト.txt").write_text("a unicode name\n")
    (env.root / "no-newline.txt").write_text("last line without newline")
    wait_for(lambda: len(list((env.root / "done").glob("*.result.yaml"))) == 3, 20)
    prompts = sorted(j.spec.prompt for j in env.daemon.store.queued())
    assert prompts == ["a unicode name", "an odd name", "last line without newline"]
    odd_job = [j for j in env.daemon.store.queued() if j.spec.prompt == "an odd name"][0]
    assert "caf" in odd_job.source_name


class RecordingClaims:
    """The store's claim methods, counted: the inbox keeps claims only through these."""

    def __init__(self, store) -> None:
        self.store, self.calls = store, []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.store, name)


def test_the_inbox_keeps_claims_in_the_store_it_is_given(make_config, monkeypatch):
    for name in (
        "create_claim",
        "create_claims",
        "update_claim",
        "delete_claim",
        "open_claims",
        "claim_jobs",
    ):
        monkeypatch.delattr(Daemon, name, raising=False)  # not the daemon's business
    monkeypatch.delattr(Daemon, "claim", raising=False)
    config = make_config(inbox=FAST)
    daemon = Daemon(config)
    daemon.start(workers=False)
    claims = RecordingClaims(daemon.store)
    box = Inbox(daemon, config, claims=claims)
    box.start()
    try:
        Env(daemon, box).drop("kept.txt", "a prompt\n")
        assert Env(daemon, box).wait_done("kept.txt")["jobs"][0]["prompt"] == "a prompt"
        # Files are claimed, and marked done, in bursts (one transaction for many).
        assert {"open_claims", "create_claims", "update_claims", "claims_with_jobs"} <= set(
            claims.calls
        )
    finally:
        box.stop()
        daemon.stop()


def test_receipts_of_jobs_failed_by_the_daemons_start_up_recovery_are_rewritten(make_config):
    """The serve command builds the inbox before the daemon recovers, so the receipt hook
    must already be registered then."""
    config = make_config(inbox=FAST, queue={"max_attempts": 1})
    daemon = Daemon(config)
    daemon.start(workers=False)
    box = Inbox(daemon, config)
    box.start()
    Env(daemon, box).drop("crashed.txt", "this job kills the daemon\n")
    assert Env(daemon, box).wait_done("crashed.txt")["jobs"][0]["status"] == "queued"
    assert daemon.store.claim_next(started_at=daemon.now_iso()).status == "running"
    box.stop()
    daemon.stop()  # no worker: the job stays "running", as after a crash

    daemon = Daemon(config)
    box = Inbox(daemon, config)  # before daemon.start(), as serve does
    daemon.start(workers=False)  # recovery fails the job: it ran max_attempts times
    try:
        receipt = yaml.safe_load((box.done_dir / "crashed.result.yaml").read_text())
        assert receipt["finished"] == "1 of 1"
        assert receipt["jobs"][0]["status"] == "failed"
        assert "stopped unexpectedly" in receipt["jobs"][0]["error"]
    finally:
        box.stop()
        daemon.stop()
