"""results.csv (one row per finished run, written atomically, resumable), history.csv (the runs'
per-epoch rows) and table3.md.

The paper's numbers (:mod:`reproduce.published`) appear only as the "paper" column beside ours.
"""
from __future__ import annotations

import csv
import io
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from .files import locked, replace
from .methods import METHODS, TABLE3_ROWS
from .published import PUBLISHED
from .train import HISTORY_COLUMNS, RANKING_COLUMNS

COLUMNS = ("dataset", "method", "seed", "auc", "ndcg", "recall", "k", "seconds", "ndcg_strict", "recall_strict",
           "val_auc",
           "epochs", "propensity_epochs", "propensity_seconds", "propensity_cached", "max_epochs", "signature",
           "threads", "batch_size", "train_fraction", "device", "status") + RANKING_COLUMNS + ("world_size",)
#: Columns of a tuning log (``python -m reproduce tune``): one validation run per row, ``params`` as JSON.
TUNE_COLUMNS = ("dataset", "method", "seed", "auc", "ndcg", "recall", "k", "seconds", "max_epochs", "signature",
                "threads", "status", "trial", "params")
DATASET_LABELS = {"yahoo": "Yahoo! R3", "coat": "Coat", "kuairec": "KuaiRec"}

# ----------------------------------------------------------------------------------------- results.csv
_TEXT_COLUMNS = ("dataset", "method", "signature", "status", "params", "device", "stage", "select")
_INT_COLUMNS = ("seed", "k", "epochs", "propensity_epochs", "max_epochs", "threads", "trial", "batch_size", "epoch",
                "world_size")


def _read_lines(path: Path) -> tuple[Optional[list[str]], list[tuple[int, dict[str, str]]]]:
    """The header and the ``(line number, row)`` pairs of a CSV this tool wrote; ``(None, [])`` when
    absent.  A torn line (a writer killed mid-write on a file system without atomic renames, or a
    hand edit: a last line without its newline, or a line with another number of fields than the
    header) is left out with a warning, never glued onto the next row; the next write drops it."""
    if not path.exists():
        return None, []
    if path.is_dir():
        raise ValueError(f"{path} is a folder; it must be the CSV file this tool writes (move the folder away or "
                         "pass another --out / --log)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc}); it is not a file this tool wrote") from None
    if not text:
        return None, []
    lines = text.split("\n")
    header = next(csv.reader([lines[0]]))
    body = lines[1:]
    if body and body[-1] != "":  # no newline after the last line: it was cut
        warnings.warn(f"{path}: line {len(lines)} is torn (no end of line); it is ignored and will be dropped")
        body = body[:-1]
    rows = []
    for number, line in enumerate(body, start=2):
        if not line:
            continue
        fields = next(csv.reader([line]))
        if len(fields) != len(header):
            warnings.warn(f"{path}: line {number} has {len(fields)} fields, the header {len(header)}; it is torn or "
                          "edited by hand, so it is ignored and will be dropped")
            continue
        rows.append((number, dict(zip(header, fields))))
    return header, rows


#: The columns :func:`read_results` requires by default (results.csv of table3, tuning logs).
REQUIRED_COLUMNS = ("dataset", "method", "seed", "auc", "ndcg", "recall", "k", "seconds")


def read_results(path: str | os.PathLike, required: tuple[str, ...] = REQUIRED_COLUMNS) -> list[dict[str, Any]]:
    """Rows of ``results.csv`` or of a tuning log (numbers parsed), each run once (the first row of a
    run key); an absent file is an empty list.  A value that is not a number where one belongs
    is a ``ValueError`` naming the file, the line and the column; a file without a column of
    ``required`` is not a results file of this tool (``ValueError``)."""
    path = Path(path)
    header, lines = _read_lines(path)
    if header is None:
        return []
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{path} is not a results file of this tool (no column {', '.join(missing)}); "
                         "pass another --out folder (table3) or --log file (tune)")
    rows, seen = [], set()
    for number, row in lines:
        for key, value in row.items():
            if key in _TEXT_COLUMNS or value in (None, ""):
                continue
            if key == "propensity_cached":
                row[key] = value == "True"
                continue
            try:
                row[key] = int(value) if key in _INT_COLUMNS else float(value)
            except ValueError:
                kind = "an integer" if key in _INT_COLUMNS else "a number"
                raise ValueError(f"{path}, line {number}: column {key!r} holds {value!r}, not {kind}; correct or "
                                 "delete the line") from None
        key = run_key(row)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def run_key(row: dict[str, Any]) -> tuple:
    """What makes two runs the same: data set, method, seed and the signature of everything else."""
    return (row["dataset"], row["method"], int(row["seed"]), row.get("signature", ""))


def append_result(path: str | os.PathLike, row: dict[str, Any], columns: tuple[str, ...] = COLUMNS) -> bool:
    """Add ``row`` to ``results.csv`` (or a tuning log, ``columns=TUNE_COLUMNS``) unless a row of the
    same run is there already (another process that ran the same plan finished it first); return
    whether it was added.  Under :func:`reproduce.files.locked`, so that concurrent writers lose
    and duplicate nothing; the whole file is rewritten to a temporary file and renamed over the
    old one, so a killed job never leaves a torn row.  A file written by an older version (other
    columns) is migrated to ``columns`` on the way, and torn lines are dropped."""
    path = Path(path)
    with locked(path):
        _, lines = _read_lines(path)
        previous = [r for _, r in lines]
        if any(run_key(r) == run_key(row) for r in previous if r.get("seed", "").lstrip("-").isdigit()):
            return False
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: r.get(c) or "" for c in columns} for r in previous)
        writer.writerow({c: _fmt(row.get(c, "")) for c in columns})
        replace(path, buf.getvalue())
    return True


#: Columns of history.csv: the run's key, then :data:`reproduce.train.HISTORY_COLUMNS`.
HISTORY_FILE_COLUMNS = ("dataset", "method", "seed", "signature") + HISTORY_COLUMNS


def write_history(path: str | os.PathLike, row: dict[str, Any], history: list[dict[str, Any]],
                  columns: tuple[str, ...] = HISTORY_FILE_COLUMNS) -> None:
    """Put the per-epoch rows ``history`` of the run ``row`` (a results row: its run key) into
    ``history.csv``, replacing rows an earlier, interrupted attempt of the same run left; under
    :func:`reproduce.files.locked`, the whole file rewritten and renamed over the old one.
    ``columns``: the file's header, the run key's four columns first (default table3's)."""
    path = Path(path)
    key = run_key(row)
    with locked(path):
        _, lines = _read_lines(path)
        kept = [r for _, r in lines if (r["dataset"], r["method"], r["seed"], r["signature"]) != (
            key[0], key[1], str(key[2]), key[3])]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: r.get(c) or "" for c in columns} for r in kept)
        ident = {"dataset": row["dataset"], "method": row["method"], "seed": row["seed"], "signature": row["signature"]}
        writer.writerows({**ident, **{c: _fmt(h.get(c, "")) for c in columns if c not in ident}} for h in history)
        replace(path, buf.getvalue())


def read_history(path: str | os.PathLike) -> dict[tuple, list[dict[str, Any]]]:
    """The rows of ``history.csv`` by run key (:func:`run_key`), numbers parsed (an empty cell:
    None), in file order; an absent file is an empty dict."""
    _, lines = _read_lines(Path(path))
    out: dict[tuple, list[dict[str, Any]]] = {}
    for number, row in lines:
        parsed: dict[str, Any] = {}
        for key, value in row.items():
            if key in _TEXT_COLUMNS or value in (None, ""):
                parsed[key] = value if key in _TEXT_COLUMNS else None
                continue
            try:
                parsed[key] = int(value) if key in _INT_COLUMNS else float(value)
            except ValueError:
                raise ValueError(f"{path}, line {number}: column {key!r} holds {value!r}, not a number; correct or "
                                 "delete the line") from None
        out.setdefault(run_key(parsed), []).append(parsed)
    return out


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


# ----------------------------------------------------------------------------------------- table3.md
def mean_std(values: list[float]) -> str:
    """``mean ± std`` to 4 decimals, numpy's std (ddof = 0, as the published code reports)."""
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


_mean_std = mean_std


def render_table(rows: Iterable[dict[str, Any]], datasets: list[str], methods: Optional[list[str]] = None,
                 strict: bool = False, keys: Optional[set] = None) -> str:
    """Markdown of Table 3: per data set, every Table 3 row (ours beside the paper's), then the ablations.

    ``rows`` are results.csv rows; ``keys`` (run keys) restricts them to the runs of this job;
    ``methods`` (registry names) are the ones this job ran ("not run" for the others).
    """
    rows = [r for r in rows if keys is None or run_key(r) in keys]
    by = {}
    for r in rows:
        by.setdefault((r["dataset"], r["method"]), []).append(r)
    by_table3 = {m.table3_row: m for m in METHODS.values() if m.table3_row}
    ablations = [m for m in METHODS.values() if m.table3_row is None]
    ndcg_col, recall_col = ("ndcg_strict", "recall_strict") if strict else ("ndcg", "recall")
    out = ["# Table 3 of the BADR paper: our reproduction beside the published numbers", ""]
    for ds in datasets:
        ks = {int(r["k"]) for r in rows if r["dataset"] == ds}
        k = ks.pop() if len(ks) == 1 else {"kuairec": 50}.get(ds, 5)
        out += [f"## {DATASET_LABELS.get(ds, ds)}", "",
                f"| method | AUC (ours) | AUC (paper) | Δ | NDCG@{k} (ours) | NDCG@{k} (paper) | Δ | "
                f"Recall@{k} (ours) | Recall@{k} (paper) | Δ | seconds / run | seeds |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines = [(row, by_table3.get(row)) for row in TABLE3_ROWS] + [(None, m) for m in ablations]
        for row, method in lines:
            label = method.label if method else row
            paper = PUBLISHED[row][ds] if row and ds in DATASET_LABELS else None
            runs = by.get((ds, method.name), []) if method else []
            diverged = sum(1 for r in runs if r.get("status") == "diverged")
            runs = [r for r in runs if r.get("status", "ok") != "diverged"]
            chance = sum(1 for r in runs if r.get("status") == "chance")
            cells = []
            for i, col in enumerate(("auc", ndcg_col, recall_col)):
                ours = [float(r[col]) for r in runs]
                p = f"{paper[i][0]:.4f} ± {paper[i][1]:.4f}" if paper else "—"
                if ours:
                    diff = f"{np.mean(ours) - paper[i][0]:+.4f}" if paper else "—"
                    cells += [_mean_std(ours), p, diff]
                else:
                    status = "not implemented" if method is None else ("diverged" if diverged else "not run")
                    cells += [status, p, ""]
            secs = f"{np.mean([float(r['seconds']) for r in runs]):.1f}" if runs else ""
            seeds = (f"{len(runs) or ''}" + (f" ({chance} at chance level)" if chance else "")
                     + (f" (+{diverged} diverged)" if diverged else ""))
            out.append(f"| {label} | " + " | ".join(cells) + f" | {secs} | {seeds} |")
        out.append("")
    out += [
        "Ours: mean ± std over the seeds run (numpy std, ddof = 0, as the published code reports), each run "
        "trained with the matrix-factorisation backbone under the published protocol (see reproduce/train.py); "
        "Δ = our mean − the paper's mean. Paper: the BADR paper's Table 3 (mean ± std over 5 seeds). "
        "Rows below BADR are the ablations of the paper's Figure 1 and the extra entire-space rows ESMM and "
        "ESCM2-BADR (no published numbers in Table 3). The entire-space rows (Multi-IPS, Multi-DR, ESCM2-IPS, "
        "ESCM2-DR, DDPO, ESMM, ESCM2-BADR) train one MF per tower over the exposures, their CTR tower as the "
        "propensity (clipped, detached; see reproduce/entire_space.py). "
        "A run whose training loss became NaN is listed as diverged and left out of the mean; a run whose "
        "final validation AUC lies within 0.05 of 0.5 is kept in the mean and counted \"at chance level\".",
        "",
        ("NDCG / Recall: strict variant, users without a positive test item excluded."
         if strict else
         "NDCG / Recall as the published code counts them: a user without a positive test item counts "
         "NDCG = 1 and Recall = 0 (`--strict-ndcg` excludes such users instead)."),
        "",
    ]
    return "\n".join(out)


def write_table(path: str | os.PathLike, text: str) -> None:
    replace(path, text)
