"""CSD-VAR: content-style decomposition in visual autoregressive models (registry name ``csd_var``).

Paper: Q.-B. Nguyen, M. Luu, Q. Nguyen, A. Tran, K. Nguyen, "CSD-VAR: Content-Style Decomposition
in Visual Autoregressive Models", ICCV 2025 (official code: visual-ar-group/CSD-VAR, Switti-AR).

Textual inversion of a content token ``<c>`` and a style token ``<s>`` (4 vectors each) on a frozen
scale-wise model, with three additions, each switchable (the paper's ablation, Tab. 2):

* scale-aware alternating optimisation (Eq. 8-9, :func:`style_loss`, :func:`content_loss`):
  style and content steps alternate; a style step reads the style prompt as context and is
  trained on the early scales plus λ times the rest, a content step reads the content prompt
  and is trained on the content scales (:func:`scale_groups` derives the groups from the
  backbone's schedule);
* SVD rectification of the style token (Eq. 10-11, :func:`variation_projectors`,
  :func:`style_hidden_edit`): the top-r right singular vectors of the text features of 200
  variation prompts of the content word span a content subspace, removed from the text encoder's
  last hidden state at ``<s>`` (official ``extract_svd.py`` + ``models/clip.py``; ``svd_mode:
  embedding`` removes a sub-concept subspace from the ``<s>`` input vectors instead);
* augmented K-V memory (Eq. 12, :class:`KVMemory`): learned keys/values (Xavier init) appended in
  the self-attention of the first block, the style memory from the first scale on, the content
  memory from the first content scale (the paper's fourth scale on Switti) on.

Defaults follow the official code (docs/methods/csd_var.md lists each detail with file and line):
captions with the class and style words beside the tokens, first-sub-token init, one AdamW over
tokens and memories, warm-up, flips, caption dropout, the step-150 checkpoint.

Sampling (official inference): the input words written before the tokens, ``<s>`` rectified at the
encoder's output, the prompt's own text everywhere unless a style context prompt is given for the
early scales; the memories of the used roles are appended.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from cstoolkit.backbone import (
    AttentionCall,
    AttentionEdit,
    ScaleTargets,
    ScaleWiseBackbone,
    TextContext,
)
from cstoolkit.config import field_
from cstoolkit.cuda_graph import GraphedStep, cuda_graphs_available, graph_steps, on_capture_stream, release_graphs
from cstoolkit.errors import UserError
from cstoolkit.method import CONTENT_TOKEN, STYLE_TOKEN, Method
from cstoolkit.registry import register_method
from cstoolkit.runtime import TrainState

from ._learned_tokens import (
    EMBEDS_FILE,
    hflip_targets,
    init_vectors,
    learned_for,
    load_token,
    pick,
    pick_index,
    scalewise_sample_options,
    token_file,
    warmup_lr,
)

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from cstoolkit.decomposition import Decomposition
    from cstoolkit.runtime import Runtime

log = logging.getLogger(__name__)
notes = logging.getLogger("cstoolkit.notes")  # shown by the CLI at INFO: where the SVD basis came from
#: warn when rectification keeps less of the style word's embedding than this (docs/methods/csd_var.md)
KEPT_WARNING = 0.7

MEMORY_FILE = "kv_memory.safetensors"
SVD_FILE = "svd_basis.safetensors"
SUBCONCEPTS = Path(__file__).parent / "data" / "subconcepts.yaml"
ROLES = ("content", "style")


@dataclass
class CSDVARConfig:
    """Hyper-parameters: the paper's (Sec. 6.1) and, where it is silent, the official code's
    (visual-ar-group/CSD-VAR; docs/methods/csd_var.md lists each with file and line)."""

    steps: int = field_(151, min=1, help="optimisation steps (batch 1); 151 = the official benchmark's step-150 "
                                          "checkpoint of its 200-step run (iterations 0..150)")
    lr: float = field_(1e-2, min=0.0, help="peak learning rate (official run script: 1e-2)")
    warmup_steps: int = field_(50, min=0, help="linear learning-rate warm-up (official: 50)")
    warmup_start: float = field_(0.005, min=0.0, max=1.0, help="lr ratio at step 0 of the warm-up (official wp0)")
    lr_end_ratio: float = field_(1.0, min=0.0, help="lin0 decay to this lr ratio after warm-up (official wpe: 1, "
                                                    "i.e. constant)")
    optimizer: Literal["adamw_joint", "adam_per_role"] = field_(
        "adamw_joint", help="adamw_joint: one AdamW over both tokens and both memories, every step (official); "
                            "adam_per_role: one Adam per role, a step moves only its role (ours before)")
    betas: list[float] = field_([0.9, 0.95], min=0.0, max=1.0, help="AdamW betas (official: 0.9, 0.95)")
    weight_decay: float = field_(0.05, min=0.0, help="AdamW weight decay (official: 0.05)")
    grad_clip: float = field_(1.0, min=0.0, help="gradient-norm clip per step; 0 = off (official: 1.0)")
    hflip: bool = field_(True, help="mirror the image at random each step (official data pipeline)")
    caption_dropout: float = field_(0.1, min=0.0, max=1.0,
                                    help="probability that the full prompt (pooled condition) is empty "
                                         "(official uncond_proba 0.1)")
    num_vectors: int = field_(4, min=1, help="vectors per learned token (Tab. 5: 4)")
    init: Literal["first_subtoken", "mean"] = field_(
        "first_subtoken", help="token init: first sub-token of each word (official) or the mean of all (ours before)")
    prompt: str = field_("A {content} <c> in {style} <s> style",
                         help="full prompt (pooled/first-scale condition); {content}/{style} = the input words "
                              "(official captions.csv: 'A hot air balloon {} in mosaic art {} style')")
    content_prompt: str = field_("A {content} <c> in {style} style", help="context of content steps")
    style_prompt: str = field_("A {content} in {style} <s> style", help="context of style steps")
    # Eq. 8-9
    alternating: bool = field_(True, help="scale-aware alternating optimisation (Eq. 8-9); off = joint TI")
    style_lambda: float = field_(0.1, min=0.0, help="λ of Eq. 8: weight of the content scales in the style loss")
    style_scales: list[int] | None = field_(None, min=0, help="style scale group; default: first 30% of scales")
    content_scales: list[int] | None = field_(None, min=0, help="content scale group; default: the other scales")
    # Eq. 10-11
    svd: bool = field_(True, help="SVD rectification of the style token (Eq. 10-11)")
    svd_rank: int = field_(10, min=1, help="r: top singular directions removed from <s> (Tab. 4: 10)")
    svd_mode: Literal["hidden", "embedding"] = field_(
        "hidden", help="hidden: basis from the text features of variation prompts of the content, removed from "
                       "the encoder's last hidden state at <s> (official); embedding: basis from sub-concept word "
                       "embeddings, removed from <s>'s input vectors (ours before)")
    svd_prompts: int = field_(200, min=2, help="generated variation prompts of the content (paper: 200)")
    variations_file: str | None = field_(None, path=True,
                                         help="variation prompts of the content, one a line (the official "
                                              "variation_content.txt); default: generated")
    subconcepts_file: str | None = field_(None, path=True,
                                          help="svd_mode embedding: sub-concepts, YAML {word: [...]} or lines")
    # Eq. 12
    kv_memory: bool = field_(True, help="augmented K-V memory (Eq. 12)")
    memory_tokens: int = field_(1, min=1, help="key/value pairs per memory (Tab. 6: 1)")
    memory_blocks: list[int] = field_([0], min=0, help="transformer blocks with memory (Tab. 3: first block)")
    memory_init: Literal["official", "xavier"] = field_(
        "official", help="uniform bound sqrt(6 / (3 L + C)), L = tokens of all scales, C = width (official "
                         "models/switti.py), or sqrt(6 / (tokens + C)) (Xavier on the memory alone, ours before)")
    style_memory_scale: int = field_(0, min=0, help="first scale that sees the style memory (paper: first)")
    content_memory_scale: int | None = field_(None, min=0,
                                              help="first scale seeing the content memory; default: content start")


@dataclass
class CSDVARInputs:
    """``inputs:`` of a recipe: one image, its content (class) word and style word."""

    image: str = field(metadata={"path": True, "image": True, "help": "the image to decompose"})
    content: str = field(metadata={"help": "class word of the subject, e.g. 'balloon' (initialises <c>)"})
    style: str = field(metadata={"help": "style word, e.g. 'mosaic' (initialises <s>)"})


@dataclass
class CSDVARGenerate:
    """Sampling options (``generate:`` beyond the prompts); None = the backbone's defaults."""

    cfg: float | None = field_(None, min=0.0, help="classifier-free guidance (official Switti: 6)")
    tau: float | None = field_(None, min=1e-3, help="temperature")
    top_k: int | None = field_(None, min=0, help="top-k (official Switti: 400)")
    top_p: float | None = field_(None, min=0.0, max=1.0, help="top-p (official Switti: 0.95)")
    resolution: int | None = field_(None, min=16, help="image side in pixels; default the backbone's")
    style_context: str | None = field_(None, help="prompt read as context on scales <= style_scale_end "
                                                  "(may use <c>/<s>); none = each prompt itself (official)")
    style_scale_end: int | None = field_(None, min=0, help="last scale of the style context; default the "
                                                           "content group start (official: 3 on Switti-512)")
    words: bool = field_(True, help="write the input word before each placeholder: '<c>' -> 'balloon <c>', "
                                    "'<s>' -> 'mosaic <s>' (official inference.py with captions_path)")


# ---------------------------------------------------------------------------------------------
# scale groups and the losses (Eq. 8-9)
# ---------------------------------------------------------------------------------------------
def scale_groups(n_scales: int, style: Sequence[int] | None = None, content: Sequence[int] | None = None,
                 ) -> tuple[list[int], list[int]]:
    """(style scales, content scales) of a schedule of ``n_scales`` scales.

    Default: the first ``round(0.3 n)`` scales are the style group, the rest the content group;
    on Switti-512 (10 scales) this is the paper's {0, 1, 2} / {3, ..., 9}; on Infinity-2B at 1024²
    (13 scales) {0, ..., 3} (side <= 6 of 64) / the rest.
    """
    n_style = min(max(1, round(0.3 * n_scales)), n_scales - 1)
    s = list(style) if style is not None else list(range(n_style))
    c = list(content) if content is not None else [k for k in range(n_scales) if k not in s]
    for name, group in (("style_scales", s), ("content_scales", c)):
        bad = [k for k in group if not 0 <= k < n_scales]
        if bad or not group:
            raise UserError(f"params.{name}", f"{group} for a schedule of {n_scales} scales",
                            f"expected a non-empty list of scale indices 0..{n_scales - 1}")
    return s, c


def per_scale_losses(backbone: ScaleWiseBackbone, logits: list[torch.Tensor], targets: ScaleTargets,
                     scales: Sequence[int]) -> dict[int, torch.Tensor]:
    """ℓ_k of Eq. 7: the backbone's cross-entropy of scale ``k`` alone (token mean), for every ``k`` of
    ``scales`` (``ScaleWiseBackbone.teacher_forcing_losses``: one cross-entropy over the scales)."""
    return backbone.teacher_forcing_losses(logits, targets, scales)


def group_loss(losses: Mapping[int, torch.Tensor], schedule: Sequence[tuple[int, int]], group: Sequence[int],
               ) -> torch.Tensor:
    """Token mean of the cross-entropy over a scale group: Σ_k (n_k / N) ℓ_k (official weighting)."""
    sizes = {k: schedule[k][0] * schedule[k][1] for k in group}
    total = sum(sizes.values())
    return sum(losses[k] * (sizes[k] / total) for k in group)  # type: ignore[return-value]


def style_loss(losses: Mapping[int, torch.Tensor], schedule: Sequence[tuple[int, int]], style: Sequence[int],
               content: Sequence[int], lam: float) -> torch.Tensor:
    """Loss of a style step."""
    # Eq. 8: L_s = Σ_{k ∈ style} ℓ_k + λ Σ_{k ∈ content} ℓ_k  (each group as a token mean)
    out = group_loss(losses, schedule, style)
    return out + lam * group_loss(losses, schedule, content) if lam else out


def content_loss(losses: Mapping[int, torch.Tensor], schedule: Sequence[tuple[int, int]], content: Sequence[int],
                 ) -> torch.Tensor:
    """Loss of a content step."""
    # Eq. 9: L_c = Σ_{k ∈ content} ℓ_k
    return group_loss(losses, schedule, content)


# ---------------------------------------------------------------------------------------------
# SVD rectification (Eq. 10-11)
# ---------------------------------------------------------------------------------------------
def load_subconcepts(word: str, path: str | None = None) -> list[str]:
    """Sub-concepts of ``word``: from a user file (YAML ``{word: [...]}`` / list, or one per line), else
    the built-in list, else the built-in generic templates filled with the word."""
    import yaml

    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError("params.subconcepts_file", f"{p} does not exist", "expected a YAML or text file")
        text = p.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            data = None
        if isinstance(data, dict):
            items = data.get(word) or data.get(word.lower()) or data.get("concepts", {}).get(word.lower())
            if not items:
                raise UserError("params.subconcepts_file", f"{p} has no entry for '{word}'",
                                f"expected a key '{word}' with a list of sub-concepts")
        elif isinstance(data, list):
            items = data
        else:
            items = text.splitlines()
        out = [str(s).strip() for s in items if str(s).strip()]
        if len(out) < 2:
            raise UserError("params.subconcepts_file", f"{len(out)} sub-concepts in {p}", "expected at least 2")
        return out
    shipped = yaml.safe_load(SUBCONCEPTS.read_text())
    listed = shipped["concepts"].get(word.strip().lower())
    if listed:
        return [word] + list(listed)
    return [t.format(word) for t in shipped["generic_templates"]]


def subconcept_projector(embeddings: torch.Tensor, rank: int) -> torch.Tensor:
    """P = V_rᵀ V_r (width, width) from the sub-concept embeddings E (N, width)."""
    # Eq. 10: E = U Σ Vᵀ, V_r = top-r right singular vectors, P = V_rᵀ V_r (fixed during training)
    _, _, vt = torch.linalg.svd(embeddings.double(), full_matrices=False)
    v_r = vt[: min(rank, vt.shape[0])]
    return (v_r.T @ v_r).float()


def rectify(e_s: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
    """The style embedding without its component in the content subspace."""
    # Eq. 11: e_s <- e_s - e_s P
    return e_s - e_s @ projector.to(e_s)


def mean_word_embeddings(backbone: ScaleWiseBackbone, text: str) -> dict[str, torch.Tensor]:
    """Per text encoder, the mean input embedding of the tokens of ``text`` (width,); encoders with no token skipped."""
    return {key: emb.float().mean(0) for key, emb in backbone.word_embeddings(text).items()  # type: ignore[attr-defined]
            if emb.shape[0]}


def style_word_kept(backbone: ScaleWiseBackbone, word: str, projectors: Mapping[str, torch.Tensor],
                    ) -> dict[str, float]:
    """Per text encoder, the share of the style word's own embedding norm that rectification (Eq. 11) keeps.

    Far below 1 the content subspace also holds the style word (small or byte-level text encoders, where
    every word's embedding shares the letters' subspace) and <s> loses what it should learn."""
    return {key: float(rectify(e[None], projectors[key]).norm() / e.norm().clamp_min(1e-12))
            for key, e in mean_word_embeddings(backbone, word).items() if key in projectors}


def subconcept_projectors(backbone: ScaleWiseBackbone, word: str, rank: int, path: str | None,
                          ) -> dict[str, torch.Tensor]:
    """One projector per text encoder: each sub-concept is the mean input embedding of its tokens."""
    names = load_subconcepts(word, path)
    per_encoder: dict[str, list[torch.Tensor]] = {}
    for name in names:
        for key, e in mean_word_embeddings(backbone, name).items():
            per_encoder.setdefault(key, []).append(e)
    return {key: subconcept_projector(torch.stack(rows), rank).to(backbone.device)
            for key, rows in per_encoder.items()}


#: templates x attributes of :func:`variation_prompts` (8 x 25 = 200, the paper's count); the
#: attributes vary kind, size, age and shape, never colour, texture or medium (those are style)
VARIATION_TEMPLATES = ("{a} {x} {w}", "a photo of {a} {x} {w}", "a picture of {a} {x} {w}", "{a} {x} {w} on a table",
                       "a close-up of {a} {x} {w}", "one {x} {w}", "the {x} {w}", "an image of {a} {x} {w}")
VARIATION_ATTRIBUTES = ("small", "large", "tiny", "giant", "old", "new", "modern", "vintage", "classic", "simple",
                        "round", "tall", "short", "wide", "narrow", "heavy", "light", "broken", "big", "little",
                        "antique", "ordinary", "fancy", "single", "double")


def variation_prompts(word: str, n: int = 200) -> list[str]:
    """``n`` variation prompts of the content ``word`` ("a small heart", "a photo of a vintage heart", ...).

    The paper (Sec. 4.2) asks an LLM for ~200 sub-concepts; the official ``variation_content.txt``
    files are such lists ("A Striped Hot Air Balloon", ...). Offline, we cross templates with
    attributes of kind, size, age and shape, and cycle them past 200."""
    out = []
    for i in range(n):
        template = VARIATION_TEMPLATES[i // len(VARIATION_ATTRIBUTES) % len(VARIATION_TEMPLATES)]
        attr = VARIATION_ATTRIBUTES[i % len(VARIATION_ATTRIBUTES)]
        out.append(template.format(a="an" if attr[0] in "aeiou" else "a", x=attr, w=word.strip()))
    return out


def load_variations(path: str) -> list[str]:
    """Variation prompts from a text file, one a line (the official ``variation_content.txt``)."""
    p = Path(path)
    if not p.is_file():
        raise UserError("params.variations_file", f"{p} does not exist", "expected a text file, one prompt a line")
    out = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if len(out) < 2:
        raise UserError("params.variations_file", f"{len(out)} prompts in {p}", "expected at least 2")
    return out


def variation_projectors(backbone: ScaleWiseBackbone, prompts: Sequence[str], rank: int,
                         ) -> dict[str, torch.Tensor]:
    """One projector P = V_rᵀ V_r per text encoder from the text features of ``prompts`` (official
    ``extract_svd.py``; features in the space of the encoder's last hidden state)."""
    if not hasattr(backbone, "text_features"):
        raise UserError("params.svd_mode", f"{type(backbone).__name__} has no text_features",
                        "svd_mode: embedding on this backbone")
    feats = backbone.text_features(list(prompts))  # type: ignore[attr-defined]
    return {key: subconcept_projector(f, rank).to(backbone.device) for key, f in feats.items()}


def style_feature_kept(backbone: ScaleWiseBackbone, word: str, projectors: Mapping[str, torch.Tensor],
                       ) -> dict[str, float]:
    """Per encoder, the share of the style word's text-feature norm that hidden-state rectification keeps."""
    feats = backbone.text_features([word])  # type: ignore[attr-defined]
    return {key: float(rectify(f[0], projectors[key]).norm() / f[0].norm().clamp_min(1e-12))
            for key, f in feats.items() if key in projectors}


def style_hidden_edit(projectors: Mapping[str, torch.Tensor]) -> Any:
    """The :data:`~cstoolkit.backbone.HiddenEdit` of Eq. 11 on the last hidden state at ``<s>``
    (official ``models/clip.py``): h <- h - h P of that encoder; other placeholders untouched."""
    def edit(placeholder: str, key: str, rows: torch.Tensor) -> torch.Tensor:
        if placeholder != STYLE_TOKEN or key not in projectors:
            return rows
        return rectify(rows, projectors[key])
    return edit


# ---------------------------------------------------------------------------------------------
# augmented K-V memory (Eq. 12)
# ---------------------------------------------------------------------------------------------
class KVMemory:
    """Learned keys/values per role and block, appended after RoPE in self-attention.

    A role's memory is visible to the queries of its first scale and every later one (the
    official memory sits in the KV cache from that scale on; under teacher forcing the
    block-causal mask gives the same). ``roles`` limits which memories are appended (sampling:
    ``content`` -> content memory, ``style`` -> style memory, ``both`` -> both).
    """

    def __init__(self, k: dict[str, torch.Tensor], v: dict[str, torch.Tensor], first_scale: dict[str, int],
                 blocks: Sequence[int], heads: int):
        self.k, self.v, self.first_scale, self.blocks, self.heads = k, v, first_scale, set(blocks), heads
        self.roles: tuple[str, ...] = tuple(first_scale)

    @staticmethod
    def init_bound(tokens: int, width: int, total_tokens: int | None = None) -> float:
        """Uniform bound: sqrt(6 / (3 L + width)) with L = ``total_tokens`` of all scales (official
        ``models/switti.py``), or Xavier's sqrt(6 / (tokens + width)) when ``total_tokens`` is None."""
        if total_tokens is not None:
            return math.sqrt(6.0 / (3 * total_tokens + width))
        return math.sqrt(6.0 / (tokens + width))

    @staticmethod
    def xavier(tokens: int, width: int, generator: torch.Generator, device: torch.device,
               total_tokens: int | None = None) -> torch.Tensor:
        """Uniform (tokens, width) in ±:meth:`init_bound` drawn from ``generator``."""
        bound = KVMemory.init_bound(tokens, width, total_tokens)
        x = torch.rand(tokens, width, generator=generator, device=generator.device) * 2 * bound - bound
        return x.to(device).requires_grad_(True)

    def key(self, role: str, block: int) -> str:
        return f"{role}.block.{block}"

    def __call__(self, call: AttentionCall) -> AttentionEdit | None:
        # Eq. 12: K <- [K; K_mem], V <- [V; V_mem] in the chosen blocks, after RoPE
        if call.block not in self.blocks:
            return None
        b, h, lq, dh = call.q.shape
        ks, vs, masks = [], [], []
        for role in self.roles:
            name = self.key(role, call.block)
            if name not in self.k:
                continue
            first = self.first_scale[role]
            if call.token_scales is not None:
                visible = (call.token_scales.to(call.q.device) >= first)[None, :, None]
            elif call.step >= first:
                visible = torch.ones(1, 1, 1, dtype=torch.bool, device=call.q.device)
            else:
                continue
            n = self.k[name].shape[0]
            ks.append(self.k[name].view(n, h, dh).transpose(0, 1)[None].expand(b, -1, -1, -1))
            vs.append(self.v[name].view(n, h, dh).transpose(0, 1)[None].expand(b, -1, -1, -1))
            masks.append(visible.expand(b, lq, n))
        if not ks:
            return None
        return AttentionEdit(extra_k=torch.cat(ks, 2), extra_v=torch.cat(vs, 2), extra_mask=torch.cat(masks, -1))


class _Probe(Exception):
    pass


def attention_heads(backbone: ScaleWiseBackbone, text: TextContext, targets: ScaleTargets) -> tuple[int, int]:
    """(heads, head dim) of the self-attention, read from the first call of a teacher-forcing pass."""
    seen: list[tuple[int, int]] = []

    def probe(call: AttentionCall) -> None:
        seen.append((call.q.shape[1], call.q.shape[3]))
        raise _Probe

    try:
        with torch.no_grad():
            backbone.teacher_forcing_logits(text, targets, hooks=[probe])
    except _Probe:
        pass
    if not seen:
        raise RuntimeError("the backbone made no self-attention call")
    return seen[0]


# ---------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------
@register_method
class CSDVAR(Method):
    """Textual inversion of <c> and <s> with scale-aware alternating optimisation, SVD rectification
    and augmented K-V memory on a frozen scale-wise model."""

    name: ClassVar[str] = "csd_var"
    summary: ClassVar[str] = ("Content/style tokens on a scale-wise model: alternating scale groups, "
                              "SVD rectification, K-V memory")
    paper: ClassVar[str] = ("Q.-B. Nguyen et al., CSD-VAR: Content-Style Decomposition in Visual Autoregressive "
                            "Models, ICCV 2025")
    family: ClassVar[str] = "scalewise"
    Config: ClassVar[type] = CSDVARConfig
    Inputs: ClassVar[type] = CSDVARInputs
    GenerateConfig: ClassVar[type] = CSDVARGenerate

    config: CSDVARConfig

    # ------------------------------------------------------------------ helpers
    def prompts(self, inputs: CSDVARInputs) -> dict[str, str]:
        """Full, content-step and style-step prompts with the input words filled in."""
        cfg = self.config
        fill = {"content": inputs.content, "style": inputs.style}
        out = {"full": cfg.prompt.format(**fill), "content": cfg.content_prompt.format(**fill),
               "style": cfg.style_prompt.format(**fill)}
        for key, token in (("content", CONTENT_TOKEN), ("style", STYLE_TOKEN)):
            if token not in out[key] or token not in out["full"]:
                raise UserError(f"params.{'prompt' if token not in out['full'] else key + '_prompt'}",
                                f"'{out[key] if token in out['full'] else out['full']}' has no {token}",
                                f"the full prompt needs <c> and <s>, the {key} prompt {token}")
        return out

    def memory_scales(self, content_group: Sequence[int]) -> dict[str, int]:
        cfg = self.config
        content_first = cfg.content_memory_scale if cfg.content_memory_scale is not None else min(content_group)
        return {"style": cfg.style_memory_scale, "content": content_first}

    # ------------------------------------------------------------------ fit
    def fit(self, backbone: ScaleWiseBackbone, inputs: CSDVARInputs, runtime: "Runtime") -> "Decomposition":
        """Learn <c>, <s> (and the K-V memories) from one image; the backbone stays frozen."""
        # the captured step has not been checked on a GPU yet: graphed only when the recipe asks (cuda_graph: on)
        trainer = CSDVARTrainer(self, backbone, inputs, runtime, cuda_graph=runtime.cuda_graph_asked)
        loop = runtime.train_loop("csd_var", self.config.steps, trainer.state)
        try:
            for step in loop:
                loop.log(loss=trainer.step(step).item())
        finally:
            trainer.release()
        return trainer.decomposition()

    # ------------------------------------------------------------------ generate
    def load_memory(self, backbone: ScaleWiseBackbone, decomposition: "Decomposition", roles: Sequence[str],
                    ) -> KVMemory | None:
        """The K-V memories of ``roles`` saved in the decomposition (None when there are none)."""
        k: dict[str, torch.Tensor] = {}
        v: dict[str, torch.Tensor] = {}
        first: dict[str, int] = {}
        blocks: set[int] = set()
        heads = 0
        for role in roles:
            rel = f"{role}/{MEMORY_FILE}"
            tensors = decomposition.files.get(rel)
            if tensors is None:
                continue
            meta = decomposition.file_metadata.get(rel) or _file_metadata(decomposition, rel)
            first[role] = int(meta.get("first_scale", 0))
            heads = int(meta.get("heads", 0))
            for name, t in tensors.items():
                _, block, kind = name.split(".")
                blocks.add(int(block))
                (k if kind == "k" else v)[f"{role}.block.{block}"] = t.to(backbone.device)
        if not k:
            return None
        return KVMemory(k, v, first, sorted(blocks), heads)

    def generate(
        self,
        backbone: ScaleWiseBackbone,
        decomposition: "Decomposition",
        prompts: Sequence[str],
        use: str,
        *,
        num_images: int = 1,
        seed: int = 0,
        options: Any = None,
        progress: bool = True,
    ) -> list[list["Image.Image"]]:
        """``num_images`` images per prompt with the learned tokens and the memories of ``use``."""
        opts: CSDVARGenerate = options or CSDVARGenerate()
        self.check_prompts(prompts, use, f"generate.{use}")
        roles = ROLES if use == "both" else (use,)
        tokens = {CONTENT_TOKEN: load_token(decomposition.files, "content", backbone),
                  STYLE_TOKEN: load_token(decomposition.files, "style", backbone)}
        memory = self.load_memory(backbone, decomposition, roles)
        schedule = backbone.scale_schedule(opts.resolution)
        end = opts.style_scale_end
        if end is None:
            stored = decomposition.meta.get("content_scales")
            end = min(stored) if stored else scale_groups(len(schedule))[1][0]
        kwargs = scalewise_sample_options(opts)
        basis = decomposition.files.get(f"style/{SVD_FILE}")
        extra = ({"hidden_edit": style_hidden_edit({k: v.to(backbone.device) for k, v in basis.items()})}
                 if basis else {})

        def encode(rows: list[str]) -> TextContext:
            if opts.words:
                rows = [with_words(r, decomposition.placeholders) for r in rows]
            learned = learned_for(rows, tokens) or None
            return backbone.encode_text(rows, learned=learned, **(extra if learned else {}))

        out = []
        for prompt in prompts:
            text = encode([prompt] * num_images)
            cross: list[tuple[int, TextContext]] = []
            if opts.style_context and not accepts(backbone.generate, "cross_text"):
                raise UserError("generate.style_context", f"{type(backbone).__name__} cannot switch the context",
                                "a backbone whose generate() takes cross_text, or no style_context")
            if opts.style_context:  # official SwittiDisentangledPipeline: style context on scales <= end
                style_text = encode([opts.style_context] * num_images)
                cross = [(0, style_text), (end + 1, text)]
            images = backbone.generate(text, seed=seed, schedule=schedule, hooks=[memory] if memory else [],
                                       progress=progress, **kwargs, **({"cross_text": cross} if cross else {}))
            out.append([im for im in images if im is not None])
        return out


class CSDVARTrainer:
    """Everything a CSD-VAR fit holds (targets, tokens, projectors, memories, optimisers) and one step.

    ``cuda_graph``: each kind of step (style and content, or the joint step of ``alternating: false``) is
    captured once as a CUDA graph and replayed (:class:`~cstoolkit.cuda_graph.GraphedStep`; CUDA only: off
    CUDA the same fixed-tensor step runs eagerly, bitwise the eager trainer). The draws stay on the host, in
    the eager order (target, then caption dropout); the drawn target (image or its mirror image) is copied
    into fixed tensors before the step, and the dropout is a fixed 0/1 tensor that selects the encoded empty
    prompt over the full one inside the step. What the eager step decides from the draw is kept: a token read
    only by the dropped full prompt gets no optimiser step (AdamW skips a tensor without gradient): the graph
    steps it with a zero gradient and puts it and its optimiser state back, and the gradient clip leaves it out
    of the norm. Where the empty prompt's text does not have the full prompt's shapes (Infinity's T5 pads to
    the longest prompt) no fixed tensor holds both: that trainer stays eager, with a log line.
    """

    def __init__(self, method: CSDVAR, backbone: ScaleWiseBackbone, inputs: CSDVARInputs, runtime: "Runtime",
                 cuda_graph: bool = False):
        """``cuda_graph``: capture the steps as CUDA graphs (see the class; no-op off CUDA)."""
        from cstoolkit.io import image_to_tensor, load_image

        cfg = self.cfg = method.config
        self.method, self.backbone, self.inputs, self.runtime = method, backbone, inputs, runtime
        backbone.freeze()
        self.prompts = method.prompts(inputs)
        self.schedule = schedule = backbone.scale_schedule()
        self.n_scales = n_scales = len(schedule)
        self.style_group, self.content_group = scale_groups(n_scales, cfg.style_scales, cfg.content_scales)
        self.mem_scales = method.memory_scales(self.content_group)
        for role, first in self.mem_scales.items():
            if first >= n_scales:
                raise UserError(f"params.{role}_memory_scale", f"scale {first} of a {n_scales}-scale schedule",
                                f"expected 0..{n_scales - 1}")
        if len(cfg.betas) != 2:
            raise UserError("params.betas", f"{cfg.betas}", "expected two numbers, e.g. [0.9, 0.95]")
        image = image_to_tensor(load_image(inputs.image, "inputs.image"), backbone.image_size(schedule))
        # the image and, with hflip, its mirror image (official: RandomHorizontalFlip on every draw)
        self.all_targets = hflip_targets(backbone, image[None].to(backbone.device), schedule, cfg.hflip)
        self.targets = self.all_targets[0]
        self.draws = runtime.generator(13)

        # learned tokens, initialised from the input words (official: initializer tokens)
        self.tokens = {"content": init_vectors(backbone, inputs.content, cfg.num_vectors, "inputs.content", cfg.init),
                       "style": init_vectors(backbone, inputs.style, cfg.num_vectors, "inputs.style", cfg.init)}
        self.projectors: dict[str, torch.Tensor] = {}
        self.hidden_edit: Any = None
        if cfg.svd:
            self._svd_basis(backbone, inputs)
        self.params: dict[str, dict[str, torch.Tensor]] = {
            role: {f"{role}.embeds.{k}": v for k, v in self.tokens[role].items()} for role in ROLES}
        self.memory: KVMemory | None = None
        if cfg.kv_memory:
            with runtime.autocast():
                heads, head_dim = attention_heads(backbone, backbone.encode_text([self.prompts["full"]]),
                                                  self.targets)
            gen = runtime.generator(7, device=backbone.device)
            total = sum(h * w for h, w in schedule) if cfg.memory_init == "official" else None
            k, v = {}, {}
            for role in ROLES:
                for block in cfg.memory_blocks:
                    name = f"{role}.block.{block}"
                    k[name] = KVMemory.xavier(cfg.memory_tokens, heads * head_dim, gen, backbone.device, total)
                    v[name] = KVMemory.xavier(cfg.memory_tokens, heads * head_dim, gen, backbone.device, total)
                    self.params[role][f"{role}.memory.k.{block}"] = k[name]
                    self.params[role][f"{role}.memory.v.{block}"] = v[name]
            self.memory = KVMemory(k, v, self.mem_scales, cfg.memory_blocks, heads)
        self.hooks = [self.memory] if self.memory is not None else []
        self.read: set[str] = set()  # roles whose placeholder the current step's encoded prompts hold
        self.last_draw: tuple[int, bool] | None = None  # fixed-tensor step: (target index, caption dropped)
        self._empty: TextContext | None = None  # the encoded empty prompt of caption dropout
        self.joint = cfg.optimizer == "adamw_joint"
        self.cross_text = accepts(backbone.teacher_forcing_logits, "cross_text")
        if not self.cross_text and cfg.alternating:
            log.warning("%s has no cross_text: each step's context prompt also gives the pooled condition",
                        type(backbone).__name__)
        # the fixed-tensor step (cuda_graph): on any device where it is faithful, captured on CUDA only
        self.static = bool(cuda_graph) and self._static_tensors()
        self.cuda_graph = self.static and cuda_graphs_available(backbone.device)
        self.optimizers: dict[str, torch.optim.Optimizer]
        # a captured optimiser step reads its learning rate from a tensor, written before each replay
        lr: float | torch.Tensor = torch.tensor(cfg.lr, device=backbone.device) if self.cuda_graph else cfg.lr
        if self.joint:  # official: one AdamW over every learned tensor, stepped every iteration
            every = [p for role in ROLES for p in self.params[role].values()]
            self.optimizers = {"adamw": torch.optim.AdamW(every, lr=lr, betas=(cfg.betas[0], cfg.betas[1]),
                                                          weight_decay=cfg.weight_decay,
                                                          capturable=self.cuda_graph)}
        else:  # one Adam per role: a style step moves only the style parameters, a content step the content ones
            self.optimizers = {role: torch.optim.Adam(list(self.params[role].values()),
                                                      lr=lr.clone() if isinstance(lr, torch.Tensor) else lr,
                                                      capturable=self.cuda_graph) for role in ROLES}
        self._lr = {name: opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}
        flat = {k: p for role in ROLES for k, p in self.params[role].items()}
        self.state = TrainState(params=flat, optimizers=self.optimizers, generators={"draws": self.draws})
        self._steps: dict[str, Any] = {}
        if self.static:
            self._steps = graph_steps(self.cuda_graph, {kind: functools.partial(self._fixed_step, kind)
                                                        for kind in self._reads},
                                      before_capture=self._drop_grads)

    def _svd_basis(self, backbone: ScaleWiseBackbone, inputs: CSDVARInputs) -> None:
        """The projectors of Eq. 10 and, in ``hidden`` mode, the edit of the hidden states at <s>."""
        import time

        cfg = self.cfg
        t0 = time.perf_counter()
        if cfg.svd_mode == "embedding":
            self.projectors = subconcept_projectors(backbone, inputs.content, cfg.svd_rank, cfg.subconcepts_file)
            kept = style_word_kept(backbone, inputs.style, self.projectors)
            source = f"sub-concept word embeddings of '{inputs.content}'"
        else:
            if not accepts(backbone.encode_text, "hidden_edit"):
                raise UserError("params.svd_mode", f"{type(backbone).__name__} cannot edit hidden states",
                                "svd_mode: embedding on this backbone")
            if cfg.variations_file:
                prompts = load_variations(cfg.variations_file)
                source = f"{len(prompts)} variation prompts from {cfg.variations_file}"
            else:
                prompts = variation_prompts(inputs.content, cfg.svd_prompts)
                source = f"{len(prompts)} generated variation prompts of '{inputs.content}'"
            self.projectors = variation_projectors(backbone, prompts, cfg.svd_rank)
            self.hidden_edit = style_hidden_edit(self.projectors)
            kept = style_feature_kept(backbone, inputs.style, self.projectors)
        notes.info("SVD basis (rank %d, %s mode): %s, computed in %.2f s", cfg.svd_rank, cfg.svd_mode, source,
                   time.perf_counter() - t0)
        self.svd_source = source
        for key, share in kept.items():
            if share < KEPT_WARNING:
                log.warning("SVD rectification keeps only %.0f %% of the style word '%s' (%s, width %d): the "
                            "content subspace holds it too; lower params.svd_rank (now %d) or set params.svd: false",
                            100 * share, inputs.style, key, self.projectors[key].shape[0], cfg.svd_rank)

    def style_vectors(self) -> dict[str, torch.Tensor]:
        """<s> as used in the input embeddings: rectified (Eq. 11) in ``embedding`` mode, as learned in
        ``hidden`` mode (there the encoder's output at <s> is rectified instead)."""
        if self.hidden_edit is not None:
            return self.tokens["style"]
        return {k: rectify(v, self.projectors[k]) if k in self.projectors else v
                for k, v in self.tokens["style"].items()}

    def encode(self, prompt: str, learned: Mapping[str, Any]) -> TextContext:
        """One prompt encoded with the learned tokens (and the hidden-state rectification)."""
        extra = {"hidden_edit": self.hidden_edit} if self.hidden_edit is not None else {}
        self.read.update(role for role, token in (("content", CONTENT_TOKEN), ("style", STYLE_TOKEN))
                         if token in prompt)
        return self.backbone.encode_text([prompt], learned=learned, **extra)

    def full_text(self, learned: Mapping[str, Any]) -> TextContext:
        """The full prompt, or the empty one with probability ``caption_dropout`` (official uncond_proba;
        encoded once: it reads no learned vector)."""
        if self.cfg.caption_dropout and float(torch.rand((), generator=self.draws)) < self.cfg.caption_dropout:
            if self._empty is None:
                self._empty = self.backbone.encode_text([""])
            return self._empty
        return self.encode(self.prompts["full"], learned)

    def loss(self, step: int) -> tuple[torch.Tensor, list[str]]:
        """The loss of step ``step`` and the roles it trains."""
        self.read = set()
        targets = pick(self.all_targets, self.draws)
        return self._loss(self.kind(step), targets, self.full_text)

    def kind(self, step: int) -> str:
        """What step ``step`` is: ``style`` or ``content`` (alternating; the official first step is a style
        step), or ``joint`` (the ablation without alternation)."""
        if not self.cfg.alternating:
            return "joint"
        return "style" if step % 2 == 0 else "content"

    def _loss(self, kind: str, targets: ScaleTargets, full_text: Callable[[Mapping[str, Any]], TextContext],
              ) -> tuple[torch.Tensor, list[str]]:
        """The loss of a step of ``kind`` on ``targets``, the full prompt's text from ``full_text(learned)``."""
        backbone, cfg, prompts = self.backbone, self.cfg, self.prompts
        learned = {CONTENT_TOKEN: self.tokens["content"], STYLE_TOKEN: self.style_vectors()}
        if kind == "joint":  # ablation: joint textual inversion on every scale with the full prompt
            full = full_text(learned)
            with self.runtime.autocast():
                logits = backbone.teacher_forcing_logits(full, targets, hooks=self.hooks)
            losses = per_scale_losses(backbone, logits, targets, range(self.n_scales))
            return group_loss(losses, self.schedule, range(self.n_scales)), list(ROLES)
        role = kind
        if not self.joint:  # per-role optimisers: no gradient into the other role's tokens
            learned = learning_only(learned, role)
        context = self.encode(prompts[role], learned)
        with self.runtime.autocast():
            if self.cross_text:  # pooled condition from the full prompt, cross-attention from the step's prompt
                full = full_text(learned)
                logits = backbone.teacher_forcing_logits(full, targets, hooks=self.hooks, cross_text=context)
            else:  # the step's prompt drives everything (backbones without cross_text)
                logits = backbone.teacher_forcing_logits(context, targets, hooks=self.hooks)
        if role == "style":
            losses = per_scale_losses(backbone, logits, targets, range(self.n_scales))
            return style_loss(losses, self.schedule, self.style_group, self.content_group, cfg.style_lambda), [role]
        losses = per_scale_losses(backbone, logits, targets, self.content_group)
        return content_loss(losses, self.schedule, self.content_group), [role]

    def lr(self, step: int) -> float:
        """Learning rate of ``step``: warm-up then ``lin0`` (official ``utils/lr_control.py``)."""
        cfg = self.cfg
        return warmup_lr(step, cfg.lr, cfg.warmup_steps, cfg.warmup_start, cfg.lr_end_ratio, cfg.steps)

    def step(self, step: int) -> torch.Tensor:
        """One optimisation step (warm-up, clip, optimiser step); returns the loss.

        Every vector of a learned token that the step's prompts hold is stepped, with a zero gradient
        where none reaches it (an encoder whose output the step does not use: Switti's CLIP-L in the
        full prompt, which gives only the pooled bigG vector once the cross-attention reads the step's
        prompt), as the official optimiser steps its whole token tables every iteration."""
        if self.static:
            return self._replay(step)
        cfg = self.cfg
        loss, active = self.loss(step)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        if loss.requires_grad:  # a dropped caption with no memory reads nothing learned: no gradient anywhere
            loss.backward()
        for role in self.read:  # every vector of a token the step's prompts hold is stepped
            for p in self.tokens[role].values():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        lr = self.lr(step)
        for name, roles in self._groups(active).items():
            params = [p for role in roles for p in self.params[role].values()]
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            for group in self.optimizers[name].param_groups:
                group["lr"] = lr
            self.optimizers[name].step()
        return loss.detach()

    def _groups(self, active: Sequence[str]) -> dict[str, list[str]]:
        """Optimiser name -> the roles whose tensors it steps, for a step training the roles ``active``."""
        return {"adamw": list(ROLES)} if self.joint else {role: [role] for role in active}

    # ------------------------------------------------------------------ the fixed-tensor (captured) step
    def _static_tensors(self) -> bool:
        """Set up the fixed tensors of the captured steps and what each kind of step reads; False (with a log
        line) where the step cannot be captured faithfully."""
        cfg, backbone = self.cfg, self.backbone
        uses_full = not cfg.alternating or self.cross_text  # a step encodes the full prompt
        self._draws_dropout = bool(cfg.caption_dropout) and uses_full  # what full_text draws
        self._drop: torch.Tensor | None = None
        if self._draws_dropout:
            # encoded as the eager step encodes both: inside autocast where the full prompt is (cross_text)
            learned = {CONTENT_TOKEN: self.tokens["content"], STYLE_TOKEN: self.style_vectors()}
            extra = {"hidden_edit": self.hidden_edit} if self.hidden_edit is not None else {}
            ctx = self.runtime.autocast() if cfg.alternating else contextlib.nullcontext()
            with ctx, torch.no_grad():
                full = backbone.encode_text([self.prompts["full"]], learned=learned, **extra)
                empty = backbone.encode_text([""])
            shapes = [tuple((tuple(t.shape), t.dtype, str(t.device)) for t in (x.tokens, x.mask))
                      + (x.pooled is None,) + (() if x.pooled is None else (tuple(x.pooled.shape), x.pooled.dtype))
                      for x in (full, empty)]
            if shapes[0] != shapes[1]:
                log.warning("runtime.cuda_graph: CSD-VAR's step stays eager on %s: the empty prompt of caption "
                            "dropout encodes to %s, the full prompt to %s, and no fixed tensor holds both "
                            "(params.caption_dropout: 0 lets it be captured)", type(backbone).__name__,
                            tuple(empty.tokens.shape), tuple(full.tokens.shape))
                return False
            self._empty = empty
            self._drop = torch.zeros((), dtype=torch.bool, device=empty.tokens.device)
        self._drop_holds = False
        first = self.all_targets[0]
        # one target: its own tensors; the image and its mirror image: a copy, the drawn one copied in
        self._slot = first if len(self.all_targets) == 1 else first.clone()
        self._slot_holds = 0

        def holds(prompt: str) -> set[str]:
            return {role for role, token in (("content", CONTENT_TOKEN), ("style", STYLE_TOKEN)) if token in prompt}

        # per kind of step: the roles its prompts hold (the eager step's `read` without dropout), those of its
        # context prompt (with dropout), and those the dropout takes out (read by the full prompt alone)
        read_full = holds(self.prompts["full"]) if uses_full else set()
        self._reads: dict[str, tuple[set[str], set[str], set[str]]] = {}
        for kind in (("style", "content") if cfg.alternating else ("joint",)):
            context = holds(self.prompts[kind]) if kind != "joint" else set()
            self._reads[kind] = (context | read_full, context, read_full - context if self._drop is not None else set())
        return True

    def _replay(self, step: int) -> torch.Tensor:
        """Step ``step`` on the fixed tensors: the host draws (as the eager step, in its order) and copies
        in, then the step (captured on CUDA) runs; returns a copy of its loss."""
        kind = self.kind(step)
        index = pick_index(len(self.all_targets), self.draws)
        dropped = bool(self._draws_dropout and float(torch.rand((), generator=self.draws)) < self.cfg.caption_dropout)
        fn = self._steps[kind]
        active = list(ROLES) if kind == "joint" else [kind]
        with on_capture_stream(fn):
            with torch.no_grad():
                if self._slot is not self.all_targets[0] and self._slot_holds != index:
                    self._slot.copy_(self.all_targets[index])
                    self._slot_holds = index
                if self._drop is not None and self._drop_holds != dropped:
                    self._drop.fill_(dropped)
                    self._drop_holds = dropped
            lr = self.lr(step)
            for name in self._groups(active):
                group = self.optimizers[name].param_groups[0]
                if isinstance(self._lr[name], torch.Tensor):  # captured: the tensor the graph reads
                    group["lr"] = self._lr[name]  # (a resumed optimiser's state_dict may have replaced it)
                    self._lr[name].fill_(lr)
                else:
                    group["lr"] = lr
            self._ensure_state()
            loss = fn().clone()
        reads, context, _ = self._reads[kind]
        self.read = set(context if dropped else reads)
        self.last_draw = (index, dropped)
        return loss

    def _fixed_step(self, kind: str) -> torch.Tensor:
        """Forward, backward, clip and optimiser step of a step of ``kind`` on the fixed tensors; no host sync
        (captured as a CUDA graph)."""
        cfg = self.cfg
        loss, active = self._loss(kind, self._slot, self._selected_full)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        reads, _, dropped_roles = self._reads[kind]
        for role in reads:  # every vector of a token the step's prompts hold is stepped (see step)
            for p in self.tokens[role].values():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        # read by the full prompt alone: without gradient (so not stepped) in an eager step that drops it
        dropped = {id(p) for role in dropped_roles for p in self.tokens[role].values()}
        for name, roles in self._groups(active).items():
            params = [p for role in roles for p in self.params[role].values()]
            skip = [p for p in params if id(p) in dropped]
            if cfg.grad_clip and skip:  # the eager clip's norm leaves the tensors without gradient out
                assert self._drop is not None
                grads = [p.grad for p in params if p.grad is not None]
                kept = [p.grad for p in params if p.grad is not None and id(p) not in dropped]
                every = torch.nn.utils.get_total_norm(grads)
                norm = torch.where(self._drop, torch.nn.utils.get_total_norm(kept) if kept else torch.zeros_like(every),
                                   every)
                torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, norm)
            elif cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt = self.optimizers[name]
            with torch.no_grad():
                saved = [(t, t.clone()) for p in skip for t in (p, *opt.state[p].values())
                         if isinstance(t, torch.Tensor)]
            opt.step()
            with torch.no_grad():  # where the caption was dropped: as if not stepped
                for t, old in saved:
                    t.copy_(torch.where(self._drop, old, t))
        return loss.detach()

    def _selected_full(self, learned: Mapping[str, Any]) -> TextContext:
        """The full prompt encoded, or (the fixed dropout flag set) the encoded empty prompt, selected inside
        the step."""
        full = self.encode(self.prompts["full"], learned)
        if self._drop is None:
            return full
        empty, drop = self._empty, self._drop
        assert empty is not None
        return TextContext(torch.where(drop, empty.tokens, full.tokens), torch.where(drop, empty.mask, full.mask),
                           None if full.pooled is None or empty.pooled is None
                           else torch.where(drop, empty.pooled, full.pooled))

    def _ensure_state(self) -> None:
        """The optimiser state of every tensor a step may put back (dropped caption), made as the optimiser
        makes it on its first step (zeros, step 0): equal to no state; before capture, so the graph holds it."""
        for role in {r for _, _, roles in self._reads.values() for r in roles}:
            for p in self.tokens[role].values():
                for opt in self.optimizers.values():
                    group = next((g for g in opt.param_groups if any(q is p for q in g["params"])), None)
                    if group is None or opt.state[p]:
                        continue
                    on_device = group["capturable"] or group["fused"]
                    scalar = torch.float32 if group["fused"] or torch.get_default_dtype() != torch.float64 \
                        else torch.float64
                    state = opt.state[p]
                    state["step"] = (torch.zeros((), dtype=scalar, device=p.device) if on_device
                                     else torch.tensor(0.0, dtype=scalar))
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _drop_grads(self) -> None:
        """Before capture: free the eager calls' gradients (the graph makes its own)."""
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    @property
    def captured(self) -> bool:
        """Whether every kind of step now replays a captured CUDA graph."""
        return bool(self._steps) and all(isinstance(fn, GraphedStep) and fn.captured for fn in self._steps.values())

    def release(self) -> None:
        """Free the captured steps' graphs and their memory pools (the end of the fit, before sampling)."""
        if self._steps:
            self._drop_grads()
            release_graphs(*self._steps.values())

    def decomposition(self) -> "Decomposition":
        """The learned tokens and memories (and, in ``hidden`` mode, the SVD basis) as a decomposition."""
        from cstoolkit.decomposition import Decomposition

        cfg, memory, inputs = self.cfg, self.memory, self.inputs
        files: dict[str, dict[str, torch.Tensor]] = {
            f"content/{EMBEDS_FILE}": token_file(self.tokens["content"]),
            f"style/{EMBEDS_FILE}": token_file({k: v.detach() for k, v in self.style_vectors().items()}),
        }
        if self.hidden_edit is not None:
            files[f"style/{SVD_FILE}"] = {k: p.detach().float().cpu().contiguous() for k, p in self.projectors.items()}
        file_meta: dict[str, dict[str, str]] = {}
        if memory is not None:
            for role in ROLES:
                rel = f"{role}/{MEMORY_FILE}"
                files[rel] = {}
                for block in cfg.memory_blocks:
                    name = memory.key(role, block)
                    files[rel][f"block.{block}.k"] = memory.k[name].detach().float().cpu().contiguous()
                    files[rel][f"block.{block}.v"] = memory.v[name].detach().float().cpu().contiguous()
                file_meta[rel] = {"first_scale": str(self.mem_scales[role]), "heads": str(memory.heads),
                                  "blocks": ",".join(str(b) for b in cfg.memory_blocks)}
        meta = {"content": inputs.content, "style": inputs.style, "prompts": self.prompts,
                "style_scales": self.style_group, "content_scales": self.content_group, "n_scales": self.n_scales,
                "svd_rank": cfg.svd_rank if cfg.svd else 0, "svd_mode": cfg.svd_mode if cfg.svd else "off",
                "svd_source": getattr(self, "svd_source", ""),
                "memory_scales": self.mem_scales if memory else {}, "encoders": self.backbone.text_encoders()}
        return Decomposition(method=self.method.name, files=files, file_metadata=file_meta,
                             placeholders={CONTENT_TOKEN: inputs.content, STYLE_TOKEN: inputs.style}, meta=meta)


def accepts(fn: Any, name: str) -> bool:
    """Whether callable ``fn`` takes keyword ``name`` (or any keyword, through ``**kwargs``)."""
    import inspect

    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def with_words(prompt: str, placeholders: Mapping[str, str]) -> str:
    """``prompt`` with each placeholder's word written before it ('a <c>' -> 'a balloon <c>'), as the
    official ``inference.py`` does with ``captions_path``."""
    for token, word in placeholders.items():
        if word:
            prompt = prompt.replace(token, f"{word} {token}")
    return prompt


def learning_only(learned: Mapping[str, Mapping[str, torch.Tensor]], role: str) -> dict[str, Any]:
    """The learned tokens with the other role's vectors detached (no gradient through the context)."""
    token = CONTENT_TOKEN if role == "content" else STYLE_TOKEN
    return {ph: (v if ph == token else {k: t.detach() for k, t in v.items()}) for ph, v in learned.items()}


def _file_metadata(decomposition: "Decomposition", rel: str) -> dict[str, str]:
    """Metadata of a saved safetensors file (after :meth:`Decomposition.load`)."""
    if decomposition.path is None:
        return {}
    from safetensors import safe_open

    with safe_open(str(Path(decomposition.path) / rel), framework="pt") as fh:
        return dict(fh.metadata() or {})


