"""Typed YAML configs.

Every config file under ``configs/`` loads into a pydantic model that forbids unknown keys, so a typo
fails before any work starts. Errors name the file, the dotted key and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["ConfigModel", "ConfigError", "load_config", "parse_config", "parse_overrides", "config_hash"]


class ConfigError(ValueError):
    """A config file is missing, unreadable or does not match its schema."""


class ConfigModel(BaseModel):
    """Base of every config section: plain data, unknown keys rejected, immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


C = TypeVar("C", bound=ConfigModel)


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "<root>"
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    if error["type"] == "missing":
        return f"missing key '{key}'"
    got = error.get("input")
    got_text = f" (got {type(got).__name__} {got!r:.60})" if error["type"] != "missing" else ""
    return f"key '{key}': {error['msg']}{got_text}"


def parse_config(data: Any, schema: type[C], source: str = "<dict>") -> C:
    """Validate already-parsed data against ``schema``; ``source`` names it in errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        problems = "\n  ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"{source}: invalid {schema.__name__} config:\n  {problems}") from None


def load_config(path: str | Path, schema: type[C], overrides: dict[str, Any] | None = None) -> C:
    """Load ``path`` (YAML) into ``schema``; ``overrides`` maps dotted keys to values (``a.b=1``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    data = {} if data is None else data
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value, path)
    return parse_config(data, schema, str(path))


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, path: Path) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{path}: override '{dotted}': '{part}' is not a mapping")
        node = child
    node[leaf] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "seed=3"]`` -> ``{"train.lr": 1e-4, "seed": 3}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{pair}': expected KEY=VALUE")
        out[key] = yaml.safe_load(raw)
    return out


def config_hash(config: ConfigModel) -> str:
    """A stable short hash of a resolved config, recorded in shard metadata and runs."""
    import hashlib
    import json

    text = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
