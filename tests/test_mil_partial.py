"""A partial ``train-mil`` run (issue 37): ``report``, ``compare`` and ``heatmap`` check the folds present against
the run record and refuse a run missing some, in one line, unless ``--allow-partial``; then what they write names
the missing folds."""

from __future__ import annotations

import json
import shutil

import pytest

import cli
from test_report import fabricate_run


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.fixture
def partial(tmp_path):
    """A 5-fold run (a schema-2 record naming folds 0-4) whose fold_3 folder was deleted, and a complete one."""
    run = fabricate_run(tmp_path / "run")
    shutil.rmtree(run / "fold_3")
    return run, fabricate_run(tmp_path / "other", seed=1)


def test_report_compare_and_heatmap_refuse_a_partial_run_in_one_line(partial, tmp_path, capsys):
    run, other = partial
    for argv in (["report", str(run)], ["compare", str(other), str(run), "--out", str(tmp_path / "cmp")],
                 ["heatmap", str(run), str(tmp_path / "slide.svs"), "--fold", "0"]):
        assert cli.main(argv) == 2, argv
        line = _one_error_line(capsys)
        assert f"{run} is a partial run: fold 3 of its 5 recorded (seed, fold) pairs missing" in line, line
        assert "--allow-partial" in line and f"zoomfeat train-mil --out {run}" in line
    assert not (run / "report").exists() and not (tmp_path / "cmp").exists()


def test_allow_partial_names_the_missing_fold_in_every_output(partial, tmp_path, capsys):
    run, other = partial
    assert cli.main(["report", str(run), "--allow-partial", "--n-bootstrap", "0"]) == 0
    assert "fold 3 of the 5 recorded (seed, fold) pairs missing" in capsys.readouterr().out
    saved = json.loads((run / "report" / "report.json").read_text())
    assert saved["missing"] == [[0, 3]] and [m["fold"] for m in saved["folds"]] == [0, 1, 2, 4]
    for name in ("report.md", "report.html"):
        text = (run / "report" / name).read_text()
        assert "Partial run: fold 3 of the 5 recorded" in text and "partial run: 1 recorded" in text, name

    out = tmp_path / "cmp"
    assert cli.main(["compare", str(other), str(run), "--out", str(out), "--allow-partial", "--n-bootstrap", "0"]) == 0
    printed = capsys.readouterr().out
    assert "fold 3 of the 5 recorded" in printed and "over 4 (seed, fold) pairs" in printed
    for name in ("compare.md", "compare.html"):
        text = (out / name).read_text()
        assert "Partial run: fold 3 of the 5 recorded" in text and "partial: seed 0 fold 3" in text, name
    (pair,) = json.loads((out / "compare.json").read_text())["comparisons"]
    assert pair["n_pairs"] == 4 and pair["folds"] == [0, 1, 2, 4] and pair["n_unpaired"] == 1

    assert cli.main(["heatmap", str(run), str(tmp_path / "absent.svs"), "--allow-partial"]) == 2  # no such slide
    assert f"{run}: Partial run: fold 3 of the 5 recorded" in capsys.readouterr().out


@pytest.mark.slow
def test_heatmap_of_a_real_partial_run_with_allow_partial(tmp_path, tmp_path_factory, capsys):
    from test_heatmap import build_cohort, real_runs

    run = tmp_path / "run"
    shutil.copytree(real_runs(tmp_path_factory.getbasetemp())[0], run)
    shutil.rmtree(run / "fold_1")
    slide = str(build_cohort(tmp_path_factory.getbasetemp())["slide"])
    capsys.readouterr()  # the runs' own output, when this test is the first to build them
    assert cli.main(["heatmap", str(run), slide, "--fold", "0"]) == 2
    assert "fold 1 of its 2 recorded" in _one_error_line(capsys)
    assert cli.main(["heatmap", str(run), slide, "--fold", "0", "--allow-partial", "--out", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    assert "Partial run: fold 1 of the 2 recorded" in out and (tmp_path / "h.png").is_file()


def test_resume_trains_what_is_missing_and_refuses_folds_the_record_does_not_plan(tmp_path):
    """Resume checks the folds present against the record: a fold folder of a fold outside the split folder
    (another run's) is refused before any training."""
    from mil.config import MILConfig, make_protocol
    from mil.cv import run_cv
    from mil_data import planted_cohort
    from zoomfeat.errors import ConfigError

    paths = planted_cohort(tmp_path / "c", n_slides=12, dim=4, sizes=(3, 5), folds=3)
    cfg = MILConfig(features=f"{paths['features']}@20x", labels=str(paths["labels"]), splits=str(paths["splits"]),
                    out=str(tmp_path / "run"), model="mean", model_kwargs={"hidden": 4},
                    protocol=make_protocol("hipt", epochs=1), folds=(0,))
    run_cv(cfg)
    shutil.copytree(tmp_path / "run" / "fold_0", tmp_path / "run" / "fold_7")
    with pytest.raises(ConfigError, match=r"fold folders this run does not plan \(fold_7\)"):
        run_cv(cfg)
