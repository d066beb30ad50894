"""ops.gelu_mlp and the extension's linear_gelu / linear_dgelu against fp64 maths and PyTorch's error.

On the CPU the extension's composite kernels run behind the same autograd wiring as the cuBLASLt
ones (forcing the "cuda" backend), so CI checks the op's contract, its backward and its
torch.compile registration; the `gpu` set checks the cuBLASLt epilogues themselves.

Tolerance rule: the path under test and the PyTorch reference at the same dtypes are both compared
with an fp64 evaluation of the same inputs; the op's max error may be at most twice PyTorch's
(plus 1e-5 of the output's magnitude, for where both are at rounding level).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

try:
    import diffae._C  # noqa: F401  (registers torch.ops.diffae)
except ImportError as exc:
    pytest.skip(f"diffae._C is not importable ({exc})", allow_module_level=True)
if not hasattr(torch.ops.diffae, "linear_gelu"):
    pytest.skip("diffae._C was built without linear_gelu (rebuild: pip install --no-build-isolation -e .)",
                allow_module_level=True)

from diffae import ops  # noqa: E402
from diffae.ops import _backend  # noqa: E402
from diffae.ops.mlp import gelu_mlp_reference  # noqa: E402

@pytest.fixture
def fused_on_cpu(monkeypatch):
    """The fused path on CPU tensors: the extension's composite kernels behind the same autograd op."""
    monkeypatch.setitem(_backend._forced_ops, "gelu_mlp", "cuda")


@pytest.fixture
def auto_backend(monkeypatch):
    """Automatic choice, whatever DIFFAE_BACKEND says."""
    monkeypatch.setattr(_backend, "_forced", None)
    monkeypatch.delitem(_backend._forced_ops, "gelu_mlp", raising=False)


def _params(C, N, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # weights at nn.Linear's scale; biases large enough that a dropped bias or its gradient shows
    w1 = torch.randn(N, C, generator=g) / C ** 0.5
    b1 = torch.randn(N, generator=g) * 0.5
    w2 = torch.randn(C, N, generator=g) / N ** 0.5
    b2 = torch.randn(C, generator=g) * 0.5
    return [t.to(device) for t in (w1, b1, w2, b2)]


def _run(fn, x, params, grad_out, dtype=None, autocast=False):
    """Output and every input gradient of fn, on leaf copies of the inputs (optionally cast to dtype)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (x, *params)]
    device = x.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _assert_close(got, ref, exact, what):
    for name, g, r, e in zip(("out", "dx", "dw1", "db1", "dw2", "db2"), got, ref, exact):
        assert g.shape == e.shape and g.dtype == r.dtype, (what, name, g.shape, g.dtype, r.dtype)
        err = (g.double() - e).abs().max().item()
        ref_err = (r.double() - e).abs().max().item()
        bound = 2 * ref_err + 1e-5 * e.abs().max().item()
        assert err <= bound, f"{what} {name}: max error {err:.3g} > {bound:.3g} (PyTorch's own: {ref_err:.3g})"


def _compare(x, params, dtype=None, autocast=False, fn=ops.gelu_mlp, what=""):
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(x.shape, generator=g).to(x.device)
    exact = _run(gelu_mlp_reference, x.double(), [p.double() for p in params], grad_out.double())
    ref = _run(gelu_mlp_reference, x, params, grad_out, dtype, autocast)
    got = _run(fn, x, params, grad_out, dtype, autocast)
    _assert_close(got, ref, exact, what)


@pytest.mark.parametrize("shape", [(2, 16, 24), (37, 8), (1, 1, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_path_matches_reference_cpu(fused_on_cpu, shape, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    _compare(x, _params(shape[-1], 4 * shape[-1], "cpu"), dtype=dtype, what=f"{shape} {dtype}")


def test_unfused_backward_matches_reference_cpu(fused_on_cpu, monkeypatch):
    monkeypatch.setenv("DIFFAE_MLP_BWD", "unfused")
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(9))
    _compare(x, _params(16, 64, "cpu"), what="unfused backward")


def test_fused_path_under_autocast_cpu(fused_on_cpu):
    x = torch.randn(4, 9, 16, generator=torch.Generator().manual_seed(3))
    _compare(x, _params(16, 64, "cpu"), autocast=True, what="autocast")


def test_fused_path_runs_the_extension(fused_on_cpu, monkeypatch):
    """The forced path really goes through diffae::linear_gelu / linear_dgelu, not the reference."""
    calls = []
    for name in ("linear_gelu", "linear_dgelu"):
        op = getattr(torch.ops.diffae, name)
        monkeypatch.setattr(torch.ops.diffae, name, lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a))
    x = torch.randn(3, 16, requires_grad=True)
    ops.gelu_mlp(x, *[p.requires_grad_() for p in _params(16, 32, "cpu")]).sum().backward()
    assert calls == ["linear_gelu", "linear_dgelu"]


def test_fused_path_compiles_without_graph_breaks(fused_on_cpu):
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(ops.gelu_mlp, fullgraph=True, backend="aot_eager")
    _compare(x, _params(16, 64, "cpu"), fn=compiled, what="compiled")


def test_missing_extension_falls_back_without_a_graph_break(fused_on_cpu, monkeypatch):
    # the fallback's one-time log message, met while tracing, must not split the graph
    monkeypatch.setenv("DIFFAE_NO_EXT", "1")
    monkeypatch.setattr(_backend, "_logged", set())
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(ops.gelu_mlp, fullgraph=True, backend="aot_eager")
    _compare(x, _params(16, 64, "cpu"), fn=compiled, what="compiled, no extension")

def test_extension_ops_match_their_formulas_cpu():
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(7, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    h, pre = torch.ops.diffae.linear_gelu(x, w, b)
    torch.testing.assert_close(pre, x @ w.t() + b)
    torch.testing.assert_close(h, F.gelu(pre, approximate="tanh"))
    grad, w2 = torch.randn(7, 8, generator=g), torch.randn(8, 24, generator=g)
    dpre = torch.ops.diffae.linear_dgelu(grad, w2, pre)
    expect = torch.ops.aten.gelu_backward(grad @ w2, pre, approximate="tanh")
    torch.testing.assert_close(dpre, expect)


@pytest.mark.parametrize("bad, match", [
    (lambda x, p: (x, p[0][:, :8], *p[1:]), "w1 must be"),
    (lambda x, p: (x, p[0], p[1][:-1], *p[2:]), "b1 must be"),
    (lambda x, p: (x, *p[:2], p[2].t(), p[3]), "w2 must be"),
    (lambda x, p: (x, *p[:3], p[3][:1]), "b2 must be"),
    (lambda x, p: (x[0, 0], *p), "x must be"),
])
def test_bad_shapes_name_the_argument(bad, match):
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match=match):
        ops.gelu_mlp(*bad(x, _params(16, 32, "cpu")))


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match="x must be floating point"):
        ops.gelu_mlp(torch.ones(2, 16, dtype=torch.int64), *_params(16, 32, "cpu"))


def test_extension_ops_reject_bad_shapes():
    with pytest.raises(RuntimeError, match="linear_gelu: expected x"):
        torch.ops.diffae.linear_gelu(torch.randn(4, 16), torch.randn(8, 12), torch.randn(8))
    with pytest.raises(RuntimeError, match="linear_dgelu: expected grad"):
        torch.ops.diffae.linear_dgelu(torch.randn(4, 16), torch.randn(8, 12), torch.randn(4, 12))


# ---------------------------------------------------------------------------------------------
# GPU: the cuBLASLt epilogues
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, hidden", [((4, 256, 768), 3072), ((37, 64), 256), ((1, 1, 128), 512)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.gpu
def test_cublaslt_path_matches_reference(auto_backend, shape, hidden, dtype, autocast):
    if autocast and dtype == torch.float16:
        pytest.skip("autocast runs bfloat16 here")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(6)).cuda()
    params = _params(shape[-1], hidden, "cuda")
    _compare(x, params, dtype=None if autocast else dtype, autocast=autocast, what=f"{shape} {dtype} ac={autocast}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inference_epilogue_is_the_tanh_gelu(auto_backend, dtype):
    """Without autograd the forward is torch's GELU epilogue (no pre kept), which must agree with the
    tanh-GELU reference as closely as PyTorch's own 16-bit evaluation does."""
    x = torch.randn(2, 37, 96, generator=torch.Generator().manual_seed(10)).cuda()  # 74 rows: not a tile multiple
    params = _params(96, 384, "cuda")
    exact = gelu_mlp_reference(x.double(), *[p.double() for p in params])
    x, params = x.to(dtype), [p.to(dtype) for p in params]
    with torch.no_grad():
        plain = gelu_mlp_reference(x, *params)
        fused = ops.gelu_mlp(x, *params)
    err, ref_err = (fused.double() - exact).abs().max().item(), (plain.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + 1e-5 * exact.abs().max().item(), (err, ref_err)


@pytest.mark.gpu
def test_cublaslt_ops_match_their_formulas():
    g = torch.Generator().manual_seed(7)
    x, w, b = (torch.randn(s, generator=g).cuda().bfloat16() for s in ((300, 64), (256, 64), (256,)))
    h, pre = torch.ops.diffae.linear_gelu(x, w, b)
    pre_ref = torch.addmm(b.float(), x.float(), w.float().t())
    torch.testing.assert_close(pre.float(), pre_ref, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(h.float(), F.gelu(pre_ref, approximate="tanh"), rtol=1.6e-2, atol=1e-2)
    grad, w2 = (torch.randn(s, generator=g).cuda().bfloat16() for s in ((300, 64), (64, 256)))
    dpre = torch.ops.diffae.linear_dgelu(grad, w2, pre)
    expect = torch.ops.aten.gelu_backward(grad.float() @ w2.float(), pre.float(), approximate="tanh")
    torch.testing.assert_close(dpre.float(), expect, rtol=1.6e-2, atol=2e-2)


@pytest.mark.gpu
def test_cublaslt_path_captures_in_a_cuda_graph(auto_backend):
    x = torch.randn(8, 64, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    params = [p.bfloat16().requires_grad_() for p in _params(128, 512, "cuda")]
    eager = ops.gelu_mlp(x, *params)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up: the heuristic query and workspace outside the capture
        ops.gelu_mlp(x, *params).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.gelu_mlp(x, *params)
    graph.replay()
    torch.testing.assert_close(out, eager.detach(), rtol=0, atol=0)


@pytest.mark.gpu
def test_first_call_inside_a_capture_runs_untimed():
    """A problem first met while a CUDA graph is captured cannot time its candidates: it must run the
    heuristic's first choice there (and time them at its first call outside)."""
    g = torch.Generator().manual_seed(8)
    x, w, b = (torch.randn(s, generator=g).cuda().bfloat16() for s in ((24, 136), (272, 136), (272,)))  # a new shape
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        h, pre = torch.ops.diffae.linear_gelu(x, w, b)
    graph.replay()
    torch.cuda.synchronize()
    h_eager, pre_eager = torch.ops.diffae.linear_gelu(x, w, b)
    torch.testing.assert_close(pre.float(), pre_eager.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(h.float(), h_eager.float(), rtol=1e-2, atol=1e-2)
