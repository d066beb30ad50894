"""`diffae bench sample`: latency and throughput of generation, first-call compile-and-capture
time, and the share of the time spent in the denoiser."""
from __future__ import annotations

import time

import torch

from ..config import get_preset
from ..nn.autoencoder import DiffusionAutoencoder
from .pipeline import Pipeline


def _timer(device: torch.device):
    if device.type == "cuda":
        def measure(fn, reps: int) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return sorted(times)[len(times) // 2]
    else:
        def measure(fn, reps: int) -> float:
            fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return sorted(times)[len(times) // 2]
    return measure


def _denoiser_call(pipe: Pipeline, n: int, z: torch.Tensor, cuda_graph: bool):
    """One denoiser call at batch n, run the way the sampling loop runs it: replayed from its own
    CUDA graph when the loop is graphed (else its launches would be timed against a graph's)."""
    m = pipe.cfg.model
    x = torch.randn(n, m.channels, m.img_size, m.img_size, device=z.device)
    t = torch.full((n,), 0.5, device=z.device)
    with torch.no_grad():
        cond = pipe.condition(t, z)[0]  # computed once per loop for all steps, so not in a step's time

    def call():
        with torch.no_grad():
            return pipe.network(x, t, cond)
    if not cuda_graph:
        return call
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # its own pool: the sampling graphs' memory stays untouched
        call()
    return graph.replay


def bench_sample(ckpt, preset, img, channels, batches, steps, sampler, compile, cuda_graph, device) -> list[dict]:
    if ckpt:
        pipe = Pipeline.from_checkpoint(ckpt, device, compile=compile, cuda_graph=cuda_graph)
    else:  # an untrained model of the preset's shape: timing does not depend on the weights
        cfg = get_preset(preset).override([f"model.img_size={img}", f"model.channels={channels}"])
        torch.manual_seed(0)
        model = DiffusionAutoencoder(cfg).to(device)
        pipe = Pipeline(model, None, compile=compile, cuda_graph=cuda_graph)
    measure = _timer(device)
    zd = pipe.cfg.encoder.z_dim
    records = []
    for n in batches:
        z = torch.randn(n, zd, device=device)
        t0 = time.perf_counter()
        pipe.sample(n, steps=steps, sampler=sampler, seed=0, z=z)
        if device.type == "cuda":
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        reps = 50 if n <= 8 else 20
        ms = measure(lambda: pipe.sample(n, steps=steps, sampler=sampler, seed=0, z=z), reps)
        net_ms = measure(_denoiser_call(pipe, n, z, cuda_graph), reps)
        nfe = steps * 2 - 1 if sampler == "heun" else steps
        records.append({"what": "sample", "preset": pipe.cfg.preset, "batch": n, "steps": steps, "sampler": sampler,
                        "compile": compile, "cuda_graph": cuda_graph, "ms": round(ms, 3),
                        "img_per_s": round(n / ms * 1e3, 1), "first_call_s": round(first_s, 2),
                        "denoiser_fraction": round(min(1.0, nfe * net_ms / ms), 3)})
    return records
