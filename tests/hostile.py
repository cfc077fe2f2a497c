"""Helpers of the hostile-input test modules: run the CLI on a bad input, snapshot folders before and after."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cli


def snapshot(*folders: Path) -> dict[str, tuple[str, int]]:
    """path -> (sha256, mtime_ns) of every file under the folders."""
    out = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                out[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return out


def one_error(argv: list[str], capsys, code: int = 2) -> str:
    """Run the CLI; assert the exit status, exactly one error line and no traceback; return the error line."""
    got = cli.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert got == code, err
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]
