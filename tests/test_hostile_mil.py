"""Hostile input over the MIL-evaluation and training commands: train-mil, splits, report, compare, train.

Every case runs the real CLI dispatcher on a bad input and asserts what a user must get: the exit status, exactly
one ``error:`` line that names the problem, no traceback, and nothing else lost or changed (every existing file
keeps its bytes; a new output folder gets no finished fold, no summary and no temporary file). Cases are built
from one small synthetic cohort and one finished run (real HDF5, real Lightning), made once per module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cli
from hostile import one_error, snapshot
from mil_data import planted_cohort, write_feature_file
from splits.io import make_fold, write_splits_dir

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- fixtures
def _train_mil_args(paths: dict, out: Path, *extra: str) -> list[str]:
    return ["train-mil", "--features", f"{paths['features']}@20x", "--labels", str(paths["labels"]),
            "--splits", str(paths["splits"]), "--out", str(out), "--model", "mean", "--model-kwargs",
            '{"hidden": 4}', "--epochs", "1", "--lr", "1e-2", *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 12-slide cohort (2 folds) and a finished 1-epoch run on it; tests copy what they change."""
    root = tmp_path_factory.mktemp("hostile")
    paths = planted_cohort(root / "cohort", n_slides=12, dim=4, sizes=(4, 7), folds=3)
    assert cli.main(_train_mil_args(paths, root / "run")) == 0
    return {**paths, "run": root / "run"}


@pytest.fixture
def work(base, tmp_path):
    """A private copy of the cohort and the finished run."""
    shutil.copytree(base["run"].parent / "cohort", tmp_path / "cohort")
    shutil.copytree(base["run"], tmp_path / "run")
    c = tmp_path / "cohort"
    return {"features": c / "feats", "labels": c / "labels.csv", "splits": c / "splits", "run": tmp_path / "run",
            "root": tmp_path}


def _no_partial_output(out: Path) -> None:
    """A refused or failed train-mil run into a new folder leaves no finished fold, summary or temp file."""
    if not out.exists():
        return
    names = [p.name for p in out.rglob("*")]
    assert not any(n in ("metrics.json", "summary.csv", "model.ckpt", "predictions.csv") for n in names), names
    assert not any(".tmp" in n for n in names), names


# ---------------------------------------------------------------------------------------------- train-mil
def _nan_slide(w):
    """A feature file another tool wrote with NaN rows (the store refuses to write one, so it is edited in place)."""
    import h5py

    path = write_feature_file(w["features"], "S000", np.ones((5, 4), np.float32))
    with h5py.File(path, "a") as f:
        f["20x/features"][...] = np.nan
    return _train_mil_args(w, w["root"] / "new"), ["S000", "NaN|non-finite"]


def _inf_weight_decay(w):
    return _train_mil_args(w, w["root"] / "new", "--weight-decay", "inf"), ["fold 0", "not finite|non-finite|nan"]


def _negative_hidden(w):
    argv = _train_mil_args(w, w["root"] / "new")
    argv[argv.index("--model-kwargs") + 1] = '{"hidden": -5}'
    return argv, ["--model-kwargs", "hidden"]


def _unknown_kwarg(w):
    argv = _train_mil_args(w, w["root"] / "new")
    argv[argv.index("--model-kwargs") + 1] = '{"hidden": 4, "depth": 3}'
    return argv, ["--model-kwargs", "depth"]


def _devices_zero(w):
    return _train_mil_args(w, w["root"] / "new", "--devices", "0"), ["--devices", "0"]


def _single_class_train(w):
    labels = pd.read_csv(w["labels"])
    neg, pos = labels[labels.label == "IDC"].slide_id.tolist(), labels[labels.label == "ILC"].slide_id.tolist()
    write_splits_dir([make_fold(0, neg[:4], neg[4:5] + pos[:1], neg[5:] + pos[1:])], w["root"] / "sp1",
                     source="t", command="t")
    return _train_mil_args({**w, "splits": w["root"] / "sp1"}, w["root"] / "new"), ["fold 0", "same class"]


def _empty_test(w):
    labels = pd.read_csv(w["labels"]).slide_id.tolist()
    write_splits_dir([make_fold(0, labels[:9], labels[9:], [])], w["root"] / "sp2", source="t", command="t")
    return _train_mil_args({**w, "splits": w["root"] / "sp2"}, w["root"] / "new"), ["fold 0", "test part"]


def _truncated_h5(w):
    path = w["features"] / "S003.h5"
    path.write_bytes(path.read_bytes()[:300])
    return _train_mil_args(w, w["root"] / "new"), ["S003"]


def _garbage_h5(w):
    (w["features"] / "S004.h5").write_bytes(os.urandom(2048))
    return _train_mil_args(w, w["root"] / "new"), ["S004"]


def _labels_changed_in_place(w):
    labels = pd.read_csv(w["labels"])
    labels.loc[0, "label"] = "ILC" if labels.loc[0, "label"] == "IDC" else "IDC"
    labels.to_csv(w["labels"], index=False)
    return _train_mil_args(w, w["run"], "--folds", "0,1,2"), ["labels file content"]


def _features_changed_in_place(w):
    write_feature_file(w["features"], "S005", np.ones((6, 4), np.float32))
    return _train_mil_args(w, w["run"]), ["feature file", "S005"]


def _other_seed_on_resume(w):
    return _train_mil_args(w, w["run"], "--seed", "7"), ["seeds 0 -> 7"]


def _out_is_a_file(w):
    (w["root"] / "afile").write_text("x")
    return _train_mil_args(w, w["root"] / "afile"), ["afile"]


def _labels_missing_column(w):
    pd.read_csv(w["labels"]).drop(columns=["label"]).to_csv(w["root"] / "l.csv", index=False)
    return _train_mil_args({**w, "labels": w["root"] / "l.csv"}, w["root"] / "new"), ["label"]


def _accelerator_tpu9(w):
    return _train_mil_args(w, w["root"] / "new", "--accelerator", "tpu9"), ["tpu9"]


def _out_holds_a_foreign_config(w):
    foreign = w["root"] / "weights"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"hidden_size": 768, "model_type": "vit"}')
    return _train_mil_args(w, foreign), ["not a train-mil run folder"]


TRAIN_MIL_CASES = {"accelerator tpu9": _accelerator_tpu9, "out holds a foreign config.json": _out_holds_a_foreign_config,
    "nan features": _nan_slide, "weight decay inf": _inf_weight_decay, "hidden -5": _negative_hidden,
    "unknown model kwarg": _unknown_kwarg, "devices 0": _devices_zero, "single-class train": _single_class_train,
    "empty test": _empty_test, "truncated h5": _truncated_h5, "garbage h5": _garbage_h5,
    "labels changed": _labels_changed_in_place, "features changed": _features_changed_in_place,
    "other seed on resume": _other_seed_on_resume, "out is a file": _out_is_a_file,
    "labels without label column": _labels_missing_column,
}


@pytest.mark.parametrize("case", sorted(TRAIN_MIL_CASES))
@pytest.mark.slow
def test_train_mil_hostile(case, work, capsys):
    argv, needles = TRAIN_MIL_CASES[case](work)
    before = snapshot(work["run"], work["splits"], *[p for p in [work["root"] / "weights"] if p.exists()])
    line = one_error(argv, capsys)
    for needle in needles:
        assert re.search(needle, line, re.IGNORECASE), line
    assert snapshot(work["run"], work["splits"], *[p for p in [work["root"] / "weights"] if p.exists()]) == before
    _no_partial_output(work["root"] / "new")


def test_a_moved_project_resumes_without_retraining(work, capsys):
    """``work`` is a copy of the cohort and the run in another folder: same content, other paths."""
    folds = snapshot(*sorted(work["run"].glob("fold_*")))
    assert cli.main(_train_mil_args(work, work["run"])) == 0
    assert snapshot(*sorted(work["run"].glob("fold_*"))) == folds


def test_a_rerun_removes_temp_files_of_a_killed_run_and_keeps_fresh_ones(work):
    old = work["run"] / "fold_1" / f".model.ckpt.tmp{10**7 + 3}"
    old.write_bytes(b"half a checkpoint")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    fresh = work["run"] / "fold_2" / f".predictions.csv.tmp{10**7 + 4}"
    fresh.write_text("a write in progress")
    assert cli.main(_train_mil_args(work, work["run"])) == 0
    assert not old.exists() and fresh.exists()


def test_a_fold_claimed_by_another_run_is_left_to_it(work):
    """Two train-mil processes on one folder share the folds: a fold another (live) process has claimed is
    not trained here; once its claim is gone, a rerun trains it."""
    from zoomfeat.store import Claim

    out = work["root"] / "shared"
    other = Claim(out, "fold_1")
    assert other.acquire()  # held by a live process (this one, through another claim object)
    try:
        assert cli.main(_train_mil_args(work, out)) == 0
        assert sorted(p.parent.name for p in out.glob("fold_*/metrics.json")) == ["fold_0", "fold_2"]
    finally:
        other.release()
    assert cli.main(_train_mil_args(work, out)) == 0
    assert sorted(p.parent.name for p in out.glob("fold_*/metrics.json")) == ["fold_0", "fold_1", "fold_2"]
    assert not list((out / ".claims").glob("*.lock"))


# ---------------------------------------------------------------------------------------------- report / compare
def _report_missing(w):
    return ["report", str(w["root"] / "nope")], ["nope"]


def _report_on_a_file(w):
    (w["root"] / "f.txt").write_text("x")
    return ["report", str(w["root"] / "f.txt")], ["f.txt"]


def _report_garbage_record(w):
    (w["run"] / "config.json").write_text("{not json")
    return ["report", str(w["run"]), "--out", str(w["root"] / "rep")], ["config.json"]


def _report_foreign_record(w):
    (w["run"] / "config.json").write_text(json.dumps({"format": "something-else"}))
    return ["report", str(w["run"]), "--out", str(w["root"] / "rep")], ["not a train-mil run record"]


def _report_nan_prediction(w):
    path = w["run"] / "fold_1" / "predictions.csv"
    frame = pd.read_csv(path)
    frame.loc[frame.index[-1], "prob_ILC"] = np.nan
    frame.to_csv(path, index=False)
    return ["report", str(w["run"]), "--out", str(w["root"] / "rep")], ["prob_ILC", "fold_1"]


def _report_negative_bootstrap(w):
    return ["report", str(w["run"]), "--n-bootstrap", "-1"], ["--n-bootstrap"]


def _report_out_is_a_file(w):
    (w["root"] / "repfile").write_text("x")
    return ["report", str(w["run"]), "--out", str(w["root"] / "repfile")], ["repfile"]


def _compare_other_splits(w):
    other = w["root"] / "run2"
    shutil.copytree(w["run"], other)
    record = json.loads((other / "config.json").read_text())
    record["split_fingerprints"]["1"] = "0" * 64
    (other / "config.json").write_text(json.dumps(record))
    return ["compare", str(w["run"]), str(other), "--out", str(w["root"] / "cmp")], ["folds 1 differ"]


def _compare_other_classes(w):
    other = w["root"] / "run2"
    shutil.copytree(w["run"], other)
    record = json.loads((other / "config.json").read_text())
    record["label_map"] = {"ILC": 0, "IDC": 1}
    (other / "config.json").write_text(json.dumps(record))
    return ["compare", str(w["run"]), str(other), "--out", str(w["root"] / "cmp")], ["classes"]


def _compare_missing_run(w):
    return ["compare", str(w["run"]), str(w["root"] / "ghost"), "--out", str(w["root"] / "cmp")], ["ghost"]


REPORT_CASES = {
    "report missing run": _report_missing, "report on a file": _report_on_a_file,
    "report garbage record": _report_garbage_record, "report foreign record": _report_foreign_record,
    "report nan prediction": _report_nan_prediction, "report negative bootstrap": _report_negative_bootstrap,
    "report out is a file": _report_out_is_a_file, "compare other splits": _compare_other_splits,
    "compare other classes": _compare_other_classes, "compare missing run": _compare_missing_run,
}


@pytest.mark.parametrize("case", sorted(REPORT_CASES))
def test_report_and_compare_hostile(case, work, capsys):
    argv, needles = REPORT_CASES[case](work)
    before = snapshot(work["run"])
    line = one_error(argv, capsys)
    assert all(n in line for n in needles), line
    assert snapshot(work["run"]) == before
    for name in ("rep", "cmp"):
        out = work["root"] / name
        assert not out.exists() or not any(p.is_file() for p in out.rglob("*")), list(out.rglob("*"))


def test_bad_checkpoint_is_one_line_for_heatmap_and_library(work, capsys):
    from mil.cv import load_fold_model
    from zoomfeat.errors import CheckpointError

    real = (work["run"] / "fold_0" / "model.ckpt").read_bytes()
    for content in (b"", b"not a checkpoint at all\n", os.urandom(4096), real[: len(real) // 2]):
        (work["run"] / "fold_0" / "model.ckpt").write_bytes(content)
        with pytest.raises(CheckpointError, match="model.ckpt"):
            load_fold_model(work["run"], 0)


# ---------------------------------------------------------------------------------------------- splits
def _hipt_like(w) -> tuple[Path, Path]:
    labels = pd.read_csv(w["labels"]).rename(columns={"label": "oncotree_code"})
    labels.to_csv(w["root"] / "hipt.csv", index=False)
    return w["splits"], w["root"] / "hipt.csv"


def _hipt_unknown_class(w):
    splits, labels = _hipt_like(w)
    return ["splits", "hipt", "--splits-dir", str(splits), "--labels", str(labels), "--out", str(w["root"] / "o"),
            "--classes", "IDC,XYZ"], ["XYZ"], 2


def _hipt_one_class(w):
    splits, labels = _hipt_like(w)
    return ["splits", "hipt", "--splits-dir", str(splits), "--labels", str(labels), "--out", str(w["root"] / "o"),
            "--classes", "IDC"], ["two classes"], 2


def _audit_missing_labels(w):
    return ["splits", "audit", str(w["splits"]), "--labels", str(w["root"] / "none.csv")], ["none.csv"], 2


def _simil_bad_fraction(w):
    return ["splits", "simil", "--labels", str(w["labels"]), "--out", str(w["root"] / "o"), "--test-frac", "2"], \
        ["test"], 2


def _make_one_fold(w):
    return ["splits", "make", "--labels", str(w["labels"]), "--out", str(w["root"] / "o"), "--folds", "1"], \
        ["folds"], 2


def _make_over_other_splits(w):
    return ["splits", "make", "--labels", str(w["labels"]), "--out", str(w["splits"]), "--folds", "3",
            "--seed", "5"], ["already holds other splits"], 2


SPLITS_CASES = {"make over other splits": _make_over_other_splits, "hipt unknown class": _hipt_unknown_class, "hipt one class": _hipt_one_class,
                "audit missing labels": _audit_missing_labels, "simil bad fraction": _simil_bad_fraction,
                "make one fold": _make_one_fold}


@pytest.mark.parametrize("case", sorted(SPLITS_CASES))
def test_splits_hostile(case, work, capsys):
    argv, needles, code = SPLITS_CASES[case](work)
    before = snapshot(work["splits"])
    line = one_error(argv, capsys, code)
    assert all(n in line for n in needles), line
    assert snapshot(work["splits"]) == before
    assert not (work["root"] / "o").exists() or not any((work["root"] / "o").iterdir())


@pytest.mark.parametrize("bad", ["empty test", "single-class train"])
def test_audit_strict_fails_on_untrainable_folds(bad, work, capsys):
    ids = pd.read_csv(work["labels"])
    neg, pos = ids[ids.label == "IDC"].slide_id.tolist(), ids[ids.label == "ILC"].slide_id.tolist()
    fold = (make_fold(0, neg[:3] + pos[:3], neg[3:4] + pos[3:4], []) if bad == "empty test"
            else make_fold(0, neg[:4], pos[:1], neg[4:] + pos[1:]))
    write_splits_dir([fold], work["root"] / "sp", source="t", command="t")
    argv = ["splits", "audit", str(work["root"] / "sp"), "--labels", str(work["labels"])]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert ("test part has no" in out) if bad == "empty test" else ("same class" in out), out
    assert cli.main([*argv, "--strict"]) == 1
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------- train
def _train_devices_zero(w):
    return ["train", "--data", str(w["root"]), "--zoomldm", "tiny", "--out", str(w["root"] / "t"),
            "--accelerator", "cpu", "--devices", "0"], ["--devices"]


def _train_bad_precision(w):
    return ["train", "--data", str(w["root"]), "--zoomldm", "tiny", "--out", str(w["root"] / "t"),
            "--accelerator", "cpu", "--devices", "1", "--precision", "bf99"], ["precision"]


def _train_not_a_trainset(w):
    return ["train", "--data", str(w["root"]), "--zoomldm", "tiny", "--out", str(w["root"] / "t"),
            "--accelerator", "cpu", "--devices", "1"], ["index.h5"]


def _train_garbage_resume(w):
    (w["root"] / "bad.ckpt").write_bytes(os.urandom(1000))
    return ["train", "--data", str(w["root"]), "--zoomldm", "tiny", "--out", str(w["root"] / "t"),
            "--accelerator", "cpu", "--devices", "1", "--resume", str(w["root"] / "bad.ckpt")], ["bad.ckpt"]


def _train_text_resume(w):
    (w["root"] / "notes.ckpt").write_text("a text file\n")
    return ["train", "--data", str(w["root"]), "--zoomldm", "tiny", "--out", str(w["root"] / "t"),
            "--accelerator", "cpu", "--devices", "1", "--resume", str(w["root"] / "notes.ckpt")], ["notes.ckpt"]


def _train_unknown_accelerator(w):
    return ["train", "--data", str(w["root"]), "--zoomldm", "tiny", "--out", str(w["root"] / "t"),
            "--accelerator", "tpu9", "--devices", "1"], ["tpu9"]


TRAIN_CASES = {"devices 0": _train_devices_zero, "accelerator tpu9": _train_unknown_accelerator, "precision bf99": _train_bad_precision,
               "not a training set": _train_not_a_trainset, "garbage resume": _train_garbage_resume,
               "text resume": _train_text_resume}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_hostile(case, work, capsys):
    argv, needles = TRAIN_CASES[case](work)
    line = one_error(argv, capsys)
    assert all(n in line for n in needles), line
    assert not (work["root"] / "t").exists() or not any(p.is_file() for p in (work["root"] / "t").rglob("*"))


# ---------------------------------------------------------------------------------------------- Ctrl-C
@pytest.mark.slow
def test_ctrl_c_in_train_mil_prints_interrupted_and_exits_130(work, capsys, monkeypatch):
    """A real SIGINT to this process one second into training (Lightning catches it and calls sys.exit(1)
    unless zoomfeat turns it back into KeyboardInterrupt): 'interrupted', exit 130, no finished or temp files."""
    import threading

    import mil.cv

    real_write = mil.cv.write_record
    done = threading.Event()
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever was left installed

    def keep_interrupting() -> None:  # SIGINT after 1 s, then every 5 s while the run goes on (at most 12)
        for wait in (1.0, *[5.0] * 11):
            if done.wait(wait):
                return
            os.kill(os.getpid(), signal.SIGINT)

    def write_then_arm(run_dir, record):  # training starts right after the record is written
        path = real_write(run_dir, record)
        threading.Thread(target=keep_interrupting, daemon=True).start()
        return path

    monkeypatch.setattr(mil.cv, "write_record", write_then_arm)
    out = work["root"] / "new"
    try:
        assert cli.main(_train_mil_args(work, out, "--epochs", "100000")) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run leaves it as it found it
    finally:
        done.set()
        signal.signal(signal.SIGINT, saved)
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err
    _no_partial_output(out)


@pytest.mark.slow
def test_real_sigint_and_no_third_party_noise(base, tmp_path):
    """A real SIGINT to a train-mil process: 'interrupted', exit 130, no temp file; a normal run prints no
    Lightning tips, litlogger, eval-mode or pytree lines."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "cli", *_train_mil_args(base, tmp_path / "quiet")], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    third_party = re.compile(r"💡|litlogger|LitLogger|eval mode|pytree|LeafSpec|GPU available|TPU available|"
                             r"Trainer\.fit|[A-Za-z]+Warning:|warnings\.warn|rank_zero|lightning", re.IGNORECASE)
    noise = [line for line in ok.stderr.splitlines() if third_party.search(line)]
    assert not noise, noise
    out = tmp_path / "long"
    # SIGINT at its default in the child even when this process was started with it ignored (a shell's
    # background job): Python then installs its KeyboardInterrupt handler as it does in a terminal
    proc = subprocess.Popen([sys.executable, "-m", "cli", *_train_mil_args(base, out, "--epochs", "100000")],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not (out / "config.json").is_file() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err
    _no_partial_output(out)


# ---------------------------------------------------------------------------------------------- --help
@pytest.mark.parametrize("command", ["train-mil", "train", "report", "compare", "splits hipt", "splits simil",
                                     "splits make", "splits audit"])
def test_every_option_says_what_it_does_and_its_default(command):
    """Each option's help names its default (or says it is required); numbers say their unit or range."""
    import argparse

    path = command.split()
    parser = cli.build_parser(only=path[0])
    for name in path:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings or action.dest in ("config", "set"):
            continue
        text = action.help or ""
        assert len(text) > 15, (command, action.option_strings)
        assert "default" in text or "required" in text, (command, action.option_strings, text)
