"""Property-based bad-input tests: random shapes, dtypes, devices, steps and names thrown at the ops
and the samplers.  Every call must either return what the reference computes or raise a clean
ValueError/TypeError (ConfigError and InputError are ValueErrors); any other exception, a crash,
or a result that disagrees with the reference fails.

Each example is classified while it is drawn: `valid` inputs must succeed, `invalid` ones must be
refused, and inputs in between (an integer model output, say) may do either.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from diffae import ops  # noqa: E402
from diffae.config import DiffusionConfig  # noqa: E402
from diffae.diffusion import samplers  # noqa: E402
from diffae.diffusion.process import Process  # noqa: E402
from diffae.ops import _backend  # noqa: E402
from diffae.ops.sampler_step import PREDICTIONS, sampler_step_reference  # noqa: E402

# 50 fixed examples per entry point in CI; DIFFAE_FUZZ_EXAMPLES=1000 for a longer, random run
_N = int(os.environ.get("DIFFAE_FUZZ_EXAMPLES", "50"))
FUZZ = settings(max_examples=_N, deadline=None, derandomize=_N == 50, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])  # fixtures only pick the backend
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
OTHERS = (torch.int64, torch.int32, torch.bool, torch.complex64)
CLEAN = (ValueError, TypeError)
TRIED: dict[str, dict[str, int]] = {}  # entry point -> {"computed": n, "refused": n}
_current = [""]


def _count(name: str) -> None:
    _current[0] = name


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def reference_backend():
    saved = _backend.forced_backend()
    _backend.set_backend("reference")
    yield
    _backend.set_backend(saved)


@pytest.fixture
def auto_backend():
    # the extension (when built) is the code most likely to crash on odd input: fuzz it
    saved = _backend.forced_backend()
    _backend.set_backend(None)
    yield
    _backend.set_backend(saved)


def _tensor(draw, shape, dtype, device="cpu", special=True):
    """Random values, sometimes NaN/Inf, sometimes a non-contiguous view."""
    n = math.prod(shape)
    vals = draw(st.lists(st.floats(-4, 4, width=32), min_size=min(n, 8), max_size=min(n, 8)))
    base = torch.tensor(vals or [0.0], dtype=torch.float64)
    t = base.repeat(n // max(len(base), 1) + 1)[:n].reshape(shape) if n else torch.empty(shape, dtype=torch.float64)
    t = t + torch.linspace(-1, 1, n, dtype=torch.float64).reshape(shape) if n else t
    if special and n and draw(st.integers(0, 9)) == 0:
        t.view(-1)[draw(st.integers(0, n - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    if dtype.is_complex:
        t = t.to(dtype)
    elif not dtype.is_floating_point:
        t = t.clamp(-100, 100).nan_to_num(0.0, 0.0, 0.0).to(dtype)
    else:
        t = t.to(dtype)
    if len(shape) >= 2 and draw(st.booleans()):  # same shape, non-contiguous memory
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t.to(device)


def _shape(draw, rank=None, lo=0, hi=5):
    rank = draw(st.integers(1, 4)) if rank is None else rank
    return tuple(draw(st.integers(lo, hi)) for _ in range(rank))


def _other_shape(draw, shape):
    other = list(shape) or [1]
    i = draw(st.integers(0, len(other) - 1))
    other[i] += draw(st.sampled_from([1, 2]))
    return tuple(other) if draw(st.booleans()) else tuple(other) + (1,)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True)




def _run(fn, valid: bool | None, fault: str | None = None):
    """(result, None) or (None, exc) for a clean refusal; any other exception propagates."""
    tally = TRIED.setdefault(_current[0], {"computed": 0, "refused": 0})
    try:
        out = fn()
    except CLEAN as exc:
        assert valid is not True, f"valid input refused: {exc}"
        tally["refused"] += 1
        return None, exc
    assert valid is not False, "invalid input accepted"
    tally["computed"] += 1
    return out, None


# --- ops.sampler_step --------------------------------------------------------------------------------
# Each example is a valid call with at most one fault injected (about a third have none), so
# both sides of the contract get exercised.
STEP_FAULTS = ("x-dtype", "out-shape", "out-dtype", "out-device", "pred", "n-coeffs", "missing-prev",
               "missing-noise", "prev-shape", "noise-shape", "prev-device", "prev-dtype")
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the docstring promises


@st.composite
def sampler_step_inputs(draw):
    fault = draw(st.sampled_from((None,) * 5 + STEP_FAULTS))
    shape = _shape(draw, lo=0 if draw(st.integers(0, 5)) == 0 else 1)
    x_dtype = draw(st.sampled_from(FLOATS[1:] + OTHERS)) if fault == "x-dtype" else torch.float32
    x = _tensor(draw, shape, x_dtype)
    out_shape = _other_shape(draw, shape) if fault == "out-shape" else shape
    out_dtype = draw(st.sampled_from(OTHERS + (torch.float64,))) if fault == "out-dtype" else \
        draw(st.sampled_from(OUT_DTYPES))
    out = _tensor(draw, out_shape, out_dtype, "meta" if fault == "out-device" else "cpu")
    pred = draw(st.sampled_from(("score", "", "EPS", "x_0"))) if fault == "pred" else \
        draw(st.sampled_from(PREDICTIONS))
    alpha = draw(st.floats(0.02, 1.0))
    sigma = draw(st.sampled_from([0.0, draw(st.floats(0.0, 1.0))]))
    clip = draw(st.sampled_from([0.0, 1.0, 2.5]))
    n_coeffs = draw(st.sampled_from([4, 6, 0])) if fault == "n-coeffs" else 5
    coeffs = list(draw(st.lists(st.floats(-2, 2), min_size=n_coeffs, max_size=n_coeffs)))
    extras = []
    for k, name in ((3, "prev"), (4, "noise")):
        present = draw(st.booleans()) and fault != f"missing-{name}" or fault in (f"{name}-shape",
                                                                                   f"{name}-device", f"{name}-dtype")
        if present:
            t_shape = _other_shape(draw, shape) if fault == f"{name}-shape" else shape
            t_dtype = draw(st.sampled_from(OTHERS)) if fault == f"{name}-dtype" else \
                draw(st.sampled_from([torch.float32, torch.float16]))
            extras.append(_tensor(draw, t_shape, t_dtype, "meta" if fault == f"{name}-device" else "cpu"))
        else:
            extras.append(None)
            if n_coeffs == 5:
                coeffs[k] = draw(st.sampled_from([0.1, -1.5])) if fault == f"missing-{name}" else 0.0
    valid = fault is None
    return (x, out, extras[0], extras[1], alpha, sigma, pred, clip, tuple(coeffs)), valid, fault


@FUZZ
@given(sampler_step_inputs())
def test_fuzz_sampler_step(auto_backend, case):
    args, valid, fault = case
    _count("ops.sampler_step")
    result, _ = _run(lambda: ops.sampler_step(*args), valid, fault)
    if result is not None:
        x_next, x0 = result
        assert x_next.dtype == x0.dtype == torch.float32 and x_next.device == args[0].device
        want_next, want_x0 = sampler_step_reference(*args)
        assert _close(x_next, want_next, 1e-5) and _close(x0, want_x0, 1e-5)


# --- ops.adaln_modulate / gated_residual (reference backend) ----------------------------------------
def _adaln_fp64(x, shift, scale, eps=1e-6):
    h = torch.nn.functional.layer_norm(x.double(), (x.shape[-1],), eps=eps)
    per = (lambda m: m.double().unsqueeze(1) if m.dim() == 2 else m.double())
    return h * (1 + per(scale)) + per(shift)


# the reference computes in fp32 and rounds to x's dtype
TOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}
ADALN_FAULTS = ("rank", "x-dtype", "mod-shape", "mod-dtype", "mod-device", "empty")


def _close_scaled(result, want, dtype) -> bool:
    finite = want.abs().nan_to_num(0, 0, 0)
    return _close(result, want, TOL[dtype] * (1 + (finite.max().item() if want.numel() else 0)))


@st.composite
def adaln_inputs(draw, n_mods):
    """x (B, N, C) and n_mods per-sample (B, C) or per-token (B, N, C) modulations, with at most
    one fault: x of the wrong rank or dtype, a modulation of the wrong shape, dtype or device, or
    an empty dimension (computed or refused, both fine)."""
    fault = draw(st.sampled_from((None,) * 4 + ADALN_FAULTS))
    rank = draw(st.sampled_from([1, 2, 4])) if fault == "rank" else 3
    shape = list(_shape(draw, rank, lo=1, hi=6))
    if fault == "empty":
        shape[draw(st.integers(0, rank - 1))] = 0
    shape = tuple(shape)
    x_dtype = draw(st.sampled_from(OTHERS)) if fault == "x-dtype" else draw(st.sampled_from(FLOATS))
    x = _tensor(draw, shape, x_dtype)
    B, C = shape[0], shape[-1]
    N = shape[1] if rank >= 3 else 1
    bad = draw(st.integers(0, n_mods - 1))
    mods = []
    for i in range(n_mods):
        m_shape = (B, C) if draw(st.booleans()) else (B, N, C)
        if fault == "mod-shape" and i == bad:
            m_shape = draw(st.sampled_from([(B, C + 1), (B + 1, C), (C,), (B, N + 1, C)]))
        m_dtype = draw(st.sampled_from(OTHERS)) if fault == "mod-dtype" and i == bad else draw(st.sampled_from(FLOATS))
        device = "meta" if fault == "mod-device" and i == bad else "cpu"
        mods.append(_tensor(draw, m_shape, m_dtype, device))
    valid = None if fault == "empty" else fault is None
    return x, mods, valid


@FUZZ
@given(adaln_inputs(2))
def test_fuzz_adaln_modulate(reference_backend, case):
    x, (shift, scale), valid = case
    _count("ops.adaln_modulate")
    result, _ = _run(lambda: ops.adaln_modulate(x, shift, scale), valid)
    if result is not None:
        assert result.dtype == x.dtype and result.shape == x.shape
        assert _close_scaled(result, _adaln_fp64(x, shift, scale), x.dtype)


@FUZZ
@given(adaln_inputs(1), st.sampled_from(["same"] * 6 + ["wrong-shape", "int", "y-device"]), st.data())
def test_fuzz_gated_residual(reference_backend, case, y_kind, data):
    x, (gate,), valid = case
    y_shape = _other_shape(data.draw, tuple(x.shape)) if y_kind == "wrong-shape" else tuple(x.shape)
    y_dtype = torch.int32 if y_kind == "int" else x.dtype if x.is_floating_point() else torch.float32
    y = _tensor(data.draw, y_shape, y_dtype, "meta" if y_kind == "y-device" else "cpu")
    if y_kind in ("wrong-shape", "y-device", "int"):
        valid = False
    _count("ops.gated_residual")
    result, _ = _run(lambda: ops.gated_residual(x, gate, y), valid, y_kind)
    if result is not None:
        per = gate.double().unsqueeze(1) if gate.dim() == 2 else gate.double()
        assert result.dtype == x.dtype and result.shape == x.shape
        assert _close_scaled(result, x.double() + per * y.double(), x.dtype)


# --- diffusion.samplers.sample ---------------------------------------------------------------------
SAMPLE_FAULTS = ("sampler", "steps", "eta", "pred", "net-shape")


@st.composite
def sample_inputs(draw):
    fault = draw(st.sampled_from((None,) * 4 + SAMPLE_FAULTS))
    sampler = draw(st.sampled_from(("DDIM", "dpm++", "", "plms"))) if fault == "sampler" else \
        draw(st.sampled_from(samplers.SAMPLERS))
    steps = draw(st.sampled_from([0, -1, 2.5, "3"])) if fault == "steps" else draw(st.integers(1, 5))
    if fault == "eta":
        sampler = draw(st.sampled_from(("ddpm", "euler", "heun", "dpmpp2m")))
        eta = 0.5
    else:
        eta = 0.5 if sampler == "ddim" and draw(st.booleans()) else None
    pred = draw(st.sampled_from(["nope", "V", ""])) if fault == "pred" else draw(st.sampled_from(PREDICTIONS))
    process = draw(st.sampled_from(["vp-cosine", "vp-linear"] + (["ve"] if pred == "eps" else [])))
    shape = _shape(draw, draw(st.sampled_from([4, 4, 2, 3])), lo=1, hi=4)
    x_dtype = draw(st.sampled_from((torch.float32,) * 3 + (torch.float64, torch.bfloat16, torch.int64)))
    x = _tensor(draw, shape, x_dtype, special=False)
    net = "wrong-shape" if fault == "net-shape" else draw(st.sampled_from(["fp32", "fp32", "bf16"]))
    t_start = draw(st.sampled_from([1.0, 1.0, 0.6]))
    kw = dict(x=x, process=process, steps=steps, sampler=sampler, pred=pred, eta=eta, t_start=t_start)
    return kw, net, fault is None


def _denoiser(kind):
    def denoise(x, t):
        out = 0.3 * torch.tanh(x) + 0.1 * t
        if kind == "wrong-shape":
            return out[..., :-1] if out.shape[-1] > 1 else out.repeat_interleave(2, -1)
        return out.bfloat16() if kind == "bf16" else out
    return denoise


@FUZZ
@given(sample_inputs())
def test_fuzz_samplers_sample(auto_backend, case):
    kw, net, valid = case
    kw = dict(kw, process=Process(DiffusionConfig(process=kw["process"])))
    _count("samplers.sample")

    def run(seed=0):
        return samplers.sample(_denoiser(net), generator=torch.Generator().manual_seed(seed), **kw)

    result, _ = _run(run, valid)
    if result is not None:
        assert result.shape == kw["x"].shape and result.dtype == torch.float32
        assert torch.isfinite(result).all(), "finite input, finite network: finite samples"
        _backend.set_backend("reference")  # the same run on the reference ops
        try:
            want = run()
        finally:
            _backend.set_backend(None)
        assert _close(result, want, 1e-4 * (1 + want.abs().max().item()))


# --- gaps the fuzzing once found, pinned so they stay fixed ----------------------------------------
def test_gated_residual_refuses_y_on_another_device(reference_backend):
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="y"):
        ops.gated_residual(x, torch.randn(2, 4), torch.randn(2, 3, 4, device="meta"))


@pytest.mark.parametrize("backend", [None, "reference"])
def test_sampler_step_refuses_model_output_dtype_cleanly(backend):
    saved = _backend.forced_backend()
    _backend.set_backend(backend)
    try:
        x = torch.randn(2, 3)
        with pytest.raises(TypeError, match="model output"):
            ops.sampler_step(x, torch.ones(2, 3, dtype=torch.int64), None, None, 0.9, 0.3, "eps", 1.0,
                             (0.0, 0.9, 0.3, 0.0, 0.0))
    finally:
        _backend.set_backend(saved)


@pytest.mark.parametrize("which", ["out", "prev"])
def test_sampler_step_refuses_tensors_on_another_device(auto_backend, which):
    x = torch.randn(2, 3)
    other = torch.randn(2, 3, device="meta")
    out, prev = (other, None) if which == "out" else (x.clone(), other)
    with pytest.raises(ValueError, match="device|meta"):
        ops.sampler_step(x, out, prev, None, 0.9, 0.3, "eps", 1.0,
                         (0.0, 0.9, 0.3, 0.5 if prev is not None else 0.0, 0.0))


def test_fuzz_counts_reported():
    """Runs last in this module: how many inputs each entry point was given (all without a crash)."""
    print("bad/random inputs tried per entry point:", TRIED)
