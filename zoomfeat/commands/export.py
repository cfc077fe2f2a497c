"""``zoomfeat export``: write a feature folder in the CLAM or TRIDENT layout, for one magnification."""

from __future__ import annotations

import argparse

HELP = "export zoomfeat feature files to the CLAM (h5_files + pt_files) or TRIDENT (features_<enc>) layout"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("features", metavar="DIR", help="feature folder written by `zoomfeat extract`")
    layout = parser.add_argument_group("export")
    layout.add_argument("--format", required=True, choices=("clam", "trident", "stamp", "slide2vec", "eva"),
                        help="target layout (required): CLAM h5_files+pt_files, TRIDENT features_<encoder>, STAMP "
                             "(coords in micrometres), slide2vec tile_embeddings, eva manifest + tensors")
    layout.add_argument("--mag", default="20x", help="magnification to export, e.g. 5x (default 20x)")
    layout.add_argument("--encoder-name", help="TRIDENT folder suffix (default: the files' extractor attribute)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="output folder (refused when it holds an export of another "
                        "folder, format or magnification)")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from zoomfeat.extract.export import ExportConfig, export_features

    cfg = ExportConfig(src_dir=Path(args.features), fmt=args.format, mag=args.mag, out_dir=Path(args.out),
                       encoder=args.encoder_name)
    result = export_features(cfg)
    for path, reason in result.skipped.items():
        print(f"error: {reason}" if str(path) in reason else f"error: {path}: {reason}", file=sys.stderr)
    print(f"export: {len(result.written)} files written to {cfg.out_dir} ({cfg.fmt}, {cfg.mag}); "
          f"{len(result.skipped)} skipped", file=sys.stderr)
    return result.exit_code
