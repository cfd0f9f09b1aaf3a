"""The training losses of joint learning, from logits: functions and ``torch.nn.Module`` forms.

Every estimator and imputation loss of :mod:`estimators.registry` trains a model through these.
The quantities are the step forms of :mod:`estimators.joint_loss` (its docstring defines ``l``,
``e``, ``e_hat``, the forms of the imputed error and of the cross-entropy):

- :func:`prediction_loss` (the prediction model's loss: the estimator on the clicked batch B and
  the sampled pairs U) and :func:`imputation_loss` (the imputation model's), differentiable;
- :func:`prediction_loss_and_grads` / :func:`imputation_loss_and_grads`: the loss with its
  gradients with respect to the logits it trains, for trainers that scatter gradients themselves;
- the modules :class:`PredictionLoss` / :class:`ImputationLoss` and one class per registry entry
  (:class:`IPSLoss`, :class:`BADRLoss`, :class:`MRDRImputationLoss`, ...), which take logits and
  labels as ``torch.nn.BCEWithLogitsLoss`` does and also accept a batch of exposures with click
  indicators (``click=``).

An entry runs on the fused kernels (:mod:`estimators._ext`) when the extension implements it, the
backend is "fused", ``imputation="pseudo_label"`` and the logits share one float32/float64 dtype
and a device the extension was built for; otherwise on its step form.  The logits a loss does not
train (the imputation logits in the prediction loss, the prediction logits in the imputation
loss) and the propensities are always detached.

``reduction`` (keyword, every function and module; :mod:`estimators.distributed`): under
``torch.distributed`` with the batch split across ranks, ``"global"`` (the default) takes every
normaliser and batch sum over the global batch and returns this rank's share of the global loss,
scaled so that ``DistributedDataParallel``'s mean of the gradients is the global batch's
gradient; ``"local"`` computes each rank's shard alone.  An active reduction runs the step forms
(the fused kernels take no external normaliser).  Outside ``torch.distributed`` it changes
nothing.

Inputs are checked at these entry points (names, shapes, ``p_hat_b`` in (0, 1], labels 0/1, a
non-empty B, finite logits), with the same ``ValueError`` whichever backend would run;
``validate=False`` skips the checks for trainers whose inner loop builds its inputs correctly by
construction (scikit-learn's ``check_input=False``); the value for input the checks would refuse
is then undefined.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor, nn

from .. import _ext
from ..distributed import SINGLE, Reduction, resolve
from ..joint_loss import CROSS_ENTROPIES, IMPUTATIONS, IMPUTED_ERRORS, Form
from ..registry import (TOWER_ARGUMENTS, EstimatorSpec, ImputationLossSpec, get_entire_space, get_estimator,
                        get_imputation_loss)

__all__ = [
    "CROSS_ENTROPIES", "IMPUTATIONS", "IMPUTED_ERRORS",
    "prediction_loss", "imputation_loss", "prediction_loss_and_grads", "imputation_loss_and_grads",
    "prediction_loss_reference", "imputation_loss_reference", "make_form",
    "PredictionLoss", "ImputationLoss", "NaiveLoss", "IPSLoss", "SNIPSLoss", "EIBLoss", "DRLoss", "BADRLoss",
    "StableDRLoss", "DRImputationLoss", "MRDRImputationLoss", "DRBiasImputationLoss", "DRMSEImputationLoss",
    "TDRCLImputationLoss",
    "BADRImputationLoss",
    "EntireSpaceLoss", "ESMMLoss", "ESCM2Loss", "MultiIPSLoss", "MultiDRLoss", "DDPOLoss",
]


# ---- checks ------------------------------------------------------------------------------------
def make_form(cross_entropy: str = "logits", imputation: str = "pseudo_label", imputed_error: str = "paper",
              kind: Optional[ImputationLossSpec] = None, reduction: str | Reduction = SINGLE) -> Form:
    """The :class:`~estimators.joint_loss.Form` of a call, checked; ``imputed_error="published"``
    needs a DR-family imputation loss ``kind`` (the BADR losses define their own imputed error).
    ``reduction`` (:func:`estimators.distributed.resolve`): how the step sums across ranks."""
    if imputed_error == "published" and (kind is None or not kind.dr_family):
        from ..registry import IMPUTATION_LOSSES
        family = tuple(k for k, spec in IMPUTATION_LOSSES.items() if spec.dr_family)
        raise ValueError(f"`imputed_error`='published' applies to the DR-family imputation losses {family}; got "
                         f"imputation loss {None if kind is None else kind.name!r} (the BADR losses define their own "
                         "imputed error: 'badr' already swaps input and target); use imputed_error='paper'")
    reduction = resolve(reduction)
    if reduction.active:  # one per process group: not cached
        return Form(cross_entropy, imputation, imputed_error, reduction)
    try:
        return _form(cross_entropy, imputation, imputed_error)
    except TypeError:  # unhashable: not one of the names, which Form says
        return Form(cross_entropy, imputation, imputed_error)


@functools.lru_cache(maxsize=None)
def _form(cross_entropy: str, imputation: str, imputed_error: str) -> Form:
    """One :class:`Form` per combination: checked once, not at every step."""
    return Form(cross_entropy, imputation, imputed_error)


def _check_tensors(**tensors: Optional[Tensor]) -> None:
    """Tensors are 1-D and those over one set of pairs (``*_b``: B, ``*_u``: U) share a length."""
    groups: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"`{name}` must be a tensor; got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"`{name}` must be 1-D; got shape {tuple(t.shape)}")
        first = groups.setdefault(name[-1], (name, tuple(t.shape)))
        if first[1] != tuple(t.shape):
            raise ValueError(f"`{name}` has shape {tuple(t.shape)}, expected {first[1]} like `{first[0]}`, the other "
                             f"tensors on {'B' if name[-1] == 'b' else 'U'}")


def _check_values(trained_b: Tensor, r_b: Tensor, p_hat_b: Tensor, **logits: Optional[Tensor]) -> None:
    if trained_b.numel() == 0:
        raise ValueError("the clicked batch B is empty; a step needs at least one clicked pair")
    for name, t in logits.items():
        # The kernels and the reference treat +-inf differently (inf against NaN): neither sees one.
        if t is not None and not bool(torch.isfinite(t.detach()).all()):
            raise ValueError(f"`{name}` (logits) contains NaN or inf; a model whose logits are not finite has "
                             "diverged: lower its learning rate")
    p = p_hat_b.detach()
    if not bool(((p > 0) & (p <= 1)).all()):  # False for NaN too
        raise ValueError(f"`p_hat_b` must lie in (0, 1] (clipped learned propensities); got values in "
                         f"[{float(p.min()):.3g}, {float(p.max()):.3g}]. Clip them, e.g. `p_hat.clamp(gamma, 1)`")
    r = r_b.detach()
    if not bool(((r == 0) | (r == 1)).all()):
        raise ValueError("`r_b` (conversion labels of the clicked pairs) must hold only 0 and 1")


def _require(spec_name: str, what: str, **tensors: Optional[Tensor]) -> None:
    missing = [name for name, t in tensors.items() if t is None]
    if missing:
        names = " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
        raise ValueError(f"{what} {spec_name!r} needs {names} (the logits on the sampled pairs U and the other "
                         "model's logits on B)")


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:  # False for NaN too
        raise ValueError(f"`alpha` mixes DR-BIAS and MRDR (eq. 10) and must lie in [0, 1]; got {alpha}")
    return alpha


def _prepare_prediction(estimator: str, x_b, r_b, p_hat_b, x_u, xt_b, xt_u, imputation, cross_entropy,
                        validate: bool, reduction: str | Reduction) -> tuple[EstimatorSpec, Form, bool]:
    spec = get_estimator(estimator)
    if spec.step is None:
        raise ValueError(f"estimator {estimator!r} has no joint-learning form (registry entry without `step`)")
    form = make_form(cross_entropy, imputation, reduction=reduction)
    if validate:
        if spec.needs_u:
            _require(estimator, "estimator", x_u=x_u, xt_b=xt_b, xt_u=xt_u)
        _check_tensors(x_b=x_b, r_b=r_b, p_hat_b=p_hat_b, xt_b=xt_b, x_u=x_u, xt_u=xt_u)
        _check_values(x_b, r_b, p_hat_b, x_b=x_b, x_u=x_u, xt_b=xt_b, xt_u=xt_u)
    used = (x_b, x_u, xt_b, xt_u) if spec.needs_u else (x_b,)
    # The kernels take no external normaliser: an active reduction runs the step form.
    fused = imputation == "pseudo_label" and not form.reduction.active and _ext.loss_kernels(
        "prediction", estimator, *used)
    return spec, form, fused


def _prepare_imputation(kind: str, xt_b, x_b, r_b, p_hat_b, xt_u, x_u, alpha, imputation, cross_entropy,
                        imputed_error, validate: bool,
                        reduction: str | Reduction) -> tuple[ImputationLossSpec, Form, bool, dict]:
    spec = get_imputation_loss(kind)
    form = make_form(cross_entropy, imputation, imputed_error, spec, reduction)
    params = {"alpha": _check_alpha(alpha)} if "alpha" in spec.params else {}
    if validate:
        if spec.needs_u:
            _require(kind, "imputation loss", xt_u=xt_u, x_u=x_u)
        _check_tensors(xt_b=xt_b, x_b=x_b, r_b=r_b, p_hat_b=p_hat_b, xt_u=xt_u, x_u=x_u)
        _check_values(xt_b, r_b, p_hat_b, xt_b=xt_b, x_b=x_b, xt_u=xt_u, x_u=x_u)
    used = (xt_b, x_b, xt_u, x_u) if spec.needs_u else (xt_b, x_b)
    fused = imputation == "pseudo_label" and not form.reduction.active and _ext.loss_kernels(
        "imputation", kind, *used)
    return spec, form, fused, params


def _detached(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach()


# ---- references (the step forms with the right inputs detached) ---------------------------------
def prediction_loss_reference(estimator: str, x_b: Tensor, r_b: Tensor, p_hat_b: Tensor, x_u: Optional[Tensor] = None,
                              xt_b: Optional[Tensor] = None, xt_u: Optional[Tensor] = None,
                              imputation: str = "pseudo_label", cross_entropy: str = "logits", *,
                              reduction: str | Reduction = "global") -> Tensor:
    """:func:`prediction_loss` on the pure-PyTorch step form of the registry entry ``estimator``."""
    spec = get_estimator(estimator)
    return spec.step(x_b, r_b, p_hat_b.detach(), x_u, _detached(xt_b), _detached(xt_u),
                     make_form(cross_entropy, imputation, reduction=reduction))


def imputation_loss_reference(kind: str, xt_b: Tensor, x_b: Tensor, r_b: Tensor, p_hat_b: Tensor,
                              xt_u: Optional[Tensor] = None, x_u: Optional[Tensor] = None, alpha: float = 0.5,
                              imputation: str = "pseudo_label", cross_entropy: str = "logits",
                              imputed_error: str = "paper", *, reduction: str | Reduction = "global") -> Tensor:
    """:func:`imputation_loss` on the pure-PyTorch step form of the registry entry ``kind``."""
    spec = get_imputation_loss(kind)
    form = make_form(cross_entropy, imputation, imputed_error, spec, reduction)
    params = {"alpha": alpha} if "alpha" in spec.params else {}
    return spec.step(xt_b, x_b.detach(), r_b, p_hat_b.detach(), xt_u, _detached(x_u), form, **params)


# ---- differentiable losses ---------------------------------------------------------------------
def prediction_loss(
    estimator: str,
    x_b: Tensor,
    r_b: Tensor,
    p_hat_b: Tensor,
    x_u: Optional[Tensor] = None,
    xt_b: Optional[Tensor] = None,
    xt_u: Optional[Tensor] = None,
    imputation: str = "pseudo_label",
    cross_entropy: str = "logits",
    *,
    validate: bool = True,
    reduction: str | Reduction = "global",
) -> Tensor:
    """The prediction model's loss of one joint-learning step: the estimator ``estimator`` (a
    registry name) from the prediction logits ``x_b`` on the clicked batch B (labels ``r_b``,
    propensities ``p_hat_b``) and, where the estimator reads them, the prediction logits ``x_u``
    on the sampled pairs U and the imputation logits ``xt_b`` / ``xt_u`` (detached).
    Differentiable in ``x_b`` and ``x_u``.

    With ``w = 1 / p_hat`` and ``N`` the estimator's normaliser: ``naive`` (eq. 2)
    ``mean_B l(x, r)``; ``ips`` (eq. 3) ``sum_B w l(x, r) / b``; ``snips`` (eq. 37)
    ``... / sum_B w``; ``dr`` (eq. 7, DR-JL), ``eib`` (eq. 5, ``w = 1``) and ``badr`` (eq. 13)
    ``[sum_B w e - sum_B e_hat + sum_U e_hat] / N`` with ``N = |U|`` for DR and EIB and
    ``N = sum_B w`` for BADR.
    """
    spec, form, fused = _prepare_prediction(estimator, x_b, r_b, p_hat_b, x_u, xt_b, xt_u, imputation, cross_entropy,
                                            validate, reduction)
    if fused:
        return _ext.prediction_loss(estimator, x_b, r_b.to(x_b.dtype), p_hat_b.detach().to(x_b.dtype), x_u,
                                    _detached(xt_b), _detached(xt_u), cross_entropy)
    return spec.step(x_b, r_b, p_hat_b.detach(), x_u, _detached(xt_b), _detached(xt_u), form)


def imputation_loss(
    kind: str,
    xt_b: Tensor,
    x_b: Tensor,
    r_b: Tensor,
    p_hat_b: Tensor,
    xt_u: Optional[Tensor] = None,
    x_u: Optional[Tensor] = None,
    alpha: float = 0.5,
    imputation: str = "pseudo_label",
    cross_entropy: str = "logits",
    imputed_error: str = "paper",
    *,
    validate: bool = True,
    reduction: str | Reduction = "global",
) -> Tensor:
    """The imputation model's loss of one joint-learning step: the imputation loss ``kind`` (a
    registry name) from the imputation logits ``xt_b`` on B (and ``xt_u`` on U where the loss reads
    U), the prediction logits ``x_b`` / ``x_u`` (detached), labels and propensities on B.
    Differentiable in ``xt_b`` and ``xt_u``.

    ``dr`` (eq. 6 as a batch sum) ``sum_B w (e - e_hat)^2``; ``mrdr`` (eq. 8)
    ``sum_B w^2 (1 - p_hat) (e - e_hat)^2``; ``dr_bias`` (eq. 9) ``sum_B w^3 (1 - p_hat)^2
    (e - e_hat)^2``; ``dr_mse`` (eq. 10) ``alpha * dr_bias + (1 - alpha) * mrdr``; ``tdr_cl``
    (TDR-CL's (C1)) ``sum_B w (e - e_hat - eps_hat h)^2`` with ``h = 1 / p_hat - 1`` and
    ``eps_hat`` refitted on B, detached (:mod:`estimators.targeting`); ``badr_paper`` eq. 32 on B
    and U; ``badr`` eq. 32 as the published code trains it (see
    :mod:`estimators.joint_loss`).  ``imputed_error`` (``"paper"`` or ``"published"``) applies to
    the DR family only; ``"published"`` with a BADR loss raises ``ValueError``.
    """
    spec, form, fused, params = _prepare_imputation(kind, xt_b, x_b, r_b, p_hat_b, xt_u, x_u, alpha, imputation,
                                                    cross_entropy, imputed_error, validate, reduction)
    if fused:
        return _ext.imputation_loss(kind, xt_b, x_b.detach(), r_b.to(xt_b.dtype), p_hat_b.detach().to(xt_b.dtype),
                                    xt_u, _detached(x_u), float(alpha), cross_entropy, imputed_error)
    return spec.step(xt_b, x_b.detach(), r_b, p_hat_b.detach(), xt_u, _detached(x_u), form, **params)


# ---- losses with their gradients ---------------------------------------------------------------
def _grads(loss: Tensor, *logits: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``(loss, d loss / d logits...)`` by autograd, None for a logit that is absent or unused."""
    present = [t for t in logits if t is not None]
    grads = iter(torch.autograd.grad(loss, present, allow_unused=True) if present else ())
    return (loss.detach(), *(None if t is None else next(grads) for t in logits))


def prediction_loss_and_grads(
    estimator: str,
    x_b: Tensor,
    r_b: Tensor,
    p_hat_b: Tensor,
    x_u: Optional[Tensor] = None,
    xt_b: Optional[Tensor] = None,
    xt_u: Optional[Tensor] = None,
    imputation: str = "pseudo_label",
    cross_entropy: str = "logits",
    *,
    validate: bool = True,
    reduction: str | Reduction = "global",
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``(loss, d loss / d x_b, d loss / d x_u)`` of :func:`prediction_loss`, for trainers that
    scatter the logits' gradients themselves: one call of ``cvr::prediction_loss_and_grads`` on the
    fused backend (no autograd graph), else autograd on the step form.  A gradient the loss does
    not have (or whose logits are absent) is None.  Labels and propensities are cast to the
    logits' dtype."""
    spec, form, fused = _prepare_prediction(estimator, x_b, r_b, p_hat_b, x_u, xt_b, xt_u, imputation, cross_entropy,
                                            validate, reduction)
    r_b, p_hat_b = r_b.to(x_b.dtype), p_hat_b.detach().to(x_b.dtype)
    xt_b, xt_u = _detached(xt_b), _detached(xt_u)
    if fused:
        return _ext.prediction_loss_and_grads(estimator, x_b.detach(), r_b, p_hat_b, _detached(x_u), xt_b, xt_u,
                                              cross_entropy)
    x_b = x_b.detach().requires_grad_()
    x_u = None if x_u is None or not spec.needs_u else x_u.detach().requires_grad_()
    with torch.enable_grad():
        return _grads(spec.step(x_b, r_b, p_hat_b, x_u, xt_b, xt_u, form), x_b, x_u)


def imputation_loss_and_grads(
    kind: str,
    xt_b: Tensor,
    x_b: Tensor,
    r_b: Tensor,
    p_hat_b: Tensor,
    xt_u: Optional[Tensor] = None,
    x_u: Optional[Tensor] = None,
    alpha: float = 0.5,
    imputation: str = "pseudo_label",
    cross_entropy: str = "logits",
    imputed_error: str = "paper",
    *,
    validate: bool = True,
    reduction: str | Reduction = "global",
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``(loss, d loss / d xt_b, d loss / d xt_u)`` of :func:`imputation_loss`, as
    :func:`prediction_loss_and_grads` (``cvr::imputation_loss_and_grads`` on the fused backend)."""
    spec, form, fused, params = _prepare_imputation(kind, xt_b, x_b, r_b, p_hat_b, xt_u, x_u, alpha, imputation,
                                                    cross_entropy, imputed_error, validate, reduction)
    r_b, p_hat_b = r_b.to(xt_b.dtype), p_hat_b.detach().to(xt_b.dtype)
    x_b, x_u = x_b.detach(), _detached(x_u)
    if fused:
        return _ext.imputation_loss_and_grads(kind, xt_b.detach(), x_b, r_b, p_hat_b, _detached(xt_u), x_u,
                                              float(alpha), cross_entropy, imputed_error)
    xt_b = xt_b.detach().requires_grad_()
    xt_u = None if xt_u is None else xt_u.detach().requires_grad_(spec.grad_on_u)
    with torch.enable_grad():
        loss = spec.step(xt_b, x_b, r_b, p_hat_b, xt_u, x_u, form, **params)
        return _grads(loss, xt_b if spec.grad_on_b else None, xt_u if spec.grad_on_u else None)


# ---- modules -----------------------------------------------------------------------------------
def _clicked(click, like: Tensor) -> Tensor:
    """``click`` as a bool mask over the rows of ``like``."""
    click = torch.as_tensor(click, device=like.device)
    if click.shape != like.shape:
        raise ValueError(f"`click` has shape {tuple(click.shape)} but the logits have shape {tuple(like.shape)}")
    if click.dtype != torch.bool:
        if not bool(((click == 0) | (click == 1)).all()):
            raise ValueError("`click` (click indicators) must hold only 0 and 1")
        click = click == 1
    return click


def _across_ranks(reduction: Reduction) -> dict:
    """The keyword that tells a registry function how to sum across ranks: none in one process (so
    an entry registered without the keyword still runs there), the resolved reduction otherwise."""
    return {"reduction": reduction} if reduction.world_size > 1 else {}


def _any_click(clicked: Tensor, reduction: Reduction) -> bool:
    """Whether the batch has a click: on any rank's shard under an active ``reduction`` (so that
    every rank takes the same branch and joins the same collectives)."""
    if not reduction.active:
        return bool(clicked.any())
    return bool(reduction.total(clicked.sum().to(torch.float64)) > 0)


def _exposure_errors(form: Form, x: Tensor, r: Tensor, click: Tensor) -> Tensor:
    """``e = l(x, r)`` over a batch of exposures, from a finite placeholder label where ``click`` is 0
    (the unclicked rows' labels, NaN or anything, are never read; the estimators then drop ``e``
    there)."""
    if r.shape != x.shape:
        raise ValueError(f"`r_b` has shape {tuple(r.shape)} but the logits have shape {tuple(x.shape)}")
    return form.l(x, torch.where(click, r.to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device)))


def _reject_u(x_u: Optional[Tensor], other_u: Optional[Tensor]) -> None:
    if x_u is not None or other_u is not None:
        raise ValueError("with `click`, the batch of exposures is D itself (the imputed errors are summed over it); "
                         "do not pass logits on sampled pairs U")


class PredictionLoss(nn.Module):
    """The prediction model's loss of the registry estimator ``estimator`` as a module.

    ``loss(x_b, r_b, p_hat_b, x_u=None, xt_b=None, xt_u=None, click=None)`` takes logits and
    labels as ``torch.nn.BCEWithLogitsLoss`` does, then the propensities and, where the estimator
    reads imputed errors (EIB, DR, BADR), the prediction logits on sampled pairs U and the
    imputation logits (detached inside).  Two ways to call it:

    - joint learning (Algorithm 1): ``x_b``, ``r_b``, ``p_hat_b``, ``xt_b`` are the clicked batch B,
      ``x_u`` / ``xt_u`` the pairs U sampled from all pairs; the value is :func:`prediction_loss`
      (the fused kernels where they apply);
    - a batch of exposures D: pass ``click``, the 0/1 click indicators of its rows, and no U.  The
      value is then the estimator's equation over D (the registry entry's function: eqs. 2, 3, 5,
      7, 13, 37) with ``e = l(x, r)`` on the clicked rows and ``e_hat = l(x, sigmoid(x_t))`` on all
      rows; ``r_b`` may hold anything (NaN included) where ``click = 0``: those labels are never
      read.  A batch without clicks gives a zero loss with zero gradients for the self-normalised
      estimators (SNIPS, BADR), which are undefined there (0 / 0); naive and IPS are 0 there and
      DR and EIB the mean imputed error.  Test ``click.any()`` to skip such a batch's optimiser step.

    ``reduction`` (:mod:`estimators.distributed`), read from ``torch.distributed`` at each call:
    wrapped in ``DistributedDataParallel`` with the batch split across ranks, ``"global"`` (the
    default) normalises by the global batch and gives DDP the global batch's gradient; ``"local"``
    each rank's shard alone.  (With ``click`` and ``"global"``, a batch is "without clicks" when no
    rank's shard has one; every rank's shard of a self-normalised estimator's batch needs a click.)
    """

    def __init__(self, estimator: str, *, cross_entropy: str = "logits", imputation: str = "pseudo_label",
                 reduction: str = "global") -> None:
        super().__init__()
        self.spec = get_estimator(estimator)
        if self.spec.step is None:
            raise ValueError(f"estimator {estimator!r} has no joint-learning form")
        self.form = make_form(cross_entropy, imputation)
        resolve(reduction)  # checks the name
        self.estimator, self.cross_entropy, self.imputation = estimator, cross_entropy, imputation
        self.reduction = reduction

    def extra_repr(self) -> str:
        return (f"estimator={self.estimator!r}, cross_entropy={self.cross_entropy!r}, imputation={self.imputation!r}, "
                f"reduction={self.reduction!r}")

    def forward(self, x_b: Tensor, r_b: Tensor, p_hat_b: Tensor, x_u: Optional[Tensor] = None,
                xt_b: Optional[Tensor] = None, xt_u: Optional[Tensor] = None, *,
                click: Optional[Tensor] = None) -> Tensor:
        red = resolve(self.reduction)
        if click is None:
            return prediction_loss(self.estimator, x_b, r_b, p_hat_b, x_u, xt_b, xt_u, self.imputation,
                                   self.cross_entropy, reduction=red)
        _reject_u(x_u, xt_u)
        clicked = _clicked(click, x_b)
        if self.spec.self_normalised and not _any_click(clicked, red):
            return x_b.sum() * 0
        if self.spec.needs_imputation and xt_b is None:
            raise ValueError(f"estimator {self.estimator!r} needs xt_b, the imputation logits of the batch")
        inputs = {"e": _exposure_errors(self.form, x_b, r_b, clicked), "o": clicked,
                  "p_hat": p_hat_b.detach().to(x_b.dtype)}
        if self.spec.needs_imputation:
            inputs["e_hat"] = self.form.imputed(x_b, xt_b.detach())
        return self.spec.function(*(inputs[k] for k in self.spec.reads), **_across_ranks(red))


class ImputationLoss(nn.Module):
    """The imputation model's loss of the registry entry ``kind`` as a module.

    ``loss(xt_b, x_b, r_b, p_hat_b, xt_u=None, x_u=None, click=None)``: the imputation logits being
    trained first, then the prediction logits (detached inside), labels and propensities on B, and
    the imputation and prediction logits on U where the loss reads them (BADR's); the value is
    :func:`imputation_loss`.  With ``click`` (a batch of exposures D, no U), the value is the
    loss's equation over D (the registry entry's function: eqs. 6, 8, 9, 10, 32) with the imputed
    error of ``imputed_error``; both BADR variants are eq. 32 there (the published variant differs
    only in how it is trained on sampled pairs).  Every imputation loss is a sum or mean over the
    clicked pairs, so a batch without clicks gives a zero loss with zero gradients.  ``reduction``
    as in :class:`PredictionLoss`.
    """

    def __init__(self, kind: str, *, alpha: float = 0.5, cross_entropy: str = "logits",
                 imputation: str = "pseudo_label", imputed_error: str = "paper", reduction: str = "global") -> None:
        super().__init__()
        self.spec = get_imputation_loss(kind)
        self.form = make_form(cross_entropy, imputation, imputed_error, self.spec)
        resolve(reduction)  # checks the name
        self.kind, self.alpha, self.reduction = kind, _check_alpha(alpha), reduction
        self.cross_entropy, self.imputation, self.imputed_error = cross_entropy, imputation, imputed_error

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, alpha={self.alpha}, cross_entropy={self.cross_entropy!r}, "
                f"imputation={self.imputation!r}, imputed_error={self.imputed_error!r}, reduction={self.reduction!r}")

    def forward(self, xt_b: Tensor, x_b: Tensor, r_b: Tensor, p_hat_b: Tensor, xt_u: Optional[Tensor] = None,
                x_u: Optional[Tensor] = None, *, click: Optional[Tensor] = None) -> Tensor:
        red = resolve(self.reduction)
        if click is None:
            return imputation_loss(self.kind, xt_b, x_b, r_b, p_hat_b, xt_u, x_u, self.alpha, self.imputation,
                                   self.cross_entropy, self.imputed_error, reduction=red)
        _reject_u(xt_u, x_u)
        clicked = _clicked(click, xt_b)
        if not _any_click(clicked, red):
            return xt_b.sum() * 0
        x = x_b.detach().to(xt_b.dtype)
        e_hat = self.form.swapped(xt_b, x) if self.imputed_error == "published" else self.form.imputed(x, xt_b)
        params = {"alpha": self.alpha} if "alpha" in self.spec.params else {}
        return self.spec.function(_exposure_errors(self.form, x, r_b, clicked), e_hat, clicked,
                                  p_hat_b.detach().to(xt_b.dtype), **params, **_across_ranks(red))


def _named_prediction_loss(estimator: str, cls_name: str) -> type:
    spec = get_estimator(estimator)

    def __init__(self, *, cross_entropy: str = "logits", imputation: str = "pseudo_label",
                 reduction: str = "global") -> None:
        PredictionLoss.__init__(self, estimator, cross_entropy=cross_entropy, imputation=imputation,
                                reduction=reduction)

    doc = (f"The {spec.description} estimator, {spec.equation}, as a :class:`PredictionLoss` "
           f"(``estimator={estimator!r}``).")
    return type(cls_name, (PredictionLoss,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


def _named_imputation_loss(kind: str, cls_name: str) -> type:
    spec = get_imputation_loss(kind)

    def __init__(self, *, alpha: float = 0.5, cross_entropy: str = "logits", imputation: str = "pseudo_label",
                 imputed_error: str = "paper", reduction: str = "global") -> None:
        ImputationLoss.__init__(self, kind, alpha=alpha, cross_entropy=cross_entropy, imputation=imputation,
                                imputed_error=imputed_error, reduction=reduction)

    doc = f"{spec.description}, {spec.equation}, as an :class:`ImputationLoss` (``kind={kind!r}``)."
    return type(cls_name, (ImputationLoss,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


NaiveLoss = _named_prediction_loss("naive", "NaiveLoss")
IPSLoss = _named_prediction_loss("ips", "IPSLoss")
SNIPSLoss = _named_prediction_loss("snips", "SNIPSLoss")
EIBLoss = _named_prediction_loss("eib", "EIBLoss")
DRLoss = _named_prediction_loss("dr", "DRLoss")
BADRLoss = _named_prediction_loss("badr", "BADRLoss")
StableDRLoss = _named_prediction_loss("stabledr", "StableDRLoss")
DRImputationLoss = _named_imputation_loss("dr", "DRImputationLoss")
MRDRImputationLoss = _named_imputation_loss("mrdr", "MRDRImputationLoss")
DRBiasImputationLoss = _named_imputation_loss("dr_bias", "DRBiasImputationLoss")
DRMSEImputationLoss = _named_imputation_loss("dr_mse", "DRMSEImputationLoss")
TDRCLImputationLoss = _named_imputation_loss("tdr_cl", "TDRCLImputationLoss")


class BADRImputationLoss(ImputationLoss):
    """BADR's imputation loss, eq. (32), as an :class:`ImputationLoss`: ``variant="published"`` (the
    registry's ``badr``, as the published code trains it, which reproduces Table 3) or ``"paper"``
    (``badr_paper``, eq. 32 as written)."""

    def __init__(self, *, variant: str = "published", cross_entropy: str = "logits",
                 imputation: str = "pseudo_label", reduction: str = "global") -> None:
        if variant not in ("published", "paper"):
            raise ValueError(f"`variant` must be 'published' or 'paper'; got {variant!r}")
        super().__init__("badr" if variant == "published" else "badr_paper", cross_entropy=cross_entropy,
                         imputation=imputation, reduction=reduction)


# ---- entire-space objectives (estimators.multitask, registry ENTIRE_SPACE) ----------------------
class EntireSpaceLoss(nn.Module):
    """The entire-space objective ``name`` of :data:`estimators.registry.ENTIRE_SPACE` as a module.

    ``loss(ctr_logit, cvr_logit, click, conversion, delta_hat=None, conv_logit=None, p_hat=None)``
    scores a batch of exposures from the towers' logits as ``torch.nn.BCEWithLogitsLoss`` takes
    logits and labels: ``click`` the click indicators, ``conversion`` the conversion labels (NaN
    allowed where ``click = 0``, never read there); ``delta_hat`` (imputation tower) and
    ``conv_logit`` (DDPO's conversion tower) where the objective reads them; ``p_hat`` an optional
    external propensity replacing the CTR tower's.  Returns the scalar ``loss``; its parts (CTR,
    CTCVR, CVR terms) of the last call are in ``self.last_parts`` (detached).  The propensity
    weights are the CTR tower's probabilities clipped to ``[gamma, 1]`` and DETACHED (see
    :mod:`estimators.multitask`).  ``loss.from_outputs(outputs, click, conversion)`` takes the dict
    a :class:`~estimators.training.models.MMoE` / :class:`~estimators.training.models.EntireSpaceMF`
    returns.  ``params`` override the entry's defaults (``gamma``, ``lambda_c``, ...);
    ``reduction`` across data-parallel ranks (:mod:`estimators.distributed`).
    """

    def __init__(self, name: str, *, reduction: str = "global", **params) -> None:
        super().__init__()
        self.spec = get_entire_space(name)
        resolve(reduction)  # a bad mode is refused here, not at the first call
        self.reduction = reduction
        unknown = set(params) - set(self.spec.params)
        if unknown:
            raise ValueError(f"entire-space objective {name!r} takes the parameters {tuple(self.spec.params)}; "
                             f"got {sorted(unknown)}")
        self.name, self.params = name, {**self.spec.params, **params}
        self.last_parts: dict[str, Tensor] = {}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.params.items())

    @property
    def towers(self) -> tuple[str, ...]:
        """The towers the objective reads (build the model with ``tasks=loss.towers``)."""
        return self.spec.towers

    def from_outputs(self, outputs: dict, click, conversion, p_hat: Optional[Tensor] = None) -> Tensor:
        out = self.spec(outputs, click, conversion, p_hat=p_hat, reduction=self.reduction, **self.params)
        self.last_parts = {k: v.detach() for k, v in out.items()}
        return out["loss"]

    def forward(self, ctr_logit: Tensor, cvr_logit: Tensor, click, conversion, delta_hat: Optional[Tensor] = None,
                conv_logit: Optional[Tensor] = None, p_hat: Optional[Tensor] = None) -> Tensor:
        given = {"delta_hat": delta_hat, "conv_logit": conv_logit}
        outputs = {"ctr": ctr_logit, "cvr": cvr_logit}
        for tower, argument in TOWER_ARGUMENTS.items():
            if tower in self.spec.towers:
                if given[argument] is None:
                    raise ValueError(f"entire-space objective {self.name!r} needs `{argument}` (the {tower} tower)")
                outputs[tower] = given[argument]
            elif given[argument] is not None:
                raise ValueError(f"entire-space objective {self.name!r} reads no {tower} tower; `{argument}` must "
                                 "be None")
        return self.from_outputs(outputs, click, conversion, p_hat)


class ESMMLoss(EntireSpaceLoss):
    """ESMM, ESCM2 eq. (5): ``L_CTR + lambda_g * L_CTCVR`` (:func:`estimators.multitask.esmm_loss`)."""

    def __init__(self, *, lambda_g: float = 1.0, reduction: str = "global") -> None:
        super().__init__("esmm", lambda_g=lambda_g, reduction=reduction)


class ESCM2Loss(EntireSpaceLoss):
    """ESCM2, eq. (34): ``L_CTR + lambda_c * R + lambda_g * L_CTCVR`` with the counterfactual CVR
    risk ``R`` of ``regularizer``: ``"ips"`` (eq. 21), ``"dr"`` (eqs. 23-26, needs ``delta_hat``)
    or ``"badr"`` (BADR eqs. 13 and 32, needs ``delta_hat``); propensities ``clip(o_hat, gamma, 1)``,
    detached (:func:`estimators.multitask.escm2_loss`)."""

    def __init__(self, regularizer: str = "ips", *, lambda_c: float = 0.1, lambda_g: float = 1.0,
                 gamma: float = 0.05, reduction: str = "global") -> None:
        if regularizer not in ("ips", "dr", "badr"):
            raise ValueError(f"`regularizer` must be one of ('ips', 'dr', 'badr'); got {regularizer!r} "
                             "(ESMM, without regulariser, is ESMMLoss)")
        super().__init__(f"escm2_{regularizer}", lambda_c=lambda_c, lambda_g=lambda_g, gamma=gamma,
                         reduction=reduction)
        self.regularizer = regularizer


class MultiIPSLoss(EntireSpaceLoss):
    """Multi-IPS (Zhang et al. 2020): ``L_CTR + lambda_c * R_IPS`` (:func:`estimators.multitask.multi_ips_loss`)."""

    def __init__(self, *, lambda_c: float = 1.0, gamma: float = 0.05, reduction: str = "global") -> None:
        super().__init__("multi_ips", lambda_c=lambda_c, gamma=gamma, reduction=reduction)


class MultiDRLoss(EntireSpaceLoss):
    """Multi-DR (Zhang et al. 2020): ``L_CTR + lambda_c * (R_DR_err + R_DR_imp)``
    (:func:`estimators.multitask.multi_dr_loss`; needs ``delta_hat``)."""

    def __init__(self, *, lambda_c: float = 1.0, gamma: float = 0.05, reduction: str = "global") -> None:
        super().__init__("multi_dr", lambda_c=lambda_c, gamma=gamma, reduction=reduction)


class DDPOLoss(EntireSpaceLoss):
    """DDPO (Su et al. 2024), its debiasing components, eqs. (6), (9), (10), (15)-(18)
    (:func:`estimators.multitask.ddpo_loss`; needs ``conv_logit``)."""

    def __init__(self, *, lambda_c: float = 1.0, lambda_p: float = 1.0, lambda_g: float = 1.0,
                 gamma: float = 0.05, reduction: str = "global") -> None:
        super().__init__("ddpo", lambda_c=lambda_c, lambda_p=lambda_p, lambda_g=lambda_g, gamma=gamma,
                         reduction=reduction)
