"""Sites named after themselves, registered once, listed with their last contact.

``veil certs node-key --site NAME`` writes ``NAME.node-key`` / ``NAME.node-key.pub`` (the name in the
key's comment); ``veil coordinator register`` records name, node id and key fingerprint in the run
store (``server.site_registry``), refusing a known key or a taken name without changing anything;
``veil coordinator sites`` joins the store's view (and the last round each site answered) with the
SuperLink's. The store cases run on SQLite and PostgreSQL (``store_url``); one slow test registers
real keys with a real SuperLink.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select, text
from typer.testing import CliRunner

from server.read.sites import registered_sites
from server.site_registry import RegistrationError, check_new, record
from server.store import RunStore
from server.store import schema as S
from veil.cli.flower import FlowerNode
from veil.cli.main import app
from veil.cli.pki import create_site_node_key, read_node_public_key, registered_name
from veil.errors import CertError, DeployError

FP_A = "SHA256:" + "A" * 43
FP_B = "SHA256:" + "B" * 43
WHEN = datetime(2026, 11, 30, 9, 15, tzinfo=UTC)


def _rows(store: RunStore) -> list[tuple[object, ...]]:
    with store.session() as s:
        return [tuple(r) for r in s.execute(select(S.RegisteredSite.name, S.RegisteredSite.node_id,
                                                   S.RegisteredSite.key_fingerprint).order_by(S.RegisteredSite.id))]


# -- node keys named after the site ------------------------------------------------------------
def test_node_key_files_are_named_after_the_site_with_its_name_in_the_comment(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["certs", "node-key", "--site", "hospital-a", str(tmp_path / "keys")])
    assert result.exit_code == 0, result.output
    private, public = tmp_path / "keys" / "hospital-a.node-key", tmp_path / "keys" / "hospital-a.node-key.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and private.read_bytes().startswith(b"-----BEGIN OPENSSH")
    fields = public.read_text().split()
    assert fields[0] == "ecdsa-sha2-nistp384" and fields[2] == "hospital-a"
    key = read_node_public_key(public)
    assert key.comment == "hospital-a" and key.fingerprint.startswith("SHA256:") and len(key.fingerprint) == 50
    if (keygen := Path("/usr/bin/ssh-keygen")).exists():  # the fingerprint a site administrator can check
        shown = subprocess.run([str(keygen), "-lf", str(public)], capture_output=True, text=True, check=True)
        assert shown.stdout.split()[1] == key.fingerprint
    assert "hospital-a.node-key.pub" in result.output
    again = CliRunner().invoke(app, ["certs", "node-key", "--site", "hospital-a", str(tmp_path / "keys")])
    assert again.exit_code == int(CertError.exit_code) and "refusing to overwrite" in again.output


def test_node_key_forms_old_path_missing_site_and_bad_names(tmp_path: Path) -> None:
    old = CliRunner().invoke(app, ["certs", "node-key", str(tmp_path / "node-key")])  # the older form
    assert old.exit_code == 0 and (tmp_path / "node-key.pub").is_file() and "--name SITE_ID" in old.output
    assert read_node_public_key(tmp_path / "node-key.pub").comment == ""
    bare = CliRunner().invoke(app, ["certs", "node-key"])
    assert bare.exit_code == int(CertError.exit_code)
    assert bare.stderr.strip() == ("error: name the site: `veil certs node-key --site NAME [DIR]` writes "
                                   "DIR/NAME.node-key and DIR/NAME.node-key.pub")
    for bad in (".hidden", "a/b", "x" * 65, "new\nline"):
        with pytest.raises(CertError, match="--site"):
            create_site_node_key(tmp_path, bad)
    assert not list(tmp_path.glob("*.node-key*"))


def test_the_registered_name_is_name_then_comment_then_file_name(tmp_path: Path) -> None:
    _, public = create_site_node_key(tmp_path, "hospital-a")
    key = read_node_public_key(public)
    assert registered_name(public, key, None) == "hospital-a"
    assert registered_name(public, key, "hospital-b") == "hospital-b"
    bare = tmp_path / "site-7.node-key.pub"  # an older key without a comment: its file names it
    bare.write_text(" ".join(public.read_text().split()[:2]) + "\n")
    assert registered_name(bare, read_node_public_key(bare), None) == "site-7"
    with pytest.raises(CertError, match="--name NAME"):
        registered_name(public, key, "bad name")
    (tmp_path / "junk.pub").write_text("ssh-ed25519 AAAA x\n")
    with pytest.raises(CertError, match="not an OpenSSH ECDSA public key"):
        read_node_public_key(tmp_path / "junk.pub")
    with pytest.raises(CertError, match="no such public key file"):
        read_node_public_key(tmp_path / "missing.pub")


# -- the register in the run store -------------------------------------------------------------
def test_register_records_the_site(store_url: str) -> None:
    store = RunStore(store_url)
    check_new(store, "hospital-a", FP_A)
    record(store, "hospital-a", 18_000_000_000_000_000_000, FP_A, now=WHEN)  # Flower's ids are uint64
    [site] = registered_sites(store)
    assert (site.name, site.node_id, site.key_fingerprint) == ("hospital-a", "18000000000000000000", FP_A)
    assert site.registered_at == "2026-11-30T09:15:00+00:00" and site.last_run is None and not site.problems
    store.close()


def test_a_registered_key_or_a_taken_name_is_refused_and_the_store_is_unchanged(store_url: str) -> None:
    store = RunStore(store_url)
    record(store, "hospital-a", 11, FP_A, now=WHEN)
    before = _rows(store)
    with pytest.raises(RegistrationError, match=r"already registered as site 'hospital-a' \(node 11, on "
                                                r"2026-11-30 09:15 UTC\)"):
        record(store, "hospital-b", 12, FP_A)
    with pytest.raises(RegistrationError, match=r"site name 'hospital-a' is taken by another key .*--name NAME"):
        record(store, "hospital-a", 12, FP_B)
    with pytest.raises(RegistrationError, match="may hold only letters"):
        check_new(store, "../etc", FP_B)
    with store.session() as s:  # a register that raced this one: the unique columns refuse it
        s.add(S.RegisteredSite(name="hospital-c", node_id="13", key_fingerprint=FP_B, registered_at=WHEN))
    with pytest.raises(RegistrationError):
        record(store, "hospital-d", 13, "SHA256:" + "D" * 43)
    assert _rows(store) == [*before, ("hospital-c", "13", FP_B)]
    store.close()


def _participated(store: RunStore, site: str, rounds: dict[int, str]) -> int:
    run_id = store.create_run(name="t", spec={}, spec_hash="h" * 64, seed=1, num_sites=2, num_rounds=3)
    with store.session() as s:
        row = store.site_row(s, run_id, site)
        for number, status in rounds.items():
            s.add(S.Participation(run_id=run_id, round_number=number, site_id=row.id,
                                  phase="preflight" if number == 0 else "train", status=status))
    return run_id


def test_sites_lists_the_last_round_each_site_answered(store_url: str) -> None:
    store = RunStore(store_url)
    record(store, "site-10", 10, FP_A, now=WHEN)
    record(store, "site-2", 2, FP_B, now=WHEN)
    record(store, "site-3", 3, "SHA256:" + "C" * 43, now=WHEN)
    _participated(store, "site-10", {0: "ok", 1: "ok", 2: "ok"})
    second = _participated(store, "site-10", {0: "ok", 1: "ok", 2: "no-reply", 3: "failed"})
    _participated(store, "site-2", {0: "refused"})
    _participated(store, "site-3", {0: "no-reply"})
    _participated(store, "unregistered", {0: "ok", 1: "ok"})
    rows = registered_sites(store)
    assert [(r.name, r.last_run, r.last_round) for r in rows] == [
        ("site-2", second + 1, 0), ("site-3", None, None), ("site-10", second, 1)]
    store.close()


# -- the commands -----------------------------------------------------------------------------
def test_register_command_records_refuses_first_and_undoes_the_superlink_on_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import veil.cli.flower as flower

    url = f"sqlite:///{tmp_path / 'store.db'}"
    _, pub_a = create_site_node_key(tmp_path, "hospital-a")
    _, pub_b = create_site_node_key(tmp_path, "hospital-b")
    asked: list[tuple[str, object]] = []
    monkeypatch.setattr(flower, "register_node", lambda key, *a: asked.append(("register", a[-1])) or 41)
    monkeypatch.setattr(flower, "unregister_node", lambda node, *a: asked.append(("unregister", node)))
    ok = CliRunner().invoke(app, ["coordinator", "register", str(pub_a), "--store", url])
    assert ok.exit_code == 0, ok.output
    assert asked == [("register", "hospital-a")] and "registered site hospital-a" in ok.stdout
    again = CliRunner().invoke(app, ["coordinator", "register", str(pub_a), "--store", url, "--name", "other"])
    assert again.exit_code == 1 and len(again.stderr.strip().splitlines()) == 1
    assert "already registered as site 'hospital-a'" in again.stderr and len(asked) == 1  # SuperLink not asked
    taken = CliRunner().invoke(app, ["coordinator", "register", str(pub_b), "--store", url,
                                     "--name", "hospital-a"])
    assert taken.exit_code == 1 and "is taken by another key" in taken.stderr and len(asked) == 1

    def racing(*_a: object, **_k: object) -> None:
        raise RegistrationError("taken meanwhile")

    monkeypatch.setattr("server.site_registry.record", racing)
    raced = CliRunner().invoke(app, ["coordinator", "register", str(pub_b), "--store", url])
    assert raced.exit_code == 1 and asked[-2:] == [("register", "hospital-b"), ("unregister", 41)]
    store = RunStore(url)
    assert _rows(store) == [("hospital-a", "41", read_node_public_key(pub_a).fingerprint)]
    store.close()


def _node(node_id: str, status: str, **times: str) -> FlowerNode:
    return FlowerNode(node_id, status, times.get("registered_at", "2026-11-30 09:15:00Z"), times.get("online_at"),
                      times.get("offline_at"), None)


def test_sites_command_joins_the_store_and_the_superlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import veil.cli.flower as flower

    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = RunStore(url)
    record(store, "hospital-a", 41, FP_A, now=WHEN)
    record(store, "hospital-b", 42, FP_B, now=WHEN)
    run_id = _participated(store, "hospital-a", {0: "ok", 1: "ok", 2: "ok"})
    store.close()
    nodes = [_node("41", "online", online_at="2026-11-30 10:00:00Z"),
             _node("42", "offline", offline_at="2026-11-30 11:00:00Z"), _node("99", "registered")]
    monkeypatch.setattr(flower, "list_nodes", lambda *_a: nodes)
    listing = ["coordinator", "sites", "--store", url]
    shown = CliRunner().invoke(app, listing)
    assert shown.exit_code == 0, shown.output
    lines = {line.split()[0]: line for line in shown.stdout.splitlines() if line.strip()}
    assert lines["hospital-a"].split()[1:3] == ["41", "SHA256:AAAAAAAAAAAA…"]
    assert "online" in lines["hospital-a"] and "now" in lines["hospital-a"]
    assert lines["hospital-a"].endswith(f"run {run_id} round 2")
    assert "offline" in lines["hospital-b"] and "2026-11-30 11:00:00Z" in lines["hospital-b"]
    assert lines["hospital-b"].rstrip().endswith("-")
    assert "(not in the store)" in shown.stdout and "99" in shown.stdout
    as_json = json.loads(CliRunner().invoke(app, [*listing, "--format", "json"]).stdout)
    a = as_json["sites"][0]
    assert (a["name"], a["node_id"], a["key_fingerprint"], a["last_run"], a["last_round"]) == (
        "hospital-a", "41", FP_A, run_id, 2)
    assert a["flower"]["status"] == "online" and a["flower"]["last_seen"] == "now"
    assert as_json["coordinator"]["reachable"] is True and as_json["unrecorded_nodes"][0]["node_id"] == "99"

    def down(*_a: object) -> list[FlowerNode]:
        raise DeployError("the coordinator at 127.0.0.1:8000 did not list its nodes: connection refused")

    monkeypatch.setattr(flower, "list_nodes", down)
    offline = CliRunner().invoke(app, ["coordinator", "sites", "--store", url])
    assert offline.exit_code == 0 and len(offline.stderr.strip().splitlines()) == 1
    assert "not reachable" in offline.stderr and "store's view only" in offline.stderr
    assert "hospital-a" in offline.stdout and f"run {run_id} round 2" in offline.stdout
    as_json = json.loads(CliRunner().invoke(app, [*listing, "--format", "json"]).stdout)
    assert as_json["coordinator"]["reachable"] is False and as_json["sites"][0]["flower"] is None


def test_stored_values_are_checked_and_made_safe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import veil.cli.flower as flower

    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = RunStore(url)
    record(store, "hospital-a", 41, FP_A, now=WHEN)
    with store.engine.begin() as conn:  # a hand-edited store
        conn.execute(text("INSERT INTO registered_sites (name, node_id, key_fingerprint, registered_at) "
                          "VALUES (:n, 'x1', 'md5:zz', 'yesterday')"), {"n": "evil\x1b[31m"})
    [a, evil] = sorted(registered_sites(store), key=lambda r: r.name != "hospital-a")
    store.close()
    assert not a.problems and evil.node_id is None and evil.key_fingerprint is None and evil.registered_at is None
    assert set(evil.problems) == {"name", "node_id", "key_fingerprint", "registered_at"}
    monkeypatch.setattr(flower, "list_nodes", lambda *_a: [_node("7", "online\x1b[2J")])
    shown = CliRunner().invoke(app, ["coordinator", "sites", "--store", url])
    assert shown.exit_code == 0 and "\x1b" not in shown.output
    assert "invalid" in shown.stdout and "warning: site" in shown.stdout and "\\x1b" in shown.stdout


# -- with a real SuperLink ------------------------------------------------------------------------
@pytest.mark.slow
def test_register_and_list_sites_with_a_real_superlink(tmp_path: Path) -> None:
    from tests.test_deployment import _free_port
    from tests.test_site_reconnect import Procs
    from veil.cli.flower import register_node
    from veil.cli.pki import create_certs, create_node_key

    create_certs(tmp_path / "certs", ["127.0.0.1"])
    for site in ("hospital-a", "hospital-b"):
        create_site_node_key(tmp_path / "keys", site)
    create_node_key(tmp_path / "keys" / "elsewhere")
    (tmp_path / "state").mkdir()
    url, port = f"sqlite:///{tmp_path / 'coordinator.db'}", _free_port()
    procs = Procs(tmp_path)
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"}

    def veil(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "veil.cli", *args, "--store", url], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120, check=False)

    try:
        procs.superlink(port)
        at = ("--coordinator", f"127.0.0.1:{port}", "--ca", "certs/ca.crt")
        for site in ("hospital-a", "hospital-b"):
            done = veil("coordinator", "register", f"keys/{site}.node-key.pub", *at)
            assert done.returncode == 0 and f"registered site {site}" in done.stdout, done.stdout + done.stderr
        twice = veil("coordinator", "register", "keys/hospital-a.node-key.pub", *at, "--name", "hospital-c")
        assert twice.returncode == 1 and "already registered as site 'hospital-a'" in twice.stderr
        other = register_node(tmp_path / "keys" / "elsewhere.pub", f"127.0.0.1:{port}",
                              tmp_path / "certs" / "ca.crt")
        listed = veil("coordinator", "sites", *at, "--format", "json")
        assert listed.returncode == 0, listed.stderr
        view = json.loads(listed.stdout)
        assert view["coordinator"]["reachable"] is True
        assert [(s["name"], s["flower"]["status"]) for s in view["sites"]] == [
            ("hospital-a", "registered"), ("hospital-b", "registered")]
        assert [n["node_id"] for n in view["unrecorded_nodes"]] == [str(other)]
        store = RunStore(url, migrate=False)
        assert [r[0] for r in _rows(store)] == ["hospital-a", "hospital-b"]  # the refused one left no row
        store.close()
    finally:
        procs.stop_all()
    gone = veil("coordinator", "sites", "--coordinator", f"127.0.0.1:{port}", "--ca", "certs/ca.crt")
    assert gone.returncode == 0 and "not reachable" in gone.stderr and "hospital-b" in gone.stdout


def test_a_node_answers_the_pre_flight_under_its_registered_name_or_is_rejected(tmp_path: Path) -> None:
    from server.budget import SiteStanding, check_names
    from server.site_registry import record
    from veil import protocol as P

    def standing(node: int, name: str) -> SiteStanding:
        return SiteStanding(node, P.BudgetStatus(name, "d" * 16, 100, 1e-5, "pld", 4.0, 1.0, 1.0, 0.1, 10, 3.0, 3))

    store = RunStore(f"sqlite:///{tmp_path / 'names.db'}")
    unjudged = {7: standing(7, "anyone")}
    check_names(store, unjudged)  # an empty register judges nobody (it is optional)
    assert unjudged[7].rejection is None
    record(store, "clinic-a", 11, "SHA256:" + "a" * 43)
    record(store, "clinic-b", 12, "SHA256:" + "b" * 43)
    standings = {11: standing(11, "clinic-a"), 12: standing(12, "clinic-a"), 13: standing(13, "clinic-b"),
                 14: standing(14, "clinic-c")}
    check_names(store, standings)
    assert standings[11].rejection is None and standings[14].rejection is None  # its own name; an unknown one
    for node, why in ((12, "node 12 was registered as 'clinic-b' but answers as 'clinic-a'"),
                      (13, "'clinic-b' is registered to node 12, not to node 13")):
        rejection = standings[node].rejection
        assert rejection is not None and rejection.code == "unregistered-name" and rejection.detail == why
    store.close()
