"""Throughput of imagineerd's daemon core against plain diffusers, on the same jobs.

    python benchmarks/throughput.py --arch sd15 --full-size --size 512 --steps 30 --jobs 64
    python benchmarks/throughput.py --arch sdxl --full-size --size 1024 --steps 30 --jobs 16

Both sides get the same N jobs (varied prompts and seeds, same size and steps):

(a) baseline: a plain diffusers pipeline (fp16 and SDPA on a GPU), one pipeline call per job;
(b) imagineerd: the real Daemon (SQLite queue, worker, batching, compiled UNet when enabled,
    PNG writing) with all N jobs queued at once.

Reported: images/min, seconds per image, job latency (median, p90) from the moment the queue
was filled, time to first image, single-job latency (a queue of one), peak GPU memory, the
ratio b/a, UNet TFLOP/s achieved against a measured matmul peak, the time to compile and the
time from a restart to the first image with a warm compile cache, and how far (b)'s images
are from (a)'s. Without a GPU it runs on the CPU (use the tiny model: a smoke test, not a
measurement). Writes JSON (--out) and prints a Markdown table.
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
    import torch
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(str(model_dir), dtype=dtype)
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)

    def call(job: dict):
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
    """Until the worker's backend is loaded and every bucket of this size is compiled."""
    start = time.perf_counter()
    worker = daemon.workers[0]
    while time.perf_counter() - start < timeout:
        backend = worker._backend
        if worker.backend_state == "error":
            raise RuntimeError(worker.backend_error)
        if backend is not None:
            pending = [s for s in getattr(backend, "_to_compile", []) if s[1:] == (size, size)]
            if getattr(backend, "compiled_unet", None) is None or not pending:
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
                "performance": {"max_batch": args.max_batch, "compile": args.compile},
                "inbox": {"enabled": False},
            }
        )
    )
    t0 = time.perf_counter()
    daemon = start_daemon(config_path)
    compile_seconds = wait_ready(daemon, jobs[0]["width"], args.ready_timeout)
    load_and_compile = time.perf_counter() - t0
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
    # Restart with the compile cache on disk: how long until the first image?
    t0 = time.perf_counter()
    daemon = start_daemon(config_path)
    wait_ready(daemon, jobs[0]["width"], args.ready_timeout)
    run_queue(daemon, jobs[:1])
    restart_to_first = time.perf_counter() - t0
    daemon.stop()
    result = summarize(latencies, total, singles, len(jobs))
    result.update(
        peak_memory_gib=peak,
        max_batch=max_batch,
        compile=args.compile,
        load_and_compile_seconds=load_and_compile,
        compile_wait_seconds=compile_seconds,
        restart_to_first_image=restart_to_first,
    )
    return result | {"_images": images}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    parser.add_argument("--max-batch", default="auto")
    parser.add_argument("--compile", default="auto", choices=("auto", "true", "false"))
    parser.add_argument("--model-dir", type=Path, help="an existing model folder to use")
    parser.add_argument("--ready-timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--side", choices=("baseline", "imagineerd"), help=argparse.SUPPRESS)
    parser.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.max_batch = args.max_batch if args.max_batch == "auto" else int(args.max_batch)
    args.compile = {"auto": "auto", "true": True, "false": False}[args.compile]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
    jobs = [
        {
            "prompt": PROMPTS[i % len(PROMPTS)] + f", variation {i}",
            "seed": 1000 + i,
            "steps": args.steps,
            "width": size,
            "height": size,
            "guidance_scale": args.guidance_scale,
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
        return 0

    # Each side runs in its own process: a fresh GPU (memory, allocator, compile state) and,
    # on a CPU, no second OpenMP thread pool left spinning by the other side.
    base, base_images = run_side("baseline", argv)
    ours, our_images = run_side("imagineerd", argv)
    flops = base.pop("_flops")
    peak = base.pop("peak_tflops")
    ours["unet_tflops"] = flops * len(jobs) / ours["total_seconds"] / 1e12
    diffs = [float(np.abs(a - b).mean()) for a, b in zip(base_images, our_images, strict=True)]
    result = {
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "python benchmarks/throughput.py " + " ".join(argv or sys.argv[1:]),
        "machine": info,
        "model": {
            "arch": args.arch,
            "full_size": args.full_size,
            "size": size,
            "steps": args.steps,
            "jobs": args.jobs,
        },
        "measured_peak_tflops": peak,
        "unet_flops_per_image": flops,
        "baseline": base,
        "imagineerd": ours,
        "speedup_images_per_min": ours["images_per_min"] / base["images_per_min"],
        "image_difference": {"mean_abs_max": max(diffs), "mean_abs_mean": statistics.fmean(diffs)},
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(table(result))
    return 0


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
        f"{r['model']['steps']} steps · {r['model']['jobs']} jobs",
        "",
        "| | plain diffusers | imagineerd |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {a} | {c} |" for name, a, c in rows]
    lines += [
        "",
        f"speed-up: {r['speedup_images_per_min']:.2f}x images/min · max batch "
        f"{o['max_batch']} · compile {o['compile']} · restart to first image "
        f"{o['restart_to_first_image']:.1f} s · image difference (mean abs, 0-255) "
        f"max {r['image_difference']['mean_abs_max']:.3f}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
