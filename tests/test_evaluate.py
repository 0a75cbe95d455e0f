"""Tests of evaluate.py: scorers and plots against hand-made cases, every task end to end on the demo data with a
tiny random-weight checkpoint, and NIAH under sp=2 (gloo) against one process.

    python -m pytest -q tests/test_evaluate.py
"""
import io
import json
import os
import types

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as ev
from data import Tokenizer
from helpers import run_workers

# -----------------------------------------------------------------------------
# pure functions


REPLIES = {  # hand-written replies -> the letter a reader would take (None: no answer)
    "B": "B", "(C)": "C", "d.": "D", "a": "A", " B \n": "B",
    "The answer is (B).": "B", "The best answer is: C": "C", "Answer: D": "D", "answer:b": "B",
    "The answer is A": "A", "the answer is c": "C", "The correct option is A, the red car.": "A",
    "B. The man is cooking.": "B", "A) red": "A", "(D) A woman sings.": "D", "B) Because it is red": "B",
    "It is D": "D", "The video shows a dog. C": "C", "A.": "A",
    "A man walks into the room, so the answer is D.": "D",
    "Based on the video, the person opens the door first. Therefore, the best answer is (A).": "A",
    "I think it is option c.": "C",
    "The answer is a dog running, option B.": "B",  # "answer is a" + word is not a letter answer
    "A cat sits on a mat.": None, "The answer is A man.": None, "none of them": None, "": None,
    "Bananas are yellow": None, "Option 3": None,
}


@pytest.mark.parametrize("reply,letter", list(REPLIES.items()))
def test_extract_choice_hand_written(reply, letter):
    assert ev.extract_choice(reply) == letter


def test_normalize_and_answer_correct():
    tok = Tokenizer.tiny()
    assert ev.normalize_answer(" Red \n Circle") == "redcircle"
    red, sp_red = tok.encode("red"), tok.encode(" Red")
    assert red != sp_red and ev.answer_correct(sp_red, red, tok.decode)  # same answer after normalisation
    assert not ev.answer_correct(tok.encode("blue"), red, tok.decode)
    assert ev.answer_correct(red, red, lambda ids: "never called for equal ids")


def test_needle_index_and_insert():
    assert [ev.needle_index(d, 10) for d in ev.DEFAULT_DEPTHS] == [0, 2, 4, 6, 8, 10]
    assert ev.needle_index(0.29, 100) == 29  # int(0.29 * 100) would be 28
    assert ev.needle_index(-0.5, 4) == 0 and ev.needle_index(1.7, 4) == 4  # clipped
    hay = torch.arange(5.0).view(5, 1)  # (F, 1)
    out = ev.insert_needle(hay, torch.tensor([9.0]), 0.4)  # index round(0.4 * 5) = 2
    assert out.view(-1).tolist() == [0, 1, 9, 2, 3, 4]
    assert ev.insert_needle(hay, torch.tensor([9.0]), 1.0).view(-1).tolist() == [0, 1, 2, 3, 4, 9]


def test_accuracy_by_duration():
    rows = [{"correct": True, "duration": "short"}, {"correct": False, "duration": "short"},
            {"correct": True, "duration": "long"}, {"correct": True, "duration": "medium"}]
    assert ev.accuracy_by(rows, "duration") == {"overall": 0.75, "long": 1.0, "medium": 1.0, "short": 0.5}


def test_heatmap_png_size_and_colours(tmp_path):
    grid = np.array([[0.0, 0.5, 1.0], [1.0, np.nan, 0.25]])  # (depths, frame counts)
    path = tmp_path / "heat.png"
    ev.draw_heatmap(grid, ["0", "100"], ["8", "16", "1.4K"], str(path), "test: mean 55%")
    img = Image.open(path).convert("RGB")
    assert img.size == ev.heatmap_size(2, 3)
    assert ev.heatmap_color(0.0) == (240, 73, 110) and ev.heatmap_color(1.0) == (154, 213, 179)  # red, green
    assert ev.heatmap_color(0.5) == (235, 184, 57)  # yellow in the middle
    for r in range(2):
        for c in range(3):
            x0, y0, x1, y1 = ev.heatmap_cell_box(r, c)
            for x, y in ((x0 + 3, y0 + 3), (x0 + 10, y1 - 12), ((x0 + x1) // 2 - 20, (y0 + y1) // 2)):
                assert img.getpixel((x, y)) == ev.heatmap_color(grid[r, c]), (r, c, x, y)
    # the score is written inside measured cells (dark text pixels), and the title/labels are drawn
    x0, y0, x1, y1 = ev.heatmap_cell_box(0, 0)
    cell = np.asarray(img.crop((x0, y0, x1, y1)))
    assert (cell.sum(-1) < 200).any()
    top = np.asarray(img.crop((0, 0, img.size[0], ev.HEATMAP_MARGIN["top"] - 16)))
    assert (top.sum(-1) < 200).any()


def test_results_file_header_check(tmp_path):
    path = str(tmp_path / "r.json")
    res = ev.load_results(path, {"task": "x", "n": 1})
    res["cells"]["a"] = {"correct": [True]}
    ev.save_results(path, res)
    assert ev.load_results(path, {"task": "x", "n": 1})["cells"] == {"a": {"correct": [True]}}
    with pytest.raises(ValueError, match="differs in \\['n'\\]"):
        ev.load_results(path, {"task": "x", "n": 2})


def test_progress_bar():
    out = io.StringIO()
    bar = ev.Progress(3, "niah", stream=out)
    bar.update(1, acc=0.5)
    bar.update(2)
    bar.close()
    text = out.getvalue()
    assert "niah 1/3" in text and "acc=0.5" in text and "3/3 [" + "=" * 24 + "] 100%" in text
    assert text.endswith("\n")


def test_passkey_prompt_layout():
    tok = Tokenizer.tiny()
    for depth in (0.0, 0.5, 1.0):
        ids, pos, ans = ev.passkey_prompt(tok, 200, depth, "48213", style="demo")
        assert len(ids) <= 200 and ids[pos[0]:] == ans and tok.decode(ans).strip() == "48213"
        text = tok.decode(ids)
        assert text.count("48213") == 3 and text.rstrip().endswith("The pass key is 48213")
    first = tok.decode(ev.passkey_prompt(tok, 200, 0.0, "48213", style="demo")[0])
    last = tok.decode(ev.passkey_prompt(tok, 200, 1.0, "48213", style="demo")[0])
    needle = "The pass key is 48213. Remember it. 48213 is the pass key."
    assert first.startswith("There is a pass key hidden inside a lot of text. " + needle) and "  " not in first
    assert last.endswith(needle + " What is the pass key? The pass key is 48213")


# -----------------------------------------------------------------------------
# NIAH scorer with a fake model that answers right only at known depths


class FakeNIAHModel(torch.nn.Module):
    """Token embeddings are one-hot (C = V + 1); a frame's visual features are zeros with the last channel = the
    frame's mean pixel (needles are white, haystack frames black). The "LLM" finds the needle's frame index i
    among the F + 1 frames and predicts the true next tokens (teacher forcing makes them visible) when i is the
    index of one of `right_depths`, else always the pad token."""

    def __init__(self, tokenizer, right_depths, tokens_per_frame=2):
        super().__init__()
        V = tokenizer.vocab_size
        self.V, self.right, self.pad = V, list(right_depths), tokenizer.pad_id
        self.config = types.SimpleNamespace(vision=types.SimpleNamespace(image_size=8),
                                            tokens_per_frame=tokens_per_frame, num_video_frames=4)
        self.emb = torch.nn.Embedding(V, V + 1)
        with torch.no_grad():
            self.emb.weight.copy_(torch.eye(V, V + 1))
        self.llm = types.SimpleNamespace(tok_embeddings=self.emb, output=torch.nn.Identity())
        self.forwards, self.encoded = 0, []

    def encode_images(self, frames):  # (F, 3, S, S) -> (F, N, C)
        self.encoded.append(frames.shape[0])
        f = torch.zeros(frames.shape[0], self.config.tokens_per_frame, self.V + 1)
        f[..., -1] = frames.mean(dim=(1, 2, 3))[:, None]
        return f

    def forward_embeds(self, h, positions, attn=None, cache=None):  # (1, T, C) -> "hidden" = one-hot logits (1,T,V)
        self.forwards += 1
        text = h[0, :, :self.V]  # (T, V)
        visual = text.abs().sum(-1) == 0  # (T,)
        ids = text.argmax(-1)  # (T,)
        vis_idx = visual.nonzero().view(-1)
        needle_row = (h[0, vis_idx, -1] > 0.5).nonzero().view(-1)[0]
        frame = int(needle_row) // self.config.tokens_per_frame
        n = vis_idx.numel() // self.config.tokens_per_frame - 1  # haystack frames
        pred = torch.full_like(ids, self.pad)
        if any(frame == ev.needle_index(d, n) for d in self.right):
            pred[:-1] = ids[1:]
        return torch.nn.functional.one_hot(pred, self.V).float()[None]


def _fake_inputs():
    hay = [np.zeros((12, 8, 8, 3), np.uint8), np.zeros((12, 8, 8, 3), np.uint8)]  # 2 black haystacks, 12 frames
    white = np.full((8, 8, 3), 255, np.uint8)
    needles = [{"image": white, "question": "What color is the needle?", "answer": "red"},
               {"image": white, "question": "What shape is the needle?", "answer": "big red circle"}]
    return hay, needles


def test_niah_fake_model_gives_expected_grid(tmp_path):
    tok = Tokenizer.tiny()
    hay, needles = _fake_inputs()
    right = [0.0, 0.6, 1.0]
    model = FakeNIAHModel(tok, right)
    depths, counts = list(ev.DEFAULT_DEPTHS), [5, 10]
    res = ev.run_niah(model, tok, hay, needles, depths, counts, out_dir=str(tmp_path), progress=False)
    expected = [[1.0 if d in right else 0.0] * len(counts) for d in depths]
    assert res["grid"] == expected and res["mean"] == pytest.approx(0.5)
    assert model.forwards == len(depths) * len(counts) * len(hay) * len(needles)
    assert model.encoded == [2, 10, 10]  # the needles once, then each haystack's first 10 frames once
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["grid"] == expected
    cell = saved["cells"]["haystack_0|frames=10|depth=0.6"]
    assert cell["correct"] == [True, True] and cell["predictions"][1] == "big red circle"
    assert cell["needle_index"] == 6
    img = Image.open(tmp_path / "heatmap.png")
    assert img.size == ev.heatmap_size(len(depths), len(counts))

    # resume: drop three cells from the file; a rerun computes only those and gives the same grid
    for k in ["haystack_1|frames=5|depth=0.2", "haystack_0|frames=10|depth=1", "haystack_1|frames=10|depth=0"]:
        del saved["cells"][k]
    json.dump(saved, open(tmp_path / "results.json", "w"))
    model2 = FakeNIAHModel(tok, right)
    res2 = ev.run_niah(model2, tok, hay, needles, depths, counts, out_dir=str(tmp_path), progress=False)
    assert model2.forwards == 3 * len(needles) and res2["grid"] == expected
    # a different set of needles is a different experiment: refuse to mix it into the same file
    with pytest.raises(ValueError, match="different run"):
        ev.run_niah(model2, tok, hay, needles[:1], depths, counts, out_dir=str(tmp_path), progress=False)


# -----------------------------------------------------------------------------
# the real tiny model: a random-weight checkpoint, single process vs sp=2 on gloo


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny random-weight checkpoint in the VILA layout with the tiny tokenizer (seeded)."""
    from longvila import PRESETS, LongVILA

    root = tmp_path_factory.mktemp("ckpt")
    tok_json = str(root / "tokenizer.json")
    Tokenizer.tiny().save(tok_json)
    torch.manual_seed(0)
    LongVILA(PRESETS["tiny"]).save_pretrained(str(root / "tiny"), tokenizer_json=tok_json)
    return str(root / "tiny")


def _niah_inputs():
    rng = np.random.default_rng(0)
    hay = [rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)]  # one haystack (F, H, W, 3)
    needles = [{"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "question": q, "answer": a}
               for q, a in (("What color is the needle?", "red"), ("What shape is it?", "big blue square"))]
    return hay, needles


def _niah_worker(rank, world, ckpt, ring, text):
    from longvila import LongVILA
    from mmsp import make_layout

    layout = make_layout(sp=world, ring=ring)
    model = LongVILA.from_pretrained(ckpt).eval()
    tok = Tokenizer.for_checkpoint(ckpt)
    hay, needles = _niah_inputs()
    res = ev.run_niah(model, tok, hay, needles, [0.0, 0.5, 1.0], [4, 8], layout=layout, progress=False)
    ppl = ev.run_ppl(model, tok, text, 48, max_windows=2, layout=layout, progress=False)["nll"]
    return res["grid"], {k: v["predictions"] for k, v in res["cells"].items()}, ppl


def test_niah_sp2_matches_one_process(tiny_ckpt, tmp_path):
    from longvila import LongVILA

    model = LongVILA.from_pretrained(tiny_ckpt).eval()
    tok = Tokenizer.for_checkpoint(tiny_ckpt)
    hay, needles = _niah_inputs()
    ref = ev.run_niah(model, tok, hay, needles, [0.0, 0.5, 1.0], [4, 8], progress=False)
    ref_preds = {k: v["predictions"] for k, v in ref["cells"].items()}
    # the predictions of the random model are not all the same string: the comparison below has teeth
    assert len({p for ps in ref_preds.values() for p in ps}) > 1
    text = str(tmp_path / "text.txt")
    with open(text, "w") as f:
        f.write(" ".join(f"The sky is blue. Here we go {i}." for i in range(40)))
    ref_nll = ev.run_ppl(model, tok, text, 48, max_windows=2, progress=False)["nll"]
    for ring in (1, 2):  # Ulysses (1 x 2) and zigzag ring (2 x 1)
        for grid, preds, nll in run_workers(_niah_worker, 2, (tiny_ckpt, ring, text)):
            assert grid == ref["grid"] and preds == ref_preds, f"ring={ring}"
            assert nll == pytest.approx(ref_nll, rel=1e-4), f"ring={ring}"  # ppl sums the ranks' loss shares


# -----------------------------------------------------------------------------
# every task end to end from the command line, on demo data, with the tiny random checkpoint


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import data

    root = str(tmp_path_factory.mktemp("demo"))
    data.make_demo(root, data.DemoConfig(images=2, short_videos=2, long_videos=1, passkey_docs=2, val_images=1,
                                         val_short_videos=1, val_long_videos=1, haystacks=2, mcq=3,
                                         caption_videos=2, val_passkey_docs=4))
    return os.path.join(root, "eval")


def test_task_niah_cli(tiny_ckpt, demo, tmp_path, capsys):
    out = str(tmp_path / "niah")
    args = ["niah", "--model", tiny_ckpt, "--haystacks", os.path.join(demo, "niah", "haystack"), "--needles",
            os.path.join(demo, "niah", "needles"), "--frame_counts", "2,4", "--depths", "0,1", "--out", out]
    ev.main(args)
    res = json.load(open(os.path.join(out, "results.json")))
    assert np.asarray(res["grid"]).shape == (2, 2) and len(res["cells"]) == 2 * 2 * 2  # haystacks x depths x counts
    assert all(len(c["correct"]) == 8 for c in res["cells"].values())  # the 8 demo needles
    assert f"mean accuracy {res['mean']:.4f}" in capsys.readouterr().out
    assert Image.open(os.path.join(out, "heatmap.png")).size == ev.heatmap_size(2, 2)


def test_task_mcq_cli(tiny_ckpt, demo, tmp_path, capsys):
    out = str(tmp_path / "mcq")
    ev.main(["mcq", "--model", tiny_ckpt, "--questions", os.path.join(demo, "mcq", "mcq.json"), "--num_frames", "4",
             "--max_new_tokens", "3", "--out", out])
    res = json.load(open(os.path.join(out, "mcq.json")))
    rows = list(res["cells"].values())
    assert len(rows) == 3 and all(r["prediction"] == ev.extract_choice(r["reply"]) for r in rows)
    assert res["accuracy"]["overall"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    assert set(res["accuracy"]) == {"overall", "short"}
    assert "mcq: accuracy overall=" in capsys.readouterr().out


def test_task_caption_and_ask_cli(tiny_ckpt, demo, tmp_path, capsys):
    out = str(tmp_path / "cap")
    ev.main(["caption", "--model", tiny_ckpt, "--video", os.path.join(demo, "caption", "videos"), "--num_frames", "4",
             "--max_new_tokens", "5", "--out", out])
    caps = json.load(open(os.path.join(out, "captions.json")))["cells"]
    assert sorted(caps) == ["cap_000.mp4", "cap_001.mp4"] and all(c["frames"] == 4 for c in caps.values())
    streamed = capsys.readouterr().out
    for name, c in caps.items():  # what was streamed token by token is the final reply
        assert f"[{name}, 4 frames] {c['reply']}" in streamed.replace("\n", "") or c["reply"] == ""
    ev.main(["ask", "--model", tiny_ckpt, "--video", os.path.join(demo, "caption", "videos", "cap_000.mp4"),
             "--question", "What color is the first shape?", "--num_frames", "4", "--max_new_tokens", "4",
             "--no_stream", "--out", str(tmp_path / "ask")])
    reply = json.load(open(tmp_path / "ask" / "captions.json"))["cells"]["cap_000.mp4"]["reply"]
    assert reply == reply.strip()
    # timing on CPU with random frames and a random tiny model (the GPU command uses longvila-8b)
    ev.main(["ask", "--random_init", "tiny", "--random_frames", "6", "--timing", "--max_new_tokens", "3",
             "--repeats", "1", "--out", str(tmp_path / "timing")])
    t = json.load(open(tmp_path / "timing" / "timing.json"))
    assert t["frames"] == 6 and t["decode_tokens"] == 2 and t["prefill_s"] > 0 and t["vision_s"] > 0
    assert "prefill" in capsys.readouterr().out


def test_task_passkey_and_ppl_cli(tiny_ckpt, demo, tmp_path, capsys):
    out = str(tmp_path / "pk")
    ev.main(["passkey", "--model", tiny_ckpt, "--lengths", "96,160", "--depths", "0,1", "--trials", "2",
             "--style", "demo", "--out", out])
    res = json.load(open(os.path.join(out, "results.json")))
    assert np.asarray(res["grid"]).shape == (2, 2) and all(c["tokens"] <= c["length"] for c in res["cells"].values())
    assert os.path.exists(os.path.join(out, "heatmap.png"))
    ev.main(["ppl", "--model", tiny_ckpt, "--text", os.path.join(demo, "stage4_val.txt"), "--seq_len", "64",
             "--max_windows", "3", "--out", str(tmp_path / "ppl")])
    r = json.load(open(tmp_path / "ppl" / "ppl.json"))
    assert r["windows"] == 3 and r["tokens"] == 3 * 63 and r["ppl"] == pytest.approx(np.exp(r["nll"]))
    assert 0.5 * 1024 < r["ppl"] < 2 * 1024  # a random tiny model is about as unsure as the vocabulary is large
    assert "ppl:" in capsys.readouterr().out


def test_prefill_flops_formula_counts_every_matmul():
    """llm_forward_flops (the MFU numerator) against torch's FLOP counter on a real forward of the tiny model.

    Attention runs as explicit matmuls over the full T x T score matrix (the counter sees them; the formula's
    causal half is swapped for the full square), so every FLOP of the blocks and the last token's head is counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from longvila import PRESETS, LongVILA

    torch.manual_seed(0)
    model = LongVILA(PRESETS["tiny"]).eval()
    c, T = model.config.llm, 48

    def dense_attn(q, k, v, layer_idx):  # (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D)
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, 2).transpose(1, 2), v.repeat_interleave(rep, 2).transpose(1, 2)  # (B,H,T,D)
        q = q.transpose(1, 2)  # (B, H, T, D)
        s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5  # (B, H, T, T)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return (s.softmax(-1) @ v).transpose(1, 2)  # (B, T, H, D)

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        hidden = model.forward_embeds(torch.randn(1, T, c.dim), torch.arange(T)[None], attn=dense_attn)
        model.llm.output(hidden[:, -1])
    causal, full = 2.0 * c.n_layers * c.dim * T * T, 4.0 * c.n_layers * c.dim * T * T
    assert counter.get_total_flops() == ev.llm_forward_flops(model, T) - causal + full
