"""Scenario validation: every bad field is named with its value and what is allowed."""

from __future__ import annotations

import json
import math
import time
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from client.daemon import SiteConfig
from client.loaders import DataSource
from privacy.policy import SitePolicy
from veil.errors import ScenarioError
from veil.spec import DEFAULT_SCENARIO, MAX_PLANNED_STEPS, ModelSpec, Scenario, load_scenario, parse_scenario


def test_default_scenario_is_the_main_job() -> None:
    s = load_scenario(DEFAULT_SCENARIO)
    assert (s.federation.sites, s.federation.rounds, s.data.source) == (10, 30, "mnist-5k")
    assert s.server_optimizer.rule == "fedavgm" and s.private  # the sweep's best (benchmarks/sweep.py)
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
        ({"data": {"alpha": -1}}, ["data.alpha", "greater than or equal to 0.001", "got -1"]),
        ({"privacy": {"noise_multiplier": 1.0, "target_epsilon": 3.0}}, ["exactly one of"]),
        ({"privacy": {"noise_multiplier": -0.5}}, ["privacy.noise_multiplier", "got -0.5"]),
        ({"privacy": {"noise_multiplier": 1.0, "delta": 2}}, ["privacy.delta", "less than or equal to 0.1"]),
        ({"federation": {"sites": 2, "min_sites": 3}}, ["min_sites (3) must not exceed"]),
        ({"model": {"arch": "resnet"}}, ["model.arch", "'cnn', 'mlp' or 'linear'", "got 'resnet'"]),
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


# -- strict input (issue 14) ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"federation": {"rounds": "3"}}, "federation.rounds"),
        ({"federation": {"rounds": 3.0}}, "federation.rounds"),
        ({"federation": {"sites": True}}, "federation.sites"),
        ({"training": {"batch_size": "32"}}, "training.batch_size"),
        ({"seed": 1.5}, "seed"),
        ({"training": {"learning_rate": "0.1"}}, "training.learning_rate"),
        ({"training": {"learning_rate": True}}, "training.learning_rate"),
        ({"privacy": {"noise_multiplier": "1.0"}}, "privacy.noise_multiplier"),
        ({"privacy": {"noise_multiplier": 1.0, "reproducible_noise": "yes"}}, "privacy.reproducible_noise"),
        ({"encryption": {"aggregation": "ckks", "scale_bits": 40.0}}, "encryption.scale_bits"),
        ({"name": 3}, "name"),
        ({"site_policy": {"epsilon_cap": "10"}}, "site_policy.epsilon_cap"),
    ],
)
def test_numbers_are_numbers(raw: dict, field: str) -> None:
    with pytest.raises(ScenarioError, match=rf"  {field}: Input should be a valid"):
        parse_scenario(raw)


def test_a_float_field_takes_an_int() -> None:
    s = parse_scenario({"training": {"learning_rate": 1}, "privacy": {"noise_multiplier": 2}})
    assert s.training.learning_rate == 1.0 and isinstance(s.privacy.noise_multiplier, float)


def _numeric_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, FieldInfo]]:
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        optional = typing.get_origin(ann) in (typing.Union, types.UnionType)
        inner = [a for a in typing.get_args(ann) if a is not type(None)] if optional else [ann]
        if len(inner) == 1 and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):
            out += _numeric_fields(inner[0], f"{prefix}{name}.")
        elif len(inner) == 1 and inner[0] in (int, float):
            out.append((f"{prefix}{name}", info))
    return out


CKKS_CHECKED_ELSEWHERE = {"encryption.poly_modulus_degree", "encryption.scale_bits", "encryption.release_bits"}


@pytest.mark.parametrize("model", [Scenario, SitePolicy, SiteConfig, DataSource])
def test_every_number_has_finite_bounds_and_every_float_is_finite(model: type[BaseModel]) -> None:
    assert model.model_config.get("strict") and model.model_config.get("allow_inf_nan") is False
    for path, info in _numeric_fields(model):
        if path in CKKS_CHECKED_ELSEWHERE:  # CkksParams.problems() bounds them
            continue
        kinds = {type(m).__name__ for m in info.metadata}
        assert kinds & {"Ge", "Gt"} and kinds & {"Le", "Lt"}, f"{model.__name__}.{path} has no finite range"


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e308])
@pytest.mark.parametrize("field", ["noise_multiplier", "target_epsilon", "max_grad_norm", "delta"])
def test_privacy_numbers_are_finite_and_bounded(field: str, value: float) -> None:
    raw: dict[str, Any] = {"noise_multiplier": None, "target_epsilon": 4.0, field: value}
    with pytest.raises(ScenarioError, match=rf"privacy\.{field}: Input should be (a finite number|less than)"):
        parse_scenario({"privacy": raw})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"federation": {"rounds": 10_000}, "training": {"batch_size": 1}}, "DP-SGD steps"),
        ({"federation": {"sites": 1000, "rounds": 1000}, "training": {"batch_size": 5000}}, "site-rounds"),
        ({"federation": {"sites": 20}, "data": {"partitioner": "shards", "shards_per_site": 300}}, "shards"),
        ({"model": {"arch": "mlp", "in_features": 200_000}, "training": {"batch_size": 1000}}, "GiB"),
        ({"privacy": {"noise_multiplier": 0.1}}, "greater than or equal to 0.3"),
        ({"privacy": {"noise_multiplier": None, "target_epsilon": 1000}}, "less than or equal to 100"),
        ({"name": "run\x1b[2J"}, r"name: must not contain control .*\\x1b"),
        ({"name": "a\nb"}, r"\\n"),
        ({"encryption": {"aggregation": "ckks", "keys": "k\x07"}}, "encryption.keys: must not contain control"),
    ],
)
def test_sizes_that_would_hang_or_exhaust_the_machine_are_refused(raw: dict, expected: str) -> None:
    with pytest.raises(ScenarioError, match=expected):
        parse_scenario(raw)


def test_the_model_size_formula_matches_the_models() -> None:
    from veil.models import build_model

    for spec in ({"arch": "cnn"}, {"arch": "cnn", "num_classes": 3}, {"arch": "mlp"},
                 {"arch": "mlp", "in_features": 12, "num_classes": 2},
                 {"arch": "linear", "in_features": 30, "num_classes": 2}, {"arch": "linear"}):
        model = ModelSpec.model_validate(spec)
        assert model.parameters() == sum(p.numel() for p in build_model(model.key).parameters())


def test_an_empty_scenario_file_is_an_error_not_the_defaults(tmp_path: Path) -> None:
    for text in ("", "# only a comment\n", "null\n", "---\n"):
        f = tmp_path / "empty.yaml"
        f.write_text(text)
        with pytest.raises(ScenarioError, match=r"scenario file .*empty\.yaml is empty; "):
            load_scenario(f)
    with pytest.raises(ScenarioError, match="is empty"):
        parse_scenario(None)
    assert parse_scenario({}) == parse_scenario({"seed": 0})  # a mapping that sets little is fine


def test_a_scenario_naming_a_key_set_survives_overrides_and_the_signed_request(tmp_path: Path) -> None:
    """`veil simulate` applies CLI overrides and sends the whole scenario to the sites: both re-validate it."""
    from privacy.requests import ephemeral_request

    f = tmp_path / "keyed.yaml"
    f.write_text("encryption:\n  aggregation: ckks\n  keys: my-keyset\nprivacy:\n  noise_multiplier: 1.0\n")
    spec = load_scenario(f).with_overrides(**{"federation.sites": 2, "federation.rounds": 1, "seed": None})
    assert spec.encryption.keys == "my-keyset" and spec.federation.sites == 2
    dumped = spec.model_dump(mode="json")["encryption"]
    assert dumped == {"aggregation": "ckks", "evaluation": "none", "keys": "my-keyset"}  # the key set's params
    request = ephemeral_request(spec.model_dump(mode="json"))
    assert parse_scenario(request.scenario, "the signed request") == spec
    assert parse_scenario(json.loads(spec.canonical_json())).spec_hash() == spec.spec_hash()
    # explicit parameters next to a key set, in the file or as an override, are still refused
    f.write_text("encryption:\n  aggregation: ckks\n  keys: my-keyset\n  scale_bits: 40\n")
    with pytest.raises(ScenarioError, match=r"not both \(got \['scale_bits'\]\)"):
        load_scenario(f)
    with pytest.raises(ScenarioError, match="not both"):
        spec.with_overrides(**{"encryption.poly_modulus_degree": 8192})
    # without a key set nothing changes: every parameter is part of the scenario and its hash
    assert "scale_bits" in parse_scenario({}).model_dump()["encryption"]


def test_calibration_never_searches_below_the_noise_floor() -> None:
    """A huge target with few steps used to drive σ toward 0.001, where PLD never returns."""
    from privacy.calibration import SIGMA_MIN, calibrate_noise_multiplier

    start = time.perf_counter()
    assert calibrate_noise_multiplier(100.0, 1e-5, 1 / 5000, 5) == SIGMA_MIN
    assert time.perf_counter() - start < 20  # seconds on a busy CI machine; minutes before the floor


@pytest.mark.slow  # ~30 s: the extremes of the allowed ranges, each measured
@pytest.mark.parametrize(
    ("target", "q", "steps", "delta"),
    [
        (100.0, 1.0, 10_000, 1e-5),  # rounds x epochs at most; full batches
        (100.0, 1 / 5000, MAX_PLANNED_STEPS, 1e-5),  # batch 1 on a site holding all 5,000 records
        (0.01, 1 / 157, MAX_PLANNED_STEPS, 1e-5),  # the smallest target: σ search to its ceiling, refused
        (1.0, 1 / 5000, MAX_PLANNED_STEPS, 1e-12),  # the smallest δ
        (100.0, 1.0, 10_000, 0.1),  # the largest δ
    ],
)
def test_the_extremes_of_the_allowed_ranges_calibrate_in_seconds(target: float, q: float, steps: int,
                                                                 delta: float) -> None:
    from privacy import DpSgdEvent, calibrate_noise_multiplier, epsilon
    from privacy.calibration import SIGMA_MIN

    start = time.perf_counter()
    try:
        sigma = calibrate_noise_multiplier(target, delta, q, steps)
    except ValueError as err:  # the target is out of reach: said quickly
        assert "No noise multiplier" in str(err)
        sigma = SIGMA_MIN
    epsilon([DpSgdEvent(sigma, q, steps, 1.0)], delta)
    epsilon([DpSgdEvent(SIGMA_MIN, q, steps, 1.0)], delta)  # a fixed σ at the floor, the worst case
    assert time.perf_counter() - start < 60  # ~8 s measured on a busy 2-core machine


def test_an_echoed_value_is_bounded_whatever_its_size() -> None:
    """A 376-byte alias bomb once became a 226 MB error message: the echo is now a bounded repr."""
    bomb: Any = ["lol"] * 9
    for _ in range(8):
        bomb = [bomb] * 9  # 9^9 strings, shared: tiny in memory, huge as a repr
    start = time.perf_counter()
    for raw in ({"seed": bomb}, {"encryption": {"coeff_mod_bit_sizes": bomb[:3]}},
                {"name": "\x1b[2J" + "x" * 10_000}, {"federation": {"x\x1b[31m" * 50: 1}}):
        with pytest.raises(ScenarioError) as info:
            parse_scenario(raw)
        message = str(info.value)
        assert len(message) < 2000 and "\x1b" not in message, message
    assert time.perf_counter() - start < 5


@pytest.mark.slow  # a real CKKS simulation through the CLI: about a minute
def test_veil_simulate_reuses_a_key_set_named_in_the_scenario(tmp_path: Path) -> None:
    import subprocess
    import sys

    veil = str(Path(sys.executable).with_name("veil"))
    subprocess.run([veil, "keys", "create", "my-keyset"], cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "keyed.yaml").write_text(
        "name: reuse-keys\ndevice: cpu\nfederation: {sites: 3, rounds: 2, min_sites: 1}\n"
        "data: {partitioner: iid}\ntraining: {batch_size: 64}\nprivacy: {noise_multiplier: 1.0}\n"
        "encryption:\n  aggregation: ckks\n  keys: my-keyset\n")
    done = subprocess.run([veil, "simulate", "keyed.yaml", "--sites", "2", "--rounds", "1", "--format", "json",
                           "--store", f"sqlite:///{tmp_path / 'runs.db'}", "--ledger-dir", "ledgers",
                           "--artifacts-dir", "art"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    key_id = json.loads((tmp_path / "my-keyset" / "keyset.json").read_text())["key_id"]
    assert summary["status"] == "completed" and key_id in json.dumps(summary)


@pytest.mark.parametrize(("text", "value"), [
    ("10", 10), ("-3", -3), ("+4", 4), ("010", 10), ("1e-5", 1e-5), ("1.0e5", 1e5), (".5", 0.5), ("2.", 2.0),
    ("true", True), ("False", False),
    # YAML 1.1 reads these as 80, 10, 16, 3, 1, 1.5, True, True: YAML 1.2 (and Veil) as text
    ("1:20", "1:20"), ("1_0", "1_0"), ("0x10", "0x10"), ("0b11", "0b11"), ("0o1", "0o1"), ("1.5_0", "1.5_0"),
    ("yes", "yes"), ("on", "on"),
])
def test_the_reader_resolves_numbers_and_booleans_as_yaml_1_2(text: str, value: object) -> None:
    import yaml

    from veil.config import StrictLoader

    got = yaml.load(f"a: {text}\n", Loader=StrictLoader)["a"]
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(("section", "key", "low"), [
    ("site_policy", "epsilon_cap", 0.01), ("federation", "fraction_train", 0.001),
    ("data", "test_fraction", 0.01), ("robustness", "max_update_norm", 1e-6)])
def test_small_positive_values_have_a_meaningful_floor(section: str, key: str, low: float) -> None:
    extra = {"rule": "norm-bound"} if section == "robustness" else {}
    Scenario.model_validate({section: {key: low, **extra}})
    with pytest.raises(ValueError, match=f"{key}\n.*greater than or equal to"):
        Scenario.model_validate({section: {key: low / 2, **extra}})
