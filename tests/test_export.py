"""LoRA files for other tools (issue 9 item 7): ``cstoolkit export RUN --format kohya`` and the stored dtypes."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import ROOT, toy_recipe
from safetensors import safe_open
from safetensors.torch import load_file

from cstoolkit import Decomposer
from cstoolkit.cli import main
from cstoolkit.export import kohya_module_name, to_kohya
from cstoolkit.lora import is_lora_state_dict

LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, single_thread):
    """A short DreamBooth-LoRA run on the tiny SDXL (strong learning rate: the LoRA changes the output)."""
    out = tmp_path_factory.mktemp("export") / "balloon"
    Decomposer.from_recipe(ROOT / "recipes" / "dreambooth_lora.yaml", [
        "params.steps=2", "params.lr=0.05", "runtime.checkpoint_every=1", f"runtime.output_dir={out}",
        "runtime.device=cpu", "runtime.progress=false", "generate.num_images=1", "generate.steps=2"]).run()
    return out


def test_finished_loras_are_fp16_and_checkpoints_fp32(lora_run):
    state = load_file(str(lora_run / "decomposition" / "content" / LORA))
    assert is_lora_state_dict(state) and {v.dtype for v in state.values()} == {torch.float16}
    ckpt = load_file(str(lora_run / "checkpoints" / "content" / "final" / "state.safetensors"))
    assert {v.dtype for k, v in ckpt.items() if k.startswith("param/")} == {torch.float32}
    with safe_open(str(lora_run / "decomposition" / "content" / LORA), "pt") as fh:
        assert "lora_adapter_metadata" in fh.metadata()  # diffusers' adapter config survives the cast


def _unet_output(backbone) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    cond = backbone.encode_prompt(["a photo of a balloon"])
    with torch.no_grad():
        return backbone.unet(latents, torch.tensor([500]), encoder_hidden_states=cond.prompt_embeds,
                             added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.extra["time_ids"]}
                             ).sample


def test_kohya_file_loads_in_diffusers_to_the_same_unet(lora_run, tmp_path, backbone, capsys):
    assert main(["export", str(lora_run), "--format", "kohya", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    kohya = tmp_path / "balloon_content.safetensors"
    assert str(kohya) in printed and (tmp_path / "balloon_style.safetensors").is_file()
    state = load_file(str(kohya))
    assert all(re.match(r"^lora_unet_(input_blocks|middle_block|output_blocks)_\d", k) for k in state)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in state)
    assert {v.dtype for v in state.values()} == {torch.float16}
    ours = load_file(str(lora_run / "decomposition" / "content" / LORA))
    assert len(state) == len(ours) // 2 * 3

    pipe = backbone.pipeline()
    base = _unet_output(backbone)
    outputs = {}
    for name, folder, weight in (("kohya", tmp_path, kohya.name),
                                 ("diffusers", lora_run / "decomposition" / "content", LORA)):
        pipe.load_lora_weights(str(folder), weight_name=weight, adapter_name=name)
        outputs[name] = _unet_output(backbone)
        pipe.unload_lora_weights()
    assert torch.allclose(_unet_output(backbone), base)  # unloaded again
    assert (outputs["diffusers"] - base).abs().max() > 1e-4  # the LoRA does something
    torch.testing.assert_close(outputs["kohya"], outputs["diffusers"], rtol=1e-5, atol=1e-6)


def test_export_diffusers_format_in_fp32(lora_run, tmp_path):
    assert main(["export", str(lora_run / "decomposition"), "--format", "diffusers", "--dtype", "fp32",
                 "--out", str(tmp_path)]) == 0
    state = load_file(str(tmp_path / "style" / LORA))
    ours = load_file(str(lora_run / "decomposition" / "style" / LORA))
    assert sorted(state) == sorted(ours)
    assert all(v.dtype == torch.float32 and torch.equal(v, ours[k].float()) for k, v in state.items())


def test_diffusers_export_loads_without_weight_name(lora_run, tmp_path, backbone):
    """Issue 19 item 13: one folder per part with diffusers' default file name, so that
    ``pipe.load_lora_weights(folder)`` finds the file by itself, and it changes the UNet as ours does."""
    assert main(["export", str(lora_run), "--format", "diffusers", "--out", str(tmp_path)]) == 0
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.safetensors")) == \
        [f"content/{LORA}", f"style/{LORA}"]
    pipe = backbone.pipeline()
    base = _unet_output(backbone)
    outputs = {}
    for name, folder in (("export", tmp_path / "content"), ("ours", lora_run / "decomposition" / "content")):
        pipe.load_lora_weights(str(folder), adapter_name=name)  # no weight_name=
        outputs[name] = _unet_output(backbone)
        pipe.unload_lora_weights()
    assert (outputs["ours"] - base).abs().max() > 1e-4
    torch.testing.assert_close(outputs["export"], outputs["ours"], rtol=1e-5, atol=1e-6)


def test_sgm_names():
    assert kohya_module_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert kohya_module_name("down_blocks.2.attentions.1.proj_in") == "input_blocks.8.1.proj_in"
    assert kohya_module_name("mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0") == \
        "middle_block.1.transformer_blocks.9.attn2.to_out.0"
    assert kohya_module_name("up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k") == \
        "output_blocks.5.1.transformer_blocks.0.attn2.to_k"
    with pytest.raises(ValueError, match="no kohya name"):
        kohya_module_name("down_blocks.0.resnets.0.conv1")
    a, b = torch.randn(4, 8), torch.randn(6, 4)
    out = to_kohya({"unet.up_blocks.0.attentions.0.proj_in.lora_A.weight": a,
                    "unet.up_blocks.0.attentions.0.proj_in.lora_B.weight": b}, torch.float32)
    assert torch.equal(out["lora_unet_output_blocks_0_1_proj_in.lora_down.weight"], a)
    assert out["lora_unet_output_blocks_0_1_proj_in.alpha"].item() == 4.0


def test_export_errors(tmp_path, capsys):
    Decomposer.from_recipe(toy_recipe(tmp_path)).run()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "x")]) == 2
    assert "has no LoRA files" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--format", "lycoris"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cstoolkit: error: --format: unknown format 'lycoris'; expected one of: kohya, diffusers"]
    assert main(["export", str(tmp_path / "nothing")]) == 2
    assert f"RUN: {tmp_path / 'nothing'} does not exist;" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
