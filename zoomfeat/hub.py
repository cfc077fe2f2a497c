"""Weights by name: Hugging Face Hub references turned into local files, offline first (torch-free).

Every weights option takes a local path (unchanged), ``hf-hub:ORG/NAME[/SUBFOLDER_OR_FILE][@REVISION]``, or a
registered name (:data:`KNOWN`: ``zoomldm-brca``, ``uni``, ...). A reference resolves, through
``huggingface_hub``, to files in its standard cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``), in the
library's own layout::

    models--ORG--NAME/blobs/<sha256 or git sha1>      the file contents
    models--ORG--NAME/refs/<branch>                   the commit sha the branch pointed to when fetched
    models--ORG--NAME/snapshots/<commit>/<path>       a link to the blob, one per fetched file

Offline first: a reference whose files are all in the cache (for ``main``: at the commit ``refs/main`` names)
is used without any network call, online or not; only missing files are downloaded (each with
``hf_hub_download``, so only the files the model needs), never under ``HF_HUB_OFFLINE=1``, where a missing
file is one line naming the repository, the files and ``zoomfeat fetch-weights NAME``. A cached file is taken
only when its contents match its blob name (the sha256 of an LFS file, the git sha1 of a small one): a
truncated or edited cache file is refused, never taken for the whole one. ``zoomfeat fetch-weights`` moves
``main`` forward; the commit and the files' sha256 go into the outputs' records (:func:`weights_sources`),
so a rerun after ``main`` moved is refused like a rerun with a changed local file.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from zoomfeat.errors import CheckpointError, ConfigError, one_line

PREFIX = "hf-hub:"
FORM = "hf-hub:ORG/NAME[/SUBFOLDER_OR_FILE][@REVISION]"
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_NOT_WEIGHTS = ("tiny", "toy")  # the packaged tiny ZoomLDM and the random toy encoder: no files to resolve
_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors", ".yaml", ".yml", ".json")


@dataclass(frozen=True)
class Known:
    """A registered name: the hub repository, the folder in it, the files each model needs (each entry a tuple
    of alternatives, first preferred), its licence and whether the repository is gated."""

    name: str
    repo: str
    folder: str
    files: tuple[tuple[str, ...], ...]
    licence: str
    gated: bool
    what: str


KNOWN: dict[str, Known] = {k.name: k for k in (
    Known("zoomldm-brca", "StonyBrook-CVLab/ZoomLDM", "brca", (("config.yaml",), ("weights.ckpt",)),
          "see the model page", False, "ZoomLDM trained on TCGA-BRCA (20x to 0.15625x), conditioned on UNI"),
    Known("zoomldm-naip", "StonyBrook-CVLab/ZoomLDM", "naip", (("config.yaml",), ("weights.ckpt",)),
          "see the model page", False, "ZoomLDM trained on NAIP satellite images, conditioned on DINOv2"),
    Known("uni", "MahmoodLab/UNI", "", (("pytorch_model.bin",),), "CC-BY-NC-ND-4.0", True,
          "UNI ViT-L/16 pathology encoder"),
    Known("phikon", "owkin/phikon", "", (("config.json",), ("model.safetensors", "pytorch_model.bin")),
          "Owkin non-commercial licence (model page)", False, "Phikon iBOT ViT-B/16 pathology encoder"),
    Known("dinov2", "timm/vit_large_patch14_reg4_dinov2.lvd142m", "", (("model.safetensors",),), "Apache-2.0",
          False, "DINOv2 ViT-L/14 with registers (timm), the NAIP ZoomLDM conditioner"),
)}
# Names a user may expect that have no official hub repository: the fix instead.
NO_HUB: dict[str, str] = {
    "ctranspath": "CTransPath has no official Hugging Face Hub repository: download ctranspath.pth from the "
                  "TransPath repository (github.com/Xiyue-Wang/TransPath) and pass its local path",
}


@dataclass(frozen=True)
class HubRef:
    """``repo`` (ORG/NAME), ``path`` inside it (a folder, a file, or "" for the root), ``revision`` (None = main)
    and ``name`` (the registered name it came from, if any; the fetch-weights argument of the messages)."""

    repo: str
    path: str = ""
    revision: str | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return PREFIX + "/".join(p for p in (self.repo, self.path) if p) + at

    @property
    def names_file(self) -> bool:
        return Path(self.path).suffix.lower() in _FILE_SUFFIXES

    @property
    def fetch_arg(self) -> str:
        return self.name or self.text


def known_names() -> str:
    return ", ".join(sorted(KNOWN))


def _unknown(value: str, option: str) -> ConfigError:
    return ConfigError(f"{option} {value!r}: not a local path, and not a known weights name ({known_names()}); "
                       f"pass a local path, one of those names or {FORM}")


def parse_reference(value: str, option: str = "weights") -> HubRef:
    """The :class:`HubRef` of ``hf-hub:...`` or of a registered name; ConfigError for a malformed reference, an
    unknown name, or a name without a hub repository."""
    text = str(value).strip()
    if text.lower() in KNOWN:
        k = KNOWN[text.lower()]
        return HubRef(k.repo, k.folder, None, k.name)
    if text.lower() in NO_HUB:
        raise ConfigError(f"{option} {text!r}: {NO_HUB[text.lower()]}")
    if not text.startswith(PREFIX):
        raise _unknown(text, option)
    body, at, revision = text[len(PREFIX):].partition("@")
    parts = body.split("/")
    if (len(parts) < 2 or not all(_PART.match(p) and p not in (".", "..") for p in parts)
            or (at and not _REVISION.match(revision)) or ".." in revision.split("/")):
        raise ConfigError(f"{option} {text!r}: malformed hub reference: use {FORM} "
                          f"(e.g. hf-hub:MahmoodLab/UNI or hf-hub:StonyBrook-CVLab/ZoomLDM/brca@main)")
    return HubRef("/".join(parts[:2]), "/".join(parts[2:]), revision or None, None)


def is_reference(value) -> bool:
    """True when ``value`` is to be resolved here: ``hf-hub:...``, or a bare word that is no existing path
    (a registered name, or an unknown one that gets the one-line list of names)."""
    if value is None:
        return False
    text = str(value).strip()
    if text.startswith(PREFIX):
        return True
    if not text or text.lower() in _NOT_WEIGHTS or Path(text).expanduser().exists():
        return False
    return text.lower() in KNOWN or text.lower() in NO_HUB or not ("/" in text or "\\" in text or "." in text)


# -- the cache -----------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """The hub cache, read from the environment now (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else the client's)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (read now, as the client reads it at import)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def repo_folder(repo: str) -> Path:
    return cache_dir() / ("models--" + repo.replace("/", "--"))


def cached_commit(ref: HubRef) -> str | None:
    """The commit the cache holds for ``ref.revision``: the revision itself when it is a commit sha, else the
    sha in ``refs/<revision>`` (main by default); None when the cache has none."""
    revision = ref.revision or "main"
    if _COMMIT.match(revision):
        return revision
    pointer = repo_folder(ref.repo) / "refs" / revision
    if pointer.is_file():
        commit = pointer.read_text().strip()
        return commit if _COMMIT.match(commit) else None
    return None


@dataclass(frozen=True)
class Resolved:
    """A reference resolved to local files: ``commit`` and ``files`` (one local path per needed entry, in the
    order asked, inside ``snapshots/<commit>/``)."""

    ref: HubRef
    commit: str
    files: tuple[Path, ...]


def _needs(ref: HubRef, files: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], ...]:
    """The entries as repo-relative alternatives. A reference that names a file needs that file (in place of the
    entry with the same suffix, or of the last entry: the weights)."""
    if not ref.names_file:
        return tuple(tuple("/".join(p for p in (ref.path, n) if p) for n in entry) for entry in files)
    folder, _, name = ref.path.rpartition("/")
    suffix = Path(name).suffix.lower()
    slot = next((i for i, entry in enumerate(files) if any(Path(n).suffix.lower() == suffix for n in entry)),
                len(files) - 1)
    entries = [tuple("/".join(p for p in (folder, n) if p) for n in entry) for entry in files]
    entries[slot] = (ref.path,)
    return tuple(entries)


def _from_cache(ref: HubRef, entries) -> Resolved | None:
    commit = cached_commit(ref)
    if commit is None:
        return None
    snapshot = repo_folder(ref.repo) / "snapshots" / commit
    chosen = []
    for entry in entries:
        found = next((snapshot / n for n in entry if (snapshot / n).is_file()), None)
        if found is None:
            return None
        chosen.append(found)
    for path in chosen:
        _check_blob(path, ref)
    return Resolved(ref, commit, tuple(chosen))


def _digest(path: Path, digest) -> str:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=64)
def _blob_ok(blob: str, size: int, mtime_ns: int) -> bool:
    path = Path(blob)
    if len(path.name) == 64:  # an LFS file: the sha256 of its contents
        return _digest(path, hashlib.sha256()) == path.name
    if len(path.name) == 40:  # a small file: its git blob sha1
        return _digest(path, hashlib.sha1(f"blob {size}\0".encode())) == path.name
    return True  # a blob name the client did not derive from the contents: nothing to check against


def _check_blob(path: Path, ref: HubRef) -> None:
    """CheckpointError when the cached file's contents do not match its blob name (truncated or edited)."""
    blob = path.resolve()
    stat = blob.stat()
    if not _blob_ok(str(blob), stat.st_size, stat.st_mtime_ns):
        raise CheckpointError(f"cached file {path} of {ref.repo} does not match its hash (cut short or edited): "
                              f"delete {blob} and rerun zoomfeat fetch-weights {ref.fetch_arg}")


def _missing(ref: HubRef, entries, why: str) -> ConfigError:
    known = KNOWN.get(ref.name or "")
    if known is not None:  # the files the name stands for, not every alternative an option accepts
        entries = tuple(tuple("/".join(p for p in (known.folder, n) if p) for n in e) for e in known.files)
    wanted = ", ".join(" or ".join(entry) for entry in entries)
    revision = f" at {ref.revision}" if ref.revision else ""
    return ConfigError(f"{ref.repo}{revision}: {wanted} not in the hub cache {cache_dir()} ({why}): run "
                       f"zoomfeat fetch-weights {ref.fetch_arg} where there is network (or copy that cache here)")


def hub_error(error: Exception, ref: HubRef, entries) -> ConfigError:
    """One line for an exception of the hub client."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    status = getattr(getattr(error, "response", None), "status_code", None)
    page = f"https://huggingface.co/{ref.repo}"
    if isinstance(error, GatedRepoError) or status in (401, 403):
        return ConfigError(f"{ref.repo} is gated and this machine is not authorised: accept its licence on {page} "
                           f"(logged in), then set HF_TOKEN to a read token of that account and rerun")
    if isinstance(error, RepositoryNotFoundError):
        return ConfigError(f"hub repository {ref.repo} not found (or private): check the name; for a private or "
                           f"gated repository set HF_TOKEN to a token with access")
    if isinstance(error, RevisionNotFoundError):
        return ConfigError(f"{ref.repo} has no revision {ref.revision!r}: pass a branch, tag or commit of {page}")
    if isinstance(error, LocalEntryNotFoundError):
        return _missing(ref, entries, "and the hub cannot be reached")
    if isinstance(error, HfHubHTTPError):
        return ConfigError(f"{ref.repo}: the hub refused the download (HTTP {status}): retry later, or "
                           f"fetch it elsewhere with zoomfeat fetch-weights {ref.fetch_arg}")
    return ConfigError(f"{ref.repo}: download failed ({one_line(error)}): check the network and free disk space, then "
                       f"rerun zoomfeat fetch-weights {ref.fetch_arg}")


def _download(ref: HubRef, entries) -> Resolved:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    chosen = []
    for entry in entries:
        for name in entry:
            try:
                local = huggingface_hub.hf_hub_download(ref.repo, name, revision=ref.revision,
                                                        cache_dir=str(cache_dir()))
            except LocalEntryNotFoundError as error:  # a subclass of EntryNotFoundError: no network, not no file
                raise hub_error(error, ref, entries) from error
            except EntryNotFoundError:
                continue
            except Exception as error:  # the client's errors (HTTP, network, disk): one line each
                raise hub_error(error, ref, entries) from error
            chosen.append(Path(local))
            break
        else:
            raise ConfigError(f"{ref.text}: the repository has none of {' / '.join(entry)}: pass the folder or "
                              "file of the model inside it (" + FORM + ")")
    commit = chosen[0].parent
    while commit.parent.name != "snapshots":
        commit = commit.parent
    for path in chosen:
        _check_blob(path, ref)
    return Resolved(ref, commit.name, tuple(chosen))


def resolve(ref: HubRef, files: tuple[tuple[str, ...], ...], *, refresh: bool = False) -> Resolved:
    """Local files for ``ref``: from the cache without a network call when all are there (unless ``refresh``,
    which asks the hub where the revision points now); else downloaded, or a one-line error offline."""
    entries = _needs(ref, files)
    if not refresh:
        hit = _from_cache(ref, entries)
        if hit is not None:
            return hit
    if offline():
        raise _missing(ref, entries, "HF_HUB_OFFLINE is set")
    return _download(ref, entries)


# -- what each option needs ----------------------------------------------------------------------------------

def resolve_files(value, files: tuple[tuple[str, ...], ...], option: str) -> Resolved:
    """:func:`resolve` for an option's value (``hf-hub:...`` or a registered name)."""
    return resolve(parse_reference(value, option), files)


def local_file(value, names: tuple[str, ...], option: str, extra: tuple[tuple[str, ...], ...] = ()) -> Path:
    """The local weight file for ``value``: ``value`` itself when it is no reference; else the first of
    ``names`` in the referenced folder (or the referenced file), fetched with the ``extra`` files it needs
    beside it (Phikon's config.json)."""
    if not is_reference(value):
        return Path(value)
    resolved = resolve_files(value, (*extra, tuple(names)), option)
    return resolved.files[-1]


def weights_sources(**paths) -> dict:
    """``{"weights_sources": {key: {"repository", "revision", "file"}}}`` for the paths that lie in a hub
    snapshot (the commit the files came from), ``{}`` when none does (local files: records unchanged)."""
    found = {key: source for key, source in ((k, hub_source(p)) for k, p in paths.items()) if source}
    return {"weights_sources": found} if found else {}


def hub_source(path) -> dict | None:
    """Repository, commit and repo-relative file of a path inside ``models--ORG--NAME/snapshots/<commit>/``."""
    if path is None:
        return None
    parts = Path(path).parts
    for i in range(len(parts) - 3):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots" and _COMMIT.match(parts[i + 2]):
            org_name = parts[i][len("models--"):].split("--", 1)
            if len(org_name) == 2:
                return {"repository": "/".join(org_name), "revision": parts[i + 2],
                        "file": "/".join(parts[i + 3:])}
    return None
