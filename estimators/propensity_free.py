"""Losses of the propensity-free methods: CVIB, DIB and DAMF (BADR paper, Table 3, "propensity-free").

None reads a propensity or an imputed error.  Each scores one step's clicked pairs B (logits and
0/1 conversion labels ``r``) and, for CVIB and DAMF, pairs U drawn uniformly from ALL user-item
pairs (ids only: no label of an unclicked pair exists or is read).  ``l(x, t)`` is the factual
cross-entropy of ``sigmoid(x)`` against ``t`` (:func:`estimators.joint_loss.bce_with_logits` by
default; the configs' published ``bce_clamped`` where a run asks for it).  Each function returns a
dict: ``loss`` (to minimise; L2 regularisation is the optimiser's weight decay, not included) and
its parts.  Bad input raises ``ValueError`` naming the argument.  ``reduction`` (every function):
under ``torch.distributed`` with B and U split across the ranks, ``"global"`` (the default) takes
every mean, and CVIB's batch means inside its logarithms, over all ranks' pairs and returns this
rank's share; ``"local"`` each rank's own pairs (:mod:`estimators.distributed`).  In one process it
changes nothing.

Sources.  The full texts of the three papers could not be read here; each docstring says what
the form rests on (the paper's stated objective, the authors' code read to understand it, and the
public code behind the BADR paper's baseline numbers), and which choice it takes where they
differ.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .distributed import Reduction, resolve
from .joint_loss import bce_with_logits

CrossEntropy = Callable[[Tensor, Tensor], Tensor]

#: DAMF's loss between the two hypotheses' predictions inside the discrepancy.
PAIR_LOSSES = ("sq_prob", "sq_logit")


def _weight(value, name: str, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not (
            0.0 <= value <= high):
        interval = f"[0, {high:g}]" if math.isfinite(high) else ">= 0"
        raise ValueError(f"`{name}` must be a finite number {interval}; got {value!r}")
    return float(value)


def _check(labels: Tensor, **logits: Tensor) -> None:
    """Logits are 1-D floating tensors; those named ``*_b`` match the labels ``r`` in length;
    labels hold only 0 and 1."""
    for name, x in logits.items():
        if not isinstance(x, Tensor) or x.dim() != 1 or not x.is_floating_point() or x.numel() == 0:
            raise ValueError(f"`{name}` must be a non-empty 1-D floating tensor of logits; got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if name.endswith("_b") and x.shape != labels.shape:
            raise ValueError(f"`{name}` has {x.numel()} logits but `r` {labels.numel()} labels; both cover the "
                             "clicked batch B")
    if not isinstance(labels, Tensor) or labels.dim() != 1:
        raise ValueError(f"`r` must be a 1-D tensor of 0/1 labels; got {getattr(labels, 'shape', type(labels))}")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("`r` (conversion labels of the clicked pairs) must hold only 0 and 1; unclicked pairs "
                         "have no label and belong in U")
    for name, x in logits.items():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"`{name}` holds a NaN or infinite logit")


def cvib_loss(x_b: Tensor, r: Tensor, x_u: Tensor, *, alpha: float = 1.0, gamma: float = 1e-5,
              l: CrossEntropy = bce_with_logits, reduction: str | Reduction = "global") -> dict[str, Tensor]:
    """CVIB (Wang et al., NeurIPS 2020): factual risk + contrastive information loss + output
    confidence penalty.  With ``p+ = sigmoid(x_b)`` on B, ``p- = sigmoid(x_u)`` on U and the batch
    means ``m+ = mean_B p+``, ``m- = mean_U p-``::

        L_fact = mean_B l(x_b, r)                                    the factual risk (its eq. 1)
        L_CI   = -[m+ log m- + (1 - m+) log(1 - m-)]                 contrastive information loss
        L_OCP  = mean_B [p+ log p+ + (1 - p+) log(1 - p+)]           output confidence penalty
        loss   = L_fact + alpha * L_CI + gamma * L_OCP

    The IB Lagrangian's task term split into a factual and a counterfactual part gives ``L_CI``:
    the cross-entropy of the counterfactual output distribution (the batch-mean prediction on U)
    against the factual one (on B), which pulls the two domains' predictions together; the
    minimality term is L2 on the embeddings (the optimiser's weight decay).  ``L_CI`` is written
    with the batch means as the code behind the BADR paper's CVIB row computes it (the authors'
    own repository's latest version has ``log p`` where ``log(1 - p)`` is meant, which leaves U
    without gradient); ``L_OCP`` is the full binary negative entropy (that code keeps only its
    ``p log p`` half; at the reference ``gamma = 1e-5`` the two agree to 1e-5).  Gradients reach
    both B and U; U is drawn from all pairs, as that code draws it.  Defaults: the authors'
    reference ``alpha = 1``, ``gamma = 1e-5``.
    """
    _check(r, x_b=x_b, x_u=x_u)
    alpha, gamma = _weight(alpha, "alpha"), _weight(gamma, "gamma")
    red = resolve(reduction)
    fact = red.mean(l(x_b, r.to(x_b.dtype)))
    if not red.active:
        m_plus = torch.sigmoid(x_b).mean()
        log_m_minus = torch.logsumexp(F.logsigmoid(x_u), 0) - math.log(x_u.numel())
        log_not_m_minus = torch.logsumexp(F.logsigmoid(-x_u), 0) - math.log(x_u.numel())
    else:  # the global batch's means; L_CI is a function of them alone, so no share is taken of it
        n_b, n_u = red.total(x_b.numel(), x_u.numel(), like=x_b)
        m_plus = red.total(torch.sigmoid(x_b).sum()) / n_b
        log_m_minus = red.logsumexp(F.logsigmoid(x_u)) - torch.log(n_u)
        log_not_m_minus = red.logsumexp(F.logsigmoid(-x_u)) - torch.log(n_u)
    ci = -(m_plus * log_m_minus + (1 - m_plus) * log_not_m_minus)
    p, log_p, log_not_p = torch.sigmoid(x_b), F.logsigmoid(x_b), F.logsigmoid(-x_b)
    ocp = red.mean(p * log_p + (1 - p) * log_not_p)
    return {"loss": fact + alpha * ci + gamma * ocp, "factual": fact, "contrastive": ci, "confidence": ocp}


def dib_loss(x_z: Tensor, x_r: Tensor, r: Tensor, *, alpha: float = 0.09, gamma: float = 0.11,
             l: CrossEntropy = bce_with_logits, reduction: str | Reduction = "global") -> dict[str, Tensor]:
    """DIB (Liu et al., RecSys 2021), its eq. (3) in the tractable form of its Section 5.

    Eq. (3): ``min beta I(z; x) - I(z; y) + gamma I(z; r) - alpha I(r; y)`` over an unbiased
    component ``z`` and a biased component ``r`` of every user and item vector.  With
    ``I(z; r) = I(z; y) - H(y | r) + H(y | z, r)`` and each conditional entropy estimated by the
    cross-entropy of the logit of that component, the constant ``H(y)`` dropped::

        loss = (1 - gamma) mean_B l(x_z, r) - (gamma - alpha) mean_B l(x_r, r)
               + gamma mean_B l(x_z + x_r, r)

    ``x_z = <z_u, z_i>``, ``x_r = <r_u, r_i>`` (so ``x_z + x_r`` is the logit of the concatenated
    vectors); prediction reads ``x_z`` alone.  ``beta I(z; x)`` is L2 on the z tables (the
    optimiser's weight decay on them only).  Only the clicked pairs, with their conversion labels:
    the authors' code also labels sampled unobserved pairs 0, which for CVR would train on
    click-and-convert, not conversion.  Bounded below for ``0 <= gamma <= 1`` and ``alpha >= 0``
    (checked).  Defaults: the authors' tuned Yahoo! R3 MF setting (``gamma`` 0.113, ``alpha``
    0.091), rounded.
    """
    _check(r, x_z_b=x_z, x_r_b=x_r)
    gamma, alpha = _weight(gamma, "gamma", 1.0), _weight(alpha, "alpha")
    t, red = r.to(x_z.dtype), resolve(reduction)
    unbiased, biased, joint = red.mean(l(x_z, t)), red.mean(l(x_r, t)), red.mean(l(x_z + x_r, t))
    loss = (1 - gamma) * unbiased - (gamma - alpha) * biased + gamma * joint
    return {"loss": loss, "unbiased": unbiased, "biased": biased, "joint": joint}


def pair_loss(x: Tensor, x_d: Tensor, kind: str = "sq_prob") -> Tensor:
    """DAMF's loss between the predictor's and the second hypothesis's predictions per pair:
    ``(sigmoid(x) - sigmoid(x_d))^2`` (``"sq_prob"``, bounded in [0, 1] as the bound assumes) or
    ``(x - x_d)^2`` (``"sq_logit"``, the squared gap of raw scores, as the authors' rating code)."""
    if kind == "sq_prob":
        return (torch.sigmoid(x) - torch.sigmoid(x_d)) ** 2
    if kind == "sq_logit":
        return (x - x_d) ** 2
    raise ValueError(f"`kind` must be one of {PAIR_LOSSES}; got {kind!r}")


def damf_loss(x_b: Tensor, r: Tensor, x_u: Tensor, xd_b: Tensor, xd_u: Tensor, *, beta: float = 0.05,
              kind: str = "sq_prob", l: CrossEntropy = bce_with_logits, reduction: str | Reduction = "global"
              ) -> dict[str, Tensor]:
    """DAMF (Saito and Nomura, IJCAI 2022): the naive risk plus the propensity matrix divergence.

    The paper's bound (propensity-independent): ideal risk <= naive risk on the observed pairs +
    PMD + terms the trained model does not change, with the discrepancy of a second hypothesis
    ``h'`` of the same class (a second MF, logits ``xd``)::

        PMD(h, h') = mean_U pair_loss(x_u, xd_u) - mean_B pair_loss(x_b, xd_b)
        loss       = mean_B l(x_b, r) + beta * PMD

    ``h`` minimises ``loss``; ``h'`` maximises ``PMD`` (the supremum of the divergence).  Signed,
    as the authors' code; U is drawn from all pairs (the uniform target distribution), B are the
    observed pairs.  The min-max is one minimisation when ``xd`` reaches this function through a
    gradient-reversal layer of coefficient ``1 / beta`` (:class:`estimators.training.
    propensity_free.DAMFMF` does): ``h'`` then receives exactly ``-d PMD``.  Cross-entropy for the
    CVR task (the paper's rating task uses the squared error).  Default ``beta``: between the
    authors' tuned Coat (0.053) and Yahoo! R3 (0.038) values.
    """
    _check(r, x_b=x_b, xd_b=xd_b, x_u=x_u, xd_u=xd_u)
    if x_u.shape != xd_u.shape:
        raise ValueError(f"`x_u` and `xd_u` must cover the same pairs U; got {tuple(x_u.shape)}, {tuple(xd_u.shape)}")
    beta, red = _weight(beta, "beta"), resolve(reduction)
    fact = red.mean(l(x_b, r.to(x_b.dtype)))
    pmd = red.mean(pair_loss(x_u, xd_u, kind)) - red.mean(pair_loss(x_b, xd_b, kind))
    return {"loss": fact + beta * pmd, "factual": fact, "pmd": pmd}
