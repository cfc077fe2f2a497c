"""Benchmark: ZoomLDM U-Net truncated at output_blocks[3] (``unet_features``) vs the full U-Net forward.

Full-size architecture from the official BRCA config, random weights, 64x64 latents, context [B,65,512].
Reports GFLOPs per latent (torch.utils.flop_counter, batch 1) and wall time per batch (median of --reps
after one warm-up) for float32 and, where supported, bfloat16 autocast. Run by hand:

    python benchmarks/bench_unet_features.py --batch 8 --reps 1 --threads 2 [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from zoomfeat.model import build_zoomldm

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "golden" / "zoomldm_brca_config.yaml"


def inputs(m, batch: int, device: str):
    side = m.config.diffusion.image_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, m.latent_channels, side, side, generator=g).to(device)
    t = torch.full((batch,), 50, dtype=torch.long).to(device)
    ctx = torch.randn(batch, 65, m.context_dim, generator=g).to(device)
    return x, t, ctx


def gflops_per_latent(config: str, block: int) -> tuple[float, float]:
    """(unet_features, full U-Net) GFLOPs for one latent, counted on the meta device (no compute).

    On meta, scaled_dot_product_attention decomposes into matmuls that the counter sees; the CPU flash
    kernel is not counted by FlopCounterMode, which would under-count attention by ~10 GFLOPs.
    """
    m = build_zoomldm(config, device="meta").eval()
    x, t, c = inputs(m, 1, "meta")
    counts = []
    for fn in (lambda: m.unet_features(x, t, c, block), lambda: m.unet(x, t, c)):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            fn()
        counts.append(counter.get_total_flops() / 1e9)
    return counts[0], counts[1]


def timed(fn, warmup, reps: int, device: str, autocast) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after one run of ``warmup`` (a small batch)."""
    def once(f) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad(), autocast():
            f()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once(warmup)
    return statistics.median(once(fn) for _ in range(reps))


def bf16_supported(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.functional.conv2d(torch.randn(1, 32, 8, 8), torch.randn(32, 32, 3, 3))
    except RuntimeError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--block", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    f_feat, f_full = gflops_per_latent(args.config, args.block)
    m = build_zoomldm(args.config).eval().to(args.device)
    x1, t1, c1 = inputs(m, 1, args.device)
    print(f"GFLOPs per latent: unet_features(block={args.block}) {f_feat:.1f}, full U-Net {f_full:.1f}, "
          f"ratio {f_full / f_feat:.2f}")
    x, t, c = inputs(m, args.batch, args.device)
    dtypes = [("float32", nullcontext)]
    if bf16_supported(args.device):
        dtypes.append(("bf16 autocast", lambda: torch.autocast(args.device, dtype=torch.bfloat16)))
    print(f"device {args.device}, threads {torch.get_num_threads()}, batch {args.batch}, reps {args.reps}")
    for name, autocast in dtypes:
        s_feat = timed(lambda: m.unet_features(x, t, c, args.block), lambda: m.unet_features(x1, t1, c1, args.block),
                       args.reps, args.device, autocast)
        s_full = timed(lambda: m.unet(x, t, c), lambda: m.unet(x1, t1, c1), args.reps, args.device, autocast)
        print(f"{name}: unet_features {s_feat:.3f} s/batch ({args.batch / s_feat:.2f} latents/s), "
              f"full {s_full:.3f} s/batch ({args.batch / s_full:.2f} latents/s), speed-up {s_full / s_feat:.2f}x")


if __name__ == "__main__":
    main()
