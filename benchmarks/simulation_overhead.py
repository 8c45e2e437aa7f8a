"""Wall time of `veil simulate` over a plain single-process loop doing the same DP work.

Both sides run the default scenario (10 sites x 5 rounds, Opacus DP-SGD, σ calibrated per
site, ε from the event history with the same accountant, FedAvg, per-site evaluation). The
plain loop has no Flower, no Ray and no store. Run from the repo root:

    .venv/bin/python benchmarks/simulation_overhead.py [--sites 10 --rounds 5]
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    # plain loop in a fresh process too, so both pay their own imports
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
         f"import simulation_overhead as b; print(b.plain_loop({args.sites}, {args.rounds}))"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent,
    )
    plain_total = time.perf_counter() - t0
    plain_work = float(proc.stdout.strip().splitlines()[-1])
    veil_wall, summary = veil_simulate(args.sites, args.rounds)
    rounds = [r["seconds"] or 0.0 for r in summary["rounds"]]
    in_rounds = sum(rounds)
    print(f"\nsimulation overhead: {args.sites} sites x {args.rounds} rounds, DP-SGD, default scenario\n")
    print("| measure | seconds |")
    print("|---|---|")
    print(f"| plain loop, whole process (imports + data + DP work) | {plain_total:.1f} |")
    print(f"| plain loop, DP work only | {plain_work:.1f} |")
    print(f"| `veil simulate`, whole process | {veil_wall:.1f} |")
    print(f"| `veil simulate`, round 1 (includes Ray start-up, site σ calibration) | {rounds[0]:.1f} |")
    if len(rounds) > 1:
        steady = sum(rounds[1:]) / (len(rounds) - 1)
        print(f"| `veil simulate`, mean of later rounds | {steady:.1f} |")
    print(f"| `veil simulate`, outside rounds (imports, partition, store, teardown) | "
          f"{veil_wall - in_rounds:.1f} |")
    print(f"\nratio veil simulate / plain loop (whole processes): {veil_wall / plain_total:.2f}x "
          f"(goal <= 1.25x)")
    print(f"final accuracy {summary['rounds'][-1]['accuracy']:.4f}, worst site ε "
          f"{max(s['epsilon'] for s in summary['sites']):.3f}")


if __name__ == "__main__":
    main()
