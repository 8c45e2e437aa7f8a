"""Names shared by the wire protocol, the store and the dashboard: metrics, statuses, modes.

Kept free of Flower imports so the read-only CLI starts fast. Statuses are ``Literal`` types,
so a misspelt status is a type error rather than a row nobody can find.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"
EVAL_LOSS = "eval-loss"
EVAL_ACC = "eval-acc"

# What the dashboard shows per round (``veil metrics --metric``), with the label a plot uses.
ShownMetric = Literal["accuracy", "loss", "train-loss", "epsilon"]
SHOWN_METRICS: tuple[ShownMetric, ...] = get_args(ShownMetric)
METRIC_LABELS: dict[str, str] = {"accuracy": "evaluation accuracy", "loss": "evaluation loss",
                                 "train-loss": "train loss", "epsilon": "run ε per site"}

# The slots of an encrypted evaluation, in order, each divided by the run's weight norm: the
# one layout sites encrypt (``eval_sums``), the coordinator adds and a key holder reads
# (``eval_from_sums``).
EVAL_SUMS = ("eval-loss-sum", "eval-correct", "eval-examples")


def eval_sums(loss_sum: float, correct: float, examples: float) -> list[float]:
    """A site's evaluation as the encrypted slots hold it (before weighting)."""
    return [float(loss_sum), float(correct), float(examples)]


def eval_from_sums(values: list[float] | tuple[float, ...]) -> tuple[float, float]:
    """(accuracy, loss) from decrypted, summed slots; the common weight norm cancels."""
    if len(values) != len(EVAL_SUMS):
        raise ValueError(f"encrypted evaluation holds {len(values)} values, expected {len(EVAL_SUMS)}")
    loss_sum, correct, examples = (float(v) for v in values)
    if examples <= 0:
        raise ValueError("decrypted example count is not positive")
    return correct / examples, loss_sum / examples


RunStatus = Literal["running", "completed", "failed", "refused", "stopped"]
RUN_STATUSES: tuple[RunStatus, ...] = get_args(RunStatus)
FINAL_STATUSES: tuple[RunStatus, ...] = tuple(s for s in RUN_STATUSES if s != "running")
RunMode = Literal["simulation", "deployment"]
# interrupted: the run ended (failed or stopped) while the round was running
RoundStatus = Literal["running", "completed", "insufficient", "interrupted"]
Phase = Literal["preflight", "train", "evaluate", "aggregate"]
ParticipationStatus = Literal["ok", "failed", "rejected", "refused", "no-reply"]
RequestStatus = Literal["admitted", "refused"]

# A site's id: ``site_id`` in site.yaml, the name a coordinator registers its node key under
# (``veil coordinator register``) and the name its node key files carry (``NAME.node-key``).
SITE_ID_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$"
SITE_ID_MAX = 64


def site_id_problem(value: str) -> str | None:
    """Why ``value`` cannot be a site id (letters, digits, ``_ - .``, not starting with a dot, at
    most ``SITE_ID_MAX`` characters); None when it can."""
    if not value:
        return "is empty"
    if len(value) > SITE_ID_MAX:
        return f"is {len(value)} characters long (at most {SITE_ID_MAX})"
    if re.fullmatch(SITE_ID_PATTERN.strip("^$"), value) is None:
        return "may hold only letters, digits, '_', '-' and '.' (not first)"
    return None


__all__ = [
    "EPSILON",
    "EVAL_ACC",
    "EVAL_LOSS",
    "EVAL_SUMS",
    "FINAL_STATUSES",
    "METRIC_LABELS",
    "RUN_STATUSES",
    "SHOWN_METRICS",
    "SITE_ID_MAX",
    "SITE_ID_PATTERN",
    "TRAIN_LOSS",
    "ParticipationStatus",
    "Phase",
    "RequestStatus",
    "RoundStatus",
    "RunMode",
    "RunStatus",
    "ShownMetric",
    "eval_from_sums",
    "eval_sums",
    "site_id_problem",
]
