"""The sweep that chose the default scenario's training settings (issue 16), rerunnable.

Every setting trains the default scenario's federation (mnist-5k, 10 sites, Dirichlet α = 0.5,
20% held out per site, seed 0 partition) with DP-SGD at every site, σ calibrated per site so
its ε over the whole run is 8 (δ = 1e-5), in one process (``benchmarks/federated.py``: Veil's
own training, calibration and server step, without Flower). One line per setting: the pooled
held-out accuracy, the worst site's ε recomputed from its events, seconds. With ``--seeds``,
the median over seeds.

    python benchmarks/sweep.py [--only mlp|mlp2|mlp3|cnn] [--seeds 0] [--out sweep.jsonl]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from federated import Setting, federated, site_data, with_server

from veil.spec import load_scenario


def grid(only: str | None) -> list[Setting]:
    """The settings tried: one knob at a time around a 30-round base, then the server optimisers."""
    base = Setting(rounds=30, local_epochs=1, batch_size=32, learning_rate=0.5)
    mlp = [
        replace(base, rounds=5),  # the old default
        base,
        replace(base, rounds=15),
        replace(base, rounds=60),
        replace(base, local_epochs=2),
        replace(base, batch_size=64, learning_rate=1.0),
        replace(base, batch_size=128, learning_rate=2.0),
        replace(base, batch_size=64, learning_rate=1.0, rounds=60),
        replace(base, learning_rate=1.0),
        replace(base, learning_rate=0.25),
        replace(base, max_grad_norm=0.5, learning_rate=1.0),
        replace(base, max_grad_norm=2.0, learning_rate=0.25),
        with_server(base, "fedavgm", 1.0, 0.5),
        with_server(base, "fedavgm", 0.5, 0.9),
        with_server(base, "fedavgm", 1.0, 0.9),
        with_server(base, "fedadam", 0.003),
        with_server(base, "fedadam", 0.01),
        with_server(base, "fedadam", 0.03),
        with_server(base, "fedyogi", 0.01),
        with_server(replace(base, batch_size=64, learning_rate=1.0), "fedavgm", 0.5, 0.9),
        with_server(replace(base, batch_size=64, learning_rate=1.0), "fedadam", 0.01),
    ]
    best = replace(base, batch_size=64, learning_rate=1.0)  # the first stage's best
    mlp2 = [  # second stage, around it: server learning rates and momentum, batch 128, more rounds
        with_server(best, "fedavgm", 2.0, 0.0),
        with_server(replace(best, learning_rate=0.5), "fedavgm", 2.0, 0.0),
        with_server(best, "fedavgm", 0.2, 0.9),
        with_server(best, "fedadam", 0.1),
        replace(best, rounds=40, batch_size=128, learning_rate=2.0),
        replace(best, rounds=40, max_grad_norm=0.5, learning_rate=2.0),
    ]
    lr2 = with_server(replace(best, learning_rate=0.5), "fedavgm", 2.0, 0.0)  # the second stage's best
    mlp3 = [  # third stage, 3 seeds: a larger server step, smaller local steps
        best,
        lr2,
        with_server(replace(best, learning_rate=0.25), "fedavgm", 4.0, 0.0),
        with_server(replace(best, learning_rate=0.25), "fedavgm", 2.0, 0.0),
        with_server(replace(best, learning_rate=0.5), "fedavgm", 3.0, 0.0),
        replace(lr2, batch_size=128, rounds=40),
        replace(lr2, rounds=50),
        replace(lr2, max_grad_norm=0.5, learning_rate=1.0),
        replace(lr2, local_epochs=2),
    ]
    cnn_base = replace(base, arch="cnn", learning_rate=1.0)
    cnn = [
        cnn_base,
        replace(cnn_base, learning_rate=2.0),
        replace(cnn_base, batch_size=64, learning_rate=2.0),
        with_server(cnn_base, "fedavgm", 0.5, 0.9),
        with_server(cnn_base, "fedadam", 0.01),
    ]
    return {"mlp": mlp, "mlp2": mlp2, "mlp3": mlp3, "cnn": cnn}.get(only or "", mlp + mlp2 + mlp3 + cnn)


def main() -> None:
    """Run the grid and print one line per setting (also appended to ``--out`` as JSON lines)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["mlp", "mlp2", "mlp3", "cnn"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    data = site_data(load_scenario())
    print(f"{'setting':78} {'accuracy':>8} {'max ε':>6} {'secs':>6}")
    for setting in grid(args.only):
        runs = [federated(data, setting, target_epsilon=args.epsilon, seed=s) for s in args.seeds]
        acc = statistics.median(r["accuracy"] for r in runs)
        eps = max(r["max_epsilon"] for r in runs)
        secs = statistics.median(r["seconds"] for r in runs)
        print(f"{setting.label():78} {acc:8.4f} {eps:6.3f} {secs:6.1f}", flush=True)
        if args.out:
            with args.out.open("a") as fh:
                fh.write(json.dumps({"setting": setting.label(), "accuracy": acc, "max_epsilon": eps,
                                     "seconds": secs, "seeds": args.seeds,
                                     "runs": [r["accuracy"] for r in runs]}) + "\n")


if __name__ == "__main__":
    main()
