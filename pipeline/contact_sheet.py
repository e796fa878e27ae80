"""QA contact sheet: a PNG grid of samples with masks, boxes and phrases drawn over them.

    python -m pipeline.contact_sheet <output folder> [--samples 16] [--png sheet.png]   # flags: pipeline/cli.py
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m pipeline.contact_sheet`: parse (and answer --help) before the heavy imports below
    import sys

    import pipeline.cli

    sys.exit(pipeline.cli.contact_sheet())

import argparse
import io
import itertools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline import cli
from pipeline.shards import read_samples
from pipeline.storage import Location
from preprocess.sample import Sample

__all__ = ["draw_sample", "contact_sheet", "COLOURS"]

COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def draw_sample(sample: Sample, tile: int) -> Image.Image:
    """The sample's image with each entity's mask tinted, its box outlined and its phrase written,
    its crops in a strip below, scaled into a ``tile``-wide panel."""
    image = np.asarray(sample.image, dtype=np.float32)
    for index, mask in enumerate(sample.masks):
        colour = np.array(COLOURS[index % len(COLOURS)], np.float32)
        image[mask] = 0.55 * image[mask] + 0.45 * colour
    canvas = Image.fromarray(image.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for index, entity in enumerate(sample.entities):
        colour = COLOURS[index % len(COLOURS)]
        draw.rectangle(entity.box, outline=colour, width=max(1, canvas.width // 150))
        draw.text((entity.box[0] + 3, entity.box[1] + 2), f"{entity.phrase} [{entity.word}] {entity.score:.2f}",
                  fill=colour)
    scale = tile / canvas.width
    canvas = canvas.resize((tile, max(1, round(canvas.height * scale))))
    crop_side = tile // max(4, len(sample.entities))
    panel = Image.new("RGB", (tile, canvas.height + crop_side + 14), "white")
    panel.paste(canvas, (0, 0))
    for index, crop in enumerate(sample.crops):
        panel.paste(Image.fromarray(crop).resize((crop_side, crop_side)), (index * crop_side, canvas.height))
    ImageDraw.Draw(panel).text((2, canvas.height + crop_side + 1), sample.caption[:60], fill=(0, 0, 0))
    return panel


def contact_sheet(output: str | Path | Location, png: str | Path | Location, samples: int = 16, tile: int = 256,
                  columns: int = 4) -> Location:
    """Draw the first ``samples`` samples of a finished output folder (local or object store) into ``png``."""
    panels = [draw_sample(s, tile) for s in itertools.islice(read_samples(output), samples)]
    if not panels:
        raise ValueError(f"{output}: no samples in its shards to draw")
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    height = max(p.height for p in panels)
    sheet = Image.new("RGB", (columns * tile, rows * height), (128, 128, 128))
    for index, panel in enumerate(panels):
        sheet.paste(panel, ((index % columns) * tile, (index // columns) * height))
    png = png if isinstance(png, Location) else Location(png)
    encoded = io.BytesIO()
    sheet.save(encoded, format="PNG")
    png.write_atomic(encoded.getvalue())
    return png


def run(args: argparse.Namespace) -> int:
    path = contact_sheet(args.output, args.png or Location(args.output) / "contact_sheet.png", args.samples)
    print(f"contact sheet: {path}")
    return 0


main = cli.contact_sheet  # the command itself (parsed in pipeline/cli.py)
