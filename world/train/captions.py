"""Captions of the world trainers: the caption table every backbone encodes and the per-sample draw.

The world's text space has to carry what embedding methods (textual inversion, CSD-VAR) put into it:
1-4 learned vectors initialised from a word and repeated, or from a neutral word ("object" for a new
subject, "pattern" for a new style). With one template per kind, the world backbones saw about 25
token vectors and anything else was off-distribution (issue #17 item 5). :func:`caption_table` therefore
holds, for every (kind, content, style), the base caption (:func:`generator.caption`, index 0) and
augmented variants: several templates (among them ``A photo of a {c} object in {s} style`` and
``a {c} with a {s} pattern``), synonyms of the class words, the class words repeated 2-4 times (as a
4-vector init of the repeated word reads) and word dropout of the template words (never of the class
words). The neutral words :data:`CONTENT_NEUTRAL` and :data:`STYLE_NEUTRAL` stand for an unnamed content
or style in the one-factor kinds (``an object in {s} style``, ``a {c} with a pattern``).

The table is finite and deterministic (word dropout is drawn from ``seed``), so frozen text encoders
(SDXL's and Switti's CLIPs) encode it once; :func:`draw_captions` picks a kind by :data:`CAPTION_MIX`
and then the base caption or, with probability ``augment``, one of the variants.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

#: caption mix of the generator training: (kind, probability); "" = empty caption (CFG)
CAPTION_MIX = (("both", 0.70), ("content", 0.10), ("style", 0.10), ("", 0.10))

#: the neutral words novel-concept methods initialise from: an unnamed content, an unnamed style
CONTENT_NEUTRAL = "object"
STYLE_NEUTRAL = "pattern"

#: templates of the ``both`` kind ({c}: content words, {s}: style words); the first is generator.caption's
BOTH_TEMPLATES = (
    "a {c} in {s} style",
    "A photo of a {c} object in {s} style",
    "a {c} with a {s} pattern",
    "a picture of a {c} in {s} style",
    "an image of a {c} object with a {s} pattern",
    "a {s} style {c}",
    "a drawing of a {c}, {s} style",
)
#: templates of the content-only kind: the style is unnamed (the neutral word stands for it)
CONTENT_TEMPLATES = ("a {c}", "a {c} object", "a photo of a {c}", "a {c} with a pattern", "a {c} in pattern style")
#: templates of the style-only kind: the content is unnamed
STYLE_TEMPLATES = ("an image in {s} style", "an object in {s} style", "a {s} pattern",
                   "a photo of an object in {s} style", "an object with a {s} pattern")

#: synonyms of class words (used in the first two templates of a kind); none is a world class name or a
#: novel concept's name (a test checks)
SYNONYMS: dict[str, tuple[str, ...]] = {
    "cup": ("mug",), "boat": ("sailboat",), "house": ("cottage",), "fish": ("goldfish",),
    "striped": ("stripy",), "polka dot": ("dotted",), "checkered": ("checkerboard",),
    "watercolor": ("watercolour",), "pixel art": ("pixelated",), "hatched": ("cross-hatched",),
}
#: how often a class word is repeated in the repeated-word variants (a k-vector init of the word)
REPEATS = (2, 3, 4)
#: word-dropout variants per (kind, content, style) and the drop probability of each template word
DROPOUT_VARIANTS = 3
DROPOUT_P = 0.3

#: evaluation captions of the held-out pairs besides the base caption (what embedding methods feed)
EVAL_TEMPLATES = {"held_out_photo": "A photo of a {c} object in {s} style",
                  "held_out_repeat": "a {c} {c} {c} {c} in {s} {s} {s} {s} style"}


def _gen() -> Any:
    from cstoolkit.world import generator

    return generator


def _fill(template: str, c: str = "", s: str = "") -> str:
    return template.replace("{c}", c).replace("{s}", s)


def _dropout(template: str, rng: np.random.Generator, c: str, s: str) -> str:
    """``template`` with each template word dropped with :data:`DROPOUT_P` (class words always kept)."""
    words = template.split(" ")
    kept = [w for w in words if "{" in w or rng.random() >= DROPOUT_P]
    if len(kept) == len(words):  # drop at least one template word
        fillers = [i for i, w in enumerate(words) if "{" not in w]
        if fillers:
            drop = fillers[int(rng.integers(len(fillers)))]
            kept = [w for i, w in enumerate(words) if i != drop]
    return _fill(" ".join(kept), c, s)


def caption_variants(kind: str, content: str | None, style: str | None, *, seed: int = 0,
                     repeats: Sequence[int] = REPEATS) -> list[str]:
    """Captions of one (kind, content, style): the base caption first, then the augmented variants
    (templates, synonyms, the class words repeated ``repeats`` times, word dropout), without duplicates."""
    g = _gen()
    c, s = content or "", style or ""
    if kind == "":
        return [""]
    templates = {"both": BOTH_TEMPLATES, "content": CONTENT_TEMPLATES, "style": STYLE_TEMPLATES}[kind]
    out = [g.caption(content, style, kind=kind)]
    out += [_fill(t, c, s) for t in templates]
    for t in templates[:2]:  # synonyms
        out += [_fill(t, syn, s) for syn in SYNONYMS.get(c, ()) if "{c}" in t]
        out += [_fill(t, c, syn) for syn in SYNONYMS.get(s, ()) if "{s}" in t]
    for k in repeats:  # the class words repeated, as a k-vector init of the word
        for t in templates[:2]:
            if "{c}" in t:
                out.append(_fill(t, " ".join([c] * k), s))
            if "{s}" in t:
                out.append(_fill(t, c, " ".join([s] * k)))
            if "{c}" in t and "{s}" in t:
                out.append(_fill(t, " ".join([c] * k), " ".join([s] * k)))
    rng = np.random.default_rng([seed, zlib.crc32(f"{kind}|{c}|{s}".encode())])
    for i in range(DROPOUT_VARIANTS):
        out.append(_dropout(templates[i % len(templates)], rng, c, s))
    seen: set[str] = set()
    return [x for x in out if not (x in seen or seen.add(x))]


def caption_table(*, seed: int = 0, max_chars: int | None = None, augment: bool = True,
                  repeats: Sequence[int] = REPEATS) -> tuple[list[str], dict[tuple[str, int, int], list[int]]]:
    """Every caption the generator is trained or evaluated on, and (kind, content, style) -> indices of its
    captions (the base caption first, then the variants of :func:`caption_variants` unless ``augment`` is off).

    Kinds: ``both`` (every pair, held-out ones included: evaluation needs them), ``content``
    (style -1), ``style`` (content -1) and ``""`` (the empty caption, -1, -1). ``max_chars`` drops
    variants longer than a text encoder reads (Infinity's byte-level T5: 63 bytes); the base caption stays.
    ``repeats``: how often the repeated-word variants repeat a class word (empty: no such variants).
    """
    g = _gen()
    captions: list[str] = []
    index: dict[tuple[str, int, int], list[int]] = {}

    def add(key: tuple[str, int, int], texts: list[str]) -> None:
        texts = texts if augment else texts[:1]
        texts = texts[:1] + [t for t in texts[1:] if max_chars is None or len(t.encode()) <= max_chars]
        index[key] = list(range(len(captions), len(captions) + len(texts)))
        captions.extend(texts)

    for c, cname in enumerate(g.CONTENTS):
        for s, sname in enumerate(g.STYLES):
            add(("both", c, s), caption_variants("both", cname, sname, seed=seed, repeats=repeats))
    for c, cname in enumerate(g.CONTENTS):
        add(("content", c, -1), caption_variants("content", cname, None, seed=seed, repeats=repeats))
    for s, sname in enumerate(g.STYLES):
        add(("style", -1, s), caption_variants("style", None, sname, seed=seed, repeats=repeats))
    add(("", -1, -1), [""])
    return captions, index


def caption_words(text: str) -> set[str]:
    """Lower-case words of a caption (for checks such as "no novel concept is named")."""
    return set(re.findall(r"[a-z]+", text.lower()))


def draw_captions(content: torch.Tensor, style: torch.Tensor, index: dict[tuple[str, int, int], list[int]],
                  generator: torch.Generator, augment: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption index per sample and a bool "empty caption" flag: the kind drawn from :data:`CAPTION_MIX`,
    then the base caption, or with probability ``augment`` one of the key's variants (uniformly)."""
    n = content.shape[0]
    probs = torch.tensor([p for _, p in CAPTION_MIX])
    kind = torch.multinomial(probs, n, replacement=True, generator=generator).tolist()
    pick = torch.rand(n, generator=generator).tolist()
    which = torch.rand(n, generator=generator).tolist()
    out = []
    for k, c, s, p, w in zip(kind, content.tolist(), style.tolist(), pick, which):
        name = CAPTION_MIX[k][0]
        key = {"both": ("both", c, s), "content": ("content", c, -1), "style": ("style", -1, s)}.get(name, ("", -1, -1))
        rows = index[key]
        out.append(rows[0] if p >= augment or len(rows) == 1 else rows[1 + int(w * (len(rows) - 1))])
    kinds = torch.tensor(kind)
    return torch.tensor(out), kinds == len(CAPTION_MIX) - 1
