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
