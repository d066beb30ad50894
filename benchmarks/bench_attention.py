"""Triton attention (packed qkv in, (B, N, H*D) out) vs SDPA's flash and cuDNN backends.

    python3 benchmarks/bench_attention.py [--out benchmarks/results] [--rep 100]

Every contender starts from the packed projection output qkv (B, N, 3, H, D) and must produce
(B, N, H*D) and d(qkv) in the packed layout: SDPA runs as the model would call it
(diffae.ops.attention.attention_reference: unbind, transposes, SDPA, transpose + reshape back),
so the copies each backend needs around it, forward and backward, are in its time.  The Triton
kernel needs none.

Times are triton.testing.do_bench medians (CUDA events, L2 flushed between calls): the pass
launched from Python each time, so a pass whose host work outlasts its device work times the host.
Beside them, *_graph_ms: the same pass repeated in one CUDA graph and replayed (benchmarks.common.
graph_ms, median), the device time that a compiled, graph-replayed training step pays.  TFLOP/s count
4*B*H*N^2*D for the forward (non-causal), 2.5x that for the backward, 3.5x for forward+backward.
Forward is timed under torch.no_grad() (inference); backward is autograd.grad on a retained graph;
fwd+bwd is both in one call.  The bf16 matmul ceiling (8192^3) is measured in the same run.
Autotuning (first call of each shape) is excluded.  JSON goes to
<out>/<gpu-slug>-attention.json, rewritten after each shape.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import graph_ms, host_us, write_result  # noqa: E402

SHAPES = [(64, 12, 256, 64), (16, 12, 1024, 64), (8, 16, 1024, 72), (4, 16, 4096, 64),
          (2, 16, 4096, 128)]  # (B, H, N, D)
TARGET_SHAPES = {(64, 12, 256, 64), (16, 12, 1024, 64)}  # fwd+bwd >= 1.2x cuDNN here


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    help="directory for the JSON result")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    ap.add_argument("--shapes", default="", help="subset, e.g. '64,12,256,64;16,12,1024,64'")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA device", file=sys.stderr)
        return 1
    with torch.cuda.stream(torch.cuda.Stream()):  # see graph_ms: every pass runs on one side stream
        return _run(args)


def _run(args) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from diffae.kernels import attention as K
    from diffae.ops.attention import attention_reference

    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name(dev)

    def bench(fn) -> float:
        return do_bench(fn, warmup=25, rep=args.rep, return_mode="median")  # ms

    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    mm_tflops = 2 * 8192**3 / (bench(lambda: a @ b) * 1e-3) / 1e12
    del a, b
    print(f"{gpu}: bf16 matmul ceiling {mm_tflops:.0f} TFLOP/s (8192^3)", flush=True)

    def sdpa(backend):
        # As the model calls it: views of the packed tensor in, (B, N, H*D) out.  Should a backend
        # reject those strides, the contiguous (B, H, N, D) copies it needs are made explicitly.
        def views(qkv):
            with sdpa_kernel([backend]):
                return attention_reference(qkv)

        def copies(qkv):
            B, N, _, H, D = qkv.shape
            q, k, v = (t.transpose(1, 2).contiguous() for t in qkv.unbind(2))
            with sdpa_kernel([backend]):
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return o.transpose(1, 2).reshape(B, N, H * D)

        def f(qkv):
            if f.mode == "views":
                try:
                    return views(qkv)
                except RuntimeError:
                    f.mode = "contiguous copies"
            return copies(qkv)
        f.mode = "views"
        return f

    impls = {"triton": lambda qkv: K.attention(qkv),
             "flash": sdpa(SDPBackend.FLASH_ATTENTION),
             "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}

    result = {
        "dtype": "bfloat16", "causal": False, "matmul_tflops": round(mm_tflops, 1),
        "head_dim_mode": K._D_MODE, "head_geometry_72": K.head_geometry(72),
        "flops": "fwd 4*B*H*N^2*D, bwd 2.5x fwd, fwd+bwd 3.5x fwd",
        "timing": ("*_ms: triton.testing.do_bench median, L2 flushed; *_graph_ms: CUDA-graph replay "
                   "(graph_ms), median; SDPA includes the permutes from/to the packed layout"),
        "rows": [],
    }
    g = torch.Generator(device=dev).manual_seed(0)
    header = (f"{'B,H,N,D':>16} {'impl':>7} {'fwd ms':>8} {'fwd TF':>7} {'bwd ms':>8} {'bwd TF':>7} "
              f"{'f+b ms':>8} {'f+b TF':>7}  graph ms: {'fwd':>4} {'bwd':>8} {'f+b':>8}")
    print(header, flush=True)
    for (B, H, N, D) in shapes:
        qkv = torch.randn(B, N, 3, H, D, device=dev, dtype=torch.bfloat16, generator=g)
        do = torch.randn(B, N, H * D, device=dev, dtype=torch.bfloat16, generator=g)
        x = qkv.clone().requires_grad_()
        fwd_flops = 4 * B * H * N * N * D
        row = {"B": B, "H": H, "N": N, "D": D}
        outs = {}
        for name, fn in impls.items():
            try:
                t_tune = time.perf_counter()
                o = fn(x)  # first call: compile, autotune
                (gx,) = torch.autograd.grad(o, x, do)
                torch.cuda.synchronize()
                t_tune = time.perf_counter() - t_tune
                outs[name] = (o.detach().float(), gx.float())

                def fwd():
                    with torch.no_grad():
                        fn(qkv)

                o = fn(x)

                def bwd():
                    torch.autograd.grad(o, x, do, retain_graph=True)

                def fwd_bwd():
                    torch.autograd.grad(fn(x), x, do)

                tf, tb, tfb = bench(fwd), bench(bwd), bench(fwd_bwd)
                r = {"fwd_ms": tf, "bwd_ms": tb, "fwd_bwd_ms": tfb,
                     "fwd_tflops": fwd_flops / tf / 1e9, "bwd_tflops": 2.5 * fwd_flops / tb / 1e9,
                     "fwd_bwd_tflops": 3.5 * fwd_flops / tfb / 1e9, "first_call_s": round(t_tune, 2)}
                try:  # device time; a backend that cannot be captured keeps its stream timings
                    r.update({f"{m}_graph_ms": graph_ms(f, args.rep)
                              for m, f in (("fwd", fwd), ("bwd", bwd), ("fwd_bwd", fwd_bwd))})
                except Exception as exc:
                    r["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
                    print(f"{name}: no CUDA-graph timing ({r['graph_error']})"[:200], flush=True)
                del o
                if hasattr(fn, "mode"):
                    r["sdpa_inputs"] = fn.mode
                row[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                graphed = " ".join(f"{r[f'{m}_graph_ms']:8.3f}" for m in ("fwd", "bwd", "fwd_bwd")
                                   if f"{m}_graph_ms" in r)
                print(f"{f'{B},{H},{N},{D}':>16} {name:>7} {tf:8.3f} {r['fwd_tflops']:7.1f} {tb:8.3f} "
                      f"{r['bwd_tflops']:7.1f} {tfb:8.3f} {r['fwd_bwd_tflops']:7.1f} {graphed}", flush=True)
            except Exception as exc:  # a backend missing for this shape: record and go on
                row[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                print(f"{f'{B},{H},{N},{D}':>16} {name:>7} unavailable ({type(exc).__name__}: {exc})"[:200],
                      flush=True)
        # Agreement with SDPA (both bf16): the timed kernel must compute the same thing.
        # Agreement (relative Frobenius error, out and dqkv): flash vs cuDNN is the bf16 yardstick.
        def rel(u, v):
            return round(((u - v).norm() / v.norm()).item(), 5)
        for a_, b_ in (("triton", "cudnn"), ("triton", "flash"), ("flash", "cudnn")):
            if a_ in outs and b_ in outs:
                row[f"rel_err_{a_}_vs_{b_}"] = [rel(outs[a_][i], outs[b_][i]) for i in (0, 1)]
        t = row.get("triton", {})
        for base in ("flash", "cudnn"):
            ref = row.get(base, {})
            if "fwd_ms" in t and "fwd_ms" in ref:
                row[f"speedup_vs_{base}"] = {m: round(ref[f"{m}_ms"] / t[f"{m}_ms"], 3)
                                             for m in ("fwd", "bwd", "fwd_bwd")}
            if "fwd_graph_ms" in t and "fwd_graph_ms" in ref:
                row[f"graph_speedup_vs_{base}"] = {m: round(ref[f"{m}_graph_ms"] / t[f"{m}_graph_ms"], 3)
                                                   for m in ("fwd", "bwd", "fwd_bwd")}
        result["rows"].append(row)
        result["autotuned_configs"] = K.best_configs(timings=True)
        path = write_result("attention", result, args.out)  # rewritten after each shape
        del qkv, do, x, outs
        torch.cuda.empty_cache()

    # Host cost per call (wall clock of a back-to-back loop at a size where the GPU work is tiny):
    # what a launch-bound step pays without CUDA graphs.
    tiny = torch.randn(1, 64, 3, 2, 64, device=dev, dtype=torch.bfloat16)
    tiny_x = tiny.clone().requires_grad_()
    tiny_do = torch.randn(1, 64, 128, device=dev, dtype=torch.bfloat16)

    result["host_us"] = {}
    for name, fn in impls.items():
        def f_fwd():
            with torch.no_grad():
                fn(tiny)
        try:
            f_fb = lambda: torch.autograd.grad(fn(tiny_x), tiny_x, tiny_do)  # noqa: E731
            result["host_us"][name] = {"fwd": round(host_us(f_fwd, 300, 20), 1),
                                      "fwd_bwd": round(host_us(f_fb, 300, 20), 1)}
        except Exception as exc:
            result["host_us"][name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    print("host us per call (fwd, fwd+bwd):", result["host_us"])

    print("\nspeedup of triton (x): vs flash fwd/bwd/f+b | vs cudnn fwd/bwd/f+b; stream-launched, then graph-replayed")
    verdict = []
    for row in result["rows"]:
        shape = (row["B"], row["H"], row["N"], row["D"])

        def fmt(s):
            return "/".join(f"{s[m]:.2f}" for m in ("fwd", "bwd", "fwd_bwd")) if s else "n/a"
        for timing, prefix in (("stream", ""), ("graph", "graph_")):
            sf, sc = row.get(f"{prefix}speedup_vs_flash"), row.get(f"{prefix}speedup_vs_cudnn")
            print(f"{','.join(map(str, shape)):>16}  {timing:>6} {fmt(sf):>16} | {fmt(sc):>16}")
            if sf:
                verdict.append((f"{shape} fwd >= flash ({timing})", sf["fwd"] >= 1.0))
                verdict.append((f"{shape} bwd >= flash ({timing})", sf["bwd"] >= 1.0))
            if sc and shape in TARGET_SHAPES:
                verdict.append((f"{shape} fwd+bwd >= 1.2x cudnn ({timing})", sc["fwd_bwd"] >= 1.2))
    result["targets"] = {k: bool(v) for k, v in verdict}
    path = write_result("attention", result, args.out)
    print("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in verdict))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
