"""A round costs the sites sampled, not the sites that exist: who is asked, who evaluates, and
what Flower's engine is asked per poll. (The timing goal itself lives in ``benchmarks/scale.py``.)"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.app import Message, RecordDict
from sqlalchemy import select

from privacy.requests import ephemeral_request
from server.coordinator import run_federation
from server.lifecycle import create_run
from server.store import RunStore
from server.store import schema as S
from simulations import engine
from tests.flowerkit import AppGrid
from tests.sitekit import SiteDriver, make_site
from veil import protocol as P
from veil.spec import parse_scenario

SITES = 6


def _scenario(**federation: object) -> dict[str, object]:
    return {"name": "scale", "seed": 1, "device": "cpu", "model": {"arch": "mlp"},
            "federation": {"sites": SITES, "rounds": 2, "sites_per_round": 2, "min_sites": 1, **federation},
            "training": {"batch_size": 30}, "privacy": {"noise_multiplier": 1.0}}


class Federation:
    """``SITES`` in-process sites behind an AppGrid that remembers every message it delivered."""

    def __init__(self, tmp_path: Path, *, liar: int | None = None) -> None:
        self.sent: list[Message] = []
        self.drivers = {n: SiteDriver(make_site(tmp_path / f"site-{n}.ledger", n=40, site_id=f"site-{n}", seed=n,
                                                researchers=(), accept_ephemeral=True))
                        for n in range(1, SITES + 1)}
        self.liar = liar
        self.grid = AppGrid({n: self._handler(n) for n in self.drivers})
        self.store = RunStore(f"sqlite:///{tmp_path / 's.db'}")
        self.tmp = tmp_path

    def _handler(self, node: int):  # type: ignore[no-untyped-def]
        d = self.drivers[node]

        def handle(msg: Message) -> Message:
            self.sent.append(msg)
            if node == self.liar and msg.metadata.message_type == P.IDENTITY_QUERY:
                return Message(RecordDict({P.SITE: P.SiteInfo("site-99", "cpu", 0.0).to_config()}), reply_to=msg)
            return d.app(msg, d.context)
        return handle

    def run(self, scenario: dict[str, object], known: dict[int, str] | None = None) -> int:
        parsed = parse_scenario(scenario)
        run_id = create_run(self.store, parsed, "simulation")
        run_federation(self.grid, parsed, self.store, run_id, self.tmp / "artifacts",
                       request=ephemeral_request(parsed.model_dump(mode="json")),
                       known_sites=(lambda: known) if known is not None else None)
        return run_id

    def kinds(self) -> Counter[str]:
        return Counter(m.metadata.message_type for m in self.sent)

    def nodes(self, kind: str) -> set[int]:
        return {m.metadata.dst_node_id for m in self.sent if m.metadata.message_type == kind}

    def participation(self, run_id: int, phase: str) -> list[tuple[int, str, str]]:
        with self.store.session() as s:
            return list(s.execute(select(S.Participation.round_number, S.Site.site_key, S.Participation.status)
                                  .join(S.Site, S.Site.id == S.Participation.site_id)
                                  .where(S.Participation.run_id == run_id, S.Participation.phase == phase)
                                  .order_by(S.Participation.round_number, S.Site.site_key)).all())


def test_refuse_mode_asks_only_the_scheduled_sites_and_no_identity_when_the_map_is_known(tmp_path: Path) -> None:
    fed = Federation(tmp_path)
    run_id = fed.run(_scenario(), known={n: f"site-{n}" for n in range(1, SITES + 1)})
    assert fed.store.get_run(run_id).status == "running"  # completed rounds; record_run ends it
    kinds = fed.kinds()
    assert kinds[P.IDENTITY_QUERY] == 0
    trained = fed.nodes("train")
    assert fed.nodes(P.BUDGET_QUERY) == trained and len(trained) < SITES  # never-scheduled sites: nothing
    assert kinds[P.BUDGET_QUERY] == len(trained)
    asked = fed.participation(run_id, "preflight")
    assert {r for r, _, _ in asked} == {0} and len(asked) == len(trained)


def test_without_a_map_nodes_are_asked_who_they_are_and_a_name_that_changes_is_rejected(tmp_path: Path) -> None:
    fed = Federation(tmp_path, liar=3)  # node 3 says it is site-99, then answers its budget as site-3
    run_id = fed.run(_scenario(sites_per_round=SITES - 1, on_budget_exhausted="drop"))
    assert fed.nodes(P.IDENTITY_QUERY) == set(range(1, SITES + 1))
    assert 3 not in fed.nodes("train")
    with fed.store.session() as s:
        row = s.execute(select(S.Participation.reason_code, S.Participation.reason)
                        .where(S.Participation.run_id == run_id, S.Participation.phase == "preflight",
                               S.Participation.status == "rejected")).one()
    assert row.reason_code == "unregistered-name" and "'site-99'" in (row.reason or "")


def test_drop_mode_asks_each_site_when_it_is_first_sampled(tmp_path: Path) -> None:
    fed = Federation(tmp_path)
    run_id = fed.run(_scenario(on_budget_exhausted="drop"), known={n: f"site-{n}" for n in range(1, SITES + 1)})
    trained = fed.nodes("train")
    assert fed.nodes(P.BUDGET_QUERY) == trained and len(trained) < SITES
    assert fed.kinds()[P.BUDGET_QUERY] == len(trained)  # each asked once
    asked = fed.participation(run_id, "preflight")
    trains = fed.participation(run_id, "train")
    first = {site: min(r for r, s, _ in trains if s == site) for _, site, _ in trains}
    assert {site: r for r, site, _ in asked} == first  # recorded with the round it was first sampled for


def test_a_large_federation_evaluates_on_the_round_s_sampled_sites(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import server.strategy

    monkeypatch.setattr(server.strategy, "EVALUATE_ALL_UP_TO", 4)  # 6 sites count as large here
    fed = Federation(tmp_path)
    run_id = fed.run(_scenario(), known={n: f"site-{n}" for n in range(1, SITES + 1)})
    evaluated = fed.participation(run_id, "evaluate")
    trained = fed.participation(run_id, "train")
    assert len(evaluated) == 2 * 2 and evaluated == trained  # who evaluated is on the record, per round
    with fed.store.session() as s:
        acc = s.scalars(select(S.Metric.value).where(S.Metric.run_id == run_id, S.Metric.phase == "aggregate",
                                                     S.Metric.name == P.EVAL_ACC)).all()
    assert len(acc) == 2


def test_a_small_federation_still_evaluates_everywhere(tmp_path: Path) -> None:
    fed = Federation(tmp_path)
    run_id = fed.run(_scenario(), known={n: f"site-{n}" for n in range(1, SITES + 1)})
    assert len(fed.participation(run_id, "evaluate")) == 2 * SITES


class _State:
    """The two things ``engine._feed`` reads of Flower's in-memory link state, and a count of asks."""

    def __init__(self, pending: dict[str, int]) -> None:
        self.lock = threading.RLock()
        self.message_ins_store = {mid: SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node, delivered_at=""))
                                  for mid, node in pending.items()}
        self.asked: list[int] = []

    def get_message_ins(self, node_id: int, limit: int) -> list[object]:
        self.asked.append(node_id)
        out = [m for m in self.message_ins_store.values()
               if m.metadata.dst_node_id == node_id and m.metadata.delivered_at == ""][:limit]
        for m in out:
            m.metadata.delivered_at = "now"
        return out


def test_the_engine_feed_asks_only_nodes_with_a_message_waiting() -> None:
    state = _State({"a": 7, "b": 900, "c": 900})
    queue: list[object] = []
    stop = threading.Event()
    nodes = {n: n for n in range(1, 1001)}
    calls = 0

    class Q:
        def put(self, msg: object) -> None:
            queue.append(msg)

    def wait(_timeout: float) -> bool:
        nonlocal calls
        calls += 1
        if calls == 3:
            stop.set()
        return stop.is_set()

    stop.wait = wait  # type: ignore[method-assign]
    engine._feed(state, Q(), nodes, stop)
    assert len(queue) == 3  # every message delivered: node 900's two over two polls
    assert sorted(state.asked) == [7, 900, 900]  # never the 998 idle nodes


def test_the_engine_feed_falls_back_to_every_node_for_another_state() -> None:
    asked: list[int] = []
    state = SimpleNamespace(get_message_ins=lambda node_id, limit: asked.append(node_id) or [])
    stop = threading.Event()
    stop.wait = lambda _t: stop.set() or True  # type: ignore[method-assign]
    engine._feed(state, None, {1: 0, 2: 1}, stop)
    assert asked == [1, 2]


def test_node_map_names_nodes_by_partition() -> None:
    node_map = engine.NodeMap(lambda i: f"site-{i}")
    node_map.record({11: 0, 42: 1})
    assert node_map.sites(timeout=0) == {11: "site-0", 42: "site-1"}
    assert engine.NodeMap(str).sites(timeout=0) == {}  # the engine never said: the coordinator asks
