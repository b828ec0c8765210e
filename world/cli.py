"""``cstoolkit world ...``: render, classify, train-oracle, train-identity, identity-auc, bench (and train).

``train`` comes from world/train.py.

Registered through the entry-point group ``cstoolkit.commands`` (setup.cfg), so the core CLI names
nothing of the world.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from cstoolkit.device import add_device_argument, check_device
from cstoolkit.errors import UserError


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``world`` and its subcommands to the core CLI (entry point of ``cstoolkit.commands``)."""
    w = sub.add_parser("world", parents=[common], help="the synthetic content/style world: render, classify, bench",
                       description="A procedural world whose content and style are known by construction.")
    wsub = w.add_subparsers(dest="world_command", required=True, metavar="WORLD_COMMAND")

    r = wsub.add_parser("render", parents=[common], help="draw a world image")
    r.add_argument("--content", required=True, help="a content name (cstoolkit world list)")
    r.add_argument("--style", required=True, help="a style name (cstoolkit world list)")
    r.add_argument("--seed", type=int, default=0, help="pose and style jitter (default 0)")
    r.add_argument("--instance", type=int, default=None, help="identity details of the object (default: --seed)")
    r.add_argument("--size", type=int, default=128, help="pixels (default 128)")
    r.add_argument("--out", type=Path, required=True, help="output image file (.png)")
    r.set_defaults(plugin_handler=_cmd_render)

    ls = wsub.add_parser("list", parents=[common], help="contents, styles and held-out pairs")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(plugin_handler=_cmd_list)

    c = wsub.add_parser("classify", parents=[common], help="oracle content and style of images (one JSON per image)")
    c.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    c.add_argument("--json", action="store_true", help="one JSON object per image and line (default: a readable line)")
    from .shape_gate import ON_BY_DEFAULT as SHAPE_GATE

    c.add_argument("--gate", action=argparse.BooleanOptionalAction, default=SHAPE_GATE,
                   help="pass the content verdict through the shape gate: a silhouette more like a blob than like "
                   f"the named content is rejected (default: {'on' if SHAPE_GATE else 'off'}; --no-gate: the raw "
                   "oracle; docs/world.md 'Shape gate')")
    add_device_argument(c, "device of the oracles: auto (default: cpu here, the oracles are small), cpu, cuda or "
                        "cuda:N")
    c.set_defaults(plugin_handler=_device_checked(_cmd_classify))

    to = wsub.add_parser("train-oracle", parents=[common], help="train the content and style oracle CNNs")
    to.add_argument("--out", type=Path, default=None, help="weights folder (default: the package's world/weights)")
    to.add_argument("--steps", type=int, default=None, help="training steps (default: OracleTrainConfig.steps)")
    to.add_argument("--seed", type=int, default=0)
    to.set_defaults(plugin_handler=_cmd_train_oracle)

    ti = wsub.add_parser("train-identity", parents=[common], help="train the instance-identity net (CPU, minutes)")
    ti.add_argument("--out", type=Path, required=True, help="weights folder (identity.safetensors + identity.json)")
    ti.add_argument("--seconds", type=float, default=None,
                    help="training time budget (default: IdentityTrainConfig.seconds)")
    ti.add_argument("--seed", type=int, default=0)
    ti.set_defaults(plugin_handler=_cmd_train_identity)

    ia = wsub.add_parser("identity-auc", parents=[common], help="how well the bench's identity_gain tells an "
                         "instance from others of its class (AUC over independent draws)")
    ia.add_argument("--draws", type=int, default=5, help="independent draws of 13 items x 9 other styles (default 5; "
                    "draw 0 is the bench's own items)")
    ia.add_argument("--size", type=int, default=64, help="pixels of the scored renders (default 64)")
    ia.add_argument("--degrade", action="store_true", help="pass each render through the oracle's imperfections "
                    "(shift, resampling, blur, colour, noise; no flip)")
    ia.add_argument("--measure", choices=("v4", "v3"), default="v4", help="v4 (the bench's, default) or v3")
    ia.add_argument("--json", action="store_true", help="the full report as JSON (default: a table)")
    ia.set_defaults(plugin_handler=_cmd_identity_auc)

    b = wsub.add_parser("bench", parents=[common], help="decompose held-out world images with each method and "
                        "score the samples with the oracles")
    from .bench import add_bench_arguments

    add_bench_arguments(b)

    cmp = wsub.add_parser("compare", parents=[common], help="tell two methods apart on the same bench items: "
                          "paired differences with 95 %% intervals")
    from .compare import add_compare_arguments

    add_compare_arguments(cmp)

    # World-train's place: world/train.py defines
    #   add_train_arguments(parser: argparse.ArgumentParser) -> None   (adds BACKBONE and options)
    #   cmd_train(args: argparse.Namespace) -> int                      (runs ``cstoolkit world train``)
    try:
        from . import train as _train
    except ImportError:
        _train = None
    if _train is not None:
        t = wsub.add_parser("train", parents=[common], help="train a backbone's `world` preset on the world")
        _train.add_train_arguments(t)
        t.set_defaults(plugin_handler=_train.cmd_train)


def _device_checked(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``handler`` after the core's ``--device`` check (one line naming the option and what exists)."""
    def run(args: argparse.Namespace) -> int:
        args.device = check_device(getattr(args, "device", None))
        return handler(args)

    return run


def _cmd_render(args: argparse.Namespace) -> int:
    from cstoolkit.io import save_image

    from .generator import check_content, check_style, render

    check_content(args.content, "--content")
    check_style(args.style, "--style")
    if args.out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise UserError("--out", f"'{args.out}' has no image suffix", "expected e.g. out.png")
    if args.size < 16 or args.size > 2048:
        raise UserError("--size", f"got {args.size}", "expected 16 to 2048 pixels")
    save_image(render(args.content, args.style, seed=args.seed, size=args.size, instance=args.instance), args.out)
    print(args.out)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .generator import CONTENTS, HELD_OUT, NOVEL_CONTENTS, NOVEL_HELD_OUT, NOVEL_STYLES, STYLES

    data = {"contents": list(CONTENTS), "styles": list(STYLES), "held_out": [list(p) for p in HELD_OUT],
            "novel_contents": list(NOVEL_CONTENTS), "novel_styles": list(NOVEL_STYLES),
            "novel_pairs": {k: [list(p) for p in v] for k, v in NOVEL_HELD_OUT.items()}}
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print("contents: " + ", ".join(CONTENTS))
        print("styles:   " + ", ".join(STYLES))
        print("held-out: " + ", ".join(f"{c} / {s}" for c, s in HELD_OUT))
        print("novel contents (no backbone saw them): " + ", ".join(NOVEL_CONTENTS))
        print("novel styles (no backbone saw them):   " + ", ".join(NOVEL_STYLES))
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    from cstoolkit.io import load_image

    from .oracle import load_oracle

    # the core's loader: 16-bit, palette, alpha and EXIF handled; at least 16 px (the generator's smallest)
    images = [load_image(p, str(p), min_side=16) for p in args.images]
    oracle = load_oracle(device=args.device if args.device not in (None, "auto") else "cpu")
    results = oracle.classify(images)
    if args.gate:
        from .shape_gate import apply_gate

        apply_gate(results, images)
    for path, res in zip(args.images, results):
        if args.json:
            print(json.dumps({"image": str(path), **res}))
        else:
            content = "no object (rejected)" if res["rejected"] else res["content"]
            style = "no style (rejected)" if res["style_rejected"] else res["style"]
            print(f"{path}: {content} ({res['content_prob']:.2f}), {style} ({res['style_prob']:.2f})")
    return 0


def _cmd_train_oracle(args: argparse.Namespace) -> int:
    from .oracle import OracleTrainConfig, train_oracle

    cfg = OracleTrainConfig(seed=args.seed)
    if args.steps is not None:
        if args.steps < 1:
            raise UserError("--steps", f"got {args.steps}", "expected at least 1")
        cfg.steps = args.steps
    report = train_oracle(cfg, out_dir=args.out)
    print(json.dumps(report, indent=2))
    return 0


def _cmd_identity_auc(args: argparse.Namespace) -> int:
    from .identity import identity_auc_report

    if args.draws < 1:
        raise UserError("--draws", f"got {args.draws}", "expected at least 1")
    if args.size < 32:
        raise UserError("--size", f"got {args.size}", "expected at least 32 pixels")
    rep = identity_auc_report(args.draws, args.size, args.degrade, args.measure)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    contents = list(rep["per_content"])
    print(f"identity_gain AUC ({rep['measure']}, {rep['size']} px{', degraded' if rep['degraded'] else ''}): "
          f"min {rep['min_auc']:.3f}, mean {rep['mean_auc']:.3f} over {len(rep['draws'])} draws")
    print("| draw | AUC | ms/image | " + " | ".join(contents) + " |")
    print("|---|---:|---:|" + "---:|" * len(contents))
    for d in rep["draws"]:
        print(f"| {d['draw']} | {d['auc']:.3f} | {d['ms_per_image']} | "
              + " | ".join(f"{d['per_content'][c]:.2f}" for c in contents) + " |")
    print("| pooled | | | " + " | ".join(f"{rep['per_content'][c]:.2f}" for c in contents) + " |")
    print("per style (pooled): " + ", ".join(f"{s} {v:.2f}" for s, v in rep["per_style"].items()))
    return 0


def _cmd_train_identity(args: argparse.Namespace) -> int:
    from .identity_net import IdentityTrainConfig, save_identity_net, train_identity_net

    cfg = IdentityTrainConfig(seed=args.seed)
    if args.seconds is not None:
        if args.seconds <= 0:
            raise UserError("--seconds", f"got {args.seconds}", "expected a positive number of seconds")
        cfg.seconds = args.seconds
    net, report = train_identity_net(cfg)
    save_identity_net(net, args.out, report)
    print(json.dumps(report, indent=2))
    return 0
