"""Veil's process exit codes: one table, each code with the help a user needs.

Every ``VeilError`` subclass carries one of these codes (``veil.errors``); the CLI exits with
it after printing the error's one line. ``veil --help`` lists the table, and a test checks
that every code has help text (as Flower's ``common/exit/exit_code.py`` does).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of the ``veil`` command (and of the site and coordinator processes it starts)."""

    OK = 0
    ERROR = 1
    SCENARIO = 2
    DATA = 3
    MODEL = 4
    STORE = 5
    POLICY = 6
    LEDGER = 7
    BUDGET_REFUSED = 8
    ENCRYPTION = 9
    CERTIFICATE = 10
    DEPLOY = 11
    ENTROPY = 12
    AUDIT_FLAGGED = 13
    REQUEST_REFUSED = 14
    RUN_FAILED = 15
    INTERRUPTED = 130
    TERMINATED = 143


HELP: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.ERROR: "an error the message explains (bad option, missing run, unreadable file)",
    ExitCode.SCENARIO: "the scenario or site config failed validation; the message names each bad field",
    ExitCode.DATA: "site data is missing, unreadable or malformed (also: `veil site check` found a failed check)",
    ExitCode.MODEL: "Opacus cannot make the model private (e.g. BatchNorm layers)",
    ExitCode.STORE: "the run store is unreachable, at another schema, or refused a write; "
                    "try `veil db upgrade --store URL`",
    ExitCode.POLICY: "a site policy is unreadable or holds impossible values",
    ExitCode.LEDGER: "a site's privacy ledger is damaged, tampered with, replaced or not this site's; "
                     "a person must look at it (it is never reset automatically)",
    ExitCode.BUDGET_REFUSED: "the run was refused before training: a site cannot afford it under its policy",
    ExitCode.ENCRYPTION: "CKKS parameters, key files or ciphertexts are invalid, or a role holds the wrong key",
    ExitCode.CERTIFICATE: "TLS certificates, node keys or researcher keys could not be made or read",
    ExitCode.DEPLOY: "a Flower process could not be started or a submission failed",
    ExitCode.ENTROPY: "the operating system's entropy source cannot be read, so DP noise cannot be drawn "
                      "privately",
    ExitCode.AUDIT_FLAGGED: "`veil audit` found an empirical lower bound on ε above the claimed ε",
    ExitCode.REQUEST_REFUSED: "the run request was refused: unsigned, signed by a researcher not admitted or "
                              "trusted, altered after signing, expired or replayed",
    ExitCode.RUN_FAILED: "the run was recorded but failed (e.g. no round had enough usable site replies); the "
                         "message gives the first recorded reason, and `veil runs show RUN` the rest",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C); a run that was recording is marked failed",
    ExitCode.TERMINATED: "terminated (SIGTERM: `veil runs stop`, docker stop); the run is recorded as stopped "
                         "when `veil runs stop` asked, otherwise as failed",
}


def help_text(code: int) -> str:
    """The help line for ``code``, or a note that Flower or a child process chose it."""
    try:
        return HELP[ExitCode(code)]
    except ValueError:
        return "exit code of a Flower process Veil started (see its log)"


def table() -> str:
    """All codes with their help, one per line (for ``veil --help``)."""
    return "\n".join(f"{int(c):>3}  {HELP[c]}" for c in ExitCode)
