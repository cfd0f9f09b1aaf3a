"""Propensity adjustments: a function of the learned propensities applied before training.

D-DR (Ha et al., "Fine-Grained Dynamic Framework for Bias-Variance Joint Optimization on Data
Missing Not at Random", NeurIPS 2024, arXiv 2405.15403) replaces each pair's learned propensity
p_hat by f(p_hat)^alpha, eq. (2):

    L_D-DR = (1/|D|) sum_D [ e_hat + o (e - e_hat) / f(p_hat)^alpha ]

with f one of the paper's Table 1 (:data:`FUNCTIONS`; its experiments use f(p) = log(1 + p) / log 2)
and alpha = alpha_{u,i} in [0, 1] chosen per pair in closed form, Theorem 3.5, eq. (5):

    alpha = min( max( ln(2 (w2 / w1) (1 - p_hat)) / ln f(p_hat), 0 ), 1 ),

the minimiser over [0, 1] of w1 h_B + w2 h_V, h_B = 1 - p / f^alpha and h_V = p (1 - p) / f^(2 alpha)
(Table 1, objective (4) with p_hat = p).  The paper sets w1 = 1, w2 = 0.1; only the ratio
``w = w2 / w1`` matters.  Nothing is learned: alpha is a fixed function of the frozen p_hat, so
D-DR(-JL) is DR(-JL) (eqs. 6, 7) trained on the table ``f(p_hat)^alpha`` instead of ``p_hat``.

Closed form.  For p_hat < 1, ln f(p_hat) < 0, so ``alpha -> f^alpha`` is decreasing and clipping
alpha to [0, 1] clips f^alpha to [f(p_hat), 1]; the unclipped optimum has f^alpha = 2 w (1 - p_hat).
Hence (our reading of eq. (5), tested against it in ``tests/test_ddr.py``)

    f(p_hat)^alpha = clamp( 2 w (1 - p_hat),  f(p_hat),  1 ),                              (5')

which is also defined at p_hat = 1 (f(1) = 1: the value 1, where eq. (5) reads 0 / 0).  The DR
weight 1 / f^alpha = clamp(1 / (2 w (1 - p_hat)), 1, 1 / f(p_hat)) is bounded by
max(1, 1 / (2 w (1 - p_hat))) however small p_hat is (Theorem 3.7); as w -> 0 it tends to
1 / f(p_hat) (alpha = 1: with f the identity, plain DR's 1 / p_hat); for w >= 1 / (2 (1 - p_hat)) it
is 1 (alpha = 0, the imputation estimator's weight).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._validation import _as_tensor, _check_float, _check_unit_interval, _number

#: Table 1's designed functions f(p), by name: f(0) = 0, f(1) = 1, increasing, f(p) >= p on
#: (0, 1] ("isotonic") and p / f(p) -> C > 0 as p -> 0 ("same order").
FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda p: p,
    "sin": lambda p: torch.sin(p) / math.sin(1.0),
    "log": lambda p: torch.log1p(p) / math.log(2.0),
    "tanh": lambda p: torch.tanh(p) / math.tanh(1.0),
}


def ddr_propensity(p_hat, w: float = 0.1, f: str = "log") -> Tensor:
    """D-DR's adjusted propensity ``f(p_hat)^alpha`` of every pair, eqs. (2) and (5), in (0, 1].

    ``p_hat``: learned (clipped) propensities in (0, 1], any shape, float32 or float64.
    ``w``: the ratio w2 / w1 of the variance weight to the bias weight in eq. (3), > 0 (the paper:
    0.1).  ``f``: a name of :data:`FUNCTIONS` (Table 1; the paper's experiments: ``"log"``).
    Computed as clamp(2 w (1 - p_hat), f(p_hat), 1), eq. (5') of the module docstring, which equals
    f(p_hat)^alpha with eq. (5)'s alpha; the result is never below p_hat (f(p) >= p) and has the
    dtype, shape and device of ``p_hat``.  Raises ``ValueError`` naming the argument for p_hat
    outside (0, 1] or not finite, w not a finite positive number, or an unknown f.
    """
    p = _as_tensor(p_hat, "p_hat")
    _check_float(p, "p_hat")
    _check_unit_interval(p, "p_hat")
    w = _number(w, "w")
    if not (math.isfinite(w) and w > 0):
        raise ValueError(f"`w` = w2 / w1 (the variance weight over the bias weight, eq. 3) must be a finite positive "
                         f"number; got {w!r} (the paper uses 0.1)")
    if f not in FUNCTIONS:
        raise ValueError(f"`f` must name one of Table 1's functions {tuple(FUNCTIONS)}; got {f!r}")
    fp = FUNCTIONS[f](p)
    # max before min: a rounded f(p) a hair above 1 near p = 1 still gives at most 1
    return torch.maximum(2.0 * w * (1.0 - p), fp).clamp(max=1.0)
