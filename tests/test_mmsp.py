"""Tests for mmsp.py: layout, Ulysses / ring / zigzag / 2D attention, two-stage sharding, SP loss, SP generation.

    python -m pytest -q tests/test_mmsp.py

Every distributed test forks gloo workers (helpers.run_workers). Each worker builds the full-sequence inputs from
the same seed, computes the single-process reference itself, cuts out its own shard and compares outputs and
gradients (the ring-flash-attention test recipe).
"""
import dataclasses
import functools
import math

import pytest
import torch
import torch.distributed as dist

import mmsp
from helpers import run_workers

# Imported once here so forked workers inherit them: torch.utils.checkpoint (used by longvila's chunked loss)
# imports torch._dynamo lazily, which costs seconds in every worker otherwise.
import kernels  # noqa: E402,F401
import longvila  # noqa: E402,F401
import torch._dynamo  # noqa: E402,F401


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
        diff = (mine[:, real].double() - ref[:, idx[real]]).abs()       # empty on a rank holding only padding
        errs.append(diff.max().item() if diff.numel() else 0.0)
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
    out2, lse2 = mmsp.merge_attention(out.clone(), lse.clone(), torch.zeros_like(out),
                                      torch.full_like(lse, float("-inf")))
    assert torch.equal(out2, out) and torch.equal(lse2, lse)
    # in place on views: merging into rows 1..2 of a buffer leaves row 0 alone
    buf, lbuf = torch.zeros(1, 3, 2, 4), torch.zeros(1, 2, 3)
    mmsp.merge_attention(buf[:, 1:], lbuf[:, :, 1:], torch.ones(1, 2, 2, 4), torch.zeros(1, 2, 2))
    assert buf[:, 0].abs().max() == 0 and torch.allclose(buf[:, 1:], torch.full((1, 2, 2, 4), 0.5))
    assert torch.allclose(lbuf[:, :, 1:], torch.full((1, 2, 2), math.log(2.0)))


# -----------------------------------------------------------------------------
# whole model: two-stage sharding + SP loss equal single-process training


def _tiny_model():
    import longvila
    torch.manual_seed(0)
    if hasattr(longvila, "PRESETS"):
        return longvila.LongVILA(longvila.PRESETS["tiny"]).float()
    return longvila.LongVILA()


def _video_sample(model, n_frames=5, seed=0, supervise=(None, None)):
    """A video sample: text, F frames of (N x -200, newline), question text, answer; labels only on the answer."""
    import longvila
    g = torch.Generator().manual_seed(seed)
    N = model.config.tokens_per_frame
    S = getattr(getattr(model.config, "vision", None), "image_size", 8)
    V = model.llm.tok_embeddings.num_embeddings
    newline = 7
    ids = torch.randint(10, V, (3,), generator=g).tolist()
    for _ in range(n_frames):
        ids += [longvila.IMAGE_TOKEN_ID] * N + [newline]
    ids += torch.randint(10, V, (4,), generator=g).tolist()
    answer = torch.randint(10, V, (5,), generator=g).tolist()
    input_ids = torch.tensor([ids + answer])                                 # (1, T)
    labels = torch.full_like(input_ids, longvila.IGNORE_INDEX)
    lo, hi = supervise
    if lo is None:
        labels[0, len(ids):] = input_ids[0, len(ids):]                       # supervise the answer only
    else:
        labels[0, lo:hi] = input_ids[0, lo:hi]
    frames = torch.randn(n_frames, 3, S, S, generator=g)                     # (F, 3, S, S)
    return input_ids, [frames], labels


def _model_worker(rank, world, sp, ring, batch2=False, checkpointing=False):
    model = _tiny_model()
    model.set_grad_checkpointing(checkpointing)   # recomputation re-runs the ring/Ulysses forward in backward
    input_ids, images, labels = _video_sample(model)
    if batch2:   # two samples of one length; the frame split crosses the sample boundary
        ids2, images2, labels2 = _video_sample(model, seed=5)
        input_ids, labels = torch.cat([input_ids, ids2]), torch.cat([labels, labels2])   # (2, T)
        images = images + images2
    _, loss_ref = model(input_ids, images, labels)                           # single process, whole sequence
    loss_ref.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    lay = mmsp.make_layout(sp=sp, ring=ring, backend="torch")
    _, loss = mmsp.sp_forward(model, input_ids, images, labels, lay)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=lay.sp_group)                               # global mean = sum of shares
    errs = {}
    # Gradients that are zero in exact arithmetic (softmax ignores a key bias) are pure rounding noise: measure
    # every error relative to max(its own norm, 1e-3 x the largest gradient norm).
    scale = max(r.norm().item() for r in ref.values())
    for n, p in model.named_parameters():
        if n not in ref:
            assert p.grad is None or p.grad.abs().max() == 0, n
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=lay.sp_group)                               # as training does: SUM over sp
        errs[n] = ((g - ref[n]).norm() / max(ref[n].norm().item(), 1e-3 * scale)).item()
    return loss_ref.item(), total.item(), errs


@pytest.mark.parametrize("sp,ring", [(2, 2), (4, 4), (4, 2), (2, 1)])
def test_sp_forward_backward_equals_single_process(sp, ring):
    for rank, (ref, got, errs) in enumerate(run_workers(_model_worker, sp, (sp, ring))):
        assert abs(got - ref) <= 1e-5 * abs(ref), (rank, got, ref)
        bad = {n: e for n, e in errs.items() if e > 1e-5}
        assert not bad, f"rank {rank}: relative gradient error > 1e-5: {bad}"
        assert len(errs) > 0


def test_sp_forward_with_gradient_checkpointing():
    for rank, (ref, got, errs) in enumerate(run_workers(_model_worker, 4, (4, 2, False, True))):
        assert abs(got - ref) <= 1e-5 * abs(ref), (rank, got, ref)
        assert max(errs.values()) <= 1e-5, f"rank {rank}: {max(errs.items(), key=lambda x: x[1])}"


def test_sp_forward_batch_of_two_samples():
    for rank, (ref, got, errs) in enumerate(run_workers(_model_worker, 4, (4, 2, True))):
        assert abs(got - ref) <= 1e-5 * abs(ref), (rank, got, ref)
        assert max(errs.values()) <= 1e-5, f"rank {rank}: {max(errs.items(), key=lambda x: x[1])}"


def _empty_shard_worker(rank, world):
    import longvila
    model = _tiny_model()
    input_ids, images, labels = _video_sample(model, n_frames=3, supervise=(1, 3))   # only 2 supervised labels
    lay = mmsp.make_layout(sp=world, ring=world, backend="torch")
    _, loss = mmsp.sp_forward(model, input_ids, images, labels, lay)
    loss.backward()
    none = torch.full_like(labels, longvila.IGNORE_INDEX)
    _, loss0 = mmsp.sp_forward(model, input_ids, images, none, lay)          # nothing supervised anywhere
    shard = mmsp.shard_batch(input_ids, labels, lay)
    n_local = int((shard["targets"] != longvila.IGNORE_INDEX).sum())
    return loss.item(), n_local, loss0.item()


def test_empty_shard_gives_exact_zero():
    res = run_workers(_empty_shard_worker, 4)
    assert sum(n for _, n, _ in res) == 2                                    # shifted on the full sequence
    assert any(n == 0 for _, n, _ in res)
    for loss, n, loss0 in res:
        assert loss0 == 0.0
        if n == 0:
            assert loss == 0.0                                               # exactly zero, not NaN
        else:
            assert math.isfinite(loss) and loss > 0


def _bytes_worker(rank, world, sp, ring):
    import longvila
    model = _tiny_model()
    input_ids, images, labels = _video_sample(model, n_frames=5)
    lay = mmsp.make_layout(sp=sp, ring=ring, backend="torch")
    moved = []
    real_a2a = dist.all_to_all_single

    def counting_a2a(output, input, *a, **kw):                               # count what really crosses
        moved.append((output.numel() * output.element_size(), input.numel() * input.element_size()))
        return real_a2a(output, input, *a, **kw)

    def forbidden(*a, **kw):
        raise AssertionError("stage-2 re-shard must not all-reduce / all-gather / broadcast")

    saved = dist.all_to_all_single, dist.all_reduce, dist.all_gather, dist.broadcast
    dist.all_to_all_single, dist.all_reduce, dist.all_gather, dist.broadcast = counting_a2a, *[forbidden] * 3
    try:
        shard = mmsp.shard_batch(input_ids, labels, lay)
        h = mmsp.sp_embed(model, input_ids, images, lay, shard)              # (1, T/sp, C)
    finally:
        dist.all_to_all_single, dist.all_reduce, dist.all_gather, dist.broadcast = saved
    mine = int((shard["ids"] == longvila.IMAGE_TOKEN_ID).sum())
    row_bytes = h.shape[-1] * h.element_size()
    # the embeddings equal the single-process ones at my positions (padding rows embed token 0)
    full = model.embed(input_ids, images)                                    # (1, T, C)
    pad = model.llm.tok_embeddings.weight[0].expand(1, shard["Tp"] - input_ids.shape[1], -1)
    err = (h - torch.cat([full, pad], 1)[:, shard["idx"]]).abs().max().item()
    return moved, mine, row_bytes, err


@pytest.mark.parametrize("sp,ring", [(4, 2), (2, 2)])
def test_stage2_reshard_moves_only_owned_rows(sp, ring):
    res = run_workers(_bytes_worker, sp, (sp, ring))
    total_vis = 5 * _tiny_model().config.tokens_per_frame
    for rank, (moved, mine, row_bytes, err) in enumerate(res):
        assert len(moved) == 1                                               # one all-to-all, nothing else
        recv, sent = moved[0]
        assert recv == mine * row_bytes, (rank, recv, mine)                  # exactly the rows it owns
        assert err <= 1e-6, err
    # what the group sends is what it receives: every rank sends only rows of the frames it encoded
    assert sum(m[0][1] for m, *_ in res) == sum(m[0][0] for m, *_ in res)
    # every visual row crosses once: the group receives total_vis rows, not sp * total_vis (the reference's
    # all-reduce of the whole embedding sequence)
    assert sum(m[0][0] for m, *_ in res) == total_vis * res[0][2]


# -----------------------------------------------------------------------------
# SP generation: exactly the tokens of single-process greedy generation


def _generate_worker(rank, world, sp, ring):
    model = _tiny_model().eval()
    torch.manual_seed(1)
    for p in model.parameters():        # larger weights than the init: varied tokens, not one token repeated
        if p.dim() >= 2:
            p.data.normal_(0, 0.15)
    input_ids, images, _ = _video_sample(model, n_frames=3, seed=3)
    ref = model.generate(input_ids, images, max_new_tokens=8)                # single process, KV cache
    lay = mmsp.make_layout(sp=sp, ring=ring, backend="torch")
    seen = []
    got = mmsp.sp_generate(model, input_ids, images, lay, max_new_tokens=8, stream=seen.append)
    return ref.tolist(), got.tolist(), seen


@pytest.mark.parametrize("sp,ring", [(2, 2), (4, 2), (2, 1)])
def test_sp_generate_equals_single_process_greedy(sp, ring):
    for rank, (ref, got, seen) in enumerate(run_workers(_generate_worker, sp, (sp, ring))):
        assert got == ref, f"rank {rank}: {got} != {ref}"
        assert seen == ref[0] and len(ref[0]) == 8 and len(set(ref[0])) > 4


def test_single_process_layout_runs_the_same_model():
    """sp=1 without any process group: sp_forward and sp_generate equal the plain model."""
    model = _tiny_model()
    input_ids, images, labels = _video_sample(model, n_frames=2)
    lay = mmsp.make_layout(backend="torch")
    _, ref = model(input_ids, images, labels)
    _, got = model(input_ids, images, labels, sp_forward=functools.partial(mmsp.sp_forward, layout=lay))
    assert abs(got.item() - ref.item()) <= 1e-6 * abs(ref.item())
    model.eval()
    assert torch.equal(model.generate(input_ids, images, max_new_tokens=3),
                       mmsp.sp_generate(model, input_ids, images, lay, max_new_tokens=3))


def test_sp_attention_world8_2d():
    """ring 4 x ulysses 2 on 8 ranks, GQA with one KV head (replicated over the Ulysses pair), padding."""
    errs = run_workers(_attn_worker, 8, (8, 4, True, 29, 4, 1, 8))
    for rank, e in enumerate(errs):
        assert max(e) <= 1e-5, f"rank {rank}: max|diff| out/dq/dk/dv = {e}"


def _bench_worker(rank, world):
    import argparse
    import bench
    p = argparse.ArgumentParser()
    bench.FLAGS["sp"](p)
    args = p.parse_args(["--device", "cpu", "--small", "--iters", "1", "--warmup", "0",
                         "--methods", "1gpu-whole,zigzag-ring,ring,ulysses,torch-cp-flash"])
    return bench.sp_run(args)


def test_bench_sp_small_runs_on_gloo():
    rows = run_workers(_bench_worker, 2)[0]
    ran = {(r["S"], r["Hkv"], r["method"]) for r in rows if r["ms"]}
    for S in (64, 128):
        for Hkv in (2, 4):
            assert {(S, Hkv, m) for m in ("1gpu-whole", "zigzag-ring", "ring", "ulysses")} <= ran
    assert all(r["efficiency"] > 0 for r in rows if r["method"] == "zigzag-ring")
    assert all("n/a" in r["note"] for r in rows if r["method"] == "torch-cp-flash")   # no CUDA here


def _bf16_worker(rank, world, T, H, D):
    lay = mmsp.make_layout(sp=world, ring=world, backend="torch")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, T, H, D, generator=g) for _ in range(3))      # (1, T, H, D)
    ref = ref_attention(q.double(), k.double(), v.double())                  # (1, T, H, D) fp64
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    one = kernels.attention_forward(qb, kb, vb, causal=True, backend="torch")[0]   # one device, bf16 out
    idx = mmsp.layout_indices(T, lay)
    out = mmsp.sp_attention(qb[:, idx], kb[:, idx], vb[:, idx], lay)         # (1, T/sp, H, D) bf16
    return ((out.double() - ref[:, idx]).abs().max().item(), (one.double() - ref).abs().max().item())


def test_ring_bf16_error_does_not_grow_with_ring_size():
    """Partial outputs and LSE stay fp32 through the merges: a 4-rank ring in bf16 is as accurate as one kernel
    call on the whole sequence (a bf16 merge would round once per step)."""
    for ring_err, one_err in run_workers(_bf16_worker, 4, (64, 2, 16)):
        assert ring_err <= 1.01 * one_err + 1e-6, (ring_err, one_err)


# -----------------------------------------------------------------------------
# every length at every layout: lengths that are not multiples of sp or sp^2


def _any_length_worker(rank, world, sp, ring, lengths):
    errs = [max(_attn_worker(rank, world, sp, ring, True, T, 8, 2, 8)) for T in lengths]   # attention + grads
    losses = []
    torch.manual_seed(0)   # the tiny preset with 8 query heads (2 KV heads), so that Ulysses 8 can split them
    cfg = longvila.PRESETS["tiny"]
    model = longvila.LongVILA(longvila.LongVILAConfig(cfg.vision, cfg.projector,
                                                      dataclasses.replace(cfg.llm, n_heads=8)))
    for n_frames, seed in ((1, 0), (3, 4), (5, 7)):                       # 3 more lengths through the model
        input_ids, images, labels = _video_sample(model, n_frames=n_frames, seed=seed)
        _, ref = model(input_ids, images, labels)
        lay = mmsp.make_layout(sp=sp, ring=ring, backend="torch")
        _, loss = mmsp.sp_forward(model, input_ids, images, labels, lay)
        loss.backward()                                                    # the SP backward runs at this length
        dist.all_reduce(loss, group=lay.sp_group)
        losses.append((input_ids.shape[1], ref.item(), loss.item()))
    model.zero_grad(set_to_none=True)
    model.eval()
    input_ids, images, _ = _video_sample(model, n_frames=1, seed=3)
    ref = model.generate(input_ids, images, max_new_tokens=4)
    got = mmsp.sp_generate(model, input_ids, images, mmsp.make_layout(sp=sp, ring=ring, backend="torch"),
                           max_new_tokens=4)
    return errs, losses, ref.tolist(), got.tolist()


@pytest.mark.parametrize("world,ring", [(2, 1), (4, 1), (4, 2), (8, 1), (8, 2)])
def test_every_length_works_at_every_layout(world, ring):
    """Ulysses 4 and 8 used to refuse a shard whose length was not a multiple of the Ulysses degree."""
    lengths = [5, 13, 21, 37]
    for rank, (errs, losses, ref, got) in enumerate(run_workers(_any_length_worker, world,
                                                                (world, ring, lengths))):
        assert max(errs) <= 1e-5, f"rank {rank}: attention errors by length {dict(zip(lengths, errs))}"
        for T, want, have in losses:
            assert T % world and abs(have - want) <= 1e-5 * abs(want), (rank, T, have, want)
        assert got == ref, (rank, got, ref)
