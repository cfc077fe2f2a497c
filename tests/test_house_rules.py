"""The house rules of issue 13, checked on the source tree: the store owns the files, tests import what they need."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("zoomfeat", "mil", "splits")


def _sources():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_h5py_is_imported_only_by_store_modules():
    importers = {p.relative_to(ROOT).as_posix() for p in _sources()
                 if re.search(r"^\s*(import h5py|from h5py)", p.read_text(), re.M)}
    assert importers and all(p.startswith("zoomfeat/store/") for p in importers), sorted(importers)


def test_one_function_renames_files():
    callers = {p.relative_to(ROOT).as_posix() for p in _sources() if "os.replace(" in p.read_text()}
    assert callers == {"zoomfeat/store/files.py"}


def test_tests_import_required_dependencies():
    offenders = [p.name for p in sorted((ROOT / "tests").glob("*.py")) if "importorskip(" in p.read_text()
                 and p.name != Path(__file__).name]
    assert not offenders, offenders


def test_tests_write_feature_files_through_the_store():
    """Only the layout tests write HDF5 themselves (other tools' layouts, by an independent writer); every zoomfeat
    feature file in the tests comes from the store. Other tests may open a file to read or corrupt it."""
    writers = {p.name for p in sorted((ROOT / "tests").glob("*.py"))
               if re.search(r"h5py\.File\([^)]*[\"']w[\"']", p.read_text()) and p.name != Path(__file__).name}
    assert writers == {"test_layouts.py", "test_layouts_mil.py"}, sorted(writers)


def test_magnifications_cross_function_boundaries_as_magnifications():
    """No function of the packages takes a magnification typed as a bare float or string (``mag: float``,
    ``mags: tuple[str, ...]``...): it is parsed once into a ``Magnification`` at the boundary (zoomfeat.mags)."""
    pattern = re.compile(r"\b(mag|mags|mag_name)\s*:\s*(float|str|(tuple|list|Sequence)\[(float|str)\b)")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in _sources() if p.name != "mags.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders
