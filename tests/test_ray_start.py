"""``veil simulate`` starts Ray itself (Flower then reuses it): with Flower's init_args, the
workers' import path, and workers at the driver's priority unless the user chose otherwise."""

from __future__ import annotations

import os
import sys
import types

import pytest

from simulations.simulate import backend_config, start_ray
from veil.spec import load_scenario


class FakeRay(types.ModuleType):
    def __init__(self, initialized: bool = False) -> None:
        super().__init__("ray")
        self.initialized = initialized
        self.calls: list[dict[str, object]] = []
        self.env_at_init: dict[str, str] = {}

    def is_initialized(self) -> bool:
        return self.initialized

    def init(self, **kwargs: object) -> None:
        self.calls.append(kwargs)
        self.env_at_init = dict(os.environ)  # what the raylet and its workers inherit
        self.initialized = True


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> FakeRay:
    ray = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/users/own/path")
    return ray


def test_ray_starts_with_flowers_init_args_and_the_import_path(fake_ray: FakeRay) -> None:
    config = backend_config(load_scenario())
    start_ray(config)
    assert fake_ray.calls == [config["init_args"]]  # no runtime_env: the pre-started workers serve the actors
    path = fake_ray.env_at_init["PYTHONPATH"].split(os.pathsep)
    assert path[: len(sys.path)] == sys.path and path[-1] == "/users/own/path"
    assert fake_ray.env_at_init["RAY_worker_niceness"] == "0"


def test_a_users_niceness_is_kept(fake_ray: FakeRay, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_worker_niceness", "10")
    start_ray(backend_config(load_scenario()))
    assert fake_ray.env_at_init["RAY_worker_niceness"] == "10"


def test_a_running_ray_is_reused(fake_ray: FakeRay) -> None:
    fake_ray.initialized = True
    start_ray(backend_config(load_scenario()))
    assert fake_ray.calls == []
    assert os.environ["PYTHONPATH"] == "/users/own/path"
