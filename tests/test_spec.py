"""Scenario validation: every bad field is named with its value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from veil.errors import ScenarioError
from veil.spec import DEFAULT_SCENARIO, load_scenario, parse_scenario


def test_default_scenario_is_the_main_job() -> None:
    s = load_scenario(DEFAULT_SCENARIO)
    assert (s.federation.sites, s.federation.rounds, s.data.source) == (10, 5, "mnist-5k")
    assert not s.encryption.enabled


def test_encrypted_scenario_is_the_default_with_ckks_on() -> None:
    s = load_scenario(DEFAULT_SCENARIO.with_name("encrypted.yaml"))
    base = load_scenario(DEFAULT_SCENARIO)
    assert s.encryption.aggregation == s.encryption.evaluation == "ckks"
    assert s.model_copy(update={"encryption": base.encryption, "name": base.name}) == base


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"federation": {"sitez": 3}}, ["federation.sitez: unknown key", "sites"]),
        ({"federation": {"rounds": 0}}, ["federation.rounds", "greater than or equal to 1", "got 0"]),
        ({"federation": {"rounds": "many"}}, ["federation.rounds", "got 'many'"]),
        ({"data": {"partitioner": "random"}}, ["data.partitioner", "'iid', 'dirichlet' or 'shards'"]),
        ({"data": {"alpha": -1}}, ["data.alpha", "greater than 0", "got -1"]),
        ({"privacy": {"noise_multiplier": 1.0, "target_epsilon": 3.0}}, ["exactly one of"]),
        ({"privacy": {"noise_multiplier": -0.5}}, ["privacy.noise_multiplier", "got -0.5"]),
        ({"privacy": {"noise_multiplier": 1.0, "delta": 2}}, ["privacy.delta", "less than 1"]),
        ({"federation": {"sites": 2, "min_sites": 3}}, ["min_sites (3) must not exceed"]),
        ({"model": {"arch": "resnet"}}, ["model.arch", "'cnn' or 'mlp'", "got 'resnet'"]),
        ({"encryption": {"aggregation": "paillier"}}, ["encryption.aggregation", "'none' or 'ckks'"]),
        ({"encryption": {"aggregation": "ckks", "coeff_mod_bit_sizes": [60, 60]}},
         ["encryption:", "above the 128-bit security bound of 109 bits"]),
        ({"encryption": {"aggregation": "ckks", "keys": "k", "scale_bits": 40}}, ["not both"]),
    ],
)
def test_bad_fields_are_named(raw: dict, expected: list[str]) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(raw, source="t.yaml")
    msg = str(info.value)
    assert "t.yaml" in msg
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_non_mapping_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="must be a mapping"):
        parse_scenario([1, 2])
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: [unclosed\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match="not found"):
        load_scenario(tmp_path / "missing.yaml")


def test_overrides_are_validated_and_hash_tracks_content() -> None:
    base = parse_scenario({})
    two = base.with_overrides(**{"federation.sites": 2, "seed": None})
    assert two.federation.sites == 2 and two.seed == base.seed
    assert two.spec_hash() != base.spec_hash()
    assert parse_scenario({}).spec_hash() == base.spec_hash()
    with pytest.raises(ScenarioError, match=r"federation\.sites"):
        base.with_overrides(**{"federation.sites": 0})


def test_spec_is_frozen() -> None:
    s = parse_scenario({})
    with pytest.raises(Exception, match="frozen"):
        s.seed = 3  # type: ignore[misc]
