"""Where a site's DP randomness comes from: its own entropy, or (labelled) a known seed.

The guarantee DP-SGD gives a site's records rests on two random draws the *adversary must
not know*: the Gaussian noise added to each step's clipped-gradient sum, and the Poisson
mask that picks each step's batch (Abadi et al. 2016; the amplification-by-sampling
analysis assumes the mask is secret). Whoever can regenerate the noise can subtract it from
a released update and is left with the exact clipped gradients.

* ``os-entropy`` (the default, and the only mode a deployed site runs): every round, the
  site draws fresh 64-bit seeds for the noise generator and the sampling generator from
  the operating system's entropy (``os.urandom``). Nobody else ever sees them; they are
  not stored or logged.
* ``seeded``: both seeds are derived from the scenario's seed, the site id and the round, so
  a simulation can be replayed bit for bit. Anyone who knows the seed (the coordinator, the
  researcher, whoever reads the run record) can regenerate every noise vector: such a run
  is **not private**, and every record of it says so. Sites only accept it when they are
  simulated (``veil simulate --reproducible-noise``).

What the seeds feed is torch's own generator (``torch.Generator``: MT19937 on the CPU,
Philox on CUDA), which is fast but not a cryptographically secure generator; Opacus's
CSPRNG path needs torchcsprng, which does not build for torch 2.13. The noise is drawn
with Opacus's secure-mode sampler (the sum of 2n = 4 Gaussian draws, the defence against
floating-point attacks on the Gaussian mechanism; Mironov 2012, Holohan & Braghin 2021).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Literal

from veil.errors import EntropyError

RngMode = Literal["os-entropy", "seeded"]
RNG_MODES: tuple[RngMode, ...] = ("os-entropy", "seeded")
NOT_PRIVATE = "not private: noise reproducible from the seed"


def os_seed() -> int:
    """A 64-bit seed from the operating system's entropy source; never from a known value."""
    try:
        raw = os.urandom(8)
    except (OSError, NotImplementedError) as err:
        raise EntropyError(
            f"cannot read the operating system's entropy source (os.urandom: {err}); DP noise cannot "
            "be drawn privately, so nothing is trained: fix /dev/urandom or getrandom() on this machine"
        ) from None
    if len(raw) != 8:
        raise EntropyError(f"the operating system's entropy source returned {len(raw)} of 8 bytes; "
                           "nothing is trained: fix /dev/urandom or getrandom() on this machine")
    return int.from_bytes(raw, "little")


def _derived(task_seed: int, site_id: str, server_round: int, stream: str) -> int:
    digest = hashlib.sha256(f"veil-seeded-noise:{task_seed}:{site_id}:{server_round}:{stream}".encode())
    return int.from_bytes(digest.digest()[:8], "little")


@dataclass(frozen=True)
class RoundRandomness:
    """The seeds of one site's round: DP noise and the Poisson mask each get their own.

    Never sent anywhere: only ``mode`` leaves the site (in its privacy report)."""

    mode: RngMode
    noise_seed: int
    sampling_seed: int

    def __repr__(self) -> str:  # seeds must not end up in logs or tracebacks
        return f"RoundRandomness(mode={self.mode!r})"

    @property
    def private(self) -> bool:
        """True only for OS-entropy seeds; seeded rounds are reproducible and not private."""
        return self.mode == "os-entropy"

    @classmethod
    def from_os(cls) -> RoundRandomness:
        """Fresh seeds from the OS entropy source (raises ``EntropyError`` if it cannot be read)."""
        return cls("os-entropy", os_seed(), os_seed())

    @classmethod
    def from_seed(cls, task_seed: int, site_id: str, server_round: int) -> RoundRandomness:
        """Reproducible seeds anyone who knows the task seed can recompute: NOT private."""
        return cls("seeded", _derived(task_seed, site_id, server_round, "noise"),
                   _derived(task_seed, site_id, server_round, "sampling"))

    @classmethod
    def for_round(cls, mode: RngMode, task_seed: int, site_id: str, server_round: int) -> RoundRandomness:
        """The round's seeds for ``mode``: fresh OS entropy, or derived from the task seed (not private)."""
        if mode == "os-entropy":
            return cls.from_os()
        if mode == "seeded":
            return cls.from_seed(task_seed, site_id, server_round)
        raise ValueError(f"rng mode must be one of {RNG_MODES}, got {mode!r}")


def describe(mode: str) -> str:
    """One line for logs, summaries and reports."""
    if mode == "seeded":
        return f"seeded from the scenario seed ({NOT_PRIVATE})"
    return "drawn at each site from its own OS entropy, fresh every round"
