"""`samunet` command line: a thin dispatcher; each subcommand lives in its own `cli_<name>` module.

Subcommand modules expose `add_arguments(parser)` and `run(args) -> int`. They are imported only when chosen, so
`samunet --help` and `samunet models` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from samunet_core.errors import SamunetError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "models": ("samunet_core.cli_models", "list the registered models and whether their weights are present"),
    "segment": ("samunet_core.cli_segment", "segment one image or volume from a prompt file"),
    "batch": ("samunet_core.cli_batch", "segment many volumes with one or several prompt files"),
    "eval": ("samunet_core.cli_eval", "accuracy protocols on an evaluation manifest"),
    "bench": ("samunet_core.cli_bench", "latency, throughput and memory benchmark"),
    "train": ("samunet_core.cli_train", "fine-tune prompt encoder and mask decoder from cached embeddings"),
    "serve": ("samunet_core.cli_serve", "serve the engine over HTTP (for the Slicer module and --server)"),
}


def build_parser() -> argparse.ArgumentParser:
    from samunet_core import __version__

    parser = argparse.ArgumentParser(prog="samunet", description="Prompt-based medical image segmentation.")
    parser.add_argument("--version", action="version", version=f"samunet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        # add_help=False: `samunet CMD --help` must reach the subcommand's own parser, which knows its options.
        sp = sub.add_parser(name, help=help_text, description=help_text, add_help=False)
        sp.set_defaults(_module=module_name)
        sp.set_defaults(_needs_arguments=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Two passes: the first finds the subcommand, whose module then adds its own arguments.
    known, _ = parser.parse_known_args(argv)
    if known.command is None:
        parser.print_help()
        return 2
    module_name = SUBCOMMANDS[known.command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            print(f"samunet: error: command '{known.command}' is not available in this build", file=sys.stderr)
            return 2
        raise
    sub_parser = argparse.ArgumentParser(prog=f"samunet {known.command}", description=SUBCOMMANDS[known.command][1])
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(argv[argv.index(known.command) + 1 :])
    try:
        return int(module.run(args) or 0)
    except SamunetError as exc:
        print(f"samunet {known.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"samunet {known.command}: interrupted; no partial output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
