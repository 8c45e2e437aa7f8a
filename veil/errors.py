"""Veil's domain exceptions. Each carries its process exit code from ``veil.exits``."""

from __future__ import annotations

from veil.exits import ExitCode


class VeilError(Exception):
    """Base class: a user-facing error with an actionable message."""

    exit_code: ExitCode = ExitCode.ERROR


class ScenarioError(VeilError):
    """A scenario or run spec failed validation."""

    exit_code = ExitCode.SCENARIO


class DataError(VeilError):
    """Site data is missing, unreadable or malformed."""

    exit_code = ExitCode.DATA


class ModelNotPrivatizableError(VeilError):
    """Opacus cannot make this model private (e.g. it has BatchNorm layers)."""

    exit_code = ExitCode.MODEL


class StoreError(VeilError):
    """The run store is unreachable, has an unexpected schema, or refused a write."""

    exit_code = ExitCode.STORE


class PolicyError(VeilError):
    """A site policy file is missing, unreadable or holds impossible values."""

    exit_code = ExitCode.POLICY


class LedgerError(VeilError):
    """A site's privacy ledger is damaged, tampered with, or from an unknown schema.

    Never handled by resetting the ledger: the site stops until a person looks at it.
    """

    exit_code = ExitCode.LEDGER


class BudgetRefusedError(VeilError):
    """The coordinator refused a run before it started: some site cannot afford it."""

    exit_code = ExitCode.BUDGET_REFUSED

    def __init__(self, message: str, run_id: int | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


class RunFailedError(VeilError):
    """A recorded run that failed: the message gives the first recorded reason."""

    exit_code = ExitCode.RUN_FAILED

    def __init__(self, message: str, run_id: int | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


class EntropyError(VeilError):
    """The operating system's entropy source cannot be read: DP noise cannot be drawn privately."""

    exit_code = ExitCode.ENTROPY


class AuditFlaggedError(VeilError):
    """``veil audit`` found an empirical lower bound on ε above the claimed ε."""

    exit_code = ExitCode.AUDIT_FLAGGED


class EncryptionError(VeilError, ValueError):
    """CKKS parameters, key files or ciphertexts are invalid, or a role holds the wrong key."""

    exit_code = ExitCode.ENCRYPTION


class CertError(VeilError):
    """TLS certificates or SuperNode keys could not be made or read."""

    exit_code = ExitCode.CERTIFICATE


class DeployError(VeilError):
    """A Flower process (SuperLink, SuperNode, ``flwr``) could not be found, started or used."""

    exit_code = ExitCode.DEPLOY
