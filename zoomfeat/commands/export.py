"""``zoomfeat export``: write a feature folder in the CLAM or TRIDENT layout, for one magnification."""

from __future__ import annotations

import argparse

HELP = "export zoomfeat feature files to the CLAM (h5_files + pt_files) or TRIDENT (features_<enc>) layout"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("features", metavar="DIR", help="feature folder written by `zoomfeat extract`")
    parser.add_argument("--format", required=True, choices=("clam", "trident"), help="target layout")
    parser.add_argument("--mag", default="20x", help="magnification to export (default 20x)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--encoder-name", help="TRIDENT folder suffix (default: the files' extractor)")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from zoomfeat.extract.export import ExportConfig, export_features

    cfg = ExportConfig(src_dir=Path(args.features), fmt=args.format, mag=args.mag, out_dir=Path(args.out),
                       encoder=args.encoder_name)
    result = export_features(cfg)
    for path in result.skipped:
        print(f"warning: {path} is incomplete; not exported (re-run `zoomfeat extract`)", file=sys.stderr)
    print(f"export: {len(result.written)} files written to {cfg.out_dir} ({cfg.fmt}, {cfg.mag})", file=sys.stderr)
    return 0
