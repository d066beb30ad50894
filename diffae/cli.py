"""The `diffae` command line: train | sample | encode | reconstruct | interpolate | edit | eval | bench | info.

Errors a user can fix print one line (`diffae: error: ...`) and exit with status 2; nothing that
exists is overwritten unless --overwrite is given.  `diffae train` saves a checkpoint on SIGINT
(exit 130) or SIGTERM (exit 143) and says where; a second run on the same --out is refused.
`torchrun --nproc-per-node N -m diffae train ...` trains data-parallel on N GPUs (or CPU processes).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from contextlib import nullcontext
from pathlib import Path

from .config import PRESETS
from .errors import DiffaeError, OutputError

SAMPLER_CHOICES = ("ddim", "ddpm", "euler", "heun", "dpmpp2m")


def _device(name: str | None):
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DiffaeError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def _fresh(path: str | Path, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists; pass --overwrite to replace it")
    return path


def _save_npy(array, path: Path) -> None:
    import numpy as np
    import os
    import tempfile
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npy", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


# --- commands ---------------------------------------------------------------------------------
def cmd_train(a) -> int | None:
    from .config import get_preset
    from .data import load
    from . import profiling
    from .engine import checkpoint, distributed
    from .engine.lock import RunLock
    from .engine.trainer import Trainer, TrainingInterrupted, train_latent_prior

    cfg = get_preset(a.preset)
    overrides = list(a.set or [])
    for field, value in (("steps", a.steps), ("batch_size", a.batch_size), ("lr", a.lr), ("seed", a.seed)):
        if value is not None:
            overrides.append(f"train.{field}={value}")
    if a.compile is not None:
        overrides.append(f"train.compile={str(a.compile).lower()}")
    if a.data:
        overrides.append(f"train.dataset={a.data}")
    cfg = cfg.override(overrides)
    window = _profile_window(a.profile)
    device = _device(a.device)
    world, device = distributed.init(device)  # under torchrun: join the group, take this rank's GPU
    data = load(cfg.train.dataset, "train")
    if data.images.shape[1:] != (cfg.model.channels, cfg.model.img_size, cfg.model.img_size) and a.data:
        cfg = cfg.override([f"model.channels={data.images.shape[1]}", f"model.img_size={data.images.shape[2]}"])
    out = Path(a.out or f"runs/{cfg.preset}")
    if window:
        profiling.enable(True)
    trainer = Trainer(cfg, data, out, device, resume=a.resume, quiet=a.quiet, profile=window)
    if world.main:
        on = (f"{world.size} x {device.type} ({'FSDP2, sharded' if trainer.sharded else 'DDP'})"
              if world.distributed else str(device))
        print(f"training {cfg.preset} on {data.name} ({len(data)} images) on {on}"
              f"{(' (compiled, CUDA graphs)' if trainer.graphed else ' (compiled)') if trainer.compiled else ''}; "
              f"{sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f} M parameters -> {out}", file=sys.stderr)
    # one run per directory (rank 0 holds it), held until the latent prior is saved too
    with RunLock(out) if world.main else nullcontext():
        try:
            path = trainer.fit()
        except TrainingInterrupted as exc:  # SIGINT -> 130, SIGTERM -> 143, after saving
            print(f"diffae: {exc}", file=sys.stderr)
            return exc.exit_code
        fit_prior = a.prior_steps and cfg.encoder.latent != "bernoulli"
        state = trainer.state() if fit_prior else None  # sharded: every rank takes part in gathering it
        if not world.main:
            return None  # rank 0 alone trains the latent prior and writes
        if fit_prior:
            print(f"training the latent prior ({a.prior_steps} steps)", file=sys.stderr)
            prior = train_latent_prior(trainer.inference_ema(state), data.images, steps=a.prior_steps,
                                       quiet=a.quiet)
            state["latent_prior"] = {**prior.config(), "state": prior.state_dict()}
            checkpoint.save(path, state)
    print(f"checkpoint: {path}")


def _profile_window(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        start, stop = (int(v) for v in text.split(":"))
    except ValueError:
        start = stop = -1
    if not 0 <= start < stop:
        raise DiffaeError(f"--profile expects START:STOP steps with 0 <= START < STOP, got {text!r}")
    return start, stop


def cmd_sample(a) -> None:
    from .engine.pipeline import Pipeline
    from .images import grid, save_png

    out = _fresh(a.out, a.overwrite)
    pipe = Pipeline.from_checkpoint(a.ckpt, _device(a.device), compile=a.compile, cuda_graph=a.cuda_graph)
    x = pipe.sample(a.n, steps=a.steps, sampler=a.sampler, seed=a.seed, eta=a.eta)
    save_png(grid(x), out, upscale=a.upscale)
    _save_npy(x.cpu().numpy(), out.with_suffix(".npy"))
    print(f"wrote {out} and {out.with_suffix('.npy')} ({a.n} samples, {a.sampler}, {a.steps} steps)")


def _images(a, pipe, n: int):
    from .data import load
    from .errors import InputError
    data = load(a.data, a.split)
    if n > len(data):
        raise InputError(f"asked for {n} images but {data.name} has {len(data)}")
    return data.images[:n], data


def cmd_encode(a) -> None:
    from .engine.pipeline import Pipeline

    out = _fresh(a.out, a.overwrite)
    pipe = Pipeline.from_checkpoint(a.ckpt, _device(a.device))
    from .data import load
    data = load(a.data, a.split)
    images = data.images if a.n is None else data.images[:a.n]
    t = None if a.t is None else (a.t[0] if len(a.t) == 1 else a.t)
    z = pipe.encode(images, t)
    _save_npy(z.cpu().numpy(), out)
    if data.labels is not None:
        _save_npy(data.labels[:images.shape[0]].numpy(), out.with_name(out.stem + "_labels.npy"))
    print(f"wrote {out}: {tuple(z.shape)} embeddings of {data.name}")


def cmd_reconstruct(a) -> None:
    import torch
    from .engine.pipeline import Pipeline
    from .images import grid, save_png

    out = _fresh(a.out, a.overwrite)
    pipe = Pipeline.from_checkpoint(a.ckpt, _device(a.device))
    images, _ = _images(a, pipe, a.n)
    rec, m = pipe.reconstruct(images, steps=a.steps, invert=not a.no_invert)
    pairs = torch.stack([images.to(rec.device), rec], 1).flatten(0, 1)  # original, reconstruction, ...
    save_png(grid(pairs, nrow=2 * min(a.n, 8)), out, upscale=a.upscale)
    print(f"wrote {out}; MSE {m['mse']:.3e}  PSNR {m['psnr']:.2f} dB "
          f"({'DDIM-inverted' if not a.no_invert else 'random'} x_T, {a.steps} steps)")


def cmd_interpolate(a) -> None:
    from .engine.pipeline import Pipeline
    from .images import grid, save_png
    from .data import load
    from .errors import InputError

    out = _fresh(a.out, a.overwrite)
    pipe = Pipeline.from_checkpoint(a.ckpt, _device(a.device))
    data = load(a.data, a.split)
    for i in (a.a, a.b):
        if not 0 <= i < len(data):
            raise InputError(f"image index {i} is outside {data.name} (0..{len(data) - 1})")
    x = pipe.interpolate(data.images[a.a], data.images[a.b], n=a.n, steps=a.steps)
    save_png(grid(x, nrow=a.n), out, upscale=a.upscale)
    print(f"wrote {out}: {a.n} images from #{a.a} to #{a.b}")


def cmd_edit(a) -> None:
    from .data import FASHION_MNIST_CLASSES, load
    from .engine.pipeline import Pipeline
    from .errors import InputError
    from .images import edit_grid, save_png

    out = _fresh(a.out, a.overwrite)
    pipe = Pipeline.from_checkpoint(a.ckpt, _device(a.device))
    fit = load(a.data, "train")
    if fit.labels is None:
        raise InputError(f"{fit.name} has no labels: an editing direction is fitted on labelled train images")
    if a.n < 1 or a.fit_n < 2:
        raise InputError(f"--n must be >= 1 and --fit-n >= 2, got {a.n} and {a.fit_n}")
    data = load(a.data, a.split)
    # images of the other classes, so every row shows a change toward the target
    x, edits = pipe.edit_toward_class(fit.images[:a.fit_n], fit.labels[:a.fit_n], a.target, data.images,
                                      data.labels, a.n, a.scales, a.steps)
    save_png(edit_grid(x, edits), out, upscale=a.upscale)
    name = f" ({FASHION_MNIST_CLASSES[a.target]})" if a.data == "fashion-mnist" and 0 <= a.target < 10 else ""
    print(f"wrote {out}: {x.shape[0]} images (rows) moved toward class {a.target}{name} by "
          f"{', '.join(f'{s:g}' for s in a.scales)} code sizes (columns after the original; 0 = reconstruction); "
          f"direction fitted on {min(a.fit_n, len(fit))} train codes")


def cmd_bench(a) -> None:
    from .engine.bench import bench_sample

    records = bench_sample(a.ckpt, a.preset, a.img, a.channels, a.batch, a.steps, a.sampler, a.compile,
                           a.cuda_graph, _device(a.device))
    for r in records:
        print(json.dumps(r), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(records, indent=1) + "\n")


def cmd_eval(a) -> None:
    from .eval.run import EvalOptions, evaluate

    opts = {k: v for k, v in dict(
        data=a.data, device=str(_device(a.device)), quick=a.quick, n_train=a.n_train, n_test=a.n_test, fd_n=a.fd_n,
        fd_steps=a.fd_steps and tuple(a.fd_steps), recon_n=a.recon_n,
        recon_steps=a.recon_steps and tuple(a.recon_steps), probe_t=a.probe_t and tuple(a.probe_t),
        samplers=a.samplers and tuple(a.samplers), sections=a.sections and tuple(a.sections),
        seed=a.seed, denoiser_readout=not a.no_denoiser_readout).items() if v is not None}
    evaluate(a.ckpt, a.out, EvalOptions(**opts), overwrite=a.overwrite)
    print(f"wrote {Path(a.out) / 'results.json'}, {Path(a.out) / 'results.md'} and PNGs")


def cmd_info(a) -> None:
    import torch
    from . import __version__
    from .ops import backend_report

    info = {"diffae": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else "not available"}
    try:
        import triton
        info["triton_version"] = triton.__version__
    except ImportError:
        info["triton_version"] = "not installed"
    info.update({f"backend {k}": v for k, v in backend_report().items()})
    info["presets"] = ", ".join(PRESETS)
    if a.json:
        print(json.dumps(info, indent=1))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")


# --- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffae", description="Diffusion autoencoders: train, sample, encode.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, ckpt=True):
        if ckpt:
            sp.add_argument("--ckpt", default="runs/dae-tiny/last.pt", help="checkpoint (default: %(default)s)")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
        sp.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    def data_args(sp):
        sp.add_argument("--data", default="fashion-mnist", help="fashion-mnist, synthetic, .npy/.npz or image folder")
        sp.add_argument("--split", default="test", choices=("train", "test"))

    t = sub.add_parser("train", help="train a diffusion autoencoder (default: dae-tiny on Fashion-MNIST)")
    t.add_argument("--preset", default="dae-tiny", choices=PRESETS)
    t.add_argument("--data", default=None, help="dataset (default: the preset's, fashion-mnist)")
    t.add_argument("--out", default=None, help="run directory (default: runs/<preset>)")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--prior-steps", type=int, default=2000, help="latent prior steps after training (0: none)")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the loss (default: train.compile, 'auto': on CUDA, off on the CPU)")
    t.add_argument("--profile", nargs="?", const="10:20", default=None, metavar="START:STOP",
                   help="NVTX ranges on, and a torch.profiler trace of steps START..STOP-1 (default 10:20) "
                   "to <out>/trace.json with the top ops by self time")
    t.add_argument("--resume", action="store_true", help="continue from <out>/last.pt (after a kill, "
                   "Ctrl-C/SIGINT (exit 130) or SIGTERM (exit 143), which save a checkpoint first)")
    t.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override a config field")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--device", default=None)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="generate images: PNG grid + .npy")
    common(s)
    s.add_argument("--out", default="samples.png")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--sampler", default="ddim", choices=SAMPLER_CHOICES)
    s.add_argument("--eta", type=float, default=None, help="DDIM stochasticity (ddim only)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--upscale", type=int, default=2)
    s.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    s.add_argument("--cuda-graph", action="store_true", help="capture the whole sampling loop in a CUDA graph")
    s.set_defaults(func=cmd_sample)

    b = sub.add_parser("bench", help="time sampling: latency, images/s, compile+capture time")
    b.add_argument("what", choices=("sample",))
    b.add_argument("--ckpt", default=None, help="checkpoint (default: an untrained --preset model)")
    b.add_argument("--preset", default="dae-b", choices=PRESETS)
    b.add_argument("--img", type=int, default=32, help="image size for an untrained preset")
    b.add_argument("--channels", type=int, default=3, help="channels for an untrained preset")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--sampler", default="ddim", choices=SAMPLER_CHOICES)
    b.add_argument("--compile", action="store_true")
    b.add_argument("--cuda-graph", action="store_true")
    b.add_argument("--json", default=None, help="also write the records to this JSON file")
    b.add_argument("--device", default=None)
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("encode", help="images to embeddings (.npy)")
    common(e)
    data_args(e)
    e.add_argument("--out", default="z.npy")
    e.add_argument("--n", type=int, default=None, help="first n images (default: all)")
    e.add_argument("--t", type=float, nargs="+", default=None, help="noise level(s) for time-dependent encoders")
    e.set_defaults(func=cmd_encode)

    r = sub.add_parser("reconstruct", help="encode + DDIM inversion + decode; prints MSE and PSNR")
    common(r)
    data_args(r)
    r.add_argument("--out", default="reconstruction.png")
    r.add_argument("--n", type=int, default=16)
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--no-invert", action="store_true", help="decode from random x_T (what z alone keeps)")
    r.add_argument("--upscale", type=int, default=2)
    r.set_defaults(func=cmd_reconstruct)

    i = sub.add_parser("interpolate", help="lerp z and slerp x_T between two images; PNG strip")
    common(i)
    data_args(i)
    i.add_argument("--a", type=int, default=0, help="index of the first image")
    i.add_argument("--b", type=int, default=1, help="index of the second image")
    i.add_argument("--n", type=int, default=8)
    i.add_argument("--steps", type=int, default=20)
    i.add_argument("--out", default="interpolation.png")
    i.add_argument("--upscale", type=int, default=2)
    i.set_defaults(func=cmd_interpolate)

    ed = sub.add_parser("edit", help="move codes along a class's direction (DiffAE editing); PNG grid")
    common(ed)
    data_args(ed)
    ed.add_argument("--target", type=int, required=True, help="label whose direction the codes move along")
    ed.add_argument("--n", type=int, default=8, help="images to edit (of the other labels)")
    ed.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0],
                    help="steps along the direction, in sizes of the standardised code (sqrt(z_dim))")
    ed.add_argument("--fit-n", type=int, default=5000, help="labelled train images the direction is fitted on")
    ed.add_argument("--steps", type=int, default=20, help="DDIM steps of the inversion and the decoding")
    ed.add_argument("--out", default="edit.png")
    ed.add_argument("--upscale", type=int, default=2)
    ed.set_defaults(func=cmd_edit)

    ev = sub.add_parser("eval", help="probe, kNN, few-shot, reconstruction, FD-FMNIST, figures -> DIR")
    common(ev)
    ev.add_argument("--out", required=True, help="output directory (results.json, results.md, PNGs)")
    ev.add_argument("--data", default="fashion-mnist", help="labelled dataset with train and test splits")
    ev.add_argument("--quick", action="store_true", help="tiny subsets and sample counts (smoke test)")
    ev.add_argument("--n-train", type=int, default=None, help="train images for the probes (default: all)")
    ev.add_argument("--n-test", type=int, default=None, help="test images (default: all)")
    ev.add_argument("--fd-n", type=int, default=None, help="samples per FD-FMNIST setting (default 1000)")
    ev.add_argument("--fd-steps", type=int, nargs="+", default=None, help="default: 5 10 20 50 100")
    ev.add_argument("--samplers", nargs="+", choices=SAMPLER_CHOICES, default=None, help="default: all")
    ev.add_argument("--recon-n", type=int, default=None, help="test images reconstructed (default 1000)")
    ev.add_argument("--recon-steps", type=int, nargs="+", default=None, help="default: 5 10 20 50 100")
    ev.add_argument("--probe-t", type=float, nargs="+", default=None,
                    help="detail control: t at which a time-dependent encoder is probed")
    ev.add_argument("--sections", nargs="+", default=None, metavar="SECTION",
                    help="only these of representation detail reconstruction figures generation (default: all)")
    ev.add_argument("--no-denoiser-readout", action="store_true",
                    help="representation: skip probing the denoiser's own features (chosen t and block)")
    ev.add_argument("--seed", type=int, default=0)
    ev.set_defaults(func=cmd_eval)

    f = sub.add_parser("info", help="versions, device and which kernel backends are present")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .ops import _backend
        _backend.check_environment()
        code = args.func(args)
    except DiffaeError as exc:
        print(f"diffae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffae: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        import torch
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            what = args.command + (f", preset {args.preset}" if getattr(args, "preset", None) else "")
            print(f"diffae: error: out of GPU memory ({what}); lower the batch size or use a smaller "
                  "preset", file=sys.stderr)
            return 2
        raise
    finally:
        if "torch.distributed" in sys.modules:  # `train` under torchrun joined a process group
            from .engine import distributed
            distributed.shutdown()
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
