"""A site's privacy policy: the limits the site enforces on itself, whatever it is asked.

The policy lives with the site (its ``site.yaml`` in deployment; the scenario's
``site_policy`` for simulated sites). The coordinator never sends one and cannot change
one: it only learns, from the site's answers, what the site will and will not do.

    epsilon_cap: 10.0          # lifetime ε for this data set, at ``delta``; null = no cap
    delta: 1.0e-5              # δ at which the cap is measured; null = min(1e-5, 0.1/n)
    accountant: pld            # how the site measures its own spend: pld | rdp | prv
    min_noise_multiplier: 0.5  # refuse DP-SGD with less noise than this
    max_sample_rate: 0.1       # refuse Poisson sampling rates above this
    require_encryption: false  # refuse any task whose update would leave in plaintext
    cap_scope: ledger          # ledger (default): one lifetime budget over everything the
                               # site's ledger ever charged, whatever data set; dataset: one
                               # per exact data fingerprint (only for truly disjoint data: the
                               # same records re-saved would get a fresh budget)

Types are strict (``"10"`` or ``true`` is not a number) and every float is finite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from privacy.accounting import AccountantName
from veil import config
from veil.config import Text
from veil.errors import PolicyError


class SitePolicy(BaseModel):
    """Limits a site enforces on every task, whatever it is asked: lifetime ε cap, δ, σ, q, encryption."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    epsilon_cap: float | None = Field(
        None, ge=0.01, le=1000.0, description="lifetime ε cap for the data set, at `delta`, 0.01..1000: below "
        "0.01 not one DP-SGD step fits (even σ=10⁴ at q=1 costs more), so every run would be refused"
    )
    delta: float | None = Field(
        None, ge=1e-12, le=0.1, description="δ for the cap, 1e-12..0.1 (a larger δ can leak whole records); "
        "null means min(1e-5, 0.1/n)"
    )
    accountant: AccountantName = "pld"
    min_noise_multiplier: float = Field(0.0, ge=0.0, le=1e4)
    max_sample_rate: float = Field(1.0, gt=0.0, le=1.0)
    require_encryption: bool = False
    cap_scope: Literal["dataset", "ledger"] = "ledger"
    trusted_researchers: tuple[Annotated[Text, Field(min_length=1, max_length=4096)], ...] = Field(
        (), max_length=256, strict=False,
        description="researcher public keys (NAME.pub files or directories of them) whose signed runs may spend "
        "this site's budget; none: the site refuses every run (simulated sites accept their federation's "
        "ephemeral key)")

    def delta_for(self, num_records: int) -> float:
        """The δ this site measures its budget at, for a data set of ``num_records``."""
        from privacy.events import default_delta

        delta = self.delta if self.delta is not None else default_delta(num_records)
        if delta >= 1.0 / num_records:
            raise PolicyError(
                f"policy.delta: {delta:g} is not below 1/n = {1.0 / num_records:.3g} for a data "
                f"set of {num_records} records; a δ that large allows leaking a whole record"
            )
        return delta


    def violation(self, noise_multiplier: float, sample_rate: float, encrypted: bool
                  ) -> tuple[str, str] | None:
        """(code, detail) when a task breaks a limit that does not depend on the ledger."""
        if noise_multiplier < self.min_noise_multiplier:
            return ("noise-below-minimum",
                    f"noise multiplier {noise_multiplier:.4g} is below this site's minimum "
                    f"{self.min_noise_multiplier:g}")
        if sample_rate > self.max_sample_rate:
            return ("sample-rate-above-maximum",
                    f"sampling rate {sample_rate:.4g} is above this site's maximum "
                    f"{self.max_sample_rate:g}; use a smaller batch size")
        if self.require_encryption and not encrypted:
            return ("encryption-required",
                    "this site only releases encrypted updates; enable encryption in the run spec")
        return None


def parse_policy(raw: Any, source: str = "<dict>") -> SitePolicy:
    """Validate a mapping into a SitePolicy, or raise PolicyError naming each bad field."""
    return config.validate(SitePolicy, raw, what="site policy", source=source, error=PolicyError,
                           prefix="policy.")


def load_policy(path: Path | str) -> SitePolicy:
    """Read a policy YAML file (the whole file, or its ``policy:`` section)."""
    file = Path(path)
    raw = config.read_yaml(file, what="site policy", error=PolicyError)
    if isinstance(raw, dict) and set(raw) == {"policy"}:
        raw = raw["policy"]
    return parse_policy(raw, source=str(file))
