"""Benchmark: condition inversion and super-resolution time per input patch, against the bare network calls.

Inversion: :func:`zoomfeat.generate.invert.invert_latent` (``--iterations`` Adam steps, plus its fixed probe of
8 timesteps every 20 iterations) vs a bare loop of the same U-Net forward + backward through the Summarizer with
a grid that requires grad (the network work the method cannot avoid). Reported per iteration and projected to
the paper's 200 iterations.

Super-resolution: :func:`zoomfeat.generate.superres.superres` of one input patch at ``--mag`` (row ``uncond``,
so the time is the joint sampler + decode + projection; add the inversion time for the ``inverted`` row), with
``--steps`` joint steps and ``--inner`` GMRES iterations, vs the bare network calls it makes (U-Net, first-stage
encoder and decoder, recorded by wrapping them) replayed alone on random inputs of the same shapes.

    python benchmarks/bench_invert.py --zoomldm $ZOOMFEAT_SHARED/golden/zoomldm_tiny --threads 2
    python benchmarks/bench_invert.py --zoomldm $ZOOMFEAT_SHARED/golden/generation/zoomldm_small --iterations 20 --skip-sr
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from zoomfeat.generate import invert as inv
from zoomfeat.generate.joint import JointSettings
from zoomfeat.generate.superres import SuperResSettings, superres
from zoomfeat.mags import parse_mag
from zoomfeat.model import load_zoomldm


def bench_inversion(m, mag, iterations: int) -> dict:
    side = m.config.diffusion.image_size
    z = torch.randn(1, m.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    settings = inv.InversionSettings(iterations=iterations)
    inv.invert_latent(m, z, mag, inv.InversionSettings(iterations=2, probe_timesteps=1))  # warm-up
    start = time.perf_counter()
    inv.invert_latent(m, z, mag, settings)
    method = time.perf_counter() - start

    grid = inv.initial_grid(m, mag, 0).requires_grad_(True)
    ts = inv.inversion_timesteps(m.num_timesteps, settings)
    with inv.frozen(m), torch.enable_grad():
        start = time.perf_counter()
        for t in ts:
            tt = torch.tensor([int(t)])
            ctx = m.summarize([m.preprocess_ssl(grid)], torch.tensor([mag.index]))
            eps = m.unet(m.q_sample(z, tt, torch.randn_like(z)), tt, ctx)
            eps.square().mean().backward()
        bare = time.perf_counter() - start
    return {"iterations": iterations, "method_s": method, "bare_s": bare, "per_iter_s": method / iterations,
            "projected_200_s": method / iterations * 200, "ratio": method / bare}


def bench_superres(m, mag, steps: int, inner: int) -> dict:
    r = m.first_stage_resolution
    image = np.random.default_rng(0).integers(0, 256, (r, r, 3), dtype=np.uint8)
    settings = SuperResSettings(row="uncond", joint=JointSettings(stride=1000 // steps, inner_iterations=inner))
    calls: list[tuple] = []
    nets = {"unet": m.unet, "encode_first_stage": m.encode_first_stage, "decode_first_stage": m.decode_first_stage}

    def counting(name):
        def call(*args):
            calls.append((name, [tuple(a.shape) for a in args]))
            return nets[name](*args)
        return call

    for name in nets:
        setattr(m, name, counting(name))
    try:
        start = time.perf_counter()
        superres(m, image, mag, settings)
        method = time.perf_counter() - start
    finally:
        for name in nets:
            delattr(m, name)
    start = time.perf_counter()
    with torch.no_grad():  # the same network calls on random inputs of the same shapes
        for name, shapes in calls:
            if name == "unet":
                nets[name](torch.randn(shapes[0]), torch.full((shapes[0][0],), 500.0), torch.randn(shapes[2]))
            else:
                nets[name](torch.randn(shapes[0]))
    bare = time.perf_counter() - start
    counts = {n: sum(1 for c, _ in calls if c == n) for n in nets}
    return {"steps": steps, "inner": inner, "calls": counts, "method_s": method, "bare_s": bare,
            "ratio": method / bare}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--zoomldm", required=True)
    p.add_argument("--mag", default="5x")
    p.add_argument("--sr-mag", default="10x")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--inner", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-sr", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    m = load_zoomldm(a.zoomldm)
    print(f"machine: {platform.processor() or platform.machine()}, {a.threads} threads, torch {torch.__version__}")
    print(f"model: {a.zoomldm} ({m.first_stage_resolution}-px patches, latent {m.config.diffusion.image_size})")
    r = bench_inversion(m, parse_mag(a.mag), a.iterations)
    print(f"inversion at {a.mag}: {r['iterations']} it in {r['method_s']:.2f} s ({r['per_iter_s'] * 1e3:.1f} ms/it, "
          f"200 it ~ {r['projected_200_s']:.1f} s); bare fwd+bwd loop {r['bare_s']:.2f} s; ratio {r['ratio']:.2f}")
    if not a.skip_sr:
        s = bench_superres(m, parse_mag(a.sr_mag), a.steps, a.inner)
        print(f"superres uncond {a.sr_mag}, one input patch: {s['method_s']:.2f} s ({s['steps']} steps, "
              f"{s['inner']} GMRES it, network calls {s['calls']}); the same calls alone {s['bare_s']:.2f} s; "
              f"ratio {s['ratio']:.2f}")


if __name__ == "__main__":
    main()
