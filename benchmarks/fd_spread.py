"""How much FD-FMNIST moves between draws of the same setting: a checkpoint's unconditional samples
scored several times with fresh seeds, per step count, so one FD difference can be read against it.

    python benchmarks/fd_spread.py --ckpt runs/dae-tiny/last.pt --steps 10 100 --draws 4 --json fd-spread.json

Prints one JSON line per step count: the scores, their mean and their relative spread ((max - min) / mean).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import environment  # noqa: E402
from diffae.data import fashion_mnist  # noqa: E402
from diffae.engine.pipeline import Pipeline  # noqa: E402
from diffae.errors import DiffaeError  # noqa: E402
from diffae.eval import fd as fdlib  # noqa: E402


def spread(ckpt: str, steps_list, draws: int, n: int, sampler: str, batch: int, device) -> list[dict]:
    pipe = Pipeline.from_checkpoint(ckpt, device)
    scorer = fdlib.FDFMNIST(fashion_mnist("test").images, pipe.device)
    rows = []
    for steps in steps_list:
        scores, t0 = [], time.perf_counter()
        for d in range(draws):
            # seeds far from diffae eval's (seed + 1000 + 2k), one block per draw
            x = torch.cat([pipe.sample(min(batch, n - i), steps=steps, sampler=sampler, seed=100_000 * (d + 1) + 2 * k)
                           for k, i in enumerate(range(0, n, batch))])
            scores.append(scorer.score(x))
        mean = sum(scores) / len(scores)
        rows.append({"sampler": sampler, "steps": steps, "n": n, "draws": draws, "fd": scores, "mean": mean,
                     "relative_spread": (max(scores) - min(scores)) / mean,
                     "seconds_per_draw": round((time.perf_counter() - t0) / draws, 2)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--n", type=int, default=1000, help="samples per draw (diffae eval's default)")
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None, help="also write the rows and the environment here")
    a = ap.parse_args(argv)
    if a.draws < 2 or a.n < 2:
        print(f"fd_spread: error: --draws and --n must be >= 2, got {a.draws} and {a.n}", file=sys.stderr)
        return 2
    try:
        rows = spread(a.ckpt, a.steps, a.draws, a.n, a.sampler, a.batch, a.device)
    except DiffaeError as exc:
        print(f"fd_spread: error: {exc}", file=sys.stderr)
        return 2
    for row in rows:
        print(json.dumps(row), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"environment": environment(), "ckpt": a.ckpt, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
