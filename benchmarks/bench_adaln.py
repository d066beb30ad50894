"""Benchmark the Triton AdaLN-Zero kernels against the copy rate, eager PyTorch and torch.compile.

    python benchmarks/bench_adaln.py [--out benchmarks/results] [--shapes 256x256x768 64x1024x1152]
                                     [--sweep]

For each shape (bf16 activations, per-sample bf16 modulation) and each op it times forward,
backward (autograd.grad on a retained graph) and forward+backward of the Triton op, the eager
reference and torch.compile of the reference (one compile per shape, dynamic=False), and the
fused residual + next-LayerNorm op against the two separately compiled reference ops; then that
fused op as a DiT trains it (fp32 stream, bf16 h: backward from the saved x_hat, against keeping
the fp32 stream, and against torch.compile of the reference).  Two timings of each, compile
excluded:
  *_ms         device time: the pass repeated in one CUDA graph, replays timed with CUDA events
               (graph_ms, median of 10; L2 not flushed: each pass moves 3-15x the 60 MB L2);
               what the kernels cost inside a compiled or graph-captured training step, where
               the host runs ahead
  *_stream_ms  triton.testing.do_bench (CUDA events, median, L2 flushed between reps): the same
               pass launched from Python each time, host launch overhead included
The copy ceiling is timed both ways too; fractions of copy use the device time.

GB/s counts minimal bytes: each input of a pass read once, each output written once (a
forward+backward counts both passes).  The ceiling is the device-to-device copy rate measured in
the same run (the larger of a copy of x's size and a 1 GiB copy).  --sweep first times launch
configurations of each kernel alone (kernels.adaln.TUNE, device time); --apply-best then runs
the benchmark with the fastest configuration of each kernel group (least total time over the
shapes).  On a GPU machine where the package is not installed, `ln -s ../kernels diffae/kernels`
and PYTHONPATH=. make diffae.kernels importable.  JSON goes to <out>/<gpu-name-slug>-adaln.json.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import sys
import time

if "--smoke" in sys.argv:  # CPU check of this script's code paths: interpreter, one call per timing
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import graph_ms  # noqa: E402

from diffae.kernels import adaln as K  # noqa: E402
from diffae.ops import adaln as R  # noqa: E402

BF16 = torch.bfloat16
DEFAULT_SHAPES = ["256x256x768", "64x1024x1152"]
SMOKE = "--smoke" in sys.argv
DEV = "cpu" if SMOKE else "cuda"


def bench(fn, rep=100, warmup=25, graph=False) -> float:
    """Median ms of fn(): device time of CUDA-graph replays (graph=True) or stream launches."""
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    if graph:
        return graph_ms(fn, rep)
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")  # ms


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def copy_rate(nbytes: int, graph: bool = True) -> float:
    src = torch.empty(nbytes // 2, device=DEV, dtype=BF16).normal_()
    dst = torch.empty_like(src)
    return gbps(2 * nbytes, bench(lambda: dst.copy_(src), graph=graph))


def make(B, N, C, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(B, N, C, device=DEV, generator=g).to(BF16)
    y = torch.randn(B, N, C, device=DEV, generator=g).to(BF16)
    mods = [(torch.randn(B, C, device=DEV, generator=g) * 0.5).to(BF16) for _ in range(3)]
    grads = [torch.randn(B, N, C, device=DEV, generator=g).to(BF16) for _ in range(2)]
    return x, y, *mods, grads


def op_specs(B, N, C):
    """name -> (inputs order, minimal fwd bytes, minimal bwd bytes, number of outputs)."""
    act, mod = B * N * C * 2, B * C * 2  # bytes, bf16
    return {
        # fwd: read x, shift, scale; write h.  bwd: read x, scale, dh; write dx, dshift, dscale.
        "adaln_modulate": (("x", "shift", "scale"), 2 * act + 2 * mod, 3 * act + 3 * mod, 1),
        # fwd: read x, y, gate; write r.  bwd: read dr, y, gate; write dy, dgate (dx is dr).
        "gated_residual": (("x", "gate", "y"), 3 * act + mod, 3 * act + 2 * mod, 1),
        # fwd: read x, y, gate, shift, scale; write r, h.
        # bwd: read r, y, dr, dh, gate, scale; write dx, dy, dgate, dshift, dscale.
        "gated_residual_adaln": (("x", "gate", "y", "shift", "scale"), 4 * act + 3 * mod,
                                 6 * act + 5 * mod, 2),
    }


def _tuple(o):
    return o if isinstance(o, tuple) else (o,)


def time_impl(fn, inputs, grads):
    """{"graph": [fwd, bwd, fwd+bwd] ms, "stream": the same launched from Python}."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = _tuple(fn(*leaves))
    gs = grads[:len(outs)]
    calls = (lambda: fn(*inputs),
             lambda: torch.autograd.grad(outs, leaves, gs, retain_graph=True),
             lambda: torch.autograd.grad(_tuple(fn(*leaves)), leaves, gs))
    return {"graph": [bench(c, graph=True) for c in calls], "stream": [bench(c) for c in calls]}


def rel_errors(kern, ref, inputs, grads) -> dict:
    """max over outputs and gradients of |kernel - fp32 reference| / |reference| (Frobenius), beside
    the same for the bf16 reference: the kernel should stay within ~2x of PyTorch's own error."""
    def run(fn, upcast):
        leaves = [(t.float() if upcast else t).detach().clone().requires_grad_() for t in inputs]
        outs = _tuple(fn(*leaves))
        gs = torch.autograd.grad(outs, leaves, [g.to(o.dtype) for g, o in zip(grads, outs)])
        return [t.float() for t in (*outs, *gs)]
    exact = run(ref, True)

    def err(vals):
        return max(float((v - e).norm() / e.norm()) for v, e in zip(vals, exact))
    return {"triton_rel_err": err(run(kern, False)), "bf16_reference_rel_err": err(run(ref, False))}


def run_shape(B, N, C, ceiling):
    x, y, shift, scale, gate, grads = make(B, N, C)
    tensors = {"x": x, "y": y, "shift": shift, "scale": scale, "gate": gate}
    impls = {
        "adaln_modulate": (K.adaln_modulate, R.adaln_modulate_reference),
        "gated_residual": (K.gated_residual, R.gated_residual_reference),
        "gated_residual_adaln": (K.gated_residual_adaln, R.gated_residual_adaln_reference),
    }
    rows = []
    for name, (names, fb, bb, _) in op_specs(B, N, C).items():
        kern, ref = impls[name]
        inputs = [tensors[n] for n in names]
        compiled = torch.compile(ref, dynamic=False)
        errors = rel_errors(kern, ref, inputs, grads)
        print(f"{B}x{N}x{C} {name}: relative error {errors}", flush=True)
        res = {}
        for impl, fn in (("triton", kern), ("eager", ref), ("compile", compiled)):
            res[impl] = time_impl(fn, inputs, grads)
        for i, (pass_, nbytes) in enumerate((("fwd", fb), ("bwd", bb), ("fwd+bwd", fb + bb))):
            row = {"shape": [B, N, C], "op": name, "pass": pass_, "bytes": nbytes, **errors}
            for impl, ms in res.items():
                row[f"{impl}_ms"] = ms["graph"][i]
                row[f"{impl}_gbps"] = gbps(nbytes, ms["graph"][i])
                row[f"{impl}_stream_ms"] = ms["stream"][i]
            row["triton_frac_of_copy"] = row["triton_gbps"] / ceiling
            row["speedup_vs_compile"] = row["compile_ms"] / row["triton_ms"]
            row["speedup_vs_eager"] = row["eager_ms"] / row["triton_ms"]
            rows.append(row)
            _print_row(row)

    # The fused residual + next LayerNorm vs the two ops compiled separately (and vs the two
    # separate Triton ops, for reference).
    gres_c = torch.compile(R.gated_residual_reference, dynamic=False)
    ln_c = torch.compile(R.adaln_modulate_reference, dynamic=False)

    def separate_compiled(x, gate, y, shift, scale):
        r = gres_c(x, gate, y)
        return r, ln_c(r, shift, scale)

    def separate_triton(x, gate, y, shift, scale):
        r = K.gated_residual(x, gate, y)
        return r, K.adaln_modulate(r, shift, scale)

    inputs = [x, gate, y, shift, scale]
    fused = time_impl(K.gated_residual_adaln, inputs, grads)
    sep_c = time_impl(separate_compiled, inputs, grads)
    sep_t = time_impl(separate_triton, inputs, grads)
    fused_rows = []
    for i, pass_ in enumerate(("fwd", "bwd", "fwd+bwd")):
        f, c, t = fused["graph"][i], sep_c["graph"][i], sep_t["graph"][i]
        fused_rows.append({"shape": [B, N, C], "pass": pass_, "fused_triton_ms": f,
                           "separate_compiled_ms": c, "separate_triton_ms": t,
                           "speedup_vs_separate_compiled": c / f, "speedup_vs_separate_triton": t / f,
                           "stream_speedup_vs_separate_compiled": sep_c["stream"][i] / fused["stream"][i]})
        _print_fused(fused_rows[-1])
    return rows, fused_rows


def training_mode(B, N, C):
    """The fused op as a DiT trains it: fp32 residual stream, bf16 y, modulations and h.  Its
    backward from the saved x_hat and 1/std (what the ops choose there) against the same op keeping
    the fp32 stream, and torch.compile of the reference; device time (graph_ms) per pass."""
    x, y, shift, scale, gate, grads = make(B, N, C)
    inputs = [x.float(), gate, y, shift, scale]
    grads = [grads[0].float(), grads[1]]  # dr in the stream's dtype, dh in h's
    fused = functools.partial(K.gated_residual_adaln, out_dtype=BF16)
    compiled = torch.compile(functools.partial(R.gated_residual_adaln_reference, out_dtype=BF16), dynamic=False)
    times = {"xhat": time_impl(fused, inputs, grads)["graph"]}
    chosen = K._save_norm
    K._save_norm = lambda *a: False  # the same op, keeping the fp32 stream for its backward
    try:
        times["stream"] = time_impl(fused, inputs, grads)["graph"]
    finally:
        K._save_norm = chosen
    times["compile"] = time_impl(compiled, inputs, grads)["graph"]
    rows = []
    for i, pass_ in enumerate(("fwd", "bwd", "fwd+bwd")):
        row = {"shape": [B, N, C], "pass": pass_, **{f"{k}_ms": v[i] for k, v in times.items()},
               "xhat_speedup_vs_stream": times["stream"][i] / times["xhat"][i],
               "xhat_speedup_vs_compile": times["compile"][i] / times["xhat"][i]}
        print(f"{'x'.join(map(str, row['shape'])):>14} training mode {pass_:>7}: x_hat {row['xhat_ms']:.3f} ms, "
              f"fp32 stream kept {row['stream_ms']:.3f} ms, compiled reference {row['compile_ms']:.3f} ms", flush=True)
        rows.append(row)
    return rows


def sweep(B, N, C, groups=("ln_fwd", "ln_fwd_fused", "ln_bwd", "ln_bwd_fused", "ew_fwd", "ew_bwd")):
    """Time each kernel alone under several launch configurations (GB/s, minimal bytes)."""
    x, y, shift, scale, gate, (g1, g2) = make(B, N, C)
    spec = op_specs(B, N, C)
    # Through the registered ops, as the model calls them: a launcher called outside a triton_op
    # would go through torch's slower traceable-launch path and time the CPU instead.
    lib, eps = torch.ops.diffae_triton, 1e-6
    r = lib.gated_residual_adaln(x, gate, y, shift, scale, eps)[0]
    kernels = {
        "ln_fwd": [("adaln", lambda: lib.adaln_modulate(x, shift, scale, eps), spec["adaln_modulate"][1])],
        "ln_fwd_fused": [("fused", lambda: lib.gated_residual_adaln(x, gate, y, shift, scale, eps),
                          spec["gated_residual_adaln"][1])],
        "ln_bwd": [("adaln", lambda: lib.adaln_modulate_backward(x, shift, scale, g1, eps),
                    spec["adaln_modulate"][2])],
        "ln_bwd_fused": [("fused", lambda: lib.gated_residual_adaln_backward(r, gate, y, shift, scale, g1, g2, eps),
                          spec["gated_residual_adaln"][2])],
        "ew_fwd": [("gres_fwd", lambda: lib.gated_residual(x, gate, y), spec["gated_residual"][1])],
        "ew_bwd": [("gres_bwd", lambda: lib.gated_residual_backward(gate, y, g1), spec["gated_residual"][2])],
    }
    grids = {
        # the pipelined loop over tiles: tile size, warps, programs per SM and stages, at the
        # column split and modulation handling (held or reloaded per tile) that won the
        # 2026-12-04 sweep (see kernels/adaln.py).  Small tiles hold fewer registers, so more
        # programs fit on an SM; the default configurations are among these.  The launch settings
        # are those of the shape's size class (kernels.adaln.forward_launch_kind).
        **{g: [{f"{g}_split": sp, f"{g}_reload_mod": rl, f"{size}_tile": t, f"{size}_warps": w,
                f"{size}_programs_per_sm": p, f"{size}_stages": st}
               for t, w in ((1024, 1), (1024, 2), (1024, 4), (2048, 1), (2048, 2), (2048, 4), (4096, 2), (8192, 4))
               for p in (16, 32, 64) for st in (2, 3, 4)]
           for g, sp, rl in (("ln_fwd", 1, 1), ("ln_fwd_fused", 0, 0))
           for size in [K.forward_launch_kind(g, B, N, x.device)]},
        # the grid (programs sharing a sample's rows), one-warp rows split in two chunks
        "ln_bwd": [{"ln_bwd_split": 1, "ln_bwd_elems_per_thread": 16, "ln_bwd_programs_per_sm": p,
                    "ln_bwd_warps": w, "ln_bwd_stages": 3, "ln_bwd_reload_mod": rl}
                   for rl in (0, 1) for w in (1, 2) for p in (4, 6, 8, 10, 12)],
        # the fused kernel's own grid and warps (split, tile and stages: the plain kernel's)
        "ln_bwd_fused": [{"ln_bwd_fused_programs_per_sm": p, "ln_bwd_fused_warps": w, "ln_bwd_fused_reload_mod": rl}
                         for rl in (0, 1) for w in (1, 2) for p in (4, 6, 8, 10, 12)],
        "ew_fwd": [{"ew_fwd_block_c": bc, "ew_fwd_tile": t, "ew_fwd_warps": w}
                   for bc, t, w in ((256, 4096, 4), (256, 8192, 8), (512, 8192, 8), (1024, 8192, 8))],
        # programs_per_sm 4 puts one program on each (sample, column tile) of the (256, 256, 768)
        # backward: S = 1, the sums written directly, no sum pass
        "ew_bwd": [{"ew_bwd_block_c": bc, "ew_bwd_tile": t, "ew_bwd_warps": w, "ew_bwd_programs_per_sm": p,
                    "ew_bwd_stages": st}
                   for bc, t, w in ((256, 1024, 4), (256, 2048, 8), (512, 2048, 8))
                   for p in (4, 8, 16) for st in (1, 3)],
    }
    default = dict(K.TUNE)
    out = []
    for group, cfgs in grids.items():
        if group not in groups:
            continue
        # a forward group is recorded per size class, so that best_configs picks each class's
        # settings from the shapes of that class
        cls = K.forward_launch_kind(group, B, N, x.device) if group.startswith("ln_fwd") else group
        for cfg in cfgs:
            K.TUNE.update(cfg)
            for label, fn, nbytes in kernels[group]:
                ms = bench(fn, rep=30, warmup=10, graph=True)
                out.append({"shape": [B, N, C], "group": cls, "kernel": label, "config": cfg, "ms": ms,
                            "gbps": gbps(nbytes, ms)})
            K.TUNE.clear()
            K.TUNE.update(default)
    return out


def compiled_kernels() -> list[dict]:
    """Resources of every compiled variant of the LayerNorm kernels and the resident programs per
    SM they allow (Hopper limits: 32 blocks, 64 warps, 64K registers, 227 KiB shared memory +
    1 KiB reserved per block): what bounds a one-wave grid."""
    out = []
    for jit in (K._adaln_fwd_kernel, K._adaln_bwd_kernel):
        for caches in jit.device_caches.values():
            for ck in caches[0].values():
                names = jit.arg_names
                const = {names[k[0]]: v for k, v in getattr(ck.src, "constants", {}).items()
                         if isinstance(k, tuple) and len(k) == 1 and names[k[0]].isupper()}
                warps, shared, regs = ck.metadata.num_warps, ck.metadata.shared, ck.n_regs
                reg_alloc = -(-regs * 32 // 256) * 256 * warps  # per block, 256-register granules
                fit = min(32, 64 // warps, 65536 // max(reg_alloc, 1), (233472 // (shared + 1024)))
                out.append({"kernel": jit.__name__, "constexprs": const, "warps": warps,
                            "stages": ck.metadata.num_stages, "regs": regs, "spills": ck.n_spills,
                            "shared": shared, "blocks_per_sm": fit})
    return out


def best_configs(rows) -> dict:
    """Per kernel group, the configuration with the least total time over every shape and kernel
    of the group that it was timed on (configurations missing a timing are left out)."""
    best = {}
    for group in sorted({r["group"] for r in rows}):
        mine = [r for r in rows if r["group"] == group]
        keys = {(r["shape"][0], r["shape"][1], r["shape"][2], r["kernel"]) for r in mine}
        totals = {}
        for r in mine:
            totals.setdefault(json.dumps(r["config"], sort_keys=True), []).append(r["ms"])
        full = {c: sum(v) for c, v in totals.items() if len(v) == len(keys)}
        if full:
            best.update(json.loads(min(full, key=full.get)))
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BxNxC, bf16")
    ap.add_argument("--sweep", action="store_true", help="also time launch configurations")
    ap.add_argument("--groups", nargs="+", default=["ln_fwd", "ln_fwd_fused", "ln_bwd", "ln_bwd_fused", "ew_fwd", "ew_bwd"], help="with --sweep: kernel groups")
    ap.add_argument("--no-bench", action="store_true", help="with --sweep: skip the main benchmark")
    ap.add_argument("--apply-best", action="store_true", help="with --sweep: benchmark the best configuration")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if SMOKE:
        return _main(args)
    with torch.cuda.stream(torch.cuda.Stream()):  # see graph_ms: every pass runs on one side stream
        return _main(args)


def _main(args) -> int:
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    if SMOKE:
        torch.compile = lambda fn, **kw: fn  # noqa: E731  (no inductor build on the CPU check)
    elif not torch.cuda.is_available():
        print("bench_adaln: needs a CUDA device", file=sys.stderr)
        return 1
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    name = "cpu-smoke" if SMOKE else torch.cuda.get_device_name()
    # stream-launched first, with its warm-up: measured first, the graph-timed 1 GiB copy read
    # 2.77 TB/s and the stream one right after 4.22 (an H200 idling at 345 MHz: clocks, presumably)
    big_stream = copy_rate(1 << 20 if SMOKE else 1 << 30, graph=False)
    big = copy_rate(1 << 20 if SMOKE else 1 << 30)
    result = {
        "gpu": name, "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "dtype": "bfloat16", "modulation": "per-sample (B, C), bfloat16",
        "bytes": "minimal: each input of a pass read once, each output written once; fwd+bwd = both passes",
        "timing": "*_ms: CUDA-graph replay (graph_ms), median; *_stream_ms: do_bench, median, "
                  "L2 flushed; backward = autograd.grad on a retained graph",
        "copy_gbps_1GiB": big, "copy_gbps_1GiB_stream": big_stream, "tune": dict(K.TUNE), "shapes": {},
        "rows": [], "fused_vs_separate": [], "training_mode": [],
    }
    if args.sweep:
        result["sweep"] = []
        for B, N, C in shapes:
            result["sweep"] += sweep(B, N, C, args.groups)
        print("sweep (kernel alone, GB/s):")
        for s in result["sweep"]:
            print(f"  {s['shape']} {s['kernel']:9s} {s['gbps']:7.0f}  {s['config']}")
        print("fastest three per shape and group:")
        for key in sorted({(tuple(s["shape"]), s["group"]) for s in result["sweep"]}):
            mine = sorted((s for s in result["sweep"] if (tuple(s["shape"]), s["group"]) == key),
                          key=lambda s: -s["gbps"])
            for s in mine[:3]:
                print(f"  {key[0]} {key[1]:12s} {s['gbps']:7.0f}  {s['config']}")
        if not SMOKE:
            try:  # reads Triton's internals, which move between versions: a diagnostic, not a result
                result["compiled"] = compiled_kernels()
            except Exception as e:  # noqa: BLE001
                print(f"compiled-kernel resources unavailable: {e!r}")
            for c in result.get("compiled", []):
                print(f"  {c['kernel']} {c['constexprs']} warps {c['warps']} regs {c['regs']} "
                      f"spills {c['spills']} shared {c['shared']} -> {c['blocks_per_sm']} per SM")
        if args.apply_best:
            result["sweep_best"] = best_configs(result["sweep"])
            K.TUNE.update(result["sweep_best"])
            result["tune"] = dict(K.TUNE)
            print(f"benchmarking with the best configuration: {result['tune']}")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{slug}-adaln.json")

    def save():  # after each stage, so a run cut short keeps what it measured
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    if args.sweep:
        save()
    if not args.no_bench:
        print(HEADER)
        for B, N, C in shapes:
            same = copy_rate(B * N * C * 2)
            ceiling = max(same, big)
            result["shapes"][f"{B}x{N}x{C}"] = {"copy_gbps_same_size": same, "ceiling_gbps": ceiling}
            rows, fused = run_shape(B, N, C, ceiling)
            result["rows"] += rows
            result["fused_vs_separate"] += fused
            result["training_mode"] += training_mode(B, N, C)
            save()
        _print(result)
    save()
    print(f"wrote {path}")
    return 0


HEADER = (f"{'shape':>14} {'op':>21} {'pass':>7} {'triton':>7} {'%copy':>6} {'eager':>6} {'compile':>7} "
          f"{'vs comp':>7}")


def _print_row(r):
    print(f"{'x'.join(map(str, r['shape'])):>14} {r['op']:>21} {r['pass']:>7} {r['triton_gbps']:7.0f} "
          f"{100 * r['triton_frac_of_copy']:5.1f}% {r['eager_gbps']:6.0f} {r['compile_gbps']:7.0f} "
          f"{r['speedup_vs_compile']:6.2f}x", flush=True)


def _print_fused(r):
    print(f"{'x'.join(map(str, r['shape'])):>14} {r['pass']:>7} fused {r['fused_triton_ms']:.4f} ms  "
          f"sep. compiled {r['separate_compiled_ms']:.4f} ({r['speedup_vs_separate_compiled']:.2f}x)  "
          f"sep. triton {r['separate_triton_ms']:.4f} ({r['speedup_vs_separate_triton']:.2f}x)", flush=True)


def _print(result):
    print(f"\n{result['gpu']}  torch {result['torch']}  triton {result['triton']}  "
          f"copy 1 GiB {result['copy_gbps_1GiB']:.0f} GB/s")
    for s, v in result["shapes"].items():
        print(f"{s}: copy same size {v['copy_gbps_same_size']:.0f} GB/s, ceiling {v['ceiling_gbps']:.0f} GB/s")
    print("GB/s (minimal bytes), do_bench median")
    print(HEADER)
    for r in result["rows"]:
        _print_row(r)
    print("fused residual + next LN vs the two separate ops:")
    for r in result["fused_vs_separate"]:
        _print_fused(r)


if __name__ == "__main__":
    sys.exit(main())
