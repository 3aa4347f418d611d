"""Shared by the A/B benchmarks (previews, look-ahead): the real Daemon (SQLite queue,
worker, batching, PNG writing) runs the same jobs in rounds that alternate settings, so drift
on a shared machine falls on every side alike. A round queues all its jobs before the worker
starts and times from the first job's start to the last job's end; steps/s counts every
image's steps."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every A/B benchmark takes."""
    parser.add_argument("--arch", default="sd15", choices=("sd15", "sdxl"))
    parser.add_argument("--full-size", action="store_true", help="a full-size random model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each setting")
    parser.add_argument("--out", type=Path)


def bench_model(args: argparse.Namespace) -> Path:
    """A random-weight model of ``--arch`` (``--full-size``: the real architecture), made once
    and kept in the temporary folder."""
    from imagineerd.backends.testmodel import make_test_model

    cache = Path(tempfile.gettempdir()) / "imagineerd-bench-models"
    model = cache / f"{args.arch}-{'full' if args.full_size else 'tiny'}"
    if not (model / "model_index.json").exists():
        make_test_model(model, arch=args.arch, full_size=args.full_size)
    return model


def one_round(
    model: Path,
    workdir: Path,
    args: argparse.Namespace,
    sections: dict[str, dict[str, Any]],
    *,
    count: str | None = None,
    inspect: Callable[[Any], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``args.jobs`` jobs on a daemon configured with ``sections`` over the benchmark's own
    settings. ``count``: an event type to count (someone listens to the event stream all
    round); ``inspect(daemon)``: more figures, read before it stops."""
    from imagineerd import config as config_mod
    from imagineerd.daemon import Daemon
    from imagineerd.jobs import COMPLETED

    workdir.mkdir(parents=True)
    config: dict[str, dict[str, Any]] = {
        "model": {"name": str(model), "device": args.device},
        "generation": {"width": args.size, "height": args.size, "steps": args.steps},
        "inbox": {"enabled": False},
        "performance": {"max_batch": args.batch, "compile": False},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    daemon = Daemon(config_mod.load(workdir / "config.yaml"))
    ids = [daemon.submit({"prompt": f"a test image {i}", "seed": i}).id for i in range(args.jobs)]
    counted = 0
    extra: dict[str, Any] = {}
    with daemon.events.subscribe(daemon.events.position) as events:
        daemon.start()
        try:
            done = 0
            while done < len(ids):
                event = events.get(timeout=600)
                if event is None:
                    raise SystemExit("no event for 10 minutes: the round is stuck")
                counted += event.type == count
                done += event.type in ("job.completed", "job.failed")
            jobs = [daemon.job(i) for i in ids]
            if inspect is not None:
                extra = inspect(daemon)
        finally:
            daemon.stop()
    assert all(j.status == COMPLETED for j in jobs), [j.error for j in jobs]
    started = min(datetime.fromisoformat(j.started_at) for j in jobs)
    ended = max(datetime.fromisoformat(j.completed_at) for j in jobs)
    seconds = (ended - started).total_seconds()
    result = {"seconds": seconds, "steps_per_second": args.jobs * args.steps / seconds}
    if count is not None:
        result["counted"] = counted
    return result | extra


def alternate(
    args: argparse.Namespace,
    settings: list[Any],
    round_for: Callable[[Path, Path, Any], dict[str, Any]],
) -> list[dict[str, Any]]:
    """A warm-up round (loading and first-call costs, not timed), then ``args.rounds`` rounds
    of each setting in turn; each round's result, printed as it comes."""
    model = bench_model(args)
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="imagineerd-ab-") as tmp:
        round_for(model, Path(tmp) / "warm-up", settings[0])
        for number in range(args.rounds):
            for index, setting in enumerate(settings):
                result = round_for(model, Path(tmp) / f"r{number}-{index}", setting)
                rounds.append(result)
                print(json.dumps(result), flush=True)
    return rounds


def median(rounds: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def finish(
    args: argparse.Namespace, rounds: list, summary: list, header: list[str], cells: Callable
) -> None:
    """Print the summary as a Markdown table (``cells(row)``: a row's cells) and write
    ``--out``."""
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in summary:
        print("| " + " | ".join(str(cell) for cell in cells(row)) + " |")
    if args.out:
        args.out.write_text(json.dumps(report(args, rounds, summary), indent=2))


def report(args: argparse.Namespace, rounds: list, summary: list) -> dict[str, Any]:
    """What ``--out`` gets: when, where, how, every round and the summary."""
    return {
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "command": " ".join(sys.argv),
        "args": {k: str(v) for k, v in vars(args).items()},
        "rounds": rounds,
        "summary": summary,
    }
