"""Instance identity of a world sample: how well its silhouette matches one object instance's.

The content oracle's pooled features name the class and move with pose and style; they barely see
which *instance* of a class an image shows (measured in docs/world.md, "World bench v2": AUC 0.64).
The generator can draw any instance in any style and pose, so identity is measured on shape, against
references drawn by the generator **in the style the sample was asked for** (a style's own artefacts,
a neon glow, an outline band, pixel blocks, then touch the sample and its references alike):

1. :func:`foreground`: the image's object pixels: pixels whose colour differs from the ground (the
   median colour of the image border), closed; holes (a window, a fish's eye, a mushroom's spots) stay
   open unless ``fill_holes``.
2. :func:`canonical`: pose removed: the silhouette moved to its centroid and scaled to a fixed area.
3. :func:`instance_ious`: per candidate instance, the best IoU over rotations of ±30° (the generator's
   pose rotates ±15°) between the sample's canonical silhouette and each of the instance's reference
   renders (:func:`reference_silhouettes`: ``REFERENCE_POSES`` poses), averaged over the poses.

:func:`identity_scores` gives the bench's ``identity`` (the IoU with the item's own instance) and
``identity_gain`` (minus the mean IoU with ``OTHER_INSTANCES`` other instances of the same content).
:func:`identity_auc` measures how well ``identity_gain`` separates renders of the own instance from
renders of other instances, in other styles and new poses (docs/world.md, "Identity measure").
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .generator import render_array

SIZE = 64
ANGLES = tuple(range(-30, 31, 5))
#: reference renders per instance (pose seeds ``seed + 313 k``): averaging over poses evens out the
#: rasterisation and pose normalisation of any single render (AUC 0.90 with one, 0.91 with three)
REFERENCE_POSES = 3
#: other instances of the content that ``identity_gain`` subtracts (instances ``instance + 1 ..``)
OTHER_INSTANCES = 4
_FILL_AREA = 0.18  # canonical silhouettes cover this share of the frame


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB image (PIL, or float array in [0, 1]) as float32 (SIZE, SIZE, 3)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8))
    im = image.convert("RGB")
    if im.size != (SIZE, SIZE):
        im = im.resize((SIZE, SIZE), Image.BILINEAR, reducing_gap=None)
    return np.asarray(im, np.float32) / 255


def foreground(image: Image.Image | np.ndarray, threshold: float = 0.2, fill_holes: bool = False) -> np.ndarray:
    """Boolean (SIZE, SIZE) mask of the pixels that are not ground, closed (holes filled if ``fill_holes``)."""
    a = _as_array(image)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    ground = np.median(border, 0)
    fg = np.abs(a - ground).max(-1) > threshold
    im = Image.fromarray((fg * 255).astype(np.uint8))
    im = im.filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.MinFilter(3))  # close small gaps
    if not fill_holes:
        return np.asarray(im, np.uint8) > 127
    # fill holes: flood the ground from a padded border; whatever it cannot reach is object
    pad = Image.new("L", (SIZE + 2, SIZE + 2), 0)
    pad.paste(im, (1, 1))
    ImageDraw.floodfill(pad, (0, 0), 128)
    return np.asarray(pad, np.uint8)[1:-1, 1:-1] != 128


def canonical(mask: np.ndarray, angle: float = 0.0) -> np.ndarray:
    """``mask`` (any square size, bool or [0, 1]) moved to its centroid, scaled to a fixed area and
    rotated by ``angle`` degrees: float32 (SIZE, SIZE). An empty mask stays empty."""
    m = np.asarray(mask, np.float32)
    area = float(m.sum())
    if area < 1:
        return np.zeros((SIZE, SIZE), np.float32)
    n = m.shape[0]
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    cx, cy = float((m * x).sum() / area), float((m * y).sum() / area)
    scale = np.sqrt(_FILL_AREA * SIZE * SIZE / area)  # output px per input px
    # PIL's affine maps output to input: input = A @ output + b
    t = np.radians(angle)
    c, s = np.cos(t) / scale, np.sin(t) / scale
    h = SIZE / 2
    coeffs = (c, -s, cx - c * h + s * h, s, c, cy - s * h - c * h)
    im = Image.fromarray((m * 255).astype(np.uint8)).transform((SIZE, SIZE), Image.AFFINE, coeffs, Image.BILINEAR)
    return np.asarray(im, np.float32) / 255


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.minimum(a, b).sum()
    union = np.maximum(a, b).sum()
    return float(inter / union) if union > 0 else 0.0


def silhouette_iou(image: Image.Image | np.ndarray, instance_masks: Sequence[np.ndarray]) -> list[float]:
    """Best IoU over rotations (``ANGLES``) between the image's canonical foreground (holes filled) and
    each instance mask's canonical silhouette (masks from ``content_mask``, any pose).

    The first identity measure (AUC 0.80, docs/world.md); the bench now uses :func:`instance_ious`."""
    fg = foreground(image, fill_holes=True)
    rotated = [canonical(fg, a) for a in ANGLES]
    out = []
    for m in instance_masks:
        ref = canonical(m)
        out.append(max(_iou(r, ref) for r in rotated))
    return out


def reference_silhouettes(content: str, style: str, instances: Sequence[int], seed: int,
                          poses: int = REFERENCE_POSES) -> list[list[np.ndarray]]:
    """Per instance, the canonical foregrounds of ``poses`` generator renders of ``content`` in
    ``style`` (64 px, pose seeds ``seed + 313 k``): the references of :func:`instance_ious`."""
    return [[canonical(foreground(render_array(content, style, seed=seed + 313 * k, size=SIZE, instance=i)))
             for k in range(poses)] for i in instances]


def instance_ious(image: Image.Image | np.ndarray, references: Sequence[Sequence[np.ndarray]]) -> list[float]:
    """Per instance of ``references`` (:func:`reference_silhouettes`): the best IoU over rotations
    (``ANGLES``) between the image's canonical foreground and each reference, averaged over references."""
    fg = foreground(image)
    rotated = [canonical(fg, a) for a in ANGLES]
    return [float(np.mean([max(_iou(r, ref) for r in rotated) for ref in refs])) for refs in references]


def identity_scores(image: Image.Image | np.ndarray, content: str, style: str, instance: int, seed: int,
                    references: Sequence[Sequence[np.ndarray]] | None = None) -> tuple[float, float]:
    """``(identity, identity_gain)`` of an image that should show ``instance`` of ``content`` and was
    asked in ``style``: the IoU with the instance's references and that minus the mean IoU with
    ``OTHER_INSTANCES`` other instances (``instance + 1 ..``). Pass ``references`` (from
    :func:`reference_silhouettes` for ``[instance, instance + 1, ...]``) to reuse them across images."""
    refs = references if references is not None else reference_silhouettes(
        content, style, range(instance, instance + OTHER_INSTANCES + 1), seed)
    ious = instance_ious(image, refs)
    return ious[0], ious[0] - float(np.mean(ious[1:]))


def auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve: the chance that a positive (label 1) scores above a negative (ties: half)."""
    y, s = np.asarray(labels), np.asarray(scores, float)
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg):
        raise ValueError("auc needs positives and negatives")
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg)))


def identity_auc(items: Sequence[tuple[str, str, int, int]], styles: Sequence[str], seed0: int = 77_000,
                 score_fn=None) -> dict:
    """How well ``identity_gain`` tells an item's own instance from another instance of its content.

    ``items``: ``(content, style s0, seed, instance)`` as the bench's items. For each item and each
    style s of ``styles`` other than s0: a positive (the own instance, rendered in s in a new pose,
    seed ``seed0 + 100 i + j + 7``) and a negative (instance ``instance + 50 + j``, not one the gain
    subtracts, in s, seed ``seed0 + 100 i + j``), both 64 px, scored against the item's instance in s.
    ``score_fn(image, content, style, instance, seed) -> gain`` replaces :func:`identity_scores`'s gain.
    Returns ``{"auc", "per_style", "per_content", "pairs"}``.
    """
    rows = []
    for i, (c, s0, seed, inst) in enumerate(items):
        for j, s in enumerate(styles):
            if s == s0:
                continue
            refs = None if score_fn else reference_silhouettes(c, s, range(inst, inst + OTHER_INSTANCES + 1), seed)
            for label, ins in ((1, inst), (0, inst + 50 + j)):
                im = render_array(c, s, seed=seed0 + 100 * i + j + 7 * label, size=SIZE, instance=ins)
                g = score_fn(im, c, s, inst, seed) if score_fn else identity_scores(im, c, s, inst, seed, refs)[1]
                rows.append((c, s, label, g))

    def by(key: int) -> dict[str, float]:
        groups: dict[str, list] = {}
        for r in rows:
            groups.setdefault(r[key], []).append(r)
        return {k: round(auc([r[2] for r in v], [r[3] for r in v]), 3) for k, v in groups.items()}

    return {"auc": round(auc([r[2] for r in rows], [r[3] for r in rows]), 3), "per_style": by(1),
            "per_content": by(0), "pairs": len(rows) // 2}
