"""Command line: ``cstoolkit list-methods | list-backbones | show-recipe | run | generate | export | eval | bench``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from .device import DEVICE_HELP, add_device_argument, check_device, runtime_device
from .errors import TrainingDiverged, UserError


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p = argparse.ArgumentParser(
        prog="cstoolkit", parents=[common],
        description="Content-style decomposition and style personalisation of text-to-image models.",
        epilog="Example: cstoolkit run recipes/unziplora.yaml --set params.steps=100")
    from . import __version__

    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    lm = sub.add_parser("list-methods", parents=[common], help="methods x backbones matrix, summary, paper")
    lm.add_argument("--json", action="store_true", help="machine-readable output")
    lb = sub.add_parser("list-backbones", parents=[common], help="backbones and their presets")
    lb.add_argument("--json", action="store_true", help="machine-readable output")

    sr = sub.add_parser("show-recipe", parents=[common], help="print the resolved recipe")
    sr.add_argument("recipe", type=Path)
    sr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    run = sub.add_parser("run", parents=[common], help="fit a recipe, save the decomposition, sample its prompts")
    run.add_argument("recipe", type=Path)
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe value, e.g. --set params.steps=50")
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    add_device_argument(run, "the recipe's runtime.device (default: the recipe's): auto, cpu, cuda or cuda:N")

    gen = sub.add_parser("generate", parents=[common], help="generate from a saved decomposition")
    gen.add_argument("decomposition", type=Path, nargs="?", help="a run's decomposition/ folder (or the run folder)")
    gen.add_argument("--content", type=Path, help="take the content from this decomposition")
    gen.add_argument("--style", type=Path, help="take the style from this decomposition")
    gen.add_argument("--prompt", action="append", required=True, help="prompt with <c> and/or <s>; repeatable")
    gen.add_argument("--use", choices=["content", "style", "both"], default=None,
                     help="default: both (or the method's only use), or what --content/--style give")
    gen.add_argument("--num-images", type=int, default=None, help="images per prompt (default: the recipe's)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=None, help="sampling steps (default: the recipe's)")
    gen.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: the "
                     "recipe's); scale-wise methods: their logit guidance cfg")
    gen.add_argument("--negative-prompt", default=None, help="where the method takes one")
    gen.add_argument("--height", type=int, default=None, help="image height in pixels (default: the backbone's)")
    gen.add_argument("--width", type=int, default=None, help="image width in pixels (default: the backbone's)")
    gen.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                     help="any other sampling option of the method (see its GenerateConfig), e.g. --option tau=0.5")
    gen.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/samples; with --content "
                     "and --style: the content RUN's samples/combined/STYLE_RUN)")
    add_device_argument(gen)

    ex = sub.add_parser("export", parents=[common], help="write a run's LoRAs for other tools (kohya / A1111 / "
                        "ComfyUI layout)")
    ex.add_argument("run_dir", type=Path, metavar="RUN", help="a run folder or its decomposition/ folder")
    ex.add_argument("--format", default="kohya", help="kohya (lora_unet_..._lora_down.weight, .alpha) or diffusers")
    ex.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/export/FORMAT)")
    ex.add_argument("--dtype", default="fp16", help="fp16 (default), bf16 or fp32")

    ev = sub.add_parser("eval", parents=[common], help="score a run's samples (CSD-C, CLIP-I, CSD-S, DINO, CLIP-T)")
    ev.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    _metric_args(ev)
    add_device_argument(ev, "device of the metric models: " + DEVICE_HELP)

    be = sub.add_parser("bench", parents=[common], help="run recipes over a dataset, score, tabulate "
                        "(shards over processes under torchrun / accelerate launch)")
    be.add_argument("--data", type=Path, required=True,
                    help="folder in the CSD-100 layout (<content>+<style>/00.jpg) or a YAML list of items")
    be.add_argument("--recipe", dest="recipes", action="append", required=True, type=Path, metavar="RECIPE",
                    help="a recipe to benchmark; repeatable")
    be.add_argument("--out", type=Path, required=True, help="output folder (one run folder per recipe and item)")
    be.add_argument("--prompts", type=Path, default=None, help="YAML with content:/style: prompt lists "
                    "(default: the CSD-100 protocol's 25 content and 21 style prompts)")
    be.add_argument("--num-images", type=int, default=None, help="images per prompt (default: the prompts file's)")
    be.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a value of every recipe (--set params.steps=50) or of one, named after its "
                    "file (--set unziplora:params.steps=50)")
    be.add_argument("--time-limit", type=float, default=None, metavar="SECONDS", help="start no new unit after "
                    "this long; the tables hold the finished units, a rerun runs the rest")
    _metric_args(be, allow_none=True)
    add_device_argument(be, "device of every run and of the metric models: " + DEVICE_HELP)
    _add_plugin_commands(sub, common)
    return p


PLUGIN_GROUP = "cstoolkit.commands"


def _add_plugin_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Subcommands from other packages: each entry point of the group ``cstoolkit.commands`` names a
    function ``add_commands(subparsers, common)`` that adds its parsers (``parents=[common]``) and sets
    ``set_defaults(plugin_handler=fn)``, where ``fn(args) -> int`` runs the command. A plugin that
    fails to load is skipped with a warning (``--debug`` shows why)."""
    from importlib import metadata

    # every distribution's entry points, not only the first of a name: a stale ``*.egg-info`` in the
    # working directory (left by an older editable install) must not hide the installed ones
    found: dict[str, metadata.EntryPoint] = {}
    for dist in metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == PLUGIN_GROUP:
                found.setdefault(ep.name, ep)
    for ep in sorted(found.values(), key=lambda e: e.name):
        try:
            ep.load()(sub, common)
        except Exception as exc:  # noqa: BLE001 - one broken plugin must not break the CLI
            logging.getLogger(__name__).warning("command plugin %s not loaded: %s", ep.name, exc)


def _metric_args(parser: argparse.ArgumentParser, allow_none: bool = False) -> None:
    parser.add_argument("--metrics-preset", default="paper",
                        help="paper (CLIP ViT-B/32, CSD ViT-L, DINO ViT-S/16), paper-clip-l, tiny (random, offline)"
                        + (", none (no scores)" if allow_none else ""))
    parser.add_argument("--metric-weights", action="append", default=[], metavar="MODEL=FILE",
                        help="weights of one metric model (clip, csd, dino): a local file or a hub repo")


def _decomposition_dir(path: Path) -> Path:
    if (path / "decomposition" / "manifest.json").is_file():
        return path / "decomposition"
    return path


def _cmd_list_methods(args: argparse.Namespace) -> int:
    from . import registry

    registry.require_any(registry.METHOD_GROUP, "list-methods")
    backbones = registry.backbones()
    rows = [
        {"name": n, "family": c.family, "backbones": list(c.backbones), "uses": list(c.uses), "summary": c.summary,
         "paper": c.paper, "supports": [b for b, bc in backbones.items() if registry.supports(c, b, bc)]}
        for n, c in registry.methods().items()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max([len(r["name"]) for r in rows] + [6])
    cols = [max(len(b), 3) for b in backbones]
    print(f"{'METHOD':<{width}}  " + "  ".join(f"{b:<{w}}" for b, w in zip(backbones, cols)) + "  SUMMARY  [PAPER]")
    for r in rows:
        cells = "  ".join(f"{'yes' if b in r['supports'] else '-':<{w}}" for b, w in zip(backbones, cols))
        print(f"{r['name']:<{width}}  {cells}  {r['summary']}  [{r['paper']}]")
    return 0


def _cmd_list_backbones(args: argparse.Namespace) -> int:
    from . import registry

    registry.require_any(registry.BACKBONE_GROUP, "list-backbones")
    rows = [{"name": n, "family": c.family, "presets": dict(c.presets)} for n, c in registry.backbones().items()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']}  ({r['family']})")
        for preset, desc in r["presets"].items():
            print(f"  preset {preset}: {desc}")
    return 0


def _cmd_show_recipe(args: argparse.Namespace) -> int:
    from .recipe import load_recipe

    print(load_recipe(args.recipe, args.overrides).to_yaml(), end="")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .api import Decomposer

    overrides = list(args.overrides)
    device = runtime_device(args.device)
    if device is not None:
        overrides.append(f"runtime.device={device}")
    result = Decomposer.from_recipe(args.recipe, overrides, resume=args.resume, overwrite=args.overwrite).run()
    print(f"decomposition: {result.output_dir / 'decomposition'}")
    for use, prompts in result.samples.items():
        print(f"samples/{use}: {sum(len(p) for p in prompts.values())} images")
    if result.grid is not None:
        print(f"grid: {result.grid}")
    return 0


#: generate's flags for common sampling options -> the GenerateConfig fields that take them, in order
#: (scale-wise methods call classifier-free guidance ``cfg``); every field present gets the value
_SAMPLING_FLAGS = {"--steps": ("steps",), "--guidance-scale": ("guidance_scale", "cfg"),
                   "--negative-prompt": ("negative_prompt",)}


def _sampling_options(args: argparse.Namespace, method: object, method_name: str) -> dict[str, object]:
    """generate's sampling flags as options of ``method`` (its ``GenerateConfig`` fields); a flag the
    method has no field for stops with one line naming it and what the method takes."""
    import dataclasses

    import yaml

    fields = [f.name for f in dataclasses.fields(method.GenerateConfig)]  # type: ignore[attr-defined]
    takes = f"the {method_name} method's sampling options are: {', '.join(fields) or 'none'}"
    options: dict[str, object] = {}
    for flag, names in _SAMPLING_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        hits = [n for n in names if n in fields]
        if not hits:
            raise UserError(flag, f"the {method_name} method cannot take it", takes)
        options.update(dict.fromkeys(hits, value))
    if args.height is not None or args.width is not None:
        if "height" in fields and "width" in fields:
            options.update({k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None})
        if "resolution" in fields:  # square images only
            sides = {v for v in (args.height, args.width) if v is not None}
            if len(sides) == 1:
                options["resolution"] = sides.pop()
            elif "height" not in fields:
                raise UserError("--height", f"the {method_name} method makes square images",
                                f"expected --height equal to --width (or only one of them); {takes}")
        if "height" not in fields and "resolution" not in fields:
            raise UserError("--height" if args.height is not None else "--width",
                            f"the {method_name} method cannot take it", takes)
    for item in args.options:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError("--option", f"'{item}' has no '='", "expected KEY=VALUE, e.g. --option steps=20")
        if key not in fields:
            raise UserError("--option", f"unknown sampling option '{key}'", takes)
        try:
            options[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            options[key] = raw
    return options


def _run_folder(dec_path: Path) -> Path:
    """The run folder of a decomposition folder (``RUN/decomposition`` -> ``RUN``)."""
    return dec_path.parent if dec_path.name == "decomposition" else dec_path


def _cmd_generate(args: argparse.Namespace) -> int:
    from .decomposition import Decomposition
    from .io import make_writable_dir, save_image, slugify
    from .method import CONTENT_TOKEN, STYLE_TOKEN, check_placeholders
    from .recipe import generate_options

    if args.num_images is not None and args.num_images < 1:
        raise UserError("--num-images", f"got {args.num_images}", "expected at least 1")
    device = runtime_device(args.device)
    if args.content is not None or args.style is not None:
        from .combine import combine

        if args.decomposition is not None:
            raise UserError("generate", "a DECOMPOSITION folder and --content/--style were both given",
                            "give either one folder or --content and/or --style")
        dec = combine(content=args.content and _decomposition_dir(args.content),
                      style=args.style and _decomposition_dir(args.style), device=device)
        use = args.use or ("both" if args.content and args.style else "content" if args.content else "style")
        # the placeholders the given parts supply (one folder alone is returned whole by combine)
        allowed = {t: v for t, v in dec.placeholders.items()
                   if (t != CONTENT_TOKEN or args.content) and (t != STYLE_TOKEN or args.style)}
        sources = {CONTENT_TOKEN: "--content RUN", STYLE_TOKEN: "--style RUN"}
        first = _run_folder(_decomposition_dir(args.content or args.style))
        out = args.out or (first / "samples" / "combined" / _run_folder(_decomposition_dir(args.style)).name
                           if args.content and args.style else first / "samples")
    else:
        if args.decomposition is None:
            raise UserError("generate", "no decomposition given", "expected DECOMPOSITION_DIR or --content/--style")
        dec = Decomposition.load(_decomposition_dir(args.decomposition), device=device, where="DECOMPOSITION")
        use = args.use or dec.method_impl.default_use()
        allowed = dict(dec.placeholders)
        sources = {CONTENT_TOKEN: "a decomposition with a content part (--content RUN)",
                   STYLE_TOKEN: "a decomposition with a style part (--style RUN)"}
        out = args.out or _run_folder(dec.path or args.decomposition) / "samples"
    method = dec.method_impl
    options = _sampling_options(args, method, dec.method)
    generate_options(method, dec.recipe, options)  # values checked before any model is loaded
    num_images = args.num_images or int((dec.recipe.get("generate") or {}).get("num_images") or 1)
    for i, prompt in enumerate(args.prompt):
        where = "--prompt" if len(args.prompt) == 1 else f"--prompt[{i}]"
        method.check_prompts([prompt], use, where=where)
        check_placeholders(prompt, allowed, where, sources)
    make_writable_dir(out, "--out")  # before any image is made
    for prompt in args.prompt:
        images = dec.generate(prompt, use=use, num_images=num_images, seed=args.seed, **options)
        for i, im in enumerate(images):
            path = out / use / slugify(prompt) / f"{i}.png"
            save_image(im, path)
            print(path)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import describe, export_loras

    print(describe(export_loras(args.run_dir, args.format, args.out, args.dtype)))
    return 0


def _weights(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, source = item.partition("=")
        if not sep or not source:
            raise UserError("--metric-weights", f"'{item}' has no '='", "expected MODEL=FILE, e.g. csd=csd_vit_l.pth")
        out[name.strip()] = source.strip()
    return out


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run, format_table
    from .report import write_run_report

    device = check_device(args.device)
    result = evaluate_run(args.run_dir, preset=args.metrics_preset, weights=_weights(args.metric_weights),
                          device=None if device in (None, "auto") else device)
    write_run_report(args.run_dir)
    print(format_table(result))
    print(f"metrics: {args.run_dir / 'metrics.json'}")
    print(f"report: {args.run_dir / 'report.html'}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench

    preset = None if args.metrics_preset == "none" else args.metrics_preset
    result = bench(args.data, args.recipes, args.out, overrides=args.overrides, prompts=args.prompts,
                   num_images=args.num_images, metrics_preset=preset, metric_weights=_weights(args.metric_weights),
                   device=args.device, time_limit=args.time_limit)
    if result.rank == 0:
        from .bench import means_markdown

        print(means_markdown(result.means, result.note), end="")
        failed = sum(1 for r in result.rows if r.get("status") != "done")
        print(f"results: {args.out / 'results.csv'} ({len(result.rows)} runs, {failed} failed)")
        print(f"report: {args.out / 'report.html'}")
        return 1 if failed else 0
    return 0


COMMANDS = {
    "list-methods": _cmd_list_methods,
    "list-backbones": _cmd_list_backbones,
    "show-recipe": _cmd_show_recipe,
    "run": _cmd_run,
    "generate": _cmd_generate,
    "export": _cmd_export,
    "eval": _cmd_eval,
    "bench": _cmd_bench,
}


def _logs_above_progress_bars() -> contextlib.AbstractContextManager:
    """Log lines printed above the progress bars, not glued to the end of the bar's line (tqdm's
    logging redirect), where the logs go to the console; else nothing changes."""
    console = any(isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr)
                  for h in logging.getLogger().handlers)
    if not console:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cstoolkit`` command; returns the exit code."""
    from .cpu import configure_cpu

    cpu = configure_cpu()  # OpenMP threads and wait policy: before anything imports torch
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("cstoolkit.cpu").debug(cpu.describe())
    # time per phase; a bench's units in a log file; notes such as where a method's data came from
    for name in ("cstoolkit.phases", "cstoolkit.bench", "cstoolkit.notes"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.debug else logging.INFO)
    try:
        handler = getattr(args, "plugin_handler", None) or COMMANDS[args.command]
        with _logs_above_progress_bars():
            return handler(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"cstoolkit: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        if args.debug:
            raise
        print(f"cstoolkit: error: training stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cstoolkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
