"""Saving and loading the typed, frozen config dataclasses that every command validates up front."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zoomfeat import __version__
from zoomfeat.errors import ConfigError, one_line
from zoomfeat.serial import to_jsonable
from zoomfeat.store import atomic_write, write_json_atomic


def save_config(config: Any, path: str | Path) -> Path:
    """Save a config dataclass as JSON next to a command's outputs."""
    return write_json_atomic(path, config)


# --------------------------------------------------------------------------------------------------------------
# The command config system: every command takes ``--config FILE`` and ``--set section.key=value``.
#
# A command's options are its config: the argparse argument groups are the sections (positionals are
# ``inputs``, ungrouped options ``options``), the destinations are the keys. Precedence, lowest first:
# argparse defaults < ``--config`` file < ``--set`` < flags on the command line. Unknown sections or keys,
# values outside an option's choices and values its type rejects are one-line ConfigErrors, before any work.
# The resolved config is written beside the command's outputs as ``<command>.config.yaml`` and reruns it:
# ``zoomfeat <command> --config <out>/<command>.config.yaml``.
# --------------------------------------------------------------------------------------------------------------

CONFIG_SUFFIX = ".config.yaml"
META_KEYS = ("command", "zoomfeat_version")
_NOT_CONFIG = {"help", "version", "config", "set", "debug"}
_SECTION_ALIASES = {"positional arguments": "inputs", "options": "options", "optional arguments": "options"}


def add_config_options(parser) -> None:
    """Add ``--config`` / ``--set`` to a leaf command parser."""
    group = parser.add_argument_group("config")
    group.add_argument("--config", metavar="FILE", default=None,
                       help="YAML config (sections as in `zoomfeat config show`; a saved <command>.config.yaml "
                            "reruns a command); flags on the command line override it")
    group.add_argument("--set", action="append", default=None, metavar="SECTION.KEY=VALUE",
                       help="override one config value, e.g. --set runtime.batch_size=16 (repeatable)")


def _section_name(title: str | None) -> str:
    title = (title or "options").strip().lower()
    return _SECTION_ALIASES.get(title, "_".join(title.replace("-", " ").split()))


def config_actions(parser) -> dict[str, tuple[str, Any]]:
    """``dest -> (section, action)`` for every option of a leaf parser that belongs to its config."""
    import argparse

    table: dict[str, tuple[str, Any]] = {}
    for group in parser._action_groups:  # argparse has no public accessor for groups
        for action in group._group_actions:
            if action.dest in _NOT_CONFIG or action.dest.startswith("_") or action.dest == argparse.SUPPRESS:
                continue
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            table[action.dest] = (_section_name(group.title), action)
    return table


def _bool(text: str, where: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{where}: {text!r} is not a boolean: use true or false")


def _convert(action, value: Any, where: str) -> Any:
    """A config value as the option would have parsed it (type, nargs, choices checked)."""
    import argparse

    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return value if isinstance(value, bool) else _bool(value, where)
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction)
    if many:
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
        return [_convert_one(action, v, where) for v in items]
    return _convert_one(action, value, where)


def _convert_one(action, value: Any, where: str) -> Any:
    if action.type is not None and isinstance(value, str):
        try:
            value = action.type(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {value!r} is not valid ({exc}): fix the value") from exc
    elif action.type in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = action.type(value)
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"{where}: {value!r} is not one of {choices}")
    return value


def _flatten(raw: Mapping[str, Any], table: Mapping[str, tuple[str, Any]], source: str) -> dict[str, Any]:
    sections = sorted({s for s, _ in table.values()})
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in META_KEYS:
            continue
        if isinstance(value, Mapping):
            if key not in sections:
                raise ConfigError(f"{source}: unknown section {key!r}: use one of {', '.join(sections)}")
            for name, item in value.items():
                dest = str(name).replace("-", "_")
                if dest not in table or table[dest][0] != key:
                    known = ", ".join(d for d, (s, _) in table.items() if s == key)
                    raise ConfigError(f"{source}: unknown key {key}.{name}: section {key} has {known}")
                values[dest] = item
        else:
            dest = str(key).replace("-", "_")
            if dest not in table:
                raise ConfigError(f"{source}: unknown key {key!r}: see `zoomfeat config show` for the keys")
            values[dest] = value
    return values


def read_config_file(path: str | Path, command: str, table: Mapping[str, tuple[str, Any]]) -> dict[str, Any]:
    """Values (``dest -> raw value``) of a ``--config`` YAML/JSON file for ``command``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file: pass a YAML file (e.g. a saved <command>{CONFIG_SUFFIX})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({one_line(exc, 120)})") from exc
    if not isinstance(raw, Mapping):
        raise ConfigError(f"--config {path}: expected a mapping of sections, got {type(raw).__name__}")
    saved_for = raw.get("command")
    if saved_for is not None and saved_for != command:
        raise ConfigError(f"--config {path} is a config of `zoomfeat {saved_for}`, not of `zoomfeat {command}`")
    return _flatten(raw, table, f"--config {path}")


def parse_set_items(items: list[str], table: Mapping[str, tuple[str, Any]]) -> dict[str, Any]:
    """``--set section.key=value`` (or ``key=value``) items as ``dest -> raw value`` (YAML scalars)."""
    import yaml

    raw: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: use section.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        section, _, name = key.strip().rpartition(".")
        if section:
            raw.setdefault(section, {})[name] = value if not isinstance(value, (dict,)) else text
        else:
            raw[name] = value
    return _flatten(raw, table, "--set")


def apply_config_defaults(parser, values: Mapping[str, Any], table: Mapping[str, tuple[str, Any]]) -> None:
    """Make config values the parser's defaults (flags still win); relax what they make non-required."""
    import argparse

    converted = {}
    for dest, value in values.items():
        section, action = table[dest]
        converted[dest] = _convert(action, value, f"{section}.{dest}")
        if action.required:
            action.required = False
        if not action.option_strings:  # a positional given by the config file
            action.nargs = "*" if action.nargs in ("+", "*") else "?"
            action.default = converted[dest]
    for group in parser._mutually_exclusive_groups:
        if group.required and any(a.dest in values for a in group._group_actions):
            group.required = False
    parser.set_defaults(**converted)
    for action in parser._actions:
        if isinstance(action, argparse._StoreAction) and action.dest in converted:
            action.default = converted[action.dest]


def resolved_config(command: str, args, table: Mapping[str, tuple[str, Any]]) -> dict[str, Any]:
    """The resolved config of a parsed command, sectioned, in plain YAML values."""
    out: dict[str, Any] = {"command": command, "zoomfeat_version": __version__}
    for dest, (section, _action) in table.items():
        out.setdefault(section, {})[dest] = to_jsonable(getattr(args, dest, None))
    return out


def dump_config(config: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)


def config_output_path(command: str, out: str | Path) -> Path:
    """Where a command whose ``--out`` is ``out`` saves its resolved config."""
    out = Path(out)
    name = command.replace(" ", "-")
    if out.is_dir() or not out.suffix:
        return out / f"{name}{CONFIG_SUFFIX}"
    return out.with_name(f"{out.stem}.{name}{CONFIG_SUFFIX}")


def save_resolved_config(config: Mapping[str, Any], out: str | Path) -> Path:
    """Write the resolved config beside the command's outputs (atomic)."""
    path = config_output_path(str(config["command"]), out)
    with atomic_write(path) as tmp:
        tmp.write_text(dump_config(config))
    return path
