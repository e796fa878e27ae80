"""Serve's autoscaling policy for the mmdiff deployment: replicas follow generation load, not connections.

Serve's default policy counts a replica's ongoing requests, which include clients still sending their body,
health probes and requests about to be refused; a crowd of slow or idle clients would scale the deployment
up for no work. Each replica reports the generations it has queued or running
(``MMDiffServer.record_autoscaling_stats``); this policy asks for enough replicas to hold that load at
``target_ongoing_requests`` generations each. Serve applies min/max replicas and the up/downscale delays.
Kept free of heavy imports: the Serve controller imports it.
"""

from __future__ import annotations

from typing import Any


def generation_load_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """``ctx``: ray.serve.config.AutoscalingContext. Returns the wanted number of replicas (before bounds)."""
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    generations = sum((ctx.aggregated_metrics or {}).get("generations", {}).values())
    return generations / ctx.config.get_target_ongoing_requests(), {}
