"""Several real ``imagineerd serve`` nodes on one PostgreSQL queue, one outputs folder and
one inbox: every job runs exactly once, all nodes work, a node killed with kill -9 loses its
job to another after the lease, events and interrupts cross nodes, inbox files are taken
once. And one node whose database connection is cut: 503, then it carries on."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from imagineerd import outputs
from imagineerd.jobs import CANCELLED, COMPLETED, RUNNING

from .conftest import Relay, make_postgres_database, wait_for, with_address, write_config

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One ``imagineerd serve`` process of the cluster."""

    def __init__(self, root: Path, name: str, config: Path, port: int) -> None:
        self.root, self.name, self.config, self.port = root, name, config, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = root / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imagineerd", "serve", "--config", str(self.config)],
            env=env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return requests.get(self.url + path, **kwargs)

    def post(self, path: str, body: Any = None) -> requests.Response:
        return requests.post(self.url + path, json={} if body is None else body, timeout=30)

    def ready(self) -> bool:
        try:
            health = self.get("/api/health").json()
        except requests.RequestException:
            return False
        return bool(health["workers"]) and health["workers"][0]["state"] == "ready"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                assert self.proc.wait(60) == 0, self.log.read_text()[-3000:]
            finally:
                self.kill()


class Cluster:
    def __init__(self, root: Path, model: Path, url: str, count: int, **sections: Any) -> None:
        self.root, self.url = root, url
        self.outputs = root / "outputs"  # shared by every node, as on a NAS
        self.inbox = root / "inbox"
        self.nodes: list[Node] = []
        for index in range(count):
            name = f"node-{index}"
            folder = root / name
            folder.mkdir(parents=True)
            port = free_port()
            config = write_config(
                folder,
                model,
                server={"host": "127.0.0.1", "port": port},
                paths={
                    "outputs": str(self.outputs),
                    "inbox": str(self.inbox),
                    "state": str(folder / "state"),
                },
                queue={"database": url, "node_name": name, "lease_seconds": 3},
                **sections,
            )
            self.nodes.append(Node(root, name, config, port))

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            wait_for(node.ready, timeout=240, interval=0.2)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def job(self, job_id: int) -> dict:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                return node.get(f"/api/jobs/{job_id}").json()
        raise AssertionError("no node is running")

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.log.read_text()[-2000:]}" for n in self.nodes)


@contextlib.contextmanager
def cluster(tmp_path: Path, model: Path, count: int, **sections: Any) -> Iterator[Cluster]:
    with make_postgres_database() as url:
        nodes = Cluster(tmp_path, model, url, count, **sections)
        try:
            nodes.start()
            yield nodes
        except BaseException:
            print(nodes.logs())
            raise
        finally:
            for node in nodes.nodes:
                node.kill()


def read_events(resp: requests.Response, until: Any) -> list[dict]:
    """The events of an SSE response as ``{"event_id", "type", **data}`` until ``until(seen)``."""
    seen: list[dict] = []
    event_id = kind = None
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("id:"):
            event_id = int(line.split(":", 1)[1])
        elif line.startswith("event:"):
            kind = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data = json.loads(line.split(":", 1)[1])
            seen.append({"event_id": event_id, "type": kind, **data})
            if until(seen):
                break
    return seen


def completions(events: list[dict]) -> int:
    return sum(e["type"] == "job.completed" for e in events)


def images_of(folder: Path, job_id: int) -> list[Path]:
    return sorted(folder.rglob(f"*_{job_id}.png"))


def test_three_nodes_run_sixty_jobs_exactly_once_and_share_events(tmp_path, tiny_model):
    """60 jobs submitted round-robin to 3 nodes: each completed once, one PNG each, by all
    three nodes. Meanwhile node A's event stream shows progress of jobs other nodes run,
    and any node answers for any job."""
    with cluster(tmp_path, tiny_model, 3) as c:
        a = c.nodes[0]
        seen: list[dict] = []
        stream_open = threading.Event()

        def listen() -> None:
            with a.get("/api/events", stream=True, timeout=120) as resp:
                stream_open.set()
                seen.extend(read_events(resp, lambda events: completions(events) >= 60))

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        assert stream_open.wait(30)
        ids = []
        for i in range(60):
            resp = c.nodes[i % 3].post("/api/generate", {"prompt": f"job {i}", "seed": i})
            assert resp.status_code == 201, resp.text
            ids.append(resp.json()["id"])
        assert len(set(ids)) == 60
        wait_for(lambda: all(c.job(i)["status"] == COMPLETED for i in ids), timeout=600)
        jobs = {i: c.nodes[(i + 1) % 3].get(f"/api/jobs/{i}").json() for i in ids}
        assert {j["node"] for j in jobs.values()} == {"node-0", "node-1", "node-2"}
        assert all(j["attempts"] == 1 for j in jobs.values())
        for job_id, job in jobs.items():
            found = images_of(c.outputs, job_id)
            assert len(found) == 1 and found[0].name == Path(job["output_path"]).name
            assert outputs.read_metadata(found[0])["imagineerd"]["id"] == job_id
        assert len(list(c.outputs.rglob("*.png"))) == 60
        # Node A's stream carried every completion and progress of jobs it did not run.
        listener.join(60)
        completed = {e["id"] for e in seen if e["type"] == "job.completed"}
        assert completed == set(ids)
        progress_elsewhere = {
            e["id"] for e in seen if e["type"] == "job.progress" and jobs[e["id"]]["node"] != a.name
        }
        assert progress_elsewhere
        # A browser that was on node A and reconnects to node B with the last id it saw
        # replays from there: the same events, in the same order, with the same ids.
        middle = [e for e in seen if e["type"] == "job.completed"][29]["event_id"]
        later = [e for e in seen if e["event_id"] > middle and e["type"] != "job.progress"]
        with c.nodes[1].get(
            "/api/events", stream=True, timeout=60, headers={"Last-Event-ID": str(middle)}
        ) as resp:
            replayed = read_events(resp, lambda events: completions(events) >= 30)
        assert [(e["event_id"], e["type"]) for e in replayed if e["type"] != "job.progress"][
            : len(later)
        ] == [(e["event_id"], e["type"]) for e in later]
        health = a.get("/api/health").json()
        assert [n["name"] for n in health["nodes"]] == ["node-0", "node-1", "node-2"]
        assert all(n["state"] == "running" for n in health["nodes"])
        # Positions are global: the queue is empty for every node.
        assert all(n.get("/api/health").json()["queue_size"] == 0 for n in c.nodes)
        c.nodes[2].stop()
        # A node that stopped says so in the others' health until it starts again.
        nodes = {n["name"]: n for n in a.get("/api/health").json()["nodes"]}
        assert nodes["node-2"]["state"] == "stopped"
        c.stop()


def test_interrupt_and_cancel_cross_nodes_and_files_are_taken_once(tmp_path, tiny_model):
    """Node B interrupts a job node A runs, and cancels one queued on A; 12 inbox files
    on the folder all three nodes watch give each of their jobs once."""
    with cluster(
        tmp_path,
        tiny_model,
        3,
        inbox={"enabled": True, "polling": True, "settle_seconds": 0.2, "rescan_seconds": 1.0},
    ) as c:
        long = c.nodes[0].post("/api/generate", {"prompt": "long", "steps": 150}).json()["id"]
        running = wait_for(
            lambda: (j := c.job(long))["status"] == RUNNING and j.get("node") and j, timeout=60
        )
        other = next(n for n in c.nodes if n.name != running["node"])
        t0 = time.monotonic()
        assert other.post(f"/api/jobs/{long}/interrupt").status_code == 202
        done = wait_for(lambda: (j := c.job(long))["status"] != RUNNING and j, timeout=30)
        assert done["status"] == CANCELLED
        # Seen by the owning node at its next lease renewal (twice a second), then one step.
        assert time.monotonic() - t0 < 10
        assert not images_of(c.outputs, long)
        queued = other.post("/api/generate", {"prompt": "to cancel", "steps": 150}).json()["id"]
        owner = next(n for n in c.nodes if n is not other)
        cancel = requests.delete(f"{owner.url}/api/jobs/{queued}", timeout=30)
        if cancel.status_code == 409:  # a worker took it first: interrupt instead
            assert owner.post(f"/api/jobs/{queued}/interrupt").status_code == 202
        else:
            assert cancel.status_code == 200, cancel.text
        assert wait_for(lambda: c.job(queued)["status"] == CANCELLED, timeout=30)

        names = [f"drop-{n:02}.txt" for n in range(12)]
        for name in names:
            tmp = c.inbox / f".{name}.part"
            tmp.write_text(f"{name} first\n{name} second\n")
            tmp.rename(c.inbox / name)
        wait_for(lambda: all((c.inbox / "done" / n).exists() for n in names), timeout=300)
        jobs = c.nodes[0].get("/api/jobs", params={"limit": 200}).json()
        every = jobs["history"] + jobs["queued"] + jobs["running"]
        prompts = sorted(j["prompt"] for j in every if j["source"] == "inbox")
        assert prompts == sorted(f"{n} {k}" for n in names for k in ("first", "second"))
        assert not list(c.inbox.glob("*.txt"))
        assert not list(c.inbox.glob("failed/*"))


def test_kill_9_of_a_node_mid_job_hands_its_job_to_another(tmp_path, tiny_model):
    """The killed node's job goes back after its lease (3 s) and completes on the other
    node: one completed job, two attempts, exactly one PNG."""
    with cluster(tmp_path, tiny_model, 2) as c:
        job_id = c.nodes[0].post("/api/generate", {"prompt": "mid", "steps": 60}).json()["id"]
        running = wait_for(
            lambda: (
                (j := c.job(job_id))["status"] == RUNNING
                and j.get("progress", {}).get("step", 0) > 0
                and j
            ),
            timeout=60,
            interval=0.05,
        )
        victim = next(n for n in c.nodes if n.name == running["node"])
        survivor = next(n for n in c.nodes if n is not victim)
        victim.kill()
        done = wait_for(
            lambda: (j := survivor.get(f"/api/jobs/{job_id}").json())["status"] == COMPLETED and j,
            timeout=180,
        )
        assert done["node"] == survivor.name and done["attempts"] == 2
        assert len(images_of(c.outputs, job_id)) == 1
        nodes = {n["name"]: n for n in survivor.get("/api/health").json()["nodes"]}
        assert nodes[victim.name]["state"] == "unreachable"
        survivor.stop()


def test_database_lost_while_running_answers_503_then_carries_on(tmp_path, start_api):
    """The connection to PostgreSQL is cut mid-job: the API answers 503 naming the
    database, the running job's result waits; once the database is back the job completes,
    new jobs are taken, and nothing is lost or doubled."""
    with make_postgres_database() as url:
        proxy = Relay(url)
        via = with_address(url, "127.0.0.1", proxy.port)
        api = start_api(queue={"database": via, "node_name": "solo", "lease_seconds": 3})
        first = api("POST", "/api/generate", json={"prompt": "before", "steps": 40}).json()["id"]
        wait_for(lambda: api("GET", f"/api/jobs/{first}").json()["status"] == RUNNING)
        proxy.cut()
        # (A Response is falsy when its status is an error: wait for its body instead.)
        body = wait_for(
            lambda: (r := api("GET", "/api/jobs")).status_code == 503 and r.json(), timeout=30
        )
        assert "database" in body["error"]
        post = api("POST", "/api/generate", json={"prompt": "while down"})
        assert post.status_code == 503, post.text
        time.sleep(2)
        proxy.restore()
        second = wait_for(
            lambda: (
                (r := api("POST", "/api/generate", json={"prompt": "after"})).status_code == 201
                and r.json()["id"]
            ),
            timeout=60,
        )
        for job_id in (first, second):
            assert api.wait_job(job_id, timeout=120)["status"] == COMPLETED
        out = api.daemon.outputs_dir
        assert len(images_of(out, first)) == 1 and len(images_of(out, second)) == 1
