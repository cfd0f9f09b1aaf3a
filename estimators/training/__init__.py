"""The training layer: models, the joint-learning losses, the propensity fit, the joint learner and
its epoch loop.  It reads the maths of :mod:`estimators` (the registry, the step forms) and reaches
the compiled kernels only through :mod:`estimators._ext`."""
from .cycle import AdditivePropensity, CycleConfig, CycleLearner
from .dce import DCEConfig, DCELearner, fit_propensity_calibration
from .early_stopping import EarlyStopping
from .fit import Diverged, EpochStats, fit
from .gather import gather_dot
from .gpl import GPL_SCHEDULE, GPLTrainer
from .joint import SAMPLINGS, JointConfig, JointLearner
from .losses import (BADRImputationLoss, BADRLoss, DDPOLoss, DRBiasImputationLoss, DRImputationLoss, DRLoss,
                     DRMSEImputationLoss, EIBLoss, EntireSpaceLoss, ESCM2Loss, ESMMLoss, ImputationLoss, IPSLoss,
                     MRDRImputationLoss, MultiDRLoss, MultiIPSLoss, NaiveLoss, PredictionLoss, SNIPSLoss,
                     StableDRLoss, TDRCLImputationLoss,
                     imputation_loss, imputation_loss_and_grads, prediction_loss, prediction_loss_and_grads)
from .models import ESCM2, MF, MMoE, EntireSpaceMF, PropensityModel, TwoTower
from .propensity import (PROPENSITY_LOSSES, ModelPropensities, Propensities, fit_propensity, fit_propensity_sampled,
                         propensity_table)
from .propensity_free import PropensityFreeConfig, PropensityFreeLearner, PropensityFreeModel

__all__ = [
    "EarlyStopping", "Diverged", "EpochStats", "fit", "gather_dot", "SAMPLINGS", "JointConfig", "JointLearner",
    "PredictionLoss", "ImputationLoss", "NaiveLoss", "IPSLoss", "SNIPSLoss", "EIBLoss", "DRLoss", "BADRLoss",
    "StableDRLoss", "DRImputationLoss", "MRDRImputationLoss", "DRBiasImputationLoss", "DRMSEImputationLoss",
    "TDRCLImputationLoss", "BADRImputationLoss",
    "prediction_loss", "imputation_loss", "prediction_loss_and_grads", "imputation_loss_and_grads",
    "EntireSpaceLoss", "ESMMLoss", "ESCM2Loss", "MultiIPSLoss", "MultiDRLoss", "DDPOLoss",
    "ESCM2", "MF", "MMoE", "EntireSpaceMF", "PropensityModel", "TwoTower",
    "PROPENSITY_LOSSES", "fit_propensity", "fit_propensity_sampled", "propensity_table", "ModelPropensities",
    "Propensities",
    "PropensityFreeConfig", "PropensityFreeLearner", "PropensityFreeModel",
    "AdditivePropensity", "CycleConfig", "CycleLearner",
    "DCEConfig", "DCELearner", "fit_propensity_calibration",
    "GPLTrainer", "GPL_SCHEDULE",
]
