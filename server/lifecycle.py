"""A run's life on the record: created ``running``, ended exactly once.

``record_run`` wraps everything a coordinator does with a run: the run row exists before any
site is asked anything, and whatever happens inside (an exception, Ctrl-C) it ends with a
final status, never ``running``. A status the run reached on its own (``refused``,
``stopped``, ``failed``) is kept. ``end_run`` is the one way to end a run: the store stores the
status; the coordinator then derives each site's run ε from the recorded events once, so
readers need not rerun the accountant (they recompute if it is missing or stale).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from privacy.requests import Researcher
from server.read.summary import site_epsilons
from server.store import RunStore
from server.store import schema as S
from veil.errors import StoreError
from veil.logs import get_logger
from veil.names import RunMode, RunStatus
from veil.spec import Scenario

log = get_logger("server")
MAX_ERROR = 4000


def create_run(store: RunStore, scenario: Scenario, mode: RunMode, researcher: Researcher | None = None) -> int:
    """The run row for ``scenario`` (spec snapshot and hash, seed, sizes, who asked), status ``running``."""
    return store.create_run(
        name=scenario.name, spec=scenario.model_dump(mode="json"), spec_hash=scenario.spec_hash(),
        seed=scenario.seed, num_sites=scenario.federation.sites,
        num_rounds=scenario.federation.rounds, mode=mode,
        researcher=researcher.name[:120] if researcher else None,
        researcher_key_id=researcher.key_id if researcher else None,
    )


def derive_site_epsilons(store: RunStore, run_id: int) -> None:
    """Recompute every site's run ε from its events and keep it with the site row."""
    derived = site_epsilons(store, run_id, use_derived=False)
    with store.session() as s:
        for spend in derived:
            row = s.get(S.Site, spend.site_row)
            if row is not None:
                row.derived_epsilon, row.derived_events = spend.epsilon, spend.events


def end_run(store: RunStore, run_id: int, status: RunStatus, error: str | None = None) -> None:
    """Record the final status, then derive the sites' ε (a failure there is logged, not raised:
    the status must land, and readers recompute ε from the events anyway)."""
    store.finish_run(run_id, status=status, error=error[:MAX_ERROR] if error else None)
    try:
        derive_site_epsilons(store, run_id)
    except (ValueError, ArithmeticError, StoreError) as err:
        log.warning("run %d: could not derive site ε at run end (%s); readers will recompute", run_id, err)


@contextmanager
def record_run(store: RunStore, scenario: Scenario, mode: RunMode = "simulation",
               researcher: Researcher | None = None) -> Iterator[int]:
    """Create the run; end it ``completed`` on success, ``failed`` (with the error) otherwise."""
    run_id = create_run(store, scenario, mode, researcher)
    try:
        yield run_id
    except BaseException as err:
        if store.get_run(run_id).status == "running":
            reason = "interrupted" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {err}"
            end_run(store, run_id, "failed", reason)
        raise
    if store.get_run(run_id).status == "running":
        end_run(store, run_id, "completed")
