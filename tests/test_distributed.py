"""Data-parallel training on the CPU: `torchrun --nproc-per-node 2 -m diffae train` with gloo
gives the run of one process on the same global batch (up to the order of floating-point sums),
and a 2-process checkpoint resumes on 1 process.

torchrun --standalone picks a free port for the rendezvous; the two workers are real processes
running the CLI, as on a GPU machine.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from diffae.cli import main
from diffae.engine import checkpoint

REPO = Path(__file__).resolve().parent.parent
# a Gaussian code and flips: every kind of per-image randomness is split between the ranks
ARGS = ["--data", "synthetic", "--batch-size", "16", "--prior-steps", "0", "--quiet", "--device", "cpu",
        "--seed", "3", "--no-compile",
        *[a for kv in ("model.dim=32", "model.depth=2", "model.heads=2", "model.patch=4", "encoder.dim=32",
                       "encoder.depth=1", "encoder.heads=2", "encoder.patch=7", "encoder.z_dim=8",
                       "encoder.latent=gaussian", "encoder.kl_weight=1e-3", "train.augment_flip=true",
                       "train.warmup_steps=2", "train.log_every=2", "train.lr=2e-3") for a in ("--set", kv)]]


def _torchrun(nproc: int, argv: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", "-m", "diffae", *argv],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(a: Path, b: Path) -> None:
    torch.testing.assert_close(_losses(a), _losses(b), rtol=1e-5, atol=0)
    pa, pb = checkpoint.load(a / "last.pt"), checkpoint.load(b / "last.pt")
    assert pa["step"] == pb["step"]
    for part in ("model", "ema"):
        for name, value in pa[part].items():
            torch.testing.assert_close(value, pb[part][name], rtol=1e-4, atol=2e-6, msg=f"{part}.{name}")


def test_two_processes_train_like_one_and_resume_on_one(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    # 2 ranks x 2 micro-batches of 4 images against 1 process with the whole batch of 16
    _torchrun(2, ["train", "--out", str(two), "--steps", "4", "--set", "train.grad_accum=2", *ARGS])
    # rank 0 alone wrote (tb/ when tensorboard is installed; the lock file goes with the run)
    assert {p.name for p in two.iterdir()} - {"tb", "train.lock"} == {"config.json", "last.pt", "metrics.jsonl"}
    assert main(["train", "--out", str(one), "--steps", "4", *ARGS]) == 0
    _assert_same_run(two, one)
    # the 2-process checkpoint continues on 1 process with the same data order and noise
    assert main(["train", "--out", str(two), "--steps", "8", "--resume", *ARGS]) == 0
    assert main(["train", "--out", str(one), "--steps", "8", "--resume", *ARGS]) == 0
    _assert_same_run(two, one)
