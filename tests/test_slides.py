import numpy as np
import pytest
from conftest import require_shared
from helpers_slides import synthetic_slide  # noqa: F401

from zoomfeat.errors import ConfigError, SlideError
from zoomfeat.slides import Slide, find_slides, resolve_scale

FIX = ("fixtures", "openslide-python")


@pytest.mark.parametrize(
    "props, base_mag, mpp, expected",
    [
        ({"openslide.objective-power": "40", "openslide.mpp-x": "0.25"}, None, None, (40.0, "objective-power", 0.25, "mpp")),
        ({"openslide.mpp-x": "0.26"}, None, None, (40.0, "mpp", 0.26, "mpp")),
        ({"openslide.mpp-x": "0.9"}, None, None, (10.0, "mpp", 0.9, "mpp")),
        ({"openslide.mpp-x": "352.8"}, 20, None, (20.0, "--base-mag", None, "missing")),
        ({"openslide.objective-power": "40"}, None, 0.5, (20.0, "--mpp", 0.5, "--mpp")),
    ],
)
def test_resolve_scale(props, base_mag, mpp, expected, tmp_path):
    assert resolve_scale(props, tmp_path, base_mag, mpp) == expected


def test_resolve_scale_errors(tmp_path):
    with pytest.raises(SlideError, match="--base-mag.*--mpp"):
        resolve_scale({"openslide.mpp-x": "352.8"}, tmp_path, None, None)
    with pytest.raises(ConfigError, match="--mpp"):
        resolve_scale({}, tmp_path, None, 5.0)


@pytest.mark.slow
def test_read_patch_geometry_and_antialiasing(synthetic_slide):
    info = synthetic_slide(size=2048, label=1)
    with Slide(info.path) as slide:
        assert slide.info.base_magnification == 20 and slide.info.magnification_source == "objective-power"
        assert slide.info.base_mpp == pytest.approx(0.5) and slide.info.vendor == "aperio"
        assert slide.downsample(5) == 4
        fine = slide.read_patch(512, 512, 20.0)
        coarse = slide.read_patch(512, 512, 5.0)
        assert fine.shape == coarse.shape == (256, 256, 3) and fine.dtype == np.uint8
        # the 5x patch's top-left quarter shows the same place as the 20x patch, box-averaged
        quarter = coarse[:64, :64].astype(np.float32)
        pooled = fine.reshape(64, 4, 64, 4, 3).mean((1, 3))
        assert np.abs(quarter - pooled).mean() < 12
        outside = slide.read_patch(1920, 1920, 20.0)  # half outside the slide -> white there
        assert (outside[200:, 200:] == 255).all()
        assert slide.thumbnail(128).shape == (128, 128, 3)


def test_fixture_slides():
    small = require_shared(*FIX, "small.svs")
    with Slide(small) as slide:
        assert (slide.info.width, slide.info.height) == (16, 16)
        assert slide.info.base_magnification == 20
    with pytest.raises(SlideError, match="cannot be opened"):
        Slide(require_shared(*FIX, "unopenable.tiff"))
    with Slide(require_shared(*FIX, "unreadable.svs")) as slide, pytest.raises(SlideError, match="damaged"):
        slide.read_patch(0, 0, 20.0)
    boxes = require_shared(*FIX, "boxes.tiff")
    with pytest.raises(SlideError, match="--mpp"):
        Slide(boxes)
    with Slide(boxes, mpp=0.5) as slide:
        assert slide.info.base_magnification == 20 and slide.info.mpp_source == "--mpp"


def test_find_slides(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.tiff").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in find_slides([tmp_path])] == ["a.svs", "b.tiff"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no slides found"):
        find_slides([empty])
    with pytest.raises(ConfigError, match="does not exist"):
        find_slides([tmp_path / "missing.svs"])


def test_duplicate_slide_ids_are_refused_naming_both_paths(tmp_path):
    for folder in ("site_a", "site_b"):
        (tmp_path / folder).mkdir()
    (tmp_path / "site_a" / "TCGA-01.svs").write_bytes(b"x")
    (tmp_path / "site_b" / "TCGA-01.tiff").write_bytes(b"y")
    (tmp_path / "site_b" / "TCGA-02.svs").write_bytes(b"z")
    with pytest.raises(ConfigError) as err:
        find_slides([tmp_path])
    message = str(err.value)
    assert "'TCGA-01'" in message and str(tmp_path / "site_a" / "TCGA-01.svs") in message
    assert str(tmp_path / "site_b" / "TCGA-01.tiff") in message
    # the same file named twice (a file and its folder, or ./ and an absolute path) is one slide, not a clash
    again = find_slides([tmp_path / "site_b", tmp_path / "site_b" / "TCGA-02.svs", tmp_path / "site_b" / "." /
                         "TCGA-02.svs"])
    assert [p.name for p in again] == ["TCGA-01.tiff", "TCGA-02.svs"]


@pytest.mark.slow
def test_objective_power_disagreeing_with_mpp_warns_once(tmp_path, caplog):
    """AppMag 40 with MPP 0.5 (really about 20x): one warning through the zoomfeat logger, AppMag kept."""
    import logging

    from zoomfeat.synthetic import write_synthetic_slide

    path = write_synthetic_slide(tmp_path / "mismatch.svs", size=1024, app_mag=40, mpp=0.5).path
    agree = write_synthetic_slide(tmp_path / "agree.svs", size=1024, app_mag=20, mpp=0.5).path
    with caplog.at_level(logging.WARNING, logger="zoomfeat"):
        for _ in range(2):
            with Slide(path) as slide:
                assert slide.info.base_magnification == 40 and slide.info.magnification_source == "objective-power"
        with Slide(agree):
            pass
    warnings = [r.getMessage() for r in caplog.records if r.name == "zoomfeat"]
    assert len(warnings) == 1 and "objective power 40x disagrees with its mpp 0.5 um/px (about 20x)" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zoomfeat"), Slide(path, mpp=0.5):
        pass  # an explicit override: no warning
    assert not caplog.records


@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_info_on_a_missing_file_or_a_folder_says_so(tmp_path, capsys, kind):
    import cli

    target = tmp_path / ("nope.svs" if kind == "missing" else "a_folder")
    if kind == "folder":
        target.mkdir()
    assert cli.main(["info", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "whole-slide image" not in err[0]
    assert ("no such file" in err[0]) if kind == "missing" else ("is a folder, not a slide file" in err[0])
