"""``zoomfeat gen-metrics``: FID variants, SSIM/PSNR/LPIPS, embedding similarity, nearest-neighbour distances."""

from __future__ import annotations

import argparse

HELP = "generation metrics between a folder of real and a folder of generated images (FID, SSIM, PSNR, LPIPS, ...)"
# the registry's names (zoomfeat.generate.metrics.metric_names(); kept torch-free here, checked by a test)
METRIC_NAMES = ("fid", "crop-fid", "downsampled-fid", "nn-distance", "ssim", "psnr", "lpips", "embedding")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--real", required=True, metavar="DIR", help="folder of real (reference / ground-truth) "
                      "PNG/JPEG/TIFF images; paired metrics match files by name")
    data.add_argument("--fake", required=True, metavar="DIR", help="folder of generated images")
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--metric", required=True, metavar="NAME[,NAME]", action="append",
                         help=f"metrics, comma-separated or repeated: {', '.join(METRIC_NAMES)}")
    metrics.add_argument("--crop-size", type=int, default=256, help="crop side in px for crop-fid (default 256)")
    metrics.add_argument("--downsample-size", type=int, default=256,
                         help="side in px the images are downsampled to for downsampled-fid (default 256)")
    features = parser.add_argument_group("features")
    features.add_argument("--weights", metavar="FILE", help="local Inception-v3 state_dict for fid/crop-fid/"
                          "downsampled-fid/nn-distance/embedding (pytorch-fid's pt_inception-2015-12-05-6726825d.pth"
                          "; never downloaded)")
    from zoomfeat.encoders.specs import encoder_names  # torch-free registry names

    features.add_argument("--encoder", metavar="NAME", help=f"a registered encoder ({', '.join(encoder_names())}) "
                          "instead of Inception: a domain FID / embedding similarity")
    features.add_argument("--encoder-weights", metavar="PATH", help="the encoder's local weight file or folder")
    features.add_argument("--encoder-dim", type=int, help="output width of the toy encoder (default 64)")
    features.add_argument("--lpips-backbone", metavar="FILE", help="local torchvision AlexNet (or VGG16 with "
                          "--lpips-net vgg) state_dict for lpips")
    features.add_argument("--lpips-linear", metavar="FILE", help="LPIPS v0.1 linear weights (default: the copy "
                          "bundled with torchmetrics)")
    features.add_argument("--lpips-net", default="alex", choices=("alex", "vgg"), help="LPIPS backbone (default alex)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", metavar="FILE", help="result file, .json (config, values, per-item values) or "
                        ".csv (metric,item,value,n); default: print only")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--batch-size", type=int, default=16, help="images per network batch (default 16)")
    runtime.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                         help="where the feature networks run (default auto = cuda when visible)")


def build_config(args: argparse.Namespace):
    from pathlib import Path

    from zoomfeat.runtime import resolve_runtime
    from zoomfeat.generate.metrics import GenMetricsConfig

    names = tuple(n.strip().lower() for value in args.metric for n in value.split(",") if n.strip())
    path = lambda v: Path(v) if v else None  # noqa: E731
    return GenMetricsConfig(
        real=Path(args.real), fake=Path(args.fake), metrics=names, out=path(args.out), weights=path(args.weights),
        encoder=args.encoder.strip().lower() if args.encoder else None, encoder_weights=path(args.encoder_weights),
        encoder_dim=args.encoder_dim, lpips_backbone=path(args.lpips_backbone), lpips_linear=path(args.lpips_linear),
        lpips_net=args.lpips_net, crop_size=args.crop_size, downsample_size=args.downsample_size,
        batch_size=args.batch_size, device=resolve_runtime(args.device, "fp32").device)


def run(args: argparse.Namespace) -> int:
    from zoomfeat.generate.metrics import compute_metrics, write_results

    config = build_config(args)
    results = compute_metrics(config)
    for r in results:
        print(f"{r.metric}\t{r.value:.6g}\t(n={r.n})")
    if config.out is not None:
        write_results(results, config.out, config)
        print(f"gen-metrics: results written to {config.out}")
    return 0
