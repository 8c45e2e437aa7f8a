"""The site enforces its own policy and ledger, whatever the coordinator's task says.

These drive the real ClientApp handlers in-process (no Flower engine), with data made here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from privacy import epsilon
from privacy.ledger import SiteLedger
from privacy.policy import SitePolicy
from tests.sitekit import SiteDriver, make_site, refusal, task
from veil import protocol as P


def _refusal(content: object) -> P.Refusal | None:
    rec = content.get(P.REFUSAL)  # type: ignore[attr-defined]
    return P.Refusal.from_config(rec) if rec is not None else None


def _report(content: object) -> P.PrivacyReport:
    return P.PrivacyReport.from_config(content[P.PRIVACY])  # type: ignore[index]


@pytest.mark.parametrize(
    ("policy", "overrides", "code"),
    [
        (SitePolicy(min_noise_multiplier=2.0), {"noise_multiplier": 1.0}, "noise-below-minimum"),
        (SitePolicy(max_sample_rate=0.1), {"batch_size": 60}, "sample-rate-above-maximum"),
        (SitePolicy(require_encryption=True), {}, "encryption-required"),
    ],
)
def test_policy_breaking_tasks_are_refused_before_training(tmp_path: Path, policy: SitePolicy,
                                                           overrides: dict, code: str) -> None:
    site = make_site(tmp_path / "l", policy)
    driver = SiteDriver(site)
    status = driver.query(task(**overrides))
    assert status.refusal is not None and status.refusal.code == code and status.affordable_rounds == 0
    content = driver.train(task(**overrides))  # the coordinator sends it anyway
    refusal = _refusal(content)
    assert refusal is not None and refusal.code == code
    assert P.ARRAYS not in content  # nothing trained, nothing released
    with SiteLedger(site.ledger) as ledger:
        assert ledger.entries() == []  # and nothing charged


def test_budget_is_charged_before_release_and_refused_at_the_cap(tmp_path: Path) -> None:
    site = make_site(tmp_path / "l", SitePolicy(epsilon_cap=6.0))
    driver = SiteDriver(site)
    t = task(noise_multiplier=1.0, batch_size=30)
    status = driver.query(t)
    assert status.spent == 0.0 and status.cap == 6.0 and 1 <= status.affordable_rounds < t.planned_rounds
    for rnd in range(1, status.affordable_rounds + 1):
        report = _report(driver.train(t, rnd))
        assert report.lifetime is not None and report.lifetime.epsilon <= 6.0
    refused = _refusal(driver.train(t, status.affordable_rounds + 1))
    assert refused is not None and refused.code == "budget-exhausted" and "> cap 6" in refused.detail
    with SiteLedger(site.ledger) as ledger:
        entries = ledger.entries()
    assert len(entries) == status.affordable_rounds
    assert entries[-1].entry_id == report.lifetime.entry_id
    assert entries[-1].epsilon_after == pytest.approx(report.lifetime.epsilon, rel=1e-12)


def test_lifetime_spend_composes_across_runs_on_the_same_data(tmp_path: Path) -> None:
    driver = SiteDriver(make_site(tmp_path / "l"))
    first = _report(driver.train(task(run_ref="run-1")))
    driver.new_run()  # a new run: Flower gives the site a fresh Context
    second = _report(driver.train(task(run_ref="run-2")))
    assert second.epsilon == pytest.approx(first.epsilon)  # run ε starts over...
    assert second.lifetime is not None and first.lifetime is not None
    both = epsilon([first.event, second.event], second.lifetime.delta)
    assert second.lifetime.epsilon == pytest.approx(both, rel=1e-12)  # ...the data's does not
    assert second.lifetime.epsilon > first.lifetime.epsilon
    # other data at the same site (the same patients exported again, say): by default
    # (cap_scope: ledger) one lifetime budget over both data sets
    other = SiteDriver(make_site(tmp_path / "l", seed=1))
    third = _report(other.train(task(run_ref="run-3")))
    assert third.lifetime is not None and third.lifetime.dataset_id != first.lifetime.dataset_id
    all_three = epsilon([first.event, second.event, third.event], third.lifetime.delta)
    assert third.lifetime.epsilon == pytest.approx(all_three, rel=1e-12)
    # cap_scope: dataset is an explicit opt-in (truly disjoint data): a separate budget
    disjoint = SiteDriver(make_site(tmp_path / "l", SitePolicy(cap_scope="dataset"), seed=2))
    fourth = _report(disjoint.train(task(run_ref="run-4")))
    assert fourth.lifetime is not None
    assert fourth.lifetime.epsilon == pytest.approx(first.lifetime.epsilon, rel=1e-12)


def test_encrypted_site_decrypts_before_charging_and_sends_only_ciphertext(tmp_path: Path) -> None:
    """An aggregate the site cannot read costs no budget; a good one yields an encrypted update."""
    from dataclasses import replace

    import numpy as np
    from flwr.app import ConfigRecord, RecordDict

    from privacy.ckks import CoordinatorContext, ReplyBinding, SecretKey, create_keyset, flatten
    from privacy.ledger import SiteLedger
    from veil import protocol as P
    from veil.models import build_model

    made, other = create_keyset(tmp_path / "keys"), create_keyset(tmp_path / "other")
    site = replace(make_site(tmp_path / "s.ledger"), keys=made.secret)
    driver = SiteDriver(site)
    t = task(encrypted=True)
    init = flatten([v.numpy() for v in build_model("mlp", seed=0).state_dict().values()])

    def message(key: SecretKey, run: str | None = "run-7:0123456789abcdef") -> RecordDict:
        config = t.to_config()
        config.update({"server-round": 1, P.ENC_KEY_ID: made.info.key_id, P.ENC_WEIGHT_NORM: 1000.0})
        if run is not None:
            config[P.ENC_RUN] = run
        enc = key.encrypt(np.append(init * 0.5, 0.5))  # an aggregate of weight 0.5
        return RecordDict({P.ENC_MODEL: P.encrypted_record(enc), P.TASK: ConfigRecord(dict(config))})

    said = refusal(driver.send(message(SecretKey.load(other.secret)), "train"))
    assert said.code == "site-error" and "encrypted under key set" in said.detail
    assert not site.ledger.exists() or SiteLedger(site.ledger).entries() == []  # nothing charged

    key = SecretKey.load(made.secret)
    answer, why = None, ""  # nothing to bind its reply to: the site says so (raised, or a one-line refusal)
    try:
        answer = driver.send(message(key, run=None), "train")
    except ValueError as err:
        why = str(err)
    else:
        refused = _refusal(answer)
        why = refused.detail if refused is not None else ""
    assert "without a 'enc-run' run reference" in why and (answer is None or P.ENC_UPDATE not in answer)
    assert not site.ledger.exists() or SiteLedger(site.ledger).entries() == []  # nothing charged
    reply = driver.send(message(key), "train")
    assert P.ARRAYS not in reply and len(SiteLedger(site.ledger).entries()) == 1
    enc = P.encrypted_from(reply, P.ENC_UPDATE)  # tagged for this run, round and site: the coordinator checks it
    CoordinatorContext.load(made.coordinator).verify(
        enc, P.reply_tag(reply, P.ENC_UPDATE), ReplyBinding("run-7:0123456789abcdef", 1, site.site_id, "update"))
    update = key.decrypt(enc)
    assert update[-1] == pytest.approx(len(site.train) / 1000.0, abs=1e-7)  # pre-weighted by n / norm
    assert update.size == init.size + 1 and not np.allclose(update[:-1] / update[-1], init, atol=1e-4)


def test_a_preflight_reads_and_verifies_the_ledger_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = make_site(tmp_path / "l", SitePolicy(epsilon_cap=6.0))
    driver = SiteDriver(site)
    t = task(noise_multiplier=1.0, batch_size=30)
    driver.train(t, 1)  # the ledger is open (verified at open) and holds an entry
    calls: list[int] = []
    real = SiteLedger._verify

    def counted(self: SiteLedger, conn: object) -> object:
        calls.append(1)
        return real(self, conn)  # type: ignore[arg-type]

    monkeypatch.setattr(SiteLedger, "_verify", counted)
    status = driver.query(t)
    assert len(calls) == 1
    assert status.ledger is not None and status.ledger.seq == 1 and status.spent > 0.0
