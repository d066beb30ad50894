"""Training loop: AdamW (fused on CUDA), EMA, bf16 autocast, clipping, warm-up, atomic
checkpoints with exact resume, JSONL metrics (and TensorBoard when installed), a progress line.

The loss is read back to the host only every `log_every` steps, so steps queue without syncs.
"""
from __future__ import annotations

import copy
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..config import Config
from ..data import Dataset
from ..diffusion.process import Process
from ..errors import ConfigError, DataError, OutputError
from ..nn.autoencoder import DiffusionAutoencoder
from ..nn.latent_prior import LatentPrior
from ..profiling import nvtx_range
from . import checkpoint
from .progress import Progress

CHECKPOINT_NAME = "last.pt"


def autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", torch.bfloat16)
    return nullcontext()


def make_optimizer(params, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    t = cfg.train
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999),
                             fused=device.type == "cuda")


def _rng_state(device: torch.device, data_gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device, data_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class BatchSampler:
    """Shuffled batches without replacement, epoch after epoch, from a dataset resident on the
    device; its state (permutation, position, generator) is part of the checkpoint."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        if batch_size > n:
            raise DataError(f"batch size {batch_size} is larger than the dataset ({n} images)")
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.perm, self.pos = torch.randperm(n, generator=generator), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
        idx = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.perm, self.pos = state["perm"], int(state["pos"])


class Trainer:
    def __init__(self, cfg: Config, data: Dataset, out_dir: str | Path, device: str | torch.device = "cpu",
                 resume: bool = False, quiet: bool = False):
        self.cfg = cfg.validate()
        self.device = torch.device(device)
        self.out_dir = Path(out_dir)
        self.ckpt_path = self.out_dir / CHECKPOINT_NAME
        self.quiet = quiet
        m = cfg.model
        if tuple(data.images.shape[1:]) != (m.channels, m.img_size, m.img_size):
            raise DataError(f"dataset {data.name!r} has images {tuple(data.images.shape[1:])} but preset "
                            f"{cfg.preset!r} expects ({m.channels}, {m.img_size}, {m.img_size}); "
                            "set model.channels / model.img_size to match")
        if self.ckpt_path.exists() and not resume:
            raise OutputError(f"{self.ckpt_path} already exists; pass --resume to continue that run "
                              "or choose another output directory")
        torch.manual_seed(cfg.train.seed)
        self.data = data.to(self.device)  # small datasets live on the device whole
        self.model = DiffusionAutoencoder(cfg).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = make_optimizer(self.model.parameters(), cfg, self.device)
        self.data_gen = torch.Generator().manual_seed(cfg.train.seed)
        self.sampler = BatchSampler(len(data), cfg.train.batch_size, self.data_gen)
        self.step = 0
        self.loss_fn = torch.compile(self.model.loss) if cfg.train.compile else self.model.loss
        if resume and self.ckpt_path.exists():
            self._resume()

    # --- checkpoints ------------------------------------------------------------------------
    def state(self) -> dict:
        return {"config": self.cfg.to_json(), "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.opt.state_dict(), "step": self.step, "sampler": self.sampler.state_dict(),
                "rng": _rng_state(self.device, self.data_gen)}

    def save(self) -> Path:
        checkpoint.save(self.ckpt_path, self.state())
        return self.ckpt_path

    def _resume(self) -> None:
        payload = checkpoint.load(self.ckpt_path, map_location=self.device)
        saved = checkpoint.config_of(payload, self.ckpt_path)
        if saved.to_dict()["model"] != self.cfg.to_dict()["model"] or \
                saved.to_dict()["encoder"] != self.cfg.to_dict()["encoder"]:
            raise ConfigError(f"{self.ckpt_path} was trained with preset {saved.preset!r} and a different "
                              f"architecture than {self.cfg.preset!r}; resume with the same preset")
        checkpoint.load_model_state(self.model, payload["model"], self.ckpt_path)
        checkpoint.load_model_state(self.ema, payload["ema"], self.ckpt_path, "EMA")
        self.opt.load_state_dict(payload["optimizer"])
        self.step = int(payload["step"])
        self.sampler.load_state_dict(payload["sampler"])
        _set_rng_state(payload["rng"], self.device, self.data_gen)

    # --- one step ---------------------------------------------------------------------------
    def _lr(self) -> float:
        t = self.cfg.train
        return t.lr * min(1.0, (self.step + 1) / max(t.warmup_steps, 1))

    def train_step(self) -> torch.Tensor:
        t = self.cfg.train
        with nvtx_range("data"):
            x0 = self.data.images[self.sampler.next().to(self.device)]
            if t.augment_flip:
                flip = torch.rand(x0.shape[0], 1, 1, 1, device=self.device) < 0.5
                x0 = torch.where(flip, x0.flip(-1), x0)
        for group in self.opt.param_groups:
            group["lr"] = self._lr()
        with nvtx_range("forward"), autocast(self.device, t.bf16):
            out = self.loss_fn(x0)
        with nvtx_range("backward"):
            self.opt.zero_grad(set_to_none=True)
            out.loss.backward()
        with nvtx_range("optimizer"):
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            self.opt.step()
        with nvtx_range("ema"):
            self._update_ema()
        self.step += 1
        return torch.stack([out.loss.detach(), out.denoise.detach(), out.reg.detach()])

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.cfg.train.ema_decay, (1 + self.step) / (10 + self.step))  # warm start
        ema_p = [p for p in self.ema.parameters()]
        torch._foreach_lerp_(ema_p, [p.detach() for p in self.model.parameters()], 1.0 - decay)

    # --- the loop ---------------------------------------------------------------------------
    def fit(self, steps: int | None = None) -> Path:
        t = self.cfg.train
        total = steps if steps is not None else t.steps
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(self.cfg.to_json())
        metrics = open(self.out_dir / "metrics.jsonl", "a")
        board = _tensorboard(self.out_dir)
        progress = Progress(total, self.step)
        acc, acc_n, t_last, step_last = None, 0, time.perf_counter(), self.step
        try:
            while self.step < total:
                losses = self.train_step()
                acc = losses if acc is None else acc + losses
                acc_n += 1
                last = self.step == total
                if self.step % t.log_every == 0 or last:
                    loss, denoise, reg = (acc / acc_n).tolist()  # the one host sync per log interval
                    if loss != loss:
                        raise FloatingPointError(f"loss became NaN at step {self.step}")
                    now = time.perf_counter()
                    rate = (self.step - step_last) * t.batch_size / (now - t_last)
                    rec = {"step": self.step, "loss": loss, "denoise": denoise, "reg": reg,
                           "lr": self._lr(), "img_per_s": round(rate, 1), "time": time.time()}
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    if board is not None:
                        for k in ("loss", "denoise", "reg", "lr", "img_per_s"):
                            board.add_scalar(k, rec[k], self.step)
                    if not self.quiet:
                        progress.update(self.step, loss=loss)
                    acc, acc_n, t_last, step_last = None, 0, now, self.step
                if self.step % t.ckpt_every == 0 or last:
                    self.save()
        finally:
            metrics.close()
            if board is not None:
                board.close()
            if not self.quiet:
                progress.close()
        return self.ckpt_path


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out_dir / "tb"))


@torch.no_grad()
def encode_dataset(model: DiffusionAutoencoder, images: torch.Tensor, batch_size: int = 512,
                   t: float | list[float] | None = None) -> torch.Tensor:
    """Embeddings of a whole image tensor, in batches, under bf16 autocast on CUDA."""
    device = next(model.parameters()).device
    outs = []
    for i in range(0, images.shape[0], batch_size):
        with autocast(device, True):
            outs.append(model.encode(images[i:i + batch_size].to(device), t).float())
    return torch.cat(outs)


def train_latent_prior(model: DiffusionAutoencoder, images: torch.Tensor, steps: int = 3000,
                       batch_size: int = 256, lr: float = 1e-4, width: int | None = None, depth: int = 10,
                       seed: int = 0, quiet: bool = False) -> LatentPrior:
    """DiffAE's second stage: a diffusion model over standardised codes z, encoder frozen."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    z = encode_dataset(model, images)
    z_dim = z.shape[1]
    prior = LatentPrior(z_dim, width or max(256, min(2048, 4 * z_dim)), depth).to(device)
    prior.mean.copy_(z.mean(0))
    prior.std.copy_(z.std(0).clamp_min(1e-6))
    zs = prior.standardise(z)
    process = Process(model.cfg.diffusion.__class__(process="vp-cosine"))
    opt = torch.optim.AdamW(prior.parameters(), lr=lr, weight_decay=0.01, fused=device.type == "cuda")
    progress = Progress(steps, unit="prior step")
    for step in range(1, steps + 1):
        batch = zs[torch.randint(0, zs.shape[0], (min(batch_size, zs.shape[0]),), device=device)]
        t = torch.rand(batch.shape[0], device=device)
        alpha, sigma = process.alpha_sigma(t)
        eps = torch.randn_like(batch)
        loss = (prior(alpha[:, None] * batch + sigma[:, None] * eps, t) - eps).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not quiet and (step % 250 == 0 or step == steps):
            progress.update(step, loss=float(loss.detach()))
    if not quiet:
        progress.close()
    return prior.eval().requires_grad_(False)
