"""House rules of the documentation: a short README whose table of commands is the CLI's, one page per wing under
docs/, a RESULTS.md of current results, and no reference to files outside the repository."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WING_PAGES = ("extraction", "mil", "generation", "training", "formats", "reproducing")
# text files of the repository that are not tests (tests may name the fixtures folder beside the checkout)
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".sh", ".json", ".html"}
SKIP_DIRS = {".git", "tests", "__pycache__", ".venv", "venv", "build", "dist", ".pytest_cache", ".hypothesis"}


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_readme_and_results_stay_short():
    assert _lines(README) <= 200, "README.md is over 200 lines: move the detail to a page under docs/"
    results = ROOT / "benchmarks" / "RESULTS.md"
    assert _lines(results) <= 400, "benchmarks/RESULTS.md is over 400 lines: keep the current result of each benchmark"


def _readme_command_rows() -> list[tuple[str, str]]:
    text = README.read_text(encoding="utf-8")
    begin = text.index("<!-- commands:")
    end = text.index("<!-- end of commands -->")
    rows = []
    for line in text[begin:end].splitlines()[1:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            rows.append((cells[0].strip("`"), cells[1].replace("&#124;", "|")))
    return rows


def test_readme_table_lists_every_command_with_its_help():
    import cli

    expected = [(name, importlib.import_module(f"zoomfeat.commands.{module}").HELP)
                for name, module in cli.COMMANDS.items()]
    assert _readme_command_rows() == expected, "README's command table is stale: python docs/commands_table.py --write"


def test_table_generator_reproduces_the_readme(tmp_path):
    """The generator rewrites a stale table into the one the README holds, and leaves other text alone."""
    spec = importlib.util.spec_from_file_location("commands_table", ROOT / "docs" / "commands_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stale = tmp_path / "README.md"
    text = README.read_text(encoding="utf-8")
    begin, end = text.index(module.BEGIN) + len(module.BEGIN), text.index(module.END)
    stale.write_text(text[:begin] + "\n| `gone` | an old command |\n" + text[end:], encoding="utf-8")
    assert module.write_readme(stale) is True
    assert stale.read_text(encoding="utf-8") == text
    assert module.write_readme(stale) is False


def test_fresh_machine_commands_are_where_ci_reads_them():
    lines = README.read_text(encoding="utf-8").splitlines()
    install = lines[lines.index("# 1. install and run the demo (synthetic cohort, CPU, minutes)") + 1]
    test = next(lines[i + 1] for i, line in enumerate(lines) if line.startswith("# 2. test"))
    assert install.startswith("python3 -m venv .venv && ") and "pip install -e \".[test]\"" in install
    assert re.search(r"&& zoomfeat demo( --quick)? --out demo_out$", install)
    assert test.endswith("python -m pytest -q")


@pytest.mark.parametrize("page", WING_PAGES)
def test_every_wing_has_its_page_linked_from_the_readme(page):
    path = ROOT / "docs" / f"{page}.md"
    assert path.is_file() and _lines(path) > 20
    assert f"(docs/{page}.md)" in README.read_text(encoding="utf-8")


def test_relative_links_in_the_docs_resolve():
    pages = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken


def _repository_text_files():
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]) or not path.is_file():
            continue
        if path.suffix in TEXT_SUFFIXES or rel.parts[0] == ".ci":
            yield rel, path


def test_nothing_outside_the_tests_refers_to_files_outside_the_repository():
    """The design is docs/ARCHITECTURE.md; a DESIGN.md or a ../shared folder exists only on the team's machine."""
    offenders = []
    for rel, path in _repository_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for token in ("DESIGN.md", "../shared"):
            if token in text:
                offenders.append(f"{rel}: {token}")
    assert not offenders


def test_the_reference_check_sees_code_and_docs():
    """The walk above covers the package, the CLI, the benchmarks and the docs (a check that reads nothing passes)."""
    seen = {rel.as_posix() for rel, _ in _repository_text_files()}
    assert {"cli.py", "README.md", "docs/ARCHITECTURE.md", "mil/bags.py", "zoomfeat/store/tiles.py",
            "benchmarks/RESULTS.md", ".ci/run"} <= seen
    assert not any(s.startswith("tests/") for s in seen)
