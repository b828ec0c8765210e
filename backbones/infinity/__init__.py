"""Infinity backbone (FoundationVision/Infinity, bitwise next-scale prediction), our own implementation.

Runs on CPU and GPU without flash-attn and loads the official released weights by key name:
``infinity_2b_reg.pth`` (transformer), ``infinity_vae_d32reg.pth`` (BSQ-VAE) and flan-t5-xl.

>>> from cstoolkit.backbones.infinity import build_transformer
>>> model = build_transformer(preset="infinity-2b", device="meta")   # bare module, no memory
"""

from .backbone import GenerationOutput, InfinityBackbone, InfinityConfig, sample_bits
from .schedule import scale_schedule
from .text import T5TextEncoder
from .transformer import InfinityTransformer, TransformerConfig, build_transformer
from .vae import BSQVAE, VAEConfig, build_vae

__all__ = [
    "BSQVAE",
    "GenerationOutput",
    "InfinityBackbone",
    "InfinityConfig",
    "InfinityTransformer",
    "T5TextEncoder",
    "TransformerConfig",
    "VAEConfig",
    "build_transformer",
    "build_vae",
    "sample_bits",
    "scale_schedule",
]
