"""The GPU fast path: which batch sizes run through a compiled UNet, and the machinery that
compiles it in the background.

Three parts, each usable (and tested) on its own:

- :func:`plan_parts`: how a batch of N images is cut into compiled *buckets* (batch sizes a
  graph exists for), padding a part only while the padding stays a small share of it.
- :class:`UNetInputs`: what a pipeline sees as its UNet. It turns whatever a scheduler
  passes (int64 or float32 timesteps, 0-d or per-item) into one canonical call, so every
  built-in scheduler shares one graph per ``(bucket, width, height, cfg)``.
- :class:`ShapeCompiler`: a background thread that compiles (and on CUDA captures a CUDA
  graph of) the UNet for each wanted key. The worker thread never compiles or captures: it
  asks :meth:`ShapeCompiler.runner` for a ready key and runs eager when there is none.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

#: ``(bucket, width, height, cfg)``: one compiled graph. ``cfg`` (guidance > 1) doubles the
#: UNet's batch (negative and positive conditioning together), so it is part of the shape.
FastKey = tuple[int, int, int, bool]

#: Text conditioning length a graph is compiled for: one CLIP chunk. Longer prompts (two
#: or more chunks) change the UNet's input shape and run eager.
COND_LENGTH = 77


def plan_parts(
    count: int, buckets: Iterable[int], max_padding: float
) -> list[tuple[int, int | None]]:
    """Cut a batch of ``count`` images into ``(real, bucket)`` parts, in order.

    A part is padded up to ``bucket`` only while the padding is at most ``max_padding`` of
    the bucket (0.25: 3 images run as 4, 5 do not run as 8). Otherwise the largest bucket
    that fits is split off and the rest planned again. ``bucket`` is None for a rest
    smaller than every bucket that would be padded too much: it runs as it is (eager).
    """
    sizes = sorted(set(buckets))
    parts: list[tuple[int, int | None]] = []
    left = count
    while left > 0:
        fit = next((b for b in sizes if b >= left), None)
        if fit is not None and (fit - left) / fit <= max_padding:
            parts.append((left, fit))
            break
        below = [b for b in sizes if b <= left]
        if not below:
            parts.append((left, None))
            break
        parts.append((below[-1], below[-1]))
        left -= below[-1]
    return parts


def unet_forward(unet: Any) -> Callable[..., Any]:
    """The canonical UNet call, the function that is compiled: every input a tensor of a
    fixed dtype and layout, nothing optional but SDXL's added conditioning."""
    added = getattr(unet.config, "addition_embed_type", None) == "text_time"

    def forward(
        sample: Any, timestep: Any, encoder_hidden_states: Any, text_embeds: Any, time_ids: Any
    ) -> Any:
        cond = {"text_embeds": text_embeds, "time_ids": time_ids} if added else None
        return unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=cond,
            return_dict=False,
        )[0]

    return forward


class UNetInputs:
    """Stands in for the UNet inside a pipeline call (everything but the call itself is the
    UNet's: config, dtype, device, submodules).

    Each call is made canonical before it reaches ``runner`` (a compiled graph) or the plain
    UNet: timesteps become a float32 tensor of one value per item on the UNet's device (the
    UNet turns them into float32 itself, so results do not change), the latents and the
    conditioning take the UNet's dtype and a contiguous layout. Calls with inputs the
    compiled graph does not take (ControlNet residuals, cross-attention kwargs, timestep
    conditioning) go to the plain UNet unchanged.
    """

    def __init__(self, unet: Any, runner: Callable[..., Any] | None = None) -> None:
        import torch

        # Set through __dict__: every other attribute is looked up on the UNet.
        self.__dict__.update(_unet=unet, _runner=runner, _torch=torch, _plain=unet_forward(unet))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_unet"], name)

    def __call__(
        self,
        sample: Any,
        timestep: Any,
        encoder_hidden_states: Any = None,
        timestep_cond: Any = None,
        cross_attention_kwargs: Any = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        **extra: Any,
    ) -> Any:
        unet = self._unet
        added = added_cond_kwargs or {}
        if (
            timestep_cond is not None
            or cross_attention_kwargs
            or extra
            or set(added) - {"text_embeds", "time_ids"}
        ):
            return unet(
                sample,
                timestep,
                encoder_hidden_states=encoder_hidden_states,
                timestep_cond=timestep_cond,
                cross_attention_kwargs=cross_attention_kwargs,
                added_cond_kwargs=added_cond_kwargs,
                return_dict=return_dict,
                **extra,
            )
        args = self.canonical(
            sample, timestep, encoder_hidden_states, added.get("text_embeds"), added.get("time_ids")
        )
        out = (self._runner or self._plain)(*args)
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)

    def canonical(
        self, sample: Any, timestep: Any, hidden: Any, text_embeds: Any, time_ids: Any
    ) -> tuple[Any, ...]:
        torch = self._torch
        dtype, device = self._unet.dtype, sample.device
        batch = sample.shape[0]
        # Tensors made outside inference mode carry other dispatch keys than the warm-up's,
        # which a compiled graph's guards tell apart: a copy makes them alike (it is small).
        t = torch.as_tensor(timestep, device=device).to(torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)

        def tensor(x: Any) -> Any:
            if x is None:
                return None
            x = x.to(device=device, dtype=dtype).contiguous()
            return x if x.is_inference() else x.clone()

        return (
            tensor(sample),
            t.contiguous() if t.is_inference() else t.clone(),
            tensor(hidden),
            tensor(text_embeds),
            tensor(time_ids),
        )


def example_inputs(
    unet: Any, pipe: Any, key: FastKey, device: str, cond_length: int = COND_LENGTH
) -> tuple[Any, ...]:
    """Inputs of the canonical call for ``key``, as a pipeline call of that shape makes
    them (random values; only shapes, dtypes and layout matter to a compiled graph)."""
    import torch

    bucket, width, height, cfg = key
    batch = bucket * (2 if cfg else 1)
    config, dtype = unet.config, unet.dtype
    sample = torch.randn(batch, config.in_channels, height // 8, width // 8, dtype=dtype)
    hidden = torch.randn(batch, cond_length, config.cross_attention_dim, dtype=dtype)
    text_embeds = time_ids = None
    if getattr(config, "addition_embed_type", None) == "text_time":
        pooled = pipe.text_encoder_2.config.projection_dim
        count = (config.projection_class_embeddings_input_dim - pooled) // (
            config.addition_time_embed_dim
        )
        text_embeds = torch.randn(batch, pooled, dtype=dtype)
        time_ids = torch.randn(batch, count, dtype=dtype)
    timestep = torch.full((batch,), 500.0, dtype=torch.float32)
    return tuple(
        None if x is None else x.to(device)
        for x in (sample, timestep, hidden, text_embeds, time_ids)
    )


class DirectRunner:
    """A compiled function called as it is (CPU, or CUDA without graphs). The call runs
    dynamo in *run-only* mode: compiled code whose guards pass is used, anything else runs
    eagerly; it never compiles, so the worker thread cannot start a compile by accident."""

    def __init__(self, compiled: Callable[..., Any]) -> None:
        import torch._dynamo

        self._call = torch._dynamo.run(compiled)

    def __call__(self, *args: Any) -> Any:
        return self._call(*args)


def copy_in(static: tuple[Any, ...], args: tuple[Any, ...]) -> None:
    """Copy a call's inputs into a graph's static buffers. ``copy_`` would broadcast a
    smaller input silently (a batch of 1 into a graph of 4): shapes and dtypes must match."""
    for buffer, arg in zip(static, args, strict=True):
        if (buffer is None) != (arg is None):
            raise ValueError("a CUDA graph was called with other optional inputs")
        if buffer is None:
            continue
        if buffer.shape != arg.shape or buffer.dtype != arg.dtype:
            raise ValueError(
                f"a CUDA graph of {tuple(buffer.shape)} {buffer.dtype} was given "
                f"{tuple(arg.shape)} {arg.dtype}"
            )
        buffer.copy_(arg)


class GraphRunner:
    """A CUDA graph of one compiled call, replayed from any thread.

    The graph is recorded on the compile thread with static input buffers; a replay copies
    the inputs in, launches the graph and returns a copy of the output: the next replay of
    the same graph writes its output into the same buffer, while the caller (a scheduler
    step) may still hold the previous one.

    Everything here runs inside the compiler's GPU phase (holding the device's GPU lock):
    the warm-up calls, the capture and the check replay.
    """

    def __init__(
        self, compiled: Callable[..., Any], args: tuple[Any, ...], pool: Any, device: str
    ) -> None:
        import torch

        self.static = tuple(None if a is None else a.clone() for a in args)
        # Every stream and synchronization names the device: on cuda:1 the defaults would be
        # cuda:0's, and the capture would record nothing of the kernels run on cuda:1.
        dev = torch.device(device)
        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the capture (cuBLAS handles, autotuning)
                compiled(*self.static)
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(dev)
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            self.out = compiled(*self.static)
        self.graph = graph
        # A graph that recorded the wrong work replays garbage without an error: one replay
        # is compared with the compiled call itself before the graph is used.
        graph.replay()
        replayed = self.out.clone()
        direct = compiled(*self.static)
        torch.cuda.synchronize(dev)
        if not torch.allclose(replayed.float(), direct.float(), rtol=1e-2, atol=1e-2):
            raise RuntimeError("the CUDA graph's replay differs from the compiled call")

    def __call__(self, *args: Any) -> Any:
        copy_in(self.static, args)
        self.graph.replay()
        return self.out.clone()


class Cancelled(Exception):
    """A build stopped by a pause or close before its next GPU phase."""


#: A compile that ran out of GPU memory is tried again when a later batch wants its key,
#: this many times in all (memory is often freed meanwhile: a model moved off the device).
MAX_OOM_TRIES = 3

#: Every model's canonical call shares one code object, whose compiled entries dynamo caps
#: (``cache_size_limit``, ``accumulated_cache_size_limit``); past the cap it silently runs
#: eager. Keys built in this process, per compiler, so that a key past the cap is not built
#: at all (and the log says so). Models of one architecture may share entries (modules are
#: not guarded by identity): counting each model's keys errs on the safe side.
_built: dict[int, set[FastKey]] = {}
_built_lock = threading.Lock()
_serial = iter(range(1 << 62))

#: ``compiler``: the :class:`ShapeCompiler` whose thread this is (unset on other threads).
_compile_thread = threading.local()


def gpu_phased(backend: Any) -> Callable[..., Any]:
    """``backend`` (a dynamo backend or its name) with each run of a compiled graph on a
    compile thread made a GPU phase of that thread's compiler. A cache entry may be run by
    another model's compile thread than the one that compiled it, so the compiler is the
    running thread's. The worker runs graphs as they are: it holds the GPU lock already."""
    import torch._dynamo

    inner = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend

    def compile_graph(gm: Any, example_inputs: Any) -> Callable[..., Any]:
        run = inner(gm, example_inputs)

        def phased(*args: Any) -> Any:
            compiler = getattr(_compile_thread, "compiler", None)
            if compiler is None:
                return run(*args)
            with compiler.gpu_phase():
                return run(*args)

        return phased

    return compile_graph


def is_out_of_memory(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower()


class ShapeCompiler:
    """Compiles the UNet for wanted keys on its own thread, one key at a time.

    ``backend`` is the dynamo backend that compiles the canonical call (``"inductor"`` by
    default; tests pass a cheap one). On CUDA with ``cuda_graphs`` the compiled call is then
    recorded as a CUDA graph (:class:`GraphRunner`); otherwise it is called directly
    (:class:`DirectRunner`). ``compiled_on`` records the thread each build ran on.

    A build has a long CPU phase (tracing, code generation: up to minutes) and short GPU
    phases (each run of a compiled graph, a capture): every GPU phase holds ``gpu_lock``,
    the device's lock, which the worker holds for a whole batch, so the compile thread never
    adds its memory or its kernels to a batch's. :meth:`pause` and :meth:`close` wait only
    for a GPU phase in progress; the build in progress is cancelled at its next one.
    """

    def __init__(
        self,
        unet: Any,
        pipe: Any,
        *,
        device: str,
        backend: Any,
        cuda_graphs: bool,
        gpu_lock: Any,
        name: str = "model",
    ) -> None:
        import torch

        self.unet, self.pipe, self.device = unet, pipe, device
        self.cuda_graphs = cuda_graphs
        self.gpu_lock = gpu_lock
        self.compiled = torch.compile(
            unet_forward(unet), backend=gpu_phased(backend), fullgraph=True
        )
        self._runners: dict[FastKey, Any] = {}
        self._pending: list[FastKey] = []
        self._failed: set[FastKey] = set()
        self._oom_tries: dict[FastKey, int] = {}
        self.current: FastKey | None = None
        self.compiled_on: list[tuple[FastKey, str]] = []
        self._cond = threading.Condition()
        self._paused = False
        self._closed = False
        self._cancel = False  # set by pause/close: the build in progress stops at a GPU phase
        self._in_gpu = False  # the compile thread is inside a GPU phase
        self._pool: Any = None
        self._id = next(_serial)
        self._full_logged = False
        self._thread = threading.Thread(
            target=self._loop, name=f"imagineerd-compile-{name}", daemon=True
        )
        self._thread.start()

    # -- what the worker asks ---------------------------------------------------------------
    def runner(self, key: FastKey) -> Any:
        """The compiled runner of ``key``, or None (not ready: run eager)."""
        return self._runners.get(key)

    def ready(self) -> set[FastKey]:
        return set(self._runners)

    def pending(self) -> list[FastKey]:
        """Keys waiting or compiling now."""
        with self._cond:
            return ([self.current] if self.current else []) + list(self._pending)

    def want(self, key: FastKey) -> None:
        """Compile ``key`` in the background (once; a key that failed is not retried, one
        that ran out of memory up to :data:`MAX_OOM_TRIES` times in all)."""
        with self._cond:
            if key in self._runners or key in self._pending or key in self._failed:
                return
            if key == self.current or self._oom_tries.get(key, 0) >= MAX_OOM_TRIES:
                return
            self._pending.append(key)
            self._cond.notify_all()

    def pause(self) -> None:
        """Stop compiling and drop every runner (the weights are about to move or change:
        graphs hold their addresses). Waits only for a GPU phase in progress (one forward
        or capture), never for a compile: that one is cancelled at its next GPU phase. The
        keys that were ready are wanted again on :meth:`resume`."""
        with self._cond:
            self._paused = self._cancel = True
        with self.gpu_lock:
            pass  # a GPU phase in progress ends; later ones see the flag
        with self._cond:
            again = [k for k in self._runners if k not in self._pending]
            self._pending[:0] = again
            self._runners.clear()

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def close(self) -> None:
        """Stop for good. As :meth:`pause`, waits only for a GPU phase in progress; the
        thread ends at the next one, or after a compile in progress (CPU work only)."""
        with self._cond:
            self._closed = self._cancel = True
            self._cond.notify_all()
        with self.gpu_lock:
            pass

    def wait_idle(self, timeout: float) -> bool:
        """Until nothing is pending (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._pending and not self._paused) or self.current is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # -- the compile thread -------------------------------------------------------------------
    @contextmanager
    def gpu_phase(self) -> Iterator[None]:
        """GPU work of the compile thread: holds the device's GPU lock; entering the
        outermost phase after a pause or close cancels the build."""
        with self.gpu_lock:
            if self._in_gpu:
                yield
                return
            if self._cancel:
                raise Cancelled
            self._in_gpu = True
            try:
                yield
            finally:
                self._in_gpu = False

    def _loop(self) -> None:
        import torch
        import torch._dynamo

        _compile_thread.compiler = self
        if self.device.startswith("cuda"):
            # Streams, synchronizations and captures made without a device are the current
            # device's: this thread's must be the model's (cuda:1 is not cuda:0).
            torch.cuda.set_device(torch.device(self.device))
        # One static graph per key; dynamic shapes compiled SDXL for minutes (DESIGN §9).
        torch._dynamo.config.automatic_dynamic_shapes = False
        # Entries of all models count against one limit (see _built): it is raised to the
        # total one, and _room stops short of it.
        config = torch._dynamo.config
        config.cache_size_limit = max(config.cache_size_limit, config.accumulated_cache_size_limit)
        while True:
            with self._cond:
                while not self._closed and (self._paused or not self._pending):
                    self._cond.wait()
                if self._closed:
                    return
                key = self.current = self._pending.pop(0)
                self._cancel = False
            try:
                started = time.monotonic()
                runner = self._build(key)
            except Cancelled:
                with self._cond:
                    if key not in self._pending:
                        self._pending.insert(0, key)
            except Exception as exc:
                if is_out_of_memory(exc):
                    with self._cond:
                        self._oom_tries[key] = self._oom_tries.get(key, 0) + 1
                    log.warning(
                        "out of GPU memory compiling the UNet for %d x %dx%d (cfg %s); that "
                        "shape runs on the plain UNet until a later batch asks again",
                        *key,
                    )
                    if self.device.startswith("cuda"):
                        torch.cuda.empty_cache()
                else:
                    log.exception(
                        "compiling the UNet for %d x %dx%d (cfg %s) failed; that shape runs "
                        "on the plain UNet",
                        *key,
                    )
                    with self._cond:
                        self._failed.add(key)
            else:
                with self._cond:
                    if not self._paused:
                        self._runners[key] = runner
                    elif key not in self._pending:
                        self._pending.insert(0, key)
                log.info(
                    "UNet ready for batch %d at %dx%d (cfg %s) in %.1f s",
                    *key,
                    time.monotonic() - started,
                )
            finally:
                with self._cond:
                    self.current = None
                    self._cond.notify_all()

    def _room(self, key: FastKey) -> bool:
        """Whether dynamo still has room for ``key`` (see :data:`_built`); logs once when
        not."""
        import torch._dynamo

        config = torch._dynamo.config
        with _built_lock:
            mine = _built.setdefault(self._id, set())
            if key in mine:
                return True
            total = sum(len(keys) for keys in _built.values())
            limit = min(config.cache_size_limit, config.accumulated_cache_size_limit)
        if total < limit:
            return True
        if not self._full_logged:
            self._full_logged = True
            log.warning(
                "dynamo's cache limit is reached (%d compiled shapes in this process; "
                "torch._dynamo.config.cache_size_limit and accumulated_cache_size_limit): "
                "further shapes run on the plain UNet",
                total,
            )
        return False

    def _build(self, key: FastKey) -> Any:
        import torch

        if not self._room(key):
            raise RuntimeError("dynamo's cache limit is reached")
        self.compiled_on.append((key, threading.current_thread().name))
        with torch.inference_mode():
            args = example_inputs(self.unet, self.pipe, key, self.device)
            # The first call compiles (CPU work, no lock) and runs; the second proves the
            # compiled code is reused. Each run is a GPU phase of its own (gpu_phased).
            for _ in range(2):
                self.compiled(*args)
            if self.cuda_graphs and self.device.startswith("cuda"):
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                with self.gpu_phase():
                    runner: Any = GraphRunner(self.compiled, args, self._pool, self.device)
            else:
                runner = DirectRunner(self.compiled)
        with _built_lock:
            _built.setdefault(self._id, set()).add(key)
        return runner
