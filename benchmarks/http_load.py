"""Bounded HTTP load against a real server on loopback.

    python benchmarks/http_load.py --clients 50 --seconds 30 --history 100000
    python benchmarks/http_load.py --clients 50 --seconds 30 --history 100000 --rate 4
    python benchmarks/http_load.py ... --postgres postgresql://postgres@127.0.0.1:5432/postgres

N client threads for a fixed time mix: submit (10%), job status (40%), job list (20%),
outputs list (20%) and opening the event stream (10%, read its first bytes, close). The
store is first filled with --history finished jobs, so job status is measured with a big
table. Reports requests/s, p50/p99 latency per kind and errors (which must be 0).

By default each client sends its next request as soon as the last is answered (a closed
loop): that measures how many requests the server can answer, and its latencies are
mostly the time requests wait for each other (with N clients, mean latency = N / rate
answered). With --rate each client sends requests at random moments, --rate per second on
average (Poisson), whatever the answers take, and latency is counted from the moment each
request was due: the latency of the server at that offered load.

With --postgres the server keeps its queue in a throw-away PostgreSQL database created
(and dropped) on that server, instead of its own SQLite file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import Server, throwaway_postgres, tiny_model  # noqa: E402

MIX = [("submit", 10), ("status", 40), ("list", 20), ("outputs", 20), ("events", 10)]


HISTORY_SPEC = json.dumps(
    {
        "prompt": "history",
        "negative_prompt": "",
        "seed": 1,
        "steps": 1,
        "width": 64,
        "height": 64,
        "guidance_scale": 7.5,
        "scheduler": "euler",
    }
)
HISTORY_SQL = (
    "INSERT INTO jobs (seq, status, spec, submitted_at, completed_at, duration_seconds)"
    " VALUES ({0}, 'completed', {0}, '2026-01-01T00:00:00.000000',"
    " '2026-01-01T00:00:01.000000', 1.0)"
)


def fill_history(database: str | Path, count: int) -> None:
    """``count`` finished jobs, written straight into the store (an SQLite file, or a
    PostgreSQL URL) while no server runs."""
    rows = [(i, HISTORY_SPEC) for i in range(1, count + 1)]
    if isinstance(database, str):
        import psycopg

        with psycopg.connect(database) as db, db.cursor() as cur:
            cur.executemany(HISTORY_SQL.format("%s"), rows)
            # Later jobs come after these in the queue's order.
            cur.execute("SELECT setval('jobs_queue_seq', %s)", (count + 1,))
        return
    db = sqlite3.connect(database)
    with db:
        db.executemany(HISTORY_SQL.format("?"), rows)
    db.close()


def client(
    url: str,
    until: float,
    max_id: int,
    rng: random.Random,
    results: list,
    errors: list,
    rate: float = 0.0,
) -> None:
    session = requests.Session()
    kinds = [k for k, w in MIX for _ in range(w)]
    due = time.perf_counter() + (rng.expovariate(rate) if rate else 0.0)
    while time.monotonic() < until:
        kind = rng.choice(kinds)
        if rate:
            time.sleep(max(0.0, min(due - time.perf_counter(), until - time.monotonic())))
            if time.monotonic() >= until:
                break
            # From when it was due: a request sent late because the last answer was slow
            # counts that wait too (else a slow server would be measured less often).
            start, due = due, due + rng.expovariate(rate)
        else:
            start = time.perf_counter()
        try:
            if kind == "submit":
                r = session.post(url + "/api/generate", json={"prompt": "load test"}, timeout=30)
                ok = r.status_code == 201
            elif kind == "status":
                r = session.get(f"{url}/api/jobs/{rng.randint(1, max_id)}", timeout=30)
                ok = r.status_code == 200
            elif kind == "list":
                r = session.get(url + "/api/jobs?limit=50", timeout=30)
                ok = r.status_code == 200
            elif kind == "outputs":
                r = session.get(url + "/api/outputs?limit=50", timeout=30)
                ok = r.status_code == 200
            else:
                with session.get(url + "/api/events", stream=True, timeout=30) as r:
                    ok = r.status_code == 200 and bool(next(r.iter_content(64), b""))
                    if r.status_code == 503:  # the stream cap doing its job, not an error
                        ok = True
            if not ok:
                errors.append((kind, r.status_code, r.text[:200]))
        except requests.RequestException as exc:
            errors.append((kind, "exception", str(exc)[:200]))
        results.append((kind, time.perf_counter() - start))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--history", type=int, default=100_000)
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="requests per second per client, at random moments (default: closed loop)",
    )
    parser.add_argument(
        "--postgres",
        default="",
        help="a PostgreSQL server where a throw-away queue database is made (default: SQLite)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="imagineerd-load-"))
        work = Path(tmp)
        database = stack.enter_context(throwaway_postgres(args.postgres)) if args.postgres else ""
        server = Server(work, tiny_model(work), queue={"database": database})
        (work / "state").mkdir()
        server.start()
        server.stop()  # creates the database; fill it while nothing runs
        fill_history(database or work / "state" / "imagineerd.db", args.history)
        server.start()
        try:
            probe = [time.perf_counter()]
            for job_id in (1, args.history // 2, args.history):
                t = time.perf_counter()
                requests.get(f"{server.url}/api/jobs/{job_id}", timeout=30).raise_for_status()
                probe.append(time.perf_counter() - t)
            results: list = []
            errors: list = []
            until = time.monotonic() + args.seconds
            threads = [
                threading.Thread(
                    target=client,
                    args=(
                        server.url,
                        until,
                        args.history,
                        random.Random(i),
                        results,
                        errors,
                        args.rate,
                    ),
                )
                for i in range(args.clients)
            ]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - started
            healthy = requests.get(server.url + "/api/health", timeout=30).json()["status"]
        finally:
            exit_code = server.stop()
    per_kind = {}
    for kind, _ in MIX:
        times = [d for k, d in results if k == kind]
        per_kind[kind] = {
            "requests": len(times),
            "p50_ms": float(np.percentile(times, 50) * 1000) if times else None,
            "p99_ms": float(np.percentile(times, 99) * 1000) if times else None,
        }
    all_times = [d for _, d in results]
    report = {
        "store": "postgres" if args.postgres else "sqlite",
        "clients": args.clients,
        "offered_per_second": args.clients * args.rate if args.rate else None,
        "seconds": elapsed,
        "history_jobs": args.history,
        "requests": len(results),
        "requests_per_second": len(results) / elapsed,
        "p50_ms": float(np.percentile(all_times, 50) * 1000),
        "p99_ms": float(np.percentile(all_times, 99) * 1000),
        "errors": len(errors),
        "error_samples": errors[:5],
        "per_kind": per_kind,
        "job_status_ms_with_history": [round(t * 1000, 2) for t in probe[1:]],
        "healthy_after": healthy,
        "clean_exit": exit_code == 0,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    offered = f" (offered {args.clients * args.rate:.0f}/s)" if args.rate else " (closed loop)"
    print(
        f"{report['requests']} requests in {elapsed:.1f} s = "
        f"{report['requests_per_second']:.0f} req/s{offered}; p50 {report['p50_ms']:.1f} ms, "
        f"p99 {report['p99_ms']:.1f} ms; errors {report['errors']}"
    )
    for kind, numbers in per_kind.items():
        print(
            f"  {kind:8} {numbers['requests']:6} requests  p50 {numbers['p50_ms']:.1f} ms  "
            f"p99 {numbers['p99_ms']:.1f} ms"
        )
    print(
        f"job status with {args.history} jobs in the store: "
        f"{report['job_status_ms_with_history']} ms (first, middle, last id)"
    )
    return 0 if not errors and healthy == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
