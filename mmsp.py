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

import kernels
from longvila import IGNORE_INDEX, IMAGE_TOKEN_ID, cross_entropy_sum, sample_token, shift_labels


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
    nccl on CUDA, gloo otherwise; an existing process group (tests fork gloo workers) is reused."""
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
    """Where this rank sits in the (dp, ring, ulysses) grid, and the process groups derived from it (None in a
    single process). ring_ranks / ulysses_ranks / sp_ranks list GLOBAL ranks in group order (P2P needs them)."""
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


def _priority_options():
    """NCCL options for the ring groups: a HIGH-PRIORITY stream, so a ring step's KV (and dk/dv) transfer gets an SM
    as soon as any block of the attention kernel launched after it finishes, not after the whole kernel."""
    if dist.get_backend() != "nccl":
        return None
    opts = dist.ProcessGroupNCCL.Options()
    opts.is_high_priority_stream = True
    return opts


def make_layout(sp=1, ring=1, backend=None, zigzag=True) -> SPLayout:
    """Build the rank grid torch.arange(world).view(dp, ring, ulysses) and every group from it (collective)."""
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
            g = dist.new_group(grid[dd, :, uu].tolist(), pg_options=_priority_options())
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
# which tokens a rank owns (zigzag over ring, contiguous over Ulysses inside)

def padded_length(T: int, sp: int) -> int:
    """Sequence length padded to a multiple of 2*sp (two zigzag chunks per ring rank, split over Ulysses)."""
    return -(-T // (2 * sp)) * (2 * sp)


def shard_indices(Tp: int, ring: int, ulysses: int, ring_rank: int, ulysses_rank: int, zigzag=True):
    """Token indices (T/sp,) owned by one rank of a padded length-Tp sequence, in increasing order.
    Zigzag gives every ring rank the same causal work. Inside the (T/ring,) piece Ulysses ranks take contiguous
    parts, so after the Ulysses all-to-all each rank again holds the ring piece in order (no reordering)."""
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
# two-stage sharding: frames over SP ranks for the vision tower, zigzag tokens for the LLM

def frame_split(num_frames: int, sp: int):
    """Frames per rank (ceil(F/sp)); rank s encodes frames [s*Fs, (s+1)*Fs) (the tail is padded with dummies)."""
    return -(-num_frames // sp)


def encode_frames_sharded(model, images, layout: SPLayout):
    """Stage 1: this rank encodes only its Fs = ceil(F_total/sp) of the batch's frames -> (rows (n_real*N, C), first
    frame, n_real). Zero frames pad the share: every rank runs the same shapes and its vision parameters join the
    graph; their rows are dropped here."""
    frames = [im for im in (images or []) if im is not None]
    if not frames:
        return None, 0, 0
    device = model.llm.tok_embeddings.weight.device
    Fs = frame_split(sum(f.shape[0] for f in frames), layout.sp)
    first = layout.sp_rank * Fs
    # cut [first, first + Fs) out of the per-sample tensors before moving anything to the GPU
    pieces, start = [], 0
    for f in frames:                                                 # f (F_b, 3, S, S)
        lo, hi = max(first - start, 0), min(first + Fs - start, f.shape[0])
        if lo < hi:
            pieces.append(f[lo:hi].to(device))
        start += f.shape[0]
    mine = torch.cat(pieces) if pieces else frames[0][:0].to(device)  # (<=Fs, 3, S, S)
    n_real = mine.shape[0]
    if n_real < Fs:
        mine = torch.cat([mine, mine.new_zeros((Fs - n_real,) + tuple(mine.shape[1:]))])   # (Fs, 3, S, S)
    feats = model.encode_images(mine)                                # (Fs, N, C)
    return feats[:n_real].reshape(-1, feats.shape[-1]), first, n_real  # (n_real*N, C) dummies dropped


def reshard_visual(rows, ids_padded, layout: SPLayout, tokens_per_frame: int, num_frames: int):
    """Stage 2: send every visual row from the rank that encoded it to the rank that owns its token position. Visual
    token k (k-th -200 slot in row-major (b, t) order) was encoded by rank (k // N) // Fs and is owned by
    token_owner(t); a rank receives rows ordered by source rank, i.e. by k: the order of its local -200 slots."""
    B, Tp = ids_padded.shape
    N, sp = tokens_per_frame, layout.sp
    vis = (ids_padded.cpu() == IMAGE_TOKEN_ID).nonzero()          # (K, 2) (b, t) row-major == k order
    owner = token_owner(Tp, layout)[vis[:, 1]]                       # (K,) sp_rank owning each visual token
    src = torch.arange(vis.shape[0]) // N // frame_split(num_frames, sp)   # (K,) sp_rank that encoded it
    mine = src == layout.sp_rank
    in_splits = torch.bincount(owner[mine], minlength=sp).tolist()   # rows I send to each rank
    out_splits = torch.bincount(src[owner == layout.sp_rank], minlength=sp).tolist()  # rows I get from each
    order = torch.argsort(owner[mine], stable=True)                  # group my rows by destination, keep k order
    send = rows[order.to(rows.device)] if rows is not None else None  # (n_real*N, C)
    if sp == 1:
        return send
    return _AllToAllV.apply(send, in_splits, out_splits, layout.sp_group)   # (n_mine, C)


def shard_batch(input_ids, labels, layout: SPLayout, pad_id=0):
    """Shift labels on the FULL sequence, pad to a multiple of 2*sp, cut this rank's tokens -> dict: ids_padded
    (B, Tp), ids/targets/positions (B, T/sp) of this rank, T (true length). Padding follows every real token
    (causally invisible) with ignored targets."""
    B, T = input_ids.shape
    Tp = padded_length(T, layout.sp)
    targets = shift_labels(labels) if labels is not None else None   # (B, T) targets[t] = labels[t+1]
    ids_p = torch.cat([input_ids, input_ids.new_full((B, Tp - T), pad_id)], 1)    # (B, Tp)
    idx = layout_indices(Tp, layout).to(input_ids.device)                     # (T/sp,)
    out = dict(ids_padded=ids_p, ids=ids_p[:, idx], T=T, Tp=Tp, idx=idx,
               positions=idx.unsqueeze(0).expand(B, -1))                      # (B, T/sp) true positions
    if targets is not None:
        tp = torch.cat([targets, targets.new_full((B, Tp - T), IGNORE_INDEX)], 1)  # (B, Tp)
        out["targets"] = tp[:, idx]                                           # (B, T/sp)
        out["global_targets"] = targets
    return out


def sp_embed(model, input_ids, images, layout: SPLayout, shard):
    """Both stages: (B, T/sp, C) input embeddings of this rank's tokens, text and visual."""
    B, T = input_ids.shape
    n_frames = sum(im.shape[0] for im in (images or []) if im is not None)
    N = model.config.tokens_per_frame
    counts = (input_ids == IMAGE_TOKEN_ID).sum(1).tolist()
    per_sample = [0 if im is None else im.shape[0] for im in (images or [None] * B)]
    for b in range(B):
        if counts[b] != per_sample[b] * N:
            raise ValueError(f"sample {b}: input_ids hold {counts[b]} image tokens ({IMAGE_TOKEN_ID}) but "
                             f"its images give {per_sample[b]} frames x {N} tokens per frame")
    ids = shard["ids"]                                                       # (B, T/sp)
    h = model.llm.tok_embeddings(ids.clamp(min=0))                           # (B, T/sp, C) -200 slots filled below
    if n_frames == 0:
        return h
    rows, _, _ = encode_frames_sharded(model, images, layout)               # (n_real*N, C)
    mine = reshard_visual(rows, shard["ids_padded"], layout, N, n_frames)   # (n_mine, C)
    slots = (ids == IMAGE_TOKEN_ID).unsqueeze(-1)                   # (B, T/sp, 1)
    return h.masked_scatter(slots, mine.to(h.dtype))                         # (B, T/sp, C)


# -----------------------------------------------------------------------------
# the LSE merge: two partial softmax attentions over disjoint key sets -> one

def merge_attention(out, lse, out_b, lse_b):
    """Merge block b into the running (out, lse) IN PLACE (views of a larger buffer work); all fp32.
    out (B,Tq,H,D), lse (B,H,Tq); returns (out, lse).

    Exact: out_new = (e^lse out + e^lse_b out_b) / (e^lse + e^lse_b), lse_new = log(e^lse + e^lse_b).
    Stable form without exp overflow (ring-flash-attention):
        out_new = out - sigmoid(lse_b - lse) * (out - out_b)      = lerp(out, out_b, sigmoid(lse_b - lse))
        lse_new = lse - logsigmoid(lse - lse_b)
    lerp_ is one fused pass over out (the merge is memory-bound: (T/ring, H, D) fp32 per ring step).
    A fully masked row of block b (lse_b = -inf) leaves (out, lse) unchanged; `lse` must be finite."""
    w = torch.sigmoid(lse_b - lse).transpose(1, 2).unsqueeze(-1)   # (B,H,Tq) -> (B,Tq,H,1)
    out.lerp_(out_b, w)                                            # (B, Tq, H, D)
    lse.sub_(F.logsigmoid(lse - lse_b))                            # (B, H, Tq)
    return out, lse


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
                    # the merges below write in place, and selective checkpointing (--checkpoint_mode save-attn)
                    # refuses a mutated kernel lse: clone it (out_b is already a fresh fp32 copy)
                    out, lse = out_b.float(), lse_b.float().clone()  # (B, Tl, H, D), (B, H, Tl) fp32
                else:
                    merge_attention(out[:, qs], lse[:, :, qs], out_b.float(), lse_b.float())   # in place
            if step + 1 < R:
                _wait(reqs)
                kv = kv_next
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, ranks, ring_rank, causal, scale, zigzag, backend)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
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
        dkv_reqs = dkv_next = None

        def pass_on(dk=None, dv=None, ks=None):
            """5. wait for the partial dk/dv of the block in hand, add this rank's share, 6. pass them on with it.
            The triton backend calls it before queueing its dQ kernel, so the fp32 sums travel while dQ computes."""
            nonlocal dkv, dkv_reqs, dkv_next
            if dkv_reqs is not None:
                _wait(dkv_reqs)
                dkv = dkv_next
            if dk is not None:
                dkv[0][:, ks] += dk
                dkv[1][:, ks] += dv
            if R > 1:
                dkv_reqs, dkv_next = _ring_exchange(dkv, nxt, prv, group, tag=1)

        for step in range(R):
            if step + 1 < R:
                kv_reqs, kv_next = _ring_exchange(kv, nxt, prv, group, tag=0)
            block = _step_block(ring_rank, (ring_rank - step) % R, Tl, causal, zigzag)
            if block is not None:
                # 4. dS = P * (dP - rowsum(dout * out)) with P from the global lse: exact per block
                qs, ks, c = block
                grads = kernels.attention_backward(dout[:, qs], q[:, qs], kv[0][:, ks], kv[1][:, ks], out[:, qs],
                                                   lse[:, :, qs], causal=c, softmax_scale=scale, grad_fp32=True,
                                                   backend=backend, on_dkdv=lambda dk, dv: pass_on(dk, dv, ks))
                dq[:, qs] += grads[0]
            else:                                                  # a fully masked block (plain ring) passes by
                pass_on()
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
    if layout.ring == 1:   # pure Ulysses: the whole sequence is here, one plain kernel call (no fp32 merge buffers)
        return kernels.flash_attn_func(q, k, v, causal=causal, softmax_scale=scale, backend=layout.backend)
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
    q (B, T/sp, H, D), k/v (B, T/sp, Hkv, D) with RoPE applied at true positions -> (B, T/sp, H, D)."""
    U = layout.ulysses
    if layout.zigzag and layout.ring > 1 and (q.shape[1] * U) % 2:
        raise ValueError(f"{q.shape[1]} tokens per rank do not fit ring={layout.ring} x ulysses={U}: pad the whole "
                         f"sequence to a multiple of 2*sp={2 * layout.sp} (mmsp.padded_length) before sharding")
    if U > 1:
        H, Hkv = q.shape[2], k.shape[2]
        check_heads(H, Hkv, U)
        if Hkv < U:   # fewer KV heads than Ulysses ranks: after the repeat rank u holds KV head u*Hkv//U, the one
            # its query heads read; repeat_interleave's backward sums the copies' gradients onto the real head
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


# -----------------------------------------------------------------------------
# SP loss and forward

def global_count(targets, layout: SPLayout):
    """Supervised tokens over the whole dp*sp world. Every SP rank holds the full (shifted) targets of its sample,
    so the SP group's count needs no communication; one all-reduce over dp adds the other samples."""
    n = (targets != IGNORE_INDEX).sum().to(torch.float32)           # () this dp rank's sample(s)
    if layout.dp > 1:
        dist.all_reduce(n, group=layout.dp_group)
    return n


def sp_loss(hidden, targets, output_weight, n_global, chunk_size=4096):
    """This rank's summed cross-entropy / n_global (fp32); summed over all dp*sp ranks: the global mean. A shard
    without supervised tokens gives 0, never NaN, and still runs backward: the ring/Ulysses backward is collective."""
    loss_sum, _ = cross_entropy_sum(hidden, targets, weight=output_weight, chunk_size=chunk_size)
    return loss_sum / n_global.clamp(min=1)


def sp_forward(model, input_ids, images, labels, layout: SPLayout, return_logits=False):
    """The LongVILA forward under MM-SP: full input_ids/labels (B, T), the same on every SP rank -> (local logits
    (B, T/sp, V) | None, this rank's share of the loss): SUM losses and gradients over dp*sp to match one device."""
    shard = shard_batch(input_ids, labels, layout)
    h = sp_embed(model, input_ids, images, layout, shard)            # (B, T/sp, C)
    hidden = model.forward_embeds(h, shard["positions"], attn=attention_hook(layout))   # (B, T/sp, C)
    loss = None
    if labels is not None:
        n = global_count(shard["global_targets"], layout)
        loss = sp_loss(hidden, shard["targets"], model.llm.output.weight, n)
    logits = model.llm.output(hidden) if return_logits else None           # (B, T/sp, V)
    return logits, loss


# -----------------------------------------------------------------------------
# SP generation: ring prefill keeps each rank's KV shard, decode merges partial attention by LSE

class ShardKVCache:
    """This rank's keys/values per layer: its real prompt tokens, then the new tokens it was given to keep, in
    preallocated (B, capacity, Hkv, D) buffers (no O(T) concatenation per decoded token)."""

    def __init__(self, n_layers, capacity):
        self.k, self.v, self.capacity = [None] * n_layers, [None] * n_layers, capacity
        self.length = [0] * n_layers

    def append(self, layer_idx, k, v):
        """k/v (B, n, Hkv, D) -> all of this layer's cached keys/values (B, length, Hkv, D)."""
        if self.k[layer_idx] is None:
            B, _, Hkv, D = k.shape
            self.k[layer_idx] = k.new_empty(B, self.capacity, Hkv, D)     # (B, capacity, Hkv, D)
            self.v[layer_idx] = v.new_empty(B, self.capacity, Hkv, D)
        n0, n1 = self.length[layer_idx], self.length[layer_idx] + k.shape[1]
        self.k[layer_idx][:, n0:n1], self.v[layer_idx][:, n0:n1] = k, v
        self.length[layer_idx] = n1
        return self.k[layer_idx][:, :n1], self.v[layer_idx][:, :n1]


def merge_across_group(out, lse, layout: SPLayout):
    """Exact attention of one query over the whole group's keys from per-rank partials.

    out (B, 1, H, D) fp32, lse (B, H, 1) fp32 (-inf where a rank holds no keys). All-gather (out, lse), then
        lse_tot = logsumexp_r lse_r,   out = sum_r exp(lse_r - lse_tot) * out_r
    Every rank gathers the same tensors in the same order, so every rank gets the same bits."""
    if layout.sp == 1:
        return out
    B, _, H, D = out.shape
    packed = torch.cat([out.reshape(B, H, D), lse.reshape(B, H, 1)], -1).contiguous()   # (B, H, D+1)
    parts = [torch.empty_like(packed) for _ in range(layout.sp)]
    dist.all_gather(parts, packed, group=layout.sp_group)
    allp = torch.stack(parts)                                               # (sp, B, H, D+1)
    lse_r = allp[..., D:]                                                   # (sp, B, H, 1)
    w = torch.exp(lse_r - torch.logsumexp(lse_r, 0))                        # (sp, B, H, 1) sums to 1 over sp
    return (w * allp[..., :D]).sum(0).reshape(B, 1, H, D)                   # (B, 1, H, D)


@torch.no_grad()
def sp_generate(model, input_ids, images, layout: SPLayout, max_new_tokens=32, temperature=0.0, top_p=1.0,
                eos_token_id=None, stream=None, generator=None):
    """model.generate under MM-SP: input_ids (1, T) -> new tokens (1, T_new), identical on every rank.

    1. prefill: both sharding stages and ring/2D attention, as in training; each layer's hook keeps this rank's
       post-RoPE k/v of its REAL prompt tokens (padding is dropped: a new query must not see it).
    2. the owner of position T-1 turns its hidden state into logits; the token is broadcast from it.
    3. decode: every rank runs the non-attention parts of the new token; in attention each rank attends the query
       to its own KV shard (no causal mask: every cached key is in the past) and the partial (out, lse) merge
       across the group. Rank step % sp keeps the new token's k/v (round-robin: the shards stay balanced)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"sp_generate takes one prompt: input_ids of shape (1, T), got {tuple(input_ids.shape)}")
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    T = input_ids.shape[1]
    shard = shard_batch(input_ids, None, layout)
    real = shard["idx"] < T                                                 # (T/sp,) padding is not kept
    cache = ShardKVCache(len(model.llm.layers), int(real.sum()) + -(-max_new_tokens // layout.sp) + 1)

    def prefill_attn(q, k, v, layer_idx):                                   # (B, T/sp, H|Hkv, D)
        cache.append(layer_idx, k[:, real], v[:, real])
        return sp_attention(q, k, v, layout)

    h = sp_embed(model, input_ids, images, layout, shard)                   # (1, T/sp, C)
    hidden = model.forward_embeds(h, shard["positions"], attn=prefill_attn)  # (1, T/sp, C)
    last_owner = int(token_owner(shard["Tp"], layout)[T - 1])
    logits = None
    if layout.sp_rank == last_owner:
        logits = model.llm.output(hidden[:, shard["idx"] == T - 1][:, -1]).float()   # (1, V)
    keeper = [0]

    def decode_attn(q, k, v, layer_idx):                                    # q (1, 1, H, D), k/v (1, 1, Hkv, D)
        if layout.sp_rank == keeper[0]:
            kc, vc = cache.append(layer_idx, k, v)                          # (1, n, Hkv, D)
        else:
            n = cache.length[layer_idx]
            kc, vc = cache.k[layer_idx][:, :n], cache.v[layer_idx][:, :n]   # (1, n, Hkv, D)
        if kc.shape[1] == 0:                                                # no keys here: weight 0 in the merge
            out = q.new_zeros(q.shape, dtype=torch.float32)                 # (1, 1, H, D)
            lse = q.new_full((1, q.shape[2], 1), float("-inf"), dtype=torch.float32)   # (1, H, 1)
        else:
            out, lse = kernels.attention_forward(q, kc, vc, causal=False, out_fp32=True, backend=layout.backend)
        return merge_across_group(out.float(), lse.float(), layout).to(q.dtype)   # (1, 1, H, D)

    out = []
    for step in range(max_new_tokens):
        tok = torch.zeros(1, dtype=torch.long, device=h.device)            # (1,)
        if layout.sp_rank == last_owner:
            tok = sample_token(logits, temperature, top_p, generator).view(1)
        if layout.sp > 1:                                                   # one rank samples; all agree
            dist.broadcast(tok, src=layout.sp_ranks[last_owner], group=layout.sp_group)
        out.append(tok)
        if stream is not None:
            stream(int(tok))
        if int(tok) in eos or step == max_new_tokens - 1:
            break
        keeper[0] = step % layout.sp
        x = model.llm.tok_embeddings(tok.view(1, 1))                        # (1, 1, C)
        pos = torch.full((1, 1), T + step, dtype=torch.long, device=x.device)   # (1, 1) true position
        logits = model.llm.output(model.forward_embeds(x, pos, attn=decode_attn)[:, -1]).float()   # (1, V)
    if not out:
        return input_ids.new_zeros(1, 0)
    return torch.stack(out, dim=1)                                          # (1, T_new)
