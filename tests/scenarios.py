"""The small simulated federation the end-to-end tests run, as a raw scenario dict.

Two or three sites on MNIST-5k split IID, an MLP on CPU, large batches and a high learning rate
so that two rounds learn something in seconds. Each test names what it changes:

    small_scenario(name="e2e", seed=3, federation={"min_sites": 2})
    merged(SPEC, {"privacy": {"reproducible_noise": True}})

Nested tables are merged key by key, so an override keeps the rest of its table. To calibrate σ
instead of fixing it, unset the fixed value the way the spec does, with ``None``:
``privacy={"noise_multiplier": None, "target_epsilon": 6.0}``.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

SMALL: dict[str, Any] = {
    "name": "small",
    "seed": 0,
    "device": "cpu",
    "federation": {"sites": 2, "rounds": 2, "min_sites": 1},
    "data": {"partitioner": "iid"},
    "model": {"arch": "mlp"},
    "training": {"batch_size": 64, "learning_rate": 0.5},
    "privacy": {"noise_multiplier": 1.0},
}


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with ``overrides`` merged in: dicts key by key, anything else replaced."""
    out = deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = deepcopy(value)
    return out


def small_scenario(**overrides: Any) -> dict[str, Any]:
    """The small scenario with ``overrides`` deep-merged in (see ``merged``)."""
    return merged(SMALL, overrides)
