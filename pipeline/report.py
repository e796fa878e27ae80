"""The data report of a finished output folder: ``report.html`` plus its PNGs in ``<out>/report/``.

    python -m pipeline.report <output folder> [--samples 5000]      # flags: pipeline/cli.py

The page is self-contained (every picture is inlined; the PNGs beside it are the same pictures, for
tools that want files): counts by reason (written, rejected by reason, skipped by reason, from the
manifest), histograms of entities per image, entity mask area share, caption length and aspect ratio
(over the first ``samples`` samples in shard order: exact for a set that size or smaller), the largest
duplicate clusters as thumbnails (representative first) and the decontamination result. Every count is
also in ``report.json`` and in the page's ``data-count`` attributes, so a test or a tool reads the same
numbers the page shows.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m pipeline.report`: parse (and answer --help) before the heavy imports below
    import sys

    import pipeline.cli

    sys.exit(pipeline.cli.report())

import argparse
import base64
import html
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline import cli
from pipeline.dedup import CurationFiles
from pipeline.shards import ShardLayout, write_json_atomic
from pipeline.storage import Location

__all__ = ["collect_statistics", "write_report", "main"]

HISTOGRAMS = {  # name -> (title, x label, bins)
    "entities": ("Entities per image", "entities", np.arange(0.5, 8.5, 1.0)),
    "mask_area": ("Entity mask area share", "mask pixels / image pixels", np.linspace(0.0, 1.0, 21)),
    "caption_words": ("Caption length", "words", np.arange(0, 41, 2)),
    "aspect_ratio": ("Aspect ratio", "width / height", np.linspace(0.25, 4.0, 31)),
}
THUMB = 96


def collect_statistics(layout: ShardLayout, samples: int) -> dict[str, list[float]]:
    """Per-sample figures of the first ``samples`` samples (shard then key order), read from each sample's
    ``json`` and ``masks.png`` members only (the images are not decoded)."""
    values: dict[str, list[float]] = {name: [] for name in HISTOGRAMS}
    seen = 0
    for shard in layout.shards.glob("shard-*.tar"):
        with shard.open() as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            meta: dict[str, Any] | None = None
            for member in tar:
                if seen >= samples:
                    return values
                name = member.name.partition(".")[2]
                if name == "json":
                    meta = json.loads(tar.extractfile(member).read())
                    width, height = meta["width"], meta["height"]
                    values["entities"].append(len(meta["entities"]))
                    values["caption_words"].append(len(meta["caption"].split()))
                    values["aspect_ratio"].append(width / height)
                elif name == "masks.png" and meta is not None:
                    masks = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("L")) > 0
                    count = len(meta["entities"])
                    if count:
                        per_entity = masks.reshape(count, -1).mean(axis=1)
                        values["mask_area"].extend(float(v) for v in per_entity)
                    seen += 1
                    meta = None
    return values


def _histogram_png(name: str, data: list[float]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title, label, bins = HISTOGRAMS[name]
    figure, axis = plt.subplots(figsize=(4.2, 2.8), dpi=100)
    axis.hist(np.clip(data, bins[0], bins[-1]), bins=bins, color="#3b6ea5", edgecolor="white")
    axis.set_title(f"{title} (n={len(data)})", fontsize=10)
    axis.set_xlabel(label, fontsize=9)
    axis.set_ylabel("count", fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _thumbnail(manifest: dict[str, Any], source: str) -> bytes | None:
    """A thumbnail of an input by its ``source``, for folder and list inputs (sources are paths relative
    to the input folder or the list's folder); None when it cannot be read (tar members, moved inputs)."""
    config = manifest["config"]["input"]
    root = Location(config["path"])
    base = root if config["kind"] == "folder" else root.parent
    try:
        with Image.open(io.BytesIO((base / source).read_bytes())) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMB, THUMB))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return buffer.getvalue()
    except Exception:  # noqa: BLE001 - a preview that cannot be read (a tar member, a moved input) is left out
        return None


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _count_rows(title: str, counts: dict[str, int], group: str) -> str:
    rows = "".join(f'<tr><td>{html.escape(k)}</td><td data-count="{group}:{html.escape(k)}">{v}</td></tr>'
                   for k, v in counts.items()) or '<tr><td colspan="2">none</td></tr>'
    return f"<h3>{title}</h3><table><tr><th>reason</th><th>inputs</th></tr>{rows}</table>"


def write_report(root: str | Path | Location, samples: int = 5000) -> Location:
    """Write ``<root>/report/report.html``, its PNGs and ``report.json``; returns the HTML's location."""
    layout = ShardLayout(root)
    manifest = json.loads(layout.manifest.read_text())
    out = layout.root / "report"
    values = collect_statistics(layout, samples)
    pictures = {name: _histogram_png(name, data) for name, data in values.items()}
    for name, png in pictures.items():
        (out / f"{name}.png").write_atomic(png)
    curation = CurationFiles(layout).read_summary() or {}
    clusters = (curation.get("dedup") or {}).get("examples", [])
    decontamination = manifest.get("decontamination")
    figures = {"seen": manifest["seen"], "inputs": manifest["inputs"], "written": manifest["written"],
               "rejected": manifest["rejected"], "skipped": manifest["skipped"],
               "samples_in_histograms": len(values["entities"]),
               "dedup": {k: v for k, v in (manifest.get("dedup") or {}).items() if k != "settings"} or None,
               "decontamination_overlaps": decontamination["overlaps"] if decontamination else None}
    write_json_atomic(out / "report.json", figures)

    parts = [f"<h1>Data report: {html.escape(layout.root.name)}</h1>",
             (f"<p>config hash {html.escape(manifest['config_hash'])}, manifest hash "
              f"{html.escape(manifest.get('manifest_hash', ''))}</p>"),
             "<h2>Counts</h2><table>"
             + "".join(f'<tr><td>{k}</td><td data-count="total:{k}">{manifest[k]}</td></tr>'
                       for k in ("seen", "inputs", "written"))
             + f'<tr><td>rejected</td><td data-count="total:rejected">{sum(manifest["rejected"].values())}</td></tr>'
             + f'<tr><td>skipped</td><td data-count="total:skipped">{sum(manifest["skipped"].values())}</td></tr></table>',
             _count_rows("Rejected by reason", manifest["rejected"], "rejected"),
             _count_rows("Skipped by reason", manifest["skipped"], "skipped"),
             f"<h2>Distributions</h2><p>Over the first {len(values['entities'])} written samples.</p>"
             + "".join(f'<img alt="{name}" src="{_data_uri(png)}">' for name, png in pictures.items())]
    dedup = manifest.get("dedup")
    if dedup:
        parts.append(f'<h2>Duplicate clusters</h2><p><span data-count="dedup:clusters">{dedup["clusters"]}</span> '
                     f'clusters, <span data-count="dedup:duplicates">{dedup["duplicates"]}</span> duplicates rejected; '
                     "the largest below, representative (kept) first.</p>")
        for cluster in clusters:
            cells = []
            for i, source in enumerate(cluster["sources"]):
                png = _thumbnail(manifest, source)
                picture = f'<img src="{_data_uri(png)}">' if png else '<div class="missing">no preview</div>'
                cells.append(f'<figure class="{"kept" if i == 0 else "dup"}">{picture}'
                             f"<figcaption>{html.escape(source)}</figcaption></figure>")
            parts.append(f'<div class="cluster">{"".join(cells)}</div>')
    if decontamination:
        rows = "".join(f"<tr><td>{html.escape(b['benchmark'])}</td><td>{len(b['references'])}</td></tr>"
                       for b in decontamination["benchmarks"])
        overlaps = [r for r in layout.all_rejects() if r["reason"] == "benchmark_overlap"]
        listed = "".join(f"<li>{html.escape(r['detail'])}</li>" for r in overlaps[:200])
        parts.append(f"<h2>Decontamination</h2><table><tr><th>benchmark</th><th>references</th></tr>{rows}</table>"
                     f'<p><span data-count="decontamination:overlaps">{decontamination["overlaps"]}</span> inputs '
                     f"rejected as benchmark_overlap (perceptual hash within {decontamination['hash_threshold']} bits"
                     + (f", embedding cosine at least {decontamination['embedding_threshold']}"
                        if decontamination.get("embedding_threshold") else "") + f").</p><ul>{listed}</ul>")
    else:
        parts.append("<h2>Decontamination</h2><p><b>Not checked</b>: this set was not decontaminated against any "
                     "benchmark.</p>")
    style = ("body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img{margin:4px}"
             ".cluster{display:flex;flex-wrap:wrap;border:1px solid #ddd;margin:6px 0;padding:4px}"
             "figure{margin:4px;width:110px;font-size:10px;word-break:break-all}.kept img{outline:3px solid #2a2}"
             ".missing{width:96px;height:64px;background:#eee}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Data report</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
    (out / "report.html").write_atomic(page.encode("utf-8"))
    return out / "report.html"


def run(args: argparse.Namespace) -> int:
    print(write_report(args.output, args.samples))
    return 0


main = cli.report  # the command itself (parsed in pipeline/cli.py)
