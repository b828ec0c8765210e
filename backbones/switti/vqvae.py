"""VAR's multi-scale residual VQ-VAE (``yresearch/VQVAE-Switti``), our own code in the official layout.

Keys follow ``models/vqvae.py`` / ``basic_vae.py`` / ``quant.py`` of VAR and Switti: ``encoder.*``,
``decoder.*`` (LDM-style, GroupNorm 32, self-attention in the lowest-resolution level and the
middle), ``quant_conv``, ``post_quant_conv``, ``quantize.embedding`` (V x Cvae),
``quantize.quant_resi.qresi_ls.{0..3}`` (the 4 shared Phi convolutions) and the buffer
``quantize.ema_vocab_hit_SV`` (training statistics, unused here).

Multi-scale residual quantisation (VAR): ``f`` = quant_conv(encoder(img)) on the final grid
(H, W); for every scale ``pn``: the residual ``f - f_hat`` is area-downsampled to (pn, pn), each
vector is replaced by its nearest code (L2), the codes are bicubic-upsampled to (H, W) (not at the
last scale), passed through Phi (``x * 0.5 + conv(x) * 0.5``, the conv picked by the nearest tick
of ``si / (S - 1)``) and added to ``f_hat``. The transformer's input for scale ``si + 1`` is
``f_hat`` area-downsampled to that scale. Decoding: decoder(post_quant_conv(f_hat)), clamped to [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VQVAEConfig:
    """Defaults: the official VQ-VAE (vocab 4096, Cvae 32, ch 160, ch_mult 1,1,2,2,4: stride 16)."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    share_quant_resi: int = 4
    quant_resi: float = 0.5
    num_scales: int = 10  # rows of ``ema_vocab_hit_SV`` (any value loads)

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map (1x1 convs ``qkv``, ``proj_out``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, 3, c, h * w).transpose(2, 3).unbind(1)  # (B, HW, C) each
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """``down.{i}`` / ``up.{i}``: res blocks, attention (last level only), resampling."""

    def __init__(self, blocks: list[ResnetBlock], attn: list[AttnBlock], resample: nn.Module | None, kind: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)
        if resample is not None:
            setattr(self, kind, resample)
        self.kind = kind if resample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return getattr(self, self.kind)(x) if self.kind else x


class Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch)
        self.attn_1 = AttnBlock(ch)
        self.block_2 = ResnetBlock(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cin, ch * m))
                cin = ch * m
                if i == n - 1:
                    attn.append(AttnBlock(cin))
            self.down.append(Level(blocks, attn, Downsample(cin) if i != n - 1 else None, "downsample"))
        self.mid = Mid(cin)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = Mid(cin)
        levels: list[Level] = []
        for i in reversed(range(n)):
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, ch * mult[i]))
                cin = ch * mult[i]
                if i == n - 1:
                    attn.append(AttnBlock(cin))
            levels.insert(0, Level(blocks, attn, Upsample(cin) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """``x * (1 - r) + conv(x) * r`` (r = 0.5): the residual convolution applied to upsampled codes."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 - self.ratio) + super().forward(x) * self.ratio


class PhiPartiallyShared(nn.Module):
    """K shared Phi convolutions; scale ``si`` of ``S`` uses the one whose tick is nearest ``si / (S - 1)``."""

    def __init__(self, phis: list[Phi]):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)
        k = len(phis)
        lo, hi = (1 / 3 / k, 1 - 1 / 3 / k) if k == 4 else (1 / 2 / k, 1 - 1 / 2 / k)
        # np.linspace(lo, hi, k) bit for bit: scale 2 of 10 lies exactly between two ticks, the rounding decides
        step = (hi - lo) / max(k - 1, 1)
        self.ticks = [i * step + lo for i in range(k - 1)] + [hi]

    def pick(self, si: int, num_scales: int) -> Phi:
        at = si / (num_scales - 1) if num_scales > 1 else 0.0
        return self.qresi_ls[min(range(len(self.ticks)), key=lambda i: abs(self.ticks[i] - at))]  # type: ignore[return-value]


class Quantizer(nn.Module):
    """``quantize``: the codebook, the Phi convolutions and the (unused) usage statistics buffer."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        self.quant_resi = PhiPartiallyShared([Phi(cfg.z_channels, cfg.quant_resi) for _ in range(cfg.share_quant_resi)])
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(cfg.num_scales, cfg.vocab_size))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Vectors (N, C) -> index (N,) of the nearest code (L2)."""
        e = self.embedding.weight.float()
        return torch.argmin(e.square().sum(1)[None] - 2 * z.float() @ e.T, dim=1)

    def upsampled(self, h: torch.Tensor, si: int, num_scales: int, size: tuple[int, int]) -> torch.Tensor:
        """Codes (B, C, h, w) of scale ``si`` -> their contribution to ``f_hat`` (B, C, H, W)."""
        if si != num_scales - 1:
            h = F.interpolate(h, size=size, mode="bicubic")
        return self.quant_resi.pick(si, num_scales)(h)


class VQVAE(nn.Module):
    """The multi-scale VQ-VAE (see the module docstring). Images are (B, 3, H, W) in [-1, 1]."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = Quantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)

    @property
    def stride(self) -> int:
        return self.cfg.stride

    def embed(self, idx: torch.Tensor, pn: int) -> torch.Tensor:
        """Code indices (B, pn*pn) -> code vectors (B, Cvae, pn, pn)."""
        return self.quantize.embedding(idx).float().transpose(1, 2).reshape(idx.shape[0], -1, pn, pn)

    @torch.no_grad()
    def img_to_idx(self, images: torch.Tensor, patch_nums: Sequence[int]) -> list[torch.Tensor]:
        """Images -> per-scale code indices (B, pn*pn) (the official ``img_to_idxBl``)."""
        f = self.quant_conv(self.encoder(images)).float()
        b, c, h, w = f.shape
        if (patch_nums[-1], patch_nums[-1]) != (h, w):
            raise ValueError(f"the last scale {patch_nums[-1]} is not the feature grid {h}x{w}")
        f_hat = torch.zeros_like(f)
        out = []
        for si, pn in enumerate(patch_nums):
            rest = f - f_hat
            if si != len(patch_nums) - 1:
                rest = F.interpolate(rest, size=(pn, pn), mode="area")
            idx = self.quantize.nearest(rest.permute(0, 2, 3, 1).reshape(-1, c)).view(b, pn * pn)
            f_hat = f_hat + self.quantize.upsampled(self.embed(idx, pn), si, len(patch_nums), (h, w))
            out.append(idx)
        return out

    def next_input(self, si: int, patch_nums: Sequence[int], f_hat: torch.Tensor,
                   codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add the codes (B, Cvae, pn, pn) of scale ``si`` to ``f_hat``; return it and the next scale's
        input (B, pn_next^2, Cvae), None after the last scale (official ``get_next_autoregressive_input``)."""
        size = tuple(f_hat.shape[-2:])
        f_hat = f_hat + self.quantize.upsampled(codes.float(), si, len(patch_nums), size)
        if si == len(patch_nums) - 1:
            return f_hat, None
        pn = patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)

    @torch.no_grad()
    def idx_to_inputs(self, idx: list[torch.Tensor], patch_nums: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-scale indices -> (f_hat (B, Cvae, H, W), teacher-forcing inputs (B, L - 1, Cvae))
        (the official ``idxBl_to_switti_input``)."""
        b, last = idx[0].shape[0], patch_nums[-1]
        f_hat = torch.zeros(b, self.cfg.z_channels, last, last, device=idx[0].device)
        inputs = []
        for si, pn in enumerate(patch_nums):
            f_hat, nxt = self.next_input(si, patch_nums, f_hat, self.embed(idx[si], pn))
            if nxt is not None:
                inputs.append(nxt)
        return f_hat, torch.cat(inputs, dim=1)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Accumulated codes (B, Cvae, H, W) -> images (B, 3, 16H, 16W) in [-1, 1]."""
        dtype = self.post_quant_conv.weight.dtype
        return self.decoder(self.post_quant_conv(f_hat.to(dtype))).clamp(-1, 1)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> "VQVAE":
        """Random weights from ``generator``: convs ~ N(0, 1/fan_in), GroupNorms identity, codebook ~ N(0, 1)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:  # GroupNorm weight
                p.fill_(1.0)
            elif name == "quantize.embedding.weight":
                p.normal_(0, 1, generator=generator)
            else:
                p.normal_(0, (1 / (p[0].numel())) ** 0.5, generator=generator)
        for m in self.modules():
            if isinstance(m, ResnetBlock):
                m.conv2.weight.mul_(0.3)
        self.quantize.ema_vocab_hit_SV.zero_()
        return self


def build_vqvae(config: str | VQVAEConfig = "switti-ar", *, device: torch.device | str = "cpu",
                seed: int | None = 0) -> VQVAE:
    """The VQ-VAE of a preset name or config; random from ``seed`` (None: uninitialised, to load)."""
    if isinstance(config, str):
        from .presets import preset_row

        config = preset_row(config).vqvae
    with torch.device("meta"):
        model = VQVAE(config)
    if str(device) == "meta":
        return model
    model = model.to_empty(device=device)
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        model.init_weights(gen)
    return model.eval()
