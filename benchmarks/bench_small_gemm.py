"""Few-token GEMMs: torch's cuBLAS call against every cuBLASLt candidate (diffae::lt_linear) and
a plain Triton GEMM over a sweep of tile shapes.

  python benchmarks/bench_small_gemm.py --tokens 256 --dim 768

At batch 1 the sampling loop's GEMMs see M = 256 tokens: cuBLAS takes about 6 us for each of a
DiT-B block's four (profile_sample.py), several times what their FLOPs or weight bytes need.  This
measures whether another cuBLASLt algorithm or smaller Triton tiles do better: each GEMM (qkv, proj, fc1 with the tanh GELU,
fc2, bf16) is timed inside a CUDA graph of calls that cycle through 12 weight sets (one per block,
so weights come from HBM, not L2, as in the loop), then the four chained as 12 blocks run them.
JSON to benchmarks/results/<gpu>-small-gemm.json.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import write_result  # noqa: E402
lin = importlib.import_module("diffae.ops.linear")  # the module: diffae.ops.linear is also the function
from kernels.linear import linear  # noqa: E402

BLOCKS = 12


def graph_ms(calls, reps: int = 20) -> float:
    """Median ms of one replay of a CUDA graph holding calls() (CUDA events)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        calls()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        calls()
    g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def cublas(x, w, b, gelu):
    if gelu:
        return torch._addmm_activation(b, x, w.t(), use_gelu=True)
    return F.linear(x, w, b)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args()
    torch.manual_seed(0)
    M, C = a.tokens, a.dim
    dev, dt = "cuda", torch.bfloat16
    shapes = {"qkv": (C, 3 * C, False), "proj": (C, C, False), "fc1": (C, 4 * C, True), "fc2": (4 * C, C, False)}
    weights = {k: [(torch.randn(n, kk, device=dev, dtype=dt) / kk ** 0.5, torch.randn(n, device=dev, dtype=dt))
                   for _ in range(BLOCKS)] for k, (kk, n, _) in shapes.items()}
    inputs = {k: torch.randn(M, kk, device=dev, dtype=dt) for k, (kk, _, _) in shapes.items()}
    configs = [dict(BM=bm, BN=bn, BK=bk, stages=s, warps=w) for bm, bn, bk, s, w in itertools.product(
        (64, 128), (32, 64, 128), (64, 128), (3, 4), (4, 8))
        if not (w == 8 and bm * bn < 128 * 64) and (bm + bn) * bk * 2 * s <= 200 * 1024]  # fits shared memory
    records, best, lt_best = [], {}, {}
    lt = torch.ops.diffae if lin._has_lt() else None
    for name, (kk, n, gelu) in shapes.items():
        x = inputs[name]

        def run_all(fn):
            return lambda: [fn(x, w, b, gelu) for w, b in weights[name]]
        want = cublas(x.float(), weights[name][0][0].float(), weights[name][0][1].float(), gelu)
        ref_err = (cublas(x, *weights[name][0], gelu).float() - want).abs().max().item()
        us = graph_ms(run_all(cublas)) * 1e3 / BLOCKS
        rec = {"gemm": name, "M": M, "K": kk, "N": n, "gelu": gelu, "cublas_us": round(us, 2), "triton": []}
        for cfg in configs:
            fn = lambda x, w, b, g, cfg=cfg: linear(x, w, b, gelu=g, **cfg)  # noqa: E731
            err = (fn(x, *weights[name][0], gelu).float() - want).abs().max().item()
            if err > 4 * ref_err + 1e-2:
                raise SystemExit(f"{name} {cfg}: max error {err:.3e} against cuBLAS's {ref_err:.3e}")
            rec["triton"].append({**cfg, "us": round(graph_ms(run_all(fn)) * 1e3 / BLOCKS, 2)})
        if lt is not None:  # every candidate cuBLASLt proposes; torch runs the first
            b0 = weights[name][0][1]
            rec["lt_us"] = [round(graph_ms(run_all(lambda x, w, b, g, i=i: lt.lt_linear(x, w, b, g, i))) * 1e3 / BLOCKS, 2)
                            for i in range(lt.lt_linear_candidates(x, weights[name][0][0], b0, gelu))]
            lt_best[name] = min(range(len(rec["lt_us"])), key=rec["lt_us"].__getitem__)
            print(f"{name:5s} cuBLASLt candidates (us): {rec['lt_us']}", flush=True)
        top = min(rec["triton"], key=lambda r: r["us"])
        best[name] = {k: top[k] for k in ("BM", "BN", "BK", "stages", "warps")}
        print(f"{name:5s} M={M} K={kk} N={n}: cuBLAS {us:6.2f} us, best Triton {top['us']:6.2f} us {best[name]}", flush=True)
        records.append(rec)

    def chain(fn):  # the four GEMMs of 12 blocks in order, each block with its own weights
        def calls():
            for i in range(BLOCKS):
                for name, (_, _, gelu) in shapes.items():
                    fn(name, inputs[name], *weights[name][i], gelu)
        return calls
    chain_cublas = graph_ms(chain(lambda name, x, w, b, g: cublas(x, w, b, g)))
    chain_triton = graph_ms(chain(lambda name, x, w, b, g: linear(x, w, b, gelu=g, **best[name])))
    chain_us = {"cublas": round(chain_cublas * 1e3, 1), "triton": round(chain_triton * 1e3, 1)}
    if lt is not None:
        chain_us["lt_fastest"] = round(graph_ms(chain(lambda name, x, w, b, g: lt.lt_linear(x, w, b, g, lt_best[name]))) * 1e3, 1)
        chain_us["ops_linear"] = round(graph_ms(chain(lambda name, x, w, b, g: lin.linear(x, w, b, gelu=g))) * 1e3, 1)
    print(f"12 blocks' GEMMs chained (us): {chain_us}")
    write_result("small-gemm", {"tokens": M, "dim": C, "gemms": records, "best": best,
                                "lt_fastest": lt_best, "chain_us": chain_us},
                 a.results)


if __name__ == "__main__":
    main()
