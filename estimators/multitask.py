"""Entire-space multi-task losses: ESMM and ESCM2 (ESCM2 paper, Sections II-C and IV).

A CTR tower gives ``o_hat = sigmoid(a)``, a CVR tower ``r_hat = sigmoid(b)`` and, for ESCM2-DR,
an imputation tower the imputed CVR error ``delta_hat``.  Over a batch of exposed pairs with
click indicators ``o`` and conversion labels ``r`` (NaN allowed where ``o = 0``):

- ``L_CTR   = mean BCE(o_hat, o)``                                            eq. (35)
- ``L_CTCVR = mean BCE(o_hat * r_hat, o * r)``                                eq. (5)
- ``R_IPS   = mean o * delta / o_hat``                                        eq. (21)
- ``R_DR    = mean [delta_hat + o (delta - delta_hat) / o_hat]
             + mean o (delta - delta_hat)^2 / o_hat``                         eqs. (23), (25), (26)
- ``L = L_CTR + lambda_c * R + lambda_g * L_CTCVR``                           eq. (34)

with ``delta = BCE(r_hat, r)``.  ESMM is ``regulariser=None`` (no CVR term).  As in the
propensity-weighted estimators of :mod:`estimators.loss`, the CTR estimate enters the
regulariser clipped to ``[gamma, 1]`` and DETACHED: the CTR tower is trained by ``L_CTR`` and
``L_CTCVR`` only (a port that leaves the weights attached lets the CVR regulariser push CTR
estimates up to shrink its own weights).  Likewise ``delta_hat`` is detached in ``R_DR^err`` and
trained by ``R_DR^imp`` alone, as in joint learning.  The model with the three towers is
:class:`estimators.training.models.ESCM2`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validation import check_escm2

REGULARISERS = (None, "ips", "dr")


def _bce_of_product(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """BCE of ``sigmoid(a) * sigmoid(b)`` against ``t``, in log space (finite for logits of +-40)."""
    log_p = F.logsigmoid(a) + F.logsigmoid(b)
    # log(1 - p) = log(-expm1(log p)); the clamp keeps p = 1 (float rounding) finite
    log_not_p = torch.log((-torch.expm1(log_p)).clamp_min(torch.finfo(a.dtype).tiny))
    return -(t * log_p + (1 - t) * log_not_p)


def escm2_loss(
    ctr_logit: Tensor,
    cvr_logit: Tensor,
    o,
    r,
    *,
    regulariser: Optional[str] = "ips",
    delta_hat: Optional[Tensor] = None,
    gamma: float = 0.05,
    lambda_c: float = 0.1,
    lambda_g: float = 1.0,
) -> dict[str, Tensor]:
    """ESMM / ESCM2 training loss, eq. (34), over one batch of exposed pairs.

    Returns a dict with ``loss`` (to minimise) and its parts ``ctr``, ``ctcvr`` and ``cvr``
    (the regulariser, 0 for ESMM).  ``regulariser`` is ``None`` (ESMM), ``"ips"`` (ESCM2-IPS,
    eq. 21) or ``"dr"`` (ESCM2-DR, eq. 26, needs ``delta_hat``; ignored otherwise).

    ``ctr_logit``, ``cvr_logit``, ``r`` and ``delta_hat`` are float32 or float64 tensors of one
    dtype and of ``o``'s shape (1-D, or 2-D for K batches: the means run over all pairs); the
    logits and ``delta_hat`` must be finite, ``o`` is 0/1 and ``r`` is 0/1 where ``o = 1`` and may
    be anything (NaN included) where ``o = 0``, where it reaches neither the value nor a gradient.
    ``gamma`` lies in (0, 1] (at least 2.2e-16 in float32, 1e-146 in float64: the regulariser
    divides by it), ``lambda_c`` and ``lambda_g`` are finite and >= 0.  Bad input raises
    ``ValueError`` naming the argument.
    """
    if regulariser not in REGULARISERS:
        raise ValueError(f"`regulariser` must be one of {REGULARISERS}; got {regulariser!r}")
    if regulariser == "dr" and delta_hat is None:
        raise ValueError("regulariser='dr' (ESCM2-DR) needs `delta_hat`, the imputation tower's output")
    ctr_logit, cvr_logit, o_t, r_t, delta_hat, gamma, lambda_c, lambda_g = check_escm2(
        ctr_logit, cvr_logit, o, r, delta_hat if regulariser == "dr" else None,
        gamma=gamma, lambda_c=lambda_c, lambda_g=lambda_g)
    ctr = F.binary_cross_entropy_with_logits(ctr_logit, o_t)
    ctcvr = _bce_of_product(ctr_logit, cvr_logit, o_t * r_t).mean()
    out = {"ctr": ctr, "ctcvr": ctcvr}
    if regulariser is None:
        out["cvr"] = torch.zeros((), dtype=ctr.dtype, device=ctr.device)
    else:
        w = o_t / torch.sigmoid(ctr_logit.detach()).clamp(gamma, 1.0)
        delta = F.softplus(cvr_logit) - r_t * cvr_logit  # BCE(r_hat, r); r_t is 0 where o = 0
        if regulariser == "ips":
            out["cvr"] = (w * delta).mean()
        else:
            fixed = delta_hat.detach()
            err = (fixed + w * (delta - fixed)).mean()
            imp = (w * (delta.detach() - delta_hat) ** 2).mean()
            out["cvr"] = err + imp
    out["loss"] = ctr + lambda_c * out["cvr"] + lambda_g * ctcvr
    return out

