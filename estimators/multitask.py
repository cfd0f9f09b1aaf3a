"""Entire-space multi-task losses: ESMM, ESCM2-IPS / -DR / -BADR, Multi-IPS / Multi-DR and DDPO.

Every loss here scores one batch of EXPOSED pairs D (clicked or not) from the logits of the
towers of a multi-task model (:class:`estimators.training.models.MMoE`, :class:`~estimators.
training.models.EntireSpaceMF`, :class:`~estimators.training.models.ESCM2`):

- ``a = ctr_logit``: the CTR tower, ``o_hat = sigmoid(a)`` (ESCM2 eq. 17), which is also the
  propensity of the counterfactual CVR terms (ESCM2 Section II-D: ``q = P(O = 1 | u, i)``);
- ``b = cvr_logit``: the CVR tower, ``r_hat = sigmoid(b)`` (eq. 18);
- ``delta_hat``: the imputation tower's imputed CVR error (eq. 19), for the DR and BADR terms;
- ``conv_logit``: DDPO's conversion-propensity network (see :func:`ddpo_loss`).

``o`` are the click indicators and ``r`` the conversion labels, read only where ``o = 1``
(anything, NaN included, where ``o = 0``: it is replaced by 0 before any arithmetic, so it
reaches neither the value nor a gradient).  With ``l(x, t) = softplus(x) - t x`` the
cross-entropy of ``sigmoid(x)`` against ``t`` and ``delta = l(b, r)`` the CVR error (eq. 20)::

    L_CTR   = mean_D l(a, o)                                                   ESCM2 eqs. (5), (35)
    L_CTCVR = mean_D BCE(o_hat * r_hat, o * r)                                 eqs. (5), (36)

Propensity weights.  The counterfactual terms weigh clicked pairs by ``1 / p`` with
``p = clip(o_hat, gamma, 1)`` (or ``clip(p_hat, gamma, 1)`` for an external ``p_hat``, e.g. the
true CTR of simulated data or a separately fitted propensity model).  ``p`` is DETACHED: the CTR
tower is trained by ``L_CTR`` (and ``L_CTCVR``) only.  A port that leaves the weights attached
lets the CVR term push CTR estimates up to shrink its own weights (a known defect of one public
multi-task port, see ``shared/notes/published-protocols.md``).  CLIPPING: ``gamma`` in (0, 1]
bounds every weight by ``1 / gamma`` (default 0.05, the value the DR baselines use, so weights
are at most 20); with ``gamma`` below every propensity the weights are exactly ``1 / o_hat``.

Input shapes: 1-D ``(B,)`` is one batch; 2-D ``(K, B)`` is K batches.  Means run over all pairs
(for equal-size batches, the mean of the K batch means); BADR's normaliser is per batch (row).
All functions return a dict of tensors: ``loss`` (to minimise) and its parts.  Bad input raises
``ValueError`` naming the argument (:func:`estimators._validation.check_entire_space`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validation import check_entire_space
from .distributed import Reduction, resolve

#: The counterfactual CVR regularisers of :func:`escm2_loss` (None: ESMM, no regulariser).
REGULARISERS = (None, "ips", "dr", "badr")


def _l(x: Tensor, t: Tensor) -> Tensor:
    """``l(x, t) = softplus(x) - t * x``: BCE of ``sigmoid(x)`` against ``t``, finite for finite logits."""
    return F.softplus(x) - t * x


def _bce_of_product(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """BCE of ``sigmoid(a) * sigmoid(b)`` against ``t``, in log space (finite for logits of +-40)."""
    log_p = F.logsigmoid(a) + F.logsigmoid(b)
    # log(1 - p) = log(-expm1(log p)); the clamp keeps p = 1 (float rounding) finite
    log_not_p = torch.log((-torch.expm1(log_p)).clamp_min(torch.finfo(a.dtype).tiny))
    return -(t * log_p + (1 - t) * log_not_p)


def _propensity(ctr_logit: Tensor, p_hat: Optional[Tensor], gamma: float) -> Tensor:
    """``clip(o_hat, gamma, 1)`` (or ``clip(p_hat, gamma, 1)``), detached."""
    p = torch.sigmoid(ctr_logit.detach()) if p_hat is None else p_hat.detach()
    return p.clamp(gamma, 1.0)


def _non_click_propensity(ctr_logit: Tensor, p_hat: Optional[Tensor], gamma: float) -> Tensor:
    """``clip(1 - o_hat, gamma, 1)`` (``1 - o_hat`` as ``sigmoid(-a)``, exact near 1), detached."""
    q = torch.sigmoid(-ctr_logit.detach()) if p_hat is None else 1 - p_hat.detach()
    return q.clamp(gamma, 1.0)


def _entire_space_terms(a: Tensor, b: Tensor, o: Tensor, r: Tensor, red: Reduction) -> dict[str, Tensor]:
    ctr = (red.mean(F.binary_cross_entropy_with_logits(a, o, reduction="none")) if red.active
           else F.binary_cross_entropy_with_logits(a, o))
    return {"ctr": ctr, "ctcvr": red.mean(_bce_of_product(a, b, o * r))}


# ---- the counterfactual CVR regularisers (internals: inputs already checked) -------------------
# ``red``: the means over D and the batch sums across data-parallel ranks (estimators.distributed);
# inactive in one process, where each is the plain ``.mean()`` / ``.sum()``.
def _ips_regulariser(delta: Tensor, o: Tensor, p: Tensor, red: Reduction) -> dict[str, Tensor]:
    """ESCM2 eq. (21) / BADR eq. (3): ``mean_D o * delta / p``."""
    return {"cvr": red.mean(o * delta / p)}


def _dr_regulariser(delta: Tensor, delta_hat: Tensor, o: Tensor, p: Tensor, red: Reduction) -> dict[str, Tensor]:
    """ESCM2 eqs. (23), (25), (26): ``R_err + R_imp``; ``delta_hat`` detached in ``R_err``,
    ``delta`` detached in ``R_imp`` (joint learning: each tower trained by its own term)."""
    fixed = delta_hat.detach()
    err = red.mean(fixed + o * (delta - fixed) / p)
    imp = red.mean(o * (delta.detach() - delta_hat) ** 2 / p)
    return {"cvr": err + imp, "cvr_err": err, "cvr_imp": imp}


def _badr_regulariser(delta: Tensor, delta_hat: Tensor, o: Tensor, p: Tensor, red: Reduction) -> dict[str, Tensor]:
    """BADR eq. (13) as the CVR risk and eq. (32) as the imputation risk, per batch (row).

    With ``w = o / p`` and ``S = sum_k w`` (the sum of ``1 / p`` over the clicked exposures of
    batch k)::

        R_err^(k) = sum_k (delta_hat + w (delta - delta_hat)) / S          (delta_hat detached)
        R_imp^(k) = sum_k w^2 (delta - delta_hat + E_hat - L)^2 / S^2       (delta detached)

    ``E_hat = sum_k delta_hat / S`` and ``L = R_err^(k)`` with ``delta`` detached (the gradient
    reaches ``delta_hat`` through every occurrence, as eq. 32 is written).  A batch without a click
    has ``S = 0`` and eq. (13) is undefined there: it contributes 0, and the result is the mean
    over the batches with a click (0 if none), so a training step never fails on such a batch.
    Across data-parallel ranks (each holding a part of every batch) ``S``, ``sum_k delta_hat`` and
    the estimate are the whole batch's (the last two all-reduced with their gradient) and each
    rank returns its share of the sums over its own exposures.
    """
    if o.dim() == 1:
        delta, delta_hat, o, p = delta[None], delta_hat[None], o[None], p[None]
    w = o / p
    s = red.total(w.sum(dim=-1, keepdim=True))  # p is detached: no gradient crosses here
    has_click = s > 0
    s_safe = torch.where(has_click, s, torch.ones_like(s))
    fixed = delta_hat.detach()
    err = (fixed + w * (delta - fixed)).sum(dim=-1, keepdim=True) / s_safe
    target = delta.detach()
    e_hat_sum, estimate_sum = red.total(delta_hat.sum(dim=-1, keepdim=True),
                                        (delta_hat + w * (target - delta_hat)).sum(dim=-1, keepdim=True))
    e_hat_mean = e_hat_sum / s_safe
    estimate = estimate_sum / s_safe
    imp = (w**2 * (target - delta_hat + e_hat_mean - estimate) ** 2).sum(dim=-1, keepdim=True) / s_safe**2
    n = has_click.sum().clamp_min(1)
    err = red.share(torch.where(has_click, err, torch.zeros_like(err)).sum() / n)
    imp = red.share(torch.where(has_click, imp, torch.zeros_like(imp)).sum() / n)
    return {"cvr": err + imp, "cvr_err": err, "cvr_imp": imp}


# ---- public losses ------------------------------------------------------------------------------
def esmm_loss(ctr_logit: Tensor, cvr_logit: Tensor, o, r, *, lambda_g: float = 1.0,
              reduction: str | Reduction = "global") -> dict[str, Tensor]:
    """ESMM (Ma et al. 2018), ESCM2 paper eq. (5): ``L = L_CTR + lambda_g * L_CTCVR``.

    ``L_CTR = mean_D l(a, o)`` is the CTR cross-entropy over the exposures and ``L_CTCVR =
    mean_D BCE(sigmoid(a) * sigmoid(b), o * r)`` the CTCVR cross-entropy of the product over the
    exposures; the CVR tower is trained only through the product (no CVR term: ``cvr`` is 0).
    ``lambda_g = 1`` is eq. (5) as written.  Returns ``{"loss", "ctr", "ctcvr", "cvr"}``.
    ``reduction`` as :func:`escm2_loss`.
    """
    tensors, o_t, r_t, _, _, lam = check_entire_space(ctr_logit, cvr_logit, o, r, gamma=1.0,
                                                      lambdas={"lambda_g": lambda_g})
    a, b = tensors["ctr_logit"], tensors["cvr_logit"]
    out = _entire_space_terms(a, b, o_t, r_t, resolve(reduction))
    out["cvr"] = torch.zeros((), dtype=a.dtype, device=a.device)
    out["loss"] = out["ctr"] + lam["lambda_g"] * out["ctcvr"]
    return out


def escm2_loss(
    ctr_logit: Tensor,
    cvr_logit: Tensor,
    o,
    r,
    *,
    regulariser: Optional[str] = "ips",
    delta_hat: Optional[Tensor] = None,
    p_hat: Optional[Tensor] = None,
    gamma: float = 0.05,
    lambda_c: float = 0.1,
    lambda_g: float = 1.0,
    reduction: str | Reduction = "global",
) -> dict[str, Tensor]:
    """ESCM2 training loss, eq. (34): ``L = L_CTR + lambda_c * R + lambda_g * L_CTCVR``.

    ``R`` is the counterfactual CVR risk chosen by ``regulariser``, with ``delta = l(b, r)`` the
    CVR error (eq. 20), ``p = clip(o_hat, gamma, 1)`` detached (module docstring) and ``w = o / p``:

    - ``None``: ESMM (eq. 5), ``R = 0``, equal to :func:`esmm_loss`;
    - ``"ips"`` (ESCM2-IPS, eqs. 21, 34): ``R = mean_D w * delta``;
    - ``"dr"`` (ESCM2-DR, eqs. 23, 25, 26): ``R = R_err + R_imp`` with
      ``R_err = mean_D [delta_hat + w (delta - delta_hat)]`` (``delta_hat`` detached) and
      ``R_imp = mean_D w (delta - delta_hat)^2`` (``delta`` detached), needs ``delta_hat``;
    - ``"badr"`` (ESCM2-BADR, BADR paper Section 3.7): ``R = R_err + R_imp`` per batch k with
      the batch-adaptive normaliser ``S_k = sum_k w`` (the sum of ``1 / p`` over the clicked
      exposures of the batch): ``R_err = sum_k [delta_hat + w (delta - delta_hat)] / S_k``
      (BADR eq. 13, ``delta_hat`` detached) and ``R_imp = sum_k w^2 (delta - delta_hat + E_hat -
      R_err)^2 / S_k^2`` (BADR eq. 32, ``E_hat = sum_k delta_hat / S_k``, ``delta`` detached),
      averaged over the batches (rows) with a click; a batch without a click contributes 0.
      Needs ``delta_hat``.

    ``L_CTR`` and ``L_CTCVR`` are eqs. (35), (36).  Defaults ``lambda_c = 0.1``, ``lambda_g = 1``
    are the ESCM2 paper's (Section V-A).  ``p_hat`` (optional, in (0, 1]) replaces ``o_hat`` in
    the weights, e.g. the true CTR (Proposition 4: then ``E_O[R_IPS]`` is the ideal loss).

    Returns ``{"loss", "ctr", "ctcvr", "cvr"}`` (``cvr`` is ``R``), plus ``cvr_err`` and
    ``cvr_imp`` for DR and BADR.  ``ctr_logit``, ``cvr_logit``, ``r``, ``delta_hat`` and ``p_hat``
    are float32 or float64 tensors of one dtype and of ``o``'s shape (1-D, or 2-D for K batches);
    the logits and ``delta_hat`` are finite, ``o`` is 0/1 and ``r`` is 0/1 where ``o = 1`` (anything
    where ``o = 0``).  ``gamma`` lies in (0, 1] (at least 2.2e-16 in float32, 1e-146 in float64),
    ``lambda_c`` and ``lambda_g`` are finite and >= 0.  Bad input raises ``ValueError`` naming the
    argument.  ``reduction``: under ``torch.distributed`` with the exposures split across the ranks,
    ``"global"`` (the default) takes every mean over D and BADR's batch sums over all ranks' exposures
    and returns this rank's share (DDP's mean of the gradients is then the whole batch's, the values'
    mean over the ranks its loss); ``"local"`` each rank's own batch (:mod:`estimators.distributed`).
    Outside ``torch.distributed`` it changes nothing.
    """
    if regulariser not in REGULARISERS:
        raise ValueError(f"`regulariser` must be one of {REGULARISERS}; got {regulariser!r}")
    if regulariser in ("dr", "badr") and delta_hat is None:
        raise ValueError(f"regulariser={regulariser!r} (ESCM2-{regulariser.upper()}) needs `delta_hat`, the "
                         "imputation tower's output")
    tensors, o_t, r_t, p_ext, gamma, lam = check_entire_space(
        ctr_logit, cvr_logit, o, r, delta_hat=delta_hat if regulariser in ("dr", "badr") else None,
        p_hat=p_hat if regulariser is not None else None, gamma=gamma,
        lambdas={"lambda_c": lambda_c, "lambda_g": lambda_g})
    a, b = tensors["ctr_logit"], tensors["cvr_logit"]
    red = resolve(reduction)
    out = _entire_space_terms(a, b, o_t, r_t, red)
    if regulariser is None:
        out["cvr"] = torch.zeros((), dtype=a.dtype, device=a.device)
    else:
        p = _propensity(a, p_ext, gamma)
        delta = _l(b, r_t)  # r_t is 0 where o = 0, and o multiplies every use of delta
        if regulariser == "ips":
            out.update(_ips_regulariser(delta, o_t, p, red))
        elif regulariser == "dr":
            out.update(_dr_regulariser(delta, tensors["delta_hat"], o_t, p, red))
        else:
            out.update(_badr_regulariser(delta, tensors["delta_hat"], o_t, p, red))
    out["loss"] = out["ctr"] + lam["lambda_c"] * out["cvr"] + lam["lambda_g"] * out["ctcvr"]
    return out


def multi_ips_loss(ctr_logit: Tensor, cvr_logit: Tensor, o, r, *, p_hat: Optional[Tensor] = None,
                   gamma: float = 0.05, lambda_c: float = 1.0, reduction: str | Reduction = "global"
                   ) -> dict[str, Tensor]:
    """Multi-IPS (Zhang et al., WWW 2020, "Large-scale causal approaches to debiasing post-click
    conversion rate estimation with multi-task learning"): ``L = L_CTR + lambda_c * R_IPS``.

    The CTR task is trained on the clicks over the exposures, ``L_CTR = mean_D l(a, o)``; the CVR
    task by the IPS estimator over the exposures with the CTR task's propensity,
    ``R_IPS = mean_D o * l(b, r) / clip(o_hat, gamma, 1)`` (BADR eq. 3 / ESCM2 eq. 21),
    ``o_hat`` DETACHED.  Both tasks are updated in one step of the one objective (the BADR
    paper's "directly updates the propensity model and prediction model in the IPS estimator");
    the propensity reaches the CVR term only as a constant weight.  No CTCVR term: this is
    :func:`escm2_loss` with ``regulariser="ips"`` and ``lambda_g = 0``.  Returns
    ``{"loss", "ctr", "ctcvr", "cvr"}`` (``ctcvr`` reported, not trained).
    """
    return escm2_loss(ctr_logit, cvr_logit, o, r, regulariser="ips", p_hat=p_hat, gamma=gamma,
                      lambda_c=lambda_c, lambda_g=0.0, reduction=reduction)


def multi_dr_loss(ctr_logit: Tensor, cvr_logit: Tensor, o, r, *, delta_hat: Tensor, p_hat: Optional[Tensor] = None,
                  gamma: float = 0.05, lambda_c: float = 1.0, reduction: str | Reduction = "global"
                  ) -> dict[str, Tensor]:
    """Multi-DR (Zhang et al., WWW 2020): ``L = L_CTR + lambda_c * (R_DR_err + R_DR_imp)``.

    The CTR task as in :func:`multi_ips_loss`; the CVR task by the DR estimator over the
    exposures, ``R_DR_err = mean_D [delta_hat + o (l(b, r) - delta_hat) / p]`` (BADR eq. 7 /
    ESCM2 eq. 23, ``delta_hat`` detached), and the imputation task (the imputed CVR error
    ``delta_hat``) by ``R_DR_imp = mean_D o (l(b, r) - delta_hat)^2 / p`` (ESCM2 eq. 25, ``l(b, r)``
    detached), with ``p = clip(o_hat, gamma, 1)`` DETACHED.  The propensity, imputation and
    prediction tasks are updated in one step of the one objective; no CTCVR term.  This is
    :func:`escm2_loss` with ``regulariser="dr"`` and ``lambda_g = 0``.
    """
    return escm2_loss(ctr_logit, cvr_logit, o, r, regulariser="dr", delta_hat=delta_hat, p_hat=p_hat, gamma=gamma,
                      lambda_c=lambda_c, lambda_g=0.0, reduction=reduction)


def _self_normalised_weights(w: Tensor, red: Reduction) -> Tensor:
    """``w / S`` with ``S`` the sum of ``w`` over its batch (row; over all ranks' shares of it), 0
    in a batch whose ``S`` is 0.  ``w`` is built from detached propensities: no gradient here."""
    rows = w if w.dim() > 1 else w[None]
    s = red.total(rows.sum(dim=-1, keepdim=True))
    out = rows / torch.where(s > 0, s, torch.ones_like(s))
    return out if w.dim() > 1 else out[0]


def ddpo_loss(
    ctr_logit: Tensor,
    cvr_logit: Tensor,
    o,
    r,
    *,
    conv_logit: Tensor,
    p_hat: Optional[Tensor] = None,
    gamma: float = 0.05,
    lambda_c: float = 1.0,
    lambda_p: float = 1.0,
    lambda_g: float = 1.0,
    self_normalise: bool = True,
    reduction: str | Reduction = "global",
) -> dict[str, Tensor]:
    """DDPO (Su et al., SIGIR 2024, "DDPO: Direct Dual Propensity Optimization for Post-Click
    Conversion Rate Estimation"), its debiasing components: eqs. (6), (9), (10), (15)-(18).

    The CTR tower ``a`` is the click propensity network (eq. 7), ``c = conv_logit`` the conversion
    propensity network (eq. 5) and ``b`` the CVR network; the causal transfer modules (eqs. 12-14)
    are architecture, left out (BADR footnote 6: debiasing components only).  With
    ``p = clip(o_hat, gamma, 1)`` and ``q = clip(1 - o_hat, gamma, 1)`` (DETACHED; the paper does not
    clip, ``gamma`` below every propensity is the paper's form) and the soft label of eq. (9),
    ``r* = r`` where ``r = 1`` (clicked and converted) and ``r* = sigmoid(c)`` DETACHED elsewhere
    (clicked and not converted, and every unclicked exposure)::

        L_o = mean_D l(a, o)                                            eq. (16), lambda_o = 1
        L_c = mean_D o * l(c, r)                                        eq. (6), clicked exposures only
        L_r = mean_D [ o * w_O * l(b, r*) + (1 - o) * w_N * l(b, r*) ]  eq. (10)
        L   = L_o + lambda_c * L_r + lambda_p * L_c + lambda_g * L_CTCVR    eq. (18); L_CTCVR = eq. (17)

    ``self_normalise=True`` (the paper's eq. 15, the method as trained): ``w_O = (1/p) / sum_B o/p``
    and ``w_N = (1/q) / sum_B (1 - o)/q`` over the batch (row) B, so each side's weights sum to 1
    over its clicked (unclicked) exposures and the ``mean_D`` of eq. (10) leaves ``L_r`` at the
    scale of a batch mean: ``lambda_c`` trades it against the other tasks, as the paper's
    ``lambda_r`` does.  ``self_normalise=False``: eq. (10) with ``w_O = 1/p``, ``w_N = 1/q``, for
    which Theorem 1 holds (with ``o_hat = o`` and ``sigmoid(c) = r``, ``L_r`` is the ideal CVR loss).
    A batch without a click (without an unclicked exposure) contributes 0 from that side.

    Our names map to the paper's weights as ``lambda_c = lambda_r``, ``lambda_p = lambda_c`` and
    ``lambda_g = lambda_t``; the defaults are the paper's (all 1, Section 4.4).  Returns ``{"loss",
    "ctr", "ctcvr", "cvr", "conv", "cvr_click", "cvr_unclick"}`` (``cvr = L_r``, ``conv = L_c``).
    Input contract and ``reduction`` as :func:`escm2_loss` (``conv_logit`` finite, of ``o``'s
    shape); under ``"global"`` the normalisers are the whole batch's, over all ranks.
    """
    if conv_logit is None:
        raise ValueError("DDPO needs `conv_logit`, the conversion propensity network's logits")
    if not isinstance(self_normalise, bool):
        raise ValueError(f"`self_normalise` must be True or False; got {self_normalise!r}")
    tensors, o_t, r_t, p_ext, gamma, lam = check_entire_space(
        ctr_logit, cvr_logit, o, r, conv_logit=conv_logit, p_hat=p_hat, gamma=gamma,
        lambdas={"lambda_c": lambda_c, "lambda_p": lambda_p, "lambda_g": lambda_g})
    a, b, c = tensors["ctr_logit"], tensors["cvr_logit"], tensors["conv_logit"]
    red = resolve(reduction)
    out = _entire_space_terms(a, b, o_t, r_t, red)
    w_click = o_t / _propensity(a, p_ext, gamma)
    w_unclick = (1 - o_t) / _non_click_propensity(a, p_ext, gamma)
    if self_normalise:
        w_click, w_unclick = _self_normalised_weights(w_click, red), _self_normalised_weights(w_unclick, red)
    # r_t is 0 where o = 0, so r* is the pseudo-label on every exposure but the clicked conversions
    soft = r_t + (1 - r_t) * torch.sigmoid(c.detach())
    delta = _l(b, soft)
    out["conv"] = red.mean(o_t * _l(c, r_t))
    out["cvr_click"] = red.mean(w_click * delta)
    out["cvr_unclick"] = red.mean(w_unclick * delta)
    out["cvr"] = out["cvr_click"] + out["cvr_unclick"]
    out["loss"] = (out["ctr"] + lam["lambda_c"] * out["cvr"] + lam["lambda_p"] * out["conv"]
                   + lam["lambda_g"] * out["ctcvr"])
    return out
