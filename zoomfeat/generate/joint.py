"""Joint multi-scale sampling (ZoomLDM, Yellapragada et al. CVPR 2025, §3.2 and supplement Algorithm S2).

A coarse guide (one patch at magnification M, conditioned on its own grid) is sampled together with the
``g x g`` 20x patches of the region it covers (g = 20/M). At every step, after both have their clean estimates,
the 20x patches are moved so that their decoded mosaic, downsampled to the guide's resolution, agrees with the
guide's decoded clean estimate; the guide is never influenced by the patches. The official notebooks for this
are missing upstream, so this follows the supplement's text (Algorithm S2) and the same lab's public
constrained sampler (Graikos et al., "Fast constrained sampling in pre-trained diffusion models", its
``superres`` notebook: facts only); its correctness is also checked by the property it promises (agreement).

One step at 1-based t (coefficients of :class:`zoomfeat.generate.windows.StepCoefficients`):

1. guide: ``eps_g`` (its own guidance, ``guide_guidance``), ``x0_g = x_g/sqrt(a) - eps_g sqrt((1-a)/a)``,
   image ``I_M = D(x0_g)`` (a *fixed* guide gives ``I_M`` itself: a measurement image, or a fixed latent decoded);
2. patches (``batch_size`` at a time): ``eps_i``, ``x0_i``, ``D(x0_i)``; the downsampled mosaic
   ``down(mosaic)`` is accumulated patch by patch through the separable resize operators (never materialising
   the mosaic); the residual ``r = I_M - down(mosaic)`` (its rms is the step's *disagreement*);
3. per patch, the latent-space error ``e_i = J_E(D(x0_i)) dI_i``: patch i's tile of ``up(r)`` (antialiased
   bicubic :class:`~zoomfeat.generate.resize.Resizer`, factor g) taken to latent space by a finite-difference
   Jacobian-vector product through the VAE encoder (step ``h``, the supplement's delta);
4. the update of x_t, one of two (``update``):

   * ``"je"`` (default; Algorithm S2, the lab's "inexact Newton"): ``e <- e / max|e|``;
     ``Je = (x0(x_t + zeta e) - x0(x_t)) / zeta`` (one forward finite difference through the guided denoiser,
     zeta = ``h``); ``u = Je / max|Je|``; ``x_t <- x_t + lr u`` (lambda = ``lr``); then x0 and eps are
     re-evaluated at the new x_t. Repeated ``iterations`` (K) times per step, the residual re-measured between
     repetitions. Cost per step: 1 + N (1 + 2K) guided evaluations for N patches.
   * ``"gmres"`` (zoomfeat's earlier Newton-Krylov step, not in the papers): solve ``J dx = e`` with
     ``krylov`` GMRES iterations of finite-difference JVPs (step rms ``h``), then ``x_t += lr dx`` and
     ``x0 += lr J dx``. Cost per step: 1 + N (1 + krylov).

5. both take the official large-image step ``x <- sqrt(a_prev) x0 + sqrt(1-a_prev-beta_tilde) eps +
   sqrt(beta_tilde) n`` with ``eps = (x - sqrt(a) x0)/sqrt(1-a)``.

Max-norms are per patch (each patch's latent is one constrained sample). No backpropagation anywhere. Memory:
the latents of every patch plus one batch of network activations and decoded patches; the 20x mosaic is never
held in pixels. The finite differences run in fp32 (a bf16 difference at h = 0.005 would be noise).

``joint_sample(model, contexts_20x, guide, settings, noise)`` takes either :class:`SampledGuide` (its
context, sampled jointly) or :class:`FixedGuide` (an image or latent at M, for super-resolution / inversion).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from zoomfeat.errors import ConfigError
from zoomfeat.generate.guidance import Guidance, guided_eps
from zoomfeat.generate.resize import Resizer
from zoomfeat.generate.windows import NoiseFn, StepCoefficients, large_image_timesteps


JOINT_UPDATES = ("je", "gmres")


@dataclass(frozen=True)
class JointSettings:
    """Joint sampler settings; defaults are the supplement's (Algorithm S2: 50 DDIM steps from t = 1000, J·e
    update with zeta = delta = 0.005, lambda = 0.5, K = 1; large-image guidance w = 2, i.e. a standard scale 3).

    ``guide_guidance`` (None: the same as ``guidance``) is the guide's own scale s_L. ``krylov`` is the GMRES
    size of ``update="gmres"``; ``iterations`` the K of ``update="je"``."""

    t_start: int = 1000
    stride: int = 20
    guidance: Guidance = field(default_factory=lambda: Guidance(2.0, "large_image"))
    h: float = 0.005
    lr: float = 0.5
    update: str = "je"
    iterations: int = 1
    krylov: int = 10
    guide_guidance: Guidance | None = None
    batch_size: int = 8
    constrain: bool = True  # False: the same loop and draws with no correction (independent sampling)

    def __post_init__(self) -> None:
        if self.update not in JOINT_UPDATES:
            raise ConfigError(f"bad joint update {self.update!r}: use one of {', '.join(JOINT_UPDATES)}")
        if not self.h > 0:
            raise ConfigError(f"finite-difference step h must be > 0, got {self.h}")
        if not self.lr > 0:
            raise ConfigError(f"joint lr must be > 0, got {self.lr}")
        if self.iterations < 1:
            raise ConfigError(f"joint iterations (K) must be >= 1, got {self.iterations}")
        if self.krylov < 1:
            raise ConfigError(f"GMRES Krylov size must be >= 1, got {self.krylov}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")

    @property
    def guide_scale(self) -> Guidance:
        return self.guidance if self.guide_guidance is None else self.guide_guidance

    def evaluations_per_step(self, n_patches: int, sampled_guide: bool = True) -> int:
        """Guided denoiser evaluations of one step (one evaluation = one latent through the guided eps)."""
        per_patch = 1 + ((2 * self.iterations if self.update == "je" else self.krylov) if self.constrain else 0)
        return int(sampled_guide) + n_patches * per_patch


@dataclass
class SampledGuide:
    """A guide sampled jointly: its Summarizer context [1, 65, D] (the M patch's own grid at M)."""

    context: torch.Tensor


@dataclass
class FixedGuide:
    """A fixed guide at M: an ``image`` [1, 3, Hm, Wm] in [-1, 1], or a ``latent`` [1, C, h, w] decoded once."""

    image: torch.Tensor | None = None
    latent: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.image is None) == (self.latent is None):
            raise ConfigError("a fixed guide needs exactly one of image or latent")


@dataclass
class JointResult:
    """Patch latents [N, C, h, w] (row-major: n = row * gw + col), the guide's final latent (None when fixed),
    the rms disagreement ``r`` of every step (before its correction), and the number of guided denoiser
    evaluations made (one latent through the guided eps; guide included)."""

    latents: torch.Tensor
    guide_latent: torch.Tensor | None
    disagreement: list[float]
    evaluations: int = 0


def _rms(v: torch.Tensor) -> torch.Tensor:
    """Per-sample rms [B, 1, 1, 1] (never 0)."""
    return v.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def max_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-sample max |v| [B, 1, 1, 1] (never 0)."""
    return v.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def fd_jvp(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, fx: torch.Tensor, v: torch.Tensor,
           h: float) -> torch.Tensor:
    """Finite-difference JVP of ``fn`` at ``x`` (``fx = fn(x)``) along ``v``, per sample: step rms h."""
    s = _rms(v)
    return (fn(x + h * v / s) - fx) * (s / h)


def gmres(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iterations: int):
    """Per-sample GMRES for ``A x = b`` (A block-diagonal over the batch, applied by ``matvec``) from x = 0.
    Returns (x, A x) with A x from the Arnoldi relation (no extra matvec)."""
    n = b.shape[0]
    flat = lambda t: t.reshape(n, -1)  # noqa: E731
    view = lambda s: s.view(n, *([1] * (b.dim() - 1)))  # noqa: E731
    beta = flat(b).norm(dim=1).clamp_min(1e-30)
    basis = [b / view(beta)]
    hess = torch.zeros(n, iterations + 1, iterations, dtype=torch.float64, device=b.device)
    k_used = 0
    for k in range(iterations):
        w = matvec(basis[k])
        for j in range(k + 1):  # modified Gram-Schmidt
            hj = (flat(w) * flat(basis[j])).sum(1)
            hess[:, j, k] = hj.double()
            w = w - view(hj) * basis[j]
        hn = flat(w).norm(dim=1)
        hess[:, k + 1, k] = hn.double()
        k_used = k + 1
        basis.append(w / view(hn.clamp_min(1e-30)))
        if bool((hn <= 1e-7 * beta).all()):  # exact solution reached for every sample
            break
    hk = hess[:, :k_used + 1, :k_used]
    rhs = torch.zeros(n, k_used + 1, 1, dtype=torch.float64, device=b.device)
    rhs[:, 0, 0] = beta.double()
    y = torch.linalg.pinv(hk) @ rhs  # [n, k, 1], least squares
    hy = (hk @ y)[..., 0].to(b.dtype)
    y = y[..., 0].to(b.dtype)
    x = sum(view(y[:, j]) * basis[j] for j in range(k_used))
    ax = sum(view(hy[:, j]) * basis[j] for j in range(k_used + 1))
    return x, ax


class _Mosaic:
    """Down/up-sampling between the ``gh x gw`` mosaic of R-px patches and a guide image, patch by patch."""

    def __init__(self, gh: int, gw: int, patch_px: int, guide_hw: tuple[int, int]):
        self.gh, self.gw, self.p = gh, gw, patch_px
        scale = guide_hw[0] / (gh * patch_px)
        if abs(guide_hw[1] / (gw * patch_px) - scale) > 1e-9:
            raise ConfigError(f"guide image {guide_hw} is not the {gh}x{gw} mosaic of {patch_px}-px patches "
                              "scaled by one factor")
        self.down = Resizer((gh * patch_px, gw * patch_px), scale, output_shape=guide_hw)
        self.up = Resizer(guide_hw, 1.0 / scale, output_shape=(gh * patch_px, gw * patch_px))

    def _span(self, n: int) -> tuple[slice, slice]:
        r, c = divmod(n, self.gw)
        return slice(r * self.p, (r + 1) * self.p), slice(c * self.p, (c + 1) * self.p)

    def add_down(self, acc: torch.Tensor, n: int, img: torch.Tensor) -> None:
        """acc [3, Hm, Wm] += the contribution of patch n's image [3, R, R] to down(mosaic)."""
        rs, cs = self._span(n)
        acc += self.down.m_h[:, rs].to(img) @ img @ self.down.m_w[:, cs].to(img).T

    def up_tile(self, r: torch.Tensor, n: int) -> torch.Tensor:
        """Patch n's tile [3, R, R] of up(r) for a guide-sized image r [3, Hm, Wm]."""
        rs, cs = self._span(n)
        return self.up.m_h[rs].to(r) @ r @ self.up.m_w[cs].to(r).T


class JointSampler:
    """The state of one joint run; :func:`joint_sample` is the entry point."""

    def __init__(self, model, contexts: torch.Tensor, grid_hw: tuple[int, int], guide, settings: JointSettings,
                 noise: NoiseFn, tick=None):
        self.m, self.s, self.noise, self.tick = model, settings, noise, tick
        self.gh, self.gw = grid_hw
        if len(contexts) != self.gh * self.gw:
            raise ConfigError(f"{len(contexts)} 20x contexts for a {self.gh}x{self.gw} grid of patches")
        self.device = model.alphas_cumprod.device
        self.contexts = contexts.to(self.device)
        self.guide = guide
        side = int(model.config.diffusion.image_size)
        self.shape = (int(model.latent_channels), side, side)
        self.patch_px = side * int(model.config.first_stage.downsample_factor)
        self.evaluations = 0

    # ----- networks (fp32, no grad) -----------------------------------------------------------------------
    def _x0(self, x: torch.Tensor, t: int, ctx: torch.Tensor, coef: StepCoefficients, guidance=None):
        eps = guided_eps(self.m, x, t, ctx, guidance or self.s.guidance, "one_based").float()
        self.evaluations += len(x)
        if self.tick is not None:
            self.tick(len(x))
        return coef.x0(x, eps), eps

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.m.decode_first_stage(z).float()

    def _encode(self, img: torch.Tensor) -> torch.Tensor:
        return self.m.encode_first_stage(img).float()

    # ----- one step ---------------------------------------------------------------------------------------
    def guide_image(self, x_g, t, coef):
        """(guide image [1,3,Hm,Wm], x0_g, eps_g); a fixed guide returns its image and Nones."""
        if isinstance(self.guide, FixedGuide):
            return self._fixed_image, None, None
        x0_g, eps_g = self._x0(x_g, t, self.guide.context.to(self.device), coef, self.s.guide_scale)
        return self._decode(x0_g), x0_g, eps_g

    def residual(self, x, t, coef, image_m, mosaic: _Mosaic):
        """Pass over the patches: x0, eps of all, and r = I_M - down(mosaic(D(x0)))."""
        x0, eps = torch.empty_like(x), torch.empty_like(x)
        acc = torch.zeros_like(image_m[0])
        for start in range(0, len(x), self.s.batch_size):
            sl = slice(start, start + self.s.batch_size)
            x0[sl], eps[sl] = self._x0(x[sl], t, self.contexts[sl], coef)
            for k, img in enumerate(self._decode(x0[sl])):
                mosaic.add_down(acc, start + k, img)
        return x0, eps, image_m[0] - acc

    def _latent_error(self, x0b: torch.Tensor, r: torch.Tensor, idx: range, mosaic: _Mosaic) -> torch.Tensor:
        """e_i = J_E(D(x0_i)) (patch i's tile of up(r)) for the patches ``idx`` (their x0 ``x0b``)."""
        img = self._decode(x0b)
        d_img = torch.stack([mosaic.up_tile(r, n) for n in idx])
        return fd_jvp(self._encode, img, self._encode(img), d_img, self.s.h)

    def correct(self, x, x0, eps, t, coef, r, mosaic: _Mosaic) -> None:
        """In place: the joint update of every patch, a batch at a time (``je`` or ``gmres``, module doc)."""
        if self.s.update == "gmres":
            return self._correct_gmres(x, x0, eps, t, coef, r, mosaic)
        for k in range(self.s.iterations):
            if k:
                r = self._residual_of(x0, mosaic)
            for start in range(0, len(x), self.s.batch_size):
                sl = slice(start, start + self.s.batch_size)
                idx = range(start, min(start + self.s.batch_size, len(x)))
                xb, ctx = x[sl], self.contexts[sl]
                e = self._latent_error(x0[sl], r, idx, mosaic)
                e = e / max_norm(e)
                x0_e, _ = self._x0(xb + self.s.h * e, t, ctx, coef)
                je = (x0_e - x0[sl]) / self.s.h
                x[sl] = xb + self.s.lr * je / max_norm(je)
                x0[sl], eps[sl] = self._x0(x[sl], t, ctx, coef)

    def _residual_of(self, x0, mosaic: _Mosaic) -> torch.Tensor:
        """r = I_M - down(mosaic(D(x0))) for given clean estimates and this step's guide image (no network)."""
        acc = torch.zeros_like(self._image_m[0])
        for start in range(0, len(x0), self.s.batch_size):
            sl = slice(start, start + self.s.batch_size)
            for k, img in enumerate(self._decode(x0[sl])):
                mosaic.add_down(acc, start + k, img)
        return self._image_m[0] - acc

    def _correct_gmres(self, x, x0, eps, t, coef, r, mosaic: _Mosaic) -> None:
        """x_t += lr dx and x0 += lr J dx, dx from ``krylov`` GMRES iterations on J dx = e."""
        h = self.s.h
        for start in range(0, len(x), self.s.batch_size):
            sl = slice(start, start + self.s.batch_size)
            idx = range(start, min(start + self.s.batch_size, len(x)))
            dz = self._latent_error(x0[sl], r, idx, mosaic)
            xb, x0b, ctx = x[sl], x0[sl], self.contexts[sl]
            matvec = lambda v: fd_jvp(lambda y: self._x0(y, t, ctx, coef)[0], xb, x0b, v, h)  # noqa: E731
            dx, jdx = gmres(matvec, dz, self.s.krylov)
            x[sl] = xb + self.s.lr * dx
            x0[sl] = x0b + self.s.lr * jdx
            eps[sl] = coef.eps(x[sl], x0[sl])

    def run(self, on_step=None) -> JointResult:
        s, m = self.s, self.m
        steps = large_image_timesteps(s.t_start, s.stride, m.num_timesteps)
        sampled = isinstance(self.guide, SampledGuide)
        n = self.gh * self.gw
        x_g = self.noise((1, *self.shape)).to(self.device) if sampled else None
        x = self.noise((n, *self.shape)).to(self.device)
        if not sampled:
            g = self.guide
            self._fixed_image = (g.image.float().to(self.device) if g.image is not None
                                 else self._decode(g.latent.float().to(self.device)))
        mosaic = None
        history: list[float] = []
        with torch.no_grad():
            for k, t in enumerate(steps):
                coef = StepCoefficients.at(m, t, s.stride)
                image_m, x0_g, eps_g = self.guide_image(x_g, t, coef)
                self._image_m = image_m
                if mosaic is None:
                    mosaic = _Mosaic(self.gh, self.gw, self.patch_px, tuple(image_m.shape[-2:]))
                x0, eps, r = self.residual(x, t, coef, image_m, mosaic)
                history.append(float(r.pow(2).mean().sqrt()))
                if on_step is not None:
                    on_step(k, t, history[-1])
                if s.constrain:
                    self.correct(x, x0, eps, t, coef, r, mosaic)
                if sampled:
                    x_g = coef.step(x0_g, coef.eps(x_g, x0_g), self.noise(tuple(x_g.shape)))
                x = coef.step(x0, coef.eps(x, x0), self.noise(tuple(x.shape)))
        return JointResult(x.cpu(), x_g.cpu() if sampled else None, history, self.evaluations)


def joint_sample(model, contexts_20x: torch.Tensor, guide: SampledGuide | FixedGuide, settings: JointSettings,
                 noise: NoiseFn, *, grid_hw: tuple[int, int] | None = None, tick=None, on_step=None) -> JointResult:
    """Sample the 20x patches of one region jointly with (or constrained by) a guide at M.

    ``contexts_20x``: [N, 65, D] Summarizer contexts of the N = gh*gw 20x patches, row-major; ``grid_hw``
    (gh, gw) defaults to a square grid. ``noise(shape)`` draws in a fixed order: the guide's x_T (sampled
    guide only), the patches' x_T, then per step the guide's and the patches' step noise. ``tick(n)``: n patch
    (or guide) network evaluations done. ``on_step(k, t, disagreement)`` after each step's residual.
    """
    if grid_hw is None:
        g = int(round(len(contexts_20x) ** 0.5))
        if g * g != len(contexts_20x):
            raise ConfigError(f"{len(contexts_20x)} 20x contexts are not a square grid: pass grid_hw")
        grid_hw = (g, g)
    return JointSampler(model, contexts_20x, grid_hw, guide, settings, noise, tick).run(on_step)


def stitch(latents: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Row-major patch latents [gh*gw, C, h, w] -> one large latent [1, C, gh*h, gw*w]."""
    gh, gw = grid_hw
    n, c, h, w = latents.shape
    return latents.reshape(gh, gw, c, h, w).permute(2, 0, 3, 1, 4).reshape(1, c, gh * h, gw * w)


def mosaic_images(model, latents: torch.Tensor, grid_hw: tuple[int, int], batch_size: int = 8) -> torch.Tensor:
    """Each patch decoded on its own and tiled: float [1, 3, gh*R, gw*R] (what the constraint compares)."""
    with torch.no_grad():
        imgs = torch.cat([model.decode_first_stage(latents[i:i + batch_size].to(model.alphas_cumprod.device)).float().cpu()
                          for i in range(0, len(latents), batch_size)])
    return stitch(imgs, grid_hw)
