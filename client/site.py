"""What a site is to the ClientApp: its identity, its data, its device, its privacy rules.

A ``SiteResolver`` maps a Flower ``Context`` to the ``Site`` behind that node. Simulation
resolves from the node's partition id (``simulations.federation``); a deployed site will
resolve from its own node config. The ClientApp never learns where data came from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from flwr.app import Context
from torch.utils.data import TensorDataset

from privacy.ledger import fingerprint_arrays
from privacy.policy import SitePolicy
from privacy.requests import Researcher


@dataclass(frozen=True)
class Site:
    """One data-holding site. ``ledger`` is the site's own privacy ledger file; ``policy``
    is what the site enforces on itself (the coordinator never sees or sets either); ``keys``
    is the CKKS secret key file it encrypts and decrypts with.

    ``ledger_id`` is the ledger id the site's configuration pins (deployed sites): the file
    must then exist and be exactly that ledger. ``allow_seeded_noise`` is only ever true for
    a simulated site: a real site draws DP noise from its own entropy, whatever it is asked.

    ``researchers`` are the researcher keys whose signed runs this site lets spend its budget
    (``policy.trusted_researchers``); a deployed site always has the tuple (empty: it trusts no
    one yet), and then refuses any task that is unsigned, signed by another key, or not the
    task the researcher signed. None skips the check (library use and unit tests only).
    ``accept_ephemeral``: simulated sites accept a simulated federation's throwaway key."""

    site_id: str
    train: TensorDataset
    test: TensorDataset
    device: torch.device
    ledger: Path
    policy: SitePolicy = field(default_factory=SitePolicy)
    keys: Path | None = None  # the key set's secret.ckks, when this site takes part in CKKS runs
    ledger_id: str | None = None
    allow_seeded_noise: bool = False
    researchers: tuple[Researcher, ...] | None = None
    accept_ephemeral: bool = False
    records_fingerprint: str | None = None  # of the records as loaded, when training sees them scaled

    @cached_property
    def fingerprint(self) -> str:
        """Identity of the training data: the ledger's budgets are per fingerprint. A site that
        standardizes its features is still the same records (``records_fingerprint``)."""
        return self.records_fingerprint or fingerprint_arrays(*self.train.tensors)


SiteResolver = Callable[[Context], Site]
