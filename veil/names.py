"""Names of the metrics Veil records: shared by the wire protocol and the dashboard.

Kept free of Flower imports so the read-only CLI starts fast.
"""

TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"
EVAL_LOSS = "eval-loss"
EVAL_ACC = "eval-acc"

__all__ = ["EPSILON", "EVAL_ACC", "EVAL_LOSS", "TRAIN_LOSS"]
