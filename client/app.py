"""The site's Flower ClientApp: budget answers, local DP-SGD training, evaluation.

``build_client_app(resolve_site)`` makes the app; the module-level app that ``flwr run``
loads (``veil.apps.clientapp``) passes a resolver for deployed or simulated sites.

What the site does with a training task, in this order:

1. decides σ (given, or calibrated once per run so this run's ε stays within its target);
2. checks its own policy (minimum σ, maximum q, encryption) and refuses with a
   machine-readable reason if the task breaks it;
3. **charges its ledger durably** (lifetime ε of this data set, across runs), or refuses
   with ``budget-exhausted`` if the charge would pass its cap;
4. only then trains, and releases an update whose mechanism equals what was charged.

The coordinator's task cannot change any of this: policy and ledger belong to the site.
Nor can it choose the randomness: the DP noise and the Poisson mask are drawn from the
site's own OS entropy, fresh each round (``privacy.randomness``). A task asking for seeded,
reproducible noise is refused (``seeded-noise``) unless the site is a simulated one.

With CKKS on, the site decrypts the coordinator's encrypted aggregate with its own secret
key (``Site.keys``), and sends back its update pre-weighted by ``n / weight-norm``, flattened
into one stream with the weight as its last value, encrypted; evaluation sums likewise. Each
encrypted reply carries the key set's integrity tag for this run (``P.ENC_RUN``), round and
site (``privacy.ckks.ReplyBinding``), which the coordinator checks before adding it.

Run-level ε: the site also keeps the events of the current run in ``Context.state`` and
reports ε over them with the task's accountant, so a fresh Opacus engine each round cannot
under-report.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import fields

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import Site, SiteResolver
from client.training import evaluate, poisson_plan, train_dp_sgd, train_sgd
from privacy import DpSgdEvent, accountant_version, calibrate_noise_multiplier, default_delta, epsilon
from privacy.ckks import ReplyBinding, ReplyKind, SecretKey, flatten, unflatten
from privacy.ledger import BudgetExceeded, LedgerView, SiteLedger, Spent, dataset_id
from privacy.randomness import RoundRandomness, describe, os_seed
from privacy.requests import SITE_MAX_AGE_S, RequestRefused, SignedRequest
from veil import protocol as P
from veil.errors import ScenarioError, VeilError
from veil.logs import get_logger
from veil.models import build_model
from veil.names import eval_sums
from veil.server_opt import STATE_LAYOUT, ServerOptimizer, ServerState, decode_aggregate
from veil.spec import Scenario, parse_scenario

log = get_logger("client")
Handler = Callable[[Message, Context], Message]
_HISTORY = "veil.privacy-history"
_SIGMA = "veil.sigma-planned"
_LEDGERS: dict[str, SiteLedger] = {}
_KEYS: dict[str, SecretKey] = {}


def forget_loaded() -> None:
    """Drop the keys and ledgers this process loaded (a long-lived worker whose site.yaml changed)."""
    _KEYS.clear()
    for ledger in _LEDGERS.values():
        ledger.close()
    _LEDGERS.clear()


def site_key(site: Site, key_id: object) -> SecretKey:
    """The site's CKKS secret key (loaded once per process), checked against the task's key id."""
    if site.keys is None:
        raise ValueError(f"{site.site_id}: the task is encrypted (CKKS) but this site has no key set "
                         "configured (a secret.ckks from veil keys create)")
    path = str(site.keys)
    if path not in _KEYS:
        _KEYS[path] = SecretKey.load(site.keys)
    key = _KEYS[path]
    if key_id != key.key_id:
        raise ValueError(f"{site.site_id}: the task is encrypted under key set {key_id!r}, "
                         f"this site holds {key.key_id!r}")
    key.check_can_tag()  # a key set without a reply key cannot answer: say so at the pre-flight
    return key


def _reply_binding(config: ConfigRecord, site: Site, server_round: int, kind: ReplyKind) -> ReplyBinding:
    """What this encrypted reply's integrity tag is bound to: the coordinator's run reference, the
    round, this site and the kind of stream."""
    run = config.get(P.ENC_RUN)
    if not isinstance(run, str) or not 0 < len(run) <= 200:
        raise ValueError(f"{site.site_id}: encrypted task without a {P.ENC_RUN!r} run reference (a coordinator "
                         "that predates reply integrity); nothing encrypted is sent")
    return ReplyBinding(run, server_round, site.site_id, kind)


def _weight(config: ConfigRecord, n: int) -> float:
    """This site's share n / norm; the coordinator's norm must cover at least this site."""
    norm = config.get(P.ENC_WEIGHT_NORM)
    if isinstance(norm, bool) or not isinstance(norm, int | float) or not norm >= n:
        raise ValueError(f"encrypted task: {P.ENC_WEIGHT_NORM} must be a number >= {n}, got {norm!r}")
    return n / float(norm)


def _encrypted_update(model: torch.nn.Module, key: SecretKey, weight: float, binding: ReplyBinding,
                      state: np.ndarray) -> ConfigRecord:
    """The model, then the server optimiser's ``state`` (empty for FedAvg), all times ``weight``,
    then the weight: the coordinator's sum divided by its last value is the weighted mean of the
    models followed by the state every site shares."""
    arrays = [t.detach().cpu().numpy() for t in model.state_dict().values()]
    enc = key.encrypt(np.append(np.concatenate([flatten(arrays), state]) * weight, weight))
    return P.encrypted_record(enc, key.tag(enc, binding))


def _check_state_headroom(key: SecretKey, opt: ServerOptimizer, state: ServerState) -> None:
    """The optimiser state this site appends must fit CKKS's headroom unweighted: every site
    appends the same state, so the aggregate's slots sum to (sum of weights) x state, up to the
    state itself (the model is checked when it is encrypted, after training)."""
    peak = float(np.max(np.abs(state.to_stream(opt))))
    if peak > key.params.headroom / 2:
        raise ValueError(f"the {opt.rule} state reaches {peak:.3g}, beyond half the CKKS headroom "
                         f"(±{key.params.headroom / 2:g}); nothing was charged: use a larger data prime")


def open_ledger(site: Site) -> SiteLedger:
    """The site's ledger, opened (and verified) once per process; a damaged, foreign, missing
    (when pinned) or rolled-back one raises ``LedgerError``."""
    key = str(site.ledger)
    if key not in _LEDGERS:
        _LEDGERS[key] = SiteLedger(site.ledger, site_id=site.site_id, ledger_id=site.ledger_id,
                                   create=site.ledger_id is None)
        _note_new_dataset(site, _LEDGERS[key])
    return _LEDGERS[key]


def _note_new_dataset(site: Site, ledger: SiteLedger) -> None:
    """Say so when this data is new to a ledger that already holds other data sets."""
    known = ledger.fingerprints()
    if not known or site.fingerprint in known:
        return
    if site.policy.cap_scope == "dataset":
        log.warning("%s: its training data (data set %s) is new to ledger %s, which holds %d other data "
                    "set(s); under cap_scope: dataset it starts a fresh budget. If these are the same "
                    "records re-saved or re-split, set cap_scope: ledger", site.site_id,
                    dataset_id(site.fingerprint), ledger.ledger_id, len(known))
    else:
        log.info("%s: new data set %s composes with the %d data set(s) already in ledger %s "
                 "(cap_scope: ledger)", site.site_id, dataset_id(site.fingerprint), len(known), ledger.ledger_id)


def _ledger_head(ledger: SiteLedger | LedgerView) -> P.LedgerHead:
    h = ledger.head()
    return P.LedgerHead(h.ledger_id, h.seq, h.entry_hash, h.predecessor, h.replaced_reason)


def _request_check(site: Site, task: P.TrainTask, config: ConfigRecord
                   ) -> tuple[P.Refusal | None, SignedRequest | None]:
    """Whose run is this? The task must carry a request signed by a researcher this site trusts,
    and be exactly the task that researcher signed (σ or ε, rounds, model, batch, ...)."""
    if site.researchers is None:
        return None, None
    try:
        request, scenario = _verified(site, config)
        signed = P.TrainTask.from_scenario(scenario)
        differ = [f.name for f in fields(task) if f.name != "run_ref"
                  and getattr(task, f.name) != getattr(signed, f.name)]
        if differ:
            raise RequestRefused("task-mismatch", "the task differs from what the researcher signed in "
                                 + ", ".join(differ))
    except RequestRefused as err:
        return P.Refusal(err.code, err.detail), None
    return None, request


def _verified(site: Site, config: ConfigRecord) -> tuple[SignedRequest, Scenario]:
    """The task's signed request and its scenario, if a researcher this site trusts signed it."""
    assert site.researchers is not None
    request = SignedRequest.from_json(config.get(P.RUN_REQUEST))
    if not site.researchers and not (request.ephemeral and site.accept_ephemeral):
        raise RequestRefused("untrusted-researcher", "this site trusts no researcher keys yet; list their "
                             "public keys in site.yaml under policy.trusted_researchers")
    request.verify({r.key_id: r for r in site.researchers}, accept_ephemeral=site.accept_ephemeral)
    try:
        return request, parse_scenario(request.scenario, "the signed request")
    except ScenarioError as err:
        raise RequestRefused("task-mismatch", f"the signed scenario is not valid here: {err}") from None


def _evaluation_refusal(site: Site, config: ConfigRecord) -> P.Refusal | None:
    """An evaluation is answered only for a run a trusted researcher signed, on the signed model,
    and encrypted when the researcher signed an encrypted evaluation."""
    if site.researchers is None:
        return None
    try:
        _, signed = _verified(site, config)
    except RequestRefused as err:
        return P.Refusal(err.code, err.detail)
    if str(config.get("arch", "")) != signed.model.key:
        return P.Refusal("task-mismatch", "the model to evaluate is not the one the researcher signed")
    if bool(config.get(P.ENC_EVAL)) != (signed.encryption.evaluation == "ckks"):
        return P.Refusal("task-mismatch", "the evaluation's encryption is not what the researcher signed")
    try:
        if P.server_optimizer_from(config) != signed.server_optimizer.optimizer():
            return P.Refusal("task-mismatch",
                             "the evaluation's server optimiser is not what the researcher signed")
    except ValueError as err:
        return P.Refusal("task-mismatch", f"the evaluation's server optimiser is not valid: {err}")
    return None


def _ledger_ref(task: P.TrainTask, request: SignedRequest | None, rounds: int) -> str:
    """What the ledger records as the run: the coordinator's run reference, the rounds planned for
    this site when fewer than all (so a run cannot re-plan them halfway), plus the signed nonce."""
    planned = f"|rounds:{rounds}" if rounds < task.planned_rounds else ""
    return task.run_ref[:150] + planned + (f"|req:{request.nonce}" if request else "")


def _same_run(ledger_ref: str, task: P.TrainTask, request: SignedRequest | None) -> bool:
    """Whether a ledger entry's run reference is this run's, whatever rounds it planned for the site."""
    head, tail = task.run_ref[:150], (f"|req:{request.nonce}" if request else "")
    if not (ledger_ref.startswith(head) and ledger_ref.endswith(tail)) or len(ledger_ref) < len(head + tail):
        return False
    return re.fullmatch(r"(\|rounds:\d+)?", ledger_ref[len(head):len(ledger_ref) - len(tail)]) is not None


def site_rounds(task: P.TrainTask, config: ConfigRecord) -> int | P.Refusal:
    """The rounds this run plans for this site (``P.SITE_ROUNDS``; absent: all ``planned_rounds``),
    bounded by the rounds the task (and the researcher's signature) planned for the run."""
    value = config.get(P.SITE_ROUNDS, task.planned_rounds)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= task.planned_rounds:
        return P.Refusal("task-mismatch", f"{P.SITE_ROUNDS} must be a whole number from 1 to the run's "
                         f"{task.planned_rounds} planned rounds, got {str(value)[:40]!r}")
    return value


def _rounds_refusal(ledger: SiteLedger | LedgerView, task: P.TrainTask, request: SignedRequest | None,
                    rounds: int) -> P.Refusal | None:
    """A run trains here at most the ``rounds`` it planned for this site, and never re-plans them:
    σ was calibrated for those rounds, so one more (or a σ for a different count) could pass the
    run's target ε. (With a signed request the ledger's claim enforces this atomically too.)"""
    mine = _ledger_ref(task, request, rounds)
    same_run = [e.run_ref for e in ledger.entries() if _same_run(e.run_ref, task, request)]
    if any(ref != mine for ref in same_run):
        return P.Refusal("rounds-exhausted", f"this run already trained here under another plan of rounds "
                         f"for this site, now {rounds} of {task.planned_rounds}: a run cannot re-plan them")
    if len(same_run) >= rounds:
        return P.Refusal("rounds-exhausted", f"this run planned {rounds} of its {task.planned_rounds} rounds "
                         f"for this site (its σ is calibrated for them) and all {rounds} are trained")
    return None


def _replay_refusal(ledger: SiteLedger | LedgerView, task: P.TrainTask, request: SignedRequest | None
                    ) -> P.Refusal | None:
    """One signed request pays for at most its planned rounds here, under one run: a coordinator
    cannot spend a researcher's signature twice."""
    if request is None:
        return None
    mark = f"|req:{request.nonce}"
    spent = [e.run_ref for e in ledger.entries() if e.run_ref.endswith(mark)]
    if not spent:  # its first charge here: a signature kept for days is not spent now
        try:
            request.check_fresh(max_age=SITE_MAX_AGE_S)
        except RequestRefused as err:
            return P.Refusal("replayed-request", err.detail)
    if not all(_same_run(ref, task, request) for ref in spent):
        return P.Refusal("replayed-request", "this signed request was already charged here under another run")
    if len(spent) >= task.planned_rounds:
        return P.Refusal("replayed-request", f"this signed request has paid for all {task.planned_rounds} "
                         "of its rounds here")
    return None


def _rng_refusal(site: Site, task: P.TrainTask) -> P.Refusal | None:
    if task.rng == "seeded" and not site.allow_seeded_noise:
        return P.Refusal("seeded-noise", "this site draws DP noise and sampling from its own entropy only; "
                         "reproducible (seeded) noise is not private and exists for `veil simulate "
                         "--reproducible-noise` alone")
    return None


@functools.cache
def _explain_noise_once() -> None:
    """Once per process: what the DP noise is drawn with (Opacus's own secure mode is off)."""
    log.info("DP-SGD noise: Opacus secure-mode sampler (sum of 4 Gaussian draws per value, the "
             "floating-point-attack defence) on torch.Generator; noise and Poisson-mask seeds are 64 bits "
             "each from os.urandom, fresh per round, never sent. Opacus's secure_mode CSPRNG "
             "(torchcsprng) is not available for torch 2.13, so the generator is not a CSPRNG")


def _history(context: Context) -> list[DpSgdEvent]:
    rec = context.state.get(_HISTORY)
    if not isinstance(rec, ConfigRecord):
        return []
    cols = [rec[k] for k in ("sigma", "q", "steps", "clip")]
    return [DpSgdEvent(float(s), float(q), int(n), float(c)) for s, q, n, c in zip(*cols, strict=True)]


def _append_history(context: Context, event: DpSgdEvent) -> None:
    rows = [*_history(context), event]
    context.state[_HISTORY] = ConfigRecord(
        {
            "sigma": [e.noise_multiplier for e in rows],
            "q": [e.sample_rate for e in rows],
            "steps": [e.steps for e in rows],
            "clip": [e.max_grad_norm for e in rows],
        }
    )


def _noise_multiplier(task: P.TrainTask, context: Context, n: int, delta: float, rounds: int) -> float:
    """The task's σ, or σ calibrated once per run so ε over the ``rounds`` planned for this site ≤ target."""
    if task.noise_multiplier > 0:
        return task.noise_multiplier
    q, steps = poisson_plan(n, task.batch_size, task.local_epochs)
    # the calibration is remembered for exactly its inputs: a query for another target (even a
    # refused one) can never set the σ a later task trains with
    key = f"{task.target_epsilon!r}|{delta!r}|{q!r}|{steps * rounds}|{task.accountant}"
    rec = context.state.get(_SIGMA)
    if isinstance(rec, ConfigRecord) and rec.get("key") == key and "sigma" in rec:
        return float(rec["sigma"])  # type: ignore[arg-type]
    sigma = calibrate_noise_multiplier(task.target_epsilon, delta, q, steps * rounds, task.accountant)
    context.state[_SIGMA] = ConfigRecord({"sigma": sigma, "key": key})
    return sigma


def _run_delta(task: P.TrainTask, site: Site) -> float:
    n = len(site.train)
    delta = task.delta or default_delta(n)
    if delta >= 1.0 / n:
        raise ValueError(f"{site.site_id}: δ={delta} is not below 1/n = {1.0 / n:.3g}")
    return delta


def _planned_event(task: P.TrainTask, context: Context, site: Site, rounds: int) -> DpSgdEvent:
    """The exact mechanism one round of this task runs on this site (charged before it runs), with
    σ for the ``rounds`` the run planned for this site."""
    n = len(site.train)
    sigma = _noise_multiplier(task, context, n, _run_delta(task, site), rounds)
    q, steps = poisson_plan(n, task.batch_size, task.local_epochs)
    return DpSgdEvent(sigma, q, steps, task.max_grad_norm)


def _policy_refusal(site: Site, task: P.TrainTask, planned: DpSgdEvent) -> P.Refusal | None:
    found = site.policy.violation(planned.noise_multiplier, planned.sample_rate, task.encrypted)
    return P.Refusal(*found) if found else _rng_refusal(site, task)


def _exhausted(ledger: SiteLedger | LedgerView, site: Site) -> str:
    """Why not even one round fits: the budget, or a round this scope released without DP."""
    policy = site.policy
    view = ledger.view() if isinstance(ledger, SiteLedger) else ledger
    plain = view.without_dp(site.fingerprint, policy.cap_scope)
    if plain:
        return (f"this site's ledger records {plain} round(s) released without DP in the scope of its ε cap "
                f"({policy.cap_scope}): no finite lifetime ε holds any more, so the cap refuses every charge")
    return "not even one round of this task fits in the remaining budget"


def _non_private_refusal(site: Site, task: P.TrainTask) -> P.Refusal | None:
    """A task without DP (the labelled baseline) is for sites whose policy promises no ε: a cap or a
    minimum σ refuses it, and so does a site that only releases encrypted updates to a plaintext run."""
    if task.private:
        return None
    policy = site.policy
    if policy.epsilon_cap is not None:
        return P.Refusal("non-private-refused", f"the task trains without DP, and this site's policy caps its "
                         f"ε at {policy.epsilon_cap:g}: it only trains privately")
    if policy.min_noise_multiplier > 0:
        return P.Refusal("non-private-refused", "the task trains without DP, and this site's policy asks for "
                         f"σ >= {policy.min_noise_multiplier:g}")
    if policy.require_encryption and not task.encrypted:
        return P.Refusal("encryption-required",
                         "this site only releases encrypted updates; enable encryption in the run spec")
    return _rng_refusal(site, task)


def _non_private_status(site: Site, task: P.TrainTask, ledger: LedgerView, refusal: P.Refusal | None,
                        rounds: int) -> P.BudgetStatus:
    """The pre-flight answer to a non-private task: no mechanism (σ 0), no ε to charge (each round
    it trains is still written to the ledger, as a release without DP)."""
    policy = site.policy
    delta = policy.delta_for(len(site.train))
    spend = ledger.spent(site.fingerprint, delta=delta, accountant=policy.accountant, scope=policy.cap_scope)
    q, steps = poisson_plan(len(site.train), task.batch_size, task.local_epochs)
    return P.BudgetStatus(
        site_id=site.site_id, dataset_id=dataset_id(site.fingerprint), num_examples=len(site.train),
        delta=delta, accountant=policy.accountant, cap=policy.epsilon_cap, spent=spend.epsilon,
        noise_multiplier=0.0, sample_rate=q, steps_per_round=steps, projected=spend.epsilon,
        affordable_rounds=0 if refusal else rounds, refusal=refusal, ledger=_ledger_head(ledger),
        without_dp=spend.without_dp)


def _train_non_private(msg: Message, site: Site, task: P.TrainTask, model: torch.nn.Module) -> RecordDict:
    """One round of plain SGD: the NOT private baseline, already written to the ledger as a
    release without DP (no ε); the reply carries no privacy report, and the coordinator records
    it as not private."""
    log.warning("%s trains WITHOUT differential privacy (privacy.mechanism: none): this round's update is "
                "NOT private; its policy has no ε cap, so it accepts, and its ledger records the round as "
                "released without DP", site.site_id)
    out = train_sgd(model, site.train, batch_size=task.batch_size, local_epochs=task.local_epochs,
                    learning_rate=task.learning_rate, momentum=task.momentum, device=site.device,
                    seed=os_seed())
    num_test = 0 if task.encrypted_eval else len(site.test)
    return RecordDict({
        P.METRICS: MetricRecord({P.NUM_EXAMPLES: out.num_examples, P.TRAIN_LOSS: out.mean_loss}),
        P.SITE: P.SiteInfo(site.site_id, site.device.type, out.seconds, num_test).to_config(),
    })


def _attach_update(content: RecordDict, model: torch.nn.Module, site: Site, config: ConfigRecord,
                   server_round: int, opt: ServerOptimizer, opt_state: ServerState | None) -> None:
    """The trained model into the reply: as plaintext arrays, or (CKKS on) encrypted, pre-weighted
    and followed by the server optimiser's state."""
    task = P.TrainTask.from_config(config)
    if not task.encrypted:
        content[P.ARRAYS] = ArrayRecord(model.state_dict())
        return
    key = site_key(site, config.get(P.ENC_KEY_ID))
    binding = _reply_binding(config, site, server_round, "update")
    state = opt_state.to_stream(opt) if opt_state is not None else np.zeros(0)
    content[P.ENC_UPDATE] = _encrypted_update(model, key, _weight(config, len(site.train)), binding, state)


def _refuse(msg: Message, site: Site, refusal: P.Refusal) -> Message:
    log.warning("%s refuses the task: %s", site.site_id, refusal)
    content = RecordDict({
        P.REFUSAL: refusal.to_config(),
        P.SITE: P.SiteInfo(site.site_id, site.device.type, 0.0, len(site.test)).to_config(),
    })
    return Message(content=content, reply_to=msg)


def _task_config(msg: Message) -> ConfigRecord:
    config = msg.content.get(P.TASK)
    if not isinstance(config, ConfigRecord):
        raise ValueError(f"message has no {P.TASK!r} config record")
    return config


class ModelMismatch(ValueError):
    """The site's records do not fit the run's model."""


def _sentence(err: BaseException) -> str:
    """An exception as the one line a site sends back: no traceback, no control characters."""
    text = str(err) if isinstance(err, ValueError | VeilError) else f"{type(err).__name__}: {err}"
    line = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return line[:500] or type(err).__name__


def answers_with_a_sentence(handler: Handler, resolve_site: SiteResolver) -> Handler:
    """A handler that never raises at the coordinator: whatever fails at the site (its ledger,
    its data, a key, a bug) is logged here in full and answered as a refusal, ``site-error``
    (or ``model-mismatch``) plus one line, instead of a framework traceback."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:  # the site's log keeps the traceback
            code = "model-mismatch" if isinstance(err, ModelMismatch) else "site-error"
            try:
                label = resolve_site(context).site_id
            except Exception:  # the site itself cannot be set up: say which node
                label = _site_label(context)
            log.error("%s: cannot answer the %s message: %s", label, msg.metadata.message_type,
                      _sentence(err), exc_info=not isinstance(err, ValueError | VeilError))
            content = RecordDict({P.REFUSAL: P.Refusal(code, _sentence(err)).to_config(),
                                  P.SITE: P.SiteInfo(label, "?", 0.0, 0).to_config()})
            return Message(content=content, reply_to=msg)

    return wrapped


def _site_label(context: Context) -> str:
    site_id = context.node_config.get("site-id") or context.node_config.get("partition-id")
    if isinstance(site_id, int):
        return f"site-{site_id}"
    return str(site_id)[:200] if site_id else f"node-{context.node_id}"


def _check_fit(arch: str, site: Site) -> None:
    """The site's records must fit the run's model; otherwise say what to change, before any charge."""
    from veil.models import parse_arch

    _, n_in, n_out = parse_arch(arch)
    x, y = site.train.tensors
    per_record = int(x[0].numel()) if len(x) else 0
    if per_record != n_in:
        raise ModelMismatch(f"{site.site_id}: its records have {per_record} features but the run's model {arch!r} "
                         f"takes {n_in}; set model.in_features: {per_record} (arch: mlp) in the scenario")
    top = int(y.max()) + 1 if len(y) else 0
    if top > n_out:
        raise ModelMismatch(f"{site.site_id}: its data has {top} classes but the run's model {arch!r} predicts "
                         f"{n_out}; set model.num_classes: {top} in the scenario")


def _model_from(msg: Message, arch: str, site: Site, opt: ServerOptimizer
                ) -> tuple[torch.nn.Module, ServerState | None]:
    """The coordinator's model, and (CKKS runs with a server optimiser) the optimiser state this
    site carries on; arrays that do not fit the architecture are refused.

    An encrypted aggregate is decrypted with the site's key (released: noise-flooded and
    rounded) and divided by its summed weight; with a server optimiser the site then applies
    the server step itself (``veil.server_opt``), as every other site does. Plaintext arrays
    are the model as sent (round 1 of an encrypted run: the optimiser's initial state)."""
    _check_fit(arch, site)
    model = build_model(arch)
    layers = [t.numpy() for t in model.state_dict().values()]
    if P.ENC_MODEL in msg.content:
        task = msg.content.get(P.TASK)
        layout = task.get(P.SERVER_STATE_LAYOUT, 1) if isinstance(task, ConfigRecord) else 1
        if opt.stateful and layout != STATE_LAYOUT:  # a coordinator (and sites) of another Veil version
            raise ValueError(f"the run's {opt.rule} state is laid out as version {str(layout)[:8]}; this site "
                             f"reads version {STATE_LAYOUT}: every site and the coordinator need the same Veil")
        enc = P.encrypted_from(msg.content, P.ENC_MODEL)
        mean, _ = site_key(site, enc.key_id).decrypt_mean(enc)
        x, state = decode_aggregate(opt, mean, sum(int(a.size) for a in layers))
        values = unflatten(x, layers)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in zip(model.state_dict(), values, strict=True)})
        return model, state
    arrays = msg.content.get(P.ARRAYS)
    if not isinstance(arrays, ArrayRecord):
        raise ValueError(f"message has no {P.ARRAYS!r} array record")
    try:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    except RuntimeError as err:
        raise ValueError(f"arrays do not fit model {arch!r}: {err}") from None
    if not opt.stateful:
        return model, None
    return model, ServerState.initial(opt, flatten([t.numpy() for t in model.state_dict().values()]))


def build_client_app(resolve_site: SiteResolver) -> ClientApp:
    """The site's ClientApp: budget pre-flight, DP-SGD training and evaluation, for ``resolve_site``'s site."""
    app = ClientApp()

    @app.query("budget")
    @functools.partial(answers_with_a_sentence, resolve_site=resolve_site)
    def budget(msg: Message, context: Context) -> Message:
        """Pre-flight: what this run would cost this site, and how much of it the site allows."""
        site: Site = resolve_site(context)
        config = _task_config(msg)
        task = P.TrainTask.from_config(config)
        refusal, request = _request_check(site, task, config)  # whose run is it, before anything else
        if refusal is None and (task.encrypted or task.encrypted_eval):  # no key or the wrong one: say so now
            site_key(site, config.get(P.ENC_KEY_ID))
        if refusal is None:
            try:  # records that do not fit the model: said now, not after the run has started
                _check_fit(task.arch, site)
            except ModelMismatch as err:
                refusal = P.Refusal("model-mismatch", str(err))
        rounds = site_rounds(task, config)
        if isinstance(rounds, P.Refusal):
            refusal, rounds = refusal or rounds, task.planned_rounds
        if not task.private:
            view = open_ledger(site).view()  # one read, one chain verification
            refusal = (refusal or _non_private_refusal(site, task) or _replay_refusal(view, task, request)
                       or _rounds_refusal(view, task, request, rounds))
            status = _non_private_status(site, task, view, refusal, rounds)
            return Message(content=RecordDict({P.BUDGET: status.to_config()}), reply_to=msg)
        planned = _planned_event(task, context, site, rounds)
        policy = site.policy
        lifetime_delta = policy.delta_for(len(site.train))
        ledger = open_ledger(site).view()  # one read, one chain verification, for every question below
        fp, acc, scope = site.fingerprint, policy.accountant, policy.cap_scope
        refusal = (refusal or _replay_refusal(ledger, task, request)
                   or _rounds_refusal(ledger, task, request, rounds) or _policy_refusal(site, task, planned))
        affordable = 0 if refusal else ledger.affordable_rounds(
            fp, planned, rounds, cap=policy.epsilon_cap, delta=lifetime_delta,
            accountant=acc, scope=scope)
        if refusal is None and affordable == 0:
            refusal = P.Refusal("budget-exhausted", _exhausted(ledger, site))
        head = _ledger_head(ledger)
        spend = ledger.spent(fp, delta=lifetime_delta, accountant=acc, scope=scope)
        status = P.BudgetStatus(
            site_id=site.site_id, dataset_id=dataset_id(site.fingerprint),
            num_examples=len(site.train), delta=lifetime_delta, accountant=policy.accountant,
            cap=policy.epsilon_cap, spent=spend.epsilon, without_dp=spend.without_dp,
            noise_multiplier=planned.noise_multiplier, sample_rate=planned.sample_rate,
            steps_per_round=planned.steps,
            projected=ledger.project(fp, [planned] * rounds, delta=lifetime_delta,
                                     accountant=acc, scope=scope),
            affordable_rounds=affordable, refusal=refusal, ledger=head,
        )
        return Message(content=RecordDict({P.BUDGET: status.to_config()}), reply_to=msg)

    @app.query("identity")
    @functools.partial(answers_with_a_sentence, resolve_site=resolve_site)
    def identity(msg: Message, context: Context) -> Message:
        """Which site this is, before any budget question: its ``site`` record and nothing else."""
        site: Site = resolve_site(context)
        info = P.SiteInfo(site.site_id, site.device.type, 0.0, 0)
        return Message(content=RecordDict({P.SITE: info.to_config()}), reply_to=msg)

    @app.train()
    @functools.partial(answers_with_a_sentence, resolve_site=resolve_site)
    def train(msg: Message, context: Context) -> Message:
        site: Site = resolve_site(context)
        config = _task_config(msg)
        task = P.TrainTask.from_config(config)
        server_round = int(config.get("server-round", 0))  # type: ignore[arg-type]
        n = len(site.train)
        delta = _run_delta(task, site)
        refusal, request = _request_check(site, task, config)  # before anything else: whose run is it?
        if refusal:
            return _refuse(msg, site, refusal)
        rounds = site_rounds(task, config)
        if isinstance(rounds, P.Refusal):
            return _refuse(msg, site, rounds)
        planned = _planned_event(task, context, site, rounds) if task.private else None
        refusal = _policy_refusal(site, task, planned) if planned else _non_private_refusal(site, task)
        if refusal:
            return _refuse(msg, site, refusal)
        opt = task.server_optimizer()
        if task.encrypted:  # no key, a bad weight norm, no run reference, no room: said before any charge
            site_key(site, config.get(P.ENC_KEY_ID))
            _weight(config, n)
            _reply_binding(config, site, server_round, "update")
        model, opt_state = _model_from(msg, task.arch, site, opt)  # a model that cannot be read costs no budget
        if task.encrypted and opt_state is not None:  # a state CKKS cannot carry: said before any charge
            _check_state_headroom(site_key(site, config.get(P.ENC_KEY_ID)), opt, opt_state)
        # the round's secret seeds, drawn before the charge: no entropy, no charge, no training
        randomness = RoundRandomness.for_round(task.rng, task.seed, site.site_id, server_round)
        policy = site.policy
        ledger = open_ledger(site)
        refusal = _replay_refusal(ledger, task, request) or _rounds_refusal(ledger, task, request, rounds)
        if refusal:
            return _refuse(msg, site, refusal)
        q, steps = poisson_plan(n, task.batch_size, task.local_epochs)
        charge = ledger.charge(
            site.fingerprint, planned, delta=policy.delta_for(n), cap=policy.epsilon_cap,
            accountant=policy.accountant, scope=policy.cap_scope, run_ref=_ledger_ref(task, request, rounds),
            round_number=server_round, rng=randomness.mode,
            claim=(f"|req:{request.nonce}", rounds) if request else None,  # atomic with the charge
            without_dp=(q, steps),
        )
        if isinstance(charge, Spent):
            return _refuse(msg, site, P.Refusal("replayed-request", charge.detail))
        if isinstance(charge, BudgetExceeded):
            if planned is None:
                return _refuse(msg, site, P.Refusal("non-private-refused", "this site's policy caps its ε: it "
                                                    "only trains privately"))
            return _refuse(msg, site, P.Refusal("budget-exhausted", charge.detail if math.isfinite(
                charge.projected) else _exhausted(ledger.view(), site)))
        if planned is None:  # the labelled baseline: on the ledger as a release without DP, then plain SGD
            content = _train_non_private(msg, site, task, model)
            _attach_update(content, model.cpu(), site, config, server_round, opt, opt_state)
            return Message(content=content, reply_to=msg)
        # the spend is on disk: from here on, a crash can only over-count
        log.info("%s round %d: charged ledger %s entry %d (σ=%.4g, q=%.4g, %d steps): lifetime ε %.4f%s of "
                 "cap %s (%s, δ=%g); DP noise and Poisson sampling %s", site.site_id, server_round,
                 charge.ledger_id, charge.seq, planned.noise_multiplier, planned.sample_rate, planned.steps,
                 charge.epsilon_after, f" (NOT PRIVATE: plus {charge.without_dp} round(s) released without DP)"
                 if charge.without_dp else "", "none" if charge.epsilon_cap is None else f"{charge.epsilon_cap:g}",
                 charge.accountant, charge.delta, describe(randomness.mode))
        _explain_noise_once()
        outcome = train_dp_sgd(
            model,
            site.train,
            noise_multiplier=planned.noise_multiplier,
            max_grad_norm=task.max_grad_norm,
            batch_size=task.batch_size,
            local_epochs=task.local_epochs,
            learning_rate=task.learning_rate,
            momentum=task.momentum,
            device=site.device,
            randomness=randomness,
        )
        if outcome.event != planned or outcome.rng != randomness.mode:  # never release more than charged
            raise RuntimeError(f"{site.site_id}: ran {outcome.event} ({outcome.rng}), but charged {planned} "
                               f"({randomness.mode}); not released")
        _append_history(context, outcome.event)
        eps = epsilon(_history(context), delta, task.accountant)
        lifetime = P.LifetimeSpend(dataset_id(site.fingerprint), charge.entry_id, charge.epsilon_after,
                                   charge.delta, charge.accountant, charge.epsilon_cap,
                                   P.LedgerHead(charge.ledger_id, charge.seq, charge.entry_hash),
                                   charge.without_dp)
        report = P.PrivacyReport(
            outcome.event, delta, task.accountant, accountant_version(task.accountant), eps,
            lifetime=lifetime, rng=outcome.rng,
        )
        num_test = 0 if task.encrypted_eval else len(site.test)  # an encrypted evaluation hides it
        content = RecordDict(
            {
                P.METRICS: MetricRecord(
                    {P.NUM_EXAMPLES: n, P.TRAIN_LOSS: outcome.mean_loss, P.EPSILON: eps}
                ),
                P.PRIVACY: report.to_config(),
                P.SITE: P.SiteInfo(site.site_id, site.device.type, outcome.seconds, num_test).to_config(),
            }
        )
        _attach_update(content, model.cpu(), site, config, server_round, opt, opt_state)
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    @functools.partial(answers_with_a_sentence, resolve_site=resolve_site)
    def evaluate_(msg: Message, context: Context) -> Message:
        import time

        start = time.perf_counter()
        site = resolve_site(context)
        config = _task_config(msg)
        refusal = _evaluation_refusal(site, config)
        if refusal:  # nothing is charged for evaluation, but the test set is the site's to protect too
            return _refuse(msg, site, refusal)
        model, _ = _model_from(msg, str(config.get("arch", "")), site, P.server_optimizer_from(config))
        out = evaluate(model, site.test, site.device)
        if config.get(P.ENC_EVAL):
            key = site_key(site, config.get(P.ENC_KEY_ID))
            binding = _reply_binding(config, site, int(config.get("server-round", 0)), "eval-sums")  # type: ignore[arg-type]
            per_example = _weight(config, out.num_examples) / out.num_examples  # = 1 / norm
            sums = np.array(eval_sums(out.loss_sum, out.correct, out.num_examples), dtype=np.float64) * per_example
            enc = key.encrypt(sums)
            seconds = time.perf_counter() - start
            return Message(content=RecordDict({
                P.ENC_METRICS: P.encrypted_record(enc, key.tag(enc, binding)),
                P.SITE: P.SiteInfo(site.site_id, site.device.type, seconds, 0).to_config(),
            }), reply_to=msg)
        content = RecordDict(
            {
                P.METRICS: MetricRecord(
                    {P.NUM_EXAMPLES: out.num_examples, P.EVAL_LOSS: out.loss, P.EVAL_ACC: out.accuracy}
                ),
                P.SITE: P.SiteInfo(
                    site.site_id, site.device.type, time.perf_counter() - start, out.num_examples
                ).to_config(),
            }
        )
        return Message(content=content, reply_to=msg)

    return app
