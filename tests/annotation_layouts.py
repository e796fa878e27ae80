"""Annotation folders written by the rules of the code that defines each layout, not by mmdiff's writer.

- ``write_mmdiff``: as alibaba/mm-diff ``data_annotation/imagenet_annotation_demo.py`` saves them: the image
  re-saved as ``<root>/<id[:5]>/<id>.jpg`` (``id = f"{n:09d}"``), ``np.save`` of a float32 ``[H, W]`` map
  (``segmaps = torch.zeros(masks.shape[-2:])``; segment k's pixels set to k), JSON ``{"image_id", "caption",
  "segments": [{"id", "word", "start", "end", "box"}]}`` where ``word`` is a spaCy noun chunk with its
  character span and ``box`` is the detector's xyxy box with ``ceil`` on x0, y0 and ``floor`` on x1, y1.
- ``write_fastcomposer``: what mit-han-lab/fastcomposer ``data.py`` reads: the same three files under
  ``<root>/<id[:5]>/``, ``image_ids.txt`` at the root, segments with ``"bbox"`` that its
  ``SegmentProcessor`` unpacks as ``h1, w1, h2, w2`` and crops with ``image[:, w1:w2, h1:h2]`` from a
  ``[C, H, W]`` tensor, i.e. ``bbox[0]``/``bbox[2]`` are columns; an integer map.

The subjects are real photos' regions (ellipses inside hand-placed boxes); the fixture knows where each
subject is, so tests can check masks against boxes and crops against the subject.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pipeline.example_inputs import photo

# photo, caption, [(noun chunk, subject box x0, y0, x1, y1 as a detector gives it, floats)]
SCENES = {
    "chelsea": ("a cat lying on a rug", [("a cat", (40.3, 20.6, 420.2, 300.9))]),
    "astronaut": ("a woman in a space suit holding a flag", [("a woman", (110.5, 0.0, 460.7, 511.2))]),
    "rocket": ("a rocket on a launch pad next to a tower", [("a rocket", (262.2, 20.4, 358.9, 420.6)),
                                                           ("a tower", (140.1, 20.8, 258.3, 420.2))]),
}


def _segmap(size: tuple[int, int], boxes: list[tuple[float, float, float, float]], dtype) -> np.ndarray:
    width, height = size
    segmap = np.zeros((height, width), dtype)
    yy, xx = np.mgrid[:height, :width]
    for k, (x0, y0, x1, y1) in enumerate(boxes, 1):
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 - 1, (y1 - y0) / 2 - 1
        segmap[(((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0) & (segmap == 0)] = k
    return segmap


def _scene(root: Path, number: int, name: str, box_key: str, map_dtype) -> Path:
    caption, chunks = SCENES[name]
    image_id = f"{number:09d}"
    folder = root / image_id[:5]
    folder.mkdir(parents=True, exist_ok=True)
    image = photo(name)
    image.save(folder / f"{image_id}.jpg")
    np.save(folder / f"{image_id}.npy", _segmap(image.size, [b for _, b in chunks], map_dtype))
    segments = []
    for k, (chunk, box) in enumerate(chunks, 1):
        start = caption.index(chunk)
        rounded = [math.ceil(box[0]), math.ceil(box[1]), math.floor(box[2]), math.floor(box[3])]
        segments.append({"id": k, "word": chunk, "start": start, "end": start + len(chunk), box_key: rounded})
    (folder / f"{image_id}.json").write_text(json.dumps({"image_id": image_id, "caption": caption,
                                                         "segments": segments}, ensure_ascii=False), encoding="utf-8")
    return folder / f"{image_id}.jpg"


def write_mmdiff(root: Path, first: int = 0) -> list[Path]:
    return [_scene(root, first + n, name, "box", np.float32) for n, name in enumerate(SCENES)]


def write_fastcomposer(root: Path, first: int = 0) -> list[Path]:
    paths = [_scene(root, first + n, name, "bbox", np.int64) for n, name in enumerate(SCENES)]
    (root / "image_ids.txt").write_text("\n".join(p.stem for p in paths), encoding="utf-8")
    return paths


def subject_boxes(image_path: Path) -> list[tuple[float, float, float, float]]:
    """Where the subjects of a fixture image really are (xyxy, pixels of the original photo)."""
    data = json.loads(image_path.with_suffix(".json").read_text(encoding="utf-8"))
    caption = data["caption"]
    name = next(n for n, (c, _) in SCENES.items() if c == caption)
    return [box for _, box in SCENES[name][1]]
