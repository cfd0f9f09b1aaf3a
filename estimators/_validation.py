"""Input validation at the public boundary (one place, as in scikit-learn's ``validation``).

Every public estimator and imputation loss calls :func:`check_batch` once, the entire-space losses of
:mod:`estimators.multitask` call :func:`check_entire_space` and the closed forms of :mod:`estimators.theory` call
:func:`check_closed_form`; the internals trust what they return.  Errors are ``ValueError``
naming the argument and the fix.

Propensity floor
----------------
A formula whose highest power of ``1 / p_hat`` is ``k`` forms ``(1 / p_hat)^k`` in its value
and ``(1 / p_hat)^(k + 1)`` in its gradient with respect to ``p_hat`` (``x / p_hat**k`` is
differentiated by ``estimators.loss._divided_by_power``, which avoids autograd's
``(1 / p_hat)^(2k)``).  :func:`p_hat_floor` is the
smallest ``p_hat`` for which ``(1 / p_hat)^(k + 1)`` stays at most ``2^E``, the largest power of two
below ``finfo.max * finfo.eps``: a factor ``1 / eps`` (8e6 in float32, 4e15 in float64) is left
for the size of the errors and of the batch.  Below it the value or a gradient overflows (and
``0 * inf`` makes NaN), so a smaller ``p_hat`` is refused with a ``ValueError``::

    dtype      k = 1      k = 2      k = 3
    float32    2.2e-16    5.8e-11    1.5e-08
    float64    1.0e-146   5.9e-98    1.4e-73

The estimators and imputation losses read ``p_hat`` only where ``o = 1`` (their floor applies
there; elsewhere any ``p_hat`` in (0, 1] is fine), the closed forms of :mod:`estimators.theory`
on every pair.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)


def p_hat_floor(dtype: torch.dtype, power: int) -> float:
    """The smallest propensity a formula forming powers of ``1 / p_hat`` up to ``power`` accepts
    in ``dtype``: ``2^-floor(E / (power + 1))`` with ``2^E <= finfo.max * finfo.eps`` (a power of
    two, so the comparison is exact in every dtype).  See the module docstring for the values."""
    info = torch.finfo(dtype)
    # max < 2^maxexp and eps = 2^-nmant, so 2^(maxexp - 1 - nmant) <= max * eps: 104 (float32), 971 (float64)
    exponent = math.frexp(info.max)[1] - 1 + round(math.log2(info.eps))
    return 2.0 ** -(exponent // (power + 1))


def _as_tensor(x, name: str) -> Tensor:
    if isinstance(x, Tensor):
        t = x
    else:
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"`{name}` must be a tensor or array-like of numbers; got {type(x).__name__}") from exc
    if t.is_complex():
        raise ValueError(f"`{name}` must hold real numbers; got {t.dtype}")
    return t


def _check_float(x: Tensor, name: str) -> None:
    if x.dtype in _HALF:
        raise ValueError(f"`{name}` is {x.dtype}: use float32 or float64 (half precision is not supported: "
                         f"1/p_hat^k overflows it at ordinary propensities). Convert it with `{name}.float()`.")
    if not x.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor (float32 or float64); got {x.dtype}. "
                         f"Convert it with `{name}.double()` or `{name}.float()`.")


def _check_batch_shape(o: Tensor) -> None:
    if o.dim() not in (1, 2):
        raise ValueError(f"`o` must be 1-D (one batch) or 2-D (K batches, B pairs each); got shape {tuple(o.shape)}")
    if o.numel() == 0:
        raise ValueError("`o` is empty: a batch needs at least one user-item pair")


def _check_like(ref_name: str, ref: Tensor, given: dict[str, Tensor]) -> None:
    """Every tensor of ``given`` has ``ref``'s shape and device."""
    for name, t in given.items():
        if t.shape != ref.shape:
            raise ValueError(f"`{name}` has shape {tuple(t.shape)} but `{ref_name}` has shape {tuple(ref.shape)}; "
                             "all inputs must describe the same user-item pairs")
        if t.device != ref.device:
            raise ValueError(f"`{name}` is on {t.device} but `{ref_name}` is on {ref.device}; "
                             "move them to one device")


def _one_dtype(given: dict[str, Tensor], o: Tensor) -> torch.dtype:
    dtypes = {t.dtype for t in given.values()}
    if len(dtypes) > 1:
        names = ", ".join(f"`{n}` {t.dtype}" for n, t in given.items())
        raise ValueError(f"floating inputs must share one dtype; got {names}. "
                         "Cast them with `.double()` (or `.float()`)")
    return dtypes.pop() if dtypes else (o.dtype if o.is_floating_point() else torch.get_default_dtype())


def _clicks(o: Tensor) -> Tensor:
    """``o`` as a bool tensor, checked to hold only 0 and 1."""
    if o.dtype == torch.bool:
        return o
    if not bool(((o == 0) | (o == 1)).all()):
        raise ValueError("`o` (click indicators) must contain only 0 and 1; "
                         "pass a bool tensor or round your indicators")
    return o == 1


def _check_finite(t: Tensor, name: str, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"`{name}` ({what}) contains NaN or inf; it is used on every pair and must be finite")


def _check_unit_interval(p: Tensor, name: str) -> None:
    if not bool(torch.isfinite(p).all()):
        raise ValueError(f"`{name}` contains NaN or inf; propensities must be finite numbers in (0, 1]")
    if not bool(((p > 0) & (p <= 1)).all()):
        lo, hi = float(p.detach().min()), float(p.detach().max())
        raise ValueError(f"`{name}` must lie in (0, 1]; got values in [{lo:.3g}, {hi:.3g}]. "
                         "Clip the propensity model's output, e.g. `p_hat.clamp(gamma, 1)` with gamma > 0")


def _check_floor(p: Tensor, used: Optional[Tensor], power: int, where: str) -> None:
    """``p >= p_hat_floor(p.dtype, power)`` where ``used`` (all pairs if None)."""
    floor = p_hat_floor(p.dtype, power)
    low = p < floor if used is None else used & (p < floor)
    if bool(low.any()):
        raise ValueError(f"`p_hat` is {float(p.detach()[low].min()):.3g}{where}, below {floor:.3g}, the smallest "
                         f"propensity {p.dtype} supports here (the formula divides by p_hat^{power}; "
                         f"below that its value or gradient overflows). Clip it, `p_hat.clamp({floor:.3g}, 1)`, "
                         "or compute in float64")


def check_batch(
    o,
    *,
    e=None,
    e_hat=None,
    p_hat=None,
    need_click: bool = False,
    p_hat_power: Optional[int] = None,
    across=None,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Validate one call's tensors and return ``(o, e, e_hat, p_hat)`` ready for the formulas.

    - all given tensors share one shape, 1-D ``(B,)`` (one batch) or 2-D ``(K, B)`` (K batches),
      one device, and (for the float ones) one dtype, float32 or float64 (half precision is
      refused); ``o`` is returned in that dtype;
    - ``o`` holds only 0/1 (bool, integer or float);
    - ``p_hat`` is finite and in (0, 1];
    - ``e`` is finite where ``o = 1``; where ``o = 0`` it may be anything (NaN included) and is
      replaced by 0 with ``torch.where`` so it reaches neither the value nor the gradient;
    - ``e_hat`` is finite everywhere (it is used on every pair);
    - with ``need_click``, every batch has at least one click (self-normalised estimators divide
      by ``sum(o / p_hat)`` over the batch); with ``across``, an active
      :class:`~estimators.distributed.Reduction`, over the ranks' parts of the batch together, so
      a rank whose part has no click goes on (and every rank raises alike when none has);
    - with ``p_hat_power = k`` (for formulas that use ``p_hat`` only in terms multiplied by ``o``
      and form powers of ``1 / p_hat`` up to ``k``): ``p_hat >= p_hat_floor(dtype, k)`` where ``o = 1``,
      and ``p_hat`` is replaced by 1 where ``o = 0`` with ``torch.where``, so an unclicked pair's
      term is exactly 0 in the value and every gradient (no ``0 * inf`` for a tiny ``p_hat``).
    """
    o = _as_tensor(o, "o")
    given = {name: _as_tensor(t, name) for name, t in (("e", e), ("e_hat", e_hat), ("p_hat", p_hat)) if t is not None}
    for name, t in given.items():
        _check_float(t, name)
    _check_batch_shape(o)
    _check_like("o", o, given)
    dtype = _one_dtype(given, o)
    clicked = _clicks(o)
    o = clicked.to(dtype)

    p = given.get("p_hat")
    if p is not None:
        _check_unit_interval(p, "p_hat")
        if p_hat_power is not None:
            _check_floor(p, clicked, p_hat_power, " on a clicked pair (o = 1)")
            p = torch.where(clicked, p, torch.ones((), dtype=p.dtype, device=p.device))

    err = given.get("e")
    if err is not None:
        if not bool(torch.isfinite(err[clicked]).all()):
            raise ValueError("`e` is NaN or inf on a clicked pair (o = 1); prediction errors must be finite "
                             "where the conversion label is observed (NaN is allowed only where o = 0)")
        err = torch.where(clicked, err, torch.zeros((), dtype=err.dtype, device=err.device))

    imp = given.get("e_hat")
    if imp is not None:
        _check_finite(imp, "e_hat", "imputed errors")

    if need_click:
        counts = clicked.reshape(-1, clicked.shape[-1]).sum(dim=-1)
        if across is not None and across.active:  # the global batch's clicks, the same on every rank
            counts = across.total(counts.to(torch.float64))
        per_batch = counts > 0
        if not bool(per_batch.all()):
            k = int((~per_batch).nonzero()[0, 0])
            where = "the batch" if clicked.dim() == 1 else f"batch {k} (row {k} of the 2-D input)"
            raise ValueError(f"{where} has no clicked pair (o.sum() == 0): the self-normalised estimator "
                             "divides by sum(o / p_hat) over the batch. Skip such batches or sample "
                             "batches that contain clicks")
    return o, err, imp, p


def check_alpha(alpha: float) -> float:
    """DR-MSE's mixing weight of eq. (10) must lie in [0, 1]."""
    alpha = _number(alpha, "alpha")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` mixes DR-BIAS and MRDR (eq. 10) and must lie in [0, 1]; got {alpha}")
    return alpha


def _number(x, name: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"`{name}` must be a real number; got {type(x).__name__}") from exc


# ----------------------------------------------------------------------------------------------
# Entire-space losses: ESMM, ESCM2, Multi-IPS / Multi-DR, DDPO (estimators.multitask)
# ----------------------------------------------------------------------------------------------
#: What each optional per-pair input of an entire-space loss is, for the messages.
_ENTIRE_SPACE_TENSORS = {
    "ctr_logit": "CTR logits",
    "cvr_logit": "CVR logits",
    "delta_hat": "imputed CVR errors",
    "conv_logit": "conversion-propensity logits",
}


def check_entire_space(ctr_logit, cvr_logit, o, r, *, delta_hat=None, conv_logit=None, p_hat=None, gamma,
                       lambdas: dict):
    """Validate an entire-space loss's inputs (:mod:`estimators.multitask`); return
    ``(tensors, o, r, p_hat, gamma, lambdas)`` ready for the formulas, ``tensors`` a dict of the
    given logits / ``delta_hat`` by name.

    - ``ctr_logit``, ``cvr_logit``, ``r`` (and ``delta_hat``, ``conv_logit``, ``p_hat`` when given)
      are float32 or float64 tensors of one dtype, on ``o``'s device and of ``o``'s shape, 1-D or
      2-D; ``o`` holds only 0/1 and is returned in that dtype;
    - the logits and ``delta_hat`` are finite everywhere;
    - ``r`` is 0 or 1 where ``o = 1``; where ``o = 0`` it may be anything (NaN included) and is
      replaced by 0 with ``torch.where``, so it reaches neither the value nor the gradient;
    - ``p_hat`` (an external propensity replacing the CTR tower's in the weights) is finite and
      in (0, 1]; it is returned detached;
    - ``gamma`` (the floor of the clipped propensities ``clip(p, gamma, 1)``) lies in
      ``[p_hat_floor(dtype, 1), 1]``; every ``lambdas`` value is finite and >= 0.
    """
    o = _as_tensor(o, "o")
    named = (("ctr_logit", ctr_logit), ("cvr_logit", cvr_logit), ("r", r), ("delta_hat", delta_hat),
             ("conv_logit", conv_logit), ("p_hat", p_hat))
    given = {name: _as_tensor(t, name) for name, t in named if t is not None}
    for name, t in given.items():
        _check_float(t, name)
    _check_batch_shape(o)
    _check_like("o", o, given)
    dtype = _one_dtype(given, o)
    clicked = _clicks(o)
    o = clicked.to(dtype)
    for name, what in _ENTIRE_SPACE_TENSORS.items():
        if name in given:
            _check_finite(given[name], name, what)
    labels = given["r"]
    seen = labels[clicked]
    if not bool(((seen == 0) | (seen == 1)).all()):
        raise ValueError("`r` (conversion labels) must be 0 or 1 where o = 1; NaN (or any value) is allowed "
                         "only where o = 0, where the label is unseen")
    labels = torch.where(clicked, labels, torch.zeros((), dtype=labels.dtype, device=labels.device))
    p = given.get("p_hat")
    if p is not None:
        _check_unit_interval(p, "p_hat")
        p = p.detach()

    gamma = _number(gamma, "gamma")
    floor = p_hat_floor(dtype, 1)
    if not floor <= gamma <= 1.0:
        raise ValueError(f"`gamma` (the propensity clipping floor of the counterfactual regulariser) must lie in "
                         f"(0, 1] and be at least {floor:.3g} in {dtype} (the regulariser divides by it); got {gamma}")
    checked = {}
    for name, value in lambdas.items():
        value = _number(value, name)
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"`{name}` weighs a term of the loss and must be a finite number >= 0; got {value}")
        checked[name] = value
    tensors = {name: given[name] for name in _ENTIRE_SPACE_TENSORS if name in given}
    return tensors, o, labels, p, gamma, checked


def check_escm2(ctr_logit, cvr_logit, o, r, delta_hat=None, *, gamma, lambda_c, lambda_g):
    """:func:`check_entire_space` for ESMM / ESCM2 as the earlier callers unpack it:
    ``(ctr_logit, cvr_logit, o, r, delta_hat, gamma, lambda_c, lambda_g)``."""
    tensors, o, r, _, gamma, lam = check_entire_space(ctr_logit, cvr_logit, o, r, delta_hat=delta_hat, gamma=gamma,
                                                      lambdas={"lambda_c": lambda_c, "lambda_g": lambda_g})
    return (tensors["ctr_logit"], tensors["cvr_logit"], o, r, tensors.get("delta_hat"), gamma, lam["lambda_c"],
            lam["lambda_g"])


# ----------------------------------------------------------------------------------------------
# Closed forms (estimators.theory)
# ----------------------------------------------------------------------------------------------
def check_closed_form(*, p_hat_power: int, batched: bool = False, **named) -> list[Tensor]:
    """The named inputs of a closed form of :mod:`estimators.theory` as tensors of one floating
    dtype (float64 for integer input; float16 and bfloat16 are promoted to float32), checked:

    - each is a real tensor or array-like of numbers, all on one device, of one shape, non-empty
      (with ``batched``: 1-D ``(B,)`` or 2-D ``(K, B)``), finite;
    - ``p`` (when given) lies in (0, 1]; ``p_hat`` lies in (0, 1] and is at least
      ``p_hat_floor(dtype, p_hat_power)`` on every pair (the closed forms have no click indicators).
    """
    ts = {name: _as_tensor(x, name) for name, x in named.items()}
    (first, ref), *rest = ts.items()
    _check_like(first, ref, dict(rest))
    if ref.numel() == 0:
        raise ValueError(f"`{first}` is empty (shape {tuple(ref.shape)}): the closed forms need at least one "
                         "user-item pair")
    if batched and ref.dim() not in (1, 2):
        raise ValueError(f"`{first}` must be 1-D (one batch) or 2-D (K batches, B pairs each) for the BADR "
                         f"closed forms; got shape {tuple(ref.shape)}")
    dtype = torch.float64
    if ref.is_floating_point():
        dtype = torch.promote_types(ref.dtype, torch.float32)
    for _, t in rest:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    for name, t in ts.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"`{name}` contains NaN or inf; the closed forms need finite values on every pair")
    out = {name: t.to(dtype) for name, t in ts.items()}
    for name in ("p", "p_hat"):
        if name in out:
            _check_unit_interval(out[name], name)
    if "p_hat" in out:
        _check_floor(out["p_hat"], None, p_hat_power, "")
    return list(out.values())


def check_delta(delta: float) -> float:
    """The failure probability of a generalisation bound must lie in (0, 1)."""
    delta = _number(delta, "delta")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"`delta` is the failure probability of the bound and must lie in (0, 1); got {delta}")
    return delta


def check_finite_result(value: Tensor, what: str) -> Tensor:
    """A closed form whose value overflows the dtype for valid inputs raises instead of returning inf/NaN."""
    if not bool(torch.isfinite(value).all()):
        fix = "use larger true propensities `p`" + (" or compute in float64" if value.dtype != torch.float64 else "")
        raise ValueError(f"{what} overflows {value.dtype} for these `p` and `p_hat`: the expected click weight "
                         f"sum(p / p_hat) of a batch is too small for the expansion; {fix}")
    return value
