"""Shape gate on the content oracle's verdict (weight-free; docs/world.md, "Shape gate").

The v2 content oracle rejects noise, colour fields, textures and shuffled renders, but reads most smooth
shapeless blobs (:func:`cstoolkit.world.oracle.blob_mask`) as some class (fish, cup, kite). The gate accepts
the oracle's content c only if the image's silhouette is more like a real c than like a blob:

1. :func:`silhouettes`: the image's foreground at 64 px (:func:`cstoolkit.world.identity.foreground`, holes
   filled, so outline and neon styles give the filled shape), moved to its centroid and scaled to a fixed
   area (:func:`cstoolkit.world.identity.canonical`) at each rotation of ``GateConfig.angles``, also mirrored
   (the oracle trains on flips), averaged to 32 px (a soft mask: a lumpy edge of a generated sample costs
   less than at 64 px).
2. :func:`banks` (cached in memory and on disk): the same silhouettes (angle 0) of ``class_bank`` renders of
   every content (styles in turn, 64 and 128 px, their own instances and poses: a style's artefacts such as
   an outline band, a neon glow or pixel blocks are in the bank as in a sample), and of ``blob_bank`` blobs
   (``blob_mask`` in every style in turn, seeds of their own).
3. :func:`shape_scores`: per content, the best soft IoU of the image's silhouettes with that content's bank,
   and the best with the blob bank (last column).
4. :func:`gate_margins`: the named content's score minus the blob score; the verdict stands if it is at
   least ``GateConfig.threshold`` (:func:`gate_passes`).

:func:`apply_gate` turns a refused verdict into the oracle's own rejection (``content`` None, ``rejected``
True; the style verdict stands), as :meth:`cstoolkit.world.oracle.WorldOracle.classify` reports it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

from .generator import ALL_CONTENTS, ALL_STYLES, render_array, style_array
from .identity import canonical, foreground

if TYPE_CHECKING:  # torch is imported where used: the CLI reads ON_BY_DEFAULT while building its parser
    import torch

#: the gate's name in scorer ids and reports
GATE_ID = "gate-v1"
#: whether ``cstoolkit world bench`` and ``world classify`` gate by default (their ``--gate`` / ``--no-gate``)
ON_BY_DEFAULT = False


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """The shape gate's settings (the measured ones of docs/world.md, "Shape gate")."""

    #: rotations (degrees) of the image's silhouette tried against the banks (the renders' poses add +-15)
    angles: tuple[float, ...] = tuple(float(a) for a in range(-20, 21, 5))
    #: also match the image's mirror image with the class banks (the oracle counts a mirrored object as its
    #: class: it trains on flips); the blob bank sees the image as it is (its shapes are as likely mirrored)
    mirror: bool = True
    #: silhouette side (px) of the comparison: the 64 px canonical silhouette averaged down
    side: int = 32
    #: renders per content in the class bank (styles in turn; 64 / 128 px alternating per round of styles)
    class_bank: int = 104
    class_seed: int = 3_000_000
    #: blob silhouettes in the blob bank (``blob_mask`` in each style in turn)
    blob_bank: int = 1560
    blob_seed: int = 7_000_000
    #: a content verdict stands if its score minus the blob score is at least this
    threshold: float = -0.035


def silhouettes(image: Image.Image | np.ndarray, angles: Sequence[float], side: int = 32,
                mirror: bool = False) -> torch.Tensor:
    """The image's canonical filled foreground at each of ``angles`` (and, if ``mirror``, of its left-right
    mirror image at each), averaged to ``side`` px: float (len(angles) * (1 + mirror), side * side) in [0, 1]."""
    import torch
    import torch.nn.functional as F

    fg = foreground(image, fill_holes=True)
    fgs = [fg, fg[:, ::-1]] if mirror else [fg]
    x = torch.from_numpy(np.stack([canonical(f, a) for f in fgs for a in angles]))[:, None]
    if x.shape[-1] != side:
        x = F.adaptive_avg_pool2d(x, side)
    return x.reshape(len(x), -1)


def _cache_file(cfg: GateConfig) -> Path:
    """The banks' cache file: named by the settings that shape them and by the source of what draws them (the
    generator, ``blob_mask`` and the foreground), so a changed drawing rebuilds them."""
    import inspect

    from . import generator, identity, oracle

    src = [inspect.getsource(generator)] + [inspect.getsource(f) for f in (
        oracle.blob_mask, oracle._raw_blob, oracle._warp, oracle._soften, oracle._recentre, oracle.shape_iou,
        oracle._shape_bank, identity.foreground, identity.canonical)]
    key = json.dumps([GATE_ID, cfg.side, cfg.class_bank, cfg.class_seed, cfg.blob_bank, cfg.blob_seed,
                      oracle.BLOB_MAX_IOU, hashlib.sha1("".join(src).encode()).hexdigest()])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cstoolkit" / "world_gate" / f"banks-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npy"


def _build_banks(cfg: GateConfig) -> np.ndarray:
    import torch

    from .oracle import blob_mask

    rows = []
    n = len(ALL_STYLES)
    for c in ALL_CONTENTS:
        rows += [silhouettes(render_array(c, ALL_STYLES[j % n], seed=cfg.class_seed + j, size=(64, 128)[(j // n) % 2]),
                             (0.0,), cfg.side)[0] for j in range(cfg.class_bank)]
    for j in range(cfg.blob_bank):
        seed = cfg.blob_seed + j
        m = blob_mask("blob", seed, size=(64, 128)[(j // n) % 2])
        rows.append(silhouettes(style_array(m, ALL_STYLES[j % n], seed=seed), (0.0,), cfg.side)[0])
    return torch.stack(rows).numpy().astype(np.float16)


@functools.lru_cache(maxsize=4)
def banks(cfg: GateConfig = GateConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """``(class_bank, blob_bank)``: float (len(ALL_CONTENTS), cfg.class_bank, side * side) and
    (cfg.blob_bank, side * side) silhouettes (angle 0). Built once (about 40 s on one core), then read from
    ``$XDG_CACHE_HOME/cstoolkit/world_gate/`` (a damaged cache file is rebuilt)."""
    import torch

    f = _cache_file(cfg)
    want = (len(ALL_CONTENTS) * cfg.class_bank + cfg.blob_bank, cfg.side * cfg.side)
    arr = None
    if f.is_file():
        try:
            arr = np.load(f)
        except (OSError, ValueError):
            arr = None
        if arr is not None and arr.shape != want:
            arr = None
    if arr is None:
        arr = _build_banks(cfg)
        try:
            from cstoolkit.io import atomic_write

            buf = io.BytesIO()
            np.save(buf, arr)
            atomic_write(f, lambda fh: fh.write(buf.getvalue()))
        except OSError:  # a read-only home: keep the banks in memory only
            pass
    t = torch.from_numpy(arr.astype(np.float32))
    k = len(ALL_CONTENTS) * cfg.class_bank
    return t[:k].reshape(len(ALL_CONTENTS), cfg.class_bank, -1), t[k:]


def shape_scores(images: Sequence[Image.Image | np.ndarray], cfg: GateConfig = GateConfig()) -> torch.Tensor:
    """(B, len(ALL_CONTENTS) + 1): per image, the best soft IoU (sum of minima / sum of maxima) of its
    silhouettes (:func:`silhouettes`, every rotation of ``cfg.angles``; mirrored too if ``cfg.mirror``) with
    each content's bank, and in the last column (not mirrored) with the blob bank."""
    import torch

    cb, bb = banks(cfg)
    nc, nb, _ = cb.shape
    flat = torch.cat([cb.reshape(nc * nb, -1), bb])
    rows = []
    for im in images:
        s = silhouettes(im, cfg.angles, cfg.side, cfg.mirror)
        iou = torch.stack([torch.minimum(a, flat).sum(1) / torch.maximum(a, flat).sum(1).clamp_min(1e-6)
                           for a in s])  # (silhouettes, bank entries); the mirrored ones after the others
        blob = iou[:len(cfg.angles), nc * nb:].amax()  # a mirrored blob is as likely a blob: no mirror here
        rows.append(torch.cat([iou[:, :nc * nb].amax(0).reshape(nc, nb).amax(1), blob[None]]))
    return torch.stack(rows) if rows else torch.zeros(0, nc + 1)


def gate_margins(scores: torch.Tensor, contents: Sequence[int]) -> torch.Tensor:
    """(B,): the score of content ``contents[i]`` (an index of ``ALL_CONTENTS``) minus the blob score, per row
    of ``scores`` (:func:`shape_scores`)."""
    import torch

    idx = torch.as_tensor(list(contents), dtype=torch.long)
    return scores.gather(1, idx[:, None])[:, 0] - scores[:, -1]


def gate_passes(images: Sequence[Image.Image | np.ndarray], contents: Sequence[int | None],
                cfg: GateConfig = GateConfig()) -> list[tuple[bool, float | None]]:
    """Per image and its oracle content (an index of ``ALL_CONTENTS``, or None where the oracle rejected
    it): ``(passes, margin)``; an image without a content passes (nothing to gate) with margin None."""
    todo = [i for i, c in enumerate(contents) if c is not None]
    out: list[tuple[bool, float | None]] = [(True, None)] * len(contents)
    if todo:
        m = gate_margins(shape_scores([images[i] for i in todo], cfg), [int(contents[i]) for i in todo])
        for i, v in zip(todo, m.tolist()):
            out[i] = (v >= cfg.threshold, round(float(v), 4))
    return out


def apply_gate(results: list[dict], images: Sequence[Image.Image | np.ndarray],
               cfg: GateConfig = GateConfig()) -> list[dict]:
    """Gate the content verdicts of :meth:`cstoolkit.world.oracle.WorldOracle.classify` (in place; returned):
    each gets ``shape_margin`` (None where the oracle named no content) and ``gate_rejected``; a verdict the
    gate refuses becomes the oracle's rejection (``content`` None, ``rejected`` True; ``content_prob`` and
    the style verdict stand)."""
    idx = [ALL_CONTENTS.index(r["content"]) if r["content"] is not None else None for r in results]
    for r, (ok, m) in zip(results, gate_passes(images, idx, cfg)):
        r["shape_margin"] = m
        r["gate_rejected"] = not ok
        if not ok:
            r["content"], r["rejected"] = None, True
    return results
