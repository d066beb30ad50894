"""Attention's device time inside a training step: diffae's Triton attention against SDPA.

  python benchmarks/attention_share.py --preset dae-b --img 32 --channels 3 --batch 256 [--no-compile]

Trains the preset on random images twice, once with the Triton attention kernels and once with
attention forced to the PyTorch reference (SDPA on permuted views, DIFFAE_BACKEND=attention=
reference), everything else equal.  Each run profiles --steps steps after --warmup and sums the
device time of every kernel, and of the attention kernels (names matching ATTENTION: ours, and
SDPA's flash / cuDNN / memory-efficient kernels).  The layout copies SDPA needs around it are not
counted as attention, which favours SDPA.  JSON to benchmarks/results/<gpu>-attention-share-....json.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_train import add_trainer_args, make_trainer  # noqa: E402
from benchmarks.common import write_result  # noqa: E402
from diffae.ops import _backend  # noqa: E402

ATTENTION = re.compile(r"attn|flash|fmha|sdpa|attention|_k_rstd", re.IGNORECASE)


def profile_steps(trainer, steps: int, device) -> dict:
    """Per-step device milliseconds: all kernels, attention kernels, and the top attention kernels."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    per_name: dict[str, float] = {}
    for e in kernels:
        per_name[e.name] = per_name.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3 / steps
    attn = {n: ms for n, ms in per_name.items() if ATTENTION.search(n)}
    top = sorted(attn.items(), key=lambda kv: -kv[1])[:6]
    return {"kernel_ms_per_step": round(sum(per_name.values()), 3),
            "attention_ms_per_step": round(sum(attn.values()), 3),
            "attention_kernels": {n[:120]: round(ms, 3) for n, ms in top}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trainer_args(p)
    p.add_argument("--steps", type=int, default=5, help="profiled steps")
    p.add_argument("--warmup", type=int, default=3, help="steps before profiling (compile happens here)")
    p.add_argument("--results", default=None, help="JSON folder (default: benchmarks/results)")
    p.add_argument("--out", default="runs/attention-share")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    runs = {}
    for mode, forced in (("triton", None), ("sdpa", "reference")):
        _backend.set_backend(forced, op="attention")
        trainer = make_trainer(a, device, Path(a.out) / mode)
        for _ in range(a.warmup):
            trainer.train_step()
        runs[mode] = profile_steps(trainer, a.steps, device)
        runs[mode]["compiled"] = trainer.compiled
        print(mode, runs[mode], flush=True)
        del trainer
        torch._dynamo.reset()
    _backend.set_backend(None, op="attention")
    t, s = runs["triton"]["attention_ms_per_step"], runs["sdpa"]["attention_ms_per_step"]
    step_t, step_s = runs["triton"]["kernel_ms_per_step"], runs["sdpa"]["kernel_ms_per_step"]
    summary = {"attention_time_cut": round(1 - t / s, 3) if s else None,
               "step_kernel_time_ratio": round(step_t / step_s, 3) if step_s else None}
    print(summary, flush=True)
    tag = f"attention-share-{a.preset}-{a.img}px-b{a.batch}{'-compiled' if runs['triton']['compiled'] else ''}"
    print(f"wrote {write_result(tag, {'setting': vars(a), 'runs': runs, 'summary': summary}, a.results)}")


if __name__ == "__main__":
    main()
