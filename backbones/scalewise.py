"""Pieces shared by the scale-wise backbones (Infinity, Switti): KV cache, attention with hooks, RoPE.

* :class:`KVCache`: preallocated post-RoPE keys/values of every block, filled scale by scale.
* :class:`AttentionContext`: how the self-attention layers of one forward pass attend (cached
  generation, block-causal teacher forcing or attention within the current scale only) and where
  the :class:`~cstoolkit.backbone.AttentionHook` s of the interface are called.
* :func:`apply_rope`: rotation of interleaved channel pairs by precomputed angles.
* :class:`GenerationOutput`, :func:`per_scale`: what a sampling loop returns, per-scale options.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cstoolkit.backbone import AttentionCall, AttentionHook
from cstoolkit.errors import UserError


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved channel pairs of ``x`` (..., L, D) by the angles of (cos, sin) (L, D/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


class KVCache:
    """Preallocated keys and values of every block, (B, H, L_max, Dh) each, filled scale by scale."""

    def __init__(self, depth: int, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.length = 0

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only batch ``rows`` (a dropped row frees its share of the cache).

        Only the filled part is copied, block by block, so the old and new caches coexist for one
        block at a time.
        """
        n = self.length
        for cache in (self.k, self.v):
            for i, t in enumerate(cache):
                new = t.new_empty((rows.numel(), *t.shape[1:]))
                new[:, :, :n] = t[:, :, :n].index_select(0, rows)
                cache[i] = new
                del t


@dataclass
class AttentionContext:
    """How the self-attention layers of one forward pass attend.

    Generation with a cache (``cache`` set): the step's k, v are written to the cache after RoPE
    and the queries attend to everything cached so far. Teacher forcing (``mask`` set): one pass
    over all scales with a (Lq, Lk) mask. Neither: the queries attend to this call's keys only (a
    non-autoregressive scale). ``hooks`` see every call (after RoPE and the cache write) and may
    replace q, k, v for this call or append extra keys/values, which are never cached.
    ``scale`` is the SDPA scale (1 for Infinity's pre-scaled cosine attention, 1/sqrt(Dh) for Switti).
    """

    step: int = -1
    cache: KVCache | None = None
    mask: torch.Tensor | None = None  # (Lq, Lk) bool, True = visible
    hooks: Sequence[AttentionHook] = ()
    paths: list[str] = field(default_factory=list)
    cfg_half: list[str] = field(default_factory=list)
    token_scales: torch.Tensor | None = None
    scale: float = 1.0

    def attend(self, block: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            start, stop = self.cache.length, self.cache.length + k.shape[2]
            self.cache.k[block][:, :, start:stop] = k
            self.cache.v[block][:, :, start:stop] = v
            k, v = self.cache.k[block][:, :, :stop], self.cache.v[block][:, :, :stop]
        mask = self.mask
        if self.hooks:
            call_q, call_k, call_v = q, k, v
            extra_k: list[torch.Tensor] = []
            extra_v: list[torch.Tensor] = []
            extra_m: list[torch.Tensor] = []
            for hook in self.hooks:
                edit = hook(AttentionCall(step=self.step, block=block, q=call_q, k=call_k, v=call_v,
                                          paths=self.paths, cfg_half=self.cfg_half, token_scales=self.token_scales))
                if edit is None:
                    continue
                call_q = call_q if edit.q is None else edit.q.to(q.dtype)
                call_k = call_k if edit.k is None else edit.k.to(k.dtype)
                call_v = call_v if edit.v is None else edit.v.to(v.dtype)
                if edit.extra_k is not None:
                    if edit.extra_v is None or edit.extra_v.shape[2] != edit.extra_k.shape[2]:
                        raise ValueError("an attention hook appended extra_k without matching extra_v")
                    extra_k.append(edit.extra_k.to(k.dtype))
                    extra_v.append(edit.extra_v.to(v.dtype))
                    em = edit.extra_mask
                    if em is None:
                        em = torch.ones(q.shape[0], 1, edit.extra_k.shape[2], dtype=torch.bool, device=q.device)
                    elif em.dim() == 2:
                        em = em[:, None, :]
                    extra_m.append(em.to(device=q.device, dtype=torch.bool).expand(q.shape[0], q.shape[2], -1))
            q, k, v = call_q, call_k, call_v
            if extra_k:
                lk = k.shape[2]
                base = (torch.ones(q.shape[2], lk, dtype=torch.bool, device=q.device) if mask is None else mask)
                mask = torch.cat([base.expand(q.shape[0], -1, -1)] + extra_m, dim=-1)[:, None]
                k = torch.cat([k] + extra_k, dim=2)
                v = torch.cat([v] + extra_v, dim=2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)


@dataclass
class GenerationOutput:
    """Accumulated codes of the rows still in the batch after generation."""

    codes: torch.Tensor  # (B_alive, d, H, W) fp32
    rows: list[int]  # original row index of each code map
    paths: list[str]  # path of every original row
    labels: list[torch.Tensor]  # per step: labels of the rows alive at that step


def per_scale(value: float | Sequence[float], n: int, where: str) -> list[float]:
    """One number per scale from a number or a list (at least ``n`` long)."""
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) < n:
        raise UserError(where, f"{len(values)} values for {n} scales", f"expected one number or {n}")
    return values
