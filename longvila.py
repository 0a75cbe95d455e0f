"""LongVILA, the model: SigLIP vision tower, mlp_downsample projector, Llama / Qwen2 decoder, generation.

    python longvila.py --preset tiny        # build a preset, forward a random 2-frame video, generate 8 tokens

Follows LongVILA (Xue et al., arXiv 2408.10188) and the public VILA code (NVlabs/VILA): SigLIP (arXiv
2303.15343) features of the second-to-last layer, the mlp_downsample projector (2x2 merge + MLP), Llama 3 (arXiv
2407.21783) or Qwen2 (arXiv 2407.10671) with RoPE (arXiv 2104.09864) and its linear / Llama-3.1 scaling.

A video is F frames: each frame -> SigLIP (P patches) -> projector -> N LLM tokens, which `embed` puts, in order,
into the IMAGE_TOKEN_ID (-200) placeholders of input_ids. The decoder takes an attention function (default: causal
attention on one device; mmsp.py passes its sequence-parallel one).

Shape alphabet (used in comments across the project):
    B batch, T sequence length (tokens), C LLM width, H query heads, Hkv KV heads, D head dim, V vocab,
    F frames, P patches per frame, Cv vision width, N visual tokens per frame (after the projector),
    sp / ring / ulysses / dp: parallel degrees (sp = ring * ulysses, world = dp * sp).

Sections: configs and PRESETS | pure functions | vision tower | projector | decoder | KV cache | LongVILA (splice,
forward, generate) | --- below: checkpoint I/O (the Hugging Face name map, the VILA layout) | MFU peaks | command line.
"""
import argparse
import copy
import functools
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import kernels

IMAGE_TOKEN_ID = -200  # one visual token's placeholder in input_ids (the reference's IMAGE_TOKEN_INDEX)
IGNORE_INDEX = -100  # label of positions that are not supervised


class InputError(ValueError):
    """A flag, file or folder a user gave is not what was expected (the message says what was); CLIs exit with 2."""


# -----------------------------------------------------------------------------
# configs (defaults = the released LongVILA-8B: SigLIP so400m/14-384 + mlp_downsample + Llama-3-8B)

@dataclass
class VisionConfig:
    image_size: int = 384
    patch_size: int = 14
    width: int = 1152  # Cv
    layers: int = 27
    heads: int = 16
    mlp_dim: int = 4304
    eps: float = 1e-6
    select_layer: int = -2  # index into HF's hidden_states (embeddings + one entry per layer): -2 = second-to-last

    def __post_init__(self):
        if self.image_size < self.patch_size:  # 384 / 14 is not whole: the conv drops the last 6 pixels, as SigLIP
            raise ValueError(f"VisionConfig: image_size {self.image_size} is smaller than patch_size "
                             f"{self.patch_size}; raise image_size")
        if self.width % self.heads:
            raise ValueError(f"VisionConfig: width {self.width} must be divisible by heads {self.heads}")
        if not (-self.layers - 1 <= self.select_layer <= self.layers) or self.n_used_layers < 1:
            raise ValueError(f"VisionConfig: select_layer {self.select_layer} must pick one of the {self.layers} "
                             f"layer outputs (1..{self.layers} or -{self.layers}..-1)")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:  # P
        return self.grid ** 2

    @property
    def n_used_layers(self) -> int:
        """Layers that run: HF's hidden_states has layers + 1 entries (0 = embeddings): entry s is after s layers."""
        return self.select_layer if self.select_layer >= 0 else self.layers + 1 + self.select_layer


@dataclass
class ProjectorConfig:
    vision_width: int = 1152  # Cv
    llm_width: int = 4096  # C
    eps: float = 1e-5  # nn.LayerNorm default, as the reference
    # order of a frame's merged tokens (see downsample_2x2): column-major as VILA's LongVILA branch, row-major as VILA
    # main since its NVILA release (commit 36f6adc: a final permute in flat_square)
    token_order: str = "column-major"  # "column-major" | "row-major"

    def __post_init__(self):
        if self.token_order not in ("column-major", "row-major"):
            raise ValueError(f"ProjectorConfig: token_order must be 'column-major' or 'row-major', got "
                             f"{self.token_order!r}")

    def tokens_per_frame(self, grid: int) -> int:
        """N = ceil(grid / 2)^2: odd grids are zero-padded by one row and column before the 2x2 merge."""
        return math.ceil(grid / 2) ** 2


# the RoPE scalings implemented (rope_inv_freq) and the keys each needs in rope_scaling
ROPE_SCALING_KEYS = {"default": (), "linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@dataclass
class LLMConfig:
    vocab_size: int = 128256
    dim: int = 4096  # C
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    ffn_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # as Hugging Face: None, {"rope_type": "linear", "factor": s}, or "llama3"
    qkv_bias: bool = False  # Qwen2: bias on q/k/v projections (not on o)
    tie_embeddings: bool = False
    max_seq_len: int = 8192  # written as max_position_embeddings; informational (RoPE has no table to outgrow)
    model_type: str = "llama"  # "llama" | "qwen2"

    def __post_init__(self):
        if self.model_type not in ("llama", "qwen2"):
            raise ValueError(f"LLMConfig: model_type must be 'llama' or 'qwen2', got {self.model_type!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"LLMConfig: dim {self.dim} must be divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LLMConfig: n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"LLMConfig: head dim {self.dim // self.n_heads} must be even for RoPE; "
                             f"change dim or n_heads")
        if self.qkv_bias and self.model_type == "llama":
            raise ValueError("LLMConfig: qkv_bias=True needs model_type='qwen2' (a Hugging Face Llama with "
                             "attention_bias puts a bias on o_proj too, which this model does not have)")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in ROPE_SCALING_KEYS or any(k not in self.rope_scaling for k in ROPE_SCALING_KEYS[kind]):
            raise ValueError(f"LLMConfig: rope_scaling {self.rope_scaling!r}: expected None or rope_type linear "
                             f"(factor) or llama3 ({', '.join(ROPE_SCALING_KEYS['llama3'])})")

    @property
    def head_dim(self) -> int:  # D
        return self.dim // self.n_heads


@dataclass
class LongVILAConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    chat_template: str = "llama3"  # "llama3" | "chatml"
    fps: float = 0.0  # default frame sampling for data/eval: 0 = uniform num_video_frames
    num_video_frames: int = 8
    image_aspect_ratio: str = "resize"  # "resize" | "pad" (square padding with the processor's mean colour first)

    def __post_init__(self):
        if self.projector.vision_width != self.vision.width:
            raise ValueError(f"LongVILAConfig: projector.vision_width {self.projector.vision_width} must equal "
                             f"vision.width {self.vision.width}")
        if self.projector.llm_width != self.llm.dim:
            raise ValueError(f"LongVILAConfig: projector.llm_width {self.projector.llm_width} must equal "
                             f"llm.dim {self.llm.dim}")
        if self.chat_template not in ("llama3", "chatml"):
            raise ValueError(f"LongVILAConfig: chat_template must be 'llama3' or 'chatml', got {self.chat_template!r}")
        if self.image_aspect_ratio not in ("resize", "pad"):
            raise ValueError(f"LongVILAConfig: image_aspect_ratio must be 'resize' or 'pad', got "
                             f"{self.image_aspect_ratio!r}")

    @property
    def tokens_per_frame(self) -> int:  # N
        return self.projector.tokens_per_frame(self.vision.grid)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LongVILAConfig":
        return cls(vision=VisionConfig(**d["vision"]), projector=ProjectorConfig(**d["projector"]),
                   llm=LLMConfig(**d["llm"]), **{k: v for k, v in d.items() if k not in ("vision", "projector", "llm")})


def _make(vision: VisionConfig, llm: LLMConfig, token_order="column-major", **kw) -> LongVILAConfig:
    return LongVILAConfig(vision=vision, projector=ProjectorConfig(vision.width, llm.dim, token_order=token_order),
                          llm=llm, **kw)


_SIGLIP_384 = VisionConfig()  # so400m/14 at 384 px: 27x27 = 729 patches -> 196 tokens per frame
PRESETS: dict[str, LongVILAConfig] = {
    # CPU tests and the demo: 32 px frames, 4x4 patches -> 4 tokens per frame; seconds for a whole training run.
    "tiny": _make(VisionConfig(image_size=32, patch_size=8, width=64, layers=3, heads=4, mlp_dim=128),
                  LLMConfig(vocab_size=1024, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384,
                            rope_theta=10000.0, max_seq_len=4096, tie_embeddings=False), chat_template="llama3"),
    # GPU benchmarks: the real SigLIP and a Llama-shaped 1.0B decoder (1.5B with its untied 128k-vocab embeddings)
    "bench-1b": _make(_SIGLIP_384, LLMConfig(dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_dim=8192)),
    "longvila-8b": _make(_SIGLIP_384, LLMConfig()),  # paper v1: Llama-3-8B
    # paper v2: Qwen2-7B, released with VILA main
    "longvila-7b": _make(_SIGLIP_384, LLMConfig(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                                                ffn_dim=18944, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True,
                                                max_seq_len=32768, model_type="qwen2"),
                         token_order="row-major", chat_template="chatml"),
    "longvila-1.5b": _make(_SIGLIP_384, LLMConfig(vocab_size=151936, dim=1536, n_layers=28, n_heads=12,
                                                  n_kv_heads=2, ffn_dim=8960, norm_eps=1e-6, rope_theta=1e6,
                                                  qkv_bias=True, tie_embeddings=True, max_seq_len=32768,
                                                  model_type="qwen2"), token_order="row-major", chat_template="chatml"),
}


# -----------------------------------------------------------------------------
# pure functions

def rms_norm(x, weight, eps):
    """RMSNorm (Zhang & Sennrich 2019) in fp32, cast back before the gain, exactly as HF Llama/Qwen2."""
    if kernels.use_fused(x) and x.shape[-1] <= kernels.MAX_NORM_WIDTH:  # CUDA: one Triton kernel (kernels.py)
        return kernels.rms_norm(x, weight, eps)
    xf = x.float()  # (..., C)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., C)
    return weight * xf.to(x.dtype)


def rope_inv_freq(cfg: LLMConfig, device=None):
    """RoPE frequencies (D/2,) fp32: theta^(-2i/D), then the scaling. linear (Chen et al. 2306.15595): all / factor,
    position p rotated as if at p / factor. llama3 (Llama 3.1): wavelengths above original_max / low_freq_factor
    divided by factor, below original_max / high_freq_factor kept, the band between blended."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device=device).float() / D))
    rs = cfg.rope_scaling or {}
    if rs.get("rope_type") == "linear":
        return inv_freq / rs["factor"]
    if rs.get("rope_type") == "llama3":
        factor, lo, hi, n = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], \
            rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq                                       # (D/2,)
        smooth = ((n / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)              # 0: long waves .. 1: short waves
        scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq          # the blend of the middle band
        return torch.where(wavelen > n / lo, inv_freq / factor, torch.where(wavelen < n / hi, inv_freq, scaled))
    return inv_freq


def rope_cos_sin(positions, inv_freq, dtype=torch.float32):
    """TRUE positions (B, T) -> cos, sin (B, T, D/2); angles in fp32 as HF (in bf16, 1M positions err by radians)."""
    angles = positions.float()[..., None] * inv_freq.to(positions.device)  # (B, T, D/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary_emb(x, cos, sin):
    """Rotate each pair (x_i, x_{i+D/2}) of x (B, T, H, D) by its angle (HF's rotate_half layout, not interleaved)."""
    if kernels.use_fused(x):  # CUDA: one Triton kernel (kernels.py)
        return kernels.rotary(x, cos, sin)
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]  # (B, T, H, D/2) each
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, D/2)
    # in x's dtype: under autocast q/k are bf16 while cos/sin stay fp32, and attention wants q, k, v in one dtype
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)  # (B, T, H, D)


def swiglu(gate, up):
    """SwiGLU's gating (Shazeer 2020): silu(gate) * up, gate and up (..., F) -> (..., F)."""
    if kernels.use_fused(gate):  # CUDA: one Triton kernel (kernels.py)
        return kernels.swiglu(gate, up)
    return F.silu(gate) * up


def shift_labels(labels):
    """labels (B, T) -> next-token targets (B, T), last -100. Shift the FULL sequence before any SP sharding."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)


def _ce_chunk(h, weight, targets):
    logits = (h @ weight.t()).float()  # (n, V)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def cross_entropy_sum(x, targets, weight=None, chunk_size=4096):
    """(summed fp32 cross-entropy, count of supervised targets) of already shifted targets. x: logits (..., V), or
    hidden states (..., C) with the head `weight` (V, C): logits then made chunk_size tokens at a time and recomputed
    in backward, so (T, V) fp32 never exists. No supervised token gives (0.0, 0): callers divide by a global count."""
    t = targets.reshape(-1)  # (n,)
    count = (t != IGNORE_INDEX).sum()
    if weight is None:
        logits = x.reshape(-1, x.shape[-1]).float()  # (n, V)
        return F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum"), count
    h = x.reshape(-1, x.shape[-1])  # (n, C)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for s in range(0, h.shape[0], chunk_size):
        hc, tc = h[s:s + chunk_size], t[s:s + chunk_size]  # (n_c, C), (n_c,)
        total = total + checkpointed("full", _ce_chunk, hc, weight, tc)
    return total, count


def attention(q, k, v, layer_idx=None):
    """Causal attention, the default `attn`: q (B, Tq, H, D), k/v (B, Tk, Hkv, D) with RoPE applied -> (B, Tq, H, D).
    Queries are the LAST Tq positions (Tq < Tk with a KV cache): query i sees key j iff Tk - Tq + i >= j. GQA."""
    if q.is_cuda and q.shape[1] == k.shape[1]:
        return kernels.flash_attn_func(q, k, v, causal=True)
    return sdpa_attention(q, k, v, layer_idx)


def sdpa_attention(q, k, v, layer_idx=None):
    """`attention` through torch SDPA on any device (same signature and mask); the CPU path and the reference."""
    Tq, Tk = q.shape[1], k.shape[1]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, D)
    mask = None
    if Tq != Tk and Tq > 1:  # several new tokens against a cache: bottom-right aligned causal mask
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)  # (Tq, Tk)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=(Tq == Tk and Tq > 1),
                                         enable_gqa=True)  # (B, H, Tq, D)
    return out.transpose(1, 2)  # (B, Tq, H, D)


def downsample_2x2(x, token_order="column-major"):
    """The reference's `DownSampleBlock.flat_square` (NVlabs/VILA base_projector.py), same reshapes in the same order:
    (F, g*g, Cv) row-major patches -> (F, ceil(g/2)^2, 4Cv), odd g zero-padded. Token (i, j) concatenates x[2i, 2j],
    x[2i, 2j+1], x[2i+1, 2j], x[2i+1, 2j+1]; tokens column-major (LongVILA branch) or row-major (VILA main, NVILA)."""
    n, p, c = x.shape
    g = math.isqrt(p)
    if g * g != p:
        raise ValueError(f"downsample_2x2: {p} patches per frame do not form a square grid")
    x = x.reshape(n, g, g, c)  # (F, rows, cols, Cv)
    if g % 2:
        x = F.pad(x, (0, 0, 0, 1, 0, 1))  # (F, g+1, g+1, Cv) zero row at the bottom, zero column at the right
        g += 1
    x = x.reshape(n, g, g // 2, 2 * c)  # (F, rows, cols/2, 2Cv): columns 2j, 2j+1 side by side
    x = x.permute(0, 2, 1, 3)  # (F, cols/2, rows, 2Cv)
    x = x.reshape(n, g // 2, g // 2, 4 * c)  # (F, cols/2, rows/2, 4Cv): rows 2i, 2i+1 side by side
    if token_order == "row-major":
        x = x.permute(0, 2, 1, 3)  # (F, rows/2, cols/2, 4Cv)
    return x.reshape(n, (g // 2) ** 2, 4 * c)  # (F, N, 4Cv)


def sample_token(logits, temperature, top_p, generator=None):
    """logits (1, V) fp32 -> next token (1,): greedy at temperature 0, else temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return logits.argmax(-1)  # (1,)
    probs = torch.softmax(logits / temperature, dim=-1)  # (1, V)
    if top_p < 1.0:
        sp, idx = probs.sort(dim=-1, descending=True)  # (1, V)
        drop = sp.cumsum(-1) - sp > top_p  # keep the smallest prefix whose mass reaches top_p (always >= 1 token)
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sp)  # (1, V)
    return torch.multinomial(probs, 1, generator=generator).view(1)  # (1,)


# -----------------------------------------------------------------------------
# activation checkpointing: "full" recomputes a whole block in the backward; "save-attn" keeps the attention outputs
# (one dispatcher op per backend): at long context attention costs most to redo, its output only H*D values per token.
# Non-reentrant checkpointing stops re-running a block once every tensor its backward saved exists again, so a
# block's last product (the MLP's w2) is never recomputed.

def _save_attention(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_SAVED_OPS = kernels.saved_attention_ops()  # every attention backend's forward, and torch's SDPA ops
CHECKPOINT_MODES = ("full", "save-attn")


def checkpointed(mode, fn, *args):
    """fn(*args), its activations recomputed in the backward if mode (of CHECKPOINT_MODES) is set and grad is on."""
    if not mode or not torch.is_grad_enabled():
        return fn(*args)
    if mode == "save-attn":
        return checkpoint(fn, *args, use_reentrant=False,
                          context_fn=lambda: create_selective_checkpoint_contexts(_save_attention))
    return checkpoint(fn, *args, use_reentrant=False)


# -----------------------------------------------------------------------------
# vision tower: SigLIP (no CLS token, learned position embedding, pre-LN blocks, GELU-tanh MLP)

class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(cfg.width, cfg.width) for _ in range(4))

    def forward(self, x):
        Fr, P, Cv = x.shape
        q, k, v = (w(x).view(Fr, P, self.heads, -1).transpose(1, 2)  # (F, heads, P, Cv/heads) each
                   for w in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(q, k, v)  # (F, heads, P, Cv/heads), scale 1/sqrt(head_dim)
        return self.wo(out.transpose(1, 2).reshape(Fr, P, Cv))  # (F, P, Cv)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x):  # (F, P, Cv)
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))  # (F, P, Cv)


class VisionTower(nn.Module):
    """SigLIP ViT: returns the hidden state after `n_used_layers` blocks (HF hidden_states[select_layer]).
    Later blocks and post_norm are loaded and saved but never run: frozen, as DDP/FSDP want a gradient for each."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Embedding(cfg.num_patches, cfg.width)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.layers))
        self.post_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)  # unused for features (as the reference)
        self.grad_checkpointing = False
        self.freeze_unused()

    def unused_parameters(self):
        for blk in self.layers[self.cfg.n_used_layers:]:
            yield from blk.parameters()
        yield from self.post_norm.parameters()

    def freeze_unused(self):
        for p in self.unused_parameters():
            p.requires_grad_(False)

    def forward(self, frames):  # (F, 3, S, S) normalised pixels
        x = self.patch_embed(frames)  # (F, Cv, g, g)
        x = x.flatten(2).transpose(1, 2)  # (F, P, Cv), patches in row-major order
        x = x + self.pos_embed.weight  # (F, P, Cv)
        for blk in self.layers[:self.cfg.n_used_layers]:
            x = checkpointed(self.grad_checkpointing, blk, x)  # (F, P, Cv)
        return x


# -----------------------------------------------------------------------------
# projector: mlp_downsample = 2x2 merge -> LayerNorm(4Cv) -> Linear(4Cv, C) -> GELU -> Linear(C, C)

class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.token_order = cfg.token_order
        self.norm = nn.LayerNorm(4 * cfg.vision_width, eps=cfg.eps)
        self.fc1 = nn.Linear(4 * cfg.vision_width, cfg.llm_width)
        self.fc2 = nn.Linear(cfg.llm_width, cfg.llm_width)

    def forward(self, x):  # (F, P, Cv)
        x = self.norm(downsample_2x2(x, self.token_order))  # (F, N, 4Cv)
        return self.fc2(F.gelu(self.fc1(x)))  # (F, N, C); nn.GELU() of the reference = exact erf GELU


# -----------------------------------------------------------------------------
# decoder: Llama / Qwen2 (RMSNorm, RoPE, GQA, SwiGLU)

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, attn, layer_idx, cache=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, T_cached + T, Hkv, D)
        out = attn(q, k, v, layer_idx)  # (B, T, H, D)
        return self.wo(out.reshape(B, T, self.n_heads * self.head_dim))  # (B, T, C)


class FeedForward(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x):  # (B, T, C)
        return self.w2(swiglu(self.w1(x), self.w3(x)))  # (B, T, F) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, h, cos, sin, attn, layer_idx, cache=None):  # (B, T, C)
        h = h + self.attention(self.attention_norm(h), cos, sin, attn, layer_idx, cache)
        return h + self.feed_forward(self.ffn_norm(h))  # (B, T, C)


class Transformer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.grad_checkpointing = False
        self.checkpoint_layers = None  # None: every block when checkpointing; n: only the first n (memory to spare)
        self.tie()

    def tie(self):
        """Tied head (Qwen2-1.5B): one Parameter for both; re-done after load_state_dict(assign=True) replaces it."""
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, h, positions, attn=None, cache=None):  # see LongVILA.forward_embeds
        attn = attention if attn is None else attn
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.cfg, h.device), dtype=h.dtype)  # (B, T, D/2) each
        n_ckpt = len(self.layers) if self.checkpoint_layers is None else self.checkpoint_layers
        for i, layer in enumerate(self.layers):
            mode = self.grad_checkpointing if cache is None and i < n_ckpt else False
            h = checkpointed(mode, layer, h, cos, sin, attn, i, cache)  # (B, T, C)
        if cache is not None:
            cache.length += h.shape[1]
        return self.norm(h)  # (B, T, C)


# -----------------------------------------------------------------------------
# KV cache

class KVCache:
    """Preallocated keys/values of every layer: (L, B, max_len, Hkv, D). Prefill writes T rows, each decode 1."""

    def __init__(self, n_layers, batch, max_len, n_kv_heads, head_dim, dtype, device):
        self.k = torch.zeros(n_layers, batch, max_len, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0  # tokens stored in every layer (Transformer.forward adds a forward's T at its end)

    def update(self, layer_idx, k, v):
        """Store k/v (B, T, Hkv, D) after the cached ones; return all keys/values so far (B, length + T, Hkv, D)."""
        end = self.length + k.shape[1]
        if end > self.k.shape[2]:
            raise ValueError(f"KVCache: {end} tokens exceed the cache size {self.k.shape[2]}")
        self.k[layer_idx, :, self.length:end] = k
        self.v[layer_idx, :, self.length:end] = v
        return self.k[layer_idx, :, :end], self.v[layer_idx, :, :end]


# -----------------------------------------------------------------------------
# the whole model

class LongVILA(nn.Module):
    def __init__(self, config: LongVILAConfig):
        super().__init__()
        # a private copy (PRESETS stay untouched) shared by the sub-modules: a new config.llm.rope_theta applies at once
        self.config = config = copy.deepcopy(config)
        self.vision = VisionTower(config.vision)
        self.projector = Projector(config.projector)
        self.llm = Transformer(config.llm)
        self.apply(self.init_weights)  # in place: a tied head stays tied

    @staticmethod
    def init_weights(m):
        """Fresh weights (tests, the tiny demo): N(0, 0.02) matrices/embeddings, zero biases, unit norms."""
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)

    # --- multimodal input -------------------------------------------------------------------------------------

    def encode_images(self, frames):
        """frames (F, 3, S, S) normalised (mean 0.5, std 0.5) -> visual tokens (F, N, C)."""
        S = self.config.vision.image_size
        if frames.dim() != 4 or tuple(frames.shape[1:]) != (3, S, S):
            raise ValueError(f"frames must have shape (F, 3, {S}, {S}) for this model (vision image_size {S}), "
                             f"got {tuple(frames.shape)}")
        feats = self.vision(frames.to(self.vision.patch_embed.weight.dtype))  # (F, P, Cv)
        return self.projector(feats)  # (F, N, C)

    def embed(self, input_ids, images=None):
        """input_ids (B, T) with IMAGE_TOKEN_ID slots, images: list (one per row) of (F, 3, S, S) or None -> (B, T, C).
        Row b's slots take the F_b * N visual tokens of images[b] in order; all frames go through the tower at once."""
        B, T = input_ids.shape
        is_img = input_ids == IMAGE_TOKEN_ID  # (B, T)
        n_slots = is_img.sum(1).tolist()  # per row
        V = self.config.llm.vocab_size
        bad = (~is_img) & ((input_ids < 0) | (input_ids >= V))
        if bad.any():
            b, t = bad.nonzero()[0].tolist()
            raise ValueError(f"input_ids[{b}, {t}] = {input_ids[b, t].item()} is not a token id of this model "
                             f"(0..{V - 1}) nor IMAGE_TOKEN_ID {IMAGE_TOKEN_ID}")
        h = self.llm.tok_embeddings(input_ids.masked_fill(is_img, 0))  # (B, T, C)
        images = [None] * B if images is None else images
        if len(images) != B:
            raise ValueError(f"images must be a list with one entry per batch row: {B} rows, got {len(images)}")
        N, S = self.config.tokens_per_frame, self.config.vision.image_size
        for b, x in enumerate(images):
            if x is not None and (x.dim() != 4 or tuple(x.shape[1:]) != (3, S, S)):
                raise ValueError(f"images[{b}] has shape {tuple(x.shape)}; expected (F, 3, {S}, {S}) "
                                 f"(F frames at this model's vision image_size {S}, normalised)")
            n_frames = 0 if x is None else x.shape[0]
            if n_slots[b] != n_frames * N:
                raise ValueError(f"batch row {b}: input_ids hold {n_slots[b]} image placeholders "
                                 f"(IMAGE_TOKEN_ID {IMAGE_TOKEN_ID}) but images give {n_frames * N} visual tokens "
                                 f"({n_frames} frames x {N} tokens per frame)")
        frames = [x for x in images if x is not None and len(x)]
        if not frames:
            return h
        feats = self.encode_images(torch.cat(frames).to(h.device))  # (sum F, N, C)
        # masked_scatter fills the slots in row-major order: row 0's slots take the first frames, and so on
        return h.masked_scatter(is_img[..., None], feats.to(h.dtype).reshape(-1, h.shape[-1]))  # (B, T, C)

    # --- decoder ----------------------------------------------------------------------------------------------

    def forward_embeds(self, h, positions, attn=None, cache=None):
        """h (B, T, C), positions (B, T) long TRUE positions -> final-normed hidden (B, T, C). attn(q, k, v, layer_idx)
        (default `attention`) is where sequence parallelism plugs in, with a shard's h and its true positions."""
        return self.llm(h, positions, attn=attn, cache=cache)

    def forward(self, input_ids, images=None, labels=None, *, return_logits=True, sp_forward=None, chunk_size=4096):
        """-> (logits (B, T, V) | None, mean cross-entropy of the shifted labels, 0.0 if none). sp_forward:
        mmsp.sp_forward with its layout bound, called inside __call__ so FSDP's hooks gather parameters."""
        if sp_forward is not None:
            return sp_forward(self, input_ids, images, labels, return_logits=return_logits)
        B, T = input_ids.shape
        h = self.embed(input_ids, images)  # (B, T, C)
        positions = torch.arange(T, device=h.device).expand(B, T)  # (B, T)
        h = self.forward_embeds(h, positions)  # (B, T, C)
        logits = self.llm.output(h) if return_logits else None  # (B, T, V)
        if labels is None:
            return logits, None
        targets = shift_labels(labels.to(h.device))  # (B, T)
        if logits is not None:
            loss_sum, count = cross_entropy_sum(logits, targets)
        else:
            loss_sum, count = cross_entropy_sum(h, targets, weight=self.llm.output.weight, chunk_size=chunk_size)
        return logits, loss_sum / count.clamp(min=1)

    # --- generation -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, images=None, max_new_tokens=32, temperature=0.0, top_p=1.0, eos_token_id=None,
                 stream=None, generator=None):
        """input_ids (1, T) -> new tokens (1, T_new), eos included if produced: one prefill into a KV cache, then a
        token per step; stream(token_id) sees each. (Sequence-parallel: mmsp.sp_generate.)"""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"generate takes one prompt: input_ids of shape (1, T), got {tuple(input_ids.shape)}")
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        cfg = self.config.llm
        T = input_ids.shape[1]
        h = self.embed(input_ids, images)  # (1, T, C): the prompt, then each new token
        pos = torch.arange(T, device=h.device)[None]  # (1, T)
        cache = KVCache(cfg.n_layers, 1, T + max_new_tokens, cfg.n_kv_heads, cfg.head_dim, h.dtype, h.device)
        out = []
        for _ in range(max_new_tokens):
            logits = self.llm.output(self.forward_embeds(h, pos, cache=cache)[:, -1]).float()  # (1, V)
            tok = sample_token(logits, temperature, top_p, generator)  # (1,)
            out.append(int(tok))
            if stream is not None:
                stream(out[-1])
            if out[-1] in eos:
                break
            h = self.llm.tok_embeddings(tok.view(1, 1))  # (1, 1, C)
            pos = pos[:, -1:] + 1  # (1, 1)
        return torch.tensor([out], dtype=torch.long, device=input_ids.device)  # (1, T_new)

    # --- training helpers -------------------------------------------------------------------------------------

    def set_trainable(self, vision: bool, projector: bool, llm: bool):
        """Curriculum switches (stage 1: projector only; 2: projector + llm; 3/5: all; 4: llm only)."""
        self.vision.requires_grad_(vision)
        self.vision.freeze_unused()  # the blocks after select_layer and post_norm never get gradients
        self.projector.requires_grad_(projector)
        self.llm.requires_grad_(llm)

    def set_grad_checkpointing(self, on=True, llm_layers=None):
        """Recompute each vision/decoder block in backward. on: False, True (= "full") or a mode of CHECKPOINT_MODES;
        llm_layers: None = every decoder block, n = only the first n (spare memory buys back the rest's recompute)."""
        mode = "full" if on is True else (on or False)
        if mode and mode not in CHECKPOINT_MODES:
            raise ValueError(f"grad checkpointing mode must be one of {CHECKPOINT_MODES}, True or False; got {on!r}")
        n = self.config.llm.n_layers
        if llm_layers is not None and not 0 <= llm_layers <= n:
            raise ValueError(f"checkpointed decoder blocks must be between 0 and {n}, got {llm_layers}")
        # the vision tower always recomputes whole blocks: one frame's attention is cheap to redo, costly to keep
        self.vision.grad_checkpointing = mode and "full"
        self.llm.grad_checkpointing = mode
        self.llm.checkpoint_layers = llm_layers

    def param_groups(self, weight_decay: float):
        """AdamW groups: decay on >= 2-D weight matrices only; none on norms, biases, embeddings (token, position)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():  # tied weights are listed once
            if p.requires_grad:
                matrix = p.dim() >= 2 and not name.endswith(("tok_embeddings.weight", "pos_embed.weight"))
                (decay if matrix else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def flops_per_token(self, seq_len: int, causal: bool = False) -> float:
        """Training FLOPs per LLM token for MFU (PaLM/nanoGPT): 6 N + 12 L C T. N: decoder matmul parameters (head
        included, embedding lookup not), 2 FLOPs per multiply-add and a backward twice the forward -> 6 N. QK^T and AV
        are 2 T C each forward per layer, x3 with the backward -> 12 L C T, halved when causal. Vision FLOPs: see
        vision_flops_per_frame."""
        cfg, llm = self.config.llm, self.llm
        n = sum(p.numel() for p in llm.layers.parameters()) + llm.norm.weight.numel() + llm.output.weight.numel()
        attn = 12 * cfg.n_layers * cfg.dim * seq_len
        return 6.0 * n + (attn / 2 if causal else attn)

    def vision_flops_per_frame(self) -> float:
        """Training FLOPs of the vision tower + projector per frame: 6 * P * N_used + 12 * layers_used * Cv * P * P."""
        v = self.config.vision
        n = sum(p.numel() for p in self.vision.layers[:v.n_used_layers].parameters()) + \
            self.vision.patch_embed.weight.numel()
        n_proj = sum(p.numel() for p in self.projector.parameters())
        return 6.0 * v.num_patches * n + 12.0 * v.n_used_layers * v.width * v.num_patches ** 2 + \
            6.0 * self.config.tokens_per_frame * n_proj

    # --- checkpoints ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "LongVILA":
        """Load a VILA-layout folder with Hugging Face names. Built on the meta device, each tensor assigned as read
        (dtype None = as stored): an 8B model never exists twice in memory."""
        config = read_config(path)
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        state = load_checkpoint_tensors(path, expected, config, dtype=dtype, device=device)
        model.load_state_dict(state, strict=True, assign=True)
        model.llm.tie()  # assign=True keeps each Parameter's requires_grad: the unused vision blocks stay frozen
        return model

    def save_pretrained(self, path, tokenizer_json=None, max_shard_bytes=5 * 2 ** 30):
        """The VILA layout with HF names and configs (transformers reads llm/ and vision_tower/), sharded if big."""
        save_checkpoint(self, path, tokenizer_json=tokenizer_json, max_shard_bytes=max_shard_bytes)


# ---------------------------------------------------------------------------------------------------------------
# --- below: checkpoint I/O (the released VILA layout) and the command line. The model is complete above.
# ---------------------------------------------------------------------------------------------------------------
# checkpoint I/O: Hugging Face (VILA layout) names <-> ours

# The ONE name map: "<folder>/<HF module path>" -> our module path; "{i}" is a layer index, weight / bias carried over.
# SigLIP's "vision_model." prefix (transformers 4.x; 5 writes none): both read, the prefixed form written.
HF_TO_OURS = {
    # llm/: LlamaForCausalLM / Qwen2ForCausalLM
    "llm/model.embed_tokens": "llm.tok_embeddings",
    "llm/model.layers.{i}.input_layernorm": "llm.layers.{i}.attention_norm",
    "llm/model.layers.{i}.self_attn.q_proj": "llm.layers.{i}.attention.wq",
    "llm/model.layers.{i}.self_attn.k_proj": "llm.layers.{i}.attention.wk",
    "llm/model.layers.{i}.self_attn.v_proj": "llm.layers.{i}.attention.wv",
    "llm/model.layers.{i}.self_attn.o_proj": "llm.layers.{i}.attention.wo",
    "llm/model.layers.{i}.post_attention_layernorm": "llm.layers.{i}.ffn_norm",
    "llm/model.layers.{i}.mlp.gate_proj": "llm.layers.{i}.feed_forward.w1",
    "llm/model.layers.{i}.mlp.up_proj": "llm.layers.{i}.feed_forward.w3",
    "llm/model.layers.{i}.mlp.down_proj": "llm.layers.{i}.feed_forward.w2",
    "llm/model.norm": "llm.norm",
    "llm/lm_head": "llm.output",
    # vision_tower/: SiglipVisionModel
    "vision_tower/vision_model.embeddings.patch_embedding": "vision.patch_embed",
    "vision_tower/vision_model.embeddings.position_embedding": "vision.pos_embed",
    "vision_tower/vision_model.encoder.layers.{i}.layer_norm1": "vision.layers.{i}.norm1",
    "vision_tower/vision_model.encoder.layers.{i}.self_attn.q_proj": "vision.layers.{i}.attn.wq",
    "vision_tower/vision_model.encoder.layers.{i}.self_attn.k_proj": "vision.layers.{i}.attn.wk",
    "vision_tower/vision_model.encoder.layers.{i}.self_attn.v_proj": "vision.layers.{i}.attn.wv",
    "vision_tower/vision_model.encoder.layers.{i}.self_attn.out_proj": "vision.layers.{i}.attn.wo",
    "vision_tower/vision_model.encoder.layers.{i}.layer_norm2": "vision.layers.{i}.norm2",
    "vision_tower/vision_model.encoder.layers.{i}.mlp.fc1": "vision.layers.{i}.fc1",
    "vision_tower/vision_model.encoder.layers.{i}.mlp.fc2": "vision.layers.{i}.fc2",
    "vision_tower/vision_model.post_layernorm": "vision.post_norm",
    # mm_projector/: nn.Sequential(DownSampleBlock, LayerNorm, Linear, GELU, Linear)
    "mm_projector/layers.1": "projector.norm",
    "mm_projector/layers.2": "projector.fc1",
    "mm_projector/layers.4": "projector.fc2",
}
# keys in released files that this model does not use (SigLIP's attention-pooling head; old rotary buffers)
_IGNORED_HF = [re.compile(r"^(vision_model\.)?head\."), re.compile(r"rotary_emb\.inv_freq$")]
_PARTS = ("llm", "vision_tower", "mm_projector")


def _template_regex(template):
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + r"\.(\w+)$")


_FWD = [(_template_regex(k), v) for k, v in HF_TO_OURS.items()]
_BWD = [(_template_regex(v), k) for k, v in HF_TO_OURS.items()]


def _rename(name, table):
    for rx, target in table:
        m = rx.match(name)
        if m:
            *idx, param = m.groups()
            return (target.replace("{i}", idx[0]) if idx else target) + "." + param
    return None


def hf_to_ours(part, key):
    """("llm", "model.layers.3.mlp.up_proj.weight") -> "llm.layers.3.feed_forward.w3.weight" (None if unknown)."""
    if part == "vision_tower" and not key.startswith("vision_model."):
        key = "vision_model." + key  # transformers 5 layout
    return _rename(f"{part}/{key}", _FWD)


def ours_to_hf(name):
    """"llm.layers.3.feed_forward.w3.weight" -> ("llm", "model.layers.3.mlp.up_proj.weight")."""
    full = _rename(name, _BWD)
    if full is None:
        raise KeyError(f"no Hugging Face name for parameter {name}")
    return tuple(full.split("/", 1))


def _read_json(path):
    if not os.path.isfile(path):
        raise InputError(f"checkpoint is missing {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e


def _refuse(file, field, value, why):
    raise InputError(f"{file}: {field} = {value!r} is not supported ({why})")


def _supported(c, file, field, allowed, why):
    """Refuse config c (read from file) if it sets `field` to a value outside `allowed` (absent = a default allowed)."""
    if field in c and c[field] not in allowed:
        _refuse(file, field, c[field], why)


def _llm_from_hf(c, file):
    mt = c.get("model_type")
    if mt not in ("llama", "qwen2"):
        _refuse(file, "model_type", mt, "expected llama or qwen2")
    if mt == "llama" and (c.get("attention_bias") or c.get("mlp_bias")):
        _refuse(file, "attention_bias/mlp_bias", True, "this Llama has no biases")
    _supported(c, file, "hidden_act", ("silu",), "expected silu")
    _supported(c, file, "head_dim", (None, c["hidden_size"] // c["num_attention_heads"]),
               "must equal hidden_size / num_attention_heads")
    _supported(c, file, "use_sliding_window", (False, None), "full attention only")
    rp = c.get("rope_parameters") or {}  # transformers 5 folds theta and scaling into one dict
    theta = c.get("rope_theta", rp.get("rope_theta", 10000.0))
    rs = dict(c.get("rope_scaling") or rp)
    kind = rs.pop("rope_type", rs.pop("type", "default"))
    if kind not in ROPE_SCALING_KEYS:
        _refuse(file, "rope_scaling type", kind, "default, linear or llama3")
    keep = ROPE_SCALING_KEYS[kind]
    return LLMConfig(vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
                     n_heads=c["num_attention_heads"],
                     n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                     ffn_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                     rope_scaling=dict(rope_type=kind, **{k: rs[k] for k in keep}) if keep else None,
                     qkv_bias=(mt == "qwen2"), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                     max_seq_len=c.get("max_position_embeddings", 8192), model_type=mt)


def _llm_to_hf(cfg: LLMConfig, dtype) -> dict:
    c = {"architectures": ["Qwen2ForCausalLM" if cfg.model_type == "qwen2" else "LlamaForCausalLM"],
         "model_type": cfg.model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
         "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
         "num_key_value_heads": cfg.n_kv_heads, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
         "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
         "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": str(dtype).replace("torch.", "")}
    if cfg.model_type == "llama":
        c.update(attention_bias=False, mlp_bias=False, head_dim=cfg.head_dim)
    else:
        c.update(use_sliding_window=False)
    return c


def _vision_from_hf(c, file, select_layer):
    _supported(c, file, "model_type", ("siglip_vision_model", "siglip"), "the vision tower must be SigLIP")
    _supported(c, file, "hidden_act", ("gelu_pytorch_tanh",), "expected gelu_pytorch_tanh")
    _supported(c, file, "num_channels", (3,), "expected 3")
    return VisionConfig(image_size=c["image_size"], patch_size=c["patch_size"], width=c["hidden_size"],
                        layers=c["num_hidden_layers"], heads=c["num_attention_heads"], mlp_dim=c["intermediate_size"],
                        eps=c.get("layer_norm_eps", 1e-6), select_layer=select_layer)


def _vision_to_hf(cfg: VisionConfig, dtype) -> dict:
    return {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model", "hidden_size": cfg.width,
            "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads, "intermediate_size": cfg.mlp_dim, "layer_norm_eps": cfg.eps,
            "hidden_act": "gelu_pytorch_tanh", "num_channels": 3, "attention_dropout": 0.0,
            "vision_use_head": False, "torch_dtype": str(dtype).replace("torch.", "")}


# a config.json's chat_template -> the template data.py builds (None: not given)
CHAT_TEMPLATES = {None: None, "llama3": "llama3", "llama_3": "llama3", "chatml": "chatml", "qwen2": "chatml"}


def _check_top_config(top, file):
    """Refuse config.json fields set to what the reference can do and this model cannot (unlisted fields: learning
    rates, tuning flags, paths, do not change inference); returns (chat template or None, token order)."""
    for name in ("s2", "dynamic_s2", "mm_use_im_start_end", "mm_use_im_patch_token"):
        _supported(top, file, name, (False, None),
                   "multi-scale S2 features and image start/end tokens are not implemented")
    _supported(top, file, "image_aspect_ratio", ("resize", "pad", None), "resize or pad")
    _supported(top, file, "mm_vision_select_feature", ("cls_patch", "patch"), "SigLIP has no CLS: all patches")
    _supported(top, file, "vision_resolution", (-1, None), "the tower's own resolution only")
    _supported(top, file, "mm_patch_merge_type", ("flat", None), "flat only")
    for name, basic in (("image_encoder", "BasicImageEncoder"), ("video_encoder", "BasicVideoEncoder")):
        target = top[name].get("_target_", basic) if isinstance(top.get(name), dict) else top.get(name)
        if target is not None and not str(target).endswith(basic):
            _refuse(file, name, target, f"only VILA's {basic} (frame by frame) is implemented")
    _supported(top, file, "chat_template", CHAT_TEMPLATES, "llama3 (llama_3) or chatml (qwen2)")
    order = (top.get("longvila") or {}).get("projector", {}).get("token_order")
    return CHAT_TEMPLATES[top.get("chat_template")], order


def read_config(path) -> LongVILAConfig:
    """LongVILAConfig of a VILA folder: the sub-folders' HF configs are the truth, config.json adds the rest. Token
    order, unless ours is recorded: mlp_downsample with Llama (the LongVILA branch) column-major, else row-major."""
    if not os.path.isdir(path):
        raise InputError(f"checkpoint folder {path} does not exist")
    for part in _PARTS:
        if not os.path.isdir(os.path.join(path, part)):
            raise InputError(f"checkpoint {path} is missing the {part}/ folder (VILA layout: config.json, llm/, "
                             f"vision_tower/, mm_projector/)")
    top_file = os.path.join(path, "config.json")
    file = {part: os.path.join(path, part, "config.json") for part in _PARTS}
    top = _read_json(top_file)
    template, order = _check_top_config(top, top_file)
    llm = _llm_from_hf(_read_json(file["llm"]), file["llm"])
    vision = _vision_from_hf(_read_json(file["vision_tower"]), file["vision_tower"],
                             top.get("mm_vision_select_layer", -2))
    kind = _read_json(file["mm_projector"]).get("mm_projector_type")
    if kind not in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        _refuse(file["mm_projector"], "mm_projector_type", kind, "mlp_downsample or mlp_downsample_2x2_fix")
    if order is None:
        order = "column-major" if kind == "mlp_downsample" and llm.model_type == "llama" else "row-major"
    try:
        return LongVILAConfig(vision=vision, projector=ProjectorConfig(vision.width, llm.dim, token_order=order),
                              llm=llm, chat_template=template or ("chatml" if llm.model_type == "qwen2" else "llama3"),
                              fps=float(top.get("fps") or 0.0), num_video_frames=int(top.get("num_video_frames") or 8),
                              image_aspect_ratio=top.get("image_aspect_ratio") or "resize")
    except ValueError as e:
        raise InputError(f"{path}: {e}") from e


def _weight_files(folder):
    """{hf_key: file} of a HF weights folder: model.safetensors or pytorch_model.bin, one file or shards + index."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        index = os.path.join(folder, name + ".index.json")
        if os.path.isfile(index):
            weight_map = _read_json(index)["weight_map"]
            for f in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(folder, f)):
                    raise InputError(f"{index} lists shard {f}, which is missing from {folder}")
            return {k: os.path.join(folder, f) for k, f in weight_map.items()}
        single = os.path.join(folder, name)
        if os.path.isfile(single):
            return {k: single for k in _open_weights(single).keys()}
    raise InputError(f"{folder} has no weights (model.safetensors, sharded safetensors with an index, or "
                     f"pytorch_model.bin)")


@functools.lru_cache(maxsize=8)
def _open_weights(file):
    """{key: tensor} of one weights file, memory-mapped: a tensor's bytes are read when it is used."""
    try:
        if file.endswith(".bin"):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return load_file(file)
    except Exception as e:  # noqa: BLE001 - any reader error of a user's file: name the file, say what it is
        raise InputError(f"{file}: cannot read the weights ({type(e).__name__}: {e}); a truncated or corrupt "
                         f"download?") from e


def load_checkpoint_tensors(path, expected: dict, config: LongVILAConfig, dtype=None, device=None) -> dict:
    """Every tensor of a VILA folder under our names, moved to dtype (floating ones) and device as it is read. Names
    and shapes are checked against `expected` first, from the files' headers: a bad 8B folder fails in a second."""
    where = {}  # our name -> (file, hf key)
    for part in _PARTS:
        for key, file in _weight_files(os.path.join(path, part)).items():
            ours = hf_to_ours(part, key)
            if ours is None:
                if any(rx.search(key) for rx in _IGNORED_HF):
                    continue
                raise InputError(f"{file}: tensor '{key}' has no place in this model (unknown name)")
            if ours not in expected:
                raise InputError(f"{file}: tensor '{key}' ({ours}) does not exist in a model with this config "
                                 f"(e.g. a layer index beyond the config's layer count)")
            where[ours] = (file, key)
    if config.llm.tie_embeddings:
        where.pop("llm.output.weight", None)  # tied: the head IS the token embedding (a stored copy is ignored)
    missing = [k for k in expected if k not in where and not (k == "llm.output.weight" and config.llm.tie_embeddings)]
    if missing:
        part, key = ours_to_hf(missing[0])
        files = sorted({f for f, _ in where.values() if os.path.dirname(f) == os.path.join(path, part)})
        raise InputError(f"{', '.join(files) or os.path.join(path, part)}: checkpoint is missing {len(missing)} "
                         f"tensor(s), e.g. '{key}' (our {missing[0]}, shape {tuple(expected[missing[0]])})")
    for ours, (file, key) in where.items():
        shape = tuple(_open_weights(file)[key].shape)
        if shape != tuple(expected[ours]):
            raise InputError(f"{file}: tensor '{key}' has shape {shape} but the config expects "
                             f"{tuple(expected[ours])} (for {ours})")
    tensors = {}
    for ours, (file, key) in where.items():
        t = _open_weights(file)[key]
        tensors[ours] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
    _open_weights.cache_clear()
    if config.llm.tie_embeddings:
        tensors["llm.output.weight"] = tensors["llm.tok_embeddings.weight"]
    return tensors


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _write_weights(folder, tensors: dict, max_shard_bytes):
    """safetensors file(s) in `folder`; sharded as model-0000k-of-0000n.safetensors + index when too big."""
    shards, size = [{}], 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)] if n > 1 else ["model.safetensors"]
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        _write_json(os.path.join(folder, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})


def save_checkpoint(model: LongVILA, path, tokenizer_json=None, max_shard_bytes=5 * 2 ** 30):
    cfg = model.config
    parts = {p: {} for p in _PARTS}
    for name, t in model.state_dict().items():
        if name == "llm.output.weight" and cfg.llm.tie_embeddings:
            continue  # HF ties lm_head to embed_tokens from tie_word_embeddings
        part, key = ours_to_hf(name)
        parts[part][key] = t.detach().to("cpu").contiguous()
    dtype = model.llm.tok_embeddings.weight.dtype
    llm_cfg, vis_cfg = _llm_to_hf(cfg.llm, dtype), _vision_to_hf(cfg.vision, dtype)
    kind = "mlp_downsample" if cfg.projector.token_order == "column-major" else "mlp_downsample_2x2_fix"
    proj_cfg = {"architectures": ["MultimodalProjector"], "model_type": "v2l_projector", "mm_projector_type": kind}
    for part, part_cfg in zip(_PARTS, (llm_cfg, vis_cfg, proj_cfg)):
        os.makedirs(os.path.join(path, part), exist_ok=True)
        _write_weights(os.path.join(path, part), parts[part], max_shard_bytes)
        _write_json(os.path.join(path, part, "config.json"), part_cfg)
    S = cfg.vision.image_size
    _write_json(os.path.join(path, "vision_tower", "preprocessor_config.json"), {
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": S, "width": S},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, os.path.join(path, "llm", "tokenizer.json"))
    _write_json(os.path.join(path, "config.json"), {
        "architectures": ["LlavaLlamaModel"], "model_type": "llava_llama",
        "llm_cfg": dict(llm_cfg, _name_or_path="./llm"),
        "vision_tower_cfg": dict(vis_cfg, _name_or_path="./vision_tower"),
        "mm_projector_cfg": dict(proj_cfg, _name_or_path="./mm_projector"), "mm_projector": kind,
        "hidden_size": cfg.llm.dim, "mm_hidden_size": cfg.vision.width,
        "mm_vision_select_layer": cfg.vision.select_layer, "mm_vision_select_feature": "cls_patch",
        "image_aspect_ratio": cfg.image_aspect_ratio, "fps": cfg.fps, "num_video_frames": cfg.num_video_frames,
        "chat_template": cfg.chat_template, "tokens_per_frame": cfg.tokens_per_frame,
        "model_dtype": str(dtype), "longvila": cfg.to_dict()})


# -----------------------------------------------------------------------------
# MFU's peak: dense bf16 TFLOP/s by device name (vendors' datasheets), the more specific names first
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "H800": 989.4,
                    "GH200": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1}


def peak_bf16_tflops(device) -> float | None:
    """The dense bf16 peak of one accelerator from its name, or None (no MFU) on CPU and unknown devices."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


# -----------------------------------------------------------------------------
# command line: build a preset, run a forward on a random video, generate a few tokens

def main(argv=None):
    ap = argparse.ArgumentParser(description="Build a preset, forward+backward a random video, generate a few tokens.")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size")
    ap.add_argument("--frames", type=int, default=2, help="frames of the random video")
    ap.add_argument("--new_tokens", type=int, default=8, help="tokens to generate")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare_sdpa", action="store_true", help="also print the largest logit difference to SDPA")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = PRESETS[args.preset]
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, args.dtype))  # built straight in the target dtype: 8B never in fp32
    with torch.device(args.device):
        model = LongVILA(cfg)
    torch.set_default_dtype(default_dtype)
    n = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}  # vision, projector, llm
    print(f"preset {args.preset}: vision {n['vision'] / 1e6:.2f}M (runs {cfg.vision.n_used_layers} of "
          f"{cfg.vision.layers} layers), projector {n['projector'] / 1e6:.2f}M, "
          f"llm {n['llm'] / 1e6:.2f}M, total {sum(n.values()) / 1e6:.2f}M parameters")
    N, S = cfg.tokens_per_frame, cfg.vision.image_size
    ids = [1, 5, 6] + ([IMAGE_TOKEN_ID] * N + [13]) * args.frames + [7, 8, 9]  # 13 stands for "\n" here
    input_ids = torch.tensor([ids], device=args.device)  # (1, T)
    video = torch.randn(args.frames, 3, S, S, device=args.device)  # (F, 3, S, S)
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN_ID, IGNORE_INDEX)  # (1, T)
    t0 = time.time()
    logits, loss = model(input_ids, [video], labels)
    loss.backward()
    print(f"forward+backward: T={input_ids.shape[1]} tokens ({args.frames} frames x {N} visual tokens), "
          f"logits {tuple(logits.shape)}, loss {loss.item():.4f} (ln V = {math.log(cfg.llm.vocab_size):.4f}), "
          f"{time.time() - t0:.3f}s; {model.flops_per_token(input_ids.shape[1]) / 1e9:.3f} GFLOP/token")
    if args.compare_sdpa:
        with torch.no_grad():
            h = model.embed(input_ids, [video])  # (1, T, C)
            pos = torch.arange(h.shape[1], device=h.device)[None]  # (1, T)
            a = model.llm.output(model.forward_embeds(h, pos)).float()  # default attention (kernels.py on CUDA)
            b = model.llm.output(model.forward_embeds(h, pos, attn=sdpa_attention)).float()  # torch SDPA
        print(f"max |logits(default attention) - logits(SDPA)| = {(a - b).abs().max().item():.3e} "
              f"(logit scale {b.abs().max().item():.2f}, {args.dtype})")
    t0 = time.time()
    new = model.generate(input_ids, [video], max_new_tokens=args.new_tokens)
    print(f"generated {new.shape[1]} tokens in {time.time() - t0:.3f}s: {new[0].tolist()}")


if __name__ == "__main__":
    main()
