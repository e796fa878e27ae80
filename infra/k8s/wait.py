"""Gates between the steps on Kubernetes: an init container that waits until what its step reads exists.

    python -m infra.k8s.wait shards /data/shards/mmdiff         # training: a finished preprocessing output
    python -m infra.k8s.wait model models:/mmdiff-sd15@champion  # serving: a registered model version

``shards``: the folder (a path, or an s3:// URL read with the usual AWS_* variables) holds the job's
``manifest.json`` (written last, when a preprocessing job has accounted for every input) and no
``lock.json`` (the lease a running or resuming job holds; pipeline.lock). ``model``: the URI resolves in
the registry of $MLFLOW_TRACKING_URI (or --tracking-uri; --registry-uri names another): ``models:/<name>/<version>``,
``models:/<name>@<alias>`` or ``models:/<name>/latest``; a server that does not answer yet counts as not
ready. Both check every --poll-s seconds, say what they wait for (at the start, then every
--report-every-s seconds), and exit 0 once it is there, or 1 after --timeout-s (0: no limit) naming what
is missing.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from mmdiff.cli import DEMO_TRACKING_URI, CommandParser, prose
from train.registry import model_version, parse_model_uri, registry_client

__all__ = ["shards_ready", "parse_model_uri", "model_ready", "wait", "main"]


def shards_ready(url: str) -> str | None:
    """None when ``url`` holds a finished preprocessing output, else what is missing."""
    from pipeline.shards import ShardLayout

    layout = ShardLayout(url)
    if not layout.manifest.exists():
        return f"{layout.manifest} does not exist yet (preprocessing has not finished)"
    if layout.lock.exists():
        return f"{layout.lock} is held (a preprocessing job is running there)"
    return None


def model_ready(uri: str, tracking_uri: str | None = None, registry_uri: str | None = None) -> str | None:
    """None when the registry (``registry_uri``, else the tracking store's) resolves ``uri`` to a model
    version, else why not."""
    from mlflow.exceptions import MlflowException

    client = registry_client(tracking_uri, registry_uri)
    where = registry_uri or client.tracking_uri
    try:
        model_version(client, uri)
    except MlflowException as exc:  # not registered yet (RESOURCE_DOES_NOT_EXIST), or the server is not up
        return f"{uri} is not in the registry at {where} yet ({str(exc).splitlines()[0][:200]})"
    except OSError as exc:
        return f"the registry {where} does not answer ({exc})"
    return None


def wait(check: Callable[[], str | None], what: str, timeout_s: float, poll_s: float, report_every_s: float) -> bool:
    """Poll ``check`` until it returns None (True) or ``timeout_s`` passes (False; 0: never)."""
    started, reported = time.monotonic(), None
    while True:
        missing = check()
        if missing is None:
            print(f"wait: {what} is ready after {time.monotonic() - started:.0f} s", flush=True)
            return True
        now = time.monotonic()
        if timeout_s and now - started >= timeout_s:
            print(f"wait: gave up on {what} after {timeout_s:g} s: {missing}", file=sys.stderr, flush=True)
            return False
        if reported is None or now - reported >= report_every_s:
            print(f"wait: {what}: {missing}", flush=True)
            reported = now
        time.sleep(poll_s if not timeout_s else max(0.0, min(poll_s, started + timeout_s - now)))


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser("python -m infra.k8s.wait", prose(__doc__), examples=[
        "python -m infra.k8s.wait shards outputs/shards/demo --timeout-s 60",
        f"python -m infra.k8s.wait model models:/mmdiff-demo/1 --tracking-uri {DEMO_TRACKING_URI} --timeout-s 60"])
    parser.add_argument("kind", choices=["shards", "model"], help="what to wait for")
    parser.add_argument("target", help="the shards' folder or URL, or a models:/ URI")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="the tracking server for `model` (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--registry-uri", help="the registry for `model` (default: the tracking server's)")
    parser.add_argument("--timeout-s", type=float, default=0.0, help="give up after this long (0: no limit)")
    parser.add_argument("--poll-s", type=float, default=30.0, help="seconds between checks")
    parser.add_argument("--report-every-s", type=float, default=600.0, help="seconds between progress lines")
    args = parser.parse_args(argv)
    if args.kind == "shards":
        def check() -> str | None:
            return shards_ready(args.target)
    else:
        try:
            parse_model_uri(args.target)
        except ValueError as exc:
            parser.error(str(exc))

        def check() -> str | None:
            return model_ready(args.target, args.tracking_uri, args.registry_uri)
    return 0 if wait(check, f"{args.kind} {args.target}", args.timeout_s, args.poll_s, args.report_every_s) else 1


if __name__ == "__main__":
    raise SystemExit(main())
