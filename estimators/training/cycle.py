"""Cycle learning (StableDR, Li, Zheng, Wu, ICLR 2023): the imputation, propensity and prediction
models updated in turn, every step, the propensity model NOT frozen.

A :class:`CycleLearner` is a :class:`~estimators.training.joint.JointLearner` (same models,
sampling of U, prediction, :func:`~estimators.training.fit.fit` loop, early stopping and history)
that also holds the propensity model and updates it between the imputation and the prediction
updates.  One :meth:`CycleLearner.step` on a clicked batch B (``b`` pairs, labels ``r``) with
``G * b`` pairs U drawn from all pairs, in the order of the published StableDR code:

1. imputation model: one step on its loss (``"dr"``: eq. 6, ``sum_B w (e - e_hat)^2``) with the
   current propensities on B and the prediction before this step (detached);
2. propensity model: one step on SDR-prop (:func:`estimators.stabledr.stabledr_propensity_loss`)
   over U, from U's click indicators and the imputed errors of the imputation model just
   updated and of the current prediction (both detached), written as the imputation step writes
   them (``imputed_error``);
3. prediction model: one step on the estimator (``"stabledr"``: SNIPS's gradient, the imputed
   errors held fixed) with the propensities on B recomputed from the updated model.

Every propensity that weighs is ``max(sigmoid(z), gamma)`` and detached in the other models'
steps.  Nothing in a step reads a label beyond B's: the propensity step reads only the click
matrix ``o`` (the training pairs; never a validation or test pair's label) and model outputs.

The propensity model (:class:`AdditivePropensity`) is the pre-fitted logistic-regression model in
its additive form: :class:`~estimators.training.models.PropensityModel`'s logit is
``a_u + b_i`` (``a = P w_1 + c``, ``b = Q w_2``), so the table of its propensities fixes ``a`` and
``b`` (up to a constant moved between them) and the cycle starts from exactly that function.  It
learns per-user and per-item offsets from it (zero at the start), so the model stays in the
pre-fit's family and its weight decay pulls it back towards the click-only fit; the runs keep
sharing the propensity cache, which stores tables, not models.  (The public StableDR code instead
learns one smoothing scalar of a Naive Bayes propensity fed with 5 % of the TEST labels; the
toolkit never lets a label reach the propensity.)

Runs on the module path (autograd, torch's fused Adam for the three models): the fast path's
fused kernels assume a frozen propensity table.  Under data parallelism all three models train
through DDP wrappers, SDR-prop's sums over U span the ranks (``across``), and the step's losses
and monitor are the global batch's.  ``imputation_first`` is not read: the order
above is the cycle's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..distributed import data_parallel
from ..joint_loss import monitor
from ..registry import get_estimator
from ..stabledr import REDUCTIONS, stabledr_propensity_loss
from .joint import JointConfig, JointLearner, OptimizerFactory, _real
from .optim import fused_adam


class AdditivePropensity(nn.Module):
    """``p_hat(u, i) = sigmoid(a0_u + b0_i + a_u + b_i)``: fixed logit terms ``a0``, ``b0`` (the
    pre-fit, buffers) plus learned offsets ``a`` (per user) and ``b`` (per item), zero at the start."""

    def __init__(self, a0: Tensor, b0: Tensor) -> None:
        super().__init__()
        if a0.dim() != 1 or b0.dim() != 1:
            raise ValueError(f"`a0` and `b0` must be 1-D (one logit term per user / item); got {tuple(a0.shape)}, "
                             f"{tuple(b0.shape)}")
        self.register_buffer("a0", a0.detach().to(torch.float32).clone())
        self.register_buffer("b0", b0.detach().to(torch.float32).clone())
        self.a = nn.Parameter(torch.zeros_like(self.a0))
        self.b = nn.Parameter(torch.zeros_like(self.b0))

    @classmethod
    def from_propensities(cls, propensities: Tensor, tol: float = 1e-3) -> "AdditivePropensity":
        """The model whose propensities are the (n_users, n_items) table ``propensities``
        (unclipped, in (0, 1]) of an additive logistic model such as ``PropensityModel``.

        ``a0`` and ``b0`` are the least-squares additive fit of ``logit(p)`` (row means minus the
        grand mean, column means), exact for an additive table; a table it does not reproduce
        within ``tol`` (largest propensity difference) is refused with ``ValueError``: the cycle
        learns offsets of an additive model, not of any table (clipped or adjusted ones)."""
        if not isinstance(propensities, Tensor) or propensities.dim() != 2:
            raise ValueError(f"`propensities` must be the (n_users, n_items) table of the fitted propensity model; "
                             f"got {getattr(propensities, 'shape', type(propensities).__name__)}")
        p = propensities.detach().to(torch.float64)
        if not bool(((p > 0) & (p <= 1)).all()):
            raise ValueError("`propensities` must lie in (0, 1] (the unclipped table of the fitted model)")
        eps = float(torch.finfo(torch.float32).eps)
        z = torch.logit(p.clamp(eps, 1 - eps))
        grand = z.mean()
        a0, b0 = z.mean(dim=1) - grand, z.mean(dim=0)
        gap = float((torch.sigmoid(a0[:, None] + b0[None, :]) - p).abs().max())
        if not gap <= tol:
            raise ValueError(f"`propensities` is not the table of an additive logistic model (user term + item term, "
                             f"as PropensityModel): the best additive fit is off by {gap:.3g} > {tol}; pass the "
                             "unclipped, unadjusted table")
        return cls(a0, b0).to(propensities.device)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        return self.a0[users] + self.a[users] + self.b0[items] + self.b[items]

    @torch.no_grad()
    def propensities(self, gamma: Optional[float] = None) -> Tensor:
        """``sigmoid(logit)`` of all pairs, (n_users, n_items), clipped to ``[gamma, 1]`` when given."""
        p = torch.sigmoid((self.a0 + self.a)[:, None] + (self.b0 + self.b)[None, :])
        return p if gamma is None else p.clamp(gamma, 1.0)


@dataclass(frozen=True)
class CycleConfig:
    """The propensity model's part of cycle learning: ``eta``, SDR-prop's balancing weight (in the
    ``reduction`` form, "sum" as published); ``prop_lr`` / ``prop_weight_decay``, its Adam's;
    ``gamma``, the clipping floor of every propensity that weighs.  Checked here."""

    eta: float = 100.0
    prop_lr: float = 0.01
    prop_weight_decay: float = 0.0
    gamma: float = 0.05
    reduction: str = "sum"

    def __post_init__(self) -> None:
        _real(self.eta, "eta", 0.0)
        _real(self.prop_lr, "prop_lr", 0.0, open_low=True)
        _real(self.prop_weight_decay, "prop_weight_decay", 0.0)
        _real(self.gamma, "gamma", 0.0, 1.0, open_low=True)
        if self.gamma >= 1.0:
            raise ValueError(f"`gamma` must lie in (0, 1); got {self.gamma!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"`reduction` must be one of {REDUCTIONS}; got {self.reduction!r}")


class CycleLearner(JointLearner):
    """Prediction, imputation and propensity models trained by cycle learning (module docstring).

    ``propensities``: the (n_users, n_items) UNCLIPPED table of the pre-fitted propensity model
    (:class:`AdditivePropensity.from_propensities` starts from it); ``clicks``: the click indicators
    ``o`` of all pairs, (n_users, n_items) or flat row-major (``CVRData.click_matrix()``), the only
    data the propensity step reads; ``config``: the joint-learning settings (an estimator that
    reads propensities and imputed errors, e.g. ``"stabledr"`` with imputation loss ``"dr"``);
    ``cycle``: :class:`CycleConfig`.  ``prediction``, ``imputation``, ``optimizer`` (for the
    prediction and imputation models; default :func:`~estimators.training.optim.fused_adam`) and ``generator`` as for
    :class:`JointLearner`.  ``self.p_hat`` keeps the pre-fit's clipped table (what :func:`fit`'s
    divergence check weighs a constant predictor with).
    """

    def __init__(self, propensities: Tensor, clicks: Tensor, config: JointConfig, cycle: CycleConfig, *,
                 prediction: Optional[nn.Module] = None, imputation: Optional[nn.Module] = None,
                 optimizer: Optional[OptimizerFactory] = None, generator: Optional[torch.Generator] = None):
        spec = get_estimator(config.estimator)
        if not (spec.uses_propensity and spec.needs_imputation):
            raise ValueError(f"cycle learning updates a propensity model from imputed errors: the estimator must read "
                             f"both p_hat and e_hat (e.g. 'stabledr'); got {config.estimator!r}")
        if not isinstance(cycle, CycleConfig):
            raise ValueError(f"`cycle` must be a CycleConfig; got {type(cycle).__name__}")
        self.propensity = AdditivePropensity.from_propensities(propensities)
        super().__init__(self.propensity.propensities(cycle.gamma), config, prediction=prediction,
                         imputation=imputation, optimizer=optimizer or fused_adam, generator=generator)
        n_pairs = self.n_users * self.n_items
        if not isinstance(clicks, Tensor) or clicks.numel() != n_pairs or clicks.dim() not in (1, 2) or (
                clicks.dim() == 2 and tuple(clicks.shape) != (self.n_users, self.n_items)):
            raise ValueError(f"`clicks` must be the click indicators of all {self.n_users} x {self.n_items} pairs, "
                             f"(n_users, n_items) or flat; got {getattr(clicks, 'shape', type(clicks).__name__)}")
        if not bool(((clicks == 0) | (clicks == 1)).all()):
            raise ValueError("`clicks` must hold 0/1 click indicators (1 for the clicked training pairs)")
        self.o = clicks.detach().reshape(-1).to(device=self.device, dtype=torch.float32)
        self.cycle = cycle
        self.prop_opt = fused_adam(self.propensity.parameters(), lr=cycle.prop_lr,
                                   weight_decay=cycle.prop_weight_decay)
        # Data parallel: the propensity model learns from every rank's pairs U through its DDP wrapper.
        self._train_modules[id(self.propensity)] = self.propensity
        if self.world_size > 1:
            self._train_modules[id(self.propensity)] = data_parallel(self.propensity, self.device, self.group)

    @torch.no_grad()
    def current_propensities(self, users: Tensor, items: Tensor) -> Tensor:
        """``max(sigmoid(z), gamma)`` of the pairs from the propensity model as it is now (no graph)."""
        return torch.sigmoid(self.propensity(users, items)).clamp(self.cycle.gamma, 1.0)

    def _imputed_on(self, users: Tensor, items: Tensor) -> Tensor:
        """The imputed errors of the pairs from the current imputation and prediction models, as the
        imputation step writes them (``imputed_error``: swapped for "published"); no graph."""
        with torch.no_grad():
            x, xt = self.prediction(users, items), self.imputation(users, items)
            return self.form.swapped(xt, x) if self.form.imputed_error == "published" else self.form.imputed(x, xt)

    def step(self, users: Tensor, items: Tensor, r: Tensor, *, validate: bool = True) -> dict[str, float]:
        """One cycle-learning step (module docstring) on the clicked batch ``(users, items)`` with
        labels ``r``.  Returns the three models' losses and ``"monitor"``: B's SNIPS loss after the
        step times ``sum_B 1 / p_hat0`` (``p_hat0`` the pre-fit's clipped propensities), i.e.
        ``sum_B w l(y_hat', r) * sum_B w0 / sum_B w``: the toolkit's ``sum_B w l`` while the
        propensities have not moved, and, as the published SNIPS monitor, blind to a common
        rescaling of the weights as they do."""
        if validate:
            self.check_batch(users, items, r)
        r = r.to(torch.float32)
        b = users.numel()
        self.prediction.train()
        self.imputation.train()
        users_u, items_u = self.sample_pairs(self.config.G * b)
        rows, cols = torch.cat([users, users_u]), torch.cat([items, items_u])
        imp_rows, imp_cols = (rows, cols) if self.kind.needs_u else (users, items)
        out: dict[str, float] = {}
        # 1. imputation, on the propensities before this step's update
        out["imputation_loss"], _ = self._module_imputation_update(imp_rows, imp_cols, b, r,
                                                                   self.current_propensities(users, items))
        # 2. propensity, on U: click indicators and imputed errors only
        o_u = self.o[users_u * self.n_items + items_u]
        z_u = self._train_modules[id(self.propensity)](users_u, items_u)
        finite = torch.isfinite(z_u.detach()).all().to(torch.float64)
        if self.world_size > 1:  # every rank stops together
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN, group=self.group)
        if not bool(finite):  # fit reads a NaN monitor as divergence
            return {**out, "propensity_loss": math.nan, "prediction_loss": math.nan, "monitor": math.nan}
        loss = stabledr_propensity_loss(z_u, o_u, self._imputed_on(users_u, items_u), eta=self.cycle.eta,
                                        gamma=self.cycle.gamma, reduction=self.cycle.reduction, across=self.reduction)
        self._descend(self.prop_opt, loss)
        out["propensity_loss"] = float(loss.detach())
        # 3. prediction, on the updated propensities
        p_b = self.current_propensities(users, items)
        out["prediction_loss"], _ = self._module_prediction_update(rows, cols, b, r, p_b)
        with torch.no_grad():
            x_b = self.prediction(users, items)
            m_b = monitor(x_b, r, p_b.to(x_b.dtype), self.form)
            w0, w = (1.0 / self.p_hat[users * self.n_items + items]).sum(), (1.0 / p_b).sum()
        if self.world_size == 1:
            out["monitor"] = float(m_b * (w0 / w))
            return out
        # the global batch's sums: the losses' mean over the ranks, one monitor
        parts = torch.stack([m_b, w0, w]).double()
        torch.distributed.all_reduce(parts, group=self.group)
        out = self._global_values(out)
        out["monitor"] = float(parts[0] * parts[1] / parts[2])
        return out

    def propensity_table(self) -> Tensor:
        """The current clipped propensities of all pairs, (n_users, n_items)."""
        return self.propensity.propensities(self.cycle.gamma)
