"""Backend forcing: globally and per op, from DIFFAE_BACKEND or set_backend."""
import pytest
import torch

from diffae.ops import _backend


@pytest.fixture
def restore():
    saved = _backend.forced_backend(), dict(_backend._forced_ops)
    yield
    _backend.set_backend(saved[0])
    _backend._forced_ops.clear()
    _backend._forced_ops.update(saved[1])


def test_parse_global_and_per_op():
    assert _backend._parse_forced("") == (None, {})
    assert _backend._parse_forced("triton") == ("triton", {})
    assert _backend._parse_forced("cuda, attention=reference") == ("cuda", {"attention": "reference"})


@pytest.mark.parametrize("spec, words", [("tritn", "unknown backend 'tritn'"),
                                         ("attn=triton", "unknown op 'attn'"),
                                         ("attention=fast", "unknown backend 'fast' for attention")])
def test_parse_refuses_unknown_names(spec, words):
    with pytest.raises(ValueError, match=words):
        _backend._parse_forced(spec)


def test_per_op_choice_wins_over_global(restore):
    x = torch.randn(2, 3)
    _backend.set_backend("reference")
    _backend.set_backend("triton", op="attention")
    assert _backend.forced_backend("attention") == "triton"
    assert _backend.forced_backend("adaln_modulate") == "reference"
    assert not _backend.use_triton("adaln_modulate", x)
    assert _backend.use_triton("attention", x)  # CPU tensors: the interpreter (conftest sets it)
    _backend.set_backend("triton")
    _backend.set_backend("reference", op="attention")
    assert not _backend.use_triton("attention", x)
    assert _backend.use_triton("adaln_modulate", x)
    assert "attention=reference" in _backend.report()["forced"]
    _backend.set_backend(None, op="attention")
    assert _backend.forced_backend("attention") == "triton"  # the global choice again
    with pytest.raises(ValueError, match="unknown op"):
        _backend.set_backend("triton", op="nope")


def test_bad_environment_fails_at_first_use_and_in_one_cli_line(tmp_path):
    import os
    import subprocess
    import sys
    env = dict(os.environ, DIFFAE_BACKEND="attention=fast")
    code = ("import torch, diffae\nfrom diffae import ops\n"
            "try:\n    ops.attention(torch.randn(1, 4, 3, 2, 8, dtype=torch.bfloat16))\nexcept diffae.errors.ConfigError as e:\n"
            "    print('refused:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr  # importing diffae does not fail
    assert "refused: unknown backend 'fast' for attention in DIFFAE_BACKEND" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "diffae", "info"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "diffae: error: unknown backend 'fast' for attention in DIFFAE_BACKEND; choose one of reference, triton, cuda"]
