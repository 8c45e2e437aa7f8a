"""The site daemon's config and preflight, certificates, and a tabular (CSV) site training
through the real ClientApp with a model shaped for it."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml

from client.daemon import init_ledger, load_site_config, preflight, site_from_config, supernode_command
from privacy.requests import create_researcher_key
from veil.cli.pki import create_certs, create_node_key
from veil.errors import CertError, ScenarioError


def _site(tmp: Path, **over: object) -> Path:
    rng = np.random.default_rng(0)
    rows = ["a,b,c,d,label"] + [",".join(f"{v:.3f}" for v in rng.random(4)) + f",{'xyz'[i % 3]}"
                                for i in range(90)]
    (tmp / "data.csv").write_text("\n".join(rows) + "\n")
    if not (tmp / "certs").exists():
        create_certs(tmp / "certs", ["127.0.0.1"])
        create_node_key(tmp / "node")
        create_researcher_key(tmp / "alice")
        (tmp / "researchers").mkdir()
        (tmp / "researchers" / "alice.pub").write_bytes((tmp / "alice.pub").read_bytes())
    cfg = {"site_id": "clinic-a", "data": {"format": "csv", "path": "data.csv", "label": "label"},
           "ledger": "clinic.ledger", "policy": {"epsilon_cap": 10.0, "trusted_researchers": ["researchers"]},
           "device": "cpu",
           "coordinator": {"address": "127.0.0.1:8000", "root_certificates": "certs/ca.crt", "node_key": "node"}}
    cfg.update(over)  # type: ignore[arg-type]
    (tmp / "site.yaml").write_text(yaml.safe_dump(cfg))
    return tmp / "site.yaml"


def test_config_paths_are_relative_to_the_file_and_preflight_passes(tmp_path: Path) -> None:
    cfg = load_site_config(_site(tmp_path))
    assert cfg.data.path == tmp_path / "data.csv" and cfg.ledger == tmp_path / "clinic.ledger"
    checks = {c.name: c for c in preflight(cfg)}
    assert not checks["ledger"].ok and "veil site init" in checks["ledger"].detail  # no ledger pinned yet
    assert "created ledger" in init_ledger(tmp_path / "site.yaml")
    text = (tmp_path / "site.yaml").read_text()
    cfg = load_site_config(tmp_path / "site.yaml")
    assert cfg.ledger_id is not None and f"ledger_id: {cfg.ledger_id}" in text and "site_id: clinic-a" in text
    checks = {c.name: c for c in preflight(cfg)}
    assert all(c.ok and not c.warning for c in checks.values()), checks
    assert "90 records" in checks["data"].detail and "3 classes" in checks["data"].detail
    assert f"ledger {cfg.ledger_id} of site clinic-a, intact, 0 entries" in checks["ledger"].detail
    assert "mode 600" in checks["node key"].detail and "cap_scope ledger" in checks["budget scope"].detail
    assert checks["researchers"].detail.startswith("trusts alice (")
    assert "nothing to do" in init_ledger(tmp_path / "site.yaml")  # idempotent: never a second ledger
    cmd = supernode_command(cfg, tmp_path / "site.yaml")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(tmp_path / "node")
    assert cmd[cmd.index("--root-certificates") + 1] == str(tmp_path / "certs" / "ca.crt")
    assert "--insecure" not in cmd


def test_bad_configs_and_failed_checks_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"site_id"):
        load_site_config(_site(tmp_path, site_id="bad name!"))
    with pytest.raises(ScenarioError, match=r"coordinator"):
        load_site_config(_site(tmp_path, coordinator=None))
    os.chmod(tmp_path / "node", 0o644)
    (tmp_path / "secret.ckks").write_text("x")
    checks = {c.name: c for c in preflight(load_site_config(_site(tmp_path, keys="secret.ckks", device="cuda")))}
    assert not checks["node key"].ok and "chmod 600" in checks["node key"].detail
    assert not checks["key"].ok
    import torch

    assert checks["device"].ok == torch.cuda.is_available()
    (tmp_path / "clinic.ledger").write_bytes(b"")  # a truncated ledger is never silently reset
    checks = {c.name: c for c in preflight(load_site_config(_site(tmp_path, ledger_id="a" * 32)))}
    assert not checks["ledger"].ok and "empty" in checks["ledger"].detail
    # opting out of the one lifetime budget per site is allowed, with a warning
    checks = {c.name: c for c in preflight(load_site_config(_site(tmp_path, policy={"cap_scope": "dataset"})))}
    assert checks["budget scope"].ok and checks["budget scope"].warning
    assert "same records saved again" in checks["budget scope"].detail
    # a site that trusts no researcher is warned that it will refuse every run; a bad key file fails
    assert checks["researchers"].ok and checks["researchers"].warning and "refuses every run" in checks[
        "researchers"].detail
    (tmp_path / "bad.pub").write_text("ssh-rsa AAAA someone\n")
    checks = {c.name: c for c in preflight(load_site_config(_site(
        tmp_path, policy={"trusted_researchers": ["bad.pub"]})))}
    bad = checks["researchers"]
    assert not bad.ok and "bad.pub is not a researcher public key" in bad.detail


def test_certificates_name_the_hosts_and_keep_keys_private(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    made = create_certs(tmp_path / "c", ["coord.example.org", "10.0.0.5"])
    cert = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coord.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    for key in (made.ca_key, made.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(CertError, match="refusing to overwrite"):
        create_certs(tmp_path / "c", ["x"])
    with pytest.raises(CertError, match="neither a host name nor an IP"):
        create_certs(tmp_path / "d", ["bad host"])
    pub = create_node_key(tmp_path / "k" / "site")
    load_ssh_private_key((tmp_path / "k" / "site").read_bytes(), password=None)
    load_ssh_public_key(pub.read_bytes())
    with pytest.raises(CertError, match="refusing to overwrite"):
        create_node_key(tmp_path / "k" / "site")


def test_a_csv_site_trains_a_model_shaped_for_it_and_refuses_one_that_is_not(tmp_path: Path) -> None:
    from tests.sitekit import SiteDriver, refusal, signed_task, task
    from veil import protocol as P
    from veil.spec import parse_scenario

    init_ledger(_site(tmp_path))
    site = site_from_config(tmp_path / "site.yaml")
    assert site.site_id == "clinic-a" and len(site.train) + len(site.test) == 90
    assert site.ledger_id is not None and not site.allow_seeded_noise
    assert parse_scenario({"model": {"arch": "mlp", "in_features": 4, "num_classes": 3}}).model.key == "mlp-4x3"
    with pytest.raises(ScenarioError, match="cnn takes 1x28x28"):
        parse_scenario({"model": {"arch": "cnn", "in_features": 4}})
    driver = SiteDriver(site)
    assert [r.name for r in site.researchers or ()] == ["alice"]  # a deployed site always checks who asks
    unsigned = driver.train(task(arch="mlp-4x3", batch_size=20))[P.REFUSAL]
    assert P.Refusal.from_config(unsigned).code == "unsigned-run"  # type: ignore[arg-type]
    tabular = {"model": {"arch": "mlp", "in_features": 4, "num_classes": 3}, "training": {"batch_size": 20},
               "privacy": {"noise_multiplier": 1.0}}
    t, request = signed_task(tabular, tmp_path / "alice")
    reply = driver.train(t, request=request)
    assert P.ARRAYS in reply and P.REFUSAL not in reply
    fix = r"4 features but the run's model 'mlp' takes 784; set model\.in_features: 4"
    t, request = signed_task({**tabular, "model": {"arch": "mlp"}}, tmp_path / "alice")
    said = refusal(driver.train(t, server_round=2, request=request))
    assert said.code == "model-mismatch" and re.search(fix, said.detail)
    assert driver.query(t, request=request).refusal == said  # the pre-flight says so first
