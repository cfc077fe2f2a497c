"""Generation metrics against independent oracles: FID by a direct numpy/scipy computation, SSIM/PSNR by
torchmetrics called here, LPIPS by torchmetrics' own LPIPS module on the same (random, local) backbone, the FID
Inception's modified blocks by their definition, nearest neighbours by sklearn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

import cli
from zoomfeat.errors import CheckpointError, DataError
from zoomfeat.generate import metrics as M
from zoomfeat.generate.metrics.fid import feature_stats, fid_from_features

pytestmark = pytest.mark.usefixtures("one_thread")


def direct_fid(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1 = (a - mu1).T @ (a - mu1) / (len(a) - 1)
    s2 = (b - mu2).T @ (b - mu2) / (len(b) - 1)
    root = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


def _images(folder, n, size=64, seed=0, names=None, smooth=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        if smooth:  # structured content so SSIM is not ~0
            yy, xx = np.mgrid[:size, :size]
            img = ((np.sin(xx / (3 + i)) * 60 + 128)[..., None] + rng.normal(0, 10, (size, size, 3))).clip(0, 255)
            img = img.astype(np.uint8)
        name = names[i] if names else f"img{i:02d}.png"
        Image.fromarray(img).save(folder / name)
        out.append(img)
    return out


# ----- FID -------------------------------------------------------------------------------------------------------
def test_fid_matches_direct_computation_on_fixed_features():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 16))
    fake = rng.normal(size=(150, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    expected = direct_fid(real, fake)
    assert expected > 1.0
    assert fid_from_features(real, fake) == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(real, real) == pytest.approx(0.0, abs=1e-6)


def test_fid_rejects_bad_features():
    with pytest.raises(DataError, match="at least 2"):
        feature_stats(np.zeros((1, 4)))
    bad = np.ones((5, 3))
    bad[2, 1] = np.nan
    with pytest.raises(DataError, match="non-finite"):
        feature_stats(bad)


def _toy(dim=8):
    from zoomfeat.encoders import load_encoder

    return load_encoder("toy", dim=dim, seed=0)


def _toy_features(images):
    enc = _toy()
    x = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        return enc(enc.preprocess(x)).numpy()


def test_fid_crop_and_downsampled_with_encoder_match_direct(tmp_path):
    real = _images(tmp_path / "real", 12, size=128, seed=1)
    fake = _images(tmp_path / "fake", 10, size=128, seed=2)
    out = tmp_path / "r.json"
    rc = cli.main(["gen-metrics", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                   "--metric", "fid,crop-fid", "--metric", "downsampled-fid", "--encoder", "toy", "--encoder-dim", "8",
                   "--crop-size", "64", "--downsample-size", "32", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    res = {r["metric"]: r for r in json.loads(out.read_text())["results"]}
    assert res["fid"]["value"] == pytest.approx(direct_fid(_toy_features(real), _toy_features(fake)), rel=1e-5)
    crop = lambda ims: [im[y:y + 64, x:x + 64] for im in ims for y in (0, 64) for x in (0, 64)]  # noqa: E731
    assert res["crop-fid"]["n"] == 40
    assert res["crop-fid"]["value"] == pytest.approx(
        direct_fid(_toy_features(crop(real)), _toy_features(crop(fake))), rel=1e-5)
    down = lambda ims: [np.asarray(Image.fromarray(i).resize((32, 32), Image.BICUBIC)) for i in ims]  # noqa: E731
    assert res["downsampled-fid"]["value"] == pytest.approx(
        direct_fid(_toy_features(down(real)), _toy_features(down(fake))), rel=1e-5)
    assert res["fid"]["details"]["features"]["network"] == "toy"


def test_crop_fid_refuses_sizes_not_multiple_of_crop(tmp_path, capsys):
    _images(tmp_path / "real", 3, size=100)
    _images(tmp_path / "fake", 3, size=100, seed=3)
    rc = cli.main(["gen-metrics", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                   "--metric", "crop-fid", "--encoder", "toy", "--crop-size", "64", "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "multiples of 64" in err[-1]


# ----- Inception -------------------------------------------------------------------------------------------------
def test_fid_inception_blocks_follow_the_fid_network_definition():
    from zoomfeat.generate.metrics.inception import fid_inception

    torch.manual_seed(0)
    net = fid_inception().eval()
    for module in net.modules():  # non-trivial BN statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 192, 9, 9)
    blk = net.Mixed_5b
    with torch.no_grad():
        pool = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        expected = torch.cat([blk.branch1x1(x), blk.branch5x5_2(blk.branch5x5_1(x)),
                              blk.branch3x3dbl_3(blk.branch3x3dbl_2(blk.branch3x3dbl_1(x))),
                              torch.relu(blk.branch_pool.bn(blk.branch_pool.conv(pool)))], 1)
        assert torch.allclose(blk(x), expected, atol=1e-5)
        e = net.Mixed_7c
        y = torch.randn(1, 2048, 4, 4)
        got_pool = e(y)[:, -192:]
        want_pool = torch.relu(e.branch_pool.bn(e.branch_pool.conv(F.max_pool2d(y, 3, 1, 1))))
        assert torch.allclose(got_pool, want_pool, atol=1e-5)
    # the torchvision layout (1000 classes) keeps the ordinary blocks
    assert type(fid_inception(1000).Mixed_7c).__name__ == "InceptionE"


@pytest.mark.slow
def test_inception_loads_only_local_inception_state_dicts(tmp_path):
    from zoomfeat.generate.metrics.inception import fid_inception, load_inception

    torch.manual_seed(0)
    path = tmp_path / "pt_inception.pth"
    torch.save(fid_inception().state_dict(), path)
    net = load_inception(path)
    assert net.name == "inception-fid"
    with pytest.raises(CheckpointError, match="not found"):
        load_inception(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048)}, bad)
    with pytest.raises(CheckpointError, match="1008"):
        load_inception(bad)
    state = fid_inception().state_dict()
    state.pop("Mixed_7c.branch_pool.conv.weight")
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match="missing"):
        load_inception(bad)


@pytest.mark.slow
def test_gen_metrics_fid_with_a_local_inception_file(tmp_path):
    from zoomfeat.generate.metrics.inception import INPUT_SIZE, fid_inception

    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    net = fid_inception().eval()
    torch.save(net.state_dict(), weights)
    real = _images(tmp_path / "real", 3, size=32, seed=4)
    fake = _images(tmp_path / "fake", 3, size=32, seed=5)
    out = tmp_path / "fid.json"
    assert cli.main(["gen-metrics", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                     "--metric", "fid", "--weights", str(weights), "--device", "cpu", "--out", str(out)]) == 0

    def feats(images):  # pool3 features by the FID network's forward: resize, [-1, 1], blocks, mean
        x = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy()).float() / 255
        x = 2 * F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False) - 1
        with torch.no_grad():
            for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                         "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                         "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
                x = getattr(net, name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1).numpy()

    value = json.loads(out.read_text())["results"][0]["value"]
    assert value == pytest.approx(direct_fid(feats(real), feats(fake)), rel=1e-4)


# ----- paired metrics -------------------------------------------------------------------------------------------
def _pair_dirs(tmp_path, n=3, size=48):
    real = _images(tmp_path / "real", n, size=size, seed=6, smooth=True)
    rng = np.random.default_rng(7)
    fake = [np.clip(r.astype(int) + rng.integers(-30, 30, r.shape), 0, 255).astype(np.uint8) for r in real]
    (tmp_path / "fake").mkdir()
    for i, f in enumerate(fake):
        Image.fromarray(f).save(tmp_path / "fake" / f"img{i:02d}.png")
    Image.fromarray(fake[0]).save(tmp_path / "fake" / "unpaired.png")
    return real, fake


def test_ssim_psnr_equal_torchmetrics(tmp_path):
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    real, fake = _pair_dirs(tmp_path)
    out = tmp_path / "paired.csv"
    assert cli.main(["gen-metrics", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                     "--metric", "ssim,psnr", "--out", str(out), "--device", "cpu"]) == 0
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    summary = {r[0]: float(r[2]) for r in rows if r[1] == ""}
    t = lambda a: torch.from_numpy(a.transpose(2, 0, 1).copy())[None].double() / 255  # noqa: E731
    ssim = np.mean([float(structural_similarity_index_measure(t(f), t(r), data_range=1.0)) for r, f in zip(real, fake)])
    psnr = np.mean([float(peak_signal_noise_ratio(t(f), t(r), data_range=1.0)) for r, f in zip(real, fake)])
    assert summary["ssim"] == pytest.approx(ssim, rel=1e-9)
    assert summary["psnr"] == pytest.approx(psnr, rel=1e-9)
    assert 0.05 < summary["ssim"] < 0.99 and 10 < summary["psnr"] < 40
    assert sum(1 for r in rows if r[0] == "psnr" and r[1]) == 3  # per-pair rows, the unpaired file ignored


def test_an_identical_or_constant_pair_warns_and_never_aborts_the_run(tmp_path, capsys):
    """Pair img00 identical (PSNR inf), pair img01 a constant black image vs noise; img02 an ordinary pair."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    real = _images(tmp_path / "real", 3, size=32, seed=1)
    (tmp_path / "fake").mkdir()
    fakes = [real[0], np.zeros_like(real[1]), np.clip(real[2].astype(int) + 20, 0, 255).astype(np.uint8)]
    for i, f in enumerate(fakes):
        Image.fromarray(f).save(tmp_path / "fake" / f"img{i:02d}.png")
    out = tmp_path / "r.json"
    assert cli.main(["gen-metrics", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                     "--metric", "psnr,ssim,embedding", "--encoder", "toy", "--encoder-dim", "8", "--device", "cpu",
                     "--out", str(out)]) == 0
    assert "img00" in capsys.readouterr().err  # the warning names the non-finite pair
    res = {r["metric"]: r for r in json.loads(out.read_text())["results"]}
    t = lambda a: torch.from_numpy(a.transpose(2, 0, 1).copy())[None].double() / 255  # noqa: E731
    finite = [float(peak_signal_noise_ratio(t(f), t(r), data_range=1.0)) for r, f in zip(real[1:], fakes[1:])]
    assert res["psnr"]["value"] == pytest.approx(np.mean(finite), rel=1e-9)
    assert res["psnr"]["details"]["non_finite_pairs"] == ["img00"] and res["psnr"]["n"] == 2
    assert np.isfinite(res["ssim"]["value"]) and np.isfinite(res["embedding"]["value"])


def _random_alexnet_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    alex = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save(alex.state_dict(), path)
    return alex, path


@pytest.mark.slow
def test_lpips_equals_torchmetrics_lpips_on_the_same_local_backbone(tmp_path):
    from torchmetrics.functional.image.lpips import _LPIPS

    from zoomfeat.generate.metrics.lpips import bundled_linear_weights, load_lpips

    alex, path = _random_alexnet_file(tmp_path)
    ours = load_lpips(path)
    ref = _LPIPS(pretrained=True, net="alex", pnet_rand=True).eval()  # bundled linear weights, random backbone
    slices = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
    with torch.no_grad():
        for idx, s in slices.items():
            conv = getattr(getattr(ref.net, f"slice{s}"), str(idx))
            conv.weight.copy_(alex.features[idx].weight)
            conv.bias.copy_(alex.features[idx].bias)
        x = torch.rand(3, 3, 64, 64) * 2 - 1
        y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
        want = ref(x, y).flatten()
        got = ours(x, y)
    assert bundled_linear_weights("alex") is not None
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), (got, want)
    assert float(ours(x, x).abs().max()) < 1e-7


def test_lpips_metric_through_the_command_and_its_errors(tmp_path, capsys):
    _alex, path = _random_alexnet_file(tmp_path)
    _pair_dirs(tmp_path, n=2, size=64)
    out = tmp_path / "l.json"
    base = ["gen-metrics", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--device", "cpu"]
    assert cli.main(base + ["--metric", "lpips", "--lpips-backbone", str(path), "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"][0]
    assert res["n"] == 2 and res["value"] > 0 and np.isfinite(res["value"])
    assert cli.main(base + ["--metric", "lpips"]) == 2
    assert "--lpips-backbone" in capsys.readouterr().err
    assert cli.main(base + ["--metric", "lpips", "--lpips-backbone", str(tmp_path / "none.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_embedding_similarity_and_nearest_neighbours_match_sklearn(tmp_path):
    from sklearn.metrics.pairwise import cosine_similarity

    real = _images(tmp_path / "real", 6, size=64, seed=8)
    fake = _images(tmp_path / "fake", 4, size=64, seed=9)
    Image.fromarray(real[3]).save(tmp_path / "fake" / "copy.png")  # a memorised image
    Image.fromarray(real[2]).save(tmp_path / "fake" / "img02.png")  # the pair img02 is identical
    fake[2] = real[2]
    out = tmp_path / "e.json"
    assert cli.main(["gen-metrics", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                     "--metric", "embedding,nn-distance", "--encoder", "toy", "--encoder-dim", "8",
                     "--device", "cpu", "--out", str(out)]) == 0
    res = {r["metric"]: r for r in json.loads(out.read_text())["results"]}
    fr, ff = _toy_features(real), _toy_features(fake)
    pair_cos = [cosine_similarity(fr[i:i + 1], ff[i:i + 1])[0, 0] for i in range(4)]
    assert res["embedding"]["value"] == pytest.approx(np.mean(pair_cos), rel=1e-5)
    assert {i["item"]: i["value"] for i in res["embedding"]["items"]}["img02"] == pytest.approx(1.0, abs=1e-6)
    all_fake = np.concatenate([_toy_features([real[3]]), ff])  # sorted names: copy.png first
    dist = 1 - cosine_similarity(all_fake, fr).max(axis=1)
    items = res["nn-distance"]["items"]
    assert items[0]["item"] == "copy.png->img03.png" and items[0]["value"] == pytest.approx(0.0, abs=1e-6)
    assert [i["value"] for i in items] == pytest.approx(list(dist), abs=1e-6)
    assert res["nn-distance"]["value"] == pytest.approx(dist.mean(), abs=1e-6)


# ----- command boundary ----------------------------------------------------------------------------------------
def test_command_metric_names_are_the_registry():
    from zoomfeat.commands import gen_metrics

    assert tuple(M.metric_names()) == gen_metrics.METRIC_NAMES


@pytest.mark.parametrize("extra, message", [
    (["--metric", "fid"], "feature network"),
    (["--metric", "bogus"], "unknown metric 'bogus'"),
    (["--metric", "fid", "--encoder", "toy", "--weights", "x.pth"], "not both"),
    (["--metric", "ssim", "--out", "r.txt"], ".json or .csv"),
    (["--metric", "ssim,fid", "--encoder", "nope"], "unknown --encoder 'nope'"),
    (["--metric", "fid", "--weights", "missing.pth"], "does not exist"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, extra, message):
    _images(tmp_path / "real", 2, size=32)
    _images(tmp_path / "fake", 2, size=32, seed=1)
    rc = cli.main(["gen-metrics", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                   "--device", "cpu"] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error:") and message in err[-1], err


def test_missing_or_empty_folders_are_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _images(tmp_path / "real", 2, size=32)
    assert cli.main(["gen-metrics", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "nope"),
                     "--metric", "ssim", "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["gen-metrics", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "empty"),
                     "--metric", "ssim", "--device", "cpu"]) == 2
    assert "holds no" in capsys.readouterr().err


# ----- clip-fid and per-patch embeddings -------------------------------------------------------------------------
def _tiny_open_clip_file(tmp_path):
    """A tiny random open_clip CLIP (ViT image tower: width 64, 2 layers, patch 8, 32-px input) saved as a state_dict."""
    import open_clip  # the test extra (pyproject): an independent implementation of the tower
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
                           text_cfg={"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1})
    with torch.no_grad():  # open_clip's init leaves some tensors at zero/one: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def test_clip_fid_equals_scipy_frechet_distance_of_open_clip_features(tmp_path):
    model, weights = _tiny_open_clip_file(tmp_path)
    real = _images(tmp_path / "real", 6, size=48, seed=3, smooth=True)
    fake = _images(tmp_path / "fake", 5, size=48, seed=4, smooth=True)
    out = tmp_path / "c.json"
    assert cli.main(["gen-metrics", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                     "--metric", "clip-fid", "--clip-weights", str(weights), "--device", "cpu",
                     "--out", str(out)]) == 0
    value = json.loads(out.read_text())["results"][0]["value"]

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

    def feats(images):  # the whole image resized to the tower's 32-px input, CLIP-normalised
        x = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy()).float() / 255
        x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False,
                                            antialias=True).clamp(0, 1)
        with torch.no_grad():
            return model.encode_image((x - mean) / std).double().numpy()

    assert value == pytest.approx(direct_fid(feats(real), feats(fake)), abs=1e-6, rel=1e-6)


def test_clip_weights_that_are_not_an_open_clip_vit_are_one_line_errors(tmp_path, capsys):
    _images(tmp_path / "real", 2, size=32)
    _images(tmp_path / "fake", 2, size=32, seed=1)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    base = ["gen-metrics", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--device", "cpu",
            "--metric", "clip-fid"]
    assert cli.main(base) == 2 and "--clip-weights" in capsys.readouterr().err
    assert cli.main(base + ["--clip-weights", str(tmp_path / "other.pt")]) == 2
    assert "open_clip" in capsys.readouterr().err


def test_embedding_per_patch_equals_a_per_patch_loop(tmp_path):
    from sklearn.metrics.pairwise import cosine_similarity

    real = _images(tmp_path / "real", 2, size=64, seed=10, smooth=True)
    (tmp_path / "fake").mkdir()
    rng = np.random.default_rng(11)
    fake = [np.clip(r.astype(int) + rng.integers(-40, 40, r.shape), 0, 255).astype(np.uint8) for r in real]
    for i, f in enumerate(fake):
        Image.fromarray(f).save(tmp_path / "fake" / f"img{i:02d}.png")
    out = tmp_path / "p.json"
    assert cli.main(["gen-metrics", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                     "--metric", "embedding", "--per-patch", "--patch-size", "32", "--encoder", "toy",
                     "--encoder-dim", "8", "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"][0]
    per_pair, every = {}, []
    for i, (r, f) in enumerate(zip(real, fake)):
        sims = []
        for y in range(0, 64, 32):
            for x in range(0, 64, 32):
                a = _toy_features([r[y:y + 32, x:x + 32]])
                b = _toy_features([f[y:y + 32, x:x + 32]])
                sims.append(cosine_similarity(a, b)[0, 0])
        per_pair[f"img{i:02d}"] = np.mean(sims)
        every += sims
    assert res["value"] == pytest.approx(np.mean(every), rel=1e-5) and res["n"] == 8
    assert {i["item"]: i["value"] for i in res["items"]} == pytest.approx(per_pair, rel=1e-5)
