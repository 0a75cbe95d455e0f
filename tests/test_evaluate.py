"""Tests of evaluate.py: the reference's scoring rules and prompts against hand-made cases, plots, every task end to
end on the demo data with a tiny random-weight checkpoint, NIAH under sp=2 (gloo) against one process, results
that resume only the same model / settings / code, and a battery of user mistakes (exit 2, no stack trace).

    python -m pytest -q tests/test_evaluate.py
"""
import io
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as ev
from data import Tokenizer
from helpers import run_workers
from longvila import IMAGE_TOKEN_ID, InputError

# -----------------------------------------------------------------------------
# pure functions


REPLIES = {  # hand-written replies -> what the reference's extract_characters_regex returns ("" = no answer)
    "B": "B", "(C)": "C", "D.": "D", " B \n": "B", "The answer is (B).": "B", "The best answer is: C": "C",
    "The correct answer is D": "D", "The answer A": "A", "It is D": "D", "(D) A woman sings.": "D",
    "A man walks into the room, so the answer is D.": "A",  # the first capital A-D anywhere
    "Based on the video, the best answer is (A).": "B",  # ... even inside a word
    "Best answer: A": "B",  # the missing comma: "Best answer:" is never stripped, the B of "Best" is read
    "The best option is C": "C", "The correct option is D": "D",  # joined prefixes: not stripped, no A-D inside
    "The best option isThe correct option is C": "C",  # the joined prefix itself is stripped
    "Answer: B": "A",  # no "answer" prefix without "The": the A of "Answer"
    "a": "", "the answer is c": "", "option c": "", "": "", "none of them": "",
    "the quick brown fox jumps over the lazy dog and then runs away": "",  # > 10 words, no capital A-D
}


@pytest.mark.parametrize("reply,letter", list(REPLIES.items()))
def test_extract_choice_is_the_reference_rule(reply, letter):
    assert ev.extract_choice(reply) == letter


def test_normalize_and_answer_correct():
    tok = Tokenizer.tiny()
    assert ev.normalize_answer(" Red  Circle") == "redcircle"
    assert ev.normalize_answer("red\ncircle") == "red\ncircle"  # the reference removes spaces only
    red, sp_red = tok.encode("red"), tok.encode(" Red")
    assert red != sp_red and ev.answer_correct(sp_red, red, tok)  # the same answer after normalisation
    assert ev.answer_correct(red, red, tok) and not ev.answer_correct(tok.encode("blue"), red, tok)
    assert not ev.answer_correct(red[:-1] + [tok.eot_id], red, tok)  # a control token is text, not dropped


def test_needle_index_and_insert():
    assert [ev.needle_index(d, 10) for d in ev.DEFAULT_DEPTHS] == [0, 2, 4, 6, 8, 10]
    assert ev.needle_index(0.29, 100) == 28  # the reference's int(depth * N): 0.29 * 100 = 28.999...
    assert ev.needle_index(0.5, 5) == 2 and ev.needle_index(1.0, 7) == 7
    for bad in (-0.5, 1.7):
        with pytest.raises(ValueError):
            ev.needle_index(bad, 4)
    hay = torch.arange(5.0).view(5, 1)  # (F, 1)
    out = ev.insert_needle(hay, torch.tensor([9.0]), 0.4)  # index int(0.4 * 5) = 2
    assert out.view(-1).tolist() == [0, 1, 9, 2, 3, 4]
    assert ev.insert_needle(hay, torch.tensor([9.0]), 1.0).view(-1).tolist() == [0, 1, 2, 3, 4, 9]


def test_niah_prompt_is_the_reference_layout():
    """preprompt + frames without separators + question + postprompt + answer, as eval_vision_niah.py builds it."""
    tok = Tokenizer.tiny()
    ids, pos, ans = ev.niah_prompt(tok, "What color is the needle?", "red", 3, 2)
    pre = ("<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. You are "
           "able to understand the visual content that the user provides, and assist the user with a variety of tasks "
           "using natural language.")
    expected = ([tok.bos_id, tok.token_id("<|start_header_id|>")] + tok.encode("system")
                + [tok.token_id("<|end_header_id|>")] + tok.encode("\n\n" + pre.split("\n\n", 1)[1]) + [tok.eot_id]
                + [tok.token_id("<|start_header_id|>")] + tok.encode("user") + [tok.token_id("<|end_header_id|>")]
                + tok.encode("\n\n") + [IMAGE_TOKEN_ID] * 6 + tok.encode("What color is the needle?") + [tok.eot_id]
                + [tok.token_id("<|start_header_id|>")] + tok.encode("assistant")
                + [tok.token_id("<|end_header_id|>")] + tok.encode("\n\n") + tok.encode("red"))
    assert ids == expected
    assert pos == [len(ids) - 1] and ans == tok.encode("red")


def test_niah_prompt_1400_frames_is_274400_visual_tokens():
    """The paper's 1400 frames x 196 tokens a frame = 274,400 visual tokens (its "274k"), back to back."""
    tok = Tokenizer.tiny()
    ids, _, _ = ev.niah_prompt(tok, "What color is the needle?", "red", 1400, 196)
    slots = [t for t, i in enumerate(ids) if i == IMAGE_TOKEN_ID]
    assert len(slots) == 1400 * 196 == 274_400
    assert slots == list(range(slots[0], slots[0] + 274_400))  # one run: no separator between frames


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
    top = np.asarray(img.crop((0, 0, img.size[0], ev.HEATMAP_MARGIN[1] - 16)))
    assert (top.sum(-1) < 200).any()
    # a long title (the checkpoint's name) widens the image instead of being cut
    long_name = "runs/a-rather-long-experiment-name-with-many-words/stage5-with-even-more-words-in-it"
    ev.draw_heatmap(grid, ["0", "100"], ["8", "16", "1.4K"], str(path), "Needle in a haystack: mean 55.0%",
                    subtitle=long_name)
    assert Image.open(path).size[0] > ev.heatmap_size(2, 3)[0]


def test_checkpoint_name():
    assert ev.checkpoint_name("runs/demo/stage5/model") == "runs/demo/stage5"
    name = "Llama-3-LongVILA-8B-1024Frames"
    assert ev.checkpoint_name(f"/data/ckpt/{name}/") == f"data/ckpt/{name}"
    assert ev.checkpoint_name("model") == "model"


def test_results_file_header_check(tmp_path):
    path = str(tmp_path / "r.json")
    res = ev.load_results(path, {"task": "x", "n": 1})
    res["cells"]["a"] = {"correct": [True]}
    ev.save_results(path, res)
    assert ev.load_results(path, {"task": "x", "n": 1})["cells"] == {"a": {"correct": [True]}}
    with pytest.raises(InputError, match="another run \\(n 1 -> 2\\)"):
        ev.load_results(path, {"task": "x", "n": 2})
    assert ev.load_results(path, {"task": "x", "n": 2}, overwrite=True)["cells"] == {}  # --overwrite: start over
    old = {"model": {"path": "/a", "fingerprint": "1"}, "code": "c"}
    new = {"model": {"path": "/b", "fingerprint": "2"}, "code": "c"}
    assert ev.header_diff(old, new) == ['model.path "/a" -> "/b"', 'model.fingerprint "1" -> "2"']
    with open(tmp_path / "mine.json", "w") as f:
        json.dump({"a": 1}, f)
    for overwrite in (False, True):  # a file evaluate.py did not write is never replaced
        with pytest.raises(InputError, match="not a results file of evaluate.py"):
            ev.load_results(str(tmp_path / "mine.json"), {"task": "x"}, overwrite)


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


def test_boolean_flags():
    args = ev.build_parser().parse_args(["ask", "--num_frames", "4", "--no_stream"])
    assert args.num_frames == 4 and args.stream is False and args.progress is True and args.overwrite is False
    args = ev.build_parser().parse_args(["niah", "--haystacks", "h", "--needles", "n", "--no_progress", "--overwrite"])
    assert args.progress is False and args.overwrite is True


def test_help_answers_without_torch():
    """--help and flag mistakes are answered before torch is imported (the parser is torch-free)."""
    code = ("import runpy, sys\nsys.argv = ['evaluate.py'] + sys.argv[1:]\n"
            "try:\n    runpy.run_path('evaluate.py', run_name='__main__')\n"
            "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for argv, code_ in ((["niah", "--help"], 0), (["mcq", "--questions", "q.json", "--num_frames", "-2"], 2)):
        r = subprocess.run([sys.executable, "-c", code] + argv, cwd=root, capture_output=True, text=True, timeout=60)
        assert r.stdout.strip().endswith(f"exit {code_} False"), (argv, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
    # --help names the default prompts as data.py defines them (the parser cannot import data.py: it imports torch)
    assert ev.DEFAULT_PROMPTS == {"caption": ev.CAPTION_PROMPT, "ask": ev.ASK_QUESTION}


# -----------------------------------------------------------------------------
# generation stops at either end token


class FakeGenerator(torch.nn.Module):
    """Answers every prompt with the fixed token ids `reply`, honouring eos_token_id like LongVILA.generate."""

    def __init__(self, reply):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.reply, self.eos = reply, None
        self.config = types.SimpleNamespace(vision=types.SimpleNamespace(image_size=8), tokens_per_frame=2)

    def generate(self, input_ids, images=None, max_new_tokens=32, eos_token_id=None, stream=None):
        self.eos = eos_token_id
        out = []
        for t in self.reply[:max_new_tokens]:
            out.append(t)
            if stream is not None:
                stream(t)
            if eos_token_id is not None and t in eos_token_id:
                break
        return torch.tensor([out])  # (1, T_new)


def test_generation_stops_at_either_end_token():
    tok = Tokenizer.tiny()
    words = tok.encode(" red circle")
    assert set(tok.stop_ids) == {tok.eot_id, tok.eod_id} and tok.eot_id != tok.eod_id
    for stop in tok.stop_ids:
        model = FakeGenerator(words + [stop] + tok.encode(" blue"))
        out = io.StringIO()
        printer = ev.StreamPrinter(tok, out=out)
        assert ev.generate_reply(model, tok, None, "Say it.", max_new_tokens=10, stream=printer) == "red circle"
        assert sorted(model.eos) == sorted(tok.stop_ids) and out.getvalue() == " red circle"
    model = FakeGenerator(words + [tok.eot_id] + tok.encode(" blue"))  # bench.py question: no stop, cut anyway
    assert ev.generate_reply(model, tok, None, "Say it.", max_new_tokens=10, stop=False) == "red circle"
    assert model.eos is None


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
    with pytest.raises(InputError, match="another run \\(needles"):
        ev.run_niah(model2, tok, hay, needles[:1], depths, counts, out_dir=str(tmp_path), progress=False)
    # so is another model (its identity in the header) ... unless asked to start over
    with pytest.raises(InputError, match="model"):
        ev.run_niah(model2, tok, hay, needles, depths, counts, out_dir=str(tmp_path), progress=False,
                    identity={"model": {"path": "/other"}})
    ev.run_niah(model2, tok, hay, needles, depths, counts, out_dir=str(tmp_path), progress=False,
                identity={"model": {"path": "/other"}}, overwrite=True)
    assert json.load(open(tmp_path / "results.json"))["header"]["model"] == {"path": "/other"}
    with pytest.raises(InputError, match="haystack_0: 12 frames .* needs 20"):
        ev.run_niah(model2, tok, hay, needles, depths, [20], progress=False)


# -----------------------------------------------------------------------------
# the real tiny model: a random-weight checkpoint, single process vs sp=2 on gloo


def _save_tiny(path, seed=0, **config):
    from longvila import PRESETS, LongVILA

    tok_json = os.path.join(os.path.dirname(path), "tokenizer.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Tokenizer.tiny().save(tok_json)
    torch.manual_seed(seed)
    model = LongVILA(PRESETS["tiny"])
    for k, v in config.items():
        setattr(model.config, k, v)
    model.save_pretrained(path, tokenizer_json=tok_json)
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny random-weight checkpoint in the VILA layout with the tiny tokenizer (seeded)."""
    return _save_tiny(str(tmp_path_factory.mktemp("ckpt") / "tiny"))


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

    root = str(tmp_path_factory.mktemp("demo") / "demo")
    data.make_demo(root, data.DemoConfig(images=2, short_videos=2, long_videos=1, passkey_docs=2, val_images=1,
                                         val_short_videos=1, val_long_videos=1, haystacks=2, mcq=3,
                                         caption_videos=2, val_passkey_docs=4, niah_haystacks=1, niah_needles=2,
                                         niah_samples=2))
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
    assert Image.open(os.path.join(out, "heatmap.png")).size[1] == ev.heatmap_size(2, 2)[1]
    h = res["header"]  # what the numbers depend on
    assert h["model"] == {"path": os.path.abspath(tiny_ckpt), "fingerprint": ev.model_fingerprint(tiny_ckpt)}
    assert h["code"] == ev.code_version() and h["fps"] == 1.0
    assert h["dtype"] == ("bfloat16" if torch.cuda.is_available() else "float32")  # --dtype auto
    cell = res["cells"]["haystack_000.mp4|frames=4|depth=1"]
    assert cell["tokens"] == len(ev.niah_prompt(Tokenizer.for_checkpoint(tiny_ckpt), "What color is the needle?",
                                                "red", 5, 4)[0])  # 4 haystack frames + the needle, 4 tokens each


def test_task_mcq_cli(tiny_ckpt, demo, tmp_path, capsys):
    out = str(tmp_path / "mcq")
    ev.main(["mcq", "--model", tiny_ckpt, "--questions", os.path.join(demo, "mcq", "mcq.json"), "--num_frames", "4",
             "--max_new_tokens", "3", "--out", out])
    res = json.load(open(os.path.join(out, "mcq.json")))
    rows = list(res["cells"].values())
    assert len(rows) == 3 and all(r["prediction"] == ev.extract_choice(r["reply"]) for r in rows)
    assert res["accuracy"]["overall"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    assert set(res["accuracy"]) == {"overall", "short"}
    assert res["answered"] == sum(bool(r["prediction"]) for r in rows)
    assert res["header"]["num_frames"] == 4 and res["header"]["aspect"] == "resize"
    assert "mcq: accuracy overall=" in capsys.readouterr().out


def test_frames_follow_the_checkpoint_config(demo, tmp_path, capsys):
    """Without --num_frames / --fps, mcq, caption and ask read the checkpoint's num_video_frames, fps and
    image_aspect_ratio."""
    ckpt = _save_tiny(str(tmp_path / "ckpt" / "model"), num_video_frames=3, image_aspect_ratio="pad")
    videos = os.path.join(demo, "caption", "videos")
    ev.main(["caption", "--model", ckpt, "--video", videos, "--max_new_tokens", "2", "--out", str(tmp_path / "cap")])
    caps = json.load(open(tmp_path / "cap" / "captions.json"))
    assert all(c["frames"] == 3 for c in caps["cells"].values())
    assert caps["header"]["num_frames"] == 3 and caps["header"]["fps"] is None and caps["header"]["aspect"] == "pad"
    ev.main(["mcq", "--model", ckpt, "--questions", os.path.join(demo, "mcq", "mcq.json"), "--max_new_tokens", "2",
             "--out", str(tmp_path / "mcq")])
    assert json.load(open(tmp_path / "mcq" / "mcq.json"))["header"]["num_frames"] == 3
    # fps 2 from the config: the 8-frame 4-fps demo clips (2 s) give int(2 s * 2 fps) = 4 frames
    ckpt2 = _save_tiny(str(tmp_path / "ckpt2" / "model"), num_video_frames=8, fps=2.0)
    ev.main(["ask", "--model", ckpt2, "--video", os.path.join(demo, "mcq", "videos"), "--max_new_tokens", "2",
             "--no_stream", "--out", str(tmp_path / "ask")])
    cells = json.load(open(tmp_path / "ask" / "captions.json"))["cells"]
    assert [c["frames"] for c in cells.values()] == [4] * len(cells)


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
    assert reply == reply.strip() and f"[cap_000.mp4, 4 frames] {reply}" in capsys.readouterr().out


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
    # a rerun with more windows resumes the first three and adds two
    ev.main(["ppl", "--model", tiny_ckpt, "--text", os.path.join(demo, "stage4_val.txt"), "--seq_len", "64",
             "--max_windows", "5", "--out", str(tmp_path / "ppl")])
    r5 = json.load(open(tmp_path / "ppl" / "ppl.json"))
    assert r5["windows"] == 5 and all(r5["cells"][str(w)] == r["cells"][str(w)] for w in range(3))


# -----------------------------------------------------------------------------
# results that never mislabel work: --out resumes only the same model, settings and code


def _exit2(capsys, argv) -> str:
    """Run evaluate.main(argv), expect exit code 2 and one or two lines on stderr; return the last."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, (argv, err)
    lines = [line for line in err.splitlines() if line and not line.startswith((" ", "usage:"))]
    assert 1 <= len(lines) <= 2 and "error:" in lines[-1], (argv, err)
    return lines[-1]


def test_model_fingerprint(tiny_ckpt, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(tiny_ckpt, copy)
    assert ev.model_fingerprint(copy) == ev.model_fingerprint(tiny_ckpt)  # the same model, wherever it lies
    other = _save_tiny(str(tmp_path / "other" / "model"), seed=1)  # same shapes, other weights
    assert ev.model_fingerprint(other) != ev.model_fingerprint(tiny_ckpt)
    cfg = json.load(open(os.path.join(copy, "config.json")))
    json.dump({**cfg, "num_video_frames": 99}, open(os.path.join(copy, "config.json"), "w"))
    assert ev.model_fingerprint(copy) != ev.model_fingerprint(tiny_ckpt)


def test_reused_out_resumes_only_the_same_run(tiny_ckpt, demo, tmp_path, capsys, monkeypatch):
    niah = ["niah", "--haystacks", os.path.join(demo, "niah", "haystack", "haystack_000.mp4"), "--needles",
            os.path.join(demo, "niah", "needles"), "--frame_counts", "2", "--depths", "0", "--no_progress", "--out",
            str(tmp_path / "niah"), "--dtype", "float32"]
    ev.main(niah + ["--model", tiny_ckpt])
    first = json.load(open(tmp_path / "niah" / "results.json"))
    ev.main(niah + ["--model", tiny_ckpt])  # the same run: resumed, nothing recomputed, the same file
    assert json.load(open(tmp_path / "niah" / "results.json")) == first
    other = _save_tiny(str(tmp_path / "stage1" / "model"), seed=1)
    err = _exit2(capsys, niah + ["--model", other])  # a different --model with the same --out
    assert "results.json holds results of another run" in err and "model.path" in err and "model.fingerprint" in err
    assert "--overwrite" in err and json.load(open(tmp_path / "niah" / "results.json")) == first  # untouched
    assert "fps 1.0 -> 2.0" in _exit2(capsys, niah + ["--model", tiny_ckpt, "--fps", "2"])  # other settings
    assert "dtype" in _exit2(capsys, niah + ["--model", tiny_ckpt, "--dtype", "bfloat16"])
    with monkeypatch.context() as m:  # other code
        m.setattr(ev, "code_version", lambda: "0123456789abcdef")
        assert "code" in _exit2(capsys, niah + ["--model", tiny_ckpt])
    ev.main(niah + ["--model", other, "--overwrite"])  # start over: the file now holds the other model's results
    assert json.load(open(tmp_path / "niah" / "results.json"))["header"]["model"]["path"] == os.path.abspath(other)
    capsys.readouterr()

    # caption / ask: a reused --out prints the stored reply (never silence), another question stops
    ask = ["ask", "--model", tiny_ckpt, "--video", os.path.join(demo, "caption", "videos", "cap_000.mp4"),
           "--num_frames", "2", "--max_new_tokens", "3", "--no_stream", "--out", str(tmp_path / "ask")]
    ev.main(ask + ["--question", "What color is it?"])
    reply = json.load(open(tmp_path / "ask" / "captions.json"))["cells"]["cap_000.mp4"]["reply"]
    capsys.readouterr()
    ev.main(ask + ["--question", "What color is it?"])
    assert f"[cap_000.mp4, 2 frames] {reply}   (stored in" in capsys.readouterr().out
    assert 'prompt "What color is it?" -> "What shape is it?"' in _exit2(capsys, ask + ["--question",
                                                                                         "What shape is it?"])
    assert "model" in _exit2(capsys, ask[:2] + [other] + ask[3:] + ["--question", "What color is it?"])
    assert "task" in _exit2(capsys, ["caption"] + ask[1:])  # caption and ask share captions.json


def test_out_never_replaces_files_it_did_not_write(tiny_ckpt, demo, tmp_path, capsys):
    niah = ["niah", "--model", tiny_ckpt, "--haystacks", os.path.join(demo, "niah", "haystack"), "--needles",
            os.path.join(demo, "niah", "needles"), "--frame_counts", "2", "--depths", "0"]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "results.json").write_text('{"accuracy": 0.9}')
    for extra in ([], ["--overwrite"]):
        assert "not a results file of evaluate.py" in _exit2(capsys, niah + ["--out", str(theirs)] + extra)
    assert (theirs / "results.json").read_text() == '{"accuracy": 0.9}'
    plot = tmp_path / "plot"
    plot.mkdir()
    (plot / "heatmap.png").write_bytes(b"their picture")
    assert "heatmap.png, which evaluate.py did not write" in _exit2(capsys, niah + ["--out", str(plot)])
    assert (plot / "heatmap.png").read_bytes() == b"their picture"
    (tmp_path / "file").write_text("x")
    assert "expected a folder" in _exit2(capsys, niah + ["--out", str(tmp_path / "file")])


# -----------------------------------------------------------------------------
# user mistakes: one or two lines on stderr and exit code 2, never a stack trace


def test_bad_invocations_exit_2(tiny_ckpt, demo, tmp_path, capsys):
    hay, needles = os.path.join(demo, "niah", "haystack"), os.path.join(demo, "niah", "needles")
    niah = ["niah", "--model", tiny_ckpt, "--haystacks", hay, "--needles", needles, "--frame_counts", "2",
            "--depths", "0"]
    broken = str(tmp_path / "broken")
    shutil.copytree(tiny_ckpt, broken)
    weights = os.path.join(broken, "llm", "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    not_json = tmp_path / "questions.json"
    not_json.write_text("video,question\nx.mp4,what?\n")
    no_needles = tmp_path / "needles"
    no_needles.mkdir()
    cases = [  # (argv, what the one line must say)
        (["niah", "--model", str(tmp_path / "missing"), "--haystacks", hay, "--needles", needles],
         ["--model", "missing: no such folder"]),
        (["ppl", "--text", os.path.join(demo, "stage4_val.txt")], ["give --model"]),
        (niah[:2] + [broken] + niah[3:], ["model.safetensors: truncated"]),
        (["mcq", "--model", tiny_ckpt, "--questions", str(not_json), "--num_frames", "-2"],
         ["--num_frames", "expected a positive integer, got '-2'"]),
        (["ask", "--model", tiny_ckpt, "--video", hay, "--num_frames", "0"], ["--num_frames", "got '0'"]),
        (["mcq", "--model", tiny_ckpt, "--questions", str(not_json)], ["--questions", "questions.json: not a JSON"]),
        (niah[:5] + ["--needles", str(no_needles)] + niah[7:], ["needles.json: no such file"]),
        (niah[:7] + ["--frame_counts", "1000"], ["haystack_000.mp4", "the grid needs 1000", "--frame_counts"]),
        (niah + ["--depths", "0,1.5"], ["--depths", "in [0, 1]"]),
        (niah + ["--sp", "2"], ["--sp 2", "1 processes"]),
        (["caption", "--model", tiny_ckpt, "--video", str(tmp_path / "no.mp4")], ["no.mp4: no such video"]),
        (["ppl", "--model", tiny_ckpt, "--text", str(tmp_path / "no.txt")], ["--text", "no.txt: no such file"]),
        (["ppl", "--model", tiny_ckpt, "--text", os.path.join(demo, "stage4_val.txt"), "--seq_len", "100000"],
         ["--seq_len 100000"]),
        (["passkey", "--model", tiny_ckpt, "--lengths", "10"], ["context length of 10 tokens"]),
        (["ask", "--model", tiny_ckpt], ["give --video"]),
        (niah + ["--stage", "two"], ["unrecognized arguments: --stage two"]),
    ]
    for argv, says in cases:
        line = _exit2(capsys, argv)
        assert all(s in line for s in says), (argv, says, line)
