"""Shared by the load benchmarks: a real ``imagineerd serve`` process on a loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_model(cache: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from imagineerd.backends.testmodel import make_test_model

    model = cache / "tiny-sd15"
    if not (model / "model_index.json").exists():
        make_test_model(model)
    return model


@contextlib.contextmanager
def throwaway_postgres(server: str) -> Iterator[str]:
    """The URL of a new, empty database on the PostgreSQL ``server``, dropped afterwards."""
    import psycopg

    name = f"imagineerd_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Server:
    """``imagineerd serve`` in a subprocess: the load comes from another process, as in life."""

    def __init__(self, workdir: Path, model: Path, **sections: dict) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "server": {
                "host": "127.0.0.1",
                "port": self.port,
                "threads": 64,
                "max_event_streams": 16,
            },
            "model": {"name": str(model), "device": "cpu"},
            "generation": {"width": 64, "height": 64, "steps": 1},
            "inbox": {"enabled": False},
        }
        for name, values in sections.items():
            config.setdefault(name, {}).update(values)
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> Server:
        log = (self.workdir / "serve.log").open("ab")
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "imagineerd",
                "--log-level",
                "warning",
                "serve",
                "--config",
                str(self.config_path),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                health = requests.get(self.url + "/api/health", timeout=2).json()
                if health["backend"]["state"] == "ready":
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError("the server did not become ready")

    def rss_mib(self) -> float:
        """Resident memory of the server process, from /proc."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9
