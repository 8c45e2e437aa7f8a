"""Local DP-SGD (Opacus) and evaluation on one site's data.

Opacus replaces the data loader with Poisson sampling (each record joins each batch
independently with probability q), which is what the subsampled-Gaussian accountant
assumes (Abadi et al., 2016; Mironov et al., 2019). The engine's own accountant is not used:
the round's mechanism is returned as a ``DpSgdEvent`` and ε is derived from the site's whole
history, so nothing is lost when a new engine is made each round.

Randomness (``privacy.randomness``): the Gaussian noise and the Poisson mask each come from
their own ``torch.Generator``, seeded per round from ``RoundRandomness``: the site's OS
entropy by default, the scenario seed only in a labelled, non-private reproducible mode.
Nothing here touches torch's global generator, so no seed anyone else knows reaches them.
Noise is drawn with Opacus's secure-mode sampler (2n = 4 Gaussian draws per value, the
defence against floating-point attacks); Opacus's CSPRNG (torchcsprng) is not available for
torch 2.13, so the generator itself is torch's (MT19937 / Philox).

Per-sample clipping runs in one of two Opacus modes, chosen per model (``GRAD_SAMPLE_MODES``,
measured with ``benchmarks/dp_step.py``): ``hooks`` materialises every per-sample gradient;
``ghost`` (Li et al., 2022, "Large Language Models Can Be Strong Differentially Private
Learners"; Bu et al., 2023) gets the per-sample gradient norms in a first backward pass and the
sum of clipped gradients in a second, never storing per-sample gradients. Both compute
Σᵢ gᵢ·min(1, C/(‖gᵢ‖ + 1e-6)), add the same N(0, σ²C²) noise from the same generator and divide
by the same expected batch size, over the same Poisson batches: the mechanism, and the event
returned, are the same in either mode.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy import DpSgdEvent
from privacy.randomness import RngMode, RoundRandomness
from veil.models import MLP

GradSampleMode = Literal["hooks", "ghost"]
GRAD_SAMPLE_MODES: dict[type[nn.Module], GradSampleMode] = {MLP: "ghost"}
"""Models that train faster with ghost clipping (``benchmarks/dp_step.py``, two runs on the shared
2-core CPU machine: the MLP's DP step costs 0.25x hooks mode at batch 32, 0.06-0.08x at 128; the
CNN's costs 1.2-1.5x *more* in ghost mode, whose Conv2d and GroupNorm layers have no ghost norm and
fall back to per-sample gradients). Every other model uses hooks."""


def grad_sample_mode_for(model: nn.Module) -> GradSampleMode:
    """The Opacus per-sample clipping mode ``train_dp_sgd`` uses for ``model`` (by its class)."""
    return GRAD_SAMPLE_MODES.get(type(model), "hooks")


@dataclass(frozen=True)
class TrainOutcome:
    """What a DP-SGD round ran: the mechanism to account for, loss, time and the randomness mode."""

    event: DpSgdEvent
    num_examples: int
    mean_loss: float
    seconds: float
    rng: RngMode
    # the size of every Poisson batch drawn; stays at the site (it is part of the secret mask)
    batch_sizes: tuple[int, ...] = ()
    grad_sample_mode: GradSampleMode = "hooks"  # how per-sample clipping was computed (same mechanism)


@dataclass(frozen=True)
class EvalOutcome:
    """Summed loss and correct count of an evaluation over ``num_examples`` records."""

    loss_sum: float
    correct: int
    num_examples: int

    @property
    def loss(self) -> float:
        """Mean cross-entropy loss per example."""
        return self.loss_sum / self.num_examples

    @property
    def accuracy(self) -> float:
        """Share of examples classified correctly, in [0, 1]."""
        return self.correct / self.num_examples


def poisson_plan(num_examples: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(sample rate q, steps) a round will run: Opacus uses q = 1/ceil(n/B), 1/q steps an epoch."""
    batches = -(-num_examples // batch_size)
    return 1.0 / batches, batches * local_epochs


def train_dp_sgd(
    model: nn.Module,
    data: TensorDataset,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    batch_size: int,
    local_epochs: int,
    learning_rate: float,
    momentum: float,
    device: torch.device,
    randomness: RoundRandomness,
    grad_sample_mode: GradSampleMode | None = None,
) -> TrainOutcome:
    """Train ``model`` in place with DP-SGD; return the mechanism actually run.

    ``randomness`` seeds the noise and the Poisson mask (``RoundRandomness.from_os()`` for a
    private round); nothing else in this function draws random numbers. ``grad_sample_mode``
    (default: ``grad_sample_mode_for(model)``) changes the speed, never the mechanism."""
    from opacus import PrivacyEngine
    from opacus.optimizers import DPOptimizerFastGradientClipping

    start = time.perf_counter()
    mode = grad_sample_mode or grad_sample_mode_for(model)
    if mode not in ("hooks", "ghost"):
        raise ValueError(f"grad_sample_mode must be 'hooks' or 'ghost', got {mode!r}")
    model.to(device).train()
    noise_gen = torch.Generator(device=device)
    noise_gen.manual_seed(randomness.noise_seed)
    sampling_gen = torch.Generator()  # Opacus draws the Poisson mask on the CPU
    sampling_gen.manual_seed(randomness.sampling_seed)
    # Opacus's Poisson loader takes the generator of the loader it replaces
    loader = DataLoader(data, batch_size=batch_size, generator=sampling_gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    criterion = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        # Opacus warns that its secure_mode (torchcsprng) is off; the site logs what it uses instead
        warnings.simplefilter("ignore", UserWarning)
        engine = PrivacyEngine(accountant="rdp")
        made = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=criterion,  # used in ghost mode only: it wraps the loss for its two backward passes
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise_gen,
            grad_sample_mode=mode,
        )
    if mode == "ghost":  # Opacus wraps the loss: its backward() runs the two passes
        private_model, dp_optimizer, loss_fn, dp_loader = made
    else:
        (private_model, dp_optimizer, dp_loader), loss_fn = made, criterion
    if dp_loader.batch_sampler.generator is not sampling_gen:  # never fall back to the global RNG
        raise RuntimeError("Opacus's Poisson sampler is not using the site's sampling generator")
    if dp_optimizer.generator is not noise_gen:
        raise RuntimeError("Opacus's optimizer is not drawing noise from the site's noise generator")
    if isinstance(dp_optimizer, DPOptimizerFastGradientClipping) != (mode == "ghost"):
        raise RuntimeError(f"Opacus did not set up {mode} clipping ({type(dp_optimizer).__name__})")
    # Opacus's floating-point defence (secure-mode noise: the sum of 4 draws, divided by 2);
    # the engine's own secure_mode would also demand torchcsprng, which torch 2.13 lacks
    dp_optimizer.secure_mode = True
    sample_rate = float(dp_loader.sample_rate)
    steps, loss_total, seen = 0, 0.0, 0
    batches: list[int] = []
    with warnings.catch_warnings():
        # Opacus's hooks trigger torch's backward-hook notices on every step.
        warnings.filterwarnings("ignore", message=".*backward hook.*")
        for _ in range(local_epochs):
            for x, y in dp_loader:
                steps += 1
                batches.append(len(y))
                x, y = x.to(device), y.to(device)
                dp_optimizer.zero_grad(set_to_none=True)
                if len(y) == 0:  # an empty Poisson batch still adds noise: take a noise-only step
                    _no_records(dp_optimizer, mode)
                    dp_optimizer.step()
                    continue
                loss = loss_fn(private_model(x), y)
                loss.backward()
                dp_optimizer.step()
                loss_total += float(loss.detach()) * len(y)
                seen += len(y)
    private_model.remove_hooks()
    event = DpSgdEvent(noise_multiplier, sample_rate, steps, max_grad_norm)
    return TrainOutcome(event, len(data), loss_total / max(seen, 1), time.perf_counter() - start,
                        randomness.mode, tuple(batches), mode)


def _no_records(dp_optimizer: Any, mode: GradSampleMode) -> None:
    """What a batch without records contributes to the clipped sum: nothing (the noise follows)."""
    for p in dp_optimizer.params:
        if mode == "ghost":  # the optimizer adds noise to p.grad, which holds the clipped sum
            p.grad = torch.zeros_like(p)
        else:  # the optimizer clips and sums p.grad_sample, one row per record: here none
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, device: torch.device, batch_size: int = 256) -> EvalOutcome:
    """Cross-entropy loss (summed) and accuracy of ``model`` on ``data``, without gradients."""
    model.to(device).eval()
    loss_sum, correct = 0.0, 0
    criterion = nn.CrossEntropyLoss(reduction="sum")
    for x, y in DataLoader(data, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += float(criterion(out, y))
        correct += int((out.argmax(1) == y).sum())
    return EvalOutcome(loss_sum, correct, len(data))


@dataclass(frozen=True)
class PlainOutcome:
    """What a non-private round ran: no mechanism, so no ε; loss, steps and time only."""

    num_examples: int
    mean_loss: float
    steps: int
    seconds: float


def train_sgd(model: nn.Module, data: TensorDataset, *, batch_size: int, local_epochs: int,
              learning_rate: float, momentum: float, device: torch.device, seed: int) -> PlainOutcome:
    """Train ``model`` in place with plain mini-batch SGD: the NOT private baseline (``privacy: none``).

    No clipping, no noise, shuffled fixed-size batches; nothing here is differentially private,
    and the caller records the round as not private."""
    start = time.perf_counter()
    model.to(device).train()
    gen = torch.Generator()
    gen.manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    criterion = nn.CrossEntropyLoss()
    steps, loss_total, seen = 0, 0.0, 0
    for _ in range(local_epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            steps += 1
            loss_total += float(loss.detach()) * len(y)
            seen += len(y)
    return PlainOutcome(len(data), loss_total / max(seen, 1), steps, time.perf_counter() - start)
