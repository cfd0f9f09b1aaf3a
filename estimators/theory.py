"""Closed-form bias, variance and generalisation bounds (BADR paper Table 1, Theorems 3.1-3.2).

These take the true propensities ``p`` besides the learned ``p_hat``, and treat ``e`` and
``e_hat`` as fixed (the randomness is o ~ Bernoulli(p), independent across pairs).  Bias is
signed, ``E[L] - L_ideal``; the paper's Table 1 prints ``(p_hat - p) ...``, i.e. the opposite sign
(its Theorems take absolute values).

ESCM2's Lemma 2 (bias and variance of the IPS regulariser) and Lemma 3 (of the DR regulariser)
are these same quantities with ``p`` the true click-through rate and ``p_hat`` the CTR tower's
output: use :func:`ips_bias`, :func:`ips_variance`, :func:`dr_bias` and :func:`dr_variance`.

IPS and DR functions accept any shape (they average over all pairs ``D``); the BADR
functions take one batch ``(B,)`` or ``K`` batches ``(K, B)`` like :func:`estimators.badr`.

Inputs are tensors or array-likes of real numbers on one device, of one shape, non-empty and
finite, with ``p`` in (0, 1] and ``p_hat`` in (0, 1] and at least
:func:`estimators._validation.p_hat_floor` ``(dtype, k)`` on every pair, ``k``
the highest power of ``1 / p_hat`` the formula forms (biases: k = 1; variances, bounds and the
BADR functions: k = 2; e.g. 1e-146 / 5.9e-98 in float64, 2.2e-16 / 5.8e-11 in float32); bad
input raises ``ValueError`` naming the argument.  Integer input is computed in float64, float16
and bfloat16 in float32.  The gradient of ``x / p_hat**2`` in ``p_hat`` is formed as
``-2 (x / p_hat**2) / p_hat``, so no intermediate, in the value or a gradient, goes beyond
``(1 / p_hat)^(k + 1)``.  The BADR functions divide by the batch's expected click weight
``E[W] = sum p / p_hat`` up to three times and raise ``ValueError`` where that overflows the
dtype (a tiny ``p`` on every pair of a batch, e.g. ``p = 1e-300``) instead of returning inf or
NaN.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._validation import check_closed_form, check_delta, check_finite_result
from .loss import _divided_by_power


def ips_bias(e, p, p_hat) -> Tensor:
    """Table 1, IPS bias (signed): ``(1/|D|) sum (p - p_hat) * e / p_hat``."""
    e, p, p_hat = check_closed_form(e=e, p=p, p_hat=p_hat, p_hat_power=1)
    return ((p - p_hat) * e / p_hat).mean()


def ips_variance(e, p, p_hat) -> Tensor:
    """Table 1, IPS variance: ``|D|^-2 sum p (1 - p) e^2 / p_hat^2``."""
    e, p, p_hat = check_closed_form(e=e, p=p, p_hat=p_hat, p_hat_power=2)
    return _divided_by_power(p * (1 - p) * e**2, p_hat, 2).sum() / e.numel() ** 2


def dr_bias(e, e_hat, p, p_hat) -> Tensor:
    """Table 1, DR bias (signed): ``(1/|D|) sum (p - p_hat) * (e - e_hat) / p_hat``."""
    e, e_hat, p, p_hat = check_closed_form(e=e, e_hat=e_hat, p=p, p_hat=p_hat, p_hat_power=1)
    return ((p - p_hat) * (e - e_hat) / p_hat).mean()


def dr_variance(e, e_hat, p, p_hat) -> Tensor:
    """Table 1, DR variance: ``|D|^-2 sum p (1 - p) (e - e_hat)^2 / p_hat^2``."""
    e, e_hat, p, p_hat = check_closed_form(e=e, e_hat=e_hat, p=p, p_hat=p_hat, p_hat_power=2)
    return _divided_by_power(p * (1 - p) * (e - e_hat) ** 2, p_hat, 2).sum() / e.numel() ** 2


def ips_generalization_bound(e, p_hat, delta: float) -> Tensor:
    """Table 1, IPS: with probability >= 1 - delta, ``|L_IPS - E_O[L_IPS]|`` is at most
    ``sqrt(log(2/delta) / (2 |D|^2) * sum (e / p_hat)^2)`` (Hoeffding); its gradient is 0, not NaN,
    where every ``e`` is 0."""
    delta = check_delta(delta)
    e, p_hat = check_closed_form(e=e, p_hat=p_hat, p_hat_power=2)
    return _sqrt(math.log(2 / delta) / (2 * e.numel() ** 2), ((e / p_hat) ** 2).sum())


def dr_generalization_bound(e, e_hat, p_hat, delta: float) -> Tensor:
    """Table 1, DR: with probability >= 1 - delta, ``|L_DR - E_O[L_DR]|`` is at most
    ``sqrt(log(2/delta) / (2 |D|^2) * sum ((e - e_hat) / p_hat)^2)`` (Hoeffding); its gradient is
    0, not NaN, where ``e = e_hat`` on every pair."""
    delta = check_delta(delta)
    e, e_hat, p_hat = check_closed_form(e=e, e_hat=e_hat, p_hat=p_hat, p_hat_power=2)
    return _sqrt(math.log(2 / delta) / (2 * e.numel() ** 2), (((e - e_hat) / p_hat) ** 2).sum())


def _sqrt(c: float, x: Tensor) -> Tensor:
    """``sqrt(c * x)`` for ``x >= 0``, with gradient 0 (not ``inf * 0 = NaN``) at ``x = 0``."""
    positive = x > 0
    safe = torch.where(positive, x, torch.ones_like(x))
    return torch.where(positive, torch.sqrt(c * safe), torch.zeros_like(x))


def _check_variant(variant) -> None:
    if variant not in ("corrected", "paper"):
        raise ValueError(f"`variant` must be 'corrected' or 'paper'; got {variant!r}")


def _badr_moments(e: Tensor, e_hat: Tensor, p: Tensor, p_hat: Tensor):
    """Per batch: E[W] = sum p/p_hat, and R = E[N] / E[W] with N = sum e_hat + sum o (e - e_hat)/p_hat."""
    delta = e - e_hat
    q = p / p_hat
    mean_w = q.sum(dim=-1, keepdim=True)
    ratio = (e_hat.sum(dim=-1, keepdim=True) + (q * delta).sum(dim=-1, keepdim=True)) / mean_w
    return delta, q, mean_w, ratio


def badr_bias(e, e_hat, p, p_hat, *, variant: str = "corrected") -> Tensor:
    """Leading-order bias of the BADR estimator (eq. 13), signed, averaged over batches.

    ``variant="corrected"`` (default) expands the ratio N / W of the batch numerator
    ``N = sum e_hat + sum o (e - e_hat) / p_hat`` and normaliser ``W = sum o / p_hat`` to second
    order (eq. 20): ``E[N]/E[W] - Cov(N, W)/E[W]^2 + Var(W) E[N]/E[W]^3 - mean(e)``.  Its first-order
    part is ``sum e_hat / sum(p/p_hat) + weighted mean of delta - mean(e)``: when ``p_hat = p`` it is
    zero and the remaining bias is O(1/B); when ``e_hat = e`` it is ``mean(e) * (B / sum(p/p_hat) - 1)``,
    which does not vanish as B grows (the estimator is then the ideal batch loss times a
    positive factor, as the Remark after Theorem 3.2 says, not unbiased).

    ``variant="paper"`` is Theorem 3.1 as printed, eq. (16) without the absolute value and with
    this module's sign: ``sum(p/p_hat * delta) / sum(p/p_hat) - mean(delta)`` per batch.  It treats
    ``E_hat = sum e_hat / sum o/p_hat`` as a constant and so misses the ``e_hat`` term above.
    """
    _check_variant(variant)
    e, e_hat, p, p_hat = check_closed_form(e=e, e_hat=e_hat, p=p, p_hat=p_hat, p_hat_power=2, batched=True)
    delta, q, mean_w, ratio = _badr_moments(e, e_hat, p, p_hat)
    if variant == "paper":
        weighted = (q * delta).sum(dim=-1, keepdim=True) / mean_w
        return check_finite_result((weighted - delta).mean(dim=-1).mean(), "badr_bias")
    var_o = p * (1 - p)
    cov_nw = _divided_by_power(var_o * delta, p_hat, 2).sum(dim=-1, keepdim=True)
    var_w = _divided_by_power(var_o, p_hat, 2).sum(dim=-1, keepdim=True)
    expected = ratio - cov_nw / mean_w**2 + var_w * ratio / mean_w**2
    return check_finite_result((expected.squeeze(-1) - e.mean(dim=-1)).mean(), "badr_bias")


def badr_variance(e, e_hat, p, p_hat, *, variant: str = "corrected") -> Tensor:
    """Leading-order variance of the BADR estimator (eq. 13), Theorem 3.2.

    For K batches ``(K, B)`` it is ``(1/K^2) sum_k V_k`` with, per batch (delta method),
    ``V_k = sum p (1 - p) h^2 / p_hat^2  /  (sum p / p_hat)^2``.

    ``variant="corrected"`` (default): ``h = e - e_hat - R`` with ``R = E[N] / E[W]`` the batch's
    first-order mean (see :func:`badr_bias`); this is the delta-method variance of N / W.
    ``variant="paper"``: ``h`` of eq. (26), ``e - e_hat - sum(p/p_hat (e - e_hat)) / sum(p/p_hat)``,
    which treats ``E_hat`` as a constant; it agrees with the corrected form only when
    ``sum e_hat = 0`` over the batch (e.g. SNIPS, ``e_hat = 0``).
    """
    _check_variant(variant)
    e, e_hat, p, p_hat = check_closed_form(e=e, e_hat=e_hat, p=p, p_hat=p_hat, p_hat_power=2, batched=True)
    delta, q, mean_w, ratio = _badr_moments(e, e_hat, p, p_hat)
    if variant == "paper":
        h = delta - (q * delta).sum(dim=-1, keepdim=True) / mean_w
    else:
        h = delta - ratio
    per_batch = _divided_by_power(p * (1 - p) * h**2, p_hat, 2).sum(dim=-1) / mean_w.squeeze(-1) ** 2
    return check_finite_result(per_batch.sum() / per_batch.numel() ** 2, "badr_variance")
