"""The :class:`CVRData` container: one data set's pairs, labels, shape and side features.

Also :class:`DataWarning` and :func:`warn_repeated_pairs`, the loaders' once-per-load
warning about repeated pairs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import numbers
import sys
import warnings
from dataclasses import dataclass

import numpy as np

from cvrdata.checks import check_fraction, check_int

PARTS = ("train", "val", "test")
# Bumped whenever the bytes fed to the fingerprint change, so that old signatures stop matching.
_FINGERPRINT_VERSION = b"cvrdata-fingerprint-1"
# The part pairs whose overlap CVRData.repeated_pairs reports, in this order.
OVERLAPS = (("train", "val"), ("train", "test"), ("val", "test"))


class DataWarning(UserWarning):
    """A data set loads but looks wrong: a pair repeated within a part or present in two parts.

    Issued once per load by the loaders (:func:`warn_repeated_pairs`). Expected for Coat:
    its uniformly random (unbiased) ratings include pairs the user had also rated of their
    own choice, so some validation and test pairs are training pairs too (same labels).
    """


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on numpy arrays is ambiguous
class CVRData:
    """One data set: biased (clicked) training pairs, unbiased validation and test pairs.

    ``x_*`` are ``(n, 2)`` int64 arrays of 0-based ``(user, item)`` ids and ``y_*`` the
    ``(n,)`` float32 conversion labels in {0, 1}; other integer / numeric inputs are converted.
    ``user_features`` (``(n_users, d_u)``) and ``item_features`` (``(n_items, d_i)``) are
    optional float32 side features, row ``k`` for id ``k``; ``user_feature_names`` /
    ``item_feature_names`` optionally name their columns.
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
    user_features: np.ndarray | None = None
    item_features: np.ndarray | None = None
    user_feature_names: tuple[str, ...] | None = None
    item_feature_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for field, value in (("n_users", self.n_users), ("n_items", self.n_items)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{self.name}: {field} must be a positive integer; got {value!r}")
        for part in PARTS:
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
        for side, n_rows in (("user", self.n_users), ("item", self.n_items)):
            self._check_features(side, n_rows)

    def _check_features(self, side: str, n_rows: int) -> None:
        """Validate and normalise ``{side}_features`` and ``{side}_feature_names``."""
        field, names_field = f"{side}_features", f"{side}_feature_names"
        features, names = getattr(self, field), getattr(self, names_field)
        if features is not None:
            features = np.asarray(features)
            if features.dtype == bool or not np.issubdtype(features.dtype, np.number) or features.ndim != 2 \
                    or features.shape[1] < 1:
                raise ValueError(f"{self.name}: {field} must be a 2-D ({'n_' + side + 's'}, d) numeric array "
                                 f"with d >= 1; got shape {features.shape} and dtype {features.dtype}")
            if len(features) != n_rows:
                raise ValueError(f"{self.name}: {field} has {len(features)} rows; expected n_{side}s = "
                                 f"{n_rows}, row k holding the features of {side} id k")
            bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
            if bad.size:
                raise ValueError(f"{self.name}: {field} must be finite; row {bad[0]} ({side} id {bad[0]}) "
                                 "holds NaN or inf")
            object.__setattr__(self, field, features.astype(np.float32, copy=False))
        if names is not None:
            if features is None:
                raise ValueError(f"{self.name}: {names_field} given without {field}; pass both or neither")
            if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"{self.name}: {names_field} must be a tuple or list of non-empty strings; "
                                 f"got {names!r}")
            names = tuple(names)
            if len(names) != features.shape[1]:
                raise ValueError(f"{self.name}: {names_field} has {len(names)} names but {field} has "
                                 f"{features.shape[1]} columns; expected one name per column")
            object.__setattr__(self, names_field, names)

    @property
    def n_pairs(self) -> int:
        """Number of user-item pairs, ``n_users * n_items``."""
        return self.n_users * self.n_items

    def flat_index(self, x: np.ndarray) -> np.ndarray:
        """Row-major index ``user * n_items + item`` of each ``(user, item)`` row of ``x``."""
        return x[:, 0] * self.n_items + x[:, 1]

    def repeated_pairs(self) -> dict[str, tuple[int, tuple[int, int]]]:
        """Pairs that occur more than once, by where: ``{where: (count, example (user, item))}``.

        ``where`` is a part (``"train"``, ``"val"``, ``"test"``: ``count`` rows repeat a pair
        of an earlier row of the part; the example is the first such row's pair) or two parts
        (``"train/val"``, ``"train/test"``, ``"val/test"``: ``count`` distinct pairs are in
        both; the example is the first such pair of the second part). Only non-zero counts
        are listed, in that order; an empty dict means every pair is unique.
        """
        keys = {part: self._keys(getattr(self, f"x_{part}")) for part in PARTS}
        found: dict[str, tuple[int, tuple[int, int]]] = {}
        for part in PARTS:
            _, first = np.unique(keys[part], return_index=True)
            if len(first) < len(keys[part]):
                repeats = np.ones(len(keys[part]), dtype=bool)
                repeats[first] = False
                found[part] = (len(keys[part]) - len(first), self._example(part, repeats))
        for a, b in OVERLAPS:
            both = np.isin(keys[b], keys[a])
            if both.any():
                found[f"{a}/{b}"] = (len(np.unique(keys[b][both])), self._example(b, both))
        return found

    def _keys(self, x: np.ndarray) -> np.ndarray:
        """One comparable key per ``(user, item)`` row: the flat index, or the row itself past int64."""
        if self.n_pairs < 2**63:
            return self.flat_index(x)
        return np.ascontiguousarray(x).view([("user", x.dtype), ("item", x.dtype)])[:, 0]

    def _example(self, part: str, rows: np.ndarray) -> tuple[int, int]:
        """The ``(user, item)`` of the first True row of ``rows`` in ``x_{part}``."""
        user, item = getattr(self, f"x_{part}")[np.flatnonzero(rows)[0]]
        return int(user), int(item)

    def click_matrix(self) -> np.ndarray:
        """Click indicator ``o`` of all pairs, ``(n_pairs,)`` float32 in row-major order.

        ``o = 1`` for the training (clicked) pairs and 0 elsewhere; the propensity model
        ``p_hat = P(o = 1)`` is fitted on it.
        """
        o = np.zeros(self.n_pairs, dtype=np.float32)
        o[self.flat_index(self.x_train)] = 1.0
        return o

    def subsample(self, fraction: float, seed: int) -> CVRData:
        """A copy keeping ``max(1, round(fraction * n_train))`` of the training (clicked) pairs.

        The kept pairs are drawn without replacement by ``numpy.random.default_rng(seed)``
        and stay in their original order; validation, test, shape, name and features are
        unchanged, so ``fraction=1`` returns equal data. ``fraction`` must be in ``(0, 1]``.
        """
        check_fraction(fraction, "fraction", allow_one=True)
        check_int(seed, "seed", low=0)
        n = len(self.x_train)
        if n == 0:
            raise ValueError(f"{self.name}: there are no training pairs to subsample")
        keep = max(1, round(fraction * n))
        # Sorted so that the kept pairs keep the file's order; only membership is random.
        rows = np.sort(np.random.default_rng(seed).choice(n, size=keep, replace=False))
        return dataclasses.replace(self, x_train=self.x_train[rows], y_train=self.y_train[rows])

    def fingerprint(self) -> str:
        """First 16 hex digits of the sha256 of what training reads.

        Hashed: ``n_users``, ``n_items`` and, for each of ``x_train, y_train, x_val, y_val,
        x_test, y_test, user_features, item_features`` that is present, a header of its field
        name, dtype and shape, then its bytes; the headers make the encoding unambiguous. The
        name and the feature names are not hashed: they do not change what is trained on.
        """
        digest = hashlib.sha256(_FINGERPRINT_VERSION)
        digest.update(f"shape {self.n_users} {self.n_items}\n".encode())
        for field in (*(f"{v}_{part}" for part in PARTS for v in "xy"), "user_features", "item_features"):
            array = getattr(self, field)
            if array is None:
                continue  # absent features: no header, so nothing of this field is hashed
            if array.dtype.kind == "f":
                array = array + 0.0  # -0.0 -> 0.0: equal values must give equal bytes
            # Little-endian on every machine, so that a signature written on one matches on another.
            array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            digest.update(f"{field} {array.dtype.str} {array.shape}\n".encode())
            digest.update(array.tobytes())
        return digest.hexdigest()[:16]


def warn_repeated_pairs(data: CVRData) -> None:
    """Issue one :class:`DataWarning` listing ``data``'s repeated pairs (:meth:`CVRData.repeated_pairs`), if any.

    The message names the data set, each part or pair of parts with its count, and an
    example pair. The loaders call it once per load.
    """
    found = data.repeated_pairs()
    if not found:
        return
    findings = []
    for where, (count, (user, item)) in found.items():
        s = "" if count == 1 else "s"
        if "/" in where:
            a, b = where.split("/")
            findings.append(f"{count} pair{s} in both {a} and {b} (e.g. user {user}, item {item})")
        else:
            findings.append(f"{count} repeated pair{s} within {where} (e.g. user {user}, item {item})")
    # Attributed to the first caller outside cvrdata (the user's load_dataset line).
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("cvrdata."):
        frame, level = frame.f_back, level + 1
    warnings.warn(DataWarning(
        f"{data.name}: {'; '.join(findings)}: a repeated pair counts more than once in the losses and metrics, "
        "and a training pair in validation or test is scored on what was trained on"), stacklevel=level)
