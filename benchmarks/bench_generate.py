"""Benchmark of the joint multi-scale sampler (``zoomfeat.generate.joint``).

1. ``time``: one joint run, wall time against the time spent inside the network calls it makes (U-Net,
   first-stage decoder and encoder, Summarizer): every call is timed by a wrapper, so the ratio is the
   sampler's own overhead (resizing, stitching, GMRES bookkeeping). Goal: total <= 1.15 x networks.
2. ``memory``: peak resident memory (``resource.getrusage`` ru_maxrss, each size in a fresh subprocess) of a
   joint run plus the streamed large-image decode, for the region of one patch at 5x (4x4 patches, 1024^2 px
   with a 256-px first stage) and at 1.25x (16x16 patches, 4096^2 px), against a baseline process that only
   loads the model and runs one batch. Goal: the 4096^2 peak <= 1.2 x the 1024^2 peak.

Run by hand (CPU):

    python benchmarks/bench_generate.py time --zoomldm $ZOOMFEAT_SHARED/golden/generation/zoomldm_small --mag 10x
    python benchmarks/bench_generate.py time --zoomldm tiny --mag 5x
    python benchmarks/bench_generate.py memory --zoomldm $ZOOMFEAT_SHARED/golden/generation/zoomldm_small
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoomfeat.generate.joint import JointSettings, SampledGuide, joint_sample, stitch  # noqa: E402
from zoomfeat.generate.windows import SeededNoise  # noqa: E402
from zoomfeat.mags import parse_mag  # noqa: E402
from zoomfeat.resolve import resolve_zoomldm  # noqa: E402


def load(zoomldm: str):
    from zoomfeat.model import load_zoomldm

    src = resolve_zoomldm(zoomldm, require_weights=False)
    torch.manual_seed(0)
    return load_zoomldm(src.config, src.weights, use_ema=True).eval()


def contexts(model, mag):
    g = torch.Generator().manual_seed(0)
    n = parse_mag(mag).grid_width ** 2
    with torch.no_grad():
        c20 = model.summarize([model.preprocess_ssl(torch.randn(model.conditioning_dim, 1, 1, generator=g))
                               for _ in range(n)], torch.zeros(n, dtype=torch.long))
        w = parse_mag(mag).grid_width
        cm = model.summarize([model.preprocess_ssl(torch.randn(model.conditioning_dim, w, w, generator=g))],
                             torch.tensor([parse_mag(mag).index]))
    return c20, cm


class Timed:
    """Wraps model methods, accumulating their wall time and call counts."""

    NAMES = ("unet", "decode_first_stage", "encode_first_stage", "summarize")

    def __init__(self, model):
        self.model, self.seconds, self.calls = model, defaultdict(float), defaultdict(int)
        for name in self.NAMES:
            setattr(model, name, self._wrap(name, getattr(model, name)))

    def _wrap(self, name, fn):
        def timed(*args, **kw):
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            self.seconds[name] += time.perf_counter() - t0
            self.calls[name] += 1
            return out
        return timed


def bench_time(args) -> dict:
    model = load(args.zoomldm)
    c20, cm = contexts(model, args.mag)
    settings = JointSettings(t_start=1000, stride=1000 // args.steps, inner_iterations=args.inner,
                             batch_size=args.batch_size)
    joint_sample(model, c20, SampledGuide(cm), JointSettings(t_start=1000, stride=1000, inner_iterations=1,
                                                             batch_size=args.batch_size), SeededNoise(0))  # warm-up
    timer = Timed(model)
    t0 = time.perf_counter()
    joint_sample(model, c20, SampledGuide(cm), settings, SeededNoise(0))
    total = time.perf_counter() - t0
    net = sum(timer.seconds.values())
    return {"zoomldm": args.zoomldm, "mag": args.mag, "patches": len(c20), "steps": args.steps,
            "inner_iterations": args.inner, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
            "total_s": round(total, 2), "network_s": round(net, 2), "ratio": round(total / net, 3),
            "calls": dict(timer.calls), "seconds": {k: round(v, 2) for k, v in timer.seconds.items()}}


def one_memory_run(args) -> dict:
    """In this process: load, then (mode ``baseline``) one batch, or a joint run + streamed decode."""
    from zoomfeat.generate.decode import decode_large_uint8

    model = load(args.zoomldm)
    c20, cm = contexts(model, args.mag)
    if args.mode == "baseline":
        side = model.config.diffusion.image_size
        x = torch.randn(args.batch_size, model.latent_channels, side, side)
        with torch.no_grad():
            model.unet(torch.cat([x, x]), torch.full((2 * args.batch_size,), 5), c20[:1].expand(2 * args.batch_size, -1, -1))
            model.decode_first_stage(x)
    else:
        settings = JointSettings(t_start=1000, stride=1000 // args.steps, inner_iterations=args.inner,
                                 batch_size=args.batch_size)
        res = joint_sample(model, c20, SampledGuide(cm), settings, SeededNoise(0))
        g = parse_mag(args.mag).grid_width
        img = decode_large_uint8(model, stitch(res.latents, (g, g)), stride=args.decode_stride,
                                 batch_size=args.batch_size)
        assert img.shape[1] == g * model.first_stage_resolution
    return {"mode": args.mode, "mag": args.mag, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_memory(args) -> dict:
    rows = {}
    for mode, mag in (("baseline", "5x"), ("joint", "5x"), ("joint", "1.25x")):
        cmd = [sys.executable, __file__, "_memory_child", "--zoomldm", args.zoomldm, "--mag", mag, "--mode", mode,
               "--steps", str(args.steps), "--inner", str(args.inner), "--batch-size", str(args.batch_size),
               "--decode-stride", str(args.decode_stride), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows[f"{mode}_{mag}"] = json.loads(out)
    base = rows["baseline_5x"]["peak_rss_mib"]
    small, large = rows["joint_5x"]["peak_rss_mib"], rows["joint_1.25x"]["peak_rss_mib"]
    return {"zoomldm": args.zoomldm, "steps": args.steps, "inner_iterations": args.inner,
            "batch_size": args.batch_size, "decode_stride": args.decode_stride, "baseline_mib": round(base, 1),
            "peak_1024_mib": round(small, 1), "peak_4096_mib": round(large, 1), "ratio": round(large / small, 3),
            "above_baseline_1024_mib": round(small - base, 1), "above_baseline_4096_mib": round(large - base, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("time", "memory", "_memory_child"))
    p.add_argument("--zoomldm", default="tiny")
    p.add_argument("--mag", default="10x")
    p.add_argument("--mode", default="joint")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (the paper: 20)")
    p.add_argument("--inner", type=int, default=10, help="GMRES iterations (the paper's setting: 10)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--decode-stride", type=int, default=None, help="decoder window stride (default a quarter)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fn = {"time": bench_time, "memory": bench_memory, "_memory_child": one_memory_run}[args.what]
    print(json.dumps(fn(args)))


if __name__ == "__main__":
    main()
