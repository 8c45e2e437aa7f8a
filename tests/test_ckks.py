"""CKKS key sets, packing, validation and release (privacy/ckks.py) against real TenSEAL."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.ckks import (
    CkksParams,
    CoordinatorContext,
    EncryptedVector,
    KeySetPaths,
    MalformedCiphertextError,
    ReplyBinding,
    ReplyIntegrityError,
    SecretKey,
    create_keyset,
    flatten,
    unflatten,
)
from veil.errors import EncryptionError


@pytest.fixture(scope="module")
def keyset(tmp_path_factory: pytest.TempPathFactory) -> KeySetPaths:
    return create_keyset(tmp_path_factory.mktemp("keys") / "set")


@pytest.fixture(scope="module")
def secret(keyset: KeySetPaths) -> SecretKey:
    return SecretKey.load(keyset.secret)


@pytest.fixture(scope="module")
def coord(keyset: KeySetPaths) -> CoordinatorContext:
    return CoordinatorContext.load(keyset.coordinator)


def _site_stream(layers: list[np.ndarray], weight: float) -> np.ndarray:
    return np.append(flatten(layers) * weight, weight)


BIND = ReplyBinding("run-1:0011223344556677", 1, "site-0", "update")


def _parse(coord: CoordinatorContext, key: SecretKey, enc: EncryptedVector, values: int,
           binding: ReplyBinding = BIND) -> list:
    """What the coordinator does with a reply a key holder tagged (honestly or not) for ``binding``."""
    return coord.parse(enc, values, tag=key.tag(enc, binding), binding=binding)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), sites=st.integers(1, 6))
def test_encrypted_aggregate_equals_plaintext_weighted_average(
        secret: SecretKey, coord: CoordinatorContext, seed: int, sites: int) -> None:
    rng = np.random.default_rng(seed)
    shapes = [tuple(int(d) for d in rng.integers(1, 40, size=rng.integers(1, 4)))
              for _ in range(rng.integers(1, 5))]
    models = [[rng.normal(0, rng.uniform(0.01, 3.0), s).astype(np.float32) for s in shapes] for _ in range(sites)]
    counts = rng.integers(1, 5000, size=sites).astype(float)
    norm = float(counts.sum())
    encrypted = [secret.encrypt(_site_stream(m, n / norm)) for m, n in zip(models, counts, strict=True)]
    values = sum(int(np.prod(s)) for s in shapes) + 1
    total = coord.add([_parse(coord, secret, e, values) for e in encrypted])
    mean, weight = secret.decrypt_mean(total)
    expected = sum(flatten(m) * n for m, n in zip(models, counts, strict=True)) / counts.sum()
    assert np.max(np.abs(mean - expected)) <= 1e-6
    assert weight == pytest.approx(1.0, abs=1e-6)
    back = unflatten(mean, models[0])
    assert [b.shape for b in back] == list(shapes) and all(b.dtype == np.float32 for b in back)


def test_a_site_that_drops_out_is_simply_not_in_the_sum(secret: SecretKey, coord: CoordinatorContext) -> None:
    rng = np.random.default_rng(1)
    ups = [rng.normal(size=3000) for _ in range(4)]
    counts = [100.0, 300.0, 50.0, 550.0]  # the norm covers all four; only three report
    encs = [secret.encrypt(np.append(u * n / 1000, n / 1000)) for u, n in zip(ups, counts, strict=True)]
    mean, weight = secret.decrypt_mean(coord.add([_parse(coord, secret, e, 3001) for e in encs[:3]]))
    expected = sum(u * n for u, n in zip(ups[:3], counts[:3], strict=True)) / 450
    assert np.max(np.abs(mean - expected)) <= 1e-6 and weight == pytest.approx(0.45, abs=1e-7)


def test_release_is_rounded_flooded_and_the_same_for_every_key_holder(
        keyset: KeySetPaths, secret: SecretKey) -> None:
    enc = secret.encrypt(np.linspace(-1, 1, 5000))
    again = SecretKey.load(keyset.secret).decrypt(enc)  # another key holder
    first = secret.decrypt(enc)
    assert np.array_equal(first, again)
    grid = 2.0 ** -secret.params.release_bits
    assert np.allclose(first / grid, np.round(first / grid), atol=1e-6)  # on the release grid
    err = first - np.linspace(-1, 1, 5000)
    assert 1e-9 < np.std(err) < 1e-7  # noise of σ = 2^-28 is there, and small
    other = secret.encrypt(np.linspace(-1, 1, 5000))  # a fresh encryption gets fresh noise
    assert not np.array_equal(secret.decrypt(other), first)


def test_values_beyond_the_headroom_are_refused_before_encrypting(secret: SecretKey) -> None:
    with pytest.raises(EncryptionError, match="headroom"):
        secret.encrypt(np.array([0.0, secret.params.headroom]))
    with pytest.raises(EncryptionError, match="NaN"):
        secret.encrypt(np.array([0.0, np.nan]))


# -- roles: the coordinator never holds a secret key ---------------------------------------

def test_coordinator_context_holds_no_key_and_refuses_a_secret_one(
        keyset: KeySetPaths, coord: CoordinatorContext, tmp_path: Path) -> None:
    import tenseal as ts

    assert coord.is_private() is False
    body = keyset.coordinator.read_bytes().split(b"\n", 2)[2]
    params_only = ts.context_from(body)
    assert not params_only.has_secret_key() and not params_only.is_private()
    assert keyset.coordinator.stat().st_size < 1024  # parameters only
    with pytest.raises(EncryptionError, match="never holds a secret key"):
        CoordinatorContext.load(keyset.secret)
    # a raw TenSEAL context with a secret key, without Veil's header, is refused too
    raw = tmp_path / "raw.ckks"
    raw.write_bytes(keyset.secret.read_bytes().split(b"\n", 2)[2])  # secret.ckks without its two header lines
    assert ts.context_from(raw.read_bytes()).is_private()
    with pytest.raises(EncryptionError, match="not a Veil CKKS file"):
        CoordinatorContext.load(raw)
    # and a header that lies about its contents does not get a secret key past the check
    lying = tmp_path / "lying.ckks"
    header, secret_body = keyset.secret.read_bytes().split(b"\n", 2)[1:]
    lying.write_bytes(b"VEIL-CKKS\n" + header.replace(b'"kind": "secret"', b'"kind": "coordinator"')
                      + b"\n" + secret_body)
    with pytest.raises(EncryptionError, match="refusing a CKKS context that holds a secret key"):
        CoordinatorContext.load(lying)


def test_sites_need_the_secret_file_and_it_must_be_private(keyset: KeySetPaths, tmp_path: Path) -> None:
    assert stat.S_IMODE(keyset.secret.stat().st_mode) == 0o600
    with pytest.raises(EncryptionError, match="sites and researchers need"):
        SecretKey.load(keyset.coordinator)
    leaked = tmp_path / "secret.ckks"
    leaked.write_bytes(keyset.secret.read_bytes())
    os.chmod(leaked, 0o644)
    with pytest.raises(EncryptionError, match="chmod 600"):
        SecretKey.load(leaked)
    with pytest.raises(EncryptionError, match="not found"):
        SecretKey.load(tmp_path / "missing.ckks")
    with pytest.raises(EncryptionError, match="already exists"):
        create_keyset(keyset.directory)


# -- parameters -----------------------------------------------------------------------------

@pytest.mark.parametrize(("params", "message"), [
    (CkksParams(4096, (60, 50)), "above the 128-bit security bound of 109 bits"),
    (CkksParams(8192, (60, 60, 60, 40)), "bound of 218 bits"),
    (CkksParams(16384, (60,) * 8), "bound of 438 bits"),
    (CkksParams(2048, (30, 24)), "must be one of"),
    (CkksParams(4096, (60,)), "at least two primes"),
    (CkksParams(8192, (70, 60), scale_bits=52), "20..60 bits"),
    (CkksParams(4096, (60, 49), scale_bits=53), "8 bits of headroom"),
    (CkksParams(4096, (40, 40), scale_bits=34, release_bits=20), "scale_bits must be between"),
    (CkksParams(4096, (60, 49), release_bits=40), "release_bits must be between"),
])
def test_parameters_are_validated_against_seal_bounds(params: CkksParams, message: str) -> None:
    with pytest.raises(EncryptionError, match=message):
        params.validate()


@pytest.mark.parametrize("params", [
    CkksParams(), CkksParams(8192, (60, 40, 60), scale_bits=40, release_bits=24),
    CkksParams(16384, (60,) * 7), CkksParams(4096, (54, 54), scale_bits=46, release_bits=30),
])
def test_parameters_within_the_bounds_are_accepted(params: CkksParams) -> None:
    assert params.validate() is params and params.headroom >= 128


# -- malformed ciphertexts ------------------------------------------------------------------

@pytest.fixture(scope="module")
def good(secret: SecretKey) -> EncryptedVector:
    return secret.encrypt(np.full(3000, 0.25))  # two ciphertexts (2048 + 952 values)


@pytest.fixture(scope="module")
def other_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SecretKey]:
    base = tmp_path_factory.mktemp("other")
    return {
        "ring": SecretKey.load(create_keyset(base / "ring", CkksParams(8192, (60, 40), 40, 26)).secret),
        "scale": SecretKey.load(create_keyset(base / "scale", CkksParams(4096, (60, 49), 40, 26)).secret),
        "same": SecretKey.load(create_keyset(base / "same").secret),
    }


def _swap(enc: EncryptedVector, i: int, blob: bytes) -> EncryptedVector:
    chunks = list(enc.chunks)
    chunks[i] = blob
    return EncryptedVector(enc.key_id, enc.values, tuple(chunks))


def test_garbage_wrong_context_wrong_length_and_oversized_are_rejected(
        coord: CoordinatorContext, secret: SecretKey, good: EncryptedVector,
        other_sets: dict[str, SecretKey]) -> None:
    """Tagged by a key holder (so past the integrity check): the shape checks still hold."""
    limit = coord.params.ciphertext_bytes + 4096
    ring = other_sets["ring"].encrypt(np.full(3000, 0.25))
    scale = other_sets["scale"].encrypt(np.full(3000, 0.25))
    cases = {
        "garbage": (_swap(good, 0, os.urandom(len(good.chunks[0]))), "not a CKKS ciphertext"),
        "truncated": (_swap(good, 1, good.chunks[1][: len(good.chunks[1]) // 2]), "not a CKKS ciphertext"),
        "empty": (_swap(good, 0, b""), "holds 0 values"),
        "oversized": (_swap(good, 0, good.chunks[0] + b"\0" * limit), "over the"),
        "wrong ring": (EncryptedVector(good.key_id, 3000, ring.chunks), "ciphertext"),
        "wrong scale": (EncryptedVector(good.key_id, 3000, scale.chunks), "wrong size, level or scale"),
        "too few values": (EncryptedVector(good.key_id, 2999, good.chunks), "expected 3000"),
        "missing chunk": (EncryptedVector(good.key_id, 3000, good.chunks[:1]), "1 ciphertexts, expected 2"),
        "swapped chunks": (EncryptedVector(good.key_id, 3000, good.chunks[::-1]), "holds 952 values"),
        "other key set": (other_sets["same"].encrypt(np.full(3000, 0.25)), "key set"),
    }
    for name, (enc, message) in cases.items():
        with pytest.raises(MalformedCiphertextError, match=message):
            _parse(coord, secret, enc, 3000)
        assert name  # every case raised the recorded-reason error, nothing else
    assert len(_parse(coord, secret, good, 3000)) == 2


def test_mutated_bytes_never_crash_the_coordinator(
        coord: CoordinatorContext, secret: SecretKey, good: EncryptedVector) -> None:
    """Random flips, cuts and splices, tagged by a key holder: each parses as some ciphertext or is
    rejected, nothing else. (Without a key holder's tag, none would get past the integrity check.)"""
    rnd = random.Random(7)
    base = good.chunks[0]
    outcomes = {"parsed": 0, "rejected": 0}
    for _ in range(150):
        blob = bytearray(base)
        kind = rnd.choice(["flip", "cut", "splice", "head"])
        if kind == "flip":
            for _ in range(rnd.randint(1, 8)):
                blob[rnd.randrange(len(blob))] ^= 1 << rnd.randrange(8)
        elif kind == "cut":
            del blob[rnd.randrange(len(blob)):]
        elif kind == "splice":
            at = rnd.randrange(len(blob))
            blob[at:at] = os.urandom(rnd.randint(1, 64))
        else:
            blob[: rnd.randint(1, 64)] = os.urandom(rnd.randint(1, 64))
        try:
            _parse(coord, secret, _swap(good, 0, bytes(blob)), 3000)
            outcomes["parsed"] += 1
        except MalformedCiphertextError:
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 0 and sum(outcomes.values()) == 150


def test_checkpoint_file_round_trips_and_detects_truncation(
        secret: SecretKey, good: EncryptedVector, tmp_path: Path) -> None:
    path = tmp_path / "round-0001.ckks"
    good.to_file(path, {"arch": "mlp"})
    back, meta = EncryptedVector.from_file(path)
    assert back == good and meta["arch"] == "mlp"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(EncryptionError, match="truncated"):
        EncryptedVector.from_file(path)
    with pytest.raises(EncryptionError, match="key set"):
        secret.decrypt(EncryptedVector("0" * 16, good.values, good.chunks))


def test_keys_create_cli_writes_a_key_set_and_explains_bad_parameters(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from veil.cli.main import app

    ok = CliRunner().invoke(app, ["keys", "create", str(tmp_path / "ks")])
    assert ok.exit_code == 0 and "never to the coordinator" in ok.output
    assert CoordinatorContext.load(tmp_path / "ks" / "coordinator.ckks").is_private() is False
    bad = CliRunner().invoke(app, ["keys", "create", str(tmp_path / "ks2"), "--coeff-mod-bit-sizes", "60,60"])
    assert bad.exit_code == 9 and "109 bits" in bad.output and not (tmp_path / "ks2" / "secret.ckks").exists()
    again = CliRunner().invoke(app, ["keys", "create", str(tmp_path / "ks")])
    assert again.exit_code == 9 and "already exists" in again.output


# -- reply integrity: a tag binds the stream to its key set, run, round, site and kind ------------

def test_a_reply_tag_binds_key_set_run_round_site_kind_and_every_byte(
        coord: CoordinatorContext, secret: SecretKey, good: EncryptedVector,
        other_sets: dict[str, SecretKey]) -> None:
    tag = secret.tag(good, BIND)
    coord.verify(good, tag, BIND)  # the honest reply
    assert len(coord.parse(good, 3000, tag=tag, binding=BIND)) == 2
    flipped = bytearray(good.chunks[1])
    flipped[len(flipped) // 2] ^= 0x01
    other = other_sets["same"].encrypt(np.full(3000, 0.25))  # another key set of the same parameters
    spoofed = EncryptedVector(good.key_id, other.values, other.chunks)  # ... claiming the victim's key id
    wrong = {
        "another site": (good, tag, ReplyBinding(BIND.run, 1, "site-1", "update")),
        "another round": (good, tag, ReplyBinding(BIND.run, 2, "site-0", "update")),
        "another run": (good, tag, ReplyBinding("run-2:8899aabbccddeeff", 1, "site-0", "update")),
        "another kind": (good, tag, ReplyBinding(BIND.run, 1, "site-0", "eval-sums")),
        "a flipped byte": (_swap(good, 1, bytes(flipped)), tag, BIND),
        "another key set, the victim's tag": (spoofed, tag, BIND),
        "another key set, its own tag": (spoofed, other_sets["same"].tag(spoofed, BIND), BIND),
        "another key set, no tag": (spoofed, b"", BIND),
        "a short tag": (good, tag[:16], BIND),
    }
    for name, (enc, bad_tag, binding) in wrong.items():
        with pytest.raises(ReplyIntegrityError, match="integrity tag") as caught:
            coord.parse(enc, 3000, tag=bad_tag, binding=binding)
        assert caught.value.code == "ckks-integrity", name
    with pytest.raises(ReplyIntegrityError):  # the value count is under the tag too
        coord.verify(EncryptedVector(good.key_id, 2999, good.chunks), tag, BIND)
    with pytest.raises(ReplyIntegrityError):  # checked before TenSEAL reads a byte: garbage fails the tag
        coord.parse(_swap(good, 0, os.urandom(64)), 3000, tag=tag, binding=BIND)


def test_the_spoof_the_tag_stops_would_parse_and_add_garbage_without_it(
        coord: CoordinatorContext, secret: SecretKey, good: EncryptedVector,
        other_sets: dict[str, SecretKey]) -> None:
    """Why a tag and not more parsing: another key set's ciphertext under the victim's key id is a
    well-formed ciphertext, and its sum decrypts to garbage."""
    other = other_sets["same"].encrypt(np.full(3000, 0.25))
    spoofed = EncryptedVector(good.key_id, other.values, other.chunks)
    vouched = coord.parse(spoofed, 3000, tag=secret.tag(spoofed, BIND), binding=BIND)  # a key holder vouches
    total = coord.add([_parse(coord, secret, good, 3000), vouched])
    assert np.max(np.abs(secret.decrypt(total) - 0.5)) > 1.0


def test_key_files_hold_one_random_reply_key_the_coordinators_copy_is_private(
        keyset: KeySetPaths, tmp_path: Path) -> None:
    import json

    def header(path: Path) -> dict:
        return json.loads(path.read_bytes().split(b"\n", 2)[1])

    secret_h, coord_h = header(keyset.secret), header(keyset.coordinator)
    assert len(bytes.fromhex(secret_h["reply_key"])) == 32 and secret_h["reply_key"] == coord_h["reply_key"]
    assert "reply_key" not in (keyset.directory / "keyset.json").read_text()  # the public description
    another = create_keyset(tmp_path / "another")
    assert header(another.coordinator)["reply_key"] != coord_h["reply_key"]
    assert stat.S_IMODE(keyset.coordinator.stat().st_mode) == 0o600
    shared = tmp_path / "shared.ckks"
    shared.write_bytes(keyset.coordinator.read_bytes())
    os.chmod(shared, 0o644)
    with pytest.raises(EncryptionError, match="holds the key set's reply key; run: chmod 600"):
        CoordinatorContext.load(shared)


def test_a_key_set_that_predates_reply_integrity_is_refused_for_replies_but_still_decrypts(
        keyset: KeySetPaths, secret: SecretKey, tmp_path: Path) -> None:
    import json

    def legacy(path: Path) -> Path:
        magic, head, body = path.read_bytes().split(b"\n", 2)
        meta = json.loads(head)
        del meta["reply_key"]
        out = tmp_path / path.name
        out.write_bytes(magic + b"\n" + json.dumps(meta).encode() + b"\n" + body)
        os.chmod(out, 0o600)
        return out

    message = f"^key set {keyset.info.key_id} predates reply integrity; make a new one with veil keys create$"
    with pytest.raises(EncryptionError, match=message):
        CoordinatorContext.load(legacy(keyset.coordinator))
    old = SecretKey.load(legacy(keyset.secret))  # a researcher can still read old results
    enc = secret.encrypt(np.linspace(-1, 1, 10))
    assert np.max(np.abs(old.decrypt(enc) - np.linspace(-1, 1, 10))) < 1e-6
    with pytest.raises(EncryptionError, match=message):
        old.tag(enc, BIND)
    with pytest.raises(EncryptionError, match=message):
        old.check_can_tag()
