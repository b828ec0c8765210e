"""Textual inversion (registry name ``textual_inversion``): learned token embeddings, frozen model.

Paper: R. Gal, Y. Alaluf, Y. Atzmon, O. Patashnik, A. H. Bermano, G. Chechik, D. Cohen-Or, "An Image
is Worth One Word: Personalizing Text-to-Image Generation using Textual Inversion", ICLR 2023.
It is the baseline of CSD-VAR's ablation (Tab. 2, last row: <c> and <s> learned jointly with
"A photo of a <c> object in <s> style" on the scale-wise model, nothing else).

The placeholder ``<c>`` (content) and/or ``<s>`` (style) gets ``num_vectors`` vectors per text
encoder, initialised from the input words; only they are trained, with the backbone's own training
loss: the denoising loss on SDXL, the teacher-forcing cross-entropy over all scales on the
scale-wise backbones (Infinity, Switti). Each step uses one prompt drawn from the templates
(content: "a photo of a <c>", ...; style: "a painting in the style of <s>", ...; both: the joint
prompt). Files: ``content/learned_embeds.safetensors`` and ``style/learned_embeds.safetensors``
with one key per encoder (SDXL: ``clip_l``, ``clip_g``, what ``load_textual_inversion`` takes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from cstoolkit.backbone import DiffusionBackbone, ScaleWiseBackbone
from cstoolkit.config import field_
from cstoolkit.errors import UserError
from cstoolkit.method import CONTENT_TOKEN, STYLE_TOKEN, Method
from cstoolkit.registry import register_method
from cstoolkit.runtime import TrainState

from ._learned_tokens import (
    EMBEDS_FILE,
    hflip_targets,
    init_vectors,
    learned_for,
    load_token,
    pick,
    scalewise_sample_options,
    token_file,
    warmup_lr,
)
from ._sdxl_lora import per_prompt

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from cstoolkit.backbone import Backbone
    from cstoolkit.decomposition import Decomposition
    from cstoolkit.runtime import Runtime

#: a few of the templates of Gal et al. (their ``imagenet_templates_small`` / ``imagenet_style_templates_small``)
CONTENT_TEMPLATES = ["a photo of a <c>", "a rendering of a <c>", "a cropped photo of the <c>", "the photo of a <c>",
                     "a close-up photo of a <c>", "a good photo of a <c>", "a photo of one <c>", "A <c>"]
STYLE_TEMPLATES = ["a painting in the style of <s>", "a rendering in the style of <s>", "a picture in the style of <s>",
                   "a good painting in the style of <s>", "a rendition in the style of <s>", "an image in <s> style"]


@dataclass
class TextualInversionConfig:
    """Hyper-parameters. ``None`` = the family's default: on the scale-wise backbones CSD-VAR's baseline
    (the paper's Sec. 4 and Tab. 2 last row, run with the official CSD-VAR code's optimiser: AdamW
    β 0.9/0.95, weight decay 0.05, lr 1e-2, 50 warm-up steps, flips, the step-150 checkpoint); on SDXL
    Gal et al. (Adam, lr 5e-3, 500 steps here)."""

    learn: list[str] = field_(["content", "style"], help="tokens to learn: content (<c>), style (<s>) or both")
    steps: int | None = field_(None, min=1, help="optimisation steps (batch 1); default scale-wise 151 "
                                                 "(CSD-VAR benchmark: step 150 of 200), SDXL 500")
    lr: float | None = field_(None, min=0.0, help="peak learning rate; default scale-wise 1e-2 (CSD-VAR), "
                                                  "SDXL 5e-3 (Gal et al.)")
    num_vectors: int = field_(4, min=1, help="vectors per token (Gal et al.: 1; CSD-VAR baseline: 4)")
    init: Literal["first_subtoken", "mean"] = field_(
        "first_subtoken", help="init from the first sub-token of each word (Gal et al., CSD-VAR) or their mean")
    betas: list[float] | None = field_(None, min=0.0, max=1.0,
                                       help="Adam(W) betas; default scale-wise [0.9, 0.95], SDXL [0.9, 0.999]")
    weight_decay: float | None = field_(None, min=0.0, help="decoupled weight decay; default scale-wise 0.05, SDXL 0")
    warmup_steps: int | None = field_(None, min=0, help="lr warm-up from 0.5 %; default scale-wise 50, SDXL 0")
    hflip: bool | None = field_(None, help="mirror the image at random each step; default scale-wise on, SDXL off")
    content_templates: list[str] = field_(CONTENT_TEMPLATES, help="prompts with <c> when only <c> is learned")
    style_templates: list[str] = field_(STYLE_TEMPLATES, help="prompts with <s> when only <s> is learned")
    joint_prompt: str = field_("A photo of a <c> object in <s> style",
                               help="prompt when both are learned (CSD-VAR's baseline, Sec. 4)")

    def resolved(self, scalewise: bool) -> dict[str, Any]:
        """steps, lr, betas, weight_decay, warmup_steps, hflip with the family's defaults filled in."""
        base = ({"steps": 151, "lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.05, "warmup_steps": 50,
                 "hflip": True} if scalewise else
                {"steps": 500, "lr": 5e-3, "betas": [0.9, 0.999], "weight_decay": 0.0, "warmup_steps": 0,
                 "hflip": False})
        out = {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in base.items()}
        if len(out["betas"]) != 2:
            raise UserError("params.betas", f"{out['betas']}", "expected two numbers, e.g. [0.9, 0.95]")
        return out


@dataclass
class TextualInversionInputs:
    """``inputs:`` of a recipe: the image and the words the tokens start from."""

    image: str = field(metadata={"path": True, "image": True, "help": "the image to invert"})
    content: str = field(default="object", metadata={"help": "initial word of <c>, e.g. 'balloon'"})
    style: str = field(default="painting", metadata={"help": "initial word of <s>, e.g. 'watercolor'"})


@dataclass
class TextualInversionGenerate:
    """Sampling options: SDXL uses steps/guidance_scale/height/width, scale-wise backbones cfg/tau/top_k/top_p."""

    steps: int = field_(30, min=1, help="denoising steps (SDXL)")
    guidance_scale: float = field_(7.0, min=0.0, help="classifier-free guidance (SDXL)")
    height: int | None = field_(None, min=64, help="SDXL; default the backbone resolution")
    width: int | None = field_(None, min=64, help="SDXL; default the backbone resolution")
    negative_prompt: str | None = field_(None, help="SDXL: what the guidance steers away from")
    cfg: float | None = field_(None, min=0.0, help="scale-wise: guidance on the logits (None = backbone default)")
    tau: float | None = field_(None, min=1e-3, help="scale-wise: temperature")
    top_k: int | None = field_(None, min=0, help="scale-wise: top-k")
    top_p: float | None = field_(None, min=0.0, max=1.0, help="scale-wise: top-p")
    resolution: int | None = field_(None, min=16, help="scale-wise: image side; default the backbone's")


ROLE_TOKEN = {"content": CONTENT_TOKEN, "style": STYLE_TOKEN}


@register_method
class TextualInversion(Method):
    """Textual inversion of <c> and/or <s> on SDXL or a scale-wise backbone (CSD-VAR's baseline)."""

    name: ClassVar[str] = "textual_inversion"
    summary: ClassVar[str] = "Textual inversion: learned <c>/<s> token embeddings, frozen model (SDXL, scale-wise)"
    paper: ClassVar[str] = "R. Gal et al., An Image is Worth One Word (Textual Inversion), ICLR 2023"
    family: ClassVar[str] = "diffusion|scalewise"
    families: ClassVar[tuple[str, ...]] = ("diffusion", "scalewise")
    Config: ClassVar[type] = TextualInversionConfig
    Inputs: ClassVar[type] = TextualInversionInputs
    GenerateConfig: ClassVar[type] = TextualInversionGenerate

    config: TextualInversionConfig

    def roles(self) -> list[str]:
        roles = list(dict.fromkeys(self.config.learn))
        bad = [r for r in roles if r not in ROLE_TOKEN]
        if bad or not roles:
            raise UserError("params.learn", f"{self.config.learn}", "expected a non-empty list of content, style")
        return roles

    def templates(self) -> list[str]:
        """Prompts drawn from during training (each must contain the learned placeholders)."""
        roles = self.roles()
        cfg = self.config
        if len(roles) == 2:
            prompts, where = [cfg.joint_prompt], "params.joint_prompt"
        elif roles == ["content"]:
            prompts, where = list(cfg.content_templates), "params.content_templates"
        else:
            prompts, where = list(cfg.style_templates), "params.style_templates"
        for p in prompts:
            for r in roles:
                if ROLE_TOKEN[r] not in p:
                    raise UserError(where, f"'{p}' has no {ROLE_TOKEN[r]}",
                                    f"every prompt must contain {ROLE_TOKEN[r]}")
        if not prompts:
            raise UserError(where, "no prompt", "expected at least one template")
        return prompts

    # ------------------------------------------------------------------ fit
    def fit(self, backbone: "Backbone", inputs: TextualInversionInputs, runtime: "Runtime") -> "Decomposition":
        """Learn the token vectors from the image; every backbone weight stays frozen."""
        trainer = TextualInversionTrainer(self, backbone, inputs, runtime)
        loop = runtime.train_loop("textual_inversion", trainer.hp["steps"], trainer.state)
        for step in loop:
            loop.log(loss=trainer.step(step).item())
        return trainer.decomposition()

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        backbone: "Backbone",
        decomposition: "Decomposition",
        prompts: Sequence[str],
        use: str,
        *,
        num_images: int = 1,
        seed: int = 0,
        options: Any = None,
        progress: bool = True,
    ) -> list[list["Image.Image"]]:
        """``num_images`` images per prompt with the learned tokens spliced into the prompt."""
        opts: TextualInversionGenerate = options or TextualInversionGenerate()
        self.check_prompts(prompts, use, f"generate.{use}")
        tokens = {CONTENT_TOKEN: load_token(decomposition.files, "content", backbone),
                  STYLE_TOKEN: load_token(decomposition.files, "style", backbone)}
        for token in self.required_placeholders(use):
            if tokens[token] is None:
                raise UserError(f"generate.{use}", f"this decomposition has no learned {token}",
                                f"expected prompts with the learned tokens only ({decomposition.meta.get('learn')})")
        if isinstance(backbone, DiffusionBackbone):
            return self._sample_sdxl(backbone, prompts, tokens, num_images, seed, opts, progress)
        assert isinstance(backbone, ScaleWiseBackbone)
        out = []
        for prompt in prompts:
            text = backbone.encode_text([prompt] * num_images, learned=learned_for([prompt], tokens) or None)
            images = backbone.generate(text, seed=seed, schedule=backbone.scale_schedule(opts.resolution),
                                       progress=progress, **scalewise_sample_options(opts))
            out.append([im for im in images if im is not None])
        return out

    @staticmethod
    def _sample_sdxl(backbone: DiffusionBackbone, prompts: Sequence[str], tokens: dict[str, Any], num_images: int,
                     seed: int, opts: TextualInversionGenerate, progress: bool) -> list[list["Image.Image"]]:
        """SDXL pipeline from our prompt embeddings; image ``i`` of a prompt from a CPU generator seeded
        ``seed + i``, :meth:`DiffusionBackbone.sample_batch` images (of any prompts) at a time."""
        with torch.no_grad():
            conds = [backbone.encode_prompt([p], learned=learned_for([p], tokens) or None) for p in prompts]
            neg = backbone.encode_prompt([opts.negative_prompt or ""])
        pipe = backbone.pipeline()
        pipe.set_progress_bar_config(disable=not progress, leave=False)
        height, width = opts.height or backbone.resolution, opts.width or backbone.resolution
        rows = [(k, i) for k in range(len(prompts)) for i in range(num_images)]
        batch = backbone.sample_batch(height, width)
        images: list[Image.Image] = []
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            n = len(chunk)
            out = pipe(prompt_embeds=torch.cat([conds[k].prompt_embeds for k, _ in chunk]),
                       pooled_prompt_embeds=torch.cat([conds[k].pooled for k, _ in chunk]),
                       negative_prompt_embeds=neg.prompt_embeds.expand(n, -1, -1),
                       negative_pooled_prompt_embeds=neg.pooled.expand(n, -1),
                       generator=[torch.Generator("cpu").manual_seed(seed + i) for _, i in chunk],
                       num_inference_steps=opts.steps, guidance_scale=opts.guidance_scale, height=height,
                       width=width, output_type="pil")
            images.extend(out.images)
        return per_prompt(images, num_images)


class TextualInversionTrainer:
    """What a textual-inversion fit holds (tokens, optimiser, training images) and one step."""

    def __init__(self, method: TextualInversion, backbone: "Backbone", inputs: TextualInversionInputs,
                 runtime: "Runtime"):
        from cstoolkit.io import image_to_tensor, load_image

        cfg = self.cfg = method.config
        self.method, self.backbone, self.runtime = method, backbone, runtime
        backbone.freeze()
        self.roles = method.roles()
        self.templates = method.templates()
        self.words = {"content": inputs.content, "style": inputs.style}
        hp = self.hp = cfg.resolved(isinstance(backbone, ScaleWiseBackbone))
        self.tokens = {r: init_vectors(backbone, self.words[r], cfg.num_vectors, f"inputs.{r}", cfg.init)
                       for r in self.roles}
        params = {f"{r}.{k}": v for r in self.roles for k, v in self.tokens[r].items()}
        betas = (hp["betas"][0], hp["betas"][1])
        self.opt = (torch.optim.AdamW(list(params.values()), lr=hp["lr"], betas=betas, weight_decay=hp["weight_decay"])
                    if hp["weight_decay"] else torch.optim.Adam(list(params.values()), lr=hp["lr"], betas=betas))
        self.gen = runtime.generator(11)
        self.state = TrainState(params=params, optimizers={"adam": self.opt}, generators={"prompts": self.gen})
        image = load_image(inputs.image, "inputs.image")
        self.noise_gen: torch.Generator | None = None
        if isinstance(backbone, DiffusionBackbone):
            pixels = image_to_tensor(image, (backbone.resolution, backbone.resolution))[None].to(backbone.device)
            self.sources = [backbone.encode_images(pixels)]
            if hp["hflip"]:
                self.sources.append(backbone.encode_images(torch.flip(pixels, dims=[-1])))
            self.noise_gen = runtime.generator(12, device=backbone.device)
            self.state.generators["noise"] = self.noise_gen
        elif isinstance(backbone, ScaleWiseBackbone):
            schedule = backbone.scale_schedule()
            pixels = image_to_tensor(image, backbone.image_size(schedule))[None].to(backbone.device)
            self.sources = hflip_targets(backbone, pixels, schedule, hp["hflip"])
        else:  # pragma: no cover - the recipe check allows only these families
            raise TypeError(f"textual_inversion does not run on {type(backbone).__name__}")

    def loss(self) -> torch.Tensor:
        """The loss of one step: a template and a training image drawn, the learned tokens spliced in."""
        backbone, runtime = self.backbone, self.runtime
        prompt = self.templates[int(torch.randint(len(self.templates), (1,), generator=self.gen))]
        source = pick(self.sources, self.gen)
        learned = {ROLE_TOKEN[r]: self.tokens[r] for r in self.roles}
        if isinstance(backbone, DiffusionBackbone):
            cond = backbone.encode_prompt([prompt], learned=learned)
            with runtime.autocast():
                return backbone.training_loss(source, cond, generator=self.noise_gen)
        assert isinstance(backbone, ScaleWiseBackbone)
        text = backbone.encode_text([prompt], learned=learned)
        with runtime.autocast():
            logits = backbone.teacher_forcing_logits(text, source)
        return backbone.teacher_forcing_loss(logits, source)

    def step(self, step: int) -> torch.Tensor:
        """One optimisation step (warm-up learning rate); returns the loss (not synchronised)."""
        loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in self.opt.param_groups:
            group["lr"] = warmup_lr(step, self.hp["lr"], self.hp["warmup_steps"])
        self.opt.step()
        return loss.detach()

    def decomposition(self) -> "Decomposition":
        """The learned tokens as a decomposition."""
        from cstoolkit.decomposition import Decomposition

        files = {f"{r}/{EMBEDS_FILE}": token_file(self.tokens[r]) for r in self.roles}
        placeholders = {ROLE_TOKEN[r]: self.words[r] for r in self.roles}
        meta = {"learn": self.roles, "templates": self.templates,
                "encoders": self.backbone.text_encoders(),  # type: ignore[attr-defined]
                "hyper": self.hp}
        return Decomposition(method=self.method.name, files=files, placeholders=placeholders, meta=meta)
