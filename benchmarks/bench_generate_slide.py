"""Synthetic whole slides (``zoomfeat generate-slide``) and the streamed pyramid writer: seams, agreement between
levels, time per megapixel and peak memory.

Modes (each measurement in its own subprocess, peak RSS from ``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

* ``writer``: ``generate-large --format tiff``'s writer path (:func:`zoomfeat.generate.images.save_large`) for
  1024- and 4096-px images, after importing torch as the command does. The bar: peak RSS at 4096 px within
  1.2x of 1024 px.
* ``slide``: ``generate-slide`` on the fitted test model (``tests/helpers_generate.py``, 16-px patches) for
  outputs of the given sides (default 512 1024 px): a synthetic source slide of 2048 px read at a base
  magnification chosen so that it maps onto the output (``--base-mag``), tissue in a fixed part of it. Reports
  seconds per tissue megapixel, peak RSS, the seam statistic (mean |difference| of adjacent tissue pixels that
  straddle a region border, over pairs across patch borders inside regions and over pairs inside patches) and the disagreement between the 20x output
  box-downsampled 4x and the 5x level decoded (rms, 0-255 scale). The bar: peak RSS at 32k within 1.2x of 4k.
* ``state``: what a ``slide`` run of each side (default 512 1024; e.g. 2048 4096 8192 32768) holds, without the
  full sampling run (out of reach on CPU at 32k): the run's files of that size (20x embedding grid, first level's
  latent), four finest-level regions sampled, one output band decoded across the whole width, the whole pyramid
  streamed with made-up pixels. Peak RSS per stage; the bar: 32k within 1.2x of 4k.
* ``gpu``: the same ``slide`` measurement with a real ZoomLDM (``--zoomldm DIR --conditioner uni=PATH``) on
  CUDA, for a device machine.

    python benchmarks/bench_generate_slide.py writer
    python benchmarks/bench_generate_slide.py slide --sides 2048 8192
    python benchmarks/bench_generate_slide.py state --sides 2048 4096 8192 32768
    python benchmarks/bench_generate_slide.py gpu --zoomldm weights/zoomldm --conditioner uni=weights/uni --sides 4096
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


WRITER = r"""
import json, resource, sys, tempfile, time
import numpy as np, torch  # noqa: F401  (the command imports torch)
from zoomfeat.generate.images import save_large
side = int(sys.argv[1])
img = np.empty((side, side, 3), np.uint8)  # built in place: no int64 temporaries of the whole image
x = np.arange(side, dtype=np.int64)
for row in range(side):
    img[row, :, 0] = (x // 7) % 256
    img[row, :, 1] = (row // 5) % 256
    img[row, :, 2] = ((x + row) // 3) % 256
t = time.perf_counter()
with tempfile.TemporaryDirectory() as d:
    save_large(f"{d}/large", img, fmt="tiff")
print(json.dumps({"side": side, "seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

SLIDE = r"""
import json, os, resource, sys, time
import numpy as np, tifffile, torch
torch.set_num_threads(1)
import cli
side, model, conditioner, device, work = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
extra = json.loads(sys.argv[6])
real = os.path.join(work, "real.svs")
base_mag = 20.0 * 2048 / (side * 256 / extra["patch_px"])  # the 2048-px source maps onto a side-px output
out = os.path.join(work, f"syn_{side}.tiff")
t = time.perf_counter()
code = cli.main(["generate-slide", "--slide", real, "--base-mag", f"{base_mag:.10g}", "--zoomldm", model,
                 "--conditioner", conditioner, "--out", out, "--device", device, "--keep-parts", *extra["args"]])
seconds = time.perf_counter() - t
assert code == 0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
from zoomfeat.slides import Slide
from zoomfeat.tissue import tissue_mask
with Slide(real, base_mag=base_mag) as s:
    mask = tissue_mask(s).mask  # the mask generate-slide used, resampled to the output below
record = json.loads(tifffile.TiffFile(out).pages[0].description)
stats = {"side": side, "seconds": seconds, "peak_rss_mb": rss, "tissue_fraction": float(mask.mean())}
stats["tissue_mpx"] = stats["tissue_fraction"] * side * side / 1e6
stats["s_per_tissue_mpx"] = seconds / stats["tissue_mpx"]
if side <= 8192:  # the pixel statistics read the whole level 0
    img = tifffile.imread(out, key=0).astype(np.float32)
    ys = ((np.arange(side) + 0.5) * mask.shape[0] / side).astype(int)
    xs = ((np.arange(side) + 0.5) * mask.shape[1] / side).astype(int)
    m = mask[ys][:, xs]
    region = extra["region_px"]
    groups = {"region": [], "patch": [], "texture": []}
    idx = np.arange(1, side)
    for axis in (0, 1):
        d = np.abs(np.diff(img, axis=axis)).mean(2)
        both = (m[1:] & m[:-1]) if axis == 0 else (m[:, 1:] & m[:, :-1])
        shape = (-1, 1) if axis == 0 else (1, -1)
        rb, pb = idx % region == 0, idx % extra["patch_px"] == 0
        groups["region"].append(d[both & rb.reshape(shape)])
        groups["patch"].append(d[both & (pb & ~rb).reshape(shape)])
        groups["texture"].append(d[both & ~pb.reshape(shape)])
    g = {k: float(np.concatenate(v).mean()) for k, v in groups.items()}
    stats.update(seam_region=g["region"], seam_patch_in_region=g["patch"], texture=g["texture"],
                 seam_ratio_region_to_patch=g["region"] / g["patch"], seam_ratio_region_to_texture=g["region"] / g["texture"])
    from zoomfeat.generate.decode import decode_large
    from zoomfeat.model import load_zoomldm
    mdl = load_zoomldm(model, use_ema=True).eval()
    coarse = np.load(out + ".parts/L0_r00000_c00000.npy")
    with torch.no_grad():
        c_img = decode_large(mdl, torch.from_numpy(coarse)[None])[0].permute(1, 2, 0).numpy()
    c_img = np.clip((c_img + 1) * 127.5, 0, 255)
    z = extra["zoom"]
    h, w = c_img.shape[:2]
    down = img[:h * z, :w * z].reshape(h, z, w, z, 3).mean((1, 3))
    cm = m[::z, ::z][:h, :w]
    stats["level_disagreement_rms"] = float(np.sqrt(((down - c_img) ** 2)[cm].mean()))
print(json.dumps(stats))
"""


STATE = r"""
import json, resource, sys, tempfile, time
import numpy as np, torch
torch.set_num_threads(1)
from pathlib import Path
from zoomfeat.generate.pyramid import PyramidSettings, write_pyramid_streamed
from zoomfeat.generate.slide import Cascade, Parts, SlideGenConfig, Source, build_levels, save_bands, unit_name
from zoomfeat.model import load_zoomldm
from zoomfeat.runtime import resolve_runtime
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
side, model_dir, extra = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
work = Path(tempfile.mkdtemp(dir=sys.argv[4]))
model = load_zoomldm(model_dir, use_ema=True).eval()
r, lat, ch = int(model.first_stage_resolution), int(model.config.diffusion.image_size), int(model.latent_channels)
d = int(model.conditioning_dim)
cfg = SlideGenConfig(zoomldm=None, conditions=None, out=work / "x.tiff", levels=("5x", "20x"), **extra["cfg"])
g0 = cfg.levels[0].grid_width
rows0 = cols0 = side // (g0 * r)
rows20 = rows0 * g0
rng = np.random.default_rng(0)
stages = {"model": peak()}
# the files of a run at this size, written as the tool writes them (band by band: the bench holds neither):
# the 20x embedding grid (random: its size is what counts) and the finished first level's latent
save_bands(work / "grid.npy", (d, rows20, rows20),
           ((y, rng.standard_normal((d, min(64, rows20 - y), rows20), dtype=np.float32)) for y in range(0, rows20, 64)))
extent = float(rows20 * 256)
source = Source(work / "grid.npy", np.ones((1, 1), bool), (extent, extent), (0, 0), 256.0, 0.5, (255, 255, 255), {})
levels = build_levels(cfg.levels, rows0, cols0)
parts = Parts(work / "parts", {"bench": side})
n0 = rows0 * lat
save_bands(parts.path(unit_name(0, 0, 0)), (ch, n0, n0),
           ((y, rng.standard_normal((ch, min(256, n0 - y), n0), dtype=np.float32)) for y in range(0, n0, 256)))
stages["files"] = peak()
cascade = Cascade(model, cfg, source, levels, parts, resolve_runtime("cpu", "fp32"))
t = time.perf_counter()
for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):  # four regions of the finest level: (1, 1) reads three neighbours
    cascade.region(levels[1], i, j)
region_s = (time.perf_counter() - t) / 4
stages["regions"] = peak()
band, (h, w) = cascade.band_source()
t = time.perf_counter()
first = band(0, cfg.tile)  # one output band decoded across the whole width (unsampled regions decode as zeros)
band_s = time.perf_counter() - t
stages["decoded_band"] = peak()
x = np.arange(w, dtype=np.int64)
def pixels(y0, y1):  # the writer's input: cheap pixels of the right size for every band (no decoder)
    out = np.empty((y1 - y0, w, 3), np.uint8)
    for k, row in enumerate(range(y0, y1)):
        out[k, :, 0] = (x // 7 + row) % 256
        out[k, :, 1] = (row // 5) % 256
        out[k, :, 2] = ((x + row) // 3) % 256
    return out
t = time.perf_counter()
write_pyramid_streamed(work / "x.tiff", h, w, pixels, mpp=0.5, magnification=20.0,
                       settings=PyramidSettings(cfg.tile, "jpeg", 90))
write_s = time.perf_counter() - t
stages["pyramid"] = peak()
print(json.dumps({"side": side, "peak_rss_mb": peak(), "peak_after_mb": stages,
                  "grid_mb": 4 * d * rows20 ** 2 / 2**20, "first_level_latent_mb": 4 * ch * n0 ** 2 / 2**20,
                  "region_s": region_s, "band_s": band_s, "write_s": write_s,
                  "tiff_mb": (work / "x.tiff").stat().st_size / 2**20}))
import shutil; shutil.rmtree(work)
"""


def _source(work: Path) -> None:
    from zoomfeat.synthetic import write_synthetic_slide

    write_synthetic_slide(work / "real.svs", size=2048, seed=1)


def run_writer() -> list[dict]:
    rows = [_child(WRITER, str(side)) for side in (1024, 4096)]
    rows[1]["ratio_to_1024"] = rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    return rows


def run_slide(sides, model: str, conditioner: str, device: str, args: list[str], patch_px: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        _source(Path(d))
        extra = {"args": args, "patch_px": patch_px, "region_px": 4 * patch_px, "zoom": 4}
        for side in sides:
            rows.append(_child(SLIDE, str(side), model, conditioner, device, d, json.dumps(extra)))
            rows[-1]["args"] = " ".join(args)
            print(json.dumps(rows[-1]), flush=True)
    return rows


def run_state(sides, model: str, steps: int) -> list[dict]:
    """Per size: the files of a run of that size (20x embedding grid, first level's latent: random, written band
    by band as the tool writes them), four finest-level regions sampled from them, one output band decoded across
    the whole width and the whole pyramid written (pixels made up); not a full sampling run."""
    cfg = {"steps": steps, "refine_t0": 300, "refine_stride": 300, "window_stride": 4, "decode_stride": 4,
           "batch_size": 32}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for side in sides:
            rows.append(_child(STATE, str(side), model, json.dumps({"cfg": cfg}), d))
            print(json.dumps(rows[-1]), flush=True)
    base = {row["side"]: row["peak_rss_mb"] for row in rows}.get(4096)
    for row in rows:
        if base:
            row["ratio_to_4096"] = row["peak_rss_mb"] / base
    return rows


def tiny_args(steps: int) -> list[str]:
    """The tiny model's settings: ``steps`` from t = 1000, the refinement pass from t0 300 in one step."""
    return ["--levels", "5x,20x", "--steps", str(steps), "--refine-t0", "300", "--refine-stride", "300",
            "--window-stride", "4", "--decode-stride", "4", "--batch-size", "32", "--compression", "deflate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("writer", "slide", "state", "gpu"))
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--steps", type=int, default=1, help="sampling steps (slide, state; default 1, the fewest)")
    parser.add_argument("--zoomldm", default=None, help="gpu: the ZoomLDM folder")
    parser.add_argument("--conditioner", default="toy")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    t = time.time()
    if args.mode == "writer":
        rows = run_writer()
    elif args.mode == "slide":
        sys.path.insert(0, str(ROOT / "tests"))
        from helpers_generate import fitted_model_dir

        rows = run_slide(args.sides, str(fitted_model_dir()), "toy", "cpu", tiny_args(args.steps), 16)
    elif args.mode == "state":
        sys.path.insert(0, str(ROOT / "tests"))
        from helpers_generate import fitted_model_dir

        rows = run_state(args.sides, str(fitted_model_dir()), args.steps)
    else:
        if not args.zoomldm:
            raise SystemExit("gpu mode needs --zoomldm DIR and --conditioner uni=PATH")
        rows = run_slide(args.sides, args.zoomldm, args.conditioner, "cuda", ["--batch-size", "32"], 256)  # defaults
    for row in rows:
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"total {time.time() - t:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
