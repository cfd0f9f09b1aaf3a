"""Loaders for the CVR data sets (Coat, Yahoo! R3, KuaiRec), returned as numpy arrays.

Two on-disk formats are read:

- ``split``: the BADR authors' processed splits ``x_{train,val,test}_{T}_{V}.txt`` (one
  0-based ``user item`` pair per line) and ``y_..._{T}_{V}.txt`` (one 0/1 label per line),
  where ``T`` is the binarisation threshold and ``V`` the validation percentage. Our
  ``simulate`` command writes the same format plus ``meta.json`` with the shape.
- ``original``: Coat's ``train.ascii`` / ``test.ascii`` rating matrices and Yahoo! R3's
  ``user item rating`` lists, binarised (rating >= threshold) and split here.

Train is the biased (clicked) data; validation and test partition the unbiased
(uniformly random) data. Files are parsed vectorised; only when that fails is the file
scanned line by line, to name the offending line. Every problem is a ``ValueError`` that
names the file, the line where there is one, and what was expected.
"""
from __future__ import annotations

import io
import json
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASETS: tuple[str, ...] = ("coat", "yahoo", "kuairec")
SOURCES: tuple[str, ...] = ("split", "original")

_FOLDERS = {"coat": "coat", "yahoo": "yahoo-r3", "kuairec": "kuairec"}
# (T, V) of the authors' published splits: threshold and validation percentage.
_DEFAULT_SPLIT = {"coat": (3, 20), "yahoo": (3, 10), "kuairec": (2, 10)}
_ORIGINAL_THRESHOLD = 3
_PARTS = ("train", "val", "test")
_SPLIT_FILE = re.compile(r"[xy]_(?:train|val|test)_(\d+)_(\d+)\.txt")
_COAT_SHAPE = (290, 300)
_YAHOO_FILE = "ydata-ymusic-rating-study-v1_0-{}.txt"
_ENV_VAR = "CVR_DATA_DIR"
_WHERE = (f"pass --data-dir or set the environment variable {_ENV_VAR} to the folder "
          "holding coat/, yahoo-r3/ and kuairec/")


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on numpy arrays is ambiguous
class CVRData:
    """One data set: biased (clicked) training pairs, unbiased validation and test pairs.

    ``x_*`` are ``(n, 2)`` int64 arrays of 0-based ``(user, item)`` ids and ``y_*`` the
    ``(n,)`` float32 conversion labels in {0, 1}; other integer / numeric inputs are converted.
    """

    name: str
    n_users: int
    n_items: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def __post_init__(self) -> None:
        for field, value in (("n_users", self.n_users), ("n_items", self.n_items)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{self.name}: {field} must be a positive integer; got {value!r}")
        for part in _PARTS:
            x = np.asarray(getattr(self, f"x_{part}"))
            y = np.asarray(getattr(self, f"y_{part}"))
            if not np.issubdtype(x.dtype, np.integer) or x.ndim != 2 or x.shape[1] != 2:
                raise ValueError(f"{self.name}: x_{part} must be an (n, 2) integer array of (user, item) "
                                 f"ids; got shape {x.shape} and dtype {x.dtype}")
            if y.shape != (len(x),):
                raise ValueError(f"{self.name}: y_{part} must have shape ({len(x)},) to match x_{part}; "
                                 f"got {y.shape}")
            if not np.isin(y, (0, 1)).all():
                raise ValueError(f"{self.name}: y_{part} must contain only 0 and 1")
            if len(x) and (x.min() < 0 or x[:, 0].max() >= self.n_users or x[:, 1].max() >= self.n_items):
                raise ValueError(f"{self.name}: x_{part} has ids outside 0..{self.n_users - 1} (users) "
                                 f"/ 0..{self.n_items - 1} (items)")
            # A frozen dataclass normalises its fields through object.__setattr__.
            object.__setattr__(self, f"x_{part}", x.astype(np.int64, copy=False))
            object.__setattr__(self, f"y_{part}", y.astype(np.float32, copy=False))

    @property
    def n_pairs(self) -> int:
        """Number of user-item pairs, ``n_users * n_items``."""
        return self.n_users * self.n_items

    def flat_index(self, x: np.ndarray) -> np.ndarray:
        """Row-major index ``user * n_items + item`` of each ``(user, item)`` row of ``x``."""
        return x[:, 0] * self.n_items + x[:, 1]

    def click_matrix(self) -> np.ndarray:
        """Click indicator ``o`` of all pairs, ``(n_pairs,)`` float32 in row-major order.

        ``o = 1`` for the training (clicked) pairs and 0 elsewhere; the propensity model
        ``p_hat = P(o = 1)`` is fitted on it.
        """
        o = np.zeros(self.n_pairs, dtype=np.float32)
        o[self.flat_index(self.x_train)] = 1.0
        return o


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Return ``data_dir`` if given, else ``$CVR_DATA_DIR``, checked to be an existing folder."""
    origin = "--data-dir"
    if data_dir is None:
        data_dir = os.environ.get(_ENV_VAR) or None
        origin = _ENV_VAR
    if data_dir is None:
        raise ValueError(f"no data directory given: {_WHERE}")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise ValueError(f"data directory {path} (from {origin}) does not exist or is not a folder; {_WHERE}")
    return path


def load_split(directory: str | os.PathLike, threshold: int, val_pct: int, name: str | None = None) -> CVRData:
    """Load the processed split ``{x,y}_{train,val,test}_{threshold}_{val_pct}.txt`` of ``directory``.

    The shape comes from ``meta.json`` (``{"n_users": .., "n_items": ..}``) when the folder
    has one, otherwise from the largest ids over all three parts plus one.
    """
    directory = Path(directory)
    _check_int(threshold, "threshold", low=0)
    _check_int(val_pct, "val_pct", low=1, high=99)
    if not directory.is_dir():
        raise ValueError(f"folder {directory} does not exist; {_WHERE}")
    suffix = f"{threshold}_{val_pct}"
    missing = [f"{v}_{part}_{suffix}.txt" for part in _PARTS for v in "xy"
               if not (directory / f"{v}_{part}_{suffix}.txt").is_file()]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} in {directory} (threshold={threshold}, "
                         f"val_pct={val_pct}); {_existing_splits(directory)}; {_WHERE}")

    xs, ys = [], []
    for part in _PARTS:
        x_path, y_path = directory / f"x_{part}_{suffix}.txt", directory / f"y_{part}_{suffix}.txt"
        x, y = _read_pairs(x_path), _read_labels(y_path)
        if len(x) != len(y):
            raise ValueError(f"{x_path} has {len(x)} lines but {y_path.name} has {len(y)}; "
                             "each pair needs its label on the same line")
        xs.append(x)
        ys.append(y)

    meta_path = directory / "meta.json"
    if meta_path.is_file():
        n_users, n_items = _read_meta(meta_path)
        for part, x in zip(_PARTS, xs):
            line = _first_line((x[:, 0] >= n_users) | (x[:, 1] >= n_items))
            if line is not None:
                user, item = x[line - 1]
                raise ValueError(f"{directory / f'x_{part}_{suffix}.txt'}, line {line}: pair '{user} {item}' "
                                 f"is outside the {n_users} x {n_items} shape given by {meta_path.name}")
    else:
        n_users, n_items = (int(m) + 1 for m in np.concatenate(xs).max(axis=0))
    return CVRData(directory.name if name is None else name, n_users, n_items,
                   xs[0], ys[0], xs[1], ys[1], xs[2], ys[2])


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    source: str = "split",
    threshold: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
) -> CVRData:
    """Load data set ``name`` (one of :data:`DATASETS`) from ``data_dir`` or ``$CVR_DATA_DIR``.

    ``source="split"`` reads the authors' processed splits (default ``T/V``: coat 3/20, yahoo
    3/10, kuairec 2/10); ``threshold`` and ``val_fraction`` (e.g. 0.2 -> ``V = 20``) select
    the files. ``source="original"`` reads Coat's and Yahoo! R3's raw ratings, labels
    ``rating >= threshold`` (default 3) as a conversion and splits the unbiased data into
    validation (``val_fraction``, default 0.2 coat / 0.1 yahoo) and test with the
    permutation ``numpy.random.default_rng(seed)``. KuaiRec exists only in split format.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    if source == "original" and name == "kuairec":
        raise ValueError("KuaiRec exists only in the processed split format here "
                         "({x,y}_{train,val,test}_{T}_{V}.txt); use source='split'")
    default_threshold, default_pct = _DEFAULT_SPLIT[name]
    if val_fraction is not None:
        _check_fraction(val_fraction)
    if source == "split":
        threshold = default_threshold if threshold is None else threshold
        val_pct = default_pct if val_fraction is None else _as_percent(val_fraction)
        return load_split(_dataset_folder(data_dir, name), threshold, val_pct, name=name)

    threshold = _ORIGINAL_THRESHOLD if threshold is None else threshold
    # Ratings are 1-5 stars: a threshold outside 2..5 would label every rating alike.
    _check_int(threshold, "threshold", low=2, high=5)
    val_fraction = default_pct / 100 if val_fraction is None else val_fraction
    folder = _dataset_folder(data_dir, name)
    if name == "coat":
        x_train, r_train, x_unbiased, r_unbiased, n_users, n_items = _read_coat(folder)
    else:
        x_train, r_train, x_unbiased, r_unbiased, n_users, n_items = _read_yahoo(folder)

    n = len(x_unbiased)
    n_val = round(val_fraction * n)
    if not 0 < n_val < n:
        raise ValueError(f"val_fraction={val_fraction} puts {n_val} of the {n} unbiased pairs into "
                         "validation; both validation and test need at least one pair")
    perm = np.random.default_rng(seed).permutation(n)
    # Sorted so that each part keeps the file's order; only membership is random.
    val, test = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    y_unbiased = (r_unbiased >= threshold).astype(np.float32)
    return CVRData(name, n_users, n_items, x_train, (r_train >= threshold).astype(np.float32),
                   x_unbiased[val], y_unbiased[val], x_unbiased[test], y_unbiased[test])


def _dataset_folder(data_dir: str | os.PathLike | None, name: str) -> Path:
    """The folder of data set ``name`` inside the resolved data directory."""
    folder = resolve_data_dir(data_dir) / _FOLDERS[name]
    if not folder.is_dir():
        raise ValueError(f"no {_FOLDERS[name]}/ folder in {folder.parent}; {_WHERE}")
    return folder


def _read_coat(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Coat's MNAR train and random test matrices as (pairs, ratings) of their rated cells."""
    rows, cols = _COAT_SHAPE
    out = []
    for file in ("train.ascii", "test.ascii"):
        path = folder / file
        matrix = _read_table(path, cols, np.int64, f"a row of the {rows} x {cols} rating matrix (0 = missing)")
        if len(matrix) != rows:
            raise ValueError(f"{path}: expected a {rows} x {cols} rating matrix, found {len(matrix)} rows")
        line = _first_line(((matrix < 0) | (matrix > 5)).any(axis=1))
        if line is not None:
            raise ValueError(f"{path}, line {line}: ratings must be 0 (missing) or 1-5")
        users, items = np.nonzero(matrix)
        out += [np.column_stack([users, items]).astype(np.int64), matrix[users, items]]
    return out[0], out[1], out[2], out[3], rows, cols


def _read_yahoo(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Yahoo! R3's MNAR train and random test lists as 0-based (pairs, ratings)."""
    out = []
    for part in ("train", "test"):
        path = folder / _YAHOO_FILE.format(part)
        table = _read_table(path, 3, np.int64, "`user item rating` with 1-based ids")
        line = _first_line((table[:, :2] < 1).any(axis=1))
        if line is not None:
            user, item = table[line - 1, :2]
            raise ValueError(f"{path}, line {line}: ids are 1-based and must be >= 1; found '{user} {item}'")
        line = _first_line((table[:, 2] < 1) | (table[:, 2] > 5))
        if line is not None:
            raise ValueError(f"{path}, line {line}: rating {table[line - 1, 2]} is outside 1-5")
        out += [table[:, :2] - 1, table[:, 2]]
    n_users, n_items = (int(m) + 1 for m in np.maximum(out[0].max(axis=0), out[2].max(axis=0)))
    return out[0], out[1], out[2], out[3], n_users, n_items


def _read_pairs(path: Path) -> np.ndarray:
    """An ``x_*`` file: ``(n, 2)`` int64 of 0-based ``(user, item)`` ids."""
    x = _read_table(path, 2, np.int64, "one `user item` pair of 0-based ids per line")
    line = _first_line((x < 0).any(axis=1))
    if line is not None:
        user, item = x[line - 1]
        raise ValueError(f"{path}, line {line}: negative id in '{user} {item}'; ids are 0-based and must be >= 0")
    return x


def _read_labels(path: Path) -> np.ndarray:
    """A ``y_*`` file: ``(n,)`` float32 labels in {0, 1}."""
    y = _read_table(path, 1, np.float64, "one 0/1 label per line")[:, 0]
    line = _first_line((y != 0) & (y != 1))
    if line is not None:
        raise ValueError(f"{path}, line {line}: label {y[line - 1]:g} is not 0 or 1")
    return y.astype(np.float32)


def _read_table(path: Path, n_cols: int, dtype: type, what: str) -> np.ndarray:
    """Parse a whitespace-separated file of numbers into a ``(lines, n_cols)`` array."""
    if not path.is_file():
        raise ValueError(f"missing file {path.name} in {path.parent}; {_WHERE}")
    text = path.read_text()
    if not text.strip():
        raise ValueError(f"{path} is empty; expected {what}")
    n_lines = text.count("\n") + (not text.endswith("\n"))  # the last line may lack its newline
    try:
        table = np.loadtxt(io.StringIO(text), dtype=dtype, comments=None, ndmin=2)
    except ValueError as exc:
        raise _locate_error(path, text, n_cols, dtype, what, str(exc)) from exc
    # loadtxt skips blank lines, which would misalign x and y files: a short count means one.
    if table.shape != (n_lines, n_cols):
        raise _locate_error(path, text, n_cols, dtype, what, f"parsed shape {table.shape}")
    return table


def _locate_error(path: Path, text: str, n_cols: int, dtype: type, what: str, reason: str) -> ValueError:
    """Scan a file that failed vectorised parsing line by line and describe its first bad line."""
    parse, kind = (int, "an integer") if np.issubdtype(dtype, np.integer) else (float, "a number")
    for number, line in enumerate(text.removesuffix("\n").split("\n"), start=1):
        fields = line.split()
        if len(fields) != n_cols:
            return ValueError(f"{path}, line {number}: expected {what} ({n_cols} fields), "
                              f"found {len(fields)} fields")
        for field in fields:
            try:
                parse(field)
            except ValueError:
                return ValueError(f"{path}, line {number}: {field!r} is not {kind}; expected {what}")
    return ValueError(f"{path}: could not parse as {what} ({reason})")


def _read_meta(path: Path) -> tuple[int, int]:
    """``(n_users, n_items)`` from a split folder's ``meta.json``."""
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); expected "
                         '{"n_users": <int>, "n_items": <int>}') from exc
    shape = []
    for key in ("n_users", "n_items"):
        value = meta.get(key) if isinstance(meta, dict) else None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: expected a positive integer under {key!r}; got {value!r}")
        shape.append(value)
    return shape[0], shape[1]


def _existing_splits(directory: Path) -> str:
    """Describe the split files a folder does hold, for a missing-split error."""
    files = sorted(p.name for p in directory.iterdir() if _SPLIT_FILE.fullmatch(p.name))
    if not files:
        return "the folder holds no {x,y}_{train,val,test}_{T}_{V}.txt files"
    combos = sorted({tuple(int(g) for g in _SPLIT_FILE.fullmatch(f).groups()) for f in files})
    listed = ", ".join(f"threshold={t} val_pct={v}" for t, v in combos)
    return f"it holds {', '.join(files)} ({listed})"


def _first_line(bad: np.ndarray) -> int | None:
    """1-based line number of the first True row of ``bad``, or None if there is none."""
    hits = np.flatnonzero(bad)
    return int(hits[0]) + 1 if hits.size else None


def _check_int(value: object, name: str, low: int, high: int | None = None) -> None:
    """Reject anything but an integer (bools included) in ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (
            high is not None and value > high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}; got {value!r}")


def _check_fraction(value: object) -> None:
    """Reject anything but a real number strictly between 0 and 1."""
    # `not 0 < value < 1` is also True for NaN.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ValueError(f"val_fraction must be a number strictly between 0 and 1; got {value!r}")


def _as_percent(val_fraction: float) -> int:
    """The ``V`` of the split file names for a validation fraction (0.2 -> 20)."""
    pct = round(val_fraction * 100)
    if not math.isclose(val_fraction * 100, pct, abs_tol=1e-9):
        raise ValueError(f"val_fraction={val_fraction} names no split file: the processed splits are "
                         "stored per whole percentage (V in x_train_T_V.txt), e.g. 0.1 -> V=10")
    return pct
