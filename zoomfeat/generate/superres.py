"""Super-resolution of a plain image at magnification M to 20x (ZoomLDM §4.4): invert, then joint sampling with
the given image as the FIXED measurement, then (optionally) the refinement pass.

For an image of ``kh x kw`` patches at M (each the first stage's resolution R: 256 px for the released model,
64 for the tiny test models), every patch is handled on its own:

1. its conditions: ``inverted`` -- :func:`zoomfeat.generate.invert.invert_latent` on the patch's latent gives a
   raw ``g x g`` grid (g = ``M.grid_width``) in the conditioner's space; ``gt`` -- the real 20x embeddings under
   the patch (a slide is needed; the paper's "GT emb" row); ``uncond`` -- the all-zero context (its "Uncond" row);
2. the grid is split into its g*g 20x conditions (each cell standardised and summarised at 20x, exactly the
   condition the official helpers give a window at that cell's corner);
3. :func:`zoomfeat.generate.joint.joint_sample` with :class:`~zoomfeat.generate.joint.FixedGuide` = the patch
   image: the g*g 20x latents are pulled towards agreeing with the measurement at every step.

The patches' latents are stitched into one large latent, optionally refined by the official refinement pass
(windows over the whole latent, conditioned on the whole 20x grid: this also blends the borders between input
patches), and decoded by the overlapping Gaussian-window decoder (which blends across patch borders too).
The ``bicubic`` row is the antialiased bicubic :class:`~zoomfeat.generate.resize.Resizer` upscaling by g.

Measurement consistency. ``consistency="project"`` (default) ends with the exact projection of the decoded
image onto the images whose Resizer downsampling equals the input, ``x + P_H (y - M_H x M_W^T) P_W^T`` with
``P = M^+`` (pseudo-inverse of the 1-D operators), alternated with clamping to [-1, 1] (``project_iterations``
times). ``consistency="none"`` returns the sampler's own output, as the paper's procedure does. Both the
sampler's own agreement (``psnr_sampler``) and the final one (``psnr_final``, on the uint8 output) are reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from zoomfeat.errors import ConfigError, DataError
from zoomfeat.generate.decode import decode_large, to_uint8
from zoomfeat.generate.interpolate import window_contexts
from zoomfeat.generate.invert import InversionSettings, invert_latent
from zoomfeat.generate.joint import FixedGuide, JointSettings, joint_sample, stitch
from zoomfeat.generate.resize import Resizer
from zoomfeat.generate.windows import SeededNoise, WindowSettings, refine
from zoomfeat.mags import Magnification

ROWS = ("inverted", "gt", "uncond", "bicubic")  # the super-resolution table's rows
CONSISTENCY = ("project", "none")


@dataclass(frozen=True)
class SuperResSettings:
    """One row's settings. ``refinement``: None = no refinement pass, else its window settings (t_start, stride)."""

    row: str = "inverted"
    joint: JointSettings = field(default_factory=JointSettings)
    inversion: InversionSettings = field(default_factory=InversionSettings)
    refinement: WindowSettings | None = None
    consistency: str = "project"
    project_iterations: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.row not in ROWS:
            raise ConfigError(f"unknown super-resolution row {self.row!r}: use one of {', '.join(ROWS)}")
        if self.consistency not in CONSISTENCY:
            raise ConfigError(f"unknown --consistency {self.consistency!r}: use one of {', '.join(CONSISTENCY)}")
        if self.project_iterations < 1:
            raise ConfigError(f"projection iterations must be >= 1, got {self.project_iterations}")
        if self.row == "uncond" and self.refinement is not None:
            raise ConfigError("the refinement pass conditions every window on a 20x grid: the uncond row has none "
                              "(drop --refine for it)")


@dataclass
class SuperResResult:
    """uint8 [H*g, W*g, 3] output, the 20x grid used ([C, kh*g, kw*g] raw, None for uncond/bicubic), the
    sampler's and the final measurement agreement (PSNR in dB of the Resizer-downsampled output against the
    input), per-patch joint disagreement histories and inversion probe curves."""

    image: np.ndarray
    row: str
    grid: torch.Tensor | None
    psnr_sampler: float
    psnr_final: float
    disagreement: list[list[float]] = field(default_factory=list)
    inversion_probe: list[list[tuple[int, float]]] = field(default_factory=list)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] on the [0, 1] scale (torchmetrics, data_range 1)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(((a.double() + 1) / 2).clamp(0, 1), ((b.double() + 1) / 2).clamp(0, 1),
                                         data_range=1.0))


def downsampler(out_hw: tuple[int, int], factor: int) -> Resizer:
    """The measurement operator: the antialiased bicubic Resizer from the 20x size down by ``factor``."""
    return Resizer(out_hw, 1.0 / factor, output_shape=(out_hw[0] // factor, out_hw[1] // factor))


def project_consistent(image: torch.Tensor, measurement: torch.Tensor, factor: int, iterations: int = 10) -> torch.Tensor:
    """Alternate the exact projection onto {x : down(x) = measurement} with clamping to [-1, 1]."""
    down = downsampler(tuple(image.shape[-2:]), factor)
    p_h = torch.linalg.pinv(down.m_h.double()).float()
    p_w = torch.linalg.pinv(down.m_w.double()).float()
    x = image.float().clamp(-1, 1)
    y = measurement.float().to(x.device)
    for _ in range(iterations):
        x = (x + p_h.to(x.device) @ (y - down(x)) @ p_w.to(x.device).T).clamp(-1, 1)
    return x


def bicubic_upscale(image: torch.Tensor, factor: int) -> torch.Tensor:
    """The bicubic baseline row: Resizer upscaling by ``factor`` (upscaling never antialiases)."""
    h, w = image.shape[-2:]
    return Resizer((h, w), float(factor), output_shape=(h * factor, w * factor))(image.float())


def check_input(image: np.ndarray, mag: Magnification, patch_px: int, what: str = "input image") -> tuple[int, int]:
    """(kh, kw) patches of ``patch_px`` at M in a uint8 RGB image; DataError naming the fix otherwise."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"{what}: expected uint8 RGB [H, W, 3], got {image.dtype} {list(image.shape)}")
    if mag.grid_width < 2:
        raise ConfigError("super-resolution goes from M to 20x: --mag must be coarser than 20x (10x, 5x, ...)")
    h, w = image.shape[:2]
    if h % patch_px or w % patch_px or h == 0 or w == 0:
        raise DataError(f"{what} is {w}x{h} px: its sides must be multiples of {patch_px} px (one patch at "
                        f"{mag} for this model); crop or pad it")
    return h // patch_px, w // patch_px


def _cell_contexts(model, grid: torch.Tensor) -> torch.Tensor:
    """20x contexts [g*g, 65, D] of one patch's raw grid [C, g, g], row-major: each cell at its own corner."""
    side = int(model.config.diffusion.image_size)
    g_h, g_w = grid.shape[-2:]
    positions = np.array([(i * side, j * side) for i in range(g_h) for j in range(g_w)], dtype=np.int64)
    with torch.no_grad():
        return window_contexts(model, grid, positions, side)


def superres(model, image: np.ndarray, mag: Magnification, settings: SuperResSettings = SuperResSettings(), *,
             gt_grid: torch.Tensor | None = None, progress: Callable[[str, int], None] | None = None,
             autocast: Callable | None = None) -> SuperResResult:
    """Super-resolve a uint8 RGB image at ``mag`` (sides multiples of the model's patch size) to 20x.

    ``gt_grid``: raw 20x embeddings [C, kh*g, kw*g] under the image (row ``gt`` only). ``progress(stage, n)``.
    ``autocast``: context factory around the inversion's U-Net passes (the joint sampler always runs fp32: its
    finite differences would drown in bf16 rounding).
    """
    patch = int(model.first_stage_resolution)
    kh, kw = check_input(image, mag, patch)
    g = mag.grid_width
    device = model.alphas_cumprod.device
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float().to(device) / 127.5 - 1.0
    if settings.row == "gt":
        if gt_grid is None or tuple(gt_grid.shape[-2:]) != (kh * g, kw * g):
            got = "none" if gt_grid is None else list(gt_grid.shape)
            raise DataError(f"the gt row needs the 20x embedding grid under the image, [C, {kh * g}, {kw * g}], "
                            f"got {got}: pass --slide with --x/--y")
    if settings.row == "bicubic":
        out = bicubic_upscale(x, g)
        return _finish(out, x, g, settings, "bicubic", None, [], [])
    side = int(model.config.diffusion.image_size)
    latent = torch.zeros(1, int(model.latent_channels), kh * g * side, kw * g * side)
    full_grid = None if settings.row == "uncond" else torch.zeros(model.conditioning_dim, kh * g, kw * g)
    histories, probes = [], []
    for i in range(kh):
        for j in range(kw):
            k = i * kw + j
            tile = x[..., i * patch:(i + 1) * patch, j * patch:(j + 1) * patch]
            contexts, grid, probe = _tile_conditions(model, tile, mag, settings, gt_grid, i, j, k, progress,
                                                     autocast)
            if grid is not None:
                full_grid[:, i * g:(i + 1) * g, j * g:(j + 1) * g] = grid
                probes.append(probe)
            res = joint_sample(model, contexts, FixedGuide(image=tile), settings.joint,
                               SeededNoise(settings.seed * 1_000_003 + k, device), grid_hw=(g, g),
                               tick=(lambda n: progress("joint", n)) if progress else None)
            histories.append(res.disagreement)
            latent[..., i * g * side:(i + 1) * g * side, j * g * side:(j + 1) * g * side] = stitch(res.latents, (g, g))
    latent = latent.to(device)
    if settings.refinement is not None:
        noise = SeededNoise(settings.seed * 1_000_003 + 999_983, device)
        with torch.no_grad():
            latent = refine(model, latent, full_grid, settings.refinement, noise)
    with torch.no_grad():
        out = decode_large(model, latent).to(device)
    return _finish(out, x, g, settings, settings.row, full_grid, histories, probes)


def _tile_conditions(model, tile, mag, settings, gt_grid, i, j, k, progress, autocast=None):
    """(20x contexts [g*g, 65, D], raw grid [C, g, g] or None, inversion probe curve) of one input patch."""
    g = mag.grid_width
    if settings.row == "uncond":
        tokens = model.cond_stage_model.cfg.seq_length + 1
        return torch.zeros(g * g, tokens, model.context_dim, device=tile.device), None, []
    if settings.row == "gt":
        grid = gt_grid[:, i * g:(i + 1) * g, j * g:(j + 1) * g].float()
        return _cell_contexts(model, grid), grid, []
    with torch.no_grad():
        z = model.encode_first_stage(tile).float()
    inv_settings = replace(settings.inversion, seed=settings.inversion.seed + k)  # one seed per input patch
    result = invert_latent(model, z, mag, inv_settings, autocast=autocast,
                           progress=(lambda n: progress("inversion", n)) if progress else None)
    return _cell_contexts(model, result.grid), result.grid, result.probe


def _finish(out, x, g, settings, row, grid, histories, probes) -> SuperResResult:
    down = downsampler(tuple(out.shape[-2:]), g)
    sampler_psnr = psnr(down(out.float().clamp(-1, 1)), x)
    if settings.consistency == "project":
        out = project_consistent(out, x, g, settings.project_iterations)
    image = to_uint8(out)[0]
    final = torch.from_numpy(image.transpose(2, 0, 1).copy())[None].float().to(x.device) / 127.5 - 1.0
    final_psnr = psnr(down(final), x)
    if np.isnan(sampler_psnr) or not torch.isfinite(out).all():
        raise DataError("super-resolution produced non-finite values; check the model weights")
    return SuperResResult(image, row, grid, sampler_psnr, final_psnr, histories, probes)


# ----- inputs and outputs of the command ------------------------------------------------------------------------
def gt_grid_from_slide(slide_path, x: int, y: int, kh: int, kw: int, mag: Magnification, encoder, *,
                       base_mag: float | None = None, mpp: float | None = None, batch_size: int = 32,
                       device: str = "cpu") -> torch.Tensor:
    """Raw 20x embeddings [C, kh*g, kw*g] of the region whose top-left M patch is at level-0 (x, y)."""
    from zoomfeat.conditioning import ConditioningGrids
    from zoomfeat.slides import Slide

    kwargs = {"base_mag": base_mag, "mpp": mpp}
    with Slide(slide_path, **kwargs) as slide:
        size = mag.level0_size(slide.info.base_magnification)
        base = slide.info.base_magnification
    coords = np.array([(x + j * size, y + i * size) for i in range(kh) for j in range(kw)], dtype=np.int64)
    grids = ConditioningGrids(slide_path, {mag.name: coords}, encoder.to(device), batch_size=batch_size,
                              device=device, base_mag=base, slide_kwargs=kwargs).grid(mag)  # [n, C, g, g]
    g = mag.grid_width
    n, c = grids.shape[:2]
    full = grids.reshape(kh, kw, c, g, g).transpose(2, 0, 3, 1, 4).reshape(c, kh * g, kw * g)
    return torch.from_numpy(np.ascontiguousarray(full))


def manifest(result: SuperResResult, settings: SuperResSettings, mag: Magnification, provenance: dict) -> dict:
    """What a result file records beside the image: settings, measurement agreement, curves, provenance."""
    from zoomfeat.serial import to_jsonable

    return {"row": result.row, "magnification": str(mag), "output_size": list(result.image.shape[:2]),
            "psnr_sampler_db": result.psnr_sampler, "psnr_final_db": result.psnr_final,
            "settings": to_jsonable(settings), "joint_disagreement": result.disagreement,
            "inversion_probe": result.inversion_probe, **provenance}
