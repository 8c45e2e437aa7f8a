"""Pick the torch device a site trains on: CUDA when present, else CPU; a flag overrides."""

from __future__ import annotations

import torch

from veil.errors import VeilError


def resolve_device(choice: str = "auto") -> torch.device:
    """The torch device for ``choice`` (auto, cpu or cuda); asking for cuda without one is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise VeilError("device 'cuda' was requested but no CUDA device is available; use 'auto' or 'cpu'")
    if choice not in ("cpu", "cuda"):
        raise VeilError(f"device must be auto, cpu or cuda, got {choice!r}")
    return torch.device(choice)
