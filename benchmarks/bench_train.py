"""ZoomLDM training step time and memory (run by hand; results go to benchmarks/RESULTS.md).

    python benchmarks/bench_train.py [--config $ZOOMFEAT_SHARED/golden/zoomldm_brca_config.yaml] [--batch-size 2]
                                     [--steps 3] [--threads 2]

Builds the architecture with random weights (``load_zoomldm(config, None)``), then runs the training step of
:class:`zoomfeat.train.module.ZoomLDMLightning` by hand (context from random grids at mixed magnifications,
eps-MSE, backward, AdamW step, EMA update) on synthetic latents, float32 on the CPU. Prints one Markdown row:
parameters, seconds per step (first step separately: it allocates the optimiser state), peak resident memory.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from pathlib import Path


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def make_batch(model, batch_size: int):
    """Random latents [B, z, h, w] and raw grids alternating 20x (1x1) and 2.5x (8x8)."""
    import torch

    d = model.config.diffusion
    mags = torch.tensor([0 if i % 2 == 0 else 3 for i in range(batch_size)])
    grids = [torch.randn(model.conditioning_dim, 1 if m == 0 else 8, 1 if m == 0 else 8) for m in mags.tolist()]
    return {"latents": torch.randn(batch_size, d.channels, d.image_size, d.image_size), "grids": grids, "mags": mags}


def run(config: str, batch_size: int, steps: int) -> dict:
    import torch

    from zoomfeat.model import load_zoomldm
    from zoomfeat.train.config import OptimSection, ValidationSection
    from zoomfeat.train.module import ZoomLDMLightning, step_generator

    rss0 = peak_rss_gib()
    start = time.perf_counter()
    model = load_zoomldm(config, None, use_ema=False)
    build_s = time.perf_counter() - start
    module = ZoomLDMLightning(model, OptimSection(), ValidationSection()).train()
    opt = module.configure_optimizers()["optimizer"]
    batch = make_batch(model, batch_size)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        loss = module.diffusion_loss(batch, step_generator(0, step, 0), 0.1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_ema(0.9999)
        times.append(time.perf_counter() - t0)
        print(f"step {step}: {times[-1]:.1f} s, loss {loss.item():.4f}", flush=True)
    trainable = sum(p.numel() for p in module.trainable_parameters())
    return {"trainable_m": trainable / 1e6, "build_s": build_s, "first_s": times[0],
            "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
            "peak_gib": peak_rss_gib(), "start_gib": rss0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = Path(os.environ.get("ZOOMFEAT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    parser.add_argument("--config", default=str(shared / "golden" / "zoomldm_brca_config.yaml"),
                        help="official config.yaml (default: the golden one under $ZOOMFEAT_SHARED)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    r = run(args.config, args.batch_size, args.steps)
    print("| config | batch | trainable params (M) | build (s) | first step (s) | step (s, median) | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.config} | {args.batch_size} | {r['trainable_m']:.1f} | {r['build_s']:.1f} | {r['first_s']:.1f} "
          f"| {r['step_s']:.1f} | {r['peak_gib']:.1f} |")


if __name__ == "__main__":
    main()
