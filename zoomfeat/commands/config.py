"""``zoomfeat config show COMMAND [OPTIONS]``: print the resolved config a command would run with."""

from __future__ import annotations

import argparse

import cli
from zoomfeat.config import dump_config
from zoomfeat.errors import ConfigError

CONFIG_SYSTEM = False  # its REMAINDER belongs to the target command
HELP = "print the resolved config (sections, keys, values) of a command without running it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("show",), help="show: print the resolved config as YAML")
    parser.add_argument("target", metavar="COMMAND", help="the command, e.g. extract (or 'splits make')")
    parser.add_argument("rest", nargs=argparse.REMAINDER, metavar="OPTIONS",
                        help="the command's options, as you would pass them (including --config/--set)")


def run(args: argparse.Namespace) -> int:
    target = args.target.split()
    if target[0] not in cli.COMMANDS or target[0] == "config":
        raise ConfigError(f"unknown command {args.target!r}: use one of {', '.join(c for c in cli.COMMANDS if c != 'config')}")
    try:
        parsed, _path, config = cli.resolve(target + list(args.rest))
    except SystemExit as exc:  # argparse already printed its one-line usage error
        return int(exc.code or 0)
    if config is None:
        raise ConfigError(f"`zoomfeat {args.target}` keeps its own sectioned config: see its --config/--set help")
    print(dump_config(config), end="")
    return 0
