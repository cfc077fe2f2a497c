"""Hostile option values over every command that takes them: seeds outside 0..2^63-1, a name that would leave
its folder (``--encoder-name ../../x``), a class list that repeats, an unknown layout prefix, ``heatmap --out``
with a suffix that is not PNG, a timestep outside the schedule, a non-weights-only checkpoint for
``train-cdm --resume``, and ``sample --cdm`` with a CDM of another ZoomLDM or a magnification it never saw.
Each is one ``error:`` line naming the value, exit 2, and no file written."""

from __future__ import annotations

import json
import pickle

import pytest

import cli
from hostile import one_error, snapshot
from test_config_system import EXAMPLES

pytestmark = pytest.mark.usefixtures("one_thread")


def _seed_options() -> list[tuple[str, str]]:
    """(command, option) for every seed option of every command (found from the parser)."""
    out = []
    for path, leaf in cli._leaf_parsers(cli.build_parser(), ()):
        for action in leaf._actions:
            dest = action.dest
            if dest == "seed" or dest.endswith("_seed") or dest == "seeds" or dest.endswith("_seeds"):
                out.append((" ".join(path), action.option_strings[0]))
    return sorted(set(out))


SEEDS = _seed_options()


def test_every_command_with_a_seed_is_covered():
    commands = {c for c, _ in SEEDS}
    assert {"sample", "train-mil", "train-cdm", "extract", "synth", "splits simil", "generate-large"} <= commands


@pytest.mark.parametrize("command, option", SEEDS)
@pytest.mark.parametrize("value", [str(2**63), str(2**64 + 5), "-1"])
def test_a_seed_out_of_range_is_one_line_for_every_command(command, option, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = list(EXAMPLES.get(command, command.split())) + [option, value]
    line = one_error(argv, capsys)
    assert f"bad {option} {value}" in line and "2^63-1" in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../../x", "a/b", ".hidden", "..", "x" * 200, "a\\b"])
def test_a_name_that_would_leave_its_folder_is_refused(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = one_error(["export", "feats", "--format", "trident", "--encoder-name", name, "--out", "o"], capsys)
    assert "--encoder-name" in line and "no path separators" in line, line
    assert list(tmp_path.iterdir()) == []


def _class_commands() -> list[str]:
    return sorted({" ".join(path) for path, leaf in cli._leaf_parsers(cli.build_parser(), ())
                   if "--classes" in leaf._option_string_actions})


def test_the_class_commands_are_found():
    assert "train-mil" in _class_commands() and len(_class_commands()) >= 2


@pytest.mark.parametrize("command", _class_commands())
def test_a_class_list_that_repeats_says_so(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = list(EXAMPLES.get(command, command.split())) + ["--classes", "0,1,0"]
    line = one_error(argv, capsys)
    assert "--classes '0,1,0'" in line and "repeats '0'" in line, line
    assert list(tmp_path.iterdir()) == []


def _feature_commands() -> list[str]:
    return sorted(c for c, argv in EXAMPLES.items() if "--features" in argv and "@" in argv[argv.index("--features") + 1])


@pytest.mark.parametrize("command", _feature_commands())
def test_an_unknown_layout_prefix_is_named_for_every_command(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = list(EXAMPLES[command])
    i = argv.index("--features") + 1
    argv[i] = "clamm:" + argv[i]
    line = one_error(argv, capsys)
    assert "unknown feature layout 'clamm'" in line and "not found" not in line, line


@pytest.mark.parametrize("out", ["x.jpgx", "x.jpg", "x"])
def test_heatmap_out_must_be_png(out, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = list(EXAMPLES["heatmap"])
    argv[argv.index("--out") + 1] = out
    line = one_error(argv, capsys)
    assert f"--out {out}" in line and ".png" in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["1001", "-1"])
def test_refine_t0_outside_the_schedule(value, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((512, 512, 3), 180, np.uint8)).save(tmp_path / "s.png")
    line = one_error(["generate-large", "--zoomldm", "tiny", "--slide", str(tmp_path / "s.png"), "--mpp", "0.5",
                      "--mag", "10x", "--method", "joint", "--conditioner", "toy", "--refine-t0", value, "--out", str(tmp_path / "o")],
                     capsys)
    assert f"bad --refine-t0 {value}" in line and "0..1000" in line, line
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- CDM
from test_cdm_pipeline import RUNTIME, TINY_DIT, cohort, contexts, trainset, zoomldm_weights  # noqa: E402,F401


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.slow
def test_train_cdm_resume_from_a_pickle_is_one_line(contexts, tmp_path, capsys):  # noqa: F811
    bad = tmp_path / "evil.ckpt"
    import torch

    torch.save({"state_dict": {}, "evil": _Evil()}, bad, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    before = snapshot(contexts)
    line = one_error(["train-cdm", "--data", str(contexts), "--out", str(tmp_path / "r"), "--max-steps", "1",
                      "--resume", str(bad), *TINY_DIT, *RUNTIME], capsys)
    assert str(bad) in line and "weights-only load refuses" in line, line
    assert "unpickled!" not in capsys.readouterr().out
    assert snapshot(contexts) == before


@pytest.fixture(scope="module")
def cdm_run(contexts, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("cdm_run") / "run"
    assert cli.main(["train-cdm", "--data", str(contexts), "--out", str(out), "--max-steps", "1", *TINY_DIT,
                     *RUNTIME]) == 0
    return out


@pytest.mark.slow
def test_sample_with_a_cdm_of_another_zoomldm_or_an_unseen_mag(cdm_run, zoomldm_weights, tmp_path, capsys):  # noqa: F811
    import torch

    from zoomfeat.model import build_zoomldm
    from zoomfeat.resolve import tiny_config_path

    record = json.loads((cdm_run / "train_cdm_config.json").read_text())
    seen = record["mags_seen"]
    assert seen and json.loads(record["cdm"]["data_settings"])["zoomldm_weights_sha256"]
    unseen = next(m for m in ("20x", "10x", "5x", "2.5x", "1.25x") if m not in seen)
    base = ["sample", "--zoomldm", "tiny", "--cdm", str(cdm_run), "--n", "1", "--steps", "1", "--cdm-steps", "2",
            "--device", "cpu"]
    torch.manual_seed(99)
    other = tmp_path / "other.ckpt"
    build_zoomldm(tiny_config_path()).save_official(other)
    line = one_error([*base, "--weights", str(other), "--mag", seen[0], "--out", str(tmp_path / "a")], capsys)
    assert "another ZoomLDM" in line and "other.ckpt" in line, line
    line = one_error([*base, "--weights", str(zoomldm_weights), "--mag", unseen, "--out", str(tmp_path / "b")],
                     capsys)
    assert f"never saw {unseen}" in line, line
    assert not list(tmp_path.rglob("*.png"))
    assert cli.main([*base, "--weights", str(zoomldm_weights), "--mag", seen[0], "--out", str(tmp_path / "c")]) == 0
