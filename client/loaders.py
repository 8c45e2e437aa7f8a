"""A site's own data, from the files it actually holds: CSV, Parquet, NPZ, or image folders.

Every problem is found here, before the site connects anywhere, and reported as a
``DataError`` in one line naming the file and what is wrong with it (the row or column where
that helps): a missing or empty file, a ragged row, a missing or repeated column, a column that
is not numeric, missing or infinite values, values beyond ``MAX_FEATURE``, labels that are not
classes or hold control characters, fewer than two or more than ``MAX_CLASSES`` classes, an
unreadable image, an empty data set, a path that is a FIFO, a device, a directory or a symlink
loop (checked before anything is opened). Nothing read here is logged or echoed: only counts,
shapes and column names (cut short, control characters escaped).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from client.data import ArrayDataset
from veil.config import CleanPath, Text, clean, show
from veil.errors import DataError
from veil.files import regular_file_problem

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MAX_CLASSES = 10_000  # the most a scenario's model.num_classes may be
MAX_FEATURE = 1e20  # |x| beyond any 64-bit integer (1.8e19): an overflow, unit error or sentinel, not data
MAX_IMAGE_VALUES = 200_000  # height x width x channels: the most a scenario's model.in_features may be
ColumnName = Annotated[Text, Field(min_length=1, max_length=256)]


def _whole_number(value: object) -> object:
    if isinstance(value, bool | float):  # a Literal[1, 3] alone would take true and 3.0
        raise ValueError(f"must be a whole number (got {value!r})")
    return value


class DataSource(BaseModel):
    """Where a site's data is and how to read it (the ``data:`` section of site.yaml)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    format: Literal["csv", "parquet", "npz", "images"]
    path: CleanPath
    label: ColumnName | None = Field(None, description="csv/parquet: the label column")
    features: list[ColumnName] | None = Field(
        None, min_length=1, description="csv/parquet: feature columns (default: all others)")
    x_key: ColumnName = Field("x", description="npz: the features array")
    y_key: ColumnName = Field("y", description="npz: the labels array")
    image_size: tuple[Annotated[int, Field(ge=1, le=1024)], Annotated[int, Field(ge=1, le=1024)]] = Field(
        (28, 28), strict=False, description="images: every image is resized to (height, width)")
    channels: Annotated[Literal[1, 3], BeforeValidator(_whole_number)] = Field(
        1, description="images: 1 = grayscale, 3 = RGB")
    scale: float | None = Field(None, gt=0, le=1e12,
                                description="divide features by this (default: 255 for images)")

    @model_validator(mode="after")
    def _label_for_tables(self) -> DataSource:
        if self.format in ("csv", "parquet") and not self.label:
            raise ValueError(f"data.label is required for {self.format}: name the label column")
        if self.label is not None and self.features and self.label in self.features:
            raise ValueError(f"label column {show(self.label, 60)} is also listed in data.features; the model "
                             "would be handed the answer")
        repeated = sorted({c for c in self.features or () if (self.features or []).count(c) > 1})
        if repeated:
            raise ValueError(f"data.features lists {show(repeated[0], 60)} more than once")
        h, w = self.image_size
        if self.format == "images" and h * w * self.channels > MAX_IMAGE_VALUES:
            raise ValueError(f"data.image_size {h}x{w} x {self.channels} channel(s) = {h * w * self.channels:,} "
                             f"values per image; a model takes at most {MAX_IMAGE_VALUES:,}")
        return self


def load_site_data(source: DataSource) -> tuple[ArrayDataset, list[str]]:
    """(data set, class names). Labels become 0..K-1 in the sorted order of the class names."""
    path = source.path.expanduser()
    # before any open(): a FIFO would block, /dev/zero never ends, a symlink loop never resolves
    problem = None if source.format == "images" and path.is_dir() else regular_file_problem(path)
    if problem:
        raise DataError(f"{clean(str(path))} {problem}")
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
    if len(classes) < 2:
        raise DataError(f"{path}: every record has the label {show(classes[0], 40)}; a classifier needs at least "
                        "two classes (is that the label column?)")
    if len(classes) > MAX_CLASSES:
        raise DataError(f"{path}: {len(classes):,} distinct labels; a model predicts at most {MAX_CLASSES:,} "
                        "classes (is that the label column?)")
    if source.scale is not None:
        feats = feats / np.float32(source.scale)
    return ArrayDataset(np.ascontiguousarray(feats, dtype=np.float32), labels), classes


def _encode_labels(raw: np.ndarray, path: Path) -> tuple[np.ndarray, list[str]]:
    if raw.dtype.kind == "f":
        if np.isnan(raw).any():
            raise DataError(f"{path}: {int(np.isnan(raw).sum())} labels are missing (NaN)")
        if not np.isfinite(raw).all() or np.abs(raw).max() > 2**53:
            raise DataError(f"{path}: labels must be classes (integers or names), found infinite or huge values")
        if not np.all(raw == np.round(raw)):
            raise DataError(f"{path}: labels must be classes (integers or names), found fractional values")
        raw = raw.astype(np.int64)
    if raw.dtype.kind in "iu":
        values = np.unique(raw)
        index = np.searchsorted(values, raw)
        return index.astype(np.int64), [str(v) for v in values]
    names = raw.astype(str)
    values = np.unique(names)
    bad = next((v for v in values if not str(v).isprintable()), None)
    if bad is not None:
        raise DataError(f"{path}: the label {show(str(bad), 40)} holds a control or bidi character; labels "
                        "are class names that print as themselves (clean the label column)")
    return np.searchsorted(values, names).astype(np.int64), [str(v) for v in values]


def _column(index: int, columns: list[str] | None) -> str:
    if columns and index < len(columns):
        return f"column {show(columns[index], 40)}"
    return f"feature {index}"


def _check_features(feats: np.ndarray, path: Path, what: str, columns: list[str] | None = None) -> np.ndarray:
    if feats.dtype.kind not in "iufb":
        raise DataError(f"{path}: {what} are not numeric (dtype {feats.dtype})")
    wide = feats.astype(np.float64)
    huge = np.isfinite(wide) & (np.abs(wide) > MAX_FEATURE)
    if huge.any():
        row, col = (int(i[0]) for i in np.nonzero(huge))
        raise DataError(f"{path}: {what} hold {int(huge.sum())} values beyond ±{MAX_FEATURE:g} (first at record "
                        f"{row}, {_column(col, columns)}); scale or clean the data")
    feats = wide.astype(np.float32)
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
                raise DataError(f"{path}: no array named {', '.join(map(show, missing))}; the file holds "
                                f"{_names(z.files) or 'no arrays'} (set data.x_key / data.y_key)")
            x, y = z[source.x_key], z[source.y_key]
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz file ({clean(str(err), 200)})") from None
    if y.ndim != 1:
        raise DataError(f"{path}: labels {show(source.y_key)} must be one-dimensional, got shape {y.shape}")
    if x.ndim < 1:
        raise DataError(f"{path}: features {show(source.x_key)} must hold one row per record, got a single value")
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} feature rows but {len(y)} labels")
    return _check_features(x, path, f"features {source.x_key!r}"), y


def _table(path: Path, source: DataSource) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa

    try:
        if source.format == "csv":
            import pyarrow.csv as pcsv

            # an empty cell is missing in every column, text ones too (never a class named "")
            table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: {_unreadable_table(path, source.format, str(err))}") from None
    columns = table.column_names
    repeated = next((c for c in columns if columns.count(c) > 1), None)
    if repeated is not None:
        raise DataError(f"{path}: the header names column {show(repeated)} {columns.count(repeated)} times; "
                        "every column needs its own name")
    label = source.label or ""
    features = source.features or [c for c in columns if c != label]
    missing = [c for c in [label, *features] if c not in columns]
    if missing:
        raise DataError(f"{path}: no column {_names(missing)}; columns are {_names(columns)} "
                        "(set data.label / data.features)")
    if not features:
        raise DataError(f"{path}: no feature columns besides the label {show(label)}")
    cols = []
    for name in features:
        col = table.column(name)
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)
                or pa.types.is_null(col.type)):
            example = next((v for v in col.to_pylist() if v is not None and not _is_number(v)), None)
            raise DataError(f"{path}: column {show(name)} is not numeric ({col.type}); e.g. the value "
                            f"{show(example, 40)}: mixed types must be cleaned before training")
        if col.null_count:
            first = next(i for i, v in enumerate(col.to_pylist()) if v is None)
            raise DataError(f"{path}: column {show(name)} has {col.null_count} missing values, first at record "
                            f"{first}")
        cols.append(col.to_numpy(zero_copy_only=False).astype(np.float64))
    y_col = table.column(label)
    if y_col.null_count:
        raise DataError(f"{path}: label column {show(label)} has {y_col.null_count} missing values")
    if pa.types.is_binary(y_col.type) or pa.types.is_large_binary(y_col.type):
        raise DataError(f"{path}: label column {show(label)} is not UTF-8 text; save the file as UTF-8")
    feats = np.stack(cols, axis=1) if cols else np.zeros((0, 0), np.float64)
    return _check_features(feats, path, "features", list(features)), np.asarray(y_col.to_pylist())


def _names(names: list[str]) -> str:
    """Column or array names for a message: at most ten, each cut short."""
    shown = ", ".join(show(n, 40) for n in names[:10])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 10 else "")


def _unreadable_table(path: Path, fmt: str, why: str) -> str:
    """Why pyarrow could not read ``path``, without echoing the file's contents."""
    if "Empty CSV file" in why:
        return "the file is empty (not even a header row)"
    ragged = re.search(r"Expected (\d+) columns, got (\d+)", why)
    if ragged:
        line = _ragged_line(path, int(ragged.group(1)))
        where = f"line {line}" if line else "a row"
        return (f"{where} has {ragged.group(2)} fields but the header has {ragged.group(1)} (a stray comma or "
                "quote, or a missing value without its comma)")
    return f"not a readable {fmt} file ({clean(' '.join(why.split()), 200)})"


def _ragged_line(path: Path, expected: int) -> int | None:
    """The first line (1-based) of a CSV whose field count is not ``expected``."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f)
            for row in reader:
                if row and len(row) != expected:
                    return reader.line_num
    except (OSError, csv.Error):
        return None
    return None


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
            problem = regular_file_problem(f)
            if problem:
                raise DataError(f"{clean(str(f))} {problem}")
            try:
                with Image.open(f) as img:
                    arr = np.asarray(img.convert(mode).resize((w, h)), dtype=np.float32)
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
                raise DataError(f"{clean(str(f))}: unreadable image ({type(err).__name__}: "
                                f"{clean(' '.join(str(err).split()), 200)})") from None
            feats.append(arr.reshape(h, w, -1).transpose(2, 0, 1))
            labels.append(cls.name)
    if not feats:
        raise DataError(f"{path}: the data set is empty (no {'/'.join(sorted(IMAGE_SUFFIXES))} files in "
                        f"{_names([c.name for c in classes])})")
    x = np.stack(feats)
    if source.scale is None:
        x = x / np.float32(255.0)
    return x, np.asarray(labels)
