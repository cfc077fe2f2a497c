"""Plain files and folders: the one atomic write, the slide fingerprint, the settings comparison and the
check every output folder gets before a command writes into it.

* :func:`atomic_write` / :func:`commit_file`: a file appears complete under its name or not at all (hidden
  temporary file in the same folder, fsync, rename, folder fsync; the temporary file is removed on any error).
  :func:`commit_file` holds the package's only ``os.replace``. A failing write (full disk, read-only or
  immutable folder) is an :class:`OutputError` naming the file and the errno text, never a traceback.
* :func:`fingerprint`: identity of a slide file (absolute path, size, mtime in ns) stored in every file made
  from it, so a rerun skips it only when the very same file is given and a same-stem slide is refused.
* :func:`settings_diff`: the one "are these settings the same" comparison (extract, prepare-train, train and
  train-mil resume): the dotted keys whose values differ, with their old and new values.
* :func:`check_output_folder`: ``--out`` (or any other output folder) is a writable folder and, when it
  already holds a settings record, one made with the same settings (otherwise a ConfigError naming the
  folder, the option that chose it and the keys that differ).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from zoomfeat.errors import ConfigError, DataError, one_line
from zoomfeat.serial import to_jsonable as jsonable


class OutputError(DataError):
    """An output file or folder that cannot be written (full disk, read-only, a file where a folder goes).

    Fatal for a whole batch: every later slide would fail the same way, so :func:`zoomfeat.batch.run_batch`
    stops at the first one instead of reporting each slide.
    """


def temp_path(path: str | Path) -> Path:
    """Hidden temporary name, in the same folder, under which ``path`` is written before the rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def output_error(exc: OSError, path: str | Path, what: str = "write") -> OutputError:
    """One-line :class:`OutputError` for an OSError raised while writing ``path``."""
    reason = exc.strerror or one_line(exc)
    fix = {errno.ENOSPC: "free disk space or write to another folder",
           errno.EDQUOT: "free quota or write to another folder",
           errno.EROFS: "the file system is read-only: write to another folder",
           errno.EACCES: "make the folder writable or write to another folder",
           errno.EPERM: "the folder or file is protected (immutable?): write to another folder",
           errno.ENOTDIR: "a file stands where a folder is expected: give a folder path"}.get(
        exc.errno, "check the output folder")
    return OutputError(f"cannot {what} {path}: {reason}; {fix}")


_H5_ERRNO = re.compile(r"errno = (\d+)")


def write_failure(exc: BaseException, path: str | Path) -> BaseException:
    """The error to raise for an exception from writing ``path``: OSErrors, and the RuntimeErrors in which
    the HDF5 library reports a failed write (``... errno = 28, error message = 'No space left on device'``),
    become an :class:`OutputError`; anything else is returned unchanged (a bug keeps its type)."""
    match = _H5_ERRNO.search(str(exc)) if isinstance(exc, (OSError, RuntimeError)) else None
    if match and int(match.group(1)):  # HDF5's long text: keep its errno only
        code = int(match.group(1))
        return output_error(OSError(code, os.strerror(code)), path)
    if isinstance(exc, OSError) and exc.errno is not None:
        return output_error(exc, path)
    return output_error(exc, path) if isinstance(exc, OSError) else exc


HDF5_OVERHEAD = 32 * 1024  # bytes of headers, B-trees and attributes of a small HDF5 file, generously


def check_free_space(path: str | Path, needed: int) -> None:
    """OutputError when the folder of ``path`` has fewer than ``needed`` bytes free.

    Checked before an HDF5 file is written: the HDF5 library can crash the process (segfault) when the disk
    fills up in the middle of a write, so a file that cannot fit is refused before it is started.
    """
    import shutil

    folder = Path(path).parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # cannot tell: the write itself will report a failure
    if free < needed:
        raise output_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path)


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """``with writing(path): <write it>``: a failed write (see :func:`write_failure`) is an OutputError."""
    try:
        yield
    except OutputError:
        raise
    except (OSError, RuntimeError) as exc:
        error = write_failure(exc, path)
        if error is exc:
            raise
        raise error from exc


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on folders
    finally:
        os.close(fd)


def commit_file(tmp: str | Path, path: str | Path) -> Path:
    """Make a finished temporary file the real ``path``: fsync it, rename it over ``path``, fsync the folder.

    The one rename of the package: every writer (feature files, JSON/YAML records, CSV tables, checkpoints,
    images) ends here, directly or through :func:`atomic_write`. The temporary files of ``path`` that a killed
    writer left (their process is gone) are removed then, so a rerun after SIGKILL leaves the folder as an
    uninterrupted run does.
    """
    tmp, path = Path(tmp), Path(path)
    try:
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise output_error(exc, path) from exc
    _fsync_dir(path.parent)
    for left in path.parent.glob(f".{glob.escape(path.name)}.tmp*"):
        pid = left.name.rpartition(".tmp")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            discard(left)
    return path


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (one of another user's counts as running; a number no
    process can have does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):  # a pid out of range, read from a damaged file name or record
        return False
    return True


def make_folder(folder: str | Path, option: str = "--out") -> Path:
    """Create ``folder`` (and parents); :class:`OutputError` naming ``option`` when that is impossible."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{option} {folder} is a file, not a folder: give a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{option} {folder} cannot be created ({exc.strerror or exc}): give a writable folder") \
            from exc
    return folder


def discard(path: str | Path) -> None:
    """Remove a temporary file if it is there; a folder where nothing can be removed (read-only: even a missing
    file's unlink is EROFS there) had nothing written either, so the error is not the one to report."""
    try:
        Path(path).unlink()
    except OSError:
        pass


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EFBIG)


def os_write_error(exc: BaseException) -> OutputError | None:
    """The one-line :class:`OutputError` for an OSError of a failed write that reached the command line from a
    writer outside the store (a folder made with ``mkdir``, a third-party writer), naming the path and cause;
    None for anything else."""
    if not isinstance(exc, OSError) or exc.errno not in WRITE_ERRNOS:
        return None
    return output_error(exc, exc.filename if exc.filename is not None else "the output")


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`: the one write of every torch file.

    torch.save given a file name writes through its own C++ writer, which reports a full disk as a
    RuntimeError without an errno ("unexpected pos ..."); given a Python file it writes through it, so a
    full disk or quota is the OSError (ENOSPC, EDQUOT) that becomes one line naming the file.
    """
    import torch

    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
    return Path(path)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """``with atomic_write(out) as tmp: <write the file tmp>``: ``out`` appears complete or not at all.

    The parent folder is created; the temporary file (hidden, same folder) is removed when the block raises,
    including on KeyboardInterrupt. An OSError inside the block becomes an :class:`OutputError`.
    """
    path = Path(path)
    make_folder(path.parent, "output folder")
    tmp = temp_path(path)
    try:
        with writing(path):
            yield tmp
            commit_file(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def fingerprint(slide_path: str | Path) -> dict:
    """Identity of a slide file for skipping: absolute path, size in bytes, mtime in ns."""
    path = Path(slide_path).resolve()
    stat = path.stat()
    return {"path": str(path), "size": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns)}


def same_file(record: Mapping | str | None, slide_path: str | Path) -> bool:
    """True when a stored fingerprint (dict or its JSON) describes the file ``slide_path`` as it is now."""
    if isinstance(record, str):
        try:
            record = json.loads(record or "{}")
        except ValueError:
            return False
    try:
        return dict(record or {}) == fingerprint(slide_path)
    except OSError:
        return False


def settings_diff(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` for every setting that differs (empty when the same).

    Both sides are compared in their JSON form (tuples equal lists, paths equal their text); nested
    dicts are walked key by key, so the result names ``extractor_config.timestep``, not ``extractor_config``.
    A key present on one side only differs from the other side's ``None``.
    """
    old, new = jsonable(old), jsonable(new)
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return {} if _same(old, new) else {prefix.rstrip(".") or "value": (old, new)}
    changed: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed.update(settings_diff(a, b, f"{prefix}{key}."))
        elif not _same(a, b):
            changed[f"{prefix}{key}"] = (a, b)
    return changed


def _same(a: Any, b: Any) -> bool:
    """Equal values, or two spellings of one existing file or folder (``out/w.ckpt`` and ``/abs/out/w.ckpt``:
    a rerun from another working directory, or with the absolute path, is the same setting)."""
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str) and a and b):
        return False
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def describe_diff(diff: Mapping[str, tuple[Any, Any]], limit: int = 4) -> str:
    """``"timestep 50 -> 100, mags ['20x'] -> ['5x']"`` (the first ``limit`` keys, then a count)."""
    parts = [f"{key} {_short(a)} -> {_short(b)}" for key, (a, b) in list(diff.items())[:limit]]
    more = f" (+{len(diff) - limit} more)" if len(diff) > limit else ""
    return ", ".join(parts) + more


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:16] + "..." + text[-8:]


def _probe_writable(folder: Path) -> None:
    """Create and remove a hidden file in ``folder`` (root ignores permission bits, so test for real)."""
    probe = folder / f".zoomfeat-write-probe.{os.getpid()}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    probe.unlink()


def check_output_folder(folder: str | Path, option: str, record: Mapping | None = None,
                        record_name: str | None = None, section: str = "features", *, write: bool = True,
                        extra: Mapping | None = None) -> Path:
    """Prepare an output folder a command writes into; the same check for ``--out`` and every other one.

    ``folder`` must be (or become) a writable folder (:class:`OutputError` otherwise). With ``record`` and
    ``record_name``, ``<folder>/<record_name>`` keeps ``{section: record}``: a folder whose record holds other
    settings is refused with a :class:`ConfigError` naming the folder, ``option`` and the differing keys;
    otherwise the record is written (when ``write``), with the ``extra`` entries (e.g. the run's whole config)
    beside it. Returns the folder.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{option} {folder} is a file, not a folder: give a folder path")
    if record is not None and record_name is not None:
        check_record(folder / record_name, option, record, section)
    if not write:
        return folder
    make_folder(folder, option)
    try:
        _probe_writable(folder)
    except OSError as exc:
        raise OutputError(f"{option} {folder} is not writable ({exc.strerror or exc}): give a writable folder") \
            from exc
    if record is not None and record_name is not None:
        path = folder / record_name
        old = _read_record(path, option) if path.is_file() else {}
        write_text(path, json.dumps(jsonable({**old, **dict(extra or {}), section: record}), indent=2) + "\n")
    return folder


def _read_record(path: Path, option: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable JSON settings record: delete it or use another {option}") \
            from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object: delete it or use another {option}")
    return data


def check_record(path: Path, option: str, record: Mapping, section: str = "features") -> None:
    """ConfigError when ``path`` exists and its ``section`` differs from ``record`` (see check_output_folder)."""
    if not path.is_file():
        return
    old = _read_record(path, option).get(section)
    if not old:
        return
    diff = settings_diff(old, record)
    if diff:
        raise ConfigError(f"{path.parent} holds outputs made with other settings ({describe_diff(diff)}): "
                          f"pass another {option} or the same settings")


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "w") as fh:
        json.dump(jsonable(data), fh, indent=2, sort_keys=False)
        fh.write("\n")
    return path
