"""DreamBooth-LoRA: separate content and style LoRAs (Ruiz et al., CVPR 2023, with LoRA, Hu et al. 2021).

The baseline every content-style paper compares with. Two independent LoRAs are trained with the
DreamBooth reconstruction loss (the denoising loss, no prior preservation):

* the content LoRA on the content image(s) with the trigger phrase "A <c>";
* the style LoRA on the style image(s) with "A <c> in <s> style" — as in UnZipLoRA's comparison
  (Sec. 4.3), where both are learned from the same image. With separate style images the <c> of
  that prompt is what the style images show (``inputs.style_subject``).

Content alone, style alone, or both added (``set_adapters``) at generation. The trainer here,
:class:`DreamBoothLoRATrainer`, is the plain one-LoRA step B-LoRA and ZipLoRA also use.

On the scale-wise backbones (Infinity, Switti) the same two LoRAs sit on the transformer's attention
projections (optionally its FFN) and train with the teacher-forcing cross-entropy over all scales;
they are saved in PEFT's layout with the official module names (``methods/_scalewise_lora.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from cstoolkit.backbone import Backbone, DiffusionBackbone, ScaleWiseBackbone
from cstoolkit.compile import CompiledForward
from cstoolkit.cuda_graph import graph_steps, on_capture_stream
from cstoolkit.decomposition import Decomposition
from cstoolkit.lora import LoRASet
from cstoolkit.method import CONTENT_TOKEN, STYLE_TOKEN, Method
from cstoolkit.registry import register_method
from cstoolkit.runtime import Runtime, TrainState

from ._scalewise_lora import (
    LoRAGenerateConfig,
    ScaleWiseLoRATrainer,
    adapter_file,
    load_target,
    role_loras,
    sample_scalewise,
)
from ._sdxl_lora import (
    LORA_FILE,
    StaticBatch,
    TrainingImages,
    compiled_step,
    compiled_unet,
    drop_step_tensors,
    generate_with_loras,
    target_linears,
    unload_loras,
)

ADAPTER = "lora"


@dataclass
class DreamBoothLoRAConfig:
    """Hyper-parameters; defaults are the LoRA settings of ZipLoRA (Sec. 5), the diffusers DreamBooth-LoRA
    SDXL script's optimiser (AdamW, weight decay 1e-4, gradient norm clipped at 1) and PEFT's init."""

    rank: int = field(default=64, metadata={"min": 1})
    lr: float = field(default=5e-5, metadata={"min": 0.0, "help": "AdamW learning rate"})
    steps: int = field(default=1000, metadata={"min": 1, "help": "steps per LoRA (batch 1)"})
    weight_decay: float = field(default=1e-4, metadata={"min": 0.0})
    max_grad_norm: float = field(default=1.0, metadata={"min": 0.0, "help": "0 = no clipping"})
    init_std: float | None = field(default=None, metadata={"help": "std of the down projection's normal init; "
                                                                    "default 1/rank (the up projection starts at 0)"})
    content_prompt: str = "A {content}"
    style_prompt: str = "A {content} in {style} style"
    ffn: bool = field(default=False, metadata={"help": "scale-wise backbones: also adapt the FFN layers "
                                                       "(default: attention q/k/v/out only)"})


@dataclass
class DreamBoothLoRAInputs:
    """Content image(s) with a class word, a style description and, optionally, separate style image(s)."""

    content_images: list[str] = field(default_factory=list, metadata={"path": True, "image": True})
    content: str = field(default="", metadata={"help": "class word of the subject, e.g. 'dog'"})
    style: str = field(default="", metadata={"help": "short style description, e.g. 'watercolor painting'"})
    style_images: list[str] = field(default_factory=list, metadata={
        "path": True, "image": True, "help": "default: the content images (one image holds both, as in UnZipLoRA)"})
    style_subject: str = field(default="", metadata={
        "help": "what the style images show, the {content} of the style prompt; default <c> when the style is "
                "learned from the content images, else 'picture'"})
    token: str = field(default="sks", metadata={"help": "unique token before the class word"})

    def __post_init__(self) -> None:
        if not self.content_images:
            raise ValueError("inputs.content_images is required (a list of image paths)")
        for name in ("content", "style"):
            if not getattr(self, name):
                raise ValueError(f"inputs.{name} is required")


class DreamBoothLoRATrainer:
    """One LoRA trained with the DreamBooth loss on images with their prompts, batch 1 (round-robin).

    ``step(i)`` returns the losses to log; :meth:`export` gives the diffusers LoRA state dict. The image,
    prompt, noise and timestep of a step are copied into fixed tensors first, so with ``cuda_graph`` the
    step itself is captured once and replayed.
    """

    def __init__(self, backbone: DiffusionBackbone, names: Sequence[str], images: TrainingImages, *, rank: int,
                 lr: float, weight_decay: float = 1e-4, max_grad_norm: float = 1.0, init_std: float | None = None,
                 lora_generator: torch.Generator | None = None, noise: torch.Generator | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 cuda_graph: bool = False, compiler: CompiledForward | None = None):
        self.backbone, self.images, self.max_grad_norm = backbone, images, max_grad_norm
        self.noise = noise if noise is not None else torch.Generator().manual_seed(0)
        self.autocast = autocast
        cuda = backbone.device.type == "cuda"
        self.loras = LoRASet(backbone.unet, names, rank, (ADAPTER,), init="gaussian_a", init_std=init_std,
                             generator=lora_generator, merge=cuda).inject()
        self.params = [p for bank in self.loras.banks.values() for p in (bank.lora_A, bank.lora_B)]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, capturable=cuda_graph,
                                           fused=cuda or None)
        self.dtype = backbone.weight_dtype
        self.batch = StaticBatch(backbone, *images.pick(0))
        self._train = graph_steps(cuda_graph, {"train": compiled_step(compiler, self._train_step)},
                                  before_capture=lambda: drop_step_tensors(self.loras, self.optimizer))["train"]

    def state(self) -> TrainState:
        banks = self.loras.banks.items()
        return TrainState(params={**{f"lora.{k}.A": b.lora_A for k, b in banks},
                                  **{f"lora.{k}.B": b.lora_B for k, b in banks}},
                          optimizers={"adamw": self.optimizer}, generators={"noise": self.noise})

    def step(self, step: int) -> dict[str, Any]:
        with on_capture_stream(self._train):
            self.batch.fill(*self.images.pick(step), self.noise)
            return self._train()

    def _train_step(self) -> dict[str, torch.Tensor]:
        # DreamBooth (Ruiz et al. Eq. 1, no prior term): E ||ε̂(z_t | c, t) − ε||² on image step mod n
        self.loras.prepare(self.dtype)
        with self.autocast():
            loss = self.batch.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        return {"loss": loss.detach()}

    def export(self) -> dict[str, torch.Tensor]:
        return self.loras.export(ADAPTER)


def run_stage(runtime: Runtime, stage: str, steps: int, trainer: Any) -> None:
    """One resumable training stage of ``trainer`` (``state()``, ``step(i)``, ``loras``); afterwards, also on an
    error, its captured CUDA graphs freed (``release()``, where it has one) and its adapters removed from the
    model."""
    loop = runtime.train_loop(stage, steps, trainer.state())
    try:
        for step in loop:
            loop.log(**trainer.step(step))
    finally:
        release = getattr(trainer, "release", None)
        if release is not None:
            release()
        trainer.loras.remove()


def train_lora(runtime: Runtime, stage: str, steps: int, trainer: DreamBoothLoRATrainer
               ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Run one resumable training stage; the LoRA (diffusers layout) and its safetensors metadata."""
    run_stage(runtime, stage, steps, trainer)
    return trainer.export(), trainer.loras.diffusers_metadata()


@register_method
class DreamBoothLoRA(Method):
    """Separate content and style LoRAs trained with DreamBooth (SDXL, Infinity, Switti)."""

    name = "dreambooth_lora"
    summary = "Baseline: separate content and style LoRAs trained with DreamBooth ('A <c>', 'A <c> in <s> style')"
    paper = "Ruiz et al., DreamBooth, CVPR 2023 + Hu et al., LoRA, ICLR 2022 (baseline of ZipLoRA / UnZipLoRA)"
    family = "diffusion|scalewise"
    families = ("diffusion", "scalewise")
    Config = DreamBoothLoRAConfig
    Inputs = DreamBoothLoRAInputs
    GenerateConfig = LoRAGenerateConfig

    config: DreamBoothLoRAConfig

    def placeholders(self, inputs: DreamBoothLoRAInputs) -> dict[str, str]:
        return {CONTENT_TOKEN: f"{inputs.token} {inputs.content}".strip(), STYLE_TOKEN: inputs.style}

    def training_prompts(self, inputs: DreamBoothLoRAInputs) -> dict[str, str]:
        """{"content": "A <c>", "style": "A <c> in <s> style"} with the placeholders expanded."""
        ph = self.placeholders(inputs)
        subject = inputs.style_subject or (ph[CONTENT_TOKEN] if not inputs.style_images else "picture")
        return {"content": self.config.content_prompt.format(content=ph[CONTENT_TOKEN]),
                "style": self.config.style_prompt.format(content=subject, style=ph[STYLE_TOKEN])}

    def sources(self, inputs: DreamBoothLoRAInputs) -> dict[str, tuple[str, list[str]]]:
        """Per role, the inputs field and the image paths its LoRA trains on."""
        style_field = "style_images" if inputs.style_images else "content_images"
        return {"content": ("content_images", inputs.content_images),
                "style": (style_field, inputs.style_images or inputs.content_images)}

    def fit(self, backbone: Backbone, inputs: DreamBoothLoRAInputs, runtime: Runtime) -> Decomposition:
        if isinstance(backbone, ScaleWiseBackbone):
            return self.fit_scalewise(backbone, inputs, runtime)
        assert isinstance(backbone, DiffusionBackbone)
        cfg = self.config
        unload_loras(backbone)
        prompts = self.training_prompts(inputs)
        sources = self.sources(inputs)
        images = {role: TrainingImages.encode(backbone, paths, [prompts[role]] * len(paths),
                                              [f"inputs.{fname}[{i}]" for i in range(len(paths))])
                  for role, (fname, paths) in sources.items()}
        names = target_linears(backbone)
        files, file_metadata = {}, {}
        with compiled_unet(backbone, runtime, steps=2 * cfg.steps, label=self.name) as compiler:
            for offset, role in ((1, "content"), (3, "style")):
                trainer = DreamBoothLoRATrainer(backbone, names, images[role], rank=cfg.rank, lr=cfg.lr,
                                                weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                                                init_std=cfg.init_std, lora_generator=runtime.generator(offset),
                                                noise=runtime.generator(offset + 1),
                                                autocast=runtime.autocast_for(backbone.unet),
                                                cuda_graph=runtime.use_cuda_graph, compiler=compiler)
                rel = f"{role}/{LORA_FILE}"
                files[rel], file_metadata[rel] = train_lora(runtime, role, cfg.steps, trainer)
        return Decomposition(method=self.name, files=files, placeholders=self.placeholders(inputs),
                             meta={"training_prompts": prompts, "target_modules": len(names), "steps": cfg.steps},
                             file_metadata=file_metadata)

    def fit_scalewise(self, backbone: ScaleWiseBackbone, inputs: DreamBoothLoRAInputs, runtime: Runtime
                      ) -> Decomposition:
        """The two LoRAs on a scale-wise transformer, each trained with the teacher-forcing cross-entropy."""
        cfg = self.config
        backbone.freeze()
        prompts = self.training_prompts(inputs)
        names = backbone.adapter_targets(ffn=cfg.ffn)
        files, file_metadata = {}, {}
        for offset, (role, (fname, paths)) in zip((1, 3), self.sources(inputs).items()):
            targets = [load_target(backbone, p, f"inputs.{fname}[{i}]") for i, p in enumerate(paths)]
            with torch.no_grad():
                text = backbone.encode_text([prompts[role]])
            trainer = ScaleWiseLoRATrainer(backbone, names, targets, [text] * len(targets), adapter=role,
                                           rank=cfg.rank, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           max_grad_norm=cfg.max_grad_norm, init_std=cfg.init_std,
                                           lora_generator=runtime.generator(offset), autocast=runtime.autocast,
                                           cuda_graph=runtime.use_cuda_graph)
            run_stage(runtime, role, cfg.steps, trainer)
            rel = adapter_file(role)
            files[rel], file_metadata[rel] = trainer.export()
        return Decomposition(method=self.name, files=files, placeholders=self.placeholders(inputs),
                             meta={"training_prompts": prompts, "target_modules": len(names), "steps": cfg.steps,
                                   "layout": "peft"},
                             file_metadata=file_metadata)

    def generate(self, backbone: Backbone, decomposition: Decomposition, prompts: Sequence[str], use: str,
                 *, num_images: int = 1, seed: int = 0, options: Any = None, progress: bool = True) -> list[list[Any]]:
        if isinstance(backbone, ScaleWiseBackbone):
            return sample_scalewise(backbone, role_loras(decomposition.files, use), prompts,
                                    decomposition.placeholders, num_images=num_images, seed=seed,
                                    options=options or LoRAGenerateConfig(), progress=progress)
        assert isinstance(backbone, DiffusionBackbone)
        return generate_with_loras(backbone, decomposition, prompts, use, num_images=num_images, seed=seed,
                                   options=options, progress=progress)
