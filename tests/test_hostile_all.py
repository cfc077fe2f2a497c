"""Hostile inputs over every command: each command line of the config-system examples, run in an empty folder
where none of its inputs exist, fails with one ``error:`` line naming what is missing, no traceback, and leaves
nothing behind; an output path that is a file is refused the same way."""

from __future__ import annotations

import pytest

import cli
from test_config_system import EXAMPLES

# commands that need no input file (they create their inputs) are not "missing input" cases
NO_INPUTS = {"synth", "demo"}
MISSING = sorted(set(EXAMPLES) - NO_INPUTS)


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("command", MISSING)
def test_missing_inputs_are_one_line_errors(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(list(EXAMPLES[command]))
    captured = capsys.readouterr()
    assert code in (1, 2), f"{command}: exit {code}"
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    errors = _errors(captured.err)
    assert len(errors) == 1, f"{command}: {captured.err}"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.suffix in (".h5", ".ckpt", ".png")) == []


OUT_COMMANDS = [c for c in EXAMPLES if "--out" in EXAMPLES[c] and c not in NO_INPUTS]


@pytest.mark.parametrize("command", sorted(OUT_COMMANDS))
def test_an_output_path_that_is_a_file_is_never_overwritten(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = list(EXAMPLES[command])
    out = argv[argv.index("--out") + 1]
    (tmp_path / out).write_text("precious")
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code in (1, 2) and "Traceback" not in captured.err
    assert len(_errors(captured.err)) == 1, f"{command}: {captured.err}"
    assert (tmp_path / out).read_text() == "precious"
