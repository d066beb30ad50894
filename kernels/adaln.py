"""Triton kernels for the AdaLN-Zero ops of a DiT block, forward and backward.

adaln_modulate        h = LayerNorm(x) * (1 + scale) + shift      (LayerNorm without affine)
gated_residual        r = x + gate * y
gated_residual_adaln  (r, h(r)): the residual update of one sublayer fused with the modulated
                      LayerNorm of the next, one read of x and y, one write of r and h

x, y are (B, N, C) with unit stride along C (any strides along B and N); shift, scale, gate are
per sample (B, C) or per token (B, N, C), in any float dtype (mixed with x's allowed).  Maths is
fp32 in registers; outputs take x's dtype, gradients their input's dtype.

Backward: the per-sample gradients d(shift), d(scale), d(gate) are sums over tokens.  Each program
owns a fixed slice of rows of one sample and writes its fp32 partial sums to a (B, S, C) buffer,
which is then summed over S in a fixed order: deterministic, no atomics.

What the backward reads of the LayerNorm: by default its input (fp32 in a DiT's residual stream),
whose statistics it recomputes.  With save_norm the forward also writes the normalised rows x_hat
in the GEMMs' 16-bit dtype and 1/std per row, and the backward reads those instead: one 16-bit
tensor kept per sublayer in place of an fp32 one (the residual stream itself then lives only
until the next sublayer), and no statistics to recompute.  x_hat is normalised, so 16 bits hold
it to a relative 2^-9 per element whatever the row's mean and scale -- the error of the 16-bit
GEMM gradients around it.

Layout of this module: kernels, launchers (*_forward / *_backward), torch.library registration
(namespace diffae_triton, so torch.compile(fullgraph=True) traces the kernels and CUDA graphs
capture them), then the public functions that diffae.ops dispatches to.  The pure-PyTorch
specification lives in diffae.ops.adaln (*_reference).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from torch.library import wrap_triton as _torch_wrap_triton
from torch.utils._python_dispatch import _get_current_dispatch_mode

# Read once, as triton.jit does when it decides between compiling and interpreting the kernels.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


# The interpreter converts fp32 -> bf16 by truncation; round to nearest even by hand there so
# CPU tests see the rounding the GPU does (cvt.rn).  A constexpr: compiled kernels never see it.
_EMULATE_RTNE = tl.constexpr(_INTERPRET)


@triton.jit
def _cast(v, dtype: tl.constexpr):
    # fp32 v to the storage dtype of an output.
    if _EMULATE_RTNE and dtype == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        v = u.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _load_mod(ptr, b, rows, cols, sb, sn, mask, cmask, PER_TOKEN: tl.constexpr):
    # A modulation tile as fp32: (ROWS, BLOCK_C) per token, (1, BLOCK_C) per sample.
    if PER_TOKEN:
        m = tl.load(ptr + b * sb + rows[:, None] * sn + cols[None, :], mask=mask, other=0.0)
    else:
        m = tl.load(ptr + b * sb + cols, mask=cmask, other=0.0)[None, :]
    return m.to(tl.float32)


@triton.jit
def _mod_row(ptr, cols, cmask, SKIP: tl.constexpr):
    # A per-sample modulation row as fp32 (1, BLOCK), loaded once per program; zeros (unused)
    # with SKIP: per-token modulation, or rows that _mod loads for every tile.
    if SKIP:
        return tl.zeros([1, cols.shape[0]], dtype=tl.float32)
    return tl.load(ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _mod(ptr, rows, cols, sn, mask, cmask, held, PER_TOKEN: tl.constexpr, RELOAD: tl.constexpr):
    # One tile's modulation as fp32: per token a (ROWS, BLOCK) tile; per sample the row held in
    # registers since the loop began, or with RELOAD the row loaded again for this tile.  Held
    # rows pin registers for the whole loop (fewer resident programs); reloaded ones cost a
    # cache hit each and, under the pipeliner, shared memory per stage.  TUNE chooses.
    m = held
    if PER_TOKEN:
        m = _tile(ptr, rows, cols, sn, mask).to(tl.float32)
    elif RELOAD:
        m = tl.load(ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return m


@triton.jit
def _tile(ptr, rows, cols, sn, mask):
    return tl.load(ptr + rows[:, None] * sn + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _row_stats(xa, xb, mask_a, mask_b, C, eps, TWO: tl.constexpr):
    # LayerNorm statistics of rows held as one or (TWO) two column chunks: the centred chunks
    # (xb, mask_b and the second result are placeholders without TWO) and 1/std per row.
    total = tl.sum(xa, axis=1)
    if TWO:
        total += tl.sum(xb, axis=1)
    mean = total / C
    xca = tl.where(mask_a, xa - mean[:, None], 0.0)
    var = tl.sum(xca * xca, axis=1)
    xcb = xca
    if TWO:
        xcb = tl.where(mask_b, xb - mean[:, None], 0.0)
        var += tl.sum(xcb * xcb, axis=1)
    rstd = tl.rsqrt((var / C + eps).to(tl.float32))  # eps: fp64 under inductor
    return xca, xcb, rstd


@triton.jit
def _fwd_chunk_in(X, Y, GATE, R, rows, cols, mask, cmask, off, sxn, syn, sgn, gt,
                  RESIDUAL: tl.constexpr, GATE_TOK: tl.constexpr, RELOAD: tl.constexpr):
    # One column chunk of the LayerNorm input as fp32: x, or r = x + gate * y, which is written out.
    # gt: the held per-sample gate row (see _mod).
    xf = _tile(X, rows, cols, sxn, mask).to(tl.float32)
    if RESIDUAL:
        y = _tile(Y, rows, cols, syn, mask).to(tl.float32)
        gt = _mod(GATE, rows, cols, sgn, mask, cmask, gt, GATE_TOK, RELOAD)
        # Round r to its storage dtype before normalising it, as the unfused ops would.
        r = _cast(xf + gt * y, R.dtype.element_ty)
        tl.store(R + off, r, mask=mask)
        xf = r.to(tl.float32)
    return xf


@triton.jit
def _fwd_chunk_out(H, XHAT, SHIFT, SCALE, rows, cols, mask, cmask, off, xc, rstd, ssn, scn, sh, sc,
                   SHIFT_TOK: tl.constexpr, SCALE_TOK: tl.constexpr, SAVE_NORM: tl.constexpr,
                   RELOAD: tl.constexpr):
    # sh, sc: the held per-sample rows (see _mod).
    sh = _mod(SHIFT, rows, cols, ssn, mask, cmask, sh, SHIFT_TOK, RELOAD)
    sc = _mod(SCALE, rows, cols, scn, mask, cmask, sc, SCALE_TOK, RELOAD)
    xhat = xc * rstd[:, None]
    tl.store(H + off, _cast(xhat * (1.0 + sc) + sh, H.dtype.element_ty), mask=mask)
    if SAVE_NORM:
        tl.store(XHAT + off, _cast(xhat, XHAT.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_fwd_kernel(
    X, Y, GATE, SHIFT, SCALE, R, H, XHAT, RSTD,
    N, C, eps, rows_per_prog,
    sxb, sxn, syb, syn, sgb, sgn, ssb, ssn, scb, scn,
    RESIDUAL: tl.constexpr, GATE_TOK: tl.constexpr, SHIFT_TOK: tl.constexpr,
    SCALE_TOK: tl.constexpr, SAVE_NORM: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, STAGES: tl.constexpr, RELOAD_MOD: tl.constexpr,
):
    # grid (S, B): program s of sample b normalises rows [s * rows_per_prog, +rows_per_prog) in
    # tiles of ROWS full rows, loading the per-sample modulation once.  A row is one power-of-two
    # chunk of BLOCK_A columns, or with BLOCK_B > 0 two (see _ln_blocks).
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    # Move every base pointer to sample b once: per-element offsets then stay 32-bit.
    X += b * sxb
    SHIFT += b * ssb
    SCALE += b * scb
    H += b * N * C  # outputs are contiguous (B, N, C)
    XHAT += b * N * C
    RSTD += b * N
    if RESIDUAL:
        Y += b * syb
        GATE += b * sgb
        R += b * N * C
    cols_a = tl.arange(0, BLOCK_A)
    cmask_a = cols_a < C
    sh_a = _mod_row(SHIFT, cols_a, cmask_a, SHIFT_TOK or RELOAD_MOD)
    sc_a = _mod_row(SCALE, cols_a, cmask_a, SCALE_TOK or RELOAD_MOD)
    gt_a = _mod_row(GATE, cols_a, cmask_a, GATE_TOK or RELOAD_MOD or not RESIDUAL)
    if BLOCK_B > 0:
        cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
        cmask_b = cols_b < C
        sh_b = _mod_row(SHIFT, cols_b, cmask_b, SHIFT_TOK or RELOAD_MOD)
        sc_b = _mod_row(SCALE, cols_b, cmask_b, SCALE_TOK or RELOAD_MOD)
        gt_b = _mod_row(GATE, cols_b, cmask_b, GATE_TOK or RELOAD_MOD or not RESIDUAL)
    start = pid_s * rows_per_prog
    end = tl.minimum(start + rows_per_prog, N)
    for r0 in tl.range(start, end, ROWS, num_stages=STAGES):
        rows = r0 + tl.arange(0, ROWS)
        rmask = rows < end
        mask_a = rmask[:, None] & cmask_a[None, :]
        off_a = rows[:, None] * C + cols_a[None, :]
        xa = _fwd_chunk_in(X, Y, GATE, R, rows, cols_a, mask_a, cmask_a, off_a, sxn, syn, sgn, gt_a,
                           RESIDUAL, GATE_TOK, RELOAD_MOD)
        xb, mask_b = xa, mask_a  # placeholders for a one-chunk row
        if BLOCK_B > 0:
            mask_b = rmask[:, None] & cmask_b[None, :]
            off_b = rows[:, None] * C + cols_b[None, :]
            xb = _fwd_chunk_in(X, Y, GATE, R, rows, cols_b, mask_b, cmask_b, off_b, sxn, syn, sgn, gt_b,
                               RESIDUAL, GATE_TOK, RELOAD_MOD)
        xca, xcb, rstd = _row_stats(xa, xb, mask_a, mask_b, C, eps, BLOCK_B > 0)
        _fwd_chunk_out(H, XHAT, SHIFT, SCALE, rows, cols_a, mask_a, cmask_a, off_a, xca, rstd, ssn, scn,
                       sh_a, sc_a, SHIFT_TOK, SCALE_TOK, SAVE_NORM, RELOAD_MOD)
        if BLOCK_B > 0:
            _fwd_chunk_out(H, XHAT, SHIFT, SCALE, rows, cols_b, mask_b, cmask_b, off_b, xcb, rstd, ssn, scn,
                           sh_b, sc_b, SHIFT_TOK, SCALE_TOK, SAVE_NORM, RELOAD_MOD)
        if SAVE_NORM:
            tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _bwd_chunk_in(X, DH, SCALE, rows, cols, mask, cmask, sxn, shn, scn, sc,
                  SCALE_TOK: tl.constexpr, RELOAD: tl.constexpr):
    # The loads of one column chunk that the row reductions need, as fp32: (x, dh, 1 + scale).
    # sc: the held per-sample scale row (see _mod).
    x = _tile(X, rows, cols, sxn, mask).to(tl.float32)
    dh = _tile(DH, rows, cols, shn, mask).to(tl.float32)
    sc = _mod(SCALE, rows, cols, scn, mask, cmask, sc, SCALE_TOK, RELOAD)
    return x, dh, 1.0 + sc


@triton.jit
def _bwd_chunk_res_in(Y, DR, GATE, rows, cols, mask, cmask, syn, srn, sgn, dh, gt,
                      RESIDUAL: tl.constexpr, HAS_DR: tl.constexpr, GATE_TOK: tl.constexpr,
                      RELOAD: tl.constexpr):
    # The residual's loads of one chunk, issued after the row reductions so that they are not
    # held in registers across them (under the pipeliner they come from shared memory anyway;
    # ptxas: the fused kernel at 1152 columns and one warp spilled 376 bytes, now 168):
    # (y, dr, gate) as fp32, dh as placeholders where absent.  gt: the held per-sample row.
    y = dh
    dr = dh
    if RESIDUAL:
        y = _tile(Y, rows, cols, syn, mask).to(tl.float32)
        if HAS_DR:
            dr = _tile(DR, rows, cols, srn, mask).to(tl.float32)
        gt = _mod(GATE, rows, cols, sgn, mask, cmask, gt, GATE_TOK, RELOAD)
    return y, dr, gt


@triton.jit
def _bwd_chunk_out(DX, DY, DGATE, DSCALE, off, mask, xhat, dh, wdh, y, dr, gt, c1, c2, rstd,
                   acc_shift, acc_scale, acc_gate,
                   RESIDUAL: tl.constexpr, HAS_DR: tl.constexpr, GATE_TOK: tl.constexpr,
                   SHIFT_TOK: tl.constexpr, SCALE_TOK: tl.constexpr):
    # One column chunk's outputs, and its per-sample sums accumulated in fp32.
    dln = (wdh - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    if SCALE_TOK:
        tl.store(DSCALE + off, _cast(dh * xhat, DSCALE.dtype.element_ty), mask=mask)
    else:
        acc_scale += dh * xhat
    if not SHIFT_TOK:
        acc_shift += dh
    if RESIDUAL:
        g = dln
        if HAS_DR:
            g += dr
        tl.store(DX + off, _cast(g, DX.dtype.element_ty), mask=mask)
        tl.store(DY + off, _cast(g * gt, DY.dtype.element_ty), mask=mask)
        if GATE_TOK:
            tl.store(DGATE + off, _cast(g * y, DGATE.dtype.element_ty), mask=mask)
        else:
            acc_gate += g * y
    else:
        tl.store(DX + off, _cast(dln, DX.dtype.element_ty), mask=mask)
    return acc_shift, acc_scale, acc_gate


@triton.jit
def _store_partials(PSHIFT, PSCALE, PGATE, part, cmask, acc_shift, acc_scale, acc_gate,
                    RESIDUAL: tl.constexpr, GATE_TOK: tl.constexpr, SHIFT_TOK: tl.constexpr,
                    SCALE_TOK: tl.constexpr):
    # fp32 partial buffers, or with one program per sample (S = 1) the gradients themselves
    if not SHIFT_TOK:
        tl.store(PSHIFT + part, _cast(tl.sum(acc_shift, axis=0), PSHIFT.dtype.element_ty), mask=cmask)
    if not SCALE_TOK:
        tl.store(PSCALE + part, _cast(tl.sum(acc_scale, axis=0), PSCALE.dtype.element_ty), mask=cmask)
    if RESIDUAL and not GATE_TOK:
        tl.store(PGATE + part, _cast(tl.sum(acc_gate, axis=0), PGATE.dtype.element_ty), mask=cmask)


@triton.jit
def _adaln_bwd_kernel(
    X, RSTD, Y, GATE, SCALE, DR, DH,
    DX, DY, DGATE, DSCALE, PSHIFT, PSCALE, PGATE,
    N, C, eps, rows_per_prog, S,
    sxb, sxn, syb, syn, sgb, sgn, scb, scn, srb, srn, shb, shn,
    RESIDUAL: tl.constexpr, HAS_DR: tl.constexpr, GATE_TOK: tl.constexpr,
    SHIFT_TOK: tl.constexpr, SCALE_TOK: tl.constexpr, FROM_NORM: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, STAGES: tl.constexpr,
    RELOAD_MOD: tl.constexpr,
):
    # grid (S, B): program (s, b) walks rows [s * rows_per_prog, (s + 1) * rows_per_prog) of
    # sample b in tiles of ROWS, each row in one or two column chunks as the forward.  X is the
    # LayerNorm input (x, or the saved residual r), or with FROM_NORM the saved x_hat, with RSTD
    # its rows' 1/std.  Without RESIDUAL: dx = dLN.  With it: g = dr + dLN, dx = g,
    # dy = g * gate, dgate = g * y.  STAGES > 1 has Triton's pipeliner keep that many tiles'
    # loads in flight (through shared memory, not registers).
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    # Move every base pointer to sample b once: per-element offsets then stay 32-bit.
    X += b * sxb
    RSTD += b * N
    DH += b * shb
    SCALE += b * scb
    DX += b * N * C
    DSCALE += b * N * C
    if RESIDUAL:
        Y += b * syb
        GATE += b * sgb
        DR += b * srb
        DY += b * N * C
        DGATE += b * N * C
    cols_a = tl.arange(0, BLOCK_A)
    cmask_a = cols_a < C
    sc_a = _mod_row(SCALE, cols_a, cmask_a, SCALE_TOK or RELOAD_MOD)
    gt_a = _mod_row(GATE, cols_a, cmask_a, GATE_TOK or RELOAD_MOD or not RESIDUAL)
    acc_shift_a = tl.zeros([ROWS, BLOCK_A], dtype=tl.float32)
    acc_scale_a = tl.zeros([ROWS, BLOCK_A], dtype=tl.float32)
    acc_gate_a = tl.zeros([ROWS, BLOCK_A], dtype=tl.float32)
    if BLOCK_B > 0:
        cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
        cmask_b = cols_b < C
        sc_b = _mod_row(SCALE, cols_b, cmask_b, SCALE_TOK or RELOAD_MOD)
        gt_b = _mod_row(GATE, cols_b, cmask_b, GATE_TOK or RELOAD_MOD or not RESIDUAL)
        acc_shift_b = tl.zeros([ROWS, BLOCK_B], dtype=tl.float32)
        acc_scale_b = tl.zeros([ROWS, BLOCK_B], dtype=tl.float32)
        acc_gate_b = tl.zeros([ROWS, BLOCK_B], dtype=tl.float32)
    start = pid_s * rows_per_prog
    end = tl.minimum(start + rows_per_prog, N)
    for r0 in tl.range(start, end, ROWS, num_stages=STAGES):
        rows = r0 + tl.arange(0, ROWS)
        rmask = rows < N
        mask_a = rmask[:, None] & cmask_a[None, :]
        off_a = rows[:, None] * C + cols_a[None, :]
        xa, dha, s1a = _bwd_chunk_in(X, DH, SCALE, rows, cols_a, mask_a, cmask_a, sxn, shn, scn, sc_a,
                                     SCALE_TOK, RELOAD_MOD)
        xb, mask_b = xa, mask_a  # placeholders for a one-chunk row
        if BLOCK_B > 0:
            mask_b = rmask[:, None] & cmask_b[None, :]
            off_b = rows[:, None] * C + cols_b[None, :]
            xb, dhb, s1b = _bwd_chunk_in(X, DH, SCALE, rows, cols_b, mask_b, cmask_b, sxn, shn, scn, sc_b,
                                         SCALE_TOK, RELOAD_MOD)
        if FROM_NORM:
            xha = xa
            if BLOCK_B > 0:
                xhb = xb
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        else:
            xca, xcb, rstd = _row_stats(xa, xb, mask_a, mask_b, C, eps, BLOCK_B > 0)
            xha = xca * rstd[:, None]
            if BLOCK_B > 0:
                xhb = xcb * rstd[:, None]
        wa = dha * s1a
        c1 = tl.sum(xha * wa, axis=1)
        c2 = tl.sum(wa, axis=1)
        if BLOCK_B > 0:
            wb = dhb * s1b
            c1 += tl.sum(xhb * wb, axis=1)
            c2 += tl.sum(wb, axis=1)
        c1 = c1 / C
        c2 = c2 / C
        ya, dra, gta = _bwd_chunk_res_in(Y, DR, GATE, rows, cols_a, mask_a, cmask_a, syn, srn, sgn, dha,
                                         gt_a, RESIDUAL, HAS_DR, GATE_TOK, RELOAD_MOD)
        acc_shift_a, acc_scale_a, acc_gate_a = _bwd_chunk_out(
            DX, DY, DGATE, DSCALE, off_a, mask_a, xha, dha, wa, ya, dra, gta, c1, c2, rstd,
            acc_shift_a, acc_scale_a, acc_gate_a, RESIDUAL, HAS_DR, GATE_TOK, SHIFT_TOK, SCALE_TOK)
        if BLOCK_B > 0:
            yb, drb, gtb = _bwd_chunk_res_in(Y, DR, GATE, rows, cols_b, mask_b, cmask_b, syn, srn, sgn, dhb,
                                             gt_b, RESIDUAL, HAS_DR, GATE_TOK, RELOAD_MOD)
            acc_shift_b, acc_scale_b, acc_gate_b = _bwd_chunk_out(
                DX, DY, DGATE, DSCALE, off_b, mask_b, xhb, dhb, wb, yb, drb, gtb, c1, c2, rstd,
                acc_shift_b, acc_scale_b, acc_gate_b, RESIDUAL, HAS_DR, GATE_TOK, SHIFT_TOK, SCALE_TOK)
    part = (b * S + pid_s) * C  # (B, S, C) fp32 partial sums
    _store_partials(PSHIFT, PSCALE, PGATE, part + cols_a, cmask_a, acc_shift_a, acc_scale_a, acc_gate_a,
                    RESIDUAL, GATE_TOK, SHIFT_TOK, SCALE_TOK)
    if BLOCK_B > 0:
        _store_partials(PSHIFT, PSCALE, PGATE, part + cols_b, cmask_b, acc_shift_b, acc_scale_b, acc_gate_b,
                        RESIDUAL, GATE_TOK, SHIFT_TOK, SCALE_TOK)


@triton.jit
def _gres_fwd_kernel(
    X, Y, GATE, R, N, C,
    sxb, sxn, syb, syn, sgb, sgn,
    GATE_TOK: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid (cdiv(N, ROWS), cdiv(C, BLOCK_C), B): elementwise, so columns are tiled too and
    # non-power-of-two C wastes at most part of one column tile.  (An evict-first hint on the
    # loads of x and y, read once, measured 7 % slower on an H200; a pipelined loop over row tiles
    # per program, 8-32 programs/SM, 2-3 stages, 1-10 % slower on an H100 at both target shapes.)
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows < N)[:, None] & cmask[None, :]
    x = tl.load(X + b * sxb + rows[:, None] * sxn + cols[None, :], mask=mask, other=0.0)
    y = tl.load(Y + b * syb + rows[:, None] * syn + cols[None, :], mask=mask, other=0.0)
    g = _load_mod(GATE, b, rows, cols, sgb, sgn, mask, cmask, GATE_TOK)
    r = x.to(tl.float32) + g * y.to(tl.float32)
    tl.store(R + b * N * C + rows[:, None] * C + cols[None, :], _cast(r, R.dtype.element_ty), mask=mask)


@triton.jit
def _gres_bwd_kernel(
    Y, GATE, DR, DY, DGATE, PGATE,
    N, C, rows_per_prog, S,
    syb, syn, sgb, sgn, srb, srn,
    GATE_TOK: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr,
):
    # grid (S, cdiv(C, BLOCK_C), B); dx = dr needs no kernel.  dy = dr * gate, dgate = dr * y.
    # (Prefetching the next tile into registers measured neutral here: the loop body has no
    # reduction for the loads to hide behind.)
    pid_s = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    Y += b * syb  # per-sample base pointers: 32-bit offsets below
    GATE += b * sgb
    DR += b * srb
    DY += b * N * C
    DGATE += b * N * C
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    if not GATE_TOK:
        gt = tl.load(GATE + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    start = pid_s * rows_per_prog
    end = tl.minimum(start + rows_per_prog, N)
    for r0 in tl.range(start, end, ROWS, num_stages=STAGES):
        rows = r0 + tl.arange(0, ROWS)
        mask = (rows < N)[:, None] & cmask[None, :]
        out_off = rows[:, None] * C + cols[None, :]
        dr = _tile(DR, rows, cols, srn, mask).to(tl.float32)
        y = _tile(Y, rows, cols, syn, mask).to(tl.float32)
        if GATE_TOK:
            gt = _tile(GATE, rows, cols, sgn, mask).to(tl.float32)
        tl.store(DY + out_off, _cast(dr * gt, DY.dtype.element_ty), mask=mask)
        if GATE_TOK:
            tl.store(DGATE + out_off, _cast(dr * y, DGATE.dtype.element_ty), mask=mask)
        else:
            acc += dr * y
    if not GATE_TOK:  # fp32 partials, or with S = 1 dgate itself
        tl.store(PGATE + (b * S + pid_s) * C + cols, _cast(tl.sum(acc, axis=0), PGATE.dtype.element_ty), mask=cmask)


@triton.jit
def _sum_partials_kernel(
    P0, P1, P2, O0, O1, O2, S, C,
    NUM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid (cdiv(C, BLOCK_C), B): O_i[b, :] = sum over s = 0..S-1 of P_i[b, s, :], for up to three
    # (B, S, C) fp32 partial buffers in one launch.  BLOCK_S partials per load, summed as a tree,
    # then in order: a fixed order for a given S (deterministic), and S / BLOCK_S dependent
    # round trips to memory rather than S (batch 1: S = 256 one-row programs, and a one-partial-
    # per-step loop made the backward 157 us on an H200).
    b = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    a0 = tl.zeros([BLOCK_C], dtype=tl.float32)
    a1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        srow = s0 + tl.arange(0, BLOCK_S)
        off = (b * S + srow[:, None]) * C + cols[None, :]
        mask = (srow[:, None] < S) & cmask[None, :]
        a0 += tl.sum(tl.load(P0 + off, mask=mask, other=0.0), axis=0)
        if NUM > 1:
            a1 += tl.sum(tl.load(P1 + off, mask=mask, other=0.0), axis=0)
        if NUM > 2:
            a2 += tl.sum(tl.load(P2 + off, mask=mask, other=0.0), axis=0)
    tl.store(O0 + b * C + cols, _cast(a0, O0.dtype.element_ty), mask=cmask)
    if NUM > 1:
        tl.store(O1 + b * C + cols, _cast(a1, O1.dtype.element_ty), mask=cmask)
    if NUM > 2:
        tl.store(O2 + b * C + cols, _cast(a2, O2.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

# Launch configuration.  The LayerNorm programs loop over the rows of one sample (forward: with
# programs_per_sm 0, one tile each), the loop pipelined by Triton (stages: tiles in flight, through
# shared memory).  The backward keeps fp32 accumulators, so registers decide how many programs fit
# on an SM.  programs_per_sm sets how many programs share the rows of one sample.  ln_*_split: a
# row whose width is not a power of two is two power-of-two column chunks (768 = 512 + 256,
# 1152 = 1024 + 128) rather than one padded block (1024, 2048: a quarter and nearly half of the
# lanes idle but still computing).
# Measured on an H200 (bench_adaln.py --sweep, 2026-12-03/04):
# - backward: pipelining matched or beat register prefetching at every shape, and replaced it;
#   the split wins at 1-2 warps per row (a row reduces within its warps; at 4 warps it was 0.8x).
# - backward grid: the kernels hold 168-255 registers per thread (ptxas), 8-12 one-warp programs
#   per SM.  A grid just over one wave of resident programs leaves a near-empty second wave:
#   adaln at 1152 ran 2.5 TB/s with 1088 programs for 1056 slots, 3.3 with 832.  Best near 0.7-0.8
#   of a wave for the one-warp plain kernel; the fused kernel (more registers: 2 warps) prefers
#   a few waves.  Hence separate settings for the fused kernel.
# - forward: looping over tiles with the modulation loaded once per program, 16 programs per SM,
#   3 stages: 3.6-3.9 TB/s against 2.6-3.6 for a tile per program.
# 2026-12-04 (per-sample modulation held in registers across the loop or reloaded per tile):
# - adaln_modulate's forward at 2 chunks, 8192-element tiles over 4 warps, modulation reloaded:
#   3.80 / 3.78 TB/s at 768 / 1152 columns, against 3.69 / 3.60 at the fused forward's settings,
#   which stay best for the fused one (3.85 / 3.89): hence separate forward settings.
# - the fused backward, its residual loads moved after the reductions: one warp, 6 programs/SM,
#   modulation reloaded, 3.63 / 3.65 TB/s against 3.57 / 3.29 (2 warps, 10/SM, held); the plain
#   backward holds it (3.65 / 3.58 against 3.65 / 3.44).
# - gated_residual's backward at 4 programs/SM, 3 stages: 3.69 / 3.85 TB/s against 3.17 / 3.63
#   at 8 and 1; at (256, 256, 768) that is one program per (sample, column tile), S = 1, whose
#   sums are dgate itself (no sum pass).
# 2026-12-04, forward tiles of 1024-8192 elements, 16-64 programs/SM, 2-4 stages (the split and
# modulation handling above): smaller tiles hold fewer registers (4 warps over 2048 elements
# against 2 over 4096), and more, smaller programs per SM won:
# - at (256, 256, 768) / (64, 1024, 1152): adaln_modulate 4.02 / 3.84 TB/s (4096-element tiles,
#   2 warps, 64/SM) against 3.81 / 3.78 at the previous settings; the fused forward 4.08 / 3.84
#   (2048, 4 warps, 64/SM) against 3.85 / 3.92.
# - at the sampling batch (64, 256, 768) those settings leave one tile per program (3.27 / 3.31
#   TB/s); one-row tiles on one warp, 32/SM, 2 stages gave adaln_modulate 3.98, and 2048-element
#   tiles, 32/SM the fused one 3.77: hence the *_small settings below 256 rows per SM.
# Benchmarks may override entries of TUNE.
TUNE: dict[str, int] = {
    "ln_fwd_split": 1,              # two power-of-two column chunks for a non-power-of-two C
    "ln_fwd_reload_mod": 1,         # per-sample modulation loaded per tile (1) or held (0; see _mod)
    "ln_fwd_fused_split": 0,        # the same two for gated_residual_adaln's forward
    "ln_fwd_fused_reload_mod": 0,
    # Launch settings per forward kernel and problem size: a problem of fewer than
    # ln_fwd_small_rows_per_sm rows (B * N) per SM takes the *_small ones.
    "ln_fwd_small_rows_per_sm": 256,
    "ln_fwd_tile": 4096,            # elements per forward tile (ROWS * columns)
    "ln_fwd_warps": 2,
    "ln_fwd_programs_per_sm": 64,   # 0: one tile per program
    "ln_fwd_stages": 3,
    "ln_fwd_small_tile": 1024,
    "ln_fwd_small_warps": 1,
    "ln_fwd_small_programs_per_sm": 32,
    "ln_fwd_small_stages": 2,
    "ln_fwd_fused_tile": 2048,
    "ln_fwd_fused_warps": 4,
    "ln_fwd_fused_programs_per_sm": 64,
    "ln_fwd_fused_stages": 3,
    "ln_fwd_fused_small_tile": 2048,
    "ln_fwd_fused_small_warps": 4,
    "ln_fwd_fused_small_programs_per_sm": 32,
    "ln_fwd_fused_small_stages": 3,
    "ln_fwd_min_programs_per_sm": 2,  # tiles shrink (to one row) until the grid has this many
    "ln_bwd_split": 1,
    "ln_bwd_elems_per_thread": 16,  # per loaded tensor, per loop iteration
    "ln_bwd_programs_per_sm": 6,
    "ln_bwd_warps": 1,              # 0: one warp per 256 columns, 4 to 16
    "ln_bwd_stages": 3,
    "ln_bwd_reload_mod": 0,
    "ln_bwd_fused_programs_per_sm": 6,  # the same three for gated_residual_adaln's backward
    "ln_bwd_fused_warps": 1,
    "ln_bwd_fused_reload_mod": 1,
    "ew_fwd_block_c": 1024,         # column tile of the elementwise gated-residual kernels
    "ew_fwd_tile": 8192,
    "ew_fwd_warps": 8,
    "ew_fwd_min_programs_per_sm": 2,  # tiles shrink (to one row) until the grid has this many
    "ew_bwd_block_c": 256,
    "ew_bwd_tile": 1024,
    "ew_bwd_warps": 4,
    "ew_bwd_programs_per_sm": 4,
    "ew_bwd_stages": 3,
}


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b  # triton.cdiv is a jit function: slow to call from Python


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if isinstance(n, int) else triton.next_power_of_2(n)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, but enough to split samples over several programs in tests


def _rows_pow2(n: int, tile: int, width: int) -> int:
    # ROWS: a power of two filling the tile, but never beyond the (rounded) number of rows.
    fit = tile // width
    return max(1, min(1 << (fit.bit_length() - 1) if fit else 1, _pow2(n)))


def _ln_blocks(C: int, split: int) -> tuple[int, int]:
    """(BLOCK_A, BLOCK_B): a row's one padded power-of-two block (BLOCK_B = 0), or with split the
    largest power of two below C and the power of two covering the rest."""
    full = _pow2(C)
    if not split or full == C:
        return full, 0
    return full // 2, _pow2(C - full // 2)


def _split(B: int, N: int, rows: int, device: torch.device, per_sm: int, col_tiles: int = 1) -> tuple[int, int]:
    """(S, rows_per_prog): each of S programs per sample reduces rows_per_prog rows."""
    target = per_sm * _sm_count(device)
    S = max(1, min(_cdiv(N, rows), _cdiv(target, B * col_tiles)))
    rows_per_prog = _cdiv(_cdiv(N, S), rows) * rows
    return _cdiv(N, rows_per_prog), rows_per_prog


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    # The kernels take any stride along B and N (e.g. chunks of one modulation projection) but
    # need unit stride along C.
    return t if t.stride(-1) == 1 or t.size(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int]:
    # (stride over B, stride over N); per-sample tensors (B, C) broadcast over N.
    return (t.stride(0), t.stride(1)) if t.dim() == 3 else (t.stride(0), 0)


def _is_fake(t) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_meta or isinstance(t, torch._subclasses.FakeTensor))


class _InterpretedLaunch:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **meta):
            # The interpreter runs on real CPU tensors only; a fake-tensor call (the registered
            # fake impl) needs just the outputs' metadata, which the launcher already allocated.
            if not any(_is_fake(a) for a in args):
                self.kernel[grid](*args, **meta)
        return launch


_direct = threading.local()


def wrap_triton(kernel):
    """torch.library.wrap_triton, or the kernel itself where no tracing can happen.

    It keeps torch's name on purpose: torch.library scans a triton_op's source for
    `wrap_triton(<kernel>)` to list its kernels, whose source then enters the compile-cache key.
    Under TRITON_INTERPRET=1 it returns a launcher that skips fake tensors; inside
    _launch_directly() (untraced eager calls) the plain kernel, as triton_op does for its eager
    calls: torch's traceable wrapper costs ~1 ms of Python per launch outside a triton_op.
    """
    if _INTERPRET:
        return _InterpretedLaunch(kernel)
    if getattr(_direct, "on", False):
        return kernel
    return _torch_wrap_triton(kernel)


@contextlib.contextmanager
def _launch_directly():
    prev = getattr(_direct, "on", False)
    _direct.on = True
    try:
        yield
    finally:
        _direct.on = prev


def _eager(*tensors) -> bool:
    # Plain tensors and no dispatch mode: nothing traces this call (dynamo, AOTAutograd and
    # make_fx all pass tensor subclasses or run under a mode), so it may launch the kernels
    # directly instead of through a custom-op dispatch (~40 us of Python each).
    return _get_current_dispatch_mode() is None and all(t is None or type(t) is torch.Tensor for t in tensors)


def _sum_partials(partials, dtypes):
    """[(B, S, C) fp32] -> [(B, C) in dtypes]: fixed-order sums over S, one launch for all."""
    B, S, C = partials[0].shape
    outs = [torch.empty((B, C), device=partials[0].device, dtype=d) for d in dtypes]
    num = len(partials)
    p = partials + [partials[0]] * (3 - num)
    o = outs + [outs[0]] * (3 - num)
    block_c = min(_pow2(C), 256)
    block_s = min(_pow2(S), 16)
    wrap_triton(_sum_partials_kernel)[(_cdiv(C, block_c), B)](
        p[0], p[1], p[2], o[0], o[1], o[2], S, C, NUM=num, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=4,
    )
    return outs


def forward_launch_kind(kind: str, B: int, N: int, device: torch.device) -> str:
    """The TUNE prefix of a LayerNorm forward's launch settings: kind ("ln_fwd" or "ln_fwd_fused"),
    or kind + "_small" for a problem of few rows per SM (the sampling batches)."""
    small = B * N < TUNE["ln_fwd_small_rows_per_sm"] * _sm_count(device)
    return f"{kind}_small" if small else kind


def adaln_forward(x, shift, scale, eps, gate=None, y=None, out_dtype=None, save_norm=False):
    """h = adaln(x) or, with gate and y, (r, h) = (x + gate * y, adaln(r)).  r is None without.
    h is written in out_dtype (default x's): the next GEMM's input dtype, so no cast pass follows.
    Returns (r, h, x_hat, rstd): with save_norm, x_hat (B, N, C) in h's dtype and rstd (B, N)
    fp32 for the backward (see the module docstring), else empty tensors."""
    B, N, C = x.shape
    residual = gate is not None
    x, shift, scale = _rowmajor(x), _rowmajor(shift), _rowmajor(scale)
    h = torch.empty((B, N, C), device=x.device, dtype=out_dtype or x.dtype)
    if save_norm:
        xhat = torch.empty((B, N, C), device=x.device, dtype=h.dtype)
        rstd = torch.empty((B, N), device=x.device, dtype=torch.float32)
    else:
        xhat = torch.empty((0,), device=x.device, dtype=h.dtype)
        rstd = torch.empty((0,), device=x.device, dtype=torch.float32)
    if residual:
        gate, y = _rowmajor(gate), _rowmajor(y)
        r = torch.empty((B, N, C), device=x.device, dtype=x.dtype)
    else:  # placeholders, never touched (RESIDUAL is a constexpr); not x, which the op must not
        gate = y = r = torch.empty((1,), device=x.device, dtype=x.dtype)  # appear to write
    kind = "ln_fwd_fused" if residual else "ln_fwd"
    block_a, block_b = _ln_blocks(C, TUNE[f"{kind}_split"])
    launch = forward_launch_kind(kind, B, N, x.device)
    tile = TUNE[f"{launch}_tile"]
    rows = _rows_pow2(N, tile, block_a + block_b)
    # A small problem (sampling at batch 1: 256 rows) takes smaller tiles rather than leave SMs idle.
    while rows > 1 and B * _cdiv(N, rows) < TUNE["ln_fwd_min_programs_per_sm"] * _sm_count(x.device):
        rows //= 2
    warps = TUNE[f"{launch}_warps"] if rows * (block_a + block_b) <= tile else 8
    per_sm = TUNE[f"{launch}_programs_per_sm"]
    S, rows_per_prog = _split(B, N, rows, x.device, per_sm) if per_sm else (_cdiv(N, rows), rows)
    wrap_triton(_adaln_fwd_kernel)[(S, B)](
        x, y, gate, shift, scale, r, h, xhat, rstd,
        N, C, eps, rows_per_prog,
        *_strides(x), *_strides(y), *_strides(gate), *_strides(shift), *_strides(scale),
        RESIDUAL=residual, GATE_TOK=residual and gate.dim() == 3, SHIFT_TOK=shift.dim() == 3,
        SCALE_TOK=scale.dim() == 3, SAVE_NORM=save_norm, ROWS=rows, BLOCK_A=block_a, BLOCK_B=block_b,
        STAGES=TUNE[f"{launch}_stages"], RELOAD_MOD=bool(TUNE[f"{kind}_reload_mod"]), num_warps=warps,
    )
    return (r if residual else None), h, xhat, rstd


def adaln_backward(x, shift, scale, dh, eps, gate=None, y=None, dr=None, rstd=None):
    """Gradients of adaln_forward.  x is the LayerNorm input (the residual r when fused), or,
    with rstd, the x_hat that adaln_forward(save_norm=True) wrote.

    Returns (dx, dscale, dshift, dgate, dy).  dshift is an empty tensor when shift is per token
    (its gradient is dh itself: the caller uses dh rather than pay for a copy); dgate and dy are
    None without the residual.
    """
    B, N, C = x.shape
    residual = gate is not None
    dev = x.device
    x, scale, dh = _rowmajor(x), _rowmajor(scale), _rowmajor(dh)
    from_norm = rstd is not None
    shift_tok, scale_tok = shift.dim() == 3, scale.dim() == 3
    gate_tok = residual and gate.dim() == 3
    block_a, block_b = _ln_blocks(C, TUNE["ln_bwd_split"])
    kind = "ln_bwd_fused" if residual else "ln_bwd"
    warps = TUNE[f"{kind}_warps"] or max(4, min(16, (block_a + block_b) // 256))
    rows = _rows_pow2(N, 32 * warps * TUNE["ln_bwd_elems_per_thread"], block_a + block_b)
    S, rows_per_prog = _split(B, N, rows, dev, TUNE[f"{kind}_programs_per_sm"])
    dummy = torch.empty((1,), device=dev, dtype=torch.float32)  # for pointers a constexpr disables
    # dx in the LayerNorm input's dtype; x_hat is only saved for an fp32 input (see _save_norm)
    dx = torch.empty((B, N, C), device=dev, dtype=torch.float32 if from_norm else x.dtype)

    def buf(per_token, like):  # per-token output in like's dtype, or fp32 per-program partial sums
        if per_token:
            return torch.empty((B, N, C), device=dev, dtype=like.dtype)
        # one program per sample: its sums are the gradient, written in like's dtype, no sum pass
        return torch.empty((B, S, C), device=dev, dtype=like.dtype if S == 1 else torch.float32)

    dscale_or_p = buf(scale_tok, scale)
    pshift = dummy if shift_tok else buf(False, shift)
    if residual:
        gate, y = _rowmajor(gate), _rowmajor(y)
        dy = torch.empty((B, N, C), device=dev, dtype=y.dtype)
        dgate_or_p = buf(gate_tok, gate)
        has_dr = dr is not None
        dr = _rowmajor(dr) if has_dr else dummy
    else:
        gate = y = dr = dy = dgate_or_p = dummy
        has_dr = False
    wrap_triton(_adaln_bwd_kernel)[(S, B)](
        x, rstd if from_norm else dummy, y, gate, scale, dr, dh,
        dx, dy, dgate_or_p, dscale_or_p, pshift, dscale_or_p, dgate_or_p,
        N, C, eps, rows_per_prog, S,
        *_strides(x), *_strides(y), *_strides(gate), *_strides(scale), *_strides(dr), *_strides(dh),
        RESIDUAL=residual, HAS_DR=has_dr, GATE_TOK=gate_tok, SHIFT_TOK=shift_tok,
        SCALE_TOK=scale_tok, FROM_NORM=from_norm, ROWS=rows, BLOCK_A=block_a, BLOCK_B=block_b,
        STAGES=TUNE["ln_bwd_stages"], RELOAD_MOD=bool(TUNE[f"{kind}_reload_mod"]), num_warps=warps,
    )
    partials, dtypes = [], []
    for p, m, per_token in ((pshift, shift, shift_tok), (dscale_or_p, scale, scale_tok),
                            (dgate_or_p, gate, not residual or gate_tok)):
        if not per_token:
            partials.append(p)
            dtypes.append(m.dtype)
    if S == 1:
        sums = iter([p.view(B, C) for p in partials])
    else:
        sums = iter(_sum_partials(partials, dtypes)) if partials else iter(())
    dshift = torch.empty((0,), device=dev, dtype=shift.dtype) if shift_tok else next(sums)
    dscale = dscale_or_p if scale_tok else next(sums)
    if not residual:
        return dx, dscale, dshift, None, None
    dgate = dgate_or_p if gate_tok else next(sums)
    return dx, dscale, dshift, dgate, dy


def _ew_config(N: int, C: int, pass_: str) -> tuple[int, int, int]:
    block_c = min(_pow2(C), TUNE[f"ew_{pass_}_block_c"])
    return block_c, _rows_pow2(N, TUNE[f"ew_{pass_}_tile"], block_c), TUNE[f"ew_{pass_}_warps"]


def gated_residual_forward(x, gate, y):
    B, N, C = x.shape
    x, gate, y = _rowmajor(x), _rowmajor(gate), _rowmajor(y)
    r = torch.empty((B, N, C), device=x.device, dtype=x.dtype)
    block_c, rows, warps = _ew_config(N, C, "fwd")
    # as the LayerNorm forward: a small problem (batch 1) takes smaller tiles, not a few programs
    while rows > 1 and B * _cdiv(N, rows) * _cdiv(C, block_c) < TUNE["ew_fwd_min_programs_per_sm"] * _sm_count(x.device):
        rows //= 2
    wrap_triton(_gres_fwd_kernel)[(_cdiv(N, rows), _cdiv(C, block_c), B)](
        x, y, gate, r, N, C, *_strides(x), *_strides(y), *_strides(gate),
        GATE_TOK=gate.dim() == 3, ROWS=rows, BLOCK_C=block_c, num_warps=warps,
    )
    return r


def gated_residual_backward(gate, y, dr):
    """(dy, dgate); dx is dr itself."""
    B, N, C = y.shape
    dev = y.device
    gate, y, dr = _rowmajor(gate), _rowmajor(y), _rowmajor(dr)
    gate_tok = gate.dim() == 3
    block_c, rows, warps = _ew_config(N, C, "bwd")
    col_tiles = _cdiv(C, block_c)
    S, rows_per_prog = _split(B, N, rows, dev, TUNE["ew_bwd_programs_per_sm"], col_tiles)
    dy = torch.empty((B, N, C), device=dev, dtype=y.dtype)
    if gate_tok:
        dgate = pgate = torch.empty((B, N, C), device=dev, dtype=gate.dtype)
    else:  # fp32 partial sums, or with S = 1 dgate itself (no sum pass)
        pgate = torch.empty((B, S, C), device=dev, dtype=gate.dtype if S == 1 else torch.float32)
        dgate = pgate
    wrap_triton(_gres_bwd_kernel)[(S, col_tiles, B)](
        y, gate, dr, dy, dgate, pgate,
        N, C, rows_per_prog, S,
        *_strides(y), *_strides(gate), *_strides(dr),
        GATE_TOK=gate_tok, ROWS=rows, BLOCK_C=block_c, STAGES=TUNE["ew_bwd_stages"], num_warps=warps,
    )
    if gate_tok:
        return dy, dgate
    return dy, (pgate.view(B, C) if S == 1 else _sum_partials([pgate], [gate.dtype])[0])


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------
# triton_op keeps the kernels visible to torch.compile (they are inlined as user-defined Triton
# kernels, no graph break) and register_autograd wires the backward ops in.  Under the
# interpreter wrap_triton cannot trace, so the same functions become opaque custom ops whose fake
# impl is the function itself (it allocates the outputs and skips the launch): compile and
# opcheck then work on the CPU too.  Optional outputs are not expressible in an op schema, so
# backward ops return an empty tensor where the autograd formula uses the incoming gradient.


def _register(name: str):
    def register(fn):
        if not _INTERPRET:
            return triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op
    return register


@_register("diffae_triton::adaln_modulate")
def _adaln_modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                       out_dtype: torch.dtype | None = None,
                       save_norm: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return adaln_forward(x, shift, scale, eps, out_dtype=out_dtype, save_norm=save_norm)[1:]


@_register("diffae_triton::adaln_modulate_backward")
def _adaln_modulate_backward_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, dh: torch.Tensor, eps: float,
    rstd: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dscale, dshift, _, _ = adaln_backward(x, shift, scale, dh, eps, rstd=rstd)
    return dx, dscale, dshift


def _adaln_modulate_setup(ctx, inputs, output):
    x, shift, scale, eps, _, save_norm = inputs
    _, xhat, rstd = output
    # what the backward normalises: the input, or the forward's x_hat and 1/std
    ctx.save_for_backward(xhat if save_norm else x, shift, scale, rstd if save_norm else None)
    ctx.eps = eps


def _adaln_modulate_grad(ctx, dh, _dxhat=None, _drstd=None):
    x, shift, scale, rstd = ctx.saved_tensors
    if _eager(x, shift, scale, dh, rstd):
        with _launch_directly():
            dx, dscale, dshift, _, _ = adaln_backward(x, shift, scale, dh, ctx.eps, rstd=rstd)
    else:
        dx, dscale, dshift = torch.ops.diffae_triton.adaln_modulate_backward(x, shift, scale, dh, ctx.eps, rstd)
    if shift.dim() == 3:
        dshift = dh.to(shift.dtype)
    return dx, dshift, dscale, None, None, None


_adaln_modulate_op.register_autograd(_adaln_modulate_grad, setup_context=_adaln_modulate_setup)


@_register("diffae_triton::gated_residual")
def _gated_residual_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return gated_residual_forward(x, gate, y)


@_register("diffae_triton::gated_residual_backward")
def _gated_residual_backward_op(
    gate: torch.Tensor, y: torch.Tensor, dr: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return gated_residual_backward(gate, y, dr)


def _gated_residual_backward_any(gate, y, dr):
    if _eager(gate, y, dr):
        with _launch_directly():
            return gated_residual_backward(gate, y, dr)
    return torch.ops.diffae_triton.gated_residual_backward(gate, y, dr)


def _gated_residual_setup(ctx, inputs, output):
    x, gate, y = inputs
    ctx.save_for_backward(gate, y)


def _gated_residual_grad(ctx, dr):
    gate, y = ctx.saved_tensors
    dy, dgate = _gated_residual_backward_any(gate, y, dr)
    return dr, dgate, dy


_gated_residual_op.register_autograd(_gated_residual_grad, setup_context=_gated_residual_setup)


@_register("diffae_triton::gated_residual_adaln")
def _gated_residual_adaln_op(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
    out_dtype: torch.dtype | None = None, save_norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return adaln_forward(x, shift, scale, eps, gate=gate, y=y, out_dtype=out_dtype, save_norm=save_norm)


@_register("diffae_triton::gated_residual_adaln_backward")
def _gated_residual_adaln_backward_op(
    r: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    dr: torch.Tensor | None, dh: torch.Tensor, eps: float, rstd: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dscale, dshift, dgate, dy = adaln_backward(r, shift, scale, dh, eps, gate=gate, y=y, dr=dr, rstd=rstd)
    return dx, dy, dgate, dscale, dshift


def _gated_residual_adaln_setup(ctx, inputs, output):
    x, gate, y, shift, scale, eps, _, save_norm = inputs
    r, _, xhat, rstd = output
    # The backward normalises the stored residual r (an output) rather than recomputing it, or
    # reads the forward's x_hat and 1/std.
    ctx.save_for_backward(xhat if save_norm else r, gate, y, shift, scale, rstd if save_norm else None)
    ctx.eps = eps


def _gated_residual_adaln_grad(ctx, dr, dh, _dxhat=None, _drstd=None):
    r, gate, y, shift, scale, rstd = ctx.saved_tensors  # r: x_hat when rstd is saved
    if dh is None:  # h unused: only the residual path carries gradient
        if dr is None:
            return None, None, None, None, None, None, None, None
        dy, dgate = _gated_residual_backward_any(gate, y, dr)
        return dr, dgate, dy, None, None, None, None, None
    if _eager(r, gate, y, shift, scale, dr, dh, rstd):
        with _launch_directly():
            dx, dscale, dshift, dgate, dy = adaln_backward(r, shift, scale, dh, ctx.eps, gate=gate, y=y, dr=dr,
                                                           rstd=rstd)
    else:
        dx, dy, dgate, dscale, dshift = torch.ops.diffae_triton.gated_residual_adaln_backward(
            r, gate, y, shift, scale, dr, dh, ctx.eps, rstd)
    if shift.dim() == 3:
        dshift = dh.to(shift.dtype)
    return dx, dgate, dy, dshift, dscale, None, None, None


_gated_residual_adaln_op.register_autograd(_gated_residual_adaln_grad, setup_context=_gated_residual_adaln_setup)


# ----------------------------------------------------------------------------------------------
# public functions (diffae.ops.adaln dispatches here; shapes are checked there)
# ----------------------------------------------------------------------------------------------
# Traced code (torch.compile, export, make_fx) goes through the registered ops.  Plain eager
# calls take an autograd.Function over the same launchers and backward formulas: the custom-op
# dispatch costs ~50-130 us of Python per call on top, as much as the kernels themselves at DiT
# sizes.  tests/test_adaln.py checks that both paths give identical results.


def _eager_function(name, forward, setup_context, backward):
    def fwd(ctx, *inputs):
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        with _launch_directly():
            out = forward(*inputs)
        setup_context(ctx, inputs, out)
        return out

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(fwd),
        "backward": staticmethod(lambda ctx, *grads: backward(ctx, *grads)),
    })


_AdalnModulateEager = _eager_function(
    "_AdalnModulateEager", lambda x, shift, scale, eps, out_dtype, save_norm: adaln_forward(
        x, shift, scale, eps, out_dtype=out_dtype, save_norm=save_norm)[1:],
    _adaln_modulate_setup, _adaln_modulate_grad)
_GatedResidualEager = _eager_function(
    "_GatedResidualEager", gated_residual_forward, _gated_residual_setup, _gated_residual_grad)
_GatedResidualAdalnEager = _eager_function(
    "_GatedResidualAdalnEager",
    lambda x, gate, y, shift, scale, eps, out_dtype, save_norm: adaln_forward(
        x, shift, scale, eps, gate=gate, y=y, out_dtype=out_dtype, save_norm=save_norm),
    _gated_residual_adaln_setup, _gated_residual_adaln_grad)


def _use_eager(*tensors) -> bool:
    # is_compiling() first: dynamo folds it to True and never traces _eager.
    return not torch.compiler.is_compiling() and _eager(*tensors)


def _save_norm(x: torch.Tensor, out_dtype, *inputs) -> bool:
    # Keep x_hat for the backward where it is narrower than the input: an fp32 stream normalised
    # into a 16-bit GEMM input (a DiT under autocast), and only when a backward will run.
    return (x.dtype == torch.float32 and out_dtype in (torch.bfloat16, torch.float16)
            and torch.is_grad_enabled() and any(t.requires_grad for t in (x, *inputs)))


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift; x (B, N, C), shift/scale (B, C) or (B, N, C); the
    result in out_dtype (default x's)."""
    save = _save_norm(x, out_dtype, shift, scale)
    if _use_eager(x, shift, scale):
        return _AdalnModulateEager.apply(x, shift, scale, float(eps), out_dtype, save)[0]
    return torch.ops.diffae_triton.adaln_modulate(x, shift, scale, float(eps), out_dtype, save)[0]


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y."""
    if _use_eager(x, gate, y):
        return _GatedResidualEager.apply(x, gate, y)
    return torch.ops.diffae_triton.gated_residual(x, gate, y)


def gated_residual_adaln(x, gate, y, shift, scale, eps: float = 1e-6,
                         out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, h) = (x + gate * y, adaln_modulate(r, shift, scale)) in one pass; r in x's dtype, h in
    out_dtype (default x's)."""
    save = _save_norm(x, out_dtype, gate, y, shift, scale)
    if _use_eager(x, gate, y, shift, scale):
        r, h, _, _ = _GatedResidualAdalnEager.apply(x, gate, y, shift, scale, float(eps), out_dtype, save)
    else:
        r, h, _, _ = torch.ops.diffae_triton.gated_residual_adaln(x, gate, y, shift, scale, float(eps),
                                                                 out_dtype, save)
    return r, h
