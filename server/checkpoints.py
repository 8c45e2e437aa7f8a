"""Checkpoints as files: the URI, sha256 and size go into the store, never the bytes.

Written atomically (``veil.files``), so a crash never leaves a truncated file behind a
recorded hash. An encrypted aggregate is saved as it is: only a key holder can read it
(``veil keys decrypt``).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from server.store import RunStore
from veil import protocol as P
from veil.files import atomic_write
from veil.models import build_model
from veil.server_opt import STATE_LAYOUT, ServerOptimizer


def save_checkpoint(store: RunStore, run_id: int, round_number: int | None, arrays: ArrayRecord,
                    directory: Path) -> Path:
    """Write a PyTorch state dict file and record its URI, sha256 and size.

    Serialised in memory, so the bytes (and the hash) depend on the weights only, not on the
    file's name; then written atomically.
    """
    name = f"round-{round_number:04d}.pt" if round_number is not None else "final.pt"
    path = (directory / name).resolve()
    buffer = io.BytesIO()
    torch.save(arrays.to_torch_state_dict(), buffer)
    data = buffer.getvalue()
    atomic_write(path, data, mode=0o644)
    store.add_artifact(run_id, round_number=round_number, kind="checkpoint", uri=path.as_uri(),
                       sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    return path


def save_encrypted_checkpoint(store: RunStore, run_id: int, round_number: int, model: ConfigRecord,
                              arch: str, directory: Path, optimizer: ServerOptimizer | None = None) -> Path:
    """The encrypted aggregate as a file (only key holders can read it; ``veil keys decrypt``).

    With a server optimiser, the stream is the round's weighted mean followed by the optimiser's
    state: the model is one ``server_step`` away, which ``veil keys decrypt`` applies."""
    optimizer = optimizer or ServerOptimizer()
    enc = P.encrypted_from(RecordDict({P.ENC_MODEL: model}), P.ENC_MODEL)
    directory.mkdir(parents=True, exist_ok=True)
    path = (directory / f"round-{round_number:04d}.ckks").resolve()
    layout = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")]
              for k, v in build_model(arch).state_dict().items()]
    enc.to_file(path, {"arch": arch, "layout": layout, "run_id": run_id, "round": round_number,
                       "stream": "weighted sum of all layers in state_dict order, then the server optimiser's "
                                 "state (x, m when momentum > 0, sqrt(v), t/256); last value: total weight",
                       "server_optimizer": P.server_fields(optimizer), "state_layout": STATE_LAYOUT})
    data = path.read_bytes()
    store.add_artifact(run_id, round_number=round_number, kind="encrypted-checkpoint", uri=path.as_uri(),
                       sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    return path
