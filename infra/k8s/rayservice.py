"""Write the serving RayService manifest from a Ray Serve config file.

    python -m infra.k8s.rayservice --serve-config infra/serving/serve_config.yaml --gpus-per-replica 1 \
        --out infra/k8s/serve/rayservice.yaml

The Serve config (the file `serve build` writes and `serve run`/`serve deploy` take) becomes the
RayService's ``serveConfigV2`` after validation against Ray's own schema, so what KubeRay deploys is what
runs locally; ``--gpus-per-replica`` sets every deployment's ``ray_actor_options.num_gpus`` (a config
tested on CPUs says 0). The worker group gets one pod per replica, sized to that replica, and scales
between the deployments' autoscaling bounds (KubeRay's in-tree autoscaler adds pods as Serve adds
replicas). The head waits, in an init container, until every model the deployments serve
(``user_config.model_uri``) is in the registry (infra/k8s/wait.py), so the Serve application is deployed
only once training has registered it.
"""

from __future__ import annotations

import copy
import math
import shlex
from pathlib import Path
from typing import Any

import yaml

from mmdiff.cli import CommandParser, prose

RAY_VERSION = "2.60.0"


def replica_shape(serve_config: dict[str, Any]) -> tuple[int, int, int, int]:
    """(GPUs, CPUs) of the largest replica, and the fewest / most replicas of all deployments together."""
    gpus = cpus = low = high = 0
    for app in serve_config.get("applications", []):
        for deployment in app.get("deployments") or [{}]:
            options = deployment.get("ray_actor_options") or {}
            gpus = max(gpus, math.ceil(float(options.get("num_gpus", 0))))
            cpus = max(cpus, math.ceil(float(options.get("num_cpus", 1))))
            autoscaling = deployment.get("autoscaling_config")
            if isinstance(autoscaling, dict):
                low += int(autoscaling.get("min_replicas", 1))
                high += int(autoscaling.get("max_replicas", 1))
            else:
                replicas = int(deployment.get("num_replicas", 1))
                low, high = low + replicas, high + replicas
    return gpus, cpus, low, high


def with_gpus_per_replica(serve_config: dict[str, Any], gpus: float) -> dict[str, Any]:
    serve_config = copy.deepcopy(serve_config)
    for app in serve_config.get("applications", []):
        for deployment in app.get("deployments") or []:
            deployment.setdefault("ray_actor_options", {})["num_gpus"] = gpus
    return serve_config


def validate_serve_config(serve_config: dict[str, Any], source: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(serve_config)
    except ValueError as exc:
        raise ValueError(f"{source}: not a valid Ray Serve config: {exc}") from exc


def model_sources(serve_config: dict[str, Any]) -> list[tuple[str, str | None]]:
    """``(user_config.model_uri, user_config.registry_uri)`` of every deployment, once each, in order."""
    configs = [deployment.get("user_config") or {} for app in serve_config.get("applications", [])
               for deployment in app.get("deployments") or []]
    return list(dict.fromkeys((c["model_uri"], c.get("registry_uri")) for c in configs if c.get("model_uri")))


def model_uris(serve_config: dict[str, Any]) -> list[str]:
    """The ``user_config.model_uri`` of every deployment, once each, in order."""
    return list(dict.fromkeys(uri for uri, _ in model_sources(serve_config)))


def _volumes() -> list[dict[str, Any]]:
    return [{"name": "models", "persistentVolumeClaim": {"claimName": "mmdiff-models", "readOnly": True}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]


def _container(name: str, resources: dict[str, str], ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    container = {
        "name": name,
        "image": "mmdiff",
        # the registered model is read from the team tracking server (infra/mlflow, infra/k8s/mlflow/mlflow.yaml)
        "env": [{"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"}],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True},
                         {"name": "shm", "mountPath": "/dev/shm"}],
    }
    if ports:
        container["ports"] = ports
    return container


def _model_gates(serve_config: dict[str, Any]) -> list[dict[str, Any]]:
    """One init container per served model: waits until the registry the replicas load it from (the
    deployment's ``registry_uri``, else the tracking server's) has it (python -m infra.k8s.wait)."""
    gates = []
    for i, (uri, registry) in enumerate(model_sources(serve_config)):
        gate = _container(f"wait-for-model-{i}", {"cpu": "1", "memory": "1Gi"})
        del gate["volumeMounts"]
        command = ["python", "-m", "infra.k8s.wait", "model", uri, *(["--registry-uri", registry] if registry else [])]
        gates.append({**gate, "command": command})
    return gates


def rayservice(serve_config: dict[str, Any], name: str = "mmdiff-serve") -> dict:
    gpus, cpus, low, high = replica_shape(serve_config)
    head_ports = [{"name": "gcs", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
                  {"name": "serve", "containerPort": 8000}]
    # one replica per pod, plus a CPU for the Ray worker's own processes
    worker = {"cpu": str(cpus + 1), "memory": f"{16 + 16 * gpus}Gi"}
    worker_params = {"num-cpus": worker["cpu"]}
    if gpus:
        worker["nvidia.com/gpu"] = worker_params["num-gpus"] = str(gpus)
    worker_spec: dict[str, Any] = {"containers": [_container("ray-worker", worker)], "volumes": _volumes()}
    if gpus:
        worker_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "mmdiff",
                                              "app.kubernetes.io/component": "serve"}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": low != high,
                "headGroupSpec": {
                    # the head runs the Serve controller and HTTP proxy, no model replicas
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": {"spec": {
                        **({"initContainers": _model_gates(serve_config)} if model_uris(serve_config) else {}),
                        "containers": [_container("ray-head", {"cpu": "4", "memory": "16Gi"}, head_ports)],
                        "volumes": _volumes()}},
                },
                "workerGroupSpecs": [{
                    "groupName": "gpu" if gpus else "cpu",
                    "replicas": low,
                    "minReplicas": low,
                    "maxReplicas": high,
                    "rayStartParams": worker_params,
                    "template": {"spec": worker_spec},
                }],
            },
        },
    }


def render(serve_config_path: str | Path, gpus_per_replica: float | None = None) -> dict:
    path = Path(serve_config_path)
    serve_config = yaml.safe_load(path.read_text())
    if not isinstance(serve_config, dict):
        raise ValueError(f"{path}: a Ray Serve config is a mapping with `applications`")
    if gpus_per_replica is not None:
        serve_config = with_gpus_per_replica(serve_config, gpus_per_replica)
    validate_serve_config(serve_config, str(path))
    return rayservice(serve_config)


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser("python -m infra.k8s.rayservice", prose(__doc__), examples=[
        ("python -m infra.k8s.rayservice --serve-config infra/serving/serve_config.yaml --gpus-per-replica 1 "
        "--out infra/k8s/serve/rayservice.yaml")])
    parser.add_argument("--serve-config", required=True, metavar="FILE", help="a Ray Serve config YAML (applications: ...)")
    parser.add_argument("--gpus-per-replica", type=float, help="set every deployment's ray_actor_options.num_gpus")
    parser.add_argument("--out", required=True, help="the RayService manifest to write")
    args = parser.parse_args(argv)
    command = ["python", "-m", "infra.k8s.rayservice", "--serve-config", args.serve_config]
    if args.gpus_per_replica is not None:
        command += ["--gpus-per-replica", f"{args.gpus_per_replica:g}"]
    header = f"# Generated by `{shlex.join(command + ['--out', args.out])}`;\n# edit the Serve config, not this file.\n"
    manifest = render(args.serve_config, args.gpus_per_replica)
    Path(args.out).write_text(header + yaml.safe_dump(manifest, sort_keys=False))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
