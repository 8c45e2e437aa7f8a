"""Accounting results kept across processes: used when they verify, recomputed when they do not.

A damaged, edited, foreign or forged entry must never lower a reported ε nor let a σ overshoot
its target; the cache's files are private and its location is the user's to choose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from privacy import accounting as acct
from privacy import accounting_cache as cache
from privacy import calibrate_noise_multiplier
from privacy import calibration as calib
from privacy.accounting import History, accountant_version, history_epsilon
from veil.env import ACCOUNTING_CACHE

ROOT = Path(__file__).resolve().parent.parent
Q = 1 / 13  # a 400-record site, batch 32
HISTORY: History = ((0.9, Q, 65),)
DELTA = 1e-5


def _fresh_process() -> None:
    """Forget every in-process result, as a new process would."""
    for fn in (acct._epsilon_cached, acct._epsilon_computed, acct._base_pld, acct._group_pld,
               acct._composed_pld, calib._calibrate):
        fn.cache_clear()


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "cache"
    monkeypatch.setenv(ACCOUNTING_CACHE, str(where))
    _fresh_process()
    return where


def _eps_key(history: History = HISTORY) -> dict[str, object]:
    return {"history": [list(h) for h in history], "delta": DELTA, "accountant": "pld",
            "version": accountant_version("pld"), "grid": acct.PLD_DISCRETIZATION}


def _entries(where: Path, kind: str) -> list[Path]:
    return sorted(where.glob(f"{kind}-*.json"))


def test_location_default_and_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ACCOUNTING_CACHE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "veil" / "accounting"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "veil" / "accounting"
    monkeypatch.setenv(ACCOUNTING_CACHE, "off")
    _fresh_process()
    assert cache.cache_dir() is None
    assert history_epsilon(HISTORY, DELTA) > 0
    assert not (tmp_path / "home").exists()  # nothing written anywhere


def test_files_are_private_and_written_whole(cache_dir: Path) -> None:
    eps = history_epsilon(HISTORY, DELTA)
    (entry,) = _entries(cache_dir, "epsilon")
    assert cache.load("epsilon", _eps_key()) == eps
    assert cache_dir.stat().st_mode & 0o777 == 0o700
    assert (cache_dir / "key").stat().st_mode & 0o777 == 0o600
    assert entry.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(["key", entry.name])  # no temp files left


def _lowered(path: Path) -> None:
    body = json.loads(path.read_text())
    body["value"] = body["value"] / 2
    path.write_text(json.dumps(body))


DAMAGE = {
    "value-lowered": _lowered,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:40]),
    "garbage": lambda p: p.write_bytes(b"\x00\xff not json"),
    "empty": lambda p: p.write_bytes(b""),
    "huge": lambda p: p.write_bytes(b" " * 100_000),
    "a-directory": lambda p: (p.unlink(), p.mkdir()),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_or_edited_epsilon_entry_is_recomputed_never_trusted(cache_dir: Path, damage: object) -> None:
    eps = history_epsilon(HISTORY, DELTA)
    (entry,) = _entries(cache_dir, "epsilon")
    damage(entry)  # type: ignore[operator]
    _fresh_process()
    assert cache.load("epsilon", _eps_key()) is None
    assert history_epsilon(HISTORY, DELTA) == eps


def test_an_entry_under_another_key_or_from_another_cache_is_ignored(
        cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    longer: History = ((0.9, Q, 130),)
    eps, eps_longer = history_epsilon(HISTORY, DELTA), history_epsilon(longer, DELTA)
    (entry,) = [p for p in _entries(cache_dir, "epsilon") if str(eps) in p.read_text()]
    (other,) = [p for p in _entries(cache_dir, "epsilon") if p != entry]
    entry.replace(other)  # the smaller ε, filed under the longer history's name
    _fresh_process()
    assert history_epsilon(longer, DELTA) == eps_longer
    # another machine's cache (another key) saying this history cost almost nothing
    monkeypatch.setenv(ACCOUNTING_CACHE, str(tmp_path / "elsewhere"))
    cache.save("epsilon", _eps_key(), 1e-3)
    (forged,) = _entries(tmp_path / "elsewhere", "epsilon")
    monkeypatch.setenv(ACCOUNTING_CACHE, str(cache_dir))
    (cache_dir / forged.name).write_bytes(forged.read_bytes())
    _fresh_process()
    assert cache.load("epsilon", _eps_key()) is None
    assert history_epsilon(HISTORY, DELTA) == eps


def test_a_stored_sigma_is_checked_before_use(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even an entry that authenticates (a bug, or someone holding the cache's key) cannot make σ
    overshoot the target, nor waste noise: it is re-checked and, if wrong, recomputed."""
    sigma = calibrate_noise_multiplier(8.0, DELTA, Q, 65)
    (entry,) = _entries(cache_dir, "sigma")
    key = json.loads(json.loads(entry.read_text())["key"])
    key = {k: v for k, v in key.items() if k not in ("format", "kind")}
    searches: list[float] = []
    real_search = calib._search

    def counted(*args: object) -> float:
        searches.append(1.0)
        return real_search(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(calib, "_search", counted)
    _fresh_process()
    assert calibrate_noise_multiplier(8.0, DELTA, Q, 65) == sigma and searches == []  # the honest entry
    for forged in (sigma * 0.9, sigma * 1.5, 0.01, 1e5):
        cache.save("sigma", key, forged)
        _fresh_process()
        assert calibrate_noise_multiplier(8.0, DELTA, Q, 65) == sigma
    assert len(searches) == 4  # each forged value was rejected and the search rerun


def test_an_unsafe_cache_directory_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could plant entries here
    monkeypatch.setenv(ACCOUNTING_CACHE, str(shared))
    _fresh_process()
    assert history_epsilon(HISTORY, DELTA) > 0
    assert list(shared.iterdir()) == []


_SITE = textwrap.dedent("""
    from privacy import calibrate_noise_multiplier
    from privacy.accounting import _base_pld, history_epsilon
    sigma = calibrate_noise_multiplier(8.0, 1e-5, 1 / 13, 65)
    eps = [history_epsilon(((sigma, 1 / 13, 13 * k),), 1e-5) for k in range(1, 6)]
    print(repr(sigma), repr(eps), _base_pld.cache_info().misses)
""")


def test_results_are_kept_across_processes(cache_dir: Path) -> None:
    """A second process gets the same σ and ε, building only the two PLDs that check the stored σ."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def site() -> list[str]:
        out = subprocess.run([sys.executable, "-c", _SITE], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120, check=True)
        return out.stdout.split(" ")

    first, second = site(), site()
    assert first[:-1] == second[:-1]
    assert int(first[-1]) > 5 and int(second[-1]) == 2
