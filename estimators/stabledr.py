"""StableDR (Li, Zheng, Wu, "StableDR: Stabilized Doubly Robust Learning for Recommendation on Data
Missing Not at Random", ICLR 2023, arXiv 2205.04701; BADR Table 3 row "StableDR"): the estimator,
its joint-learning prediction step and the propensity model's loss in cycle learning.

Provenance.  The paper's Sections 3-4 (estimator, theorems, algorithm) could NOT be read for this
toolkit: the stored copies return only the abstract and introduction.  The equation labels
(SDR-*) are ours, not the paper's numbers.  What the text confirms: StableDR "updates the
imputation, propensity, and prediction models cyclically" and has bounded bias, variance and
generalisation bound "under inaccurate imputed errors and arbitrarily small propensities"
(abstract); the BADR paper's footnote 1 says it "does not use imputation errors to train the CVR
prediction model".  The rest is reconstructed from that and from the public code of the authors'
lineage (read, not copied; the spec is ``/work/runs/specs/stabledr.md`` of this project's runs).
In toolkit notation (``e`` prediction error, ``e_hat`` imputed error, ``o`` click, ``p_hat``
clipped learned propensity, ``w = 1 / p_hat``, ``D`` all user-item pairs)::

    SDR-con   sum_D o (e - e_hat*) / p_hat = 0            the stabilisation constraint on e_hat*
    SDR-est   E_SDR = (1/|D|) sum_D e_hat*                 the estimator
              with e_hat* = e_hat + c, c fixed by SDR-con:
              E_SDR = mean_D e_hat + sum_D o w (e - e_hat) / sum_D o w       (a self-normalised DR)
    SDR-prop  sum_U l(p_hat, o) + eta [sum_U (1 - o / p_hat)(e_hat - mean_U e_hat)]^2

SDR-est's correction is a w-weighted MEAN of the clicked residuals, so it lies within their range
whatever ``p_hat`` (DR, eq. 7, divides by |D| instead and is unbounded as ``p_hat -> 0``); it is
SNIPS (eq. 37) when ``e_hat = 0`` and DR when ``sum o w = |D|``.  With the imputed errors held
fixed, its gradient in the prediction model is SNIPS's: ``mean_D e_hat`` and
``sum o w e_hat / sum o w`` do not move, which is why the prediction step
(:func:`stabledr_step`) trains on no imputed error, as footnote 1 says.  The imputation model
reaches the prediction only through the propensity: SDR-prop's second term is zero exactly when
the self-normalised IPS mean of ``e_hat`` over the clicked pairs of U equals its mean over U
(``sum_U (e_hat - mean_U e_hat) = 0``), i.e. the propensities BALANCE the imputed errors, which
is what makes the SNIPS-type prediction loss unbiased where ``e`` is close to ``e_hat``.  SDR-prop
reads the click indicators ``o`` of U and model outputs only: no conversion label.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._validation import check_batch
from .distributed import Reduction, resolve

#: SDR-prop's reductions: "sum" (the published scale, for which eta is stated) and "mean"
#: (eta_mean = eta_sum * |U| gives the same minimiser).
REDUCTIONS = ("sum", "mean")


def stabledr(e, e_hat, o, p_hat, *, reduction: str | Reduction = "global") -> Tensor:
    """SDR-est: ``E_SDR = mean_D e_hat + sum o w (e - e_hat) / sum o w`` per batch D (``w = 1 / p_hat``).

    It is ``mean_D e_hat*`` for the imputed errors ``e_hat* = e_hat + c`` shifted by the constant
    that makes the stabilisation constraint SDR-con, ``sum o (e - e_hat*) / p_hat = 0``, hold:
    ``c = sum o w (e - e_hat) / sum o w``.  Self-normalised: a batch needs a click.  The common
    contract of :mod:`estimators.loss` applies (``e`` is never read where ``o = 0``; (K, B) input
    is the mean of the K per-batch values).  ``reduction``: both sums over the global batch under
    ``torch.distributed`` (:mod:`estimators.distributed`).
    """
    red = resolve(reduction)
    o, e, e_hat, p_hat = check_batch(o, e=e, e_hat=e_hat, p_hat=p_hat, need_click=True, p_hat_power=1, across=red)
    w = o / p_hat
    correction = red.share(((w * (e - e_hat)).sum(dim=-1) / red.total(w.sum(dim=-1))).mean())
    return red.batch_mean(e_hat) + correction


def stabledr_step(x_b, r_b, p_hat_b, x_u, xt_b, xt_u, form) -> Tensor:
    """SDR-est in one joint-learning step, U standing for D, with the imputed errors held fixed:
    ``mean_U e_hat + sum_B w (e - e_hat) / sum_B w`` with ``e = l(x, r)`` and ``e_hat`` detached.

    Its value is E_SDR's estimate on the step's pairs; its gradient in the prediction logits is
    SNIPS's, ``d/dx [sum_B w l(x, r) / sum_B w]``, on B only (the published StableDR prediction
    step, and BADR footnote 1: no imputed error trains the prediction model).  ``form`` is the
    step's :class:`~estimators.joint_loss.Form` (``e_hat = form.imputed(x, x_t)``).
    """
    w, red = 1.0 / p_hat_b, form.reduction
    e_hat_b = form.imputed(x_b, xt_b).detach()
    e_hat_u = form.imputed(x_u, xt_u).detach()
    if not red.active:  # one process: the expression above, term for term
        return e_hat_u.mean() + (w * (form.l(x_b, r_b) - e_hat_b)).sum() / w.sum()
    n_u, sum_w = red.total(x_u.numel(), w.sum(), like=x_u)
    return red.share(e_hat_u.sum() / n_u + (w * (form.l(x_b, r_b) - e_hat_b)).sum() / sum_w)


def stabledr_propensity_loss(z_u: Tensor, o_u: Tensor, e_hat_u: Tensor, *, eta: float, gamma: float,
                             reduction: str = "sum", across: str | Reduction = "global") -> Tensor:
    """SDR-prop: the propensity model's loss in cycle learning, from its logits ``z_u`` on the pairs U.

    ``z_u``: propensity logits on U (pairs drawn uniformly from ALL user-item pairs); ``o_u``:
    their click indicators (0/1), the only data this loss reads (no conversion label);
    ``e_hat_u``: the imputed errors on U (model outputs; detached here: this step trains the
    propensity model only); ``eta >= 0``: the weight of the balancing term; ``gamma`` in (0, 1):
    the clipping floor of ``p_hat``.  With ``p_hat = max(sigmoid(z), gamma)``::

        sum_U l(sigmoid(z), o) + eta [sum_U (1 - o / p_hat)(e_hat - mean_U e_hat)]^2   ("sum")
        mean_U l(sigmoid(z), o) + eta [mean_U (1 - o / p_hat)(e_hat - mean_U e_hat)]^2 ("mean")

    ``l`` is the cross-entropy from the unclipped logit (``softplus(z) - o z``; the toolkit clips
    propensities only where they weigh).  The clip is applied on the logit,
    ``z_c = max(z, logit(gamma))``, and ``1 / p_hat = 1 + exp(-z_c) <= 1 / gamma``: finite for any
    finite ``z``; below the floor the balancing term has no gradient in ``z``.

    ``across``: under ``torch.distributed`` with U split across the ranks, ``"global"`` (the
    default) takes ``mean_U e_hat``, the sums (or means) and the balancing sum inside the square
    over all ranks' pairs (the last through the differentiable all-reduce, as eq. 32's) and returns
    this rank's share, written ``sum_{U_r} l + eta B_r S`` for ``S = sum_U b`` and ``B_r`` the
    rank's part of it, times the world size; ``"local"`` each rank's own U
    (:mod:`estimators.distributed`).  In one process it changes nothing.
    """
    for name, t in (("z_u", z_u), ("o_u", o_u), ("e_hat_u", e_hat_u)):
        if not isinstance(t, Tensor) or t.dim() != 1 or not t.is_floating_point():
            raise ValueError(f"`{name}` must be a 1-D float tensor over the sampled pairs U; got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if not (z_u.shape == o_u.shape == e_hat_u.shape) or z_u.numel() == 0:
        raise ValueError(f"`z_u`, `o_u` and `e_hat_u` must be non-empty and of one shape; got {tuple(z_u.shape)}, "
                         f"{tuple(o_u.shape)}, {tuple(e_hat_u.shape)}")
    if not bool(((o_u == 0) | (o_u == 1)).all()):
        raise ValueError("`o_u` (click indicators of U) must hold only 0 and 1")
    if not bool(torch.isfinite(z_u.detach()).all()) or not bool(torch.isfinite(e_hat_u.detach()).all()):
        raise ValueError("`z_u` (propensity logits) and `e_hat_u` (imputed errors) must be finite; a model whose "
                         "outputs are not finite has diverged: lower its learning rate")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (0.0 <= eta < math.inf):
        raise ValueError(f"`eta` (weight of the balancing term) must be a finite number >= 0; got {eta!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < gamma < 1.0:
        raise ValueError(f"`gamma` (propensity clipping floor) must lie in (0, 1); got {gamma!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}; got {reduction!r}")
    red = resolve(across, name="across")
    e_hat_u = e_hat_u.detach()
    z_c = torch.clamp(z_u, min=math.log(gamma / (1.0 - gamma)))
    inv_p = 1.0 + torch.exp(-z_c)
    cross_entropy = torch.nn.functional.softplus(z_u) - o_u * z_u
    if not red.active:  # one process: the expressions above, term for term
        balance = (1.0 - o_u * inv_p) * (e_hat_u - e_hat_u.mean())
        if reduction == "sum":
            return cross_entropy.sum() + eta * balance.sum() ** 2
        return cross_entropy.mean() + eta * balance.mean() ** 2
    n_u, e_sum = red.total(z_u.numel(), e_hat_u.sum(), like=z_u)
    balance = ((1.0 - o_u * inv_p) * (e_hat_u - e_sum / n_u)).sum()
    total = red.total(balance)  # carries the gradient of every rank's part of the square
    scale = 1.0 if reduction == "sum" else 1.0 / n_u
    return red.share((cross_entropy.sum() + eta * balance * total * scale) * scale)
