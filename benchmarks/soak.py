"""A long run: many tiny jobs through a real server; its memory must not keep growing.

    python benchmarks/soak.py --jobs 2000

Submits the jobs in waves over the API, waits for all, and samples the server's resident
memory (RSS) after the first wave and at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import Server, tiny_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--wave", type=int, default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    samples = []
    with tempfile.TemporaryDirectory(prefix="imagineerd-soak-") as tmp:
        work = Path(tmp)
        server = Server(work, tiny_model(work), performance={"max_batch": 8})
        server.start()
        session = requests.Session()
        start = time.monotonic()
        try:
            submitted = 0
            while submitted < args.jobs:
                for _ in range(min(args.wave, args.jobs - submitted)):
                    session.post(
                        server.url + "/api/generate",
                        json={"prompt": f"soak {submitted}"},
                        timeout=60,
                    ).raise_for_status()
                    submitted += 1
                while (
                    session.get(server.url + "/api/health", timeout=60).json()["queue_size"]
                    > args.wave
                ):
                    time.sleep(0.2)
                samples.append((submitted, round(server.rss_mib(), 1)))
            while True:
                health = session.get(server.url + "/api/health", timeout=60).json()
                if health["queue_size"] == 0 and not health["current_job"]:
                    break
                time.sleep(0.5)
            samples.append((args.jobs, round(server.rss_mib(), 1)))
            elapsed = time.monotonic() - start
        finally:
            exit_code = server.stop()
    report = {
        "jobs": args.jobs,
        "completed": health["total_completed"],
        "failed": health["total_failed"],
        "seconds": elapsed,
        "rss_mib_after_first_wave": samples[0][1],
        "rss_mib_at_end": samples[-1][1],
        "rss_samples": samples,
        "clean_exit": exit_code == 0,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(
        f"{report['completed']} of {args.jobs} completed ({report['failed']} failed) in "
        f"{elapsed:.0f} s; RSS {report['rss_mib_after_first_wave']} MiB after the first "
        f"wave, {report['rss_mib_at_end']} MiB at the end"
    )
    return 0 if report["completed"] == args.jobs else 1


if __name__ == "__main__":
    sys.exit(main())
