"""GPL's rounds: the propensity model refitted on the DR estimator's bias and variance (BADR eq. 11).

DR-MSE-GPL (Zhou et al., CIKM 2023) is DR-MSE (DR estimator eq. 7, imputation loss eq. 10) whose
propensity model is trained with :mod:`estimators.propensity_loss`'s eq. 11, which reads the DR
residuals ``delta = e - e_hat`` of the current CVR models.  As the authors' code does, the two
alternate in phases rather than sharing a step (their slides' "train jointly"):

- round 0 (done by the caller): the propensity fit of the DR-MSE row (eq. 4's base loss, to early
  stopping), then joint learning of DR-MSE to early stopping;
- rounds k = 1..R (:meth:`GPLTrainer.run`): (i) ``delta`` of every clicked training pair from the
  current prediction and imputation models (no gradient; 0 on the unclicked pairs, whose labels are
  never read); (ii) ``prop_epochs`` propensity epochs over a fresh permutation of ALL pairs each,
  with eq. 11's loss, continuing the same propensity model and one Adam optimiser kept across the
  rounds; (iii) the new propensity table, clipped at ``gamma``, replaces the joint learner's; (iv)
  ``joint_epochs`` joint-learning epochs with the same learner (models and optimisers kept).

The rounds stop after R or earlier on the published early-stopping rule applied to each round's summed
joint-learning monitor (a training loss: no validation or test label is read, as for every row).  What
differs from the published code (alternating phases with early stopping on a validation split of the
clicked training pairs, a CTR model on clicked plus 4x sampled unclicked pairs, no clipping): the
toolkit's shared propensity protocol (all pairs, clipping ``gamma``) and training-loss stopping.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import _ext
from ..propensity_loss import BASE_LOSSES
from ..registry import get_propensity_objective
from .early_stopping import EarlyStopping
from .fit import Diverged, EpochStats, fit
from .joint import JointLearner
from .optim import fused_adam
from .propensity import propensity_table

#: The schedule of the rounds, as config keys ``<prefix>_<name>`` (``gpl_rounds``): R, the propensity
#: epochs per round E_p and the joint-learning epochs per round E_c.
GPL_SCHEDULE = ("rounds", "prop_epochs", "joint_epochs")


class GPLTrainer:
    """Refits a propensity model on eq. 11 between epochs of a :class:`JointLearner` (module docstring).

    ``learner``: the DR-MSE joint learner after round 0 (an estimator with an imputation model);
    ``prop_model``: the fitted propensity model (any module mapping ``(users, items)`` to logits);
    ``clicks``: the (n_users, n_items) 0/1 click matrix (or its flat form, pair ``u * n_items + i``)
    on the learner's device.  ``objective`` names a
    :data:`estimators.registry.PROPENSITY_OBJECTIVES` entry (``"gpl"``: Var over |D|^2, the corrected
    eq. 28; ``"gpl_published"``: over |B|^2 per batch); ``lam`` / ``beta``: eq. 11's weights;
    ``base``: the base loss l (:data:`estimators.propensity_loss.BASE_LOSSES`, the round-0 fit's);
    ``prop_lr`` / ``prop_weight_decay`` / ``prop_batch_size``: the propensity model's Adam and batch;
    ``gamma``: the clipping of the table joint learning reads.  ``generator`` draws the permutations.
    """

    def __init__(self, learner: JointLearner, prop_model: nn.Module, clicks: Tensor, *, objective: str = "gpl",
                 lam: float = 0.7, beta: float = 0.7, base: str = "bce", prop_lr: float, prop_weight_decay: float,
                 prop_batch_size: int, gamma: float, generator: Optional[torch.Generator] = None) -> None:
        self.spec = get_propensity_objective(objective)
        if learner.imputation is None:
            raise ValueError(f"`learner` trains estimator {learner.config.estimator!r} without an imputation model; "
                             "GPL reads the DR residual e - e_hat and needs one (estimator 'dr')")
        n_users, n_items = learner.n_users, learner.n_items
        if not isinstance(clicks, Tensor) or tuple(clicks.shape) not in ((n_users, n_items), (n_users * n_items,)):
            raise ValueError(f"`clicks` must be the ({n_users}, {n_items}) click matrix or its flat form; got "
                             f"{getattr(clicks, 'shape', type(clicks).__name__)}")
        if not bool(((clicks == 0) | (clicks == 1)).all()):
            raise ValueError("`clicks` must hold 0/1 click indicators")
        if base not in BASE_LOSSES:
            raise ValueError(f"`base` must be one of {BASE_LOSSES}; got {base!r}")
        n = n_users * n_items
        if isinstance(prop_batch_size, bool) or not isinstance(prop_batch_size, int) or not 1 <= prop_batch_size <= n:
            raise ValueError(f"`prop_batch_size` must be an integer in [1, {n}]; got {prop_batch_size!r}")
        if not (isinstance(gamma, (int, float)) and 0.0 < gamma <= 1.0):
            raise ValueError(f"`gamma` (propensity clipping floor) must lie in (0, 1]; got {gamma!r}")
        if not (prop_lr > 0 and prop_weight_decay >= 0):  # False for NaN too
            raise ValueError(f"`prop_lr` must be positive and `prop_weight_decay` non-negative; got {prop_lr}, "
                             f"{prop_weight_decay}")
        # lam and beta are checked by the loss on its first call; check them now, with their names.
        self.spec.function(torch.zeros(1), torch.zeros(1), torch.zeros(1), lam=lam, beta=beta, var_norm=1.0)
        self.learner, self.model, self.base = learner, prop_model, base
        self.lam, self.beta, self.gamma, self.batch_size = lam, beta, gamma, prop_batch_size
        self.clicks = clicks.reshape(-1).to(torch.float32)
        self.n_pairs = n
        #: Eq. 12's Var_hat divides the batch mean of o delta^2 / p^2 by this: |D| (the corrected 1/|D|^2)
        #: or |B| (the published code's 1/|B|^2).
        self.var_norm = float(n if self.spec.var_norm == "paper" else prop_batch_size)
        self.generator = generator
        # One optimiser for all rounds: each round continues the previous one's Adam state.
        self.optimizer = fused_adam(prop_model.parameters(), lr=prop_lr, weight_decay=prop_weight_decay)

    @torch.no_grad()
    def residuals(self, users: Tensor, items: Tensor, r: Tensor) -> Tensor:
        """``delta = e - e_hat`` of every pair as a flat (n_users * n_items,) table: on the clicked
        training pairs ``(users, items)`` with labels ``r``, ``e = l(y_hat, r)`` and ``e_hat`` the
        imputed error eq. 7 reads (the learner's :class:`~estimators.joint_loss.Form`), from the current
        models in evaluation mode; 0 on every other pair (their labels are never read)."""
        learner = self.learner
        x = _logits(learner.prediction, users, items)
        xt = _logits(learner.imputation, users, items)
        delta = torch.zeros(self.n_pairs, dtype=torch.float32, device=learner.device)
        e = learner.form.l(x, r.to(x.dtype))
        delta[users * learner.n_items + items] = (e - learner.form.imputed(x, xt)).float()
        return delta

    def propensity_epoch(self, delta: Tensor) -> float:
        """One epoch of eq. 11 over a fresh permutation of all pairs (the last partial batch dropped,
        as the propensity fit does); returns the summed batch losses."""
        n_items, model = self.learner.n_items, self.model
        n_full = self.n_pairs - self.n_pairs % self.batch_size
        perm = _ext.randperm(self.n_pairs, self.generator, self.learner.device)[:n_full]
        model.train()
        total = torch.zeros((), dtype=torch.float64, device=self.learner.device)
        for start in range(0, n_full, self.batch_size):
            pairs = perm[start:start + self.batch_size]
            x = model(pairs // n_items, pairs % n_items)
            loss = self.spec.function(x, self.clicks[pairs].to(x.dtype), delta[pairs].to(x.dtype), lam=self.lam,
                                      beta=self.beta, var_norm=self.var_norm, base=self.base)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.detach()
        return float(total)

    def refresh(self) -> Tensor:
        """The propensity model's table of all pairs, clipped at ``gamma``, into the learner; returned.
        Raises :class:`Diverged` when a propensity is not finite."""
        table = propensity_table(self.model, self.learner.n_users, self.learner.n_items)
        if not bool(torch.isfinite(table).all()):
            raise Diverged("a GPL propensity is NaN or infinite; lower prop_lr or gpl_lam")
        table = table.clamp(self.gamma, 1.0)
        self.learner.set_propensities(table)
        return table

    def run(self, users: Tensor, items: Tensor, r: Tensor, *, rounds: int, prop_epochs: int, joint_epochs: int,
            batch_size: int, tol: float = 1e-4, patience: int = 7,
            on_prop_epoch: Optional[Callable[[int, float], None]] = None,
            on_epoch: Optional[Callable[[EpochStats], None]] = None) -> list[EpochStats]:
        """Rounds 1..``rounds`` (module docstring) on the clicked training pairs ``(users, items)``
        with labels ``r``; returns the joint-learning epochs' stats.  ``rounds = 0`` trains nothing.
        Stops early on the published rule (``tol``, ``patience``) over the rounds' summed monitor.
        ``on_prop_epoch(round, loss)`` after each propensity epoch, ``on_epoch(stats)`` after each
        joint epoch (its ``epoch`` counts within the round)."""
        for name, value, low in (("rounds", rounds, 0), ("prop_epochs", prop_epochs, 1),
                                 ("joint_epochs", joint_epochs, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}; got {value!r}")
        stop = EarlyStopping(tol, patience)
        history: list[EpochStats] = []
        for k in range(1, rounds + 1):
            delta = self.residuals(users, items, r)
            for _ in range(prop_epochs):
                loss = self.propensity_epoch(delta)
                if not math.isfinite(loss):
                    raise Diverged(f"the GPL propensity loss is {loss} in round {k}; lower prop_lr or gpl_lam")
                if on_prop_epoch is not None:
                    on_prop_epoch(k, loss)
            self.refresh()
            epochs = fit(self.learner, users, items, r, batch_size=batch_size, max_epochs=joint_epochs, tol=tol,
                         patience=patience, generator=self.generator, on_epoch=on_epoch)
            history += epochs
            if stop.should_stop(sum(s.monitor for s in epochs)):
                break
        return history


@torch.no_grad()
def _logits(model: nn.Module, users: Tensor, items: Tensor) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(users, items)
    finally:
        model.train(was_training)
