"""The preprocessing job: inputs -> validated images -> annotated samples -> WebDataset shards.

    python -m pipeline.preprocess --config configs/preprocess/demo.yaml [--set output.path=/tmp/x ...]

runs on an embedded Ray (or on the cluster named by RAY_ADDRESS, as under ``ray job submit``).
Exactly once: inputs are cut into key-sorted partitions; a partition is finished when its shard, rejects
file and index are on disk and the index verifies. A rerun skips finished partitions and redoes the
others from scratch, so an interrupted job resumes to the same shard set an uninterrupted one writes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from mmdiff.configuration import ConfigModel, config_hash, load_config, parse_overrides
from pipeline.config import PreprocessConfig
from pipeline.contact_sheet import contact_sheet
from pipeline.inputs import InputRecord, assign_partitions, list_inputs
from pipeline.shards import ShardLayout, finalize_partition, reject_counts, write_json_atomic
from pipeline.stages import SampleStage, load_batch

__all__ = ["JobSummary", "run_job", "content_hash", "main"]


class _Content(ConfigModel):
    """The settings that decide shard contents (not paths or resources)."""

    input_kind: str
    annotated: bool
    extensions: tuple[str, ...]
    shard_size: int
    image: Any
    annotate: Any


def content_hash(config: PreprocessConfig) -> str:
    return config_hash(_Content(input_kind=config.input.kind, annotated=config.input.annotated,
                                extensions=config.input.extensions,
                                shard_size=config.output.shard_size, image=config.image.model_dump(mode="json"),
                                annotate=config.annotate.model_dump(mode="json")))


@dataclass
class JobSummary:
    inputs: int
    written: int
    rejected: dict[str, int]
    shards: int
    processed_now: int  # inputs processed by this run (the rest were in partitions finished earlier)
    seconds: float
    images_per_second: float

    def line(self) -> str:
        rejected = ", ".join(f"{k}={v}" for k, v in self.rejected.items()) or "none"
        return (f"preprocess: {self.inputs} inputs -> {self.written} written, {sum(self.rejected.values())} "
                f"rejected ({rejected}); {self.shards} shards; {self.processed_now} processed in "
                f"{self.seconds:.1f} s = {self.images_per_second:.2f} images/s")


def _reject_row(record: InputRecord, reason: str, detail: str) -> dict[str, Any]:
    return {"key": record.key, "source": record.source, "reason": reason, "detail": detail}


def _plan(config: PreprocessConfig, records: list[InputRecord], chash: str) -> dict[str, Any]:
    listing = "\n".join(f"{r.key}\t{r.partition}\t{r.duplicate}" for r in records)
    return {"config_hash": chash, "inputs": len(records), "partitions": records[-1].partition + 1 if records else 0,
            "listing_sha256": hashlib.sha256(listing.encode()).hexdigest()}


def _init_ray(config: PreprocessConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")  # set for jobs by `ray job submit`
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False)


def _dataset(config: PreprocessConfig, records: list[InputRecord], chash: str):
    import ray

    load, annotate = config.stages.load, config.stages.annotate
    rows = [{k: v for k, v in asdict(r).items() if k not in ("duplicate", "order")} for r in records]
    blocks = max(1, min(len(rows) // max(1, load.batch_size), 200))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(load_batch, fn_kwargs={"image": config.image}, batch_format="pandas",
                        batch_size=load.batch_size, compute=ray.data.TaskPoolStrategy(size=load.concurrency),
                        num_cpus=load.num_cpus)
    # Ray Data restarts a dead actor and retries its batch (max_restarts/max_task_retries default to -1
    # for actor pools); staging by batch keys + the driver's dedupe keep that exactly once.
    return ds.map_batches(
        SampleStage, fn_constructor_kwargs={"config": config, "content_hash": chash}, batch_format="pandas",
        batch_size=annotate.batch_size, compute=ray.data.ActorPoolStrategy(size=annotate.concurrency),
        num_cpus=annotate.num_cpus, num_gpus=annotate.num_gpus,
    )


def run_job(config: PreprocessConfig) -> JobSummary:
    """Run (or resume) the job ``config`` describes; returns the summary also written to manifest.json."""
    from tqdm import tqdm

    started = time.perf_counter()
    layout = ShardLayout(config.output.path)
    chash = content_hash(config)
    records = assign_partitions(list_inputs(config.input), config.output.shard_size)
    plan = _plan(config, records, chash)
    if layout.plan.is_file():
        previous = json.loads(layout.plan.read_text(encoding="utf-8"))
        if previous != plan:
            raise RuntimeError(f"{layout.root} holds the output of a different job (plan.json: config or inputs "
                               "changed); use a new output.path")
    write_json_atomic(layout.plan, plan)

    partitions: dict[int, list[InputRecord]] = {}
    for record in records:
        partitions.setdefault(record.partition, []).append(record)
    pending = {k: v for k, v in partitions.items() if not layout.is_finished(k)}
    for partition in pending:
        shutil.rmtree(layout.staging_dir(partition), ignore_errors=True)  # a half-staged earlier attempt
    todo = [r for rs in pending.values() for r in rs if not r.duplicate]
    expected = {k: {r.key for r in rs if not r.duplicate} for k, rs in pending.items()}
    outcomes: dict[int, dict[str, dict[str, Any]]] = {k: {} for k in pending}

    def finish(partition: int) -> None:
        rows = outcomes.pop(partition)
        rejects = [_reject_row(r, "duplicate_key", f"key {r.key} already used by an earlier input")
                   for r in pending[partition] if r.duplicate]
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
        for batch in _dataset(config, todo, chash).iter_batches(batch_size=None, batch_format="pandas"):
            for row in batch.to_dict("records"):
                partition = int(row["partition"])
                if partition not in outcomes or row["key"] in outcomes[partition]:
                    continue  # a retried batch reported again: already counted
                outcomes[partition][row["key"]] = row
                bar.update(1)
                if len(outcomes[partition]) == len(expected[partition]):
                    finish(partition)
        bar.close()
    if outcomes:
        lost = {k: sorted(expected[k] - set(v))[:5] for k, v in outcomes.items()}
        raise RuntimeError(f"inputs never came back from the pipeline (partition: first keys): {lost}")
    shutil.rmtree(layout.staging, ignore_errors=True)
    summary = _write_manifest(config, layout, chash, records, len(todo), time.perf_counter() - started)
    if config.qa_samples and summary.written:
        contact_sheet(layout.root, layout.root / "contact_sheet.png", config.qa_samples)
    return summary


def _write_manifest(config: PreprocessConfig, layout: ShardLayout, chash: str, records: list[InputRecord],
                    processed: int, seconds: float) -> JobSummary:
    indexes = layout.finished_indexes()
    rejects = layout.all_rejects()
    written = sum(len(i["samples"]) for i in indexes)
    counts = reject_counts(rejects)
    if written + len(rejects) != len(records):
        raise RuntimeError(f"accounting error: {len(records)} inputs != {written} written + {len(rejects)} rejected")
    manifest = {
        "inputs": len(records), "written": written, "rejected": counts,
        "shards": [{"shard": i["shard"], "samples": len(i["samples"]), "sha256": i["sha256"]} for i in indexes],
        "config": config.model_dump(mode="json"), "config_hash": chash,
        "models": {name: data.get("model") for name in ("caption", "detect", "segment", "faces")
                   if (data := getattr(config.annotate, name)) is not None},
    }
    manifest["manifest_hash"] = hashlib.sha256(json.dumps(
        {k: manifest[k] for k in ("inputs", "written", "rejected", "shards", "config_hash")}, sort_keys=True
    ).encode()).hexdigest()[:16]
    summary = JobSummary(inputs=len(records), written=written, rejected=counts, shards=len(indexes),
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
    summary = run_job(config)
    print(summary.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
