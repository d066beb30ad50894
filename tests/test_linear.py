"""ops.linear, the inference copies' GEMM: the reference on the CPU; on the GPU every cuBLASLt
candidate of diffae::lt_linear against fp32, the timed choice, and CUDA-graph capture."""
import pytest
import torch
import torch.nn.functional as F

from diffae import ops
from diffae.ops import linear as lin


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_is_the_reference_on_cpu(gelu, bias):
    torch.manual_seed(0)
    x, layer = torch.randn(2, 5, 24), torch.nn.Linear(24, 40, bias=bias)
    want = layer(x)
    want = F.gelu(want, approximate="tanh") if gelu else want
    torch.testing.assert_close(ops.linear(x, layer.weight, layer.bias, gelu=gelu), want)


def test_linear_names_a_shape_mismatch():
    with pytest.raises(ValueError, match="does not match weight"):
        ops.linear(torch.randn(3, 8), torch.randn(4, 9))


def _lt_or_skip():
    if not lin._has_lt():
        pytest.skip("diffae::lt_linear not built")
    return torch.ops.diffae


def _problem(M, K, N, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).bfloat16()
    b = torch.randn(N, device="cuda", generator=g).bfloat16()
    return x, w, b


@pytest.mark.gpu
@pytest.mark.parametrize("M, K, N", [(256, 768, 2304), (256, 3072, 768), (37, 96, 200), (256, 768, 12)])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_every_lt_candidate_matches_fp32(M, K, N, gelu, bias):
    lt = _lt_or_skip()
    x, w, b = _problem(M, K, N)
    b = b if bias else None
    exact = lin.linear_reference(x.double(), w.double(), None if b is None else b.double(), gelu)
    torch_err = (lin.linear_reference(x, w, b, gelu).double() - exact).abs().max().item()
    n = lt.lt_linear_candidates(x, w, b, gelu)
    assert n >= 1
    for algo in range(n):
        err = (lt.lt_linear(x, w, b, gelu, algo).double() - exact).abs().max().item()
        assert err <= 2 * torch_err + 1e-3, f"candidate {algo} of {n}: max error {err:.3e}, torch's {torch_err:.3e}"
    with pytest.raises(RuntimeError, match="out of range"):
        lt.lt_linear(x, w, b, gelu, n)


@pytest.mark.gpu
def test_tuned_linear_is_kept_and_captured():
    _lt_or_skip()
    x, w, b = _problem(256, 768, 768, seed=1)
    want = ops.linear(x, w, b)  # times the candidates
    key = lin._key(x, w, b, False)
    assert key in lin._choices
    graph, static = torch.cuda.CUDAGraph(), x.clone()
    with torch.cuda.graph(graph):
        out = ops.linear(static, w, b)
    graph.replay()
    assert torch.equal(out, want)  # the kept choice, not a re-timing or another candidate
    print(f"tuned choice for (256, 768) x (768, 768): candidate {lin._choices[key]}")


@pytest.mark.gpu
def test_linear_with_grad_falls_back_to_autograd():
    x, w, b = _problem(16, 32, 8)
    w = w.requires_grad_()
    ops.linear(x, w, b, gelu=True).float().sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
