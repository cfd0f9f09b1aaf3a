"""Estimators of the ideal loss (BADR paper, Section 2.2 and eq. 13; SNIPS eq. 37).

Common contract (every function):

- ``e``: prediction errors e_{u,i}; entries where ``o = 0`` are ignored and may be NaN.
- ``e_hat``: imputed errors ê_{u,i} (finite everywhere).
- ``o``: click indicators o_{u,i} in {0, 1} (bool, integer or float).
- ``p_hat``: learned propensities p̂_{u,i} in (0, 1]; read only where ``o = 1``, where it must be
  at least :func:`estimators._validation.p_hat_floor` ``(dtype, 1)`` (2.2e-16 in float32, 1e-146 in
  float64: below it ``1 / p_hat`` or its gradient overflows).  Where ``o = 0`` any value in (0, 1]
  is fine: the pair's term is exactly 0 (or ``e_hat``), with zero gradient in ``p_hat``.
- Shape ``(B,)`` is one batch D^(k); shape ``(K, B)`` is K batches and the result is the mean
  of the K per-batch values (eq. 13 written in full).  For the estimators that normalise by
  ``|D^(k)|`` this equals the estimator over all ``K * B`` pairs.
- Differentiable in ``e`` and ``e_hat`` (``p_hat`` too, though training code detaches it);
  float32 and float64 (half precision is refused), CPU and CUDA.
- The self-normalised estimators (:func:`snips`, :func:`badr`) raise ``ValueError`` for a batch
  without clicks: callers skip such batches.
- ``reduction`` (keyword; :mod:`estimators.distributed`): with the batch's pairs split across
  ranks under ``torch.distributed``, ``"global"`` (the default) makes every per-batch sum and
  count the global batch's and returns this rank's share of the global value (the ranks' mean is
  it; DDP's mean of the gradients is its gradient); ``"local"`` computes each rank's shard alone.
  Outside ``torch.distributed`` it changes nothing.  (A batch without clicks is judged on the
  rank's shard.)
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._validation import check_batch
from .distributed import Reduction, resolve


class _DividedByPower(torch.autograd.Function):
    """``x / p**k``, computed exactly as written; the gradient in ``p`` is formed as
    ``-k * (grad * (x / p**k)) / p``.  (Autograd's rule for ``x / y`` forms ``(x / y) / y``, i.e.
    ``(1 / p)^(2k)``, which overflows for propensities whose ``(1 / p)^(k + 1)`` is finite.)"""

    @staticmethod
    def forward(ctx, x: Tensor, p: Tensor, k: int) -> Tensor:
        out = x / p**k
        ctx.save_for_backward(p, out)
        ctx.k = k
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, out = ctx.saved_tensors
        grad_x = grad / p**ctx.k if ctx.needs_input_grad[0] else None
        grad_p = -ctx.k * (grad * out) / p if ctx.needs_input_grad[1] else None
        return grad_x, grad_p, None


def _divided_by_power(x: Tensor, p: Tensor, k: int) -> Tensor:
    """``x / p**k`` whose gradients stay within ``(1 / p)^(k + 1)`` (see :class:`_DividedByPower`)."""
    return _DividedByPower.apply(x, p, k)


def _batch_mean(per_pair: Tensor, reduction: Reduction) -> Tensor:
    """(1/|D^(k)|) sum over each batch, then the mean over batches."""
    return reduction.batch_mean(per_pair)


def _self_normalised(numerator: Tensor, o: Tensor, p_hat: Tensor, reduction: Reduction) -> Tensor:
    """sum_k-batch numerator / sum_k-batch (o / p_hat), then the mean over batches."""
    return reduction.share((numerator.sum(dim=-1) / reduction.total((o / p_hat).sum(dim=-1))).mean())


def naive(e, o, *, reduction: str | Reduction = "global") -> Tensor:
    """Naive estimator, eq. (2): ``(1/|D|) sum o * e``."""
    o, e, _, _ = check_batch(o, e=e)
    return _batch_mean(o * e, resolve(reduction))


def ips(e, o, p_hat, *, reduction: str | Reduction = "global") -> Tensor:
    """Inverse propensity score estimator, eq. (3): ``(1/|D|) sum o * e / p_hat``."""
    o, e, _, p_hat = check_batch(o, e=e, p_hat=p_hat, p_hat_power=1)
    return _batch_mean(o * e / p_hat, resolve(reduction))


def snips(e, o, p_hat, *, reduction: str | Reduction = "global") -> Tensor:
    """Self-normalised IPS, eq. (37): ``sum o * e / p_hat  /  sum o / p_hat`` per batch."""
    red = resolve(reduction)
    o, e, _, p_hat = check_batch(o, e=e, p_hat=p_hat, need_click=True, p_hat_power=1, across=red)
    return _self_normalised(o * e / p_hat, o, p_hat, red)


def eib(e, e_hat, o, *, reduction: str | Reduction = "global") -> Tensor:
    """Error-imputation-based estimator, eq. (5): ``(1/|D|) sum o * e + (1 - o) * e_hat``."""
    o, e, e_hat, _ = check_batch(o, e=e, e_hat=e_hat)
    return _batch_mean(o * e + (1 - o) * e_hat, resolve(reduction))


def _dr_terms(e: Tensor, e_hat: Tensor, o: Tensor, p_hat: Tensor) -> Tensor:
    """Per-pair DR summand ê + o (e - ê) / p̂ shared by eq. (7) and eq. (13)."""
    return e_hat + o * (e - e_hat) / p_hat


def dr(e, e_hat, o, p_hat, *, reduction: str | Reduction = "global") -> Tensor:
    """Doubly robust estimator, eq. (7): ``(1/|D|) sum e_hat + o * (e - e_hat) / p_hat``."""
    o, e, e_hat, p_hat = check_batch(o, e=e, e_hat=e_hat, p_hat=p_hat, p_hat_power=1)
    return _batch_mean(_dr_terms(e, e_hat, o, p_hat), resolve(reduction))


def badr(e, e_hat, o, p_hat, *, reduction: str | Reduction = "global") -> Tensor:
    """Batch-adaptive DR estimator, eq. (13).

    Per batch D^(k): ``sum (e_hat + o * (e - e_hat) / p_hat)  /  sum o / p_hat``; the result is the
    mean over the K batches.  Equals :func:`dr` times ``|D^(k)| / sum(o / p_hat)`` within a batch
    and :func:`snips` when ``e_hat = 0`` (Section 3.6).
    """
    red = resolve(reduction)
    o, e, e_hat, p_hat = check_batch(o, e=e, e_hat=e_hat, p_hat=p_hat, need_click=True, p_hat_power=1, across=red)
    return _self_normalised(_dr_terms(e, e_hat, o, p_hat), o, p_hat, red)
