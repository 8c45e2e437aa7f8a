"""Site policies: impossible values are rejected naming the field; limits are enforced."""

from __future__ import annotations

from pathlib import Path

import pytest

from privacy.policy import SitePolicy, load_policy, parse_policy
from veil.errors import PolicyError
from veil.spec import parse_scenario


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"epsilon_cap": -1}, "policy.epsilon_cap"),
        ({"epsilon_cap": 0}, "policy.epsilon_cap"),
        ({"delta": 1.5}, "policy.delta"),
        ({"max_sample_rate": 0}, "policy.max_sample_rate"),
        ({"max_sample_rate": 2}, "policy.max_sample_rate"),
        ({"min_noise_multiplier": -0.1}, "policy.min_noise_multiplier"),
        ({"accountant": "gdp"}, "policy.accountant"),
        ({"cap_scope": "site"}, "policy.cap_scope"),
        ({"epsilon_cpa": 3}, "policy.epsilon_cpa: unknown key"),
    ],
)
def test_impossible_values_are_rejected_naming_the_field(raw: dict, field: str) -> None:
    with pytest.raises(PolicyError, match=field):
        parse_policy(raw)


def test_delta_must_be_below_one_over_n() -> None:
    with pytest.raises(PolicyError, match="not below 1/n"):
        SitePolicy(delta=0.01).delta_for(200)
    assert SitePolicy().delta_for(200) == pytest.approx(1e-5)
    assert SitePolicy().delta_for(20_000) == pytest.approx(5e-6)


def test_violations_have_machine_readable_codes() -> None:
    p = SitePolicy(min_noise_multiplier=0.8, max_sample_rate=0.1, require_encryption=True)
    assert p.violation(0.5, 0.05, True)[0] == "noise-below-minimum"  # type: ignore[index]
    assert p.violation(1.0, 0.2, True)[0] == "sample-rate-above-maximum"  # type: ignore[index]
    assert p.violation(1.0, 0.05, False)[0] == "encryption-required"  # type: ignore[index]
    assert p.violation(1.0, 0.05, True) is None


def test_policy_file(tmp_path: Path) -> None:
    f = tmp_path / "site.yaml"
    f.write_text("policy:\n  epsilon_cap: 8\n  delta: 1.0e-6\n")
    assert load_policy(f) == SitePolicy(epsilon_cap=8, delta=1e-6)
    f.write_text("epsilon_cap: [1, 2]\n")
    with pytest.raises(PolicyError, match=r"policy\.epsilon_cap"):
        load_policy(f)
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "missing.yaml")


def test_scenario_overrides_merge_onto_the_shared_policy() -> None:
    sc = parse_scenario({"federation": {"sites": 3},
                         "site_policy": {"epsilon_cap": 5, "min_noise_multiplier": 0.5},
                         "site_policy_overrides": {"site-2": {"min_noise_multiplier": 2}}})
    assert sc.policy_for("site-2") == SitePolicy(epsilon_cap=5, min_noise_multiplier=2)
    assert sc.policy_for("site-0") == SitePolicy(epsilon_cap=5, min_noise_multiplier=0.5)
    from veil.errors import ScenarioError

    with pytest.raises(ScenarioError, match="unknown sites"):
        parse_scenario({"federation": {"sites": 2}, "site_policy_overrides": {"site-7": {}}})
