"""Hyperparameter search on the validation split only (never the test labels).

Two ways to propose candidates, both starting with the config's current values (so tuning never
returns something worse on validation than what it started from):

- :func:`random_candidates`, a seeded random search: each trial draws every one of the method's
  own keys (:attr:`reproduce.methods.Method.own_keys`) and, with ``propensity=True``, the
  propensity model's learning rate and weight decay (which the config's "propensity" block then
  shares across the baselines) from its range in :data:`reproduce.methods.SEARCH_SPACE`
  (log-uniform for learning rates and weight decays, uniform for gamma and alpha, uniform integers
  for G);
- :func:`grid_candidates`, a grid: the Cartesian product of the values given per key, the other
  keys kept (a local refinement around values a random search found, or one key fixed).

:func:`tune` trains one run per seed with the first ``n_seeds`` seeds of the config for each
candidate and scores it by the mean validation AUC of the final models (a diverged run scores
minus infinity).  With a ``log``, every run is appended to that CSV as soon as it finishes, and
a run already there (same data set, method, seed and run signature) is read back instead of
retrained, so an interrupted search resumes where it stopped and overlapping searches share runs.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import sys
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from cvrdata import CVRData

from .config import Config, run_signature
from .methods import SEARCH_SPACE, TUNED_PROPENSITY_KEYS, Method
from .runs import in_workers
from .table import TUNE_COLUMNS, append_result, read_results, run_key
from .train import PropensityCache, run_or_diverged


def searchable_keys(method: Method, propensity: bool = False) -> tuple[str, ...]:
    """The keys a search may set: ``method``'s own, and with ``propensity`` the propensity model's."""
    if propensity and not method.uses_propensity:
        raise ValueError(f"--propensity: method {method.name!r} uses no propensity model")
    return method.own_keys + (TUNED_PROPENSITY_KEYS if propensity else ())


def sample_params(method: Method, base: dict[str, Any], rng: np.random.Generator,
                  propensity: bool = False) -> dict[str, Any]:
    """One random draw of ``method``'s own keys (and of the propensity model's with ``propensity``);
    the other keys are kept from ``base``."""
    params = dict(base)
    for key in searchable_keys(method, propensity):
        low, high, scale = SEARCH_SPACE[key]
        if scale == "log":
            params[key] = float(math.exp(rng.uniform(math.log(low), math.log(high))))
        elif scale == "int":
            params[key] = int(rng.integers(low, high + 1))
        else:
            params[key] = float(rng.uniform(low, high))
    return params


def random_candidates(method: Method, base: dict[str, Any], trials: int, seed: int = 0,
                      propensity: bool = False) -> list[dict[str, Any]]:
    """``base`` followed by ``trials - 1`` draws of :func:`sample_params` from ``seed``."""
    if trials < 1:
        raise ValueError(f"--trials must be a positive integer; got {trials}")
    rng = np.random.default_rng(seed)
    return [base] + [sample_params(method, base, rng, propensity) for _ in range(trials - 1)]


def grid_candidates(method: Method, base: dict[str, Any], grid: dict[str, Sequence[float]],
                    propensity: bool = False) -> list[dict[str, Any]]:
    """``base`` followed by every point of the product of ``grid``'s values (``{key: values}``), the
    keys not in ``grid`` kept from ``base``; integer keys (G) must be given integral values."""
    allowed = searchable_keys(method, propensity)
    for key, values in grid.items():
        if key not in allowed:
            hint = " (propensity keys need --propensity)" if key in TUNED_PROPENSITY_KEYS else ""
            raise ValueError(f"--grid: {method.name} has no searchable key {key!r}{hint}; "
                             f"expected one of {', '.join(allowed)}")
        if not values:
            raise ValueError(f"--grid: no values for {key!r}; give KEY=V1,V2,...")
        if SEARCH_SPACE[key][2] == "int" and any(float(v) != int(v) for v in values):
            raise ValueError(f"--grid: {key!r} takes integers; got {list(values)}")
    keys = list(grid)
    points = itertools.product(*(grid[k] for k in keys))
    cast = {k: (int if SEARCH_SPACE[k][2] == "int" else float) for k in keys}
    return [base] + [{**base, **{k: cast[k](v) for k, v in zip(keys, point)}} for point in points]


def tune(data: CVRData, cfg: Config, method: Method, candidates: Sequence[dict[str, Any]], *,
         max_epochs: Optional[int] = None, n_seeds: int = 1,
         on_trial: Optional[Callable[[int, dict[str, Any], float], None]] = None,
         propensity_cache: Optional[PropensityCache] = None,
         log: Optional[str | os.PathLike] = None, jobs: int = 1,
         threads: Optional[int] = None, device: str = "cpu",
         extra: Optional[dict[str, Any]] = None, train_fraction: float = 1.0) -> tuple[dict[str, Any], float]:
    """Best ``(params, validation AUC)`` over ``candidates`` (trial ``t`` is ``candidates[t]``).

    ``device`` is where the runs train; ``extra`` goes into their signatures
    (:func:`reproduce.config.run_signature`); ``train_fraction`` below 1 trains each run on that
    share of the clicked training pairs, drawn by its seed as ``table3 --train-fraction`` does.

    Trials that share propensity settings share their fits through ``propensity_cache``; runs
    found in ``log`` (a CSV of :data:`reproduce.table.TUNE_COLUMNS`) are reused, new ones appended.
    With ``jobs > 1`` every missing run is first trained in that many worker processes
    (:func:`reproduce.runs.in_workers`, ``threads`` each), each logged as it finishes; the trials
    are then scored as in one process (every run seeds itself), except that all seeds of a trial
    are trained even after one diverged.
    """
    if not candidates:
        raise ValueError("no candidates to tune over")
    if jobs < 1:
        raise ValueError(f"jobs must be a positive integer; got {jobs}")
    max_epochs = cfg.max_epochs if max_epochs is None else max_epochs
    done = {run_key(row): row for row in read_results(log)} if log is not None else {}

    def record(row: dict[str, Any]) -> None:
        done[run_key(row)] = row
        if log is not None:
            append_result(log, row, TUNE_COLUMNS)

    if jobs > 1:
        todo, seen = [], set()
        for trial, params in enumerate(candidates):
            sig = run_signature(cfg, method, params, max_epochs, extra)
            for seed in cfg.seeds[:n_seeds]:
                key = (data.name, method.name, seed, sig)
                if key not in done and key not in seen:
                    seen.add(key)
                    todo.append((params, seed, trial, sig, False, train_fraction))
        shared = (data, cfg, method, max_epochs, propensity_cache, device)
        for n, row in enumerate(in_workers(_validation_run, todo, jobs, threads, shared), 1):
            record(row)
            print(f"[{n}/{len(todo)}] {data.name} {method.name} trial {row['trial']} seed {row['seed']}: "
                  f"{row['status']}, validation AUC {row['auc']:.4f}", file=sys.stderr)
    best, best_auc = None, -math.inf
    for trial, params in enumerate(candidates):
        sig = run_signature(cfg, method, params, max_epochs, extra)
        aucs = []
        for seed in cfg.seeds[:n_seeds]:
            row = done.get((data.name, method.name, seed, sig))
            if row is None:
                row = _validation_run(data, cfg, method, max_epochs, propensity_cache, device, params, seed, trial,
                                      sig, train_fraction=train_fraction)
                record(row)
            if row["status"] == "diverged":
                aucs.append(-math.inf)  # a learning rate too large for this method
                break
            aucs.append(row["auc"])
        score = float(np.mean(aucs))
        if on_trial is not None:
            on_trial(trial, params, score)
        if score > best_auc:
            best, best_auc = params, score
    if best is None:
        raise RuntimeError(f"every trial of {method.name} on {data.name} diverged")
    return best, best_auc


def _validation_run(data: CVRData, cfg: Config, method: Method, max_epochs: int,
                    propensity_cache: Optional[PropensityCache], device: str, params: dict[str, Any], seed: int,
                    trial: int, sig: str, show_progress: bool = True, train_fraction: float = 1.0) -> dict[str, Any]:
    """One training run scored on the validation split, as a row of the tuning log (the arguments
    shared by a search's runs first, for :func:`reproduce.runs.in_workers`)."""
    if train_fraction < 1:
        data = data.subsample(train_fraction, seed)
    row = {"dataset": data.name, "method": method.name, "seed": seed, "max_epochs": max_epochs, "signature": sig,
           "threads": torch.get_num_threads(), "trial": trial, "params": json.dumps(params, sort_keys=True)}
    return {**row, **run_or_diverged(data, cfg, method, params, seed, max_epochs=max_epochs, split="val",
                                     label=f"tune {data.name} {method.name} trial {trial} seed {seed}",
                                     show_progress=show_progress, propensity_cache=propensity_cache,
                                     device=device)}
