"""``prepare_contexts``: a prepare-train set -> the Summarizer contexts the CDM learns (``zoomfeat prepare-cdm``).

Every patch of the set gives one row: its raw conditioning grid, preprocessed as ZoomLDM training does
(pooled to 8x8, standardised per location), summarised with its magnification by the checkpoint's
Summarizer without classifier-free dropout, as the official ``train_cdm.py`` computes its training inputs.
Rows are streamed to the store in the set's order (magnification-major) in batches; an interrupted run
resumes where it stopped (see :mod:`zoomfeat.store.contexts`). Magnifications are balanced when training
samples batches (uniformly over magnifications), not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from zoomfeat import hub
from zoomfeat.cdm.config import PrepareCDMConfig
from zoomfeat.errors import DataError


def label_vectors(labels_csv: Path, slide_of_row: np.ndarray, slide_ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """One-hot rows [N, L] of each row's slide label (columns = sorted labels), and the label names."""
    from zoomfeat.labels import read_labels

    table = read_labels(labels_csv, required=("slide_id",))
    by_slide = dict(zip(table["slide_id"], table["label"]))
    missing = sorted(set(slide_ids) - set(by_slide))
    if missing:
        raise DataError(f"{labels_csv} has no label for slide {missing[0]} ({len(missing)} missing): "
                        "add a slide_id,label row for every slide of the training set")
    names = sorted({by_slide[s] for s in slide_ids})
    column = np.array([names.index(by_slide[s]) for s in slide_ids], dtype=np.int64)
    return np.eye(len(names), dtype=np.float32)[column[slide_of_row]], names


def _settings(cfg: PrepareCDMConfig, source, runtime, n: int, labels: list[str]) -> str:
    from zoomfeat.resolve import file_sha256

    data = Path(cfg.data)
    return json.dumps({
        "trainset": str(data.resolve()), "trainset_index_sha256": file_sha256(data / "index.h5"),
        "zoomldm_config_sha256": file_sha256(source.config), "zoomldm_weights_sha256": file_sha256(source.weights),
        "precision": runtime.precision, "rows": n, "labels": labels,
        "labels_sha256": file_sha256(cfg.labels),
        **hub.weights_sources(checkpoint=source.weights, config=source.config),
    }, sort_keys=True)


def _load_model(cfg: PrepareCDMConfig, runtime):
    from zoomfeat.model import load_zoomldm
    from zoomfeat.resolve import resolve_zoomldm

    source = resolve_zoomldm(cfg.zoomldm, cfg.weights, require_weights=True)
    model = load_zoomldm(source.config, source.weights, use_ema=False, device=runtime.device).eval()
    return source, model


def _check_set(data, model) -> None:
    if data.grid_channels != int(model.conditioning_dim):
        raise DataError(f"{data.root}: grids have {data.grid_channels} channels but the Summarizer takes "
                        f"{model.conditioning_dim}: use the ZoomLDM (and conditioner) the set was prepared for")


def _contexts(model, batch: dict, runtime) -> np.ndarray:
    """Summarizer outputs float32 [B, 65, D] of one collated batch of the set (raw grids + magnifications)."""
    import torch

    with torch.inference_mode(), runtime.autocast()():
        grids = [model.preprocess_ssl(g.to(runtime.device)) for g in batch["grids"]]
        return model.summarize(grids, batch["mags"].to(runtime.device)).float().cpu().numpy()


def _batches(data, start: int, cfg: PrepareCDMConfig):
    """The set's items from ``start`` on, in order, batched (DataLoader workers read the shards)."""
    import torch

    from zoomfeat.train.dataset import collate

    rows = torch.utils.data.Subset(data, range(start, len(data)))
    return torch.utils.data.DataLoader(rows, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers,
                                       collate_fn=collate)


def prepare_contexts(cfg: PrepareCDMConfig) -> Path:
    """Write (or finish) ``cfg.out/contexts.h5``; returns its path."""
    from tqdm import tqdm

    from zoomfeat.store.contexts import ContextWriter, complete_settings, store_path
    from zoomfeat.runtime import resolve_runtime
    from zoomfeat.log import note
    from zoomfeat.train.dataset import TrainingSet

    from zoomfeat.store import check_output_folder

    data = TrainingSet(cfg.data)
    check_output_folder(cfg.out, "--out")
    runtime = resolve_runtime(cfg.device, cfg.precision)
    source, model = _load_model(cfg, runtime)
    _check_set(data, model)
    slide_ids = [Path(s).stem for s in data.shards]
    cond, labels = (None, []) if cfg.labels is None else label_vectors(cfg.labels, data.shard_of, slide_ids)
    settings = _settings(cfg, source, runtime, len(data), labels)
    done = complete_settings(cfg.out)
    if done == settings:
        note(f"{store_path(cfg.out)} is complete with these settings: nothing to do")
        return store_path(cfg.out)
    if done is not None:
        raise DataError(f"{store_path(cfg.out)} was made from another set, checkpoint or precision: "
                        "pass another --out (an existing store is never overwritten)")
    summarizer = model.config.summarizer
    shape = (int(summarizer.seq_length) + 1, int(summarizer.output_channels))
    writer = ContextWriter(cfg.out, settings=settings, mags=data.mag_of, source_shard=data.shard_of,
                           source_row=data.row_of, context_shape=shape, cond=cond, cond_labels=labels)
    try:
        start = writer.start
        for batch in tqdm(_batches(data, start, cfg), desc="prepare-cdm", unit="batch", disable=None):
            contexts = _contexts(model, batch, runtime)
            writer.write(start, contexts)
            start += len(contexts)
        return writer.commit()
    finally:
        writer.close()
