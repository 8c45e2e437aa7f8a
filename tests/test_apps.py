"""The module-level apps `flwr run` loads resolve what their run config names against the app."""

from __future__ import annotations

import os
from pathlib import Path

from veil.apps.serverapp import app_relative
from veil.spec import load_scenario


def test_a_relative_scenario_path_is_the_apps_not_the_working_directorys(tmp_path: Path) -> None:
    here = os.getcwd()
    os.chdir(tmp_path)  # as the SuperLink's process would be: anywhere
    try:
        path = app_relative("simulations/scenarios/default.yaml")
        assert path.is_file() and load_scenario(path).name
        assert app_relative(str(tmp_path / "x.yaml")) == tmp_path / "x.yaml"  # absolute stays
    finally:
        os.chdir(here)
