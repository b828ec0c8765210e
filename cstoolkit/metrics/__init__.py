"""The five scores of the content-style papers (CSD-VAR Table 1), per generated image.

For a generated image ``g``, its references ``r_1..r_m`` (the run's input images) and its prompt:

=========  =========================================================================  ============
name       definition                                                                 counted on
=========  =========================================================================  ============
``csd_c``  mean_j cos(CSD backbone feature(g), CSD backbone feature(r_j))            content
``clip_i`` mean_j cos(CLIP image embedding(g), CLIP image embedding(r_j))            content
``csd_s``  mean_j cos(CSD style embedding(g), CSD style embedding(r_j))              style
``dino``   mean_j cos(DINO CLS(g), DINO CLS(r_j))                                    style
``clip_t`` cos(CLIP image embedding(g), CLIP text embedding(prompt, words filled))   all
=========  =========================================================================  ============

``csd_c`` uses CSD's raw backbone feature, as CSD-VAR's evaluation code does (its ``CSDEvaluator``
takes the first output of ``CSD_CLIP.forward``); ``content_feature="head"`` uses the content head.
Where we differ from CSD-VAR's code is written in ``docs/evaluation.md``.

>>> models = MetricModels("tiny")
>>> scores = models.score(images, references=[ref], texts=["a dog in watercolor style"])
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import torch
from PIL import Image

from ..errors import UserError
from .models import ENCODERS, PRESETS, ModelSpec

#: the five metric names, in CSD-VAR Table 1's order
METRICS: tuple[str, ...] = ("csd_c", "clip_i", "csd_s", "dino", "clip_t")
#: which samples each metric is averaged over in a run's summary
COUNTED_ON: dict[str, tuple[str, ...]] = {
    "csd_c": ("content",), "clip_i": ("content",), "csd_s": ("style",), "dino": ("style",),
    "clip_t": ("content", "style", "both"),
}
LABELS = {"csd_c": "CSD-C", "clip_i": "CLIP-I", "csd_s": "CSD-S", "dino": "DINO", "clip_t": "CLIP-T"}

#: what a preset's scores are worth, where that must be said next to them (metrics.json, reports, tables)
PRESET_NOTES = {"tiny": "preset 'tiny' = random models for tests: these scores mean nothing"}

__all__ = ["COUNTED_ON", "LABELS", "METRICS", "PRESETS", "PRESET_NOTES", "MetricModels", "ModelSpec", "preset_note"]


def preset_note(preset: str | None) -> str | None:
    """The note shown with the scores of ``preset`` (``None`` for real models)."""
    return PRESET_NOTES.get(preset) if preset else None


class MetricModels:
    """The CLIP, CSD and DINO models of a preset, with per-model weight overrides.

    ``weights`` maps ``clip``/``csd``/``dino`` to a local file or hub repo (``org/name[:file]``)
    that replaces the preset's. Models are built on first use.
    """

    def __init__(self, preset: str = "paper", weights: Mapping[str, str] | None = None,
                 device: str | torch.device | None = None, batch_size: int = 32,
                 content_feature: Literal["backbone", "head"] = "backbone"):
        if preset not in PRESETS:
            import difflib

            close = difflib.get_close_matches(preset, list(PRESETS), n=1)
            raise UserError("--metrics-preset", f"unknown preset '{preset}'",
                            (f"did you mean '{close[0]}'? " if close else "") + f"known: {', '.join(PRESETS)}")
        self.preset = preset
        self.specs: dict[str, ModelSpec] = dict(PRESETS[preset])
        for name, source in (weights or {}).items():
            if name not in self.specs:
                raise UserError("--metric-weights", f"unknown model '{name}'", f"expected one of {', '.join(ENCODERS)}")
            self.specs[name] = ModelSpec(self.specs[name].arch, source, self.specs[name].seed)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.content_feature = content_feature
        self._models: dict[str, torch.nn.Module] = {}

    def describe(self) -> dict[str, dict[str, str | None]]:
        """Architecture and weights of each model (stored in ``metrics.json``)."""
        return {name: {"arch": spec.arch if isinstance(spec.arch, str) else "custom (random)",
                       "weights": spec.weights} for name, spec in self.specs.items()}

    def check(self) -> None:
        """Find every weights file now (local, hub cache or download), so a missing one stops a
        benchmark before its first run rather than at its first score."""
        from .weights import resolve_weights

        for name, spec in self.specs.items():
            if spec.weights:
                resolve_weights(spec.weights, f"metrics.{name}", ENCODERS[name].hub_files)

    def model(self, name: str) -> torch.nn.Module:
        if name not in self._models:
            spec = self.specs[name]
            self._models[name] = ENCODERS[name](spec.arch, spec.weights, spec.seed).to(self.device)
        return self._models[name]

    # ----------------------------------------------------------------------------- features
    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """L2-normalised features of ``images``: ``clip``, ``csd_content``, ``csd_style``, ``dino``
        (each (N, D), on the CPU), computed in batches of ``batch_size``."""
        feats: dict[str, list[torch.Tensor]] = {"clip": [], "csd_content": [], "csd_style": [], "dino": []}
        clip, csd, dino = self.model("clip"), self.model("csd"), self.model("dino")
        for i in range(0, len(images), self.batch_size):
            chunk = images[i: i + self.batch_size]
            x = clip.preprocess(chunk).to(self.device)  # CSD shares CLIP's preprocessing
            feats["clip"].append(clip.encode_images(x).cpu())
            backbone, content, style = csd(x)
            if self.content_feature == "backbone":
                content = torch.nn.functional.normalize(backbone, dim=-1)
            feats["csd_content"].append(content.cpu())
            feats["csd_style"].append(style.cpu())
            feats["dino"].append(dino(dino.preprocess(chunk).to(self.device)).cpu())
        return {k: torch.cat(v) if v else torch.empty(0) for k, v in feats.items()}

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised CLIP text embeddings (N, D) on the CPU."""
        clip = self.model("clip")
        out = [clip.encode_texts(texts[i: i + self.batch_size]).cpu() for i in range(0, len(texts), self.batch_size)]
        return torch.cat(out)

    # ------------------------------------------------------------------------------- scores
    def score(self, images: Sequence[Image.Image], references: Sequence[Image.Image],
              texts: Sequence[str] | None = None,
              reference_features: dict[str, torch.Tensor] | None = None) -> list[dict[str, float]]:
        """The five scores of every image against all ``references`` (and its text, if given)."""
        if not images:
            return []
        if not references and reference_features is None:
            raise UserError("references", "no reference images", "expected the run's input image(s)")
        if texts is not None and len(texts) != len(images):
            raise ValueError("one text per image expected")
        gen = self.image_features(images)
        ref = reference_features if reference_features is not None else self.image_features(references)
        return self.compare(gen, ref, self.text_features(texts) if texts is not None else None)

    @staticmethod
    def compare(gen: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor],
                text: torch.Tensor | None = None) -> list[dict[str, float]]:
        """Scores from features (of :meth:`image_features` / :meth:`text_features`): each image
        against the mean over references, and against its own text row when ``text`` is given."""
        pairs = {"csd_c": "csd_content", "clip_i": "clip", "csd_s": "csd_style", "dino": "dino"}
        sims = {m: (gen[f] @ ref[f].T).mean(dim=1) for m, f in pairs.items()}  # (N,) mean over references
        if text is not None:
            sims["clip_t"] = (gen["clip"] * text).sum(-1)
        return [{m: float(v[i]) for m, v in sims.items()} for i in range(len(gen["clip"]))]
