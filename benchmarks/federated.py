"""The federated DP-SGD arithmetic of a Veil simulation, in one process, for sweeps and references.

``veil simulate`` runs each site in Flower's simulation engine; a sweep over dozens of settings
cannot afford that per setting on a 2-core machine. This module runs the same arithmetic in
one process, from Veil's own pieces: the simulated sites' exact data (``SimulatedSites``: the
same partition, train/test split and test examples), σ calibrated per site the way a site
does it (``calibrate_noise_multiplier`` over all its planned steps), Opacus DP-SGD with Poisson
sampling and noise from OS entropy (``client.training.train_dp_sgd``), the weighted mean of
the sites' models, and the server step (``veil.server_opt``). What it leaves out is what does
not change the model: Flower, the ledgers, the store, CKKS (tested equal to plaintext
elsewhere). ``benchmarks/utility.py`` reports Veil's own runs next to these.

Also here: the centralized references (pooled training data, plain SGD or Opacus DP-SGD at
the same ε and δ) and the non-private federated reference.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.training import evaluate, poisson_plan, train_dp_sgd, train_sgd
from privacy import calibrate_noise_multiplier, default_delta, epsilon
from privacy.ckks import flatten, unflatten
from privacy.events import DpSgdEvent
from privacy.randomness import RoundRandomness
from simulations.federation import SimulatedSites
from veil.models import build_model
from veil.server_opt import ServerOptimizer, ServerState, server_step
from veil.spec import Scenario


@dataclass(frozen=True)
class Setting:
    """One federated configuration: what a scenario's training, privacy and server sections say."""

    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.5
    momentum: float = 0.0
    max_grad_norm: float = 1.0
    server: ServerOptimizer = field(default_factory=ServerOptimizer)
    arch: str = "mlp"

    def label(self) -> str:
        """A short row label."""
        return (f"{self.arch} R={self.rounds} E={self.local_epochs} B={self.batch_size} lr={self.learning_rate:g} "
                f"C={self.max_grad_norm:g} {self.server.describe()}")

    def scenario_overrides(self) -> dict[str, object]:
        """The same setting as scenario overrides (``Scenario.with_overrides``)."""
        s = self.server
        return {"federation.rounds": self.rounds, "training.local_epochs": self.local_epochs,
                "training.batch_size": self.batch_size, "training.learning_rate": self.learning_rate,
                "training.momentum": self.momentum, "privacy.max_grad_norm": self.max_grad_norm,
                "model.arch": self.arch, "server_optimizer": {
                    "rule": s.rule, "learning_rate": None if s.rule == "fedavg" else s.learning_rate,
                    "momentum": s.momentum if s.rule != "fedavg" else None, "beta2": s.beta2, "tau": s.tau}}


@dataclass(frozen=True)
class Data:
    """The scenario's sites' training sets and the pooled held-out examples Veil reports on."""

    sites: list[TensorDataset]
    test: TensorDataset

    @property
    def pooled(self) -> ConcatDataset[tuple[torch.Tensor, ...]]:
        """Every site's training records in one set (the centralized references train on it)."""
        return ConcatDataset(self.sites)


def site_data(scenario: Scenario) -> Data:
    """The simulated sites' exact data, as ``veil simulate`` gives it to them."""
    sim = SimulatedSites(scenario, ledger_dir="/nonexistent")
    sites = [sim.site(i) for i in range(scenario.federation.sites)]
    test_x = torch.cat([s.test.tensors[0] for s in sites])
    test_y = torch.cat([s.test.tensors[1] for s in sites])
    return Data([s.train for s in sites], TensorDataset(test_x, test_y))


def _pooled_tensors(data: Data) -> TensorDataset:
    return TensorDataset(torch.cat([s.tensors[0] for s in data.sites]),
                         torch.cat([s.tensors[1] for s in data.sites]))


def federated(data: Data, setting: Setting, *, target_epsilon: float | None, seed: int) -> dict[str, float]:
    """Final pooled test accuracy of a federated run (DP-SGD at every site, or none when
    ``target_epsilon`` is None), with every site's run ε recomputed from its events."""
    torch.set_num_threads(1)
    device = torch.device("cpu")
    model = build_model(setting.arch, seed=seed)
    layers = [t.detach().numpy().copy() for t in model.state_dict().values()]
    x = flatten(layers)
    state = ServerState.initial(setting.server, x)
    sizes = [len(s) for s in data.sites]
    sigmas = []
    for n in sizes:
        if target_epsilon is None:
            sigmas.append(0.0)
            continue
        q, steps = poisson_plan(n, setting.batch_size, setting.local_epochs)
        sigmas.append(calibrate_noise_multiplier(target_epsilon, default_delta(n), q, steps * setting.rounds))
    events: list[list[DpSgdEvent]] = [[] for _ in sizes]
    start = time.perf_counter()
    for r in range(setting.rounds):
        total = np.zeros_like(x)
        for i, train in enumerate(data.sites):
            local = build_model(setting.arch)
            local.load_state_dict({k: torch.from_numpy(v) for k, v in
                                   zip(local.state_dict(), unflatten(x, layers), strict=True)})
            if target_epsilon is None:
                train_sgd(local, train, batch_size=setting.batch_size, local_epochs=setting.local_epochs,
                          learning_rate=setting.learning_rate, momentum=setting.momentum, device=device,
                          seed=seed * 1000 + r * 100 + i)
            else:
                out = train_dp_sgd(local, train, noise_multiplier=sigmas[i], max_grad_norm=setting.max_grad_norm,
                                   batch_size=setting.batch_size, local_epochs=setting.local_epochs,
                                   learning_rate=setting.learning_rate, momentum=setting.momentum, device=device,
                                   randomness=RoundRandomness.from_os())
                events[i].append(out.event)
            total += sizes[i] * flatten([t.detach().numpy() for t in local.state_dict().values()])
        x, state = server_step(setting.server, state, total / sum(sizes))
        if not np.all(np.isfinite(x)):
            return {"accuracy": float("nan"), "max_epsilon": float("nan"), "seconds": time.perf_counter() - start}
    model.load_state_dict({k: torch.from_numpy(v) for k, v in
                           zip(model.state_dict(), unflatten(x, layers), strict=True)})
    acc = evaluate(model, data.test, device).accuracy
    eps = max((epsilon(ev, default_delta(n), "pld") for ev, n in zip(events, sizes, strict=True) if ev),
              default=float("inf"))
    return {"accuracy": acc, "max_epsilon": eps, "seconds": time.perf_counter() - start}


def centralized(data: Data, *, arch: str, epochs: int, batch_size: int, learning_rate: float,
                max_grad_norm: float, target_epsilon: float | None, seed: int) -> dict[str, float]:
    """Final pooled test accuracy of one model trained on the pooled training records: Opacus
    DP-SGD with Poisson sampling at ``target_epsilon`` (δ = min(1e-5, 0.1/n)), or plain SGD."""
    torch.set_num_threads(1)
    device = torch.device("cpu")
    pooled = _pooled_tensors(data)
    model = build_model(arch, seed=seed)
    start = time.perf_counter()
    eps = float("inf")
    if target_epsilon is None:
        train_sgd(model, pooled, batch_size=batch_size, local_epochs=epochs, learning_rate=learning_rate,
                  momentum=0.0, device=device, seed=seed)
    else:
        n = len(pooled)
        q, steps = poisson_plan(n, batch_size, epochs)
        sigma = calibrate_noise_multiplier(target_epsilon, default_delta(n), q, steps)
        out = train_dp_sgd(model, pooled, noise_multiplier=sigma, max_grad_norm=max_grad_norm,
                           batch_size=batch_size, local_epochs=epochs, learning_rate=learning_rate,
                           momentum=0.0, device=device, randomness=RoundRandomness.from_os())
        eps = epsilon([out.event], default_delta(n), "pld")
    return {"accuracy": evaluate(model, data.test, device).accuracy, "max_epsilon": eps,
            "seconds": time.perf_counter() - start}


def with_server(setting: Setting, rule: str, lr: float, momentum: float = 0.9) -> Setting:
    """``setting`` with another server optimiser."""
    return replace(setting, server=ServerOptimizer(rule, lr, momentum))  # type: ignore[arg-type]
