"""Captions of the world trainers: the caption table every backbone encodes and the per-sample draw."""

from __future__ import annotations

from typing import Any

import torch

#: caption mix of the generator training: (kind, probability); "" = empty caption (CFG)
CAPTION_MIX = (("both", 0.70), ("content", 0.10), ("style", 0.10), ("", 0.10))


def _gen() -> Any:
    from cstoolkit.world import generator

    return generator


def caption_table() -> tuple[list[str], dict[tuple[str, int, int], int]]:
    """Every caption the generator is trained or evaluated on, and (kind, content, style) -> index.

    Kinds: ``both`` (every pair, held-out ones included: evaluation needs them), ``content``
    (style -1), ``style`` (content -1) and ``""`` (the empty caption, -1, -1).
    """
    g = _gen()
    captions: list[str] = []
    index: dict[tuple[str, int, int], int] = {}

    def add(key: tuple[str, int, int], text: str) -> None:
        index[key] = len(captions)
        captions.append(text)

    for c, cname in enumerate(g.CONTENTS):
        for s, sname in enumerate(g.STYLES):
            add(("both", c, s), g.caption(cname, sname, kind="both"))
    for c, cname in enumerate(g.CONTENTS):
        add(("content", c, -1), g.caption(cname, g.STYLES[0], kind="content"))
    for s, sname in enumerate(g.STYLES):
        add(("style", -1, s), g.caption(g.CONTENTS[0], sname, kind="style"))
    add(("", -1, -1), "")
    return captions, index


def draw_captions(content: torch.Tensor, style: torch.Tensor, index: dict[tuple[str, int, int], int],
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption index per sample, drawn from :data:`CAPTION_MIX`, and a bool "empty caption" flag."""
    n = content.shape[0]
    probs = torch.tensor([p for _, p in CAPTION_MIX])
    kind = torch.multinomial(probs, n, replacement=True, generator=generator).tolist()
    out = []
    for k, c, s in zip(kind, content.tolist(), style.tolist()):
        name = CAPTION_MIX[k][0]
        key = {"both": ("both", c, s), "content": ("content", c, -1), "style": ("style", -1, s)}.get(name, ("", -1, -1))
        out.append(index[key])
    kinds = torch.tensor(kind)
    return torch.tensor(out), kinds == len(CAPTION_MIX) - 1
