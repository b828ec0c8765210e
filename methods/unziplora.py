"""UnZipLoRA: separating content and style from a single image (Liu et al., CVPR 2025).

Two LoRAs, content ``L_c`` and style ``L_s``, are trained jointly on one image with

* prompt separation (Eq. 3): in cross-attention K/V each LoRA reads its own prompt;
* column separation (Eq. 4): per-column masks grown by importance recalibration up to N % of the
  columns, gated by merger vectors, with the orthogonality loss L⊥ (Eq. 5);
* block separation (Sec. 3.3.3): in content- (style-) sensitive up blocks the content (style)
  LoRA uses every column.

The result is two ordinary diffusers LoRAs (masks and mergers folded in) that load alone with
``StableDiffusionXLPipeline.load_lora_weights`` and together with ``set_adapters``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from cstoolkit.backbone import DiffusionBackbone, PromptEmbeds
from cstoolkit.cuda_graph import graph_steps, on_capture_stream
from cstoolkit.decomposition import Decomposition
from cstoolkit.lora import LoRABank, LoRASet
from cstoolkit.method import CONTENT_TOKEN, STYLE_TOKEN, GenerateConfig, Method
from cstoolkit.registry import register_method
from cstoolkit.runtime import Runtime, TrainState

from ._sdxl_lora import (
    StaticBatch,
    block_of,
    generate_with_loras,
    image_latents,
    is_cross_attention_kv,
    target_linears,
    unload_loras,
)

ADAPTERS = ("content", "style")

# Block separation of the official code (SDXL up blocks): content-only and style-only blocks.
CONTENT_BLOCKS = ("up_blocks.0.attentions.0", "up_blocks.0.attentions.2")
STYLE_BLOCKS = ("up_blocks.0.attentions.1", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1",
                "up_blocks.1.attentions.2")


@dataclass
class UnZipLoRAConfig:
    """Hyper-parameters; defaults are the paper's (Sec. 4.1)."""

    rank: int = field(default=64, metadata={"min": 1})
    lr: float = field(default=5e-5, metadata={"min": 0.0, "help": "Adam learning rate of the LoRA weights"})
    merger_lr: float = field(default=5e-3, metadata={"min": 0.0, "help": "learning rate of the merger vectors"})
    steps: int = field(default=600, metadata={"min": 1})
    warmup_steps: int = field(default=5, metadata={"min": 1, "help": "full-LoRA steps before the first masks"})
    recalibrate_every: int = field(default=200, metadata={"min": 1, "help": "t: steps between recalibrations"})
    column_fraction: float = field(default=0.30, metadata={"min": 0.0, "max": 1.0, "help": "N: cap of mask columns"})
    rounds: int = field(default=3, metadata={"min": 1, "help": "recalibration rounds; each adds N/rounds"})
    ortho_weight: float = field(default=0.5, metadata={"min": 0.0, "help": "λ⊥ of Eq. 5"})
    importance_threshold: float = field(default=1e-5, metadata={"min": 0.0})
    prompt_separation: bool = True
    column_separation: bool = True
    block_separation: bool = True
    content_blocks: list[str] = field(default_factory=lambda: list(CONTENT_BLOCKS))
    style_blocks: list[str] = field(default_factory=lambda: list(STYLE_BLOCKS))
    init_std: float | None = field(default=None, metadata={"help": "std of the normal init; default 1/rank"})
    full_prompt: str = "A {content} in {style} style"
    content_prompt: str = "A {content}"
    style_prompt: str = "An image in {style} style"


@dataclass
class UnZipLoRAInputs:
    """One image, its subject's class word and a 2-3 word style description."""

    image: str = field(default="", metadata={"path": True, "image": True})
    content: str = field(default="", metadata={"help": "class word of the subject, e.g. 'dog'"})
    style: str = field(default="", metadata={"help": "short style description, e.g. 'watercolor painting'"})
    token: str = field(default="sks", metadata={"help": "unique token before the class word"})

    def __post_init__(self) -> None:
        for name in ("image", "content", "style"):
            if not getattr(self, name):
                raise ValueError(f"inputs.{name} is required")


class ColumnMasks:
    """Column masks (Eq. 4) and mergers of every bank, with importance bookkeeping."""

    def __init__(self, loras: LoRASet, config: UnZipLoRAConfig, device: torch.device):
        self.config = config
        self.mergers: dict[str, torch.nn.Parameter] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        for key, bank in loras.banks.items():
            n, out = len(bank.names), bank.out_features
            for a in ADAPTERS:
                self.mergers[f"{key}.{a}"] = torch.nn.Parameter(torch.ones(n, out, device=device))
                self.buffers[f"{key}.{a}.mask"] = torch.zeros(n, out, device=device)
                self.buffers[f"{key}.{a}.importance"] = torch.zeros(n, out, device=device)
                full = [self._full_block(name, a) for name in bank.names]
                self.buffers[f"{key}.{a}.full"] = torch.tensor(full, dtype=torch.float32, device=device)
        self.buffers["rounds_done"] = torch.zeros((), device=device)

    def _full_block(self, name: str, adapter: str) -> bool:
        cfg = self.config
        if not cfg.column_separation:
            return True
        if not cfg.block_separation:
            return False
        blocks = cfg.content_blocks if adapter == "content" else cfg.style_blocks
        return block_of(name) in blocks

    @property
    def rounds_done(self) -> int:
        return int(self.buffers["rounds_done"].item())

    def gates(self, key: str, bank: LoRABank) -> dict[str, torch.Tensor | None]:
        """g = m ⊙ mask per adapter; block-separated layers use every column."""
        out: dict[str, torch.Tensor | None] = {}
        for a in ADAPTERS:
            full = self.buffers[f"{key}.{a}.full"].unsqueeze(-1)
            mask = torch.maximum(self.buffers[f"{key}.{a}.mask"], full)
            out[a] = self.mergers[f"{key}.{a}"] * mask
        return out

    def orthogonality_loss(self, loras: LoRASet) -> torch.Tensor:
        # Eq. 5: L⊥ = Σ_i |m_c^i · m_s^i| (mean over layers and columns, as the official code)
        terms = []
        for key, bank in loras.banks.items():
            g = self.gates(key, bank)
            terms.append((g["content"] * g["style"]).abs().mean(-1))
        return torch.cat(terms).mean()

    def accumulate_importance(self, loras: LoRASet) -> None:
        """Cone-style importance of each column from ΔW ⊙ ∂L/∂ΔW recorded in the last backward."""
        thr = self.config.importance_threshold
        for key, bank in loras.banks.items():
            for i, deltas in bank._deltas.items():
                for a, delta in zip(bank.adapters, deltas):
                    if delta.grad is None:
                        continue
                    score = (delta.detach().float() * delta.grad.float()).abs()  # (out, in)
                    frac = (score > thr).float().mean(-1)
                    mag = score.mean(-1)
                    # fraction of salient entries per column; mean magnitude breaks ties
                    imp = frac + 1e-5 * mag / (mag.max() + 1e-30)
                    self.buffers[f"{key}.{a}.importance"][i] += imp.to(self.buffers[f"{key}.{a}.importance"].device)

    def recalibrate(self, loras: LoRASet) -> None:
        """Add the next N/rounds % most important columns to each mask; the masks stay disjoint."""
        cfg = self.config
        for key, bank in loras.banks.items():
            k = max(1, round(bank.out_features * cfg.column_fraction / cfg.rounds))
            for a in ADAPTERS:
                other = "style" if a == "content" else "content"
                mask = self.buffers[f"{key}.{a}.mask"]
                imp = self.buffers[f"{key}.{a}.importance"].clone()
                # a column belongs to at most one LoRA: content picks first, style from the rest
                excluded = (mask > 0) | (self.buffers[f"{key}.{other}.mask"] > 0)
                imp[excluded] = -float("inf")
                free = (~excluded).sum(-1).min().item()
                if free > 0:
                    idx = imp.topk(min(k, int(free)), dim=-1).indices
                    mask.scatter_(-1, idx, 1.0)
                self.buffers[f"{key}.{a}.importance"].zero_()
        self.buffers["rounds_done"] += 1

    def export_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"merger.{k}": v.detach() for k, v in self.mergers.items()}
        out.update({k: v for k, v in self.buffers.items() if k.endswith((".mask", ".full"))})
        return out


class UnZipLoRATrainer:
    """One UnZipLoRA training run on a backbone: LoRAs injected, masks, optimiser, the step.

    ``step(i)`` runs warm-up steps (full LoRAs, importance scoring) for ``i < warmup``, then the
    masked steps with recalibration every ``t`` steps; it returns the losses to log.
    """

    def __init__(self, backbone: DiffusionBackbone, cfg: UnZipLoRAConfig, latents: torch.Tensor,
                 cond: PromptEmbeds, cond_c: PromptEmbeds, cond_s: PromptEmbeds, *,
                 lora_generator: torch.Generator | None = None, noise: torch.Generator | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 cuda_graph: bool = False):
        self.backbone, self.cfg = backbone, cfg
        self.noise = noise if noise is not None else torch.Generator().manual_seed(0)
        self.autocast = autocast
        names = target_linears(backbone)
        split = [n for n in names if is_cross_attention_kv(n)] if cfg.prompt_separation else []
        # on GPUs the adapters are folded into the weights once per step (see cstoolkit.lora)
        self.loras = LoRASet(backbone.unet, names, cfg.rank, ADAPTERS, init="gaussian", init_std=cfg.init_std,
                             generator=lora_generator, split_input=split, merge=latents.is_cuda).inject()
        # Eq. 3: K,V = W0ᵀx + ΔW_sᵀx_s + ΔW_cᵀx_c — each LoRA of a cross-attention k/v reads its prompt
        self.loras.set_shared_input(split, torch.cat([cond_c.prompt_embeds, cond_s.prompt_embeds], dim=-1))
        self.masks = ColumnMasks(self.loras, cfg, backbone.device)
        lora_params = [p for bank in self.loras.banks.values() for p in (bank.lora_A, bank.lora_B)]
        self.optimizer = torch.optim.Adam([{"params": lora_params, "lr": cfg.lr},
                                           {"params": list(self.masks.mergers.values()), "lr": cfg.merger_lr}],
                                          capturable=cuda_graph, fused=latents.is_cuda or None)
        self.dtype = backbone.weight_dtype
        self.warmup = cfg.warmup_steps if cfg.column_separation else 0
        # noise and timestep are drawn eagerly into static tensors, so the masked step, which never
        # changes shape, can be captured once as a CUDA graph and replayed (same draws either way)
        self.batch = StaticBatch(backbone, latents, cond)
        self._masked = graph_steps(cuda_graph, {"masked": self._masked_step})["masked"]

    def state(self) -> TrainState:
        """What a checkpoint holds: LoRA banks, mergers, masks, optimiser and noise generator."""
        banks = self.loras.banks.items()
        return TrainState(
            params={**{f"lora.{k}.A": b.lora_A for k, b in banks}, **{f"lora.{k}.B": b.lora_B for k, b in banks},
                    **{f"merger.{k}": v for k, v in self.masks.mergers.items()}},
            buffers=self.masks.buffers, optimizers={"adam": self.optimizer}, generators={"noise": self.noise},
        )

    def draw(self) -> None:
        """Noise and timestep of the next step, from the noise generator."""
        self.batch.draw(self.noise)

    def diffusion_loss(self) -> torch.Tensor:
        with self.autocast():
            return self.batch.loss()

    def _scored_backward(self) -> torch.Tensor:
        """Forward/backward with the full LoRAs, recording ΔW ⊙ ∂L/∂ΔW for the column importance."""
        self.loras.set_record_delta(True)
        self.loras.prepare(self.dtype)
        self.optimizer.zero_grad(set_to_none=True)
        self.draw()
        loss = self.diffusion_loss()
        loss.backward()
        self.masks.accumulate_importance(self.loras)
        self.loras.set_record_delta(False)
        return loss

    def step(self, step: int) -> dict[str, Any]:
        with on_capture_stream(self._masked):
            return self._step(step)

    def _step(self, step: int) -> dict[str, Any]:
        cfg, masks = self.cfg, self.masks
        if step < self.warmup:  # warm-up: train the full LoRAs while scoring columns
            loss = self._scored_backward()
            self.optimizer.step()
            if step == self.warmup - 1:
                masks.recalibrate(self.loras)
            return {"loss": loss.item()}
        t = step - self.warmup
        if cfg.column_separation and t > 0 and t % cfg.recalibrate_every == 0 and masks.rounds_done < cfg.rounds:
            self._scored_backward()  # scoring pass only: no update
            masks.recalibrate(self.loras)
        self.draw()
        return self._masked()

    def _masked_step(self) -> dict[str, torch.Tensor]:
        """Eq. 4 gates, denoising loss + λ⊥ L⊥ (Eq. 5), Adam, mergers clamped to [0, 1]."""
        masks = self.masks
        self.loras.prepare(self.dtype, masks.gates)
        loss_db = self.diffusion_loss()
        loss_ortho = masks.orthogonality_loss(self.loras)
        loss = loss_db + self.cfg.ortho_weight * loss_ortho
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_clamp_min_(list(masks.mergers.values()), 0.0)
            torch._foreach_clamp_max_(list(masks.mergers.values()), 1.0)
        return {"loss": loss_db.detach(), "ortho": loss_ortho.detach()}


@register_method
class UnZipLoRA(Method):
    """Content and style LoRAs trained jointly from one image (SDXL)."""

    name = "unziplora"
    summary = "Content and style LoRAs trained jointly from one image (prompt, column and block separation)"
    paper = "Liu et al., UnZipLoRA: Separating Content and Style from a Single Image, CVPR 2025"
    family = "diffusion"
    Config = UnZipLoRAConfig
    Inputs = UnZipLoRAInputs
    GenerateConfig = GenerateConfig

    config: UnZipLoRAConfig

    # ------------------------------------------------------------------------------- prompts
    def placeholders(self, inputs: UnZipLoRAInputs) -> dict[str, str]:
        return {CONTENT_TOKEN: f"{inputs.token} {inputs.content}".strip(), STYLE_TOKEN: inputs.style}

    def training_prompts(self, inputs: UnZipLoRAInputs) -> tuple[str, str, str]:
        """(x, x_c, x_s): the combined, content and style prompts of Eq. 3."""
        ph = self.placeholders(inputs)
        content, style = ph[CONTENT_TOKEN], ph[STYLE_TOKEN]
        cfg = self.config
        return (cfg.full_prompt.format(content=content, style=style), cfg.content_prompt.format(content=content),
                cfg.style_prompt.format(style=style))

    # ----------------------------------------------------------------------------------- fit
    def fit(self, backbone: DiffusionBackbone, inputs: UnZipLoRAInputs, runtime: Runtime) -> Decomposition:
        cfg = self.config
        unload_loras(backbone)
        latents = image_latents(backbone, inputs.image, "inputs.image")
        prompts = self.training_prompts(inputs)
        trainer = UnZipLoRATrainer(backbone, cfg, latents, *(backbone.encode_prompt([p]) for p in prompts),
                                   lora_generator=runtime.generator(1),
                                   noise=runtime.generator(2, device=backbone.device),
                                   autocast=runtime.autocast, cuda_graph=runtime.use_cuda_graph)
        loop = runtime.train_loop("unziplora", trainer.warmup + cfg.steps, trainer.state())
        try:
            for step in loop:
                loop.log(**trainer.step(step))
        finally:
            trainer.loras.remove()

        loras, masks = trainer.loras, trainer.masks
        meta_file = loras.diffusers_metadata()
        return Decomposition(
            method=self.name,
            files={
                "content/pytorch_lora_weights.safetensors": loras.export("content", masks.gates),
                "style/pytorch_lora_weights.safetensors": loras.export("style", masks.gates),
                "unziplora/masks.safetensors": masks.export_tensors(),
            },
            placeholders=self.placeholders(inputs),
            meta={"training_prompts": list(prompts), "target_modules": len(loras.names),
                  "mask_rounds": masks.rounds_done, "steps": cfg.steps},
            file_metadata={"content/pytorch_lora_weights.safetensors": meta_file,
                           "style/pytorch_lora_weights.safetensors": meta_file},
        )

    # ------------------------------------------------------------------------------ generate
    def generate(self, backbone: DiffusionBackbone, decomposition: Decomposition, prompts: Sequence[str], use: str,
                 *, num_images: int = 1, seed: int = 0, options: Any = None, progress: bool = True) -> list[list[Any]]:
        # the content LoRA, the style LoRA, or both added (direct arithmetic merge, Fig. 2)
        return generate_with_loras(backbone, decomposition, prompts, use, num_images=num_images, seed=seed,
                                   options=options, progress=progress)
