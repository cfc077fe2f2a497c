"""Tiles/s read at 20x and 5x: TilePatchDataset through a DataLoader (0, 1, 2 workers) vs a bare
OpenSlide read_region loop on the same tiles. Run by hand: python benchmarks/bench_tiles.py [--size 8192]."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import openslide

from zoomfeat.patches import TilePatchDataset, patch_loader
from zoomfeat.slides import Slide
from zoomfeat.synthetic import write_synthetic_slide
from zoomfeat.tiling import make_grid


def bare_loop(path: Path, coords, level: int, size_at_level: int) -> float:
    slide = openslide.OpenSlide(str(path))
    start = time.perf_counter()
    for x, y in coords:
        slide.read_region((int(x), int(y)), level, (size_at_level, size_at_level)).convert("RGB")
    return len(coords) / (time.perf_counter() - start)


def loader_rate(path: Path, coords, mag: float, workers: int) -> float:
    loader = patch_loader(TilePatchDataset(path, coords, mag), batch_size=32, workers=workers)
    start = time.perf_counter()
    n = sum(len(idx) for idx, _ in loader)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--tiles", type=int, default=256, help="at most this many tiles per magnification")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many passes per setting")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic_slide(Path(tmp) / "bench.svs", size=args.size, label=1, n_blobs=3).path
        with Slide(path) as slide:
            grid = make_grid(slide, [20.0, 5.0], )
            levels = {"20x": (0, 256), "5x": (1, 256)}  # level 1 = downsample 4 = 5x on a 20x slide
        print("| mag | tiles | bare read_region | workers=0 | workers=1 | workers=2 |")
        print("|---|---|---|---|---|---|")
        for name, mag in (("20x", 20.0), ("5x", 5.0)):
            coords = grid.coords[name][: args.tiles]
            level, side = levels[name]
            bare_loop(path, coords, level, side)  # warm-up: page cache and first JPEG decodes for both
            bare = max(bare_loop(path, coords, level, side) for _ in range(args.repeats))
            rates = [max(loader_rate(path, coords, mag, w) for _ in range(args.repeats)) for w in (0, 1, 2)]
            print(f"| {name} | {len(coords)} | {bare:.0f} | " + " | ".join(f"{r:.0f}" for r in rates) + " |")


if __name__ == "__main__":
    main()
