"""Real photos for demos, tests and benchmarks, written from scikit-image's offline sample data.

``write_photos`` writes the photos as JPEG files; ``write_annotation_folder`` writes them in the
FastComposer / MM-Diff annotation format with hand-placed boxes and elliptical segments (a stand-in for
human annotation: the photos are real, the masks are approximate), for the importer path.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m pipeline.example_inputs`: parse (and answer --help) before the imports below
    import sys

    import pipeline.cli

    sys.exit(pipeline.cli.example_inputs())

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import cli

__all__ = ["PHOTOS", "CAPTIONS", "ANNOTATIONS", "photo", "write_photos", "write_annotation_folder", "write_caption_shard"]

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "horse", "camera")

# BLIP-2 style captions, for inputs that bring their own (img2dataset shards).
CAPTIONS = {
    "astronaut": "a woman in a space suit holding a flag",
    "chelsea": "a cat lying on a rug",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on a launch pad next to a tower",
    "stereo_motorcycle": "a red motorcycle parked in a garage",
    "horse": "a silhouette of a horse running",
    "camera": "a man holding a camera on a tripod",
}

# caption and (word, box xyxy) per photo, boxes in pixels of the original photo.
ANNOTATIONS = {
    "astronaut": ("a woman in a space suit holding a flag", [("woman", (110, 0, 460, 512))]),
    "chelsea": ("a cat lying on a rug", [("cat", (40, 20, 420, 300))]),
    "coffee": ("a cup of coffee on a saucer", [("cup", (60, 40, 520, 380))]),
    "rocket": ("a rocket on a launch pad next to a tower", [("rocket", (260, 20, 360, 420)),
                                                             ("tower", (140, 20, 260, 420))]),
}


def photo(name: str) -> Image.Image:
    """A scikit-image sample photo as an RGB PIL image."""
    import skimage.data

    array = getattr(skimage.data, name)()
    if isinstance(array, tuple):  # stereo pairs
        array = array[0]
    array = np.asarray(array)
    if array.dtype == bool:  # the horse silhouette
        array = array.astype(np.uint8) * 255
    return Image.fromarray(array).convert("RGB")


def write_photos(folder: str | Path, names: tuple[str, ...] = PHOTOS, prefix: str = "") -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{prefix}{name}.jpg"
        photo(name).save(path, quality=92)
        paths.append(path)
    return paths


def write_annotation_folder(folder: str | Path, names: tuple[str, ...] = tuple(ANNOTATIONS)) -> list[Path]:
    """Images + ``.json`` segments + ``.npy`` integer maps (segment ids from 1; 0 = background)."""
    folder = Path(folder)
    paths = write_photos(folder, names)
    for path, name in zip(paths, names):
        caption, segments = ANNOTATIONS[name]
        width, height = photo(name).size
        segmap = np.zeros((height, width), np.int32)
        yy, xx = np.mgrid[:height, :width]
        records = []
        for segment_id, (word, (x0, y0, x1, y1)) in enumerate(segments, 1):
            cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
            inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
            segmap[inside & (segmap == 0)] = segment_id
            start = caption.index(word)
            records.append({"id": segment_id, "word": word, "start": start, "end": start + len(word),
                            "bbox": [x0, y0, x1, y1]})
        np.save(path.with_suffix(".npy"), segmap, allow_pickle=False)
        path.with_suffix(".json").write_text(json.dumps({"caption": caption, "segments": records}), encoding="utf-8")
    return paths


def write_caption_shard(path: str | Path, names: tuple[str, ...] = PHOTOS, size: int = 256) -> Path:
    """An img2dataset-style WebDataset tar: ``%09d.jpg`` + ``.txt`` caption + ``.json`` per photo."""
    import io

    import webdataset as wds

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
        for index, name in enumerate(names):
            image = photo(name)
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=92)
            writer.write({"__key__": f"{index:09d}", "jpg": buffer.getvalue(), "txt": CAPTIONS[name].encode(),
                          "json": json.dumps({"name": name}).encode()})
    return path


def run(args: argparse.Namespace) -> int:
    if args.kind == "photos":
        written = write_photos(args.folder)
    elif args.kind == "annotated":
        written = write_annotation_folder(args.folder)
    else:
        written = [write_caption_shard(Path(args.folder) / "shard-000000.tar")]
    print(f"wrote {len(written)} file(s) under {args.folder}")
    return 0


main = cli.example_inputs  # the command itself (parsed in pipeline/cli.py)
