"""Simulated sites: one partition of the built-in data set per Flower node.

``SimulatedSites`` is a small picklable callable (it holds only the scenario); each Ray
worker partitions the data once, deterministically from the scenario seed, and serves the
node's slice by its ``partition-id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from flwr.app import Context

from client.data import load_builtin
from client.device import resolve_device
from client.site import Site
from simulations.partition import SitePartition, partition_sites
from veil.spec import DataSpec, Scenario


def site_id(index: int) -> str:
    return f"site-{index}"


@lru_cache(maxsize=8)
def _partitions(data: DataSpec, num_sites: int, seed: int) -> tuple[SitePartition, ...]:
    labels = load_builtin(data.source).labels
    return tuple(partition_sites(labels, num_sites, data, seed))


@dataclass(frozen=True)
class SimulatedSites:
    scenario: Scenario

    def partitions(self) -> tuple[SitePartition, ...]:
        s = self.scenario
        return _partitions(s.data, s.federation.sites, s.seed)

    def site(self, index: int) -> Site:
        part = self.partitions()[index]
        full = load_builtin(self.scenario.data.source)
        return Site(
            site_id=site_id(index),
            train=full.subset(part.train).to_torch(),
            test=full.subset(part.test).to_torch(),
            device=resolve_device(self.scenario.device),
        )

    def __call__(self, context: Context) -> Site:
        torch.set_num_threads(1)  # one thread per simulated site; Ray runs sites side by side
        return _site_cached(self, int(context.node_config["partition-id"]))


@lru_cache(maxsize=1024)
def _site_cached(sites: SimulatedSites, index: int) -> Site:
    return sites.site(index)
