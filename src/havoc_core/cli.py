"""``havoc <command>``: argument parsing only; the work lives in the modules.

Every ``HavocError`` becomes one ``error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from havoc_core.errors import HavocError

Handler = Callable[[argparse.Namespace], int | None]


def _config_from(source: str) -> Any:
    """A preset name, a config.json file, or a checkpoint/run directory."""
    from havoc_core.checkpoint import load_config
    from havoc_core.config import PRESETS, HavocConfig, get_preset

    if source in PRESETS:
        return get_preset(source)
    path = Path(source)
    if path.is_file():
        return HavocConfig.load(path)
    if path.exists():
        return load_config(path)
    raise HavocError(f"{source}: not a preset ({', '.join(PRESETS)}), a config.json or a checkpoint directory")


def _print_tree(data: dict[str, Any], indent: int = 0) -> None:
    for key, value in data.items():
        if isinstance(value, dict):
            print(f"{' ' * indent}{key}:")
            _print_tree(value, indent + 2)
        else:
            print(f"{' ' * indent}{key}: {value}")


# --------------------------------------------------------------------------- commands

def cmd_inspect(args: argparse.Namespace) -> None:
    from havoc_core.config import format_params

    cfg = _config_from(args.source)
    _print_tree(cfg.to_dict())
    if args.check_weights:
        from havoc_core.checkpoint import find_checkpoint, load_weights

        load_weights(find_checkpoint(args.source), cfg, shapes_only=True)
        print("weights: every name and shape matches config.json")
    n = cfg.num_parameters()
    print(f"Model parameters: {format_params(n)} ({n:,})")


def cmd_init(args: argparse.Namespace) -> None:
    import torch

    from havoc_core.checkpoint import save_model
    from havoc_core.config import format_params
    from havoc_core.model import HavocModel

    cfg = _config_from(args.preset)
    torch.manual_seed(args.seed)
    model = HavocModel(cfg)
    tokenizer = None
    if args.tokenizer:
        from havoc_core.tokenizer import HavocTokenizer

        tokenizer = HavocTokenizer.load(args.tokenizer)
        tokenizer.check_compatible(cfg)
    out = save_model(args.out, model, tokenizer=tokenizer)
    print(f"wrote {out} ({format_params(model.num_parameters())} parameters, random init)")


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="havoc", description="HAVOC: train, chat with and serve small LMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    p = add("inspect", cmd_inspect, "print a model config tree and its parameter count (no weights loaded)")
    p.add_argument("source", help="preset name, config.json, checkpoint dir or run dir")
    p.add_argument("--check-weights", action="store_true",
                   help="also check model.safetensors' names and shapes (header only) against the config")

    p = add("init", cmd_init, "write a randomly initialised checkpoint")
    p.add_argument("--preset", required=True, help="preset name, config.json or checkpoint dir")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--tokenizer", help="tokenizer.json (or a dir with one) to store beside the weights")
    p.add_argument("--seed", type=int, default=0)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except HavocError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
