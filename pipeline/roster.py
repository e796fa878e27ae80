"""The actors of one pass of a pipeline job, so the job ends them itself, however the pass ends.

Ray Data ends an actor pool by dropping its handles, and an actor lives while any handle to it is left. After
a worker has died on a batch, Ray 2.60 leaves some in reference cycles and in the tracebacks of the errors it
logged (which a logging handler may keep for good): the pool's actors, alive or restarting, went on holding
their CPUs after the job had returned, and the next job in the same Ray session waited for them. Each stage
actor enrolls itself in its pass's :class:`ActorRoster` when it starts (a restarted one again), and
:func:`actor_roster` kills exactly those when the pass is over. A light module: the roster's worker imports
only this.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["ActorRoster", "actor_roster", "enroll"]


class ActorRoster:
    """Actor (no CPU): the stage actors of one pass, each enrolled by its own constructor."""

    def __init__(self) -> None:
        self.actors: list[Any] = []

    def enroll(self, actor: Any) -> None:
        self.actors.append(actor)

    def members(self) -> list[Any]:
        return self.actors


@contextmanager
def actor_roster() -> Iterator[Any]:
    """A roster for one pass; on leaving (the pass done, failed or interrupted), every actor enrolled in it
    and the roster itself are killed. Only the pass's own actors: no one else's is ever touched."""
    import ray

    roster = ray.remote(num_cpus=0)(ActorRoster).remote()
    try:
        yield roster
    finally:
        try:
            for actor in ray.get(roster.members.remote(), timeout=_ROSTER_TIMEOUT_S):
                ray.kill(actor)
        finally:
            ray.kill(roster)


_ROSTER_TIMEOUT_S = 60.0


def enroll(roster: Any) -> None:
    """In a stage actor's constructor: put this actor on the pass's ``roster`` (None: not run by a job). Not
    waited for: the roster's worker starts while the stage builds its model. An actor is one entry whatever
    its restarts, so a call lost with an incarnation that died at once is made again by the next one."""
    if roster is not None:
        import ray

        roster.enroll.remote(ray.get_runtime_context().current_actor)
