"""The MLP with its GELU in cuBLASLt epilogues (ops.gelu_mlp) vs the compiled unfused MLP.

    python3 benchmarks/bench_mlp.py [--out benchmarks/results] [--rep 100]

Training shapes, bf16: M tokens of width C, hidden 4C.  Every figure is device milliseconds per
call, replayed from a CUDA graph (benchmarks.common.graph_ms): what a graph-replayed training step
pays.  fwd+bwd is the output and the five input gradients (autograd.grad, no accumulation).
The pieces isolate the epilogues' cost: each fused GEMM beside the plain GEMM of the same shape
(linear_gelu against F.linear, linear_dgelu against grad @ w2) and beside the compiled unfused
backward through the GELU (GEMM, then gelu_backward); fused_fwd_unfused_bwd is the fused MLP with
DIFFAE_MLP_BWD=unfused.  DIFFAE_LT_AUTOTUNE=0 in the environment makes the extension take
cuBLASLt's first heuristic choice instead of timing its candidates (=verbose prints each one's
time).  JSON goes to <out>/<gpu-slug>-mlp.json (-mlp-no-autotune.json with =0).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import graph_ms, write_result  # noqa: E402

SHAPES = [(65536, 768), (16384, 1152)]  # (M, C): dae-b at 32x32 batch 256; a DiT-XL-wide block


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--rep", type=float, default=100, help="ms of calls per timed graph replay")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_mlp: needs a CUDA device", file=sys.stderr)
        return 1
    from diffae import ops
    from diffae.ops import _ext
    from diffae.ops.mlp import gelu_mlp_reference
    if not _ext.has_linear_gelu():
        print("bench_mlp: diffae._C has no linear_gelu (build: DIFFAE_NO_EXT=0 pip install -e .)", file=sys.stderr)
        return 1
    compiled = torch.compile(gelu_mlp_reference)

    @torch.compile
    def compiled_dgelu(grad, w2, pre):  # the unfused backward through the GELU, as Inductor runs it
        return torch.ops.aten.gelu_backward(grad @ w2, pre, approximate="tanh")

    rows = []
    with torch.cuda.stream(torch.cuda.Stream()):  # graph_ms captures on the current stream
        for M, C in SHAPES:
            N = 4 * C
            g = torch.Generator(device="cuda").manual_seed(0)

            def rnd(*shape, scale=1.0):
                return (torch.randn(shape, device="cuda", generator=g) * scale).bfloat16().requires_grad_()

            x = rnd(M, C)
            params = [rnd(N, C, scale=C ** -0.5), rnd(N), rnd(C, N, scale=N ** -0.5), rnd(C)]
            grad = torch.randn(M, C, device="cuda", generator=g).bfloat16()
            inputs = [x, *params]

            def fwd_bwd(fn):
                return lambda: torch.autograd.grad(fn(*inputs), inputs, grad)

            def unfused_bwd(fn):  # DIFFAE_MLP_BWD=unfused while fn runs
                def run():
                    os.environ["DIFFAE_MLP_BWD"] = "unfused"
                    try:
                        return fn()
                    finally:
                        os.environ.pop("DIFFAE_MLP_BWD")
                return run

            w1, b1, w2, _ = (p.detach() for p in params)
            xd = x.detach()
            pre = F.linear(xd, w1, b1)
            row = {"M": M, "C": C, "N": N}
            with torch.no_grad():
                timings = {
                    "fused_fwd_bwd": fwd_bwd(ops.gelu_mlp),
                    "fused_fwd_unfused_bwd_fwd_bwd": unfused_bwd(fwd_bwd(ops.gelu_mlp)),
                    "compiled_fwd_bwd": fwd_bwd(compiled),
                    "linear_gelu": lambda: torch.ops.diffae.linear_gelu(xd, w1, b1),
                    "linear_plain": lambda: F.linear(xd, w1, b1),
                    "linear_dgelu": lambda: torch.ops.diffae.linear_dgelu(grad, w2, pre),
                    "mm_plain": lambda: grad @ w2,
                    "mm_gelu_backward": lambda: compiled_dgelu(grad, w2, pre),
                }
                for name, fn in timings.items():
                    with torch.enable_grad() if name.endswith("fwd_bwd") else torch.no_grad():
                        row[f"{name}_ms"] = round(graph_ms(fn, args.rep), 4)
            gemm_flop = 2 * M * N * C
            for name in ("linear_gelu", "linear_plain", "linear_dgelu", "mm_plain"):
                row[f"{name}_TFLOPs"] = round(gemm_flop / row[f"{name}_ms"] / 1e9, 1)
            row["fwd_bwd_speedup"] = round(row["compiled_fwd_bwd_ms"] / row["fused_fwd_bwd_ms"], 3)
            print({k: v for k, v in row.items()}, flush=True)
            rows.append(row)
    autotune = os.environ.get("DIFFAE_LT_AUTOTUNE", "1")
    path = write_result("mlp" if autotune != "0" else "mlp-no-autotune", {"lt_autotune": autotune, "rows": rows},
                        args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
