"""Bitwise multi-scale quantisation (BSQ) of Infinity's VAE features, without learned weights.

A feature vector (d channels) is L2-normalised and each channel becomes one bit: the code is
``sign(z) / sqrt(d)`` (bit 1 = positive). An image is described coarse to fine: at scale ``i`` the
residual ``features - accumulated`` is area-downsampled to (h_i, w_i) and quantised; the codes are
upsampled (bilinear, i.e. the official trilinear with one frame) to the final grid and accumulated.
The transformer's input for scale ``i + 1`` is the accumulated map resized to (h_{i+1}, w_{i+1}).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .schedule import Schedule


class BSQ(nn.Module):
    """Holds the official ``quantizer.lfq.mask`` buffer (bit weights, MSB first); no learned weights."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("mask", 2 ** torch.arange(dim - 1, -1, -1))


class MultiScaleBSQ(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.lfq = BSQ(dim)


def quantize(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (B, d, h, w) -> codes (B, d, h, w) in {±1/sqrt(d)} and bits (B, h*w, d) (long)."""
    z = F.normalize(z.float(), dim=1)
    bits = (z > 0).long()
    codes = (bits.float() * 2 - 1) / z.shape[1] ** 0.5
    return codes, bits.flatten(2).transpose(1, 2)


def bits_to_codes(bits: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bits (B, h*w, d) -> codes (B, d, h, w)."""
    d = bits.shape[-1]
    codes = (bits.float() * 2 - 1) / d**0.5
    return codes.transpose(1, 2).reshape(bits.shape[0], d, h, w)


def resize_up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (the official ``trilinear`` on one frame); identity when the size matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resize_area(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="area")


def multiscale_targets(features: torch.Tensor, schedule: Schedule, *, self_correction: float = 0.0,
                       generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-scale bit targets and teacher-forcing inputs of VAE ``features`` (B, d, H, W).

    Returns ``(bits, inputs)``: ``bits[i]`` (B, h_i*w_i, d) long; ``inputs`` (B, L - 1, d) fp32,
    the accumulated codes resized to scales 1 ... S-1 (what generation feeds the transformer).

    ``self_correction`` (training only; Infinity's Bitwise Self-Correction, official strength 0.3): at
    every scale a share of the bits drawn uniformly from {0, 0.01, ..., self_correction} is flipped
    before the codes are accumulated, as a sampling error would be; the targets of the later scales
    are the residuals against that corrupted history, so the model learns to correct its own errors.
    The targets of a scale are always its true bits.
    """
    features = features.float()
    final = tuple(features.shape[-2:])
    acc = torch.zeros_like(features)
    all_bits, inputs = [], []
    steps = round(100 * self_correction)
    for si, (h, w) in enumerate(schedule):
        codes, bits = quantize(resize_area(features - acc, (h, w)))
        all_bits.append(bits)
        if steps > 0:  # flip a random share of the bits, re-quantise
            share = torch.randint(0, steps + 1, (), generator=generator).item() / 100
            flip = torch.rand(bits.shape, generator=generator).to(bits.device) < share
            codes = bits_to_codes(torch.where(flip, 1 - bits, bits), h, w)
        acc = acc + resize_up(codes, final)
        if si + 1 < len(schedule):
            inputs.append(resize_up(acc, schedule[si + 1]).flatten(2).transpose(1, 2))
    return all_bits, torch.cat(inputs, dim=1)


def accumulate(bits: list[torch.Tensor], schedule: Schedule, final: tuple[int, int] | None = None) -> torch.Tensor:
    """Sum of the upsampled codes of per-scale bits -> (B, d, H, W) (what the decoder reads)."""
    final = final or tuple(schedule[-1])
    acc = 0
    for b, (h, w) in zip(bits, schedule):
        acc = acc + resize_up(bits_to_codes(b, h, w), final)
    return acc  # type: ignore[return-value]
