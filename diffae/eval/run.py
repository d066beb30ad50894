"""Evaluate one checkpoint: representation, reconstruction, figures, generation, detail control.

    from diffae.eval.run import EvalOptions, evaluate
    results = evaluate("runs/diffae/last.pt", "runs/diffae/eval", EvalOptions())

writes OUT/results.json, OUT/results.md and PNGs (sample grids per sampler and step count,
reconstructions, interpolation strips, PCA of the test embeddings).  results.json is rewritten
after every section, so a long run that stops early keeps what it measured.  Runs on CUDA when
present, else (slowly) on the CPU; `quick` shrinks every size for tests and smoke runs.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..diffusion.samplers import SAMPLERS
from ..errors import CheckpointError, ConfigError, InputError, OutputError
from ..images import edit_grid
from . import fd as fdlib
from . import plots, probe, readout, reconstruction, report

STEPS = (5, 10, 20, 50, 100)
SECTIONS = ("representation", "detail", "reconstruction", "figures", "generation")


@dataclass
class EvalOptions:
    """None means: the full default, or the small one when quick is set."""
    data: str = "fashion-mnist"
    device: str | None = None
    quick: bool = False
    n_train: int | None = None          # train images for the probes (default all; quick 1000)
    n_test: int | None = None           # test images (default all; quick 500)
    fd_n: int | None = None             # samples per FD setting (default 1000; quick 16)
    fd_steps: tuple | None = None       # (default 5, 10, 20, 50, 100; quick 5, 10)
    samplers: tuple = SAMPLERS
    recon_n: int | None = None          # test images reconstructed (default 1000; quick 8)
    recon_steps: tuple | None = None    # (default 5, 10, 20, 50, 100; quick 5, 10)
    probe_t: tuple | None = None        # detail control: t at which E(x0, t) is probed (time encoders)
    multi_t: tuple = (0.25, 0.5, 0.75)  # multi-level embedding: E(x0, t) concatenated over these t
    prior_steps: int = 50               # latent-prior DDIM steps when z comes from a latent prior
    batch_size: int = 500
    grid_n: int = 64
    interp_steps: int | None = None     # (default 20; quick 5)
    edit_target: int = 1                # figures: edits toward this label (Fashion-MNIST: Trouser, easy to see)
    seed: int = 0
    sections: tuple = SECTIONS
    denoiser_readout: bool = True       # representation: also probe the denoiser's features (eval/readout.py)

    def resolved(self) -> "EvalOptions":
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown:
            raise ConfigError(f"unknown evaluation section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
        q = self.quick

        def pick(value, full, small):
            return value if value is not None else (small if q else full)
        return dataclasses.replace(
            self, n_train=pick(self.n_train, None, 1000), n_test=pick(self.n_test, None, 500),
            fd_n=pick(self.fd_n, 1000, 16), fd_steps=tuple(pick(self.fd_steps, STEPS, (5, 10))),
            recon_n=pick(self.recon_n, 1000, 8), recon_steps=tuple(pick(self.recon_steps, STEPS, (5, 10))),
            probe_t=tuple(pick(self.probe_t, (0.1, 0.3, 0.5, 0.7, 0.9), (0.25, 0.75))),
            interp_steps=pick(self.interp_steps, 20, 5), samplers=tuple(self.samplers))


def _log(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


def _subset(data, n: int | None, seed: int, shuffle: bool):
    if n is None or n >= len(data):
        return data.images, data.labels
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n] if shuffle else torch.arange(n)
    return data.images[idx], None if data.labels is None else data.labels[idx]


def _evaluate_embedding(name, kind, tr, te, ytr, yte, seed) -> dict:
    lp = probe.linear_probe(tr, ytr, te, yte, seed=seed)
    knn = probe.knn_accuracy(tr, ytr, te, yte, k=20)
    fs = probe.few_shot(tr, ytr, te, yte, shots=10, draws=5, seed=seed)
    _log(f"{name}: linear probe {lp['accuracy']:.4f}, kNN {knn['accuracy']:.4f}, "
         f"10-shot {fs['mean']:.4f} ± {fs['std']:.4f}")
    return {"name": name, "kind": kind, "dim": int(tr.shape[1]), "linear_probe": lp, "knn": knn, "few_shot": fs}


def _denoiser_readout(pipe, tr_x, tr_y, te_x, te_y, o: EvalOptions) -> dict:
    """The denoiser's features, read where a held-out part of train says they separate best."""
    best = readout.choose(pipe, tr_x, tr_y, o.batch_size, o.seed, log=_log)
    te = readout.features(pipe, te_x, best["t"], best["blocks"], o.batch_size, o.seed)
    blocks = ", ".join(str(b) for b in best["blocks"])
    name = (f"D(x_t, t={best['t']:g}, z)'s residual stream after block{'s' * (len(best['blocks']) > 1)} {blocks} "
            "(0-based), mean over tokens; t and blocks chosen on held-out train")
    rep = _evaluate_embedding(name, "denoiser", best["train_features"], te, tr_y, te_y, o.seed)
    rep["readout"] = {"t": best["t"], "blocks": best["blocks"], "val_accuracy": best["val_accuracy"],
                      "val_frac": readout.VAL_FRAC, "scores": best["scores"]}
    return rep


def evaluate(ckpt: str | Path, out_dir: str | Path, opts: EvalOptions | None = None,
             overwrite: bool = False) -> dict:
    from .. import __version__
    from ..data import FASHION_MNIST_CLASSES, load
    from ..engine import checkpoint
    from ..engine.pipeline import Pipeline
    from ..nn.autoencoder import DEFAULT_CODE_T

    o = (opts or EvalOptions()).resolved()
    out = Path(out_dir)
    if (out / "results.json").exists() and not overwrite:
        raise OutputError(f"{out / 'results.json'} already exists; pass --overwrite to replace it")
    device = torch.device(o.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    payload = checkpoint.load(ckpt, map_location="cpu")
    step = int(payload.get("step", -1))
    del payload
    pipe = Pipeline.from_checkpoint(ckpt, device)
    cfg, model = pipe.cfg, pipe.model
    time_dep = model.encoder.time_dependent
    train, test = load(o.data, "train"), load(o.data, "test")
    tr_x, tr_y = _subset(train, o.n_train, o.seed, shuffle=True)
    te_x, te_y = _subset(test, o.n_test, o.seed, shuffle=False)
    class_names = FASHION_MNIST_CLASSES if o.data == "fashion-mnist" else None
    d = cfg.diffusion
    results = {
        "checkpoint": str(ckpt), "preset": cfg.preset, "step": step, "device": str(device),
        "quick": o.quick, "diffae": __version__, "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": cfg.to_dict(),
        "options": {k: v for k, v in dataclasses.asdict(o).items()},
        "data": {"name": o.data, "n_train": int(tr_x.shape[0]), "n_test": int(te_x.shape[0])},
        "training_noise": f"{d.process}, t ~ {d.t_sampling} on [{d.t_min:g}, {d.t_max:g}]"
                          + (f", sigma in [{d.sigma_min:g}, {d.sigma_max:g}]" if d.process == "ve" else ""),
        "files": [], "timings_s": {},
    }
    files = results["files"]

    def save():
        report.write(results, out)

    @contextmanager
    def timed(name):
        _log(f"{name} ...")
        t0 = time.perf_counter()
        yield
        results["timings_s"][name] = time.perf_counter() - t0
        save()

    save()
    main_test_emb = None
    # --- representation ------------------------------------------------------------------------
    if "representation" in o.sections:
        if tr_y is None or te_y is None:
            results["representation_skipped"] = f"dataset {o.data!r} has no labels"
        else:
            with timed("representation"):
                reps = results["representation"] = []
                code = f"E(x0, t={DEFAULT_CODE_T:g})" if time_dep else "E(x0)"
                # kind: "code" (z), "multi_level" (z over several t), "pooled" (what the latent head
                # reads: the usual probe readout below a projection head, reported beside the code)
                specs = [(code, "code", None)]
                if time_dep:
                    specs.append((f"E(x0, t) concatenated over t = {', '.join(f'{t:g}' for t in o.multi_t)}",
                                  "multi_level", list(o.multi_t)))
                specs.append((f"{code}'s pooled features, before the code head", "pooled", None))
                for name, kind, t in specs:
                    tr = pipe.encode(tr_x, t, batch_size=o.batch_size, pooled=kind == "pooled")
                    te = pipe.encode(te_x, t, batch_size=o.batch_size, pooled=kind == "pooled")
                    reps.append(_evaluate_embedding(name, kind, tr, te, tr_y, te_y, o.seed))
                    save()  # an evaluation stopped later (a time limit) keeps the embeddings already scored
                    if main_test_emb is None:
                        main_test_emb = te
                if o.denoiser_readout:
                    reps.append(_denoiser_readout(pipe, tr_x, tr_y, te_x, te_y, o))
                    save()
    # --- reconstruction ------------------------------------------------------------------------
    if "reconstruction" in o.sections:
        with timed("reconstruction"):
            imgs = te_x[:o.recon_n]
            results["reconstruction"] = reconstruction.reconstruction_table(
                pipe, imgs, o.recon_steps, o.batch_size, o.seed)
            for row in results["reconstruction"]:
                _log(f"reconstruction {row['steps']} steps: inverted PSNR {row['inverted_psnr']:.2f} dB, "
                     f"random x_T {row['random_psnr']:.2f} dB")
            s = 20 if 20 in o.recon_steps else max(o.recon_steps)
            x0 = imgs[:8].to(device).float()
            shown = torch.cat([x0, reconstruction.reconstruct(pipe, x0, s, True),
                               reconstruction.reconstruct(pipe, x0, s, False, o.seed)])
            plots.save_png(plots.grid(shown, nrow=x0.shape[0]), out / "reconstruction.png", upscale=2)
            files.append(f"reconstruction.png (rows: originals, DDIM-inverted x_T, random x_T; {s} steps)")
    # --- figures -------------------------------------------------------------------------------
    if "figures" in o.sections:
        with timed("figures"):
            n_pairs = min(4, te_x.shape[0] // 2)
            strips = [reconstruction.interpolate(pipe, te_x[2 * i:2 * i + 1], te_x[2 * i + 1:2 * i + 2], 8,
                                                 o.interp_steps) for i in range(n_pairs)]
            plots.save_strips(strips, out / "interpolation.png")
            files.append(f"interpolation.png (test pairs (0,1), (2,3), ...: lerp z, slerp inverted x_T, "
                         f"{o.interp_steps} DDIM steps)")
            if tr_y is not None and te_y is not None and _save_edits(pipe, tr_x, tr_y, te_x, te_y, o,
                                                                     out / "edit.png"):
                files.append(f"edit.png (test images of other classes, then their codes moved toward class "
                             f"{o.edit_target} by {', '.join(f'{s:g}' for s in EDIT_SCALES)} code sizes; "
                             f"{o.interp_steps} DDIM steps from the inverted x_T)")
            if te_y is not None:
                if main_test_emb is None:
                    main_test_emb = pipe.encode(te_x, None, batch_size=o.batch_size)
                results["pca"] = plots.save_pca(main_test_emb, te_y, out / "pca.png", class_names)
                files.append("pca.png (test embeddings on their first two principal components, by class)")
    # --- generation ----------------------------------------------------------------------------
    if "generation" in o.sections:
        with timed("generation"):
            results["generation"] = _generation(pipe, o, train, test, te_x, out, files)
    # --- detail control ------------------------------------------------------------------------
    # Last: one probe per t, the slowest section for a time-dependent encoder; a run stopped early
    # (results.json is rewritten after every section) then keeps the target figures.
    if "detail" in o.sections and time_dep and tr_y is not None and te_y is not None:
        with timed("detail_control"):
            rows = []
            for t in o.probe_t:
                tr = pipe.encode(tr_x, float(t), batch_size=o.batch_size)
                te = pipe.encode(te_x, float(t), batch_size=o.batch_size)
                lp = probe.linear_probe(tr, tr_y, te, te_y, seed=o.seed)
                knn = probe.knn_accuracy(tr, tr_y, te, te_y, k=20)
                rows.append({"t": float(t), "linear_probe": lp["accuracy"], "knn": knn["accuracy"], "l2": lp["l2"]})
                _log(f"E(x0, t={t:g}): linear probe {lp['accuracy']:.4f}, kNN {knn['accuracy']:.4f}")
            results["detail_control"] = rows
    save()
    _log(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return results


EDIT_SCALES = (0.0, 0.5, 1.0, 1.5, 2.0)


def _save_edits(pipe, tr_x, tr_y, te_x, te_y, o: EvalOptions, path: Path) -> bool:
    """DiffAE's editing figure: the direction of o.edit_target fitted on (up to 5000) train codes,
    four test images of other classes moved along it.  False (no figure) when the labels have no
    two groups to separate or no test image to move."""
    try:
        x, edits = pipe.edit_toward_class(tr_x[:5000], tr_y[:5000], o.edit_target, te_x, te_y, 4, EDIT_SCALES,
                                          o.interp_steps)
    except InputError:
        return False
    plots.save_png(edit_grid(x, edits), path, upscale=2)
    return True


def _generation(pipe, o: EvalOptions, train, test, te_x, out: Path, files: list) -> dict:
    cfg = pipe.cfg
    m = cfg.model
    if (m.channels, m.img_size) != (1, 28):
        return {"skipped": f"FD-FMNIST needs 1x28x28 images; this model makes {m.channels}x{m.img_size}x{m.img_size}"}
    try:
        pipe.sample_latents(1, steps=2, seed=0)
    except CheckpointError as exc:
        return {"skipped": f"no z for unconditional samples: {exc}"}
    try:
        scorer = fdlib.FDFMNIST(te_x, pipe.device)
    except CheckpointError as exc:
        return {"skipped": str(exc)}
    z_source = ("the latent prior" if pipe.prior is not None else f"the {cfg.encoder.latent} head's own prior")
    g = torch.Generator().manual_seed(o.seed + 1)
    real = train.images[torch.randperm(len(train), generator=g)[:o.fd_n]]
    gen = {"metric": "FD-FMNIST", "not_inception_fid": True, "n": o.fd_n,
           "reference": f"{scorer.n_reference} {test.name} images", "z_source": z_source,
           "prior_steps": o.prior_steps if pipe.prior is not None else None,
           "classifier_test_accuracy": fdlib.classifier_meta().get("test_accuracy"),
           "real_floor": scorer.score(real), "rows": []}
    if pipe.model.encoder.time_dependent:
        gen["note"] = ("time-dependent encoder: the pipeline conditions every sampling step on one code "
                       "(read at one t), while training paired each t with E(x0, t); these numbers measure that "
                       "sampler, not the best this model could do")
    for sampler in o.samplers:
        for steps in o.fd_steps:
            t0 = time.perf_counter()
            parts = []
            for k, i in enumerate(range(0, o.fd_n, o.batch_size)):
                n = min(o.batch_size, o.fd_n - i)
                # the same seeds for every sampler and step count: they share z and x_T
                parts.append(pipe.sample(n, steps=steps, sampler=sampler, seed=o.seed + 1000 + 2 * k,
                                         prior_steps=o.prior_steps).cpu())
            x = torch.cat(parts)
            score = scorer.score(x)
            nfe = 2 * steps - 1 if sampler == "heun" else steps
            gen["rows"].append({"sampler": sampler, "steps": int(steps), "nfe": nfe, "fd": score,
                                "seconds": round(time.perf_counter() - t0, 2)})
            name = f"samples_{sampler}_{steps}.png"
            plots.save_grid(x[:o.grid_n], out / name)
            files.append(name)
            _log(f"FD-FMNIST {sampler} {steps} steps: {score:.3f}")
    return gen
