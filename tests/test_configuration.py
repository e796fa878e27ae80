"""Config errors fail before any work, naming the file, the key and what was expected."""

from pathlib import Path

import pytest

from mmdiff.configuration import ConfigError, config_hash, load_config, parse_overrides
from mmdiff.zoo import ModelSpec


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(text)
    return path


def test_valid_file_loads_into_typed_object(tmp_path):
    spec = load_config(write(tmp_path, "family: sam\nsource: tiny\nseed: 3\n"), ModelSpec)
    assert spec.family == "sam" and spec.is_tiny and spec.seed == 3


def test_unknown_key_is_named_with_file(tmp_path):
    path = write(tmp_path, "family: sam\nsource: tiny\nsed: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ModelSpec)
    assert str(path) in str(err.value) and "unknown key 'sed'" in str(err.value)


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = write(tmp_path, "family: sam\nsource: tiny\nseed: many\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ModelSpec)
    message = str(err.value)
    assert str(path) in message and "'seed'" in message and "integer" in message and "'many'" in message


def test_value_outside_choices_lists_the_choices(tmp_path):
    path = write(tmp_path, "family: stable-cascade\nsource: tiny\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ModelSpec)
    assert "'family'" in str(err.value) and "'sd15'" in str(err.value)


def test_missing_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="missing key 'source'"):
        load_config(write(tmp_path, "family: sam\n"), ModelSpec)


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"{path}: config file not found"):
        load_config(path, ModelSpec)


def test_invalid_yaml_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "family: [sam\n"), ModelSpec)


def test_overrides_apply_dotted_keys_and_are_validated(tmp_path):
    path = write(tmp_path, "family: sam\nsource: tiny\n")
    spec = load_config(path, ModelSpec, parse_overrides(["seed=7", "options.points=4"]))
    assert spec.seed == 7 and spec.options == {"points": 4}
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        load_config(path, ModelSpec, parse_overrides(["bogus=1"]))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["seed"])


def test_config_hash_is_stable_and_sensitive(tmp_path):
    a = load_config(write(tmp_path, "family: sam\nsource: tiny\n"), ModelSpec)
    b = ModelSpec(family="sam", source="tiny")
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(ModelSpec(family="sam", source="tiny", seed=1))
