"""Break-for-Make: modular low-rank adaptations for composable content-style customization (Xu et al., 2024).

**Break.** Every LoRA ``ΔW = W_up W_down`` (``W_up``: m x r = ``lora_B``, ``W_down``: r x n =
``lora_A``) is a *partly learnable projection* (PLP, Sec. 4.1): ``W_up = [A; B]`` split by rows and
``W_down = [C D]`` split by columns (Eq. 4-7), so that ``ΔW = [[AC, AD], [BC, BD]]`` (Eq. 8-13).
A and C (the first ``d`` rows / columns) are frozen and initialised orthogonal, ``A·C = 0``
(Eq. 14-15): ``ΔW = [[0, AD], [BC, BD]]`` (Eq. 16). The content LoRA_c trains B on the content
image(s); the style LoRA_s trains D on the style image(s). Multi-correspondence projection (MCP,
Sec. 4.2, Eq. 17): the content stage also fits n other styles through D, the style stage n other
contents through B, so neither concept binds to one partner.

**Make.** LoRA_f = the up projection of LoRA_c with the down projection of LoRA_s (Sec. 4.2,
"Inference"), fine-tuned for a few dozen steps on the content and the style images.

Three resumable stages (``content``, ``style``, ``make``); the three LoRAs are saved in diffusers'
layout: ``content/`` (content alone), ``style/`` (style alone), ``fused/`` (both).

On the scale-wise backbones (Infinity, Switti) the same PLP LoRA sits on the transformer's attention
projections (official module names; ``params.ffn`` adds the FFN) and every stage trains with the
teacher-forcing cross-entropy over all scales in place of the denoising loss. In a layer that computes
several projections at once (q|k|v, k|v: ``ScaleWiseBackbone.fused_projections``) each projection's rows
are split as a layer of its own, as SDXL's separate ``to_q/to_k/to_v`` are. The three LoRAs are saved in
PEFT's layout (``content/adapter_model.safetensors`` ...; ``methods/_scalewise_lora.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import torch

from cstoolkit.backbone import Backbone, DiffusionBackbone, ScaleTargets, ScaleWiseBackbone, TextContext
from cstoolkit.compile import CompiledForward
from cstoolkit.cuda_graph import graph_steps, on_capture_stream, release_graphs
from cstoolkit.decomposition import Decomposition
from cstoolkit.errors import UserError
from cstoolkit.lora import LoRASet, lora_state_dict_to_layers
from cstoolkit.method import CONTENT_TOKEN, STYLE_TOKEN, Method
from cstoolkit.phases import free_cuda_memory
from cstoolkit.registry import register_method
from cstoolkit.runtime import Runtime, TrainState

from ._lora_sampling import sample_with_lora_layers, uniform_rank
from ._scalewise_lora import (
    ADAPTER_FILE,
    PEFT_PREFIX,
    LoRAGenerateConfig,
    adapter_file,
    load_target,
    peft_metadata,
    sample_scalewise,
)
from ._sdxl_lora import (
    LORA_FILE,
    StaticBatch,
    TrainingImages,
    compiled_step,
    compiled_unet,
    drop_step_tensors,
    embeds_cat,
    generate_with_loras,
    loras_for_use,
    target_linears,
    unload_loras,
)

ADAPTER = "plp"
STAGES = ("content", "style", "make")
CONTENT_FILE, STYLE_FILE, FUSED_FILE = (f"{role}/{LORA_FILE}" for role in ("content", "style", "fused"))
#: the same three LoRAs on the scale-wise backbones (PEFT layout)
CONTENT_PEFT, STYLE_PEFT, FUSED_PEFT = (adapter_file(role) for role in ("content", "style", "fused"))
#: rows of the official code's shared orthonormal basis (its ``max_features``: SDXL's widest layer)
OFFICIAL_BASIS_ROWS = 1280

Half = Literal["up", "down"]


@dataclass
class BreakForMakeConfig:
    """Hyper-parameters; defaults are the paper's (Sec. 5: SDXL, rank 64, lr 1e-4, batch 1; Sec. 5.7: d = 1/2)
    and, where the paper is silent, the official code's (1000 steps per stage)."""

    rank: int = field(default=64, metadata={"min": 2})
    lr: float = field(default=1e-4, metadata={"min": 0.0, "help": "Adam learning rate of a concept's own half"})
    steps: int = field(default=1000, metadata={"min": 1, "help": "steps of the content stage and of the style stage"})
    ratio: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0,
                                                "help": "d: fraction of W_up's rows and W_down's columns frozen"})
    init: Literal["full_rank", "orthogonal", "official", "random"] = field(default="full_rank", metadata={
        "help": "frozen halves: full_rank (A and Cᵀ disjoint rows of one orthonormal basis per layer, both of rank r, "
                "A·C small but not 0; the trainable down half starts at N(0, init_std), as the official code), "
                "orthogonal (Eq. 14-15 exactly: A·C = 0, which leaves A and C rank r/2 each), official (the code: "
                "basis rows only in square q/k/v layers) or random (the 'w/o Orth' ablation)"})
    init_std: float | None = field(default=None, metadata={"help": "std of A and C entries; default 1/rank"})
    mcp: bool = field(default=True, metadata={"help": "multi-correspondence projection (Eq. 17)"})
    mcp_schedule: Literal["all", "cycle"] = field(default="all", metadata={
        "help": "all: the n other images every step (Eq. 17); cycle: one of them per step, in turn"})
    mcp_lr: float | None = field(default=None, metadata={
        "min": 0.0, "help": "learning rate of the half MCP trains; default lr (the official code: 1e-5)"})
    content_projection: Literal["up", "down"] = field(default="up", metadata={
        "help": "the half content trains: up (paper: B of W_up) or down (official code); style trains the other"})
    make_steps: int = field(default=50, metadata={"min": 0, "help": "fine-tuning steps of LoRA_f ('a few dozen')"})
    micro_batch: int = field(default=1, metadata={
        "min": 0, "help": "SDXL: images per forward/backward in multi-image steps (MCP over all n, make); gradients "
                          "are accumulated, so the update is the same; 1 = the paper's batch 1 and the memory of one "
                          "image, 0 = all at once (scale-wise backbones: always one image per pass)"})
    make_lr: float | None = field(default=None, metadata={"min": 0.0, "help": "default lr"})
    content_prompt: str = "A {content}"
    style_prompt: str = "An image in {style} style"
    both_prompt: str = field(default="A {content} in {style} style", metadata={
        "help": "caption of an MCP image whose entry names its other factor too"})
    ffn: bool = field(default=False, metadata={"help": "scale-wise backbones: the PLP LoRA also adapts the FFN "
                                                       "layers (default: attention q/k/v/out only)"})

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio (d) must lie strictly between 0 and 1, got {self.ratio}")


@dataclass
class StyleImage:
    """One image of the n other styles MCP fits in the content stage."""

    image: str = field(default="", metadata={"path": True, "image": True})
    style: str = field(default="", metadata={"help": "its style words, e.g. 'neon glow'"})
    content: str = field(default="", metadata={
        "help": "what it shows, e.g. 'christmas tree' (optional): the caption then names both, as the official "
                "examples do ('A Christmas tree in w@z sticker style'), so its content is not learned as style"})

    def __post_init__(self) -> None:
        if not self.image or not self.style:
            raise ValueError("each entry needs an image and its style words")


@dataclass
class ContentImage:
    """One image of the n other contents MCP fits in the style stage."""

    image: str = field(default="", metadata={"path": True, "image": True})
    content: str = field(default="", metadata={"help": "its class word, e.g. 'house'"})
    style: str = field(default="", metadata={
        "help": "its style words, e.g. 'photo' or 'mosaic' (optional): the caption then names both, as the official "
                "examples do ('A photo of snq teapot'), so its style is not learned as content"})

    def __post_init__(self) -> None:
        if not self.image or not self.content:
            raise ValueError("each entry needs an image and its class word")


@dataclass
class BreakForMakeInputs:
    """Content image(s) with a class word, style image(s) with style words, and MCP's other styles and contents."""

    content_images: list[str] = field(default_factory=list, metadata={"path": True, "image": True})
    content: str = field(default="", metadata={"help": "class word of the content, e.g. 'teddybear'"})
    style_images: list[str] = field(default_factory=list, metadata={"path": True, "image": True})
    style: str = field(default="", metadata={"help": "style words, e.g. 'watercolor painting'"})
    mcp_styles: list[StyleImage] = field(default_factory=list, metadata={
        "help": "n other styles the content stage fits through D (paper: five)"})
    mcp_contents: list[ContentImage] = field(default_factory=list, metadata={
        "help": "n other contents the style stage fits through B (paper: five)"})
    content_token: str = field(default="sks", metadata={"help": "unique token before the class word"})
    style_token: str = field(default="w@z", metadata={"help": "unique token before the style words (official code)"})

    def __post_init__(self) -> None:
        for name in ("content_images", "style_images"):
            if not getattr(self, name):
                raise ValueError(f"inputs.{name} is required (a list of image paths)")
        for name in ("content", "style"):
            if not getattr(self, name):
                raise ValueError(f"inputs.{name} is required")


# ------------------------------------------------------------------------------------------ PLP
def frozen_dims(out_features: int, in_features: int, ratio: float) -> tuple[int, int]:
    """(d_up, d_down): frozen rows of W_up (A, Eq. 5) and frozen columns of W_down (C, Eq. 7)."""
    return max(1, min(out_features - 1, round(ratio * out_features))), \
        max(1, min(in_features - 1, round(ratio * in_features)))


def frozen_rows(out_features: int, ratio: float, parts: int = 1) -> torch.Tensor:
    """(m,) bool, True on the rows of W_up that are A (frozen, Eq. 5): the first d_up rows or, in a layer that
    computes ``parts`` projections at once (q|k|v: 3), the first d_up rows of each part, as if each part were
    a layer of its own (SDXL's separate to_q, to_k, to_v)."""
    if parts <= 1:
        return torch.arange(out_features) < frozen_dims(out_features, 2, ratio)[0]
    if out_features % parts:
        raise ValueError(f"{out_features} output features do not split into {parts} equal projections")
    size = out_features // parts
    return torch.arange(out_features) % size < frozen_dims(size, 2, ratio)[0]


def orthogonal_frozen_halves(n: int, d_up: int, d_down: int, rank: int, std: float,
                             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    # Eq. 14-15: A·C = 0. Per layer, an orthonormal basis of the rank space is split in two: the rows of
    # A lie in the span of the first half, the columns of C in the second, so A·C = 0 exactly.
    k = rank // 2
    q, _ = torch.linalg.qr(torch.randn(n, rank, rank, generator=generator, dtype=torch.float64))
    g_a = torch.randn(n, d_up, k, generator=generator, dtype=torch.float64) * std * (rank / k) ** 0.5
    g_c = torch.randn(n, rank - k, d_down, generator=generator, dtype=torch.float64) * std * (rank / (rank - k)) ** 0.5
    a = g_a @ q[:, :, :k].transpose(1, 2)  # (n, d_up, r)
    c = q[:, :, k:] @ g_c  # (n, r, d_down)
    return a.float(), c.float()


def full_rank_frozen_halves(n: int, d_up: int, d_down: int, rank: int, std: float,
                            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A (d_up x r) and Cᵀ (d_down x r) as the two disjoint row blocks of one orthonormal (d_up + d_down) x r basis
    per layer (the official code's construction, for every layer), scaled to entries of std ``std``.

    AᵀA + C Cᵀ = s² I: together the frozen halves span the rank space evenly, and each alone has rank r (when
    d_up, d_down >= r). A·C is not 0: A·C = 0 forces rank(A) + rank(C) <= r, which is why the exact
    construction (:func:`orthogonal_frozen_halves`) leaves each at r/2.
    """
    rows = d_up + d_down
    if rows < rank:
        raise ValueError(f"a layer with {d_up} + {d_down} frozen rows cannot hold a rank-{rank} basis")
    q, _ = torch.linalg.qr(torch.randn(n, rows, rank, generator=generator, dtype=torch.float64))
    q = q * (std * rows ** 0.5)  # entries of an orthonormal basis have std 1/sqrt(rows)
    return q[:, :d_up].float(), q[:, d_up:].transpose(1, 2).float()


def official_frozen_halves(names: Sequence[str], out_features: int, in_features: int, d_up: int, d_down: int,
                           rank: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The official code's init: where in == out (q/k/v), C^T and A are disjoint rows of one
    1280 x r orthonormal basis (A·C ≈ 0, not exactly); elsewhere A = 0 and C ~ N(0, 1/r)."""
    n = len(names)
    a = torch.zeros(n, d_up, rank)
    c = torch.randn(n, rank, d_down, generator=generator) / rank
    if out_features == in_features:
        rows = max(OFFICIAL_BASIS_ROWS, d_up + d_down)
        for i, name in enumerate(names):
            if name.endswith("to_out.0"):  # the code does not orthogonalise to_out
                continue
            basis, _ = torch.linalg.qr(torch.randn(rows, rank, generator=generator, dtype=torch.float64))
            perm = torch.randperm(rows, generator=generator)
            c[i] = basis[perm[:d_down]].T.float()
            a[i] = basis[perm[d_down:d_down + d_up]].float()
    return a, c


def recombine(up_from: dict[str, torch.Tensor], down_from: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Sec. 4.2 (Inference): LoRA_f = W_up of one LoRA with W_down of the other; for the paper's split,
    # ΔW_f = [A; B_c][C D_s] = [[0, A D_s], [B_c C, B_c D_s]]
    missing = sorted(set(up_from) ^ set(down_from))
    if missing:
        raise ValueError(f"the two LoRAs cover different layers (e.g. {missing[0]})")
    return {k: (up_from[k] if k.endswith(".lora_B.weight") else down_from[k]).clone() for k in up_from}


def same_frozen_halves(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], ratio: float,
                       parts: Mapping[str, int] | None = None) -> bool:
    """Whether two PLP LoRAs share A and C (same layers, rank, ratio and init seed): then they recombine.
    ``parts``: layers (key without ``.lora_B.weight``) computing several projections at once (:func:`frozen_rows`)."""
    if set(first) != set(second):
        return False
    for key, a in first.items():
        b = second[key]
        if a.shape != b.shape:
            return False
        if key.endswith(".lora_B.weight"):  # W_up (m x r): the frozen rows are A
            rows = frozen_rows(a.shape[0], ratio, (parts or {}).get(key[:-len(".lora_B.weight")], 1))
            if not torch.equal(a[rows], b[rows]):
                return False
        elif key.endswith(".lora_A.weight"):  # W_down (r x n): columns < d_down are C
            d = frozen_dims(2, a.shape[1], ratio)[1]
            if not torch.equal(a[:, :d], b[:, :d]):
                return False
    return True


# -------------------------------------------------------------------------------- the PLP LoRA
class PLPLoRA:
    """The PLP LoRA on named linear layers of a model, for either family: one adapter of ``cstoolkit.lora``
    banks, its frozen halves A and C drawn once (``initial``), the gradient masks of the trainable halves
    B and D (``masks``), loading, export, recombination and each stage's optimiser. The trainers add
    their data and steps (:class:`BreakForMakeTrainer`: SDXL; :class:`ScaleWiseBreakForMakeTrainer`)."""

    cfg: BreakForMakeConfig
    loras: LoRASet
    stage: str | None
    optimizer: torch.optim.Optimizer | None

    def _init_plp(self, model: torch.nn.Module, names: Sequence[str], cfg: BreakForMakeConfig, *,
                  prefix: str = "unet", merge: bool = False, parts: Mapping[str, int] | None = None,
                  lora_generator: torch.Generator | None = None) -> None:
        """Inject the PLP LoRA into ``model``'s layers ``names`` and draw its frozen halves from ``lora_generator``;
        ``parts``: layers computing several projections at once (:func:`frozen_rows`)."""
        self.cfg = cfg
        self.names = list(names)
        self.stage, self.optimizer = None, None
        # on GPUs the adapters are folded into the weights once per pass (see cstoolkit.lora)
        self.loras = LoRASet(model, self.names, cfg.rank, (ADAPTER,), init="zeros", merge=merge,
                             prefix=prefix).inject()
        self.masks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        std = cfg.init_std if cfg.init_std is not None else 1.0 / cfg.rank
        parts = parts or {}
        for key, bank in self.loras.banks.items():
            n, m, k, r = len(bank.names), bank.out_features, bank.in_features, cfg.rank
            d_down = frozen_dims(m, k, cfg.ratio)[1]
            up, down = torch.zeros(n, m, r), torch.zeros(n, r, k)  # W_up = [A; B], W_down = [C D]; B = D = 0
            layer_parts = [parts.get(name, 1) for name in bank.names]
            rows = {p: frozen_rows(m, cfg.ratio, p) for p in dict.fromkeys(layer_parts)}
            for p, frozen in rows.items():  # layers split alike are drawn together (SDXL: one group per bank)
                idx = [i for i, q in enumerate(layer_parts) if q == p]
                a, c, d0 = self._frozen_halves([bank.names[i] for i in idx], m, k, int(frozen.sum()), d_down, std,
                                               lora_generator)
                group_up, group_down = up[idx], down[idx]
                group_up[:, frozen], group_down[:, :, :d_down] = a, c
                if d0 is not None:
                    group_down[:, :, d_down:] = d0
                up[idx], down[idx] = group_up, group_down
            device = bank.lora_B.device
            self.initial[key] = (up.to(device), down.to(device))
            # trainable entries: B = the rows of W_up that are not A, D = columns >= d_down of W_down
            trainable = [~rows[p] for p in layer_parts]
            mask_up = trainable[0].view(1, m, 1) if len(rows) == 1 else torch.stack(trainable).view(n, m, 1)
            self.masks[key] = (mask_up.to(device), (torch.arange(k, device=device) >= d_down).view(1, 1, k))

    def _frozen_halves(self, names: Sequence[str], m: int, k: int, d_up: int, d_down: int, std: float,
                       generator: torch.Generator | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(A, C, D's start or None = 0) of the layers ``names`` (all m x k) under ``cfg.init``."""
        cfg, n, r = self.cfg, len(names), self.cfg.rank
        if cfg.init == "full_rank":
            a, c = full_rank_frozen_halves(n, d_up, d_down, r, std, generator)
        elif cfg.init == "orthogonal":
            a, c = orthogonal_frozen_halves(n, d_up, d_down, r, std, generator)
        elif cfg.init == "official":
            a, c = official_frozen_halves(names, m, k, d_up, d_down, r, generator)
        else:  # 'w/o Orth' (Sec. 5.7): random frozen halves
            a = torch.randn(n, d_up, r, generator=generator) * std
            c = torch.randn(n, r, d_down, generator=generator) * std
        if cfg.init == "official":  # the code starts the trainable down half from N(0, 1/r)
            return a, c, torch.randn(n, r, k - d_down, generator=generator) / r
        if cfg.init == "full_rank":  # ... and so does this init, at the chosen std
            return a, c, torch.randn(n, r, k - d_down, generator=generator) * std
        return a, c, None

    # ------------------------------------------------------------------------------ weights
    def own_half(self, concept: str) -> Half:
        """The half a concept trains: content B of W_up (paper) and style D of W_down, or swapped."""
        content = self.cfg.content_projection
        return content if concept == "content" else ("down" if content == "up" else "up")

    def load(self, state: dict[str, torch.Tensor] | None = None) -> None:
        """Set the LoRA to the PLP init (``None``) or to a saved state dict (its layout's prefix, scale 1)."""
        with torch.no_grad():
            if state is None:
                for key, bank in self.loras.banks.items():
                    up, down = self.initial[key]
                    bank.lora_B.copy_(up)
                    bank.lora_A.copy_(down)
                return
            layers = lora_state_dict_to_layers(state, self.loras.prefix)
            for bank in self.loras.banks.values():
                bank.load(ADAPTER, {name: layers[name] for name in bank.names})

    def export(self) -> dict[str, torch.Tensor]:
        """The LoRA as a state dict: diffusers' keys on SDXL, PEFT's on the scale-wise backbones."""
        return self.loras.export(ADAPTER)

    def train_halves(self, up: bool, down: bool) -> None:
        """Let gradients reach only B (``up``) and/or D (``down``); A and C never get one (Eq. 16)."""
        for key, bank in self.loras.banks.items():
            mask_up, mask_down = self.masks[key]
            bank.trainable_B = mask_up if up else False
            bank.trainable_A = mask_down if down else False

    def fused_start(self, content: dict[str, torch.Tensor], style: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """LoRA_f before fine-tuning: the content's own projection with the style's (Sec. 4.2)."""
        return recombine(content, style) if self.own_half("content") == "up" else recombine(style, content)

    # ------------------------------------------------------------------------------ stages
    def begin(self, stage: str, weights: dict[str, torch.Tensor] | None = None, *,
              capturable: bool = False) -> dict[str, torch.Tensor]:
        """Set the LoRA to ``stage``'s start (the PLP init, or ``weights``: LoRA_f for ``make``) and make the
        stage's Adam: the own half at ``lr``, the other at ``mcp_lr`` (make: both at ``make_lr``). Returns the
        parameters a checkpoint holds."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage}")
        cfg = self.cfg
        self.stage = stage
        self.load(weights)
        if stage == "make":
            lr_up = lr_down = cfg.make_lr if cfg.make_lr is not None else cfg.lr
        else:
            lr_other = cfg.mcp_lr if cfg.mcp_lr is not None else cfg.lr
            lr_up, lr_down = (cfg.lr, lr_other) if self.own_half(stage) == "up" else (lr_other, cfg.lr)
        banks = self.loras.banks
        cuda = next(iter(banks.values())).lora_B.device.type == "cuda"
        self.optimizer = torch.optim.Adam([{"params": [b.lora_B for b in banks.values()], "lr": lr_up},
                                           {"params": [b.lora_A for b in banks.values()], "lr": lr_down}],
                                          capturable=capturable, fused=cuda or None)
        return {**{f"plp.{k}.up": b.lora_B for k, b in banks.items()},
                **{f"plp.{k}.down": b.lora_A for k, b in banks.items()}}


def run_plp_stages(runtime: Runtime, trainer: Any, steps: Mapping[str, int]) -> dict[str, dict[str, torch.Tensor]]:
    """The three resumable stages of a trainer (``start``, ``step``, ``export``, ``finish``, ``fused_start``):
    LoRA_c and LoRA_s from the PLP init, then LoRA_f = W_up of LoRA_c with W_down of LoRA_s, fine-tuned.
    Returns {stage: LoRA state dict}."""
    loras: dict[str, dict[str, torch.Tensor]] = {}
    for offset, stage in enumerate(STAGES, start=2):
        with runtime.phase(stage):
            start = trainer.fused_start(loras["content"], loras["style"]) if stage == "make" else None
            loop = runtime.train_loop(stage, steps[stage], trainer.start(stage, runtime.generator(offset), start))
            for step in loop:
                loop.log(**trainer.step(step))
            loras[stage] = trainer.export()
            del loop
            trainer.finish()  # the stage's CUDA graph pool and optimiser states are freed here
    return loras


# ----------------------------------------------------------------------------------- SDXL trainer
@dataclass
class BreakForMakeData:
    """Training images of the three stages (latents with their prompts)."""

    content: TrainingImages
    style: TrainingImages
    mcp_styles: TrainingImages | None = None
    mcp_contents: TrainingImages | None = None


class BreakForMakeTrainer(PLPLoRA):
    """The PLP LoRA on every attention projection of the UNet and the steps of the three stages.

    ``start(stage, noise)`` sets the LoRA to the stage's starting point (the PLP init, or LoRA_f for
    ``make``) and returns the stage's :class:`TrainState`; ``step(i)`` runs one step of that stage.
    """

    def __init__(self, backbone: DiffusionBackbone, cfg: BreakForMakeConfig, data: BreakForMakeData | None = None, *,
                 lora_generator: torch.Generator | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 cuda_graph: bool = False, compiler: CompiledForward | None = None):
        self.backbone, self.data, self.autocast = backbone, data, autocast
        self.cuda_graph = cuda_graph
        self._init_plp(backbone.unet, target_linears(backbone), cfg, merge=backbone.device.type == "cuda",
                       lora_generator=lora_generator)
        self.dtype = backbone.weight_dtype
        self.noise = torch.Generator().manual_seed(0)
        # a step's images, prompts, noise and timesteps are copied into fixed tensors first, so that with
        # ``cuda_graph`` each stage's step is captured once and replayed
        self.batches: dict[str, StaticBatch] = {}
        if data is not None:
            self.batches["own"] = StaticBatch(backbone, *data.content.pick(0))
            self.batches["make"] = StaticBatch(backbone, *self._make_batch(0))
            for concept, others in (("content", data.mcp_styles), ("style", data.mcp_contents)):
                if cfg.mcp and others is not None and len(others):
                    self.batches[f"mcp.{concept}"] = StaticBatch(backbone, *self._others_batch(others, 0))
        self.steps = graph_steps(cuda_graph, {
            "content": compiled_step(compiler, lambda: self._concept_step("content")),
            "style": compiled_step(compiler, lambda: self._concept_step("style")),
            "make": compiled_step(compiler, self._make_step)},
                                 before_capture=lambda: drop_step_tensors(self.loras))

    def start(self, stage: str, noise: torch.Generator | None = None,
              weights: dict[str, torch.Tensor] | None = None) -> TrainState:
        """Begin ``stage`` from the PLP init (content, style) or from ``weights`` (make: LoRA_f)."""
        params = self.begin(stage, weights, capturable=self.cuda_graph)
        if noise is not None:
            self.noise = noise
        assert self.optimizer is not None
        return TrainState(params=params, optimizers={"adam": self.optimizer}, generators={"noise": self.noise})

    def finish(self) -> None:
        """End the current stage: release its CUDA graph (and with it the graph's memory pool) and drop its
        optimiser (Adam states), so the next stage, or sampling, does not sit beside them."""
        self.optimizer = None
        if self.stage is not None:
            drop_step_tensors(self.loras)  # the merged weights and gradients of the last pass live in the graph's pool
            release_graphs(*self.steps.values())
            free_cuda_memory()
        self.stage = None

    def _others_batch(self, others: TrainingImages, step: int) -> tuple[torch.Tensor, Any]:
        """MCP's n other images: all of them (Eq. 17) or, under ``cycle``, image ``step mod n``."""
        return others.all() if self.cfg.mcp_schedule == "all" else others.pick(step)

    def _make_batch(self, step: int) -> tuple[torch.Tensor, Any]:
        assert self.data is not None
        (x_c, c_c), (x_s, c_s) = self.data.content.pick(step), self.data.style.pick(step)
        return torch.cat([x_c, x_s]), embeds_cat([c_c, c_s])

    def step(self, step: int) -> dict[str, Any]:
        """One step of the current stage: its batches are filled eagerly, then the (graphed) step runs."""
        if self.stage is None or self.data is None:
            raise RuntimeError("call start(stage) on a trainer with training images first")
        fn, data = self.steps[self.stage], self.data
        with on_capture_stream(fn):
            if self.stage == "make":
                self.batches["make"].fill(*self._make_batch(step), self.noise)
            else:
                own = data.content if self.stage == "content" else data.style
                self.batches["own"].fill(*own.pick(step), self.noise)
                if f"mcp.{self.stage}" in self.batches:
                    others = data.mcp_styles if self.stage == "content" else data.mcp_contents
                    self.batches[f"mcp.{self.stage}"].fill(*self._others_batch(others, step), self.noise)  # type: ignore
            return fn()

    def diffusion_loss(self, batch: StaticBatch) -> torch.Tensor:
        """Mean denoising loss over a batch with the LoRA as it is now (after :meth:`train_halves`)."""
        self.loras.prepare(self.dtype)
        with self.autocast():
            return batch.loss()

    def backward(self, batch: StaticBatch) -> torch.Tensor:
        """Backward of the batch's mean loss, ``micro_batch`` images per pass; returns the loss."""
        total = torch.zeros((), device=batch.latents.device)
        for part, weight in batch.split(self.cfg.micro_batch):
            loss = self.diffusion_loss(part) * weight
            loss.backward()
            total = total + loss.detach()
        return total

    def _concept_step(self, concept: str) -> dict[str, torch.Tensor]:
        # Eq. 17: L = ||ε̂(z_c | c_c, t) − ε||² + 1/n Σ_i ||ε̂(z_i | c_i, t) − ε||²: the concept's own images
        # update its own half (B for content), the n other concepts' images the other half (D)
        own = self.own_half(concept)
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        self.train_halves(up=own == "up", down=own == "down")
        out = {"loss": self.backward(self.batches["own"])}
        if f"mcp.{concept}" in self.batches:
            self.train_halves(up=own != "up", down=own != "down")
            out["mcp"] = self.backward(self.batches[f"mcp.{concept}"])  # the batch mean: 1/n Σ_i
        self.optimizer.step()
        return out

    def _make_step(self) -> dict[str, torch.Tensor]:
        """Fine-tune LoRA_f (B and D; A and C stay frozen) on a content and a style image (mean loss)."""
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        self.train_halves(up=True, down=True)
        loss = self.backward(self.batches["make"])
        self.optimizer.step()
        return {"loss": loss}


# ---------------------------------------------------------------------------- scale-wise trainer
#: one training image of a scale-wise backbone: its teacher-forcing targets and its encoded prompt
ScaleWiseItem = tuple[ScaleTargets, TextContext]


@dataclass
class ScaleWiseBreakForMakeData:
    """Training images of the three stages on a scale-wise backbone (teacher-forcing targets with prompts)."""

    content: list[ScaleWiseItem]
    style: list[ScaleWiseItem]
    mcp_styles: list[ScaleWiseItem] = field(default_factory=list)
    mcp_contents: list[ScaleWiseItem] = field(default_factory=list)


class ScaleWiseBreakForMakeTrainer(PLPLoRA):
    """The three stages on a scale-wise transformer: the PLP LoRA on its adapter targets, every loss the
    backbone's teacher-forcing cross-entropy over all scales (Eq. 17 with it in place of the denoising loss).

    Teacher forcing draws no noise, so a step is a function of the weights and the step index alone. Every
    image is its own forward and backward (gradients accumulate: the update of the mean loss).
    """

    def __init__(self, backbone: ScaleWiseBackbone, cfg: BreakForMakeConfig,
                 data: ScaleWiseBreakForMakeData | None = None, *, lora_generator: torch.Generator | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 merge: bool | None = None):
        """``merge``: fold the LoRA into the frozen weights once per pass (``LoRASet``; default: on CUDA)."""
        self.backbone, self.data, self.autocast = backbone, data, autocast
        self._init_plp(backbone.lora_model(), backbone.adapter_targets(ffn=cfg.ffn), cfg, prefix=PEFT_PREFIX,
                       merge=backbone.device.type == "cuda" if merge is None else merge,
                       parts=backbone.fused_projections(), lora_generator=lora_generator)
        self.dtype = backbone.weight_dtype  # the projections' (the transformer's first parameter may be float32)

    def start(self, stage: str, noise: torch.Generator | None = None,
              weights: dict[str, torch.Tensor] | None = None) -> TrainState:
        """Begin ``stage`` from the PLP init (content, style) or from ``weights`` (make: LoRA_f); ``noise`` is
        not used (teacher forcing draws nothing)."""
        params = self.begin(stage, weights)
        assert self.optimizer is not None
        return TrainState(params=params, optimizers={"adam": self.optimizer})

    def finish(self) -> None:
        """End the current stage: drop its optimiser and the banks' folded weights."""
        self.optimizer = None
        self.loras.release()
        self.stage = None

    def loss(self, item: ScaleWiseItem) -> torch.Tensor:
        """Teacher-forcing cross-entropy of one image with its prompt, the LoRA as it is now (after
        :meth:`train_halves`)."""
        targets, text = item
        self.loras.prepare(self.dtype)
        with self.autocast():
            logits = self.backbone.teacher_forcing_logits(text, targets)
        return self.backbone.teacher_forcing_loss(logits, targets)

    def backward(self, items: Sequence[ScaleWiseItem]) -> torch.Tensor:
        """Backward of the mean loss over ``items``, one image per pass; returns that mean (detached, read
        once per step by :meth:`step`, not once per pass)."""
        total = torch.zeros((), device=self.backbone.device)
        for item in items:
            loss = self.loss(item) / len(items)
            loss.backward()
            total = total + loss.detach().float()
        return total

    def step(self, step: int) -> dict[str, float]:
        """One step of the current stage on image ``step mod n`` of each set (MCP ``all``: every other image)."""
        if self.stage is None or self.data is None or self.optimizer is None:
            raise RuntimeError("call start(stage) on a trainer with training images first")
        data, cfg = self.data, self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        if self.stage == "make":  # LoRA_f: B and D on a content and a style image (mean loss); A, C frozen
            self.train_halves(up=True, down=True)
            out = {"loss": self.backward([_pick(data.content, step), _pick(data.style, step)])}
        else:
            # Eq. 17: the concept's own image updates its own half (B for content), the n other concepts'
            # images the other half (D), each pass with the other half detached
            own, content = self.own_half(self.stage), self.stage == "content"
            self.train_halves(up=own == "up", down=own == "down")
            out = {"loss": self.backward([_pick(data.content if content else data.style, step)])}
            others = data.mcp_styles if content else data.mcp_contents
            if cfg.mcp and others:
                self.train_halves(up=own != "up", down=own != "down")
                out["mcp"] = self.backward(others if cfg.mcp_schedule == "all" else [_pick(others, step)])
        self.optimizer.step()
        self.loras.release()
        return {k: v.item() for k, v in out.items()}


def _pick(items: Sequence[ScaleWiseItem], step: int) -> ScaleWiseItem:
    return items[step % len(items)]


# --------------------------------------------------------------------------------------- method
@register_method
class BreakForMake(Method):
    """Content and style PLP LoRAs in separate sub-spaces, recombined and fine-tuned (SDXL, Infinity, Switti)."""

    name = "break_for_make"
    summary = "Content and style in separate halves of one LoRA (PLP + MCP), recombined and fine-tuned"
    paper = "Xu et al., Break-for-Make: Modular Low-Rank Adaptations for Composable Content-Style Customization, 2024"
    family = "diffusion|scalewise"
    families = ("diffusion", "scalewise")
    Config = BreakForMakeConfig
    Inputs = BreakForMakeInputs
    GenerateConfig = LoRAGenerateConfig

    config: BreakForMakeConfig

    # ------------------------------------------------------------------------------- prompts
    @staticmethod
    def content_words(inputs: BreakForMakeInputs, content: str) -> str:
        """A class word behind the content token: "sks house"."""
        return f"{inputs.content_token} {content}".strip()

    @staticmethod
    def style_words(inputs: BreakForMakeInputs, style: str) -> str:
        """Style words behind the style token: "w@z watercolor"."""
        return f"{inputs.style_token} {style}".strip()

    def placeholders(self, inputs: BreakForMakeInputs) -> dict[str, str]:
        return {CONTENT_TOKEN: self.content_words(inputs, inputs.content),
                STYLE_TOKEN: self.style_words(inputs, inputs.style)}

    def content_prompt(self, inputs: BreakForMakeInputs, content: str) -> str:
        return self.config.content_prompt.format(content=self.content_words(inputs, content))

    def style_prompt(self, inputs: BreakForMakeInputs, style: str) -> str:
        return self.config.style_prompt.format(style=self.style_words(inputs, style))

    def mcp_style_prompt(self, inputs: BreakForMakeInputs, other: StyleImage) -> str:
        """An MCP style image's caption: its style behind the style token, and its content where given."""
        if not other.content:
            return self.style_prompt(inputs, other.style)
        return self.config.both_prompt.format(content=other.content, style=self.style_words(inputs, other.style))

    def mcp_content_prompt(self, inputs: BreakForMakeInputs, other: ContentImage) -> str:
        """An MCP content image's caption: its class word behind the content token, and its style where given."""
        if not other.style:
            return self.content_prompt(inputs, other.content)
        return self.config.both_prompt.format(content=self.content_words(inputs, other.content), style=other.style)

    def training_items(self, inputs: BreakForMakeInputs) -> dict[str, list[tuple[str, str, str]]]:
        """Every training image with its caption and where it was given, by set (``content``, ``style`` and,
        with MCP, ``mcp_styles``, ``mcp_contents``); MCP's other images with the same tokens (official code)."""
        cfg = self.config
        if cfg.mcp and not inputs.mcp_styles:
            raise UserError("inputs.mcp_styles", "empty: MCP (Eq. 17) needs the n other styles of the content stage",
                            "expected a list of {image, style}, e.g. examples/style_neon.png, or params.mcp: false")
        if cfg.mcp and not inputs.mcp_contents:
            raise UserError("inputs.mcp_contents", "empty: MCP (Eq. 17) needs the n other contents of the style stage",
                            "expected a list of {image, content}, e.g. examples/content_house.png; "
                            "or params.mcp: false")
        c, s = self.content_prompt(inputs, inputs.content), self.style_prompt(inputs, inputs.style)
        items = {"content": [(p, c, f"inputs.content_images[{i}]") for i, p in enumerate(inputs.content_images)],
                 "style": [(p, s, f"inputs.style_images[{i}]") for i, p in enumerate(inputs.style_images)]}
        if cfg.mcp:
            items["mcp_styles"] = [(x.image, self.mcp_style_prompt(inputs, x), f"inputs.mcp_styles[{i}].image")
                                   for i, x in enumerate(inputs.mcp_styles)]
            items["mcp_contents"] = [(x.image, self.mcp_content_prompt(inputs, x), f"inputs.mcp_contents[{i}].image")
                                     for i, x in enumerate(inputs.mcp_contents)]
        return items

    def training_data(self, backbone: DiffusionBackbone, inputs: BreakForMakeInputs) -> BreakForMakeData:
        """Encode every training image with its prompt (:meth:`training_items`) as latents."""
        items = self.training_items(inputs)

        def encode(group: str) -> TrainingImages:
            paths, prompts, where = (list(x) for x in zip(*items[group]))
            return TrainingImages.encode(backbone, paths, prompts, where)

        data = BreakForMakeData(content=encode("content"), style=encode("style"))
        if "mcp_styles" in items:
            data.mcp_styles, data.mcp_contents = encode("mcp_styles"), encode("mcp_contents")
        return data

    def scalewise_data(self, backbone: ScaleWiseBackbone, inputs: BreakForMakeInputs) -> ScaleWiseBreakForMakeData:
        """Every training image (:meth:`training_items`) as teacher-forcing targets at the backbone's own
        schedule, with its prompt encoded (once per distinct prompt)."""
        items = self.training_items(inputs)
        texts: dict[str, TextContext] = {}

        def encode(group: str) -> list[ScaleWiseItem]:
            out = []
            for path, prompt, where in items.get(group, []):
                if prompt not in texts:
                    with torch.no_grad():
                        texts[prompt] = backbone.encode_text([prompt])
                out.append((load_target(backbone, path, where), texts[prompt]))
            return out

        return ScaleWiseBreakForMakeData(content=encode("content"), style=encode("style"),
                                         mcp_styles=encode("mcp_styles"), mcp_contents=encode("mcp_contents"))

    def _meta(self, inputs: BreakForMakeInputs, steps: dict[str, int], fused: str, n_layers: int) -> dict[str, Any]:
        cfg = self.config
        return {"plp": {"ratio": cfg.ratio, "rank": cfg.rank, "init": cfg.init,
                        "content_projection": cfg.content_projection},
                "loras": {"both": [fused]},
                "training_prompts": {"content": self.content_prompt(inputs, inputs.content),
                                     "style": self.style_prompt(inputs, inputs.style)},
                "mcp": {"styles": len(inputs.mcp_styles) if cfg.mcp else 0,
                        "contents": len(inputs.mcp_contents) if cfg.mcp else 0, "schedule": cfg.mcp_schedule},
                "steps": steps, "target_modules": n_layers}

    # ----------------------------------------------------------------------------------- fit
    def fit(self, backbone: Backbone, inputs: BreakForMakeInputs, runtime: Runtime) -> Decomposition:
        if isinstance(backbone, ScaleWiseBackbone):
            return self.fit_scalewise(backbone, inputs, runtime)
        assert isinstance(backbone, DiffusionBackbone)
        cfg = self.config
        steps = {"content": cfg.steps, "style": cfg.steps, "make": cfg.make_steps}
        with compiled_unet(backbone, runtime, steps=sum(steps.values()), label=self.name) as compiler:
            with runtime.phase("setup"):  # training images and prompts encoded, the PLP LoRA injected
                unload_loras(backbone)
                data = self.training_data(backbone, inputs)
                trainer = BreakForMakeTrainer(backbone, cfg, data, lora_generator=runtime.generator(1),
                                              autocast=runtime.autocast_for(backbone.unet),
                                              cuda_graph=runtime.use_cuda_graph, compiler=compiler)
            try:
                loras = run_plp_stages(runtime, trainer, steps)
            finally:
                trainer.finish()
                trainer.loras.remove()

        meta_file = trainer.loras.diffusers_metadata()
        files = {CONTENT_FILE: loras["content"], STYLE_FILE: loras["style"], FUSED_FILE: loras["make"]}
        return Decomposition(
            method=self.name,
            files=files,
            placeholders=self.placeholders(inputs),
            meta=self._meta(inputs, steps, FUSED_FILE, len(trainer.names)),
            file_metadata={rel: meta_file for rel in files},
        )

    def fit_scalewise(self, backbone: ScaleWiseBackbone, inputs: BreakForMakeInputs, runtime: Runtime
                      ) -> Decomposition:
        """The three stages on a scale-wise transformer (:class:`ScaleWiseBreakForMakeTrainer`); LoRAs in
        PEFT's layout."""
        cfg = self.config
        steps = {"content": cfg.steps, "style": cfg.steps, "make": cfg.make_steps}
        with runtime.phase("setup"):  # teacher-forcing targets and prompts encoded, the PLP LoRA injected
            backbone.freeze()
            data = self.scalewise_data(backbone, inputs)
            trainer = ScaleWiseBreakForMakeTrainer(backbone, cfg, data, lora_generator=runtime.generator(1),
                                                   autocast=runtime.autocast)
        try:
            loras = run_plp_stages(runtime, trainer, steps)
        finally:
            trainer.finish()
            trainer.loras.remove()
        files = {CONTENT_PEFT: loras["content"], STYLE_PEFT: loras["style"], FUSED_PEFT: loras["make"]}
        meta = self._meta(inputs, steps, FUSED_PEFT, len(trainer.names))
        fused = backbone.fused_projections()
        meta["plp"]["parts"] = {name: fused[name] for name in trainer.names if fused.get(name, 1) > 1}
        meta["layout"] = "peft"
        return Decomposition(method=self.name, files=files, placeholders=self.placeholders(inputs), meta=meta,
                             file_metadata={rel: peft_metadata(state) for rel, state in files.items()})

    # ------------------------------------------------------------------------------ generate
    def generate(self, backbone: Backbone, decomposition: Decomposition, prompts: Sequence[str], use: str,
                 *, num_images: int = 1, seed: int = 0, options: Any = None, progress: bool = True) -> list[list[Any]]:
        """Content alone: LoRA_c; style alone: LoRA_s; both: LoRA_f (Sec. 4.2). Sampled through our LoRA layers
        (folded into the weights on GPUs) from the saved files; on SDXL diffusers' adapters where ranks differ."""
        if isinstance(backbone, ScaleWiseBackbone):
            return sample_scalewise(backbone, loras_for_use(decomposition, use, ADAPTER_FILE), prompts,
                                    decomposition.placeholders, num_images=num_images, seed=seed,
                                    options=options or LoRAGenerateConfig(), progress=progress)
        assert isinstance(backbone, DiffusionBackbone)
        loras = loras_for_use(decomposition, use)
        if uniform_rank(loras) is None:
            return generate_with_loras(backbone, decomposition, prompts, use, num_images=num_images, seed=seed,
                                       options=options, progress=progress)
        return sample_with_lora_layers(backbone, loras, prompts, decomposition.placeholders, num_images=num_images,
                                       seed=seed, options=options or LoRAGenerateConfig(), progress=progress)

    def combine(self, content: Decomposition, style: Decomposition) -> Decomposition:
        """Content of one Break-for-Make run with the style of another: LoRA_f recombined from LoRA_c and
        LoRA_s when they share their frozen halves (same seed, rank, ratio, init), without fine-tuning;
        otherwise (or with another method's style) the two LoRAs added."""
        joined = super().combine(content, style)
        plp = content.meta.get("plp") or {}
        if style.method != self.name or (style.meta.get("plp") or {}) != plp:
            return joined
        peft = content.meta.get("layout") == "peft"
        c_file, s_file, f_file = (CONTENT_PEFT, STYLE_PEFT, FUSED_PEFT) if peft else (CONTENT_FILE, STYLE_FILE,
                                                                                      FUSED_FILE)
        parts = {f"{PEFT_PREFIX}.{name}": k for name, k in (plp.get("parts") or {}).items()}
        lora_c, lora_s = content.files.get(c_file), style.files.get(s_file)
        if lora_c is None or lora_s is None or not same_frozen_halves(lora_c, lora_s, plp["ratio"], parts):
            return joined
        joined.files[f_file] = (recombine(lora_c, lora_s) if plp.get("content_projection", "up") == "up"
                                else recombine(lora_s, lora_c))
        joined.meta["loras"] = {"both": [f_file]}
        joined.meta["plp"] = plp
        if peft:
            joined.meta["layout"] = "peft"
        return joined
