"""The CPU demo learns: a shortened run of the demo's own curriculum must show the skills it is for on held-out data.

A change that breaks learning (the label shift, the projector or the vision path, RoPE, the loss normalisation,
the optimizer, the data's prompts) still runs, so these tests assert what the model learnt, not that it finished.
They train on the full-size demo data (`python data.py demo`) with the demo's recipe (train.py's TINY_DEMO), fewer
steps, and read the held-out numbers train.py itself prints at the end of a demo run (heldout.json per stage).

    python -m pytest -q tests/test_demo.py --durations=0

The bounds sit well below what seed 0 reaches (docs/performance.md, "The CPU demo") and far above chance, so
another CPU's rounding passes and a model that stopped learning does not.
"""
import json
import os

import pytest

import data
import train


pytestmark = pytest.mark.usefixtures("cpu_only")  # conftest.py: the CPU path, also on a GPU machine


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("demo_data"))
    data.make_demo(path, data.DemoConfig())  # the size `train.py --stage all` generates (~9 s)
    return path


@pytest.fixture(scope="module")
def stage0(demo_data, tmp_path_factory):
    """Stage 0 of the demo at 150 of its 300 steps: (run folder, its held-out result)."""
    root = str(tmp_path_factory.mktemp("runs"))
    train.main(["--stage", "0", "--data", demo_data, "--steps", "150", "--out", root])
    return os.path.join(root, "stage0"), heldout(os.path.join(root, "stage0"))


def heldout(run: str) -> dict:
    with open(os.path.join(run, "heldout.json")) as f:
        return json.load(f)


def test_stage0_learns_the_needle_colour(stage0):
    _, res = stage0
    right8, asked8 = res["needle_8_frames"]
    right32, asked32 = res["needle_32_frames"]
    assert (asked8, asked32) == (6, 16)  # the default demo's held-out needle videos
    # chance is 1/8 (eight colours): ~1 of 6 and 2 of 16; one colour for every needle gets at most 3 of 16
    assert right8 >= 5 and right32 >= 10, res


def test_stage0_learns_the_caption_language(stage0):
    """The text-only "describe" samples (train.STAND_IN_DATA) that stage 1's frozen LLM needs: the colour word is
    copied from the image's place early; the shape word (an induction head) follows by step ~250."""
    out, _ = stage0
    losses = [row["loss"] for row in map(json.loads, open(os.path.join(out, "metrics.jsonl")))]
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert first > 4.0 and last < 1.0, (first, last)  # from ~ln(1024) = 6.9 nats to under one


def test_stage4_learns_the_long_text(demo_data, stage0, tmp_path):
    """Stage 4 (context extension, 512 -> 1,024 tokens) at 30 of its 100 steps: perplexity on the held-out passkey
    documents far below the stage-0 model's and below a uniform guess over the vocabulary."""
    run0, _ = stage0
    train.main(["--stage", "4", "--data", demo_data, "--init_from", os.path.join(run0, "model"), "--steps", "30",
                "--out", str(tmp_path)])
    res = heldout(os.path.join(str(tmp_path), "stage4"))
    assert res["ppl_after"] < res["vocab"] / 10, res
    assert res["ppl_after"] < res["ppl_before"] / 1000, res

