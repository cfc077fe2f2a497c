"""``zoomfeat fetch-weights``: download a model's weights into the Hugging Face Hub cache and print where.

``NAME`` is a registered name (``zoomfeat fetch-weights --list``) or ``hf-hub:ORG/NAME[/SUBFOLDER_OR_FILE]
[@REVISION]``. Only the files the model needs are fetched (a registered name's files, the named file, or
``--files``; a folder without ``--files``: every file under it). The hub is asked where the revision points
now, so a moved ``main`` is fetched; under ``HF_HUB_OFFLINE=1`` the cached copy is reported instead.
"""

from __future__ import annotations

import argparse

from zoomfeat import hub
HELP = "download weights by name or hf-hub: reference into the Hugging Face cache and print where they are"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", metavar="NAME|hf-hub:ORG/NAME[/PATH][@REV]",
                        help="a registered name (see --list) or a hub reference")
    parser.add_argument("--files", metavar="F1,F2", help="files to fetch inside the referenced folder "
                        "(default: a registered name's files; for another folder, every file under it)")
    parser.add_argument("--list", action="store_true",
                        help="list the registered names: repository, files, licence, gated (default: off)")


def _print_list() -> None:

    for k in hub.KNOWN.values():
        files = ", ".join(" or ".join(e) for e in k.files)
        where = "/".join(p for p in (k.repo, k.folder) if p)
        print(f"{k.name:13s} {where} [{files}] licence: {k.licence}; {'gated' if k.gated else 'not gated'}: {k.what}")
    for name, text in hub.NO_HUB.items():
        print(f"{name:13s} {text}")


def _fetch_folder(ref) -> tuple[str, list]:
    """Every file under the referenced folder (``snapshot_download`` with one pattern), (commit, paths)."""
    from pathlib import Path

    import huggingface_hub


    pattern = f"{ref.path}/*" if ref.path else None
    try:
        root = Path(huggingface_hub.snapshot_download(ref.repo, revision=ref.revision, allow_patterns=pattern,
                                                      cache_dir=str(hub.cache_dir())))
    except Exception as error:  # the client's errors (HTTP, network, disk): one line each
        raise hub.hub_error(error, ref, ((pattern or "every file",),)) from error
    files = sorted(p for p in (root / ref.path).rglob("*") if p.is_file())
    return root.name, files


def run(args: argparse.Namespace) -> int:
    from zoomfeat.errors import ConfigError

    if args.list:
        _print_list()
        return 0
    if not args.name:
        raise ConfigError(f"fetch-weights needs NAME (one of {hub.known_names()}) or {hub.FORM}")
    ref = hub.parse_reference(args.name, "fetch-weights")
    known = hub.KNOWN.get(ref.name or "")
    if args.files:
        files = tuple((f.strip(),) for f in args.files.split(",") if f.strip())
    elif known is not None:
        files = known.files
    elif ref.names_file:
        files = ((ref.path.rpartition("/")[2],),)
    else:
        files = None
    if files is None:
        if hub.offline():
            raise ConfigError(f"{ref.text}: fetching a whole folder needs the network and HF_HUB_OFFLINE is set: "
                              "unset it, or pass --files to report cached files")
        commit, paths = _fetch_folder(ref)
    else:
        cached = hub.offline()
        resolved = hub.resolve(ref, files, refresh=not cached)
        commit, paths = resolved.commit, list(resolved.files)
        if cached:
            print(f"HF_HUB_OFFLINE is set: the cached copy (not checked for a newer {ref.revision or 'main'})")
    print(f"{ref.repo} at commit {commit} (cache {hub.cache_dir()}):")
    for path in paths:
        print(f"  {path}")
    print(f"use it as {args.name} (offline with HF_HUB_OFFLINE=1), or by the paths above")
    return 0
