"""The scenario (run spec): a frozen, validated model read once at the edge.

Every field has a type and a range; an unknown key, a wrong type or a value out of range is
reported as ``<field>: <problem> (got <value>)`` with the allowed values, before anything
touches the store.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from privacy.accounting import AccountantName
from privacy.ckks import CkksParams
from privacy.policy import SitePolicy
from veil import config
from veil.errors import ScenarioError

REPRODUCIBLE_REFUSED = (
    "privacy.reproducible_noise: seeded, reproducible noise is not private and exists for `veil simulate` "
    "alone; a deployed run always draws DP noise from each site's own entropy. Remove the setting"
)
DEFAULT_SCENARIO = Path(__file__).resolve().parent.parent / "simulations" / "scenarios" / "default.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class FederationSpec(_Strict):
    """How the federation runs: sites, rounds, sites sampled per round, and what happens when a budget runs out."""

    sites: int = Field(10, ge=1, le=1000, description="number of simulated sites")
    rounds: int = Field(5, ge=1, le=10_000, description="federated rounds")
    fraction_train: float = Field(
        1.0, gt=0.0, le=1.0, description="fraction of sites sampled per training round"
    )
    sites_per_round: int | None = Field(
        None, ge=1, description="sites sampled per training round (overrides fraction_train)"
    )
    on_budget_exhausted: Literal["refuse", "drop"] = Field(
        "refuse",
        description="refuse: refuse the whole run if any site cannot afford its planned rounds; "
        "drop: run anyway and stop sampling each site once its budget is spent",
    )
    min_sites: int = Field(1, ge=1, description="fewest sites that must reply for a round to count")
    round_timeout_s: float = Field(3600.0, gt=0.0)


class DataSpec(_Strict):
    """The simulated data: the built-in source, how it is split across sites, and each site's held-out share."""

    source: Literal["mnist-5k"] = "mnist-5k"
    partitioner: Literal["iid", "dirichlet", "shards"] = "dirichlet"
    alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration (smaller = more skew)")
    shards_per_site: int = Field(2, ge=1, description="label shards per site (partitioner: shards)")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held-out share of each site")
    min_site_examples: int = Field(20, ge=2, description="fewest examples a Dirichlet site may get")


class ModelSpec(_Strict):
    """The network every site trains: the cnn (1x28x28 only) or an mlp of any input and class count."""

    arch: Literal["cnn", "mlp"] = "cnn"
    in_features: int = Field(784, ge=1, le=1_000_000,
                             description="mlp: features per record (784 = 28x28 images; the cnn takes 1x28x28)")
    num_classes: int = Field(10, ge=2, le=100_000, description="label classes the model predicts")

    @model_validator(mode="after")
    def _cnn_shape(self) -> ModelSpec:
        if self.arch == "cnn" and self.in_features != 784:
            raise ValueError("the cnn takes 1x28x28 images (in_features 784); use arch: mlp for other inputs")
        return self

    @property
    def key(self) -> str:
        """What travels to sites and checkpoints: the architecture and its shape ("mlp-12x2")."""
        if (self.in_features, self.num_classes) == (784, 10):
            return self.arch
        return f"{self.arch}-{self.in_features}x{self.num_classes}"


class TrainingSpec(_Strict):
    """Local training per round: epochs, expected Poisson batch size, learning rate and momentum."""

    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(32, ge=1, description="expected (Poisson) batch size")
    learning_rate: float = Field(0.1, gt=0.0, le=10.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)


class PrivacySpec(_Strict):
    """DP-SGD: σ or a target ε (exactly one), clipping norm C, δ, accountant, the non-private seeded mode."""

    noise_multiplier: float | None = Field(
        None, gt=0.0, description="Gaussian noise σ relative to the clipping norm"
    )
    target_epsilon: float | None = Field(
        None, gt=0.0, description="calibrate σ so each site spends at most this ε over all rounds"
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="per-sample clipping norm C")
    delta: float | None = Field(
        None, gt=0.0, lt=1.0, description="δ; default min(1e-5, 0.1/n) for a site with n records"
    )
    accountant: AccountantName = "pld"
    reproducible_noise: bool = Field(
        False, description="simulation research only: draw DP noise and Poisson sampling from the seed, so "
        "a run replays exactly; NOT private (anyone who knows the seed can remove the noise); refused by "
        "deployed runs and real sites",
    )

    @model_validator(mode="after")
    def _one_noise_source(self) -> PrivacySpec:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "set exactly one of privacy.noise_multiplier or privacy.target_epsilon "
                f"(got noise_multiplier={self.noise_multiplier}, "
                f"target_epsilon={self.target_epsilon})"
            )
        return self


class EncryptionSpec(_Strict):
    """CKKS: the coordinator adds ciphertexts and never sees a site's update or metrics."""

    aggregation: Literal["none", "ckks"] = Field("none", description="ckks: sites send encrypted updates")
    evaluation: Literal["none", "ckks"] = Field("none", description="ckks: sites send encrypted metric sums")
    keys: str | None = Field(
        None, description="key-set directory from `veil keys create`; default: a fresh key set per run",
    )
    poly_modulus_degree: int = Field(4096, description="CKKS ring degree N (fresh key sets only)")
    coeff_mod_bit_sizes: list[int] = Field([60, 49], description="modulus primes in bits, special prime last")
    scale_bits: int = Field(52, description="encoding scale 2^scale_bits")
    release_bits: int = Field(28, description="decrypted sums are noise-flooded and rounded to 2^-release_bits")

    @property
    def enabled(self) -> bool:
        """Whether CKKS is on for aggregation, evaluation or both."""
        return self.aggregation == "ckks" or self.evaluation == "ckks"

    def params(self) -> CkksParams:
        """The CKKS parameters for a fresh key set, as given here (the validator checks them)."""
        return CkksParams(self.poly_modulus_degree, tuple(self.coeff_mod_bit_sizes), self.scale_bits,
                          self.release_bits)

    @model_validator(mode="after")
    def _valid_params(self) -> EncryptionSpec:
        param_fields = {"poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits", "release_bits"}
        both = sorted(self.model_fields_set & param_fields)
        if self.keys is not None and both:
            raise ValueError("set either encryption.keys (an existing key set, whose parameters are used) "
                             f"or CKKS parameters for a fresh key set, not both (got {both})")
        problems = self.params().problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Scenario(_Strict):
    """A simulated federation: who trains what, how privately, for how long."""

    name: str = Field("mnist-dp", min_length=1, max_length=200)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    federation: FederationSpec = FederationSpec()
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    training: TrainingSpec = TrainingSpec()
    privacy: PrivacySpec = PrivacySpec(noise_multiplier=1.0)
    encryption: EncryptionSpec = EncryptionSpec()
    site_policy: SitePolicy = Field(
        SitePolicy(), description="what every simulated site enforces on itself"
    )
    site_policy_overrides: dict[str, SitePolicy] = Field(
        default_factory=dict, description="per simulated site (site-0, ...): keys replacing site_policy's",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        fed = self.federation
        if fed.min_sites > fed.sites:
            raise ValueError(
                f"federation.min_sites ({fed.min_sites}) must not exceed federation.sites ({fed.sites})"
            )
        if fed.sites_per_round is not None and not fed.min_sites <= fed.sites_per_round <= fed.sites:
            raise ValueError(
                f"federation.sites_per_round ({fed.sites_per_round}) must be between "
                f"federation.min_sites ({fed.min_sites}) and federation.sites ({fed.sites})"
            )
        known = {f"site-{i}" for i in range(fed.sites)}
        unknown = sorted(set(self.site_policy_overrides) - known)
        if unknown:
            raise ValueError(
                f"site_policy_overrides: unknown sites {unknown}; simulated sites are "
                f"site-0 ... site-{fed.sites - 1}"
            )
        return self

    def policy_for(self, site_id: str) -> SitePolicy:
        """``site_policy`` with the keys the site's override sets replacing the shared ones."""
        override = self.site_policy_overrides.get(site_id)
        if override is None:
            return self.site_policy
        return SitePolicy.model_validate(
            {**self.site_policy.model_dump(), **override.model_dump(include=override.model_fields_set)}
        )

    def sites_per_round(self) -> int:
        """Sites sampled per training round: the count if given, else the fraction's share."""
        fed = self.federation
        if fed.sites_per_round is not None:
            return fed.sites_per_round
        return min(fed.sites, max(fed.min_sites, int(fed.sites * fed.fraction_train)))

    def canonical_json(self) -> str:
        """The scenario as compact JSON with sorted keys: the exact text ``spec_hash`` hashes."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def spec_hash(self) -> str:
        """sha256 of the canonical JSON form: equal specs hash equal, whatever the file layout."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def with_overrides(self, **dotted: Any) -> Scenario:
        """Return a copy with ``{"federation.sites": 2, ...}`` applied, re-validated."""
        raw = self.model_dump(mode="json")
        for key, value in dotted.items():
            if value is None:
                continue
            node = raw
            *parents, leaf = key.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
        return parse_scenario(raw, source="command line")


def parse_scenario(raw: Any, source: str = "<dict>") -> Scenario:
    """Validate a mapping into a Scenario, or raise ScenarioError naming each bad field."""
    return config.validate(Scenario, raw, what="scenario", source=source, error=ScenarioError)


def load_scenario(path: Path | str | None = None) -> Scenario:
    """Read and validate a scenario YAML file (the default scenario when ``path`` is None)."""
    file = Path(path) if path is not None else DEFAULT_SCENARIO
    return parse_scenario(config.read_yaml(file, what="scenario", error=ScenarioError), source=str(file))
