"""Shared fixtures: real tiny models, real config files, real daemons on temp folders."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml

from imagineerd import config as config_mod
from imagineerd.daemon import Daemon

# Keep torch from grabbing both cores per process and from probing the network for models.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


#: The slow tier: several processes, a real browser, a real smbd, long fuzzing, benchmarks.
#: ``./run_tests.sh -m "not slow"`` leaves them out while iterating; CI runs everything.
SLOW_MODULES = {
    "test_crash",
    "test_smb",
    "test_ui",
    "test_ui_flows",
    "test_security_browser",
    "test_http_fuzz",
    "test_load_scripts",
    "test_benchmark",
    "test_metrics_prometheus",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if "postgres_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)


#: The PostgreSQL server the ``postgres`` tests use: its maintenance database, as a user that
#: may create databases. Each test session makes its own databases there and drops them.
POSTGRES_SERVER = os.environ.get(
    "IMAGINEERD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _postgres_admin():
    """An autocommit connection to POSTGRES_SERVER; skips the test when there is none (fails
    it in CI, which has one: a missing server must not pass as skipped tests)."""
    import psycopg

    try:
        return psycopg.connect(POSTGRES_SERVER, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        from imagineerd.stores import redact

        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = (
            f"no PostgreSQL server at {redact(POSTGRES_SERVER)} ({reason}); set "
            "IMAGINEERD_TEST_POSTGRES to a postgresql:// URL of a user who may create databases"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@contextlib.contextmanager
def make_postgres_database() -> Iterator[str]:
    """A new empty PostgreSQL database, as a ``postgresql://`` URL, dropped afterwards
    (with any connection still open to it): one per test session, or one per process of a
    multi-node test."""
    from urllib.parse import urlsplit, urlunsplit

    name = f"imagineerd_test_{os.getpid()}_{secrets.token_hex(4)}"
    with _postgres_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(POSTGRES_SERVER)._replace(path="/" + name))
    finally:
        with _postgres_admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of a PostgreSQL database of this test session (tests that share it empty it
    first: ``reset_postgres``)."""
    with make_postgres_database() as url:
        yield url


def reset_postgres(url: str) -> None:
    """Drop every table of the database at ``url``: the next store opened there starts on
    a fresh schema, its ids from 1."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        db.execute("DROP SCHEMA public CASCADE")
        db.execute("CREATE SCHEMA public")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight SD1.5 pipeline in diffusers' folder format."""
    from imagineerd.backends.testmodel import make_test_model

    return make_test_model(tmp_path_factory.mktemp("models") / "tiny-sd15", arch="sd15")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from imagineerd.backends.testmodel import make_test_model

    return make_test_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", arch="sdxl")


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder as users keep one, of tiny random-weight *files* in the community's
    formats (original-layout checkpoints, kohya LoRAs, A1111 embeddings, VAE files): two
    SD1.5 checkpoints, one SDXL, a LoRA, an embedding and a VAE for each. Read only: a test
    that changes it works on a copy."""
    from imagineerd.backends import test_files as tf

    root = tmp_path_factory.mktemp("user-models")
    tf.make_test_checkpoint(root / "checkpoints" / "alpha.safetensors", arch="sd15", seed=1)
    tf.make_test_checkpoint(root / "checkpoints" / "beta.safetensors", arch="sd15", seed=2)
    tf.make_test_checkpoint(root / "checkpoints" / "xl" / "gamma.safetensors", arch="sdxl", seed=3)
    tf.make_test_lora(root / "loras" / "detail.safetensors", arch="sd15", seed=4)
    tf.make_test_lora(root / "loras" / "xl-style.safetensors", arch="sdxl", seed=5)
    tf.make_test_embedding(root / "embeddings" / "shiny.safetensors", arch="sd15", seed=6)
    tf.make_test_embedding(root / "embeddings" / "glossy.safetensors", arch="sdxl", seed=7)
    tf.make_test_vae(root / "vae" / "soft.safetensors", arch="sd15", seed=8)
    tf.make_test_vae(root / "vae" / "xl-vae.safetensors", arch="sdxl", seed=9)
    return root


def write_config(directory: Path, model_path: Path | str, **sections: dict[str, Any]) -> Path:
    """A config.yaml in ``directory`` for fast CPU runs: 64x64, 2 steps, given model."""
    data: dict[str, Any] = {
        "model": {"name": str(model_path), "device": "cpu"},
        "generation": {"width": 64, "height": 64, "steps": 2},
        "server": {"host": "127.0.0.1", "port": 0},
        "inbox": {"enabled": False},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def make_config(tmp_path: Path, tiny_model: Path) -> Callable[..., config_mod.Config]:
    def make(**sections: dict[str, Any]) -> config_mod.Config:
        return config_mod.load(write_config(tmp_path, tiny_model, **sections))

    return make


@pytest.fixture
def daemon(make_config: Callable[..., config_mod.Config]) -> Iterator[Daemon]:
    """A started daemon with one worker on the tiny model; always stopped."""
    d = Daemon(make_config())
    d.start()
    try:
        yield d
    finally:
        d.stop()


def record_fsyncs(monkeypatch) -> list[os.stat_result]:
    """Make os.fsync record what each call was for (a stat of its descriptor)."""
    calls: list[os.stat_result] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(os.fstat(fd))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.02) -> Any:
    """Poll until ``predicate()`` is truthy; fail the test with a clear message otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def wait_finished(d: Daemon, job_id: int, timeout: float = 60.0):
    return wait_for(lambda: (j := d.job(job_id)).finished and j, timeout)


class Api:
    """A real daemon plus a real Waitress server on a loopback port."""

    def __init__(self, daemon: Daemon, service: Any) -> None:
        import requests

        self.daemon = daemon
        self.service = service
        self.url = service.url
        self.http = requests.Session()

    def __call__(self, method: str, path: str, **kwargs: Any):
        kwargs.setdefault("timeout", 30)
        return self.http.request(method, self.url + path, **kwargs)

    def wait_job(self, job_id: int, timeout: float = 60.0) -> dict:
        return wait_for(
            lambda: (
                (body := self("GET", f"/api/jobs/{job_id}").json())["status"]
                in ("completed", "failed", "cancelled")
                and body
            ),
            timeout,
        )


@pytest.fixture
def start_api(make_config: Callable[..., config_mod.Config]) -> Iterator[Callable[..., Api]]:
    from imagineerd.http.server import HttpService

    started: list[tuple[Daemon, Any]] = []

    def start(
        workers: bool = True, config: config_mod.Config | None = None, **sections: dict[str, Any]
    ) -> Api:
        """``config``: an existing configuration to serve instead of a new one."""
        if config is None:
            config = make_config(**sections)
        daemon = Daemon(config)
        daemon.start(workers=workers)
        service = HttpService(daemon, config)
        service.start()
        started.append((daemon, service))
        return Api(daemon, service)

    yield start
    for daemon, service in reversed(started):
        service.stop()
        daemon.stop()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """``tmpfs(name, size)``: a small tmpfs mounted at ``tmp_path/name``, to fill a disk for
    real (needs root, as in CI; skipped elsewhere). Unmounted after the test."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            message = f"cannot mount a tmpfs here ({result.stderr.strip()})"
            if os.environ.get("CI"):  # CI runs as root: there a full disk is tested for real
                pytest.fail(message)
            pytest.skip(message)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


@pytest.fixture
def api(start_api: Callable[..., Api]) -> Api:
    return start_api()


class Kill(BaseException):
    """Stands in for kill -9: nothing after it runs (not an Exception, so no handler in the
    inbox catches it; the thread just ends)."""


class Killer:
    """Counts every step of the inbox's thread that changes the disk or the store; kills it
    just before step ``at`` (the crash tests try every ``at`` until one finishes)."""

    STORE = (
        "create_claim",
        "create_claims",
        "update_claim",
        "update_claims",
        "submit_claim",
        "submit_claims",
        "delete_claim",
    )
    OS = ("rename", "replace", "mkdir", "rmdir")

    def __init__(self, at: int, patch: pytest.MonkeyPatch, store: Any) -> None:
        self.at, self.steps, self.armed, self.killed = at, 0, True, False
        for name in self.OS:
            patch.setattr(os, name, self.wrap(getattr(os, name)))
        for name in self.STORE:
            patch.setattr(store, name, self.wrap(getattr(store, name)))

    def wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            if self.armed and threading.current_thread().name == "imagineerd-inbox":
                self.steps += 1
                if self.steps == self.at:
                    self.armed, self.killed = False, True
                    raise Kill
            return real(*args, **kwargs)

        return step


def run_inbox_until_killed(config: Any, at: int, finished: Callable[[Any], bool]) -> bool:
    """Start a daemon (no worker) and its inbox on ``config`` and let the inbox take what is
    there, killed before its step ``at`` (:class:`Killer`), or until ``finished(root)``;
    whether it was killed."""
    from imagineerd.inbox import Inbox

    root = config.path_for("inbox")
    daemon = Daemon(config)
    daemon.start(workers=False)
    with pytest.MonkeyPatch.context() as patch:
        killer = Killer(at, patch, daemon.store)
        box = Inbox(daemon, config)
        box.start()
        try:
            wait_for(lambda: killer.killed or finished(root), 20)
            wait_for(lambda: killer.killed or daemon.store.open_claims() == [], 20)
        finally:
            killer.armed = False
            box.stop()
            daemon.stop()
    return killer.killed


# -- PostgreSQL faults ---------------------------------------------------------------------
def with_address(url: str, host: str, port: int, password: str | None = None) -> str:
    parts = urlsplit(url)
    user = parts.username or ""
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    return urlunsplit(parts._replace(netloc=f"{auth}{host}:{port}"))


class Relay:
    """A TCP relay to the PostgreSQL server that can be cut (every connection through it
    closed, new ones dropped at once) and restored: a network outage, or a server restart,
    without touching the server other tests use."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            server = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up = False
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self.sockets.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()
