"""ε from event histories: one contract every accountant passes, checked against dp_accounting
called directly; plus accountant-specific exactness, known values and calibration invariants.

``AccountantContract`` is abstract, in the style of dp_accounting's
``privacy_accountant_test.py``: each accountant in ``ACCOUNTANTS`` subclasses it, names itself
and says how close it must come to the reference (dp_accounting's PLD accountant on a fine grid
for the tight value, its RDP accountant for the loose upper bound).
"""

from __future__ import annotations

import math
from functools import cache
from itertools import pairwise
from typing import Any, ClassVar

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy import DpSgdEvent, calibrate_noise_multiplier, default_delta, epsilon
from privacy import accounting as acct
from privacy.accounting import ACCOUNTANTS, PLD_DISCRETIZATION, History, check_accountant, history_epsilon
from privacy.calibration import SIGMA_MIN, _on_reporting_grid
from veil.env import ACCOUNTING_CACHE

DELTA = 1e-5
A = DpSgdEvent(1.5, 0.05, 60, 1.0)  # ε ≈ 1.3 at δ = 1e-5
B = DpSgdEvent(2.5, 0.1, 40, 1.0)  # ε ≈ 1.1

# Moderate settings (ε ≈ 0.4-3), cheap enough for every accountant, PRV included.
MODERATE: list[tuple[History, float]] = [
    (((2.0, 0.1, 50),), 1e-5),
    (((1.5, 0.05, 60), (2.5, 0.1, 40)), 1e-5),  # A then B: two groups composed
    (((5.0, 1.0, 10),), 1e-6),  # q = 1: full-batch steps, no subsampling
]
# A wider sweep for the accountants that are dp_accounting's own computation (PLD, RDP): long
# runs, tiny q, large ε, δ = 1e-3, and ledger-like histories of several runs.
WIDE: list[tuple[History, float]] = [
    (((4.0, 0.01, 10_000),), 1e-5),
    (((2.0, 0.01, 10_000),), 1e-5),
    (((1.1, 256 / 60_000, 14_062),), 1e-5),
    (((0.8, 0.08, 65),), 1e-5),
    (((1.5, 0.25, 40),), 1e-3),
    (((5.0, 1.0, 10),), 1e-6),
    (((1.0, 0.05, 80), (1.5, 0.02, 100)), 1e-5),
    (((0.8, 0.1, 50), (2.0, 0.1, 50), (1.1, 0.03, 99)), 1e-5),
    (((3.0, 0.25, 4), (0.9, 0.01, 500)), 1e-5),
]


def _ids(cases: list[tuple[History, float]]) -> list[str]:
    return ["+".join(f"s{s}q{q:.3g}n{n}" for s, q, n in h) + f"-d{d:g}" for h, d in cases]


@cache
def reference(history: History, delta: float, kind: str, grid: float = 1e-4) -> float:
    """dp_accounting itself: each (σ, q, n) is PoissonSampledDpEvent(q, GaussianDpEvent(σ))
    composed n times, the groups composed in order. ``grid`` only matters for PLD."""
    event = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
        for sigma, q, n in history
    ])
    acc: Any = (pld_privacy_accountant.PLDAccountant(value_discretization_interval=grid)
                if kind == "pld" else rdp_privacy_accountant.RdpAccountant())
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def _strictly_increasing(values: list[float]) -> bool:
    return all(a < b for a, b in pairwise(values))


def _strictly_decreasing(values: list[float]) -> bool:
    return all(a > b for a, b in pairwise(values))


INVALID_EVENTS = [  # what DpSgdEvent refuses at construction, before any accountant sees it
    pytest.param({"noise_multiplier": 0.0}, "Noise multiplier", id="sigma=0"),
    pytest.param({"noise_multiplier": -1.0}, "Noise multiplier", id="sigma<0"),
    pytest.param({"noise_multiplier": math.nan}, "Noise multiplier", id="sigma=nan"),
    pytest.param({"noise_multiplier": math.inf}, "Noise multiplier", id="sigma=inf"),
    pytest.param({"sample_rate": 0.0}, "Sampling rate", id="q=0"),
    pytest.param({"sample_rate": -0.1}, "Sampling rate", id="q<0"),
    pytest.param({"sample_rate": 1.5}, "Sampling rate", id="q>1"),
    pytest.param({"sample_rate": math.nan}, "Sampling rate", id="q=nan"),
    pytest.param({"steps": -1}, "Steps must be non-negative", id="steps<0"),
    pytest.param({"max_grad_norm": 0.0}, "Clipping norm", id="C=0"),
    pytest.param({"max_grad_norm": math.nan}, "Clipping norm", id="C=nan"),
]


def _event(**change: Any) -> DpSgdEvent:
    return DpSgdEvent(**{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, "max_grad_norm": 1.0,
                         **change})


class AccountantContract:
    """What every accountant guarantees. Subclasses set ``accountant`` and implement
    ``assert_matches_reference``; pytest collects only the ``Test*`` subclasses."""

    accountant: ClassVar[str]

    def eps(self, events: list[DpSgdEvent], delta: float = DELTA) -> float:
        return epsilon(events, delta, self.accountant)  # type: ignore[arg-type]

    def assert_matches_reference(self, ours: float, tight: float, loose: float) -> None:
        """``tight``: dp_accounting PLD on a fine grid; ``loose``: dp_accounting RDP."""
        raise NotImplementedError

    def test_is_a_registered_accountant(self) -> None:
        assert self.accountant in ACCOUNTANTS
        assert check_accountant(self.accountant) == self.accountant

    def test_no_events_cost_nothing(self) -> None:
        assert self.eps([]) == 0.0
        assert history_epsilon((), DELTA, self.accountant) == 0.0  # type: ignore[arg-type]
        assert self.eps([_event(steps=0)]) == 0.0  # a zero-step event is accepted and vanishes
        assert self.eps([_event(steps=0), A]) == self.eps([A]) > 0.0

    def test_epsilon_strictly_increases_with_steps_and_events(self) -> None:
        by_steps = [self.eps([DpSgdEvent(1.5, 0.05, n, 1.0)]) for n in (20, 40, 80)]
        assert _strictly_increasing([0.0, *by_steps])
        by_events = [self.eps(h) for h in ([A], [A, B], [A, B, A])]
        assert _strictly_increasing(by_events)

    def test_epsilon_decreases_as_noise_grows(self) -> None:
        assert _strictly_decreasing([self.eps([DpSgdEvent(s, 0.05, 60, 1.0)]) for s in (1.0, 1.5, 2.5)])

    def test_epsilon_decreases_as_delta_grows(self) -> None:
        assert _strictly_decreasing([self.eps([A], d) for d in (1e-7, 1e-5, 1e-3)])

    def test_composing_different_events_costs_more_than_either_alone(self) -> None:
        a, b, both = self.eps([A]), self.eps([B]), self.eps([A, B])
        assert both > max(a, b)
        # and no more than basic composition allows: (ε_a + ε_b, δ_a + δ_b)
        assert both <= self.eps([A], DELTA / 2) + self.eps([B], DELTA / 2)

    def test_the_history_is_what_counts(self) -> None:
        """Rounds of one (σ, q) compose like one long run; the order of events does not matter."""
        rounds = [DpSgdEvent(1.5, 0.05, 20, 1.0)] * 3
        assert self.eps(rounds) == self.eps([DpSgdEvent(1.5, 0.05, 60, 1.0)])
        assert self.eps([B, A]) == pytest.approx(self.eps([A, B]), rel=1e-9)

    def test_unknown_accountant_names_are_rejected(self) -> None:
        for bad in (self.accountant.upper(), f" {self.accountant}", f"{self.accountant}2", "gdp"):
            with pytest.raises(ValueError, match="Unknown accountant"):
                epsilon([A], DELTA, bad)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="Unknown accountant"):
                epsilon([], DELTA, bad)  # type: ignore[arg-type]  # even with nothing to account

    @pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 1.5, math.nan])
    def test_delta_outside_0_1_is_rejected(self, delta: float) -> None:
        with pytest.raises(ValueError, match="Delta must be in"):
            self.eps([A], delta)
        with pytest.raises(ValueError, match="Delta must be in"):
            self.eps([], delta)

    @pytest.mark.parametrize(("change", "message"), INVALID_EVENTS)
    def test_invalid_events_are_rejected(self, change: dict[str, float], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            self.eps([A, _event(**change)])

    @pytest.mark.parametrize(("history", "delta"), MODERATE, ids=_ids(MODERATE))
    def test_agrees_with_dp_accounting(self, history: History, delta: float) -> None:
        ours = history_epsilon(history, delta, self.accountant)  # type: ignore[arg-type]
        tight, loose = reference(history, delta, "pld"), reference(history, delta, "rdp")
        assert tight < loose  # the references themselves: RDP is the looser bound
        assert tight - 0.05 <= ours <= loose * (1 + 1e-9)
        self.assert_matches_reference(ours, tight, loose)


class TestPld(AccountantContract):
    accountant = "pld"

    def assert_matches_reference(self, ours: float, tight: float, loose: float) -> None:
        # pessimistic discretization on a coarser grid: never below the fine value, barely above
        assert tight <= ours <= tight + 0.02

    @pytest.mark.parametrize(("history", "delta"), WIDE, ids=_ids(WIDE))
    def test_is_dp_accountings_pld_on_the_same_grid(self, history: History, delta: float) -> None:
        # the same operations as PLDAccountant's, in the same order: the same number to the bit
        assert history_epsilon(history, delta, "pld") == reference(history, delta, "pld", grid=1e-3)

    def test_one_step_pld_is_built_once_and_self_composed_to_dp_accountings_bit(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A site's growing history (5 rounds of 13 steps, then other σ and q): each (σ, q) costs one
        one-step PLD, and every ε is exactly what a from-scratch PLDAccountant reports."""
        monkeypatch.setenv(ACCOUNTING_CACHE, "off")
        for fn in (acct._epsilon_cached, acct._epsilon_computed, acct._base_pld, acct._group_pld,
                   acct._composed_pld):
            fn.cache_clear()
        q = 1 / 13
        histories: list[History] = [((0.76, q, 13 * k),) for k in range(1, 6)]
        histories += [((0.76, q, 26), (1.2, q, 13)), ((0.76, q, 26), (1.2, q, 13), (0.9, 0.05, 40))]
        for history in histories:
            assert history_epsilon(history, DELTA, "pld") == reference(history, DELTA, "pld", grid=1e-3)
        assert acct._base_pld.cache_info().misses == 3  # (0.76, q), (1.2, q), (0.9, 0.05)


class TestRdp(AccountantContract):
    accountant = "rdp"

    def assert_matches_reference(self, ours: float, tight: float, loose: float) -> None:
        assert ours == pytest.approx(loose, rel=1e-9)
        assert ours > tight  # an upper bound, looser than the tight value

    @pytest.mark.parametrize(("history", "delta"), WIDE, ids=_ids(WIDE))
    def test_is_dp_accountings_rdp(self, history: History, delta: float) -> None:
        assert history_epsilon(history, delta, "rdp") == pytest.approx(reference(history, delta, "rdp"), rel=1e-9)


class TestPrv(AccountantContract):
    accountant = "prv"

    def assert_matches_reference(self, ours: float, tight: float, loose: float) -> None:
        # Opacus's PRV (eps_error 0.01) and dp_accounting's PLD: two tight methods, one answer
        assert ours == pytest.approx(tight, abs=0.03)
        assert ours < loose


def test_every_accountant_passes_the_contract() -> None:
    assert {c.accountant for c in AccountantContract.__subclasses__()} == set(ACCOUNTANTS)


@pytest.mark.parametrize("change", [
    pytest.param({"steps": 2.5}, id="steps=2.5"),
    pytest.param({"steps": math.nan}, id="steps=nan"),
    pytest.param({"steps": math.inf}, id="steps=inf"),
    pytest.param({"max_grad_norm": math.inf}, id="C=inf"),
])
def test_events_with_non_integer_steps_or_infinite_clipping_are_rejected(change: dict[str, float]) -> None:
    """A fractional step count would be truncated when events are grouped (ε under-reported)."""
    with pytest.raises(ValueError, match=r"whole number|positive finite"):
        _event(**change)


def test_known_value_q001_sigma4_10k_steps() -> None:
    ev = [DpSgdEvent(4.0, 0.01, 10_000, 1.0)]
    assert epsilon(ev, 1e-5, "rdp") == pytest.approx(1.036, abs=0.002)
    pld = epsilon(ev, 1e-5, "pld")
    assert pld == pytest.approx(0.95, abs=0.015)
    # pessimistic discretization: never below the fine-grid value, only slightly above
    fine = reference(((4.0, 0.01, 10_000),), 1e-5, "pld", grid=1e-4)
    assert fine <= pld <= fine + 0.02


def test_default_delta() -> None:
    assert default_delta(400) == 1e-5 and default_delta(100_000) == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="at least one record"):
        default_delta(0)


@settings(max_examples=8, deadline=None)
@given(sigmas=st.lists(st.floats(0.7, 3.0), min_size=1, max_size=2), q=st.floats(0.005, 0.3),
       steps=st.integers(1, 200))
def test_lifetime_epsilon_never_decreases_as_rounds_are_added(sigmas: list[float], q: float, steps: int) -> None:
    for acc in ("rdp", "pld"):
        history: list[DpSgdEvent] = []
        last = 0.0
        for sigma in sigmas:
            for _ in range(2):
                history.append(DpSgdEvent(sigma, q, steps, 1.0))
                now = epsilon(history, 1e-5, acc)
                assert now >= last - 1e-12
                last = now


@pytest.mark.slow  # a σ search per example: 10-20 s
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
    assert lower < SIGMA_MIN or epsilon([DpSgdEvent(lower, q, steps, 1.0)], 1e-5, accountant) > target  # type: ignore[arg-type]


CALIBRATIONS = [  # (target ε, δ, q, steps)
    pytest.param(8.0, 1e-5, 1 / 13, 65, id="400-records-batch-32-5-rounds"),
    pytest.param(1.0, 1e-5, 0.01, 10_000, id="10k-steps"),  # the search grid over-reports ε ~1.8x here
    pytest.param(3.0, 1e-5, 256 / 60_000, 14_062, id="mnist-like"),
    pytest.param(400.0, 1e-5, 0.5, 10, id="floor"),  # met with less noise than SIGMA_MIN
]


@pytest.mark.parametrize(("target", "delta", "q", "steps"), CALIBRATIONS)
def test_calibration_holds_on_the_reporting_grid_and_is_tight_there(
        monkeypatch: pytest.MonkeyPatch, target: float, delta: float, q: float, steps: int) -> None:
    """Searched on a coarse grid, checked on the reporting one: ε(σ) ≤ target there, and 1% less
    noise would overshoot there (or σ is the floor)."""
    monkeypatch.setenv(ACCOUNTING_CACHE, "off")
    sigma = calibrate_noise_multiplier(target, delta, q, steps, "pld", rel_tol=1e-2)

    def eps(s: float) -> float:
        return history_epsilon(((s, q, steps),), delta, "pld", PLD_DISCRETIZATION)

    assert eps(sigma) <= target
    assert sigma == SIGMA_MIN or eps(sigma * (1 - 1e-2)) > target
    assert (sigma == SIGMA_MIN) == (target == 400.0)


@pytest.mark.parametrize(("lo", "hi", "target"), [
    pytest.param(1.5, 1.9, 5.0, id="search-grid-optimistic-at-hi"),
    pytest.param(3.0, 3.02, 5.0, id="search-grid-pessimistic-at-lo"),
    pytest.param(1.99, 2.01, 5.0, id="right-first-time"),
    pytest.param(0.5, 0.505, 40.0, id="down-to-the-floor"),
])
def test_a_search_bracket_is_carried_over_to_the_reporting_grid(lo: float, hi: float, target: float) -> None:
    """Whatever the coarse grid got wrong, the σ returned holds on the reporting grid and is tight there
    (ε = 10/σ: the target 5 is met from σ = 2 up; the target 40 already at the floor)."""
    calls: list[float] = []

    def fine(sigma: float) -> float:
        calls.append(sigma)
        return 10.0 / sigma

    sigma = _on_reporting_grid(fine, target, lo, hi, 0.01)
    assert fine(sigma) <= target
    assert sigma == SIGMA_MIN or fine(sigma * 0.99) > target
    assert (sigma == SIGMA_MIN) == (target == 40.0)
    assert all(s >= SIGMA_MIN for s in calls)
