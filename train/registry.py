"""The MLflow model registry, always named explicitly.

Left to itself, MLflow picks a client's registry from process-wide state: whatever ``mlflow.set_registry_uri``
last set (an evaluation earlier in the same process, a library), else ``$MLFLOW_REGISTRY_URI``, else the
tracking URI; ``models:/`` downloads read that state too. So ``MlflowClient(tracking_uri)`` can register into,
or load from, a registry nobody named for this call. Every registry read and write in the project goes
through a :func:`registry_client` built from the call's own tracking URI and registry URI (the registry
defaults to the tracking store, never to the process's or the environment's), and model files are
downloaded through that client (:func:`download_model`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["registry_client", "parse_model_uri", "model_version", "download_model"]


def registry_client(tracking_uri: str | None, registry_uri: str | None = None) -> Any:
    """An ``mlflow.MlflowClient`` on ``tracking_uri`` whose registry is ``registry_uri``, else the tracking
    store itself. ``tracking_uri`` None: ``mlflow.get_tracking_uri()`` (``$MLFLOW_TRACKING_URI`` in a process
    that set none), and the registry then defaults to that."""
    import mlflow

    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)


def parse_model_uri(uri: str) -> tuple[str, str, str]:
    """``models:/<name>@<alias>`` -> (name, "alias", alias); ``models:/<name>/<version>`` -> (name,
    "version", version), the version may be ``latest``."""
    name, alias_mark, alias = uri.removeprefix("models:/").partition("@")
    name, version_mark, version = (name, "", "") if alias_mark else name.partition("/")
    if not uri.startswith("models:/") or not name or "/" in name or not (alias or version) or "/" in alias + version:
        raise ValueError(f"{uri!r}: expected models:/<name>/<version>, models:/<name>@<alias> or models:/<name>/latest")
    return (name, "alias", alias) if alias_mark else (name, "version", version)


def model_version(client: Any, uri: str) -> Any:
    """The ModelVersion that ``uri`` (:func:`parse_model_uri`; ``latest``: the highest version) names in
    ``client``'s registry."""
    name, kind, value = parse_model_uri(uri)
    if kind == "alias":
        return client.get_model_version_by_alias(name, value)
    if value == "latest":
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            from mlflow.exceptions import MlflowException

            raise MlflowException(f"{uri}: registered model {name!r} has no versions",
                                  error_code="RESOURCE_DOES_NOT_EXIST")
        return max(versions, key=lambda v: int(v.version))
    return client.get_model_version(name, value)


def download_model(client: Any, uri: str, dst: str | Path) -> Path:
    """Download a ``models:/`` (through ``client``'s registry) or ``runs:/`` / artifact URI (through its
    tracking store) into the folder ``dst``; returns the local path."""
    import mlflow

    if uri.startswith("models:/"):
        version = model_version(client, uri)
        uri = client.get_model_version_download_uri(version.name, version.version)
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=client.tracking_uri))
