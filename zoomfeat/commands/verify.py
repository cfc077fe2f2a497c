"""``zoomfeat verify``: check every tile/feature file in a folder; exit 1 when any has a problem.

It also lists the slides that failed (from the folder's error records, every shard's); with ``--slides`` (the
slide folder, or a text file with one slide path or slide id per line) also those that never got a complete file.
"""

from __future__ import annotations

import argparse

from zoomfeat.errors import ConfigError
from zoomfeat.slides import SLIDE_EXTENSIONS, find_slides, slide_id_of
from zoomfeat.store import h5_path, is_complete, merged_errors, verify_dir

HELP = "check tile/feature files: complete, readable, consistent, finite features, exact parent links"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="output folder of `zoomfeat tile` or `zoomfeat extract`")
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--slides", metavar="LIST_OR_DIR", help="the slides that should be there: a slide folder "
                        "or a text file with one slide path (or slide id) per line; reports the ones that failed "
                        "or have no complete file (default: check only the files present)")


def expected_ids(source: str) -> list[str]:
    """Slide ids from a slide folder (or slide file) or a text list of paths/ids."""
    from pathlib import Path

    path = Path(source)
    if path.is_dir() or path.suffix.lower() in SLIDE_EXTENSIONS:
        return sorted(slide_id_of(p) for p in find_slides([path]))
    if not path.is_file():
        raise ConfigError(f"--slides {path} does not exist: give the slide folder or a text file listing the slides")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--slides {path} is not a readable text list ({exc}): one slide path or id per line") \
            from exc
    return sorted({slide_id_of(line.strip()) for line in lines if line.strip() and not line.startswith("#")})


def missing_slides(folder, ids: list[str]) -> dict[str, str]:
    """slide id -> what is wrong: its failure recorded by any shard's run, or that it never got a complete file."""
    failed = {slide_id_of(s): row["error"] for s, row in merged_errors(folder).items()}
    problems = {}
    for slide_id in ids:
        if slide_id in failed:
            problems[slide_id] = f"failed: {failed[slide_id]}"
        elif not is_complete(h5_path(folder, slide_id)):
            problems[slide_id] = "never got a complete file: rerun the command for it"
    return problems


def recorded_ids(folder) -> list[str]:
    """Slides the folder's error records list (every shard's): without --slides, their failures are reported."""
    return sorted({slide_id_of(s) for s in merged_errors(folder)})


def run(args: argparse.Namespace) -> int:
    import sys

    report = verify_dir(args.folder)
    missing = missing_slides(args.folder, expected_ids(args.slides) if args.slides else recorded_ids(args.folder))
    if not report and not missing:
        print(f"error: {args.folder}: no .h5 files to verify", file=sys.stderr)
        return 1
    bad = 0
    for path, problems in report.items():
        for problem in problems:
            print(f"error: {path}: {problem}", file=sys.stderr)
        bad += bool(problems)
    for slide_id, why in missing.items():
        print(f"error: {h5_path(args.folder, slide_id)}: slide {slide_id} {why}", file=sys.stderr)
    extra = f", {len(missing)} slides failed or missing" if missing or args.slides else ""
    print(f"verify: {len(report) - bad} ok, {bad} with problems{extra}")
    return 1 if bad or missing else 0
