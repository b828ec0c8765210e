"""The Switti next-scale transformer, written for cstoolkit (CPU and GPU, no flash-attn, no apex).

The module tree follows the official ``SwittiHF`` (yandex-research/switti, ``models/switti.py``,
``models/basic_switti.py``) so that ``state_dict()`` keys and shapes are those of the released
``model.safetensors``, persistent buffers included (``lvl_1L``, ``attn_bias_for_masking``).

Input of scale 0 (one token): ``text_pooler(pooled bigG) + pos_start + lvl_embed[0]``; of scale
``i > 0``: ``word_embed(area-downsampled f_hat) + lvl_embed[i]``. The pooled vector
``cond = text_pooler(pooled)`` also drives AdaLN. One block (``crop = crop_proj(Fourier(crop coords))``)::

    c = cond + crop_cond_scales * crop
    gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_lin(c)
    x += self_attention_norm2(SA(self_attention_norm1(x) * (1 + scale1) + shift1)) * gamma1
    x += cross_attention_norm2(CA(cross_attention_norm1(x), attention_y_norm(text)))
    x += ffn_norm2(FFN(ffn_norm1(x) * (1 + scale2) + shift2)) * gamma2

SA: q, k LayerNorm (no affine) over the full width, then 2D axial RoPE, SDPA with scale 1/sqrt(Dh).
Switti (``use_ar=False``) lets every scale attend only to itself; Switti-AR is block-causal and
generates with a KV cache. All norms are RMSNorm except the q/k norms and the head's LayerNorm.

Precision: the residual stream, norms, modulation, RoPE and the logits are fp32; the linear layers
and attention of the blocks run in the blocks' dtype (bf16 on GPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cstoolkit.backbone import AttentionHook

from ..scalewise import (
    FFN,
    AttentionContext,
    DeviceCache,
    RMSNorm,
    apply_rope,
    build_module,
    linear,
    linear_fp32,
    run_block,
)

#: official ``RESOLUTION_PATCH_NUMS_MAPPING``: image side -> side of every scale's token grid
PATCH_NUMS: dict[int, tuple[int, ...]] = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}


@dataclass
class TransformerConfig:
    """Architecture of the official ``Switti`` constructor (defaults: ``SwittiHF`` 512, depth 30)."""

    depth: int = 30
    width: int = 1920  # embed_dim (= cond dim D)
    heads: int = 30
    patch_nums: tuple[int, ...] = PATCH_NUMS[512]
    vocab_size: int = 4096  # V
    codebook_dim: int = 32  # Cvae
    context_dim: int = 2048  # CLIP-L (768) + bigG (1280) tokens, concatenated
    pooled_dim: int = 1280  # bigG pooled output
    use_swiglu_ffn: bool = True
    mlp_ratio: float = 4.0  # GELU FFN only (use_swiglu_ffn=False)
    rope: bool = True
    rope_theta: float = 10000.0
    rope_size: float = 128.0
    use_ar: bool = False
    use_crop_cond: bool = True
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def num_tokens(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @classmethod
    def from_official(cls, config: dict) -> "TransformerConfig":
        """The config of a ``SwittiHF`` ``config.json`` (depth, rope*, use_*, reso): width = heads * 64."""
        depth = int(config.get("depth", 30))
        reso = int(config.get("reso", 512))
        if reso not in PATCH_NUMS:
            raise ValueError(f"unknown Switti resolution {reso}; known: {sorted(PATCH_NUMS)}")
        return cls(depth=depth, width=depth * 64, heads=depth, patch_nums=PATCH_NUMS[reso],
                   rope=bool(config.get("rope", True)), rope_theta=float(config.get("rope_theta", 10000)),
                   rope_size=float(config.get("rope_size", 128)),
                   use_swiglu_ffn=bool(config.get("use_swiglu_ffn", True)), use_ar=bool(config.get("use_ar", False)),
                   use_crop_cond=bool(config.get("use_crop_cond", True)))

    def to_official(self) -> dict | None:
        """``SwittiHF`` constructor arguments of this config, or None where SwittiHF cannot express it."""
        reso = next((r for r, pn in PATCH_NUMS.items() if pn == tuple(self.patch_nums)), None)
        official = (self.width == self.depth * 64 and self.heads == self.depth and reso is not None
                    and (self.vocab_size, self.codebook_dim) == (4096, 32)
                    and (self.context_dim, self.pooled_dim) == (2048, 1280)
                    and self.mlp_ratio == 4.0 and self.norm_eps == 1e-6)
        if not official:
            return None
        return dict(depth=self.depth, rope=self.rope, rope_theta=self.rope_theta, rope_size=self.rope_size,
                    use_swiglu_ffn=self.use_swiglu_ffn, use_ar=self.use_ar, use_crop_cond=self.use_crop_cond, reso=reso)


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _pad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero/False-pad ``x`` along ``dim`` to ``length`` (text keys/values/masks of different lengths)."""
    if x.shape[dim] >= length:
        return x
    shape = list(x.shape)
    shape[dim] = length - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def scale_of_tokens(patch_nums: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """(L,) scale index of every token (the official ``lvl_1L``)."""
    return torch.cat([torch.full((pn * pn,), i, dtype=torch.long, device=device) for i, pn in enumerate(patch_nums)])


def attention_mask(patch_nums: Sequence[int], use_ar: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """(L, L) bool, True = visible: block-causal (AR: scale(j) <= scale(i)) or within a scale only."""
    s = scale_of_tokens(patch_nums, device)
    return s[None, :] <= s[:, None] if use_ar else s[None, :] == s[:, None]


def rope_tables(patch_nums: Sequence[int], head_dim: int, theta: float = 10000.0, rope_size: float = 128.0,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (L, head_dim / 2), of Switti's 2D axial RoPE for every token.

    Scale ``pn`` multiplies the frequencies by ``rope_size / (pn - 1)`` (1 for ``pn == 1``), so
    every scale spans the same angle range; channel pairs ``0 .. Dh/4 - 1`` rotate with the column,
    the rest with the row (the official ``compute_axial_cis``).
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))
    angles = []
    for pn in patch_nums:
        t = torch.arange(pn * pn, dtype=torch.float32)
        col, row = t % pn, torch.div(t, pn, rounding_mode="floor")
        f = freqs * (rope_size / (pn - 1 if pn > 1 else 1))
        angles.append(torch.cat([torch.outer(col, f), torch.outer(row, f)], dim=-1))
    a = torch.cat(angles)
    return a.cos().to(device), a.sin().to(device)


def crop_condition(heights: Sequence[int], widths: Sequence[int], base_size: int = 512) -> torch.Tensor:
    """(B, 4) int: original size rescaled so the short side is ``base_size`` and the centre-crop offset
    (official ``get_crop_condition``; generation always uses a 512 x 512 image: [512, 512, 0, 0])."""
    hw = torch.stack([torch.tensor(list(heights), dtype=torch.int), torch.tensor(list(widths), dtype=torch.int)], 1)
    ratio = base_size / hw.min(-1)[0]
    orig = (hw * ratio[:, None]).to(torch.int)
    crop = ((orig - base_size) // 2).clamp(min=0)
    return torch.cat([orig, crop], dim=1)


# ---------------------------------------------------------------------------------------------
# modules (names follow the official checkpoint)
# ---------------------------------------------------------------------------------------------
def _qk_norm(x: torch.Tensor) -> torch.Tensor:
    """The official q_norm / k_norm: LayerNorm over the full width, no affine, eps 1e-6 (fp32)."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=1e-6)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, index: int):
        super().__init__()
        self.heads, self.head_dim, self.index = heads, width // heads, index
        self.to_qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: AttentionContext) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = linear(self.to_qkv, x).view(b, n, 3, c).unbind(2)  # (B, L, C) each
        dtype = v.dtype
        q = apply_rope(_qk_norm(q).view(b, n, self.heads, -1).transpose(1, 2), *rope).to(dtype)  # (B, H, L, Dh)
        k = apply_rope(_qk_norm(k).view(b, n, self.heads, -1).transpose(1, 2), *rope).to(dtype)
        v = v.view(b, n, self.heads, -1).transpose(1, 2)
        out = ctx.attend(self.index, q, k, v)
        return linear(self.proj, out.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    def __init__(self, width: int, context_dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.to_q = nn.Linear(width, width)
        self.to_kv = nn.Linear(context_dim, 2 * width)
        self.proj = nn.Linear(width, width)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised text (B, T, context_dim) -> k, v (B, H, T, Dh) in the layer's dtype."""
        b, t, _ = context.shape
        k, v = linear(self.to_kv, context).view(b, t, 2, -1).unbind(2)
        k = _qk_norm(k).to(v.dtype)
        return (k.view(b, t, self.heads, -1).transpose(1, 2), v.view(b, t, self.heads, -1).transpose(1, 2))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = _qk_norm(linear(self.to_q, x)).to(k.dtype).view(b, n, self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=self.head_dim**-0.5)
        return linear(self.proj, out.transpose(1, 2).reshape(b, n, c))


class SwiGLUFFN(nn.Module):
    def __init__(self, width: int, mult: float = 8 / 3):
        super().__init__()
        hidden = int(width * mult)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)
        self.gate_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.down_proj, F.silu(linear(self.gate_proj, x)) * linear(self.up_proj, x))


@dataclass
class BlockState:
    """What one block reads besides x, computed once per forward/generation: AdaLN table and text k/v."""

    ada: torch.Tensor  # (B, 1, 6, C) fp32
    k: torch.Tensor  # (B, H, T, Dh)
    v: torch.Tensor
    mask: torch.Tensor  # (B, T) bool

    def index(self, rows: torch.Tensor) -> "BlockState":
        return BlockState(*(t.index_select(0, rows) for t in (self.ada, self.k, self.v, self.mask)))


class AdaLNSelfCrossAttn(nn.Module):
    def __init__(self, cfg: TransformerConfig, index: int):
        super().__init__()
        c = cfg.width
        self.width = c
        self.attn = SelfAttention(c, cfg.heads, index)
        self.cross_attn = CrossAttention(c, cfg.context_dim, cfg.heads)
        self.ffn = SwiGLUFFN(c) if cfg.use_swiglu_ffn else FFN(c, round(c * cfg.mlp_ratio))
        for name in ("self_attention_norm1", "self_attention_norm2", "cross_attention_norm1",
                     "cross_attention_norm2", "ffn_norm1", "ffn_norm2"):
            setattr(self, name, RMSNorm(c, cfg.norm_eps))
        self.attention_y_norm = RMSNorm(cfg.context_dim, cfg.norm_eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.use_crop_cond = cfg.use_crop_cond
        if cfg.use_crop_cond:
            self.crop_cond_scales = nn.Parameter(torch.zeros(1, c))

    def state(self, cond: torch.Tensor, crop: torch.Tensor | None, context: torch.Tensor,
              mask: torch.Tensor) -> BlockState:
        """AdaLN table of ``cond`` (+ the crop condition) and the text keys/values of this block."""
        if crop is not None:
            cond = cond + self.crop_cond_scales.float() * crop
        ada = linear_fp32(self.ada_lin[1], F.silu(cond.float())).view(-1, 1, 6, self.width)
        k, v = self.cross_attn.project_kv(self.attention_y_norm(context))
        return BlockState(ada, k, v, mask)

    def forward(self, x: torch.Tensor, st: BlockState, rope: tuple[torch.Tensor, torch.Tensor],
                ctx: AttentionContext) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = st.ada.unbind(2)
        h = self.self_attention_norm1(x) * (1 + scale1) + shift1
        x = x + self.self_attention_norm2(self.attn(h, rope, ctx)) * gamma1
        x = x + self.cross_attention_norm2(self.cross_attn(self.cross_attention_norm1(x), st.k, st.v, st.mask))
        h = self.ffn_norm1(x) * (1 + scale2) + shift2
        return x + self.ffn_norm2(self.ffn(h)) * gamma2


class AdaLNBeforeHead(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.width, self.eps = width, eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = linear_fp32(self.ada_lin[1], F.silu(cond.float())).view(-1, 1, 2, self.width).unbind(2)
        return F.layer_norm(x.float(), x.shape[-1:], eps=self.eps) * (1 + scale) + shift


class FourierCrop(nn.Module):
    """diffusers' ``GaussianFourierProjection(log=False, flip_sin_to_cos=False)``: fixed random weights."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = x.float()[:, None] * self.weight.float()[None, :] * 2 * math.pi
        return torch.cat([proj.sin(), proj.cos()], dim=-1)


@dataclass
class Condition:
    """Text conditioning of a batch: pooled (head AdaLN and first token), crop condition, per-block states."""

    cond: torch.Tensor  # (B, C) fp32: text_pooler(pooled)
    blocks: list[BlockState]

    def index(self, rows: torch.Tensor) -> "Condition":
        return Condition(self.cond.index_select(0, rows), [b.index(rows) for b in self.blocks])


class SwittiTransformer(nn.Module):
    """The Switti transformer (see the module docstring). Build it with :func:`build_transformer`."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.width % cfg.heads or (cfg.rope and cfg.head_dim % 4):
            raise ValueError(f"width {cfg.width} / heads {cfg.heads}: the head dim must be a multiple of 4")
        self.cfg = cfg
        c = cfg.width
        self.word_embed = nn.Linear(cfg.codebook_dim, c)
        self.text_pooler = nn.Linear(cfg.pooled_dim, c)
        self.pos_start = nn.Parameter(torch.zeros(1, cfg.patch_nums[0] ** 2, c))
        if not cfg.rope:
            self.pos_1LC = nn.Parameter(torch.zeros(1, cfg.num_tokens, c))
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), c)
        self.blocks = nn.ModuleList(AdaLNSelfCrossAttn(cfg, i) for i in range(cfg.depth))
        if cfg.use_crop_cond:
            if c % 8:
                raise ValueError(f"width {c} must be a multiple of 8 for the crop condition")
            self.crop_embed = FourierCrop(c // 8)
            self.crop_proj = nn.Linear(c, c)
        self.register_buffer("lvl_1L", torch.zeros(1, cfg.num_tokens, dtype=torch.long))
        self.register_buffer("attn_bias_for_masking", torch.zeros(1, 1, cfg.num_tokens, cfg.num_tokens))
        self.head_nm = AdaLNBeforeHead(c, cfg.norm_eps)
        self.head = nn.Linear(c, cfg.vocab_size)
        #: checkpoint every block when autograd records (``backbone.gradient_checkpointing``)
        self.gradient_checkpointing = False
        #: with checkpointing, keep the self-attention outputs (selective: the recomputation skips attention)
        self.checkpoint_keep_attention = True
        self._tables = DeviceCache()

    # ------------------------------------------------------------------ structure and precision
    @property
    def compute_dtype(self) -> torch.dtype:
        return self.blocks[0].attn.to_qkv.weight.dtype  # type: ignore[union-attr]

    def set_dtype(self, dtype: torch.dtype) -> "SwittiTransformer":
        """Blocks in ``dtype``; embeddings, pooler, crop projection, head and buffers in fp32."""
        self.float()
        self.blocks.to(dtype)
        return self

    @torch.no_grad()
    def reset_buffers(self) -> "SwittiTransformer":
        """Rebuild the persistent buffers from the config (official values: levels; 0 / -inf mask)."""
        cfg = self.cfg
        dev = self.lvl_1L.device
        self.lvl_1L.copy_(scale_of_tokens(cfg.patch_nums, dev)[None])
        visible = attention_mask(cfg.patch_nums, cfg.use_ar, dev)
        bias = torch.zeros(visible.shape, device=dev).masked_fill_(~visible, -math.inf)
        self.attn_bias_for_masking.copy_(bias[None, None])
        return self

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> "SwittiTransformer":
        """Random initialisation from ``generator`` (the official scheme with ``init_std = sqrt(1/3C)``;
        AdaLN gates small but non-zero so that every block acts)."""
        c = self.cfg.width
        std = math.sqrt(1 / c / 3)
        for name, p in self.named_parameters():
            if name.endswith("crop_embed.weight"):
                p.normal_(0, 1, generator=generator)
            elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("y_norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias") or name.endswith("crop_cond_scales"):
                p.zero_()
            else:
                p.normal_(0, std, generator=generator).clamp_(-2 * std, 2 * std)
        for block in self.blocks:
            for lin in (block.attn.proj, block.cross_attn.proj):
                lin.weight.div_(math.sqrt(2 * self.cfg.depth))
            block.ada_lin[1].weight.mul_(0.5)
        self.head.weight.mul_(0.02 / std)
        self.head_nm.ada_lin[1].weight.mul_(0.5)
        return self.reset_buffers()

    # ------------------------------------------------------------------ conditioning
    def condition(self, context: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> Condition:
        """Text tokens (B, T, context_dim), mask (B, T) and pooled (B, pooled_dim) -> :class:`Condition`.

        The rows of ``context``/``mask`` give the cross-attention and those of ``pooled`` AdaLN and the
        first token; they may come from different prompts (a ``cross_text`` of the whole batch)."""
        cond = linear_fp32(self.text_pooler, pooled)
        crop = None
        if self.cfg.use_crop_cond:
            b = cond.shape[0]
            coords = self._tables.get(("crop", b, cond.device),  # (B, 4), as the official sampler
                                      lambda: crop_condition([512] * b, [512] * b).to(cond.device))
            crop = linear_fp32(self.crop_proj, self.crop_embed(coords.view(-1)).reshape(b, -1))
        context = context.float()
        return Condition(cond, [blk.state(cond, crop, context, mask.bool()) for blk in self.blocks])

    def with_text(self, cond: Condition, context: torch.Tensor, mask: torch.Tensor, rows: slice | None = None,
                  ) -> Condition:
        """``cond`` whose cross-attention reads ``context`` (B', T, context_dim) / ``mask`` in batch
        rows ``rows`` (default all); AdaLN and the first token keep the pooled text of ``cond``."""
        rows = rows or slice(0, cond.cond.shape[0])
        blocks = []
        for blk, st in zip(self.blocks, cond.blocks):
            k, v = blk.cross_attn.project_kv(blk.attention_y_norm(context.float()))
            t = max(k.shape[2], st.k.shape[2])
            parts = {"k": st.k, "v": st.v, "mask": st.mask}
            new = {"k": k, "v": v, "mask": mask.bool()}
            merged = {}
            for name, dim in (("k", 2), ("v", 2), ("mask", 1)):
                old, fresh = _pad(parts[name], t, dim), _pad(new[name], t, dim)
                merged[name] = torch.cat([old[: rows.start], fresh.to(old.dtype), old[rows.stop:]])
            blocks.append(BlockState(st.ada, merged["k"], merged["v"], merged["mask"]))
        return Condition(cond.cond, blocks)

    def sos(self, cond: Condition) -> torch.Tensor:
        """First-scale input (B, first_l, C) without the level embedding."""
        return cond.cond[:, None, :] + self.pos_start.float()

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors (B, L, codebook_dim) -> input tokens (B, L, C) (``word_embed``)."""
        return linear_fp32(self.word_embed, codes)

    def level(self, scales: torch.Tensor | int, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Level embedding of scale indices (+ the absolute position embedding of tokens start:stop
        when ``rope`` is off)."""
        out = self.lvl_embed.weight[scales].float()
        if not self.cfg.rope and start is not None:
            out = out + self.pos_1LC[0, start:stop].float()
        return out

    def rope(self, patch_nums: Sequence[int], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RoPE (cos, sin) of every token of ``patch_nums`` (None when ``rope`` is off); built once per
        schedule and device (no host-to-device copy per step)."""
        cfg = self.cfg
        if not cfg.rope:
            return None
        return self._tables.get(("rope", tuple(patch_nums), str(device)), lambda: rope_tables(
            patch_nums, cfg.head_dim, cfg.rope_theta, cfg.rope_size, device=device))

    # ------------------------------------------------------------------ forward
    def run_blocks(self, x: torch.Tensor, cond: Condition, rope: tuple[torch.Tensor, torch.Tensor] | None,
                   ctx: AttentionContext) -> torch.Tensor:
        if rope is None:  # absolute positions: rotate by zero
            zero = torch.zeros(x.shape[1], self.cfg.head_dim // 2, device=x.device)
            rope = (zero + 1, zero)
        ckpt = self.gradient_checkpointing
        for block, st in zip(self.blocks, cond.blocks):
            x = run_block(block, ckpt, x, st, rope, ctx, keep_attention=self.checkpoint_keep_attention)
        return x

    def logits(self, hidden: torch.Tensor, cond: Condition) -> torch.Tensor:
        """fp32 logits (B, L, V) of the head (AdaLN on the pooled text, without the crop condition)."""
        return linear_fp32(self.head, self.head_nm(hidden, cond.cond))

    def teacher_forcing(self, cond: Condition, inputs: torch.Tensor, patch_nums: Sequence[int],
                        hooks: Sequence[AttentionHook] = (), paths: list[str] | None = None) -> torch.Tensor:
        """One pass over all scales of ``patch_nums``: ``inputs`` (B, L - first_l, Cvae) -> logits (B, L, V).

        Block-causal mask for ``use_ar``, attention within each scale otherwise (the official
        ``attn_bias_for_masking``, rebuilt here for the schedule).
        """
        cfg = self.cfg
        if len(patch_nums) > len(cfg.patch_nums) or patch_nums[0] != cfg.patch_nums[0]:
            raise ValueError(f"schedule {list(patch_nums)} does not fit the model's {list(cfg.patch_nums)}")
        n = sum(pn * pn for pn in patch_nums)
        dev = inputs.device
        x = torch.cat([self.sos(cond), self.embed_codes(inputs)], dim=1)  # (B, L, C)
        key = (tuple(patch_nums), str(dev))
        scales = self._tables.get(("scales",) + key, lambda: scale_of_tokens(patch_nums, dev))
        mask = self._tables.get(("mask", cfg.use_ar) + key, lambda: attention_mask(patch_nums, cfg.use_ar, dev))
        x = x + self.level(scales, 0, n)
        b = x.shape[0]
        ctx = AttentionContext(step=-1, mask=mask, hooks=hooks,
                               paths=list(paths) if paths is not None else [""] * b, cfg_half=["cond"] * b,
                               token_scales=scales, scale=cfg.head_dim**-0.5)
        return self.logits(self.run_blocks(x, cond, self.rope(patch_nums, dev), ctx), cond)


def build_transformer(
    preset: str | TransformerConfig = "switti-ar",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int | None = 0,
) -> SwittiTransformer:
    """The bare Switti transformer of a preset name (see :data:`~.presets.PRESETS`) or a config.

    On ``device="meta"`` nothing is allocated (for inspecting keys and shapes). Elsewhere the
    weights are drawn from a generator seeded with ``seed`` on ``device`` (``seed=None`` leaves
    them uninitialised, for loading a checkpoint; the buffers are always built). ``dtype``
    applies to the blocks; the rest stays fp32.
    """
    if isinstance(preset, str):
        from .presets import preset_row

        cfg = preset_row(preset).transformer
    else:
        cfg = preset
    return build_module(lambda: SwittiTransformer(cfg), device=device, dtype=dtype, seed=seed,
                        uninitialised=SwittiTransformer.reset_buffers)
