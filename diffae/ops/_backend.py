"""Backend selection for the op layer.

Every hot op has up to three implementations: the C++/CUDA extension (diffae._C), a Triton
kernel (diffae.kernels) and the pure-PyTorch reference.  This module finds out once which of the
first two can be imported, keeps the reason when one cannot, and lets users force a choice for
debugging and benchmarking: for every op (DIFFAE_BACKEND=reference|triton|cuda, or
ops.set_backend(name)) or per op (DIFFAE_BACKEND=attention=reference,adaln_modulate=triton, or
ops.set_backend(name, op="attention")); a per-op choice wins over the global one.
"""
from __future__ import annotations

import importlib
import logging
import os

import torch

from ..errors import ConfigError

log = logging.getLogger("diffae.ops")

_availability: dict[str, tuple[bool, str]] = {}
_VALID = ("reference", "triton", "cuda")
OPS = ("attention", "adaln_modulate", "gated_residual", "gated_residual_adaln", "gelu_mlp", "sampler_step",
       "multi_tensor_lerp")
_logged: set[tuple[str, str]] = set()


def _check_name(name: str, where: str) -> None:
    if name not in _VALID:
        raise ConfigError(f"unknown backend {name!r}{where}; choose one of {', '.join(_VALID)}")


def _parse_forced(spec: str) -> tuple[str | None, dict[str, str]]:
    """DIFFAE_BACKEND: 'triton' (every op) or 'attention=reference,sampler_step=cuda' (per op)."""
    default, per_op = None, {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        op, sep, name = item.partition("=")
        if not sep:
            _check_name(op, " in DIFFAE_BACKEND")
            default = op
            continue
        if op not in OPS:
            raise ConfigError(f"unknown op {op!r} in DIFFAE_BACKEND; ops: {', '.join(OPS)}")
        _check_name(name, f" for {op} in DIFFAE_BACKEND")
        per_op[op] = name
    return default, per_op


try:
    _forced, _forced_ops = _parse_forced(os.environ.get("DIFFAE_BACKEND", ""))
    _env_error: str | None = None
except ConfigError as exc:  # raised at the first op instead: `import diffae` itself must not fail
    _forced, _forced_ops, _env_error = None, {}, str(exc)


def check_environment() -> None:
    """Raise the ConfigError of a bad DIFFAE_BACKEND (the CLI calls this first: one-line error)."""
    if _env_error is not None:
        raise ConfigError(_env_error)


def _probe(name: str, module: str) -> tuple[bool, str]:
    if name not in _availability:
        try:
            importlib.import_module(module)
            _availability[name] = (True, "ok")
        except ImportError as exc:  # a missing backend is expected; a broken one raises other errors
            _availability[name] = (False, f"{type(exc).__name__}: {exc}")
    return _availability[name]


def triton_status() -> tuple[bool, str]:
    ok, why = _probe("triton", "triton")
    if not ok:
        return ok, why
    return _probe("triton-kernels", "diffae.kernels")


def extension_status() -> tuple[bool, str]:
    if os.environ.get("DIFFAE_NO_EXT") == "1":
        return False, "DIFFAE_NO_EXT=1"
    return _probe("extension", "diffae._C")


def set_backend(name: str | None, op: str | None = None) -> None:
    """Force one backend for every op, or for `op` alone (None restores automatic choice)."""
    global _forced
    if name is not None:
        _check_name(name, "")
    if op is None:
        _forced = name
        return
    if op not in OPS:
        raise ConfigError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    if name is None:
        _forced_ops.pop(op, None)
    else:
        _forced_ops[op] = name


def forced_backend(op: str | None = None) -> str | None:
    return _forced if op is None else _forced_ops.get(op, _forced)


# The three probes below are evaluated eagerly even while torch.compile traces (assume_constant_result):
# dynamo cannot trace an import, and their answers cannot change within a process.
@torch.compiler.assume_constant_result
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@torch.compiler.assume_constant_result
def _triton_ok() -> bool:
    return triton_status()[0]


@torch.compiler.assume_constant_result
def _extension_ok() -> bool:
    return extension_status()[0]


def use_triton(op: str, *tensors: torch.Tensor) -> bool:
    """Whether `op` should run its Triton kernel on these tensors.

    Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 when the reference
    is not forced.  Automatic mode only picks it on CUDA: the interpreter is for tests.
    """
    check_environment()
    forced = forced_backend(op)
    if forced == "reference":
        return False
    ok = _triton_ok()
    on_cuda = all(t.is_cuda for t in tensors)
    wanted = forced == "triton" or (forced is None and on_cuda)
    if wanted and (on_cuda or _interpreting()) and ok:
        return True
    if wanted and not ok:
        _log_fallback(op, triton_status()[1])
    return False


def use_extension(op: str, *tensors: torch.Tensor) -> bool:
    """Whether `op` should run on the C++/CUDA extension (it has CPU and CUDA kernels)."""
    check_environment()
    if forced_backend(op) in ("reference", "triton"):
        return False
    ok = _extension_ok()
    if not ok:
        _log_fallback(op, extension_status()[1])
    return ok


def _log_fallback(op: str, why: str) -> None:
    if torch.compiler.is_compiling():
        return  # a log call would split the graph; `diffae info` says what is missing and why
    if (op, why) not in _logged:
        _logged.add((op, why))
        log.info("diffae.ops.%s: using the PyTorch reference (%s)", op, why)


def report() -> dict[str, str]:
    """What `diffae info` prints: each backend and why it is missing."""
    from .attention import attention_autotune  # it imports this module
    ok_t, why_t = triton_status()
    ok_c, why_c = extension_status()
    return {
        "forced": ", ".join([_forced or "auto"] + [f"{op}={b}" for op, b in sorted(_forced_ops.items())]),
        "triton": "available" if ok_t else f"missing ({why_t})",
        "extension (diffae._C)": "available" if ok_c else f"missing ({why_c})",
        "reference": "available",
        "attention block sizes": ("autotuned at each shape's first call" if attention_autotune()
                                  else "fixed configs") + " (training: train.attn_autotune)",
    }
