"""Readers of the original rating files (Coat, Yahoo! R3) and their binarised train/val/test split.

Ratings are 1-5 stars. The biased (MNAR) ratings become the training pairs; the unbiased
(uniformly random) ratings are split into validation and test by a seeded permutation.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from cvrdata.checks import check_int
from cvrdata.datadir import WHERE
from cvrdata.dataset import CVRData
from cvrdata.formats import check_ids, first_line, implied_shape, read_table

THRESHOLD = 3  # default: rating >= 3 is a conversion
_COAT_SHAPE = (290, 300)
_YAHOO_FILE = "ydata-ymusic-rating-study-v1_0-{}.txt"


class Ratings(NamedTuple):
    """Rated pairs of one data set: 0-based ``(n, 2)`` int64 pairs and their ``(n,)`` ratings."""

    x_biased: np.ndarray
    r_biased: np.ndarray
    x_unbiased: np.ndarray
    r_unbiased: np.ndarray
    n_users: int
    n_items: int
    shape_origin: str  # where n_users / n_items come from, for messages


def read_coat(folder: Path) -> Ratings:
    """Coat's MNAR ``train.ascii`` and random ``test.ascii`` matrices as their rated cells."""
    rows, cols = _COAT_SHAPE
    out = []
    for file in ("train.ascii", "test.ascii"):
        path = folder / file
        matrix = read_table(path, cols, np.int64, f"a row of the {rows} x {cols} rating matrix (0 = missing)",
                            hint=WHERE)
        if len(matrix) != rows:
            raise ValueError(f"{path}: expected a {rows} x {cols} rating matrix, found {len(matrix)} rows")
        line = first_line(((matrix < 0) | (matrix > 5)).any(axis=1))
        if line is not None:
            raise ValueError(f"{path}, line {line}: ratings must be 0 (missing) or 1-5")
        users, items = np.nonzero(matrix)
        out += [np.column_stack([users, items]).astype(np.int64), matrix[users, items]]
    return Ratings(*out, rows, cols, f"the shape of Coat's {rows} x {cols} rating matrices")


def read_yahoo(folder: Path) -> Ratings:
    """Yahoo! R3's MNAR train and random test ``user item rating`` lists, ids made 0-based.

    The shape is the largest ids; ids above ``2**31`` (1-based) or a shape above ``2**31``
    user-item pairs are refused, naming the file and line (see :mod:`cvrdata.splits`).
    """
    out, paths = [], []
    for part in ("train", "test"):
        path = folder / _YAHOO_FILE.format(part)
        table = read_table(path, 3, np.int64, "`user item rating` with 1-based ids", hint=WHERE)
        line = first_line((table[:, :2] < 1).any(axis=1))
        if line is not None:
            user, item = table[line - 1, :2]
            raise ValueError(f"{path}, line {line}: ids are 1-based and must be >= 1; found '{user} {item}'")
        line = first_line((table[:, 2] < 1) | (table[:, 2] > 5))
        if line is not None:
            raise ValueError(f"{path}, line {line}: rating {table[line - 1, 2]} is outside 1-5")
        check_ids(path, table[:, :2], base=1)
        out += [table[:, :2] - 1, table[:, 2]]
        paths.append(path)
    n_users, n_items = implied_shape([(paths[0], out[0]), (paths[1], out[2])], base=1, remedy="")
    return Ratings(*out, n_users, n_items, "the largest ids in the rating files")


def check_threshold(threshold: object) -> None:
    """Reject a rating threshold that would not separate 1-5 star ratings."""
    # A threshold outside 2..5 would label every rating alike.
    check_int(threshold, "threshold", low=2, high=5)


def binarise_and_split(name: str, ratings: Ratings, threshold: int, val_fraction: float, seed: int,
                       **features: object) -> CVRData:
    """Label ``rating >= threshold`` as a conversion; split the unbiased pairs into val / test.

    ``round(val_fraction * n_unbiased)`` pairs, chosen by the permutation
    ``numpy.random.default_rng(seed)``, go to validation, the rest to test; both keep the
    file order. ``features`` are passed on to :class:`CVRData`.
    """
    n = len(ratings.x_unbiased)
    n_val = round(val_fraction * n)
    if not 0 < n_val < n:
        raise ValueError(f"val_fraction={val_fraction} puts {n_val} of the {n} unbiased pairs into "
                         "validation; both validation and test need at least one pair")
    perm = np.random.default_rng(seed).permutation(n)
    # Sorted so that each part keeps the file's order; only membership is random.
    val, test = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    y_unbiased = (ratings.r_unbiased >= threshold).astype(np.float32)
    return CVRData(name, ratings.n_users, ratings.n_items,
                   ratings.x_biased, (ratings.r_biased >= threshold).astype(np.float32),
                   ratings.x_unbiased[val], y_unbiased[val], ratings.x_unbiased[test], y_unbiased[test],
                   **features)
