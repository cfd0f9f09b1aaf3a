"""Gather-dot: the logits of matrix factorisation, ``x[n] = <P[rows[n]], Q[cols[n]]>``.

Every model of the joint learner (BADR paper, Algorithm 1) scores user-item pairs this way:
``P`` the user embeddings, ``Q`` the item embeddings, ``(rows, cols)`` the users and items of
the pairs.  Its gradient with respect to the tables is a scatter,

    dP[u] = sum_{n: rows[n] = u} g[n] Q[cols[n]],     dQ[i] = sum_{n: cols[n] = i} g[n] P[rows[n]],

which ``nn.Embedding``'s dense CPU backward computes by sorting and scattering row by row (the
bulk of a plain-PyTorch Yahoo! R3 step).  The compiled operators ``cvr::gather_dot`` and
``cvr::gather_dot_backward`` (``csrc/gather_dot.*``, through :mod:`estimators._ext`) do the
forward in one pass and the backward as a deterministic scatter (each thread owns disjoint
output rows; bitwise the same for any thread count).  :func:`gather_dot_reference` is the
pure-PyTorch definition they equal up to float rounding; it is used when the extension is not
built or ``CVR_BACKEND=reference``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _ext


def gather_dot_reference(P: Tensor, Q: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``(P[rows] * Q[cols]).sum(-1)``: the definition, differentiable by autograd."""
    return (P[rows] * Q[cols]).sum(-1)


def check_gather_dot(P: Tensor, Q: Tensor, rows: Tensor, cols: Tensor) -> None:
    """Raise ``ValueError`` naming the argument unless shapes, dtypes and devices fit :func:`gather_dot`.

    Index ranges are not checked here: the compiled kernels check them while reading the
    indices (raising ``ValueError`` too), the reference path checks them before gathering.
    """
    if P.dim() != 2 or Q.dim() != 2:
        raise ValueError(f"`P` and `Q` must be 2-D embedding tables (rows, dim); got shapes {tuple(P.shape)} "
                         f"and {tuple(Q.shape)}")
    if P.shape[1] != Q.shape[1]:
        raise ValueError(f"`P` and `Q` must have one embedding dimension; got {P.shape[1]} and {Q.shape[1]}")
    if P.dtype != Q.dtype or P.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"`P` and `Q` must share one dtype, float32 or float64; got {P.dtype} and {Q.dtype}")
    if rows.dtype != torch.int64 or cols.dtype != torch.int64:
        raise ValueError(f"`rows` and `cols` must be int64 indices; got {rows.dtype} and {cols.dtype}; "
                         f"convert them with `.long()`")
    if rows.dim() != 1 or rows.shape != cols.shape:
        raise ValueError(f"`rows` and `cols` must be 1-D of one length; got shapes {tuple(rows.shape)} and "
                         f"{tuple(cols.shape)}")
    if not (P.device == Q.device == rows.device == cols.device):
        raise ValueError(f"`P`, `Q`, `rows` and `cols` must be on one device; got {P.device}, {Q.device}, "
                         f"{rows.device}, {cols.device}")


def _check_range(name: str, idx: Tensor, size: int) -> None:
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
        raise ValueError(f"`{name}` must lie in [0, {size}), the rows of its table; got values in "
                         f"[{int(idx.min())}, {int(idx.max())}]")


def use_operator(P: Tensor) -> bool:
    """Whether :func:`gather_dot` runs on the compiled operators for tables like ``P``."""
    return _ext.table_kernels(_ext.gather_dot, P.device)


class _GatherDot(torch.autograd.Function):
    """``cvr::gather_dot`` with ``cvr::gather_dot_backward`` as its gradient."""

    @staticmethod
    def forward(ctx, P: Tensor, Q: Tensor, rows: Tensor, cols: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(P, Q, rows, cols)
        return _ext.gather_dot(P, Q, rows, cols)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        P, Q, rows, cols = ctx.saved_tensors
        grad_p, grad_q = _ext.gather_dot_backward(grad.contiguous(), P, Q, rows, cols, ctx.needs_input_grad[0],
                                   ctx.needs_input_grad[1])
        return grad_p, grad_q, None, None


def gather_dot(P: Tensor, Q: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``x[n] = <P[rows[n]], Q[cols[n]]>``, differentiable in ``P`` and ``Q``.

    ``P`` (n_rows, dim) and ``Q`` (n_cols, dim) share a float dtype and device; ``rows`` and
    ``cols`` are int64 of one length.  Bad input raises ``ValueError`` naming the argument.
    """
    check_gather_dot(P, Q, rows, cols)
    if use_operator(P):
        if torch.is_grad_enabled() and (P.requires_grad or Q.requires_grad):
            return _GatherDot.apply(P, Q, rows, cols)
        return _ext.gather_dot(P, Q, rows, cols)
    _check_range("rows", rows, P.shape[0])
    _check_range("cols", cols, Q.shape[0])
    return gather_dot_reference(P, Q, rows, cols)


def gather_dot_value(P: Tensor, Q: Tensor, rows: Tensor, cols: Tensor, compiled: Optional[bool] = None) -> Tensor:
    """The value of :func:`gather_dot` (no graph) on the compiled operator where
    :func:`use_operator` holds (``compiled``, when the caller has asked it already), which
    checks index ranges itself (``ValueError``), and on the checked reference otherwise: the
    joint learner's per-step path, whose tables and indices have the right types by
    construction."""
    if use_operator(P) if compiled is None else compiled:
        return _ext.gather_dot(P, Q, rows, cols)
    with torch.no_grad():
        return gather_dot(P, Q, rows, cols)


def gather_dot_grad(grad: Tensor, P: Tensor, Q: Tensor, rows: Tensor, cols: Tensor,
                    compiled: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    """``(dP, dQ)``: the gradient of ``sum(grad * gather_dot(P, Q, rows, cols))`` (the scatter above).

    For callers that hold the gradient of the logits already (the joint learner computes it
    from the loss alone) and want the tables' gradients without building a graph.  Inputs as
    validated by :func:`gather_dot`, which must have accepted them; ``compiled`` as in
    :func:`gather_dot_value`.
    """
    if use_operator(P) if compiled is None else compiled:
        grad_p, grad_q = _ext.gather_dot_backward(grad.contiguous(), P, Q, rows, cols, True, True)
        return grad_p, grad_q
    g = grad.unsqueeze(1)
    return (torch.zeros_like(P).index_add_(0, rows, Q[cols] * g),
            torch.zeros_like(Q).index_add_(0, cols, P[rows] * g))
