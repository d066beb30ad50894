"""Where few-step sampling's time goes, and what the inference copy of the denoiser buys.

  python benchmarks/profile_sample.py --preset dae-b --img 32 --channels 3 --batch 1 64 --steps 10

For each batch, the whole compiled sampling loop is captured in one CUDA graph (as
`diffae sample --compile --cuda-graph` runs it) in these variants, built from the same weights:
  copy      the pipeline's denoiser: `DiT.inference_copy`, bf16 weights, one stacked AdaLN GEMM,
            every step's conditioning computed in one batch before the loop
  stepwise  copy, with each step computing its own conditioning (how it ran before that batching)
  autocast  the training module itself: fp32 weights that autocast casts on every call, and one
            AdaLN GEMM per block (how sampling ran before the inference copy)
  autotune  copy, compiled with Inductor's max_autotune (GEMMs tuned over Triton templates and
            cuBLAS, epilogues fused into them): faster small-batch GEMMs, for a longer first call
It prints each variant's first call (compile + capture), median latency (CUDA events around replay), then profiles a few replays:
kernels per loop, their summed device time, and the rest (the time the GPU sat between kernels),
with device time per kind of kernel.  JSON to benchmarks/results/<gpu>-profile-sample-....json.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import write_result  # noqa: E402
from diffae.config import get_preset  # noqa: E402
from diffae.engine.bench import _timer  # noqa: E402
from diffae.engine.pipeline import Pipeline, sampling_network  # noqa: E402
from diffae.nn.autoencoder import DiffusionAutoencoder  # noqa: E402

KINDS = [  # first match wins
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|sm90_|cublas", re.IGNORECASE)),
    ("attention", re.compile(r"attn|flash|fmha|_k_rstd", re.IGNORECASE)),
    ("adaln", re.compile(r"_adaln_|_gres_")),
    ("sampler step", re.compile(r"sampler_step")),
    ("inductor", re.compile(r"^triton_")),
    ("copy/cast", re.compile(r"copy|cast|elementwise|Memcpy|Memset", re.IGNORECASE)),
]


def kind_of(name: str) -> str:
    return next((k for k, pat in KINDS if pat.search(name)), "other")


def build(preset: str, img: int, channels: int, variant: str, device) -> Pipeline:
    cfg = get_preset(preset).override([f"model.img_size={img}", f"model.channels={channels}"])
    torch.manual_seed(0)
    model = DiffusionAutoencoder(cfg).to(device)
    with torch.no_grad():  # off the zero-initialised identity, so the images depend on every weight
        for w in model.parameters():
            w.add_(0.02 * torch.randn_like(w))
    pipe = Pipeline(model, None, compile=True, cuda_graph=True)
    if variant == "autocast":  # before any capture: the graphs are built from these
        condition, network = sampling_network(model, model.denoiser)
        pipe.condition, pipe.network = (torch.compile(f, dynamic=False) for f in (condition, network))
    elif variant == "autotune":  # Inductor's GEMM autotuning (Triton templates beside cuBLAS)
        pipe.condition, pipe.network = (torch.compile(f, dynamic=False, options={"max_autotune": True})
                                        for f in (pipe.eager_condition, pipe.eager_network))
    elif variant == "stepwise":  # no schedule handed over: each step conditions itself
        pipe._denoise_fn = partial(_stepwise, pipe._denoise_fn)
    return pipe


def _stepwise(denoise_fn, z, compiled=False, points=None):
    return denoise_fn(z, compiled)


def profile(fn, reps: int) -> dict:
    """Per call: kernel count and device ms, by kind; the top kernels."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per_name: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            slot = per_name.setdefault(e.name, [0, 0.0])
            slot[0] += 1
            slot[1] += e.time_range.elapsed_us() / 1e3
    by_kind: dict[str, list] = {}
    for name, (count, ms) in per_name.items():
        slot = by_kind.setdefault(kind_of(name), [0, 0.0])
        slot[0] += count / reps
        slot[1] += ms / reps
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:8]
    return {"kernels": round(sum(c for c, _ in by_kind.values()), 1),
            "kernel_ms": round(sum(ms for _, ms in by_kind.values()), 3),
            "by_kind": {k: {"count": round(c, 1), "ms": round(ms, 3)}
                        for k, (c, ms) in sorted(by_kind.items(), key=lambda kv: -kv[1][1])},
            "top": {n[:100]: {"count": round(c / reps, 1), "ms": round(ms / reps, 3)} for n, (c, ms) in top}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dae-b")
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--variants", nargs="+", default=["copy", "autocast"], choices=["copy", "stepwise", "autocast", "autotune"])
    p.add_argument("--reps", type=int, default=30, help="timed replays")
    p.add_argument("--profiled", type=int, default=3, help="replays under the profiler")
    p.add_argument("--results", default=None, help="JSON folder (default benchmarks/results)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_sample.py needs a CUDA device: it times CUDA-graph replays")
    device = torch.device("cuda")
    records = []
    for variant in a.variants:
        pipe = build(a.preset, a.img, a.channels, variant, device)
        zd = pipe.cfg.encoder.z_dim
        for n in a.batch:
            z = torch.randn(n, zd, device=device)

            def run():
                return pipe.sample(n, steps=a.steps, sampler=a.sampler, seed=0, z=z)
            t0 = time.perf_counter()
            first = run()  # compiles and captures
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            ms = _timer(device)(run, a.reps)
            prof = profile(run, a.profiled)
            rec = {"variant": variant, "batch": n, "steps": a.steps, "sampler": a.sampler, "ms": round(ms, 3),
                   "img_per_s": round(n / ms * 1e3, 1), "first_call_s": round(first_s, 2),
                   "capture_s": round(pipe.last_capture_s, 2),
                   "idle_ms": round(ms - prof["kernel_ms"], 3), **prof}
            records.append(rec)
            kinds = ", ".join(f"{k} {v['ms']:.2f} ms/{v['count']:.0f}" for k, v in prof["by_kind"].items())
            print(f"{variant:8s} batch {n:3d}: first call {first_s:.1f} s, {ms:7.2f} ms ({rec['img_per_s']:.0f} img/s); {prof['kernels']:.0f} "
                  f"kernels, {prof['kernel_ms']:.2f} ms on the device, {rec['idle_ms']:.2f} ms between; {kinds}",
                  flush=True)
            records[-1]["sample_checksum"] = round(float(first.double().abs().mean()), 6)
        del pipe
        torch.cuda.empty_cache()
    for n in a.batch:  # the variants compute the same images, up to GEMM rounding
        print(f"batch {n}: mean |x| " + ", ".join(f"{r['variant']} {r['sample_checksum']:.6f}"
                                                    for r in records if r["batch"] == n))
    path = write_result(f"profile-sample-{a.preset}-{a.img}px", {"records": records}, a.results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
