"""Training throughput beside the yardstick, and a real short run.

  python benchmarks/bench_train.py suite
      dae-b 32x32x3 batch 256 and dae-l 64x64x3 batch 32, each: img/s, MFU, peak memory and
      compile time of diffae's train step, then the yardstick (.yardstick/plain_dit.py train) at
      the same image size, batch and compile setting in the same call; one JSON per setting to
      benchmarks/results/<gpu>-train-....json
  python benchmarks/bench_train.py throughput --preset dae-b --img 32 --channels 3 --batch 256
      one setting ([--no-compile] [--grad-accum N] [--activation-checkpointing] [--no-yardstick])
  torchrun --nproc-per-node 2 benchmarks/bench_train.py throughput ...
      the same, data-parallel: --batch is the global batch; img/s counts all GPUs, MFU is per GPU;
      the yardstick (one GPU) runs on rank 0's GPU afterwards
  python benchmarks/bench_train.py run --preset dae-b --steps 200 --out DIR
      trains the preset on Fashion-MNIST for N steps (metrics.jsonl, checkpoint), then samples a grid

Timing: 2 first steps (they include compilation: compile_s is their time less two steady steps),
--warmup steps, then --iters steps timed with CUDA events (the same count on every rank, so the
collectives match).  MFU = model FLOPs (diffae.engine.flops) x img/s / (GPUs x the bf16 matmul
rate measured in the same call).  The yardstick is the DiT-B/2 + ViT-512x6 autoencoder: its img/s
compares like with like for dae-b only; for other presets compare MFU.

On the CPU (no yardstick, no MFU) it checks the script:  python benchmarks/bench_train.py
throughput --preset dae-tiny --img 28 --channels 1 --batch 8 --iters 2 --warmup 0 --results /tmp/r
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import ceilings, write_result  # noqa: E402
from diffae.config import get_preset  # noqa: E402
from diffae.data import Dataset, load  # noqa: E402
from diffae.engine import distributed, flops  # noqa: E402
from diffae.engine.trainer import Trainer  # noqa: E402

YARDSTICK = REPO / ".yardstick" / "plain_dit.py"
YARDSTICK_SHAPES = {"model": (768, 12, 12, 2), "encoder": (512, 6, 8, 4, 512)}
# dae-l at 64x64 keeps ~40 B per token, layer and width unit for the backward: batch 32 is ~32 GiB;
# larger batches want --activation-checkpointing (or a bigger GPU)
SUITE = (("dae-b", 32, 256), ("dae-l", 64, 32))


def add_trainer_args(p: argparse.ArgumentParser, batch: int = 256) -> None:
    """The options make_trainer reads (shared with profile_train.py)."""
    p.add_argument("--preset", default="dae-b")
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=batch, help="the global batch")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the loss (default: on CUDA)")
    p.add_argument("--compile-mode", default="auto", help="train.compile_mode")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--data-parallel", default="ddp", help="train.data_parallel under torchrun: ddp or fsdp")
    p.add_argument("--activation-checkpointing", action="store_true")


def make_trainer(a, device: torch.device, out: Path) -> Trainer:
    """A Trainer for preset a.preset on random a.img x a.img x a.channels images (4 batches' worth)."""
    compile_ = "auto" if a.compile is None else str(a.compile).lower()
    cfg = get_preset(a.preset).override([
        f"model.img_size={a.img}", f"model.channels={a.channels}", f"train.batch_size={a.batch}",
        f"train.compile={compile_}", f"train.compile_mode={a.compile_mode}", f"train.grad_accum={a.grad_accum}",
        f"train.data_parallel={a.data_parallel}",
        f"model.activation_checkpointing={str(a.activation_checkpointing).lower()}",
        "train.log_every=1000000", "train.ckpt_every=1000000"])
    g = torch.Generator().manual_seed(0)
    data = Dataset(torch.rand(4 * a.batch, a.channels, a.img, a.img, generator=g) * 2 - 1, None, "random")
    return Trainer(cfg, data, out, device, quiet=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(trainer: Trainer, iters: int, device: torch.device) -> float:
    """Seconds per train step over `iters` steps (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            trainer.train_step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        trainer.train_step()
    return (time.perf_counter() - t0) / iters


def _same_shapes_as_yardstick(cfg) -> bool:
    m, e = cfg.model, cfg.encoder
    return ((m.dim, m.depth, m.heads, m.patch) == YARDSTICK_SHAPES["model"]
            and (e.dim, e.depth, e.heads, e.patch, e.z_dim) == YARDSTICK_SHAPES["encoder"])


def yardstick(a, compiled: bool) -> dict:
    """The yardstick's train record at the same image size, batch and compile setting (its own process)."""
    if not YARDSTICK.exists():
        return {"skipped": f"{YARDSTICK} is missing (cp -r ../shared/yardstick .yardstick)"}
    cmd = [sys.executable, str(YARDSTICK), "train", "--img", str(a.img), "--batch", str(a.batch)]
    cmd += ["--compile"] if compiled else []
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"failed": " ".join(cmd), "stderr": proc.stderr[-1500:]}
    return json.loads(lines[-1])


def compile_phases(top: int = 16) -> dict[str, float]:
    """The compiler's seconds per phase so far (Dynamo's own timers, nested phases counted inside
    their parents), longest first: where a cold compile goes."""
    from torch._dynamo.utils import compilation_time_metrics
    totals = {name: round(sum(times), 1) for name, times in compilation_time_metrics.items()}
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])[:top])


def throughput(a, world: distributed.World, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    ceil = ceilings() if cuda else {}  # before the model: memory figures are the train step's alone
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer = make_trainer(a, device, Path(a.out) / f"throughput-{a.preset}")
    cfg = trainer.cfg
    t0 = time.perf_counter()
    trainer.train_step()
    second_loss = float(trainer.train_step()[0])  # now: a graph replay overwrites its outputs
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(a.warmup):
        trainer.train_step()
    step_s = _time_steps(trainer, a.iters, device)
    img_per_s = a.batch / step_s
    flops_per_image = flops.train_flops_per_image(cfg)
    peak = ceil.get("bf16_matmul_TFLOPs", 0) * 1e12 or None
    mfu = flops.mfu(flops_per_image, img_per_s, peak, world.size)
    rec = {"what": "diffae_train", "preset": a.preset, "img": a.img, "channels": a.channels, "batch": a.batch,
           "gpus": world.size if cuda else 0, "processes": world.size, "grad_accum": a.grad_accum,
           "data_parallel": ("fsdp" if trainer.sharded else "ddp") if world.distributed else None,
           "activation_checkpointing": a.activation_checkpointing, "compile": trainer.compiled,
           "compile_mode": trainer.compile_mode,
           "img_per_s": round(img_per_s, 1), "step_ms": round(1e3 * step_s, 2),
           "first_two_steps_s": round(first, 1), "compile_s": round(max(first - 2 * step_s, 0.0), 1),
           "second_step_loss": second_loss,
           "train_GFLOP_per_img": round(flops_per_image / 1e9, 2), "mfu": None if mfu is None else round(mfu, 4),
           "params_M": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 1)}
    if trainer.compiled:
        rec["compile_phases_s"] = compile_phases()
    if cuda:
        rec["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)  # per GPU
        rec["peak_reserved_GiB"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    else:
        rec["peak_rss_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()  # room for the yardstick's process
    if not world.main:
        return rec
    print(json.dumps(rec), flush=True)
    payload = {"ceilings": ceil, "result": rec}
    if cuda and a.yardstick:
        ys = yardstick(a, rec["compile"])
        print(json.dumps(ys), flush=True)
        payload["yardstick"] = ys
        if "img_per_s" in ys:
            ys_cfg = get_preset("dae-b").override([f"model.img_size={a.img}", "model.channels=3"])
            ys_mfu = flops.mfu(flops.train_flops_per_image(ys_cfg), ys["img_per_s"], peak)
            per_gpu = img_per_s / world.size
            payload["comparison"] = {
                "same_shapes": _same_shapes_as_yardstick(cfg) and a.channels == 3,
                "img_per_s_per_gpu_ratio": round(per_gpu / ys["img_per_s"], 3),
                "yardstick_mfu": None if ys_mfu is None else round(ys_mfu, 4),
                "mfu_ratio": None if not (mfu and ys_mfu) else round(mfu / ys_mfu, 3)}
            print(json.dumps(payload["comparison"]), flush=True)
    tag = (f"train-{a.preset}-{a.img}px-b{a.batch}{'-compiled' if rec['compile'] else ''}"
           f"{f'-x{world.size}' if world.distributed else ''}{'-fsdp' if rec['data_parallel'] == 'fsdp' else ''}"
           f"{f'-accum{a.grad_accum}' if a.grad_accum > 1 else ''}"
           f"{'-ckpt' if a.activation_checkpointing else ''}"
           f"{'-graphed' if cuda and rec['compile_mode'] == 'reduce-overhead' else ''}")
    print(f"wrote {write_result(tag, payload, a.results)}", flush=True)
    return rec


def run(a, device: torch.device) -> None:
    out = Path(a.out)
    compile_ = "auto" if a.compile is None else str(a.compile).lower()
    cfg = get_preset(a.preset).override([f"train.steps={a.steps}", f"train.batch_size={a.batch}",
                                         "train.log_every=10", f"train.ckpt_every={a.steps}",
                                         f"train.compile={compile_}"])
    from diffae.engine.pipeline import Pipeline
    from diffae.images import grid, save_png
    data = load("fashion-mnist")
    trainer = Trainer(cfg, data, out, device)
    t0 = time.perf_counter()
    trainer.fit()
    _sync(device)
    wall = time.perf_counter() - t0
    pipe = Pipeline.from_checkpoint(out / "last.pt", device)
    z = pipe.encode(data.images[:64])
    t1 = time.perf_counter()
    x = pipe.sample(64, steps=20, sampler="ddim", z=z)
    _sync(device)
    sample_s = time.perf_counter() - t1
    save_png(grid(x), out / "samples.png", upscale=2)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    print(json.dumps({"what": "train_run", "preset": a.preset, "steps": a.steps, "batch": a.batch,
                      "compile": trainer.compiled, "wall_s": round(wall, 1), "final_loss": last["loss"],
                      "img_per_s_last": last["img_per_s"], "mfu_last": last.get("mfu"),
                      "sample_64x20_s": round(sample_s, 2), "peak_mem_GiB":
                      round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}),
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("suite", "throughput", "run"))
    add_trainer_args(p)
    p.add_argument("--steps", type=int, default=200, help="run: training steps")
    p.add_argument("--iters", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="steps after the first two, before timing")
    p.add_argument("--yardstick", action=argparse.BooleanOptionalAction, default=True,
                   help="run .yardstick/plain_dit.py train beside each setting (CUDA only)")
    p.add_argument("--device", default=None)
    p.add_argument("--results", default=None, help="JSON folder (default: benchmarks/results)")
    p.add_argument("--out", default="runs/bench")
    a = p.parse_args()
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the yardstick does (fp32 matmuls outside autocast)
    world, device = distributed.init(device)
    try:
        if a.what == "run":
            run(a, device)
        elif a.what == "throughput":
            throughput(a, world, device)
        else:
            for preset, img, batch in SUITE:
                a.preset, a.img, a.batch = preset, img, batch
                try:
                    throughput(a, world, device)
                except torch.OutOfMemoryError as exc:  # the next setting may still fit
                    print(json.dumps({"what": "diffae_train", "preset": preset, "img": img, "batch": batch,
                                      "out_of_memory": str(exc).split(". ")[0]}), flush=True)
                gc.collect()
                torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
