"""The curation pass: near-duplicates and benchmark overlap found over the whole job, before any model runs.

    listing -> hash (tasks) -> [embed (actor pool)] -> bucket codes -> groupby(shard) -> pair edges
            -> clusters (one Ray task) -> decisions per partition (groupby(partition), one file each)

It runs once per output folder, after the listing and before the main pass, so a duplicate costs no GPU
time: the main pass's listing files are then rewritten without the rejected inputs, which go to the
partition's listing rejects (``duplicate_of``, ``benchmark_overlap``) and end in its rejects file.

- ``hash``: each fixed group's inputs are read and validated as the main pass's ``load`` does (an input it
  rejects is left to the main pass, which records why); per image the perceptual hashes of the whole image
  and of its centre crops, both orientations (:mod:`preprocess.perceptual_hash`); an input within the
  decontamination threshold of a benchmark reference is rejected here.
- ``embed`` (with ``dedup.embedding``): one actor pool; each actor builds the model once and embeds the
  benchmark references once; each group's images in micro-batches of ``stages.embed.batch_size`` in input
  order (the same batches in every run), L2-normalised; overlap with a reference is rejected here too.
- candidate pairs (multi-index hashing, :func:`hash_buckets`): per image, bucket codes: its variants' band
  values (index) and its whole hash's band values and their one-bit neighbours (probes), and with
  embeddings its random-hyperplane signature bands. Codes are hashed to shards (about one per 8,192
  inputs); each image becomes one row per shard it has codes in, and Ray Data groups the rows by shard.
  A shard task collapses exact copies (identical hashes) onto their smallest key, finds the pairs that
  share a bucket with sorted arrays (no per-bucket Python), and compares them exactly, vectorised. With
  16-bit bands a bucket holds about N / 65,536 unrelated images per variant, so the work per image stays
  small as N grows, where 8-bit bands made it grow as N / 256. Nothing of the tables passes through the
  driver: it holds object references only.
- clusters: the edges go to one Ray task, a union-find over the images that have a duplicate at all (the
  rest never appear: its memory follows the duplicates, not the job); each cluster keeps the largest original resolution, then the largest file (of equal
  resolutions, the least compressed: web copies are usually re-encoded smaller), then the smallest key.
- decisions: the same task writes each partition's rejected keys (clusters' non-representatives and the
  inputs the stages rejected) to ``<out>/curation/part-k.jsonl``; the driver writes
  ``<out>/curation/summary.json`` last (the pass is complete exactly when it exists: a resumed job reuses it).

Everything is a function of the listing and the settings in the config hash, so the shards stay
byte-reproducible: groups are fixed, bucket contents are sets, clusters and their representatives do
not depend on the order edges arrive in.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

from pipeline.curation_config import DecontaminationConfig, DedupConfig, curation_enabled
from pipeline.inputs import InputRecord, read_bytes
from pipeline.shards import ShardLayout, _jsonl, _read_jsonl, write_json_atomic
from pipeline.storage import Location
from preprocess.image_io import ImageConfig, load_image
from preprocess.perceptual_hash import hamming, image_hashes
from preprocess.quality import QualityConfig, QualityHeads, image_rejection

__all__ = ["CurationFiles", "needs_listing", "run_curation", "curation_manifest", "variant_hashes",
           "hash_distances", "BenchmarkReferences", "read_references"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_EMPTY = b""
_EDGE_COLUMNS = ["a", "b", "a_pixels", "b_pixels", "a_bytes", "b_bytes", "a_partition", "b_partition", "a_source",
                 "b_source", "kind", "score"]
_DECISION_COLUMNS = ["key", "partition", "reason", "detail"]


class CurationFiles:
    """``<out>/curation/``: ``part-k.jsonl`` (partition k's rejected keys), ``summary.json`` (written last),
    ``edges/`` never: edges live in Ray's object store only."""

    def __init__(self, layout: ShardLayout) -> None:
        self.root = layout.root / "curation"
        self.summary = self.root / "summary.json"

    def decisions(self, partition: int) -> Location:
        return self.root / f"part-{partition:06d}.jsonl"

    def read_summary(self) -> dict[str, Any] | None:
        return json.loads(self.summary.read_text()) if self.summary.is_file() else None


def needs_listing(config: Any, layout: ShardLayout) -> bool:
    """Whether the listing must be written for every partition, finished ones too: the curation pass
    reads all of them, once (a folder whose pass is complete reuses its decisions)."""
    return curation_enabled(config) and not CurationFiles(layout).summary.is_file()


# -- hashes -------------------------------------------------------------------------------------------
def _centre(image: Any, fraction: float) -> Any:
    width, height = image.size
    w, h = max(1, round(width * fraction)), max(1, round(height * fraction))
    x, y = (width - w) // 2, (height - h) // 2
    return image.crop((x, y, x + w, y + h))


def variant_hashes(image: Any, crops: tuple[float, ...]) -> np.ndarray:
    """uint64 [1 + len(crops), 2]: (hash, mirrored hash) of the whole image, then of each centre crop."""
    return np.array([image_hashes(image)] + [image_hashes(_centre(image, c)) for c in crops], dtype=np.uint64)


def hash_distances(a: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Distance from image ``a`` (variants [V, 2]) to each of ``others`` ([N, V, 2]): the fewest differing
    bits between a whole image and the other's whole image or centre crop, in either direction and either
    orientation (a crop of an image is near the image's centre crop, a mirror near its mirrored hash)."""
    whole_a = a[0, 0]
    to_others = hamming(whole_a, others.reshape(len(others), -1)).min(axis=1)  # a whole vs b's variants
    from_others = hamming(others[:, 0, :1], a.reshape(1, -1)).min(axis=1)  # b whole vs a's variants
    return np.minimum(to_others, from_others)


def _pack(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def _unpack_hashes(data: bytes, variants: int) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint64).reshape(variants, 2)


# -- benchmark references -------------------------------------------------------------------------------
class BenchmarkReferences:
    """Every image under the decontamination benchmarks: names (``<benchmark>/<relative path>``),
    sha256 of the bytes, variant hashes [R, V, 2], and the bytes' locations for the embedding actors."""

    def __init__(self, names: list[str], sha256: list[str], hashes: np.ndarray, urls: list[str],
                 benchmarks: list[dict[str, Any]]) -> None:
        self.names, self.sha256, self.hashes, self.urls, self.benchmarks = names, sha256, hashes, urls, benchmarks

    def __len__(self) -> int:
        return len(self.names)


def read_references(config: DecontaminationConfig, dedup: DedupConfig) -> BenchmarkReferences:
    """Read and hash every benchmark image (small sets: DreamBench has 158). A benchmark with no image is
    an error naming it: a check against nothing would pass silently."""
    names, digests, hashes, urls, benchmarks = [], [], [], [], []
    for spec in config.benchmarks:
        root = Location(spec, config.storage_options)
        if not root.is_dir():
            raise FileNotFoundError(f"decontamination.benchmarks: {spec} is not a folder")
        files = [f for f in root.glob("**/*") if f.name.lower().endswith(IMAGE_SUFFIXES)]
        if not files:
            raise ValueError(f"decontamination.benchmarks: {spec} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        label = root.name
        entries = []
        for file in files:
            data = file.read_bytes()
            relative = file.path[len(root.path.rstrip("/")) + 1:]
            loaded = load_image(data, f"{spec}/{relative}", ImageConfig(min_side=1, max_aspect_ratio=1e9))
            names.append(f"{label}/{relative}")
            digests.append(hashlib.sha256(data).hexdigest())
            hashes.append(variant_hashes(loaded.image, dedup.hash_crops))
            urls.append(file.url)
            entries.append({"name": f"{label}/{relative}", "sha256": digests[-1]})
        benchmarks.append({"benchmark": spec, "references": entries})
    variants = 1 + len(dedup.hash_crops)
    table = np.stack(hashes) if hashes else np.zeros((0, variants, 2), np.uint64)
    return BenchmarkReferences(names, digests, table, urls, benchmarks)


def _nearest(distances: np.ndarray) -> tuple[int, float]:
    index = int(np.argmin(distances))
    return index, float(distances[index])


# -- the hash stage --------------------------------------------------------------------------------------
def hash_batch(batch: pd.DataFrame, image: ImageConfig, storage_options: dict[str, Any], dedup: DedupConfig,
               quality: QualityConfig, threshold: int, references: np.ndarray, reference_names: list[str],
               embed: bool) -> pd.DataFrame:
    """Per fixed group: each input's state (JSON: key, partition, source, pixels, reason, detail), its
    variant hashes and, when an embedding stage follows, its image (the JPEG the main pass would store).
    Benchmark overlap is checked first, then the image quality filters."""
    from preprocess.sample import encode_jpeg

    out = []
    for row in batch.to_dict("records"):
        states, hashes, images = [], [], []
        for fields in json.loads(row["inputs"]):
            record = InputRecord(**fields)
            state = {"key": record.key, "partition": record.partition, "source": record.source, "pixels": 0,
                     "bytes": 0, "status": "ok", "reason": "", "detail": ""}
            packed, jpeg = _EMPTY, _EMPTY
            try:
                data = read_bytes(record, storage_options)
                loaded = load_image(data, record.source, image)
            except Exception:  # noqa: BLE001 - the main pass reads it again and records why it fails
                state["status"] = "skip"
            else:
                variants = variant_hashes(loaded.image, dedup.hash_crops)
                packed = _pack(variants)
                state.update(pixels=loaded.original_size[0] * loaded.original_size[1], bytes=len(data))
                if len(references):
                    index, nearest = _nearest(hash_distances(variants, references))
                    if nearest <= threshold:
                        state.update(status="rejected", reason="benchmark_overlap",
                                     detail=f"{record.source}: near benchmark reference {reference_names[index]} "
                                            f"(perceptual hash distance {int(nearest)} <= {threshold})")
                if state["status"] == "ok" and (failed := image_rejection(loaded.image, quality, record.source)):
                    state.update(status="rejected", reason=failed[0], detail=failed[1])
                if embed and state["status"] == "ok":
                    jpeg = encode_jpeg(loaded.image)
            states.append(state)
            hashes.append(packed)
            images.append(jpeg)
        out.append({"batch": row["batch"], "inputs": json.dumps(states), "hashes": hashes, "images": images,
                    "embeddings": [_EMPTY] * len(states)})
    return pd.DataFrame(out, columns=["batch", "inputs", "hashes", "images", "embeddings"])


class EmbedStage:
    """Actor: the embedding model built once; each group's images embedded in fixed micro-batches."""

    def __init__(self, dedup: DedupConfig, quality: QualityConfig, batch_size: int, threshold: float,
                 reference_urls: list[str], reference_names: list[str], storage_options: dict[str, Any],
                 roster: Any = None) -> None:
        from pipeline.roster import enroll
        from preprocess.embedding import ImageEmbedder

        enroll(roster)

        self.embedder = ImageEmbedder(dedup.embedding, batch_size)
        self.heads = QualityHeads(quality) if quality.heads else None
        self.threshold, self.reference_names = threshold, reference_names
        references = [_open_rgb(Location(url, storage_options).read_bytes()) for url in reference_urls]
        self.references = self.embedder(references) if references else np.zeros((0, 1), np.float32)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = []
        for row in batch.to_dict("records"):
            states = json.loads(row["inputs"])
            todo = [i for i, s in enumerate(states) if s["status"] == "ok"]
            vectors = self.embedder([_open_rgb(row["images"][i]) for i in todo]) if todo else []
            embeddings = [_EMPTY] * len(states)
            for i, vector in zip(todo, vectors):
                embeddings[i] = _pack(vector.astype(np.float32))
                if len(self.references):
                    index, similarity = _nearest(-(self.references @ vector))
                    if -similarity >= self.threshold:
                        states[i].update(status="rejected", reason="benchmark_overlap",
                                         detail=f"{states[i]['source']}: near benchmark reference "
                                                f"{self.reference_names[index]} (embedding cosine "
                                                f"{-similarity:.4f} >= {self.threshold})")
            if self.heads is not None and todo:
                for i, failed in zip(todo, self.heads(np.asarray(vectors), [states[i]["source"] for i in todo])):
                    if failed and states[i]["status"] == "ok":
                        states[i].update(status="rejected", reason=failed[0], detail=failed[1])
            out.append({**row, "inputs": json.dumps(states), "images": [_EMPTY] * len(states),
                        "embeddings": embeddings})
        return pd.DataFrame(out, columns=["batch", "inputs", "hashes", "images", "embeddings"])


def _open_rgb(data: bytes) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


# -- candidate pairs ------------------------------------------------------------------------------------------
# A bucket code: bit 63 the kind (0 hash, 1 embedding), bits 32-62 the band, bits 0-31 the band's value.
_EMBEDDING_KIND = np.uint64(1 << 63)
_INDEX, _PROBE = np.uint8(0), np.uint8(1)
_ROW_COLUMNS = ["shard", "key", "partition", "pixels", "bytes", "source", "hashes", "embedding", "codes", "roles"]


def _hyperplanes(dim: int, bands: int, bits: int) -> np.ndarray:
    return np.random.default_rng(20231).standard_normal((dim, bands * bits)).astype(np.float32)


def hash_buckets(variants: np.ndarray, band_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multi-index hashing of images' variant hashes ([N, V, 2]): bucket codes, roles (index or probe) and
    owners (the image's row), each image's codes distinct.

    Each hash is cut into ``64 / band_bits`` bands. Index entries: every band value of every variant in both
    orientations (what a whole image may be compared to). Probe entries: every band value of the whole
    image's own hash (what is compared) and each value one bit away. A probe meets an index entry of the
    same code exactly when the whole image's band is within one bit of the other's variant's band, so two
    images whose compared hashes differ in at most ``2 * bands - 1`` bits always meet (some band then differs
    in at most one bit)."""
    count = len(variants)
    bands = np.arange(64 // band_bits, dtype=np.uint64)
    shifts, mask, tags = bands * np.uint64(band_bits), np.uint64((1 << band_bits) - 1), bands << np.uint64(32)
    index = ((variants.reshape(count, -1, 1) >> shifts) & mask | tags).reshape(count, -1)
    whole = (variants[:, 0, 0, None] >> shifts) & mask  # [N, bands]
    flips = np.concatenate([[0], np.uint64(1) << np.arange(band_bits, dtype=np.uint64)]).astype(np.uint64)
    probes = ((whole[:, :, None] ^ flips) | tags[:, None]).reshape(count, -1)
    codes, roles, owners = [], [], []
    for entries, role in ((index, _INDEX), (probes, _PROBE)):
        entries = np.sort(entries, axis=1)
        first = np.ones(entries.shape, bool)
        first[:, 1:] = entries[:, 1:] != entries[:, :-1]  # an image's repeated code once
        codes.append(entries[first])
        roles.append(np.full(int(first.sum()), role))
        owners.append(np.nonzero(first)[0])
    return np.concatenate(codes), np.concatenate(roles), np.concatenate(owners)


def embedding_buckets(vectors: np.ndarray, planes: np.ndarray, bands: int, bits: int) -> np.ndarray:
    """Random-hyperplane signatures of embeddings ([N, D]), [N, bands] codes (index entries: pairs sharing
    one are compared)."""
    signs = (vectors @ planes > 0).reshape(len(vectors), bands, bits).astype(np.uint64)
    values = signs @ (np.uint64(1) << np.arange(bits, dtype=np.uint64))
    return values | (np.arange(bands, dtype=np.uint64) << np.uint64(32)) | _EMBEDDING_KIND


def shard_of(codes: np.ndarray, shards: int) -> np.ndarray:
    """The shard (Ray task of the pair step) of each bucket code: a multiplicative hash, the same in every run."""
    mixed = (codes * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(33)
    return (mixed % np.uint64(shards)).astype(np.int64)


def band_rows(batch: pd.DataFrame, dedup: DedupConfig, shards: int) -> pd.DataFrame:
    """Per input still in play, one row per shard its bucket codes fall in (the codes and roles of that shard
    packed in the row, with the input's hashes and, for embedding codes, its embedding); per input that is
    rejected, nothing (its decision is already made)."""
    ok = [(state, hashes, embedding) for row in batch.to_dict("records")
          for state, hashes, embedding in zip(json.loads(row["inputs"]), row["hashes"], row["embeddings"])
          if state["status"] == "ok"]
    states, packed, embeddings = (list(column) for column in zip(*ok)) if ok else ([], [], [])
    if not states:
        return pd.DataFrame([], columns=_ROW_COLUMNS)
    variants = np.frombuffer(b"".join(packed), dtype=np.uint64).reshape(len(states), 1 + len(dedup.hash_crops), 2)
    codes, roles, owners = hash_buckets(variants, dedup.hash_band_bits)
    embedded = [i for i, e in enumerate(embeddings) if e]
    if embedded:
        vectors = np.stack([np.frombuffer(embeddings[i], dtype=np.float32) for i in embedded])
        planes = _hyperplanes(vectors.shape[1], dedup.embedding_bands, dedup.embedding_band_bits)
        extra = embedding_buckets(vectors, planes, dedup.embedding_bands, dedup.embedding_band_bits)
        codes = np.concatenate([codes, extra.reshape(-1)])
        roles = np.concatenate([roles, np.full(extra.size, _INDEX)])
        owners = np.concatenate([owners, np.repeat(embedded, dedup.embedding_bands)])
    where = shard_of(codes, shards)
    order = np.lexsort((where, owners))
    codes, roles, owners, where = codes[order], roles[order], owners[order], where[order]
    starts = np.flatnonzero(np.concatenate([[True], (owners[1:] != owners[:-1]) | (where[1:] != where[:-1])]))
    out = []
    for start, end in zip(starts, np.append(starts[1:], len(codes))):
        state, mine = states[owners[start]], codes[start:end]
        has_embedding = bool((mine & _EMBEDDING_KIND).any())
        out.append({"shard": int(where[start]), **{k: state[k] for k in ("key", "partition", "pixels", "bytes", "source")},
                    "hashes": packed[owners[start]], "embedding": embeddings[owners[start]] if has_embedding else _EMPTY,
                    "codes": _pack(mine), "roles": _pack(roles[start:end])})
    return pd.DataFrame(out, columns=_ROW_COLUMNS)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(s, s + c)`` for each start and count."""
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(counts.sum()) - offsets + np.repeat(starts, counts)


def candidate_pairs(codes: np.ndarray, roles: np.ndarray, owners: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of owners (a < b, each pair once per kind) that share a bucket: a hash probe and a hash index
    entry of the same code, or two embedding entries of the same code. Returns (a, b, is_embedding)."""
    hash_kind = (codes & _EMBEDDING_KIND) == 0
    found = []
    index = hash_kind & (roles == _INDEX)
    order = np.argsort(codes[index], kind="stable")
    index_codes, index_owners = codes[index][order], owners[index][order]
    probe = hash_kind & (roles == _PROBE)
    low = np.searchsorted(index_codes, codes[probe], "left")
    counts = np.searchsorted(index_codes, codes[probe], "right") - low
    found.append((np.repeat(owners[probe], counts), index_owners[_ranges(low, counts)], False))
    order = np.argsort(codes[~hash_kind], kind="stable")
    shared_codes, shared_owners = codes[~hash_kind][order], owners[~hash_kind][order]
    later = np.arange(1, len(shared_codes) + 1)
    counts = np.searchsorted(shared_codes, shared_codes, "right") - later
    found.append((np.repeat(shared_owners, counts), shared_owners[_ranges(later, counts)], True))
    pairs, span = [], np.int64(owners.max(initial=0)) + 1
    for a, b, embedding in found:
        keep = a != b
        unique = np.sort(np.minimum(a, b)[keep].astype(np.int64) * span + np.maximum(a, b)[keep])
        unique = unique[np.concatenate([unique[:1] >= 0, unique[1:] != unique[:-1]])]  # sorted, each once
        pairs.append((unique // span, unique % span, np.full(len(unique), embedding)))
    return tuple(np.concatenate(parts) for parts in zip(*pairs))


_CHUNK = 1 << 18  # candidate pairs compared at once: bounds a shard's working memory


def pair_distances(hashes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """:func:`hash_distances` of many pairs at once: images ``a[i]`` and ``b[i]`` of ``hashes`` [N, V, 2]."""
    whole, values = hashes[:, 0, 0], hashes.reshape(len(hashes), -1)
    return np.minimum(hamming(whole[a, None], values[b]).min(axis=1), hamming(whole[b, None], values[a]).min(axis=1))


def _embedding_dim(group: pd.DataFrame) -> int:
    return max(len(e) for e in group["embedding"]) // 4


def shard_pairs(group: pd.DataFrame, dedup: DedupConfig) -> pd.DataFrame:
    """The near-duplicate pairs among one shard's buckets, each once per kind (a < b by key).

    Exact copies first: images with the same hashes (every variant) are at distance 0, duplicates of the
    smallest key among them, which stands in for all of them in the hash buckets (so a photo repeated a
    thousand times costs one image's pairs, not a million). Then the candidate pairs are compared exactly,
    vectorised: the job's rule on the hashes (:func:`hash_distances`), the cosine on the embeddings."""
    group = group.sort_values("key", kind="stable").reset_index(drop=True)  # row order = key order
    if len(group) < 2:
        return pd.DataFrame([], columns=_EDGE_COLUMNS)
    variants = 1 + len(dedup.hash_crops)
    hashes = np.frombuffer(b"".join(group["hashes"]), dtype=np.uint64).reshape(len(group), variants, 2)
    same = np.unique(hashes.reshape(len(group), -1), axis=0, return_inverse=True)[1].reshape(-1)
    first = np.full(same.max() + 1, len(group))
    np.minimum.at(first, same, np.arange(len(group)))
    stand_in = first[same]
    codes = [np.frombuffer(c, dtype=np.uint64) for c in group["codes"]]
    owners = np.repeat(np.arange(len(group)), [len(c) for c in codes])
    codes = np.concatenate(codes)
    roles = np.frombuffer(b"".join(group["roles"]), dtype=np.uint8)
    hash_kind = (codes & _EMBEDDING_KIND) == 0
    owners = np.where(hash_kind, stand_in[owners], owners)
    a, b, embedding = candidate_pairs(codes, roles, owners)
    copies = np.flatnonzero(stand_in != np.arange(len(group)))
    ha, hb = a[~embedding], b[~embedding]
    distances = np.concatenate([pair_distances(hashes, ha[s:s + _CHUNK], hb[s:s + _CHUNK])
                                for s in range(0, len(ha), _CHUNK)] or [np.zeros(0, np.uint8)])
    near = distances <= dedup.hash_threshold
    parts = [(stand_in[copies], copies, "hash", np.zeros(len(copies))), (ha[near], hb[near], "hash", distances[near])]
    if embedding.any():
        ea, eb = a[embedding], b[embedding]
        vectors = np.zeros((len(group), _embedding_dim(group)), np.float32)
        for i in np.unique(np.concatenate([ea, eb])):
            vectors[i] = np.frombuffer(group["embedding"].iloc[i], dtype=np.float32)
        cosines = np.concatenate([np.einsum("ij,ij->i", vectors[ea[s:s + _CHUNK]], vectors[eb[s:s + _CHUNK]])
                                  for s in range(0, len(ea), _CHUNK)])
        near = cosines >= dedup.embedding_threshold
        parts.append((ea[near], eb[near], "embedding", cosines[near]))
    columns = {name: group[name].to_numpy() for name in ("key", "pixels", "bytes", "partition", "source")}
    frames = []
    for left, right, kind, scores in parts:
        frame = {f"{side}_{name}": columns[name][rows] for side, rows in (("a", left), ("b", right))
                 for name in ("pixels", "bytes", "partition", "source")}
        frames.append(pd.DataFrame({"a": columns["key"][left], "b": columns["key"][right], **frame, "kind": kind,
                                    "score": scores.astype(float)}, columns=_EDGE_COLUMNS))
    return pd.concat(frames, ignore_index=True)


# -- clusters --------------------------------------------------------------------------------------------
def resolve_clusters(*edge_frames: pd.DataFrame, examples: int = 24) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Runs as a Ray task: connected components of the duplicate graph; per cluster the representative
    (largest original resolution, then the largest file: the least compressed, then the smallest key) is kept and every other member rejected as
    ``duplicate_of`` naming it, with the edge evidence nearest to it. Returns the decisions and a summary
    (cluster count, sizes, and the largest ``examples`` clusters for the report)."""
    parent: dict[str, str] = {}
    info: dict[str, tuple[int, int, int, str]] = {}  # key -> (pixels, bytes, partition, source)
    evidence: dict[str, str] = {}

    def find(key: str) -> str:
        root = key
        while parent[root] != root:
            root = parent[root]
        while parent[key] != root:
            parent[key], key = root, parent[key]
        return root

    frames = [f for f in edge_frames if len(f)]
    edges = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame([], columns=_EDGE_COLUMNS)
    # a pair shares buckets in several shards: once per kind is enough
    for edge in edges.drop_duplicates(["a", "b", "kind"]).itertuples(index=False):
        for key, pixels, size, partition, source in (
                (edge.a, edge.a_pixels, edge.a_bytes, edge.a_partition, edge.a_source),
                (edge.b, edge.b_pixels, edge.b_bytes, edge.b_partition, edge.b_source)):
            parent.setdefault(key, key)
            info[key] = (int(pixels), int(size), int(partition), source)
        root_a, root_b = find(edge.a), find(edge.b)
        if root_a != root_b:
            parent[max(root_a, root_b)] = min(root_a, root_b)
        text = f"{edge.kind} {'distance' if edge.kind == 'hash' else 'cosine'} {edge.score:.4g}"
        for key, other in ((edge.a, edge.b), (edge.b, edge.a)):
            evidence[f"{key}\t{other}"] = min(evidence.get(f"{key}\t{other}", text), text)
    members: dict[str, list[str]] = {}
    for key in sorted(parent):
        members.setdefault(find(key), []).append(key)
    decisions, clusters = [], []
    for group in members.values():
        best = min(group, key=lambda k: (-info[k][0], -info[k][1], k))
        for key in group:
            if key != best:
                why = evidence.get(f"{key}\t{best}", "same cluster through other duplicates")
                decisions.append({"key": key, "partition": info[key][2], "reason": "duplicate_of",
                                  "detail": f"{info[key][3]}: duplicate of {best} ({info[best][3]}; {why})"})
        clusters.append({"representative": best, "sources": [info[best][3]] + [info[k][3] for k in group if k != best],
                         "keys": [best] + [k for k in group if k != best]})
    clusters.sort(key=lambda c: (-len(c["keys"]), c["representative"]))
    sizes = Counter(len(c["keys"]) for c in clusters)
    summary = {"clusters": len(clusters), "duplicates": len(decisions),
               "cluster_sizes": {str(k): v for k, v in sorted(sizes.items())}, "examples": clusters[:examples]}
    return pd.DataFrame(decisions, columns=_DECISION_COLUMNS), summary


def write_decisions(root: Location, rejected: int, *frames: pd.DataFrame) -> dict[str, Any]:
    """Runs as a Ray task: the first ``rejected`` frames are inputs the hash and embed stages rejected, the
    others duplicate edges (none when dedup is off). Clusters the edges (:func:`resolve_clusters`) and writes
    each partition's decisions to ``<out>/curation/part-k.jsonl`` (sorted by key). Holds the rejected
    inputs and the images that have a duplicate, never the whole job. Returns the counts by reason and the
    dedup summary."""
    decided = [f for f in frames[:rejected] if len(f)]
    summary = None
    if len(frames) > rejected:
        duplicates, summary = resolve_clusters(*frames[rejected:])
        decided.append(duplicates)
    table = pd.concat(decided) if decided else pd.DataFrame([], columns=_DECISION_COLUMNS)
    for partition, group in table.groupby("partition", sort=True):
        rows = sorted(({"key": r["key"], "reason": r["reason"], "detail": r["detail"]} for r in group.to_dict("records")),
                      key=lambda r: r["key"])
        (root / f"part-{int(partition):06d}.jsonl").write_atomic(_jsonl(rows))
    return {"rejected": dict(sorted(Counter(table["reason"]).items())), "dedup": summary}


# -- the pass ---------------------------------------------------------------------------------------------
def _decide(config: Any, layout: ShardLayout, partitions: int, roster: Any) -> dict[str, Any]:
    """The pass; its embedding actors enroll in ``roster`` (pipeline.roster.actor_roster)."""
    import ray

    from pipeline.preprocess import _listing_source

    files = CurationFiles(layout)
    files.root.remove()  # a pass interrupted earlier: its decisions are redone whole
    dedup, decon, stages = config.dedup, config.decontamination, config.stages
    references = read_references(decon, dedup)
    embed = dedup.embedding is not None
    ds = _listing_source([layout.listing_file(k) for k in range(partitions)], stages.load.num_cpus)
    ds = ds.map_batches(hash_batch, batch_format="pandas", batch_size=max(1, stages.load.batch_size // stages.annotate.batch_size),
                        fn_kwargs={"image": config.image, "storage_options": config.input.storage_options,
                                   "dedup": dedup, "quality": config.quality, "threshold": decon.hash_threshold, "references": references.hashes,
                                   "reference_names": references.names, "embed": embed},
                        compute=ray.data.TaskPoolStrategy(size=stages.load.concurrency), num_cpus=stages.load.num_cpus,
                        max_retries=stages.load.crash_retries)
    if embed:
        ds = ds.map_batches(EmbedStage, batch_format="pandas", batch_size=1,
                            fn_constructor_kwargs={"dedup": dedup, "quality": config.quality,
                                                   "batch_size": stages.embed.batch_size,
                                                   "threshold": decon.embedding_threshold,
                                                   "reference_urls": references.urls,
                                                   "reference_names": references.names,
                                                   "storage_options": decon.storage_options, "roster": roster},
                            compute=ray.data.ActorPoolStrategy(size=stages.embed.concurrency),
                            num_cpus=stages.embed.num_cpus, num_gpus=stages.embed.num_gpus, max_restarts=-1,
                            max_task_retries=stages.embed.crash_retries)
    # pair shards: bucket codes hashed to ~1 shard per 32 listing partitions (8,192 inputs at the default
    # shard size), so a task's buckets stay a bounded share of the job; the pairs found do not depend on it
    shards = max(1, min(256, -(-partitions // 32)))
    groups = ds.materialize()  # read twice below (rejected inputs, band rows): computed once
    rejected = groups.map_batches(_rejected_frame, batch_format="pandas").to_pandas_refs()
    edges = []
    if dedup.enabled:
        edges = (groups.map_batches(band_rows, fn_kwargs={"dedup": dedup, "shards": shards}, batch_format="pandas")
                 .groupby("shard", num_partitions=shards)
                 .map_groups(shard_pairs, fn_kwargs={"dedup": dedup}, batch_format="pandas").to_pandas_refs())
    decide = ray.remote(num_cpus=stages.load.num_cpus, max_retries=config.output.finalize_retries)(write_decisions)
    summary = ray.get(decide.remote(files.root, len(rejected), *rejected, *edges))
    if summary["dedup"] is not None:
        summary["dedup"]["settings"] = dedup.model_dump(mode="json")
    counts = summary["rejected"]
    summary["decontamination"] = {
        "benchmarks": references.benchmarks, "hash_threshold": decon.hash_threshold,
        "embedding_threshold": decon.embedding_threshold if embed else None,
        "embedding_model": dedup.embedding.model_dump(mode="json") if embed else None,
        "overlaps": counts.get("benchmark_overlap", 0)} if decon.benchmarks else None
    write_json_atomic(files.summary, summary)
    return summary


def _rejected_frame(batch: pd.DataFrame) -> pd.DataFrame:
    rows = [{k: s[k] for k in _DECISION_COLUMNS} for inputs in batch["inputs"] for s in json.loads(inputs)
            if s["status"] == "rejected"]
    return pd.DataFrame(rows, columns=_DECISION_COLUMNS)


def run_curation(config: Any, layout: ShardLayout, partitions: int, todo: dict[int, int]) -> None:
    """The pass (unless this folder's is complete), then each pending partition's listing rewritten without
    the inputs it rejected; ``todo`` (partition -> inputs the main pass processes) is updated."""
    from pipeline.preprocess import fixed_batches
    from pipeline.roster import actor_roster

    files = CurationFiles(layout)
    if not files.summary.is_file():
        started = time.perf_counter()
        with actor_roster() as roster:
            summary = _decide(config, layout, partitions, roster)
        rejected = ", ".join(f"{k}={v}" for k, v in summary["rejected"].items()) or "none"
        print(f"curation: {partitions} partitions -> rejected {rejected} in {time.perf_counter() - started:.1f} s",
              flush=True)
    for partition in todo:
        path = files.decisions(partition)
        if not path.is_file():
            continue
        decided = {row["key"]: row for row in _read_jsonl(path)}
        records = [InputRecord(**fields) for row in layout.read_listing(partition)
                   for fields in json.loads(row["inputs"])]
        kept = [r for r in records if r.key not in decided]
        rejects = layout.read_listing_rejects(partition) + [
            {"key": r.key, "source": r.source, "reason": decided[r.key]["reason"], "detail": decided[r.key]["detail"]}
            for r in records if r.key in decided]
        layout.write_listing(partition, fixed_batches(kept, config.stages.annotate.batch_size), rejects)
        todo[partition] = len(kept)


def curation_manifest(layout: ShardLayout) -> dict[str, Any]:
    """What the manifest records of the pass: the dedup result and the decontamination check."""
    summary = CurationFiles(layout).read_summary()
    if summary is None:
        return {}
    dedup = summary.get("dedup")
    return {"dedup": None if dedup is None else {k: v for k, v in dedup.items() if k != "examples"},
            "decontamination": summary.get("decontamination")}
