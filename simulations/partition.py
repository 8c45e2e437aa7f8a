"""Split one data set into per-site partitions with flwr-datasets' partitioners.

flwr-datasets works offline on an in-memory ``datasets.Dataset``; only indices and labels go
in, so features are never copied. Rows are shuffled with the scenario seed first, because
``IidPartitioner`` splits contiguously and built-in data sets are often sorted by label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from veil.errors import DataError
from veil.spec import DataSpec


@dataclass(frozen=True)
class SitePartition:
    """Row indices into the full data set for one site's train and held-out test split."""

    site_index: int
    train: np.ndarray
    test: np.ndarray


def partition_indices(labels: np.ndarray, num_sites: int, spec: DataSpec, seed: int) -> list[np.ndarray]:
    """One index array per site, following ``spec.partitioner``."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

    if num_sites > len(labels):
        raise DataError(f"cannot split {len(labels)} records across {num_sites} sites")
    order = np.random.default_rng(seed).permutation(len(labels))
    table = Dataset.from_dict({"idx": order, "label": labels[order]})
    partitioner: IidPartitioner | DirichletPartitioner | ShardPartitioner
    if spec.partitioner == "iid":
        partitioner = IidPartitioner(num_partitions=num_sites)
    elif spec.partitioner == "dirichlet":
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
        parts = [np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64) for i in range(num_sites)]
    except ValueError as err:
        raise DataError(
            f"partitioner {spec.partitioner!r} cannot split {len(labels)} records into "
            f"{num_sites} sites: {err}"
        ) from None
    return parts


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
