"""TLS certificates for the coordinator and key pairs for SuperNode authentication.

``create_certs`` makes a private CA and a coordinator (SuperLink) certificate signed by it,
valid for the host names and IP addresses sites will dial. Sites get only ``ca.crt``.
``create_site_node_key`` makes a site's ECDSA (P-384) key pair in OpenSSH format, the format
Flower's SuperNode authentication reads, named after the site (``NAME.node-key`` and
``NAME.node-key.pub``, the site's name also in the public key's comment); the coordinator
registers the public half. ``read_node_public_key`` reads that half back with its SHA-256
fingerprint (as ``ssh-keygen -l`` prints it), and ``registered_name`` picks the name a
coordinator records it under. Private keys are written with mode 600 and never overwritten.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from veil.errors import CertError
from veil.files import atomic_write, read_small
from veil.names import site_id_problem

NODE_KEY_SUFFIX = ".node-key"  # NAME.node-key (private) and NAME.node-key.pub
MAX_PUBLIC_KEY_BYTES = 16_384  # an OpenSSH ECDSA public key is about 250 bytes


@dataclass(frozen=True)
class CertSet:
    """Where ``create_certs`` wrote the CA and server certificates and their keys (keys mode 600)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _write(path: Path, data: bytes, *, private: bool) -> None:
    try:
        atomic_write(path, data, mode=0o600 if private else 0o644, exclusive=True)
    except FileExistsError:
        raise CertError(f"{path} exists; refusing to overwrite (move it away first)") from None


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def create_certs(directory: Path, hosts: list[str], *, days: int = 365, org: str = "Veil federation"
                 ) -> CertSet:
    """A CA and a server certificate for ``hosts`` (DNS names or IP addresses)."""
    if not hosts:
        raise CertError("name at least one host the sites will dial (e.g. --host coordinator.example.org)")
    if days < 1:
        raise CertError(f"--days must be at least 1, got {days}")
    out = CertSet(directory / "ca.crt", directory / "ca.key", directory / "server.crt", directory / "server.key")
    existing = [p for p in vars(out).values() if Path(p).exists()]
    if existing:
        raise CertError(f"{', '.join(map(str, existing))} exist; refusing to overwrite (use a new directory)")
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c in host for c in " /:@"):
                raise CertError(f"{host!r} is neither a host name nor an IP address") from None
            sans.append(x509.DNSName(host))
    now = datetime.now(UTC) - timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"{org} CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                                       x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + timedelta(days=days))
              .add_extension(x509.SubjectAlternativeName(sans), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                             critical=False)
              .sign(ca_key, hashes.SHA384()))
    _write(out.ca_key, _pem_key(ca_key), private=True)
    _write(out.ca_cert, ca.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out.server_key, _pem_key(key), private=True)
    _write(out.server_cert, server.public_bytes(serialization.Encoding.PEM), private=False)
    return out


def create_node_key(private_path: Path, *, comment: str = "") -> Path:
    """A SuperNode key pair at ``private_path`` (private, OpenSSH, mode 600) and ``<private_path>.pub``,
    ``comment`` in the public key's comment field; returns the public key's path."""
    public_path = private_path.with_name(private_path.name + ".pub")
    for p in (private_path, public_path):
        if p.exists():
            raise CertError(f"{p} exists; refusing to overwrite a node key")
    key = ec.generate_private_key(ec.SECP384R1())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()), private=True)
    _write(public_path, public + (f" {comment}".encode() if comment else b"") + b"\n", private=False)
    return public_path


def node_key_paths(directory: Path, site: str) -> tuple[Path, Path]:
    """Where site ``site``'s node key pair goes in ``directory``: ``NAME.node-key`` and ``NAME.node-key.pub``."""
    private = directory / f"{site}{NODE_KEY_SUFFIX}"
    return private, private.with_name(private.name + ".pub")


def create_site_node_key(directory: Path, site: str) -> tuple[Path, Path]:
    """Site ``site``'s node key pair in ``directory``, named after it and its name in the public key's
    comment (what the coordinator registers it under); returns (private, public)."""
    problem = site_id_problem(site)
    if problem is not None:
        raise CertError(f"--site {site!r} {problem}; use the site's site_id from its site.yaml, e.g. "
                        "--site hospital-a")
    private, public = node_key_paths(directory, site)
    create_node_key(private, comment=site)
    return private, public


@dataclass(frozen=True)
class NodePublicKey:
    """A site's public node key as read from its ``.pub`` file: the fingerprint and the comment."""

    key_type: str  # ecdsa-sha2-nistp384
    fingerprint: str  # "SHA256:<base64>" of the key blob, as `ssh-keygen -l` prints it
    comment: str  # the site's name when `veil certs node-key --site` made it; may be empty


def read_node_public_key(path: Path) -> NodePublicKey:
    """The OpenSSH ECDSA public key in ``path``, or a ``CertError`` saying what is wrong with it."""
    try:
        raw = read_small(path, MAX_PUBLIC_KEY_BYTES)
    except FileNotFoundError:
        raise CertError(f"{path}: no such public key file (the site's NAME.node-key.pub)") from None
    except OSError as err:
        raise CertError(f"{path} {err.strerror or err}") from None
    fields = raw.decode("utf-8", "replace").strip().split(maxsplit=2)
    if len(fields) < 2 or not fields[0].startswith("ecdsa-sha2-nistp"):
        raise CertError(f"{path} is not an OpenSSH ECDSA public key (make one with `veil certs node-key "
                        "--site NAME`)")
    try:
        blob = base64.b64decode(fields[1], validate=True)
        serialization.load_ssh_public_key(f"{fields[0]} {fields[1]}".encode())
    except (binascii.Error, ValueError) as err:
        raise CertError(f"{path} holds a damaged OpenSSH public key ({err}); ask the site for its "
                        "NAME.node-key.pub again") from None
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return NodePublicKey(fields[0], f"SHA256:{digest}", fields[2].strip() if len(fields) > 2 else "")


def registered_name(public_key: Path, key: NodePublicKey, name: str | None) -> str:
    """The name a site is registered under: ``name`` (--name), else the key's comment, else the file's
    name without ``.pub`` and ``.node-key``; a ``CertError`` when that is not a valid site id."""
    if name is not None:
        chosen, source = name, "--name"
    elif key.comment:
        chosen, source = key.comment, f"the comment in {public_key.name}"
    else:
        stem = public_key.name.removesuffix(".pub").removesuffix(NODE_KEY_SUFFIX)
        chosen, source = stem, f"the file name {public_key.name}"
    problem = site_id_problem(chosen)
    if problem is not None:
        raise CertError(f"site name {chosen!r} (from {source}) {problem}; give the site's site_id with "
                        "--name NAME")
    return chosen
