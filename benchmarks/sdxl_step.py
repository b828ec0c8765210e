"""SDXL training-step benchmark: every adapter step as a ratio to the frozen UNet's forward+backward.

    python benchmarks/sdxl_step.py                         # GPU: sdxl-base-random, 1024², bf16, rank 64
    python benchmarks/sdxl_step.py --preset tiny --device cpu --resolution 128 --iters 3   # smoke test

All rows are measured in one run on the same inputs:

* ``frozen``: the UNet's own forward + backward (no adapter; gradients flow to the input latents);
* ``peft_lora``: a plain diffusers-style PEFT LoRA step (rank r on to_q/k/v/out.0 of every attention,
  fp32 adapter weights under bf16 autocast, AdamW);
* ``unziplora``: UnZipLoRA's real training step (``UnZipLoRATrainer.step``: two LoRAs with prompt
  separation, column masks, mergers, orthogonality loss, Adam) after its warm-up; its rare
  importance-scoring step is reported on its own line;
* ``frozen_x2``, ``frozen_x4``: the frozen forward + backward on 2 and 4 images at once, the reference
  of the steps below that see more than one image per step;
* ``dreambooth_lora``, ``b_lora``: DreamBooth-LoRA's step (one LoRA on every attention, 1 image) and
  B-LoRA's (the same on up_blocks.0.attentions.0/1 only);
* ``break_for_make``: a content-stage step (PLP: the content image trains B, MCP ``cycle``: one other
  style image trains D; 2 single-image passes); ``break_for_make_mcp_all3``: the same with MCP over 3
  other styles (Eq. 17, the official code's n; 4 single-image passes, gradients accumulated:
  ``micro_batch: 1``); ``break_for_make_make``: a make step (LoRA_f on the content and the style
  image, 2 single-image passes);
* ``ziplora``: a merge step (two frozen LoRAs with learned mergers: 2 single-image passes with grad, the 2 target
  passes of each LoRA alone without);
* further methods register a builder in ``STEPS``.

Each row prints seconds per step (mean of ``--iters`` after ``--warmup`` steps, CUDA events), the
ratio to ``frozen`` and the peak GPU memory of that row, in two modes: ``eager`` (every kernel
launched from Python) and ``graph`` (each row's step, the frozen one included, replayed as a CUDA
graph). At batch 1 on an H100/H200 eager SDXL steps are bound by kernel launches on the CPU, so
the graph mode is the one that measures GPU work. Weights are random: speed and memory only.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from cstoolkit.backbone import PromptEmbeds
from cstoolkit.cuda_graph import GraphedStep

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
        self.backbone = SDXLBackbone.from_config(SDXLConfig(preset=args.preset, resolution=args.resolution),
                                                 device=self.device, dtype=self.dtype)
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

    def draw(self) -> None:
        """Noise and timestep of the next step, drawn eagerly into static tensors."""
        self._noise.copy_(torch.randn(self._noise.shape, generator=self.noise, device=self.device))
        self._t.copy_(torch.randint(0, 1000, (1,), generator=self.noise, device=self.device))

    graph = False  # set per mode by main()

    def maybe_graph(self, step: Step) -> Step:
        """The step as a replayed CUDA graph in ``graph`` mode (same kernels, no launch overhead)."""
        run = GraphedStep(step) if self.graph else step

        def drawn() -> None:
            self.draw()
            run()

        return drawn

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32 or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.dtype)

    def loss(self, latents: torch.Tensor | None = None) -> torch.Tensor:
        with self.autocast():
            return self.backbone.training_loss(self.latents if latents is None else latents, self.cond,
                                               noise=self._noise, timesteps=self._t)


def _frozen(ctx: Context):
    latents = ctx.latents.clone().requires_grad_(True)

    def step() -> None:
        latents.grad = None
        ctx.loss(latents).backward()

    return ctx.maybe_graph(step), lambda: None, {}


def _peft_lora(ctx: Context):
    from peft import LoraConfig

    unet = ctx.backbone.unet
    r = ctx.args.rank
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


def _unziplora(ctx: Context):
    from cstoolkit.methods.unziplora import UnZipLoRAConfig, UnZipLoRATrainer

    cfg = UnZipLoRAConfig(rank=ctx.args.rank)
    trainer = UnZipLoRATrainer(ctx.backbone, cfg, ctx.latents, ctx.cond, ctx.cond, ctx.cond, noise=ctx.noise,
                               autocast=ctx.autocast, cuda_graph=ctx.graph)
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


STEPS.update({"frozen": _frozen, "unziplora": _unziplora, "peft_lora": _peft_lora})


def _frozen_batch(n: int):
    """The frozen forward + backward on ``n`` images at once (reference of multi-image steps)."""

    def build(ctx: Context):
        from cstoolkit.methods._sdxl_lora import embeds_cat

        latents = ctx.latents.repeat(n, 1, 1, 1).requires_grad_(True)
        cond = embeds_cat([ctx.cond] * n)
        noise = torch.empty(latents.shape, device=ctx.device)
        t = torch.zeros(n, dtype=torch.long, device=ctx.device)

        def step() -> None:
            latents.grad = None
            with ctx.autocast():
                ctx.backbone.training_loss(latents, cond, noise=noise, timesteps=t).backward()

        run = GraphedStep(step) if ctx.graph else step

        def drawn() -> None:
            noise.copy_(torch.randn(noise.shape, generator=ctx.noise, device=ctx.device))
            t.copy_(torch.randint(0, 1000, (n,), generator=ctx.noise, device=ctx.device))
            run()

        return drawn, lambda: None, {}

    return build


def _dreambooth(ctx: Context, blocks: tuple[str, ...] | None = None):
    from cstoolkit.methods._sdxl_lora import TrainingImages, target_linears
    from cstoolkit.methods.dreambooth_lora import DreamBoothLoRATrainer

    trainer = DreamBoothLoRATrainer(ctx.backbone, target_linears(ctx.backbone, blocks=blocks),
                                    TrainingImages(ctx.latents, ctx.cond), rank=ctx.args.rank, lr=5e-5,
                                    noise=ctx.noise, autocast=ctx.autocast, cuda_graph=ctx.graph)
    counter = {"i": 0}

    def step() -> None:
        trainer.step(counter["i"])
        counter["i"] += 1

    return step, trainer.loras.remove, {}


def _b_lora(ctx: Context):
    from cstoolkit.methods.b_lora import CONTENT_BLOCKS, STYLE_BLOCKS

    return _dreambooth(ctx, CONTENT_BLOCKS + STYLE_BLOCKS)


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
                cfg = BreakForMakeConfig(rank=ctx.args.rank, mcp_schedule=schedule)
                trainer = BreakForMakeTrainer(ctx.backbone, cfg, BreakForMakeData(one, one, three, three),
                                              lora_generator=torch.Generator().manual_seed(0),
                                              autocast=ctx.autocast, cuda_graph=ctx.graph)
                trainer.start(stage, ctx.noise, trainer.export() if stage == "make" else None)
                live.update(key=(schedule, stage), trainer=trainer, i=0)
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
                             autocast=ctx.autocast, cuda_graph=ctx.graph)
    counter = {"i": 0}

    def step() -> None:
        trainer.step(counter["i"])
        counter["i"] += 1

    return step, trainer.loras.remove, {}


#: single-image forward+backward passes a step makes (its fair reference is that many frozen steps)
PASSES = {"break_for_make": 2, "break_for_make_mcp_all3": 4, "break_for_make_make": 2, "ziplora": 2}

STEPS.update({"frozen_x2": _frozen_batch(2), "frozen_x4": _frozen_batch(4), "dreambooth_lora": _dreambooth,
              "b_lora": _b_lora, "break_for_make": _break_for_make, "ziplora": _ziplora})


def measure(ctx: Context, step: Step) -> tuple[float, float]:
    """(seconds per step, peak GiB) of ``step``."""
    args = ctx.args
    cuda = ctx.device.type == "cuda"
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iters):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / args.iters, torch.cuda.max_memory_allocated() / 2**30
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    return (time.perf_counter() - t0) / args.iters, float("nan")


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sdxl-base-random")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--only", nargs="*", default=None, help="rows to run (frozen always runs)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--profile", nargs="*", default=(), help="rows to profile (torch.profiler): top ops printed")
    p.add_argument("--modes", nargs="+", choices=["eager", "graph"], default=None,
                   help="eager: launch every kernel from Python; graph: replay each step as a CUDA graph "
                        "(default: both on CUDA, eager on CPU)")
    args = p.parse_args(argv)
    if args.device == "cpu" and args.dtype != "fp32":
        args.dtype = "fp32"
    torch.backends.cuda.matmul.allow_tf32 = True
    ctx = Context(args)
    print(f"device {torch.cuda.get_device_name() if ctx.device.type == 'cuda' else 'cpu'}, preset {args.preset}, "
          f"{args.resolution}², {args.dtype}, rank {args.rank}, build {ctx.build_s:.1f} s")
    modes = args.modes or (["eager", "graph"] if ctx.device.type == "cuda" else ["eager"])
    names = ["frozen"] + [n for n in STEPS if n != "frozen" and (args.only is None or n in args.only)]
    results: dict[str, dict[str, dict[str, float]]] = {}
    for mode in modes:
        ctx.graph = mode == "graph"
        rows: dict[str, dict[str, float]] = {}
        for name in names:
            step, cleanup, extra = STEPS[name](ctx)
            for label, fn in {name: step, **extra}.items():
                seconds, peak = measure(ctx, fn)
                rows[label] = {"s_per_step": seconds, "peak_gib": peak}
                if label in args.profile and mode == "eager":
                    profile(ctx, fn)
            del step, extra
            cleanup()
            gc.collect()
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
        base = rows["frozen"]["s_per_step"]
        print(f"[{mode}] {'step':<28} {'s/step':>8} {'x frozen':>9} {'passes':>6} {'x frozen/pass':>13} "
              f"{'peak GiB':>9}")
        for label, row in rows.items():
            passes = PASSES.get(label, 1)
            row["ratio"] = row["s_per_step"] / base
            row["ratio_per_pass"] = row["ratio"] / passes
            print(f"[{mode}] {label:<28} {row['s_per_step']:>8.4f} {row['ratio']:>9.3f} {passes:>6} "
                  f"{row['ratio_per_pass']:>13.3f} {row['peak_gib']:>9.2f}")
        results[mode] = rows
    if args.json is not None:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
