"""evaluate.py: what the LongVILA paper measures (arXiv 2408.10188, section 5), from a checkpoint to scores.

    python evaluate.py niah --model runs/demo/stage5/model --haystacks data/demo/eval/niah/haystack \\
        --needles data/demo/eval/niah/needles --out out/niah          # the CPU demo's model and held-out data

Each task is a short function from (model, tokenizer, inputs) to scores:
  niah     video needle in a haystack: a needle image inserted as one frame at depth d among N haystack frames, in
           the reference's prompt (the N + 1 frames with no separator); cell (d, N) scores whether the teacher-forced
           argmax at the answer positions spells the answer (lower-cased, spaces removed). A heatmap of the grid.
  mcq      VideoMME multiple choice: the reference prompt, a greedy reply, the reference's letter extraction.
  caption / ask   a greedy reply about a video, streamed token by token (its speed: `bench.py question`).
  passkey  a 5-digit key hidden in filler text at depth d (stage 4's context extension), teacher-forced.
  ppl      perplexity of a text file in windows of --seq_len tokens.
mcq, caption and ask sample frames as the checkpoint's config.json says (num_video_frames, fps,
image_aspect_ratio) unless --num_frames / --fps are given. Under torchrun with --sp / --ring one SP group acts as
one device (MM-SP): every rank runs the same loop; rank 0 prints and writes. `evaluate.py TASK --help` lists flags.

Sections: the command line (torch-free, so --help answers at once) | scoring rules | the model calls the tasks
share | niah | mcq | caption / ask | passkey | ppl | --- below: the machinery: the results store (--out resumes
only the same model, settings and code), the heatmap, loading, main.
"""
import argparse
import functools
import hashlib
import json
import math
import os
import pathlib
import re
import sys
import time

# -----------------------------------------------------------------------------
# the command line (stdlib only: --help and flag mistakes answer before torch loads)

DEFAULT_DEPTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # the reference's needle depths (--depth_interval 0.2)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
# (task statement, filler sentences). "classic": the landmark-attention / LongLoRA prompt; "demo": the stage-4
# demo documents (filler None = data.FILLER), so the tiny model is tested on what it read.
PASSKEY_STYLES = {
    "classic": ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will "
                "quiz you about the important information there.",
                ["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."]),
    "demo": ("There is a pass key hidden inside a lot of text.", None),
}


def checked(kind, ok, expected: str):
    """An argparse type: kind(text) satisfying ok(value); anything else is argparse's one-line error (exit 2)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


def comma_list(kind):
    """"0,0.5,1" -> [kind("0"), kind("0.5"), kind("1")] (a ValueError for an item kind does not read)."""
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


POSITIVE_INT = checked(int, lambda x: x > 0, "a positive integer")
NON_NEGATIVE = checked(float, lambda x: x >= 0, "a number >= 0")
POSITIVE = checked(float, lambda x: x > 0, "a number > 0")
DEPTHS = checked(comma_list(float), lambda v: v and all(0 <= x <= 1 for x in v), "depths in [0, 1], e.g. 0,0.5,1")
COUNTS = checked(comma_list(int), lambda v: v and all(x > 0 for x in v), "positive integers, e.g. 8,16,32")


def common_flags(s):
    g = s.add_argument_group("model and parallelism")
    g.add_argument("--model", default=None, help="checkpoint folder (VILA layout: config.json, llm/, vision_tower/, "
                                                 "mm_projector/)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--sp", type=POSITIVE_INT, default=None, help="sequence-parallel degree (default: all processes)")
    g.add_argument("--ring", type=POSITIVE_INT, default=1, help="ring degree inside sp (ulysses = sp / ring)")
    g.add_argument("--seed", type=int, default=0)
    g = s.add_argument_group("output")
    g.add_argument("--out", default=None, help="folder for results; a rerun resumes them when model, settings and "
                                               "code are the same, and stops otherwise")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in --out (replaces only results evaluate.py wrote there)")
    g.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bar on stderr")
    return s


def video_flags(s, max_new_tokens: int):
    s.add_argument("--num_frames", type=POSITIVE_INT, default=None,
                   help="frames per video (default: the checkpoint's num_video_frames)")
    s.add_argument("--fps", type=NON_NEGATIVE, default=None,
                   help="sample at this rate, at most --num_frames (default: the checkpoint's fps; 0 = uniform)")
    s.add_argument("--max_new_tokens", type=POSITIVE_INT, default=max_new_tokens)


# data.CAPTION_PROMPT and data.ASK_QUESTION (a test keeps them equal), for --help without importing torch
DEFAULT_PROMPTS = {"caption": "Elaborate on the visual and narrative elements of the video in detail.",
                   "ask": "What happens in the video?"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True, metavar="TASK")
    s = common_flags(sub.add_parser("niah", help="video needle in a haystack (heatmap)"))
    s.add_argument("--haystacks", required=True, help="a long video, or a folder of videos, read at --fps")
    s.add_argument("--needles", required=True, help="needles.json ([{image, question, answer}]) or its folder")
    s.add_argument("--depths", type=DEPTHS, default=list(DEFAULT_DEPTHS), help="needle depths in [0, 1]")
    s.add_argument("--frame_counts", type=COUNTS, default=[8, 16, 32], help="haystack frames per prompt")
    s.add_argument("--fps", type=POSITIVE, default=1.0, help="haystack sampling rate (frames per second)")
    s.add_argument("--vision_batch", type=POSITIVE_INT, default=32, help="frames per vision-encoder call")
    s = common_flags(sub.add_parser("mcq", help="VideoMME-style multiple choice"))
    s.add_argument("--questions", required=True, help="JSON list of {video, question, options, answer, duration}")
    s.add_argument("--media_root", default=None, help="video paths are relative to this (default: the JSON's folder)")
    video_flags(s, max_new_tokens=16)
    for name, text in (("caption", "describe videos"), ("ask", "ask a question about a video")):
        s = common_flags(sub.add_parser(name, help=text))
        s.add_argument("--video", default=None, help="a video or image file, or a folder of videos")
        s.add_argument("--prompt" if name == "caption" else "--question", dest="question", metavar="TEXT",
                       help=f"what to ask (default: {DEFAULT_PROMPTS[name]!r}, which the demo's stage 5 trains on)")
        video_flags(s, max_new_tokens=256 if name == "caption" else 64)
        s.add_argument("--no_stream", dest="stream", action="store_false", help="print the reply at the end, not "
                       "token by token")
    s = common_flags(sub.add_parser("passkey", help="text passkey retrieval (heatmap)"))
    s.add_argument("--lengths", type=COUNTS, default=[1024, 2048, 4096], help="context lengths in tokens")
    s.add_argument("--depths", type=DEPTHS, default=list(DEFAULT_DEPTHS), help="passkey depths in [0, 1]")
    s.add_argument("--trials", type=POSITIVE_INT, default=3, help="random keys per cell")
    s.add_argument("--style", default="classic", choices=sorted(PASSKEY_STYLES))
    s.add_argument("--filler_text", default=None, help="take filler sentences from this text file instead")
    s = common_flags(sub.add_parser("ppl", help="perplexity of a text file"))
    s.add_argument("--text", required=True)
    s.add_argument("--seq_len", type=checked(int, lambda x: x > 1, "an integer > 1"), default=4096)
    s.add_argument("--max_windows", type=POSITIVE_INT, default=None)
    return p


if __name__ == "__main__":  # --help and flag mistakes answer before torch loads (2 s)
    ARGS = build_parser().parse_args()

import numpy as np  # noqa: E402  (the rest of the file needs numpy, torch, pillow and the model files)
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from safetensors import SafetensorError  # noqa: E402

from data import (ASK_QUESTION, CAPTION_PROMPT, FILLER, VIDEO_EXTS, Progress, Tokenizer, VideoFile,  # noqa: E402
                  build_conversation, build_niah_prompt, load_image, mcq_prompt, needle_index, preprocess,
                  read_video, write_text_atomic)
from longvila import IGNORE_INDEX, IMAGE_TOKEN_ID, InputError, LongVILA  # noqa: E402
from mmsp import (attention_hook, frame_split, init_distributed, layout_indices, make_layout,  # noqa: E402
                  padded_length, sp_forward, sp_generate, token_owner)

# -----------------------------------------------------------------------------
# scoring: the reference's rules, on strings and token ids


def normalize_answer(text: str) -> str:
    """The reference's answer normalisation (VILA main, eval_vision_niah.py): spaces removed, lower-cased."""
    return text.replace(" ", "").lower()


def answer_correct(pred_ids, answer_ids, tokenizer) -> bool:
    """Teacher-forced exact match as the reference scores it: both decoded (control tokens as text), equal after
    `normalize_answer` (so "Red" and " red" count as the same answer)."""
    decode = functools.partial(tokenizer.decode, skip_special_tokens=False)
    return normalize_answer(decode(pred_ids)) == normalize_answer(decode(answer_ids))


# The reference's prefixes (LongVILA branch, llava/eval/video_mme/mme_calc.py). Its list misses two commas, so
# Python joins four of them into the last two strings below, which replies rarely contain: "Best answer: A" keeps
# its "B" of "Best" and is read as B. We keep that behaviour, so our scores are the reference's.
VIDEOMME_PREFIXES = ["The best answer is", "The correct answer is", "The answer is", "The answer",
                     "The best option isThe correct option is", "Best answer:Best option:"]


def extract_choice(reply: str) -> str:
    """The reference's `extract_characters_regex`: the prefixes above removed, the first capital A-D anywhere, even
    inside a word ("" = no answer; its extra rule for replies of over 10 words without one gives "" too)."""
    s = reply.strip()
    for prefix in VIDEOMME_PREFIXES:
        s = s.replace(prefix, "")
    match = re.search(r"[ABCD]", s)
    return match[0] if match else ""


def accuracy_by(records: list, key: str) -> dict:
    """{"overall": acc, key-value: acc ...} over records with a boolean "correct" (empty groups are absent)."""
    groups = {}
    for r in records:
        groups.setdefault(str(r.get(key, "unknown")), []).append(bool(r["correct"]))
    overall = sum(r["correct"] for r in records) / len(records) if records else float("nan")
    accuracy = {"overall": overall}
    for name, v in sorted(groups.items()):
        accuracy[name] = sum(v) / len(v)
    return accuracy


# -----------------------------------------------------------------------------
# the model calls the tasks share: frames -> features once, a teacher-forced argmax, a greedy reply


def is_main(layout) -> bool:
    """Rank 0 of the world prints and writes files (every rank computes)."""
    return layout is None or not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def frames_tensor(frames, image_size: int, aspect: str) -> torch.Tensor:
    """uint8 frames (F, H, W, 3) -> preprocessed (F, 3, S, S) ("pad": letterboxed first); float ones pass through."""
    if isinstance(frames, torch.Tensor) and frames.is_floating_point():
        return frames
    return preprocess(np.asarray(frames), image_size, aspect=aspect)  # (F, 3, S, S)


@torch.no_grad()
def encode_frames(model, frames: torch.Tensor, layout=None, batch: int = 32) -> torch.Tensor:
    """Vision encoder + projector over many frames, `batch` frames a call: (F, 3, S, S) -> (F, N, C). Under MM-SP
    each rank encodes one contiguous slice of ceil(F/sp) frames (mmsp.frame_split); the slices are all-gathered."""
    device, dtype = model_device(model), model_dtype(model)
    sp, rank = (layout.sp, layout.sp_rank) if layout is not None else (1, 0)
    F, per = frames.shape[0], frame_split(frames.shape[0], sp)
    mine = frames[rank * per:(rank + 1) * per]  # (<= per, 3, S, S) this rank's slice
    if len(mine) < per:  # the last slices are padded with copies of the last frame, dropped below
        mine = torch.cat([mine, frames[-1:].expand(per - len(mine), *frames.shape[1:])])  # (per, 3, S, S)
    local = torch.cat([model.encode_images(mine[i:i + batch].to(device, dtype))
                       for i in range(0, per, batch)])  # (per, N, C)
    if sp == 1:
        return local  # (F, N, C)
    parts = [torch.empty_like(local) for _ in range(sp)]  # sp x (per, N, C)
    torch.distributed.all_gather(parts, local.contiguous(), group=layout.sp_group)
    return torch.cat(parts)[:F]  # (sp*per, N, C) -> (F, N, C)


@torch.no_grad()
def embed_with_features(model, input_ids, features=None) -> torch.Tensor:
    """LongVILA.embed's splice (1, T, C), with visual features precomputed once for a whole grid by encode_frames."""
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=model_device(model))  # (T,)
    slots = ids == IMAGE_TOKEN_ID  # (T,)
    h = model.llm.tok_embeddings(ids.clamp(min=0))  # (T, C); the slots get a dummy row, replaced below
    rows = 0 if features is None else features.shape[0] * features.shape[1]  # F*N visual tokens
    if rows != int(slots.sum()):
        raise ValueError(f"the prompt has {int(slots.sum())} visual-token slots but {rows} visual feature rows "
                         f"were given")
    if rows:
        h = h.masked_scatter(slots[:, None], features.to(h.dtype))  # (T, C): the (F*N, C) rows in prompt order
    return h.unsqueeze(0)  # (1, T, C)


@torch.no_grad()
def teacher_forced_argmax(model, h: torch.Tensor, targets, layout=None) -> torch.Tensor:
    """Greedy predictions of the tokens AT positions `targets` of h (1, T, C), each from the hidden state at t-1 of
    one causal forward (teacher forcing). The LM head runs on the |targets| rows only: (T, V) logits never exist.
    Under MM-SP each rank runs its zigzag shard of h (mmsp.layout_indices); the one rank owning row t-1
    (mmsp.token_owner) applies the LM head; an all-reduce (sum) gives every rank all."""
    need = (torch.as_tensor(targets, dtype=torch.long) - 1).to(h.device)  # (A,) rows whose next token we want
    if layout is None or layout.sp == 1:
        hidden = model.forward_embeds(h, torch.arange(h.shape[1], device=h.device).unsqueeze(0))  # (1, T, C)
        return model.llm.output(hidden[0, need]).argmax(dim=-1).cpu()  # (A, V) -> (A,)
    T = h.shape[1]
    Tp = padded_length(T, layout.sp)
    h = torch.nn.functional.pad(h, (0, 0, 0, Tp - T))  # (1, Tp, C): zero rows at the end, no real token sees them
    idx = layout_indices(Tp, layout).to(h.device)  # (Tp/sp,) increasing true positions of my tokens
    hidden = model.forward_embeds(h[:, idx], idx.unsqueeze(0), attn=attention_hook(layout))  # (1, Tp/sp, C)
    mine = token_owner(Tp, layout).to(h.device)[need] == layout.sp_rank  # (A,) bool
    pred = torch.zeros(need.shape[0], dtype=torch.long, device=h.device)  # (A,)
    if mine.any():
        rows = torch.searchsorted(idx, need[mine])  # positions of those rows inside my shard
        pred[mine] = model.llm.output(hidden[0, rows]).argmax(dim=-1)  # (A_mine, V) -> (A_mine,)
    torch.distributed.all_reduce(pred, group=layout.sp_group)  # (A,) every prediction from its owner, 0 elsewhere
    return pred.cpu()


def score_answers(model, tokenizer, prompts, features, layout=None) -> dict:
    """{"correct", "predictions"} of prompts (input_ids, answer positions, answer ids), each teacher-forced, with
    each prompt's visual features (F, N, C) or None."""
    preds = [teacher_forced_argmax(model, embed_with_features(model, ids, f), pos, layout).tolist()  # (A,)
             for (ids, pos, _), f in zip(prompts, features)]
    return {"correct": [answer_correct(p, answer, tokenizer) for p, (_, _, answer) in zip(preds, prompts)],
            "predictions": [tokenizer.decode(p) for p in preds]}


def prompt_ids(tokenizer, text: str, num_frames: int, tokens_per_frame: int) -> list:
    """Token ids of one user turn `text` (one <video>/<image> for num_frames frames) + the assistant header."""
    ids, _ = build_conversation([{"from": "human", "value": text}], tokenizer, [num_frames] if num_frames else [],
                                tokens_per_frame, add_generation_prompt=True)
    return ids


class StreamPrinter:
    """`stream` callback of LongVILA.generate: prints the new characters of the decoded reply (so multi-byte and
    merged sub-word tokens appear correctly); records each token's arrival time."""

    def __init__(self, tokenizer, enabled=True, out=None):
        self.tokenizer, self.enabled, self.out = tokenizer, enabled, out if out is not None else sys.stdout
        self.ids, self.times, self.shown = [], [], ""

    def __call__(self, token_id):
        self.times.append(time.perf_counter())
        if int(token_id) in self.tokenizer.stop_ids:
            return
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if self.enabled and not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text


@torch.no_grad()
def generate_reply(model, tokenizer, frames, text, layout=None, max_new_tokens=64, stream=None, stop=True) -> str:
    """Greedy reply to `text` about frames (uint8, preprocessed or None), on one process or MM-SP; it stops at any
    of the tokenizer's end tokens, or never with stop=False (bench.py question)."""
    cfg, device = model.config, model_device(model)
    images = None
    if frames is not None:  # preprocessed as the checkpoint was trained (its image_aspect_ratio)
        images = [frames_tensor(frames, cfg.vision.image_size, cfg.image_aspect_ratio).to(device, model_dtype(model))]
    ids = prompt_ids(tokenizer, text, 0 if frames is None else len(frames), cfg.tokens_per_frame)
    input_ids = torch.tensor([ids], device=device)  # (1, T)
    stops = list(tokenizer.stop_ids) if stop else None
    if layout is not None and layout.sp > 1:
        new = sp_generate(model, input_ids, images=images, layout=layout, max_new_tokens=max_new_tokens,
                          eos_token_id=stops, stream=stream)
    else:
        new = model.generate(input_ids, images=images, max_new_tokens=max_new_tokens, eos_token_id=stops,
                             stream=stream)
    out = new[0].tolist()  # (T_new,) token ids
    end = next((i for i, t in enumerate(out) if t in tokenizer.stop_ids), len(out))
    return tokenizer.decode(out[:end]).strip()


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def media_frames(path: str, num_frames=None, fps=None):
    """(uint8 frames (F, H, W, 3), placeholder) of a video file ("<video>") or an image file ("<image>")."""
    if path.lower().endswith(IMAGE_EXTS):
        return load_image(path)[None], "<image>"  # (1, H, W, 3)
    return read_video(path, num_frames=num_frames, fps=fps)[0], "<video>"


def video_sampling(config, num_frames=None, fps=None) -> tuple:
    """(num_frames, fps or None): the flags where given, else config.json's (fps 0 = uniform), as the reference."""
    return num_frames or config.num_video_frames, (config.fps if fps is None else fps) or None


def list_videos(path) -> list:
    """A video or image file, or a folder of videos (sorted) -> list of paths."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(VIDEO_EXTS))
        if not files:
            raise InputError(f"{path}: no video files ({' '.join(VIDEO_EXTS)}) in this folder")
        return files
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such video file or folder")
    return [str(path)]


# -----------------------------------------------------------------------------
# task: video needle in a haystack (the reference: VILA's llava/eval/vision_niah_vila, adapted from LongVA)


def insert_needle(haystack: torch.Tensor, needle: torch.Tensor, depth: float) -> torch.Tensor:
    """Splice one needle frame into a haystack of frame features (or pixels) at `needle_index(depth, F)`."""
    i = needle_index(depth, haystack.shape[0])
    return torch.cat([haystack[:i], needle.unsqueeze(0), haystack[i:]], dim=0)  # (F+1, ...)


def niah_prompt(tokenizer, question: str, answer: str, num_frames: int, tokens_per_frame: int) -> tuple:
    """(input_ids, answer positions, answer ids) of the reference's V-NIAH prompt (data.build_niah_prompt)."""
    ids, labels = build_niah_prompt(tokenizer, num_frames, tokens_per_frame, question, answer)
    pos = [t for t, y in enumerate(labels) if y != IGNORE_INDEX]  # the answer's tokens, the only supervised ones
    return ids, pos, [ids[t] for t in pos]


def load_needles(needles) -> list:
    """[{"name", "image" (H, W, 3) uint8, "question", "answer"}] from needles.json (image paths relative to it), its
    folder, or such a list."""
    root = ""
    if isinstance(needles, (str, os.PathLike)):
        path = os.path.join(needles, "needles.json") if os.path.isdir(needles) else str(needles)
        needles, root = read_input(path, "--needles", json.loads), os.path.dirname(os.path.abspath(path))
        if not isinstance(needles, list) or not needles:
            raise InputError(f"{path}: expected a non-empty JSON list of {{image, question, answer}}")
    out = []
    for i, n in enumerate(needles):
        missing = [k for k in ("image", "question", "answer") if not isinstance(n, dict) or k not in n]
        if missing:
            raise InputError(f"needle {i}: missing {missing} (each needle needs image, question, answer)")
        img = n["image"]
        name = n.get("name", os.path.basename(img) if isinstance(img, str) else f"needle_{i}")
        if isinstance(img, str):
            img = load_image(os.path.join(root, img))  # an absolute path stays as it is
        out.append({"name": name, "image": img, "question": n["question"], "answer": n["answer"]})
    return out


def haystack_frames(source, name: str, fps: float, count: int) -> np.ndarray:
    """The first `count` frames of a haystack, uint8 (count, H, W, 3). A video is read as the reference reads it
    (at 1 fps every round(video fps)-th frame; here every round(video_fps / fps)-th); only those are decoded."""
    if isinstance(source, str):
        with VideoFile(source) as video:
            idx = video.indices(fps=fps)[:count]  # (F,) frame indices
            if len(idx) == count:
                return video.get(idx)  # (count, H, W, 3)
            have = len(idx)
    elif len(source) >= count:
        return source[:count]
    else:
        have = len(source)
    raise InputError(f"haystack {name}: {have} frames at {fps} fps, but the grid needs {count} (lower "
                     f"--frame_counts or give a longer video)")


def haystack_sources(haystacks) -> tuple:
    """(names, sources) of a video or a folder of videos (paths), or of a list of uint8 frame arrays."""
    if isinstance(haystacks, (str, os.PathLike)):
        paths = list_videos(haystacks)
        return [os.path.basename(p) for p in paths], paths
    return [f"haystack_{i}" for i in range(len(haystacks))], list(haystacks)


@torch.no_grad()
def run_niah(model, tokenizer, haystacks, needles, depths=DEFAULT_DEPTHS, frame_counts=(8, 16, 32), *,
             fps: float = 1.0, vision_batch: int = 32, title: str = "", layout=None, out_dir=None, identity=None,
             overwrite=False, progress: bool = True) -> dict:
    """Needle in a haystack over depths x frame counts: a grid, its mean, a heatmap. Each haystack and needle is
    encoded ONCE (the reference's 'pad' aspect); cell (n, d) splices the needle into the first n haystack frames."""
    main, size, tpf = is_main(layout), model.config.vision.image_size, model.config.tokens_per_frame
    depths, frame_counts = [float(d) for d in depths], sorted(int(n) for n in frame_counts)
    needles, (names, sources) = load_needles(needles), haystack_sources(haystacks)
    header = {"task": "niah", **(identity or {}), "haystacks": names, "fps": fps,
              "needles": [[n["name"], n["question"], n["answer"]] for n in needles]}
    results, path = open_results(out_dir, header, layout, overwrite)
    cells, key = results["cells"], "{}|frames={}|depth={:g}".format
    pixels = torch.cat([frames_tensor(n["image"][None], size, "pad") for n in needles])  # (K, 3, S, S)
    needle_feats = encode_frames(model, pixels, layout, vision_batch)  # (K, N, C): each needle once
    bar = Progress(len(sources) * len(frame_counts) * len(depths), "niah", enabled=progress and main)
    for name, src in zip(names, sources):
        hay = None  # decoded and encoded once, when the first of its cells is computed
        for n in frame_counts:  # the ids do not depend on the depth: every frame has the same slots
            prompts = [niah_prompt(tokenizer, nd["question"], nd["answer"], n + 1, tpf) for nd in needles]
            for d in depths:
                if key(name, n, d) not in cells:
                    if hay is None:
                        frames = haystack_frames(src, name, fps, frame_counts[-1])  # (F, H, W, 3)
                        hay = encode_frames(model, frames_tensor(frames, size, "pad"), layout, vision_batch)  # (F,N,C)
                    spliced = (insert_needle(hay[:n], f, d) for f in needle_feats)  # K x (n+1, N, C), one at a time
                    cells[key(name, n, d)] = {"haystack": name, "frames": n, "depth": d,
                                              "needle_index": needle_index(d, n), "tokens": len(prompts[0][0]),
                                              **score_answers(model, tokenizer, prompts, spliced, layout)}
                    save_results(path, results)
                bar.update(1, acc=float(np.mean([c for v in cells.values() for c in v["correct"]])))
    bar.close()
    scores = [[[c for name in names for c in cells[key(name, n, d)]["correct"]] for n in frame_counts]
              for d in depths]  # (depths, frame counts) lists of haystacks x needles
    results.update(depths=depths, frame_counts=frame_counts)
    finish_grid(results, scores, depths, frame_counts, path, "Needle in a haystack", "Number of frames",
                "Needle depth (%)", title)
    if main:
        print(f"niah: mean accuracy {results['mean']:.4f} over {len(depths)} depths x {len(frame_counts)} frame "
              f"counts, {len(sources)} haystacks x {len(needles)} needles")
    return results


# -----------------------------------------------------------------------------
# task: VideoMME-style multiple choice (the reference: VILA's llava/eval/video_mme)


def load_mcq(path: str, media_root=None) -> list:
    """VideoMME-format questions, each with "path": its video under media_root (default: the JSON's folder)."""
    items = read_input(path, "--questions", json.loads)
    if not isinstance(items, list) or not items:
        raise InputError(f"{path}: expected a non-empty JSON list of questions")
    root = media_root or os.path.dirname(os.path.abspath(path))
    for i, q in enumerate(items):
        missing = [k for k in ("video", "question", "options", "answer") if not isinstance(q, dict) or k not in q]
        if missing:
            raise InputError(f"{path}: question {i} lacks {missing} (VideoMME format: video, question, options, "
                             f"answer, duration)")
        if str(q["answer"]).strip().upper() not in ("A", "B", "C", "D"):
            raise InputError(f"{path}: question {i} has answer {q['answer']!r}; expected one letter A-D")
        q["path"] = os.path.join(root, q["video"])
        if not os.path.isfile(q["path"]):
            raise InputError(f"{path}: question {i}: video {q['path']} not found (paths are relative to "
                             f"--media_root, default the JSON's folder)")
    return items


@torch.no_grad()
def run_mcq(model, tokenizer, questions_path, *, media_root=None, num_frames=None, fps=None, max_new_tokens=16,
            layout=None, out_dir=None, identity=None, overwrite=False, progress=True) -> dict:
    """Multiple-choice video QA: accuracy overall and by duration. A reply without a letter counts as wrong;
    "accuracy_answered" is the reference's figure (over answered questions)."""
    main, items = is_main(layout), load_mcq(questions_path, media_root)
    num_frames, fps = video_sampling(model.config, num_frames, fps)
    header = {"task": "mcq", **(identity or {}), "questions": file_digest(questions_path), "num_frames": num_frames,
              "fps": fps, "aspect": model.config.image_aspect_ratio, "max_new_tokens": max_new_tokens}
    results, path = open_results(out_dir, header, layout, overwrite)
    rows = results["cells"]
    bar = Progress(len(items), "mcq", enabled=progress and main)
    for i, q in enumerate(items):
        qid = str(q.get("question_id", i))
        if qid not in rows:
            frames, tag = media_frames(q["path"], num_frames, fps)  # (F, H, W, 3)
            text = f"{tag}\n" + mcq_prompt(q["question"], q["options"])
            reply = generate_reply(model, tokenizer, frames, text, layout, max_new_tokens)
            answer, letter = str(q["answer"]).strip().upper(), extract_choice(reply)
            rows[qid] = {"id": qid, "video": q["video"], "duration": q.get("duration", "unknown"), "reply": reply,
                         "prediction": letter, "answer": answer, "correct": letter == answer}
            save_results(path, results)
        bar.update(1, acc=float(np.mean([r["correct"] for r in rows.values()])))
    bar.close()
    answered = [r for r in rows.values() if r["prediction"]]
    results.update(accuracy=accuracy_by(list(rows.values()), "duration"), answered=len(answered),
                   accuracy_answered=accuracy_by(answered, "duration")["overall"])
    save_results(path, results)
    if main:
        print("mcq: accuracy " + " ".join(f"{k}={v:.4f}" for k, v in results["accuracy"].items())
              + f" ({len(rows)} questions, {len(answered)} answered with a letter)")
    return results


# -----------------------------------------------------------------------------
# task: a caption of, or an answer about, each video of a file or folder


@torch.no_grad()
def run_caption(model, tokenizer, videos, prompt=None, *, task="caption", num_frames=None, fps=None,
                max_new_tokens=256, layout=None, out_dir=None, identity=None, overwrite=False, stream=True) -> dict:
    """Greedy replies to `prompt` about each video, streamed; one stored by an earlier run is printed from there."""
    main = is_main(layout)
    prompt = prompt or (CAPTION_PROMPT if task == "caption" else ASK_QUESTION)
    num_frames, fps = video_sampling(model.config, num_frames, fps)
    header = {"task": task, **(identity or {}), "prompt": prompt, "num_frames": num_frames, "fps": fps,
              "aspect": model.config.image_aspect_ratio, "max_new_tokens": max_new_tokens}
    results, path = open_results(out_dir, header, layout, overwrite)
    for p in list_videos(videos):
        name, cell = os.path.basename(p), results["cells"].get(os.path.basename(p))
        if cell is not None:
            if main:
                print(f"[{name}, {cell['frames']} frames] {cell['reply']}   (stored in {path})")
            continue
        frames, tag = media_frames(p, num_frames, fps)  # (F, H, W, 3)
        if main and stream:
            print(f"[{name}, {len(frames)} frames] ", end="", flush=True)
        printer = StreamPrinter(tokenizer, enabled=main and stream)
        reply = generate_reply(model, tokenizer, frames, f"{tag}\n{prompt}", layout, max_new_tokens, printer)
        if main:
            print("" if stream else f"[{name}, {len(frames)} frames] {reply}")
        results["cells"][name] = {"video": p, "frames": len(frames), "reply": reply}
        save_results(path, results)
    return results


# -----------------------------------------------------------------------------
# task: text passkey retrieval (checks stage 4's context extension)


def passkey_prompt(tokenizer, length: int, depth: float, key: str, style="classic", filler=None) -> tuple:
    """(input_ids, answer positions, answer ids) of at most `length` tokens: task, filler, needle, filler, question,
    key. The needle follows int(depth * n) of the n whole filler sentences that fit."""
    task, fill = PASSKEY_STYLES[style]
    fill = filler or fill or FILLER
    head = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(task)
    needle_ids = tokenizer.encode(" " + PASSKEY_NEEDLE.format(key=key))
    tail = tokenizer.encode(" " + PASSKEY_QUESTION)
    answer = tokenizer.encode(" " + key)
    budget = length - len(head) - len(needle_ids) - len(tail) - len(answer)
    if budget < 0:
        raise InputError(f"passkey: a context length of {length} tokens is shorter than the task, needle and "
                         f"question ({length - budget} tokens): raise --lengths")
    body, used, sentences = [], 0, [tokenizer.encode(" " + s) for s in fill]
    while True:  # whole filler sentences, cycled
        nxt = sentences[len(body) % len(sentences)]
        if used + len(nxt) > budget:
            break
        body.append(nxt)
        used += len(nxt)
    at = needle_index(depth, len(body))
    ids = head + [t for s in body[:at] for t in s] + needle_ids + [t for s in body[at:] for t in s] + tail
    return ids + answer, list(range(len(ids), len(ids) + len(answer))), answer


@torch.no_grad()
def run_passkey(model, tokenizer, lengths, depths=DEFAULT_DEPTHS, *, trials=3, style="classic", filler=None,
                seed=0, title="", layout=None, out_dir=None, identity=None, overwrite=False, progress=True) -> dict:
    """Passkey retrieval over lengths x depths, `trials` random 5-digit keys a cell, alike on every rank and rerun."""
    main = is_main(layout)
    depths, lengths = [float(d) for d in depths], sorted(int(n) for n in lengths)
    header = {"task": "passkey", **(identity or {}), "style": style, "trials": trials, "seed": seed,
              "filler": filler and sha16(json.dumps(filler).encode())}
    results, path = open_results(out_dir, header, layout, overwrite)
    cells, key = results["cells"], "length={}|depth={:g}".format
    bar = Progress(len(lengths) * len(depths), "passkey", enabled=progress and main)
    for L in lengths:
        for d in depths:
            if key(L, d) not in cells:
                rng = np.random.default_rng([seed, L, int(round(d * 1000))])
                prompts = [passkey_prompt(tokenizer, L, d, str(int(rng.integers(10000, 100000))), style, filler)
                           for _ in range(trials)]
                cells[key(L, d)] = {"length": L, "depth": d, "tokens": len(prompts[-1][0]),
                                    **score_answers(model, tokenizer, prompts, [None] * trials, layout)}
                save_results(path, results)
            bar.update(1, acc=float(np.mean([c for v in cells.values() for c in v["correct"]])))
    bar.close()
    results.update(depths=depths, lengths=lengths)
    finish_grid(results, [[cells[key(L, d)]["correct"] for L in lengths] for d in depths], depths, lengths, path,
                "Passkey retrieval", "Context length (tokens)", "Passkey depth (%)", title)
    if main:
        print(f"passkey: mean accuracy {results['mean']:.4f}")
    return results


# -----------------------------------------------------------------------------
# task: perplexity of a text file


@torch.no_grad()
def run_ppl(model, tokenizer, text_path, seq_len, *, max_windows=None, layout=None, out_dir=None, identity=None,
            overwrite=False, progress=True) -> dict:
    """Perplexity = exp(mean next-token NLL) over consecutive, non-overlapping windows of seq_len tokens."""
    main = is_main(layout)
    ids = tokenizer.encode(read_input(text_path, "--text"))
    n = min(len(ids) // seq_len, max_windows or len(ids))  # windows
    if n == 0:
        raise InputError(f"--text {text_path}: {len(ids)} tokens, fewer than one window of --seq_len {seq_len}")
    header = {"task": "ppl", **(identity or {}), "text": file_digest(text_path), "seq_len": seq_len}
    results, path = open_results(out_dir, header, layout, overwrite)
    cells = results["cells"]
    sp = functools.partial(sp_forward, layout=layout) if layout is not None and layout.sp > 1 else None
    bar = Progress(n, "ppl", enabled=progress and main)
    for w in range(n):
        if str(w) not in cells:
            x = torch.tensor([ids[w * seq_len:(w + 1) * seq_len]], device=model_device(model))  # (1, L)
            _, loss = model(x, labels=x, return_logits=False, sp_forward=sp)  # mean over the L-1 shifted targets
            if sp is not None:  # under MM-SP each rank returns its share (its tokens' NLL / global count): sum them
                torch.distributed.all_reduce(loss, group=layout.sp_group)
            cells[str(w)] = {"nll": float(loss)}
            save_results(path, results)
        bar.update(1, ppl=math.exp(np.mean([cells[str(v)]["nll"] for v in range(w + 1)])))
    bar.close()
    nll = float(np.mean([cells[str(w)]["nll"] for w in range(n)]))  # every window has seq_len - 1 targets
    results.update(text=text_path, seq_len=seq_len, windows=n, tokens=n * (seq_len - 1), nll=nll, ppl=math.exp(nll))
    save_results(path, results)
    if main:
        print(f"ppl: {results['ppl']:.4f} (mean NLL {nll:.4f} over {results['tokens']} tokens, {n} windows of "
              f"{seq_len})")
    return results


# =============================================================================
# --- below: the machinery: the results store, the heatmap, loading, main
# =============================================================================

# -----------------------------------------------------------------------------
# results store: one JSON per task in --out, {"header", "cells", summary}, written after every cell. The header
# names what the numbers depend on (task, model, dtype, code, settings); a rerun resumes only the same header.

CODE_FILES = ("evaluate.py", "data.py", "longvila.py")  # the code behind the numbers (prompts, scoring, model)
CHECKPOINT_FOLDERS = ("", "llm", "vision_tower", "mm_projector")  # the VILA layout
# what each task writes in --out, its results file first
OUTPUTS = {"niah": ("results.json", "heatmap.png"), "passkey": ("results.json", "heatmap.png"), "mcq": ("mcq.json",),
           "caption": ("captions.json",), "ask": ("captions.json",), "ppl": ("ppl.json",)}
DIGEST_SAMPLES, DIGEST_SLICE = 16, 1 << 16  # a weights file is digested from 16 slices of 64 KiB (~1 MB read)


def sha16(data: bytes) -> str:
    """16 hex digits of the sha256 of data: how a results header names a content (code, model, input file)."""
    return hashlib.sha256(data).hexdigest()[:16]


@functools.cache
def code_version() -> str:
    """sha16 of the source files behind the numbers, read once (the code this process runs): any edit counts."""
    here = pathlib.Path(__file__).resolve().parent
    return sha16(b"".join((here / name).read_bytes() for name in CODE_FILES))


def file_digest(path) -> dict:
    """{"file": its name, "sha256": sha16 of its content}: an input file as a results header names it."""
    return {"file": os.path.basename(path), "sha256": sha16(pathlib.Path(path).read_bytes())}


def sampled_digest(path, start: int = 0, length: int | None = None) -> bytes:
    """Digest of `length` bytes from `start` (default: the rest): the length and DIGEST_SAMPLES evenly spaced slices."""
    length = os.path.getsize(path) - start if length is None else length
    h = hashlib.sha256(str(length).encode())
    with open(path, "rb") as f:
        for i in range(DIGEST_SAMPLES):
            f.seek(start + i * max(length - DIGEST_SLICE, 0) // (DIGEST_SAMPLES - 1))
            h.update(f.read(min(DIGEST_SLICE, length)))
    return h.digest()


def safetensors_digest(path) -> bytes:
    """Digest of a .safetensors file: its whole header, then `sampled_digest` of its data (InputError if cut)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else size
        header = f.read(n) if 8 + n <= size else b""
    try:
        tensors = json.loads(header)
        end = max((t["data_offsets"][1] for k, t in tensors.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise InputError(f"{path}: not a readable .safetensors file (its header is cut off or corrupt)") from None
    if 8 + n + end > size:
        raise InputError(f"{path}: truncated: its header lists {end} bytes of tensors, the file holds "
                         f"{size - 8 - n} (an interrupted copy or download?)")
    return hashlib.sha256(head + header + sampled_digest(path, 8 + n, end)).digest()


def model_fingerprint(path) -> str:
    """sha16 over a checkpoint's JSON files and a sampled digest of each weights file, each after its name."""
    parts = []
    for part in CHECKPOINT_FOLDERS:
        folder = pathlib.Path(path, part)
        for file in sorted(folder.iterdir()) if folder.is_dir() else []:
            if file.suffix in (".json", ".safetensors", ".bin"):
                parts.append(os.path.join(part, file.name).encode())
                parts.append(file.read_bytes() if file.suffix == ".json" else
                             safetensors_digest(file) if file.suffix == ".safetensors" else sampled_digest(file))
    return sha16(b"".join(parts))


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def checkpoint_identity(path, dtype) -> dict:
    """What a results header records of a checkpoint run in `dtype` and of the code (identity= of the run_* tasks)."""
    return {"model": {"path": os.path.abspath(path), "fingerprint": model_fingerprint(path)},
            "dtype": dtype_name(dtype), "code": code_version()}


def read_results(path) -> dict:
    """A results file evaluate.py wrote ({"header", "cells", ...}); anything else in its place is an InputError."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not a results file of evaluate.py ({type(e).__name__}); choose another "
                         f"--out") from None
    if not isinstance(saved, dict) or not {"header", "cells"} <= set(saved):
        raise InputError(f"{path} is not a results file of evaluate.py (no header and cells); choose another --out")
    return saved


def header_diff(old: dict, new: dict, prefix: str = "") -> list:
    """["model.fingerprint 1a2b.. -> 3c4d..", ...]: where two results headers differ, values shortened."""
    def short(v):
        s = json.dumps(v)
        return s if len(s) <= 40 else s[:37] + "..."
    out = []
    for k in list(new) + [k for k in old if k not in new]:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += header_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {short(a)} -> {short(b)}")
    return out


def load_results(path, header: dict, overwrite: bool = False) -> dict:
    """Saved results to resume (same header), fresh ones (no file, or overwrite), else an InputError naming the diff."""
    saved = read_results(path) if os.path.exists(path) else None  # read even to overwrite: is it ours?
    if saved is None or overwrite:
        return {"header": header, "cells": {}}
    if saved["header"] != header:
        raise InputError(f"{path} holds results of another run ({'; '.join(header_diff(saved['header'], header))}): "
                         f"use another --out, or --overwrite to start over")
    return saved


def open_results(out_dir, header: dict, layout=None, overwrite: bool = False) -> tuple:
    """(results, path for save_results: None on ranks > 0) of header["task"] in out_dir. Rank 0's answer is
    broadcast: every rank must skip the same cells (each runs collectives) and stop together on a mismatch."""
    path = os.path.join(out_dir, OUTPUTS[header["task"]][0]) if out_dir and is_main(layout) else None
    box = [{"header": header, "cells": {}}, None]
    if path:
        try:
            box[0] = load_results(path, header, overwrite)
        except InputError as e:
            box[1] = str(e)
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(box, src=0)
    if box[1]:
        raise InputError(box[1])
    return box[0], path


def save_results(path, results: dict):
    """Write atomically (temporary file + rename): an interrupted run never leaves half a JSON; no path: nothing."""
    if path is None:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, json.dumps(results, indent=1))


def check_out(out, files):
    """--out must be a writable folder that holds no file evaluate.py would write over but its own results."""
    if out is None:
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out}: a file; expected a folder")
    results = os.path.join(out, files[0])
    if os.path.exists(results):
        read_results(results)
    for f in files[1:]:
        if os.path.exists(os.path.join(out, f)) and not os.path.exists(results):
            raise InputError(f"--out {out}: holds {f}, which evaluate.py did not write (no {files[0]} beside it); "
                             f"choose another --out")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise InputError(f"--out {out}: not writable")


def finish_grid(results, scores, depths, columns, path, what, xlabel, ylabel, name=""):
    """Grid (depths x columns) of mean scores, its mean, saved; with a path also heatmap.png beside it."""
    grid = np.array([[np.mean(cell) for cell in row] for row in scores])  # (depths, columns)
    results.update(grid=grid.tolist(), mean=float(grid.mean()))
    if path:
        save_results(path, results)
        draw_heatmap(grid, [f"{100 * d:g}" for d in depths], [short_number(c) for c in columns],
                     os.path.join(os.path.dirname(path), "heatmap.png"), f"{what}: mean {grid.mean():.1%}",
                     xlabel, ylabel, subtitle=name)


# -----------------------------------------------------------------------------
# heatmap (pillow only): rows = depths, columns = frame counts (or context lengths), red -> yellow -> green

HEATMAP_STOPS = ((0.0, 0.5, 1.0), ((240, 73, 110), (235, 184, 57), (154, 213, 179)))  # the reference's colours
HEATMAP_CELL = (72, 40)  # (width, height) of one cell in pixels
HEATMAP_MARGIN = (86, 64)  # (left and right, top and bottom) around the grid in pixels


def heatmap_color(score: float) -> tuple:
    """RGB of a score in [0, 1], piecewise-linear between HEATMAP_STOPS; NaN (missing cell) is light grey."""
    if score is None or not math.isfinite(score):
        return (220, 220, 220)
    return tuple(int(round(np.interp(score, HEATMAP_STOPS[0], c))) for c in zip(*HEATMAP_STOPS[1]))


def heatmap_size(rows: int, cols: int) -> tuple:
    """(width, height) in pixels of the heatmap PNG of a rows x cols grid (draw_heatmap widens it for a long title)."""
    return (2 * HEATMAP_MARGIN[0] + cols * HEATMAP_CELL[0], 2 * HEATMAP_MARGIN[1] + rows * HEATMAP_CELL[1])


def heatmap_cell_box(row: int, col: int) -> tuple:
    """(x0, y0, x1, y1) pixel box of grid cell (row, col), x1/y1 exclusive."""
    x0, y0 = HEATMAP_MARGIN[0] + col * HEATMAP_CELL[0], HEATMAP_MARGIN[1] + row * HEATMAP_CELL[1]
    return (x0, y0, x0 + HEATMAP_CELL[0], y0 + HEATMAP_CELL[1])


def short_number(x) -> str:
    """1400 -> '1.4K', 262144 -> '262K', 32 -> '32' (axis labels)."""
    x = float(x)
    if x >= 1e6:
        return f"{x / 1e6:.3g}M"
    if x >= 1e3:
        return f"{x / 1e3:.3g}K"
    return f"{x:g}"


def checkpoint_name(path: str) -> str:
    """A checkpoint's name on a plot: its last three folders, a final 'model' dropped."""
    parts = [p for p in os.path.normpath(path).split(os.sep) if p not in ("", ".")]
    if len(parts) > 1 and parts[-1] == "model":
        parts = parts[:-1]
    return "/".join(parts[-3:])


def draw_heatmap(grid, row_labels, col_labels, path, title, xlabel="Number of frames", ylabel="Needle depth (%)",
                 subtitle=""):
    """A heatmap PNG of `grid` (rows x cols of scores in [0, 1], NaN = not measured), with a colour bar and titles."""
    grid = np.asarray(grid, dtype=np.float64)  # (rows, cols)
    rows, cols = grid.shape
    small, big = ImageFont.load_default(size=12), ImageFont.load_default(size=15)  # pillow's bundled DejaVu
    W, H = heatmap_size(rows, cols)
    W = max(W, int(max(big.getlength(title), small.getlength(subtitle))) + 24)  # wider for a long title
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    text = functools.partial(d.text, fill=(0, 0, 0), font=small)
    for r in range(rows):
        for c in range(cols):
            x0, y0, x1, y1 = heatmap_cell_box(r, c)
            d.rectangle([x0, y0, x1 - 3, y1 - 3], fill=heatmap_color(grid[r, c]))  # a 2 px white grid line
            if math.isfinite(grid[r, c]):
                text(((x0 + x1) / 2, (y0 + y1) / 2), f"{grid[r, c]:.2f}", fill=(30, 30, 30), anchor="mm")
            if r == rows - 1:
                text(((x0 + x1) / 2, y1 + 6), str(col_labels[c]), anchor="mt")
        text((HEATMAP_MARGIN[0] - 6, (y0 + y1) / 2), str(row_labels[r]), anchor="rm")
    (left, top), (right, bottom) = HEATMAP_MARGIN, heatmap_cell_box(rows - 1, cols - 1)[2:]  # the grid's edges
    text(((left + right) / 2, H - 8), xlabel, anchor="mb")
    text((6, top - 8), ylabel, anchor="lb")
    text((W / 2, 6), title, font=big, anchor="mt")
    text((W / 2, 26), subtitle, fill=(70, 70, 70), anchor="mt")
    for y in range(top, bottom):  # the colour bar: 1 at the top, 0 at the bottom
        d.line([right + 16, y, right + 30, y], fill=heatmap_color(1.0 - (y - top) / max(bottom - top - 1, 1)))
    for v, y in ((1.0, top), (0.5, (top + bottom) / 2), (0.0, bottom)):
        text((right + 36, y), f"{v:.1f}", anchor="lm")
    img.save(path)
    return img


# -----------------------------------------------------------------------------
# loading: the model, input files; main


def read_input(path, what: str, parse=None):
    """A UTF-8 input file's text, or parse(text); a missing or malformed file is an InputError naming the flag."""
    try:
        with open(path, encoding="utf-8") as f:
            return parse(f.read()) if parse else f.read()
    except FileNotFoundError:
        raise InputError(f"{what} {path}: no such file") from None
    except (OSError, ValueError) as e:  # ValueError: UnicodeDecodeError, JSONDecodeError
        raise InputError(f"{what} {path}: not a {'JSON' if parse else 'UTF-8 text'} file ({e})") from None


def filler_sentences(path: str) -> list:
    """Sentences of a text file (split after '.'), without those mentioning a pass key: a passkey filler."""
    parts = [s.strip() for s in re.split(r"(?<=\.)\s+", read_input(path, "--filler_text")) if s.strip()]
    out = [s for s in parts if "pass key" not in s.lower() and "passkey" not in s.lower()]
    if not out:
        raise InputError(f"--filler_text {path}: no sentences without a pass key in it")
    return out


def load_model(args, device) -> tuple:
    """(model, tokenizer, identity for the results headers) of a checkpoint folder (ours or VILA's release)."""
    auto = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = auto if args.dtype == "auto" else getattr(torch, args.dtype)
    if not args.model:
        raise InputError("give --model CHECKPOINT (a folder with config.json, llm/, vision_tower/, mm_projector/)")
    if not os.path.isdir(args.model):
        raise InputError(f"--model {args.model}: no such folder (expected a checkpoint folder with config.json, "
                         f"llm/, vision_tower/, mm_projector/)")
    identity = checkpoint_identity(args.model, dtype)  # reads the weights' headers: a broken file stops here
    try:
        model = LongVILA.from_pretrained(args.model, dtype=dtype, device=device)
        tokenizer = Tokenizer.for_checkpoint(args.model)
    except (OSError, SafetensorError, json.JSONDecodeError) as e:  # a missing or unreadable checkpoint file
        raise InputError(f"--model {args.model}: {e}") from None
    return model.eval(), tokenizer, identity


def run(args):
    """Processes and SP layout, --out, the model; then the task the command line names."""
    info = init_distributed()
    sp = args.sp or info.world_size
    if sp != info.world_size or sp % args.ring:
        raise InputError(f"--sp {sp} --ring {args.ring} with {info.world_size} processes: evaluation runs one "
                         f"sample at a time on one SP group, so launch exactly --sp processes, --ring dividing it")
    layout = make_layout(sp=sp, ring=args.ring)
    if args.task in ("caption", "ask") and not args.video:
        raise InputError(f"{args.task}: give --video (a file or a folder)")
    check_out(args.out, OUTPUTS[args.task])
    model, tokenizer, identity = load_model(args, info.device)
    name = checkpoint_name(args.model)
    common = dict(layout=layout, out_dir=args.out, identity=identity, overwrite=args.overwrite)
    if args.task == "niah":
        run_niah(model, tokenizer, args.haystacks, args.needles, args.depths, args.frame_counts, fps=args.fps,
                 vision_batch=args.vision_batch, title=name, progress=args.progress, **common)
    elif args.task == "mcq":
        run_mcq(model, tokenizer, args.questions, media_root=args.media_root, num_frames=args.num_frames,
                fps=args.fps, max_new_tokens=args.max_new_tokens, progress=args.progress, **common)
    elif args.task in ("caption", "ask"):
        run_caption(model, tokenizer, args.video, args.question, task=args.task, num_frames=args.num_frames,
                    fps=args.fps, max_new_tokens=args.max_new_tokens, stream=args.stream, **common)
    elif args.task == "passkey":
        filler = filler_sentences(args.filler_text) if args.filler_text else None
        run_passkey(model, tokenizer, args.lengths, args.depths, trials=args.trials, style=args.style,
                    filler=filler, seed=args.seed, title=name, progress=args.progress, **common)
    elif args.task == "ppl":
        run_ppl(model, tokenizer, args.text, args.seq_len, max_windows=args.max_windows, progress=args.progress,
                **common)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(argv=None):
    args = build_parser().parse_args(argv) if argv is not None else ARGS
    try:
        run(args)
    except InputError as e:  # a user's mistake (data.MediaError too): one line, argparse's exit code, no stack trace
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
