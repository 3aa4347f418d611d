"""End to end through a real Samba server: put a prompt file on the inbox share, get the
image back from the outputs share, and find that the outputs share refuses deletes.

smbd runs in the foreground on 127.0.0.1:4450 with every state directory in a temp folder and
the share sections that ``imagineerd smb-conf`` prints. .ci/run installs Debian's samba and
smbclient; elsewhere the test is skipped when they are missing.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

from imagineerd import config as config_mod
from imagineerd import outputs
from imagineerd.daemon import Daemon
from imagineerd.inbox import Inbox
from imagineerd.smb import smb_conf

from .conftest import wait_for, write_config

SMBD = shutil.which("smbd") or "/usr/sbin/smbd"
PORT = 4450

if not (os.path.exists(SMBD) and shutil.which("smbclient")):
    if os.environ.get("CI"):
        raise RuntimeError("CI must install samba and smbclient (see .ci/run)")
    pytest.skip(
        "samba/smbclient not installed (apt install samba smbclient)", allow_module_level=True
    )


def smbclient(share: str, command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["smbclient", "-p", str(PORT), f"//127.0.0.1/{share}", "-N", "-c", command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def share_root(tiny_model: Path):
    # Guests are mapped to "nobody" when smbd runs as root: the folders must be traversable,
    # which pytest's private (0700) temp folders are not.
    root = Path(tempfile.mkdtemp(prefix="imagineerd-smb-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def samba(share_root: Path, tiny_model: Path):
    config_path = write_config(share_root, tiny_model, inbox={"settle_seconds": 0.3})
    config = config_mod.load(config_path)
    for name in ("inbox", "outputs"):
        config.path_for(name).mkdir(exist_ok=True)
    state = share_root / "smb-state"
    dirs = {name: state / name for name in ("lock", "state", "cache", "private", "pid", "log")}
    for folder in dirs.values():
        folder.mkdir(parents=True)
    user = getpass.getuser()
    # As root, guests become "nobody"; an unprivileged smbd can only be its own user.
    guest_account = "" if os.geteuid() == 0 else f"   guest account = {user}\n"
    global_section = f"""\
[global]
   server role = standalone server
   interfaces = 127.0.0.1
   bind interfaces only = yes
   smb ports = {PORT}
   map to guest = Bad User
{guest_account}   lock directory = {dirs["lock"]}
   state directory = {dirs["state"]}
   cache directory = {dirs["cache"]}
   private dir = {dirs["private"]}
   pid directory = {dirs["pid"]}
   ncalrpc dir = {state / "ncalrpc"}
   log file = {dirs["log"]}/log.%m
   load printers = no
   printcap name = /dev/null
   disable spoolss = yes
   server min protocol = SMB2
"""
    conf = state / "smb.conf"
    conf.write_text(global_section + "\n" + smb_conf(config, guest=True, user=user))
    proc = subprocess.Popen(
        [SMBD, "--foreground", "--no-process-group", "--debug-stdout", "-s", str(conf)],
        stdout=(state / "smbd.out").open("w"),
        stderr=subprocess.STDOUT,
        # smbd signals its whole process group when it stops: give it
        # its own, or it takes pytest down with it.
        start_new_session=True,
    )

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", PORT)) == 0

    try:
        try:
            wait_for(listening, 30, 0.1)
        except AssertionError:
            raise AssertionError((state / "smbd.out").read_text()[-3000:]) from None
        daemon = Daemon(config)
        daemon.start()
        inbox = Inbox(daemon, config)
        inbox.start()
        yield daemon, share_root
        inbox.stop()
        daemon.stop()
    finally:
        proc.terminate()
        proc.wait(20)


def test_prompt_file_over_smb_becomes_an_image_on_the_outputs_share(samba, tmp_path: Path):
    daemon, root = samba
    (tmp_path / "job.yaml").write_text("prompt: a lighthouse over the share\nseed: 7\n")
    put = smbclient("Imagineer-inbox", "put job.yaml", tmp_path)
    assert put.returncode == 0, put.stdout + put.stderr

    receipt_path = root / "inbox" / "done" / "job.result.yaml"
    wait_for(
        lambda: (
            receipt_path.exists()
            and yaml.safe_load(receipt_path.read_text())["jobs"][0]["status"] == "completed"
        ),
        90,
    )
    output = yaml.safe_load(receipt_path.read_text())["jobs"][0]["output"]
    name = Path(output).name

    # The receipt is readable from the inbox share, the image from the original product's path.
    got = smbclient("Imagineer-inbox", "get done/job.result.yaml receipt.yaml", tmp_path)
    assert got.returncode == 0, got.stdout + got.stderr
    assert "a lighthouse over the share" in (tmp_path / "receipt.yaml").read_text()
    got = smbclient("Imagineer", f"get outputs/{name} image.png", tmp_path)
    assert got.returncode == 0, got.stdout + got.stderr
    assert (tmp_path / "image.png").read_bytes() == (root / output).read_bytes()

    # Nobody deletes the gallery from Explorer, and the rest of the install stays hidden.
    deleted = smbclient("Imagineer", f"del outputs/{name}", tmp_path)
    assert (
        "NT_STATUS_ACCESS_DENIED" in deleted.stdout + deleted.stderr
        or "NT_STATUS_MEDIA_WRITE_PROTECTED" in deleted.stdout + deleted.stderr
    )
    assert (root / output).exists()
    listing = smbclient("Imagineer", "ls", tmp_path).stdout
    assert "outputs" in listing and "config.yaml" not in listing and "state" not in listing

    # Junk names cannot even be created on the inbox share.
    (tmp_path / "Thumbs.db").write_text("x")
    refused = smbclient("Imagineer-inbox", "put Thumbs.db", tmp_path)
    # smbclient returns once the server answered the create: refused, nothing written.
    assert "NT_STATUS_" in refused.stdout + refused.stderr
    assert not (root / "inbox" / "Thumbs.db").exists()


def test_bad_file_over_smb_comes_back_with_a_note(samba, tmp_path: Path):
    daemon, root = samba
    (tmp_path / "oops.txt").write_bytes(b"caf\xe9\n")
    assert smbclient("Imagineer-inbox", "put oops.txt", tmp_path).returncode == 0
    note = root / "inbox" / "failed" / "oops.error.txt"
    wait_for(note.exists, 30)
    got = smbclient("Imagineer-inbox", "get failed/oops.error.txt note.txt", tmp_path)
    assert got.returncode == 0
    assert "not UTF-8" in (tmp_path / "note.txt").read_text()


def test_the_trash_is_never_seen_nor_fetched_through_the_share(samba, tmp_path: Path):
    """An image deleted in the gallery waits in outputs/.trash/: the read-only share vetoes
    every hidden name, so nobody on the network sees it, lists it or copies it."""
    daemon, root = samba
    folder = root / "outputs"
    kept, gone = "20260101_000000_kept_1.png", "20260102_000000_trashed_2.png"
    for name in (kept, gone):
        outputs.save_png(Image.new("RGB", (8, 8)), folder, name, {})
    trashed, _, _ = daemon.gallery_index.trash([gone])
    assert trashed == [gone] and (folder / ".trash" / gone).is_file()

    listing = smbclient("Imagineer", "ls outputs/*", tmp_path)
    assert listing.returncode == 0, listing.stdout + listing.stderr
    assert kept in listing.stdout
    assert ".trash" not in listing.stdout and gone not in listing.stdout
    inside = smbclient("Imagineer", "ls outputs/.trash/*", tmp_path)
    assert gone not in inside.stdout and "NT_STATUS_" in inside.stdout + inside.stderr
    got = smbclient("Imagineer", f"get outputs/.trash/{gone} stolen.png", tmp_path)
    assert "NT_STATUS_" in got.stdout + got.stderr
    assert not (tmp_path / "stolen.png").exists()
    # The image left in place is still served, as before.
    fetched = smbclient("Imagineer", f"get outputs/{kept} kept.png", tmp_path)
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    assert (tmp_path / "kept.png").read_bytes() == (folder / kept).read_bytes()
