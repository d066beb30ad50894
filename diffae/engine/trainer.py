"""Training loop: fused AdamW, EMA, bf16 autocast, clipping, warm-up, atomic checksummed
checkpoints with exact resume, JSONL metrics (and TensorBoard when installed), a progress line.

The loss is read back to the host only every `log_every` steps, so steps queue without syncs.

train.max_minutes bounds the wall-clock time of one fit() call: past it the loop stops as if it
had reached train.steps (last log record, checkpoint) and says so; the budget is this call's own,
so a resumed run gets it again.

Throughput options: torch.compile of the loss (train.compile, "auto": on CUDA; train.compile_mode,
"auto": its forward and backward replayed as CUDA graphs on one GPU), gradient
accumulation (train.grad_accum), activation checkpointing (model.activation_checkpointing) and
data parallelism under torchrun (train.data_parallel: DistributedDataParallel, see
engine/distributed.py, or FSDP2, which shards the model, optimizer and EMA, see engine/sharding.py).  Every
rank draws the randomness of the whole global batch from the same seed and takes its slice, so a
run does not depend on the number of ranks or micro-batches, and resumes on any number of them.
The log reports images/s and, on CUDA, MFU (engine/flops.py).

Faults it survives:
- SIGKILL at any moment: checkpoints are atomic and checksummed, `resume=True` continues
  bit-exactly from the last complete one; a killed run's temporary files are removed.
- SIGINT / SIGTERM during fit(): the current step finishes, a checkpoint is written, and
  TrainingInterrupted says where (the CLI exits 130 / 143).
- Non-finite loss or gradients: detected on the device (no extra host sync), the update of
  the weights, the optimizer state and the EMA is skipped, the skip counted; after
  train.max_nonfinite_steps in a row (checked every log_every steps and before each
  checkpoint) NonFiniteError stops training, keeping the last good checkpoint.
- Out of device memory: TrainingOutOfMemory names the batch size and preset.
- Disk full / read-only: checkpoint.save leaves the previous file intact, OutputError.
- Two runs on one directory: the second gets RunLockedError naming the first one's pid.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from .. import ops
from ..config import Config, resolve_compile, resolve_compile_mode
from ..data import Dataset
from ..errors import ConfigError, DataError, DiffaeError, OutputError
from ..nn.autoencoder import DiffusionAutoencoder
from ..nn.latent_prior import LatentPrior
from ..profiling import TraceWindow, nvtx_range
from . import checkpoint, distributed, flops, sharding
from .lock import RunLock
from .progress import Progress

CHECKPOINT_NAME = "last.pt"


class TrainingInterrupted(DiffaeError):
    """SIGINT or SIGTERM arrived; a checkpoint was written first.  exit_code: 128 + signal."""

    def __init__(self, message: str, signum: int, path: Path, step: int):
        super().__init__(message)
        self.signum, self.path, self.step = signum, path, step
        self.exit_code = 128 + signum


class NonFiniteError(DiffaeError, FloatingPointError):
    """Too many non-finite losses or gradients in a row."""


class TrainingOutOfMemory(DiffaeError, MemoryError):
    """The device ran out of memory; the message names the batch size and preset."""


def autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", torch.bfloat16)
    return nullcontext()


def make_optimizer(params, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """Fused AdamW (CPU and CUDA): one kernel per step, and it honours `opt.found_inf`, a device
    flag that skips the whole update, which is how non-finite steps are skipped without a sync, and
    `opt.grad_scale`, a device divisor of every gradient, which is how gradients are clipped."""
    t = cfg.train
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999),
                             fused=device.type in ("cuda", "cpu"))


class _SignalGuard:
    """Turns the first SIGINT/SIGTERM into a flag the loop checks after each step (a second one
    raises KeyboardInterrupt at once).  Only in the main thread, where Python delivers signals;
    the previous handlers are restored on exit."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s)

    def __init__(self):
        self.received: int | None = None
        self.previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> "_SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous.clear()


def _oom_message(exc: BaseException, cfg: Config, device: torch.device, where: str, ckpt: str) -> str:
    """One line: what ran out, with which batch size and preset, what to try; the allocator's
    first sentence and its request size, not its whole report."""
    bs = cfg.train.batch_size
    sentences = [x.strip().rstrip(".") for x in str(exc).split(". ")]
    detail = "; ".join([sentences[0]] + [x for x in sentences[1:] if x.startswith("Tried to allocate")])
    return (f"out of {'GPU ' if device.type == 'cuda' else ''}memory {where} (preset {cfg.preset!r}, batch size "
            f"{bs}, on {device}): {detail or 'out of memory'}; try --batch-size {max(bs // 2, 1)}, a smaller preset, "
            f"or trade time for memory with gradient accumulation (--set train.grad_accum=2) or activation "
            f"checkpointing (--set model.activation_checkpointing=true), or under torchrun shard the model "
            f"over the GPUs (--set train.data_parallel=fsdp); {ckpt}")


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
    device; its state (permutation, position, generator) is part of the checkpoint.

    The indices come from a copy of each epoch's permutation on `device`: indexing the data with
    CPU indices would copy them to the device every step, and torch's copy from pageable memory
    synchronises the stream, so the host would wait for the previous step each time instead of
    queueing the next one while it runs (what keeps a small model's GPU busy).  The epoch's copy
    goes through pinned memory, asynchronously, for the same reason."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, device: torch.device | None = None):
        if batch_size > n:
            raise DataError(f"batch size {batch_size} is larger than the dataset ({n} images)")
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self._set(torch.randperm(n, generator=generator), 0)

    def _set(self, perm: torch.Tensor, pos: int) -> None:
        self.perm, self.pos = perm, pos
        if self.device.type == "cuda":  # self.perm is never written, so the async copy may read it later
            self.perm = perm = perm.pin_memory()
        self._perm_here = perm.to(self.device, non_blocking=True)

    def next(self) -> torch.Tensor:
        """The next batch's indices, on the sampler's device."""
        if self.pos + self.batch_size > self.n:
            self._set(torch.randperm(self.n, generator=self.generator), 0)
        idx = self._perm_here[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self._set(state["perm"].cpu(), int(state["pos"]))


class _StepLoss(torch.nn.Module):
    """model.loss as a module's forward: the call DistributedDataParallel wraps (it reduces the
    gradients after its forward's backward) and torch.compile compiles."""

    def __init__(self, model: DiffusionAutoencoder):
        super().__init__()
        self.model = model

    def forward(self, x0: torch.Tensor, noise: dict[str, torch.Tensor]):
        out = self.model.loss(x0, noise=noise)
        return out.loss, out.denoise, out.reg


class Trainer:
    """Trains one model; under an initialised process group (torchrun) it is one rank of a
    data-parallel run, where rank 0 alone writes the checkpoint, metrics and progress.

    profile: (start, stop) records steps start..stop-1 of each fit() call with torch.profiler
    (rank 0), writes <out_dir>/trace.json and prints the top ops by self time.
    """

    def __init__(self, cfg: Config, data: Dataset, out_dir: str | Path, device: str | torch.device = "cpu",
                 resume: bool = False, quiet: bool = False, profile: tuple[int, int] | None = None):
        self.cfg = cfg.validate()
        self.device = torch.device(device)
        self.out_dir = Path(out_dir)
        self.ckpt_path = self.out_dir / CHECKPOINT_NAME
        self.world = distributed.current()
        self.quiet = quiet or not self.world.main
        self.profile = profile
        # images per rank and step; refuses a global batch that does not split evenly
        self.local_batch = distributed.local_batch(cfg.train.batch_size, self.world, cfg.train.grad_accum)
        m = cfg.model
        if tuple(data.images.shape[1:]) != (m.channels, m.img_size, m.img_size):
            raise DataError(f"dataset {data.name!r} has images {tuple(data.images.shape[1:])} but preset "
                            f"{cfg.preset!r} expects ({m.channels}, {m.img_size}, {m.img_size}); "
                            "set model.channels / model.img_size to match")
        if cfg.train.max_nonfinite_steps < 1:
            raise ConfigError(f"train.max_nonfinite_steps must be >= 1, got {cfg.train.max_nonfinite_steps}")
        # refuse early, before reading a checkpoint another run is writing (rank 0 holds the lock)
        if self.world.main and self.out_dir.is_dir():
            with RunLock(self.out_dir):
                pass
        if self.ckpt_path.exists() and not resume:
            raise OutputError(f"{self.ckpt_path} already exists; pass --resume to continue that run "
                              "or choose another output directory")
        torch.manual_seed(cfg.train.seed)
        try:
            self.data = data.to(self.device)  # small datasets live on the device whole
            self.model = DiffusionAutoencoder(cfg).to(self.device)
            self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        except torch.OutOfMemoryError as exc:
            raise TrainingOutOfMemory(_oom_message(exc, cfg, self.device, "while placing the model and data",
                                                   "nothing was written")) from None
        self.sharded = self.world.distributed and cfg.train.data_parallel == "fsdp"
        # a resumed run's weights go into the whole model, before sharding splits it
        payload = self._load_weights() if resume and self.ckpt_path.exists() else None
        if self.sharded:
            sharding.shard(self.model, self.ema, self.world, self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.params, cfg, self.device)
        self.data_gen = torch.Generator().manual_seed(cfg.train.seed)
        self.sampler = BatchSampler(len(data), cfg.train.batch_size, self.data_gen, self.data.images.device)
        self.step = 0
        self.saved_step: int | None = None
        self.ddp = None
        step_loss = _StepLoss(self.model)
        if self.world.distributed and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel
            self.ddp = step_loss = DistributedDataParallel(
                step_loss, device_ids=[self.device] if self.device.type == "cuda" else None)
        ops.set_attention_autotune(cfg.train.attn_autotune)
        self.compiled = resolve_compile(cfg.train.compile, self.device.type)
        self.compile_mode = resolve_compile_mode(cfg.train.compile_mode, self.device.type, self.world.distributed,
                                                 cfg.train.grad_accum) if self.compiled else None
        self.graphed = self.compile_mode == "reduce-overhead" and self.device.type == "cuda"
        self.loss_fn = torch.compile(step_loss, mode=self.compile_mode) if self.compiled else step_loss
        self.flops_per_image = flops.train_flops_per_image(cfg)
        self.peak_flops: float | None = None  # measured once, at the first fit() on CUDA
        # non-finite bookkeeping, all on the device: the current run of bad steps, the longest run
        # since the last check, the total; `last_ok` is the latest step's flag
        zero = torch.zeros((), dtype=torch.int64, device=self.device)
        self._bad_run, self._bad_max, self._bad_total = zero.clone(), zero.clone(), zero.clone()
        self.last_ok = torch.ones((), dtype=torch.bool, device=self.device)
        self.nonfinite_total = 0  # host copy, refreshed at each check
        if payload is not None:
            self._load_training_state(payload)

    # --- checkpoints ------------------------------------------------------------------------
    def state(self) -> dict:
        """The checkpoint's contents.  Sharded, every rank must call it (it gathers the shards) and
        rank 0 alone gets the weights and optimizer state: the layout of one process either way."""
        if self.sharded:
            weights = {"model": sharding.full_state(self.model), "ema": sharding.full_state(self.ema),
                       "optimizer": sharding.full_optimizer_state(self.model, self.opt)}
        else:
            weights = {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                       "optimizer": self.opt.state_dict()}
        return {"config": self.cfg.to_json(), **weights, "step": self.step, "sampler": self.sampler.state_dict(),
                "rng": _rng_state(self.device, self.data_gen)}

    def inference_ema(self, state: dict) -> DiffusionAutoencoder:
        """The EMA model whole on this device, for rank 0's work after training (the latent prior):
        the EMA itself, or, sharded, one rebuilt from the weights a state() call gathered."""
        if not self.sharded:
            return self.ema
        ema = DiffusionAutoencoder(self.cfg).to(self.device)
        ema.load_state_dict(state["ema"])
        return ema.eval().requires_grad_(False)

    def save(self) -> Path:
        """Write last.pt, refusing (NonFiniteError) to replace it with non-finite weights."""
        with torch.no_grad():
            weights = [sharding.local(p) for p in [*self.model.parameters(), *self.ema.parameters()]]
            finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(weights))).all())  # one sync per checkpoint
        if self.sharded:  # each rank checked its own shards: agree
            finite = not distributed.max_(int(not finite), self.world, self.device)
        if not finite:  # the same on every rank (replicas are identical, shards agreed)
            raise NonFiniteError(f"the weights became non-finite by step {self.step}; not saving them, "
                                 f"{self._last_good()}")
        state = self.state() if self.world.main or self.sharded else None  # sharded: a collective
        if self.world.main:
            checkpoint.save(self.ckpt_path, state)
        self.saved_step = self.step
        return self.ckpt_path

    def _last_good(self) -> str:
        if self.saved_step is not None:
            return f"the last good checkpoint is {self.ckpt_path} (step {self.saved_step})"
        return "no checkpoint was written"

    def _load_weights(self) -> dict:
        """Read the checkpoint to resume and load its model and EMA weights; returns it."""
        # sharded runs keep it on the CPU: each rank copies only its shards to the device
        payload = checkpoint.load(self.ckpt_path, map_location="cpu" if self.sharded else self.device)
        saved = checkpoint.config_of(payload, self.ckpt_path)
        if _architecture(saved) != _architecture(self.cfg):
            raise ConfigError(f"{self.ckpt_path} was trained with preset {saved.preset!r} and a different "
                              f"architecture than {self.cfg.preset!r}; resume with the same preset")
        checkpoint.load_model_state(self.model, payload["model"], self.ckpt_path)
        checkpoint.load_model_state(self.ema, payload["ema"], self.ckpt_path, "EMA")
        return payload

    def _load_training_state(self, payload: dict) -> None:
        """The rest of a resume, once the optimizer exists: its state, the step, data order, RNG."""
        try:
            if self.sharded:
                sharding.load_optimizer_state(self.model, self.opt, payload["optimizer"])
            else:
                self.opt.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError) as exc:  # e.g. a checkpoint from a diffae whose model had other parameters
            raise checkpoint.CheckpointError(f"{self.ckpt_path}: its optimizer state does not fit this model "
                                             f"({exc}); start a new run from its weights instead") from None
        self.step = int(payload["step"])
        self.saved_step = self.step
        self.sampler.load_state_dict(payload["sampler"])
        _set_rng_state(payload["rng"], self.device, self.data_gen)

    # --- one step ---------------------------------------------------------------------------
    def _lr(self) -> float:
        t = self.cfg.train
        return t.lr * min(1.0, (self.step + 1) / max(t.warmup_steps, 1))

    def train_step(self) -> torch.Tensor:
        """One optimizer step on one global batch; returns its (loss, denoise, reg), averaged over
        the whole global batch (identical on every rank), on the device."""
        t = self.cfg.train
        B, accum = t.batch_size, t.grad_accum
        mine = slice(self.world.rank * self.local_batch, (self.world.rank + 1) * self.local_batch)
        if self.graphed:  # a new iteration: the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with nvtx_range("data"):
            # indices and randomness of the whole global batch, the same on every rank, then this
            # rank's slice: the run is that of one process whatever the number of ranks
            x0 = self.data.images[self.sampler.next()[mine]]
            if t.augment_flip:
                flip = (torch.rand(B, 1, 1, 1, device=self.device) < 0.5)[mine]
                x0 = torch.where(flip, x0.flip(-1), x0)
            noise = {k: v[mine] for k, v in self.model.draw_noise(B, self.device).items()}
        for group in self.opt.param_groups:
            group["lr"] = self._lr()
        self.opt.zero_grad(set_to_none=True)
        micro = self.local_batch // accum
        losses = None
        for i in range(accum):
            part = slice(i * micro, (i + 1) * micro)
            # the gradients are reduced in the backward of the last micro-batch only
            sync = i == accum - 1
            if self.sharded and accum > 1:  # a walk over every shard unit: only when it changes anything
                self.model.set_requires_gradient_sync(sync)
            with nullcontext() if sync or self.ddp is None else self.ddp.no_sync():
                with nvtx_range("forward"), autocast(self.device, t.bf16):
                    out = self.loss_fn(x0[part], {k: v[part] for k, v in noise.items()})
                with nvtx_range("backward"):
                    (out[0] / accum if accum > 1 else out[0]).backward()  # the mean over the batch
            parts = torch.stack([v.detach().float() for v in out])
            losses = parts if losses is None else losses + parts
        if accum > 1:
            losses = losses / accum
        distributed.mean_(losses, self.world)
        with nvtx_range("optimizer"):
            norm = sharding.whole(torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]))
            if t.grad_clip > 0:
                # clip_grad_norm_'s scaling, applied by fused AdamW as it reads each gradient (it divides
                # them by grad_scale) instead of in a pass of its own over every gradient
                self.opt.grad_scale = torch.clamp((norm + 1e-6) / t.grad_clip, min=1.0)
            # a NaN/Inf anywhere in the loss or the gradients makes this False, on the device; the
            # gradients are reduced and the loss averaged over ranks, so every rank agrees
            ok = torch.isfinite(norm) & torch.isfinite(losses[0])
            self.opt.found_inf = (~ok).float()  # fused AdamW skips the update when it is 1
            self.opt.step()
        with nvtx_range("ema"):
            self._update_ema(ok)
        bad = (~ok).long()
        self._bad_run = (self._bad_run + 1) * bad
        self._bad_max = torch.maximum(self._bad_max, self._bad_run)
        self._bad_total = self._bad_total + bad
        self.last_ok = ok
        self.step += 1
        return losses

    @torch.no_grad()
    def _update_ema(self, ok: torch.Tensor | None = None) -> None:
        """One multi-tensor launch over every parameter (FSDP's local shards when sharded); weight 0
        on a skipped step (ok False) leaves the EMA exactly as it was."""
        decay = min(self.cfg.train.ema_decay, (1 + self.step) / (10 + self.step))  # warm start
        ema_p = [sharding.local(p) for p in self.ema.parameters()]
        model_p = [sharding.local(p.detach()) for p in self.model.parameters()]
        ops.multi_tensor_lerp_(ema_p, model_p, 1.0 - decay, ok)

    def _check_nonfinite(self) -> tuple[int, int]:
        """(longest run of non-finite steps since the last check, total); one small sync.
        Raises NonFiniteError when the run reached train.max_nonfinite_steps."""
        longest, total = torch.stack([self._bad_max, self._bad_total]).tolist()
        self._bad_max = self._bad_run.clone()
        self.nonfinite_total = total
        limit = self.cfg.train.max_nonfinite_steps
        if longest >= limit:
            raise NonFiniteError(
                f"training stopped at step {self.step}: {longest} steps in a row had a non-finite loss or "
                f"gradients (limit train.max_nonfinite_steps={limit}; {total} skipped in all); "
                f"{self._last_good()}; lower train.lr, check the data for NaN/Inf, or raise the limit")
        return longest, total

    # --- the loop ---------------------------------------------------------------------------
    def fit(self, steps: int | None = None) -> Path:
        """Train up to `steps` (default train.steps), or until train.max_minutes have passed; returns
        the checkpoint path.  Holds the run directory's lock throughout; SIGINT/SIGTERM save a
        checkpoint and raise TrainingInterrupted."""
        total = steps if steps is not None else self.cfg.train.steps
        main = self.world.main  # only rank 0 touches the run directory
        with RunLock(self.out_dir) if main else nullcontext(), _SignalGuard() as signals:
            metrics = _NoMetrics()
            if main:
                checkpoint.remove_stale_temporaries(self.ckpt_path)  # left by a killed writer
                try:
                    (self.out_dir / "config.json").write_text(self.cfg.to_json())
                    metrics = _open_metrics(self.out_dir / "metrics.jsonl", self.step)
                except OSError as exc:
                    raise OutputError(f"cannot write to {self.out_dir}: {exc.strerror or exc}") from None
            if main and self.peak_flops is None and self.device.type == "cuda":
                self.peak_flops = flops.measure_matmul_flops(self.device)  # the MFU denominator
                torch.cuda.empty_cache()
            try:
                self._loop(total, metrics, signals)
            except torch.OutOfMemoryError as exc:
                raise TrainingOutOfMemory(_oom_message(exc, self.cfg, self.device, f"at step {self.step + 1}",
                                                       self._last_good())) from None
            finally:
                metrics.close()
        return self.ckpt_path

    def _loop(self, total: int, metrics, signals: _SignalGuard) -> None:
        t, world = self.cfg.train, self.world
        board = _tensorboard(self.out_dir) if world.main else None
        progress = Progress(total, self.step)
        acc, acc_n, t_last, step_last = None, None, time.perf_counter(), self.step
        skipped_before = self.nonfinite_total
        first = self.step
        # the clock starts here: start-up and the MFU peak measurement are not training time
        deadline = time.perf_counter() + 60.0 * t.max_minutes if t.max_minutes > 0 else None
        out_of_time = False
        window = None
        if self.profile and world.main:
            window = TraceWindow(*self.profile, self.out_dir / "trace.json", self.device)
            window.step(0)
        try:
            while self.step < total:
                losses = self.train_step()
                if window is not None:
                    window.step(self.step - first)
                good = self.last_ok
                # skipped steps stay out of the logged average (a NaN would poison it)
                acc = torch.where(good, losses, 0.0) + (0.0 if acc is None else acc)
                acc_n = good.float() + (0.0 if acc_n is None else acc_n)
                if deadline is not None:
                    out_of_time = time.perf_counter() >= deadline
                    if world.distributed:  # every rank must stop at the same step: agree at log steps (a sync)
                        out_of_time = (self.step % t.log_every == 0
                                       and bool(distributed.max_(int(out_of_time), world, self.device)))
                last = self.step == total or out_of_time
                logged = self.step % t.log_every == 0 or last
                if logged:
                    _, skipped = self._check_nonfinite()
                    sums = torch.cat([acc, acc_n[None]]).tolist()  # the one host sync per log interval
                    n = sums[3]
                    # null when every step of the interval was skipped
                    loss, denoise, reg = (v / n for v in sums[:3]) if n else (None,) * 3
                    now = time.perf_counter()
                    rate = (self.step - step_last) * t.batch_size / (now - t_last)
                    mfu = flops.mfu(self.flops_per_image, rate, self.peak_flops, world.size)
                    rec = {"step": self.step, "loss": loss, "denoise": denoise, "reg": reg,
                           "lr": self._lr(), "img_per_s": round(rate, 1), "time": time.time()}
                    if mfu is not None:
                        rec["mfu"] = round(mfu, 4)
                    if skipped > skipped_before:
                        rec["skipped_nonfinite"] = skipped - skipped_before
                    if out_of_time:
                        rec["time_budget_reached"] = True
                    skipped_before = skipped
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    if board is not None:
                        for k in ("loss", "denoise", "reg", "lr", "img_per_s"):
                            if rec[k] is not None:
                                board.add_scalar(k, rec[k], self.step)
                    if not self.quiet:
                        progress.update(self.step, loss=float("nan") if loss is None else loss,
                                        **({"MFU": f"{100 * mfu:.1f}%"} if mfu is not None else {}))
                    acc, acc_n, t_last, step_last = None, None, now, self.step
                if self.step % t.ckpt_every == 0 or last:
                    self._check_nonfinite()  # never checkpoint past the limit
                    self.save()
                signum = signals.received or 0
                if world.distributed:  # all ranks stop at the same step: agree at log steps (a sync)
                    signum = distributed.max_(signum, world, self.device) if logged else 0
                if signum:
                    self._interrupted(signum)
                if out_of_time:
                    break
        finally:
            if window is not None:
                window.close()
            if board is not None:
                board.close()
            if not self.quiet:
                progress.close()
        if out_of_time and not self.quiet:
            print(f"stopped on the time budget (train.max_minutes={t.max_minutes:g}) at step {self.step} of {total}; "
                  f"checkpoint saved to {self.ckpt_path}", file=sys.stderr)

    def _interrupted(self, signum: int) -> None:
        if self.saved_step != self.step:
            self.save()
        name = signal.Signals(signum).name
        raise TrainingInterrupted(f"{name} received: stopped at step {self.step}, checkpoint saved to "
                                  f"{self.ckpt_path}; continue with --resume", signum, self.ckpt_path, self.step)


def _architecture(cfg: Config) -> dict:
    """What a checkpoint's weights depend on (activation checkpointing changes only memory use)."""
    d = cfg.to_dict()
    model = {k: v for k, v in d["model"].items() if k != "activation_checkpointing"}
    return {"model": model, "encoder": d["encoder"]}


class _NoMetrics:
    """The metrics file of ranks other than 0."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _open_metrics(path: Path, step: int):
    """metrics.jsonl for appending, without the records of steps after `step` (a killed run
    re-trains those after resuming) and without a torn last line."""
    if path.exists():
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                pass  # a record cut short by a kill
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return open(path, "a")


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
    opt = torch.optim.AdamW(prior.parameters(), lr=lr, weight_decay=0.01, fused=device.type == "cuda")
    progress = Progress(steps, unit="prior step")
    for step in range(1, steps + 1):
        loss = prior.loss(zs[torch.randint(0, zs.shape[0], (min(batch_size, zs.shape[0]),), device=device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not quiet and (step % 250 == 0 or step == steps):
            progress.update(step, loss=float(loss.detach()))
    if not quiet:
        progress.close()
    return prior.eval().requires_grad_(False)
