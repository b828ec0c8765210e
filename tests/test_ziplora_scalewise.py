"""ZipLoRA on the scale-wise backbones (issue 20): the merge stage on teacher-forcing logits, the saved
decomposition (PEFT layout, zipped pair, mergers), LoRAs taken from another run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT, fit_on, logits_with_lora, random_targets

from cstoolkit.backbone import ScaleWiseBackbone
from cstoolkit.backbones.infinity import InfinityBackbone
from cstoolkit.decomposition import Decomposition
from cstoolkit.lora import LoRASet
from cstoolkit.methods._scalewise_lora import PEFT_PREFIX, LoRAGenerateConfig, adapter_file, sample_scalewise
from cstoolkit.methods.ziplora import (
    MERGERS_FILE,
    ZIPPED_PEFT,
    ScaleWiseZipLoRATrainer,
    ZipLoRAConfig,
    flat_logits,
    logits_distance,
)

EX = ROOT / "examples"
RUNTIME = {"progress": False, "device": "cpu", "seed": 0}


@pytest.fixture(scope="module")
def tiny(tiny_scalewise) -> ScaleWiseBackbone:
    return tiny_scalewise


def _random_lora(backbone: ScaleWiseBackbone, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """A PEFT-layout LoRA with A and B both random (so it changes the logits)."""
    loras = LoRASet(backbone.lora_model(), backbone.adapter_targets(), rank, ("x",), init="gaussian", init_std=0.05,
                    generator=torch.Generator().manual_seed(seed), prefix=PEFT_PREFIX)
    return loras.export("x")


def test_logits_distance():
    z = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    assert logits_distance(z, z, "kl").abs() < 1e-6 and logits_distance(z, z, "mse") == 0
    assert logits_distance(z + 3.0, z, "kl").abs() < 1e-5  # softmax ignores a shift of the logits ...
    assert logits_distance(z + 3.0, z, "mse") == pytest.approx(9.0)  # ... the squared distance does not
    assert logits_distance(2 * z, z, "kl") > 1e-3


@pytest.mark.parametrize("distance", ["kl", "mse"])
def test_merge_stage_trains_mergers_only(tiny, distance):
    """Targets are each LoRA alone on its own image and prompt; at m = 1 the merged model is both LoRAs added;
    steps move the mergers (and the loss) while the LoRAs stay exactly as given."""
    loras = {"content": _random_lora(tiny, 1), "style": _random_lora(tiny, 2)}
    targets = {"content": [random_targets(tiny, 3)], "style": [random_targets(tiny, 4)]}
    with torch.no_grad():
        texts = {"content": tiny.encode_text(["A sks star"]), "style": tiny.encode_text(["A tree in mosaic style"])}
    alone = {role: flat_logits(logits_with_lora(tiny, loras[role], texts[role], targets[role][0])) for role in loras}
    cfg = ZipLoRAConfig(steps=3, lr=5e-2, distance=distance)
    trainer = ScaleWiseZipLoRATrainer(tiny, cfg, loras, targets, texts, merge=False)
    try:
        for role in ("content", "style"):
            assert torch.allclose(trainer.reference[role][0], alone[role], atol=1e-5)
        with torch.no_grad():  # m = 1: ΔW_c + ΔW_s
            both = trainer.merged_logits("content", 0)
        assert not torch.allclose(both, trainer.reference["content"][0], atol=1e-4)
        frozen = {k: (b.lora_A.detach().clone(), b.lora_B.detach().clone()) for k, b in trainer.loras.banks.items()}
        mergers = {k: m.detach().clone() for k, m in trainer.mergers.items()}
        logs = [trainer.step(i) for i in range(3)]
        for k, bank in trainer.loras.banks.items():
            assert bank.lora_A.grad is None and bank.lora_B.grad is None
            assert torch.equal(bank.lora_A, frozen[k][0]) and torch.equal(bank.lora_B, frozen[k][1])
        assert all(not torch.equal(m, mergers[k]) for k, m in trainer.mergers.items())
        assert all(torch.isfinite(torch.tensor(list(log.values()))).all() for log in logs)
        assert logs[-1]["similarity"] < logs[0]["similarity"]
        assert logs[-1]["loss_content"] + logs[-1]["loss_style"] < logs[0]["loss_content"] + logs[0]["loss_style"]
    finally:
        trainer.loras.remove()


def _recipe(backbone: str, out, **extra):
    inputs = {"content_images": [str(EX / "world_star_neon.png")], "content": "star",
              "style_images": [str(EX / "world_tree_mosaic.png")], "style": "mosaic", "style_subject": "tree"}
    inputs.update(extra.pop("inputs", {}))
    params = {"steps": 2, "lora_rank": 4, "lora_lr": 1e-3, "lora_steps": 2, "lr": 5e-2, **extra}
    return {"method": "ziplora", "backbone": {"name": backbone, "preset": "tiny"}, "inputs": inputs,
            "params": params, "runtime": {"output_dir": str(out), **RUNTIME}}


def test_saved_decomposition_reloads_and_generates(tiny, tmp_path):
    name = "infinity" if isinstance(tiny, InfinityBackbone) else "switti"
    dec = fit_on(_recipe(name, tmp_path / "run"), tiny)
    files = dec.files
    assert dec.meta["layout"] == "peft" and dec.meta["sources"] == {"content": "trained", "style": "trained"}
    for role in ("content", "style"):
        raw, zipped = files[adapter_file(role)], files[ZIPPED_PEFT[role]]
        assert set(raw) == set(zipped) and all(k.startswith(PEFT_PREFIX + ".") for k in raw)
        mergers = files[MERGERS_FILE]
        for key, b in raw.items():
            if key.endswith("lora_B.weight"):
                m = mergers[key.replace(".lora_B.weight", f".merger_{role}")]
                assert torch.equal(zipped[key], b * m.unsqueeze(-1))
            else:
                assert torch.equal(zipped[key], b)
    assert any(not torch.all(m == 1) for m in files[MERGERS_FILE].values())  # the mergers moved
    dec.save(tmp_path / "dec")
    assert (tmp_path / "dec" / "zipped" / "content" / "adapter_config.json").is_file()
    loaded = Decomposition.load(tmp_path / "dec")
    method = dec.method_impl
    options = LoRAGenerateConfig()
    for use, prompt in (("content", "a <c>"), ("style", "a fish in <s> style"), ("both", "a <c> in <s> style")):
        images = method.generate(tiny, loaded, [prompt], use, num_images=1, seed=1, options=options, progress=False)
        assert len(images) == 1 and len(images[0]) == 1 and min(images[0][0].size) >= 16
    # "both" (the zipped pair) is the raw LoRAs gated column by column by their mergers
    both = method.generate(tiny, loaded, ["a <c> in <s> style"], "both", num_images=1, seed=1, options=options,
                           progress=False)[0][0]
    per_role: dict[str, dict[str, torch.Tensor]] = {"content": {}, "style": {}}
    for key, m in loaded.files[MERGERS_FILE].items():
        layer, _, role = key.rpartition(".merger_")
        per_role[role][layer[len(PEFT_PREFIX) + 1:]] = m
    gated = sample_scalewise(tiny, {r: loaded.files[adapter_file(r)] for r in per_role}, ["a <c> in <s> style"],
                             loaded.placeholders, num_images=1, seed=1, options=options, progress=False,
                             scale_gates=lambda scale: per_role)[0][0]
    plain = sample_scalewise(tiny, {r: loaded.files[adapter_file(r)] for r in per_role}, ["a <c> in <s> style"],
                             loaded.placeholders, num_images=1, seed=1, options=options, progress=False)[0][0]
    assert np.array_equal(np.asarray(both), np.asarray(gated))
    assert not np.array_equal(np.asarray(both), np.asarray(plain))  # the mergers do change the samples


def test_merges_loras_of_another_scalewise_run(tiny, tmp_path):
    """inputs.content_lora / style_lora: a DreamBooth-LoRA decomposition on the same backbone (its PEFT files);
    nothing is trained again, the trigger words and prompts come along."""
    name = "infinity" if isinstance(tiny, InfinityBackbone) else "switti"
    db = fit_on({"method": "dreambooth_lora", "backbone": {"name": name, "preset": "tiny"},
                 "inputs": {"content_images": [str(EX / "world_star_neon.png")], "content": "star",
                            "style": "neon"},
                 "params": {"rank": 4, "lr": 1e-3, "steps": 1},
                 "runtime": {"output_dir": str(tmp_path / "db"), **RUNTIME}}, tiny)
    db.save(tmp_path / "db" / "decomposition")
    dec = fit_on(_recipe(name, tmp_path / "run", inputs={"content_lora": str(tmp_path / "db"), "content": "",
                                                         "style_lora": str(tmp_path / "db"), "style": ""}), tiny)
    assert dec.meta["sources"] == {"content": str(tmp_path / "db" / "decomposition")} | {
        "style": str(tmp_path / "db" / "decomposition")}
    assert dec.placeholders == {"<c>": "sks star", "<s>": "neon"}
    assert dec.meta["training_prompts"] == db.meta["training_prompts"]
    for role in ("content", "style"):
        given = db.files[adapter_file(role)]
        assert all(torch.equal(dec.files[adapter_file(role)][k], given[k].float()) for k in given)


def test_unsupported_pair_still_errors():
    from cstoolkit.errors import UserError
    from cstoolkit.recipe import parse_recipe

    with pytest.raises(UserError) as err:
        parse_recipe({"method": "b_lora", "backbone": {"name": "infinity", "preset": "tiny"}})
    assert "does not run on 'infinity'" in str(err.value) and "sdxl" in str(err.value)


class _Interrupt(Exception):
    pass


def test_resume_mid_merge_is_bit_identical(tiny, tmp_path, monkeypatch):
    """Stopped in the merge stage (checkpoint every step), resumed: the same files as an uninterrupted run."""
    from cstoolkit.runtime import TrainLoop

    name = "infinity" if isinstance(tiny, InfinityBackbone) else "switti"
    data = _recipe(name, tmp_path / "full", steps=3)
    data["runtime"]["checkpoint_every"] = 1
    full = fit_on(data, tiny)
    original, seen = TrainLoop.__iter__, {"n": 0, "stop": 6}  # 2 + 2 LoRA steps, then 2 of 3 merge steps

    def counted(self):
        for step in original(self):
            if seen["stop"] is not None and seen["n"] >= seen["stop"]:
                raise _Interrupt
            seen["n"] += 1
            yield step

    monkeypatch.setattr(TrainLoop, "__iter__", counted)
    data["runtime"]["output_dir"] = str(tmp_path / "cut")
    with pytest.raises(_Interrupt):
        fit_on(data, tiny)
    seen.update(n=0, stop=None)
    resumed = fit_on(data, tiny, resume=True)
    assert seen["n"] == 1  # only the last merge step ran again
    assert sorted(resumed.files) == sorted(full.files)
    for rel, tensors in full.files.items():
        assert all(torch.equal(tensors[k], resumed.files[rel][k]) for k in tensors), rel
