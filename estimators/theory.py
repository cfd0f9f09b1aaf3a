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
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _prep(**named) -> list[Tensor]:
    """The named inputs as tensors of one floating dtype, checked for one shape and finiteness."""
    ts = {name: torch.as_tensor(x) for name, x in named.items()}
    (first, ref), *rest = ts.items()
    dtype = torch.float64
    if ref.is_floating_point():
        dtype = torch.promote_types(ref.dtype, torch.float32)
    for name, t in rest:
        if t.shape != ref.shape:
            raise ValueError(f"`{name}` has shape {tuple(t.shape)} but `{first}` has shape {tuple(ref.shape)}; "
                             "all inputs must describe the same user-item pairs")
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    for name, t in ts.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"`{name}` contains NaN or inf; the closed forms need finite values on every pair")
    return [t.to(dtype) for t in ts.values()]


def _check_prob(x: Tensor, name: str) -> None:
    if not bool(((x > 0) & (x <= 1)).all()):
        raise ValueError(f"`{name}` must lie in (0, 1]; got values in [{float(x.min()):.3g}, {float(x.max()):.3g}]")


def ips_bias(e, p, p_hat) -> Tensor:
    """Table 1, IPS bias (signed): ``(1/|D|) sum (p - p_hat) * e / p_hat``."""
    e, p, p_hat = _prep(e=e, p=p, p_hat=p_hat)
    _check_prob(p, "p"), _check_prob(p_hat, "p_hat")
    return ((p - p_hat) * e / p_hat).mean()


def ips_variance(e, p, p_hat) -> Tensor:
    """Table 1, IPS variance: ``|D|^-2 sum p (1 - p) e^2 / p_hat^2``."""
    e, p, p_hat = _prep(e=e, p=p, p_hat=p_hat)
    _check_prob(p, "p"), _check_prob(p_hat, "p_hat")
    return (p * (1 - p) * e**2 / p_hat**2).sum() / e.numel() ** 2


def dr_bias(e, e_hat, p, p_hat) -> Tensor:
    """Table 1, DR bias (signed): ``(1/|D|) sum (p - p_hat) * (e - e_hat) / p_hat``."""
    e, e_hat, p, p_hat = _prep(e=e, e_hat=e_hat, p=p, p_hat=p_hat)
    _check_prob(p, "p"), _check_prob(p_hat, "p_hat")
    return ((p - p_hat) * (e - e_hat) / p_hat).mean()


def dr_variance(e, e_hat, p, p_hat) -> Tensor:
    """Table 1, DR variance: ``|D|^-2 sum p (1 - p) (e - e_hat)^2 / p_hat^2``."""
    e, e_hat, p, p_hat = _prep(e=e, e_hat=e_hat, p=p, p_hat=p_hat)
    _check_prob(p, "p"), _check_prob(p_hat, "p_hat")
    return (p * (1 - p) * (e - e_hat) ** 2 / p_hat**2).sum() / e.numel() ** 2


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"`delta` is the failure probability of the bound and must lie in (0, 1); got {delta}")
    return delta


def ips_generalization_bound(e, p_hat, delta: float) -> Tensor:
    """Table 1, IPS: with probability >= 1 - delta, ``|L_IPS - E_O[L_IPS]|`` is at most
    ``sqrt(log(2/delta) / (2 |D|^2) * sum (e / p_hat)^2)`` (Hoeffding)."""
    delta = _check_delta(delta)
    e, p_hat = _prep(e=e, p_hat=p_hat)
    _check_prob(p_hat, "p_hat")
    return torch.sqrt(math.log(2 / delta) / (2 * e.numel() ** 2) * ((e / p_hat) ** 2).sum())


def dr_generalization_bound(e, e_hat, p_hat, delta: float) -> Tensor:
    """Table 1, DR: with probability >= 1 - delta, ``|L_DR - E_O[L_DR]|`` is at most
    ``sqrt(log(2/delta) / (2 |D|^2) * sum ((e - e_hat) / p_hat)^2)`` (Hoeffding)."""
    delta = _check_delta(delta)
    e, e_hat, p_hat = _prep(e=e, e_hat=e_hat, p_hat=p_hat)
    _check_prob(p_hat, "p_hat")
    return torch.sqrt(math.log(2 / delta) / (2 * e.numel() ** 2) * (((e - e_hat) / p_hat) ** 2).sum())


def _badr_moments(e: Tensor, e_hat: Tensor, p: Tensor, p_hat: Tensor):
    """Per batch: E[W] = sum p/p_hat, and R = E[N] / E[W] with N = sum e_hat + sum o (e - e_hat)/p_hat."""
    if e.dim() not in (1, 2):
        raise ValueError(f"BADR inputs must be 1-D (one batch) or 2-D (K, B); got shape {tuple(e.shape)}")
    _check_prob(p, "p"), _check_prob(p_hat, "p_hat")
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
    e, e_hat, p, p_hat = _prep(e=e, e_hat=e_hat, p=p, p_hat=p_hat)
    delta, q, mean_w, ratio = _badr_moments(e, e_hat, p, p_hat)
    if variant == "paper":
        weighted = (q * delta).sum(dim=-1, keepdim=True) / mean_w
        return (weighted - delta).mean(dim=-1).mean()
    if variant != "corrected":
        raise ValueError(f"`variant` must be 'corrected' or 'paper'; got {variant!r}")
    var_o = p * (1 - p)
    cov_nw = (var_o * delta / p_hat**2).sum(dim=-1, keepdim=True)
    var_w = (var_o / p_hat**2).sum(dim=-1, keepdim=True)
    expected = ratio - cov_nw / mean_w**2 + var_w * ratio / mean_w**2
    return (expected.squeeze(-1) - e.mean(dim=-1)).mean()


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
    e, e_hat, p, p_hat = _prep(e=e, e_hat=e_hat, p=p, p_hat=p_hat)
    delta, q, mean_w, ratio = _badr_moments(e, e_hat, p, p_hat)
    if variant == "paper":
        h = delta - (q * delta).sum(dim=-1, keepdim=True) / mean_w
    elif variant == "corrected":
        h = delta - ratio
    else:
        raise ValueError(f"`variant` must be 'corrected' or 'paper'; got {variant!r}")
    per_batch = (p * (1 - p) * h**2 / p_hat**2).sum(dim=-1) / mean_w.squeeze(-1) ** 2
    return per_batch.sum() / per_batch.numel() ** 2
