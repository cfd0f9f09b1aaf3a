"""Autograd wrappers of the fused DR-family losses in ``estimators._C`` (see ``csrc/``).

The extension registers two operators (schemas in ``csrc/dr_loss.cpp``)::

    cvr::prediction_loss(str estimator, Tensor x_b, Tensor r_b, Tensor p_hat_b,
                         Tensor? x_u, Tensor? xt_b, Tensor? xt_u)
        -> (Tensor loss, Tensor grad_x_b, Tensor grad_x_u)
    cvr::imputation_loss(str kind, Tensor xt_b, Tensor x_b, Tensor r_b, Tensor p_hat_b,
                         Tensor? xt_u, Tensor? x_u, float alpha)
        -> (Tensor loss, Tensor grad_xt_b, Tensor grad_xt_u)

``estimator`` and ``kind`` are the names of :mod:`estimators.training_loss`.  Each operator
computes, from logits and in the same passes, the loss and its gradients with respect to the
logits the loss differentiates (a gradient that is identically zero comes back as ``None``);
the :class:`torch.autograd.Function` s below save those gradients and scale them by the
incoming scalar gradient.  They cover the pseudo-label parameterisation; the
``imputation="error"`` mode stays on the reference.

The backend is chosen by the environment variable ``CVR_BACKEND``: ``"fused"`` (an error if
the extension is not built), ``"reference"``, or unset (fused when built).
:func:`backend` names the one in use.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

try:
    from . import _C
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR: Optional[ImportError] = exc
else:
    _IMPORT_ERROR = None
    # The overloads themselves: calling them skips the packet's Python-level overload
    # resolution, a few microseconds per call that a small batch would notice.
    _PREDICTION_OP = torch.ops.cvr.prediction_loss.default
    _IMPUTATION_OP = torch.ops.cvr.imputation_loss.default

BACKENDS = ("fused", "reference")
_DTYPES = (torch.float32, torch.float64)


def backend() -> str:
    """``"fused"`` when the losses run on the compiled operators, else ``"reference"``.

    Follows ``CVR_BACKEND`` (``"fused"``, ``"reference"`` or unset for "fused when built").
    """
    choice = os.environ.get("CVR_BACKEND", "")
    if choice == "reference" or (choice == "" and _C is None):
        return "reference"
    if choice not in ("", "fused"):
        raise ValueError(f"CVR_BACKEND must be one of {BACKENDS} or unset; got {choice!r}")
    if _C is None:
        raise RuntimeError(
            "CVR_BACKEND=fused but the extension estimators._C is not built "
            f"({_IMPORT_ERROR}); build it with `pip install --no-build-isolation -e .` "
            "(needs a C++ compiler), or unset CVR_BACKEND to use the pure-PyTorch reference")
    return "fused"


def supports(*tensors: Optional[Tensor]) -> bool:
    """Whether the compiled kernels take these logits: one float32/float64 dtype, one device
    that the extension was built for (CPU; CUDA when compiled with it)."""
    present = [t for t in tensors if t is not None]
    first = present[0]
    if first.dtype not in _DTYPES or first.device.type not in ("cpu", "cuda"):
        return False
    if first.device.type == "cuda" and not _C.with_cuda:
        return False
    return all(t.dtype == first.dtype and t.device == first.device for t in present)


def _scaled(grad: Optional[Tensor], grad_output: Tensor) -> Optional[Tensor]:
    return None if grad is None else grad * grad_output


class PredictionLoss(torch.autograd.Function):
    """``cvr::prediction_loss`` with its gradients on ``x_b`` and ``x_u`` (eqs. 2, 3, 37, 7, 13)."""

    @staticmethod
    def forward(ctx, estimator: str, x_b: Tensor, r_b: Tensor, p_hat_b: Tensor, x_u: Optional[Tensor],
                xt_b: Optional[Tensor], xt_u: Optional[Tensor]) -> Tensor:
        loss, grad_b, grad_u = _PREDICTION_OP(estimator, x_b, r_b, p_hat_b, x_u, xt_b, xt_u)
        ctx.save_for_backward(grad_b, grad_u)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_b, grad_u = ctx.saved_tensors
        return None, _scaled(grad_b, grad_output), None, None, _scaled(grad_u, grad_output), None, None


class ImputationLoss(torch.autograd.Function):
    """``cvr::imputation_loss`` with its gradients on ``xt_b`` and ``xt_u`` (eqs. 6, 8, 9, 10, 32)."""

    @staticmethod
    def forward(ctx, kind: str, xt_b: Tensor, x_b: Tensor, r_b: Tensor, p_hat_b: Tensor, xt_u: Optional[Tensor],
                x_u: Optional[Tensor], alpha: float) -> Tensor:
        loss, grad_b, grad_u = _IMPUTATION_OP(kind, xt_b, x_b, r_b, p_hat_b, xt_u, x_u, alpha)
        ctx.save_for_backward(grad_b, grad_u)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_b, grad_u = ctx.saved_tensors
        return None, _scaled(grad_b, grad_output), None, None, None, _scaled(grad_u, grad_output), None, None
