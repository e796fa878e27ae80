"""The training-sample format shared by the preprocessing job (writer) and training (reader).

One WebDataset sample per image, all members keyed by ``__key__``:

========== =====================================================================================
member     content
========== =====================================================================================
jpg        the image, RGB, EXIF orientation applied, JPEG quality 95
txt        the caption, UTF-8
json       metadata: caption, entities (phrase, word, spans, box, score), sizes, source, models,
           config hash, format version
masks.png  per-entity binary masks stacked vertically: N x H rows by W columns, 1-bit (mode "1"; read as
           mode "L" it is 0/255); lossless, and overlapping masks stay separate
crops.png  subject crops side by side: S rows by N x S columns, RGB, background filled
faces.npy  (portraits) float32 N x 512 ArcFace embeddings, NaN rows where an entity has no face
========== =====================================================================================

Readers decode with :meth:`Sample.from_wds`; nothing here unpickles (``np.load(allow_pickle=False)``).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from preprocess.image_io import as_rgb

FORMAT_VERSION = 1
JPEG_QUALITY = 95
# zlib level 1: a third of the default level's (6) encoding time for crops about 8 % larger; lossless either way
PNG_COMPRESS_LEVEL = 1


@dataclass(frozen=True)
class Entity:
    """One subject of an image, tied to a word of the caption.

    ``word`` is the head noun that subject tokens bind to ("dog" in "a brown dog"); ``start``/``end``
    locate it in the caption (as in the official annotation format); ``phrase_start``/``phrase_end``
    locate the whole phrase. ``box`` is ``[x0, y0, x1, y1]`` in pixels of the stored image.
    """

    phrase: str
    word: str
    start: int
    end: int
    phrase_start: int
    phrase_end: int
    box: tuple[float, float, float, float]
    score: float

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Entity":
        return cls(**{**data, "box": tuple(float(v) for v in data["box"])})


@dataclass
class Sample:
    key: str
    image: Image.Image
    caption: str
    entities: list[Entity]
    masks: np.ndarray  # bool [N, H, W], H x W = image size
    crops: np.ndarray  # uint8 [N, S, S, 3]
    faces: np.ndarray | None = None  # float32 [N, 512]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.entities)
        w, h = self.image.size
        if self.masks.shape != (n, h, w):
            raise ValueError(f"sample {self.key}: masks shape {self.masks.shape} != ({n}, {h}, {w})")
        if self.crops.ndim != 4 or self.crops.shape[0] != n or self.crops.shape[3] != 3:
            raise ValueError(f"sample {self.key}: crops shape {self.crops.shape} is not ({n}, S, S, 3)")
        if self.faces is not None and self.faces.shape[0] != n:
            raise ValueError(f"sample {self.key}: faces shape {self.faces.shape} has not {n} rows")
        for entity in self.entities:
            x0, y0, x1, y1 = entity.box
            if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                raise ValueError(f"sample {self.key}: entity {entity.word!r} box {list(entity.box)} is empty, "
                                 f"inverted or outside the {w}x{h} image")
            if self.caption[entity.start : entity.end] != entity.word:
                raise ValueError(
                    f"sample {self.key}: entity word {entity.word!r} is not at caption"
                    f"[{entity.start}:{entity.end}] of {self.caption!r}"
                )

    # -- encoding ---------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        w, h = self.image.size
        return {
            "format_version": FORMAT_VERSION,
            "caption": self.caption,
            "entities": [asdict(e) for e in self.entities],
            "width": w,
            "height": h,
            "crop_size": int(self.crops.shape[1]) if len(self.entities) else 0,
            "has_faces": self.faces is not None,
            **self.meta,
        }

    def to_wds(self, jpeg: bytes | None = None) -> dict[str, Any]:
        """The WebDataset members; ``jpeg``: :func:`encode_jpeg` of the image when the caller has it already
        (the job encodes each image once, when it loads it, and its stages see that JPEG decoded)."""
        n = len(self.entities)
        w, h = self.image.size
        sample: dict[str, Any] = {
            "__key__": self.key,
            "jpg": encode_jpeg(self.image) if jpeg is None else jpeg,
            "txt": self.caption.encode("utf-8"),
            "json": json.dumps(self.metadata(), sort_keys=True).encode("utf-8"),
            # 1-bit masks: a reader's convert("L") gives the same 0/255 image as an 8-bit PNG, for an eighth
            # of the deflate work and bytes
            "masks.png": _encode(Image.fromarray(
                np.ascontiguousarray(self.masks, bool).reshape(n * h, w) if n else np.zeros((1, w), bool)
            ), "PNG", compress_level=PNG_COMPRESS_LEVEL),
            "crops.png": _encode(Image.fromarray(
                np.concatenate(list(self.crops), axis=1) if n else np.zeros((1, 1, 3), np.uint8), "RGB"
            ), "PNG", compress_level=PNG_COMPRESS_LEVEL),
        }
        if self.faces is not None:
            buffer = io.BytesIO()
            np.save(buffer, self.faces.astype(np.float32), allow_pickle=False)
            sample["faces.npy"] = buffer.getvalue()
        return sample

    @classmethod
    def from_wds(cls, sample: dict[str, Any], decode_image: bool = True) -> "Sample":
        """Decode a raw (bytes) WebDataset sample; errors name the sample key. ``decode_image=False`` only
        opens the JPEG (its size is read from the header, its pixels on first use: training with cached
        latents may never need them)."""
        key = sample.get("__key__", "<no key>")
        try:
            meta = json.loads(_bytes(sample["json"]))
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {meta.get('format_version')} != {FORMAT_VERSION}")
            image = Image.open(io.BytesIO(_bytes(sample["jpg"])))
            if decode_image:
                image.load()
                image = image.convert("RGB")
            entities = [Entity.from_dict(e) for e in meta.pop("entities")]
            n, w, h = len(entities), meta["width"], meta["height"]
            masks_img = np.asarray(Image.open(io.BytesIO(_bytes(sample["masks.png"]))).convert("L"))
            masks = (masks_img > 127).reshape(n, h, w) if n else np.zeros((0, h, w), bool)
            crops_img = np.asarray(Image.open(io.BytesIO(_bytes(sample["crops.png"]))).convert("RGB"))
            s = meta["crop_size"]
            crops = (crops_img.reshape(s, n, s, 3).transpose(1, 0, 2, 3).copy() if n
                     else np.zeros((0, 1, 1, 3), np.uint8))
            faces = None
            if "faces.npy" in sample:
                faces = np.load(io.BytesIO(_bytes(sample["faces.npy"])), allow_pickle=False)
            caption = meta.pop("caption")
            for k in ("format_version", "width", "height", "crop_size", "has_faces"):
                meta.pop(k, None)
            return cls(key, image, caption, entities, masks, crops, faces, meta)
        except Exception as exc:  # noqa: BLE001 - re-raised with the sample named
            raise ValueError(f"sample {key}: cannot decode: {exc}") from exc


def encode_jpeg(image: Image.Image) -> bytes:
    """The ``jpg`` member of ``image``: RGB, JPEG quality :data:`JPEG_QUALITY`."""
    return _encode(as_rgb(image), "JPEG", quality=JPEG_QUALITY)


def _encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _bytes(value: Any) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)
