"""The epoch loop of joint learning, as the published protocol runs it.

:func:`fit` trains a :class:`~estimators.training.joint.JointLearner` on the clicked training
pairs: each epoch walks a fresh permutation of them (drawn from ``generator``) in batches of
``batch_size`` (the last partial batch dropped, as the published code does), one
:meth:`~estimators.training.joint.JointLearner.step` per batch, and stops early on the
published rule (:class:`~estimators.training.early_stopping.EarlyStopping`) applied to the
epoch sum of the steps' ``monitor``, ``sum_B w * l(y_hat', r)``: a training loss, never a
validation or test score.  Each epoch's :class:`EpochStats` go to ``on_epoch`` as they come
(the run's history).  Under data parallelism (a learner built with ``torch.distributed``
initialised on several ranks) ``batch_size`` is the GLOBAL batch: every rank draws the same
permutation (``generator`` seeded alike on every rank) and trains its shard of each batch
(:meth:`~estimators.training.joint.JointLearner.shard`); the epoch's losses are the global
batch's, so every rank stops at the same epoch.

A run that diverges raises :class:`Diverged` instead of returning a model that only looks
trained: a monitored loss or a parameter that is not finite (checked every epoch), or a training
that stopped on the early-stopping rule (its loss no longer falls) at a monitored loss more than
:data:`DIVERGENCE_FACTOR` times that of a constant predictor (every pair given the training
pairs' conversion rate, weighted as the monitor weighs it).  A learning rate far too large makes
the model's logits saturate at random, so its weighted cross-entropy settles far above the
constant's (Coat, MF, lr 100: 62.9 times it), while the loss stays finite, which a finiteness
check alone would miss.  A run cut short by ``max_epochs`` is not judged on its loss: from
N(0, 1) embeddings the first epochs are far above the constant too.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .early_stopping import EarlyStopping
from .joint import JointLearner


#: How many times a constant predictor's monitored loss a run may end at before it counts as diverged.
DIVERGENCE_FACTOR = 2.0


class Diverged(FloatingPointError):
    """Training produced a non-finite loss: the learning rates are too large for the model."""


@dataclass(frozen=True)
class EpochStats:
    """One epoch of :func:`fit`: the mean prediction and imputation losses over its steps (the
    imputation loss is None without an imputation model), the epoch sum of ``monitor`` (what the
    early stopping reads) and the seconds since the fit started."""

    epoch: int
    prediction_loss: float
    imputation_loss: Optional[float]
    monitor: float
    seconds: float


def fit(learner: JointLearner, users: Tensor, items: Tensor, r: Tensor, *, batch_size: int, max_epochs: int = 100,
        tol: float = 1e-4, patience: int = 7, generator: Optional[torch.Generator] = None,
        on_epoch: Optional[Callable[[EpochStats], None]] = None) -> list[EpochStats]:
    """Joint learning over epochs on the clicked pairs ``(users, items)`` with labels ``r``.

    Returns the epochs' :class:`EpochStats` (also passed to ``on_epoch`` after each epoch).
    Raises :class:`Diverged` when an epoch's monitored loss is not finite.  The training pairs are
    checked once here, then every step skips its checks.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer; got {batch_size!r}")
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
        raise ValueError(f"`max_epochs` must be a positive integer; got {max_epochs!r}")
    learner.check_batch(users, items, r)
    n = r.numel()
    n_batches = n // batch_size
    if n_batches == 0:
        raise ValueError(f"`batch_size` {batch_size} exceeds the {n} training pairs")
    constant = _constant_monitor(learner, users, items, r) * (n_batches * batch_size / n)
    stop = EarlyStopping(tol, patience)
    shard = getattr(learner, "shard", lambda idx: idx)  # this rank's part of a batch (data parallel)
    start = time.perf_counter()
    history: list[EpochStats] = []
    stopped = False
    for epoch in range(1, max_epochs + 1):
        perm = torch.randperm(n, generator=generator, device=users.device)
        learner.start_epoch()
        monitor, pred_sum, imp_sum = 0.0, 0.0, 0.0
        try:
            for j in range(n_batches):
                idx = shard(perm[j * batch_size:(j + 1) * batch_size])
                out = learner.step(users[idx], items[idx], r[idx], validate=False)
                monitor += out["monitor"]
                pred_sum += out["prediction_loss"]
                imp_sum += out.get("imputation_loss", 0.0)
            end_epoch = getattr(learner, "end_epoch", None)  # a learner's per-epoch stage (DCE's calibration)
            if end_epoch is not None:
                end_epoch()
        except RuntimeError as exc:  # NaN logits reach the clamped cross-entropy's [0, 1] check
            if "between 0 and 1" not in str(exc):
                raise
            monitor = math.nan
        if not math.isfinite(monitor):
            raise Diverged(f"training loss is {monitor} at epoch {epoch}; lower the learning rates")
        if not _finite_parameters(learner):
            raise Diverged(f"a model parameter is NaN or infinite after epoch {epoch}; lower the learning rates")
        stats = EpochStats(epoch, pred_sum / n_batches, imp_sum / n_batches if learner.imputation is not None else None,
                           monitor, time.perf_counter() - start)
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
        if stop.should_stop(monitor):
            stopped = True
            break
    if stopped and history[-1].monitor > DIVERGENCE_FACTOR * constant:
        raise Diverged(f"the training loss settled at {history[-1].monitor:.4g}, {history[-1].monitor / constant:.3g} "
                       f"times a constant predictor's ({constant:.4g}); the model did not learn: lower the learning "
                       "rates")
    return history


@torch.no_grad()
def _constant_monitor(learner: JointLearner, users: Tensor, items: Tensor, r: Tensor) -> float:
    """The monitor's epoch sum over all the training pairs for the constant prediction
    ``logit(mean r)``: ``sum w * l(c, r)``."""
    rate = r.double().mean().clamp(1e-6, 1 - 1e-6)
    c = torch.log(rate / (1 - rate)).expand(r.shape).to(torch.float32)
    p_hat = learner.propensities_of(users, items)
    return float((learner.form.l(c, r.to(torch.float32)) / p_hat).sum())


@torch.no_grad()
def _finite_parameters(learner: JointLearner) -> bool:
    models = [m for m in (learner.prediction, learner.imputation) if m is not None]
    return all(bool(torch.isfinite(p).all()) for m in models for p in m.parameters())
