"""Tests for mmsp.py: layout, Ulysses / ring / zigzag / 2D attention, two-stage sharding, SP loss, SP generation.

    python -m pytest -q tests/test_mmsp.py

Every distributed test forks gloo workers (helpers.run_workers). Each worker builds the full-sequence inputs from
the same seed, computes the single-process reference itself, cuts out its own shard and compares outputs and
gradients (the ring-flash-attention test recipe).
"""
import math

import pytest
import torch
import torch.distributed as dist

import mmsp
from helpers import run_workers


# -----------------------------------------------------------------------------
# reference attention (fp64, full sequence)


def ref_attention(q, k, v, causal=True):
    """q (B,T,H,D), k/v (B,T,Hkv,D) -> (B,T,H,D); plain softmax attention with GQA by repeating KV heads."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)              # (B, T, H, D)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])       # (B, H, T, T)
    if causal:
        T = q.shape[1]
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)                 # (B, T, H, D)


# -----------------------------------------------------------------------------
# layout


def test_layout_single_process():
    lay = mmsp.make_layout()
    assert (lay.dp, lay.sp, lay.ring, lay.ulysses, lay.sp_rank) == (1, 1, 1, 1, 0)
    assert lay.sp_group is None


def test_layout_errors_name_the_numbers():
    with pytest.raises(ValueError, match="ring=3"):
        mmsp.make_layout(sp=4, ring=3)
    with pytest.raises(ValueError, match="ulysses=4"):
        mmsp.check_heads(6, 2, 4)


def _layout_worker(rank, world):
    lay = mmsp.make_layout(sp=4, ring=2)
    # dp=2 x ring=2 x ulysses=2; check the groups really connect the ranks the grid says
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=lay.ulysses_group)
    t2 = torch.tensor([float(rank)])
    dist.all_reduce(t2, group=lay.ring_group)
    t3 = torch.tensor([float(rank)])
    dist.all_reduce(t3, group=lay.dp_group)
    return (lay.dp_rank, lay.ring_rank, lay.ulysses_rank, lay.sp_rank, lay.ring_ranks, lay.ulysses_ranks,
            t.item(), t2.item(), t3.item())


def test_layout_grid_world8():
    res = run_workers(_layout_worker, 8)
    for rank, (d, r, u, s, rr, ur, tu, tr, td) in enumerate(res):
        assert rank == d * 4 + r * 2 + u and s == u + 2 * r
        assert ur == [d * 4 + r * 2, d * 4 + r * 2 + 1]          # Ulysses: contiguous
        assert rr == [d * 4 + u, d * 4 + 2 + u]                  # ring: strided by the Ulysses degree
        assert tu == sum(ur) and tr == sum(rr) and td == (r * 2 + u) * 2 + 4


def test_shard_indices_cover_sequence_once():
    for ring, uly in [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (3, 1)]:
        for zig in (True, False):
            Tp = mmsp.padded_length(37, ring * uly)
            idx = torch.cat([mmsp.shard_indices(Tp, ring, uly, r, u, zig) for r in range(ring) for u in range(uly)])
            assert sorted(idx.tolist()) == list(range(Tp))
    # zigzag: ring rank r holds chunks r and 2R-1-r
    assert mmsp.shard_indices(8, 2, 1, 0, 0).tolist() == [0, 1, 6, 7]
    assert mmsp.shard_indices(8, 2, 1, 1, 0).tolist() == [2, 3, 4, 5]
    assert mmsp.shard_indices(8, 2, 2, 1, 1).tolist() == [4, 5]


# -----------------------------------------------------------------------------
# attention: ring, zigzag ring, Ulysses, 2D against the full-sequence reference


def _attn_worker(rank, world, sp, ring, zigzag, T, H, Hkv, D):
    lay = mmsp.make_layout(sp=sp, ring=ring, backend="torch", zigzag=zigzag)
    g = torch.Generator().manual_seed(0)
    B = 2
    q = torch.randn(B, T, H, D, generator=g)                                 # (B, T, H, D) same on every rank
    k = torch.randn(B, T, Hkv, D, generator=g)
    v = torch.randn(B, T, Hkv, D, generator=g)
    dout = torch.randn(B, T, H, D, generator=g)
    # single-process reference in fp64 on the full sequence
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    out_ref = ref_attention(qr, kr, vr)
    out_ref.backward(dout.double())
    # pad to a multiple of 2*sp (padding sits after every real token: causally invisible), cut my shard
    Tp = mmsp.padded_length(T, sp)
    pad = lambda x: torch.cat([x, torch.zeros(B, Tp - T, *x.shape[2:])], 1)  # (B, Tp, ., D)
    idx = mmsp.layout_indices(Tp, lay)                                       # (T/sp,)
    ql, kl, vl = (pad(x)[:, idx].clone().requires_grad_() for x in (q, k, v))  # (B, T/sp, ., D)
    out = mmsp.sp_attention(ql, kl, vl, lay)                                 # (B, T/sp, H, D)
    out.backward(pad(dout)[:, idx])
    real = idx < T
    errs = []
    for mine, ref in [(out, out_ref), (ql.grad, qr.grad), (kl.grad, kr.grad), (vl.grad, vr.grad)]:
        errs.append((mine[:, real].double() - ref[:, idx[real]]).abs().max().item())
    return errs


@pytest.mark.parametrize("sp,ring,zigzag,T,H,Hkv", [
    (2, 2, True, 16, 4, 4),      # zigzag ring, MHA
    (2, 2, False, 13, 4, 2),     # plain ring, GQA, padding
    (4, 4, True, 21, 4, 1),      # zigzag ring x4, MQA, padding
    (2, 1, True, 14, 4, 2),      # Ulysses, GQA, padding
    (4, 1, True, 16, 8, 2),      # Ulysses x4, KV heads < Ulysses degree (replicated)
    (4, 2, True, 19, 4, 1),      # 2D 2x2, KV heads < Ulysses degree, padding
    (4, 2, False, 16, 4, 4),     # 2D 2x2 over a plain ring
])
def test_sp_attention_matches_reference(sp, ring, zigzag, T, H, Hkv):
    errs = run_workers(_attn_worker, sp, (sp, ring, zigzag, T, H, Hkv, 8))
    for rank, e in enumerate(errs):
        assert max(e) <= 1e-5, f"rank {rank}: max|diff| out/dq/dk/dv = {e}"


def test_merge_attention_equals_joint_softmax():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 3, 2, 4, generator=g), torch.randn(1, 6, 2, 4, generator=g), torch.randn(1, 6, 2, 4,
                                                                                                   generator=g)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k)                                # (1, 2, 3, 6)
    parts = [(torch.einsum("bhqk,bkhd->bqhd", s[..., sl].softmax(-1), v[:, sl]), s[..., sl].logsumexp(-1))
             for sl in (slice(0, 2), slice(2, 6))]
    out, lse = mmsp.merge_attention(*parts[0], *parts[1])
    torch.testing.assert_close(out, torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v))
    torch.testing.assert_close(lse, s.logsumexp(-1))
    # a fully masked block (lse -inf) changes nothing
    out2, lse2 = mmsp.merge_attention(out, lse, torch.zeros_like(out), torch.full_like(lse, float("-inf")))
    assert torch.equal(out2, out) and torch.equal(lse2, lse)
