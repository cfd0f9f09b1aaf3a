"""The built-in data sets: one table of where each lives and how it is read.

Each lives in a sub-folder of the data directory (``data_dir``, else ``$CVR_DATA_DIR``).
``source="split"`` reads the BADR authors' processed splits there (default ``T`` / ``V`` from
the table); ``source="original"`` reads the owners' rating files, where the table has a
reader for them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cvrdata.checks import as_percent
from cvrdata.datadir import WHERE, resolve_data_dir
from cvrdata.dataset import CVRData, warn_repeated_pairs
from cvrdata.features import GENERIC, FeatureFiles, read_side_features
from cvrdata.original import THRESHOLD, Ratings, binarise_and_split, check_threshold, read_coat, read_yahoo
from cvrdata.splits import read_split


@dataclass(frozen=True)
class Builtin:
    """One built-in data set.

    ``threshold`` / ``val_pct``: ``T`` / ``V`` of the published processed splits, the default
    split. ``original``: reader of the owners' rating files, None where only the split
    format exists. ``features``: where the side features live, relative to ``folder``.
    """

    name: str
    title: str
    folder: str
    threshold: int
    val_pct: int
    original: Callable[[Path], Ratings] | None
    features: FeatureFiles


_COAT_FEATURES = FeatureFiles("user_item_features/user_features.ascii", "user_item_features/item_features.ascii",
                              "user_item_features/user_features_map.txt",
                              "user_item_features/item_features_map.txt")

BUILTINS: dict[str, Builtin] = {b.name: b for b in (
    Builtin("coat", "Coat", "coat", threshold=3, val_pct=20, original=read_coat, features=_COAT_FEATURES),
    Builtin("yahoo", "Yahoo! R3", "yahoo-r3", threshold=3, val_pct=10, original=read_yahoo, features=GENERIC),
    Builtin("kuairec", "KuaiRec", "kuairec", threshold=2, val_pct=10, original=None, features=GENERIC),
)}
DATASETS: tuple[str, ...] = tuple(BUILTINS)


def load_builtin(spec: Builtin, data_dir: str | os.PathLike | None, source: str, threshold: int | None,
                 val_fraction: float | None, seed: int) -> CVRData:
    """Load built-in ``spec`` (see :func:`cvrdata.load_dataset`); arguments are checked before the disk is read.

    Repeated pairs are a :class:`cvrdata.DataWarning`, once per load (expected for Coat).
    """
    if source == "split":
        threshold = spec.threshold if threshold is None else threshold
        val_pct = spec.val_pct if val_fraction is None else as_percent(val_fraction)
        return read_split(_folder(data_dir, spec), threshold, val_pct, spec.name, spec.features)

    if spec.original is None:
        raise ValueError(f"{spec.title} exists only in the processed split format here "
                         "({x,y}_{train,val,test}_{T}_{V}.txt); use source='split'")
    threshold = THRESHOLD if threshold is None else threshold
    check_threshold(threshold)
    val_fraction = spec.val_pct / 100 if val_fraction is None else val_fraction
    folder = _folder(data_dir, spec)
    ratings = spec.original(folder)
    features = read_side_features(folder, spec.features, ratings.n_users, ratings.n_items, ratings.shape_origin)
    data = binarise_and_split(spec.name, ratings, threshold, val_fraction, seed, **features)
    warn_repeated_pairs(data)
    return data


def _folder(data_dir: str | os.PathLike | None, spec: Builtin) -> Path:
    """The folder of ``spec`` inside the resolved data directory."""
    folder = resolve_data_dir(data_dir) / spec.folder
    if not folder.is_dir():
        raise ValueError(f"no {spec.folder}/ folder in {folder.parent}; {WHERE}")
    return folder
