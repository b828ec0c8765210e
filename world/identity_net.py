"""Instance identity v4: a small CNN that embeds an object's *instance*, trained on generator renders.

The silhouette measure (:mod:`cstoolkit.world.identity`, v3) compares shapes pixel by pixel and loses
when two instances differ by less than a 64 px silhouette's pose error. This net learns what stays
fixed for one instance across styles and poses, and what differs between instances of one class:

* input (:func:`canonical_batch`): the image minus its ground colour (the border's median) and its
  foreground mask, both moved to the foreground's centroid and scaled to a fixed RMS radius
  (translation and size removed; the generator's ±15° rotation is left to the net), ``NET_SIZE`` px;
* training (:func:`train_identity_net`): batches of ``contents_per_batch`` contents x
  ``instances_per_content`` instances x ``views`` renders, each view in a random style (all 13) and
  pose; supervised contrastive loss over instance ids (other instances of the same content are the hard
  negatives); style invariance from the content oracle's ``augment`` and ``decolour``. Training
  instances are ids ``TRAIN_INSTANCE0`` and up, disjoint from every instance the bench or the tests draw;
* scoring (:func:`net_identity_scores`): cosine between the sample's embedding and the embeddings of
  the instance's references (the generator's renders in the asked style, ``REFERENCE_POSES`` poses),
  the gain subtracts the mean cosine with ``OTHER_INSTANCES`` other instances, as v3 does.

Not shipped: ten minutes of CPU training gave AUC 0.63-0.76 (v3: 0.85-0.90; docs/world.md, "Identity
net"), so the bench keeps v3. :func:`save_identity_net` writes fp16 ``identity.safetensors`` +
``identity.json`` (``cstoolkit world train-identity --out DIR``); :func:`load_identity_net` reads them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cstoolkit.errors import UserError

from .generator import ALL_CONTENTS, ALL_STYLES, render_array
from .identity import OTHER_INSTANCES, REFERENCE_POSES, SIZE

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
NET_SIZE = 48  # side of the canonical input
_RADIUS = 0.25  # canonical foregrounds' RMS radius, a share of the net's input side
_THRESHOLD = 0.2  # foreground: max channel difference to the ground colour (as identity.foreground)
#: first instance id used for training (the bench draws 5000+, the tests and docs below 200 000)
TRAIN_INSTANCE0 = 1_000_000


def canonical_batch(x: torch.Tensor, size: int = NET_SIZE) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] (or decoloured, in [-1, 1]) as the net's input (B, 4, size, size):
    the difference to the ground colour and the closed foreground mask, centred on the
    foreground's centroid and scaled to an RMS radius of ``_RADIUS`` of the frame."""
    if x.shape[-1] != SIZE or x.shape[-2] != SIZE:
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    b = x.shape[0]
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], -1)  # (B, 3, 4 SIZE)
    ground = border.median(-1).values[:, :, None, None]
    diff = x - ground
    fg = (diff.abs().amax(1, keepdim=True) > _THRESHOLD).float()
    fg = -F.max_pool2d(-F.max_pool2d(fg, 3, 1, 1), 3, 1, 1)  # closing, as identity.foreground
    area = fg.sum((1, 2, 3))
    ys, xs = torch.meshgrid(torch.arange(SIZE, dtype=x.dtype), torch.arange(SIZE, dtype=x.dtype), indexing="ij")
    safe = area.clamp(min=1)
    cx = (fg[:, 0] * xs).sum((1, 2)) / safe
    cy = (fg[:, 0] * ys).sum((1, 2)) / safe
    # input pixels per output pixel, so that the foreground's RMS radius is _RADIUS of the NET_SIZE frame
    # (a radius, not an area: an outline or neon band covers less area than a filled shape, not less radius)
    r2 = (fg[:, 0] * ((xs - cx[:, None, None]) ** 2 + (ys - cy[:, None, None]) ** 2)).sum((1, 2)) / safe
    step = torch.where(area >= 1, r2.clamp(min=1).sqrt() / (_RADIUS * size), torch.ones_like(area))
    cxn = torch.where(area >= 1, (cx + 0.5) / SIZE * 2 - 1, torch.zeros_like(cx))
    cyn = torch.where(area >= 1, (cy + 0.5) / SIZE * 2 - 1, torch.zeros_like(cy))
    k = step * size / SIZE  # normalised input span per normalised output span
    theta = torch.zeros(b, 2, 3, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = k, k, cxn, cyn
    grid = F.affine_grid(theta, [b, 4, size, size], align_corners=False)
    return F.grid_sample(torch.cat([diff, fg], 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class IdentityNet(nn.Module):
    """Canonical input (B, 4, ``size``, ``size``) -> unit embedding (B, ``dim``)."""

    def __init__(self, width: int = 16, dim: int = 64, size: int = NET_SIZE) -> None:
        super().__init__()
        w = width

        def conv(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

        self.features = nn.Sequential(
            *conv(4, w), nn.MaxPool2d(2),                                   # 24
            *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),          # 12
            *conv(2 * w, 4 * w), *conv(4 * w, 4 * w), nn.MaxPool2d(2),      # 6
            *conv(4 * w, 4 * w), nn.MaxPool2d(2),                           # 3
        )
        flat = 4 * w * (size // 16) ** 2
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, 8 * w), nn.ReLU(), nn.Linear(8 * w, dim))
        self.width, self.dim, self.size = width, dim, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.features(x)), dim=-1)


@dataclass
class IdentityTrainConfig:
    """Training of :class:`IdentityNet` (the shipped net: these defaults)."""

    seconds: float = 540.0  # wall-clock budget of the training loop (CPU)
    max_steps: int = 100_000
    contents_per_batch: int = 3
    instances_per_content: int = 16
    views: int = 2
    lr: float = 2e-3
    temperature: float = 0.1
    threads: int = 2
    width: int = 16
    dim: int = 64
    size: int = NET_SIZE
    augment: bool = True  # the content oracle's ``augment`` (shift, flip, resampling, blur, noise) before ``decolour``
    seed: int = 0


def _to_tensor(images: Sequence) -> torch.Tensor:
    """PIL images or float arrays (H, W, 3) in [0, 1] as (B, 3, SIZE, SIZE) float32."""
    from .identity import _as_array

    return torch.from_numpy(np.stack([_as_array(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss: each view's other views of the same label against all other views."""
    sim = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool)
    sim = sim.masked_fill(eye, -1e9)
    pos = (labels[:, None] == labels[None]) & ~eye
    logp = sim - sim.logsumexp(1, keepdim=True)
    return -(logp * pos).sum(1).div(pos.sum(1).clamp(min=1)).mean()


def train_identity_net(cfg: IdentityTrainConfig | None = None, log=print) -> tuple[IdentityNet, dict]:
    """Train :class:`IdentityNet` on fresh renders for ``cfg.seconds`` (or ``cfg.max_steps``).

    Returns the net (eval mode) and a small report (steps, seconds, last losses)."""
    from .oracle import augment, decolour

    cfg = cfg if cfg is not None else IdentityTrainConfig()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = IdentityNet(cfg.width, cfg.dim, cfg.size)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    t0, step, losses = time.time(), 0, []
    next_id = TRAIN_INSTANCE0
    while step < cfg.max_steps and time.time() - t0 < cfg.seconds:
        ims, labels = [], []
        for c in rng.choice(len(ALL_CONTENTS), cfg.contents_per_batch, replace=False):
            for _ in range(cfg.instances_per_content):
                inst, next_id = next_id, next_id + 1
                for _v in range(cfg.views):
                    s = ALL_STYLES[rng.integers(len(ALL_STYLES))]
                    ims.append(render_array(ALL_CONTENTS[c], s, seed=int(rng.integers(1 << 30)), size=SIZE,
                                            instance=inst))
                    labels.append(inst)
        x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).contiguous()
        x = decolour(augment(x, g) if cfg.augment else x, g)
        z = net(canonical_batch(x, net.size))
        loss = supcon_loss(z, torch.tensor(labels), cfg.temperature)
        # cosine decay over the time budget
        frac = min(1.0, (time.time() - t0) / cfg.seconds)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 50 == 0:
            log(f"step {step} loss {np.mean(losses[-50:]):.3f} ({time.time() - t0:.0f} s)")
    net.eval()
    return net, {"steps": step, "train_seconds": round(time.time() - t0, 1), "images": step * len(labels),
                 "final_loss": round(float(np.mean(losses[-50:])), 4) if losses else None,
                 "config": asdict(cfg)}


_CACHE: dict[str, IdentityNet] = {}


def save_identity_net(net: IdentityNet, out_dir: str | Path, report: dict) -> None:
    """Write ``identity.safetensors`` (fp16) and ``identity.json`` (the report) into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in net.state_dict().items()}
    tmp = out / "identity.safetensors.tmp"
    save_file(state, str(tmp), metadata={"width": str(net.width), "dim": str(net.dim), "size": str(net.size)})
    tmp.replace(out / "identity.safetensors")  # nothing half written
    tmp = out / "identity.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out / "identity.json")


def load_identity_net(weights_dir: str | Path | None = None) -> IdentityNet:
    """``weights_dir``'s (default: world/weights, where none is shipped) :class:`IdentityNet`, fp32, eval mode,
    cached."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    f = (Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR) / "identity.safetensors"
    key = str(f.resolve())
    if key not in _CACHE:
        if not f.is_file():
            raise UserError("identity", f"no weights at {f}",
                            "expected identity.safetensors from cstoolkit world train-identity --out DIR")
        with safe_open(str(f), "pt") as h:
            meta = h.metadata() or {}
        net = IdentityNet(int(meta.get("width", 16)), int(meta.get("dim", 64)), int(meta.get("size", 48)))
        net.load_state_dict({k: v.float() for k, v in load_file(str(f)).items()})
        _CACHE[key] = net.eval()
    return _CACHE[key]


@torch.no_grad()
def embed(images: Sequence, net: IdentityNet | None = None) -> torch.Tensor:
    """Unit embeddings (N, dim) of images (PIL or float arrays in [0, 1])."""
    net = net if net is not None else load_identity_net()
    return net(canonical_batch(_to_tensor(images), net.size))


def reference_embeddings(content: str, style: str, instances: Sequence[int], seed: int,
                         net: IdentityNet | None = None, poses: int = REFERENCE_POSES) -> torch.Tensor:
    """Embeddings (len(instances), poses, dim) of the generator's renders of each instance in ``style``
    (64 px, pose seeds ``seed + 313 k``, as :func:`cstoolkit.world.identity.reference_silhouettes`)."""
    ims = [render_array(content, style, seed=seed + 313 * k, size=SIZE, instance=i)
           for i in instances for k in range(poses)]
    return embed(ims, net).view(len(instances), poses, -1)


def net_identity_scores(image, content: str, style: str, instance: int, seed: int,
                        references: torch.Tensor | None = None, net: IdentityNet | None = None) -> tuple[float, float]:
    """``(identity, identity_gain)`` by the net: the mean cosine between the image's embedding and the
    own instance's references, and that minus the mean cosine with ``OTHER_INSTANCES`` other instances."""
    refs = references if references is not None else reference_embeddings(
        content, style, range(instance, instance + OTHER_INSTANCES + 1), seed, net)
    z = embed([image], net)[0]
    cos = (refs @ z).mean(1)
    return float(cos[0]), float(cos[0] - cos[1:].mean())
