"""Backbone interfaces: what methods may use of a generative model.

Two families, as in DESIGN.md:

* :class:`DiffusionBackbone` (SDXL): components, prompt/image encoding, the denoising loss and a
  diffusers pipeline that shares the same modules for sampling.
* :class:`ScaleWiseBackbone` (Infinity, Switti): next-scale prediction with a scale schedule,
  teacher forcing and generation with attention hooks.

Methods only talk to these interfaces; the core never names a concrete backbone.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Literal, Mapping, Protocol, Sequence

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


@dataclass
class BackboneConfig:
    """Options common to every backbone (the recipe's ``backbone:`` section).

    ``preset`` picks an architecture (``tiny`` builds offline from a seed); ``pretrained`` is a hub
    id or a local directory/file with real weights. Backbones subclass this to add their own keys.
    """

    name: str = ""
    preset: str | None = None
    pretrained: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    resolution: int | None = None
    random_weights: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "build every part of a full-size preset with random weights from a seed, reading no files"
        },
    )


#: Learned tokens for textual inversion: placeholder string (e.g. ``"<c>"``) -> encoder key
#: (see ``text_encoders()``) -> vectors (n, width). Every occurrence of the placeholder in a
#: prompt is replaced by the n vectors in that encoder's input embeddings. Saved as one
#: safetensors per placeholder with one key per encoder (the layout diffusers'
#: ``load_textual_inversion`` takes for SDXL: ``clip_l``/``clip_g``).
LearnedTokens = Mapping[str, Mapping[str, torch.Tensor]]

#: Edit of the text encoder's last hidden state at the positions of a learned placeholder:
#: ``fn(placeholder, encoder key, rows (k, width)) -> rows (k, width)``, called once per prompt,
#: encoder and placeholder that occurs (its k = n vectors per occurrence). Pooled vectors are
#: computed before the edit (as the official CSD-VAR ``models/clip.py`` does).
HiddenEdit = Callable[[str, str, torch.Tensor], torch.Tensor]


@functools.lru_cache(maxsize=64)
def _positions(positions: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An index tensor of ``positions`` on ``device``, made once (no host-to-device copy per step)."""
    return torch.tensor(positions, device=device)


def apply_hidden_edit(hidden: torch.Tensor, slots: Sequence[Sequence[tuple[int, str]]], key: str,
                      edit: HiddenEdit) -> torch.Tensor:
    """``hidden`` (B, T, W) with ``edit`` applied to the rows of each placeholder's ``slots``
    ((position, placeholder) per prompt); a new tensor, gradients flow through the edit."""
    rows = list(hidden.unbind(0))
    for b, row_slots in enumerate(slots):
        by_ph: dict[str, list[int]] = {}
        for pos, ph in row_slots:
            by_ph.setdefault(ph, []).append(pos)
        if not by_ph:
            continue
        row = rows[b]
        for ph, positions in by_ph.items():
            idx = _positions(tuple(positions), hidden.device)
            row = row.index_put((idx,), edit(ph, key, row[idx]))
        rows[b] = row
    return torch.stack(rows)


class Backbone(nn.Module):
    """Base of every backbone wrapper."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    Config: ClassVar[type[BackboneConfig]] = BackboneConfig
    #: preset name -> one-line description; ``tiny`` must exist and build offline.
    presets: ClassVar[dict[str, str]] = {}

    config: BackboneConfig

    @classmethod
    def from_config(
        cls, config: BackboneConfig, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> "Backbone":
        """Build the backbone from a validated config.

        ``dtype`` is the frozen weights' dtype picked by the runtime from ``mixed_precision``
        when ``config.dtype`` is ``auto``.
        """
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def freeze(self) -> None:
        """Freeze every weight of the base model."""
        self.requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Diffusion family
# --------------------------------------------------------------------------------------------
@dataclass
class PromptEmbeds:
    """Text conditioning of a diffusion backbone for a batch of prompts."""

    prompt_embeds: torch.Tensor  # (B, T, D) cross-attention context
    pooled: torch.Tensor | None = None  # (B, P) pooled text embedding (SDXL)
    extra: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def to(self, *args: Any, **kwargs: Any) -> "PromptEmbeds":
        return PromptEmbeds(
            self.prompt_embeds.to(*args, **kwargs),
            None if self.pooled is None else self.pooled.to(*args, **kwargs),
            {k: v.to(*args, **kwargs) for k, v in self.extra.items()},
        )

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]


class DiffusionBackbone(Backbone):
    """A latent diffusion model (SDXL) with its text encoders, VAE and scheduler.

    Attributes every implementation provides: ``unet``, ``vae``, ``text_encoder_modules`` (list),
    ``tokenizers`` (list), ``noise_scheduler`` (training), ``resolution`` (pixels) and
    ``weight_dtype`` (dtype of the frozen weights).
    """

    family: ClassVar[str] = "diffusion"

    unet: nn.Module
    vae: nn.Module
    resolution: int
    weight_dtype: torch.dtype

    def encode_prompt(
        self, prompts: Sequence[str], *, learned: "LearnedTokens | None" = None
    ) -> PromptEmbeds:
        """Encode prompts with the frozen text encoders.

        Without ``learned`` this runs without grad. With ``learned`` (see :data:`LearnedTokens`)
        every occurrence of a placeholder is replaced by its vectors in each encoder's input
        embeddings and gradients flow into them (the encoders stay frozen).
        """
        raise NotImplementedError

    def text_encoders(self) -> dict[str, int]:
        """Encoder key -> input-embedding width, e.g. ``{"clip_l": 768, "clip_g": 1280}``."""
        raise NotImplementedError

    def word_embeddings(self, text: str) -> dict[str, torch.Tensor]:
        """Per encoder, the frozen input embeddings (n_tokens, width) of ``text``'s tokens
        (no special or padding tokens)."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (no grad)."""
        raise NotImplementedError

    def training_loss(
        self,
        latents: torch.Tensor,
        cond: PromptEmbeds,
        *,
        generator: torch.Generator | None = None,
        timesteps: torch.Tensor | None = None,
        reduction: Literal["mean", "none"] = "mean",
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoising loss (noise-prediction MSE) of the UNet on ``latents`` with ``cond``.

        Noise and timesteps are drawn from ``generator`` so that training is reproducible, unless
        given (``noise`` like ``latents``, ``timesteps`` (B,)).
        """
        raise NotImplementedError

    def attention_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """(qualified name, diffusers Attention module) for every attention layer of the UNet.

        Names follow diffusers, e.g. ``up_blocks.0.attentions.1.transformer_blocks.0.attn2``.
        """
        raise NotImplementedError

    def pipeline(self) -> Any:
        """A diffusers ``StableDiffusionXLPipeline`` sharing this backbone's modules."""
        raise NotImplementedError

    def sample(
        self,
        prompts: Sequence[str],
        *,
        num_images: int = 1,
        seed: int = 0,
        steps: int = 30,
        guidance_scale: float = 7.0,
        height: int | None = None,
        width: int | None = None,
        progress: bool = True,
    ) -> list["Image.Image"]:
        """Generate ``num_images`` per prompt with the current (possibly adapted) UNet."""
        raise NotImplementedError

    def sample_batch(self, height: int | None = None, width: int | None = None) -> int:
        """How many images :meth:`sample` denoises at once at this size (methods that drive the
        pipeline themselves batch the same way)."""
        return 4


# --------------------------------------------------------------------------------------------
# Scale-wise family
# --------------------------------------------------------------------------------------------
@dataclass
class AttentionCall:
    """What a hook sees in one self-attention call of a scale-wise model.

    ``q`` is (B, H, Lq, Dh) after RoPE and normalisation; ``k``/``v`` (B, H, Lk, Dh) include the
    KV cache of earlier scales. ``paths`` names what each batch row is (e.g. ``["content",
    "style", "generation"]``, doubled for CFG as ``cond``/``uncond`` halves, see ``cfg_half``).
    A hook returns ``None`` to keep the call as is, or an :class:`AttentionEdit`; it must not
    modify the tensors in place (they are the KV cache).

    During generation ``step`` is the scale index (0-based) and ``token_scales`` is ``None``.
    Under teacher forcing (one pass over all scales) ``step`` is -1 and ``token_scales`` (Lq,)
    gives the scale index of every query token (keys are the same tokens).
    """

    step: int  # scale index, 0-based; -1 under teacher forcing
    block: int  # transformer block index
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    paths: list[str]
    cfg_half: list[str]  # per row: "cond" or "uncond"
    token_scales: torch.Tensor | None = None


@dataclass
class AttentionEdit:
    """A hook's answer: replace q, k, v (same shapes) and/or append extra k/v, for this call only.

    The KV cache keeps the model's own k/v whatever a hook returns. ``extra_k``/``extra_v``
    (B, H, Le, Dh) are appended after the (possibly replaced) keys and never cached;
    ``extra_mask`` (B, Le) or (B, Lq, Le), True = visible, limits which rows (and queries) see them
    (default: all).
    """

    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    extra_k: torch.Tensor | None = None
    extra_v: torch.Tensor | None = None
    extra_mask: torch.Tensor | None = None


class AttentionHook(Protocol):
    def __call__(self, call: AttentionCall) -> AttentionEdit | None: ...


@dataclass
class StepCall:
    """What a step hook sees after the labels of one scale were sampled (one row per image, no CFG
    doubling): ``labels`` (B, h*w, bits) for bitwise models or (B, h*w) code indices, in the format
    of :attr:`ScaleTargets.targets`; ``paths`` the path of each row still in the batch."""

    step: int
    schedule: list[tuple[int, int]]
    labels: torch.Tensor
    paths: list[str]
    logits: torch.Tensor | None = None  # the (guided, tempered) logits the labels were sampled from


@dataclass
class StepEdit:
    """A step hook's answer. ``labels`` (same shape) replace the sampled ones before they are
    accumulated (e.g. teacher-forcing some rows with an image's targets); rows whose path is in
    ``drop_paths`` leave the batch, its KV cache and its text before the next step (their image is
    not produced). A path may only be dropped once no remaining row reads it."""

    labels: torch.Tensor | None = None
    drop_paths: Sequence[str] = ()


class StepHook(Protocol):
    def __call__(self, call: StepCall) -> StepEdit | None: ...


@dataclass
class ScaleTargets:
    """Ground truth of an image for teacher forcing on a scale-wise model.

    ``targets[i]``: per-scale labels (bits (B, h_i*w_i, bits) or code indices (B, h_i*w_i));
    ``inputs``: teacher-forcing input tokens for scales 1..S-1, (B, L - L_0, C).
    """

    targets: list[torch.Tensor]
    inputs: torch.Tensor
    schedule: list[tuple[int, int]]

    def clone(self) -> "ScaleTargets":
        """A copy in tensors of its own (e.g. the fixed tensors a captured CUDA graph step reads)."""
        return ScaleTargets([t.clone() for t in self.targets], self.inputs.clone(), list(self.schedule))

    def copy_(self, other: "ScaleTargets") -> None:
        """Overwrite these tensors with ``other``'s (same shapes), in place."""
        with torch.no_grad():
            for dst, src in zip(self.targets, other.targets):
                dst.copy_(src)
            self.inputs.copy_(other.inputs)


@dataclass
class TextContext:
    """Encoded text of a scale-wise backbone (padded) with its mask and pooled vector."""

    tokens: torch.Tensor  # (B, T, D)
    mask: torch.Tensor  # (B, T) bool, True = real token
    pooled: torch.Tensor | None = None  # (B, P) where the backbone has one

    def index(self, idx: Any) -> "TextContext":
        return TextContext(self.tokens[idx], self.mask[idx], None if self.pooled is None else self.pooled[idx])

    def clone(self) -> "TextContext":
        """A copy in tensors of its own (e.g. the fixed tensors a captured CUDA graph step reads)."""
        return TextContext(self.tokens.clone(), self.mask.clone(), None if self.pooled is None else self.pooled.clone())

    def copy_(self, other: "TextContext") -> None:
        """Overwrite these tensors with ``other``'s (same shapes), in place (the pooled vector where both have
        one)."""
        with torch.no_grad():
            self.tokens.copy_(other.tokens)
            self.mask.copy_(other.mask)
            if self.pooled is not None and other.pooled is not None:
                self.pooled.copy_(other.pooled)


class ScaleWiseBackbone(Backbone):
    """A next-scale prediction model (Infinity, Switti) with its tokenizer/VAE and text encoder."""

    family: ClassVar[str] = "scalewise"

    #: dtype of the frozen transformer projections (bf16 on a GPU with ``mixed_precision: bf16``); a few small
    #: parameters (position/level embeddings) may stay float32
    weight_dtype: torch.dtype

    def scale_schedule(self, resolution: int | None = None, aspect_ratio: float = 1.0) -> list[tuple[int, int]]:
        """(h, w) token grid of every scale for a resolution and aspect ratio (h / w)."""
        raise NotImplementedError

    #: pixels per token side of the image tokenizer (VAE / VQ-VAE)
    patch_size: int

    def image_size(self, schedule: list[tuple[int, int]] | None = None) -> tuple[int, int]:
        """Pixel (H, W) of the images of ``schedule`` (default: the backbone's own schedule)."""
        h, w = (schedule or self.scale_schedule())[-1]
        return h * self.patch_size, w * self.patch_size

    def sample_batch(self, schedule: list[tuple[int, int]] | None = None) -> int:
        """Rows that methods sampling many prompts give :meth:`generate` at once: as many as 8 images at
        1024 px take in pixels (64 at most)."""
        h, w = self.image_size(schedule)
        return max(1, min(64, 8 * 1024 * 1024 // (h * w)))

    def preprocess(
        self, images: Sequence["Image.Image"], schedule: list[tuple[int, int]] | None = None
    ) -> torch.Tensor:
        """PIL images -> (B, 3, H, W) in [-1, 1], resized and centre-cropped to the schedule's size."""
        from .io import image_to_tensor

        size = self.image_size(schedule)
        return torch.stack([image_to_tensor(im, size) for im in images]).to(self.device)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) and attention mask (B, T) for the text encoder."""
        raise NotImplementedError

    def token_embeddings(self) -> nn.Embedding:
        """The text encoder's input embedding table (for textual inversion)."""
        raise NotImplementedError

    def text_encoders(self) -> dict[str, int]:
        """Encoder key -> input-embedding width (Infinity: ``{"t5": d_model}``; Switti:
        ``{"clip_l": 768, "clip_g": 1280}``)."""
        raise NotImplementedError

    def word_embeddings(self, text: str) -> dict[str, torch.Tensor]:
        """Per encoder, the frozen input embeddings (n_tokens, width) of ``text``'s tokens
        (no special or padding tokens): to initialise learned tokens from a word, or as the
        sub-concept vectors of CSD-VAR's SVD rectification."""
        raise NotImplementedError

    def encode_text(
        self,
        prompts: Sequence[str] | None = None,
        *,
        input_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        learned: "LearnedTokens | None" = None,
        hidden_edit: "HiddenEdit | None" = None,
    ) -> TextContext:
        """Encode prompts, or token embeddings (B, T, E) with their mask (gradients flow).

        With ``learned`` (see :data:`LearnedTokens`) every occurrence of a placeholder string in
        a prompt is replaced by its n vectors in each encoder's input embeddings (the token count
        grows by n - 1 per occurrence); gradients flow into the learned tensors, the encoders stay
        frozen. ``hidden_edit`` (with ``learned``; see :data:`HiddenEdit`) rewrites each encoder's
        last hidden state at the placeholders' positions. Without them the behaviour is unchanged.
        """
        raise NotImplementedError

    def text_features(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per encoder (keys of ``text_encoders()``), one feature per prompt (B, width) in the space
        of that encoder's last hidden state: CLIP the pooled (EOS) state, T5 the masked mean. No grad."""
        raise NotImplementedError

    def image_to_targets(self, images: torch.Tensor, schedule: list[tuple[int, int]] | None = None) -> ScaleTargets:
        """Images (B, 3, H, W) in [-1, 1] -> per-scale targets and teacher-forcing inputs."""
        raise NotImplementedError

    # ------------------------------------------------------------------ LoRA targets
    def lora_model(self) -> nn.Module:
        """The module LoRA target names are relative to (the transformer; its submodule names are the
        official checkpoint's, so a saved adapter also fits the official model class)."""
        raise NotImplementedError

    def adapter_targets(self, ffn: bool = False) -> list[str]:
        """Names (in :meth:`lora_model`) of the ``nn.Linear`` layers a LoRA adapts: every transformer
        block's attention projections (self- and cross-attention q/k/v/out), with ``ffn`` also the
        feed-forward layers."""
        raise NotImplementedError

    def text_projections(self) -> list[str]:
        """The adapter targets that read text tokens instead of image tokens (cross-attention k/v)."""
        raise NotImplementedError

    def fused_projections(self) -> dict[str, int]:
        """The adapter targets (``ffn`` included) that compute several projections in one linear layer, with
        how many: name -> k, the output features being k equal consecutive parts (q|k|v: 3, k|v: 2).
        Default: none (every target is one projection)."""
        return {}

    def text_projection_inputs(self, text: TextContext) -> dict[str, torch.Tensor]:
        """What each of :meth:`text_projections` reads for ``text``: name -> (B, T, in_features)."""
        raise NotImplementedError

    def scale_groups(self, n_scales: int) -> tuple[list[int], list[int]]:
        """The structural groups of a schedule of ``n_scales`` scales: (style scales, content scales).

        Default: the first ``round(0.3 n)`` scales (at least one, at most n - 1) carry the style, the
        rest the content, as CSD-VAR measured (Switti-512: {0, 1, 2} / {3..9})."""
        n_style = min(max(1, round(0.3 * n_scales)), n_scales - 1)
        return list(range(n_style)), list(range(n_style, n_scales))

    def teacher_forcing_logits(
        self,
        text: TextContext,
        targets: ScaleTargets,
        *,
        hooks: Sequence[AttentionHook] = (),
        paths: Sequence[str] | None = None,
        cross_text: TextContext | None = None,
    ) -> list[torch.Tensor]:
        """Logits per scale under teacher forcing (one forward over all scales, block-causal).

        ``hooks`` see every self-attention call with ``step == -1`` (see :class:`AttentionCall`).
        ``cross_text`` (same rows as ``text``), when given, is what the cross-attention layers read;
        the first-scale input and the AdaLN condition still come from ``text`` (CSD-VAR trains
        with the full prompt's pooled vector and a content or style prompt as context).
        """
        raise NotImplementedError

    def teacher_forcing_loss(
        self, logits: list[torch.Tensor], targets: ScaleTargets, scale_weights: Sequence[float] | None = None
    ) -> torch.Tensor:
        """The official training loss; ``scale_weights`` multiplies each scale's term."""
        raise NotImplementedError

    def teacher_forcing_losses(
        self, logits: list[torch.Tensor], targets: ScaleTargets, scales: Sequence[int]
    ) -> dict[int, torch.Tensor]:
        """The loss of each scale ``k`` of ``scales`` alone (``teacher_forcing_loss`` on that scale's logits
        and targets). Backbones may compute them in one pass; the values must be the same."""
        out = {}
        for k in scales:
            one = ScaleTargets(targets=[targets.targets[k]], inputs=targets.inputs, schedule=[targets.schedule[k]])
            out[k] = self.teacher_forcing_loss([logits[k]], one)
        return out

    def generate(
        self,
        prompts: Sequence[str] | TextContext,
        *,
        cfg: float = 3.0,
        tau: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int | Sequence[int] = 0,
        schedule: list[tuple[int, int]] | None = None,
        hooks: Sequence[AttentionHook] = (),
        step_hooks: Sequence[StepHook] = (),
        paths: Sequence[str] | None = None,
        output_paths: Sequence[str] | None = None,
        progress: bool = True,
        cross_text: Sequence[tuple[int, TextContext]] = (),
    ) -> list["Image.Image | None"]:
        """Sample one image per prompt (row), calling ``hooks`` in every self-attention call.

        ``cross_text``: ``(scale, text)`` pairs (same rows as ``prompts``); from that scale on the
        cross-attention layers read ``text`` instead of the prompts' own (the unconditional CFG
        half is unchanged); the first-scale input and the AdaLN condition stay from ``prompts``.
        CSD-VAR samples with the style prompt as context on the early scales and the content
        prompt after.

        Row ``i`` draws its randomness from ``seed + i`` (or ``seed[i]``): a row's image does not
        depend on the other rows of the batch. ``paths`` names each row (default ``""``); after each
        scale every ``step_hooks`` entry gets a :class:`StepCall` and may override the sampled
        labels of chosen rows or drop paths from the batch (see :class:`StepEdit`). Only rows still
        in the batch at the end whose path is in ``output_paths`` (default: all) are decoded;
        the others give ``None``.
        """
        raise NotImplementedError
