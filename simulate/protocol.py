"""The semi-synthetic protocol of the BADR paper, Section 4.8 (MRDR's, after Schnabel et al. 2016).

1. complete the observed ratings by matrix factorisation (:mod:`simulate.completion`);
2. map the completed scores to ratings 1..5 by quantiles so that the rating shares equal
   Yahoo! R3's uniformly random test set;
3. propensities ``p[u, i] = k * alpha ** min(6 - r[u, i], 4)``, conversion label
   ``y[u, i] = 1[r[u, i] >= 3]``;
4. clicks ``o[u, i] ~ Bernoulli(p[u, i])``; train = clicked pairs, validation and test =
   a random ``val_pct`` % / rest of the unclicked pairs.

Steps 1-2 depend only on ``truth_seed`` (:func:`ground_truth`); steps 3-4 on the
propensity settings and ``seed`` (:func:`draw`), so several seeds are several exposure
draws over one fixed ground truth.

Every setting is checked before any work (:func:`check_settings`; ``generate``,
``ground_truth`` and ``draw`` check theirs first), each error a ValueError naming the flag
and the fix. Degenerate settings are refused. The rule: the rating counts follow from
``marginals`` exactly (step 2 is a quantile mapping), so the propensity of every pair and
the expected size of every split are known in advance; a setting is refused when every
label would be one class (no share for ratings 1..2, or none for 3..5), when every
propensity would be 1 (every pair clicked: validation and test empty), when a propensity
would underflow to 0, or when any of train, val and test would expect fewer than
``MIN_EXPECTED`` (10) pairs of either label (it could come out empty or of one class). A
draw that still comes out so (chance below 1e-4 per split and label) is refused too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.optimize import brentq

from simulate.completion import complete_ratings
from simulate.sources import N_ITEMS, N_RATINGS, N_USERS, lowrank_ratings, read_ml100k

SOURCES = ("ml100k", "lowrank")
# Shares of ratings 1..5 in Yahoo! R3's uniformly random test set (simulate.yahoo_r3_marginals).
YAHOO_R3_MARGINALS = (0.5262, 0.2419, 0.1439, 0.0624, 0.0255)
THRESHOLD = 3  # y = 1[r >= THRESHOLD]
DEFAULT_ALPHA = 0.5  # the left half of the paper's Table 6 (p_min = 0.0625)
RATINGS = np.arange(1, 6)
EXPONENTS = np.minimum(6 - RATINGS, 4)  # p = k * alpha ** EXPONENTS[r - 1]
N_PAIRS = N_USERS * N_ITEMS  # the simulated matrix's pairs, both sources
# Each split must expect at least this many pairs of each label (P(none) ~ exp(-10) < 1e-4).
MIN_EXPECTED = 10
# The ALS half step holds one (rank + 1)^2 float64 outer product per rating: at rank 50,
# 100,000 x 51^2 x 8 bytes = 2.1 GB, several times over during the solve.
MAX_RANK = 50


@dataclass(frozen=True)
class Truth:
    """The fully known rating matrix (int8, values 1..5) and how it was made."""

    ratings: np.ndarray
    source: str
    truth_seed: int
    mf_heldout_rmse: float
    marginals: tuple[float, ...]


@dataclass(frozen=True)
class Simulation:
    """One exposure draw over a :class:`Truth`.

    ``splits`` maps ``train``/``val``/``test`` to ``(x, y)``: ``x`` int64 (n, 2) 0-based
    (user, item) pairs sorted row-major, ``y`` int8 labels.
    """

    ratings: np.ndarray
    labels: np.ndarray
    propensities: np.ndarray
    clicks: np.ndarray
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    val_pct: int
    summary: dict


def _check_marginals(marginals: tuple[float, ...] | list[float]) -> np.ndarray:
    """The shares of ratings 1..5, normalised; ValueError naming --marginals unless 5 shares >= 0 summing to 1."""
    try:
        shares = np.asarray(marginals, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"--marginals must be 5 non-negative shares of ratings 1..5, got {marginals!r}") from None
    if shares.shape != (5,) or not np.all(np.isfinite(shares)) or np.any(shares < 0):
        raise ValueError(f"--marginals must be 5 non-negative shares of ratings 1..5, got {list(marginals)}")
    if abs(shares.sum() - 1.0) > 1e-3:
        raise ValueError(f"--marginals must sum to 1 (+- 0.001), got {shares.sum():.6f}")
    return shares / shares.sum()


def rating_counts(marginals: tuple[float, ...] | list[float], n: int = N_PAIRS) -> np.ndarray:
    """How many of ``n`` pairs get each rating 1..5 under :func:`quantize` with ``marginals`` (exact)."""
    bounds = np.rint(np.cumsum(_check_marginals(marginals)) * n).astype(np.int64)
    bounds[-1] = n
    return np.diff(bounds, prepend=0)


def _check_labels(counts: np.ndarray, marginals: tuple[float, ...] | list[float] | None) -> None:
    """Refuse rating counts whose labels ``1[r >= 3]`` would all be one class, naming --marginals."""
    given = "the ratings" if marginals is None else "--marginals " + " ".join(f"{m:g}" for m in marginals)
    if counts[THRESHOLD - 1:].sum() == 0:
        raise ValueError(f"{given} leave no rating >= {THRESHOLD}, so every label would be 0: "
                         f"give ratings {THRESHOLD}..5 a positive share in --marginals")
    if counts[:THRESHOLD - 1].sum() == 0:
        raise ValueError(f"{given} leave no rating below {THRESHOLD}, so every label would be 1: "
                         f"give ratings 1..{THRESHOLD - 1} a positive share in --marginals")


def _check_int(value: object, flag: str, low: int, high: int | None = None, why: str = "") -> None:
    """Reject anything but an integer (bools excluded) in ``low..high``, naming ``flag``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
            high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{flag} must be an integer {bound}, got {value!r}{why}")


def _check_rank(rank: object) -> None:
    _check_int(rank, "--rank", 1, MAX_RANK,
               f": the matrix factorisation holds {N_RATINGS:,} x (rank + 1)^2 float64 products, "
               f"{N_RATINGS * (MAX_RANK + 1) ** 2 * 8 / 1e9:.1f} GB at rank {MAX_RANK}")


def _check_source(source: object) -> None:
    if source not in SOURCES:
        raise ValueError(f"--source must be one of {SOURCES}, got {source!r}")


def quantize(scores: np.ndarray, marginals: tuple[float, ...] | list[float] = YAHOO_R3_MARGINALS
             ) -> np.ndarray:
    """Integer ratings 1..5 (int8) by score quantiles, with rating shares equal to ``marginals``.

    The lowest ``round(N * m_1)`` scores get 1, the next ``round(N * (m_1 + m_2)) - round(N * m_1)``
    get 2, and so on; ties are broken by position, so the counts are exact.
    """
    shares = _check_marginals(marginals)
    bounds = np.rint(np.cumsum(shares) * scores.size).astype(np.int64)
    bounds[-1] = scores.size
    flat = np.empty(scores.size, dtype=np.int8)
    flat[np.argsort(scores, axis=None, kind="stable")] = np.repeat(RATINGS, np.diff(bounds, prepend=0))
    return flat.reshape(scores.shape)


def _check_propensity_args(density: float | None, alpha: float | None, k: float | None) -> None:
    """Reject out-of-range or over-determined propensity settings, naming the flag."""
    for flag, value in (("--density", density), ("--alpha", alpha), ("--k", k)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))):
            raise ValueError(f"{flag} must be a number, got {value!r}")
    if density is not None and alpha is not None and k is not None:
        raise ValueError("--density, --alpha and --k over-determine p = k * alpha^e: give at most two")
    if density is not None and not 0.0 < density <= 1.0:
        raise ValueError(f"--density must be in (0, 1], got {density}")
    if alpha is not None and not 0.0 < alpha <= 1.0:
        raise ValueError(f"--alpha must be in (0, 1], got {alpha}")
    if k is not None and not k > 0.0:
        raise ValueError(f"--k must be positive, got {k}")


def resolve_propensity(ratings: np.ndarray, density: float | None = None,
                       alpha: float | None = None, k: float | None = None) -> tuple[float, float]:
    """``(alpha, k)`` of ``p = k * alpha ** min(6 - r, 4)`` from any two of density, alpha, k.

    ``density`` is the mean propensity over all pairs.  ``density`` alone solves alpha with
    k = 1 (brentq on the polynomial ``sum_r share_r * alpha ** e_r``); ``density`` with
    ``k`` solves alpha; ``density`` with ``alpha`` solves k; without ``density``, alpha
    defaults to 0.5 and k to 1.
    """
    return _resolve(np.bincount(ratings.ravel(), minlength=6)[1:], density, alpha, k)


def _resolve(counts: np.ndarray, density: float | None, alpha: float | None, k: float | None
             ) -> tuple[float, float]:
    """:func:`resolve_propensity` from the counts of ratings 1..5."""
    _check_propensity_args(density, alpha, k)
    shares = counts / counts.sum()
    present = EXPONENTS[shares > 0]

    def mean_propensity(a: float) -> float:
        return float(np.sum(shares * a ** EXPONENTS))

    solved_k = ""
    if density is None:
        alpha = DEFAULT_ALPHA if alpha is None else alpha
        k = 1.0 if k is None else k
    elif alpha is None:
        k = 1.0 if k is None else k
        if density > k:
            raise ValueError(f"--density {density} exceeds --k {k}: the mean propensity is at most k (alpha = 1)")
        alpha = float(brentq(lambda a: k * mean_propensity(a) - density, 0.0, 1.0, xtol=1e-14))
    else:
        k = density / mean_propensity(alpha)
        solved_k = f"--density {density} with --alpha {alpha} needs k = {k:.6g}, which"
    p_max = k * alpha ** present.min()
    if p_max > 1.0 + 1e-12:
        raise ValueError(f"{solved_k or f'--k {k:.6g} with alpha = {alpha:.6g}'} makes the largest "
                         f"propensity k * alpha^{present.min()} = {p_max:.4f} > 1; "
                         "lower --k or --density, or raise --alpha")
    return float(alpha), float(k)


def _given(density: float | None, alpha: float | None, k: float | None) -> str:
    """The propensity flags as given, for messages."""
    flags = [f"{flag} {value:g}" for flag, value in (("--density", density), ("--alpha", alpha), ("--k", k))
             if value is not None]
    return " ".join(flags) if flags else f"the default --alpha {DEFAULT_ALPHA:g} --k 1"


def _check_outcome(counts: np.ndarray, density: float | None, alpha: float | None, k: float | None,
                   val_pct: int, marginals: tuple[float, ...] | list[float] | None) -> tuple[float, float]:
    """Refuse settings whose draw would be degenerate (the module docstring's rule); return ``(alpha, k)``.

    ``counts``: pairs per rating 1..5. ``marginals``: as given, for messages (None: the
    ratings of a ground truth).
    """
    _check_labels(counts, marginals)
    given = _given(density, alpha, k)
    alpha, k = _resolve(counts, density, alpha, k)
    solved = f"alpha = {alpha:.6g}, k = {k:.6g}"
    p = k * alpha ** EXPONENTS.astype(np.float64)
    present = counts > 0
    if np.all(p[present] >= 1.0):
        lower = "give --density below 1" if density is not None else "lower --alpha or --k below 1"
        raise ValueError(f"{given} makes every propensity 1 ({solved}): every pair would be clicked, leaving "
                         f"validation and test empty; {lower}")
    n_pairs = int(counts.sum())
    classes = {0: RATINGS < THRESHOLD, 1: RATINGS >= THRESHOLD}
    for split in ("train", "val", "test"):
        for label, rows in classes.items():
            clicked = float(np.sum(counts[rows] * p[rows]))
            unclicked = float(np.sum(counts[rows] * (1.0 - p[rows])))
            share = {"train": None, "val": val_pct / 100, "test": 1 - val_pct / 100}[split]
            expected = clicked if share is None else unclicked * share
            if expected >= MIN_EXPECTED:
                continue
            subject, fix = given, "raise the propensities (--density, --alpha or --k)"
            if marginals is not None and counts[rows].sum() < 0.01 * n_pairs:  # a rare label: the shares
                span = f"1..{THRESHOLD - 1}" if label == 0 else f"{THRESHOLD}..5"
                subject = "--marginals " + " ".join(f"{m:g}" for m in marginals)
                fix = (f"give ratings {span} (label {label}, now {counts[rows].sum():,} pairs) a larger share "
                       "in --marginals")
            elif share is not None and unclicked / 2 >= MIN_EXPECTED:
                subject = f"--val-pct {val_pct}"
                fix = "raise --val-pct" if split == "val" else "lower --val-pct"
            elif share is not None:
                fix = "lower the propensities (--density, --alpha or --k)"
            raise ValueError(f"{subject} gives the {split} split an expected {expected:.3g} pairs with label "
                             f"{label} ({solved}, propensities {p[present].min():.3g} to {p[present].max():.3g} "
                             f"over {n_pairs:,} pairs); each of train, val and test needs at least {MIN_EXPECTED} "
                             f"expected pairs of each label, or it may be empty or of one class: {fix}")
    zero = RATINGS[present & (p <= 0.0)]
    if zero.size:
        raise ValueError(f"{given} makes the propensity of rating {zero[0]} underflow to 0 ({solved}); "
                         "every pair needs a positive propensity: raise --alpha")
    return alpha, k


def check_settings(source: str = "ml100k", density: float | None = None, alpha: float | None = None,
                   k: float | None = None, seed: int = 0, val_pct: int = 10, *, truth_seed: int = 0,
                   marginals: tuple[float, ...] | list[float] = YAHOO_R3_MARGINALS, rank: int = 10) -> None:
    """Check every setting of :func:`generate` before any work; ValueError naming the flag and the fix.

    Ranges: ``source`` in :data:`SOURCES`; ``density`` in (0, 1], ``alpha`` in (0, 1],
    ``k`` > 0, at most two of them, the largest propensity at most 1; ``seed`` and
    ``truth_seed`` integers >= 0; ``val_pct`` an integer in 1..99; ``marginals`` 5 shares
    >= 0 summing to 1; ``rank`` an integer in 1..``MAX_RANK``. Then the degenerate
    settings of the module docstring's rule, from the rating counts ``marginals`` gives.
    """
    _check_source(source)
    _check_propensity_args(density, alpha, k)
    _check_int(seed, "--seed", 0)
    _check_int(truth_seed, "--truth-seed", 0)
    _check_val_pct(val_pct)
    _check_rank(rank)
    _check_outcome(rating_counts(marginals), density, alpha, k, val_pct, marginals)


def ground_truth(source: str = "ml100k", data_dir: str | os.PathLike | None = None,
                 truth_seed: int = 0, marginals: tuple[float, ...] | list[float] = YAHOO_R3_MARGINALS,
                 rank: int = 10, log: Callable[[str], None] | None = None) -> Truth:
    """Steps 1-2 of Section 4.8: complete ``source``'s ratings by MF, quantise to ``marginals``.

    Checked first: ``source``, ``truth_seed`` (integer >= 0), ``rank`` (1..``MAX_RANK``),
    ``marginals`` (5 shares summing to 1, giving both labels a rating).
    """
    say = log or (lambda message: None)
    _check_source(source)
    _check_int(truth_seed, "--truth-seed", 0)
    _check_rank(rank)
    _check_labels(rating_counts(marginals), marginals)
    shares = tuple(float(s) for s in _check_marginals(marginals))
    rng = np.random.default_rng(truth_seed)
    if source == "ml100k":
        users, items, ratings = read_ml100k(data_dir)
    else:
        users, items, ratings = lowrank_ratings(rng)
    say(f"{source}: {len(ratings):,} observed ratings of a {N_USERS} x {N_ITEMS} matrix")
    scores, rmse = complete_ratings(users, items, ratings, (N_USERS, N_ITEMS), rng, rank)
    say(f"matrix factorisation (ALS, rank {rank}): held-out RMSE {rmse:.4f}; refit on all ratings")
    say("quantile mapping to rating shares " + " ".join(f"{s:.4f}" for s in shares))
    return Truth(quantize(scores, shares), source, truth_seed, rmse, shares)


def _check_val_pct(val_pct: int) -> None:
    if isinstance(val_pct, bool) or not isinstance(val_pct, (int, np.integer)) or not 0 < val_pct < 100:
        raise ValueError(f"--val-pct must be an integer percentage in 1..99, got {val_pct!r}")


def draw(truth: Truth, density: float | None = None, alpha: float | None = None,
         k: float | None = None, seed: int = 0, val_pct: int = 10,
         log: Callable[[str], None] | None = None) -> Simulation:
    """Steps 3-4 of Section 4.8: propensities, labels, Bernoulli clicks and the three splits.

    Checked first: ``seed`` (integer >= 0), ``val_pct``, the propensity settings and the
    degenerate settings of the module docstring's rule on ``truth``'s ratings; a draw with
    an empty split or a split of one label is refused too (name another ``seed``).
    """
    say = log or (lambda message: None)
    _check_propensity_args(density, alpha, k)
    _check_int(seed, "--seed", 0)
    _check_val_pct(val_pct)
    alpha, k = _check_outcome(np.bincount(truth.ratings.ravel(), minlength=6)[1:], density, alpha, k, val_pct,
                              None)
    say(f"propensity p = k * alpha^min(6 - r, 4) with alpha = {alpha:.6f}, k = {k:.6f}")
    ratings = truth.ratings
    labels = (ratings >= THRESHOLD).astype(np.int8)
    propensities = (k * alpha ** EXPONENTS)[ratings - 1]
    rng = np.random.default_rng(seed)
    clicks = rng.random(ratings.shape) < propensities
    unclicked = np.flatnonzero(~clicks)
    chosen = rng.permutation(len(unclicked))
    n_val = int(round(len(unclicked) * val_pct / 100))
    flat = {"train": np.flatnonzero(clicks), "val": np.sort(unclicked[chosen[:n_val]]),
            "test": np.sort(unclicked[chosen[n_val:]])}
    splits = {name: (np.column_stack(np.divmod(idx, ratings.shape[1])), labels.ravel()[idx])
              for name, idx in flat.items()}
    for name, (_, y) in splits.items():
        if len(np.unique(y)) < 2:
            found = "no pairs" if not len(y) else f"only label {y[0]}"
            raise ValueError(f"--seed {seed} drew a {name} split with {found} although at least {MIN_EXPECTED} "
                             "of each label were expected (a rare draw): use another --seed")
    n_pairs = ratings.size
    summary = {
        "source": truth.source,
        "n_users": ratings.shape[0],
        "n_items": ratings.shape[1],
        "density": float(clicks.mean()),
        "density_se": float(np.sqrt(np.sum(propensities * (1 - propensities))) / n_pairs),
        "propensity_min": float(propensities.min()),
        "propensity_mean": float(propensities.mean()),
        "propensity_max": float(propensities.max()),
        "cvr_clicked": float(labels[clicks].mean()) if clicks.any() else None,
        "cvr_all": float(labels.mean()),
        "alpha": alpha,
        "k": k,
        "seed": int(seed),
        "truth_seed": truth.truth_seed,
        "val_pct": int(val_pct),
        "threshold": THRESHOLD,
        "n_train": len(flat["train"]),
        "n_val": len(flat["val"]),
        "n_test": len(flat["test"]),
        "mf_heldout_rmse": truth.mf_heldout_rmse,
        "rating_marginals": [float(c) / n_pairs for c in np.bincount(ratings.ravel(), minlength=6)[1:]],
    }
    say(f"clicks: {summary['n_train']:,} of {n_pairs:,} pairs; val {summary['n_val']:,}, test {summary['n_test']:,}")
    return Simulation(ratings, labels, propensities, clicks, splits, val_pct, summary)


def generate(source: str = "ml100k", density: float | None = None, alpha: float | None = None,
             k: float | None = None, seed: int = 0, val_pct: int = 10, *,
             data_dir: str | os.PathLike | None = None, truth_seed: int = 0,
             marginals: tuple[float, ...] | list[float] = YAHOO_R3_MARGINALS, rank: int = 10,
             log: Callable[[str], None] | None = None) -> Simulation:
    """The whole Section 4.8 protocol: :func:`ground_truth` then :func:`draw`.

    Every setting is checked first (:func:`check_settings`), before the matrix completion.
    """
    check_settings(source, density, alpha, k, seed, val_pct, truth_seed=truth_seed, marginals=marginals, rank=rank)
    truth = ground_truth(source, data_dir, truth_seed, marginals, rank, log)
    return draw(truth, density, alpha, k, seed, val_pct, log)
