"""How fast Veil answers "how much ε has each site spent?" for 10 / 100 / 1,000 sites × 100 rounds.

Three measurements per accountant (pld, rdp, prv):

* answer: ``veil budget``'s query on a run store holding N sites × 100 rounds of privacy
  events. Each site computed its lifetime ε when it charged its ledger, so answering is one
  indexed scan. This is the number the "about a second" goal is about.
* update: what a site pays per round to keep that running ε, i.e. one ``epsilon()`` call
  on its growing history (median over a site's 100 rounds; caches warm as in a real site).
* cold: recomputing every site's ε from its raw events with empty caches (what an auditor
  does once). Measured on as many sites as fit in a time box, then scaled to N.

Histories are deliberately unfriendly: every site has its own data size (so its own q) and
runs 4 runs of 25 rounds with a different σ each, so no two sites share a cached result.

A second section (``--site-only`` runs just it) prices one site's accounting for a run: 400
records, batch 32, 5 rounds of 1 epoch, target ε 8 at δ 1e-5, PLD. Calibration, the budget
pre-flight's ledger questions (past requests, affordable rounds, spend, projection, head) and
one ``epsilon()`` per round, before and after this code's caches, as ratios from one run:

* before: σ searched on the reporting grid, the one-step PLD rebuilt for every step count, no
  disk cache, each ledger question verifying the chain itself (the code as it was);
* after, cold: a new process with an empty disk cache;
* after, warm disk: a new process (in-process caches cleared) whose disk cache an earlier
  process filled (a temporary directory; everywhere else this benchmark runs with the disk
  cache off, so it measures computation).

CPU seconds of this process (``time.process_time``), best of ``--repeat``: the machine is shared.

    python benchmarks/accounting.py [--rounds 100] [--cold-budget 20] [--site-only] [--repeat 3]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from privacy import DpSgdEvent, calibrate_noise_multiplier, epsilon
from privacy import accounting as A
from privacy import calibration as C
from privacy.ledger import SiteLedger
from veil.env import ACCOUNTING_CACHE

SIZES = (10, 100, 1000)


def site_history(rng: random.Random, rounds: int) -> list[DpSgdEvent]:
    n = rng.randint(200, 5000)
    batches = -(-n // 32)
    q = 1.0 / batches
    events = []
    for run in range(4):
        sigma = round(rng.uniform(0.7, 1.5), 4) + run * 1e-3
        events += [DpSgdEvent(sigma, q, batches, 1.0)] * (rounds // 4)
    return events


def clear_caches() -> None:
    for fn in (A._epsilon_cached, A._base_pld, A._group_pld, A._composed_pld, A._rdp_one_step):
        getattr(fn, "cache_clear", lambda: None)()  # the "before" section swaps in an uncached _base_pld


def time_answer(num_sites: int, rounds: int) -> float:
    """Fill a SQLite run store with num_sites × rounds privacy events; time budget_rows()."""
    from server.read.summary import budget_rows
    from server.store import RunStore
    from server.store import schema as S

    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(f"sqlite:///{tmp}/b.db")
        run_id = store.create_run(name="bench", spec={}, spec_hash="0" * 64, seed=0,
                                  num_sites=num_sites, num_rounds=rounds)
        with store.session() as s:
            sites = [S.Site(run_id=run_id, site_key=f"site-{i}", dataset_id=f"{i:016x}")
                     for i in range(num_sites)]
            s.add_all(sites)
            s.flush()
            rows = [
                {"run_id": run_id, "round_number": r, "site_id": site.id, "noise_multiplier": 1.0,
                 "sample_rate": 0.01, "steps": 100, "max_grad_norm": 1.0, "delta": 1e-5,
                 "accountant": "pld", "accountant_version": "x", "reported_epsilon": 0.01 * r,
                 "dataset_id": site.dataset_id, "lifetime_epsilon": 0.01 * r, "lifetime_delta": 1e-5,
                 "ledger_accountant": "pld", "epsilon_cap": 10.0, "mechanism": "dp-sgd",
                 "sampling": "poisson"}
                for site in sites for r in range(1, rounds + 1)
            ]
            s.execute(S.PrivacyEvent.__table__.insert(), rows)
        start = time.perf_counter()
        answer = budget_rows(store)
        elapsed = time.perf_counter() - start
        assert len(answer) == num_sites and all(r.spent == 0.01 * rounds for r in answer)
        store.close()
    return elapsed


def time_update(histories: list[list[DpSgdEvent]], accountant: str, max_sites: int) -> float:
    """Median seconds for one site's per-round ε update, over its whole history."""
    times = []
    clear_caches()
    for events in histories[:max_sites]:
        for r in range(1, len(events) + 1):
            t = time.perf_counter()
            epsilon(events[:r], 1e-5, accountant)  # type: ignore[arg-type]
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_cold(histories: list[list[DpSgdEvent]], accountant: str, budget_s: float) -> tuple[float, int]:
    """Seconds to recompute ε for all histories from scratch (scaled if the box runs out)."""
    clear_caches()
    done, start = 0, time.perf_counter()
    for events in histories:
        epsilon(events, 1e-5, accountant)  # type: ignore[arg-type]
        done += 1
        if time.perf_counter() - start > budget_s:
            break
    elapsed = time.perf_counter() - start
    return elapsed * len(histories) / done, done


# -- one site's accounting for one run: before and after ------------------------------------
SITE_N, SITE_BATCH, SITE_ROUNDS, SITE_TARGET, SITE_DELTA = 400, 32, 5, 8.0, 1e-5
FP = "f" * 64


def clear_all() -> None:
    """Everything a new process would not have (the disk cache aside)."""
    clear_caches()
    for fn in (A._epsilon_computed, C._calibrate):
        fn.cache_clear()


@contextmanager
def before_mode() -> Iterator[None]:
    """The code as it was: reporting-grid search, one-step PLD rebuilt per step count, no disk cache."""
    saved = (C.SEARCH_GRID, A._base_pld, os.environ.get(ACCOUNTING_CACHE))
    C.SEARCH_GRID = A.PLD_DISCRETIZATION
    A._base_pld = A._base_pld.__wrapped__  # type: ignore[assignment]
    os.environ[ACCOUNTING_CACHE] = "off"
    try:
        yield
    finally:
        C.SEARCH_GRID, A._base_pld = saved[0], saved[1]
        if saved[2] is None:
            os.environ.pop(ACCOUNTING_CACHE, None)
        else:
            os.environ[ACCOUNTING_CACHE] = saved[2]


def ledger_questions(ledger: SiteLedger, planned: DpSgdEvent, one_view: bool) -> None:
    """What ``budget()`` asks: past requests, affordable rounds, head, spend, projection."""
    q = ledger.view() if one_view else ledger
    q.entries()
    q.affordable_rounds(FP, planned, SITE_ROUNDS, cap=50.0, delta=SITE_DELTA)
    q.head()
    q.spent(FP, delta=SITE_DELTA)
    q.project(FP, [planned] * SITE_ROUNDS, delta=SITE_DELTA)


def site_run(ledger: SiteLedger, one_view: bool) -> None:
    """Calibration, the pre-flight's ledger questions, one ε per round (what the charges compute)."""
    q = 1.0 / -(-SITE_N // SITE_BATCH)
    steps = -(-SITE_N // SITE_BATCH)
    sigma = calibrate_noise_multiplier(SITE_TARGET, SITE_DELTA, q, steps * SITE_ROUNDS)
    planned = DpSgdEvent(sigma, q, steps, 1.0)
    ledger_questions(ledger, planned, one_view)
    for r in range(1, SITE_ROUNDS + 1):
        epsilon([planned] * r, SITE_DELTA)


def cpu(fn: Callable[[], object], repeat: int, prepare: Callable[[], object] = clear_all) -> float:
    best = float("inf")
    for _ in range(repeat):
        prepare()
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def site_section(repeat: int) -> None:
    q = 1.0 / -(-SITE_N // SITE_BATCH)
    steps = -(-SITE_N // SITE_BATCH) * SITE_ROUNDS

    def calibrate() -> float:
        return calibrate_noise_multiplier(SITE_TARGET, SITE_DELTA, q, steps)

    with tempfile.TemporaryDirectory() as tmp:
        ledger = SiteLedger(Path(tmp) / "site.ledger", site_id="bench")
        old_ev = DpSgdEvent(1.3, 0.02, 50, 1.0)  # a ledger with history: 20 charges of an earlier run
        for r in range(20):
            ledger.charge(FP, old_ev, delta=SITE_DELTA, cap=None, round_number=r)
        disk = Path(tmp) / "accounting-cache"
        rows: list[tuple[str, float, float, float]] = []
        with before_mode():
            b_cal = cpu(calibrate, repeat)
            b_site = cpu(lambda: site_run(ledger, one_view=False), repeat)
            sigma = calibrate()
        os.environ[ACCOUNTING_CACHE] = "off"
        a_cal = cpu(calibrate, repeat)
        a_site = cpu(lambda: site_run(ledger, one_view=True), repeat)
        assert calibrate() == sigma, "the search grid changed σ"
        os.environ[ACCOUNTING_CACHE] = str(disk)
        clear_all()
        site_run(ledger, one_view=True)  # an earlier process fills the disk cache
        w_cal = cpu(calibrate, repeat)
        w_site = cpu(lambda: site_run(ledger, one_view=True), repeat)
        rows += [("one calibration", b_cal, a_cal, w_cal),
                 ("calibration + pre-flight + 5 ε", b_site, a_site, w_site)]

        planned = DpSgdEvent(sigma, q, steps // SITE_ROUNDS, 1.0)
        warm = lambda: ledger_questions(ledger, planned, True)  # noqa: E731  (ε caches warm: the ledger alone)
        warm()
        b_led = cpu(lambda: [ledger_questions(ledger, planned, False) for _ in range(10)], repeat, warm) / 10
        a_led = cpu(lambda: [ledger_questions(ledger, planned, True) for _ in range(10)], repeat, warm) / 10
        rows.append(("pre-flight ledger questions, 20 entries (5 chain verifications, then 1)", b_led, a_led,
                     math.nan))
        ledger.close()
        os.environ[ACCOUNTING_CACHE] = "off"
    print(f"One site's accounting: {SITE_N} records, batch {SITE_BATCH}, {SITE_ROUNDS} rounds x 1 epoch, "
          f"target ε {SITE_TARGET:g} at δ {SITE_DELTA:g}, PLD (σ = {sigma:.6f} before and after). "
          f"CPU seconds, best of {repeat}.")
    print()
    print("| what | before | after, cold | after / before | after, fresh process, disk cache warm "
          "| warm / before |")
    print("|---|---:|---:|---:|---:|---:|")
    for what, b, a, w in rows:
        warm = "n/a | n/a" if math.isnan(w) else f"{w:.3f} s | {w / b:.2f}x"
        print(f"| {what} | {b:.3f} s | {a:.3f} s | {a / b:.2f}x | {warm} |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--cold-budget", type=float, default=20.0, help="seconds per cold cell")
    ap.add_argument("--site-only", action="store_true", help="only the one-site section")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting RDP's per-order notices
    logging.getLogger().setLevel(logging.ERROR)  # dp_accounting's connect-the-dots notices
    os.environ[ACCOUNTING_CACHE] = "off"  # computation is measured, never the user's disk cache
    epsilon([DpSgdEvent(1.0, 0.1, 1, 1.0)], 1e-5, "pld")  # imports out of the way
    site_section(args.repeat)
    if args.site_only:
        return
    rng = random.Random(0)
    histories = [site_history(rng, args.rounds) for _ in range(max(SIZES))]
    epsilon(histories[0][:1], 1e-5, "pld")  # imports out of the way
    epsilon(histories[0][:1], 1e-5, "prv")

    answers = {n: time_answer(n, args.rounds) for n in SIZES}
    print(f"ε per site for N sites x {args.rounds} rounds (4 runs of {args.rounds // 4} rounds, "
          "distinct σ and q per site), 1 CPU core")
    print()
    print("| accountant | N sites | answer (`veil budget`, stored running ε) | per-round update at a site "
          "| cold recompute from raw events |")
    print("|---|---:|---:|---:|---:|")
    for acc in ("pld", "rdp", "prv"):
        update = time_update(histories, acc, 1 if acc == "prv" else 3)
        for n in SIZES:
            cold, done = time_cold(histories[:n], acc, args.cold_budget)
            note = "" if done == n else f" (scaled from {done})"
            print(f"| {acc} | {n} | {answers[n]:.3f} s | {update * 1000:.1f} ms | {cold:.1f} s{note} |")


if __name__ == "__main__":
    main()
