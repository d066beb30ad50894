"""The evaluation suite: probe, kNN, few-shot, Frechet distance, and `diffae eval --quick` end to end."""
import json

import pytest
import torch

from diffae.cli import main
from diffae.eval import fd, probe
from diffae.eval.report import summary_markdown
from diffae.nn.autoencoder import DiffusionAutoencoder


def _blobs(n, classes=10, dim=16, sep=4.0, seed=0):
    """Linearly separable clusters: class means far apart relative to unit noise."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * sep
    y = torch.randint(0, classes, (n,), generator=g)
    return means[y] + torch.randn(n, dim, generator=g), y


def test_linear_probe_recovers_separable_labels_and_is_at_chance_on_random_ones():
    xtr, ytr = _blobs(1000)
    xte, yte = _blobs(500, seed=1)
    good = probe.linear_probe(xtr, ytr, xte, yte)
    assert good["accuracy"] > 0.98, good
    assert good["l2"] in probe.L2_GRID and len(good["val_accuracy"]) == len(probe.L2_GRID)
    g = torch.Generator().manual_seed(7)
    noise_tr, noise_te = torch.randn(1000, 16, generator=g), torch.randn(1000, 16, generator=g)
    rand = probe.linear_probe(noise_tr, torch.randint(0, 10, (1000,), generator=g),
                              noise_te, torch.randint(0, 10, (1000,), generator=g))
    assert 0.04 < rand["accuracy"] < 0.16, rand


def test_batched_fit_matches_separate_fits():
    x, y = _blobs(300, classes=3, dim=5, sep=1.0)
    x = probe.standardiser(x)(x)
    together = probe.fit_logistic(x, y, 3, [1e-1, 1e-3])
    for i, l2 in enumerate([1e-1, 1e-3]):
        alone = probe.fit_logistic(x, y, 3, [l2])[0]
        assert torch.allclose(together[i], alone, atol=2e-3), (l2, (together[i] - alone).abs().max())


def test_knn_and_few_shot_sanity():
    xtr, ytr = _blobs(1000)
    xte, yte = _blobs(500, seed=1)
    assert probe.knn_accuracy(xtr, ytr, xte, yte, k=20)["accuracy"] > 0.98
    g = torch.Generator().manual_seed(3)
    assert probe.knn_accuracy(xtr, torch.randint(0, 10, (1000,), generator=g), xte, yte)["accuracy"] < 0.2
    fs = probe.few_shot(xtr, ytr, xte, yte, shots=10, draws=5)
    assert fs["mean"] > 0.95 and 0 <= fs["std"] < 0.05 and len(fs["accuracies"]) == 5, fs
    hard, yh = _blobs(1000, sep=0.15)  # overlapping classes: 10 shots do worse than the full probe
    hard_te, yh_te = _blobs(500, sep=0.15, seed=1)
    few = probe.few_shot(hard, yh, hard_te, yh_te, shots=10, draws=2)
    full = probe.linear_probe(hard, yh, hard_te, yh_te)
    assert few["mean"] < full["accuracy"], (few, full)


def test_denoiser_readout_is_chosen_on_held_out_train_not_test():
    from types import SimpleNamespace

    from diffae.eval import readout

    assert readout.candidate_blocks(12) == [2, 5, 7, 9] and readout.candidate_blocks(2) == [0, 1]
    x, y = _blobs(600, sep=8.0)
    calls = []

    class Pipe:  # features that separate the classes only at t = 0.15 after the second candidate block
        model = SimpleNamespace(denoiser=SimpleNamespace(blocks=[None] * 12))

        def denoiser_features(self, images, t, blocks, batch_size, seed):
            calls.append((t, tuple(blocks)))
            g = torch.Generator().manual_seed(int(1000 * t))
            return [x if (t, b) == (0.15, 5) else torch.randn(x.shape, generator=g) for b in blocks]

    best = readout.choose(Pipe(), torch.zeros(600, 1, 28, 28), y)
    assert calls == [(t, (2, 5, 7, 9)) for t in readout.TIMES]  # one pass per t for all blocks
    assert (best["t"], best["blocks"]) == (0.15, [5]) and best["val_accuracy"] > 0.98
    assert best["train_features"] is x
    # every single block and every t's concatenation scored; noise near chance
    assert len(best["scores"]) == len(readout.TIMES) * 5
    noise = [s["val_accuracy"] for s in best["scores"] if s["t"] != 0.15]
    assert max(noise) < 0.3, noise


def test_frechet_distance_zero_on_itself_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2000, 8, generator=g) @ torch.randn(8, 8, generator=g)
    assert fd.fd_features(f, f) < 1e-8
    shifts = [fd.fd_features(f, f + s) for s in (0.1, 0.5, 1.0)]
    assert shifts == sorted(shifts)
    assert shifts[2] == pytest.approx(8.0, rel=1e-6)  # a pure mean shift: |delta|^2 = 8 * 1^2
    # closed form for diagonal Gaussians: |mu1 - mu2|^2 + sum (s1 - s2)^2
    mu, s1, s2 = torch.ones(3), torch.diag(torch.tensor([1.0, 4.0, 9.0])), torch.diag(torch.tensor([4.0, 4.0, 1.0]))
    assert fd.frechet_distance(mu, s1, torch.zeros(3), s2) == pytest.approx(3 + 1 + 0 + 4)


def test_shipped_fd_classifier_scores_real_images():
    from diffae.data import fashion_mnist

    meta = fd.classifier_meta()
    assert meta["test_accuracy"] > 0.85 and "not Inception" in meta["what"]
    assert fd.WEIGHTS.stat().st_size < 2 * 2**20
    images = fashion_mnist("test").images[:600]
    scorer = fd.FDFMNIST(images[:300])
    same = scorer.score(images[:300])
    other_real = scorer.score(images[300:])
    noisy = [scorer.score((images[300:] + s * torch.randn_like(images[300:])).clamp(-1, 1)) for s in (0.2, 0.6)]
    assert same < 1e-6 and other_real < noisy[0] < noisy[1], (same, other_real, noisy)


def test_eval_quick_writes_results_and_figures(micro_cfg, tmp_path, capsys):
    from diffae.data import synthetic
    from diffae.engine.trainer import Trainer

    # time-dependent encoder (detail control, multi-level embedding) with a Gaussian code, whose
    # N(0, I) prior gives unconditional samples without a latent prior
    cfg = micro_cfg.override(["encoder.kind=time", "encoder.latent=gaussian", "encoder.kl_weight=1e-4"])
    Trainer(cfg, synthetic(n=64), tmp_path / "run", quiet=True).fit(steps=5)
    out = tmp_path / "eval"
    argv = ["eval", "--ckpt", str(tmp_path / "run" / "last.pt"), "--out", str(out), "--quick",
            "--data", "synthetic", "--device", "cpu", "--fd-steps", "2", "4", "--recon-steps", "3"]
    assert main(argv) == 0
    r = json.loads((out / "results.json").read_text())
    # the code, the multi-level code (3 t), the pooled features below the code head (encoder.dim)
    # then the denoiser's features (model.dim per block), read where held-out train chose
    kinds = [(rep["kind"], rep["dim"]) for rep in r["representation"]]
    assert kinds[:3] == [("code", 8), ("multi_level", 24), ("pooled", 32)] and kinds[3][0] == "denoiser"
    chosen = r["representation"][3]["readout"]
    assert kinds[3][1] == 32 * len(chosen["blocks"]) and chosen["t"] in (0.05, 0.15, 0.3)
    assert len(chosen["scores"]) == 3 * 3 and chosen["val_accuracy"] == max(s["val_accuracy"] for s in chosen["scores"])
    for rep in r["representation"]:
        assert 0 <= rep["linear_probe"]["accuracy"] <= 1 and 0 <= rep["few_shot"]["mean"] <= 1
    assert [row["t"] for row in r["detail_control"]] == [0.25, 0.75]
    assert r["reconstruction"][0]["steps"] == 3 and r["reconstruction"][0]["inverted_mse"] >= 0
    gen = r["generation"]
    assert "skipped" not in gen and gen["n"] == 16 and gen["not_inception_fid"]
    assert {(row["sampler"], row["steps"]) for row in gen["rows"]} == {
        (s, n) for s in ("ddim", "ddpm", "euler", "heun", "dpmpp2m") for n in (2, 4)}
    assert all(row["fd"] >= 0 for row in gen["rows"])
    for name in ["pca.png", "interpolation.png", "edit.png", "reconstruction.png", "samples_ddim_2.png",
                 "samples_heun_4.png"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    md = (out / "results.md").read_text()
    assert "FD-FMNIST" in md and "NOT Inception FID" in md and "| 3 |" in md
    assert "| dae-tiny |" in summary_markdown([r])
    capsys.readouterr()
    assert main(argv) == 2  # an existing results.json is not overwritten without --overwrite
    assert "already exists" in capsys.readouterr().err


def test_eval_stopped_mid_representation_keeps_the_embeddings_already_scored(micro_cfg, tmp_path, monkeypatch):
    """A time limit (method_suite) stops an evaluation wherever it is: what was scored is on disk."""
    import diffae.eval.run as run
    from diffae.data import synthetic
    from diffae.engine.trainer import Trainer

    Trainer(micro_cfg, synthetic(n=64), tmp_path / "run", quiet=True).fit(steps=2)
    scored = []
    real = run._evaluate_embedding

    def stop_on_the_second(*args):
        if scored:
            raise KeyboardInterrupt  # stands in for the suite's SIGTERM at its time limit
        scored.append(args[0])
        return real(*args)

    monkeypatch.setattr(run, "_evaluate_embedding", stop_on_the_second)
    out = tmp_path / "eval"
    with pytest.raises(KeyboardInterrupt):
        run.evaluate(tmp_path / "run" / "last.pt", out,
                     run.EvalOptions(quick=True, data="synthetic", device="cpu", sections=("representation",)))
    r = json.loads((out / "results.json").read_text())
    assert [rep["name"] for rep in r["representation"]] == scored
    assert 0 <= r["representation"][0]["linear_probe"]["accuracy"] <= 1


def test_pipeline_reconstructs_and_interpolates_as_the_evaluation_does(micro_cfg, tmp_path):
    """A time-dependent encoder: both read E(x0, t) at every step's t (the API and the eval agree)."""
    from diffae.data import synthetic
    from diffae.diffusion import samplers
    from diffae.engine.pipeline import Pipeline
    from diffae.eval import reconstruction

    torch.manual_seed(0)
    model = Pipeline(DiffusionAutoencoder(micro_cfg.override(["encoder.kind=time"]))).model
    with torch.no_grad():  # AdaLN-Zero starts blind to z and t: random weights make both matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pipe = Pipeline(model)
    x = synthetic(n=3, seed=1).images
    rec, _ = pipe.reconstruct(x, steps=4)
    torch.testing.assert_close(rec, reconstruction.reconstruct(pipe, x, 4), rtol=0, atol=1e-4)
    strip = pipe.interpolate(x[0], x[1], n=3, steps=4)
    torch.testing.assert_close(strip, reconstruction.interpolate(pipe, x[:1], x[1:2], 3, 4), rtol=0, atol=1e-4)
    # the code of one t, read at every step, decodes to other images: the steps read their own t
    z = pipe.codes(x)
    one_t = samplers.sample(pipe._denoise_fn(z), pipe.invert(x, z, 4), pipe.model.process, 4, "ddim",
                            pipe.model.sampling_prediction, clip=0.0).clamp(-1, 1)
    assert (one_t - rec).abs().max() > 1e-2
