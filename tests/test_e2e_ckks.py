"""CKKS end to end through Flower's simulation engine: the same run, plaintext and encrypted,
with the same seed. The encrypted run reaches the same accuracy, its final model decrypts to
the plaintext one, and the store holds ciphertexts and the public key-set description only.

Comparing the two runs value for value needs the same DP noise in both, so these runs use
``reproducible_noise`` (seeded, recorded as not private): with each site's own entropy, as
by default, no two runs share their noise."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch
from sqlalchemy import select
from typer.testing import CliRunner

from privacy.ckks import SecretKey
from server.read.summary import load_summary
from server.store import RunStore
from server.store import schema as S
from simulations.simulate import simulate
from tests.scenarios import merged, small_scenario
from veil.cli.main import app
from veil.spec import parse_scenario

pytestmark = pytest.mark.slow  # Ray simulations

SPEC = small_scenario(name="ckks-e2e", seed=3, federation={"sites": 3}, privacy={"reproducible_noise": True})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunStore, int, int, Path]:
    base = tmp_path_factory.mktemp("ckks")
    store = RunStore(f"sqlite:///{base / 'veil.db'}")
    plain = simulate(parse_scenario(SPEC), store, base / "art", progress=False, ledger_dir=base / "l")
    spec = merged(SPEC, {"encryption": {"aggregation": "ckks", "evaluation": "ckks"}})
    enc = simulate(parse_scenario(spec), store, base / "art", progress=False, ledger_dir=base / "l")
    return store, plain.run_id, enc.run_id, base


def _artifact(store: RunStore, run_id: int) -> S.Artifact:
    with store.session() as s:
        return s.scalars(select(S.Artifact).where(S.Artifact.run_id == run_id)).one()


def test_encrypted_run_matches_plaintext_and_its_model_decrypts_to_the_plaintext_one(runs) -> None:  # type: ignore[no-untyped-def]
    store, plain_id, enc_id, base = runs
    secret_file = base / "art" / f"run-{enc_id}" / "keys" / "secret.ckks"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    key = SecretKey.load(secret_file)
    plain, enc = load_summary(store, plain_id), load_summary(store, enc_id, key)
    assert enc.status == "completed" and [r.encrypted for r in enc.rounds] == [True, True]
    for p, e in zip(plain.rounds, enc.rounds, strict=True):
        assert e.accuracy is not None and p.accuracy is not None
        assert abs(e.accuracy - p.accuracy) <= 0.01  # same seed: same run, up to CKKS release noise
        assert e.examples == p.examples and e.sites_ok == p.sites_ok == 3
    assert enc.encryption is not None and enc.encryption["key_id"] == key.key_id

    art = _artifact(store, enc_id)
    assert art.kind == "encrypted-checkpoint" and art.uri.endswith(".ckks")
    out = base / "decrypted.pt"
    result = CliRunner().invoke(app, ["keys", "decrypt", art.uri.removeprefix("file://"),
                                      "--key", str(secret_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    decrypted = torch.load(out)
    reference = torch.load(_artifact(store, plain_id).uri.removeprefix("file://"))
    assert decrypted.keys() == reference.keys()
    assert max(float((decrypted[k] - reference[k]).abs().max()) for k in reference) < 1e-4


def test_the_coordinator_saw_only_ciphertexts_and_the_store_holds_no_key(runs) -> None:  # type: ignore[no-untyped-def]
    store, _, enc_id, base = runs
    with store.session() as s:
        plain_eval = s.scalars(select(S.Metric).where(
            S.Metric.run_id == enc_id, S.Metric.phase.in_(["evaluate", "aggregate"]),
            S.Metric.name.in_(["eval-acc", "eval-loss"]))).all()
        stored = s.scalars(select(S.EncryptedMetric).where(S.EncryptedMetric.run_id == enc_id)).all()
        sites = s.scalars(select(S.Site).where(S.Site.run_id == enc_id)).all()
        evals = s.scalars(select(S.Participation).where(S.Participation.run_id == enc_id,
                                                        S.Participation.phase == "evaluate")).all()
    assert plain_eval == [] and len(stored) == 2 and all(m.sites == 3 for m in stored)
    assert all(site.num_test == 0 for site in sites)  # test-set sizes stay at the sites too
    assert len(evals) == 6 and all(p.status == "ok" and p.num_examples is None for p in evals)
    # no stretch of the secret key file's key material appears anywhere in the store
    secret_body = (base / "art" / f"run-{enc_id}" / "keys" / "secret.ckks").read_bytes().split(b"\n", 2)[2]
    db = (base / "veil.db").read_bytes()
    assert all(secret_body[i:i + 32] not in db for i in range(len(secret_body) // 2, len(secret_body) - 32, 997))


def test_runs_show_keeps_metrics_encrypted_without_the_key(runs) -> None:  # type: ignore[no-untyped-def]
    store, _, enc_id, base = runs
    secret_file = base / "art" / f"run-{enc_id}" / "keys" / "secret.ckks"
    hidden = CliRunner().invoke(app, ["runs", "show", str(enc_id), "--store", store.url])
    assert hidden.exit_code == 0 and "encrypted" in hidden.output and "--key" in hidden.output
    shown = CliRunner().invoke(app, ["runs", "show", str(enc_id), "--store", store.url,
                                     "--key", str(secret_file), "--format", "json"])
    assert shown.exit_code == 0, shown.output
    import json

    rounds = json.loads(shown.output[: shown.output.rindex("}") + 1])["rounds"]
    truth = load_summary(store, enc_id, SecretKey.load(secret_file)).rounds
    assert [r["accuracy"] for r in rounds] == [r.accuracy for r in truth]
    coordinator_file = secret_file.with_name("coordinator.ckks")
    refused = CliRunner().invoke(app, ["runs", "show", str(enc_id), "--store", store.url,
                                       "--key", str(coordinator_file)])
    assert refused.exit_code == 9 and "secret.ckks" in refused.output


ADAM = merged(SPEC, {"name": "ckks-e2e-adam", "server_optimizer": {"rule": "fedadam", "learning_rate": 0.05}})


def test_a_server_optimiser_gives_the_same_model_plaintext_and_encrypted(runs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """FedAdam: the coordinator steps in the plaintext run; in the encrypted one every site steps
    after decrypting, with the state carried in the ciphertexts. Same seed, same model (within
    CKKS precision), and not FedAvg's model."""
    fedavg = torch.load(_artifact(runs[0], runs[1]).uri.removeprefix("file://"))
    store = RunStore(f"sqlite:///{tmp_path / 'veil.db'}")  # its own ledgers, so its own store
    plain = simulate(parse_scenario(ADAM), store, tmp_path / "art", progress=False, ledger_dir=tmp_path / "l")
    spec = merged(ADAM, {"encryption": {"aggregation": "ckks", "evaluation": "ckks"}})
    enc = simulate(parse_scenario(spec), store, tmp_path / "art", progress=False, ledger_dir=tmp_path / "l")
    secret_file = tmp_path / "art" / f"run-{enc.run_id}" / "keys" / "secret.ckks"
    p, e = load_summary(store, plain.run_id), load_summary(store, enc.run_id, SecretKey.load(secret_file))
    assert p.status == e.status == "completed"
    for pr, er in zip(p.rounds, e.rounds, strict=True):
        assert pr.accuracy is not None and er.accuracy is not None and abs(pr.accuracy - er.accuracy) <= 0.01
    out = tmp_path / "adam.pt"
    result = CliRunner().invoke(app, ["keys", "decrypt", _artifact(store, enc.run_id).uri.removeprefix("file://"),
                                      "--key", str(secret_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    decrypted = torch.load(out)
    reference = torch.load(_artifact(store, plain.run_id).uri.removeprefix("file://"))
    assert max(float((decrypted[k] - reference[k]).abs().max()) for k in reference) < 1e-3
    assert max(float((fedavg[k] - reference[k]).abs().max()) for k in reference) > 1e-2
