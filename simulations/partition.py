"""Split one data set into per-site partitions, seeded, at 2 sites or 1,000.

* ``iid``: rows shuffled with the scenario seed (built-in data sets are often sorted by label),
  then cut into contiguous near-equal runs: exactly flwr-datasets' ``IidPartitioner``, without
  building a ``datasets.Dataset`` per site (1,000 sites took 6 s that way, in every process).
* ``dirichlet``: flwr-datasets' ``DirichletPartitioner`` (label-major: each label's rows split
  over the sites by Dir(α), resampled until every site has ``min_site_examples``). It gives up
  when many sites share few rows (already at 100 sites of MNIST-5k with 20 each); Veil then uses
  a *balanced* Dirichlet split (``balanced_dirichlet``): equal site sizes, each site's label mix
  drawn from Dir(α). Label skew stays; the sites' size skew does not. The log says which ran.
* ``shards``: flwr-datasets' ``ShardPartitioner``.

flwr-datasets works offline on an in-memory ``datasets.Dataset``; only indices and labels go
in, so features are never copied.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from veil.errors import DataError
from veil.logs import get_logger
from veil.spec import DataSpec

log = get_logger("simulate")


@dataclass(frozen=True)
class SitePartition:
    """Row indices into the full data set for one site's train and held-out test split."""

    site_index: int
    train: np.ndarray
    test: np.ndarray


def partition_indices(labels: np.ndarray, num_sites: int, spec: DataSpec, seed: int) -> list[np.ndarray]:
    """One index array per site, following ``spec.partitioner``."""
    if num_sites > len(labels):
        raise DataError(f"cannot split {len(labels)} records across {num_sites} sites")
    order = np.random.default_rng(seed).permutation(len(labels))
    if spec.partitioner == "iid":  # IidPartitioner's contiguous shards, without a Dataset per site
        return [np.asarray(part, dtype=np.int64) for part in np.array_split(order, num_sites)]
    if spec.partitioner == "dirichlet" and num_sites * spec.min_site_examples > len(labels):
        raise DataError(f"data.min_site_examples {spec.min_site_examples} x {num_sites} sites = "
                        f"{num_sites * spec.min_site_examples:,} records, more than the {len(labels):,} there "
                        f"are; set data.min_site_examples to at most {len(labels) // num_sites}")
    from datasets import Dataset  # late: importing datasets takes seconds
    from flwr_datasets.partitioner import DirichletPartitioner, ShardPartitioner

    table = Dataset.from_dict({"idx": order, "label": labels[order]})
    partitioner: DirichletPartitioner | ShardPartitioner
    if spec.partitioner == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_sites,
            partition_by="label",
            alpha=spec.alpha,
            min_partition_size=spec.min_site_examples,
            self_balancing=True,
            seed=seed,
        )
    else:
        partitioner = ShardPartitioner(
            num_partitions=num_sites,
            partition_by="label",
            num_shards_per_partition=spec.shards_per_site,
            seed=seed,
        )
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():  # its resampling warns once per attempt; the outcome is logged
            warnings.simplefilter("ignore", UserWarning)
            parts = [np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64) for i in range(num_sites)]
    except ValueError as err:
        if spec.partitioner == "dirichlet":
            log.info("flwr-datasets' Dirichlet split cannot give each of %d sites %d records (%s); using a "
                     "balanced Dirichlet split: equal sizes, each site's label mix from Dir(%g)",
                     num_sites, spec.min_site_examples, err, spec.alpha)
            positions = balanced_dirichlet(labels[order], num_sites, spec.alpha, seed)
            return [np.sort(order[p]) for p in positions]
        raise DataError(
            f"partitioner {spec.partitioner!r} cannot split {len(labels)} records into "
            f"{num_sites} sites: {err}"
        ) from None
    return parts


def balanced_dirichlet(labels: np.ndarray, num_sites: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Positions into ``labels`` for each site: near-equal sizes (every row is used; sizes differ
    by at most one), each site's label mix drawn from Dir(α) over the labels still unassigned.

    Site-major Dirichlet label skew (Hsu et al. 2019, "Measuring the effects of non-identical data
    distribution", arXiv:1909.06335), with equal sizes so that any number of sites up to the rows
    gets its share. Sites are filled in a seeded order; a site whose drawn mix asks for labels
    already used up takes its remainder in proportion from what is left."""
    rng = np.random.default_rng([seed, 0xD1])
    classes, inverse = np.unique(labels, return_inverse=True)
    pools = [list(rng.permutation(np.flatnonzero(inverse == k))) for k in range(len(classes))]
    left = np.array([len(p) for p in pools], dtype=np.int64)
    sizes = [len(part) for part in np.array_split(np.arange(len(labels)), num_sites)]
    out: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_sites
    for site in rng.permutation(num_sites):
        mix, need = rng.dirichlet(np.full(len(classes), alpha)), sizes[site]
        take = np.zeros(len(classes), dtype=np.int64)
        while need > 0:
            open_ = left - take > 0
            weights = mix * open_
            weights = weights / weights.sum() if weights.sum() > 0 else open_ / open_.sum()
            draw = np.minimum(rng.multinomial(need, weights), left - take)
            take += draw
            need -= int(draw.sum())
        chosen = []
        for k in np.flatnonzero(take):
            chosen.extend(pools[k][:take[k]])
            del pools[k][:take[k]]
        left -= take
        out[site] = np.sort(np.asarray(chosen, dtype=np.int64))
    return out


def split_train_test(idx: np.ndarray, test_fraction: float, seed: int, site: int) -> SitePartition:
    """Hold out ``test_fraction`` of a site's rows (at least one row each side)."""
    if len(idx) < 2:
        raise DataError(f"site {site} received {len(idx)} records; it needs at least 2")
    shuffled = np.random.default_rng([seed, site]).permutation(idx)
    n_test = min(max(1, round(len(idx) * test_fraction)), len(idx) - 1)
    return SitePartition(site, train=np.sort(shuffled[n_test:]), test=np.sort(shuffled[:n_test]))


def partition_sites(labels: np.ndarray, num_sites: int, spec: DataSpec, seed: int) -> list[SitePartition]:
    """Partition and split: what every simulated site holds, deterministic in ``seed``."""
    parts = partition_indices(labels, num_sites, spec, seed)
    return [split_train_test(p, spec.test_fraction, seed, i) for i, p in enumerate(parts)]
