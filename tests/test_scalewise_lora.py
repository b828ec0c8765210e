"""LoRA on the scale-wise transformers (issue 20): official target names, PEFT layout, per-token gates,
scale separation, the methods x backbones matrix."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cstoolkit.backbone import ScaleWiseBackbone
from cstoolkit.backbones.infinity import InfinityBackbone, InfinityConfig
from cstoolkit.backbones.switti import SwittiBackbone, SwittiConfig
from cstoolkit.cli import main
from cstoolkit.decomposition import Decomposition
from cstoolkit.errors import UserError
from cstoolkit.lora import LoRASet
from cstoolkit.methods._scalewise_lora import ADAPTER_FILE, CONFIG_FILE, PEFT_PREFIX, group_weights, peft_metadata


@pytest.fixture(scope="module")
def tiny(tiny_scalewise) -> ScaleWiseBackbone:
    return tiny_scalewise


def _batch(backbone: ScaleWiseBackbone):
    schedule = backbone.scale_schedule()
    h, w = backbone.image_size(schedule)
    images = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return backbone.image_to_targets(images, schedule), backbone.encode_text(["a red tree"])


def _logits(backbone, targets, text) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([t.flatten(1) for t in backbone.teacher_forcing_logits(text, targets)], dim=1)


def test_targets_are_official_linear_layers(tiny):
    names = tiny.adapter_targets()
    state = tiny.lora_model().state_dict()
    assert names and all(f"{n}.weight" in state for n in names)  # the official checkpoint keys
    leaves = {n.split(".", 2)[-1] if isinstance(tiny, SwittiBackbone) else n.split(".", 4)[-1] for n in names}
    assert leaves == ({"attn.to_qkv", "attn.proj", "cross_attn.to_q", "cross_attn.to_kv", "cross_attn.proj"}
                      if isinstance(tiny, SwittiBackbone) else {"sa.mat_qkv", "sa.proj", "ca.mat_q", "ca.mat_kv",
                                                               "ca.proj"})
    assert set(tiny.adapter_targets(ffn=True)) > set(names)
    assert set(tiny.text_projections()) <= set(names)
    _, text = _batch(tiny)
    inputs = tiny.text_projection_inputs(text)
    assert set(inputs) == set(tiny.text_projections())
    for name, x in inputs.items():
        assert x.shape[-1] == tiny.lora_model().get_submodule(name).in_features


def test_saved_adapter_loads_with_peft_and_matches_our_layers(tiny, tmp_path):
    """Our LoRA, saved in PEFT's layout, gives the same logits when PEFT injects it into the transformer."""
    from peft import LoraConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict

    targets, text = _batch(tiny)
    base = _logits(tiny, targets, text)
    model = tiny.lora_model()
    loras = LoRASet(model, tiny.adapter_targets(ffn=True), 4, ("lora",), init="gaussian", init_std=0.05,
                    generator=torch.Generator().manual_seed(1), prefix=PEFT_PREFIX).inject()
    loras.prepare(torch.float32)
    ours = _logits(tiny, targets, text)
    loras.remove()
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the model
    state = loras.export("lora")
    dec = Decomposition(method="x", files={f"content/{ADAPTER_FILE}": state},
                        file_metadata={f"content/{ADAPTER_FILE}": peft_metadata(state)})
    dec.save(tmp_path)
    folder = tmp_path / "content"
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA" and len(config["target_modules"]) == len(loras.names)

    # PeftModel.from_pretrained on the transformer (official module names): the adapter folder as saved
    peft_model = PeftModel.from_pretrained(model, str(folder))
    try:
        assert torch.allclose(_logits(tiny, targets, text), ours, atol=1e-4, rtol=1e-4)
    finally:
        peft_model.unload()
    assert torch.allclose(_logits(tiny, targets, text), base)

    # the low-level API: inject_adapter_in_model + set_peft_model_state_dict (keys without the wrapper prefix)
    cfg = LoraConfig.from_pretrained(str(folder))
    injected = inject_adapter_in_model(cfg, model)
    sd = {k[len(PEFT_PREFIX) + 1:]: v for k, v in load_file(str(folder / ADAPTER_FILE)).items()}
    result = set_peft_model_state_dict(injected, sd)
    assert not [k for k in result.unexpected_keys if "lora" in k]
    try:
        assert torch.allclose(_logits(tiny, targets, text), ours, atol=1e-4, rtol=1e-4)
    finally:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
                setattr(parent, name.rpartition(".")[2], module.get_base_layer())
    assert torch.allclose(_logits(tiny, targets, text), base)


def test_token_weighted_gates_relax_a_mask_on_chosen_scales(tiny):
    """Gate g + w(t) e: the masked LoRA on the tokens of one scale group, the full LoRA on the others."""
    targets, text = _batch(tiny)
    model = tiny.lora_model()
    names = [n for n in tiny.adapter_targets() if n not in tiny.text_projections()]
    loras = LoRASet(model, names, 4, ("a",), init="gaussian", init_std=0.05,
                    generator=torch.Generator().manual_seed(2), prefix=PEFT_PREFIX).inject()
    try:
        n = len(targets.schedule)
        weights = group_weights(targets.schedule, [range(n // 2, n)])  # relaxed on the later scales
        masks = {k: (torch.rand(len(b.names), b.out_features, generator=torch.Generator().manual_seed(3)) > 0.5)
                 .float() for k, b in loras.banks.items()}
        loras.set_token_weights(weights)
        loras.prepare(torch.float32, lambda k, b: {"a": masks[k]}, lambda k, b: {"a": 1 - masks[k]})
        mixed = _logits(tiny, targets, text)
        loras.set_token_weights(None)
        loras.prepare(torch.float32, lambda k, b: {"a": masks[k]})
        masked = _logits(tiny, targets, text)
        loras.prepare(torch.float32)
        full = _logits(tiny, targets, text)
    finally:
        loras.remove()
    width = mixed.shape[1] // sum(h * w for h, w in targets.schedule)  # logits per token
    # the first token (scale 0, masked) sees only scale 0: exactly the masked run; the last token differs
    assert torch.allclose(mixed[:, :width], masked[:, :width], atol=1e-5)
    assert not torch.allclose(mixed[:, -width:], masked[:, -width:], atol=1e-4)
    assert not torch.allclose(mixed, full, atol=1e-4)


def test_list_methods_prints_the_matrix(capsys):
    assert main(["list-methods"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("METHOD"))
    for name in ("sdxl", "infinity", "switti"):
        assert name in header
    row = next(line for line in out.splitlines() if line.startswith("unziplora "))
    assert row.count("yes") == 3
    row = next(line for line in out.splitlines() if line.startswith("ziplora "))
    assert row.count("yes") == 3
    row = next(line for line in out.splitlines() if line.startswith("b_lora "))
    assert row.count("yes") == 1


def test_unsupported_pair_names_the_supported_backbones():
    from cstoolkit.recipe import parse_recipe

    with pytest.raises(UserError) as err:
        parse_recipe({"method": "b_lora", "backbone": {"name": "switti", "preset": "tiny"}})
    assert "does not run on 'switti'" in str(err.value) and "sdxl" in str(err.value)


def test_unziplora_starts_as_the_base_model_on_scale_wise_backbones(tiny, tmp_path):
    """init auto = gaussian_a there: B is zero, so before any step the LoRAs change no logit (the official
    SDXL init, A and B both random, broke the world Switti's samples); `init: gaussian` keeps the official one."""
    from PIL import Image

    from cstoolkit.methods.unziplora import ScaleWiseUnZipLoRATrainer, UnZipLoRAConfig

    targets, text = _batch(tiny)
    base = _logits(tiny, targets, text)
    h, w = tiny.image_size(tiny.scale_schedule())
    image = tmp_path / "x.png"
    Image.new("RGB", (w, h), (200, 60, 30)).save(image)
    prompts = ["a sks tree in mosaic style", "a sks tree", "an image in mosaic style"]
    for init, same in (("auto", True), ("gaussian", False)):
        cfg = UnZipLoRAConfig(rank=4, init=init, prompt_separation=False)
        gen = torch.Generator().manual_seed(0)
        trainer = ScaleWiseUnZipLoRATrainer(tiny, cfg, str(image), prompts, lora_generator=gen)
        try:
            for bank in trainer.loras.banks.values():
                assert (bank.lora_B.abs().max().item() == 0) == same
            trainer.loras.prepare(torch.float32)
            assert torch.allclose(_logits(tiny, targets, text), base, atol=1e-6) == same
        finally:
            trainer.loras.remove()
    assert torch.allclose(_logits(tiny, targets, text), base)  # removed: the base model again


def _masked_step_grads(backbone, image: str, scale_separation: bool, merge: bool, merge_segments: bool = True):
    """Loss and gradients (A, B, mergers) of one masked UnZipLoRA step from the same random state."""
    from cstoolkit.methods.unziplora import ScaleWiseUnZipLoRATrainer, UnZipLoRAConfig

    cfg = UnZipLoRAConfig(rank=4, scale_separation=scale_separation)
    prompts = ["a sks tree in mosaic style", "a sks tree", "an image in mosaic style"]
    trainer = ScaleWiseUnZipLoRATrainer(backbone, cfg, image, prompts, lora_generator=torch.Generator().manual_seed(0),
                                        merge=merge, merge_segments=merge_segments)
    try:
        g = torch.Generator().manual_seed(1)
        masks = trainer.masks
        with torch.no_grad():  # a trained-looking state: B non-zero, random masks and mergers
            for bank in trainer.loras.banks.values():
                bank.lora_B.copy_(torch.randn(bank.lora_B.shape, generator=g) * 0.05)
            for name, buf in masks.buffers.items():
                if name.endswith(".mask"):
                    buf.copy_((torch.rand(buf.shape, generator=g) > 0.5).float())
            for merger in masks.mergers.values():
                merger.copy_(torch.rand(merger.shape, generator=g))
        gates = trainer.prepare_masked()
        segmented = [key for key, bank in trainer.loras.banks.items() if bank._seg_w is not None]
        loss = trainer.diffusion_loss() + cfg.ortho_weight * masks.orthogonality_loss(trainer.loras, gates)
        params = {**{f"A.{k}": b.lora_A for k, b in trainer.loras.banks.items()},
                  **{f"B.{k}": b.lora_B for k, b in trainer.loras.banks.items()},
                  **{f"merger.{k}": m for k, m in masks.mergers.items()}}
        grads = torch.autograd.grad(loss, list(params.values()))
        return loss.detach(), dict(zip(params, grads)), segmented
    finally:
        trainer.loras.remove()


def test_unziplora_scale_separated_layers_merged_per_scale_group(tiny, tmp_path):
    """Merged banks (GPU default; forced on here, CPU fp32): with scale separation every image-token layer runs
    one merged weight per scale group, one GEMM per group's tokens; loss and gradients of every LoRA and merger
    are the unmerged layers' within fp32 rounding (rel. 1e-5 of each tensor's largest entry). Without scale
    separation nothing is merged per group and the merged step is bitwise what it was."""
    from PIL import Image

    h, w = tiny.image_size(tiny.scale_schedule())
    image = tmp_path / "x.png"
    Image.new("RGB", (w, h), (200, 60, 30)).save(image)
    loss0, ref, none = _masked_step_grads(tiny, str(image), True, merge=False)
    loss1, got, segmented = _masked_step_grads(tiny, str(image), True, merge=True)
    assert not none and segmented and all("split" not in key for key in segmented)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=0)
    for name, g in ref.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-5 * float(g.abs().max()), msg=name)
    loss2, plain, none2 = _masked_step_grads(tiny, str(image), False, merge=True)
    loss3, before, _ = _masked_step_grads(tiny, str(image), False, merge=True, merge_segments=False)
    assert not none2 and torch.equal(loss2, loss3)
    assert all(torch.equal(plain[k], before[k]) for k in before)


def _random_lora(backbone) -> dict[str, torch.Tensor]:
    """A rank-2 PEFT-layout LoRA on the first 4 adapter targets, random from seed 0."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for layer in backbone.adapter_targets()[:4]:
        module = backbone.lora_model().get_submodule(layer)
        state[f"{PEFT_PREFIX}.{layer}.lora_A.weight"] = torch.randn(2, module.in_features, generator=g) * 0.1
        state[f"{PEFT_PREFIX}.{layer}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=g) * 0.1
    return state


@pytest.mark.parametrize("name", ["infinity", "switti"])
def test_sampling_with_merged_loras_on_a_bf16_backbone(name, single_thread):
    """The GPU sampling path (bf16 frozen weights, LoRAs merged into them) on a CPU: `cstoolkit run` of the LoRA
    recipes on switti-ar stopped here with "self and mat2 must have the same dtype" (banks folded in float32)."""
    from types import SimpleNamespace

    from cstoolkit.methods._scalewise_lora import sample_scalewise

    cls, cfg = (InfinityBackbone, InfinityConfig) if name == "infinity" else (SwittiBackbone, SwittiConfig)
    backbone = cls.from_config(cfg(preset="tiny", dtype="bfloat16"))
    backbone.freeze()
    state = _random_lora(backbone)
    options = SimpleNamespace()
    images = {merge: sample_scalewise(backbone, {"content": state}, ["a <c>"], {"<c>": "sks tree"}, num_images=1,
                                      seed=0, options=options, progress=False, merge=merge)
              for merge in (False, True)}
    assert len(images[True]) == 1 and len(images[True][0]) == 1
    assert images[True][0][0].size == images[False][0][0].size


@pytest.mark.parametrize("name", ["infinity", "switti"])
def test_lora_sampling_batches_prompts_with_each_images_own_seed(name, single_thread):
    """The rows of several prompts go to one generate call; image i of a prompt is the one it gives alone."""
    from types import SimpleNamespace

    from cstoolkit.methods._scalewise_lora import sample_scalewise

    cls, cfg = (InfinityBackbone, InfinityConfig) if name == "infinity" else (SwittiBackbone, SwittiConfig)
    backbone = cls.from_config(cfg(preset="tiny"))
    backbone.freeze()
    assert backbone.sample_batch() >= 8
    state = _random_lora(backbone)
    prompts, words = ["a <c>", "a <c> on a hill"], {"<c>": "sks tree"}
    together = sample_scalewise(backbone, {"content": state}, prompts, words, num_images=2, seed=3,
                                options=SimpleNamespace(), progress=False)
    alone = [sample_scalewise(backbone, {"content": state}, [p], words, num_images=2, seed=3,
                              options=SimpleNamespace(), progress=False)[0] for p in prompts]
    assert [len(x) for x in together] == [2, 2]
    same = [np.array_equal(np.asarray(x), np.asarray(y)) for a, b in zip(together, alone) for x, y in zip(a, b)]
    assert all(same), same


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("name", ["infinity", "switti"])
def test_lora_trainers_fold_banks_in_the_projections_dtype(name, merge, tmp_path, single_thread):
    """bf16 backbone (a GPU with mixed_precision bf16): the trainers fold the LoRAs into bf16 weights, not into
    float32 copies (the transformer's first parameter is a float32 embedding: 2x the merged weights' memory and a
    cast per layer and step before)."""
    from PIL import Image

    from cstoolkit.methods._scalewise_lora import ScaleWiseLoRATrainer
    from cstoolkit.methods.unziplora import ScaleWiseUnZipLoRATrainer, UnZipLoRAConfig

    cls, cfg = (InfinityBackbone, InfinityConfig) if name == "infinity" else (SwittiBackbone, SwittiConfig)
    backbone = cls.from_config(cfg(preset="tiny", dtype="bfloat16"))
    backbone.freeze()
    assert next(backbone.lora_model().parameters()).dtype == torch.float32  # why the first parameter is no guide
    targets, text = _batch(backbone)
    h, w = backbone.image_size(backbone.scale_schedule())
    image = tmp_path / "x.png"
    Image.new("RGB", (w, h), (200, 60, 30)).save(image)
    db = ScaleWiseLoRATrainer(backbone, backbone.adapter_targets(), [targets], [text], adapter="content", rank=2,
                              lr=1e-3, merge=merge)  # merged: the GPU's path
    try:
        assert db.dtype == torch.bfloat16
        assert math.isfinite(float(db.step(0)["loss"]))  # a bf16 step runs
        if merge:  # the folded weights themselves: bf16 (they were float32 copies)
            with torch.no_grad():
                db.loras.prepare(db.dtype)
            assert {b.merged_weight(0).dtype for b in db.loras.banks.values()} == {torch.bfloat16}
    finally:
        db.loras.remove()
    uz = ScaleWiseUnZipLoRATrainer(backbone, UnZipLoRAConfig(rank=2), str(image),
                                   ["a sks tree in mosaic style", "a sks tree", "an image in mosaic style"],
                                   merge=merge)
    try:
        assert uz.dtype == torch.bfloat16
        assert all(math.isfinite(float(uz.step(i)["loss"])) for i in range(uz.warmup + 1))
    finally:
        uz.loras.remove()
