"""CUDA-graph option of the scale-wise LoRA trainers (DreamBooth-LoRA's ``ScaleWiseLoRATrainer``, UnZipLoRA's
``ScaleWiseUnZipLoRATrainer``): a no-op on a CPU (bitwise the eager trainers), no host sync inside the step
function, the round-robin pairs fed through fixed tensors, and the wiring (graphs only with
``runtime.cuda_graph: on``)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from cstoolkit.backbone import ScaleWiseBackbone, TextContext
from cstoolkit.methods._scalewise_lora import ScaleWiseLoRATrainer, load_target
from cstoolkit.methods.unziplora import ScaleWiseUnZipLoRATrainer, UnZipLoRAConfig
from cstoolkit.runtime import Runtime, RuntimeConfig

PROMPTS = ["a sks tree in mosaic style", "a sks tree", "an image in mosaic style"]


@pytest.fixture(scope="module")
def tiny(tiny_scalewise) -> ScaleWiseBackbone:
    return tiny_scalewise


@pytest.fixture(scope="module")
def images(tiny, tmp_path_factory) -> list[str]:
    """Two random images at the backbone's size."""
    h, w = tiny.image_size(tiny.scale_schedule())
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(2):
        pixels = torch.rand(h, w, 3, generator=torch.Generator().manual_seed(i)) * 255
        Image.fromarray(pixels.byte().numpy()).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    return paths


def _dreambooth(tiny, targets, texts, **kw) -> ScaleWiseLoRATrainer:
    return ScaleWiseLoRATrainer(tiny, tiny.adapter_targets(), targets, texts, adapter="content", rank=4, lr=1e-2,
                                lora_generator=torch.Generator().manual_seed(1), **kw)


def _unziplora(tiny, image: str, **kw) -> ScaleWiseUnZipLoRATrainer:
    cfg = UnZipLoRAConfig(rank=4, lr=1e-2, warmup_steps=2, recalibrate_every=2, rounds=2)
    return ScaleWiseUnZipLoRATrainer(tiny, cfg, image, PROMPTS, lora_generator=torch.Generator().manual_seed(1), **kw)


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {f"{k}.{n}": getattr(b, n).detach().clone() for k, b in trainer.loras.banks.items()
            for n in ("lora_A", "lora_B")}


@pytest.mark.parametrize("merge", [False, True])
def test_cuda_graph_is_a_no_op_on_a_cpu(tiny, images, merge):
    """cuda_graph=True on a CPU: the same losses, LoRAs, mergers and masks as cuda_graph=False, bitwise, over
    round-robin pairs (DreamBooth-LoRA) and scoring, masked and recalibration steps (UnZipLoRA); merged banks
    forced on too (the GPU's code path)."""
    targets = [load_target(tiny, p, "x") for p in images]
    with torch.no_grad():
        text = tiny.encode_text(["a sks tree"])
    runs = {}
    for graph in (False, True):
        db = _dreambooth(tiny, targets, [text, text], merge=merge, cuda_graph=graph)
        try:
            assert not db.cuda_graph and not db.captured  # CUDA only
            losses = [db.step(i)["loss"] for i in range(4)]
        finally:
            db.release()
            db.loras.remove()
        uz = _unziplora(tiny, images[0], merge=merge, cuda_graph=graph)
        try:
            assert not uz.captured
            logs = [{k: float(v) for k, v in uz.step(i).items()} for i in range(uz.warmup + 4)]
        finally:
            uz.release()
            uz.loras.remove()
        assert uz.masks.rounds_done == 2  # the warm-up's round and one recalibration ran
        runs[graph] = (losses, _weights(db), logs, _weights(uz), uz.masks.export_tensors())
    (l0, w0, u0, v0, m0), (l1, w1, u1, v1, m1) = runs[False], runs[True]
    assert l0 == l1 and u0 == u1
    for ref, got in ((w0, w1), (v0, v1), (m0, m1)):
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def _no_item(monkeypatch, optimizer: torch.optim.Optimizer) -> None:
    """``.item()`` raises, but on the optimiser's step counters: on a CPU (``capturable=False``) Adam reads its
    CPU step count on the host, which is no device sync; with ``capturable=True`` (CUDA graphs) it does not."""
    allowed = {id(st["step"]) for st in optimizer.state.values() if "step" in st}
    assert allowed  # the optimiser has stepped
    item = torch.Tensor.item

    def refuse(self, *args, **kwargs):
        if id(self) in allowed:
            return item(self, *args, **kwargs)
        raise AssertionError(".item() inside the step function (a host sync a CUDA graph cannot hold)")

    monkeypatch.setattr(torch.Tensor, "item", refuse)


def test_step_functions_make_no_host_sync(tiny, images, monkeypatch):
    """The step functions return detached loss tensors and call no .item(); DreamBooth-LoRA's public step still
    returns floats (read after the step)."""
    targets = [load_target(tiny, images[0], "x")]
    with torch.no_grad():
        text = tiny.encode_text(["a sks tree"])
    db = _dreambooth(tiny, targets, [text])
    try:
        first = db.step(0)
        assert isinstance(first["loss"], float)
        with monkeypatch.context() as m:
            _no_item(m, db.optimizer)
            out = db.run_step(1)
        assert set(out) == {"loss"} and isinstance(out["loss"], torch.Tensor) and not out["loss"].requires_grad
    finally:
        db.loras.remove()
    uz = _unziplora(tiny, images[0])
    try:
        for i in range(uz.warmup + 1):  # scoring steps (eager, outside the graphed function), one masked step
            uz.step(i)
        with monkeypatch.context() as m:
            _no_item(m, uz.optimizer)
            out = uz.step(uz.warmup + 1)  # a masked step, not a recalibration (recalibrate_every 2)
        assert set(out) == {"loss", "ortho"}
        assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in out.values())
    finally:
        uz.loras.remove()


def _frozen_lora(tiny, targets, texts) -> ScaleWiseLoRATrainer:
    """lr 0, no weight decay: the weights never change, so every step's loss is its pair's at the init."""
    return ScaleWiseLoRATrainer(tiny, tiny.adapter_targets(), targets, texts, adapter="content", rank=4, lr=0.0,
                                weight_decay=0.0, lora_generator=torch.Generator().manual_seed(1))


def test_round_robin_pairs_share_fixed_tensors_by_shape(tiny, images):
    """Pairs of the same shapes share one slot of fixed tensors (one captured step on CUDA), copied in before
    their step; a prompt of another padded length gets a slot of its own, which holds the pair's own tensors.
    Each step reads its own pair: at unchanged weights (lr 0) its loss is that of a trainer holding the pair
    alone."""
    targets = [load_target(tiny, p, "x") for p in images]
    with torch.no_grad():
        short = tiny.encode_text(["a sks tree"])
        other = tiny.encode_text(["a sks tree standing in a wide green field"])
    # another padded length (one padding position less; Switti's CLIP pads every prompt to 77)
    long = TextContext(other.tokens[:, :-1].contiguous(), other.mask[:, :-1].contiguous(), other.pooled)
    assert short.tokens.shape != long.tokens.shape
    pairs = [(targets[0], short), (targets[1], short), (targets[1], long)]
    alone = []
    for t, x in pairs:
        trainer = _frozen_lora(tiny, [t], [x])
        try:
            assert len(trainer.slots) == 1 and not trainer.slots[0].shared
            alone.append(trainer.step(0)["loss"])
        finally:
            trainer.loras.remove()
    assert len(set(alone)) == 3
    inputs = [t.inputs.clone() for t in targets]
    trainer = _frozen_lora(tiny, [t for t, _ in pairs], [x for _, x in pairs])
    try:
        assert [s.shared for s in trainer.slots] == [True, False]
        assert trainer.slots[1].text.tokens is long.tokens
        assert [trainer.step(i)["loss"] for i in range(6)] == alone + alone
    finally:
        trainer.loras.remove()
    assert all(torch.equal(t.inputs, x) for t, x in zip(targets, inputs))  # the pairs' own tensors untouched


class _Built(Exception):
    """Raised by the spied trainer constructors: the fit stops once the trainer's arguments are known."""


def _spy(monkeypatch, module, name: str, seen: list) -> None:
    def build(*args, **kwargs):
        seen.append(kwargs.get("cuda_graph"))
        raise _Built

    monkeypatch.setattr(module, name, build)


@pytest.mark.parametrize("setting, expected", [("auto", True), ("on", True), ("off", False)])
def test_scalewise_fits_graph_unless_off(tiny, images, tmp_path, monkeypatch, setting, expected):
    """runtime.cuda_graph: the scale-wise LoRA trainers of DreamBooth-LoRA, ZipLoRA (its LoRA stages) and
    UnZipLoRA get cuda_graph=True on CUDA unless `off` (auto is on since the captured steps were checked against
    the eager ones on an H100, docs/benchmarks.md); the runtime's device is made to look like CUDA."""
    from cstoolkit.methods import dreambooth_lora, unziplora, ziplora

    runtime = Runtime(RuntimeConfig(seed=0, device="cpu", progress=False, cuda_graph=setting,
                                    output_dir=str(tmp_path / "run")))
    runtime._device = torch.device("cuda")  # what a GPU run sees (nothing here touches the device)
    assert runtime.use_cuda_graph == expected  # what the SDXL steps follow too
    seen: list = []
    _spy(monkeypatch, dreambooth_lora, "ScaleWiseLoRATrainer", seen)
    _spy(monkeypatch, ziplora, "ScaleWiseLoRATrainer", seen)
    _spy(monkeypatch, unziplora, "ScaleWiseUnZipLoRATrainer", seen)
    fits = [
        lambda: dreambooth_lora.DreamBoothLoRA(dreambooth_lora.DreamBoothLoRAConfig(rank=2)).fit(
            tiny, dreambooth_lora.DreamBoothLoRAInputs(content_images=[images[0]], content="tree", style="mosaic"),
            runtime),
        lambda: ziplora.ZipLoRA(ziplora.ZipLoRAConfig()).fit(
            tiny, ziplora.ZipLoRAInputs(content_images=[images[0]], style_images=[images[1]], content="tree",
                                        style="mosaic"), runtime),
        lambda: unziplora.UnZipLoRA(UnZipLoRAConfig(rank=2)).fit(
            tiny, unziplora.UnZipLoRAInputs(image=images[0], content="tree", style="mosaic"), runtime),
    ]
    for fit in fits:
        with pytest.raises(_Built):
            fit()
    assert seen == [expected] * 3
