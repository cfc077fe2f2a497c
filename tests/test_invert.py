"""Condition inversion: the inverted grid's context denoises the image better than random and mean grids (loss
computed here from the forward process and the U-Net, not by the code under test), the probe curve falls, only the
grid learns, and the saved file is a conditioning file the rest of zoomfeat reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from conftest import require_shared
from zoomfeat.errors import ConfigError, DataError
from zoomfeat.generate import invert as inv
from zoomfeat.mags import parse_mag

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    from zoomfeat.model import load_zoomldm

    return load_zoomldm(require_shared("golden", "zoomldm_tiny"))


@pytest.fixture(scope="module")
def sensitive(tiny):
    """The golden tiny model with its cross-attention keys x4 and values x10: its random weights otherwise make eps
    almost independent of the context (loss differences ~1e-5 between grids), which no inversion can show."""
    import copy

    model = copy.deepcopy(tiny)
    with torch.no_grad():
        for name, p in model.unet_model.named_parameters():
            if "attn2.to_k" in name:
                p.mul_(4.0)
            elif "attn2.to_v" in name:
                p.mul_(10.0)
    return model


def context_of(model, grid, mag):
    return model.summarize([model.preprocess_ssl(grid)], torch.tensor([mag.index]))


def oracle_loss(model, z, context, timesteps, noise):
    """sqrt(abar)(1-abar)-weighted eps error, mean over (t, noise), straight from the forward process."""
    acp = model.alphas_cumprod.double()
    total = 0.0
    with torch.no_grad():
        for t, n in zip(timesteps, noise):
            a = float(acp[t])
            x_t = (a ** 0.5 * z.double() + (1 - a) ** 0.5 * n.double()).float()
            eps = model.unet(x_t, torch.tensor([t]), context)
            total += a ** 0.5 * (1 - a) * float(((n - eps) ** 2).mean())
    return total / len(timesteps)


def generated_image(model, grid, mag, seed=1):
    side = model.config.diffusion.image_size
    with torch.no_grad():
        z = model.sample(context_of(model, grid, mag), torch.randn(1, 3, side, side,
                                                                   generator=torch.Generator().manual_seed(seed)),
                         steps=10)
        img = model.decode_first_stage(z)
    return (((img[0].clamp(-1, 1) + 1) / 2) * 255).to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.slow
def test_inverted_grid_beats_random_and_mean_grids(sensitive):
    m, mag = sensitive, parse_mag("5x")
    known = torch.randn(m.conditioning_dim, 4, 4, generator=torch.Generator().manual_seed(0))
    image = generated_image(m, known, mag)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    flags = [p.requires_grad for p in m.parameters()]
    # the data term alone (W = 0): the similarity prior trades some denoising loss for agreement between the
    # grid vectors (tested by test_similarity_pulls_the_grid_vectors_together)
    result = inv.invert_image(m, image, mag, inv.InversionSettings(iterations=60, eval_every=20, seed=0,
                                                                   similarity=0.0))
    assert result.grid.shape == (m.conditioning_dim, 4, 4) and not result.grid.requires_grad
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # frozen networks
    assert [p.requires_grad for p in m.parameters()] == flags  # restored after the inversion
    assert [i for i, _ in result.probe] == [0, 20, 40, 60]
    assert result.probe_losses[-1] < result.probe_losses[0]
    assert len(result.losses) == 60 and result.timesteps[0] == 950 and result.timesteps[-1] == 50

    # held-out evaluation: timesteps and noise the inversion never saw
    with torch.no_grad():
        z = m.encode_first_stage(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1)
    gen = torch.Generator().manual_seed(42)
    ts = list(range(40, 1000, 60))
    noise = [torch.randn(z.shape, generator=gen) for _ in ts]
    inverted = oracle_loss(m, z, context_of(m, result.grid, mag), ts, noise)
    randoms = [oracle_loss(m, z, context_of(m, torch.randn(m.conditioning_dim, 4, 4, generator=gen), mag), ts, noise)
               for _ in range(6)]
    mean_grid = torch.stack([torch.randn(m.conditioning_dim, 4, 4, generator=gen) for _ in range(16)]).mean(0)
    mean = oracle_loss(m, z, context_of(m, mean_grid, mag), ts, noise)
    assert inverted < min(randoms), (inverted, randoms)
    assert inverted < mean, (inverted, mean)


def test_objective_pieces_match_their_formulas(tiny):
    grid = torch.randn(5, 2, 3)
    v = grid.reshape(5, -1).t()
    pairs = [float(torch.nn.functional.cosine_similarity(v[i], v[j], dim=0)) for i in range(6) for j in range(6) if i < j]
    assert float(inv.mean_pairwise_cosine(grid)) == pytest.approx(np.mean(pairs), rel=1e-5)
    assert float(inv.mean_pairwise_cosine(torch.randn(5, 1, 1))) == 0.0
    t = torch.tensor([0, 10, 500, 999])
    a = tiny.alphas_cumprod[t].double()
    assert torch.allclose(inv.loss_weight(tiny.alphas_cumprod, t).double(), a.sqrt() * (1 - a), rtol=1e-6)


def test_defaults_are_the_supplements():
    """200 Adam steps (lr 0.1), timesteps annealed linearly 950 -> 50 over the steps, similarity weight 0.05."""
    s = inv.InversionSettings()
    assert (s.iterations, s.lr, s.similarity, s.t_high, s.t_low) == (200, 0.1, 0.05, 950, 50)
    steps = inv.inversion_timesteps(1000, s)
    expected = np.rint(950 - 900 * np.arange(200) / 199)  # linear, written from the text
    assert len(steps) == 200 and np.array_equal(steps, expected)
    assert np.all(np.diff(steps) < 0)


def test_similarity_pulls_the_grid_vectors_together(sensitive):
    """W > 0 (the supplement's prior) ends with a higher mean pairwise cosine of the grid than W = 0, and a
    negative W (a diversity penalty) with a lower one; cosine computed here with torch's cosine_similarity."""
    z = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(8))

    def mean_cos(w):
        grid = inv.invert_latent(sensitive, z, parse_mag("5x"),
                                 inv.InversionSettings(iterations=8, similarity=w, probe_timesteps=1,
                                                       eval_every=8, seed=3)).grid
        v = grid.reshape(grid.shape[0], -1).t()
        sims = torch.nn.functional.cosine_similarity(v[:, None], v[None], dim=2)
        n = len(v)
        return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))

    off, pull, push = mean_cos(0.0), mean_cos(0.5), mean_cos(-0.5)
    assert pull > off > push, (pull, off, push)


def test_denoising_loss_equals_the_oracle(tiny):
    z = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ctx = context_of(tiny, torch.randn(32, 2, 2), parse_mag("10x"))
    t = torch.tensor([100, 700])
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = inv.denoising_loss(tiny, z, ctx, t, noise)
    want = [oracle_loss(tiny, z, ctx, [int(s)], [n[None]]) for s, n in zip(t, noise)]
    assert got.tolist() == pytest.approx(want, rel=1e-4)


def test_coarse_magnification_grid_is_learned_at_full_width(tiny):
    mag = parse_mag("1.25x")  # 16x16 tiles, pooled to 8x8 inside preprocess_ssl
    z = torch.randn(1, 3, 16, 16)
    res = inv.invert_latent(tiny, z, mag, inv.InversionSettings(iterations=2, probe_timesteps=1, eval_every=1))
    assert res.grid.shape == (32, 16, 16) and torch.isfinite(res.grid).all()
    assert len(res.probe) == 3


@pytest.mark.parametrize("kw, message", [({"iterations": 0}, "iterations"), ({"lr": 0.0}, "learning rate"),
                                         ({"similarity": float("nan")}, "similarity"), ({"t_low": 5, "t_high": 2}, "t_low")])
def test_bad_settings(kw, message):
    with pytest.raises(ConfigError, match=message):
        inv.InversionSettings(**kw)


@pytest.mark.slow
def test_invert_command_writes_a_conditioning_file(tmp_path, tiny, capsys):
    from zoomfeat.conditioning import ConditioningGrids
    from zoomfeat.store import FeatureFile

    folder = require_shared("golden", "zoomldm_tiny")
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "patch.png")
    out = tmp_path / "grid.h5"
    args = ["invert", str(tmp_path / "patch.png"), "--mag", "5x", "--zoomldm", str(folder), "--inversion-steps", "4",
            "--device", "cpu", "--out", str(out)]
    assert cli.main(args) == 0
    assert "probe loss" in capsys.readouterr().out
    grid, mag, config = inv.load_grid(out)
    assert mag == parse_mag("5x") and grid.shape == (32, 4, 4)
    assert len(config["losses"]) == 4 and config["settings"]["iterations"] == 4 and config["zoomldm_sha256"]
    with FeatureFile(out) as f:  # the conditioning-file layout: one 20x tile per grid cell
        coords, feats = f.coords("20x"), f.features("20x")
    cond = ConditioningGrids.from_embeddings({"5x": np.array([[0, 0]])}, coords, feats, base_mag=20.0)
    assert np.allclose(cond.grid("5x")[0], grid.numpy())
    # same seed, same grid (reproducible)
    assert cli.main(args + ["--overwrite"]) == 0
    assert torch.equal(inv.load_grid(out)[0], grid)
    assert cli.main(args) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("size, message", [((64, 48), "square patch"), ((96, 96), "square patch")])
@pytest.mark.slow
def test_invert_command_rejects_images_that_are_not_one_patch(tmp_path, capsys, size, message):
    folder = require_shared("golden", "zoomldm_tiny")
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(tmp_path / "p.png")
    rc = cli.main(["invert", str(tmp_path / "p.png"), "--mag", "5x", "--zoomldm", str(folder),
                   "--out", str(tmp_path / "g.h5"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error:") and message in err[-1]
    assert not (tmp_path / "g.h5").exists()


def test_invert_rejects_bad_inputs(tiny, tmp_path):
    with pytest.raises(DataError, match="one latent"):
        inv.invert_latent(tiny, torch.randn(2, 3, 16, 16), parse_mag("5x"))
    with pytest.raises(DataError, match="does not match"):
        inv.invert_latent(tiny, torch.randn(1, 3, 16, 16), parse_mag("5x"), init=torch.randn(32, 2, 2))
    with pytest.raises(DataError, match="not an inverted grid"):
        from zoomfeat.store import write_feature_file

        write_feature_file(tmp_path, "other", {"20x": np.zeros((2, 4), np.float32)})
        inv.load_grid(tmp_path / "other.h5")
