"""Imputation-model training losses (BADR paper eqs. 6, 8, 9, 10 and 32; TDR-CL's (C1)).

Same contract as :mod:`estimators.loss` (``e`` ignored where ``o = 0``, 1-D = one batch,
2-D ``(K, B)`` = mean of the K per-batch values).  Each loss is a function of ``e_hat`` to be
minimised over the imputation model; the gradient flows into ``e_hat`` (and ``e``).

The loss between imputed and observed error in eq. (6) is the squared error
``(e_hat - e)^2``, as in the joint-learning code the DR baselines share.  Eqs. (8)-(10) are sums
over the batch, eq. (6) a mean, exactly as the paper writes them.

``p_hat`` is read only where ``o = 1`` (an unclicked pair's term is exactly 0, with zero gradient),
and there it must be at least :func:`estimators._validation.p_hat_floor` ``(dtype, k)`` for the
highest power ``k`` of ``1 / p_hat`` the loss forms (eq. 6: k = 1; eqs. 8 and 32: k = 2; eqs. 9 and
10: k = 3; TDR-CL's (C1): k = 2, in its ``sum h^2``); smaller propensities raise ``ValueError``.
The gradient of ``x / p_hat**k`` in ``p_hat`` is formed as ``-k (x / p_hat**k) / p_hat``, so no
intermediate, in the value or in a gradient, goes beyond ``(1 / p_hat)^(k + 1)``.

``reduction`` (keyword) is that of :mod:`estimators.loss`: under ``torch.distributed``, the
per-batch sums, counts, eq. (32)'s normaliser and estimate and TDR-CL's ``eps_hat`` are the global
batch's (all-reduced; eq. 32's gradient-carrying sum through a differentiable all-reduce) and the
value is this rank's share, scaled for DDP's mean (:mod:`estimators.distributed`).
"""
from __future__ import annotations

from torch import Tensor

from ._validation import check_alpha, check_batch
from .distributed import Reduction, resolve
from .loss import _divided_by_power, _dr_terms
from .targeting import clever_covariate, targeting_epsilon


def _batch_sum(per_pair: Tensor, reduction: Reduction) -> Tensor:
    """Sum over each batch, then the mean over batches."""
    return reduction.share(per_pair.sum(dim=-1).mean())


def dr_imputation_loss(e, e_hat, o, p_hat, *, reduction: str | Reduction = "global") -> Tensor:
    """DR / DR-JL imputation loss, eq. (6): ``(1/|D|) sum o * (e_hat - e)^2 / p_hat``.

    ``p_hat >= p_hat_floor(dtype, 1)`` where ``o = 1`` (2.2e-16 in float32, 1e-146 in float64)."""
    o, e, e_hat, p_hat = check_batch(o, e=e, e_hat=e_hat, p_hat=p_hat, p_hat_power=1)
    return resolve(reduction).batch_mean(o * (e_hat - e) ** 2 / p_hat)


def _mrdr(e: Tensor, e_hat: Tensor, o: Tensor, p_hat: Tensor, reduction: Reduction) -> Tensor:
    return _batch_sum(_divided_by_power(o * (1 - p_hat) * (e_hat - e) ** 2, p_hat, 2), reduction)


def _dr_bias(e: Tensor, e_hat: Tensor, o: Tensor, p_hat: Tensor, reduction: Reduction) -> Tensor:
    return _batch_sum(_divided_by_power(o * (o - p_hat) ** 2 * (e_hat - e) ** 2, p_hat, 3), reduction)


def mrdr_imputation_loss(e, e_hat, o, p_hat, *, reduction: str | Reduction = "global") -> Tensor:
    """MRDR imputation loss, eq. (8): ``sum o * (1 - p_hat) * (e_hat - e)^2 / p_hat^2``.

    ``p_hat >= p_hat_floor(dtype, 2)`` where ``o = 1`` (5.8e-11 in float32, 5.9e-98 in float64)."""
    o, e, e_hat, p_hat = check_batch(o, e=e, e_hat=e_hat, p_hat=p_hat, p_hat_power=2)
    return _mrdr(e, e_hat, o, p_hat, resolve(reduction))


def dr_bias_imputation_loss(e, e_hat, o, p_hat, *, reduction: str | Reduction = "global") -> Tensor:
    """DR-BIAS imputation loss, eq. (9): ``sum o * (o - p_hat)^2 * (e_hat - e)^2 / p_hat^3``.

    ``p_hat >= p_hat_floor(dtype, 3)`` where ``o = 1`` (1.5e-8 in float32, 1.4e-73 in float64)."""
    o, e, e_hat, p_hat = check_batch(o, e=e, e_hat=e_hat, p_hat=p_hat, p_hat_power=3)
    return _dr_bias(e, e_hat, o, p_hat, resolve(reduction))


def dr_mse_imputation_loss(e, e_hat, o, p_hat, alpha: float = 0.5, *,
                           reduction: str | Reduction = "global") -> Tensor:
    """DR-MSE imputation loss, eq. (10): ``alpha * eq.(9) + (1 - alpha) * eq.(8)``, alpha in [0, 1].

    ``p_hat >= p_hat_floor(dtype, 3)`` where ``o = 1`` (1.5e-8 in float32, 1.4e-73 in float64)."""
    alpha = check_alpha(alpha)
    o, e, e_hat, p_hat = check_batch(o, e=e, e_hat=e_hat, p_hat=p_hat, p_hat_power=3)
    red = resolve(reduction)
    return alpha * _dr_bias(e, e_hat, o, p_hat, red) + (1 - alpha) * _mrdr(e, e_hat, o, p_hat, red)


def tdr_cl_imputation_loss(e, e_hat, o, p_hat, *, reduction: str | Reduction = "global") -> Tensor:
    """TDR-CL imputation loss (C1), eq. (6) with the targeted error:
    ``(1/|D|) sum o * (e - e_hat - eps_hat h)^2 / p_hat``, ``h = 1 / p_hat - 1``.

    Li, Lyu, Zheng, Wu, ICLR 2023, Sec. 5 (collaborative learning), our reconstruction.  The
    paper's stated idea (abstract): the imputed error is decomposed into a parametric and a
    nonparametric part, updated collaboratively.  Our reading: the imputed error is
    ``e_tilde = e_hat + eps h`` (:mod:`estimators.targeting` (T2)), ``e_hat`` the imputation model
    (nonparametric part), ``eps h`` TDR's one-parameter targeting term (parametric part), fitted in
    turn.  Given ``eps_hat`` (T3) (OLS of ``e - e_hat`` on ``h`` over the clicked pairs of each batch,
    computed here in closed form and detached; 0 where ``sum h^2 = 0``), the imputation model
    minimises DR-JL's loss (eq. 6) with ``e_tilde`` in place of ``e_hat``: it learns the part of the
    error the targeting term does not explain.  The weights (eq. 6's ``1 / p_hat``) and the mean
    over D follow eq. (6); the exact form of the paper's CL update is not verified.

    The gradient flows into ``e`` and ``e_hat`` with ``eps_hat`` held fixed.  ``p_hat >=
    p_hat_floor(dtype, 2)`` where ``o = 1`` (5.8e-11 in float32, 5.9e-98 in float64: ``sum h^2``
    forms ``1 / p_hat^2``).  A batch without clicks gives 0 (``eps_hat = 0``, every term masked).
    """
    o, e, e_hat, p_hat = check_batch(o, e=e, e_hat=e_hat, p_hat=p_hat, p_hat_power=2)
    red = resolve(reduction)
    residual = o * (e - e_hat)
    h = clever_covariate(p_hat)  # 0 where o = 0: check_batch set p_hat = 1 there
    return red.batch_mean(o * (residual - targeting_epsilon(residual, h, red) * h) ** 2 / p_hat)


def badr_imputation_loss(e, e_hat, o, p_hat, *, reduction: str | Reduction = "global") -> Tensor:
    """BADR imputation loss: the delta-method variance of eq. (32), Theorem 3.5.

    Per batch, with ``w = o / p_hat``, ``E_hat = sum e_hat / sum w`` and ``L`` the BADR
    estimate of eq. (13)::

        sum w^2 * (e - e_hat + E_hat - L)^2  /  (sum w)^2

    The gradient flows through ``e_hat`` everywhere (also through ``E_hat`` and ``L``, where it
    cancels: ``E_hat - L = -sum w (e - e_hat) / sum w``).  ``p_hat >= p_hat_floor(dtype, 2)``
    where ``o = 1`` (5.8e-11 in float32, 5.9e-98 in float64: ``w^2`` is ``1 / p_hat^2``).  Raises
    ``ValueError`` for a batch without clicks.
    """
    red = resolve(reduction)
    o, e, e_hat, p_hat = check_batch(o, e=e, e_hat=e_hat, p_hat=p_hat, need_click=True, p_hat_power=2, across=red)
    w = o / p_hat
    # The three per-batch sums, global across ranks (the last two carry the gradient in e_hat).
    sum_w, sum_e_hat, sum_dr = red.total(w.sum(dim=-1, keepdim=True), e_hat.sum(dim=-1, keepdim=True),
                                         _dr_terms(e, e_hat, o, p_hat).sum(dim=-1, keepdim=True))
    e_hat_mean = sum_e_hat / sum_w
    estimate = sum_dr / sum_w
    return red.share(((w**2 * (e - e_hat + e_hat_mean - estimate) ** 2).sum(dim=-1) / sum_w.squeeze(-1) ** 2).mean())
