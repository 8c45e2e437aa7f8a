"""The coordinator's whole run (``server.coordinator.run_federation``) against real ClientApps
in-process (``tests.flowerkit.AppGrid``): one poisoning site cannot make the model non-finite,
and a run in which no round trained is ``failed`` with the first reason, with no checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message
from sqlalchemy import func, select

from privacy.requests import ephemeral_request
from server.coordinator import run_federation
from server.lifecycle import create_run
from server.store import RunStore
from server.store import schema as S
from tests.flowerkit import AppGrid
from tests.sitekit import SiteDriver, make_site
from veil import protocol as P
from veil.spec import parse_scenario

SCENARIO = {"name": "loop", "device": "cpu", "federation": {"sites": 3, "rounds": 2, "min_sites": 1},
            "model": {"arch": "mlp"}, "training": {"batch_size": 30}, "privacy": {"noise_multiplier": 1.0}}


def _poisoned(handler, value: float = float("nan")):  # type: ignore[no-untyped-def]
    """A site that trains honestly (and pays), then sends ``value`` for every weight."""
    def send(msg: Message) -> Message:
        reply = handler(msg)
        if msg.metadata.message_type == "train" and P.ARRAYS in reply.content:
            bad = {k: torch.full_like(v, value) for k, v in
                   reply.content[P.ARRAYS].to_torch_state_dict().items()}  # type: ignore[union-attr]
            reply.content[P.ARRAYS] = ArrayRecord(bad)
        return reply
    return send


def _run(tmp_path: Path, poison: set[int], value: float = float("nan"),
         **changes: object) -> tuple[RunStore, int]:
    scenario = parse_scenario({**SCENARIO, **changes})
    drivers = {n: SiteDriver(make_site(tmp_path / f"site-{n}.ledger", site_id=f"site-{n}", seed=n,
                                       researchers=(), accept_ephemeral=True)) for n in (1, 2, 3)}
    handlers = {}
    for n, d in drivers.items():
        def handle(msg: Message, d: SiteDriver = d) -> Message:
            return d.app(msg, d.context)
        handlers[n] = _poisoned(handle, value) if n in poison else handle
    store = RunStore(f"sqlite:///{tmp_path / 's.db'}")
    run_id = create_run(store, scenario, "simulation")
    run_federation(AppGrid(handlers), scenario, store, run_id, tmp_path / "artifacts",
                   request=ephemeral_request(scenario.model_dump(mode="json")))
    return store, run_id


def test_a_nan_site_is_rejected_and_the_model_stays_finite(tmp_path: Path) -> None:
    store, run_id = _run(tmp_path, poison={2})
    with store.session() as s:
        rejected = s.scalars(select(S.Participation.reason).where(S.Participation.status == "rejected")).all()
        ok = s.scalar(select(func.count()).select_from(S.Participation)
                      .where(S.Participation.phase == "train", S.Participation.status == "ok"))
        uri = s.scalar(select(S.Artifact.uri).where(S.Artifact.kind == "checkpoint"))
    assert len(rejected) == 2 and all("holds NaN" in r for r in rejected)  # both rounds
    assert ok == 4  # the honest sites, both rounds
    assert uri is not None
    state = torch.load(Path(uri.removeprefix("file://")), weights_only=True)
    assert state and all(torch.isfinite(t).all() for t in state.values())
    assert store.get_run(run_id).status == "running"  # run_federation leaves the ending to record_run


def test_no_round_trained_is_a_failed_run_without_a_checkpoint(tmp_path: Path) -> None:
    store, run_id = _run(tmp_path, poison={1, 2, 3})
    run = store.get_run(run_id)
    assert run.status == "failed"
    assert (run.error or "").startswith("no round had enough usable site replies; first reason recorded:")
    assert "holds NaN" in (run.error or "")
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(S.Artifact)) == 0


def _final_weights(store: RunStore) -> dict[str, torch.Tensor]:
    with store.session() as s:
        uri = s.scalar(select(S.Artifact.uri).where(S.Artifact.kind == "checkpoint"))
    assert uri is not None
    return torch.load(Path(uri.removeprefix("file://")), weights_only=True)


def test_norm_bounding_keeps_a_large_finite_poison_within_its_bound(tmp_path: Path) -> None:
    """1e5 everywhere is finite and within the value bound: every check passes it. Without a
    rule it owns the model; with norm-bound it moves the model by at most its share x bound."""
    from veil.models import build_model

    start = build_model("mlp", seed=0).state_dict()
    moved = {}
    for rule in ("none", "norm-bound"):
        store, run_id = _run(tmp_path / rule, poison={2}, value=1e5,
                             robustness={"rule": rule, "max_update_norm": 2.0} if rule != "none" else {})
        assert store.get_run(run_id).status == "running"  # it trained
        final = _final_weights(store)
        moved[rule] = sum(float(((final[k].double() - start[k].double()) ** 2).sum()) for k in start) ** 0.5
    assert moved["none"] > 1e5  # the poisoner owns the model
    # 2 rounds; in each every site's update is at most 2.0 long, so the average moves at most 2.0
    assert moved["norm-bound"] <= 2 * 2.0 + 1e-3


def test_too_few_sites_fail_fast_naming_the_setting(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A scenario planning 3 sites on a federation of 2 (e.g. a local simulation's default) fails
    once no site has joined for the stall window, instead of waiting for the round timeout."""
    import time

    from server import budget

    monkeypatch.setattr(budget, "JOIN_STALL_S", 1.0)
    scenario = parse_scenario(SCENARIO)
    drivers = {n: SiteDriver(make_site(tmp_path / f"site-{n}.ledger", site_id=f"site-{n}", seed=n,
                                       researchers=(), accept_ephemeral=True)) for n in (1, 2)}
    grid = AppGrid({n: (lambda msg, d=d: d.app(msg, d.context)) for n, d in drivers.items()})
    store = RunStore(f"sqlite:///{tmp_path / 's.db'}")
    run_id = create_run(store, scenario, "deployment")
    start = time.monotonic()
    assert run_federation(grid, scenario, store, run_id, tmp_path / "a",
                          request=ephemeral_request(scenario.model_dump(mode="json"))) is None
    assert time.monotonic() - start < 30
    run = store.get_run(run_id)
    assert run.status == "failed" and "only 2 of 3 sites connected" in (run.error or "")
    assert "set federation.sites to 2" in (run.error or "")
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(S.Participation)) == 0  # nobody was asked anything
