"""`world train --keep-base W` (issue #17 item 5): a warm-started scale-wise generator keeps the loaded model's
behaviour on the base captions (W * KL(teacher || student) on those samples) while it learns the augmented ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cstoolkit.errors import UserError
from cstoolkit.world import generator as g
from cstoolkit.world.train import main, train
from cstoolkit.world.train.captions import caption_table, draw_captions
from cstoolkit.world.train.common import KeepBase, base_caption_indices, distill_kl, init_root

SHIPPED = {"switti": (init_root("shipped") / "switti" / "transformer").is_dir(),
           "infinity": (init_root("shipped") / "infinity" / "transformer.safetensors").is_file()}


def _cache(folder, n: int) -> str:
    """A training-image cache of ``n`` world images at 128 px (instead of the 90 of one per pair: the codes in a
    second)."""
    images, _, cids, sids = g.sample_batch(n, seed=0, size=128)
    path = folder / "cache.npz"
    np.savez(path, images=((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(),
             content=np.asarray(cids, dtype=np.int16), style=np.asarray(sids, dtype=np.int16))
    return str(path)


def test_keep_base_needs_a_warm_start_of_a_scalewise_backbone(tmp_path, capsys):
    """Without --init-from there is no teacher: one line naming the flag, before any image is rendered; so for SDXL
    (no such term) and for a negative weight."""
    out = tmp_path / "w"
    assert main(["switti", "--keep-base", "1", "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "world train --keep-base" in err and "needs --init-from" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    for argv in (["sdxl", "--keep-base", "1", "--init-from", "shipped"],
                 ["all", "--keep-base", "1", "--init-from", "shipped"],  # `all` holds sdxl
                 ["infinity", "--keep-base", "-1", "--init-from", "shipped"]):
        assert main([*argv, "--device", "cpu", "--out", str(out)]) == 2
        assert "--keep-base" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(UserError, match="needs --init-from"):
        train("infinity", out, minutes=0.01, device="cpu", keep_base=0.5)
    # a folder without this backbone's weights would train from scratch: no teacher either
    (tmp_path / "weights").mkdir()
    with pytest.raises(UserError, match="no switti weights"):
        train("switti", out, minutes=0.01, device="cpu", keep_base=0.5, init_from=str(tmp_path / "weights"),
              cache=_cache(tmp_path, 2))


def test_distill_kl_is_zero_for_the_teacher_itself_and_the_weighted_token_mean_of_the_kl():
    """Identical logits (the student at step 0 is the teacher): 0; otherwise the KL of the softmaxes, averaged over
    Infinity's bits, weighted over tokens like the CE loss."""
    torch.manual_seed(0)
    weights = torch.rand(5)
    for shape in ((3, 5, 7), (3, 5, 4, 2)):  # Switti (B, L, V), Infinity (B, L, bits, 2)
        a, b = torch.randn(shape), torch.randn(shape)
        assert torch.equal(distill_kl(a, a.clone(), weights), torch.zeros(3))
        kl = distill_kl(a, b, weights)  # KL(teacher b || student a)
        ref = F.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="none").sum(-1)
        ref = ref.flatten(2).mean(-1) if ref.dim() > 2 else ref
        assert kl.shape == (3,) and (kl > 0).all()
        torch.testing.assert_close(kl, (ref * weights).sum(-1))
    student = torch.randn(2, 5, 7, requires_grad=True)
    distill_kl(student, torch.randn(2, 5, 7), weights).sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_base_caption_mask_picks_exactly_the_base_captions():
    """The mask of the drawn captions is True exactly where the caption is index[key][0] of its sample's key (the
    empty caption included), whatever the draw."""
    captions, index = caption_table(seed=0)
    base = base_caption_indices(index)
    assert base.tolist() == sorted(rows[0] for rows in index.values()) and len(base) == len(index)
    keep = KeepBase(1.0, index, torch.device("cpu"))
    content = torch.arange(600) % len(g.CONTENTS)
    style = (torch.arange(600) // len(g.CONTENTS)) % len(g.STYLES)
    cap, empty = draw_captions(content, style, index, torch.Generator().manual_seed(3), augment=0.5)
    mask = keep.mask(cap)
    firsts = {rows[0] for rows in index.values()}
    assert mask.tolist() == [int(i) in firsts for i in cap]
    assert mask[empty].all() and 0.3 < float(mask.float().mean()) < 0.8  # empty captions count as base ones
    assert all(captions[int(i)] == "" or captions[int(i)].startswith("a") for i in cap[mask])
    assert not keep.mask(torch.tensor([rows[1] for rows in index.values() if len(rows) > 1])).any()


@pytest.mark.parametrize("backbone", [
    pytest.param("switti", marks=pytest.mark.skipif(not SHIPPED["switti"], reason="world/weights/switti/ not shipped")),
    pytest.param("infinity", marks=pytest.mark.skipif(not SHIPPED["infinity"],
                                                      reason="world/weights/infinity/ not shipped"))])
def test_warm_started_run_with_keep_base_trains_and_keeps_its_teacher_frozen(backbone, tmp_path, monkeypatch,
                                                                            single_thread):
    """A short `world train BACKBONE --init-from shipped --keep-base 1`: the student moves, the frozen teacher (a copy
    of the loaded transformer; Infinity: and of its T5, which trains) does not, the KL starts at 0, weights and
    record are written (evaluation skipped)."""
    import importlib
    import json

    copies: list[tuple[torch.nn.Module, torch.nn.Module, dict[str, torch.Tensor]]] = []
    frozen = KeepBase.frozen

    def spy(module: torch.nn.Module) -> torch.nn.Module:
        copy = frozen(module)
        copies.append((module, copy, {k: v.clone() for k, v in module.state_dict().items()}))
        return copy

    monkeypatch.setattr(KeepBase, "frozen", staticmethod(spy))
    trainer = importlib.import_module(f"cstoolkit.world.train.{backbone}")
    monkeypatch.setattr(trainer, "evaluate_cfg_scales", lambda *a, **k: {})  # sampling: minutes on the CPU
    record = train(backbone, tmp_path / "out", minutes=1e-4, device="cpu", init_from="shipped", keep_base=1.0,
                   cache=_cache(tmp_path, 4), batch=2, lr=1e-2, warmup_steps=1, caption_repeats=(), log_every_s=0)
    assert len(copies) == (2 if backbone == "infinity" else 1)  # Infinity: the transformer and the trained T5
    assert record["transformer"]["steps"] >= 1 and record["captions"]["keep_base"] == 1.0
    assert record["config"]["keep_base"] == 1.0
    kept = record["transformer"]["keep_base"]
    assert kept["weight"] == 1.0 and kept["steps"] >= 1 and abs(kept["kl_first50"]) < 1e-4
    for student, teacher, start in copies:
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        assert all(torch.equal(v, start[k]) for k, v in teacher.state_dict().items())  # frozen
        assert any(not torch.equal(v, start[k]) for k, v in student.state_dict().items())  # trained
    folder = tmp_path / "out" / backbone
    assert (folder / ("transformer/model.safetensors" if backbone == "switti" else "transformer.safetensors")).is_file()
    assert json.loads((folder / "world.json").read_text())["captions"]["keep_base"] == 1.0
    assert " kl " in (folder / "train.log").read_text()
