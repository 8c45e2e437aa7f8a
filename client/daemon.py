"""The site daemon: ``veil site check`` and ``veil site start --config site.yaml``.

A site administrator writes one ``site.yaml``: where the data is and how to read it, the
ledger file, the CKKS key (optional), the site's own privacy policy, the device, and how to
reach the coordinator (address, the federation CA certificate, this site's node key).

``check`` runs the preflight only: the config is valid, the data loads and is well formed
(and looks scaled, or the site standardizes it with its own statistics: ``client.standardize``),
the key is present and private, the ledger is intact, the device is usable, the node key and
CA certificate are readable. ``start`` runs the same preflight and, only if it passes,
starts a Flower SuperNode (TLS, node authentication) whose ClientApp resolves this site
from ``site-config`` in its node config, and keeps it in the federation (``client.supervisor``:
it waits for the coordinator, restarts a SuperNode that is lost, and writes a status file that
``veil site status`` reads). It logs JSON lines to stdout and stops the SuperNode cleanly on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from client.loaders import DataSource
from privacy.policy import SitePolicy
from veil import config
from veil import env as veil_env
from veil.config import CleanPath, Text, clean
from veil.errors import ScenarioError, VeilError
from veil.exits import ExitCode
from veil.files import read_small, regular_file_problem
from veil.logs import get_logger

if TYPE_CHECKING:
    from client.data import ArrayDataset

log = get_logger("client")

MAX_KEY_BYTES = 1_000_000  # a CA certificate or node key is a few kilobytes; never read one without a bound
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # "3" is not a number, .inf not a float


class CoordinatorSpec(BaseModel):
    """How the SuperNode reaches the coordinator: its address, the federation's CA and this site's node key."""

    model_config = _STRICT

    address: Text = Field(min_length=1, max_length=255, description="the coordinator's SuperLink as host:port")
    root_certificates: CleanPath = Field(description="the federation's CA certificate (ca.crt)")
    node_key: CleanPath = Field(description="this site's SuperNode private key (registered by the coordinator)")


class SiteConfig(BaseModel):
    """``site.yaml``. Relative paths are relative to the file."""

    model_config = _STRICT

    site_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$",
                         description="letters, digits, '_', '-' and '.', not first: never '.', '..' or a "
                         "hidden name, since it names files and directories")
    data: DataSource
    test_fraction: float = Field(0.2, ge=0.01, le=0.9, description="share held out for evaluation, 0.01..0.9: "
                                 "less leaves no meaningful test set, more leaves too little to train on")
    split_seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the train/test split (keep it fixed: "
                            "the ledger fingerprints the training split)")
    standardize: bool = Field(
        False, description="z-score every feature with this site's own mean and std, computed on its "
        "training split and applied to train and test alike; the statistics stay in the site's log, never "
        "sent, and are computed without DP noise (what they reveal through the model is not covered by "
        "epsilon). The data set id stays the records', so turning it on or off never opens a fresh budget")
    ledger: CleanPath
    ledger_id: str | None = Field(
        None, pattern=r"^[0-9a-f]{32}$",
        description="the id of this site's ledger, written here once by `veil site init`; a ledger file "
        "with another id, or none at all, is refused")
    keys: CleanPath | None = Field(None, description="the key set's secret.ckks, for CKKS runs")
    policy: SitePolicy = Field(default_factory=SitePolicy)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    coordinator: CoordinatorSpec
    poll_interval_s: float = Field(
        0.5, ge=0.1, le=3.0, description="how often the idle SuperNode asks the coordinator for a message, "
        "in seconds (Flower's own: 3). Each site costs the coordinator one small call per interval")
    runtime_port: int | None = Field(
        None, ge=1024, le=65535, description="the SuperNode's local runtime API port (127.0.0.1); default: a "
        "free port chosen at start, so sites on one host never collide")


def load_site_config(path: Path) -> SiteConfig:
    """Read and validate ``site.yaml``; relative paths come back resolved against the file's directory.

    The CA certificate and node key, when present, must be regular files (a FIFO would block the
    TLS probe and Flower, a device would be read without end): a ``ScenarioError`` otherwise."""
    path = Path(path).expanduser()
    cfg = config.validate(SiteConfig, config.read_yaml(path, what="site config", error=ScenarioError),
                          what="site config", source=str(path), error=ScenarioError)
    base = path.resolve().parent

    def rel(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else base / p

    coordinator = {"root_certificates": rel(cfg.coordinator.root_certificates),
                   "node_key": rel(cfg.coordinator.node_key)}
    for field, file in coordinator.items():  # read outside the preflight too (TLS probe, Flower)
        problem = regular_file_problem(file)
        if problem:
            raise ScenarioError(f"site config {clean(str(path))}: coordinator.{field} {clean(str(file))} "
                                f"{problem}")
    return cfg.model_copy(update={
        "policy": cfg.policy.model_copy(update={
            "trusted_researchers": tuple(str(rel(Path(p))) for p in cfg.policy.trusted_researchers)}),
        "data": cfg.data.model_copy(update={"path": rel(cfg.data.path)}),
        "ledger": rel(cfg.ledger), "keys": rel(cfg.keys) if cfg.keys else None,
        "coordinator": cfg.coordinator.model_copy(update=coordinator),
    })


@dataclass(frozen=True)
class Check:
    """One preflight check's outcome: its name, whether it passed, and what it found."""

    name: str
    ok: bool
    detail: str
    warning: bool = False  # passed, but the administrator should read it


class Warn(Exception):
    """Raised by a preflight check that passes but has something to say."""


def preflight(cfg: SiteConfig) -> list[Check]:
    """Every check, each with what it found; nothing here connects anywhere."""
    from client.device import resolve_device
    from client.loaders import load_site_data

    checks: list[Check] = []
    config_name = "site.yaml"

    def run(name: str, fn: Any) -> None:
        try:
            checks.append(Check(name, True, fn()))
        except Warn as warning:
            checks.append(Check(name, True, str(warning), warning=True))
        except (VeilError, OSError, ValueError) as err:
            checks.append(Check(name, False, str(err)))

    def data() -> str:
        from client.standardize import unscaled

        ds, classes = load_site_data(cfg.data)
        n_test = max(1, round(len(ds) * cfg.test_fraction))
        if len(ds) - n_test < 2:
            raise VeilError(f"{cfg.data.path}: {len(ds)} records leave fewer than 2 to train on")
        train, test = split_site_data(ds, cfg)
        cfg.policy.delta_for(len(train))  # a δ the policy cannot meet fails here
        detail = (f"{cfg.data.format} {cfg.data.path}: {len(ds)} records, features "
                  f"{tuple(ds.features.shape[1:])}, {len(classes)} classes; {len(train)} train / {len(test)} test")
        if cfg.standardize:
            return f"{detail}; standardized with the site's own statistics (of its training split, never sent)"
        seen = unscaled(train.features)
        if seen:
            raise Warn(f"{detail}; the training features look unscaled: {seen}. DP-SGD clips each record's "
                       "gradient, so large features drown the others and training stalls or diverges: "
                       "set standardize: true in site.yaml")
        return detail

    def small_file(path: Path, what: str) -> bytes:
        try:
            return read_small(path, MAX_KEY_BYTES)
        except FileNotFoundError:
            raise VeilError(f"{clean(str(path))}: no such {what} file") from None
        except OSError as err:
            raise VeilError(f"{what} {clean(str(path))} {clean(err.strerror or str(err), 160)}") from None

    def key() -> str:
        if cfg.keys is None:
            return "no CKKS key: this site joins plaintext runs only" + (
                " (but policy.require_encryption is set: it will refuse every run)"
                if cfg.policy.require_encryption else "")
        from privacy.ckks import SecretKey

        problem = regular_file_problem(cfg.keys)
        if problem:
            raise VeilError(f"CKKS key {clean(str(cfg.keys))} {problem}")
        return f"{cfg.keys}: key set {SecretKey.load(cfg.keys).key_id} (mode 600)"

    def ledger() -> str:
        if cfg.ledger_id is None:
            raise VeilError(f"site.yaml pins no ledger_id: run `veil site init --config {config_name}` once; it "
                            "creates the ledger (or adopts the existing one) and writes its id into site.yaml")
        from privacy.ledger import SiteLedger, ledger_report

        SiteLedger(cfg.ledger, site_id=cfg.site_id, ledger_id=cfg.ledger_id, create=False).close()
        report = ledger_report(cfg.ledger)
        detail = (f"{cfg.ledger}: ledger {report.ledger_id} of site {report.site_id}, intact, "
                  f"{report.head.seq} entries over {len(report.datasets)} data set(s)")
        if report.predecessor:
            detail += f"; replaces lost ledger {report.predecessor} ({report.head.replaced_reason or 'no reason'})"
        return detail

    def scope() -> str:
        if cfg.policy.cap_scope == "dataset":
            raise Warn("policy.cap_scope is dataset: the lifetime cap counts per exact data file, so the same "
                       "records saved again (another column order or format, one appended row) start a fresh "
                       "budget. Use cap_scope: ledger (the default) unless the data sets are truly disjoint")
        cap = "no lifetime cap" if cfg.policy.epsilon_cap is None else f"lifetime cap ε {cfg.policy.epsilon_cap:g}"
        return f"cap_scope ledger: {cap} over everything this site's ledger has ever charged"

    def researchers() -> str:
        from privacy.requests import load_researchers

        found = load_researchers([Path(p) for p in cfg.policy.trusted_researchers])
        if not found:
            raise Warn("policy.trusted_researchers lists no researcher keys: this site refuses every run until "
                       "you add the public keys (NAME.pub) of the researchers whose runs may spend its budget")
        return "trusts " + ", ".join(r.label() for r in found.values())

    def device() -> str:
        dev = resolve_device(cfg.device)
        if dev.type == "cuda":
            import torch

            return f"cuda ({torch.cuda.get_device_name(dev)})"
        return "cpu"

    def node_key() -> str:
        k = cfg.coordinator.node_key
        problem = regular_file_problem(k)
        if problem:
            raise VeilError(f"node key {clean(str(k))} {problem}")
        if not k.is_file():
            raise VeilError(f"{k}: no node key; make one with `veil certs node-key {k}` and have the "
                            "coordinator register its .pub")
        mode = stat.S_IMODE(k.stat().st_mode)
        if mode & 0o077:
            raise VeilError(f"{k} is readable by others (mode {mode:o}); run: chmod 600 {k}")
        from cryptography.hazmat.primitives.serialization import load_ssh_private_key

        load_ssh_private_key(small_file(k, "node key"), password=None)
        return f"{k}: OpenSSH private key, mode 600"

    def ca() -> str:
        from cryptography import x509

        c = cfg.coordinator.root_certificates
        cert = x509.load_pem_x509_certificate(small_file(c, "CA certificate"))
        if cert.not_valid_after_utc < datetime.now(UTC):
            raise VeilError(f"{c}: the CA certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        return f"{c}: {cert.subject.rfc4514_string()}, valid until {cert.not_valid_after_utc:%Y-%m-%d}"

    for name, fn in (("data", data), ("key", key), ("ledger", ledger), ("budget scope", scope),
                     ("researchers", researchers), ("device", device), ("node key", node_key),
                     ("ca certificate", ca)):
        run(name, fn)
    return checks


def probe_coordinator(address: str, ca: Path, timeout: float = 5.0) -> Check:
    """One TLS handshake with the coordinator, verified against the federation's CA, telling
    "certificate not trusted" (a configuration error: ``ok`` False) apart from "nothing
    listening" or "no answer" (the coordinator may be down: a warning; the site waits for it)."""
    import socket
    import ssl

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.set_alpn_protocols(["h2"])  # what gRPC speaks
        with socket.create_connection((host, int(port)), timeout=timeout) as sock, \
                ctx.wrap_socket(sock, server_hostname=host) as tls:
            issuer = dict(x[0] for x in tls.getpeercert().get("issuer", ()))  # type: ignore[misc, union-attr]
            return Check("coordinator", True, f"TLS to {address} verified against {ca} (issued by "
                         f"{issuer.get('commonName', '?')})")
    except ssl.SSLCertVerificationError as err:
        return Check("coordinator", False, f"{address} answered, but its certificate is not trusted by {ca} "
                     f"({err.verify_message}): use the federation's ca.crt from the coordinator, and an "
                     "address its certificate names (veil certs create --host)")
    except ssl.SSLError as err:
        return Check("coordinator", False, f"{address} answered, but not with TLS the site accepts "
                     f"({err.reason or err}): is it the coordinator's Fleet port?")
    except ConnectionRefusedError:
        return Check("coordinator", True, f"nothing is listening at {address} (connection refused): the "
                     "coordinator is down or the address or port is wrong; the site waits for it", warning=True)
    except TimeoutError:
        return Check("coordinator", True, f"{address} did not answer within {timeout:.0f} s: a firewall, or the "
                     "coordinator is down; the site waits for it", warning=True)
    except (OSError, ValueError) as err:
        return Check("coordinator", True, f"cannot reach {address} ({err}); the site waits for it",
                     warning=True)


def supernode_command(cfg: SiteConfig, config_path: Path, worker_socket: Path | None = None) -> list[str]:
    """The SuperNode's command line: ``flower-supernode`` (through ``client.supervisor.supernode_main``,
    which exits when Flower gives up) with TLS, node authentication, ``site-id``, ``site-config``
    and the worker's socket (``site-socket``) in the node config, and no retry limit: Flower
    retries with backoff until the coordinator answers."""
    import sys

    from veil.processes import flower_exe

    flower_exe("flower-supernode")  # Flower is installed, or a DeployError says how to install it
    node_config = {"site-id": cfg.site_id, "site-config": str(config_path.resolve())}
    if worker_socket is not None:
        node_config["site-socket"] = str(worker_socket)
    return [sys.executable, "-P", "-c", "from client.supervisor import supernode_main; supernode_main()",
            "--superlink", cfg.coordinator.address,
            "--root-certificates", str(cfg.coordinator.root_certificates),
            "--auth-supernode-private-key", str(cfg.coordinator.node_key),
            "--node-config", " ".join(f"{k}={_toml_string(v)}" for k, v in node_config.items()),
            "--port", str(cfg.runtime_port or free_local_port())]


def _toml_string(value: str) -> str:
    """``value`` as a TOML string Flower's node-config parser reads back unchanged."""
    if "'" not in value and "\n" not in value:
        return f"'{value}'"  # a literal string: backslashes stay backslashes
    return json.dumps(value)  # a basic string; JSON's escapes are TOML's


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_event(event: str, **fields: Any) -> None:
    """One JSON object per line on stdout: what a log shipper wants."""
    print(json.dumps({"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event, **fields},
                     default=str), flush=True)


def run_site(config_path: Path) -> int:
    """Preflight, then keep the SuperNode in the federation until SIGTERM/SIGINT (0): it waits
    for an unreachable coordinator and is restarted when lost (``client.supervisor``). Exits
    non-zero only on a configuration error: 3 when the preflight fails, ``ExitCode.DEPLOY``
    when Flower rejects this site's key, certificates or address."""
    cfg = load_site_config(config_path)
    checks = preflight(cfg)
    for c in checks:
        log_event("preflight", site=cfg.site_id, check=c.name, ok=c.ok, detail=c.detail)
    if all(c.ok for c in checks):  # a coordinator that is down is waited for; an untrusted one is not
        probe = probe_coordinator(cfg.coordinator.address, cfg.coordinator.root_certificates)
        log_event("preflight", site=cfg.site_id, check=probe.name, ok=probe.ok, detail=probe.detail)
        checks.append(probe)
    failed = [c for c in checks if not c.ok]
    if failed:
        log_event("refused-to-start", site=cfg.site_id,
                  reason=f"preflight failed: {', '.join(c.name for c in failed)}")
        return 3
    import tempfile

    from client.supervisor import POLL_ENV, SiteStatus, Supervisor, status_path
    from veil.processes import SUPEREXEC_POLL_ENV, pinned_path, start_reaper, this_process

    start_reaper()  # a SIGKILLed daemon takes its SuperNode (own process group) with it

    host, pid, token = this_process()
    status = SiteStatus(site=cfg.site_id, coordinator=cfg.coordinator.address, host=host, pid=pid, pid_token=token)
    path = status_path(Path(config_path))
    log_event("status-file", site=cfg.site_id, path=str(path))

    def emit(event: str, **kw: Any) -> None:
        log_event(event, site=cfg.site_id, **kw)

    # this site runs its own Veil only; the worker's socket lives in a directory only this user enters
    with tempfile.TemporaryDirectory(prefix="veil-site-bin-") as runners, \
            tempfile.TemporaryDirectory(prefix="veil-site-") as private:
        env = {**os.environ, "PATH": pinned_path(Path(runners)), "FLWR_DISABLE_UPDATE_CHECK": "1",
               POLL_ENV: repr(cfg.poll_interval_s)}
        env.setdefault(SUPEREXEC_POLL_ENV, "0.2")  # Flower starts the ClientApp process within 0.2 s, not 1 s
        keeper = None
        if os.environ.get(veil_env.SITE_WORKER, "on").strip().lower() not in ("off", "0", "false", "no"):
            from client.worker import WorkerKeeper, worker_command

            sock = Path(private) / "worker.sock"
            keeper = WorkerKeeper(worker_command(config_path, sock), env, sock, emit)
        supervisor = Supervisor(supernode_command(cfg, config_path, keeper.path if keeper else None), env,
                                status, path, emit)
        if keeper is None:
            emit("worker-off", reason=f"{veil_env.SITE_WORKER}=off: each message is answered in its own process")
            return supervisor.run()
        status.worker = keeper.status

        def worker_changed() -> None:
            status.worker = keeper.status
            supervisor.write()

        keeper.on_change = worker_changed
        keeper.start()
        try:
            problem = supervisor.until_ready(keeper)
            if supervisor.stop_signal is not None:
                supervisor.to("stopped", f"stopped on {supervisor.stop_signal}")
                return 0
            if problem:
                supervisor.to("failed", problem)
                return int(ExitCode.DEPLOY)
            return supervisor.run()
        finally:
            keeper.stop()
            supervisor.write()


def split_site_data(ds: ArrayDataset, cfg: SiteConfig) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test): ``cfg.test_fraction`` of the records held out, by ``cfg.split_seed``."""
    import numpy as np

    order = np.random.default_rng(cfg.split_seed).permutation(len(ds))
    n_test = max(1, round(len(ds) * cfg.test_fraction))
    return ds.subset(order[n_test:]), ds.subset(order[:n_test])


_SAID: set[str] = set()  # standardization summaries already logged by this process


def standardize_site_data(site_id: str, train: ArrayDataset, test: ArrayDataset
                          ) -> tuple[ArrayDataset, ArrayDataset]:
    """``train`` and ``test`` z-scored with ``train``'s own statistics (``client.standardize``),
    summarised once in the site's log; nothing of them leaves this function otherwise."""
    from client.data import ArrayDataset
    from client.standardize import FeatureStats

    stats = FeatureStats.of(train.features)
    line = f"{site_id}: standardized with its own statistics, {stats.summary()}; kept here, never sent"
    if line not in _SAID:
        _SAID.add(line)
        log.info("%s", line)
    return (ArrayDataset(stats.apply(train.features), train.labels),
            ArrayDataset(stats.apply(test.features), test.labels))


def worker_main() -> None:
    """The site worker's process (``client.worker``), serving the site of ``--config``."""
    from client.worker import main

    main(site_from_config, site_inputs)


def site_inputs(config_path: Path) -> list[Path]:
    """Every file the site's answers depend on: site.yaml, the data, the CKKS key and the trusted
    researcher keys (a long-lived worker reloads the site when one of them changes)."""
    cfg = load_site_config(config_path)
    paths = [Path(config_path), cfg.data.path, *(Path(p) for p in cfg.policy.trusted_researchers)]
    return paths + ([cfg.keys] if cfg.keys else [])


def site_from_config(path: Path) -> Any:
    """The ``Site`` behind a deployed SuperNode (the ClientApp's resolver calls this)."""
    from client.device import resolve_device
    from client.loaders import load_site_data
    from client.site import Site
    from privacy.requests import load_researchers

    cfg = load_site_config(path)
    researchers = tuple(load_researchers([Path(p) for p in cfg.policy.trusted_researchers]).values())
    ds, _ = load_site_data(cfg.data)
    train, test = split_site_data(ds, cfg)
    records = None  # the data set id is the records', however the site scales them for training
    if cfg.standardize:  # after the split: the test records never shape the statistics
        from privacy.ledger import fingerprint_arrays

        records = fingerprint_arrays(*train.to_torch().tensors)
        train, test = standardize_site_data(cfg.site_id, train, test)
    return Site(cfg.site_id, train.to_torch(), test.to_torch(), resolve_device(cfg.device), cfg.ledger,
                cfg.policy, cfg.keys, ledger_id=cfg.ledger_id, researchers=researchers,
                records_fingerprint=records)


def init_ledger(config_path: Path, *, new_ledger: bool = False, reason: str | None = None) -> str:
    """``veil site init``: create the site's ledger (or adopt an existing one) and pin its id in
    site.yaml. With ``new_ledger``, replace a pinned ledger that is lost, on the record."""
    from privacy.ledger import SiteLedger, create_ledger
    from veil.errors import LedgerError

    cfg = load_site_config(config_path)
    path = Path(config_path)
    if cfg.ledger_id is not None and not new_ledger:
        if not cfg.ledger.exists():
            raise LedgerError(f"ledger {cfg.ledger} (pinned id {cfg.ledger_id}) is missing: restore it from a "
                            "backup; only if it is truly lost, run `veil site init --config "
                            f"{path} --new-ledger --reason '...'`")
        SiteLedger(cfg.ledger, site_id=cfg.site_id, ledger_id=cfg.ledger_id, create=False).close()
        return f"ledger {cfg.ledger} (id {cfg.ledger_id}) is already this site's pinned ledger; nothing to do"
    if new_ledger:
        if cfg.ledger_id is None:
            raise LedgerError("--new-ledger replaces a pinned ledger, but site.yaml pins none; run "
                            f"`veil site init --config {path}` without it")
        if not reason or not reason.strip():
            raise LedgerError("--new-ledger needs --reason '...': it is recorded in the new ledger and shown to "
                            "the coordinator and by `veil budget`")
        if cfg.ledger.exists():
            raise LedgerError(f"ledger {cfg.ledger} exists; --new-ledger only replaces a ledger that is lost. "
                            "Move the old file aside yourself if you really mean to (its spend is then "
                            "forgotten by this site, but not by the coordinator)")
        ledger_id = create_ledger(cfg.ledger, cfg.site_id, predecessor=cfg.ledger_id, reason=reason.strip())
        _pin(path, ledger_id)
        return (f"started new ledger {ledger_id} at {cfg.ledger}, replacing lost ledger {cfg.ledger_id} "
                f"(reason recorded: {reason.strip()}); pinned in {path}")
    if cfg.ledger.exists():
        with SiteLedger(cfg.ledger, site_id=cfg.site_id, create=False) as ledger:
            ledger_id = ledger.ledger_id
        _pin(path, ledger_id)
        return f"adopted existing ledger {cfg.ledger} (id {ledger_id}, site {cfg.site_id}); pinned in {path}"
    if not cfg.ledger.parent.is_dir():
        raise LedgerError(f"ledger directory {cfg.ledger.parent} does not exist; create it first")
    ledger_id = create_ledger(cfg.ledger, cfg.site_id)
    _pin(path, ledger_id)
    return f"created ledger {cfg.ledger} (id {ledger_id}, site {cfg.site_id}); pinned in {path}"


def _pin(config_path: Path, ledger_id: str) -> None:
    """Write ``ledger_id: ...`` into site.yaml: replace a top-level ``ledger_id:`` line, or append one.
    Everything else in the file (comments, order) is kept."""
    import re

    from veil.files import atomic_write

    text = config_path.read_text(encoding="utf-8")
    line = f"ledger_id: {ledger_id}  # pinned by `veil site init`; a ledger with another id is refused"
    pattern = re.compile(r"^ledger_id:.*$", re.MULTILINE)
    if pattern.search(text):
        new = pattern.sub(line, text, count=1)
    else:
        new = text + ("" if text.endswith("\n") or not text else "\n") + line + "\n"
    atomic_write(config_path, new.encode("utf-8"), mode=stat.S_IMODE(config_path.stat().st_mode))
    if load_site_config(config_path).ledger_id != ledger_id:
        raise VeilError(f"could not pin the ledger id in {config_path}; set `ledger_id: {ledger_id}` there "
                        "by hand")
