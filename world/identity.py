"""Instance identity of a world sample: how well its foreground matches one object instance's.

The content oracle's pooled features name the class and move with pose and style; they barely see
which *instance* of a class an image shows (measured in docs/world.md, "World bench v2": AUC 0.64).
The generator can draw any instance in any style and pose, so identity is measured on shape, against
the instance drawn by the generator **in the style the sample was asked for** (a style's own artefacts,
a neon glow, an outline band, pixel blocks, then touch the sample and its reference alike).

v4 (the bench's ``identity`` / ``identity_gain``; docs/world.md, "Identity measure"):

1. :func:`foreground`: the sample's object pixels at 64 px (pixels whose colour differs from the border's
   median colour, closed; holes such as windows, eyes and spots stay open).
2. :func:`instance_template` (cached): per candidate instance, the foreground of its render in the asked
   style at a canonical pose (upright, centred, ``TEMPLATE_SCALE``).
3. :func:`fit_pose`: the sample's pose for that instance, by analysis by synthesis: scale and position
   from the foreground's area and centroid, the best rotation of ``FIT_ANGLES`` by soft IoU of the warped
   template, then two moment corrections (clipping at the frame, band styles) and a finer rotation step.
4. :func:`instance_scores`: the generator renders the instance **at the fitted pose** in the asked style;
   the score is the soft IoU (both masks blurred by ``SOFT_RADIUS`` px) of its foreground and the sample's.

:func:`identity_scores` gives ``identity`` (the score of the item's own instance) and ``identity_gain``
(:func:`gain_of`: the share of the gap to a perfect match that the own instance closes beyond the mean
of ``OTHER_INSTANCES`` other instances of the content: ``(s0 - m) / (1 - m)``; 0 for a typical other
instance, 1 for a perfect match). :func:`identity_auc` measures how well it separates renders of the own
instance from renders of other instances, in other styles and new poses (``--size`` / ``--degrade``:
at 128 px and through the oracle's imperfections); :func:`identity_draw` gives the draws of items.

v3 (:func:`reference_silhouettes`, :func:`instance_ious`: canonical silhouettes compared at ±30°, the
plain difference as gain) stays for comparison and for :mod:`cstoolkit.world.identity_net`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .generator import HELD_OUT, NOVEL_HELD_OUT, STYLES, draw_parts, instance_parts, render_array, style_array

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


def identity_scores_v3(image: Image.Image | np.ndarray, content: str, style: str, instance: int, seed: int,
                       references: Sequence[Sequence[np.ndarray]] | None = None) -> tuple[float, float]:
    """v3's ``(identity, identity_gain)``: the mean best IoU with the instance's canonical references
    (:func:`reference_silhouettes`) and that minus the mean with ``OTHER_INSTANCES`` other instances."""
    refs = references if references is not None else reference_silhouettes(
        content, style, range(instance, instance + OTHER_INSTANCES + 1), seed)
    ious = instance_ious(image, refs)
    return ious[0], ious[0] - float(np.mean(ious[1:]))


# ---------------------------------------------------------------------------------------------- v4
TEMPLATE_SCALE = 0.42  # the canonical pose's radius (a share of the frame), mid of the generator's 0.375-0.475
#: rotations (degrees) the pose fit tries; the generator's poses rotate ±15°, generated samples a little more
FIT_ANGLES = tuple(range(-21, 22, 3))
SOFT_RADIUS = 0.7  # px (at 64) of the Gaussian blur of both masks before their IoU: tolerates half-pixel errors
_YX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


@dataclasses.dataclass(frozen=True)
class InstanceTemplate:
    """One candidate instance in one style: the style seed and size (px) of its renders, its parts, the
    soft foreground (at ``SIZE``) of its render at the canonical pose (an ``L`` image, blurred by
    ``SOFT_RADIUS``), that foreground's area (px) and centroid (shape units, from the shape's origin)."""

    content: str
    instance: int
    style: str
    seed: int
    size: int
    parts: tuple
    image: Image.Image
    area: float
    centroid: tuple[float, float]


def _soft(mask: np.ndarray, radius: float = SOFT_RADIUS) -> np.ndarray:
    im = Image.fromarray((np.clip(mask, 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.asarray(im.filter(ImageFilter.GaussianBlur(radius)), np.float32) / 255


def _moments(mask: np.ndarray) -> tuple[float, float, float]:
    """Area and centroid (x, y; continuous px, pixel centres at +0.5) of a mask."""
    a = float(mask.sum())
    if a <= 0:
        return 0.0, SIZE / 2, SIZE / 2
    return a, float((mask * _YX[1]).sum() / a) + 0.5, float((mask * _YX[0]).sum() / a) + 0.5


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.maximum(a, b).sum()
    return float(np.minimum(a, b).sum() / union) if union > 0 else 0.0


@functools.lru_cache(maxsize=2048)
def instance_template(content: str, instance: int, style: str, seed: int, size: int = SIZE) -> InstanceTemplate:
    """The canonical-pose template of ``instance`` of ``content`` rendered in ``style`` (style seed
    ``seed``) at ``size`` px (the samples' size: a style's bands and blocks scale with the image by steps):
    what :func:`fit_pose` warps onto a sample. Cached (the bench scores many samples against the same few
    instances)."""
    parts = tuple(instance_parts(content, instance))
    fg = foreground(style_array(draw_parts(parts, 0.0, TEMPLATE_SCALE, 0.5, 0.5, size), style, seed=seed))
    m = fg.astype(np.float32)
    a, cx, cy = _moments(m)
    cen = ((cx / SIZE - 0.5) / TEMPLATE_SCALE, (cy / SIZE - 0.5) / TEMPLATE_SCALE)
    img = Image.fromarray((_soft(m) * 255 + 0.5).astype(np.uint8))
    return InstanceTemplate(content, instance, style, seed, size, parts, img, a, cen)


def identity_references(content: str, style: str, instances: Sequence[int], seed: int,
                        size: int = SIZE) -> list[InstanceTemplate]:
    """The templates (:func:`instance_template`) of ``instances`` of ``content`` in ``style``, rendered at
    ``size`` px (the samples' size): the ``references`` of :func:`instance_scores` / :func:`identity_scores`."""
    return [instance_template(content, int(i), style, seed, size) for i in instances]


def _place(t: InstanceTemplate, angle: float, scale: float, cx: float, cy: float) -> tuple[float, float, float, float]:
    """The pose (angle, scale, x, y in frame shares) that puts the template's centroid at (cx, cy) px."""
    r = math.radians(angle)
    dx = (math.cos(r) * t.centroid[0] - math.sin(r) * t.centroid[1]) * scale
    dy = (math.sin(r) * t.centroid[0] + math.cos(r) * t.centroid[1]) * scale
    return angle, scale, cx / SIZE - dx, cy / SIZE - dy


def _warp(t: InstanceTemplate, pose: tuple[float, float, float, float]) -> np.ndarray:
    """The template moved from the canonical pose to ``pose``: soft mask (SIZE, SIZE)."""
    angle, scale, x, y = pose
    r, k = math.radians(angle), TEMPLATE_SCALE / scale
    c, s = math.cos(r) * k, math.sin(r) * k
    ox, oy = x * SIZE, y * SIZE
    # output pixel p (centre p + .5) -> template point q = R(-angle) (p + .5 - o) k + SIZE / 2 (PIL: q - .5)
    b1 = -(c * (ox - 0.5) + s * (oy - 0.5)) + SIZE / 2 - 0.5
    b2 = -(-s * (ox - 0.5) + c * (oy - 0.5)) + SIZE / 2 - 0.5
    out = t.image.transform((SIZE, SIZE), Image.AFFINE, (c, s, b1, -s, c, b2), Image.BILINEAR)
    return np.asarray(out, np.float32) / 255


def fit_pose(template: InstanceTemplate, fg: np.ndarray,
             soft_fg: np.ndarray | None = None) -> tuple[tuple[float, float, float, float], float]:
    """The pose ``(angle, scale, x, y)`` (as :func:`cstoolkit.world.generator.pose_of`) at which
    ``template`` best covers the foreground ``fg`` (bool (SIZE, SIZE)), and the soft IoU there."""
    m = fg.astype(np.float32)
    sf = _soft(m) if soft_fg is None else soft_fg
    a, mx, my = _moments(m)
    if a <= 0 or template.area <= 0:
        return (0.0, TEMPLATE_SCALE, 0.5, 0.5), 0.0
    scale = TEMPLATE_SCALE * math.sqrt(a / template.area)
    best = max(((_soft_iou(_warp(template, p), sf), p) for p in
                (_place(template, ang, scale, mx, my) for ang in FIT_ANGLES)), key=lambda z: z[0])
    for _ in range(2):  # moment corrections: clipping at the frame, bands whose area is not ~ scale^2
        pose = best[1]
        wa, wx, wy = _moments(_warp(template, pose))
        if wa <= 0:
            break
        p = (pose[0], pose[1] * math.sqrt(a / wa), pose[2] + (mx - wx) / SIZE, pose[3] + (my - wy) / SIZE)
        best = max(best, (_soft_iou(_warp(template, p), sf), p), key=lambda z: z[0])
    pose = best[1]
    _, cx, cy = _moments(_warp(template, pose))
    for d in (-2, -1, 1, 2):  # finer rotation about the same centroid
        p = _place(template, pose[0] + d, pose[1], cx, cy)
        best = max(best, (_soft_iou(_warp(template, p), sf), p), key=lambda z: z[0])
    return best[1], best[0]


def instance_scores(image: Image.Image | np.ndarray, references: Sequence[InstanceTemplate]) -> list[float]:
    """Per reference (:func:`identity_references`): fit its pose to the image's foreground, render the
    instance there in the reference's style and return the soft IoU of the two foregrounds (1 = same)."""
    fg = foreground(image)
    sf = _soft(fg.astype(np.float32))
    out = []
    for t in references:
        pose, _ = fit_pose(t, fg, sf)
        ref = foreground(style_array(draw_parts(t.parts, *pose, t.size), t.style, seed=t.seed))
        out.append(_soft_iou(_soft(ref.astype(np.float32)), sf))
    return out


def gain_of(scores: Sequence[float]) -> float:
    """``identity_gain`` from ``[own, other_1, ...]`` scores: ``(own - m) / (1 - m)``, m the mean of the
    others: the share of the gap to a perfect match that the own instance closes beyond a typical other
    instance (0: no better than another instance of the class; 1: a perfect match). Dividing by the gap
    puts contents whose instances all overlap much (moon) and little (anchor) on one scale (AUC +0.05
    over the plain difference, docs/world.md)."""
    m = float(np.mean(scores[1:]))
    return (float(scores[0]) - m) / max(1.0 - m, 1e-3)


def identity_scores(image: Image.Image | np.ndarray, content: str, style: str, instance: int, seed: int,
                    references: Sequence[InstanceTemplate] | None = None) -> tuple[float, float]:
    """``(identity, identity_gain)`` of an image that should show ``instance`` of ``content`` and was
    asked in ``style``: its :func:`instance_scores` score with the instance, and :func:`gain_of` over
    it and ``OTHER_INSTANCES`` other instances (``instance + 1 ..``). ``seed`` is the style seed of the
    references' renders (at the image's size); pass ``references`` (:func:`identity_references` for
    ``[instance, instance + 1, ...]`` at the samples' size) to reuse them across images."""
    if references is None:
        size = image.shape[0] if isinstance(image, np.ndarray) else image.size[0]
        references = identity_references(content, style, range(instance, instance + OTHER_INSTANCES + 1), seed,
                                         max(size, SIZE))
    scores = instance_scores(image, references)
    return scores[0], gain_of(scores)


def degrade(image: np.ndarray, seed: int) -> np.ndarray:
    """The content oracle's training imperfections (:func:`cstoolkit.world.oracle.augment`) at the image's
    own size, without its mirror flip (a mirrored house is another instance): a shift of up to 4/64 of the
    side, a down/up-sampling to 16-56/64 of the side (30 %), a Gaussian blur of sigma 0.3-1.2 px per 64
    (50 %), per-channel gain (±10 %) and offset (±0.04), contrast ±15 %, Gaussian noise of std up to 0.06.
    ``image``: float RGB (S, S, 3) in [0, 1]; deterministic from ``seed``."""
    r = np.random.default_rng(seed)
    s = image.shape[0]
    k = s / SIZE
    pad = int(round(4 * k))
    xp = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    ox, oy = r.integers(0, 2 * pad + 1, 2)
    im = Image.fromarray((np.clip(xp[oy:oy + s, ox:ox + s], 0, 1) * 255 + 0.5).astype(np.uint8))
    if r.random() < 0.3:
        lo = int((16 + r.random() * 40) * k)
        im = im.resize((lo, lo), Image.BILINEAR, reducing_gap=None).resize((s, s), Image.BILINEAR)
    if r.random() < 0.5:
        im = im.filter(ImageFilter.GaussianBlur((0.3 + r.random() * 0.9) * k))
    x = np.asarray(im, np.float32) / 255 * 2 - 1  # the oracle's [-1, 1] scale
    gain = 1 + (r.random((1, 1, 3)) - 0.5) * 0.2
    off = (r.random((1, 1, 3)) - 0.5) * 0.16
    con = 1 + (r.random() - 0.5) * 0.3
    x = (x - x.mean()) * con + x.mean()
    x = x * gain + off + r.standard_normal(x.shape) * r.random() * 0.12
    return ((np.clip(x, -1, 1) + 1) / 2).astype(np.float32)


def auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve: the chance that a positive (label 1) scores above a negative (ties: half)."""
    y, s = np.asarray(labels), np.asarray(scores, float)
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg):
        raise ValueError("auc needs positives and negatives")
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg)))


def identity_draw(draw: int) -> list[tuple[str, str, int, int]]:
    """Items ``(content, style s0, seed, instance)`` for every known and novel content (13): draw 0 is the
    bench's own items (held-out pairs: seed 1000 + i, instance 5000 + i; the novel contents in their first
    ``novel_content`` styles: seed 2000 + i, instance 6000 + i); draw d > 0 keeps the pairs and takes seeds
    30 000 + 1000 d + i and instances 200 000 + 1000 d + i."""
    novel = NOVEL_HELD_OUT["novel_content"][:3]
    if draw == 0:
        return ([(c, s, 1000 + i, 5000 + i) for i, (c, s) in enumerate(HELD_OUT)]
                + [(c, s, 2000 + i, 6000 + i) for i, (c, s) in enumerate(novel)])
    pairs = list(HELD_OUT) + list(novel)
    return [(c, s, 30_000 + 1000 * draw + i, 200_000 + 1000 * draw + i) for i, (c, s) in enumerate(pairs)]


def identity_auc(items: Sequence[tuple[str, str, int, int]], styles: Sequence[str] = STYLES, seed0: int = 77_000,
                 score_fn: Callable | None = None, size: int = SIZE, degraded: bool = False) -> dict:
    """How well ``identity_gain`` tells an item's own instance from another instance of its content.

    ``items``: ``(content, style s0, seed, instance)`` as the bench's items (:func:`identity_draw`). For
    each item and each style s of ``styles`` other than s0: a positive (the own instance, rendered in s in
    a new pose, seed ``seed0 + 100 i + j + 7``) and a negative (instance ``instance + 50 + j``, not one the
    gain subtracts, in s, seed ``seed0 + 100 i + j``), both ``size`` px (through :func:`degrade` if
    ``degraded``), scored against the item's instance in s.
    ``score_fn(image, content, style, instance, seed) -> gain`` replaces :func:`identity_scores`'s gain.
    Returns ``{"auc", "per_style", "per_content", "pairs", "rows"}`` (rows: content, style, label, gain).
    """
    rows = []
    for i, (c, s0, seed, inst) in enumerate(items):
        for j, s in enumerate(styles):
            if s == s0:
                continue
            refs = None if score_fn else identity_references(c, s, range(inst, inst + OTHER_INSTANCES + 1), seed,
                                                              max(size, SIZE))
            for label, ins in ((1, inst), (0, inst + 50 + j)):
                pose_seed = seed0 + 100 * i + j + 7 * label
                im = render_array(c, s, seed=pose_seed, size=size, instance=ins)
                if degraded:
                    im = degrade(im, pose_seed)
                g = score_fn(im, c, s, inst, seed) if score_fn else identity_scores(im, c, s, inst, seed, refs)[1]
                rows.append((c, s, label, float(g)))

    def by(key: int) -> dict[str, float]:
        groups: dict[str, list] = {}
        for r in rows:
            groups.setdefault(r[key], []).append(r)
        return {k: round(auc([r[2] for r in v], [r[3] for r in v]), 3) for k, v in groups.items()}

    return {"auc": round(auc([r[2] for r in rows], [r[3] for r in rows]), 3), "per_style": by(1),
            "per_content": by(0), "pairs": len(rows) // 2, "rows": rows}


def identity_auc_report(draws: int = 5, size: int = SIZE, degraded: bool = False, measure: str = "v4",
                        styles: Sequence[str] = STYLES) -> dict:
    """:func:`identity_auc` over ``draws`` independent draws (:func:`identity_draw` 0 .. draws - 1; draw d
    renders its samples with ``seed0 = 77 000 + 10 000 d``): per draw the AUC, per content and per style;
    pooled per content and per style; and the milliseconds per scored image (render included).
    ``measure``: ``v4`` (the bench's) or ``v3`` (the previous one, with its plain difference as gain)."""
    import time

    if measure not in ("v3", "v4"):
        raise ValueError(f"measure {measure!r}; expected v3 or v4")
    score_fn = None
    if measure == "v3":
        def score_fn(im, c, s, inst, seed):  # noqa: E306
            return identity_scores_v3(im, c, s, inst, seed)[1]
    per_draw, rows = [], []
    for d in range(draws):
        t0 = time.perf_counter()
        rep = identity_auc(identity_draw(d), styles, seed0=77_000 + 10_000 * d, score_fn=score_fn, size=size,
                           degraded=degraded)
        ms = (time.perf_counter() - t0) * 1000 / (2 * rep["pairs"])
        rows += rep.pop("rows")
        per_draw.append({"draw": d, **rep, "ms_per_image": round(ms, 1)})

    def pooled(key: int) -> dict[str, float]:
        groups: dict[str, list] = {}
        for r in rows:
            groups.setdefault(r[key], []).append(r)
        return {k: round(auc([r[2] for r in v], [r[3] for r in v]), 3) for k, v in groups.items()}

    aucs = [d["auc"] for d in per_draw]
    return {"measure": measure, "size": size, "degraded": degraded, "draws": per_draw, "min_auc": min(aucs),
            "mean_auc": round(float(np.mean(aucs)), 3), "per_content": pooled(0), "per_style": pooled(1),
            "min_per_content": {c: min(d["per_content"][c] for d in per_draw) for c in per_draw[0]["per_content"]}}
