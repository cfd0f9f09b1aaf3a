"""Input validation at the public boundary (one place, as in scikit-learn's ``validation``).

Every public estimator and imputation loss calls :func:`check_batch` once; the internals
trust what it returns.  Errors are ``ValueError`` naming the argument and the fix.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _as_tensor(x, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"`{name}` must be a tensor or array-like of numbers; got {type(x).__name__}") from exc


def _check_float(x: Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor (float32 or float64); got {x.dtype}. "
                         f"Convert it with `{name}.double()` or `{name}.float()`.")


def check_batch(
    o,
    *,
    e=None,
    e_hat=None,
    p_hat=None,
    need_click: bool = False,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Validate one call's tensors and return ``(o, e, e_hat, p_hat)`` ready for the formulas.

    - all given tensors share one shape, 1-D ``(B,)`` (one batch) or 2-D ``(K, B)`` (K batches),
      one device, and (for the float ones) one dtype; ``o`` is returned in that dtype;
    - ``o`` holds only 0/1 (bool, integer or float);
    - ``p_hat`` is finite and in (0, 1];
    - ``e`` is finite where ``o = 1``; where ``o = 0`` it may be anything (NaN included) and is
      replaced by 0 with ``torch.where`` so it reaches neither the value nor the gradient;
    - ``e_hat`` is finite everywhere (it is used on every pair);
    - with ``need_click``, every batch has at least one click (self-normalised estimators divide
      by ``sum(o / p_hat)`` over the batch).
    """
    o = _as_tensor(o, "o")
    given = {name: _as_tensor(t, name) for name, t in (("e", e), ("e_hat", e_hat), ("p_hat", p_hat)) if t is not None}
    for name, t in given.items():
        _check_float(t, name)
    if o.dim() not in (1, 2):
        raise ValueError(f"`o` must be 1-D (one batch) or 2-D (K batches, B pairs each); got shape {tuple(o.shape)}")
    if o.numel() == 0:
        raise ValueError("`o` is empty: a batch needs at least one user-item pair")
    for name, t in given.items():
        if t.shape != o.shape:
            raise ValueError(f"`{name}` has shape {tuple(t.shape)} but `o` has shape {tuple(o.shape)}; "
                             "all inputs must describe the same user-item pairs")
        if t.device != o.device:
            raise ValueError(f"`{name}` is on {t.device} but `o` is on {o.device}; move them to one device")
    dtypes = {t.dtype for t in given.values()}
    if len(dtypes) > 1:
        raise ValueError(f"floating inputs must share one dtype; got {sorted(str(d) for d in dtypes)}. "
                         "Cast them with `.double()` (or `.float()`)")
    dtype = dtypes.pop() if dtypes else (o.dtype if o.is_floating_point() else torch.get_default_dtype())

    if o.dtype == torch.bool:
        clicked = o
    else:
        if not bool(((o == 0) | (o == 1)).all()):
            raise ValueError("`o` (click indicators) must contain only 0 and 1; "
                             "pass a bool tensor or round your indicators")
        clicked = o == 1
    o = clicked.to(dtype)

    p = given.get("p_hat")
    if p is not None:
        if not bool(torch.isfinite(p).all()):
            raise ValueError("`p_hat` contains NaN or inf; propensities must be finite numbers in (0, 1]")
        if not bool(((p > 0) & (p <= 1)).all()):
            lo, hi = float(p.min()), float(p.max())
            raise ValueError(f"`p_hat` must lie in (0, 1]; got values in [{lo:.3g}, {hi:.3g}]. "
                             "Clip the propensity model's output, e.g. `p_hat.clamp(gamma, 1)` with gamma > 0")

    err = given.get("e")
    if err is not None:
        if not bool(torch.isfinite(err[clicked]).all()):
            raise ValueError("`e` is NaN or inf on a clicked pair (o = 1); prediction errors must be finite "
                             "where the conversion label is observed (NaN is allowed only where o = 0)")
        err = torch.where(clicked, err, torch.zeros((), dtype=err.dtype, device=err.device))

    imp = given.get("e_hat")
    if imp is not None and not bool(torch.isfinite(imp).all()):
        raise ValueError("`e_hat` (imputed errors) contains NaN or inf; it is used on every pair and must be finite")

    if need_click:
        per_batch = clicked.reshape(-1, clicked.shape[-1]).any(dim=-1)
        if not bool(per_batch.all()):
            k = int((~per_batch).nonzero()[0, 0])
            where = "the batch" if clicked.dim() == 1 else f"batch {k} (row {k} of the 2-D input)"
            raise ValueError(f"{where} has no clicked pair (o.sum() == 0): the self-normalised estimator "
                             "divides by sum(o / p_hat) over the batch. Skip such batches or sample "
                             "batches that contain clicks")
    return o, err, imp, p


def check_alpha(alpha: float) -> float:
    """DR-MSE's mixing weight of eq. (10) must lie in [0, 1]."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` mixes DR-BIAS and MRDR (eq. 10) and must lie in [0, 1]; got {alpha}")
    return alpha
