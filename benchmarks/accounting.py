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

    python benchmarks/accounting.py [--rounds 100] [--cold-budget 20]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from privacy import DpSgdEvent, epsilon
from privacy import accounting as A

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
        fn.cache_clear()


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--cold-budget", type=float, default=20.0, help="seconds per cold cell")
    args = ap.parse_args()
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting RDP's per-order notices
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
