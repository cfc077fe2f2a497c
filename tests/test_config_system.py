"""The one config system: every command takes --config/--set, validates it up front, saves and reruns it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

import cli

# One valid command line per leaf command. A command added to cli.COMMANDS without an example here fails
# `test_every_command_has_an_example`, so the round trip below covers every command.
EXAMPLES: dict[str, list[str]] = {
    "info": ["info", "slide.svs", "--json"],
    "synth": ["synth", "--out", "cohort", "--n", "3", "--seed", "4"],
    "tile": ["tile", "a.svs", "b_dir", "--out", "tiles", "--mags", "20x,5x", "--min-tissue", "0.4"],
    "verify": ["verify", "tiles"],
    "fit-first-stage": ["fit-first-stage", "s.svs", "--tiles", "t", "--out", "fs.ckpt"],
    "generate-slide": ["generate-slide", "--slide", "s.svs", "--zoomldm", "tiny", "--out", "syn.tiff"],
    "fetch-weights": ["fetch-weights", "zoomldm-brca", "--files", "config.yaml"],
    "extract": ["extract", "slides", "--out", "feats", "--encoder", "toy", "--mags", "20x", "--batch-size", "8"],
    "export": ["export", "feats", "--format", "clam", "--out", "clam"],
    "feature-copies": ["feature-copies", "--features", "f", "--conditioning", "c", "--zoomldm", "tiny", "--out", "o",
                   "--copies", "3"],
    "prepare-train": ["prepare-train", "slides", "--out", "ts", "--conditioner", "toy"],
    "prepare-cdm": ["prepare-cdm", "--data", "ts", "--zoomldm", "tiny", "--weights", "w.ckpt", "--out", "ctx"],
    "train": ["train", "--data", "ts", "--zoomldm", "tiny", "--out", "run", "--max-steps", "3", "--set",
              "optim.p_uncond=0.2", "--no-val-samples"],
    "train-cdm": ["train-cdm", "--data", "ctx", "--out", "run", "--set", "model.depth=2", "--max-steps", "10"],
    "splits hipt": ["splits", "hipt", "--splits-dir", "s", "--labels", "l.csv", "--out", "o"],
    "splits simil": ["splits", "simil", "--labels", "l.csv", "--out", "o", "--folds", "3"],
    "splits make": ["splits", "make", "--labels", "l.csv", "--out", "o", "--folds", "4", "--mode", "repeated"],
    "splits audit": ["splits", "audit", "sp", "--labels", "l.csv", "--strict"],
    "train-mil": ["train-mil", "--features", "f@20x", "--labels", "l.csv", "--splits", "s", "--out", "r"],
    "report": ["report", "run"],
    "compare": ["compare", "r1", "r2", "--out", "cmp"],
    "heatmap": ["heatmap", "--run", "r", "--fold", "0", "--slide", "s.svs", "--features", "f@20x", "--out", "h.png"],
    "demo": ["demo", "--out", "d", "--seed", "3"],
    "sample": ["sample", "--zoomldm", "tiny", "--slide", "s.svs", "--mag", "5x", "--n", "4", "--out", "o"],
    "generate-large": ["generate-large", "--zoomldm", "tiny", "--slide", "s.svs", "--mag", "10x", "--method",
                       "joint", "--out", "o"],
    "invert": ["invert", "img.png", "--mag", "5x", "--zoomldm", "tiny", "--out", "g.h5"],
    "superres": ["superres", "img.png", "--mag", "5x", "--zoomldm", "tiny", "--out", "sr.png"],
    "gen-metrics": ["gen-metrics", "--real", "r", "--fake", "f", "--metric", "psnr,ssim"],
}
OWN_CONFIG = {"config"}  # config show is the viewer


def _leaf_commands() -> list[str]:
    parser = cli.build_parser()
    names = []
    for name in cli.COMMANDS:
        if name in OWN_CONFIG:
            continue
        sub = next(a for a in parser._actions if a.dest == "command").choices[name]
        names += [" ".join(path) for path, _ in cli._leaf_parsers(sub, (name,))]
    return names


def _flat(config: dict) -> dict:
    return {k: v for section in config.values() if isinstance(section, dict) for k, v in section.items()}


def _namespace(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("config", "set", "_run", "_config_system")}


def test_every_command_has_an_example():
    missing = sorted(set(_leaf_commands()) - set(EXAMPLES))
    assert not missing, f"add a command line for {missing} to EXAMPLES"


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_saved_config_resolves_to_the_same_arguments(command, tmp_path):
    args, path, config = cli.resolve(EXAMPLES[command])
    assert " ".join(path) == command and config["command"] == command
    saved = tmp_path / "saved.config.yaml"
    saved.write_text(yaml.safe_dump(config, sort_keys=False))
    again, _, config_again = cli.resolve(list(path) + ["--config", str(saved)])
    assert _namespace(again) == _namespace(args)
    assert config_again == config


def test_precedence_defaults_file_set_flags(tmp_path):
    saved = tmp_path / "c.yaml"
    saved.write_text(yaml.safe_dump({"options": {"n": 5, "seed": 7, "size": 4096}}))
    args, _, _ = cli.resolve(["synth", "--out", "x", "--config", str(saved), "--set", "options.seed=9",
                              "--set", "size=1024", "--n", "2"])
    assert (args.n, args.seed, args.size) == (2, 9, 1024)  # flag > --set > file
    args, _, _ = cli.resolve(["synth", "--out", "x", "--config", str(saved)])
    assert (args.n, args.seed, args.size, args.format) == (5, 7, 4096, "aperio")  # file > defaults


def test_flat_keys_and_positionals_from_a_file(tmp_path):
    saved = tmp_path / "c.yaml"
    saved.write_text(yaml.safe_dump({"slides": ["s1", "s2"], "out": "o", "mags": "20x"}))
    args, _, config = cli.resolve(["tile", "--config", str(saved)])
    assert args.slides == ["s1", "s2"] and args.out == "o" and args.mags == "20x"
    assert config["inputs"]["slides"] == ["s1", "s2"]


@pytest.mark.parametrize("argv, fragment", [
    (["synth", "--out", "x", "--set", "bogus=1"], "unknown key 'bogus'"),
    (["synth", "--out", "x", "--set", "nosuch.n=1"], "unknown section"),
    (["synth", "--out", "x", "--set", "n=many"], "'many' is not valid"),
    (["synth", "--out", "x", "--set", "format=png"], "not one of aperio, tiff"),
    (["synth", "--out", "x", "--set", "n"], "use section.key=value"),
    (["synth", "--out", "x", "--config", "/nonexistent/c.yaml"], "no such file"),
])
def test_bad_config_values_are_one_line_errors(argv, fragment, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0]


def test_a_config_of_another_command_is_refused(tmp_path, capsys):
    _, _, config = cli.resolve(EXAMPLES["tile"])
    saved = tmp_path / "tile.config.yaml"
    saved.write_text(yaml.safe_dump(config))
    assert cli.main(["synth", "--out", "x", "--config", str(saved)]) == 2
    assert "is a config of `zoomfeat tile`" in capsys.readouterr().err


def test_garbage_config_file_is_one_line(tmp_path, capsys):
    saved = tmp_path / "c.yaml"
    saved.write_bytes(b"\x00\xff\x10 : : [")
    assert cli.main(["synth", "--out", "x", "--config", str(saved)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid YAML" in err[0]


def test_config_show_prints_the_resolved_config(capsys):
    assert cli.main(["config", "show", "splits", "make", "--labels", "l.csv", "--out", "o", "--set", "folds=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    flat = _flat(shown)
    assert shown["command"] == "splits make" and flat["folds"] == 3 and flat["mode"] == "kfold"


def test_a_run_saves_its_config_and_the_saved_config_reruns_it(tmp_path, monkeypatch):
    """synth + tile, then tile again from the saved file into another folder: the same grids."""
    from zoomfeat.store import read_grid

    monkeypatch.chdir(tmp_path)
    assert cli.main(["synth", "--out", "cohort", "--n", "2", "--size", "2048", "--seed", "1"]) == 0
    assert cli.main(["tile", "cohort", "--out", "tiles", "--mags", "20x,5x", "--min-tissue", "0.3"]) == 0
    saved = tmp_path / "tiles" / "tile.config.yaml"
    config = yaml.safe_load(saved.read_text())
    assert config["command"] == "tile" and _flat(config)["min_tissue"] == 0.3
    assert cli.main(["tile", "--config", str(saved), "--set", "out=tiles2"]) == 0
    for h5 in sorted((tmp_path / "tiles").glob("*.h5")):
        a, b = read_grid(h5), read_grid(tmp_path / "tiles2" / h5.name)
        assert a.names == b.names
        for name in a.names:
            np.testing.assert_array_equal(a.coords[name], b.coords[name])
    rerun = yaml.safe_load((tmp_path / "tiles2" / "tile.config.yaml").read_text())
    assert {**_flat(rerun), "out": "tiles"} == _flat(config)


def test_failed_user_error_does_not_overwrite_a_saved_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["synth", "--out", "c", "--n", "2", "--size", "2048"]) == 0
    before = (tmp_path / "c" / "synth.config.yaml").read_text()
    assert cli.main(["synth", "--out", "c", "--n", "2", "--size", "1000"]) == 2  # not a multiple of 64
    assert (tmp_path / "c" / "synth.config.yaml").read_text() == before


def test_config_options_are_in_every_command_help():
    for command in ("synth", "tile", "extract"):
        result = subprocess.run([sys.executable, "-m", "cli", command, "--help"], capture_output=True, text=True)
        assert "--config FILE" in result.stdout and "--set SECTION.KEY=VALUE" in result.stdout


@pytest.mark.slow
def test_saved_configs_rerun_a_whole_study_to_the_same_numbers(tmp_path, monkeypatch):
    """synth -> extract -> splits make -> train-mil, each run once from flags and once from the config it saved
    (only --out changed, with --set): the reruns give the same features, splits and predictions."""
    import pandas as pd

    from zoomfeat.store import FeatureFile

    monkeypatch.chdir(tmp_path)
    first = {"synth": ["synth", "--out", "c", "--n", "8", "--size", "2048", "--seed", "2"],
             "extract": ["extract", "c", "--out", "f", "--encoder", "toy", "--mags", "20x", "--batch-size", "16"],
             "splits make": ["splits", "make", "--labels", "c/labels.csv", "--out", "s", "--folds", "2",
                             "--seed", "1"],
             "train-mil": ["train-mil", "--features", "f@20x", "--labels", "c/labels.csv", "--splits", "s", "--out",
                           "r", "--task", "custom", "--model", "mean", "--epochs", "2"]}
    saved = {"synth": "c/synth.config.yaml", "extract": "f/extract.config.yaml",
             "splits make": "s/splits-make.config.yaml", "train-mil": "r/train-mil.config.yaml"}
    for command, argv in first.items():
        assert cli.main(argv) == 0, command
    for command in first:
        path = tmp_path / saved[command]
        assert path.exists(), sorted(p.name for p in path.parent.iterdir())
        out = {"synth": "c2", "extract": "f2", "splits make": "s2", "train-mil": "r2"}[command]
        assert cli.main([*command.split(), "--config", str(path), "--set", f"out={out}"]) == 0, command
    for slide in sorted((tmp_path / "f").glob("*.h5")):
        with FeatureFile(slide) as a, FeatureFile(tmp_path / "f2" / slide.name) as b:
            np.testing.assert_array_equal(a.features("20x"), b.features("20x"))
    assert sorted(p.name for p in (tmp_path / "c").glob("*.svs")) == sorted(p.name for p in (tmp_path / "c2").glob("*.svs"))
    for fold in sorted((tmp_path / "s").glob("*.csv")):
        assert fold.read_text() == (tmp_path / "s2" / fold.name).read_text()
    a = pd.concat(pd.read_csv(p) for p in sorted((tmp_path / "r").glob("fold_*/predictions.csv")))
    b = pd.concat(pd.read_csv(p) for p in sorted((tmp_path / "r2").glob("fold_*/predictions.csv")))
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    assert len(a) > 0
