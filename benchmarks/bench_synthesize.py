"""Benchmark: synthetic tiles per second for ``zoomfeat synthesize``, with and without the decode/encode round trip.

ZoomLDM features of a synthetic tile are taken from the generated latent directly
(``ZoomLDMFeaturizer.latent_features``). The reference it replaces is the round trip a pipeline without that
shortcut would make: decode the latent to pixels (first stage), re-encode them, then the same q_sample + U-Net to
block 3. Sampling (the DDIM steps) is common to both and timed on its own. The pixel-encoder path (decode, then
the toy encoder) is timed too. Model: the tiny golden ZoomLDM (``$ZOOMFEAT_SHARED/golden/zoomldm_tiny``) or any
official-format config + weights. Run by hand:

    python benchmarks/bench_synthesize.py --tiles 32 --steps 10 --threads 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

TINY = Path(__file__).resolve().parents[2] / "shared" / "golden" / "zoomldm_tiny"


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoomldm", default=str(TINY), help="folder with config.yaml + weights.ckpt")
    parser.add_argument("--tiles", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from zoomfeat.encoders import load_encoder
    from zoomfeat.extract.baseline import EncoderFeaturizer
    from zoomfeat.extract.featurizer import PatchBatch
    from zoomfeat.extract.zoomldm import ZoomLDMFeaturizer, to_model_input
    from zoomfeat.generate.guidance import Guidance
    from zoomfeat.generate.samplers import SamplerSettings, sample_patches
    from zoomfeat.mags import parse_mag
    from zoomfeat.model import load_zoomldm

    folder = Path(args.zoomldm)
    m = load_zoomldm(folder / "config.yaml", folder / "weights.ckpt", use_ema=True).eval()
    feat = ZoomLDMFeaturizer(m, 50, 3, "mean", "seeded")
    mag = parse_mag("5x")
    rng = np.random.default_rng(0)
    grids = rng.standard_normal((args.tiles, m.conditioning_dim, 4, 4)).astype(np.float32)
    coords = np.stack([np.arange(args.tiles) * 1024, np.zeros(args.tiles)], 1).astype(np.int64)
    batch = PatchBatch(None, mag, coords, "bench", grids)
    settings = SamplerSettings("ddim", args.steps, Guidance(2.0, "standard"))
    with torch.inference_mode():
        contexts = feat.context(grids, mag)
    latents = {}

    def sample():
        latents["z"] = sample_patches(m, contexts, list(range(args.tiles)), settings, batch_size=args.tiles)

    def direct():
        feat.latent_features(latents["z"], batch)

    def round_trip():
        with torch.inference_mode():
            pixels = ((m.decode_first_stage(latents["z"]).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            z = m.encode_first_stage(to_model_input(pixels, m.first_stage_resolution))
        feat.latent_features(z, batch)

    toy = EncoderFeaturizer(load_encoder("toy", dim=64, seed=0))

    def pixel_encoder():
        with torch.inference_mode():
            pixels = ((m.decode_first_stage(latents["z"]).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        toy(PatchBatch(pixels, mag, coords, "bench", None))

    sample()  # warm-up
    t_sample = best_of(sample, args.reps)
    t_direct = best_of(direct, args.reps)
    t_round = best_of(round_trip, args.reps)
    t_pixel = best_of(pixel_encoder, args.reps)
    n = args.tiles
    print(f"tiles={n} steps={args.steps} threads={args.threads} model={folder}")
    print("| stage | s per batch | tiles/s |\n|---|---|---|")
    for name, t in (("sampling (DDIM, CFG)", t_sample), ("ZoomLDM features from the latent", t_direct),
                    ("ZoomLDM features via decode + encode (reference)", t_round),
                    ("toy encoder features via decode", t_pixel)):
        print(f"| {name} | {t:.3f} | {n / t:.1f} |")
    print(f"| end to end, from the latent | {t_sample + t_direct:.3f} | {n / (t_sample + t_direct):.1f} |")
    print(f"| end to end, round trip | {t_sample + t_round:.3f} | {n / (t_sample + t_round):.1f} |")
    print(f"featurisation speed-up from the latent: {t_round / t_direct:.2f}x; end to end "
          f"{(t_sample + t_round) / (t_sample + t_direct):.2f}x")


if __name__ == "__main__":
    main()
