"""Claims per second and claim latency of the job stores, SQLite vs PostgreSQL, in one run.

    python benchmarks/store.py --jobs 2000 --claimers 1 4 16 \\
        --postgres postgresql://postgres@127.0.0.1:5432/postgres

For each store and each number of concurrent claimers (threads, each with its own store
object, as separate nodes would have), the queue is filled with ``--jobs`` jobs and the
claimers take them one batch at a time (``claim_batch`` with the daemon's batching rule)
and finish each at once, until the queue is empty. Reports claims/s, p50/p99 claim
latency, and checks that every job was claimed exactly once. The PostgreSQL database is a
throw-away one created (and dropped) on the given server.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from imagineerd import config as config_mod  # noqa: E402
from imagineerd.jobs import COMPLETED, validate  # noqa: E402
from imagineerd.sqlite_store import SQLiteStore  # noqa: E402
from imagineerd.store import Store  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import throwaway_postgres  # noqa: E402

T = "2026-01-01T00:00:00.000000"


def run(open_store: Callable[[], Store], jobs: int, claimers: int, batch: int) -> dict:
    defaults = config_mod.DEFAULTS["generation"]
    filler = open_store()
    # Two kinds of jobs interleaved, so batching must look past the head.
    specs = [
        validate({"prompt": f"p{i}", "seed": i, "steps": 20 + i % 2}, defaults) for i in range(jobs)
    ]
    filler.add_many(specs, submitted_at=T)
    stores = [open_store() for _ in range(claimers)]
    latencies: list[list[float]] = [[] for _ in range(claimers)]
    claimed: list[list[int]] = [[] for _ in range(claimers)]
    start = threading.Barrier(claimers + 1)

    def claimer(index: int) -> None:
        store = stores[index]
        start.wait()
        while True:
            t0 = time.perf_counter()
            got = store.claim_batch(
                started_at=T,
                limit=batch,
                key=lambda spec: spec.steps,
                node=f"bench-{index}",
                lease_seconds=30,
            )
            latencies[index].append(time.perf_counter() - t0)
            if not got:
                return
            for job in got:
                store.finish(job.id, COMPLETED, completed_at=T, token=job.token)
                claimed[index].append(job.id)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(claimers)]
    for thread in threads:
        thread.start()
    start.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t0
    ids = [job_id for ids in claimed for job_id in ids]
    claims = sum(len(lat) - 1 for lat in latencies)  # the last call of each found nothing
    lat_ms = np.array([x for lat in latencies for x in lat[:-1]]) * 1000
    for store in (*stores, filler):
        store.close()
    return {
        "claimers": claimers,
        "jobs": jobs,
        "batch": batch,
        "claims": claims,
        "claims_per_s": round(claims / elapsed, 1),
        "jobs_per_s": round(len(ids) / elapsed, 1),
        "claim_p50_ms": round(float(np.percentile(lat_ms, 50)), 2),
        "claim_p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
        "exactly_once": len(ids) == len(set(ids)) == jobs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--claimers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batch", type=int, default=4, help="jobs per claim at most")
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a server where a throw-away database may be created ('' to skip)",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for claimers in args.claimers:
            path = Path(tmp) / f"bench-{claimers}.db"
            row = run(lambda p=path: SQLiteStore(p), args.jobs, claimers, args.batch)
            results.append({"store": "sqlite", **row})
            print(json.dumps(results[-1]), flush=True)
    if args.postgres:
        from imagineerd.pg_store import PostgresStore

        for claimers in args.claimers:
            with throwaway_postgres(args.postgres) as url:
                row = run(lambda u=url: PostgresStore(u), args.jobs, claimers, args.batch)
            results.append({"store": "postgres", **row})
            print(json.dumps(results[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["exactly_once"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
