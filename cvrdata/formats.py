"""Parsers of whitespace-separated text files of numbers, with errors naming file and line.

Every file is read as UTF-8 (ASCII is a subset; a leading UTF-8 byte-order mark is
skipped): other bytes are an error naming the file, the line and the byte
(:func:`read_text`). A folder (or any other non-file) where a file is expected is an
error naming the path (:func:`is_present`). Files are parsed vectorised
(``numpy.loadtxt``); only when that fails, or when the parsed shape shows a blank or ragged
line, is the file scanned line by line to name the first offending line. Line numbers in
messages are 1-based.

Ids are bounded so that the ``n_users x n_items`` tables the trainers build stay
allocatable: every id must fit int32 (``<= MAX_ID``, :func:`read_pairs`), and a shape
taken from the largest ids may hold at most ``MAX_PAIRS`` user-item pairs
(:func:`implied_shape`).
"""
from __future__ import annotations

import codecs
import io
from pathlib import Path

import numpy as np

# Largest id (0-based) a data set may use: ids index int32-sized tables.
MAX_ID = 2**31 - 1
# Most user-item pairs (n_users * n_items) in a shape inferred from the ids (no meta.json):
# the trainers build n_users x n_items tables (the click matrix, the propensities), 8 GiB
# of float32 at this limit, so a larger inferred shape is almost surely a stray id.
MAX_PAIRS = 2**31
# What a line of an x_* / y_* split file holds, for messages.
PAIRS = "one `user item` pair of 0-based ids per line"
LABELS = "one 0/1 label per line"


def is_present(path: Path, what: str) -> bool:
    """True if ``path`` is a file, False if nothing is there; a folder (or other non-file) is a ValueError.

    ``what`` describes the expected content, for the error.
    """
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a file; expected a file holding {what}: "
                         "remove or rename the folder")
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} is not a regular file (a device, socket or pipe); expected a file holding {what}")
    return path.is_file()


def read_text(path: Path, what: str, hint: str = "") -> str:
    """The text of file ``path``, decoded as UTF-8 (ASCII included; a leading byte-order mark is dropped).

    A missing file, a folder in its place, or bytes that are not UTF-8 are ValueErrors
    naming the path (and, for the bytes, the line, column and byte). ``what`` describes the
    expected content; ``hint`` (how to supply a missing file) is appended to the
    missing-file error.
    """
    if not is_present(path, what):
        raise ValueError(f"missing file {path.name} in {path.parent}" + (f"; {hint}" if hint else ""))
    data = path.read_bytes()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = start + exc.start
        line, line_start = data.count(b"\n", 0, at) + 1, data.rfind(b"\n", 0, at) + 1
        raise ValueError(f"{path}, line {line}: byte 0x{data[at]:02x} (column "
                         f"{at - line_start + 1}) is not UTF-8 text; expected {what} as UTF-8 or ASCII "
                         "text (re-save the file as UTF-8; is it in another encoding, or binary?)") from None


def read_table(path: Path, n_cols: int | None, dtype: type, what: str, hint: str = "") -> np.ndarray:
    """Parse a whitespace-separated UTF-8 file of numbers into a ``(lines, n_cols)`` array.

    ``n_cols=None`` takes the column count from the first line and requires it of every
    line. ``what`` describes one line for error messages; ``hint`` (how to supply a missing
    file) is appended to the missing-file error. The file is read by :func:`read_text`.
    """
    text = read_text(path, what, hint)
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
    limits = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
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
                value = parse(field)
            except ValueError:
                return ValueError(f"{path}, line {number}: {field!r} is not {kind}; expected {what}")
            if limits is not None and not limits.min <= value <= limits.max:
                return ValueError(f"{path}, line {number}: {field} is out of the {limits.bits}-bit integer "
                                  f"range; expected {what}")
    return ValueError(f"{path}: could not parse as {what} ({reason})")


def first_line(bad: np.ndarray) -> int | None:
    """1-based line number of the first True row of ``bad``, or None if there is none."""
    hits = np.flatnonzero(bad)
    return int(hits[0]) + 1 if hits.size else None


def read_pairs(path: Path) -> np.ndarray:
    """An ``x_*`` file: ``(n, 2)`` int64 of 0-based ``(user, item)`` ids in ``0..MAX_ID``."""
    x = read_table(path, 2, np.int64, PAIRS)
    line = first_line((x < 0).any(axis=1))
    if line is not None:
        user, item = x[line - 1]
        raise ValueError(f"{path}, line {line}: negative id in '{user} {item}'; ids are 0-based and must be >= 0")
    check_ids(path, x, base=0)
    return x


def check_ids(path: Path, ids: np.ndarray, base: int) -> None:
    """Reject an id above ``MAX_ID`` (0-based) in the ``(n, 2)`` ids of ``path``, naming the line.

    ``base`` is the file's first id (0 or 1); ``ids`` are as written in the file.
    """
    line = first_line((ids > MAX_ID + base).any(axis=1))
    if line is not None:
        user, item = ids[line - 1]
        raise ValueError(f"{path}, line {line}: id {max(user, item)} in '{user} {item}' is above the largest "
                         f"supported id {MAX_ID + base} (2**31 - 1 for 0-based ids: ids index tables of the "
                         "users and items and must fit int32); number the users and items densely from "
                         f"{base}")


def implied_shape(parts: list[tuple[Path, np.ndarray]], base: int, remedy: str) -> tuple[int, int]:
    """``(largest user + 1, largest item + 1)`` over the 0-based ``(n, 2)`` ids of several files.

    Raises a ValueError naming the file and line of the largest id when the shape holds
    more than ``MAX_PAIRS`` user-item pairs, before anything of that size is allocated.
    ``base`` is the files' first id (for the message); ``remedy`` says how to give a larger
    shape explicitly, if the format has a way.
    """
    n_users = max((int(x[:, 0].max()) + 1 for _, x in parts if len(x)), default=1)
    n_items = max((int(x[:, 1].max()) + 1 for _, x in parts if len(x)), default=1)
    if n_users * n_items <= MAX_PAIRS:
        return n_users, n_items
    # Blame the larger of the two largest ids: a stray id is far above the others.
    column, side = (0, "user") if n_users >= n_items else (1, "item")
    largest = max(n_users, n_items) - 1
    path, x = next((p, x) for p, x in parts if len(x) and x[:, column].max() == largest)
    line = first_line(x[:, column] == largest)
    raise ValueError(f"{path}, line {line}: {side} id {largest + base} makes the data set "
                     f"{n_users:,} x {n_items:,} = {n_users * n_items:,} user-item pairs (the shape is taken "
                     f"from the largest ids), above the limit of {MAX_PAIRS:,} (2**31) pairs; ids must be "
                     f"numbered densely from {base}{remedy}")


def read_labels(path: Path) -> np.ndarray:
    """A ``y_*`` file: ``(n,)`` float32 labels in {0, 1}."""
    y = read_table(path, 1, np.float64, LABELS)[:, 0]
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
    names = tuple(line.strip() for line in read_text(path, "one feature name per line").splitlines())
    line = first_line(np.array([not name for name in names], dtype=bool))
    if line is not None:
        raise ValueError(f"{path}, line {line}: empty feature name; expected one name per line")
    if len(names) != n_names:
        raise ValueError(f"{path} names {len(names)} features but {values.name} has {n_names} columns; "
                         "expected one name per column, in column order")
    return names
