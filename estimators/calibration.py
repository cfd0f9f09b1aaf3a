"""Calibration experts of the Doubly Calibrated Estimator (Kweon and Yu, "Doubly Calibrated
Estimator for Recommendation on Data Missing Not At Random", WWW 2024, arXiv 2403.00817).

Source caveat.  Only the paper's abstract could be read for this toolkit (the full text was not
retrievable); equation numbers are therefore NOT the paper's: the labels (C1)-(C4) below are ours.
What the abstract states: both the imputation and the propensity model are calibrated, by
"calibration experts that consider different logit distributions across users", trained in a
"tri-level joint learning framework" beside the prediction and imputation models.  The form of
the experts (a user-gated mixture of Platt scalers) and the use of a held-out share of the clicked
training pairs as calibration data follow the authors' public DCE-DR code (read, not copied, via
the spec /work/runs/specs/dce_tdr.md of this project); where we depart from that code it is said
below.

(C1) The calibrated probability of a base model with logit ``s`` for a pair of user ``u``::

        pi(u)   = softmax(W f(u) + c)                        (K experts' gate, one per user)
        C(s, u) = sum_k pi_k(u) * sigmoid(a_k s + b_k)       in (0, 1)

    computed in log space, ``log C = logsumexp_k(log pi_k + log sigmoid(a_k s + b_k))`` and
    ``log(1 - C) = logsumexp_k(log pi_k + log sigmoid(-(a_k s + b_k)))``; the calibrated LOGIT
    ``log C - log(1 - C)`` is what the estimators read.  ``a_k = 1`` initially, as in the public
    code; ``b_k`` evenly over ``[beta - 1, beta + 1]`` with ``beta = -1`` for the imputation model
    (the public code: ``b_k = -1`` for every k, see :class:`CalibrationExperts`) and
    ``beta = log rho`` for the propensity model (C3: then ``p_bar`` starts near ``p_hat``).
    Departures from the public code, all deliberate:

    * the gate reads ``f(u)``, the first two moments (mean and standard deviation over all items,
      standardised across users) of the user's logits under the base model
      (:func:`user_logit_moments`), not the base model's user embedding: the abstract's "different
      logit distributions across users" literally, and available for any base model that yields a
      logit table, including the toolkit's propensity model, whose user embedding matters only
      through one scalar (``PropensityModel`` is additive in user and item);
    * the gate is the soft mixture (temperature 1, no Gumbel noise).  The public code samples a
      hard expert per call (Gumbel-softmax at temperature 1e-3); the soft mixture is that sampled
      probability's expectation, deterministic, so a frozen calibrated propensity is one table.
      :func:`gate_log_probs` keeps the Gumbel form for reference.

(C3) Propensity calibration (clicks only, never a conversion label).  ``V`` holds out a share of
    each user's clicked training pairs (:func:`holdout_clicked`); the propensity model is fitted on
    the click matrix WITHOUT them, so for it ``V`` is out of sample.  The calibrator of the
    propensity model then fits ``z = 1[(u, i) in V]`` by the importance-weighted cross-entropy
    over all ``N = n_users * n_items`` pairs, estimated exactly on ``V`` and by ``M`` uniform pairs
    elsewhere (:func:`propensity_calibration_loss`)::

        L_C3 = [ sum_V -log C  +  (N / M) sum_{j <= M} (1 - z_j) (-log(1 - C_j)) ] / |V|

    whose minimiser is ``C = P(z = 1 | u, i) = rho * p(u, i)`` for ``rho`` the held-out share of
    the clicks; the calibrated propensity is ``p_bar = clip(C / rho, gamma, 1)``
    (:func:`calibrated_propensity`).  Departure: the public code draws the same pairs but
    weighs them equally (and applies ``CrossEntropyLoss`` to a 1-D vector of probabilities, a
    softmax across the batch), so its calibrated propensity is ``rho p / (rho p + M / N)``,
    i.e. the click propensity rescaled by the sampling ratio ``M / |V|``; ours estimates ``p``.

(C4) Imputation calibration (conversion labels of ``V`` only).  The calibrator of the imputation
    model minimises the inverse-propensity-weighted cross-entropy of the calibrated imputed
    probability against the conversion labels of the held-out clicked pairs,
    ``L_C4 = sum_V w_bar BCE(C(x_t, u), r) / |V|`` with ``w_bar = 1 / p_bar`` detached
    (:func:`imputation_calibration_loss`).  No validation or test label and no label of an
    unclicked pair is read by either calibrator.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_real(value, name: str, low: float, high: float, *, open_low: bool = True, open_high: bool = False) -> None:
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
          and (low < value if open_low else low <= value) and (value < high if open_high else value <= high))
    if not ok:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ValueError(f"`{name}` must be a finite number in {interval}; got {value!r}")


def gate_log_probs(gate_logits: Tensor, temperature: float = 1.0, gumbel: Optional[Tensor] = None) -> Tensor:
    """(C1) the experts' gate in log space: ``log softmax((log softmax(g) + G) / T)``.

    ``gate_logits`` ``(n, K)``; ``gumbel`` an optional ``(n, K)`` Gumbel(0, 1) sample (the public
    code's hard-expert sampling as ``T -> 0``); with neither, ``log softmax(g)``."""
    _check_real(temperature, "temperature", 0.0, math.inf)
    z = F.log_softmax(gate_logits, dim=-1)
    if gumbel is not None:
        z = z + gumbel
    return F.log_softmax(z / temperature, dim=-1)


def calibrated_log_probs(s: Tensor, log_pi: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(C1) ``(log C, log(1 - C))`` of the mixture of Platt experts for base logits ``s`` ``(n,)``,
    gate log-probabilities ``log_pi`` ``(n, K)`` and expert parameters ``a``, ``b`` ``(K,)``."""
    return calibrated_log_prob(s, log_pi, a, b, True), calibrated_log_prob(s, log_pi, a, b, False)


def calibrated_log_prob(s: Tensor, log_pi: Tensor, a: Tensor, b: Tensor, positive: bool) -> Tensor:
    """(C1) one side of :func:`calibrated_log_probs`: ``log C`` if ``positive`` else ``log(1 - C)``
    (a loss that reads one side costs half the work of both)."""
    z = s.unsqueeze(-1) * a + b
    return torch.logsumexp(log_pi + F.logsigmoid(z if positive else -z), dim=-1)


def calibrated_logit(s: Tensor, log_pi: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """(C1) the calibrated logit ``log C - log(1 - C)``; ``sigmoid`` of it is ``C``."""
    log_c, log_1mc = calibrated_log_probs(s, log_pi, a, b)
    return log_c - log_1mc


@torch.no_grad()
def user_logit_moments(logits: Tensor) -> Tensor:
    """The gate's input ``f(u)`` (C1): per user (row of the ``(n_users, n_items)`` logit table of a
    base model), the mean and standard deviation of the logits over all items, each standardised
    across users (a constant column is left at 0).  Shape ``(n_users, 2)``, float32, detached."""
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.numel() == 0:
        raise ValueError(f"`logits` must be a non-empty (n_users, n_items) tensor; got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("`logits` must be finite (a base model's logits of all pairs)")
    x = logits.to(torch.float64)
    return _standardised(torch.stack([x.mean(dim=1), x.std(dim=1, unbiased=False)], dim=1))


@torch.no_grad()
def mf_logit_moments(users: Tensor, items: Tensor) -> Tensor:
    """:func:`user_logit_moments` of the MF logit table ``users @ items.T`` without forming it:
    the mean ``u . v_bar`` and the second moment ``u^T (V^T V / n_items) u`` per user, in float64
    (``O(n_users d^2)`` instead of ``O(n_users n_items)``)."""
    if not (isinstance(users, Tensor) and isinstance(items, Tensor) and users.dim() == items.dim() == 2
            and users.shape[1] == items.shape[1] and users.numel() > 0 and items.numel() > 0):
        raise ValueError(f"`users` and `items` must be non-empty (n, d) embedding tables of one d; got "
                         f"{getattr(users, 'shape', type(users).__name__)}, {getattr(items, 'shape', type(items).__name__)}")
    u, v = users.to(torch.float64), items.to(torch.float64)
    if not bool(torch.isfinite(u).all() and torch.isfinite(v).all()):
        raise ValueError("`users` and `items` must be finite (the MF model's embeddings)")
    mean = u @ v.mean(dim=0)
    second = ((u @ (v.T @ v / v.shape[0])) * u).sum(dim=1)
    return _standardised(torch.stack([mean, (second - mean ** 2).clamp_min(0.0).sqrt()], dim=1))


def _standardised(f: Tensor) -> Tensor:
    """Each column of the float64 ``(n_users, 2)`` moments standardised across users (a constant
    column left at 0), as float32."""
    sd = f.std(dim=0, unbiased=False)
    f = (f - f.mean(dim=0)) / torch.where(sd > 0, sd, torch.ones_like(sd))
    return f.to(torch.float32)


class CalibrationExperts(nn.Module):
    """(C1) ``K`` Platt experts ``sigmoid(a_k s + b_k)`` mixed by a gate ``softmax(W f(u) + c)``.

    ``forward(s, features)`` maps base logits ``s`` ``(n,)`` and the users' gate features
    ``features`` ``(n, n_features)`` to calibrated logits ``(n,)`` (C1)."""

    def __init__(self, n_features: int, n_experts: int, bias: float = -1.0) -> None:
        super().__init__()
        for name, value in (("n_features", n_features), ("n_experts", n_experts)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}")
        self.gate = nn.Linear(n_features, n_experts)
        self.a = nn.Parameter(torch.ones(n_experts))
        _check_real(bias, "bias", -math.inf, math.inf, open_low=True)
        # b_k spread evenly over [bias - 1, bias + 1] (the public code: b_k = -1 for every k): with the
        # soft gate, experts that start equal stay equal under Adam, whose step size ignores the gate's
        # share of each expert's gradient; the public code's hard per-call expert breaks that tie.
        self.b = nn.Parameter(bias + (torch.linspace(-1.0, 1.0, n_experts) if n_experts > 1 else torch.zeros(1)))

    def log_probs(self, s: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(log C, log(1 - C))`` (C1)."""
        return calibrated_log_probs(s, self.gate_log_probs(features), self.a, self.b)

    def gate_log_probs(self, features: Tensor) -> Tensor:
        """``log pi`` (C1) for the gate features ``features`` ``(n, n_features)``: ``(n, K)``.  Of
        one row per user, it is gathered by the pairs' users instead of recomputed per pair."""
        return gate_log_probs(self.gate(features))

    def log_prob(self, s: Tensor, log_pi: Tensor, positive: bool) -> Tensor:
        """``log C`` if ``positive`` else ``log(1 - C)`` (C1) for base logits ``s`` ``(n,)`` and
        gate log-probabilities ``log_pi`` ``(n, K)`` (:meth:`gate_log_probs`)."""
        return calibrated_log_prob(s, log_pi, self.a, self.b, positive)

    def forward(self, s: Tensor, features: Tensor) -> Tensor:
        log_c, log_1mc = self.log_probs(s, features)
        return log_c - log_1mc


def propensity_calibration_loss(logit_v: Tensor, logit_m: Tensor, z_m: Tensor, n_pairs: int) -> Tensor:
    """(C3) ``[sum_V -log C + (N / M) sum_M (1 - z) (-log(1 - C))] / |V|``.

    ``logit_v``: calibrated logits of the held-out clicked pairs ``V`` (label 1); ``logit_m``: those
    of ``M`` pairs drawn uniformly from all ``N = n_pairs`` pairs, ``z_m`` their 0/1 membership in
    ``V`` (a drawn member of ``V`` adds nothing here: ``V`` is summed exactly in the first term).
    ``N / |V|`` times an unbiased estimate of the mean cross-entropy of ``C`` against
    ``1[(u, i) in V]`` over all pairs, minimised by ``C = P((u, i) in V)``; divided by ``|V|``,
    not ``N``, so that its gradient is of order 1 beside the calibrator's weight decay.
    :func:`propensity_calibration_risk` of ``-log C = softplus(-logit)`` and
    ``-log(1 - C) = softplus(logit)``."""
    if logit_m.shape != z_m.shape or logit_m.numel() == 0:
        raise ValueError(f"`logit_m` and `z_m` must be non-empty and of one shape; got {tuple(logit_m.shape)}, "
                         f"{tuple(z_m.shape)}")
    if logit_v.dim() != 1 or logit_v.numel() == 0:
        raise ValueError(f"`logit_v` must be a non-empty 1-D tensor; got {tuple(logit_v.shape)}")
    return propensity_calibration_risk(F.softplus(-logit_v), F.softplus(logit_m), z_m, n_pairs)


def propensity_calibration_risk(nll_v: Tensor, nll_m: Tensor, z_m: Tensor, n_pairs: int) -> Tensor:
    """(C3) :func:`propensity_calibration_loss` from its two cross-entropy terms: ``nll_v = -log C``
    on ``V`` and ``nll_m = -log(1 - C)`` on the ``M`` drawn pairs (the fit computes each side of
    the mixture only where it is read, :meth:`CalibrationExperts.log_prob`)."""
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, numbers.Integral) or n_pairs < 1:
        raise ValueError(f"`n_pairs` must be a positive integer (n_users * n_items); got {n_pairs!r}")
    if nll_m.shape != z_m.shape or nll_m.numel() == 0:
        raise ValueError(f"`nll_m` and `z_m` must be non-empty and of one shape; got {tuple(nll_m.shape)}, "
                         f"{tuple(z_m.shape)}")
    if not bool(((z_m == 0) | (z_m == 1)).all()):
        raise ValueError("`z_m` (membership of the drawn pairs in V) must hold only 0 and 1")
    if nll_v.dim() != 1 or nll_v.numel() == 0:
        raise ValueError(f"`nll_v` must be a non-empty 1-D tensor; got {tuple(nll_v.shape)}")
    return (nll_v.sum() + (n_pairs / nll_m.numel()) * ((1 - z_m) * nll_m).sum()) / nll_v.numel()


def imputation_calibration_loss(logit_v: Tensor, r_v: Tensor, w_v: Tensor) -> Tensor:
    """(C4) ``sum_V w BCE(C, r) / |V|`` from the calibrated imputation logits ``logit_v`` of the
    held-out clicked pairs, their conversion labels ``r_v`` (0/1) and inverse propensities
    ``w_v = 1 / p_bar`` (detached)."""
    if not (logit_v.shape == r_v.shape == w_v.shape) or logit_v.numel() == 0:
        raise ValueError(f"`logit_v`, `r_v` and `w_v` must be non-empty and of one shape; got "
                         f"{tuple(logit_v.shape)}, {tuple(r_v.shape)}, {tuple(w_v.shape)}")
    if not bool(((r_v == 0) | (r_v == 1)).all()):
        raise ValueError("`r_v` (conversion labels of the held-out clicked pairs) must hold only 0 and 1")
    bce = F.softplus(logit_v) - r_v * logit_v             # -[r log C + (1 - r) log(1 - C)]
    return (w_v.detach() * bce).sum() / logit_v.numel()


def holdout_clicked(users: Tensor, fraction: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """The calibration split ``V``: a boolean mask over the clicked training pairs (their user ids
    ``users``) marking ``min(ceil(fraction * n_u), n_u - 1)`` pairs of each user ``u`` with ``n_u``
    pairs, drawn uniformly at random by ``generator`` (a user's only pair is never held out).  The
    pairs not marked train the propensity, prediction and imputation models."""
    _check_real(fraction, "fraction", 0.0, 1.0, open_high=True)
    if not isinstance(users, Tensor) or users.dim() != 1 or users.dtype != torch.int64:
        raise ValueError("`users` must be a 1-D int64 tensor of the clicked pairs' user ids")
    n = users.numel()
    if n == 0 or int(users.min()) < 0:
        raise ValueError("`users` must be non-empty and hold non-negative user ids")
    order = torch.randperm(n, generator=generator, device=users.device)
    # a random order within each user: sort the shuffled pairs by user, stably
    by_user = order[torch.sort(users[order], stable=True).indices]
    u_sorted = users[by_user]
    counts = torch.bincount(u_sorted)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=users.device) - start[u_sorted]
    k = torch.minimum(torch.ceil(fraction * counts.to(torch.float64)).to(torch.int64), counts - 1)
    mask = torch.zeros(n, dtype=torch.bool, device=users.device)
    mask[by_user[rank < k[u_sorted]]] = True
    return mask


def calibrated_propensity(c: Tensor, rho: float, gamma: float) -> Tensor:
    """(C3) ``p_bar = clip(C / rho, gamma, 1)``: the calibrated click propensity from the
    calibrated probability ``C`` of membership in ``V`` and ``rho = |V| / (|V| + |train|)``."""
    _check_real(rho, "rho", 0.0, 1.0)
    _check_real(gamma, "gamma", 0.0, 1.0)
    return (c / rho).clamp(gamma, 1.0)
