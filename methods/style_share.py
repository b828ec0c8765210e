"""Training-free style personalisation on a scale-wise autoregressive model (registry name ``style_share``).

Paper: K. Lee, J. Park, J. Gim, W. Choi, K. Hwang, J. Kim, S. Im, "A Training-Free
Style-Personalization via Scale-wise Autoregressive Model" (2025), Sec. 5, on Infinity-2B.

Three paths run in one batch, each with its own prompt (Sec. 5.1):

* content path, T^con = "<content>"            -- samples freely; its queries carry the content;
* style path, T^sty = "<style>"                -- reconstructs the style image I^sty (its labels are
  the image's own bits, F^sty = E_I(I^sty));
* generation path, T^gen = "<content> in <style>" -- makes the image that is returned.

Steps s are counted from 1 as in the paper (scale index = s - 1):

* Eq. 4, feature initialisation: for s <= min(S_key) the generation path's features are the style
  image's (:meth:`StyleShare.feature_initialisation`, a step hook);
* Eq. 5, key stage attention sharing at S_key = {2, 3}: in every self-attention layer of the
  generation path Q <- Q^con, K = [K^con; K^sty], V = [V^gen; V^sty]
  (:func:`key_stage_attention_sharing`, an attention hook);
* Eq. 6, adaptive query sharing at S_fine = {4, 5, 6, 7}: Q^gen <- a Q^gen + (1 - a) Q^con with
  a = cos(Q^gen, Q^con) (:func:`adaptive_query_sharing`).

After the last step that reads a path (style: max S_key; content: max S_fine) the path leaves the
batch and the KV cache: the generated images are the same, the late, large scales cost one path.
Without a style image the style path samples from the style prompt alone (the paper's text-only
style alignment, Fig. 8) and Eq. 4 copies its sampled features.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from cstoolkit.backbone import (
    AttentionCall,
    AttentionEdit,
    AttentionHook,
    ScaleTargets,
    ScaleWiseBackbone,
    StepCall,
    StepEdit,
    StepHook,
)
from cstoolkit.config import field_
from cstoolkit.errors import UserError
from cstoolkit.method import STYLE_TOKEN, Method, expand_placeholders
from cstoolkit.registry import register_method

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from cstoolkit.decomposition import Decomposition
    from cstoolkit.runtime import Runtime

log = logging.getLogger(__name__)

CONTENT, STYLE, GENERATION = "content", "style", "generation"
REFERENCE_FILE = "style/reference.safetensors"


@dataclass
class StyleShareConfig:
    """Hyper-parameters (paper defaults; steps counted from 1 as in the paper)."""

    key_stage: list[int] = field_([2, 3], min=1, help="S_key: steps with key stage attention sharing (Eq. 5)")
    fine_stage: list[int] = field_([4, 5, 6, 7], min=1, help="S_fine: steps with adaptive query sharing (Eq. 6)")
    feature_init: bool = field_(True, help="Eq. 4: generation features from the style image at early steps")
    attention_sharing: bool = field_(True, help="Eq. 5: key stage attention sharing")
    query_sharing: bool = field_(True, help="Eq. 6: adaptive query sharing")
    init_until: int | None = field_(None, min=1, help="last step of Eq. 4; default min(key_stage)")
    blocks: list[int] | None = field_(None, min=0, help="transformer blocks that share attention; default all")
    share_uncond: bool = field_(True, help="also share in the unconditional (CFG) half of the batch")
    drop_finished_paths: bool = field_(True, help="drop a path from the batch after the last step that reads it")


@dataclass
class StyleShareInputs:
    """``inputs:`` of a recipe: the style reference image and its style prompt."""

    style: str = field(metadata={"help": "style prompt T^sty, e.g. 'watercolor painting'"})
    image: str | None = field(default=None, metadata={"path": True, "image": True,
                                                       "help": "style reference image; none = text-only style"})


@dataclass
class StyleShareGenerate:
    """Sampling options (``generate:`` beyond the prompts); defaults of the official Infinity inference."""

    cfg: float = field_(4.0, min=0.0, help="classifier-free guidance on the logits")
    tau: float = field_(0.5, min=1e-3, help="temperature of the logits")
    top_k: int = field_(900, min=0, help="1 = greedy; 0 or >= 2 = no top-k for bitwise labels")
    top_p: float = field_(0.97, min=0.0, max=1.0, help="bits whose minority value is below 1 - top_p are fixed")
    resolution: int | None = field_(None, min=16, help="image side in pixels; default the backbone's")


@dataclass
class StyleShareBatch:
    """What :meth:`StyleShare.batch` builds for ``backbone.generate``: rows and hooks."""

    prompts: list[str]
    paths: list[str]
    seeds: list[int]
    hooks: list[AttentionHook]
    step_hooks: list[StepHook]


# ---------------------------------------------------------------------------------------------
# the paper's equations
# ---------------------------------------------------------------------------------------------
def key_stage_attention_sharing(call: AttentionCall, gen: torch.Tensor, con: torch.Tensor, sty: torch.Tensor,
                                ) -> AttentionEdit:
    """Generation rows attend with the content query and keys plus the style keys/values."""
    # Eq. 5: Q^gen <- Q^con, K^gen = [K^con; K^sty], V^gen = [V^gen; V^sty]
    q, k = call.q.clone(), call.k.clone()
    q[gen] = call.q[con]
    k[gen] = call.k[con]
    extra_k, extra_v = torch.zeros_like(call.k), torch.zeros_like(call.v)
    extra_k[gen] = call.k[sty]
    extra_v[gen] = call.v[sty]
    visible = torch.zeros(call.k.shape[0], call.k.shape[2], dtype=torch.bool, device=call.k.device)
    visible[gen] = True
    return AttentionEdit(q=q, k=k, extra_k=extra_k, extra_v=extra_v, extra_mask=visible)


def adaptive_query_sharing(call: AttentionCall, gen: torch.Tensor, con: torch.Tensor) -> AttentionEdit:
    """Blend each generation query with its content query, weighted by their cosine similarity."""
    # Eq. 6: Q^gen <- a Q^gen + (1 - a) Q^con, a = sim(Q^gen, Q^con)
    q_gen, q_con = call.q[gen].float(), call.q[con].float()
    alpha = F.cosine_similarity(q_gen, q_con, dim=-1).clamp(0.0, 1.0).unsqueeze(-1)
    q = call.q.clone()
    q[gen] = (alpha * q_gen + (1 - alpha) * q_con).to(q.dtype)
    return AttentionEdit(q=q)


def split_prompt(prompt: str, style: str) -> tuple[str, str]:
    """A prompt with ``<s>`` -> (content prompt T^con, generation prompt T^gen).

    T^gen is the prompt with ``<s>`` replaced by the style prompt; T^con is the prompt with the
    style phrase removed ("A cat in <s> style" -> "A cat").
    """
    generation = expand_placeholders(prompt, {STYLE_TOKEN: style})
    content = prompt
    for pattern in (r"[\s,]*\bin\s+the\s+style\s+of\s+<s>", r"[\s,]*\b(?:in|as)\s+(?:an?\s+|the\s+)?<s>(?:\s+style)?",
                    r"[\s,]*<s>(?:\s+style)?"):
        content, n = re.subn(pattern, " ", content, count=1, flags=re.IGNORECASE)
        if n:
            break
    content = re.sub(r"\s+", " ", content.replace(STYLE_TOKEN, " ")).strip(" ,;")
    return content, generation


# ---------------------------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------------------------
class _PathIndex:
    """Row indices of (generation, content, style) per CFG half, cached per batch layout.

    Returns ``None`` when a generation row lacks its content or style partner (nothing to share).
    """

    def __init__(self, share_uncond: bool):
        self.share_uncond = share_uncond
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None] = {}

    def __call__(self, paths: list[str], halves: list[str], device: torch.device,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        key = (tuple(paths), tuple(halves), str(device))
        if key not in self._cache:
            gen: list[int] = []
            con: list[int] = []
            sty: list[int] | None = []
            for half in ("cond", "uncond") if self.share_uncond else ("cond",):
                rows = [i for i, h in enumerate(halves) if h == half]
                g = [i for i in rows if paths[i] == GENERATION]
                c = [i for i in rows if paths[i] == CONTENT]
                s = [i for i in rows if paths[i] == STYLE]
                gen += g
                con += c
                if sty is not None and len(s) in (1, len(g)):
                    sty += s * len(g) if len(s) == 1 else s
                else:
                    sty = None
            if not gen or len(con) != len(gen):
                self._cache[key] = None
            else:
                as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
                self._cache[key] = (as_tensor(gen), as_tensor(con), None if sty is None else as_tensor(sty))
        return self._cache[key]


class _Sharing:
    """The attention hook: Eq. 5 at S_key, Eq. 6 at S_fine, in the chosen blocks."""

    def __init__(self, cfg: StyleShareConfig):
        self.key = {s - 1 for s in cfg.key_stage} if cfg.attention_sharing else set()
        self.fine = {s - 1 for s in cfg.fine_stage} - self.key if cfg.query_sharing else set()
        self.blocks = set(cfg.blocks) if cfg.blocks is not None else None
        self.index = _PathIndex(cfg.share_uncond)

    def __call__(self, call: AttentionCall) -> AttentionEdit | None:
        if call.step not in self.key and call.step not in self.fine:
            return None
        if self.blocks is not None and call.block not in self.blocks:
            return None
        rows = self.index(call.paths, call.cfg_half, call.q.device)
        if rows is None:
            return None
        gen, con, sty = rows
        if call.step in self.key:
            return None if sty is None else key_stage_attention_sharing(call, gen, con, sty)
        return adaptive_query_sharing(call, gen, con)


class _Paths:
    """The step hook: teacher-forces the style path, applies Eq. 4, drops finished paths."""

    def __init__(self, reference: list[torch.Tensor] | None, init_steps: set[int], last_read: dict[str, int],
                 drop: bool):
        self.reference, self.init_steps, self.last_read, self.drop = reference, init_steps, last_read, drop

    def __call__(self, call: StepCall) -> StepEdit | None:
        labels = call.labels
        style_rows = [i for i, p in enumerate(call.paths) if p == STYLE]
        if self.reference is not None and style_rows:
            labels = labels.clone()
            labels[style_rows] = self.reference[call.step].to(labels)  # F^sty = E_I(I^sty)
        if call.step in self.init_steps:
            labels = StyleShare.feature_initialisation(labels, call.paths, self._style_labels(call, labels))
        dropped = [p for p, last in self.last_read.items() if self.drop and call.step == last and p in call.paths]
        if labels is call.labels and not dropped:
            return None
        return StepEdit(labels=None if labels is call.labels else labels, drop_paths=dropped)

    def _style_labels(self, call: StepCall, labels: torch.Tensor) -> torch.Tensor:
        if self.reference is not None:
            return self.reference[call.step].to(labels)
        rows = [i for i, p in enumerate(call.paths) if p == STYLE]
        return labels[rows[:1]]


# ---------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------
@register_method
class StyleShare(Method):
    """Training-free style personalisation: three paths, key stage attention sharing, adaptive query sharing."""

    name: ClassVar[str] = "style_share"
    summary: ClassVar[str] = "Training-free style personalisation: three paths, key stage attention and query sharing"
    paper: ClassVar[str] = ("K. Lee et al., A Training-Free Style-Personalization via Scale-wise Autoregressive "
                            "Model, 2025")
    family: ClassVar[str] = "scalewise"
    Config: ClassVar[type] = StyleShareConfig
    Inputs: ClassVar[type] = StyleShareInputs
    GenerateConfig: ClassVar[type] = StyleShareGenerate
    trains: ClassVar[bool] = False
    uses: ClassVar[tuple[str, ...]] = ("style",)

    config: StyleShareConfig

    # ------------------------------------------------------------------ prompts
    def check_prompts(self, prompts: Sequence[str], use: str, where: str = "prompt") -> None:
        """Only ``style`` prompts (with ``<s>``): the method learns a style, not a content."""
        if use != "style":
            raise UserError(where if "." in where else f"generate.{use}", "style_share makes stylised images only",
                            "put the prompts under generate.style (with <s>)")
        super().check_prompts(prompts, use, where)

    # ------------------------------------------------------------------ fit
    def fit(self, backbone: ScaleWiseBackbone, inputs: StyleShareInputs, runtime: "Runtime") -> "Decomposition":
        """Record the style reference: the style prompt and the image's per-scale labels (no training)."""
        from cstoolkit.decomposition import Decomposition
        from cstoolkit.io import image_to_tensor, load_image

        if not inputs.style.strip():
            raise UserError("inputs.style", "empty style prompt", "expected text such as 'watercolor painting'")
        files: dict[str, dict[str, torch.Tensor]] = {}
        meta: dict[str, Any] = {"style": inputs.style, "text_only": inputs.image is None}
        if inputs.image is not None:
            schedule = backbone.scale_schedule()
            image = image_to_tensor(load_image(inputs.image, "inputs.image"), backbone.image_size(schedule))
            targets = backbone.image_to_targets(image[None], schedule)
            files[REFERENCE_FILE] = self._pack(image, targets)
            meta["schedule"] = [list(hw) for hw in schedule]
        return Decomposition(method=self.name, files=files, placeholders={STYLE_TOKEN: inputs.style}, meta=meta)

    @staticmethod
    def _pack(image: torch.Tensor, targets: ScaleTargets) -> dict[str, torch.Tensor]:
        out = {"image": ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()}
        for i, t in enumerate(targets.targets):
            out[f"labels.{i}"] = t[0].to(torch.uint8).cpu()
        return out

    def reference(self, backbone: ScaleWiseBackbone, decomposition: "Decomposition",
                  schedule: list[tuple[int, int]]) -> list[torch.Tensor] | None:
        """The style image's labels per scale for ``schedule`` (re-encoded if the schedule changed)."""
        packed = decomposition.files.get(REFERENCE_FILE)
        if packed is None:
            return None
        stored = [tuple(hw) for hw in decomposition.meta.get("schedule", [])]
        if stored == [tuple(hw) for hw in schedule]:
            return [packed[f"labels.{i}"].long()[None].to(backbone.device) for i in range(len(schedule))]
        image = packed["image"].float() / 127.5 - 1
        return [t.to(backbone.device) for t in backbone.image_to_targets(image[None], schedule).targets]

    # ------------------------------------------------------------------ Eq. 4
    @staticmethod
    def feature_initialisation(labels: torch.Tensor, paths: list[str], style_labels: torch.Tensor) -> torch.Tensor:
        """Generation rows take the style features at this step."""
        # Eq. 4: F^gen_s <- F^sty_s for s <= min(S_key)
        rows = [i for i, p in enumerate(paths) if p == GENERATION]
        if not rows:
            return labels
        labels = labels.clone()
        labels[rows] = style_labels.expand(len(rows), *labels.shape[1:])
        return labels

    def plan(self, n_steps: int, has_image: bool) -> tuple[set[int], dict[str, int]]:
        """(scale indices of Eq. 4, last scale index each auxiliary path is read) for a schedule."""
        cfg = self.config
        key = sorted(s - 1 for s in cfg.key_stage if s <= n_steps) if cfg.attention_sharing else []
        fine = sorted(s - 1 for s in cfg.fine_stage if s <= n_steps) if cfg.query_sharing else []
        init_last = (cfg.init_until if cfg.init_until is not None else min(cfg.key_stage, default=1)) - 1
        init = set(range(min(init_last, n_steps - 1) + 1)) if cfg.feature_init else set()
        last: dict[str, int] = {}
        if key or fine:
            last[CONTENT] = max(key + fine)
        style_reads = key + ([] if has_image else sorted(init))
        if style_reads:
            last[STYLE] = max(style_reads)
        return init, last

    # ------------------------------------------------------------------ generate
    def _warn_last_scale_shared(self, n_steps: int) -> None:
        """Warn (once per config) when sharing reaches the schedule's last scale.

        The paper's stages are for Infinity-2B's 13 scales at 1024², where S_fine = {4, ..., 7} ends at
        16x16 and six scales follow. On a 7-scale schedule (128 px) step 7 is the last scale: on the
        world Infinity the paper's stages drew the asked shape in 6 of 18 samples, ``fine_stage: [4]``
        in 12 of 18 (docs/methods/style_share.md).
        """
        cfg = self.config
        shared = (cfg.key_stage if cfg.attention_sharing else []) + (cfg.fine_stage if cfg.query_sharing else [])
        if shared and max(shared) >= n_steps and not getattr(self, "_warned_last_scale", False):
            self._warned_last_scale = True
            log.warning("style_share: attention is shared up to step %d of a %d-scale schedule, so the generation "
                        "path has no scale of its own left (shapes get lost: docs/methods/style_share.md); set "
                        "params.fine_stage to end before step %d", max(shared), n_steps, n_steps)

    def batch(self, reference: list[torch.Tensor] | None, style_prompt: str, prompt: str, *, num_images: int = 1,
              seed: int = 0, n_steps: int) -> StyleShareBatch:
        """The three-path batch of one prompt (with ``<s>``) for a schedule of ``n_steps`` scales.

        Rows: ``num_images`` content rows, one style row (shared), ``num_images`` generation rows
        (paths not read by any enabled component are left out). Image ``i`` and its content row
        use seed ``seed + i``.
        """
        content, generation = split_prompt(prompt, style_prompt)
        if not content:
            raise UserError("generate.style", f"'{prompt}' has no content besides the style",
                            "expected e.g. 'A cat in <s> style'")
        init, last = self.plan(n_steps, reference is not None)
        self._warn_last_scale_shared(n_steps)
        prompts, paths, seeds = [], [], []
        if CONTENT in last:
            prompts += [content] * num_images
            paths += [CONTENT] * num_images
            seeds += [seed + i for i in range(num_images)]
        if STYLE in last:
            prompts.append(style_prompt)
            paths.append(STYLE)
            seeds.append(seed)
        prompts += [generation] * num_images
        paths += [GENERATION] * num_images
        seeds += [seed + i for i in range(num_images)]
        return StyleShareBatch(prompts, paths, seeds, [_Sharing(self.config)],
                               [_Paths(reference, init, last, self.config.drop_finished_paths)])

    def stylise(
        self,
        backbone: ScaleWiseBackbone,
        reference: list[torch.Tensor] | None,
        style_prompt: str,
        prompt: str,
        *,
        num_images: int = 1,
        seed: int = 0,
        options: StyleShareGenerate | None = None,
        schedule: list[tuple[int, int]] | None = None,
        progress: bool = False,
    ) -> list["Image.Image"]:
        """``num_images`` stylised images of one prompt (with ``<s>``), all paths in one batch."""
        opts = options or StyleShareGenerate()
        schedule = schedule or backbone.scale_schedule(opts.resolution)
        b = self.batch(reference, style_prompt, prompt, num_images=num_images, seed=seed, n_steps=len(schedule))
        images = backbone.generate(b.prompts, cfg=opts.cfg, tau=opts.tau, top_k=opts.top_k, top_p=opts.top_p,
                                   seed=b.seeds, schedule=schedule, hooks=b.hooks, step_hooks=b.step_hooks,
                                   paths=b.paths, output_paths=[GENERATION], progress=progress)
        return [im for im, p in zip(images, b.paths) if p == GENERATION]  # type: ignore[misc]

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
        """``num_images`` stylised images for each prompt (``use`` must be ``style``)."""
        self.check_prompts(prompts, use, "generate.style")
        opts = options or StyleShareGenerate()
        schedule = backbone.scale_schedule(opts.resolution)
        style_prompt = decomposition.placeholders.get(STYLE_TOKEN) or decomposition.meta.get("style", "")
        reference = self.reference(backbone, decomposition, schedule)
        return [self.stylise(backbone, reference, style_prompt, p, num_images=num_images, seed=seed, options=opts,
                             schedule=schedule, progress=progress) for p in prompts]
