"""How fast the dashboard answers on a big store: 100 runs x 100 rounds x 100 sites.

Fills a run store with rows shaped exactly like a real run's (every site trains and
evaluates every round: participation, privacy events with per-site σ and q, per-site and
aggregate metrics), then times each read command end to end, as a researcher would run it:
a fresh `veil ...` process, Python start-up included (the median of --repeat runs).

    .venv/bin/python benchmarks/dashboard.py                      # SQLite in a temp dir
    .venv/bin/python benchmarks/dashboard.py --store postgresql://postgres@127.0.0.1:5432/test

The PostgreSQL store should be an empty database (one is made per run of this script when
the URL names the server's ``test`` database: ``veil_bench_<random>``, dropped at the end).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.lifecycle import derive_site_epsilons  # noqa: E402
from server.store import RunStore  # noqa: E402
from server.store import schema as S  # noqa: E402

CHUNK = 20_000


def fill(store: RunStore, runs: int, rounds: int, sites: int, seed: int = 0) -> dict[str, int]:
    rng = random.Random(seed)
    site_n = [rng.randint(200, 5000) for _ in range(sites)]
    site_q = [min(1.0, 32 / n) for n in site_n]
    site_sigma = [round(0.6 + 0.6 * rng.random(), 4) for _ in range(sites)]
    datasets = [uuid.UUID(int=rng.getrandbits(128)).hex[:16] for _ in range(sites)]
    counts = dict.fromkeys(("runs", "rounds", "sites", "participation", "privacy_events", "metrics"), 0)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    spec = json.dumps({"name": "bench", "model": {"arch": "mlp"}, "data": {"source": "mnist-5k"},
                       "federation": {"sites": sites, "rounds": rounds}, "privacy": {"accountant": "pld"}})
    lifetime = [0.0] * sites

    for r in range(runs):
        with store.engine.begin() as conn:
            created = start + timedelta(hours=r)
            run_id = conn.execute(insert(S.Run).returning(S.Run.id), [{
                "name": f"bench-{r % 7}", "status": "completed" if r % 10 else "failed", "spec_json": spec,
                "spec_hash": f"{r:064x}", "code_version": "bench", "seed": r, "num_sites": sites,
                "num_rounds": rounds, "mode": "simulation", "created_at": created, "started_at": created,
                "ended_at": created + timedelta(minutes=30), "wall_seconds": 1800.0}]).scalar_one()
            site_ids = list(conn.execute(insert(S.Site).returning(S.Site.id), [{
                "run_id": run_id, "site_key": f"site-{i}", "num_train": site_n[i], "num_test": site_n[i] // 4,
                "device": "cpu", "delta": 1e-5, "dataset_id": datasets[i], "epsilon_cap": 1e6,
                "budget_delta": 1e-5, "budget_accountant": "pld", "spent_before": lifetime[i],
                "first_seen_at": created} for i in range(sites)]).scalars())
            conn.execute(insert(S.Round), [{
                "run_id": run_id, "number": k, "status": "completed", "started_at": created,
                "ended_at": created, "seconds": 10.0, "sites_sampled": sites, "sites_ok": sites,
                "examples": sum(site_n), "bytes_down": 400_000 * sites, "bytes_up": 400_000 * sites}
                for k in range(1, rounds + 1)])
            part, events, metrics = [], [], []
            for k in range(1, rounds + 1):
                for i, sid in enumerate(site_ids):
                    steps = math.ceil(1 / site_q[i])
                    run_eps = 0.8 * math.sqrt(k)
                    lifetime[i] += 0.1
                    for phase in ("train", "evaluate"):
                        part.append({"run_id": run_id, "round_number": k, "site_id": sid, "phase": phase,
                                     "status": "ok", "num_examples": site_n[i], "seconds": 1.0,
                                     "bytes_down": 400_000, "bytes_up": 400_000, "reason": None,
                                     "reason_code": None})
                    events.append({
                        "run_id": run_id, "round_number": k, "site_id": sid, "mechanism": "dp-sgd",
                        "sampling": "poisson", "noise_multiplier": site_sigma[i], "sample_rate": site_q[i],
                        "steps": steps, "max_grad_norm": 1.0, "delta": 1e-5, "accountant": "pld",
                        "accountant_version": "dp-accounting 0.6.0", "reported_epsilon": run_eps,
                        "dataset_id": datasets[i], "ledger_entry": f"{run_id}-{k}-{i}",
                        "lifetime_epsilon": lifetime[i], "lifetime_delta": 1e-5, "ledger_accountant": "pld",
                        "epsilon_cap": 1e6, "created_at": created})
                    for phase, name, value in (("train", "train-loss", 1.0 / k), ("train", "epsilon", run_eps),
                                               ("evaluate", "eval-loss", 1.0 / k),
                                               ("evaluate", "eval-acc", 1 - 0.5 / k)):
                        metrics.append({"run_id": run_id, "round_number": k, "site_id": sid, "phase": phase,
                                        "name": name, "value": value, "encrypted": False})
                for name, value in (("train-loss", 1.0 / k), ("epsilon", 0.8 * math.sqrt(k)),
                                    ("eval-loss", 1.0 / k), ("eval-acc", 1 - 0.5 / k)):
                    metrics.append({"run_id": run_id, "round_number": k, "site_id": None, "phase": "aggregate",
                                    "name": name, "value": value, "encrypted": False})
            for table, rows in ((S.Participation, part), (S.PrivacyEvent, events), (S.Metric, metrics)):
                for j in range(0, len(rows), CHUNK):
                    conn.execute(insert(table), rows[j:j + CHUNK])
        derive_site_epsilons(store, run_id)  # what end_run does when a real run ends
        counts["runs"] += 1
        counts["rounds"] += rounds
        counts["sites"] += sites
        counts["participation"] += len(part)
        counts["privacy_events"] += len(events)
        counts["metrics"] += len(metrics)
        if (r + 1) % 10 == 0:
            print(f"  filled {r + 1}/{runs} runs", file=sys.stderr, flush=True)
    if store.engine.dialect.name == "postgresql":
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE"))
    return counts


def time_cli(args: list[str], url: str, repeat: int) -> tuple[float, int]:
    veil = [sys.executable, "-m", "veil.cli"]
    times, size = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        done = subprocess.run([*veil, *args, "--store", url], capture_output=True, text=True, cwd=ROOT,
                              check=False)
        times.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise SystemExit(f"veil {' '.join(args)} failed: {done.stderr.strip()}")
        size = len(done.stdout)
    return statistics.median(times), size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", help="store URL (default: a fresh SQLite file in a temp dir)")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--sites", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--reuse", action="store_true",
                    help="--store already holds the filled store: time the commands only")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    url, drop = args.store or f"sqlite:///{Path(tmp.name) / 'bench.db'}", None
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql" and not args.reuse:
        drop = f"veil_bench_{uuid.uuid4().hex[:10]}"
        admin = create_engine(parsed, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{drop}"'))
        url = parsed.set(database=drop).render_as_string(hide_password=False)
    try:
        store = RunStore(url)
        t0 = time.perf_counter()
        counts = {} if args.reuse else fill(store, args.runs, args.rounds, args.sites)
        fill_s = time.perf_counter() - t0
        store.close()
        last = str(args.runs)
        print(f"\nstore {make_url(url).render_as_string(hide_password=True)} ({store.engine.dialect.name}); "
              f"filled in {fill_s:.0f}s: " + ", ".join(f"{v:,} {k}" for k, v in counts.items()))
        commands = [
            ["runs"], ["runs", "--limit", "0"], ["runs", "show", last], ["budget"], ["budget", "--run", last],
            ["compare", last, str(args.runs - 1)], ["metrics", last],
        ]
        print(f"\n{'command':<36} {'seconds':>8} {'output':>9}   (median of {args.repeat} fresh processes)")
        for cmd in commands:
            seconds, size = time_cli(cmd, url, args.repeat)
            print(f"veil {' '.join(cmd):<31} {seconds:>8.2f} {size:>8,}B")
        startup, _ = time_cli(["db", "upgrade"], url, args.repeat)
        print(f"{'(start-up: veil db upgrade, no-op)':<36} {startup:>8.2f}")
    finally:
        if drop:
            with admin.connect() as conn:
                conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                             {"n": drop})
                conn.execute(text(f'DROP DATABASE IF EXISTS "{drop}"'))
        tmp.cleanup()


if __name__ == "__main__":
    main()
