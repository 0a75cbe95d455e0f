"""Tests of longvila.py: parity with Hugging Face transformers (fp32, CPU), checkpoint I/O, generation, errors.

    python -m pytest -q tests/test_model.py

transformers is the numerical reference only (longvila.py never imports it). Every reference model gets random
weights, norms and biases included, so a swapped name or a missing bias cannot hide behind a default of 1 or 0.
"""
import json
import math
import os
import time

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import kernels
import longvila as lv
from longvila import IGNORE_INDEX, IMAGE_TOKEN_ID, LongVILA

transformers = pytest.importorskip("transformers")
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,  # noqa: E402
                          SiglipVisionConfig, SiglipVisionModel)

transformers.logging.set_verbosity_error()
TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes run faster on one thread, and a shared 2-core CI machine is oversubscribed by two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# references

def randomize_(model, seed, std=0.05):
    """Perturb every parameter (norm gains, biases, embeddings...) so a test sees all of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def hf_llm(kind, seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)
    base.update(kw)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**base))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**base))
    return randomize_(model.eval(), seed)


def hf_siglip(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                patch_size=8, vision_use_head=False)
    base.update(kw)
    return randomize_(SiglipVisionModel(SiglipVisionConfig(**base)).eval(), seed + 1)


def reference_flat_square(x, nvila=False):
    """Transcription of NVlabs/VILA DownSampleBlock (forward + flat_square), the reference's own reshapes: the
    LongVILA branch's, or (nvila) main's since commit 36f6adc, which permutes the result once more."""
    h = w = int(x.shape[1] ** 0.5)
    x = x.reshape(x.shape[0], h, w, -1)
    n, w, h, c = x.size()
    if w % 2 == 1:
        x = torch.concat([x, torch.zeros((n, 1, h, c), dtype=x.dtype)], dim=1).contiguous()
        n, w, h, c = x.size()
    if h % 2 == 1:
        x = torch.concat([x, torch.zeros((n, w, 1, c), dtype=x.dtype)], dim=2).contiguous()
        n, w, h, c = x.size()
    x = x.view(n, w, int(h / 2), int(c * 2))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h / 2), int(w / 2), int(c * 4))
    if nvila:
        x = x.permute(0, 2, 1, 3).contiguous()
    return x.reshape(x.shape[0], -1, x.shape[-1])


def reference_projector(cv, c, seed=0):
    """The reference's mlp_downsample layers 1.. (layer 0 is the parameter-free DownSampleBlock)."""
    torch.manual_seed(seed)
    seq = nn.Sequential(nn.Identity(), nn.LayerNorm(4 * cv), nn.Linear(4 * cv, c), nn.GELU(), nn.Linear(c, c))
    return randomize_(seq, seed + 2)


def load_llm_from_hf(hf_model, cfg: lv.LLMConfig):
    llm = lv.Transformer(cfg)
    sd = {lv.hf_to_ours("llm", k)[len("llm."):]: v for k, v in hf_model.state_dict().items()}
    llm.load_state_dict(sd, strict=True)
    llm.tie()
    return llm.eval()


def llm_logits(llm, ids):
    B, T = ids.shape
    h = llm(llm.tok_embeddings(ids), torch.arange(T).expand(B, T))
    return llm.output(h)


# The top-level config.json of a released Llama-3 LongVILA checkpoint (LongVILA-8B-1024Frames), as VILA's LongVILA
# branch writes it (LlavaConfig + prepare_config_for_training); sizes and paths differ, the fields are the same.
RELEASED_TOP = {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "resume_path": None,
                "hidden_size": 64, "mm_hidden_size": 32, "image_aspect_ratio": "resize", "num_video_frames": 1024,
                "fps": 0.0, "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch",
                "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "mm_projector_lr": None,
                "vision_resolution": -1, "interpolate_mode": "linear", "s2": False, "s2_scales": "336,672,1008",
                "s2_max_split_size": 336, "model_dtype": "torch.bfloat16", "tune_language_model": True,
                "tune_vision_tower": True, "tune_mm_projector": True, "drop_path_rate": 0.0,
                "llm_cfg": {}, "vision_tower_cfg": {}, "mm_projector_cfg": {}, "_name_or_path": "/ckpt/longvila",
                "transformers_version": "4.37.2"}


def write_vila_dir(path, hf_lm, siglip, proj, select_layer=-2, shard=None, top=None, projector_type="mlp_downsample"):
    """A VILA-layout checkpoint written the way the released ones are: HF save_pretrained for llm/ and vision_tower/."""
    hf_lm.save_pretrained(os.path.join(path, "llm"), **({"max_shard_size": shard} if shard else {}))
    siglip.save_pretrained(os.path.join(path, "vision_tower"))
    os.makedirs(os.path.join(path, "mm_projector"))
    save_file({"layers." + k: v.contiguous() for k, v in proj.state_dict().items()},  # MultimodalProjector.layers
              os.path.join(path, "mm_projector", "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "mm_projector", "config.json"), "w") as f:
        json.dump({"architectures": ["MultimodalProjector"], "mm_projector_type": projector_type,
                   "model_type": "v2l_projector", "torch_dtype": "bfloat16"}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(RELEASED_TOP, mm_vision_select_layer=select_layer, **(top or {})), f)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return randomize_(LongVILA(lv.PRESETS["tiny"]).eval(), seed)


def video_prompt(n_frames, n_tok, prefix=(1, 5, 6), suffix=(7, 8, 9), newline=13):
    ids = list(prefix)
    for _ in range(n_frames):
        ids += [IMAGE_TOKEN_ID] * n_tok + [newline]
    return torch.tensor([ids + list(suffix)])


# -----------------------------------------------------------------------------
# parity with transformers

@pytest.mark.parametrize("kind,kw", [
    ("llama", dict(rope_theta=5000.0, rms_norm_eps=1e-5)),
    ("llama", dict(rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    # Llama 3.1's scaling; original length 64 puts the 8 frequencies of head dim 16 in all three bands
    ("llama", dict(rope_theta=5000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    ("qwen2", dict(rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    ("qwen2", dict(rope_theta=1e6, num_key_value_heads=1)),
])
def test_llm_logits_match_hf(kind, kw):
    hf = hf_llm(kind, **json.loads(json.dumps(kw)))  # a copy: transformers adds rope_theta to the dict it is given
    cfg = lv._llm_from_hf(json.loads(hf.config.to_json_string()), "<hf config>")
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.tie_embeddings == kw.get("tie_word_embeddings", False)
    if "rope_scaling" in kw:
        assert cfg.rope_scaling == kw["rope_scaling"]
    llm = load_llm_from_hf(hf, cfg)
    ids = torch.randint(0, 96, (2, 200), generator=torch.Generator().manual_seed(1))  # past the original 64
    with torch.no_grad():
        ref = hf(ids).logits
        out = llm_logits(llm, ids)
    assert (out - ref).abs().max().item() <= TOL


def test_rope_scaling_is_position_interpolation():
    # linear factor s: position p is rotated exactly like position p / s without scaling
    pos = torch.arange(0, 64, 4)[None]  # (1, 16)
    cfg = lv.LLMConfig(dim=64, n_heads=4, n_kv_heads=4, rope_theta=1e4)
    c1, s1 = lv.rope_cos_sin(pos, lv.rope_inv_freq(lv.LLMConfig(dim=64, n_heads=4, n_kv_heads=4, rope_theta=1e4,
                                                                rope_scaling={"rope_type": "linear", "factor": 4.0})))
    c2, s2 = lv.rope_cos_sin(pos // 4, lv.rope_inv_freq(cfg))
    assert torch.allclose(c1, c2, atol=1e-6) and torch.allclose(s1, s2, atol=1e-6)


@pytest.mark.parametrize("image_size", [32, 24])  # grid 4 and an odd grid 3
def test_vision_features_match_hf_second_to_last_hidden_state(image_size):
    sig = hf_siglip(image_size=image_size)
    vcfg = lv.VisionConfig(image_size=image_size, patch_size=8, width=32, layers=3, heads=4, mlp_dim=64)
    vision = lv.VisionTower(vcfg)
    vision.load_state_dict({lv.hf_to_ours("vision_tower", k)[len("vision."):]: v
                            for k, v in sig.state_dict().items()}, strict=True)
    x = torch.randn(3, 3, image_size, image_size)
    with torch.no_grad():
        ref = sig(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        out = vision(x)
    assert out.shape == (3, vcfg.num_patches, 32)
    assert (out - ref).abs().max().item() <= TOL
    # the unused last block and post-layernorm exist (for round trips) but are frozen
    assert not any(p.requires_grad for p in vision.unused_parameters())


@pytest.mark.parametrize("grid", [4, 3, 5, 27])
def test_projector_merge_order_matches_reference(grid):
    x = torch.randn(2, grid * grid, 6)  # (F, P, Cv)
    out = lv.downsample_2x2(x)
    ref = reference_flat_square(x)
    assert out.shape == ref.shape == (2, math.ceil(grid / 2) ** 2, 24)
    assert torch.equal(out, ref)
    rows = lv.downsample_2x2(x, "row-major")
    assert torch.equal(rows, reference_flat_square(x, nvila=True))
    if grid > 2:
        assert not torch.equal(rows, out)
    # the order spelled out: token (j, i), column pair j outer, = [x(2i,2j), x(2i,2j+1), x(2i+1,2j), x(2i+1,2j+1)]
    g2 = grid + grid % 2
    xg = torch.zeros(2, g2, g2, 6)
    xg[:, :grid, :grid] = x.reshape(2, grid, grid, 6)
    for j in range(g2 // 2):
        for i in range(g2 // 2):
            want = torch.cat([xg[:, 2 * i, 2 * j], xg[:, 2 * i, 2 * j + 1], xg[:, 2 * i + 1, 2 * j],
                              xg[:, 2 * i + 1, 2 * j + 1]], -1)
            assert torch.equal(out[:, j * (g2 // 2) + i], want)
            assert torch.equal(rows[:, i * (g2 // 2) + j], want)
    assert lv.ProjectorConfig().tokens_per_frame(grid) == math.ceil(grid / 2) ** 2


@pytest.mark.parametrize("kind,projector_type,order", [
    ("llama", "mlp_downsample", "column-major"),       # the Llama-3 LongVILA checkpoints (VILA's LongVILA branch)
    ("qwen2", "mlp_downsample", "row-major"),          # Qwen2 LongVILA, released with VILA main
    ("llama", "mlp_downsample_2x2_fix", "row-major"),  # VILA main's explicit name for the row-major merge
])
def test_multimodal_forward_from_hf_written_vila_dir(tmp_path, kind, projector_type, order):
    """A released LongVILA folder (config.json with the reference's fields, sharded llm/, vision_tower/,
    mm_projector/) loads, and its logits equal the reference's computation with the reference's token order."""
    hf = hf_llm(kind, rope_theta=5000.0)
    sig = hf_siglip(image_size=40)  # odd grid 5 -> padded to 6 -> 9 tokens per frame
    proj = reference_projector(32, 64)
    write_vila_dir(tmp_path, hf, sig, proj, shard="20KB", projector_type=projector_type)  # sharded llm/ + index
    assert os.path.isfile(tmp_path / "llm" / "model.safetensors.index.json")
    model = LongVILA.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert model.config.tokens_per_frame == 9 and model.config.llm.model_type == kind
    assert model.config.projector.token_order == order and model.config.num_video_frames == 1024

    ids = video_prompt(3, 9)  # (1, T)
    frames = torch.randn(3, 3, 40, 40)
    ids2 = torch.randint(0, 96, (1, ids.shape[1]))  # a second, text-only row
    with torch.no_grad():
        out, _ = model(torch.cat([ids, ids2]), [frames, None])
        feats = sig(pixel_values=frames, output_hidden_states=True).hidden_states[-2]  # (F, P, Cv)
        vis = proj(reference_flat_square(feats, nvila=order == "row-major")).reshape(-1, 64)  # (F*N, C)
        emb = hf.model.embed_tokens(torch.cat([ids, ids2]).clamp(min=0))  # (2, T, C)
        emb[0, ids[0] == IMAGE_TOKEN_ID] = vis
        ref = hf(inputs_embeds=emb).logits
    assert (out - ref).abs().max().item() <= TOL


UNSUPPORTED = [  # (file, field, value): what the reference can do and this model cannot must stop the load
    ("config.json", "s2", True), ("config.json", "dynamic_s2", True), ("config.json", "image_aspect_ratio", "dynamic"),
    ("config.json", "video_encoder", {"_target_": "llava.model.encoders.TSPVideoEncoder"}),
    ("config.json", "mm_use_im_start_end", True), ("config.json", "chat_template", "vicuna_v1"),
    ("mm_projector/config.json", "mm_projector_type", "mlp_downsample_3x3_fix"),
    ("llm/config.json", "rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
]


@pytest.mark.parametrize("file,field,value", UNSUPPORTED)
def test_unsupported_config_fields_stop_the_load(tmp_path, file, field, value):
    write_vila_dir(tmp_path, hf_llm("llama"), hf_siglip(), reference_projector(32, 64))
    path = tmp_path / file
    c = json.loads(path.read_text())
    c[field] = value
    path.write_text(json.dumps(c))
    with pytest.raises(lv.InputError, match=f"{file}: .*{field.split('_')[0]}"):
        LongVILA.from_pretrained(str(tmp_path))


def test_bin_weights_load_and_a_truncated_file_is_named(tmp_path):
    hf, sig, proj = hf_llm("llama"), hf_siglip(), reference_projector(32, 64)
    write_vila_dir(tmp_path / "bin", hf, sig, proj)
    st = tmp_path / "bin" / "llm" / "model.safetensors"   # older checkpoints: llm/pytorch_model.bin (a pickle)
    torch.save(load_file(str(st)), str(tmp_path / "bin" / "llm" / "pytorch_model.bin"))
    st.unlink()
    write_vila_dir(tmp_path / "st", hf, sig, proj)
    a, b = LongVILA.from_pretrained(str(tmp_path / "bin")), LongVILA.from_pretrained(str(tmp_path / "st"))
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        assert torch.equal(a(ids)[0], b(ids)[0])
    f = tmp_path / "st" / "vision_tower" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # an interrupted download
    with pytest.raises(lv.InputError, match=r"vision_tower/model\.safetensors: cannot read"):
        LongVILA.from_pretrained(str(tmp_path / "st"))


# -----------------------------------------------------------------------------
# checkpoint I/O

def test_save_then_load_gives_identical_logits_and_hf_can_read_it(tmp_path):
    model = tiny_model()
    ids, frames = video_prompt(2, 4), torch.randn(2, 3, 32, 32)
    model.save_pretrained(str(tmp_path), max_shard_bytes=400_000)  # llm/ sharded
    assert os.path.isfile(tmp_path / "llm" / "model.safetensors.index.json")
    back = LongVILA.from_pretrained(str(tmp_path))
    with torch.no_grad():
        a, _ = model(ids, [frames])
        b, _ = back(ids, [frames])
    assert torch.equal(a, b)
    assert back.config == model.config
    half = LongVILA.from_pretrained(str(tmp_path), dtype=torch.bfloat16)  # converted while reading
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    with torch.no_grad():
        assert (half(ids, [frames])[0].float() - a).abs().max().item() < 0.05
    # Hugging Face reads the parts: the LLM logits and the vision features agree
    assert isinstance(LlamaConfig.from_pretrained(str(tmp_path / "llm")), LlamaConfig)
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "llm"), dtype=torch.float32).eval()
    sig = SiglipVisionModel.from_pretrained(str(tmp_path / "vision_tower")).eval()
    text = torch.randint(0, 1024, (1, 20))
    with torch.no_grad():
        assert (hf(text).logits - model(text)[0]).abs().max().item() <= TOL
        ref = sig(pixel_values=frames, output_hidden_states=True).hidden_states[-2]
        assert (model.vision(frames) - ref).abs().max().item() <= TOL
    proj = load_file(str(tmp_path / "mm_projector" / "model.safetensors"))
    assert sorted(proj) == ["layers.1.bias", "layers.1.weight", "layers.2.bias", "layers.2.weight",
                            "layers.4.bias", "layers.4.weight"]
    top = json.loads((tmp_path / "config.json").read_text())
    assert top["model_type"] == "llava_llama" and top["mm_projector"] == "mlp_downsample"


def test_qwen2_tied_checkpoint_round_trip_and_hf_read(tmp_path):
    cfg = lv.PRESETS["tiny"]
    cfg = lv.LongVILAConfig(vision=cfg.vision, projector=cfg.projector, chat_template="chatml",
                            llm=lv.LLMConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                                             ffn_dim=256, norm_eps=1e-6, rope_theta=1e6,
                                             rope_scaling={"rope_type": "linear", "factor": 2.0},
                                             qkv_bias=True, tie_embeddings=True, model_type="qwen2"))
    torch.manual_seed(0)
    model = randomize_(LongVILA(cfg).eval(), 3)
    assert model.llm.output.weight is model.llm.tok_embeddings.weight
    model.save_pretrained(str(tmp_path))
    back = LongVILA.from_pretrained(str(tmp_path))
    assert back.llm.output.weight is back.llm.tok_embeddings.weight and back.config == cfg
    hf = Qwen2ForCausalLM.from_pretrained(str(tmp_path / "llm"), dtype=torch.float32).eval()
    text = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        assert torch.equal(back(text)[0], model(text)[0])
        assert (hf(text).logits - model(text)[0]).abs().max().item() <= TOL


# -----------------------------------------------------------------------------
# generation

def test_generate_with_kv_cache_equals_greedy_full_recompute():
    model = tiny_model(1)
    ids, frames = video_prompt(2, 4), torch.randn(2, 3, 32, 32)
    streamed = []
    new = model.generate(ids, [frames], max_new_tokens=8, stream=streamed.append)
    seq = ids
    ref = []
    with torch.no_grad():
        for _ in range(8):
            tok = model(seq, [frames])[0][:, -1].argmax(-1)  # (1,)
            ref.append(tok.item())
            seq = torch.cat([seq, tok[None]], dim=1)
    assert new.shape == (1, 8) and new[0].tolist() == ref == streamed
    # eos stops generation and is included
    stop = model.generate(ids, [frames], max_new_tokens=8, eos_token_id=ref[2])
    assert stop[0].tolist() == ref[:ref.index(ref[2]) + 1]
    # sampling is reproducible with a generator and only picks tokens inside the nucleus
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    s1 = model.generate(ids, [frames], max_new_tokens=4, temperature=0.8, top_p=0.9, generator=g1)
    s2 = model.generate(ids, [frames], max_new_tokens=4, temperature=0.8, top_p=0.9, generator=g2)
    assert torch.equal(s1, s2)
    assert model.generate(ids, [frames], max_new_tokens=3, temperature=1.0, top_p=1e-6)[0].tolist() == ref[:3]


def test_attention_with_cache_offsets_matches_full_causal():
    q, k, v = torch.randn(2, 7, 4, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    full = lv.attention(q, k, v)  # (B, 7, H, D)
    assert torch.allclose(lv.attention(q[:, 4:], k, v), full[:, 4:], atol=1e-6)  # 3 new tokens vs 7 keys
    assert torch.allclose(lv.attention(q[:, 6:], k, v), full[:, 6:], atol=1e-6)  # decode step
    # GQA: query heads 0,1 use KV head 0 and heads 2,3 use KV head 1
    rep = lv.attention(q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2))
    assert torch.allclose(rep, full, atol=1e-6)


def test_attention_hook_plugs_in_kernels_flash_attention():
    # forward_embeds(attn=...) is where the kernels and sequence parallelism plug in: the pure-PyTorch twin of the
    # flash kernel (the CUDA default) gives the same hidden states as SDPA (the CPU default)
    kernels = pytest.importorskip("kernels")
    model = tiny_model(4)
    ids, frames = video_prompt(2, 4), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = model.embed(ids, [frames])  # (1, T, C)
        pos = torch.arange(ids.shape[1])[None]  # (1, T)
        ref = model.forward_embeds(h, pos)
        flash = model.forward_embeds(h, pos, attn=lambda q, k, v, i: kernels.flash_attn_func(q, k, v, causal=True,
                                                                                               backend="torch"))
        sdpa = model.forward_embeds(h, pos, attn=lv.sdpa_attention)
    assert (flash - ref).abs().max().item() <= TOL and torch.equal(sdpa, ref)
    # under autocast (train.py on one GPU: fp32 weights, bf16 products) q/k leave RoPE in the projections' bf16,
    # beside a bf16 v, even though the angles are fp32: the flash kernels take only one dtype for all three
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.forward_embeds(h, pos, attn=lambda q, k, v, i: kernels.flash_attn_func(q, k, v, backend="torch"))
    assert (mixed.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()
    # a KV cache filled in pieces (prefill 7, then 5 more, then 1 by 1) gives the hidden states of one full pass
    T = ids.shape[1]
    cache = lv.KVCache(4, 1, T, 2, 32, torch.float32, "cpu")
    with torch.no_grad():
        pieces = [model.forward_embeds(h[:, a:b], pos[:, a:b], cache=cache)
                  for a, b in [(0, 7), (7, 12)] + [(t, t + 1) for t in range(12, T)]]
    assert cache.length == T and (torch.cat(pieces, 1) - ref).abs().max().item() <= 1e-5


# -----------------------------------------------------------------------------
# training helpers

def test_loss_chunked_equals_full_and_backward_is_fast():
    model = tiny_model(2).train()
    ids, frames = video_prompt(3, 4), torch.randn(3, 3, 32, 32)
    labels = ids.masked_fill(ids == IMAGE_TOKEN_ID, IGNORE_INDEX)
    logits, loss = model(ids, [frames], labels)
    ref = nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX)
    assert torch.allclose(loss, ref, atol=1e-6)
    loss.backward()
    g_full = model.projector.fc1.weight.grad.clone()
    model.zero_grad()
    none, loss2 = model(ids, [frames], labels, return_logits=False, chunk_size=5)
    loss2.backward()
    assert none is None and torch.allclose(loss, loss2, atol=1e-6)
    assert torch.allclose(model.projector.fc1.weight.grad, g_full, atol=1e-6)
    # gradient checkpointing recomputes the blocks: same loss, same gradients
    model.zero_grad()
    model.set_grad_checkpointing(True)
    _, loss3 = model(ids, [frames], labels)
    loss3.backward()
    model.set_grad_checkpointing(False)
    assert torch.allclose(loss, loss3, atol=1e-6)
    assert torch.allclose(model.projector.fc1.weight.grad, g_full, atol=1e-6)
    # "save-attn" keeps the decoder's fused attention outputs: same gradients, and the backward runs no decoder
    # attention forward (the vision tower's per-frame attention is always recomputed), where "full" recomputes all
    from torch.utils._python_dispatch import TorchDispatchMode

    F_ = model.config.llm.ffn_dim

    class CountAttentionForwards(TorchDispatchMode):
        n = 0  # attention forwards
        w2 = 0  # forward products of the MLP's down projection, (T, F) @ W2^T (the backward's dX = dG @ W1 also
        # reads F-wide rows, but with the weight itself, not a transposed view)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func in kernels.saved_attention_ops()
            self.w2 += func is torch.ops.aten.mm.default and args[0].shape[-1] == F_ and args[1].shape[0] == F_ \
                and not args[1].is_contiguous()
            return func(*args, **(kwargs or {}))

    counts = {}
    for mode in ("full", "save-attn"):
        model.zero_grad()
        model.set_grad_checkpointing(mode)
        with CountAttentionForwards() as fwd:
            _, loss4 = model(ids, [frames], labels)
        with CountAttentionForwards() as c:
            loss4.backward()
        counts[mode] = c.n
        # the recomputation stops once every tensor the backward saved exists again: the block's last product,
        # w2 (one per decoder block in the forward), is never redone
        assert (fwd.w2, c.w2) == (model.config.llm.n_layers, 0), (mode, fwd.w2, c.w2)
        assert torch.allclose(loss, loss4, atol=1e-6)
        assert torch.allclose(model.projector.fc1.weight.grad, g_full, atol=1e-6)
    model.set_grad_checkpointing(False)
    n_blocks = model.config.vision.n_used_layers + model.config.llm.n_layers
    assert counts == {"full": n_blocks, "save-attn": model.config.vision.n_used_layers}, counts
    with pytest.raises(ValueError, match="checkpointing mode"):
        model.set_grad_checkpointing("sometimes")
    # only the first decoder block recomputed, the others keep their activations: same gradients
    model.zero_grad()
    model.set_grad_checkpointing("full", llm_layers=1)
    _, loss5 = model(ids, [frames], labels)
    with CountAttentionForwards() as c:
        loss5.backward()
    model.set_grad_checkpointing(False)
    assert torch.allclose(loss, loss5, atol=1e-6)
    assert torch.allclose(model.projector.fc1.weight.grad, g_full, atol=1e-6)
    assert c.n == model.config.vision.n_used_layers + 1, c.n
    with pytest.raises(ValueError, match="between 0 and"):
        model.set_grad_checkpointing(True, llm_layers=model.config.llm.n_layers + 1)
    # nothing supervised -> loss 0, not NaN
    _, zero = model(ids, [frames], torch.full_like(ids, IGNORE_INDEX))
    assert zero.item() == 0.0
    # tiny preset: one forward + backward step (a 3-frame video row + two 256-token text rows) well under a second
    # on CPU (~0.2 s measured on one core; the module runs on one thread, see one_thread).
    x = torch.randint(0, 1024, (2, 256))
    model(x, None, x)[1].backward()  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        model(ids, [frames], labels)[1].backward()
        model(x, None, x)[1].backward()
        times.append(time.perf_counter() - t0)
    assert min(times) < 1.0, f"tiny forward+backward took {min(times):.3f}s"


def test_fused_ops_in_the_model_match_eager(monkeypatch):
    # kernels.configure(fused_ops="always") runs the model's RMSNorm / RoPE / SwiGLU through the Triton kernels (on
    # CPU in the interpreter): same loss and gradients as the eager twins, with and without (selective) checkpointing
    kernels = pytest.importorskip("kernels")
    if not kernels.HAS_TRITON or not (kernels._INTERPRET or torch.cuda.is_available()):
        pytest.skip("the fused ops need triton on a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU machine: the compiled kernels, fp32
    model = tiny_model(2).train().to(device)
    ids, frames = video_prompt(3, 4).to(device), torch.randn(3, 3, 32, 32, device=device)
    labels = ids.masked_fill(ids == IMAGE_TOKEN_ID, IGNORE_INDEX)

    def loss_and_grads():
        model.zero_grad()
        _, loss = model(ids, [frames], labels)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    before = kernels.configure(fused_ops=False)  # the eager twins (on CUDA the default would be the kernels)
    ref_loss, ref_grads = loss_and_grads()
    kernels.configure(**before)
    calls = []
    for name in ("rms_norm", "rotary", "swiglu"):
        fn = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a))
    before = kernels.configure(fused_ops="always")
    try:
        for mode in (False, "full", "save-attn"):
            model.set_grad_checkpointing(mode)
            calls.clear()
            loss, grads = loss_and_grads()
            assert set(calls) == {"rms_norm", "rotary", "swiglu"}, (mode, calls)
            assert torch.allclose(loss, ref_loss, atol=1e-5), (mode, loss, ref_loss)
            for g, r in zip(grads, ref_grads):
                assert torch.allclose(g, r, atol=1e-5, rtol=1e-4), mode
    finally:
        kernels.configure(**before)
        model.set_grad_checkpointing(False)


def test_set_trainable_param_groups_flops():
    model = LongVILA(lv.PRESETS["tiny"])
    model.set_trainable(vision=False, projector=True, llm=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projector.") for n in trainable)
    model.set_trainable(vision=True, projector=True, llm=True)
    assert not model.vision.post_norm.weight.requires_grad and not model.vision.layers[-1].fc1.weight.requires_grad
    groups = model.param_groups(0.1)
    decay = {id(p) for p in groups[0]["params"]}
    named = dict(model.named_parameters())
    assert id(named["llm.layers.0.attention.wq.weight"]) in decay and id(named["projector.fc1.weight"]) in decay
    for n in ("llm.tok_embeddings.weight", "llm.norm.weight", "projector.fc1.bias", "vision.pos_embed.weight",
              "vision.layers.0.norm1.weight", "projector.norm.weight"):
        assert id(named[n]) not in decay
    n_groups = sum(len(g["params"]) for g in groups)
    assert n_groups == sum(1 for p in model.parameters() if p.requires_grad)
    c = lv.PRESETS["tiny"].llm
    n = sum(p.numel() for k, p in model.llm.named_parameters() if not k.startswith("tok_embeddings"))
    assert model.flops_per_token(100) == 6 * n + 12 * c.n_layers * c.dim * 100
    assert model.flops_per_token(100, causal=True) == 6 * n + 6 * c.n_layers * c.dim * 100


def test_presets_have_the_published_sizes():
    counts = {"longvila-8b": 8_030_261_248, "longvila-7b": 7_615_616_512, "longvila-1.5b": 1_543_714_304}
    for name, n in counts.items():
        with torch.device("meta"):
            llm = lv.Transformer(lv.PRESETS[name].llm)
        assert sum(p.numel() for p in llm.parameters()) == n, name  # parameters() counts a tied weight once
        assert lv.PRESETS[name].tokens_per_frame == 196 and lv.PRESETS[name].vision.num_patches == 729
    with torch.device("meta"):
        vision = lv.VisionTower(lv.PRESETS["longvila-8b"].vision)
    # SigLIP so400m/14-384 without its pooling head: 413.0M, as HF SiglipVisionModel(vision_use_head=False)
    # (26 of 27 layers run)
    assert sum(p.numel() for p in vision.parameters()) == 412_987_248
    assert lv.PRESETS["tiny"].tokens_per_frame == 4 and lv.PRESETS["longvila-7b"].chat_template == "chatml"
    with pytest.raises(ValueError, match="n_kv_heads"):
        lv.LLMConfig(dim=3584, n_heads=28, n_kv_heads=8)
    with pytest.raises(ValueError, match="divisible by heads"):
        lv.VisionConfig(width=100, heads=16)


# -----------------------------------------------------------------------------
# bad inputs

def test_bad_inputs_raise_clear_errors(tmp_path):
    model = tiny_model()
    ids = video_prompt(2, 4)
    with pytest.raises(ValueError, match=r"8 image placeholders.*12 visual tokens \(3 frames x 4"):
        model(ids, [torch.randn(3, 3, 32, 32)])
    with pytest.raises(ValueError, match=r"8 image placeholders.*0 visual tokens"):
        model(ids, None)
    with pytest.raises(ValueError, match=r"images\[0\] has shape \(2, 3, 48, 48\); expected \(F, 3, 32, 32\)"):
        model(ids, [torch.randn(2, 3, 48, 48)])
    with pytest.raises(ValueError, match=r"\(F, 3, 32, 32\).*got \(3, 32, 32\)"):
        model.encode_images(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="not a token id"):
        model(torch.tensor([[5, 1024]]))

    model.save_pretrained(str(tmp_path / "ok"))
    # a missing part
    import shutil
    shutil.copytree(tmp_path / "ok", tmp_path / "nopart")
    shutil.rmtree(tmp_path / "nopart" / "mm_projector")
    with pytest.raises(lv.InputError, match="mm_projector"):
        LongVILA.from_pretrained(str(tmp_path / "nopart"))
    # a missing tensor: names the HF key and the folder
    shutil.copytree(tmp_path / "ok", tmp_path / "notensor")
    f = tmp_path / "notensor" / "vision_tower" / "model.safetensors"
    sd = load_file(str(f))
    del sd["vision_model.encoder.layers.1.mlp.fc2.weight"]
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"vision_tower/model\.safetensors: checkpoint is missing 1 tensor.*"
                                         r"vision_model\.encoder\.layers\.1\.mlp\.fc2\.weight"):
        LongVILA.from_pretrained(str(tmp_path / "notensor"))
    # a shape mismatch: names the file, the key and both shapes
    shutil.copytree(tmp_path / "ok", tmp_path / "badshape")
    cfg_file = tmp_path / "badshape" / "llm" / "config.json"
    c = json.loads(cfg_file.read_text())
    c["intermediate_size"] = 256
    cfg_file.write_text(json.dumps(c))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.\d\.mlp\.\w+_proj\.weight' "
                                         r"has shape \(\d+, \d+\) but the config expects"):
        LongVILA.from_pretrained(str(tmp_path / "badshape"))


def test_docstring_command_runs(capsys):
    lv.main(["--preset", "tiny", "--new_tokens", "3", "--compare_sdpa"])
    out = capsys.readouterr().out
    assert "preset tiny" in out and "generated 3 tokens" in out
    diff = float(out.split("logits(SDPA)| = ")[1].split()[0])  # 0 on CPU (SDPA both); the flash kernel on a GPU
    assert diff < 1e-4, diff
