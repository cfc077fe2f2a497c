import csv
import json

import numpy as np
import openslide
import pytest
from helpers_slides import synthetic_slide  # noqa: F401

from zoomfeat.errors import ConfigError
from zoomfeat.synthetic import write_cohort, write_synthetic_slide


def test_aperio_slide_opens_as_aperio_with_scale(synthetic_slide):
    info = synthetic_slide(size=2048, label=1)
    slide = openslide.OpenSlide(str(info.path))
    assert slide.properties["openslide.vendor"] == "aperio"
    assert float(slide.properties["openslide.objective-power"]) == 20
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    assert slide.level_dimensions == ((2048, 2048), (512, 512))
    assert slide.level_downsamples == pytest.approx((1.0, 4.0))
    assert "thumbnail" in slide.associated_images


def test_generic_tiff_has_mpp_from_resolution(synthetic_slide):
    info = synthetic_slide(size=1024, label=0, fmt="tiff")
    slide = openslide.OpenSlide(str(info.path))
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-3)
    assert "openslide.objective-power" not in slide.properties


def test_signal_boxes_only_for_label_1_and_darker(synthetic_slide):
    positive = synthetic_slide(size=2048, label=1)
    negative = synthetic_slide(size=2048, label=0)
    assert negative.signal_boxes_level0 == []
    assert len(positive.signal_boxes_level0) == 2
    x0, y0, x1, y1 = positive.signal_boxes_level0[0]
    assert 0 <= x0 < x1 <= 2048 and 0 <= y0 < y1 <= 2048
    slide = openslide.OpenSlide(str(positive.path))
    box = np.asarray(slide.read_region((x0, y0), 0, (x1 - x0, y1 - y0)).convert("RGB"), np.float32)
    tissue = box.max(2) - box.min(2) > 40  # saturated = tissue
    assert tissue.mean() > 0.2
    # signal = more dark (nucleus/epithelium) pixels among tissue than plain tissue has
    dark = box.mean(2) < 150
    assert dark[tissue].mean() > 0.05


def test_same_seed_same_pixels(tmp_path):
    a = write_synthetic_slide(tmp_path / "a.svs", size=512, label=1, seed=3)
    b = write_synthetic_slide(tmp_path / "b.svs", size=512, label=1, seed=3)
    assert a.signal_boxes_level0 == b.signal_boxes_level0
    ra = np.asarray(openslide.OpenSlide(str(a.path)).read_region((0, 0), 0, (512, 512)))
    rb = np.asarray(openslide.OpenSlide(str(b.path)).read_region((0, 0), 0, (512, 512)))
    assert np.array_equal(ra, rb)


def test_bad_parameters_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="format"):
        write_synthetic_slide(tmp_path / "x.svs", size=512, fmt="ndpi")
    with pytest.raises(ConfigError, match="multiple of 64"):
        write_synthetic_slide(tmp_path / "x.svs", size=1000)
    with pytest.raises(ConfigError, match="signal scale"):
        write_synthetic_slide(tmp_path / "x.svs", size=512, signal_scales=("10x",))


def test_cohort_tables(tmp_path):
    out = write_cohort(tmp_path / "cohort", n=4, size=512, seed=1, slides_per_patient=2)
    rows = list(csv.DictReader(open(out / "labels.csv")))
    assert [r["case_id"] for r in rows] == ["case-000", "case-000", "case-001", "case-001"]
    assert [r["label"] for r in rows] == ["0", "0", "1", "1"]
    signal = json.loads((out / "signal.json").read_text())
    assert set(signal) == {r["slide_id"] for r in rows}
    assert all((out / f"{r['slide_id']}.svs").is_file() for r in rows)
    assert signal[rows[0]["slide_id"]] == [] and len(signal[rows[2]["slide_id"]]) == 2


def test_cohort_slides_per_patient_pattern_gives_some_patients_several_slides(tmp_path):
    import pandas as pd

    from zoomfeat.synthetic import patient_slide_counts

    assert patient_slide_counts(7, (1, 2, 3)) == [1, 2, 3, 1]
    assert patient_slide_counts(4, 2) == [2, 2]
    out = write_cohort(tmp_path / "cohort", n=6, size=256, seed=1, slides_per_patient=(1, 2, 3))
    labels = pd.read_csv(out / "labels.csv")
    assert labels.groupby("case_id").size().tolist() == [1, 2, 3]
    assert labels.groupby("case_id")["label"].nunique().eq(1).all()
    assert sorted(p.stem for p in out.glob("*.svs")) == sorted(labels["slide_id"])
