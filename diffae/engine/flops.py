"""Model FLOPs of a training step, counted from the config, and model FLOPs utilisation (MFU).

What is counted: the multiply-accumulates (MACs) of every matrix product in one forward pass of
one image, then 2 FLOPs per MAC, and x3 for a training step (the backward pass computes the
gradients of the inputs and of the weights, each as many MACs as the forward: 6 x MACs).

Per image, with N tokens of width C, L blocks, MLP width H, M extra key/value tokens, F = 256
timestep features, patch p, image channels c, z of Z dims:

  denoiser   patch embed  N (c p^2) C          timestep MLP  F C + C^2
             z in          adaln Z C | scale Z 2CL | cross-attn Z M C
             each block    ada C 6C;  qkv N C 3C;  QK^T N (N+M) C;  PV N (N+M) C;  out-proj N C^2;
                           MLP 2 N C H;  cross-attn keys/values M C 2C
             final layer   ada C 2C;  out N C (c p^2)
  encoder    the same blocks without extra tokens (its own N, C, L), and without the ada projection
             when static (its modulations are parameters); patch embed; a timestep MLP for a
             time-dependent encoder; the latent head C Z (2 C Z for a Gaussian code)

Not counted (as in the usual MFU convention, and as torch.utils.flop_counter does not count
them either): normalisations, softmax, activations, modulations, residuals, the loss, the
optimizer and the EMA -- elementwise work, a few percent of the time at these widths.  The x3
also slightly overstates the backward pass: the first layers need no gradient of their input
(the images, the timestep features), a fraction of a percent of the total.
"""
from __future__ import annotations

import torch

from ..config import Config

TIMESTEP_FEATURES = 256  # diffae.nn.layers.TimestepEmbedding's sinusoidal features


def _block_macs(tokens: int, dim: int, hidden: int, extra: int = 0, projected_mods: bool = True) -> int:
    n, c = tokens, dim
    return (c * 6 * c * projected_mods  # AdaLN-Zero modulation, once per image
            + n * c * 3 * c          # qkv projection
            + 2 * n * (n + extra) * c  # QK^T and PV over all heads
            + n * c * c              # out-projection
            + 2 * n * c * hidden     # MLP
            + extra * c * 2 * c)     # keys/values of the extra (z) tokens


def forward_macs(cfg: Config) -> dict[str, int]:
    """Multiply-accumulates of one forward pass on one image: {"denoiser", "encoder"}."""
    m, e = cfg.model, cfg.encoder
    F = TIMESTEP_FEATURES

    n, c, L = m.tokens, m.dim, m.depth
    pixels = m.channels * m.patch ** 2
    extra = m.z_tokens if m.conditioning == "cross-attn" else 0
    z_in = {"adaln": e.z_dim * c, "scale": e.z_dim * 2 * c * L, "cross-attn": e.z_dim * extra * c}[m.conditioning]
    denoiser = (n * pixels * c + F * c + c * c + z_in
                + L * _block_macs(n, c, int(c * m.mlp_ratio), extra)
                + c * 2 * c + n * c * pixels)

    ne, ce = (m.img_size // e.patch) ** 2, e.dim
    head = ce * e.z_dim * (2 if e.latent == "gaussian" else 1)
    encoder = (ne * m.channels * e.patch ** 2 * ce
               + (F * ce + ce * ce if e.kind == "time" else 0)
               # the encoder's MLP ratio is AdaLNBlock's default, 4
               + e.depth * _block_macs(ne, ce, 4 * ce, projected_mods=e.kind == "time")
               + head)
    return {"denoiser": denoiser, "encoder": encoder}


def forward_flops_per_image(cfg: Config) -> int:
    return 2 * sum(forward_macs(cfg).values())


def train_flops_per_image(cfg: Config) -> int:
    """Model FLOPs of one training step per image: forward + backward = 3 x forward."""
    return 3 * forward_flops_per_image(cfg)


def measure_matmul_flops(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16,
                         iters: int = 10, trials: int = 5, warmup_s: float = 0.3) -> float | None:
    """The device's dense matmul rate (FLOP/s) right now, from an n^3 product timed with CUDA
    events: the denominator of MFU, measured rather than taken from a datasheet so that clocks,
    power limits and the torch build are those of this run.  None off CUDA (about 0.7 s on CUDA).

    An idle GPU starts at low clocks, and a dozen products (what this once timed) ranged from 686
    to 773 TFLOP/s on one H100 across runs: so it first runs products for warmup_s of device time,
    then takes the fastest of `trials` timings of `iters` products -- the rate the device sustains,
    which makes MFU the conservative figure."""
    if device.type != "cuda":
        return None
    with torch.cuda.device(device):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def timed(count: int) -> float:  # seconds per product
            start.record()
            for _ in range(count):
                a @ b
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / count

        per_product = timed(2)  # also the cuBLAS heuristics' first call
        timed(max(1, int(warmup_s / per_product)))  # clocks up
        seconds = min(timed(iters) for _ in range(trials))
        del a, b
    return 2 * n ** 3 / seconds


def mfu(flops_per_image: float, images_per_s: float, peak_flops: float | None, devices: int = 1) -> float | None:
    """Fraction of `devices` x peak_flops that the model's FLOPs at this rate use."""
    if not peak_flops or images_per_s <= 0:
        return None
    return flops_per_image * images_per_s / (devices * peak_flops)
