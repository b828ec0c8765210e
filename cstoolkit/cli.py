"""Command line: ``cstoolkit list-methods | list-backbones | show-recipe | run | generate``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from .errors import TrainingDiverged, UserError


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p = argparse.ArgumentParser(
        prog="cstoolkit", parents=[common],
        description="Content-style decomposition and style personalisation of text-to-image models.",
        epilog="Example: cstoolkit run recipes/unziplora.yaml --set params.steps=100")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    lm = sub.add_parser("list-methods", parents=[common], help="methods with backbone family, summary, paper")
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

    gen = sub.add_parser("generate", parents=[common], help="generate from a saved decomposition")
    gen.add_argument("decomposition", type=Path, nargs="?", help="a run's decomposition/ folder (or the run folder)")
    gen.add_argument("--content", type=Path, help="take the content from this decomposition")
    gen.add_argument("--style", type=Path, help="take the style from this decomposition")
    gen.add_argument("--prompt", action="append", required=True, help="prompt with <c> and/or <s>; repeatable")
    gen.add_argument("--use", choices=["content", "style", "both"], default=None,
                     help="default: both (or the method's only use), or what --content/--style give")
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=None, help="override the sampling steps")
    gen.add_argument("--out", type=Path, default=Path("samples"), help="output folder (default: ./samples)")
    gen.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    return p


def _decomposition_dir(path: Path) -> Path:
    if (path / "decomposition" / "manifest.json").is_file():
        return path / "decomposition"
    return path


def _cmd_list_methods(args: argparse.Namespace) -> int:
    from . import registry

    rows = [
        {"name": n, "family": c.family, "backbones": list(c.backbones), "uses": list(c.uses), "summary": c.summary,
         "paper": c.paper}
        for n, c in registry.methods().items()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max([len(r["name"]) for r in rows] + [4])
    fam = max([len(r["family"]) for r in rows] + [6])
    print(f"{'NAME':<{width}}  {'FAMILY':<{fam}}  SUMMARY  [PAPER]")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['family']:<{fam}}  {r['summary']}  [{r['paper']}]")
    return 0


def _cmd_list_backbones(args: argparse.Namespace) -> int:
    from . import registry

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

    result = Decomposer.from_recipe(args.recipe, args.overrides, resume=args.resume, overwrite=args.overwrite).run()
    print(f"decomposition: {result.output_dir / 'decomposition'}")
    for use, prompts in result.samples.items():
        print(f"samples/{use}: {sum(len(p) for p in prompts.values())} images")
    if result.grid is not None:
        print(f"grid: {result.grid}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .decomposition import Decomposition
    from .io import save_image, slugify

    if args.num_images < 1:
        raise UserError("--num-images", f"got {args.num_images}", "expected at least 1")
    if args.content is not None or args.style is not None:
        from .combine import combine

        if args.decomposition is not None:
            raise UserError("generate", "a DECOMPOSITION folder and --content/--style were both given",
                            "give either one folder or --content and/or --style")
        dec = combine(content=args.content and _decomposition_dir(args.content),
                      style=args.style and _decomposition_dir(args.style), device=args.device)
        use = args.use or ("both" if args.content and args.style else "content" if args.content else "style")
    else:
        if args.decomposition is None:
            raise UserError("generate", "no decomposition given", "expected DECOMPOSITION_DIR or --content/--style")
        dec = Decomposition.load(_decomposition_dir(args.decomposition), device=args.device, where="DECOMPOSITION")
        use = args.use or dec.method_impl.default_use()
    options = {} if args.steps is None else {"steps": args.steps}
    for prompt in args.prompt:
        images = dec.generate(prompt, use=use, num_images=args.num_images, seed=args.seed, **options)
        for i, im in enumerate(images):
            path = args.out / use / slugify(prompt) / f"{i}.png"
            save_image(im, path)
            print(path)
    return 0


COMMANDS = {
    "list-methods": _cmd_list_methods,
    "list-backbones": _cmd_list_backbones,
    "show-recipe": _cmd_show_recipe,
    "run": _cmd_run,
    "generate": _cmd_generate,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cstoolkit`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
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
