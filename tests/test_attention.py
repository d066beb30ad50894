"""The Triton attention kernels (diffae.kernels.attention) against their spec, attention_reference.

Errors are measured against the fp32 reference (attention_reference(upcast=True)) on the same
bf16/fp16-rounded inputs, and compared with PyTorch's own error at the kernel's dtype (SDPA on
the same device): ||kernel - ref|| <= FACTOR * ||torch - ref|| + a tiny floor.  On CUDA, SDPA
rounds the softmax probabilities to bf16/fp16 for the tensor cores as the kernel does, and
FACTOR is 2.  On the CPU, SDPA keeps them in fp32 and only rounds the output, so its error is
about 2.5x smaller than any tensor-core kernel's; there FACTOR is 4 (the interpreter replays the
GPU's rounding points exactly).

Without CUDA the kernels run under TRITON_INTERPRET=1 on tiny shapes with 16 x 16 tiles.
"""
from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

triton = pytest.importorskip("triton")

from diffae import ops  # noqa: E402
from diffae.ops import _backend  # noqa: E402
ops_attention = importlib.import_module("diffae.ops.attention")  # noqa: E402  (the module, not ops.attention)
from diffae.ops.attention import attention_reference  # noqa: E402

try:
    from diffae.kernels import attention as K  # noqa: E402
except ImportError as exc:  # pragma: no cover - triton present but kernels not importable
    pytest.skip(f"diffae.kernels.attention is not importable ({exc})", allow_module_level=True)

CPU = not torch.cuda.is_available()
# triton's own jit helpers (tl.sum, ...) are built for the interpreter only if TRITON_INTERPRET=1
# was set before triton's first import; importing diffae imports torch._dynamo, which imports
# triton, so on a CPU machine the variable must be set before diffae is imported (conftest or
# the environment).  Otherwise interpreted kernels fail in some contexts (opcheck, compile, ...).
_LATE_INTERPRET = CPU and isinstance(triton.language.standard.sum, triton.runtime.jit.JITFunction)


@pytest.fixture(autouse=True)
def _require_early_interpret():
    if _LATE_INTERPRET:
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set, so the interpreter "
                    "cannot run triton's own helpers: set it before importing diffae "
                    "(tests/conftest.py or the environment)")
FACTOR = 4.0 if CPU else 2.0
FLOOR = {torch.bfloat16: 2e-4, torch.float16: 3e-5}  # relative to ||ref||: a tiny fraction of one ulp
DEV = "cpu" if CPU else "cuda"


@pytest.fixture(autouse=True)
def _triton_backend():
    # Tests of the public entry point must reach the kernel whatever DIFFAE_BACKEND says.
    saved = _backend.forced_backend()
    _backend.set_backend("triton" if CPU else None)
    yield
    _backend.set_backend(saved)


def _inputs(B, N, H, D, dtype, norm, M, device=DEV, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(device, dtype)
    qw = kw = kvx = None
    if norm:
        # Learned weights away from 1 (and of either sign) so their gradients are exercised.
        qw = (1 + 0.5 * torch.randn(D, generator=g)).to(device)
        kw = (1 + 0.5 * torch.randn(D, generator=g)).to(device)
    if M:
        kvx = torch.randn(B, M, 2, H, D, generator=g).to(device, dtype)
    do = torch.randn(B, N, H * D, generator=g).to(device, dtype)
    return qkv, qw, kw, kvx, do


def _run(fn, qkv, qw, kw, kvx, do, cast=None):
    leaves = [t if t is None else (t.detach().to(cast) if cast else t.detach().clone()).requires_grad_()
              for t in (qkv, qw, kw, kvx)]
    out = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, present, do.to(out.dtype))
    return [out.detach(), *grads]


def _check(B, N, H, D, dtype, norm, M, entry=None):
    qkv, qw, kw, kvx, do = _inputs(B, N, H, D, dtype, norm, M)
    entry = entry or (lambda q, a, b, x: K.attention(q, a, b, x))
    got = _run(entry, qkv, qw, kw, kvx, do)
    ref = _run(lambda q, a, b, x: attention_reference(q, a, b, x, upcast=True), qkv, qw, kw, kvx, do,
               cast=torch.float32)
    pt = _run(lambda q, a, b, x: attention_reference(q, a, b, x), qkv, qw, kw, kvx, do)
    names = ["out", "dqkv"] + (["dwq", "dwk"] if norm else []) + (["dkv_extra"] if M else [])
    for name, g, r, p in zip(names, got, ref, pt):
        assert g.shape == r.shape and g.dtype == p.dtype, name
        assert torch.isfinite(g).all(), name
        e_k = (g.double() - r.double()).norm().item()
        e_t = (p.double() - r.double()).norm().item()
        scale = r.double().norm().item()
        bound = FACTOR * e_t + FLOOR[dtype] * scale + 1e-6 * math.sqrt(r.numel())
        assert e_k <= bound, (f"{name}: kernel error {e_k:.3e} > {bound:.3e} "
                              f"(torch {e_t:.3e}, |ref| {scale:.3e})")


# (B, N, H, D, dtype, norm, M): odd N (masked tails), D = 32, 64, 72 and 96 (masked columns),
# with and without QK-norm and extra keys, M odd too.
BF, HF = torch.bfloat16, torch.float16
CASES = [
    (1, 17, 2, 32, BF, False, 0),
    (2, 33, 1, 64, BF, False, 0),
    (1, 33, 2, 72, BF, False, 0),
    (1, 1, 2, 64, BF, False, 0),
    (1, 17, 2, 64, BF, True, 0),
    (1, 33, 1, 72, BF, True, 0),
    (1, 17, 2, 32, BF, False, 5),
    (1, 33, 1, 72, BF, False, 17),
    (2, 17, 1, 64, BF, True, 7),
    (1, 1, 2, 72, BF, True, 3),
    (1, 33, 1, 32, HF, True, 17),
    (1, 17, 1, 72, HF, False, 0),
    (1, 20, 1, 96, BF, True, 5),
]


@pytest.mark.parametrize("B,N,H,D,dtype,norm,M", CASES)
def test_matches_reference(B, N, H, D, dtype, norm, M):
    _check(B, N, H, D, dtype, norm, M)


def test_public_entry_point_dispatches_to_kernel(monkeypatch):
    calls = []
    real = K.attention
    monkeypatch.setattr(K, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    _check(1, 17, 2, 32, BF, True, 3, entry=lambda q, a, b, x: ops.attention(q, a, b, x))
    assert calls, "diffae.ops.attention did not reach the Triton kernel"


def test_strided_views_of_a_projection():
    # qkv as a view of a wider (B, N, 3C + pad) buffer: no copy, strides read as they are.
    B, N, H, D = 1, 17, 2, 32
    buf = torch.randn(B, N, 3 * H * D + 8, dtype=BF, device=DEV)
    qkv = buf[..., : 3 * H * D].view(B, N, 3, H, D)
    assert not qkv.is_contiguous() and K.supports(qkv)
    ref = attention_reference(qkv.float(), upcast=True)
    pt = attention_reference(qkv)
    e_k = (K.attention(qkv).float() - ref).norm()
    assert e_k <= FACTOR * (pt.float() - ref).norm() + FLOOR[BF] * ref.norm()


def test_supports():
    x = torch.randn(1, 4, 3, 2, 64, device=DEV)
    assert not K.supports(x)  # fp32 goes to SDPA
    assert K.supports(x.to(BF))
    for D in (12, 100, 136, 256):
        assert not K.supports(torch.zeros(1, 4, 3, 2, D, dtype=BF, device=DEV)), D
    for D in (32, 64, 72, 128):
        assert K.supports(torch.zeros(1, 4, 3, 2, D, dtype=BF, device=DEV)), D
    assert not K.supports(x.to(BF).transpose(-1, -2).contiguous().transpose(-1, -2))
    w72 = torch.ones(72, device=DEV)
    q72 = torch.zeros(1, 4, 3, 2, 72, dtype=BF, device=DEV)
    assert K.supports(q72, q_norm_weight=w72) == CPU  # QK-norm at D = 72: SDPA on CUDA for now
    assert K.head_geometry(64) == (64, 16, False)
    for D in (72, 96, 120):  # covered by a head tile plus a tail, or one padded tile
        DH, DT, tail = K.head_geometry(D)
        assert DH + (DT if tail else 0) >= D and DH & (DH - 1) == 0 and DT & (DT - 1) == 0


def test_opcheck():
    qkv, qw, kw, kvx, do = _inputs(1, 17, 1, 32, BF, True, 3)
    qkv.requires_grad_()
    qw.requires_grad_()
    kw.requires_grad_()
    kvx.requires_grad_()
    torch.library.opcheck(torch.ops.diffae_triton.attention.default, (qkv, qw, kw, kvx, 1e-6))
    torch.library.opcheck(torch.ops.diffae_triton.attention.default, (qkv.detach(), None, None, None, 1e-6))


def test_compile_fullgraph_traces_the_op():
    qkv, qw, kw, kvx, do = _inputs(1, 17, 2, 32, BF, True, 0)

    def f(x, a, b):
        return ops.attention(x, a, b).float().square().sum()

    backend = "aot_eager" if CPU else "inductor"  # CPU: tracing is the point, not codegen
    x = qkv.clone().requires_grad_()
    torch.compile(f, fullgraph=True, backend=backend)(x, qw, kw).backward()
    y = qkv.clone().requires_grad_()
    f(y, qw, kw).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# GPU: real sizes, torch.compile with Inductor, CUDA graphs.  Untuned configs keep compile time low.
# ------------------------------------------------------------------------------------------------

GPU_CASES = [
    (4, 256, 6, 64, BF, False, 0),
    (2, 1000, 4, 72, BF, False, 0),
    # QK-norm with D = 72 failed this test on an H100 (triton 3.6) and is routed to SDPA there
    # (K.supports); kept here to track it.
    pytest.param(2, 1000, 4, 72, BF, True, 0, marks=pytest.mark.xfail(reason="known GPU failure")),
    (2, 257, 4, 128, BF, False, 77),
    (2, 300, 4, 64, HF, True, 16),
    (1, 4096, 2, 64, BF, False, 0),
]


@pytest.fixture
def _untuned(monkeypatch):
    monkeypatch.delenv("DIFFAE_ATTN_AUTOTUNE", raising=False)
    monkeypatch.setattr(ops_attention, "_autotune", False)


@pytest.mark.gpu
@pytest.mark.parametrize("B,N,H,D,dtype,norm,M", GPU_CASES)
def test_gpu_matches_reference(_untuned, B, N, H, D, dtype, norm, M):
    _check(B, N, H, D, dtype, norm, M)


@pytest.mark.gpu
def test_gpu_autotuned_matches_reference():
    _check(8, 256, 4, 64, BF, False, 0)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture(_untuned):
    qkv, qw, kw, kvx, do = _inputs(2, 256, 4, 64, BF, True, 16)
    x = qkv.clone().requires_grad_()

    def step():
        o = K.attention(x, qw, kw, kvx)
        o.backward(do)
        return o

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: compile (and tune) outside the capture
            x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(s)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    eager_out = K.attention(qkv, qw, kw, kvx)
    x.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
