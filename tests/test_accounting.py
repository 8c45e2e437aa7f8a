"""ε from event histories, checked against dp_accounting directly; calibration invariants."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy import DpSgdEvent, calibrate_noise_multiplier, default_delta, epsilon


def _reference(q: float, sigma: float, steps: int, delta: float, kind: str, grid: float = 1e-4) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    acc = (pld_privacy_accountant.PLDAccountant(value_discretization_interval=grid)
           if kind == "pld" else rdp_privacy_accountant.RdpAccountant())
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def test_known_value_q001_sigma4_10k_steps() -> None:
    ev = [DpSgdEvent(4.0, 0.01, 10_000, 1.0)]
    assert epsilon(ev, 1e-5, "rdp") == pytest.approx(1.036, abs=0.002)
    pld = epsilon(ev, 1e-5, "pld")
    assert pld == pytest.approx(0.95, abs=0.015)
    # pessimistic discretization: never below the fine-grid value, only slightly above
    fine = _reference(0.01, 4.0, 10_000, 1e-5, "pld", grid=1e-4)
    assert fine <= pld <= fine + 0.02


@pytest.mark.parametrize(
    ("q", "sigma", "steps", "delta"),
    [(0.01, 4.0, 10_000, 1e-5), (0.01, 2.0, 10_000, 1e-5), (256 / 60_000, 1.1, 14_062, 1e-5),
     (0.08, 0.8, 65, 1e-5), (0.25, 1.5, 40, 1e-3), (1.0, 5.0, 10, 1e-6)],
)
def test_matches_dp_accounting(q: float, sigma: float, steps: int, delta: float) -> None:
    ev = [DpSgdEvent(sigma, q, steps, 1.0)]
    assert epsilon(ev, delta, "rdp") == pytest.approx(_reference(q, sigma, steps, delta, "rdp"), rel=1e-9)
    pld_ref = _reference(q, sigma, steps, delta, "pld", grid=1e-3)
    assert epsilon(ev, delta, "pld") == pytest.approx(pld_ref, rel=1e-9)


def test_prv_agrees_with_pld() -> None:
    ev = [DpSgdEvent(1.0, 0.05, 200, 1.0)]
    assert epsilon(ev, 1e-5, "prv") == pytest.approx(epsilon(ev, 1e-5, "pld"), abs=0.03)


def test_rounds_compose_like_one_long_run() -> None:
    rounds = [DpSgdEvent(1.2, 0.05, 40, 1.0)] * 5
    assert epsilon(rounds, 1e-5) == pytest.approx(epsilon([DpSgdEvent(1.2, 0.05, 200, 1.0)], 1e-5))
    # a fresh accountant per round would report only one round's ε: far less
    assert epsilon(rounds[:1], 1e-5) < 0.6 * epsilon(rounds, 1e-5)


def test_mixed_mechanisms_cost_more_than_either_part() -> None:
    a, b = DpSgdEvent(1.0, 0.05, 50, 1.0), DpSgdEvent(2.0, 0.1, 50, 1.0)
    both = epsilon([a, b], 1e-5)
    assert both > epsilon([a], 1e-5) and both > epsilon([b], 1e-5)


def test_bad_inputs() -> None:
    assert epsilon([], 1e-5) == 0.0
    with pytest.raises(ValueError, match="Delta must be in"):
        epsilon([DpSgdEvent(1.0, 0.1, 1, 1.0)], 0.0)
    with pytest.raises(ValueError, match="Sampling rate must be in"):
        DpSgdEvent(1.0, 1.5, 1, 1.0)
    with pytest.raises(ValueError, match="Noise multiplier"):
        DpSgdEvent(0.0, 0.1, 1, 1.0)
    assert default_delta(400) == 1e-5 and default_delta(100_000) == pytest.approx(1e-6)


@settings(max_examples=15, deadline=None)
@given(
    sigma=st.floats(0.5, 5.0),
    q=st.floats(0.001, 0.5),
    steps=st.integers(1, 300),
    extra=st.integers(1, 300),
)
def test_epsilon_never_decreases_with_more_rounds(sigma: float, q: float, steps: int, extra: int) -> None:
    first = [DpSgdEvent(sigma, q, steps, 1.0)]
    more = [*first, DpSgdEvent(sigma, q, extra, 1.0)]
    for acc in ("rdp", "pld"):
        assert epsilon(more, 1e-5, acc) >= epsilon(first, 1e-5, acc) - 1e-12  # type: ignore[arg-type]


@settings(max_examples=12, deadline=None)
@given(
    target=st.floats(0.5, 10.0),
    q=st.floats(0.005, 0.3),
    steps=st.integers(5, 400),
    accountant=st.sampled_from(["rdp", "pld"]),
)
def test_calibration_never_overshoots(target: float, q: float, steps: int, accountant: str) -> None:
    sigma = calibrate_noise_multiplier(target, 1e-5, q, steps, accountant)  # type: ignore[arg-type]
    assert epsilon([DpSgdEvent(sigma, q, steps, 1.0)], 1e-5, accountant) <= target  # type: ignore[arg-type]
    # and is not wastefully large: 3% less noise would overshoot (or σ is at its floor)
    lower = sigma / 1.03
    assert lower < 0.01 or epsilon([DpSgdEvent(lower, q, steps, 1.0)], 1e-5, accountant) > target  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "history",
    [
        [(1.0, 0.05, 40), (1.0, 0.05, 40), (1.5, 0.02, 100)],  # two runs with different σ and q
        [(0.8, 0.1, 10)] * 5 + [(2.0, 0.1, 10)] * 5 + [(1.1, 0.03, 33)] * 3,
        [(3.0, 0.25, 4), (0.9, 0.01, 500)],
    ],
)
def test_multi_run_histories_match_dp_accounting_composition(history: list[tuple[float, float, int]]) -> None:
    """A ledger-like history (several runs, repeated rounds) equals dp_accounting composing the
    same events directly, in order of first appearance (PLD on our grid; RDP exactly)."""
    events = [DpSgdEvent(s, q, n, 1.0) for s, q, n in history]
    groups: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        groups[(s, q)] = groups.get((s, q), 0) + n
    composed = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n)
        for (s, q), n in groups.items()
    ])
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(composed)
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(composed)
    assert epsilon(events, 1e-5, "pld") == pytest.approx(pld.get_epsilon(1e-5), rel=1e-6)
    assert epsilon(events, 1e-5, "rdp") == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-9)
    # and the order of rounds inside a group does not matter: the history is what counts
    assert epsilon(events[::-1], 1e-5, "rdp") == pytest.approx(epsilon(events, 1e-5, "rdp"), rel=1e-9)


@settings(max_examples=15, deadline=None)
@given(sigmas=st.lists(st.floats(0.7, 3.0), min_size=1, max_size=4), q=st.floats(0.01, 0.2),
       steps=st.integers(1, 50))
def test_lifetime_epsilon_never_decreases_as_rounds_are_added(sigmas: list[float], q: float, steps: int) -> None:
    history: list[DpSgdEvent] = []
    last = 0.0
    for sigma in sigmas:
        for _ in range(2):
            history.append(DpSgdEvent(sigma, q, steps, 1.0))
            now = epsilon(history, 1e-5, "pld")
            assert now >= last - 1e-12
            last = now
