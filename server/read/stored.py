"""What a reader may take from the store: every stored value is checked before it is shown or used.

The coordinator's edge refuses hostile replies, but a store written by an older Veil, a
hand-edited database or a PostgreSQL store shared with other tools can still hold an unknown
accountant, σ = 1e-300, a NaN ε, 2.5 steps, q = 7, broken JSON or a status nobody defined
(and SQLite will hand back text from a numeric column). Readers pass each such value through
here: one that fails becomes ``None`` plus a one-line reason naming the field and the value,
so the dashboard shows "invalid" and a warning, never a traceback and never a wrong ε
presented as valid.

Privacy events are checked against ``EVENT_BOUNDS`` *before* any accountant sees them:
σ = 1e-300 makes PLD overflow and PRV try to allocate gigabytes, and σ = 0.01 keeps PLD busy
for minutes. Below σ = 0.1 a single full-batch step already costs ε in the tens (and a
realistic history ε in the thousands), so no meaningful guarantee is lost by refusing to
recompute one. Strings are kept exactly as stored; the CLI makes them safe for a terminal.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from privacy.accounting import ACCOUNTANTS

SIGMA_MIN = 0.1  # below this the accountants turn slow or unstable, and ε is void anyway
SIGMA_MAX = 1e6
STEPS_MAX = 10**7  # per site per run: 100 rounds of 10 epochs at q = 1e-4
SHOWN = 40  # characters of a bad value quoted in a reason


def quoted(value: object) -> str:
    """A bad value for a reason: its ``repr`` (control characters escaped), cut to ``SHOWN`` characters."""
    text = repr(value)
    return text if len(text) <= SHOWN else text[: SHOWN - 1] + "…"


def text(value: object) -> str:
    """A stored string as ``str`` (SQLite may return a number or bytes from a text column)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def opt_text(value: object) -> str | None:
    """``text`` that keeps ``None``."""
    return None if value is None else text(value)


def why_bad(value: object, *, low: float | None = None, high: float | None = None,
            above: float | None = None, below: float | None = None, whole: bool = False) -> str | None:
    """Why ``value`` is not an acceptable stored number (finite, in range, whole if asked); None if it is."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real | Decimal):  # PostgreSQL sums are Decimal
        return f"not a number ({quoted(value)})"
    x = float(value)
    if not math.isfinite(x):
        return f"not finite ({x})"
    if whole and x != math.floor(x):
        return f"not a whole number ({x:g})"
    if above is not None and not x > above:
        return f"{x:g} is not above {above:g}"
    if below is not None and not x < below:
        return f"{x:g} is not below {below:g}"
    if low is not None and x < low:
        return f"{x:g} is below {low:g}"
    if high is not None and x > high:
        return f"{x:g} is above {high:g}"
    return None


class Checker:
    """Collects ``{field: reason}`` for the stored values of one record that failed their check."""

    def __init__(self) -> None:
        self.problems: dict[str, str] = {}

    def number(self, name: str, value: object, **bounds: Any) -> float | None:
        """``value`` as a float, or None (and a problem) if it fails ``why_bad``; None stays None."""
        if value is None:
            return None
        why = why_bad(value, **bounds)
        if why is not None:
            self.problems[name] = why
            return None
        return float(value)  # type: ignore[arg-type]

    def count(self, name: str, value: object, default: int = 0) -> int:
        """A whole, non-negative stored count; ``default`` (and a problem) if it is anything else."""
        if value is None:
            return default
        why = why_bad(value, low=0, whole=True, high=2**62)
        if why is not None:
            self.problems[name] = why
            return default
        return int(value)  # type: ignore[call-overload]

    def opt_count(self, name: str, value: object) -> int | None:
        """``count`` that keeps ``None`` and gives None for a bad value."""
        if value is None:
            return None
        before = len(self.problems)
        n = self.count(name, value)
        return None if len(self.problems) > before else n

    def status(self, name: str, value: object, known: Iterable[str]) -> str:
        """The stored status as text; a problem if it is not one of ``known``."""
        shown = text(value)
        allowed = tuple(known)
        if shown not in allowed:
            self.problems[name] = f"{quoted(value)} is not one of {', '.join(allowed)}"
        return shown

    def accountant(self, name: str, value: object) -> str | None:
        """The stored accountant name as text; a problem if it is not one Veil knows."""
        if value is None:
            return None
        return self.status(name, value, ACCOUNTANTS)

    def json_object(self, name: str, value: object) -> dict[str, Any] | None:
        """A stored JSON column that must hold an object; None (and a problem) if it does not."""
        if value is None:
            return None
        try:
            parsed = json.loads(text(value))
        except (ValueError, RecursionError) as err:
            self.problems[name] = f"not valid JSON ({quoted(str(err))})"
            return None
        if not isinstance(parsed, dict):
            self.problems[name] = f"holds a JSON {type(parsed).__name__}, not an object"
            return None
        return parsed


def problem_lines(where: str, problems: dict[str, str]) -> list[str]:
    """``"<where> <field>[, <field>]: <why>"`` per distinct reason of one record."""
    fields: dict[str, list[str]] = {}
    for name, why in problems.items():
        fields.setdefault(why, []).append(name)
    return [f"{where} {', '.join(names)}: {why}" for why, names in fields.items()]


def accuracy(check: Checker, name: str, value: object) -> float | None:
    """An accuracy: a number in [0, 1]."""
    return check.number(name, value, low=0.0, high=1.0)


def nonneg(check: Checker, name: str, value: object) -> float | None:
    """A finite, non-negative number (ε, seconds, a loss, a cap)."""
    return check.number(name, value, low=0.0)


def delta(check: Checker, name: str, value: object) -> float | None:
    """A δ: strictly between 0 and 1."""
    return check.number(name, value, above=0.0, below=1.0)


@dataclass(frozen=True)
class StoredEvent:
    """One stored privacy event, checked: the mechanism an accountant may be run on."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str


def check_event(round_number: object, sigma: object, q: object, steps: object, c: object, dlt: object,
                accountant: object) -> StoredEvent | str:
    """The event if every field is in ``EVENT_BOUNDS`` and the accountant is known, else the first reason."""
    checks: tuple[tuple[str, object, dict[str, Any]], ...] = (
        ("σ", sigma, {"low": SIGMA_MIN, "high": SIGMA_MAX}),
        ("q", q, {"above": 0.0, "high": 1.0}),
        ("steps", steps, {"low": 0, "high": STEPS_MAX, "whole": True}),
        ("C", c, {"above": 0.0}),
        ("δ", dlt, {"above": 0.0, "below": 1.0}),
    )
    where = f"round {round_number}" if isinstance(round_number, int) else f"round {quoted(round_number)}"
    for label, value, bounds in checks:
        why = why_bad(value, **bounds)
        if why is not None:
            return f"{where}: {label} {why}"
    if accountant not in ACCOUNTANTS:
        return f"{where}: accountant {quoted(accountant)} is not one of {', '.join(ACCOUNTANTS)}"
    return StoredEvent(round_number if isinstance(round_number, int) else -1, float(sigma),  # type: ignore[arg-type]
                       float(q), int(steps), float(c), float(dlt), str(accountant))  # type: ignore[arg-type, call-overload]


EVENT_BOUNDS = (f"σ in [{SIGMA_MIN:g}, {SIGMA_MAX:g}], q in (0, 1], whole steps in [0, {STEPS_MAX:g}], C > 0, "
                f"δ in (0, 1), accountant one of {', '.join(ACCOUNTANTS)}")


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``,
    so ``json.dumps(..., allow_nan=False)`` writes valid JSON that still says what was stored."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
