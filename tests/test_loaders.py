"""Site data loaders: what sites hold (CSV, Parquet, NPZ, image folders) and every way it can be wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from client.loaders import DataSource, load_site_data
from veil.errors import DataError


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_csv_reads_features_and_encodes_string_labels(tmp_path: Path) -> None:
    f = _csv(tmp_path / "d.csv", "age,bp,outcome\n50,120.5,sick\n31,110,well\n44,130,sick\n")
    data, classes = load_site_data(DataSource(format="csv", path=f, label="outcome"))
    assert classes == ["sick", "well"] and data.labels.tolist() == [0, 1, 0]
    assert data.features.dtype == np.float32 and data.features.tolist() == [[50, 120.5], [31, 110], [44, 130]]
    only_age, _ = load_site_data(DataSource(format="csv", path=f, label="outcome", features=["age"]))
    assert only_age.features.shape == (3, 1)


def test_parquet_and_npz_round_trip(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x1": [0.1, 0.2], "x2": [1, 2], "y": [3, 7]}), tmp_path / "d.parquet")
    data, classes = load_site_data(DataSource(format="parquet", path=tmp_path / "d.parquet", label="y"))
    assert classes == ["3", "7"] and data.labels.tolist() == [0, 1] and data.features.shape == (2, 2)

    x = np.random.default_rng(0).random((5, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 1, 0]))
    data, classes = load_site_data(DataSource(format="npz", path=tmp_path / "d.npz"))
    assert data.features.shape == (5, 1, 4, 4) and np.allclose(data.features, x) and classes == ["0", "1", "2"]


def test_image_folders_one_directory_per_class(tmp_path: Path) -> None:
    from PIL import Image

    for cls, shade in (("benign", 30), ("malignant", 220)):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (40, 30), color=shade).save(tmp_path / "img" / cls / f"{i}.png")
    data, classes = load_site_data(DataSource(format="images", path=tmp_path / "img", image_size=(28, 28)))
    assert classes == ["benign", "malignant"] and data.features.shape == (6, 1, 28, 28)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.features.max() <= 1.0 and abs(float(data.features[0].mean()) - 30 / 255) < 1e-3
    rgb, _ = load_site_data(DataSource(format="images", path=tmp_path / "img", channels=3, image_size=(8, 8)))
    assert rgb.features.shape == (6, 3, 8, 8)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "npz", "images"])
def test_a_missing_file_names_it(tmp_path: Path, fmt: str) -> None:
    with pytest.raises(DataError, match=r"nope.*no such"):
        load_site_data(DataSource(format=fmt, path=tmp_path / "nope", label="y"))  # type: ignore[arg-type]


def test_wrong_columns_list_what_the_file_has(tmp_path: Path) -> None:
    f = _csv(tmp_path / "d.csv", "a,b,label\n1,2,0\n")
    with pytest.raises(DataError, match=r"d.csv: no column 'outcome'; columns are 'a', 'b', 'label'"):
        load_site_data(DataSource(format="csv", path=f, label="outcome"))
    with pytest.raises(DataError, match=r"no column 'c'"):
        load_site_data(DataSource(format="csv", path=f, label="label", features=["a", "c"]))
    with pytest.raises(ValidationError, match=r"data\.label is required"):
        DataSource(format="csv", path=f)


def test_mixed_types_name_the_column_and_a_value(tmp_path: Path) -> None:
    f = _csv(tmp_path / "d.csv", "a,b,y\n1,2,0\n3,high,1\n")
    with pytest.raises(DataError, match=r"d.csv: column 'b' is not numeric .*'high'"):
        load_site_data(DataSource(format="csv", path=f, label="y"))


def test_missing_values_are_found_with_the_record(tmp_path: Path) -> None:
    f = _csv(tmp_path / "d.csv", "a,b,y\n1,2,0\n3,,1\n4,5,1\n")
    with pytest.raises(DataError, match=r"column 'b' has 1 missing values, first at record 1"):
        load_site_data(DataSource(format="csv", path=f, label="y"))
    g = _csv(tmp_path / "n.csv", "a,y\n1,0\nNaN,1\n")
    with pytest.raises(DataError, match=r"n.csv: .*missing"):
        load_site_data(DataSource(format="csv", path=g, label="y"))
    np.savez(tmp_path / "d.npz", x=np.array([[1.0, np.nan], [0.0, 1.0]]), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"d.npz: .*1 missing or infinite values .* first at record 0"):
        load_site_data(DataSource(format="npz", path=tmp_path / "d.npz"))
    h = _csv(tmp_path / "l.csv", "a,y\n1,0\n2,\n")
    with pytest.raises(DataError, match=r"label column 'y' has 1 missing"):
        load_site_data(DataSource(format="csv", path=h, label="y"))


def test_unreadable_images_and_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "img" / "a").mkdir(parents=True)
    (tmp_path / "img" / "a" / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"broken.png: unreadable image"):
        load_site_data(DataSource(format="images", path=tmp_path / "img"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(DataError, match=r"bad.parquet: not a readable parquet file"):
        load_site_data(DataSource(format="parquet", path=tmp_path / "bad.parquet", label="y"))
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"bad.npz: not a readable .npz"):
        load_site_data(DataSource(format="npz", path=tmp_path / "bad.npz"))
    np.savez(tmp_path / "keys.npz", features=np.zeros((2, 2)), labels=np.zeros(2))
    with pytest.raises(DataError, match=r"no array named 'x', 'y'; the file holds 'features', 'labels'"):
        load_site_data(DataSource(format="npz", path=tmp_path / "keys.npz"))
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(DataError, match=r"obj.npz"):  # object arrays would need pickle: refused
        load_site_data(DataSource(format="npz", path=tmp_path / "obj.npz"))


def test_empty_data_sets_are_refused(tmp_path: Path) -> None:
    f = _csv(tmp_path / "d.csv", "a,y\n")
    with pytest.raises(DataError, match=r"d.csv: the data set is empty"):
        load_site_data(DataSource(format="csv", path=f, label="y"))
    (tmp_path / "img" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"img: the data set is empty"):
        load_site_data(DataSource(format="images", path=tmp_path / "img"))
    with pytest.raises(DataError, match=r"no class sub-directories"):
        load_site_data(DataSource(format="images", path=tmp_path / "img" / "a"))
    np.savez(tmp_path / "e.npz", x=np.zeros((0, 3)), y=np.zeros(0, dtype=np.int64))
    with pytest.raises(DataError, match=r"e.npz: the data set is empty"):
        load_site_data(DataSource(format="npz", path=tmp_path / "e.npz"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", r"d.csv: the file is empty \(not even a header row\)"),
        ("a,b,y\n1,2,0\n3,4,1\n5,6,7,8\n", r"d.csv: line 4 has 4 fields but the header has 3"),
        ("a,b,y\n1,2,0\n3,1\n", r"d.csv: line 3 has 2 fields but the header has 3"),
        ("a,a,y\n1,2,0\n3,4,1\n", r"d.csv: the header names column 'a' 2 times"),
        ("a,y\ninf,0\n1,1\n", r"d.csv: features have 1 missing or infinite values .* first at record 0"),
        ("a,y\n1,0\n2,0\n3,0\n", r"d.csv: every record has the label '0'; a classifier needs at least two"),
        ("a,y\n1,0.5\n2,1\n", r"labels must be classes"),
        ("a,y\n1,inf\n2,1\n", r"labels must be classes .* infinite"),
        ("a,y\n1\x1b[2J,0\n2,1\n", r"column 'a' is not numeric .*'1\\x1b\[2J'"),
    ],
)
def test_data_file_mistakes_are_one_line_naming_the_file(tmp_path: Path, text: str, expected: str) -> None:
    f = _csv(tmp_path / "d.csv", text)
    with pytest.raises(DataError, match=expected) as info:
        load_site_data(DataSource(format="csv", path=f, label="y"))
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value) and len(str(info.value)) < 500


def test_more_classes_than_any_model_predicts(tmp_path: Path) -> None:
    f = _csv(tmp_path / "ids.csv", "a,y\n" + "".join(f"1,{i}\n" for i in range(10_001)))
    with pytest.raises(DataError, match=r"10,001 distinct labels; a model predicts at most 10,000 classes"):
        load_site_data(DataSource(format="csv", path=f, label="y"))


def test_a_non_utf8_label_column_is_named(tmp_path: Path) -> None:
    f = tmp_path / "d.csv"
    f.write_bytes("a,y\n1,caf\xe9\n2,th\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"label column 'y' is not UTF-8 text"):
        load_site_data(DataSource(format="csv", path=f, label="y"))


def test_the_source_itself_refuses_contradictions(tmp_path: Path) -> None:
    f = tmp_path / "d.csv"
    with pytest.raises(ValidationError, match=r"label column 'y' is also listed in data\.features"):
        DataSource(format="csv", path=f, label="y", features=["a", "y"])
    with pytest.raises(ValidationError, match=r"data\.features lists 'a' more than once"):
        DataSource(format="csv", path=f, label="y", features=["a", "a"])
    with pytest.raises(ValidationError, match=r"values per image"):
        DataSource(format="images", path=f, image_size=(1024, 1024), channels=3)
    for bad in (True, 3.0, "3"):
        with pytest.raises(ValidationError, match="channels"):
            DataSource.model_validate({"format": "images", "path": str(f), "channels": bad})
    with pytest.raises(ValidationError, match=r"label"):
        DataSource.model_validate({"format": "csv", "path": str(f), "label": "y\x1b[0m"})
    with pytest.raises(ValidationError, match=r"finite"):
        DataSource.model_validate({"format": "npz", "path": str(f), "scale": float("inf")})


def test_an_npz_with_a_scalar_for_features_is_named(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", x=np.float32(1.0), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"s.npz: features 'x' must hold one row per record"):
        load_site_data(DataSource(format="npz", path=tmp_path / "s.npz"))


def test_a_feature_beyond_any_64_bit_integer_is_refused_with_its_column(tmp_path: Path) -> None:
    rows = "".join(f"{i},{i % 2}\n" for i in range(10))
    path = _csv(tmp_path / "d.csv", f"a,label\n{rows}{2**70},1\n")
    with pytest.raises(DataError, match=r"d\.csv: features hold 1 values beyond .* record 10, column 'a'"):
        load_site_data(DataSource(format="csv", path=path, label="label"))
    ok = _csv(tmp_path / "ok.csv", f"a,label\n{rows}{2**62},1\n")  # a 64-bit id is large but not refused
    assert len(load_site_data(DataSource(format="csv", path=ok, label="label"))[0]) == 11


def test_a_label_with_a_bidi_override_is_refused(tmp_path: Path) -> None:
    path = _csv(tmp_path / "d.csv", "a,label\n1,x\n2,\u202ey\n3,x\n")
    with pytest.raises(DataError, match=r"the label '\\u202ey' holds a control or bidi character"):
        load_site_data(DataSource(format="csv", path=path, label="label"))
