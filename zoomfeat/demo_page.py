"""The demo's index page: one self-contained HTML file (images inline) in the demo's output folder.

It says what was run and why, shows the comparison table and the paired statistics written by ``zoomfeat
compare``, links every run report, shows two heatmaps and the generated images, lists the elapsed time of
every stage, and states plainly what the synthetic numbers do and do not show.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

from mil import html
from zoomfeat.plain_images import read_rgb
from zoomfeat.store import atomic_write

INDEX_NAME = "index.html"


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC on ``n_pos`` positives and ``n_neg`` negatives (Hanley & McNeil, 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def _link(href: Path | str, text: str) -> str:
    return f'<a href="{escape(str(href))}">{escape(text)}</a>'


def _code(text: str) -> str:
    return f"<pre><code>{escape(text)}</code></pre>"


def _cohort(rows: list[tuple[str, str, int]]) -> dict:
    patients = {c: y for c, _, y in rows}
    return {"slides": len(rows), "patients": len(patients),
            "slides_per_class": [sum(1 for _, _, y in rows if y == c) for c in (0, 1)],
            "patients_per_class": [sum(1 for y in patients.values() if y == c) for c in (0, 1)]}


def _test_fold_sizes(out: Path, folds: int, rows: list[tuple[str, str, int]]) -> list[tuple[int, int]]:
    import csv

    label = {s: y for _, s, y in rows}
    sizes = []
    for k in range(folds):
        with open(out / "splits" / f"splits_{k}.csv", newline="") as fh:
            test = [r["test"] for r in csv.DictReader(fh) if r.get("test")]
        sizes.append((sum(label[s] == 1 for s in test), sum(label[s] == 0 for s in test)))
    return sizes


def _why_section(cfg, cohort: dict, fold_sizes: list[tuple[int, int]]) -> list[str]:
    pos = min(p for p, _ in fold_sizes)
    neg = min(n for _, n in fold_sizes)
    se_chance, se_good = hanley_mcneil_se(0.5, pos, neg), hanley_mcneil_se(0.9, pos, neg)
    mean_se = se_chance / math.sqrt(len(fold_sizes))
    return [
        html.heading("What was run, and why"),
        html.paragraph(
            f"A synthetic cohort of {cohort['slides']} slides from {cohort['patients']} patients "
            f"({cohort['patients_per_class'][0]} intermixed / {cohort['patients_per_class'][1]} clustered; "
            f"slides per patient cycle {', '.join(map(str, cfg.slides_per_patient))}), {cfg.size}x{cfg.size} px at "
            "20x (0.5 µm/px). Every 20x tile (256 px) is one of two tissue types, pink stroma or purple "
            "epithelium, and both classes draw the same share of epithelium per slide (uniform in 0.35-0.65). "
            "In the clustered class the types form patches of several tiles; in the intermixed class the same "
            "tile types are shuffled over the tissue tile by tile. The bag of single 20x tiles therefore has the "
            "same distribution in both classes: no encoder of single 20x tiles, however good, can separate them. "
            "A 5x patch (4x4 tiles) shows the arrangement."),
        html.paragraph(
            f"Why this size: patient-level stratified {cfg.folds}-fold splits put at least {pos} clustered and "
            f"{neg} intermixed slides in every test fold. The standard error of one fold's AUC (Hanley & McNeil) "
            f"is then about {se_chance:.2f} at chance and {se_good:.2f} at AUC 0.9, and about {mean_se:.2f} for "
            "the mean of the folds at chance, so a row near 0.9 and a row near 0.5 differ by several standard "
            "errors; rows closer together than ~0.15 are not distinguished by this cohort. With 5 folds the "
            "smallest two-sided Wilcoxon p is 0.0625: read the paired bootstrap interval, not the p-value."),
        html.paragraph(
            "The feature sets: the toy encoder (a random, seeded 3-layer CNN, not a pathology model) at 20x and at "
            "5x; a tiny ZoomLDM trained here on CPU (its first-stage encoder fitted first, see below), whose U-Net "
            f"features (output block {cfg.block}, {cfg.pooling} pooling, t={cfg.timestep}) are read at 20x, at 5x "
            "and fused "
            "(20x+5x: each 20x tile's feature next to its 5x parent's). Each trains ABMIL on the same splits "
            f"(hipt protocol, {cfg.mil_epochs} epochs). toy@20x is the reference of the paired statistics."),
        html.paragraph(
            "What the toy baseline can and cannot see: at 20x it sees each tile's colour and texture, so it tells "
            "stroma from epithelium, but a bag of tiles carries no arrangement and the toy@20x row must sit near "
            "chance. At 5x the toy encoder sees 16 tiles at once and can see the arrangement too: the signal is "
            "not a ZoomLDM secret, it is multi-scale, and the point of the table is that the 20x-only rows "
            "(toy or ZoomLDM) cannot reach it, while a row with a 5x view can, if its features keep the "
            "arrangement (the table says which did)."),
    ]


def _table_section(out: Path) -> list[str]:
    from mil.compare import COMPARISON_HEADER, comparison_rows, table_rows

    path = out / "report" / "compare.json"
    if not path.exists():
        return [html.paragraph("(no comparison: compare did not run)", "note")]
    result = json.loads(path.read_text())
    parts = [html.heading("Comparison (from zoomfeat compare)"),
             html.table(["feature set", *result["tasks"]], table_rows(result)),
             html.heading("Paired differences against toy@20x", 3),
             html.table(COMPARISON_HEADER, comparison_rows(result))]
    parts += [html.paragraph(n, "note") for n in result["notes"]]
    parts.append("<p>" + " · ".join([_link("report/index.html", "the full comparison page"),
                                      _link("report/compare.md", "compare.md"),
                                      _link("report/compare.json", "compare.json")]) + "</p>")
    return parts


def _reports_section(feature_sets) -> list[str]:
    items = []
    for name, features, mags in feature_sets:
        report = Path("runs") / name / "report" / "report.html"
        items.append(f"<li>{_link(report, f'{features}@{mags}')} (run folder {_link(Path('runs') / name, name)})</li>")
    return [html.heading("Run reports"), "<ul>" + "".join(items) + "</ul>"]


def _heatmaps_section(out: Path, fused_run: str) -> list[str]:
    parts = [html.heading(f"Attention heatmaps ({fused_run}, fold 0 model, test slides)")]
    for kind in ("clustered", "intermixed"):
        png = Path("heatmaps") / f"{kind}.png"
        top = Path("heatmaps") / f"{kind}_top.png"
        parts += [html.heading(f"a {kind} slide", 3), _img(out, png, f"heatmap {kind}", 480),
                  _img(out, top, f"top-attended patches {kind}", 480)]
    return parts


def _img(out: Path, rel: Path, alt: str, width: int | None = None) -> str:
    """Inline image of ``out/rel`` linked by its path relative to the page."""
    if not (out / rel).exists():
        return html.paragraph(f"(missing: {rel})", "note")
    style = f' style="width:{width}px"' if width else ""
    img = html.image((out / rel).read_bytes(), alt).replace("<img ", f"<img{style} ", 1)
    return f'<a href="{escape(rel.as_posix())}">{img}</a>'


def _context_section(out: Path, cfg) -> list[str]:
    path = out / "context_response.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    rows = []
    for mag, by_t in data["by_mag"].items():
        context = by_t.get("context_vs_other")
        for t, v in by_t.items():
            if isinstance(v, dict):
                rows.append([mag, t, f"{v['vs_other']:.3g}", f"{v['vs_zero']:.3g}",
                             "—" if context is None else f"{context:.3g}"])
    fit = _first_stage_fit(out)
    return [
        html.heading("Does the tiny ZoomLDM use its conditioning?"),
        html.paragraph(
            f"Relative change of the pooled block-{data['block']} features of training patches, with fixed noise, "
            "when a patch's own context is replaced by another patch's context or by the unconditional (zero) "
            "context: ||f(c_own) − f(c_other)|| / ||f(c_own)||; the last column is the same ratio for the two "
            "Summarizer contexts themselves."),
        html.table(["magnification", "timestep", "features vs another patch's context", "features vs zero context",
                    "context vs another patch's context"], rows),
        html.paragraph(
            "Why the ZoomLDM rows can carry the signal at all: the first stage. The released ZoomLDM has a trained "
            "VQ-f4 autoencoder; a randomly initialised one (what prepare-train uses without weights) maps stroma "
            "and epithelium tiles to latents whose means differ by about 0.5 % of the latents' spread, so nothing "
            "the U-Net denoises depends on the tissue, and the previous demo's ZoomLDM rows sat at chance. This "
            f"demo first fits the encoder ({cfg.first_stage_steps} Adam steps, zoomfeat fit-first-stage"
            f"{fit}) to map each patch to its 4x4-average colour, standardised per channel (unit-variance "
            "latents, as a trained first stage with its scale factor gives), then trains the U-Net"
            + (" alone, the Summarizer kept at its seeded initialisation (a fixed random projection of the "
               "conditioning grid and magnification token: trained jointly at this learning rate it collapses to "
               "nearly one context for every patch within these steps, and the features stop depending on it; "
               "the official recipe trains both at 2e-5 for far longer)" if cfg.summarizer_lr_scale == 0 else
               f" and the Summarizer (its learning rate x{cfg.summarizer_lr_scale:g})")
            + f" ({cfg.train_steps} steps at a learning rate of {cfg.lr:g}, warm-up 20 steps, instead "
            f"of the official 2e-5), and reads features at output block {cfg.block} ({cfg.pooling} pooling, "
            f"t={cfg.timestep}): a late decoder block, where each 20x tile of a 5x patch spans several latent "
            "positions and the boundaries between tissue types show; max pooling keeps the strongest response. "
            "Block, pooling and timestep were chosen in development experiments, not on a held-out cohort, and "
            "the choice matters: after this short training some blocks keep the arrangement and others do not "
            "(benchmarks/RESULTS.md). "
            + _context_verdict(data), "note"),
    ]


def _first_stage_fit(out: Path) -> str:
    """", loss A -> B" of the first-stage fit (its record beside the initial checkpoint), or ""."""
    path = out / "zoomldm_init" / "init.json"
    if not path.exists():
        return ""
    fit = json.loads(path.read_text())
    return f", on {fit['patches']} patches, loss {fit['first_loss']:.3g} -> {fit['last_loss']:.3g}"


def _context_verdict(data: dict) -> str:
    """Plain sentences on the measured response of the features to another patch's context."""
    values = [v["vs_other"] for by_t in data["by_mag"].values() for v in by_t.values() if isinstance(v, dict)]
    zero = [v["vs_zero"] for by_t in data["by_mag"].values() for v in by_t.values() if isinstance(v, dict)]
    contexts = [by_t["context_vs_other"] for by_t in data["by_mag"].values() if "context_vs_other" in by_t]
    best = max(values) if values else 0.0
    per_mag = ", ".join(f"{mag} {max(v['vs_other'] for v in by_t.values() if isinstance(v, dict)):.2g}"
                        for mag, by_t in data["by_mag"].items())
    measured = (f"Measured: the features move by up to {best:.2g} (relative; {per_mag}) with another patch's "
                f"context and by up to {max(zero):.2g} without any context. ")
    if contexts and max(contexts) < 0.02:
        return measured + (
            f"The Summarizer's contexts of two different patches differ by only {max(contexts):.2g} (relative; "
            "about 0.12 at initialisation): over training it collapsed towards one context for every patch, so "
            "the model has learnt that a context is present, not to read which one, and its features carry the "
            "class signal through the image latent of the 5x patch (a jointly trained Summarizer collapses at "
            "learning rates of 1e-3 and above in this budget; `--summarizer-lr-scale 0`, the default, keeps it "
            "at its initialisation; benchmarks/RESULTS.md).")
    apart = f" (their Summarizer contexts differ by up to {max(contexts):.2g})" if contexts else ""
    return measured + (
        f"Two patches' contexts stay apart{apart}, and the model reads which context it gets, weakly: a jointly "
        "trained Summarizer at this learning rate collapses to nearly one context and the features then move "
        "by 5e-6 to 8e-4 (benchmarks/RESULTS.md). That does not say the context is where the class signal comes "
        "from: the 5x patch's own latent carries the arrangement too, and these numbers do not separate the two "
        "paths.")


def _resemblance_section(out: Path) -> list[str]:
    """The Frechet distances of generation/resemblance.json as a table, with what they mean."""
    path = out / "generation" / "resemblance.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    rows = [[mag, str(v["images"]), f"{v['fd_fitted_decoder']:.3g}", f"{v['fd_random_decoder']:.3g}",
             f"{v['fd_real_vs_real']:.3g}"] for mag, v in data["by_mag"].items()]
    return [html.heading("How much do generated patches resemble real ones?", 3),
            html.table(["magnification", "patches per set", "generated (fitted decoder) vs real",
                        "same latents, random decoder, vs real", "real vs other real (floor)"], rows),
            html.paragraph(
                f"Fréchet distance between {data['encoder']} encoder features of two sets of patches (lower is "
                "closer): the demo's model generates from the conditions of the sampled patches, and the same "
                "latents are decoded twice, by the fitted decoder and by the random first stage it started from; "
                "the last column compares two disjoint sets of real tissue patches, the smallest value a set of "
                "this size can reach. With so few patches and a random encoder these numbers are coarse: they say "
                "whether the generated patches sit near the real ones, not how realistic they are.", "note")]


def _superres_psnr(out: Path) -> str:
    """"PSNR of the input against the output's downsampling: sampler X dB, after the projection Y dB", or ""."""
    path = out / "generation" / "superres" / "inverted" / "superres_input_5x.json"
    if not path.exists():
        return ""
    data = json.loads(path.read_text())
    sampler, final = data.get("psnr_sampler_db"), data.get("psnr_final_db")
    if sampler is None or final is None:
        return ""
    return (f"Agreement of the output with its input (PSNR of the input against the output's downsampling by the "
            f"Resizer): {sampler:.1f} dB from the sampler itself, {final:.1f} dB after the projection onto the "
            "images whose downsampling is the input (--consistency project). The first number is the model's; "
            "the second is guaranteed by the projection whatever the model does.")


def _generation_section(out: Path) -> list[str]:
    g = Path("generation")
    parts = [html.heading("The generative model"),
             html.paragraph("All from the same tiny ZoomLDM (64-px patches), on CPU, with few sampler steps. Its "
                            "first stage was fitted to the cohort's patches before training (zoomfeat "
                            "fit-first-stage): the encoder to their mean colours, the codebook and decoder to "
                            "reconstruct them, so decoded samples show the cohort's pink stroma and purple "
                            "epithelium at the resolution of 4x4-pixel colour blocks. The images show that every "
                            "generation command runs on the demo's model and what it writes; the table below "
                            "measures how near the real patches they sit. The command of each image is listed "
                            "under Stages.", "note")]
    for mag in ("20x", "5x"):
        parts.append(html.heading(f"Real {mag} patches and 4 samples conditioned on their 20x embeddings", 3))
        for kind in ("clustered", "intermixed"):
            sheet = g / f"contact_{mag}_{kind}.png"
            parts += [html.paragraph(f"{kind} slide: real patch (left), samples (right)"),
                      _img(out, sheet, f"real and sampled {mag} {kind}", 560)]
    parts += _resemblance_section(out)
    parts.append(html.heading("A large image: the 20x image of a 5x patch (generate-large)", 3))
    row = []
    for label, rel in (("grid", g / "large_grid" / "large.png"), ("joint", g / "large_joint" / "large.png"),
                       ("joint: its 5x guide", g / "large_joint" / "guide.png")):
        row.append(f"<figure style='display:inline-block'>{_img(out, rel, label, 320)}"
                   f"<figcaption>{escape(label)}</figcaption></figure>")
    parts.append("".join(row))
    parts.append(html.paragraph("Joint sampling draws the 5x guide and its 20x patches together, the patches pulled "
                                "towards the guide's layout; grid sampling has no guide.", "note"))
    parts.append(html.heading("Super-resolution: a 5x patch to 20x (superres)", 3))
    row = []
    for label, rel in (("5x input", g / "superres_input_5x.png"),
                       ("bicubic", g / "superres" / "bicubic" / "superres_input_5x.png"),
                       ("ZoomLDM (inverted conditions)", g / "superres" / "inverted" / "superres_input_5x.png")):
        row.append(f"<figure style='display:inline-block'>{_img(out, rel, label, 256)}"
                   f"<figcaption>{escape(label)}</figcaption></figure>")
    parts.append("".join(row))
    psnr = _superres_psnr(out)
    if psnr:
        parts.append(html.paragraph(psnr, "note"))
    parts.append(html.heading("Novel patches: contexts drawn by a conditioning diffusion model (sample --cdm)", 3))
    parts.append(html.paragraph(
        "prepare-cdm stores the Summarizer context of every training patch, train-cdm fits a tiny DiT to them, and "
        "sample --cdm draws new contexts from it and generates a patch from each, with no slide. The CDM can only "
        "be as varied as the contexts it learnt from (see the conditioning measurement above: how far apart two "
        "patches' contexts are), and with a few hundred steps on 264 contexts it is far from the real "
        "distribution of contexts.", "note"))
    row = []
    for mag in ("20x", "5x"):
        row.append(f"<figure style='display:inline-block'>"
                   f"{_img(out, g / f'cdm_{mag}' / 'contact_sheet.png', f'CDM-drawn {mag} patches', 160)}"
                   f"<figcaption>{mag}</figcaption></figure>")
    parts.append("".join(row))
    return parts


def _stages_section(record: list[dict], total: float) -> list[str]:
    def cell(value) -> str:
        return "already done" if value is None else f"{value:.1f}"

    def cpu(r: dict) -> str:
        if r["seconds"] is None:
            return "already done"
        return "—" if r.get("cpu_seconds") is None else f"{r['cpu_seconds']:.1f}"

    rows = [[str(i), r["title"], cell(r["seconds"]), cpu(r)] for i, r in enumerate(record, 1)]
    parts = [html.heading("Stages and elapsed time"),
             html.table(["#", "stage", "wall s", "CPU s (this process)"], rows, numeric=[True, False, True, True]),
             f"<p>Total: {total:.0f} s wall. A rerun resumes: stages that the commands find done take a second "
             "or two, and generation stages with a manifest are skipped. "
             + _link("stages.json", "stages.json") + " holds these numbers.</p>"]
    parts.append(html.heading("Commands", 3))
    parts.append(_code("\n".join(r["command"] for r in record)))
    return parts


def _measured_verdict(out: Path) -> str:
    """What this run's table says, in a sentence (rows above 0.65 mean AUC, rows within 0.15 of chance)."""
    path = out / "report" / "compare.json"
    if not path.exists():
        return ""
    result = json.loads(path.read_text())
    means = {fs: result["table"][fs][result["tasks"][0]]["mean"] for fs in result["feature_sets"]}
    high = [f"{fs} ({m:.2f})" for fs, m in means.items() if m is not None and m >= 0.65]
    flat = [f"{fs} ({m:.2f})" for fs, m in means.items() if m is not None and m < 0.65]
    return (f"This run measured: above 0.65 mean AUC: {', '.join(high) or 'none'}; the rest at chance or not "
            f"separable from it on this cohort: {', '.join(flat) or 'none'}.")


def _caveats(out: Path) -> list[str]:
    verdict = _measured_verdict(out)
    return [
        html.heading("What these numbers do and do not show"),
        html.paragraph(
            "The cohort is built so that rows that see only single 20x tiles cannot beat chance, while a row "
            "whose features see the arrangement over a 5x patch can; the paired statistics say by how much, on "
            "these folds. " + verdict + " A row without signal "
            "need not sit at 0.5: with 5 folds of about ten slides, cross-validation of a classifier that has "
            "nothing to learn is known to give AUCs scattered around and often well below 0.5 (its training "
            "folds' class balance mirrors the test fold's), so read a row far below 0.5 as 'no signal'."),
        html.paragraph(
            "They do not show how ZoomLDM performs on real slides, nor that ZoomLDM features beat a pathology "
            "foundation model: the slides are synthetic, the model is tiny and trained for minutes, the baseline "
            "is a random CNN, and a cohort of this size only separates large differences. The real comparison "
            "needs the released weights and real cohorts (README, \"The real-data path\").", "note"),
    ]


def write_index(cfg, record: list[dict], total: float, inputs: dict) -> Path:
    """Write ``cfg.out/index.html``; return its path. ``cfg`` holds the demo's settings (attributes), ``inputs``
    what the demo passes in: ``labels`` (case_id, slide_id, label rows), ``feature_sets`` ((run, features, mags)
    rows), ``fused_run`` and ``settings`` (JSON-ready)."""
    out = cfg.out
    cohort = _cohort(inputs["labels"])
    fold_sizes = _test_fold_sizes(out, cfg.folds, inputs["labels"])
    parts = [html.paragraph("zoomfeat demo: a SYNTHETIC cohort and a TINY model trained on CPU.", "note")]
    parts += _why_section(cfg, cohort, fold_sizes)
    parts += _table_section(out)
    parts += _caveats(out)
    parts += _context_section(out, cfg)
    parts += _reports_section(inputs["feature_sets"])
    parts += _heatmaps_section(out, inputs["fused_run"])
    if cfg.generation:
        _write_contact_sheets(out)
        parts += _generation_section(out)
    parts += _stages_section(record, total)
    parts.append(html.heading("Settings", 3))
    parts.append(_code(json.dumps(inputs["settings"], indent=2)))
    path = out / INDEX_NAME
    with atomic_write(path) as tmp:
        Path(tmp).write_text(html.page("zoomfeat demo", parts))
    return path


def _write_contact_sheets(out: Path) -> None:
    """generation/contact_<mag>_<kind>.png: the real patch the samples are conditioned on, then its samples."""
    import numpy as np
    import openslide
    from PIL import Image

    from zoomfeat.generate.images import contact_sheet, save_png

    g = out / "generation"
    for mag in ("20x", "5x"):
        for kind in ("clustered", "intermixed"):
            folder = g / f"sample_{mag}_{kind}"
            manifest = folder / "manifest.json"
            if not manifest.exists():
                continue
            record = json.loads(manifest.read_text())
            samples = [read_rgb(folder / e["file"]) for e in record["images"]]
            side = samples[0].shape[0]
            conditions = record["conditions"]
            slide, (x, y) = conditions.get("slide"), _first_coords(conditions)
            with openslide.OpenSlide(str(slide)) as s:
                extent = 256 if mag == "20x" else 1024
                real = s.read_region((x, y), 0, (extent, extent)).convert("RGB").resize((side, side), Image.BOX)
            save_png(g / f"contact_{mag}_{kind}.png", contact_sheet([np.asarray(real), *samples],
                                                                     columns=len(samples) + 1))


def _first_coords(conditions: dict) -> tuple[int, int]:
    for key in ("coords_level0", "coords", "xy"):
        if key in conditions:
            value = conditions[key]
            return tuple(int(v) for v in (value[0] if isinstance(value[0], list) else value))
    raise KeyError("coords")
