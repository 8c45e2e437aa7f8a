"""A stateful server optimiser through the coordinator's and the sites' real code, CKKS on and off.

Four in-process sites (the real ClientApp and the coordinator's whole round loop, without Ray),
two sampled per round, FedAvgM with momentum so the state carries m: one scheduled site fails a
round and another misses rounds altogether, and must read the state back from the aggregate it is
sent. With reproducible noise and the same seed, the encrypted run's model decrypts to the
plaintext run's within CKKS precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import Error, Message
from sqlalchemy import select
from typer.testing import CliRunner

from privacy.ckks import create_keyset
from privacy.requests import ephemeral_request
from server.coordinator import run_federation
from server.lifecycle import create_run
from server.read.summary import load_summary
from server.store import RunStore
from server.store import schema as S
from tests.flowerkit import AppGrid
from tests.sitekit import SiteDriver, make_site
from veil import protocol as P
from veil.cli.main import app
from veil.spec import parse_scenario

SCENARIO = {"name": "opt-partial", "seed": 7, "device": "cpu", "model": {"arch": "mlp"},
            "federation": {"sites": 4, "rounds": 4, "sites_per_round": 2, "min_sites": 1,
                           "on_budget_exhausted": "refuse"},
            "training": {"batch_size": 30, "learning_rate": 0.5},
            "privacy": {"noise_multiplier": 1.0, "reproducible_noise": True},
            "server_optimizer": {"rule": "fedavgm", "learning_rate": 1.5, "momentum": 0.5}}


def _run(tmp_path: Path, encrypted: bool, fail: tuple[str, int]) -> tuple[RunStore, int, list[tuple[str, int]]]:
    spec = {**SCENARIO, **({"encryption": {"aggregation": "ckks", "evaluation": "none"}} if encrypted else {})}
    parsed = parse_scenario(spec)
    keys = create_keyset(tmp_path / "keys") if encrypted else None
    drivers = {n: SiteDriver(make_site(tmp_path / f"site-{n}.ledger", site_id=f"site-{n}", seed=n,
                                       researchers=(), accept_ephemeral=True, allow_seeded_noise=True,
                                       keys=keys.secret if keys else None)) for n in range(1, 5)}
    trained: list[tuple[str, int]] = []

    def handler(d: SiteDriver):  # type: ignore[no-untyped-def]
        def handle(msg: Message) -> Message:
            if msg.metadata.message_type == "train":
                rnd = int(msg.content[P.TASK]["server-round"])  # type: ignore[index]
                trained.append((d.site.site_id, rnd))
                if (d.site.site_id, rnd) == fail:  # the site's process dies mid-round
                    return Message(Error(code=0, reason="injected failure"), reply_to=msg)
            return d.app(msg, d.context)
        return handle

    store = RunStore(f"sqlite:///{tmp_path / 's.db'}")
    run_id = create_run(store, parsed, "simulation")
    run_federation(AppGrid({n: handler(d) for n, d in drivers.items()}), parsed, store, run_id,
                   tmp_path / "artifacts", coordinator_key=keys.coordinator if keys else None,
                   request=ephemeral_request(parsed.model_dump(mode="json")))
    return store, run_id, trained


def _model(store: RunStore, run_id: int, tmp_path: Path, secret: Path | None) -> dict[str, torch.Tensor]:
    with store.session() as s:
        uri = s.scalars(select(S.Artifact.uri).where(S.Artifact.run_id == run_id)).one()
    path = uri.removeprefix("file://")
    if secret is None:
        return torch.load(path)
    out = tmp_path / "decrypted.pt"
    result = CliRunner().invoke(app, ["keys", "decrypt", path, "--key", str(secret), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return torch.load(out)


@pytest.mark.slow  # three in-process federations, ~30 s
def test_fedavgm_with_partial_participation_and_a_failed_round_is_the_same_model_encrypted(tmp_path: Path) -> None:
    plain_store, plain_id, plain_trained = _run(tmp_path / "plain", False, ("", 0))
    rounds_of = {site: sorted(r for s, r in plain_trained if s == site) for site, _ in plain_trained}
    missing = [s for s, rs in rounds_of.items() if len(rs) < 4]
    assert missing, rounds_of  # some site misses rounds: it must read the state back from the aggregate
    # fail a site in a round after its first (its state came from an earlier aggregate), not the last
    fail = next((s, rs[1]) for s, rs in rounds_of.items() if len(rs) > 1 and rs[1] < 4)
    plain_store, plain_id, _ = _run(tmp_path / "plain2", False, fail)
    enc_store, enc_id, enc_trained = _run(tmp_path / "enc", True, fail)
    assert sorted(enc_trained) == sorted(plain_trained)  # the same schedule, keyed by site id and seed
    for store, run_id in ((plain_store, plain_id), (enc_store, enc_id)):
        with store.session() as s:
            rows = s.execute(select(S.Participation.round_number, S.Participation.status)
                             .where(S.Participation.run_id == run_id, S.Participation.phase == "train")).all()
        assert sorted(r for r, status in rows if status != "ok") == [fail[1]], rows  # the injected one
        assert len(rows) == 8 and len(load_summary(store, run_id).rounds) == 4
    plain = _model(plain_store, plain_id, tmp_path, None)
    enc = _model(enc_store, enc_id, tmp_path, tmp_path / "enc" / "keys" / "secret.ckks")
    gap = max(float((plain[k] - enc[k]).abs().max()) for k in plain)
    print(f'plaintext vs CKKS: largest difference {gap:.2e}')
    assert gap < 1e-4, gap
    moved = max(float((plain[k] - _initial_model()[k]).abs().max()) for k in plain)
    assert moved > 1e-2  # it trained


def _initial_model() -> dict[str, torch.Tensor]:
    from veil.models import build_model

    return build_model("mlp", seed=int(SCENARIO["seed"])).state_dict()  # type: ignore[call-overload]


def test_a_state_beyond_the_headroom_is_refused_before_the_charge(tmp_path: Path) -> None:
    """Every site appends the same state, so the aggregate reaches it unweighted: a model whose
    values pass half the headroom cannot travel as fedavgm's x, and the site says so before it
    charges anything (it used to decrypt to garbage, or fail after the charge)."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from privacy.ckks import SecretKey
    from privacy.ledger import SiteLedger
    from tests.sitekit import task
    from veil.models import build_model
    from veil.server_opt import STATE_LAYOUT

    keys = create_keyset(tmp_path / "keys")
    driver = SiteDriver(make_site(tmp_path / "site.ledger", keys=keys.secret))
    t = task(encrypted=True, **P.server_fields(parse_scenario(SCENARIO).server_optimizer.optimizer()))
    key_id = SecretKey.load(keys.secret).key_id
    config = ConfigRecord({**dict(t.to_config()), "server-round": 1, P.ENC_KEY_ID: key_id,
                           P.ENC_WEIGHT_NORM: 480.0, P.ENC_RUN: "run-a", P.SERVER_STATE_LAYOUT: STATE_LAYOUT})
    model = build_model("mlp", seed=0).state_dict()
    for factor, refused in ((1.0, False), (3000.0, True)):  # initial |w| <= 1/28: 3000x reaches ~107 > 64
        big = {k: v * factor for k, v in model.items()}
        reply = driver.send(RecordDict({P.ARRAYS: ArrayRecord(big), P.TASK: config}), "train")
        with SiteLedger(driver.site.ledger) as ledger:
            charged = len(ledger.entries())
        if refused:
            assert P.ENC_UPDATE not in reply and "beyond half the CKKS headroom" in str(reply), reply
            assert charged == 1  # only the first, accepted round
        else:
            assert P.ENC_UPDATE in reply and charged == 1


@pytest.mark.slow  # a CKKS federation, ~15 s
def test_a_checkpoint_in_another_state_layout_is_refused(tmp_path: Path) -> None:
    """An encrypted checkpoint names its state layout; one without it (an older Veil's, where t
    travelled unscaled) would decode to a wrong FedAdam step, so `veil keys decrypt` refuses it."""
    import json

    from privacy.ckks import EncryptedVector

    store, run_id, _ = _run(tmp_path / "enc", True, ("", 0))
    with store.session() as s:
        path = Path(s.scalars(select(S.Artifact.uri).where(S.Artifact.run_id == run_id)).one().removeprefix("file://"))
    enc, meta = EncryptedVector.from_file(path)
    assert meta["state_layout"] == 2
    old = tmp_path / "old.ckks"
    enc.to_file(old, {k: v for k, v in meta.items() if k != "state_layout"})
    result = CliRunner().invoke(app, ["keys", "decrypt", str(old), "--key", str(tmp_path / "enc" / "keys" /
                                                                              "secret.ckks"),
                                      "--out", str(tmp_path / "x.pt")])
    assert result.exit_code != 0 and "another layout" in json.dumps(result.output)
    assert not (tmp_path / "x.pt").exists()
