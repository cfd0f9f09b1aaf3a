"""The paper experiments' tables, figures and claims, from the finished runs.

Each renderer writes ``OUT/<name>.md`` (our numbers beside the paper's where it prints them, and
each of the paper's claims evaluated as "holds" or "does not hold" with the numbers), the CSV of
the numbers behind it (``OUT/<name>.csv``) and, for a figure, ``OUT/<name>.png`` (matplotlib);
it returns the files and the Markdown section for ``REPORT.md``.  Means and stds are over the
seeds that finished without diverging (numpy's std, ddof = 0, as the published code reports);
runs "at chance level" (final validation AUC within 0.05 of 0.5, :data:`reproduce.train.CHANCE_MARGIN`)
are kept in the means and counted beside them.

Improvements are the paper's: ``Impv-MF = (BADR - MF) / MF`` and ``Impv = (BADR - best
baseline) / best baseline``, in %, per column; the best baseline is the best implemented one.
A star marks a BADR mean whose paired t-test against that baseline over the seeds (both ran
with the same seeds) gives p <= 0.05, as the paper's tables do.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from .files import replace, replace_with
from .methods import METHODS
from .published import (SAMPLING_RATES, TABLE3, TABLE4, TABLE5, TABLE45_ROWS, TABLE6,
                        TABLE6_METRICS, TABLE6_SETTINGS)
from .table import DATASET_LABELS, render_table
from .train import CHANCE_MARGIN

_METRIC_LABEL = {"auc": "AUC", "ndcg": "NDCG@{k}", "recall": "Recall@{k}"}


# --------------------------------------------------------------------------------------- helpers
def _ok(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status", "ok") != "diverged" and r.get("auc") == r.get("auc")]


def _values(rows: Sequence[dict[str, Any]], col: str) -> list[float]:
    return [float(r[col]) for r in rows if r.get(col) not in (None, "") and float(r[col]) == float(r[col])]


def _seeds(runs: Sequence[dict[str, Any]]) -> str:
    """The seeds column: how many runs, and how many of them ended at chance level."""
    chance = sum(1 for r in runs if r.get("status") == "chance")
    return f"{len(runs)}" + (f" ({chance} at chance level)" if chance else "")


def _cell(values: Sequence[float], star: bool = False) -> str:
    if not values:
        return "not run"
    return f"{np.mean(values):.4f}{'*' if star else ''} ± {np.std(values):.4f}"


def _paired_p(a: dict[int, float], b: dict[int, float]) -> Optional[float]:
    """Two-sided paired t-test p-value of ``a`` vs ``b`` over their common seeds (None below 2)."""
    from scipy.stats import ttest_rel

    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diff = np.array([a[s] - b[s] for s in seeds])
    if np.all(diff == diff[0]):
        return 0.0 if diff[0] != 0 else 1.0
    return float(ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)


def _by_method(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in _ok(rows):
        out.setdefault(r["method"], []).append(r)
    return out


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> Path:
    """Write ``rows`` under the header ``columns`` to ``path`` atomically (floats to 6 digits)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    replace(path, buf.getvalue())
    return path


def save_png(fig: Any, path: Path) -> Path:
    """Save the matplotlib figure ``fig`` to ``path`` atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    replace_with(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _verdict(ok: bool) -> str:
    return "**holds**" if ok else "**does not hold**"


def _label(ds: str) -> str:
    return DATASET_LABELS.get(ds, ds)


def _exceptions(misses: Sequence[str], shown: int = 12) -> str:
    """A claim's exceptions, the first ``shown`` of them written out (the CSV beside the table
    holds every value)."""
    more = f"; and {len(misses) - shown} more" if len(misses) > shown else ""
    return f"{len(misses)} exceptions: " + "; ".join(misses[:shown]) + more


def _pct(a: float, b: float) -> float:
    return 100.0 * (a - b) / b


# ---------------------------------------------------------------------------------------- Table 3
def render_table3(finished, keys: dict[str, set], opts) -> tuple[list[Path], str]:
    everything = set().union(*keys.values()) if keys else set()
    text = render_table(finished.select(everything), list(keys), strict=opts.strict_ndcg, keys=everything)
    path = Path(opts.out) / "table3.md"
    replace(path, text)
    return [path], text


# ------------------------------------------------------------------------------------ Tables 4 / 5
def render_sparsity(finished, keys: dict[float, set], opts, table: str) -> tuple[list[Path], str]:
    paper = TABLE4 if table == "table4" else TABLE5
    rows_all = [r for ks in keys.values() for r in finished.select(ks)]
    ds = rows_all[0]["dataset"] if rows_all else ("yahoo" if table == "table4" else "kuairec")
    k = int(rows_all[0]["k"]) if rows_all else (5 if ds == "yahoo" else 50)
    by_row = {m.table3_row: m for m in METHODS.values() if m.table3_row}
    metrics = ("auc", "ndcg", "recall")
    heads = [_METRIC_LABEL[m].format(k=k) for m in metrics]
    out = [f"# {table.capitalize()[:-1]} {table[-1]} of the BADR paper: sparsity study on {_label(ds)}", "",
           "The clicked training pairs subsampled at each rate (seeded by the run's seed; validation and test "
           "unchanged), every method with the values of `CONFIG_DIR/DATASET@RATE.json` where there is one "
           "(`tune --train-fraction RATE`), else its full-data values. Ours: mean ± std over the seeds "
           "(runs at chance level, final validation AUC within 0.05 of 0.5, kept and counted); paper: its mean "
           "(its std where printed).", ""]
    csv_rows, summary = [], {}
    for rate in (1.0, *SAMPLING_RATES):
        groups = _by_method(finished.select(keys.get(rate, set())))
        col = SAMPLING_RATES.index(rate) * 3 if rate in SAMPLING_RATES else None
        out += [f"## {rate:.0%} of the training pairs" + (" (full data, for reference)" if rate == 1 else ""), "",
                "| method | " + " | ".join(f"{h} (ours) | {h} (paper)" for h in heads) + " | seeds |",
                "|---|" + "---|---|" * len(metrics) + "---|"]
        means: dict[str, dict[str, float]] = {}
        per_seed: dict[str, dict[str, dict[int, float]]] = {}
        for row_name in TABLE45_ROWS:
            method = by_row.get(TABLE45_ROWS[row_name])
            runs = groups.get(method.name, []) if method else []
            cells = []
            for i, m in enumerate(metrics):
                vals = _values(runs, m)
                pub = paper[row_name] if col is not None else None
                p = "—" if pub is None else (f"{pub[0][col + i]:.4f}" + (f" ± {pub[1][col + i]:.4f}" if pub[1] else ""))
                cells += ["not implemented" if method is None else _cell(vals), p]
                if vals:
                    means.setdefault(row_name, {})[m] = float(np.mean(vals))
                    per_seed.setdefault(row_name, {})[m] = {int(r["seed"]): float(r[m]) for r in runs}
                    csv_rows.append({"dataset": ds, "rate": rate, "method": method.name, "metric": m,
                                     "mean": float(np.mean(vals)), "std": float(np.std(vals)), "seeds": len(vals),
                                     "paper_mean": "" if pub is None else pub[0][col + i],
                                     "paper_std": "" if pub is None or not pub[1] else pub[1][col + i]})
            out.append(f"| {row_name} | " + " | ".join(cells) + f" | {_seeds(runs) if method else ''} |")
        # Impv-MF and Impv, ours and the paper's
        impv = {"Impv-MF (%)": [], "Impv (%)": []}
        stars = []
        for i, m in enumerate(metrics):
            badr = means.get("BADR", {}).get(m)
            mf = means.get("MF", {}).get(m)
            base = {r: v[m] for r, v in means.items() if r not in ("BADR",) and m in v}
            best = max(base, key=base.get) if base else None
            ours_mf = _pct(badr, mf) if badr is not None and mf else None
            ours_best = _pct(badr, base[best]) if badr is not None and best else None
            if col is not None:
                pb = paper["BADR"][0][col + i]
                p_mf = _pct(pb, paper["MF"][0][col + i])
                p_best = _pct(pb, max(paper[r][0][col + i] for r in paper if r != "BADR"))
            else:
                p_mf = p_best = None
            impv["Impv-MF (%)"].append((ours_mf, p_mf))
            impv["Impv (%)"].append((ours_best, p_best))
            p_value = _paired_p(per_seed.get("BADR", {}).get(m, {}), per_seed.get(best, {}).get(m, {})) if best else None
            stars.append((best, p_value))
            summary[(rate, m)] = {"badr": badr, "mf": mf, "best": best, "best_value": base.get(best),
                                  "impv_mf": ours_mf, "impv": ours_best, "p": p_value, "baselines": base}
        for name, vals in impv.items():
            out.append(f"| {name} | " + " | ".join(
                ("—" if o is None else f"{o:.2f}") + " | " + ("—" if p is None else f"{p:.2f}") for o, p in vals)
                + " | |")
        out.append("")
        tests = [f"{_METRIC_LABEL[m].format(k=k)}: BADR vs {b} p = {p:.3g}{' *' if p is not None and p <= 0.05 else ''}"
                 for m, (b, p) in zip(metrics, stars) if b is not None and p is not None]
        if tests:
            out += ["Paired t-test over the seeds (* p <= 0.05): " + "; ".join(tests) + ".", ""]
    out += _sparsity_claims(summary, paper, k)
    out += _badr_training(finished, keys)
    path = Path(opts.out) / f"{table}.md"
    text = "\n".join(out)
    replace(path, text)
    files = [path, write_csv(Path(opts.out) / f"{table}.csv", ("dataset", "rate", "method", "metric", "mean", "std",
                                                                "seeds", "paper_mean", "paper_std"), csv_rows)]
    return files, text


def _sparsity_claims(summary: dict, paper, k: int) -> list[str]:
    out = ["## The paper's claims", ""]
    misses, checked = [], 0
    for rate in SAMPLING_RATES:
        for m in ("auc", "ndcg", "recall"):
            s = summary.get((rate, m))
            if not s or s["badr"] is None or not s["baselines"]:
                continue
            checked += 1
            for name, v in s["baselines"].items():
                if v >= s["badr"]:
                    misses.append(f"{rate:.0%} {_METRIC_LABEL[m].format(k=k)}: {name} {v:.4f} >= BADR {s['badr']:.4f}")
    if checked:
        out.append(f"1. *BADR above MF and every implemented baseline at every sampling rate, on every metric*: "
                   f"{_verdict(not misses)} ({checked} rate-metric cells checked"
                   + (f"; {_exceptions(misses)})" if misses else ")") + ".")
    else:
        out.append("1. *BADR above MF and every baseline at every rate*: not evaluated (no finished runs).")
    gains = [(rate, summary.get((rate, "auc"), {})) for rate in SAMPLING_RATES]
    gains = [(r, s) for r, s in gains if s and s.get("impv_mf") is not None and s.get("impv") is not None]
    if len(gains) >= 2:
        dense, sparse = gains[0], gains[-1]
        ok = sparse[1]["impv_mf"] > dense[1]["impv_mf"] and sparse[1]["impv"] > dense[1]["impv"]
        col_d, col_s = SAMPLING_RATES.index(dense[0]) * 3, SAMPLING_RATES.index(sparse[0]) * 3
        paper_best = lambda c: max(paper[r][0][c] for r in paper if r != "BADR")  # noqa: E731
        p_d = (_pct(paper["BADR"][0][col_d], paper["MF"][0][col_d]), _pct(paper["BADR"][0][col_d], paper_best(col_d)))
        p_s = (_pct(paper["BADR"][0][col_s], paper["MF"][0][col_s]), _pct(paper["BADR"][0][col_s], paper_best(col_s)))
        out.append(f"2. *BADR's gain larger on the sparser data* (AUC, {sparse[0]:.0%} vs {dense[0]:.0%} of the "
                   f"pairs): {_verdict(ok)}: Impv-MF {sparse[1]['impv_mf']:.2f} % vs {dense[1]['impv_mf']:.2f} %, "
                   f"Impv over the best implemented baseline {sparse[1]['impv']:.2f} % vs {dense[1]['impv']:.2f} %. "
                   f"The paper's own numbers: Impv-MF {p_s[0]:.2f} % vs {p_d[0]:.2f} %, Impv {p_s[1]:.2f} % vs "
                   f"{p_d[1]:.2f} % (over its best baseline, DCE-TDR included).")
    out.append("")
    return out


#: The validation AUC at which a run counts as having left chance level.
_LEFT_CHANCE = 0.5 + CHANCE_MARGIN


def _badr_training(finished, keys: dict[float, set]) -> list[str]:
    """BADR's fit at each rate, from the validation columns of history.csv: epochs trained, the
    epoch its validation AUC first reached :data:`_LEFT_CHANCE` and the epochs it trained after
    that, and its validation AUC at the stop (with its change over the last epoch).  Fewer pairs
    mean fewer optimizer steps per epoch, so under the epoch cap and the training-loss stopping
    rule a sparser rate can stop BADR before it has converged; this table shows where."""
    stats: dict[float, dict[str, list]] = {}
    for rate in (1.0, *SAMPLING_RATES):
        for key in keys.get(rate, set()):
            if key[1] != "badr" or key not in finished.rows:
                continue
            fit = finished.epochs(key)
            if len(fit) < 2:
                continue
            auc = [float(h["val_auc"]) for h in fit]
            left = next((int(h["epoch"]) for h, a in zip(fit, auc) if a >= _LEFT_CHANCE), None)
            s = stats.setdefault(rate, {"epochs": [], "max": [], "left": [], "after": [], "final": [], "last": [],
                                        "rising": []})
            s["epochs"].append(int(fit[-1]["epoch"]))
            s["max"].append(int(finished.rows[key].get("max_epochs") or 0))
            s["left"].append(left)
            s["after"].append(None if left is None else int(fit[-1]["epoch"]) - left)
            s["final"].append(auc[-1])
            s["last"].append(auc[-1] - auc[-2])
            s["rising"].append(auc[-1] >= max(auc) and auc[-1] - auc[-2] > 0)
    if not stats:
        return []
    mean = lambda v: float(np.mean([x for x in v if x is not None]))  # noqa: E731
    out = ["## BADR's training at each rate", "",
           "From history.csv (validation split only): the epochs BADR trained (its fit stops on the config's "
           "early-stopping rule on its training loss, in the published protocol 7 epochs without a relative "
           "decrease of 1e-4, or at the epoch cap), the first epoch at "
           f"which its validation AUC reached {_LEFT_CHANCE:.2f} (it starts at chance) and the epochs it trained "
           "after that, its validation AUC at the stop and its change over the last epoch, and the runs whose "
           "validation AUC was at its highest and still rising when they stopped. Means over the seeds.", "",
           f"| rate | epochs trained (cap) | epoch of validation AUC >= {_LEFT_CHANCE:.2f} | epochs after it "
           "| validation AUC at the stop | change in the last epoch | runs still rising at the stop |",
           "|---|---|---|---|---|---|---|"]
    for rate, s in stats.items():
        n_left = sum(x is not None for x in s["left"])
        left = f"{mean(s['left']):.1f}" if n_left == len(s["left"]) else (
            f"{mean(s['left']):.1f} ({len(s['left']) - n_left} never)" if n_left else "never")
        after = f"{mean(s['after']):.1f}" if n_left else "—"
        out.append(f"| {rate:.0%} | {mean(s['epochs']):.1f} ({max(s['max'])}) | {left} | {after} | "
                   f"{mean(s['final']):.4f} | {mean(s['last']):+.4f} | {sum(s['rising'])} of {len(s['rising'])} |")
    full = stats.get(1.0)
    if full and all(x is not None for x in full["after"]):
        short = [r for r, s in stats.items() if r != 1.0 and (
            any(x is None for x in s["after"]) or mean(s["after"]) < 0.5 * mean(full["after"]))]
        out += ["", "Rates where BADR trained less than half as many epochs after leaving chance as on the full "
                f"data ({mean(full['after']):.1f}), or never left it: "
                + (", ".join(f"{r:.0%}" for r in short) + ". There its result is that of a fit stopped early, "
                   "by the epoch cap or the stopping rule, not of a converged one." if short else "none.")]
    return out + [""]


# ----------------------------------------------------------------------------------------- Table 6
#: Table 6's rows as the paper prints them, by our method names.
_TABLE6_PAPER_ROWS = (("MF", "mf"), ("DCE-TDR", "dce_tdr"), ("BADR", "badr"))
#: Coat's mean propensity, the highest of the real data sets (Section 4.8): the simulated settings
#: above it are the "high-propensity" data that the paper's claims are about.
_HIGH_PROPENSITY = 0.08


def render_table6(finished, keys: dict[str, set], opts) -> tuple[list[Path], str]:
    from .experiments import TABLE6_METHODS

    metrics = TABLE6_METRICS
    heads = ["AUC", "NDCG@5", "Recall@5", "Precision@5", "NDCG@50", "Recall@50", "Precision@50"]
    out = ["# Table 6 of the BADR paper: simulated ML-100K (Section 4.8)", "",
           "`python -m simulate` (MRDR's protocol on ML-100K) at each setting below, seed 0; every method with the "
           "untuned `configs/default.json` values unless the config folder holds NAME.json. The paper's rows are MF, "
           "DCE-TDR and BADR; DR-JL is added as the plain DR baseline. Ours: mean ± std over the seeds.", "",
           "## The paper's Table 6", "", "| method | density | " + " | ".join(heads) + " |",
           "|---|---|" + "---|" * len(heads)]
    for j, setting in enumerate(TABLE6_SETTINGS):
        for row, _ in _TABLE6_PAPER_ROWS:
            mean, std = TABLE6[row]
            cells = [f"{m:.4f} ± {d:.4f}" for m, d in zip(mean[j * 7:(j + 1) * 7], std[j * 7:(j + 1) * 7])]
            out.append(f"| {row} | {setting} | " + " | ".join(cells) + " |")
    out.append("")
    csv_rows, means, propensity = [], {}, {}
    for ds, ks in keys.items():
        groups = _by_method(finished.select(ks))
        folder = next((s.path for s in opts.datasets or () if s.name == ds and s.path), Path(opts.out) / "data" / ds)
        summary = _sim_summary(folder)
        about = ""
        if summary:
            propensity[ds] = summary["propensity_mean"]
            about = (f" (mean propensity {summary['propensity_mean']:.3f}, min {summary['propensity_min']:.4f}, "
                     f"{summary.get('n_train', '?')} clicked training pairs)")
        out += [f"## Ours: {ds}{about}", "", "| method | " + " | ".join(heads) + " | seeds |",
                "|---|" + "---|" * len(heads) + "---|"]
        for name in TABLE6_METHODS:
            runs = groups.get(name, [])
            cells = []
            for m in metrics:
                vals = _values(runs, m)
                cells.append(_cell(vals))
                if vals:
                    means.setdefault(ds, {}).setdefault(name, {})[m] = float(np.mean(vals))
                    csv_rows.append({"dataset": ds, "method": name, "metric": m, "mean": float(np.mean(vals)),
                                     "std": float(np.std(vals)), "seeds": len(vals)})
            out.append(f"| {METHODS[name].label} | " + " | ".join(cells) + f" | {_seeds(runs)} |")
        out.append("")
    rows = [(row, name) for row, name in _TABLE6_PAPER_ROWS if name in TABLE6_METHODS]
    out += ["## Which setting reproduces the paper's numbers", "",
            "Mean absolute difference over the seven metrics between our "
            + " / ".join(row for row, _ in rows) + " and each of the paper's columns (and the AUC difference):", "",
            "| our setting | vs paper " + " | vs paper ".join(TABLE6_SETTINGS) + " |", "|---|" + "---|" * len(TABLE6_SETTINGS)]
    closest: dict[str, tuple[float, str]] = {}
    for ds, by in means.items():
        cells = []
        for j, setting in enumerate(TABLE6_SETTINGS):
            parts = []
            for row, name in rows:
                ours = by.get(name, {})
                if len(ours) < len(metrics):
                    continue
                pub = TABLE6[row][0][j * 7:(j + 1) * 7]
                gap = float(np.mean([abs(ours[m] - p) for m, p in zip(metrics, pub)]))
                parts.append(f"{row} {gap:.4f} (AUC {ours['auc'] - pub[0]:+.4f})")
                closest[f"{setting}/{row}"] = min(closest.get(f"{setting}/{row}", (np.inf, "")), (gap, ds))
            cells.append(", ".join(parts) or "—")
        out.append(f"| {ds} | " + " | ".join(cells) + " |")
    if closest:
        out += ["", "Closest setting to each paper column: " + "; ".join(
            f"{k}: {ds} (mean |Δ| {g:.4f})" for k, (g, ds) in sorted(closest.items())) + "."]
    out += ["", "## The paper's claims", ""] + _table6_claims(finished, means, propensity)
    path = Path(opts.out) / "table6.md"
    text = "\n".join(out)
    replace(path, text)
    files = [path, write_csv(Path(opts.out) / "table6.csv", ("dataset", "method", "metric", "mean", "std", "seeds"),
                              csv_rows)]
    return files, text


def _sim_summary(folder: Path) -> Optional[dict[str, Any]]:
    path = folder / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _table6_claims(finished, means: dict, propensity: dict[str, float]) -> list[str]:
    """The paper's three claims of Section 4.8, on our simulated settings (``means``: per setting,
    method and metric, the mean over seeds; ``propensity``: each setting's mean propensity)."""
    out = []
    misses, checked = [], 0
    others = [name for name in dict.fromkeys(n for by in means.values() for n in by) if name != "badr"]
    for ds, by in means.items():
        for m in TABLE6_METRICS:
            if m not in by.get("badr", {}):
                continue
            for other in by:
                if other != "badr" and m in by[other]:
                    checked += 1
                    if by[other][m] >= by["badr"][m]:
                        misses.append(f"{ds} {m}: {METHODS[other].label} {by[other][m]:.4f} >= BADR "
                                      f"{by['badr'][m]:.4f}")
    out.append(f"1. *BADR above {', '.join(METHODS[o].label for o in others) or 'the baselines'} on the simulated "
               "data (every metric)*: " + (f"{_verdict(not misses)} ({checked} comparisons" + (
                   f"; {_exceptions(misses)})" if misses else ")") if checked else "not evaluated") + ".")
    # The paper's claims 2 and 3 are about high-propensity data: the settings above Coat's mean.
    high = [ds for ds in means if propensity.get(ds, 1.0) > _HIGH_PROPENSITY]
    left = [ds for ds in means if ds not in high]
    scope = (f" (the settings with a mean propensity above Coat's {_HIGH_PROPENSITY}; not judged: "
             f"{', '.join(left)})") if left else ""
    for n, base, claim in ((2, "mf", "BADR over MF"),
                           (3, "dce_tdr", "BADR over DCE-TDR (the paper's strongest baseline)")):
        real = _real_gains(finished, base)
        sim = {ds: _pct(means[ds]["badr"]["auc"], means[ds][base]["auc"]) for ds in high
               if "auc" in means[ds].get("badr", {}) and "auc" in means[ds].get(base, {})}
        if real and sim:
            ok = max(sim.values()) < min(real.values())
            out.append(f"{n}. *A smaller relative AUC gain of {claim} on the simulated data than on the real data*"
                       f"{scope}: {_verdict(ok)}: simulated " + ", ".join(f"{d} {v:.2f} %" for d, v in sim.items())
                       + "; real " + ", ".join(f"{_label(d)} {v:.2f} %" for d, v in real.items()) + ".")
        else:
            out.append(f"{n}. *A smaller relative AUC gain of {claim} on the simulated data than on the real data*: "
                       f"not evaluated (needs {METHODS[base].label} and BADR on a high-propensity setting, and "
                       "Table 3's runs of both in the same --out: run `table3` or `all`).")
    return out + [""]


def _real_gains(finished, base: str) -> dict[str, float]:
    """BADR's AUC gain over ``base`` (%) per real data set, from full-data runs at the config's batch size."""
    from .config import load_config

    gains = {}
    for ds in ("yahoo", "coat", "kuairec"):
        try:
            cfg = load_config(ds)
        except ValueError:
            continue
        vals = {}
        for name in (base, "badr"):
            runs = [r for r in _ok(finished.rows.values()) if r["dataset"] == ds and r["method"] == name
                    and float(r.get("train_fraction") or 1) == 1 and int(r.get("batch_size") or cfg.batch_size)
                    == cfg.batch_size and int(r.get("max_epochs") or cfg.max_epochs) == cfg.max_epochs]
            if runs:
                vals[name] = float(np.mean(_values(runs, "auc")))
        if len(vals) == 2:
            gains[ds] = _pct(vals["badr"], vals[base])
    return gains


# ---------------------------------------------------------------------------------------- Figure 1
def render_fig1(finished, keys: dict[str, set], opts) -> tuple[list[Path], str]:
    from .experiments import FIG1_METHODS

    plt = pyplot()
    datasets = list(keys)
    stats: dict[str, dict[str, list[float]]] = {}
    csv_rows = []
    for ds in datasets:
        groups = _by_method(finished.select(keys[ds]))
        for name in FIG1_METHODS:
            vals = _values(groups.get(name, []), "auc")
            stats.setdefault(ds, {})[name] = vals
            if vals:
                csv_rows.append({"dataset": ds, "method": name, "auc_mean": float(np.mean(vals)),
                                 "auc_std": float(np.std(vals)), "seeds": len(vals)})
    fig, ax = plt.subplots(figsize=(3.2 * max(1, len(datasets)) + 1.5, 4.2))
    width = 0.8 / len(FIG1_METHODS)
    colors = plt.get_cmap("tab10").colors
    for j, name in enumerate(FIG1_METHODS):
        xs = np.arange(len(datasets)) + (j - (len(FIG1_METHODS) - 1) / 2) * width
        means = [np.mean(stats[d][name]) if stats[d][name] else np.nan for d in datasets]
        stds = [np.std(stats[d][name]) if stats[d][name] else 0 for d in datasets]
        ax.bar(xs, means, width, yerr=stds, capsize=2, color=colors[j], label=METHODS[name].label)
        paper_row = {"dr_jl": "DRJL", "badr": "BADR"}.get(name)
        if paper_row:
            py = [TABLE3[paper_row][d][0][0] if d in TABLE3[paper_row] else np.nan for d in datasets]
            ax.scatter(xs, py, marker="_", s=260, color="black", zorder=3,
                       label="paper (Table 3)" if name == "badr" else None)
    lows = [v for d in datasets for vals in stats[d].values() for v in vals]
    if lows:
        ax.set_ylim(min(lows) - 0.03, max(lows) + 0.02)
    ax.set_xticks(np.arange(len(datasets)), [_label(d) for d in datasets])
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title("Figure 1: ablations of BADR's estimator and imputation loss")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    files = [save_png(fig, Path(opts.out) / "fig1.png"),
             write_csv(Path(opts.out) / "fig1.csv", ("dataset", "method", "auc_mean", "auc_std", "seeds"), csv_rows)]
    lines = ["# Figure 1 of the BADR paper: ablations", "", "![Figure 1](fig1.png)", "",
             "| data set | " + " | ".join(METHODS[m].label for m in FIG1_METHODS) + " |",
             "|---|" + "---|" * len(FIG1_METHODS)]
    for ds in datasets:
        lines.append(f"| {_label(ds)} | " + " | ".join(_cell(stats[ds][m]) for m in FIG1_METHODS) + " |")
    lines += ["", "## The paper's claims", ""]
    order_ok, order_txt, var_ok, var_txt = [], [], [], []
    for ds in datasets:
        m = {k: float(np.mean(v)) for k, v in stats[ds].items() if v}
        if {"badr", "badr_dr", "dr_jl"} <= set(m):
            order_ok.append(m["badr"] > m["badr_dr"] > m["dr_jl"])
            order_txt.append(f"{_label(ds)} {m['badr']:.4f} / {m['badr_dr']:.4f} / {m['dr_jl']:.4f}")
        if {"badr", "badr_v", "badr_b", "badr_m"} <= set(m):
            var_ok.append(m["badr"] > max(m["badr_v"], m["badr_b"], m["badr_m"]))
            var_txt.append(f"{_label(ds)} {m['badr']:.4f} vs {m['badr_v']:.4f} / {m['badr_b']:.4f} / {m['badr_m']:.4f}")
    lines.append("1. *BADR > BADR w/o its imputation loss > DR-JL* (AUC): "
                 + (f"{_verdict(all(order_ok))}: " + "; ".join(order_txt) if order_ok else "not evaluated") + ".")
    lines.append("2. *BADR above BADR-V, BADR-B and BADR-M* (AUC, BADR vs V / B / M): "
                 + (f"{_verdict(all(var_ok))}: " + "; ".join(var_txt) if var_ok else "not evaluated") + ".")
    text = "\n".join(lines + [""])
    replace(Path(opts.out) / "fig1.md", text)
    return files + [Path(opts.out) / "fig1.md"], text


# ---------------------------------------------------------------------------------------- Figure 2
def _curve(finished, keys: set, column: str, stage: str = "fit") -> tuple[list[int], list[float], int]:
    """Mean of ``column`` per epoch over the runs of ``keys`` (each epoch: the runs that reached it)."""
    per_epoch: dict[int, list[float]] = {}
    n = 0
    for key in keys:
        rows = finished.epochs(key, column, stage)
        n += bool(rows)
        for h in rows:
            per_epoch.setdefault(int(h["epoch"]), []).append(float(h[column]))
    epochs = sorted(per_epoch)
    return epochs, [float(np.mean(per_epoch[e])) for e in epochs], n


def _final_val_auc(finished, keys: set) -> Optional[float]:
    vals = []
    for key in keys:
        rows = finished.epochs(key)
        if rows:
            vals.append(float(rows[-1]["val_auc"]))
    return float(np.mean(vals)) if vals else None


def _split_by_method(finished, keys: set) -> dict[str, set]:
    out: dict[str, set] = {}
    for key in keys:
        out.setdefault(key[1], set()).add(key)
    return out


def render_fig2(finished, keys: dict[str, dict[float, set]], opts) -> tuple[list[Path], str]:
    plt = pyplot()
    datasets = list(keys)
    rates = sorted({r for d in datasets for r in keys[d]}, reverse=True)
    fig, axes = plt.subplots(len(datasets), len(rates), figsize=(3.1 * len(rates), 3.2 * len(datasets) + 0.4),
                             squeeze=False)
    csv_rows, lines, verdicts = [], [], []
    for i, ds in enumerate(datasets):
        full = _split_by_method(finished, keys[ds].get(1.0, set()))
        # The strongest baseline: the best mean final validation AUC at full data (no test label read).
        scores = {m: _final_val_auc(finished, ks) for m, ks in full.items() if m != "badr"}
        scores = {m: s for m, s in scores.items() if s is not None}
        baseline = max(scores, key=scores.get) if scores else None
        lines.append(f"- {_label(ds)}: strongest baseline by validation AUC at full data: "
                     + (f"{METHODS[baseline].label} ({scores[baseline]:.4f}; "
                        + ", ".join(f"{METHODS[m].label} {s:.4f}" for m, s in sorted(scores.items())) + ")"
                        if baseline else "none finished"))
        for j, rate in enumerate(rates):
            ax = axes[i][j]
            by = _split_by_method(finished, keys[ds].get(rate, set()))
            finals = {}
            for name, style in (("badr", "-"), (baseline, "--")):
                if name is None or name not in by:
                    continue
                epochs, curve, n = _curve(finished, by[name], "test_loss")
                if not epochs:
                    continue
                ax.plot(epochs, curve, style, label=f"{METHODS[name].label} ({n} seed{'s' if n > 1 else ''})")
                finals[name] = curve[-1]
                csv_rows += [{"dataset": ds, "rate": rate, "method": name, "epoch": e, "test_loss": v, "seeds": n}
                             for e, v in zip(epochs, curve)]
            ax.set_title(f"{_label(ds)}, {rate:.0%} of the training pairs", fontsize=9)
            ax.set_xlabel("epoch")
            ax.xaxis.get_major_locator().set_params(integer=True)
            if j == 0:
                ax.set_ylabel("test cross-entropy (nats)")
            if ax.lines:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
            if "badr" in finals and baseline in finals:
                verdicts.append((ds, rate, finals["badr"] < finals[baseline], finals["badr"], finals[baseline]))
    fig.suptitle("Figure 2: loss on the unbiased data per epoch (mean over seeds)")
    files = [save_png(fig, Path(opts.out) / "fig2.png"),
             write_csv(Path(opts.out) / "fig2.csv", ("dataset", "rate", "method", "epoch", "test_loss", "seeds"),
                        csv_rows)]
    text = "\n".join(["# Figure 2 of the BADR paper: loss on the unbiased data", "", "![Figure 2](fig2.png)", "",
                      "The cross-entropy of the prediction model on the test pairs (the unbiased data), recorded per "
                      "epoch for this figure only: it drives no stopping and no selection.", ""] + lines + [
        "", "## The paper's claims", "",
        "1. *BADR's loss on the unbiased data at convergence below the strongest baseline's*: "
        + (f"{_verdict(all(v[2] for v in verdicts))}: " + "; ".join(
            f"{_label(d)} {r:.0%} {b:.4f} vs {o:.4f}" for d, r, _, b, o in verdicts) if verdicts else "not evaluated")
        + ".", ""])
    replace(Path(opts.out) / "fig2.md", text)
    return files + [Path(opts.out) / "fig2.md"], text


# ---------------------------------------------------------------------------------------- Figure 3
def render_fig3(finished, keys: dict[str, dict[int, set]], opts) -> tuple[list[Path], str]:
    plt = pyplot()
    datasets = list(keys)
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), squeeze=False)
    csv_rows, verdicts, table = [], [], []
    for j, ds in enumerate(datasets):
        ax = axes[0][j]
        sizes = sorted(keys[ds])
        full = max(sizes)
        means, stds = [], []
        for b in sizes:
            vals = _values(_ok(finished.select(keys[ds][b])), "auc")
            means.append(float(np.mean(vals)) if vals else np.nan)
            stds.append(float(np.std(vals)) if vals else 0.0)
            if vals:
                csv_rows.append({"dataset": ds, "batch_size": b, "full": b == full, "auc_mean": means[-1],
                                 "auc_std": stds[-1], "seeds": len(vals)})
        xs = np.arange(len(sizes))
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label="BADR, ours")
        default = _default_batch_size(ds)
        if ds in TABLE3["BADR"] and default in sizes:
            ax.errorbar([sizes.index(default)], [TABLE3["BADR"][ds][0][0]], yerr=[TABLE3["BADR"][ds][0][1]],
                        marker="*", ms=11, color="black", ls="none", label=f"BADR, paper Table 3 (batch {default:,})")
        ax.set_xticks(xs, [f"full\n{b:,}" if b == full else f"{b:,}" for b in sizes], fontsize=7, rotation=45)
        ax.set_xlabel("batch size (clicked pairs per step)")
        ax.set_ylabel("test AUC (mean ± std over seeds)")
        ax.set_title(_label(ds))
        ax.legend(fontsize=7, loc="best")
        table.append(f"| {_label(ds)} | " + " | ".join(
            f"{b:,}{' (full)' if b == full else ''}: {m:.4f}" for b, m in zip(sizes, means) if m == m) + " |")
        done = [(b, m) for b, m in zip(sizes, means) if m == m]
        if len(done) == len(sizes) and len(done) >= 3:
            best = max(done, key=lambda t: t[1])
            worst = min(done, key=lambda t: t[1])
            medium = (32, 128) if ds == "coat" else (512, 8192)
            verdicts.append((ds, worst[0] == full, medium[0] <= best[0] <= medium[1] and best[0] != full, best, worst,
                             medium))
    fig.suptitle("Figure 3: BADR's AUC against the batch size")
    files = [save_png(fig, Path(opts.out) / "fig3.png"),
             write_csv(Path(opts.out) / "fig3.csv", ("dataset", "batch_size", "full", "auc_mean", "auc_std", "seeds"),
                        csv_rows)]
    lines = ["# Figure 3 of the BADR paper: batch size", "", "![Figure 3](fig3.png)", "",
             "| data set | AUC by batch size |", "|---|---|"] + table + ["", "## The paper's claims", ""]
    if verdicts:
        lines.append("1. *Worst AUC at the full batch*: " + _verdict(all(v[1] for v in verdicts)) + ": " + "; ".join(
            f"{_label(d)} worst at {w[0]:,} ({w[1]:.4f})" for d, _, _, _, w, _ in verdicts) + ".")
        lines.append("2. *Best AUC at medium batch sizes* (512-8,192 on Yahoo! R3 and KuaiRec; 32-128 on Coat, "
                     "as the paper says for it): " + _verdict(all(v[2] for v in verdicts)) + ": " + "; ".join(
                         f"{_label(d)} best at {b[0]:,} ({b[1]:.4f})" for d, _, _, b, _, _ in verdicts) + ".")
    else:
        lines.append("Not evaluated: not every batch size has finished runs.")
    text = "\n".join(lines + [""])
    replace(Path(opts.out) / "fig3.md", text)
    return files + [Path(opts.out) / "fig3.md"], text


def _default_batch_size(ds: str) -> Optional[int]:
    from .config import load_config

    try:
        return load_config(ds).batch_size
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------- Figure 4
def render_fig4(finished, keys: dict[str, set], opts) -> tuple[list[Path], str]:
    plt = pyplot()
    datasets = list(keys)
    panels = (("propensity", "propensity_loss", "propensity model"),
              ("fit", "prediction_loss", "prediction model"),
              ("fit", "imputation_loss", "imputation model"))
    fig, axes = plt.subplots(len(datasets), 3, figsize=(12, 2.9 * len(datasets)), squeeze=False)
    csv_rows, lines = [], []
    for i, ds in enumerate(datasets):
        for j, (stage, column, title) in enumerate(panels):
            ax = axes[i][j]
            for key in sorted(keys[ds], key=lambda k: k[2]):
                rows = finished.epochs(key, column, stage)
                if not rows:
                    continue
                ax.plot([h["epoch"] for h in rows], [h[column] for h in rows], lw=1, label=f"seed {key[2]}")
                csv_rows += [{"dataset": ds, "seed": key[2], "model": column.split("_")[0], "epoch": h["epoch"],
                              "loss": h[column]} for h in rows]
                if key[2] == min(k[2] for k in keys[ds]):
                    losses = [h[column] for h in rows]
                    peak = int(np.argmax(losses))
                    shape = ("rises to its peak at epoch {} then falls".format(rows[peak]["epoch"])
                             if 0 < peak < len(losses) - 1 else "falls" if losses[-1] < losses[0] else "rises")
                    lines.append(f"- {_label(ds)}, seed {key[2]}, {title}: {losses[0]:.4g} -> {losses[-1]:.4g} in "
                                 f"{len(losses)} epochs; {shape}.")
            ax.set_title(f"{_label(ds)}: {title}", fontsize=8)
            ax.set_xlabel("epoch")
            ax.set_ylabel("training loss (as logged)")
            if ax.lines:
                ax.legend(fontsize=6)
    fig.suptitle("Figure 4: BADR's training-loss curves")
    files = [save_png(fig, Path(opts.out) / "fig4.png"),
             write_csv(Path(opts.out) / "fig4.csv", ("dataset", "seed", "model", "epoch", "loss"), csv_rows)]
    text = "\n".join(["# Figure 4 of the BADR paper: training-loss curves", "", "![Figure 4](fig4.png)", "",
                      "The propensity model's epoch loss, and the prediction and imputation models' mean loss per "
                      "step of each epoch, per seed (history.csv).", ""] + lines + [""])
    replace(Path(opts.out) / "fig4.md", text)
    return files + [Path(opts.out) / "fig4.md"], text


def write_report(out: Path, parts: Sequence[Any], timed: bool = True) -> Path:
    """``OUT/REPORT.md``: every part (:class:`reproduce.experiments.Part`) of the job on one page,
    after the time each part took in this invocation and the runs it trained (``timed`` False:
    rendered from finished runs, nothing trained)."""
    lines = ["# The BADR paper, reproduced", ""]
    if not timed:
        lines += ["Rendered from the finished runs in results.csv (`--table-only`: nothing trained).", ""]
    else:
        lines += ["| part | runs | trained now | seconds |", "|---|---:|---:|---:|"]
        lines += [f"| {p.name} | {p.runs} | {p.trained} | {p.seconds:.0f} |" for p in parts] + [""]
        lines += ["A part's runs not trained now were finished before it: by an earlier part (a run shared by "
                  "parts is trained, and counted, in the first) or by an earlier invocation on this folder, whose "
                  "time is not in this table (the log's `== part` lines time each invocation).", ""]
    for part in parts:  # each part's headings one level down, under the page's title
        lines += [re.sub(r"^(#+) ", r"#\1 ", part.section, flags=re.M), ""]
    path = out / "REPORT.md"
    replace(path, "\n".join(lines))
    return path
