"""Wall time of `veil simulate` over a plain single-process loop doing the same DP work.

Both sides run the default scenario's settings cut to 10 sites x 5 rounds (Opacus DP-SGD, σ
calibrated per site for those rounds, ε from the event history with the same accountant, the
weighted mean (the plain loop leaves out the default's FedAvgM step, one vector add), per-site
evaluation). The
plain loop has no Flower, no Ray and no store. Both read the digits from the parsed-data
cache (``client.datacache``), warmed once before timing: what every run after the first on a
machine sees. With ``--repeat N`` the two alternate N times and the table shows medians (the
ratio is the median of each pair's ratio), which is what to quote from a shared machine.
Run from the repo root:

    .venv/bin/python benchmarks/simulation_overhead.py [--sites 10 --rounds 5 --repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


def plain_loop(sites: int, rounds: int) -> float:
    import torch

    from client.training import evaluate, poisson_plan, train_dp_sgd
    from privacy import DpSgdEvent, calibrate_noise_multiplier, default_delta, epsilon
    from privacy.randomness import RoundRandomness
    from simulations.federation import SimulatedSites
    from veil.models import build_model
    from veil.spec import load_scenario

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    start = time.perf_counter()
    sc = load_scenario().with_overrides(**{"federation.sites": sites, "federation.rounds": rounds})
    sim = SimulatedSites(sc)
    all_sites = [sim.site(i) for i in range(sites)]
    t, p = sc.training, sc.privacy
    model = build_model(sc.model.key, seed=sc.seed)
    history: dict[str, list[DpSgdEvent]] = {s.site_id: [] for s in all_sites}
    for _ in range(rounds):
        states, weights = [], []
        for site in all_sites:
            n = len(site.train)
            delta = p.delta or default_delta(n)
            q, steps = poisson_plan(n, t.batch_size, t.local_epochs)
            sigma = p.noise_multiplier or calibrate_noise_multiplier(
                p.target_epsilon or 0.0, delta, q, steps * rounds, p.accountant)
            local = build_model(sc.model.key)
            local.load_state_dict(model.state_dict())
            out = train_dp_sgd(local, site.train, noise_multiplier=sigma, max_grad_norm=p.max_grad_norm,
                               batch_size=t.batch_size, local_epochs=t.local_epochs,
                               learning_rate=t.learning_rate, momentum=t.momentum,
                               device=site.device, randomness=RoundRandomness.from_os())
            history[site.site_id].append(out.event)
            epsilon(history[site.site_id], delta, p.accountant)
            states.append(local.state_dict())
            weights.append(n)
        total = sum(weights)
        model.load_state_dict({k: sum(w * s[k] for w, s in zip(weights, states, strict=True)) / total
                               for k in states[0]})
        for site in all_sites:
            evaluate(model, site.test, site.device)
    return time.perf_counter() - start


def veil_simulate(sites: int, rounds: int) -> tuple[float, dict]:
    veil = Path(sys.executable).with_name("veil")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.run(
            [str(veil), "simulate", "--sites", str(sites), "--rounds", str(rounds),
             "--store", f"sqlite:///{tmp}/veil.db", "--artifacts-dir", f"{tmp}/a", "--format", "json"],
            capture_output=True, text=True, cwd=tmp, check=False,
        )
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"veil simulate failed:\n{proc.stderr[-3000:]}")
    return wall, json.loads(proc.stdout)


def plain_process(sites: int, rounds: int) -> tuple[float, float]:
    """(whole process, DP work only) seconds of the plain loop in a fresh process, so that it
    pays its own imports as `veil simulate` does."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
         f"import simulation_overhead as b; print(b.plain_loop({sites}, {rounds}))"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent,
    )
    return time.perf_counter() - t0, float(proc.stdout.strip().splitlines()[-1])


def one_pair(sites: int, rounds: int) -> dict[str, float]:
    plain_total, plain_work = plain_process(sites, rounds)
    veil_wall, summary = veil_simulate(sites, rounds)
    secs = [r["seconds"] or 0.0 for r in summary["rounds"]]
    return {"plain_total": plain_total, "plain_work": plain_work, "veil": veil_wall, "round1": secs[0],
            "later": sum(secs[1:]) / (len(secs) - 1) if len(secs) > 1 else float("nan"),
            "outside": veil_wall - sum(secs), "ratio": veil_wall / plain_total,
            "accuracy": summary["rounds"][-1]["accuracy"],
            "epsilon": max(s["epsilon"] for s in summary["sites"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=1, help="alternate plain/veil this many times; report medians")
    args = ap.parse_args()

    subprocess.run([sys.executable, "-c", "from client.data import load_builtin; load_builtin('mnist-5k')"],
                   check=True, cwd=Path(__file__).resolve().parent.parent)  # warm the parsed-data cache
    pairs = []
    for i in range(args.repeat):
        pairs.append(one_pair(args.sites, args.rounds))
        if args.repeat > 1:
            print(f"pair {i + 1}/{args.repeat}: " + ", ".join(f"{k} {v:.2f}" for k, v in pairs[-1].items()),
                  flush=True)
    med = {k: statistics.median(p[k] for p in pairs) for k in pairs[0]}
    what = "median of " + str(args.repeat) + " runs" if args.repeat > 1 else "one run"
    print(f"\nsimulation overhead: {args.sites} sites x {args.rounds} rounds, DP-SGD, "
          f"the default scenario's settings ({what})\n")
    print("| measure | seconds |")
    print("|---|---|")
    print(f"| plain loop, whole process (imports + data + DP work) | {med['plain_total']:.1f} |")
    print(f"| plain loop, DP work only | {med['plain_work']:.1f} |")
    print(f"| `veil simulate`, whole process | {med['veil']:.1f} |")
    print(f"| `veil simulate`, round 1 (each worker's first DP-SGD step) | {med['round1']:.1f} |")
    if args.rounds > 1:
        print(f"| `veil simulate`, mean of later rounds | {med['later']:.1f} |")
    print("| `veil simulate`, outside rounds (imports, data, Ray start-up, pre-flight with σ calibration, "
          f"store, teardown) | {med['outside']:.1f} |")
    print(f"\nratio veil simulate / plain loop (whole processes): {med['ratio']:.2f}x (goal <= 1.25x)")
    print(f"final accuracy {med['accuracy']:.4f}, worst site ε {med['epsilon']:.3f}")


if __name__ == "__main__":
    main()
