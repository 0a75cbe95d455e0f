"""Evaluate a LongVILA checkpoint: video needle in a haystack, multiple-choice video QA, captioning / ask, text
passkey retrieval and perplexity - on one process or under torchrun with multi-modal sequence parallelism.

    M=runs/demo/stage5/model D=data/demo/eval          # the CPU demo's model and held-out data (train.py)
    python evaluate.py niah    --model $M --haystacks $D/niah/haystack --needles $D/niah/needles --out out/niah
    python evaluate.py mcq     --model $M --questions $D/mcq/mcq.json --num_frames 8 --out out/mcq
    python evaluate.py caption --model $M --video $D/caption/videos --num_frames 32   # a file or folder; streams
    python evaluate.py ask     --model $M --video $D/caption/videos/cap_000.mp4 --question "Describe the video."
    python evaluate.py passkey --model $M --lengths 256,512,1024 --style demo --out out/passkey
    python evaluate.py ppl     --model $M --text $D/stage4_val.txt --seq_len 1024
    # contexts one device cannot hold: the same commands under torchrun with a sequence-parallel layout
    torchrun --nproc_per_node 8 evaluate.py niah --model CKPT --sp 8 --ring 2 --frame_counts 256,512,1024 ...
    # timing without weights: a random model of a preset, random frames (the 2-GPU, 1024-frame run)
    torchrun --nproc_per_node 2 evaluate.py ask --random_init longvila-8b --random_frames 1024 --sp 2 --timing

What each task measures (LongVILA, arXiv 2408.10188, section 5 of shared/LONGVILA.md):
- niah: one needle image (with a question and a short answer) is inserted as one frame into a haystack of N video
  frames at depth d, for a grid of depths x frame counts. Score = exact match of the TEACHER-FORCED answer: one
  forward over prompt + answer, argmax at the answer positions, decoded, compared to the answer after lower-casing
  and removing spaces (the reference scores this way, so the model is never asked to stop generating). The vision
  features of each haystack and of each needle are computed once; every cell of the grid only splices embeddings.
  Writes results.json (resumable) and heatmap.png, prints the mean.
- mcq: VideoMME-style multiple choice with the reference prompt, first standalone A-D letter of the reply,
  accuracy overall and by duration, one JSON row per question (resumable).
- caption / ask: free greedy generation, streamed to the terminal token by token.
- passkey: the classic text passkey test (a 5-digit key hidden in filler text) over context lengths x depths,
  teacher-forced exact match, heatmap; it checks stage 4's RoPE extension.
- ppl: perplexity of a text file in windows of --seq_len tokens.

Under torchrun every rank runs the same loop on the same sample (MM-SP: an SP group acts as one device); rank 0
alone prints and writes files.
"""
import argparse
import functools
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from data import FILLER, Progress, Tokenizer, VideoFile, build_conversation, load_image, mcq_prompt, preprocess, read_video
from longvila import IGNORE_INDEX, IMAGE_TOKEN_ID, PRESETS, LongVILA
from mmsp import (attention_hook, encode_frames_sharded, init_distributed, layout_indices, make_layout,
                  padded_length, sp_forward, sp_generate, token_owner)

# -----------------------------------------------------------------------------
# prompts (the reference's wording)

NIAH_PREAMBLE = ""  # the reference puts only the chat template's system prompt before the frames
# mcq: data.mcq_prompt (the same text the stage-3 data trains on): "Select the best answer to the following
# multiple-choice question based on the video. Respond with only the letter (A, B, C, or D) of the correct
# option.\n{question}\n{options, one per line}\nThe best answer is:"
CAPTION_PROMPT = "Elaborate on the visual and narrative elements of the video in detail."
# The landmark-attention / LongLoRA passkey prompt: a task statement, filler, the key, filler, the question.
PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

# -----------------------------------------------------------------------------
# scoring: pure functions on strings and token ids


def normalize_answer(text: str) -> str:
    """The reference's answer normalisation: lower-case and drop every whitespace character."""
    return re.sub(r"\s+", "", text.lower())


def answer_correct(pred_ids, answer_ids, decode) -> bool:
    """Teacher-forced exact match: the argmax tokens at the answer positions spell the answer.

    Equal ids are correct; otherwise the decoded texts are compared after `normalize_answer` (so "Red" vs
    " red" tokenisations, or a split into different sub-words, count as the same answer, as in the reference).
    """
    pred_ids, answer_ids = [int(i) for i in pred_ids], [int(i) for i in answer_ids]
    if pred_ids == answer_ids:
        return True
    return normalize_answer(decode(pred_ids)) == normalize_answer(decode(answer_ids))


# Rules of `extract_choice`, in order (the first that matches wins):
#  1. an explicit statement: "answer is (B)", "answer: B", "best answer is B.", "correct option is c.", "option (C)
#     is correct" -> that letter. After the keyword a lower-case letter counts only when bracketed or followed by
#     punctuation / the end ("the answer is a dog" is not 'A'), and a capital "A" followed by a lower-case word is
#     the article ("the answer is A man ...");
#  2. a reply that is only a letter, in either case, with optional brackets / punctuation: "B", "(b)", "c." -> it;
#  3. the first standalone capital A-D: not inside a word, and not the article "A" (an "A" followed by a space and
#     a lower-case word, as in "A man walks", is skipped; "A." / "A)" / "(A)" / "A:" / final "A" count);
#  4. nothing -> None (scored wrong).
_CHOICE_EXPLICIT = re.compile(
    r"(?:answer|option|choice)\s*(?:is|would be|should be|:|=)?\s*(?:option|choice)?\s*[:\-]?\s*(\(|\[)?([A-Da-d])"
    r"(?![A-Za-z0-9])", re.IGNORECASE)
_CHOICE_ALONE = re.compile(r"^\W*([A-Da-d])\W*$")
_CHOICE_LETTER = re.compile(r"(?<![A-Za-z0-9'])([A-D])(?![A-Za-z0-9'])")


def _is_article(text: str, end: int) -> bool:
    """True when the capital 'A' ending at `end` is followed by a space and a lower-case word."""
    return re.match(r" [a-z]", text[end:end + 2]) is not None


def extract_choice(reply: str):
    """The answer letter ('A'..'D') of a multiple-choice reply, or None. Rules above."""
    text = reply.strip()
    for m in _CHOICE_EXPLICIT.finditer(text):
        letter, bracketed, end = m.group(2), m.group(1) is not None, m.end()
        followed_by_punct = re.match(r"\s*($|[)\].,:;!?])", text[end:]) is not None
        if letter.islower() and not (bracketed or followed_by_punct):
            continue
        if letter == "A" and not bracketed and _is_article(text, end):
            continue
        return letter.upper()
    m = _CHOICE_ALONE.match(text)
    if m:
        return m.group(1).upper()
    for m in _CHOICE_LETTER.finditer(text):
        if m.group(1) == "A" and _is_article(text, m.end()):
            continue
        return m.group(1)
    return None


def accuracy_by(records: list, key: str) -> dict:
    """{"overall": acc, key-value: acc ...} over records with a boolean "correct" (empty groups are absent)."""
    out = {"overall": sum(r["correct"] for r in records) / len(records) if records else float("nan")}
    groups = {}
    for r in records:
        groups.setdefault(str(r.get(key, "unknown")), []).append(bool(r["correct"]))
    for name in sorted(groups):
        out[name] = sum(groups[name]) / len(groups[name])
    return out


# -----------------------------------------------------------------------------
# the needle grid


def needle_index(depth: float, num_frames: int) -> int:
    """Where the needle goes: index round(depth * N) among the N + 1 frames (N haystack frames + the needle).

    As in the reference (LongVA / VILA eval_vision_niah: `int(depth * N)` haystack frames before the needle), the
    frame count N of the grid is the number of HAYSTACK frames; the prompt holds N + 1 frames. Depth 0 puts the
    needle first, depth 1 last (after all N haystack frames). We round instead of truncating so float depths such
    as 0.29 * 100 land where they should, and clip to [0, N] so a depth outside [0, 1] cannot index past the ends.
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    return int(min(max(round(depth * num_frames), 0), num_frames))


def insert_needle(haystack: torch.Tensor, needle: torch.Tensor, depth: float) -> torch.Tensor:
    """Splice one needle frame into a haystack of frame features (or pixels) at `needle_index(depth, F)`."""
    i = needle_index(depth, haystack.shape[0])
    return torch.cat([haystack[:i], needle.unsqueeze(0), haystack[i:]], dim=0)  # (F+1, ...)


# -----------------------------------------------------------------------------
# heatmap (pillow only): rows = depths, columns = frame counts (or context lengths), red -> yellow -> green

HEATMAP_STOPS = ((0.0, (240, 73, 110)), (0.5, (235, 184, 57)), (1.0, (154, 213, 179)))  # the reference's colours
HEATMAP_CELL = (72, 40)  # (width, height) of one cell in pixels
HEATMAP_MARGIN = dict(left=86, top=48, right=86, bottom=64)


def heatmap_color(score: float) -> tuple:
    """RGB of a score in [0, 1], piecewise-linear between HEATMAP_STOPS; NaN (missing cell) is light grey."""
    if score is None or not math.isfinite(score):
        return (220, 220, 220)
    s = min(max(float(score), 0.0), 1.0)
    for (s0, c0), (s1, c1) in zip(HEATMAP_STOPS[:-1], HEATMAP_STOPS[1:]):
        if s <= s1:
            t = (s - s0) / (s1 - s0)
            return tuple(int(round(a + t * (b - a))) for a, b in zip(c0, c1))
    return HEATMAP_STOPS[-1][1]


def heatmap_size(rows: int, cols: int) -> tuple:
    """(width, height) in pixels of the heatmap PNG for a rows x cols grid."""
    m = HEATMAP_MARGIN
    return (m["left"] + cols * HEATMAP_CELL[0] + m["right"], m["top"] + rows * HEATMAP_CELL[1] + m["bottom"])


def heatmap_cell_box(row: int, col: int) -> tuple:
    """(x0, y0, x1, y1) pixel box of grid cell (row, col), x1/y1 exclusive."""
    x0 = HEATMAP_MARGIN["left"] + col * HEATMAP_CELL[0]
    y0 = HEATMAP_MARGIN["top"] + row * HEATMAP_CELL[1]
    return (x0, y0, x0 + HEATMAP_CELL[0], y0 + HEATMAP_CELL[1])


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # FreeType DejaVu bundled with pillow >= 10.1
    except (TypeError, OSError):  # pragma: no cover - a pillow built without FreeType
        return ImageFont.load_default()


def short_number(x) -> str:
    """1400 -> '1.4K', 262144 -> '262K', 32 -> '32' (axis labels)."""
    x = float(x)
    if x >= 1e6:
        return f"{x / 1e6:.3g}M"
    if x >= 1e3:
        return f"{x / 1e3:.3g}K"
    return f"{x:g}"


def draw_heatmap(grid, row_labels, col_labels, path, title, xlabel="Number of frames", ylabel="Needle depth (%)"):
    """Write a heatmap PNG of `grid` (rows x cols of scores in [0, 1], NaN = not measured) with pillow.

    Each cell is filled with `heatmap_color(score)` (a 2 px white line to its right and below) with the score
    written in its centre; a colour bar on the right; the title (with the mean) on top. Cell boxes are
    `heatmap_cell_box(r, c)`.
    """
    grid = np.asarray(grid, dtype=np.float64)  # (rows, cols)
    rows, cols = grid.shape
    W, H = heatmap_size(rows, cols)
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    f_small, f_title = _font(12), _font(15)
    for r in range(rows):
        for c in range(cols):
            x0, y0, x1, y1 = heatmap_cell_box(r, c)
            d.rectangle([x0, y0, x1 - 3, y1 - 3], fill=heatmap_color(grid[r, c]))  # a 2 px white grid line
            if math.isfinite(grid[r, c]):
                d.text(((x0 + x1) / 2, (y0 + y1) / 2), f"{grid[r, c]:.2f}", fill=(30, 30, 30), font=f_small,
                       anchor="mm")
        d.text((HEATMAP_MARGIN["left"] - 6, (y0 + y1) / 2), str(row_labels[r]), fill=(0, 0, 0), font=f_small,
               anchor="rm")
    gy = HEATMAP_MARGIN["top"] + rows * HEATMAP_CELL[1]
    for c in range(cols):
        x0, _, x1, _ = heatmap_cell_box(0, c)
        d.text(((x0 + x1) / 2, gy + 6), str(col_labels[c]), fill=(0, 0, 0), font=f_small, anchor="mt")
    gx0, gx1 = HEATMAP_MARGIN["left"], HEATMAP_MARGIN["left"] + cols * HEATMAP_CELL[0]
    d.text(((gx0 + gx1) / 2, H - 8), xlabel, fill=(0, 0, 0), font=f_small, anchor="mb")
    d.text((6, HEATMAP_MARGIN["top"] - 8), ylabel, fill=(0, 0, 0), font=f_small, anchor="lb")
    d.text((W / 2, 8), title, fill=(0, 0, 0), font=f_title, anchor="mt")
    # colour bar: 1 at the top, 0 at the bottom
    bx0, by0, by1 = gx1 + 16, HEATMAP_MARGIN["top"], gy
    for y in range(by0, by1):
        d.line([bx0, y, bx0 + 14, y], fill=heatmap_color(1.0 - (y - by0) / max(by1 - by0 - 1, 1)))
    for v, y in ((1.0, by0), (0.5, (by0 + by1) / 2), (0.0, by1)):
        d.text((bx0 + 20, y), f"{v:.1f}", fill=(0, 0, 0), font=f_small, anchor="lm")
    img.save(path)
    return img


# -----------------------------------------------------------------------------
# results files that resume, and a progress bar


def load_results(path: str, header: dict) -> dict:
    """Open a results JSON for resuming: {"header": ..., "cells": {key: result}}; a fresh one if absent.

    `header` names what the results depend on (task, needles, prompt, ...); a file written with a different
    header would mix incomparable numbers, so it is an error (use another --out or delete the file).
    """
    if not os.path.exists(path):
        return {"header": header, "cells": {}}
    try:
        with open(path) as f:
            saved = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it or choose another --out") from e
    if not isinstance(saved, dict) or "cells" not in saved or "header" not in saved:
        raise ValueError(f"{path}: expected a results file with 'header' and 'cells' keys written by evaluate.py")
    if saved["header"] != header:
        diff = sorted(k for k in set(saved["header"]) | set(header) if saved["header"].get(k) != header.get(k))
        raise ValueError(f"{path}: was written for a different run (differs in {diff}); choose another --out or "
                         f"delete it to start over")
    return saved


def save_results(path: str, results: dict):
    """Write atomically (temporary file + rename), so an interrupted run never leaves half a JSON behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def open_results(path, header: dict, main: bool = True) -> dict:
    """`load_results` on rank 0 (a fresh dict without a path), broadcast to every rank: all ranks must then skip
    the same finished cells, since each remaining cell runs collectives."""
    results = load_results(path, header) if path and main else {"header": header, "cells": {}}
    if torch.distributed.is_initialized():
        box = [results]
        torch.distributed.broadcast_object_list(box, src=0)
        results = box[0]
    return results


# -----------------------------------------------------------------------------
# model plumbing: embeddings with precomputed visual features, teacher-forced argmax, single process or MM-SP


def is_main(layout) -> bool:
    """Rank 0 of the world prints and writes files (every rank computes)."""
    return layout is None or not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def model_dtype(model) -> torch.dtype:
    try:
        return next(model.parameters()).dtype
    except (StopIteration, AttributeError):
        return torch.float32


def barrier_sync(device):
    """Wait for the GPU's queued work (so wall-clock timings are real) and for the other ranks."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


@torch.no_grad()
def encode_frames(model, frames: torch.Tensor, layout=None, batch: int = 32) -> torch.Tensor:
    """Vision encoder + projector over many frames, in batches of `batch` frames: (F, 3, S, S) -> (F, N, C).

    Under MM-SP each rank of the SP group encodes one contiguous slice of ceil(F/sp) frames (padded with copies
    of the last frame) and the slices are all-gathered once, so a 1024-frame haystack costs each rank F/sp frames.
    """
    device, dtype = model_device(model), model_dtype(model)
    sp = layout.sp if layout is not None else 1
    F = frames.shape[0]
    if sp == 1:
        out = [model.encode_images(frames[i:i + batch].to(device, dtype)) for i in range(0, F, batch)]
        return torch.cat(out, dim=0)  # (F, N, C)
    per = -(-F // sp)  # frames per rank, rounded up
    pad = frames[-1:].expand(per * sp - F, *frames.shape[1:])  # (per*sp - F, 3, S, S) dummy frames, dropped below
    mine = torch.cat([frames, pad], dim=0)[layout.sp_rank * per:(layout.sp_rank + 1) * per]  # (per, 3, S, S)
    local = torch.cat([model.encode_images(mine[i:i + batch].to(device, dtype))
                       for i in range(0, per, batch)])  # (per, N, C)
    parts = [torch.empty_like(local) for _ in range(sp)]  # sp x (per, N, C)
    torch.distributed.all_gather(parts, local.contiguous(), group=layout.sp_group)
    return torch.cat(parts, dim=0)[:F]  # (sp*per, N, C) -> (F, N, C)


@torch.no_grad()
def embed_with_features(model, input_ids, features=None) -> torch.Tensor:
    """Token embeddings (1, T, C) with the IMAGE_TOKEN_ID slots filled, in order, by precomputed visual features.

    The same splice as LongVILA.embed, but the features come from `encode_frames` (computed once and reused
    across the cells of a grid) instead of from the pixels.
    """
    device = model_device(model)
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)  # (T,)
    slots = ids == IMAGE_TOKEN_ID  # (T,)
    h = model.llm.tok_embeddings(ids.clamp(min=0))  # (T, C); the -200 slots get a dummy row, overwritten below
    n = int(slots.sum())
    m = 0 if features is None else features.reshape(-1, features.shape[-1]).shape[0]  # (F, N, C) -> F*N rows
    if n != m:
        raise ValueError(f"the prompt has {n} visual-token slots but {m} visual feature rows were given")
    if n:
        h = h.clone()
        h[slots] = features.reshape(-1, features.shape[-1]).to(h.dtype)  # (F*N, C) rows in prompt order
    return h.unsqueeze(0)  # (1, T, C)


@torch.no_grad()
def teacher_forced_argmax(model, h: torch.Tensor, targets, layout=None) -> torch.Tensor:
    """Greedy predictions of the tokens AT positions `targets` of the embedded sequence h (1, T, C).

    Token t is predicted from the hidden state at t-1 (one causal forward over the whole sequence = teacher
    forcing). Single process: model.forward_embeds + the LM head on those |targets| rows only, so the (T, V)
    logits never exist. Under MM-SP: see `sp_teacher_forced_argmax`.
    """
    targets = torch.as_tensor(targets, dtype=torch.long)  # (A,)
    if layout is not None and layout.sp > 1:
        return sp_teacher_forced_argmax(model, h, targets, layout)
    T = h.shape[1]
    positions = torch.arange(T, device=h.device).unsqueeze(0)  # (1, T)
    hidden = model.forward_embeds(h, positions)  # (1, T, C) final-normed
    logits = model.llm.output(hidden[0, (targets - 1).to(h.device)])  # (A, V)
    return logits.argmax(dim=-1).cpu()  # (A,)


@torch.no_grad()
def sp_teacher_forced_argmax(model, h: torch.Tensor, targets: torch.Tensor, layout) -> torch.Tensor:
    """The MM-SP twin of `teacher_forced_argmax`: every rank of the SP group holds the same h (1, T, C).

    1. pad T to a multiple of 2*sp (zero rows at the end: causal attention never lets them touch real tokens);
    2. keep this rank's zigzag shard of rows and their TRUE positions (mmsp.layout_indices);
    3. run the LLM with the group's 2D (Ulysses x ring) attention hook;
    4. each needed row t-1 lives on exactly one rank (mmsp.token_owner): that rank applies the LM head to it, the
       others contribute 0, and one all-reduce (sum) over the SP group gives every rank all predictions.
    """
    T = h.shape[1]
    Tp = padded_length(T, layout.sp)
    h = torch.nn.functional.pad(h, (0, 0, 0, Tp - T))  # (1, Tp, C)
    idx = layout_indices(Tp, layout).to(h.device)  # (Tp/sp,) increasing true positions of my tokens
    hidden = model.forward_embeds(h[:, idx], idx.unsqueeze(0), attn=attention_hook(layout))  # (1, Tp/sp, C)
    need = (targets - 1).to(h.device)  # (A,) rows whose next-token prediction we want
    mine = (token_owner(Tp, layout).to(h.device)[need] == layout.sp_rank)  # (A,) bool
    pred = torch.zeros(need.shape[0], dtype=torch.long, device=h.device)  # (A,)
    if mine.any():
        rows = torch.searchsorted(idx, need[mine])  # positions of those rows inside my shard
        pred[mine] = model.llm.output(hidden[0, rows]).argmax(dim=-1)  # (A_mine, V) -> (A_mine,)
    torch.distributed.all_reduce(pred, group=layout.sp_group)  # (A,) every prediction from its owner
    return pred.cpu()


def answer_span(input_ids, labels, special_ids) -> tuple:
    """(positions, ids) of the answer tokens of a built conversation: supervised labels minus control tokens.

    build_conversation supervises the assistant's reply and its end-of-turn token(s); exact match is about the
    answer itself, so trailing control tokens (end of turn, end of text) are dropped, as the reference scores the
    bare answer ids.
    """
    pos = [t for t, y in enumerate(labels) if y != IGNORE_INDEX]
    while pos and labels[pos[-1]] in special_ids:
        pos.pop()
    if not pos:
        raise ValueError("the conversation has no supervised answer tokens")
    if pos[0] == 0:
        raise ValueError("an answer token at position 0 has nothing to be predicted from")
    return pos, [int(input_ids[t]) for t in pos]


# -----------------------------------------------------------------------------
# task: video needle in a haystack

DEFAULT_DEPTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def _frames_tensor(frames, image_size: int) -> torch.Tensor:
    """uint8 numpy (F, H, W, 3) -> preprocessed float (F, 3, S, S); float tensors pass through unchanged."""
    if isinstance(frames, torch.Tensor) and frames.is_floating_point():
        return frames
    return preprocess(np.asarray(frames), image_size)  # (F, 3, S, S)


def load_needles(needles) -> list:
    """Needles as [{"name", "image" (uint8 H,W,3 or float 3,S,S), "question", "answer"}].

    Accepts a needles.json path ([{"image": relative path, "question", "answer"}], paths relative to the JSON's
    folder), a folder holding needles.json, or a list of such dicts (images as paths or arrays).
    """
    root = None
    if isinstance(needles, (str, os.PathLike)):
        path = os.path.join(needles, "needles.json") if os.path.isdir(needles) else str(needles)
        if not os.path.exists(path):
            raise FileNotFoundError(f"needles: {path} does not exist (expected a needles.json or a folder with one)")
        with open(path) as f:
            needles = json.load(f)
        root = os.path.dirname(os.path.abspath(path))
        if not isinstance(needles, list) or not needles:
            raise ValueError(f"{path}: expected a non-empty JSON list of {{image, question, answer}}")
    out = []
    for i, n in enumerate(needles):
        missing = [k for k in ("image", "question", "answer") if k not in n]
        if missing:
            raise ValueError(f"needle {i}: missing {missing} (each needle needs image, question, answer)")
        img = n["image"]
        name = n.get("name", os.path.basename(img) if isinstance(img, str) else f"needle_{i}")
        if isinstance(img, str):
            img = load_image(img if root is None or os.path.isabs(img) else os.path.join(root, img))
        out.append({"name": name, "image": img, "question": n["question"], "answer": n["answer"]})
    return out


def list_videos(path) -> list:
    """A video file, a folder of videos (sorted), or a list of paths -> list of paths."""
    if isinstance(path, (list, tuple)):
        return [str(p) for p in path]
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.lower().endswith((".mp4", ".mkv", ".avi", ".mov", ".webm")))
        if not files:
            raise FileNotFoundError(f"{path}: no video files (.mp4 .mkv .avi .mov .webm) in this folder")
        return files
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such video file or folder")
    return [str(path)]


def read_haystack(path: str, fps: float, max_frames: int) -> np.ndarray:
    """The FIRST max_frames frames of a video sampled at `fps` (one every 1/fps seconds): uint8 (F, H, W, 3).
    Only those frames are decoded, so a long haystack video costs what the grid uses."""
    with VideoFile(path) as video:
        idx = video.indices(None, fps)[:max_frames]  # (F,) frame indices at t = 0, 1/fps, 2/fps, ...
        if len(idx) == 0:
            raise ValueError(f"haystack {path}: no frames at {fps} fps")
        return video.get(idx)  # (F, H, W, 3)


@torch.no_grad()
def run_niah(model, tokenizer, haystacks, needles, depths=DEFAULT_DEPTHS, frame_counts=(8, 16, 32), *,
             layout=None, out_dir=None, fps: float = 1.0, vision_batch: int = 32, title: str = "",
             progress: bool = True, log=print) -> dict:
    """Video needle in a haystack over a grid of depths x frame counts; returns the results dict.

    haystacks: a video file, a folder of videos, a list of paths, or a list of frame arrays / preprocessed
        tensors. Each haystack is read at `fps` frames per second and must hold max(frame_counts) frames; a cell's
        score averages over haystacks x needles.
    needles: see `load_needles`.
    For each haystack the vision features of its first max(frame_counts) frames are computed ONCE and each
    needle's once; a cell (N frames, depth d) then splices [haystack[:i], needle, haystack[i:N]] with
    i = needle_index(d, N) into the prompt "<video>\\n{question}" and scores the teacher-forced answer.
    With out_dir, results.json is written after every (haystack, frame count, depth) step and a rerun resumes
    from it; heatmap.png is drawn at the end. Returns {"header", "cells", "depths", "frame_counts", "grid"
    (depths x frame counts), "mean"}.
    """
    main = is_main(layout)
    say = log if main else (lambda *a, **k: None)
    cfg = model.config
    size, tpf = cfg.vision.image_size, cfg.tokens_per_frame
    depths, frame_counts = [float(d) for d in depths], sorted(int(n) for n in frame_counts)
    needles = load_needles(needles)
    if isinstance(haystacks, (str, os.PathLike)) or (isinstance(haystacks, (list, tuple)) and haystacks
                                                     and isinstance(haystacks[0], (str, os.PathLike))):
        paths = list_videos(haystacks)
        names = [os.path.basename(p) for p in paths]
        sources = paths
    else:
        names = [f"haystack_{i}" for i in range(len(haystacks))]
        sources = list(haystacks)
    header = {"task": "niah", "haystacks": names, "fps": fps,
              "needles": [[n["name"], n["question"], n["answer"]] for n in needles]}
    results_path = os.path.join(out_dir, "results.json") if out_dir else None
    results = open_results(results_path, header, main)
    cells = results["cells"]

    def key(h, n, d):
        return f"{names[h]}|frames={n}|depth={d:g}"

    needle_pixels = torch.cat([_frames_tensor(n["image"][None], size) for n in needles])  # (K, 3, S, S)
    needle_feats = encode_frames(model, needle_pixels, layout, vision_batch)  # (K, N, C): each needle once
    bar = Progress(len(sources) * len(frame_counts) * len(depths), "niah", enabled=progress and main)
    done = [v["correct"] for v in cells.values()]
    for h, src in enumerate(sources):
        todo = [(n, d) for n in frame_counts for d in depths if key(h, n, d) not in cells]
        bar.update(len(frame_counts) * len(depths) - len(todo))
        if not todo:
            continue
        frames = read_haystack(src, fps, frame_counts[-1]) if isinstance(src, str) else src  # (F, H, W, 3)
        if len(frames) < frame_counts[-1]:
            raise ValueError(f"haystack {names[h]}: {len(frames)} frames at {fps} fps, but the grid needs "
                             f"{frame_counts[-1]} (lower --frame_counts or use a longer video)")
        hay = encode_frames(model, _frames_tensor(frames[:frame_counts[-1]], size), layout, vision_batch)  # (F,N,C)
        for n in frame_counts:
            prompts = []
            for nd in needles:  # the token ids do not depend on the depth: every frame has the same pattern
                conv = [{"from": "human", "value": NIAH_PREAMBLE + "<video>\n" + nd["question"]},
                        {"from": "gpt", "value": nd["answer"]}]
                ids, labels = build_conversation(conv, tokenizer, [n + 1], tpf)
                pos, ans = answer_span(ids, labels, tokenizer.special_ids)
                prompts.append((ids[:pos[-1] + 1], pos, ans))
            for d in depths:
                if key(h, n, d) in cells:
                    continue
                correct, preds = [], []
                for k, (ids, pos, ans) in enumerate(prompts):
                    feats = insert_needle(hay[:n], needle_feats[k], d)  # (n+1, N, C)
                    emb = embed_with_features(model, ids, feats)  # (1, T, C)
                    pred = teacher_forced_argmax(model, emb, pos, layout).tolist()
                    correct.append(answer_correct(pred, ans, tokenizer.decode))
                    preds.append(tokenizer.decode(pred))
                cells[key(h, n, d)] = {"haystack": names[h], "frames": n, "depth": d,
                                       "needle_index": needle_index(d, n), "tokens": len(prompts[0][0]),
                                       "correct": correct, "predictions": preds}
                done.append(correct)
                if results_path and main:
                    save_results(results_path, results)
                bar.update(1, acc=float(np.mean([c for cs in done for c in cs])))
        del hay
    bar.close()
    grid = np.full((len(depths), len(frame_counts)), np.nan)  # (depths, frame counts)
    for i, d in enumerate(depths):
        for j, n in enumerate(frame_counts):
            scores = [c for h in range(len(sources)) for c in cells[key(h, n, d)]["correct"]]
            grid[i, j] = float(np.mean(scores))
    mean = float(np.nanmean(grid))
    results.update(depths=depths, frame_counts=frame_counts, grid=grid.tolist(), mean=mean)
    if out_dir and main:
        save_results(results_path, results)
        draw_heatmap(grid, [f"{100 * d:g}" for d in depths], [short_number(n) for n in frame_counts],
                     os.path.join(out_dir, "heatmap.png"),
                     f"Needle in a haystack{' - ' + title if title else ''}: mean {mean:.1%}")
    say(f"niah: mean accuracy {mean:.4f} over {len(depths)} depths x {len(frame_counts)} frame counts, "
        f"{len(sources)} haystacks x {len(needles)} needles")
    return results


# -----------------------------------------------------------------------------
# generation helpers: prompts with media, streaming to the terminal


def media_frames(path: str, num_frames=None, fps=None):
    """(uint8 frames (F, H, W, 3), placeholder) of a video file ("<video>") or an image file ("<image>")."""
    if path.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")):
        return load_image(path)[None], "<image>"  # (1, H, W, 3)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such video or image file")
    return read_video(path, num_frames=num_frames, fps=fps)[0], "<video>"


def prompt_ids(tokenizer, text: str, num_frames: int, tokens_per_frame: int) -> list:
    """Token ids of one user turn `text` (holding one <video>/<image> for num_frames frames) + the assistant header."""
    ids, _ = build_conversation([{"from": "human", "value": text}], tokenizer, [num_frames] if num_frames else [],
                                tokens_per_frame, add_generation_prompt=True)
    return ids


class StreamPrinter:
    """`stream` callback of LongVILA.generate: decodes the growing reply and prints only the new characters, so
    multi-byte and merged sub-word tokens appear correctly; records each token's wall-clock arrival time."""

    def __init__(self, tokenizer, enabled=True, out=None, stop_ids=()):
        self.tokenizer, self.enabled, self.out = tokenizer, enabled, out if out is not None else sys.stdout
        self.ids, self.times, self.shown, self.stop_ids = [], [], "", set(stop_ids)

    def __call__(self, token_id):
        self.times.append(time.perf_counter())
        token_id = int(token_id)
        if token_id in self.stop_ids:
            return
        self.ids.append(token_id)
        if self.enabled:
            text = self.tokenizer.decode(self.ids)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                self.out.write(text[len(self.shown):])
                self.out.flush()
                self.shown = text


@torch.no_grad()
def generate_reply(model, tokenizer, frames, text, layout=None, max_new_tokens=64, stream=None, stop_at_eos=True):
    """Greedy reply (str) to `text` about uint8 frames (F, H, W, 3) or preprocessed (F, 3, S, S) (or None),
    single process or MM-SP (the frames are sharded over the SP group inside mmsp.sp_generate)."""
    cfg = model.config
    images = None
    if frames is not None:
        images = [_frames_tensor(frames, cfg.vision.image_size).to(model_device(model), model_dtype(model))]
    ids = prompt_ids(tokenizer, text, 0 if frames is None else len(frames), cfg.tokens_per_frame)
    input_ids = torch.tensor([ids], device=model_device(model))  # (1, T)
    sp = layout if layout is not None and layout.sp > 1 else None
    eos = tokenizer.eos_id if stop_at_eos else None
    if sp is not None:  # the frames are sharded over the SP group inside
        new = sp_generate(model, input_ids, images, sp, max_new_tokens=max_new_tokens, eos_token_id=eos,
                          stream=stream)  # (1, T_new)
    else:
        new = model.generate(input_ids, images=images, max_new_tokens=max_new_tokens, eos_token_id=eos,
                             stream=stream)  # (1, T_new)
    out = [int(t) for t in new[0].tolist()]
    if tokenizer.eos_id in out:
        out = out[:out.index(tokenizer.eos_id)]
    return tokenizer.decode(out).strip()


# -----------------------------------------------------------------------------
# task: VideoMME-style multiple choice


def load_mcq(path: str) -> list:
    """Questions of a VideoMME-format JSON: [{"video", "question", "options" [4], "answer" letter, "duration"}]."""
    with open(path) as f:
        items = json.load(f)
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of questions")
    for i, q in enumerate(items):
        missing = [k for k in ("video", "question", "options", "answer") if k not in q]
        if missing:
            raise ValueError(f"{path}: question {i} lacks {missing} (VideoMME format: video, question, options, "
                             f"answer, duration)")
        if str(q["answer"]).strip().upper() not in "ABCD" or len(str(q["answer"]).strip()) != 1:
            raise ValueError(f"{path}: question {i} has answer {q['answer']!r}; expected one letter A-D")
    return items


@torch.no_grad()
def run_mcq(model, tokenizer, questions_path, *, media_root=None, num_frames=8, layout=None, out_dir=None,
            max_new_tokens=16, progress=True, log=print) -> dict:
    """Multiple-choice video QA: accuracy overall and by duration; per-question rows in out_dir/mcq.json."""
    main = is_main(layout)
    items = load_mcq(questions_path)
    root = media_root or os.path.dirname(os.path.abspath(questions_path))
    header = {"task": "mcq", "questions": os.path.basename(str(questions_path)), "num_frames": num_frames,
              "prompt": mcq_prompt("{question}", ["{options}"])}
    path = os.path.join(out_dir, "mcq.json") if out_dir else None
    results = open_results(path, header, main)
    rows = results["cells"]
    bar = Progress(len(items), "mcq", enabled=progress and main)
    for i, q in enumerate(items):
        qid = str(q.get("question_id", i))
        if qid in rows:
            bar.update(1)
            continue
        video = q["video"] if os.path.isabs(q["video"]) else os.path.join(root, q["video"])
        if not os.path.exists(video):
            raise FileNotFoundError(f"{questions_path}: question {qid}: video {video} not found (paths are relative "
                                    f"to --media_root, default the JSON's folder)")
        frames, tag = media_frames(video, num_frames=num_frames)
        text = f"{tag}\n" + mcq_prompt(q["question"], q["options"])
        reply = generate_reply(model, tokenizer, frames, text, layout, max_new_tokens)
        letter = extract_choice(reply)
        rows[qid] = {"id": qid, "video": q["video"], "duration": q.get("duration", "unknown"), "reply": reply,
                     "prediction": letter, "answer": str(q["answer"]).strip().upper(),
                     "correct": letter == str(q["answer"]).strip().upper()}
        if path and main:
            save_results(path, results)
        bar.update(1, acc=float(np.mean([r["correct"] for r in rows.values()])))
    bar.close()
    results["accuracy"] = accuracy_by(list(rows.values()), "duration")
    if path and main:
        save_results(path, results)
    acc = results["accuracy"]
    log_ = log if main else (lambda *a, **k: None)
    log_("mcq: accuracy " + " ".join(f"{k}={v:.4f}" for k, v in acc.items()) + f" ({len(rows)} questions)")
    return results


# -----------------------------------------------------------------------------
# task: captioning / asking about one video or a folder


@torch.no_grad()
def run_caption(model, tokenizer, videos, prompt=CAPTION_PROMPT, *, num_frames=None, fps=None, layout=None,
                out_dir=None, max_new_tokens=256, stream=True, out=None, log=print) -> dict:
    """Greedy replies to `prompt` for each video (a file, a folder or a list), streamed to the terminal."""
    main = is_main(layout)
    paths = list_videos(videos) if not (isinstance(videos, str) and videos.lower().endswith(
        (".png", ".jpg", ".jpeg", ".bmp", ".webp"))) else [videos]
    num_frames = num_frames if num_frames or fps else model.config.num_video_frames
    header = {"task": "caption", "prompt": prompt, "num_frames": num_frames, "fps": fps}
    path = os.path.join(out_dir, "captions.json") if out_dir else None
    results = open_results(path, header, main)
    out = out if out is not None else sys.stdout
    for p in paths:
        name = os.path.basename(p)
        if name in results["cells"]:
            continue
        frames, tag = media_frames(p, num_frames=num_frames, fps=fps)
        if main and stream:
            out.write(f"[{name}, {len(frames)} frames] ")
        printer = StreamPrinter(tokenizer, enabled=main and stream, out=out, stop_ids=[tokenizer.eos_id])
        reply = generate_reply(model, tokenizer, frames, f"{tag}\n{prompt}", layout, max_new_tokens, printer)
        if main and stream:
            out.write("\n")
        results["cells"][name] = {"video": p, "frames": len(frames), "reply": reply}
        if path and main:
            save_results(path, results)
    return results


# -----------------------------------------------------------------------------
# task: text passkey retrieval (checks stage 4's context extension)

# (task statement, filler sentences, needle, question). "demo" is the format of data.py's stage-4 documents
# (data._passkey_doc), so the tiny demo model is tested on the text it was trained on.
PASSKEY_STYLES = {
    "classic": (PASSKEY_TASK, [PASSKEY_FILLER], PASSKEY_NEEDLE, PASSKEY_QUESTION),
    "demo": ("There is a pass key hidden inside a lot of text.", list(FILLER),
             "The pass key is {key}. Remember it. {key} is the pass key.", "What is the pass key? The pass key is"),
}


def passkey_prompt(tokenizer, length: int, depth: float, key: str, style="classic", filler=None) -> tuple:
    """(input_ids, answer positions, answer ids) of a passkey document of about `length` tokens.

    The document is task + filler sentences + needle + filler + question, the needle after
    round(depth * n) of the n filler sentences that fit; the answer (the key) follows the question and is scored
    teacher-forced like the NIAH answers. `filler` (a list of sentences) overrides the style's filler.
    """
    task, fill, needle, question = PASSKEY_STYLES[style]
    fill = filler or fill
    bos = [tokenizer.bos_id] if getattr(tokenizer, "bos_id", None) is not None else []
    head = bos + (tokenizer.encode(task) if task else [])
    needle_ids = tokenizer.encode(" " + needle.format(key=key))
    tail = tokenizer.encode(" " + question)
    answer = tokenizer.encode(" " + key)
    fill_ids = [tokenizer.encode(" " + s) for s in fill]
    budget = length - len(head) - len(needle_ids) - len(tail) - len(answer)
    if budget < 0:
        raise ValueError(f"passkey: context length {length} is shorter than the task, needle and question "
                         f"({length - budget} tokens)")
    body, i = [], 0
    while True:  # whole filler sentences, cycled, until the budget is used
        nxt = fill_ids[i % len(fill_ids)]
        if sum(map(len, body)) + len(nxt) > budget:
            break
        body.append(nxt)
        i += 1
    at = needle_index(depth, len(body))
    ids = head + [t for s in body[:at] for t in s] + needle_ids + [t for s in body[at:] for t in s] + tail
    pos = list(range(len(ids), len(ids) + len(answer)))
    return ids + answer, pos, answer


@torch.no_grad()
def run_passkey(model, tokenizer, lengths, depths=DEFAULT_DEPTHS, *, trials=3, style="classic", filler=None,
                seed=0, layout=None, out_dir=None, progress=True, log=print) -> dict:
    """Passkey retrieval over context lengths x depths (`trials` random 5-digit keys per cell)."""
    main = is_main(layout)
    depths, lengths = [float(d) for d in depths], sorted(int(n) for n in lengths)
    header = {"task": "passkey", "style": style, "trials": trials, "seed": seed, "filler": bool(filler)}
    path = os.path.join(out_dir, "results.json") if out_dir else None
    results = open_results(path, header, main)
    cells = results["cells"]
    bar = Progress(len(lengths) * len(depths), "passkey", enabled=progress and main)
    for L in lengths:
        for d in depths:
            k = f"length={L}|depth={d:g}"
            if k in cells:
                bar.update(1)
                continue
            rng = np.random.default_rng([seed, L, int(round(d * 1000))])  # the same keys on every rank / rerun
            correct, preds = [], []
            for _ in range(trials):
                key = str(int(rng.integers(10000, 100000)))
                ids, pos, ans = passkey_prompt(tokenizer, L, d, key, style, filler)
                pred = teacher_forced_argmax(model, embed_with_features(model, ids), pos, layout).tolist()
                correct.append(answer_correct(pred, ans, tokenizer.decode))
                preds.append(tokenizer.decode(pred))
            cells[k] = {"length": L, "depth": d, "tokens": len(ids), "correct": correct, "predictions": preds}
            if path and main:
                save_results(path, results)
            bar.update(1, acc=float(np.mean([c for v in cells.values() for c in v["correct"]])))
    bar.close()
    grid = np.array([[np.mean(cells[f"length={L}|depth={d:g}"]["correct"]) for L in lengths] for d in depths])
    mean = float(grid.mean())
    results.update(depths=depths, lengths=lengths, grid=grid.tolist(), mean=mean)
    if out_dir and main:
        save_results(path, results)
        draw_heatmap(grid, [f"{100 * d:g}" for d in depths], [short_number(n) for n in lengths],
                     os.path.join(out_dir, "heatmap.png"), f"Passkey retrieval: mean {mean:.1%}",
                     xlabel="Context length (tokens)", ylabel="Passkey depth (%)")
    (log if main else (lambda *a, **k: None))(f"passkey: mean accuracy {mean:.4f}")
    return results


# -----------------------------------------------------------------------------
# task: perplexity of a text file


@torch.no_grad()
def run_ppl(model, tokenizer, text_path, seq_len, *, max_windows=None, layout=None, out_dir=None, progress=True,
            log=print) -> dict:
    """Perplexity = exp(mean next-token NLL) over consecutive, non-overlapping windows of seq_len tokens."""
    main = is_main(layout)
    if not os.path.exists(text_path):
        raise FileNotFoundError(f"ppl: text file {text_path} does not exist")
    with open(text_path, encoding="utf-8") as f:
        text = f.read()
    ids = tokenizer.encode(text)
    n = len(ids) // seq_len if max_windows is None else min(len(ids) // seq_len, max_windows)
    if n == 0:
        raise ValueError(f"ppl: {text_path} has {len(ids)} tokens, fewer than one window of --seq_len {seq_len}")
    device = model_device(model)
    sp = functools.partial(sp_forward, layout=layout) if layout is not None and layout.sp > 1 else None
    nll, count = 0.0, 0
    bar = Progress(n, "ppl", enabled=progress and main)
    for w in range(n):
        x = torch.tensor([ids[w * seq_len:(w + 1) * seq_len]], device=device)  # (1, L)
        _, loss = model(x, labels=x, return_logits=False, sp_forward=sp)  # mean over the L-1 shifted targets
        if sp is not None:  # under MM-SP each rank returns its share (its tokens' NLL / global count): sum them
            torch.distributed.all_reduce(loss, group=layout.sp_group)
        nll += float(loss) * (seq_len - 1)
        count += seq_len - 1
        bar.update(1, ppl=math.exp(nll / count))
    bar.close()
    results = {"task": "ppl", "text": text_path, "seq_len": seq_len, "windows": n, "tokens": count,
               "nll": nll / count, "ppl": math.exp(nll / count)}
    if out_dir and main:
        save_results(os.path.join(out_dir, "ppl.json"), results)
    (log if main else (lambda *a, **k: None))(f"ppl: {results['ppl']:.4f} (mean NLL {results['nll']:.4f} over "
                                              f"{count} tokens, {n} windows of {seq_len})")
    return results


# -----------------------------------------------------------------------------
# timing of one long-video question: vision, prefill (+ MFU), decode, memory

# dense bf16 peaks (NVIDIA datasheets), matched against torch.cuda.get_device_name in this order (specific first)
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "H800": 989.4,
                    "GH200": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1}


def _linear_weights(module) -> int:
    """Multiply-accumulates per token of a module's matmuls = the element count of its Linear / Conv2d weights."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))


def llm_forward_flops(model, T: int) -> float:
    """FLOPs of one causal LLM forward over T tokens (the prefill), LM head on one token:
    2 * (matmul weights of the blocks) * T                 (every weight is one multiply-add per token)
    + 2 * n_layers * n_heads * head_dim * T^2              (QK^T and PV: 2 matmuls x 2 FLOPs x T^2/2 causal pairs)
    + 2 * dim * vocab                                      (the last token's logits)."""
    c = model.config.llm
    head_dim = c.dim // c.n_heads
    return 2.0 * _linear_weights(model.llm.layers) * T + 2.0 * c.n_layers * c.n_heads * head_dim * T * T \
        + 2.0 * c.dim * c.vocab_size


def vision_flops(model, F: int) -> float:
    """FLOPs of encoding F frames (vision tower up to the feature layer + projector): one third of
    LongVILA.vision_flops_per_frame, the training figure (forward + backward = 3 x forward)."""
    return F * model.vision_flops_per_frame() / 3.0


def peak_tflops(device, override=None):
    """Dense bf16 peak of one accelerator (TFLOP/s) from its name, or None (no MFU) when unknown."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


@torch.no_grad()
def run_timing(model, tokenizer, frames, question, *, layout=None, max_new_tokens=32, peak=None, repeats=2,
               out_dir=None, log=print) -> dict:
    """Time one question about F frames: vision encoding, prefill (time to first token minus vision) with its
    MFU, decode tokens/s, peak memory (max over ranks). A short warm-up call first compiles the kernels; the
    measurement runs `repeats` times and the last run is reported (Triton may tune again at the long shape).

    The generate call encodes the frames again itself (mmsp.encode_frames_sharded: F/sp frames per rank, timed
    alone first), so prefill = time to first token - the vision time. Decoding never stops at EOS here, so
    exactly max_new_tokens tokens are timed."""
    main, device = is_main(layout), model_device(model)
    generate_reply(model, tokenizer, frames[:2], "<video>\n" + question, layout, 2, stop_at_eos=False)  # warm-up
    # preprocess and move the pixels before the clock starts: only model work is timed
    x = _frames_tensor(frames, model.config.vision.image_size).to(device, model_dtype(model))  # (F, 3, S, S)
    for _ in range(repeats):
        r = _time_once(model, tokenizer, x, question, layout, max_new_tokens, peak)
    if main:
        log(f"timing: {r['frames']} frames = {r['prompt_tokens']} tokens on {r['world']} x {r['device']} "
            f"(sp={r['sp']}, ring={r['ring']}, {r['dtype']})")
        log(f"  vision encoding  {r['vision_s']:8.3f} s   {r['vision_tflops_per_gpu']:7.1f} TFLOP/s per GPU"
            + (f"   MFU {r['vision_mfu']:.1%}" if r["peak_tflops"] else ""))
        log(f"  prefill          {r['prefill_s']:8.3f} s   {r['prefill_tflops_per_gpu']:7.1f} TFLOP/s per GPU"
            + (f"   MFU {r['prefill_mfu']:.1%}" if r["peak_tflops"] else "")
            + f"   (time to first token {r['time_to_first_token_s']:.3f} s)")
        log(f"  decode           {r['decode_tokens_per_s']:8.2f} tokens/s ({r['decode_tokens']} tokens)")
        log(f"  peak memory      {r['peak_memory_gib']:8.2f} GiB (max over ranks)")
        if out_dir:
            save_results(os.path.join(out_dir, "timing.json"), r)
    return r


def _time_once(model, tokenizer, x, question, layout, max_new_tokens, peak) -> dict:
    """One measured question (see run_timing); x: preprocessed frames (F, 3, S, S) on the model's device."""
    device = model_device(model)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    barrier_sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if layout is not None and layout.sp > 1:  # exactly the vision stage of sp_generate: F/sp frames per rank
        feats = encode_frames_sharded(model, [x], layout)[0]  # (F/sp * N, C)
    else:
        feats = model.encode_images(x)  # (F, N, C)
    barrier_sync(device)
    vision_s = time.perf_counter() - t0
    del feats
    printer = StreamPrinter(tokenizer, enabled=False)
    barrier_sync(device)
    t0 = time.perf_counter()
    generate_reply(model, tokenizer, x, "<video>\n" + question, layout, max_new_tokens, printer, stop_at_eos=False)
    barrier_sync(device)
    total_s = time.perf_counter() - t0
    T = len(prompt_ids(tokenizer, "<video>\n" + question, len(x), model.config.tokens_per_frame))
    ttft = printer.times[0] - t0
    prefill_s = max(ttft - vision_s, 1e-9)
    n_dec = len(printer.times) - 1
    decode_tps = n_dec / (printer.times[-1] - printer.times[0]) if n_dec > 0 else float("nan")
    mem = torch.tensor([torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0],  # (1,) bytes
                       dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(mem, op=torch.distributed.ReduceOp.MAX)
    peak = peak_tflops(device, peak)
    r = {"frames": len(x), "prompt_tokens": T, "world": world, "sp": layout.sp if layout else 1,
         "ring": layout.ring if layout else 1, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
         else "cpu", "dtype": str(model_dtype(model)).replace("torch.", ""), "vision_s": vision_s,
         "vision_tflops_per_gpu": vision_flops(model, len(x)) / vision_s / world / 1e12,
         "time_to_first_token_s": ttft, "prefill_s": prefill_s,
         "prefill_tflops_per_gpu": llm_forward_flops(model, T) / prefill_s / world / 1e12,
         "decode_tokens": n_dec, "decode_tokens_per_s": decode_tps, "total_s": total_s,
         "peak_memory_gib": float(mem.item()) / 2 ** 30, "peak_tflops": peak}
    if peak:
        r["vision_mfu"] = r["vision_tflops_per_gpu"] / peak
        r["prefill_mfu"] = r["prefill_tflops_per_gpu"] / peak
    return r


# -----------------------------------------------------------------------------
# loading and the command line


def parse_floats(text: str) -> list:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_ints(text: str) -> list:
    return [int(x) for x in text.split(",") if x.strip()]


def load_model(args, device):
    """(model, tokenizer): a checkpoint folder (ours or the released VILA layout), or a random model of a preset.

    --random_init builds the preset directly on the device in the requested dtype, seeded the same on every rank
    (an SP group must hold identical weights), with the tiny tokenizer (its ids fit any vocabulary): for timing."""
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.random_init:
        if args.random_init not in PRESETS:
            raise ValueError(f"--random_init {args.random_init!r}: expected one of {sorted(PRESETS)}")
        cfg = PRESETS[args.random_init]
        torch.manual_seed(args.seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = LongVILA(cfg)
        finally:
            torch.set_default_dtype(previous)
        tokenizer = Tokenizer.tiny(template=cfg.chat_template)
    else:
        if not args.model or not os.path.isdir(args.model):
            raise FileNotFoundError(f"--model {args.model!r}: expected a checkpoint folder (config.json, llm/, "
                                    f"vision_tower/, mm_projector/), or pass --random_init PRESET")
        model = LongVILA.from_pretrained(args.model, dtype=dtype, device=device)
        tokenizer = Tokenizer.for_checkpoint(args.model)
    return model.eval(), tokenizer


def random_frames(n: int, size: int, seed: int = 0):
    """n random uint8 frames (n, size, size, 3): a stand-in video for timing runs without data."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True)

    def common(s):
        g = s.add_argument_group("model and parallelism")
        g.add_argument("--model", default=None, help="checkpoint folder (VILA layout)")
        g.add_argument("--random_init", default=None, metavar="PRESET",
                       help="instead of --model: random weights of a longvila.PRESETS entry (timing)")
        g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto = bfloat16 on CUDA, float32 on CPU")
        g.add_argument("--sp", type=int, default=None, help="sequence-parallel degree (default: all processes)")
        g.add_argument("--ring", type=int, default=1, help="ring degree inside sp (ulysses = sp / ring)")
        g.add_argument("--vision_batch", type=int, default=32, help="frames per vision-encoder call")
        g.add_argument("--seed", type=int, default=0)
        g = s.add_argument_group("output")
        g.add_argument("--out", default=None, help="folder for results (resumes from what it holds)")
        g.add_argument("--no_progress", action="store_true", help="no progress bar")
        return s

    s = common(sub.add_parser("niah", help="video needle in a haystack (heatmap)"))
    s.add_argument("--haystacks", required=True, help="a long video, or a folder of videos, read at --fps")
    s.add_argument("--needles", required=True, help="needles.json ([{image, question, answer}]) or its folder")
    s.add_argument("--depths", type=parse_floats, default=list(DEFAULT_DEPTHS))
    s.add_argument("--frame_counts", type=parse_ints, default=[8, 16, 32], help="haystack frames per prompt")
    s.add_argument("--fps", type=float, default=1.0, help="haystack sampling rate (frames per second)")
    s = common(sub.add_parser("mcq", help="VideoMME-style multiple choice"))
    s.add_argument("--questions", required=True, help="JSON list of {video, question, options, answer, duration}")
    s.add_argument("--media_root", default=None, help="video paths are relative to this (default: the JSON's folder)")
    s.add_argument("--num_frames", type=int, default=8)
    s.add_argument("--max_new_tokens", type=int, default=16)
    for name, text in (("caption", "describe videos"), ("ask", "ask a question about a video")):
        s = common(sub.add_parser(name, help=text))
        s.add_argument("--video", default=None, help="a video or image file, or a folder of videos")
        if name == "caption":
            s.add_argument("--prompt", default=CAPTION_PROMPT)
        else:
            s.add_argument("--question", default="What happens in the video?")
        s.add_argument("--num_frames", type=int, default=None, help="uniform frames (default: the model's config)")
        s.add_argument("--fps", type=float, default=None, help="or frames per second")
        s.add_argument("--max_new_tokens", type=int, default=256 if name == "caption" else 64)
        s.add_argument("--no_stream", action="store_true", help="do not stream tokens to the terminal")
        g = s.add_argument_group("timing (no data needed)")
        g.add_argument("--random_frames", type=int, default=None, metavar="F",
                       help="use F random frames instead of --video")
        g.add_argument("--timing", action="store_true",
                       help="time vision / prefill (MFU) / decode / memory for one question instead")
        g.add_argument("--peak_tflops", type=float, default=None, help="per-GPU bf16 peak for MFU (default: by name)")
        g.add_argument("--repeats", type=int, default=2, help="timed runs; the last is reported")
    s = common(sub.add_parser("passkey", help="text passkey retrieval (heatmap)"))
    s.add_argument("--lengths", type=parse_ints, default=[1024, 2048, 4096], help="context lengths in tokens")
    s.add_argument("--depths", type=parse_floats, default=list(DEFAULT_DEPTHS))
    s.add_argument("--trials", type=int, default=3, help="random keys per cell")
    s.add_argument("--style", default="classic", choices=sorted(PASSKEY_STYLES))
    s.add_argument("--filler_text", default=None, help="take filler sentences from this text file instead")
    s = common(sub.add_parser("ppl", help="perplexity of a text file"))
    s.add_argument("--text", required=True)
    s.add_argument("--seq_len", type=int, default=4096)
    s.add_argument("--max_windows", type=int, default=None)
    return p


def filler_sentences(path: str) -> list:
    """Sentences of a text file (split at '.'), without those mentioning a pass key: a passkey filler."""
    with open(path, encoding="utf-8") as f:
        parts = [s.strip() for s in re.split(r"(?<=\.)\s+", f.read()) if s.strip()]
    out = [s for s in parts if "pass key" not in s.lower() and "passkey" not in s.lower()]
    if not out:
        raise ValueError(f"--filler_text {path}: no sentences without a pass key in it")
    return out


def main(argv=None):
    args = build_parser().parse_args(argv)
    info = init_distributed()
    sp = args.sp or info.world_size
    if sp != info.world_size:
        raise ValueError(f"--sp {sp} with {info.world_size} processes: evaluation runs one sample at a time on one "
                         f"SP group, so launch exactly --sp processes (or omit --sp)")
    layout = make_layout(sp=sp, ring=args.ring)
    model, tokenizer = load_model(args, info.device)
    progress = not args.no_progress
    if args.out and is_main(layout):
        os.makedirs(args.out, exist_ok=True)
        save_results(os.path.join(args.out, "config.json"), vars(args))
    if args.task == "niah":
        run_niah(model, tokenizer, args.haystacks, args.needles, args.depths, args.frame_counts, layout=layout,
                 out_dir=args.out, fps=args.fps, vision_batch=args.vision_batch, progress=progress,
                 title=os.path.basename(os.path.normpath(args.model or args.random_init)))
    elif args.task == "mcq":
        run_mcq(model, tokenizer, args.questions, media_root=args.media_root, num_frames=args.num_frames,
                layout=layout, out_dir=args.out, max_new_tokens=args.max_new_tokens, progress=progress)
    elif args.task in ("caption", "ask"):
        prompt = args.prompt if args.task == "caption" else args.question
        if not args.video and not args.random_frames:
            raise ValueError(f"{args.task}: give --video (a file or folder) or --random_frames F")
        if args.random_frames or args.timing:
            n = args.random_frames or args.num_frames or model.config.num_video_frames
            frames = random_frames(n, model.config.vision.image_size, args.seed) if args.random_frames \
                else media_frames(args.video, num_frames=n, fps=args.fps)[0]
            if args.timing:
                run_timing(model, tokenizer, frames, prompt, layout=layout, max_new_tokens=args.max_new_tokens,
                           peak=args.peak_tflops, repeats=args.repeats, out_dir=args.out)
            else:
                printer = StreamPrinter(tokenizer, enabled=is_main(layout) and not args.no_stream,
                                        stop_ids=[tokenizer.eos_id])
                reply = generate_reply(model, tokenizer, frames, "<video>\n" + prompt, layout,
                                       args.max_new_tokens, printer)
                if is_main(layout):
                    print("" if not args.no_stream else reply)
        else:
            run_caption(model, tokenizer, args.video, prompt, num_frames=args.num_frames, fps=args.fps,
                        layout=layout, out_dir=args.out, max_new_tokens=args.max_new_tokens,
                        stream=not args.no_stream)
    elif args.task == "passkey":
        filler = filler_sentences(args.filler_text) if args.filler_text else None
        run_passkey(model, tokenizer, args.lengths, args.depths, trials=args.trials, style=args.style,
                    filler=filler, seed=args.seed, layout=layout, out_dir=args.out, progress=progress)
    elif args.task == "ppl":
        run_ppl(model, tokenizer, args.text, args.seq_len, max_windows=args.max_windows, layout=layout,
                out_dir=args.out, progress=progress)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
