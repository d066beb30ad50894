"""Shared GPU benchmark helpers: timing with CUDA events (median; stream launches or CUDA-graph
replays), ceilings measured in the same run, and JSON results under benchmarks/results/<gpu>-<name>.json with versions and the command."""
from __future__ import annotations

import datetime as dt
import json
import re
import shlex
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def gpu_slug() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def time_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn() with CUDA events (triton.testing.do_bench; warmup/rep in ms)."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def graph_ms(fn, rep: float) -> float:
    """Median ms per call of fn() replayed from one CUDA graph of as many calls as fill ~rep ms.

    Captured on the current stream, which a caller timing backward passes makes a side stream
    for the whole run (capture cannot use the default stream): autograd runs a backward on the
    stream its forward ran on, so a retained graph's backward is captured only when its forward
    was recorded on the capturing stream too (triton's do_bench_cudagraph captures on a fresh
    stream and fails there)."""
    stream = torch.cuda.current_stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def capture(n):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            for _ in range(n):
                fn()
        return g

    def replay_ms(g):
        start.record(stream)
        g.replay()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end)

    fn()  # compile and allocate outside the capture
    n = max(1, min(200, int(rep / max(replay_ms(capture(1)), 1e-3))))
    g = capture(n)
    replay_ms(g)
    times = sorted(replay_ms(g) / n for _ in range(10))
    return times[len(times) // 2]


def host_us(fn, iters: int = 200, warmup: int = 10) -> float:
    """Wall-clock microseconds per call of a back-to-back loop: what a launch-bound loop without
    CUDA graphs pays on the host (the GPU work is meant to be tiny)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def ceilings() -> dict:
    """Device-to-device copy rate (bytes read + written) and the bf16 matmul rate, measured now."""
    x = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    copy_tbps = 2 * x.numel() * 2 / time_ms(lambda: y.copy_(x)) / 1e9
    del x, y
    from diffae.engine.flops import measure_matmul_flops  # the trainer's MFU denominator too
    mm_tflops = measure_matmul_flops(torch.device("cuda")) / 1e12
    return {"copy_TBps": round(copy_tbps, 3), "bf16_matmul_TFLOPs": round(mm_tflops, 1)}


def environment() -> dict:
    env = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def write_result(name: str, payload: dict, out_dir: str | Path | None = None) -> Path:
    """Write {environment, **payload} to <out_dir or benchmarks/results>/<gpu>-<name>.json."""
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{gpu_slug()}-{name}.json"
    path.write_text(json.dumps({**environment(), **payload}, indent=1) + "\n")
    return path
