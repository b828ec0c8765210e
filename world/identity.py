"""Instance identity of a world sample: how well its silhouette matches one object instance's.

The content oracle's pooled features name the class and move with pose and style; they barely see
which *instance* of a class an image shows (measured in docs/world.md, "World bench v2": AUC 0.5-0.6).
The generator knows each instance's exact silhouette (:func:`~cstoolkit.world.generator.content_mask`),
so identity is measured on shape instead:

1. :func:`foreground`: the sample's object pixels: pixels whose colour differs from the ground (the
   median colour of the image border), closed and with holes filled (an outline or neon contour becomes
   a filled silhouette, as the generator's mask is).
2. :func:`canonical`: pose removed: the silhouette moved to its centroid and scaled to a fixed area.
3. :func:`silhouette_iou`: the best IoU over rotations of ±30° (the generator's pose rotates ±15°)
   between the sample's canonical silhouette and the instance's.

The bench's ``identity`` is this IoU against the item's own instance; ``identity_gain`` subtracts the
mean IoU against other instances of the same content.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
ANGLES = tuple(range(-30, 31, 5))
_FILL_AREA = 0.18  # canonical silhouettes cover this share of the frame


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB image (PIL, or float array in [0, 1]) as float32 (SIZE, SIZE, 3)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8))
    im = image.convert("RGB")
    if im.size != (SIZE, SIZE):
        im = im.resize((SIZE, SIZE), Image.BILINEAR, reducing_gap=None)
    return np.asarray(im, np.float32) / 255


def foreground(image: Image.Image | np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """Boolean (SIZE, SIZE) mask of the pixels that are not ground, closed, holes filled."""
    a = _as_array(image)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    ground = np.median(border, 0)
    fg = np.abs(a - ground).max(-1) > threshold
    im = Image.fromarray((fg * 255).astype(np.uint8))
    im = im.filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.MinFilter(3))  # close small gaps
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
    """Best IoU over rotations (``ANGLES``) between the image's canonical foreground and each instance
    mask's canonical silhouette (masks from ``content_mask``, any pose)."""
    fg = foreground(image)
    rotated = [canonical(fg, a) for a in ANGLES]
    out = []
    for m in instance_masks:
        ref = canonical(m)
        out.append(max(_iou(r, ref) for r in rotated))
    return out
