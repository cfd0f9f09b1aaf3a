"""The split format: a folder of ``{x,y}_{train,val,test}_{T}_{V}.txt`` files and an optional ``meta.json``.

``x_{part}_{T}_{V}.txt`` holds one 0-based ``user item`` pair per line and
``y_{part}_{T}_{V}.txt`` the pair's 0/1 label on the same line; ``T`` is the binarisation
threshold and ``V`` the percentage of the unbiased data used for validation. ``meta.json``
(written by ``simulate``) may give ``n_users`` and ``n_items`` (both required when the
file exists), ``threshold`` and ``val_pct`` (the split to read by default) and ``name``.
Optional side features: see :data:`cvrdata.features.GENERIC`. Every file is UTF-8 (or
ASCII) text.

Size limits (so that the trainers' ``n_users x n_items`` tables stay allocatable): every
id is at most ``2**31 - 1`` (int32). Without ``meta.json`` the shape is the largest ids
plus one and may hold at most ``2**31`` user-item pairs (``n_users * n_items``): a larger
one is refused, naming the file and line of the largest id, as almost surely a stray id.
With ``meta.json`` the shape is the one it gives (``n_users`` and ``n_items`` each at
most ``2**31``, their product not limited: the folder declares its size), and an id
outside it is refused.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cvrdata.checks import check_int
from cvrdata.datadir import WHERE
from cvrdata.dataset import PARTS, CVRData, warn_repeated_pairs
from cvrdata.features import GENERIC, FeatureFiles, read_side_features
from cvrdata.formats import LABELS, MAX_ID, PAIRS, first_line, implied_shape, is_present, read_labels, read_pairs, \
    read_text

SPLIT_FILE = re.compile(r"[xy]_(?:train|val|test)_(\d+)_(\d+)\.txt")
_PATTERN = "{x,y}_{train,val,test}_{T}_{V}.txt"
_META_FORMAT = '{"n_users": <int>, "n_items": <int>}'
_META_WHAT = f"a JSON object {_META_FORMAT}"


@dataclass(frozen=True)
class Meta:
    """The keys of a split folder's ``meta.json`` that loading uses; absent optional keys are None."""

    n_users: int
    n_items: int
    threshold: int | None
    val_pct: int | None
    name: str | None


def read_meta(path: Path) -> Meta:
    """Parse and check a split folder's ``meta.json``; other keys are ignored.

    ``n_users`` and ``n_items`` are integers in ``1..2**31`` (ids fit int32), ``threshold``
    an integer >= 0, ``val_pct`` one in 1..99, ``name`` a non-empty string.
    """
    try:
        meta = json.loads(read_text(path, _META_WHAT))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); expected {_META_FORMAT}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object with 'n_users' and 'n_items'; "
                         f"got a {type(meta).__name__}")
    values: dict[str, object] = {}
    for key, low, high, required in (("n_users", 1, MAX_ID + 1, True), ("n_items", 1, MAX_ID + 1, True),
                                     ("threshold", 0, None, False), ("val_pct", 1, 99, False)):
        value = meta.get(key)
        if value is None and not required:
            values[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (
                high is not None and value > high):
            what = "a positive integer" if low == 1 and high is None else (
                f"an integer >= {low}" if high is None else f"an integer in {low}..{high}")
            raise ValueError(f"{path}: expected {what} under {key!r}; got {value!r}")
        values[key] = value
    name = meta.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"{path}: expected a non-empty string under 'name'; got {name!r}")
    return Meta(name=name, **values)


def split_combinations(directory: str | os.PathLike) -> list[tuple[int, int]]:
    """The sorted ``(T, V)`` pairs named by any split file in ``directory`` (complete or not)."""
    if not Path(directory).is_dir():
        raise ValueError(f"folder {directory} does not exist; expected a folder of {_PATTERN} files")
    return sorted({(int(m[1]), int(m[2])) for p in Path(directory).iterdir()
                   if (m := SPLIT_FILE.fullmatch(p.name))})


def load_split(directory: str | os.PathLike, threshold: int, val_pct: int, name: str | None = None) -> CVRData:
    """Load the split ``{x,y}_{train,val,test}_{threshold}_{val_pct}.txt`` of ``directory``.

    The shape comes from ``meta.json`` when the folder has one, otherwise from the largest
    ids over all three parts plus one (at most ``2**31`` user-item pairs; see the module's
    size limits). ``user_features.txt`` / ``item_features.txt`` (and their
    ``*_feature_names.txt``) are loaded when present. The name is ``name``, else
    ``meta.json``'s ``"name"``, else the folder's name.

    Errors (``ValueError``, naming the file and line where there is one): a missing split
    file, a folder in place of a file, bytes that are not UTF-8, a malformed line, x and y
    files of different lengths, an id above ``2**31 - 1`` or outside ``meta.json``'s shape,
    a shape from the ids above ``2**31`` pairs. A pair repeated within a part, or present in
    two parts (train and val, train and test, val and test), is a :class:`cvrdata.DataWarning`
    issued once per load with the counts and an example pair.
    """
    return read_split(directory, threshold, val_pct, name, GENERIC)


def read_split(directory: str | os.PathLike, threshold: int, val_pct: int, name: str | None,
               features: FeatureFiles) -> CVRData:
    """:func:`load_split` with the side features read from ``features``' files."""
    directory = Path(directory)
    check_int(threshold, "threshold", low=0)
    check_int(val_pct, "val_pct", low=1, high=99)
    if not directory.is_dir():
        raise ValueError(f"folder {directory} does not exist; {WHERE}")
    suffix = f"{threshold}_{val_pct}"
    missing = [f"{v}_{part}_{suffix}.txt" for part in PARTS for v in "xy"
               if not is_present(directory / f"{v}_{part}_{suffix}.txt", PAIRS if v == "x" else LABELS)]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} in {directory} (threshold={threshold}, "
                         f"val_pct={val_pct}); {_existing_splits(directory)}; {WHERE}")

    xs, ys = [], []
    for part in PARTS:
        x_path, y_path = directory / f"x_{part}_{suffix}.txt", directory / f"y_{part}_{suffix}.txt"
        x, y = read_pairs(x_path), read_labels(y_path)
        if len(x) != len(y):
            raise ValueError(f"{x_path} has {len(x)} lines but {y_path.name} has {len(y)}; "
                             "each pair needs its label on the same line")
        xs.append(x)
        ys.append(y)

    meta_path = directory / "meta.json"
    meta = read_meta(meta_path) if is_present(meta_path, _META_WHAT) else None
    if meta is not None:
        n_users, n_items = meta.n_users, meta.n_items
        for part, x in zip(PARTS, xs):
            line = first_line((x[:, 0] >= n_users) | (x[:, 1] >= n_items))
            if line is not None:
                user, item = x[line - 1]
                raise ValueError(f"{directory / f'x_{part}_{suffix}.txt'}, line {line}: pair '{user} {item}' "
                                 f"is outside the {n_users} x {n_items} shape given by {meta_path.name}")
        shape_origin = f"as {meta_path} gives"
    else:
        n_users, n_items = implied_shape([(directory / f"x_{part}_{suffix}.txt", x) for part, x in zip(PARTS, xs)],
                                         base=0, remedy=f"; if the data set is that large, give its shape in "
                                                        f"{meta_path.name}: {_META_FORMAT}")
        shape_origin = ("taken from the largest ids in the split files as the folder has no meta.json; "
                        f"write one with {_META_FORMAT} if the data set is larger")
    side = read_side_features(directory, features, n_users, n_items, shape_origin)
    if name is None:
        name = meta.name if meta is not None and meta.name is not None else Path(os.path.abspath(directory)).name
    data = CVRData(name, n_users, n_items, xs[0], ys[0], xs[1], ys[1], xs[2], ys[2], **side)
    warn_repeated_pairs(data)
    return data


def load_folder(directory: Path, threshold: int | None, val_pct: int | None) -> CVRData:
    """Load a split-format folder, choosing the split by default.

    ``threshold`` / ``val_pct`` that are None come from ``meta.json``'s ``"threshold"`` /
    ``"val_pct"`` when present, else from the one ``(T, V)`` of the folder's split files
    that agrees with those given; none or several such is an error listing what exists.
    """
    meta_path = directory / "meta.json"
    meta = read_meta(meta_path) if is_present(meta_path, _META_WHAT) else None
    if meta is not None:
        threshold = meta.threshold if threshold is None else threshold
        val_pct = meta.val_pct if val_pct is None else val_pct
    if threshold is None or val_pct is None:
        combos = split_combinations(directory)
        fits = [(t, v) for t, v in combos if threshold in (None, t) and val_pct in (None, v)]
        given = " and ".join(f"{k}={v}" for k, v in (("threshold", threshold), ("val_pct", val_pct))
                             if v is not None)
        if not combos:
            raise ValueError(f"{directory} holds no split files; expected {_PATTERN} (see cvrdata.load_split)")
        if len(fits) != 1:
            listed = ", ".join(f"threshold={t} val_pct={v}" for t, v in combos)
            problem = (f"holds no split with {given}" if not fits
                       else f"holds {len(fits)} splits{' with ' + given if given else ''}")
            raise ValueError(f"{directory} {problem}: it has {listed}; choose one with threshold= and "
                             "val_fraction= (val_pct / 100), or record it as \"threshold\" and \"val_pct\" "
                             "in its meta.json")
        threshold, val_pct = fits[0]
    return read_split(directory, threshold, val_pct, None, GENERIC)


def _existing_splits(directory: Path) -> str:
    """Describe the split files a folder does hold, for a missing-split error."""
    files = sorted(p.name for p in directory.iterdir() if SPLIT_FILE.fullmatch(p.name))
    if not files:
        return f"the folder holds no {_PATTERN} files"
    listed = ", ".join(f"threshold={t} val_pct={v}" for t, v in split_combinations(directory))
    return f"it holds {', '.join(files)} ({listed})"
