"""ops.linear (bias gradient in the weight-gradient GEMM's epilogue) against F.linear.

Same rule as test_mlp: the op and F.linear at the same dtypes are both compared with an fp64
evaluation; the op's max error may be at most twice PyTorch's (plus 1e-5 of the magnitude).
On the CPU the extension's composite kernels run behind the same autograd wiring (forcing "cuda").
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

try:
    import diffae._C  # noqa: F401  (registers torch.ops.diffae)
except ImportError as exc:
    pytest.skip(f"diffae._C is not importable ({exc})", allow_module_level=True)
if not hasattr(torch.ops.diffae, "linear_wgrad"):
    pytest.skip("diffae._C was built without linear_wgrad (rebuild: pip install --no-build-isolation -e .)",
                allow_module_level=True)

from diffae import ops  # noqa: E402
from diffae.ops import _backend  # noqa: E402


@pytest.fixture
def fused_on_cpu(monkeypatch):
    monkeypatch.setitem(_backend._forced_ops, "linear", "cuda")


@pytest.fixture
def auto_backend(monkeypatch):
    monkeypatch.setattr(_backend, "_forced", None)
    monkeypatch.delitem(_backend._forced_ops, "linear", raising=False)


def _run(fn, x, w, b, grad_out, dtype=None, autocast=False):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (x, w, b)]
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _compare(shape, N, device, dtype=None, autocast=False, fn=ops.linear):
    g = torch.Generator().manual_seed(0)
    K = shape[-1]
    # a bias large enough that a dropped bias or bias gradient shows
    x, w, b = torch.randn(shape, generator=g), torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(N, generator=g)
    grad_out = torch.randn(*shape[:-1], N, generator=g)
    x, w, b, grad_out = (t.to(device) for t in (x, w, b, grad_out))
    exact = _run(F.linear, x.double(), w.double(), b.double(), grad_out.double())
    ref = _run(F.linear, x, w, b, grad_out, dtype, autocast)
    got = _run(fn, x, w, b, grad_out, dtype, autocast)
    for name, a, r, e in zip(("out", "dx", "dw", "db"), got, ref, exact):
        assert a.shape == e.shape and a.dtype == r.dtype, (name, a.shape, a.dtype, r.dtype)
        err, ref_err = (a.double() - e).abs().max().item(), (r.double() - e).abs().max().item()
        bound = 2 * ref_err + 1e-5 * e.abs().max().item()
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (PyTorch's own: {ref_err:.3g})"


@pytest.mark.parametrize("shape, N", [((2, 9, 16), 48), ((37, 8), 24), ((1, 1, 16), 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_f_linear_cpu(fused_on_cpu, shape, N, dtype):
    _compare(shape, N, "cpu", dtype=dtype)


def test_under_autocast_and_unfused_cpu(fused_on_cpu, monkeypatch):
    _compare((4, 7, 16), 32, "cpu", autocast=True)
    monkeypatch.setenv("DIFFAE_WGRAD", "unfused")
    _compare((4, 7, 16), 32, "cpu")


def test_runs_the_extension(fused_on_cpu, monkeypatch):
    calls = []
    op = torch.ops.diffae.linear_wgrad
    monkeypatch.setattr(torch.ops.diffae, "linear_wgrad", lambda *a: calls.append(1) or op(*a))
    x = torch.randn(3, 16, requires_grad=True)
    ops.linear(x, torch.randn(8, 16, requires_grad=True), torch.randn(8, requires_grad=True)).sum().backward()
    assert calls == [1]


def test_compiles_without_graph_breaks(fused_on_cpu):
    _compare((2, 5, 16), 24, "cpu", fn=torch.compile(ops.linear, fullgraph=True, backend="aot_eager"))


def test_wgrad_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match="linear_wgrad: expected grad"):
        torch.ops.diffae.linear_wgrad(torch.randn(4, 16), torch.randn(5, 12))


@pytest.mark.gpu
@pytest.mark.parametrize("shape, N", [((4, 256, 768), 2304), ((37, 64), 256), ((1, 1, 128), 512)])
@pytest.mark.parametrize("dtype, autocast", [(torch.bfloat16, False), (torch.float16, False), (None, True)])
def test_cublaslt_path_matches_f_linear(auto_backend, shape, N, dtype, autocast):
    _compare(shape, N, "cuda", dtype=dtype, autocast=autocast)


@pytest.mark.gpu
def test_cublaslt_path_captures_in_a_cuda_graph(auto_backend):
    x = torch.randn(8, 64, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(8, 64, 256, device="cuda", dtype=torch.bfloat16)
    eager = torch.autograd.grad(ops.linear(x, w, b), (x, w, b), grad)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        captured = torch.autograd.grad(ops.linear(x, w, b), (x, w, b), grad)
    graph.replay()
    torch.cuda.synchronize()
    for a, e in zip(captured, eager):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
