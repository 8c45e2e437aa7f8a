"""The scenario (run spec): a frozen, validated model read once at the edge.

Every field has a type and a range; an unknown key, a wrong type or a value out of range is
reported as ``<field>: <problem> (got <value>)`` with the allowed values, before anything
touches the store.

Types are strict: a count is an integer (``"3"``, ``3.0`` and ``true`` are refused), a float
field takes a number but not a string or a bool, and no float may be ``.inf`` or ``.nan``.
Ranges are finite and chosen so that nothing a scenario allows can hang or exhaust the
machine: σ calibration and ε accounting stay within seconds (see ``PrivacySpec`` and
``MAX_PLANNED_STEPS``), and the model, batch and federation sizes within memory.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from privacy.accounting import AccountantName
from privacy.calibration import SIGMA_MIN
from privacy.ckks import CkksParams
from privacy.policy import SitePolicy
from veil import config
from veil.config import Text
from veil.errors import ScenarioError
from veil.server_opt import DEFAULT_LEARNING_RATE, DEFAULT_MOMENTUM, ServerOptimizer, ServerRule

REPRODUCIBLE_REFUSED = (
    "privacy.reproducible_noise: seeded, reproducible noise is not private and exists for `veil simulate` "
    "alone; a deployed run always draws DP noise from each site's own entropy. Remove the setting"
)
DEFAULT_SCENARIO = Path(__file__).resolve().parent.parent / "simulations" / "scenarios" / "default.yaml"

SOURCE_RECORDS = {"mnist-5k": 5000}
"""Records in each built-in data set: the most one simulated site can hold."""
MAX_PLANNED_STEPS = 1_000_000
"""DP-SGD steps one site may plan for a run. Measured with ``privacy.accounting.epsilon`` (PLD, a
busy 2-core machine): 10^6 steps take 2-5 s per ε at any σ >= 0.3 and q from 1/5000 to 1, and a
whole σ calibration ~10 s at worst; 5 x 10^6 steps take up to 18 s per ε, 5 x 10^7 minutes.
The bound assumes a simulated site holding all of the built-in data; a deployed site's own
record count can make its steps larger (``tests/test_spec.py`` measures the extremes)."""
MAX_SITE_ROUNDS = 100_000
"""federation.sites x federation.rounds: the store keeps a row per site per round."""
MAX_GRADIENT_FLOATS = 2**30
"""training.batch_size x model parameters: Opacus keeps a gradient per sample (4 GiB of float32)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class FederationSpec(_Strict):
    """How the federation runs: sites, rounds, sites sampled per round, and what happens when a budget runs out."""

    sites: int = Field(10, ge=1, le=1000, description="number of simulated sites")
    rounds: int = Field(5, ge=1, le=10_000, description="federated rounds")
    fraction_train: float = Field(
        1.0, ge=0.001, le=1.0, description="fraction of sites sampled per training round, 0.001..1: below "
        "1/1000 (the most sites) it samples no site, and a round samples at least min_sites anyway"
    )
    sites_per_round: int | None = Field(
        None, ge=1, le=1000, description="sites sampled per training round (overrides fraction_train)"
    )
    on_budget_exhausted: Literal["refuse", "drop"] = Field(
        "refuse",
        description="refuse: refuse the whole run if any site cannot afford its planned rounds; "
        "drop: run anyway and stop sampling each site once its budget is spent",
    )
    min_sites: int = Field(1, ge=1, le=1000, description="fewest sites that must reply for a round to count")
    round_timeout_s: float = Field(3600.0, gt=0.0, le=604_800.0, description="seconds a round may take (at "
                                   "most a week)")


class DataSpec(_Strict):
    """The simulated data: the built-in source, how it is split across sites, and each site's held-out share."""

    source: Literal["mnist-5k"] = "mnist-5k"
    partitioner: Literal["iid", "dirichlet", "shards"] = "dirichlet"
    alpha: float = Field(0.5, ge=1e-3, le=1e3, description="Dirichlet concentration (smaller = more skew); "
                         "beyond 0.001..1000 the split is all-to-one-site or plain IID anyway")
    shards_per_site: int = Field(2, ge=1, le=1000, description="label shards per site (partitioner: shards)")
    test_fraction: float = Field(0.2, ge=0.01, le=0.9, description="held-out share of each site, 0.01..0.9: "
                                 "less leaves no meaningful test set, more leaves too little to train on")
    min_site_examples: int = Field(20, ge=2, le=5000, description="fewest examples a Dirichlet site may get")


class ModelSpec(_Strict):
    """The network every site trains: the cnn (1x28x28 only), or an mlp or linear model of any input and
    class count."""

    arch: Literal["cnn", "mlp", "linear"] = Field(
        "cnn", description="cnn: 8k-parameter GroupNorm CNN (1x28x28); mlp: in_features → 128 → classes; "
        "linear: logistic regression, the tabular entry (standardised features: site.yaml standardize: true)")
    in_features: int = Field(784, ge=1, le=200_000,
                             description="mlp: features per record (784 = 28x28 images; the cnn takes 1x28x28); "
                             "at most 200,000 (a 26M-parameter first layer)")
    num_classes: int = Field(10, ge=2, le=10_000, description="label classes the model predicts")

    @model_validator(mode="after")
    def _cnn_shape(self) -> ModelSpec:
        if self.arch == "cnn" and self.in_features != 784:
            raise ValueError("the cnn takes 1x28x28 images (in_features 784); use arch: mlp for other inputs")
        return self

    def parameters(self) -> int:
        """Trainable parameters of this model (``veil.models``: the mlp's hidden layer is 128 wide)."""
        if self.arch == "cnn":
            return 5_152 + (32 * 9 + 1) * self.num_classes  # conv blocks + head
        if self.arch == "linear":
            return (self.in_features + 1) * self.num_classes
        return (self.in_features + 1) * 128 + (128 + 1) * self.num_classes

    @property
    def key(self) -> str:
        """What travels to sites and checkpoints: the architecture and its shape ("mlp-12x2")."""
        if (self.in_features, self.num_classes) == (784, 10):
            return self.arch
        return f"{self.arch}-{self.in_features}x{self.num_classes}"


class TrainingSpec(_Strict):
    """Local training per round: epochs, expected Poisson batch size, learning rate and momentum."""

    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(32, ge=1, le=10_000, description="expected (Poisson) batch size")
    learning_rate: float = Field(0.1, gt=0.0, le=10.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)


class PrivacySpec(_Strict):
    """DP-SGD: σ or a target ε (exactly one), clipping norm C, δ, accountant, the non-private seeded mode."""

    noise_multiplier: float | None = Field(
        None, ge=SIGMA_MIN, le=1000.0,
        description=f"Gaussian noise σ relative to the clipping norm, {SIGMA_MIN:g}..1000: below {SIGMA_MIN:g} ε "
        "runs into the hundreds for any useful run and PLD accounting slows sharply (σ = 0.1: 7 s per ε at "
        "10^4 steps, σ = 0.01: minutes); above 1000 the noise drowns any update",
    )
    target_epsilon: float | None = Field(
        None, ge=0.01, le=100.0,
        description="calibrate σ so each site spends at most this ε over all rounds, 0.01..100: ε above 100 "
        "promises nothing, and an infinite target used to calibrate σ toward 0 and hang the accountant; "
        f"measured: a calibration at either end, with up to {MAX_PLANNED_STEPS:,} steps, takes ~10 s at worst",
    )
    max_grad_norm: float = Field(1.0, ge=1e-3, le=1e3,
                                 description="per-sample clipping norm C, 0.001..1000 (gradient norms are O(1); "
                                 "the noise is σ·C)")
    delta: float | None = Field(
        None, ge=1e-12, le=0.1,
        description="δ, 1e-12..0.1 (a larger δ can leak whole records; PLD truncates tails below ~1e-15); "
        "default min(1e-5, 0.1/n) for a site with n records",
    )
    accountant: AccountantName = "pld"
    mechanism: Literal["dp-sgd", "none"] = Field(
        "dp-sgd", description="dp-sgd: every site trains with Opacus DP-SGD; none: the NOT private baseline "
        "(plain SGD, no ε), recorded and shown as not private and refused by every site whose policy caps ε; "
        "`privacy: none` in a scenario file means this")
    reproducible_noise: bool = Field(
        False, description="simulation research only: draw DP noise and Poisson sampling from the seed, so "
        "a run replays exactly; NOT private (anyone who knows the seed can remove the noise); refused by "
        "deployed runs and real sites",
    )

    @model_validator(mode="after")
    def _one_noise_source(self) -> PrivacySpec:
        if self.mechanism == "none":
            given = [k for k in ("noise_multiplier", "target_epsilon", "reproducible_noise")
                     if getattr(self, k) not in (None, False)]
            if given:
                raise ValueError(f"privacy.mechanism none trains without DP: remove {', '.join(given)}")
            return self
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
    keys: Text | None = Field(
        None, min_length=1, max_length=4096,
        description="key-set directory from `veil keys create`; default: a fresh key set per run",
    )
    poly_modulus_degree: int = Field(4096, description="CKKS ring degree N (fresh key sets only)")
    coeff_mod_bit_sizes: list[int] = Field([60, 49], max_length=64,
                                           description="modulus primes in bits, special prime last")
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
        both = sorted(self.model_fields_set & _CKKS_PARAM_FIELDS)
        if self.keys is not None and both:
            raise ValueError("set either encryption.keys (an existing key set, whose parameters are used) "
                             f"or CKKS parameters for a fresh key set, not both (got {both})")
        problems = self.params().problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """With ``keys`` set, the key set's own parameters apply: the fresh-key-set fields are left out,
        so a dumped scenario (overrides, the signed request, the store) validates again as it was."""
        data: dict[str, Any] = handler(self)
        if self.keys is not None:
            for name in _CKKS_PARAM_FIELDS:
                data.pop(name, None)
        return data


class RobustnessSpec(_Strict):
    """How much one site can move the model (``server.robust``): plaintext aggregation only."""

    rule: Literal["none", "norm-bound", "trimmed-mean"] = Field(
        "none", description="none: FedAvg; norm-bound: each site's update scaled to at most max_update_norm; "
        "trimmed-mean: per coordinate, trim_fraction of the sites dropped at each end")
    max_update_norm: float | None = Field(
        None, ge=1e-6, le=1e6, description="norm-bound: the largest L2 norm of a site's update (its change to "
        "the model it was sent), 1e-6..1e6: below 1e-6 every update is scaled to float32 rounding noise and the "
        "model never moves")
    trim_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="trimmed-mean: share dropped at each end")

    @model_validator(mode="after")
    def _complete(self) -> RobustnessSpec:
        if self.rule == "norm-bound" and self.max_update_norm is None:
            raise ValueError("robustness.rule norm-bound needs robustness.max_update_norm")
        return self


class ServerOptimizerSpec(_Strict):
    """How the coordinator's model moves from the round's mean (``veil.server_opt``; Reddi et al. 2021).

    Works with CKKS too: there every site applies the same step after decrypting the aggregate."""

    rule: ServerRule = Field("fedavg", description="fedavg: the weighted mean is the model; fedavgm: server "
                             "momentum; fedadam / fedyogi: adaptive server optimisers (Reddi et al. 2021)")
    learning_rate: float | None = Field(
        None, gt=0.0, le=100.0, description="server learning rate η; default: Flower's (fedavgm 1.0, fedadam "
        "0.1, fedyogi 0.01); plain fedavg has none")
    momentum: float | None = Field(None, ge=0.0, lt=1.0, description="fedavgm: server momentum β; fedadam/"
                                   "fedyogi: β1; default: Flower's (fedavgm 0.0, fedadam and fedyogi 0.9)")
    beta2: float = Field(0.99, ge=0.0, lt=1.0, description="fedadam/fedyogi: second-moment decay β2")
    tau: float = Field(1e-3, gt=0.0, lt=1.0, description="fedadam/fedyogi: adaptivity τ added to √v")

    @model_validator(mode="before")
    @classmethod
    def _resolve_momentum(cls, raw: Any) -> Any:
        """An unset momentum becomes the rule's default here, so the stored spec says which β ran."""
        if isinstance(raw, dict) and raw.get("momentum") is None and raw.get("rule", "fedavg") in DEFAULT_MOMENTUM:
            return {**raw, "momentum": DEFAULT_MOMENTUM[raw.get("rule", "fedavg")]}
        return raw

    @model_validator(mode="after")
    def _fedavg_has_no_rate(self) -> ServerOptimizerSpec:
        if self.rule == "fedavg" and self.learning_rate not in (None, 1.0):
            raise ValueError(f"server_optimizer.learning_rate {self.learning_rate}: plain fedavg takes the mean "
                             "as the model; for a server learning rate use rule: fedavgm (momentum: 0 for none)")
        return self

    def optimizer(self) -> ServerOptimizer:
        """The step's parameters (``veil.server_opt``), with the rule's default learning rate."""
        lr = self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATE[self.rule]
        momentum = self.momentum if self.momentum is not None else DEFAULT_MOMENTUM[self.rule]
        return ServerOptimizer(self.rule, lr, momentum if self.rule != "fedavg" else 0.0, self.beta2, self.tau)


_CKKS_PARAM_FIELDS = frozenset({"poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits", "release_bits"})


class Scenario(_Strict):
    """A simulated federation: who trains what, how privately, for how long."""

    name: Text = Field("mnist-dp", min_length=1, max_length=200)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    federation: FederationSpec = FederationSpec()
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    training: TrainingSpec = TrainingSpec()
    privacy: PrivacySpec = PrivacySpec(noise_multiplier=1.0)
    encryption: EncryptionSpec = EncryptionSpec()
    robustness: RobustnessSpec = RobustnessSpec()
    server_optimizer: ServerOptimizerSpec = ServerOptimizerSpec()
    site_policy: SitePolicy = Field(
        SitePolicy(), description="what every simulated site enforces on itself"
    )
    site_policy_overrides: dict[str, SitePolicy] = Field(
        default_factory=dict, max_length=1000,
        description="per simulated site (site-0, ...): keys replacing site_policy's",
    )

    @model_validator(mode="before")
    @classmethod
    def _privacy_none(cls, raw: Any) -> Any:
        """``privacy: none`` is the non-private baseline, ``privacy: {mechanism: none}``."""
        if isinstance(raw, dict) and raw.get("privacy") == "none":
            return {**raw, "privacy": {"mechanism": "none"}}
        return raw

    @property
    def private(self) -> bool:
        """Whether the sites train with DP-SGD (False: the labelled non-private baseline)."""
        return self.privacy.mechanism != "none"

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
            shown = ", ".join(config.show(u, 40) for u in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
            raise ValueError(
                f"site_policy_overrides: unknown sites [{shown}]; simulated sites are "
                f"site-0 ... site-{fed.sites - 1}"
            )
        if self.robustness.rule != "none" and self.encryption.aggregation == "ckks":
            raise ValueError(f"robustness.rule {self.robustness.rule} reads every site's update, which CKKS "
                             "aggregation hides from the coordinator: use one or the other")
        if self.robustness.rule == "trimmed-mean" and math.floor(
                self.robustness.trim_fraction * self.sites_per_round()) == 0:
            raise ValueError(f"robustness.trim_fraction {self.robustness.trim_fraction} of "
                             f"{self.sites_per_round()} sites per round trims nothing; raise it to at least "
                             f"{1 / self.sites_per_round():.2g} (below 0.5) or sample more sites")
        self._check_sizes()
        return self

    def _check_sizes(self) -> None:
        """Cross-field bounds: nothing a scenario allows may hang the accountant or exhaust memory."""
        fed, train, records = self.federation, self.training, SOURCE_RECORDS[self.data.source]
        if fed.sites * fed.rounds > MAX_SITE_ROUNDS:
            raise ValueError(f"federation.sites x federation.rounds = {fed.sites * fed.rounds:,} site-rounds; at "
                             f"most {MAX_SITE_ROUNDS:,} (the store keeps a row for each)")
        steps = fed.rounds * train.local_epochs * math.ceil(records / train.batch_size)
        if steps > MAX_PLANNED_STEPS:
            raise ValueError(
                f"federation.rounds x training.local_epochs x ceil({records:,} / training.batch_size) = {steps:,} "
                f"DP-SGD steps for a site holding all of {self.data.source}; at most {MAX_PLANNED_STEPS:,} (the "
                "privacy accountant needs minutes beyond that): use fewer rounds or epochs, or a larger batch")
        if self.data.partitioner == "shards" and fed.sites * self.data.shards_per_site > records:
            shards = fed.sites * self.data.shards_per_site
            raise ValueError(f"federation.sites x data.shards_per_site = {shards:,} shards, more than the "
                             f"{records:,} records of {self.data.source}")
        floats = train.batch_size * self.model.parameters()
        if floats > MAX_GRADIENT_FLOATS:
            raise ValueError(
                f"training.batch_size x model parameters = {train.batch_size:,} x {self.model.parameters():,}: "
                f"per-sample gradients would need {floats * 4 / 2**30:.0f} GiB (at most "
                f"{MAX_GRADIENT_FLOATS * 4 // 2**30} GiB); use a smaller batch or model")

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


NON_PRIVATE_TRAINING: dict[str, Any] = {"batch_size": 32, "learning_rate": 0.1}
"""The non-private baseline's local step (``non_private_baseline``): plain SGD's usual one. Without
clipping and noise the DP default's lr 1 with server step 2 overshoots (0.61 measured against
0.88 for this step, ``benchmarks/utility.py``)."""


def non_private_baseline(spec: Scenario) -> Scenario:
    """``spec`` as the baseline a DP run is compared against: the same federation, data, model and
    rounds, trained without DP (``privacy: none``) with plain SGD's step (``NON_PRIVATE_TRAINING``)
    and plain FedAvg, at simulated sites without a shared ε cap (a site with its own cap in
    ``site_policy_overrides`` keeps it, and refuses). What ``veil simulate --no-dp`` runs."""
    if spec.privacy.reproducible_noise:
        raise ScenarioError("the non-private baseline draws no DP noise: drop privacy.reproducible_noise "
                            "(--reproducible-noise) or --no-dp")
    raw = spec.model_dump(mode="json")
    raw["privacy"] = {"mechanism": "none"}
    raw["site_policy"]["epsilon_cap"] = None
    raw["training"].update(NON_PRIVATE_TRAINING)
    raw["server_optimizer"] = {"rule": "fedavg"}
    return parse_scenario(raw, source="the non-private baseline (--no-dp)")


def parse_scenario(raw: Any, source: str = "<dict>") -> Scenario:
    """Validate a mapping into a Scenario, or raise ScenarioError naming each bad field."""
    return config.validate(Scenario, raw, what="scenario", source=source, error=ScenarioError)


def load_scenario(path: Path | str | None = None) -> Scenario:
    """Read and validate a scenario YAML file (the default scenario when ``path`` is None)."""
    file = Path(path) if path is not None else DEFAULT_SCENARIO
    return parse_scenario(config.read_yaml(file, what="scenario", error=ScenarioError), source=str(file))
