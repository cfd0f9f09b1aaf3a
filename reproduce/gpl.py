"""DR-MSE-GPL's rounds inside :func:`reproduce.train.run_one` (after its round 0: the DR-MSE row's
propensity fit and joint learning), with the method's ``gpl_*`` keys
(:attr:`reproduce.methods.Method.propensity_objective_keys`); the training itself is
:class:`estimators.training.GPLTrainer`.  The rounds read the labels of the clicked training pairs
only and stop on the training monitor (no validation or test label).  ``max_epochs`` (the config's,
or ``--max-epochs``) caps round 0's joint learning; the rounds add at most ``gpl_rounds *
gpl_joint_epochs`` epochs, reported in the run's ``epochs``."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import torch

from cvrdata import CVRData
from estimators.training import EpochStats, GPLTrainer, JointLearner, PropensityModel

from .config import Config
from .methods import Method


def gpl_rounds(learner: JointLearner, prop_model: PropensityModel, data: CVRData, cfg: Config, method: Method,
               params: dict[str, Any], generator: torch.Generator, users: torch.Tensor, items: torch.Tensor,
               r: torch.Tensor, r0_epochs: list[EpochStats], rows: list[dict[str, Any]],
               on_epoch: Callable[[EpochStats], None], r0_prop_epochs: int,
               prop_seconds: float) -> tuple[list[EpochStats], int]:
    """Rounds 1..``gpl_rounds`` of ``method``'s propensity objective on ``learner`` (round 0 done);
    returns their joint-learning epochs (numbered on after round 0's, as ``on_epoch`` and the history
    see them) and the number of propensity epochs they ran (history rows ``stage="propensity"``,
    numbered on after the round-0 fit's)."""
    keys = {p: params[k] for k, p in method.propensity_objective_keys.items()}
    trainer = GPLTrainer(learner, prop_model, torch.from_numpy(data.click_matrix()).to(learner.device),
                         objective=method.propensity_objective, lam=keys["lam"], beta=keys["beta"],
                         base=cfg.propensity_loss, prop_lr=params["prop_lr"],
                         prop_weight_decay=params["prop_weight_decay"], prop_batch_size=params["prop_batch_size"],
                         gamma=params["gamma"], generator=generator)
    start, seconds0 = time.perf_counter(), (r0_epochs[-1].seconds if r0_epochs else 0.0)
    joint, prop = [], []

    def on_prop_epoch(k: int, loss: float) -> None:
        prop.append(loss)
        rows.append({"stage": "propensity", "epoch": r0_prop_epochs + len(prop), "propensity_loss": loss,
                     "seconds": prop_seconds + seconds0 + time.perf_counter() - start})

    def on_joint_epoch(stats: EpochStats) -> None:
        stats = dataclasses.replace(stats, epoch=len(r0_epochs) + len(joint) + 1,
                                    seconds=seconds0 + time.perf_counter() - start)
        joint.append(stats)
        on_epoch(stats)

    trainer.run(users, items, r, rounds=int(keys["rounds"]), prop_epochs=int(keys["prop_epochs"]),
                joint_epochs=int(keys["joint_epochs"]), batch_size=cfg.batch_size, tol=cfg.early_stopping.tol,
                patience=cfg.early_stopping.patience, on_prop_epoch=on_prop_epoch, on_epoch=on_joint_epoch)
    return joint, len(prop)
