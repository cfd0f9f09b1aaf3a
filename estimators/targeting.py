"""The targeting step of TDR (Li, Lyu, Zheng, Wu, "TDR-CL: Targeted Doubly Robust Collaborative
Learning for Debiased Recommendations", ICLR 2023, arXiv 2203.10258), shared by the imputation
loss ``tdr_cl`` in its two forms (:func:`estimators.imputation.tdr_cl_imputation_loss` and
:func:`estimators.joint_loss.tdr_cl_imputation_step`).

The paper's method section could not be read for this toolkit; what is written here comes from
its abstract (targeted learning "combines the small-bias property of DR and the small-variance
property of EIB") and from the public TDR code lineage (``MF_TDR`` / ``MF_TDR_JL``), whose
targeting regression it follows exactly.  Equation labels (T1)-(T3) are ours, not the paper's
numbers ("TDR-CL Sec. 4, our reading").  In toolkit notation (``e`` prediction error, ``e_hat``
imputed error, ``o`` click, ``p_hat`` clipped learned propensity)::

    h       = 1 / p_hat - 1 = (1 - p_hat) / p_hat                                   (T1)
    e_tilde = e_hat + eps * h           (a one-parameter fluctuation of e_hat)      (T2)
    eps_hat = argmin_eps sum_{o=1} (e - e_hat - eps h)^2
            = sum_{o=1} h (e - e_hat) / sum_{o=1} h^2                               (T3)

(T3) is least squares WITHOUT weights and WITHOUT intercept, over the clicked pairs only (public
code: ``TMLE_beta = inv_prop - 1``, ``TMLE_alpha = e - e_hat``).  Its normal equation,
``sum_{o=1} h (e - e_tilde) = 0``, is the empirical DR bias term ``sum_{o=1} (1 - p_hat) / p_hat
(e - e_hat)`` evaluated at ``e_tilde``: with the targeted error in place of ``e_hat`` the DR
estimator (BADR eq. 7) equals EIB (eq. 5).  When every ``h`` is 0 (all ``p_hat = 1``) the
regression is undetermined and ``eps_hat = 0`` (no fluctuation).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .distributed import Reduction


def clever_covariate(p_hat: Tensor) -> Tensor:
    """(T1) ``h = 1 / p_hat - 1``, the direction of TDR's fluctuation; ``>= 0`` for ``p_hat`` in
    (0, 1], 0 where ``p_hat = 1``.  ``p_hat`` is the clipped propensity that also forms ``w``."""
    return 1.0 / p_hat - 1.0


def targeting_epsilon(residual: Tensor, h: Tensor, reduction: Optional[Reduction] = None) -> Tensor:
    """(T3) ``eps_hat = sum h * residual / sum h^2`` along the last axis, DETACHED.

    ``residual`` is ``e - e_hat`` and ``h`` the clever covariate (T1) on the pairs the regression
    runs over; a pair with ``h = 0`` and ``residual = 0`` (an unclicked pair, masked by the caller)
    adds nothing.  Returns shape ``residual.shape[:-1] + (1,)`` (one ``eps_hat`` per batch, ready
    to broadcast), 0 for a batch whose ``sum h^2`` is 0.  Detached: eps is a fitted nuisance
    parameter, held fixed in the loss it enters (the public code takes ``.item()``).  With an
    active ``reduction`` (:mod:`estimators.distributed`) both sums are the global batch's.
    """
    residual, h = residual.detach(), h.detach()
    num = (h * residual).sum(dim=-1, keepdim=True)
    den = (h * h).sum(dim=-1, keepdim=True)
    if reduction is not None:
        num, den = reduction.total(num, den)
    fitted = den > 0
    return torch.where(fitted, num / torch.where(fitted, den, torch.ones_like(den)), torch.zeros_like(den))
