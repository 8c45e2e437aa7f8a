"""The CUDA path of site training, checked on a machine with a GPU.

Two sites holding 2,000 of the built-in digits each run the real ClientApp handlers in this
process (budget pre-flight, DP-SGD training with noise from OS entropy, evaluation) for two
rounds, with FedAvg between rounds, on ``--device`` (cuda by default). Then, on that device:
two trainings with the same task seed must release different models; two seeded
(reproducible, not private) trainings must be identical; the noise on all-zero gradients
must have the calibrated standard deviation; and one DP-SGD epoch is timed against the CPU.

    python benchmarks/cuda_site.py [--device cuda] [--out results.json]

Needs no Ray and no store: only what a site itself runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from torch.utils.data import TensorDataset

from client.app import build_client_app
from client.data import load_mnist_5k
from client.device import resolve_device
from client.site import Site
from client.training import train_dp_sgd
from privacy.policy import SitePolicy
from privacy.randomness import RoundRandomness
from tests.sitekit import _incoming, task
from veil import protocol as P
from veil.models import build_model


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().cpu() for p in model.parameters()])


def federation(device: torch.device, tmp: Path) -> dict[str, object]:
    digits = load_mnist_5k()
    order = np.random.default_rng(0).permutation(len(digits))  # the digits are sorted by label
    sites = []
    for k in range(2):
        sel = order[k * 2500:(k + 1) * 2500]
        x, y = torch.from_numpy(digits.features[sel]), torch.from_numpy(digits.labels[sel])
        sites.append(Site(f"site-{k}", TensorDataset(x[:2000], y[:2000]), TensorDataset(x[2000:], y[2000:]),
                          device, tmp / f"site-{k}.ledger", SitePolicy(epsilon_cap=20.0)))
    apps = [build_client_app(lambda _c, s=s: s) for s in sites]
    contexts = [Context(run_id=1, node_id=k, node_config={}, state=RecordDict(), run_config={})
                for k in range(2)]
    t = task(arch="mlp", batch_size=64, learning_rate=0.5, noise_multiplier=0.0, target_epsilon=8.0,
             planned_rounds=2, run_ref="cuda-check")
    preflight = []
    for app, ctx in zip(apps, contexts, strict=True):
        reply = app(_incoming(RecordDict({P.TASK: t.to_config()}), P.BUDGET_QUERY), ctx)
        status = P.BudgetStatus.from_config(reply.content[P.BUDGET])  # type: ignore[arg-type]
        preflight.append({"site": status.site_id, "sigma": status.noise_multiplier, "q": status.sample_rate,
                          "affordable": status.affordable_rounds})
    model = build_model("mlp", seed=0)
    rounds = []
    for rnd in (1, 2):
        start = time.perf_counter()
        states, weights, eps, seconds = [], [], [], []
        for app, ctx in zip(apps, contexts, strict=True):
            config = ConfigRecord(dict(t.to_config()))
            config["server-round"] = rnd
            msg = _incoming(RecordDict({P.ARRAYS: ArrayRecord(model.state_dict()), P.TASK: config}), "train")
            out = app(msg, ctx).content
            report = P.PrivacyReport.from_config(out[P.PRIVACY])  # type: ignore[arg-type]
            info = P.SiteInfo.from_config(out[P.SITE])  # type: ignore[arg-type]
            assert info.device == device.type, info
            states.append(out[P.ARRAYS].to_torch_state_dict())  # type: ignore[union-attr]
            weights.append(float(out[P.METRICS][P.NUM_EXAMPLES]))  # type: ignore[index]
            eps.append(report.epsilon)
            seconds.append(info.seconds)
            assert report.rng == "os-entropy"
        total = sum(weights)
        model.load_state_dict({k: sum(w * s[k] for w, s in zip(weights, states, strict=True)) / total
                               for k in states[0]})
        accs = []
        for app, ctx in zip(apps, contexts, strict=True):
            msg = _incoming(RecordDict({P.ARRAYS: ArrayRecord(model.state_dict()),
                                        P.TASK: ConfigRecord({"arch": "mlp"})}), "evaluate")
            met = app(msg, ctx).content[P.METRICS]
            assert isinstance(met, MetricRecord)
            accs.append(float(met[P.EVAL_ACC]))  # type: ignore[arg-type]
        rounds.append({"round": rnd, "accuracy": sum(accs) / len(accs), "max_epsilon": max(eps),
                       "site_train_seconds": seconds, "wall_seconds": time.perf_counter() - start})
    return {"preflight": preflight, "rounds": rounds}


def trained(device: torch.device, data: TensorDataset, randomness: RoundRandomness, sigma: float = 1.0,
            epochs: int = 1, arch: str = "mlp") -> tuple[torch.Tensor, float]:
    model = build_model(arch, seed=0)
    out = train_dp_sgd(model, data, noise_multiplier=sigma, max_grad_norm=1.0, batch_size=64, local_epochs=epochs,
                       learning_rate=0.5, momentum=0.0, device=device, randomness=randomness)
    return flat(model), out.seconds


def checks(device: torch.device) -> dict[str, object]:
    digits = load_mnist_5k()
    sel = np.random.default_rng(1).permutation(len(digits))[:2000]
    data = TensorDataset(torch.from_numpy(digits.features[sel]), torch.from_numpy(digits.labels[sel]))
    a, _ = trained(device, data, RoundRandomness.from_os())
    b, _ = trained(device, data, RoundRandomness.from_os())
    s1, _ = trained(device, data, RoundRandomness.from_seed(7, "site-0", 1))
    s2, _ = trained(device, data, RoundRandomness.from_seed(7, "site-0", 1))
    # all-zero inputs: every clipped per-sample gradient of a bias-free layer is 0, so the step is noise alone
    n, sigma, clip, lr = 512, 2.0, 0.5, 1.0
    layer = torch.nn.Linear(64, 64, bias=False)
    before = layer.weight.detach().clone()
    zeros = TensorDataset(torch.zeros(n, 64), torch.zeros(n, dtype=torch.long))
    train_dp_sgd(layer, zeros, noise_multiplier=sigma, max_grad_norm=clip, batch_size=n, local_epochs=1,
                 learning_rate=lr, momentum=0.0, device=device, randomness=RoundRandomness.from_os())
    step_std = float((layer.weight.detach().cpu() - before).std())
    timing = {}
    for arch in ("mlp", "cnn"):
        for dev in (device, torch.device("cpu")):
            trained(dev, data, RoundRandomness.from_os(), arch=arch)  # warm-up
            _, secs = trained(dev, data, RoundRandomness.from_os(), arch=arch)
            timing[f"{arch} on {dev.type}"] = secs
    return {
        "same_seed_private_runs_differ": not torch.equal(a, b),
        "seeded_runs_identical": torch.equal(s1, s2),
        "seeded_runs_max_abs_diff": float((s1 - s2).abs().max()),
        "noise_step_std": step_std, "noise_step_std_expected": lr * sigma * clip / n,
        "dp_sgd_epoch_seconds_2000_digits": timing,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = resolve_device(args.device)
    report: dict[str, object] = {"torch": torch.__version__, "device": str(device),
                                 "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    with tempfile.TemporaryDirectory() as tmp:
        report["federation"] = federation(device, Path(tmp))
    report["checks"] = checks(device)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
