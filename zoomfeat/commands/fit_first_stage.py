"""``zoomfeat fit-first-stage``: fit a (tiny) ZoomLDM's autoencoder to a cohort's patches (zoomfeat.first_stage_fit)."""

from __future__ import annotations

import argparse

from zoomfeat.log import quiet_third_party

HELP = ("fit the first stage of a (tiny) ZoomLDM to some slides' patches: encoder to their mean colours, codebook "
        "and decoder to reconstruct them -> an initial checkpoint for prepare-train and train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files whose patches the fit sees")
    data = parser.add_argument_group("data")
    data.add_argument("--tiles", required=True, metavar="DIR",
                      help="tile stores of those slides (zoomfeat tile --mags 20x,5x); required")
    data.add_argument("--per-mag", type=int, default=24,
                      help="at most N 20x tiles and N 5x patches per slide (drawn as prepare-train draws them; "
                           "default 24)")
    model = parser.add_argument_group("model")
    model.add_argument("--zoomldm", default="tiny", metavar="CONFIG_OR_DIR",
                       help="official config.yaml or its folder, or tiny (the packaged CPU-sized config; default)")
    fit = parser.add_argument_group("fit")
    fit.add_argument("--steps", type=int, default=120,
                     help="Adam steps fitting the encoder to the patches' mean colours (default 120)")
    fit.add_argument("--decoder-steps", type=int, default=200,
                     help="Adam steps fitting the decoder to reconstruct the patches; 0 leaves it random "
                          "(default 200)")
    fit.add_argument("--batch-size", type=int, default=16, help="patches per step (default 16)")
    fit.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    fit.add_argument("--seed", type=int, default=0,
                     help="seed of the initial weights, the patch draws and the codebook (default 0)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, metavar="CKPT",
                        help="checkpoint to write (official format; its fit record goes beside it as .json); "
                             "required")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zoomfeat.first_stage_fit import fit_first_stage

    quiet_third_party()
    record = fit_first_stage(args.zoomldm, [Path(s) for s in args.slides], Path(args.tiles),
                             Path(args.out), seed=args.seed, steps=args.steps, decoder_steps=args.decoder_steps,
                             per_mag=args.per_mag, batch=args.batch_size, lr=args.lr)
    decoder = (f", decoder loss {record['decoder_first_loss']:.3g} -> {record['decoder_last_loss']:.3g}"
               if record["decoder_steps"] else ", decoder left random")
    print(f"fit-first-stage: encoder loss {record['first_loss']:.3g} -> {record['last_loss']:.3g}{decoder}; "
          f"wrote {args.out}")
    return 0
