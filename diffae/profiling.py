"""NVTX ranges around model and training stages, off unless asked for (DIFFAE_NVTX=1 or enable()).

Off, `nvtx_range` is a no-op context manager, so hot paths pay nothing and torch.compile sees no
Python side effects.
"""
from __future__ import annotations

import contextlib
import os

_enabled = os.environ.get("DIFFAE_NVTX") == "1"


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def _range(name: str):
    import torch
    if torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        import nvtx  # the standalone package annotates CPU-only runs too
        with nvtx.annotate(name):
            yield


def nvtx_range(name: str):
    return _range(name) if _enabled else contextlib.nullcontext()
