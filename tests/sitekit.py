"""Drive the real ClientApp handlers in-process, without Flower's engine: a small site with
data made here, messages built as the coordinator builds them."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from torch.utils.data import TensorDataset

from client.app import build_client_app
from client.site import Site
from privacy.policy import SitePolicy
from privacy.requests import SignedRequest
from tests.flowerkit import incoming
from veil import protocol as P
from veil.models import build_model


def make_site(ledger: Path, policy: SitePolicy | None = None, n: int = 120, seed: int = 0,
              site_id: str = "site-t", **extra: object) -> Site:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 1, 28, 28), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Site(site_id, TensorDataset(x, y), TensorDataset(x[:20], y[:20]), torch.device("cpu"),
                ledger, policy or SitePolicy(), **extra)  # type: ignore[arg-type]


def task(**kw: object) -> P.TrainTask:
    base = dict(arch="mlp", local_epochs=1, batch_size=30, learning_rate=0.1, momentum=0.0,
                max_grad_norm=1.0, noise_multiplier=1.0, target_epsilon=0.0, delta=0.0,
                accountant="pld", planned_rounds=3, seed=0, run_ref="run-a")
    base.update(kw)
    return P.TrainTask(**base)  # type: ignore[arg-type]


def _config(t: P.TrainTask, request: SignedRequest | None) -> ConfigRecord:
    config = t.to_config()
    if request is not None:
        config[P.RUN_REQUEST] = request.to_json()
    return config


def signed_task(scenario: dict[str, object], key: Path, run_ref: str = "run-a"
                ) -> tuple[P.TrainTask, SignedRequest]:
    """The task a coordinator derives from ``scenario``, and the request the researcher's ``key`` signed."""
    from privacy.requests import load_private_key, sign_request
    from veil.spec import parse_scenario

    parsed = parse_scenario(scenario)
    request = sign_request(parsed.model_dump(mode="json"), load_private_key(key))
    return P.TrainTask.from_scenario(parsed).for_run(run_ref), request


class SiteDriver:
    """One site's ClientApp plus the Context Flower would keep for it during one run."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.app = build_client_app(lambda _ctx: site)
        self.new_run()

    def new_run(self) -> None:
        self.context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def send(self, content: RecordDict, message_type: str) -> RecordDict:
        """The ClientApp's reply to ``content``, delivered as a ``message_type`` message."""
        return self.app(incoming(content, message_type), self.context).content

    def query(self, t: P.TrainTask, request: SignedRequest | None = None) -> P.BudgetStatus:
        """The site's pre-flight answer to ``t`` (with the researcher's signed request, if given)."""
        reply = self.send(RecordDict({P.TASK: _config(t, request)}), P.BUDGET_QUERY)
        return P.BudgetStatus.from_config(reply[P.BUDGET], private=t.private)  # type: ignore[arg-type]

    def train(self, t: P.TrainTask, server_round: int = 1, request: SignedRequest | None = None) -> RecordDict:
        """The site's reply to training round ``server_round`` of ``t`` from the seed-0 model."""
        config = _config(t, request)
        config["server-round"] = server_round
        arrays = ArrayRecord(build_model(t.arch, seed=0).state_dict())
        return self.send(RecordDict({P.ARRAYS: arrays, P.TASK: ConfigRecord(dict(config))}), "train")


def refusal(reply: RecordDict) -> P.Refusal:
    """The refusal a site answered with (the test fails if it answered anything else)."""
    assert P.REFUSAL in reply, f"expected a refusal, got {sorted(reply.keys())}"
    assert P.ARRAYS not in reply and P.ENC_UPDATE not in reply  # a refusal releases nothing
    return P.Refusal.from_config(reply[P.REFUSAL])  # type: ignore[arg-type]
