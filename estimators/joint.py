"""Joint learning of the prediction and imputation models (BADR paper Algorithm 1, Section 3.5).

A :class:`JointLearner` holds the prediction MF, the imputation MF (when the estimator uses
one) and the frozen, clipped propensities of all user-item pairs.  :meth:`JointLearner.step`
performs one step on a clicked batch B: it draws ``G * |B|`` pairs U uniformly from all
pairs, updates the prediction model on its estimator (eq. 2, 3, 37, 7 or 13) and the
imputation model on its loss (eq. 6, 8, 9, 10 or 32).

The published code updates the prediction model first and then the imputation model with
the updated predictions; Algorithm 1 lists the imputation update first.  ``imputation_first``
selects Algorithm 1's order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .models import MF
from .training_loss import (CROSS_ENTROPIES, IMPUTATION_LOSSES, IMPUTATIONS, PREDICTION_ESTIMATORS, imputation_loss,
                            prediction_loss)


@dataclass(frozen=True)
class JointConfig:
    """Hyperparameters of one joint-learning run (names follow the BADR code's configs)."""

    estimator: str = "badr"
    imputation_loss: Optional[str] = "badr"
    dim: int = 64
    G: int = 8
    lr: float = 0.002
    weight_decay: float = 0.0
    imp_lr: float = 0.02
    imp_weight_decay: float = 0.0
    alpha: float = 0.5
    imputation: str = "pseudo_label"
    cross_entropy: str = "logits"
    imputation_first: bool = False

    def __post_init__(self) -> None:
        if self.estimator not in PREDICTION_ESTIMATORS:
            raise ValueError(f"`estimator` must be one of {PREDICTION_ESTIMATORS}; got {self.estimator!r}")
        needs_imputation = self.estimator in ("dr", "badr")
        if needs_imputation and self.imputation_loss not in IMPUTATION_LOSSES:
            raise ValueError(f"estimator {self.estimator!r} needs `imputation_loss` in {IMPUTATION_LOSSES}; "
                             f"got {self.imputation_loss!r}")
        if not needs_imputation and self.imputation_loss is not None:
            raise ValueError(f"estimator {self.estimator!r} has no imputation model; set imputation_loss=None")
        if self.imputation not in IMPUTATIONS:
            raise ValueError(f"`imputation` must be one of {IMPUTATIONS}; got {self.imputation!r}")
        if self.cross_entropy not in CROSS_ENTROPIES:
            raise ValueError(f"`cross_entropy` must be one of {CROSS_ENTROPIES}; got {self.cross_entropy!r}")
        if self.G < 1 or self.dim < 1:
            raise ValueError(f"`G` and `dim` must be positive; got G={self.G}, dim={self.dim}")


class JointLearner:
    """Prediction model (+ imputation model) trained by joint learning on frozen propensities.

    ``propensities`` is the (n_users, n_items) tensor of clipped learned propensities
    ``p_hat``; it is treated as a constant (never part of any graph).
    """

    def __init__(self, propensities: Tensor, config: JointConfig, *, generator: Optional[torch.Generator] = None):
        if propensities.dim() != 2:
            raise ValueError(f"`propensities` must be (n_users, n_items); got shape {tuple(propensities.shape)}")
        if not bool(((propensities > 0) & (propensities <= 1)).all()):
            raise ValueError("`propensities` must lie in (0, 1]; clip them with PropensityModel.propensities(gamma)")
        self.config = config
        self.n_users, self.n_items = propensities.shape
        self.p_hat = propensities.detach().reshape(-1)
        self.generator = generator
        self.prediction = MF(self.n_users, self.n_items, config.dim)
        self.pred_opt = torch.optim.Adam(self.prediction.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.imputation: Optional[MF] = None
        if config.imputation_loss is not None:
            self.imputation = MF(self.n_users, self.n_items, config.dim)
            self.imp_opt = torch.optim.Adam(self.imputation.parameters(), lr=config.imp_lr,
                                            weight_decay=config.imp_weight_decay)

    def sample_pairs(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` user-item pairs drawn uniformly (with replacement) from all pairs."""
        users = torch.randint(self.n_users, (n,), generator=self.generator)
        items = torch.randint(self.n_items, (n,), generator=self.generator)
        return users, items

    def _prediction_step(self, users, items, r, p_hat, users_u, items_u) -> float:
        cfg = self.config
        x_b = self.prediction(users, items)
        if self.imputation is None:
            loss = prediction_loss(cfg.estimator, x_b, r, p_hat, cross_entropy=cfg.cross_entropy)
        else:
            with torch.no_grad():
                xt_b = self.imputation(users, items)
                xt_u = self.imputation(users_u, items_u)
            loss = prediction_loss(cfg.estimator, x_b, r, p_hat, self.prediction(users_u, items_u), xt_b, xt_u,
                                   cfg.imputation, cfg.cross_entropy)
        self.pred_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.pred_opt.step()
        return float(loss.detach())

    def _imputation_step(self, users, items, r, p_hat, users_u, items_u) -> float:
        cfg = self.config
        with torch.no_grad():
            x_b = self.prediction(users, items)
            x_u = self.prediction(users_u, items_u)
        loss = imputation_loss(cfg.imputation_loss, self.imputation(users, items), x_b, r, p_hat,
                               self.imputation(users_u, items_u), x_u, cfg.alpha, cfg.imputation, cfg.cross_entropy)
        self.imp_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.imp_opt.step()
        return float(loss.detach())

    def step(self, users: Tensor, items: Tensor, r: Tensor) -> dict[str, float]:
        """One joint-learning step on the clicked batch ``(users, items)`` with labels ``r``.

        Returns the prediction loss and (when there is an imputation model) the imputation loss.
        """
        if not (users.shape == items.shape == r.shape) or users.dim() != 1 or users.numel() == 0:
            raise ValueError(f"`users`, `items` and `r` must be non-empty 1-D tensors of one shape; got "
                             f"{tuple(users.shape)}, {tuple(items.shape)}, {tuple(r.shape)}")
        r = r.to(torch.float32)
        p_hat = self.p_hat[users * self.n_items + items]
        users_u = items_u = None
        if self.imputation is not None:
            users_u, items_u = self.sample_pairs(self.config.G * users.numel())
        args = (users, items, r, p_hat, users_u, items_u)
        out: dict[str, float] = {}
        if self.imputation is not None and self.config.imputation_first:
            out["imputation_loss"] = self._imputation_step(*args)
        out["prediction_loss"] = self._prediction_step(*args)
        if self.imputation is not None and not self.config.imputation_first:
            out["imputation_loss"] = self._imputation_step(*args)
        return out

    @torch.no_grad()
    def predict(self, users: Tensor, items: Tensor) -> Tensor:
        """Predicted CVR ``sigmoid(<U_u, V_i>)`` of the prediction model."""
        return self.prediction.predict(users, items)
