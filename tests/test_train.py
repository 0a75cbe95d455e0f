"""train.py: the curriculum's module freezing, sequence-parallel training equal to one process, exact resume after
kill -9, checkpoints readable by any number of processes, schedules, and the non-finite-loss stop.

    python -m pytest -q tests/test_train.py --durations=0

All runs use a small demo data set (data.make_demo with a few dozen samples) and the `tiny` preset in fp32.
"""
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
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")  # same threads everywhere: bitwise repeatable


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("demo"))
    data.make_demo(path, data.DemoConfig(images=24, short_videos=24, long_videos=6, passkey_docs=12, val_images=2,
                                         val_short_videos=2, val_long_videos=2, haystacks=1, mcq=2, caption_videos=1,
                                         val_passkey_docs=2))
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
    cfg = train.TrainConfig(lr=1e-3, schedule="cosine", warmup=0.1, steps=100, min_lr_ratio=0.1)
    lrs = [train.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # 10 warmup steps, linear
    assert lrs[10] == pytest.approx(1e-3)  # the cosine starts at the peak ...
    assert lrs[55] == pytest.approx(1e-4 + 0.9e-3 * 0.5, rel=1e-2)  # ... is half-way at the middle ...
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-2)  # ... and ends at min_lr_ratio * lr
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    cfg = train.TrainConfig(lr=2e-5, schedule="constant", warmup=2, steps=50)  # stage 4
    assert [train.lr_at(s, cfg) for s in (0, 1, 2, 49)] == pytest.approx([1e-5, 2e-5, 2e-5, 2e-5])


def test_rope_theta_for_context():
    # the reference's Qwen2 numbers (trained at 32k, theta 1e6) are the anchors
    for target, theta in ((131072, 1.53e7), (262144, 2.07e8), (524288, 1.062e9)):
        assert train.rope_theta_for_context(1e6, 32768, target) == pytest.approx(theta, rel=1e-6)
    assert train.rope_theta_for_context(1e6, 32768, 32768) == 1e6  # never lowered
    a, b, c = (train.rope_theta_for_context(5e5, 8192, n) for n in (16384, 65536, 262144))  # Llama-3, 8k
    assert 5e5 < a < b < c


def test_stage_presets_and_flag_precedence(tmp_path):
    cfg = train.resolve(4, {"model": "longvila-8b", "out": "r"})
    assert (cfg.train_vision, cfg.train_projector, cfg.train_llm) == (False, False, True)
    assert (cfg.lr, cfg.schedule, cfg.warmup) == (2e-5, "constant", 2)
    assert cfg.init_from == os.path.join("r", "stage3", "model") and cfg.out == os.path.join("r", "stage4")
    assert train.parse_stages("all", from_scratch=True) == [0, 1, 2, 3, 4, 5]
    cfg = train.resolve(5, {"model": "longvila-8b", "lr": 2e-5, "init_from": "x"})
    assert cfg.grad_checkpointing and cfg.lr == 2e-5 and cfg.init_from == "x"  # flags beat the preset
    fresh = {"out": str(tmp_path / "r")}  # no stage0/ there (runs/demo/stage0 may exist where the tests run)
    assert train.resolve(1, fresh).init_from == "none" and train.resolve(1, fresh).lr == 3e-3  # tiny: demo tuning
    assert train.parse_stages("all") == [1, 2, 3, 4, 5] and train.parse_stages("2-4") == [2, 3, 4]


def test_stand_in_data(demo, tmp_path):
    """Stage 0's data: the needle questions one per sample with their video; the captions as text only, written
    where their image was."""
    files = dict(train.DEMO_FILES[0])
    assert train.STAND_IN_DATA == {"stage3.json": "needle", "stage1.json": "describe"} and set(files) == {
        "stage3.json", "stage1.json"}
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
    trains = {0: {"vision", "projector", "llm"}, 1: {"projector"}, 2: {"projector", "llm"}, 3: {"vision", "projector", "llm"}, 4: {"llm"},
              5: {"vision", "projector", "llm"}}
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
              "--num_frames", "8", "--lr", "1e-3"]
    runs = {}
    for name, nproc, extra in (("single", 1, []), ("sp2", 4, ["--sp", "2"]), ("sp4_ring2", 4, ["--sp", "4", "--ring", "2"])):
        run_train(common + extra + ["--out", os.path.join(root, name)], nproc=nproc)
        runs[name] = os.path.join(root, name, "stage5")
    return runs


@pytest.mark.parametrize("name", ["sp2", "sp4_ring2"])
def test_sequence_parallel_matches_single_process(sp_runs, name):
    """Same global batch (2 samples): one process accumulates 2 micro-batches; sp2 = dp 2 x ulysses 2; 2x2 = ring 2 x
    ulysses 2 with 2 micro-batches. fp32 everywhere; only the order of floating-point sums differs (all-reduce /
    reduce-scatter over ranks, ring LSE merges, chunked CE): ~1e-7 relative. Step 1 (no update yet) is held to
    rtol 1e-5. AdamW's first updates move every parameter by ~lr whatever the gradient's size, so a gradient
    coordinate near 0 whose sign flips under that noise moves its weight by ~2 lr: later steps get rtol 2e-3
    (we saw up to 3e-4). A real mistake - a wrong normalisation, a lost shard, a missing all-reduce - changes step
    1 by more than 1e-2."""
    ref, got = metrics(sp_runs["single"]), metrics(sp_runs[name])
    assert [r["step"] for r in got] == [1, 2, 3]
    # step 1 is pure forward/backward math from the same weights: summation order only
    assert got[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-5)
    assert got[0]["grad_norm"] == pytest.approx(ref[0]["grad_norm"], rel=1e-5)
    for a, b in zip(ref, got):  # after AdamW updates (see the docstring)
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-3), (a, b)
    assert ref[-1]["loss"] < ref[0]["loss"]
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
    train.write_text_atomic(str(root / "latest"), "step-000002")
    assert train.latest_checkpoint(str(tmp_path)) == str(root / "step-000002")
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
    assert train._kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == "attention"
    assert train._kernel_kind("nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_TNN") == "matrix products"
    assert train._kernel_kind("_rms_norm_bwd_kernel") == "fused ops (kernels.py)"
    assert train._kernel_kind("_bwd_dkdv_kernel") == train._kernel_kind("_fwd_kernel") == "attention"  # ours


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
            "--global_batch", "2", "--num_frames", "4", "--save_every", "2", "--no-cache_data"]
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
    train.write_text_atomic(os.path.join(run, "checkpoints", "latest"), "step-000002")
    shutil.rmtree(os.path.join(run, "model"))
    p = run_train(args + ["--workers", "1", "--out", runs[2], "--resume"])
    assert "at step 2" in p.stdout
    assert key(metrics(run)) == key(ref)  # the skipped count went through the checkpoint too
    b = weights(os.path.join(run, "model"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loader_workers_default_and_cache_conflict(demo, tmp_path):
    assert train.loader_workers(train.TrainConfig(cache_data=True)) == 0  # cached demo: nothing to overlap
    assert 1 <= train.loader_workers(train.TrainConfig(cache_data=False)) <= 8
    assert train.loader_workers(train.TrainConfig(cache_data=False, workers=0)) == 0
    with pytest.raises(ValueError, match="--cache_data with --workers 2"):
        train.main(["--stage", "1", "--data", demo, "--steps", "1", "--global_batch", "2", "--cache_data",
                    "--workers", "2", "--out", str(tmp_path / "x"), "--eval", "none"])


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
