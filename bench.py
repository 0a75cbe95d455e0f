"""Benchmarks for longvila: attention kernels and multi-modal sequence parallelism, measured on real runs.

    python bench.py kernels                               # Triton vs torch SDPA (flash, cuDNN), one GPU
    torchrun --nproc_per_node 2 bench.py sp               # zigzag ring vs ring vs Ulysses vs torch context_parallel

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
    p.add_argument("--report-kernels", action="store_true", help="print registers/spills/smem/wgmma per variant")


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
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | B={B} H={H} D={D} causal={causal}")
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
    if args.report_kernels:  # what the compiler made of each variant: registers, spills, shared memory, wgmma
        for name in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
            try:
                for dev_cache in getattr(kernels, name).device_caches.values():
                    for ck in dev_cache[0].values():
                        md, ptx = ck.metadata, ck.asm.get("ptx", "")
                        print(f"{name}: warps={md.num_warps} stages={md.num_stages} regs={ck.n_regs} "
                              f"spills={ck.n_spills} smem={md.shared} wgmma={ptx.count('wgmma.mma_async')} "
                              f"cp.async={ptx.count('cp.async.cg')} tma={ptx.count('cp.async.bulk')}")
            except Exception as e:  # report only: never fail the benchmark over it
                print(f"{name}: no compiler report ({type(e).__name__}: {e})")
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
