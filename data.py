"""data.py: from files on disk to (input_ids, labels, images) batches, built token for token as LongVILA's
reference code (NVlabs/VILA, the LongVILA branch; Qwen2's ChatML from main) builds them.

    python data.py demo --out data/demo          # the synthetic data of the CPU demo (a few seconds)
    python -m pytest -q tests/test_data.py

Sections, in order:
  1. Frames: which frames of a video (uniform, or the reference's rule at a frame rate); decoding only those.
  2. Images: SigLIP preprocessing (bicubic resize, mean 0.5, std 0.5), the `resize` or `pad` aspect.
  3. Tokenizer: a checkpoint's tokenizer.json (Llama-3, Qwen2) or the tiny one of the demo and the tests.
  4. Chat templates: one conversation -> (input_ids, labels) with Llama-3 or ChatML; the V-NIAH prompt.
  5. Datasets per stage: LLaVA-style JSON mixtures (stages 1-3, 5), random windows of long text (stage 4).
  6. The SP-aware sampler: every rank of a sequence-parallel group reads the same sample.
  7. Collate: right padding.
  --- below: the machinery: the demo-data generator, the long-video instruction builder (paper section 4),
  the progress line, the command line (demo, longvideo_sft, tokenize).

A sample: {"id", "image": path | [paths] or "video": path, "conversations": [{"from": "human" | "gpt", "value"}]},
media paths relative to the JSON file's folder; an item: {"id", "input_ids" (T,), "labels" (T,), "images"}.
"""
import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from fractions import Fraction

# -----------------------------------------------------------------------------
# Config: the demo's sizes and the command line (no torch up here, so --help answers at once)


@dataclass
class DemoConfig:
    """How much `python data.py demo` writes (the generator is below the marked line)."""
    seed: int = 0
    images: int = 1200  # stage 1 and 2 stills
    short_videos: int = 400  # stage 2 captions + stage 3 QA
    long_videos: int = 120  # stage 5
    passkey_docs: int = 400  # stage 4
    needle_fraction: float = 0.35  # of short videos that carry one needle frame
    val_images: int = 32
    val_short_videos: int = 32
    val_long_videos: int = 16
    haystacks: int = 4
    mcq: int = 64
    caption_videos: int = 16
    val_passkey_docs: int = 32
    niah_haystacks: int = 24  # stage 5's needle-in-a-haystack samples: needle-free training haystacks, ...
    niah_needles: int = 64  # ... needle images (every colour, random shapes) ...
    niah_samples: int = 480  # ... and (haystack, needle, frame count, depth) records, built like evaluate.py niah's
    niah_min_frames: int = 4  # haystack frames per sample, drawn uniformly from [min, max]
    niah_max_frames: int = 48


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="data.py", description="LongVILA data builders")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="synthetic data for the CPU demo of all five stages")
    d.add_argument("--out", default="data/demo", help="a new or empty folder (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--tokenizer_cache", default=None, help="where the tiny tokenizer is cached (~/.cache/longvila)")
    for f in ("images", "short_videos", "long_videos", "passkey_docs"):
        d.add_argument(f"--{f}", type=int, default=getattr(DemoConfig, f), help="default: %(default)s")
    s = sub.add_parser("longvideo_sft", help="long-video QA data from segment captions (paper section 4)")
    s.add_argument("--videos", required=True, help="a folder of videos or a text file with one path per line")
    s.add_argument("--captioner", required=True, help="LongVILA checkpoint that captions each segment")
    s.add_argument("--llm", required=True, help="LongVILA checkpoint used text-only to write QA pairs")
    s.add_argument("--out", required=True, help="output LLaVA-style JSON")
    s.add_argument("--segment_s", type=float, default=10.0, help="seconds per captioned segment")
    s.add_argument("--frames_per_segment", type=int, default=8)
    s.add_argument("--pairs_per_category", type=int, default=2)
    s.add_argument("--work_dir", default=None, help="per-video done-files (default: OUT.parts)")
    s.add_argument("--max_new_tokens", type=int, default=256)
    s.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    t = sub.add_parser("tokenize", help="pre-tokenise .txt / .jsonl into a uint32 .bin for stage 4")
    t.add_argument("--text", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--tokenizer", default=None, help="tokenizer.json or checkpoint folder (default: the tiny one)")
    return p


if __name__ == "__main__":  # --help and flag mistakes answer before torch loads (2 s)
    ARGS = build_parser().parse_args()

import numpy as np  # noqa: E402  (the rest of the file needs numpy and torch)
import torch  # noqa: E402
import torch.nn.functional as F_nn  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

import mmsp  # noqa: E402
from longvila import CHAT_TEMPLATES, IGNORE_INDEX, IMAGE_TOKEN_ID, InputError, LongVILA  # noqa: E402


class MediaError(InputError):
    """A video or image that cannot be read; the message names the file and what went wrong."""


# -----------------------------------------------------------------------------
# 1. Frames: which frames to read (the reference's rules), and decoding only those (decord first, PyAV fallback)

def uniform_indices(total: int, num_frames: int) -> np.ndarray:
    """num_frames indices over [0, total - 1], ends included: the reference's np.linspace(0, total - 1, F, dtype=int).
    A video with fewer frames than asked gives all of its frames (frames are never invented)."""
    if num_frames >= total:
        return np.arange(max(total, 0), dtype=np.int64)  # (total,)
    return np.linspace(0, total - 1, num_frames, dtype=int).astype(np.int64)  # (F,)


def fps_indices(total: int, video_fps: float, fps: float, num_frames: int) -> np.ndarray:
    """The reference's get_frame_from_vcap_with_fps (max_fps = fps): num_frames uniform frames from a video of at
    least num_frames / fps seconds, else int(duration * fps) frames spread the same way (at least 2, or none)."""
    duration = total / video_fps  # seconds
    if duration >= num_frames / fps:
        return uniform_indices(total, num_frames)
    n = int(duration * fps)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, total - 1, max(n, 2), dtype=int)).astype(np.int64)  # (F,): each frame read once


def stride_indices(total: int, video_fps: float, fps: float) -> np.ndarray:
    """Every round(video_fps / fps)-th frame from frame 0: the V-NIAH haystack reader's range(0, len, round(fps))."""
    return np.arange(0, total, max(1, round(video_fps / fps)), dtype=np.int64)  # (ceil(total / stride),)


class _SeekingReader:
    """The decode plan both readers share: wanted frames in sorted order, a seek to the last key frame <= the next
    one only when it lies past the decode position or the frame lies behind it; the position persists across calls."""

    keys: np.ndarray  # (k,) key-frame indices, keys[0] == 0
    pos = -1  # index of the last frame decoded

    def get(self, indices: np.ndarray) -> np.ndarray:
        got = {}
        for target in np.unique(indices):
            kf = int(self.keys[np.searchsorted(self.keys, target, side="right") - 1])  # last key frame <= target
            if target <= self.pos or kf > self.pos:
                self.seek(kf)  # sets pos = kf - 1
            got[int(target)] = self.decode_to(int(target))  # (H, W, 3) uint8
        return np.stack([got[int(i)] for i in indices])  # (F, H, W, 3)


class _DecordReader(_SeekingReader):
    """decord.VideoReader, not its get_batch (a seek back to a key frame per call); skip_frames skips the RGB step."""

    def __init__(self, path: str, threads: int = 0):
        import decord  # optional dependency: ImportError sends us to PyAV

        self.vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)  # 0: decord picks
        self.num_frames = len(self.vr)
        self.fps = float(self.vr.get_avg_fps())
        if self.num_frames <= 0:
            raise MediaError(f"{path}: decord found no video frames")
        self.keys = np.asarray(self.vr.get_key_indices(), dtype=np.int64)  # (k,)

    def get(self, indices: np.ndarray) -> np.ndarray:
        if len(self.keys) == 0 or self.keys[0] != 0:  # no usable key-frame index: let decord plan it
            return self.vr.get_batch(list(map(int, indices))).asnumpy()  # (F, H, W, 3) uint8
        return super().get(indices)

    def seek(self, kf: int):
        self.vr.seek(kf)
        self.pos = kf - 1

    def decode_to(self, target: int) -> np.ndarray:
        if target - self.pos > 1:
            self.vr.skip_frames(target - self.pos - 1)
        frame = self.vr.next().asnumpy()  # (H, W, 3) uint8
        self.pos = target
        return frame

    def timestamps(self, indices: np.ndarray) -> np.ndarray:
        return self.vr.get_frame_timestamp(list(map(int, indices)))[:, 0].astype(np.float64)  # (F,) start s

    def close(self):
        self.vr = None


class _PyAVReader(_SeekingReader):
    """PyAV. On open it demuxes the packets once (no decoding: cheap) to learn every frame's pts and the key frames;
    frame i is the i-th smallest pts (exact even at a variable frame rate). Only wanted frames are converted to RGB."""

    def __init__(self, path: str, threads: int = 0):
        import av

        self.path = path
        self.container = av.open(path)
        if not self.container.streams.video:
            raise MediaError(f"{path}: no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"  # frame + slice threads
        self.stream.codec_context.thread_count = threads  # 0: one per core (ffmpeg's default)
        pts, key = [], []
        for packet in self.container.demux(self.stream):
            if packet.pts is None or packet.size == 0:
                continue
            pts.append(packet.pts)
            key.append(bool(packet.is_keyframe))
        if not pts:
            raise MediaError(f"{path}: no decodable video packets")
        order = np.argsort(pts, kind="stable")
        self.pts = np.asarray(pts, dtype=np.int64)[order]  # (n,) presentation order
        is_key = np.asarray(key, dtype=bool)[order]  # (n,)
        is_key[0] = True  # decoding always starts somewhere
        self.keys = np.flatnonzero(is_key)  # (k,)
        self.pts_to_index = {int(p): i for i, p in enumerate(self.pts)}
        self.num_frames = len(self.pts)
        tb = float(self.stream.time_base)
        start = self.pts[0]
        rate = self.stream.average_rate or self.stream.guessed_rate
        if rate:
            self.fps = float(rate)
        else:
            span = (self.pts[-1] - start) * tb
            self.fps = (self.num_frames - 1) / span if span > 0 else 1.0
        self.time = (self.pts - start) * tb  # (n,) seconds

    def seek(self, kf: int):
        self.container.seek(int(self.pts[kf]), stream=self.stream, backward=True)
        self.frames, self.pos = self.container.decode(self.stream), kf - 1

    def decode_to(self, target: int) -> np.ndarray:
        for frame in self.frames:
            idx = self.pts_to_index.get(int(frame.pts)) if frame.pts is not None else None
            self.pos = idx if idx is not None else self.pos + 1
            if self.pos >= target:
                return frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8
        self.pos = self.num_frames  # the decoder ran dry: the next call seeks
        raise MediaError(f"{self.path}: decoding stopped before frame {target} of {self.num_frames}"
                         " (truncated file?)")

    def timestamps(self, indices: np.ndarray) -> np.ndarray:
        return self.time[indices].astype(np.float64)

    def close(self):
        self.container.close()


class VideoFile:
    """An open video: .num_frames, .fps, .backend, .indices(num_frames, fps), .get(indices) -> (F, H, W, 3) uint8.
    backend None: decord, and PyAV when decord is missing or fails on the file; threads: decoder threads (0: the
    library's default)."""

    def __init__(self, path: str, backend: str | None = None, threads: int = 0):
        if not os.path.isfile(path):
            raise MediaError(f"{path}: video file not found")
        if os.path.getsize(path) == 0:
            raise MediaError(f"{path}: empty video file (0 bytes)")
        self.path, self.threads = path, threads
        errors = []
        for name in ([backend] if backend else ["decord", "pyav"]):
            try:
                self.reader = _DecordReader(path, threads) if name == "decord" else _PyAVReader(path, threads)
                self.backend = name
                break
            except Exception as e:  # noqa: BLE001 - any reader failure means: try the next one, then report all
                errors.append(f"{name}: {type(e).__name__}: {e}")
        else:
            raise MediaError(f"{path}: cannot open video ({'; '.join(errors)})")
        self.num_frames, self.fps = self.reader.num_frames, self.reader.fps

    def indices(self, num_frames: int | None = None, fps: float | None = None) -> np.ndarray:
        """Which frames to read: num_frames uniform; with fps as well, the reference's rule at that rate; fps alone,
        one frame every round(video fps / fps) frames (V-NIAH haystacks); neither, every frame."""
        if num_frames is not None and num_frames < 1:
            raise InputError(f"{self.path}: num_frames must be >= 1, got {num_frames}")
        if fps is not None and fps < 0:
            raise InputError(f"{self.path}: fps must be > 0 (or 0 / None: uniform), got {fps}")
        if fps and num_frames:
            idx = fps_indices(self.num_frames, self.fps, fps, num_frames)
        elif fps:
            idx = stride_indices(self.num_frames, self.fps, fps)
        else:
            idx = uniform_indices(self.num_frames, num_frames or self.num_frames)
        if len(idx) == 0:
            raise MediaError(f"{self.path}: {self.num_frames / self.fps:.2f} s is too short for one frame at {fps} fps")
        return idx

    def get(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        try:
            frames = self.reader.get(indices)  # (F, H, W, 3)
        except MediaError:
            raise
        except Exception as e:  # noqa: BLE001
            if self.backend != "decord":
                raise MediaError(f"{self.path}: cannot decode frames ({type(e).__name__}: {e})") from e
            try:  # decord opened the file but fails to decode it: PyAV gets a try
                self.reader.close()
                self.reader, self.backend = _PyAVReader(self.path, self.threads), "pyav"
                frames = self.reader.get(indices)
            except Exception as e2:  # noqa: BLE001
                raise MediaError(f"{self.path}: cannot decode frames ({type(e).__name__}: {e}; "
                                 f"pyav: {type(e2).__name__}: {e2})") from e2
        if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) != len(indices):
            raise MediaError(f"{self.path}: decoder returned {frames.shape}, expected ({len(indices)}, H, W, 3)")
        return frames

    def timestamps(self, indices) -> np.ndarray:
        return self.reader.timestamps(np.asarray(indices, dtype=np.int64))

    def close(self):
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_video(path: str, num_frames: int | None = None, fps: float | None = None, backend: str | None = None):
    """The frames VideoFile.indices(num_frames, fps) picks -> (uint8 (F, H, W, 3), indices (F,), timestamps_s (F,))."""
    with VideoFile(path, backend) as video:
        idx = video.indices(num_frames, fps)  # (F,)
        return video.get(idx), idx, video.timestamps(idx)


# -----------------------------------------------------------------------------
# 2. Images: SigLIP preprocessing (bicubic resize to S x S, rescale 1/255, normalise mean 0.5 std 0.5)

PAD_COLOR = 127  # `pad` fills with the processor's mean colour, int(0.5 * 255) for SigLIP (the reference's rule)


def load_image(path: str) -> np.ndarray:
    """An RGB image as uint8 (H, W, 3) (jpg/png/webp/... through pillow; alpha dropped, grayscale expanded)."""
    if not os.path.isfile(path):
        raise MediaError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()  # (H, W, 3)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise MediaError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def expand_to_square(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> (F, L, L, 3), L = max(H, W): each frame centred on PAD_COLOR, as expand2square does."""
    n, h, w, _ = frames.shape
    side = max(h, w)
    if h == w:
        return frames
    out = torch.full((n, side, side, 3), PAD_COLOR, dtype=torch.uint8)  # (F, L, L, 3)
    top, left = (side - h) // 2, (side - w) // 2
    out[:, top:top + h, left:left + w] = frames
    return out


def preprocess(frames: np.ndarray | torch.Tensor, image_size: int, aspect: str = "resize") -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float32 (F, 3, S, S) in [-1, 1]: SigLIP's processor (PIL bicubic, /255, mean 0.5
    std 0.5), batched; aspect "pad" expands to a square first. torch's antialiased uint8 bicubic is PIL's (within one
    grey level) unless one side grows while the other shrinks (PIL orders the passes otherwise): then, in float."""
    x = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"preprocess expects uint8 frames (F, H, W, 3), got {tuple(x.shape)} {x.dtype}")
    if aspect == "pad":
        x = expand_to_square(x)  # (F, L, L, 3)
    elif aspect != "resize":
        raise InputError(f"image_aspect_ratio must be 'resize' or 'pad', got {aspect!r}")
    x = x.permute(0, 3, 1, 2)  # (F, 3, H, W) uint8, channels-last in memory (the layout the fast kernel wants)
    h, w = x.shape[-2:]
    if (h, w) != (image_size, image_size):
        if (h >= image_size) == (w >= image_size):  # both sides shrink (video frames) or both grow
            x = F_nn.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True)  # (F, 3, S, S)
        else:
            x = F_nn.interpolate(x.float(), size=(image_size, image_size), mode="bicubic", antialias=True)
            x = x.clamp_(0.0, 255.0)  # bicubic overshoots; PIL clips to the uint8 range too
    return x.float().mul_(2.0 / 255.0).sub_(1.0).contiguous()  # (x/255 - 0.5) / 0.5 -> (F, 3, S, S) float32


def video_pixels(video: "VideoFile", indices: np.ndarray, image_size: int, chunk: int = 64, threads: int = 1,
                 aspect: str = "resize") -> torch.Tensor:
    """Decode + preprocess the frames at `indices`, `chunk` at a time -> (F, 3, S, S). threads > 1: `threads` runs
    of frames, each read from a key frame by its own reader in its own thread, so the pixels equal one thread's."""
    indices = np.asarray(indices, dtype=np.int64)
    out = torch.empty(len(indices), 3, image_size, image_size)  # (F, 3, S, S)
    if threads <= 1 or len(indices) < 2 * threads:
        for s in range(0, len(indices), chunk):
            out[s:s + chunk] = preprocess(video.get(indices[s:s + chunk]), image_size, aspect)  # (chunk, 3, S, S)
        return out
    runs = np.array_split(np.argsort(indices, kind="stable"), threads)  # positions into indices, by frame number

    def decode(run: np.ndarray):
        with VideoFile(video.path, video.backend, threads=1) as v:  # readers are not thread-safe: one each
            for s in range(0, len(run), chunk):
                pos = torch.from_numpy(run[s:s + chunk])  # (c,) positions in the output
                out[pos] = preprocess(v.get(indices[run[s:s + chunk]]), image_size, aspect)  # (c, 3, S, S)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode, runs))  # list(): re-raise a failed run's exception here
    return out


def load_video(path: str, image_size: int, num_frames: int | None = None, fps: float | None = None,
               chunk: int = 64, backend: str | None = None):
    """read_video + preprocess in chunks. -> (pixels float32 (F, 3, S, S), frame_indices (F,), timestamps_s (F,))."""
    with VideoFile(path, backend) as video:
        idx = video.indices(num_frames, fps)  # (F,)
        return video_pixels(video, idx, image_size, chunk), idx, video.timestamps(idx)


# -----------------------------------------------------------------------------
# 3. Tokenizer: a checkpoint's tokenizer.json (Llama-3 / Qwen2), or the tiny one built here for the demo and tests

# The special tokens of the two templates; the tiny tokenizer carries both sets (and a pad), so its ids serve either.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
TINY_SPECIALS = ["<|pad|>"] + LLAMA3_SPECIALS + CHATML_SPECIALS


def build_tiny_tokenizer() -> HFTokenizer:
    """A byte-level BPE (like Llama-3's and Qwen2's): 256 byte tokens, so ANY text encodes, plus merges until every
    word of WORDS (with and without a leading space) is one token. Deterministic; it adds no BOS of its own."""
    # Llama-3's split pattern with single digits (a passkey is then one token per digit), then GPT-2 byte mapping
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [w for word in WORDS for w in (word, " " + word)] + ["\n\n", "\n", " \n"]
    trainer = trainers.BpeTrainer(vocab_size=1024, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=TINY_SPECIALS)
    tok.train_from_iterator(corpus, trainer)
    if tok.get_vocab_size() > 1024:
        raise RuntimeError(f"tiny tokenizer has {tok.get_vocab_size()} ids > 1024: shorten WORDS")
    return tok


class Tokenizer:
    """tokenizers.Tokenizer plus the ids a chat template needs. llama3: bos_id <|begin_of_text|>, eot_id <|eot_id|>
    (ends a turn), eod_id <|end_of_text|> (ends the last message and a stage-4 document); chatml: no BOS, <|im_end|>,
    <|endoftext|>. auto_bos_id: the BOS the tokenizer.json itself prepends (Llama-3's does). eos_id: the token after
    the final reply in training; stop_ids: generation stops on any of them (pass them as eos_token_id)."""

    def __init__(self, hf_tokenizer: HFTokenizer, template: str | None = None, source: str = "<memory>"):
        self.tk, self.source = hf_tokenizer, source
        vocab = self.tk.get_vocab(with_added_tokens=True)
        self.special_ids = {i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        first = self.tk.encode("a", add_special_tokens=True).ids[:1]  # before encode_special_tokens is set
        self.auto_bos_id = first[0] if first and first[0] in self.special_ids else None
        self.tk.encode_special_tokens = True  # special-token strings in text are NOT parsed as specials
        self.tk.no_padding()
        self.tk.no_truncation()
        if template is None:
            template = "llama3" if "<|start_header_id|>" in vocab else "chatml" if "<|im_start|>" in vocab else None
            if template is None:
                raise InputError(f"{source}: neither Llama-3 (<|start_header_id|>) nor ChatML (<|im_start|>) "
                                 "special tokens found; pass template= explicitly")
        if template not in ("llama3", "chatml"):
            raise InputError(f"{source}: template must be 'llama3' or 'chatml', got {template!r}")
        self.template = template
        missing = [t for t in (LLAMA3_SPECIALS if template == "llama3" else CHATML_SPECIALS[:2]) if t not in vocab]
        if missing:
            raise InputError(f"{source}: template {template!r} needs special tokens {missing}, not in the vocab")
        tid = vocab.get
        if template == "llama3":
            self.bos_id, self.eot_id, self.eod_id = tid("<|begin_of_text|>"), tid("<|eot_id|>"), tid("<|end_of_text|>")
            self.header_ids = (tid("<|start_header_id|>"), tid("<|end_header_id|>"))
            self.eos_id = self.eod_id  # sep2: the last message ends with <|end_of_text|>
        else:
            self.bos_id, self.eot_id, self.eod_id = None, tid("<|im_end|>"), tid("<|endoftext|>", tid("<|im_end|>"))
            self.im_start_id = tid("<|im_start|>")
            self.eos_id = self.eot_id
        self.stop_ids = sorted({self.eot_id, self.eod_id})
        self.pad_id = next((tid(t) for t in ("<|pad|>", "<|finetune_right_pad_id|>", "<|endoftext|>",
                                             "<|end_of_text|>") if t in vocab), self.eos_id)
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str, template: str | None = None) -> "Tokenizer":
        if not os.path.isfile(path):
            raise InputError(f"{path}: tokenizer.json not found")
        try:
            hf = HFTokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - the tokenizers library's parse errors name no file
            raise InputError(f"{path}: not a tokenizer.json the tokenizers library can read ({e})") from e
        return cls(hf, template, source=path)

    @classmethod
    def for_checkpoint(cls, ckpt_dir: str) -> "Tokenizer":
        """ckpt/llm/tokenizer.json (or ckpt/tokenizer.json); the template from ckpt/config.json's chat_template."""
        template = None
        cfg_path = os.path.join(ckpt_dir, "config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                template = json.load(f).get("chat_template") or None
        template = CHAT_TEMPLATES.get(template)  # None (absent or unknown): the vocabulary's special tokens decide
        for path in (os.path.join(ckpt_dir, "llm", "tokenizer.json"), os.path.join(ckpt_dir, "tokenizer.json")):
            if os.path.isfile(path):
                return cls.from_file(path, template)
        raise InputError(f"{ckpt_dir}: no llm/tokenizer.json (nor tokenizer.json) in the checkpoint")

    @classmethod
    def tiny(cls, cache_dir: str | None = None, template: str = "llama3") -> "Tokenizer":
        """The demo/test tokenizer, built at first use and cached in cache_dir (~/.cache/longvila); any template."""
        cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "longvila")
        digest = hashlib.sha1(json.dumps([WORDS, TINY_SPECIALS]).encode()).hexdigest()[:12]
        path = os.path.join(cache_dir, f"tiny-{digest}.json")
        if os.path.isfile(path):
            return cls(HFTokenizer.from_file(path), template, source=path)
        tok = build_tiny_tokenizer()
        os.makedirs(cache_dir, exist_ok=True)
        write_text_atomic(path, tok.to_str(pretty=True))  # concurrent first uses never see half a file
        return cls(tok, template, source=path)

    def encode(self, text: str) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if self.special_ids.intersection(ids):  # encode_special_tokens rules it out; checked anyway
            raise ValueError(f"{self.source}: text {text[:60]!r} encoded to a control token")
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids if int(i) >= 0]  # drop IMAGE_TOKEN_ID / IGNORE_INDEX slots
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        i = self.tk.token_to_id(token)
        if i is None:
            raise KeyError(f"{self.source}: token {token!r} not in the vocabulary")
        return i

    def save(self, path: str):
        self.tk.save(path)


# -----------------------------------------------------------------------------
# 4. Chat templates: one conversation -> (input_ids, labels), token for token as the reference builds it
#   llama3 (LongVILA branch, conversation.py `llama_3_chat`; {F} = a frame's tokens_per_frame IMAGE_TOKEN_IDs):
#     [BOS] <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
#     <|start_header_id|>user<|end_header_id|>\n\n{F}\n{F}\n{question}<|eot_id|>
#     <|start_header_id|>assistant<|end_header_id|>\n\n{reply}<|end_of_text|>
#     Messages end with <|eot_id|>, the LAST with <|end_of_text|> (sep2); supervised: each reply and the next token.
#   chatml (main, qwen2.jinja): <|im_start|>system\nYou are a helpful assistant<|im_end|>\n, then per message
#     <|im_start|>{role}\n{content}<|im_end|>\n; supervised: each reply and its <|im_end|> (not the "\n").
#   Media in a user turn (LazySupervisedDataset): <video> and its "\n" removed from the right-stripped text, F x
#     "{F}\n" put in front (ONE "\n" after every frame, the last included); <image> (preprocess_multimodal): the
#     text around each marker stripped, one "\n" after each image.
# Markers are read only in the STRING value of a user turn. A value may instead be a list of parts: str parts are
# literal text, {"media": "image"|"video"} parts are slots, each frame followed by "\n". Control tokens come only
# from the template code: special-token strings in any text stay text (never parsed into control tokens).

DEFAULT_SYSTEM = {  # the system texts of VILA's llama_3 conversation and of qwen2.jinja (no full stop)
    "llama3": "You are a helpful language and vision assistant. You are able to understand the visual content "
              "that the user provides, and assist the user with a variety of tasks using natural language.",
    "chatml": "You are a helpful assistant",
}
NIAH_SYSTEM = {  # the reference's V-NIAH script writes its own prompts: its Qwen2 system text has the full stop
    "llama3": DEFAULT_SYSTEM["llama3"],
    "chatml": "You are a helpful assistant.",
}
CAPTION_PROMPT = "Elaborate on the visual and narrative elements of the video in detail."  # the paper's caption task
ASK_QUESTION = "What happens in the video?"  # evaluate.py ask's default question
MCQ_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video. "
                   "Respond with only the letter (A, B, C, or D) of the correct option.")
MEDIA_RE = re.compile(r"(<image>|<video>)")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _markers(value) -> list[str]:
    """The media kinds ("image" / "video") a user turn's value holds, in order."""
    if isinstance(value, str):
        kinds = [m[1:-1] for m in MEDIA_RE.findall(value)]
    elif isinstance(value, list):
        kinds = [p.get("media") for p in value if isinstance(p, dict)]
        if any(k not in ("image", "video") for k in kinds) or any(not isinstance(p, (str, dict)) for p in value):
            raise InputError(f"a list value holds str parts and {{'media': 'image'|'video'}} parts, got {value!r}")
    else:
        raise InputError(f"a turn's value must be a string or a list of parts, got {type(value).__name__}")
    if "video" in kinds and len(kinds) > 1:
        raise InputError(f"a turn with a <video> holds no other <image>/<video> marker, got {len(kinds)}")
    return kinds


def _user_content(value, frames, tokens_per_frame: int) -> list:
    """A user turn as pieces (text, or a list of ids: one frame's slots), its media expanded as the reference does;
    `frames` yields the number of frames of each media slot in turn."""
    frame = [IMAGE_TOKEN_ID] * tokens_per_frame
    if isinstance(value, list):  # literal text parts; every frame of a media part followed by "\n"
        pieces = []
        for part in value:
            pieces += [part] if isinstance(part, str) else [frame, "\n"] * next(frames)
        return pieces
    if "<video>" in value:  # right-strip, remove the marker and its "\n", "<image>\n" x F in front
        question = value.rstrip().replace("<video>\n", "").replace("\n<video>", "").replace("<video>", "")
        return [frame, "\n"] * next(frames) + [question]
    if "<image>" in value:  # preprocess_multimodal, as the reference writes it
        chunks = [c.strip() for c in value.split("<image>")]
        text = "<image>\n".join([c + " " for c in chunks[:-1]] + [chunks[-1]]).strip()
        text = text.replace("<image>", "<image>\n").replace("<image>\n\n", "<image>\n")
        parts = text.split("<image>")
        pieces = [parts[0]]
        for after in parts[1:]:
            pieces += [frame * next(frames), after]  # next(frames) is 1: an image is one frame
        return pieces
    return [value]


def _chat_pieces(tok: Tokenizer, system: str, messages: list, add_generation_prompt: bool,
                 tokenizer_bos: bool = True) -> list:
    """The template around the messages [(role, content pieces)] -> [(piece, supervised)]."""
    # The reference's tokenizer_image_token keeps the BOS the tokenizer adds (Llama-3's tokenizer.json does), and its
    # Llama-3 system string starts with a literal <|begin_of_text|>: two BOS with Llama-3's tokenizer, one with ours.
    out = [([tok.auto_bos_id], False)] if tokenizer_bos and tok.auto_bos_id is not None else []
    if tok.template == "llama3":
        start, end = tok.header_ids

        def head(role):
            return [([start], False), (role, False), ([end], False), ("\n\n", False)]
        out.append(([tok.bos_id], False))
        if system:
            out += head("system") + [(system, False), ([tok.eot_id], False)]
        for k, (role, content) in enumerate(messages):
            reply = role == "assistant"
            last = k == len(messages) - 1 and not add_generation_prompt
            out += head(role) + [(p, reply) for p in content] + [([tok.eod_id if last else tok.eot_id], reply)]
    else:
        def head(role):
            return [([tok.im_start_id], False), (role + "\n", False)]
        if system:
            out += head("system") + [(system, False), ([tok.eot_id], False), ("\n", False)]
        for role, content in messages:
            reply = role == "assistant"
            out += head(role) + [(p, reply) for p in content] + [([tok.eot_id], reply), ("\n", False)]
    if add_generation_prompt:
        out += head("assistant")
    return out


def _encode(pieces: list, tok: Tokenizer) -> tuple[list[int], list[int]]:
    """[(piece, supervised)] -> (input_ids, labels). Adjacent text pieces of the same supervision are encoded as ONE
    string, as the reference tokenizes all the text between two special tokens or <image> markers in one call."""
    ids, labels = [], []
    for (is_text, supervised), group in itertools.groupby(pieces, key=lambda p: (isinstance(p[0], str), p[1])):
        group = list(group)
        new = tok.encode("".join(p for p, _ in group)) if is_text else [i for p, _ in group for i in p]
        ids += new
        labels += new if supervised else [IGNORE_INDEX] * len(new)
    return ids, labels


def build_conversation(conversations: list[dict], tokenizer: Tokenizer, num_frames: list[int] | None = None,
                       tokens_per_frame: int = 1, system: str | None = None,
                       add_generation_prompt: bool | None = None) -> tuple[list[int], list[int]]:
    """LLaVA-style turns -> (input_ids, labels) of length T; labels are IGNORE_INDEX except on the assistant's
    replies and the token after each, aligned with input_ids (not pre-shifted: the loss shifts).
    "from": "human"/"gpt" ("user"/"assistant" are accepted as well). num_frames: frames per <image>/<video> slot.
    system None: the first turn if it is a system turn, else the template's default ("": none).
    add_generation_prompt None: unless the last turn is the assistant's; the prompt then ends with the assistant
    header."""
    tok, num_frames, turns = tokenizer, list(num_frames or []), list(conversations)
    if turns and ROLES.get(turns[0].get("from")) == "system":
        system = turns[0]["value"] if system is None else system
        turns = turns[1:]
    system = DEFAULT_SYSTEM[tok.template] if system is None else system
    roles = [ROLES.get(t.get("from")) for t in turns]
    for i, role in enumerate(roles):
        if role in (None, "system"):
            raise InputError(f"turn {i}: 'from' must be human/gpt (user/assistant), got {turns[i].get('from')!r}")
        if role == "assistant" and not isinstance(turns[i].get("value"), str):
            raise InputError(f"turn {i}: an assistant's value must be a string")
    slots = [k for t, role in zip(turns, roles) if role == "user" for k in _markers(t.get("value"))]
    if len(slots) != len(num_frames):
        raise InputError(f"conversation has {len(slots)} <image>/<video> slots but num_frames lists "
                         f"{len(num_frames)} media")
    for kind, n in zip(slots, num_frames):
        if n < 1 or (kind == "image" and n != 1):
            raise InputError(f"an <{kind}> slot cannot take {n} frames")
    frames = iter(num_frames)
    messages = [(role, _user_content(t["value"], frames, tokens_per_frame) if role == "user" else [t["value"]])
                for t, role in zip(turns, roles)]
    if add_generation_prompt is None:
        add_generation_prompt = not turns or roles[-1] != "assistant"
    return _encode(_chat_pieces(tok, system, messages, add_generation_prompt), tok)


def build_niah_prompt(tokenizer: Tokenizer, num_frames: int, tokens_per_frame: int, question: str,
                      answer: str | None = None) -> tuple[list[int], list[int]]:
    """The reference's V-NIAH prompt (eval_vision_niah.py): system and user header, num_frames frames with NO
    separator, the question, the assistant header, then the answer if given (supervised, no end token). The template's
    BOS is the only one (main's safe_tokenize strips the tokenizer's)."""
    if num_frames < 1:
        raise InputError(f"the V-NIAH prompt needs at least one frame, got {num_frames}")
    frames = [[IMAGE_TOKEN_ID] * tokens_per_frame] * num_frames
    pieces = _chat_pieces(tokenizer, NIAH_SYSTEM[tokenizer.template], [("user", frames + [question])], True,
                          tokenizer_bos=False)
    return _encode(pieces + ([(answer, True)] if answer else []), tokenizer)


def needle_index(depth: float, num_frames: int) -> int:
    """The needle's place among N + 1 frames: after int(depth * N) haystack frames (the reference's query_frame_idx)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle depth must be in [0, 1], got {depth}")
    return int(depth * num_frames)


NIAH_LAYOUTS = ("frames", "video")  # the reference's V-NIAH prompt; a training video's "<video>\n{question}"


def niah_conversation(tokenizer: Tokenizer, question: str, answer: str, num_frames: int, tokens_per_frame: int,
                      layout: str = "frames") -> tuple[list[int], list[int]]:
    """A needle-in-a-haystack sample: layout "frames" is build_niah_prompt (what evaluate.py niah scores); "video",
    the user turn "<video>\n{question}" expanded as every training video is."""
    if layout == "frames":
        return build_niah_prompt(tokenizer, num_frames, tokens_per_frame, question, answer)
    if layout == "video":
        conv = [{"from": "human", "value": "<video>\n" + question}, {"from": "gpt", "value": answer}]
        return build_conversation(conv, tokenizer, [num_frames], tokens_per_frame)
    raise InputError(f"niah layout {layout!r}: expected one of {NIAH_LAYOUTS}")


def mcq_prompt(question: str, options: list[str]) -> str:
    """The VideoMME prompt (LongVILA's evaluation): instruction, question, "A. ..." options, answer cue."""
    return f"{MCQ_INSTRUCTION}\n{question}\n" + "\n".join(options) + "\nThe best answer is:"


# -----------------------------------------------------------------------------
# 5. Datasets: LLaVA-style JSON mixtures (stages 1, 2, 3, 5) and random windows of long text (stage 4)

def _as_mixture(files_with_weights) -> list[tuple[str, float]]:
    """A path, [paths] or [(path, weight)] -> [(path, weight)], every weight > 0."""
    if isinstance(files_with_weights, (str, os.PathLike)):
        files_with_weights = [files_with_weights]
    out = [(str(it), 1.0) if isinstance(it, (str, os.PathLike)) else (str(it[0]), float(it[1]))
           for it in files_with_weights]
    for path, weight in out:
        if not weight > 0 or math.isinf(weight):
            raise InputError(f"{path}: mixture weight {weight} must be a positive number")
    return out


def _read_samples(path: str) -> list:
    """The samples of one LLaVA-style JSON file (a list); an InputError naming the file otherwise."""
    expected = 'a JSON list of samples [{"id", "video" or "image", "conversations"}, ...]'
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror}); expected {expected}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a JSON file ({type(e).__name__}: {e}); expected {expected}") from e
    if not isinstance(records, list):
        raise InputError(f"{path}: a JSON {type(records).__name__}; expected {expected}")
    return records


class SupervisedDataset(torch.utils.data.Dataset):
    """LLaVA-style JSON files mixed by weight -> {"id", "input_ids" (T,), "labels" (T,), "images" (F,3,S,S)|None}.
    A file of n samples with weight w gives round(w * n) of them (w < 1: a seeded subset; w > 1: repeats), shuffled
    together by `seed`; media paths are relative to media_root (None: the JSON file's folder). A sample without
    markers gets one "<image>\\n" per image (or "<video>\\n") before its first user turn, as the reference does.
    An over-long sample (> max_len) loses video frames first (keeping the uniform spread), then its text's end is
    cut, never inside the frames. A sample that cannot be built is skipped with a warning (counted in self.skipped,
    per process) and the next comes instead; 64 failures in a row raise an InputError."""

    def __init__(self, files_with_weights, media_root: str | None, tokenizer: Tokenizer, image_size: int,
                 tokens_per_frame: int, num_frames: int = 8, max_len: int = 4096, fps: float | None = None,
                 seed: int = 0, video_backend: str | None = None, decode_threads: int = 0, aspect: str = "resize"):
        if num_frames < 1:
            raise InputError(f"num_frames must be >= 1, got {num_frames}")
        if aspect not in ("resize", "pad"):
            raise InputError(f"image_aspect_ratio must be 'resize' or 'pad', got {aspect!r}")
        self.tokenizer, self.image_size, self.tokens_per_frame = tokenizer, image_size, tokens_per_frame
        self.aspect = aspect  # "resize" | "pad": the checkpoint's image_aspect_ratio
        self.num_frames, self.max_len, self.fps, self.media_root = num_frames, max_len, fps, media_root
        self.video_backend = video_backend  # None: decord, PyAV on failure
        self.decode_threads = decode_threads  # per video: 0, one reader with its library's threads; k, k readers
        self.frame_shard: tuple[int, int] | None = None  # (sp_rank, sp): decode only this rank's frames (train.py)
        self.samples: list[tuple[dict, str]] = []  # (sample, its media folder)
        self.skipped, self.skipped_files = 0, []
        rng = np.random.default_rng(seed)
        for path, weight in _as_mixture(files_with_weights):
            records = _read_samples(path)
            root = media_root if media_root is not None else os.path.dirname(os.path.abspath(path))
            n = int(round(weight * len(records)))
            order = np.concatenate([rng.permutation(len(records)) for _ in range(math.ceil(weight))])[:n]
            self.samples += [(records[i], root) for i in order]
        self.order = rng.permutation(len(self.samples))  # mixture shuffled once, deterministically

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        causes = []
        for attempt in range(min(len(self), 64)):
            sample, root = self.samples[self.order[(index + attempt) % len(self)]]
            try:
                return self._build(sample, root)
            except (ValueError, KeyError, TypeError) as e:  # InputError and MediaError are ValueErrors
                self.skipped += 1
                self.skipped_files.append(str(e).split(":")[0])
                causes.append(f"sample {sample.get('id', '?') if isinstance(sample, dict) else '?'}: {e}")
                warnings.warn(f"skipping {causes[-1]}", stacklevel=2)
        raise InputError(f"{len(causes)} samples in a row could not be built (from position {index}); the last: "
                         + " | ".join(causes[-3:]))

    def _build(self, sample: dict, root: str) -> dict:
        """One sample: its conversation and media -> ids and labels -> fitted to max_len -> pixels."""
        sid = sample.get("id", "?") if isinstance(sample, dict) else "?"
        if isinstance(sample, dict) and "haystack" in sample:
            return self._needle_sample(sample, root, sid)
        convs, kind, paths = self._conversation(sample, sid)
        media, counts = [], []
        with contextlib.ExitStack() as opened:  # every video opened here is closed, whatever fails
            for rel in paths:
                path = os.path.join(root, rel)
                if kind == "image":
                    media.append(load_image(path))  # (H, W, 3)
                    counts.append(1)
                else:
                    threads = 1 if self.decode_threads >= 1 else 0  # with video_pixels' threads: one each
                    video = opened.enter_context(VideoFile(path, self.video_backend, threads))
                    media.append((video, video.indices(self.num_frames, self.fps)))
                    counts.append(len(media[-1][1]))  # F frames after uniform / fps sampling
            ids, labels = build_conversation(convs, self.tokenizer, counts, self.tokens_per_frame,
                                             add_generation_prompt=False)
            ids, labels, counts = self._fit(sid, convs, ids, labels, counts, kind)
            images = self._pixels(kind, media, counts)  # (F_total, 3, S, S) | None
        n_slots = sum(1 for x in ids if x == IMAGE_TOKEN_ID)
        if n_slots != (0 if images is None else len(images)) * self.tokens_per_frame:  # the model's embed contract
            raise ValueError(f"sample {sid}: {n_slots} image slots for {0 if images is None else len(images)} frames")
        return {"id": sid, "input_ids": torch.tensor(ids, dtype=torch.long),  # (T,)
                "labels": torch.tensor(labels, dtype=torch.long), "images": images}  # (T,), (F, 3, S, S) | None

    def _needle_sample(self, sample: dict, root: str, sid) -> dict:
        """A needle-in-a-haystack record, built as evaluate.py niah builds its prompts: `frames` haystack frames (the
        V-NIAH reader at `fps`, from `start`), the needle at needle_index(depth, frames), niah_conversation(layout)."""
        n, start = int(sample["frames"]), int(sample.get("start", 0))
        with VideoFile(os.path.join(root, sample["haystack"]), self.video_backend) as video:
            idx = video.indices(None, float(sample.get("fps", 1.0)))[start:start + n]  # (n,)
            if len(idx) < n:
                raise MediaError(f"{sample['haystack']}: {len(idx)} frames from frame {start}, sample {sid} needs {n}")
            hay = video_pixels(video, idx, self.image_size, aspect=self.aspect)  # (n, 3, S, S)
        needle = preprocess(load_image(os.path.join(root, sample["needle"]))[None], self.image_size, self.aspect)
        i = needle_index(float(sample["depth"]), n)
        images = torch.cat([hay[:i], needle, hay[i:]])  # (n + 1, 3, S, S), the needle at frame i
        ids, labels = niah_conversation(self.tokenizer, sample["question"], sample["answer"], n + 1,
                                        self.tokens_per_frame, sample.get("layout", "frames"))
        if len(ids) > self.max_len:
            raise InputError(f"sample {sid}: {len(ids)} tokens > max_len {self.max_len}")
        return {"id": sid, "input_ids": torch.tensor(ids, dtype=torch.long),  # (T,)
                "labels": torch.tensor(labels, dtype=torch.long), "images": images}  # (T,), (n + 1, 3, S, S)

    @staticmethod
    def _conversation(sample: dict, sid) -> tuple[list[dict], str | None, list[str]]:
        """(turns with media markers, "image" | "video" | None, media paths): a sample checked, markers added."""
        if not isinstance(sample, dict) or not isinstance(sample.get("conversations"), list):
            raise InputError(f"sample {sid}: expected {{\"conversations\": [...], ...}}")
        if "image" in sample and "video" in sample:
            raise InputError(f"sample {sid}: both an 'image' and a 'video': one kind of media per sample")
        kind = "image" if "image" in sample else "video" if "video" in sample else None
        paths = [] if kind is None else [sample[kind]] if isinstance(sample[kind], str) else list(sample[kind])
        if kind == "video" and len(paths) != 1:
            raise InputError(f"sample {sid}: 'video' must be one path, got {sample['video']!r}")
        convs = [dict(t) for t in sample["conversations"]]
        users = [t for t in convs if ROLES.get(t.get("from")) == "user"]
        markers = [m for t in users if isinstance(t.get("value"), str) for m in MEDIA_RE.findall(t["value"])]
        if paths and not markers and users and isinstance(users[0].get("value"), str):
            users[0]["value"] = f"<{kind}>\n" * len(paths) + users[0]["value"]  # the turn dicts are copies
        elif markers != [f"<{kind}>"] * len(paths):
            raise InputError(f"sample {sid}: markers {markers} do not match its media ({len(paths)} {kind or 'none'})")
        return convs, kind, paths

    def _fit(self, sid, convs, ids, labels, counts, kind):
        """Shorten an over-long sample: drop video frames first, then truncate the text (with a warning)."""
        if len(ids) <= self.max_len:
            return ids, labels, counts
        if kind == "video":
            per_frame = self.tokens_per_frame + len(self.tokenizer.encode("\n"))
            keep = max(1, counts[0] - math.ceil((len(ids) - self.max_len) / per_frame))
            warnings.warn(f"sample {sid}: {len(ids)} tokens > max_len {self.max_len}; {counts[0]} -> {keep} frames",
                          stacklevel=3)
            counts = [keep]
            ids, labels = build_conversation(convs, self.tokenizer, counts, self.tokens_per_frame,
                                             add_generation_prompt=False)
        if len(ids) > self.max_len:
            if ids[self.max_len - 1] == IMAGE_TOKEN_ID or IMAGE_TOKEN_ID in ids[self.max_len:]:
                raise InputError(f"sample {sid}: {len(ids)} tokens > max_len {self.max_len} and the cut would fall "
                                 "inside the visual tokens")
            warnings.warn(f"sample {sid}: text truncated from {len(ids)} to max_len {self.max_len} tokens",
                          stacklevel=3)
            ids, labels = ids[:self.max_len], labels[:self.max_len]
            if all(x == IGNORE_INDEX for x in labels):
                raise InputError(f"sample {sid}: no supervised tokens left after truncation to {self.max_len}")
        return ids, labels, counts

    def _pixels(self, kind, media, counts) -> torch.Tensor | None:
        """The sample's frames (F, 3, S, S). With a frame shard set, only this SP rank's frames are decoded: the
        others are never read there (mmsp.encode_frames_sharded) and stay -1 (black, on train.pack_pixels' grid)."""
        if not media:
            return None
        S, total = self.image_size, sum(counts)
        lo, hi = 0, total
        if self.frame_shard is not None:
            rank, sp = self.frame_shard
            per = mmsp.frame_split(total, sp)
            lo, hi = min(rank * per, total), min((rank + 1) * per, total)
        if kind == "video":
            video, idx = media[0]
            idx = idx[uniform_indices(len(idx), total)]  # frames dropped for length keep the uniform spread
            if (lo, hi) == (0, total):
                return video_pixels(video, idx, S, threads=self.decode_threads, aspect=self.aspect)  # (F, 3, S, S)
        out = torch.full((total, 3, S, S), -1.0)  # (F, 3, S, S)
        if kind == "image":
            for i in range(lo, hi):
                out[i] = preprocess(media[i][None], S, self.aspect)[0]  # (3, S, S)
        elif lo < hi:
            out[lo:hi] = video_pixels(video, idx[lo:hi], S, threads=self.decode_threads, aspect=self.aspect)
        return out


class TextWindowDataset(torch.utils.data.Dataset):
    """Stage 4: random windows of seq_len tokens from long text (nanoGPT style); labels = input_ids (the loss shifts).
    path: .bin (uint32 ids, memory-mapped), .txt (one stream) or .jsonl (documents joined by eod_id). Window i starts
    where rng(seed, i) says: deterministic, any index, any order."""

    def __init__(self, path: str, tokenizer: Tokenizer, seq_len: int, seed: int = 0):
        self.path, self.seq_len, self.seed = path, seq_len, seed
        if not path.endswith((".bin", ".txt", ".jsonl")):
            raise InputError(f"{path}: stage-4 text must be .bin (uint32 token ids), .txt or .jsonl")
        if not os.path.isfile(path):
            raise InputError(f"{path}: file not found (stage-4 text: .bin, .txt or .jsonl)")
        if path.endswith(".bin"):
            self.tokens = np.memmap(path, dtype=np.uint32, mode="r")  # (N,)
        else:
            self.tokens = np.asarray(_tokenize_documents(path, tokenizer, split_txt=False), dtype=np.uint32)  # (N,)
        if len(self.tokens) <= seq_len:
            raise InputError(f"{path}: {len(self.tokens)} tokens, need more than seq_len={seq_len}")
        if int(self.tokens.max()) >= tokenizer.vocab_size:
            raise InputError(f"{path}: token id {int(self.tokens.max())} >= the tokenizer's vocab "
                             f"{tokenizer.vocab_size} (tokenized with another tokenizer?)")
        self.num_samples = len(self.tokens) // seq_len

    def __len__(self):
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        start = int(np.random.default_rng([self.seed, index]).integers(0, len(self.tokens) - self.seq_len + 1))
        x = torch.from_numpy(self.tokens[start:start + self.seq_len].astype(np.int64))  # (T,)
        return {"id": f"{os.path.basename(self.path)}@{start}", "input_ids": x, "labels": x.clone(), "images": None}


def _tokenize_documents(path: str, tokenizer: Tokenizer, split_txt: bool) -> list[int]:
    """Token ids of the documents of a .jsonl ({"text": ...} per line) or a .txt (split_txt: separated by blank
    lines), each followed by eod_id; without split_txt a .txt is one stream."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            if not path.endswith(".jsonl"):
                text = f.read()
                if not split_txt:
                    return tokenizer.encode(text)
                docs = [d for d in text.split("\n\n") if d.strip()]
            else:
                docs = [json.loads(line)["text"] for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from e
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path}: expected one {{\"text\": ...}} object per line ({type(e).__name__}: {e})") from e
    ids = []
    for doc in docs:
        ids += tokenizer.encode(doc) + [tokenizer.eod_id]
    return ids


def tokenize_to_bin(text_path: str, tokenizer: Tokenizer, out_path: str) -> int:
    """Pre-tokenise a .txt or .jsonl into nanoGPT's uint32 .bin for TextWindowDataset; returns the token count."""
    ids = _tokenize_documents(text_path, tokenizer, split_txt=True)
    np.asarray(ids, dtype=np.uint32).tofile(out_path)
    return len(ids)


# -----------------------------------------------------------------------------
# 6. The SP-aware sampler: the same sample on every rank of a sequence-parallel group

class SPSampler:
    """The samples of each step under dp x sp: every rank of one SP group (same dp_rank) gets the SAME indices,
    different dp ranks disjoint ones. Epoch e is a permutation of range(dataset_len) seeded by (seed, e); step s
    gives dp rank r perm[(s*dp + r)*B : (s*dp + r + 1)*B], a remainder short of a whole step dropped."""

    def __init__(self, dataset_len: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0, batch_size: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise InputError(f"dp_rank {dp_rank} must lie in [0, dp_size={dp_size})")
        if dataset_len < dp_size * batch_size:
            raise InputError(f"dataset of {dataset_len} samples cannot feed dp_size {dp_size} x batch {batch_size}")
        self.n, self.dp_rank, self.dp_size, self.seed = dataset_len, dp_rank, dp_size, seed
        self.batch_size = batch_size
        self.steps_per_epoch = dataset_len // (dp_size * batch_size)
        self._perm_epoch, self._perm = None, None

    def indices_for_step(self, step: int) -> list[int]:
        epoch, s = divmod(step, self.steps_per_epoch)
        if self._perm_epoch != epoch:
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            self._perm_epoch = epoch
        a = (s * self.dp_size + self.dp_rank) * self.batch_size
        return self._perm[a:a + self.batch_size].tolist()


# -----------------------------------------------------------------------------
# 7. Collate: right padding

def collate(items: list[dict], pad_id: int = 0) -> dict:
    """Right-pad to the longest sample (input_ids with pad_id, labels with IGNORE_INDEX: causal attention keeps the
    real tokens as they are) -> {"input_ids" (B, T), "labels" (B, T), "images", "ids", "lengths" (B,)}."""
    T = max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((len(items), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(items), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[b, :n] = it["input_ids"]
        labels[b, :n] = it["labels"]
    return {"input_ids": input_ids, "labels": labels, "images": [it.get("images") for it in items],
            "ids": [it.get("id") for it in items],
            "lengths": torch.tensor([len(it["input_ids"]) for it in items], dtype=torch.long)}


# --- below: the machinery (demo data, long-video instruction data, progress line, command line)


def write_text_atomic(path: str, text: str):
    """Write through a per-process temporary file and a rename: readers see the old or the new text, never half."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Demo data: synthetic coloured shapes for the CPU demo of all five stages (`python data.py demo`)
# data/demo/ (deterministic by seed; every media path in a JSON file is relative to that file's folder):
#   meta.json, tokenizer.json (the tiny tokenizer), media/ (stills, short and long videos, haystacks, needles)
#   stage1.json  image captions        stage2.json  longer image captions, video captions, two-image samples
#   stage3.json  short-video QA and VideoMME-style multiple choice    stage4.txt / .bin  passkey documents
#   stage5.json  long-video QA and captions    stage5_niah.json  needle-in-a-haystack records (4-48 frames)
#   eval/  held out (other seeds): niah/ (haystacks, needles), mcq/, caption/, stage4_val.txt, stage{1,2,3,5}_val.json

DEMO_VERSION = 3  # meta.json's "version": raise it when the generator's output changes
DEMO_SIZE = 64  # px of every demo image and video frame (even: yuv420p)
SHORT_FRAMES, SHORT_FPS = 8, 4  # stage 2/3 clips and the MCQ set: 2 s
LONG_FRAMES, LONG_FPS, LONG_SEGMENTS = 32, 1, 4  # stage 5 and caption eval: 32 s, 4 segments of 8 s
HAYSTACK_SECONDS, HAYSTACK_FPS, HAYSTACK_SEGMENTS = 64, 2, 8  # NIAH haystacks: 128 frames, read at 1 fps

# The demo's visual world and the word list of every demo text (each word one tiny-tokenizer token)
COLORS = {"red": (230, 25, 25), "green": (30, 190, 40), "blue": (30, 70, 240), "yellow": (245, 225, 20),
          "orange": (250, 130, 10), "purple": (140, 40, 190), "cyan": (20, 215, 225), "pink": (255, 130, 200)}
SHAPES = ["circle", "square", "triangle", "diamond"]
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) per unit of speed
BACKGROUNDS = {"black": (15, 15, 20), "gray": (90, 90, 100)}
NEEDLE_BACKGROUND = (200, 200, 200)
POSITIONS = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7),
             "bottom right": (0.7, 0.7), "center": (0.5, 0.5)}
COUNT_WORDS = ["zero", "one", "two", "three", "four"]
FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
WORDS = sorted(set(
    list(COLORS) + SHAPES + [s + "s" for s in SHAPES] + list(MOTIONS) + list(BACKGROUNDS) + COUNT_WORDS
    + " ".join(POSITIONS).split() + " ".join(FILLER).replace(".", "").split()
    + " ".join(DEFAULT_SYSTEM.values()).replace(".", "").replace(",", "").split()
    + re.sub(r"[.,()-]", " ", MCQ_INSTRUCTION).split()
    + """a an the is are on in at of and then first second third last after before moves move moving stays still
    background image images video needle color shape shapes what which how many where way does do there frame both
    describe two big small this that it pass key remember answer best system user assistant segment happens
    finally comes First Then Finally hidden text A B C D What Which How Where Describe The There Here Remember
    letter option options question""".split()))


def write_video(path: str, frames, fps: float, codec: str = "libx264", crf: int = 12, gop: int | None = None):
    """Write uint8 frames (F, H, W, 3), H and W even (yuv420p), as an mp4; deterministic: x264 runs single-threaded."""
    import av  # optional dependency of the readers; needed to write

    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"{path}: no frames to write")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, "w") as container:
        opts = {"crf": str(crf), "threads": "1", "preset": "ultrafast"} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001), options=opts)
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        if codec != "libx264":
            stream.codec_context.bit_rate = 2_000_000
        for frame in itertools.chain([first], frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(vf))
        container.mux(stream.encode())  # flush the encoder


_GRID = np.mgrid[0:DEMO_SIZE, 0:DEMO_SIZE].astype(np.float32)  # (2, H, W): y, x of every pixel


def draw_shape(img: np.ndarray, shape: str, color, cx: float, cy: float, r: float) -> np.ndarray:
    """Paint a filled shape of radius ~r centred at (cx, cy) on img (H, W, 3) uint8, in place."""
    dy, dx = _GRID[0] - cy, _GRID[1] - cx  # (H, W) each
    if shape == "circle":
        mask = dx * dx + dy * dy <= r * r
    elif shape == "square":
        mask = np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    elif shape == "diamond":
        mask = np.abs(dx) + np.abs(dy) <= 1.15 * r
    elif shape == "triangle":  # pointing up: widens from apex (cy - r) to base (cy + 0.8 r)
        mask = (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= 0.6 * (dy + r))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    img[mask] = color
    return img


def needle_frame(rng: np.random.Generator, color: str) -> tuple[np.ndarray, dict]:
    """A BIG shape of one colour on a plain light-gray background: unmistakable among haystack frames."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    img = np.full((DEMO_SIZE, DEMO_SIZE, 3), NEEDLE_BACKGROUND, np.uint8)
    c = DEMO_SIZE / 2 + rng.uniform(-4, 4, size=2)
    draw_shape(img, shape, COLORS[color], c[0], c[1], 0.36 * DEMO_SIZE)
    return img, {"color": color, "shape": shape}


def still_image(rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """One shape with a colour, size, position and background (stage 1/2 stills)."""
    bg, color = str(rng.choice(list(BACKGROUNDS))), str(rng.choice(list(COLORS)))
    shape, size, pos = str(rng.choice(SHAPES)), str(rng.choice(["small", "big"])), str(rng.choice(list(POSITIONS)))
    img = np.full((DEMO_SIZE, DEMO_SIZE, 3), BACKGROUNDS[bg], np.uint8)
    r = (0.12 if size == "small" else 0.2) * DEMO_SIZE
    fx, fy = POSITIONS[pos]
    draw_shape(img, shape, COLORS[color], fx * DEMO_SIZE + rng.uniform(-2, 2), fy * DEMO_SIZE + rng.uniform(-2, 2), r)
    return img, {"color": color, "shape": shape, "size": size, "position": pos, "background": bg}


def _moving(rng, n_frames: int, speed: float, r: float) -> tuple[str, np.ndarray]:
    """A motion word and the (n_frames, 2) x, y centres of a shape moving that way, staying inside the frame."""
    motion = str(rng.choice(list(MOTIONS)))
    d = np.array(MOTIONS[motion], np.float32)  # (2,)
    travel = speed * (n_frames - 1)
    lo, hi = r + 1, DEMO_SIZE - r - 1
    start = rng.uniform(lo, hi, size=2).astype(np.float32)  # (2,)
    for a in range(2):  # start far enough from the edge it moves towards
        if d[a] > 0:
            start[a] = rng.uniform(lo, max(lo, hi - travel))
        elif d[a] < 0:
            start[a] = rng.uniform(min(hi, lo + travel), hi)
    return motion, start[None] + d[None] * speed * np.arange(n_frames, dtype=np.float32)[:, None]  # (n, 2)


def short_clip(rng: np.random.Generator, needle: bool) -> tuple[np.ndarray, dict]:
    """SHORT_FRAMES frames of 1-3 distinct shapes moving on a plain background; with needle, one is a needle frame."""
    bg = str(rng.choice(list(BACKGROUNDS)))
    n = int(rng.integers(1, 4))
    colors = [str(c) for c in rng.choice(list(COLORS), size=n, replace=False)]
    shapes = [str(s) for s in rng.choice(SHAPES, size=n, replace=False)]
    r = 0.15 * DEMO_SIZE
    objs = []
    for c, s in zip(colors, shapes):
        motion, path = _moving(rng, SHORT_FRAMES, 3.0, r)
        objs.append({"color": c, "shape": s, "motion": motion, "path": path})
    frames = np.empty((SHORT_FRAMES, DEMO_SIZE, DEMO_SIZE, 3), np.uint8)
    for t in range(SHORT_FRAMES):
        frames[t] = BACKGROUNDS[bg]
        for o in objs:
            draw_shape(frames[t], o["shape"], COLORS[o["color"]], o["path"][t, 0], o["path"][t, 1], r)
    info = {"background": bg, "objects": [{k: o[k] for k in ("color", "shape", "motion")} for o in objs]}
    if needle:
        t = int(rng.integers(SHORT_FRAMES))
        frames[t], info["needle"] = needle_frame(rng, str(rng.choice(list(COLORS))))
        info["needle"]["frame"] = t
    return frames, info


def long_clip(rng: np.random.Generator, n_frames: int, n_segments: int, needle: bool) -> tuple[np.ndarray, dict]:
    """A haystack: n_segments equal segments, each one small shape drifting slowly, one frame a needle if asked."""
    bg = str(rng.choice(list(BACKGROUNDS)))
    seg_len = n_frames // n_segments
    r = 0.15 * DEMO_SIZE  # ~10 px across at 32 px: colour and shape both visible
    frames = np.empty((n_frames, DEMO_SIZE, DEMO_SIZE, 3), np.uint8)
    segments = []
    for k in range(n_segments):
        color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
        a, b = k * seg_len, (n_frames if k == n_segments - 1 else (k + 1) * seg_len)
        motion, path = _moving(rng, b - a, 1.5 * 8 / seg_len, r)
        for t in range(a, b):
            frames[t] = BACKGROUNDS[bg]
            draw_shape(frames[t], shape, COLORS[color], path[t - a, 0], path[t - a, 1], r)
        segments.append({"color": color, "shape": shape, "motion": motion, "start": a, "end": b})
    info = {"background": bg, "segments": segments}
    if needle:
        t = int(rng.integers(n_frames))
        frames[t], info["needle"] = needle_frame(rng, str(rng.choice(list(COLORS))))
        info["needle"]["frame"] = t
    return frames, info


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _describe_objects(info: dict) -> str:
    parts = [f"{_a(o['color'])} {o['color']} {o['shape']} moves {o['motion']}" for o in info["objects"]]
    return " and ".join(parts) + f" on {_a(info['background'])} {info['background']} background"


def _describe_segments(info: dict) -> str:
    segs = info["segments"]
    words = ["First"] + ["then"] * (len(segs) - 2) + ["finally"]
    parts = [f"{w} {_a(s['color'])} {s['color']} {s['shape']} moves {s['motion']}" for w, s in zip(words, segs)]
    return ", ".join(parts) + "."


def _short_qa(rng, info: dict) -> list[tuple[str, str]]:
    """The needle's colour if there is one, then two of four questions about one object, in a fixed order."""
    objs = info["objects"]
    o = objs[int(rng.integers(len(objs)))]
    color_q = f"What color is the {o['shape']}?"
    if len(objs) == 1:
        color_q = str(rng.choice(["What color is the shape?", color_q]))
    qa = [(color_q, o["color"]), (f"Which way does the {o['color']} {o['shape']} move?", o["motion"]),
          (f"What shape is {o['color']}?", o["shape"]), ("How many shapes are there?", COUNT_WORDS[len(objs)])]
    needle = [("What color is the needle?", info["needle"]["color"])] if "needle" in info else []
    return needle + [qa[i] for i in sorted(rng.permutation(len(qa))[:2])]


def _mcq(rng, info: dict) -> tuple[str, list[str], str]:
    """A VideoMME-style question about one object: (question, ["A. ...", ...], answer letter)."""
    o = info["objects"][int(rng.integers(len(info["objects"])))]
    kind = int(rng.integers(3))
    if kind == 0:
        q, right, pool = f"What color is the {o['shape']}?", o["color"], list(COLORS)
    elif kind == 1:
        q, right, pool = f"Which way does the {o['color']} {o['shape']} move?", o["motion"], list(MOTIONS)
    else:
        q, right, pool = f"What shape is {o['color']}?", o["shape"], SHAPES
    opts = [str(w) for w in rng.choice([p for p in pool if p != right], size=3, replace=False)]  # wrong ones
    pos = int(rng.integers(4))
    opts.insert(pos, right)
    return q, [f"{'ABCD'[i]}. {w}" for i, w in enumerate(opts)], "ABCD"[pos]


def _long_qa(rng, info: dict) -> list[tuple[str, str]]:
    segs = info["segments"]
    qa = [("What color is the needle?", info["needle"]["color"])] if "needle" in info else []
    k = int(rng.integers(len(segs) - 1))
    shape = str(rng.choice(SHAPES))
    first_or_last = str(rng.choice(["first", "last"]))
    end_color = segs[0 if first_or_last == "first" else -1]["color"]
    return qa + [(f"What color is the {first_or_last} shape?", end_color),
                 (f"Which shape comes after the {segs[k]['color']} {segs[k]['shape']}?", segs[k + 1]["shape"]),
                 (f"How many {shape}s are there?", COUNT_WORDS[sum(s["shape"] == shape for s in segs)])]


def _conv(pairs: list[tuple[str, str]], marker: str) -> list[dict]:
    convs = []
    for i, (q, a) in enumerate(pairs):
        convs += [{"from": "human", "value": (marker + "\n" if i == 0 else "") + q}, {"from": "gpt", "value": a}]
    return convs


def _png(path: str, img: np.ndarray):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img).save(path, format="PNG", optimize=False)  # no timestamps in PNG: same bytes each run


def _passkey_doc(rng) -> str:
    key = "".join(str(d) for d in rng.integers(0, 10, size=5))
    n = int(rng.integers(10, 150))
    fill = [FILLER[i] for i in rng.integers(0, len(FILLER), size=n)]
    at = int(rng.integers(0, n + 1))
    fill.insert(at, f"The pass key is {key}. Remember it. {key} is the pass key.")
    return ("There is a pass key hidden inside a lot of text. " + " ".join(fill)
            + f" What is the pass key? The pass key is {key}.")


def _write_json(path: str, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


# stage 5's caption requests, evaluate.py caption's and ask's default prompts among them (answered with a caption)
LONG_CAPTION_PROMPTS = ("Describe the video.", CAPTION_PROMPT, ASK_QUESTION)


def _demo_split(json_dir: str, seed: int, split: int, n_images: int, n_short: int, n_long: int,
                needle_fraction: float, suffix: str = "") -> dict:
    """Stage 1, 2, 3, 5 JSON files in json_dir, their media under json_dir/media; returns the sample counts."""
    media_dir = os.path.join(json_dir, "media")
    rel = lambda p: os.path.relpath(p, json_dir)  # noqa: E731
    stage1, stage2, stage3, stage5 = [], [], [], []
    prompts1 = ["Describe the image.", "What is in the image?", "What is this?"]
    images = []
    for i in range(n_images):
        rng = np.random.default_rng([seed, split, 1, i])
        img, info = still_image(rng)
        path = os.path.join(media_dir, "images", f"img_{i:05d}.png")
        _png(path, img)
        images.append((rel(path), info))
        stage1.append({"id": f"s1{suffix}-{i}", "image": rel(path), "conversations": _conv(
            [(str(rng.choice(prompts1)), f"{_a(info['color'])} {info['color']} {info['shape']}")], "<image>")})
        long_cap = (f"{_a(info['size'])} {info['size']} {info['color']} {info['shape']} at the {info['position']} "
                    f"on {_a(info['background'])} {info['background']} background")
        stage2.append({"id": f"s2{suffix}-img-{i}", "image": rel(path),
                       "conversations": _conv([("Describe the image.", long_cap)], "<image>")})
    for i in range(0, n_images - 1, 4):  # interleaved two-image samples
        (p1, a), (p2, b) = images[i], images[i + 1]
        stage2.append({"id": f"s2{suffix}-pair-{i}", "image": [p1, p2], "conversations": _conv(
            [("Describe the two images.", f"First {_a(a['color'])} {a['color']} {a['shape']}, then "
                                          f"{_a(b['color'])} {b['color']} {b['shape']}.")], "<image>\n<image>")})
    for i in range(n_short):
        rng = np.random.default_rng([seed, split, 2, i])
        frames, info = short_clip(rng, needle=rng.random() < needle_fraction)
        path = os.path.join(media_dir, "short", f"short_{i:05d}.mp4")
        write_video(path, frames, SHORT_FPS)
        if "needle" not in info:
            stage2.append({"id": f"s2{suffix}-vid-{i}", "video": rel(path),
                           "conversations": _conv([("Describe the video.", _describe_objects(info) + ".")], "<video>")})
        stage3.append({"id": f"s3{suffix}-{i}", "video": rel(path),
                       "conversations": _conv(_short_qa(rng, info), "<video>")})
        if "needle" not in info and i % 2 == 0:
            q, opts, ans = _mcq(rng, info)
            stage3.append({"id": f"s3{suffix}-mcq-{i}", "video": rel(path),
                           "conversations": _conv([(mcq_prompt(q, opts), ans)], "<video>")})
    for i in range(n_long):
        rng = np.random.default_rng([seed, split, 3, i])
        frames, info = long_clip(rng, LONG_FRAMES, LONG_SEGMENTS, needle=True)
        path = os.path.join(media_dir, "long", f"long_{i:05d}.mp4")
        write_video(path, frames, LONG_FPS)
        stage5.append({"id": f"s5{suffix}-{i}", "video": rel(path),
                       "conversations": _conv(_long_qa(rng, info), "<video>")})
        stage5.append({"id": f"s5{suffix}-cap-{i}", "video": rel(path), "conversations": _conv(
            [(LONG_CAPTION_PROMPTS[i % 3], _describe_segments(info))], "<video>")})
    for k, records in zip((1, 2, 3, 5), (stage1, stage2, stage3, stage5)):
        order = np.random.default_rng([seed, split, 9, k]).permutation(len(records))
        _write_json(os.path.join(json_dir, f"stage{k}{suffix}.json"), [records[j] for j in order])
    return {"stage1": len(stage1), "stage2": len(stage2), "stage3": len(stage3), "stage5": len(stage5)}


def _niah_train(out: str, cfg: DemoConfig) -> int:
    """stage5_niah.json: needle-in-a-haystack records (half in each layout) on training haystacks; returns the count."""
    hays, needles, records = [], [], []
    for i in range(cfg.niah_haystacks):
        frames, _ = long_clip(np.random.default_rng([cfg.seed, 0, 10, i]), HAYSTACK_SECONDS * HAYSTACK_FPS,
                              HAYSTACK_SEGMENTS, needle=False)
        hays.append(os.path.join("media", "haystack", f"haystack_{i:03d}.mp4"))
        write_video(os.path.join(out, hays[-1]), frames, HAYSTACK_FPS)
    for i in range(cfg.niah_needles):
        color = list(COLORS)[i % len(COLORS)]
        img, _ = needle_frame(np.random.default_rng([cfg.seed, 0, 11, i]), color)
        needles.append((os.path.join("media", "needles", f"needle_{i:04d}.png"), color))
        _png(os.path.join(out, needles[-1][0]), img)
    for j in range(cfg.niah_samples):
        rng = np.random.default_rng([cfg.seed, 0, 12, j])
        n = int(rng.integers(cfg.niah_min_frames, min(cfg.niah_max_frames, HAYSTACK_SECONDS) + 1))
        needle, color = needles[int(rng.integers(len(needles)))]
        records.append({"id": f"s5-niah-{j}", "haystack": hays[int(rng.integers(len(hays)))], "needle": needle,
                        "frames": n, "depth": round(float(rng.uniform(0, 1)), 3), "fps": 1.0,
                        "start": int(rng.integers(0, HAYSTACK_SECONDS - n + 1)), "layout": NIAH_LAYOUTS[j % 2],
                        "question": "What color is the needle?", "answer": color})
    _write_json(os.path.join(out, "stage5_niah.json"), records)
    return len(records)


def make_demo(out: str, cfg: DemoConfig = DemoConfig(), tokenizer_cache: str | None = None) -> dict:
    """Write the demo tree into `out`, a new or empty folder (a finished demo of these settings is kept); returns
    meta.json's content. Written into a sibling folder and renamed into place: `out` never holds half a demo."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        return _existing_demo(out, cfg)
    t0 = time.time()
    tmp = f"{os.path.normpath(out)}.partial-{os.getpid()}"
    try:
        meta = _write_demo(tmp, cfg, tokenizer_cache)
        os.replace(tmp, out)  # onto a missing or an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"demo data written to {out} in {time.time() - t0:.1f} s: {meta['counts']}")
    return meta


def _existing_demo(out: str, cfg: DemoConfig) -> dict:
    """The meta of the finished demo of these settings in `out`; an InputError for anything else."""
    try:
        with open(os.path.join(out, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = None
    ours = isinstance(meta, dict) and meta.get("generator") == "data.py demo"
    if ours and meta.get("version") == DEMO_VERSION and meta.get("config") == asdict(cfg):
        print(f"{out}: the demo data of these settings is already there")
        return meta
    what = "demo data of other settings or of another version" if ours else "files that are not demo data"
    raise InputError(f"{out}: the folder holds {what}; demo data is written only into a new or empty folder "
                     "(choose another folder, or delete this one)")


def _write_demo(out: str, cfg: DemoConfig, tokenizer_cache: str | None) -> dict:
    """Every file of the demo tree under `out`; returns meta.json's content."""
    seed = cfg.seed
    os.makedirs(out)
    counts = _demo_split(out, seed, 0, cfg.images, cfg.short_videos, cfg.long_videos, cfg.needle_fraction)
    ev = os.path.join(out, "eval")
    counts["val"] = _demo_split(ev, seed, 1, cfg.val_images, cfg.val_short_videos, cfg.val_long_videos,
                                cfg.needle_fraction, suffix="_val")
    counts["stage5_niah"] = _niah_train(out, cfg)
    # stage 4: passkey documents, as text and pre-tokenised
    tok = Tokenizer.tiny(tokenizer_cache)
    for name, n, split in (("stage4.txt", cfg.passkey_docs, 0), (os.path.join("eval", "stage4_val.txt"),
                                                                  cfg.val_passkey_docs, 1)):
        docs = [_passkey_doc(np.random.default_rng([seed, split, 4, i])) for i in range(n)]
        with open(os.path.join(out, name), "w") as f:
            f.write("\n\n".join(docs) + "\n")
    counts["stage4_tokens"] = tokenize_to_bin(os.path.join(out, "stage4.txt"), tok, os.path.join(out, "stage4.bin"))
    tok.save(os.path.join(out, "tokenizer.json"))
    # held-out NIAH material: haystacks without needles, one needle per colour
    for i in range(cfg.haystacks):
        frames, _ = long_clip(np.random.default_rng([seed, 2, 5, i]), HAYSTACK_SECONDS * HAYSTACK_FPS,
                              HAYSTACK_SEGMENTS, needle=False)
        write_video(os.path.join(ev, "niah", "haystack", f"haystack_{i:03d}.mp4"), frames, HAYSTACK_FPS)
    needles = []
    for i, color in enumerate(COLORS):
        img, _ = needle_frame(np.random.default_rng([seed, 2, 6, i]), color)
        _png(os.path.join(ev, "niah", "needles", f"needle_{i:03d}.png"), img)
        needles.append({"image": f"needle_{i:03d}.png", "question": "What color is the needle?", "answer": color})
    _write_json(os.path.join(ev, "niah", "needles", "needles.json"), needles)
    # held-out VideoMME-style multiple choice over short videos
    mcq = []
    for i in range(cfg.mcq):
        rng = np.random.default_rng([seed, 2, 7, i])
        frames, info = short_clip(rng, needle=False)
        write_video(os.path.join(ev, "mcq", "videos", f"mcq_{i:05d}.mp4"), frames, SHORT_FPS)
        q, opts, ans = _mcq(rng, info)
        mcq.append({"video": f"videos/mcq_{i:05d}.mp4", "question": q, "options": opts, "answer": ans,
                    "duration": "short"})
    _write_json(os.path.join(ev, "mcq", "mcq.json"), mcq)
    caps = []
    for i in range(cfg.caption_videos):
        frames, info = long_clip(np.random.default_rng([seed, 2, 8, i]), LONG_FRAMES, LONG_SEGMENTS, needle=False)
        write_video(os.path.join(ev, "caption", "videos", f"cap_{i:03d}.mp4"), frames, LONG_FPS)
        caps.append({"video": f"videos/cap_{i:03d}.mp4", "caption": _describe_segments(info)})
    _write_json(os.path.join(ev, "caption", "caption.json"), caps)
    meta = {"generator": "data.py demo", "version": DEMO_VERSION, "seed": seed, "config": asdict(cfg),
            "size": DEMO_SIZE, "counts": counts,
            "colors": {k: list(v) for k, v in COLORS.items()}, "shapes": SHAPES, "motions": list(MOTIONS),
            "backgrounds": {k: list(v) for k, v in BACKGROUNDS.items()}, "needle_background": list(NEEDLE_BACKGROUND),
            "videos": {"short": {"frames": SHORT_FRAMES, "fps": SHORT_FPS},
                       "long": {"frames": LONG_FRAMES, "fps": LONG_FPS, "segments": LONG_SEGMENTS},
                       "haystack": {"frames": HAYSTACK_SECONDS * HAYSTACK_FPS, "fps": HAYSTACK_FPS, "read_fps": 1}},
            "recommended": {"stage1": [["stage1.json", 1.0]], "stage2": [["stage2.json", 1.0]],
                            "stage3": [["stage3.json", 1.0]], "stage4": "stage4.bin",
                            "stage5": [["stage5.json", 1.0], ["stage3.json", 0.5], ["stage5_niah.json", 1.0]],
                            "num_frames": {"stage2": SHORT_FRAMES, "stage3": SHORT_FRAMES, "stage5": LONG_FRAMES}},
            "tokenizer": "tokenizer.json"}
    _write_json(os.path.join(out, "meta.json"), meta)
    return meta


# -----------------------------------------------------------------------------
# Long-video instruction data (paper section 4): segment captions -> LLM-written QA pairs -> LLaVA JSON
# The reference publishes neither this code nor its prompts. Each finished video gets a done-file in work_dir,
# written atomically, so a crash or kill loses at most the video in flight; rerunning the same command skips
# finished videos and rebuilds the output JSON from all done-files.

VIDEO_EXTS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v")
QA_CATEGORIES = ["summary", "temporal order", "counting", "spatial detail", "reasoning"]
_CATEGORY_ALIASES = {"summarization": "summary", "overall": "summary", "temporal": "temporal order",
                     "order": "temporal order", "sequence": "temporal order", "count": "counting",
                     "spatial": "spatial detail", "detail": "spatial detail", "details": "spatial detail",
                     "spatial details": "spatial detail", "reason": "reasoning", "causal": "reasoning"}
SEGMENT_PROMPT = "<video>\nDescribe what happens in this video clip in detail."


def qa_prompt(captions: list[tuple[float, float, str]], pairs_per_category: int = 2) -> str:
    """The text prompt that turns ordered segment captions into QA pairs about the whole video."""
    lines = "\n".join(f"[{a:.0f}s-{b:.0f}s] {c.strip()}" for a, b, c in captions)
    return ("Below are captions of consecutive segments of one video, in order, with their times.\n"
            f"{lines}\n\n"
            f"Write {pairs_per_category} question-answer pairs about the WHOLE video for each of these categories: "
            f"{', '.join(QA_CATEGORIES)}. Use only facts in the captions; temporal order questions ask what happens "
            "before or after what; counting questions have a number as the answer. Write one pair per line, exactly "
            "in the form:\ncategory | question | answer")


def parse_qa(text: str) -> list[dict]:
    """The valid `category | question | answer` lines (bullets, numbering, Q:/A: tolerated), each question once.
    Valid: a known category, a question with letters ("?" added if missing), an answer that is not a refusal."""
    out, seen = [], set()
    for line in text.splitlines():
        parts = [p.strip() for p in line.strip().lstrip("-*0123456789.) \t").split("|")]
        if len(parts) != 3:
            continue
        name = re.sub(r"[^a-z ]", "", parts[0].lower()).strip()
        cat = name if name in QA_CATEGORIES else _CATEGORY_ALIASES.get(name)
        q = re.sub(r"^(q(uestion)?\s*[:.]\s*)", "", parts[1], flags=re.I).strip()
        a = re.sub(r"^(a(nswer)?\s*[:.]\s*)", "", parts[2], flags=re.I).strip()
        if cat is None or not re.search(r"[A-Za-z]", q) or not a:
            continue
        if a.lower().strip(" .") in ("", "unknown", "n/a", "none", "not mentioned", "cannot be determined"):
            continue
        q = q if q.endswith("?") else q + "?"
        if q.lower() in seen:
            continue
        seen.add(q.lower())
        out.append({"category": cat, "question": q, "answer": a})
    return out


def video_segments(duration_s: float, segment_s: float) -> list[tuple[float, float]]:
    """Consecutive [start, end) windows of segment_s seconds; a tail shorter than 1 s joins the last window."""
    if duration_s <= 0:
        return []
    n = max(1, math.ceil(duration_s / segment_s - 1e-9))
    segs = [(k * segment_s, min((k + 1) * segment_s, duration_s)) for k in range(n)]
    if len(segs) > 1 and segs[-1][1] - segs[-1][0] < 1.0:
        segs[-2:] = [(segs[-2][0], segs[-1][1])]
    return segs


def _done_path(work_dir: str, video: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.splitext(os.path.basename(video))[0])[:80]
    return os.path.join(work_dir, f"{stem}-{hashlib.sha1(video.encode()).hexdigest()[:10]}.json")


def longvideo_sft(videos: list[str], out_json: str, caption_fn, text_fn, segment_s: float = 10.0,
                  frames_per_segment: int = 8, work_dir: str | None = None, pairs_per_category: int = 2) -> dict:
    """Long-video QA data: caption_fn(frames, prompt) captions each segment, the LLM text_fn(prompt) writes QA pairs.
    Video paths in out_json are relative to its folder; returns the counts."""
    work_dir = work_dir or out_json + ".parts"
    os.makedirs(work_dir, exist_ok=True)
    out_dir = os.path.dirname(os.path.abspath(out_json))
    stats = {"videos": len(videos), "done": 0, "skipped": 0, "resumed": 0}
    for path in videos:
        done = _done_path(work_dir, os.path.abspath(path))
        if os.path.isfile(done):
            stats["resumed"] += 1
            continue
        rel = os.path.relpath(os.path.abspath(path), out_dir)
        try:
            with VideoFile(path) as video:
                duration = video.num_frames / video.fps
                captions = []
                for a, b in video_segments(duration, segment_s):
                    lo = int(round(a * video.fps))
                    hi = max(lo + 1, min(video.num_frames, int(round(b * video.fps))))
                    idx = lo + uniform_indices(hi - lo, frames_per_segment)  # (f,) frames inside [a, b)
                    captions.append((a, b, caption_fn(video.get(idx), SEGMENT_PROMPT).strip()))
        except MediaError as e:
            warnings.warn(f"longvideo_sft: skipping {path}: {e}")
            write_text_atomic(done, json.dumps({"video": rel, "error": str(e)}, indent=1))
            stats["skipped"] += 1
            continue
        raw = text_fn(qa_prompt(captions, pairs_per_category))
        pairs = parse_qa(raw)
        if not pairs:
            warnings.warn(f"longvideo_sft: {path}: the LLM output held no valid `category | question | answer` line")
        record = {"video": rel, "duration_s": duration, "raw": raw, "qa": pairs,
                  "segments": [{"start": a, "end": b, "caption": c} for a, b, c in captions]}
        write_text_atomic(done, json.dumps(record, indent=1))
        stats["done"] += 1
    samples = []
    for path in videos:  # rebuild the output from every done-file, in input order
        with open(_done_path(work_dir, os.path.abspath(path))) as f:
            rec = json.load(f)
        if rec.get("qa"):
            samples.append({"id": os.path.splitext(os.path.basename(path))[0], "video": rec["video"],
                            "categories": [p["category"] for p in rec["qa"]],
                            "conversations": _conv([(p["question"], p["answer"]) for p in rec["qa"]], "<video>")})
    write_text_atomic(out_json, json.dumps(samples, indent=1))
    stats.update(samples=len(samples), pairs=sum(len(s["categories"]) for s in samples))
    return stats


def checkpoint_generators(captioner: str, llm: str, device: str = "cpu", max_new_tokens: int = 256):
    """caption_fn and text_fn backed by LongVILA checkpoints (the LLM one is used text-only)."""
    models = {}

    def load(path):
        if path not in models:
            models[path] = (LongVILA.from_pretrained(path, device=device).eval(), Tokenizer.for_checkpoint(path))
        return models[path]

    @torch.no_grad()
    def caption_fn(frames, prompt):
        model, tok = load(captioner)
        pixels = preprocess(frames, model.config.vision.image_size, model.config.image_aspect_ratio)  # (F, 3, S, S)
        ids, _ = build_conversation([{"from": "human", "value": prompt}], tok, [len(frames)],
                                    model.config.tokens_per_frame)
        out = model.generate(torch.tensor([ids], device=device), images=[pixels.to(device)],
                             max_new_tokens=max_new_tokens, eos_token_id=tok.stop_ids)  # (1, T_new)
        return tok.decode(out[0].tolist())

    @torch.no_grad()
    def text_fn(prompt):
        model, tok = load(llm)
        ids, _ = build_conversation([{"from": "human", "value": [prompt]}], tok, [], 1)  # literal text
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new_tokens * 4,
                             eos_token_id=tok.stop_ids)  # (1, T_new)
        return tok.decode(out[0].tolist())

    return caption_fn, text_fn


def _list_videos(spec: str) -> list[str]:
    """The videos of a folder, or of a text file with one path per line."""
    if os.path.isdir(spec):
        videos = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(VIDEO_EXTS))
    elif os.path.isfile(spec) and not spec.lower().endswith(VIDEO_EXTS):
        with open(spec, encoding="utf-8", errors="replace") as f:
            videos = [line.strip() for line in f if line.strip()]
    else:
        raise InputError(f"{spec}: --videos must be a folder of videos or a text file with one path per line")
    if not videos:
        raise InputError(f"{spec}: no videos ({', '.join(VIDEO_EXTS)}) listed there")
    return videos


# -----------------------------------------------------------------------------
# A progress line for the command lines (data generation, training, evaluation)

class Progress:
    """`niah  12/36 [========                ]  33% 0:41<1:22 acc=0.92` on stderr, redrawn in place on a terminal;
    in a log file, a new line each time another EVERY of the work is done."""

    WIDTH, EVERY = 24, 0.05  # characters of the bar; fraction of the work between two lines of a log file

    def __init__(self, total: int, desc: str = "", enabled: bool = True, stream=None):
        self.total, self.desc, self.enabled = max(int(total), 0), desc, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.n, self.t0, self.postfix, self.shown = 0, time.time(), "", -1.0
        self._draw()

    @staticmethod
    def _clock(s: float) -> str:
        s = int(s)
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"

    def _draw(self, final: bool = False):
        if not self.enabled:
            return
        frac = self.n / self.total if self.total else 1.0
        fill = int(frac * self.WIDTH)
        elapsed = time.time() - self.t0
        eta = elapsed / self.n * (self.total - self.n) if self.n else 0.0
        line = (f"{self.desc} {self.n}/{self.total} [{'=' * fill}{' ' * (self.WIDTH - fill)}] {frac:4.0%} "
                f"{self._clock(elapsed)}<{self._clock(eta)} {self.postfix}").rstrip()
        if self.live:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        elif final or frac >= self.shown + self.EVERY:
            self.stream.write(line + "\n")
            self.shown = frac
        self.stream.flush()

    def update(self, n: int = 1, **postfix):
        self.n += n
        self.postfix = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
        self._draw()

    def close(self):
        if self.live or self.shown < 1.0:
            self._draw(final=True)


# -----------------------------------------------------------------------------
# Command line (the parser is at the top of the file)

def run(args: argparse.Namespace):
    if args.cmd == "demo":
        cfg = DemoConfig(seed=args.seed, images=args.images, short_videos=args.short_videos,
                         long_videos=args.long_videos, passkey_docs=args.passkey_docs)
        make_demo(args.out, cfg, args.tokenizer_cache)
    elif args.cmd == "longvideo_sft":
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        caption_fn, text_fn = checkpoint_generators(args.captioner, args.llm, device, args.max_new_tokens)
        stats = longvideo_sft(_list_videos(args.videos), args.out, caption_fn, text_fn, args.segment_s,
                              args.frames_per_segment, args.work_dir, args.pairs_per_category)
        print(json.dumps(stats))
    elif args.cmd == "tokenize":
        tok = (Tokenizer.tiny() if args.tokenizer is None else Tokenizer.for_checkpoint(args.tokenizer)
               if os.path.isdir(args.tokenizer) else Tokenizer.from_file(args.tokenizer))
        print(f"{tokenize_to_bin(args.text, tok, args.out)} tokens -> {args.out}")


def main(argv=None):
    args = build_parser().parse_args(argv) if argv is not None else ARGS
    try:
        run(args)
    except InputError as e:  # a user's mistake: one line, exit 2 (a traceback is for bugs)
        print(f"data.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
