"""The C++/CUDA sampler step (torch.ops.diffae.sampler_step) against its spec, sampler_step_reference.

The kernels follow the reference op by op in fp32, so they agree to fp32 rounding (bitwise in
practice); the tolerances below are one or two fp32 ulps, not PyTorch-vs-kernel slack.
"""
from __future__ import annotations

import pytest
import torch

try:
    import diffae._C  # noqa: F401  (registers torch.ops.diffae)
except ImportError as exc:  # the extension is optional; the reference path is tested elsewhere
    pytest.skip(f"diffae._C is not importable ({exc})", allow_module_level=True)
if not hasattr(torch.ops.diffae, "sampler_step"):
    pytest.skip("diffae._C was built without sampler_step (rebuild: pip install --no-build-isolation -e .)",
                allow_module_level=True)

from diffae import ops
from diffae.ops import _backend
from diffae.ops.sampler_step import PREDICTIONS, sampler_step_reference

OP = torch.ops.diffae.sampler_step
RTOL, ATOL = 1e-6, 1e-6
COEFFS = (0.93, 0.41, -0.27, 0.18, 0.052)  # (cx, cd, ce, cp, cn): arbitrary, all nonzero

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
]
SHAPES = [(3, 1, 7, 5), (1, 1, 1, 1), (2, 3, 16, 16), (5, 257)]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _auto_backend():
    # Tests of the public entry point must reach the extension whatever DIFFAE_BACKEND says.
    saved = _backend.forced_backend()
    _backend.set_backend(None)
    yield
    _backend.set_backend(saved)


def _inputs(shape, device, out_dtype=torch.float32, prev=True, noise=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd():  # random, never zeros
        return torch.randn(shape, generator=g).to(device)

    x = rnd()
    out = rnd().to(out_dtype)
    return x, out, rnd() if prev else None, rnd() if noise else None


def _coeffs(prev, noise):
    cx, cd, ce, cp, cn = COEFFS
    return (cx, cd, ce, cp if prev else 0.0, cn if noise else 0.0)


def _run_both(x, out, prev, noise, alpha, sigma, pred, clip, coeffs):
    got = OP(x, out, prev, noise, alpha, sigma, PREDICTIONS.index(pred), clip, list(coeffs))
    want = sampler_step_reference(x, out, prev, noise, alpha, sigma, pred, clip, coeffs)
    return got, want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("pred", PREDICTIONS)
@pytest.mark.parametrize("clip", [0.0, 1.0])
@pytest.mark.parametrize("with_prev,with_noise", [(False, False), (True, False), (False, True), (True, True)])
def test_matches_reference(device, shape, out_dtype, pred, clip, with_prev, with_noise):
    x, out, prev, noise = _inputs(shape, device, out_dtype, with_prev, with_noise)
    coeffs = _coeffs(with_prev, with_noise)
    (x_next, x0), (ref_next, ref_x0) = _run_both(x, out, prev, noise, 0.8, 0.6, pred, clip, coeffs)
    for t in (x_next, x0):
        assert t.dtype == torch.float32 and t.shape == x.shape and t.device == x.device
    torch.testing.assert_close(x0, ref_x0, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(x_next, ref_next, rtol=RTOL, atol=ATOL)
    if clip > 0:
        assert x0.abs().max().item() <= clip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pred", PREDICTIONS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_sigma_zero(device, pred, out_dtype):
    # The last step of a VP sampler: sigma == 0, eps is defined as 0 (no division by zero).
    x, out, prev, noise = _inputs((3, 1, 7, 5), device, out_dtype)
    (x_next, x0), (ref_next, ref_x0) = _run_both(x, out, prev, noise, 1.0, 0.0, pred, 0.0, COEFFS)
    assert torch.isfinite(x_next).all()
    torch.testing.assert_close(x0, ref_x0, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(x_next, ref_next, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha,sigma", [(0.999, 0.045), (0.3, 0.954), (1.0, 3.7)])  # VP ends, VE
def test_schedule_extremes(device, alpha, sigma):
    x, out, prev, noise = _inputs((2, 3, 16, 16), device, torch.bfloat16, seed=1)
    for pred in PREDICTIONS:
        (x_next, x0), (ref_next, ref_x0) = _run_both(x, out, prev, noise, alpha, sigma, pred, 0.0, COEFFS)
        torch.testing.assert_close(x0, ref_x0, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(x_next, ref_next, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_public_entry_point_uses_extension(device):
    # diffae.ops.sampler_step also accepts non-contiguous inputs and fp16 prev/noise (it upcasts).
    x, out, prev, noise = _inputs((4, 3, 8, 8), device, torch.bfloat16)
    x_t = x.transpose(-1, -2)
    out_t = out.transpose(-1, -2)
    prev_h = prev.half()
    got = ops.sampler_step(x_t, out_t, prev_h, noise, 0.7, 0.71, "v", 1.5, COEFFS)
    want = sampler_step_reference(x_t, out_t, prev_h, noise, 0.7, 0.71, "v", 1.5, COEFFS)
    torch.testing.assert_close(got[0], want[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got[1], want[1], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    x = torch.empty(0, 3, 4, 4, device=device)
    x_next, x0 = OP(x, x, None, None, 0.5, 0.5, 0, 0.0, [1.0, 0.0, 0.0, 0.0, 0.0])
    assert x_next.shape == x0.shape == x.shape


# ---- errors ------------------------------------------------------------------------------------

def test_public_errors():
    x, out, prev, noise = _inputs((2, 3, 4, 4), "cpu")
    with pytest.raises(ValueError, match="model output shape"):
        ops.sampler_step(x, out[:1], prev, noise, 0.8, 0.6, "eps", 0.0, COEFFS)
    with pytest.raises(TypeError, match="must be float32"):
        ops.sampler_step(x.double(), out, prev, noise, 0.8, 0.6, "eps", 0.0, COEFFS)
    with pytest.raises(ValueError, match="coeffs must be"):
        ops.sampler_step(x, out, prev, noise, 0.8, 0.6, "eps", 0.0, COEFFS[:4])
    with pytest.raises(ValueError, match="unknown prediction"):
        ops.sampler_step(x, out, prev, noise, 0.8, 0.6, "score", 0.0, COEFFS)
    with pytest.raises(ValueError, match="noise shape"):
        ops.sampler_step(x, out, prev, noise[:1], 0.8, 0.6, "eps", 0.0, COEFFS)
    with pytest.raises(ValueError, match="prev is None"):
        ops.sampler_step(x, out, None, noise, 0.8, 0.6, "eps", 0.0, COEFFS)


@pytest.mark.parametrize("case,match", [
    ("out_shape", r"model output shape \[2, 3, 4, 4\] != state shape \[2, 3, 4, 5\]"),
    ("x_dtype", "state x must be float32, got Double"),
    ("out_dtype", "model output must be float32, bfloat16 or float16, got Int"),
    ("prev_dtype", "prev must be float32, got BFloat16"),
    ("noise_shape", r"noise shape \[1, 3, 4, 5\] != state shape"),
    ("coeffs_len", "coeffs must have 5 entries .* got 4"),
    ("pred", "pred must be 0 \\(eps\\), 1 \\(v\\) or 2 \\(x0\\), got 3"),
    ("alpha", "alpha must be > 0, got 0"),
    ("sigma", "sigma must be >= 0"),
    ("noncontiguous", "state x must be contiguous"),
    ("prev_none", "coefficient for prev is 0.18 but prev is None"),
])
def test_op_errors(case, match):
    x, out, prev, noise = _inputs((2, 3, 4, 5), "cpu")
    args = dict(x=x, out=out, prev=prev, noise=noise, alpha=0.8, sigma=0.6, pred=0, clip=0.0, coeffs=list(COEFFS))
    if case == "out_shape":
        args["out"] = out[..., :4]
    elif case == "x_dtype":
        args["x"] = x.double()
    elif case == "out_dtype":
        args["out"] = out.int()
    elif case == "prev_dtype":
        args["prev"] = prev.bfloat16()
    elif case == "noise_shape":
        args["noise"] = noise[:1]
    elif case == "coeffs_len":
        args["coeffs"] = list(COEFFS[:4])
    elif case == "pred":
        args["pred"] = 3
    elif case == "alpha":
        args["alpha"] = 0.0
    elif case == "sigma":
        args["sigma"] = -0.1
    elif case == "noncontiguous":
        args["x"] = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif case == "prev_none":
        args["prev"] = None
    with pytest.raises(RuntimeError, match=match):
        OP(**args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_op_device_mismatch():
    x, out, prev, noise = _inputs((2, 3, 4, 5), "cuda")
    with pytest.raises(RuntimeError, match="noise is on cpu but x is on cuda"):
        OP(x, out, prev, noise.cpu(), 0.8, 0.6, 0, 0.0, list(COEFFS))
    with pytest.raises(RuntimeError, match="model output is on cpu but x is on cuda"):
        OP(x, out.cpu(), prev, noise, 0.8, 0.6, 0, 0.0, list(COEFFS))


def test_no_backward():
    x, out, prev, noise = _inputs((2, 3, 4, 5), "cpu")
    out.requires_grad_(True)
    x_next, _ = OP(x, out, prev, noise, 0.8, 0.6, 0, 0.0, list(COEFFS))
    with pytest.raises(RuntimeError, match="not implemented"):
        x_next.sum().backward()


# ---- torch.library / torch.compile / CUDA graphs -----------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pred,out_dtype,with_prev,with_noise,clip", [
    (0, torch.float32, False, True, 0.0),
    (1, torch.bfloat16, True, False, 1.0),
    (2, torch.float16, True, True, 0.5),
])
def test_opcheck(device, pred, out_dtype, with_prev, with_noise, clip):
    x, out, prev, noise = _inputs((3, 1, 7, 5), device, out_dtype, with_prev, with_noise)
    args = (x, out, prev, noise, 0.8, 0.6, pred, clip, list(_coeffs(with_prev, with_noise)))
    torch.library.opcheck(OP, args)


def test_compile_fullgraph_dynamic():
    # The Meta kernel lets dynamo/AOT trace the op, with symbolic shapes too.
    def step(x, out, noise):
        x_next, x0 = OP(x, out, None, noise, 0.8, 0.6, 0, 1.0, [0.9, 0.3, 0.2, 0.0, 0.1])
        return x_next * 2, x0

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    for shape in [(2, 3, 4, 4), (5, 3, 4, 4)]:
        x, out, _, noise = _inputs(shape, "cpu", torch.bfloat16)
        for got, want in zip(compiled(x, out, noise), step(x, out, noise)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture():
    x, out, prev, noise = _inputs((4, 3, 16, 16), "cuda", torch.bfloat16)
    args = (0.8, 0.6, 1, 1.0, list(COEFFS))
    want = OP(x, out, prev, noise, *args)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        OP(x, out, prev, noise, *args)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = OP(x, out, prev, noise, *args)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    x.copy_(torch.randn_like(x))  # a replay reads the static inputs anew
    graph.replay()
    want = OP(x, out, prev, noise, *args)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_misaligned_takes_scalar_path():
    # Views at an odd element offset cannot use the 16-byte loads; results must not change.
    n = 4 * 3 * 16 * 16
    base = torch.randn(n + 1, device="cuda")
    x = base[1:].view(4, 3, 16, 16)
    out = torch.randn(n + 1, device="cuda").bfloat16()[1:].view(4, 3, 16, 16)
    (x_next, x0), (ref_next, ref_x0) = _run_both(x, out, None, None, 0.8, 0.6, "eps", 0.0, (0.9, 0.3, 0.2, 0, 0))
    torch.testing.assert_close(x0, ref_x0, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(x_next, ref_next, rtol=RTOL, atol=ATOL)
