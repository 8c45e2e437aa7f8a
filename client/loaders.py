"""A site's own data, from the files it actually holds: CSV, Parquet, NPZ, or image folders.

Every problem is found here, before the site connects anywhere, and reported as a
``DataError`` naming the file and what is wrong with it: a missing file, a missing column,
a column that is not numeric, missing values, an unreadable image, an empty data set.
Nothing read here is logged: only counts, shapes and column names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from client.data import ArrayDataset
from veil.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DataSource(BaseModel):
    """Where a site's data is and how to read it (the ``data:`` section of site.yaml)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["csv", "parquet", "npz", "images"]
    path: Path
    label: str | None = Field(None, description="csv/parquet: the label column")
    features: list[str] | None = Field(None, description="csv/parquet: feature columns (default: all others)")
    x_key: str = Field("x", description="npz: the features array")
    y_key: str = Field("y", description="npz: the labels array")
    image_size: tuple[int, int] = Field((28, 28), description="images: every image is resized to (height, width)")
    channels: Literal[1, 3] = Field(1, description="images: 1 = grayscale, 3 = RGB")
    scale: float | None = Field(None, gt=0, description="divide features by this (default: 255 for images)")

    @model_validator(mode="after")
    def _label_for_tables(self) -> DataSource:
        if self.format in ("csv", "parquet") and not self.label:
            raise ValueError(f"data.label is required for {self.format}: name the label column")
        return self


def load_site_data(source: DataSource) -> tuple[ArrayDataset, list[str]]:
    """(data set, class names). Labels become 0..K-1 in the sorted order of the class names."""
    path = source.path.expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such {'directory' if source.format == 'images' else 'file'}")
    if source.format == "images":
        feats, raw = _images(path, source)
    elif source.format == "npz":
        feats, raw = _npz(path, source)
    else:
        feats, raw = _table(path, source)
    if len(raw) == 0:
        raise DataError(f"{path}: the data set is empty (no records)")
    labels, classes = _encode_labels(raw, path)
    if source.scale is not None:
        feats = feats / np.float32(source.scale)
    return ArrayDataset(np.ascontiguousarray(feats, dtype=np.float32), labels), classes


def _encode_labels(raw: np.ndarray, path: Path) -> tuple[np.ndarray, list[str]]:
    if raw.dtype.kind == "f":
        if np.isnan(raw).any():
            raise DataError(f"{path}: {int(np.isnan(raw).sum())} labels are missing (NaN)")
        if not np.all(raw == np.round(raw)):
            raise DataError(f"{path}: labels must be classes (integers or names), found fractional values")
        raw = raw.astype(np.int64)
    if raw.dtype.kind in "iu":
        values = np.unique(raw)
        index = np.searchsorted(values, raw)
        return index.astype(np.int64), [str(v) for v in values]
    names = raw.astype(str)
    values = np.unique(names)
    return np.searchsorted(values, names).astype(np.int64), [str(v) for v in values]


def _check_features(feats: np.ndarray, path: Path, what: str) -> np.ndarray:
    if feats.dtype.kind not in "iufb":
        raise DataError(f"{path}: {what} are not numeric (dtype {feats.dtype})")
    feats = feats.astype(np.float32)
    bad = ~np.isfinite(feats)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise DataError(f"{path}: {what} have {int(bad.sum())} missing or infinite values (NaN/inf) in "
                        f"{len(rows)} records, first at record {int(rows[0])}")
    return feats


def _npz(path: Path, source: DataSource) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:  # never unpickle a site's file
            missing = [k for k in (source.x_key, source.y_key) if k not in z.files]
            if missing:
                raise DataError(f"{path}: no array named {', '.join(map(repr, missing))}; the file holds "
                                f"{', '.join(map(repr, z.files)) or 'no arrays'} (set data.x_key / data.y_key)")
            x, y = z[source.x_key], z[source.y_key]
    except DataError:
        raise
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from None
    if y.ndim != 1:
        raise DataError(f"{path}: labels {source.y_key!r} must be one-dimensional, got shape {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} feature rows but {len(y)} labels")
    return _check_features(x, path, f"features {source.x_key!r}"), y


def _table(path: Path, source: DataSource) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa

    try:
        if source.format == "csv":
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path)
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        why = " ".join(str(err).split())[:300]
        raise DataError(f"{path}: not a readable {source.format} file ({why})") from None
    columns = table.column_names
    label = source.label or ""
    features = source.features or [c for c in columns if c != label]
    missing = [c for c in [label, *features] if c not in columns]
    if missing:
        raise DataError(f"{path}: no column {', '.join(map(repr, missing))}; columns are "
                        f"{', '.join(map(repr, columns))} (set data.label / data.features)")
    if not features:
        raise DataError(f"{path}: no feature columns besides the label {label!r}")
    cols = []
    for name in features:
        col = table.column(name)
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)
                or pa.types.is_null(col.type)):
            example = next((v for v in col.to_pylist() if v is not None and not _is_number(v)), None)
            raise DataError(f"{path}: column {name!r} is not numeric ({col.type}); e.g. the value "
                            f"{str(example)[:40]!r}: mixed types must be cleaned before training")
        if col.null_count:
            first = next(i for i, v in enumerate(col.to_pylist()) if v is None)
            raise DataError(f"{path}: column {name!r} has {col.null_count} missing values, first at record "
                            f"{first}")
        cols.append(col.to_numpy(zero_copy_only=False).astype(np.float32))
    y_col = table.column(label)
    if y_col.null_count:
        raise DataError(f"{path}: label column {label!r} has {y_col.null_count} missing values")
    feats = np.stack(cols, axis=1) if cols else np.zeros((0, 0), np.float32)
    return _check_features(feats, path, "features"), np.asarray(y_col.to_pylist())


def _is_number(value: object) -> bool:
    try:
        float(str(value))
    except ValueError:
        return False
    return True


def _images(path: Path, source: DataSource) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    if not path.is_dir():
        raise DataError(f"{path}: an image data set is a directory with one sub-directory per class")
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{path}: no class sub-directories (expected e.g. {path}/cat/001.png, {path}/dog/...)")
    h, w = source.image_size
    mode = "L" if source.channels == 1 else "RGB"
    feats, labels = [], []
    for cls in classes:
        files = sorted(f for f in cls.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        for f in files:
            try:
                with Image.open(f) as img:
                    arr = np.asarray(img.convert(mode).resize((w, h)), dtype=np.float32)
            except (UnidentifiedImageError, OSError, ValueError) as err:
                raise DataError(f"{f}: unreadable image ({type(err).__name__}: "
                                f"{' '.join(str(err).split())[:200]})") from None
            feats.append(arr.reshape(h, w, -1).transpose(2, 0, 1))
            labels.append(cls.name)
    if not feats:
        raise DataError(f"{path}: the data set is empty (no {'/'.join(sorted(IMAGE_SUFFIXES))} files in "
                        f"{', '.join(c.name for c in classes)})")
    x = np.stack(feats)
    if source.scale is None:
        x = x / np.float32(255.0)
    return x, np.asarray(labels)
