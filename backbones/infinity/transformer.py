"""The Infinity bitwise next-scale transformer, written for cstoolkit (CPU and GPU, no flash-attn).

The module tree follows the official release so that ``state_dict()`` keys and shapes are those of
the official checkpoints (e.g. ``infinity_2b_reg.pth``): block ``i`` lives at
``block_chunks.{i // 4}.module.{i % 4}``; ``cfg_uncond`` is the learned null text.

One block (shared AdaLN: six modulation vectors from ``ada_gss + shared_ada_lin(pooled text)``)::

    x += gamma1 * SA(LN(x) * (1 + scale1) + shift1)      # cosine self-attention, 2D RoPE
    x += CA(ca_norm(x), text)                           # cross-attention to the T5 tokens
    x += gamma2 * FFN(LN(x) * (1 + scale2) + shift2)     # GELU(tanh) MLP

Precision: the residual stream, norms, modulation, RoPE and the logits are fp32; the linear layers
and attention of the blocks run in the blocks' dtype (bf16 on GPU), as the official inference does.
Attention uses ``torch.nn.functional.scaled_dot_product_attention`` (flash kernels on GPU where
they apply); variable-length text is handled with boolean padding masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cstoolkit.backbone import AttentionHook

from ..scalewise import (  # noqa: F401 (KVCache re-exported)
    FFN,
    AttentionContext,
    DeviceCache,
    KVCache,
    RMSNorm,
    apply_rope,
    build_module,
    linear,
    linear_fp32,
    run_block,
)
from .schedule import Schedule, rope_positions, scale_of_tokens


@dataclass
class TransformerConfig:
    """Architecture hyper-parameters (defaults: Infinity-2B)."""

    depth: int = 32
    width: int = 2048
    heads: int = 16
    mlp_ratio: float = 4.0
    text_channels: int = 2048
    text_maxlen: int = 512
    codebook_dim: int = 32
    blocks_per_chunk: int = 4
    num_levels: int = 15
    norm_eps: float = 1e-6
    pool_heads: int | None = None  # text pooling heads; None = the official rule
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def pooling_heads(self) -> int:
        if self.pool_heads is not None:
            return self.pool_heads
        return max(1, self.text_channels // (64 if self.width > 4096 else 128))

    @property
    def ffn_hidden(self) -> int:
        return round(self.width * self.mlp_ratio / 256) * 256


PRESETS: dict[str, TransformerConfig] = {
    "infinity-2b": TransformerConfig(),
    "tiny": TransformerConfig(depth=4, width=64, heads=4, text_channels=64, text_maxlen=64, codebook_dim=16,
                              blocks_per_chunk=2),
    # trained on the synthetic world (cstoolkit world train infinity); reads the tiny T5
    "world": TransformerConfig(depth=8, width=256, heads=4, text_channels=64, text_maxlen=64, codebook_dim=16,
                               blocks_per_chunk=4),
}

_MAX_SCALE_MUL = math.log(100.0)


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _layer_norm(x: torch.Tensor, eps: float, norm: nn.LayerNorm | None = None) -> torch.Tensor:
    x = x.float()
    if norm is None:
        return F.layer_norm(x, x.shape[-1:], eps=eps)
    return F.layer_norm(x, x.shape[-1:], norm.weight.float(), norm.bias.float(), eps)


def rope_tables(
    schedule: Schedule, head_dim: int, base: float = 10000.0, reference: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (L, head_dim / 2), of the 2D RoPE of every token of ``schedule``.

    The first half of the rotation frequencies encodes the row, the second half the column; each
    frequency rotates one interleaved pair of channels (0, 1), (2, 3), ...
    """
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    pos = rope_positions(schedule, reference).float()
    angles = torch.cat([pos[:, :1] * inv_freq, pos[:, 1:] * inv_freq], dim=-1)
    return angles.cos().to(device), angles.sin().to(device)


def block_causal_mask(schedule: Schedule, device: torch.device | str | None = None) -> torch.Tensor:
    """(L, L) bool: token i sees token j iff scale(j) <= scale(i) (True = visible)."""
    s = scale_of_tokens(schedule, device)
    return s[None, :] <= s[:, None]


# ---------------------------------------------------------------------------------------------
# modules (names follow the official checkpoint)
# ---------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Cosine self-attention: q, k L2-normalised, q scaled by a learned per-head factor, 2D RoPE."""

    def __init__(self, width: int, heads: int, index: int):
        super().__init__()
        self.heads, self.head_dim, self.index = heads, width // heads, index
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: AttentionContext) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = linear(self.mat_qkv, x, bias).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scale = self.scale_mul_1H11.float().clamp_max(_MAX_SCALE_MUL).exp()
        q = apply_rope(F.normalize(q.float(), dim=-1) * scale, *rope).to(v.dtype)
        k = apply_rope(F.normalize(k.float(), dim=-1), *rope).to(v.dtype)
        out = ctx.attend(self.index, q, k, v)
        return linear(self.proj, out.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Attention from image tokens (or one learned query when ``pool``) to the text tokens."""

    def __init__(self, width: int, kv_dim: int, heads: int, pool: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.pool = heads, width // heads, pool
        if pool:
            self.mat_q = nn.Parameter(torch.zeros(1, heads, width // heads))
        else:
            self.mat_q = nn.Linear(width, width)
        self.mat_kv = nn.Linear(kv_dim, 2 * width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def project_kv(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens (B, T, kv_dim) -> k, v (B, H, T, Dh) in the layer's dtype."""
        b, t, _ = text.shape
        kv = linear(self.mat_kv, text, torch.cat([self.zero_k_bias, self.v_bias]))
        k, v = kv.view(b, t, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(self, x: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b = k.shape[0]
        if self.pool:
            q = self.mat_q.to(k.dtype)[:, :, None, :].expand(b, -1, -1, -1)
        else:
            q = linear(self.mat_q, x).view(b, -1, self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return linear(self.proj, out.transpose(1, 2).reshape(b, q.shape[2], -1))


class TextAttentivePool(nn.Module):
    def __init__(self, text_channels: int, width: int, heads: int):
        super().__init__()
        self.ca = CrossAttention(width, text_channels, heads, pool=True)

    def forward(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        k, v = self.ca.project_kv(text)
        return self.ca(None, k, v, mask).squeeze(1)


@dataclass
class BlockText:
    """Per-block text keys/values for cross-attention (computed once per generation)."""

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor

    def index(self, rows: torch.Tensor) -> "BlockText":
        return BlockText(self.k.index_select(0, rows), self.v.index_select(0, rows), self.mask.index_select(0, rows))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, index: int):
        super().__init__()
        c = cfg.width
        self.eps = cfg.norm_eps
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, c))
        self.sa = SelfAttention(c, cfg.heads, index)
        self.ca = CrossAttention(c, c, cfg.heads)
        self.ca_norm = nn.LayerNorm(c, eps=cfg.norm_eps)
        self.ffn = FFN(c, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, gss: torch.Tensor, text: BlockText, rope: tuple[torch.Tensor, torch.Tensor],
                ctx: AttentionContext) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss.float() + gss).unbind(2)
        h = _layer_norm(x, self.eps) * (1 + scale1) + shift1
        x = x + self.sa(h, rope, ctx).float() * gamma1
        x = x + self.ca(_layer_norm(x, self.eps, self.ca_norm), text.k, text.v, text.mask).float()
        h = _layer_norm(x, self.eps) * (1 + scale2) + shift2
        return x + self.ffn(h).float() * gamma2


class BlockChunk(nn.Module):
    """Official storage of blocks in chunks: ``block_chunks.{c}.module.{j}``."""

    def __init__(self, blocks: list[Block]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, width: int, cond_dim: int, eps: float):
        super().__init__()
        self.width, self.eps = width, eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = linear_fp32(self.ada_lin[1], F.silu(cond.float())).view(-1, 1, 2, self.width).unbind(2)
        return _layer_norm(x, self.eps) * (1 + scale) + shift


@dataclass
class Condition:
    """Text conditioning of a batch: pooled vector (sos and AdaLN input), AdaLN table, CA tokens."""

    pooled: torch.Tensor  # (B, D) fp32
    gss: torch.Tensor  # (B, 1, 6, C) fp32
    tokens: torch.Tensor  # (B, T, D) text_proj_for_ca output
    mask: torch.Tensor  # (B, T) bool

    def index(self, rows: torch.Tensor) -> "Condition":
        return Condition(*(t.index_select(0, rows) for t in (self.pooled, self.gss, self.tokens, self.mask)))


class InfinityTransformer(nn.Module):
    """The Infinity transformer (see the module docstring). Build it with :func:`build_transformer`."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        c, d, ct5 = cfg.width, cfg.width, cfg.text_channels
        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_maxlen, ct5))
        self.text_norm = RMSNorm(ct5, cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(ct5, d, cfg.pooling_heads)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(ct5, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, c))
        self.lvl_embed = nn.Embedding(cfg.num_levels, c)
        self.word_embed = nn.Linear(cfg.codebook_dim, c)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * c))
        if cfg.depth % cfg.blocks_per_chunk:
            raise ValueError(f"depth {cfg.depth} is not a multiple of blocks_per_chunk {cfg.blocks_per_chunk}")
        blocks = [Block(cfg, i) for i in range(cfg.depth)]
        n = cfg.blocks_per_chunk
        self.block_chunks = nn.ModuleList(BlockChunk(blocks[i:i + n]) for i in range(0, cfg.depth, n))
        self.head_nm = AdaLNBeforeHead(c, d, cfg.norm_eps)
        self.head = nn.Linear(c, 2 * cfg.codebook_dim)
        #: checkpoint every block when autograd records (``backbone.gradient_checkpointing``)
        self.gradient_checkpointing = False
        #: with checkpointing, keep the self-attention outputs (selective: the recomputation skips attention)
        self.checkpoint_keep_attention = True
        self._tables = DeviceCache()

    # ------------------------------------------------------------------ structure and precision
    @property
    def blocks(self) -> list[Block]:
        return [b for chunk in self.block_chunks for b in chunk.module]  # type: ignore[union-attr]

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.block_chunks[0].module[0].sa.mat_qkv.weight.dtype  # type: ignore[index,union-attr]

    def set_dtype(self, dtype: torch.dtype) -> "InfinityTransformer":
        """Blocks in ``dtype``; text projections, embeddings, AdaLN tables and head in fp32 (official bf16 mode)."""
        self.float()
        self.block_chunks.to(dtype)
        return self

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> "InfinityTransformer":
        """Random initialisation from ``generator`` (identical for a given seed and device)."""
        std = math.sqrt(1 / self.cfg.width / 3)
        for name, p in self.named_parameters():
            if p.dim() == 1 and (name.endswith(".bias") or name.endswith("_bias")):
                p.zero_()
            elif name.endswith("norm.weight") or name == "text_norm.weight":
                p.fill_(1.0)
            elif name.endswith("scale_mul_1H11"):
                p.fill_(math.log(4.0))
            elif name == "cfg_uncond":
                p.normal_(0, 1.2 / math.sqrt(self.cfg.text_channels), generator=generator).clamp_(-2.4, 2.4)
            elif name.endswith("ada_gss"):
                p.normal_(0, 1 / math.sqrt(self.cfg.width), generator=generator)
            elif p.dim() == 2 and not name.startswith("lvl_embed"):
                p.normal_(0, 1 / math.sqrt(3 * p.shape[1]), generator=generator)
            else:
                p.normal_(0, std, generator=generator)
        for name, buf in self.named_buffers():
            if name.endswith("zero_k_bias"):
                buf.zero_()
        return self

    # ------------------------------------------------------------------ text
    def condition(self, tokens: torch.Tensor, mask: torch.Tensor) -> Condition:
        """T5 features (B, T, text_channels) and mask (B, T) -> :class:`Condition`."""
        mask = mask.bool()
        text = self.text_norm(tokens)
        pooled = self.text_proj_for_sos(text, mask).float()
        ca_tokens = self.text_proj_for_ca(text.to(self.text_proj_for_ca[0].weight.dtype)).float()
        gss = linear_fp32(self.shared_ada_lin[1], F.silu(pooled)).view(-1, 1, 6, self.cfg.width)
        return Condition(pooled, gss, ca_tokens, mask)

    def null_text(self, mask: torch.Tensor) -> torch.Tensor:
        """The learned unconditional text (``cfg_uncond``) shaped like a batch with ``mask``."""
        t = mask.shape[1]
        if t > self.cfg.text_maxlen:
            raise ValueError(f"text of {t} tokens is longer than text_maxlen {self.cfg.text_maxlen}")
        return self.cfg_uncond[:t].float().unsqueeze(0).expand(mask.shape[0], -1, -1)

    def block_text(self, cond: Condition) -> list[BlockText]:
        return [BlockText(*b.ca.project_kv(cond.tokens), cond.mask) for b in self.blocks]

    # ------------------------------------------------------------------ forward
    def sos(self, cond: Condition) -> torch.Tensor:
        """First-scale input (B, 1, C): pooled text + ``pos_start``."""
        return cond.pooled[:, None, :] + self.pos_start.float()

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors (B, L, codebook_dim) -> input tokens (B, L, C) (``word_embed``)."""
        return linear_fp32(self.word_embed, codes)

    def level(self, step: int | torch.Tensor) -> torch.Tensor:
        """Level embedding of a scale index (or of a tensor of them)."""
        return self.lvl_embed.weight[step].float()

    def run_blocks(self, x: torch.Tensor, cond: Condition, texts: list[BlockText],
                   rope: tuple[torch.Tensor, torch.Tensor], ctx: AttentionContext) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        for block, text in zip(self.blocks, texts):
            x = run_block(block, ckpt, x, cond.gss, text, rope, ctx, keep_attention=self.checkpoint_keep_attention)
        return x

    def logits(self, hidden: torch.Tensor, cond: Condition) -> torch.Tensor:
        """fp32 bit logits (B, L, codebook_dim, 2) of the head."""
        out = linear_fp32(self.head, self.head_nm(hidden, cond.pooled))
        return out.unflatten(-1, (self.cfg.codebook_dim, 2))

    def teacher_forcing(self, cond: Condition, inputs: torch.Tensor, schedule: Schedule,
                        hooks: Sequence[AttentionHook] = (), paths: list[str] | None = None,
                        cross: Condition | None = None) -> torch.Tensor:
        """One block-causal pass over all scales; ``inputs`` (B, L - 1, codebook_dim) -> logits (B, L, d, 2).

        ``cross``: the text the cross-attention reads, when not ``cond``'s (sos and AdaLN stay ``cond``'s).
        """
        if tuple(schedule[0]) != (1, 1):
            raise ValueError("the first scale of an Infinity schedule must be 1x1")
        dev = inputs.device
        x = torch.cat([self.sos(cond), self.embed_codes(inputs)], dim=1)
        key = (tuple(tuple(s) for s in schedule), str(dev))  # tables built once per schedule and device
        scales = self._tables.get(("scales",) + key, lambda: scale_of_tokens(schedule, dev))
        x = x + self.level(scales)
        rope = self._tables.get(("rope",) + key,
                                lambda: rope_tables(schedule, self.cfg.head_dim, self.cfg.rope_base, device=dev))
        mask = self._tables.get(("mask",) + key, lambda: block_causal_mask(schedule, dev))
        b = x.shape[0]
        ctx = AttentionContext(step=-1, mask=mask, hooks=hooks,
                               paths=list(paths) if paths is not None else [""] * b, cfg_half=["cond"] * b,
                               token_scales=scales)
        hidden = self.run_blocks(x, cond, self.block_text(cond if cross is None else cross), rope, ctx)
        return self.logits(hidden, cond)


def build_transformer(
    preset: str | TransformerConfig = "infinity-2b",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int | None = 0,
) -> InfinityTransformer:
    """The bare Infinity transformer of ``preset`` (``"infinity-2b"`` or ``"tiny"``, or a config).

    On ``device="meta"`` nothing is allocated (for inspecting keys and shapes). Elsewhere the
    weights are drawn from a generator seeded with ``seed`` on ``device`` (``seed=None`` leaves
    them uninitialised, for loading a checkpoint). ``dtype`` applies to the blocks; the rest stays
    fp32.
    """
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    return build_module(lambda: InfinityTransformer(cfg), device=device, dtype=dtype, seed=seed,
                        uninitialised=_zero_k_bias)


def _zero_k_bias(model: nn.Module) -> None:
    """Zero the ``zero_k_bias`` buffers (not in the official checkpoints)."""
    for name, buf in model.named_buffers():
        if name.endswith("zero_k_bias"):
            buf.zero_()
