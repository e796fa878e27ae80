"""What ending a job's actors costs: the same small import job with and without its pass's actor roster.

    python -m benchmarks.bench_actor_roster [--rounds 5]

One embedded Ray (2 CPUs, 8 idle workers kept, as the tests run it). One warm-up job, then ``--rounds`` pairs of
the same import job (annotated real photos, the importer as the only stage), alternating between
pipeline.roster.actor_roster (every stage actor enrolled and killed at the end of the pass) and a stand-in that
enrolls nothing (what the job did before). Reports the median seconds per job of each and their ratio (roster /
none), plus the roster's own create + members + kill time, as a median over ``--rounds`` tries. Prints one line
and writes benchmarks/results/bench_actor_roster.json.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.report import write_result

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    import ray

    import pipeline.preprocess as preprocess
    from mmdiff.configuration import load_config
    from pipeline.config import PreprocessConfig
    from pipeline.example_inputs import write_annotation_folder
    from pipeline.roster import actor_roster

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    @contextlib.contextmanager
    def no_roster():
        yield None

    with tempfile.TemporaryDirectory(prefix="bench-roster-") as tmp:
        root = Path(tmp)
        for copy in range(2):
            write_annotation_folder(root / "corpus" / f"set{copy}")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _system_config={"num_workers_soft_limit": 8})
        try:
            seconds: dict[str, list[float]] = {"roster": [], "none": []}
            for n in range(1 + 2 * args.rounds):
                kind = "none" if n == 0 or n % 2 == 0 else "roster"
                preprocess.actor_roster = actor_roster if kind == "roster" else no_roster
                config = load_config(REPO / "configs/preprocess/import_fastcomposer.yaml", PreprocessConfig, {
                    "input.path": str(root / "corpus"), "output.path": str(root / f"out{n}"), "progress": False,
                    "qa_samples": 0, "output.shard_size": 2})
                started = time.perf_counter()
                summary = preprocess.run_job(config)
                if n:  # the first job starts the workers the others reuse
                    seconds[kind].append(time.perf_counter() - started)
            inputs = summary.inputs
            own = []
            for _ in range(args.rounds):
                started = time.perf_counter()
                with actor_roster() as roster:
                    ray.get(roster.members.remote())
                own.append(time.perf_counter() - started)
        finally:
            preprocess.actor_roster = actor_roster
            ray.shutdown()
    roster, none = statistics.median(seconds["roster"]), statistics.median(seconds["none"])
    result = {"rounds": args.rounds, "inputs_per_job": inputs, "seconds": seconds,
              "median_s": {"roster": roster, "none": none}, "ratio_roster_over_none": roster / none,
              "roster_alone_median_s": statistics.median(own)}
    print(f"bench_actor_roster: {inputs}-input import job median {roster:.2f} s with the roster vs {none:.2f} s "
          f"without ({roster / none:.2f}x, {args.rounds} each, alternated); the roster alone "
          f"{statistics.median(own):.2f} s", flush=True)
    write_result("bench_actor_roster", result)


if __name__ == "__main__":
    main()
