"""Data-parallel training on the CPU: `torchrun --nproc-per-node 2 -m diffae train` with gloo,
replicated (DDP) or sharded (FSDP2), gives the run of one process on the same global batch (up to
the order of floating-point sums), and its checkpoint resumes on another number of processes.

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


def _torchrun(nproc: int, argv: list[str], script: Path | None = None) -> str:
    """`torchrun -m diffae ARGV`, or the script with ARGV; returns its stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", *([str(script)] if script else ["-m", "diffae"]), *argv],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stderr


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


FSDP = ["--set", "train.data_parallel=fsdp"]

# what each rank holds after sharding: its local elements of the model's and the EMA's weights,
# and of the optimizer state after one step
_SHARD_SIZES = """
import json, sys, torch
from diffae.config import get_preset
from diffae.data import load
from diffae.engine import distributed, sharding
from diffae.engine.trainer import Trainer
cfg = get_preset("dae-tiny").override(["train.dataset=synthetic", "train.data_parallel=fsdp", "train.compile=false",
                                       "train.batch_size=8"])
world, device = distributed.init(torch.device("cpu"))
trainer = Trainer(cfg, load("synthetic", "train"), sys.argv[1], "cpu", quiet=True)
trainer.train_step()
size = lambda ts: sum(sharding.local(t).numel() for t in ts)
state = [v for s in trainer.opt.state.values() for k, v in s.items() if k != "step"]
whole = sum(p.numel() for p in trainer.model.parameters())
print(json.dumps({"rank": world.rank, "whole": whole, "model": size(trainer.model.parameters()),
                  "ema": size(trainer.ema.parameters()), "adam": size(state)}), file=open(f"{sys.argv[1]}/{world.rank}.json", "w"))
del trainer, state
distributed.shutdown()  # as the CLI does: the dead training state freed while the group exists
"""


def test_fsdp_holds_a_shard_of_the_weights_optimizer_and_ema_on_each_rank(tmp_path):
    script = tmp_path / "shard_sizes.py"
    script.write_text(_SHARD_SIZES)
    _torchrun(2, [str(tmp_path)], script)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    whole = ranks[0]["whole"]
    for r in ranks:  # each rank about half (dim-0 shards: a few rows of padding at most)
        assert 0.45 * whole < r["model"] < 0.55 * whole, r
        assert r["ema"] == r["model"] and r["adam"] == 2 * r["model"], r
    assert sum(r["model"] for r in ranks) == whole


def test_fsdp_trains_like_one_process_and_resumes_on_either(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    # z as cross-attention tokens: their key/value projections run outside the sharded sublayers
    args = [*ARGS, "--set", "model.conditioning=cross-attn"]
    # sharded over 2 ranks x 2 micro-batches, blocks recomputed in the backward (activation
    # checkpointing gathers their shards again), and the latent prior fitted from the gathered EMA
    log = _torchrun(2, ["train", "--out", str(two), "--steps", "4", "--set", "train.grad_accum=2", *args, *FSDP,
                        "--set", "model.activation_checkpointing=true", "--prior-steps", "2"])
    assert "on 2 x cpu (FSDP2, sharded)" in log
    assert "latent_prior" in checkpoint.load(two / "last.pt")
    assert main(["train", "--out", str(one), "--steps", "4", *args]) == 0
    _assert_same_run(two, one)
    # the sharded checkpoint (one process's layout) resumes sharded, its optimizer state re-sharded
    _torchrun(2, ["train", "--out", str(two), "--steps", "6", "--resume", *args, *FSDP])
    assert main(["train", "--out", str(one), "--steps", "6", "--resume", *args]) == 0
    _assert_same_run(two, one)
    # and on one process
    assert main(["train", "--out", str(two), "--steps", "8", "--resume", *args]) == 0
    assert main(["train", "--out", str(one), "--steps", "8", "--resume", *args]) == 0
    _assert_same_run(two, one)
