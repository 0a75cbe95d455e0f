"""LongVILA's five-stage training curriculum from one entry point, on one CPU or many GPUs (FSDP2 + mmsp).

    python train.py --stage all        # the CPU demo: demo data, tiny model through stages 0-5, then NIAH
    python train.py --stage 5 --help   # the flags, with the defaults stage 5 uses
    torchrun --nproc_per_node 8 train.py --stage 4 --init_from ckpt/stage3 --data long.jsonl --seq_len 131072 \\
        --sp 8 --ring 8 --steps 40     # context extension as the reference: LoRA rank 8, RoPE theta 1.53e7 from 32k

A run writes <out>/stage<N>/ per stage: config.json (the resolved flags; `--config` replays them), metrics.jsonl
(one line per step), model/ (the released VILA layout: config.json, llm/, vision_tower/, mm_projector/) and
checkpoints/step-NNNNNN/ (the same model + train_state/ for an exact --resume), `checkpoints/latest` the newest.

The world is a dp x ring x ulysses grid (mmsp.make_layout); FSDP2 shards parameters, gradients and AdamW state
over all of it. Every rank's loss is its cross-entropy SUM / the GLOBAL count of supervised tokens, so the sum
of the ranks' gradients is the gradient of the whole global batch, as on one device.

Sections:
  1. the stage table: what each stage trains, on what data, with which defaults (STAGES; TINY_DEMO: the demo's)
  2. schedules: the learning rate, RoPE theta for a longer context
  3. the flags and one stage's resolved config (no torch yet, so --help answers at once)
  4. building the model (LoRA for stage 4), the data and the optimizer
  5. one step: gradient accumulation over micro-batches, the loss normalised by the global token count
  6. the stage loop: set up, step, finish
  7. checkpoints and exact resume: atomic saves, what a resumed run must share with the run it continues
  --- below: the machinery: run folders and demo data, the step loader, meters (throughput, MFU, profiling), main
"""
import argparse
import collections
import contextlib
import dataclasses
import errno
import functools
import gc
import glob
import hashlib
import io
import itertools
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

# -----------------------------------------------------------------------------
# 1. the stage table: what each stage trains, on what data, with which defaults

GROUPS = CURRICULUM, LEARNING, LOADING, PERFORMANCE, CHECKPOINTS, LOGGING = (
    "curriculum", "what learns, and how fast", "data loading", "performance", "checkpoints", "logging and profiling")


def flag(default, help: str, group: str = CURRICULUM, choices=None):
    """A TrainConfig field that is also a command-line flag: its help text and its --help group."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices})


@dataclass
class TrainConfig:
    """Every flag of train.py. A stage's value: this default <- the stage's preset <- the command line."""
    stage: int = flag(1, "0..5, a range like 2-5, or all: the stages run in order, each from the model the one "
                         "before it saved; all = 1-5, or 0-5 without --init_from")
    model: str = flag("tiny", "a model preset, e.g. tiny (the CPU demo) or longvila-8b (a wrong name lists them): "
                              "the random init without --init_from, and the defaults (tiny: the demo's tuning; with "
                              "--init_from: the preset its run recorded, else the reference's)")
    init_from: str = flag("none", "a VILA-layout folder to start from (a stage's model/ or a released checkpoint), "
                                  "or none: random --model weights")
    data: str = flag("demo:data/demo", "demo:FOLDER (the demo data, generated when FOLDER is missing or empty), a "
                                       "folder in that layout, files `a.json:1,b.json:0.5` (stage 4: one .bin, "
                                       ".txt or .jsonl of text), or synthetic (random videos: throughput runs)")
    out: str = flag("runs/demo", "root of the run: stage N writes <out>/stage<N>/")
    seq_len: int = flag(512, "max tokens per sample; stage 4: the context it extends to")
    num_frames: int = flag(0, "frames per video (0: the model config's num_video_frames)")
    lr: float = flag(1e-3, "peak learning rate")
    steps: int = flag(100, "optimizer steps")
    global_batch: int = flag(8, "samples per optimizer step over the whole world (dp x micro_batch x accumulation)")
    sp: int = flag(1, "sequence-parallel degree (ring x ulysses); world = dp x sp")
    ring: int = flag(1, "ring degree inside --sp")
    train_vision: bool = flag(False, "train the vision tower", LEARNING)
    train_projector: bool = flag(True, "train the projector", LEARNING)
    train_llm: bool = flag(False, "train the LLM", LEARNING)
    reinit_projector: bool = flag(False, "start from a fresh projector (stage 1, as the reference)", LEARNING)
    lora: int = flag(0, "LoRA rank R: the LLM trains LoRA (alpha 2R) on q/k/v/o + its embeddings and norms, merged "
                        "into every saved model (0: full fine-tuning)", LEARNING)
    vision_lr_scale: float = flag(1.0, "the vision tower learns at lr x this (a from-scratch tower trained at the "
                                       "full rate collapses colours onto a few directions)", LEARNING)
    schedule: str = flag("cosine", "cosine | constant, both after a linear warmup", LEARNING, ("cosine", "constant"))
    warmup: float = flag(0.03, "warmup: < 1 a fraction of the steps, >= 1 a number of steps", LEARNING)
    weight_decay: float = flag(0.0, "AdamW weight decay (matrices only)", LEARNING)
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0: off)", LEARNING)
    rope_theta: float = flag(0.0, "RoPE base to train with (0: the model's; stage 4: the reference's theta for "
                                  "--seq_len / --trained_len)", LEARNING)
    trained_len: int = flag(0, "stage 4: the context the model was trained at (0: its config's max_seq_len)", LEARNING)
    seed: int = flag(0, "seed of the init and of the data order", LEARNING)
    skip_nonfinite: bool = flag(False, "skip a step with a NaN/inf loss instead of stopping", LEARNING)
    media_root: str = flag("", "folder the media paths of the data files are relative to (\"\": the first file's)",
                           LOADING)
    fps: float = flag(0.0, "sample a video's frames every 1/fps seconds, at most --num_frames (0: --num_frames "
                           "spread uniformly)", LOADING)
    cache_data: bool = flag(False, "keep decoded samples in memory (small data)", LOADING)
    workers: int = flag(-1, "loader processes building the next steps' batches while one trains (-1: 0 with "
                            "--cache_data, else min(8, cores / processes per node); 0: in the training process)",
                        LOADING)
    micro_batch: int = flag(1, "samples per forward on one rank", PERFORMANCE)
    grad_checkpointing: bool = flag(False, "recompute every vision / LLM block in the backward", PERFORMANCE)
    checkpoint_mode: str = flag("full", "full (recompute whole blocks) | save-attn (keep the attention outputs)",
                                PERFORMANCE)
    checkpoint_layers: int = flag(-1, "with --grad_checkpointing: recompute only the first N decoder blocks, the "
                                      "others keep their activations (-1: all)", PERFORMANCE)
    attn_backend: str = flag("auto", "attention kernels on CUDA: auto (the fastest installed), triton, cudnn, flash "
                                     "or torch", PERFORMANCE)
    fused_ops: bool = flag(True, "CUDA: RMSNorm, RoPE and SwiGLU as fused Triton kernels (kernels.py)", PERFORMANCE)
    dtype: str = flag("auto", "auto (bf16 compute on CUDA, fp32 on CPU) | fp32 | bf16", PERFORMANCE,
                      ("auto", "fp32", "bf16"))
    save_every: int = flag(0, "a checkpoint every N steps (0: none; the final model/ is always written)",
                           CHECKPOINTS)
    keep_checkpoints: int = flag(2, "checkpoints kept per stage", CHECKPOINTS)
    save: bool = flag(True, "write checkpoints and the final model (--no_save: benchmarks)", CHECKPOINTS)
    resume: bool = flag(False, "continue the run in --out: each stage from its newest readable checkpoint (a "
                               "finished stage is skipped); the flags must match what the run recorded", CHECKPOINTS)
    overwrite: bool = flag(False, "start again in a --out that holds a run: first remove what train.py wrote there",
                           CHECKPOINTS)
    peak_tflops: float = flag(0.0, "peak TFLOP/s of one device for MFU (0: the device's dense bf16 peak by name)",
                              LOGGING)
    profile_step: int = flag(0, "profile step N on rank 0 (forward+backward, clipping, optimizer): its wall-clock "
                                "split and GPU time by kernel kind in the log, the trace in <run>/trace_stepN.json",
                             LOGGING)


@dataclass
class StagePreset:
    """A stage: what it trains, on what data, its defaults (the reference's: paper Sec. 3, Table 1, VILA's scripts)."""
    name: str
    data: str
    train_vision: bool
    train_projector: bool
    train_llm: bool
    lr: float
    schedule: str = "cosine"
    warmup: float = 0.03
    grad_checkpointing: bool = False
    reinit_projector: bool = False
    lora: int = 0
    fps: float = 0.0


STAGES = {
    # Stage 0 is not LongVILA's (it starts from a pretrained SigLIP and LLM): a model from random weights first
    # trains stand-ins for them, everything on needle-colour questions and captions as text (STAND_IN_DATA).
    0: StagePreset("stand-in-pretraining", "needle-colour QA + captions as text", True, True, True, lr=1e-3),
    1: StagePreset("alignment", "image-caption pairs", False, True, False, lr=1e-3, reinit_projector=True),
    2: StagePreset("pretraining", "captions / interleaved image-text", False, True, True, lr=5e-5),
    3: StagePreset("short-sft", "image and short-video QA", True, True, True, lr=1e-4),
    # the reference's 4_extend_llm_*.sh: LoRA r=8 (alpha 16) on q/k/v/o + embeddings + norms, constant 2e-5
    4: StagePreset("context-extension", "long text", False, False, True, lr=2e-5, schedule="constant", warmup=2,
                   lora=8),
    # the reference's 5_long_sft_*.sh samples videos at 2 fps (at most --num_frames frames)
    5: StagePreset("long-sft", "long-video QA + short data", True, True, True, lr=5e-5, grad_checkpointing=True,
                   fps=2.0),
}

# The CPU demo's tuning, over STAGES when the model is tiny (flags still win): learning from scratch in a few hundred
# steps takes larger learning rates and far fewer samples, and a tiny model needs no LoRA or recomputation.
TINY_DEMO = {
    0: dict(lr=2e-3, steps=300, global_batch=16, seq_len=512, schedule="constant", warmup=5, vision_lr_scale=0.02),
    1: dict(lr=1e-2, steps=300, global_batch=16, seq_len=512, reinit_projector=False),
    2: dict(lr=1e-3, steps=200, global_batch=8, seq_len=512),
    3: dict(lr=2e-3, steps=120, global_batch=16, seq_len=512, vision_lr_scale=0.02),
    4: dict(lr=1e-3, steps=100, global_batch=4, seq_len=1024, trained_len=512, warmup=5, lora=0),
    5: dict(lr=2e-3, steps=200, global_batch=16, seq_len=1024, num_frames=32, vision_lr_scale=0.02, fps=0.0,
            grad_checkpointing=False),
}

# The demo folder's files per stage (data.py's docstring). Stage 5 mixes short data back in (paper Sec. 3.1) and
# trains on needle-in-a-haystack prompts of 4-48 frames built as evaluate.py niah builds them (stage5_niah.json).
DEMO_FILES = {
    0: [("stage3.json", 1.0), ("stage1.json", 0.5), ("stage5_niah.json", 0.25)],  # see STAND_IN_DATA
    1: [("stage1.json", 1.0)],
    2: [("stage2.json", 1.0)],
    3: [("stage3.json", 1.0)],
    4: [("stage4.bin", 1.0)],
    5: [("stage5.json", 1.0), ("stage3.json", 0.5), ("stage5_niah.json", 1.0)],
}

# What stage 0 makes of each demo file: the skills a pretrained vision tower and LLM would bring.
#   "needle": every "what colour is the needle" turn as its own sample, with its video (one colour word each).
#   "describe": text only, the caption's words in the image's place ("an orange diamond\nWhat is in the image?"):
#       caption language, and the habit of reading the answer off the image's place that stage 1 builds on.
#   "needle_image": each stage5_niah.json needle image ALONE with its question: a colour read off the visual tokens.
STAND_IN_DATA = {"stage3.json": "needle", "stage1.json": "describe", "stage5_niah.json": "needle_image"}


def stage_defaults(stage: int, model: str) -> dict:
    """The flag defaults of one stage: its preset's, then the tiny demo's tuning when the model is tiny."""
    preset = dataclasses.asdict(STAGES[stage])
    d = {k: v for k, v in preset.items() if k not in ("name", "data")}
    if model == "tiny":
        d.update(TINY_DEMO[stage])
    return d


# -----------------------------------------------------------------------------
# 2. schedules: the learning rate of a step, RoPE theta for a longer context


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of step `step` (0-based): linear warmup, then constant or Hugging Face's cosine to 0."""
    warmup = int(cfg.warmup if cfg.warmup >= 1 else math.ceil(cfg.warmup * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup) / max(1, cfg.steps - warmup)  # 0 -> 1 over the decay
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# The reference's stage-4 (context ratio, theta), Qwen2 trained at 32k with theta 1e6 (its 4_extend_llm_*.sh): another
# base scales them by base / 1e6; other ratios interpolate log-log (past the last: extrapolate its segment).
THETA_ANCHORS = [(1, 1_000_000), (4, 15_300_000), (8, 207_112_184), (16, 1_062_356_830), (32, 3_580_165_449)]


def rope_theta_for_context(base_theta: float, trained_len: int, target_len: int) -> float:
    """RoPE base for extending a model trained at `trained_len` tokens to `target_len` (never lowers it)."""
    ratio = target_len / trained_len
    if ratio <= 1.0:
        return base_theta
    ref = THETA_ANCHORS[0][1]
    for (r0, t0), (r1, t1) in zip(THETA_ANCHORS, THETA_ANCHORS[1:]):
        if ratio <= r1:
            break  # the segment holding the ratio (or the last one, extrapolated)
    if ratio == r1:
        return base_theta * t1 / ref  # an anchor: the reference's number itself
    w = math.log(ratio / r0) / math.log(r1 / r0)  # position of the ratio in the segment, log scale
    return base_theta * t0 / ref * (t1 / t0) ** w


# -----------------------------------------------------------------------------
# 3. the flags and one stage's resolved config (torch is not imported yet: --help answers at once)


class Switch(argparse.Action):
    """A boolean flag as a pair: --x turns it on, --no_x off."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings + ["--no_" + option_strings[0][2:]], dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no_"))

    def format_usage(self):
        return " | ".join(self.option_strings)


def parse_stages(text: str, from_scratch: bool = False) -> list[int]:
    """`all` = 1-5, or 0-5 when the chain starts from random weights; `N` or `A-B` otherwise."""
    if text == "all":
        return [0, 1, 2, 3, 4, 5] if from_scratch else [1, 2, 3, 4, 5]
    lo, _, hi = text.partition("-")
    stages = list(range(int(lo), int(hi or lo) + 1)) if lo.isdigit() and (hi or "0").isdigit() else []
    if not stages or stages[-1] > 5:
        raise argparse.ArgumentTypeError(f"--stage {text!r}: expected 0..5, a range like 2-5, or all")
    return stages


def stage_text(text: str) -> str:
    """argparse's type of --stage: the text itself, once parse_stages accepts it."""
    parse_stages(text)
    return text


def config_flags(path: str) -> dict:
    """--config: the flags a run's saved config.json records (its stage, and its root as --out)."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{path}: {e}") from e
    if not isinstance(saved, dict) or not isinstance(saved.get("stage"), int):
        raise argparse.ArgumentTypeError(f"{path} is not a stage's config.json written by train.py")
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"resume", "overwrite"}
    flags = {k: v for k, v in saved.items() if k in names}
    flags["stage"] = str(saved["stage"])
    out = os.path.normpath(flags.get("out", TrainConfig.out))
    if os.path.basename(out) == f"stage{saved['stage']}":
        flags["out"] = os.path.dirname(out)
    return flags


def recorded_model(init_from: str) -> str:
    """The --model a stage's model/ folder was trained as (its run's config.json), "" for another checkpoint."""
    try:
        with open(os.path.join(os.path.dirname(os.path.normpath(init_from)), "config.json")) as f:
            return str(json.load(f).get("model", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def resolve(stage: int, flags: dict, chained: bool = False) -> TrainConfig:
    """One stage's config: TrainConfig's defaults <- the stage preset (<- TINY_DEMO) <- the flags. It starts from
    --init_from, else (always when `chained`) from <out>/stage{N-1}/model; stage 1 without a stage 0 from random."""
    root = flags.get("out", TrainConfig.out)
    prev = os.path.join(root, f"stage{stage - 1}", "model")
    if chained or "init_from" not in flags:
        init = prev if stage >= 2 or (stage == 1 and (chained or os.path.isdir(prev))) else "none"
    else:
        init = flags["init_from"]
    explicit = flags.get("init_from", "none")  # the model of the whole command: --model, else what the init was
    model = flags.get("model") or ("tiny" if explicit == "none" else recorded_model(explicit))
    values, names = stage_defaults(stage, model), {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in flags.items() if k in names})
    values.update(stage=stage, model=model, init_from=init, out=os.path.join(root, f"stage{stage}"))
    if "cache_data" not in flags:  # small data: decode once (an explicit --workers N > 0 keeps the cache off)
        values["cache_data"] = (model == "tiny" or values.get("data") == "synthetic") and values.get("workers", -1) <= 0
    return TrainConfig(**values)


def plan(flags: dict) -> list[TrainConfig]:
    """The resolved config of every stage the command runs, in order."""
    stages = parse_stages(str(flags.get("stage", "all")), from_scratch=flags.get("init_from", "none") == "none")
    return [resolve(s, flags, chained=i > 0) for i, s in enumerate(stages)]


def shown(value) -> str:
    """A flag's value as --help and the error messages show it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) or '""'


def default_text(name: str, cfgs: list[TrainConfig], flags: dict) -> str:
    """The help's `(default 2e-05)`, or where the command's stages differ `(default per stage: 0-3: 512, 4-5: 1024)`."""
    if name == "stage":
        return "(default all)"
    if name == "out":
        return f"(default {flags.get('out', TrainConfig.out)})"
    if name == "init_from" and len(cfgs) > 1:
        return f"(default {cfgs[0].init_from}, then each stage the model of the stage before)"
    runs = [(v, [c.stage for c in same]) for v, same in itertools.groupby(cfgs, lambda c: shown(getattr(c, name)))]
    if len(runs) == 1:
        return f"(default {runs[0][0]})"
    return "(default per stage: " + ", ".join(f"{s[0]}-{s[-1]}: {v}" if len(s) > 1 else f"{s[0]}: {v}"
                                              for v, s in runs) + ")"


def stage_table() -> str:
    rows = []
    for n, p in STAGES.items():
        trains = [part for part, on in (("vision", p.train_vision), ("projector", p.train_projector),
                                        ("LLM", p.train_llm)) if on]
        if p.lora:
            trains[-1] = f"LLM (LoRA r{p.lora} + embeddings + norms)"
        rows.append(f"  {n} {p.name:22s} {' + '.join(trains):42s} {p.data}")
    return "stages (what trains, on what):\n" + "\n".join(rows)


def build_parser(argv=()) -> argparse.ArgumentParser:
    """The flags in their groups, each help ending with the default that argv's --stage, --model, etc. give it."""
    peek = argparse.ArgumentParser(add_help=False)
    for name in ("stage", "model", "init_from", "out", "data", "config"):  # the flags other defaults depend on
        peek.add_argument(f"--{name}")
    given = {k: v for k, v in vars(peek.parse_known_args(argv)[0]).items() if v is not None}
    try:
        given = {**config_flags(given.pop("config")), **given} if "config" in given else given
        cfgs = plan(given)
    except argparse.ArgumentTypeError:  # a bad --config or --stage: the parse below reports it
        cfgs = [TrainConfig()]
    doc = __doc__.split("\n\n")
    ap = argparse.ArgumentParser(prog="train.py", description="\n\n".join(doc[:3]), epilog=stage_table(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 argument_default=argparse.SUPPRESS)  # absent flags stay absent: resolve fills them
    groups = {name: ap.add_argument_group(name) for name in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        how = (dict(type=stage_text) if f.name == "stage" else dict(action=Switch) if f.type is bool else
               dict(type=f.type, choices=f.metadata["choices"]))
        groups[f.metadata["group"]].add_argument(
            f"--{f.name}", help=f"{f.metadata['help']} {default_text(f.name, cfgs, given)}", **how)
    groups[CHECKPOINTS].add_argument("--config", type=config_flags,
                                     help="a stage's config.json: run with its flags (those given here win)")
    groups[PERFORMANCE].add_argument("--threads", type=int, default=0,
                                     help="CPU threads per process (0: 1 for the tiny model, torch's default else)")
    groups[LOGGING].add_argument("--eval", choices=["auto", "none"], default="auto",
                                 help="auto: on demo data, each stage's skill on the demo's held-out data after it "
                                      "(stage 5: needle in a haystack), one table at the end")
    return ap


def parse_flags(argv) -> dict:
    """argv -> the flags given: a --config file's, with the command line's over them."""
    flags = vars(build_parser(argv).parse_args(argv))
    return {**flags.pop("config", {}), **flags}


if __name__ == "__main__":  # --help and flag mistakes answer before torch loads (2 s)
    ARGS = parse_flags(sys.argv[1:])

# Before torch touches CUDA: growable allocator segments, as long-video steps' activation sizes fragment fixed blocks
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch  # noqa: E402  (everything below needs torch)
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import SafetensorError  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,  # noqa: E402
                                                     get_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard  # noqa: E402

import data  # noqa: E402
import evaluate  # noqa: E402
import kernels  # noqa: E402
import longvila  # noqa: E402
import mmsp  # noqa: E402
from longvila import InputError  # noqa: E402

# -----------------------------------------------------------------------------
# 4. building the model (LoRA for stage 4), the data and the optimizer

LORA_SCALE = 2.0  # alpha / rank: the reference's rank 8 with alpha 16, so alpha = 2 x rank for every --lora R


class LoRALinear(torch.nn.Linear):
    """A frozen linear layer plus a trained low-rank update (LoRA, arXiv 2106.09685): y = x W^T + b + s (x A^T) B^T,
    A (r, in), B (out, r), s = LORA_SCALE. B starts at zero, so training starts from the unchanged model."""

    def __init__(self, base: torch.nn.Linear, rank: int):
        torch.nn.Module.__init__(self)  # not Linear's __init__: keep base's weight and bias, allocate no new one
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_a = torch.nn.Parameter(torch.empty(rank, self.in_features, device=base.weight.device))  # (r, in)
        self.lora_b = torch.nn.Parameter(torch.empty(self.out_features, rank, device=base.weight.device))  # (out, r)
        init_lora_(self)

    def forward(self, x):  # (B, T, in)
        return super().forward(x) + LORA_SCALE * F.linear(F.linear(x, self.lora_a), self.lora_b)  # (B, T, out)


def init_lora_(layer: LoRALinear):
    """PEFT's LoRA init: A Kaiming-uniform, B zero."""
    torch.nn.init.kaiming_uniform_(layer.lora_a, a=math.sqrt(5))
    torch.nn.init.zeros_(layer.lora_b)


def add_lora(llm, rank: int):
    """Stage 4 as the reference: LoRA on every block's q/k/v/o; the LLM's embeddings and norms train in full."""
    for block in llm.layers:
        for name in ("wq", "wk", "wv", "wo"):
            setattr(block.attention, name, LoRALinear(getattr(block.attention, name), rank))
    llm.tok_embeddings.requires_grad_(True)
    for m in llm.modules():
        if isinstance(m, longvila.RMSNorm):
            m.requires_grad_(True)


def merge_lora(sd: dict) -> dict:
    """A state dict with LoRA layers -> the plain model's: W + s B A, an ordinary weight (float64, rounded once)."""
    out = {k: v for k, v in sd.items() if not k.endswith((".lora_a", ".lora_b"))}
    for k in sd:
        if k.endswith(".lora_a"):
            p = k[:-len("lora_a")]
            w, a, b = sd[p + "weight"], sd[k], sd[p + "lora_b"]  # (out, in), (r, in), (out, r)
            out[p + "weight"] = (w.double() + LORA_SCALE * b.double() @ a.double()).to(w.dtype)  # (out, in)
    return out


def build_model(cfg: TrainConfig, world: int, device: torch.device) -> tuple:
    """The stage's model, not yet on its devices, and the config changes the stage made (apply_stage_to_config)."""
    if cfg.init_from != "none":
        try:
            model = longvila.LongVILA.from_pretrained(cfg.init_from, dtype=torch.float32)
        except (OSError, ValueError, SafetensorError) as e:  # missing, truncated or foreign files
            raise InputError(f"--init_from {cfg.init_from}: {e}") from e
    else:
        torch.manual_seed(cfg.seed)
        # a random model on several GPUs: built on meta, sharded, then only each rank's shards are allocated
        with torch.device("meta" if device.type == "cuda" and world > 1 else "cpu"):
            model = longvila.LongVILA(longvila.PRESETS[cfg.model])  # LongVILA keeps a private copy of the config
    if cfg.reinit_projector and cfg.init_from != "none":
        # LLaVA / VILA stage 1 puts a NEW projector between a pretrained vision tower and a pretrained LLM
        torch.manual_seed(cfg.seed)
        model.projector.apply(longvila.LongVILA.init_weights)
    changes = apply_stage_to_config(cfg, model)
    model.set_trainable(vision=cfg.train_vision, projector=cfg.train_projector, llm=cfg.train_llm and not cfg.lora)
    if cfg.lora:
        torch.manual_seed(cfg.seed)  # the same LoRA init on every rank
        add_lora(model.llm, cfg.lora)
    model.set_grad_checkpointing(cfg.checkpoint_mode if cfg.grad_checkpointing else False,
                                 llm_layers=None if cfg.checkpoint_layers < 0 else cfg.checkpoint_layers)
    # CPU: the model's attention is torch SDPA whatever the backend; the fused ops need CUDA
    kernels.configure(backend=cfg.attn_backend if device.type == "cuda" else "auto", fused_ops=cfg.fused_ops)
    return model, changes


def apply_stage_to_config(cfg: TrainConfig, model) -> dict:
    """Written into every config the run saves: stage 4 raises RoPE theta (and max_seq_len) for the target
    context; a stage on videos records the frames and fps it sampled (evaluate.py's defaults)."""
    c, llm = model.config, model.config.llm
    if cfg.stage == 4:
        theta = cfg.rope_theta or rope_theta_for_context(llm.rope_theta, cfg.trained_len or llm.max_seq_len,
                                                         cfg.seq_len)
        new = [(llm, "rope_theta", float(theta)), (llm, "max_seq_len", max(llm.max_seq_len, cfg.seq_len))]
    else:
        new = [(llm, "rope_theta", float(cfg.rope_theta or llm.rope_theta)),
               (c, "num_video_frames", cfg.num_frames or c.num_video_frames), (c, "fps", cfg.fps)]
    changes = {k: (getattr(o, k), v) for o, k, v in new if getattr(o, k) != v}
    for o, k, v in new:
        setattr(o, k, v)  # the model's own config objects: RoPE reads llm.rope_theta every forward
    return changes


def place_model(model, cfg: TrainConfig, world: int, device: torch.device) -> torch.dtype:
    """On one device, or sharded over the world (FSDP2); returns the compute dtype."""
    use_cuda = device.type == "cuda"
    compute_dtype = torch.bfloat16 if (cfg.dtype == "bf16" or (cfg.dtype == "auto" and use_cuda)) else torch.float32
    if world == 1:
        model.to(device)
    else:
        shard_model(model, device, compute_dtype)
        if any(p.is_meta for p in model.parameters()):
            model.to_empty(device=device)
            init_weights_(model)
            model.llm.tie()
    return compute_dtype


def shard_model(model, device: torch.device, compute_dtype: torch.dtype):
    """ZeRO-3 over the world with FSDP2 (gloo too): each block a unit all-gathered just in time, the rest the root;
    fp32 master weights, cast to compute_dtype per gather; gradients SUMMED in fp32 (each loss is per global token)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in list(model.vision.layers) + list(model.llm.layers):  # the repeated blocks (SigLIP's, the LLM's)
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM, and nothing to scale


def init_weights_(model):
    """Fresh weights for storage allocated empty (meta, then to_empty): the model's init, RMSNorm gains 1, LoRA's."""
    model.apply(longvila.LongVILA.init_weights)
    for m in model.modules():
        if isinstance(m, longvila.RMSNorm):
            torch.nn.init.ones_(m.weight)
        if isinstance(m, LoRALinear):
            init_lora_(m)


def build_optimizer(cfg: TrainConfig, model, device: torch.device) -> tuple:
    """AdamW, each of model.param_groups split in vision tower / rest: the tower learns at lr x vision_lr_scale."""
    vision = {id(p) for p in model.vision.parameters()}
    groups = [dict(g, params=[p for p in g["params"] if p.requires_grad and (id(p) in vision) == is_vision],
                   lr_scale=cfg.vision_lr_scale if is_vision else 1.0)
              for g in model.param_groups(cfg.weight_decay) for is_vision in (False, True)]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, fused=device.type == "cuda")
    return optimizer, [p for p in model.parameters() if p.requires_grad]


def find_tokenizer_json(cfg: TrainConfig) -> str | None:
    """The tokenizer.json that travels with the model: the init checkpoint's, else the data folder's."""
    paths = [os.path.join(cfg.init_from, "llm", "tokenizer.json")] if cfg.init_from != "none" else []
    paths.append(os.path.join(cfg.data.removeprefix("demo:"), "tokenizer.json"))
    return next((p for p in paths if os.path.isfile(p)), None)


def parse_data(spec: str, stage: int) -> tuple[list, str]:
    """--data -> ([(file, weight)], media_root): a folder in the demo layout (DEMO_FILES), or `a.json:1,b.json:0.5`."""
    folder = spec.removeprefix("demo:")
    if os.path.isdir(folder):
        check_demo_version(folder)
        files, root = [(os.path.join(folder, f), w) for f, w in DEMO_FILES[stage]], folder
    else:
        files = []
        for part in spec.split(","):
            path, colon, weight = part.rpartition(":") if ":" in part else (part, "", "1")
            try:
                files.append((path, float(weight)))
            except ValueError:
                raise InputError(f"--data {part}: the weight after ':' must be a number, got {weight!r}") from None
        root = os.path.dirname(os.path.abspath(files[0][0]))
    for path, weight in files:
        if not weight > 0:
            raise InputError(f"--data {path}:{weight:g}: a file's weight must be > 0 (its share of the mixture)")
        if os.path.splitext(path)[1].lower() in data.VIDEO_EXTS:
            raise InputError(f"--data {path}: a video is not a data file (expected a JSON list of samples whose "
                             "'video' fields name the videos)")
        if not os.path.isfile(path):
            raise InputError(f"--data: {path} does not exist (expected a JSON sample file, a text file for stage "
                             f"4, a demo folder, or demo:FOLDER to generate the demo data there)")
    if stage == 4 and len(files) != 1:
        raise InputError(f"--data {spec}: stage 4 reads one text file (.bin, .txt or .jsonl), got {len(files)}")
    return files, root


def build_dataset(cfg: TrainConfig, model_config, tokenizer, layout):
    """The stage's dataset: long text windows for stage 4, supervised image / video conversations otherwise."""
    if cfg.data == "synthetic":
        return SyntheticVideoDataset(cfg.num_frames or model_config.num_video_frames, model_config.tokens_per_frame,
                                     model_config.vision.image_size, model_config.llm.vocab_size)
    files, root = parse_data(cfg.data, cfg.stage)
    try:
        if cfg.stage == 4:
            return data.TextWindowDataset(files[0][0], tokenizer, cfg.seq_len, cfg.seed)
        if cfg.stage == 0:
            files = [(stand_in_copy(path, cfg.out, STAND_IN_DATA.get(os.path.basename(path), "needle")), w)
                     for path, w in files]
        dataset = data.SupervisedDataset(files, cfg.media_root or root, tokenizer, model_config.vision.image_size,
                                         model_config.tokens_per_frame, model_config.num_video_frames, cfg.seq_len,
                                         fps=cfg.fps or None, seed=cfg.seed, aspect=model_config.image_aspect_ratio)
    except (OSError, ValueError) as e:  # a file that is not what --data promised (not JSON, no samples, ...)
        raise InputError(f"--data: {e}") from e
    if layout.sp > 1:
        dataset.frame_shard = (layout.sp_rank, layout.sp)  # mmsp.encode_frames_sharded reads only its frames
    return dataset


def stand_in_copy(path: str, out: str, keep: str) -> str:
    """Stage 0's version of one conversation file (keep: see STAND_IN_DATA), written to `out`; returns its path."""
    with open(path) as f:
        samples = json.load(f)
    copies = []
    for s in samples:
        turns = s.get("conversations", [])  # a needle-in-a-haystack record has none: it holds question and answer
        if keep == "needle":
            media = "".join(m for m in ("<image>\n", "<video>\n") if m in turns[0]["value"])
            for k in range(0, len(turns) - 1, 2):
                if "needle" in turns[k]["value"]:
                    q = turns[k]["value"] if k == 0 else media + turns[k]["value"]
                    copies.append(dict(s, id=f"{s.get('id', '?')}-turn{k // 2}",
                                       conversations=[dict(turns[k], value=q), turns[k + 1]]))
        elif keep == "needle_image":
            copies.append({"id": f"{s.get('id', '?')}-needle", "image": s["needle"], "conversations": [
                {"from": "human", "value": "<image>\n" + s["question"]}, {"from": "gpt", "value": s["answer"]}]})
        else:  # describe
            words, q = turns[1]["value"].strip(), turns[0]["value"]
            q = data.MEDIA_RE.sub(words, q) if data.MEDIA_RE.search(q) else words + "\n" + q
            copies.append(dict({k: v for k, v in s.items() if k not in ("image", "video")},
                               id=f"{s.get('id', '?')}-describe", conversations=[dict(turns[0], value=q), turns[1]]))
    dst = os.path.join(out, f"stand_in_{keep}_" + os.path.basename(path))
    os.makedirs(out, exist_ok=True)
    data.write_text_atomic(dst, json.dumps(copies))  # every rank writes the same content, each through its own file
    return dst


# -----------------------------------------------------------------------------
# 5. one step: gradient accumulation over micro-batches, the loss normalised by the global token count


class NonFiniteLoss(RuntimeError):
    """A NaN/inf loss or gradient norm (train_step stops on it unless --skip_nonfinite)."""


def world_sum(values: list, layout, world: int, device: torch.device) -> torch.Tensor:
    """Per-rank figures summed over the world, each SP group once (its ranks hold the same samples); on the CPU."""
    t = torch.tensor(values, dtype=torch.float64, device=device)  # (n,)
    if world > 1:  # on the compute device: NCCL has no CPU tensors
        dist.all_reduce(t)  # (n,) summed over every rank
        t /= layout.sp  # each SP group's ranks counted the same samples
    return t.cpu()


def forward_backward(model, batches: list, layout, world: int, device: torch.device, autocast) -> tuple:
    """Forward + backward of this rank's micro-batches; returns (global mean loss, global tokens, per-sample T).

    Each micro-batch's loss is its cross-entropy SUM over the world / its global supervised count; weighted by
    count_i / total, the accumulated gradient is that of the global batch's CE sum / its count, as on one device."""
    # per micro-batch: the positions whose NEXT token is supervised (the loss's count after shifting)
    counts = [int((longvila.shift_labels(b["labels"]) != longvila.IGNORE_INDEX).sum()) for b in batches]
    lengths = [b["labels"].shape[1] for b in batches for _ in range(b["labels"].shape[0])]
    stats = world_sum(counts + [sum(lengths)], layout, world, device)  # (accum + 1,)
    total = stats[:-1].sum().clamp(min=1.0)
    sp_forward = functools.partial(mmsp.sp_forward, layout=layout) if world > 1 else None
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)  # () the step's global mean, accumulated
    for b, count in zip(batches, stats[:-1]):
        ids, labels = b["input_ids"].to(device), b["labels"].to(device)  # (B, T)
        # per sample (F, 3, S, S) | None; loader workers send uint8 pixels: 4x fewer bytes to copy, unpacked here
        images = [None if im is None else unpack_pixels(im.to(device, non_blocking=True)) for im in b["images"]]
        with autocast():  # sp_forward runs inside model.__call__, so FSDP's root hooks gather the root's parameters
            _, loss = model(ids, images, labels, return_logits=False, sp_forward=sp_forward)  # this rank's share
        w = float(count / total)
        (loss * w).backward()
        loss_sum += loss.detach().float() * w
    if world > 1:
        dist.all_reduce(loss_sum)  # shares -> the global mean
    return loss_sum, int(stats[-1]), lengths


# -----------------------------------------------------------------------------
# 6. the stage loop: set up (model, data, optimizer, resume), one step at a time, finish (the model for the next)


@dataclass
class Stage:
    """What the steps of one stage share (setup_stage builds it)."""
    cfg: TrainConfig
    info: object  # mmsp.DistInfo: rank, world_size, device
    layout: object  # mmsp.SPLayout
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list
    loader: object  # the iterator of step_loader: step k's batches
    autocast: object
    tokenizer_json: str | None
    log: "RunLog"
    meter: "Meter"
    start: int = 0  # the first step this run takes (a resumed run: the checkpoint's)
    skipped: int = 0  # samples skipped so far (unreadable media), over the world
    t_start: float = 0.0


def train_stage(cfg: TrainConfig, info, layout) -> str:
    """Train one stage; returns the folder of the saved model (VILA layout)."""
    st = setup_stage(cfg, info, layout)
    for step in range(st.start, cfg.steps):
        train_step(st, step)
        if cfg.save and cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(st, step + 1)
    return finish_stage(st)


def setup_stage(cfg: TrainConfig, info, layout) -> Stage:
    """The model, its data and its optimizer; with --resume, restored from the newest checkpoint that reads."""
    t_start, (rank, world, device) = time.time(), (info.rank, info.world_size, info.device)
    now = trajectory(cfg)
    if cfg.resume:
        check_resume(cfg.out, now)
    os.makedirs(cfg.out, exist_ok=True)
    model, changes = build_model(cfg, world, device)
    meter = Meter(model, cfg, device)
    compute_dtype = place_model(model, cfg, world, device)
    autocast = functools.partial(torch.autocast, device.type, dtype=compute_dtype,
                                 enabled=world == 1 and compute_dtype != torch.float32)  # FSDP casts by itself
    tok_json = find_tokenizer_json(cfg)
    tokenizer = (data.Tokenizer.from_file(tok_json, template=model.config.chat_template) if tok_json
                 else data.Tokenizer.tiny(template=model.config.chat_template))
    optimizer, params = build_optimizer(cfg, model, device)
    dataset, workers = build_dataset(cfg, model.config, tokenizer, layout), loader_workers(cfg)
    log = RunLog(cfg.out, rank)
    meta = restore(cfg, model, optimizer, info, log) if cfg.resume else {"step": 0, "data_skipped": 0}
    n_train, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    log.write_config(cfg, dict(world_size=world, dp=layout.dp, sp=layout.sp, ring=layout.ring, ulysses=layout.ulysses,
                               device=str(device), compute_dtype=str(compute_dtype), dataset_size=len(dataset),
                               trainable_params=n_train, total_params=n_total, config_changes=changes,
                               tokenizer=tok_json, start_step=meta["step"], loader_workers=workers, trajectory=now))
    log.info(f"stage {cfg.stage} ({STAGES[cfg.stage].name}): {n_train / 1e6:.2f}M of {n_total / 1e6:.2f}M "
             f"parameters train{f' (LoRA rank {cfg.lora})' if cfg.lora else ''}; {len(dataset)} samples; world {world} "
             f"= dp {layout.dp} x ring {layout.ring} x ulysses {layout.ulysses}; {cfg.steps} steps of "
             f"{cfg.global_batch} samples; {device}, {compute_dtype}; "
             f"{f'{workers} loader workers' if workers else 'data loaded in-process'}"
             + "".join(f"; {k} {a:g} -> {b:g}" for k, (a, b) in changes.items()))
    if cfg.profile_step > cfg.steps:
        log.info(f"--profile_step {cfg.profile_step} is past this stage's {cfg.steps} steps: nothing is profiled")
    log.begin(cfg, meta["step"])
    model.train()
    # dp rank r reads slice r of each step's global batch, a pure function of (seed, step): a loader started at the
    # resumed step reads exactly what the uninterrupted run read.
    sampler = data.SPSampler(len(dataset), layout.dp_rank, layout.dp, cfg.seed,
                             batch_size=cfg.global_batch // layout.dp)
    loader = start_loader(step_loader(ItemCache(dataset, cfg.cache_data), sampler, meta["step"], cfg.steps,
                                      cfg.micro_batch, tokenizer.pad_id, workers, pin_memory=device.type == "cuda",
                                      seed=cfg.seed))
    return Stage(cfg, info, layout, model, optimizer, params, loader, autocast, tok_json, log, meter,
                 start=meta["step"], skipped=meta.get("data_skipped", 0), t_start=t_start)


def train_step(st: Stage, step: int):
    """One optimizer step; its figures go to metrics.jsonl and the progress line."""
    cfg, rank, world, device = st.cfg, st.info.rank, st.info.world_size, st.info.device
    t0 = time.time()
    lr = lr_at(step, cfg)
    for g in st.optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]
    item = next(st.loader)  # with workers: built while the previous steps trained; data_s = the time we waited
    t_data = time.time() - t0
    if "error" in item:  # no readable sample (every media file missing, ...): the user's data, not a bug
        raise InputError(item["error"])
    with StepProfiler(cfg.profile_step == step + 1 and rank == 0, device) as profiler:
        loss, tokens, lengths = forward_backward(st.model, item["batches"], st.layout, world, device, st.autocast)
        profiler.mark()  # forward+backward done
        norm = torch.nn.utils.clip_grad_norm_(st.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # the global norm over the FSDP shards is a DTensor
            norm = norm.full_tensor()
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(norm))
        if finite:
            st.optimizer.step()
        st.optimizer.zero_grad(set_to_none=True)
    profiler.report(st.log, os.path.join(cfg.out, f"trace_step{step + 1}.json"), step + 1, t0, t_data)
    if not finite:
        msg = (f"stage {cfg.stage} step {step + 1}: non-finite loss {loss.item()} / grad-norm {norm.item()} "
               f"(lr {lr:.2e})")
        if not cfg.skip_nonfinite:
            raise NonFiniteLoss(msg + "; stopping (the last checkpoint is intact; lower --lr or pass "
                                      "--skip_nonfinite to skip such steps)")
        st.log.info(msg + "; step skipped (--skip_nonfinite)")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.time() - t0
    flops, skipped = st.meter.count(item, lengths, st.layout, world, device)
    st.skipped += skipped
    if item["skipped_files"]:  # this rank's view; the warning of each skip was printed where it happened
        st.log.info(f"stage {cfg.stage} step {step + 1}: skipped {item['skipped']} sample(s) with unreadable "
                    f"media: {', '.join(item['skipped_files'])}")
    st.log.step(dict(stage=cfg.stage, step=step + 1, loss=loss.item(), lr=lr, grad_norm=norm.item(),
                     tok_per_s=tokens / dt, tok_per_s_per_device=tokens / dt / world,
                     mfu=flops / dt / world / st.meter.peak if st.meter.peak else None,
                     mem_gb=peak_memory_gb(device), step_s=dt, data_s=t_data, skipped=not finite,
                     data_skipped=st.skipped, time=time.time()))


def finish_stage(st: Stage) -> str:
    """After the last step: the summary, the last checkpoint, the released model (LoRA merged); returns its folder."""
    cfg, rank, world = st.cfg, st.info.rank, st.info.world_size
    st.loader = None  # its workers (if any) exit now, not when the next stage starts its own
    st.log.end()
    if rank == 0 and cfg.steps > st.start:
        st.log.info(summary(st.log.path, cfg.stage, world, st.info.device))
    final = os.path.join(cfg.out, "model")
    if not cfg.save:
        st.log.info(f"stage {cfg.stage} done in {fmt_seconds(time.time() - st.t_start)} (--no_save: nothing written)")
        return final
    if cfg.save_every:
        save_checkpoint(st, cfg.steps)
    with publishing(final, st.info) as tmp:
        save_model(st.model, tmp, world, st.tokenizer_json)
    st.log.info(f"stage {cfg.stage} done in {fmt_seconds(time.time() - st.t_start)}: model saved to {final}")
    return final


# -----------------------------------------------------------------------------
# 7. checkpoints and exact resume: write into a temporary folder, fsync, rename, then point `latest` at it


def save_model(model, path: str, world: int, tokenizer_json: str | None):
    """The released VILA layout: the full state dict gathered on rank 0, LoRA merged, saved through a plain model
    built on meta, so the folder never depends on the wrapper, the LoRA or the world size that wrote it."""
    if world == 1:
        sd = {k: v.detach() for k, v in model.state_dict().items()}
    else:  # every rank takes part in gathering the shards; rank 0 writes
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() != 0:
            return
    with torch.device("meta"):
        plain = longvila.LongVILA(model.config)
    plain.load_state_dict({k: v.cpu() for k, v in merge_lora(sd).items()}, strict=True, assign=True)
    plain.llm.tie()
    plain.save_pretrained(path, tokenizer_json=tokenizer_json)


def save_checkpoint(st: Stage, step: int):
    """checkpoints/step-NNNNNN/ = the released model + train_state/ (DCP: sharded fp32 weights, LoRA unmerged, AdamW
    moments) + rng/ (per rank) + trainer.json; published, named by `latest`, the oldest past --keep_checkpoints go."""
    cfg, rank, world = st.cfg, st.info.rank, st.info.world_size
    root, name = os.path.join(cfg.out, "checkpoints"), f"step-{step:06d}"
    with publishing(os.path.join(root, name), st.info) as tmp:
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        save_model(st.model, tmp, world, st.tokenizer_json)
        msd, osd = get_state_dict(st.model, st.optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(tmp, "train_state"), no_dist=world == 1)
        rng = {"cpu": torch.get_rng_state()}
        if st.info.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(st.info.device)
        save_file({k: v.contiguous() for k, v in rng.items()}, os.path.join(tmp, "rng", f"rank{rank:05d}.safetensors"))
        if rank == 0:
            with open(os.path.join(tmp, "trainer.json"), "w") as f:
                json.dump({"step": step, "world_size": world, "data_skipped": st.skipped}, f, indent=1)
    if rank == 0:
        data.write_text_atomic(os.path.join(root, "latest"), name)
        older = [d for d in step_folders(root) if d < name]
        for d in older[:max(0, len(older) - cfg.keep_checkpoints + 1)]:
            shutil.rmtree(os.path.join(root, d))


def load_checkpoint(path: str, model, optimizer, rank: int, device: torch.device) -> dict:
    """Restore weights, AdamW state and this rank's RNG from a checkpoint folder; returns trainer.json."""
    with open(os.path.join(path, "trainer.json")) as f:
        meta = json.load(f)
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=os.path.join(path, "train_state"), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = os.path.join(path, "rng", f"rank{rank:05d}.safetensors")
    if os.path.exists(rng_file):  # absent when resuming with more ranks than wrote the checkpoint
        rng = load_file(rng_file)
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
    return meta


def restore(cfg: TrainConfig, model, optimizer, info, log) -> dict:
    """--resume: the newest checkpoint that reads; a damaged one is moved aside to <name>.broken, the previous tried."""
    root = os.path.join(cfg.out, "checkpoints")
    candidates = resume_candidates(cfg.out)
    for ckpt in candidates:
        try:
            meta, error = load_checkpoint(ckpt, model, optimizer, info.rank, info.device), None
        except (Exception, dcp.CheckpointException) as e:  # a damaged file shows as any of several errors
            meta, error = None, e
        if not any_rank(error is not None, info):
            if info.rank == 0 and ckpt != candidates[0]:
                data.write_text_atomic(os.path.join(root, "latest"), os.path.basename(ckpt))
            log.info(f"resumed from {ckpt} at step {meta['step']}")
            return meta
        reason = str(error).strip().splitlines()[-1] if error is not None else "on another rank"  # DCP: tracebacks
        log.info(f"warning: --resume: {ckpt} cannot be read ({reason}); it is moved aside to "
                 f"{os.path.basename(ckpt)}.broken and the checkpoint before it is tried", stream=sys.stderr)
        if info.rank == 0:
            os.rename(ckpt, ckpt + ".broken")
        world_barrier(info)
    if candidates:
        raise InputError(f"--resume: no checkpoint in {root} can be read (each was moved aside to .broken); pass "
                         "--overwrite to start the stage again")
    log.info(f"--resume: no checkpoint in {root}, starting from step 0")
    return {"step": 0, "data_skipped": 0}


def step_folders(root: str) -> list[str]:
    """The published checkpoints in `root` (step-NNNNNN, not the .tmp of a save under way), oldest first."""
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted(d for d in names if d.startswith("step-") and d[5:].isdigit())


def resume_candidates(out: str) -> list[str]:
    """Checkpoints to resume from, newest first, none past `latest` (written after the rename: a complete one)."""
    root = os.path.join(out, "checkpoints")
    names = step_folders(root)[::-1]
    if os.path.exists(os.path.join(root, "latest")):
        with open(os.path.join(root, "latest")) as f:
            newest = f.read().strip()
        names = [d for d in names if d <= newest]
    return [os.path.join(root, d) for d in names]


# What a resumed run must share with the run it continues: the flags that change what its steps compute (not
# how fast: workers, checkpointing, kernels, the world size). The init model and the data are compared by content.
TRAJECTORY = ("stage", "model", "seq_len", "num_frames", "fps", "media_root", "lr", "steps", "global_batch",
              "train_vision", "train_projector", "train_llm", "reinit_projector", "lora", "vision_lr_scale",
              "schedule", "warmup", "weight_decay", "grad_clip", "rope_theta", "trained_len", "seed", "dtype")


def trajectory(cfg: TrainConfig) -> dict:
    """The run's identity for --resume: TRAJECTORY's flags and content fingerprints of the init model and data files."""
    t = {k: getattr(cfg, k) for k in TRAJECTORY}
    t["init_from"], t["data"] = cfg.init_from, cfg.data
    if cfg.init_from != "none":
        try:
            t["init_from"] = evaluate.model_fingerprint(cfg.init_from)
        except (OSError, InputError) as e:  # a missing or truncated file
            raise InputError(f"--init_from {cfg.init_from}: {e}") from e
    if cfg.data != "synthetic":
        files = parse_data(cfg.data, cfg.stage)[0]
        t["data"] = "".join(f"{data_fingerprint(path)}:{w:g};" for path, w in files)
    return json.loads(json.dumps(t))  # as it reads back from JSON


def data_fingerprint(path: str) -> str:
    """A short hash of a file's name, size, first and last MiB: milliseconds even for many GB; a moved file matches."""
    size = os.path.getsize(path)
    h = hashlib.sha256(f"{os.path.basename(path)}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(1 << 20, size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()[:16]


def check_resume(where: str, now: dict):
    """--resume continues only the run that was started: the trajectory its config.json recorded (written before
    any checkpoint) must match `now`, else a clear stop. A folder holding no run yet has nothing to match."""
    recorded = {} if not resume_candidates(where) else None
    if os.path.isfile(os.path.join(where, "config.json")):
        with open(os.path.join(where, "config.json")) as f:
            recorded = json.load(f).get("trajectory")
    if recorded is None:
        raise InputError(f"--resume: {where} records no flags to compare (its config.json is missing or from an "
                         "older train.py); pass --overwrite or another --out")
    diff = [k for k in now if recorded and recorded.get(k) != now[k]]
    if diff:
        said = [f"--{k} {shown(recorded.get(k))} there, {shown(now[k])} now" if k not in ("init_from", "data") else
                f"--{k}: {'another model' if k == 'init_from' else 'other files'} than the run started from"
                for k in diff]
        raise InputError(f"--resume: {where} was trained with other settings ({'; '.join(said)}): pass the flags it "
                         f"recorded (--config {where}/config.json replays them), --overwrite, or another --out")


@contextlib.contextmanager
def publishing(final: str, info):
    """Every rank writes into `final`.tmp inside the block, then it is fsynced and renamed: `final` never names a
    half-written folder. A failure on any rank removes the .tmp (the previous checkpoint stays)."""
    tmp = final + ".tmp"
    if info.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # the leftovers of a save that was killed
    world_barrier(info)
    error = None
    try:
        yield tmp
    except (Exception, dcp.CheckpointException) as e:  # re-raised below, once every rank agreed to clean up
        error = e
    if any_rank(error is not None, info):
        if info.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is None:
            raise RuntimeError(f"writing {tmp} failed on another rank (see its message)")
        if no_space(error):
            raise InputError(f"no space left on {os.path.dirname(os.path.abspath(tmp))} while writing {tmp} "
                             "(removed; the previous checkpoint is intact): free space, then run again with --resume"
                             ) from error
        raise error
    if info.rank == 0:
        publish_dir(tmp, final)
    world_barrier(info)  # no rank reads `final` before it is there


def no_space(error: BaseException) -> bool:
    """A full disk, however the writer reports it (OSError ENOSPC, safetensors' StorageFull, DCP's wrapping)."""
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or any(
                s in str(error) for s in ("No space left", "StorageFull", "ENOSPC")):
            return True
        error = error.__cause__ or error.__context__
    return False


def any_rank(flag: bool, info) -> bool:
    """True on every rank when it is True on any (an all-reduce; the flag itself in one process)."""
    if info.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=info.device)  # (1,)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def world_barrier(info):
    if info.world_size > 1:
        dist.barrier()


def fsync(path: str):
    """Force a file's or a folder's data (a folder's: its entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp: str, final: str):
    """Rename a finished folder to `final` (replacing it), everything in it fsynced first."""
    for root, _dirs, files in os.walk(tmp):
        for path in [root] + [os.path.join(root, f) for f in files]:
            fsync(path)
    trash = final + ".old"
    # a re-save (a resume that ended at a checkpoint) swaps through a trash name: `final` is never half-deleted
    if os.path.exists(final):
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
    os.rename(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)
    fsync(os.path.dirname(os.path.abspath(final)))  # the rename itself


# -----------------------------------------------------------------------------
# --- below: the machinery: run folders and demo data, the step loader, meters (throughput, MFU, profiling), main

# What train.py writes into a stage's run folder (and nothing else: --overwrite removes exactly these)
WRITTEN = ("config.json", "config.json.*tmp", "heldout.json", "heldout.json.*tmp", "metrics.jsonl", "checkpoints",
           "model", "model.tmp", "model.old", "stand_in_*", "trace_step*.json")


def prepare_run_folders(cfgs: list[TrainConfig], eval_dir: str | None, info):
    """Before any step: empty run folders (--overwrite empties them, --resume continues them), --out writable."""
    root, first = os.path.dirname(cfgs[0].out), cfgs[0]
    folders = [c.out for c in cfgs] + ([eval_dir] if eval_dir else [])
    if first.resume and first.overwrite:
        raise InputError("--resume and --overwrite: choose one (continue the run in --out, or start it again)")
    for d in folders:
        held = sorted(os.listdir(d)) if os.path.isdir(d) else []
        if held and not (first.resume or first.overwrite):
            raise InputError(f"--out {root}: {d} already holds a run ({', '.join(held[:4])}{', ...' * (len(held) > 4)}"
                             "); pass --resume to continue it, --overwrite to start it again, or another --out")
        if os.path.exists(d) and not os.path.isdir(d):
            raise InputError(f"--out {root}: {d} is a file, not a folder")
    try:
        os.makedirs(root, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as e:
        raise InputError(f"--out {root}: cannot write there ({e.strerror or e})") from e
    world_barrier(info)  # every rank has looked before rank 0 removes anything
    if first.overwrite and info.rank == 0:
        for d in folders:
            if d == eval_dir:
                shutil.rmtree(d, ignore_errors=True)  # evaluate.py's files, written for train.py's --eval
            for path in (p for pattern in WRITTEN for p in glob.glob(os.path.join(d, pattern))):
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
    world_barrier(info)


def ensure_demo_data(spec: str, info):
    """--data demo:FOLDER: the demo data (python data.py demo), generated only into a missing or empty folder."""
    folder = spec.removeprefix("demo:")
    if folder == spec or os.path.isfile(os.path.join(folder, "meta.json")):
        return
    if os.path.isdir(folder) and os.listdir(folder):
        raise InputError(f"--data {spec}: {folder} holds files but no demo data (no meta.json); the demo is generated "
                         f"only into a missing or empty folder (--data {folder} trains on the files it holds)")
    world_barrier(info)  # every rank has looked before rank 0 writes
    if info.rank == 0:
        print(f"generating the demo data in {folder} (python data.py demo --out {folder}) ...", flush=True)
        data.make_demo(folder)
    world_barrier(info)


def check_demo_version(folder: str):
    """A demo folder another version of data.make_demo wrote lacks files DEMO_FILES names: say so, once."""
    meta = os.path.join(folder, "meta.json")
    if not os.path.isfile(meta):
        return
    with open(meta) as f:
        version = json.load(f).get("version", 1)
    if version != data.DEMO_VERSION:
        raise InputError(f"--data {folder}: demo data version {version}, this code trains on version "
                         f"{data.DEMO_VERSION}; remove it and pass --data demo:{folder} to generate it again")


# Flags and the least value each takes (a mistake stops before any work, naming the flag)
MINIMUM = dict(steps=1, global_batch=1, micro_batch=1, seq_len=2, num_frames=0, fps=0, sp=1, ring=1, lora=0,
               save_every=0, keep_checkpoints=1, warmup=0, grad_clip=0, weight_decay=0, vision_lr_scale=0,
               rope_theta=0, trained_len=0, profile_step=0, peak_tflops=0, workers=-1, checkpoint_layers=-1)


def check_config(cfg: TrainConfig):
    """The mistakes a person can make in flags, found before any work: one line naming the flag."""
    for name, least in MINIMUM.items():
        if getattr(cfg, name) < least:
            raise InputError(f"--{name} {shown(getattr(cfg, name))}: expected a number >= {least}")
    if not cfg.lr > 0:
        raise InputError(f"--lr {cfg.lr:g}: expected a learning rate > 0")
    if cfg.init_from == "none" and cfg.model not in longvila.PRESETS:
        raise InputError(f"--model {cfg.model!r}: not a preset; choose one of {', '.join(longvila.PRESETS)}")
    if cfg.sp % cfg.ring:
        raise InputError(f"--ring {cfg.ring} must divide --sp {cfg.sp} (sp = ring x ulysses)")
    if cfg.lora and not cfg.train_llm:
        raise InputError(f"--lora {cfg.lora}: LoRA trains the LLM, but stage {cfg.stage} does not (--train_llm)")
    for name, allowed in (("attn_backend", ("auto",) + kernels.BACKENDS),
                          ("checkpoint_mode", longvila.CHECKPOINT_MODES)):  # choices known once torch is imported
        if getattr(cfg, name) not in allowed:
            raise InputError(f"--{name} {getattr(cfg, name)!r}: choose one of {', '.join(allowed)}")
    if cfg.cache_data and cfg.workers > 0:  # a cache per worker would decode every sample again: pick one
        raise InputError(f"--cache_data with --workers {cfg.workers}: the cache is kept in the training process, "
                         "workers decode in their own; pass --workers 0 (small data: cache) or --no_cache_data")
    if cfg.data != "synthetic" and not cfg.data.startswith("demo:"):
        parse_data(cfg.data, cfg.stage)  # the files exist and are data files, the weights are > 0


def check_layout(cfg: TrainConfig, layout):
    """The flags that must fit the world this command runs on."""
    if cfg.global_batch % (layout.dp * cfg.micro_batch):
        raise InputError(f"--global_batch {cfg.global_batch} must be a multiple of dp ({layout.dp} = the world / "
                         f"--sp {layout.sp}) x --micro_batch ({cfg.micro_batch})")
    if layout.sp > 1 and cfg.micro_batch != 1:
        raise InputError("with --sp > 1 every SP group reads one sample at a time: use --micro_batch 1")


class SyntheticVideoDataset:
    """`--data synthetic`: random long-video samples shaped like real ones, for throughput runs without data."""

    def __init__(self, num_frames: int, tokens_per_frame: int, image_size: int, vocab_size: int):
        self.F, self.N, self.S, self.V = num_frames, tokens_per_frame, image_size, vocab_size

    def __len__(self):
        return 4  # a few distinct samples: a throughput run needs no more

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


def pack_pixels(x: torch.Tensor) -> torch.Tensor:
    """float32 pixels (F, 3, S, S) in [-1, 1] -> their uint8 levels when unpack_pixels restores x bitwise, else x.

    data.preprocess rounds to uint8 before normalising: (k/255 - 0.5)/0.5 = 2k/255 - 1, so round((x + 1) * 127.5)
    recovers k exactly. Its float resize path (a side grows) and --data synthetic give pixels that stay float."""
    k = torch.empty(x.shape, dtype=torch.uint8)  # (F, 3, S, S)
    for s in range(0, len(x), 64):  # 64 frames at a time: little extra memory
        k[s:s + 64] = x[s:s + 64].add(1.0).mul_(127.5).round_().clamp_(0, 255)  # (64, 3, S, S) levels 0..255
        if not torch.equal(unpack_pixels(k[s:s + 64]), x[s:s + 64]):
            return x
    return k


def unpack_pixels(x: torch.Tensor) -> torch.Tensor:
    """uint8 (F, 3, S, S) from pack_pixels -> float32 in [-1, 1] (on any device); float input passes through."""
    return x.float().mul_(2.0 / 255.0).sub_(1.0) if x.dtype == torch.uint8 else x


class StepBatches(torch.utils.data.Dataset):
    """Item k: this rank's micro-batches of step first + k (the same for any number of workers) and its skipped
    samples, counted here (a worker's counters die with it); no readable sample gives {"step", "error"}."""

    def __init__(self, cache: ItemCache, sampler, first: int, last: int, micro: int, pad_id: int, pack: bool):
        self.cache, self.sampler, self.first, self.last = cache, sampler, first, last
        self.micro, self.pad_id, self.pack = micro, pad_id, pack  # pack: pixels as uint8 (see pack_pixels)

    def __len__(self):
        return max(0, self.last - self.first)

    def __getitem__(self, k: int) -> dict:
        step, dataset = self.first + k, self.cache.dataset
        n0, files0 = getattr(dataset, "skipped", 0), len(getattr(dataset, "skipped_files", []))
        indices = self.sampler.indices_for_step(step)  # this dp rank's samples of the step
        try:
            batches = [data.collate([self.cache[i] for i in indices[j:j + self.micro]], self.pad_id)
                       for j in range(0, len(indices), self.micro)]
        except InputError as e:  # data.SupervisedDataset gave up: no readable sample (its message names the files)
            return {"step": step, "error": f"--data: step {step + 1}: {e}"}
        except Exception as e:  # a bug: in a worker, DataLoader re-raises it in the training process with this text
            raise RuntimeError(f"data of step {step + 1} (dataset indices {indices}): {type(e).__name__}: {e}") from e
        if self.pack:
            for b in batches:
                b["images"] = [None if im is None else pack_pixels(im) for im in b["images"]]  # (F, 3, S, S) each
        return {"step": step, "batches": batches, "skipped": getattr(dataset, "skipped", 0) - n0,
                "skipped_files": list(getattr(dataset, "skipped_files", [])[files0:])}


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask: containers and `taskset` give fewer than os.cpu_count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cores_per_process() -> int:
    """This process's share of its cores: torchrun's processes on one node (LOCAL_WORLD_SIZE) share them."""
    return max(1, cpu_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def loader_workers(cfg: TrainConfig) -> int:
    """--workers; -1: 0 with --cache_data, else this process's share of the cores, at most 8 (memory in flight)."""
    if cfg.workers >= 0:
        return cfg.workers
    return 0 if cfg.cache_data else min(8, cores_per_process())


def _init_loader_worker(worker_id: int, decode_threads: int):
    """In each loader process: its share of the cores decodes each video (data.video_pixels' reader threads)."""
    dataset = torch.utils.data.get_worker_info().dataset.cache.dataset
    if hasattr(dataset, "decode_threads"):
        dataset.decode_threads = decode_threads


def step_loader(cache: ItemCache, sampler, first: int, last: int, micro: int, pad_id: int, workers: int,
                pin_memory: bool, seed: int, timeout: float = 0) -> torch.utils.data.DataLoader:
    """Batches of steps first..last-1 in order: in-process (workers = 0) or from N forked workers, 2 steps ahead.
    A private generator: seeding workers from torch's global RNG would shift training's (and break exact resume)."""
    steps = StepBatches(cache, sampler, first, last, micro, pad_id, pack=workers > 0)
    extra = {}
    if workers > 0:
        threads = max(1, cores_per_process() // workers)
        extra = dict(prefetch_factor=2, timeout=timeout,
                     worker_init_fn=functools.partial(_init_loader_worker, decode_threads=threads))
    # pinned (page-locked) memory lets the copy to the GPU run asynchronously; DataLoader pins in a thread of its
    # own with workers, in the step itself without (where it would only add a copy to the synchronous loop)
    return torch.utils.data.DataLoader(steps, batch_size=None, shuffle=False, num_workers=workers,
                                       pin_memory=pin_memory and workers > 0,
                                       generator=torch.Generator().manual_seed(seed), **extra)


def start_loader(loader: torch.utils.data.DataLoader):
    """iter(loader), garbage collected first when workers fork: a child freeing a threaded library's object
    (PyAV's) waits forever for threads that exist only in the parent."""
    if loader.num_workers > 0:
        gc.collect()
    return iter(loader)


class RunLog:
    """Rank 0's record of a stage: config.json, metrics.jsonl and the progress line; the other ranks are silent."""

    def __init__(self, out: str, rank: int):
        self.out, self.rank, self.path = out, rank, os.path.join(out, "metrics.jsonl")
        self.bar, self.figures = None, {}

    def begin(self, cfg: TrainConfig, start: int):
        """metrics.jsonl keeps the lines of the steps before `start` (a resumed run redoes the others)."""
        if self.rank != 0:
            return
        keep = []
        if start > 0 and os.path.exists(self.path):
            with open(self.path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= start]
        with open(self.path, "w") as f:
            f.writelines(keep)
        self.bar = data.Progress(cfg.steps - start, f"stage {cfg.stage}" + (f" from step {start}" if start else ""),
                                 stream=sys.stdout)

    def write_config(self, cfg: TrainConfig, extra: dict):
        if self.rank == 0:
            data.write_text_atomic(os.path.join(self.out, "config.json"),
                                   json.dumps({**dataclasses.asdict(cfg), **extra}, indent=1))

    def step(self, record: dict):
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.figures = {"loss": record["loss"], "lr": record["lr"], "tok/s": float(round(record["tok_per_s"]))}
        self.bar.update(1, **self.figures)

    def info(self, msg: str, stream=None):
        if self.rank != 0:
            return
        live = self.bar is not None and self.bar.live
        if live:
            sys.stdout.write("\r\033[K")  # off the progress line, which is drawn again below the message
        print(msg, file=stream or sys.stdout, flush=True)
        if live:
            self.bar.update(0, **self.figures)

    def end(self):
        if self.rank == 0 and self.bar is not None:
            self.bar.close()
            self.bar = None


def fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPUs, resident-set high-water mark on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class Meter:
    """MFU: a sample of T tokens and F frames costs a*T + b*T^2 + v*F FLOPs (the model's counts), over the peak."""

    def __init__(self, model, cfg: TrainConfig, device: torch.device):
        self.a = model.flops_per_token(0, causal=True)
        self.b = model.flops_per_token(1, causal=True) - self.a
        self.v = model.vision_flops_per_frame()
        self.peak = (cfg.peak_tflops or longvila.peak_bf16_tflops(device) or 0.0) * 1e12  # FLOP/s, 0: unknown

    def count(self, item: dict, lengths: list[int], layout, world: int, device: torch.device) -> tuple:
        """(FLOPs, skipped samples) of one step over the world."""
        frames = sum(im.shape[0] for b in item["batches"] for im in b["images"] if im is not None)
        flops = sum(self.a * T + self.b * T * T for T in lengths) + self.v * frames
        counts = world_sum([flops, item["skipped"]], layout, world, device)  # (2,)
        return float(counts[0]), int(round(float(counts[1])))


def summary(path: str, stage: int, world: int, device: torch.device) -> str:
    """One line over the steps after the first third (compilation and autotuning are over)."""
    with open(path) as f:
        every = [json.loads(ln) for ln in f if ln.strip()]
    rows = every[len(every) // 3:] or every
    tps = sum(r["tok_per_s_per_device"] for r in rows) / len(rows)
    mfu = [r["mfu"] for r in rows if r["mfu"] is not None]
    mfu_text = f"{100 * sum(mfu) / len(mfu):.1f}%" if mfu else "n/a"
    return (f"stage {stage} summary over steps {rows[0]['step']}-{rows[-1]['step']}: {tps:,.0f} tokens/s/device, "
            f"MFU {mfu_text}, peak memory {max(r['mem_gb'] for r in rows):.2f} GB/device, "
            f"loss {every[0]['loss']:.4f} (step 1) -> {every[-1]['loss']:.4f}, {world} x {device.type}, "
            f"{every[-1].get('data_skipped', 0)} samples skipped (unreadable media), "
            f"waited {sum(r.get('data_s', 0.0) for r in rows) / len(rows):.2f} s/step for data")


class StepProfiler:
    """--profile_step: torch.profiler and a synchronised wall-clock split of one step on rank 0; else nothing."""

    def __init__(self, on: bool, device: torch.device):
        self.on, self.device, self.marks = on, device, []
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities) if on else contextlib.nullcontext()

    def __enter__(self):
        self.prof.__enter__()
        return self

    def mark(self):
        """The time once the device is done: after forward+backward, and at the end of the step."""
        if self.on and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append(time.time())

    def __exit__(self, *exc):
        self.mark()
        return self.prof.__exit__(*exc)

    def report(self, log: RunLog, path: str, step: int, t0: float, t_data: float):
        """The split, GPU time by kernel kind (CPU: the costliest ops), and the trace written to `path`."""
        if not self.on:
            return
        t_fb, t_end = self.marks
        log.info(f"profile step {step} (rank 0): wall {t_end - t0:.3f} s = data wait {t_data:.3f} s + "
                 f"forward+backward {t_fb - t0 - t_data:.3f} s + clipping and optimizer step {t_end - t_fb:.3f} s")
        self.prof.export_chrome_trace(path)
        lines = kernel_time(path)
        if not lines:  # a CPU run: no kernels, the op table instead
            lines = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12).splitlines()
        for line in lines + [f"trace: {path}"]:
            log.info(f"profile step {step} (rank 0, forward+backward+optimizer): {line}")


def kernel_kind(name: str) -> str:
    n = name.lower()
    ours = ("_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel")  # kernels.py's attention
    return ("NCCL" if "nccl" in n else
            "attention" if any(a in n for a in ("cudnn", "fmha", "flash", "attn") + ours) else
            "matrix products" if any(a in n for a in ("gemm", "xmma", "cutlass", "nvjet", "sm90_")) else
            "fused ops (kernels.py)" if any(a in n for a in ("_rms_norm", "_swiglu", "_rotary")) else
            "other (elementwise, copies, reductions)")


def kernel_time(trace: str) -> list[str]:
    """A Chrome trace's GPU kernel time by kind, and busy time (the union of intervals); [] without kernels.
    Streams overlap, so the per-kind sums can exceed the span."""
    with open(trace) as f:
        ev = [e for e in json.load(f)["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not ev:
        return []
    kinds, busy, end = collections.Counter(), 0.0, -math.inf
    for e in sorted(ev, key=lambda e: e["ts"]):  # microseconds
        kinds[kernel_kind(e["name"])] += e["dur"] / 1e3  # ms
        busy += max(0.0, e["ts"] + e["dur"] - max(e["ts"], end))
        end = max(end, e["ts"] + e["dur"])
    span = (end - min(e["ts"] for e in ev)) / 1e3
    return [f"GPU busy {busy / 1e3:.0f} ms of a {span:.0f} ms span; kernel time by kind:"] + [
        f"  {k:40s} {v:9.1f} ms" for k, v in kinds.most_common()]


# -----------------------------------------------------------------------------
# the demo's report: what each stage taught, measured on held-out data (<data>/eval), one table at the end

# stage -> (the skill it is for, the chance score); each is measured on the stage's model by `demo_skill`
DEMO_SKILLS = {
    0: ("needle colour: 8- / 32-frame videos", "1/8"),
    1: ("caption of a still: colour / shape word", "1/8, 1/4"),
    2: ("caption of a still: colour / shape word", "1/8, 1/4"),
    3: ("multiple choice (evaluate.py mcq)", "1/4"),
    4: ("passkey text perplexity / passkeys found", "vocab / 0"),
    5: ("needle in a haystack (evaluate.py niah)", "1/8"),
}


@torch.no_grad()
def demo_skill(cfg: TrainConfig, model_dir: str, info, layout) -> dict:
    """The held-out numbers of the skill stage cfg.stage is for (DEMO_SKILLS); NIAH on every rank, others on 0."""
    ev, res = os.path.join(cfg.data.removeprefix("demo:"), "eval"), {"stage": cfg.stage}
    with contextlib.redirect_stdout(io.StringIO()):  # evaluate's own summary lines: the table says it all
        if cfg.stage == 5:
            model, tok = load_eval_model(model_dir, info)
            niah = evaluate.run_niah(model, tok, os.path.join(ev, "niah", "haystack"),
                                     os.path.join(ev, "niah", "needles"), progress=False,
                                     layout=layout if info.world_size > 1 else None,
                                     out_dir=os.path.join(os.path.dirname(cfg.out), "niah"),
                                     identity=evaluate.checkpoint_identity(model_dir, torch.float32))
            grid = niah["grid"]  # a score per (depth, frame count)
            by_frames = {n: sum(row[j] for row in grid) / len(grid) for j, n in enumerate(niah["frame_counts"])}
            res.update(niah=niah["mean"], niah_by_frames=by_frames)
        elif info.rank == 0:
            model, tok = load_eval_model(model_dir, info)
            if cfg.stage == 0:
                res.update(needle_8_frames=needle_colour(model, tok, os.path.join(ev, "stage3_val.json"), 8),
                           needle_32_frames=needle_colour(model, tok, os.path.join(ev, "stage5_val.json"), 32))
            elif cfg.stage in (1, 2):
                res.update(caption_words(model, tok, os.path.join(ev, "stage1_val.json")))
            elif cfg.stage == 3:
                mcq = evaluate.run_mcq(model, tok, os.path.join(ev, "mcq", "mcq.json"), num_frames=data.SHORT_FRAMES,
                                       max_new_tokens=4, progress=False)
                res["mcq"] = [sum(r["correct"] for r in mcq["cells"].values()), len(mcq["cells"])]
            else:  # stage 4: the text it extends to, before (the model it started from) and after
                for when, path in (("before", cfg.init_from), ("after", model_dir)):
                    if path == "none":  # a stage 4 from random weights has no before
                        continue
                    m, t = load_eval_model(path, info) if when == "before" else (model, tok)  # after: loaded above
                    res[f"ppl_{when}"] = evaluate.run_ppl(m, t, os.path.join(ev, "stage4_val.txt"), cfg.seq_len,
                                                          progress=False)["ppl"]
                    res[f"passkey_{when}"] = evaluate.run_passkey(m, t, [cfg.seq_len // 4, cfg.seq_len // 2],
                                                                  style="demo", progress=False)["mean"]
                res["vocab"] = model.config.llm.vocab_size  # the perplexity of a uniform guess
    world_barrier(info)
    return res


def load_eval_model(path: str, info) -> tuple:
    """A saved model/ in fp32 on this rank's device, for evaluation, and its tokenizer."""
    model = longvila.LongVILA.from_pretrained(path, dtype=torch.float32, device=info.device).eval()
    return model, data.Tokenizer.for_checkpoint(path)


def needle_colour(model, tok, path: str, frames: int) -> list:
    """[right, asked]: the needle-colour question of every needle video in `path`, teacher-forced, `frames` frames."""
    with open(path) as f:
        samples = [s for s in json.load(f) if "needle" in s["conversations"][0]["value"]]
    size, tpf, folder = model.config.vision.image_size, model.config.tokens_per_frame, os.path.dirname(path)
    prompts, features = [], []
    for s in samples:
        ids, labels = data.build_conversation(s["conversations"][:2], tok, [frames], tpf)
        pos = [t for t, y in enumerate(labels) if y != longvila.IGNORE_INDEX]  # the answer and its end token
        prompts.append((ids, pos, [ids[t] for t in pos]))
        pixels = data.load_video(os.path.join(folder, s["video"]), size, num_frames=frames)[0]  # (F, 3, S, S)
        features.append(evaluate.encode_frames(model, pixels))  # (F, N, C)
    return [sum(evaluate.score_answers(model, tok, prompts, features)["correct"]), len(samples)]


def caption_words(model, tok, path: str) -> dict:
    """Greedy captions of the stills in `path`: is the first colour / shape word the still's ("a red circle")?"""
    with open(path) as f:
        samples = json.load(f)
    colour = shape = 0
    for s in samples:
        _, want_colour, want_shape = s["conversations"][1]["value"].split()
        image = data.load_image(os.path.join(os.path.dirname(path), s["image"]))[None]  # (1, H, W, 3)
        reply = evaluate.generate_reply(model, tok, image, "<image>\nDescribe the image.", max_new_tokens=12)
        words = reply.replace(".", " ").replace(",", " ").split()
        colour += next((w for w in words if w in data.COLORS), None) == want_colour
        shape += next((w for w in words if w in data.SHAPES), None) == want_shape
    return {"caption_colour": [colour, len(samples)], "caption_shape": [shape, len(samples)], "example": reply}


def frac(score: list) -> str:
    """[right, asked] as "right/asked"."""
    return f"{score[0]}/{score[1]}"


def twice_chance(score: list, chance: float) -> bool:
    """Is [right, asked] at least twice what guessing (right with probability `chance`) gets?"""
    return score[0] >= 2 * chance * score[1]


def yes_no(ok: bool) -> str:
    return "yes" if ok else "no"


def skill_row(res: dict) -> tuple[str, str]:
    """One demo_skill result as the table's (result, learnt). A score is learnt when it is at least twice chance;
    stage 4's perplexity when it fell and beats a uniform guess, its passkeys when more are found than before."""
    stage = res["stage"]
    if stage == 0:
        n8, n32 = res["needle_8_frames"], res["needle_32_frames"]
        result = f"{frac(n8)}, {frac(n32)}"
        learnt = yes_no(twice_chance(n8, 1 / 8) and twice_chance(n32, 1 / 8))
    elif stage in (1, 2):
        colour, shape = res["caption_colour"], res["caption_shape"]
        words = res["example"].split()  # the last still's caption, its first words
        example = repr(" ".join(words[:4])) + "..." * (len(words) > 4)
        result = f"{frac(colour)}, {frac(shape)}, e.g. {example}"
        learnt = f"colour {yes_no(twice_chance(colour, 1 / 8))}, shape {yes_no(twice_chance(shape, 1 / 4))}"
    elif stage == 3:
        result = frac(res["mcq"])
        learnt = yes_no(twice_chance(res["mcq"], 1 / 4))
    elif stage == 4:
        had = "ppl_before" in res  # a stage 4 from random weights has no before
        ppl, key = (f"{res['ppl_before']:,.4g} -> ", f"{res['passkey_before']:.0%} -> ") if had else ("", "")
        result = f"{ppl}{res['ppl_after']:,.4g} (vocab {res['vocab']:,}) / {key}{res['passkey_after']:.0%}"
        fell = res["ppl_after"] < min(res["vocab"], res.get("ppl_before", math.inf))
        found = res["passkey_after"] > res.get("passkey_before", 0.0)
        learnt = f"ppl {yes_no(fell)}, passkey {yes_no(found)}"
    else:  # stage 5
        by_frames = ", ".join(f"{n} frames {a:.0%}" for n, a in res["niah_by_frames"].items())
        result = f"{res['niah']:.1%} ({by_frames})"
        learnt = yes_no(min(res["niah_by_frames"].values()) >= 2 / 8)
    return result, learnt


def demo_table(results: list) -> str:
    """The demo's report: one row per stage, its skill, the held-out result, chance, and whether it was learnt."""
    rows = [("stage", "held-out skill", "result", "chance", "learnt")]
    for r in results:
        skill, chance = DEMO_SKILLS[r["stage"]]
        result, learnt = skill_row(r)
        rows.append((str(r["stage"]), skill, result, chance, learnt))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  " + "  ".join(f"{c:<{w[i]}}" for i, c in enumerate(r[:4])) + f"  {r[4]}" for r in rows)


def run(flags: dict):
    """Check every stage's flags, prepare the folders, train each stage; on demo data, report its held-out skill."""
    eval_mode, threads = flags.pop("eval", "auto"), flags.pop("threads", 0)
    cfgs = plan(flags)
    for cfg in cfgs:
        check_config(cfg)
    threads = threads or (1 if cfgs[0].model == "tiny" else 0)  # 128-wide matmuls gain nothing from more threads
    if threads > 0:
        torch.set_num_threads(threads)
    info = mmsp.init_distributed()
    root, last = os.path.dirname(cfgs[-1].out), cfgs[-1]
    spec = last.data
    report = eval_mode == "auto" and last.save and (spec.startswith("demo:") or os.path.isfile(
        os.path.join(spec, "meta.json")))  # the demo's held-out data is there to measure each stage
    niah = os.path.join(root, "niah") if report and last.stage == 5 else None
    prepare_run_folders(cfgs, niah, info)
    ensure_demo_data(cfgs[0].data, info)
    layouts, skills = {}, []
    for cfg in cfgs:
        if (cfg.sp, cfg.ring) not in layouts:
            try:
                layouts[cfg.sp, cfg.ring] = mmsp.make_layout(sp=cfg.sp, ring=cfg.ring)
            except ValueError as e:
                raise InputError(f"--sp {cfg.sp} --ring {cfg.ring}: {e}") from e
        layout = layouts[cfg.sp, cfg.ring]
        check_layout(cfg, layout)
        model_dir, held = os.path.join(cfg.out, "model"), os.path.join(cfg.out, "heldout.json")
        if cfg.resume and os.path.isfile(os.path.join(model_dir, "config.json")):  # finished, if its flags match
            check_resume(cfg.out, trajectory(cfg))
            if info.rank == 0:
                print(f"stage {cfg.stage}: {model_dir} exists and matches these flags, skipped (--resume)", flush=True)
        else:
            train_stage(cfg, info, layout)
        if not report:
            continue
        if os.path.isfile(held):  # measured when the stage finished (a --resume of a finished run)
            with open(held) as f:
                skills.append(json.load(f))
        else:
            skills.append(demo_skill(cfg, model_dir, info, layout))
            if info.rank == 0:
                data.write_text_atomic(held, json.dumps(skills[-1], indent=1) + "\n")
        if info.rank == 0:
            print(f"stage {cfg.stage}, held-out: {DEMO_SKILLS[cfg.stage][0]}: {skill_row(skills[-1])[0]}", flush=True)
    if skills and info.rank == 0:
        print(f"\nthe demo on held-out data ({os.path.join(spec.removeprefix('demo:'), 'eval')}; heldout.json in "
              f"each stage's folder{', the heatmap in ' + niah if niah else ''}):\n{demo_table(skills)}", flush=True)


def main(argv=None):
    """The command line: a user's mistake ends as `train.py: error: ...` and exit code 2; a bug keeps its traceback."""
    flags = dict(parse_flags(argv) if argv is not None else ARGS)
    try:
        run(flags)
    except InputError as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
