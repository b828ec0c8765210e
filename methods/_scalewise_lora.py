"""Pieces shared by the LoRA methods on scale-wise backbones (Infinity, Switti; not a method: skipped by discovery).

The adapters are the same :class:`cstoolkit.lora.LoRASet` banks as on SDXL, on the layers the backbone
names (:meth:`ScaleWiseBackbone.adapter_targets`, official module names). The loss is the backbone's
teacher-forcing cross-entropy over all scales. A LoRA is saved in PEFT's layout:
``<role>/adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A/B.weight``) with
``<role>/adapter_config.json`` beside it, so ``PeftModel.from_pretrained(transformer, "<role>")`` (or
``inject_adapter_in_model`` + ``set_peft_model_state_dict``) loads it into our transformer or the
official model class, whose module names are the same.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from cstoolkit.backbone import ScaleTargets, ScaleWiseBackbone, StepCall, TextContext
from cstoolkit.config import field_
from cstoolkit.cuda_graph import GraphedStep, cuda_graphs_available, graph_steps, on_capture_stream, release_graphs
from cstoolkit.decomposition import SIDECAR
from cstoolkit.io import image_to_tensor, load_image
from cstoolkit.lora import LoRASet, lora_state_dict_to_layers
from cstoolkit.method import GenerateConfig, expand_placeholders
from cstoolkit.runtime import TrainState

from ._learned_tokens import scalewise_sample_options
from ._sdxl_lora import drop_step_tensors

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
#: key prefix of PEFT's saved adapters (``PeftModel.save_pretrained``)
PEFT_PREFIX = "base_model.model"


def peft_metadata(state: Mapping[str, torch.Tensor], base_model: str = "") -> dict[str, str]:
    """safetensors metadata of a LoRA state dict (PEFT keys) carrying its ``adapter_config.json``
    (written beside it by :meth:`Decomposition.save`): rank, alpha = rank (scale 1), target modules."""
    layers = lora_state_dict_to_layers(dict(state), PEFT_PREFIX)
    ranks = {name: int(a.shape[0]) for name, (a, _) in layers.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    pattern = {name: k for name, k in sorted(ranks.items()) if k != r}
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model or None,
              "r": r, "lora_alpha": r, "target_modules": sorted(layers), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "init_lora_weights": True, "rank_pattern": pattern, "alpha_pattern": pattern}
    return {"format": "pt", SIDECAR + CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True)}


def adapter_file(role: str) -> str:
    return f"{role}/{ADAPTER_FILE}"


def load_target(backbone: ScaleWiseBackbone, path: str, where: str) -> ScaleTargets:
    """Teacher-forcing targets of one training image at the backbone's own schedule."""
    schedule = backbone.scale_schedule()
    pixels = image_to_tensor(load_image(path, where), backbone.image_size(schedule))[None].to(backbone.device)
    with torch.no_grad():
        return backbone.image_to_targets(pixels, schedule)


def token_scales(schedule: Sequence[tuple[int, int]], device: torch.device | str | None = None) -> torch.Tensor:
    """(L,) scale index of every token of a teacher-forcing pass over ``schedule``."""
    sizes = torch.tensor([h * w for h, w in schedule], device=device)
    return torch.repeat_interleave(torch.arange(len(schedule), device=device), sizes)


def group_weights(schedule: Sequence[tuple[int, int]], groups: Sequence[Sequence[int]],
                  device: torch.device | str | None = None) -> torch.Tensor:
    """(1, L, k): 1 where a token's scale is in ``groups[j]`` (one column per adapter), else 0."""
    scales = token_scales(schedule, device)
    cols = [torch.isin(scales, torch.tensor(list(g), device=device)).float() for g in groups]
    return torch.stack(cols, dim=-1)[None]


class StaticPair:
    """A training pair (teacher-forcing targets, text) in fixed tensors that the step reads, so that the
    step can be captured once as a CUDA graph and replayed for every pair of the same shapes: pairs are
    copied in before their step (:meth:`fill`). A slot used by one pair only holds that pair's own tensors
    (nothing is copied)."""

    def __init__(self, targets: ScaleTargets, text: TextContext, shared: bool):
        """``shared``: several pairs use this slot (its tensors are copies, filled before each step)."""
        if shared:
            targets, text = targets.clone(), text.clone()
        self.targets, self.text, self.shared = targets, text, shared
        self.holds: int | None = None  # index of the pair the tensors hold now

    @staticmethod
    def signature(targets: ScaleTargets, text: TextContext) -> tuple:
        """What must match for two pairs to share a slot (and a captured step): schedule, shapes, dtypes,
        devices."""
        tensors = [*targets.targets, targets.inputs, text.tokens, text.mask]
        tensors += [] if text.pooled is None else [text.pooled]
        return (tuple(tuple(s) for s in targets.schedule), text.pooled is None,
                tuple((tuple(t.shape), t.dtype, str(t.device)) for t in tensors))

    def fill(self, index: int, targets: ScaleTargets, text: TextContext) -> None:
        """Copy pair ``index`` in (nothing to do if the slot holds it already or is its own)."""
        if self.holds == index or not self.shared:
            self.holds = index
            return
        self.targets.copy_(targets)
        self.text.copy_(text)
        self.holds = index


class ScaleWiseLoRATrainer:
    """One LoRA trained with the teacher-forcing cross-entropy on images with their prompts, batch 1
    (round-robin): the scale-wise counterpart of ``DreamBoothLoRATrainer``.

    ``cuda_graph`` (CUDA only; a no-op elsewhere): the step is captured once as a CUDA graph and replayed.
    The pairs are grouped by shape (:class:`StaticPair`): pairs of the same shapes (the usual case: the
    images at the backbone's schedule, one prompt) share one slot of fixed tensors, copied into before
    their step, and one captured step, so several images cost one graph's memory, not one each; pairs of
    other shapes (e.g. prompts of another padded length) get a slot and a graph of their own (they share
    one capture stream, :func:`graph_steps`).
    """

    def __init__(self, backbone: ScaleWiseBackbone, names: Sequence[str], targets: Sequence[ScaleTargets],
                 texts: Sequence[TextContext], *, adapter: str, rank: int, lr: float, weight_decay: float = 1e-4,
                 max_grad_norm: float = 1.0, init_std: float | None = None,
                 lora_generator: torch.Generator | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 merge: bool | None = None, cuda_graph: bool = False):
        """``merge``: fold the LoRA into the frozen weights once per step (``LoRASet``; default: on CUDA);
        ``cuda_graph``: capture the step as a CUDA graph (see the class; ignored off CUDA)."""
        if len(targets) != len(texts) or not targets:
            raise ValueError(f"{len(targets)} targets but {len(texts)} texts (one text per target, at least one)")
        self.backbone, self.targets, self.texts = backbone, list(targets), list(texts)
        self.adapter, self.max_grad_norm, self.autocast = adapter, max_grad_norm, autocast
        cuda = backbone.device.type == "cuda"
        self.cuda_graph = cuda_graph and cuda_graphs_available(backbone.device)
        self.loras = LoRASet(backbone.lora_model(), names, rank, (adapter,), init="gaussian_a", init_std=init_std,
                             generator=lora_generator, merge=cuda if merge is None else merge,
                             prefix=PEFT_PREFIX).inject()
        self.params = [p for bank in self.loras.banks.values() for p in (bank.lora_A, bank.lora_B)]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay,
                                           capturable=self.cuda_graph, fused=cuda or None)
        self.dtype = backbone.weight_dtype  # the projections' (the transformer's first parameter may be float32)
        groups: dict[tuple, list[int]] = {}
        for i, (t, x) in enumerate(zip(self.targets, self.texts)):
            groups.setdefault(StaticPair.signature(t, x), []).append(i)
        self.slots: list[StaticPair] = []
        self._slot_of: dict[int, int] = {}
        for j, members in enumerate(groups.values()):
            i = members[0]
            self.slots.append(StaticPair(self.targets[i], self.texts[i], shared=len(members) > 1))
            self._slot_of.update(dict.fromkeys(members, j))
        steps = graph_steps(self.cuda_graph,
                            {str(j): functools.partial(self._train_step, slot) for j, slot in enumerate(self.slots)},
                            before_capture=lambda: drop_step_tensors(self.loras, self.optimizer))
        self._steps = [steps[str(j)] for j in range(len(self.slots))]

    def state(self) -> TrainState:
        banks = self.loras.banks.items()
        return TrainState(params={**{f"lora.{k}.A": b.lora_A for k, b in banks},
                                  **{f"lora.{k}.B": b.lora_B for k, b in banks}},
                          optimizers={"adamw": self.optimizer})

    def step(self, step: int) -> dict[str, float]:
        """Train on pair ``step mod n``; the losses to log (read after the step: one host sync)."""
        return {k: v.item() for k, v in self.run_step(step).items()}

    def run_step(self, step: int) -> dict[str, torch.Tensor]:
        """Train on pair ``step mod n`` without a host sync; detached loss tensors (with ``cuda_graph``, the
        graph's static outputs: read them before the next step)."""
        i = step % len(self.targets)
        j = self._slot_of[i]
        fn = self._steps[j]
        with on_capture_stream(fn):
            self.slots[j].fill(i, self.targets[i], self.texts[i])
            return fn()

    def _train_step(self, slot: StaticPair) -> dict[str, torch.Tensor]:
        """Forward, loss, backward, clipping and AdamW on the pair in ``slot``: no host sync (capturable)."""
        self.loras.prepare(self.dtype)
        with self.autocast():
            logits = self.backbone.teacher_forcing_logits(slot.text, slot.targets)
        loss = self.backbone.teacher_forcing_loss(logits, slot.targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        return {"loss": loss.detach()}

    @property
    def captured(self) -> bool:
        """Whether every pair's step now replays a captured CUDA graph."""
        return all(isinstance(fn, GraphedStep) and fn.captured for fn in self._steps)

    def release(self) -> None:
        """Free the captured steps' graphs and what their pools hold (merged weights, gradients), so the
        memory goes back to the driver: at the end of the stage, before sampling."""
        drop_step_tensors(self.loras, self.optimizer)
        release_graphs(*self._steps)

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        state = self.loras.export(self.adapter)
        return state, peft_metadata(state)


def sample_scalewise(backbone: ScaleWiseBackbone, loras: Mapping[str, Mapping[str, torch.Tensor]],
                     prompts: Sequence[str], placeholders: dict[str, str], *, num_images: int, seed: int,
                     options: Any, progress: bool,
                     scale_gates: Callable[[int], dict[str, dict[str, torch.Tensor]]] | None = None,
                     merge: bool | None = None) -> list[list["Image.Image"]]:
    """Sample every prompt (``num_images`` each, row i from seed + i) with the PEFT-layout LoRAs ``loras``
    (role -> state dict) added to the transformer through cstoolkit's banks.

    ``scale_gates(s)`` -> {role: {layer: (out,) gate}} gives per-column gates for scale ``s`` (refolded
    after every scale; missing layers use 1), e.g. UnZipLoRA's scale separation. ``merge``: fold the LoRAs into
    the frozen weights (default: on CUDA)."""
    roles = tuple(loras)
    layers = {r: lora_state_dict_to_layers(dict(state), PEFT_PREFIX) for r, state in loras.items()}
    names = sorted(set().union(*(set(v) for v in layers.values())))
    if not names:
        raise ValueError("sample_scalewise needs LoRAs that adapt some layer")
    rank = max(int(a.shape[0]) for v in layers.values() for a, _ in v.values())  # lower ranks zero-padded (load)
    model = backbone.lora_model()
    dtype = backbone.weight_dtype  # the frozen projections' (bf16 on a GPU), not the first parameter's (float32)
    lora_set = LoRASet(model, names, rank, roles, init="zeros",
                       merge=backbone.device.type == "cuda" if merge is None else merge,
                       prefix=PEFT_PREFIX).inject()
    try:
        for bank in lora_set.banks.values():
            for role in roles:
                bank.load(role, layers[role])

        def fold(scale: int) -> None:
            given = scale_gates(scale) if scale_gates is not None else {}

            def gates(key: str, bank: Any) -> dict[str, torch.Tensor | None]:
                out: dict[str, torch.Tensor | None] = {}
                for role in roles:
                    own = given.get(role) or {}
                    if not any(n in own for n in bank.names):
                        out[role] = None
                        continue
                    ones = torch.ones(bank.out_features)
                    out[role] = torch.stack([own.get(n, ones).float() for n in bank.names]).to(bank.lora_B.device)
                return out

            with torch.no_grad():
                lora_set.prepare(dtype, gates)

        def refold(call: StepCall) -> None:
            if call.step + 1 < len(call.schedule):
                fold(call.step + 1)

        schedule = backbone.scale_schedule(getattr(options, "resolution", None))
        rows = [(expand_placeholders(prompt, placeholders), i) for prompt in prompts for i in range(num_images)]
        batch = max(num_images, backbone.sample_batch(schedule))  # rows of several prompts at once
        images: list[Any] = []
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            fold(0)
            images += backbone.generate([text for text, _ in chunk], seed=[seed + i for _, i in chunk],
                                        schedule=schedule, progress=progress,
                                        step_hooks=[refold] if scale_gates is not None else [],
                                        **scalewise_sample_options(options))
        return [[im for im in images[k:k + num_images] if im is not None] for k in range(0, len(images), num_images)]
    finally:
        lora_set.remove()


@dataclass
class LoRAGenerateConfig(GenerateConfig):
    """Sampling options of the LoRA methods: SDXL uses steps/guidance_scale/height/width, scale-wise
    backbones cfg/tau/top_k/top_p/resolution (None = the backbone's default)."""

    cfg: float | None = field_(None, min=0.0, help="scale-wise: guidance on the logits")
    tau: float | None = field_(None, min=1e-3, help="scale-wise: temperature")
    top_k: int | None = field_(None, min=0, help="scale-wise: top-k")
    top_p: float | None = field_(None, min=0.0, max=1.0, help="scale-wise: top-p")
    resolution: int | None = field_(None, min=16, help="scale-wise: image side; default the backbone's")


def role_loras(files: Mapping[str, Mapping[str, torch.Tensor]], use: str) -> dict[str, Mapping[str, torch.Tensor]]:
    """The PEFT-layout LoRAs a use activates, by role (both for ``both``)."""
    roles = ("content", "style") if use == "both" else (use,)
    return {r: files[adapter_file(r)] for r in roles if adapter_file(r) in files}
