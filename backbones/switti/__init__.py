"""Switti backbone (yandex-research/switti: next-scale prediction over VAR's VQ codes), our own implementation.

Runs on CPU and GPU without flash-attn/apex and loads the official releases by key name: the
transformer ``model.safetensors`` of ``yresearch/Switti``, ``yresearch/Switti-1024`` or
``yresearch/Switti-AR``, the VQ-VAE ``yresearch/VQVAE-Switti`` and the CLIP ViT-L/14 + bigG text encoders.

>>> from cstoolkit.backbones.switti import build_transformer
>>> model = build_transformer(preset="switti-1024", device="meta")   # bare module, no memory
"""

from ..scalewise import GenerationOutput
from .backbone import SwittiBackbone, SwittiConfig, filter_logits
from .loading import save_transformer, save_vqvae
from .presets import PRESETS, PresetRow, Weights, add_preset, preset_row
from .text import DualCLIPText, TextConfig
from .transformer import PATCH_NUMS, SwittiTransformer, TransformerConfig, build_transformer
from .vqvae import VQVAE, VQVAEConfig, build_vqvae

__all__ = [
    "DualCLIPText",
    "GenerationOutput",
    "PATCH_NUMS",
    "PRESETS",
    "PresetRow",
    "SwittiBackbone",
    "SwittiConfig",
    "SwittiTransformer",
    "TextConfig",
    "TransformerConfig",
    "VQVAE",
    "VQVAEConfig",
    "Weights",
    "add_preset",
    "build_transformer",
    "build_vqvae",
    "filter_logits",
    "preset_row",
    "save_transformer",
    "save_vqvae",
]
