"""Sampling with saved LoRAs through cstoolkit's own LoRA layers (not a method: skipped by discovery).

diffusers' ``load_lora_weights`` builds a PEFT adapter per file (new modules on every projection, a
few seconds at SDXL size) and runs them unfused: every adapted projection then costs extra GEMMs and
element-wise passes at every denoising step. Here the files are loaded into a
:class:`cstoolkit.lora.LoRASet` instead: on GPUs its banks fold W = W0 + Σ_a g_a ⊙ B_a A_a once per
call (one batched GEMM per bank), so the UNet samples at the speed of the base model; on CPUs the
fused LoRA kernel runs. The weights come from the same files a user loads with diffusers, so the
images are those of ``set_adapters`` up to floating-point rounding.

Two things PEFT adapters cannot do are also here: per-column gates (``gates``, e.g. UnZipLoRA's
mergers) and adapters that read their own prompt in cross-attention k/v (``prompts_of``, UnZipLoRA's
prompt separation at inference).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from cstoolkit.backbone import DiffusionBackbone
from cstoolkit.lora import LoRASet, lora_state_dict_to_layers
from cstoolkit.method import expand_placeholders

from ._sdxl_lora import is_cross_attention_kv, per_prompt, unload_loras


def uniform_rank(loras: dict[str, dict[str, torch.Tensor]]) -> int | None:
    """The one rank of every layer of every LoRA, or ``None`` (mixed ranks: use diffusers' adapters)."""
    ranks = {int(a.shape[0]) for state in loras.values() for a, _ in lora_state_dict_to_layers(state).values()}
    return ranks.pop() if len(ranks) == 1 else None


def sample_with_lora_layers(backbone: DiffusionBackbone, loras: dict[str, dict[str, torch.Tensor]],
                            prompts: Sequence[str], placeholders: dict[str, str], *, num_images: int, seed: int,
                            options: Any, progress: bool,
                            gates: dict[str, dict[str, torch.Tensor]] | None = None,
                            prompts_of: Callable[[str], tuple[str, dict[str, str]]] | None = None
                            ) -> list[list[Any]]:
    """Sample every prompt with the LoRAs ``loras`` (role -> diffusers state dict) added; ``num_images`` each.

    ``gates[role][layer]`` (out,) scales the output columns of one LoRA in one layer (default 1).
    ``prompts_of(prompt)`` -> (prompt for the base model, {role: its own prompt}) turns on prompt
    separation: in cross-attention k/v each LoRA reads the embedding of its own prompt (zeros in the
    unconditional rows of classifier-free guidance, as the pipeline's empty negative prompt).
    Image ``i`` of a prompt uses seed ``seed + i``, as :meth:`DiffusionBackbone.sample`.
    """
    roles = tuple(loras)
    layers = {r: lora_state_dict_to_layers(state) for r, state in loras.items()}
    names = sorted(set().union(*(set(v) for v in layers.values())))
    rank = uniform_rank(loras)
    if rank is None or not names:
        raise ValueError("sample_with_lora_layers needs LoRAs of one rank")
    split = [n for n in names if is_cross_attention_kv(n)] if prompts_of is not None else []
    unload_loras(backbone)  # diffusers adapters out: our layers go onto the plain projections
    lora_set = LoRASet(backbone.unet, names, rank, roles, init="zeros", split_input=split,
                       merge=backbone.device.type == "cuda").inject()
    try:
        bank_gates: dict[str, dict[str, torch.Tensor | None]] = {}
        for key, bank in lora_set.banks.items():
            for role in roles:
                bank.load(role, layers[role])
            bank_gates[key] = {}
            for role in roles:
                given = (gates or {}).get(role) or {}
                if not any(n in given for n in bank.names):
                    bank_gates[key][role] = None
                    continue
                ones = torch.ones(bank.out_features)
                bank_gates[key][role] = torch.stack([given.get(n, ones).float() for n in bank.names]).to(
                    bank.lora_B.device)

        def fold() -> None:
            with torch.no_grad():
                lora_set.prepare(backbone.weight_dtype, lambda key, bank: bank_gates[key])

        sample = dict(steps=options.steps, guidance_scale=options.guidance_scale, height=options.height,
                      width=options.width, progress=progress, negative_prompt=getattr(options, "negative_prompt", None))
        out: list[list[Any]] = []
        if prompts_of is None:
            fold()  # W = W0 + Σ g ⊙ B A once for every prompt
            texts = [expand_placeholders(p, placeholders) for p in prompts]
            return per_prompt(backbone.sample(texts, num_images=num_images, seed=seed, **sample), num_images)
        batch = backbone.sample_batch(options.height, options.width)
        for prompt in prompts:
            base, own = prompts_of(prompt)
            with torch.no_grad():
                emb = torch.cat([backbone.encode_prompt([own[r]]).prompt_embeds for r in roles], dim=-1)
            emb = emb.to(backbone.device)
            images: list[Any] = []
            for start in range(0, num_images, batch):  # the LoRA input follows the pipeline's batch
                n = min(batch, num_images - start)
                rows = emb.expand(n, -1, -1)
                lora_input = torch.cat([torch.zeros_like(rows), rows]) if options.guidance_scale > 1.0 else rows
                lora_set.set_shared_input(split, lora_input.contiguous())
                fold()
                images.extend(backbone.sample([base], num_images=n, seed=seed + start, **sample))
            out.append(images)
        return out
    finally:
        lora_set.remove()
