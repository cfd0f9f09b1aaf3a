"""Parsers of whitespace-separated text files of numbers, with errors naming file and line.

Files are parsed vectorised (``numpy.loadtxt``); only when that fails, or when the parsed
shape shows a blank or ragged line, is the file scanned line by line to name the first
offending line. Line numbers in messages are 1-based.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def read_table(path: Path, n_cols: int | None, dtype: type, what: str, hint: str = "") -> np.ndarray:
    """Parse a whitespace-separated file of numbers into a ``(lines, n_cols)`` array.

    ``n_cols=None`` takes the column count from the first line and requires it of every
    line. ``what`` describes one line for error messages; ``hint`` (how to supply a missing
    file) is appended to the missing-file error.
    """
    if not path.is_file():
        raise ValueError(f"missing file {path.name} in {path.parent}" + (f"; {hint}" if hint else ""))
    text = path.read_text()
    if not text.strip():
        raise ValueError(f"{path} is empty; expected {what}")
    n_lines = text.count("\n") + (not text.endswith("\n"))  # the last line may lack its newline
    try:
        table = np.loadtxt(io.StringIO(text), dtype=dtype, comments=None, ndmin=2)
    except ValueError as exc:
        raise _locate_error(path, text, n_cols, dtype, what, str(exc)) from exc
    # loadtxt skips blank lines, which would misalign x and y files: a short count means one.
    if table.shape[0] != n_lines or (n_cols is not None and table.shape[1] != n_cols):
        raise _locate_error(path, text, n_cols, dtype, what, f"parsed shape {table.shape}")
    return table


def _locate_error(path: Path, text: str, n_cols: int | None, dtype: type, what: str,
                  reason: str) -> ValueError:
    """Scan a file that failed vectorised parsing line by line and describe its first bad line."""
    parse, kind = (int, "an integer") if np.issubdtype(dtype, np.integer) else (float, "a number")
    lines = text.removesuffix("\n").split("\n")
    expected = f"{n_cols} fields"
    if n_cols is None:
        n_cols, expected = len(lines[0].split()), f"{len(lines[0].split())} fields, as on line 1"
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if len(fields) != n_cols:
            return ValueError(f"{path}, line {number}: expected {what} ({expected}), "
                              f"found {len(fields)} fields")
        for field in fields:
            try:
                parse(field)
            except ValueError:
                return ValueError(f"{path}, line {number}: {field!r} is not {kind}; expected {what}")
    return ValueError(f"{path}: could not parse as {what} ({reason})")


def first_line(bad: np.ndarray) -> int | None:
    """1-based line number of the first True row of ``bad``, or None if there is none."""
    hits = np.flatnonzero(bad)
    return int(hits[0]) + 1 if hits.size else None


def read_pairs(path: Path) -> np.ndarray:
    """An ``x_*`` file: ``(n, 2)`` int64 of 0-based ``(user, item)`` ids."""
    x = read_table(path, 2, np.int64, "one `user item` pair of 0-based ids per line")
    line = first_line((x < 0).any(axis=1))
    if line is not None:
        user, item = x[line - 1]
        raise ValueError(f"{path}, line {line}: negative id in '{user} {item}'; ids are 0-based and must be >= 0")
    return x


def read_labels(path: Path) -> np.ndarray:
    """A ``y_*`` file: ``(n,)`` float32 labels in {0, 1}."""
    y = read_table(path, 1, np.float64, "one 0/1 label per line")[:, 0]
    line = first_line((y != 0) & (y != 1))
    if line is not None:
        raise ValueError(f"{path}, line {line}: label {y[line - 1]:g} is not 0 or 1")
    return y.astype(np.float32)


def read_features(path: Path, n_rows: int, row: str, shape_origin: str) -> np.ndarray:
    """A side-feature file: ``(n_rows, d)`` float32, line ``k`` holding the features of id ``k - 1``.

    ``row`` names what a line describes ("user" / "item"); ``shape_origin`` says where
    ``n_rows`` came from, for the row-count error.
    """
    what = f"one whitespace-separated row of numbers per {row} (line k for {row} id k - 1)"
    table = read_table(path, None, np.float64, what)
    line = first_line(~np.isfinite(table).all(axis=1))
    if line is not None:
        raise ValueError(f"{path}, line {line}: features must be finite numbers; "
                         f"found {table[line - 1][~np.isfinite(table[line - 1])][0]:g}")
    if len(table) != n_rows:
        raise ValueError(f"{path} has {len(table)} rows; expected {n_rows}, one per {row} "
                         f"(the data set has {n_rows} {row}s, {shape_origin})")
    return table.astype(np.float32)


def read_names(path: Path, n_names: int, values: Path) -> tuple[str, ...]:
    """A feature-names file: one non-empty name per line, ``n_names`` lines (the columns of ``values``)."""
    names = tuple(line.strip() for line in path.read_text().splitlines())
    line = first_line(np.array([not name for name in names], dtype=bool))
    if line is not None:
        raise ValueError(f"{path}, line {line}: empty feature name; expected one name per line")
    if len(names) != n_names:
        raise ValueError(f"{path} names {len(names)} features but {values.name} has {n_names} columns; "
                         "expected one name per column, in column order")
    return names
