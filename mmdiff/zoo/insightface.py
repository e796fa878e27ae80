"""insightface face analysis: a face detector plus an ArcFace recogniser (512-d identity embeddings).

``build(spec)`` returns an ``insightface.app.FaceAnalysis`` restricted to detection + recognition and
already ``prepare``-d (``ctx_id`` 0 on ``cuda`` devices, -1 on CPU). Its ``get(bgr_image)`` lists faces
with ``bbox``, ``kps``, ``det_score`` and ``normed_embedding``.

Sources: a model-pack folder of ONNX files (e.g. ``~/.insightface/models/buffalo_l``), loaded with
``FaceAnalysis(name=<folder>)`` (insightface picks each file's task from its graph's shape), or ``tiny``.
Options: ``det_size`` (detector input, default 640), ``det_thresh`` (default 0.5).

The tiny twin is a folder of two small torch modules exported with ``torch.onnx.export``:

- ``det_tiny.onnx``: SCRFD-shaped (128 x 128 input; 9 outputs = scores, box distances and 5 keypoints
  at strides 8/16/32, 2 anchors), so insightface loads it as its SCRFD detector. To make it find faces
  deterministically on real photos, the stride-32 score head's bias is set high (sigmoid about 0.95)
  and the stride-8/16 ones low, the box head's bias makes every stride-32 anchor a ~96 px box, and the
  keypoint head's bias places the ArcFace 5-point template inside that box. It finds "faces" anywhere:
  it is a shape- and plumbing-faithful stand-in, not a face detector.
- ``rec_tiny.onnx``: ArcFace-shaped (112 x 112 input, one 512-d output), random weights.

``save_tiny(path, seed)`` writes that folder; ``build`` with ``tiny`` writes it to a temporary folder
(onnxruntime loads files) and loads it from there.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmdiff.extras import require
from mmdiff.zoo.spec import ModelSpec

__all__ = ["build", "save_tiny", "TINY_DET_SIZE"]

TINY_DET_SIZE = 128
STRIDES = (8, 16, 32)
ANCHORS = 2
# ArcFace's 5-point template in its 112 x 112 crop (eyes, nose, mouth corners).
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
TINY_FACE_SIDE = 96.0  # px, side of every box the tiny detector predicts at stride 32


class TinySCRFD(nn.Module):
    """Three-level conv detector with SCRFD's output layout: per stride [anchors*H*W, 1|4|10]."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 8, stride=8), nn.ReLU())
        self.down = nn.ModuleList([nn.Identity(), nn.Conv2d(width, width, 2, stride=2), nn.Conv2d(width, width, 2, stride=2)])
        self.score = nn.ModuleList([nn.Conv2d(width, ANCHORS, 1) for _ in STRIDES])
        self.box = nn.ModuleList([nn.Conv2d(width, ANCHORS * 4, 1) for _ in STRIDES])
        self.kps = nn.ModuleList([nn.Conv2d(width, ANCHORS * 10, 1) for _ in STRIDES])
        with torch.no_grad():
            for level, stride in enumerate(STRIDES):
                for head in (self.score[level], self.box[level], self.kps[level]):
                    head.weight.mul_(0.01)
                confident = stride == STRIDES[-1]
                self.score[level].bias.fill_(3.0 if confident else -10.0)
                # box distances (left, top, right, bottom) and keypoint offsets are in stride units
                self.box[level].bias.fill_(TINY_FACE_SIDE / 2 / stride)
                offsets = (ARCFACE_TEMPLATE - 56.0) * (TINY_FACE_SIDE / 112.0) / stride
                self.kps[level].bias.copy_(torch.from_numpy(np.tile(offsets.reshape(-1), ANCHORS)))

    @staticmethod
    def _flatten(x: torch.Tensor, k: int) -> torch.Tensor:
        # [1, anchors*k, H, W] -> [H*W*anchors, k]: location-major, anchor-minor, as SCRFD's anchor centres
        return x.permute(0, 2, 3, 1).reshape(-1, k)

    def forward(self, pixels: torch.Tensor):
        feats, x = [], self.stem(pixels)
        for down in self.down:
            x = down(x)
            feats.append(x)
        scores = [self._flatten(torch.sigmoid(s(f)), 1) for s, f in zip(self.score, feats)]
        boxes = [self._flatten(b(f), 4) for b, f in zip(self.box, feats)]
        kps = [self._flatten(k(f), 10) for k, f in zip(self.kps, feats)]
        return (*scores, *boxes, *kps)


class TinyArcFace(nn.Module):
    """112 x 112 face crop -> 512-d embedding."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 8, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.embed = nn.Linear(width * 4, 512)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embed(self.features(pixels))


def save_tiny(path: Path, seed: int = 0) -> Path:
    """Write ``det_tiny.onnx`` and ``rec_tiny.onnx`` into the folder ``path``."""
    require("the tiny insightface twin (torch.onnx.export)", "dev", "onnx")  # a test model: onnx is a dev package
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    detector, recogniser = TinySCRFD().eval(), TinyArcFace().eval()
    det_names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in STRIDES]
    torch.onnx.export(detector, (torch.zeros(1, 3, TINY_DET_SIZE, TINY_DET_SIZE),), path / "det_tiny.onnx",
                      input_names=["input.1"], output_names=det_names, dynamo=False)
    torch.onnx.export(recogniser, (torch.zeros(1, 3, 112, 112),), path / "rec_tiny.onnx",
                      input_names=["input.1"], output_names=["embedding"], dynamic_axes={"input.1": {0: "batch"}},
                      dynamo=False)
    return path


def build(spec: ModelSpec):
    if spec.is_tiny:
        with tempfile.TemporaryDirectory() as folder:
            return _load(save_tiny(Path(folder), seed=spec.seed), spec, spec.options.get("det_size", TINY_DET_SIZE))
    folder = Path(spec.source).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"insightface: model pack folder {folder} not found (e.g. a buffalo_l folder)")
    return _load(folder, spec, spec.options.get("det_size", 640))


def _load(folder: Path, spec: ModelSpec, det_size: int):
    from insightface.app import FaceAnalysis

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if spec.device.startswith("cuda") else ["CPUExecutionProvider"]
    app = FaceAnalysis(name=str(folder), allowed_modules=["detection", "recognition"], providers=providers)
    if "recognition" not in app.models:
        raise ValueError(f"insightface: model pack {folder} has no recognition (ArcFace) model")
    app.prepare(ctx_id=0 if spec.device.startswith("cuda") else -1, det_thresh=spec.options.get("det_thresh", 0.5),
                det_size=(det_size, det_size))
    return app
