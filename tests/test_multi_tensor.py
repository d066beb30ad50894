"""ops.multi_tensor_lerp_ (the EMA update): the one-launch Triton kernel against torch._foreach_lerp_.

Both are compared with an fp64 evaluation; the kernel's error may be at most twice the reference's
plus one ulp of the output (torch.lerp switches formulas at weight 0.5, the kernel does not).
On the CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by conftest).
"""
from __future__ import annotations

import pytest
import torch

from diffae import ops
from diffae.ops import _backend
from diffae.ops.multi_tensor import multi_tensor_lerp_reference_

triton = pytest.importorskip("triton")

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
]
# sizes around the kernel's 2048-element chunk, a one-element tensor and a few-chunk one
SHAPES = [(7,), (2048,), (2049,), (1,), (3, 5, 11), (64, 97)]


@pytest.fixture
def backend(monkeypatch):
    """Force one backend for the op, restoring whatever was chosen before."""
    def force(name):
        monkeypatch.setitem(_backend._forced_ops, "multi_tensor_lerp", name)
    return force


def _lists(device, dst_dtype=torch.float32, src_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    dst = [torch.randn(s, generator=g).to(device, dst_dtype) for s in SHAPES]
    src = [torch.randn(s, generator=g).to(device, src_dtype) for s in SHAPES]
    return dst, src


def _run(backend, name, dst, src, scale, weight):
    backend(name)
    out = [t.clone() for t in dst]
    ops.multi_tensor_lerp_(out, src, scale, weight)
    return out


def _assert_close_to_fp64(dst, src, w, got, ref):
    for d, s, a, b in zip(dst, src, got, ref):
        exact = d.double() + w * (s.double() - d.double())
        ulp = torch.finfo(a.dtype).eps * exact.abs().max().item()
        err, ref_err = (a.double() - exact).abs().max().item(), (b.double() - exact).abs().max().item()
        assert err <= 2 * ref_err + ulp, (tuple(d.shape), err, ref_err)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("weight", [None, 0.6, True])
def test_kernel_matches_foreach_lerp(backend, device, dtypes, weight):
    dst, src = _lists(device, *dtypes)
    scale = 0.37
    w = None if weight is None else torch.tensor(weight, device=device)
    got = _run(backend, "triton", dst, src, scale, w)
    ref = _run(backend, "reference", dst, src, scale, w)
    _assert_close_to_fp64(dst, src, scale * (1.0 if weight is None else float(weight)), got, ref)
    assert all(not torch.equal(a, d) for a, d in zip(got, dst))  # every tensor moved, the last chunk's too


@pytest.mark.parametrize("device", DEVICES)
def test_weight_zero_leaves_dst_bitwise(backend, device):
    """A skipped training step (its finite flag False) must not touch the EMA."""
    dst, src = _lists(device)
    for flag in (torch.tensor(False, device=device), torch.zeros(1, device=device)):
        got = _run(backend, "triton", dst, src, 0.25, flag)
        assert all(torch.equal(a, d) for a, d in zip(got, dst))


def test_cached_table_follows_the_lists(backend):
    """The table is cached per list of addresses: a second call on the same tensors reuses it, and
    other tensors (a different list, or the same list in another order) get their own."""
    dst, src = _lists("cpu")
    backend("triton")
    out = [t.clone() for t in dst]
    ops.multi_tensor_lerp_(out, src, 0.5)
    ops.multi_tensor_lerp_(out, src, 0.5)  # twice: dst + 0.75 (src - dst)
    for a, d, s in zip(out, dst, src):
        torch.testing.assert_close(a, d + 0.75 * (s - d))
    flipped = [t.clone() for t in dst[::-1]]
    ops.multi_tensor_lerp_(flipped, src[::-1], 1.0)  # weight 1: src, to rounding
    for a, s in zip(flipped, src[::-1]):
        torch.testing.assert_close(a, s)


def test_other_layouts_take_the_reference(backend):
    """Mixed dtypes in a list or a non-contiguous tensor: still correct, through torch._foreach_lerp_."""
    dst, src = _lists("cpu")
    dst[1] = dst[1].double()
    src[1] = src[1].double()
    src[4] = torch.randn(11, 5, 3).transpose(0, 2)
    got = _run(backend, "triton", dst, src, 0.3, None)
    for a, d, s in zip(got, dst, src):
        torch.testing.assert_close(a, torch.lerp(d, s, 0.3))


@pytest.mark.parametrize("bad, message", [
    (lambda d, s: (d[:2], s, None), "dst has 2 tensors but src has"),
    (lambda d, s: (d, [s[0].reshape(7, 1), *s[1:]], None), r"tensor 0 is \(7,\) in dst but \(7, 1\) in src"),
    (lambda d, s: (d, [s[0].long(), *s[1:]], None), "tensor 0 must be floating point"),
    (lambda d, s: (d, s, torch.ones(2)), "one-element float or bool tensor"),
])
def test_bad_input_is_named(bad, message):
    dst, src, weight = bad(*_lists("cpu"))
    with pytest.raises((ValueError, TypeError), match=message):
        ops.multi_tensor_lerp_(dst, src, 0.5, weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_launch_for_the_whole_list(backend):
    """The point of the op: one kernel for the list, where foreach with a device weight runs one each."""
    dst, src = _lists("cuda")
    backend("triton")
    ok = torch.tensor(True, device="cuda")
    ops.multi_tensor_lerp_(dst, src, 0.1, ok)  # builds the table (a host-to-device copy)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.multi_tensor_lerp_(dst, src, 0.1, ok)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]


def test_trainer_ema_through_the_kernel(backend, micro_cfg, tmp_path):
    """The trainer's EMA update on the kernel: the reference's result on a finite step, untouched on
    a skipped one."""
    from diffae.data import synthetic
    from diffae.engine.trainer import Trainer
    trainer = Trainer(micro_cfg, synthetic(n=32), tmp_path, quiet=True)
    with torch.no_grad():  # a model away from its EMA, so the update moves every weight
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p))
    start = [p.clone() for p in trainer.ema.parameters()]
    results = {}
    for name in ("reference", "triton"):
        backend(name)
        with torch.no_grad():
            for p, s in zip(trainer.ema.parameters(), start):
                p.copy_(s)
        trainer._update_ema(torch.tensor(False))
        assert all(torch.equal(p, s) for p, s in zip(trainer.ema.parameters(), start)), name
        trainer._update_ema(torch.tensor(True))
        results[name] = [p.clone() for p in trainer.ema.parameters()]
    for a, b, s in zip(results["triton"], results["reference"], start):
        assert not torch.equal(a, s)
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
