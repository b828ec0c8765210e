"""SDXL training-step benchmark: every adapter step as a ratio to two frozen references.

    python benchmarks/sdxl_step.py                         # GPU: sdxl-base random weights, 1024², bf16, rank 64
    python benchmarks/sdxl_step.py --modes graph compiled --only unziplora --references none   # GPU: compiled row
    python benchmarks/sdxl_step.py --tiny                  # CPU smoke test (tiny preset, 128², 2 steps x 3)
    python benchmarks/sdxl_step.py --tiny --modes eager compiled --compile-backend aot_eager --only unziplora

References (the frozen UNet, no adapter, same inputs):

* ``frozen_into_latents``: forward + backward with the gradient running into the input latents. A
  LoRA step never needs that part of the backward (conv_in, the first blocks at full resolution), so
  ratios to it flatter every method (the reference of earlier runs, kept for comparison);
* ``frozen_from <layer>`` (the honest reference): forward + the cheapest backward a LoRA step could
  have, the gradient starting at the input of the row's first adapted layer (in forward order)
  and stopping there. Each row is compared with the reference of its own first adapted layer
  (B-LoRA adapts two up-blocks only: its backward is much shorter than DreamBooth-LoRA's);
* ``frozen forward``: a gradient-free forward. A method whose step must also run target forwards
  (ZipLoRA: each LoRA alone on its image) cannot be cheaper than its passes' honest references plus
  those forwards: the ``x cheapest`` column divides by that sum (for the other rows it is ``x honest/pass``).

Rows (methods' real training steps):

* ``peft_lora``: a plain diffusers-style PEFT LoRA step (rank r on to_q/k/v/out.0 of every attention,
  fp32 adapter weights under bf16 autocast, AdamW);
* ``unziplora``: UnZipLoRA's real training step (``UnZipLoRATrainer.step``: two LoRAs with prompt
  separation, column masks, mergers, orthogonality loss, Adam) after its warm-up; its rare
  importance-scoring step is reported on its own line;
* ``dreambooth_lora``, ``b_lora``: DreamBooth-LoRA's step (one LoRA on every attention, 1 image) and
  B-LoRA's (the same on up_blocks.0.attentions.0/1 only); ``dreambooth_lora_lowrank_grad`` and
  ``unziplora_lowrank_grad``: the same steps with the merged banks' low-rank backward
  (``merge_grad="lowrank"``, :class:`MergedLoRAFunction`) instead of the default full-size dW;
* ``break_for_make``: a content-stage step (PLP: the content image trains B, MCP ``cycle``: one other
  style image trains D; 2 single-image passes); ``break_for_make_mcp_all3``: the same with MCP over 3
  other styles (Eq. 17, the official code's n; 4 single-image passes, gradients accumulated:
  ``micro_batch: 1``); ``break_for_make_make``: a make step (LoRA_f on the content and the style
  image, 2 single-image passes);
* ``ziplora``: a merge step (two frozen LoRAs with learned mergers: 2 single-image passes with grad, the 2 target
  passes of each LoRA alone without);
* further methods register a builder in ``STEPS``.

Each row runs ``--warmup`` steps, then ``--repeats`` (>= 3) timings of ``--iters`` steps each (CUDA
events); it prints the median seconds per step with the min-max over repeats, the ratio of medians to
both references (with the row's min-max over the reference's median), the single-image passes a step
makes and the ratio per pass, and the row's peak GPU memory. Modes: ``graph`` (each step, the
references included, replayed as a CUDA graph: what the methods do on CUDA, default), ``eager``
(every kernel launched from Python; bound by the CPU at batch 1) and ``compiled`` (the UNet with its LoRA
banks under ``torch.compile``, as ``runtime.compile: on`` runs it, and on CUDA each step replayed as a CUDA
graph): each row and reference is compiled on its own (in-memory Dynamo caches reset between them, the
on-disk caches in ``--cache-dir``, fresh by default, so every compile is cold), its compile seconds and
cache state reported; the honest reference there starts the gradient at the first adapted layer's weight
(one extra weight-gradient GEMM of that layer) instead of a hook that detaches its input, which Dynamo
would split the graph at. Warm-up runs past the CUDA-graph capture (``--warmup`` steps after the
capture's eager calls and the capture itself), so no timing holds a capture or a compile.
``--autocast auto`` (default) runs the bf16 UNet without autocast, as the methods do where the frozen
weights already are bf16; ``--autocast on`` under bf16 autocast (before issue 22). Weights are random:
speed and memory only.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from cstoolkit.backbone import PromptEmbeds
from cstoolkit.compile import CompiledForward
from cstoolkit.cuda_graph import EAGER_WARMUP, GraphedStep

Step = Callable[[], None]
#: name -> builder(ctx) returning (step, cleanup, extra rows); rows are measured in this order
STEPS: dict[str, Callable[["Context"], tuple[Step, Callable[[], None], dict[str, Step]]]] = {}


class Context:
    """Backbone, inputs and settings shared by every row."""

    def __init__(self, args: argparse.Namespace):
        from cstoolkit.backbones.sdxl import SDXLBackbone, SDXLConfig

        self.args = args
        self.device = torch.device(args.device)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        t0 = time.perf_counter()
        config = SDXLConfig(preset=args.preset, resolution=args.resolution, random_weights=True)
        self.backbone = SDXLBackbone.from_config(config, device=self.device, dtype=self.dtype)
        self.backbone.freeze()
        self.build_s = time.perf_counter() - t0
        g = torch.Generator(device=self.device).manual_seed(0)
        side = args.resolution // self.backbone.vae_scale_factor
        self.latents = torch.randn(1, 4, side, side, device=self.device, generator=g)
        with torch.no_grad():
            cond = self.backbone.encode_prompt(["a photo of a sks balloon in flat illustration style"])
        self.cond = PromptEmbeds(cond.prompt_embeds.to(self.device), cond.pooled.to(self.device),
                                 {k: v.to(self.device) for k, v in cond.extra.items()})
        self.noise = torch.Generator(device=self.device).manual_seed(1)
        self._noise = torch.empty_like(self.latents)
        self._t = torch.zeros(1, dtype=torch.long, device=self.device)
        weights = [p for p in self.backbone.unet.parameters() if p.is_floating_point()]
        #: autocast in the steps: ``--autocast on``, or (auto) only where the UNet's weights are not in ``dtype``
        self.use_autocast = (self.device.type == "cuda" and self.dtype != torch.float32
                             and (args.autocast == "on" or any(p.dtype != self.dtype for p in weights)))
        self.order = self._linear_order()
        #: row label -> names of the layers it adapts (set by builders; default: every attention projection)
        self.adapted: dict[str, list[str]] = {}
        #: the UNet compiled for the row being measured (``compiled`` mode), else None
        self.compiler: CompiledForward | None = None

    def _linear_order(self) -> dict[str, int]:
        """Position of every ``nn.Linear`` of the UNet in one forward pass (the first adapted layer of a
        row is where its cheapest backward stops)."""
        order: dict[str, int] = {}

        def seen(name: str) -> Callable[..., None]:
            def hook(module: torch.nn.Module, args: tuple) -> None:
                order.setdefault(name, len(order))

            return hook

        handles = [m.register_forward_pre_hook(seen(name))
                   for name, m in self.backbone.unet.named_modules() if isinstance(m, torch.nn.Linear)]
        try:
            with torch.no_grad():
                self.loss()
        finally:
            for h in handles:
                h.remove()
        return order

    def first_adapted(self, label: str) -> str:
        from cstoolkit.methods._sdxl_lora import target_linears

        names = self.adapted.get(label) or target_linears(self.backbone)
        return min(names, key=lambda n: self.order.get(n, len(self.order)))

    def draw(self) -> None:
        """Noise and timestep of the next step, drawn eagerly into static tensors."""
        self._noise.copy_(torch.randn(self._noise.shape, generator=self.noise, device=self.device))
        self._t.copy_(torch.randint(0, 1000, (1,), generator=self.noise, device=self.device))

    graph = False  # set per mode by main()
    compiled = False  # compiled mode: each row and reference under its own CompiledForward (compiled_row)

    def maybe_graph(self, step: Step) -> Step:
        """The step as a replayed CUDA graph in ``graph`` mode (same kernels, no launch overhead), its first
        call timed as the compile in ``compiled`` mode."""
        if self.compiler is not None:
            step = self.compiler.step(step)
        run = GraphedStep(step) if self.graph else step

        def drawn() -> None:
            self.draw()
            run()

        return drawn

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.use_autocast:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.dtype)

    def loss(self, latents: torch.Tensor | None = None) -> torch.Tensor:
        with self.autocast():
            return self.backbone.training_loss(self.latents if latents is None else latents, self.cond,
                                               noise=self._noise, timesteps=self._t)


def _frozen(ctx: Context):
    """Reference as in earlier runs: the backward runs into the input latents."""
    latents = ctx.latents.clone().requires_grad_(True)

    def step() -> None:
        latents.grad = None
        ctx.loss(latents).backward()

    return ctx.maybe_graph(step), lambda: None, {}


def _frozen_forward(ctx: Context):
    """A gradient-free forward of the frozen UNet (what a method's target passes cost, e.g. ZipLoRA's)."""

    def step() -> None:
        with torch.no_grad():
            ctx.loss()

    return ctx.maybe_graph(step), lambda: None, {}


def frozen_from(ctx: Context, name: str) -> tuple[Step, Callable[[], None]]:
    """Honest reference: the frozen forward, and a backward from the loss to the input of layer ``name``
    (nothing before it gets a gradient: the cheapest backward of a LoRA step adapting ``name`` first)."""
    module = ctx.backbone.unet.get_submodule(name)

    def step() -> None:
        ctx.loss().backward()

    if ctx.compiler is not None:  # compiled: a hook's requires_grad_ would split the graph; a weight gradient does not
        weight = module.weight
        weight.requires_grad_(True)

        def compiled_step() -> None:
            weight.grad = None
            step()

        def cleanup() -> None:
            weight.requires_grad_(False)
            weight.grad = None

        return ctx.maybe_graph(compiled_step), cleanup

    def start_grad(mod: torch.nn.Module, args: tuple) -> tuple:
        return (args[0].detach().requires_grad_(True), *args[1:])

    handle = module.register_forward_pre_hook(start_grad)
    return ctx.maybe_graph(step), handle.remove


def _peft_lora(ctx: Context):
    from peft import LoraConfig

    unet = ctx.backbone.unet
    r = ctx.args.rank
    ctx.adapted["peft_lora"] = [n for n, m in unet.named_modules()
                                if isinstance(m, torch.nn.Linear) and n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    unet.add_adapter(LoraConfig(r=r, lora_alpha=r, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # diffusers' cast_training_params: trainable weights in fp32
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4, capturable=ctx.graph)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        ctx.loss().backward()
        opt.step()

    def cleanup() -> None:
        unet.unload_lora()  # put the plain Linear layers back

    return ctx.maybe_graph(step), cleanup, {}


def _unziplora(ctx: Context, label: str = "unziplora", merge_grad: str | None = None):
    from cstoolkit.methods.unziplora import UnZipLoRAConfig, UnZipLoRATrainer

    cfg = UnZipLoRAConfig(rank=ctx.args.rank)
    trainer = UnZipLoRATrainer(ctx.backbone, cfg, ctx.latents, ctx.cond, ctx.cond, ctx.cond, noise=ctx.noise,
                               autocast=ctx.autocast, cuda_graph=ctx.graph, compiler=ctx.compiler)
    for bank in trainer.loras.banks.values() if merge_grad else ():
        bank.merge_grad = merge_grad
    ctx.adapted[label] = ctx.adapted["unziplora_scoring_step"] = trainer.loras.names
    for i in range(trainer.warmup):  # warm-up and the first masks, as in a real run
        trainer.step(i)
    counter = {"i": trainer.warmup + 1}

    def step() -> None:
        trainer.step(counter["i"])  # a masked step (no recalibration)
        counter["i"] += 1

    def scoring() -> None:
        trainer._scored_backward()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step, trainer.loras.remove, {"unziplora_scoring_step": scoring}


STEPS.update({"frozen_into_latents": _frozen, "unziplora": _unziplora, "peft_lora": _peft_lora})


def _dreambooth(ctx: Context, blocks: tuple[str, ...] | None = None, label: str = "dreambooth_lora",
                merge_grad: str | None = None):
    from cstoolkit.methods._sdxl_lora import TrainingImages, target_linears
    from cstoolkit.methods.dreambooth_lora import DreamBoothLoRATrainer

    names = target_linears(ctx.backbone, blocks=blocks)
    ctx.adapted[label] = names
    trainer = DreamBoothLoRATrainer(ctx.backbone, names,
                                    TrainingImages(ctx.latents, ctx.cond), rank=ctx.args.rank, lr=5e-5,
                                    noise=ctx.noise, autocast=ctx.autocast, cuda_graph=ctx.graph,
                                    compiler=ctx.compiler)
    for bank in trainer.loras.banks.values() if merge_grad else ():
        bank.merge_grad = merge_grad
    counter = {"i": 0}

    def step() -> None:
        trainer.step(counter["i"])
        counter["i"] += 1

    return step, trainer.loras.remove, {}


def _b_lora(ctx: Context):
    from cstoolkit.methods.b_lora import CONTENT_BLOCKS, STYLE_BLOCKS

    return _dreambooth(ctx, CONTENT_BLOCKS + STYLE_BLOCKS, label="b_lora")


def _unziplora_lowrank(ctx: Context):
    return _unziplora(ctx, label="unziplora_lowrank_grad", merge_grad="lowrank")


def _dreambooth_lowrank(ctx: Context):
    return _dreambooth(ctx, label="dreambooth_lora_lowrank_grad", merge_grad="lowrank")


def _break_for_make(ctx: Context):
    from cstoolkit.methods._sdxl_lora import TrainingImages, embeds_cat
    from cstoolkit.methods.break_for_make import BreakForMakeConfig, BreakForMakeData, BreakForMakeTrainer

    one = TrainingImages(ctx.latents, ctx.cond)
    three = TrainingImages(ctx.latents.repeat(3, 1, 1, 1), embeds_cat([ctx.cond] * 3))
    live: dict = {}  # one trainer injected at a time: each row builds its own in its warm-up

    def row(schedule: str, stage: str) -> Step:
        def step() -> None:
            if live.get("key") != (schedule, stage):
                if "trainer" in live:
                    live.pop("trainer").loras.remove()
                    # a trainer sits in a reference cycle (its step functions close over it): without a collection
                    # the previous row's trainer (stacked base weights, LoRA, Adam states: ~3.5 GiB at rank 64)
                    # stays allocated; graph mode hid this because a capture runs gc first
                    gc.collect()
                cfg = BreakForMakeConfig(rank=ctx.args.rank, mcp_schedule=schedule)
                trainer = BreakForMakeTrainer(ctx.backbone, cfg, BreakForMakeData(one, one, three, three),
                                              lora_generator=torch.Generator().manual_seed(0),
                                              autocast=ctx.autocast, cuda_graph=ctx.graph, compiler=ctx.compiler)
                trainer.start(stage, ctx.noise, trainer.export() if stage == "make" else None)
                live.update(key=(schedule, stage), trainer=trainer, i=0)
                for label in ("break_for_make", "break_for_make_mcp_all3", "break_for_make_make"):
                    ctx.adapted[label] = trainer.loras.names
            live["trainer"].step(live["i"])
            live["i"] += 1

        return step

    def cleanup() -> None:
        if "trainer" in live:
            live.pop("trainer").loras.remove()

    return row("cycle", "content"), cleanup, {"break_for_make_mcp_all3": row("all", "content"),
                                              "break_for_make_make": row("cycle", "make")}


def _ziplora(ctx: Context):
    from cstoolkit.lora import LoRASet
    from cstoolkit.methods._sdxl_lora import TrainingImages, target_linears
    from cstoolkit.methods.ziplora import ZipLoRAConfig, ZipLoRATrainer

    names = target_linears(ctx.backbone)
    g = torch.Generator().manual_seed(0)
    loras = {role: LoRASet(ctx.backbone.unet, names, ctx.args.rank, ("x",), generator=g).export("x")
             for role in ("content", "style")}  # two random LoRAs (not injected)
    one = TrainingImages(ctx.latents, ctx.cond)
    trainer = ZipLoRATrainer(ctx.backbone, ZipLoRAConfig(), loras, one, one, noise=ctx.noise,
                             autocast=ctx.autocast, cuda_graph=ctx.graph, compiler=ctx.compiler)
    ctx.adapted["ziplora"] = trainer.loras.names
    counter = {"i": 0}

    def step() -> None:
        trainer.step(counter["i"])
        counter["i"] += 1

    return step, trainer.loras.remove, {}


#: single-image forward+backward passes a step makes (its fair reference is that many frozen steps)
PASSES = {"break_for_make": 2, "break_for_make_mcp_all3": 4, "break_for_make_make": 2, "ziplora": 2}

#: gradient-free forwards a step must also make (ZipLoRA's targets: each LoRA alone on its own image); the
#: cheapest step a method could have is ``passes`` honest references plus that many frozen forwards
TARGET_FORWARDS = {"ziplora": 2}

#: rows whose step is slow and rare: fewer steps per timing
FEW_ITERS = {"unziplora_scoring_step": 2}

STEPS.update({"dreambooth_lora": _dreambooth, "dreambooth_lora_lowrank_grad": _dreambooth_lowrank,
              "unziplora_lowrank_grad": _unziplora_lowrank, "b_lora": _b_lora,
              "break_for_make": _break_for_make, "ziplora": _ziplora})


def measure(ctx: Context, step: Step, iters: int | None = None) -> tuple[list[float], float]:
    """(seconds per step of each of ``--repeats`` timings of ``iters`` steps, peak GiB) of ``step``."""
    args = ctx.args
    iters = iters or args.iters
    cuda = ctx.device.type == "cuda"
    # a graphed step makes EAGER_WARMUP eager calls, then captures: warm up past both (and past a compile,
    # which the first call makes), so the timings hold replays only
    for _ in range(args.warmup + (EAGER_WARMUP + 1 if ctx.graph else 0)):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                step()
            times.append((time.perf_counter() - t0) / iters)
    return times, (torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))


def _free(ctx: Context) -> None:
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def profile(ctx: Context, step: Step, n: int = 3) -> None:
    """Print where a step's time goes: top ops by device time and by CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(n):
            step()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
    table = prof.key_averages()
    sort = "self_cuda_time_total" if ctx.device.type == "cuda" else "self_cpu_time_total"
    print(table.table(sort_by=sort, row_limit=40, max_name_column_width=70))


def _record(times: list[float], peak: float) -> dict:
    return {"s_per_step": statistics.median(times), "min": min(times), "max": max(times), "repeats": times,
            "peak_gib": peak}


@contextlib.contextmanager
def compiled_row(ctx: Context, label: str, records: dict[str, list[dict]]):
    """In ``compiled`` mode: the UNet compiled for one row or reference (in-memory Dynamo caches reset first,
    so each compiles on its own), its compile records kept under ``label``; plain otherwise."""
    if not ctx.compiled:
        yield
        return
    torch._dynamo.reset()
    ctx.compiler = CompiledForward(ctx.backbone.unet, label=label, backend=ctx.args.compile_backend,
                                   cache_dir=ctx.args.cache_dir)
    try:
        yield
    finally:
        records[label] = [r.as_dict() for r in ctx.compiler.records]
        for r in ctx.compiler.records:
            print(f"[compiled] {r.describe()}", flush=True)
        ctx.compiler.remove()
        ctx.compiler = None


def _reference(ctx: Context, refs: dict[str, dict], layer: str, records: dict[str, list[dict]]) -> dict:
    """The honest reference of ``layer`` (measured once per mode, on the plain frozen UNet)."""
    if layer not in refs:
        with compiled_row(ctx, f"frozen_from {layer}", records):
            step, cleanup = frozen_from(ctx, layer)
            refs[layer] = _record(*measure(ctx, step))
            del step
            cleanup()
        _free(ctx)
    return refs[layer]


def _plain_reference(ctx: Context, label: str, build: Callable, records: dict[str, list[dict]]) -> dict:
    with compiled_row(ctx, label, records):
        step, cleanup, _ = build(ctx)
        ref = _record(*measure(ctx, step))
        del step
        cleanup()
    _free(ctx)
    return ref


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sdxl-base", help="with random weights (backbone.random_weights)")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3, help="steps before the timings (after a CUDA-graph capture)")
    p.add_argument("--iters", type=int, default=10, help="steps per timing")
    p.add_argument("--repeats", type=int, default=3, help="timings per row (median and min-max reported; >= 3)")
    p.add_argument("--only", nargs="*", default=None, help="rows to run (the references always run)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--profile", nargs="*", default=(), help="rows to profile (torch.profiler): top ops printed")
    p.add_argument("--modes", nargs="+", choices=["eager", "graph", "compiled"], default=None,
                   help="graph: replay each step as a CUDA graph (default on CUDA: what the methods do); "
                        "eager: launch every kernel from Python (default on CPU); compiled: the UNet under "
                        "torch.compile (replayed as a CUDA graph on CUDA)")
    p.add_argument("--references", choices=["all", "honest", "none"], default="all",
                   help="all: into the latents, forward only and each row's honest reference; honest: only the "
                        "honest references (with no rows: that of the first attention projection); none")
    p.add_argument("--autocast", choices=["auto", "on"], default="auto",
                   help="auto: no autocast where the UNet's weights already are --dtype (as the methods run); "
                        "on: bf16/fp16 autocast around every step (before issue 22)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled mode "
                                                                 "(aot_eager: a quick CPU smoke test)")
    p.add_argument("--cache-dir", default=None, help="on-disk compile cache (default: a fresh temporary folder, so "
                                                     "every compile is cold; a user's TORCHINDUCTOR_CACHE_DIR wins)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: --preset tiny --device cpu --resolution 128 "
                                                       "--iters 2 --warmup 1 (other options still apply)")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset, args.device, args.resolution, args.iters, args.warmup = "tiny", "cpu", 128, 2, 1
    if args.repeats < 3:
        p.error("--repeats must be at least 3 (median and min-max of the repeats are reported)")
    if args.device == "cpu" and args.dtype != "fp32":
        args.dtype = "fp32"
    if args.cache_dir is None:
        args.cache_dir = tempfile.mkdtemp(prefix="sdxl_step_compile_")
    torch.backends.cuda.matmul.allow_tf32 = True
    ctx = Context(args)
    print(f"device {torch.cuda.get_device_name() if ctx.device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"preset {args.preset} (random weights), {args.resolution}², {args.dtype}, autocast "
          f"{'on' if ctx.use_autocast else 'off'}, rank {args.rank}, build {ctx.build_s:.1f} s, "
          f"{args.repeats} x {args.iters} steps per row after {args.warmup} warm-up")
    modes = args.modes or (["graph"] if ctx.device.type == "cuda" else ["eager"])
    names = [n for n in STEPS if n != "frozen_into_latents" and (args.only is None or n in args.only)]
    results: dict[str, dict[str, dict]] = {}
    for mode in modes:
        ctx.compiled = mode == "compiled"
        ctx.graph = mode == "graph" or (ctx.compiled and ctx.device.type == "cuda")
        rows: dict[str, dict] = {}
        refs: dict[str, dict] = {}  # first adapted layer -> honest reference
        compiles: dict[str, list[dict]] = {}  # compiled mode: row/reference -> compile records

        latents_ref = forward_ref = None
        if args.references == "all":
            latents_ref = _plain_reference(ctx, "frozen_into_latents", STEPS["frozen_into_latents"], compiles)
            forward_ref = _plain_reference(ctx, "frozen_forward", _frozen_forward, compiles)
        for name in names:
            with compiled_row(ctx, name, compiles):
                step, cleanup, extra = STEPS[name](ctx)
                for label, fn in {name: step, **extra}.items():
                    rows[label] = _record(*measure(ctx, fn, FEW_ITERS.get(label)))
                    if label in args.profile and mode == "eager":
                        profile(ctx, fn)
                del step, extra
                cleanup()
            _free(ctx)
            for label in [n for n in rows if "first_adapted" not in rows[n]]:
                rows[label]["first_adapted"] = ctx.first_adapted(label)
        if args.references != "none":
            layers = [row["first_adapted"] for row in rows.values()] or [ctx.first_adapted("")]
            for layer in layers:  # after every row: the UNet is the plain frozen one again
                _reference(ctx, refs, layer, compiles)
        print(f"[{mode}] references (frozen UNet forward + backward; median [min-max] s/step, peak GiB)")
        if latents_ref is not None:
            print(f"[{mode}]   {'into the input latents':<62} {latents_ref['s_per_step']:.4f} "
                  f"[{latents_ref['min']:.4f}-{latents_ref['max']:.4f}] {latents_ref['peak_gib']:6.2f}")
        for layer, ref in refs.items():
            print(f"[{mode}]   from {layer:<57} {ref['s_per_step']:.4f} [{ref['min']:.4f}-{ref['max']:.4f}] "
                  f"{ref['peak_gib']:6.2f}")
        if forward_ref is not None:
            print(f"[{mode}]   {'forward only, no gradient':<62} {forward_ref['s_per_step']:.4f} "
                  f"[{forward_ref['min']:.4f}-{forward_ref['max']:.4f}] {forward_ref['peak_gib']:6.2f}")
        print(f"[{mode}] {'step':<28} {'s/step':>8} {'min-max':>15} {'x latents':>9} {'x honest':>8} "
              f"{'(min-max)':>13} {'passes':>6} {'x honest/pass':>13} {'x cheapest':>10} {'peak GiB':>9}")
        nan = float("nan")
        for label, row in rows.items():
            ref = refs.get(row["first_adapted"])
            ref_s = ref["s_per_step"] if ref is not None else nan
            row["ratio_latents"] = row["s_per_step"] / latents_ref["s_per_step"] if latents_ref else nan
            row["ratio"] = row["s_per_step"] / ref_s
            row["ratio_min"], row["ratio_max"] = row["min"] / ref_s, row["max"] / ref_s
            passes, forwards = PASSES.get(label, 1), TARGET_FORWARDS.get(label, 0)
            row["passes"], row["ratio_per_pass"] = passes, row["ratio"] / passes
            # the cheapest step the method could make: its passes as honest references + its target forwards
            cheapest = passes * ref_s + forwards * (forward_ref["s_per_step"] if forward_ref else nan)
            row["target_forwards"], row["ratio_cheapest"] = forwards, row["s_per_step"] / cheapest
            spread = f"{row['ratio_min']:.3f}-{row['ratio_max']:.3f}"
            print(f"[{mode}] {label:<28} {row['s_per_step']:>8.4f} {row['min']:>7.4f}-{row['max']:<7.4f} "
                  f"{row['ratio_latents']:>9.3f} {row['ratio']:>8.3f} {spread:>13} "
                  f"{passes:>6} {row['ratio_per_pass']:>13.3f} {row['ratio_cheapest']:>10.3f} {row['peak_gib']:>9.2f}")
        results[mode] = {"frozen_into_latents": latents_ref, "frozen_forward": forward_ref, "frozen_from": refs,
                         "rows": rows, "compiles": compiles}
    if args.json is not None:
        device = torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu"
        plain = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"args": plain, "device": device, "torch": torch.__version__,
                                         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
