"""Shared fixtures: a toy backbone and method that exercise the core without a real model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image

from cstoolkit.backbone import Backbone, BackboneConfig
from cstoolkit.decomposition import Decomposition
from cstoolkit.io import load_image
from cstoolkit.method import Method, expand_placeholders
from cstoolkit.registry import register_backbone, register_method
from cstoolkit.runtime import TrainState

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "balloon.png"


def load_script(relpath: str):
    """The module of a script outside the package (e.g. ``benchmarks/world_device/vae_gate.py``), for its tests."""
    import importlib.util

    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class ToyConfig(BackboneConfig):
    width: int = 4


@register_backbone
class ToyBackbone(Backbone):
    name = "toy"
    family = "toy"
    Config = ToyConfig
    presets = {"tiny": "a 4-wide linear map"}

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(config.width, config.width, generator=g))

    @classmethod
    def from_config(cls, config, *, device="cpu", dtype=None):
        return cls(config).to(device)


@dataclass
class ToyParams:
    steps: int = field(default=10, metadata={"min": 1})
    lr: float = 0.1
    nan_at: int = -1


@dataclass
class ToyInputs:
    image: str = field(default="", metadata={"path": True, "image": True})
    content: str = "balloon"
    style: str = "flat"


@dataclass
class ToyGenerate:
    brightness: int = field(default=128, metadata={"min": 0, "max": 255})


@register_method
class ToyMethod(Method):
    """Fits a vector to noisy targets; images are flat colours derived from it."""

    name = "toy"
    summary = "test method"
    paper = "none"
    family = "toy"
    Config = ToyParams
    Inputs = ToyInputs
    GenerateConfig = ToyGenerate

    def fit(self, backbone, inputs, runtime):
        load_image(inputs.image)
        vec = torch.nn.Parameter(torch.zeros(backbone.config.width))
        opt = torch.optim.Adam([vec], lr=self.config.lr)
        gen = runtime.generator(1)
        state = TrainState(params={"vec": vec}, optimizers={"adam": opt}, generators={"noise": gen})
        loop = runtime.train_loop("toy", self.config.steps, state)
        for step in loop:
            target = torch.randn(backbone.config.width, generator=gen) + torch.randn(1)  # global RNG too
            loss = ((backbone.weight.detach() @ vec - target) ** 2).mean()
            if step == self.config.nan_at:
                loss = loss * float("nan")
            opt.zero_grad()
            loss.backward()
            opt.step()
            loop.log(loss=loss.item())
        return Decomposition(method=self.name, files={"toy/vec.safetensors": {"vec": vec.detach().clone()}},
                             placeholders={"<c>": inputs.content, "<s>": inputs.style},
                             file_metadata={"toy/vec.safetensors": {  # several keys: their order must not vary
                                 "format": "pt", "content": inputs.content, "style": inputs.style,
                                 "steps": str(self.config.steps), "lr": str(self.config.lr)}})

    def generate(self, backbone, decomposition, prompts, use, *, num_images=1, seed=0, options=None, progress=True):
        out = []
        for p in prompts:
            text = expand_placeholders(p, decomposition.placeholders)
            value = (options.brightness + len(text) + seed) % 256
            out.append([Image.new("RGB", (64, 64), (value, i * 10 % 256, 0)) for i in range(num_images)])
        return out


def toy_recipe(tmp_path: Path, **sections) -> dict:
    recipe = {
        "method": "toy",
        "backbone": {"name": "toy", "preset": "tiny"},
        "inputs": {"image": str(EXAMPLE)},
        "params": {"steps": 6},
        "generate": {"content": ["A <c> on the beach"], "both": ["A <c> in <s> style"], "num_images": 2},
        "runtime": {"output_dir": str(tmp_path / "run"), "progress": False, "device": "cpu"},
    }
    for k, v in sections.items():
        recipe[k] = {**recipe.get(k, {}), **v} if isinstance(v, dict) else v
    return recipe


@pytest.fixture
def example_image() -> Path:
    return EXAMPLE


# --------------------------------------------------------------------------- shared by model tests
def fit_on(data: dict, backbone, *, resume: bool = False):
    """Method.fit on a shared backbone: what Decomposer.fit does, without building another backbone."""
    from cstoolkit.recipe import load_recipe
    from cstoolkit.runtime import Runtime

    r = load_recipe(data)
    method = r.method_cls(r.params)
    dec = method.fit(backbone, r.inputs, Runtime(r.runtime, resume=resume))
    dec.recipe = r.to_dict()
    return dec.bind(method, backbone)


@pytest.fixture(scope="module")
def backbone():
    """The tiny SDXL, frozen, built once per test module."""
    from cstoolkit.backbones.sdxl import SDXLBackbone, SDXLConfig

    bb = SDXLBackbone.from_config(SDXLConfig(preset="tiny"))
    bb.freeze()
    return bb


@pytest.fixture(scope="module")
def single_thread():
    """The tiny models are too small to gain from threads, and spinning threads suffer on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_targets(backbone, seed: int):
    """Teacher-forcing targets of a random image (uniform in [-1, 1], drawn from ``seed``) at the scale-wise
    backbone's own schedule."""
    schedule = backbone.scale_schedule()
    h, w = backbone.image_size(schedule)
    images = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return backbone.image_to_targets(images, schedule)


def logits_with_lora(backbone, state: dict[str, torch.Tensor] | None, text, targets) -> list[torch.Tensor]:
    """A scale-wise backbone's teacher-forcing logits (no grad) with one PEFT-layout LoRA added through cstoolkit's
    banks (``None``: the base model); lower ranks are zero-padded to the highest."""
    from cstoolkit.lora import LoRASet, lora_state_dict_to_layers
    from cstoolkit.methods._scalewise_lora import PEFT_PREFIX

    loras = None
    if state is not None:
        layers = lora_state_dict_to_layers(state, PEFT_PREFIX)
        rank = max(int(a.shape[0]) for a, _ in layers.values())
        loras = LoRASet(backbone.lora_model(), sorted(layers), rank, ("x",), init="zeros", prefix=PEFT_PREFIX).inject()
        for bank in loras.banks.values():
            bank.load("x", layers)
        loras.prepare(torch.float32)
    try:
        with torch.no_grad():
            return backbone.teacher_forcing_logits(text, targets)
    finally:
        if loras is not None:
            loras.remove()


@pytest.fixture(scope="module", params=["infinity", "switti"])
def tiny_scalewise(request, single_thread):
    """Each scale-wise backbone's tiny preset (random from its seed), frozen; one per test module."""
    from cstoolkit.registry import backbones

    cls = backbones()[request.param]
    backbone = cls.from_config(cls.Config(preset="tiny"))
    backbone.freeze()
    return backbone
