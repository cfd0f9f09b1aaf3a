"""Observed ratings that the semi-synthetic protocol completes (BADR paper, Section 4.8).

``ml100k`` reads MovieLens 100K's ``u.data`` from the data root; ``lowrank`` draws a
stand-in of the same shape and size from a known low-rank model, so demos and tests
need no download.  Both return 0-based ``(users, items, ratings)`` arrays.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

N_USERS = 943
N_ITEMS = 1682
N_RATINGS = 100_000
ML100K_URL = "https://grouplens.org/datasets/movielens/100k/"
YAHOO_R3_TEST = Path("yahoo-r3") / "ydata-ymusic-rating-study-v1_0-test.txt"
YAHOO_R3_SHAPE = (15_400, 1_000)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The data root: ``data_dir`` (``--data-dir``), else ``$CVR_DATA_DIR``, else a ValueError."""
    root = data_dir if data_dir is not None else os.environ.get("CVR_DATA_DIR")
    if not root:
        raise ValueError("no data root: pass --data-dir or set CVR_DATA_DIR to the folder holding "
                         f"ml-100k/ (ML-100K is published by GroupLens at {ML100K_URL}), "
                         "or use --source lowrank, which needs no download")
    return Path(root)


def read_ratings(path: Path, n_fields: int, n_users: int, n_items: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse ``user item rating [...]`` lines (1-based ids, ratings 1..5) into 0-based arrays.

    Raises ValueError naming the file and line for bytes that are not UTF-8, a wrong field
    count, a non-integer field, an id outside ``1..n_users`` / ``1..n_items``, a rating
    outside 1..5 or a repeated (user, item) pair.
    """
    limits = (("user id", n_users), ("item id", n_items), ("rating", 5))
    triples: list[tuple[int, int, int]] = []
    first_line: dict[tuple[int, int], int] = {}
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            where = f"{path}, line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where}: byte 0x{raw[exc.start]:02x} (column {exc.start + 1}) is not UTF-8 "
                                 "text; expected UTF-8 or ASCII text (re-save the file as UTF-8)") from None
            fields = line.split()
            if len(fields) != n_fields:
                raise ValueError(f"{where}: expected {n_fields} whitespace-separated fields, "
                                 f"got {len(fields)}: {line.rstrip()!r}")
            try:
                values = [int(field) for field in fields]
            except ValueError:
                raise ValueError(f"{where}: non-integer field in {line.rstrip()!r}") from None
            for value, (name, high) in zip(values, limits):
                if not 1 <= value <= high:
                    raise ValueError(f"{where}: {name} {value} outside 1..{high}")
            user, item, rating = values[:3]
            if (user, item) in first_line:
                raise ValueError(f"{where}: user {user} rated item {item} already on line "
                                 f"{first_line[user, item]}")
            first_line[user, item] = lineno
            triples.append((user - 1, item - 1, rating))
    if not triples:
        raise ValueError(f"{path}: no ratings")
    users, items, ratings = np.array(triples, dtype=np.int64).T
    return users, items, ratings


def read_ml100k(data_dir: str | os.PathLike | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ML-100K's ``<data root>/ml-100k/u.data`` as 0-based (users, items, ratings)."""
    path = resolve_data_dir(data_dir) / "ml-100k" / "u.data"
    if not path.is_file():
        raise ValueError(f"{path} not found. ML-100K is published by GroupLens at "
                         f"{ML100K_URL}; unzip it and pass --data-dir (or set "
                         "CVR_DATA_DIR) to the folder containing ml-100k/, or use "
                         "--source lowrank, which needs no download")
    return read_ratings(path, 4, N_USERS, N_ITEMS)


def yahoo_r3_marginals(data_dir: str | os.PathLike | None = None) -> tuple[float, ...]:
    """Shares of ratings 1..5 in Yahoo! R3's uniformly random test set (Section 4.8)."""
    path = resolve_data_dir(data_dir) / YAHOO_R3_TEST
    if not path.is_file():
        raise ValueError(f"{path} not found: pass --data-dir (or set CVR_DATA_DIR) to "
                         "the folder containing yahoo-r3/ (Yahoo! Webscope R3)")
    ratings = read_ratings(path, 3, *YAHOO_R3_SHAPE)[2]
    counts = np.bincount(ratings, minlength=6)[1:]
    return tuple(float(c) for c in counts / counts.sum())


def lowrank_ratings(rng: np.random.Generator, rank: int = 5
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic stand-in for ``u.data``: 100,000 distinct uniformly drawn (user, item)
    pairs of a 943 x 1682 matrix, rated ``clip(rint(3.5 + b_u + c_i + u.v + noise), 1, 5)``.
    """
    factor_sd = (0.36 / rank) ** 0.25  # u.v then has standard deviation 0.6
    scores = (3.5 + rng.normal(0.0, 0.4, (N_USERS, 1)) + rng.normal(0.0, 0.5, (1, N_ITEMS))
              + rng.normal(0.0, factor_sd, (N_USERS, rank)) @ rng.normal(0.0, factor_sd, (rank, N_ITEMS)))
    flat = np.sort(rng.choice(N_USERS * N_ITEMS, size=N_RATINGS, replace=False))
    noisy = scores.ravel()[flat] + rng.normal(0.0, 0.5, N_RATINGS)
    users, items = np.divmod(flat, N_ITEMS)
    return users, items, np.clip(np.rint(noisy), 1, 5).astype(np.int64)
