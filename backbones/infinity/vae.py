"""BSQ-VAE of Infinity (d32 in the release): convolutional encoder/decoder, official key layout.

Convolutions and group norms sit under ``.conv.`` / ``.norm.`` wrappers as in the official module
tree (``encoder.down.0.block.0.conv1.conv.weight``, ``...norm1.norm.weight``); the checkpoint
stores the state dict under ``"vae"``. No attention layers (the d32 model has none). The
quantiser (:mod:`.quantizer`) has no weights; only its ``quantizer.lfq.mask`` buffer is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import MultiScaleBSQ


@dataclass
class VAEConfig:
    """Defaults: the official d32 VAE (stride 16, 32-bit codes)."""

    base_ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    patch_size: int = 16
    codebook_dim: int = 32
    in_channels: int = 3


PRESETS: dict[str, VAEConfig] = {
    "infinity-2b": VAEConfig(),
    "tiny": VAEConfig(base_ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, patch_size=8, codebook_dim=16),
    "world": VAEConfig(base_ch=64, ch_mult=(1, 1, 2, 2), num_res_blocks=1, patch_size=8, codebook_dim=16),
}


class Conv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Normalize(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        groups = 32 if channels % 32 == 0 else 24
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = Normalize(cin)
        self.conv1 = Conv(cin, cout, 3, padding=1)
        self.norm2 = Normalize(cout)
        self.conv2 = Conv(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = Conv(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after zero padding on the right and bottom only."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder/decoder: ``block`` (res blocks) and an optional resampler."""

    def __init__(self, blocks: list[ResnetBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch)
        self.block_2 = ResnetBlock(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult = cfg.base_ch, cfg.ch_mult
        n_down = int(math.log2(cfg.patch_size))
        self.conv_in = Conv(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cin, ch * m))
                cin = ch * m
            level = Level(blocks)
            if i < n_down:
                level.downsample = Downsample(cin)
            self.down.append(level)
        self.mid = Mid(cin)
        self.norm_out = Normalize(cin)
        self.conv_out = Conv(cin, cfg.codebook_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult = cfg.base_ch, cfg.ch_mult
        n_up = int(math.log2(cfg.patch_size))
        cin = ch * mult[-1]
        self.conv_in = Conv(cfg.codebook_dim, cin, 3, padding=1)
        self.mid = Mid(cin)
        levels: list[Level] = []
        for i in reversed(range(len(mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, ch * mult[i]))
                cin = ch * mult[i]
            level = Level(blocks)
            if 1 <= i <= n_up:
                level.upsample = Upsample(cin)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(cin)
        self.conv_out = Conv(cin, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class BSQVAE(nn.Module):
    """Encoder, decoder and (weightless) quantiser of Infinity's image tokenizer."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantizer = MultiScaleBSQ(cfg.codebook_dim)

    @property
    def patch_size(self) -> int:
        return self.cfg.patch_size

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> continuous features (B, d, H/p, W/p), fp32."""
        w = self.encoder.conv_in.conv.weight
        return self.encoder(images.to(device=w.device, dtype=w.dtype)).float()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Accumulated codes (B, d, h, w) -> images (B, 3, h*p, w*p) in [-1, 1]."""
        w = self.decoder.conv_in.conv.weight
        return self.decoder(codes.to(device=w.device, dtype=w.dtype)).float().clamp(-1, 1)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> "BSQVAE":
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0, 1 / math.sqrt(p[0].numel()), generator=generator)
        d = self.cfg.codebook_dim
        self.quantizer.lfq.mask.copy_(2 ** torch.arange(d - 1, -1, -1))
        return self


def build_vae(
    preset: str | VAEConfig = "infinity-2b",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int | None = 0,
) -> BSQVAE:
    """The BSQ-VAE of ``preset`` (``"infinity-2b"`` = d32, or ``"tiny"``), randomly initialised from ``seed``."""
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    with torch.device("meta"):
        vae = BSQVAE(cfg)
    if str(device) == "meta":
        return vae
    vae = vae.to_empty(device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else seed)
    vae.init_weights(gen)
    if dtype is not None:
        vae.to(dtype)  # floating-point tensors only: the integer mask buffer stays as it is
    return vae
