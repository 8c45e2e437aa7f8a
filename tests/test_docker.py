"""docker/ checked as far as this machine allows (no Docker engine): the compose file's
services, volumes and dependencies hang together; the Dockerfile copies what exists and pins
torch first; the scripts are valid shell; and every `veil` command the containers run is a
command this CLI accepts. The commands themselves run for real in tests/test_deployment.py."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from veil.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def _compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_services_volumes_and_dependencies_are_consistent() -> None:
    compose = _compose()
    services, volumes = compose["services"], set(compose["volumes"])
    assert {"postgres", "init", "coordinator", "site-0", "site-1"} <= set(services)
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for mount in svc.get("volumes", []):
            assert mount.split(":")[0] in volumes, f"{name} mounts undeclared {mount}"
    assert services["coordinator"]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    # each site sees only its own volume; no site mounts the coordinator's
    for site in ("site-0", "site-1"):
        assert [m.split(":")[0] for m in services[site]["volumes"]] == [site]
    assert services["coordinator"]["environment"]["VEIL_STORE"].startswith("postgresql://")
    build = services["init"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"


def test_dockerfile_pins_torch_first_and_copies_what_exists() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    installs = [ln for ln in text.splitlines() if "pip install" in ln]
    assert "torch==2.13.0" in installs[0] and "cpu" in installs[0]
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in shlex.split(line)[1:-1]:
                assert list(ROOT.glob(src)), f"COPY {src}: nothing there"
    assert "USER veil" in text


@pytest.mark.parametrize("script", ["veil-init.sh", "veil-coordinator.sh"])
def test_scripts_are_valid_shell(script: str) -> None:
    done = subprocess.run(["sh", "-n", str(DOCKER / script)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def _veil_commands() -> list[list[str]]:
    commands = []
    for svc in _compose()["services"].values():
        if svc.get("image") == "veil:latest" and "command" in svc:
            commands.append(svc["command"])
    for script in ("veil-init.sh", "veil-coordinator.sh"):
        text = (DOCKER / script).read_text().replace("\\\n", " ")
        for m in re.finditer(r"^\s*veil (.+?)(?:&|\|\||$)", text, re.M):
            commands.append(shlex.split(m.group(1)))
    return commands


def test_every_veil_command_the_containers_run_exists() -> None:
    commands = _veil_commands()
    assert len(commands) >= 8
    seen = set()
    for cmd in commands:
        words = [w for w in cmd if not w.startswith("-") and not w.startswith("/") and "$" not in w]
        sub = words[:2] if words and words[0] in ("site", "coordinator", "certs", "keys", "runs") else words[:1]
        seen.add(" ".join(sub))
        result = CliRunner().invoke(app, [*sub, "--help"])
        assert result.exit_code == 0, f"veil {' '.join(sub)}: {result.output}"
        # the options used are ones the command declares
        for opt in (w for w in cmd if w.startswith("--")):
            assert opt in result.output, f"veil {' '.join(sub)} has no option {opt}"
    assert {"site start", "coordinator start", "coordinator register", "certs create", "certs node-key",
            "keys create", "run"} <= seen


def test_sample_run_is_a_valid_scenario() -> None:
    from veil.spec import load_scenario

    spec = load_scenario(DOCKER / "sample-run.yaml")
    assert spec.federation.sites == 2 and spec.encryption.enabled and spec.encryption.keys is None


def test_the_site_yaml_init_writes_is_valid_and_its_sample_data_loads(tmp_path: Path) -> None:
    from client.daemon import load_site_config
    from client.data import write_sample_npz
    from client.loaders import load_site_data

    text = (DOCKER / "veil-init.sh").read_text()
    body = text[text.index("<<YAML\n") + 7:text.index("\nYAML\n")].replace("$i", "0")
    (tmp_path / "site.yaml").write_text(body)
    cfg = load_site_config(tmp_path / "site.yaml")
    assert cfg.site_id == "site-0" and cfg.coordinator.address == "coordinator:8000"
    assert cfg.keys == tmp_path / "secret.ckks" and cfg.coordinator.node_key == tmp_path / "site-0.node-key"
    write_sample_npz(tmp_path / "data.npz", 0, 2)
    write_sample_npz(tmp_path / "other.npz", 1, 2)
    mine, _ = load_site_data(cfg.data)
    assert len(mine) == 1000 and mine.features.shape[1:] == (1, 28, 28)
    import numpy as np

    assert not np.array_equal(np.load(tmp_path / "other.npz")["y"], np.load(tmp_path / "data.npz")["y"])
