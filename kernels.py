"""Flash attention with log-sum-exp for longvila: Triton kernels (forward, backward) and their PyTorch twin.

    python -m pytest -q tests/test_kernels.py        # CPU: the Triton kernels run in Triton's interpreter
    python bench.py kernels                          # GPU: TFLOP/s beside torch SDPA's flash and cuDNN backends

What ring attention (mmsp.py) and the model (longvila.py) call:

    out, lse = attention_forward(q, k, v, causal=True, q_offset=0, k_offset=0, out_fp32=False)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, causal=True, q_offset=0, k_offset=0)
    out = flash_attn_func(q, k, v, causal=True)      # autograd.Function over the two above

and, for the rest of a decoder block on CUDA (fused elementwise kernels, section at the end of this file):

    y = rms_norm(x, weight, eps);  y = rotary(x, cos, sin);  y = swiglu(gate, up)

Shapes (the alphabet of longvila.py): q (B, Tq, H, D), k and v (B, Tk, Hkv, D), out like q, lse (B, H, Tq) in fp32,
natural log. Grouped-query attention: query head h reads KV head h // (H / Hkv), by index, never by copying KV.

The algorithm is FlashAttention-2 (Dao, arXiv 2307.08691): a program owns a block of queries and streams the key
blocks through an online softmax, so the (Tq, Tk) score matrix never exists in memory. The backward pass recomputes
the probabilities from the saved log-sum-exp:

    P = exp(S - lse),  S = scale * Q K^T            dV = P^T dO
    dP = dO V^T,  delta = rowsum(dO * O)           dS = P * (dP - delta)
    dQ = scale * dS K                               dK = scale * dS^T Q

Ring attention needs three things from these kernels (LONGVILA.md, "Ring numerics"):
- explicit positions: the causal mask compares TRUE positions, query i sees key j iff q_offset + i >= k_offset + j,
  so a block of queries can attend to a block of keys taken from anywhere in the sequence;
- the log-sum-exp, so partial results over different key blocks merge exactly (out_fp32 keeps them in fp32);
- a backward that takes the GLOBAL out and lse (those of the whole ring), not the ones of this key block.
A query row that sees no key at all gets out 0 and lse -inf, which is the identity of the LSE merge.

Inside the kernels scores live in the log2 domain (S * scale * log2(e)), so the softmax uses the fast exp2.
Causal programs loop only over key blocks that are not fully masked, and apply the mask only on the diagonal
(and ragged tail) blocks. On GPU the matrix products take 16-bit operands with fp32 accumulation. Triton's CPU
interpreter computes bf16 arithmetic on raw bits (wrong numbers, silently), so under TRITON_INTERPRET=1 the kernels
convert every load to fp32 first: the interpreter tests bf16 STORAGE with fp32 arithmetic.

On Hopper, K/V (forward, dQ) and Q/dO (dK/dV) can be read through TMA descriptors over the (B*T, heads*D) view of
the (B, T, heads, D) tensors; the autotuner picks TMA or plain pointer loads per kernel and shape. A TMA block that
runs past one batch's last row reads the next batch's rows: those keys are masked, those queries are never stored.

Speed (H100, bf16, B=1 H=32 D=128 causal, 16k tokens; `python bench.py kernels`, 2026-11-27): forward 0.86x cuDNN
and 1.5x SDPA-flash; forward+backward 0.71x (32 KV heads) / 0.79x (8 KV heads) cuDNN and 1.22x / 1.34x SDPA-flash.
Two changes of 2026-11-27 each bought ~5% of the forward, timed in one process on an H100: the program order
(_program_order: the programs of one or a few heads run together, so their K/V stay in L2, where heads-fastest order
had every running program on another head; also +4-11% on the 32-head backward at 16k-64k) and 4-warp 128x64 tiles,
two programs to an SM. What limits it: Triton waits for every wgmma right after issuing it (the sm_90 PTX of all
three kernels has `wgmma.wait_group 0` after each product, even when the next block's QK^T is written before this
block's PV, where ptxas reports "wgmma serialized", C7515), so inside one program the softmax (exp2, row max/sum)
never overlaps the tensor cores as in FA3/cuDNN's ping-pong schedule; only a second program on the same SM can fill
those gaps. Nor does Triton warp-specialize these kernels. (Its Hopper pass behind tl.range(warp_specialize=True)
does partition a one-loop attention forward at num_warps=4 with in-kernel tl.make_tensor_descriptor loads, producer
+ 2 consumer warp groups, setmaxnreg 40/232; on our two-loop causal forward it fails with a compiler assertion, at
num_warps=8 it does nothing, and with host TMA descriptors it rejects the split block shapes: seen compiling for
sm_90 with Triton 3.6.0 and 3.7.1.) The backward does 7 matrix products per tile pair instead of 5 (the dQ kernel
recomputes QK^T and dO V^T), and the dK/dV kernel holds two fp32 (BLOCK_N, D) accumulators: 255 registers per thread
and spills (232 B stored, 316 B loaded per thread in the sm_90 compile of the bf16 D=128 64x128 3-stage TMA config).
FlashAttention-2's fused scheme, dQ added into fp32 by atomics (TMA reduce-add) from the dK/dV kernel, 5 products
per tile pair, was built and timed on an H100 (2026-11-27): slower, 0.60-0.73x cuDNN forward+backward against
0.70-0.79x for the two kernels here (its 5th product pushes the dK/dV kernel to 255 registers with more spills, and
the reduce-adds contend in L2), and its reduce-add path failed the real-size accuracy test at 32 KV heads; it was
removed again. So was a warp-specialized forward (one key loop, in-kernel TMA descriptors, the causal mask on every
block, 4 warps: producer + 2 consumer groups in the sm_90 compile): on an H200 it ran 0.71-0.90x cuDNN against
0.83-0.89x for the kernel here (no faster; slower at 64k) and failed the real-size accuracy test.

Because of that gap there is a third backend, "cudnn": torch's own cuDNN fused attention op with its log-sum-exp
(aten._scaled_dot_product_cudnn_attention, what torch's context_parallel calls), behind the same two functions, so
ring attention and the model can run on it (`DEFAULT_BACKEND = "cudnn"`, or train.py --attn_backend cudnn). It
has one causal mask (square, top-left), which is every call the zigzag ring and the model make; anything else
(offset masks, fp32, D > 128) falls back to Triton. On 2 H200 the zigzag ring over it matches torch's context
parallel over cuDNN at 128k tokens (472 vs 474 ms), and 8B stage-5 training at 64k tokens runs 1.22x faster.
"""
import functools
import math
import os

import torch

try:  # triton is optional: without it (or without a GPU) the PyTorch twin below does the work
    import triton
    import triton.language as tl

    HAS_TRITON = True
    try:  # host-side TMA descriptors (Hopper's bulk tensor copy engine); optional
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # pragma: no cover
        TensorDescriptor = None
except ImportError:  # pragma: no cover - exercised only where triton is not installed
    triton = None
    tl = None
    TensorDescriptor = None
    HAS_TRITON = False

# Read once, when the kernels are defined: conftest.py sets it on CPU-only machines before importing us.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))
LN2 = 0.6931471805599453    # ln(2):   log(x) = log2(x) * ln(2)
BACKENDS = ("triton", "torch", "cudnn")
# What backend=None and the model's fused ops mean; set once at start by configure() (train.py --attn_backend,
# --fused_ops). backend None: "triton" on CUDA, "torch" elsewhere.
_SETTINGS = {"backend": None, "fused_ops": True}


def configure(backend=None, fused_ops=None):
    """Set the default attention backend (None = auto, or one of BACKENDS) and whether the model runs RMSNorm,
    RoPE and SwiGLU as fused Triton kernels (True: on CUDA; False: never; "always": on CPU too, in Triton's
    interpreter). Arguments left out keep their value. Returns the previous settings (configure(**old) restores)."""
    old = dict(_SETTINGS)
    if backend is not None and backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"kernels.configure: backend must be auto or one of {BACKENDS}, got {backend!r}")
    if fused_ops not in (None, True, False, "always"):
        raise ValueError(f"kernels.configure: fused_ops must be True, False or 'always', got {fused_ops!r}")
    if backend is not None:
        _SETTINGS["backend"] = None if backend == "auto" else backend
    if fused_ops is not None:
        _SETTINGS["fused_ops"] = fused_ops
    return old

# -----------------------------------------------------------------------------
# checks shared by every backend

def _check(q, k, v, softmax_scale):
    """Validate shapes/dtypes and return (B, Tq, H, D, Tk, Hkv, scale)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"kernels: q, k, v must be 4-D (B, T, heads, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, Tq, H, D = q.shape
    Bk, Tk, Hkv, Dk = k.shape
    if k.shape != v.shape:
        raise ValueError(f"kernels: k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if Bk != B or Dk != D:
        raise ValueError(f"kernels: q {tuple(q.shape)} and k {tuple(k.shape)} disagree in batch or head dim")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"kernels: query heads H={H} must be a multiple of KV heads Hkv={Hkv} (GQA)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"kernels: q, k, v must share one dtype of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    if not scale > 0:
        raise ValueError(f"kernels: softmax_scale must be > 0, got {softmax_scale}")
    return B, Tq, H, D, Tk, Hkv, scale


def _pick_backend(backend, x):
    """None -> the configured default, else "triton" on CUDA tensors (when triton is importable), else "torch"."""
    backend = _SETTINGS["backend"] if backend is None else backend
    if backend is None:
        return "triton" if (HAS_TRITON and x.is_cuda) else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"kernels: backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "cudnn" and not x.is_cuda:
        raise RuntimeError("kernels: backend='cudnn' needs CUDA tensors")
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("kernels: backend='triton' asked for, but triton is not importable")
        if not x.is_cuda and not _INTERPRET:
            raise RuntimeError("kernels: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                               "`import kernels` (conftest.py does this on CPU machines)")
    return backend

# -----------------------------------------------------------------------------
# the PyTorch twin: blockwise over keys, fp32, same signatures (CPU path and readable reference)

def _torch_forward(q, k, v, causal, scale, q_offset, k_offset, out_fp32, block=256):
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv  # query heads per KV head
    qf = q.float().view(B, Tq, Hkv, G, D).permute(0, 2, 3, 1, 4)  # (B, Tq, H, D) -> (B, Hkv, G, Tq, D)
    kf = k.float().permute(0, 2, 1, 3).unsqueeze(2)                # (B, Tk, Hkv, D) -> (B, Hkv, 1, Tk, D)
    vf = v.float().permute(0, 2, 1, 3).unsqueeze(2)                # (B, Hkv, 1, Tk, D)
    m = qf.new_full((B, Hkv, G, Tq), float("-inf"))                # running max of the scores
    l = qf.new_zeros((B, Hkv, G, Tq))                              # running sum of exp(score - m)
    acc = qf.new_zeros((B, Hkv, G, Tq, D))                         # running sum of exp(score - m) * v
    qpos = q_offset + torch.arange(Tq, device=q.device)            # (Tq,) true positions
    for n0 in range(0, Tk, block):
        n1 = min(n0 + block, Tk)
        if causal and k_offset + n0 > q_offset + Tq - 1:
            break  # this key block and all later ones lie in every query's future
        s = (qf @ kf[..., n0:n1, :].transpose(-1, -2)) * scale    # (B, Hkv, G, Tq, n)
        if causal:
            kpos = k_offset + torch.arange(n0, n1, device=q.device)  # (n,)
            s = s.masked_fill(qpos[:, None] < kpos[None, :], float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))                       # (B, Hkv, G, Tq)
        m_sub = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # -inf rows: subtract 0
        p = torch.exp(s - m_sub[..., None])                        # (B, Hkv, G, Tq, n)
        alpha = torch.exp(m - m_sub)                               # rescales the old sums
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + p @ vf[..., n0:n1, :]       # (B, Hkv, G, Tq, D)
        m = m_new
    empty = l == 0                                                 # rows that saw no key
    out = acc / torch.where(empty, torch.ones_like(l), l)[..., None]
    lse = torch.where(empty, torch.full_like(l, float("-inf")), m + torch.log(l))  # (B, Hkv, G, Tq)
    out = out.permute(0, 3, 1, 2, 4).reshape(B, Tq, H, D)          # (B, Hkv, G, Tq, D) -> (B, Tq, H, D)
    lse = lse.reshape(B, H, Tq)                                    # h = hkv * G + g
    return out.to(torch.float32 if out_fp32 else q.dtype), lse


def _torch_backward(dout, q, k, v, out, lse, causal, scale, q_offset, k_offset, grad_fp32, block=256):
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    qf = q.float().view(B, Tq, Hkv, G, D).permute(0, 2, 3, 1, 4)     # (B, Hkv, G, Tq, D)
    dof = dout.float().view(B, Tq, Hkv, G, D).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, Tq, D)
    of = out.float().view(B, Tq, Hkv, G, D).permute(0, 2, 3, 1, 4)    # (B, Hkv, G, Tq, D)
    kf = k.float().permute(0, 2, 1, 3).unsqueeze(2)                   # (B, Hkv, 1, Tk, D)
    vf = v.float().permute(0, 2, 1, 3).unsqueeze(2)                   # (B, Hkv, 1, Tk, D)
    delta = (dof * of).sum(-1)                                        # (B, Hkv, G, Tq) rowsum(dO * O)
    lse_ = lse.float().reshape(B, Hkv, G, Tq)                         # (B, H, Tq) -> (B, Hkv, G, Tq)
    lse_ = torch.where(lse_ == float("-inf"), torch.full_like(lse_, float("inf")), lse_)  # empty row -> P = 0
    qpos = q_offset + torch.arange(Tq, device=q.device)
    dq = torch.zeros_like(qf)                                         # (B, Hkv, G, Tq, D)
    dk = qf.new_zeros((B, Hkv, Tk, D))
    dv = qf.new_zeros((B, Hkv, Tk, D))
    for n0 in range(0, Tk, block):
        n1 = min(n0 + block, Tk)
        if causal and k_offset + n0 > q_offset + Tq - 1:
            break
        kb, vb = kf[..., n0:n1, :], vf[..., n0:n1, :]                 # (B, Hkv, 1, n, D)
        s = (qf @ kb.transpose(-1, -2)) * scale                       # (B, Hkv, G, Tq, n)
        if causal:
            kpos = k_offset + torch.arange(n0, n1, device=q.device)
            s = s.masked_fill(qpos[:, None] < kpos[None, :], float("-inf"))
        p = torch.exp(s - lse_[..., None])                            # (B, Hkv, G, Tq, n) global probabilities
        dv[:, :, n0:n1] = torch.einsum("bkgtn,bkgtd->bknd", p, dof)   # P^T dO summed over the group's heads
        dp = dof @ vb.transpose(-1, -2)                               # (B, Hkv, G, Tq, n)
        ds = p * (dp - delta[..., None])                              # (B, Hkv, G, Tq, n)
        dq += (ds @ kb) * scale                                       # (B, Hkv, G, Tq, D)
        dk[:, :, n0:n1] = torch.einsum("bkgtn,bkgtd->bknd", ds, qf) * scale
    gdt = torch.float32 if grad_fp32 else q.dtype
    dq = dq.permute(0, 3, 1, 2, 4).reshape(B, Tq, H, D)               # (B, Hkv, G, Tq, D) -> (B, Tq, H, D)
    return dq.to(gdt), dk.permute(0, 2, 1, 3).to(gdt), dv.permute(0, 2, 1, 3).to(gdt)  # (B, Tk, Hkv, D)

# -----------------------------------------------------------------------------
# Triton kernels

if HAS_TRITON:

    @triton.jit
    def _load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, ROW_MASK: tl.constexpr,
                   EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
        """Load a (rows, BLOCK_D) tile; masks only what may be out of bounds; fp32 under the interpreter."""
        if ROW_MASK:
            if EVEN_D:
                x = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
            else:
                x = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        else:
            if EVEN_D:
                x = tl.load(ptrs)
            else:
                x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _keys_seen(m0, Tq, Tk, diff, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
        """End of the keys some query row m0..m0+BLOCK_M-1 sees (row i sees key j iff j <= i + diff)."""
        if CAUSAL:
            return tl.minimum(tl.maximum(diff + tl.minimum(m0 + BLOCK_M, Tq), 0), Tk)
        return Tk

    @triton.jit
    def _keys_unmasked(m0, Tk, diff, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
        """End of the whole key blocks every query row of the block sees: those need no mask."""
        if CAUSAL:
            return (tl.minimum(tl.maximum(diff + m0 + 1, 0), Tk) // BLOCK_N) * BLOCK_N
        return (Tk // BLOCK_N) * BLOCK_N

    @triton.jit
    def _program_order(pid, T, Hkv, GROUP, HEADS_PER_WAVE, MIN_WAVE, BLOCK: tl.constexpr):
        """Program pid of a 1-D grid -> (batch b, KV head hk, member g of its query-head group, block j, n_blocks).

        Programs with nearby ids run at the same time. The B*Hkv (batch, KV head) pairs go in waves of `hpw` pairs;
        inside a wave the block index j is slowest and the heads fastest, so every head of the wave works on block j
        at once: the GROUP query heads of a KV head read the same K/V rows together, and only the wave's K/V (Q/dO
        in the dK/dV kernel, GROUP = 1 there) need to stay in L2. hpw is HEADS_PER_WAVE (what fits L2, from the
        host), raised until a wave has MIN_WAVE programs (2 per SM), or the longest-first order within a wave (the
        caller maps j = 0, 1, ... to its blocks longest-first under a causal mask) has too few programs to balance.
        Timed on an H100 (autotuned, 32 query heads, D=128, causal): one wave of all heads made the 64k forward 9%
        and its backward 11% slower than these waves (each head's K/V are 32 MB, L2 50 MB); one KV head a wave,
        timed before MIN_WAVE existed, made the 4k forward 9-11% slower (too few programs a wave to balance)."""
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

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, Kd, Vd, k_row0, k_col, lo, hi, offs_m, offs_n, offs_d, Tk, diff,
                   scale2, skt, svt,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                   EVEN_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr):
        """Online softmax over key blocks [lo, hi); k_ptrs/v_ptrs point at key row lo (pointer path), or TMA
        descriptors Kd/Vd over the (B*Tk, Hkv*D) view with this head's rows at k_row0 + j, columns at k_col."""
        for n0 in range(lo, hi, BLOCK_N):
            if USE_TMA:  # bulk copy; rows past Tk are masked below (MASKED), or do not exist (unmasked loop)
                k = Kd.load([k_row0 + n0, k_col])                                               # (BN, BD)
                if UPCAST:
                    k = k.to(tl.float32)
            else:
                k = _load_tile(k_ptrs, n0 + offs_n, Tk, offs_d, HEAD_DIM, MASKED, EVEN_D, UPCAST)  # (BN, BD)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)                               # (BM, BN)
            if MASKED:  # diagonal / ragged block: key bound and causal mask on true positions
                keep = (n0 + offs_n < Tk)[None, :]
                if CAUSAL:
                    keep = keep & (offs_m[:, None] + diff >= (n0 + offs_n)[None, :])
                s = tl.where(keep, s * scale2, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: keep p = 0
                p = tl.math.exp2(s - m_sub[:, None])
            else:       # every key of the block is visible to every query of the block
                m_new = tl.maximum(m_i, tl.max(s, 1) * scale2)
                m_sub = m_new
                p = tl.math.exp2(s * scale2 - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)                                                   # (BM,)
            l_i = l_i * alpha + tl.sum(p, 1)
            if USE_TMA:
                v = Vd.load([k_row0 + n0, k_col])                                               # (BN, BD)
                if UPCAST:
                    v = v.to(tl.float32)
            else:
                v = _load_tile(v_ptrs, n0 + offs_n, Tk, offs_d, HEAD_DIM, MASKED, EVEN_D, UPCAST)  # (BN, BD)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)                       # (BM, BD)
            m_i = m_new
            k_ptrs += BLOCK_N * skt
            v_ptrs += BLOCK_N * svt
        return acc, l_i, m_i

    @triton.jit(do_not_specialize=["Tq", "Tk", "diff", "TQ_KEY", "TK_KEY", "TMA_OK", "HEADS_PER_WAVE",
                                  "MIN_WAVE"])
    def _fwd_kernel(Q, K, V, O, LSE, Qd, Kd, Vd,
                    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                    Tq, Tk, H, GROUP, diff, scale2, TQ_KEY, TK_KEY, TMA_OK, HEADS_PER_WAVE, MIN_WAVE,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        """One program: BLOCK_M queries of one (batch, head). Grid (B*H*cdiv(Tq, BLOCK_M),), see _program_order."""
        b, hk, g, j, n_blocks = _program_order(tl.program_id(0), Tq, H // GROUP, GROUP, HEADS_PER_WAVE, MIN_WAVE,
                                               BLOCK_M)
        pid_m = n_blocks - 1 - j                            # last query blocks (most causal work) start first
        h = hk * GROUP + g                                  # GQA: query head h reads KV head hk = h // GROUP
        pid_bh = b * H + h
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        q_ptrs = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqt + offs_d[None, :]
        if USE_TMA:
            q = Qd.load([b * Tq + m0, h * HEAD_DIM])                                            # (BM, BD)
            if UPCAST:
                q = q.to(tl.float32)
        else:
            q = _load_tile(q_ptrs, offs_m, Tq, offs_d, HEAD_DIM, True, EVEN_D, UPCAST)         # (BM, BD)
        k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
        k_ptrs = k_base + offs_n[:, None] * skt + offs_d[None, :]                               # key row 0
        v_ptrs = v_base + offs_n[:, None] * svt + offs_d[None, :]
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = _keys_seen(m0, Tq, Tk, diff, CAUSAL, BLOCK_M)          # keys j < hi: seen by some row of the block
        n_full = _keys_unmasked(m0, Tk, diff, CAUSAL, BLOCK_N)      # keys j < n_full: seen by all of them
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, Kd, Vd, b * Tk, hk * HEAD_DIM, 0, n_full,
                                   offs_m, offs_n, offs_d, Tk, diff, scale2, skt, svt, HEAD_DIM, BLOCK_N, False,
                                   CAUSAL, EVEN_D, UPCAST, DOT_PREC, USE_TMA)
        k_ptrs = k_base + n_full.to(tl.int64) * skt + offs_n[:, None] * skt + offs_d[None, :]
        v_ptrs = v_base + n_full.to(tl.int64) * svt + offs_n[:, None] * svt + offs_d[None, :]
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, Kd, Vd, b * Tk, hk * HEAD_DIM, n_full, hi,
                                   offs_m, offs_n, offs_d, Tk, diff, scale2, skt, svt, HEAD_DIM, BLOCK_N, True,
                                   CAUSAL, EVEN_D, UPCAST, DOT_PREC, USE_TMA)
        # epilogue: a row that saw no key keeps l = 0 -> out 0, lse -inf
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]                                                             # (BM, BD)
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # natural log
        o_ptrs = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * sot + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m < Tq)[:, None] & (offs_d < HEAD_DIM)[None, :])
        tl.store(LSE + pid_bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)

    @triton.jit(do_not_specialize=["Tq"])
    def _bwd_preprocess(O, DO, LSE, DELTA, LSE2, sob, sot, soh, sdb, sdt, sdh, Tq, H,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
        """delta = rowsum(dO * O) (fp32) and lse2 = lse * log2(e) with -inf -> +inf (so P = exp2(s - lse2) = 0)."""
        pid_bh = tl.program_id(0)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m < Tq)[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * sot + offs_d[None, :],
                    mask=mask, other=0.0).to(tl.float32)                                       # (BM, BD)
        do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sdt + offs_d[None, :],
                     mask=mask, other=0.0).to(tl.float32)                                      # (BM, BD)
        delta = tl.sum(o * do, 1)                                                               # (BM,)
        row = pid_bh.to(tl.int64) * Tq + offs_m
        lse = tl.load(LSE + row, mask=offs_m < Tq, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        tl.store(DELTA + row, delta, mask=offs_m < Tq)
        tl.store(LSE2 + row, lse2, mask=offs_m < Tq)

    @triton.jit
    def _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, Qd, DOd, q_row0, q_col, lse2_ptr, delta_ptr, lo, hi, offs_m,
                    offs_n, offs_d, Tq, diff, scale2, sqt, sdt,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                    EVEN_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr):
        """Accumulate dK, dV of one key block over query blocks [lo, hi) of one head (transposed: keys on rows).

        Key rows past Tk are never masked here: they only touch their own rows of dK/dV, which are not stored.
        Query rows past Tq have lse2 = +inf (padding) -> P = 0."""
        for m0 in range(lo, hi, BLOCK_M):
            rows = m0 + offs_m
            if USE_TMA:
                q = Qd.load([q_row0 + m0, q_col])                                                 # (BM, BD)
                if UPCAST:
                    q = q.to(tl.float32)
            else:
                q = _load_tile(q_ptrs, rows, Tq, offs_d, HEAD_DIM, MASKED, EVEN_D, UPCAST)        # (BM, BD)
            if MASKED:
                lse2 = tl.load(lse2_ptr + rows, mask=rows < Tq, other=float("inf"))
            else:
                lse2 = tl.load(lse2_ptr + rows)
            sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)                                 # (BN, BM)
            pT = tl.math.exp2(sT * scale2 - lse2[None, :])                                        # (BN, BM)
            if MASKED:
                if CAUSAL:
                    pT = tl.where(rows[None, :] + diff >= offs_n[:, None], pT, 0.0)
            if USE_TMA:
                do = DOd.load([q_row0 + m0, q_col])                                               # (BM, BD)
                if UPCAST:
                    do = do.to(tl.float32)
            else:
                do = _load_tile(do_ptrs, rows, Tq, offs_d, HEAD_DIM, MASKED, EVEN_D, UPCAST)      # (BM, BD)
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)                        # (BN, BD)
            if MASKED:
                delta = tl.load(delta_ptr + rows, mask=rows < Tq, other=0.0)
            else:
                delta = tl.load(delta_ptr + rows)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)                               # (BN, BM)
            dsT = pT * (dpT - delta[None, :])                                                     # (BN, BM)
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)                         # (BN, BD)
            q_ptrs += BLOCK_M * sqt
            do_ptrs += BLOCK_M * sdt
        return dk, dv

    @triton.jit(do_not_specialize=["Tq", "Tk", "diff", "TQ_KEY", "TK_KEY", "TMA_OK", "HEADS_PER_WAVE",
                                  "MIN_WAVE"])
    def _bwd_dkdv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV, Qd, DOd,
                         sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,
                         sdkb, sdkt, sdkh, sdvb, sdvt, sdvh,
                         Tq, Tk, H, GROUP, diff, scale, scale2, TQ_KEY, TK_KEY, TMA_OK, HEADS_PER_WAVE, MIN_WAVE,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                         CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One program: BLOCK_N keys of one (batch, KV head), summed over the GROUP query heads that read it.
        Grid (B*Hkv*cdiv(Tk, BLOCK_N),), see _program_order; no atomics, no KV copies."""
        Hkv = H // GROUP
        b, hk, _, j, _ = _program_order(tl.program_id(0), Tk, Hkv, 1, HEADS_PER_WAVE, MIN_WAVE, BLOCK_N)
        n0 = j * BLOCK_N                                    # first key blocks (most causal work) start first
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        k = _load_tile(K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + offs_n[:, None] * skt + offs_d[None, :],
                       offs_n, Tk, offs_d, HEAD_DIM, True, EVEN_D, UPCAST)                        # (BN, BD)
        v = _load_tile(V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh + offs_n[:, None] * svt + offs_d[None, :],
                       offs_n, Tk, offs_d, HEAD_DIM, True, EVEN_D, UPCAST)                        # (BN, BD)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        # query blocks: [lo, mid) diagonal (masked), [mid, q_full) unmasked, [tail, Tq) ragged tail (masked)
        q_full = (Tq // BLOCK_M) * BLOCK_M
        if CAUSAL:
            lo = (tl.minimum(tl.maximum(n0 - diff, 0), Tq) // BLOCK_M) * BLOCK_M  # first row seeing a key
            sees_all = tl.maximum(n0 + BLOCK_N - 1 - diff, 0)                      # first row seeing all keys
            m_full = ((sees_all + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
            mid = tl.maximum(lo, tl.minimum(m_full, q_full))
        else:
            lo = q_full * 0  # a runtime zero (a tensor, so .to() works below)
            mid = lo
        tail = tl.maximum(mid, q_full)
        for g in range(0, GROUP):
            h = hk * GROUP + g
            q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
            do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
            lse2_ptr = LSE2 + (b * H + h).to(tl.int64) * Tq
            delta_ptr = DELTA + (b * H + h).to(tl.int64) * Tq
            q_ptrs = q_base + lo.to(tl.int64) * sqt + offs_m[:, None] * sqt + offs_d[None, :]
            do_ptrs = do_base + lo.to(tl.int64) * sdt + offs_m[:, None] * sdt + offs_d[None, :]
            dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, Qd, DOd, b * Tq, h * HEAD_DIM, lse2_ptr, delta_ptr,
                                 lo, mid, offs_m, offs_n, offs_d, Tq, diff, scale2, sqt, sdt, HEAD_DIM, BLOCK_M,
                                 True, CAUSAL, EVEN_D, UPCAST, DOT_PREC, USE_TMA)
            q_ptrs = q_base + mid.to(tl.int64) * sqt + offs_m[:, None] * sqt + offs_d[None, :]
            do_ptrs = do_base + mid.to(tl.int64) * sdt + offs_m[:, None] * sdt + offs_d[None, :]
            dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, Qd, DOd, b * Tq, h * HEAD_DIM, lse2_ptr, delta_ptr,
                                 mid, q_full, offs_m, offs_n, offs_d, Tq, diff, scale2, sqt, sdt, HEAD_DIM, BLOCK_M,
                                 False, CAUSAL, EVEN_D, UPCAST, DOT_PREC, USE_TMA)
            q_ptrs = q_base + tail.to(tl.int64) * sqt + offs_m[:, None] * sqt + offs_d[None, :]
            do_ptrs = do_base + tail.to(tl.int64) * sdt + offs_m[:, None] * sdt + offs_d[None, :]
            dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, Qd, DOd, b * Tq, h * HEAD_DIM, lse2_ptr, delta_ptr,
                                 tail, Tq, offs_m, offs_n, offs_d, Tq, diff, scale2, sqt, sdt, HEAD_DIM, BLOCK_M,
                                 True, CAUSAL, EVEN_D, UPCAST, DOT_PREC, USE_TMA)
        dk = dk * scale  # dK = scale * dS^T Q
        mask = (offs_n < Tk)[:, None] & (offs_d < HEAD_DIM)[None, :]
        tl.store(DK + b.to(tl.int64) * sdkb + hk.to(tl.int64) * sdkh + offs_n[:, None] * sdkt + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + b.to(tl.int64) * sdvb + hk.to(tl.int64) * sdvh + offs_n[:, None] * sdvt + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=mask)

    @triton.jit
    def _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, Kd, Vd, k_row0, k_col, lo, hi, offs_m, offs_n, offs_d, Tk,
                  diff, scale2, skt, svt,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  EVEN_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr):
        """Accumulate dQ of one query block over key blocks [lo, hi)."""
        for n0 in range(lo, hi, BLOCK_N):
            if USE_TMA:
                k = Kd.load([k_row0 + n0, k_col])                                               # (BN, BD)
                v = Vd.load([k_row0 + n0, k_col])                                               # (BN, BD)
                if UPCAST:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
            else:
                k = _load_tile(k_ptrs, n0 + offs_n, Tk, offs_d, HEAD_DIM, MASKED, EVEN_D, UPCAST)  # (BN, BD)
                v = _load_tile(v_ptrs, n0 + offs_n, Tk, offs_d, HEAD_DIM, MASKED, EVEN_D, UPCAST)  # (BN, BD)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)                               # (BM, BN)
            p = tl.math.exp2(s * scale2 - lse2[:, None])                                       # (BM, BN)
            if MASKED:  # keys past Tk must not count here (unlike in dK/dV)
                keep = (n0 + offs_n < Tk)[None, :]
                if CAUSAL:
                    keep = keep & (offs_m[:, None] + diff >= (n0 + offs_n)[None, :])
                p = tl.where(keep, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)                             # (BM, BN)
            ds = p * (dp - delta[:, None])                                                     # (BM, BN)
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)                       # (BM, BD)
            k_ptrs += BLOCK_N * skt
            v_ptrs += BLOCK_N * svt
        return dq

    @triton.jit(do_not_specialize=["Tq", "Tk", "diff", "TQ_KEY", "TK_KEY", "TMA_OK", "HEADS_PER_WAVE",
                                  "MIN_WAVE"])
    def _bwd_dq_kernel(Q, K, V, DO, LSE2, DELTA, DQ, Kd, Vd,
                       sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, sdqb, sdqt, sdqh,
                       Tq, Tk, H, GROUP, diff, scale, scale2, TQ_KEY, TK_KEY, TMA_OK, HEADS_PER_WAVE, MIN_WAVE,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr,
                       UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
        """One program: dQ of BLOCK_M queries of one (batch, head). Grid (B*H*cdiv(Tq, BLOCK_M),)."""
        b, hk, g, j, n_blocks = _program_order(tl.program_id(0), Tq, H // GROUP, GROUP, HEADS_PER_WAVE, MIN_WAVE,
                                               BLOCK_M)
        pid_m = n_blocks - 1 - j
        h = hk * GROUP + g
        pid_bh = b * H + h
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        q = _load_tile(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                       offs_m, Tq, offs_d, HEAD_DIM, True, EVEN_D, UPCAST)                     # (BM, BD)
        do = _load_tile(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sdt + offs_d[None, :],
                        offs_m, Tq, offs_d, HEAD_DIM, True, EVEN_D, UPCAST)                    # (BM, BD)
        row = pid_bh.to(tl.int64) * Tq + offs_m
        lse2 = tl.load(LSE2 + row, mask=offs_m < Tq, other=float("inf"))                       # (BM,)
        delta = tl.load(DELTA + row, mask=offs_m < Tq, other=0.0)                              # (BM,)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
        hi = _keys_seen(m0, Tq, Tk, diff, CAUSAL, BLOCK_M)          # keys j < hi: seen by some row of the block
        n_full = _keys_unmasked(m0, Tk, diff, CAUSAL, BLOCK_N)      # keys j < n_full: seen by all of them
        k_ptrs = k_base + offs_n[:, None] * skt + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * svt + offs_d[None, :]
        dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, Kd, Vd, b * Tk, hk * HEAD_DIM, 0, n_full, offs_m,
                       offs_n, offs_d, Tk, diff, scale2, skt, svt, HEAD_DIM, BLOCK_N, False, CAUSAL, EVEN_D, UPCAST,
                       DOT_PREC, USE_TMA)
        k_ptrs = k_base + n_full.to(tl.int64) * skt + offs_n[:, None] * skt + offs_d[None, :]
        v_ptrs = v_base + n_full.to(tl.int64) * svt + offs_n[:, None] * svt + offs_d[None, :]
        dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, Kd, Vd, b * Tk, hk * HEAD_DIM, n_full, hi, offs_m,
                       offs_n, offs_d, Tk, diff, scale2, skt, svt, HEAD_DIM, BLOCK_N, True, CAUSAL, EVEN_D, UPCAST,
                       DOT_PREC, USE_TMA)
        dq = dq * scale  # dQ = scale * dS K
        tl.store(DQ + b.to(tl.int64) * sdqb + h.to(tl.int64) * sdqh + offs_m[:, None] * sdqt + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=(offs_m < Tq)[:, None] & (offs_d < HEAD_DIM)[None, :])

    # -- launch configurations ---------------------------------------------------------------------------------
    # Large problems autotune over a few Hopper-friendly configs: 8 warps, or 4 warps with tiles small enough that
    # two programs share an SM (Triton waits for every wgmma right after issuing it, so one program never overlaps
    # its softmax with its matrix products; two programs on one SM can, and the 4-warp 128x64 forward won most
    # rows of the H100 sweeps); small ones (decode steps, tests) and the interpreter use one fixed config, so a
    # generate() loop never re-tunes for every new length. With TMA the descriptors' block shapes follow the config
    # (pre_hook).
    def _tma_hook(rows_of):
        def hook(nargs):
            for name, block in rows_of.items():
                desc = nargs[name]
                if TensorDescriptor is not None and isinstance(desc, TensorDescriptor):
                    desc.block_shape = [nargs[block], nargs["BLOCK_D"]]
        return hook

    _HOOKS = {"fwd": _tma_hook({"Qd": "BLOCK_M", "Kd": "BLOCK_N", "Vd": "BLOCK_N"}),
              "dkdv": _tma_hook({"Qd": "BLOCK_M", "DOd": "BLOCK_M"}),
              "dq": _tma_hook({"Kd": "BLOCK_N", "Vd": "BLOCK_N"})}

    def _cfgs(name, choices):
        # (BLOCK_M, BLOCK_N, warps, stages, TMA): the winners and runners-up of fixed-config sweeps on an H100 and an
        # H200 (2026-11-27: 4k and 16k, 32 and 8 KV heads; 11 / 10 / 8 candidates); fewer configs = less compile
        # time at a shape's first call and fewer near-ties for the autotuner to pick wrongly from its noisy timings
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": tma}, num_warps=w, num_stages=s,
                              pre_hook=_HOOKS[name]) for bm, bn, w, s, tma in choices]

    def _prune(configs, named_args, **kwargs):
        """Without descriptors (TMA_OK == 0) only the pointer-load configs can run."""
        return [c for c in configs if named_args["TMA_OK"] or not c.kwargs["USE_TMA"]]

    _TUNE_KEY = ["TQ_KEY", "TK_KEY", "HEAD_DIM", "CAUSAL", "GROUP", "TMA_OK"]
    _PRUNE = {"early_config_prune": _prune}
    _fwd_tuned = triton.autotune(_cfgs("fwd", [(128, 64, 4, 2, True), (128, 128, 8, 3, True), (256, 64, 8, 3, True),
                                               (128, 64, 8, 3, False)]),
                                 key=_TUNE_KEY, prune_configs_by=_PRUNE)(_fwd_kernel)
    _dkdv_tuned = triton.autotune(_cfgs("dkdv", [(64, 128, 8, 3, True), (64, 128, 8, 4, True), (64, 64, 4, 2, True),
                                                 (32, 128, 8, 3, False)]),
                                  key=_TUNE_KEY, prune_configs_by=_PRUNE)(_bwd_dkdv_kernel)
    _dq_tuned = triton.autotune(_cfgs("dq", [(128, 64, 8, 3, True), (128, 64, 8, 3, False), (64, 32, 4, 2, True)]),
                                key=_TUNE_KEY, prune_configs_by=_PRUNE)(_bwd_dq_kernel)

_FIXED = {  # name -> (BLOCK_M, BLOCK_N, num_warps, num_stages) for small problems
    "fwd": (64, 64, 4, 2), "dkdv": (64, 64, 4, 2), "dq": (64, 64, 4, 2),
}
_FIXED_INTERPRET = {  # odd pairings on purpose: BLOCK_M != BLOCK_N exercises the bound arithmetic
    "fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1),
}
# fp32 inputs with a padded head dim of 128 (D = 72..128): the 64x64 two-stage tiles above need 262,656 bytes of
# shared memory in fp32 (H200 limit 232,448; seen in a compiled GPU run of tests/test_kernels.py, cases D=72 and
# D=80). Tiles of a quarter the size, one stage. The fp32 path is the accuracy path, not the fast one.
_FIXED_FP32_WIDE = {"fwd": (32, 32, 4, 1), "dkdv": (32, 32, 4, 1), "dq": (32, 32, 4, 1)}
_TUNE_MIN_WORK = 1024 * 1024  # Tq * Tk below this: fixed config


def _bucket(n):
    """Autotuning key: the next power of two, capped at 16k (longer sequences reuse the 16k choice)."""
    return min(1 << max(0, int(n) - 1).bit_length(), 16384)


def _fixed_config(name, dot_prec, block_d):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of kernel `name` when it is not autotuned."""
    if _INTERPRET:
        return _FIXED_INTERPRET[name]
    return (_FIXED_FP32_WIDE if dot_prec == "tf32x3" and block_d > 64 else _FIXED)[name]


def _launch(name, tuned, raw, grid_fn, args, consts, Tq, Tk, tma):
    """Run `tuned` (autotuned, TMA or not) on large 16-bit problems, else `raw` with the fixed config (fp32 inputs
    too: the tuned tiles are sized for 16-bit data and would overflow shared memory in fp32)."""
    if not _INTERPRET and Tq * Tk >= _TUNE_MIN_WORK and consts["DOT_PREC"] != "tf32x3":
        tuned[lambda meta: grid_fn(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **consts)
        return
    bm, bn, w, s = _fixed_config(name, consts["DOT_PREC"], consts["BLOCK_D"])
    nargs = dict(zip(raw.arg_names, args), **consts, BLOCK_M=bm, BLOCK_N=bn)
    _HOOKS[name](nargs)  # TMA descriptors: block shapes of this config
    raw[grid_fn(bm, bn)](*args, **consts, USE_TMA=bool(tma), BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)


L2_BUDGET = 24 << 20  # bytes of streamed K/V (Q/dO) one wave of heads may keep in L2 (H100/H200 have 50 MB)


def _heads_per_wave(n_heads, bytes_per_head):
    """Heads per wave of _program_order as far as L2 goes: as many of the n_heads (= B * Hkv) as have their
    streamed K/V (Q/dO) fit L2_BUDGET together; at least 1 (the kernel raises it for load balance)."""
    return min(n_heads, max(1, L2_BUDGET // max(1, bytes_per_head)))


def _wave_args(n_heads, rows, heads, x):
    """(HEADS_PER_WAVE, MIN_WAVE) of a launch whose programs each stream 2 tensors (K and V, or Q and dO) of
    `rows` rows and `heads` heads of x's width (D) and element size."""
    return _heads_per_wave(n_heads, 2 * rows * heads * x.shape[-1] * x.element_size()), _min_wave(x)


def _min_wave(x):
    """Programs a wave of _program_order needs for load balance: two per SM (the 4-warp configs fit two)."""
    return 2 * _sm_count(x.device.index) if x.is_cuda else 1


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _dev(x):
    """Launch on the tensor's own GPU (ring ranks), not whatever device is current."""
    return torch.cuda.device(x.device) if x.is_cuda else _nullctx()


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _lastdim_contig(x):
    return x if x.stride(-1) == 1 else x.contiguous()


@functools.lru_cache(maxsize=None)
def _capability(index):
    return torch.cuda.get_device_capability(index)


def _tma_ok(D, *xs):
    """Can these (B, T, heads, D) tensors be read through 2-D TMA descriptors over their (B*T, heads*D) view?

    Needs Hopper or newer, 16-bit data, D a power of two (a padded block would read the next head's columns),
    heads packed (stride D), batches contiguous in T, and 16-byte alignment of base and row stride."""
    if TensorDescriptor is None or not all(x.is_cuda for x in xs):
        return False
    if _capability(xs[0].device.index)[0] < 9 or D not in (64, 128):
        return False
    return all(x.dtype in (torch.float16, torch.bfloat16) and x.stride(3) == 1 and x.stride(2) == D
               and (x.shape[0] == 1 or x.stride(0) == x.shape[1] * x.stride(1))
               and x.data_ptr() % 16 == 0 and (x.stride(1) * x.element_size()) % 16 == 0 for x in xs)


def _desc(x):
    """2-D TMA descriptor over the (B*T, heads*D) view of x (B, T, heads, D); block shape set per config."""
    B, T, Hx, D = x.shape
    return TensorDescriptor(x, shape=[B * T, Hx * D], strides=[x.stride(1), 1], block_shape=[16, D])


def _triton_consts(q, D, causal):
    block_d = max(16, triton.next_power_of_2(D))
    if D > 128:
        raise ValueError(f"kernels: the triton backend supports head dims up to 128, got {D}; use backend='torch'")
    return dict(HEAD_DIM=D, BLOCK_D=block_d, EVEN_D=block_d == D, CAUSAL=bool(causal), UPCAST=_INTERPRET,
                DOT_PREC=_fp32_dot_precision() if q.dtype == torch.float32 else "tf32")


def _fp32_dot_precision():
    """fp32 inputs: "ieee" in the interpreter (numpy), "tf32x3" on GPU (three tf32 tensor-core products, ~fp32
    accuracy). A plain-FMA "ieee" dot of 64x64x128 tiles unrolls into a kernel that ptxas needs minutes to compile
    (seen on H100 with triton 3.6: a first fp32 test did not finish compiling within 130 s)."""
    return "ieee" if _INTERPRET else "tf32x3"


def _triton_forward(q, k, v, causal, scale, q_offset, k_offset, out_fp32, tma=None):
    """tma: None -> pass TMA descriptors where _tma_ok (autotuning then picks TMA or pointer loads per kernel);
    True/False force (tests run both paths in the interpreter)."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    q, k, v = _lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(v)
    out = torch.empty((B, Tq, H, D), dtype=torch.float32 if out_fp32 else q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if B * Tq * H == 0:
        return out, lse
    if Tk == 0:  # nothing to attend to: every row is empty
        return out.zero_(), lse.fill_(float("-inf"))
    tma = _tma_ok(D, q, k, v) if tma is None else tma
    consts = _triton_consts(q, D, causal)
    descs = (_desc(q), _desc(k), _desc(v)) if tma else (q, k, v)
    args = (q, k, v, out, lse) + descs + (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        Tq, Tk, H, H // Hkv, q_offset - k_offset, scale * LOG2E, _bucket(Tq), _bucket(Tk), int(tma))
    args += _wave_args(B * Hkv, Tk, 1, k)                          # each program streams K and V of its KV head
    with _dev(q):
        _launch("fwd", _fwd_tuned, _fwd_kernel, lambda bm, bn: (B * H * triton.cdiv(Tq, bm),), args, consts, Tq, Tk,
                tma)
    return out, lse


def _triton_backward(dout, q, k, v, out, lse, causal, scale, q_offset, k_offset, grad_fp32, tma=None, on_dkdv=None):
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    q, k, v, out, dout = (_lastdim_contig(x) for x in (q, k, v, out, dout))
    lse = lse.float().contiguous()
    gdt = torch.float32 if grad_fp32 else q.dtype
    dq = torch.empty((B, Tq, H, D), dtype=gdt, device=q.device)
    dk = torch.empty((B, Tk, Hkv, D), dtype=gdt, device=q.device)
    dv = torch.empty((B, Tk, Hkv, D), dtype=gdt, device=q.device)
    if B * Tq * H == 0 or Tk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    tma = _tma_ok(D, q, k, v, dout) if tma is None else tma
    consts = _triton_consts(q, D, causal)
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    lse2 = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    with _dev(q):
        pre_m = 64
        _bwd_preprocess[(B * H, triton.cdiv(Tq, pre_m))](
            out, dout, lse, delta, lse2, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
            dout.stride(2), Tq, H, HEAD_DIM=D, BLOCK_D=consts["BLOCK_D"], BLOCK_M=pre_m)
        common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
        tail = (Tq, Tk, H, H // Hkv, q_offset - k_offset, scale, scale * LOG2E, _bucket(Tq), _bucket(Tk), int(tma))
        _launch("dkdv", _dkdv_tuned, _bwd_dkdv_kernel, lambda bm, bn: (B * Hkv * triton.cdiv(Tk, bn),),
                (q, k, v, dout, lse2, delta, dk, dv) + ((_desc(q), _desc(dout)) if tma else (q, dout)) + common
                + (dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2)) + tail
                + _wave_args(B * Hkv, Tq, H // Hkv, q),            # Q and dO of the KV head's query heads
                consts, Tq, Tk, tma)
        if on_dkdv is not None:  # dk/dv are final (in stream order) before the dQ kernel is even queued
            on_dkdv(dk, dv)
        _launch("dq", _dq_tuned, _bwd_dq_kernel, lambda bm, bn: (B * H * triton.cdiv(Tq, bm),),
                (q, k, v, dout, lse2, delta, dq) + ((_desc(k), _desc(v)) if tma else (k, v)) + common
                + (dq.stride(0), dq.stride(1), dq.stride(2)) + tail
                + _wave_args(B * Hkv, Tk, 1, k),                   # K and V of one KV head
                consts, Tq, Tk, tma)
    return dq, dk, dv

# -----------------------------------------------------------------------------
# cuDNN: torch's own fused attention op as a third backend (CUDA, 16-bit)
#
# Triton 3.6 does not warp-specialise these kernels on Hopper (top of this file), and cuDNN's attention is ~1.1-1.4x
# faster there. torch exposes it with the log-sum-exp as aten._scaled_dot_product_cudnn_attention (what torch's own
# context_parallel ring calls), so the same ring/merge code can run on it. It knows one causal mask: top-left on
# equal lengths. Calls it cannot do exactly fall back to Triton.

def _cudnn_ok(q, k, causal, q_offset, k_offset):
    """Does this call fit cuDNN: 16-bit CUDA tensors, D % 8 == 0 and D <= 128, and a mask that is either none or
    the square causal one (Tq == Tk, q_offset == k_offset). Every zigzag ring step and the model's own call fit."""
    Tq, Tk, D = q.shape[1], k.shape[1], q.shape[3]
    mask_ok = (not causal) or (Tq == Tk and q_offset == k_offset)
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= 128 and mask_ok
            and q.shape[0] * Tq * Tk > 0)


def _expand_kv(x, G):
    """(B, T, Hkv, D) -> (B, T, Hkv*G, D), query head h reading KV head h // G. Done here, on this GPU, after any
    communication, so rings move only the real KV heads. (torch 2.11's cuDNN op also takes fewer KV heads itself,
    bit-identical: passing them so was timed on 2 H200 in 8B training and changed nothing measurable, 43.0 vs 43.2%
    MFU at 64k, so the simpler copy stays.)"""
    return x if G == 1 else x.repeat_interleave(G, dim=2)


def _cudnn_forward(q, k, v, causal, scale, out_fp32):
    B, Tq, H, D = q.shape
    G = H // k.shape[2]
    t = lambda x: x.transpose(1, 2)                                      # (B, T, heads, D) -> (B, heads, T, D) view
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        t(q), t(_expand_kv(k, G)), t(_expand_kv(v, G)), None, True, 0.0, bool(causal), False, scale=scale)
    out = res[0].transpose(1, 2)                                         # (B, Tq, H, D)
    lse = res[1].reshape(B, H, Tq).float()                               # (B, H, Tq, 1) -> (B, H, Tq), natural log
    return (out.float() if out_fp32 else out), lse


def _cudnn_backward(dout, q, k, v, out, lse, causal, scale, grad_fp32):
    """cuDNN's backward from the GLOBAL out/lse (a ring passes them): P = exp(S - lse) per block, as ours."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    t = lambda x: x.transpose(1, 2)
    # out and dout in one layout (cuDNN reads both with one stride set), both in the inputs' dtype
    out = out.to(q.dtype).contiguous()                                   # (B, Tq, H, D)
    dout = dout.to(q.dtype).contiguous()                                 # (B, Tq, H, D)
    lse4 = lse.float().contiguous().unsqueeze(-1)                        # (B, H, Tq, 1) as the op returns it
    philox = torch.zeros(1, dtype=torch.int64, device=q.device)          # dropout seed/offset: unused at p = 0
    # attn_bias and the varlen cu_seq tensors: undefined (None), which the op reads as dense 4-D, no bias
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        t(dout), t(q), t(_expand_kv(k, G)), t(_expand_kv(v, G)), t(out), lse4, philox, philox, None, None, None,
        Tq, Tk, 0.0, bool(causal), scale=scale)                          # (B, H, T, D) each
    dq, dk, dv = t(dq), t(dk), t(dv)                                     # (B, T, H, D)
    if G > 1:   # the expanded heads' gradients summed back onto their KV head
        dk = dk.reshape(B, Tk, Hkv, G, D).sum(3, dtype=torch.float32)    # (B, Tk, Hkv, D)
        dv = dv.reshape(B, Tk, Hkv, G, D).sum(3, dtype=torch.float32)    # (B, Tk, Hkv, D)
    gdt = torch.float32 if grad_fp32 else q.dtype
    return dq.to(gdt), dk.to(gdt), dv.to(gdt)

# -----------------------------------------------------------------------------
# the dispatcher (the interface of SPEC.md)

def _fully_visible(causal, Tk, q_offset, k_offset):
    """A causal call whose first query already sees the last key has no mask at all: drop it (cuDNN can then
    take it, and the Triton kernels skip the per-block mask test)."""
    return causal and q_offset >= k_offset + Tk - 1


def _route(backend, q, k, causal, q_offset, k_offset):
    """(the backend that really runs, the mask it runs with): a fully visible causal call loses its mask, and
    "cudnn" falls back to "triton" for calls it cannot do exactly."""
    causal = bool(causal) and not _fully_visible(causal, k.shape[1], q_offset, k_offset)
    backend = _pick_backend(backend, q)
    if backend == "cudnn" and not _cudnn_ok(q, k, causal, q_offset, k_offset):
        backend = "triton" if HAS_TRITON else "torch"
    return backend, causal


def attention_forward(q, k, v, causal=True, softmax_scale=None, q_offset=0, k_offset=0, out_fp32=False,
                      backend=None):
    """Attention of q (B,Tq,H,D) over k, v (B,Tk,Hkv,D) -> (out (B,Tq,H,D), lse (B,H,Tq) fp32, natural log).

    causal: query i sees key j iff q_offset + i >= k_offset + j (true positions). A row that sees no key gets
    out 0 and lse -inf. out_fp32: return out in fp32 (ring merging; cuDNN computes it in 16 bits and upcasts).
    backend: None (DEFAULT_BACKEND, else triton on CUDA, torch elsewhere), "triton", "torch" or "cudnn" (calls
    whose mask cuDNN cannot express run on triton)."""
    scale = _check(q, k, v, softmax_scale)[-1]
    backend, causal = _route(backend, q, k, causal, q_offset, k_offset)
    if backend == "cudnn":
        return _cudnn_forward(q, k, v, causal, scale, bool(out_fp32))
    fn = _triton_forward if backend == "triton" else _torch_forward
    return fn(q, k, v, causal, scale, int(q_offset), int(k_offset), bool(out_fp32))


def attention_backward(dout, q, k, v, out, lse, causal=True, softmax_scale=None, q_offset=0, k_offset=0,
                       grad_fp32=False, backend=None, on_dkdv=None):
    """Gradients (dq (B,Tq,H,D), dk (B,Tk,Hkv,D), dv) of attention_forward, from the GLOBAL out and lse.

    dk/dv are summed over the H/Hkv query heads sharing a KV head. grad_fp32: return fp32 gradients.
    on_dkdv(dk, dv): called as soon as dk/dv are final in stream order; on the triton backend that is BEFORE the
    dQ kernel is queued, so a ring can put dk/dv on the wire while dQ computes (other backends: at the end)."""
    B, Tq, H, D, Tk, _, scale = _check(q, k, v, softmax_scale)
    if dout.shape != q.shape or out.shape != q.shape or tuple(lse.shape) != (B, H, Tq):
        raise ValueError(f"kernels: dout {tuple(dout.shape)} and out {tuple(out.shape)} must match q "
                         f"{tuple(q.shape)}, lse {tuple(lse.shape)} must be {(B, H, Tq)}")
    backend, causal = _route(backend, q, k, causal, q_offset, k_offset)
    if backend == "triton":
        return _triton_backward(dout, q, k, v, out, lse, causal, scale, int(q_offset), int(k_offset),
                                bool(grad_fp32), on_dkdv=on_dkdv)
    if backend == "cudnn":
        dq, dk, dv = _cudnn_backward(dout, q, k, v, out, lse, causal, scale, bool(grad_fp32))
    else:
        dq, dk, dv = _torch_backward(dout, q, k, v, out, lse, causal, scale, int(q_offset), int(k_offset),
                                     bool(grad_fp32))
    if on_dkdv is not None:
        on_dkdv(dk, dv)
    return dq, dk, dv


class _FlashAttn(torch.autograd.Function):
    """out = attention(q, k, v); saves q, k, v, out, lse; backward recomputes P from lse."""

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, backend):
        out, lse = attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale, backend=backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.softmax_scale, ctx.backend = causal, softmax_scale, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout.contiguous(), q, k, v, out, lse, causal=ctx.causal,
                                        softmax_scale=ctx.softmax_scale, backend=ctx.backend)
        return dq, dk, dv, None, None, None


def flash_attn_func(q, k, v, causal=True, softmax_scale=None, backend=None):
    """Differentiable attention: q (B,T,H,D), k/v (B,T,Hkv,D) -> (B,T,H,D). The model's default on CUDA."""
    return _FlashAttn.apply(q, k, v, causal, softmax_scale, backend)

# -----------------------------------------------------------------------------
# fused elementwise ops of the decoder block: RMSNorm, SwiGLU, RoPE (Triton, CUDA training)
#
# In eager PyTorch each of these is a chain of small kernels over (T, C)-sized tensors: the HF-exact RMSNorm is
# 7 of them (upcast, square, mean, rsqrt, multiply, downcast, gain) with fp32 temporaries, RoPE slices, multiplies
# and concatenates, SwiGLU writes silu(gate) before multiplying: each pass reads and writes the whole tensor (the
# RMSNorm forward moves ~9x the bytes of its input and output). Each op below is one kernel forward and one
# backward, reading its inputs once and writing its outputs once, in fp32 arithmetic with 16-bit storage
# (`python bench.py ops`: RMSNorm 13x, RoPE 10x, SwiGLU 1.8x faster forward+backward on an H200 at 32k tokens).
# Their PyTorch twins are the model's own eager functions (longvila.rms_norm, longvila.apply_rotary_emb,
# longvila.swiglu), which longvila.py calls on CPU; it calls these on CUDA tensors while FUSED_OPS is True
# (train.py --no-fused_ops switches them off for comparison). Differences to the twins: the twins round every
# intermediate to 16 bits, these round once at the end.

# True: the model uses the fused ops on CUDA tensors; False: never; "always": on CPU tensors too, in Triton's
# interpreter (tests: the model through the fused ops, checkpointing included).
MAX_NORM_WIDTH = 16384  # rms_norm keeps a whole row in registers: wider rows take the eager twin

if HAS_TRITON:
    @triton.jit
    def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, C, eps, BLOCK_C: tl.constexpr):
        # one program per row: the whole row (C <= 16k) sits in registers
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
        # one program per token: all its heads at once; y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin (rotate_half
        # layout). SIGN = -1 rotates back by the same angle, which is the backward (a rotation's transpose).
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
        if M == 0 or C == 0:
            return y.view(x.shape[:-1] + (C,))  # (..., C)
        with _dev(x):
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
        with _dev(x2):
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
        if n == 0:
            return y
        with _dev(gate):
            _swiglu_fwd_kernel[(triton.cdiv(n, _SwiGLUFn.BLOCK),)](gate, up, y, n, BLOCK=_SwiGLUFn.BLOCK)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()  # (..., F)
        dg, du = torch.empty_like(gate), torch.empty_like(up)  # (..., F) each
        n = gate.numel()
        if n == 0:
            return dg, du
        with _dev(gate):
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
    if y.numel() == 0:
        return y
    with _dev(x):
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
    _pick_backend("triton", x)  # triton importable; CPU tensors only in the interpreter (clear errors otherwise)
    return _RMSNormFn.apply(x, weight, float(eps))


def swiglu(gate, up):
    """Fused silu(gate) * up (SwiGLU, Shazeer 2020): gate, up (..., F) -> (..., F), differentiable in both."""
    _pick_backend("triton", gate)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"kernels.swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype}"
                         " must match")
    return _SwiGLUFn.apply(gate, up)


def rotary(x, cos, sin):
    """Fused twin of longvila.apply_rotary_emb: x (B, T, HX, D), cos/sin (B, T, D/2) -> (B, T, HX, D)."""
    _pick_backend("triton", x)
    B, T, _, D = x.shape
    try:  # a batch of 1 serves every row, as in the eager twin (a stride-0 view, no copy)
        cos_b, sin_b = cos.expand(B, T, D // 2), sin.expand(B, T, D // 2)  # (B, T, D/2)
    except RuntimeError:
        cos_b = None
    if D % 2 or cos_b is None:
        raise ValueError(f"kernels.rotary: x {tuple(x.shape)} needs cos/sin of shape {(B, T, D // 2)}, got "
                         f"{tuple(cos.shape)} / {tuple(sin.shape)}")
    return _RotaryFn.apply(x, cos_b, sin_b)


def use_fused(x):
    """Should the model call the fused ops on x? triton importable, fp16/bf16/fp32, and a CUDA tensor with FUSED_OPS
    True, or any tensor the kernels can run on with FUSED_OPS = "always" (CPU: the interpreter)."""
    if not HAS_TRITON or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if _SETTINGS["fused_ops"] == "always":
        return x.is_cuda or _INTERPRET
    return _SETTINGS["fused_ops"] is True and x.is_cuda
