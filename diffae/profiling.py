"""NVTX ranges around model and training stages, off unless asked for (DIFFAE_NVTX=1 or enable()),
and a torch.profiler window over a few training steps (TraceWindow).

Off, `nvtx_range` is a no-op context manager, so hot paths pay nothing and torch.compile sees no
Python side effects.  Inside code that torch.compile traces the ranges are left out even when on:
the compiled kernels no longer follow the Python stages, and a range would break the graph.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

_enabled = os.environ.get("DIFFAE_NVTX") == "1"


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def _range(name: str):
    import torch
    # the same name for torch.profiler, so its traces (--profile) show the stages too
    with torch.profiler.record_function(name):
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
    if not _enabled:
        return contextlib.nullcontext()
    import torch
    return contextlib.nullcontext() if torch.compiler.is_compiling() else _range(name)


class TraceWindow:
    """torch.profiler over the steps start..stop-1 of a loop that calls step(done) with the number
    of steps done (step(0) before the first).  When the window closes it writes a Chrome trace
    (open in chrome://tracing or Perfetto) and prints the top ops by self time: device (CUDA)
    time when the device is a GPU, CPU time otherwise."""

    def __init__(self, start: int, stop: int, trace: str | Path | None, device, rows: int = 15, stream=None):
        if not 0 <= start < stop:
            raise ValueError(f"profile window {start}:{stop} is empty")
        self.start, self.stop, self.trace, self.rows = start, stop, trace, rows
        self.cuda = getattr(device, "type", str(device)).startswith("cuda")
        self.stream = stream or sys.stderr
        self.prof = None
        self.table = ""

    def step(self, done: int) -> None:
        if done == self.start and self.prof is None:
            from torch.profiler import ProfilerActivity, profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.prof = profile(activities=acts)
            self.prof.start()
        elif done == self.stop:
            self.close()

    def close(self) -> None:
        """Stop (if recording), write the trace and print the table; a no-op afterwards."""
        if self.prof is None:
            return
        import torch
        if self.cuda:
            torch.cuda.synchronize()  # the last steps' kernels belong in the window
        prof, self.prof = self.prof, None
        prof.stop()
        if self.trace is not None:
            prof.export_chrome_trace(str(self.trace))
        self.table = top_ops(prof, self.cuda, self.rows)
        where = f"; trace: {self.trace}" if self.trace is not None else ""
        self.stream.write(f"profile of steps {self.start}..{self.stop - 1}{where}\n{self.table}\n")
        self.stream.flush()


def top_ops(prof, cuda: bool, rows: int = 15) -> str:
    """The profiler's table of ops sorted by self device time (CUDA) or self CPU time."""
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)
