"""Where a training step's time goes: a preset trained for a few steps under torch.profiler, then
the top ops as a table (self CUDA time on a GPU, self CPU time on the CPU) and a Chrome trace.

  python benchmarks/profile_train.py --preset dae-b --img 32 --channels 3 --batch 256
  python benchmarks/profile_train.py --preset dae-tiny --img 28 --channels 1 --batch 8 --steps 2 --warmup 1

The first steps (--warmup, at least 2: they compile under --compile) run outside the window; the
stages (data, forward, backward, optimizer, ema; encoder and denoiser when not compiled) appear in
the trace as named ranges, and as NVTX ranges for Nsight Systems.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_train import add_trainer_args, make_trainer  # noqa: E402
from diffae import profiling  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trainer_args(p)
    p.add_argument("--steps", type=int, default=5, help="profiled steps")
    p.add_argument("--warmup", type=int, default=3, help="steps before the window")
    p.add_argument("--rows", type=int, default=25, help="rows of the table")
    p.add_argument("--trace", default=None, help="Chrome trace path (default: <out>/trace.json)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs/profile")
    a = p.parse_args()
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    profiling.enable(True)
    out = Path(a.out)
    trainer = make_trainer(a, device, out)
    for _ in range(a.warmup):
        trainer.train_step()
    trace = Path(a.trace) if a.trace else out / "trace.json"
    trace.parent.mkdir(parents=True, exist_ok=True)
    window = profiling.TraceWindow(0, a.steps, trace, device, rows=a.rows, stream=sys.stdout)
    window.step(0)
    t0 = time.perf_counter()
    for i in range(a.steps):
        trainer.train_step()
        if i + 1 < a.steps:
            window.step(i + 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    per_step = (time.perf_counter() - t0) / a.steps
    window.step(a.steps)  # stops the profiler, writes the trace, prints the table
    print(f"{a.preset} {a.img}x{a.img}x{a.channels} batch {a.batch} on {device}"
          f"{' (compiled)' if trainer.compiled else ''}: {1e3 * per_step:.1f} ms/step under the profiler "
          f"(its overhead included), {a.steps} steps after {a.warmup} warm-up")


if __name__ == "__main__":
    main()
