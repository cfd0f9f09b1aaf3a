"""``python -m simulate ctcvr``: a semi-synthetic click / conversion log with a known truth.

The ESCM2 paper's data (an industrial log and Ali-CCP) cannot be had here,
and on logged data the conversion of an unclicked exposure is never known. This module
draws an Ali-CCP style log whose truth is known for every exposure: the click probability,
the conversion probability and the potential conversion label ``r`` ("would convert if
clicked"), so that CVR over the exposure space D, which the paper's Proposition 1 is about,
is measured rather than assumed.

World (drawn once from ``truth_seed``; the same for every ``seed``)
    Users ``u`` carry categorical fields of cardinalities :data:`USER_FIELDS` (8, 20, 50) and
    items ``i`` fields of :data:`ITEM_FIELDS` (10, 30, 100), each category drawn with skewed
    (log-normal) shares. Every category ``k`` of field ``f`` has a latent vector
    ``E_f[k] ~ N(0, I)`` of size ``2 * DIM + 2`` and every user and item one of its own,
    ``e_u ~ N(0, ID_WEIGHT^2 I)``; an entity's vector is the normalised sum
    ``x_u = (sum_f E_f[field_f(u)] + e_u) / sqrt(F + ID_WEIGHT^2)``, split into a click part
    (``z^a_u`` of size DIM and a bias ``b^a_u``) and a conversion part (``z^c_u``, ``b^c_u``).
    Exposure shares: ``P(u) ∝ exp(1.0 g_u)``, ``P(i) ∝ exp(1.5 g_i)``, ``g ~ N(0, 1)`` (heavy
    tails, as logs have).

Exposure ``e = (u, i)`` (drawn from ``seed``)
    ::

        u ~ P(u),  i ~ P(i)                                   (independently)
        a0(u,i) = (b^a_u + b^a_i + <z^a_u, z^a_i> / sqrt(DIM)) / s_a
        c(u,i)  = (b^c_u + b^c_i + <z^c_u, z^c_i> / sqrt(DIM)) / s_c   conversion tendency
        a(u,i)  = (a0(u,i) - rho c(u,i)) / sqrt(1 - rho^2)             click attractiveness
        t_e    = c(u,i) + sigma * eps_e,   eps_e ~ N(0, 1)    the exposure's tendency
        p_click_e      = sigmoid(mu_o + a(u,i) + beta * t_e)
        p_conversion_e = sigmoid(mu_r + t_e)
        o_e ~ Bernoulli(p_click_e),  r_e ~ Bernoulli(p_conversion_e)   (independent given t_e)
        observed conversion = o_e * r_e

    ``s_a``, ``s_c`` make ``a0`` and ``c`` of unit standard deviation over exposures and
    ``rho`` is their correlation there (chance, in a world of few or very popular entities),
    removed so that ``a`` is uncorrelated with ``c``;
    ``beta`` (``--mnar``) >= 0 makes clicks favour exposures that would convert, so the
    click space over-represents conversions: ``E_O[R] > E_D[R]``, the assumption (10) of
    Proposition 1, holds for ``beta > 0``; with ``beta = 0`` clicks and conversions are
    uncorrelated (CVR over clicks = CVR over exposures up to nonlinear terms: within 2 %
    in the tests). ``sigma``
    (``--noise``) is an exposure-level shock seen by both the click and the conversion
    and by no feature: with ``sigma > 0`` the clicks are missing not at random even given
    every field and id. ``mu_o`` and ``mu_r`` are solved so that the expected CTR is
    ``ctr`` and the expected CVR over clicks ``E[p_click p_conv] / E[p_click]`` is ``cvr``
    (defaults 0.043 and 0.0056: Ali-CCP's training set, ESCM2 Table I, 1.42 M clicks and
    7.92 K conversions in 33.12 M exposures); expectations are taken on a calibration
    sample of :data:`CALIBRATION` exposures drawn from ``truth_seed``, so the targets hold
    up to its Monte Carlo error (well under 1 % relative).

Streaming and determinism
    Exposures are drawn in blocks of :data:`BLOCK` (2^16); block ``b``'s random numbers come
    from ``SeedSequence(seed, spawn_key=(1, b, k))``, one stream ``k`` per variable, so
    the data do not depend on the chunk size (``--chunk-size``, a multiple of BLOCK, only
    bounds memory: about 180 bytes per exposure of a chunk), and the first ``n`` exposures
    of a run are those of every longer run with the same settings. Each chunk is appended
    to the ``.npy`` files with ``write`` (the header first): writing through a memory map
    would keep every written page in the process's resident set, 2 GB at 10^8 exposures.

Files (every ``true_*`` file is truth that a real log never has)
    =========================  ==============  ================================================
    ``user.npy``               int32 (N,)      user id ``u`` of each exposure
    ``item.npy``               int32 (N,)      item id ``i``
    ``click.npy``              uint8 (N,)      ``o``
    ``conversion.npy``         uint8 (N,)      observed conversion ``o * r`` (0 when unclicked)
    ``true_conversion.npy``    uint8 (N,)      potential conversion ``r`` of every exposure
    ``true_p_click.npy``       float32 (N,)    ``p_click``
    ``true_p_conversion.npy``  float32 (N,)    ``p_conversion`` (= P(r = 1), clicked or not)
    ``user_fields.npy``        int32 (U, 3)    each user's categories (Ali-CCP's user features)
    ``item_fields.npy``        int32 (I, 3)    each item's categories
    ``summary.json``           written last    settings, solved intercepts, rates, splits, files
    =========================  ==============  ================================================

    Field values are stored per user and per item, not per exposure (as Ali-CCP keeps its
    common features apart): 19 bytes per exposure. :meth:`CTCVRLog.features` gathers them.

Split
    Exposures are i.i.d., so contiguous ranges are a random split: train, validation and
    test are rows ``[0, n_train)``, ``[n_train, n_train + n_val)`` and the rest, with
    ``n_train = floor(N * train% / 100)`` and likewise ``n_val`` (``--split``, default
    80 10 10), recorded in ``summary.json``; :func:`load_ctcvr` returns a split as views of
    the memory-mapped files, without copying.

Output folder: written whole or not at all, ``--overwrite`` replacing only a folder this
command wrote, umask honoured (:func:`simulate.writer.write_folder`).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Callable

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit

from simulate.writer import check_out, create, write_folder

FORMAT = "simulate-ctcvr/1"
COMMAND = "python -m simulate ctcvr"
BLOCK = 1 << 16  # exposures per random stream: the unit of determinism
DEFAULT_CHUNK = 1 << 18  # exposures per processed chunk: the unit of memory (2^20 ran 1.6 times slower:
# fresh pages and cache misses)
MAX_CHUNK = 1 << 22  # about 1 GB of working memory
MAX_ENTITIES = 1_000_000  # users or items: their tables stay in memory
USER_FIELDS = (8, 20, 50)
ITEM_FIELDS = (10, 30, 100)
DIM = 8  # latent size of each of the click and conversion parts
ID_WEIGHT = 0.5  # standard deviation of a user's / item's own vector beside its categories'
USER_ACTIVITY_SIGMA = 1.0
ITEM_POPULARITY_SIGMA = 1.5
CALIBRATION = 1 << 20  # exposures of the sample that fixes s_a, s_c, rho, mu_o, mu_r
SPLITS = ("train", "val", "test")
RATE_RANGE = (1e-5, 0.99)

# Per-exposure files: name -> little-endian dtype (19 bytes per exposure in all).
EXPOSURE_FILES: dict[str, str] = {
    "user": "<i4", "item": "<i4", "click": "|u1", "conversion": "|u1", "true_conversion": "|u1",
    "true_p_click": "<f4", "true_p_conversion": "<f4",
}
TABLE_FILES = ("user_fields", "item_fields")
BYTES_PER_EXPOSURE = sum(np.dtype(d).itemsize for d in EXPOSURE_FILES.values())
# What this command writes: only a folder of these is replaced with --overwrite.
OURS = re.compile(r"(?:" + "|".join(list(EXPOSURE_FILES) + list(TABLE_FILES)) + r")\.npy|summary\.json")

# Spawn keys of the random streams (first element): world, calibration, exposure blocks.
_WORLD, _CALIBRATE, _EXPOSURES = 0, 2, 1


@dataclass(frozen=True)
class Settings:
    """Everything that fixes the data (``chunk_size`` only bounds memory). Flags in brackets."""

    n_exposures: int  # [--exposures]
    seed: int = 0  # [--seed] the exposures
    truth_seed: int = 0  # [--truth-seed] the world: fields, latent vectors, shares, intercepts
    n_users: int = 100_000  # [--users]
    n_items: int = 50_000  # [--items]
    ctr: float = 0.043  # [--ctr] expected click-through rate over exposures
    cvr: float = 0.0056  # [--cvr] expected conversion rate over clicks
    mnar: float = 1.0  # [--mnar] beta, weight of the conversion tendency in the click logit
    noise: float = 0.5  # [--noise] sigma, the exposure-level shock shared by click and conversion
    split: tuple[int, int, int] = (80, 10, 10)  # [--split] percentages of train, val, test
    chunk_size: int = DEFAULT_CHUNK  # [--chunk-size]

    def split_sizes(self) -> tuple[int, int, int]:
        """Rows of train, val and test (contiguous, in that order)."""
        train = self.n_exposures * self.split[0] // 100
        val = self.n_exposures * self.split[1] // 100
        return train, val, self.n_exposures - train - val


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)


def check_settings(settings: Settings) -> None:
    """Refuse a bad setting before any work: a ValueError naming the flag and what it takes."""
    s = settings
    if not _is_int(s.n_exposures) or s.n_exposures < 1:
        raise ValueError(f"--exposures must be a positive integer, got {s.n_exposures!r}")
    for flag, value in (("--seed", s.seed), ("--truth-seed", s.truth_seed)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"{flag} must be an integer >= 0, got {value!r}")
    for flag, value in (("--users", s.n_users), ("--items", s.n_items)):
        if not _is_int(value) or not 1 <= value <= MAX_ENTITIES:
            raise ValueError(f"{flag} must be an integer in 1..{MAX_ENTITIES:,} (its tables stay in memory), "
                             f"got {value!r}")
    low, high = RATE_RANGE
    for flag, value, what in (("--ctr", s.ctr, "click-through rate"), ("--cvr", s.cvr, "conversion rate over clicks")):
        if not _is_real(value) or not low <= value <= high:
            raise ValueError(f"{flag} (the expected {what}) must be in [{low:g}, {high:g}], got {value!r}")
    for flag, value in (("--mnar", s.mnar), ("--noise", s.noise)):
        if not _is_real(value) or not 0 <= value <= 10:
            raise ValueError(f"{flag} must be a number in [0, 10], got {value!r}")
    split = tuple(s.split)
    if len(split) != 3 or not all(_is_int(p) and p >= 1 for p in split) or sum(split) != 100:
        raise ValueError(f"--split takes three integer percentages >= 1 (train val test) summing to 100, "
                         f"got {' '.join(map(str, split))}")
    empty = [name for name, rows in zip(SPLITS, s.split_sizes()) if rows == 0]
    if empty:
        raise ValueError(f"--exposures {s.n_exposures} leaves the {empty[0]} split empty with --split "
                         f"{' '.join(map(str, split))}: give more exposures")
    if not _is_int(s.chunk_size) or not BLOCK <= s.chunk_size <= MAX_CHUNK or s.chunk_size % BLOCK:
        raise ValueError(f"--chunk-size must be a multiple of {BLOCK} up to {MAX_CHUNK}, got {s.chunk_size!r}")


def output_bytes(settings: Settings) -> int:
    """Bytes the output folder takes (the .npy headers and summary.json aside)."""
    return settings.n_exposures * BYTES_PER_EXPOSURE + 4 * (len(USER_FIELDS) * settings.n_users
                                                            + len(ITEM_FIELDS) * settings.n_items)


def check_space(settings: Settings, out_dir: str | os.PathLike) -> None:
    """Refuse an output that does not fit on the file system of ``out_dir``: a ValueError naming the flags."""
    ancestor = Path(os.path.realpath(os.path.expanduser(os.fspath(out_dir))))
    while not ancestor.exists():
        ancestor = ancestor.parent
    need, free = output_bytes(settings), shutil.disk_usage(ancestor).free
    if need > free:
        raise ValueError(f"--exposures {settings.n_exposures} needs {need / 1e9:.2f} GB under --out "
                         f"{os.fspath(out_dir)}, which has {free / 1e9:.2f} GB free: choose another --out or "
                         "fewer --exposures")


# ---- the world ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """The fixed part of the truth: fields, latent tables, exposure shares and solved constants."""

    user_fields: np.ndarray  # (U, 3) int32
    item_fields: np.ndarray  # (I, 3) int32
    user_table: np.ndarray  # (U, 2 DIM + 2) float32: z^a (DIM), z^c (DIM), b^a, b^c
    item_table: np.ndarray  # (I, 2 DIM + 2) float32
    user_shares: Alias  # P(u)
    item_shares: Alias  # P(i)
    scale_a: float = 1.0  # s_a
    scale_c: float = 1.0  # s_c
    rho: float = 0.0  # correlation of the raw a and c over exposures, removed from a
    mu_click: float = 0.0  # mu_o
    mu_conversion: float = 0.0  # mu_r


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


@dataclass(frozen=True)
class Alias:
    """Walker's alias table of a distribution over ``0..n-1``: draws in O(1) (a binary search of the
    cumulative shares took 160 ns per draw, most of the time of an exposure)."""

    keep: np.ndarray  # (n,) float64: P(keep j | column j)
    alias: np.ndarray  # (n,) int32: the entity drawn otherwise

    @classmethod
    def of(cls, weights: np.ndarray) -> Alias:
        """The table of shares ``weights / weights.sum()`` (Vose's construction)."""
        n = len(weights)
        scaled = (weights * (n / weights.sum())).tolist()
        keep, alias = [1.0] * n, list(range(n))
        small = [j for j in range(n) if scaled[j] < 1.0]
        large = [j for j in range(n) if scaled[j] >= 1.0]
        while small and large:
            j, k = small.pop(), large[-1]
            keep[j], alias[j] = scaled[j], k
            scaled[k] -= 1.0 - scaled[j]  # k gives column j what j lacks
            if scaled[k] < 1.0:
                small.append(large.pop())
        # Left over (rounding): columns of share 1, kept whole.
        return cls(np.array(keep), np.array(alias, dtype=np.int32))

    def draw(self, uniform: np.ndarray) -> np.ndarray:
        """One entity (int32) per uniform in [0, 1): its integer part times n picks the column, the rest
        decides between the column and its alias."""
        n = len(self.keep)
        scaled = uniform * n
        column = np.minimum(scaled.astype(np.int32), n - 1)  # the minimum: u * n may round up to n
        scaled -= column
        return np.where(scaled < np.take(self.keep, column), column, np.take(self.alias, column))


def _entities(rng: np.random.Generator, n: int, cards: tuple[int, ...], sigma: float
              ) -> tuple[np.ndarray, np.ndarray, Alias]:
    """Fields (n, F) int32, latent table (n, 2 DIM + 2) float32 and exposure shares of ``n`` users or items."""
    fields = np.empty((n, len(cards)), dtype=np.int32)
    table = ID_WEIGHT * rng.standard_normal((n, 2 * DIM + 2))  # e_u, the entity's own vector
    for f, card in enumerate(cards):
        shares = np.exp(rng.standard_normal(card))  # skewed category shares
        fields[:, f] = rng.choice(card, size=n, p=shares / shares.sum())
        table += rng.standard_normal((card, 2 * DIM + 2))[fields[:, f]]  # E_f[field_f(u)]
    table /= math.sqrt(len(cards) + ID_WEIGHT ** 2)  # unit variance per coordinate
    return fields, table.astype(np.float32), Alias.of(np.exp(sigma * rng.standard_normal(n)))


def _logits(world: World, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a(u,i) and c(u,i) of each exposure (float32), with the world's scales."""
    # np.take, not table[users]: the same rows, ten times faster on a 2-D table (numpy 2.4)
    left, right = np.take(world.user_table, users, axis=0), np.take(world.item_table, items, axis=0)
    raw = np.einsum("nd,nd->n", left[:, :DIM], right[:, :DIM]) / np.float32(math.sqrt(DIM))
    a = (raw + left[:, 2 * DIM] + right[:, 2 * DIM]) * np.float32(1.0 / world.scale_a)
    raw = np.einsum("nd,nd->n", left[:, DIM:2 * DIM], right[:, DIM:2 * DIM]) / np.float32(math.sqrt(DIM))
    c = (raw + left[:, 2 * DIM + 1] + right[:, 2 * DIM + 1]) * np.float32(1.0 / world.scale_c)
    if world.rho:
        a = (a - np.float32(world.rho) * c) * np.float32(1.0 / math.sqrt(1.0 - world.rho ** 2))
    return a, c


def _solve(mean_at: Callable[[float], float], target: float, flag: str) -> float:
    """The intercept m with mean_at(m) = target (mean_at increases in m)."""
    low, high = -60.0, 60.0
    if not mean_at(low) < target < mean_at(high):  # cannot happen for rates in RATE_RANGE; kept as a guard
        raise ValueError(f"{flag} {target:g} cannot be reached by the model: choose a rate nearer 0.5")
    return float(brentq(lambda m: mean_at(m) - target, low, high, xtol=1e-12, rtol=1e-12))


def build_world(settings: Settings) -> World:
    """Draw the world from ``truth_seed`` and fix ``s_a``, ``s_c``, ``rho``, ``mu_o``, ``mu_r`` on the calibration
    sample."""
    s = settings
    rng = _rng(s.truth_seed, _WORLD)
    user_fields, user_table, user_shares = _entities(rng, s.n_users, USER_FIELDS, USER_ACTIVITY_SIGMA)
    item_fields, item_table, item_shares = _entities(rng, s.n_items, ITEM_FIELDS, ITEM_POPULARITY_SIGMA)
    world = World(user_fields, item_fields, user_table, item_table, user_shares, item_shares)
    users, items, eps = _exposures(world, _rng(s.truth_seed, _CALIBRATE), CALIBRATION)
    # In pieces of a default chunk: fresh memory for the gathered rows cost more than the arithmetic.
    pieces = [_logits(world, users[k:k + DEFAULT_CHUNK], items[k:k + DEFAULT_CHUNK])
              for k in range(0, CALIBRATION, DEFAULT_CHUNK)]
    a, c = (np.concatenate(part).astype(np.float64) for part in zip(*pieces))
    scale_a, scale_c = float(a.std()), float(c.std())
    a, c = a / scale_a, c / scale_c
    # A world of few or very popular entities correlates a and c by chance; remove that, so that
    # beta alone ties clicks to conversions (beta = 0: E_O[R] = E_D[R] up to nonlinear terms).
    rho = float(np.corrcoef(a, c)[0, 1])
    a = (a - rho * c) / math.sqrt(1.0 - rho ** 2)
    t = c + s.noise * eps  # t_e
    click_logit = a + s.mnar * t
    mu_o = _solve(lambda m: float(expit(m + click_logit).mean()), s.ctr, "--ctr")
    weight = expit(mu_o + click_logit)
    weight /= weight.sum()
    mu_r = _solve(lambda m: float(weight @ expit(m + t)), s.cvr, "--cvr")
    return World(user_fields, item_fields, user_table, item_table, user_shares, item_shares, scale_a, scale_c,
                 rho, mu_o, mu_r)


def _exposures(world: World, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` exposures of the calibration sample: users, items, eps (float64)."""
    users = world.user_shares.draw(rng.random(n))
    items = world.item_shares.draw(rng.random(n))
    return users, items, rng.standard_normal(n)


# ---- exposures, chunk by chunk -------------------------------------------------------------------


def draw_chunk(world: World, settings: Settings, start: int, stop: int) -> dict[str, np.ndarray]:
    """Exposures ``[start, stop)`` (``start`` a multiple of BLOCK): every per-exposure array, by file name.

    Each block of BLOCK exposures draws from its own streams, one per variable, so a chunk is
    the concatenation of its blocks whatever the chunk size.
    """
    n = stop - start
    u_user, u_item = np.empty(n), np.empty(n)
    eps, u_click, u_conv = (np.empty(n, dtype=np.float32) for _ in range(3))
    for block_start in range(start, stop, BLOCK):
        block = slice(block_start - start, min(block_start + BLOCK, stop) - start)
        streams = [_rng(settings.seed, _EXPOSURES, block_start // BLOCK, k) for k in range(5)]
        streams[0].random(out=u_user[block])
        streams[1].random(out=u_item[block])
        streams[2].standard_normal(dtype=np.float32, out=eps[block])
        streams[3].random(dtype=np.float32, out=u_click[block])
        streams[4].random(dtype=np.float32, out=u_conv[block])
    users = world.user_shares.draw(u_user)
    items = world.item_shares.draw(u_item)
    del u_user, u_item
    a, c = _logits(world, users, items)
    t = c + np.float32(settings.noise) * eps  # t_e
    p_click = expit(np.float32(world.mu_click) + a + np.float32(settings.mnar) * t)
    p_conv = expit(np.float32(world.mu_conversion) + t)
    click = (u_click < p_click).view(np.uint8)
    true_conversion = (u_conv < p_conv).view(np.uint8)
    return {"user": users, "item": items, "click": click, "conversion": click & true_conversion,
            "true_conversion": true_conversion, "true_p_click": p_click, "true_p_conversion": p_conv}


# Running sums kept per split: exposures, clicks, conversions, true conversions, sum p_click,
# sum p_conversion, sum p_click * p_conversion.
_SUMS = ("exposures", "clicks", "conversions", "true_conversions", "p_click", "p_conversion", "p_joint")


def _add_sums(sums: dict[str, float], chunk: dict[str, np.ndarray], joint: np.ndarray, part: slice) -> None:
    sums["exposures"] += part.stop - part.start
    for key, name in (("clicks", "click"), ("conversions", "conversion"), ("true_conversions", "true_conversion")):
        sums[key] += int(np.count_nonzero(chunk[name][part]))
    sums["p_click"] += float(np.sum(chunk["true_p_click"][part], dtype=np.float64))
    sums["p_conversion"] += float(np.sum(chunk["true_p_conversion"][part], dtype=np.float64))
    sums["p_joint"] += float(np.sum(joint[part]))


def _rates(sums: dict[str, float]) -> dict[str, float | int | None]:
    """The rates of a split (or of all exposures) from its sums; a rate over no clicks is null."""
    n, clicks = sums["exposures"], sums["clicks"]
    return {
        "exposures": int(n), "clicks": int(clicks), "conversions": int(sums["conversions"]),
        "true_conversions": int(sums["true_conversions"]),
        "ctr": clicks / n, "ctr_expected": sums["p_click"] / n,
        "cvr_clicked": sums["conversions"] / clicks if clicks else None,
        "cvr_clicked_expected": sums["p_joint"] / sums["p_click"],
        "cvr_exposures": sums["true_conversions"] / n, "cvr_exposures_expected": sums["p_conversion"] / n,
        "ctcvr": sums["conversions"] / n, "ctcvr_expected": sums["p_joint"] / n,
    }


def _header(handle: IO[bytes], dtype: str, shape: tuple[int, ...]) -> None:
    np.lib.format.write_array_header_1_0(
        handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})


def _fill(settings: Settings, world: World, log: Callable[[str], None]) -> Callable[[Path], None]:
    """The function that writes the whole folder into a temporary folder (for ``write_folder``)."""
    s = settings
    n = s.n_exposures
    sizes = s.split_sizes()
    bounds = [0, sizes[0], sizes[0] + sizes[1], n]

    def fill(tmp: Path) -> None:
        for name, fields in (("user_fields", world.user_fields), ("item_fields", world.item_fields)):
            with create(tmp / f"{name}.npy") as handle:
                np.save(handle, fields.astype("<i4"), allow_pickle=False)
        sums = [dict.fromkeys(_SUMS, 0) for _ in SPLITS]
        with ExitStack() as stack:
            handles = {name: stack.enter_context(create(tmp / f"{name}.npy")) for name in EXPOSURE_FILES}
            for name, dtype in EXPOSURE_FILES.items():
                _header(handles[name], dtype, (n,))
            step = max(1, (n // s.chunk_size) // 10) * s.chunk_size  # about ten progress lines
            for start in range(0, n, s.chunk_size):
                stop = min(start + s.chunk_size, n)
                chunk = draw_chunk(world, s, start, stop)
                for name, dtype in EXPOSURE_FILES.items():
                    handles[name].write(memoryview(np.ascontiguousarray(chunk[name], dtype=dtype)))
                joint = chunk["true_p_click"].astype(np.float64) * chunk["true_p_conversion"]
                # Sums over segments that no chunk boundary moves (blocks cut at the split
                # bounds), added in order: summary.json does not depend on the chunk size.
                cuts = sorted({start, stop, *range(start - start % BLOCK + BLOCK, stop, BLOCK),
                               *(b for b in bounds if start < b < stop)})
                for lo, hi in zip(cuts, cuts[1:]):
                    part = next(k for k in range(3) if bounds[k] <= lo < bounds[k + 1])
                    _add_sums(sums[part], chunk, joint, slice(lo - start, hi - start))
                if stop % step == 0 or stop == n:
                    log(f"  {stop:,} / {n:,} exposures")
        total = {key: sum(part[key] for part in sums) for key in _SUMS}
        summary = _summary(s, world, total, sums, bounds)
        with create(tmp / "summary.json") as handle:  # last: a folder with it is complete
            handle.write((json.dumps(summary, indent=2) + "\n").encode("ascii"))
    return fill


def _summary(s: Settings, world: World, total: dict[str, float], sums: list[dict[str, float]],
             bounds: list[int]) -> dict:
    files = {f"{name}.npy": {"dtype": dtype, "shape": [s.n_exposures]} for name, dtype in EXPOSURE_FILES.items()}
    files["user_fields.npy"] = {"dtype": "<i4", "shape": [s.n_users, len(USER_FIELDS)]}
    files["item_fields.npy"] = {"dtype": "<i4", "shape": [s.n_items, len(ITEM_FIELDS)]}
    settings = {key: value for key, value in asdict(s).items() if key != "chunk_size"}  # chunk_size changes nothing
    settings["split"] = list(s.split)
    return {
        "format": FORMAT,
        "n_exposures": s.n_exposures, "seed": s.seed, "truth_seed": s.truth_seed,
        "settings": settings,
        "model": {"user_fields": list(USER_FIELDS), "item_fields": list(ITEM_FIELDS), "dim": DIM,
                  "id_weight": ID_WEIGHT, "user_activity_sigma": USER_ACTIVITY_SIGMA,
                  "item_popularity_sigma": ITEM_POPULARITY_SIGMA, "calibration_exposures": CALIBRATION,
                  "block": BLOCK, "scale_a": world.scale_a, "scale_c": world.scale_c, "rho": world.rho,
                  "mu_click": world.mu_click, "mu_conversion": world.mu_conversion},
        **_rates(total),
        "splits": {name: {"start": bounds[k], "stop": bounds[k + 1], **_rates(sums[k])}
                   for k, name in enumerate(SPLITS)},
        "files": files,
    }


def write_ctcvr(settings: Settings, out_dir: str | os.PathLike, overwrite: bool = False,
                log: Callable[[str], None] = lambda line: None) -> dict:
    """Draw the log of ``settings`` into the folder ``out_dir`` (whole or not at all); return its summary.

    Settings, ``out_dir`` and the free space are checked first (ValueError naming the flag);
    a non-empty ``out_dir`` is replaced only with ``overwrite`` and only if this command wrote it.
    """
    check_settings(settings)
    check_out(out_dir, overwrite, ours=OURS, command=COMMAND)
    check_space(settings, out_dir)
    world = build_world(settings)
    log(f"world: {settings.n_users:,} users, {settings.n_items:,} items; mu_click {world.mu_click:.4f}, "
        f"mu_conversion {world.mu_conversion:.4f}")
    out = write_folder(out_dir, _fill(settings, world, log), overwrite, ours=OURS, command=COMMAND)
    return json.loads((out / "summary.json").read_text())


# ---- loading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CTCVRLog:
    """A folder of ``python -m simulate ctcvr`` (or one split of it): arrays by file name.

    The per-exposure arrays are aligned rows; ``true_*`` are the truth a real log lacks.
    With ``mmap=True`` they are read-only memory maps (a split is a view, nothing is read
    until used).
    """

    user: np.ndarray
    item: np.ndarray
    click: np.ndarray
    conversion: np.ndarray
    true_conversion: np.ndarray
    true_p_click: np.ndarray
    true_p_conversion: np.ndarray
    user_fields: np.ndarray
    item_fields: np.ndarray
    summary: dict
    split: str | None  # None: every exposure
    start: int  # first row of the split in the files

    def __len__(self) -> int:
        return len(self.user)

    def features(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """The Ali-CCP style feature row of exposures ``rows``: user fields then item fields, (n, 6) int32."""
        return np.concatenate([self.user_fields[self.user[rows]], self.item_fields[self.item[rows]]], axis=1)


def _damaged(path: Path, why: str) -> ValueError:
    return ValueError(f"{path}: {why}; the folder is not a complete output of {COMMAND}: rebuild it "
                      f"({COMMAND} --exposures N --out {path.parent} --overwrite)")


def load_ctcvr(folder: str | os.PathLike, split: str | None = None, mmap: bool = True) -> CTCVRLog:
    """Load a folder written by :func:`write_ctcvr`: every exposure (``split=None``) or ``"train"``,
    ``"val"`` or ``"test"``.

    Checked: summary.json (present, of this format, complete) and every file (present, its
    dtype and shape those summary.json records); a ValueError names the file and the fix.
    ``mmap=False`` reads the arrays into memory.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or None, got {split!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: build one with {COMMAND} --exposures N --out {folder}")
    path = folder / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise _damaged(path, "missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path, f"unreadable ({exc})") from None
    if not isinstance(summary, dict) or summary.get("format") != FORMAT:
        raise _damaged(path, f"not a summary of format {FORMAT}")
    try:
        n = summary["n_exposures"]
        files = summary["files"]
        bounds = {name: (summary["splits"][name]["start"], summary["splits"][name]["stop"]) for name in SPLITS}
    except (KeyError, TypeError) as exc:
        raise _damaged(path, f"lacks the entry {exc}") from None
    arrays = {}
    for name in (*EXPOSURE_FILES, *TABLE_FILES):
        path = folder / f"{name}.npy"
        want = files.get(f"{name}.npy") if isinstance(files, dict) else None
        if not isinstance(want, dict) or (name in EXPOSURE_FILES and want.get("shape") != [n]):
            raise _damaged(folder / "summary.json", f"records no valid entry for {name}.npy")
        try:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except FileNotFoundError:
            raise _damaged(path, "missing") from None
        except (OSError, ValueError, EOFError) as exc:  # truncated, or not a .npy file
            raise _damaged(path, f"unreadable ({exc})") from None
        if array.dtype.str != want.get("dtype") or list(array.shape) != want.get("shape"):
            raise _damaged(path, f"holds {array.dtype.str} {list(array.shape)}, summary.json records "
                                 f"{want.get('dtype')} {want.get('shape')}")
        arrays[name] = array
    start, stop = (0, n) if split is None else bounds[split]
    rows = slice(start, stop)
    return CTCVRLog(**{name: arrays[name][rows] for name in EXPOSURE_FILES}, user_fields=arrays["user_fields"],
                    item_fields=arrays["item_fields"], summary=summary, split=split, start=start)
