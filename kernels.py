"""Attention for longvila: the math in PyTorch, FlashAttention-2 in Triton, and the one interface everyone calls.

    python -m pytest -q tests/test_kernels.py         # CPU: the Triton kernels run in Triton's interpreter
    python bench.py kernels                           # GPU: TFLOP/s beside cuDNN, flash-attn-4 and SDPA

What ring attention (mmsp.py) and the model (longvila.py) call:

    out, lse = attention_forward(q, k, v, causal=True)            # lse: log-sum-exp of each query's scores
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, causal=True)
    out = flash_attn_func(q, k, v, causal=True)                   # differentiable: the two above
    configure(backend="auto", fused_ops=True)                     # once, at start (train.py --attn_backend)

Shapes: q (B, Tq, H, D), k and v (B, Tk, Hkv, D), out like q, lse (B, H, Tq) fp32 natural log. GQA: query head h
reads KV head h // (H / Hkv), by index, never by copying. Causal: the queries are the LAST Tq positions, query i
sees key j iff j <= i + Tk - Tq. A query that sees no key gets out 0 and lse -inf: the identity of the LSE merge.

Ring attention (README.md, "How the parts fit") needs the lse, so partials over key blocks merge exactly, and a
backward from the GLOBAL out and lse of the whole ring, not those of one key block.

Sections:
  1. the math: the PyTorch twin (blockwise online softmax; the backward recomputes P from the lse)
  2. FlashAttention-2 in Triton (Dao, arXiv 2307.08691): the forward, then the backward (dK/dV, then dQ)
  3. the interface: backends, attention_forward / attention_backward / flash_attn_func, configure
  --- below: the fast path, same signatures: launch configurations and autotuning, program order in L2 waves,
  TMA descriptors, the cuDNN and flash-attn-4 backends, fused RMSNorm / RoPE / SwiGLU for the decoder
"""
import contextlib
import functools
import math
import os
import warnings

import torch

try:  # triton is optional: without it (or without a GPU) the PyTorch twin does the work
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is not installed
    triton = tl = None
    HAS_TRITON = False

# Read once, when the kernels are defined: conftest.py sets it on CPU-only machines before importing us.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e)), and exp2 is the GPU's fast exponential


# -----------------------------------------------------------------------------
# 1. the math: the PyTorch twin, blockwise over keys in fp32 (the CPU path, and the reference the kernels follow)
#
#    S = scale * Q K^T      P = softmax(S) = exp(S - lse)      O = P V
#    dV = P^T dO     dP = dO V^T     delta = rowsum(dO * O)     dS = P * (dP - delta)     dQ = scale dS K
#    dK = scale dS^T Q
#
# The forward keeps a running max m, a running sum l of exp(S - m) and a running sum of exp(S - m) V over key
# blocks, rescaling both when m grows (the online softmax): the (Tq, Tk) matrix never exists whole.

def _torch_forward(q, k, v, causal, scale, out_fp32, block=256):
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G, diff = H // Hkv, Tk - Tq                                    # query heads per KV head; causal offset
    qf = q.float().view(B, Tq, Hkv, G, D).permute(0, 2, 3, 1, 4)  # (B, Tq, H, D) -> (B, Hkv, G, Tq, D)
    kf = k.float().permute(0, 2, 1, 3).unsqueeze(2)                # (B, Tk, Hkv, D) -> (B, Hkv, 1, Tk, D)
    vf = v.float().permute(0, 2, 1, 3).unsqueeze(2)                # (B, Hkv, 1, Tk, D)
    m = qf.new_full((B, Hkv, G, Tq), float("-inf"))                # running max of the scores
    l = qf.new_zeros((B, Hkv, G, Tq))                              # running sum of exp(score - m)
    acc = qf.new_zeros((B, Hkv, G, Tq, D))                         # running sum of exp(score - m) * v
    rows = torch.arange(Tq, device=q.device)                       # (Tq,)
    for n0 in range(0, Tk, block):
        n1 = min(n0 + block, Tk)
        if causal and n0 > Tq - 1 + diff:
            break                                                  # this key block lies in every query's future
        s = (qf @ kf[..., n0:n1, :].transpose(-1, -2)) * scale    # (B, Hkv, G, Tq, n)
        if causal:
            cols = torch.arange(n0, n1, device=q.device)           # (n,)
            s = s.masked_fill(cols[None, :] > rows[:, None] + diff, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))                       # (B, Hkv, G, Tq)
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # a row with no key yet: p = 0
        p = torch.exp(s - m_safe[..., None])                       # (B, Hkv, G, Tq, n)
        alpha = torch.exp(m - m_safe)                              # rescales the sums so far
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + p @ vf[..., n0:n1, :]       # (B, Hkv, G, Tq, D)
        m = m_new
    empty = l == 0                                                 # rows that saw no key
    out = acc / torch.where(empty, torch.ones_like(l), l)[..., None]
    lse = torch.where(empty, torch.full_like(l, float("-inf")), m + torch.log(l))  # (B, Hkv, G, Tq)
    out = out.permute(0, 3, 1, 2, 4).reshape(B, Tq, H, D)          # (B, Hkv, G, Tq, D) -> (B, Tq, H, D)
    return out.to(torch.float32 if out_fp32 else q.dtype), lse.reshape(B, H, Tq)  # h = hkv * G + g


def _torch_backward(dout, q, k, v, out, lse, causal, scale, grad_fp32, block=256):
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G, diff = H // Hkv, Tk - Tq
    qf = q.float().view(B, Tq, Hkv, G, D).permute(0, 2, 3, 1, 4)     # (B, Hkv, G, Tq, D)
    dof = dout.float().view(B, Tq, Hkv, G, D).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, Tq, D)
    of = out.float().view(B, Tq, Hkv, G, D).permute(0, 2, 3, 1, 4)    # (B, Hkv, G, Tq, D)
    kf = k.float().permute(0, 2, 1, 3).unsqueeze(2)                   # (B, Hkv, 1, Tk, D)
    vf = v.float().permute(0, 2, 1, 3).unsqueeze(2)                   # (B, Hkv, 1, Tk, D)
    delta = (dof * of).sum(-1)                                        # (B, Hkv, G, Tq) rowsum(dO * O)
    lse_ = lse.float().reshape(B, Hkv, G, Tq)                         # (B, H, Tq) -> (B, Hkv, G, Tq)
    lse_ = torch.where(lse_ == float("-inf"), torch.full_like(lse_, float("inf")), lse_)  # empty row: P = 0
    rows = torch.arange(Tq, device=q.device)
    dq = torch.zeros_like(qf)                                         # (B, Hkv, G, Tq, D)
    dk, dv = qf.new_zeros((B, Hkv, Tk, D)), qf.new_zeros((B, Hkv, Tk, D))
    for n0 in range(0, Tk, block):
        n1 = min(n0 + block, Tk)
        if causal and n0 > Tq - 1 + diff:
            break
        kb, vb = kf[..., n0:n1, :], vf[..., n0:n1, :]                 # (B, Hkv, 1, n, D)
        s = (qf @ kb.transpose(-1, -2)) * scale                       # (B, Hkv, G, Tq, n)
        if causal:
            cols = torch.arange(n0, n1, device=q.device)
            s = s.masked_fill(cols[None, :] > rows[:, None] + diff, float("-inf"))
        p = torch.exp(s - lse_[..., None])                            # (B, Hkv, G, Tq, n) from the GLOBAL lse
        dv[:, :, n0:n1] = torch.einsum("bkgtn,bkgtd->bknd", p, dof)   # P^T dO summed over the group's heads
        dp = dof @ vb.transpose(-1, -2)                               # (B, Hkv, G, Tq, n)
        ds = p * (dp - delta[..., None])                              # (B, Hkv, G, Tq, n)
        dq += (ds @ kb) * scale                                       # (B, Hkv, G, Tq, D)
        dk[:, :, n0:n1] = torch.einsum("bkgtn,bkgtd->bknd", ds, qf) * scale
    gdt = torch.float32 if grad_fp32 else q.dtype
    dq = dq.permute(0, 3, 1, 2, 4).reshape(B, Tq, H, D)               # (B, Hkv, G, Tq, D) -> (B, Tq, H, D)
    return dq.to(gdt), dk.permute(0, 2, 1, 3).to(gdt), dv.permute(0, 2, 1, 3).to(gdt)  # (B, Tk, Hkv, D)


# -----------------------------------------------------------------------------
# 2. FlashAttention-2 in Triton
#
# The kernels see a contiguous (B, T, heads, D) tensor as a (B*T, heads*D) matrix: row b*T + t, columns h*D ..
# h*D+D-1 hold token t of batch b, head h. Scores live in the log2 domain (S * scale * log2 e) for the fast exp2.
# A forward program owns BLOCK_M queries of one head and streams key blocks past them; blocks all its queries see
# need no mask (FlashAttention-2's split: most of the work), only diagonal and ragged ones are masked.
# _program_order, _load_tile and the launch configurations are the fast path's (below the line).

if HAS_TRITON:
    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, Qd, Kd, Vd, Tq, Tk, H, GROUP, scale2, WAVE, MIN_WAVE, TQ_KEY, TK_KEY, TMA_OK,
                    D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    USE_TMA: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        """One program: BLOCK_M queries of one (batch, head) against every key they see -> out, lse."""
        b, hk, g, j, n_blocks = _program_order(tl.program_id(0), Tq, H // GROUP, GROUP, WAVE, MIN_WAVE, BLOCK_M)
        h = hk * GROUP + g                                       # GQA: query head h reads KV head hk
        m0 = (n_blocks - 1 - j) * BLOCK_M                        # the longest rows (most causal work) first
        offs_m = m0 + tl.arange(0, BLOCK_M)                      # (BM,) query rows
        diff = Tk - Tq                                           # query i sees key j iff j <= i + diff
        # the Q tile: loaded once, it stays in registers for the whole loop over keys
        q = _load_tile(Q, Qd, b * Tq + m0, Tq - m0, h * D, H * D, BLOCK_M, D, True, USE_TMA, UPCAST)  # (BM, D)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)    # running max of the scores (log2 units)
        l_i = tl.zeros([BLOCK_M], tl.float32)                  # running sum of exp2(score - m_i)
        acc = tl.zeros([BLOCK_M, D], tl.float32)               # running sum of exp2(score - m_i) * v
        # keys [0, full): seen by every row of the tile, no mask; [full, seen): the diagonal / ragged end, masked
        full, seen = _key_range(m0, Tq, Tk, diff, CAUSAL, BLOCK_M, BLOCK_N)
        kv_row, kv_col, kv_stride = b * Tk, hk * D, (H // GROUP) * D   # this head's keys in the K/V matrices
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, Kd, Vd, kv_row, kv_col, kv_stride, 0, full, offs_m, Tk,
                                    diff, scale2, D, BLOCK_N, False, CAUSAL, USE_TMA, UPCAST, DOT_PREC)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, Kd, Vd, kv_row, kv_col, kv_stride, full, seen, offs_m, Tk,
                                    diff, scale2, D, BLOCK_N, True, CAUSAL, USE_TMA, UPCAST, DOT_PREC)
        # normalise; a row that saw no key keeps l = 0: out 0, lse -inf
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]                                                   # (BM, D)
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # natural log
        rows = (b * Tq + offs_m).to(tl.int64)
        tl.store(O + rows[:, None] * (H * D) + h * D + tl.arange(0, D)[None, :], out.to(O.dtype.element_ty),
                 mask=(offs_m < Tq)[:, None])
        tl.store(LSE + (b * H + h).to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)

    @triton.jit
    def _fwd_blocks(acc, l_i, m_i, q, K, V, Kd, Vd, row0, col, stride, lo, hi, offs_m, Tk, diff, scale2,
                    D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                    USE_TMA: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        """The online softmax over key blocks [lo, hi): FlashAttention's inner loop."""
        offs_n = tl.arange(0, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            k = _load_tile(K, Kd, row0 + n0, Tk - n0, col, stride, BLOCK_N, D, MASKED, USE_TMA, UPCAST)  # (BN, D)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)                      # (BM, BN) raw scores
            if MASKED:  # keys past Tk, and (causal) keys in a query's future
                keep = (n0 + offs_n < Tk)[None, :]
                if CAUSAL:
                    keep = keep & ((n0 + offs_n)[None, :] <= offs_m[:, None] + diff)
                s = tl.where(keep, s * scale2, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))                                 # (BM,)
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row with no key yet: p stays 0
                p = tl.math.exp2(s - m_sub[:, None])                                  # (BM, BN)
            else:       # every key visible: the scale goes into the exponent's fused multiply-add
                m_new = tl.maximum(m_i, tl.max(s, 1) * scale2)
                m_sub = m_new
                p = tl.math.exp2(s * scale2 - m_sub[:, None])                         # (BM, BN)
            alpha = tl.math.exp2(m_i - m_sub)                                         # (BM,) rescales the past
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_tile(V, Vd, row0 + n0, Tk - n0, col, stride, BLOCK_N, D, MASKED, USE_TMA, UPCAST)  # (BN, D)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)  # (BM, D)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _key_range(m0, Tq, Tk, diff, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """(full, seen): keys [0, full) in whole blocks are seen by every row m0.. of the tile, [0, seen) by one.
        Row i sees key j iff j <= i + diff."""
        if CAUSAL:
            full = (tl.minimum(tl.maximum(diff + m0 + 1, 0), Tk) // BLOCK_N) * BLOCK_N
            seen = tl.minimum(tl.maximum(diff + tl.minimum(m0 + BLOCK_M, Tq), 0), Tk)
        else:
            full = (Tk // BLOCK_N) * BLOCK_N
            seen = Tk
        return full, seen

    # The backward recomputes P = exp2(S * scale2 - lse2) from the saved lse (lse2 = lse * log2 e) and runs in
    # two kernels: one program per KEY block accumulates dK and dV over the query blocks that see it (summed over
    # the GQA group's query heads: no atomics, no KV copies), then one program per QUERY block accumulates dQ.

    @triton.jit
    def _bwd_preprocess(O, DO, LSE, DELTA, LSE2, Tq, H, D: tl.constexpr, BLOCK_M: tl.constexpr):
        """delta = rowsum(dO * O) and lse2 = lse * log2 e, with -inf -> +inf (a row that saw nothing: P = 0)."""
        bh, offs_m = tl.program_id(0), tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        b, h = bh // H, bh % H
        ptrs = (b * Tq + offs_m).to(tl.int64)[:, None] * (H * D) + h * D + tl.arange(0, D)[None, :]
        o = tl.load(O + ptrs, mask=(offs_m < Tq)[:, None], other=0.0).to(tl.float32)       # (BM, D)
        do = tl.load(DO + ptrs, mask=(offs_m < Tq)[:, None], other=0.0).to(tl.float32)     # (BM, D)
        row = bh.to(tl.int64) * Tq + offs_m
        lse = tl.load(LSE + row, mask=offs_m < Tq, other=float("-inf"))
        tl.store(DELTA + row, tl.sum(o * do, 1), mask=offs_m < Tq)
        tl.store(LSE2 + row, tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634), mask=offs_m < Tq)

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV, Qd, DOd, Tq, Tk, H, GROUP, scale, scale2, WAVE, MIN_WAVE,
                         TQ_KEY, TK_KEY, TMA_OK, D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        """One program: dK, dV of BLOCK_N keys of one (batch, KV head), over the GROUP query heads that read them."""
        Hkv = H // GROUP
        b, hk, _, j, _ = _program_order(tl.program_id(0), Tk, Hkv, 1, WAVE, MIN_WAVE, BLOCK_N)
        n0 = j * BLOCK_N                                           # the first keys (most causal work) first
        offs_n = n0 + tl.arange(0, BLOCK_N)                        # (BN,) key rows
        diff = Tk - Tq
        k = _load_tile(K, K, b * Tk + n0, Tk - n0, hk * D, Hkv * D, BLOCK_N, D, True, False, UPCAST)  # (BN, D)
        v = _load_tile(V, V, b * Tk + n0, Tk - n0, hk * D, Hkv * D, BLOCK_N, D, True, False, UPCAST)  # (BN, D)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        # query rows [lo, mid): the diagonal, masked; [mid, full): see every key here, no mask; [full, Tq): ragged
        lo, mid, full = _query_range(n0, Tq, diff, CAUSAL, BLOCK_M, BLOCK_N)
        for g in range(0, GROUP):
            h = hk * GROUP + g
            stat0 = (b * H + h).to(tl.int64) * Tq                  # this head's rows of lse2 and delta
            dk, dv = _dkdv_blocks(dk, dv, k, v, Q, DO, Qd, DOd, LSE2, DELTA, b * Tq, h * D, H * D, stat0, lo, mid,
                                  offs_n, Tq, diff, scale2, D, BLOCK_M, True, CAUSAL, USE_TMA, UPCAST, DOT_PREC)
            dk, dv = _dkdv_blocks(dk, dv, k, v, Q, DO, Qd, DOd, LSE2, DELTA, b * Tq, h * D, H * D, stat0, mid, full,
                                  offs_n, Tq, diff, scale2, D, BLOCK_M, False, CAUSAL, USE_TMA, UPCAST, DOT_PREC)
            dk, dv = _dkdv_blocks(dk, dv, k, v, Q, DO, Qd, DOd, LSE2, DELTA, b * Tq, h * D, H * D, stat0, full, Tq,
                                  offs_n, Tq, diff, scale2, D, BLOCK_M, True, CAUSAL, USE_TMA, UPCAST, DOT_PREC)
        ptrs = (b * Tk + offs_n).to(tl.int64)[:, None] * (Hkv * D) + hk * D + tl.arange(0, D)[None, :]
        tl.store(DK + ptrs, (dk * scale).to(DK.dtype.element_ty), mask=(offs_n < Tk)[:, None])  # dK = scale dS^T Q
        tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=(offs_n < Tk)[:, None])

    @triton.jit
    def _dkdv_blocks(dk, dv, k, v, Q, DO, Qd, DOd, LSE2, DELTA, row0, col, stride, stat0, lo, hi, offs_n, Tq, diff,
                     scale2, D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                     USE_TMA: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        """dK, dV of one key block from query blocks [lo, hi) of one head, transposed (keys on rows). Query rows
        past Tq have lse2 = +inf (P = 0); key rows past Tk only touch their own rows, which are never stored."""
        offs_m = tl.arange(0, BLOCK_M)
        for m0 in range(lo, hi, BLOCK_M):
            q = _load_tile(Q, Qd, row0 + m0, Tq - m0, col, stride, BLOCK_M, D, MASKED, USE_TMA, UPCAST)   # (BM, D)
            lse2 = _load_stat(LSE2, stat0, m0 + offs_m, Tq, float("inf"), MASKED)                       # (BM,)
            pT = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale2 - lse2[None, :])  # (BN, BM)
            if MASKED and CAUSAL:
                pT = tl.where(offs_n[:, None] <= (m0 + offs_m)[None, :] + diff, pT, 0.0)
            do = _load_tile(DO, DOd, row0 + m0, Tq - m0, col, stride, BLOCK_M, D, MASKED, USE_TMA, UPCAST)  # (BM, D)
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)                   # (BN, D) += P^T dO
            delta = _load_stat(DELTA, stat0, m0 + offs_m, Tq, 0.0, MASKED)                    # (BM,)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)                           # (BN, BM) = (dO V^T)^T
            dsT = pT * (dpT - delta[None, :])                                                 # (BN, BM)
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)                     # (BN, D) += dS^T Q
        return dk, dv

    @triton.jit
    def _query_range(n0, Tq, diff, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Query rows (lo, mid, full), in whole blocks, for the keys n0.. (the split is named in _bwd_dkdv_kernel)."""
        full = (Tq // BLOCK_M) * BLOCK_M
        if CAUSAL:
            lo = (tl.minimum(tl.maximum(n0 - diff, 0), Tq) // BLOCK_M) * BLOCK_M       # first row seeing key n0
            sees_all = tl.maximum(n0 + BLOCK_N - 1 - diff, 0)                          # first row seeing them all
            mid = tl.maximum(lo, tl.minimum(((sees_all + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, full))
        else:
            lo = full * 0
            mid = lo
        return lo, mid, tl.maximum(mid, full)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, LSE2, DELTA, DQ, Kd, Vd, Tq, Tk, H, GROUP, scale, scale2, WAVE, MIN_WAVE,
                       TQ_KEY, TK_KEY, TMA_OK, D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        """One program: dQ of BLOCK_M queries of one (batch, head), over every key they see."""
        b, hk, g, j, n_blocks = _program_order(tl.program_id(0), Tq, H // GROUP, GROUP, WAVE, MIN_WAVE, BLOCK_M)
        h = hk * GROUP + g
        m0 = (n_blocks - 1 - j) * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        diff = Tk - Tq
        q = _load_tile(Q, Q, b * Tq + m0, Tq - m0, h * D, H * D, BLOCK_M, D, True, False, UPCAST)     # (BM, D)
        do = _load_tile(DO, DO, b * Tq + m0, Tq - m0, h * D, H * D, BLOCK_M, D, True, False, UPCAST)  # (BM, D)
        stat0 = (b * H + h).to(tl.int64) * Tq
        lse2 = _load_stat(LSE2, stat0, offs_m, Tq, float("inf"), True)                              # (BM,)
        delta = _load_stat(DELTA, stat0, offs_m, Tq, 0.0, True)                                     # (BM,)
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        full, seen = _key_range(m0, Tq, Tk, diff, CAUSAL, BLOCK_M, BLOCK_N)
        kv_row, kv_col, kv_stride = b * Tk, hk * D, (H // GROUP) * D
        dq = _dq_blocks(dq, q, do, lse2, delta, K, V, Kd, Vd, kv_row, kv_col, kv_stride, 0, full, offs_m, Tk, diff,
                        scale2, D, BLOCK_N, False, CAUSAL, USE_TMA, UPCAST, DOT_PREC)
        dq = _dq_blocks(dq, q, do, lse2, delta, K, V, Kd, Vd, kv_row, kv_col, kv_stride, full, seen, offs_m, Tk, diff,
                        scale2, D, BLOCK_N, True, CAUSAL, USE_TMA, UPCAST, DOT_PREC)
        ptrs = (b * Tq + offs_m).to(tl.int64)[:, None] * (H * D) + h * D + tl.arange(0, D)[None, :]
        tl.store(DQ + ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=(offs_m < Tq)[:, None])  # dQ = scale dS K

    @triton.jit
    def _dq_blocks(dq, q, do, lse2, delta, K, V, Kd, Vd, row0, col, stride, lo, hi, offs_m, Tk, diff, scale2,
                   D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                   USE_TMA: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        """dQ of one query block from key blocks [lo, hi); keys past Tk must count for nothing here."""
        offs_n = tl.arange(0, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            k = _load_tile(K, Kd, row0 + n0, Tk - n0, col, stride, BLOCK_N, D, MASKED, USE_TMA, UPCAST)  # (BN, D)
            v = _load_tile(V, Vd, row0 + n0, Tk - n0, col, stride, BLOCK_N, D, MASKED, USE_TMA, UPCAST)  # (BN, D)
            p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale2 - lse2[:, None])  # (BM, BN)
            if MASKED:
                keep = (n0 + offs_n < Tk)[None, :]
                if CAUSAL:
                    keep = keep & ((n0 + offs_n)[None, :] <= offs_m[:, None] + diff)
                p = tl.where(keep, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)                          # (BM, BN) = dO V^T
            ds = p * (dp - delta[:, None])                                                  # (BM, BN)
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)                    # (BM, D) += dS K
        return dq


def _triton_forward(q, k, v, causal, scale, out_fp32):
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()       # the kernels read (B*T, heads*D) matrices
    out = torch.empty((B, Tq, H, D), dtype=torch.float32 if out_fp32 else q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if B * Tq * H == 0:
        return out, lse
    if Tk == 0:                                                    # nothing to attend to: every row is empty
        return out.zero_(), lse.fill_(float("-inf"))
    tma = _tma_ok(q, k, v)
    args = (q, k, v, out, lse) + _descriptors(tma, q, k, v) + (Tq, Tk, H, H // Hkv, scale * LOG2E)
    args += _wave_args(B * Hkv, Tk, 1, k) + (_bucket(Tq), _bucket(Tk), int(tma))   # each program streams K and V
    with _on_device(q):
        _launch("fwd", lambda bm, bn: (B * H * triton.cdiv(Tq, bm),), args, _consts(q, causal), Tq, Tk, tma)
    return out, lse


def _triton_backward(dout, q, k, v, out, lse, causal, scale, grad_fp32, on_dkdv=None):
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    q, k, v, out, dout = (x.contiguous() for x in (q, k, v, out, dout.to(q.dtype)))
    gdt = torch.float32 if grad_fp32 else q.dtype
    dq = torch.empty((B, Tq, H, D), dtype=gdt, device=q.device)
    dk = torch.empty((B, Tk, Hkv, D), dtype=gdt, device=q.device)
    dv = torch.empty((B, Tk, Hkv, D), dtype=gdt, device=q.device)
    if B * Tq * H == 0 or Tk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    lse2 = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    tma, consts = _tma_ok(q, k, v, dout), _consts(q, causal)
    tail = (Tq, Tk, H, H // Hkv, scale, scale * LOG2E)
    keys = (_bucket(Tq), _bucket(Tk), int(tma))
    with _on_device(q):
        _bwd_preprocess[(B * H, triton.cdiv(Tq, 64))](out, dout, lse.float().contiguous(), delta, lse2, Tq, H,
                                                       D=D, BLOCK_M=64)
        _launch("dkdv", lambda bm, bn: (B * Hkv * triton.cdiv(Tk, bn),),
                (q, k, v, dout, lse2, delta, dk, dv) + _descriptors(tma, q, dout) + tail
                + _wave_args(B * Hkv, Tq, H // Hkv, q) + keys, consts, Tq, Tk, tma)  # Q, dO of the group's heads
        if on_dkdv is not None:  # dk/dv are final (in stream order) before the dQ kernel is even queued
            on_dkdv(dk, dv)
        _launch("dq", lambda bm, bn: (B * H * triton.cdiv(Tq, bm),),
                (q, k, v, dout, lse2, delta, dq) + _descriptors(tma, k, v) + tail
                + _wave_args(B * Hkv, Tk, 1, k) + keys, consts, Tq, Tk, tma)         # K, V of one KV head
    return dq, dk, dv


# -----------------------------------------------------------------------------
# 3. the interface: one forward, one backward, one differentiable function, whatever backend runs them
#
#   "torch"   the twin above (CPU; any shape)
#   "triton"  the kernels above (CUDA; CPU under TRITON_INTERPRET=1); head dims 16, 32, 64, 128
#   "cudnn"   torch's cuDNN fused attention (CUDA, 16-bit); its only causal mask is the square one
#   "flash"   FlashAttention's CuTe-DSL kernels (flash-attn-4; Hopper, Blackwell; 16-bit)
# A call a backend cannot run exactly falls back (flash -> cudnn -> triton -> torch), with a warning naming why.

BACKENDS = ("torch", "triton", "cudnn", "flash")
_SETTINGS = {"backend": "auto", "fused_ops": True}   # set by configure()


def configure(backend=None, fused_ops=None) -> dict:
    """Set the backend of calls that pass none ("auto": the fastest installed on CUDA, else "torch") and whether the
    model fuses RMSNorm, RoPE, SwiGLU (True: on CUDA; "always": in the interpreter too). Returns the old settings."""
    old = dict(_SETTINGS)
    if backend is not None and backend not in BACKENDS + ("auto",):
        raise ValueError(f"kernels.configure: backend must be auto or one of {BACKENDS}, got {backend!r}")
    if fused_ops not in (None, True, False, "always"):
        raise ValueError(f"kernels.configure: fused_ops must be True, False or 'always', got {fused_ops!r}")
    _SETTINGS.update({k: v for k, v in (("backend", backend), ("fused_ops", fused_ops)) if v is not None})
    return old


def _check(q, k, v, softmax_scale):
    """Validate shapes and dtypes; returns the softmax scale."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"kernels: q, k, v must be 4-D (B, T, heads, D), k and v alike; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"kernels: q {tuple(q.shape)} and k {tuple(k.shape)} disagree in batch or head dim")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"kernels: query heads H={q.shape[2]} must be a multiple of KV heads Hkv={k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"kernels: q, k, v must share one dtype of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    scale = 1.0 / math.sqrt(q.shape[3]) if softmax_scale is None else float(softmax_scale)
    if not scale > 0:
        raise ValueError(f"kernels: softmax_scale must be > 0, got {softmax_scale}")
    return scale


def _route(backend, q, k, causal):
    """The backend that runs this call: the one asked for (None: configure's choice), or the next one down when it
    cannot run the call exactly; a causal call whose first query already sees every key loses its mask."""
    causal = bool(causal) and q.shape[1] > 1                 # a single query (the last position) sees every key
    asked = _SETTINGS["backend"] if backend is None else backend
    if asked not in BACKENDS + ("auto",):
        raise ValueError(f"kernels: backend must be one of {BACKENDS} or None, got {backend!r}")
    if asked in ("cudnn", "flash") and not q.is_cuda:
        raise RuntimeError(f"kernels: backend={asked!r} needs CUDA tensors")
    first = _fastest_backend(q) if asked == "auto" else asked
    for name in BACKENDS[BACKENDS.index(first)::-1]:                        # flash -> cudnn -> triton -> torch
        why = cannot_run(name, q, k, causal)
        if why is None:
            return name, causal
        if name == asked:                                                    # only a backend someone chose
            _warn_once(f"kernels: backend {asked!r} cannot run this call ({why}); falling back")
    return "torch", causal


def attention_forward(q, k, v, causal=True, softmax_scale=None, out_fp32=False, backend=None):
    """-> (out (B,Tq,H,D), lse (B,H,Tq) fp32). out_fp32: out in fp32, for a ring that merges partial outputs in fp32.
    One dispatcher op (longvila::attention), so selective activation checkpointing can keep its outputs instead of
    recomputing them (longvila.py's "save-attn")."""
    scale = _check(q, k, v, softmax_scale)
    backend, causal = _route(backend, q, k, causal)
    return torch.ops.longvila.attention(q, k, v, causal, scale, bool(out_fp32), backend)


def attention_backward(dout, q, k, v, out, lse, causal=True, softmax_scale=None, grad_fp32=False, backend=None,
                       on_dkdv=None):
    """(dq, dk, dv) of attention_forward from the GLOBAL out and lse. dk/dv are summed over the H/Hkv query heads
    that share a KV head (GQA). grad_fp32: the gradients in fp32, else in q's dtype. on_dkdv(dk, dv) runs as soon as
    dk/dv are final: on triton before the dQ kernel is queued, so a ring can send dk/dv while dQ computes."""
    scale = _check(q, k, v, softmax_scale)
    B, Tq, H, _ = q.shape
    if dout.shape != q.shape or out.shape != q.shape or tuple(lse.shape) != (B, H, Tq):
        raise ValueError(f"kernels: dout {tuple(dout.shape)} and out {tuple(out.shape)} must match q "
                         f"{tuple(q.shape)}, lse {tuple(lse.shape)} must be {(B, H, Tq)}")
    backend, causal = _route(backend, q, k, causal)
    if backend == "triton":
        return _triton_backward(dout, q, k, v, out, lse, causal, scale, bool(grad_fp32), on_dkdv)
    dq, dk, dv = _BACKWARD[backend](dout, q, k, v, out, lse, causal, scale, bool(grad_fp32))
    if on_dkdv is not None:
        on_dkdv(dk, dv)
    return dq, dk, dv


class _FlashAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, backend):
        out, lse = attention_forward(q, k, v, causal, softmax_scale, backend=backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, softmax_scale, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        causal, softmax_scale, backend = ctx.args
        return attention_backward(dout, *ctx.saved_tensors, causal, softmax_scale, backend=backend) + (None,) * 3


def flash_attn_func(q, k, v, causal=True, softmax_scale=None, backend=None):
    """Differentiable attention: q (B,Tq,H,D), k/v (B,Tk,Hkv,D) -> (B,Tq,H,D). The model's attention on CUDA."""
    return _FlashAttn.apply(q, k, v, causal, softmax_scale, backend)


# ---------------------------------------------------------------------------------------------------------------
# --- below: the fast path. Same signatures as above; a reader of the algorithm can stop here.
# ---------------------------------------------------------------------------------------------------------------

# --- the dispatcher op, backend choice and fallbacks -------------------------------------------------------------

@torch.library.custom_op("longvila::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, out_fp32: bool,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _FORWARD[backend](q, k, v, causal, scale, out_fp32)


@_attention_op.register_fake
def _(q, k, v, causal, scale, out_fp32, backend):
    B, Tq, H, _ = q.shape
    return (q.new_empty(q.shape, dtype=torch.float32 if out_fp32 else q.dtype),
            q.new_empty((B, H, Tq), dtype=torch.float32))


def saved_attention_ops() -> set:
    """The dispatcher ops whose outputs selective checkpointing keeps ("save-attn"): ours and torch's SDPA ops."""
    names = ["_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu"]
    return {torch.ops.longvila.attention.default} | {getattr(torch.ops.aten, n).default for n in names
                                                     if hasattr(torch.ops.aten, n)}


def _fastest_backend(x) -> str:
    """auto: the fastest backend installed for x's device (`python bench.py kernels` measures the order)."""
    if not x.is_cuda:
        return "torch"
    major = _capability(x.device.index)[0]
    if _flash_attn_4() is not None and major in (9, 10):
        return "flash"
    if major >= 9:
        return "cudnn"
    return "triton" if HAS_TRITON else "torch"


def cannot_run(backend, q, k, causal):
    """None when `backend` computes this call exactly, else the reason it does not."""
    D, half = q.shape[3], q.dtype in (torch.float16, torch.bfloat16)
    if backend == "torch":
        return None
    if backend == "triton":
        if not HAS_TRITON:
            return "triton is not installed"
        if not q.is_cuda and not _INTERPRET:
            return "CPU tensors need TRITON_INTERPRET=1 set before `import kernels`"
        return None if D in (16, 32, 64, 128) else f"head dim {D} (16, 32, 64 or 128)"
    if not half:
        return f"{q.dtype} (fp16 or bf16 only)"
    if backend == "cudnn":
        if causal and q.shape[1] != k.shape[1]:
            return "a causal mask on unequal lengths (cuDNN's is the square one)"
        return None if D % 8 == 0 and D <= 128 else f"head dim {D}"
    if _flash_attn_4() is None:
        return "flash-attn-4 is not installed (pip install flash-attn-4)"
    if _capability(q.device.index)[0] not in (9, 10, 11, 12):
        return f"compute capability {_capability(q.device.index)} (flash-attn-4 needs Hopper or newer)"
    if D % 8 or D > 128:
        return f"head dim {D} (a multiple of 8 up to 128)"
    if causal and q.shape[1] > k.shape[1]:
        return "a causal mask with more queries than keys (untested in flash-attn-4's backward)"
    return None


@functools.lru_cache(maxsize=None)
def _warn_once(message):
    warnings.warn(message, stacklevel=4)


@functools.lru_cache(maxsize=None)
def _capability(index):
    return torch.cuda.get_device_capability(index)


def _on_device(x):
    """Launch on the tensor's own GPU (a ring rank's), not whatever device is current."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


# --- Triton: tile loads (pointers or TMA), program order, launch configurations ----------------------------------

if HAS_TRITON:
    @triton.jit
    def _load_tile(X, Xd, row0, n_rows, col0, ROW_STRIDE, BLOCK: tl.constexpr, D: tl.constexpr,
                   MASK: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr):
        """(BLOCK, D) tile at (row0, col0) of the (B*T, heads*D) view; past n_rows: zeros (MASK) or, by TMA, the next
        batch's rows (callers mask). UPCAST (interpreter): fp32, as it does bf16 arithmetic on raw bits."""
        if USE_TMA:
            x = Xd.load([row0, col0])
        else:
            rows = tl.arange(0, BLOCK)
            ptrs = X + (row0 + rows).to(tl.int64)[:, None] * ROW_STRIDE + col0 + tl.arange(0, D)[None, :]
            if MASK:
                x = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
            else:
                x = tl.load(ptrs)
        if UPCAST:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _load_stat(X, row0, rows, n, other, MASK: tl.constexpr):
        """A row statistic (lse2, delta) of rows `rows` of one (batch, head); `other` past n when MASK."""
        if MASK:
            return tl.load(X + row0 + rows, mask=rows < n, other=other)
        return tl.load(X + row0 + rows)

    @triton.jit
    def _program_order(pid, T, Hkv, GROUP, HEADS_PER_WAVE, MIN_WAVE, BLOCK: tl.constexpr):
        """pid -> (batch b, KV head hk, query head g of its group, block j, n_blocks), in L2-sized waves of (batch,
        KV head) pairs, block slowest: a group's query heads read the same K/V together."""
        n_blocks = tl.cdiv(T, BLOCK)
        n_heads = tl.num_programs(0) // (GROUP * n_blocks)                     # B * Hkv
        hpw = tl.minimum(tl.maximum(HEADS_PER_WAVE, tl.cdiv(MIN_WAVE, GROUP * n_blocks)), n_heads)
        wave = pid // (hpw * GROUP * n_blocks)
        in_wave = tl.minimum(hpw, n_heads - wave * hpw)                        # the last wave may be short
        r = pid - wave * hpw * GROUP * n_blocks
        j = r // (in_wave * GROUP)
        w = r % (in_wave * GROUP)
        bk = wave * hpw + w // GROUP                                           # b * Hkv + hk
        return bk // Hkv, bk % Hkv, w % GROUP, j, n_blocks

    # Launch configurations: large 16-bit problems autotune over a few Hopper configs; small ones (decode steps),
    # fp32 and the interpreter take one fixed config, so a generate() loop never re-tunes for each new length.
    def _tma_hook(blocks):
        """Autotune pre-hook: a TMA descriptor's block shape follows the config's tile."""
        def hook(nargs):
            for name, block in blocks.items():
                if not isinstance(nargs[name], torch.Tensor):  # a descriptor, not the pointer stand-in
                    nargs[name].block_shape = [nargs[block], nargs["D"]]
        return hook

    _HOOKS = {"fwd": _tma_hook({"Qd": "BLOCK_M", "Kd": "BLOCK_N", "Vd": "BLOCK_N"}),
              "dkdv": _tma_hook({"Qd": "BLOCK_M", "DOd": "BLOCK_M"}),
              "dq": _tma_hook({"Kd": "BLOCK_N", "Vd": "BLOCK_N"})}
    _TUNED_CONFIGS = {  # (BLOCK_M, BLOCK_N, warps, stages, TMA); docs/performance.md has the sweeps they won
        "fwd": [(128, 64, 4, 2, True), (128, 128, 8, 3, True), (256, 64, 8, 3, True), (128, 64, 8, 3, False)],
        "dkdv": [(64, 128, 8, 3, True), (64, 128, 8, 4, True), (64, 64, 4, 2, True), (32, 128, 8, 3, False)],
        "dq": [(128, 64, 8, 3, True), (128, 64, 8, 3, False), (64, 32, 4, 2, True)],
    }

    def _autotuned(name, kernel):
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": tma}, num_warps=w, num_stages=s,
                                 pre_hook=_HOOKS[name]) for bm, bn, w, s, tma in _TUNED_CONFIGS[name]]
        prune = lambda configs, nargs, **kw: [c for c in configs if nargs["TMA_OK"] or not c.kwargs["USE_TMA"]]
        return triton.autotune(configs, key=["TQ_KEY", "TK_KEY", "D", "CAUSAL", "GROUP", "TMA_OK"],
                               prune_configs_by={"early_config_prune": prune})(kernel)

    _KERNELS = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}
    _TUNED = {name: _autotuned(name, kernel) for name, kernel in _KERNELS.items()}

_FIXED = (64, 64, 4, 2)            # (BLOCK_M, BLOCK_N, warps, stages) of all three kernels on a GPU
_FIXED_FP32_WIDE = (32, 32, 4, 1)  # fp32 at D = 128: 64x64 two-stage tiles overflow shared memory
_FIXED_INTERPRET = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}  # odd pairs on purpose
_TUNE_MIN_WORK = 1024 * 1024  # Tq * Tk below this: the fixed config
L2_BUDGET = 24 << 20  # bytes of streamed K/V (Q/dO) one wave of heads may keep in L2 (Hopper has 50 MB)


def _fixed_config(name, dot_prec, D):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of kernel `name` when it is not autotuned."""
    if _INTERPRET:
        return _FIXED_INTERPRET[name]
    return _FIXED_FP32_WIDE if dot_prec == "tf32x3" and D > 64 else _FIXED


def _launch(name, grid, args, consts, Tq, Tk, tma):
    """Autotuned on large 16-bit problems, else the fixed config (fp32: tuned tiles would overflow shared memory)."""
    if not _INTERPRET and Tq * Tk >= _TUNE_MIN_WORK and consts["DOT_PREC"] != "tf32x3":
        _TUNED[name][lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **consts)
        return
    kernel = _KERNELS[name]
    bm, bn, w, s = _fixed_config(name, consts["DOT_PREC"], consts["D"])
    _HOOKS[name](dict(zip(kernel.arg_names, args), **consts, BLOCK_M=bm, BLOCK_N=bn))  # TMA block shapes
    kernel[grid(bm, bn)](*args, **consts, USE_TMA=bool(tma), BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)


def _consts(q, causal):
    """The attention kernels' compile-time constants. fp32 products: "ieee" in the interpreter, "tf32x3" on GPU
    (three tf32 products, ~fp32 accuracy; a plain-FMA fp32 dot of these tiles takes ptxas minutes to compile)."""
    return dict(D=q.shape[3], CAUSAL=bool(causal), UPCAST=_INTERPRET,
                DOT_PREC=("ieee" if _INTERPRET else "tf32x3") if q.dtype == torch.float32 else "tf32")


def _bucket(n):
    """Autotuning key: the next power of two, capped at 16k (longer sequences reuse the 16k choice)."""
    return min(1 << max(0, int(n) - 1).bit_length(), 16384)


def _heads_per_wave(n_heads, bytes_per_head):
    """Heads per wave of _program_order: as many of the n_heads (= B * Hkv) as fit L2_BUDGET together, at least 1."""
    return min(n_heads, max(1, L2_BUDGET // max(1, bytes_per_head)))


def _wave_args(n_heads, rows, heads, x):
    """(HEADS_PER_WAVE, MIN_WAVE) of a launch whose programs stream two tensors like x (K and V, or Q and dO)."""
    per_head = 2 * rows * heads * x.shape[-1] * x.element_size()
    return _heads_per_wave(n_heads, per_head), _min_wave(x)


def _min_wave(x):
    """Programs a wave of _program_order needs for load balance: two per SM (the 4-warp configs fit two)."""
    return 2 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1


def _tma_ok(*xs):
    """Can these tensors be read by 2-D TMA descriptors (Hopper+, 16-bit, D of 64 or 128, 16-byte aligned)?"""
    if _TensorDescriptor() is None or not all(x.is_cuda for x in xs) or _capability(xs[0].device.index)[0] < 9:
        return False
    return all(x.dtype in (torch.float16, torch.bfloat16) and x.shape[3] in (64, 128) and x.data_ptr() % 16 == 0
               for x in xs)


def _descriptors(tma, *xs):
    """TMA descriptors of xs (block shapes set per config by _HOOKS), or the tensors themselves as stand-ins."""
    if not tma:
        return xs
    TD = _TensorDescriptor()
    return tuple(TD(x, shape=[x.shape[0] * x.shape[1], x.shape[2] * x.shape[3]], strides=[x.shape[2] * x.shape[3], 1],
                    block_shape=[16, x.shape[3]]) for x in xs)


@functools.lru_cache(maxsize=None)
def _TensorDescriptor():
    """Triton's host-side TMA descriptor class, or None where this Triton has none."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
        return TensorDescriptor
    except ImportError:
        return None


# --- cuDNN: torch's own fused attention op with its log-sum-exp (what torch's context_parallel calls) ----------

def _expand_kv(x, G):
    """(B, T, Hkv, D) -> (B, T, Hkv*G, D); after any communication, so rings move only the real KV heads."""
    return x if G == 1 else x.repeat_interleave(G, dim=2)


def _cudnn_forward(q, k, v, causal, scale, out_fp32):
    B, Tq, H, D = q.shape
    G = H // k.shape[2]
    t = lambda x: x.transpose(1, 2)                                      # (B, T, heads, D) -> (B, heads, T, D)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        t(q), t(_expand_kv(k, G)), t(_expand_kv(v, G)), None, True, 0.0, bool(causal), False, scale=scale)
    out = res[0].transpose(1, 2)                                         # (B, Tq, H, D)
    lse = res[1].reshape(B, H, Tq).float()                               # (B, H, Tq, 1) -> (B, H, Tq)
    return (out.float() if out_fp32 else out), lse


def _cudnn_backward(dout, q, k, v, out, lse, causal, scale, grad_fp32):
    """cuDNN's backward from the GLOBAL out/lse (a ring passes them): P = exp(S - lse) per block, as ours."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    t = lambda x: x.transpose(1, 2)
    out, dout = out.to(q.dtype).contiguous(), dout.to(q.dtype).contiguous()  # (B, Tq, H, D): one stride set
    philox = torch.zeros(1, dtype=torch.int64, device=q.device)          # dropout seed/offset: unused at p = 0
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        t(dout), t(q), t(_expand_kv(k, G)), t(_expand_kv(v, G)), t(out), lse.float().contiguous().unsqueeze(-1),
        philox, philox, None, None, None, Tq, Tk, 0.0, bool(causal), scale=scale)   # (B, H, T, D) each
    dq, dk, dv = t(dq), t(dk), t(dv)                                     # (B, T, H, D)
    if G > 1:   # the expanded heads' gradients summed back onto their KV head
        dk = dk.reshape(B, Tk, Hkv, G, D).sum(3, dtype=torch.float32)    # (B, Tk, Hkv, D)
        dv = dv.reshape(B, Tk, Hkv, G, D).sum(3, dtype=torch.float32)
    gdt = torch.float32 if grad_fp32 else q.dtype
    return dq.to(gdt), dk.to(gdt), dv.to(gdt)


# --- fused elementwise ops of the decoder block: RMSNorm, SwiGLU, RoPE (Triton, CUDA) ------------------------------
# One kernel each way instead of eager's chain, fp32 arithmetic, rounding once; twins: longvila's eager functions.
MAX_NORM_WIDTH = 16384  # rms_norm keeps a whole row in registers: wider rows take the eager twin

if HAS_TRITON:
    @triton.jit
    def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, C, eps, BLOCK_C: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
        mask = cols < C
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_C,)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
        # HF rounds the normalised row to the input dtype BEFORE the gain; so do we (same numbers as the twin)
        n = (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # (BLOCK_C,)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_C,)
        tl.store(Y + row * stride_y + cols, (n * w).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_dx, M, C, ROWS_PER_PROG,
                             BLOCK_C: tl.constexpr):
        # program p owns rows [p * ROWS_PER_PROG, ...): dx row by row, and its partial sum of dw (summed by torch)
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
        mask = cols < C
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_C,)
        dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
        row0 = pid * ROWS_PER_PROG
        for i in range(0, ROWS_PER_PROG):
            row = (row0 + i).to(tl.int64)
            if row < M:
                x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_C,)
                dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_C,)
                rstd = tl.load(RSTD + row)
                xhat = x * rstd  # (BLOCK_C,)
                dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)  # d(n * w)/dw = n, the rounded row
                g = dy * w  # dL/dxhat, (BLOCK_C,)
                # xhat = x / rms(x):  dx = rstd * (g - xhat * mean(g * xhat))
                dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / C))  # (BLOCK_C,)
                tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW_PART + pid * C + cols, dw, mask=mask)

    @triton.jit
    def _swiglu_fwd_kernel(G, U, Y, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
        mask = offs < N
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
        tl.store(Y + offs, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(DY, G, U, DG, DU, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
        mask = offs < N
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
        s = tl.sigmoid(g)  # (BLOCK,)
        # y = g * s(g) * u:  dy/du = g s(g),  dy/dg = u * s(g) * (1 + g (1 - s(g)))
        tl.store(DU + offs, (dy * g * s).to(DU.dtype.element_ty), mask=mask)
        tl.store(DG + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(X, COS, SIN, Y, T, stride_xb, stride_xt, stride_xh, stride_cb, stride_ct, HX, SIGN,
                       HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
        # one program per token, all its heads: y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin (rotate_half layout);
        # SIGN = -1 rotates back: the backward (a rotation's transpose)
        pid = tl.program_id(0).to(tl.int64)
        b, t = pid // T, pid % T
        h = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
        d = tl.arange(0, BLOCK_HALF)[None, :]  # (1, BLOCK_HALF)
        mask = (h < HX) & (d < HALF)  # (BLOCK_H, BLOCK_HALF)
        c = tl.load(COS + b * stride_cb + t * stride_ct + d, mask=d < HALF, other=0.0).to(tl.float32)  # (1, HALF)
        s = SIGN * tl.load(SIN + b * stride_cb + t * stride_ct + d, mask=d < HALF, other=0.0).to(tl.float32)  # same
        x_ptr = X + b * stride_xb + t * stride_xt + h * stride_xh + d  # (BLOCK_H, BLOCK_HALF)
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_H, BLOCK_HALF) first halves
        x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_H, BLOCK_HALF) second halves
        y_ptr = Y + pid * HX * 2 * HALF + h * 2 * HALF + d  # Y is a new contiguous (B, T, HX, D)
        tl.store(y_ptr, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
        tl.store(y_ptr + HALF, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


def _rows(x):
    """(..., C) -> (M, C) with unit stride along C (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, C)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = _rows(x)  # (M, C)
        weight = weight.contiguous()  # the kernels read the gain at unit stride
        M, C = x2.shape
        if C > MAX_NORM_WIDTH:
            raise ValueError(f"kernels.rms_norm: rows of up to {MAX_NORM_WIDTH} channels, got {C}")
        y = torch.empty((M, C), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)  # (M, C)
        rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
        block_c = triton.next_power_of_2(C)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        if M and C:  # empty inputs launch nothing
            with _on_device(x):
                _rms_norm_fwd_kernel[(M,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), C, eps, BLOCK_C=block_c,
                                           num_warps=min(16, max(1, block_c // 256)))
        return y.view(x.shape[:-1] + (C,))  # (M, C) -> (..., C)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        M, C = x2.shape
        dy2 = _rows(dy)  # (M, C)
        dx = torch.empty_like(x2)  # (M, C)
        if M == 0 or C == 0:
            return dx.view(ctx.x_shape), torch.zeros_like(weight), None  # (..., C), (C,)
        n_prog = max(1, min(M, 1024))  # enough programs to fill any GPU; each sums its rows' share of dw
        rows_per = triton.cdiv(M, n_prog)
        n_prog = triton.cdiv(M, rows_per)
        dw_part = torch.empty((n_prog, C), dtype=torch.float32, device=x2.device)  # (programs, C)
        block_c = triton.next_power_of_2(C)
        with _on_device(x2):
            _rms_norm_bwd_kernel[(n_prog,)](dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0), x2.stride(0),
                                            dx.stride(0), M, C, rows_per, BLOCK_C=block_c,
                                            num_warps=min(16, max(1, block_c // 256)))
        # a frozen gain (stages 1-2 freeze the LLM, yet gradients flow through its norms): no sum
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None  # (C,)
        return dx.view(ctx.x_shape), dw, None  # (M, C) -> (..., C)


class _SwiGLUFn(torch.autograd.Function):
    BLOCK = 1024

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()  # (..., F): the kernel walks them flat
        y = torch.empty_like(gate)  # (..., F)
        n = gate.numel()
        ctx.save_for_backward(gate, up)  # two tensors, where eager autograd keeps three (gate, silu(gate), up)
        if n:
            with _on_device(gate):
                _swiglu_fwd_kernel[(triton.cdiv(n, _SwiGLUFn.BLOCK),)](gate, up, y, n, BLOCK=_SwiGLUFn.BLOCK)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()  # (..., F)
        dg, du = torch.empty_like(gate), torch.empty_like(up)  # (..., F) each
        n = gate.numel()
        if n:
            with _on_device(gate):
                _swiglu_bwd_kernel[(triton.cdiv(n, _SwiGLUFn.BLOCK),)](dy, gate, up, dg, du, n, BLOCK=_SwiGLUFn.BLOCK)
        return dg, du


def _rotary(x, cos, sin, sign):
    """x (B, T, HX, D), cos/sin (B, T, D/2) -> x rotated by sign * angle, a new contiguous (B, T, HX, D)."""
    B, T, HX, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()  # (B, T, HX, D)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():  # the kernel reads both tables with one set of strides
        cos, sin = cos.contiguous(), sin.contiguous()  # (B, T, D/2) each
    y = torch.empty((B, T, HX, D), dtype=x.dtype, device=x.device)  # (B, T, HX, D)
    if y.numel():
        with _on_device(x):
            _rotary_kernel[(B * T,)](x, cos, sin, y, T, x.stride(0), x.stride(1), x.stride(2), cos.stride(0),
                                     cos.stride(1), HX, float(sign), HALF=D // 2, BLOCK_H=triton.next_power_of_2(HX),
                                     BLOCK_HALF=triton.next_power_of_2(D // 2), num_warps=4)
    return y


class _RotaryFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotary(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotary(dy, cos, sin, -1.0), None, None  # the transpose of a rotation is the opposite rotation


def rms_norm(x, weight, eps):
    """Fused twin of longvila.rms_norm: x (..., C), weight (C,) -> (..., C), differentiable in x and weight."""
    _check_fusable(x)
    return _RMSNormFn.apply(x, weight, float(eps))


def swiglu(gate, up):
    """Fused silu(gate) * up (SwiGLU, Shazeer 2020): gate, up (..., F) -> (..., F), differentiable in both."""
    _check_fusable(gate)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"kernels.swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype}"
                         " must match")
    return _SwiGLUFn.apply(gate, up)


def rotary(x, cos, sin):
    """Fused twin of longvila.apply_rotary_emb: x (B, T, HX, D), cos/sin (B, T, D/2) -> (B, T, HX, D)."""
    _check_fusable(x)
    B, T, _, D = x.shape
    try:  # a batch of 1 serves every row, as in the eager twin (a stride-0 view, no copy)
        cos_b, sin_b = cos.expand(B, T, D // 2), sin.expand(B, T, D // 2)  # (B, T, D/2)
    except RuntimeError:
        cos_b = None
    if D % 2 or cos_b is None:
        raise ValueError(f"kernels.rotary: x {tuple(x.shape)} needs cos/sin of shape {(B, T, D // 2)}, got "
                         f"{tuple(cos.shape)} / {tuple(sin.shape)}")
    return _RotaryFn.apply(x, cos_b, sin_b)


def _check_fusable(x):
    if not HAS_TRITON or not (x.is_cuda or _INTERPRET):
        raise RuntimeError("kernels: the fused ops need triton and CUDA tensors (on CPU: TRITON_INTERPRET=1 set "
                           "before `import kernels`)")


def use_fused(x):
    """Should the model call the fused ops on x? fused_ops True: on CUDA; "always": in the interpreter too."""
    if not HAS_TRITON or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if _SETTINGS["fused_ops"] == "always":
        return x.is_cuda or _INTERPRET
    return _SETTINGS["fused_ops"] is True and x.is_cuda


# --- flash-attn-4: FlashAttention's CuTe-DSL kernels (pip install flash-attn-4; Hopper and Blackwell) -----------
# Its public flash_attn_func differentiates through its own out and lse; a ring needs the backward from the GLOBAL
# out and lse, which its private _flash_attn_bwd takes (it recomputes delta from the out it is given). Its causal
# mask is bottom-right aligned, as ours.

@functools.lru_cache(maxsize=None)
def _flash_attn_4():
    """flash-attn-4's interface module, or None where it is not installed (imported on first use: seconds)."""
    try:
        from flash_attn.cute import interface
    except ImportError:
        return None
    # its compiler notes, at every new kernel, that one argument is passed at run time: nothing to act on
    warnings.filterwarnings("ignore", message="Argument aux_data .* cannot be converted", category=UserWarning)
    return interface


def _flash_forward(q, k, v, causal, scale, out_fp32):
    out, lse, *_ = _flash_attn_4()._flash_attn_fwd(q, k, v, softmax_scale=scale, causal=causal, num_splits=1,
                                                   return_lse=True)  # (B, Tq, H, D), (B, H, Tq) fp32 natural log
    return (out.float() if out_fp32 else out), lse


def _flash_backward(dout, q, k, v, out, lse, causal, scale, grad_fp32):
    dq, dk, dv = _flash_attn_4()._flash_attn_bwd(q, k, v, out.to(q.dtype), dout.to(q.dtype), lse.float().contiguous(),
                                                 softmax_scale=scale, causal=causal)   # dk, dv (B, Tk, Hkv, D)
    gdt = torch.float32 if grad_fp32 else q.dtype
    return dq.to(gdt), dk.to(gdt), dv.to(gdt)


_FORWARD = {"torch": _torch_forward, "triton": _triton_forward, "cudnn": _cudnn_forward, "flash": _flash_forward}
_BACKWARD = {"torch": _torch_backward, "cudnn": _cudnn_backward, "flash": _flash_backward}
