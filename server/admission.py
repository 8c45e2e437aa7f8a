"""Who may start a run here: the coordinator admits only requests signed by a researcher it
knows, fresh, and never seen before; every decision is recorded (``run_requests``).

Refused requests get no run row, ask no site anything and charge nothing. An admitted
request's nonce is claimed in the store (a unique column), so the same signed request cannot
start a second run, even on a second coordinator sharing the store. What the coordinator
admits, each site checks again against its own list (``client.app``): the coordinator's
admission is necessary, not sufficient.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError

from privacy.requests import RequestRefused, Researcher, SignedRequest, load_researchers
from server.store import RunStore
from server.store import schema as S
from veil.errors import ScenarioError, StoreError
from veil.logs import get_logger
from veil.names import RequestStatus

log = get_logger("server")
REFUSED_MARK = "run request refused"
REFUSED_LOG = f"ERROR veil.server: {REFUSED_MARK} ("  # what `veil run` looks for in the streamed log


def admitted_researchers(directory: str | None) -> dict[str, Researcher]:
    """The researcher keys this coordinator admits (``--researchers DIR``); none without a directory."""
    return load_researchers([Path(directory)]) if directory else {}


def _record(store: RunStore, request: SignedRequest | None, status: RequestStatus, *, researcher: str | None,
            code: str | None = None, reason: str | None = None, claim_nonce: bool = False) -> None:
    with store.session() as s:
        s.add(S.RunRequest(
            nonce=request.nonce if request is not None and claim_nonce else None,
            key_id=request.key_id[:16] if request is not None else None, researcher=researcher,
            issued_at=request.issued_at[:40] if request is not None else None,
            scenario_name=str(request.scenario.get("name", ""))[:200] if request is not None else None,
            status=status, reason_code=code, reason=reason[:2000] if reason else None,
        ))


def admit(store: RunStore, request_json: object, researchers: dict[str, Researcher],
          now: datetime | None = None, validate: Callable[[dict[str, Any]], None] | None = None
          ) -> tuple[SignedRequest, Researcher]:
    """The signed request and its researcher, admitted and its nonce claimed; or ``RequestRefused``
    after the refusal is recorded. ``validate`` checks the signed scenario (ScenarioError: refused
    as ``invalid-scenario``). A researcher is named only when the signature verified."""
    request: SignedRequest | None = None
    signer: Researcher | None = None
    try:
        request = SignedRequest.from_json(request_json)
        if not researchers:
            raise RequestRefused("untrusted-researcher", "this coordinator admits no researchers: start it "
                                 "with --researchers DIR holding their public keys (NAME.pub)")
        signer = request.verify(researchers)
        request.check_fresh(now or datetime.now(UTC))
        if validate is not None:
            try:
                validate(request.scenario)
            except ScenarioError as err:
                raise RequestRefused("invalid-scenario", str(err)) from None
        try:
            _record(store, request, "admitted", researcher=signer.label(), claim_nonce=True)
        except StoreError as err:
            if not isinstance(err.__cause__, IntegrityError):
                raise
            raise RequestRefused("replayed-request", f"request {request.nonce} was already submitted once; "
                                 "sign and submit a new one") from None
    except RequestRefused as err:
        who = signer.label() if signer is not None else None  # a forged request names no one
        _record(store, request, "refused", researcher=who, code=err.code, reason=err.detail)
        log.error("%s (%s): %s", REFUSED_MARK, who or "no verified researcher", err)
        raise
    log.info("run request %s admitted: signed by %s at %s", request.nonce, signer.label(), request.issued_at)
    return request, signer


def bind(store: RunStore, request: SignedRequest, run_id: int) -> None:
    """Note which run an admitted request started."""
    from sqlalchemy import update

    with store.session() as s:
        s.execute(update(S.RunRequest).where(S.RunRequest.nonce == request.nonce).values(run_id=run_id))
