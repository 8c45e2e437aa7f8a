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
