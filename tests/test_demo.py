"""`zoomfeat demo` end to end on a very small cohort: every public command runs, in order, as a user would."""

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

import cli
from zoomfeat.demo import FEATURE_SETS, DemoConfig, stages
from zoomfeat.errors import ConfigError


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self._in = [], False

    def handle_starttag(self, tag, attrs):
        self._in = tag in ("td", "th")

    def handle_endtag(self, tag):
        self._in = False

    def handle_data(self, data):
        if self._in and data.strip():
            self.cells.append(data.strip())


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "out"
    argv = ["demo", "--out", str(out), "--slides", "20", "--size", "2048", "--seed", "3",
            "--train-steps", "6", "--mil-epochs", "2"]
    assert cli.main(argv) == 0
    return out


def test_demo_writes_the_comparison_page_with_every_feature_set(demo_dir, capsys):
    index = demo_dir / "report" / "index.html"
    parser = _Cells()
    parser.feed(index.read_text())
    text = " ".join(parser.cells)
    for row in ("zoomldm@20x", "zoomldm@5x", "zoomldm@20x+5x", "toy@20x"):
        assert row in text
    comparison = json.loads((demo_dir / "report" / "compare.json").read_text())
    assert len(json.dumps(comparison)) > 100
    for name, _, _ in FEATURE_SETS:
        summary = (demo_dir / "runs" / name / "summary.csv").read_text()
        assert summary.count("\n") >= 5  # five folds + mean/std rows
        assert (demo_dir / "runs" / name / "report" / "report.html").exists()


def test_demo_runs_the_public_commands_in_order_and_its_features_verify(demo_dir, capsys):
    cfg = DemoConfig(out=demo_dir, slides=20, size=2048, seed=3, train_steps=6, mil_epochs=2)
    commands = [argv[0] for _, argv in stages(cfg)]
    assert commands[:7] == ["synth", "tile", "prepare-train", "train", "extract", "extract", "splits"]
    assert len(list((demo_dir / "features" / "zoomldm").glob("*.h5"))) == 20
    assert cli.main(["verify", str(demo_dir / "features" / "zoomldm")]) == 0


def test_demo_refuses_a_cohort_too_small_for_its_folds():
    with pytest.raises(ConfigError, match="--slides 10 gives 6 patients.* at least 19"):
        DemoConfig(slides=10)
