"""CLI smoke tests and the bad-input contract: one line `diffae: error: ...`, exit 2, nothing overwritten."""
import os
import subprocess
import sys

import numpy as np
import pytest

from diffae.cli import main

MICRO = ["--set", "model.dim=32", "--set", "model.depth=2", "--set", "model.heads=2", "--set", "encoder.dim=32",
         "--set", "encoder.depth=1", "--set", "encoder.heads=2", "--set", "encoder.z_dim=8",
         "--set", "train.log_every=5"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(["train", "--data", "synthetic", "--out", str(out), "--steps", "10", "--batch-size", "16",
                 "--prior-steps", "20", "--quiet", *MICRO])
    assert code == 0
    return out


def test_train_writes_checkpoint_metrics_and_config(run_dir):
    assert (run_dir / "last.pt").is_file() and (run_dir / "config.json").is_file()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_sample_encode_reconstruct_interpolate(run_dir, tmp_path, capsys):
    ckpt = str(run_dir / "last.pt")
    assert main(["sample", "--ckpt", ckpt, "--out", str(tmp_path / "s.png"), "--n", "4", "--steps", "3",
                 "--sampler", "dpmpp2m"]) == 0
    assert np.load(tmp_path / "s.npy").shape == (4, 1, 28, 28)
    assert main(["encode", "--ckpt", ckpt, "--data", "synthetic", "--n", "5", "--out", str(tmp_path / "z.npy")]) == 0
    assert np.load(tmp_path / "z.npy").shape == (5, 8)
    assert main(["reconstruct", "--ckpt", ckpt, "--data", "synthetic", "--n", "2", "--steps", "3",
                 "--out", str(tmp_path / "r.png")]) == 0
    assert "PSNR" in capsys.readouterr().out
    assert main(["interpolate", "--ckpt", ckpt, "--data", "synthetic", "--n", "3", "--steps", "3",
                 "--out", str(tmp_path / "i.png")]) == 0
    for name in ("s.png", "r.png", "i.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_edit_writes_a_grid_toward_a_class_and_names_a_missing_one(run_dir, tmp_path, capsys):
    ckpt = str(run_dir / "last.pt")
    out = tmp_path / "e.png"
    assert main(["edit", "--ckpt", ckpt, "--data", "synthetic", "--target", "1", "--n", "2", "--scales", "0", "2",
                 "--steps", "3", "--fit-n", "64", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and "toward class 1" in capsys.readouterr().out
    assert "class 9 has no image" in _error(capsys, ["edit", "--ckpt", ckpt, "--data", "synthetic", "--target", "9",
                                                     "--out", str(tmp_path / "f.png")])
    assert not (tmp_path / "f.png").exists()


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend triton" in out and "extension" in out and "attention block sizes" in out


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffae: error: ") and "\n" not in err, err
    return err


def test_missing_and_corrupt_checkpoints(tmp_path, run_dir, capsys):
    assert "missing checkpoint" in _error(capsys, ["sample", "--ckpt", str(tmp_path / "no.pt"),
                                                   "--out", str(tmp_path / "a.png")])
    whole = (run_dir / "last.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(whole[: len(whole) // 2])
    assert "corrupt or truncated" in _error(capsys, ["sample", "--ckpt", str(tmp_path / "trunc.pt"),
                                                     "--out", str(tmp_path / "b.png")])
    (tmp_path / "junk.pt").write_bytes(os.urandom(2048))
    assert "corrupt or truncated" in _error(capsys, ["sample", "--ckpt", str(tmp_path / "junk.pt"),
                                                     "--out", str(tmp_path / "c.png")])
    assert not any((tmp_path / n).exists() for n in ("a.png", "b.png", "c.png"))


def test_checkpoint_of_another_preset_is_refused_on_resume(run_dir, capsys, tmp_path):
    err = _error(capsys, ["train", "--data", "synthetic", "--out", str(run_dir), "--resume", "--steps", "12"])
    assert "different architecture" in err


def test_existing_outputs_are_not_overwritten(run_dir, tmp_path, capsys):
    target = tmp_path / "keep.png"
    target.write_bytes(b"precious")
    err = _error(capsys, ["sample", "--ckpt", str(run_dir / "last.pt"), "--out", str(target), "--n", "1"])
    assert "already exists" in err and target.read_bytes() == b"precious"
    err = _error(capsys, ["train", "--data", "synthetic", "--out", str(run_dir), "--steps", "1", *MICRO])
    assert "already exists" in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output(run_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    err = _error(capsys, ["sample", "--ckpt", str(run_dir / "last.pt"), "--out", str(locked / "s.png"), "--n", "1"])
    assert "cannot write" in err


def test_unwritable_output_path_is_a_file(run_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _error(capsys, ["sample", "--ckpt", str(run_dir / "last.pt"), "--out", str(blocker / "s.png"),
                          "--n", "1", "--steps", "1"])
    assert "cannot write" in err


def test_bad_images_name_the_problem(run_dir, tmp_path, capsys):
    np.save(tmp_path / "rgb.npy", np.random.default_rng(0).integers(0, 255, (3, 28, 28, 3), dtype=np.uint8))
    err = _error(capsys, ["encode", "--ckpt", str(run_dir / "last.pt"), "--data", str(tmp_path / "rgb.npy"),
                          "--out", str(tmp_path / "z.npy")])
    assert "must be (B, 1, 28, 28)" in err and "(3, 3, 28, 28)" in err
    np.save(tmp_path / "nan.npy", np.full((2, 28, 28), np.nan, dtype=np.float32))
    assert "NaN or Inf" in _error(capsys, ["encode", "--ckpt", str(run_dir / "last.pt"), "--data",
                                           str(tmp_path / "nan.npy"), "--out", str(tmp_path / "z2.npy")])


def test_missing_dataset_and_unknown_names(tmp_path, capsys):
    assert "missing dataset file" in _error(capsys, ["train", "--data", str(tmp_path / "none.npz"),
                                                     "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit) as exc:  # argparse names the valid choices
        main(["train", "--preset", "dae-huge"])
    assert exc.value.code == 2
    assert "invalid choice: 'dae-huge'" in capsys.readouterr().err
    err = _error(capsys, ["eval", "--ckpt", str(tmp_path / "none.pt"), "--out", str(tmp_path / "e"),
                          "--sections", "figure"])
    assert "unknown evaluation section 'figure'" in err


def test_errors_print_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffae", "sample", "--ckpt", str(tmp_path / "x.pt"),
                           "--out", str(tmp_path / "y.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"diffae: error: missing checkpoint {tmp_path / 'x.pt'}"]
