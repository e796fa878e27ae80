"""The preprocessing job's curation settings: ``dedup:`` and ``decontamination:`` (configs/preprocess/*.yaml).

Both run in the curation pass (:mod:`pipeline.dedup`) before any model stage, and every setting here
that decides which inputs are rejected goes into the job's config hash.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from mmdiff.configuration import ConfigModel
from mmdiff.zoo.spec import ModelSpec

__all__ = ["DedupConfig", "DecontaminationConfig", "curation_enabled", "curation_content"]


class DedupConfig(ConfigModel):
    """Exact and near-duplicate detection over the whole job.

    Two inputs are near-duplicates when their perceptual hashes (:mod:`preprocess.perceptual_hash`) are at
    most ``hash_threshold`` bits apart (either orientation, the whole image against the whole image or a
    centre crop of ``hash_crops`` of the other), or, with an ``embedding`` model, when their embeddings'
    cosine similarity is at least ``embedding_threshold``. Duplicates form clusters (connected components);
    each cluster keeps one representative: the largest original resolution (width x height), then the
    largest file (of equal resolutions the least compressed), then the smallest key. The others are rejected as ``duplicate_of`` naming it.

    Candidate pairs come from multi-index hashing, so the work per image stays about constant as the job
    grows: each 64-bit hash is cut into bands of ``hash_band_bits`` (16: four bands); an image's whole hash
    probes, per band, its own value and the values one bit away, against the band values of every other
    image's variants (both orientations). Two images within ``2 * 64 / hash_band_bits - 1`` bits (7) always
    meet in a bucket, farther pairs up to the threshold usually do. A band value is shared by about
    ``N / 2 ** hash_band_bits`` unrelated images per variant, so an image meets about ``N / 130`` unrelated
    candidates with 16-bit bands (each found and compared in ~1.4 us; 8-bit bands made it ``N / 5``);
    past ~10 million inputs, 32-bit bands keep it near zero at a guarantee of 3 bits. Exact copies
    (identical hashes) count once. Embeddings are banded by ``embedding_bands`` random-hyperplane
    signatures of ``embedding_band_bits`` bits each (seeded: the same hyperplanes in every run).
    """

    enabled: bool = False
    hash_threshold: int = Field(default=10, ge=0, le=64)
    # centre crops (side fraction) hashed beside the whole image: a crop of up to ~20 % matches one of them
    hash_crops: tuple[float, ...] = (0.9, 0.85, 0.8)
    hash_band_bits: int = Field(default=16, ge=4, le=32)
    embedding: ModelSpec | None = None  # family clip_vision (e.g. configs/models/clip_vision_vitl14.yaml)
    embedding_threshold: float = Field(default=0.95, gt=0, le=1)
    embedding_bands: int = Field(default=16, ge=1)
    embedding_band_bits: int = Field(default=10, ge=1, le=30)

    @model_validator(mode="after")
    def _checks(self) -> "DedupConfig":
        if 64 % self.hash_band_bits:
            raise ValueError(f"dedup.hash_band_bits {self.hash_band_bits} must divide 64")
        if any(not 0.3 <= c < 1 for c in self.hash_crops):
            raise ValueError(f"dedup.hash_crops {self.hash_crops}: each a side fraction in [0.3, 1)")
        if self.embedding is not None and self.embedding.family != "clip_vision":
            raise ValueError(f"dedup.embedding: family {self.embedding.family!r}; an image embedding model of "
                             "family clip_vision is needed")
        return self


class DecontaminationConfig(ConfigModel):
    """Evaluation benchmarks kept out of the training set.

    ``benchmarks``: folders or URLs in an evaluation benchmark layout (DreamBench ``<root>/<subject>/*.jpg``,
    portraits ``<folder>/<person>/*.jpg``): every image file under each is a reference. An input whose
    perceptual hash is within ``hash_threshold`` bits of a reference (as for dedup: either orientation,
    centre crops), or whose embedding (``dedup.embedding``, when set) has cosine similarity at least
    ``embedding_threshold`` with one, is rejected as ``benchmark_overlap`` naming the reference. The
    manifest records the check (each reference's sha256), which evaluation reads back."""

    benchmarks: list[str] = []
    storage_options: dict[str, Any] = {}  # for benchmark URLs (as input.storage_options); never written out
    hash_threshold: int = Field(default=10, ge=0, le=64)
    embedding_threshold: float = Field(default=0.9, gt=0, le=1)


def curation_enabled(config: Any) -> bool:
    """Whether the job runs the curation pass (``config``: a PreprocessConfig)."""
    return (config.dedup.enabled or bool(config.decontamination.benchmarks) or config.quality.image_filters
            or bool(config.quality.heads))


def curation_content(config: Any) -> dict[str, Any] | None:
    """The curation settings that decide shard contents (None when no curation runs, so a job without it
    keeps the hash it had before curation existed). The embedding micro-batch is there too: batched
    inference is not bit-exact, and a similarity near a threshold could flip."""
    if not curation_enabled(config):
        return {"min_subject_area": config.quality.min_subject_area} if config.quality.min_subject_area else None
    embedding = config.dedup.embedding is not None
    return {"min_subject_area": config.quality.min_subject_area,"dedup": config.dedup.model_dump(mode="json"),
            "decontamination": config.decontamination.model_dump(mode="json", exclude={"storage_options"}),
            "quality": config.quality.model_dump(mode="json", exclude={"min_subject_area"}),
            "embed_batch": config.stages.embed.batch_size if embedding else None,
            "group": config.stages.annotate.batch_size if embedding else None}
