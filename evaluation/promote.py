"""Promote: move a registry alias (``champion``) to a model version only when its evaluation passes the gates.

    mmdiff-promote --model-name mmdiff-demo --versions 1 2 --gates configs/eval/gates.yaml \
        [--alias champion] [--tracking-uri URI] [--set KEY=VALUE ...]

Each candidate's figures are the ``eval.<metric>`` metrics that ``evaluation.evaluate`` logged on the
run that trained it. A candidate passes when, for every gate, its figure is within the gate's ``limit``
(a minimum, or a maximum for lower-is-better metrics) and regresses by no more than ``margin`` against the
current holder of the alias, evaluated on the same benchmark (same benchmark hash). Among the candidates
that pass, the best on ``rank_by`` gets the alias. Every candidate's decision and its reasons are written
as model-version tags (``promotion.decision``, ``promotion.reasons``, ``promotion.alias``,
``promotion.against``, ``promotion.id``); the command exits 0 when it moved the alias, 1 when it refused, and
2 when it could not take the alias's lease. Serving follows the alias (``models:/<name>@champion``).

Concurrent promotions (two CI jobs, two machines) are serialised by a lease on the alias held in the
registry itself (:class:`AliasLease`), so they end as some serial order of the same promotions would:
the champion is read, every candidate judged, its tags and the alias written while the lease is held.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m evaluation.promote`: parse (and answer --help) before the heavy imports below
    import sys

    import evaluation.cli

    sys.exit(evaluation.cli.promote())

import argparse
import functools
import json
import logging
import os
import random
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import Field

from evaluation import cli
from mmdiff.configuration import ConfigError, ConfigModel, load_config, parse_overrides
from train.registry import registry_client

__all__ = ["AliasLease", "Decision", "Gate", "GatesConfig", "LeaseError", "Outcome", "PromotionError", "check",
           "main", "promote"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


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


class PromotionError(RuntimeError):
    """The registry could not be written in time (conflicts that did not clear, a lease not taken or lost)."""


class LeaseError(PromotionError):
    """The alias's lease could not be taken within the wait, or was lost before the promotion was written."""


# How a write that lost a race with a concurrent writer, or met a briefly busy store, is worded by the SQL
# stores (SQLite, PostgreSQL, MySQL), in-process or relayed by a tracking server: such writes are retried.
_CONFLICTS = ("UNIQUE constraint failed", "IntegrityError", "duplicate key value", "Duplicate entry",
              "database is locked", "Deadlock found", "could not serialize access")


def _is_conflict(exc: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and (
        exc.error_code == "TEMPORARILY_UNAVAILABLE" or any(text in str(exc) for text in _CONFLICTS))


def _write(call: Callable[[], T], what: str, attempts: int = 8) -> T:
    """One registry write, retried with jittered, growing pauses (about 25 s in all) while it conflicts."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as exc:
            if not _is_conflict(exc):
                raise
            if attempt == attempts - 1:
                raise PromotionError(f"{what}: the registry still refused the write after {attempts} tries: {exc}") from exc
            logger.info("%s: write conflict, retrying: %s", what, exc)
            time.sleep(random.uniform(0.05, 0.2) * 2**attempt)
    raise AssertionError("unreachable")


@dataclass
class AliasLease:
    """Mutual exclusion between promotions of one alias, kept in the registry itself, so promotions run on
    different machines against one tracking server exclude each other: the registered-model tag
    ``promotion.lease.<alias>`` names the holder (owner token, host, pid, ttl).

    The registry has no compare-and-swap, so the lease is taken by Fischer's protocol: read the tag; when it
    is free, write our record; wait ``settle_s``; read it again and hold the lease only if it is still ours.
    Any contender that read "free" before our write landed writes within its own read-to-write time, so a
    contender that measured that time under ``settle_s`` has overwritten us before we look again; one that
    was slower gives its record back and tries again instead of holding. A holder that died is outlasted:
    a record seen unchanged for its ``ttl_s``, on the waiter's own clock (machines' clocks need not agree),
    is taken over; so a holder writes only within ``ttl_s / 2`` of its read (:meth:`verify`).
    """

    client: Any  # mlflow.MlflowClient
    name: str
    alias: str
    ttl_s: float = 120.0
    settle_s: float = 0.5
    wait_s: float = 600.0  # how long to wait for another promotion's lease before giving up
    poll_s: float = 0.25
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    record: str | None = None  # the tag value while held
    held_since: float = 0.0  # time.monotonic() at the read that preceded the winning write

    @property
    def key(self) -> str:
        return f"promotion.lease.{self.alias}"

    def _read(self) -> str | None:
        return self.client.get_registered_model(self.name).tags.get(self.key)

    def __enter__(self) -> AliasLease:
        deadline = time.monotonic() + self.wait_s
        seen, seen_since = None, 0.0
        while True:
            started = time.monotonic()
            current = self._read()
            if current != seen:
                seen, seen_since = current, started
            stale = current is not None and started - seen_since >= _lease_ttl(current, self.ttl_s)
            if current is None or stale:
                if stale:
                    logger.warning("%s@%s: taking over a lease unchanged for its ttl: %s", self.name, self.alias, current)
                if self._take(started):
                    return self
            elif started > deadline:
                raise LeaseError(f"{self.name}@{self.alias}: another promotion holds the lease (tag {self.key}: "
                                 f"{current}); waited {self.wait_s:.0f} s")
            time.sleep(random.uniform(0.5, 1.5) * self.poll_s)

    def _take(self, started: float) -> bool:
        record = json.dumps({"owner": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                             "ttl_s": self.ttl_s, "taken": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        try:
            self.client.set_registered_model_tag(self.name, self.key, record)
        except Exception as exc:
            if _is_conflict(exc):
                return False  # written by another at the same moment: read again
            raise
        if time.monotonic() - started >= self.settle_s:  # too slow to be sure nobody else read "free" meanwhile
            self._give_back(record)
            return False
        time.sleep(self.settle_s)
        if self._read() != record:
            return False
        self.record, self.held_since = record, started
        return True

    def verify(self) -> None:
        """Raise :class:`LeaseError` unless the lease is still ours and within half its ttl."""
        if self.record is None:
            raise LeaseError(f"{self.name}@{self.alias}: the lease is not held")
        held = time.monotonic() - self.held_since
        if held > self.ttl_s / 2:
            raise LeaseError(f"{self.name}@{self.alias}: the lease was held {held:.0f} s, past half its ttl "
                             f"({self.ttl_s:.0f} s); another promotion may take it over")
        current = self._read()
        if current != self.record:
            raise LeaseError(f"{self.name}@{self.alias}: the lease was taken by another promotion ({current})")

    def _give_back(self, record: str) -> None:
        if self._read() == record:
            _write(lambda: self.client.delete_registered_model_tag(self.name, self.key), f"releasing {self.key}")

    def __exit__(self, *exc_info: object) -> None:
        record, self.record = self.record, None
        try:
            self._give_back(record)
        except Exception:  # noqa: BLE001 - a lease left behind is outlasted by its ttl; the promotion stands
            logger.warning("%s@%s: could not release the lease; others take it over after %.0f s",
                           self.name, self.alias, self.ttl_s, exc_info=True)


def _lease_ttl(record: str, default: float) -> float:
    try:
        return float(json.loads(record)["ttl_s"])
    except (ValueError, TypeError, KeyError):
        return default


def _tag(client, name: str, decision: Decision, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        _write(functools.partial(client.set_model_version_tag, name, decision.version, key, value),
               f"{name} v{decision.version} tag {key}")


def _decide(client, config: GatesConfig, name: str, versions: list[str], alias: str) -> Outcome:
    from mlflow.exceptions import MlflowException

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
    for decision in passing:
        if decision is not winner:
            decision.reasons.append(f"v{winner.version} ranks higher on {config.rank_by}")
    return Outcome(winner.version if winner else None, str(holder) if holder is not None else None,
                   decisions + ([already] if already else []))


def promote(config: GatesConfig, name: str, versions: list[str], tracking_uri: str | None = None,
            alias: str | None = None, lease_wait_s: float = 600.0, registry_uri: str | None = None) -> Outcome:
    """Judge ``versions`` against the alias's holder and move the alias to the best that passes, all under
    the alias's lease: concurrent promotions of one alias end as if they had run one after the other. The
    versions and the alias live in ``registry_uri``, else the tracking store's registry (train/registry.py);
    their runs' figures in ``tracking_uri``."""
    client = registry_client(tracking_uri, registry_uri)
    alias = alias or config.alias
    with AliasLease(client, name, alias, wait_s=lease_wait_s) as lease:
        outcome = _decide(client, config, name, versions, alias)  # read under the lease: nobody moves it now
        lease.verify()
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        against = f"v{outcome.champion_before}" if outcome.champion_before else "none"
        for decision in outcome.decisions:
            if decision.reasons[:1] == [f"already holds @{alias}"]:
                continue
            verdict = ("promoted" if decision.version == outcome.promoted
                       else "passed, not chosen" if decision.passed else "refused")
            _tag(client, name, decision, {"promotion.decision": verdict, "promotion.reasons": json.dumps(decision.reasons),
                                          "promotion.alias": alias, "promotion.against": against,
                                          "promotion.id": lease.token, "promotion.time": when})
        if outcome.promoted is not None:
            lease.verify()
            _write(lambda: client.set_registered_model_alias(name, alias, outcome.promoted), f"{name}@{alias}")
            lease.verify()  # after the write too: no other promotion can have read the alias meanwhile
    return outcome


def run(args: argparse.Namespace) -> int:
    config = load_config(args.gates, GatesConfig, parse_overrides(args.set))
    try:
        outcome = promote(config, args.model_name, args.versions,
                          args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), args.alias, args.lease_wait_s,
                          args.registry_uri)
    except PromotionError as exc:
        print(f"promote: {exc}", file=sys.stderr)
        return 2
    alias = args.alias or config.alias
    for decision in outcome.decisions:
        print(f"{args.model_name} v{decision.version}: {'passed' if decision.passed else 'refused'}")
        for reason in decision.reasons:
            print(f"    {reason}")
    if outcome.promoted is None:
        held = f"stays with v{outcome.champion_before}" if outcome.champion_before else "is not set"
        print(f"promote: refused: no candidate passed the gates; @{alias} {held}", file=sys.stderr)
        return 1
    print(f"promote: {args.model_name}@{alias} -> v{outcome.promoted}"
          + (f" (was v{outcome.champion_before})" if outcome.champion_before else ""))
    return 0


main = cli.promote  # the command itself (parsed in evaluation/cli.py)
