"""A dependency-free progress line: step, loss, rate and ETA, redrawn in place on a terminal."""
from __future__ import annotations

import sys
import time


def format_seconds(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    def __init__(self, total: int, start: int = 0, unit: str = "step", stream=None):
        self.total, self.start, self.unit = total, start, unit
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def rate(self, done: int) -> float:
        return (done - self.start) / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, done: int, **fields) -> None:
        rate = self.rate(done)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        extra = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        line = (f"{self.unit} {done}/{self.total} {extra} | {rate:.2f} {self.unit}/s | "
                f"ETA {format_seconds(eta) if eta != float('inf') else '?'}")
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
