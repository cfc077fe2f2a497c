"""The command table in cli.py: every command has a module, a help text, and `--help` that works."""

import subprocess
import sys

import pytest

import cli


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: zoomfeat {name}")


def test_top_level_help_is_fast_and_imports_no_torch():
    code = "import sys, cli; cli.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_user_errors_are_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cli", "tile", str(tmp_path), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _leaves():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in cli.COMMANDS:
        yield from cli._leaf_parsers(commands[name], (name,))


def test_every_option_of_every_command_says_what_it_does():
    undocumented = [f"{' '.join(path)} {action.option_strings[0] if action.option_strings else action.dest}"
                    for path, leaf in _leaves() for action in leaf._actions
                    if action.dest not in ("help",) and not (action.help or "").strip()]
    assert not undocumented, f"options without a help text: {undocumented}"


def test_help_shows_defaults_once():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    text = commands["synth"].format_help()
    assert "(default: 0)" in text or "default 0" in text
    assert "(default: None)" not in text
