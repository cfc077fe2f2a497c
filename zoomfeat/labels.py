"""Reading and writing label tables: one row per slide, columns ``case_id, slide_id, label`` (+ others kept).

Slide ids are normalised with :func:`normalize_slide_id` (``TCGA-XX.svs`` and ``TCGA-XX`` are the same slide),
so split files, label tables and feature folders (``<slide_id>.h5``) match whatever extension each one used.
Labels are kept as strings (``"IDC"``, ``"1"``); mapping them to class indices is the consumer's job.

Problems that the reader fixes itself are counted in ``df.attrs["dropped"]`` (reason -> number of rows) and
logged; problems it cannot fix raise :class:`~zoomfeat.errors.DataError` naming the file, the lines and the fix.
"""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Sequence

import pandas as pd

from zoomfeat.errors import DataError

log = logging.getLogger(__name__)

# extensions stripped from slide ids: OpenSlide's slide formats plus the per-slide files of feature pipelines
SLIDE_ID_EXTENSIONS: tuple[str, ...] = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm",
    ".czi", ".isyntax", ".h5", ".pt",
)

ID_COLUMNS: tuple[str, str] = ("case_id", "slide_id")


def normalize_slide_id(s: object) -> str:
    """``" dir/TCGA-A1.svs "`` -> ``"TCGA-A1"``: strip blanks, folders and one known slide/feature extension.

    Dots inside the id (TCGA's ``DX1.<uuid>``) are kept: only the extensions in ``SLIDE_ID_EXTENSIONS`` go.
    """
    text = str(s).strip()
    text = PureWindowsPath(PurePosixPath(text).name).name if ("/" in text or "\\" in text) else text
    lower = text.lower()
    for ext in SLIDE_ID_EXTENSIONS:
        if lower.endswith(ext) and len(text) > len(ext):
            return text[: -len(ext)]
    return text


def _read_zip_member(path: Path) -> pd.DataFrame:
    """Read the one CSV member of a zip in memory (HIPT's member is named ``../x.csv.zip``: never extract)."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = [i for i in zf.infolist() if not i.is_dir()]
            if len(members) != 1:
                names = ", ".join(i.filename for i in members) or "none"
                raise DataError(f"{path}: expected one CSV member in the zip, found {len(members)} ({names}); "
                                "pass the CSV itself")
            data = zf.read(members[0])
    except zipfile.BadZipFile as exc:
        raise DataError(f"{path}: not a readable zip file ({exc}); pass a CSV or a zip with one CSV") from exc
    return _read_csv_bytes(io.BytesIO(data), f"{path} (member {members[0].filename!r})")


def _read_csv_bytes(source, where: str) -> pd.DataFrame:
    try:
        return pd.read_csv(source, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: cannot parse as CSV ({exc}); fix the file") from exc


def read_table(path: str | Path) -> pd.DataFrame:
    """Any CSV (or a zip holding one CSV, read in memory) as strings, blanks as ``""``, no index column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label table not found; pass an existing CSV or zip")
    df = _read_zip_member(path) if zipfile.is_zipfile(path) else _read_csv_bytes(path, str(path))
    df.columns = [str(c).strip() for c in df.columns]
    unnamed = [c for c in df.columns if c == "" or c.startswith("Unnamed:")]
    return df.drop(columns=unnamed)


def _file_lines(index: Sequence[int]) -> str:
    """Data row positions (0-based) -> file line numbers (header = line 1)."""
    return ", ".join(str(int(i) + 2) for i in index)


def _check_columns(df: pd.DataFrame, needed: Sequence[str], path: Path) -> None:
    for col in needed:
        if col not in df.columns:
            present = ", ".join(df.columns) or "none"
            raise DataError(f"{path}: missing column {col!r} (columns present: {present}); "
                            f"add it or pass the right column name")


def _drop_blank_labels(df: pd.DataFrame, path: Path, dropped: dict[str, int]) -> pd.DataFrame:
    blank = df["label"].str.strip() == ""
    if blank.any():
        dropped["empty label"] = int(blank.sum())
        log.warning("%s: dropped %d rows with an empty label", path, int(blank.sum()))
    return df[~blank]


def _check_ids(df: pd.DataFrame, path: Path) -> None:
    for col in ID_COLUMNS:
        blank = df[col] == ""
        if blank.any():
            raise DataError(f"{path}: empty {col} on line(s) {_file_lines(df.index[blank][:5])}; fill it in")


def _resolve_duplicates(df: pd.DataFrame, path: Path, dropped: dict[str, int]) -> pd.DataFrame:
    exact = df.duplicated(keep="first")
    if exact.any():
        dropped["exact duplicate row"] = int(exact.sum())
        log.warning("%s: dropped %d exact duplicate rows", path, int(exact.sum()))
        df = df[~exact]
    dup = df.duplicated("slide_id", keep=False)
    for slide_id, rows in df[dup].groupby("slide_id", sort=True):
        for col in ("label", "case_id"):
            if rows[col].nunique() > 1:
                values = ", ".join(f"{v!r}" for v in rows[col])
                raise DataError(f"{path}: slide {slide_id} is listed with different {col}s ({values}) on lines "
                                f"{_file_lines(rows.index)}; keep one row per slide")
    same = df.duplicated(["slide_id", "case_id", "label"], keep="first")
    if same.any():
        dropped["duplicate slide, same label"] = int(same.sum())
        log.warning("%s: dropped %d repeated rows of the same slide and label", path, int(same.sum()))
        df = df[~same]
    return df


def read_labels(path: str | Path, label_col: str = "label",
                required: Sequence[str] = ID_COLUMNS) -> pd.DataFrame:
    """Read a label table (CSV, or a zip with one CSV member read in memory) into a validated DataFrame.

    Returns one row per slide with columns ``case_id, slide_id, label`` first (``label_col`` renamed to
    ``label``), then the other columns of the file; all values are strings, slide ids normalised.
    ``df.attrs["dropped"]`` maps each fixed problem (empty label, exact duplicate row) to its row count.
    Raises DataError for a missing column, an empty id, or a slide listed with two labels or two cases.
    """
    path = Path(path)
    df = read_table(path)
    _check_columns(df, [*required, label_col], path)
    if label_col != "label":
        df = df.drop(columns=[c for c in ("label",) if c in df.columns]).rename(columns={label_col: "label"})
    for col in [*ID_COLUMNS, "label"]:
        if col in df.columns:
            df[col] = df[col].astype(str).str.strip()
    if "slide_id" in df.columns:
        df["slide_id"] = df["slide_id"].map(normalize_slide_id)
    dropped: dict[str, int] = {}
    df = _drop_blank_labels(df, path, dropped)
    _check_ids(df, path)
    df = _resolve_duplicates(df, path, dropped)
    first = [c for c in (*ID_COLUMNS, "label") if c in df.columns]
    df = df[first + [c for c in df.columns if c not in first]].reset_index(drop=True)
    df.attrs["dropped"] = dropped
    df.attrs["source"] = str(path)
    return df


def write_labels(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a label table as CSV (``case_id, slide_id, label`` first) through a temp file and a rename."""
    path = Path(path)
    _check_columns(df, [*ID_COLUMNS, "label"], path)
    first = [*ID_COLUMNS, "label"]
    out = df[first + [c for c in df.columns if c not in first]]
    from zoomfeat.store import atomic_write

    with atomic_write(path) as tmp:
        out.to_csv(tmp, index=False)
    return path
