"""The losses of one joint-learning step, from logits: the pure-PyTorch reference.

In joint learning (BADR paper Algorithm 1; Wang et al. 2019) a step sees a clicked batch B of
``b`` pairs with labels ``r`` and ``G * b`` pairs U drawn uniformly from ALL user-item pairs.
The imputation model is parameterised, as in the published code, as a pseudo-label model: with
``l(x, t) = softplus(x) - t * x`` the binary cross-entropy of ``sigmoid(x)`` against ``t``,

    e     = l(x, r)              prediction error on a clicked pair,
    e_hat = l(x, sigmoid(x_t))   imputed error: the prediction scored against the imputed label,

where ``x`` are prediction logits and ``x_t`` imputation logits; ``w = 1 / p_hat`` on B.
:class:`Form` says how a step writes them:

- ``imputation="error"`` reads ``x_t`` as the imputed error itself (direct error regression, the
  papers' eqs. 5-10 literally);
- ``cross_entropy="clamped"`` computes ``l`` as the published code does,
  ``F.binary_cross_entropy(sigmoid(x), t)`` (:func:`bce_clamped`), which saturates; only it
  reproduces the published tables; ``"logits"`` is the exact softplus form;
- ``imputed_error`` is how the DR-family imputation losses (eqs. 6, 8, 9, 10; TDR-CL's (C1)) write
  ``e_hat`` in the imputation step: ``"paper"`` as above, the gradient reaching ``x_t`` through the
  target, or ``"published"`` as the published DR-JL lineage code does (the code behind the
  baselines' numbers in the BADR paper's Table 3), input and target swapped,
  ``e_hat = l(x_t, sigmoid(x))``, the gradient reaching ``x_t`` through the input.  The BADR losses define their own imputed
  error (``badr`` is the published, swapped form; ``badr_paper`` is eq. 32).

Under data parallelism the batch B (and U) is split across ranks; ``form.reduction``
(:mod:`estimators.distributed`) then makes every sum that spans the batch the global batch's
(:meth:`~estimators.distributed.Reduction.total`) and each rank's result its share of the global
loss (:meth:`~estimators.distributed.Reduction.share`); a single process's reduction is inactive
and every form below computes exactly what it computes without it.

Each function below is the step form of one entry of :mod:`estimators.registry`; the registry
names them, the fused kernels (``csrc/``) must equal them, and
:mod:`estimators.training.losses` calls them with the logits that the loss does not train
already detached.  Prediction forms take ``(x_b, r_b, p_hat_b, x_u, xt_b, xt_u, form)``,
imputation forms ``(xt_b, x_b, r_b, p_hat_b, xt_u, x_u, form, **params)``; a tensor a form does
not read may be None.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .distributed import SINGLE, Reduction
from .targeting import clever_covariate, targeting_epsilon

#: How the imputation model's output is read: a pseudo-label logit, or the imputed error.
IMPUTATIONS = ("pseudo_label", "error")
#: How the cross-entropy ``l`` is computed.
CROSS_ENTROPIES = ("logits", "clamped")
#: How a DR-family imputation loss writes the imputed error in the imputation step.
IMPUTED_ERRORS = ("paper", "published")


def bce_with_logits(x: Tensor, t: Tensor) -> Tensor:
    """``l(sigmoid(x), t) = softplus(x) - t * x``, finite for any finite logit."""
    return F.softplus(x) - t * x


def bce_clamped(x: Tensor, t: Tensor) -> Tensor:
    """``l`` as the published code computes it: ``F.binary_cross_entropy(sigmoid(x), t)``.

    Logs are clamped at -100 and, once ``sigmoid(x)`` rounds to exactly 0 or 1, the gradient
    is zero.  This matters in the published BADR runs: with the tuned imputation learning rate
    the imputation logits grow to ~1e7, where this form saturates (bounded errors, no gradient)
    and the exact form :func:`bce_with_logits` does not (Coat AUC 0.76 vs 0.62).

    The value is linear in ``t``; its derivative there, ``-(max(log p, -100) -
    max(log(1 - p), -100))``, is what this function's target gradient is.  (Torch
    differentiates the target as ``-logit(p)``, unclamped: infinite once ``p`` rounds to 0 or
    1, which a float32 logit beyond ~17 does, and a DR-family imputation loss, whose gradient
    reaches the imputation model through the target, then turns NaN: Yahoo! R3's DR-JL at its
    first step.)  The BADR losses never differentiate a target, so they are unaffected.
    """
    p = torch.sigmoid(x)
    value = F.binary_cross_entropy(p, t.detach(), reduction="none")
    if not t.requires_grad:
        return value
    with torch.no_grad():
        gap = torch.log(p).clamp(min=-100) - torch.log1p(-p).clamp(min=-100)
    return value - (t - t.detach()) * gap


@dataclass(frozen=True)
class Form:
    """How one step writes its errors (module docstring): ``cross_entropy``, ``imputation`` and
    the DR family's ``imputed_error``; and how it sums over a batch split across ranks,
    ``reduction`` (:mod:`estimators.distributed`; inactive in a single process)."""

    cross_entropy: str = "logits"
    imputation: str = "pseudo_label"
    imputed_error: str = "paper"
    reduction: Reduction = SINGLE

    def __post_init__(self) -> None:
        for name, allowed in (("cross_entropy", CROSS_ENTROPIES), ("imputation", IMPUTATIONS),
                              ("imputed_error", IMPUTED_ERRORS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}; got {getattr(self, name)!r}")

    def l(self, x: Tensor, t: Tensor) -> Tensor:  # noqa: E743 - the papers' name for the loss
        """The cross-entropy ``l(sigmoid(x), t)`` in this form."""
        return bce_clamped(x, t) if self.cross_entropy == "clamped" else bce_with_logits(x, t)

    def imputed(self, x: Tensor, xt: Tensor) -> Tensor:
        """``e_hat = l(x, sigmoid(x_t))``, or ``x_t`` itself with ``imputation="error"``."""
        return xt if self.imputation == "error" else self.l(x, torch.sigmoid(xt))

    def swapped(self, xt: Tensor, x: Tensor) -> Tensor:
        """``e_hat = l(x_t, sigmoid(x))``, input and target swapped (the published imputation
        steps), or ``x_t`` itself with ``imputation="error"``."""
        return xt if self.imputation == "error" else self.l(xt, torch.sigmoid(x))


# ---- prediction-model losses (the estimator on B and U) ----------------------------------------
def naive_step(x_b, r_b, p_hat_b, x_u, xt_b, xt_u, form: Form) -> Tensor:
    """Eq. (2) on B: ``mean_B l(x, r)``."""
    return form.reduction.mean(form.l(x_b, r_b))


def ips_step(x_b, r_b, p_hat_b, x_u, xt_b, xt_u, form: Form) -> Tensor:
    """Eq. (3): ``sum_B w l(x, r) / b``."""
    red = form.reduction
    return red.share(((1.0 / p_hat_b) * form.l(x_b, r_b)).sum() / red.total(x_b.numel(), like=x_b))


def snips_step(x_b, r_b, p_hat_b, x_u, xt_b, xt_u, form: Form) -> Tensor:
    """Eq. (37): ``sum_B w l(x, r) / sum_B w``."""
    w, red = 1.0 / p_hat_b, form.reduction
    return red.share((w * form.l(x_b, r_b)).sum() / red.total(w.sum()))


def _dr_numerator(x_b, r_b, w, x_u, xt_b, xt_u, form: Form) -> Tensor:
    """``sum_B w e - sum_B e_hat + sum_U e_hat``: eq. (7)'s sum with U standing for all pairs."""
    return (w * form.l(x_b, r_b)).sum() - form.imputed(x_b, xt_b).sum() + form.imputed(x_u, xt_u).sum()


def eib_step(x_b, r_b, p_hat_b, x_u, xt_b, xt_u, form: Form) -> Tensor:
    """Eq. (5): ``[sum_B e - sum_B e_hat + sum_U e_hat] / |U|``, DR with ``w = 1``."""
    red = form.reduction
    numerator = _dr_numerator(x_b, r_b, torch.ones_like(x_b), x_u, xt_b, xt_u, form)
    return red.share(numerator / red.total(x_u.numel(), like=x_u))


def dr_step(x_b, r_b, p_hat_b, x_u, xt_b, xt_u, form: Form) -> Tensor:
    """Eq. (7), DR-JL: ``[sum_B w e - sum_B e_hat + sum_U e_hat] / |U|`` (as the published DR-JL code)."""
    red = form.reduction
    numerator = _dr_numerator(x_b, r_b, 1.0 / p_hat_b, x_u, xt_b, xt_u, form)
    return red.share(numerator / red.total(x_u.numel(), like=x_u))


def badr_step(x_b, r_b, p_hat_b, x_u, xt_b, xt_u, form: Form) -> Tensor:
    """Eq. (13): ``[sum_B w e - sum_B e_hat + sum_U e_hat] / sum_B w``."""
    w, red = 1.0 / p_hat_b, form.reduction
    return red.share(_dr_numerator(x_b, r_b, w, x_u, xt_b, xt_u, form) / red.total(w.sum()))


# ---- imputation-model losses -----------------------------------------------------------------
def _residual(xt_b: Tensor, x_b: Tensor, r_b: Tensor, form: Form) -> Tensor:
    """``e - e_hat`` on B with the DR family's imputed error (``form.imputed_error``)."""
    e_hat = form.swapped(xt_b, x_b) if form.imputed_error == "published" else form.imputed(x_b, xt_b)
    return form.l(x_b, r_b) - e_hat


def _squared_error(xt_b: Tensor, x_b: Tensor, r_b: Tensor, form: Form) -> Tensor:
    """``(e - e_hat)^2`` on B with the DR family's imputed error (``form.imputed_error``)."""
    return _residual(xt_b, x_b, r_b, form) ** 2


def dr_imputation_step(xt_b, x_b, r_b, p_hat_b, xt_u, x_u, form: Form) -> Tensor:
    """Eq. (6) as a batch sum: ``sum_B w (e - e_hat)^2``."""
    return form.reduction.share(((1.0 / p_hat_b) * _squared_error(xt_b, x_b, r_b, form)).sum())


def _mrdr_weight(p_hat_b: Tensor) -> Tensor:
    return (1.0 / p_hat_b) ** 2 * (1 - p_hat_b)


def _dr_bias_weight(p_hat_b: Tensor) -> Tensor:
    return (1.0 / p_hat_b) ** 3 * (1 - p_hat_b) ** 2


def mrdr_imputation_step(xt_b, x_b, r_b, p_hat_b, xt_u, x_u, form: Form) -> Tensor:
    """Eq. (8): ``sum_B w^2 (1 - p_hat) (e - e_hat)^2``."""
    return form.reduction.share((_mrdr_weight(p_hat_b) * _squared_error(xt_b, x_b, r_b, form)).sum())


def dr_bias_imputation_step(xt_b, x_b, r_b, p_hat_b, xt_u, x_u, form: Form) -> Tensor:
    """Eq. (9): ``sum_B w^3 (1 - p_hat)^2 (e - e_hat)^2``."""
    return form.reduction.share((_dr_bias_weight(p_hat_b) * _squared_error(xt_b, x_b, r_b, form)).sum())


def dr_mse_imputation_step(xt_b, x_b, r_b, p_hat_b, xt_u, x_u, form: Form, alpha: float = 0.5) -> Tensor:
    """Eq. (10): ``alpha * eq. (9) + (1 - alpha) * eq. (8)``."""
    sq = _squared_error(xt_b, x_b, r_b, form)
    return form.reduction.share(alpha * (_dr_bias_weight(p_hat_b) * sq).sum()
                                + (1 - alpha) * (_mrdr_weight(p_hat_b) * sq).sum())


def tdr_cl_imputation_step(xt_b, x_b, r_b, p_hat_b, xt_u, x_u, form: Form) -> Tensor:
    """TDR-CL's collaborative-learning imputation loss (C1), eq. (6)'s step with the targeted error:
    ``sum_B w (e - e_hat - eps_hat h)^2``, ``h = 1 / p_hat - 1``.

    It is :func:`dr_imputation_step` with the residual ``e - e_hat`` (the DR family's, so
    ``form.imputed_error`` applies) replaced by ``e - e_tilde``, ``e_tilde = e_hat + eps_hat h``
    (:mod:`estimators.targeting` (T2)), where ``eps_hat`` is refitted on B by (T3) from the current
    residuals and detached: the backfitting step of the semi-parametric imputed error
    ``e_hat_phi(x) + eps h(x)``, in which the imputation model learns the part of the error that the
    targeting term does not explain (our reconstruction of the paper's CL; see
    :func:`estimators.imputation.tdr_cl_imputation_loss`).  The gradient reaches ``x_t`` through
    ``e_hat`` only."""
    residual = _residual(xt_b, x_b, r_b, form)
    h = clever_covariate(p_hat_b)
    eps = targeting_epsilon(residual, h, form.reduction)
    return form.reduction.share(((1.0 / p_hat_b) * (residual - eps * h) ** 2).sum())


def badr_imputation_step(xt_b, x_b, r_b, p_hat_b, xt_u, x_u, form: Form) -> Tensor:
    """Eq. (32) as the published BADR code trains it (the variant that reproduces Table 3).

    The imputed error is written ``l(x_t, sigmoid(x))`` (input and target swapped), ``e_hat``
    on B is detached, ``E_U = mean_U l(x_t, sigmoid(x))`` carries the gradient, ``L`` is the
    detached BADR estimate with that error, and the loss is
    ``sum_B w^2 (e - e_hat + E_U - L)^2 / |U|``.  Across ranks, ``E_U`` is the global mean, whose
    gradient reaches every rank's ``x_t`` on U from every rank's B (a differentiable all-reduce).
    """
    w, red = 1.0 / p_hat_b, form.reduction
    e = form.l(x_b, r_b)
    e_hat_b = form.swapped(xt_b, x_b).detach()
    e_hat_u = form.swapped(xt_u, x_u)
    if red.active:  # one all-reduce; sum_u carries the gradient to every rank's U
        sum_w, sum_we, sum_b, sum_u, n_u = red.total(w.sum(), (w * e).sum(), e_hat_b.sum(), e_hat_u.sum(),
                                                    x_u.numel())
        estimate = (sum_we - sum_b + sum_u.detach()) / sum_w
        return red.share((w**2 * (e - e_hat_b + sum_u / n_u - estimate) ** 2).sum() / n_u)
    estimate = ((w * e).sum() - e_hat_b.sum() + e_hat_u.detach().sum()) / w.sum()
    return (w**2 * (e - e_hat_b + e_hat_u.mean() - estimate) ** 2).sum() / x_u.numel()


def badr_paper_imputation_step(xt_b, x_b, r_b, p_hat_b, xt_u, x_u, form: Form) -> Tensor:
    """Eq. (32) on B and U as the paper writes it:
    ``sum_B w^2 (e - e_hat + E_hat - L)^2 / (sum_B w)^2`` with ``E_hat = sum_U e_hat / sum_B w``
    and ``L = [sum_U e_hat + sum_B w (e - e_hat)] / sum_B w``; the gradient reaches ``x_t``
    through ``e_hat`` on B (the U terms cancel in ``E_hat - L``).  Across ranks, ``sum_B w (e -
    e_hat)`` in ``L`` is the global batch's, with its gradient (a differentiable all-reduce)."""
    w, red = 1.0 / p_hat_b, form.reduction
    e = form.l(x_b, r_b)
    e_hat = form.imputed(x_b, xt_b)
    e_hat_u = form.imputed(x_u, xt_u)
    sum_w, sum_u, sum_wr = red.total(w.sum(), e_hat_u.sum(), (w * (e - e_hat)).sum())
    e_hat_mean = sum_u / sum_w
    estimate = (sum_u + sum_wr) / sum_w
    return red.share((w**2 * (e - e_hat + e_hat_mean - estimate) ** 2).sum() / sum_w**2)


def monitor(x_b: Tensor, r_b: Tensor, p_hat_b: Tensor, form: Form) -> Tensor:
    """``sum_B w l(x, r)``: the quantity the published early stopping sums over an epoch."""
    return (form.l(x_b, r_b) / p_hat_b).sum()

