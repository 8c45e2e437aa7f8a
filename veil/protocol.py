"""What travels between coordinator and sites, as typed records on both ends.

The coordinator sends a ``TrainTask`` (flat ConfigRecord); a site answers with its arrays, a
MetricRecord that FedAvg aggregates, and two ConfigRecords FedAvg ignores: the privacy event
it ran and who it is. Every decoder validates what it reads and raises ``ValueError`` naming
the field, so a malformed reply is rejected, recorded, and never aggregated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, cast

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from privacy import DpSgdEvent
from privacy.accounting import ACCOUNTANTS, AccountantName
from privacy.ckks import EncryptedVector, MalformedCiphertextError
from privacy.randomness import RNG_MODES, RngMode
from veil.names import EPSILON as EPSILON  # metric names, re-exported for the protocol
from veil.names import EVAL_ACC as EVAL_ACC
from veil.names import EVAL_LOSS as EVAL_LOSS
from veil.names import EVAL_SUMS as EVAL_SUMS
from veil.names import TRAIN_LOSS as TRAIN_LOSS
from veil.server_opt import ServerOptimizer
from veil.spec import Scenario

ARRAYS = "arrays"
METRICS = "metrics"
TASK = "config"
PRIVACY = "privacy"
SITE = "site"
BUDGET = "budget"
REFUSAL = "refusal"
BUDGET_QUERY = "query.budget"  # message type of the coordinator's pre-flight budget question
IDENTITY_QUERY = "query.identity"  # message type of "which site are you?" (answered with a SITE record)
# task-config key, one value per site: the rounds this run plans for that site (1..planned_rounds;
# absent means all of them). The site calibrates its σ for these and refuses any round beyond them.
SITE_ROUNDS = "site-rounds"
ENC_MODEL = "enc-model"  # coordinator -> sites: the encrypted aggregate (global model)
ENC_UPDATE = "enc-update"  # site -> coordinator: its pre-weighted, encrypted update
ENC_METRICS = "enc-metrics"  # site -> coordinator: its encrypted evaluation sums
# task-config keys of an encrypted round (public values only)
ENC_KEY_ID = "enc-key-id"
SERVER_STATE_LAYOUT = "server-state-layout"  # task/eval key: veil.server_opt.STATE_LAYOUT of a CKKS run's state
ENC_WEIGHT_NORM = "enc-weight-norm"  # sites weight by n / norm, so every sum stays within ±1 x |value|
RUN_REQUEST = "run-request"  # task-config key: the researcher's signed request (privacy.requests)
ENC_EVAL = "enc-eval"  # evaluation replies must be encrypted
ENC_RUN = "enc-run"  # the run reference every encrypted reply's integrity tag is bound to (with round, site)

NUM_EXAMPLES = "num-examples"


@dataclass(frozen=True)
class TrainTask:
    """One round's local training job, as the coordinator asks for it."""

    arch: str
    local_epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    max_grad_norm: float
    noise_multiplier: float  # 0.0 means "calibrate from target_epsilon"
    target_epsilon: float  # 0.0 means "use noise_multiplier"
    delta: float  # 0.0 means "site default: min(1e-5, 0.1/n)"
    accountant: AccountantName
    planned_rounds: int
    seed: int
    run_ref: str = ""  # which run asks (for the site's ledger); not trusted for anything else
    encrypted: bool = False  # whether the update leaves the site encrypted
    encrypted_eval: bool = False  # whether evaluation metrics leave the site encrypted
    # where DP noise and Poisson sampling come from: "os-entropy" (each site's own, private) or
    # "seeded" (from ``seed``: reproducible and NOT private; only simulated sites accept it)
    rng: RngMode = "os-entropy"
    # the server optimiser (``veil.server_opt``): with CKKS on, every site applies its step
    server_rule: str = "fedavg"
    server_learning_rate: float = 1.0
    server_momentum: float = 0.0
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    private: bool = True  # False: the labelled non-private baseline (plain SGD, no ε; capped sites refuse)

    @classmethod
    def from_scenario(cls, s: Scenario) -> TrainTask:
        """The scenario's training job; unset σ, target ε and δ travel as 0.0 (calibrate, use σ, site default)."""
        p, t = s.privacy, s.training
        return cls(
            arch=s.model.key,
            local_epochs=t.local_epochs,
            batch_size=t.batch_size,
            learning_rate=t.learning_rate,
            momentum=t.momentum,
            max_grad_norm=p.max_grad_norm,
            noise_multiplier=p.noise_multiplier or 0.0,
            target_epsilon=p.target_epsilon or 0.0,
            delta=p.delta or 0.0,
            accountant=p.accountant,
            planned_rounds=s.federation.rounds,
            seed=s.seed,
            encrypted=s.encryption.aggregation == "ckks",
            encrypted_eval=s.encryption.evaluation == "ckks",
            rng="seeded" if p.reproducible_noise else "os-entropy",
            **server_fields(s.server_optimizer.optimizer()),
            private=s.private,
        )

    def server_optimizer(self) -> ServerOptimizer:
        """The run's server optimiser (ValueError when the fields do not make one)."""
        return ServerOptimizer(cast(Any, self.server_rule), self.server_learning_rate, self.server_momentum,
                               self.server_beta2, self.server_tau)

    def for_run(self, run_ref: str) -> TrainTask:
        """The same task tagged with ``run_ref``, the run the site's ledger records its charges under."""
        from dataclasses import replace

        return replace(self, run_ref=run_ref)

    def to_config(self) -> ConfigRecord:
        """The task as the flat ConfigRecord sent to sites, one key per field."""
        return ConfigRecord(cast(Any, asdict(self)))

    @classmethod
    def from_config(cls, rec: ConfigRecord) -> TrainTask:
        """Decode and validate a task: all fields, counts >= 1, exactly one of σ and target ε, known names."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in rec:
                values[f.name] = rec[f.name]
            elif f.name not in _OPTIONAL_TASK_FIELDS:
                raise ValueError(f"training task is missing field {f.name!r}")
        task = cls(**values)
        if task.planned_rounds < 1 or task.batch_size < 1 or task.local_epochs < 1:
            raise ValueError("task: planned_rounds, batch_size and local_epochs must be >= 1")
        if task.accountant not in ACCOUNTANTS:
            raise ValueError(f"task.accountant must be one of {ACCOUNTANTS}, got {task.accountant!r}")
        if not isinstance(task.private, bool):
            raise ValueError(f"task.private must be true or false, got {str(task.private)[:40]!r}")
        if not task.private:
            if task.noise_multiplier != 0 or task.target_epsilon != 0 or task.rng != "os-entropy":
                raise ValueError("a non-private task sets no noise_multiplier, target_epsilon or seeded rng")
        elif (task.noise_multiplier > 0) == (task.target_epsilon > 0):
            raise ValueError("task must set exactly one of noise_multiplier and target_epsilon")
        if task.rng not in RNG_MODES:
            raise ValueError(f"task.rng must be one of {RNG_MODES}, got {str(task.rng)[:40]!r}")
        task.server_optimizer()  # raises on a rule or value no step accepts
        return task


def server_fields(opt: ServerOptimizer) -> dict[str, Any]:
    """A server optimiser as the ``server_*`` fields of a task (and of an evaluation's config)."""
    return {"server_rule": opt.rule, "server_learning_rate": float(opt.learning_rate),
            "server_momentum": float(opt.momentum), "server_beta2": float(opt.beta2),
            "server_tau": float(opt.tau)}


def server_optimizer_from(config: ConfigRecord | Mapping[str, Any]) -> ServerOptimizer:
    """The server optimiser a task or evaluation config names (plain FedAvg when it names none)."""
    defaults = ServerOptimizer()
    values = {k: config.get(k, v) for k, v in server_fields(defaults).items()}
    return ServerOptimizer(*values.values())


_OPTIONAL_TASK_FIELDS = frozenset({*server_fields(ServerOptimizer()), "private"})
"""Task fields a coordinator that predates them does not send: they take their defaults (plain FedAvg)."""


@dataclass(frozen=True)
class PrivacyReport:
    """A site's privacy event for this round plus its cumulative ε over the run so far."""

    event: DpSgdEvent
    delta: float
    accountant: str
    accountant_version: str
    epsilon: float
    sampling: str = "poisson"
    lifetime: LifetimeSpend | None = None
    rng: RngMode = "os-entropy"  # where the noise and the Poisson mask came from

    def to_config(self) -> ConfigRecord:
        """The report as the site's ``privacy`` ConfigRecord, with its ledger's lifetime fields when present."""
        extra = self.lifetime.to_dict() if self.lifetime else {}
        return ConfigRecord(
            {
                **extra,
                "noise-multiplier": self.event.noise_multiplier,
                "sample-rate": self.event.sample_rate,
                "steps": self.event.steps,
                "max-grad-norm": self.event.max_grad_norm,
                "delta": self.delta,
                "accountant": self.accountant,
                "accountant-version": self.accountant_version,
                "epsilon": self.epsilon,
                "sampling": self.sampling,
                "rng": self.rng,
            }
        )

    @classmethod
    def from_config(cls, rec: ConfigRecord) -> PrivacyReport:
        """Decode and validate a privacy record: Poisson sampling, δ in (0, 1), ε >= 0, a known rng mode."""
        try:
            event = DpSgdEvent(
                noise_multiplier=float(_num(rec, "noise-multiplier")),
                sample_rate=float(_num(rec, "sample-rate")),
                steps=_whole(rec, "steps"),
                max_grad_norm=float(_num(rec, "max-grad-norm")),
            )
        except ValueError as err:
            raise ValueError(f"privacy record: {err}") from None
        delta, eps = float(_num(rec, "delta")), float(_num(rec, "epsilon"))
        if not 0 < delta < 1:
            raise ValueError(f"privacy record: delta must be in (0, 1), got {delta}")
        if not (eps >= 0 and not math.isnan(eps)):
            raise ValueError(f"privacy record: epsilon must be >= 0, got {eps}")
        sampling = str(rec.get("sampling", ""))
        if sampling != "poisson":
            raise ValueError(f"privacy record: sampling must be 'poisson', got {sampling!r}")
        rng = rec.get("rng")
        if rng not in RNG_MODES:
            raise ValueError(f"privacy record: rng must be one of {RNG_MODES}, got {str(rng)[:40]!r}")
        lifetime = LifetimeSpend.from_config(rec) if "lifetime-epsilon" in rec else None
        return cls(
            event, delta, str(rec.get("accountant", "")), str(rec.get("accountant-version", "")), eps,
            lifetime=lifetime, rng=rng,
        )


@dataclass(frozen=True)
class LifetimeSpend:
    """What the site's ledger says after charging this round (lifetime, for this data set)."""

    dataset_id: str
    entry_id: str
    epsilon: float
    delta: float
    accountant: str
    cap: float | None
    head: LedgerHead | None = None  # the ledger's head right after this charge
    without_dp: int = 0  # rounds this scope released without DP: ``epsilon`` is then no lifetime guarantee

    def to_dict(self) -> dict[str, Any]:
        """The lifetime fields as flat config keys, with the ledger head, the cap and the rounds
        released without DP when present."""
        out: dict[str, Any] = {
            "dataset-id": self.dataset_id, "ledger-entry": self.entry_id,
            "lifetime-epsilon": self.epsilon, "lifetime-delta": self.delta,
            "ledger-accountant": self.accountant,
        }
        if self.head is not None:
            out.update(self.head.to_dict())
        if self.cap is not None:
            out["epsilon-cap"] = self.cap
        if self.without_dp:
            out["lifetime-without-dp"] = self.without_dp
        return out

    @classmethod
    def from_config(cls, rec: ConfigRecord) -> LifetimeSpend:
        """Decode the lifetime fields (ε >= 0, δ in (0, 1)) and the ledger head from a privacy record."""
        eps, delta = float(_num(rec, "lifetime-epsilon")), float(_num(rec, "lifetime-delta"))
        if not (eps >= 0 and 0 < delta < 1):
            raise ValueError(f"privacy record: lifetime ε={eps}, δ={delta} out of range")
        cap = float(_num(rec, "epsilon-cap")) if "epsilon-cap" in rec else None
        head = LedgerHead.from_config(rec)
        without_dp = _whole(rec, "lifetime-without-dp") if "lifetime-without-dp" in rec else 0
        if without_dp < 0:
            raise ValueError(f"privacy record: lifetime-without-dp must be >= 0, got {without_dp}")
        return cls(_short(rec, "dataset-id"), _short(rec, "ledger-entry"), eps, delta,
                   _short(rec, "ledger-accountant"), cap, head, without_dp)


@dataclass(frozen=True)
class LedgerHead:
    """Which ledger a site answers from and how far it has got: the coordinator remembers the
    last head it saw per site and refuses a ledger that has gone backwards or was swapped."""

    ledger_id: str
    seq: int  # entries in the ledger
    entry_hash: str  # hash of the last entry (the chain's head)
    predecessor: str | None = None  # a ledger the site's administrator explicitly replaced
    replaced_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The head as flat config keys; a replacement's predecessor and reason (≤ 500 chars) only if set."""
        out: dict[str, Any] = {"ledger-id": self.ledger_id, "ledger-seq": self.seq,
                               "ledger-head": self.entry_hash}
        if self.predecessor:
            out["ledger-predecessor"] = self.predecessor
            out["ledger-replaced-reason"] = (self.replaced_reason or "")[:500]
        return out

    @classmethod
    def from_config(cls, rec: ConfigRecord) -> LedgerHead:
        """Decode a ledger head: seq a non-negative integer, the head a sha256 hex digest."""
        seq = _num(rec, "ledger-seq")
        if not math.isfinite(seq) or seq != int(seq) or seq < 0:
            raise ValueError(f"field 'ledger-seq' must be a non-negative integer, got {seq!r}")
        head = _short(rec, "ledger-head")
        if len(head) != 64 or any(c not in "0123456789abcdef" for c in head):
            raise ValueError("field 'ledger-head' must be a sha256 hex digest")
        predecessor = _short(rec, "ledger-predecessor") if "ledger-predecessor" in rec else None
        reason = str(rec.get("ledger-replaced-reason", ""))[:500] if predecessor else None
        return cls(_short(rec, "ledger-id"), int(seq), head, predecessor, reason)


REFUSAL_CODES = (
    "budget-exhausted", "noise-below-minimum", "sample-rate-above-maximum", "encryption-required",
    "seeded-noise",  # a task asking for reproducible (seeded, not private) noise at a real site
    "non-private-refused",  # a task without DP (the labelled baseline) at a site whose policy caps ε
    # given by the coordinator, not the site: its ledger is not the one it reported last time
    "ledger-rolled-back", "ledger-replaced",
    # given by the coordinator: the node answers under another name than its key was registered with
    "unregistered-name",
    # who asked (privacy.requests): the run is not signed by a researcher the site trusts, or the
    # task is not what the researcher signed, or the signed request was already spent
    "unsigned-run", "untrusted-researcher", "bad-signature", "task-mismatch", "replayed-request",
    # the site's records do not fit the run's model (features, classes): said at the pre-flight
    "model-mismatch",
    # a training round beyond the rounds this run planned for the site (its σ was calibrated for those)
    "rounds-exhausted",
    # the site could not do what was asked (its ledger, data, keys...): its one-line reason
    "site-error",
)


@dataclass(frozen=True)
class Refusal:
    """A site's machine-readable "no" to a task, given before it trains."""

    code: str
    detail: str

    def __post_init__(self) -> None:
        if self.code not in REFUSAL_CODES:
            raise ValueError(f"refusal code must be one of {REFUSAL_CODES}, got {self.code!r}")

    def to_config(self) -> ConfigRecord:
        """The refusal as a ConfigRecord, its detail cut to 1,000 characters."""
        return ConfigRecord({"code": self.code, "detail": self.detail[:1000]})

    @classmethod
    def from_config(cls, rec: ConfigRecord) -> Refusal:
        """Decode a refusal; an unknown code is a ``ValueError``."""
        return cls(_short(rec, "code"), str(rec.get("detail", ""))[:1000])

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


@dataclass(frozen=True)
class BudgetStatus:
    """A site's answer to the pre-flight budget question for one planned run."""

    site_id: str
    dataset_id: str
    num_examples: int
    delta: float
    accountant: str
    cap: float | None
    spent: float
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    projected: float  # lifetime ε if the site joined every planned round
    affordable_rounds: int  # most planned rounds it can join within its cap
    refusal: Refusal | None = None
    ledger: LedgerHead | None = None
    without_dp: int = 0  # rounds the cap's scope released without DP: ``spent`` is then no lifetime guarantee

    def to_config(self) -> ConfigRecord:
        """The answer as the site's ``budget`` ConfigRecord; cap, refusal, ledger head and rounds
        released without DP only when set."""
        out: dict[str, Any] = {
            "site-id": self.site_id, "dataset-id": self.dataset_id,
            "num-examples": self.num_examples, "delta": self.delta, "accountant": self.accountant,
            "spent": self.spent, "noise-multiplier": self.noise_multiplier,
            "sample-rate": self.sample_rate, "steps-per-round": self.steps_per_round,
            "projected": self.projected, "affordable-rounds": self.affordable_rounds,
        }
        if self.cap is not None:
            out["cap"] = self.cap
        if self.refusal is not None:
            out["refusal-code"], out["refusal-detail"] = self.refusal.code, self.refusal.detail
        if self.ledger is not None:
            out.update(self.ledger.to_dict())
        if self.without_dp:
            out["without-dp"] = self.without_dp
        return ConfigRecord(out)

    @classmethod
    def from_config(cls, rec: ConfigRecord, *, private: bool = True) -> BudgetStatus:
        """Decode and bound a budget answer (whole counts, δ in (0, 1), σ > 0, q in (0, 1], non-negative
        spend and projection, a known accountant); ``ValueError`` names the bad field. The answer to a
        non-private task (``private=False``) has σ = 0: there is no mechanism."""
        refusal = None
        if "refusal-code" in rec:
            refusal = Refusal(_short(rec, "refusal-code"), str(rec.get("refusal-detail", ""))[:1000])
        status = cls(
            site_id=_site_id(rec.get("site-id")), dataset_id=_short(rec, "dataset-id"),
            num_examples=_whole(rec, "num-examples"), delta=float(_num(rec, "delta")),
            accountant=_short(rec, "accountant"),
            cap=float(_num(rec, "cap")) if "cap" in rec else None,
            spent=float(_num(rec, "spent")), noise_multiplier=float(_num(rec, "noise-multiplier")),
            sample_rate=float(_num(rec, "sample-rate")),
            steps_per_round=_whole(rec, "steps-per-round"),
            projected=float(_num(rec, "projected")),
            affordable_rounds=_whole(rec, "affordable-rounds"), refusal=refusal,
            ledger=LedgerHead.from_config(rec),
            without_dp=_whole(rec, "without-dp") if "without-dp" in rec else 0,
        )
        bounds = [
            ("num-examples", status.num_examples, status.num_examples >= 1, ">= 1"),
            ("steps-per-round", status.steps_per_round, status.steps_per_round >= 1, ">= 1"),
            ("affordable-rounds", status.affordable_rounds, status.affordable_rounds >= 0, ">= 0"),
            ("without-dp", status.without_dp, status.without_dp >= 0, ">= 0"),
            ("delta", status.delta, 0 < status.delta < 1, "in (0, 1)"),
            ("noise-multiplier", status.noise_multiplier,
             status.noise_multiplier > 0 and math.isfinite(status.noise_multiplier) if private
             else status.noise_multiplier == 0, "a finite number > 0" if private else "0 (a non-private task)"),
            ("sample-rate", status.sample_rate, 0 < status.sample_rate <= 1, "in (0, 1]"),
            ("spent", status.spent, status.spent >= 0, ">= 0"),
            ("projected", status.projected, status.projected >= 0, ">= 0"),
            ("cap", status.cap, status.cap is None or status.cap > 0, "> 0"),
        ]
        for name, value, ok, allowed in bounds:
            if not ok:
                raise ValueError(f"budget record: {name} must be {allowed}, got {value}")
        if status.accountant not in ACCOUNTANTS:
            raise ValueError(f"budget record: accountant must be one of {ACCOUNTANTS}, got {status.accountant!r}")
        return status


@dataclass(frozen=True)
class SiteInfo:
    """Who answered and how: site id, device type, seconds, test records (0 if evaluation is encrypted)."""

    site_id: str
    device: str
    seconds: float
    num_test: int = 0

    def to_config(self) -> ConfigRecord:
        """The ``site`` ConfigRecord every reply carries."""
        return ConfigRecord(
            {"site-id": self.site_id, "device": self.device, "seconds": self.seconds,
             "num-test": self.num_test}
        )

    @classmethod
    def from_config(cls, rec: ConfigRecord) -> SiteInfo:
        """Decode a ``site`` record: a non-empty, printable site id of at most 200 characters and a
        whole, non-negative test count."""
        num_test = rec.get("num-test", 0)
        if isinstance(num_test, bool) or not isinstance(num_test, int) or num_test < 0:
            raise ValueError(f"site record: num-test must be a whole number >= 0, got {str(num_test)[:40]!r}")
        return cls(_site_id(rec.get("site-id")), str(rec.get("device", "?")), float(_num(rec, "seconds")),
                   num_test)


def _site_id(value: object) -> str:
    """A site id: a non-empty string of at most 200 printable characters (it goes into logs and records)."""
    if not isinstance(value, str) or not 0 < len(value) <= 200 or not value.isprintable():
        raise ValueError(f"site record: site-id must be a non-empty string of at most 200 printable "
                         f"characters, got {str(value)[:60]!r}")
    return value


def _short(rec: ConfigRecord, key: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str) or len(value) > 200:
        raise ValueError(f"field {key!r} must be a string of at most 200 characters, got {value!r}")
    return value


def _whole(rec: ConfigRecord | MetricRecord, key: str) -> int:
    """A count: an integer on the wire, never a float to be truncated."""
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"field {key!r} must be a whole number, got {str(value)[:40]!r}")
    return value


def _num(rec: ConfigRecord | MetricRecord, key: str) -> float:
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"field {key!r} must be a number, got {value!r}")
    if math.isnan(value):
        raise ValueError(f"field {key!r} is NaN")
    return value


def site_info(content: RecordDict) -> SiteInfo:
    """The replying site's ``SiteInfo``; ``ValueError`` if the record is missing or malformed."""
    rec = content.get(SITE)
    if not isinstance(rec, ConfigRecord):
        raise ValueError("reply has no site record")
    return SiteInfo.from_config(rec)


def metric(content: RecordDict, key: str) -> float:
    """The number ``key`` from a reply's metrics record; ``ValueError`` if missing, not a number or NaN."""
    rec = content.get(METRICS)
    if not isinstance(rec, MetricRecord):
        raise ValueError("reply has no metrics record")
    return _num(rec, key)


Phase = Literal["train", "evaluate"]


def encrypted_record(enc: EncryptedVector, tag: bytes | None = None) -> ConfigRecord:
    """Ciphertext bytes as they travel: TenSEAL protobuf bytes in a ConfigRecord, never pickle;
    a site's reply adds its integrity ``tag`` (``privacy.ckks.SecretKey.tag``)."""
    rec = ConfigRecord({"key-id": enc.key_id, "values": enc.values, "chunks": list(enc.chunks)})
    if tag is not None:
        rec["tag"] = tag
    return rec


def reply_tag(content: RecordDict, key: str) -> bytes:
    """The integrity tag of the encrypted record ``key`` in a reply; empty if it has none (then the
    coordinator's check rejects it)."""
    rec = content.get(key)
    tag = rec.get("tag") if isinstance(rec, ConfigRecord) else None
    return tag if isinstance(tag, bytes) else b""


def encrypted_from(content: RecordDict, key: str) -> EncryptedVector:
    """Read an encrypted stream from a message; any shape problem is a MalformedCiphertextError."""
    rec = content.get(key)
    if not isinstance(rec, ConfigRecord):
        raise MalformedCiphertextError(f"message has no {key!r} record")
    key_id, values, chunks = rec.get("key-id"), rec.get("values"), rec.get("chunks")
    if not isinstance(key_id, str) or len(key_id) > 64:
        raise MalformedCiphertextError("encrypted record: key-id must be a short string")
    if isinstance(values, bool) or not isinstance(values, int) or values < 1:
        raise MalformedCiphertextError(f"encrypted record: values must be a positive integer, got {values!r}")
    if isinstance(chunks, bytes):
        chunks = [chunks]
    if not isinstance(chunks, list) or not all(isinstance(c, bytes) for c in chunks):
        raise MalformedCiphertextError("encrypted record: chunks must be a list of bytes")
    return EncryptedVector(key_id, values, tuple(cast(list[bytes], chunks)))


def encrypted_nbytes(rec: ConfigRecord) -> int:
    """Bytes of ciphertext in an encrypted record (0 without a chunk list): what it costs on the wire."""
    chunks = rec.get("chunks")
    if not isinstance(chunks, list):
        return 0
    return sum(len(c) for c in cast(list[bytes], chunks))
