"""The model zoo's tabular entry: logistic regression under DP-SGD on a real tabular data set
(scikit-learn's bundled Wisconsin breast-cancer records), the way a site trains it."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from client.training import evaluate, poisson_plan, train_dp_sgd
from privacy import calibrate_noise_multiplier, default_delta, epsilon
from privacy.randomness import RoundRandomness
from veil.models import build_model, count_parameters
from veil.spec import ModelSpec


def _split() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    cut = int(0.8 * len(y))
    mean, std = x[:cut].mean(0), x[:cut].std(0)  # what `standardize: true` does at a site
    x = ((x - mean) / std).astype(np.float32)
    as_set = lambda a, b: TensorDataset(torch.from_numpy(a), torch.from_numpy(b.astype(np.int64)))  # noqa: E731
    return as_set(x[:cut], y[:cut]), as_set(x[cut:], y[cut:])


def test_the_linear_model_learns_tabular_data_under_dp_sgd() -> None:
    train, test = _split()
    spec = ModelSpec(arch="linear", in_features=30, num_classes=2)
    model = build_model(spec.key, seed=0)
    assert count_parameters(model) == spec.parameters() == 62
    before = evaluate(model, test, torch.device("cpu")).accuracy
    n, rounds = len(train), 5
    q, steps = poisson_plan(n, 32, 2)
    sigma = calibrate_noise_multiplier(4.0, default_delta(n), q, steps * rounds)
    events = []
    for _ in range(rounds):
        out = train_dp_sgd(model, train, noise_multiplier=sigma, max_grad_norm=1.0, batch_size=32, local_epochs=2,
                           learning_rate=0.5, momentum=0.0, device=torch.device("cpu"),
                           randomness=RoundRandomness.from_os())
        events.append(out.event)
    assert epsilon(events, default_delta(n)) <= 4.0
    after = evaluate(model, test, torch.device("cpu")).accuracy
    assert after >= 0.9 and after > before  # ε ≤ 4 on 455 records: a useful classifier
