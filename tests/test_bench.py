"""Tests of bench.py: its GPU benchmarks run on CPU at tiny sizes (so the code cannot rot between GPU runs), and
its command line answers --help without importing torch.

    python -m pytest -q tests/test_bench.py
"""
import subprocess
import sys
import time

import pytest

import bench


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


def test_user_mistakes_exit_2():
    r = subprocess.run([sys.executable, "bench.py", "train", "--seqlens", "x"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--seqlens" in r.stderr
