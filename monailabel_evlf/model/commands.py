"""``evlf assemble-model``: build a real-size EVLF directory from a preset's ``assemble`` recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from monailabel_evlf.model.presets import get_preset


def assemble_model(args: argparse.Namespace) -> int:
    from monailabel_evlf.model.assemble import assemble_evlf  # lazy: heavy; keeps `evlf --help` fast

    preset = get_preset(args.recipe)
    if preset is not None:
        recipe, options = preset.assemble, preset.options
    else:
        path = Path(args.recipe)
        if not path.is_file():
            raise ValueError(f"{args.recipe!r} is neither a model preset nor a YAML file")
        data = yaml.safe_load(path.read_text()) or {}
        recipe, options = dict(data.get("assemble") or {}), dict(data.get("options") or {})
    if not recipe:
        raise ValueError(f"{args.recipe!r} has no 'assemble' section")
    local_only = not args.download and options.get("local_files_only", True)
    out = assemble_evlf(**recipe, out_dir=args.out, dtype=args.dtype, local_files_only=local_only)
    print(f"assembled EVLF in {out}; serve it with --conf model {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("assemble-model", help="assemble a real-size EVLF from pretrained checkpoints")
    parser.add_argument("recipe", help="preset name (e.g. evlf-8b) or YAML file with an 'assemble' section")
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--download", action="store_true", help="allow fetching hub ids (default: cache only)")
    parser.set_defaults(func=assemble_model)
