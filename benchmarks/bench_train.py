"""Training throughput and a real short run on the GPU.

  python benchmarks/bench_train.py run --preset dae-b --steps 200 --out DIR
      trains the preset on Fashion-MNIST for N steps (metrics.jsonl, checkpoint), then samples a grid
  python benchmarks/bench_train.py throughput --preset dae-b --img 32 --channels 3 --batch 256 [--compile]
      img/s of diffae's train step on random images (the yardstick's setting), JSON to benchmarks/results/
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import ceilings, write_result  # noqa: E402
from diffae.config import get_preset  # noqa: E402
from diffae.data import Dataset, load  # noqa: E402
from diffae.engine.pipeline import Pipeline  # noqa: E402
from diffae.engine.trainer import Trainer  # noqa: E402
from diffae.images import grid, save_png  # noqa: E402


def run(a) -> None:
    out = Path(a.out)
    cfg = get_preset(a.preset).override([f"train.steps={a.steps}", f"train.batch_size={a.batch}",
                                         "train.log_every=10", f"train.ckpt_every={a.steps}",
                                         f"train.compile={str(a.compile).lower()}"])
    data = load("fashion-mnist")
    trainer = Trainer(cfg, data, out, "cuda")
    t0 = time.perf_counter()
    trainer.fit()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    pipe = Pipeline.from_checkpoint(out / "last.pt", "cuda")
    z = pipe.encode(data.images[:64])
    t1 = time.perf_counter()
    x = pipe.sample(64, steps=20, sampler="ddim", z=z)
    torch.cuda.synchronize()
    sample_s = time.perf_counter() - t1
    save_png(grid(x), out / "samples.png", upscale=2)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    print(json.dumps({"what": "train_run", "preset": a.preset, "steps": a.steps, "batch": a.batch,
                      "wall_s": round(wall, 1), "final_loss": last["loss"], "img_per_s_last": last["img_per_s"],
                      "sample_64x20_s": round(sample_s, 2), "peak_mem_GiB":
                      round(torch.cuda.max_memory_allocated() / 2**30, 2)}), flush=True)


def throughput(a) -> None:
    cfg = get_preset(a.preset).override([f"model.img_size={a.img}", f"model.channels={a.channels}",
                                         f"train.batch_size={a.batch}", f"train.compile={str(a.compile).lower()}",
                                         "train.log_every=1000000", "train.ckpt_every=1000000"])
    g = torch.Generator().manual_seed(0)
    data = Dataset(torch.rand(4 * a.batch, a.channels, a.img, a.img, generator=g) * 2 - 1, None, "random")
    trainer = Trainer(cfg, data, Path(a.out) / "throughput", "cuda", quiet=True)
    t0 = time.perf_counter()
    trainer.train_step()
    trainer.train_step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(10):
        trainer.train_step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.iters):
        trainer.train_step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    rec = {"what": "diffae_train", "preset": a.preset, "img": a.img, "batch": a.batch, "compile": a.compile,
           "img_per_s": round(a.iters * a.batch / dt, 1), "first_two_steps_s": round(first, 1),
           "params_M": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 1),
           "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    print(json.dumps(rec), flush=True)
    path = write_result(f"train-{a.preset}{'-compiled' if a.compile else ''}",
                        {"ceilings": ceilings(), "result": rec})
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("run", "throughput"))
    p.add_argument("--preset", default="dae-b")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default="runs/bench")
    a = p.parse_args()
    run(a) if a.what == "run" else throughput(a)


if __name__ == "__main__":
    main()
