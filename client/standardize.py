"""A site's own feature scaling: z-scores with the statistics of its training split.

With ``standardize: true`` in site.yaml each feature x becomes (x - mean) / std, where mean and
std (population, ddof 0) are those of the site's *training* records only, applied to training
and test records alike: the test split is scaled as unseen data is, and never lends its own
statistics to evaluation. A feature constant over the training split is only centred (std 0:
nothing to divide by). Sums run in float64; the results are float32, finite, and within the
bound loading accepts (``LIMIT``), so NaN or inf never come out of here.

The statistics stay at the site: its own log gets a one-line summary (``FeatureStats.summary``)
and nothing here is ever put in a reply to the coordinator.

Why a DP-SGD site cares: each record's gradient is clipped to norm C before noise is added
(Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, §3.1), and a linear
layer's weight gradient is proportional to its input. A feature in the thousands dominates
every clipped gradient, so the signal of the unit-scale features is cut away, and a learning
rate that suits unit-scale inputs diverges. ``unscaled`` is the preflight's test for that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LIMIT = 1e20  # client.loaders.MAX_FEATURE: standardized data stays within what loading accepts
UNSCALED = 10.0  # a feature whose |mean| or std passes this is not on a unit scale


@dataclass(frozen=True)
class FeatureStats:
    """Per-feature mean and standard deviation of a training split (float64, one record's shape);
    ``std`` is 0 exactly where the feature takes one value over all ``n`` records."""

    mean: np.ndarray
    std: np.ndarray
    n: int

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStats:
        """The statistics of ``features`` (records along the first axis)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim < 1 or len(x) == 0:
            raise ValueError("no training records to compute feature statistics from")
        if not np.isfinite(x).all():
            raise ValueError("features hold NaN or infinite values; cannot standardize them")
        # constant by value, not by a rounded std: a column of 0.1s must centre to exactly 0
        constant = x.max(axis=0) == x.min(axis=0)
        mean = np.where(constant, x[0], x.mean(axis=0))
        std = np.where(constant, 0.0, x.std(axis=0))
        return cls(mean, std, len(x))

    @property
    def constant(self) -> int:
        """How many features are constant over the training split (centred, not scaled)."""
        return int((self.std == 0).sum())

    def apply(self, features: np.ndarray) -> np.ndarray:
        """``features`` as z-scores under these statistics, float32 (a constant feature only centred)."""
        x = np.asarray(features, dtype=np.float64)
        if x.shape[1:] != self.mean.shape:
            raise ValueError(f"records of shape {x.shape[1:]} do not match the statistics' {self.mean.shape}")
        z = (x - self.mean) / np.where(self.std > 0, self.std, 1.0)
        return np.clip(z, -LIMIT, LIMIT).astype(np.float32)

    def summary(self) -> str:
        """One line for the site's own log: counts and ranges, never a per-feature list."""
        return (f"{self.mean.size} features over {self.n} training records: means {self.mean.min():.3g}.."
                f"{self.mean.max():.3g}, stds {self.std.min():.3g}..{self.std.max():.3g}, "
                f"{self.constant} constant (centred only)")


def unscaled(features: np.ndarray, limit: float = UNSCALED) -> str | None:
    """What makes ``features`` look unscaled, or None when they do not.

    The rule: some feature's |mean| or std is above ``limit`` (10). Data scaled to [0, 1] or
    z-scored has both at most about 1; ten times that is an order of magnitude off, and leaves
    mildly wide features (a 0..5 score) alone. A ratio of largest to smallest std is not used:
    images scaled to [0, 1] have near-constant border pixels, and would be flagged for nothing."""
    stats = FeatureStats.of(features)
    scale = np.maximum(np.abs(stats.mean), stats.std).reshape(-1)
    big = int((scale > limit).sum())
    if not big:
        return None
    worst = int(np.argmax(scale))
    return (f"{big} of {scale.size} features have |mean| or std above {limit:g} (the largest, feature "
            f"{worst}: mean {stats.mean.reshape(-1)[worst]:.3g}, std {stats.std.reshape(-1)[worst]:.3g})")
