"""Local DP-SGD really clips and really adds noise, and records the mechanism it ran."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from client.training import evaluate, poisson_plan, train_dp_sgd
from veil.errors import ModelNotPrivatizableError
from veil.models import build_model, ensure_privatizable

CPU = torch.device("cpu")


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(8, 3, bias=False)


def _train(model: nn.Module, data: TensorDataset, **kw: float) -> None:
    args = dict(noise_multiplier=1.0, max_grad_norm=1.0, batch_size=len(data), local_epochs=1,
                learning_rate=1.0, momentum=0.0, device=CPU, seed=1)
    args.update(kw)
    train_dp_sgd(model, data, **args)  # type: ignore[arg-type]


def test_zero_gradient_data_still_gets_noise() -> None:
    # All-zero inputs give every per-sample gradient of a bias-free linear layer exactly 0:
    # plain SGD would return the weights unchanged; DP-SGD must add N(0, σ²C²) / E[B].
    n = 64
    data = TensorDataset(torch.zeros(n, 8), torch.zeros(n, dtype=torch.long))
    model = _linear()
    before = model.weight.detach().clone()
    _train(model, data, noise_multiplier=2.0, max_grad_norm=0.5)
    delta = (model.weight.detach() - before).flatten()
    assert delta.abs().max() > 0
    expected_std = 1.0 * 2.0 * 0.5 / n  # lr·σ·C / expected batch size
    assert 0.4 * expected_std < float(delta.std()) < 2.5 * expected_std


def test_per_sample_gradients_are_clipped() -> None:
    # Huge inputs: each per-sample gradient norm is ≫ C. With q = 1 (batch = data set) and
    # tiny noise, one DP step moves the weights by at most lr·C (mean of clipped gradients).
    n, clip, lr = 32, 0.1, 1.0
    g = torch.Generator().manual_seed(0)
    x, y = 1000 * torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    data = TensorDataset(x, y)

    plain = _linear()
    before = plain.weight.detach().clone()
    nn.functional.cross_entropy(plain(x), y).backward()
    plain_step = float((lr * plain.weight.grad).norm())  # type: ignore[operator]
    assert plain_step > 10 * lr * clip

    model = _linear()
    _train(model, data, noise_multiplier=1e-6, max_grad_norm=clip, learning_rate=lr)
    dp_step = float((model.weight.detach() - before).norm())
    assert 0 < dp_step <= lr * clip * (1 + 1e-3)


def test_event_records_poisson_rate_and_steps() -> None:
    n, batch, epochs = 100, 16, 3
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
    model = build_model("mlp", seed=0)
    out = train_dp_sgd(model, data, noise_multiplier=1.3, max_grad_norm=0.7, batch_size=batch,
                       local_epochs=epochs, learning_rate=0.1, momentum=0.0, device=CPU, seed=3)
    q, steps = poisson_plan(n, batch, epochs)
    assert (out.event.sample_rate, out.event.steps) == (pytest.approx(q), steps) == (pytest.approx(1 / 7), 21)
    assert (out.event.noise_multiplier, out.event.max_grad_norm) == (1.3, 0.7)
    ev = evaluate(model, data, CPU)
    assert ev.num_examples == n and 0 <= ev.correct <= n and ev.loss > 0


def test_training_is_reproducible_from_seed() -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(50, 1, 28, 28, generator=g), torch.randint(0, 10, (50,), generator=g))
    weights = []
    for seed in (5, 5, 6):
        model = build_model("cnn", seed=0)
        train_dp_sgd(model, data, noise_multiplier=1.0, max_grad_norm=1.0, batch_size=10,
                     local_epochs=1, learning_rate=0.1, momentum=0.0, device=CPU, seed=seed)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])


def test_batchnorm_model_is_refused_with_the_fix() -> None:
    bad = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ModelNotPrivatizableError, match="GroupNorm"):
        ensure_privatizable(bad)
    with pytest.raises(ValueError, match="Unknown model"):
        build_model("vit")
