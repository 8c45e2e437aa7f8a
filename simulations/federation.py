"""Simulated sites: one partition of the built-in data set per Flower node.

``SimulatedSites`` is a small picklable callable (the scenario, and the partition's row
indices once ``with_partitions`` has made them); each Ray worker serves the node's slice by
its ``partition-id``. Handed the driver's partition, a worker only loads the (cached) data
set; without it, it partitions the data itself, deterministically from the scenario seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import Context

from client.data import load_builtin
from client.device import resolve_device
from client.site import Site
from simulations.partition import SitePartition, partition_sites
from veil.spec import DataSpec, Scenario


def site_id(index: int) -> str:
    """The id of the simulated site with 0-based partition ``index``: ``site-<index>``."""
    return f"site-{index}"


@lru_cache(maxsize=8)
def _partitions(data: DataSpec, num_sites: int, seed: int) -> tuple[SitePartition, ...]:
    labels = load_builtin(data.source).labels
    return tuple(partition_sites(labels, num_sites, data, seed))


@dataclass(frozen=True)
class SimulatedSites:
    """The scenario's sites; each keeps its privacy ledger at ``<ledger_dir>/<site>.ledger``."""

    scenario: Scenario
    ledger_dir: str = "veil-ledgers"
    keys: str | None = None  # the run's CKKS secret key file, when encryption is on
    # only `veil simulate` sets this: its sites accept a (labelled, non-private) seeded-noise task
    allow_seeded_noise: bool = False
    # the split made by with_partitions(): row indices only, a few bytes per record
    parts: tuple[SitePartition, ...] | None = field(default=None, compare=False, repr=False)

    def partitions(self) -> tuple[SitePartition, ...]:
        """Every site's train/test split, made once per process, deterministically from the scenario seed."""
        if self.parts is not None:
            return self.parts
        s = self.scenario
        return _partitions(s.data, s.federation.sites, s.seed)

    def with_partitions(self) -> SimulatedSites:
        """The same sites carrying their split, so a process they are sent to (a Ray worker)
        reads its slice instead of loading flwr-datasets and partitioning again."""
        return replace(self, parts=self.partitions())

    def site(self, index: int) -> Site:
        """Simulated site ``index``: its partition as tensors, device, ledger file, policy and CKKS key."""
        part = self.partitions()[index]
        full = load_builtin(self.scenario.data.source)
        return Site(
            site_id=site_id(index),
            train=full.subset(part.train).to_torch(),
            test=full.subset(part.test).to_torch(),
            device=resolve_device(self.scenario.device),
            ledger=Path(self.ledger_dir).expanduser().resolve() / f"{site_id(index)}.ledger",
            policy=self.scenario.policy_for(site_id(index)),
            keys=Path(self.keys) if self.keys else None,
            allow_seeded_noise=self.allow_seeded_noise,
            researchers=(), accept_ephemeral=True,  # a simulated federation's runs are signed ephemerally
        )

    def __call__(self, context: Context) -> Site:
        """The ``Site`` behind a Flower node, by its ``partition-id``; built once per worker process."""
        torch.set_num_threads(1)  # one thread per simulated site; Ray runs sites side by side
        index = int(context.node_config["partition-id"])
        key = (self.scenario.spec_hash(), self.ledger_dir, self.keys or "", self.allow_seeded_noise, index)
        if key not in _SITES:  # one Site (data, fingerprint) per worker process
            _SITES[key] = self.site(index)
        return _SITES[key]


_SITES: dict[tuple[str, str, str, bool, int], Site] = {}
