"""The registered ``infinity`` backbone: transformer + BSQ-VAE + T5, behind :class:`ScaleWiseBackbone`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cstoolkit.backbone import (
    AttentionHook,
    BackboneConfig,
    HiddenEdit,
    ScaleTargets,
    ScaleWiseBackbone,
    StepHook,
    TextContext,
    apply_hidden_edit,
)
from cstoolkit.config import field_
from cstoolkit.errors import UserError
from cstoolkit.registry import register_backbone

from .. import scalewise
from ..scalewise import (
    CheckpointMode,
    DeviceCache,
    GenerationOutput,
    checkpointing_default,  # noqa: F401 (this module's name for it, kept)
    per_scale,
)
from . import loading
from .quantizer import bits_to_codes, multiscale_targets, resize_up
from .schedule import Schedule, num_tokens, scale_schedule
from .text import FLAN_T5_XL, T5TextEncoder
from .transformer import InfinityTransformer, KVCache, build_transformer, rope_tables
from .vae import BSQVAE, build_vae

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

PRESETS: dict[str, str] = {
    "tiny": "4 blocks x 64 wide, 16-bit VAE of stride 8, 2-layer T5; 128 px, 7 scales; random from a seed, offline",
    "infinity-2b": "Infinity-2B (32 x 2048), d32 BSQ-VAE, flan-t5-xl; 1024 px, 13 scales; official weights "
                   "(random_weights: true: all random from backbone.seed, flan-t5-xl-shaped T5, no files)",
    "world": "8 blocks x 256 wide, 16-bit VAE of stride 8 (64 ch), the tiny T5 (trained with it); 128 px, 7 scales; "
             "trained on the synthetic world (cstoolkit world train infinity), shipped fp16 safetensors",
}
DEFAULT_RESOLUTION = {"tiny": 128, "infinity-2b": 1024, "world": 128}
#: files of the ``world`` preset under world/weights/infinity/ (official key layout) and the seed of its frozen T5
WORLD_FILES = ("transformer.safetensors", "vae.safetensors")
WORLD_TEXT_SEED = 0
#: a T5 trained together with the world transformer (transformers folder); without it, the seeded tiny T5
WORLD_TEXT_DIR = "text_encoder"
HUB_REPO = "FoundationVision/Infinity"
OFFICIAL_FILES = {
    "transformer": ("infinity_2b_reg.pth",),
    "vae": ("infinity_vae_d32reg.pth", "infinity_vae_d32_reg.pth"),
}
DEFAULT_TEXT_ENCODER = "google/flan-t5-xl"


@dataclass
class InfinityConfig(BackboneConfig):
    """``backbone:`` section for Infinity. ``preset`` picks the architecture; weights come from
    ``transformer`` / ``vae`` / ``text_encoder``, or all three from ``pretrained``. Each is a local
    file or folder (relative to the recipe) or a hub repo (``org/name``, or ``org/name:file``).
    """

    name: str = "infinity"
    pretrained: str | None = field_(None, path=True, hub_id=True,
                                    help="folder with the official files, or the hub repo FoundationVision/Infinity")
    transformer: str | None = field_(None, path=True, hub_id=True,
                                     help="transformer weights: infinity_2b_reg.pth, a folder, or org/repo[:file]")
    vae: str | None = field_(None, path=True, hub_id=True,
                             help="BSQ-VAE weights: infinity_vae_d32reg.pth, a folder, or org/repo[:file]")
    text_encoder: str | None = field_(None, path=True, hub_id=True,
                                      help="T5 encoder: hub id (google/flan-t5-xl) or local folder")
    aspect_ratio: float = field_(1.0, min=1 / 3, max=3.0, help="default h / w of generated images")
    seed: int = field_(0, help="seed of the random weights of parts without a weights file")
    gradient_checkpointing: CheckpointMode = scalewise.gradient_checkpointing_field("infinity-2b")
    checkpoint_keep_attention: bool = scalewise.keep_attention_field()


def sample_bits(logits: torch.Tensor, noise: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Sample every bit from its two logits (B, L, d, 2) with uniform ``noise`` (B, L, d) -> long bits.

    ``top_k == 1`` is greedy; larger ``top_k`` changes nothing for two classes. ``top_p`` makes a bit
    deterministic when its less likely value has probability <= 1 - top_p (as the official sampler).
    """
    p1 = torch.sigmoid(logits[..., 1] - logits[..., 0])
    if top_k == 1:
        return (p1 > 0.5).long()
    if top_p > 0:
        certain = torch.minimum(p1, 1 - p1) <= 1 - top_p
        p1 = torch.where(certain, (p1 > 0.5).to(p1.dtype), p1)
    return (noise < p1).long()


@register_backbone
class InfinityBackbone(ScaleWiseBackbone):
    """Infinity (bitwise next-scale prediction) with its BSQ-VAE and T5 text encoder.

    Generation samples one image per row with classifier-free guidance on the logits; the batch is
    ``[cond rows; uncond rows]`` where the uncond rows read the learned ``cfg_uncond`` text. See
    :meth:`generate` for the attention hooks, step hooks and path dropping.
    """

    name: ClassVar[str] = "infinity"
    Config: ClassVar[type[BackboneConfig]] = InfinityConfig
    presets: ClassVar[dict[str, str]] = PRESETS

    def __init__(self, config: InfinityConfig, transformer: InfinityTransformer, vae: BSQVAE,
                 text_encoder: T5TextEncoder | None, *, resolution: int, weight_dtype: torch.dtype):
        """Assemble a backbone from built parts (``text_encoder=None``: text only as :class:`TextContext`)."""
        super().__init__()
        self.config = config
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.resolution = resolution
        self.aspect_ratio = config.aspect_ratio
        self.weight_dtype = weight_dtype
        self._loss_weights = DeviceCache()

    # ------------------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, config: BackboneConfig, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> "InfinityBackbone":
        if not isinstance(config, InfinityConfig):
            raise TypeError("InfinityBackbone.from_config needs an InfinityConfig")
        has_weights = bool(config.pretrained or config.transformer)
        preset = config.preset or ("infinity-2b" if has_weights else "tiny")
        if preset not in PRESETS:
            raise UserError("backbone.preset", f"unknown preset '{preset}'", f"known: {', '.join(PRESETS)}")
        device = torch.device(device)
        wdtype = scalewise.weight_dtype(config, dtype)
        sources = _weight_sources(config, preset)

        transformer = build_transformer(preset, device=device, seed=None if sources["transformer"] else config.seed)
        transformer.set_dtype(wdtype)
        if sources["transformer"]:
            path = loading.resolve_file(sources["transformer"], "backbone.transformer", OFFICIAL_FILES["transformer"])
            state = loading.transformer_state_dict(loading.load_file(path, "backbone.transformer"))
            loading.load_into(transformer, state, "backbone.transformer", text_maxlen=transformer.cfg.text_maxlen)
        vae = build_vae(preset, device=device, seed=config.seed)
        if sources["vae"]:
            path = loading.resolve_file(sources["vae"], "backbone.vae", OFFICIAL_FILES["vae"])
            raw = loading.load_file(path, "backbone.vae")
            loading.load_into(vae, loading.vae_state_dict(raw, vae), "backbone.vae")
        if config.random_weights and preset not in ("tiny", "world"):
            # the full-size text encoder's shape, random (see T5TextEncoder.random for the tokenizer)
            tdtype = wdtype if device.type == "cuda" else torch.float32
            text = T5TextEncoder.random(FLAN_T5_XL, config.seed, transformer.cfg.text_maxlen, device=device,
                                        dtype=tdtype)
        elif sources["text_encoder"]:
            tdtype = wdtype if device.type == "cuda" else torch.float32
            try:
                text = T5TextEncoder.from_pretrained(sources["text_encoder"], dtype=tdtype,
                                                     max_length=transformer.cfg.text_maxlen)
            except OSError as exc:
                raise UserError("backbone.text_encoder", f"cannot load {sources['text_encoder']} ({str(exc)[:150]})",
                                "expected a T5 hub id (google/flan-t5-xl) or a folder from save_pretrained") from None
        else:
            seed = WORLD_TEXT_SEED if preset == "world" else config.seed  # world: the T5 it was trained with
            text = T5TextEncoder.tiny(seed, max_length=transformer.cfg.text_maxlen)
        text = text.to(device)
        if text.width != transformer.cfg.text_channels:
            raise UserError("backbone.text_encoder", f"the text encoder gives {text.width}-d tokens",
                            f"expected {transformer.cfg.text_channels}-d tokens for preset {preset}")
        resolution = config.resolution or DEFAULT_RESOLUTION[preset]
        backbone = cls(config, transformer.eval(), vae.eval(), text.eval(), resolution=resolution,
                       weight_dtype=wdtype)
        scalewise.configure_checkpointing(transformer, config, transformer.cfg, backbone.scale_schedule())
        return backbone

    # ------------------------------------------------------------------------------ schedule
    @property
    def device(self) -> torch.device:
        return self.transformer.pos_start.device

    @property
    def patch_size(self) -> int:
        return self.vae.patch_size

    def scale_schedule(self, resolution: int | None = None, aspect_ratio: float | None = None) -> Schedule:
        """(h, w) of every scale; 1024 px 1:1 on the 2B preset = 13 scales 1 ... 64."""
        return scale_schedule(resolution or self.resolution, aspect_ratio or self.aspect_ratio, self.patch_size)

    # ------------------------------------------------------------------------------ text
    @property
    def text(self) -> T5TextEncoder:
        if self.text_encoder is None:
            raise RuntimeError("this backbone was built without a text encoder; pass a TextContext")
        return self.text_encoder

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text.tokenize(prompts)

    def token_embeddings(self) -> nn.Embedding:
        return self.text.model.get_input_embeddings()

    def text_encoders(self) -> dict[str, int]:
        """``{"t5": width of the T5 input embeddings}``."""
        return {"t5": self.text.width}

    def word_embeddings(self, text: str) -> dict[str, torch.Tensor]:
        """``{"t5": (n_tokens, width)}``: frozen T5 input embeddings of ``text`` (no ``</s>``)."""
        ids = torch.tensor(self.text.word_ids(text), dtype=torch.long, device=self.device)
        return {"t5": self.token_embeddings()(ids).detach().float()}

    def encode_text(self, prompts: Sequence[str] | None = None, *, input_embeds: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None,
                    learned: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                    hidden_edit: HiddenEdit | None = None) -> TextContext:
        """T5 features of prompts (no grad), or of token embeddings (B, T, E) with mask (gradients flow).

        ``learned`` (placeholder -> ``{"t5": (n, width)}``) splices learned vectors into the prompts'
        input embeddings (see :meth:`ScaleWiseBackbone.encode_text`); gradients flow into them.
        ``hidden_edit`` (with ``learned``) rewrites the last hidden state at the placeholders' positions.
        """
        slots: list[list[tuple[int, str]]] | None = None
        if learned and prompts is not None and input_embeds is None:
            slots = []
            input_embeds, attention_mask = self.text.embed_with_learned(
                prompts, {k: v["t5"] for k, v in learned.items()}, slots=slots)
        if input_embeds is not None:
            if attention_mask is None:
                attention_mask = torch.ones(input_embeds.shape[:2], dtype=torch.long, device=input_embeds.device)
            tokens = self.text(attention_mask=attention_mask, inputs_embeds=input_embeds)
            if hidden_edit is not None and slots:
                tokens = apply_hidden_edit(tokens, slots, "t5", hidden_edit)
            return TextContext(tokens, attention_mask.bool())
        if prompts is None:
            raise ValueError("encode_text needs prompts or input_embeds")
        ids, mask = self.tokenize(prompts)
        with torch.no_grad():
            tokens = self.text(input_ids=ids, attention_mask=mask)
        return TextContext(tokens, mask.bool())

    def text_features(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{"t5": (B, width)}``: the masked mean of T5's last hidden states."""
        return {"t5": self.text.features(prompts)}

    # ------------------------------------------------------------------------------ training
    @torch.no_grad()
    def image_to_targets(self, images: torch.Tensor, schedule: Schedule | None = None) -> ScaleTargets:
        """Images (B, 3, H, W) in [-1, 1] -> per-scale bits (B, h*w, d) and teacher-forcing inputs.

        Images of another size are resized (bicubic, antialiased) to the schedule's size first.
        """
        schedule = list(schedule or self.scale_schedule())
        features = self.vae.encode(scalewise.fit_images(images, self.image_size(schedule), self.device))
        bits, inputs = multiscale_targets(features, schedule)
        return ScaleTargets(targets=bits, inputs=inputs, schedule=schedule)

    # ------------------------------------------------------------------------------ LoRA targets
    def lora_model(self) -> nn.Module:
        return self.transformer

    def adapter_targets(self, ffn: bool = False) -> list[str]:
        """``block_chunks.{c}.module.{j}.`` + ``sa.mat_qkv``, ``sa.proj``, ``ca.mat_q``, ``ca.mat_kv``,
        ``ca.proj`` (and ``ffn.fc1``, ``ffn.fc2``): the official module names."""
        leaves = ["sa.mat_qkv", "sa.proj", "ca.mat_q", "ca.mat_kv", "ca.proj"] + (["ffn.fc1", "ffn.fc2"] if ffn else [])
        n = len(self.transformer.block_chunks[0].module)
        return [f"block_chunks.{i // n}.module.{i % n}.{leaf}" for i in range(self.transformer.cfg.depth)
                for leaf in leaves]

    def text_projections(self) -> list[str]:
        return [name for name in self.adapter_targets() if name.endswith(".ca.mat_kv")]

    def fused_projections(self) -> dict[str, int]:
        """``sa.mat_qkv`` (q|k|v) and ``ca.mat_kv`` (k|v)."""
        return {name: 3 if name.endswith(".sa.mat_qkv") else 2 for name in self.adapter_targets()
                if name.endswith((".sa.mat_qkv", ".ca.mat_kv"))}

    def text_projection_inputs(self, text: TextContext) -> dict[str, torch.Tensor]:
        """Every block's ``ca.mat_kv`` reads the same projected T5 features (``text_proj_for_ca``)."""
        cond = self.transformer.condition(text.tokens.to(self.device), text.mask.to(self.device))
        return dict.fromkeys(self.text_projections(), cond.tokens)

    def teacher_forcing_logits(self, text: TextContext, targets: ScaleTargets, *, hooks: Sequence[AttentionHook] = (),
                               paths: Sequence[str] | None = None,
                               cross_text: TextContext | None = None) -> list[torch.Tensor]:
        """fp32 logits per scale, (B, h_i*w_i, d, 2), from one block-causal pass over all scales.

        ``cross_text``: what the cross-attention reads (sos and AdaLN still from ``text``).
        """
        tr = self.transformer
        cond = tr.condition(text.tokens.to(self.device), text.mask.to(self.device))
        cross = None
        if cross_text is not None:
            cross = tr.condition(cross_text.tokens.to(self.device), cross_text.mask.to(self.device))
        logits = tr.teacher_forcing(cond, targets.inputs.to(self.device), targets.schedule, hooks=hooks,
                                    paths=list(paths) if paths is not None else None, cross=cross)
        return scalewise.split_scales(logits, targets.schedule)

    def teacher_forcing_loss(self, logits: list[torch.Tensor], targets: ScaleTargets,
                             scale_weights: Sequence[float] | None = None) -> torch.Tensor:
        """The official loss: per-bit cross-entropy averaged over bits, tokens weighted by
        ``sqrt(last area / scale area)`` normalised to sum 1 over the sequence, mean over the batch.
        ``scale_weights[i]`` then multiplies the terms of scale ``i`` (no renormalisation).
        """
        schedule = targets.schedule[: len(logits)]
        flat_logits = torch.cat(logits, dim=1)
        if scale_weights is not None and len(scale_weights) < len(schedule):
            raise ValueError(f"{len(scale_weights)} scale weights for {len(schedule)} scales")
        sw = tuple(float(s) for s in scale_weights[: len(schedule)]) if scale_weights is not None else None
        key = (tuple(map(tuple, schedule)), tuple(targets.schedule[-1]), sw, str(flat_logits.device))
        lw = self._loss_weights.get(key, lambda: _token_weights(schedule, targets.schedule[-1], sw)
                                    .to(flat_logits.device))
        bits = torch.cat(targets.targets[: len(logits)], dim=1).to(flat_logits.device)
        ce = F.cross_entropy(flat_logits.permute(0, 3, 1, 2), bits, reduction="none").mean(-1)
        return (ce * lw).sum(-1).mean()

    def teacher_forcing_losses(self, logits: list[torch.Tensor], targets: ScaleTargets, scales: Sequence[int],
                               ) -> dict[int, torch.Tensor]:
        """ℓ_k of every scale ``k`` in ``scales``: what :meth:`teacher_forcing_loss` gives for scale ``k``
        alone (its tokens' bit cross-entropy, a token mean), from one cross-entropy over the scales."""
        scales = list(scales)
        dev = logits[scales[0]].device
        flat = torch.cat([logits[k] for k in scales], dim=1)
        bits = torch.cat([targets.targets[k] for k in scales], dim=1).to(dev)
        ce = F.cross_entropy(flat.permute(0, 3, 1, 2), bits, reduction="none").mean(-1)
        out = {}
        for k, part in zip(scales, ce.split([logits[k].shape[1] for k in scales], dim=1)):
            one = (tuple(targets.schedule[k]),)
            lw = self._loss_weights.get((one, one[0], None, str(dev)),
                                        lambda one=one: _token_weights(one, one[0]).to(dev))
            out[k] = (part * lw).sum(-1).mean()
        return out

    # ------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_codes(
        self,
        prompts: Sequence[str] | TextContext,
        *,
        cfg: float | Sequence[float] = 3.0,
        tau: float | Sequence[float] = 1.0,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int | Sequence[int] = 0,
        schedule: Schedule | None = None,
        hooks: Sequence[AttentionHook] = (),
        step_hooks: Sequence[StepHook] = (),
        paths: Sequence[str] | None = None,
        progress: bool = False,
        cross_text: Sequence[tuple[int, TextContext]] = (),
    ) -> GenerationOutput:
        """The sampling loop of :meth:`generate`, returning accumulated codes instead of images."""
        tr = self.transformer
        schedule = list(schedule or self.scale_schedule())
        text = prompts if isinstance(prompts, TextContext) else self.encode_text(prompts)
        b = text.tokens.shape[0]
        dev = self.device
        rows = scalewise.SampleRows(b, paths, seed, dev)
        n_scales = len(schedule)
        cfgs, taus = per_scale(cfg, n_scales, "cfg"), per_scale(tau, n_scales, "tau")
        guided = any(c != 1.0 for c in cfgs)
        d = tr.cfg.codebook_dim

        tokens, mask = text.tokens.to(dev).float(), text.mask.to(dev).bool()
        if guided:
            tokens, mask = torch.cat([tokens, tr.null_text(mask)]), torch.cat([mask, mask])
        cond = tr.condition(tokens, mask)
        texts = tr.block_text(cond)
        cache = KVCache(tr.cfg.depth, tokens.shape[0], tr.cfg.heads, num_tokens(schedule), tr.cfg.head_dim,
                        tr.compute_dtype, dev)
        cos, sin = rope_tables(schedule, tr.cfg.head_dim, tr.cfg.rope_base, device=dev)
        final = tuple(schedule[-1])
        acc = torch.zeros(b, d, *final, device=dev)
        labels: list[torch.Tensor] = []
        x = tr.sos(cond)
        start = 0
        switches = {int(at): t for at, t in cross_text}
        for si in scalewise.progress_steps(n_scales, progress, "infinity"):
            h, w = schedule[si]
            n = h * w
            cur = rows.current()
            if si in switches:  # cross-attention reads another text from this scale on (rows alive, CFG half kept)
                texts = self._switch_cross_text(switches[si], rows.alive, texts, guided)
            ctx = scalewise.step_context(si, cache, hooks, cur, guided)
            hidden = tr.run_blocks(x + tr.level(si), cond, texts, (cos[start:start + n], sin[start:start + n]), ctx)
            cache.length += n
            start += n
            logits = tr.logits(hidden, cond) / taus[si]
            if guided:
                nb = len(cur)
                logits = cfgs[si] * logits[:nb] + (1 - cfgs[si]) * logits[nb:]
            noise = torch.stack([torch.rand(n, d, generator=g, device=dev) for g in rows.gens])
            bits = sample_bits(logits, noise, top_k, top_p)
            bits, drop, _ = scalewise.run_step_hooks(step_hooks, si, schedule, bits, cur, logits)
            labels.append(bits)
            acc = acc + resize_up(bits_to_codes(bits, h, w), final)
            if si + 1 < n_scales:
                x = tr.embed_codes(resize_up(acc, schedule[si + 1]).flatten(2).transpose(1, 2))
                if guided:
                    x = torch.cat([x, x])
            kept = rows.drop(drop, guided) if drop and si + 1 < n_scales else None
            if kept is not None:
                idx, full = kept
                acc, x = acc.index_select(0, idx), x.index_select(0, full)
                cond = cond.index(full)
                texts = [t.index(full) for t in texts]
                cache.keep(full)
                if not rows.alive:
                    break
        return rows.output(acc, labels)

    def _switch_cross_text(self, text: TextContext, alive: list[int], texts: list[Any], guided: bool) -> list[Any]:
        """Per-block cross-attention keys/values of ``text``'s rows ``alive``; the uncond half is kept."""
        tr = self.transformer
        idx = torch.tensor(alive, dtype=torch.long, device=self.device)
        tokens = text.tokens.to(self.device).float().index_select(0, idx)
        mask = text.mask.to(self.device).bool().index_select(0, idx)
        new = tr.block_text(tr.condition(tokens, mask))
        if not guided:
            return new
        nb = len(alive)
        out = []
        for old_t, new_t in zip(texts, new):
            un = old_t.index(torch.arange(nb, 2 * nb, device=self.device))
            t = max(new_t.k.shape[2], un.k.shape[2])
            k, v, m = (torch.cat([_pad_to(a, t, dim), _pad_to(b, t, dim)])
                       for a, b, dim in ((new_t.k, un.k, 2), (new_t.v, un.v, 2), (new_t.mask, un.mask, 1)))
            out.append(type(old_t)(k, v, m))
        return out

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Accumulated codes (B, d, h, w) -> images (B, 3, H, W) in [-1, 1]."""
        dev = self.device
        half = self.weight_dtype != torch.float32
        with torch.no_grad(), torch.autocast(dev.type, dtype=self.weight_dtype, enabled=half):
            return self.vae.decode(codes.to(dev))

    def generate(
        self,
        prompts: Sequence[str] | TextContext,
        *,
        cfg: float | Sequence[float] = 3.0,
        tau: float | Sequence[float] = 1.0,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int | Sequence[int] = 0,
        schedule: Schedule | None = None,
        hooks: Sequence[AttentionHook] = (),
        step_hooks: Sequence[StepHook] = (),
        paths: Sequence[str] | None = None,
        output_paths: Sequence[str] | None = None,
        progress: bool = True,
        cross_text: Sequence[tuple[int, TextContext]] = (),
    ) -> list["Image.Image | None"]:
        """Sample one image per row (prompt); see :meth:`ScaleWiseBackbone.generate`.

        ``cfg``/``tau`` may be per-scale lists; row ``i`` draws its randomness from ``seed + i``
        (or ``seed[i]``), so a row's image does not depend on the other rows. Rows dropped by a step
        hook, and rows whose path is not in ``output_paths``, give ``None``.
        """
        out = self.generate_codes(prompts, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, seed=seed, schedule=schedule,
                                  hooks=hooks, step_hooks=step_hooks, paths=paths, progress=progress,
                                  cross_text=cross_text)
        return out.images(self.decode, output_paths)


def _token_weights(schedule: Sequence[Sequence[int]], last: Sequence[int],
                   scale_weights: Sequence[float] | None = None) -> torch.Tensor:
    """(L,) loss weight of every token: ``sqrt(last area / scale area)`` normalised to sum 1, times
    ``scale_weights[i]`` on scale ``i`` (official Infinity loss), on the CPU."""
    top = math.sqrt(last[0] * last[1])
    lw = torch.cat([torch.full((h * w,), top / math.sqrt(h * w)) for h, w in schedule])
    lw = lw / lw.sum()
    if scale_weights is not None:
        lw = lw * torch.cat([torch.full((h * w,), float(s)) for (h, w), s in zip(schedule, scale_weights)])
    return lw


def _pad_to(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero-pad ``x`` along ``dim`` to ``length`` (False for bool masks)."""
    return F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, length - x.shape[dim]])


def _weight_sources(config: InfinityConfig, preset: str) -> dict[str, str | None]:
    """Where each part's weights come from (None = random from the seed)."""
    sources: dict[str, str | None] = {"transformer": config.transformer, "vae": config.vae,
                                      "text_encoder": config.text_encoder}
    if config.random_weights:  # every part random from config.seed, no file read
        return dict.fromkeys(sources)
    root = config.pretrained or (HUB_REPO if preset == "infinity-2b" else None)
    if root is not None:
        sources["transformer"] = sources["transformer"] or root
        sources["vae"] = sources["vae"] or root
        local_t5 = Path(root).expanduser() / "flan-t5-xl"
        if sources["text_encoder"] is None and local_t5.is_dir():
            sources["text_encoder"] = str(local_t5)
    if preset == "infinity-2b":
        sources["text_encoder"] = sources["text_encoder"] or DEFAULT_TEXT_ENCODER
    if preset == "world" and not (sources["transformer"] and sources["vae"]):
        from .._world import world_weights

        root = world_weights("infinity", WORLD_FILES)
        sources["transformer"] = sources["transformer"] or str(root / "transformer.safetensors")
        sources["vae"] = sources["vae"] or str(root / "vae.safetensors")
        if sources["text_encoder"] is None and (root / WORLD_TEXT_DIR).is_dir():  # a T5 trained with it
            sources["text_encoder"] = str(root / WORLD_TEXT_DIR)
    return sources
