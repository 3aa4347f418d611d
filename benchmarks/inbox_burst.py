"""A burst of prompt files dropped into the inbox of a real server.

    python benchmarks/inbox_burst.py --files 1000
    python benchmarks/inbox_burst.py --files 1000 --postgres postgresql://postgres@127.0.0.1:5432/postgres

Every file (one prompt each, written under a hidden name and renamed into place, as a
network copy does) must give exactly one job. Reports the time from drop to queued
(p50/p99), to the last file's jobs queued, and to all files taken (every receipt written).
With --postgres the queue is a throw-away PostgreSQL database on that server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import Server, throwaway_postgres, tiny_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument(
        "--postgres",
        default="",
        help="a PostgreSQL server where a throw-away queue database is made (default: SQLite)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imagineerd-burst-")))
        database = stack.enter_context(throwaway_postgres(args.postgres)) if args.postgres else ""
        inbox = work / "inbox"
        inbox.mkdir()
        server = Server(
            work,
            tiny_model(work),
            inbox={"enabled": True, "settle_seconds": 0.5, "rescan_seconds": 5},
            queue={"database": database},
        )
        server.start()
        dropped: dict[str, float] = {}
        try:
            start = time.time()
            for i in range(args.files):
                name = f"burst-{i:05}.txt"
                part = inbox / f".{name}.part"
                part.write_text(f"burst prompt {i}\n")
                part.rename(inbox / name)
                dropped[name] = time.time()
            deadline = time.monotonic() + 600
            done = inbox / "done"
            while len(list(done.glob("*.result.yaml"))) < args.files:
                if time.monotonic() > deadline:
                    raise TimeoutError("not every file was taken")
                time.sleep(0.5)
            all_taken = time.time() - start
            # Every job the API knows, queued, running or finished. Jobs move on while the
            # pages are read (a queued job may turn up again in a later history page), so
            # jobs are keyed by id: a file counts once per distinct job.
            jobs: dict[int, dict] = {}
            before = None
            while True:
                body = requests.get(
                    server.url + "/api/jobs",
                    timeout=60,
                    params={"limit": 500, **({"before": before} if before else {})},
                ).json()
                page = body["history"]
                if before is None:
                    page += body["running"] + body["queued"]
                jobs.update((job["id"], job) for job in page)
                before = body["next_before"]
                if before is None:
                    break
        finally:
            server.stop()
    by_file: dict[str, list] = {}
    for job in jobs.values():
        by_file.setdefault(job.get("source_name"), []).append(job)
    delays = [
        datetime.fromisoformat(v[0]["submitted_at"]).timestamp() - dropped[k]
        for k, v in by_file.items()
        if k in dropped
    ]
    queued_at = [
        datetime.fromisoformat(v[0]["submitted_at"]).timestamp()
        for k, v in by_file.items()
        if k in dropped
    ]
    exactly_once = sorted(by_file) == sorted(dropped) and all(len(v) == 1 for v in by_file.values())
    report = {
        "store": "postgres" if args.postgres else "sqlite",
        "files": args.files,
        "jobs": len(jobs),
        "exactly_once": exactly_once,
        "drop_to_queued_p50_s": float(np.percentile(delays, 50)),
        "drop_to_queued_p99_s": float(np.percentile(delays, 99)),
        "all_queued_s": max(queued_at) - start,
        "all_taken_s": all_taken,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(
        f"{args.files} files -> {len(jobs)} jobs, exactly once: {exactly_once}; drop to "
        f"queued p50 {report['drop_to_queued_p50_s']:.2f} s, p99 "
        f"{report['drop_to_queued_p99_s']:.2f} s; all queued after "
        f"{report['all_queued_s']:.1f} s, all taken after {all_taken:.1f} s"
    )
    return 0 if exactly_once else 1


if __name__ == "__main__":
    sys.exit(main())
