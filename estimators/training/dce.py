"""Training of DCE-TDR: the Doubly Calibrated Estimator (Kweon and Yu, WWW 2024, arXiv 2403.00817)
on the toolkit's TDR (Li et al., ICLR 2023; :mod:`estimators.targeting`).

Source caveat: only DCE's abstract was readable (see :mod:`estimators.calibration`); the
procedure follows the authors' public DCE-DR code's order, with the departures said there.  BADR's
Table 3 has a DCE-TDR row, for which no code is public: we compose DCE's two calibrators with the
toolkit's reading of TDR (the method ``tdr_cl``), not a second reading of it.  TDR's estimate is
DR's (eq. 7) with the targeted error ``e_tilde = e_hat + eps_hat h`` (T2) for ``e_hat``; with
``eps_hat`` held fixed (T3, detached) the two differ by ``eps_hat (sum_U h - sum_B h) / |U|``,
constant in the prediction model, so the prediction step is DR's and the targeting acts through
the imputation loss ``tdr_cl``.  DCE replaces, in both steps, the propensity ``p_hat`` by the
calibrated ``p_bar`` (C3) and, in the prediction step, the imputed error ``e_hat = l(x, sigmoid(x_t))``
by the calibrated one ``l(x, C(x_t, u))`` (C1 on the imputation logits).

Procedure of one run (the "tri-level" joint learning of the abstract):

0. ``V``: a share of each user's clicked training pairs is held out
   (:func:`estimators.calibration.holdout_clicked`); everything below trains on the other pairs.
1. The propensity model is fitted on the click matrix without ``V`` (the toolkit's fit), frozen.
2. Its calibrator is fitted once on ``V`` and uniform pairs (C3,
   :func:`fit_propensity_calibration`), frozen; ``p_bar = clip(C / rho, gamma, 1)`` on all pairs.
3. Joint learning (:func:`estimators.training.fit`): per clicked batch B (and U), the prediction
   step on DR with ``p_bar`` and the calibrated imputed errors, then the imputation step on
   ``tdr_cl`` with ``p_bar`` and the RAW imputation logits (the imputation model learns the error,
   its calibrator maps it, as in the public code); after each epoch
   (:meth:`DCELearner.end_epoch`) ``impcal_steps`` full-batch Adam steps of the imputation
   calibrator on ``V`` (C4), its gate features recomputed from the imputation model first.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..calibration import (CalibrationExperts, calibrated_propensity, imputation_calibration_loss,
                           mf_logit_moments, propensity_calibration_risk, user_logit_moments)
from .joint import JointConfig, JointLearner
from .losses import prediction_loss
from .models import MF
from .optim import fused_adam


def _positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}")


def _nonneg(value, name: str, positive: bool = False) -> None:
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
          and (value > 0 if positive else value >= 0))
    if not ok:
        raise ValueError(f"`{name}` must be a finite number {'> 0' if positive else '>= 0'}; got {value!r}")


@dataclass(frozen=True)
class DCEConfig:
    """The calibrators' settings: ``n_experts`` K (C1, both calibrators); ``negatives``: uniform
    pairs per held-out pair in C3 (the public code's 10); ``propcal_*``: Adam and full-batch steps of
    the propensity calibrator (once, before joint learning); ``impcal_*``: those of the imputation
    calibrator (steps after every epoch).  Bad values: ``ValueError`` naming the field."""

    n_experts: int = 5
    negatives: int = 10
    propcal_lr: float = 0.05
    propcal_weight_decay: float = 1e-3
    propcal_steps: int = 200
    impcal_lr: float = 0.05
    impcal_weight_decay: float = 1e-3
    impcal_steps: int = 10

    def __post_init__(self) -> None:
        for name in ("n_experts", "negatives", "propcal_steps", "impcal_steps"):
            _positive_int(getattr(self, name), name)
        for name in ("propcal_lr", "impcal_lr"):
            _nonneg(getattr(self, name), name, positive=True)
        for name in ("propcal_weight_decay", "impcal_weight_decay"):
            _nonneg(getattr(self, name), name)


def _logit(p: Tensor) -> Tensor:
    p = p.to(torch.float64).clamp(1e-12, 1 - 1e-12)
    return (torch.log(p) - torch.log1p(-p)).to(torch.float32)


def fit_propensity_calibration(propensities: Tensor, users_v: Tensor, items_v: Tensor, rho: float, gamma: float,
                               config: DCEConfig, generator: Optional[torch.Generator] = None,
                               ) -> tuple[Tensor, CalibrationExperts, list[float]]:
    """(C3) fit the propensity model's calibrator once and return ``(p_bar, experts, losses)``.

    ``propensities``: the UNCLIPPED ``(n_users, n_items)`` table of the propensity model fitted
    without the held-out clicked pairs ``(users_v, items_v)``; ``rho``: their share of all clicked
    training pairs.  ``config.negatives * |V|`` pairs are drawn uniformly from all pairs by
    ``generator`` (once); ``config.propcal_steps`` full-batch Adam steps minimise
    :func:`~estimators.calibration.propensity_calibration_loss`.  ``p_bar`` is the calibrated
    table ``clip(C / rho, gamma, 1)`` of all pairs (detached), ``losses`` the loss per step.
    """
    if not isinstance(propensities, Tensor) or propensities.dim() != 2:
        raise ValueError("`propensities` must be the (n_users, n_items) table of the propensity model")
    if not bool(((propensities > 0) & (propensities <= 1)).all()):
        raise ValueError("`propensities` must lie in (0, 1] (the unclipped propensity table)")
    if users_v.shape != items_v.shape or users_v.dim() != 1 or users_v.numel() == 0:
        raise ValueError("`users_v` and `items_v` (the held-out clicked pairs) must be non-empty 1-D tensors "
                         "of one shape")
    n_users, n_items = propensities.shape
    device = propensities.device
    s = _logit(propensities)
    features = user_logit_moments(s)
    # b_k around log(rho): C = rho * p_hat at small p_hat, so p_bar = C / rho starts at the uncalibrated p_hat
    experts = CalibrationExperts(features.shape[1], config.n_experts, bias=math.log(rho)).to(device)
    n_v = users_v.numel()
    m = config.negatives * n_v
    pairs_m = torch.randint(n_users * n_items, (m,), generator=generator, device=device)
    in_v = torch.zeros(n_users * n_items, dtype=torch.bool, device=device)
    in_v[users_v * n_items + items_v] = True
    z_m = in_v[pairs_m].to(torch.float32)
    users_m, items_m = pairs_m // n_items, pairs_m % n_items
    s_v, s_m = s[users_v, items_v], s[users_m, items_m]
    opt = fused_adam(experts.parameters(), lr=config.propcal_lr, weight_decay=config.propcal_weight_decay)
    losses = []
    for _ in range(config.propcal_steps):
        # the gate once per user, gathered by the pairs' users; each set reads one side of C
        log_pi = experts.gate_log_probs(features)
        nll_v = -experts.log_prob(s_v, log_pi[users_v], True)
        nll_m = -experts.log_prob(s_m, log_pi[users_m], False)
        loss = propensity_calibration_risk(nll_v, nll_m, z_m, n_users * n_items)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    p_bar = torch.empty(n_users, n_items, device=device)
    block = max(1, (1 << 20) // n_items)  # a block of users at a time: K * block * n_items floats
    with torch.no_grad():
        log_pi = experts.gate_log_probs(features)
        for start in range(0, n_users, block):
            rows = slice(start, min(start + block, n_users))
            lp = log_pi[rows].repeat_interleave(n_items, dim=0)
            c = experts.log_prob(s[rows].reshape(-1), lp, True).exp().reshape(-1, n_items)
            p_bar[rows] = calibrated_propensity(c, rho, gamma)
    return p_bar, experts, losses


class DCELearner(JointLearner):
    """:class:`JointLearner` of DCE-TDR (module docstring): ``propensities`` is the calibrated,
    clipped table ``p_bar`` (:func:`fit_propensity_calibration`); ``calibration`` the held-out
    clicked pairs ``(users_v, items_v, r_v)`` with their conversion labels, which only the
    imputation calibrator reads (C4).  ``config`` names an estimator that reads imputed errors
    (DCE-TDR: ``dr`` with the imputation loss ``tdr_cl``).  Trains on the module path (autograd,
    torch's fused Adam): the calibrated imputed errors have no fused kernel.  Under data
    parallelism the models train through their DDP wrappers and the calibrators, fitted on ``V``
    from the (identical) models of every rank, are the same on every rank.
    """

    def __init__(self, propensities: Tensor, config: JointConfig, dce: DCEConfig,
                 calibration: tuple[Tensor, Tensor, Tensor], *, generator: Optional[torch.Generator] = None):
        super().__init__(propensities, config, optimizer=fused_adam, generator=generator)
        if self.imputation is None:
            raise ValueError(f"DCE calibrates an imputation model: estimator {config.estimator!r} has none; use one "
                             "that reads imputed errors (e.g. 'dr' with imputation_loss 'tdr_cl')")
        if not isinstance(dce, DCEConfig):
            raise ValueError(f"`dce` must be a DCEConfig; got {type(dce).__name__}")
        users_v, items_v, r_v = calibration
        self.check_batch(users_v, items_v, r_v)
        self.dce = dce
        self.users_v, self.items_v, self.r_v = users_v, items_v, r_v.to(torch.float32)
        self.imp_experts = CalibrationExperts(2, dce.n_experts).to(self.device)
        self.impcal_opt = fused_adam(self.imp_experts.parameters(), lr=dce.impcal_lr,
                                     weight_decay=dce.impcal_weight_decay)
        self.imp_features = self._imputation_features()
        self.impcal_losses: list[float] = []

    @torch.no_grad()
    def _imputation_features(self) -> Tensor:
        """The imputation calibrator's gate input (C1): the moments of each user's imputation logits
        over all items: ``U V^T`` for the MF model, else the model on every pair, by blocks of users."""
        if type(self.imputation) is MF:
            return mf_logit_moments(self.imputation.user.weight, self.imputation.item.weight)
        items = torch.arange(self.n_items, device=self.device)
        rows = []
        block = max(1, (1 << 22) // self.n_items)
        for start in range(0, self.n_users, block):
            users = torch.arange(start, min(start + block, self.n_users), device=self.device)
            xt = self.imputation(users.repeat_interleave(self.n_items), items.repeat(users.numel()))
            rows.append(xt.reshape(users.numel(), self.n_items))
        return user_logit_moments(torch.cat(rows))

    @torch.no_grad()
    def calibrated_imputation_logits(self, users: Tensor, items: Tensor) -> Tensor:
        """``logit C(x_t, u)`` (C1) of the imputation model on the pairs ``(users, items)``."""
        return self.imp_experts(self.imputation(users, items), self.imp_features[users])

    def _module_prediction_update(self, rows: Tensor, cols: Tensor, b: int, r: Tensor,
                                  p_hat: Tensor) -> tuple[float, Tensor]:
        """The prediction step: DR (eq. 7; TDR's step, see the module docstring) with ``p_bar`` and
        the calibrated imputed errors ``l(x, C(x_t, u))`` on B and U (detached)."""
        cfg = self.config
        x = self._train_modules[id(self.prediction)](rows, cols)  # its DDP wrapper under data parallelism
        xt = self.calibrated_imputation_logits(rows, cols)
        loss = prediction_loss(cfg.estimator, x[:b], r, p_hat, x[b:], xt[:b], xt[b:], cfg.imputation,
                               cfg.cross_entropy, validate=False, reduction=self.reduction)
        self._descend(self.pred_opt, loss)
        return float(loss.detach()), x[:b].detach()

    def end_epoch(self) -> None:
        """(C4) after each epoch: the gate features from the current imputation model, then
        ``impcal_steps`` full-batch Adam steps of the imputation calibrator on ``V``."""
        self.imp_features = self._imputation_features()
        with torch.no_grad():
            xt_v = self.imputation(self.users_v, self.items_v)
            w_v = 1.0 / self.p_hat[self.users_v * self.n_items + self.items_v]
        f_v = self.imp_features[self.users_v]
        for _ in range(self.dce.impcal_steps):
            loss = imputation_calibration_loss(self.imp_experts(xt_v, f_v), self.r_v, w_v)
            self.impcal_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.impcal_opt.step()
        self.impcal_losses.append(float(loss.detach()))
