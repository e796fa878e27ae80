"""The preprocessing job: inputs -> validated images -> annotated samples -> WebDataset shards.

    python -m pipeline.preprocess --config configs/preprocess/demo.yaml [--set output.path=/tmp/x ...]

runs on an embedded Ray (or on the cluster named by RAY_ADDRESS, as under ``ray job submit``).
Exactly once: inputs are cut into key-sorted partitions; a partition is finished when its shard, rejects
file and index are on disk and the index verifies. A rerun skips finished partitions and redoes the
others from scratch, so an interrupted job resumes to the same shard set an uninterrupted one writes.
One input never stops the job: an exception on it is its reject; a batch whose worker process keeps
dying is retried input by input and the input whose worker still dies is rejected as ``worker_crash``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from mmdiff.configuration import ConfigModel, config_hash, load_config, parse_overrides
from pipeline.config import PreprocessConfig
from pipeline.contact_sheet import contact_sheet
from pipeline.inputs import InputRecord, Listing, Skip, assign_partitions, list_inputs
from pipeline.lock import OutputLock, OutputLocked
from pipeline.shards import ShardLayout, finalize_partition, reject_counts, write_json_atomic
from pipeline.stages import RECORD_FIELDS, content_batching, sample_stages

__all__ = ["JobSummary", "EmptyInputError", "run_job", "content_hash", "main"]


class EmptyInputError(ValueError):
    """The listing found no input at all (the message says what it saw instead)."""


class _Content(ConfigModel):
    """The settings that decide shard contents (not paths or resources)."""

    input_kind: str
    annotated: bool
    extensions: tuple[str, ...]
    shard_size: int
    image: Any
    annotate: Any
    operator: str | None
    batching: dict[str, int] | None  # pipeline.stages.content_batching: batched inference is not bit-exact


def content_hash(config: PreprocessConfig) -> str:
    return config_hash(_Content(input_kind=config.input.kind, annotated=config.input.annotated,
                                extensions=config.input.extensions,
                                shard_size=config.output.shard_size, image=config.image.model_dump(mode="json"),
                                annotate=config.annotate.model_dump(mode="json"),
                                operator=config.stages.annotate.operator, batching=content_batching(config)))


@dataclass
class JobSummary:
    seen: int
    inputs: int
    written: int
    rejected: dict[str, int]
    skipped: dict[str, int]
    shards: int
    processed_now: int  # inputs processed by this run (the rest were in partitions finished earlier)
    seconds: float
    images_per_second: float
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        rejected = ", ".join(f"{k}={v}" for k, v in self.rejected.items()) or "none"
        skipped = ", ".join(f"{k}={v}" for k, v in self.skipped.items()) or "none"
        return (f"preprocess: {self.seen} seen, {self.inputs} inputs -> {self.written} written, "
                f"{sum(self.rejected.values())} rejected ({rejected}); {sum(self.skipped.values())} skipped "
                f"({skipped}); {self.shards} shards; {self.processed_now} processed in "
                f"{self.seconds:.1f} s = {self.images_per_second:.2f} images/s")


def _reject_row(record: InputRecord, reason: str, detail: str) -> dict[str, Any]:
    return {"key": record.key, "source": record.source, "reason": reason, "detail": detail}


def _plan(records: list[InputRecord], skipped: list[Skip], chash: str) -> dict[str, Any]:
    listing = "\n".join(f"{r.key}\t{r.partition}\t{r.reason}" for r in records)
    skips = "\n".join(f"{s.source}\t{s.reason}" for s in skipped)
    return {"config_hash": chash, "inputs": len(records), "skipped": len(skipped),
            "partitions": records[-1].partition + 1 if records else 0,
            "listing_sha256": hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest(),
            "skipped_sha256": hashlib.sha256(skips.encode("utf-8", "surrogateescape")).hexdigest()}


def _init_ray(config: PreprocessConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")  # set for jobs by `ray job submit`
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False)


def fixed_batches(records: list[InputRecord], batch_size: int) -> list[dict[str, Any]]:
    """Dataset rows: per partition, its inputs in key order cut into batches of ``batch_size``. The
    composition depends only on the listing and the batch size, never on timing or concurrency."""
    by_partition: dict[int, list[InputRecord]] = {}
    for record in records:
        by_partition.setdefault(record.partition, []).append(record)
    rows = []
    for partition, members in sorted(by_partition.items()):
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            rows.append({"batch": f"{partition}:{chunk[0].key}", "partition": partition,
                         "inputs": json.dumps([{k: getattr(r, k) for k in RECORD_FIELDS} for r in chunk])})
    return rows


def _dataset(config: PreprocessConfig, rows: list[dict[str, Any]], chash: str, alone: bool = False):
    """The sample stages over the fixed-batch ``rows``; ``alone``: see :func:`pipeline.stages.sample_stages`."""
    import ray

    # A block whose worker died more than crash_retries times is dropped here, not fatal: the driver
    # sees its inputs missing and narrows them down (run_job).
    ray.data.DataContext.get_current().max_errored_blocks = -1
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 1000)))
    return sample_stages(ds, config, chash, alone)


def run_job(config: PreprocessConfig) -> JobSummary:
    """Run (or resume) the job ``config`` describes; returns the summary also written to manifest.json."""
    layout = ShardLayout(config.output.path)
    with OutputLock(layout.lock, config.output.lease_seconds) as lock:
        return _run_locked(config, layout, lock)


def _run_locked(config: PreprocessConfig, layout: ShardLayout, lock: OutputLock) -> JobSummary:
    from tqdm import tqdm

    started = time.perf_counter()
    chash = content_hash(config)
    listing = list_inputs(config.input)
    if not listing.inputs:
        reasons = reject_counts([s.row() for s in listing.skipped])
        raise EmptyInputError(f"input.path {config.input.path} holds no input ({config.input.kind}): "
                              f"{listing.seen} entries seen, skipped by reason: {reasons or 'none'}")
    records = assign_partitions(listing.inputs, config.output.shard_size)
    plan = _plan(records, listing.skipped, chash)
    if layout.plan.is_file():
        previous = json.loads(layout.plan.read_text(encoding="utf-8"))
        if previous != plan:
            changed = sorted(k for k in plan if previous.get(k) != plan[k])
            raise RuntimeError(f"{layout.root} holds the output of a different job (plan.json differs in {changed}: "
                               "the settings that decide the bytes, or the inputs, changed); use a new output.path")
    write_json_atomic(layout.plan, plan)
    layout.write_skipped([s.row() for s in listing.skipped])

    partitions: dict[int, list[InputRecord]] = {}
    for record in records:
        partitions.setdefault(record.partition, []).append(record)
    pending = {k: v for k, v in partitions.items() if not layout.is_finished(k)}
    for partition in pending:
        shutil.rmtree(layout.staging_dir(partition), ignore_errors=True)  # a half-staged earlier attempt
    todo = [r for rs in pending.values() for r in rs if not r.reason]
    expected = {k: {r.key for r in rs if not r.reason} for k, rs in pending.items()}
    outcomes: dict[int, dict[str, dict[str, Any]]] = {k: {} for k in pending}

    def finish(partition: int) -> None:
        lock.check()
        rows = outcomes.pop(partition)
        rejects = [_reject_row(r, r.reason, r.detail) for r in pending[partition] if r.reason]
        rejects += [{k: row[k] for k in ("key", "source", "reason", "detail")} for row in rows.values()
                    if row["status"] != "ok"]
        finalize_partition(layout, partition, [k for k, row in rows.items() if row["status"] == "ok"], rejects)

    for partition in [k for k, keys in expected.items() if not keys]:
        finish(partition)
    if todo:
        _init_ray(config)
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = False  # one bar: ours, counting images
        bar = tqdm(total=len(todo), desc="preprocess", unit="img", disable=not config.progress, file=sys.stderr)

        def collect(batches: list[dict[str, Any]], alone: bool = False) -> list[InputRecord]:
            """Run the batches; return the inputs that never came back (their worker kept dying)."""
            for batch in _dataset(config, batches, chash, alone).iter_batches(batch_size=None, batch_format="pandas"):
                for row in batch.to_dict("records"):
                    partition = int(row["partition"])
                    if partition not in outcomes or row["key"] in outcomes[partition]:
                        continue  # a retried batch reported again: already counted
                    outcomes[partition][row["key"]] = {**row, **json.loads(row["outcome"])}
                    bar.update(1)
                    if len(outcomes[partition]) == len(expected[partition]):
                        finish(partition)
            return [r for r in todo if r.partition in outcomes and r.key not in outcomes[r.partition]]

        # First in fixed batches; then whatever a dying worker took down, one input per batch.
        missing = collect(fixed_batches(todo, config.stages.annotate.batch_size))
        if missing:
            missing = collect(fixed_batches(missing, 1), alone=True)
        for record in missing:
            retries = config.stages.annotate.crash_retries
            outcomes[record.partition][record.key] = {
                **_reject_row(record, "worker_crash", f"{record.source}: a worker process died on this input "
                              f"alone {retries + 1} time(s) after dying on its batch; see the Ray worker logs "
                              "for the signal"), "status": "rejected"}
            bar.update(1)
        for partition in list(outcomes):
            finish(partition)
        bar.close()
    shutil.rmtree(layout.staging, ignore_errors=True)
    summary = _write_manifest(config, layout, chash, records, listing, len(todo), time.perf_counter() - started)
    if config.qa_samples and summary.written:
        try:
            contact_sheet(layout.root, layout.root / "contact_sheet.png", config.qa_samples)
        except Exception as exc:  # noqa: BLE001 - the QA picture never fails a finished job
            summary.notes.append(f"contact sheet not drawn: {type(exc).__name__}: {exc}")
    if lock.taken_over:
        summary.notes.append(lock.taken_over)
    return summary


def _write_manifest(config: PreprocessConfig, layout: ShardLayout, chash: str, records: list[InputRecord],
                    listing: Listing, processed: int, seconds: float) -> JobSummary:
    indexes = layout.finished_indexes()
    rejects = layout.all_rejects()
    written = sum(len(i["samples"]) for i in indexes)
    counts = reject_counts(rejects)
    skipped = reject_counts([s.row() for s in listing.skipped])
    if written + len(rejects) != len(records) or len(records) + len(listing.skipped) != listing.seen:
        raise RuntimeError(f"accounting error: {listing.seen} seen, {len(records)} inputs != {written} written + "
                           f"{len(rejects)} rejected, {len(listing.skipped)} skipped")
    manifest = {
        "seen": listing.seen, "inputs": len(records), "written": written, "rejected": counts, "skipped": skipped,
        "shards": [{"shard": i["shard"], "samples": len(i["samples"]), "sha256": i["sha256"]} for i in indexes],
        "config": config.model_dump(mode="json"), "config_hash": chash,
        "models": {name: data.get("model") for name in ("caption", "detect", "segment", "faces")
                   if (data := getattr(config.annotate, name)) is not None},
    }
    manifest["manifest_hash"] = hashlib.sha256(json.dumps(
        {k: manifest[k] for k in ("seen", "inputs", "written", "rejected", "skipped", "shards", "config_hash")},
        sort_keys=True
    ).encode()).hexdigest()[:16]
    summary = JobSummary(seen=listing.seen, inputs=len(records), written=written, rejected=counts, skipped=skipped,
                         shards=len(indexes),
                         processed_now=processed, seconds=seconds,
                         images_per_second=processed / seconds if seconds > 0 else 0.0)
    manifest["last_run"] = asdict(summary)
    write_json_atomic(layout.manifest, manifest)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/preprocess/<name>.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    args = parser.parse_args(argv)
    config = load_config(args.config, PreprocessConfig, parse_overrides(args.set))
    try:
        summary = run_job(config)
    except (OutputLocked, EmptyInputError) as exc:
        print(f"preprocess: error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(summary.line(), flush=True)
    for note in summary.notes:
        print(f"preprocess: {note}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
