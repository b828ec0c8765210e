"""B-LoRA: implicit style-content separation (Frenkel et al., ECCV 2024).

One LoRA is trained with the DreamBooth loss on a single image ("A [v]"), but only on the two
transformer blocks the paper found to separate the image: ``up_blocks.0.attentions.0`` carries the
content, ``up_blocks.0.attentions.1`` the style (SDXL, Sec. 4). At inference the LoRA is split by
block: the content part alone, the style part alone, or the content part of one B-LoRA with the
style part of another (``cstoolkit generate --content A --style B``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from cstoolkit.backbone import DiffusionBackbone
from cstoolkit.decomposition import Decomposition
from cstoolkit.errors import UserError
from cstoolkit.method import CONTENT_TOKEN, STYLE_TOKEN, GenerateConfig, Method
from cstoolkit.registry import register_method
from cstoolkit.runtime import Runtime

from ._sdxl_lora import (
    LORA_FILE,
    TrainingImages,
    block_of,
    compiled_unet,
    generate_with_loras,
    lora_file_metadata,
    target_linears,
    unload_loras,
)
from .dreambooth_lora import DreamBoothLoRATrainer, train_lora

CONTENT_BLOCKS = ("up_blocks.0.attentions.0",)
STYLE_BLOCKS = ("up_blocks.0.attentions.1",)


@dataclass
class BLoRAConfig:
    """Hyper-parameters; defaults are the paper's (Sec. 5: rank 64, lr 5e-5, 1000 steps, batch 1, "A [v]")."""

    rank: int = field(default=64, metadata={"min": 1})
    lr: float = field(default=5e-5, metadata={"min": 0.0, "help": "AdamW learning rate"})
    steps: int = field(default=1000, metadata={"min": 1})
    weight_decay: float = field(default=1e-4, metadata={"min": 0.0})
    max_grad_norm: float = field(default=1.0, metadata={"min": 0.0, "help": "0 = no clipping"})
    init_std: float | None = field(default=None, metadata={"help": "std of the down projection's normal init; "
                                                                    "default 1/rank (the up projection starts at 0)"})
    content_blocks: list[str] = field(default_factory=lambda: list(CONTENT_BLOCKS))
    style_blocks: list[str] = field(default_factory=lambda: list(STYLE_BLOCKS))
    prompt: str = field(default="A {token}", metadata={"help": "training prompt; may use {token}, {content}, {style}"})
    content_trigger: str = field(default="{token}", metadata={"help": "what <c> stands for at generation"})
    style_trigger: str = field(default="{token}", metadata={"help": "what <s> stands for at generation"})


@dataclass
class BLoRAInputs:
    """One image; optional class word and style words for prompt templates that use them."""

    image: str = field(default="", metadata={"path": True, "image": True})
    token: str = field(default="[v]", metadata={"help": "the paper's placeholder token"})
    content: str = field(default="", metadata={"help": "class word (only if a template uses {content})"})
    style: str = field(default="", metadata={"help": "style words (only if a template uses {style})"})

    def __post_init__(self) -> None:
        if not self.image:
            raise ValueError("inputs.image is required")


def split_by_block(state: dict[str, torch.Tensor], blocks: Sequence[str]) -> dict[str, torch.Tensor]:
    """The entries of a diffusers LoRA state dict whose layer lies in ``blocks`` (B-LoRA's inference split)."""
    return {k: v for k, v in state.items() if block_of(k.split(".", 1)[1]) in blocks}


@register_method
class BLoRA(Method):
    """One LoRA on two SDXL blocks, split into content and style by block (SDXL)."""

    name = "b_lora"
    summary = "Baseline: one LoRA on up_blocks.0.attentions.0/1, split into content and style by block"
    paper = "Frenkel et al., Implicit Style-Content Separation using B-LoRA, ECCV 2024"
    family = "diffusion"
    Config = BLoRAConfig
    Inputs = BLoRAInputs
    GenerateConfig = GenerateConfig

    config: BLoRAConfig

    def _fill(self, template: str, inputs: BLoRAInputs, where: str) -> str:
        try:
            return template.format(token=inputs.token, content=inputs.content, style=inputs.style).strip()
        except (KeyError, IndexError) as exc:
            raise UserError(where, f"unknown field {exc} in '{template}'", "expected {token}, {content} or {style}") \
                from None

    def placeholders(self, inputs: BLoRAInputs) -> dict[str, str]:
        return {CONTENT_TOKEN: self._fill(self.config.content_trigger, inputs, "params.content_trigger"),
                STYLE_TOKEN: self._fill(self.config.style_trigger, inputs, "params.style_trigger")}

    def fit(self, backbone: DiffusionBackbone, inputs: BLoRAInputs, runtime: Runtime) -> Decomposition:
        cfg = self.config
        unload_loras(backbone)
        for key, blocks in (("content_blocks", cfg.content_blocks), ("style_blocks", cfg.style_blocks)):
            for i, block in enumerate(blocks):
                if not target_linears(backbone, blocks=[block]):
                    raise UserError(f"params.{key}[{i}]", f"'{block}' has no attention layers in this UNet",
                                    "expected a block such as up_blocks.0.attentions.0")
        prompt = self._fill(cfg.prompt, inputs, "params.prompt")
        images = TrainingImages.encode(backbone, [inputs.image], [prompt], ["inputs.image"])
        names = target_linears(backbone, blocks=[*cfg.content_blocks, *cfg.style_blocks])
        with compiled_unet(backbone, runtime, steps=cfg.steps, label=self.name) as compiler:
            trainer = DreamBoothLoRATrainer(backbone, names, images, rank=cfg.rank, lr=cfg.lr,
                                            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                                            init_std=cfg.init_std, lora_generator=runtime.generator(1),
                                            noise=runtime.generator(2), autocast=runtime.autocast_for(backbone.unet),
                                            cuda_graph=runtime.use_cuda_graph, compiler=compiler)
            lora, _ = train_lora(runtime, "b_lora", cfg.steps, trainer)
        files = {f"content/{LORA_FILE}": split_by_block(lora, cfg.content_blocks),
                 f"style/{LORA_FILE}": split_by_block(lora, cfg.style_blocks)}
        return Decomposition(method=self.name, files=files, placeholders=self.placeholders(inputs),
                             meta={"training_prompt": prompt, "target_modules": len(names), "steps": cfg.steps,
                                   "content_blocks": list(cfg.content_blocks), "style_blocks": list(cfg.style_blocks)},
                             file_metadata={rel: lora_file_metadata(state) for rel, state in files.items()})

    def generate(self, backbone: DiffusionBackbone, decomposition: Decomposition, prompts: Sequence[str], use: str,
                 *, num_images: int = 1, seed: int = 0, options: Any = None, progress: bool = True) -> list[list[Any]]:
        return generate_with_loras(backbone, decomposition, prompts, use, num_images=num_images, seed=seed,
                                   options=options, progress=progress)
