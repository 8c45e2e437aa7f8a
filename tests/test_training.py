"""Local DP-SGD really clips and really adds noise, and records the mechanism it ran."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from client.training import GradSampleMode, evaluate, grad_sample_mode_for, poisson_plan, train_dp_sgd
from privacy import DpSgdEvent
from privacy.randomness import RoundRandomness
from veil.errors import ModelNotPrivatizableError
from veil.models import build_model, ensure_privatizable

CPU = torch.device("cpu")


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(8, 3, bias=False)


def _train(model: nn.Module, data: TensorDataset, **kw: float) -> None:
    args = dict(noise_multiplier=1.0, max_grad_norm=1.0, batch_size=len(data), local_epochs=1,
                learning_rate=1.0, momentum=0.0, device=CPU, randomness=RoundRandomness.from_os())
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
                       local_epochs=epochs, learning_rate=0.1, momentum=0.0, device=CPU,
                       randomness=RoundRandomness.from_os())
    q, steps = poisson_plan(n, batch, epochs)
    assert (out.event.sample_rate, out.event.steps) == (pytest.approx(q), steps) == (pytest.approx(1 / 7), 21)
    assert (out.event.noise_multiplier, out.event.max_grad_norm) == (1.3, 0.7)
    ev = evaluate(model, data, CPU)
    assert ev.num_examples == n and 0 <= ev.correct <= n and ev.loss > 0


def _run(data: TensorDataset, randomness: RoundRandomness) -> tuple[torch.Tensor, tuple[int, ...]]:
    torch.manual_seed(0)  # a global seed anyone knows must not decide the noise or the batches
    model = build_model("cnn", seed=0)
    out = train_dp_sgd(model, data, noise_multiplier=1.0, max_grad_norm=1.0, batch_size=10,
                       local_epochs=3, learning_rate=0.1, momentum=0.0, device=CPU, randomness=randomness)
    assert out.rng == randomness.mode
    return torch.cat([p.detach().flatten() for p in model.parameters()]), out.batch_sizes


def test_noise_and_batches_come_from_the_sites_entropy_unless_seeded_on_purpose() -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(50, 1, 28, 28, generator=g), torch.randint(0, 10, (50,), generator=g))
    # default: fresh OS entropy every round, whatever the global torch seed
    (w1, b1), (w2, b2) = _run(data, RoundRandomness.from_os()), _run(data, RoundRandomness.from_os())
    assert not torch.equal(w1, w2)  # different noise
    assert b1 != b2  # different Poisson masks (15 batches; equal sizes by chance ≈ 1e-10)
    # seeded (reproducible, labelled not private): same task seed, site and round replay exactly
    (s1, c1), (s2, c2) = (_run(data, RoundRandomness.from_seed(7, "site-0", 1)) for _ in range(2))
    assert torch.equal(s1, s2) and c1 == c2
    s3, _ = _run(data, RoundRandomness.from_seed(7, "site-0", 2))  # another round: other noise
    assert not torch.equal(s1, s3)


def test_an_unreadable_entropy_source_stops_before_anything_is_drawn(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from veil.errors import EntropyError

    def broken(n: int) -> bytes:
        raise OSError("no entropy")

    monkeypatch.setattr(os, "urandom", broken)
    with pytest.raises(EntropyError, match="entropy source"):
        RoundRandomness.from_os()
    seeded = RoundRandomness.from_seed(1, "s", 1)
    assert str(seeded.noise_seed) not in repr(seeded) and str(seeded.sampling_seed) not in repr(seeded)


def test_batchnorm_model_is_refused_with_the_fix() -> None:
    bad = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ModelNotPrivatizableError, match="GroupNorm"):
        ensure_privatizable(bad)
    with pytest.raises(ValueError, match="Unknown model"):
        build_model("vit")


MODES: list[GradSampleMode] = ["hooks", "ghost"]


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


@pytest.mark.parametrize("mode", MODES)
def test_both_modes_step_by_the_mean_of_per_sample_clipped_gradients(mode: GradSampleMode) -> None:
    """q = 1 (every record in the one batch), noise ≈ 0, lr 1: the step is minus the mean over the
    records of gᵢ·min(1, C/(‖gᵢ‖ + 1e-6)), computed here one record at a time."""
    n, clip = 6, 1.3
    g = torch.Generator().manual_seed(3)
    x, y = 3 * torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g)
    ref = _tiny()
    expected = [torch.zeros_like(p) for p in ref.parameters()]
    norms = []
    for i in range(n):
        ref.zero_grad()
        nn.functional.cross_entropy(ref(x[i: i + 1]), y[i: i + 1]).backward()
        grads = [p.grad.detach().clone() for p in ref.parameters()]  # type: ignore[union-attr]
        norm = float(torch.sqrt(sum((gr ** 2).sum() for gr in grads)))  # type: ignore[arg-type]
        norms.append(norm)
        for e, gr in zip(expected, grads, strict=True):
            e -= gr * min(1.0, clip / (norm + 1e-6)) / n
    assert min(norms) < clip < max(norms)  # some records are clipped, some are not
    model = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    out = train_dp_sgd(model, TensorDataset(x, y), noise_multiplier=1e-9, max_grad_norm=clip, batch_size=n,
                       local_epochs=1, learning_rate=1.0, momentum=0.0, device=CPU,
                       randomness=RoundRandomness.from_os(), grad_sample_mode=mode)
    assert out.grad_sample_mode == mode and out.batch_sizes == (n,)
    for p, b, e in zip(model.parameters(), before, expected, strict=True):
        torch.testing.assert_close(p.detach() - b, e, atol=1e-6, rtol=1e-5)


def test_both_modes_run_the_same_mechanism_with_the_same_randomness() -> None:
    """Same seeds: the same Poisson batches (empty ones included: noise-only steps), the same event,
    and, on data whose gradients are all zero, the same noise to the last bit."""
    n = 20
    data = TensorDataset(torch.zeros(n, 8), torch.zeros(n, dtype=torch.long))
    outs, weights = {}, {}
    for mode in MODES:
        model = _linear()
        outs[mode] = train_dp_sgd(model, data, noise_multiplier=1.3, max_grad_norm=0.7, batch_size=1,
                                  local_epochs=2, learning_rate=0.5, momentum=0.9, device=CPU,
                                  randomness=RoundRandomness.from_seed(11, "site-0", 1), grad_sample_mode=mode)
        weights[mode] = model.weight.detach()
    hooks, ghost = outs["hooks"], outs["ghost"]
    assert 0 in hooks.batch_sizes  # q = 1/20 over 40 steps: this seed draws empty batches
    assert hooks.batch_sizes == ghost.batch_sizes and hooks.event == ghost.event
    assert hooks.event == DpSgdEvent(1.3, 1 / 20, 40, 0.7)
    assert torch.equal(weights["hooks"], weights["ghost"]) and not torch.equal(weights["hooks"], _linear().weight)


@pytest.mark.parametrize(("arch", "mode"), [("mlp", "ghost"), ("mlp-12x2", "ghost"), ("cnn", "hooks")])
def test_the_mode_chosen_per_model_is_the_one_used_and_recorded(
        monkeypatch: pytest.MonkeyPatch, arch: str, mode: str) -> None:
    from opacus import PrivacyEngine
    from opacus.optimizers import DPOptimizerFastGradientClipping

    used: list[tuple[str, bool]] = []
    real = PrivacyEngine.make_private

    def spy(self: PrivacyEngine, **kw: object) -> object:
        made = real(self, **kw)
        used.append((str(kw["grad_sample_mode"]), isinstance(made[1], DPOptimizerFastGradientClipping)))
        return made

    monkeypatch.setattr(PrivacyEngine, "make_private", spy)
    model = build_model(arch, seed=0)
    n_in = 12 if arch == "mlp-12x2" else 784
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(16, n_in, generator=g), torch.randint(0, 2, (16,), generator=g))
    assert grad_sample_mode_for(model) == mode
    out = train_dp_sgd(model, data, noise_multiplier=1.0, max_grad_norm=1.0, batch_size=8, local_epochs=1,
                       learning_rate=0.1, momentum=0.0, device=CPU, randomness=RoundRandomness.from_os())
    assert out.grad_sample_mode == mode and used == [(mode, mode == "ghost")]


def test_an_empty_poisson_batch_takes_a_noise_only_step() -> None:
    """q = 1/20 over 40 steps: this seed draws empty batches; each is still a step, with noise."""
    n = 20
    data = TensorDataset(torch.zeros(n, 8), torch.zeros(n, dtype=torch.long))  # every gradient is 0
    model = _linear()
    out = train_dp_sgd(model, data, noise_multiplier=1.3, max_grad_norm=0.7, batch_size=1, local_epochs=2,
                       learning_rate=0.5, momentum=0.0, device=CPU,
                       randomness=RoundRandomness.from_seed(11, "site-0", 1))
    assert 0 in out.batch_sizes and len(out.batch_sizes) == out.event.steps == 40
    assert not torch.equal(model.weight.detach(), _linear().weight)  # only noise could have moved it
