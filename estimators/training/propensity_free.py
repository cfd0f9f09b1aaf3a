"""Training of the propensity-free methods (CVIB, DIB, DAMF): one model, its own objective, one Adam.

These methods fit no propensity and no imputation model.  Each is an entry of
:data:`estimators.registry.PROPENSITY_FREE`: a loss of :mod:`estimators.propensity_free` and the
model class that feeds it (:data:`MODELS`, below).  A model maps ``(users, items)`` to the
prediction logits (what is evaluated) and computes its method's objective on one step's pairs
with :meth:`PropensityFreeModel.objective`.

One step (:meth:`PropensityFreeLearner.step`) on a clicked batch B with labels r: draw
``G * |B|`` pairs U uniformly from ALL user-item pairs (clicked or not, with replacement, the
draw of :func:`estimators.training.joint.uniform_pairs`) when the objective reads unobserved
pairs, evaluate the objective, one Adam step over all the model's parameters (``lr``,
``weight_decay``: L2 on every parameter, as the other rows' MFs).  Adversarial objectives
(DAMF) train their discriminator in the same step through a gradient-reversal layer, so one
minimisation is the paper's min-max.

The step returns ``monitor = sum_B l(x_b, r)``, the factual cross-entropy of the prediction
logits on B before the step (the MF row's monitor, weights 1), which :func:`~estimators.
training.fit.fit`'s published early stopping sums over an epoch: a training loss, never a
validation or test score.  The labels of unclicked pairs are never read: U is ids only.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from .. import propensity_free as P
from ..distributed import (Reduction, data_parallel, global_stats, rank, rank_generator, resolve, shard,
                           world_size)
from ..joint_loss import CROSS_ENTROPIES
from ..registry import PropensityFreeSpec, get_propensity_free
from .gather import gather_dot
from .joint import check_clicked_batch, predict_probabilities, uniform_pairs
from .losses import make_form
from .optim import fused_adam


class PropensityFreeModel(nn.Module):
    """A model of a propensity-free method: ``forward(users, items)`` gives the prediction logits;
    :meth:`objective` the method's loss on a step's clicked pairs B (labels ``r``) and sampled
    pairs U (None when the method reads none), with ``l`` the cross-entropy form and the
    method's parameters.  It returns a dict with ``loss`` (to minimise) and ``x_b`` (the
    prediction logits on B, for the monitor), plus the loss's parts."""

    def objective(self, users_b: Tensor, items_b: Tensor, r: Tensor, users_u: Optional[Tensor],
                  items_u: Optional[Tensor], l: Callable[[Tensor, Tensor], Tensor], *,
                  reduction: str | Reduction = "global", **params: float) -> dict[str, Tensor]:
        raise NotImplementedError

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The optimiser's parameter groups: every parameter with ``weight_decay`` (the L2 of the
        MF rows); a model whose method regularises otherwise overrides this."""
        return [{"params": list(self.parameters()), "weight_decay": weight_decay}]


def _mf_tables(n_users: int, n_items: int, dim: int) -> tuple[nn.Embedding, nn.Embedding]:
    if min(n_users, n_items, dim) < 1:
        raise ValueError(f"n_users, n_items and dim must be positive; got {n_users}, {n_items}, {dim}")
    return nn.Embedding(n_users, dim), nn.Embedding(n_items, dim)  # N(0, 1), as the other rows' MFs


class CVIBMF(PropensityFreeModel):
    """CVIB on MF (:func:`estimators.propensity_free.cvib_loss`): one MF, predictions on B and U."""

    def __init__(self, n_users: int, n_items: int, dim: int) -> None:
        super().__init__()
        self.user, self.item = _mf_tables(n_users, n_items, dim)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        return gather_dot(self.user.weight, self.item.weight, users, items)

    def objective(self, users_b, items_b, r, users_u, items_u, l, *, reduction="global", **params):
        x = self(torch.cat([users_b, users_u]), torch.cat([items_b, items_u]))
        b = users_b.numel()
        return {**P.cvib_loss(x[:b], r, x[b:], l=l, reduction=reduction, **params), "x_b": x[:b]}


class DIBMF(PropensityFreeModel):
    """DIB on MF (:func:`estimators.propensity_free.dib_loss`): every user and item has an unbiased
    vector z and a biased vector r, each of size ``dim``; the prediction is ``<z_u, z_i>``.  The
    weight decay (``beta I(z; x)``, eq. 3's compression term) falls on the z tables only."""

    def __init__(self, n_users: int, n_items: int, dim: int) -> None:
        super().__init__()
        self.user, self.item = _mf_tables(n_users, n_items, dim)
        self.user_biased, self.item_biased = _mf_tables(n_users, n_items, dim)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        return gather_dot(self.user.weight, self.item.weight, users, items)

    def objective(self, users_b, items_b, r, users_u, items_u, l, *, reduction="global", **params):
        x_z = self(users_b, items_b)
        x_r = gather_dot(self.user_biased.weight, self.item_biased.weight, users_b, items_b)
        return {**P.dib_loss(x_z, x_r, r, l=l, reduction=reduction, **params), "x_b": x_z}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": [self.user.weight, self.item.weight], "weight_decay": weight_decay},
                {"params": [self.user_biased.weight, self.item_biased.weight], "weight_decay": 0.0}]


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient times ``-coeff`` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, coeff: float) -> Tensor:  # type: ignore[override]
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return -ctx.coeff * grad, None


def reverse_gradient(x: Tensor, coeff: float = 1.0) -> Tensor:
    """``x`` forward; ``-coeff`` times the incoming gradient backward (a gradient-reversal layer)."""
    return _ReverseGradient.apply(x, coeff)


class DAMFMF(PropensityFreeModel):
    """DAMF on MF (:func:`estimators.propensity_free.damf_loss`): the predictor h (an MF, what is
    evaluated) and the second hypothesis h' (another MF, training only).

    One minimisation trains both players: h' reads the loss through a gradient-reversal layer of
    coefficient ``1 / beta``, so h descends ``factual + beta * PMD`` and h' ascends ``PMD``
    (simultaneous steps; the authors alternate blocks of 20 steps per player, the same min-max).
    h' has its own L2, ``lambda_pmd`` (the authors' fixed 0.1), the optimiser's weight decay on
    its tables; h has the run's ``weight_decay``.
    """

    def __init__(self, n_users: int, n_items: int, dim: int, lambda_pmd: float = 0.1) -> None:
        super().__init__()
        self.user, self.item = _mf_tables(n_users, n_items, dim)
        self.user_d, self.item_d = _mf_tables(n_users, n_items, dim)
        self.lambda_pmd = float(lambda_pmd)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        return gather_dot(self.user.weight, self.item.weight, users, items)

    def objective(self, users_b, items_b, r, users_u, items_u, l, *, reduction="global", **params):
        users, items = torch.cat([users_b, users_u]), torch.cat([items_b, items_u])
        b = users_b.numel()
        x = self(users, items)
        beta = params.get("beta", 0.05)
        xd = reverse_gradient(gather_dot(self.user_d.weight, self.item_d.weight, users, items),
                              1.0 / beta if beta > 0 else 0.0)
        return {**P.damf_loss(x[:b], r, x[b:], xd[:b], xd[b:], l=l, reduction=reduction, **params), "x_b": x[:b]}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": [self.user.weight, self.item.weight], "weight_decay": weight_decay},
                {"params": [self.user_d.weight, self.item_d.weight], "weight_decay": self.lambda_pmd}]


@dataclass(frozen=True)
class PropensityFreeConfig:
    """Hyperparameters of one run of a propensity-free method.

    ``objective``: an :data:`estimators.registry.PROPENSITY_FREE` name; ``dim``: the embedding
    size; ``G``: sampled pairs per clicked pair (read only by objectives that sample U);
    ``lr`` / ``weight_decay``: Adam's; ``cross_entropy``: the factual cross-entropy's form
    (:data:`estimators.joint_loss.CROSS_ENTROPIES`); ``params``: the objective's parameters,
    its entry's defaults where absent.  Checked here: a bad value is a ``ValueError`` naming it.
    """

    objective: str = "cvib"
    dim: int = 64
    G: int = 1
    lr: float = 0.01
    weight_decay: float = 0.0
    cross_entropy: str = "logits"
    params: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = get_propensity_free(self.objective)
        for name in ("dim", "G"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}")
        for name, open_low in (("lr", True), ("weight_decay", False)):
            value = getattr(self, name)
            if not _finite_real(value) or value < 0 or (open_low and value == 0):
                raise ValueError(f"`{name}` must be a finite number {'> 0' if open_low else '>= 0'}; got {value!r}")
        if self.cross_entropy not in CROSS_ENTROPIES:
            raise ValueError(f"`cross_entropy` must be one of {CROSS_ENTROPIES}; got {self.cross_entropy!r}")
        unknown = sorted(set(self.params) - set(spec.params))
        if unknown:
            raise ValueError(f"`params`: {unknown} are not parameters of {self.objective!r}; its parameters are "
                             f"{tuple(spec.params)}")
        merged = {**spec.params, **self.params}
        for name, value in merged.items():
            if not _finite_real(value) or value < 0:
                raise ValueError(f"`params['{name}']` of {self.objective!r} must be a finite number >= 0; got "
                                 f"{value!r}")
        object.__setattr__(self, "params", MappingProxyType(merged))

    @property
    def spec(self) -> PropensityFreeSpec:
        return get_propensity_free(self.objective)


def _finite_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


class PropensityFreeLearner:
    """A propensity-free method's model trained on clicked batches (module docstring).

    The interface of :class:`~estimators.training.joint.JointLearner` that
    :func:`~estimators.training.fit.fit` drives: :meth:`check_batch`, :meth:`start_epoch`,
    :meth:`step`, :meth:`predict`, ``prediction`` (the model), ``imputation`` (None), ``form``
    and ``p_hat`` (1 for every pair: the monitor is unweighted).

    ``reduction`` and ``group``: under ``torch.distributed``, the model trains through a
    ``DistributedDataParallel`` wrapper of its objective, each rank on its :meth:`shard` of every
    clicked batch with its own pairs U (a stream seeded by one draw of ``generator`` plus its rank),
    the objective's means over all ranks (``"global"``) or each rank's own (``"local"``); the step's
    losses and monitor are the global batch's.
    """

    def __init__(self, n_users: int, n_items: int, config: PropensityFreeConfig, *,
                 model: Optional[PropensityFreeModel] = None, generator: Optional[torch.Generator] = None,
                 device: torch.device | str = "cpu", reduction: str | Reduction = "global", group=None) -> None:
        if not isinstance(config, PropensityFreeConfig):
            raise ValueError(f"`config` must be a PropensityFreeConfig; got {type(config).__name__}")
        self.config, self.spec = config, config.spec
        self.n_users, self.n_items = int(n_users), int(n_items)
        self.device = torch.device(device)
        self.generator = generator
        if model is None:
            model = MODELS[self.spec.model](self.n_users, self.n_items, config.dim, **self._model_params()).to(
                self.device)
        if not isinstance(model, PropensityFreeModel):
            raise ValueError(f"`model` must be a PropensityFreeModel (forward and objective); got "
                             f"{type(model).__name__}")
        self.prediction: PropensityFreeModel = model
        self.imputation = None
        self.form = make_form(config.cross_entropy)
        self.p_hat = torch.ones(1, device=self.device).expand(self.n_users * self.n_items)
        self.optimizer = fused_adam(model.param_groups(config.weight_decay), lr=config.lr)
        self._params = {k: v for k, v in config.params.items() if k not in self.spec.model_params}
        self.reduction = resolve(reduction, group)
        self.group, self.world_size, self.rank = group, world_size(group), rank(group)
        self._objective: nn.Module = _Objective(model)
        if self.world_size > 1:
            self._objective = data_parallel(self._objective, self.device, group)
            self.generator = rank_generator(generator, self.device, group)

    def shard(self, idx: Tensor) -> Tensor:
        """This rank's part of a global batch's indices (:func:`estimators.distributed.shard`)."""
        return shard(idx, self.group)

    def propensities_of(self, users: Tensor, items: Tensor) -> Tensor:
        """1 for every pair (what :func:`~estimators.training.fit.fit` weighs the monitor with)."""
        return torch.ones(users.shape, device=self.device)

    def _model_params(self) -> dict[str, float]:
        return {k: self.config.params[k] for k in self.spec.model_params}

    def check_batch(self, users: Tensor, items: Tensor, r: Tensor) -> None:
        """``ValueError`` unless ``(users, items, r)`` is a clicked batch :meth:`step` takes."""
        check_clicked_batch(users, items, r, self.n_users, self.n_items, self.device)

    def start_epoch(self) -> None:
        """Nothing to reset: U is drawn independently at every step."""

    def step(self, users: Tensor, items: Tensor, r: Tensor, *, validate: bool = True) -> dict[str, float]:
        """One step on the clicked batch ``(users, items)`` with labels ``r`` (module docstring)."""
        if validate:
            self.check_batch(users, items, r)
        r = r.to(torch.float32)
        users_u = items_u = None
        if self.spec.needs_u:
            users_u, items_u = uniform_pairs(self.n_users, self.n_items, self.config.G * users.numel(),
                                             self.generator, self.device)
        self.prediction.train()
        out = self._objective(users, items, r, users_u, items_u, self.form.l, self.reduction, self._params)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.optimizer.step()
        with torch.no_grad():
            monitor = float(self.form.l(out["x_b"].detach(), r).sum())
        stats = {"prediction_loss": float(out["loss"].detach()), "monitor": monitor}
        stats.update({k: float(v.detach()) for k, v in out.items() if k not in ("loss", "x_b")})
        return global_stats(stats, self.device, self.group)  # the ranks' shares averaged, monitors summed

    def predict(self, users: Tensor, items: Tensor) -> Tensor:
        """Predicted CVR ``sigmoid(logit)`` of the model (in evaluation mode)."""
        return predict_probabilities(self.prediction, users, items)


class _Objective(nn.Module):
    """A model's objective as a module's forward, so that ``DistributedDataParallel`` (which hooks
    ``forward``) can wrap it."""

    def __init__(self, model: PropensityFreeModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, users_b, items_b, r, users_u, items_u, l, reduction, params) -> dict[str, Tensor]:
        return self.model.objective(users_b, items_b, r, users_u, items_u, l, reduction=reduction, **params)


#: The model class of each objective, by the name its entry gives (``PropensityFreeSpec.model``).
MODELS: dict[str, type[PropensityFreeModel]] = {"CVIBMF": CVIBMF, "DIBMF": DIBMF, "DAMFMF": DAMFMF}
