"""Benchmark of the joint multi-scale sampler (``zoomfeat.generate.joint``) and the large-image decode.

1. ``time``: one joint run, wall time against the time spent inside the network calls it makes (U-Net,
   first-stage decoder and encoder, Summarizer): every call is timed by a wrapper, so the ratio is the
   sampler's own overhead (resizing, stitching, GMRES bookkeeping). Goal: total <= 1.15 x networks.
2. ``memory``: peak resident memory (``resource.getrusage`` ru_maxrss, each size in a fresh subprocess) of a
   joint run plus the streamed large-image decode, for the region of one patch at 5x (4x4 patches, 1024^2 px
   with a 256-px first stage) and at 1.25x (16x16 patches, 4096^2 px), against a baseline process that only
   loads the model and runs one batch. Goal: the 4096^2 peak <= 1.2 x the 1024^2 peak.

3. ``updates``: the joint update ``je`` (the supplement's Algorithm S2, J·e, K = 1) against ``gmres`` (zoomfeat's
   earlier Newton-Krylov step) on the fitted test model (tests/helpers_generate.py): guided denoiser evaluations,
   CPU seconds, final disagreement with the guide (rms between the decoded guide and the 2x2-block-averaged
   decoded mosaic, as the agreement test measures it) and high-frequency energy (fraction of the grey mosaic's
   spectral power above half the Nyquist frequency), mean over seeds (``--mags``: 10x and 5x guides).
4. ``decode-stride``: the Gaussian-window decode at strides of 1/4, 1/2 and 1 window (16/32/64 latent px for
   ZoomLDM's 64-px windows) of joint latents at 5x (4x4 patches; je, 20 steps): the seam statistic (mean absolute neighbour difference across
   the 20x patch borders divided by the same mean elsewhere; 1 = no seam) and the decode's CPU seconds, on the
   fitted test model and (time only; random weights) on the golden small model at its real 64-px geometry.

Run by hand (CPU):

    python benchmarks/bench_generate.py time --zoomldm $ZOOMFEAT_SHARED/golden/generation/zoomldm_small --mag 10x
    python benchmarks/bench_generate.py time --zoomldm tiny --mag 5x
    python benchmarks/bench_generate.py memory --zoomldm $ZOOMFEAT_SHARED/golden/generation/zoomldm_small
    python benchmarks/bench_generate.py updates --threads 1
    python benchmarks/bench_generate.py decode-stride --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
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
    settings = JointSettings(t_start=1000, stride=1000 // args.steps, update=args.update, krylov=args.inner,
                             batch_size=args.batch_size)
    joint_sample(model, c20, SampledGuide(cm), JointSettings(t_start=1000, stride=1000, krylov=1,
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
        settings = JointSettings(t_start=1000, stride=1000 // args.steps, update=args.update, krylov=args.inner,
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
               "--steps", str(args.steps), "--inner", str(args.inner), "--update", args.update,
               "--batch-size", str(args.batch_size),
               "--decode-stride", str(args.decode_stride), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows[f"{mode}_{mag}"] = json.loads(out)
    base = rows["baseline_5x"]["peak_rss_mib"]
    small, large = rows["joint_5x"]["peak_rss_mib"], rows["joint_1.25x"]["peak_rss_mib"]
    return {"zoomldm": args.zoomldm, "steps": args.steps, "inner_iterations": args.inner,
            "batch_size": args.batch_size, "decode_stride": args.decode_stride, "baseline_mib": round(base, 1),
            "peak_1024_mib": round(small, 1), "peak_4096_mib": round(large, 1), "ratio": round(large / small, 3),
            "above_baseline_1024_mib": round(small - base, 1), "above_baseline_4096_mib": round(large - base, 1)}


def fitted_model():
    """The fitted test model (tests/helpers_generate.py; fitted into its cache on first use)."""
    from zoomfeat.model import load_zoomldm

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers_generate import fitted_model_dir

    return load_zoomldm(fitted_model_dir(), use_ema=True).eval()


def fitted_contexts(model, mag, seed):
    """Random 20x contexts and the guide's context at ``mag`` (as the joint tests draw them)."""
    g = torch.Generator().manual_seed(seed)
    w = parse_mag(mag).grid_width
    with torch.no_grad():
        c20 = model.summarize([model.preprocess_ssl(torch.randn(model.conditioning_dim, 1, 1, generator=g))
                               for _ in range(w * w)], torch.zeros(w * w, dtype=torch.long))
        cm = model.summarize([model.preprocess_ssl(torch.randn(model.conditioning_dim, w, w, generator=g))],
                             torch.tensor([parse_mag(mag).index]))
    return c20, cm


def guide_disagreement(model, res, g) -> float:
    """rms between the decoded guide and the decoded mosaic downsampled by g x g block averaging."""
    from zoomfeat.generate.joint import mosaic_images

    mosaic = mosaic_images(model, res.latents, (g, g)).clamp(-1, 1)
    with torch.no_grad():
        guide = model.decode_first_stage(res.guide_latent).float().clamp(-1, 1)
    return float((guide - torch.nn.functional.avg_pool2d(mosaic, g)).pow(2).mean().sqrt())


def high_frequency_fraction(image: torch.Tensor) -> float:
    """Fraction of the mean-removed grey image's spectral power above half the Nyquist frequency."""
    grey = image[0].mean(0)
    power = torch.fft.fft2(grey - grey.mean()).abs().pow(2)
    fy = torch.fft.fftfreq(grey.shape[0]).abs()[:, None]
    fx = torch.fft.fftfreq(grey.shape[1]).abs()[None, :]
    return float(power[(fy.pow(2) + fx.pow(2)).sqrt() > 0.25].sum() / power.sum().clamp_min(1e-30))


# (update, steps, K or Krylov size); "none": the same loop and draws with no correction (independent patches)
UPDATE_RUNS = (("je", 50, 1), ("je", 20, 1), ("gmres", 20, 10), ("gmres", 50, 10), ("none", 50, 1))


def bench_updates(args) -> dict:
    from zoomfeat.generate.joint import mosaic_images

    model = fitted_model()
    rows = []
    for update, steps, size in UPDATE_RUNS:
        for mag in args.mags.split(","):
            g = parse_mag(mag).grid_width
            for seed in range(args.seeds):
                c20, cm = fitted_contexts(model, mag, seed)
                settings = JointSettings(t_start=1000, stride=1000 // steps, update="je" if update == "none" else
                                         update, iterations=size, krylov=size, batch_size=args.batch_size,
                                         constrain=update != "none")
                t0 = time.process_time()
                res = joint_sample(model, c20, SampledGuide(cm), settings, SeededNoise(seed))
                cpu = time.process_time() - t0
                mosaic = mosaic_images(model, res.latents, (g, g)).clamp(-1, 1)
                rows.append({"update": update, "steps": steps, "size": size, "mag": mag, "seed": seed,
                             "evaluations": res.evaluations, "cpu_s": cpu,
                             "disagreement": guide_disagreement(model, res, g),
                             "hf_fraction": high_frequency_fraction(mosaic)})
    summary = []
    for update, steps, size in UPDATE_RUNS:
        sel = [r for r in rows if (r["update"], r["steps"], r["size"]) == (update, steps, size)]
        mean = lambda k: sum(r[k] for r in sel) / len(sel)  # noqa: E731
        summary.append({"update": update, "steps": steps, ("krylov" if update == "gmres" else "K"): size,
                        **{f"evaluations_{m}": next(r["evaluations"] for r in sel if r["mag"] == m)
                           for m in args.mags.split(",")},
                        "cpu_s": round(mean("cpu_s"), 2), "disagreement": round(mean("disagreement"), 4),
                        "hf_fraction": round(mean("hf_fraction"), 4)})
    return {"model": "fitted test model (tests/helpers_generate.py)", "seeds": args.seeds, "mags": args.mags,
            "threads": torch.get_num_threads(), "summary": summary, "runs": rows}


def seam_ratio(image: torch.Tensor, patch_px: int) -> float:
    """Mean |neighbour difference| across the patch borders / the same mean elsewhere (both axes)."""
    img = image[0].float()
    dx = (img[:, :, 1:] - img[:, :, :-1]).abs().mean(dim=(0, 1))  # [W-1]: between column k and k+1
    dy = (img[:, 1:, :] - img[:, :-1, :]).abs().mean(dim=(0, 2))
    border = lambda d: torch.tensor([(k + 1) % patch_px == 0 for k in range(len(d))])  # noqa: E731
    bx, by = border(dx), border(dy)
    across = torch.cat([dx[bx], dy[by]]).mean()
    within = torch.cat([dx[~bx], dy[~by]]).mean()
    return float(across / within)


def bench_decode_stride(args) -> dict:
    from zoomfeat.generate.decode import decode_large

    rows = []
    model = fitted_model()
    window = int(model.config.diffusion.image_size)
    f = int(model.config.first_stage.downsample_factor)
    for mag in ("5x",):
        g = parse_mag(mag).grid_width
        for seed in range(args.seeds):
            c20, cm = fitted_contexts(model, mag, seed)  # a je latent at the fast 20-step schedule
            res = joint_sample(model, c20, SampledGuide(cm), JointSettings(stride=50, batch_size=args.batch_size),
                               SeededNoise(seed))
            latent = stitch(res.latents, (g, g))
            for frac in (4, 2, 1):
                stride = window // frac
                t0 = time.process_time()
                with torch.no_grad():
                    img = decode_large(model, latent, stride=stride, batch_size=args.batch_size)
                rows.append({"model": "fitted", "mag": mag, "seed": seed, "stride_fraction": f"1/{frac}",
                             "stride": stride, "cpu_s": time.process_time() - t0,
                             "seam_ratio": seam_ratio(img.clamp(-1, 1), f * window)})
    small = load(args.small)
    window = int(small.config.diffusion.image_size)
    latent = torch.randn(1, small.latent_channels, 2 * window, 2 * window, generator=torch.Generator().manual_seed(0))
    for frac in (4, 2, 1):
        t0 = time.process_time()
        with torch.no_grad():
            decode_large(small, latent, stride=window // frac, batch_size=args.batch_size)
        rows.append({"model": "golden small (random weights)", "mag": "10x", "seed": 0,
                     "stride_fraction": f"1/{frac}", "stride": window // frac, "cpu_s": time.process_time() - t0,
                     "seam_ratio": None})
    summary = []
    for model_name in ("fitted", "golden small (random weights)"):
        for frac in (4, 2, 1):
            sel = [r for r in rows if r["model"] == model_name and r["stride_fraction"] == f"1/{frac}"]
            seams = [r["seam_ratio"] for r in sel if r["seam_ratio"] is not None]
            summary.append({"model": model_name, "stride_fraction": f"1/{frac}", "stride": sel[0]["stride"],
                            "cpu_s": round(sum(r["cpu_s"] for r in sel) / len(sel), 3),
                            "seam_ratio": round(sum(seams) / len(seams), 4) if seams else None})
    return {"threads": torch.get_num_threads(), "seeds": args.seeds, "summary": summary, "runs": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("time", "memory", "updates", "decode-stride", "_memory_child"))
    p.add_argument("--zoomldm", default="tiny")
    p.add_argument("--mag", default="10x")
    p.add_argument("--mode", default="joint")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (the paper: 20)")
    p.add_argument("--inner", type=int, default=10, help="gmres: Krylov size (the notebook copy's 10)")
    p.add_argument("--update", default="je", choices=("je", "gmres"), help="time/memory: the joint update")
    p.add_argument("--seeds", type=int, default=3, help="updates/decode-stride: seeds per setting")
    p.add_argument("--mags", default="10x,5x", help="updates: magnifications of the guide (comma-separated)")
    shared = Path(os.environ.get("ZOOMFEAT_SHARED", "."))
    p.add_argument("--small", default=str(shared / "golden" / "generation" / "zoomldm_small"),
                   help="decode-stride: the golden small model (real 64-px window geometry) for timing")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--decode-stride", type=int, default=None, help="decoder window stride (default a quarter)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fn = {"time": bench_time, "memory": bench_memory, "updates": bench_updates, "decode-stride": bench_decode_stride,
          "_memory_child": one_memory_run}[args.what]
    print(json.dumps(fn(args)))


if __name__ == "__main__":
    main()
