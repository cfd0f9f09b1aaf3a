"""Matrix completion of the observed ratings (BADR paper, Section 4.8, step 1 of MRDR's protocol).

Biased matrix factorisation ``r_hat = mu + b_u + c_i + p_u . q_i`` fitted by alternating
least squares with weighted-lambda ridge (each row's penalty scales with its number of
ratings).  Every half step solves all rows at once: the Gram matrices are one sparse
product of the rating indicator with the rows' outer products, then one batched solve.
Deterministic for a given generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class Factorisation:
    """Fitted ``r_hat[u, i] = mu + user_bias[u] + item_bias[i] + user_factors[u] . item_factors[i]``."""

    mu: float
    user_factors: np.ndarray
    user_bias: np.ndarray
    item_factors: np.ndarray
    item_bias: np.ndarray

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Predicted ratings of the given (user, item) pairs."""
        return (self.mu + self.user_bias[users] + self.item_bias[items]
                + np.einsum("nk,nk->n", self.user_factors[users], self.item_factors[items]))

    def complete(self) -> np.ndarray:
        """The full completed score matrix, shape (n_users, n_items)."""
        return (self.mu + self.user_bias[:, None] + self.item_bias[None, :]
                + self.user_factors @ self.item_factors.T)


def _half_step(rows: np.ndarray, cols: np.ndarray, targets: np.ndarray, other: np.ndarray,
               n_rows: int, reg: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge-solve ``[factors, bias]`` of every row against the fixed ``[other, 1]`` features."""
    features = np.hstack([other, np.ones((len(other), 1))])
    width = features.shape[1]
    outer = (features[:, :, None] * features[:, None, :]).reshape(len(features), -1)
    shape = (n_rows, len(features))
    indicator = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=shape)
    counts = np.maximum(np.bincount(rows, minlength=n_rows), 1)
    gram = (indicator @ outer).reshape(n_rows, width, width) + reg * counts[:, None, None] * np.eye(width)
    rhs = sp.csr_matrix((targets, (rows, cols)), shape=shape) @ features
    solution = np.linalg.solve(gram, rhs[:, :, None])[:, :, 0]
    return solution[:, :-1], solution[:, -1]


def fit_mf(users: np.ndarray, items: np.ndarray, ratings: np.ndarray, shape: tuple[int, int],
           rng: np.random.Generator, rank: int = 10, reg: float = 0.1, n_iter: int = 15
           ) -> Factorisation:
    """Fit biased MF by ALS on 0-based (user, item, rating) triples."""
    n_users, n_items = shape
    ratings = ratings.astype(np.float64)
    mu = float(ratings.mean())
    item_factors = rng.normal(0.0, 0.1, (n_items, rank))
    item_bias = np.zeros(n_items)
    for _ in range(n_iter):
        user_factors, user_bias = _half_step(users, items, ratings - mu - item_bias[items],
                                             item_factors, n_users, reg)
        item_factors, item_bias = _half_step(items, users, ratings - mu - user_bias[users],
                                             user_factors, n_items, reg)
    return Factorisation(mu, user_factors, user_bias, item_factors, item_bias)


def complete_ratings(users: np.ndarray, items: np.ndarray, ratings: np.ndarray,
                     shape: tuple[int, int], rng: np.random.Generator, rank: int = 10,
                     heldout_frac: float = 0.05) -> tuple[np.ndarray, float]:
    """Completed score matrix and the held-out RMSE.

    A random ``heldout_frac`` of the ratings is held out to measure the RMSE of a fit on
    the rest; the returned matrix comes from a refit on all ratings (same initialisation).
    """
    perm = rng.permutation(len(ratings))
    init = int(rng.integers(2**63))
    n_heldout = int(round(heldout_frac * len(ratings)))
    heldout, train = perm[:n_heldout], perm[n_heldout:]
    model = fit_mf(users[train], items[train], ratings[train], shape, np.random.default_rng(init), rank)
    rmse = float(np.sqrt(np.mean((model.predict(users[heldout], items[heldout]) - ratings[heldout]) ** 2)))
    full = fit_mf(users, items, ratings, shape, np.random.default_rng(init), rank)
    return full.complete(), rmse
