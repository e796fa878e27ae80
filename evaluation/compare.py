"""Compare runs: one self-contained HTML page plus a PNG, logged to MLflow.

    mmdiff-compare --experiment mmdiff-demo [--filter "params.seed = '0'"] [--out DIR]
    mmdiff-compare --runs RUN_ID RUN_ID ... [--tracking-uri URI] [--out DIR]

The page (``comparison.html``, images inlined) holds: the metrics table with the best value of each row
marked, the params and config that differ across the runs, the training and metric curves overlaid,
side-by-side sample grids (the same benchmark case, prompt and seed in every column, from each run's
``evaluation.evaluate`` images, beside the subjects' reference photos) and each run's latest
attention-map overlay. ``comparison.png`` holds the
curves and the sample grid. Both are logged as artifacts (``comparison/``) of a run tagged
``mmdiff.kind=comparison`` in the first run's experiment; comparison runs are never compared themselves.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m evaluation.compare`: parse (and answer --help) before the heavy imports below
    import sys

    import evaluation.cli

    sys.exit(evaluation.cli.compare())

import argparse
import base64
import html
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation import cli

__all__ = ["RunRecord", "collect", "lower_is_better", "render_html", "render_png", "compare", "main"]

KIND_TAG = "mmdiff.kind"
MAX_GRID_CASES = 12
LOWER_IS_BETTER = ("loss", "collapse", "leak", "other", "failed", "seconds", "time", "nonfinite", "rejected")


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


@dataclass
class RunRecord:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    curves: dict[str, list[tuple[int, float]]]  # metrics logged at more than one step
    cases: dict[str, dict] = field(default_factory=dict)  # case_id -> evaluation row (with a loaded "picture")
    attention: Image.Image | None = None

    @property
    def label(self) -> str:
        return f"{self.name} ({self.run_id[:8]})"


def _latest_attention(client, run_id: str, workdir: Path) -> Image.Image | None:
    from train.tracking import logged_images

    images = logged_images(client, run_id, "attention")
    if not images:
        return None
    return Image.open(client.download_artifacts(run_id, images[-1][1], str(workdir))).convert("RGB")


def _evaluation_cases(client, run_id: str, benchmark: str | None, workdir: Path) -> dict[str, dict]:
    if not benchmark:
        return {}
    prefix = f"eval/{benchmark}"
    local = Path(client.download_artifacts(run_id, prefix, str(workdir)))
    table = json.loads((local / "table.json").read_text())  # MLflow's log_table layout: columns + data
    cases = {}
    for values in table["data"]:
        row = dict(zip(table["columns"], values))
        picture = local / "images" / row["image"] if row.get("image") else None
        if row["kind"] != "ceiling" and picture is not None and picture.is_file():
            row["picture"] = Image.open(picture).convert("RGB")
            references = [local / "references" / f"{s}.png" for s in json.loads(row["subjects"])]
            row["references"] = [Image.open(r).convert("RGB") for r in references if r.is_file()]
            cases[row["case_id"]] = row
    return cases


def collect(client, run_ids: list[str], workdir: Path) -> list[RunRecord]:
    """Everything the report shows, per run (artifacts are downloaded into ``workdir``)."""
    records = []
    for run_id in run_ids:
        run = client.get_run(run_id)
        curves = {}
        for key in run.data.metrics:
            history = client.get_metric_history(run_id, key)
            if len({m.step for m in history}) > 1:  # a re-evaluation logs again at step 0: not a curve
                curves[key] = sorted((m.step, m.value) for m in history)
        folder = workdir / run_id
        folder.mkdir(parents=True, exist_ok=True)
        records.append(RunRecord(
            run_id, run.info.run_name or run_id, run.info.status, dict(run.data.params), dict(run.data.metrics),
            curves, _evaluation_cases(client, run_id, run.data.tags.get("eval.benchmark"), folder),
            _latest_attention(client, run_id, folder)))
    return records


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure_png(figure) -> Image.Image:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _curves_figure(records: list[RunRecord]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in records for k in r.curves})
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    figure, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for record in records:
            if key in record.curves:
                steps, values = zip(*record.curves[key])
                ax.plot(steps, values, marker=".", label=record.label)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    return figure


def _shared_cases(records: list[RunRecord]) -> list[str]:
    shared = set.intersection(*(set(r.cases) for r in records)) if records else set()
    return sorted(shared)[:MAX_GRID_CASES]


def _metric_rows(records: list[RunRecord]) -> list[tuple[str, list[float | None], int | None]]:
    keys = sorted({k for r in records for k in r.metrics}, key=lambda k: (not k.startswith("eval."), k))
    rows = []
    for key in keys:
        values = [r.metrics.get(key) for r in records]
        present = [(v, i) for i, v in enumerate(values) if v is not None and np.isfinite(v)]
        best = None
        ranked = key.startswith("eval.") or "loss" in key  # others (lr, step times, counters) have no "better"
        if ranked and len(present) > 1 and len({round(v, 4) for v, _ in present}) > 1:  # a difference shown
            best = (min if lower_is_better(key) else max)(present)[1]
        rows.append((key, values, best))
    return rows


def _param_diff(records: list[RunRecord]) -> tuple[list[tuple[str, list[str]]], int]:
    keys = sorted({k for r in records for k in r.params})
    differing = [(k, [r.params.get(k, "—") for r in records]) for k in keys]
    differing = [(k, v) for k, v in differing if len(set(v)) > 1]
    return differing, len(keys) - len(differing)


STYLE = """
body{font-family:DejaVu Sans,Arial,sans-serif;margin:24px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td.key{text-align:left;font-family:monospace}
td.best{background:#d8f5d0;font-weight:bold}td.diff{background:#fff4cc;text-align:left;font-family:monospace}
.grid td{text-align:center;vertical-align:top}.grid img{width:160px;image-rendering:pixelated}
.prompt{font-size:12px;text-align:left;max-width:220px}.grid img.ref{width:64px;margin:4px 4px 0 0}.note{color:#666;font-size:12px}
"""


def render_html(records: list[RunRecord], curves: Image.Image | None) -> str:
    e = html.escape
    head = "".join(f"<th>{e(r.label)}</th>" for r in records)
    parts = [(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>mmdiff run comparison</title>"
             f"<style>{STYLE}</style></head><body><h1>Run comparison: {len(records)} runs</h1>"),
             "<table><tr><th>run</th><th>id</th><th>status</th></tr>"]
    parts += [f"<tr><td class='key'>{e(r.name)}</td><td class='key'>{e(r.run_id)}</td><td>{e(r.status)}</td></tr>"
              for r in records]
    parts.append("</table><h2>Metrics</h2><p class='note'>Last logged value; the best evaluation figure and "
                 "loss of each row in green (lower is better for losses, collapse, leakage, failures and times).</p>"
                 f"<table id='metrics'><tr><th>metric</th>{head}</tr>")
    for key, values, best in _metric_rows(records):
        cells = "".join(f"<td class='{'best' if i == best else ''}'>{'—' if v is None else f'{v:.4f}'}</td>"
                        for i, v in enumerate(values))
        parts.append(f"<tr><td class='key'>{e(key)}</td>{cells}</tr>")
    differing, same = _param_diff(records)
    parts.append(f"</table><h2>Config diff</h2><p class='note'>{len(differing)} params differ, {same} are identical."
                 f"</p><table id='config-diff'><tr><th>param</th>{head}</tr>")
    for key, values in differing:
        parts.append(f"<tr><td class='key'>{e(key)}</td>"
                     + "".join(f"<td class='diff'>{e(v)}</td>" for v in values) + "</tr>")
    parts.append("</table><h2>Curves</h2>")
    parts.append(f"<img alt='curves' style='max-width:100%' src='{_png(curves)}'>" if curves is not None
                 else "<p class='note'>No metric was logged at more than one step.</p>")
    shared = _shared_cases(records)
    parts.append("<h2>Samples: same prompt, same seed</h2>")
    if shared:
        parts.append(f"<table class='grid' id='samples'><tr><th>case (prompt, seed)</th>{head}</tr>")
        for case_id in shared:
            row = records[0].cases[case_id]
            cells = "".join(f"<td><img alt='{e(case_id)}' src='{_png(r.cases[case_id]['picture'])}'></td>"
                            for r in records)
            refs = "".join(f"<img class='ref' alt='reference' src='{_png(r)}'>" for r in row["references"])
            parts.append(f"<tr><td class='prompt'><b>{e(case_id)}</b><br>{e(row['prompt'])}<br>seed {row['seed']}"
                         f"<br>{refs}</td>{cells}</tr>")
        parts.append("</table>")
    else:
        parts.append("<p class='note'>No evaluated case is shared by all runs (run evaluation.evaluate with the "
                     "same benchmark on each).</p>")
    parts.append("<h2>Attention maps</h2><p class='note'>The latest training sample of each run: image, then "
                 "each subject's attention over it.</p><table class='grid'><tr>")
    parts += [f"<td>{e(r.label)}<br>" + (f"<img style='width:auto;height:{max(160, r.attention.height)}px' "
                                          f"src='{_png(r.attention)}'>"
                                          if r.attention is not None else "none logged") + "</td>" for r in records]
    parts.append("</tr></table></body></html>")
    return "\n".join(parts)


def render_png(records: list[RunRecord], curves: Image.Image | None, side: int = 128) -> Image.Image:
    """Curves on top, then the sample grid (one row per shared case: its subjects' references, then one
    column per run)."""
    from PIL import ImageDraw

    shared = _shared_cases(records)
    label_w, title_h = 260, 18
    width = max(label_w + side * len(records), curves.width if curves is not None else 0, 400)
    grid_h = title_h + len(shared) * (side + 4)
    top = curves.height if curves is not None else 0
    canvas = Image.new("RGB", (width, top + grid_h + 4), "white")
    if curves is not None:
        canvas.paste(curves, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for j, record in enumerate(records):
        draw.text((label_w + j * side + 4, top + 2), record.label[:22], fill="black")
    for i, case_id in enumerate(shared):
        y = top + title_h + i * (side + 4)
        draw.text((4, y + 4), case_id[:40], fill="black")
        draw.text((4, y + 20), str(records[0].cases[case_id]["prompt"])[:40], fill="#444")
        for k, reference in enumerate(records[0].cases[case_id]["references"]):
            thumbnail = reference.copy()
            thumbnail.thumbnail((side // 2 + 8, side // 2 + 8))
            canvas.paste(thumbnail, (4 + k * (side // 2 + 12), y + 40))
        for j, record in enumerate(records):
            canvas.paste(record.cases[case_id]["picture"].resize((side, side), Image.NEAREST), (label_w + j * side, y))
    return canvas


def compare(run_ids: list[str], out_dir: str | Path, tracking_uri: str | None = None,
            log: bool = True) -> tuple[Path, Path, str | None]:
    """Write comparison.html and comparison.png for ``run_ids``; returns their paths and the MLflow run id."""
    import mlflow

    if len(run_ids) < 2:
        raise ValueError(f"compare needs at least two runs, got {len(run_ids)}")
    client = mlflow.MlflowClient(tracking_uri)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        records = collect(client, run_ids, Path(tmp))
        figure = _curves_figure(records)
        curves = _figure_png(figure) if figure is not None else None
        page, picture = out_dir / "comparison.html", out_dir / "comparison.png"
        page.write_text(render_html(records, curves), encoding="utf-8")
        render_png(records, curves).save(picture)
    logged = None
    if log:
        experiment_id = client.get_run(run_ids[0]).info.experiment_id
        logged = client.create_run(experiment_id, run_name="comparison", tags={
            KIND_TAG: "comparison", "mmdiff.compared_runs": ",".join(run_ids)}).info.run_id
        client.log_artifact(logged, str(page), "comparison")
        client.log_artifact(logged, str(picture), "comparison")
        client.set_terminated(logged)
    return page, picture, logged


def runs_of(client, experiment: str, filter_string: str = "") -> list[str]:
    """The runs of ``experiment`` matching ``filter_string``, oldest first, comparison runs left out."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"--experiment {experiment}: no such experiment")
    runs = client.search_runs([found.experiment_id], filter_string, order_by=["attributes.start_time ASC"])
    return [r.info.run_id for r in runs if r.data.tags.get(KIND_TAG) != "comparison"]


def run(args: argparse.Namespace) -> int:
    import mlflow

    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    run_ids = args.runs or runs_of(mlflow.MlflowClient(tracking_uri), args.experiment, args.filter)
    page, picture, logged = compare(run_ids, args.out, tracking_uri, log=not args.no_log)
    print(f"compare: {len(run_ids)} runs -> {page} and {picture}"
          + (f" (logged to MLflow run {logged}, artifacts comparison/)" if logged else ""))
    return 0


main = cli.compare  # the command itself (parsed in evaluation/cli.py)
