"""Tests for kernels.py: the Triton kernels (through Triton's interpreter on CPU, compiled on a GPU) and the PyTorch
twin, each against an fp64 reference at small odd shapes; autograd; and the ring-attention use (merge by lse).

    python -m pytest -q tests/test_kernels.py
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import kernels

# On a CPU machine conftest.py has set TRITON_INTERPRET=1, so backend="triton" runs the real kernels in the
# interpreter; on a GPU machine the same tests run the compiled kernels on the GPU.
DEVICE = "cuda" if torch.cuda.is_available() and not kernels._INTERPRET else "cpu"
needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON or (DEVICE == "cpu" and not kernels._INTERPRET),
                                  reason="triton kernels need a GPU or TRITON_INTERPRET=1")

# -----------------------------------------------------------------------------
# fp64 reference: dense softmax attention, bottom-right causal mask (the queries are the last Tq positions)

def reference(q, k, v, causal=True, scale=None):
    """q (B,Tq,H,D), k/v (B,Tk,Hkv,D) in any dtype -> (out (B,Tq,H,D), lse (B,H,Tq)) in fp64; empty rows 0/-inf."""
    q, k, v = q.double(), k.double(), v.double()
    B, Tq, H, D = q.shape
    Tk, G = k.shape[1], H // k.shape[2]
    kk, vv = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)  # (B, Tk, H, D)
    scale = D ** -0.5 if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale           # (B, H, Tq, Tk)
    if causal:
        i, j = torch.arange(Tq, device=q.device)[:, None], torch.arange(Tk, device=q.device)[None, :]
        s = s.masked_fill(j > i + Tk - Tq, float("-inf"))
    lse = torch.logsumexp(s, -1)                                   # (B, H, Tq)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)              # empty rows: 0
    return torch.einsum("bhqk,bkhd->bqhd", p, vv), lse


def reference_grads(q, k, v, dout, **kw):
    qq, kk, vv = (x.detach().double().requires_grad_() for x in (q, k, v))
    out, _ = reference(qq, kk, vv, **kw)
    return torch.autograd.grad(out, (qq, kk, vv), dout.double())


def rel(a, b):
    """Max abs error relative to the reference's max magnitude (robust for rows of zeros)."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def tol(backend, dtype, tight):
    """fp32 arithmetic (torch twin, interpreter) -> tight; compiled fp32 (tf32x3) -> 10x tight; compiled GPU kernels
    with 16-bit operands in the matrix products (P and dS rounded to bf16/fp16 as in every flash attention) -> 2e-2 /
    5e-2."""
    if backend == "torch" or kernels._INTERPRET or DEVICE == "cpu":
        return tight
    if dtype == torch.float32:  # compiled fp32: tf32x3 tensor-core products
        return tight * 10
    return 2e-2 if tight <= 1e-5 else 5e-2


def make(B, Tq, Tk, H, Hkv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, H, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, Tk, Hkv, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Tk, Hkv, D, generator=g).to(DEVICE, dtype)
    dout = torch.randn(B, Tq, H, D, generator=g).to(DEVICE, dtype)
    return q, k, v, dout

# -----------------------------------------------------------------------------
# forward + backward of both backends vs fp64 (lengths not multiples of the interpreter blocks 16/32)

CASES = {  # name: (B, Tq, Tk, H, Hkv, D, causal, dtype)
    # fewer queries than keys (the last 37 positions of 53): early key blocks are seen by every query (no mask)
    "gqa4-queries-last": (1, 37, 53, 4, 1, 64, True, torch.float32),
    # more queries than keys: the first 9 rows see nothing (out 0, lse -inf), GQA 8:1, bf16
    "gqa8-bf16-empty-rows": (1, 50, 41, 8, 1, 64, True, torch.bfloat16),
    "full-fp16": (1, 45, 29, 4, 2, 64, False, torch.float16),
    "full-d128": (1, 33, 70, 4, 4, 128, False, torch.float32),
    "self-causal-d32": (1, 61, 61, 2, 2, 32, True, torch.bfloat16),
    "one-query-d16": (1, 1, 40, 4, 2, 16, True, torch.float32),   # a decode step: the mask is dropped
    # two batches: a TMA block that runs past one batch's last row reads the next batch's rows (must not leak)
    "batch2": (2, 29, 43, 4, 2, 64, True, torch.bfloat16),
}


def check_backend(backend, case):
    B, Tq, Tk, H, Hkv, D, causal, dt = CASES[case]
    q, k, v, dout = make(B, Tq, Tk, H, Hkv, D, dt)
    kw = dict(causal=causal)
    ref_out, ref_lse = reference(q, k, v, **kw)
    out, lse = kernels.attention_forward(q, k, v, out_fp32=True, backend=backend, **kw)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == (B, H, Tq)
    empty = torch.isinf(ref_lse).cpu()
    assert torch.equal(torch.isneginf(lse).cpu(), empty), "rows with no visible key must have lse -inf, only those"
    assert float(out.cpu()[empty.transpose(1, 2)[..., None].expand(B, Tq, H, D)].abs().sum()) == 0.0
    assert rel(out, ref_out) < tol(backend, dt, 1e-5)
    if not empty.all():
        assert (lse.cpu().double()[~empty] - ref_lse.cpu()[~empty]).abs().max() < tol(backend, dt, 1e-5)
    # storage dtype output: only the final rounding differs
    out16, _ = kernels.attention_forward(q, k, v, backend=backend, **kw)
    assert out16.dtype == dt and rel(out16, ref_out) < (1e-2 if dt == torch.bfloat16 else 2e-3)
    # backward with fp32 gradients, from the kernel's own out/lse; and in the storage dtype
    ref_g = reference_grads(q, k, v, dout, **kw)
    grads = kernels.attention_backward(dout, q, k, v, out, lse, grad_fp32=True, backend=backend, **kw)
    for name, g, r in zip("dq dk dv".split(), grads, ref_g):
        assert g.dtype == torch.float32 and g.shape == r.shape
        assert rel(g, r) < tol(backend, dt, 1e-4) if r.abs().max() > 0 else g.abs().max() == 0, name
    grads16 = kernels.attention_backward(dout, q, k, v, out16, lse, backend=backend, **kw)
    for g, r in zip(grads16, ref_g):
        assert g.dtype == dt and (rel(g, r) < max(2e-2, tol(backend, dt, 1e-4)) if r.abs().max() > 0
                                  else g.abs().max() == 0)


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_fp64(case):
    check_backend("triton", case)


@needs_triton
@pytest.mark.parametrize("case", ["gqa8-bf16-empty-rows", "batch2"])
def test_triton_tma_path_matches_fp64(case, monkeypatch):
    # the Hopper path: K/V (forward, dQ) and Q/dO (dK/dV) read by 2-D TMA descriptors over the (B*T, heads*D) view
    if kernels._TensorDescriptor() is None:
        pytest.skip("this triton has no TensorDescriptor")
    monkeypatch.setattr(kernels, "_tma_ok", lambda *xs: True)
    check_backend("triton", case)


@needs_triton
def test_triton_program_order_waves_change_nothing(monkeypatch):
    # _program_order maps the 1-D grid to (batch, KV head, group member, block) in waves of heads that fit
    # L2_BUDGET; every program computes the same tile whatever the wave size, so results must be bitwise equal.
    # B*Hkv = 6 KV heads (2 batches x 3), 2 query heads each, 3 blocks of every kernel in the interpreter (70 rows,
    # blocks of 32), and the minimum wave (2 programs per SM on a GPU) off so these waves run there too. fp32 K/V of
    # one KV head are 70*64*4*2 = 35,840 bytes, the dK/dV kernel's Q/dO of its 2 query heads 71,680: budget 1 ->
    # waves of 1 head; 4 * 35,840 -> forward and dQ in waves of 4 + 2 (a short last wave), dK/dV 2 + 2 + 2;
    # 4 * 71,680 -> forward and dQ in one wave of 6, dK/dV 4 + 2; the default -> one wave of all 6.
    assert kernels._heads_per_wave(32, 8 << 20) == 3 and kernels._heads_per_wave(8, 1) == 8
    assert kernels._heads_per_wave(7, 64 << 20) == 1
    monkeypatch.setattr(kernels, "_min_wave", lambda x: 1)
    q, k, v, dout = make(2, 70, 70, 6, 3, 64, torch.float32)
    runs = []
    for budget in (kernels.L2_BUDGET, 1, 4 * 35840, 4 * 71680):
        monkeypatch.setattr(kernels, "L2_BUDGET", budget)
        out, lse = kernels.attention_forward(q, k, v, backend="triton")
        runs.append((out, lse) + tuple(kernels.attention_backward(dout, q, k, v, out, lse, backend="triton")))
    ref = reference(q, k, v, causal=True)[:1] + reference_grads(q, k, v, dout, causal=True)
    for got, r in zip(runs[0][:1] + runs[0][2:], ref):
        assert rel(got, r) < 1e-4
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("case", list(CASES))
def test_torch_twin_matches_fp64(case):
    check_backend("torch", case)


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees those infs before the mask
def test_triton_backward_very_negative_scores():
    # every score near -240, so lse ~ -237: a zero-padded key past Tk has score 0 and exp(0 - lse) = inf in fp32;
    # the backward must keep such keys out of dQ (not just rely on their zero rows: inf * 0 = nan)
    B, Tq, Tk, H, D = 1, 23, 41, 2, 64
    g = torch.Generator().manual_seed(7)
    k = (1.0 + 0.1 * torch.randn(B, Tk, H, D, generator=g)).to(DEVICE)     # (B, Tk, H, D) all near +1
    q = (-30.0 + torch.randn(B, Tq, H, D, generator=g)).to(DEVICE)         # (B, Tq, H, D) scores ~ -30 * 64 / 8
    v, dout = torch.randn(B, Tk, H, D, generator=g).to(DEVICE), torch.randn(B, Tq, H, D, generator=g).to(DEVICE)
    out, lse = kernels.attention_forward(q, k, v, causal=False, backend="triton")
    assert lse.max() < -150
    grads = kernels.attention_backward(dout, q, k, v, out, lse, causal=False, grad_fp32=True, backend="triton")
    for name, gr, r in zip("dq dk dv".split(), grads, reference_grads(q, k, v, dout, causal=False)):
        assert torch.isfinite(gr).all() and rel(gr, r) < tol("triton", torch.float32, 1e-4), name


@needs_triton
def test_triton_noncontiguous_inputs_and_scale():
    # q/k/v as slices of a packed qkv tensor (strided heads), custom scale
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(1, 40, 3, 4, 64, generator=g).to(DEVICE)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]            # (B, T, H, D), non-contiguous
    out, lse = kernels.attention_forward(q, k, v, softmax_scale=0.3, backend="triton")
    ref_out, ref_lse = reference(q, k, v, scale=0.3)
    assert rel(out, ref_out) < 1e-5 and rel(lse, ref_lse) < 1e-5

# -----------------------------------------------------------------------------
# autograd and the ring-attention use

@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_flash_attn_func_gradients(backend):
    q, k, v, dout = make(1, 35, 35, 4, 2, 64, torch.float32, seed=3)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = kernels.flash_attn_func(q, k, v, causal=True, backend=backend)
    out.backward(dout)
    ref_g = reference_grads(q, k, v, dout)
    assert rel(out, reference(q, k, v)[0]) < 1e-5
    for g, r in zip((q.grad, k.grad, v.grad), ref_g):
        assert rel(g, r) < 1e-4


def merge(out_a, lse_a, out_b, lse_b):
    """LSE merge of two partial attentions (LONGVILA.md, ring numerics): out (B,T,H,D) fp32, lse (B,H,T)."""
    lse_a_t, lse_b_t = lse_a.transpose(1, 2)[..., None], lse_b.transpose(1, 2)[..., None]  # (B, T, H, 1)
    out = out_a - torch.sigmoid(lse_b_t - lse_a_t) * (out_a - out_b)
    lse = lse_a - torch.nn.functional.logsigmoid(lse_a - lse_b)
    return out, lse


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_ring_style_two_key_blocks_merge_to_full(backend):
    # the queries are the second half of the sequence (positions 24..47); its keys come in two blocks, as a ring
    # delivers them: the first half (all in the past: no mask) and the second half (the diagonal: causal)
    T = 48
    q, k, v, dout = make(1, T, T, 4, 2, 64, torch.bfloat16, seed=4)
    qs, d = q[:, 24:], dout[:, 24:]                                # (B, 24, H, D)
    k1, v1, k2, v2 = k[:, :24], v[:, :24], k[:, 24:], v[:, 24:]
    o1, l1 = kernels.attention_forward(qs, k1, v1, causal=False, out_fp32=True, backend=backend)
    o2, l2 = kernels.attention_forward(qs, k2, v2, causal=True, out_fp32=True, backend=backend)
    out, lse = merge(o1, l1, o2, l2)
    full_out, full_lse = kernels.attention_forward(qs, k, v, causal=True, out_fp32=True, backend=backend)
    t = tol(backend, torch.bfloat16, 1e-5)
    assert rel(out, full_out) < t and rel(lse, full_lse) < t
    # backward per key block with the GLOBAL out/lse: dq sums over blocks, dk/dv concatenate
    g1 = kernels.attention_backward(d, qs, k1, v1, out, lse, causal=False, grad_fp32=True, backend=backend)
    g2 = kernels.attention_backward(d, qs, k2, v2, out, lse, causal=True, grad_fp32=True, backend=backend)
    gf = kernels.attention_backward(d, qs, k, v, full_out, full_lse, causal=True, grad_fp32=True, backend=backend)
    assert rel(g1[0] + g2[0], gf[0]) < t
    assert rel(torch.cat([g1[1], g2[1]], 1), gf[1]) < t and rel(torch.cat([g1[2], g2[2]], 1), gf[2]) < t

# -----------------------------------------------------------------------------
# dispatch and errors

def test_dispatch_and_errors():
    q, k, v, _ = make(1, 8, 8, 4, 2, 16, torch.float32)
    out_default, _ = kernels.attention_forward(q, k, v)             # backend None: triton on CUDA, torch on CPU
    out_torch, _ = kernels.attention_forward(q, k, v, backend="torch")
    assert rel(out_default, out_torch) < 1e-5
    with pytest.raises(ValueError, match="multiple of KV heads"):
        kernels.attention_forward(q, k[:, :, :1].repeat(1, 1, 3, 1), v[:, :, :1].repeat(1, 1, 3, 1))
    with pytest.raises(ValueError, match="backend"):
        kernels.attention_forward(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="same dtype|one dtype"):
        kernels.attention_forward(q, k.half(), v)


def test_import_without_triton():
    # `import kernels` must survive a machine without triton; the twin then serves backend None
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import torch, kernels\nassert not kernels.HAS_TRITON\n"
            "q = torch.randn(1, 5, 2, 16)\nout, lse = kernels.attention_forward(q, q, q)\n"
            "assert out.shape == q.shape and lse.shape == (1, 2, 5)\nprint('ok')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr

# -----------------------------------------------------------------------------
# GPU only: real sizes, bf16 error within 2x of torch SDPA's own error vs an fp32 reference

GPU_BACKENDS = [("triton", 32), ("triton", 8), ("cudnn", 8), ("flash", 32), ("flash", 8)]


def needs_backend(backend):
    if DEVICE != "cuda":
        pytest.skip("needs a CUDA GPU")
    q = torch.empty(1, 2, 2, 64, device="cuda", dtype=torch.bfloat16)
    why = kernels.cannot_run(backend, q, q, True)
    if why is not None:
        pytest.skip(f"backend {backend}: {why}")


@pytest.mark.parametrize("backend,Hkv", GPU_BACKENDS)
def test_gpu_real_size_error_vs_sdpa(backend, Hkv):
    # bf16 at 4k tokens, causal: out and gradients within 2x the error of torch SDPA's flash kernel vs fp32
    needs_backend(backend)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, T, H, D = 1, 4096, 32, 128
    q, k, v, dout = make(B, T, T, H, Hkv, D, torch.bfloat16, seed=5)
    G = H // Hkv

    def sdpa(q, k, v):  # (B, T, H, D) layout in and out; KV repeated for GQA
        qt = q.transpose(1, 2)                                      # (B, H, T, D)
        kt, vt = (x.repeat_interleave(G, 2).transpose(1, 2) for x in (k, v))  # (B, Hkv, T, D) -> (B, H, T, D)
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)

    def run(fn, dtype):
        xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = fn(*xs)
        out.backward(dout.to(dtype))
        return [out.detach()] + [x.grad for x in xs]

    with sdpa_kernel([SDPBackend.MATH]):
        ref = run(sdpa, torch.float32)                              # fp32 reference
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        base = run(sdpa, torch.bfloat16)
    ours = run(lambda q, k, v: kernels.flash_attn_func(q, k, v, causal=True, backend=backend), torch.bfloat16)
    for name, o, s, r in zip("out dq dk dv".split(), ours, base, ref):
        err_o = ((o.float() - r).norm() / r.norm()).item()
        err_s = ((s.float() - r).norm() / r.norm()).item()
        print(f"{backend} {name}: {err_o:.2e}  sdpa-flash {err_s:.2e}")
        assert math.isfinite(err_o) and err_o <= 2 * err_s, name


@pytest.mark.parametrize("backend", ["cudnn", "flash", "triton"])
def test_gpu_ring_steps_and_save_attn(backend):
    # what a ring asks of a backend, bf16 on the GPU: two key blocks (the past, unmasked; the diagonal, causal)
    # merged by their lse equal one causal call, and the backward of each block from the GLOBAL out/lse adds up
    needs_backend(backend)
    T = 2048
    q, k, v, dout = make(1, T, T, 8, 2, 128, torch.bfloat16, seed=6)
    h = T // 2
    qs, d = q[:, h:], dout[:, h:]
    o1, l1 = kernels.attention_forward(qs, k[:, :h], v[:, :h], causal=False, out_fp32=True, backend=backend)
    o2, l2 = kernels.attention_forward(qs, k[:, h:], v[:, h:], causal=True, out_fp32=True, backend=backend)
    out, lse = merge(o1, l1, o2, l2)
    full_out, full_lse = kernels.attention_forward(qs, k, v, causal=True, out_fp32=True, backend=backend)
    assert rel(out, full_out) < 2e-2 and rel(lse, full_lse) < 1e-3
    g1 = kernels.attention_backward(d, qs, k[:, :h], v[:, :h], out, lse, causal=False, grad_fp32=True,
                                    backend=backend)
    g2 = kernels.attention_backward(d, qs, k[:, h:], v[:, h:], out, lse, causal=True, grad_fp32=True, backend=backend)
    gf = kernels.attention_backward(d, qs, k, v, full_out, full_lse, causal=True, grad_fp32=True, backend=backend)
    assert rel(g1[0] + g2[0], gf[0]) < 5e-2
    assert rel(torch.cat([g1[1], g2[1]], 1), gf[1]) < 5e-2 and rel(torch.cat([g1[2], g2[2]], 1), gf[2]) < 5e-2
    # selective checkpointing keeps this backend's forward: the recomputation does not run it again
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
    ops = kernels.saved_attention_ops()
    policy = lambda ctx, op, *a, **kw: CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE
    real, calls = kernels._FORWARD[backend], []
    kernels._FORWARD[backend] = lambda *a: calls.append(1) or real(*a)
    try:
        x = q.clone().requires_grad_()
        checkpoint(lambda x: kernels.flash_attn_func(x * 2, k, v, backend=backend), x, use_reentrant=False,
                   context_fn=lambda: create_selective_checkpoint_contexts(policy)).backward(dout)
    finally:
        kernels._FORWARD[backend] = real
    assert len(calls) == 1 and torch.isfinite(x.grad).all()


# -----------------------------------------------------------------------------
# fused elementwise ops (RMSNorm, SwiGLU, RoPE) vs their eager twins in longvila.py, both against fp64

def _fused_cases(dtype):
    """(name, fused fn, eager twin, inputs): odd sizes (C not a power of two, 3 heads, broadcast-free cos/sin)."""
    import longvila as lv
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)
    pos = torch.arange(5).expand(2, 5) + 7  # (B, T) true positions
    inv_freq = lv.rope_inv_freq(lv.LLMConfig(dim=24, n_heads=3, n_kv_heads=3, rope_theta=10000.0))  # D = 8
    cos, sin = lv.rope_cos_sin(pos, inv_freq, dtype=dtype)  # (B, T, D/2) as the model makes them
    cos, sin = cos.to(DEVICE), sin.to(DEVICE)
    return [("rms_norm", lambda x, w: kernels.rms_norm(x, w, 1e-5), lambda x, w: lv.rms_norm(x, w, 1e-5),
             (r(2, 7, 40) * 3, 1 + 0.1 * r(40))),
            ("swiglu", kernels.swiglu, lambda a, b: torch.nn.functional.silu(a) * b, (r(3, 5, 33) * 2, r(3, 5, 33))),
            ("rotary", lambda x: kernels.rotary(x, cos, sin), lambda x: lv.apply_rotary_emb(x, cos, sin),
             (r(2, 5, 3, 8),))]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ops_match_twins(dtype):
    # One kernel each way, fp32 arithmetic: outputs and every gradient at least as close to the fp64 twin as the
    # eager twin itself is in this dtype (the twin rounds each intermediate to 16 bits, the kernels round once).
    for name, fused, twin, xs in _fused_cases(dtype):
        outs = {}
        for label, fn, inputs in [("fused", fused, xs), ("twin", twin, xs),
                                  ("fp64", twin, tuple(x.double() for x in xs))]:
            inputs = tuple(x.detach().clone().requires_grad_() for x in inputs)
            y = fn(*inputs)
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
            outs[label] = [y] + list(torch.autograd.grad(y, inputs, dy))
            assert y.dtype == xs[0].dtype or label == "fp64"
        for i, (f, t, ref) in enumerate(zip(outs["fused"], outs["twin"], outs["fp64"])):
            err_f, err_t = (f.double() - ref).abs().max().item(), (t.double() - ref).abs().max().item()
            # bf16: plus one unit in the last place of the largest value, because Triton's interpreter rounds to
            # bf16 by truncation (seen: x.to(tl.bfloat16) is up to 1 ulp off where the GPU rounds to nearest)
            ulp = 2.0 ** (math.floor(math.log2(ref.abs().max().item())) - 7)
            # fp32: as close as the twin's own rounding (compiled kernels fuse and reorder the same float ops)
            tol = max(1e-6, 1.25 * err_t) if dtype == torch.float32 else 1.25 * err_t + ulp
            assert err_f <= tol, f"{name} {dtype} output/grad {i}: fused {err_f:.3g} twin {err_t:.3g}"


@needs_triton
def test_fused_ops_errors_and_strides():
    x = torch.randn(2, 4, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="cos/sin of shape"):
        kernels.rotary(x, torch.ones(2, 4, 3, device=DEVICE), torch.ones(2, 4, 3, device=DEVICE))
    with pytest.raises(ValueError, match="must match"):
        kernels.swiglu(x, x[..., :4])
    # a non-contiguous input (a slice of heads, as q/k are views of one projection) gives the contiguous result
    import longvila as lv
    big = torch.randn(2, 4, 5, 8, device=DEVICE)
    inv_freq = lv.rope_inv_freq(lv.LLMConfig(dim=40, n_heads=5, n_kv_heads=5, rope_theta=500000.0))  # D = 8
    cos, sin = lv.rope_cos_sin(torch.arange(4).expand(2, 4), inv_freq)
    cos, sin = cos.to(DEVICE), sin.to(DEVICE)
    torch.testing.assert_close(kernels.rotary(big[:, :, 1:4], cos, sin), lv.apply_rotary_emb(big[:, :, 1:4], cos, sin))
    w = torch.randn(8, device=DEVICE)
    bt = big.transpose(1, 2)  # (2, 5, 4, 8), non-contiguous rows
    torch.testing.assert_close(kernels.rms_norm(bt, w, 1e-6), lv.rms_norm(bt, w, 1e-6))
    # cos/sin of batch 1 serve a batch of 2 (broadcast, as in the twin); bf16 x with fp32 angles stays bf16 (autocast:
    # projections in bf16, angles in fp32), and the twin now returns x's dtype too
    xb = big.bfloat16()
    y = kernels.rotary(xb, cos[:1], sin[:1])
    assert y.dtype == torch.bfloat16 and lv.apply_rotary_emb(xb, cos[:1], sin[:1]).dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), lv.apply_rotary_emb(big, cos[:1], sin[:1]), atol=0.05, rtol=0.02)
    # empty inputs: empty outputs and gradients, no launch
    e = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    ew = torch.ones(8, device=DEVICE, requires_grad=True)
    kernels.rms_norm(e, ew, 1e-6).sum().backward()
    assert e.grad.shape == (0, 8) and torch.equal(ew.grad, torch.zeros(8, device=DEVICE))
    assert kernels.swiglu(e, e).shape == (0, 8)
    assert kernels.rotary(torch.zeros(1, 0, 2, 8, device=DEVICE), cos[:1, :0], sin[:1, :0]).numel() == 0


COMPILE_SMEM = r"""
import json, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
import kernels
kernels._INTERPRET = False  # the GPU tables, whatever this machine is
out = []
# the backward kernels hold the most tiles (fwd needs 196,608 bytes at the largest fp32 config); ~10 s a compile
for name, ptr, prec, D in [("dkdv", "*bf16", "tf32", 128), ("dkdv", "*fp32", "tf32x3", 128),
                           ("dq", "*fp32", "tf32x3", 128)]:
    fn = kernels._KERNELS[name]
    bm, bn, warps, stages = kernels._fixed_config(name, prec, D)
    consts = dict(D=D, CAUSAL=True, UPCAST=False, DOT_PREC=prec, USE_TMA=False, BLOCK_M=bm, BLOCK_N=bn)
    n_ptr = fn.arg_names.index("Tq")  # tensors come first, then sizes and scalars, then constexprs
    sig = {a: "constexpr" if a in consts else ptr if i < n_ptr else "fp32" if a.startswith("scale") else "i32"
           for i, a in enumerate(fn.arg_names)}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    out.append([name, ptr, D, k.metadata.shared])
print(json.dumps(out))
"""


@needs_triton
def test_fixed_configs_fit_hopper_shared_memory(tmp_path):
    # Compile (no GPU needed: Triton ships ptxas) every non-autotuned config for sm_90 and check its shared memory
    # against the H100/H200 per-block limit (232,448 bytes): fp32 at a padded D of 128 once needed 262,656 bytes
    # (64x64 two-stage tiles); _FIXED_FP32_WIDE is the fix. A subprocess, because this process runs the kernels in
    # the interpreter (no compiler).
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", COMPILE_SMEM], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(rows) == 3
    for name, ptr, D, shared in rows:
        assert shared <= 232448, f"{name} {ptr} D={D}: {shared} bytes of shared memory"


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if kernels.HAS_TRITON else []))
def test_backend_choice_one_query_and_dkdv_callback(backend):
    q, k, v, dout = make(1, 24, 40, 4, 2, 64, torch.float32)
    # one query (a decode step) sees every key: causal and not causal are the same call
    full = kernels.attention_forward(q[:, -1:], k, v, causal=False, backend=backend)
    last = kernels.attention_forward(q[:, -1:], k, v, causal=True, backend=backend)
    assert torch.equal(full[0], last[0]) and torch.equal(full[1], last[1])
    # on_dkdv sees the final dk/dv (on triton: before the dQ kernel is queued), exactly what is returned
    seen = []
    out = kernels.attention_forward(q, k, v, causal=False, backend=backend)
    grads = kernels.attention_backward(dout, q, k, v, *out, causal=False, backend=backend,
                                       on_dkdv=lambda dk, dv: seen.append((dk.clone(), dv.clone())))
    assert len(seen) == 1 and torch.equal(seen[0][0], grads[1]) and torch.equal(seen[0][1], grads[2])
    # the configured default is what backend=None means; bad names and cudnn/flash on CPU tensors are clear errors
    before = kernels.configure(backend=backend)
    try:
        assert torch.equal(kernels.attention_forward(q, k, v, causal=False)[0], out[0])
    finally:
        kernels.configure(**before)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.attention_forward(q, k, v, backend="flash3")
    if not q.is_cuda:
        for name in ("cudnn", "flash"):
            with pytest.raises(RuntimeError, match="needs CUDA"):
                kernels.attention_forward(q, k, v, backend=name)


def test_fallback_names_its_reason():
    # a head dim the Triton kernels do not take runs on the twin, with a warning that says why (once)
    q, k, v, _ = make(1, 9, 9, 2, 2, 24, torch.float32)
    with pytest.warns(UserWarning, match="head dim 24"):
        out, _ = kernels.attention_forward(q, k, v, backend="triton")
    assert rel(out, reference(q, k, v)[0]) < 1e-5


def test_save_attn_keeps_the_attention_forward():
    # selective checkpointing with the policy longvila uses: the recomputation in the backward must not run the
    # attention forward again (kernels.attention_forward is one dispatcher op whose outputs are kept)
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
    ops = kernels.saved_attention_ops()
    policy = lambda ctx, op, *a, **kw: CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE
    calls = []
    real = kernels._FORWARD["torch"]
    kernels._FORWARD["torch"] = lambda *a: calls.append(1) or real(*a)
    try:
        q, k, v, dout = make(1, 16, 16, 2, 2, 16, torch.float32)
        x = q.clone().requires_grad_()
        block = lambda x: kernels.flash_attn_func(x * 2, k, v, backend="torch") * 3
        for context, forwards in ((None, 2), (lambda: create_selective_checkpoint_contexts(policy), 1)):
            calls.clear()
            kw = {"context_fn": context} if context else {}
            checkpoint(block, x, use_reentrant=False, **kw).backward(dout)
            assert len(calls) == forwards, (context, calls)
    finally:
        kernels._FORWARD["torch"] = real
