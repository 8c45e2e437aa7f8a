"""Signed run requests: only researchers a site trusts can spend its privacy budget.

A researcher holds an Ed25519 key pair (``veil certs researcher-key NAME``). ``veil run``
signs the exact scenario it submits, with the time and a random nonce, as canonical JSON.
The coordinator checks the signature against the researchers it admits, refuses a request
that is stale or whose nonce it has seen, and forwards the signed request with every task.
Each site checks it again against the keys *it* trusts, checks that the task it was sent is
the task the researcher signed, and counts its ledger charges per nonce, so one signature
pays for at most the rounds it asked for, at each site, once: a coordinator cannot replay it
for another run.

A simulated federation signs with a fresh in-memory key (``ephemeral``); only simulated
sites accept such a request, and the run is recorded as signed by an ephemeral key.

What this does not protect: Flower's Control API stays reachable by anyone who can reach the
coordinator's port with the federation's CA certificate; signatures decide what is *admitted
and charged*, not who can connect.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from veil.errors import VeilError
from veil.exits import ExitCode
from veil.files import atomic_write

MAX_AGE_S = 900.0  # a request older than this is refused by the coordinator (clock skew included)
SITE_MAX_AGE_S = 86_400.0  # a site refuses to start charging a request signed longer ago than this
PURPOSE = "veil.run-request.v1"  # signed with every request: a signature made for anything else never fits
MAX_SKEW_S = 120.0  # a request dated further in the future than this is refused
MAX_REQUEST_BYTES = 256_000
REFUSAL_CODES = ("unsigned-run", "untrusted-researcher", "bad-signature", "expired-request",
                 "replayed-request", "task-mismatch", "invalid-scenario")


class RequestError(VeilError):
    """A researcher key file cannot be read or made."""

    exit_code = ExitCode.CERTIFICATE


class RequestRefused(VeilError):
    """A run request that must not be admitted or charged: ``code`` says why, machine-readably."""

    exit_code = ExitCode.REQUEST_REFUSED

    def __init__(self, code: str, detail: str) -> None:
        assert code in REFUSAL_CODES, code
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def key_id(public: Ed25519PublicKey) -> str:
    """A key's short id: the first 16 hex digits of the SHA-256 of its raw public bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Researcher:
    """A researcher's public key, as a coordinator or a site is given it."""

    name: str
    key_id: str
    key: Ed25519PublicKey

    def label(self) -> str:
        """How the researcher is shown: ``name (key id)``."""
        return f"{self.name} ({self.key_id})"


def create_researcher_key(private_path: Path) -> Path:
    """``NAME`` (private key, PEM, mode 600) and ``NAME.pub`` (OpenSSH public key with the name);
    refuses to overwrite either. Returns the public key's path."""
    name = Path(private_path).name
    if name in ("", ".", "..") or name.endswith(".pub") or any(c.isspace() or not c.isprintable() for c in name):
        raise RequestError(f"researcher key name {name!r}: give a file name such as keys/alice (printable, no "
                           "spaces, not ending in .pub; NAME.pub is made beside it)")
    public_path = private_path.with_name(name + ".pub")
    for p in (private_path, public_path):
        if p.exists():
            raise RequestError(f"{p} exists; refusing to overwrite a researcher key")
    key = Ed25519PrivateKey.generate()
    atomic_write(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()), mode=0o600, exclusive=True)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    atomic_write(public_path, public + f" {name}\n".encode(), mode=0o644, exclusive=True)
    return public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """A researcher's private key (``veil certs researcher-key``), or a one-line error."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as err:
        raise RequestError(f"researcher key {path}: {err.strerror or err}") from None
    except (ValueError, TypeError):
        raise RequestError(f"{path} is not a researcher private key (make one with `veil certs "
                           "researcher-key NAME`)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise RequestError(f"{path} is not an Ed25519 researcher key (make one with `veil certs researcher-key`)")
    return key


def load_researcher(path: Path) -> Researcher:
    """A researcher's public key file (``NAME.pub``), or a one-line error naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise RequestError(f"researcher public key {path}: {getattr(err, 'strerror', None) or err}") from None
    parts = text.split()
    try:
        if len(parts) < 2 or parts[0] != "ssh-ed25519":
            raise ValueError
        key = serialization.load_ssh_public_key(f"{parts[0]} {parts[1]}".encode())
    except (ValueError, TypeError, binascii.Error):
        raise RequestError(f"{path} is not a researcher public key (an ssh-ed25519 line from `veil certs "
                           "researcher-key`)") from None
    assert isinstance(key, Ed25519PublicKey)
    name = parts[2] if len(parts) > 2 else Path(path).stem
    return Researcher("".join(c for c in name if c.isprintable())[:64], key_id(key), key)


def load_researchers(paths: list[Path]) -> dict[str, Researcher]:
    """Public keys from files and directories (every ``*.pub`` in a directory), by key id."""
    found: dict[str, Researcher] = {}
    for path in paths:
        files = sorted(Path(path).glob("*.pub")) if Path(path).is_dir() else [Path(path)]
        if Path(path).is_dir() and not files:
            raise RequestError(f"{path}: no researcher public keys (*.pub) in this directory")
        for file in files:
            r = load_researcher(file)
            found[r.key_id] = r
    return found


def canonical(scenario: dict[str, Any]) -> str:
    """The scenario as canonical JSON: sorted keys, no spaces, so both sides hash the same bytes."""
    return json.dumps(scenario, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class SignedRequest:
    """A researcher's signed request to run one scenario (what ``veil run`` submits)."""

    scenario: dict[str, Any]
    issued_at: str  # ISO 8601, UTC
    nonce: str  # 32 hex digits, fresh per request
    key_id: str
    public_key: str  # base64 of the raw Ed25519 public key (checked against key_id)
    signature: str  # base64 Ed25519 signature over payload()
    ephemeral: bool = False  # signed by a throwaway key of a simulated federation

    def payload(self) -> bytes:
        """The bytes the signature covers: the scenario, the time, the nonce and the key."""
        return canonical({"purpose": PURPOSE, "scenario": self.scenario, "issued_at": self.issued_at,
                          "nonce": self.nonce, "key_id": self.key_id, "ephemeral": self.ephemeral}).encode()

    def to_json(self) -> str:
        """The request as one JSON string (it travels in the run config and in every task)."""
        return canonical(asdict(self))

    @classmethod
    def from_json(cls, text: object) -> SignedRequest:
        """Parse a request, or refuse it as unsigned when it is missing or malformed."""
        if not isinstance(text, str) or not text:
            raise RequestRefused("unsigned-run", "the run is not signed by a researcher (submit it with "
                                 "`veil run --key RESEARCHER_KEY`)")
        if len(text) > MAX_REQUEST_BYTES:
            raise RequestRefused("unsigned-run", f"the signed request is over {MAX_REQUEST_BYTES} bytes")
        try:
            raw = json.loads(text)
            req = cls(scenario=dict(raw["scenario"]), issued_at=str(raw["issued_at"]), nonce=str(raw["nonce"]),
                      key_id=str(raw["key_id"]), public_key=str(raw["public_key"]),
                      signature=str(raw["signature"]), ephemeral=raw.get("ephemeral") is True)
        except (ValueError, KeyError, TypeError):
            raise RequestRefused("unsigned-run", "the run request is malformed (not a signed Veil request)"
                                 ) from None
        if len(req.nonce) != 32 or any(c not in "0123456789abcdef" for c in req.nonce):
            raise RequestRefused("unsigned-run", "the run request's nonce is not 32 hex digits")
        try:
            req.to_json().encode("utf-8")
        except UnicodeEncodeError:
            raise RequestRefused("unsigned-run", "the run request holds text that is not valid Unicode") from None
        return req

    def issued(self) -> datetime:
        """When the researcher signed it (UTC)."""
        try:
            when = datetime.fromisoformat(self.issued_at)
        except ValueError:
            raise RequestRefused("bad-signature", f"issued_at {self.issued_at[:40]!r} is not a time") from None
        return when if when.tzinfo else when.replace(tzinfo=UTC)

    def verify(self, trusted: dict[str, Researcher], *, accept_ephemeral: bool = False) -> Researcher:
        """The researcher who signed this, if ``trusted`` holds their key and the signature is good."""
        if self.ephemeral:
            if not accept_ephemeral:
                raise RequestRefused("untrusted-researcher", "signed by an ephemeral key of a simulated "
                                     "federation; only simulated sites accept those")
            signer = Researcher("ephemeral (simulation)", self.key_id, self._embedded_key())
        else:
            found = trusted.get(self.key_id)
            if found is None:
                raise RequestRefused("untrusted-researcher", f"signed by key {self.key_id[:16]!r}, which is not "
                                     "among the researcher keys trusted here")
            signer = found
        try:
            signer.key.verify(base64.b64decode(self.signature, validate=True), self.payload())
        except (InvalidSignature, ValueError, binascii.Error):
            raise RequestRefused("bad-signature", f"the signature does not match the request (key "
                                 f"{self.key_id[:16]}): it was altered after signing or signed by another key"
                                 ) from None
        return signer

    def check_fresh(self, now: datetime | None = None, max_age: float = MAX_AGE_S) -> None:
        """Refuse a request signed more than ``max_age`` seconds ago, or dated in the future."""
        now = now or datetime.now(UTC)
        age = (now - self.issued()).total_seconds()
        if age > max_age:
            raise RequestRefused("expired-request", f"signed {age:.0f} s ago; requests older than "
                                 f"{max_age:.0f} s are refused (sign and submit again)")
        if age < -MAX_SKEW_S:
            raise RequestRefused("expired-request", f"dated {-age:.0f} s in the future (check the clocks)")

    def _embedded_key(self) -> Ed25519PublicKey:
        try:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(self.public_key, validate=True))
        except (ValueError, binascii.Error):
            raise RequestRefused("bad-signature", "the request's public key is malformed") from None
        if key_id(key) != self.key_id:
            raise RequestRefused("bad-signature", "the request's key id does not match its public key")
        return key


def sign_request(scenario: dict[str, Any], key: Ed25519PrivateKey, *, ephemeral: bool = False,
                 now: datetime | None = None) -> SignedRequest:
    """Sign ``scenario`` (its JSON form) with ``key``, now, with a fresh nonce."""
    public = key.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    unsigned = SignedRequest(
        scenario=json.loads(canonical(scenario)),
        issued_at=(now or datetime.now(UTC)).isoformat(timespec="seconds"),
        nonce=secrets.token_hex(16), key_id=key_id(public), public_key=base64.b64encode(raw).decode(),
        signature="", ephemeral=ephemeral,
    )
    signature = base64.b64encode(key.sign(unsigned.payload())).decode()
    return SignedRequest(**{**asdict(unsigned), "signature": signature})


def ephemeral_request(scenario: dict[str, Any]) -> SignedRequest:
    """A simulated federation's request, signed by a key that exists only in this process."""
    return sign_request(scenario, Ed25519PrivateKey.generate(), ephemeral=True)
