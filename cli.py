"""The ``zoomfeat`` command line: a thin layer that parses arguments and calls library functions.

Each subcommand lives in ``zoomfeat/commands/<module>.py`` with ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Those modules import only the standard library at module level, so ``zoomfeat --help``
is instant; torch and friends are imported inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module under zoomfeat.commands (the one list of commands; `tests/test_cli.py` runs them all)
COMMANDS: dict[str, str] = {
    "info": "info",
    "synth": "synth",
    "tile": "tile",
    "verify": "verify",
    "extract": "extract",
    "export": "export",
    "prepare-train": "prepare_train",
    "train": "train",
    "splits": "splits",
    "train-mil": "train_mil",
    "report": "report",
    "compare": "compare",
    "heatmap": "heatmap",
    "demo": "demo",
}


def _command_module(name: str):
    return importlib.import_module(f"zoomfeat.commands.{COMMANDS[name]}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, import just that subcommand's module (fast dispatch)."""
    from zoomfeat import __version__

    parser = argparse.ArgumentParser(
        prog="zoomfeat",
        description="ZoomLDM multi-magnification features, baseline encoders and MIL evaluation for WSIs.",
    )
    parser.add_argument("--version", action="version", version=f"zoomfeat {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if only is not None and name != only:
            sub.add_parser(name, add_help=False)
            continue
        module = _command_module(name)
        sp = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sp)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from zoomfeat.errors import ZoomfeatError

    argv = list(sys.argv[1:] if argv is None else argv)
    name = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=name if name in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args._run(args) or 0)
    except ZoomfeatError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
