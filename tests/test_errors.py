"""The one one-line message helper (zoomfeat.errors.one_line), on the messages that broke the ad-hoc cuts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from zoomfeat.errors import ConfigError, one_line

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("error, expected", [
    (ValueError(""), "ValueError"),  # `str(e).splitlines()[0]` raised IndexError here
    (KeyError(), "KeyError"),
    (RuntimeError("   \n\t \n"), "RuntimeError"),  # whitespace only: nothing to quote
    (RuntimeError("first line\n  second   line\n\nthird"), "first line second line third"),
    (OSError(2, "No such file or directory"), "[Errno 2] No such file or directory"),
    (ConfigError("\n  leading and trailing  \n"), "leading and trailing"),
    ("plain\ttext\r\nmessage", "plain text message"),
    ("", ""),
])
def test_one_line(error, expected):
    assert one_line(error) == expected


def test_one_line_cuts_long_messages_and_marks_the_cut():
    message = "word " * 100  # 500 characters
    cut = one_line(RuntimeError(message), 40)
    assert len(cut) <= 40 and cut.endswith("...") and "\n" not in cut
    assert cut == "word word word word word word word wo..."  # 37 characters kept, then the mark
    assert one_line(RuntimeError(message), None) == message.strip()  # None: never cut
    assert one_line(RuntimeError("exactly ten"), 11) == "exactly ten"  # at the limit: as is
    assert one_line(KeyError("k"), 200) == "'k'"  # str() of the exception, as Python prints it


def test_cli_prints_a_multi_line_error_on_one_line(tmp_path):
    """A --config file YAML cannot parse (the YAML library's message spans several lines) is one line."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs: [unclosed\n  - : :\n")
    run = subprocess.run([sys.executable, "-m", "cli", "tile", "--config", str(bad)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --config {bad}: not valid YAML"), run.stderr
