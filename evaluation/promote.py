"""Promote: move a registry alias (``champion``) to a model version only when its evaluation passes the gates.

    python -m evaluation.promote --model mmdiff-demo --versions 1 2 --gates configs/eval/gates.yaml \
        [--alias champion] [--tracking-uri URI]

Each candidate's figures are the ``eval.<metric>`` metrics that ``evaluation.evaluate`` logged on the
run that trained it. A candidate passes when, for every gate, its figure is within the gate's ``limit``
(a minimum, or a maximum for lower-is-better metrics) and regresses by no more than ``margin`` against the
current holder of the alias, evaluated on the same benchmark (same benchmark hash). Among the candidates
that pass, the best on ``rank_by`` gets the alias. Every candidate's decision and its reasons are written
as model-version tags (``promotion.decision``, ``promotion.reasons``, ``promotion.alias``,
``promotion.against``); the command exits 0 when it moved the alias and 1 when it refused.
Serving follows the alias (``models:/<name>@champion``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

from pydantic import Field

from mmdiff.configuration import ConfigError, ConfigModel, load_config

__all__ = ["Decision", "Gate", "GatesConfig", "Outcome", "check", "main", "promote"]


class Gate(ConfigModel):
    metric: str  # an evaluation figure, without the eval. prefix: dino, clip_t, collapse_rate, ...
    higher_is_better: bool = True
    limit: float | None = None  # the minimum (or, for lower-is-better metrics, the maximum) it must reach
    margin: float = Field(0.0, ge=0)  # how far it may fall behind the current champion


class GatesConfig(ConfigModel):
    alias: str = "champion"
    rank_by: str  # the figure that picks among candidates that pass
    rank_higher_is_better: bool = True
    gates: list[Gate]


@dataclass
class Decision:
    version: str
    passed: bool
    reasons: list[str] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
    benchmark_hash: str | None = None


@dataclass
class Outcome:
    promoted: str | None  # the version that now holds the alias, if the alias moved
    champion_before: str | None
    decisions: list[Decision]


def _figures(client, name: str, version: str) -> tuple[dict[str, float], str | None]:
    run_id = client.get_model_version(name, version).run_id
    run = client.get_run(run_id)
    figures = {k.removeprefix("eval."): v for k, v in run.data.metrics.items() if k.startswith("eval.")}
    return figures, run.data.tags.get("eval.benchmark_hash")


def check(config: GatesConfig, version: str, figures: dict[str, float], benchmark_hash: str | None,
          champion: Decision | None) -> Decision:
    """Apply every gate to one candidate; ``champion`` carries the current alias holder's figures."""
    decision = Decision(version, True, figures=figures, benchmark_hash=benchmark_hash)

    def fail(reason: str) -> None:
        decision.passed = False
        decision.reasons.append("FAIL " + reason)

    if not figures:
        fail(f"version {version} has no evaluation (run evaluation.evaluate on it first)")
        return decision
    if champion is not None and champion.benchmark_hash != benchmark_hash:
        fail(f"evaluated on benchmark {benchmark_hash}, champion v{champion.version} on {champion.benchmark_hash}: "
             "not comparable")
    for gate in config.gates:
        value = figures.get(gate.metric)
        if value is None:
            fail(f"{gate.metric}: missing from the evaluation")
            continue
        sign = 1.0 if gate.higher_is_better else -1.0
        if gate.limit is not None:
            bound = "min" if gate.higher_is_better else "max"
            if sign * (value - gate.limit) < 0:
                fail(f"{gate.metric} {value:.4f} is beyond {bound} {gate.limit}")
            else:
                decision.reasons.append(f"ok {gate.metric} {value:.4f} within {bound} {gate.limit}")
        if champion is not None and gate.metric in champion.figures:
            best = champion.figures[gate.metric]
            regression = sign * (best - value)
            text = (f"{gate.metric} {value:.4f} vs champion v{champion.version} {best:.4f} "
                    f"(regression {regression:+.4f}, margin {gate.margin})")
            if regression > gate.margin:
                fail(text)
            else:
                decision.reasons.append("ok " + text)
    return decision


def _tag(client, name: str, decision: Decision, verdict: str, alias: str, champion: str | None) -> None:
    tags = {"promotion.decision": verdict, "promotion.reasons": json.dumps(decision.reasons),
            "promotion.alias": alias, "promotion.against": f"v{champion}" if champion else "none",
            "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for key, value in tags.items():
        client.set_model_version_tag(name, decision.version, key, value)


def promote(config: GatesConfig, name: str, versions: list[str], tracking_uri: str | None = None,
            alias: str | None = None) -> Outcome:
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    alias = alias or config.alias
    try:
        holder = client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        holder = None  # nobody holds the alias yet: only the limits apply
    champion = None
    if holder is not None:
        figures, bench = _figures(client, name, holder)
        champion = Decision(str(holder), True, figures=figures, benchmark_hash=bench)
    decisions, already = [], None
    for version in versions:
        if str(version) == str(holder):
            already = Decision(str(version), False, [f"already holds @{alias}"])
            continue
        figures, bench = _figures(client, name, str(version))
        decisions.append(check(config, str(version), figures, bench, champion))
    passing = [d for d in decisions if d.passed]
    if passing and any(config.rank_by not in d.figures for d in passing):
        raise ConfigError(f"rank_by {config.rank_by!r} is not an evaluation figure of every passing candidate")
    sign = 1.0 if config.rank_higher_is_better else -1.0
    winner = max(passing, key=lambda d: sign * d.figures[config.rank_by]) if passing else None
    for decision in decisions:
        if decision is winner:
            verdict = "promoted"
        elif decision.passed:
            verdict = "passed, not chosen"
            decision.reasons.append(f"v{winner.version} ranks higher on {config.rank_by}")
        else:
            verdict = "refused"
        _tag(client, name, decision, verdict, alias, str(holder) if holder is not None else None)
    if winner is not None:
        client.set_registered_model_alias(name, alias, winner.version)
    return Outcome(winner.version if winner else None, str(holder) if holder is not None else None,
                   decisions + ([already] if already else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--versions", nargs="+", required=True, help="candidate versions")
    parser.add_argument("--gates", required=True, help="configs/eval/<gates>.yaml")
    parser.add_argument("--alias", help="default: the gates file's alias (champion)")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI")
    args = parser.parse_args(argv)
    config = load_config(args.gates, GatesConfig)
    outcome = promote(config, args.model, args.versions, args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
                      args.alias)
    alias = args.alias or config.alias
    for decision in outcome.decisions:
        print(f"{args.model} v{decision.version}: {'passed' if decision.passed else 'refused'}")
        for reason in decision.reasons:
            print(f"    {reason}")
    if outcome.promoted is None:
        held = f"stays with v{outcome.champion_before}" if outcome.champion_before else "is not set"
        print(f"promote: refused: no candidate passed the gates; @{alias} {held}", file=sys.stderr)
        return 1
    print(f"promote: {args.model}@{alias} -> v{outcome.promoted}"
          + (f" (was v{outcome.champion_before})" if outcome.champion_before else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
