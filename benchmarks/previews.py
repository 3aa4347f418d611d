"""What live previews cost: denoising steps per second with previews off and on, same run.

    python benchmarks/previews.py                       # tiny model, CPU, 64²
    python benchmarks/previews.py --arch sd15 --full-size --device cuda --size 512 \
        --steps 30 --jobs 16 --batch 8

The real Daemon (SQLite queue, worker, batching, PNG writing) runs the same jobs in rounds
that alternate ``previews.every_steps`` between 0 (off) and each value asked for, so drift
on a shared machine falls on every side alike. A round queues all its jobs before the worker
starts and times from the first job's start to the last job's end; steps/s counts every
image's steps. Someone must be listening for previews to be made and sent: each round
subscribes to the event stream and counts the previews it receives. Prints a Markdown table
and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_round(model: Path, workdir: Path, args: argparse.Namespace, every: int) -> dict:
    from imagineerd import config as config_mod
    from imagineerd.daemon import Daemon
    from imagineerd.jobs import COMPLETED

    workdir.mkdir(parents=True)
    (workdir / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"name": str(model), "device": args.device},
                "generation": {"width": args.size, "height": args.size, "steps": args.steps},
                "inbox": {"enabled": False},
                "performance": {"max_batch": args.batch, "compile": False},
                "previews": {"every_steps": every},
            }
        )
    )
    daemon = Daemon(config_mod.load(workdir / "config.yaml"))
    ids = [daemon.submit({"prompt": f"a test image {i}", "seed": i}).id for i in range(args.jobs)]
    previews = 0
    with daemon.events.subscribe(daemon.events.position) as events:
        daemon.start()
        try:
            done = 0
            while done < len(ids):
                event = events.get(timeout=600)
                if event is None:
                    raise SystemExit("no event for 10 minutes: the round is stuck")
                previews += event.type == "job.preview"
                done += event.type in ("job.completed", "job.failed")
            jobs = [daemon.job(i) for i in ids]
        finally:
            daemon.stop()
    assert all(j.status == COMPLETED for j in jobs), [j.error for j in jobs]
    started = min(datetime.fromisoformat(j.started_at) for j in jobs)
    ended = max(datetime.fromisoformat(j.completed_at) for j in jobs)
    seconds = (ended - started).total_seconds()
    return {
        "every_steps": every,
        "seconds": seconds,
        "steps_per_second": args.jobs * args.steps / seconds,
        "previews_received": previews,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="sd15", choices=("sd15", "sdxl"))
    parser.add_argument("--full-size", action="store_true", help="a full-size random model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--every", default="5,1", help="previews.every_steps values to try")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each setting")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from imagineerd.backends.testmodel import make_test_model

    cache = Path(tempfile.gettempdir()) / "imagineerd-bench-models"
    model = cache / f"{args.arch}-{'full' if args.full_size else 'tiny'}"
    if not (model / "model_index.json").exists():
        make_test_model(model, arch=args.arch, full_size=args.full_size)
    settings = [0, *(int(v) for v in args.every.split(","))]
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="imagineerd-previews-") as tmp:
        one_round(model, Path(tmp) / "warm-up", args, 0)  # loads, first-call costs: not timed
        for number in range(args.rounds):
            for every in settings:
                result = one_round(model, Path(tmp) / f"r{number}-{every}", args, every)
                rounds.append(result)
                print(json.dumps(result), flush=True)
    off = statistics.median(r["steps_per_second"] for r in rounds if r["every_steps"] == 0)
    summary = []
    for every in settings:
        mine = [r for r in rounds if r["every_steps"] == every]
        rate = statistics.median(r["steps_per_second"] for r in mine)
        summary.append(
            {
                "every_steps": every,
                "steps_per_second": round(rate, 2),
                "vs_off": round(rate / off, 3),
                "previews_per_round": statistics.median(r["previews_received"] for r in mine),
            }
        )
    report = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "command": " ".join(sys.argv),
        "args": {k: str(v) for k, v in vars(args).items()},
        "rounds": rounds,
        "summary": summary,
    }
    print("\n| previews.every_steps | steps/s (median) | vs off | previews per round |")
    print("|---|---|---|---|")
    for row in summary:
        label = "0 (off)" if row["every_steps"] == 0 else str(row["every_steps"])
        print(
            f"| {label} | {row['steps_per_second']} | {row['vs_off']:.3f} "
            f"| {row['previews_per_round']:g} |"
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
