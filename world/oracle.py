"""Oracle classifiers of the world: a content CNN and a style CNN (small, 64 px input).

Trained on renders of the training pairs only (``train_pairs()``), with augmentations that mimic
imperfect generated images (blur, noise, colour gain, down/up-sampling, small shifts), and evaluated on
renders of the held-out pairs. Each head is also checked for invariance to the other factor: the
content head's accuracy per style and the style head's accuracy per content, over all 100 pairs.

Shipped as fp16 safetensors in ``world/weights/oracle.safetensors`` with its measured report in
``oracle.json``; :func:`load_oracle` builds the model from them.
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
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cstoolkit.errors import UserError

from .generator import CONTENTS, HELD_OUT, STYLES, render_array, train_pairs

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
INPUT_SIZE = 64


class OracleNet(nn.Module):
    """A small CNN: 4 conv blocks (stride 2, 2, 2, 1) -> global mean+max pool -> linear.

    ``features`` is the pooled vector (2 * width[-1]); the content net's features define the bench's
    identity score.
    """

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64, 64)):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.body = nn.Sequential(
            nn.Conv2d(3, w0, 5, stride=2, padding=2), nn.BatchNorm2d(w0), nn.ReLU(inplace=True),  # (B, w0, 32, 32)
            nn.Conv2d(w0, w1, 3, stride=2, padding=1), nn.BatchNorm2d(w1), nn.ReLU(inplace=True),  # (B, w1, 16, 16)
            nn.Conv2d(w1, w2, 3, stride=2, padding=1), nn.BatchNorm2d(w2), nn.ReLU(inplace=True),  # (B, w2, 8, 8)
            nn.Conv2d(w2, w3, 3, stride=1, padding=1), nn.BatchNorm2d(w3), nn.ReLU(inplace=True),  # (B, w3, 8, 8)
        )
        self.head = nn.Linear(2 * w3, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 64, 64) in [-1, 1] -> (B, 2 * w3) pooled features."""
        h = self.body(x)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class WorldOracle(nn.Module):
    """Content and style oracles. Inputs: PIL images, or a tensor (B, 3, H, W) in [-1, 1] (any H, W)."""

    def __init__(self):
        super().__init__()
        self.content = OracleNet(len(CONTENTS))
        self.style = OracleNet(len(STYLES))

    @staticmethod
    def preprocess(images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """PIL images or a [-1, 1] tensor -> float32 (B, 3, 64, 64) in [-1, 1] (bilinear, antialiased)."""
        if isinstance(images, torch.Tensor):
            x = images.float()
            if x.dim() == 3:
                x = x[None]
        else:
            arrs = []
            for im in images:
                im = im.convert("RGB")
                if im.size != (INPUT_SIZE, INPUT_SIZE):
                    im = im.resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR, reducing_gap=None)
                arrs.append(np.asarray(im, np.float32) / 127.5 - 1)
            x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2) if arrs else torch.zeros(0, 3, 64, 64)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Softmax probabilities and content features: ``content_probs`` (B, 10), ``style_probs``
        (B, 10), ``content_features`` (B, F)."""
        x = self.preprocess(images)
        dev = next(self.parameters()).device
        out: dict[str, list[torch.Tensor]] = {"content_probs": [], "style_probs": [], "content_features": []}
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(dev)
            f = self.content.features(xb)
            out["content_probs"].append(self.content.head(f).softmax(-1).cpu())
            out["content_features"].append(f.cpu())
            out["style_probs"].append(self.style(xb).softmax(-1).cpu())
        return {k: torch.cat(v) if v else torch.zeros(0) for k, v in out.items()}

    def classify(self, images: Sequence[Image.Image] | torch.Tensor) -> list[dict]:
        """One dict per image: ``content``, ``content_prob``, ``style``, ``style_prob`` (names as in recipes)."""
        p = self.predict(images)
        res = []
        for cp, sp in zip(p["content_probs"], p["style_probs"]):
            ci, si = int(cp.argmax()), int(sp.argmax())
            res.append({"content": CONTENTS[ci], "content_prob": round(float(cp[ci]), 4),
                        "style": STYLES[si], "style_prob": round(float(sp[si]), 4)})
        return res


_CACHE: dict[str, WorldOracle] = {}


def load_oracle(weights_dir: str | Path | None = None, device: str | torch.device = "cpu") -> WorldOracle:
    """Build the oracles from ``oracle.safetensors`` (default: the shipped weights), in eval mode, fp32."""
    from safetensors.torch import load_file

    d = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    key = f"{d.resolve()}|{device}"
    if key in _CACHE:
        return _CACHE[key]
    f = d / "oracle.safetensors"
    if not f.is_file():
        raise UserError("oracle", f"no weights at {f}", "expected the shipped world/weights/oracle.safetensors "
                        "(or train them: cstoolkit world train-oracle)")
    model = WorldOracle()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in load_file(str(f)).items()}, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise UserError("oracle", f"{f} does not match the oracle architecture",
                        "expected weights written by cstoolkit world train-oracle")
    model.eval().to(device)
    _CACHE[key] = model
    return model


def classify(images: Sequence[Image.Image] | torch.Tensor) -> list[dict]:
    """Classify images with the shipped oracles (see :meth:`WorldOracle.classify`)."""
    return load_oracle().classify(images)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
@dataclass
class OracleTrainConfig:
    """Training of the oracles (CPU-sized: a few minutes on one core)."""

    steps: int = 1200
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    pool_per_pair: int = 60  # pre-rendered images per training pair (re-augmented every step)
    eval_per_pair: int = 20  # renders per pair for evaluation (fresh seeds)
    seed: int = 0


def _render_pool(pairs: Sequence[tuple[str, str]], per_pair: int, seed0: int,
                 sizes: Sequence[int] = (64, 64, 96, 128)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render ``per_pair`` images of each pair at mixed sizes, resized to 64 px: (x, content ids, style ids)."""
    from tqdm import tqdm

    xs, cs, ss = [], [], []
    for k, (c, s) in enumerate(tqdm(pairs, desc="render", leave=False)):
        for j in range(per_pair):
            seed = seed0 + k * 100_003 + j
            size = sizes[j % len(sizes)]
            a = render_array(c, s, seed=seed, size=size)
            if size != INPUT_SIZE:
                a = np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize((INPUT_SIZE, INPUT_SIZE),
                               Image.BILINEAR, reducing_gap=None), np.float32) / 255
            xs.append(a)
            cs.append(CONTENTS.index(c))
            ss.append(STYLES.index(s))
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).mul(2).sub(1).contiguous()
    return x, torch.tensor(cs), torch.tensor(ss)


def decolour(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Content-only augmentation: random channel order, grayscale, inversion (the palette belongs to
    the style, so the content head must not lean on it)."""
    b = x.shape[0]
    perm = torch.stack([torch.randperm(3, generator=g) for _ in range(b)])  # (B, 3)
    x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    gray = x.mean(1, keepdim=True).expand_as(x)
    x = torch.where((torch.rand(b, generator=g) < 0.3)[:, None, None, None], gray, x)
    return torch.where((torch.rand(b, generator=g) < 0.3)[:, None, None, None], -x, x)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Imperfections of generated images: shift, down/up-sampling, blur, colour gain/offset, noise."""
    b = x.shape[0]
    r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    # random shift up to 4 px (reflect) and horizontal flip
    pad = 4
    xp = F.pad(x, (pad,) * 4, mode="replicate")
    ox, oy = (r(2) * 2 * pad).long().tolist()
    x = xp[:, :, oy:oy + INPUT_SIZE, ox:ox + INPUT_SIZE]
    flip = r(b) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    # down/up-sampling for half the batch
    lo = int(16 + r(1).item() * 40)
    small = F.interpolate(x, size=(lo, lo), mode="bilinear", antialias=True, align_corners=False)
    small = F.interpolate(small, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    x = torch.where((r(b) < 0.3)[:, None, None, None], small, x)
    # gaussian blur sigma in [0, 1.2] for half the batch
    sigma = 0.3 + r(1).item() * 0.9
    k = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-k**2 / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, 7).repeat(3, 1, 1, 1)
    bl = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k, groups=3)
    bl = F.conv2d(F.pad(bl, (0, 0, 3, 3), mode="replicate"), k.transpose(2, 3), groups=3)
    x = torch.where((r(b) < 0.5)[:, None, None, None], bl, x)
    # colour: per-channel gain and offset, contrast
    gain = 1 + (r(b, 3, 1, 1) - 0.5) * 0.2
    off = (r(b, 3, 1, 1) - 0.5) * 0.16
    con = 1 + (r(b, 1, 1, 1) - 0.5) * 0.3
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * con + mean
    x = x * gain + off
    # noise
    std = r(b, 1, 1, 1) * 0.12
    x = x + torch.randn(x.shape, generator=g) * std
    return x.clamp(-1, 1)


@torch.no_grad()
def evaluate(model: WorldOracle, per_pair: int = 20, seed0: int = 10_000_000) -> dict:
    """Accuracy on held-out pairs, on all pairs per style (content head) and per content (style head),
    and the content head's consistency across styles for one object instance."""
    model.eval()
    all_pairs = [(c, s) for c in CONTENTS for s in STYLES]
    x, ci, si = _render_pool(all_pairs, per_pair, seed0, sizes=(64, 128))
    p = model.predict(x)
    cpred, spred = p["content_probs"].argmax(-1), p["style_probs"].argmax(-1)
    held = torch.tensor([(CONTENTS[int(a)], STYLES[int(b)]) in set(HELD_OUT) for a, b in zip(ci, si)])
    rep = {
        "held_out_content_acc": float((cpred == ci)[held].float().mean()),
        "held_out_style_acc": float((spred == si)[held].float().mean()),
        "all_content_acc": float((cpred == ci).float().mean()),
        "all_style_acc": float((spred == si).float().mean()),
        "content_acc_per_style": {s: float((cpred == ci)[si == j].float().mean()) for j, s in enumerate(STYLES)},
        "style_acc_per_content": {c: float((spred == si)[ci == j].float().mean()) for j, c in enumerate(CONTENTS)},
        "eval_images": len(x),
        "held_out_images": int(held.sum()),
    }
    # imperfect images: the held-out renders augmented as in training
    g = torch.Generator().manual_seed(seed0)
    pa = model.predict(augment(x[held], g))
    rep["held_out_augmented_content_acc"] = float((pa["content_probs"].argmax(-1) == ci[held]).float().mean())
    rep["held_out_augmented_style_acc"] = float((pa["style_probs"].argmax(-1) == si[held]).float().mean())
    # invariance: one object instance (same instance and pose seed) in all 10 styles -> one content answer
    agree = 0
    n_inst = 5
    for c in CONTENTS:
        for k in range(n_inst):
            arr = [render_array(c, s, seed=seed0 + 7 * k + 1, size=INPUT_SIZE) for s in STYLES]
            xx = torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2) * 2 - 1
            pr = model.predict(xx)["content_probs"].argmax(-1)
            agree += int((pr == CONTENTS.index(c)).all())
    rep["content_invariance"] = agree / (len(CONTENTS) * n_inst)
    return rep


def train_oracle(cfg: OracleTrainConfig | None = None, out_dir: str | Path | None = None) -> dict:
    """Train both oracles on the training pairs, evaluate, save fp16 safetensors + ``oracle.json``.

    Returns the report (accuracies, training time). ``out_dir`` defaults to the package's weights folder.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    from cstoolkit.io import atomic_write

    cfg = cfg or OracleTrainConfig()
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    x, ci, si = _render_pool(train_pairs(), cfg.pool_per_pair, cfg.seed * 1_000_000)
    t_render = time.time() - t0
    model = WorldOracle()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.15)
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    bar = tqdm(range(cfg.steps), desc="oracle", leave=False)
    for _ in bar:
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=g)
        xb = augment(x[idx], g)
        loss = F.cross_entropy(model.content(decolour(xb, g)), ci[idx]) + F.cross_entropy(model.style(xb), si[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    t_train = time.time() - t0 - t_render
    report = evaluate(model, cfg.eval_per_pair)
    report.update({"train_seconds": round(t_train, 1), "render_seconds": round(t_render, 1),
                   "torch_threads": torch.get_num_threads(), "config": asdict(cfg),
                   "train_images": len(x), "final_loss": round(float(loss.item()), 4)})
    out = Path(out_dir) if out_dir is not None else WEIGHTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    tmp = out / "oracle.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "oracle.safetensors")
    atomic_write(out / "oracle.json", lambda fh: fh.write(json.dumps(report, indent=2) + "\n"), mode="w")
    for f in ("oracle.safetensors", "oracle.json"):  # package data: readable by everyone
        (out / f).chmod(0o644)
    _CACHE.clear()
    if not math.isfinite(report["final_loss"]):  # pragma: no cover
        raise RuntimeError("oracle training diverged")
    return report
