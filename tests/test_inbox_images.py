"""Images named by inbox prompt files (``init_image: photo.png``, ``mask:``): claimed with the
prompt file, handed to the daemon as bytes, moved to done/ or failed/ beside it. A real inbox
and a real daemon on the tiny model, 64x64 PNGs made with Pillow, real links and FIFOs, and
kills simulated at every step of a claim."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from imagineerd import config as config_mod
from imagineerd import inbox_claims as inbox_mod
from imagineerd.daemon import Daemon
from imagineerd.inbox import Inbox

from .conftest import run_inbox_until_killed, wait_for, write_config
from .test_inbox import FAST, Env
from .test_inbox import start_inbox as _start_inbox
from .test_inbox_hostile import unblock_fifo

start_inbox = _start_inbox  # the same fixture as in test_inbox.py


def png(seed: int = 0, size: tuple[int, int] = (64, 64), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def mask_png() -> bytes:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def names(folder: Path) -> list[str]:
    """What is in a folder, without hidden names (a killed atomic write may leave one)."""
    return sorted(n for n in os.listdir(folder) if not n.startswith(".")) if folder.is_dir() else []


def dropped(env: Env) -> list[str]:
    """What is left in the drop area (the inbox's own folders aside)."""
    return [n for n in names(env.root) if n not in ("done", "failed")]


def wait_finished_receipt(env: Env, name: str, timeout: float = 120) -> dict:
    receipt = env.root / "done" / (Path(name).stem + ".result.yaml")

    def finished():
        if not receipt.exists():
            return None
        body = yaml.safe_load(receipt.read_text())
        done, total = body["finished"].split(" of ")
        return body if done == total else None

    return wait_for(finished, timeout)


# -- the usual case ------------------------------------------------------------------------
def test_a_photo_beside_the_yaml_makes_an_img2img_job(start_inbox):
    env = start_inbox(workers=True)
    photo = png(1)
    env.drop("photo.png", photo)
    env.drop("fox.yaml", "prompt: a red fox\ninit_image: photo.png\nstrength: 0.5\nseed: 3\n")
    receipt = wait_finished_receipt(env, "fox.yaml")
    job = env.daemon.job(receipt["jobs"][0]["id"])
    assert job.status == "completed", job.error
    assert job.spec.init_image == sha(photo) and job.spec.mode == "img2img"
    assert job.spec.strength == 0.5
    assert receipt["jobs"][0]["init_image"] == "photo.png"
    assert receipt["inputs"] == {"photo.png": "photo.png"}
    assert names(env.root / "done") == ["fox.result.yaml", "fox.yaml", "photo.png"]
    assert (env.root / "done" / "photo.png").read_bytes() == photo
    assert dropped(env) == [] and names(env.root / ".claimed") == []


def test_a_photo_and_its_mask_make_an_inpainting_job(start_inbox):
    env = start_inbox(workers=True)
    photo, mask = png(2), mask_png()
    env.drop("photo.png", photo)
    env.drop("photo-mask.png", mask)
    env.drop(
        "fix.yml",
        "prompt: a blue door\ninit_image: photo.png\nmask: photo-mask.png\nmask_blur: 2\n",
    )
    receipt = wait_finished_receipt(env, "fix.yml")
    job = env.daemon.job(receipt["jobs"][0]["id"])
    assert job.status == "completed", job.error
    assert (job.spec.init_image, job.spec.mask) == (sha(photo), sha(mask))
    assert job.spec.mode == "inpaint"
    assert receipt["jobs"][0]["mask"] == "photo-mask.png"
    assert set(receipt["inputs"]) == {"photo.png", "photo-mask.png"}
    assert names(env.root / "done") == ["fix.result.yaml", "fix.yml", "photo-mask.png", "photo.png"]


def test_defaults_share_one_image_read_once(start_inbox, monkeypatch):
    reads = []
    real = inbox_mod.read_image
    monkeypatch.setattr(
        inbox_mod, "read_image", lambda path, limit: reads.append(path) or real(path, limit)
    )
    env = start_inbox()
    photo = png(3)
    env.drop("base.png", photo)
    env.drop(
        "variations.yaml",
        "defaults: {init_image: base.png, strength: 0.4}\njobs:\n  - a cat\n  - a dog\n  - a cow\n",
    )
    receipt = env.wait_done("variations.yaml")
    assert [j["init_image"] for j in receipt["jobs"]] == ["base.png"] * 3
    assert len(reads) == 1
    specs = [j.spec for j in env.daemon.store.queued()]
    assert len(specs) == 3 and {s.init_image for s in specs} == {sha(photo)}


def test_text_references_pass_through_and_name_no_inbox_file(start_inbox):
    env = start_inbox()
    earlier = png(4)
    outputs = env.daemon.outputs_dir
    outputs.mkdir(parents=True, exist_ok=True)
    (outputs / "earlier.png").write_bytes(earlier)
    inline = "data:image/png;base64," + base64.b64encode(png(5)).decode()
    env.drop(
        "refs.yaml",
        "- {prompt: from an output, init_image: outputs/earlier.png}\n"
        f"- {{prompt: inline, init_image: '{inline}'}}\n"
        f"- {{prompt: stored, init_image: '{sha(earlier)}'}}\n",
    )
    receipt = env.wait_done("refs.yaml")
    jobs = {j.spec.prompt: j.spec for j in env.daemon.store.queued()}
    assert jobs["from an output"].init_image == sha(earlier)
    assert jobs["from an output"].init_image_name == "earlier.png"
    assert jobs["inline"].init_image == sha(png(5))
    assert jobs["stored"].init_image == sha(earlier)
    shown = [j["init_image"] for j in receipt["jobs"]]
    assert shown == ["outputs/earlier.png", "a data: URL", sha(earlier)]
    assert "inputs" not in receipt and names(env.root / "done") == ["refs.result.yaml", "refs.yaml"]


def test_a_name_in_another_case_finds_the_file(start_inbox):
    """Windows clients see Photo.PNG and photo.png as one file."""
    env = start_inbox()
    env.drop("photo.png", png(6))
    env.drop("case.yaml", "prompt: x\ninit_image: Photo.PNG\n")
    receipt = env.wait_done("case.yaml")
    assert receipt["jobs"][0]["init_image"] == "photo.png"
    assert "photo.png" in names(env.root / "done")


def test_the_same_image_name_twice_is_kept_twice_in_done(start_inbox):
    env = start_inbox()
    first, second = png(7), png(8)
    env.drop("photo.png", first)
    env.drop("a.yaml", "prompt: first\ninit_image: photo.png\n")
    env.wait_done("a.yaml")
    env.drop("photo.png", second)
    env.drop("b.yaml", "prompt: second\ninit_image: photo.png\n")
    receipt = env.wait_done("b.yaml")
    assert receipt["inputs"] == {"photo.png": "photo-2.png"}
    assert (env.root / "done" / "photo.png").read_bytes() == first
    assert (env.root / "done" / "photo-2.png").read_bytes() == second
    specs = {j.spec.prompt: j.spec for j in env.daemon.store.queued()}
    assert (specs["first"].init_image, specs["second"].init_image) == (sha(first), sha(second))


def test_two_files_naming_one_photo_the_second_fails_at_once(start_inbox):
    env = start_inbox()  # orphan_seconds 600: the second file must not wait for it
    env.drop("photo.png", png(20))
    env.drop("a.yaml", "prompt: first\ninit_image: photo.png\n")
    env.drop("b.yaml", "prompt: second\ninit_image: photo.png\n")
    wait_for(lambda: len(names(env.root / "done")) + len(names(env.root / "failed")) == 5, 20)
    (note_file,) = (env.root / "failed").glob("*.error.txt")
    winner = "a.yaml" if note_file.name == "b.error.txt" else "b.yaml"
    assert f"it went with {winner!r}, which named it too" in note_file.read_text()
    assert "photo.png" in names(env.root / "done") and env.daemon.store.counts()["queued"] == 1


def test_a_photo_in_a_preset_folder(start_inbox):
    env = start_inbox(presets={"restyle": {"steps": 4}})
    env.drop("restyle/photo.png", png(21))
    env.drop("restyle/job.yaml", "prompt: x\ninit_image: photo.png\nstrength: 0.3\n")
    receipt = env.wait_done("job.yaml")
    assert receipt["inputs"] == {"photo.png": "photo.png"}
    spec = env.daemon.store.queued()[0].spec
    assert (spec.steps, spec.init_image) == (4, sha(png(21)))
    assert names(env.root / "restyle") == []


# -- order of arrival ------------------------------------------------------------------------
def test_a_yaml_that_arrives_before_its_photo_waits_for_it(start_inbox, caplog):
    caplog.set_level(logging.INFO, logger="imagineerd")
    env = start_inbox()
    env.drop("early.yaml", "prompt: x\ninit_image: late.png\nmask: late-mask.png\n")
    wait_for(lambda: env.daemon.health()["inbox"]["waiting_for_images"] == 1, 10)
    time.sleep(1.0)  # three settle times: it would have been taken long ago
    assert "early.yaml" in dropped(env) and env.claim_rows() == 0
    env.drop("late.png", png(9))
    time.sleep(0.6)
    assert "early.yaml" in dropped(env)  # the mask is still missing
    env.drop("late-mask.png", mask_png())
    receipt = env.wait_done("early.yaml")
    assert set(receipt["inputs"]) == {"late.png", "late-mask.png"}
    assert dropped(env) == [] and env.daemon.health()["inbox"]["waiting_for_images"] == 0
    waits = [r for r in caplog.records if "waits for" in r.getMessage()]
    assert len(waits) == 1 and "late.png" in waits[0].getMessage()


def test_a_photo_still_being_written_is_waited_for(start_inbox):
    env = start_inbox(inbox={"settle_seconds": 1.0})
    data = png(10)
    photo = env.root / "slow.png"
    with photo.open("wb") as handle:
        handle.write(data[:100])
        handle.flush()
        env.drop("slow.yaml", "prompt: x\ninit_image: slow.png\n")
        for start in range(100, len(data), 2000):
            time.sleep(0.3)
            handle.write(data[start : start + 2000])
            handle.flush()
    receipt = env.wait_done("slow.yaml")
    assert receipt["inputs"] == {"slow.png": "slow.png"}
    assert env.daemon.store.queued()[0].spec.init_image == sha(data)


def test_a_missing_image_fails_after_the_wait_and_queues_nothing(start_inbox):
    env = start_inbox(inbox={"orphan_seconds": 1})
    env.drop("photo.png", png(11))
    env.drop(
        "typo.yaml",
        "- prompt: fine\n  init_image: photo.png\n- prompt: typo\n  init_image: photo.jpg\n",
    )
    note = env.wait_failed("typo.yaml")
    assert "job 2 (line 3): init_image: 'photo.jpg' is not in the inbox" in note, note
    assert "Nothing from it was queued" in note
    assert env.daemon.store.counts()["queued"] == 0
    # The image it did find went with it: nothing of the file is left behind.
    assert names(env.root / "failed") == ["photo.png", "typo.error.txt", "typo.yaml"]
    assert dropped(env) == []


def test_an_image_alone_is_left_in_place_and_reported_once(start_inbox, caplog):
    caplog.set_level(logging.INFO, logger="imagineerd")
    env = start_inbox(inbox={"orphan_seconds": 1})
    env.drop("lonely.png", "prompt: never a prompt file\n")
    env.drop("lonely2.JPG", png(12))
    wait_for(lambda: sum("no prompt file has named" in r.getMessage() for r in caplog.records) == 2)
    env.wait_rescans(2)
    time.sleep(1.2)
    reports = [
        r.getMessage() for r in caplog.records if "no prompt file has named" in r.getMessage()
    ]
    assert len(reports) == 2, reports
    assert any("lonely.png" in r for r in reports) and any("lonely2.JPG" in r for r in reports)
    assert dropped(env) == ["lonely.png", "lonely2.JPG"]
    assert env.claim_rows() == 0 and env.daemon.store.counts()["queued"] == 0
    assert not [
        r for r in caplog.records if "not a " in r.getMessage() and "lonely" in r.getMessage()
    ]
    # Named later, it is used all the same.
    env.drop("late.yaml", "prompt: x\ninit_image: lonely2.JPG\n")
    assert env.wait_done("late.yaml")["inputs"] == {"lonely2.JPG": "lonely2.JPG"}


# -- refused -----------------------------------------------------------------------------------
def test_an_image_that_is_a_link_is_refused_and_never_read(start_inbox, tmp_path):
    env = start_inbox()  # orphan_seconds 600: a link is refused at once, not waited for
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(13))
    os.symlink(secret, env.root / "photo.png")
    env.drop("linked.yaml", "prompt: x\ninit_image: photo.png\n")
    note = env.wait_failed("linked.yaml", 10)
    assert "init_image: 'photo.png' is a symbolic link, not a regular file" in note, note
    assert env.daemon.store.counts()["queued"] == 0
    assert (env.root / "photo.png").is_symlink() and secret.read_bytes() == png(13)
    assert not (env.daemon.state_dir / "inputs" / sha(png(13))[7:]).exists()


def test_an_image_that_is_a_fifo_is_refused_without_blocking(start_inbox):
    env = start_inbox()
    fifo = env.root / "pipe.png"
    os.mkfifo(fifo)
    try:
        env.drop("piped.yaml", "prompt: x\nmask: pipe.png\ninit_image: pipe.png\n")
        note = env.wait_failed("piped.yaml", 10)
        assert "'pipe.png' is a FIFO (named pipe), not a regular file" in note, note
        assert fifo.exists() and env.daemon.store.counts()["queued"] == 0
    finally:
        unblock_fifo(fifo)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("../outside.png", "init_image: '../outside.png' is a path"),
        ("/etc/outside.png", "init_image: '/etc/outside.png' is a path"),
        ("sub/photo.png", "init_image: 'sub/photo.png' is a path"),
        ("..\\\\outside.png", "is a path"),
        ("..", "is a path"),
        (".hidden.png", "is a hidden or temporary name"),
        ("iVBORw0KGgo" * 30, "is too long for a file name; to write the image itself"),
        ("other.yaml", "init_image: 'other.yaml' is not a .png, .jpg, .jpeg, .webp file"),
    ],
)
def test_a_name_that_leads_elsewhere_is_refused(start_inbox, tmp_path, value, words):
    env = start_inbox()
    (tmp_path / "outside.png").write_bytes(png(14))
    env.drop("other.yaml", "prompt: the other file\n")  # must never be taken as an image
    env.drop("escape.yaml", f'prompt: x\ninit_image: "{value}"\n')
    note = env.wait_failed("escape.yaml", 10)
    assert words in note, note
    assert (tmp_path / "outside.png").read_bytes() == png(14)
    env.wait_done("other.yaml")
    assert [j.spec.prompt for j in env.daemon.store.queued()] == ["the other file"]


def test_an_image_over_the_size_limit_goes_to_failed_with_it(start_inbox):
    env = start_inbox(server={"max_image_bytes": 4096})
    big = png(15)  # noise does not compress: about 12 KB
    env.drop("big.png", big)
    env.drop("big.yaml", "prompt: x\ninit_image: big.png\n")
    note = env.wait_failed("big.yaml")
    assert f"init_image: 'big.png' is {len(big):,} bytes" in note, note
    assert "server.max_image_bytes" in note
    assert names(env.root / "failed") == ["big.error.txt", "big.png", "big.yaml"]
    assert env.daemon.store.counts()["queued"] == 0


def test_a_damaged_image_is_named_in_the_note(start_inbox):
    env = start_inbox()
    env.drop("broken.png", png(16)[:200])
    env.drop("broken.yaml", "prompt: x\ninit_image: broken.png\n")
    note = env.wait_failed("broken.yaml")
    assert "init_image 'broken.png':" in note, note
    assert "broken.png" in names(env.root / "failed")


def test_a_bad_job_sends_its_images_to_failed(start_inbox):
    env = start_inbox()
    env.drop("photo.png", png(17))
    env.drop("bad.yaml", "prompt: x\ninit_image: photo.png\nsteps: 500\n")
    note = env.wait_failed("bad.yaml")
    assert "steps must be from 1 to 150" in note
    # The note comes first, then the file, then its images (a crash in between still
    # moves them): wait for the last move rather than read the folder half-way.
    wanted = ["bad.error.txt", "bad.yaml", "photo.png"]
    assert wait_for(lambda: names(env.root / "failed") == wanted, timeout=30)


# -- crashes -------------------------------------------------------------------------------------
def run_until_killed(config, at: int) -> bool:
    """The inbox takes what is there, killed before its step ``at``; whether it was."""
    return run_inbox_until_killed(config, at, lambda root: not os.path.exists(root / "job.yaml"))


def check_next_start(config, valid: bool, photo: bytes, mask: bytes, at: int) -> None:
    """Start again on what was left: the file is finished, exactly once, with its images."""
    root = config.path_for("inbox")
    daemon = Daemon(config)
    daemon.start(workers=False)
    box = Inbox(daemon, config)
    box.start()
    env = Env(daemon, box)
    try:
        if valid:
            receipt = env.wait_done("job.yaml")
            assert names(root / "done") == [
                "job.result.yaml",
                "job.yaml",
                "mask.png",
                "photo.png",
            ], at
            assert receipt["inputs"] == {"mask.png": "mask.png", "photo.png": "photo.png"}, at
            assert receipt["jobs"][0]["init_image"] == "photo.png", at
            queued = daemon.store.queued()
            assert len(queued) == 1, at
            assert (queued[0].spec.init_image, queued[0].spec.mask) == (sha(photo), sha(mask))
            assert names(root / "failed") == [], at
        else:
            note = env.wait_failed("job.yaml")
            assert "steps must be from 1 to 150" in note, (at, note)
            assert names(root / "failed") == [
                "job.error.txt",
                "job.yaml",
                "mask.png",
                "photo.png",
            ], at
            assert daemon.store.counts()["queued"] == 0 and names(root / "done") == [], at
        wait_for(lambda: daemon.store.open_claims() == [], 10)
        assert dropped(env) == [], at
        assert names(root / ".claimed") == [], at
    finally:
        box.stop()
        daemon.stop()


@pytest.mark.parametrize("valid", [True, False], ids=["queued", "failed"])
def test_a_kill_at_any_step_loses_nothing_and_doubles_nothing(
    tiny_model, tmp_path, monkeypatch, valid
):
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the killed thread
    photo, mask = png(18), mask_png()
    at = 0
    killed = True
    while killed:
        at += 1
        base = tmp_path / f"kill-{at}"
        base.mkdir()
        config = config_mod.load(write_config(base, tiny_model, inbox=FAST))
        root = config.path_for("inbox")
        root.mkdir()
        (root / "photo.png").write_bytes(photo)
        (root / "mask.png").write_bytes(mask)
        (root / "job.yaml").write_text(
            f"prompt: x\ninit_image: photo.png\nmask: mask.png\nsteps: {3 if valid else 500}\n"
        )
        killed = run_until_killed(config, at)
        check_next_start(config, valid, photo, mask, at)
    assert at > 8  # a file with two images takes that many steps at least


def test_images_claimed_before_a_crash_are_found_again(make_config):
    """State left by a kill after one image was moved into the claim, as start-up finds it."""
    config = make_config(inbox=FAST)
    daemon = Daemon(config)
    daemon.start(workers=False)
    root = config.path_for("inbox")
    inputs = root / ".claimed" / "inputs-1"
    inputs.mkdir(parents=True)
    photo, mask = png(19), mask_png()
    (inputs / "photo.png").write_bytes(photo)  # claimed before the kill
    (root / "mask.png").write_bytes(mask)  # not yet
    claimed = root / ".claimed" / "0123-job.yaml"
    claimed.write_text("prompt: x\ninit_image: photo.png\nmask: mask.png\n")
    assert daemon.store.create_claim("job.yaml", str(claimed), created_at=daemon.now_iso()) == 1
    box = Inbox(daemon, config)
    box.start()
    try:
        env = Env(daemon, box)
        receipt = env.wait_done("job.yaml")
        assert set(receipt["inputs"]) == {"photo.png", "mask.png"}
        spec = daemon.store.queued()[0].spec
        assert (spec.init_image, spec.mask) == (sha(photo), sha(mask))
        assert names(root / ".claimed") == [] and dropped(env) == []
    finally:
        box.stop()
        daemon.stop()
