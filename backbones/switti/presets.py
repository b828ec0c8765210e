"""The presets of the Switti backbone: ONE table, name -> architecture of every part + where weights come from.

A row names the transformer config, the VQ-VAE config, the text encoders (hub ids / folders, or
configs built from a seed), the default resolution and the weights' locations. ``None`` weights =
random from the backbone's seed. Another package adds a row with :func:`add_preset`, e.g. a
``world`` preset of trained tiny weights::

    add_preset("world", replace(preset_row("tiny"), description="...",
               weights=Weights(transformer="/path/world/transformer", vqvae="/path/world/vqvae",
                               clip_l="/path/world/text_encoder", clip_g="/path/world/text_encoder_2")))

Every location is a hub repo id (``org/name``) or a local folder/file as :mod:`.loading` reads
them (transformer and VQ-VAE: ``model.safetensors`` + ``config.json``; text encoders:
``save_pretrained`` folders).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from cstoolkit.errors import UserError

from .text import HUB_CLIP_G, HUB_CLIP_L, TINY_CLIP_G, TINY_CLIP_L, TextConfig
from .transformer import PATCH_NUMS, TransformerConfig
from .vqvae import VQVAEConfig

HUB_VQVAE = "yresearch/VQVAE-Switti"


@dataclass
class Weights:
    """Where each part's weights come from (None = random from the seed)."""

    transformer: str | None = None
    vqvae: str | None = None
    clip_l: str | None = None
    clip_g: str | None = None


@dataclass
class PresetRow:
    description: str
    transformer: TransformerConfig
    vqvae: VQVAEConfig
    text: TextConfig
    resolution: int
    weights: Weights = field(default_factory=Weights)


def _official(description: str, reso: int, use_ar: bool, repo: str) -> PresetRow:
    pn = PATCH_NUMS[reso]
    description += " (random_weights: true: every part random from backbone.seed, full-size CLIP-L/bigG, no files)"
    return PresetRow(description, TransformerConfig(patch_nums=pn, use_ar=use_ar), VQVAEConfig(num_scales=len(pn)),
                     TextConfig(), reso, Weights(repo, HUB_VQVAE, HUB_CLIP_L, HUB_CLIP_G))


_TINY_TEXT = TextConfig(clip_l=None, clip_g=None, clip_l_config=dict(TINY_CLIP_L), clip_g_config=dict(TINY_CLIP_G))

PRESETS: dict[str, PresetRow] = {
    "tiny": PresetRow(
        "Switti-AR layout at toy size: 4 blocks x 64 wide, block-causal + KV cache, 10 scales 1..16, "
        "8x VQ-VAE (ch 32, vocab 512), 2-layer CLIP-L/bigG (32/64 wide); 128 px; random from a seed, offline",
        TransformerConfig(depth=4, width=64, heads=4, patch_nums=PATCH_NUMS[256], context_dim=_TINY_TEXT.context_dim,
                          pooled_dim=_TINY_TEXT.pooled_dim, use_ar=True, vocab_size=512),
        VQVAEConfig(vocab_size=512, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, num_scales=10),
        _TINY_TEXT, 128),
    "switti-512": _official("Switti 512 (30 x 1920, non-causal: each scale attends to itself), official weights "
                            "yresearch/Switti", 512, False, "yresearch/Switti"),
    "switti-1024": _official("Switti 1024 (30 x 1920, non-causal, 14 scales), official weights yresearch/Switti-1024",
                             1024, False, "yresearch/Switti-1024"),
    "switti-ar": _official("Switti-AR 512 (30 x 1920, block-causal, KV cache; the model CSD-VAR uses), official "
                           "weights yresearch/Switti-AR", 512, True, "yresearch/Switti-AR"),
}


def _world_row() -> PresetRow:
    """``world``: Switti-AR at 6 blocks x 256, trained on the synthetic world (cstoolkit world train switti);
    transformer + VQ-VAE from world/weights/switti/ (fp16), the tiny CLIPs random from seed 0."""
    from .._world import world_weights_dir

    root = world_weights_dir("switti")
    return PresetRow(
        "Switti-AR layout, 6 blocks x 256, 10 scales 1..16, 8x VQ-VAE (ch 32, vocab 512), tiny CLIPs from seed 0; "
        "128 px; "
        "trained on the synthetic world (cstoolkit world train switti), shipped fp16 safetensors",
        TransformerConfig(depth=6, width=256, heads=4, patch_nums=PATCH_NUMS[256], context_dim=_TINY_TEXT.context_dim,
                          pooled_dim=_TINY_TEXT.pooled_dim, use_ar=True, vocab_size=512),
        VQVAEConfig(vocab_size=512, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, num_scales=10),
        _TINY_TEXT, 128, Weights(transformer=str(root / "transformer"), vqvae=str(root / "vqvae")))


PRESETS["world"] = _world_row()


#: preset name -> description (the backbone's ``presets``; kept in step by :func:`add_preset`)
DESCRIPTIONS: dict[str, str] = {name: row.description for name, row in PRESETS.items()}


def preset_row(name: str) -> PresetRow:
    """The row of preset ``name`` (a copy: editing it changes nothing here)."""
    if name not in PRESETS:
        raise UserError("backbone.preset", f"unknown preset '{name}'", f"known: {', '.join(PRESETS)}")
    return replace(PRESETS[name])


def add_preset(name: str, row: PresetRow, *, overwrite: bool = False) -> None:
    """Register a preset row (e.g. trained tiny ``world`` weights: ``row.weights`` names their files)."""
    if name in PRESETS and not overwrite:
        raise ValueError(f"preset {name!r} exists; pass overwrite=True to replace it")
    PRESETS[name] = row
    DESCRIPTIONS[name] = row.description
