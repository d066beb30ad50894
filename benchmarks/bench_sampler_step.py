"""Fused sampler step (torch.ops.diffae.sampler_step, CUDA) vs the eager PyTorch reference.

    python3 benchmarks/bench_sampler_step.py [--out benchmarks/results]

GPU times are triton.testing.do_bench medians (CUDA events, L2 flushed between calls), in
microseconds; `host_us` is the wall time per call of a back-to-back loop, which is what a
launch-bound sampler loop without CUDA graphs pays.  The fused kernel's bandwidth is reported
against a device-to-device copy measured in the same run.  JSON goes to
<out>/<gpu-slug>-sampler_step.json.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import host_us, write_result  # noqa: E402

SHAPES = [(1, 3, 32, 32), (64, 3, 32, 32), (64, 4, 128, 128)]
# (name, pred, model-output dtype, prev?, noise?, clip): a DDIM step with eta > 0 on a bf16 model,
# and a DPM-Solver++(2M) step (previous x0) on an fp32 model with x0 clipping.
CASES = [
    ("ddim_eta_eps_bf16", "eps", torch.bfloat16, False, True, 0.0),
    ("dpmpp2m_v_fp32_clip", "v", torch.float32, True, False, 1.0),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    help="directory for the JSON result")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_sampler_step: needs a CUDA device", file=sys.stderr)
        return 1
    from triton.testing import do_bench

    import diffae._C  # noqa: F401  (a missing extension should fail loudly here)
    from diffae.ops.sampler_step import PREDICTIONS, sampler_step_reference

    op = torch.ops.diffae.sampler_step
    dev = torch.device("cuda")

    def bench(fn) -> float:
        return do_bench(fn, warmup=25, rep=args.rep, return_mode="median") * 1e3  # ms -> us

    # Bandwidth ceiling: a large device-to-device copy (read + write), same run.
    src = torch.empty(256 * 2**20 // 4, device=dev)
    dst = torch.empty_like(src)
    copy_us = bench(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() * 4 / (copy_us * 1e-6) / 1e9
    del src, dst

    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for shape in SHAPES:
        for name, pred, out_dtype, with_prev, with_noise, clip in CASES:
            x = torch.randn(shape, device=dev, generator=g)
            out = torch.randn(shape, device=dev, generator=g).to(out_dtype)
            prev = torch.randn(shape, device=dev, generator=g) if with_prev else None
            noise = torch.randn(shape, device=dev, generator=g) if with_noise else None
            coeffs = (0.93, 0.41, -0.27, 0.18 if with_prev else 0.0, 0.05 if with_noise else 0.0)
            a, s = 0.8, 0.6
            code = PREDICTIONS.index(pred)
            cl = list(coeffs)

            def fused():
                return op(x, out, prev, noise, a, s, code, clip, cl)

            def reference():
                return sampler_step_reference(x, out, prev, noise, a, s, pred, clip, coeffs)

            got, want = fused(), reference()
            max_diff = max((got[i] - want[i]).abs().max().item() for i in range(2))
            n = x.numel()
            nbytes = n * (4 + out.element_size() + 4 * with_prev + 4 * with_noise + 8)  # reads + 2 fp32 writes
            fused_us, ref_us = bench(fused), bench(reference)
            row = {
                "shape": list(shape), "case": name, "numel": n,
                "fused_us": round(fused_us, 2), "reference_us": round(ref_us, 2),
                "speedup": round(ref_us / fused_us, 2),
                "fused_host_us": round(host_us(fused), 2), "reference_host_us": round(host_us(reference), 2),
                "fused_gbs": round(nbytes / (fused_us * 1e-6) / 1e9, 1),
                "fused_frac_of_copy_bw": round(nbytes / (fused_us * 1e-6) / 1e9 / copy_gbs, 3),
                "max_abs_diff_vs_reference": max_diff,
            }
            rows.append(row)
            print(f"{'x'.join(map(str, shape)):>12} {name:<22} fused {row['fused_us']:8.2f} us  "
                  f"ref {row['reference_us']:8.2f} us  x{row['speedup']:<6} "
                  f"host {row['fused_host_us']:7.2f} / {row['reference_host_us']:7.2f} us  "
                  f"{row['fused_gbs']:7.1f} GB/s ({row['fused_frac_of_copy_bw']:.0%} of copy)  "
                  f"maxdiff {max_diff:.2e}")

    path = write_result("sampler_step", {
        "benchmark": "sampler_step",
        "units": "microseconds (do_bench median); host_us = wall time per call, back to back",
        "copy_ceiling_gbs": round(copy_gbs, 1),
        "rows": rows,
    }, args.out)
    print(f"copy ceiling {copy_gbs:.1f} GB/s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
