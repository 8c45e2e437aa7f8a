"""Signed run requests: the signature, the coordinator's admission and every site's own check.

Real keys, a real store (SQLite and PostgreSQL) and the real ClientApp; the deployed version
with separate processes is tests/test_signed_runs.py.
"""

from __future__ import annotations

import dataclasses
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from sqlalchemy import select

from client.app import build_client_app
from privacy.ledger import SiteLedger
from privacy.requests import (
    RequestError,
    RequestRefused,
    SignedRequest,
    create_researcher_key,
    ephemeral_request,
    load_private_key,
    load_researcher,
    load_researchers,
    sign_request,
)
from server.admission import admit
from server.store import RunStore
from server.store import schema as S
from tests.flowerkit import incoming
from tests.sitekit import make_site
from veil import protocol as P
from veil.models import build_model
from veil.spec import parse_scenario

SCENARIO = parse_scenario({"name": "signed", "federation": {"sites": 2, "rounds": 2},
                           "model": {"arch": "mlp"}, "training": {"batch_size": 30, "learning_rate": 0.1},
                           "privacy": {"noise_multiplier": 1.0}}).model_dump(mode="json")


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """Two researchers, alice and bob; only alice.pub sits in the admitted directory."""
    for name in ("alice", "bob"):
        create_researcher_key(tmp_path / name)
    (tmp_path / "admitted").mkdir()
    (tmp_path / "admitted" / "alice.pub").write_bytes((tmp_path / "alice.pub").read_bytes())
    return tmp_path


def _signed(keys: Path, who: str = "alice", scenario: dict | None = None, **kw: object) -> SignedRequest:  # type: ignore[type-arg]
    return sign_request(scenario or SCENARIO, load_private_key(keys / who), **kw)  # type: ignore[arg-type]


# -- keys and signatures -----------------------------------------------------------------------

def test_a_researcher_key_is_private_and_never_overwritten(keys: Path) -> None:
    assert stat.S_IMODE((keys / "alice").stat().st_mode) == 0o600
    who = load_researcher(keys / "alice.pub")
    assert who.name == "alice" and len(who.key_id) == 16 and who.label() == f"alice ({who.key_id})"
    before = (keys / "alice").read_bytes()
    with pytest.raises(RequestError, match="refusing to overwrite"):
        create_researcher_key(keys / "alice")
    assert (keys / "alice").read_bytes() == before


def test_a_bad_key_file_is_one_line_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "x.pub").write_text("ssh-rsa AAAA nobody\n")
    (tmp_path / "x").write_text("not a key")
    with pytest.raises(RequestError, match=r"x.pub is not a researcher public key"):
        load_researcher(tmp_path / "x.pub")
    with pytest.raises(RequestError, match=r"is not a researcher private key"):
        load_private_key(tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RequestError, match="no researcher public keys"):
        load_researchers([tmp_path / "empty"])


def test_a_signature_covers_the_whole_scenario_the_time_and_the_nonce(keys: Path) -> None:
    admitted = load_researchers([keys / "admitted"])
    request = SignedRequest.from_json(_signed(keys).to_json())  # survives the wire
    assert request.verify(admitted).name == "alice"
    altered = [
        dataclasses.replace(request, scenario={**request.scenario, "seed": 1}),
        dataclasses.replace(request, nonce="0" * 32),
        dataclasses.replace(request, issued_at=(request.issued() - timedelta(seconds=5)).isoformat()),
    ]
    for bad in altered:
        with pytest.raises(RequestRefused) as err:
            bad.verify(admitted)
        assert err.value.code == "bad-signature"
    with pytest.raises(RequestRefused) as err:
        _signed(keys, "bob").verify(admitted)
    assert err.value.code == "untrusted-researcher"
    for text in (None, "", "{not json", json.dumps({"scenario": {}})):
        with pytest.raises(RequestRefused) as err:
            SignedRequest.from_json(text)
        assert err.value.code == "unsigned-run"


def test_an_ephemeral_key_is_accepted_only_where_asked_and_cannot_borrow_a_key_id(keys: Path) -> None:
    request = ephemeral_request(SCENARIO)
    with pytest.raises(RequestRefused, match="only simulated sites"):
        request.verify(load_researchers([keys / "admitted"]))
    assert request.verify({}, accept_ephemeral=True).name == "ephemeral (simulation)"
    alice = load_researcher(keys / "alice.pub")
    borrowed = dataclasses.replace(request, key_id=alice.key_id)  # claims alice's id, keeps its own key
    with pytest.raises(RequestRefused, match="bad-signature"):
        borrowed.verify({}, accept_ephemeral=True)


def test_freshness(keys: Path) -> None:
    now = datetime.now(UTC)
    _signed(keys, now=now - timedelta(minutes=10)).check_fresh(now)
    for when in (now - timedelta(hours=1), now + timedelta(hours=1)):
        with pytest.raises(RequestRefused) as err:
            _signed(keys, now=when).check_fresh(now)
        assert err.value.code == "expired-request"


# -- the coordinator's admission ---------------------------------------------------------------

def test_the_coordinator_admits_once_and_records_every_refusal(keys: Path, store_url: str) -> None:
    store = RunStore(store_url)
    admitted = load_researchers([keys / "admitted"])
    good = _signed(keys)
    request, signer = admit(store, good.to_json(), admitted)
    assert request.nonce == good.nonce and signer.name == "alice"
    refused = {
        "replayed-request": good.to_json(),
        "untrusted-researcher": _signed(keys, "bob").to_json(),
        "bad-signature": dataclasses.replace(_signed(keys), scenario={**SCENARIO, "seed": 9}).to_json(),
        "expired-request": _signed(keys, now=datetime.now(UTC) - timedelta(hours=2)).to_json(),
        "unsigned-run": "",
    }
    for code, text in refused.items():
        with pytest.raises(RequestRefused) as err:
            admit(store, text, admitted)
        assert err.value.code == code
    with pytest.raises(RequestRefused, match="admits no researchers"):
        admit(store, _signed(keys).to_json(), {})
    with store.session() as s:
        rows = s.scalars(select(S.RunRequest).order_by(S.RunRequest.id)).all()
        runs = s.scalars(select(S.Run)).all()
    assert [(r.status, r.reason_code) for r in rows] == [
        ("admitted", None), *(("refused", code) for code in refused), ("refused", "untrusted-researcher")]
    assert rows[0].nonce == good.nonce and rows[0].researcher == signer.label()
    assert rows[2].researcher is None and rows[3].researcher is None  # bob unknown; a forgery names no one
    assert rows[3].key_id == signer.key_id  # but the key id it claimed is kept
    assert runs == []  # a refused request is never a run
    store.close()


# -- every site checks again, before anything is charged -------------------------------------

class Driver:
    """One site's real ClientApp, sent tasks the way the coordinator sends them."""

    def __init__(self, tmp_path: Path, **site: object) -> None:
        self.site = make_site(tmp_path / "site.ledger", **site)  # type: ignore[arg-type]
        self.app = build_client_app(lambda _ctx: self.site)
        self.context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def train(self, request: SignedRequest | None, task: P.TrainTask, server_round: int = 1) -> RecordDict:
        config = task.to_config()
        config["server-round"] = server_round
        if request is not None:
            config[P.RUN_REQUEST] = request.to_json()
        arrays = ArrayRecord(build_model(task.arch, seed=0).state_dict())
        msg = incoming(RecordDict({P.ARRAYS: arrays, P.TASK: ConfigRecord(dict(config))}), "train")
        return self.app(msg, self.context).content

    def query(self, request: SignedRequest, task: P.TrainTask) -> P.BudgetStatus:
        config = task.to_config()
        config[P.RUN_REQUEST] = request.to_json()
        reply = self.app(incoming(RecordDict({P.TASK: ConfigRecord(dict(config))}), P.BUDGET_QUERY), self.context)
        return P.BudgetStatus.from_config(reply.content[P.BUDGET])  # type: ignore[arg-type]

    def entries(self) -> list[str]:
        with SiteLedger(self.site.ledger) as ledger:
            return [e.run_ref for e in ledger.entries()]


def _task(request: SignedRequest, run_ref: str = "veil-run-1:abc") -> P.TrainTask:
    return P.TrainTask.from_scenario(parse_scenario(request.scenario)).for_run(run_ref)


def _refusal(reply: RecordDict) -> str | None:
    rec = reply.get(P.REFUSAL)
    return P.Refusal.from_config(rec).code if isinstance(rec, ConfigRecord) else None


def test_a_site_trains_only_what_a_trusted_researcher_signed(keys: Path, tmp_path: Path) -> None:
    driver = Driver(tmp_path, researchers=tuple(load_researchers([keys / "alice.pub"]).values()))
    good = _signed(keys)
    assert driver.query(good, _task(good)).refusal is None
    cases = {
        "unsigned-run": (None, _task(good)),
        "untrusted-researcher": (_signed(keys, "bob"), _task(_signed(keys, "bob"))),
        "task-mismatch": (good, dataclasses.replace(_task(good), noise_multiplier=0.5)),  # altered after signing
        "bad-signature": (dataclasses.replace(good, scenario={**SCENARIO, "seed": 3}), _task(good)),
    }
    for code, (request, task) in cases.items():
        assert _refusal(driver.train(request, task)) == code, code
    assert driver.entries() == []  # nothing was charged for any of them
    assert _refusal(driver.train(good, _task(good))) is None
    assert driver.entries() == [f"veil-run-1:abc|req:{good.nonce}"]


def test_an_evaluation_is_answered_only_for_the_signed_server_optimiser(keys: Path, tmp_path: Path) -> None:
    """Each site steps the model itself when CKKS is on, so the step's rule is part of what an
    evaluation must match: a coordinator cannot have sites evaluate (or decode) under another one."""
    from veil.server_opt import ServerOptimizer

    scenario = {**SCENARIO, "server_optimizer": {"rule": "fedadam", "learning_rate": 0.05}}
    signed = _signed(keys, scenario=scenario)
    driver = Driver(tmp_path, researchers=tuple(load_researchers([keys / "alice.pub"]).values()))
    opt = parse_scenario(scenario).server_optimizer.optimizer()

    def evaluate(optimizer: ServerOptimizer, **extra: object) -> RecordDict:
        config = ConfigRecord({"arch": "mlp", "server-round": 1, P.RUN_REQUEST: signed.to_json(),
                               **P.server_fields(optimizer), **extra})  # type: ignore[dict-item]
        arrays = ArrayRecord(build_model("mlp", seed=0).state_dict())
        return driver.app(incoming(RecordDict({P.ARRAYS: arrays, P.TASK: config}), "evaluate"),
                          driver.context).content

    assert _refusal(evaluate(opt)) is None and P.METRICS in evaluate(opt)
    for other in (ServerOptimizer("fedadam", 0.5, opt.momentum), ServerOptimizer("fedavgm", 0.05, 0.9),
                  ServerOptimizer()):
        reply = evaluate(other)
        assert _refusal(reply) == "task-mismatch" and P.METRICS not in reply, other
        assert "server optimiser is not what the researcher signed" in reply[P.REFUSAL]["detail"]  # type: ignore[index]
    assert _refusal(evaluate(opt, server_momentum=1.5)) == "task-mismatch"  # not a valid optimiser at all


def test_a_signed_request_pays_for_its_rounds_once_and_never_for_another_run(keys: Path, tmp_path: Path) -> None:
    driver = Driver(tmp_path, researchers=tuple(load_researchers([keys / "alice.pub"]).values()))
    good = _signed(keys)  # two rounds
    assert _refusal(driver.train(good, _task(good), 1)) is None
    assert _refusal(driver.train(good, _task(good, "veil-run-7:abc"), 1)) == "replayed-request"  # another run
    assert driver.query(good, _task(good, "veil-run-7:abc")).refusal.code == "replayed-request"  # type: ignore[union-attr]
    assert _refusal(driver.train(good, _task(good), 2)) is None
    assert _refusal(driver.train(good, _task(good), 3)) == "replayed-request"  # all its rounds are paid
    assert len(driver.entries()) == 2


def test_a_site_that_trusts_no_one_refuses_everything_and_simulated_sites_take_ephemeral_keys(
        keys: Path, tmp_path: Path) -> None:
    nobody = Driver(tmp_path / "a", researchers=())
    request = _signed(keys)
    assert _refusal(nobody.train(request, _task(request))) == "untrusted-researcher"
    throwaway = ephemeral_request(SCENARIO)
    assert _refusal(nobody.train(throwaway, _task(throwaway))) == "untrusted-researcher"
    simulated = Driver(tmp_path / "b", researchers=(), accept_ephemeral=True)
    assert _refusal(simulated.train(throwaway, _task(throwaway))) is None
    assert nobody.entries() == [] and len(simulated.entries()) == 1


def test_a_refused_query_cannot_set_the_noise_a_signed_task_trains_with(keys: Path, tmp_path: Path) -> None:
    """σ is calibrated per task: an unsigned query for a huge ε, refused, must not leave its σ behind."""
    from privacy import calibrate_noise_multiplier
    from privacy.events import default_delta

    driver = Driver(tmp_path, researchers=tuple(load_researchers([keys / "alice.pub"]).values()))
    signed_scenario = parse_scenario({**SCENARIO, "privacy": {"noise_multiplier": None, "target_epsilon": 1.0}})
    good = sign_request(signed_scenario.model_dump(mode="json"), load_private_key(keys / "alice"))
    task = _task(good)
    greedy = dataclasses.replace(task, target_epsilon=1000.0)
    config = greedy.to_config()
    reply = driver.app(incoming(RecordDict({P.TASK: ConfigRecord(dict(config))}), P.BUDGET_QUERY), driver.context)
    assert P.BudgetStatus.from_config(reply.content[P.BUDGET]).refusal.code == "unsigned-run"  # type: ignore[arg-type,union-attr]
    trained = driver.train(good, task)
    event = P.PrivacyReport.from_config(trained[P.PRIVACY]).event  # type: ignore[arg-type]
    n = len(driver.site.train)
    honest = calibrate_noise_multiplier(1.0, default_delta(n), event.sample_rate,
                                        event.steps * task.planned_rounds, "pld")
    assert event.noise_multiplier == pytest.approx(honest) and event.noise_multiplier > 1.0


def test_a_site_starts_charging_only_a_recent_signature(keys: Path, tmp_path: Path) -> None:
    driver = Driver(tmp_path, researchers=tuple(load_researchers([keys / "alice.pub"]).values()))
    stale = _signed(keys, now=datetime.now(UTC) - timedelta(days=2))
    reply = driver.train(stale, _task(stale))
    assert _refusal(reply) == "replayed-request" and driver.entries() == []
