"""Accounting results kept across processes: used when they verify, recomputed when they do not.

A damaged, edited, foreign or forged entry must never lower a reported ε nor let a σ overshoot
its target; the cache's files are private and its location is the user's to choose.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privacy import accounting as acct
from privacy import accounting_cache as cache
from privacy.accounting import History, accountant_version, history_epsilon
from veil.env import ACCOUNTING_CACHE

Q = 1 / 13  # a 400-record site, batch 32
HISTORY: History = ((0.9, Q, 65),)
DELTA = 1e-5


def _fresh_process() -> None:
    """Forget every in-process result, as a new process would."""
    for fn in (acct._epsilon_cached, acct._epsilon_computed, acct._base_pld, acct._group_pld,
               acct._composed_pld):
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


def test_an_unsafe_cache_directory_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could plant entries here
    monkeypatch.setenv(ACCOUNTING_CACHE, str(shared))
    _fresh_process()
    assert history_epsilon(HISTORY, DELTA) > 0
    assert list(shared.iterdir()) == []
