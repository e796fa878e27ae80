"""The preprocessing job: inputs -> validated images -> annotated samples -> WebDataset shards.

    mmdiff-preprocess --config configs/preprocess/demo.yaml [--set output.path=/tmp/x ...]
    python -m pipeline.preprocess ...      # the same command (its flags are in pipeline/cli.py)

runs on an embedded Ray (or on the cluster named by RAY_ADDRESS, as under ``ray job submit``).
Exactly once: the listing is cut into partitions (input i of the listing -> partition i // shard_size); a
partition is finished when its shard, rejects file and index are on disk and match the index. A rerun
skips finished partitions and redoes the others from scratch, so an interrupted job resumes to the same
shard set an uninterrupted one writes. One input never stops the job: an exception on it is its reject;
a batch whose worker process keeps dying is retried input by input and the input whose worker still dies
is rejected as ``worker_crash`` (if the output still takes a write). An output that cannot be written (no
space left, read-only, unreachable) is the job's failure, never an input's: the job stops with
:class:`~pipeline.storage.OutputUnwritable` naming the file (exit status 3), records nothing for the
inputs it could not write, and a rerun once the output is writable finishes them.

The driver's memory does not grow with the dataset beyond a few bytes per input: the listing streams
through it once (one partition held at a time, written to ``<out>/listing`` where the dataset's read tasks
read it), result rows are counted per partition as they arrive and dropped when the partition is handed
to a finalize task, and the manifest is built from the indexes one at a time. What it keeps for the whole
job: one 64-bit digest per input (duplicates, :class:`pipeline.inputs.DigestTable`) and a few numbers per
pending partition.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m pipeline.preprocess`: parse (and answer --help) before the heavy imports below
    import sys

    import pipeline.cli

    sys.exit(pipeline.cli.preprocess())

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from mmdiff.configuration import ConfigModel, config_hash, load_config, parse_overrides
from pipeline import cli
from pipeline.config import PreprocessConfig
from pipeline.contact_sheet import contact_sheet
from pipeline.curation_config import curation_content, curation_enabled
from pipeline.dedup import curation_manifest, needs_listing, run_curation
from pipeline.inputs import InputRecord, Skip, iter_listing, iter_partitions
from pipeline.lock import OutputLock, OutputLocked
from pipeline.report import write_report
from pipeline.shards import JsonlStream, ShardLayout, finalize_partition, write_json_atomic
from pipeline.roster import actor_roster
from pipeline.stages import RECORD_FIELDS, UNWRITTEN, content_batching, sample_stages
from pipeline.storage import Location, OutputUnwritable, UnsupportedStorage

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


class _CuratedContent(_Content):
    """A job with curation (pipeline.curation_config.curation_content); one without keeps its old hash."""

    curation: dict[str, Any]


def content_hash(config: PreprocessConfig) -> str:
    curation = curation_content(config)
    fields = dict(input_kind=config.input.kind, annotated=config.input.annotated, extensions=config.input.extensions,
                  shard_size=config.output.shard_size, image=config.image.model_dump(mode="json"),
                  annotate=config.annotate.model_dump(mode="json"), operator=config.stages.annotate.operator,
                  batching=content_batching(config))
    return config_hash(_Content(**fields) if curation is None else _CuratedContent(**fields, curation=curation))


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


@dataclass
class _Listed:
    """What streaming the listing leaves the driver: counts, hashes and the partitions still to do."""

    shard_size: int
    seen: int = 0
    inputs: int = 0
    partitions: int = 0
    skipped: Counter = field(default_factory=Counter)
    todo: dict[int, int] = field(default_factory=dict)  # pending partition -> inputs its stages process
    listing_sha256: Any = field(default_factory=hashlib.sha256)
    skipped_sha256: Any = field(default_factory=hashlib.sha256)

    def plan(self, chash: str) -> dict[str, Any]:
        return {"config_hash": chash, "inputs": self.inputs, "skipped": sum(self.skipped.values()),
                "partitions": self.partitions, "listing_sha256": self.listing_sha256.hexdigest(),
                "skipped_sha256": self.skipped_sha256.hexdigest()}

    def size(self, partition: int) -> int:
        return min(self.shard_size, self.inputs - partition * self.shard_size)


def _list(config: PreprocessConfig, layout: ShardLayout, skipped: JsonlStream) -> _Listed:
    """Stream the listing once: skips into ``skipped``; per partition not finished yet, its fixed batches
    and the inputs the listing rejected into ``<out>/listing``. Holds one partition at a time."""
    listed = _Listed(config.output.shard_size)

    def skip(item: Skip) -> None:
        listed.seen += 1
        listed.skipped[item.reason] += 1
        listed.skipped_sha256.update(f"{item.source}\t{item.reason}\n".encode("utf-8", "surrogateescape"))
        skipped.write(item.row())

    every_partition = needs_listing(config, layout)  # the curation pass reads finished partitions too
    for members in iter_partitions(iter_listing(config.input), config.output.shard_size, skip):
        partition = members[0].partition
        listed.seen += len(members)
        listed.inputs += len(members)
        listed.partitions = partition + 1
        for record in members:
            listed.listing_sha256.update(f"{record.key}\t{partition}\t{record.reason}\n".encode())
        finished = layout.is_finished(partition, config.output.verify)
        if finished and not every_partition:
            continue
        work = [r for r in members if not r.reason]
        layout.write_listing(partition, fixed_batches(work, config.stages.annotate.batch_size),
                             [_reject_row(r, r.reason, r.detail) for r in members if r.reason])
        if not finished:
            listed.todo[partition] = len(work)
    return listed


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
        members.sort(key=lambda r: r.key)
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            rows.append({"batch": f"{partition}:{chunk[0].key}", "partition": partition,
                         "inputs": json.dumps([{k: getattr(r, k) for k in RECORD_FIELDS} for r in chunk])})
    return rows


def _listing_source(files: list[Location], num_cpus: float):
    """Fixed-batch rows read by Ray Data's read tasks from the listing files (never through the driver).
    The reads are small: ``num_cpus`` (the load stage's share), not Ray Data's default of a whole CPU,
    which the actor pools of a small machine may leave no room for."""
    import ray

    return ray.data.read_text([f.path for f in files], filesystem=files[0].arrow_filesystem(),
                              num_cpus=num_cpus).map(lambda row: json.loads(row["text"]), num_cpus=num_cpus)


def _finalize_task(root: Location, partition: int, written: list[str], rejects: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs as a Ray task: packs one partition (:func:`pipeline.shards.finalize_partition`), returns its counts."""
    index = finalize_partition(ShardLayout(root), partition, written, rejects)
    return {"partition": partition, "written": len(index["samples"]), "rejected": index["rejected"],
            "bytes": index["bytes"], "sha256": index["sha256"]}


class _Finalizer:
    """Submits one finalize task per complete partition, at most ``output.finalize_in_flight`` at once,
    and checks each result's counts against the listing as it arrives."""

    def __init__(self, config: PreprocessConfig, layout: ShardLayout, lock: OutputLock, listed: _Listed) -> None:
        import ray

        out = config.output
        self._remote = ray.remote(num_cpus=out.finalize_cpus, max_retries=out.finalize_retries)(_finalize_task)
        self._root, self._lock, self._listed = layout.root, lock, listed
        self._limit = out.finalize_in_flight
        self._in_flight: list[Any] = []

    def submit(self, partition: int, outcomes: list[dict[str, Any]]) -> None:
        self._lock.check()
        while len(self._in_flight) >= self._limit:
            self._collect()
        written = [row["key"] for row in outcomes if row["status"] == "ok"]
        rejects = [{k: row[k] for k in ("key", "source", "reason", "detail")} for row in outcomes if row["status"] != "ok"]
        self._in_flight.append(self._remote.remote(self._root, partition, written, rejects))

    def _collect(self) -> None:
        import ray

        done, self._in_flight = ray.wait(self._in_flight, num_returns=1)
        try:
            result = ray.get(done[0])
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, OutputUnwritable):
                raise OutputUnwritable(f"{exc.cause}; the job stopped before finishing partition(s)") from None
            raise
        if result["written"] + result["rejected"] != self._listed.size(result["partition"]):
            raise RuntimeError(f"accounting error: partition {result['partition']} has {self._listed.size(result['partition'])} "
                               f"inputs but its shard holds {result['written']} and its rejects {result['rejected']}")

    def drain(self) -> None:
        while self._in_flight:
            self._collect()

    def cancel(self) -> None:
        """The job failed: stop the finalize tasks still in flight and wait (bounded) until they have ended, so
        none writes into the output once its lease is released (another job may own it then) nor holds CPUs
        into the session's next job. A partition cut short has no index yet: the rerun redoes it."""
        import ray

        for ref in self._in_flight:
            ray.cancel(ref)
        ray.wait(self._in_flight, num_returns=len(self._in_flight), timeout=_CANCEL_WAIT_S)
        self._in_flight = []


_CANCEL_WAIT_S = 60.0


def run_job(config: PreprocessConfig) -> JobSummary:
    """Run (or resume) the job ``config`` describes; returns the summary also written to manifest.json.
    However it ends, the Ray actors it started have been killed and its tasks have ended (or been cancelled)
    when it returns: their CPUs come back to the Ray session at once (pipeline.roster)."""
    layout = ShardLayout(config.output.path, config.output.storage_options)
    with OutputLock(layout.lock, config.output.lease_seconds) as lock:
        return _run_locked(config, layout, lock)


def _run_locked(config: PreprocessConfig, layout: ShardLayout, lock: OutputLock) -> JobSummary:
    started = time.perf_counter()
    chash = content_hash(config)
    layout.remove_temporaries()  # a killed writer's: this job holds the folder, nobody else writes there
    skipped = JsonlStream(layout.skipped)
    try:
        listed = _list(config, layout, skipped)
        if not listed.inputs:
            raise EmptyInputError(f"input.path {config.input.path} holds no input ({config.input.kind}): "
                                  f"{listed.seen} entries seen, skipped by reason: {dict(sorted(listed.skipped.items())) or 'none'}")
        plan = listed.plan(chash)
        if layout.plan.is_file():
            previous = json.loads(layout.plan.read_text())
            if previous != plan:
                changed = sorted(k for k in plan if previous.get(k) != plan[k])
                raise RuntimeError(f"{layout.root} holds the output of a different job (plan.json differs in {changed}: "
                                   "the settings that decide the bytes, or the inputs, changed); use a new output.path")
    except BaseException:
        skipped.discard()
        layout.listing.remove()  # ours: written by this listing
        raise
    write_json_atomic(layout.plan, plan)
    skipped.commit()
    if listed.todo:
        _init_ray(config)
        if curation_enabled(config):  # pipeline.dedup: duplicates and benchmark overlap out before any model
            run_curation(config, layout, listed.partitions, listed.todo)
        _process(config, layout, lock, chash, listed)
    layout.remove_scratch()
    summary = _write_manifest(config, layout, chash, listed, sum(listed.todo.values()), time.perf_counter() - started)
    if config.qa_samples and summary.written:
        try:
            contact_sheet(layout.root, layout.root / "contact_sheet.png", config.qa_samples)
        except Exception as exc:  # noqa: BLE001 - the QA picture never fails a finished job
            summary.notes.append(f"contact sheet not drawn: {type(exc).__name__}: {exc}")
    if config.report_samples:
        try:
            write_report(layout.root, config.report_samples)
        except Exception as exc:  # noqa: BLE001 - nor does the report (pipeline.report)
            summary.notes.append(f"data report not written: {type(exc).__name__}: {exc}")
    if lock.taken_over:
        summary.notes.append(lock.taken_over)
    return summary


def _process(config: PreprocessConfig, layout: ShardLayout, lock: OutputLock, chash: str, listed: _Listed) -> None:
    """Run the pending partitions through the stages and hand each one, once all its inputs are
    reported, to a finalize task."""
    import ray
    from tqdm import tqdm

    for partition in listed.todo:
        layout.unfinish(partition)
    finalizer = _Finalizer(config, layout, lock, listed)
    remaining = {k: n for k, n in listed.todo.items() if n}  # partition -> inputs its stages process
    for partition in listed.todo.keys() - remaining.keys():
        finalizer.submit(partition, [])  # every input rejected by the listing
    outcomes: dict[int, dict[str, dict[str, Any]]] = {}  # only partitions with results in flight
    context = ray.data.DataContext.get_current()  # datasets copy it when created: set before the first
    context.enable_progress_bars = False  # one bar: ours, counting images
    # A block whose worker died more than crash_retries times is dropped, not fatal: the driver sees its
    # inputs missing and narrows them down (below).
    context.max_errored_blocks = -1
    bar = tqdm(total=sum(remaining.values()), desc="preprocess", unit="img", disable=not config.progress,
               file=sys.stderr)

    def collect(source: Any, alone: bool = False) -> None:
        with actor_roster() as roster:  # the pass's actors end with it, however it ends
            results = sample_stages(source, config, chash, alone, roster)
            for batch in results.iter_batches(batch_size=None, batch_format="pandas"):
                for row in batch.to_dict("records"):
                    partition = int(row["partition"])
                    if row["status"] == UNWRITTEN:
                        raise OutputUnwritable(f"{json.loads(row['outcome'])['detail']}; the job stopped and "
                                               "recorded nothing against the inputs of that group")
                    if partition not in remaining or row["key"] in outcomes.get(partition, {}):
                        continue  # a retried batch reported again: already counted
                    rows = outcomes.setdefault(partition, {})
                    rows[row["key"]] = {**row, **json.loads(row["outcome"])}
                    bar.update(1)
                    if len(rows) == remaining[partition]:
                        del remaining[partition]
                        finalizer.submit(partition, list(outcomes.pop(partition).values()))

    try:
        if remaining:
            collect(_listing_source([layout.listing_file(k) for k in sorted(remaining)], config.stages.load.num_cpus))
        if remaining:  # what a dying worker took down: again, one input per batch
            missing = [InputRecord(**fields) for k in sorted(remaining) for row in layout.read_listing(k)
                       for fields in json.loads(row["inputs"]) if fields["key"] not in outcomes.get(k, {})]
            collect(ray.data.from_items(fixed_batches(missing, 1), override_num_blocks=max(1, min(len(missing), 1000))),
                    alone=True)
            crashed = [r for r in missing if r.partition in remaining and r.key not in outcomes.get(r.partition, {})]
            if crashed:
                # A worker that died on an input alone blames the input only if the output takes a write now:
                # a full or lost output can kill workers too, and that is never an input's fault.
                layout.staging.check_writable(_WRITABLE_PROBE_BYTES)
            for record in crashed:
                retries = config.stages.annotate.crash_retries
                outcomes.setdefault(record.partition, {})[record.key] = {
                    **_reject_row(record, "worker_crash", f"{record.source}: a worker process died on this input "
                                  f"alone {retries + 1} time(s) after dying on its batch; see the Ray worker logs "
                                  "for the signal"), "status": "rejected"}
                bar.update(1)
            for partition in sorted(remaining):
                finalizer.submit(partition, list(outcomes.pop(partition, {}).values()))
        finalizer.drain()
    except BaseException:
        finalizer.cancel()
        raise
    finally:
        bar.close()


_WRITABLE_PROBE_BYTES = 1 << 20


def _write_manifest(config: PreprocessConfig, layout: ShardLayout, chash: str, listed: _Listed, processed: int,
                    seconds: float) -> JobSummary:
    """The manifest from the partitions' indexes, read one at a time."""
    written, rejected, shards = 0, Counter(), []
    for partition in range(listed.partitions):
        index = layout.read_index(partition)
        written += len(index["samples"])
        rejected.update(index["reasons"])
        shards.append({"shard": index["shard"], "samples": len(index["samples"]), "sha256": index["sha256"]})
    counts = dict(sorted(rejected.items()))
    skipped = dict(sorted(listed.skipped.items()))
    if written + sum(counts.values()) != listed.inputs or listed.inputs + sum(skipped.values()) != listed.seen:
        raise RuntimeError(f"accounting error: {listed.seen} seen, {listed.inputs} inputs != {written} written + "
                           f"{sum(counts.values())} rejected, {sum(skipped.values())} skipped")
    manifest = {
        "seen": listed.seen, "inputs": listed.inputs, "written": written, "rejected": counts, "skipped": skipped,
        # the storage options may hold keys: never written out
        "shards": shards, "config_hash": chash, "config": config.model_dump(
            mode="json", exclude={"input": {"storage_options"}, "output": {"storage_options"},
                                  "decontamination": {"storage_options"}}),
        "models": {name: data.get("model") for name in ("caption", "detect", "segment", "faces")
                   if (data := getattr(config.annotate, name)) is not None},
    }
    manifest.update(curation_manifest(layout))
    manifest["manifest_hash"] = hashlib.sha256(json.dumps(
        {k: manifest[k] for k in ("seen", "inputs", "written", "rejected", "skipped", "shards", "config_hash")},
        sort_keys=True
    ).encode()).hexdigest()[:16]
    summary = JobSummary(seen=listed.seen, inputs=listed.inputs, written=written, rejected=counts, skipped=skipped,
                         shards=len(shards), processed_now=processed, seconds=seconds,
                         images_per_second=processed / seconds if seconds > 0 else 0.0)
    manifest["last_run"] = asdict(summary)
    write_json_atomic(layout.manifest, manifest)
    return summary


def run(args: argparse.Namespace) -> int:
    """``mmdiff-preprocess``'s parsed arguments (pipeline/cli.py) -> the job; the exit status."""
    config = load_config(args.config, PreprocessConfig, parse_overrides(args.set))
    try:
        summary = run_job(config)
    except (OutputLocked, EmptyInputError, UnsupportedStorage) as exc:
        print(f"preprocess: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except OutputUnwritable as exc:
        print(f"preprocess: error: the output cannot be written (no input was rejected for it; rerun once it "
              f"can be): {exc}", file=sys.stderr, flush=True)
        return 3
    print(summary.line(), flush=True)
    for note in summary.notes:
        print(f"preprocess: {note}", flush=True)
    return 0


main = cli.preprocess  # the command itself (parsed in pipeline/cli.py)
