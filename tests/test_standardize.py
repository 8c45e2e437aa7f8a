"""``standardize: true``: a site z-scores its features with its own training statistics, which
never leave it; without it, the preflight warns about unscaled features (scikit-learn's
breast-cancer data, features in the hundreds and thousands, is the real example)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import client.daemon as daemon
from client.daemon import init_ledger, load_site_config, preflight, site_from_config, split_site_data
from client.loaders import load_site_data
from client.standardize import FeatureStats, unscaled
from tests.test_site_daemon import _site
from veil.errors import ScenarioError


def _breast_cancer(tmp: Path, *, scaled: bool = False, **over: object) -> Path:
    """A site whose data is scikit-learn's breast-cancer table as CSV (min-max scaled to [0, 1] if ``scaled``)."""
    from sklearn.datasets import load_breast_cancer  # type: ignore[import-untyped]

    bc = load_breast_cancer()
    x = np.asarray(bc.data, dtype=np.float64)
    if scaled:
        x = (x - x.min(0)) / (x.max(0) - x.min(0))
    header = ",".join(str(n).replace(" ", "_") for n in bc.feature_names) + ",label"
    rows = [",".join(f"{v:.17g}" for v in row) + f",{int(y)}" for row, y in zip(x, bc.target, strict=True)]
    (tmp / "bc.csv").write_text("\n".join([header, *rows]) + "\n")
    return _site(tmp, data={"format": "csv", "path": "bc.csv", "label": "label"}, **over)


def _z(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return (x - mean) / std


# --- the maths ---------------------------------------------------------------------------------------------

def test_training_split_gets_mean_0_std_1_and_the_test_split_its_statistics() -> None:
    rng = np.random.default_rng(1)
    train = np.column_stack([rng.normal(500, 80, 300), rng.normal(-3, 0.01, 300), rng.integers(0, 2, 300),
                             np.full(300, 0.1)]).astype(np.float32)
    test = np.column_stack([rng.normal(900, 80, 50), rng.normal(-3, 0.01, 50), rng.integers(0, 2, 50),
                            np.full(50, 0.7)]).astype(np.float32)
    stats = FeatureStats.of(train)
    z, zt = stats.apply(train), stats.apply(test)
    assert z.dtype == np.float32 and np.isfinite(z).all() and np.isfinite(zt).all()
    np.testing.assert_allclose(z[:, :3].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, :3].std(0), 1, rtol=1e-4)
    # the test split is scaled with the training split's statistics, not its own: its mean stays ~5 stds off
    wide = train.astype(np.float64)
    np.testing.assert_allclose(zt[:, :3], _z(test[:, :3].astype(np.float64), wide[:, :3].mean(0),
                                             wide[:, :3].std(0)), rtol=1e-5, atol=1e-5)
    assert zt[:, 0].mean() > 4
    # a constant column is centred (exactly 0), never divided by its zero std; unseen values only shifted
    assert stats.std[3] == 0 and stats.constant == 1
    assert (z[:, 3] == 0).all()
    np.testing.assert_allclose(zt[:, 3], np.float32(0.7) - np.float32(0.1), rtol=1e-6)
    assert "4 features over 300 training records" in stats.summary() and "1 constant" in stats.summary()


def test_images_are_standardized_per_pixel_and_bad_input_is_refused() -> None:
    x = np.random.default_rng(2).random((40, 1, 3, 3)).astype(np.float32) * 255
    z = FeatureStats.of(x).apply(x)
    assert z.shape == x.shape
    np.testing.assert_allclose(z.std(0), 1, rtol=1e-4)
    with pytest.raises(ValueError, match=r"do not match"):
        FeatureStats.of(x).apply(x.reshape(40, 9))
    with pytest.raises(ValueError, match=r"no training records"):
        FeatureStats.of(np.zeros((0, 3)))


_LOADABLE = st.floats(-float(np.float32(1e20)), float(np.float32(1e20)), width=32)  # what loading lets through


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 4)), elements=_LOADABLE),
       arrays(np.float32, st.tuples(st.integers(1, 5), st.just(4)), elements=_LOADABLE))
def test_standardizing_never_produces_nan_or_inf(train: np.ndarray, test: np.ndarray) -> None:
    stats = FeatureStats.of(train)
    assert np.isfinite(stats.apply(train)).all()
    if test.shape[1] == train.shape[1]:
        assert np.isfinite(stats.apply(test)).all()


def test_the_unscaled_rule_is_some_feature_with_mean_or_std_above_10() -> None:
    rng = np.random.default_rng(3)
    assert unscaled(rng.random((200, 5))) is None  # [0, 1]
    assert unscaled(rng.normal(0, 1, (200, 5))) is None  # z-scores
    assert unscaled(np.column_stack([rng.random(200), np.full(200, 9.0)])) is None  # within the limit
    said = unscaled(np.column_stack([rng.random(200), np.full(200, 11.0), rng.normal(0, 30, 200)]))
    assert said is not None and said.startswith("2 of 3 features have |mean| or std above 10")
    assert "feature 2: mean" in said  # the largest scale is named (by position, not by value list)


# --- the deployed site -------------------------------------------------------------------------------------

def test_standardize_is_off_by_default_and_a_strict_bool(tmp_path: Path) -> None:
    assert load_site_config(_breast_cancer(tmp_path)).standardize is False
    assert load_site_config(_breast_cancer(tmp_path, standardize=True)).standardize is True
    for bad in ("yes", 1):
        with pytest.raises(ScenarioError, match=r"standardize"):
            load_site_config(_breast_cancer(tmp_path, standardize=bad))


@pytest.fixture
def client_log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """``caplog`` on the ``veil.client`` logger (even after ``logs.configure()`` stopped propagation),
    with nothing said yet about standardization in this process."""
    monkeypatch.setattr(daemon, "_SAID", set())
    monkeypatch.setattr(logging.getLogger("veil"), "propagate", True)
    caplog.set_level(logging.INFO, logger="veil.client")
    return caplog


def test_a_standardized_site_trains_on_its_own_z_scores(tmp_path: Path,
                                                        client_log: pytest.LogCaptureFixture) -> None:
    raw_site = site_from_config(_breast_cancer(tmp_path))
    path = _breast_cancer(tmp_path, standardize=True)
    site = site_from_config(path)
    cfg = load_site_config(path)
    train, test = split_site_data(load_site_data(cfg.data)[0], cfg)
    mean, std = train.features.astype(np.float64).mean(0), train.features.astype(np.float64).std(0)
    x, y = (t.numpy() for t in site.train.tensors)
    xt, yt = (t.numpy() for t in site.test.tensors)
    assert len(x) == 455 and len(xt) == 114  # the same 80/20 split as without standardize
    assert (y == raw_site.train.tensors[1].numpy()).all() and (yt == raw_site.test.tensors[1].numpy()).all()
    np.testing.assert_allclose(raw_site.train.tensors[0].numpy(), train.features)  # off: the data as loaded
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(0), 1, rtol=1e-4)
    np.testing.assert_allclose(xt, _z(test.features.astype(np.float64), mean, std), rtol=1e-4, atol=1e-5)
    assert site.fingerprint == raw_site.fingerprint  # the same records: standardizing never opens a fresh budget
    said = [r.getMessage() for r in client_log.records if "standardized" in r.getMessage()]
    assert said == ["clinic-a: standardized with its own statistics, 30 features over 455 training records: "
                    f"means {mean.min():.3g}..{mean.max():.3g}, stds {std.min():.3g}..{std.max():.3g}, "
                    "0 constant (centred only); kept here, never sent"]
    site_from_config(path)  # a second message to the same process: not said again
    assert len([r for r in client_log.records if "standardized" in r.getMessage()]) == 1


def test_preflight_warns_about_unscaled_features_and_names_the_fix(tmp_path: Path) -> None:
    raw = {c.name: c for c in preflight(load_site_config(_breast_cancer(tmp_path)))}["data"]
    assert raw.ok and raw.warning, raw
    assert "569 records" in raw.detail and "features look unscaled" in raw.detail
    assert "of 30 features have |mean| or std above 10" in raw.detail
    assert raw.detail.endswith("set standardize: true in site.yaml")
    on = {c.name: c for c in preflight(load_site_config(_breast_cancer(tmp_path, standardize=True)))}["data"]
    assert on.ok and not on.warning and "standardized with the site's own statistics" in on.detail
    scaled = {c.name: c for c in preflight(load_site_config(_breast_cancer(tmp_path, scaled=True)))}["data"]
    assert scaled.ok and not scaled.warning and "standardize" not in scaled.detail, scaled


def _values(reply: RecordDict) -> Iterator[tuple[str, object]]:
    """Every value of every record in ``reply``, by where it sits."""
    for name, record in reply.items():
        if isinstance(record, ConfigRecord | MetricRecord):
            for key, value in record.items():
                for v in value if isinstance(value, list) else [value]:
                    yield f"{name}.{key}", v
        elif isinstance(record, ArrayRecord):
            for key, array in record.items():
                yield f"{name}.{key}", array.numpy()
        else:
            raise AssertionError(f"{name}: a record of type {type(record).__name__} this test does not walk")


def test_the_feature_statistics_never_reach_the_coordinator(tmp_path: Path) -> None:
    from tests.sitekit import SiteDriver, signed_task
    from veil import protocol as P
    from veil.models import build_model

    path = _breast_cancer(tmp_path, standardize=True)
    init_ledger(path)
    cfg = load_site_config(path)
    train, _ = split_site_data(load_site_data(cfg.data)[0], cfg)
    stats = FeatureStats.of(train.features)
    secret = np.concatenate([stats.mean, stats.std])
    driver = SiteDriver(site_from_config(path))
    scenario = {"model": {"arch": "mlp", "in_features": 30, "num_classes": 2},
                "training": {"batch_size": 64, "local_epochs": 5, "learning_rate": 0.5},
                "privacy": {"noise_multiplier": 1.0}}
    t, request = signed_task(scenario, tmp_path / "alice")
    budget = driver.send(RecordDict({P.TASK: _with_request(t.to_config(), request)}), P.BUDGET_QUERY)
    trained = driver.train(t, request=request)
    assert P.ARRAYS in trained and P.REFUSAL not in trained, trained
    model = build_model(t.arch)
    model.load_state_dict(trained[P.ARRAYS].to_torch_state_dict())  # type: ignore[union-attr]
    config = _with_request(t.to_config(), request)
    config["server-round"] = 1
    evaluated = driver.send(RecordDict({P.ARRAYS: ArrayRecord(model.state_dict()), P.TASK: config}), "evaluate")
    assert P.METRICS in evaluated and P.REFUSAL not in evaluated, evaluated
    accuracy = float(evaluated[P.METRICS][P.EVAL_ACC])  # type: ignore[arg-type]
    majority = max(np.mean(driver.site.test.tensors[1].numpy()), 1 - np.mean(driver.site.test.tensors[1].numpy()))
    assert accuracy > majority + 0.1, (accuracy, majority)  # DP-SGD learns from the site's own z-scores

    as32 = secret.astype(np.float32)
    texts = [t for t in (f"{v:.4g}" for v in secret) if "." in t and len(t) >= 4]  # never a bare "12"
    seen = 0
    for reply in (budget, trained, evaluated):
        for where, value in _values(reply):
            if isinstance(value, np.ndarray):  # model weights: one chance float32 equality in ~10^3 runs
                seen += int(np.isin(as32, value.astype(np.float32)).sum())
            elif isinstance(value, bool | int | float):
                v = float(value)
                assert not np.isclose(secret, v, rtol=1e-9, atol=0).any() and np.float32(v) not in as32, where
            elif isinstance(value, str | bytes):
                text = value if isinstance(value, str) else value.decode("latin-1")
                assert "means" not in text and not any(s in text for s in texts), (where, text[:200])
    assert seen <= 1, f"{seen} of the site's feature statistics appear in its model arrays"


def _with_request(config: ConfigRecord, request: object) -> ConfigRecord:
    from veil import protocol as P

    config[P.RUN_REQUEST] = request.to_json()  # type: ignore[attr-defined]
    return config
