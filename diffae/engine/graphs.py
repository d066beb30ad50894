"""Whole-loop CUDA-graph sampling.

Few-step generation is launch-bound: a 10-step loop of a DiT launches hundreds of kernels per
step.  Here the entire loop (the latent prior's own sampling when z is not given, every denoiser
call and every fused sampler update) is captured once per (batch bucket, steps, sampler, z given)
into one CUDA graph with static buffers, and replayed.  Randomness is drawn outside the graph into
those buffers from a seeded generator in the same order as the eager path, so a seed gives the
same images with and without graphs.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_for(n: int) -> int:
    """The smallest bucket holding n; batches past the largest are split by the caller."""
    for b in BUCKETS:
        if n <= b:
            return b
    return BUCKETS[-1]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor
    capture_s: float


class GraphCache:
    """Captured sampling graphs keyed by (bucket, steps, sampler, eta, inputs, prior steps)."""

    def __init__(self, run):
        # run(inputs: dict[str, Tensor], steps, sampler, eta, prior_steps) -> images; no host syncs
        self.run = run
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = None  # one memory pool shared by every graph of this cache

    def get(self, key: tuple, make_inputs) -> tuple[_Graph, bool]:
        """The graph for key, capturing it (with freshly allocated static inputs) the first time."""
        if key in self.graphs:
            return self.graphs[key], False
        _, steps, sampler, eta, _, prior_steps = key
        inputs = make_inputs()
        t0 = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: compiles, autotunes and allocates outside the capture
                self.run(inputs, steps, sampler, eta, prior_steps)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # no garbage collection inside the capture: freeing a dead pipeline's graphs or memory there
        # is a CUDA call that invalidates it (torch.cuda.graph collects once, before it starts)
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                output = self.run(inputs, steps, sampler, eta, prior_steps)
        finally:
            if collecting:
                gc.enable()
        torch.cuda.synchronize()
        entry = _Graph(graph, inputs, output, time.perf_counter() - t0)
        self.graphs[key] = entry
        return entry, True
