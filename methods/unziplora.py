"""UnZipLoRA: separating content and style from a single image (Liu et al., CVPR 2025).

Two LoRAs, content ``L_c`` and style ``L_s``, are trained jointly on one image with

* prompt separation (Eq. 3): in cross-attention K/V each LoRA reads its own prompt;
* column separation (Eq. 4): per-column masks grown by importance recalibration up to N % of the
  columns, gated by merger vectors, with the orthogonality loss L⊥ (Eq. 5);
* block separation (Sec. 3.3.3): in content- (style-) sensitive up blocks the content (style)
  LoRA uses every column.

The result is two ordinary diffusers LoRAs (column masks folded in; the mergers, as in the official
code, saved beside them) that load alone with ``StableDiffusionXLPipeline.load_lora_weights`` and
together with ``set_adapters``.

On the scale-wise backbones (Infinity, Switti) the loss is the teacher-forcing cross-entropy; prompt
and column separation carry over (the cross-attention k/v read each LoRA's own prompt); block
separation, which needs the U-Net's blocks, becomes *scale separation* (our extension, switch
``scale_separation``): on the tokens of the style scales (the first ~30 %, as CSD-VAR measured) the
style LoRA uses every column, on the content scales the content LoRA does; elsewhere each uses its
mask. LoRAs are saved in PEFT's layout (``methods/_scalewise_lora.py``).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch

from cstoolkit.backbone import Backbone, DiffusionBackbone, PromptEmbeds, ScaleWiseBackbone
from cstoolkit.compile import CompiledForward
from cstoolkit.cuda_graph import GraphedStep, cuda_graphs_available, graph_steps, on_capture_stream, release_graphs
from cstoolkit.decomposition import Decomposition
from cstoolkit.errors import UserError
from cstoolkit.lora import LoRABank, LoRASet
from cstoolkit.method import CONTENT_TOKEN, STYLE_TOKEN, Method, expand_placeholders
from cstoolkit.registry import register_method
from cstoolkit.runtime import Runtime, TrainState

from ._lora_sampling import sample_with_lora_layers, uniform_rank
from ._scalewise_lora import (
    PEFT_PREFIX,
    LoRAGenerateConfig,
    adapter_file,
    group_weights,
    load_target,
    peft_metadata,
    role_loras,
    sample_scalewise,
)
from ._sdxl_lora import (
    LORA_FILE,
    StaticBatch,
    block_of,
    compiled_step,
    compiled_unet,
    drop_step_tensors,
    generate_with_loras,
    image_latents,
    is_cross_attention_kv,
    loras_for_use,
    target_linears,
    uncompiled,
    unload_loras,
)

ADAPTERS = ("content", "style")
MERGERS_FILE = "unziplora/mergers.safetensors"
SCALE_GATES_FILE = "unziplora/scale_gates.safetensors"

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
    merger_update: Literal["overlap", "mask"] = field(default="overlap", metadata={
        "help": "merger entries that train: overlap (official code: only columns both LoRAs use, e.g. the masked "
                "LoRA's columns in a block-separated layer) or mask (every column of the LoRA's own mask)"})
    fold_mergers: bool = field(default=False, metadata={
        "help": "fold the mergers into the single LoRA files (default: mask only, as the official code; the "
                "mergers are saved in unziplora/mergers.safetensors and used by both_mode: separate)"})
    prompt_separation: bool = True
    column_separation: bool = True
    block_separation: bool = True
    content_blocks: list[str] = field(default_factory=lambda: list(CONTENT_BLOCKS))
    style_blocks: list[str] = field(default_factory=lambda: list(STYLE_BLOCKS))
    init: Literal["auto", "gaussian", "gaussian_a"] = field(default="auto", metadata={
        "help": "LoRA init: gaussian = A and B from N(0, init_std) (the official SDXL code), gaussian_a = A from "
                "N(0, init_std) and B zero (starts as the base model); auto = gaussian on SDXL, gaussian_a on "
                "the scale-wise backbones (our choice: the random product breaks the world Switti's samples)"})
    init_std: float | None = field(default=None, metadata={"help": "std of the normal init; default 1/rank"})
    scale_separation: bool = field(default=True, metadata={
        "help": "scale-wise backbones (our extension, replaces block separation): each LoRA uses every column on "
                "the tokens of its own scale group (style: the first scales, content: the rest)"})
    style_scales: list[int] | None = field(default=None, metadata={
        "help": "scale-wise: the style scale group; default the backbone's (first ~30 % of the scales)"})
    content_scales: list[int] | None = field(default=None, metadata={
        "help": "scale-wise: the content scale group; default the scales not in style_scales"})
    ffn: bool = field(default=False, metadata={"help": "scale-wise: also adapt the FFN layers"})
    merge_scale_groups: bool = field(default=False, metadata={
        "help": "scale-wise, where LoRA banks merge (CUDA): the scale-separated layers merge one weight per scale "
                "group (one GEMM per group; merged-weight rounding). Off by default: on switti-ar (H100) no "
                "faster and 8 GiB more memory than the unmerged token-gated layers"})
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


@dataclass
class UnZipLoRAGenerateConfig(LoRAGenerateConfig):
    """Sampling options; ``both_mode`` picks how "both" combines the two LoRAs."""

    both_mode: Literal["merge", "separate"] = field(default="merge", metadata={
        "help": "merge: the two LoRA files added on one prompt (paper, Sec. 3.3.2 / Fig. 2: direct arithmetic "
                "merge); separate: each LoRA reads its own prompt in cross-attention k/v, gated by its mergers "
                "(the official inference script)"})


class ColumnMasks:
    """Column masks (Eq. 4) and mergers of every bank, with importance bookkeeping."""

    def __init__(self, loras: LoRASet, config: UnZipLoRAConfig, device: torch.device, blocks: bool = True):
        self.config = config
        self.blocks = blocks  # block separation applies (SDXL); scale-wise models separate by scale instead
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
        # what the masks give until they change (each recalibration): columns, their complement, the
        # merger-gradient filters; keyed by the mask tensors and their in-place versions
        self._cache: dict[tuple[str, ...], tuple[tuple, torch.Tensor]] = {}

    def _full_block(self, name: str, adapter: str) -> bool:
        cfg = self.config
        if not cfg.column_separation:
            return True
        if not cfg.block_separation or not self.blocks:
            return False
        blocks = cfg.content_blocks if adapter == "content" else cfg.style_blocks
        return block_of(name) in blocks

    @property
    def rounds_done(self) -> int:
        return int(self.buffers["rounds_done"].item())

    def _cached(self, name: tuple[str, ...], sources: Sequence[torch.Tensor],
                make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``make()``, computed again only when one of the ``sources`` buffers was replaced or changed in
        place (its version), never kept from inside a CUDA graph capture (whose kernels run only on replay)."""
        stamp = tuple((id(t), t._version) for t in sources)
        hit = self._cache.get(name)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = make()
        if not (value.is_cuda and torch.cuda.is_current_stream_capturing()):
            self._cache[name] = (stamp, value)
        return value

    def _mask_buffers(self, key: str, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.buffers[f"{key}.{adapter}.mask"], self.buffers[f"{key}.{adapter}.full"]

    def columns(self, key: str, adapter: str) -> torch.Tensor:
        """(N, out) 0/1: the columns an adapter uses, its mask or every column in its block-separated layers
        (computed once per mask; do not modify it)."""
        mask, full = self._mask_buffers(key, adapter)
        return self._cached(("columns", key, adapter), (mask, full), lambda: torch.maximum(mask, full.unsqueeze(-1)))

    def other_columns(self, key: str, adapter: str) -> torch.Tensor:
        """(N, out) 0/1: ``1 - columns``, the columns outside what an adapter uses (computed once per mask)."""
        return self._cached(("rest", key, adapter), self._mask_buffers(key, adapter),
                            lambda: 1 - self.columns(key, adapter))

    def merger_grad_filter(self, key: str, adapter: str) -> torch.Tensor:
        """(N, out) 0/1: where ``merger_update`` lets the adapter's merger gradient through (once per mask)."""
        if self.config.merger_update != "overlap":
            return self.columns(key, adapter)
        sources = (*self._mask_buffers(key, "content"), *self._mask_buffers(key, "style"))
        return self._cached(("overlap", key), sources,
                            lambda: self.columns(key, "content") * self.columns(key, "style"))

    def gates(self, key: str, bank: LoRABank) -> dict[str, torch.Tensor | None]:
        """g = m ⊙ mask per adapter; block-separated layers use every column."""
        return {a: self.mergers[f"{key}.{a}"] * self.columns(key, a) for a in ADAPTERS}

    def all_gates(self, loras: LoRASet) -> dict[str, dict[str, torch.Tensor | None]]:
        """:meth:`gates` of every bank, by bank key: one step's gates, for ``LoRASet.prepare`` and L⊥ alike."""
        return {key: self.gates(key, bank) for key, bank in loras.banks.items()}

    def mask_gates(self, key: str, bank: LoRABank) -> dict[str, torch.Tensor | None]:
        """The column masks alone (what the official code writes into a single LoRA file)."""
        return {a: self.columns(key, a) for a in ADAPTERS}

    def mask_merger_grads(self) -> None:
        """Let merger gradients through only where ``merger_update`` allows: by default where both LoRAs
        use the column (official code); ``mask``: on each LoRA's own columns. Graph-safe (no host sync);
        one multiply for all mergers."""
        grads, filters = [], []
        for name, merger in self.mergers.items():
            if merger.grad is not None:
                key, a = name.rsplit(".", 1)
                grads.append(merger.grad)
                filters.append(self.merger_grad_filter(key, a))
        if grads:
            torch._foreach_mul_(grads, filters)

    def orthogonality_loss(self, loras: LoRASet,
                           gates: dict[str, dict[str, torch.Tensor | None]] | None = None) -> torch.Tensor:
        """Eq. 5: L⊥ = Σ_i |m_c^i · m_s^i| (mean over layers and columns, as the official code); ``gates``:
        this step's :meth:`all_gates`, if already computed (the same values; masks are 0/1, so the mergers'
        gradients are bitwise those of gates computed twice)."""
        terms = []
        for key, bank in loras.banks.items():
            g = gates[key] if gates is not None else self.gates(key, bank)
            terms.append((g["content"] * g["style"]).abs().mean(-1))  # type: ignore[operator]
        return torch.cat(terms).mean()

    def accumulate_importance(self, loras: LoRASet) -> None:
        """Cone-style importance of each column from ΔW ⊙ ∂L/∂ΔW recorded in the last backward."""
        thr = self.config.importance_threshold
        for key, bank in loras.banks.items():
            for rows, a, delta, grad in bank.delta_gradients():
                score = (delta * grad).abs()  # (n, out, in)
                frac = (score > thr).float().mean(-1)
                mag = score.mean(-1)
                # fraction of salient entries per column; mean magnitude (over the layer's max) breaks ties
                imp = frac + 1e-5 * mag / (mag.amax(-1, keepdim=True) + 1e-30)
                self.buffers[f"{key}.{a}.importance"][rows] += imp.to(self.buffers[f"{key}.{a}.importance"].device)

    def recalibrate(self, loras: LoRASet) -> None:
        """Add the next N/rounds % most important columns to each mask.

        Where both LoRAs are masked the masks stay disjoint (content picks first, style from the rest).
        In a block-separated layer the LoRA that uses every column takes no mask and excludes nothing:
        the masked LoRA picks its most important columns among all of them (official code).
        """
        cfg = self.config
        for key, bank in loras.banks.items():
            k = max(1, round(bank.out_features * cfg.column_fraction / cfg.rounds))
            for a in ADAPTERS:
                other = "style" if a == "content" else "content"
                rows = torch.nonzero(self.buffers[f"{key}.{a}.full"] == 0).squeeze(1)  # layers where `a` is masked
                if rows.numel():
                    mask = self.buffers[f"{key}.{a}.mask"]
                    other_full = self.buffers[f"{key}.{other}.full"][rows].unsqueeze(-1) > 0
                    taken = (self.buffers[f"{key}.{other}.mask"][rows] > 0) & ~other_full
                    excluded = (mask[rows] > 0) | taken
                    imp = self.buffers[f"{key}.{a}.importance"][rows].masked_fill(excluded, -float("inf"))
                    free = int((~excluded).sum(-1).min().item())
                    if free > 0:
                        idx = imp.topk(min(k, free), dim=-1).indices
                        mask[rows] = mask[rows].scatter(-1, idx, 1.0)
                self.buffers[f"{key}.{a}.importance"].zero_()
        self.buffers["rounds_done"] += 1

    def export_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"merger.{k}": v.detach() for k, v in self.mergers.items()}
        out.update({k: v for k, v in self.buffers.items() if k.endswith((".mask", ".full"))})
        return out

    def export_mergers(self, loras: LoRASet) -> dict[str, torch.Tensor]:
        """Merger vectors by layer: ``{prefix}.{layer}.merger_{adapter}`` -> (out,) (official: ``merge_<key>``)."""
        out = {}
        for key, bank in loras.banks.items():
            for a in ADAPTERS:
                merger = self.mergers[f"{key}.{a}"].detach().float()
                for i, name in enumerate(bank.names):
                    out[f"{loras.prefix}.{name}.merger_{a}"] = merger[i].clone()
        return out


class UnZipLoRATrainer:
    """One UnZipLoRA training run on a backbone: LoRAs injected, masks, optimiser, the step.

    ``step(i)`` runs warm-up steps (full LoRAs, importance scoring) for ``i < warmup``, then the
    masked steps with recalibration every ``t`` steps; it returns the losses to log.
    """

    compiler: CompiledForward | None = None

    def __init__(self, backbone: DiffusionBackbone, cfg: UnZipLoRAConfig, latents: torch.Tensor,
                 cond: PromptEmbeds, cond_c: PromptEmbeds, cond_s: PromptEmbeds, *,
                 lora_generator: torch.Generator | None = None, noise: torch.Generator | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 cuda_graph: bool = False, compiler: CompiledForward | None = None):
        self.backbone, self.cfg = backbone, cfg
        self.noise = noise if noise is not None else torch.Generator().manual_seed(0)
        self.autocast = autocast
        #: the UNet compiled (masked steps; scoring passes run its plain forward), or None
        self.compiler = compiler
        names = target_linears(backbone)
        split = [n for n in names if is_cross_attention_kv(n)] if cfg.prompt_separation else []
        # on GPUs the adapters are folded into the weights once per step (see cstoolkit.lora)
        init = "gaussian" if cfg.init == "auto" else cfg.init  # official: A and B both random
        self.loras = LoRASet(backbone.unet, names, cfg.rank, ADAPTERS, init=init, init_std=cfg.init_std,
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
        self._masked = graph_steps(cuda_graph, {"masked": compiled_step(compiler, self._masked_step)},
                                   before_capture=lambda: drop_step_tensors(self.loras, self.optimizer))["masked"]

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
        with uncompiled(self.compiler):
            loss = self.diffusion_loss()
            loss.backward()
        self.masks.accumulate_importance(self.loras)
        self.loras.set_record_delta(False)
        self.loras.release()  # ΔW / merged W and their gradients: not beside the next step's (or graph's) memory
        return loss

    def is_scoring(self, step: int) -> bool:
        """Whether step ``step`` scores columns (a warm-up step or a recalibration)."""
        cfg = self.cfg
        t = step - self.warmup
        return step < self.warmup or (cfg.column_separation and t > 0 and t % cfg.recalibrate_every == 0
                                      and t // cfg.recalibrate_every < cfg.rounds)

    def phase_of(self, step: int) -> str:
        """Name of the phase step ``step`` belongs to (for the run's phase timer)."""
        if step < self.warmup:
            return "warmup"
        if self.is_scoring(step):
            return "recalibrate"
        graphed = isinstance(self._masked, GraphedStep)
        return "capture" if graphed and not self._masked.captured and not self._masked.failed else "train"

    @property
    def captured(self) -> bool:
        """Whether the masked step now replays a captured CUDA graph."""
        return isinstance(self._masked, GraphedStep) and self._masked.captured

    def release(self) -> None:
        """Free the masked step's CUDA graph and what lives in its memory pool (merged weights, gradients),
        so the pool can go back to the driver: before an eager scoring pass, and when training is over."""
        drop_step_tensors(self.loras, self.optimizer)
        release_graphs(self._masked)

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
            # the eager scoring pass needs its own activations and every ΔW with its gradient: free the
            # masked step's graph pool first (it is captured again, without warm-up, on the next call),
            # so the two never sit side by side in GPU memory
            self.release()
            self._scored_backward()  # scoring pass only: no update
            self.optimizer.zero_grad(set_to_none=True)
            masks.recalibrate(self.loras)
        self.draw()
        return self._masked()

    def prepare_masked(self) -> dict[str, dict[str, torch.Tensor | None]]:
        """Fold this step's gates (Eq. 4) and :meth:`extra_gates` into the banks; returns the gates (by bank
        key) for L⊥."""
        gates = self.masks.all_gates(self.loras)
        self.loras.prepare(self.dtype, lambda key, bank: gates[key], self.extra_gates())
        return gates

    def extra_gates(self) -> Callable[[str, LoRABank], dict[str, torch.Tensor]] | None:
        """Per-bank extra gates on token-weighted tokens (``LoRASet.prepare``); none on SDXL."""
        return None

    def _masked_step(self) -> dict[str, torch.Tensor]:
        """Eq. 4 gates, denoising loss + λ⊥ L⊥ (Eq. 5), Adam, mergers clamped to [0, 1]."""
        masks = self.masks
        gates = self.prepare_masked()
        loss_db = self.diffusion_loss()
        loss_ortho = masks.orthogonality_loss(self.loras, gates)
        del gates
        loss = loss_db + self.cfg.ortho_weight * loss_ortho
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            masks.mask_merger_grads()
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_clamp_min_(list(masks.mergers.values()), 0.0)
            torch._foreach_clamp_max_(list(masks.mergers.values()), 1.0)
        return {"loss": loss_db.detach(), "ortho": loss_ortho.detach()}


class ScaleWiseUnZipLoRATrainer(UnZipLoRATrainer):
    """UnZipLoRA on a scale-wise transformer: the teacher-forcing cross-entropy as the loss, prompt
    separation in the cross-attention k/v, column masks, and scale separation in place of blocks."""

    def __init__(self, backbone: ScaleWiseBackbone, cfg: UnZipLoRAConfig, image: str, prompts: Sequence[str], *,
                 lora_generator: torch.Generator | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 merge: bool | None = None, merge_segments: bool = False, cuda_graph: bool = False):
        """``merge``: fold the LoRAs into the frozen weights once per step (``LoRASet``; default: on CUDA);
        ``merge_segments``: merged, the scale-separated image-token layers too, one weight per scale group
        (one GEMM per group's tokens; off: they run unmerged, three GEMMs forward); ``cuda_graph`` (CUDA only,
        a no-op elsewhere): the masked step is captured once as a CUDA graph and replayed, as on SDXL (the
        image and the three prompts never change; released before each recalibration's scoring pass)."""
        from .csd_var import scale_groups

        self.backbone, self.cfg, self.autocast = backbone, cfg, autocast  # type: ignore[assignment]
        self.noise = torch.Generator().manual_seed(0)  # teacher forcing draws nothing; kept for the checkpoint
        self.targets = load_target(backbone, image, "inputs.image")
        schedule = self.targets.schedule
        default_style, _ = backbone.scale_groups(len(schedule))
        self.style_scales, self.content_scales = scale_groups(
            len(schedule), cfg.style_scales if cfg.style_scales is not None else default_style, cfg.content_scales)
        names = backbone.adapter_targets(ffn=cfg.ffn)
        text_layers = backbone.text_projections()
        split = text_layers if cfg.prompt_separation else []
        model = backbone.lora_model()
        init = "gaussian_a" if cfg.init == "auto" else cfg.init  # B zero: the scale-wise LoRAs start as the base
        self.loras = LoRASet(model, names, cfg.rank, ADAPTERS, init=init, init_std=cfg.init_std,
                             generator=lora_generator, split_input=split, apart=text_layers,
                             merge=backbone.device.type == "cuda" if merge is None else merge,
                             merge_segments=merge_segments, prefix=PEFT_PREFIX).inject()
        with torch.no_grad():  # x, x_c, x_s in one batch: one padded length
            texts = backbone.encode_text(list(prompts))
            self.text = texts.index(slice(0, 1))
            if split:
                # Eq. 3: in cross-attention k/v each LoRA reads what the layer reads for its own prompt
                inputs = backbone.text_projection_inputs(texts)
                shared: dict[int, torch.Tensor] = {}
                for name in split:
                    x = inputs[name]
                    lora_input = shared.setdefault(id(x), torch.cat([x[1:2], x[2:3]], dim=-1).contiguous())
                    self.loras.layers[name].lora_input = lora_input
                for lora_input in shared.values():
                    users = [n for n in split if self.loras.layers[n].lora_input is lora_input]
                    self.loras.set_shared_input(users, lora_input)
        self.relax = cfg.scale_separation and cfg.column_separation
        if self.relax:  # per token: 1 where the token's scale is in the adapter's own group
            self.image_layers = [n for n in names if n not in text_layers]
            weights = group_weights(schedule, [self.content_scales, self.style_scales], backbone.device)
            self.loras.set_token_weights(weights, self.image_layers)
        self.masks = ColumnMasks(self.loras, cfg, backbone.device, blocks=False)
        lora_params = [p for bank in self.loras.banks.values() for p in (bank.lora_A, bank.lora_B)]
        graphed = cuda_graph and cuda_graphs_available(backbone.device)
        self.optimizer = torch.optim.Adam([{"params": lora_params, "lr": cfg.lr},
                                           {"params": list(self.masks.mergers.values()), "lr": cfg.merger_lr}],
                                          capturable=graphed, fused=backbone.device.type == "cuda" or None)
        self.dtype = backbone.weight_dtype  # the projections' (the transformer's first parameter may be float32)
        self.warmup = cfg.warmup_steps if cfg.column_separation else 0
        # teacher forcing draws nothing and reads fixed tensors (targets, text, the banks' shared inputs), so
        # the masked step can be captured once and replayed (the eager function where graphs are off)
        self._masked = graph_steps(graphed, {"masked": self._masked_step},
                                   before_capture=lambda: drop_step_tensors(self.loras, self.optimizer))["masked"]

    def draw(self) -> None:
        """Teacher forcing has no noise to draw."""

    def diffusion_loss(self) -> torch.Tensor:
        """The teacher-forcing cross-entropy of the full prompt over all scales."""
        with self.autocast():
            logits = self.backbone.teacher_forcing_logits(self.text, self.targets)  # type: ignore[attr-defined]
        return self.backbone.teacher_forcing_loss(logits, self.targets)  # type: ignore[attr-defined]

    def relaxed(self, key: str, bank: LoRABank) -> dict[str, torch.Tensor]:
        """Extra gates on the own scales' tokens: the merger on the columns outside the mask."""
        masks = self.masks
        return {a: masks.mergers[f"{key}.{a}"] * masks.other_columns(key, a) for a in ADAPTERS}

    def extra_gates(self) -> Callable[[str, LoRABank], dict[str, torch.Tensor]] | None:
        """Scale separation: :meth:`relaxed` on the own scales' tokens."""
        return self.relaxed if self.relax else None

    def export(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, str]]]:
        """The two LoRAs (PEFT layout) and, with scale separation, the gates of the other group's scales.

        A LoRA file holds what the LoRA applies on its own scales (every column of the image-token layers,
        the mask on the text layers); ``unziplora/scale_gates.safetensors`` holds, per image-token layer,
        the column mask it applies on the other group's scales."""
        masks, loras, cfg = self.masks, self.loras, self.cfg
        single = masks.gates if cfg.fold_mergers else masks.mask_gates

        def own_scales(key: str, bank: LoRABank) -> dict[str, torch.Tensor | None]:
            if not self.relax or bank.token_weights is None:
                return single(key, bank)
            return {a: (masks.mergers[f"{key}.{a}"] if cfg.fold_mergers else None) for a in ADAPTERS}

        files, meta = {}, {}
        for a in ADAPTERS:
            state = loras.export(a, own_scales)
            files[adapter_file(a)], meta[adapter_file(a)] = state, peft_metadata(state)
        if self.relax:
            gates = {}
            for key, bank in loras.banks.items():
                if bank.token_weights is None:
                    continue
                for a in ADAPTERS:
                    cols = masks.columns(key, a).detach().float()
                    for i, name in enumerate(bank.names):
                        gates[f"{name}.other_scales_{a}"] = cols[i].clone()
            files[SCALE_GATES_FILE] = gates
        return files, meta


@register_method
class UnZipLoRA(Method):
    """Content and style LoRAs trained jointly from one image (SDXL, Infinity, Switti)."""

    name = "unziplora"
    summary = "Content and style LoRAs trained jointly from one image (prompt, column and block/scale separation)"
    paper = "Liu et al., UnZipLoRA: Separating Content and Style from a Single Image, CVPR 2025"
    family = "diffusion|scalewise"
    families = ("diffusion", "scalewise")
    Config = UnZipLoRAConfig
    Inputs = UnZipLoRAInputs
    GenerateConfig = UnZipLoRAGenerateConfig

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
    def fit(self, backbone: Backbone, inputs: UnZipLoRAInputs, runtime: Runtime) -> Decomposition:
        if isinstance(backbone, ScaleWiseBackbone):
            return self.fit_scalewise(backbone, inputs, runtime)
        assert isinstance(backbone, DiffusionBackbone)
        cfg = self.config
        with compiled_unet(backbone, runtime, steps=cfg.steps, label=self.name) as compiler:
            with runtime.phase("setup"):  # image latents, the three prompts, LoRAs injected
                unload_loras(backbone)
                latents = image_latents(backbone, inputs.image, "inputs.image")
                prompts = self.training_prompts(inputs)
                trainer = UnZipLoRATrainer(backbone, cfg, latents, *(backbone.encode_prompt([p]) for p in prompts),
                                           lora_generator=runtime.generator(1),
                                           noise=runtime.generator(2, device=backbone.device),
                                           autocast=runtime.autocast_for(backbone.unet),
                                           cuda_graph=runtime.use_cuda_graph, compiler=compiler)
            loop = runtime.train_loop("unziplora", trainer.warmup + cfg.steps, trainer.state(),
                                      warmup=trainer.warmup)
            try:
                for step in loop:
                    # warmup, capture, train, recalibrate (and, compiled, .../compile: the first masked step)
                    runtime.phases.switch(trainer.phase_of(step))
                    loop.log(**trainer.step(step))
            finally:
                trainer.release()
                trainer.loras.remove()

        loras, masks = trainer.loras, trainer.masks
        meta_file = loras.diffusers_metadata()
        # single files: up ⊙ mask (official code) or up ⊙ mask ⊙ merger (fold_mergers); mergers kept by layer
        single = masks.gates if cfg.fold_mergers else masks.mask_gates
        return Decomposition(
            method=self.name,
            files={
                f"content/{LORA_FILE}": loras.export("content", single),
                f"style/{LORA_FILE}": loras.export("style", single),
                "unziplora/masks.safetensors": masks.export_tensors(),
                MERGERS_FILE: masks.export_mergers(loras),
            },
            placeholders=self.placeholders(inputs),
            meta={"training_prompts": list(prompts), "target_modules": len(loras.names),
                  "mask_rounds": masks.rounds_done, "steps": cfg.steps, "class_word": inputs.content,
                  "mergers_folded": cfg.fold_mergers},
            file_metadata={f"content/{LORA_FILE}": meta_file, f"style/{LORA_FILE}": meta_file},
        )

    def fit_scalewise(self, backbone: ScaleWiseBackbone, inputs: UnZipLoRAInputs, runtime: Runtime
                      ) -> Decomposition:
        """UnZipLoRA on a scale-wise transformer (:class:`ScaleWiseUnZipLoRATrainer`)."""
        cfg = self.config
        with runtime.phase("setup"):
            backbone.freeze()
            prompts = self.training_prompts(inputs)
            trainer = ScaleWiseUnZipLoRATrainer(backbone, cfg, inputs.image, prompts,
                                                lora_generator=runtime.generator(1), autocast=runtime.autocast,
                                                merge_segments=cfg.merge_scale_groups,
                                                cuda_graph=runtime.use_cuda_graph)
        loop = runtime.train_loop("unziplora", trainer.warmup + cfg.steps, trainer.state())
        try:
            for step in loop:
                runtime.phases.switch(trainer.phase_of(step))
                out = trainer.step(step)
                loop.log(**{k: float(v) for k, v in out.items()})
        finally:
            trainer.release()
            trainer.loras.remove()
        files, file_metadata = trainer.export()
        files["unziplora/masks.safetensors"] = trainer.masks.export_tensors()
        files[MERGERS_FILE] = trainer.masks.export_mergers(trainer.loras)
        return Decomposition(
            method=self.name, files=files, placeholders=self.placeholders(inputs), file_metadata=file_metadata,
            meta={"training_prompts": list(prompts), "target_modules": len(trainer.loras.names),
                  "mask_rounds": trainer.masks.rounds_done, "steps": cfg.steps, "class_word": inputs.content,
                  "mergers_folded": cfg.fold_mergers, "layout": "peft",
                  "scale_separation": trainer.relax, "style_scales": trainer.style_scales,
                  "content_scales": trainer.content_scales})

    # ------------------------------------------------------------------------------ generate
    def generate(self, backbone: Backbone, decomposition: Decomposition, prompts: Sequence[str], use: str,
                 *, num_images: int = 1, seed: int = 0, options: Any = None, progress: bool = True) -> list[list[Any]]:
        """The content LoRA, the style LoRA, or both: added on one prompt (``both_mode: merge``, the paper's
        direct arithmetic merge, Fig. 2) or with prompt separation and the mergers (``separate``, the
        official inference script; SDXL only)."""
        options = options or UnZipLoRAGenerateConfig()
        if isinstance(backbone, ScaleWiseBackbone):
            return generate_scalewise(backbone, decomposition, prompts, use, num_images=num_images, seed=seed,
                                      options=options, progress=progress)
        assert isinstance(backbone, DiffusionBackbone)
        if use == "both" and getattr(options, "both_mode", "merge") == "separate":
            return generate_separated(backbone, decomposition, prompts, num_images=num_images, seed=seed,
                                      options=options, progress=progress)
        loras = loras_for_use(decomposition, use)
        if uniform_rank(loras) is None:  # e.g. a cross-combination with another method's LoRA
            return generate_with_loras(backbone, decomposition, prompts, use, num_images=num_images, seed=seed,
                                       options=options, progress=progress)
        return sample_with_lora_layers(backbone, loras, prompts, decomposition.placeholders, num_images=num_images,
                                       seed=seed, options=options, progress=progress)


# ---------------------------------------------------------------------------------- "both", separated
_STYLE_PHRASE = re.compile(r"\s*\bin\s+(?:an?\s+|the\s+)?<s>(?:\s+style)?", re.IGNORECASE)


def separated_prompts(prompt: str, placeholders: dict[str, str], class_word: str) -> tuple[str, str, str]:
    """(x, x_c, x_s) of a "both" prompt for prompt-separated sampling, as the official inference script's
    prompts: x_c drops the style phrase ("A <c> in <s> style in a boat" -> "A <c> in a boat"), x_s names
    the subject by its class word only ("A balloon in <s> style in a boat")."""
    content = " ".join(_STYLE_PHRASE.sub("", prompt).replace(STYLE_TOKEN, "").split())
    style = prompt.replace(CONTENT_TOKEN, class_word) if class_word else prompt
    return tuple(expand_placeholders(p, placeholders) for p in (prompt, content, style))  # type: ignore[return-value]


def generate_separated(backbone: DiffusionBackbone, decomposition: Decomposition, prompts: Sequence[str], *,
                       num_images: int, seed: int, options: Any, progress: bool) -> list[list[Any]]:
    """ "both" as the official inference: K,V = W0ᵀx + m_s ΔW_sᵀx_s + m_c ΔW_cᵀx_c in cross-attention,
    m_s ΔW_s + m_c ΔW_c on the shared hidden states elsewhere (Eq. 3-4 at inference).

    The two LoRAs are read from the saved files (masks folded in), the mergers m from
    ``unziplora/mergers.safetensors`` (1 where a decomposition has none, e.g. a cross-combination, or
    where they are already folded into the files).
    """
    files = decomposition.files
    loras = {a: files[f"{a}/{LORA_FILE}"] for a in ADAPTERS}
    gates: dict[str, dict[str, torch.Tensor]] = {a: {} for a in ADAPTERS}
    if not decomposition.meta.get("mergers_folded"):
        for key, value in files.get(MERGERS_FILE, {}).items():
            layer, _, tail = key.rpartition(".merger_")
            if tail in gates:
                gates[tail][layer.split(".", 1)[1]] = value  # "unet.<module>" -> "<module>"
    class_word = str(decomposition.meta.get("class_word", ""))

    def prompts_of(prompt: str) -> tuple[str, dict[str, str]]:
        x, x_c, x_s = separated_prompts(prompt, decomposition.placeholders, class_word)
        return x, {"content": x_c, "style": x_s}

    return sample_with_lora_layers(backbone, loras, prompts, decomposition.placeholders, num_images=num_images,
                                   seed=seed, options=options, progress=progress, gates=gates,
                                   prompts_of=prompts_of)


def generate_scalewise(backbone: ScaleWiseBackbone, decomposition: Decomposition, prompts: Sequence[str], use: str,
                       *, num_images: int, seed: int, options: Any, progress: bool) -> list[list[Any]]:
    """The LoRAs of ``use`` added on the prompt; with scale separation each LoRA applies its column mask
    on the scales of the other group (``unziplora/scale_gates.safetensors``) and every column on its own."""
    if use == "both" and getattr(options, "both_mode", "merge") == "separate":
        raise UserError("generate.both_mode", "'separate' is not available on scale-wise backbones",
                        "both_mode: merge (the two LoRAs added on one prompt)")
    loras = role_loras(decomposition.files, use)
    other = decomposition.files.get(SCALE_GATES_FILE)
    scale_gates = None
    if other and decomposition.meta.get("scale_separation"):
        own = {"content": set(decomposition.meta.get("content_scales") or []),
               "style": set(decomposition.meta.get("style_scales") or [])}
        per_role: dict[str, dict[str, torch.Tensor]] = {a: {} for a in ADAPTERS}
        for key, value in other.items():
            layer, _, role = key.rpartition(".other_scales_")
            if role in per_role:
                per_role[role][layer] = value

        def scale_gates(scale: int) -> dict[str, dict[str, torch.Tensor]]:
            return {r: per_role[r] for r in loras if scale not in own[r]}

    return sample_scalewise(backbone, loras, prompts, decomposition.placeholders, num_images=num_images, seed=seed,
                            options=options, progress=progress, scale_gates=scale_gates)
