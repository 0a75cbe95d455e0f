"""train.py: the curriculum's module freezing, sequence-parallel training equal to one process, exact resume after
kill -9, checkpoints readable by any number of processes, schedules, the non-finite-loss stop; stage 4's LoRA
(merged saves, exact resume, 2 ranks = 1); run folders that never lose or mislabel work (demo data only where
asked, no mixing of runs, resume checks, a damaged checkpoint, a full disk, one-line errors), --config, the
progress line and a torch-free --help.

    python -m pytest -q tests/test_train.py --durations=0

All runs use a small demo data set (data.make_demo with a few dozen samples) and the `tiny` preset in fp32.
"""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import longvila
import train
from helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# same threads everywhere: bitwise repeatable; on a GPU machine too the runs take the CPU path (gloo, fp32), whose
# results these tests compare bitwise (CUDA's atomics would not repeat them, and 4 ranks do not share one GPU)
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")


pytestmark = pytest.mark.usefixtures("cpu_only")  # conftest.py: the CPU path, also on a GPU machine


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("demo"))
    data.make_demo(path, data.DemoConfig(images=24, short_videos=24, long_videos=6, passkey_docs=12, val_images=2,
                                         val_short_videos=2, val_long_videos=2, haystacks=1, mcq=2, caption_videos=1,
                                         val_passkey_docs=2, niah_haystacks=2, niah_needles=8, niah_samples=16))
    return path


def weights(folder: str) -> dict:
    return {k: v.float() for k, v in longvila.LongVILA.from_pretrained(folder).state_dict().items()}


def metrics(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_train(args: list, nproc: int = 1, timeout: float = 300):
    """train.py in a fresh process (torchrun when nproc > 1); returns the completed process."""
    cmd = [sys.executable, "train.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
         str(free_port()), "train.py"]
    p = subprocess.run(cmd + args + ["--eval", "none"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd + args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


# -----------------------------------------------------------------------------
# pure functions


def test_lr_schedules():
    cfg = train.TrainConfig(lr=1e-3, schedule="cosine", warmup=0.1, steps=100)
    lrs = [train.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # 10 warmup steps, linear
    assert lrs[10] == pytest.approx(1e-3)  # the cosine starts at the peak ...
    assert lrs[55] == pytest.approx(0.5e-3, rel=1e-2)  # ... is half-way at the middle ...
    assert 0 < lrs[-1] < 1e-3 * 1e-3  # ... and ends near 0 (the reference's cosine)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    cfg = train.TrainConfig(lr=2e-5, schedule="constant", warmup=2, steps=50)  # stage 4
    assert [train.lr_at(s, cfg) for s in (0, 1, 2, 49)] == pytest.approx([1e-5, 2e-5, 2e-5, 2e-5])


def test_rope_theta_for_context():
    # the reference's Qwen2 thetas (trained at 32k, theta 1e6): 128k, 256k, 512k, 1M exactly
    for target, theta in ((131072, 15300000), (262144, 207112184), (524288, 1062356830), (1048576, 3580165449)):
        assert train.rope_theta_for_context(1e6, 32768, target) == theta
    assert train.rope_theta_for_context(1e6, 32768, 32768) == 1e6  # never lowered
    # between anchors: log-log interpolation (2x = the geometric mean of 1x and 4x); another base scales them
    assert train.rope_theta_for_context(1e6, 32768, 65536) == pytest.approx((1e6 * 15.3e6) ** 0.5, rel=1e-12)
    assert train.rope_theta_for_context(5e5, 8192, 8192 * 16) == pytest.approx(1062356830 / 2, rel=1e-12)
    a, b, c, d = (train.rope_theta_for_context(5e5, 8192, n) for n in (16384, 65536, 262144, 524288))  # Llama-3
    assert 5e5 < a < b < c < d  # past the last anchor: its segment extended


def test_stage_presets_and_flag_precedence(tmp_path):
    cfg = train.resolve(4, {"model": "longvila-8b", "out": "r"})
    assert (cfg.train_vision, cfg.train_projector, cfg.train_llm) == (False, False, True)
    assert (cfg.lr, cfg.schedule, cfg.warmup, cfg.lora) == (2e-5, "constant", 2, 8)  # the reference's stage 4
    assert train.resolve(5, {"model": "longvila-8b"}).fps == 2.0 and train.resolve(5, {}).fps == 0.0  # tiny: uniform
    assert train.resolve(4, {}).lora == 0  # the tiny demo fine-tunes its whole LLM
    assert cfg.init_from == os.path.join("r", "stage3", "model") and cfg.out == os.path.join("r", "stage4")
    assert train.parse_stages("all", from_scratch=True) == [0, 1, 2, 3, 4, 5]
    cfg = train.resolve(5, {"model": "longvila-8b", "lr": 2e-5, "init_from": "x"})
    assert cfg.grad_checkpointing and cfg.lr == 2e-5 and cfg.init_from == "x"  # flags beat the preset
    fresh = {"out": str(tmp_path / "r")}  # no stage0/ there (runs/demo/stage0 may exist where the tests run)
    assert train.resolve(1, fresh).init_from == "none" and train.resolve(1, fresh).lr == 1e-2  # tiny: demo tuning
    assert train.parse_stages("all") == [1, 2, 3, 4, 5] and train.parse_stages("2-4") == [2, 3, 4]


def test_stand_in_data(demo, tmp_path):
    """Stage 0's data: the needle questions one per sample with their video; each needle-in-a-haystack record's
    needle image alone with its question; the captions as text only, written where their image was."""
    files = dict(train.DEMO_FILES[0])
    assert train.STAND_IN_DATA == {"stage3.json": "needle", "stage1.json": "describe",
                                   "stage5_niah.json": "needle_image"} and set(files) == set(train.STAND_IN_DATA)
    with open(os.path.join(demo, "stage5_niah.json")) as f:
        records = json.load(f)
    with open(train.stand_in_copy(os.path.join(demo, "stage5_niah.json"), str(tmp_path), "needle_image")) as f:
        images = json.load(f)
    assert [s["image"] for s in images] == [r["needle"] for r in records]
    assert all([t["value"] for t in s["conversations"]] == ["<image>\n" + r["question"], r["answer"]]
               for s, r in zip(images, records))
    with open(train.stand_in_copy(os.path.join(demo, "stage3.json"), str(tmp_path), "needle")) as f:
        needles = json.load(f)
    assert needles and all(len(s["conversations"]) == 2 and "video" in s for s in needles)
    assert all(s["conversations"][0]["value"].startswith("<video>\n") and "needle" in s["conversations"][0]["value"]
               for s in needles)
    with open(os.path.join(demo, "stage1.json")) as f:
        captions = json.load(f)
    with open(train.stand_in_copy(os.path.join(demo, "stage1.json"), str(tmp_path), "describe")) as f:
        described = json.load(f)
    assert len(described) == len(captions)
    for src, s in zip(captions, described):
        (q, a), (q0, a0) = [t["value"] for t in s["conversations"]], [t["value"] for t in src["conversations"]]
        assert "image" not in s and "video" not in s and a == a0 and q == q0.replace("<image>", a0)


# -----------------------------------------------------------------------------
# the curriculum: each stage trains exactly its modules


def test_each_stage_trains_exactly_its_modules(demo, tmp_path):
    """`--stage all` from scratch = stages 0-5, 2 steps each; every stage's saved model is compared with the one it
    started from: exactly the parameters of the stage's modules changed."""
    out = str(tmp_path / "run")
    train.main(["--stage", "all", "--data", demo, "--out", out, "--steps", "2", "--global_batch", "2",
                "--num_frames", "4", "--seq_len", "256", "--trained_len", "128", "--eval", "none"])
    torch.manual_seed(0)  # stage 0 starts from the seeded random init of the tiny preset
    before = {k: v.float() for k, v in longvila.LongVILA(longvila.PRESETS["tiny"]).state_dict().items()}
    n_used = longvila.PRESETS["tiny"].vision.n_used_layers
    trains = {0: {"vision", "projector", "llm"}, 1: {"projector"}, 2: {"projector", "llm"},
              3: {"vision", "projector", "llm"}, 4: {"llm"}, 5: {"vision", "projector", "llm"}}
    for stage in range(0, 6):
        after = weights(os.path.join(out, f"stage{stage}", "model"))
        for name, w in after.items():
            part = name.split(".")[0]
            never = name.startswith("vision.post_norm") or any(
                name.startswith(f"vision.layers.{i}.") for i in range(n_used, 100))  # after the selected layer
            changed = not torch.equal(w, before[name])
            assert changed == (part in trains[stage] and not never), \
                f"stage {stage}: {name} {'changed' if changed else 'unchanged'}"
        rows = metrics(os.path.join(out, f"stage{stage}"))
        assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
        before = after
    # stage 4 raised RoPE theta and wrote it into the model it saved (and stage 5 kept it)
    for stage in (4, 5):
        with open(os.path.join(out, f"stage{stage}", "model", "llm", "config.json")) as f:
            assert json.load(f)["rope_theta"] > longvila.PRESETS["tiny"].llm.rope_theta
    with open(os.path.join(out, "stage3", "model", "llm", "config.json")) as f:
        assert json.load(f)["rope_theta"] == longvila.PRESETS["tiny"].llm.rope_theta
    with open(os.path.join(out, "stage4", "config.json")) as f:
        resolved = json.load(f)
    assert resolved["schedule"] == "constant" and "rope_theta" in resolved["config_changes"]
    assert os.path.isfile(os.path.join(out, "stage5", "model", "llm", "tokenizer.json"))


# -----------------------------------------------------------------------------
# sequence parallelism + FSDP2 on 4 gloo processes == one process on the same global batch


@pytest.fixture(scope="module")
def sp_runs(demo, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sp"))
    common = ["--stage", "5", "--init_from", "none", "--data", demo, "--steps", "3", "--global_batch", "2",
              "--num_frames", "8", "--lr", "1e-3", "--grad_checkpointing"]  # the demo's stage 5 runs without
    runs = {}
    for name, nproc, extra in (("single", 1, []), ("sp2", 4, ["--sp", "2"]),
                               ("sp4_ring2", 4, ["--sp", "4", "--ring", "2"])):
        run_train(common + extra + ["--out", os.path.join(root, name)], nproc=nproc)
        runs[name] = os.path.join(root, name, "stage5")
    return runs


def assert_same_training(ref: list, got: list):
    """Several ranks trained what one process trained on the same global batch. fp32 everywhere; only the order of
    floating-point sums differs (all-reduce / reduce-scatter over ranks, ring LSE merges, chunked CE): ~1e-7
    relative. Step 1 (no update yet) is held to rtol 1e-5. AdamW's first updates move every parameter by ~lr
    whatever the gradient's size, so a gradient coordinate near 0 whose sign flips under that noise moves its
    weight by ~2 lr: later steps get rtol 2e-3 (we saw up to 3e-4). A real mistake - a wrong normalisation, a lost
    shard, a missing all-reduce - changes step 1 by more than 1e-2."""
    assert len(got) == len(ref)
    # step 1 is pure forward/backward math from the same weights: summation order only
    assert got[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-5)
    assert got[0]["grad_norm"] == pytest.approx(ref[0]["grad_norm"], rel=1e-5)
    for a, b in zip(ref, got):  # after AdamW updates (see the docstring)
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-3), (a, b)
    assert ref[-1]["loss"] < ref[0]["loss"]


@pytest.mark.parametrize("name", ["sp2", "sp4_ring2"])
def test_sequence_parallel_matches_single_process(sp_runs, name):
    """Same global batch (2 samples): one process accumulates 2 micro-batches; sp2 = dp 2 x ulysses 2; 2x2 = ring 2 x
    ulysses 2 with 2 micro-batches."""
    ref, got = metrics(sp_runs["single"]), metrics(sp_runs[name])
    assert [r["step"] for r in got] == [1, 2, 3]
    assert_same_training(ref, got)
    with open(os.path.join(sp_runs[name], "config.json")) as f:
        cfg = json.load(f)
    assert cfg["world_size"] == 4 and cfg["sp"] == int(name[2]) and cfg["grad_checkpointing"]


def test_checkpoint_from_4_processes_loads_in_1(sp_runs):
    """The model folder written by 4 FSDP ranks is a plain VILA checkpoint: one process loads it, and its weights
    equal the single-process run's: all but a few coordinates to float noise (we see max 8e-6), and any to 2 lr x
    3 steps (the sign-flip argument above). Mis-assembled shards would differ by the init scale (0.02) nearly
    everywhere."""
    ref = weights(os.path.join(sp_runs["single"], "model"))
    got = weights(os.path.join(sp_runs["sp4_ring2"], "model"))
    assert ref.keys() == got.keys()
    diff = torch.cat([(got[k] - ref[k]).abs().flatten() for k in ref])
    assert diff.max() < 6e-3 and (diff > 1e-5).float().mean() < 1e-3, (diff.max(), (diff > 1e-5).float().mean())
    model = longvila.LongVILA.from_pretrained(os.path.join(sp_runs["sp4_ring2"], "model"))
    ids = torch.randint(0, model.config.llm.vocab_size, (1, 12))
    logits, _ = model(ids)
    assert torch.isfinite(logits).all()


# -----------------------------------------------------------------------------
# kill -9, then --resume: bitwise the same weights as an uninterrupted run


def test_kill_and_resume_is_exact(demo, tmp_path):
    args = ["--stage", "3", "--init_from", "none", "--data", demo, "--steps", "8", "--global_batch", "2",
            "--num_frames", "4", "--save_every", "2"]
    full = str(tmp_path / "full")
    run_train(args + ["--out", full])
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "train.py"] + args + ["--out", killed, "--eval", "none"], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = os.path.join(killed, "stage3", "checkpoints", "latest")
    deadline = time.time() + 120
    while not os.path.exists(latest) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-training, right after the first checkpoint was published
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "stage3", "model")), "the run finished before the kill"
    with open(latest) as f:
        resumed_from = int(f.read().strip().split("-")[1])
    assert resumed_from < 8
    run_train(args + ["--out", killed, "--resume"])
    a, b = weights(os.path.join(full, "stage3", "model")), weights(os.path.join(killed, "stage3", "model"))
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume from step {resumed_from}"
    steps = [r["step"] for r in metrics(os.path.join(killed, "stage3"))]
    assert steps == list(range(1, 9)), steps  # the lines of redone steps were replaced, not duplicated
    assert [r["loss"] for r in metrics(os.path.join(killed, "stage3"))] == \
        [r["loss"] for r in metrics(os.path.join(full, "stage3"))]


def test_interrupted_save_leaves_previous_checkpoint(tmp_path):
    """A save killed before its rename leaves a .tmp folder that `latest` never names."""
    root = tmp_path / "checkpoints"
    (root / "step-000002").mkdir(parents=True)
    (root / "step-000004.tmp").mkdir()
    data.write_text_atomic(str(root / "latest"), "step-000002")
    assert train.resume_candidates(str(tmp_path)) == [str(root / "step-000002")]
    tmp = tmp_path / "new.tmp"
    tmp.mkdir()
    (tmp / "x").write_text("1")
    train.publish_dir(str(tmp), str(root / "step-000002"))  # re-publishing a step replaces it whole
    assert (root / "step-000002" / "x").read_text() == "1" and not tmp.exists()


# -----------------------------------------------------------------------------
# a NaN / inf loss stops the run naming the step, or skips the step with --skip_nonfinite


def test_nonfinite_loss_stops_or_skips(demo, tmp_path, monkeypatch):
    real = train.forward_backward
    calls = []

    def poisoned(*a, **k):
        loss, tokens, lengths = real(*a, **k)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), tokens, lengths

    monkeypatch.setattr(train, "forward_backward", poisoned)
    args = ["--stage", "1", "--data", demo, "--steps", "3", "--global_batch", "2", "--eval", "none"]
    with pytest.raises(train.NonFiniteLoss, match="step 2"):  # the second step
        train.main(args + ["--out", str(tmp_path / "stop")])
    calls.clear()
    train.main(args + ["--out", str(tmp_path / "skip"), "--skip_nonfinite"])
    rows = metrics(str(tmp_path / "skip" / "stage1"))
    assert [r["skipped"] for r in rows] == [False, True, False]


def test_profile_step_writes_a_trace_and_logs_it(demo, tmp_path, capsys):
    train.main(["--stage", "1", "--data", demo, "--steps", "2", "--global_batch", "2", "--eval", "none",
                "--no_save", "--profile_step", "2", "--out", str(tmp_path)])
    trace = tmp_path / "stage1" / "trace_step2.json"
    events = json.loads(trace.read_text())["traceEvents"]
    # the whole step is profiled: forward+backward, and clipping and the optimizer step after it
    assert any(e.get("name", "").startswith("Optimizer.step#AdamW") for e in events)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("profile step 2 (rank 0")]
    assert any("aten::mm" in ln for ln in lines), lines[:5]  # on CPU: the op table (on CUDA: time by kernel kind)
    split = [ln for ln in lines if " = data wait " in ln]
    assert len(split) == 1 and "forward+backward" in split[0] and "clipping and optimizer step" in split[0]
    parts = [float(x) for x in re.findall(r"([0-9.]+) s", split[0])]  # wall = data + fwd+bwd + optimizer
    assert len(parts) == 4 and abs(parts[0] - sum(parts[1:])) < 3e-3 and min(parts) >= 0
    assert train.kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == "attention"
    assert train.kernel_kind("nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_TNN") == "matrix products"
    assert train.kernel_kind("_rms_norm_bwd_kernel") == "fused ops (kernels.py)"
    assert train.kernel_kind("_bwd_dkdv_kernel") == train.kernel_kind("_fwd_kernel") == "attention"  # ours


# -----------------------------------------------------------------------------
# the background loader: N worker processes build the next steps' batches; the training must not notice


@pytest.fixture(scope="module")
def broken_media(demo, tmp_path_factory):
    """The demo's stage-3 samples with every second video unreadable: a missing file, or bytes that are no video.
    Media paths stay relative to the demo folder (--media_root)."""
    root = tmp_path_factory.mktemp("broken")
    garbage = root / "garbage.mp4"
    garbage.write_bytes(os.urandom(4096))
    with open(os.path.join(demo, "stage3.json")) as f:
        samples = json.load(f)
    for k, s in enumerate(samples):
        if k % 2 == 0:
            s["video"] = str(garbage) if k % 4 else "media/short/missing.mp4"
    path = root / "stage3_broken.json"
    path.write_text(json.dumps(samples))
    return str(path)


def test_loader_workers_equal_in_process_and_resume(demo, broken_media, tmp_path):
    """--workers 2 (forked loader processes, 2 steps prefetched each) vs --workers 0 (the synchronous loop) on data
    with unreadable videos: the same losses, grad norms and skipped-sample counts step by step, and bitwise the
    same final weights, because a step's batch is a pure function of (seed, step) wherever it is built. Then the
    workers=2 run is rewound to its step-2 checkpoint (as after a kill) and resumed with 1 worker (which decodes
    each video as runs of frames in cores-many threads): bitwise again."""
    args = ["--stage", "3", "--init_from", "none", "--data", broken_media, "--media_root", demo, "--steps", "3",
            "--global_batch", "2", "--num_frames", "4", "--save_every", "2", "--no_cache_data"]
    runs = {w: str(tmp_path / f"w{w}") for w in (0, 2)}
    out = {w: run_train(args + ["--workers", str(w), "--out", runs[w]]).stdout for w in runs}
    ref, got = metrics(os.path.join(runs[0], "stage3")), metrics(os.path.join(runs[2], "stage3"))
    key = lambda rows: [(r["step"], r["loss"], r["grad_norm"], r["data_skipped"]) for r in rows]  # noqa: E731
    assert key(got) == key(ref)
    assert ref[-1]["data_skipped"] > 0, "no unreadable sample was drawn: the test data lost its point"
    assert "missing.mp4" in out[2] or "garbage.mp4" in out[2]  # the skipped files reach the log from the workers
    assert f"{ref[-1]['data_skipped']} samples skipped" in out[2]  # ... and the summary
    with open(os.path.join(runs[2], "stage3", "config.json")) as f:
        assert json.load(f)["loader_workers"] == 2
    a, b = weights(os.path.join(runs[0], "stage3", "model")), weights(os.path.join(runs[2], "stage3", "model"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    run = os.path.join(runs[2], "stage3")
    data.write_text_atomic(os.path.join(run, "checkpoints", "latest"), "step-000002")
    shutil.rmtree(os.path.join(run, "model"))
    p = run_train(args + ["--workers", "1", "--out", runs[2], "--resume"])
    assert "at step 2" in p.stdout
    assert key(metrics(run)) == key(ref)  # the skipped count went through the checkpoint too
    b = weights(os.path.join(run, "model"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loader_workers_default_and_cache_conflict(demo, tmp_path, capsys):
    assert train.loader_workers(train.TrainConfig(cache_data=True)) == 0  # cached demo: nothing to overlap
    assert 1 <= train.loader_workers(train.TrainConfig(cache_data=False)) <= 8
    assert train.loader_workers(train.TrainConfig(cache_data=False, workers=0)) == 0
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "1", "--data", demo, "--steps", "1", "--global_batch", "2", "--cache_data",
                    "--workers", "2", "--out", str(tmp_path / "x"), "--eval", "none"])
    assert e.value.code == 2 and "train.py: error: --cache_data with --workers 2" in capsys.readouterr().err


def test_pack_pixels_is_lossless_or_a_no_op():
    """Loader workers send preprocess's pixels as uint8: bitwise the same after unpacking; other floats stay."""
    frames = torch.randint(0, 256, (2, 45, 80, 3), dtype=torch.uint8).numpy()  # (F, H, W, 3)
    x = data.preprocess(frames, 32)  # (F, 3, 32, 32) float32
    k = train.pack_pixels(x)
    assert k.dtype == torch.uint8 and torch.equal(train.unpack_pixels(k), x)
    y = torch.rand(2, 3, 8, 8) * 2 - 1  # (F, 3, S, S) not on the 2/255 grid: --data synthetic
    assert train.pack_pixels(y) is y


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_video_runs_in_threads_equal_one_reader(tmp_path, backend):
    """Loader workers decode one video with several readers on contiguous runs of its frames (one thread each):
    the pixels must equal one reader's, in the original (unsorted, repeated) order."""
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (90, 48, 64, 3), dtype=torch.uint8, generator=g).numpy()  # (F, H, W, 3)
    path = str(tmp_path / "v.mp4")
    data.write_video(path, frames, fps=30, gop=12)  # key frames every 12: every run starts at its own
    idx = [80, 3, 3, 41, 17, 66, 25, 89, 0, 52, 52, 30]
    with data.VideoFile(path, backend, threads=1) as v:
        one = data.video_pixels(v, idx, 32, chunk=4)  # (12, 3, 32, 32)
        three = data.video_pixels(v, idx, 32, chunk=4, threads=3)
    assert torch.equal(one, three)


def test_loader_error_names_the_step_and_the_sample():
    """A step whose samples cannot be built (data.SupervisedDataset gives up after 64 bad ones in a row) stops
    training with the step, the dataset indices and the dataset's own message (which names the file), also when a
    worker process hit it."""
    class Unreadable(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            raise RuntimeError(f"sample s3-{i}: /data/video_{i}.mp4: cannot open video")

    sampler = data.SPSampler(4, 0, 1, seed=0, batch_size=2)
    for workers in (0, 1):
        loader = train.step_loader(train.ItemCache(Unreadable(), False), sampler, 1, 2, 1, 0, workers,
                                   pin_memory=False, seed=0)
        with pytest.raises(RuntimeError, match=r"data of step 2 \(dataset indices \[\d, \d\]\).*video_\d\.mp4"):
            next(train.start_loader(loader))


def test_sp_ranks_decode_only_their_frames(demo):
    """With --sp > 1 each rank of the group decodes only the ceil(F/sp) frames it encodes (the test above checks
    the losses); here: those frames equal the full sample's, the rest are -1, shapes and tokens are unchanged."""
    tok = data.Tokenizer.from_file(os.path.join(demo, "tokenizer.json"))
    ds = data.SupervisedDataset([os.path.join(demo, "stage2.json")], None, tok, 32, 4, num_frames=6, max_len=1024)
    assert [ds[i]["images"].shape[0] for i in (0, 1, 10)] == [6, 1, 2]  # a video, an image, two images
    for i in (0, 1, 10):
        full = ds[i]
        F = full["images"].shape[0]
        for sp in (2, 3):
            per = -(-F // sp)  # mmsp.frame_split
            for r in range(sp):
                ds.frame_shard = (r, sp)
                got = ds[i]  # (a rank may hold no frame at all: 2 images on 3 ranks)
                lo, hi = min(r * per, F), min((r + 1) * per, F)
                assert torch.equal(got["input_ids"], full["input_ids"]) and got["images"].shape == (F, 3, 32, 32)
                assert torch.equal(got["images"][lo:hi], full["images"][lo:hi])
                assert (got["images"][:lo] == -1).all() and (got["images"][hi:] == -1).all()
            ds.frame_shard = None


# -----------------------------------------------------------------------------
# stage 4 as the reference trains it: LoRA on q/k/v/o + embeddings + norms, merged into every saved model

# what a LoRA stage trains (the token embeddings and every norm of the LLM train in full) ...
LORA_TRAINS = re.compile(r"^llm\.(layers\.\d+\.attention\.w[qkvo]\.lora_[ab]|tok_embeddings\.weight|"
                         r"(layers\.\d+\.(attention|ffn)_)?norm\.weight)$")
# ... and what it changes in the saved (merged) model
LORA_CHANGES = re.compile(r"^llm\.(layers\.\d+\.attention\.w[qkvo]\.weight|tok_embeddings\.weight|"
                          r"(layers\.\d+\.(attention|ffn)_)?norm\.weight)$")


def test_lora_merge_is_exact():
    """W + s B A is the weight whose plain linear layer computes what the LoRA layer computes (float64: exact up
    to rounding)."""
    torch.manual_seed(0)
    layer = train.LoRALinear(torch.nn.Linear(12, 20, dtype=torch.float64), rank=4).double()
    torch.nn.init.normal_(layer.lora_b)  # a trained B (it starts at zero)
    merged = train.merge_lora({"l.weight": layer.weight, "l.bias": layer.bias, "l.lora_a": layer.lora_a,
                               "l.lora_b": layer.lora_b})
    assert set(merged) == {"l.weight", "l.bias"}
    assert torch.equal(merged["l.weight"], layer.weight + train.LORA_SCALE * layer.lora_b @ layer.lora_a)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(torch.nn.functional.linear(x, merged["l.weight"], merged["l.bias"]), layer(x),
                               rtol=1e-13, atol=1e-13)
    assert train.LORA_SCALE == 2.0  # the reference: r=8, alpha=16


def test_lora_trains_only_its_parameters_and_saves_the_plain_layout(demo, tmp_path):
    """build_model of a LoRA stage 4: exactly LoRA, the token embeddings and the LLM's norms require (and get)
    gradients; the saved folder is the released layout (no LoRA tensor, from_pretrained's strict load) and
    computes what the LoRA model computes."""
    cfg = train.resolve(4, {"init_from": "none", "lora": 8, "data": demo, "out": str(tmp_path)})
    model, _ = train.build_model(cfg, 1, torch.device("cpu"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if LORA_TRAINS.search(n)}
    assert len([n for n in trainable if n.endswith("lora_a")]) == 4 * model.config.llm.n_layers
    ids = torch.randint(0, model.config.llm.vocab_size, (2, 24))
    model(ids, labels=ids, return_logits=False)[1].backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    for n, p in model.named_parameters():
        if n.endswith("lora_b"):
            torch.nn.init.normal_(p, std=0.02)  # as after training: the update is no longer zero
    path = str(tmp_path / "saved")
    train.save_model(model, path, 1, None)
    from safetensors import safe_open
    with safe_open(os.path.join(path, "llm", "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]
    plain = longvila.LongVILA.from_pretrained(path)  # strict: an extra or a missing tensor would raise
    with torch.no_grad():
        torch.testing.assert_close(plain(ids)[0], model(ids)[0], rtol=1e-5, atol=1e-5)


def lora_args(demo):
    return ["--stage", "4", "--init_from", "none", "--data", demo, "--lora", "8", "--lr", "3e-3", "--steps", "4",
            "--global_batch", "2", "--seq_len", "128", "--trained_len", "64", "--eval", "none"]


def test_lora_run_resumes_exactly_and_saves_merged_models(demo, tmp_path):
    """A LoRA stage 4: its model (and every checkpoint's) loads as a plain model in which only q/k/v/o, the
    embeddings and the norms moved from the seeded init; train_state keeps the unmerged LoRA; a resume from the
    step-2 checkpoint ends bitwise where the uninterrupted run ended."""
    full = str(tmp_path / "full")
    train.main(lora_args(demo) + ["--out", full, "--save_every", "2"])
    run = os.path.join(full, "stage4")
    torch.manual_seed(0)
    init = {k: v.float() for k, v in longvila.LongVILA(longvila.PRESETS["tiny"]).state_dict().items()}
    final = weights(os.path.join(run, "model"))
    assert final.keys() == init.keys()
    for name in init:
        assert torch.equal(final[name], init[name]) != bool(LORA_CHANGES.search(name)), name
    assert weights(os.path.join(run, "checkpoints", "step-000002")).keys() == init.keys()  # merged there too
    stored = train.dcp.FileSystemReader(os.path.join(run, "checkpoints", "step-000002", "train_state"))
    keys = stored.read_metadata().state_dict_metadata
    assert "model.llm.layers.0.attention.wq.lora_a" in keys and "model.llm.layers.0.attention.wq.weight" in keys
    with open(os.path.join(run, "model", "llm", "config.json")) as f:
        assert json.load(f)["rope_theta"] == train.rope_theta_for_context(10000.0, 64, 128)

    data.write_text_atomic(os.path.join(run, "checkpoints", "latest"), "step-000002")  # as after a kill at step 3
    shutil.rmtree(os.path.join(run, "model"))
    train.main(lora_args(demo) + ["--out", full, "--save_every", "2", "--resume"])
    again = weights(os.path.join(run, "model"))
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_lora_on_two_ranks_matches_one(demo, tmp_path):
    """LoRA under FSDP2 + Ulysses on 2 gloo processes = one process on the same global batch."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_train(lora_args(demo)[:-2] + ["--out", one])
    run_train(lora_args(demo)[:-2] + ["--out", two, "--sp", "2"], nproc=2)
    assert_same_training(metrics(os.path.join(one, "stage4")), metrics(os.path.join(two, "stage4")))
    assert weights(os.path.join(two, "stage4", "model")).keys() == weights(os.path.join(one, "stage4", "model")).keys()


# -----------------------------------------------------------------------------
# run folders and command lines that never lose or mislabel work


def train_exit(args: list, capsys) -> str:
    """train.main(args) must stop with exit code 2 and one `train.py: error:` line (no traceback); returns it."""
    with pytest.raises(SystemExit) as e:
        train.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    line = [ln for ln in err.splitlines() if ln.startswith("train.py: error:")]
    assert len(line) == 1, err
    return line[0]


def quick(demo, out, *extra):
    return ["--stage", "1", "--data", demo, "--steps", "2", "--global_batch", "2", "--eval", "none", "--out",
            str(out)] + list(extra)


def test_demo_data_is_generated_only_where_asked(demo, tmp_path, monkeypatch, capsys):
    """demo:FOLDER generates into a missing or empty folder only; the user's own files are never touched, and a
    plain folder is read as it is."""
    made = []
    monkeypatch.setattr(train.data, "make_demo", lambda path: made.append(path))
    info = train.mmsp.DistInfo(0, 1, 0, torch.device("cpu"))
    (tmp_path / "empty").mkdir()
    train.ensure_demo_data(f"demo:{tmp_path / 'empty'}", info)
    train.ensure_demo_data(f"demo:{tmp_path / 'missing'}", info)
    train.ensure_demo_data(str(tmp_path / "empty"), info)  # no demo: prefix: never generated
    assert made == [str(tmp_path / "empty"), str(tmp_path / "missing")]
    own = tmp_path / "own"
    own.mkdir()
    shutil.copy(os.path.join(demo, "stage3.json"), own / "stage3.json")
    before = (own / "stage3.json").read_bytes()
    line = train_exit(["--stage", "3", "--data", f"demo:{own}", "--steps", "1", "--out", str(tmp_path / "r")], capsys)
    assert f"demo:{own}" in line and "no meta.json" in line and len(made) == 2
    monkeypatch.undo()
    train.main(["--stage", "3", "--data", str(own), "--media_root", demo, "--init_from", "none", "--steps", "1",
                "--global_batch", "2", "--num_frames", "4", "--out", str(tmp_path / "r"), "--eval", "none"])
    assert (own / "stage3.json").read_bytes() == before and os.listdir(own) == ["stage3.json"]
    assert len(metrics(str(tmp_path / "r" / "stage3"))) == 1


def test_a_fresh_run_never_mixes_with_an_old_one(demo, tmp_path, capsys):
    """A run folder that holds a run: a fresh run is refused (nothing changes), --overwrite removes only what
    train.py wrote, --resume with --overwrite is refused."""
    out = tmp_path / "run"
    train.main(quick(demo, out, "--save_every", "1"))
    stage = out / "stage1"
    files = {p: p.read_bytes() for p in stage.rglob("*") if p.is_file()}
    line = train_exit(quick(demo, out, "--seed", "1"), capsys)
    assert str(stage) in line and "--resume" in line and "--overwrite" in line
    assert {p: p.read_bytes() for p in stage.rglob("*") if p.is_file()} == files
    (stage / "notes.txt").write_text("mine")
    assert "choose one" in train_exit(quick(demo, out, "--resume", "--overwrite"), capsys)
    train.main(quick(demo, out, "--overwrite", "--seed", "1"))
    assert (stage / "notes.txt").read_text() == "mine" and not (stage / "checkpoints").exists()
    assert len(metrics(str(stage))) == 2 and json.loads((stage / "config.json").read_text())["seed"] == 1


def test_resume_checks_what_the_run_recorded(demo, tmp_path, capsys):
    """--resume continues only the run that was started: another seed or global batch stops with what differs;
    `--stage 0-1 --resume` does not take a stage model trained from another model, and skips a matching one."""
    out = tmp_path / "run"
    args = ["--stage", "0-1", "--data", demo, "--steps", "1", "--global_batch", "2", "--num_frames", "4",
            "--eval", "none", "--out", str(out)]
    train.main(args)
    line = train_exit(args + ["--resume", "--seed", "1"], capsys)
    assert str(out / "stage0") in line and "--seed 0 there, 1 now" in line
    assert "--global_batch 2 there, 4 now" in train_exit(args + ["--resume", "--global_batch", "4"], capsys)
    train.main(args + ["--resume"])
    assert capsys.readouterr().out.count("matches these flags, skipped (--resume)") == 2
    train.main(args[:1] + ["0"] + args[2:] + ["--overwrite", "--seed", "1"])  # stage 0 again, another model
    line = train_exit(args[:1] + ["1"] + args[2:] + ["--resume"], capsys)
    assert str(out / "stage1") in line and "--init_from: another model" in line


@pytest.mark.parametrize("args, says", [
    (["--steps", "0"], "--steps 0: expected a number >= 1"),
    (["--global_batch", "0"], "--global_batch 0: expected a number >= 1"),
    (["--num_frames", "-2"], "--num_frames -2: expected a number >= 0"),
    (["--stage", "two"], "--stage 'two': expected 0..5"),
    (["--stage", "7"], "--stage '7': expected 0..5"),
    (["--model", "llama-70b"], "--model 'llama-70b': not a preset; choose one of tiny"),
    (["--attn_backend", "fast"], "--attn_backend 'fast': choose one of auto"),
    (["--data", "{demo}/stage1.json:-0.5"], "a file's weight must be > 0"),
    (["--data", "{demo}/stage1.json:x"], "must be a number"),
    (["--data", "{demo}/media/short/short_00000.mp4"], "a video is not a data file"),
    (["--data", "{demo}/nothing.json"], "nothing.json does not exist"),
])
def test_input_mistakes_stop_with_one_line(demo, tmp_path, capsys, args, says):
    args = [a.format(demo=demo) for a in args]
    line = train_exit(quick(demo, tmp_path / "r") + args, capsys)
    assert says in line, line


def test_unreadable_inputs_stop_with_one_line(demo, tmp_path, capsys):
    """A truncated --init_from, every media file missing, an --out that cannot be written: exit 2, one line."""
    saved = str(tmp_path / "m")
    longvila.LongVILA(longvila.PRESETS["tiny"]).save_pretrained(saved)
    weights_file = os.path.join(saved, "llm", "model.safetensors")
    with open(weights_file, "r+b") as f:
        f.truncate(os.path.getsize(weights_file) // 2)
    line = train_exit(quick(demo, tmp_path / "a", "--init_from", saved), capsys)
    assert f"--init_from {saved}" in line
    with open(os.path.join(demo, "stage3.json")) as f:
        samples = json.load(f)
    for s in samples:
        s["video"] = "gone/missing.mp4"
    bad = tmp_path / "gone.json"
    bad.write_text(json.dumps(samples))
    line = train_exit(quick(demo, tmp_path / "b", "--data", str(bad), "--num_frames", "4"), capsys)
    assert "--data" in line and "missing.mp4" in line
    (tmp_path / "file").write_text("")
    line = train_exit(quick(demo, tmp_path / "file" / "run"), capsys)
    assert "cannot write there" in line


def test_damaged_checkpoint_falls_back_to_the_one_before(demo, tmp_path, capsys):
    """--resume on a checkpoint whose optimizer state is truncated: a warning naming it, the one before it is
    used, and the run ends bitwise where the undamaged run ended."""
    out = tmp_path / "run"
    args = quick(demo, out, "--steps", "4", "--save_every", "2")
    train.main(args)
    stage = out / "stage1"
    ref = weights(str(stage / "model"))
    shutil.rmtree(stage / "model")
    for f in (stage / "checkpoints" / "step-000004" / "train_state").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    capsys.readouterr()
    train.main(args + ["--resume"])
    out_err = capsys.readouterr()
    assert "step-000004 cannot be read" in out_err.err and "at step 2" in out_err.out
    assert (stage / "checkpoints" / "step-000004.broken").is_dir()
    got = weights(str(stage / "model"))
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_full_disk_keeps_the_previous_checkpoint(demo, tmp_path, capsys, monkeypatch):
    """ENOSPC while writing a checkpoint: `no space left on <path>`, exit 2, the half-written .tmp removed, the
    previous checkpoint intact and named by `latest`."""
    real, calls = train.save_model, []

    def full_disk(model, path, *a):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: a file half written, then the disk is full
            os.makedirs(path, exist_ok=True)
            open(os.path.join(path, "half"), "w").close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(model, path, *a)

    monkeypatch.setattr(train, "save_model", full_disk)
    out = tmp_path / "run"
    line = train_exit(quick(demo, out, "--steps", "4", "--save_every", "1"), capsys)
    ckpts = out / "stage1" / "checkpoints"
    assert "no space left on" in line and str(ckpts) in line
    assert sorted(os.listdir(ckpts)) == ["latest", "step-000001"] and (ckpts / "latest").read_text() == "step-000001"
    assert weights(str(ckpts / "step-000001"))


def test_config_replays_a_run_and_flags_override_it(demo, tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    train.main(quick(demo, a, "--lr", "2e-3", "--seed", "3", "--global_batch", "4", "--no_fused_ops"))
    train.main(["--config", str(a / "stage1" / "config.json"), "--out", str(b)])
    assert [r["loss"] for r in metrics(str(a / "stage1"))] == [r["loss"] for r in metrics(str(b / "stage1"))]
    train.main(["--config", str(a / "stage1" / "config.json"), "--out", str(c), "--steps", "1"])
    replayed = json.loads((c / "stage1" / "config.json").read_text())
    assert (replayed["steps"], replayed["seed"], replayed["global_batch"], replayed["fused_ops"]) == (1, 3, 4, False)


def test_progress_replaces_the_line_per_step(demo, tmp_path, capsys):
    """Into a log (not a terminal) the progress line is printed every 5% of the steps; every step's figures are
    in metrics.jsonl."""
    train.main(quick(demo, tmp_path, "--steps", "40", "--no_save"))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("stage 1 ") and "/40" in ln]
    assert 10 <= len(lines) <= 22 and "loss=" in lines[-1] and "tok/s=" in lines[-1] and "40/40" in lines[-1]
    assert [r["step"] for r in metrics(str(tmp_path / "stage1"))] == list(range(1, 41))


def test_help_is_fast_shows_the_stage_defaults_and_takes_both_spellings():
    code = ("import runpy, sys\nsys.argv = ['train.py'] + sys.argv[1:]\ntry:\n    runpy.run_path('train.py', "
            "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('torch loaded:', 'torch' in sys.modules)")
    help5 = subprocess.run([sys.executable, "-c", code, "--stage", "5", "--help"], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=60).stdout
    assert "torch loaded: False" in help5  # --help answers before torch is imported
    assert re.search(r"--lr LR\s+peak learning rate \(default 0.002\)", help5)  # the tiny demo's stage 5
    assert "--no_save" in help5 and "--no-save" not in help5 and "/work/" not in help5
    real = " ".join(train.build_parser(["--stage", "5", "--model", "longvila-8b"]).format_help().split())
    assert "peak learning rate (default 5e-05)" in real and "(default 2)" in real  # --fps 2 for real models
    assert "(default all)" in " ".join(train.build_parser([]).format_help().split())
    assert train.parse_flags(["--no_save", "--no_fused_ops"]) == dict(save=False, fused_ops=False, threads=0,
                                                                      eval="auto")
