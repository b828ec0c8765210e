"""The metric models: CLIP (open_clip), CSD (open_clip ViT visual + two heads) and DINO (timm).

Each model is built from a library that already has the architecture, then loads the official
weights by key name. Preprocessing takes 8-bit RGB PIL images, so pixel ranges are right whatever
file the image came from:

* CLIP and CSD: resize the short side to 224 (bicubic), centre-crop 224, scale to [0, 1], CLIP
  mean/std (OpenAI CLIP's and CSD's ``transforms_branch0``).
* DINO: resize the short side to 256 (bicubic), centre-crop 224, scale to [0, 1], ImageNet
  mean/std (DINO's evaluation transform).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .weights import load_strict, load_weights, resolve_weights, state_dict_from

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side to ``resize`` (bicubic), centre-crop ``crop``, normalise."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """8-bit RGB images -> (B, 3, crop, crop) float32."""
        out = []
        for im in images:
            im = im.convert("RGB")
            scale = self.resize / min(im.size)
            size = (max(self.crop, round(im.width * scale)), max(self.crop, round(im.height * scale)))
            im = im.resize(size, Image.BICUBIC)
            left, top = (im.width - self.crop) // 2, (im.height - self.crop) // 2
            arr = np.asarray(im.crop((left, top, left + self.crop, top + self.crop)), dtype=np.float32) / 255.0
            out.append(torch.from_numpy(arr).permute(2, 0, 1))
        x = torch.stack(out)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


CLIP_PREPROCESS = Preprocess(224, 224, CLIP_MEAN, CLIP_STD)
DINO_PREPROCESS = Preprocess(256, 224, IMAGENET_MEAN, IMAGENET_STD)


def _open_clip_config(arch: str | dict[str, Any]) -> dict[str, Any]:
    import open_clip

    if isinstance(arch, dict):
        return copy.deepcopy(arch)
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        from ..errors import UserError

        raise UserError("metrics", f"unknown open_clip architecture '{arch}'", "expected e.g. ViT-B-32-quickgelu")
    return cfg


# --------------------------------------------------------------------------------------- CLIP
class CLIPEncoder(nn.Module):
    """OpenAI CLIP through open_clip: L2-normalised image and text embeddings."""

    #: file names tried in a hub repo (open_clip's own layout)
    hub_files = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

    def __init__(self, arch: str | dict[str, Any], weights: str | None, seed: int = 0):
        super().__init__()
        import open_clip

        cfg = _open_clip_config(arch)
        torch.manual_seed(seed)
        self.model = open_clip.CLIP(**cfg)
        self.tokenizer = open_clip.SimpleTokenizer(context_length=cfg.get("text_cfg", {}).get("context_length", 77))
        if weights:
            raw = load_weights(resolve_weights(weights, "metrics.clip", self.hub_files), "metrics.clip")
            load_strict(self.model, state_dict_from(raw, wrappers=("state_dict",), prefixes=("module.",)),
                        "metrics.clip")
        self.preprocess = CLIP_PREPROCESS
        self.eval().requires_grad_(False)

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.parameters()).device
        tokens = self.tokenizer(list(texts)).to(device)
        return nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)


# ---------------------------------------------------------------------------------------- CSD
class CSDEncoder(nn.Module):
    """CSD (Somepalli et al. 2024): a CLIP ViT visual tower without its projection and two heads.

    ``forward`` returns (backbone feature, content embedding, style embedding), the last two
    L2-normalised, as the official ``CSD_CLIP``. Key names are the official ones after the
    ``module.`` prefix: ``backbone.*`` (OpenAI CLIP visual), ``last_layer_style``,
    ``last_layer_content`` (each (width, embed_dim)).
    """

    hub_files = ("pytorch_model.bin", "checkpoint.pth", "model.safetensors")

    def __init__(self, arch: str | dict[str, Any], weights: str | None, seed: int = 0):
        super().__init__()
        from open_clip.model import _build_vision_tower

        cfg = _open_clip_config(arch)
        torch.manual_seed(seed)
        self.backbone = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"],
                                            quick_gelu=cfg.get("quick_gelu", False))
        proj = self.backbone.proj
        self.last_layer_style = nn.Parameter(proj.detach().clone())
        self.last_layer_content = nn.Parameter(proj.detach().clone())
        self.backbone.proj = None
        if weights:
            raw = load_weights(resolve_weights(weights, "metrics.csd", self.hub_files), "metrics.csd")
            # the backbone's own projection is unused by CSD (set to None in the official model)
            load_strict(self, state_dict_from(raw, drop=("backbone.proj",)), "metrics.csd")
        self.preprocess = CLIP_PREPROCESS
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feature = self.backbone(x).float()  # (B, width): pooled CLS after ln_post, no projection
        content = nn.functional.normalize(feature @ self.last_layer_content, dim=1)
        style = nn.functional.normalize(feature @ self.last_layer_style, dim=1)
        return feature, content, style


# --------------------------------------------------------------------------------------- DINO
class DINOEncoder(nn.Module):
    """DINO ViT (timm's VisionTransformer): the CLS token after the final norm, L2-normalised.

    Official DINO files (``dino_deitsmall16_pretrain.pth``) and timm's hub files share key names;
    training checkpoints (``teacher``/``student`` with ``module.backbone.``) are unwrapped.
    """

    hub_files = ("model.safetensors", "pytorch_model.bin")

    def __init__(self, arch: str | dict[str, Any], weights: str | None, seed: int = 0):
        super().__init__()
        import timm
        from timm.models.vision_transformer import VisionTransformer

        torch.manual_seed(seed)
        if isinstance(arch, dict):
            self.model = VisionTransformer(**{"num_classes": 0, **arch})
        else:
            self.model = timm.create_model(arch, pretrained=False, num_classes=0)
        if weights:
            raw = load_weights(resolve_weights(weights, "metrics.dino", self.hub_files), "metrics.dino")
            state = state_dict_from(raw, wrappers=("teacher", "state_dict", "model"),
                                    prefixes=("module.", "backbone."), drop=("head.",))
            load_strict(self.model, state, "metrics.dino")
        self.preprocess = DINO_PREPROCESS
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.model(x).float(), dim=-1)


# ------------------------------------------------------------------------------------ presets
@dataclass(frozen=True)
class ModelSpec:
    """One metric model: an architecture (library name or config mapping) and where its weights are
    (local file, hub repo ``org/name[:file]``; ``None`` = random weights from ``seed``)."""

    arch: Any
    weights: str | None = None
    seed: int = 0


_TINY_CLIP = {"embed_dim": 32, "quick_gelu": True,
              "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
_TINY_CSD = {"embed_dim": 48, "quick_gelu": True,
             "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32}}
_TINY_DINO = {"img_size": 224, "patch_size": 32, "embed_dim": 64, "depth": 2, "num_heads": 2}

#: name -> {"clip": spec, "csd": spec, "dino": spec}
PRESETS: dict[str, dict[str, ModelSpec]] = {
    # CSD-VAR's evaluation: OpenAI CLIP ViT-B/32, CSD ViT-L (learn2phoenix), DINO ViT-S/16
    "paper": {
        "clip": ModelSpec("ViT-B-32-quickgelu", "timm/vit_base_patch32_clip_224.openai"),
        "csd": ModelSpec("ViT-L-14-quickgelu", "tomg-group-umd/CSD-ViT-L"),
        "dino": ModelSpec("vit_small_patch16_224", "timm/vit_small_patch16_224.dino"),
    },
    # the same with OpenAI CLIP ViT-L/14 for CLIP-I and CLIP-T
    "paper-clip-l": {
        "clip": ModelSpec("ViT-L-14-quickgelu", "timm/vit_large_patch14_clip_224.openai"),
        "csd": ModelSpec("ViT-L-14-quickgelu", "tomg-group-umd/CSD-ViT-L"),
        "dino": ModelSpec("vit_small_patch16_224", "timm/vit_small_patch16_224.dino"),
    },
    # random small models of the same architectures: offline, for tests (scores mean nothing)
    "tiny": {
        "clip": ModelSpec(_TINY_CLIP, None, seed=0),
        "csd": ModelSpec(_TINY_CSD, None, seed=1),
        "dino": ModelSpec(_TINY_DINO, None, seed=2),
    },
}

ENCODERS = {"clip": CLIPEncoder, "csd": CSDEncoder, "dino": DINOEncoder}
