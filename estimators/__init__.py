"""Debiased post-click conversion-rate estimators in PyTorch.

Estimators of the ideal loss (BADR paper, eqs. 2, 3, 5, 7, 13, 37), imputation-model losses
(eqs. 6, 8, 9, 10, 32), closed-form theory (:mod:`estimators.theory`), models and the
joint-learning trainer.  See README.md for the contract shared by all estimators.
"""
from .imputation import (
    badr_imputation_loss,
    dr_bias_imputation_loss,
    dr_imputation_loss,
    dr_mse_imputation_loss,
    mrdr_imputation_loss,
)
from .gather import gather_dot
from .joint import JointConfig, JointLearner
from .loss import badr, dr, eib, ips, naive, snips
from .models import MF, PropensityModel, fit_propensity
from .multitask import ESCM2, escm2_loss
from ._fused import backend
from .training_loss import imputation_loss, imputation_loss_and_grads, prediction_loss, prediction_loss_and_grads

#: Estimators of the ideal loss, by name; each takes the arguments listed with it, in order.
ESTIMATORS = {
    "naive": (naive, ("e", "o")),
    "ips": (ips, ("e", "o", "p_hat")),
    "snips": (snips, ("e", "o", "p_hat")),
    "eib": (eib, ("e", "e_hat", "o")),
    "dr": (dr, ("e", "e_hat", "o", "p_hat")),
    "badr": (badr, ("e", "e_hat", "o", "p_hat")),
}

#: Imputation-model losses, by name; each takes (e, e_hat, o, p_hat).
IMPUTATION_LOSSES = {
    "dr": dr_imputation_loss,
    "mrdr": mrdr_imputation_loss,
    "dr_bias": dr_bias_imputation_loss,
    "dr_mse": dr_mse_imputation_loss,
    "badr": badr_imputation_loss,
}

__all__ = [
    "naive", "ips", "snips", "eib", "dr", "badr",
    "dr_imputation_loss", "mrdr_imputation_loss", "dr_bias_imputation_loss", "dr_mse_imputation_loss",
    "badr_imputation_loss", "ESTIMATORS", "IMPUTATION_LOSSES",
    "MF", "PropensityModel", "fit_propensity", "gather_dot", "JointConfig", "JointLearner",
    "prediction_loss", "imputation_loss", "prediction_loss_and_grads", "imputation_loss_and_grads",
    "ESCM2", "escm2_loss",
]
