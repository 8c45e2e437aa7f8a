"""Drive the real ClientApp handlers in-process, without Flower's engine: a small site with
data made here, messages built as the coordinator builds them."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch.utils.data import TensorDataset

from client.app import build_client_app
from client.site import Site
from privacy.policy import SitePolicy
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


def _incoming(content: RecordDict, message_type: str) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    msg = Message(content, dst_node_id=1, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = "m" * 64
    return msg


class SiteDriver:
    """One site's ClientApp plus the Context Flower would keep for it during one run."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.app = build_client_app(lambda _ctx: site)
        self.new_run()

    def new_run(self) -> None:
        self.context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def query(self, t: P.TrainTask) -> P.BudgetStatus:
        reply = self.app(_incoming(RecordDict({P.TASK: t.to_config()}), P.BUDGET_QUERY), self.context)
        return P.BudgetStatus.from_config(reply.content[P.BUDGET])  # type: ignore[arg-type]

    def train(self, t: P.TrainTask, server_round: int = 1) -> RecordDict:
        config = t.to_config()
        config["server-round"] = server_round
        arrays = ArrayRecord(build_model(t.arch, seed=0).state_dict())
        msg = _incoming(RecordDict({P.ARRAYS: arrays, P.TASK: ConfigRecord(dict(config))}), "train")
        return self.app(msg, self.context).content
