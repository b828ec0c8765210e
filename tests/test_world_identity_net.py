"""The instance-embedding net of world/identity_net.py: its pose-free input and its training command.

The net is not shipped (its measured AUCs stay below the silhouette measure's; docs/world.md,
"Identity net"), so these tests check the machinery a next attempt builds on, not a score."""

from __future__ import annotations

import json

import numpy as np
import torch

from cstoolkit.cli import main
from cstoolkit.world.generator import render_array
from cstoolkit.world.identity_net import canonical_batch, load_identity_net, net_identity_scores


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.minimum(a, b).sum() / torch.maximum(a, b).sum())


def test_canonical_input_ignores_position_size_and_palette():
    """The same object moved, shrunk and recoloured gives (nearly) the same canonical foreground."""
    big = render_array("house", "striped", seed=3, size=64, instance=11)
    ground = big[0, 0]
    small = np.empty_like(big)
    small[:] = ground
    half = render_array("house", "striped", seed=3, size=48, instance=11)
    small[10:58, 4:52] = half  # 3/4 size, shifted
    recoloured = big[:, :, ::-1].copy()  # channels swapped: another palette
    x = torch.from_numpy(np.stack([big, small, recoloured])).permute(0, 3, 1, 2).contiguous()
    fg = canonical_batch(x)[:, 3]
    assert fg[0].sum() > 100
    assert _iou(fg[0], fg[1]) > 0.8, _iou(fg[0], fg[1])
    assert _iou(fg[0], fg[2]) > 0.99
    # another instance of the class is a different shape
    other = render_array("house", "striped", seed=3, size=64, instance=12)
    fo = canonical_batch(torch.from_numpy(other[None]).permute(0, 3, 1, 2).contiguous())[0, 3]
    assert _iou(fg[0], fo) < _iou(fg[0], fg[1])


def test_cli_train_identity_writes_a_loadable_net(tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["world", "train-identity", "--seconds", "0.5", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] >= 1 and report["images"] >= 96
    assert json.loads((out / "identity.json").read_text())["steps"] == report["steps"]
    assert not list(out.glob("*.tmp"))
    net = load_identity_net(out)
    ident, gain = net_identity_scores(render_array("star", "neon", seed=5, size=64, instance=7), "star", "neon", 7, 5,
                                      net=net)
    assert -1 <= ident <= 1 and -2 <= gain <= 2


def test_cli_train_identity_bad_seconds_is_one_line(tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["world", "train-identity", "--seconds", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seconds" in err[0] and not out.exists()
