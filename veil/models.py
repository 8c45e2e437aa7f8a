"""The model zoo: small networks Opacus can make private (GroupNorm, never BatchNorm)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from veil.errors import ModelNotPrivatizableError


class SmallCNN(nn.Module):
    """Two strided conv blocks with GroupNorm and a linear head: 8,042 parameters for 28x28x1."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=5, stride=2, padding=2),  # 14x14
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1),  # 7x7
            nn.GroupNorm(4, 32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(3),
        )
        self.head = nn.Linear(32 * 9, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of 1x28x28 images (flat 784-vectors are reshaped first)."""
        if x.dim() == 2:  # flat 784-vectors
            x = x.view(-1, 1, 28, 28)
        return self.head(torch.flatten(self.features(x), 1))


class MLP(nn.Module):
    """784 → 128 → 10."""

    def __init__(self, num_classes: int = 10, in_features: int = 784, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of inputs, flattened to ``in_features`` values each."""
        return self.net(x)


class Linear(nn.Module):
    """Multinomial logistic regression: the tabular entry. Few parameters is what DP-SGD rewards
    (the noise grows with the dimension, the signal does not), so on standardised tabular
    features a linear model is the usual private baseline (Tramèr & Boneh, ICLR 2021)."""

    def __init__(self, num_classes: int = 10, in_features: int = 784) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of inputs, flattened to ``in_features`` values each."""
        return self.net(x)


MODELS: dict[str, Callable[[], nn.Module]] = {"cnn": SmallCNN, "mlp": MLP, "linear": Linear}


def parse_arch(key: str) -> tuple[str, int, int]:
    """``"mlp"`` or ``"mlp-12x2"`` → (arch, in_features, num_classes)."""
    arch, _, shape = key.partition("-")
    if arch not in MODELS:
        raise ValueError(f"Unknown model {arch!r}; choose one of {sorted(MODELS)}.")
    if not shape:
        return arch, 784, 10
    try:
        n_in, n_out = (int(v) for v in shape.split("x"))
    except ValueError:
        raise ValueError(f"model {key!r}: the shape must be <in_features>x<num_classes>") from None
    if arch == "cnn" and n_in != 784:
        raise ValueError(f"model {key!r}: the cnn takes 1x28x28 images")
    return arch, n_in, n_out


def _make(key: str) -> nn.Module:
    arch, n_in, n_out = parse_arch(key)
    if arch == "mlp":
        return MLP(n_out, n_in)
    return Linear(n_out, n_in) if arch == "linear" else SmallCNN(n_out)


def build_model(arch: str, seed: int | None = None) -> nn.Module:
    """Instantiate ``arch`` ("mlp", "cnn" or with a shape, "mlp-12x2"), deterministically when
    ``seed`` is given, and check Opacus accepts it."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _make(arch)
    else:
        model = _make(arch)
    ensure_privatizable(model)
    return model


def ensure_privatizable(model: nn.Module) -> None:
    """Raise ModelNotPrivatizableError listing each layer Opacus cannot handle, with the fix."""
    from opacus.validators import ModuleValidator

    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        detail = "; ".join(str(p) for p in problems)
        raise ModelNotPrivatizableError(
            f"Opacus cannot make {type(model).__name__} private: {detail}. "
            "Replace BatchNorm with GroupNorm (opacus.validators.ModuleValidator.fix does this) "
            "and avoid layers without per-sample gradient support."
        )


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters in ``model`` (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
