"""What a site is to the ClientApp: its identity, its data, its device.

A ``SiteResolver`` maps a Flower ``Context`` to the ``Site`` behind that node. Simulation
resolves from the node's partition id (``simulations.federation``); a deployed site will
resolve from its own node config. The ClientApp never learns where data came from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from flwr.app import Context
from torch.utils.data import TensorDataset


@dataclass(frozen=True)
class Site:
    site_id: str
    train: TensorDataset
    test: TensorDataset
    device: torch.device


SiteResolver = Callable[[Context], Site]
