"""The training step's EMA update over a preset's parameters: one-launch kernel vs torch._foreach_lerp_.

    python3 benchmarks/bench_ema.py [--preset dae-b] [--out benchmarks/results]

The lists are the model's fp32 parameters and an EMA copy.  Timed, in device ms per call (median,
CUDA events): ops.multi_tensor_lerp_ with the step's device flag as weight (what the trainer runs);
torch._foreach_lerp_ with that flag (one kernel per tensor: what it replaced); and
torch._foreach_lerp_ with a Python-float weight (PyTorch's multi-tensor path, which needs the flag
on the host: a sync per step).  GB/s counts 2 reads + 1 write per element, against the
device-to-device copy rate measured in the same run.  JSON to <out>/<gpu-slug>-ema.json.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import ceilings, time_ms, write_result  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="dae-b")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_ema: needs a CUDA device", file=sys.stderr)
        return 1
    from diffae import ops
    from diffae.config import get_preset
    from diffae.nn.autoencoder import DiffusionAutoencoder
    from diffae.ops.multi_tensor import multi_tensor_lerp_reference_

    model = DiffusionAutoencoder(get_preset(args.preset)).cuda()
    src = [p.detach() for p in model.parameters()]
    dst = [p.clone() for p in src]
    ok = torch.tensor(True, device="cuda")
    elements = sum(p.numel() for p in src)
    gbytes = 3 * 4 * elements / 1e9
    ceiling = ceilings()
    runs = {
        "multi_tensor_lerp_": lambda: ops.multi_tensor_lerp_(dst, src, 1e-3, ok),
        "foreach_lerp_device_weight": lambda: multi_tensor_lerp_reference_(dst, src, 1e-3, ok),
        "foreach_lerp_host_weight": lambda: torch._foreach_lerp_(dst, src, 1e-3),
    }
    rows = []
    print(f"{args.preset}: {len(src)} tensors, {elements / 1e6:.1f} M fp32 elements; copy {ceiling['copy_TBps']} TB/s")
    for name, fn in runs.items():
        ms = time_ms(fn)
        rows.append({"what": name, "ms": round(ms, 4), "GBps": round(gbytes / ms * 1e3, 1),
                     "of_copy": round(gbytes / ms * 1e3 / (ceiling["copy_TBps"] * 1e3), 3)})
        print(rows[-1])
    path = write_result("ema", {"preset": args.preset, "tensors": len(src), "elements": elements,
                                "ceilings": ceiling, "rows": rows}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
