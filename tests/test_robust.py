"""Robust aggregation rules against hand-computed results and a poisoning site."""

from __future__ import annotations

import numpy as np
import pytest

from server.robust import bound_norm, trimmed_count, trimmed_mean, update_norm


def test_norm_bound_scales_only_long_updates() -> None:
    ref = [np.zeros(2, np.float32), np.zeros((1, 1), np.float32)]
    short = [np.array([0.3, 0.4], np.float32), np.array([[0.0]], np.float32)]  # norm 0.5
    long = [np.array([3.0, 0.0], np.float32), np.array([[4.0]], np.float32)]  # norm 5
    same, norm = bound_norm(short, ref, 1.0)
    assert norm == pytest.approx(0.5) and all(np.array_equal(a, b) for a, b in zip(same, short, strict=True))
    scaled, norm = bound_norm(long, ref, 1.0)
    assert norm == pytest.approx(5.0)
    assert np.allclose(scaled[0], [0.6, 0.0]) and np.allclose(scaled[1], [[0.8]])
    assert update_norm(scaled, ref) == pytest.approx(1.0, rel=1e-6)
    assert scaled[0].dtype == np.float32


def test_norm_bound_is_relative_to_the_model_sent() -> None:
    ref = [np.array([10.0, 10.0])]
    scaled, norm = bound_norm([np.array([13.0, 14.0])], ref, 2.5)  # delta (3, 4), norm 5
    assert norm == pytest.approx(5.0) and np.allclose(scaled[0], [11.5, 12.0])
    with pytest.raises(ValueError, match="positive and finite"):
        bound_norm([np.array([1.0])], [np.array([0.0])], float("inf"))


def test_trimmed_mean_by_hand_and_against_a_poisoner() -> None:
    honest = [[np.array([1.0, 2.0])], [np.array([2.0, 3.0])], [np.array([3.0, 4.0])], [np.array([4.0, 5.0])]]
    poison = [[np.array([1e6, -1e6])]]
    assert trimmed_count(5, 0.2) == 1 and trimmed_count(4, 0.2) == 0
    got = trimmed_mean(honest + poison, 0.2)[0]
    # column 0: drop 1 and 1e6 -> mean(2, 3, 4) = 3; column 1: drop -1e6 and 5 -> mean(2, 3, 4) = 3
    assert np.allclose(got, [3.0, 3.0])
    plain = np.mean([u[0] for u in honest + poison], axis=0)
    assert abs(plain[0]) > 1e5  # what FedAvg would have done
    assert np.allclose(trimmed_mean(honest, 0.0)[0], [2.5, 3.5])
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(honest, 0.5)
