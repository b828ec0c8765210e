#!/usr/bin/env python
"""Speed and memory of textual inversion, CSD-VAR, DreamBooth-LoRA and UnZipLoRA on the scale-wise
backbones, with and without gradient checkpointing, against the frozen model's own forward+backward
(random weights).

    # GPU, all three presets in one call < 9 min on one H100 (after `source benchmarks/device_setup.sh`;
    # --time-budget skips what would not fit, `timeout` is the backstop, the JSON keeps finished sections):
    B="--modes off,on --warmup 0 --repeats 3 --inner 1 --methods dreambooth_lora,unziplora,textual_inversion,csd_var"
    timeout 165 python3 benchmarks/csd_var_step.py --presets infinity-2b $B --whole-repeats 0 \
        --time-budget 140 --out $OUT/scalewise_infinity_2b.json
    timeout 215 python3 benchmarks/csd_var_step.py --presets switti-ar $B --whole-repeats 2 \
        --time-budget 190 --out $OUT/scalewise_switti_ar.json
    timeout 125 python3 benchmarks/csd_var_step.py --presets switti-1024 $B --whole-repeats 0 \
        --time-budget 100 --out $OUT/scalewise_switti_1024.json
    # CPU smoke test (tiny presets of both backbones, all four methods, ~1 min):
    python benchmarks/csd_var_step.py --tiny --device cpu --modes off,on --whole-repeats 0 --out /tmp/t.json
    # the LoRA and CSD-VAR steps captured as CUDA graphs (--cuda-graph), checked against the eager steps, then
    # timed (GPU):
    timeout 330 python3 benchmarks/csd_var_step.py --presets switti-ar --modes off --warmup 1 --repeats 3 --inner 1 \
        --whole-repeats 0 --no-recheck --methods csd_var,dreambooth_lora,unziplora --cuda-graph \
        --out $OUT/sw_graph.json
    # ... and its CPU smoke test (the graph is off on a CPU: control flow only):
    python3 benchmarks/csd_var_step.py --tiny --modes off --methods csd_var,dreambooth_lora,unziplora --warmup 0 \
        --repeats 2 --inner 1 --whole-repeats 0 --cuda-graph --out /tmp/x.json

Run it as a script (``python3 benchmarks/csd_var_step.py``), not with ``-m`` from the repository root:
the script's folder, not the working directory, goes on ``sys.path``, so ``cstoolkit`` is the installed
package (with ``cstoolkit.backbones`` / ``cstoolkit.methods``), or, where it is not installed, the
checkout mapped by ``_timing.import_toolkit``.

Full architectures with random weights (``random_weights: true``: Switti's transformer, VQ-VAE and
full-size CLIP-L/bigG; Infinity-2B's transformer, BSQ-VAE and a flan-t5-xl-sized T5 with a byte-level
tokenizer), bf16 on a GPU, batch 1. For every preset and every checkpointing mode (``off``; ``on`` =
selective, the self-attention outputs kept; ``full`` = every op recomputed), in this order:

* ``frozen``: the frozen reference of the learned-token methods: the prompt "A photo of a <c> object in
  <s> style" with learned <c>, <s> through the text encoders, one teacher-forcing pass over all scales,
  the backbone's loss, backward to the learned vectors (so through the whole transformer and the text
  encoders);
* ``frozen_honest`` (with a LoRA method): the honest reference of the LoRA steps, as on SDXL
  (``benchmarks/sdxl_step.py``): the same prompt encoded once without gradient (a LoRA step encodes its
  prompts once, before training), the frozen teacher-forcing pass, and the backward from the loss into
  the input of the first adapted block (a forward pre-hook makes that input require grad; ``frozen_honest``
  fails if no gradient reaches it), i.e. through every transformer block, which is where a LoRA step's
  gradients must go. ``frozen`` is not honest for them: it also runs the text encoders forward and
  backward, which a LoRA step does not;
* then the ``--methods``, in the order given:

  * ``textual_inversion``: :class:`TextualInversionTrainer.step` (the method's own step: template draw,
    text encoders, teacher forcing, loss, backward, AdamW);
  * ``csd_var`` -> ``csd_var_style`` / ``csd_var_content``: :class:`CSDVARTrainer.step` (context and full
    prompt through the text encoders, SVD edit, K-V memory hook, scale-group loss, clip, AdamW); their
    mean is the CSD-VAR step; with ``--cuda-graph`` then ``csd_var_graph_style`` / ``csd_var_graph_content``
    (mean ``csd_var_graph``): a trainer built with ``cuda_graph=True`` (each kind of step captured once and
    replayed; the target and the caption-dropout draw copied into fixed tensors), timed after its own
    ``graph_check``: an eager and a graphed trainer from the same init (and the same draws) run each kind's 3
    eager warm-up calls, its capture and 4 replays (16 steps; ``params.caption_dropout`` 0.3, so that the
    replays of both kinds draw both outcomes); the replays' losses must equal the eager ones within
    ``GRAPH_CHECK_RTOL``, the replays must have moved the learned tokens/memories, the fixed-tensor step must be
    in use (not the eager fall-back) and on CUDA captured; also written: how many of the 8 replays drew the
    mirror image and a dropped caption (each compared loss with its draw);
  * ``dreambooth_lora``: the content LoRA's ``ScaleWiseLoRATrainer.step`` (what
    ``DreamBoothLoRA.fit_scalewise`` trains, "A sks <content>"; the style LoRA's step differs only by a
    longer prompt): rank and targets of :class:`DreamBoothLoRAConfig` (rank 64, the attention q/k/v/out
    projections, merged banks on CUDA), AdamW, clipping;
  * ``unziplora``: :class:`ScaleWiseUnZipLoRATrainer.step` as ``UnZipLoRA.fit_scalewise`` builds it
    (:class:`UnZipLoRAConfig` defaults: rank 64, prompt, column and scale separation), timed on its masked
    steps (all of a run but the warm-up and the recalibrations: 598 of the paper's 605); 2 warm-up
    (scoring) steps run first, instead of the paper's 5 (the masked step does not depend on it), the
    last one's time is ``unziplora_scoring_last``.

  A LoRA trainer is built for each mode and its adapters removed (``LoRASet.remove``) right after its
  section, so no other section runs with adapters injected;
* with ``--cuda-graph``, after each LoRA method, ``dreambooth_lora_graph`` / ``unziplora_graph``: the same trainer
  built with ``cuda_graph=True`` (the step, resp. the masked step, captured once and replayed), timed as the
  eager one and with the same ratios. Before timing, ``graph_check`` (per mode and method): an eager trainer and
  a graphed one from the same init (``lora_generator`` seed) run the scoring steps (UnZipLoRA), the graphed
  step's 3 eager warm-up calls, its capture and 4 replays; the replays' losses must equal the eager ones within
  ``GRAPH_CHECK_RTOL`` = 2^-7 relative (one bf16 spacing: the two differ only by Adam's capturable form, i.e.
  rounding), the replays must have moved the LoRA, and on CUDA the step must have been captured (``ok``). Also
  written: every compared loss, the largest relative difference and how far apart the two LoRAs end, over how
  far training moved them (``lora_diff_over_update``, for information). On a CPU the graph is off (a no-op
  there): both runs are the eager step, so the check smoke-tests the control flow only;
* ``frozen_again`` (with a LoRA method; ``--no-recheck`` skips it): ``frozen`` timed again last, to show
  the model is as fast as before the LoRA sections;
* peak allocated and peak reserved GPU memory of one call of each, from an emptied cache (on the GPU
  this call is also a warm-up: ``--warmup 0`` is enough there).

Times: median and min-max of ``--repeats`` repeats, a repeat being the mean of ``--inner`` calls after
``--warmup`` calls. Ratios: each step over ``frozen`` of the same mode (``ratio_to_frozen``), the LoRA
steps (eager and ``_graph``) also over ``frozen_honest`` (``ratio_to_honest``, the issue's 1.2x target), with
``--cuda-graph`` the graphed steps over the references captured the same way (``frozen_graph`` for CSD-VAR's,
``frozen_honest_graph`` for the LoRA methods': ``ratio_to_graphed_reference``; a graphed step no longer waits on the
host, so the eager reference is no longer the cheapest work it could be compared with), and
each mode over ``off`` (``time_ratio_to_off``). ``--whole-repeats`` times the whole decomposition on the first Switti
preset: ``CSDVAR.fit`` (set-up, ``--steps`` steps through the run's train loop, as ``cstoolkit run``
does) + sampling the prompts of ``recipes/csd_var.yaml``. ``--time-budget`` (seconds per preset, build
included) skips a section or repeat that the previous one's duration says would end past it (listed
under ``skipped``). Results go to ``--out`` (JSON), rewritten atomically after every section, so a
timeout or kill keeps what was done.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _timing import ROOT, import_toolkit, peak_memory, profile_calls, repeat, stats, sync

TARGETS = {"step_ratio": 1.2, "checkpointing_time_ratio": 1.35, "peak_reserved_gib": 22.0, "switti_whole_s": 60.0}
PRESETS = {"switti-ar": "switti", "switti-1024": "switti", "infinity-2b": "infinity"}
MODES = {"off": (False, True), "on": (True, True), "full": (True, False)}  # (checkpointing, keep attention)
METHODS = ("textual_inversion", "csd_var", "dreambooth_lora", "unziplora")
LORA_METHODS = ("dreambooth_lora", "unziplora")
#: --cuda-graph: the LoRA methods' steps captured as CUDA graphs, timed under these keys
GRAPH_KEYS = tuple(f"{m}_graph" for m in LORA_METHODS)
#: --cuda-graph: CSD-VAR's style and content steps captured as CUDA graphs (their mean: csd_var_graph)
CSD_GRAPH_KEYS = ("csd_var_graph_style", "csd_var_graph_content")
RATIO_KEYS = ("textual_inversion", "csd_var", "csd_var_graph", *LORA_METHODS, *GRAPH_KEYS, "frozen_honest",
              "frozen_again")
#: --cuda-graph: the frozen references captured as CUDA graphs (the honest references of the graphed steps, which
#: no longer wait on the host): ``frozen`` for CSD-VAR's, ``frozen_honest`` for the LoRA methods'
REF_GRAPH_KEYS = {"frozen_graph": ("frozen", ("csd_var_graph",)), "frozen_honest_graph": ("frozen_honest", GRAPH_KEYS)}
#: --cuda-graph self-check: steps compared after warm-up and capture, and the tolerance of each loss
GRAPH_CHECK_STEPS = 4
#: bf16 has an 8-bit significand: values 2^-7 apart (relative) at worst are neighbours. The graphed and eager
#: steps run the same kernels but for Adam's ``capturable`` form (bias corrections on the device, in fp32), so
#: their weights part by rounding and their losses by bf16 rounding of the forward: within one bf16 spacing
GRAPH_CHECK_RTOL = 2.0 ** -7
#: caption dropout of CSD-VAR's graph check (paper: 0.1): with the runtime's seed 0, both outcomes (the full prompt
#: and the empty one selected inside the captured step, what the dropout leaves unstepped put back) come up among
#: the replays of each kind of step, the mirror image too
GRAPH_CHECK_CSD_DROPOUT = 0.3
SAMPLING = {"switti": {"cfg": 6.0, "top_k": 400, "top_p": 0.95}, "infinity": {"cfg": 3.0, "tau": 0.5, "top_p": 0.97}}


def build(name: str, preset: str, tiny: bool, device: torch.device, dtype: torch.dtype) -> Any:
    from cstoolkit.registry import backbones

    if name not in backbones():
        raise LookupError(f"the {name} backbone is not registered in this checkout")
    cls = backbones()[name]
    if preset not in cls.presets:
        raise LookupError(f"the {name} backbone has no preset {preset!r} (presets: {', '.join(cls.presets)})")
    return cls.from_config(cls.Config(preset=preset, random_weights=not tiny), device=device, dtype=dtype)


def set_mode(backbone: Any, mode: str) -> None:
    on, keep = MODES[mode]
    backbone.transformer.gradient_checkpointing = on
    backbone.transformer.checkpoint_keep_attention = keep


# ------------------------------------------------------------------------------------------ one preset
def first_block(backbone: Any) -> torch.nn.Module:
    """The transformer block holding the first adapted layer (``adapter_targets()[0]`` less its two-part
    leaf, e.g. ``blocks.0`` / ``block_chunks.0.module.0``): the module ``run_block`` calls."""
    return backbone.lora_model().get_submodule(backbone.adapter_targets()[0].rsplit(".", 2)[0])


def bench(label: str, name: str, preset: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
          out: dict) -> dict:
    import yaml

    from cstoolkit.cuda_graph import EAGER_WARMUP
    from cstoolkit.lora import LoRALinear
    from cstoolkit.method import CONTENT_TOKEN, STYLE_TOKEN
    from cstoolkit.methods._scalewise_lora import ScaleWiseLoRATrainer, load_target
    from cstoolkit.methods.csd_var import CSDVAR, CSDVARConfig, CSDVARInputs, CSDVARTrainer
    from cstoolkit.methods.dreambooth_lora import DreamBoothLoRA, DreamBoothLoRAConfig, DreamBoothLoRAInputs
    from cstoolkit.methods.textual_inversion import (
        TextualInversion,
        TextualInversionConfig,
        TextualInversionInputs,
        TextualInversionTrainer,
    )
    from cstoolkit.methods.unziplora import ScaleWiseUnZipLoRATrainer, UnZipLoRA, UnZipLoRAConfig, UnZipLoRAInputs
    from cstoolkit.runtime import Runtime, RuntimeConfig

    start = time.perf_counter()
    deadline = start + args.time_budget if args.time_budget else float("inf")
    res: dict[str, Any] = {"backbone": name, "preset": preset}
    out[label] = res
    backbone = build(name, preset, args.tiny, device, dtype)
    sync(device)
    res["build_s"] = round(time.perf_counter() - start, 2)
    schedule = backbone.scale_schedule()
    res.update(image=list(backbone.image_size(schedule)), scales=len(schedule),
               tokens=sum(h * w for h, w in schedule),
               params_b=round(sum(p.numel() for p in backbone.parameters()) / 1e9, 3),
               checkpointing_auto="on" if backbone.transformer.gradient_checkpointing else "off")
    recipe = yaml.safe_load((ROOT / "recipes" / "csd_var.yaml").read_text())
    image = str((ROOT / "recipes" / recipe["inputs"]["image"]).resolve())
    words = {"content": recipe["inputs"]["content"], "style": recipe["inputs"]["style"]}
    mp = "bf16" if dtype == torch.bfloat16 else "no"
    runtime = Runtime(RuntimeConfig(seed=0, mixed_precision=mp, device=device.type, progress=False,
                                    output_dir=tempfile.mkdtemp(prefix="scalewise_bench_")))
    csd = CSDVAR(CSDVARConfig(steps=args.steps))
    csd_trainer = CSDVARTrainer(csd, backbone, CSDVARInputs(image=image, **words), runtime)  # its tokens: frozen's
    ti_trainer = (TextualInversionTrainer(TextualInversion(TextualInversionConfig()), backbone,
                                          TextualInversionInputs(image=image, **words), runtime)
                  if "textual_inversion" in args.methods else None)
    prompt, targets = "A photo of a <c> object in <s> style", csd_trainer.targets
    vectors = {ph: {k: v.detach().clone().requires_grad_(True) for k, v in csd_trainer.tokens[role].items()}
               for ph, role in ((CONTENT_TOKEN, "content"), (STYLE_TOKEN, "style"))}
    lora = [m for m in args.methods if m in LORA_METHODS]
    merge = {"auto": None, "on": True}[args.merge]  # on: merged banks as on CUDA, also on a CPU
    db_cfg = DreamBoothLoRAConfig(**({"rank": args.lora_rank} if args.lora_rank else {}))
    # the masked step does not depend on how many scoring steps came first: 2 instead of the paper's 5
    uz_cfg = UnZipLoRAConfig(warmup_steps=2, **({"rank": args.lora_rank} if args.lora_rank else {}))
    if lora:
        res["lora"] = {"rank": db_cfg.rank, "ffn": db_cfg.ffn, "layers": len(backbone.adapter_targets(ffn=db_cfg.ffn)),
                       "first_block": backbone.adapter_targets()[0].rsplit(".", 2)[0],
                       "unziplora_scale_separation": uz_cfg.scale_separation,
                       "unziplora_merge_segments": args.unziplora_merge_segments == "on"}

    def clear_vectors() -> None:
        for v in vectors.values():
            for t in v.values():
                t.grad = None

    def frozen() -> None:
        text = backbone.encode_text([prompt], learned=vectors)
        with runtime.autocast():
            logits = backbone.teacher_forcing_logits(text, targets)
        backbone.teacher_forcing_loss(logits, targets).backward()
        clear_vectors()

    # the honest reference of the LoRA steps (as on SDXL): the text encoded once, no gradient to it; the
    # frozen forward, and the backward from the loss into the input of the first adapted block
    with torch.no_grad():
        fixed_text = backbone.encode_text([prompt], learned=vectors)
    block, leaves = first_block(backbone), []

    def into_block(module: torch.nn.Module, inputs: tuple) -> tuple | None:
        x = inputs[0]
        if x.requires_grad:  # the recomputation of a checkpointed block: its saved input, already a leaf
            return None
        leaves.append(x.detach().requires_grad_(True))
        return (leaves[-1], *inputs[1:])

    def frozen_honest() -> None:
        handle = block.register_forward_pre_hook(into_block)
        try:
            with runtime.autocast():
                logits = backbone.teacher_forcing_logits(fixed_text, targets)
            backbone.teacher_forcing_loss(logits, targets).backward()
        finally:
            handle.remove()
        if leaves and leaves[0].grad is None:
            raise RuntimeError(f"frozen_honest: no gradient reached the input of {res['lora']['first_block']}")
        leaves.clear()

    def graphed_reference(fn: Callable[[], None]) -> Callable[[], Any]:
        """``fn`` as a CUDA graph (as the methods' graphed steps: eager warm-up on a side stream, capture,
        replay), called past its capture here so that the timed calls are replays; ``fn`` itself off CUDA."""
        from cstoolkit.cuda_graph import cuda_graphs_available, graph_steps

        step = graph_steps(cuda_graphs_available(device), {"ref": fn})["ref"]
        for _ in range(EAGER_WARMUP + 1):
            step()
        sync(device)
        return step

    counter = {"csd": 0, "ti": 0, "csd_graph": 0}
    held: dict[str, Any] = {"csd": csd_trainer, "ti": ti_trainer}  # dropped before the whole decomposition

    def csd_step(parity: int) -> Callable[[], None]:
        def run() -> None:
            held["csd"].step(counter["csd"] * 2 + parity)  # even = style step, odd = content step
            counter["csd"] += 1
        return run

    def csd_graph_step(parity: int) -> Callable[[], None]:
        def run() -> None:
            held["csd_graph"].step(counter["csd_graph"] * 2 + parity)  # the graphed trainer, as csd_step
            counter["csd_graph"] += 1
        return run

    def csd_learned(trainer: Any) -> list[torch.Tensor]:
        return [p.detach().float().clone() for p in trainer.state.params.values()]

    def eager_and_graphed(make: Callable[[bool], Any], steps: Callable[[Any], int], replays: int,
                          learned: Callable[[Any], list[torch.Tensor]], record: Callable[[Any, int], Any],
                          discard: Callable[[Any], None]) -> tuple[dict[str, Any], dict[str, Any], Any]:
        """The graph check's two runs: ``make(False)`` (eager) then ``make(True)`` (graphed), from the same init,
        each over ``steps(trainer)`` steps (``record(trainer, i)`` runs step ``i`` and returns what to compare),
        the last ``replays`` of them replays on CUDA. Per run: the records, the learned tensors at init, before
        the replays and at the end, whether captured. The graphed trainer is returned (timed next); the eager one,
        and a graphed one whose run failed, go to ``discard``. The graphed run also gets ``updated`` (the replays
        moved the learned tensors) and ``diff_over_update`` (how far the two runs end apart, relative to how far
        training moved the eager one: information, not a criterion)."""
        runs: dict[bool, Any] = {}
        graphed = None
        for cuda_graph in (False, True):
            trainer = make(cuda_graph)
            n = steps(trainer)
            init = learned(trainer)
            records: list[Any] = []
            before_replays: list[torch.Tensor] = []
            keep = False  # the graphed trainer stays (timed next) unless its run failed
            try:
                for i in range(n):
                    if i == n - replays:
                        before_replays = learned(trainer)
                    records.append(record(trainer, i))
                runs[cuda_graph] = {"records": records, "init": init, "final": learned(trainer),
                                    "before_replays": before_replays, "captured": trainer.captured, "steps": n}
                keep = cuda_graph
            finally:
                if not keep:
                    discard(trainer)
            if keep:
                graphed = trainer
            del trainer
            if device.type == "cuda":
                torch.cuda.empty_cache()
        eager, graph = runs[False], runs[True]
        graph["updated"] = any(not torch.equal(a, b) for a, b in zip(graph["before_replays"], graph["final"]))
        apart = sum(float((g - e).pow(2).sum()) for g, e in zip(graph["final"], eager["final"])) ** 0.5
        moved = sum(float((e - i).pow(2).sum()) for e, i in zip(eager["final"], eager["init"])) ** 0.5
        graph["diff_over_update"] = apart / moved if moved > 0 else None
        return eager, graph, graphed

    def csd_graph_check() -> tuple[dict[str, Any], Any]:
        """An eager CSD-VAR trainer, then a graphed one (``cuda_graph=True``), from the same init (tokens from
        the words, memories and draws from the runtime's seeds), each run over 2 (EAGER_WARMUP + 1) steps (each
        kind's eager warm-up and capture: style steps even, content steps odd) and 2 GRAPH_CHECK_STEPS replays;
        the replays' losses compared (GRAPH_CHECK_RTOL). Returns the check and the graphed trainer (timed next)."""
        n = 2 * (EAGER_WARMUP + 1) + 2 * GRAPH_CHECK_STEPS
        method = CSDVAR(CSDVARConfig(steps=args.steps, caption_dropout=GRAPH_CHECK_CSD_DROPOUT))
        eager, graph, graphed = eager_and_graphed(
            lambda cuda_graph: CSDVARTrainer(method, backbone, CSDVARInputs(image=image, **words), runtime,
                                             cuda_graph=cuda_graph),
            lambda trainer: n, 2 * GRAPH_CHECK_STEPS, csd_learned,
            lambda trainer, i: (float(trainer.step(i)), trainer.last_draw), lambda trainer: trainer.release())
        worst, rows = 0.0, []
        for i in range(n - 2 * GRAPH_CHECK_STEPS, n):
            ref, (got, draw) = eager["records"][i][0], graph["records"][i]
            rel = abs(got - ref) / max(abs(ref), 1e-12)
            worst = max(worst, rel)
            draw = draw or (None, None)
            rows.append({"step": i, "kind": "style" if i % 2 == 0 else "content", "eager": ref, "graph": got,
                         "rel_diff": rel, "mirrored": draw[0], "caption_dropped": draw[1]})
        # the replays trained: the learned tokens and memories moved between the captures and the last replay
        updated = graph["updated"]
        losses_ok = worst <= GRAPH_CHECK_RTOL
        captured = graph["captured"]
        drawn = [d for _, d in graph["records"][n - 2 * GRAPH_CHECK_STEPS:] if d is not None]
        static = graphed.static
        check = {"ok": bool(losses_ok and updated and static and (captured or device.type != "cuda")),
                 "captured": captured, "fixed_tensor_step": static, "losses_within_rtol": losses_ok,
                 "replays_updated_tokens": updated, "rtol": GRAPH_CHECK_RTOL, "max_rel_diff": worst, "steps": n,
                 "compared": rows, "tokens_diff_over_update": graph["diff_over_update"],
                 "caption_dropout": GRAPH_CHECK_CSD_DROPOUT, "mirrored_replays": sum(1 for i, _ in drawn if i),
                 "dropped_caption_replays": sum(1 for _, d in drawn if d),
                 "note": "eager vs graphed CSD-VAR trainer from the same init and draws (params.caption_dropout "
                         f"{GRAPH_CHECK_CSD_DROPOUT}, else the defaults); compared: the last "
                         f"{2 * GRAPH_CHECK_STEPS} steps (replays of the captured style and content steps on CUDA; "
                         "on a CPU nothing is captured and both are eager, the graphed one on fixed tensors)"}
        return check, graphed

    def ti_step() -> None:
        held["ti"].step(counter["ti"])
        counter["ti"] += 1

    def dreambooth_lora(cuda_graph: bool = False) -> Any:
        """The content LoRA of ``DreamBoothLoRA.fit_scalewise`` (the style LoRA's step is the same but for
        a 3-word longer prompt); ``cuda_graph``: its step captured and replayed."""
        method = DreamBoothLoRA(db_cfg)
        inputs = DreamBoothLoRAInputs(content_images=[image], **words)
        with torch.no_grad():
            text = backbone.encode_text([method.training_prompts(inputs)["content"]])
        return ScaleWiseLoRATrainer(backbone, backbone.adapter_targets(ffn=db_cfg.ffn),
                                    [load_target(backbone, image, "inputs.content_images[0]")], [text],
                                    adapter="content", rank=db_cfg.rank, lr=db_cfg.lr,
                                    weight_decay=db_cfg.weight_decay, max_grad_norm=db_cfg.max_grad_norm,
                                    init_std=db_cfg.init_std, lora_generator=runtime.generator(1),
                                    autocast=runtime.autocast, merge=merge, cuda_graph=cuda_graph)

    def unziplora(cuda_graph: bool = False) -> Any:
        """As ``UnZipLoRA.fit_scalewise``; ``cuda_graph``: its masked step captured and replayed."""
        method = UnZipLoRA(uz_cfg)
        prompts = method.training_prompts(UnZipLoRAInputs(image=image, **words))
        return ScaleWiseUnZipLoRATrainer(backbone, uz_cfg, image, prompts, lora_generator=runtime.generator(1),
                                         autocast=runtime.autocast, merge=merge,
                                         merge_segments=args.unziplora_merge_segments == "on",
                                         cuda_graph=cuda_graph)

    def lora_weights(trainer: Any) -> list[torch.Tensor]:
        return [p.detach().float().clone() for b in trainer.loras.banks.values() for p in (b.lora_A, b.lora_B)]

    def graph_check(method_name: str) -> tuple[dict[str, Any], Any]:
        """An eager trainer, then a graphed one, from the same init (``lora_generator`` seed), each run over
        its scoring steps (UnZipLoRA), the graphed step's eager warm-up, its capture and GRAPH_CHECK_STEPS
        replays; the replays' losses compared (GRAPH_CHECK_RTOL). Returns the check and the graphed trainer
        (its adapters injected: timed next)."""
        def discard(trainer: Any) -> None:
            trainer.release()
            trainer.loras.remove()

        eager, graph, graphed = eager_and_graphed(
            makers[method_name], lambda trainer: getattr(trainer, "warmup", 0) + EAGER_WARMUP + 1 + GRAPH_CHECK_STEPS,
            GRAPH_CHECK_STEPS, lora_weights, lambda trainer, i: {k: float(v) for k, v in trainer.step(i).items()},
            discard)
        n = graph["steps"]
        worst, rows = 0.0, []
        for i in range(n - GRAPH_CHECK_STEPS, n):
            for key, ref in eager["records"][i].items():
                got = graph["records"][i][key]
                rel = abs(got - ref) / max(abs(ref), 1e-12)
                worst = max(worst, rel)
                rows.append({"step": i, "key": key, "eager": ref, "graph": got, "rel_diff": rel})
        # the replays trained: the LoRA moved between the capture call and the last replay
        updated = graph["updated"]
        losses_ok = worst <= GRAPH_CHECK_RTOL
        captured = graph["captured"]
        check = {"ok": bool(losses_ok and updated and (captured or device.type != "cuda")),
                 "captured": captured, "losses_within_rtol": losses_ok, "replays_updated_lora": updated,
                 "rtol": GRAPH_CHECK_RTOL, "max_rel_diff": worst, "steps": n, "compared": rows,
                 "lora_diff_over_update": graph["diff_over_update"],
                 "note": "eager vs graphed trainer from the same init; compared: the last "
                         f"{GRAPH_CHECK_STEPS} steps (replays of the captured step on CUDA; on a CPU the graph "
                         "is off and both are the eager step)"}
        return check, graphed

    makers = {"dreambooth_lora": dreambooth_lora, "unziplora": unziplora}

    def drop(section: str, trainer: Any) -> None:
        """A LoRA section's trainer gone: its graphs freed, its adapters removed (checked), the cache emptied."""
        if trainer is not None:
            trainer.release()
            trainer.loras.remove()
        left = [n for n, m in backbone.lora_model().named_modules() if isinstance(m, LoRALinear)]
        if left:
            raise RuntimeError(f"{section} left LoRA layers in the backbone: {left[:3]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    def csd_graph_section(row: dict, timed: Callable[..., bool], failed: Callable[..., None], mode: str) -> None:
        """--cuda-graph: CSD-VAR's graphed trainer checked against the eager one (graph_check), then its style and
        content steps timed as csd_var_graph_style / csd_var_graph_content."""
        if time.perf_counter() + last[0] > deadline:
            row.setdefault("skipped", []).append("csd_var_graph")
            return
        try:
            check, held["csd_graph"] = csd_graph_check()
            row.setdefault("graph_check", {})["csd_var"] = check
            _write(args, out)
            print(f"[{label}] {mode}: csd_var graph check: {'ok' if check['ok'] else 'FAILED'} (captured "
                  f"{check['captured']}, max rel. loss diff {check['max_rel_diff']:.2e} <= {GRAPH_CHECK_RTOL:.2e}: "
                  f"{check['losses_within_rtol']}, replays updated the tokens: {check['replays_updated_tokens']}, "
                  f"fixed-tensor step: {check['fixed_tensor_step']}; of {2 * GRAPH_CHECK_STEPS} replays "
                  f"{check['dropped_caption_replays']} dropped the caption, {check['mirrored_replays']} mirrored)",
                  flush=True)
            counter["csd_graph"] = check["steps"] // 2
            for key, parity in zip(CSD_GRAPH_KEYS, (0, 1)):
                timed(key, csd_graph_step(parity))
        except RuntimeError as exc:
            failed("csd_var_graph", exc)
        finally:
            if held.get("csd_graph") is not None:
                held["csd_graph"].release()
            held["csd_graph"] = None
            if device.type == "cuda":
                torch.cuda.empty_cache()

    plain = {"textual_inversion": {"textual_inversion": ti_step},
             "csd_var": {"csd_var_style": csd_step(0), "csd_var_content": csd_step(1)}}
    if lora:
        backbone.freeze()  # as the LoRA methods' fit does (the other trainers freeze it too)
    res["modes"] = {}
    last = [0.0]  # duration of the last section: the estimate of the next one against the time budget

    for mode in args.modes:
        set_mode(backbone, mode)
        row: dict[str, Any] = {"peak_gib": {}, "step_s": {}}
        res["modes"][mode] = row
        times: dict[str, list[float]] = {}

        def failed(key: str, exc: BaseException, row: dict = row, mode: str = mode) -> None:
            """Record a section's error (e.g. out of memory) in the row and say it; the other sections go on."""
            row.setdefault("errors", {})[key] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"[{label}] {mode}: {key}: {row['errors'][key]}", flush=True)

        def timed(key: str, fn: Callable[[], Any], row: dict = row, times: dict = times, mode: str = mode) -> bool:
            if time.perf_counter() + last[0] > deadline:
                row.setdefault("skipped", []).append(key)
                print(f"[{label}] {mode}: {key} skipped (--time-budget {args.time_budget} s)", flush=True)
                return False
            t0 = time.perf_counter()
            try:
                row["peak_gib"][key] = peak_memory(fn, device)
                times[key] = repeat(fn, device, args.warmup, args.repeats, args.inner)
                row["step_s"][key] = stats(times[key])
                if args.profile:
                    prof = row.setdefault("profile", {})[key] = profile_calls(fn, device, args.profile)
                    print(f"[{label}] {mode}: {key} profile: wall {prof['wall_s'] * 1e3:.1f} ms, busy "
                          f"{prof['busy_s'] * 1e3:.1f} ms ({prof['busy_over_wall']}), {prof['launches']} launches; "
                          + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in prof["categories_s"].items()), flush=True)
            except RuntimeError as exc:  # e.g. out of memory: keep the other sections
                failed(key, exc)
                clear_vectors()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            last[0] = time.perf_counter() - t0
            _write(args, out)
            return key in times

        timed("frozen", frozen)
        if lora:
            timed("frozen_honest", frozen_honest)
        if args.cuda_graph:  # the references captured too: the honest baseline of the graphed steps
            for key, (eager_key, _) in REF_GRAPH_KEYS.items():
                if eager_key in times:
                    timed(key, graphed_reference(frozen if eager_key == "frozen" else frozen_honest))
        for method_name in args.methods:
            if method_name in plain:
                for key, fn in plain[method_name].items():
                    timed(key, fn)
                if method_name == "csd_var" and args.cuda_graph:
                    csd_graph_section(row, timed, failed, mode)
                continue
            # a LoRA method: its trainer built for this mode, its adapters removed before the next section
            if time.perf_counter() + last[0] > deadline:
                row.setdefault("skipped", []).append(method_name)
                continue
            trainer = None
            try:
                trainer = makers[method_name]()
                step = [0]
                scoring = []
                for _ in range(getattr(trainer, "warmup", 0)):  # UnZipLoRA's scoring steps, each timed once
                    sync(device)
                    t0 = time.perf_counter()
                    trainer.step(step[0])
                    sync(device)
                    scoring.append(time.perf_counter() - t0)
                    step[0] += 1
                if scoring:
                    row["step_s"][f"{method_name}_scoring_last"] = round(scoring[-1], 4)

                timed(method_name, stepping(trainer, step))
            except RuntimeError as exc:
                failed(method_name, exc)
            finally:
                drop(method_name, trainer)
                del trainer
            if not args.cuda_graph:
                continue
            key = f"{method_name}_graph"
            if time.perf_counter() + last[0] > deadline:
                row.setdefault("skipped", []).append(key)
                continue
            graphed = None
            try:  # the graphed step: first checked against the eager one, then timed as it
                check, graphed = graph_check(method_name)
                row.setdefault("graph_check", {})[method_name] = check
                _write(args, out)
                print(f"[{label}] {mode}: {method_name} graph check: {'ok' if check['ok'] else 'FAILED'} "
                      f"(captured {check['captured']}, max rel. loss diff {check['max_rel_diff']:.2e} <= "
                      f"{GRAPH_CHECK_RTOL:.2e}: {check['losses_within_rtol']}, replays updated the LoRA: "
                      f"{check['replays_updated_lora']})", flush=True)
                timed(key, stepping(graphed, [check["steps"]]))
            except RuntimeError as exc:
                failed(key, exc)
            finally:
                drop(key, graphed)
                del graphed
        if lora and args.recheck:  # the frozen reference again: the LoRA sections left the model as it was
            timed("frozen_again", frozen)

        for key, (style_key, content_key) in (("csd_var", ("csd_var_style", "csd_var_content")),
                                              ("csd_var_graph", CSD_GRAPH_KEYS)):
            if style_key in times and content_key in times:
                times[key] = [(a + b) / 2 for a, b in zip(times[style_key], times[content_key])]
                row["step_s"][key] = stats(times[key])
        if "frozen" in times:
            row["ratio_to_frozen"] = {k: stats([t / f for t, f in zip(times[k], times["frozen"])])
                                      for k in RATIO_KEYS if k in times}
        if "frozen_honest" in times:
            row["ratio_to_honest"] = {k: stats([t / f for t, f in zip(times[k], times["frozen_honest"])])
                                      for k in (*LORA_METHODS, *GRAPH_KEYS) if k in times}
        for ref, (_, keys) in REF_GRAPH_KEYS.items():  # graphed steps over their graphed reference
            if ref in times:
                row.setdefault("ratio_to_graphed_reference", {}).update(
                    {k: stats([t / f for t, f in zip(times[k], times[ref])]) for k in keys if k in times})
        row["_times"] = times
        ratios = row.get("ratio_to_frozen", {})
        print(f"[{label}] {mode:4s}: " + ", ".join(
            f"{k} {v['median'] * 1e3:.1f} ms" + (f" ({ratios[k]['median']:.3f}x)" if k in ratios else "")
            + (f" ({row['ratio_to_honest'][k]['median']:.3f}x honest)" if k in row.get("ratio_to_honest", {}) else "")
            for k, v in row["step_s"].items() if isinstance(v, dict)) + f"; peak {row['peak_gib']}", flush=True)
    if "_times" in res["modes"].get("off", {}):  # each checkpointing mode against no checkpointing, step by step
        base = res["modes"]["off"]["_times"]
        for mode, row in res["modes"].items():
            if mode != "off" and "_times" in row:
                row["time_ratio_to_off"] = {k: stats([t / b for t, b in zip(row["_times"][k], base[k])])
                                            for k in ("frozen", "frozen_honest", *RATIO_KEYS)
                                            if k in row["_times"] and k in base}
    for row in res["modes"].values():
        row.pop("_times", None)
    set_mode(backbone, "on" if res["checkpointing_auto"] == "on" else "off")
    _write(args, out)
    held.clear()
    del csd_trainer, ti_trainer

    # the whole decomposition: CSDVAR.fit (set-up + steps through the train loop) + sampling the recipe's prompts
    if not args.whole_repeats or name != "switti" or out.get("_whole_done"):
        return res
    out["_whole_done"] = True
    gen = recipe["generate"]
    prompts = {use: gen[use] for use in ("content", "style", "both") if gen.get(use)}
    from cstoolkit.methods.csd_var import CSDVARGenerate

    options = CSDVARGenerate(**(SAMPLING[name] if not args.tiny else {}))
    whole, fit_only, sample_only = [], [], []
    inputs = CSDVARInputs(image=image, **words)
    # the first repeat's estimate against the time budget: the fit's steps at the measured CSD-VAR step time
    step_s = [row["step_s"]["csd_var"]["median"] for row in res["modes"].values() if "csd_var" in row["step_s"]]
    first = args.steps * min(step_s) if step_s else 0.0
    for r in range(args.whole_repeats):
        if time.perf_counter() + (whole[-1] if whole else first) > deadline:
            res.setdefault("whole", {})["skipped"] = f"repeats {r + 1}-{args.whole_repeats} (--time-budget)"
            _write(args, out)
            print(f"[{label}] whole decomposition: repeats {r + 1}+ skipped (--time-budget)", flush=True)
            break
        sync(device)
        t = time.perf_counter()
        dec = csd.fit(backbone, inputs, runtime)
        sync(device)
        fit_only.append(time.perf_counter() - t)
        n_images = 0
        for use, ps in prompts.items():
            imgs = csd.generate(backbone, dec, ps, use, num_images=gen.get("num_images", 1), seed=r,
                                options=options, progress=False)
            n_images += sum(len(x) for x in imgs)
        sync(device)
        whole.append(time.perf_counter() - t)
        sample_only.append(whole[-1] - fit_only[-1])
        del dec
        res["whole"] = {"steps": args.steps, "whole_s": stats(whole), "fit_s": stats(fit_only),
                        "sampling_s": stats(sample_only), "images": n_images,
                        "fit_s_per_step": round(statistics_median(fit_only) / args.steps, 4)}
        _write(args, out)
        print(f"[{label}] whole decomposition {r + 1}/{args.whole_repeats}: {whole[-1]:.1f} s "
              f"(fit {fit_only[-1]:.1f} s for {args.steps} steps, sampling {sample_only[-1]:.1f} s, "
              f"{n_images} images)", flush=True)
    return res


def stepping(trainer: Any, step: list[int]) -> Callable[[], None]:
    """One training step of ``trainer`` per call, its step index counted on in ``step`` (a one-item list)."""
    def run() -> None:
        trainer.step(step[0])
        step[0] += 1
    return run


def statistics_median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def _write(args: argparse.Namespace, out: dict) -> None:
    """Rewrite ``--out`` whole, atomically (a temporary file renamed over it), so a run killed at any time
    leaves the last complete JSON."""
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({k: v for k, v in out.items() if not k.startswith("_")}, indent=2))
        os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="switti-ar,switti-1024,infinity-2b",
                        help=f"comma-separated, of {', '.join(PRESETS)} (--tiny: both backbones' tiny presets)")
    parser.add_argument("--modes", default="off,on,full", help="checkpointing modes: off, on (selective), full")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, timed in this order after the references: {', '.join(METHODS)}")
    parser.add_argument("--lora-rank", type=int, default=None,
                        help="rank of the LoRA methods (default: their configs' paper default, 64)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds per preset (build included): a section or whole-decomposition repeat that "
                             "the last one's duration says would end past it is skipped and listed")
    parser.add_argument("--no-recheck", dest="recheck", action="store_false",
                        help="with LoRA methods, skip timing the frozen reference again after them (frozen_again)")
    parser.add_argument("--unziplora-merge-segments", choices=("on", "off"), default="off",
                        help="merged banks (CUDA): UnZipLoRA's scale-separated layers merged per scale group (on) or "
                             "unmerged (off, the trainer's default)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also the LoRA methods' and CSD-VAR's steps captured as CUDA graphs (trainers with "
                             "cuda_graph=True), timed as dreambooth_lora_graph / unziplora_graph / csd_var_graph "
                             "after a check against the eager step from the same init (graph_check); on a CPU the "
                             "graph is off (control flow only)")
    parser.add_argument("--tiny", action="store_true", help="tiny presets (CPU smoke test)")
    parser.add_argument("--merge", choices=("auto", "on"), default="auto",
                        help="LoRA banks merged into the frozen weights: auto = on CUDA only; on = also on a CPU (the "
                             "GPU's code path on a CPU, e.g. with --tiny --switti-depth 30)")
    parser.add_argument("--switti-depth", type=int, default=None,
                        help="Switti presets with this many blocks (e.g. --tiny --switti-depth 30: the tiny widths at "
                             "Switti-AR's depth, as the op counts of docs/benchmarks.md). On a CPU the tiny step is "
                             "still compute-bound (measured with cProfile), so its times are no host-overhead figure")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=151, help="steps of the whole decomposition (CSD-VAR's default "
                                                               "151: the official step-150 checkpoint)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inner", type=int, default=2, help="calls per step repeat")
    parser.add_argument("--whole-repeats", type=int, default=3)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after each section's timing, profile N more calls (torch.profiler): wall vs the "
                             "device's busy time, launches, time per kernel category and the top kernels (the "
                             "'profile' of each mode in --out): what bounds a step")
    parser.add_argument("--out", type=str, default=None, help="JSON results")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        parser.error(f"unknown mode(s) {bad}; known: {', '.join(MODES)}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        parser.error(f"unknown method(s) {bad}; known: {', '.join(METHODS)}")
    if args.repeats < 1 or args.inner < 1:
        parser.error("--repeats and --inner must be at least 1")

    import_toolkit("cstoolkit.backbones.infinity", "cstoolkit.methods.csd_var", "cstoolkit.methods.unziplora",
                   "cstoolkit.methods.dreambooth_lora")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "dtype": str(dtype).replace("torch.", ""), "tiny": args.tiny, "targets": TARGETS,
                           "torch": torch.__version__, "modes": {m: MODES[m] for m in args.modes},
                           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                           "settings": {k: getattr(args, k) for k in ("warmup", "repeats", "inner", "steps", "methods",
                                                                      "lora_rank", "time_budget", "profile",
                                                                      "cuda_graph")}}
    if args.tiny:
        runs = [("switti-tiny", "switti", "tiny"), ("infinity-tiny", "infinity", "tiny")]
    else:
        names = [p.strip() for p in args.presets.split(",") if p.strip()]
        unknown = [p for p in names if p not in PRESETS]
        if unknown:
            parser.error(f"unknown preset(s) {unknown}; known: {', '.join(PRESETS)}")
        runs = [(p, PRESETS[p], p) for p in names]
    if args.switti_depth:
        from dataclasses import replace

        from cstoolkit.backbones.switti import add_preset, preset_row

        deeper = []
        for label, name, preset in runs:
            if name == "switti":
                row = preset_row(preset)
                preset = f"{preset}-depth{args.switti_depth}"
                add_preset(preset, replace(row, transformer=replace(row.transformer, depth=args.switti_depth)),
                           overwrite=True)
                label = f"{label}-depth{args.switti_depth}"
            deeper.append((label, name, preset))
        runs = deeper
    for label, name, preset in runs:
        try:
            bench(label, name, preset, args, device, dtype, out)
        except LookupError as exc:
            out[label] = {"skipped": str(exc)}
            print(f"[{label}] skipped: {exc}", flush=True)
        _write(args, out)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out.pop("_whole_done", None)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
