"""GPL: the propensity model's loss with the DR estimator's bias and variance (BADR paper eqs. 11-12).

Zhou, Feng, Liu, Zhu, "A Generalized Propensity Learning Framework for Unbiased Post-Click Conversion
Rate Estimation", CIKM 2023 (BADR ref. [69]).  DR-MSE-GPL trains the prediction model on the DR
estimator (eq. 7) and the imputation model on DR-MSE's loss (eq. 10); what GPL adds is the loss of the
propensity model ``p_hat = sigmoid(x)`` (x the propensity logit):

    L_GPL-p = (1/|D|) sum_D l(p_hat, o) + lambda [beta Bias_hat(L_DR) + (1 - beta) Var_hat(L_DR)]   (eq. 11)
    Bias_hat = (1/|D|)   sum_D (o - 2 o p_hat + p_hat^2) / p_hat^2 * delta^2                           (eq. 12)
    Var_hat  = (1/|D|^2) sum_D o / p_hat^2 * delta^2

with ``delta = e - e_hat`` the DR residual of the current prediction and imputation models, a constant
for this loss (detached).  ``Var_hat``'s normaliser: BADR eq. 12 (and the GPL paper's eq. 28) print
1/|D|; the GPL authors' README (2024-03-13) corrects eq. 28 to 1/|D|^2, "as indicated in the last line
of Eq. (27)": the variance of a mean of |D| independent terms is the sum of their variances over
|D|^2, so (1/|D|^2) sum o delta^2 / p_hat^2 bounds it (p(1 - p) <= p, o standing for p).  We use the
corrected form by default (``var_norm = |D|`` below: mean over D, then / |D|); ``var_norm = |B|``, the
batch size, is the published code's form (it divides the batch mean of the term by the batch size).

Stable forms from the logit (o in {0, 1}):

- o = 1: (1 - 2p + p^2) / p^2 = ((1 - p) / p)^2 = exp(-2x) and 1 / p^2 = (1 + exp(-x))^2;
- o = 0: the Bias summand is (p^2 / p^2) delta^2 = delta^2, constant in the propensity parameters,
  and delta there needs the label of an unclicked pair, which is never read: it is dropped
  (delta := 0 where o = 0, as the published code does).  The gradient of eq. 11 is unchanged.

So only clicked pairs carry the GPL term, whose gradient in x is <= 0 there: it raises the
propensities of clicked pairs with large residuals, and the base loss pulls them back.  p_hat is
floored at ``eps`` inside the GPL term only (x clamped below at logit(eps), zero gradient there; the
published code clamps p at 1e-4), so the weights stay finite for any logit.

A uniform batch B of pairs of D gives the unbiased estimate
``mean_B l + lambda [beta mean_B b + (1 - beta) mean_B v / var_norm]`` of eq. 11, which
:func:`gpl_propensity_loss` computes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: The Var_hat normalisers: "paper", 1/|D|^2 (GPL eq. 28 as its authors corrected it; the default),
#: and "published", the public code's per-batch 1/|B|^2 (BADR eq. 12 prints 1/|D|, the uncorrected typo).
VAR_NORMS = ("paper", "published")
#: The base losses l(p_hat, o): "bce", eq. 4's cross-entropy (the GPL paper's), and "mse", the squared
#: error on sigmoid(x) of the published BADR code (the toolkit's shared propensity fit).
BASE_LOSSES = ("bce", "mse")


def gpl_residual(e: Tensor, e_hat: Tensor) -> Tensor:
    """``delta = e - e_hat`` (eq. 12's residual), detached: call it on CLICKED pairs only, where
    ``e = l(y_hat, r)`` is known; ``e_hat`` is the imputed error the DR estimator (eq. 7) reads."""
    with torch.no_grad():
        return e.detach() - e_hat.detach()


def gpl_terms(x: Tensor, o: Tensor, delta: Tensor, eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Per-pair summands ``(b, v)`` of eq. 12 from the propensity logits ``x``, the o = 0 constant dropped.

    ``b = (o - 2 o p + p^2) / p^2 delta^2`` restricted to o = 1, i.e. ``exp(-2x) delta^2``;
    ``v = o / p^2 delta^2 = (1 + exp(-x))^2 delta^2`` on clicked pairs, 0 elsewhere.  ``delta`` is
    read only where ``o = 1`` (any value, NaN included, elsewhere) and is detached; ``p`` is floored at
    ``eps`` (x clamped below at logit(eps))."""
    clicked = o > 0
    d2 = torch.where(clicked, delta.detach(), torch.zeros_like(delta)).to(x.dtype).square()
    xc = x.clamp(min=math.log(eps) - math.log1p(-eps))
    m = torch.exp(-xc)  # (1 - p) / p, at most 1 / eps - 1
    zero = torch.zeros_like(x)
    return torch.where(clicked, m.square() * d2, zero), torch.where(clicked, (1.0 + m).square() * d2, zero)


def gpl_propensity_loss(x: Tensor, o: Tensor, delta: Tensor, *, lam: float, beta: float, var_norm: float,
                        eps: float = 1e-4, base: str = "bce") -> Tensor:
    """GPL's propensity loss on one batch of pairs (eq. 11 with eq. 12's terms), from logits.

    ``x``: propensity logits of the batch (the gradient flows here only); ``o``: its click indicators
    (0/1); ``delta``: the detached residuals :func:`gpl_residual` where ``o = 1`` (ignored elsewhere).
    Returns ``mean_B l(p_hat, o) + lam [beta mean_B b + (1 - beta) mean_B v / var_norm]``, with ``l``
    the ``base`` loss (:data:`BASE_LOSSES`) and ``var_norm`` = |D| for the corrected eq. 28 (module
    docstring) or |B| for the published code's.  ``lam = 0`` gives the base loss exactly.
    Raises ``ValueError`` naming the argument for lam < 0, beta outside [0, 1], var_norm < 1, eps
    outside (0, 1), an unknown base, or x / o / delta not of one 1-D shape."""
    for name, value, ok, want in (("lam", lam, lambda v: v >= 0, "a finite number >= 0"),
                                  ("beta", beta, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
                                  ("var_norm", var_norm, lambda v: v >= 1, "a number >= 1 (|D| or |B|)"),
                                  ("eps", eps, lambda v: 0 < v < 1, "a number in (0, 1)")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise ValueError(f"`{name}` must be {want}; got {value!r}")
    if base not in BASE_LOSSES:
        raise ValueError(f"`base` must be one of {BASE_LOSSES}; got {base!r}")
    if not all(isinstance(t, Tensor) for t in (x, o, delta)):
        raise ValueError("`x`, `o` and `delta` must be tensors")
    if not (x.shape == o.shape == delta.shape) or x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"`x`, `o` and `delta` must be non-empty 1-D tensors of one shape; got {tuple(x.shape)}, "
                         f"{tuple(o.shape)}, {tuple(delta.shape)}")
    t = o.to(x.dtype)
    fit = F.binary_cross_entropy_with_logits(x, t) if base == "bce" else F.mse_loss(torch.sigmoid(x), t)
    if lam == 0:
        return fit
    b, v = gpl_terms(x, o, delta, eps)
    return fit + lam * (beta * b.mean() + (1.0 - beta) * v.mean() / var_norm)
