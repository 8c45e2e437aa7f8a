"""CKKS (TenSEAL) for add-only federated averaging: key sets, packing, validation, release.

Who holds what:

* **sites and researchers** hold the *secret* key set (``secret.ckks``): they encrypt their
  pre-weighted updates and metric sums, and decrypt aggregates;
* **the coordinator** holds a *parameters-only* context and the key set's reply key
  (``coordinator.ckks``, ~600 bytes, mode 600, no CKKS key of any kind): enough to check,
  parse and add ciphertexts, never to read them. ``CoordinatorContext.load`` refuses anything
  that holds a secret key.

Reply integrity: CKKS is malleable, and a ciphertext made under *another* key set parses and
adds just as well (the sum then decrypts to garbage). So each key set also holds a random
32-byte *reply key*, in both files; it is not derived from, and reveals nothing about, the CKKS
secret. A site tags every encrypted reply with HMAC-SHA256(reply key, domain | key id | run |
round | site | kind | SHA-256 of the stream), and the coordinator checks the tag before it
parses a byte of the stream (``CoordinatorContext.parse``). A valid tag proves "made by a holder
of this key set, for this site, run, round and kind", nothing more: every site (and every
researcher) holds the same reply key, so a key holder can tag anything for any site; per-site
keys derived from it (HKDF) would add nothing. Which site a message came from is the transport's
job (Flower's authenticated node, whose pre-flight site id the coordinator binds the tag to).
Nor can the coordinator bound what a key holder encrypts: a well-formed, honestly tagged but
poisoned update is added like any other. Key sets made before reply integrity have no reply key;
sites and coordinators refuse them (``veil keys create`` makes a new one); they still decrypt.

One update is one stream: every layer flattened in ``state_dict`` order, multiplied by the
site's weight ``n / weight_norm``, with that weight appended as the last value. The stream is
cut into full ciphertexts of ``N/2`` slots each. The coordinator adds streams slot-wise; a key
holder decrypts the sum and divides by its last value (the sum of the weights of exactly the
sites that made it in), so a site that dropped out is simply not in the sum.

Parameters: one data prime is enough for additions (no multiplications, so no rescaling).
The default, N = 4096 with moduli (60, 49) bits and scale 2^52, is the smallest ring that
gives 128-bit security for that (109 bits is SEAL's bound for N = 4096) and costs 32 bytes per
value on the wire. Values must stay within ±2^(60-52-1) = ±128 (checked before encrypting).

Release: a decryption carries the encryption noise, and passive key-recovery attacks on
CKKS use exactly that (Li & Micciancio, 2021). Key holders therefore never use a raw
decryption: ``SecretKey.decrypt`` adds Gaussian noise of σ = 2^-release_bits (≈2^14 times
the decryption error at the default scale) and rounds to a 2^-release_bits grid. The noise
is derived from the secret key and the ciphertext, so every key holder releases the same
numbers. This is a mitigation sized to keep 1e-6 precision, not the ≥2^40 statistical
flooding that IND-CPA-D proofs ask for.

No Flower imports here; no pickle anywhere (TenSEAL's protobuf serialization and JSON only).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import stat
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from veil.errors import EncryptionError
from veil.files import atomic_write

# Total coefficient-modulus bits that keep 128-bit classical security (HomomorphicEncryption.org
# standard, as enforced by SEAL's CoeffModulus.MaxBitCount).
SEAL_128_BIT_BOUNDS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
MAGIC = b"VEIL-CKKS\n"
FORMAT = 1
SECRET_FILE = "secret.ckks"
COORDINATOR_FILE = "coordinator.ckks"
INFO_FILE = "keyset.json"
REPLY_KEY_FIELD = "reply_key"  # header field of secret.ckks and coordinator.ckks: the reply MAC key (hex)
REPLY_DOMAIN = "veil-ckks-reply/1"
REPLY_TAG_BYTES = 32
ReplyKind = Literal["update", "eval-sums"]
_CHUNK_SLACK = 4096  # serialization overhead allowed per ciphertext beyond its coefficient data


class MalformedCiphertextError(ValueError):
    """A site sent bytes that are not a valid ciphertext of this key set (recorded, not fatal)."""


class ReplyIntegrityError(MalformedCiphertextError):
    """An encrypted reply's integrity tag is missing or wrong: another key set's ciphertext, or one
    made for another site, run, round or kind, or altered on the way (recorded, never added)."""

    code = "ckks-integrity"  # the reason code the coordinator records


@dataclass(frozen=True)
class ReplyBinding:
    """What an encrypted reply is for: the coordinator's run reference (``P.ENC_RUN``), the round,
    the site and the kind of stream. The reply's tag covers these and the ciphertext bytes."""

    run: str
    round: int
    site_id: str
    kind: ReplyKind

    def message(self, enc: EncryptedVector) -> bytes:
        """The bytes the tag authenticates: an unambiguous JSON list of the binding and the stream's digest."""
        return json.dumps([REPLY_DOMAIN, enc.key_id, self.run, self.round, self.site_id, self.kind,
                           enc.digest().hex()], separators=(",", ":")).encode()


def _predates(key_id: str) -> str:
    return f"key set {key_id} predates reply integrity; make a new one with veil keys create"


def _reply_key(meta: dict[str, Any], path: Path) -> bytes | None:
    """The key set's reply MAC key from a key file's header; None when the set predates it."""
    raw = meta.get(REPLY_KEY_FIELD)
    if raw is None:
        return None
    try:
        key = bytes.fromhex(raw) if isinstance(raw, str) else b""
    except ValueError:
        key = b""
    if len(key) != 32:
        raise EncryptionError(f"{path}: damaged key file (its reply key is not 32 bytes of hex)")
    return key


@dataclass(frozen=True)
class CkksParams:
    """Ring degree N, coefficient-modulus primes (bits; the last is SEAL's special prime),
    encoding scale 2^scale_bits and the release grid 2^-release_bits."""

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 49)
    scale_bits: int = 52
    release_bits: int = 28

    @property
    def slots(self) -> int:
        """Reals one ciphertext packs: N/2."""
        return self.poly_modulus_degree // 2

    @property
    def data_primes(self) -> int:
        """How many data primes there are (every coefficient-modulus prime but SEAL's special one)."""
        return len(self.coeff_mod_bit_sizes) - 1

    @property
    def headroom(self) -> float:
        """Largest |value| a (summed) slot can hold and still decode."""
        return float(2 ** (sum(self.coeff_mod_bit_sizes[:-1]) - self.scale_bits - 1))

    @property
    def ciphertext_bytes(self) -> int:
        """Coefficient data in one fresh ciphertext: 2 polynomials x N x data primes x 8 bytes."""
        return 2 * self.poly_modulus_degree * self.data_primes * 8

    def problems(self) -> list[str]:
        """Every way these parameters miss 128-bit security, SEAL's limits or precision; empty if none."""
        n, bits = self.poly_modulus_degree, self.coeff_mod_bit_sizes
        out: list[str] = []
        if n not in SEAL_128_BIT_BOUNDS:
            out.append(f"poly_modulus_degree must be one of {sorted(SEAL_128_BIT_BOUNDS)}, got {n}")
            return out
        if len(bits) < 2:
            out.append("coeff_mod_bit_sizes needs at least two primes: data prime(s), then SEAL's "
                       f"special prime (e.g. [60, 49]); got {list(bits)}")
            return out
        bad = [b for b in bits if not 20 <= b <= 60]
        if bad:
            out.append(f"every prime must be 20..60 bits (SEAL's limit); got {list(bits)}")
        bound = SEAL_128_BIT_BOUNDS[n]
        if sum(bits) > bound:
            out.append(f"coeff_mod_bit_sizes {list(bits)} total {sum(bits)} bits, above the 128-bit "
                       f"security bound of {bound} bits for N = {n} (bounds: 109 / 218 / 438 / 881 "
                       "for N = 4096 / 8192 / 16384 / 32768); use fewer or smaller primes or a larger N")
        data_bits = sum(bits[:-1])
        if not 30 <= self.scale_bits <= data_bits - 8:
            out.append(f"scale_bits must be between 30 (precision) and {data_bits - 8} (data prime bits "
                       f"{data_bits} minus 8 bits of headroom for sums); got {self.scale_bits}")
        if not 20 <= self.release_bits <= self.scale_bits - 14:
            out.append(f"release_bits must be between 20 and scale_bits - 14 = {self.scale_bits - 14} "
                       "(the release noise must dwarf the decryption error); "
                       f"got {self.release_bits}")
        return out

    def validate(self) -> CkksParams:
        """These parameters, or an ``EncryptionError`` listing every problem."""
        found = self.problems()
        if found:
            raise EncryptionError("invalid CKKS parameters: " + "; ".join(found))
        return self

    def to_dict(self) -> dict[str, Any]:
        """The parameters as JSON-ready values (the primes as a list)."""
        d = asdict(self)
        d["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CkksParams:
        """Validated parameters from a file header; incomplete or malformed ones raise ``EncryptionError``."""
        try:
            return cls(int(raw["poly_modulus_degree"]), tuple(int(b) for b in raw["coeff_mod_bit_sizes"]),
                       int(raw["scale_bits"]), int(raw["release_bits"])).validate()
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, EncryptionError):
                raise
            raise EncryptionError(f"CKKS parameters are incomplete or malformed: {err!r}") from None


@dataclass(frozen=True)
class EncryptedVector:
    """A stream of ``values`` reals as full ciphertexts (TenSEAL-serialized bytes)."""

    key_id: str
    values: int
    chunks: tuple[bytes, ...]

    @property
    def nbytes(self) -> int:
        """Serialized size of all chunks in bytes: what the stream costs on the wire."""
        return sum(len(c) for c in self.chunks)

    def digest(self) -> bytes:
        """SHA-256 over the key id, value count and every chunk: names this exact stream."""
        h = hashlib.sha256(f"{self.key_id}:{self.values}".encode())
        for c in self.chunks:
            h.update(hashlib.sha256(c).digest())
        return h.digest()

    # A file container for encrypted checkpoints: MAGIC, one JSON header line, raw chunks.
    def to_file(self, path: Path, header: dict[str, Any]) -> None:
        """Write the stream as an encrypted-checkpoint file (mode 644) with ``header``; refuses to overwrite."""
        meta = {**header, "format": FORMAT, "kind": "ciphertext", "key_id": self.key_id,
                "values": self.values, "chunk_bytes": [len(c) for c in self.chunks]}
        _write_private(path, MAGIC + json.dumps(meta).encode() + b"\n" + b"".join(self.chunks), mode=0o644)

    @classmethod
    def from_file(cls, path: Path) -> tuple[EncryptedVector, dict[str, Any]]:
        """Read a ``to_file`` file: the stream and its header; a truncated file is an ``EncryptionError``."""
        meta, body = _read_container(path, "ciphertext")
        sizes = meta.get("chunk_bytes")
        if not isinstance(sizes, list) or sum(sizes) != len(body):
            raise EncryptionError(f"{path}: ciphertext file is truncated or its header does not match")
        chunks, at = [], 0
        for size in sizes:
            chunks.append(body[at:at + size])
            at += size
        return cls(str(meta["key_id"]), int(meta["values"]), tuple(chunks)), meta


@dataclass(frozen=True)
class KeySetInfo:
    """The public description of a key set: safe to store and log."""

    key_id: str
    params: CkksParams
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        """The public description as JSON: key id, parameters, creation time, scheme and TenSEAL version."""
        return {"key_id": self.key_id, "params": self.params.to_dict(), "created_at": self.created_at,
                "scheme": "CKKS", "library": f"tenseal {_tenseal_version()}",
                "encryption": "symmetric (secret key); coordinator holds parameters only",
                "reply_integrity": "hmac-sha256 (a separate random key in both key files)"}


def _tenseal_version() -> str:
    from importlib.metadata import version

    return version("tenseal")


def _ts() -> Any:
    import tenseal

    return tenseal


def _context(params: CkksParams) -> Any:
    ts = _ts()
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                     coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                     encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    ctx.global_scale = 2.0 ** params.scale_bits
    ctx.auto_rescale = ctx.auto_relin = ctx.auto_mod_switch = False
    return ctx


def _params_only(ctx: Any) -> bytes:
    return bytes(ctx.serialize(save_public_key=False, save_secret_key=False,
                               save_galois_keys=False, save_relin_keys=False))


# -- files ----------------------------------------------------------------------------------

def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write key material atomically with ``mode`` from the first byte; refuses to overwrite."""
    try:
        atomic_write(path, data, mode=mode, exclusive=True)
    except FileExistsError:
        raise EncryptionError(f"{path} already exists; refusing to overwrite key material") from None


def _read_container(path: Path, kind: str | None) -> tuple[dict[str, Any], bytes]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise EncryptionError(f"key file not found: {path} (make one with: veil keys create)") from None
    except OSError as err:
        raise EncryptionError(f"cannot read {path}: {err.strerror}") from None
    if not raw.startswith(MAGIC):
        raise EncryptionError(f"{path} is not a Veil CKKS file (made by veil keys create)")
    head, sep, body = raw[len(MAGIC):].partition(b"\n")
    try:
        meta = json.loads(head) if sep else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EncryptionError(f"{path}: unreadable header (format {FORMAT} expected)")
    if kind is not None and meta.get("kind") != kind:
        raise EncryptionError(f"{path} holds a {meta.get('kind')!r} file, expected {kind!r}")
    return meta, body


@dataclass(frozen=True)
class KeySetPaths:
    """Where ``create_keyset`` wrote the secret and coordinator files, and the key set's public description."""

    directory: Path
    secret: Path
    coordinator: Path
    info: KeySetInfo


def create_keyset(directory: Path, params: CkksParams | None = None) -> KeySetPaths:
    """Make a fresh key set in ``directory`` (which must not already hold one).

    ``secret.ckks`` (mode 600) is for sites and researchers; ``coordinator.ckks`` (mode 600)
    holds the parameters and no CKKS key; both hold the key set's random reply key (the MAC
    key of reply integrity, not a CKKS key); ``keyset.json`` is the public description."""
    params = (params or CkksParams()).validate()
    directory = Path(directory)
    for name in (SECRET_FILE, COORDINATOR_FILE, INFO_FILE):
        if (directory / name).exists():
            raise EncryptionError(f"{directory / name} already exists; choose an empty directory")
    directory.mkdir(parents=True, exist_ok=True)
    ctx = _context(params)
    info = KeySetInfo(secrets.token_hex(8), params)
    public = {**info.to_dict(), "format": FORMAT}
    reply_key = secrets.token_bytes(32).hex()  # independent of the CKKS secret: the coordinator needs it
    secret_bytes = bytes(ctx.serialize(save_public_key=False, save_secret_key=True,
                                       save_galois_keys=False, save_relin_keys=False))
    _write_private(directory / SECRET_FILE,
                   MAGIC + json.dumps({**public, "kind": "secret", REPLY_KEY_FIELD: reply_key}).encode()
                   + b"\n" + secret_bytes)
    _write_private(directory / COORDINATOR_FILE,
                   MAGIC + json.dumps({**public, "kind": "coordinator", REPLY_KEY_FIELD: reply_key}).encode()
                   + b"\n" + _params_only(ctx))
    _write_private(directory / INFO_FILE, (json.dumps(public, indent=2) + "\n").encode(), mode=0o644)
    return KeySetPaths(directory, directory / SECRET_FILE, directory / COORDINATOR_FILE, info)


def _info_from(meta: dict[str, Any], path: Path) -> KeySetInfo:
    try:
        params = CkksParams.from_dict(meta["params"])
        return KeySetInfo(str(meta["key_id"]), params, str(meta.get("created_at", "")))
    except (KeyError, TypeError) as err:
        raise EncryptionError(f"{path}: header lacks {err}") from None


# -- packing --------------------------------------------------------------------------------

def flatten(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """All layers as one float64 stream, in the given order."""
    for a in arrays:
        if not np.issubdtype(a.dtype, np.floating):
            raise EncryptionError(f"only floating-point tensors can be encrypted, got {a.dtype}")
    if not arrays:
        return np.zeros(0)
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


def unflatten(stream: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Inverse of ``flatten``: cut ``stream`` into arrays shaped and typed like ``like``; sizes must match."""
    sizes = [int(a.size) for a in like]
    if stream.size != sum(sizes):
        raise EncryptionError(f"stream holds {stream.size} values, the model {sum(sizes)}")
    out, at = [], 0
    for a, size in zip(like, sizes, strict=True):
        out.append(stream[at:at + size].reshape(a.shape).astype(a.dtype))
        at += size
    return out


def _chunks(values: np.ndarray, slots: int) -> Iterator[np.ndarray]:
    for start in range(0, max(values.size, 1), slots):
        yield values[start:start + slots]


# -- the two roles -------------------------------------------------------------------------

class _Role:
    info: KeySetInfo

    @property
    def key_id(self) -> str:
        return self.info.key_id

    @property
    def params(self) -> CkksParams:
        return self.info.params


class SecretKey(_Role):
    """A site's or researcher's key: encrypts streams and releases decrypted aggregates."""

    def __init__(self, ctx: Any, info: KeySetInfo, reply_key: bytes | None = None) -> None:
        """``reply_key``: the key set's reply MAC key; None for a key set that predates it (such a
        key still decrypts, but cannot tag replies)."""
        if not ctx.is_private():
            raise EncryptionError("this context holds no secret key; sites need secret.ckks")
        self._ctx = ctx
        self.info = info
        self._reply_key = reply_key
        secret = bytes(ctx.serialize(save_public_key=False, save_secret_key=True,
                                     save_galois_keys=False, save_relin_keys=False))
        self._flood_key = hashlib.sha256(b"veil-ckks-release\x00" + secret).digest()
        self._last: tuple[bytes, np.ndarray] | None = None  # a site reads each aggregate twice


    @classmethod
    def load(cls, path: Path) -> SecretKey:
        """Load a ``secret.ckks``; refuses any other kind of key file, or one readable by group or others."""
        path = Path(path)
        meta, body = _read_container(path, None)
        if meta.get("kind") != "secret":
            raise EncryptionError(f"{path} is a {meta.get('kind')!r} file; sites and researchers need "
                                  f"the key set's {SECRET_FILE}")
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise EncryptionError(f"{path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
        info = _info_from(meta, path)
        reply_key = _reply_key(meta, path)
        try:
            ctx = _ts().context_from(body)
        except Exception as err:  # TenSEAL raises plain ValueError/RuntimeError on bad bytes
            raise EncryptionError(f"{path}: damaged key file ({err})") from None
        return cls(ctx, info, reply_key)

    def check_can_tag(self) -> None:
        """Raise ``EncryptionError`` (naming the fix) if this key set predates reply integrity."""
        if self._reply_key is None:
            raise EncryptionError(_predates(self.key_id))

    def tag(self, enc: EncryptedVector, binding: ReplyBinding) -> bytes:
        """The integrity tag a site sends with ``enc``: HMAC-SHA256 under the key set's reply key."""
        key = self._reply_key
        if key is None:
            raise EncryptionError(_predates(self.key_id))
        return hmac.new(key, binding.message(enc), hashlib.sha256).digest()

    def encrypt(self, stream: np.ndarray) -> EncryptedVector:
        """Encrypt a finite, non-empty 1-D stream; every |value| must stay within half the headroom."""
        stream = np.asarray(stream, dtype=np.float64)
        if stream.ndim != 1 or stream.size == 0:
            raise EncryptionError("encrypt expects a non-empty 1-D stream")
        if not np.all(np.isfinite(stream)):
            raise EncryptionError("refusing to encrypt NaN or infinite values")
        peak = float(np.max(np.abs(stream)))
        if peak > self.params.headroom / 2:
            raise EncryptionError(
                f"values up to {peak:.3g} exceed half the CKKS headroom (±{self.params.headroom:g}) "
                f"of scale 2^{self.params.scale_bits}; use a smaller scale_bits or a larger data prime")
        ts = _ts()
        chunks = tuple(bytes(ts.ckks_vector(self._ctx, part.tolist()).serialize())
                       for part in _chunks(stream, self.params.slots))
        return EncryptedVector(self.key_id, int(stream.size), chunks)

    def decrypt(self, enc: EncryptedVector) -> np.ndarray:
        """Decrypt, add the deterministic release noise and round to the release grid."""
        if enc.key_id != self.key_id:
            raise EncryptionError(f"ciphertext is under key set {enc.key_id}, this key is {self.key_id}")
        digest = enc.digest()
        if self._last is not None and self._last[0] == digest:  # train and evaluate get the same sum
            return self._last[1].copy()
        ts = _ts()
        parts = []
        for blob in enc.chunks:
            try:
                parts.append(np.asarray(ts.ckks_vector_from(self._ctx, blob).decrypt(), dtype=np.float64))
            except Exception as err:
                raise EncryptionError(f"cannot decrypt: {err}") from None
        raw = np.concatenate(parts) if parts else np.zeros(0)
        if raw.size != enc.values:
            raise EncryptionError(f"decrypted {raw.size} values, expected {enc.values}")
        seed = int.from_bytes(hmac.new(self._flood_key, digest, hashlib.sha256).digest()[:16], "big")
        grid = 2.0 ** -self.params.release_bits
        noisy = raw + np.random.Generator(np.random.PCG64(seed)).normal(0.0, grid, raw.size)
        released = np.round(noisy / grid) * grid
        self._last = (digest, released)
        return released.copy()

    def decrypt_mean(self, enc: EncryptedVector) -> tuple[np.ndarray, float]:
        """A summed weighted stream → (weighted mean, total weight)."""
        values = self.decrypt(enc)
        weight = float(values[-1])
        if not (math.isfinite(weight) and weight > 2.0 ** -self.params.release_bits * 64):
            raise EncryptionError(f"aggregate weight {weight:g} is not positive: wrong key or a broken sum")
        return values[:-1] / weight, weight


class CoordinatorContext(_Role):
    """What the coordinator holds: CKKS parameters and the key set's reply key, no CKKS key. It
    checks tags, parses and adds; it can never decrypt."""

    def __init__(self, ctx: Any, info: KeySetInfo, reply_key: bytes | None) -> None:
        """``reply_key``: the key set's reply MAC key (to check tags; it reads nothing). A context
        with a secret key is refused first, then a key set without a reply key."""
        if ctx.is_private() or ctx.has_secret_key():
            raise EncryptionError("refusing a CKKS context that holds a secret key: the coordinator must "
                                  f"only ever get {COORDINATOR_FILE} from veil keys create")
        if reply_key is None:
            raise EncryptionError(_predates(info.key_id))
        self._ctx = ctx
        self.info = info
        self._reply_key = reply_key


    def is_private(self) -> bool:
        """Whether the context holds a secret key (never, once constructed)."""
        return bool(self._ctx.is_private())

    @classmethod
    def load(cls, path: Path) -> CoordinatorContext:
        """Load a ``coordinator.ckks``; refuses any other kind of key file, above all a secret one, a
        key set without a reply key, and a file readable by group or others (its reply key is secret)."""
        path = Path(path)
        meta, body = _read_container(path, None)
        if meta.get("kind") != "coordinator":
            raise EncryptionError(
                f"refusing {path}: it is a {meta.get('kind')!r} key file. The coordinator never holds a "
                f"secret key; give it {COORDINATOR_FILE} from the same key set")
        info = _info_from(meta, path)
        reply_key = _reply_key(meta, path)
        try:
            ctx = _ts().context_from(body)
        except Exception as err:
            raise EncryptionError(f"{path}: damaged context ({err})") from None
        made = cls(ctx, info, reply_key)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise EncryptionError(f"{path} is readable by others (mode {mode:o}) and holds the key set's reply "
                                  f"key; run: chmod 600 {path}")
        return made

    def verify(self, enc: EncryptedVector, tag: bytes, binding: ReplyBinding) -> None:
        """Raise ``ReplyIntegrityError`` unless ``tag`` is this key set's tag of ``enc`` for ``binding``."""
        if not isinstance(tag, bytes) or len(tag) != REPLY_TAG_BYTES:
            raise ReplyIntegrityError(f"{binding.kind} carries no {REPLY_TAG_BYTES}-byte integrity tag: not "
                                      "added (every site of this key set tags its encrypted replies)")
        want = hmac.new(self._reply_key, binding.message(enc), hashlib.sha256).digest()
        if not hmac.compare_digest(want, tag):
            raise ReplyIntegrityError(
                f"{binding.kind}'s integrity tag does not match key set {self.key_id} for "
                f"{binding.site_id[:60]!r}, round {binding.round} of this run: another key set's ciphertext, "
                "one made for another site, run or round, or altered on the way; not added")

    def parse(self, enc: EncryptedVector, values: int, *, tag: bytes, binding: ReplyBinding) -> list[Any]:
        """Check a site's stream without trusting a byte of it: key id, counts and sizes (cheap, so
        the tag is never computed over oversized input), then its integrity tag (before TenSEAL
        reads a byte), then each ciphertext; raise MalformedCiphertextError (its
        ReplyIntegrityError subclass for a missing or wrong tag)."""
        p = self.params
        if enc.key_id != self.key_id:
            raise MalformedCiphertextError(f"encrypted under key set {enc.key_id!r}, expected {self.key_id!r}")
        if enc.values != values:
            raise MalformedCiphertextError(f"stream holds {enc.values} values, expected {values}")
        expected = math.ceil(values / p.slots)
        if len(enc.chunks) != expected:
            raise MalformedCiphertextError(f"{len(enc.chunks)} ciphertexts, expected {expected}")
        limit = p.ciphertext_bytes + _CHUNK_SLACK
        for i, blob in enumerate(enc.chunks):
            if not isinstance(blob, bytes | bytearray) or len(blob) > limit:
                raise MalformedCiphertextError(f"ciphertext {i} is {len(blob)} bytes, over the {limit}-byte limit")
        self.verify(enc, tag, binding)
        ts, out = _ts(), []
        for i, blob in enumerate(enc.chunks):
            try:
                vec = ts.ckks_vector_from(self._ctx, bytes(blob))
            except Exception as err:
                raise MalformedCiphertextError(f"ciphertext {i} is not a CKKS ciphertext for these "
                                               f"parameters: {err}") from None
            want = min(p.slots, values - i * p.slots)
            cts = vec.ciphertext()
            if vec.size() != want or len(cts) != 1:
                raise MalformedCiphertextError(f"ciphertext {i} holds {vec.size()} values in {len(cts)} "
                                               f"ciphertexts, expected {want} in 1")
            ct = cts[0]
            if (ct.size() != 2 or ct.coeff_modulus_size() != p.data_primes
                    or ct.poly_modulus_degree() != p.poly_modulus_degree
                    or not ct.is_ntt_form() or ct.is_transparent()
                    or not math.isclose(float(ct.scale), 2.0 ** p.scale_bits, rel_tol=1e-9)):
                raise MalformedCiphertextError(f"ciphertext {i} has the wrong size, level or scale")
            out.append(vec)
        return out

    def add(self, parsed: Sequence[list[Any]]) -> EncryptedVector:
        """Slot-wise sum of parsed streams (all checked by ``parse``); consumes the first one."""
        if not parsed:
            raise ValueError("nothing to add")
        total = list(parsed[0])
        for stream in parsed[1:]:
            for acc, v in zip(total, stream, strict=True):
                acc.add_(v)
        values = sum(v.size() for v in total)
        return EncryptedVector(self.key_id, values, tuple(bytes(v.serialize()) for v in total))
