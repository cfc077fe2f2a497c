"""The ``zoomfeat`` command line: a thin layer that parses arguments and calls library functions.

Each subcommand lives in ``zoomfeat/commands/<module>.py`` with ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. At module level those modules import only the standard library and the light modules
that building the parsers loads anyway (the config system, the store, magnifications), so ``zoomfeat --help``
stays quick; torch and the pipeline modules are imported inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from zoomfeat import __version__
from zoomfeat.config import (add_config_options, apply_config_defaults, config_actions, parse_set_items,
                             read_config_file, resolved_config, save_resolved_config)
from zoomfeat.errors import ZoomfeatError, one_line

# subcommand -> module under zoomfeat.commands (the one list of commands; `tests/test_cli.py` runs them all)
COMMANDS: dict[str, str] = {
    "info": "info",
    "synth": "synth",
    "tile": "tile",
    "verify": "verify",
    "extract": "extract",
    "export": "export",
    "synthesize": "synthesize",
    "prepare-train": "prepare_train",
    "train": "train",
    "prepare-cdm": "prepare_cdm",
    "train-cdm": "train_cdm",
    "splits": "splits",
    "train-mil": "train_mil",
    "report": "report",
    "compare": "compare",
    "heatmap": "heatmap",
    "gen-metrics": "gen_metrics",
    "invert": "invert",
    "superres": "superres",
    "sample": "sample",
    "generate-large": "generate_large",
    "demo": "demo",
    "config": "config",
}


def _command_module(name: str):
    return importlib.import_module(f"zoomfeat.commands.{COMMANDS[name]}")


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help when the help does not state its default itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or default in (None, False, argparse.SUPPRESS) or not action.option_strings
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})"


def _leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...]):
    """(path, parser) of every leaf command under ``parser`` (``splits`` has hipt/simil/make/audit)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaf_parsers(child, path + (name,))


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, import just that subcommand's module (fast dispatch)."""
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
        sp = sub.add_parser(name, help=module.HELP, description=module.HELP, formatter_class=_HelpFormatter)
        module.add_arguments(sp)
        sp.set_defaults(_run=module.run)
        for _path, leaf in _leaf_parsers(sp, (name,)):
            leaf.formatter_class = _HelpFormatter
            if getattr(module, "CONFIG_SYSTEM", True) and "--config" not in leaf._option_string_actions:  # `train` has its own sectioned config
                add_config_options(leaf)
                leaf.set_defaults(_config_system=True)
    return parser


def _find_leaf(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[tuple[str, ...], argparse.ArgumentParser]:
    """The leaf command parser that ``argv`` selects (first non-option token at each level)."""
    path: tuple[str, ...] = ()
    current = parser
    rest = list(argv)
    while True:
        subs = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return path, current
        token = next((t for t in rest if not t.startswith("-")), None)
        if token is None or token not in subs[0].choices:
            return path, current
        path += (token,)
        current = subs[0].choices[token]
        rest = rest[rest.index(token) + 1 :]


def _scan(argv: list[str], flag: str) -> list[str]:
    """Values of ``flag`` in ``argv`` (``--flag V`` and ``--flag=V``)."""
    values = []
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif token.startswith(flag + "="):
            values.append(token[len(flag) + 1 :])
    return values


def resolve(argv: list[str]):
    """Parse ``argv`` with the config system: ``(args, command path, resolved config or None)``."""
    name = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=name if name in COMMANDS else None)
    path, leaf = _find_leaf(parser, argv)
    if not leaf.get_default("_config_system"):
        return parser.parse_args(argv), path, None
    command = " ".join(path)
    table = config_actions(leaf)
    values: dict = {}
    for file in _scan(argv, "--config")[-1:]:
        values.update(read_config_file(file, command, table))
    values.update(parse_set_items(_scan(argv, "--set"), table))
    if values:
        apply_config_defaults(leaf, values, table)
    args = parser.parse_args(argv)
    return args, path, resolved_config(command, args, table)


def _save_config(args: argparse.Namespace, config: dict | None, code: int) -> None:
    out = getattr(args, "out", None)
    if config is None or out is None or code not in (0, 1):
        return
    save_resolved_config(config, out)


def main(argv: list[str] | None = None) -> int:
    from zoomfeat.log import setup_cli_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    setup_cli_logging(debug="--debug" in argv)
    try:
        args, _path, config = resolve(argv)
    except ZoomfeatError as exc:
        if "--debug" in argv:
            raise
        print(f"error: {one_line(exc, None)}", file=sys.stderr)
        return 2
    if not getattr(args, "_run", None):
        build_parser().print_help()
        return 0 if args.command is None else 2
    try:
        code = int(args._run(args) or 0)
        _save_config(args, config, code)
        return code
    except ZoomfeatError as exc:
        if args.debug:
            raise
        print(f"error: {one_line(exc, None)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
