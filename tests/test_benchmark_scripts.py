"""The GPU benchmark scripts' CPU paths, so a device call never finds them broken."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def test_best_configs_takes_the_least_total_time_per_group():
    from benchmarks.bench_adaln import best_configs

    def row(group, shape, kernel, cfg, ms):
        return {"group": group, "shape": shape, "kernel": kernel, "config": cfg, "ms": ms}
    a, b, c = {"k": 1}, {"k": 2}, {"k": 3}
    rows = [row("g", [1, 2, 3], "x", a, 1.0), row("g", [4, 5, 6], "x", a, 5.0),   # total 6
            row("g", [1, 2, 3], "x", b, 2.0), row("g", [4, 5, 6], "x", b, 3.0),   # total 5: best
            row("g", [1, 2, 3], "x", c, 0.5),                                     # incomplete: ignored
            row("h", [1, 2, 3], "y", {"j": 1}, 2.0), row("h", [1, 2, 3], "y", {"j": 2}, 1.0)]
    assert best_configs(rows) == {"k": 2, "j": 2}


def test_bench_adaln_smoke_sweeps_applies_and_checks_errors(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/bench_adaln.py", "--smoke", "--sweep", "--apply-best",
                           "--shapes", "2x8x72", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "cpu-smoke-adaln.json").read_text())
    assert result["tune"] == {**result["tune"], **result["sweep_best"]}
    assert {r["op"] for r in result["rows"]} == {"adaln_modulate", "gated_residual", "gated_residual_adaln"}
    for r in result["rows"]:  # the kernel's error stays within 2x of PyTorch's own bf16 error
        assert r["triton_rel_err"] <= 2 * r["bf16_reference_rel_err"] + 1e-6, r
    assert [r["pass"] for r in result["training_mode"]] == ["fwd", "bwd", "fwd+bwd"]


@pytest.mark.slow
def test_method_suite_trains_evaluates_and_summarises(tmp_path):
    out, collected = tmp_path / "suite", tmp_path / "collected"
    tiny = ["model.dim=32", "model.depth=1", "model.heads=2", "model.patch=4", "encoder.dim=32", "encoder.depth=1",
            "encoder.heads=2", "encoder.patch=7", "encoder.z_dim=8", "train.batch_size=16", "train.log_every=5"]
    proc = subprocess.run([sys.executable, "benchmarks/method_suite.py", "--out", str(out), "--presets", "diffae",
                           "mldae", "--minutes", "0.05", "--eval-minutes", "3", "--quick", "--prior-steps", "5",
                           "--collect", str(collected), "--set", *tiny, "--variant", "mldae-z4=mldae", "encoder.z_dim=4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = json.loads((collected / "summary.json").read_text())
    rows = {r["preset"]: r for r in summary["presets"]}
    assert set(rows) == {"diffae", "mldae", "mldae-z4"}
    # the variant trained its preset with its own override on top of --set, and its tables name the run
    config = {name: json.loads((out / name / "config.json").read_text()) for name in ("mldae", "mldae-z4")}
    assert config["mldae"]["encoder"]["z_dim"] == 8 and config["mldae-z4"]["encoder"]["z_dim"] == 4
    assert config["mldae-z4"]["preset"] == "mldae" and config["mldae-z4"]["encoder"]["dim"] == 32
    assert "| mldae-z4 | E(x0, t=0.5) |" in (collected / "summary.md").read_text()
    for r in rows.values():
        assert r["error"] is None and r["train"]["time_budget_reached"]
        assert 0 < r["headline"]["linear_probe"] <= 1 and r["headline"]["fd10"] is not None
        assert set(r["targets"]) == {"probe >= 92 %", "10-shot >= 80 %", "FD @10 within 15 % of @100",
                                     "PSNR @20 >= 30 dB"}
    assert rows["mldae"]["headline"]["multi_level_probe"] is not None  # time-dependent: the multi-level code
    # a static encoder has no multi-level code: its pooled features are not mistaken for one
    assert rows["diffae"]["headline"]["multi_level_probe"] is None
    assert all(r["headline"]["pooled_probe"] is not None for r in rows.values())
    assert all(r["headline"]["denoiser_probe"] is not None and r["headline"]["denoiser_readout"]["blocks"] == [0]
               for r in rows.values())  # depth 1: the one block
    assert (collected / "samples.png").exists() and "| mldae | ok |" in (collected / "summary.md").read_text()


@pytest.mark.parametrize("variant, message", [(["mldae"], "expected NAME=PRESET"),
                                              (["x=nope"], "expected NAME=PRESET"),
                                              (["mldae=dmz"], "already a run")])
def test_method_suite_refuses_a_malformed_variant(variant, message, capsys):
    from benchmarks.method_suite import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--presets", "mldae", "--variant", *variant])
    assert message in capsys.readouterr().err


def test_fd_spread_scores_every_draw(micro_cfg, tmp_path, capsys):
    from benchmarks.fd_spread import main as fd_spread
    from diffae.data import synthetic
    from diffae.engine.trainer import Trainer

    # a Gaussian code: its N(0, I) prior gives unconditional samples without a latent prior
    cfg = micro_cfg.override(["encoder.latent=gaussian", "encoder.kl_weight=1e-4"])
    Trainer(cfg, synthetic(n=32), tmp_path / "run", quiet=True).fit(steps=2)
    out = tmp_path / "spread.json"
    assert fd_spread(["--ckpt", str(tmp_path / "run" / "last.pt"), "--steps", "2", "3", "--draws", "2", "--n", "6",
                      "--batch", "4", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["steps"] for r in rows] == [2, 3] and all(len(r["fd"]) == 2 for r in rows)
    for r in rows:  # fresh seeds per draw: the scores differ, and the spread is theirs
        assert r["fd"][0] != r["fd"][1]
        assert abs(r["relative_spread"] - (max(r["fd"]) - min(r["fd"])) / r["mean"]) < 1e-12
    assert fd_spread(["--ckpt", str(tmp_path / "run" / "last.pt"), "--draws", "1"]) == 2
    assert "--draws and --n must be >= 2" in capsys.readouterr().err
