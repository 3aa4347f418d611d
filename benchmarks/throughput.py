"""Throughput of imagineerd's daemon core against plain diffusers, on the same jobs.

    python benchmarks/throughput.py --suite --full-size --out gpu.json
    python benchmarks/throughput.py --arch sd15 --full-size --size 512 --steps 30 --jobs 64 \
        --schedulers euler,euler_a,dpmpp_2m,ddim,unipc
    python benchmarks/throughput.py --arch sdxl --full-size --size 1024 --steps 30 --jobs 16

``--suite`` runs the workloads of the GPU table in BENCHMARKS.md one after the other (SD1.5
512², 30 steps, 64 queued jobs of mixed samplers; SDXL 1024², 30 steps, 16 jobs), each with
its own baseline, checks them against the targets and writes the JSON after each workload,
so a run cut short keeps what it measured. Without ``--full-size`` it runs the same
workloads on the tiny model at 64² (a smoke test).

Both sides get the same N jobs (varied prompts and seeds, same size and steps; with
``--schedulers`` the jobs cycle through those samplers, on both sides):

(a) baseline: a plain diffusers pipeline (fp16 and SDPA on a GPU), one pipeline call per job;
(b) imagineerd: the real Daemon (SQLite queue, worker, batching, compiled UNet when enabled,
    PNG writing) with all N jobs queued at once.

Reported: images/min, seconds per image, job latency (median, p90) from the moment the queue
was filled, time to first image, single-job latency (a queue of one), peak GPU memory, the
ratio b/a, UNet TFLOP/s achieved against a measured matmul peak, the time to compile, the
time from a restart to the first image with a warm compile cache (a job queued at start; it
does not wait for the compile) and to every bucket compiled again, the shapes compiled, and
how far (b)'s images are from (a)'s. Without a GPU it runs on the CPU (use the tiny model:
a smoke test, not a measurement). Writes JSON (--out) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "a lighthouse at dusk, oil painting",
    "a red fox in fresh snow, photograph",
    "an isometric city block, pixel art",
    "a bowl of ramen, studio lighting",
    "a sailing ship in a storm, dramatic",
    "a cozy reading nook, watercolor",
    "a robot gardener among tomatoes",
    "a desert canyon at noon, wide angle",
]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def device_info() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"device": "cuda", "name": torch.cuda.get_device_name(0), "torch": torch.__version__}
    return {
        "device": "cpu",
        "name": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def measured_peak_tflops(device: str) -> float:
    """A large matmul in the dtype we generate in: the practical peak of this device."""
    import torch

    n, dtype = (8192, torch.float16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def unet_flops_per_image(pipe, size: int, steps: int) -> float:
    """FLOPs of the UNet for one image: steps x one forward on a batch of 2 (CFG)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    latent = torch.randn(
        2, unet.config.in_channels, size // 8, size // 8, device=device, dtype=dtype
    )
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = pipe.text_encoder_2.config.projection_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, device=device, dtype=dtype),
            "time_ids": torch.randn(2, 6, device=device, dtype=dtype),
        }
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        unet(latent, torch.tensor(500, device=device), encoder_hidden_states=hidden, **kwargs)
    return counter.get_total_flops() * steps


def run_baseline(model_dir: Path, jobs: list[dict], device: str) -> dict:
    import diffusers
    import torch

    from imagineerd.backends.runtime import SCHEDULER_CLASSES

    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(model_dir), dtype=dtype)
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    config = pipe.scheduler.config
    schedulers = {}
    for job in jobs:  # diffusers' own scheduler classes, as plain diffusers users have them
        name = job["scheduler"]
        if name not in schedulers:
            class_name, extra = SCHEDULER_CLASSES[name]
            schedulers[name] = getattr(diffusers, class_name).from_config(config, **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)

    def call(job: dict):
        pipe.scheduler = schedulers[job["scheduler"]]
        return pipe(
            prompt=job["prompt"],
            num_inference_steps=job["steps"],
            guidance_scale=job["guidance_scale"],
            width=job["width"],
            height=job["height"],
            generator=torch.Generator("cpu").manual_seed(job["seed"]),
        ).images[0]

    call(jobs[0])  # warm-up (cuDNN autotuning, allocator), not counted
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    latencies, images = [], []
    for job in jobs:
        images.append(np.asarray(call(job).convert("RGB"), dtype=np.int16))
        sync(device)
        latencies.append(time.perf_counter() - start)
    total = time.perf_counter() - start
    singles = []
    for job in jobs[:3]:
        t = time.perf_counter()
        call(job)
        sync(device)
        singles.append(time.perf_counter() - t)
    flops = unet_flops_per_image(pipe, jobs[0]["width"], jobs[0]["steps"])
    result = summarize(latencies, total, singles, len(jobs))
    result["peak_memory_gib"] = (
        torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    )
    result["unet_tflops"] = flops * len(jobs) / total / 1e12
    return result | {"_images": images, "_flops": flops}


def summarize(latencies: list[float], total: float, singles: list[float], n: int) -> dict:
    return {
        "images": n,
        "total_seconds": total,
        "images_per_min": n / total * 60,
        "seconds_per_image": total / n,
        "latency_p50": percentile(latencies, 50),
        "latency_p90": percentile(latencies, 90),
        "time_to_first_image": min(latencies),
        "single_job_latency": statistics.median(singles),
    }


def start_daemon(config_path: Path):
    from imagineerd import config as config_mod
    from imagineerd.daemon import Daemon

    daemon = Daemon(config_mod.load(config_path))
    daemon.start()
    return daemon


def wait_ready(daemon, size: int, timeout: float) -> float:
    """Until the worker's backend is loaded and every bucket of this size is compiled (the
    compile thread's keys are ``(bucket, width, height, cfg)``)."""
    start = time.perf_counter()
    worker = daemon.workers[0]
    while time.perf_counter() - start < timeout:
        backend = worker._backend
        if worker.backend_state == "error":
            raise RuntimeError(worker.backend_error)
        if backend is not None:
            pending = [s for s in getattr(backend, "_to_compile", []) if s[1:3] == (size, size)]
            if not getattr(backend, "compiling", False) or not pending:
                return time.perf_counter() - start
        time.sleep(0.2)
    raise TimeoutError(f"the model was not ready within {timeout} s")


def run_queue(daemon, jobs: list[dict]) -> tuple[list[float], float, dict[int, float]]:
    done: dict[int, float] = {}
    finished = threading.Event()
    ids: list[int] = []

    def listen(sub) -> None:
        while not finished.is_set():
            event = sub.get(timeout=0.5)
            if event and event.type in ("job.completed", "job.failed"):
                if event.type == "job.failed":
                    print("job failed:", event.data.get("error"), file=sys.stderr)
                done[event.data["id"]] = time.perf_counter()
                if ids and all(i in done for i in ids):
                    finished.set()

    sub = daemon.events.subscribe()
    listener = threading.Thread(target=listen, args=(sub,), daemon=True)
    listener.start()
    start = time.perf_counter()
    ids.extend(daemon.submit(job).id for job in jobs)
    if not finished.wait(24 * 3600):
        raise TimeoutError("jobs did not finish")
    sub.close()
    return [done[i] - start for i in ids], max(done.values()) - start, {i: done[i] for i in ids}


def run_imagineerd(model_dir: Path, jobs: list[dict], device: str, args, workdir: Path) -> dict:
    import torch

    config_path = workdir / "config.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "model": {"name": str(model_dir), "device": device},
                "generation": {
                    "width": jobs[0]["width"],
                    "height": jobs[0]["height"],
                    "steps": jobs[0]["steps"],
                },
                "performance": {
                    "max_batch": args.max_batch,
                    "compile": args.compile,
                    **args.performance,
                },
                "inbox": {"enabled": False},
            }
        )
    )
    t0 = time.perf_counter()
    daemon = start_daemon(config_path)
    compile_seconds = wait_ready(daemon, jobs[0]["width"], args.ready_timeout)
    load_and_compile = time.perf_counter() - t0
    backend = daemon.workers[0]._backend
    ready = sorted(getattr(backend, "ready_shapes", set()) or [])
    run_queue(daemon, jobs[:1])  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    latencies, total, _ = run_queue(daemon, jobs)
    singles = [run_queue(daemon, [job])[1] for job in jobs[:3]]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    images = []
    by_seed = {j.spec.seed: j for j in daemon.store.history(len(jobs) * 2 + 10) if j.output_path}
    from PIL import Image

    for job in jobs:
        record = by_seed[job["seed"]]
        with Image.open(daemon.config.base_dir / record.output_path) as image:
            images.append(np.asarray(image.convert("RGB"), dtype=np.int16))
    worker = daemon.workers[0]
    max_batch = worker.max_batch
    daemon.stop()
    # Restart with the compile cache on disk, in a fresh process (nothing compiled in
    # memory): how long until the first image, and until every bucket is compiled again.
    restart = restart_in_new_process(config_path, jobs[0], args.ready_timeout, workdir)
    restart_to_first, restart_to_compiled = restart["first_image"], restart["compiled"]
    result = summarize(latencies, total, singles, len(jobs))
    result.update(
        peak_memory_gib=peak,
        max_batch=max_batch,
        compile=args.compile,
        load_and_compile_seconds=load_and_compile,
        compile_wait_seconds=compile_seconds,
        restart_to_first_image=restart_to_first,
        restart_to_compiled=restart_to_compiled,
        compiled_shapes=[list(key) for key in ready],
        performance=args.performance,
    )
    return result | {"_images": images}


def restart(config_path: Path, job: dict, timeout: float) -> dict:
    """A daemon started on an existing state folder, a job queued at once: seconds to its
    image (it runs eager if its shape is not compiled yet) and to every bucket compiled."""
    t0 = time.perf_counter()
    daemon = start_daemon(config_path)
    try:
        run_queue(daemon, [job])
        first = time.perf_counter() - t0
        wait_ready(daemon, job["width"], timeout)
        return {"first_image": first, "compiled": time.perf_counter() - t0}
    finally:
        daemon.stop()


def restart_in_new_process(config_path: Path, job: dict, timeout: float, workdir: Path) -> dict:
    import subprocess

    out = workdir / "restart.json"
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--restart-config",
            str(config_path),
            "--restart-job",
            json.dumps(job),
            "--ready-timeout",
            str(timeout),
            "--side-out",
            str(out),
        ],
        check=True,
    )
    return json.loads(out.read_text())


def run_side(side: str, argv: list[str] | None) -> tuple[dict, list[np.ndarray]]:
    import subprocess

    print(f"{side} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="imagineerd-bench-") as tmp:
        out = Path(tmp) / f"{side}.json"
        subprocess.run(
            [
                sys.executable,
                __file__,
                *(argv if argv is not None else sys.argv[1:]),
                "--side",
                side,
                "--side-out",
                str(out),
            ],
            check=True,
        )
        with np.load(out.with_suffix(".npz")) as arrays:
            images = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
        return json.loads(out.read_text()), images


#: The GPU table's workloads (``--suite``): name, arguments, and the targets a GPU run is
#: checked against (images/min, speed-up over plain diffusers one job per call, single-job
#: latency in s, restart to first image in s).
SUITE = [
    (
        "sd15-512-mixed-samplers",
        ["--arch", "sd15", "--size", "512", "--steps", "30", "--jobs", "64"]
        + ["--schedulers", "euler,euler_a,dpmpp_2m,ddim,unipc"],
        {"images_per_min": 500, "speedup": 10, "single_job_latency": 0.25, "restart": 30},
    ),
    (
        "sdxl-1024",
        ["--arch", "sdxl", "--size", "1024", "--steps", "30", "--jobs", "16"],
        {"speedup": 3},
    ),
]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", action="store_true", help="every workload of the GPU table")
    parser.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--full-size", action="store_true", help="real architecture (GPU)")
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="width = height (default: 512 for sd15, 1024 for sdxl, 64 for tiny models)",
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument(
        "--schedulers", default="euler", help="samplers the jobs cycle through, comma-separated"
    )
    parser.add_argument("--max-batch", default="auto")
    parser.add_argument("--compile", default="auto", choices=("auto", "true", "false"))
    parser.add_argument(
        "--performance",
        type=json.loads,
        default={},
        help="more performance settings for imagineerd, as JSON: '{\"fuse_qkv\": true}'",
    )
    parser.add_argument("--model-dir", type=Path, help="an existing model folder to use")
    parser.add_argument("--ready-timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--side", choices=("baseline", "imagineerd"), help=argparse.SUPPRESS)
    parser.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--restart-config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--restart-job", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.max_batch = args.max_batch if args.max_batch == "auto" else int(args.max_batch)
    args.compile = {"auto": "auto", "true": True, "false": False}[args.compile]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.restart_config:  # the restart measurement, in a process of its own
        timings = restart(args.restart_config, args.restart_job, args.ready_timeout)
        args.side_out.write_text(json.dumps(timings))
        return 0
    if args.suite:
        return suite(argv, args)
    result = workload(argv, args)
    if result is None:
        return 0
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(table(result))
    return 0


def suite(argv: list[str], args: argparse.Namespace) -> int:
    """Every workload of SUITE, the JSON written after each one."""
    # What the caller gave besides --suite (--full-size, --compile, --performance, ...)
    # applies to every workload; the workload's own size, steps and jobs come first.
    common = [a for a in argv if a != "--suite"]
    if "--out" in common:
        at = common.index("--out")
        del common[at : at + 2]
    results: dict = {"date": datetime.now().strftime("%Y-%m-%d %H:%M"), "workloads": {}}
    results["command"] = "python benchmarks/throughput.py " + " ".join(argv)
    for name, own, targets in SUITE:
        if not args.full_size:  # tiny model: the same workloads as a quick smoke test
            own = [a if a not in ("512", "1024") else "64" for a in own]
            own = (
                own[: own.index("--steps")]
                + ["--steps", "2", "--jobs", "4"]
                + own[own.index("--jobs") + 2 :]
            )
        workload_argv = own + common
        print(f"== {name}: {' '.join(workload_argv)}", file=sys.stderr)
        result = workload(workload_argv, parse(workload_argv))
        result["targets"] = check(result, targets) if args.full_size else {}
        results["workloads"][name] = result
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))
        print(table(result))
        print()
    return 0


def check(result: dict, targets: dict) -> dict:
    """Each target with the measured value and whether it was met."""
    ours = result["imagineerd"]
    measured = {
        "images_per_min": (ours["images_per_min"], ">="),
        "speedup": (result["speedup_images_per_min"], ">="),
        "single_job_latency": (ours["single_job_latency"], "<="),
        "restart": (ours["restart_to_first_image"], "<="),
    }
    out = {}
    for key, target in targets.items():
        value, sense = measured[key]
        met = value >= target if sense == ">=" else value <= target
        out[key] = {"target": f"{sense} {target}", "measured": value, "met": met}
    return out


def workload(argv: list[str], args: argparse.Namespace) -> dict | None:
    """One workload: both sides, each in a process of its own; None in a side's process."""
    from imagineerd.backends.testmodel import make_test_model

    info = device_info()
    device = info["device"]
    size = args.size or (64 if not args.full_size else 512 if args.arch == "sd15" else 1024)
    model_dir = args.model_dir or ROOT / "state" / "bench-models" / (
        f"{args.arch}-{'full' if args.full_size else 'tiny'}"
    )
    if not (model_dir / "model_index.json").exists():
        print(f"building {model_dir} ...", file=sys.stderr)
        make_test_model(model_dir, arch=args.arch, full_size=args.full_size)
    schedulers = [name for name in args.schedulers.split(",") if name]
    jobs = [
        {
            "prompt": PROMPTS[i % len(PROMPTS)] + f", variation {i}",
            "seed": 1000 + i,
            "steps": args.steps,
            "width": size,
            "height": size,
            "guidance_scale": args.guidance_scale,
            "scheduler": schedulers[i % len(schedulers)],
        }
        for i in range(args.jobs)
    ]

    if args.side:  # one side, in this process (see below)
        with tempfile.TemporaryDirectory(prefix="imagineerd-bench-") as tmp:
            if args.side == "baseline":
                side = run_baseline(model_dir, jobs, device)
                side["peak_tflops"] = measured_peak_tflops(device)
            else:
                side = run_imagineerd(model_dir, jobs, device, args, Path(tmp))
            np.savez_compressed(args.side_out.with_suffix(".npz"), *side.pop("_images"))
        args.side_out.write_text(json.dumps(side))
        return None

    # Each side runs in its own process: a fresh GPU (memory, allocator, compile state) and,
    # on a CPU, no second OpenMP thread pool left spinning by the other side.
    base, base_images = run_side("baseline", argv)
    ours, our_images = run_side("imagineerd", argv)
    flops = base.pop("_flops")
    peak = base.pop("peak_tflops")
    ours["unet_tflops"] = flops * len(jobs) / ours["total_seconds"] / 1e12
    diffs = [float(np.abs(a - b).mean()) for a, b in zip(base_images, our_images, strict=True)]
    return {
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "python benchmarks/throughput.py " + " ".join(argv),
        "machine": info,
        "model": {
            "arch": args.arch,
            "full_size": args.full_size,
            "size": size,
            "steps": args.steps,
            "jobs": args.jobs,
            "schedulers": schedulers,
        },
        "measured_peak_tflops": peak,
        "unet_flops_per_image": flops,
        "baseline": base,
        "imagineerd": ours,
        "speedup_images_per_min": ours["images_per_min"] / base["images_per_min"],
        "image_difference": {"mean_abs_max": max(diffs), "mean_abs_mean": statistics.fmean(diffs)},
    }


def table(r: dict) -> str:
    b, o = r["baseline"], r["imagineerd"]

    def f(value, fmt="{:.2f}"):
        return "–" if value is None else fmt.format(value)

    rows = [
        ("images/min", f(b["images_per_min"], "{:.1f}"), f(o["images_per_min"], "{:.1f}")),
        ("s/image", f(b["seconds_per_image"], "{:.3f}"), f(o["seconds_per_image"], "{:.3f}")),
        (
            "latency p50 / p90 (s)",
            f"{b['latency_p50']:.2f} / {b['latency_p90']:.2f}",
            f"{o['latency_p50']:.2f} / {o['latency_p90']:.2f}",
        ),
        ("time to first image (s)", f(b["time_to_first_image"]), f(o["time_to_first_image"])),
        (
            "single-job latency (s)",
            f(b["single_job_latency"], "{:.3f}"),
            f(o["single_job_latency"], "{:.3f}"),
        ),
        ("peak GPU memory (GiB)", f(b["peak_memory_gib"]), f(o["peak_memory_gib"])),
        (
            "UNet TFLOP/s (matmul peak {:.3g})".format(r["measured_peak_tflops"]),
            f(b["unet_tflops"], "{:.3g}"),
            f(o["unet_tflops"], "{:.3g}"),
        ),
    ]
    lines = [
        f"{r['date']} · {r['machine']['name']} · {r['model']['arch']} "
        f"{'full-size' if r['model']['full_size'] else 'tiny'} {r['model']['size']}² · "
        f"{r['model']['steps']} steps · {r['model']['jobs']} jobs · "
        f"{', '.join(r['model'].get('schedulers') or ['euler'])}",
        "",
        "| | plain diffusers | imagineerd |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {a} | {c} |" for name, a, c in rows]
    lines += [
        "",
        f"speed-up: {r['speedup_images_per_min']:.2f}x images/min · max batch "
        f"{o['max_batch']} · compile {o['compile']} · restart to first image "
        f"{o['restart_to_first_image']:.1f} s (every bucket compiled again: "
        f"{o.get('restart_to_compiled', float('nan')):.1f} s) · image difference (mean abs, 0-255) "
        f"max {r['image_difference']['mean_abs_max']:.3f}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
