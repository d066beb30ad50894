"""Detail control (Mittal et al.): the noise range a time-dependent encoder is trained on decides
what its code keeps.  Trains one `drl` model per range of t, then probes E(x0, t) across t.

    python benchmarks/detail_control.py --out benchmarks/results/detail-control-cpu --tiny --steps 1200

--tiny shrinks the preset to dae-tiny's widths so that the study runs on a CPU in about half an
hour; without it, the full `drl` preset (a GPU job).  Writes OUT/results.json and OUT/results.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from diffae.config import get_preset
from diffae.data import load
from diffae.engine.trainer import Trainer
from diffae.eval.run import EvalOptions, evaluate

TINY = ["model.dim=96", "model.depth=4", "model.heads=4", "model.patch=4", "encoder.dim=64", "encoder.depth=2",
        "encoder.heads=4", "encoder.patch=7", "encoder.z_dim=32", "train.batch_size=64", "train.lr=1e-3",
        "train.warmup_steps=50", "train.ema_decay=0.995", "train.log_every=100", "train.ckpt_every=100000"]
RANGES = {"all noise levels": (1e-5, 1.0), "low noise only": (1e-5, 0.5), "high noise only": (0.5, 1.0)}
PROBE_T = (0.1, 0.3, 0.5, 0.7, 0.9)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--n-train", type=int, default=None, help="train images for the probes (default all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load("fashion-mnist", "train")
    rows = []
    for name, (t_min, t_max) in RANGES.items():
        cfg = get_preset("drl").override((TINY if a.tiny else []) + [
            f"train.steps={a.steps}", f"diffusion.t_min={t_min}", f"diffusion.t_max={t_max}"])
        run = out / f"run_t{t_min:g}-{t_max:g}"
        print(f"[detail] training drl on t in [{t_min:g}, {t_max:g}] ({name}) -> {run}", file=sys.stderr)
        t0 = time.perf_counter()
        ckpt = Trainer(cfg, data, run, a.device, resume=True).fit()
        train_s = time.perf_counter() - t0
        res = evaluate(ckpt, run / "eval", EvalOptions(device=a.device, n_train=a.n_train, probe_t=PROBE_T,
                                                       sections=("representation", "detail")), overwrite=True)
        rows.append({"range": name, "t_min": t_min, "t_max": t_max, "train_s": round(train_s, 1),
                     "representation": res["representation"], "detail_control": res["detail_control"]})
        (out / "results.json").write_text(json.dumps({"command": " ".join(sys.argv), "steps": a.steps,
                                                      "tiny": a.tiny, "runs": rows}, indent=1))
    lines = ["| trained on t in | " + " | ".join(f"probe at t={t:g}" for t in PROBE_T) + " | concatenated |",
             "|---" * (len(PROBE_T) + 2) + "|"]
    for r in rows:
        by_t = {d["t"]: d["linear_probe"] for d in r["detail_control"]}
        concat = r["representation"][-1]["linear_probe"]["accuracy"]  # the multi-level code
        lines.append(f"| [{r['t_min']:g}, {r['t_max']:g}] ({r['range']}) | "
                     + " | ".join(f"{100 * by_t[t]:.1f} %" for t in PROBE_T) + f" | {100 * concat:.1f} % |")
    (out / "results.md").write_text("# Detail control: linear-probe accuracy of E(x0, t)\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
