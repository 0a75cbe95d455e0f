"""LongVILA's five-stage training curriculum from one entry point, on one CPU or many GPUs.

    python train.py --stage all                       # the CPU demo: demo data, tiny model, stages 0-5, then NIAH
    python train.py --stage 3 --init_from runs/demo/stage2/model --steps 20
    torchrun --nproc_per_node 4 train.py --stage 5 --sp 4 --ring 2 --init_from runs/demo/stage4/model
    torchrun --nproc_per_node 8 train.py --stage 4 --model longvila-8b --init_from /ckpt/LongVILA-8B \\
        --data /data/slimpajama.jsonl --seq_len 131072 --sp 8 --ring 8 --steps 80

The curriculum (paper Sec. 3 and Table 1; the reference's hyper-parameters, /work/shared/LONGVILA.md Sec. 3):
    0 stand-in           all (only from random weights) needle-colour QA, one per sample, + captions as text (the
                                                       demo's stand-in for the pretrained SigLIP + LLM the reference
                                                       starts from)
    1 alignment          projector only                image-caption pairs           lr 1e-3 cosine, warmup 3%
    2 pre-training       projector + LLM               captions / interleaved        lr 5e-5 cosine, warmup 3%
    3 short SFT          vision + projector + LLM      image / short-video QA        lr 1e-4 cosine, warmup 3%
    4 context extension  LLM only                      long text                     lr 2e-5 constant, 2 warmup
                         (RoPE theta raised to the target context and written into the saved config)
    5 long SFT           vision + projector + LLM      long-video QA                 lr 5e-5 cosine, warmup 3%,
                                                                                     activation checkpointing
`--stage N` picks a preset of defaults (STAGES below; TINY_DEMO retunes them for the tiny model); every flag
overrides it. `--stage all` chains stages 1-5 (0-5 without --init_from), each from the model the previous one saved.

Distribution: `init_distributed()` reads torchrun's environment (nccl on CUDA, gloo on CPU). The world is a
`dp x ring x ulysses` grid (mmsp.make_layout); every rank of one SP group reads the same sample and mmsp.sp_forward
splits it (frames, then zigzag tokens). Parameters, gradients and optimizer state are sharded over the whole world
with FSDP2 (`fully_shard`, ZeRO-3), bf16 compute with fp32 master weights and fp32 gradient reduction on CUDA.
The loss of every rank is (its summed cross-entropy) / (the GLOBAL count of supervised tokens of the step), so the
SUM of the ranks' gradients is the single-device gradient of the global batch: FSDP's reduce-scatter sums (divide
factor 1) instead of averaging.

A run folder holds: config.json (the resolved flags), metrics.jsonl (one JSON line per step), model/ (the final
model in the released VILA layout: config.json, llm/, vision_tower/, mm_projector/, loadable by
LongVILA.from_pretrained with any number of processes) and checkpoints/ (step-NNNNNN/: the model in the same layout
plus train_state/, the sharded fp32 weights + AdamW state written by torch.distributed.checkpoint, and trainer.json:
step, data position, RNG), with `checkpoints/latest` naming the newest complete one. Saves are atomic.
"""
import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass

# Before torch touches CUDA: grow the caching allocator's segments in place instead of carving fixed blocks. Long-
# video steps allocate activations of very different sizes (frames, then 64k-256k tokens), and with fixed blocks an
# 8B stage-5 step at 128k tokens on an H200 failed with 14 GB reserved but unusable (fragmentation). Set the
# variable yourself to override.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import data  # noqa: E402
import kernels  # noqa: E402
import longvila  # noqa: E402
import mmsp  # noqa: E402
import evaluate  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,  # noqa: E402
                                                     get_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard  # noqa: E402

# -----------------------------------------------------------------------------
# configuration: one dataclass of every flag, and the table of stage presets


@dataclass
class TrainConfig:
    # what to train
    stage: int = 1
    model: str = "tiny"          # longvila.PRESETS name, used when init_from is "none"
    init_from: str = "none"      # a VILA-layout folder (previous stage's model/ or a released checkpoint) | "none"
    out: str = "runs/stage1"     # run folder
    # data
    data: str = "data/demo"      # the folder `python data.py demo` writes (or a dataset file for real runs)
    num_frames: int = 0          # frames per video (0: the model config's num_video_frames)
    seq_len: int = 512           # max tokens per sample (stage 4: the target context = window length)
    media_root: str = ""         # media paths in the data files are relative to this ("": the first file's folder)
    cache_data: bool = False     # keep decoded samples in memory (small data sets: the demo)
    workers: int = -1            # loader processes building the next steps' batches (-1: auto, see loader_workers)
    # which modules learn
    train_vision: bool = False
    train_projector: bool = True
    train_llm: bool = False
    # optimisation
    lr: float = 1e-3
    schedule: str = "cosine"     # "cosine" | "constant"
    warmup: float = 0.03         # < 1: a fraction of the steps; >= 1: a number of steps
    min_lr_ratio: float = 0.0    # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    vision_lr_scale: float = 1.0  # the vision tower learns at lr * this (a from-scratch tower collapses at full lr)
    global_batch: int = 8        # samples per optimizer step over the whole world (= dp * micro_batch * accum)
    micro_batch: int = 1         # samples per forward on one rank (SP runs take 1)
    steps: int = 100
    grad_checkpointing: bool = False
    checkpoint_mode: str = "full"   # "full" | "save-attn" (keep the fused attention outputs: cudnn backend)
    checkpoint_layers: int = -1     # decoder blocks recomputed when checkpointing (-1: all; the rest keep activations)
    attn_backend: str = "auto"      # kernels.py backend on CUDA: auto (= triton) | triton | cudnn | torch
    fused_ops: bool = True          # CUDA: RMSNorm, RoPE, SwiGLU as fused Triton kernels (kernels.py)
    reinit_projector: bool = False  # start from a fresh projector (stage 1: the reference creates it there)
    # stage 4: RoPE for the longer context
    rope_theta: float = 0.0      # 0: keep the model's; stage 4 derives it from seq_len (rope_theta_for_context)
    trained_len: int = 0         # stage 4: the context the model was trained at (0: its config's max_seq_len)
    # parallelism
    sp: int = 1                  # sequence-parallel degree (= ring * ulysses); world = dp * sp
    ring: int = 1                # ring degree inside sp
    # bookkeeping
    seed: int = 0
    save_every: int = 0          # 0: no intermediate checkpoints (the final model/ is always written)
    no_save: bool = False        # benchmarks: write nothing (no checkpoints, no model/)
    keep_checkpoints: int = 2
    resume: bool = False
    skip_nonfinite: bool = False
    peak_tflops: float = 0.0     # per device, for MFU (0: 989 for H100/H200 bf16 dense, none on CPU)
    profile_step: int = 0        # profile this whole step (fwd+bwd, clipping, optimizer) on rank 0 (0: off)
    dtype: str = "auto"          # "auto" (bf16 on CUDA, fp32 on CPU) | "fp32" | "bf16"


@dataclass
class StagePreset:
    """The defaults one `--stage N` sets. Learning rates and schedules are the reference's (LONGVILA.md Sec. 3)."""
    name: str
    train_vision: bool
    train_projector: bool
    train_llm: bool
    lr: float
    schedule: str
    warmup: float
    grad_checkpointing: bool = False
    reinit_projector: bool = False
    data_kind: str = ""          # which demo dataset feeds the stage (see build_dataset)


STAGES = {
    # Stage 0 is not LongVILA's: the reference starts from a pretrained vision tower (SigLIP) and a pretrained LLM
    # (Llama-3 / Qwen2). A model that starts from random weights (the tiny demo) first trains stand-ins for them:
    # everything, on single-turn "what colour is the needle" questions about short videos (the visual skill) and,
    # as text, on captions written where their image would be (the caption language; see STAND_IN_DATA).
    # `--stage all` runs stage 0 only when there is no --init_from. (Stage 1 keeps the stand-in's projector in the
    # demo; from real checkpoints it starts a fresh one, as the reference.)
    0: StagePreset("stand-in-pretraining", True, True, True, lr=1e-3, schedule="cosine", warmup=0.03,
                   data_kind="stand_in"),
    1: StagePreset("alignment", False, True, False, lr=1e-3, schedule="cosine", warmup=0.03, reinit_projector=True,
                   data_kind="caption"),
    2: StagePreset("pretraining", False, True, True, lr=5e-5, schedule="cosine", warmup=0.03, data_kind="caption"),
    3: StagePreset("short-sft", True, True, True, lr=1e-4, schedule="cosine", warmup=0.03, data_kind="short_sft"),
    4: StagePreset("context-extension", False, False, True, lr=2e-5, schedule="constant", warmup=2,
                   data_kind="long_text"),
    5: StagePreset("long-sft", True, True, True, lr=5e-5, schedule="cosine", warmup=0.03, grad_checkpointing=True,
                   data_kind="long_sft"),
}

# The CPU demo: the tiny model learns from scratch in a few hundred steps, so it needs larger learning rates and
# far fewer samples than the reference's 8B runs. These override STAGES when --model tiny (flags still win).
TINY_DEMO = {
    0: dict(lr=2e-3, steps=300, global_batch=16, seq_len=512, schedule="constant", warmup=5, vision_lr_scale=0.02),
    1: dict(lr=3e-3, steps=60, global_batch=16, seq_len=512, reinit_projector=False),
    2: dict(lr=2e-3, steps=80, global_batch=8, seq_len=512),
    3: dict(lr=2e-3, steps=120, global_batch=16, seq_len=512, vision_lr_scale=0.02),
    4: dict(lr=1e-4, steps=10, global_batch=2, seq_len=1024, trained_len=512),
    5: dict(lr=2e-3, steps=200, global_batch=16, seq_len=1024, num_frames=32, vision_lr_scale=0.02),
}


def stage_defaults(stage: int, model: str) -> dict:
    """The flag defaults of one stage: the preset's, then the tiny demo's tuning when the model is tiny."""
    p = STAGES[stage]
    d = dict(stage=stage, train_vision=p.train_vision, train_projector=p.train_projector, train_llm=p.train_llm,
             lr=p.lr, schedule=p.schedule, warmup=p.warmup, grad_checkpointing=p.grad_checkpointing,
             reinit_projector=p.reinit_projector)
    if model == "tiny":
        d.update(TINY_DEMO[stage])
    return d


# -----------------------------------------------------------------------------
# pure functions: learning-rate schedules, RoPE theta for a longer context, MFU


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio or constant."""
    warmup = cfg.warmup if cfg.warmup >= 1 else math.ceil(cfg.warmup * cfg.steps)
    warmup = int(warmup)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule != "cosine":
        raise ValueError(f"--schedule {cfg.schedule!r}: expected 'cosine' or 'constant'")
    progress = (step - warmup) / max(1, cfg.steps - warmup)  # 0 -> 1 over the decay
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


# The reference's stage-4 thetas for Qwen2 (trained at 32k with theta 1e6): 4x the context -> 1.53e7,
# 8x -> 2.07e8, 16x -> 1.06e9. We read them as theta multipliers against the context ratio and interpolate
# log-log between them (extrapolating the last segment), so Llama-3 (8k, 5e5) and tiny scale the same way.
_THETA_ANCHORS = [(1.0, 1.0), (4.0, 15.3), (8.0, 207.0), (16.0, 1062.0)]


def rope_theta_for_context(base_theta: float, trained_len: int, target_len: int) -> float:
    """RoPE base for extending a model trained at `trained_len` tokens to `target_len` (never lowers it)."""
    ratio = target_len / trained_len
    if ratio <= 1.0:
        return base_theta
    pts = [(math.log(r), math.log(m)) for r, m in _THETA_ANCHORS]
    x = math.log(ratio)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            break  # (x0, y0)-(x1, y1) is the segment holding x (or the last one, extrapolated)
    y = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return float(base_theta * math.exp(y))


def peak_flops(cfg: TrainConfig, device: torch.device) -> float:
    """Peak dense FLOP/s of one device for MFU: --peak_tflops, else H100/H200 bf16 (989 TFLOP/s); 0 = unknown."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if "H100" in name or "H200" in name:
            return 989e12
    return 0.0


# -----------------------------------------------------------------------------
# feedback: run folder, one log line per step, a progress bar with ETA, metrics as JSON lines


def fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_bar(done: int, total: int, elapsed: float, width: int = 24) -> str:
    """`[#########...........] 40/100 0:01:02<0:01:33` (elapsed < ETA from the mean step time so far)."""
    frac = done / max(1, total)
    eta = elapsed / max(1, done) * (total - done)
    fill = int(round(width * frac))
    return f"[{'#' * fill}{'.' * (width - fill)}] {done}/{total} {fmt_seconds(elapsed)}<{fmt_seconds(eta)}"


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPUs, resident-set high-water mark on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _kernel_kind(name: str) -> str:
    n = name.lower()
    ours = ("_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel")  # kernels.py's attention
    return ("NCCL" if "nccl" in n else
            "attention" if any(a in n for a in ("cudnn", "fmha", "flash", "attn") + ours) else
            "matrix products" if any(a in n for a in ("gemm", "xmma", "cutlass", "nvjet", "sm90_")) else
            "fused ops (kernels.py)" if any(a in n for a in ("_rms_norm", "_swiglu", "_rotary")) else
            "other (elementwise, copies, reductions)")


def profile_report(prof, path: str) -> list:
    """Lines summing one profiled step: GPU kernel time by kind (streams overlap, so kinds can sum past the span),
    the GPU's busy time and the 8 costliest 'other' kernels; the Chrome trace is written to `path` (or, on CPU,
    the costliest ops). Open the trace in chrome://tracing or ui.perfetto.dev."""
    prof.export_chrome_trace(path)
    with open(path) as f:
        ev = [e for e in json.load(f)["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not ev:  # CPU run: no kernels, the op table instead
        return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12).splitlines()
    kinds, other = {}, {}
    for e in ev:
        kind = _kernel_kind(e["name"])
        kinds[kind] = kinds.get(kind, 0.0) + e["dur"] / 1e3  # ms
        if kind.startswith("other"):
            n, ms = other.get(e["name"][:90], (0, 0.0))
            other[e["name"][:90]] = (n + 1, ms + e["dur"] / 1e3)
    busy, end = 0.0, -math.inf  # union of the kernel intervals, any stream
    for s, d in sorted((e["ts"], e["dur"]) for e in ev):
        busy += max(0.0, s + d - max(s, end))
        end = max(end, s + d)
    span = (max(e["ts"] + e["dur"] for e in ev) - min(e["ts"] for e in ev)) / 1e3
    lines = [f"GPU busy {busy / 1e3:.0f} ms of a {span:.0f} ms span; kernel time by kind:"]
    lines += [f"  {k:40s} {v:9.1f} ms" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])]
    costliest = sorted(other.items(), key=lambda kv: -kv[1][1])[:8]
    lines += [f"    {ms:8.1f} ms {n:5d}x {name}" for name, (n, ms) in costliest]
    return lines + [f"trace: {path}"]


class RunLog:
    """Rank 0 writes config.json once and appends one JSON line per step to metrics.jsonl; other ranks are silent."""

    def __init__(self, out: str, rank: int, resume: bool):
        self.rank = rank
        self.path = os.path.join(out, "metrics.jsonl")
        if rank == 0 and not resume and os.path.exists(self.path):
            os.remove(self.path)  # a fresh run starts a fresh file; --resume appends

    def write_config(self, out: str, cfg: TrainConfig, extra: dict):
        if self.rank == 0:
            with open(os.path.join(out, "config.json"), "w") as f:
                json.dump({**dataclasses.asdict(cfg), **extra}, f, indent=1)

    def step(self, record: dict, bar: str):
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        mfu = f"{100 * record['mfu']:.1f}%" if record["mfu"] is not None else "n/a"
        print(f"stage {record['stage']} step {record['step']:5d} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
              f"grad-norm {record['grad_norm']:.3f} | tok/s {record['tok_per_s']:,.0f} | MFU {mfu} | "
              f"mem {record['mem_gb']:.2f} GB | {bar}", flush=True)

    def info(self, msg: str):
        if self.rank == 0:
            print(msg, flush=True)


# -----------------------------------------------------------------------------
# atomic checkpoints: write into a temporary folder, fsync, rename, then point `latest` at it


def fsync_tree(path: str):
    """fsync every file and folder below `path` so a rename after it publishes complete data."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish_dir(tmp: str, final: str):
    """Rename a finished temporary folder to its final name (the old one, if any, is removed first)."""
    fsync_tree(tmp)
    if os.path.exists(final):
        # a re-save of the same step (e.g. a resume that ended exactly at a checkpoint): swap through a
        # trash name so `final` is never half-deleted while visible
        trash = final + ".old"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash)
    else:
        os.rename(tmp, final)
    parent = os.open(os.path.dirname(os.path.abspath(final)), os.O_RDONLY)
    try:
        os.fsync(parent)
    finally:
        os.close(parent)


def write_text_atomic(path: str, text: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new content, never a torn one


def latest_checkpoint(out: str) -> str | None:
    """The newest complete checkpoint of a run folder (named by checkpoints/latest), or None."""
    pointer = os.path.join(out, "checkpoints", "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(out, "checkpoints", name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{pointer} names {name!r} but {path} does not exist: the run folder was edited")
    return path


# -----------------------------------------------------------------------------
# distribution: activation checkpointing per block, FSDP2 over the whole world


def transformer_blocks(model) -> list:
    """The repeated blocks of the model (SigLIP layers, then LLM layers): the units of FSDP and of recomputation."""
    return list(model.vision.layers) + list(model.llm.layers)


def shard_model(model, device: torch.device, compute_dtype: torch.dtype):
    """ZeRO-3 over the whole world with FSDP2: every block is one unit (all-gathered just in time, freed after),
    the rest (embeddings, projector, norms, output) is the root unit. Parameters stay fp32 (the master weights
    AdamW updates); with compute_dtype bf16 each all-gather casts them to bf16 and gradients are reduced in fp32.

    FSDP2 runs on gloo as well (CPU), so CPU and GPU runs take the same code path. Gradients are SUMMED over
    ranks (divide factor 1), because every rank's loss is already divided by the global supervised-token count.
    """

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM, and nothing to scale
    return model


def init_weights_(model):
    """Fresh weights for a model whose storage was allocated empty (built on the meta device, then to_empty):
    the model's own init for linears/embeddings/LayerNorms, ones for RMSNorm gains (set in their __init__)."""

    model.apply(longvila.LongVILA._init_weights)
    for m in model.modules():
        if isinstance(m, longvila.RMSNorm):
            torch.nn.init.ones_(m.weight)


def full_state_dict(model, world: int) -> dict | None:
    """Plain fp32 tensors of the whole model on rank 0 (None on the others); FSDP shards are gathered."""
    if world == 1:
        return {k: v.detach() for k, v in model.state_dict().items()}

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if dist.get_rank() == 0 else None


def save_model(model, path: str, world: int, tokenizer_json: str | None, save_dtype: torch.dtype | None = None):
    """The released VILA layout (config.json, llm/, vision_tower/, mm_projector/) from any number of ranks: the
    full state dict is gathered on rank 0, put into a plain skeleton (built on meta, tensors assigned) and saved
    with LongVILA.save_pretrained, so the folder never depends on the wrapper or the world size that wrote it."""

    sd = full_state_dict(model, world)
    if sd is None:
        return
    config = model.config
    with torch.device("meta"):
        plain = longvila.LongVILA(config)
    sd = {k: (v.to(save_dtype) if save_dtype is not None and v.is_floating_point() else v).cpu()
          for k, v in sd.items()}
    plain.load_state_dict(sd, strict=True, assign=True)
    plain.llm.tie()
    plain.save_pretrained(path, tokenizer_json=tokenizer_json)


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(out: str, step: int, model, optimizer, world: int, rank: int, device: torch.device,
                    tokenizer_json: str | None, keep: int, meta: dict):
    """checkpoints/step-NNNNNN/ = VILA-layout model + train_state/ (DCP: sharded fp32 weights and AdamW moments)
    + rng/ (one file per rank) + trainer.json; written under a .tmp name, fsynced, renamed, then `latest`."""

    root = os.path.join(out, "checkpoints")
    name = f"step-{step:06d}"
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # the leftovers of a save that was killed
        os.makedirs(os.path.join(tmp, "rng"))
    if world > 1:
        dist.barrier()
    save_model(model, tmp, world, tokenizer_json)
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(tmp, "train_state"))
    save_file({k: v.contiguous() for k, v in rng_state(device).items()},
              os.path.join(tmp, "rng", f"rank{rank:05d}.safetensors"))
    if rank == 0:
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump({"step": step, "world_size": world, **meta}, f, indent=1)
    if world > 1:
        dist.barrier()
    if rank == 0:
        publish_dir(tmp, final)
        write_text_atomic(os.path.join(root, "latest"), name)
        old = sorted(d for d in os.listdir(root) if d.startswith("step-") and not d.endswith((".tmp", ".old")))
        for d in old[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, d))
    if world > 1:
        dist.barrier()


def load_checkpoint(path: str, model, optimizer, rank: int, device: torch.device) -> dict:
    """Restore weights, AdamW state and this rank's RNG from a checkpoint folder; returns trainer.json."""

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=os.path.join(path, "train_state"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = os.path.join(path, "rng", f"rank{rank:05d}.safetensors")
    if os.path.exists(rng_file):  # absent when resuming with more ranks than wrote the checkpoint
        set_rng_state(load_file(rng_file), device)
    with open(os.path.join(path, "trainer.json")) as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# data: which files feed each stage, which samples each step reads


# The demo folder's files per stage (see data.py's docstring). Stage 5 mixes short data back in (paper Sec. 3.1).
DEMO_FILES = {
    0: [("stage3.json", 1.0), ("stage1.json", 0.2)],  # needle questions + 240 captions as text (STAND_IN_DATA)
    1: [("stage1.json", 1.0)],
    2: [("stage2.json", 1.0)],
    3: [("stage3.json", 1.0)],
    4: [("stage4.bin", 1.0)],
    5: [("stage5.json", 1.0), ("stage3.json", 0.5)],
}


def parse_data(spec: str, stage: int) -> tuple[list, str]:
    """--data -> ([(file, weight)], media_root). A folder is the demo layout; otherwise `a.json:1,b.json:0.5`
    (media paths are relative to the first file's folder unless --media_root says otherwise)."""
    if os.path.isdir(spec):
        files = [(os.path.join(spec, f), w) for f, w in DEMO_FILES[stage]]
        return files, spec
    files = []
    for part in spec.split(","):
        path, _, weight = part.partition(":")
        files.append((path, float(weight) if weight else 1.0))
    for path, _ in files:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--data: {path} does not exist (expected a JSON/JSONL sample file, a text "
                                    f"file for stage 4, or the demo folder written by `python data.py demo`)")
    return files, os.path.dirname(os.path.abspath(files[0][0]))


class SyntheticVideoDataset:
    """`--data synthetic`: random long-video samples of exactly the shape of real ones, for throughput runs of large
    models without data on disk. Sample i (seeded by i): 16 text tokens, num_frames x (N placeholders + newline),
    16 question tokens, 32 supervised answer tokens; pixels uniform in [-1, 1] (the range after preprocessing)."""

    def __init__(self, num_frames: int, tokens_per_frame: int, image_size: int, vocab_size: int, n: int = 4):
        self.F, self.N, self.S, self.V, self.n = num_frames, tokens_per_frame, image_size, vocab_size, n

    def __len__(self):
        return self.n

    def __getitem__(self, i: int) -> dict:

        g = torch.Generator().manual_seed(i)
        text = lambda k: torch.randint(0, self.V, (k,), generator=g)  # noqa: E731  (k,) random token ids
        frame = torch.cat([torch.full((self.N,), longvila.IMAGE_TOKEN_ID), text(1)])  # (N + 1,) one frame's slots
        answer = text(32)
        ids = torch.cat([text(16), frame.repeat(self.F), text(16), answer])  # (T,)
        labels = torch.full_like(ids, longvila.IGNORE_INDEX)
        labels[-answer.numel():] = answer  # (T,) the answer is supervised
        images = torch.rand(self.F, 3, self.S, self.S, generator=g) * 2 - 1  # (F, 3, S, S)
        return {"id": f"synthetic-{i}", "input_ids": ids, "labels": labels, "images": images}


def build_dataset(cfg: TrainConfig, model_config, tokenizer, media_root: str | None = None):
    """The stage's dataset: long text windows for stage 4, supervised (image / video) conversations otherwise."""

    if cfg.data == "synthetic":
        return SyntheticVideoDataset(cfg.num_frames or model_config.num_video_frames, model_config.tokens_per_frame,
                                     model_config.vision.image_size, model_config.llm.vocab_size)

    files, default_root = parse_data(cfg.data, cfg.stage)
    if cfg.stage == 4:
        return data.TextWindowDataset(files[0][0], tokenizer, cfg.seq_len, cfg.seed)
    if cfg.stage == 0:
        files = [(stand_in_copy(path, cfg.out, STAND_IN_DATA.get(os.path.basename(path), "needle")), w)
                 for path, w in files]
    frames = cfg.num_frames or model_config.num_video_frames
    return data.SupervisedDataset(files, media_root or default_root, tokenizer, model_config.vision.image_size,
                                  model_config.tokens_per_frame, frames, cfg.seq_len, seed=cfg.seed)


# What stage 0 (the stand-in pretraining of a model from random weights) makes of each demo file.
#   "needle":   every "what colour is the needle" turn as its own sample, with its video: the visual skill a
#               pretrained vision tower would bring (one colour word per sample is a signal a random model picks up
#               in ~100 steps; the same question as one turn of four among other tasks takes far longer).
#   "describe": text only, the image's place in the prompt holding its caption's words ("an orange diamond\nWhat
#               is in the image?" -> "an orange diamond"): the caption language a pretrained LLM would bring, and
#               the habit of reading the answer off the image's place, which stage 1's projector then has to
#               serve from pixels (the tiny demo's only partly: README). Without it the frozen LLM of stage 1 has
#               never seen a caption and no projector can make it write one (stage 1 fell only 13.4 -> 12.4).
STAND_IN_DATA = {"stage3.json": "needle", "stage1.json": "describe"}


def stand_in_copy(path: str, out: str, keep: str = "needle") -> str:
    """Stage 0's version of one conversation file (keep: see STAND_IN_DATA), written to `out`; returns its path."""

    with open(path) as f:
        samples = json.load(f)
    copies = []
    for s in samples:
        turns = s["conversations"]
        if keep == "needle":
            media = "".join(m for m in ("<image>\n", "<video>\n") if m in turns[0]["value"])
            for k in range(0, len(turns) - 1, 2):
                if "needle" in turns[k]["value"]:
                    q = turns[k]["value"] if k == 0 else media + turns[k]["value"]
                    copies.append(dict(s, id=f"{s.get('id', '?')}-turn{k // 2}",
                                       conversations=[dict(turns[k], value=q), turns[k + 1]]))
        elif keep == "describe":
            words, q = turns[1]["value"].strip(), turns[0]["value"]
            q = data.MEDIA_RE.sub(words, q) if data.MEDIA_RE.search(q) else words + "\n" + q
            copies.append(dict({k: v for k, v in s.items() if k not in ("image", "video")},
                               id=f"{s.get('id', '?')}-describe", conversations=[dict(turns[0], value=q), turns[1]]))
        else:
            raise ValueError(f"stand_in_copy: keep={keep!r}, expected 'needle' or 'describe'")
    dst = os.path.join(out, f"stand_in_{keep}_" + os.path.basename(path))
    os.makedirs(out, exist_ok=True)
    tmp = f"{dst}.{os.getpid()}"  # every rank writes the same content: each its own file, then an atomic rename
    with open(tmp, "w") as f:
        json.dump(copies, f)
    os.replace(tmp, dst)
    return dst


class ItemCache:
    """Decoded samples kept in memory (the demo's datasets are small; decoding a video every step is not)."""

    def __init__(self, dataset, enabled: bool):
        self.dataset, self.enabled, self.items = dataset, enabled, {}

    def __getitem__(self, i: int):
        if not self.enabled:
            return self.dataset[i]
        if i not in self.items:
            self.items[i] = self.dataset[i]
        return self.items[i]


def micro_batches(indices: list[int], cache: ItemCache, micro: int, pad_id: int) -> list:
    """This rank's samples of one step (data.SPSampler gives every rank of an SP group the same ones), cut into
    micro-batches and collated."""

    return [data.collate([cache[i] for i in indices[j:j + micro]], pad_id) for j in range(0, len(indices), micro)]


def pack_pixels(x: torch.Tensor) -> torch.Tensor:
    """float32 pixels (F, 3, S, S) in [-1, 1] -> uint8 (F, 3, S, S) when that loses nothing, else x itself.

    data.preprocess resizes in uint8 and only then normalises, (k/255 - 0.5)/0.5 = k * 2/255 - 1 for an integer
    k, so k = round((x + 1) * 127.5) recovers it and unpack_pixels redoes preprocess's two float ops on it:
    bitwise the same tensor at a quarter of the bytes. That matters between loader processes (a 1024-frame 384 px
    sample is 1.8 GB in fp32, 0.45 GB in uint8, through shared memory, pinned memory and PCIe). Pixels that are
    not of that form (data.preprocess's float path when one side grows, --data synthetic) stay float. Done 64
    frames at a time, so packing a 1.8 GB sample needs 0.45 GB more, not two more float copies."""
    k = torch.empty(x.shape, dtype=torch.uint8)  # (F, 3, S, S)
    for s in range(0, len(x), 64):
        k[s:s + 64] = x[s:s + 64].add(1.0).mul_(127.5).round_().clamp_(0, 255)  # (64, 3, S, S) levels 0..255
        if not torch.equal(unpack_pixels(k[s:s + 64]), x[s:s + 64]):
            return x
    return k


def unpack_pixels(x: torch.Tensor) -> torch.Tensor:
    """uint8 (F, 3, S, S) from pack_pixels -> float32 in [-1, 1], the same ops as data.preprocess (on any device);
    float input passes through."""
    return x.float().mul_(2.0 / 255.0).sub_(1.0) if x.dtype == torch.uint8 else x


class StepBatches(torch.utils.data.Dataset):
    """The data of optimizer steps first..last-1 as a map-style dataset: item k = this rank's collated
    micro-batches of step first + k, plus the samples that step had to skip.

    An item is a pure function of (seed, step) - data.SPSampler.indices_for_step(step) is, and so is building a
    sample - so it does not matter which process builds it or in which order: any number of loader workers gives
    the batches of workers=0, and a resumed run starts at the saved step. Every rank of an SP group has the same
    dp_rank, hence the same indices and the same sample.

    Skipped samples (unreadable media: data.SupervisedDataset counts them in `.skipped` / `.skipped_files`) are
    counted in whichever process built the item; a DataLoader worker's counters die with it, so each item carries
    the difference its own build made and the training loop adds them up.
    """

    def __init__(self, cache: ItemCache, sampler, first: int, last: int, micro: int, pad_id: int,
                 pack: bool = False):
        self.cache, self.sampler, self.first, self.last = cache, sampler, first, last
        self.micro, self.pad_id, self.pack = micro, pad_id, pack  # pack: pixels as uint8 (see pack_pixels)

    def __len__(self):
        return max(0, self.last - self.first)

    def __getitem__(self, k: int) -> dict:
        step = self.first + k
        dataset = self.cache.dataset
        n0, files0 = getattr(dataset, "skipped", 0), len(getattr(dataset, "skipped_files", []))
        indices = self.sampler.indices_for_step(step)  # this dp rank's samples of the step
        try:
            batches = micro_batches(indices, self.cache, self.micro, self.pad_id)
        except Exception as e:  # in a worker, DataLoader re-raises it in the training process with this message
            raise RuntimeError(f"data of step {step + 1} (dataset indices {indices}): {type(e).__name__}: {e}") from e
        if self.pack:
            for b in batches:
                b["images"] = [None if im is None else pack_pixels(im) for im in b["images"]]  # (F, 3, S, S) each
        return {"step": step, "batches": batches, "skipped": getattr(dataset, "skipped", 0) - n0,
                "skipped_files": list(getattr(dataset, "skipped_files", [])[files0:])}


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask: containers and `taskset` give fewer than os.cpu_count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def loader_workers(cfg: TrainConfig) -> int:
    """--workers, or when -1 (auto): 0 with --cache_data (after the first epoch every step is a dictionary
    lookup: nothing to overlap), else min(8, cores / processes on this node). Decoding a 1024-frame sample takes
    ~60 core-seconds (README), so the loader wants every core it can get; the processes of a node share them, and
    past 8 per process the in-flight samples' memory (workers x 2 steps) costs more than it gains."""
    if cfg.workers >= 0:
        return cfg.workers
    if cfg.cache_data:
        return 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's: processes on this node
    return max(1, min(8, cpu_cores() // local_world))


def _init_loader_worker(worker_id: int, decode_threads: int):
    """In each loader process: its share of the cores decodes each video (data.video_pixels: that many readers on
    contiguous runs of the frames; DataLoader already set torch to 1 thread). With few workers a sample is ready
    sooner (and fewer samples sit in memory); with as many workers as cores it is 1 thread each, no
    oversubscription."""
    info = torch.utils.data.get_worker_info()
    dataset = info.dataset.cache.dataset
    if hasattr(dataset, "decode_threads"):
        dataset.decode_threads = decode_threads


def step_loader(cache: ItemCache, sampler, first: int, last: int, micro: int, pad_id: int, workers: int,
                pin_memory: bool, seed: int, timeout: float = 0) -> torch.utils.data.DataLoader:
    """Batches of steps first..last-1, in order. workers = 0: built in this process when the step asks for them
    (the plain synchronous loop). workers = N > 0: N forked processes build the next steps while the current one
    trains; each holds at most 2 finished steps (prefetch_factor), so at most 2N steps of pixels are in memory.

    batch_size=None: an item already is a whole step (no re-collation). One pass over the stage's steps is one
    DataLoader epoch, so persistent_workers would never be used: workers end with the stage. The generator is
    private because creating the iterator draws a seed for the workers, and drawing it from torch's global RNG
    would change the training RNG stream (and break bitwise equality with workers=0 and exact resume). Workers send
    pixels as uint8 (pack_pixels; forward_backward unpacks them on the compute device). timeout (workers > 0):
    seconds to wait for one step before raising (0: forever; benchmarks)."""
    steps = StepBatches(cache, sampler, first, last, micro, pad_id, pack=workers > 0)
    extra = {}
    if workers > 0:
        threads = max(1, cpu_cores() // (workers * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        extra = dict(prefetch_factor=2, timeout=timeout,
                     worker_init_fn=functools.partial(_init_loader_worker, decode_threads=threads))
    # pinned (page-locked) memory lets the copy to the GPU run asynchronously; DataLoader pins in a thread of its
    # own with workers, in the step itself without (where it would only add a copy to the synchronous loop)
    return torch.utils.data.DataLoader(steps, batch_size=None, shuffle=False, num_workers=workers,
                                       pin_memory=pin_memory and workers > 0,
                                       generator=torch.Generator().manual_seed(seed), **extra)


def start_loader(loader: torch.utils.data.DataLoader):
    """iter(loader), after freeing this process's garbage when workers are about to be forked. A forked child that
    frees an object of a library with threads of its own waits forever for threads that exist only in the parent:
    we saw a worker hang in PyAV's VideoReformatter.__dealloc__ (swscale's slice threads) on garbage left by
    earlier videos of the parent. Collected here, in the parent, nothing of the kind is left for a child to free."""
    if loader.num_workers > 0:
        gc.collect()
    return iter(loader)


def supervised_targets(labels: torch.Tensor) -> int:
    """Positions whose NEXT token is supervised (the loss's count after shifting)."""

    return int((longvila.shift_labels(labels) != longvila.IGNORE_INDEX).sum())


# -----------------------------------------------------------------------------
# one optimizer step: gradient accumulation over micro-batches, loss normalised by the global token count


class NonFiniteLoss(RuntimeError):
    pass


def forward_backward(model, batches: list, layout, world: int, device: torch.device, autocast) -> tuple:
    """Forward + backward of this rank's micro-batches; returns (global mean loss, global tokens, per-sample T).

    Every micro-batch's loss is its cross-entropy SUM over the world / its global supervised count (model forward
    or mmsp.sp_forward); weighting it by count_i / count_total makes the accumulated gradient that of
    sum(CE over the whole global batch) / (its supervised tokens): the same as one device with the whole batch."""
    counts = [supervised_targets(b["labels"]) for b in batches]
    lengths = [int(n) for b in batches for n in (b["labels"].shape[1],) * b["labels"].shape[0]]
    stats = torch.tensor(counts + [sum(lengths)], dtype=torch.float64, device=device)  # (accum + 1,)
    if world > 1:  # on the compute device: NCCL has no CPU tensors
        dist.all_reduce(stats)
        stats /= layout.sp  # every rank of an SP group holds the same sample
    stats = stats.cpu()
    total = stats[:-1].sum().clamp(min=1.0)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)  # () the step's global mean, accumulated
    for b, count in zip(batches, stats[:-1]):
        ids, labels = b["input_ids"].to(device), b["labels"].to(device)  # (B, T)
        # per sample (F, 3, S, S) | None; loader workers send uint8 pixels: 4x fewer bytes to copy, unpacked here
        images = [None if im is None else unpack_pixels(im.to(device, non_blocking=True)) for im in b["images"]]
        with autocast():
            if world > 1:  # through model.__call__ so FSDP's root hooks gather the root's parameters
                _, loss = model(ids, images, labels, return_logits=False,  # this rank's share
                                sp_forward=functools.partial(mmsp.sp_forward, layout=layout))
            else:
                _, loss = model(ids, images, labels, return_logits=False)  # mean over the micro-batch
        w = float(count / total)
        (loss * w).backward()
        loss_sum += loss.detach().float() * w
    if world > 1:
        dist.all_reduce(loss_sum)  # shares -> the global mean
    return loss_sum, int(stats[-1]), lengths


def grad_norm_and_clip(params: list, max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients (over FSDP shards too) and clipping to max_norm (0: no clipping)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return norm


# -----------------------------------------------------------------------------
# one stage


def build_model(cfg: TrainConfig, world: int, device: torch.device):
    """The starting model: --init_from a VILA folder, or a seeded random init of the --model preset."""

    if cfg.init_from and cfg.init_from != "none":
        return longvila.LongVILA.from_pretrained(cfg.init_from, dtype=torch.float32)
    config = longvila.LongVILAConfig.from_dict(longvila.PRESETS[cfg.model].to_dict())  # a private copy
    torch.manual_seed(cfg.seed)
    if device.type == "cuda" and world > 1:
        # A random 8B model: build on meta, shard, then allocate and initialise only this rank's shards on the
        # GPU (shard_model is called on it next; see train_stage).
        with torch.device("meta"):
            return longvila.LongVILA(config)
    return longvila.LongVILA(config)


def apply_stage_to_config(cfg: TrainConfig, model) -> dict:
    """Stage 4: raise RoPE theta for the target context (written into every config the run saves)."""
    llm = model.config.llm
    changes = {}
    theta = cfg.rope_theta
    if cfg.stage == 4 and theta == 0:
        trained = cfg.trained_len or llm.max_seq_len
        theta = rope_theta_for_context(llm.rope_theta, trained, cfg.seq_len)
    if theta and theta != llm.rope_theta:
        changes["rope_theta"] = (llm.rope_theta, theta)
        llm.rope_theta = float(theta)  # model.llm.cfg is this same object: RoPE is computed from it every forward
    if cfg.stage == 4 and cfg.seq_len > llm.max_seq_len:
        changes["max_seq_len"] = (llm.max_seq_len, cfg.seq_len)
        llm.max_seq_len = cfg.seq_len
    return changes


def find_tokenizer_json(cfg: TrainConfig) -> str | None:
    """The tokenizer.json that travels with the model: the init checkpoint's, else the demo folder's."""
    for path in ([os.path.join(cfg.init_from, "llm", "tokenizer.json")] if cfg.init_from != "none" else []) + \
            [os.path.join(cfg.data, "tokenizer.json")]:
        if os.path.isfile(path):
            return path
    return None


def train_stage(cfg: TrainConfig, info, layout) -> str:
    """Train one stage; returns the folder of the saved model (VILA layout)."""

    rank, world, device = info.rank, info.world_size, info.device
    log = RunLog(cfg.out, rank, cfg.resume)
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
    t_start = time.time()

    # --- model, trainable modules, stage config changes ---
    model = build_model(cfg, world, device)
    if cfg.reinit_projector and cfg.init_from != "none":
        # LLaVA / VILA stage 1 puts a NEW projector between a pretrained vision tower and a pretrained LLM
        torch.manual_seed(cfg.seed)
        model.projector.apply(longvila.LongVILA._init_weights)
    changes = apply_stage_to_config(cfg, model)
    model.set_trainable(vision=cfg.train_vision, projector=cfg.train_projector, llm=cfg.train_llm)
    model.set_grad_checkpointing(cfg.checkpoint_mode if cfg.grad_checkpointing else False,
                                 llm_layers=None if cfg.checkpoint_layers < 0 else cfg.checkpoint_layers)
    if cfg.attn_backend != "auto" and cfg.attn_backend not in kernels.BACKENDS:
        raise ValueError(f"--attn_backend {cfg.attn_backend!r}: choose auto or one of {kernels.BACKENDS}")
    # CPU: the model's attention is torch SDPA whatever the backend; the fused ops need CUDA
    kernels.configure(backend=cfg.attn_backend if device.type == "cuda" else "auto", fused_ops=cfg.fused_ops)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    # FLOPs per sample of T tokens, F frames = a*T + b*T^2 + v*F (model.flops_per_token is linear in T)
    fa = model.flops_per_token(0, causal=True)
    fb = model.flops_per_token(1, causal=True) - fa
    fv = model.vision_flops_per_frame()
    tok_json = find_tokenizer_json(cfg)
    tokenizer = (data.Tokenizer.from_file(tok_json, template=model.config.chat_template) if tok_json
                 else data.Tokenizer.tiny(template=model.config.chat_template))

    use_cuda = device.type == "cuda"
    compute_dtype = torch.bfloat16 if (cfg.dtype == "bf16" or (cfg.dtype == "auto" and use_cuda)) else torch.float32
    if world > 1:
        shard_model(model, device, compute_dtype)
        if any(p.is_meta for p in model.parameters()):
            model.to_empty(device=device)
            init_weights_(model)
            model.llm.tie()
    else:
        model.to(device)
    autocast = ((lambda: torch.autocast(device.type, dtype=compute_dtype)) if world == 1 and
                compute_dtype != torch.float32 else (lambda: torch.autocast(device.type, enabled=False)))

    params = [p for p in model.parameters() if p.requires_grad]
    # AdamW groups: decay / no decay (model.param_groups), each split into vision tower and the rest, so the vision
    # tower can learn at lr * vision_lr_scale (set per step below through each group's lr_scale)
    vision = {id(p) for p in model.vision.parameters()}
    groups = [dict(g, params=[p for p in g["params"] if p.requires_grad and (id(p) in vision) == is_vision],
                   lr_scale=cfg.vision_lr_scale if is_vision else 1.0)
              for g in model.param_groups(cfg.weight_decay) for is_vision in (False, True)]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay, fused=use_cuda)

    # --- data ---
    dataset = build_dataset(cfg, model.config, tokenizer, cfg.media_root or None)
    if layout.sp > 1 and hasattr(dataset, "frame_shard"):
        # the ranks of an SP group read the same sample, but each encodes only its ceil(F/sp) frames
        # (mmsp.encode_frames_sharded): each decodes only those, and sp ranks share the decoding instead of repeating it
        dataset.frame_shard = (layout.sp_rank, layout.sp)
    workers = loader_workers(cfg)
    if workers > 0 and cfg.cache_data:
        # The cache would live in each worker (a copy per process, each decoding every sample again) and after the
        # first epoch serves steps in microseconds: caching and workers answer the same problem for different data
        # sizes, so a run picks one.
        raise ValueError(f"--cache_data with --workers {workers}: the cache is kept in the training process, "
                         "workers decode in their own; pass --workers 0 (small data: cache) or --no-cache_data")
    cache = ItemCache(dataset, cfg.cache_data)
    if cfg.global_batch % (layout.dp * cfg.micro_batch):
        raise ValueError(f"--global_batch {cfg.global_batch} must be a multiple of dp ({layout.dp}) x "
                         f"--micro_batch ({cfg.micro_batch})")
    if layout.sp > 1 and cfg.micro_batch != 1:
        raise ValueError("with --sp > 1 every SP group reads one sample at a time: use --micro_batch 1")

    # dp rank r reads slice r of each step's global batch (seeded permutations, one per epoch)
    sampler = data.SPSampler(len(dataset), layout.dp_rank, layout.dp, cfg.seed, batch_size=cfg.global_batch // layout.dp)
    # --- resume ---
    start, skipped_total = 0, 0
    if cfg.resume:
        ckpt = latest_checkpoint(cfg.out)
        if ckpt is not None:
            meta = load_checkpoint(ckpt, model, optimizer, rank, device)
            start, skipped_total = meta["step"], meta.get("data_skipped", 0)
            log.info(f"resumed from {ckpt} at step {start}")
            if rank == 0 and os.path.exists(log.path):  # drop the lines of steps that will be redone
                with open(log.path) as f:
                    keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= start]
                with open(log.path, "w") as f:
                    f.writelines(keep)
        else:
            log.info(f"--resume: no checkpoint in {cfg.out}/checkpoints, starting from step 0")
    log.write_config(cfg.out, cfg, dict(world_size=world, dp=layout.dp, sp=layout.sp, ring=layout.ring,
                                        ulysses=layout.ulysses, device=str(device), compute_dtype=str(compute_dtype),
                                        dataset_size=len(dataset), trainable_params=n_train, total_params=n_total,
                                        config_changes=changes, tokenizer=tok_json, start_step=start,
                                        loader_workers=workers))
    log.info(f"stage {cfg.stage} ({STAGES[cfg.stage].name}): {n_train / 1e6:.2f}M of {n_total / 1e6:.2f}M parameters "
             f"train; {len(dataset)} samples; world {world} = dp {layout.dp} x ring {layout.ring} x ulysses "
             f"{layout.ulysses}; {cfg.steps} steps of {cfg.global_batch} samples; {device}, {compute_dtype}; "
             f"{f'{workers} loader workers' if workers else 'data loaded in-process'}"
             + (f"; {', '.join(f'{k} {a:g} -> {b:g}' for k, (a, b) in changes.items())}" if changes else ""))

    peak = peak_flops(cfg, device)
    meta = dict(stage=cfg.stage, seed=cfg.seed, global_batch=cfg.global_batch)
    model.train()
    # the data position of a step is the step itself (the sampler is a pure function of (seed, step)): the loader
    # starts at `start`, so a resumed run reads exactly what the uninterrupted one read
    loader = start_loader(step_loader(cache, sampler, start, cfg.steps, cfg.micro_batch, tokenizer.pad_id,
                                      workers, pin_memory=use_cuda, seed=cfg.seed))
    if cfg.profile_step > cfg.steps:
        log.info(f"--profile_step {cfg.profile_step} is past this stage's {cfg.steps} steps: nothing is profiled")
    t_loop = time.time()
    for step in range(start, cfg.steps):
        t0 = time.time()
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        item = next(loader)  # with workers: built while the previous steps trained; data_s = the time we waited
        t_data = time.time() - t0
        assert item["step"] == step, (item["step"], step)
        batches = item["batches"]
        profiling = cfg.profile_step == step + 1 and rank == 0
        activities = [torch.profiler.ProfilerActivity.CPU]
        if use_cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities) if profiling else contextlib.nullcontext()
        with profiler as prof:
            loss, tokens, lengths = forward_backward(model, batches, layout, world, device, autocast)
            if profiling:  # wall-clock split of the profiled step (synchronised, so the parts add up)
                if use_cuda:
                    torch.cuda.synchronize(device)
                t_fb = time.time()
            norm = grad_norm_and_clip(params, cfg.grad_clip)
            finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(norm))
            if finite:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if profiling and use_cuda:
                torch.cuda.synchronize(device)
        if profiling:
            t_opt = time.time()
            log.info(f"profile step {step + 1} (rank 0): wall {t_opt - t0:.3f} s = data wait {t_data:.3f} s + "
                     f"forward+backward {t_fb - t0 - t_data:.3f} s + clipping and optimizer step {t_opt - t_fb:.3f} s")
            for line in profile_report(prof, os.path.join(cfg.out, f"trace_step{step + 1}.json")):
                log.info(f"profile step {step + 1} (rank 0, forward+backward+optimizer): {line}")
        if not finite:
            msg = (f"stage {cfg.stage} step {step + 1}: non-finite loss {loss.item()} / grad-norm {norm.item()} "
                   f"(lr {lr:.2e})")
            if not cfg.skip_nonfinite:
                raise NonFiniteLoss(msg + "; stopping (the last checkpoint is intact; lower --lr or pass "
                                          "--skip_nonfinite to skip such steps)")
            log.info(msg + "; step skipped (--skip_nonfinite)")
        if use_cuda:
            torch.cuda.synchronize(device)
        dt = time.time() - t0
        # FLOPs of this rank's samples, summed over dp (SP ranks share theirs): LLM (with attention) + vision
        frames = sum(im.shape[0] for b in batches for im in b["images"] if im is not None)
        # (2,) FLOPs and skipped samples, on the compute device (NCCL has no CPU tensors), summed over dp (the
        # ranks of an SP group read the same samples, so each counted them once)
        counts = torch.tensor([sum(fa * T + fb * T * T for T in lengths) + fv * frames, item["skipped"]],
                              dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(counts)
            counts /= layout.sp
        flops, skipped = counts[0], int(round(float(counts[1])))
        skipped_total += skipped
        if item["skipped_files"]:  # this rank's view; the warning of each skip was printed where it happened
            log.info(f"stage {cfg.stage} step {step + 1}: skipped {item['skipped']} sample(s) with unreadable "
                     f"media: {', '.join(item['skipped_files'])}")
        record = dict(stage=cfg.stage, step=step + 1, loss=loss.item(), lr=lr, grad_norm=norm.item(),
                      tok_per_s=tokens / dt, tok_per_s_per_device=tokens / dt / world,
                      mfu=(float(flops) / dt / world / peak) if peak else None, mem_gb=peak_memory_gb(device),
                      step_s=dt, data_s=t_data, skipped=not finite, data_skipped=skipped_total, time=time.time())
        log.step(record, progress_bar(step + 1 - start, cfg.steps - start, time.time() - t_loop))
        done = step + 1
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps and not cfg.no_save:
            save_checkpoint(cfg.out, done, model, optimizer, world, rank, device, tok_json, cfg.keep_checkpoints,
                            dict(meta, data_skipped=skipped_total))
    del loader  # its workers (if any) exit now, not when the next stage starts its own

    # --- the end: a throughput summary (steps after the first third: compilation and autotuning are over) ---
    if rank == 0 and cfg.steps > start:
        with open(log.path) as f:
            every = [json.loads(ln) for ln in f if ln.strip()]
        rows = every[len(every) // 3:] or every
        tps = sum(r["tok_per_s_per_device"] for r in rows) / len(rows)
        mfu = [r["mfu"] for r in rows if r["mfu"] is not None]
        mfu_text = f"{100 * sum(mfu) / len(mfu):.1f}%" if mfu else "n/a"
        log.info(f"stage {cfg.stage} summary over steps {rows[0]['step']}-{rows[-1]['step']}: {tps:,.0f} tokens/s/device, "
                 f"MFU {mfu_text}, peak memory {max(r['mem_gb'] for r in rows):.2f} GB/device, "
                 f"loss {every[0]['loss']:.4f} (step 1) -> {every[-1]['loss']:.4f}, {world} x {device.type}, "
                 f"{every[-1].get('data_skipped', 0)} samples skipped (unreadable media), "
                 f"waited {sum(r.get('data_s', 0.0) for r in rows) / len(rows):.2f} s/step for data")

    # --- the end: a checkpoint to resume from, and the model in the released layout for the next stage ---
    final = os.path.join(cfg.out, "model")
    if cfg.no_save:
        log.info(f"stage {cfg.stage} done in {fmt_seconds(time.time() - t_start)} (--no_save: nothing written)")
        return final
    if cfg.save_every:
        save_checkpoint(cfg.out, cfg.steps, model, optimizer, world, rank, device, tok_json, cfg.keep_checkpoints,
                        dict(meta, data_skipped=skipped_total))
    tmp = os.path.join(cfg.out, "model.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, world, tok_json)
    if rank == 0:
        publish_dir(tmp, final)
    if world > 1:
        dist.barrier()
    log.info(f"stage {cfg.stage} done in {fmt_seconds(time.time() - t_start)}: model saved to {final}")
    return final


# -----------------------------------------------------------------------------
# command line: flags grouped by topic; --stage picks the defaults, explicit flags win

HELP = {
    "stage": "1..5, a range like 2-5, or all: the stages run in order, each from the last one's model; all = 1-5, "
             "or 0-5 without --init_from (stage 0: a model from random weights learns needle-colour questions and "
             "the caption language, standing in for the pretrained vision tower and LLM the reference starts from)",
    "model": "longvila.PRESETS name for a random init (tiny | bench-1b | longvila-8b | longvila-7b | longvila-1.5b)",
    "init_from": "VILA-layout folder to start from, or none (random --model); default: stage 1 none, stage N "
                 "<out>/stage{N-1}/model",
    "out": "root of the run: stage N writes <out>/stage<N>/ (config.json, metrics.jsonl, checkpoints/, model/)",
    "data": "the demo folder (generated if missing), files `a.json:1.0,b.json:0.5` (stage 4: a .txt/.jsonl/.bin), "
            "or synthetic (random video samples of --num_frames frames: throughput runs)",
    "num_frames": "frames per video (0: the model config's num_video_frames)",
    "seq_len": "max tokens per sample; stage 4: the context window it extends to",
    "media_root": "folder the media paths of the data files are relative to (default: the first file's folder)",
    "cache_data": "keep decoded samples in memory (default on for the tiny demo and --data synthetic, unless "
                  "--workers > 0)",
    "workers": "loader processes that build the next steps' batches while the current step trains (-1: 0 with "
               "--cache_data, else min(8, cores / processes per node); 0: in the training process)",
    "train_vision": "train the vision tower", "train_projector": "train the projector", "train_llm": "train the LLM",
    "lr": "peak learning rate", "schedule": "cosine | constant (both after a linear warmup)",
    "warmup": "warmup: < 1 = fraction of the steps, >= 1 = steps", "min_lr_ratio": "cosine floor as a fraction of lr",
    "vision_lr_scale": "the vision tower's learning rate is lr x this (tiny demo: 0.02; a from-scratch tower "
                       "trained at the full rate collapses colours onto a few directions)",
    "weight_decay": "AdamW weight decay (>= 2-D weights only)", "beta1": "AdamW beta1", "beta2": "AdamW beta2",
    "grad_clip": "clip the global gradient norm to this (0: off)",
    "global_batch": "samples per optimizer step over the whole world (= dp x micro_batch x accumulation)",
    "micro_batch": "samples per forward on one rank", "steps": "optimizer steps",
    "grad_checkpointing": "recompute every vision / LLM block in the backward (--checkpoint_layers: only some)",
    "checkpoint_mode": "full (recompute whole blocks) | save-attn (recompute all but the fused attention kernels' "
                       "outputs, which are kept: ~H*D*2 bytes per token and block; needs --attn_backend cudnn on GPU)",
    "checkpoint_layers": "with --grad_checkpointing: recompute only the first N decoder blocks, the others keep "
                         "their activations (-1: all; use memory that would sit unused)",
    "fused_ops": "CUDA: RMSNorm, RoPE and SwiGLU as one fused Triton kernel each (kernels.py); --no-fused_ops runs "
                 "the eager PyTorch twins",
    "attn_backend": "attention kernels on CUDA: auto (= triton, kernels.py) | triton | cudnn (torch's cuDNN fused "
                    "attention; calls it cannot express fall back to triton) | torch",
    "reinit_projector": "start from a freshly initialised projector (stage 1 default, as the reference)",
    "rope_theta": "RoPE base to train with (0: the model's; stage 4 derives it from --seq_len)",
    "trained_len": "stage 4: context the model was trained at (0: its config's max_seq_len)",
    "sp": "sequence-parallel degree (ring x ulysses); world = dp x sp", "ring": "ring degree inside --sp",
    "seed": "seed of the init and of the data order", "save_every": "checkpoint every N steps (0: only the model at the end)",
    "keep_checkpoints": "checkpoints kept per stage", "resume": "continue from <out>/stageN/checkpoints/latest",
    "no_save": "write no checkpoint or model (benchmarks)", "skip_nonfinite": "skip steps with a NaN/inf loss "
    "instead of stopping",
    "peak_tflops": "peak TFLOP/s of one device for MFU (0: H100/H200 bf16 989, unknown on CPU)",
    "profile_step": "profile step N (forward+backward, clipping, optimizer step) on rank 0: its wall-clock split and "
                    "GPU time by kernel kind in the log, the Chrome trace in <out>/trace_stepN.json (0: off; the "
                    "profiled step runs slower, leave it out of timings)",
    "dtype": "auto (bf16 compute on CUDA, fp32 on CPU) | fp32 | bf16",
}
GROUPS = {
    "what to train": ["stage", "model", "init_from", "out"],
    "data": ["data", "media_root", "num_frames", "seq_len", "cache_data", "workers"],
    "trainable modules": ["train_vision", "train_projector", "train_llm"],
    "optimisation": ["lr", "schedule", "warmup", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip",
                     "vision_lr_scale", "global_batch", "micro_batch", "steps", "grad_checkpointing", "checkpoint_mode",
                     "checkpoint_layers", "attn_backend", "fused_ops", "reinit_projector", "dtype"],
    "context extension (stage 4)": ["rope_theta", "trained_len"],
    "parallelism": ["sp", "ring"],
    "checkpoints and feedback": ["seed", "save_every", "keep_checkpoints", "resume", "no_save", "skip_nonfinite",
                                 "peak_tflops", "profile_step"],
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 argument_default=argparse.SUPPRESS)  # absent flags stay absent: presets fill them
    ap.add_argument("--eval", choices=["auto", "niah", "none"], default="auto",
                    help="after stage 5: needle-in-a-haystack on the demo's held-out videos (auto: with demo data)")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads per process (0: 1 for the tiny model, whose 128-wide matmuls gain nothing from "
                         "more and lose a lot on a busy machine; torch's default otherwise)")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for title, names in GROUPS.items():
        g = ap.add_argument_group(title)
        for name in names:
            f = fields[name]
            default = f" (default {f.default})" if name not in ("stage", "out", "init_from") else ""
            if name == "stage":
                g.add_argument("--stage", type=str, help=HELP[name])
            elif name in ("no_save", "resume", "skip_nonfinite"):
                g.add_argument(f"--{name}", action="store_true", help=HELP[name])
            elif f.type in (bool, "bool"):
                g.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, help=HELP[name] + default)
            else:
                typ = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)
                g.add_argument(f"--{name}", type=typ, help=HELP[name] + default)
    return ap


def parse_stages(text: str, from_scratch: bool = False) -> list[int]:
    """`all` = 1-5, or 0-5 when the chain starts from random weights (stage 0: stand-ins for the pretrained
    vision tower and LLM)."""
    if text == "all":
        return [0, 1, 2, 3, 4, 5] if from_scratch else [1, 2, 3, 4, 5]
    lo, _, hi = text.partition("-")
    stages = list(range(int(lo), int(hi or lo) + 1))
    if not stages or stages[0] < 0 or stages[-1] > 5:
        raise ValueError(f"--stage {text!r}: expected 0..5, a range like 2-5, or all")
    return stages


def resolve(stage: int, flags: dict) -> TrainConfig:
    """TrainConfig defaults <- the stage preset (<- the tiny demo's tuning) <- explicit flags."""
    model = flags.get("model", TrainConfig.model)
    values = stage_defaults(stage, model)
    values.update({k: v for k, v in flags.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})
    values["stage"] = stage
    root = flags.get("out", "runs/demo")
    values["out"] = os.path.join(root, f"stage{stage}")
    if "init_from" not in flags or flags["init_from"] == "auto":
        prev = os.path.join(root, f"stage{stage - 1}", "model")
        values["init_from"] = "none" if stage == 0 or (stage == 1 and not os.path.isdir(prev)) else prev
    return TrainConfig(**values)


def ensure_demo_data(path: str, rank: int, world: int):
    """Generate the demo data (python data.py demo) if the folder has no meta.json yet."""
    if rank == 0 and not os.path.exists(os.path.join(path, "meta.json")):

        print(f"generating the demo data in {path} (data.make_demo = python data.py demo) ...", flush=True)
        data.make_demo(path)
    if world > 1:
        dist.barrier()


def evaluate_niah(model_dir: str, data_dir: str, out: str, info, layout) -> float:
    """evaluate.py niah on the demo's held-out haystacks and needles; returns the mean accuracy."""

    model = longvila.LongVILA.from_pretrained(model_dir, dtype=torch.float32, device=info.device).eval()
    tokenizer = data.Tokenizer.for_checkpoint(model_dir)
    niah = os.path.join(data_dir, "eval", "niah")
    if info.rank == 0 and os.path.exists(os.path.join(out, "results.json")):
        os.remove(os.path.join(out, "results.json"))  # results of an earlier model: run_niah would resume from them
    res = evaluate.run_niah(model, tokenizer, os.path.join(niah, "haystack"), os.path.join(niah, "needles"),
                            layout=layout if info.world_size > 1 else None, out_dir=out)
    return res["mean"]


def main(argv=None):
    args = vars(build_parser().parse_args(argv))
    eval_mode = args.pop("eval")
    threads = args.pop("threads") or (1 if args.get("model", TrainConfig.model) == "tiny" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    stages = parse_stages(args.pop("stage", "all"), from_scratch=args.get("init_from", "none") == "none")

    info = mmsp.init_distributed()
    layouts = {}
    model_dir = None
    for stage in stages:
        cfg = resolve(stage, args)
        if (cfg.model == "tiny" or cfg.data == "synthetic") and "cache_data" not in args and cfg.workers <= 0:
            cfg.cache_data = True  # small data: decode once (an explicit --workers N > 0 keeps the cache off)
        if cfg.data != "synthetic" and "," not in cfg.data and not os.path.splitext(cfg.data)[1]:  # demo folder
            ensure_demo_data(cfg.data, info.rank, info.world_size)
        key = (cfg.sp, cfg.ring)
        if key not in layouts:
            layouts[key] = mmsp.make_layout(sp=cfg.sp, ring=cfg.ring)
        if len(stages) > 1 and cfg.resume and os.path.exists(os.path.join(cfg.out, "model", "config.json")):
            if info.rank == 0:
                print(f"stage {stage}: {cfg.out}/model exists, skipped (--resume)", flush=True)
            model_dir = os.path.join(cfg.out, "model")
            continue
        model_dir = train_stage(cfg, info, layouts[key])
    is_demo = os.path.isfile(os.path.join(args.get("data", "data/demo"), "meta.json"))
    if stages[-1] == 5 and (eval_mode == "niah" or (eval_mode == "auto" and is_demo)) and not args.get("no_save"):
        root = args.get("out", "runs/demo")
        acc = evaluate_niah(model_dir, args.get("data", "data/demo"), os.path.join(root, "niah"), info,
                            layouts[(args.get("sp", 1), args.get("ring", 1))])
        if info.rank == 0:
            print(f"needle in a haystack after stage 5: {acc:.1%} (heatmap: {os.path.join(root, 'niah')})",
                  flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
