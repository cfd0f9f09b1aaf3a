"""Debiased post-click conversion-rate estimators in PyTorch.

The maths at the heart: estimators of the ideal loss (BADR paper, eqs. 2, 3, 5, 7, 13, 37),
imputation-model losses (eqs. 6, 8, 9, 10, 32), their joint-learning step forms
(:mod:`estimators.joint_loss`), the entire-space losses (:mod:`estimators.multitask`: ESMM,
ESCM2-IPS / -DR / -BADR, Multi-IPS / Multi-DR, DDPO), the propensity-free losses
(:mod:`estimators.propensity_free`: CVIB, DIB, DAMF), the propensity adjustments
(:mod:`estimators.adjustment`: D-DR's f(p_hat)^alpha), GPL's propensity loss
(:mod:`estimators.propensity_loss`, eqs. 11-12), the closed-form theory (:mod:`estimators.theory`) and the one registry that names them all
(:mod:`estimators.registry`).  Above it, the training layer (:mod:`estimators.training`: models,
training losses as functions and modules, the propensity fit, the joint learner).  The compiled
kernels are reached only through :mod:`estimators._ext`.  See README.md for the contract shared
by all estimators.
"""
from . import theory
from ._ext import backend
from .adjustment import ddr_propensity
from .imputation import (badr_imputation_loss, dr_bias_imputation_loss, dr_imputation_loss, dr_mse_imputation_loss,
                         mrdr_imputation_loss, tdr_cl_imputation_loss)
from .loss import badr, dr, eib, ips, naive, snips
from .multitask import ddpo_loss, escm2_loss, esmm_loss, multi_dr_loss, multi_ips_loss
from .propensity_free import cvib_loss, damf_loss, dib_loss
from .propensity_loss import gpl_propensity_loss
from .registry import (ENTIRE_SPACE, ESTIMATORS, IMPUTATION_LOSSES, PROPENSITY_ADJUSTMENTS, PROPENSITY_FREE,
                       PROPENSITY_OBJECTIVES, EntireSpaceSpec, EstimatorSpec, ImputationLossSpec,
                       PropensityAdjustmentSpec, PropensityFreeSpec, PropensityObjectiveSpec, register_entire_space,
                       register_estimator, register_imputation_loss, register_propensity_adjustment,
                       register_propensity_free, register_propensity_objective)
from .training import (BADRImputationLoss, BADRLoss, DDPOLoss, DRBiasImputationLoss, DRImputationLoss, DRLoss,
                       DRMSEImputationLoss, EIBLoss, EntireSpaceLoss, EntireSpaceMF, ESCM2, ESCM2Loss, ESMMLoss, MF,
                       MMoE, EpochStats, ImputationLoss, IPSLoss, JointConfig, JointLearner, MRDRImputationLoss,
                       MultiDRLoss, MultiIPSLoss, NaiveLoss, PredictionLoss, PropensityFreeConfig,
                       PropensityFreeLearner, PropensityFreeModel, PropensityModel, SNIPSLoss, TwoTower,
                       fit, fit_propensity, gather_dot, imputation_loss, imputation_loss_and_grads, prediction_loss,
                       prediction_loss_and_grads, propensity_table)

__all__ = [
    # the maths
    "naive", "ips", "snips", "eib", "dr", "badr",
    "dr_imputation_loss", "mrdr_imputation_loss", "dr_bias_imputation_loss", "dr_mse_imputation_loss",
    "tdr_cl_imputation_loss",
    "badr_imputation_loss", "esmm_loss", "escm2_loss", "multi_ips_loss", "multi_dr_loss", "ddpo_loss", "theory",
    "cvib_loss", "dib_loss", "damf_loss", "ddr_propensity",
    "ESTIMATORS", "IMPUTATION_LOSSES", "ENTIRE_SPACE", "PROPENSITY_FREE", "EstimatorSpec", "ImputationLossSpec",
    "EntireSpaceSpec", "PropensityFreeSpec", "register_estimator", "register_imputation_loss",
    "register_entire_space", "register_propensity_free", "backend", "PROPENSITY_ADJUSTMENTS",
    "PropensityAdjustmentSpec", "register_propensity_adjustment", "gpl_propensity_loss", "PROPENSITY_OBJECTIVES",
    "PropensityObjectiveSpec", "register_propensity_objective",
    # training
    "prediction_loss", "imputation_loss", "prediction_loss_and_grads", "imputation_loss_and_grads",
    "PredictionLoss", "ImputationLoss", "NaiveLoss", "IPSLoss", "SNIPSLoss", "EIBLoss", "DRLoss", "BADRLoss",
    "DRImputationLoss", "MRDRImputationLoss", "DRBiasImputationLoss", "DRMSEImputationLoss", "BADRImputationLoss",
    "EntireSpaceLoss", "ESMMLoss", "ESCM2Loss", "MultiIPSLoss", "MultiDRLoss", "DDPOLoss",
    "MF", "TwoTower", "PropensityModel", "ESCM2", "MMoE", "EntireSpaceMF", "fit_propensity", "propensity_table", "gather_dot",
    "JointConfig", "JointLearner", "fit", "EpochStats",
    "PropensityFreeConfig", "PropensityFreeLearner", "PropensityFreeModel",
]
