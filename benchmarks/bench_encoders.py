"""Encoder throughput on uint8 256-px tiles: preprocess + forward, per registered encoder (run by hand).

    python benchmarks/bench_encoders.py [--batch 8] [--repeats 3] [--device cpu] [--encoders uni,phikon]

Weights are random (``Encoder.build``): speed does not depend on their values. Prints one Markdown row
per encoder: build seconds, median seconds per batch, tiles per second.
"""

from __future__ import annotations

import argparse
import statistics
import time


def measure(name: str, batch: int, repeats: int, device: str) -> tuple[float, float]:
    """(build seconds, median seconds per batch of ``batch`` uint8 [3, 256, 256] tiles)."""
    import torch

    from zoomfeat.encoders import ENCODERS, encoder_class
    from zoomfeat.encoders.registry import freeze

    start = time.perf_counter()
    encoder = freeze(encoder_class(name).build(ENCODERS[name], seed=0)).to(device)
    built = time.perf_counter() - start
    tiles = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device=device)
    times = []
    with torch.inference_mode():
        encoder(encoder.preprocess(tiles))  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            encoder(encoder.preprocess(tiles))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return built, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--encoders", default="", help="comma-separated names (default: all registered)")
    args = parser.parse_args()
    from zoomfeat.encoders import encoder_names

    names = [n.strip() for n in args.encoders.split(",") if n.strip()] or encoder_names()
    print("| encoder | build s | s / batch of", args.batch, "| tiles / s |")
    print("|---|---|---|---|")
    for name in names:
        built, per_batch = measure(name, args.batch, args.repeats, args.device)
        print(f"| {name} | {built:.1f} | {per_batch:.2f} | {args.batch / per_batch:.1f} |", flush=True)


if __name__ == "__main__":
    main()
