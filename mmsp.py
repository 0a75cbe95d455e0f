"""MM-SP: multi-modal sequence parallelism for LongVILA (arXiv 2408.10188, section 3.3), in one file.

A group of `sp` ranks acts as one device for one long sample (world = dp * sp, sp = ring * ulysses):

  1. rank grid      torch.arange(world).view(dp, ring, ulysses): Ulysses groups are contiguous ranks (inside a node,
                    all-to-all is fast there), ring groups are strided by the Ulysses degree, dp is outermost.
  2. stage 1        the frames of the sample are split evenly over the SP ranks; each rank encodes only its own.
  3. stage 2        the token sequence is re-sharded for the LLM: zigzag over the ring degree (ring rank r holds
                    chunks r and 2R-1-r of 2R), contiguous over Ulysses ranks inside; every rank receives exactly
                    the visual-embedding rows it owns through one all-to-all (the reference all-reduces the whole
                    embedding sequence: sp times more traffic).
  4. attention      Ulysses all-to-all (B, T/sp, H, D) -> (B, T/ring, H/ulysses, D) inside, zigzag ring attention
                    (Liu et al. 2023, "Ring Attention"; zhuzilin/ring-flash-attention's zigzag schedule) outside.
  5. loss           labels shifted on the FULL sequence before sharding; sum over local tokens / global count.
  6. generation     ring prefill keeps each rank's KV shard; a decode step merges per-rank partial attention by
                    log-sum-exp across the group (the reference cannot generate with sequence parallelism).

Run the distributed tests (gloo on CPU) or the benchmark (2 GPUs):

    python -m pytest -q tests/test_mmsp.py
    torchrun --nproc_per_node 2 bench.py sp
"""
import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# distributed set-up: one init, one rank grid, explicit groups


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(backend=None) -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); no environment -> one process, no group.

    nccl on CUDA, gloo otherwise. If a process group already exists (tests fork gloo workers), it is reused."""
    cuda = torch.cuda.is_available()
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), rank=rank, world_size=world)
    else:
        rank, world, local_rank = 0, 1, 0
    if cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device)


@dataclass
class SPLayout:
    """Where this rank sits in the (dp, ring, ulysses) grid, and the process groups derived from it.

    sp_rank = ulysses_rank + ring_rank * ulysses. Groups are None in a single process (world 1).
    ring_ranks / ulysses_ranks / sp_ranks list GLOBAL ranks in group order (P2P ops need global peers)."""
    dp: int = 1
    sp: int = 1
    ring: int = 1
    ulysses: int = 1
    rank: int = 0
    dp_rank: int = 0
    sp_rank: int = 0
    ring_rank: int = 0
    ulysses_rank: int = 0
    sp_group: object = None
    ring_group: object = None
    ulysses_group: object = None
    dp_group: object = None
    ring_ranks: list = field(default_factory=lambda: [0])
    ulysses_ranks: list = field(default_factory=lambda: [0])
    sp_ranks: list = field(default_factory=lambda: [0])
    zigzag: bool = True      # False: plain ring (rank r holds chunk r), kept for comparison only
    backend: str = None      # attention kernel backend passed to kernels.py (None = auto)


def make_layout(sp=1, ring=1, backend=None, zigzag=True) -> SPLayout:
    """Build the rank grid torch.arange(world).view(dp, ring, ulysses) and every group from it.

    Every rank must call this with the same arguments (new_group is collective)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    if sp < 1 or ring < 1 or sp % ring:
        raise ValueError(f"sp={sp} must be a positive multiple of ring={ring} (sp = ring * ulysses); "
                         f"change --sp or --ring")
    if world % sp:
        raise ValueError(f"world size {world} is not a multiple of sp={sp} (world = dp * sp); "
                         f"launch a multiple of {sp} processes or change --sp")
    ulysses, dp = sp // ring, world // sp
    grid = torch.arange(world).view(dp, ring, ulysses)     # (dp, ring, ulysses) global ranks
    d, r, u = [int(i) for i in (grid == rank).nonzero()[0]]
    layout = SPLayout(dp=dp, sp=sp, ring=ring, ulysses=ulysses, rank=rank, dp_rank=d, sp_rank=u + r * ulysses,
                      ring_rank=r, ulysses_rank=u, ring_ranks=grid[d, :, u].tolist(),
                      ulysses_ranks=grid[d, r, :].tolist(), sp_ranks=grid[d].flatten().tolist(),
                      zigzag=zigzag, backend=backend)
    if world == 1:
        return layout
    # new_group is collective over the WORLD: every rank creates every group, in the same order
    for dd in range(dp):
        g = dist.new_group(grid[dd].flatten().tolist())
        if dd == d:
            layout.sp_group = g
    for dd in range(dp):
        for uu in range(ulysses):
            g = dist.new_group(grid[dd, :, uu].tolist())
            if (dd, uu) == (d, u):
                layout.ring_group = g
        for rr in range(ring):
            g = dist.new_group(grid[dd, rr, :].tolist())
            if (dd, rr) == (d, r):
                layout.ulysses_group = g
    for rr in range(ring):
        for uu in range(ulysses):
            g = dist.new_group(grid[:, rr, uu].tolist())
            if (rr, uu) == (r, u):
                layout.dp_group = g
    return layout


# -----------------------------------------------------------------------------
# which tokens a rank owns (zigzag over ring, contiguous over Ulysses inside)


def padded_length(T: int, sp: int) -> int:
    """Sequence length padded to a multiple of 2*sp (two zigzag chunks per ring rank, split over Ulysses)."""
    return -(-T // (2 * sp)) * (2 * sp)


def shard_indices(Tp: int, ring: int, ulysses: int, ring_rank: int, ulysses_rank: int, zigzag=True):
    """Token indices (T/sp,) owned by one rank of a padded length-Tp sequence, in increasing order.

    zigzag: ring rank r holds chunks r and 2R-1-r of 2R equal chunks, so every rank has the same causal work;
    plain: rank r holds chunk r of R. Inside that (T/ring,) piece, Ulysses ranks take contiguous parts, so after
    the Ulysses all-to-all each rank again holds the ring piece in order (no reordering)."""
    sp = ring * ulysses
    if Tp % (2 * sp):
        raise ValueError(f"padded length {Tp} is not a multiple of 2*sp={2 * sp}; pad with padded_length()")
    if zigzag:
        c = Tp // (2 * ring)
        piece = torch.cat([torch.arange(ring_rank * c, (ring_rank + 1) * c),
                           torch.arange((2 * ring - 1 - ring_rank) * c, (2 * ring - ring_rank) * c)])  # (T/ring,)
    else:
        c = Tp // ring
        piece = torch.arange(ring_rank * c, (ring_rank + 1) * c)                                     # (T/ring,)
    L = Tp // sp
    return piece[ulysses_rank * L:(ulysses_rank + 1) * L]                                            # (T/sp,)


def layout_indices(Tp: int, layout: SPLayout):
    """This rank's token indices (T/sp,)."""
    return shard_indices(Tp, layout.ring, layout.ulysses, layout.ring_rank, layout.ulysses_rank, layout.zigzag)


def token_owner(Tp: int, layout: SPLayout):
    """(Tp,) sp_rank owning each token index: the same on every rank, computed without communication."""
    owner = torch.empty(Tp, dtype=torch.long)
    for r in range(layout.ring):
        for u in range(layout.ulysses):
            owner[shard_indices(Tp, layout.ring, layout.ulysses, r, u, layout.zigzag)] = u + r * layout.ulysses
    return owner


# -----------------------------------------------------------------------------
# communication primitives with autograd


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 of x (G, ...): block g goes to group rank g. Equal splits make it its own
    adjoint: the gradient of the block I sent to rank g is the gradient of the block rank g received from me."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)                                  # (G, ...) block g came from group rank g
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


class _AllToAllV(torch.autograd.Function):
    """all_to_all_single of rows with uneven splits; the backward sends the gradients back with splits swapped."""

    @staticmethod
    def forward(ctx, x, in_splits, out_splits, group):
        ctx.group, ctx.in_splits, ctx.out_splits = group, in_splits, out_splits
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))  # (rows received, C)
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


def _ring_exchange(buf, send_to, recv_from, group, tag=0):
    """Post send(buf -> next) and recv(prev -> new buffer) together; returns (requests, receive buffer)."""
    recv = torch.empty_like(buf)
    ops = [dist.P2POp(dist.isend, buf, send_to, group, tag), dist.P2POp(dist.irecv, recv, recv_from, group, tag)]
    return dist.batch_isend_irecv(ops), recv


def _wait(reqs):
    for r in reqs:
        r.wait()


# -----------------------------------------------------------------------------
# the LSE merge: two partial softmax attentions over disjoint key sets -> one


def merge_attention(out, lse, out_b, lse_b):
    """Merge block b into the running (out, lse); all fp32. out (B,Tq,H,D), lse (B,H,Tq).

    Exact: out_new = (e^lse out + e^lse_b out_b) / (e^lse + e^lse_b), lse_new = log(e^lse + e^lse_b).
    Stable form without exp overflow (ring-flash-attention):
        out_new = out - sigmoid(lse_b - lse) * (out - out_b)
        lse_new = lse - logsigmoid(lse - lse_b)
    A fully masked row of block b (lse_b = -inf) leaves (out, lse) unchanged; `lse` must be finite."""
    w = torch.sigmoid(lse_b - lse).transpose(1, 2).unsqueeze(-1)   # (B,H,Tq) -> (B,Tq,H,1)
    return out - w * (out - out_b), lse - F.logsigmoid(lse - lse_b)


# -----------------------------------------------------------------------------
# ring attention (zigzag or plain) as one autograd.Function


def _step_block(ring_rank, src, Tl, causal, zigzag):
    """Which part of the local q (Tl rows) attends to which part of the KV block that came from ring rank `src`.

    Returns (q rows, k rows, causal) or None when the whole block is masked. Zigzag: rank r holds chunks
    (r, 2R-1-r), so with local order == position order the three cases are:
      src == r : the diagonal block, causal on local order (chunk r < chunk 2R-1-r)
      src <  r : chunk src precedes both my chunks, chunk 2R-1-src follows both -> all q x first half of k
      src >  r : chunk src follows my chunk r but precedes 2R-1-r; chunk 2R-1-src precedes 2R-1-r
                 -> second half of q x all of k
    Plain ring: diagonal causal, earlier ranks full, later ranks masked (the load imbalance zigzag removes)."""
    every = slice(0, Tl)
    if not causal:
        return every, every, False
    if src == ring_rank:
        return every, every, True
    if zigzag:
        half = Tl // 2
        return (every, slice(0, half), False) if src < ring_rank else (slice(half, Tl), every, False)
    return (every, every, False) if src < ring_rank else None


class RingAttention(torch.autograd.Function):
    """Causal attention over a sequence split across the ring: KV blocks rotate with point-to-point send/recv.

    q (B, Tl, H, D), k/v (B, Tl, Hkv, D) are this rank's tokens (zigzag or plain order); returns (B, Tl, H, D)."""

    @staticmethod
    def forward(ctx, q, k, v, group, ranks, ring_rank, causal, scale, zigzag, backend):
        import kernels
        R, Tl = len(ranks), q.shape[1]
        nxt, prv = ranks[(ring_rank + 1) % R], ranks[(ring_rank - 1) % R]
        kv = torch.stack([k, v])                                   # (2, B, Tl, Hkv, D): one message per step
        out = lse = None
        for step in range(R):
            if step + 1 < R:                                       # next block in flight while this one computes
                reqs, kv_next = _ring_exchange(kv, nxt, prv, group)
            block = _step_block(ring_rank, (ring_rank - step) % R, Tl, causal, zigzag)
            if block is not None:
                qs, ks, c = block
                out_b, lse_b = kernels.attention_forward(q[:, qs], kv[0][:, ks], kv[1][:, ks], causal=c,
                                                         softmax_scale=scale, out_fp32=True, backend=backend)
                if out is None:                                    # step 0 is the diagonal: every row is set
                    out, lse = out_b.float(), lse_b.float()        # (B, Tl, H, D), (B, H, Tl) fp32
                else:
                    out[:, qs], lse[:, :, qs] = merge_attention(out[:, qs], lse[:, :, qs], out_b.float(), lse_b)
            if step + 1 < R:
                _wait(reqs)
                kv = kv_next
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, ranks, ring_rank, causal, scale, zigzag, backend)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        import kernels
        q, k, v, out, lse = ctx.saved_tensors
        group, ranks, ring_rank, causal, scale, zigzag, backend = ctx.args
        R, Tl = len(ranks), q.shape[1]
        nxt, prv = ranks[(ring_rank + 1) % R], ranks[(ring_rank - 1) % R]
        dout = dout.contiguous()
        # 1. q, dout and the GLOBAL out/lse stay here; dq accumulates in fp32
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)          # (B, Tl, H, D)
        # 2. k/v rotate around the ring again, exactly as in the forward
        kv = torch.stack([k, v])                                                 # (2, B, Tl, Hkv, D)
        # 3. the fp32 dk/dv of the block in hand travel with it on a second ring; start with my own block
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)        # (2, B, Tl, Hkv, D)
        dkv_reqs = None
        for step in range(R):
            if step + 1 < R:
                kv_reqs, kv_next = _ring_exchange(kv, nxt, prv, group, tag=0)
            block = _step_block(ring_rank, (ring_rank - step) % R, Tl, causal, zigzag)
            grads = None
            if block is not None:
                # 4. dS = P * (dP - rowsum(dout * out)) with P from the global lse: exact per block
                qs, ks, c = block
                grads = kernels.attention_backward(dout[:, qs], q[:, qs], kv[0][:, ks], kv[1][:, ks], out[:, qs],
                                                   lse[:, :, qs], causal=c, softmax_scale=scale, grad_fp32=True,
                                                   backend=backend)
                dq[:, qs] += grads[0]
            if dkv_reqs is not None:                               # 5. the partial dk/dv of this block arrive
                _wait(dkv_reqs)
                dkv = dkv_next
            if grads is not None:
                dkv[0][:, ks] += grads[1]
                dkv[1][:, ks] += grads[2]
            if R > 1:                                              # 6. pass them on with the block
                dkv_reqs, dkv_next = _ring_exchange(dkv, nxt, prv, group, tag=1)
            if step + 1 < R:
                _wait(kv_reqs)
                kv = kv_next
        if dkv_reqs is not None:                                   # 7. after R hops my own block's sums are home
            _wait(dkv_reqs)
            dkv = dkv_next
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None, None, None


def ring_attention(q, k, v, layout: SPLayout, causal=True, softmax_scale=None):
    """q (B, T/ring, H', D), k/v (B, T/ring, Hkv', D) in the layout's token order -> (B, T/ring, H', D)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return RingAttention.apply(q, k, v, layout.ring_group, layout.ring_ranks, layout.ring_rank, causal, scale,
                               layout.zigzag, layout.backend)


# -----------------------------------------------------------------------------
# Ulysses all-to-all and 2D attention (Ulysses inside, ring outside)


def seq_to_head(x, group, U):
    """(B, T/sp, H, D) -> all-to-all -> (B, T/ring, H/U, D): gather the sequence, scatter the heads."""
    B, Tl, H, D = x.shape
    x = x.reshape(B, Tl, U, H // U, D).permute(2, 0, 1, 3, 4)      # (U, B, T/sp, H/U, D): head group g -> rank g
    x = _AllToAll.apply(x, group)                                  # (U, B, T/sp, H/U, D): block g from rank g
    return x.permute(1, 0, 2, 3, 4).reshape(B, U * Tl, H // U, D)  # (B, T/ring, H/U, D) in Ulysses rank order


def head_to_seq(x, group, U):
    """(B, T/ring, H/U, D) -> all-to-all -> (B, T/sp, H, D): the inverse of seq_to_head."""
    B, T, Hl, D = x.shape
    x = x.reshape(B, U, T // U, Hl, D).permute(1, 0, 2, 3, 4)      # (U, B, T/sp, H/U, D): piece g -> rank g
    x = _AllToAll.apply(x, group)                                  # (U, B, T/sp, H/U, D): head group g
    return x.permute(1, 2, 0, 3, 4).reshape(B, T // U, U * Hl, D)  # (B, T/sp, H, D)


def check_heads(H, Hkv, ulysses):
    if H % ulysses:
        raise ValueError(f"{H} query heads cannot be split over ulysses={ulysses}; choose ulysses dividing {H} "
                         f"(raise --ring instead)")
    if Hkv % ulysses and ulysses % Hkv:
        raise ValueError(f"{Hkv} KV heads vs ulysses={ulysses}: one must divide the other; change --sp/--ring")


def sp_attention(q, k, v, layout: SPLayout, causal=True, softmax_scale=None):
    """Causal attention of this rank's tokens against the whole sequence of its SP group (2D: Ulysses x ring).

    q (B, T/sp, H, D), k/v (B, T/sp, Hkv, D) with RoPE applied at true positions -> (B, T/sp, H, D).
    Use as longvila's attention hook: attn=lambda q, k, v, layer_idx: sp_attention(q, k, v, layout)."""
    U = layout.ulysses
    if U > 1:
        H, Hkv = q.shape[2], k.shape[2]
        check_heads(H, Hkv, U)
        if Hkv < U:   # GQA with fewer KV heads than Ulysses ranks: each rank needs its group's KV head.
            # KV head j serves query heads j*H/Hkv..; after the repeat, rank u's head is u*Hkv//U (the right one).
            # repeat_interleave's backward sums the copies' gradients back onto the real head.
            k = k.repeat_interleave(U // Hkv, dim=2)               # (B, T/sp, U, D)
            v = v.repeat_interleave(U // Hkv, dim=2)               # (B, T/sp, U, D)
        q = seq_to_head(q, layout.ulysses_group, U)                # (B, T/ring, H/U, D)
        k = seq_to_head(k, layout.ulysses_group, U)                # (B, T/ring, max(Hkv,U)/U, D)
        v = seq_to_head(v, layout.ulysses_group, U)
    out = ring_attention(q, k, v, layout, causal, softmax_scale)   # (B, T/ring, H/U, D)
    if U > 1:
        out = head_to_seq(out, layout.ulysses_group, U)            # (B, T/sp, H, D)
    return out


def attention_hook(layout: SPLayout):
    """The callable longvila.forward_embeds(attn=...) expects: attn(q, k, v, layer_idx) -> out."""
    return lambda q, k, v, layer_idx: sp_attention(q, k, v, layout)
