"""Tests of bench.py: its GPU benchmarks run on CPU at tiny sizes (so the code cannot rot between GPU runs), the
FLOP counts behind its MFU, and its command line answers --help without importing torch.

    python -m pytest -q tests/test_bench.py
"""
import json
import subprocess
import sys
import time

import pytest
import torch

import bench
from helpers import run_workers
from longvila import PRESETS, LongVILA


def test_help_is_fast_and_torch_free():
    code = "import sys, runpy; sys.argv = ['bench.py', 'train', '--help']\ntry:\n    runpy.run_path('bench.py', " \
           "run_name='__main__')\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--variants" in r.stdout and time.perf_counter() - t0 < 5


def test_train_step_bench_runs_ours_and_transformers_on_cpu(capsys):
    pytest.importorskip("transformers")
    bench.main(["train", "--device", "cpu", "--model", "tiny", "--layers", "2", "--seqlens", "48",
                "--variants", "torch:full,torch:save-attn,hf", "--steps", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 48 |")]
    assert len(rows) == 3 and all("tok" not in r for r in rows) and "| 1.00 |" in rows[-1]


def test_prefill_bench_matches_transformers_on_cpu(capsys):
    pytest.importorskip("transformers")
    bench.main(["prefill", "--device", "cpu", "--model", "tiny", "--frames", "3", "--backends", "torch"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| ours (torch)"))
    assert float(row.split("|")[-2]) < 0.05  # the same weights through our decoder and transformers': same logits


QUESTION = ["question", "--device", "cpu", "--model", "tiny", "--frames", "6", "--max_new_tokens", "3",
            "--repeats", "1"]


def test_question_bench_on_cpu(tmp_path, capsys):
    bench.main(QUESTION + ["--json", str(tmp_path / "q.json")])
    [r] = json.load(open(tmp_path / "q.json"))
    assert r["frames"] == 6 and r["decode_tokens"] == 2 and r["prefill_s"] > 0 and r["vision_s"] > 0
    assert r["model"] == "tiny" and (r["sp"], r["ring"], r["dtype"]) == (1, 1, "float32")
    assert r["prompt_tokens"] > 6 * PRESETS["tiny"].tokens_per_frame and r["prefill_tflops_per_gpu"] > 0
    assert r["peak_tflops"] is None and "prefill_mfu" not in r  # no peak known on CPU: no MFU
    assert "prefill" in capsys.readouterr().out


def _question_worker(rank, world, ring):
    return bench.question_run(bench.build_parser().parse_args(QUESTION + ["--ring", str(ring)]))[0]


def test_question_bench_mmsp_on_gloo():
    for ring in (1, 2):  # Ulysses (1 x 2) and zigzag ring (2 x 1)
        rows = run_workers(_question_worker, 2, (ring,))
        assert all(r["sp"] == 2 and r["ring"] == ring and r["world"] == 2 and r["decode_tokens"] == 2 for r in rows)


def test_question_flops_count_every_matmul():
    """bench.forward_flops (the MFU numerators: a third of the model's training counts, the LM head on the last
    token only) against torch's FLOP counter on real forwards of the tiny model. Attention runs as matmuls (the
    counter sees them); the LLM's causal half is swapped for the full square. The model's counts take every
    parameter of a block as a multiply-add, norm weights and biases too, which the counter does not see: their
    2 FLOPs a token (patch, merged token) are the only difference allowed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = LongVILA(PRESETS["tiny"]).eval()
    c, vis, T, Fr = model.config.llm, model.config.vision, 48, 2

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
    matmuls = [m.weight for m in model.llm.modules() if isinstance(m, torch.nn.Linear)]
    norms = sum(p.numel() for n, p in model.llm.named_parameters()
                if all(p is not w for w in matmuls) and not n.startswith("tok_embeddings"))
    assert 0 < norms < 0.01 * sum(w.numel() for w in matmuls)  # the norms' weights
    assert counter.get_total_flops() == bench.forward_flops(model, 0, T)[1] - 2 * norms * T - causal + full

    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        model.encode_images(torch.randn(Fr, 3, vis.image_size, vis.image_size))  # (F, N, C)

    def not_matmul(module):  # its norms' weights and biases
        ws = [m.weight for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        return sum(p.numel() for p in module.parameters() if all(p is not w for w in ws))

    per_frame = vis.num_patches * sum(not_matmul(b) for b in model.vision.layers[:vis.n_used_layers]) + \
        model.config.tokens_per_frame * not_matmul(model.projector)  # per patch / per merged token
    assert counter.get_total_flops() == bench.forward_flops(model, Fr, T)[0] - 2 * Fr * per_frame


def test_user_mistakes_exit_2(capsys):
    r = subprocess.run([sys.executable, "bench.py", "train", "--seqlens", "x"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--seqlens" in r.stderr
    for argv, says in ((["--model", "llama-70b"], "--model 'llama-70b'"), (["--sp", "2"], "--sp 2 --ring 1 with 1")):
        with pytest.raises(SystemExit) as e:
            bench.main(QUESTION[:3] + argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err and says in err
