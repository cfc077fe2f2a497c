"""``zoomfeat synth``: write a synthetic cohort of pyramidal slides with a planted class signal."""

from __future__ import annotations

import argparse

from zoomfeat.errors import ConfigError

HELP = "write synthetic H&E-like pyramidal slides + labels.csv + signal.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=8, help="number of slides")
    parser.add_argument("--size", type=int, default=8192, help="level-0 side in px (multiple of 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tissue layout and the labels")
    parser.add_argument("--format", choices=("aperio", "tiff"), default="aperio",
                        help="aperio: SVS-style JPEG-tiled TIFF with AppMag/MPP; tiff: generic pyramidal TIFF")
    parser.add_argument("--slides-per-patient", default="1",
                        help="slides per patient: a number, or a pattern cycled over patients such as 1,2,3")
    parser.add_argument("--signal-strength", type=float, default=1.0, help="0 (none) to 1 (full)")
    parser.add_argument("--signal-scales", default="20x,5x", help="scales carrying the signal: 20x, 5x or both")
    parser.add_argument("--kind", choices=("boxes", "arrangement"), default="boxes",
                        help="boxes: signal boxes at --signal-scales (default); arrangement: two tissue types per "
                             "20x tile, clustered (label 1) or intermixed (label 0), a signal only visible at 5x")
    parser.add_argument("--cluster", type=float, default=2.0,
                        help="--kind arrangement: correlation length of the label-1 clusters, in 20x tiles (default 2)")
    parser.add_argument("--tile-signal", type=float, default=0.0,
                        help="--kind arrangement: share of the label-1 epithelium tiles drawn with finer-grained nuclei "
                             "of the same colour (a cell-level cue), 0-1 (default 0)")


def run(args: argparse.Namespace) -> int:
    from zoomfeat.synthetic import write_cohort

    scales = tuple(s for s in args.signal_scales.split(",") if s.strip())
    try:
        per_patient = tuple(int(v) for v in args.slides_per_patient.split(","))
    except ValueError as exc:
        raise ConfigError(f"--slides-per-patient {args.slides_per_patient!r}: use a number or a list like 1,2,3") from exc
    out = write_cohort(args.out, n=args.n, size=args.size, seed=args.seed, slides_per_patient=per_patient,
                       fmt=args.format, signal_strength=args.signal_strength, signal_scales=scales,
                       kind=args.kind, cluster=args.cluster, tile_signal=args.tile_signal)
    print(f"wrote {args.n} slides, labels.csv and signal.json to {out}")
    return 0
