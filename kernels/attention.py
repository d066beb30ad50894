"""Triton flash attention straight from the packed QKV projection, forward and backward.

qkv is (B, N, 3, H, D) exactly as `Linear(C, 3C)` writes it (unit stride along D, any other
strides); q, k, v tiles are read through strides, so no permute or contiguous copy is made.  The
output is written as (B, N, H*D), ready for the out-projection, and the backward writes dqkv in the
packed layout.  Non-causal, fp32 accumulation, bf16/fp16 in and out.

Options, both handled inside the same kernels:
  * per-head RMS QK-norm with learned weights wq, wk (D,):  q^ = q rq wq,  k^ = k rk wk, with
    rq = rsqrt(mean(q^2) + eps).  The scores are q^.k^ = rq rk (q*wq*wk).k: every kernel scales
    q tiles by rq*wq*wk (in bf16, once per program where q is resident, per tile in the dK/dV
    pass so that its P is bitwise the forward's), and rk is a per-key scale on the score tile, so
    key tiles go from shared memory into the matrix units unchanged.  rq comes free from the q
    tile in the forward; rk (all keys) from a small pre-pass.  The norm backward and d(wq),
    d(wk) (deterministic fp32 partial sums) are fused into the epilogues of the backward kernels.
  * kv_extra (B, M, 2, H, D): extra key/value tokens (cross-attention on z), treated as extra
    key blocks after the N self keys.

Head dims: 16 <= D <= 128 with D % 8 == 0.  A D that is not a power of two runs in one tile of
the next power of two with the columns past D masked (72 -> 128).  The kernels also carry a
"split" tiling (a power-of-two head part plus a masked 16- or 32-wide tail: 72 = 64 + 16, 1.6x
less matrix work) that is exact under the interpreter but gave wrong results and illegal
addresses on an H100 with triton 3.6 (cause not found); DIFFAE_ATTN_DMODE=split selects it under
the interpreter only, for that investigation.
Strides are promised to be multiples of 8 elements when they are (ALIGN8), so tiles load as
16-byte vectors even where a stride is not a multiple of 16 (h * 72).

Backward: delta = rowsum(dO * O) is computed by the dQ kernel (one program per q block, which
reads dO and O once anyway), then one dK/dV kernel (one program per key block, self and extra)
loops over the q blocks.  No atomics anywhere.  A one-program-per-head backward with an fp32 dq
scratch was tried and measured slower on the H100 at every benchmarked shape (0.206 against
0.158 ms at (B, H, N, D) = (64, 12, 256, 64)), so this two-kernel one is kept.

Block sizes are autotuned on the GPU with triton.autotune per (N, M, B*H rounded up to powers of
two, D, options); cache_results=True keeps the timings in Triton's on-disk cache (~/.triton/cache,
JSON), so a new process does not re-tune.  diffae.ops.set_attention_autotune(False) (or
DIFFAE_ATTN_AUTOTUNE=0) uses one fixed config per head dim instead.

Registration: torch.library.custom_op + register_fake + register_autograd (namespace
diffae_triton).  The op is opaque to torch.compile (no graph break, traced with fullgraph=True,
captured by CUDA graphs): the autotuner, its disk cache and the config pruning stay ours, and
there is nothing for Inductor to fuse into an attention kernel anyway.  In eager mode `attention`
calls the same launchers through a plain autograd.Function, because the custom-op dispatch costs
more host time than the kernels take at DiT sizes.  Warm the op up (one call per shape) before
capturing a CUDA graph, so no tuning happens during capture.

Layout of this module: kernels, launchers (attention_forward / attention_backward),
torch.library registration, public functions.  The pure-PyTorch specification is
diffae.ops.attention.attention_reference.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from diffae.ops.attention import attention_autotune

# Read once, as triton.jit does when it decides between compiling and interpreting the kernels.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
# triton 3.9's interpreter multiplies bf16 dot operands as raw bits: there, dots take fp32 copies
# of the (already rounded) operands, which computes the same products.
_INTERP_DOT = tl.constexpr(_INTERPRET)
# Integer arguments that must not multiply compiled variants (Triton specialises ints on == 1 and
# % 16 == 0): the head count only indexes, and the N/M buckets are autotuner keys.
_NO_SPEC = ["H", "N_KEY", "M_KEY", "BH_KEY"]

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc):
    if _INTERP_DOT:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        c = tl.dot(a, b, acc)
    return c


@triton.jit
def _load(ptrs, rmask, cmask, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    # Masks only where needed: full blocks of full head-part columns load unpredicated.
    if MASK_R:
        if MASK_C:
            x = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rmask[:, None], other=0.0)
    else:
        if MASK_C:
            x = tl.load(ptrs, mask=cmask[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _load_vec(ptrs, rmask, other, MASK_R: tl.constexpr):
    if MASK_R:
        x = tl.load(ptrs, mask=rmask, other=other)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _a8(x, ALIGN8: tl.constexpr):
    # A stride known to be a multiple of 8 elements (16 bytes): spelled so that Triton's alignment
    # analysis sees it, which turns tile loads into 16-byte vector loads (D = 72: h * 72).
    if ALIGN8:
        x = (x // 8) * 8
    return x


@triton.jit
def _store_rows(ptrs, val, rmask, cmask, MASK_C: tl.constexpr):
    if MASK_C:
        tl.store(ptrs, val, mask=rmask[:, None] & cmask[None, :])
    else:
        tl.store(ptrs, val, mask=rmask[:, None])


@triton.jit
def _k_rstd_kernel(
    QKV, KVX, RK,
    s_b, s_n, s_3, s_h, x_b, x_n, x_h,
    H, N, M, eps,
    HEAD_DIM: tl.constexpr, DP: tl.constexpr, BLOCK_R: tl.constexpr, HAS_EXTRA: tl.constexpr,
):
    # grid (cdiv(N, BLOCK_R) + cdiv(M, BLOCK_R), B*H): rk of every key row, self keys then extra
    # keys, into RK (B, H, N + M) fp32.
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    cols = tl.arange(0, DP)
    cmask = cols < HEAD_DIM
    nb_self = (N + BLOCK_R - 1) // BLOCK_R
    if pid < nb_self:
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < N
        x = tl.load(QKV + b * s_b + h * s_h + s_3 + rows[:, None] * s_n + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
        tl.store(RK + bh * (N + M) + rows, r, mask=rmask)
    else:
        if HAS_EXTRA:
            rows = (pid - nb_self) * BLOCK_R + tl.arange(0, BLOCK_R)
            rmask = rows < M
            x = tl.load(KVX + b * x_b + h * x_h + rows[:, None] * x_n + cols[None, :],
                        mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            r = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
            tl.store(RK + bh * (N + M) + N + rows, r, mask=rmask)


@triton.jit
def _fwd_inner(
    acc, acc_t, m_i, l_i, q, q_t,
    K, V, RKp, stride_n, start, n_kv, qk_scale,
    offs_n0, offs_d, offs_t, cmask_d, cmask_t,
    PAD_D: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_NORM: tl.constexpr, MASK: tl.constexpr,
):
    # One key block [start, start + BLOCK_N) of n_kv keys: online-softmax update of acc (BLOCK_M, DH)
    # and acc_t (BLOCK_M, DT).  Scores are kept in log2 units (qk_scale = log2(e) / sqrt(D)).
    offs_n = start + offs_n0
    rmask = offs_n < n_kv
    rows = offs_n[:, None] * stride_n
    k = _load(K + rows + offs_d[None, :], rmask, cmask_d, MASK, PAD_D)
    s = _dot(q, tl.trans(k), None)
    if HAS_TAIL:
        k_t = _load(K + rows + offs_t[None, :], rmask, cmask_t, MASK, True)
        s = _dot(q_t, tl.trans(k_t), s)
    if HAS_NORM:
        rk = _load_vec(RKp + offs_n, rmask, 0.0, MASK)
        s = s * (rk * qk_scale)[None, :]
    else:
        s = s * qk_scale
    if MASK:
        s = tl.where(rmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load(V + rows + offs_d[None, :], rmask, cmask_d, MASK, PAD_D)
    p_lo = p.to(v.dtype)
    acc = _dot(p_lo, v, acc * alpha[:, None])
    if HAS_TAIL:
        v_t = _load(V + rows + offs_t[None, :], rmask, cmask_t, MASK, True)
        acc_t = _dot(p_lo, v_t, acc_t * alpha[:, None])
    return acc, acc_t, m_new, l_i


@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_fwd_kernel(
    QKV, KVX, O, LSE, RQ, RK, WQ, WK,
    s_b, s_n, s_3, s_h, x_b, x_n, x_2, x_h, o_b, o_n,
    H, N, M, N_KEY, M_KEY, BH_KEY, qk_scale, eps,
    HEAD_DIM: tl.constexpr, DH: tl.constexpr, DT: tl.constexpr, PAD_D: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_NORM: tl.constexpr, HAS_EXTRA: tl.constexpr, ALIGN8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid (cdiv(N, BLOCK_M), B*H).  N_KEY, M_KEY, BH_KEY: unused, the autotuner's key buckets.
    s_b, s_n, s_3, s_h = _a8(s_b, ALIGN8), _a8(s_n, ALIGN8), _a8(s_3, ALIGN8), _a8(s_h, ALIGN8)
    x_b, x_n, x_2, x_h = _a8(x_b, ALIGN8), _a8(x_n, ALIGN8), _a8(x_2, ALIGN8), _a8(x_h, ALIGN8)
    o_b, o_n = _a8(o_b, ALIGN8), _a8(o_n, ALIGN8)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    dtype = O.dtype.element_ty
    Q = QKV + b * s_b + h * s_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mrow = offs_m < N
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DH)
    cmask_d = offs_d < HEAD_DIM
    offs_t = DH + tl.arange(0, DT)
    cmask_t = offs_t < HEAD_DIM
    qrows = offs_m[:, None] * s_n
    q = _load(Q + qrows + offs_d[None, :], mrow, cmask_d, True, PAD_D)
    if HAS_TAIL:
        q_t = tl.load(Q + qrows + offs_t[None, :], mask=mrow[:, None] & cmask_t[None, :], other=0.0)
    else:
        q_t = tl.zeros([BLOCK_M, DT], dtype=dtype)
    if HAS_NORM:
        # q' = q * rq * wq * wk: the resident operand carries both weights; rk scales the scores.
        qf = q.to(tl.float32)
        qf_t = q_t.to(tl.float32)
        ss = tl.sum(qf * qf, axis=1)
        if HAS_TAIL:
            ss += tl.sum(qf_t * qf_t, axis=1)
        rq = tl.rsqrt(ss / HEAD_DIM + eps)
        tl.store(RQ + bh * N + offs_m, rq, mask=mrow)
        w = (tl.load(WQ + offs_d, mask=cmask_d, other=0.0).to(tl.float32)
             * tl.load(WK + offs_d, mask=cmask_d, other=0.0).to(tl.float32))
        q = (qf * rq[:, None] * w[None, :]).to(dtype)
        if HAS_TAIL:
            w_t = (tl.load(WQ + offs_t, mask=cmask_t, other=0.0).to(tl.float32)
                   * tl.load(WK + offs_t, mask=cmask_t, other=0.0).to(tl.float32))
            q_t = (qf_t * rq[:, None] * w_t[None, :]).to(dtype)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DH], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, DT], dtype=tl.float32)
    RKb = RK + bh * (N + M)
    K = Q + s_3
    V = Q + 2 * s_3
    n_full = (N // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        acc, acc_t, m_i, l_i = _fwd_inner(acc, acc_t, m_i, l_i, q, q_t, K, V, RKb, s_n, start, N,
                                          qk_scale, offs_n0, offs_d, offs_t, cmask_d, cmask_t,
                                          PAD_D, HAS_TAIL, HAS_NORM, False)
    if n_full < N:
        acc, acc_t, m_i, l_i = _fwd_inner(acc, acc_t, m_i, l_i, q, q_t, K, V, RKb, s_n, n_full, N,
                                          qk_scale, offs_n0, offs_d, offs_t, cmask_d, cmask_t,
                                          PAD_D, HAS_TAIL, HAS_NORM, True)
    if HAS_EXTRA:
        KX = KVX + b * x_b + h * x_h
        VX = KX + x_2
        m_full = (M // BLOCK_N) * BLOCK_N
        for start in range(0, m_full, BLOCK_N):
            acc, acc_t, m_i, l_i = _fwd_inner(acc, acc_t, m_i, l_i, q, q_t, KX, VX, RKb + N, x_n,
                                              start, M, qk_scale, offs_n0, offs_d, offs_t, cmask_d,
                                              cmask_t, PAD_D, HAS_TAIL, HAS_NORM, False)
        if m_full < M:
            acc, acc_t, m_i, l_i = _fwd_inner(acc, acc_t, m_i, l_i, q, q_t, KX, VX, RKb + N, x_n,
                                              m_full, M, qk_scale, offs_n0, offs_d, offs_t, cmask_d,
                                              cmask_t, PAD_D, HAS_TAIL, HAS_NORM, True)
    inv_l = 1.0 / l_i
    Ob = O + b * o_b + h * HEAD_DIM + offs_m[:, None] * o_n
    _store_rows(Ob + offs_d[None, :], (acc * inv_l[:, None]).to(dtype), mrow, cmask_d, PAD_D)
    if HAS_TAIL:
        tl.store(Ob + offs_t[None, :], (acc_t * inv_l[:, None]).to(dtype),
                 mask=mrow[:, None] & cmask_t[None, :])
    tl.store(LSE + bh * N + offs_m, m_i + tl.math.log2(l_i), mask=mrow)  # log2 units


@triton.jit
def _dq_inner(
    dq, dq_t, q, q_t, do, do_t, lse, delta,
    K, V, RKp, stride_n, start, n_kv, qk_scale,
    offs_n0, offs_d, offs_t, cmask_d, cmask_t,
    PAD_D: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_NORM: tl.constexpr, MASK: tl.constexpr,
):
    # dS = P * (dP - delta) for one key block; dq += (dS * rk) k, with raw k from memory.
    offs_n = start + offs_n0
    rmask = offs_n < n_kv
    rows = offs_n[:, None] * stride_n
    k = _load(K + rows + offs_d[None, :], rmask, cmask_d, MASK, PAD_D)
    v = _load(V + rows + offs_d[None, :], rmask, cmask_d, MASK, PAD_D)
    s = _dot(q, tl.trans(k), None)
    dp = _dot(do, tl.trans(v), None)
    if HAS_TAIL:
        k_t = _load(K + rows + offs_t[None, :], rmask, cmask_t, MASK, True)
        v_t = _load(V + rows + offs_t[None, :], rmask, cmask_t, MASK, True)
        s = _dot(q_t, tl.trans(k_t), s)
        dp = _dot(do_t, tl.trans(v_t), dp)
    if HAS_NORM:
        rk = _load_vec(RKp + offs_n, rmask, 0.0, MASK)
        s = s * (rk * qk_scale)[None, :]
    else:
        s = s * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if MASK:
        p = tl.where(rmask[None, :], p, 0.0)
    ds = p * (dp - delta[:, None])
    if HAS_NORM:
        ds = ds * rk[None, :]
    ds = ds.to(k.dtype)
    dq = _dot(ds, k, dq)
    if HAS_TAIL:
        dq_t = _dot(ds, k_t, dq_t)
    return dq, dq_t


@triton.jit
def _norm_bwd(dy, dy_t, x, x_t, r, w, w_t, rmask, HEAD_DIM: tl.constexpr, HAS_TAIL: tl.constexpr):
    # y = x * r * w with r = rsqrt(mean(x^2) + eps):  dx = r * (g - xn * mean(g * xn)),
    # g = dy * w, xn = x * r;  d(w) partial = column sums of dy * xn (invalid rows zeroed).
    xn = x.to(tl.float32) * r[:, None]
    xn_t = x_t.to(tl.float32) * r[:, None]
    g = dy * w[None, :]
    g_t = dy_t * w_t[None, :]
    c = tl.sum(g * xn, axis=1)
    if HAS_TAIL:
        c += tl.sum(g_t * xn_t, axis=1)
    c = c / HEAD_DIM
    dx = r[:, None] * (g - xn * c[:, None])
    dx_t = r[:, None] * (g_t - xn_t * c[:, None])
    dw = tl.where(rmask[:, None], dy * xn, 0.0)
    dw_t = tl.where(rmask[:, None], dy_t * xn_t, 0.0)
    return dx, dx_t, dw, dw_t


@triton.jit
def _store_dw_partial(P, seg_rows, start, dw, dw_t, offs_d, offs_t, cmask_d, cmask_t,
                      BLOCK: tl.constexpr, DH: tl.constexpr, DT: tl.constexpr,
                      HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, HAS_TAIL: tl.constexpr):
    # Rows of 16 tokens are summed into one partial row: P[(start + 16 j) // 16] for the
    # j-th group of this block, masked to the segment's cdiv(n, 16) rows.  P is (., HEAD_DIM) fp32.
    G: tl.constexpr = BLOCK // 16
    grp = start // 16 + tl.arange(0, G)
    gmask = grp < seg_rows
    s = tl.sum(tl.reshape(dw, (G, 16, DH)), axis=1)
    _store_rows(P + grp[:, None] * HEAD_DIM + offs_d[None, :], s, gmask, cmask_d, PAD_D)
    if HAS_TAIL:
        s_t = tl.sum(tl.reshape(dw_t, (G, 16, DT)), axis=1)
        tl.store(P + grp[:, None] * HEAD_DIM + offs_t[None, :], s_t, mask=gmask[:, None] & cmask_t[None, :])


@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_bwd_dq_kernel(
    QKV, KVX, O, DO, DQKV, LSE, DELTA, RQ, RK, WQ, WK, PWQ,
    s_b, s_n, s_3, s_h, x_b, x_n, x_2, x_h, o_b, o_n, do_b, do_n, g_b, g_n, g_h,
    H, N, M, N_KEY, M_KEY, BH_KEY, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, DH: tl.constexpr, DT: tl.constexpr, PAD_D: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_NORM: tl.constexpr, HAS_EXTRA: tl.constexpr, ALIGN8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid (cdiv(N, BLOCK_M), B*H): one q block; writes delta (for the dK/dV kernel), dq into
    # dqkv[:, :, 0] and, with the norm, its d(wq) partial rows.
    s_b, s_n, s_3, s_h = _a8(s_b, ALIGN8), _a8(s_n, ALIGN8), _a8(s_3, ALIGN8), _a8(s_h, ALIGN8)
    x_b, x_n, x_2, x_h = _a8(x_b, ALIGN8), _a8(x_n, ALIGN8), _a8(x_2, ALIGN8), _a8(x_h, ALIGN8)
    o_b, o_n, do_b, do_n = _a8(o_b, ALIGN8), _a8(o_n, ALIGN8), _a8(do_b, ALIGN8), _a8(do_n, ALIGN8)
    g_b, g_n, g_h = _a8(g_b, ALIGN8), _a8(g_n, ALIGN8), _a8(g_h, ALIGN8)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    dtype = DQKV.dtype.element_ty
    Q = QKV + b * s_b + h * s_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mrow = offs_m < N
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DH)
    cmask_d = offs_d < HEAD_DIM
    offs_t = DH + tl.arange(0, DT)
    cmask_t = offs_t < HEAD_DIM
    qrows = offs_m[:, None] * s_n
    orows = b * o_b + h * HEAD_DIM + offs_m[:, None] * o_n
    dorows = b * do_b + h * HEAD_DIM + offs_m[:, None] * do_n
    q = _load(Q + qrows + offs_d[None, :], mrow, cmask_d, True, PAD_D)
    do = _load(DO + dorows + offs_d[None, :], mrow, cmask_d, True, PAD_D)
    o = _load(O + orows + offs_d[None, :], mrow, cmask_d, True, PAD_D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    if HAS_TAIL:
        tmask = mrow[:, None] & cmask_t[None, :]
        q_t = tl.load(Q + qrows + offs_t[None, :], mask=tmask, other=0.0)
        do_t = tl.load(DO + dorows + offs_t[None, :], mask=tmask, other=0.0)
        o_t = tl.load(O + orows + offs_t[None, :], mask=tmask, other=0.0)
        delta += tl.sum(do_t.to(tl.float32) * o_t.to(tl.float32), axis=1)
    else:
        q_t = tl.zeros([BLOCK_M, DT], dtype=dtype)
        do_t = tl.zeros([BLOCK_M, DT], dtype=dtype)
    tl.store(DELTA + bh * N + offs_m, delta, mask=mrow)
    lse = tl.load(LSE + bh * N + offs_m, mask=mrow, other=0.0)
    if HAS_NORM:
        rq = tl.load(RQ + bh * N + offs_m, mask=mrow, other=0.0)
        wq = tl.load(WQ + offs_d, mask=cmask_d, other=0.0).to(tl.float32)
        wk = tl.load(WK + offs_d, mask=cmask_d, other=0.0).to(tl.float32)
        wq_t = tl.load(WQ + offs_t, mask=cmask_t, other=0.0).to(tl.float32)
        wk_t = tl.load(WK + offs_t, mask=cmask_t, other=0.0).to(tl.float32)
        qs = (q.to(tl.float32) * rq[:, None] * (wq * wk)[None, :]).to(dtype)
        qs_t = (q_t.to(tl.float32) * rq[:, None] * (wq_t * wk_t)[None, :]).to(dtype)
    else:
        qs = q
        qs_t = q_t
    dq = tl.zeros([BLOCK_M, DH], dtype=tl.float32)
    dq_t = tl.zeros([BLOCK_M, DT], dtype=tl.float32)
    RKb = RK + bh * (N + M)
    K = Q + s_3
    V = Q + 2 * s_3
    n_full = (N // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        dq, dq_t = _dq_inner(dq, dq_t, qs, qs_t, do, do_t, lse, delta, K, V, RKb, s_n, start, N,
                             qk_scale, offs_n0, offs_d, offs_t, cmask_d, cmask_t, PAD_D, HAS_TAIL,
                             HAS_NORM, False)
    if n_full < N:
        dq, dq_t = _dq_inner(dq, dq_t, qs, qs_t, do, do_t, lse, delta, K, V, RKb, s_n, n_full, N,
                             qk_scale, offs_n0, offs_d, offs_t, cmask_d, cmask_t, PAD_D, HAS_TAIL,
                             HAS_NORM, True)
    if HAS_EXTRA:
        KX = KVX + b * x_b + h * x_h
        VX = KX + x_2
        m_full = (M // BLOCK_N) * BLOCK_N
        for start in range(0, m_full, BLOCK_N):
            dq, dq_t = _dq_inner(dq, dq_t, qs, qs_t, do, do_t, lse, delta, KX, VX, RKb + N, x_n,
                                 start, M, qk_scale, offs_n0, offs_d, offs_t, cmask_d, cmask_t,
                                 PAD_D, HAS_TAIL, HAS_NORM, False)
        if m_full < M:
            dq, dq_t = _dq_inner(dq, dq_t, qs, qs_t, do, do_t, lse, delta, KX, VX, RKb + N, x_n,
                                 m_full, M, qk_scale, offs_n0, offs_d, offs_t, cmask_d, cmask_t,
                                 PAD_D, HAS_TAIL, HAS_NORM, True)
    dq = dq * sm_scale
    dq_t = dq_t * sm_scale
    if HAS_NORM:
        # dq so far is d(q^)/wk; d(q^) = dq * wk, then through the norm to the raw q.
        # Raw q, rq and the weights reloaded rather than kept live across the loop (registers).
        rq = tl.load(RQ + bh * N + offs_m, mask=mrow, other=0.0)
        wq = tl.load(WQ + offs_d, mask=cmask_d, other=0.0).to(tl.float32)
        wk = tl.load(WK + offs_d, mask=cmask_d, other=0.0).to(tl.float32)
        wq_t = tl.load(WQ + offs_t, mask=cmask_t, other=0.0).to(tl.float32)
        wk_t = tl.load(WK + offs_t, mask=cmask_t, other=0.0).to(tl.float32)
        q = _load(Q + qrows + offs_d[None, :], mrow, cmask_d, True, PAD_D)
        if HAS_TAIL:
            q_t = tl.load(Q + qrows + offs_t[None, :], mask=mrow[:, None] & cmask_t[None, :], other=0.0)
        dq, dq_t, dw, dw_t = _norm_bwd(dq * wk[None, :], dq_t * wk_t[None, :], q, q_t, rq, wq, wq_t,
                                       mrow, HEAD_DIM, HAS_TAIL)
        _store_dw_partial(PWQ + bh * ((N + 15) // 16) * HEAD_DIM, (N + 15) // 16, pid_m * BLOCK_M,
                          dw, dw_t, offs_d, offs_t, cmask_d, cmask_t, BLOCK_M, DH, DT, HEAD_DIM,
                          PAD_D, HAS_TAIL)
    G = DQKV + b * g_b + h * g_h + offs_m[:, None] * g_n
    _store_rows(G + offs_d[None, :], dq.to(dtype), mrow, cmask_d, PAD_D)
    if HAS_TAIL:
        tl.store(G + offs_t[None, :], dq_t.to(dtype), mask=mrow[:, None] & cmask_t[None, :])


@triton.jit
def _dkdv_inner(
    dk, dk_t, dv, dv_t, k, k_t, v, v_t, rk_s, w, w_t,
    Q, DO, LSEb, DELTAb, RQb, s_n, do_n, start, N, qk_scale,
    offs_m0, offs_d, offs_t, cmask_d, cmask_t,
    PAD_D: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_NORM: tl.constexpr, MASK: tl.constexpr,
):
    # One q block against the resident key block, transposed: sT, pT, dsT are (BLOCK_N, BLOCK_M).
    # Rows past N load as zeros (q, dO, delta), which makes their pT * dO and dsT vanish.
    offs_m = start + offs_m0
    rmask = offs_m < N
    q = _load(Q + offs_m[:, None] * s_n + offs_d[None, :], rmask, cmask_d, MASK, PAD_D)
    do = _load(DO + offs_m[:, None] * do_n + offs_d[None, :], rmask, cmask_d, MASK, PAD_D)
    if HAS_TAIL:
        q_t = _load(Q + offs_m[:, None] * s_n + offs_t[None, :], rmask, cmask_t, MASK, True)
        do_t = _load(DO + offs_m[:, None] * do_n + offs_t[None, :], rmask, cmask_t, MASK, True)
    else:
        q_t = q
        do_t = do
    lse = _load_vec(LSEb + offs_m, rmask, 0.0, MASK)
    delta = _load_vec(DELTAb + offs_m, rmask, 0.0, MASK)
    if HAS_NORM:
        # Scores exactly as the forward computed them: (bf16(q * rq * wq * wk) . k) * rk, so P here
        # is the forward's P (folding the weights into the resident k instead would round
        # differently and leave sum_j dS_ij != 0 at the bf16 level).
        rq = _load_vec(RQb + offs_m, rmask, 0.0, MASK)
        qs = (q.to(tl.float32) * rq[:, None] * w[None, :]).to(q.dtype)
        sT = _dot(k, tl.trans(qs), None)
        if HAS_TAIL:
            qs_t = (q_t.to(tl.float32) * rq[:, None] * w_t[None, :]).to(q.dtype)
            sT = _dot(k_t, tl.trans(qs_t), sT)
        sT = sT * rk_s[:, None]
    else:
        sT = _dot(k, tl.trans(q), None)
        if HAS_TAIL:
            sT = _dot(k_t, tl.trans(q_t), sT)
        sT = sT * qk_scale
    dpT = _dot(v, tl.trans(do), None)
    if HAS_TAIL:
        dpT = _dot(v_t, tl.trans(do_t), dpT)
    pT = tl.math.exp2(sT - lse[None, :])
    dv = _dot(pT.to(do.dtype), do, dv)
    if HAS_TAIL:
        dv_t = _dot(pT.to(do.dtype), do_t, dv_t)
    dsT = pT * (dpT - delta[None, :])
    if HAS_NORM:
        dsT = dsT * rq[None, :]  # d(k^) = scale * wq * sum_i dS_ij rq_i q_i, with raw q
    dsT = dsT.to(q.dtype)
    dk = _dot(dsT, q, dk)
    if HAS_TAIL:
        dk_t = _dot(dsT, q_t, dk_t)
    return dk, dk_t, dv, dv_t


@triton.jit
def _dkdv_block(
    K, V, DK, DV, RKb, PW, kstride, dstride, start, n_kv, seg_rows,
    Q, DOb, LSEb, DELTAb, RQb, WQ, WK, s_n, do_n, N, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, DH: tl.constexpr, DT: tl.constexpr, PAD_D: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Keys [start, start + BLOCK_N) of a segment of n_kv keys (self keys or kv_extra's):
    # loops over all q blocks, then writes dk, dv and, with the norm, d(wk) partial rows to PW.
    dtype = DK.dtype.element_ty
    offs_n = start + tl.arange(0, BLOCK_N)
    nmask = offs_n < n_kv
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DH)
    cmask_d = offs_d < HEAD_DIM
    offs_t = DH + tl.arange(0, DT)
    cmask_t = offs_t < HEAD_DIM
    tmask = nmask[:, None] & cmask_t[None, :]
    krows = offs_n[:, None] * kstride
    k = _load(K + krows + offs_d[None, :], nmask, cmask_d, True, PAD_D)
    v = _load(V + krows + offs_d[None, :], nmask, cmask_d, True, PAD_D)
    if HAS_TAIL:
        k_t = tl.load(K + krows + offs_t[None, :], mask=tmask, other=0.0)
        v_t = tl.load(V + krows + offs_t[None, :], mask=tmask, other=0.0)
    else:
        k_t = tl.zeros([BLOCK_N, DT], dtype=dtype)
        v_t = tl.zeros([BLOCK_N, DT], dtype=dtype)
    if HAS_NORM:
        # The streamed q tiles get both weights and their rq (as in the forward); rk scales scores.
        rk_s = tl.load(RKb + offs_n, mask=nmask, other=0.0) * qk_scale
        w = (tl.load(WQ + offs_d, mask=cmask_d, other=0.0).to(tl.float32)
             * tl.load(WK + offs_d, mask=cmask_d, other=0.0).to(tl.float32))
        w_t = (tl.load(WQ + offs_t, mask=cmask_t, other=0.0).to(tl.float32)
               * tl.load(WK + offs_t, mask=cmask_t, other=0.0).to(tl.float32))
    else:
        rk_s = tl.zeros([BLOCK_N], dtype=tl.float32)
        w = tl.zeros([DH], dtype=tl.float32)
        w_t = tl.zeros([DT], dtype=tl.float32)
    dk = tl.zeros([BLOCK_N, DH], dtype=tl.float32)
    dk_t = tl.zeros([BLOCK_N, DT], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DH], dtype=tl.float32)
    dv_t = tl.zeros([BLOCK_N, DT], dtype=tl.float32)
    m_full = (N // BLOCK_M) * BLOCK_M
    for qs in range(0, m_full, BLOCK_M):
        dk, dk_t, dv, dv_t = _dkdv_inner(dk, dk_t, dv, dv_t, k, k_t, v, v_t, rk_s, w, w_t, Q, DOb,
                                         LSEb, DELTAb, RQb, s_n, do_n, qs, N, qk_scale, offs_m0, offs_d,
                                         offs_t, cmask_d, cmask_t, PAD_D, HAS_TAIL, HAS_NORM, False)
    if m_full < N:
        dk, dk_t, dv, dv_t = _dkdv_inner(dk, dk_t, dv, dv_t, k, k_t, v, v_t, rk_s, w, w_t, Q, DOb,
                                         LSEb, DELTAb, RQb, s_n, do_n, m_full, N, qk_scale, offs_m0, offs_d,
                                         offs_t, cmask_d, cmask_t, PAD_D, HAS_TAIL, HAS_NORM, True)
    drows = offs_n[:, None] * dstride
    _store_rows(DV + drows + offs_d[None, :], dv.to(dtype), nmask, cmask_d, PAD_D)
    if HAS_TAIL:
        tl.store(DV + drows + offs_t[None, :], dv_t.to(dtype), mask=tmask)
    dk = dk * sm_scale
    dk_t = dk_t * sm_scale
    if HAS_NORM:
        # dk so far is d(k^)/wq; d(k^) = dk * wq, then through the norm to the raw k.
        # Raw k, rk and the weights reloaded rather than kept live across the loop (registers).
        rk = tl.load(RKb + offs_n, mask=nmask, other=0.0)
        wq = tl.load(WQ + offs_d, mask=cmask_d, other=0.0).to(tl.float32)
        wk = tl.load(WK + offs_d, mask=cmask_d, other=0.0).to(tl.float32)
        wq_t = tl.load(WQ + offs_t, mask=cmask_t, other=0.0).to(tl.float32)
        wk_t = tl.load(WK + offs_t, mask=cmask_t, other=0.0).to(tl.float32)
        k = _load(K + krows + offs_d[None, :], nmask, cmask_d, True, PAD_D)
        if HAS_TAIL:
            k_t = tl.load(K + krows + offs_t[None, :], mask=tmask, other=0.0)
        dk, dk_t, dw, dw_t = _norm_bwd(dk * wq[None, :], dk_t * wq_t[None, :], k, k_t, rk, wk, wk_t,
                                       nmask, HEAD_DIM, HAS_TAIL)
        _store_dw_partial(PW, seg_rows, start, dw, dw_t, offs_d, offs_t, cmask_d, cmask_t,
                          BLOCK_N, DH, DT, HEAD_DIM, PAD_D, HAS_TAIL)
    _store_rows(DK + drows + offs_d[None, :], dk.to(dtype), nmask, cmask_d, PAD_D)
    if HAS_TAIL:
        tl.store(DK + drows + offs_t[None, :], dk_t.to(dtype), mask=tmask)


@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_bwd_dkdv_kernel(
    QKV, KVX, DO, DQKV, DKVX, LSE, DELTA, RQ, RK, WQ, WK, PWK,
    s_b, s_n, s_3, s_h, x_b, x_n, x_2, x_h, do_b, do_n, g_b, g_n, g_3, g_h, y_b, y_n, y_2, y_h,
    H, N, M, N_KEY, M_KEY, BH_KEY, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, DH: tl.constexpr, DT: tl.constexpr, PAD_D: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_NORM: tl.constexpr, HAS_EXTRA: tl.constexpr, ALIGN8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid (cdiv(N, BLOCK_N) + cdiv(M, BLOCK_N), B*H): one key block, self keys first, then the
    # extra keys of kv_extra; dk, dv go to dqkv[:, :, 1:3] or to d(kv_extra).
    s_b, s_n, s_3, s_h = _a8(s_b, ALIGN8), _a8(s_n, ALIGN8), _a8(s_3, ALIGN8), _a8(s_h, ALIGN8)
    x_b, x_n, x_2, x_h = _a8(x_b, ALIGN8), _a8(x_n, ALIGN8), _a8(x_2, ALIGN8), _a8(x_h, ALIGN8)
    do_b, do_n = _a8(do_b, ALIGN8), _a8(do_n, ALIGN8)
    g_b, g_n, g_3, g_h = _a8(g_b, ALIGN8), _a8(g_n, ALIGN8), _a8(g_3, ALIGN8), _a8(g_h, ALIGN8)
    y_b, y_n, y_2, y_h = _a8(y_b, ALIGN8), _a8(y_n, ALIGN8), _a8(y_2, ALIGN8), _a8(y_h, ALIGN8)
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    nb_self = (N + BLOCK_N - 1) // BLOCK_N
    Q = QKV + b * s_b + h * s_h
    DOb = DO + b * do_b + h * HEAD_DIM
    LSEb = LSE + bh * N
    DELTAb = DELTA + bh * N
    RQb = RQ + bh * N
    RKb = RK + bh * (N + M)
    nq16 = (N + 15) // 16
    PW = PWK + bh * (nq16 + (M + 15) // 16) * HEAD_DIM  # (B*H, cdiv(N,16) + cdiv(M,16), D)
    K = Q + s_3
    DK = DQKV + b * g_b + h * g_h + g_3
    if HAS_EXTRA:
        # Scalar selects rather than two inlined copies of the block (which would double the
        # shared memory): program ids past the self blocks take kv_extra's keys.
        is_x = pid >= nb_self
        KX = KVX + b * x_b + h * x_h
        DKX = DKVX + b * y_b + h * y_h
        _dkdv_block(tl.where(is_x, KX, K), tl.where(is_x, KX + x_2, K + s_3),
                    tl.where(is_x, DKX, DK), tl.where(is_x, DKX + y_2, DK + g_3),
                    RKb + tl.where(is_x, N, 0), PW + tl.where(is_x, nq16, 0) * HEAD_DIM,
                    tl.where(is_x, x_n, s_n), tl.where(is_x, y_n, g_n),
                    tl.where(is_x, pid - nb_self, pid) * BLOCK_N, tl.where(is_x, M, N),
                    tl.where(is_x, (M + 15) // 16, nq16),
                    Q, DOb, LSEb, DELTAb, RQb, WQ, WK, s_n, do_n, N, qk_scale, sm_scale,
                    HEAD_DIM, DH, DT, PAD_D, HAS_TAIL, HAS_NORM, BLOCK_M, BLOCK_N)
    else:
        _dkdv_block(K, K + s_3, DK, DK + g_3, RKb, PW, s_n, g_n, pid * BLOCK_N, N, nq16,
                    Q, DOb, LSEb, DELTAb, RQb, WQ, WK, s_n, do_n, N, qk_scale, sm_scale,
                    HEAD_DIM, DH, DT, PAD_D, HAS_TAIL, HAS_NORM, BLOCK_M, BLOCK_N)


# ----------------------------------------------------------------------------------------------
# launch configurations and autotuning
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages).  The forward keeps a BLOCK_M q tile resident and
# streams BLOCK_N keys; dQ keeps BLOCK_M queries and streams BLOCK_N keys; dK/dV keeps BLOCK_N keys
# and streams BLOCK_M queries.  The usual Hopper space, trimmed so that tuning one shape costs a
# handful of compiles.
# (32, 64): at batch 1 a short sequence gives few q blocks, and the grid, not the math, sets the time.
_FWD_CONFIGS = [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3),
                (32, 64, 4, 3)]
_DQ_CONFIGS = [(128, 64, 8, 3), (128, 32, 4, 3), (128, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3)]
_DKDV_CONFIGS = [(64, 128, 8, 3), (32, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3)]
# Untuned defaults (set_attention_autotune(False)), by tile width: the H100's picks at D = 64 and 128.
_DEFAULT = {
    "fwd": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (128, 64, 8, 3)},
    "dq": {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (128, 64, 8, 3)},
    "dkdv": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 128, 8, 3)},
}
_INTERPRET_BLOCKS = (16, 16)  # tiny tiles: the interpreter is slow and test shapes are tiny


def _cfg(c):
    bm, bn, w, s = c
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


def _prune(resident: str):
    """Drops configs that spill at large head dims or over-tile short sequences."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        width = args["DH"] + (args["DT"] if args["HAS_TAIL"] else 0)
        span = max(16, args["N_KEY"])
        keep = []
        for c in configs:
            res = c.kwargs[resident]
            if width > 64 and res * width > 128 * 64 and c.num_warps < 8:
                continue  # a 128 x 128 fp32 accumulator needs 8 warps
            if res > span and res > 64:
                continue
            keep.append(c)
        return keep or configs[:1]
    return prune


_KEY = ["N_KEY", "M_KEY", "BH_KEY", "HEAD_DIM", "HAS_NORM", "HAS_EXTRA"]


def _tuned(kernel, configs, resident):
    kw = dict(configs=[_cfg(c) for c in configs], key=_KEY,
              prune_configs_by={"early_config_prune": _prune(resident)})
    try:  # timings kept in Triton's disk cache across processes (triton >= 3.2)
        return triton.autotune(**kw, cache_results=True)(kernel)
    except TypeError:
        return triton.autotune(**kw)(kernel)


_fwd_tuned = _tuned(_attn_fwd_kernel, _FWD_CONFIGS, "BLOCK_M")
_dq_tuned = _tuned(_attn_bwd_dq_kernel, _DQ_CONFIGS, "BLOCK_M")
_dkdv_tuned = _tuned(_attn_bwd_dkdv_kernel, _DKDV_CONFIGS, "BLOCK_N")
_KERNELS = {"fwd": (_attn_fwd_kernel, _fwd_tuned), "dq": (_attn_bwd_dq_kernel, _dq_tuned),
            "dkdv": (_attn_bwd_dkdv_kernel, _dkdv_tuned)}

_chosen: dict[tuple, triton.Config] = {}  # (kernel, autotuner key) -> the config it picked
_timings: dict[tuple, dict[str, float]] = {}  # the autotuner's median ms per config, for benchmarks


def best_configs(timings: bool = False) -> dict[str, object]:
    """The configs picked so far per kernel and key (with the tuning timings, in ms, if asked)."""
    if timings:
        return {str(k): {"best": str(v), "timings_ms": _timings.get(k, {})} for k, v in _chosen.items()}
    return {str(k): str(v) for k, v in _chosen.items()}


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
# Launch overhead matters at DiT sizes (a (64, 12, 256, 64) forward is ~60 us on an H100), so
# everything that depends only on shapes, strides and dtypes is computed once per signature into
# a _Plan; a call then allocates its outputs and launches the compiled kernels directly.

# How a head dim that is not a power of two is tiled: "split" = a power-of-two head part plus a
# masked tail of >= _TAIL_MIN columns (72 -> 64 + 16), "pad" = one masked power-of-two tile
# (72 -> 128).
_D_MODE = os.environ.get("DIFFAE_ATTN_DMODE", "pad")
_TAIL_MIN = int(os.environ.get("DIFFAE_ATTN_TAIL_MIN", "16"))


def head_geometry(D: int) -> tuple[int, int, bool]:
    """(DH, DT, HAS_TAIL): D is covered by a power-of-two tile DH and, in split mode, a tail of DT."""
    if D & (D - 1) == 0:
        return D, 16, False
    if _D_MODE != "split" or not _INTERPRET:  # split: wrong results on H100 + triton 3.6, see above
        return triton.next_power_of_2(D), 16, False
    DH = 1 << (D.bit_length() - 1)
    return DH, max(_TAIL_MIN, triton.next_power_of_2(D - DH)), True


def supports(qkv: torch.Tensor, kv_extra: torch.Tensor | None = None,
             q_norm_weight: torch.Tensor | None = None) -> bool:
    """Whether the kernels handle these inputs; diffae.ops falls back to SDPA when not.

    QK-norm with a head dim that is not a power of two (D = 72) is exact under the interpreter but
    failed its tolerance on an H100 (triton 3.6; cause not found yet), so on CUDA it goes to SDPA.
    """
    if qkv.dim() != 5 or qkv.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not (qkv.is_cuda or (_INTERPRET and qkv.device.type == "cpu")):
        return False
    B, N, three, H, D = qkv.shape
    if three != 3 or D % 8 or not 16 <= D <= 128 or N == 0 or B * H == 0 or B * H > 65535:
        return False
    if qkv.stride(-1) != 1:
        return False
    if q_norm_weight is not None and D & (D - 1) and qkv.is_cuda:
        return False
    if kv_extra is not None:
        if kv_extra.dtype != qkv.dtype or kv_extra.device != qkv.device or kv_extra.stride(-1) != 1:
            return False
    return True


def _bucket(n: int) -> int:
    return 0 if n == 0 else max(16, triton.next_power_of_2(n))


class _Plan:
    """Shape-dependent launch parameters of one (qkv, kv_extra, norm) signature."""

    def __init__(self, qkv, has_norm, kv_extra, w_dtype):
        B, N, _, H, D = qkv.shape
        self.B, self.N, self.H, self.D = B, N, H, D
        self.has_norm = has_norm
        self.has_extra = kv_extra is not None and kv_extra.shape[1] > 0
        self.M = M = kv_extra.shape[1] if self.has_extra else 0
        self.dtype, self.device = qkv.dtype, qkv.device
        DH, DT, HAS_TAIL = head_geometry(D)
        self.DH = DH
        self.meta = dict(HEAD_DIM=D, DH=DH, DT=DT, PAD_D=DH > D, HAS_TAIL=HAS_TAIL,
                         HAS_NORM=has_norm, HAS_EXTRA=self.has_extra)
        self.qs = tuple(qkv.stride()[:4])
        self.xs = tuple(kv_extra.stride()[:4]) if self.has_extra else (0, 0, 0, 0)
        # Strides in multiples of 8 elements (always, for D % 8 == 0 and a packed projection)
        # let the kernels promise 16-byte alignment; outputs are contiguous, hence aligned too.
        self.meta["ALIGN8"] = all(v % 8 == 0 for v in self.qs + self.xs)
        # Outputs are allocated contiguous: (B, N, H*D), (B, N, 3, H, D), (B, M, 2, H, D).
        self.os = (N * H * D, H * D)
        self.gs = (N * 3 * H * D, 3 * H * D, H * D, D)
        self.ys = (M * 2 * H * D, 2 * H * D, H * D, D)
        self.scalars = (H, N, M, _bucket(N), _bucket(M), _bucket(B * H))
        self.qk_scale = _LOG2E / math.sqrt(D)
        self.sm_scale = 1.0 / math.sqrt(D)
        self.tune_key = (*self.scalars[3:], D, has_norm, self.has_extra, qkv.dtype, w_dtype,
                         qkv.device.index)
        self.launch: dict[str, tuple] = {}  # kernel -> (grid, kwargs) once its config is known

    def grid(self, which: str, bm: int, bn: int) -> tuple[int, int]:
        if which == "dkdv":
            return (triton.cdiv(self.N, bn) + triton.cdiv(self.M, bn), self.B * self.H)
        return (triton.cdiv(self.N, bm), self.B * self.H)

    def run(self, which: str, args: tuple) -> None:
        kernel, tuned = _KERNELS[which]
        got = self.launch.get(which)
        if got is not None:
            kernel[got[0]](*args, **got[1])
            return
        key = (which, *self.tune_key)
        if _INTERPRET:
            cfg = triton.Config(dict(zip(("BLOCK_M", "BLOCK_N"), _INTERPRET_BLOCKS)))
            kw = {**self.meta, **cfg.kwargs}
        elif attention_autotune() and key not in _chosen:
            tuned[lambda m: self.grid(which, m["BLOCK_M"], m["BLOCK_N"])](*args, **self.meta)
            cfg = getattr(tuned, "best_config", None)
            if cfg is None:  # an autotuner without best_config: let it dispatch every time
                return
            _chosen[key] = cfg
            timings = getattr(tuned, "configs_timings", None) or {}
            _timings[key] = {str(c): (t[0] if isinstance(t, (list, tuple)) else t)
                             for c, t in timings.items()}
            self.launch[which] = (self.grid(which, cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]),
                                  {**self.meta, **cfg.all_kwargs()})
            return
        else:
            cfg = _chosen.get(key) if attention_autotune() else None
            if cfg is None:
                cfg = _cfg(_DEFAULT[which][self.DH])
            kw = {**self.meta, **cfg.all_kwargs()}
        grid = self.grid(which, cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"])
        self.launch[which] = (grid, kw)
        kernel[grid](*args, **kw)


_plans: dict[tuple, _Plan] = {}


def _plan(qkv, q_norm_weight, kv_extra) -> _Plan:
    key = (qkv.shape, qkv.stride(), qkv.dtype, qkv.device,
           None if q_norm_weight is None else q_norm_weight.dtype,
           None if kv_extra is None else (kv_extra.shape, kv_extra.stride()))
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) > 512:
            _plans.clear()
        plan = _plans[key] = _Plan(qkv, q_norm_weight is not None, kv_extra,
                                   torch.float32 if q_norm_weight is None else q_norm_weight.dtype)
    return plan


def attention_forward(qkv, q_norm_weight, k_norm_weight, kv_extra, eps):
    """(o (B, N, H*D), lse (B, H, N) fp32 in log2 units, rq (B, H, N), rk (B, H, N+M)).

    rq and rk are the RMS-norm rstd of q and k rows (None without the norm), kept for the backward.
    """
    p = _plan(qkv, q_norm_weight, kv_extra)
    B, N, H, D, M = p.B, p.N, p.H, p.D, p.M
    o = torch.empty((B, N, H * D), device=p.device, dtype=p.dtype)
    lse = torch.empty((B, H, N), device=p.device, dtype=torch.float32)
    kvx = kv_extra if p.has_extra else qkv
    if p.has_norm:
        wq, wk = q_norm_weight.contiguous(), k_norm_weight.contiguous()
        rq = torch.empty((B, H, N), device=p.device, dtype=torch.float32)
        rk = torch.empty((B, H, N + M), device=p.device, dtype=torch.float32)
        br = 16 if _INTERPRET else 64
        _k_rstd_kernel[(triton.cdiv(N, br) + triton.cdiv(M, br), B * H)](
            qkv, kvx, rk, *p.qs, p.xs[0], p.xs[1], p.xs[3], H, N, M, eps,
            HEAD_DIM=D, DP=triton.next_power_of_2(D), BLOCK_R=br, HAS_EXTRA=p.has_extra, num_warps=4)
    else:
        wq = wk = rq = rk = lse  # never read: HAS_NORM is a constexpr
    p.run("fwd", (qkv, kvx, o, lse, rq, rk, wq, wk, *p.qs, *p.xs, *p.os, *p.scalars, p.qk_scale, eps))
    if not p.has_norm:
        rq = rk = None
    return o, lse, rq, rk


def attention_backward(do, qkv, q_norm_weight, k_norm_weight, kv_extra, o, lse, rq, rk, eps):
    """(dqkv (B, N, 3, H, D), d(kv_extra), d(wq), d(wk)); None for the absent ones."""
    p = _plan(qkv, q_norm_weight, kv_extra)
    B, N, H, D, M = p.B, p.N, p.H, p.D, p.M
    dev = p.device
    if do.stride(-1) != 1 or do.stride(0) % 8 or do.stride(1) % 8:
        do = do.contiguous()  # e.g. the expanded ones of a .sum() backward
    dqkv = torch.empty(qkv.shape, device=dev, dtype=p.dtype)
    delta = torch.empty((B, H, N), device=dev, dtype=torch.float32)
    kvx = kv_extra if p.has_extra else qkv
    dkvx = torch.empty(kv_extra.shape, device=dev, dtype=p.dtype) if p.has_extra else dqkv
    if p.has_norm:
        wq, wk = q_norm_weight.contiguous(), k_norm_weight.contiguous()
        pwq = torch.empty((B * H, triton.cdiv(N, 16), D), device=dev, dtype=torch.float32)
        pwk = torch.empty((B * H, triton.cdiv(N, 16) + triton.cdiv(M, 16), D), device=dev,
                          dtype=torch.float32)
    else:
        wq = wk = pwq = pwk = rq = rk = lse
    ds = (do.stride(0), do.stride(1))
    tail = (*p.scalars, p.qk_scale, p.sm_scale)
    p.run("dq", (qkv, kvx, o, do, dqkv, lse, delta, rq, rk, wq, wk, pwq,
                 *p.qs, *p.xs, *p.os, *ds, p.gs[0], p.gs[1], p.gs[3], *tail))
    p.run("dkdv", (qkv, kvx, do, dqkv, dkvx, lse, delta, rq, rk, wq, wk, pwk,
                   *p.qs, *p.xs, *ds, *p.gs, *p.ys, *tail))
    dwq = dwk = None
    if p.has_norm:
        dwq = pwq.sum((0, 1)).to(q_norm_weight.dtype)
        dwk = pwk.sum((0, 1)).to(k_norm_weight.dtype)
    if not p.has_extra:
        dkvx = None if kv_extra is None else torch.zeros_like(kv_extra)  # M == 0
    return dqkv, dkvx, dwq, dwk


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------
# Optional outputs are not expressible in an op schema: absent ones are empty tensors.


def _or_empty(t, like, dtype):
    return t if t is not None else torch.empty(0, device=like.device, dtype=dtype)


@torch.library.custom_op("diffae_triton::attention", mutates_args=())
def _attention_op(
    qkv: torch.Tensor, q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None,
    kv_extra: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    o, lse, rq, rk = attention_forward(qkv, q_norm_weight, k_norm_weight, kv_extra, eps)
    return o, lse, _or_empty(rq, qkv, torch.float32), _or_empty(rk, qkv, torch.float32)


@_attention_op.register_fake
def _attention_fake(qkv, q_norm_weight, k_norm_weight, kv_extra, eps):
    B, N, _, H, D = qkv.shape
    M = 0 if kv_extra is None else kv_extra.shape[1]
    o = qkv.new_empty((B, N, H * D))
    lse = qkv.new_empty((B, H, N), dtype=torch.float32)
    if q_norm_weight is None:
        rq = qkv.new_empty((0,), dtype=torch.float32)
        rk = qkv.new_empty((0,), dtype=torch.float32)
    else:
        rq = qkv.new_empty((B, H, N), dtype=torch.float32)
        rk = qkv.new_empty((B, H, N + M), dtype=torch.float32)
    return o, lse, rq, rk


@torch.library.custom_op("diffae_triton::attention_backward", mutates_args=())
def _attention_backward_op(
    do: torch.Tensor, qkv: torch.Tensor, q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None, kv_extra: torch.Tensor | None, o: torch.Tensor,
    lse: torch.Tensor, rq: torch.Tensor, rk: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if q_norm_weight is None:
        rq = rk = None
    dqkv, dkvx, dwq, dwk = attention_backward(do, qkv, q_norm_weight, k_norm_weight, kv_extra, o,
                                              lse, rq, rk, eps)
    return (dqkv, _or_empty(dkvx, qkv, qkv.dtype), _or_empty(dwq, qkv, qkv.dtype),
            _or_empty(dwk, qkv, qkv.dtype))


@_attention_backward_op.register_fake
def _attention_backward_fake(do, qkv, q_norm_weight, k_norm_weight, kv_extra, o, lse, rq, rk, eps):
    dqkv = qkv.new_empty(qkv.shape)
    dkvx = qkv.new_empty((0,)) if kv_extra is None else kv_extra.new_empty(kv_extra.shape)
    if q_norm_weight is None:
        dwq = qkv.new_empty((0,))
        dwk = qkv.new_empty((0,))
    else:
        dwq = q_norm_weight.new_empty(q_norm_weight.shape)
        dwk = k_norm_weight.new_empty(k_norm_weight.shape)
    return dqkv, dkvx, dwq, dwk


def _attention_setup(ctx, inputs, output):
    qkv, q_norm_weight, k_norm_weight, kv_extra, eps = inputs
    o, lse, rq, rk = output
    ctx.save_for_backward(qkv, q_norm_weight, k_norm_weight, kv_extra, o, lse, rq, rk)
    ctx.eps = eps


def _grads(dqkv, dkvx, dwq, dwk, q_norm_weight, kv_extra):
    has_norm = q_norm_weight is not None
    return (dqkv, dwq if has_norm else None, dwk if has_norm else None,
            dkvx if kv_extra is not None else None, None)


def _attention_grad(ctx, do, _dlse, _drq, _drk):
    qkv, q_norm_weight, k_norm_weight, kv_extra, o, lse, rq, rk = ctx.saved_tensors
    if do is None:
        return None, None, None, None, None
    dqkv, dkvx, dwq, dwk = torch.ops.diffae_triton.attention_backward(
        do, qkv, q_norm_weight, k_norm_weight, kv_extra, o, lse, rq, rk, ctx.eps)
    return _grads(dqkv, dkvx, dwq, dwk, q_norm_weight, kv_extra)


_attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)


class _EagerAttention(torch.autograd.Function):
    """The same forward and backward as the registered op, minus the custom-op dispatch.

    In eager mode the Python custom-op machinery (schema checks, boxing, its autograd wrapper)
    costs ~0.1-0.3 ms per call on top of ~0.06 ms kernels at DiT sizes; under torch.compile the
    registered op is used instead, so compile and CUDA graphs still see one opaque op.
    """

    @staticmethod
    def forward(ctx, qkv, q_norm_weight, k_norm_weight, kv_extra, eps):
        o, lse, rq, rk = attention_forward(qkv, q_norm_weight, k_norm_weight, kv_extra, eps)
        ctx.save_for_backward(qkv, q_norm_weight, k_norm_weight, kv_extra, o, lse, rq, rk)
        ctx.eps = eps
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, q_norm_weight, k_norm_weight, kv_extra, o, lse, rq, rk = ctx.saved_tensors
        dqkv, dkvx, dwq, dwk = attention_backward(do, qkv, q_norm_weight, k_norm_weight, kv_extra,
                                                  o, lse, rq, rk, ctx.eps)
        return _grads(dqkv, dkvx, dwq, dwk, q_norm_weight, kv_extra)


# ----------------------------------------------------------------------------------------------
# public function (diffae.ops.attention dispatches here; shapes are checked there)
# ----------------------------------------------------------------------------------------------


def attention(qkv: torch.Tensor, q_norm_weight: torch.Tensor | None = None,
              k_norm_weight: torch.Tensor | None = None, kv_extra: torch.Tensor | None = None,
              eps: float = 1e-6) -> torch.Tensor:
    """softmax(q^ k^T / sqrt(D)) v from packed qkv (B, N, 3, H, D) to (B, N, H*D)."""
    if torch.compiler.is_compiling():
        return torch.ops.diffae_triton.attention(qkv, q_norm_weight, k_norm_weight, kv_extra, float(eps))[0]
    if torch.is_grad_enabled() and (
            qkv.requires_grad or (kv_extra is not None and kv_extra.requires_grad)
            or (q_norm_weight is not None and (q_norm_weight.requires_grad or k_norm_weight.requires_grad))):
        return _EagerAttention.apply(qkv, q_norm_weight, k_norm_weight, kv_extra, float(eps))
    return attention_forward(qkv, q_norm_weight, k_norm_weight, kv_extra, eps)[0]
