"""A 64-bit perceptual hash per image, and the Hamming distance between hashes, flips included.

The hash is a DCT pHash: the image in gray (colour jitter moves hue and saturation, which gray mostly
ignores), shrunk to 32 x 32 with an area filter (resizing and re-encoding change little at that size),
its 2-D DCT-II, and one bit per coefficient of the 8 x 8 lowest frequencies (DC excluded from the
median): above the median or not. Bits compare to a median, so brightness and contrast shifts leave them
unchanged; low frequencies move little under a small crop.

A horizontal flip reverses each row, which multiplies the DCT coefficient of horizontal frequency u by
(-1)^u exactly: the flipped image's hash comes from the same coefficients with the odd columns negated,
at no extra cost. Two images are compared in both orientations (:func:`distance`), so a mirrored copy is
as near as a plain one.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.fft import dctn

__all__ = ["HASH_SIZE", "image_hashes", "hash_bits", "distance", "hamming", "hex_hash"]

HASH_SIZE = 8  # 8 x 8 low frequencies -> 64 bits
_SIDE = 32
_FLIP_SIGNS = np.array([(-1.0) ** u for u in range(HASH_SIZE)])  # along the horizontal frequency axis
_WEIGHTS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def _bits(coefficients: np.ndarray) -> int:
    flat = coefficients.reshape(-1)
    median = np.median(flat[1:])  # the DC term is the mean brightness, not structure
    return int((flat > median).astype(np.uint64) @ _WEIGHTS)


def image_hashes(image: Image.Image) -> tuple[int, int]:
    """(hash of the image, hash of its horizontal mirror), each a 64-bit unsigned int."""
    gray = np.asarray(image.convert("L").resize((_SIDE, _SIDE), Image.Resampling.BOX), dtype=np.float64)
    low = dctn(gray, type=2, norm="ortho")[:HASH_SIZE, :HASH_SIZE]  # rows: vertical, columns: horizontal freq
    return _bits(low), _bits(low * _FLIP_SIGNS[None, :])


def hash_bits(value: int) -> np.ndarray:
    return np.unpackbits(np.array([value], dtype=">u8").view(np.uint8))


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Bits that differ, elementwise over uint64 arrays (or ints)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))


def distance(hash_a: np.ndarray | int, hashes_b: np.ndarray | int, flipped_b: np.ndarray | int) -> np.ndarray:
    """The distance from ``hash_a`` to images b in the nearer orientation: min(d(a, b), d(a, mirror(b)))."""
    return np.minimum(hamming(hash_a, hashes_b), hamming(hash_a, flipped_b))


def hex_hash(value: int) -> str:
    return f"{value:016x}"
