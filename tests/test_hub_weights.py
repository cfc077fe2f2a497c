"""Weights by name (issue 36): hub references and registered names resolve offline from a Hugging Face cache.

The caches here are written by the test in the client's own on-disk layout (``models--ORG--NAME/blobs``,
``refs/main``, ``snapshots/<commit>/<path>`` links to blobs named by their sha256 or git sha1), checked
against ``huggingface_hub`` itself, from the tiny test models. Nothing touches the network: the conftest sets
``HF_HUB_OFFLINE=1``, and the online paths (gated repository, fetch-weights) replace the client's download
function.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

import cli
from tests.conftest import require_shared

COMMIT = "1" * 40
MOVED = "2" * 40


def _blob_name(data: bytes, lfs: bool) -> str:
    """The client's blob name: the sha256 of an LFS file, the git blob sha1 of a small (git) file."""
    if lfs:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def put(cache: Path, repo: str, files: dict[str, bytes], commit: str = COMMIT, ref: str | None = "main") -> Path:
    """Write ``files`` (repo-relative path -> contents) into ``cache`` as the hub client does; the snapshot."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    for rel, data in files.items():
        blob = folder / "blobs" / _blob_name(data, lfs=not rel.endswith((".yaml", ".json")))
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty cache under a temporary HF_HOME, offline."""
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf" / "hub"


@pytest.fixture(scope="module")
def tiny():
    return require_shared("golden", "zoomldm_tiny")


def _tiny_files(tiny: Path, folder: str = "brca") -> dict[str, bytes]:
    return {f"{folder}/config.yaml": (tiny / "config.yaml").read_bytes(),
            f"{folder}/weights.ckpt": (tiny / "weights.ckpt").read_bytes()}


def _one_error(argv, capsys) -> str:
    assert cli.main([str(a) for a in argv]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# -- the cache layout and resolution -------------------------------------------------------------------------

def test_the_fake_cache_is_the_clients_own_layout(hub_cache):
    """huggingface_hub itself finds the files this test writes (the oracle for every cache below)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    snapshot = put(hub_cache, "org/model", {"sub/config.yaml": b"a: 1\n", "sub/weights.ckpt": b"x" * 100})
    assert try_to_load_from_cache("org/model", "sub/weights.ckpt", cache_dir=hub_cache) == \
        str(snapshot / "sub" / "weights.ckpt")
    assert hf_hub_download("org/model", "config.yaml", subfolder="sub", cache_dir=hub_cache,
                           local_files_only=True) == str(snapshot / "sub" / "config.yaml")


def test_references_resolve_to_the_snapshot_files(hub_cache):
    from zoomfeat.encoders.specs import encoder_weights, parse_conditioner
    from zoomfeat.resolve import resolve_zoomldm

    brca = put(hub_cache, "StonyBrook-CVLab/ZoomLDM", {"brca/config.yaml": b"model: {}\n",
                                                       "brca/weights.ckpt": b"w" * 64})
    for ref in ("zoomldm-brca", "hf-hub:StonyBrook-CVLab/ZoomLDM/brca", "hf-hub:StonyBrook-CVLab/ZoomLDM/brca@main",
                f"hf-hub:StonyBrook-CVLab/ZoomLDM/brca@{COMMIT}"):
        source = resolve_zoomldm(ref)
        assert (source.config, source.weights) == (brca / "brca" / "config.yaml", brca / "brca" / "weights.ckpt")
    # a reference to the file itself, as --weights
    source = resolve_zoomldm("hf-hub:StonyBrook-CVLab/ZoomLDM/brca/config.yaml",
                             "hf-hub:StonyBrook-CVLab/ZoomLDM/brca/weights.ckpt")
    assert source.weights == brca / "brca" / "weights.ckpt"
    uni = put(hub_cache, "MahmoodLab/UNI", {"pytorch_model.bin": b"u" * 64})
    assert parse_conditioner("uni=uni") == ("uni", str(uni / "pytorch_model.bin"))
    assert parse_conditioner("uni=hf-hub:MahmoodLab/UNI") == ("uni", str(uni / "pytorch_model.bin"))
    # Phikon: the weight file, with its config.json fetched beside it; the first present of its alternatives
    phikon = put(hub_cache, "owkin/phikon", {"config.json": b"{}", "pytorch_model.bin": b"p" * 64})
    assert encoder_weights("phikon", "phikon") == phikon / "pytorch_model.bin"
    assert (phikon / "config.json").is_file()
    # a local path is untouched, even one named like a registered name
    assert encoder_weights("uni", "weights/uni") == Path("weights/uni")


def test_train_init_from_zoomldm_and_cdm_take_references(hub_cache, tmp_path):
    """``train`` (model.zoomldm, model.init_from) and ``sample --cdm`` resolve at the boundary to cache files."""
    import argparse

    from zoomfeat.commands.sample import cdm_request
    from zoomfeat.resolve import tiny_config_path, zoomldm_config_path
    from zoomfeat.train.config import load_train_config

    snapshot = put(hub_cache, "StonyBrook-CVLab/ZoomLDM", {"brca/config.yaml": tiny_config_path().read_bytes(),
                                                           "brca/weights.ckpt": b"\x80" + b"w" * 63,
                                                           "cdm/dit.pt": b"\x80" + b"c" * 63})
    cfg = load_train_config({"model.zoomldm": "zoomldm-brca", "model.init_from": "zoomldm-brca"})
    assert cfg.model.init_from == snapshot / "brca" / "weights.ckpt"
    assert zoomldm_config_path(cfg.model.zoomldm) == snapshot / "brca" / "config.yaml"
    args = argparse.Namespace(cdm="hf-hub:StonyBrook-CVLab/ZoomLDM/cdm/dit.pt", slide=None, x=None, y=None,
                              tiles=None, conditioning=None, cdm_steps=10, cdm_guidance=1.0, cdm_seed=0,
                              mag="1.25x", batch_size=2)
    assert cdm_request(args, 4).extra["cdm"] == snapshot / "cdm" / "dit.pt"


def test_registered_names_match_the_encoders_weight_files():
    """Each encoder name's hub files are files its loader accepts (the registry and the specs agree)."""
    from zoomfeat.encoders.specs import SPECS
    from zoomfeat.hub import KNOWN

    for name in ("uni", "phikon", "dinov2"):
        weights = KNOWN[name].files[-1]
        assert set(weights) <= set(SPECS[name].weight_files)
        assert {e[0] for e in KNOWN[name].files[:-1]} == set(SPECS[name].config_files)


# -- same outputs from the cache as from the local paths -------------------------------------------------------

@pytest.fixture(scope="module")
def small_slides(tmp_path_factory):
    from zoomfeat.synthetic import write_synthetic_slide

    folder = tmp_path_factory.mktemp("hub_slides")
    write_synthetic_slide(folder / "s1.svs", size=512, seed=1, label=0)
    return folder


def _extract(slides, out, zoomldm, *extra):
    return cli.main(["extract", str(slides), "--out", str(out), "--zoomldm", str(zoomldm), "--conditioner", "toy",
                     "--mags", "20x", "--device", "cpu", "--batch-size", "16", "--workers", "0", *map(str, extra)])


def _features(out):
    with h5py.File(out / "s1.h5", "r") as f:
        return {g: f[g]["features"][:] for g in ("20x",)}


def test_extract_with_a_hub_reference_equals_local_paths_and_records_the_commit(
        hub_cache, tiny, small_slides, tmp_path, capsys, one_thread):
    put(hub_cache, "test-org/zoomldm-tiny", _tiny_files(tiny))
    assert _extract(small_slides, tmp_path / "local", tiny) == 0
    assert _extract(small_slides, tmp_path / "hub", "hf-hub:test-org/zoomldm-tiny/brca") == 0
    local, hub = _features(tmp_path / "local"), _features(tmp_path / "hub")
    assert all(np.array_equal(local[g], hub[g]) for g in local) and local["20x"].size > 0
    record = json.loads((tmp_path / "hub" / "extract_config.json").read_text())
    sources = json.dumps(record)
    assert '"repository": "test-org/zoomldm-tiny"' in sources and f'"revision": "{COMMIT}"' in sources
    assert '"file": "brca/weights.ckpt"' in sources
    assert "weights_sources" not in (tmp_path / "local" / "extract_config.json").read_text()

    # `main` moved to a commit with other weights (a fetch-weights after an upstream update): refused on resume
    import torch

    state = torch.load(tiny / "weights.ckpt", map_location="cpu", weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + 1.0
    moved = tmp_path / "moved.ckpt"
    torch.save(state, moved)
    files = _tiny_files(tiny)
    files["brca/weights.ckpt"] = moved.read_bytes()
    put(hub_cache, "test-org/zoomldm-tiny", files, commit=MOVED)
    capsys.readouterr()
    err = _one_error(["extract", small_slides, "--out", tmp_path / "hub", "--zoomldm",
                      "hf-hub:test-org/zoomldm-tiny/brca", "--conditioner", "toy", "--mags", "20x",
                      "--device", "cpu", "--workers", "0"], capsys)
    assert "other settings" in err and "checkpoint" in err
    # pinned to the old commit, the same command resumes (nothing left to do)
    assert _extract(small_slides, tmp_path / "hub", f"hf-hub:test-org/zoomldm-tiny/brca@{COMMIT}") == 0


def test_an_edited_or_cut_cache_file_is_never_taken(hub_cache, tmp_path, capsys):
    from zoomfeat.errors import CheckpointError
    from zoomfeat.resolve import resolve_zoomldm

    snapshot = put(hub_cache, "org/m", {"config.yaml": b"model: {}\n", "weights.ckpt": b"w" * 4096})
    blob = (snapshot / "weights.ckpt").resolve()
    blob.write_bytes(b"w" * 1000)  # a download cut short, kept under the whole file's name
    with pytest.raises(CheckpointError, match="does not match its hash"):
        resolve_zoomldm("hf-hub:org/m")


@pytest.mark.usefixtures("generate_tiny")
def test_sample_and_generate_large_with_a_hub_reference_equal_local_paths(hub_cache, tmp_path, one_thread):
    from helpers_generate import DATA
    from zoomfeat.synthetic import write_synthetic_slide

    put(hub_cache, "test-org/gen-tiny", {"config.yaml": (DATA / "config.yaml").read_bytes(),
                                         "weights.ckpt": (DATA / "weights.ckpt").read_bytes()})
    slide = write_synthetic_slide(tmp_path / "gen.svs", size=2048, label=1, seed=3).path
    runs = {
        "sample": ["--x", "512", "--y", "512", "--n", "2", "--steps", "10", "--seed", "5"],
        "generate-large": ["--method", "grid", "--steps", "5", "--seed", "1"],
    }
    for command, extra in runs.items():
        images = {}
        for kind, model in (("local", DATA), ("hub", "hf-hub:test-org/gen-tiny")):
            out = tmp_path / f"{command}-{kind}"
            assert cli.main([command, "--zoomldm", str(model), "--conditioner", "toy", "--mag", "10x",
                             "--device", "cpu", "--batch-size", "4", "--slide", str(slide), *extra,
                             "--out", str(out)]) == 0
            images[kind] = {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}
            manifest = json.loads((out / "manifest.json").read_text())
        assert images["local"] and images["local"] == images["hub"], command
        assert manifest["model"]["weights_sources"]["checkpoint"]["repository"] == "test-org/gen-tiny"


# -- one line with the fix -------------------------------------------------------------------------------------

def test_a_missing_cached_model_is_one_line_naming_repository_files_and_command(hub_cache, tmp_path, capsys):
    err = _one_error(["extract", tmp_path, "--out", tmp_path / "o", "--zoomldm", "zoomldm-brca",
                      "--conditioner", "toy"], capsys)
    assert "StonyBrook-CVLab/ZoomLDM" in err and "brca/config.yaml, brca/weights.ckpt" in err
    assert "zoomfeat fetch-weights zoomldm-brca" in err and "HF_HUB_OFFLINE" in err
    err = _one_error(["extract", tmp_path, "--out", tmp_path / "o", "--encoder", "uni", "--weights",
                      "hf-hub:MahmoodLab/UNI@v1"], capsys)
    assert "MahmoodLab/UNI at v1: pytorch_model.bin" in err
    assert "zoomfeat fetch-weights hf-hub:MahmoodLab/UNI@v1" in err


def test_a_gated_model_without_a_token_is_one_line(hub_cache, tmp_path, monkeypatch, capsys):
    """The client's GatedRepoError (what an unauthorised download of MahmoodLab/UNI raises)."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    calls = []

    def gated(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
        raise GatedRepoError("403 Client Error. Cannot access gated repo",
                             response=httpx2.Response(403, request=httpx2.Request("HEAD", url)))

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    for argv in (["extract", tmp_path, "--out", tmp_path / "o", "--encoder", "uni", "--weights", "uni"],
                 ["fetch-weights", "uni"]):
        err = _one_error(argv, capsys)
        assert "MahmoodLab/UNI is gated" in err and "accept its licence on https://huggingface.co/MahmoodLab/UNI" in err
        assert "HF_TOKEN" in err
    assert calls == [("MahmoodLab/UNI", "pytorch_model.bin")] * 2


@pytest.mark.parametrize("value, expect", [
    ("zoomldm-bcra", "not a known weights name (dinov2, phikon, uni, zoomldm-brca, zoomldm-naip)"),
    ("hf-hub:ZoomLDM", "malformed hub reference: use hf-hub:ORG/NAME[/SUBFOLDER_OR_FILE][@REVISION]"),
    ("hf-hub:org/name/../x", "malformed hub reference"),
    ("hf-hub:org/name@", "malformed hub reference"),
])
def test_unknown_names_and_malformed_references_are_one_line(hub_cache, tmp_path, capsys, value, expect):
    err = _one_error(["extract", tmp_path, "--out", tmp_path / "o", "--zoomldm", value, "--conditioner", "toy"],
                     capsys)
    assert expect in err


def test_ctranspath_has_no_hub_repository(hub_cache, tmp_path, capsys):
    err = _one_error(["extract", tmp_path, "--out", tmp_path / "o", "--encoder", "ctranspath", "--weights",
                      "ctranspath"], capsys)
    assert "no official Hugging Face Hub repository" in err and "ctranspath.pth" in err


# -- fetch-weights ---------------------------------------------------------------------------------------------

def test_fetch_weights_downloads_only_the_needed_files_and_prints_where(hub_cache, monkeypatch, capsys):
    """With the client's download replaced by one that fills the cache as the client does, fetch-weights asks
    for the registered files only, prints their paths, and a later offline run finds them without a call."""
    import huggingface_hub

    asked = []

    def download(repo_id, filename, *, revision=None, cache_dir=None, **kwargs):
        asked.append((repo_id, filename, revision))
        snapshot = put(Path(cache_dir), repo_id, {filename: f"contents of {filename}\n".encode()})
        return str(snapshot / filename)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert cli.main(["fetch-weights", "zoomldm-naip"]) == 0
    out = capsys.readouterr().out
    assert asked == [("StonyBrook-CVLab/ZoomLDM", "naip/config.yaml", None),
                     ("StonyBrook-CVLab/ZoomLDM", "naip/weights.ckpt", None)]
    snapshot = hub_cache / "models--StonyBrook-CVLab--ZoomLDM" / "snapshots" / COMMIT
    assert f"StonyBrook-CVLab/ZoomLDM at commit {COMMIT}" in out and str(snapshot / "naip" / "weights.ckpt") in out

    from zoomfeat.resolve import resolve_zoomldm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", None)  # any call would fail
    assert resolve_zoomldm("zoomldm-naip").weights == snapshot / "naip" / "weights.ckpt"


def test_fetch_weights_list_names_every_registered_model(capsys):
    assert cli.main(["fetch-weights", "--list"]) == 0
    out = capsys.readouterr().out
    for text in ("zoomldm-brca", "StonyBrook-CVLab/ZoomLDM/brca", "MahmoodLab/UNI", "gated", "owkin/phikon",
                 "timm/vit_large_patch14_reg4_dinov2.lvd142m", "ctranspath"):
        assert text in out
