"""Framework-free privacy primitives: DP-SGD events, accountants, noise calibration.

Nothing here imports Flower.
"""

from privacy.accounting import ACCOUNTANTS, AccountantName, accountant_version, epsilon
from privacy.calibration import calibrate_noise_multiplier
from privacy.events import DpSgdEvent, default_delta

__all__ = [
    "ACCOUNTANTS",
    "AccountantName",
    "DpSgdEvent",
    "accountant_version",
    "calibrate_noise_multiplier",
    "default_delta",
    "epsilon",
]
