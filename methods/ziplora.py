"""ZipLoRA: any subject in any style by effectively merging LoRAs (Shah et al., ECCV 2024).

A content LoRA ΔW_c and a style LoRA ΔW_s, trained independently (DreamBooth-LoRA, or taken from
any decomposition: ``inputs.content_lora`` / ``inputs.style_lora``), are merged column by column:

    ΔW_m = m_c ⊗ ΔW_c + m_s ⊗ ΔW_s          (m_c, m_s: one merger vector per layer, one entry per column)

with the mergers learned for ~100 steps so that the merged model reproduces each LoRA on its own
image and prompt while the two vectors stay apart:

    L = ||ε̂_m(x_c, p_c) − ε̂_c(x_c, p_c)||² + ||ε̂_m(x_s, p_s) − ε̂_s(x_s, p_s)||² + λ Σ_layers mean|m_c ⊙ m_s|

The LoRA weights stay frozen. The result: the two input LoRAs (``content/``, ``style/``, for one
concept alone) and the zipped pair (``zipped/content/``, ``zipped/style/``: mergers folded in, used
together for both), all in diffusers' layout.

On the scale-wise backbones (Infinity, Switti) the two LoRAs sit on the transformer's attention
projections and train with the teacher-forcing cross-entropy (DreamBooth-LoRA's scale-wise path);
the merge loss matches teacher-forcing *logits* instead of ε̂: by default the KL divergence of the merged
model's next-token distributions from each LoRA's own (``distance: mse`` matches the raw logits). Files
are in PEFT's layout (``content/adapter_model.safetensors``, ``zipped/...``; ``methods/_scalewise_lora.py``),
the mergers by layer in ``ziplora/mergers.safetensors``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F

from cstoolkit.backbone import Backbone, DiffusionBackbone, PromptEmbeds, ScaleTargets, ScaleWiseBackbone, TextContext
from cstoolkit.compile import CompiledForward
from cstoolkit.cuda_graph import graph_steps, on_capture_stream
from cstoolkit.decomposition import MANIFEST, Decomposition
from cstoolkit.errors import UserError
from cstoolkit.lora import LoRABank, LoRASet, lora_state_dict_to_layers
from cstoolkit.method import CONTENT_TOKEN, STYLE_TOKEN, Method
from cstoolkit.registry import register_method
from cstoolkit.runtime import Runtime, TrainState

from ._scalewise_lora import (
    ADAPTER_FILE,
    PEFT_PREFIX,
    LoRAGenerateConfig,
    ScaleWiseLoRATrainer,
    adapter_file,
    load_target,
    peft_metadata,
    role_loras,
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
    embeds_rows,
    generate_with_loras,
    lora_file_metadata,
    target_linears,
    unet_prediction,
    unload_loras,
)
from .dreambooth_lora import DreamBoothLoRAConfig, DreamBoothLoRATrainer, run_stage, train_lora

ROLES = ("content", "style")
ZIPPED = {role: f"zipped/{role}/{LORA_FILE}" for role in ROLES}
#: the zipped pair on the scale-wise backbones (PEFT layout)
ZIPPED_PEFT = {role: f"zipped/{role}/{ADAPTER_FILE}" for role in ROLES}
MERGERS_FILE = "ziplora/mergers.safetensors"


@dataclass
class ZipLoRAConfig:
    """Hyper-parameters; defaults are the paper's (100 steps, λ = 0.01; LoRAs: rank 64, lr 5e-5, 1000 steps).
    The merger learning rate is not in our sources of the paper: 5e-3 as in the authors' UnZipLoRA code."""

    steps: int = field(default=100, metadata={"min": 1, "help": "merger optimisation steps"})
    lr: float = field(default=5e-3, metadata={"min": 0.0, "help": "Adam learning rate of the merger vectors"})
    similarity_weight: float = field(default=0.01, metadata={"min": 0.0, "help": "λ of the merger similarity term"})
    init_merger: float = field(default=1.0, metadata={"help": "initial value of every merger entry"})
    lora_rank: int = field(default=64, metadata={"min": 1, "help": "rank of a LoRA trained here (DreamBooth-LoRA)"})
    lora_lr: float = field(default=5e-5, metadata={"min": 0.0})
    lora_steps: int = field(default=1000, metadata={"min": 1})
    content_prompt: str = "A {content}"
    style_prompt: str = "A {content} in {style} style"
    distance: Literal["kl", "mse"] = field(default="kl", metadata={
        "help": "scale-wise backbones: how the merged model's teacher-forcing logits are matched to each LoRA's: "
                "kl (our choice: KL of the next-token distributions, what the backbone's cross-entropy and the "
                "sampler see) or mse (the raw logits, the paper's squared L2 on the model output taken literally)"})
    ffn: bool = field(default=False, metadata={"help": "scale-wise backbones: LoRAs trained here also adapt the "
                                                       "FFN layers (default: attention q/k/v/out only)"})


@dataclass
class ZipLoRAInputs:
    """The content and style images (the merge loss needs them) and, optionally, LoRAs to merge."""

    content_images: list[str] = field(default_factory=list, metadata={"path": True, "image": True})
    style_images: list[str] = field(default_factory=list, metadata={"path": True, "image": True})
    content: str = field(default="", metadata={"help": "class word; needed unless content_lora is a decomposition"})
    style: str = field(default="", metadata={"help": "style words; needed unless style_lora is a decomposition"})
    content_lora: str | None = field(default=None, metadata={
        "path": True, "help": "run or decomposition folder (its content part) or a LoRA file (diffusers layout on "
                              "SDXL, PEFT on scale-wise backbones); default: train one"})
    style_lora: str | None = field(default=None, metadata={
        "path": True, "help": "run or decomposition folder (its style part) or a LoRA file (diffusers layout on "
                              "SDXL, PEFT on scale-wise backbones); default: train one"})
    style_subject: str = field(default="picture", metadata={"help": "what the style images show (style prompt)"})
    token: str = field(default="sks", metadata={"help": "unique token before the class word"})

    def __post_init__(self) -> None:
        for name in ("content_images", "style_images"):
            if not getattr(self, name):
                raise ValueError(f"inputs.{name} is required (a list of image paths)")


@dataclass
class LoRASource:
    """A LoRA to merge, with the trigger phrase and training prompt that go with it."""

    state: dict[str, torch.Tensor]
    trigger: str | None = None
    prompt: str | None = None
    origin: str = "trained"


def normalized_lora(state: dict[str, torch.Tensor], prefix: str = "unet") -> dict[str, torch.Tensor]:
    """A LoRA state dict in the ``<prefix>.<module>.lora_A/B.weight`` layout (float32): diffusers' ``unet``
    (default) or PEFT's ``base_model.model``."""
    out = {}
    for name, (a, b) in sorted(lora_state_dict_to_layers(state, prefix).items()):
        out[f"{prefix}.{name}.lora_A.weight"] = a.float().contiguous()
        out[f"{prefix}.{name}.lora_B.weight"] = b.float().contiguous()
    return out


def load_lora_source(path: str, role: str, backbone: Backbone, where: str) -> LoRASource:
    """The ``role`` LoRA of a run/decomposition folder (via its method's ``part``) or a LoRA file: diffusers'
    layout on SDXL, PEFT's on the scale-wise backbones."""
    from safetensors.torch import load_file

    scalewise = isinstance(backbone, ScaleWiseBackbone)
    file_name, prefix = (ADAPTER_FILE, PEFT_PREFIX) if scalewise else (LORA_FILE, "unet")
    p = Path(path)
    folder = p / "decomposition" if (p / "decomposition" / MANIFEST).is_file() else p
    if (folder / MANIFEST).is_file():
        dec = Decomposition.load(folder, where=where)
        bb = dec.recipe.get("backbone") or {}
        for key in ("name", "preset", "pretrained"):
            if bb.get(key) != getattr(backbone.config, key, None):
                raise UserError(where, f"{folder} was fitted on another backbone ({key} {bb.get(key)})",
                                "expected a decomposition of the recipe's backbone")
        try:
            part = dec.method_impl.part(dec, role)
        except UserError as exc:
            raise UserError(where, exc.what, exc.expected) from None
        state = part.files.get(f"{role}/{file_name}")
        if state is None:
            raise UserError(where, f"the {role} part of {folder} has no {file_name}", "expected a LoRA method's run")
        token = CONTENT_TOKEN if role == "content" else STYLE_TOKEN
        prompts = dec.meta.get("training_prompts")
        prompt = prompts.get(role) if isinstance(prompts, dict) else None
        return LoRASource(normalized_lora(state, prefix), part.placeholders.get(token), prompt, str(folder))
    file = p if p.is_file() else p / file_name
    if not file.is_file():
        raise UserError(where, f"{p} is neither a decomposition nor a LoRA",
                        f"expected a run or decomposition folder, a .safetensors file or a folder with {file_name}")
    try:
        state = normalized_lora(load_file(str(file)), prefix)
    except Exception as exc:  # safetensors raises its own error types
        raise UserError(where, f"cannot read {file} ({exc.__class__.__name__})", "expected a safetensors LoRA") \
            from None
    if not state:
        raise UserError(where, f"{file} holds no LoRA weights of this backbone",
                        f"expected {prefix}.<module>.lora_A/B.weight keys")
    return LoRASource(state, origin=str(file))


class MergedLoRAs:
    """Two frozen LoRAs in one bank per layer shape, with a merger vector per LoRA and layer (both families).

    ``gates`` gives the merged update ΔW_m = m_c ⊗ ΔW_c + m_s ⊗ ΔW_s, ``_alone(role)`` one LoRA alone,
    ``similarity`` the λ-term; the caller owns the loss and the optimiser step.
    """

    loras: LoRASet
    mergers: dict[str, torch.nn.Parameter]

    def _init_mergers(self, model: torch.nn.Module, loras: dict[str, dict[str, torch.Tensor]], prefix: str,
                      init_merger: float, merge: bool, device: torch.device, what: str) -> None:
        """Inject the two LoRAs (``prefix`` keys) into ``model``'s linear layers and make the mergers."""
        layers = {role: lora_state_dict_to_layers(loras[role], prefix) for role in ROLES}
        names = sorted(set(layers["content"]) | set(layers["style"]))
        if not names:
            raise UserError("inputs", "the LoRAs to merge adapt no layer", f"expected LoRAs made for {what}")
        rank = max(int(a.shape[0]) for role in ROLES for a, _ in layers[role].values())
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                module = None
            if not isinstance(module, torch.nn.Linear):
                raise UserError("inputs", f"LoRA layer {name} is not a linear layer of {what}",
                                "expected LoRAs made for the recipe's backbone")
        self.prefix = prefix
        self.loras = LoRASet(model, names, rank, ROLES, init="zeros", merge=merge, prefix=prefix).inject()
        self.mergers = {}
        self.both: dict[str, torch.Tensor] = {}
        for key, bank in self.loras.banks.items():
            for role in ROLES:  # lower ranks are zero-padded, absent layers are zero (LoRABank.load)
                bank.load(role, layers[role])
                self.mergers[f"{key}.{role}"] = torch.nn.Parameter(
                    torch.full((len(bank.names), bank.out_features), float(init_merger), device=device))
            bank.trainable_A = bank.trainable_B = False  # the LoRAs stay as they are
            self.both[key] = torch.tensor([n in layers["content"] and n in layers["style"] for n in bank.names],
                                          dtype=torch.float32, device=device)
        self.off = {key: torch.zeros_like(m) for key, m in self.mergers.items()}

    def gates(self, key: str, bank: LoRABank) -> dict[str, torch.Tensor | None]:
        # ΔW_m = m_c ⊗ ΔW_c + m_s ⊗ ΔW_s: each merger entry scales one column (output feature) of its ΔW
        return {role: self.mergers[f"{key}.{role}"] for role in ROLES}

    def _alone(self, role: str) -> Callable[[str, LoRABank], dict[str, torch.Tensor | None]]:
        other = "style" if role == "content" else "content"
        return lambda key, bank: {role: None, other: self.off[f"{key}.{other}"]}

    def similarity(self) -> torch.Tensor:
        # λ-term: Σ_layers mean_columns |m_c ⊙ m_s| (over layers both LoRAs adapt)
        terms = [((self.mergers[f"{k}.content"] * self.mergers[f"{k}.style"]).abs().mean(-1) * self.both[k]).sum()
                 for k in self.loras.banks]
        return torch.stack(terms).sum()

    def layer_mergers(self, role: str) -> dict[str, torch.Tensor]:
        """{layer name: (out,) merger of ``role``} (float32, CPU)."""
        return {name: self.mergers[f"{key}.{role}"][i].detach().float().cpu()
                for key, bank in self.loras.banks.items() for i, name in enumerate(bank.names)}

    def zipped(self, role: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` (the ``role`` LoRA) with its merger folded into the up projection: m ⊗ ΔW = (m ⊙ B) A."""
        merger = self.layer_mergers(role)
        out = {}
        for k, v in state.items():
            name = k[len(self.prefix) + 1:].rsplit(".lora_", 1)[0]
            out[k] = v * merger[name].to(v.device).unsqueeze(-1) if k.endswith(".lora_B.weight") else v.clone()
        return out


class ZipLoRATrainer(MergedLoRAs):
    """The merge stage on SDXL: the denoising predictions of the merged UNet matched to each LoRA's.

    ``step(i)`` runs the merge loss on content image ``i mod n`` and style image ``i mod n``.
    """

    def __init__(self, backbone: DiffusionBackbone, cfg: ZipLoRAConfig, loras: dict[str, dict[str, torch.Tensor]],
                 content: TrainingImages, style: TrainingImages, *, noise: torch.Generator | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 cuda_graph: bool = False, compiler: CompiledForward | None = None):
        self.backbone, self.cfg, self.content, self.style, self.autocast = backbone, cfg, content, style, autocast
        self.noise = noise if noise is not None else torch.Generator().manual_seed(0)
        device = backbone.device
        self._init_mergers(backbone.unet, loras, "unet", cfg.init_merger, device.type == "cuda", device,
                           "this UNet")
        self.optimizer = torch.optim.Adam(list(self.mergers.values()), lr=cfg.lr, capturable=cuda_graph,
                                          fused=device.type == "cuda" or None)
        self.dtype = backbone.weight_dtype
        # the step's two images, prompts, noise and timesteps in fixed tensors (replayable as a CUDA graph)
        self.batch = StaticBatch(backbone, *self._pair(0))
        self._merge = graph_steps(cuda_graph, {"merge": compiled_step(compiler, self._merge_step)},
                                  before_capture=lambda: drop_step_tensors(self.loras, self.optimizer))["merge"]

    def state(self) -> TrainState:
        return TrainState(params={f"merger.{k}": v for k, v in self.mergers.items()},
                          optimizers={"adam": self.optimizer}, generators={"noise": self.noise})

    def _pair(self, step: int) -> tuple[torch.Tensor, PromptEmbeds]:
        """Content image ``step mod n_c`` and style image ``step mod n_s`` with their prompts, as one batch."""
        (x_c, c_c), (x_s, c_s) = self.content.pick(step), self.style.pick(step)
        return torch.cat([x_c, x_s]), embeds_cat([c_c, c_s])

    def step(self, step: int) -> dict[str, Any]:
        with on_capture_stream(self._merge):
            self.batch.fill(*self._pair(step), self.noise)
            return self._merge()

    def _merge_step(self) -> dict[str, torch.Tensor]:
        # L = ||ε̂_m(x_c,p_c) − ε̂_c(x_c,p_c)||² + ||ε̂_m(x_s,p_s) − ε̂_s(x_s,p_s)||² + λ Σ mean|m_c ⊙ m_s|,
        # every term on the same noise and timestep
        batch, bb = self.batch, self.backbone
        noisy, t, cond = batch.noisy(), batch.timesteps, batch.cond
        c_c, c_s = embeds_rows(cond, slice(0, 1)), embeds_rows(cond, slice(1, 2))
        with torch.no_grad(), self.autocast():
            self.loras.prepare(self.dtype, self._alone("content"))
            target_c = unet_prediction(bb, noisy[:1], t[:1], c_c)
            self.loras.prepare(self.dtype, self._alone("style"))
            target_s = unet_prediction(bb, noisy[1:], t[1:], c_s)
        self.optimizer.zero_grad(set_to_none=True)
        sim = self.similarity()
        (self.cfg.similarity_weight * sim).backward()
        losses = []
        for rows, c, target in ((slice(0, 1), c_c, target_c), (slice(1, 2), c_s, target_s)):
            # one image per forward/backward: gradients add up to those of the summed loss, at the
            # memory of a single image
            self.loras.prepare(self.dtype, self.gates)
            with self.autocast():
                pred = unet_prediction(bb, noisy[rows], t[rows], c)
            loss = F.mse_loss(pred, target)
            loss.backward()
            losses.append(loss.detach())
        loss_c, loss_s = losses
        self.optimizer.step()
        return {"loss_content": loss_c.detach(), "loss_style": loss_s.detach(), "similarity": sim.detach()}


def flat_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Teacher-forcing logits of every scale as (positions, classes), float32: Switti's (B, L, V) codes,
    Infinity's (B, L, d, 2) bits (one position per bit)."""
    return torch.cat([x.float().reshape(-1, x.shape[-1]) for x in logits])


def logits_distance(pred: torch.Tensor, target: torch.Tensor, distance: str) -> torch.Tensor:
    """Mean over positions of KL(softmax(target) ‖ softmax(pred)) (``kl``), or the mean squared difference of
    the logits (``mse``); both (positions, classes) from :func:`flat_logits`."""
    if distance == "kl":
        return F.kl_div(pred.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="batchmean")
    return F.mse_loss(pred, target)


class ScaleWiseZipLoRATrainer(MergedLoRAs):
    """The merge stage on a scale-wise transformer: the teacher-forcing logits of the merged model matched
    to each LoRA's own on its own images and prompt.

    Teacher forcing draws no noise, so each LoRA's target logits on each of its images are computed once,
    here, and every step costs one forward and backward per image. ``step(i)`` uses content image
    ``i mod n_c`` and style image ``i mod n_s``.
    """

    def __init__(self, backbone: ScaleWiseBackbone, cfg: ZipLoRAConfig, loras: dict[str, dict[str, torch.Tensor]],
                 targets: dict[str, Sequence[ScaleTargets]], texts: dict[str, TextContext], *,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 merge: bool | None = None):
        """``targets`` / ``texts``: per role, its images' teacher-forcing targets and its prompt; ``merge``:
        fold the LoRAs into the frozen weights once per step (``LoRASet``; default: on CUDA)."""
        self.backbone, self.cfg, self.autocast = backbone, cfg, autocast
        self.targets, self.texts = {r: list(targets[r]) for r in ROLES}, texts
        device = backbone.device
        self._init_mergers(backbone.lora_model(), loras, PEFT_PREFIX, cfg.init_merger,
                           device.type == "cuda" if merge is None else merge, device, "this transformer")
        self.optimizer = torch.optim.Adam(list(self.mergers.values()), lr=cfg.lr,
                                          fused=device.type == "cuda" or None)
        self.dtype = backbone.weight_dtype  # the projections' (the transformer's first parameter may be float32)
        self.reference: dict[str, list[torch.Tensor]] = {r: [] for r in ROLES}
        with torch.no_grad():  # each LoRA alone, on its own images and prompt: the targets of the merge loss
            for role in ROLES:
                self.loras.prepare(self.dtype, self._alone(role))
                for t in self.targets[role]:
                    with self.autocast():
                        logits = backbone.teacher_forcing_logits(texts[role], t)
                    self.reference[role].append(flat_logits(logits))
        self.loras.release()

    def state(self) -> TrainState:
        return TrainState(params={f"merger.{k}": v for k, v in self.mergers.items()},
                          optimizers={"adam": self.optimizer})

    def merged_logits(self, role: str, i: int) -> torch.Tensor:
        """Flat teacher-forcing logits of the merged model on image ``i`` of ``role`` (with gradients)."""
        self.loras.prepare(self.dtype, self.gates)
        with self.autocast():
            logits = self.backbone.teacher_forcing_logits(self.texts[role], self.targets[role][i])
        return flat_logits(logits)

    def step(self, step: int) -> dict[str, float]:
        # L = D(z_m(x_c,p_c), z_c(x_c,p_c)) + D(z_m(x_s,p_s), z_s(x_s,p_s)) + λ Σ mean|m_c ⊙ m_s|
        # (z: teacher-forcing logits; D: cfg.distance), one image per forward/backward
        self.optimizer.zero_grad(set_to_none=True)
        sim = self.similarity()
        (self.cfg.similarity_weight * sim).backward()
        losses = {}
        for role in ROLES:
            i = step % len(self.targets[role])
            loss = logits_distance(self.merged_logits(role, i), self.reference[role][i], self.cfg.distance)
            loss.backward()
            losses[f"loss_{role}"] = loss.item()
        self.optimizer.step()
        self.loras.release()
        return {**losses, "similarity": sim.item()}


@register_method
class ZipLoRA(Method):
    """A content LoRA and a style LoRA merged by learned column mergers (SDXL, Infinity, Switti)."""

    name = "ziplora"
    summary = "Baseline: merges a content LoRA and a style LoRA with learned per-column mergers"
    paper = "Shah et al., ZipLoRA: Any Subject in Any Style by Effectively Merging LoRAs, ECCV 2024"
    family = "diffusion|scalewise"
    families = ("diffusion", "scalewise")
    Config = ZipLoRAConfig
    Inputs = ZipLoRAInputs
    GenerateConfig = LoRAGenerateConfig

    config: ZipLoRAConfig

    def _source(self, backbone: Backbone, inputs: ZipLoRAInputs, role: str) -> LoRASource:
        """The given LoRA of ``role`` with its trigger and prompt, or an empty one to train here."""
        cfg = self.config
        given = inputs.content_lora if role == "content" else inputs.style_lora
        source = load_lora_source(given, role, backbone, f"inputs.{role}_lora") if given is not None else LoRASource({})
        if source.trigger is None:
            word = inputs.content if role == "content" else inputs.style
            if not word:
                raise UserError(f"inputs.{role}", "missing",
                                f"expected the {role} words (or a decomposition as inputs.{role}_lora)")
            source.trigger = f"{inputs.token} {word}".strip() if role == "content" else word
        if source.prompt is None:
            source.prompt = (cfg.content_prompt.format(content=source.trigger) if role == "content"
                             else cfg.style_prompt.format(content=inputs.style_subject, style=source.trigger))
        return source

    def fit(self, backbone: Backbone, inputs: ZipLoRAInputs, runtime: Runtime) -> Decomposition:
        if isinstance(backbone, ScaleWiseBackbone):
            return self.fit_scalewise(backbone, inputs, runtime)
        assert isinstance(backbone, DiffusionBackbone)
        cfg = self.config
        unload_loras(backbone)
        sources = {role: self._source(backbone, inputs, role) for role in ROLES}
        paths = {"content": inputs.content_images, "style": inputs.style_images}
        images = {role: TrainingImages.encode(backbone, paths[role], [str(sources[role].prompt)] * len(paths[role]),
                                              [f"inputs.{role}_images[{i}]" for i in range(len(paths[role]))])
                  for role in ROLES}
        autocast = runtime.autocast_for(backbone.unet)
        trained = sum(cfg.lora_steps for s in sources.values() if s.origin == "trained")
        with compiled_unet(backbone, runtime, steps=trained + cfg.steps, label=self.name) as compiler:
            for role, offset in (("content", 1), ("style", 3)):
                if sources[role].origin == "trained":  # no LoRA given: DreamBooth-LoRA, as in the paper
                    db = DreamBoothLoRAConfig()
                    lora_trainer = DreamBoothLoRATrainer(
                        backbone, target_linears(backbone), images[role], rank=cfg.lora_rank, lr=cfg.lora_lr,
                        weight_decay=db.weight_decay, max_grad_norm=db.max_grad_norm,
                        lora_generator=runtime.generator(offset), noise=runtime.generator(offset + 1),
                        autocast=autocast, cuda_graph=runtime.use_cuda_graph, compiler=compiler)
                    sources[role].state, _ = train_lora(runtime, role, cfg.lora_steps, lora_trainer)
            trainer = ZipLoRATrainer(backbone, cfg, {r: s.state for r, s in sources.items()}, images["content"],
                                     images["style"], noise=runtime.generator(5), autocast=autocast,
                                     cuda_graph=runtime.use_cuda_graph, compiler=compiler)
            run_stage(runtime, "merge", cfg.steps, trainer)
        files: dict[str, dict[str, torch.Tensor]] = {}
        for role in ROLES:
            files[f"{role}/{LORA_FILE}"] = sources[role].state
            files[ZIPPED[role]] = trainer.zipped(role, sources[role].state)
        files["ziplora/mergers.safetensors"] = {f"merger.{k}": v.detach() for k, v in trainer.mergers.items()}
        return Decomposition(
            method=self.name, files=files,
            placeholders={CONTENT_TOKEN: sources["content"].trigger or "", STYLE_TOKEN: sources["style"].trigger or ""},
            meta={"loras": {"both": [ZIPPED["content"], ZIPPED["style"]]},
                  "sources": {r: s.origin for r, s in sources.items()},
                  "training_prompts": {r: s.prompt for r, s in sources.items()}, "steps": cfg.steps},
            file_metadata={rel: lora_file_metadata(state) for rel, state in files.items() if rel.endswith(LORA_FILE)},
        )

    def fit_scalewise(self, backbone: ScaleWiseBackbone, inputs: ZipLoRAInputs, runtime: Runtime) -> Decomposition:
        """ZipLoRA on a scale-wise transformer: LoRAs not given are trained as DreamBooth-LoRA's scale-wise
        path does (teacher-forcing cross-entropy), then the mergers with :class:`ScaleWiseZipLoRATrainer`."""
        cfg = self.config
        backbone.freeze()
        sources = {role: self._source(backbone, inputs, role) for role in ROLES}
        paths = {"content": inputs.content_images, "style": inputs.style_images}
        targets = {role: [load_target(backbone, p, f"inputs.{role}_images[{i}]") for i, p in enumerate(paths[role])]
                   for role in ROLES}
        with torch.no_grad():
            texts = {role: backbone.encode_text([str(sources[role].prompt)]) for role in ROLES}
        db = DreamBoothLoRAConfig()
        names = backbone.adapter_targets(ffn=cfg.ffn)
        for role, offset in (("content", 1), ("style", 3)):
            if sources[role].origin != "trained":
                continue
            lora_trainer = ScaleWiseLoRATrainer(
                backbone, names, targets[role], [texts[role]] * len(targets[role]), adapter=role,
                rank=cfg.lora_rank, lr=cfg.lora_lr, weight_decay=db.weight_decay, max_grad_norm=db.max_grad_norm,
                lora_generator=runtime.generator(offset), autocast=runtime.autocast,
                cuda_graph=runtime.use_cuda_graph)
            run_stage(runtime, role, cfg.lora_steps, lora_trainer)
            sources[role].state, _ = lora_trainer.export()
        trainer = ScaleWiseZipLoRATrainer(backbone, cfg, {r: s.state for r, s in sources.items()}, targets, texts,
                                          autocast=runtime.autocast)
        run_stage(runtime, "merge", cfg.steps, trainer)
        files: dict[str, dict[str, torch.Tensor]] = {}
        for role in ROLES:
            files[adapter_file(role)] = sources[role].state
            files[ZIPPED_PEFT[role]] = trainer.zipped(role, sources[role].state)
        # by layer, as UnZipLoRA's: <prefix>.<module>.merger_<role> -> (out,)
        files[MERGERS_FILE] = {f"{PEFT_PREFIX}.{name}.merger_{role}": m for role in ROLES
                               for name, m in trainer.layer_mergers(role).items()}
        return Decomposition(
            method=self.name, files=files,
            placeholders={CONTENT_TOKEN: sources["content"].trigger or "", STYLE_TOKEN: sources["style"].trigger or ""},
            meta={"loras": {"both": [ZIPPED_PEFT["content"], ZIPPED_PEFT["style"]]},
                  "sources": {r: s.origin for r, s in sources.items()},
                  "training_prompts": {r: s.prompt for r, s in sources.items()}, "steps": cfg.steps,
                  "distance": cfg.distance, "layout": "peft"},
            file_metadata={rel: peft_metadata(state) for rel, state in files.items() if rel.endswith(ADAPTER_FILE)},
        )

    def generate(self, backbone: Backbone, decomposition: Decomposition, prompts: Sequence[str], use: str,
                 *, num_images: int = 1, seed: int = 0, options: Any = None, progress: bool = True) -> list[list[Any]]:
        """Content or style alone: the input LoRA; both: the zipped pair (ΔW_m)."""
        if isinstance(backbone, ScaleWiseBackbone):
            files = decomposition.files
            if use == "both" and all(ZIPPED_PEFT[r] in files for r in ROLES):
                loras = {r: files[ZIPPED_PEFT[r]] for r in ROLES}
            else:  # one LoRA alone, or a cross-combination (no zipped pair): the LoRAs as they are
                loras = dict(role_loras(files, use))
            return sample_scalewise(backbone, loras, prompts, decomposition.placeholders,
                                    num_images=num_images, seed=seed, options=options or LoRAGenerateConfig(),
                                    progress=progress)
        assert isinstance(backbone, DiffusionBackbone)
        return generate_with_loras(backbone, decomposition, prompts, use, num_images=num_images, seed=seed,
                                   options=options, progress=progress)
