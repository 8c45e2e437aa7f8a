"""Veil's domain exceptions. Each carries the process exit code the CLI uses."""

from __future__ import annotations


class VeilError(Exception):
    """Base class: a user-facing error with an actionable message."""

    exit_code = 1


class ScenarioError(VeilError):
    """A scenario or run spec failed validation."""

    exit_code = 2


class DataError(VeilError):
    """Site data is missing, unreadable or malformed."""

    exit_code = 3


class ModelNotPrivatizableError(VeilError):
    """Opacus cannot make this model private (e.g. it has BatchNorm layers)."""

    exit_code = 4


class StoreError(VeilError):
    """The run store is unreachable, has an unexpected schema, or refused a write."""

    exit_code = 5


class PolicyError(VeilError):
    """A site policy file is missing, unreadable or holds impossible values."""

    exit_code = 6


class LedgerError(VeilError):
    """A site's privacy ledger is damaged, tampered with, or from an unknown schema.

    Never handled by resetting the ledger: the site stops until a person looks at it.
    """

    exit_code = 7


class BudgetRefusedError(VeilError):
    """The coordinator refused a run before it started: some site cannot afford it."""

    exit_code = 8

    def __init__(self, message: str, run_id: int | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


class EntropyError(VeilError):
    """The operating system's entropy source cannot be read: DP noise cannot be drawn privately."""

    exit_code = 12


class AuditFlaggedError(VeilError):
    """``veil audit`` found an empirical lower bound on ε above the claimed ε."""

    exit_code = 13


class EncryptionError(VeilError, ValueError):
    """CKKS parameters, key files or ciphertexts are invalid, or a role holds the wrong key."""

    exit_code = 9
