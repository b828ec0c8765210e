"""The compiled training path (issue 22 item 1): runtime.compile, the on-disk cache, compiled vs eager steps."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
from conftest import EXAMPLE

from cstoolkit.compile import CompiledForward, cache_state, configure_cache, default_cache_dir, have_cxx_compiler
from cstoolkit.phases import PhaseTimer
from cstoolkit.runtime import Runtime, RuntimeConfig

#: the backend of the compiled-vs-eager step test. Inductor on this CPU compiles the tiny UNet's forward and
#: backward in minutes (C++ kernels); aot_eager runs the same Dynamo trace and AOTAutograd forward/backward
#: graphs Inductor is handed, in seconds. CSTOOLKIT_TEST_INDUCTOR=1 runs Inductor itself (float64, see below).
INDUCTOR = os.environ.get("CSTOOLKIT_TEST_INDUCTOR") == "1"
needs_cxx = pytest.mark.skipif(not have_cxx_compiler(),
                               reason="torch.compile's Inductor needs a C++ compiler on the CPU (no g++/c++/clang++)")


def _unziplora_step(backbone, compiler):
    """Loss and LoRA gradients of UnZipLoRA's first masked step (step 1, after one eager scoring step)."""
    from cstoolkit.methods._sdxl_lora import image_latents
    from cstoolkit.methods.unziplora import UnZipLoRAConfig, UnZipLoRATrainer

    latents = image_latents(backbone, str(EXAMPLE), "inputs.image")
    conds = [backbone.encode_prompt([p]) for p in ("A sks balloon in flat style", "A sks balloon", "flat style")]
    trainer = UnZipLoRATrainer(backbone, UnZipLoRAConfig(rank=2, warmup_steps=1), latents, *conds,
                               lora_generator=torch.Generator().manual_seed(0), compiler=compiler)
    try:
        trainer.step(0)  # warm-up: scoring pass (always the plain forward), then the first masks
        out = trainer.step(1)  # a masked step: compiled when a compiler is given
        grads = {f"{k}.{n}": getattr(b, n).grad.clone() for k, b in trainer.loras.banks.items()
                 for n in ("lora_A", "lora_B")}
        mergers = {k: m.grad.clone() for k, m in trainer.masks.mergers.items()}
        return {k: float(v) for k, v in out.items()}, grads, mergers
    finally:
        trainer.loras.remove()


@pytest.mark.skipif(INDUCTOR and not have_cxx_compiler(), reason="Inductor on the CPU needs a C++ compiler")
def test_compiled_and_eager_training_steps_agree(backbone, tmp_path):
    """Same loss, LoRA and merger gradients from a compiled and an eager UnZipLoRA step on the tiny SDXL.

    Tolerance: aot_eager (default), float32: loss relative 1e-5, gradients 1e-5 relative + 1e-6 of the
    largest entry (the same arithmetic: measured bit for bit equal). Inductor (CSTOOLKIT_TEST_INDUCTOR=1; its cold
    compile of the tiny UNet took 944 s on this 2-core machine under load ~8), the UNet in float64 (the loss head
    stays float32): loss relative 1e-6 (measured 2e-7), gradients 1e-4 relative + 1e-4 of the largest entry
    (measured at most 4.6e-5 of it). In float32 the random-weight tiny UNet amplifies Inductor's reordered sums
    to 3e-4 of the loss and up to 1e-1 of the largest gradient entry: too loose to catch a wrong graph.
    """
    dtype = torch.float64 if INDUCTOR else torch.float32
    unet, weight_dtype = backbone.unet, backbone.weight_dtype
    unet.to(dtype)
    backbone.weight_dtype = dtype
    try:
        eager = _unziplora_step(backbone, None)
        compiler = CompiledForward(unet, label="unziplora", backend="inductor" if INDUCTOR else "aot_eager",
                                   cache_dir=tmp_path / "cache")
        try:
            compiled = _unziplora_step(backbone, compiler)
        finally:
            compiler.remove()
        assert "forward" not in unet.__dict__  # the plain forward is back
    finally:
        unet.to(torch.float32)
        backbone.weight_dtype = weight_dtype
    assert len(compiler.records) == 1 and not compiler.records[0].failed, compiler.records
    loss_rtol, rtol, atol = (1e-6, 1e-4, 1e-4) if INDUCTOR else (1e-5, 1e-5, 1e-6)
    for key in ("loss", "ortho"):
        assert compiled[0][key] == pytest.approx(eager[0][key], rel=loss_rtol)
    for got, want in ((compiled[1], eager[1]), (compiled[2], eager[2])):
        assert got.keys() == want.keys()
        for k in want:
            assert want[k].abs().sum() > 0, k  # gradients reach every bank and merger
            torch.testing.assert_close(got[k], want[k].to(got[k].dtype), rtol=rtol,
                                       atol=atol * float(want[k].abs().max()), msg=k)


def test_runtime_compile_rule():
    """off never, on always, auto: CUDA with at least compile_min_steps steps, never on the CPU."""
    def use(setting: str, steps: int, device: str) -> bool:
        runtime = Runtime(RuntimeConfig(compile=setting, compile_min_steps=500))
        runtime._device = torch.device(device)
        return runtime.use_compile(steps)

    assert not use("auto", 10_000, "cpu") and use("on", 1, "cpu") and not use("off", 10_000, "cuda")
    assert use("auto", 500, "cuda") and not use("auto", 499, "cuda")
    assert Runtime(RuntimeConfig(device="cpu")).compiled(torch.nn.Linear(2, 2), steps=10_000) is None
    # the default threshold: a warm-cache compile (32 s on an H100) does not pay back in UnZipLoRA's 600 steps
    default = Runtime(RuntimeConfig(compile="auto"))
    default._device = torch.device("cuda")
    assert not default.use_compile(600) and default.use_compile(4000)


def test_wrong_compile_option_is_one_line(tmp_path, capsys):
    from test_cli_habits import _error, _recipe

    from cstoolkit.cli import main

    recipe = _recipe(tmp_path, runtime={"output_dir": str(tmp_path / "run"), "compile": "maybe"})
    assert main(["run", str(recipe)]) == 2
    err = _error(capsys)
    assert err.startswith("runtime.compile:") and "auto" in err and "on" in err and "off" in err, err


def test_cache_folder_is_the_users_cache_unless_torchinductor_cache_dir_is_set(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert default_cache_dir() == tmp_path / "xdg" / "cstoolkit" / "torch_compile"
    assert configure_cache() == (tmp_path / "xdg" / "cstoolkit" / "torch_compile").resolve()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(configure_cache())
    assert torch._inductor.config.fx_graph_cache and torch._functorch.config.enable_autograd_cache
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's own wins
    assert configure_cache(tmp_path / "other") == (tmp_path / "mine").resolve()


def test_cache_state_from_counter_deltas():
    def state(fh: int, fm: int, ah: int, am: int) -> str:
        return cache_state({"fx_hits": fh, "fx_misses": fm, "aot_hits": ah, "aot_misses": am})

    assert state(0, 2, 0, 1) == "cold" and state(2, 0, 1, 0) == "warm" and state(0, 0, 1, 0) == "warm"
    assert state(1, 1, 0, 1) == "partly warm" and state(0, 0, 0, 0) == "in memory"


@needs_cxx
def test_second_compile_finds_the_first_ones_cache_and_the_run_records_both(tmp_path):
    """A cold compile writes the cache; after Dynamo forgets it (as a new process would), the same step is a
    warm compile; both are timed as a phase ``.../compile`` and written to phases.json under ``compile``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1)).requires_grad_(False)
    lora = torch.nn.Parameter(torch.zeros(16, 8))
    hook = model[0].register_forward_hook(lambda m, args, out: out + args[0] @ lora.t())
    x = torch.randn(4, 8)
    timer = PhaseTimer(tmp_path / "phases.json")
    cache = tmp_path / "cache"
    records = []
    try:
        for _ in range(2):
            torch._dynamo.reset()
            compiler = CompiledForward(model, label="toy", cache_dir=cache, phases=timer,
                                       on_record=lambda r: timer.note("compile", r.as_dict()))

            def step() -> None:
                lora.grad = None
                model(x).square().mean().backward()

            with timer("fit"):
                compiler.step(step)()
            compiler.remove()
            records += compiler.records
    finally:
        hook.remove()
        torch._dynamo.reset()
    assert [r.cache for r in records] == ["cold", "warm"], [r.describe() for r in records]
    assert records[0].files_after > records[0].files_before == 0 and records[1].aot_hits >= 1
    # where the compile's seconds went, by PyTorch's timers (Dynamo's trace among them), none above the total
    assert "_compile.compile_inner" in records[0].timers, records[0].timers
    assert max(records[0].timers.values()) <= records[0].seconds + 0.01
    data = json.loads((tmp_path / "phases.json").read_text())
    assert [p["phase"] for p in data["phases"]].count("fit/compile") == 2
    assert [r["cache"] for r in data["compile"]] == ["cold", "warm"]


def test_autocast_only_where_the_frozen_weights_are_not_the_compute_dtype():
    bf16 = torch.nn.Linear(2, 2).to(torch.bfloat16)
    mixed = torch.nn.Sequential(torch.nn.Linear(2, 2).to(torch.bfloat16), torch.nn.LayerNorm(2))
    on = Runtime(RuntimeConfig(device="cpu", mixed_precision="bf16"))
    assert on.autocast_for(bf16) is contextlib.nullcontext
    assert on.autocast_for(mixed) == on.autocast
    assert Runtime(RuntimeConfig(device="cpu")).autocast_for(mixed) is contextlib.nullcontext


def test_unquoted_on_off_in_yaml_mean_on_and_off():
    """YAML 1.1 reads ``compile: off`` (or ``--set runtime.compile=off``) as false: it means "off"."""
    import yaml

    from cstoolkit.config import from_dict

    cfg = from_dict(RuntimeConfig, yaml.safe_load("{compile: off, cuda_graph: on}"), "runtime")
    assert (cfg.compile, cfg.cuda_graph) == ("off", "on")
    # the same for no/yes where those are the words: `--set runtime.mixed_precision=no` (was refused as False)
    assert from_dict(RuntimeConfig, yaml.safe_load("{mixed_precision: no}"), "runtime").mixed_precision == "no"


def test_bf16_steps_without_autocast_match_autocast():
    """Frozen UNet in bf16: the step runs without autocast (Runtime.autocast_for) and gives what the autocast
    step gave, up to bf16 rounding (on this CPU measured identical: CPU autocast keeps these ops in bf16)."""
    from cstoolkit.backbones.sdxl import SDXLBackbone, SDXLConfig

    bb = SDXLBackbone.from_config(SDXLConfig(preset="tiny", dtype="bfloat16"))
    bb.freeze()
    runtime = Runtime(RuntimeConfig(device="cpu", mixed_precision="bf16"))
    plain = runtime.autocast_for(bb.unet)
    assert plain is contextlib.nullcontext
    from cstoolkit.methods._sdxl_lora import image_latents
    from cstoolkit.methods.unziplora import UnZipLoRAConfig, UnZipLoRATrainer

    latents = image_latents(bb, str(EXAMPLE), "inputs.image")
    conds = [bb.encode_prompt([p]) for p in ("A sks balloon in flat style", "A sks balloon", "flat style")]
    results = []
    for autocast in (runtime.autocast, plain):
        trainer = UnZipLoRATrainer(bb, UnZipLoRAConfig(rank=2, warmup_steps=1), latents, *conds,
                                   lora_generator=torch.Generator().manual_seed(0), autocast=autocast)
        try:
            trainer.step(0)
            loss = float(trainer.step(1)["loss"])
            grads = torch.cat([b.lora_B.grad.flatten() for b in trainer.loras.banks.values()])
        finally:
            trainer.loras.remove()
        results.append((loss, grads))
    (loss_a, grad_a), (loss_p, grad_p) = results
    assert loss_p == pytest.approx(loss_a, rel=1e-2)
    assert torch.nn.functional.cosine_similarity(grad_a, grad_p, dim=0) > 0.999
