"""Hyperparameter search on the validation split only (never the test labels).

A seeded random search: each trial draws every one of the method's own keys
(:attr:`reproduce.methods.Method.own_keys`) and, with ``propensity=True``, the propensity
model's learning rate and weight decay (which the config's "propensity" block then shares
across the baselines) from its range in
:data:`reproduce.methods.SEARCH_SPACE` (log-uniform for learning rates and weight decays,
uniform for gamma and alpha, uniform integers for G), trains one run per seed with the first
``n_seeds`` seeds of the config and scores the trial by the mean validation AUC of the final
models (a diverged run scores minus infinity).  Trial 0 evaluates the config's current
values, so tuning never returns something worse on validation than what it started from.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np

from estimators.data import CVRData

from .methods import SEARCH_SPACE, TUNED_PROPENSITY_KEYS, Method
from .train import PropensityCache, run_one


def sample_params(method: Method, base: dict[str, Any], rng: np.random.Generator,
                  propensity: bool = False) -> dict[str, Any]:
    """One random draw of ``method``'s own keys (and of the propensity model's with ``propensity``);
    the other keys are kept from ``base``."""
    params = dict(base)
    for key in method.own_keys + (TUNED_PROPENSITY_KEYS if propensity else ()):
        low, high, scale = SEARCH_SPACE[key]
        if scale == "log":
            params[key] = float(math.exp(rng.uniform(math.log(low), math.log(high))))
        elif scale == "int":
            params[key] = int(rng.integers(low, high + 1))
        else:
            params[key] = float(rng.uniform(low, high))
    return params


def tune(data: CVRData, cfg: dict[str, Any], method: Method, base: dict[str, Any], trials: int, *,
         seed: int = 0, max_epochs: Optional[int] = None, n_seeds: int = 1, propensity: bool = False,
         on_trial: Optional[Callable[[int, dict[str, Any], float], None]] = None,
         propensity_cache: Optional[PropensityCache] = None) -> tuple[dict[str, Any], float]:
    """Best ``(params, validation AUC)`` over ``trials`` trials (trial 0: ``base``).

    Trials that share propensity settings share their fits through ``propensity_cache``.
    """
    if trials < 1:
        raise ValueError(f"--trials must be a positive integer; got {trials}")
    if propensity and not method.uses_propensity:
        raise ValueError(f"--propensity: method {method.name!r} uses no propensity model")
    rng = np.random.default_rng(seed)
    best, best_auc = None, -math.inf
    for trial in range(trials):
        params = base if trial == 0 else sample_params(method, base, rng, propensity)
        try:
            score = float(np.mean([
                run_one(data, cfg, method, params, s, max_epochs=max_epochs, split="val",
                        label=f"tune {data.name} {method.name} trial {trial} seed {s}",
                        propensity_cache=propensity_cache)["auc"]
                for s in cfg["seeds"][:n_seeds]]))
        except FloatingPointError:
            score = -math.inf  # diverged: a learning rate too large for this method
        if on_trial is not None:
            on_trial(trial, params, score)
        if score > best_auc:
            best, best_auc = params, score
    if best is None:
        raise RuntimeError(f"every trial of {method.name} on {data.name} diverged")
    return best, best_auc
