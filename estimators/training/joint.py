"""Joint learning of the prediction and imputation models (BADR paper Algorithm 1, Section 3.5).

A :class:`JointLearner` holds the prediction model, the imputation model (when the estimator
reads imputed errors) and the frozen, clipped propensities of all user-item pairs.
:meth:`JointLearner.step` performs one step on a clicked batch B: it draws ``G * |B|`` pairs U
from all pairs, updates the prediction model on its estimator and the imputation model on its
loss (any pair of :mod:`estimators.registry` entries).

The models are any ``torch.nn.Module`` mapping ``(users, items)`` to logits
(:mod:`estimators.training.models`); by default matrix factorisation.  When both are
:class:`~estimators.training.models.MF` and no optimiser is given, a step runs the fast path:
each model's logits once per parameter state with the fused gather-dot, the losses' gradients
with respect to the logits from one fused call, the embedding gradients scattered by hand and
the compiled Adam, with the parameters following the plain ``nn.Embedding`` +
``torch.optim.Adam`` trajectory up to float rounding.  Any other model (or an explicit
``optimizer``) runs on autograd with ``optimizer(params, lr=..., weight_decay=...)``
(torch's fused Adam by default, :func:`~estimators.training.optim.fused_adam`).

Data parallel (``torchrun``; :mod:`estimators.distributed`): constructed with
``torch.distributed`` initialised on more than one rank, the learner trains on the module path
with each model wrapped in ``torch.nn.parallel.DistributedDataParallel`` (which all-reduces the
parameter gradients; the fast path's hand-scattered gradients would bypass it), each rank takes
its shard of every clicked batch (:meth:`JointLearner.shard`, which :func:`~estimators.training.fit.fit`
calls) and draws its own ``G * |B_r|`` pairs U from a generator seeded by one draw of ``generator``
plus its rank (deterministic by seed and rank), and the losses take their normalisers over the
global batch (``reduction="global"``, the default; ``"local"``: each rank's own).  The losses and
the ``monitor`` a step returns are the global batch's, identical on every rank, so every rank's
early stopping decides alike.  One process (or one rank) is the single-process learner, bitwise.

The published code updates the prediction model first and then the imputation model with
the updated predictions; Algorithm 1 lists the imputation update first.  ``imputation_first``
selects Algorithm 1's order.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import _ext
from ..distributed import Reduction, data_parallel, global_stats, rank, rank_generator, resolve, shard, world_size
from ..joint_loss import CROSS_ENTROPIES, IMPUTATIONS, monitor
from ..registry import get_estimator, get_imputation_loss
from .gather import gather_dot_grad, gather_dot_value, use_operator
from .losses import imputation_loss, imputation_loss_and_grads, make_form, prediction_loss, prediction_loss_and_grads
from .models import MF
from .propensity import ModelPropensities, Propensities
from .optim import Adam, fused_adam

#: How the G * |B| pairs U of a step are drawn from all pairs: "uniform", independently with
#: replacement (returned in ascending user order); "permutation", as consecutive slices of one
#: permutation of all pairs per epoch (the published code: no pair twice within an epoch).  Both
#: draw every pair with probability G |B| / (n_users n_items) per step.
SAMPLINGS = ("uniform", "permutation")

#: An optimiser factory: ``optimizer(params, lr=..., weight_decay=...)``, e.g. ``torch.optim.Adam``.
OptimizerFactory = Callable[..., torch.optim.Optimizer]


def _positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}")


def _real(value, name: str, low: float, high: float = math.inf, *, open_low: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and (
        low < value if open_low else low <= value) and value <= high
    if not ok:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise ValueError(f"`{name}` must be a finite number in {interval}; got {value!r}")


#: Beyond this many pairs, ``sampling="permutation"`` (a permutation of all pairs per epoch) is refused.
_MAX_PERMUTED = 1 << 34


def uniform_pairs(n_users: int, n_items: int, n: int, generator: Optional[torch.Generator],
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """``n`` user-item pairs drawn independently and uniformly from all pairs (with replacement),
    returned in ascending user order.

    The users are sorted by a counting sort and each paired with the next item draw: still n
    independent uniform pairs, since the items are independent of the users (the losses are sums
    over the pairs).  Ordered users make every pass over the pairs read the user tables front to
    back (Yahoo! R3: 15.4k rows of 64 floats, which do not fit in L2) instead of at random: a
    quarter off a step.
    """
    users = torch.randint(n_users, (n,), generator=generator, device=device)
    items = torch.randint(n_items, (n,), generator=generator, device=device)
    users = torch.repeat_interleave(torch.bincount(users, minlength=n_users))
    return users, items


@torch.no_grad()
def predict_probabilities(model: nn.Module, users: Tensor, items: Tensor) -> Tensor:
    """``sigmoid(model(users, items))`` in evaluation mode, without a graph; the model's training
    mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        return torch.sigmoid(model(users, items))
    finally:
        model.train(was_training)


def check_clicked_batch(users: Tensor, items: Tensor, r: Tensor, n_users: int, n_items: int,
                        device: torch.device) -> None:
    """Raise ``ValueError`` unless ``(users, items, r)`` is a clicked batch: non-empty 1-D tensors of
    one shape on ``device``, int64 ids in ``0..n_users - 1`` / ``0..n_items - 1``, 0/1 labels."""
    if not all(isinstance(t, Tensor) for t in (users, items, r)):
        raise ValueError("`users`, `items` and `r` must be tensors")
    if not (users.shape == items.shape == r.shape) or users.dim() != 1 or users.numel() == 0:
        raise ValueError(f"`users`, `items` and `r` must be non-empty 1-D tensors of one shape; got "
                         f"{tuple(users.shape)}, {tuple(items.shape)}, {tuple(r.shape)}")
    for name, ids, size in (("users", users, n_users), ("items", items, n_items)):
        if ids.dtype != torch.int64:
            raise ValueError(f"`{name}` must be int64 ids; got {ids.dtype} (convert with `.long()`)")
        if ids.device != device:
            raise ValueError(f"`{name}` is on {ids.device} but the learner trains on {device}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"`{name}` holds id {bad}, outside 0..{size - 1} (the "
                             f"{'rows' if name == 'users' else 'columns'} of the user-item matrix)")
    if not bool(((r == 0) | (r == 1)).all()):
        raise ValueError("`r` (conversion labels of the clicked pairs) must hold only 0 and 1")


@dataclass(frozen=True)
class JointConfig:
    """Hyperparameters of one joint-learning run (names follow the BADR code's configs).

    ``estimator`` and ``imputation_loss`` name :mod:`estimators.registry` entries; an estimator
    that reads imputed errors needs an imputation loss, any other takes None.  ``dim``: the MF
    models' embedding size; ``G``: sampled pairs per clicked pair; ``lr`` / ``weight_decay``: the
    prediction model's Adam; ``imp_lr`` / ``imp_weight_decay``: the imputation model's;
    ``alpha``: DR-MSE's mixing weight.  ``imputation``, ``cross_entropy`` and ``imputed_error``
    are the step's :class:`~estimators.joint_loss.Form` (``imputed_error="published"`` only with a
    DR-family imputation loss); ``sampling`` one of :data:`SAMPLINGS`.  Every value is checked
    here: a bad one is a ``ValueError`` naming the field.
    """

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
    sampling: str = "uniform"
    imputed_error: str = "paper"  # last, so that positional construction is unchanged

    def __post_init__(self) -> None:
        spec = get_estimator(self.estimator)
        if spec.step is None:
            raise ValueError(f"`estimator` {self.estimator!r} has no joint-learning form")
        if spec.needs_imputation:
            if self.imputation_loss is None:
                raise ValueError(f"estimator {self.estimator!r} reads imputed errors and needs an `imputation_loss`")
            kind = get_imputation_loss(self.imputation_loss)
        elif self.imputation_loss is not None:
            raise ValueError(f"estimator {self.estimator!r} has no imputation model; set imputation_loss=None")
        else:
            kind = None
        if self.imputation not in IMPUTATIONS:
            raise ValueError(f"`imputation` must be one of {IMPUTATIONS}; got {self.imputation!r}")
        if self.cross_entropy not in CROSS_ENTROPIES:
            raise ValueError(f"`cross_entropy` must be one of {CROSS_ENTROPIES}; got {self.cross_entropy!r}")
        make_form(self.cross_entropy, self.imputation, self.imputed_error, kind)
        _positive_int(self.dim, "dim")
        _positive_int(self.G, "G")
        _real(self.lr, "lr", 0.0, open_low=True)
        _real(self.weight_decay, "weight_decay", 0.0)
        if kind is not None:
            _real(self.imp_lr, "imp_lr", 0.0, open_low=True)
            _real(self.imp_weight_decay, "imp_weight_decay", 0.0)
            _real(self.alpha, "alpha", 0.0, 1.0)
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"`sampling` must be one of {SAMPLINGS}; got {self.sampling!r}")
        if not isinstance(self.imputation_first, bool):
            raise ValueError(f"`imputation_first` must be True or False; got {self.imputation_first!r}")


class JointLearner:
    """Prediction model (+ imputation model) trained by joint learning on frozen propensities.

    ``propensities`` is the (n_users, n_items) tensor of clipped learned propensities ``p_hat``
    (:func:`~estimators.training.propensity.propensity_table`), on the device the models train
    on, or, where that table would not fit, a
    :class:`~estimators.training.propensity.ModelPropensities` that gives the same values pair by
    pair; either is treated as a constant and read only on the clicked batch (the estimators weigh
    the clicked pairs alone).  ``prediction`` / ``imputation`` are the models (default
    :class:`~estimators.training.models.MF` of size ``config.dim``, created on that device in that
    order); an imputation model is built or accepted only when the estimator reads imputed errors.
    ``optimizer`` is a factory ``optimizer(params, lr=..., weight_decay=...)`` for both models
    (default: the fast path's compiled Adam for MF, :func:`~estimators.training.optim.fused_adam` for other models).
    ``generator`` (on the same device) drives the sampled pairs U.  ``reduction`` and ``group``:
    under ``torch.distributed``, how the losses normalise across the ranks of ``group`` (the default
    group when None) (module docstring; :func:`estimators.distributed.resolve`), read once here.
    """

    def __init__(self, propensities: Propensities, config: JointConfig, *, prediction: Optional[nn.Module] = None,
                 imputation: Optional[nn.Module] = None, optimizer: Optional[OptimizerFactory] = None,
                 generator: Optional[torch.Generator] = None, reduction: str | Reduction = "global",
                 group=None):
        by_pair = isinstance(propensities, ModelPropensities)
        if not by_pair and (not isinstance(propensities, Tensor) or propensities.dim() != 2):
            raise ValueError(f"`propensities` must be an (n_users, n_items) tensor or a ModelPropensities; got "
                             f"{getattr(propensities, 'shape', type(propensities).__name__)}")
        if not by_pair and not bool(((propensities > 0) & (propensities <= 1)).all()):
            raise ValueError("`propensities` must lie in (0, 1]; clip them with propensity_table(..., gamma)")
        self.config = config
        self.estimator = get_estimator(config.estimator)
        self.kind = None if config.imputation_loss is None else get_imputation_loss(config.imputation_loss)
        #: How the losses normalise across ranks, and this process's place among them.
        self.reduction = resolve(reduction, group)
        self.group, self.world_size, self.rank = group, world_size(group), rank(group)
        self.form = make_form(config.cross_entropy, config.imputation, config.imputed_error, self.kind, self.reduction)
        self.n_users, self.n_items = propensities.shape
        self.device = propensities.device
        #: The flat table of clipped propensities, or None when they come pair by pair from a model.
        self.p_hat: Optional[Tensor] = None if by_pair else propensities.detach().reshape(-1).to(torch.float32)
        self._by_pair: Optional[ModelPropensities] = propensities if by_pair else None
        self.generator = generator
        self._permutation: Optional[Tensor] = None
        self._position = 0
        if imputation is not None and self.kind is None:
            raise ValueError(f"estimator {config.estimator!r} has no imputation model; do not pass `imputation`")
        self.prediction = prediction if prediction is not None else MF(self.n_users, self.n_items, config.dim).to(
            self.device)
        self.imputation: Optional[nn.Module] = None
        if self.kind is not None:
            self.imputation = imputation if imputation is not None else MF(self.n_users, self.n_items,
                                                                           config.dim).to(self.device)
        models = [m for m in (self.prediction, self.imputation) if m is not None]
        for m in models:
            if not isinstance(m, nn.Module):
                raise ValueError(f"models must be torch.nn.Module instances mapping (users, items) to logits; got "
                                 f"{type(m).__name__}")
            devices = {p.device for p in m.parameters()}
            if devices - {self.device}:
                raise ValueError(f"{type(m).__name__}'s parameters are on {sorted(map(str, devices))} but the "
                                 f"propensities on {self.device}; move the model with `.to({str(self.device)!r})`")
        #: Whether steps run the MF fast path (module docstring; never under data parallelism).
        self.fast = optimizer is None and all(type(m) is MF for m in models) and self.world_size == 1
        if self.fast:
            self.pred_opt = Adam(self.prediction.parameters(), lr=config.lr, weight_decay=config.weight_decay)
            if self.imputation is not None:
                self.imp_opt = Adam(self.imputation.parameters(), lr=config.imp_lr,
                                    weight_decay=config.imp_weight_decay)
            # Each model's (user, item) tables, detached once: views of the parameters' storage, so
            # they see every in-place Adam update (per step, a Module attribute lookup and a detach
            # per use would cost more than a Coat-sized kernel).
            self._tables = {id(m): (m.user.weight.detach(), m.item.weight.detach()) for m in models}
        else:
            factory = optimizer or fused_adam
            self.pred_opt = factory(self.prediction.parameters(), lr=config.lr, weight_decay=config.weight_decay)
            if self.imputation is not None:
                self.imp_opt = factory(self.imputation.parameters(), lr=config.imp_lr,
                                       weight_decay=config.imp_weight_decay)
        self._fused = False
        self._compiled = False
        # The modules whose forward passes build a graph: DDP wrappers under data parallelism.
        self._train_modules = {id(m): m for m in models}
        if self.world_size > 1:
            self._distribute(models)
        #: The models' ``DistributedDataParallel`` wrappers (prediction, then imputation) under data
        #: parallelism, e.g. to register a communication hook; empty in one process.
        self.ddp_modules = tuple(w for m in models if (w := self._train_modules[id(m)]) is not m)

    def _distribute(self, models: list[nn.Module]) -> None:
        """Data parallel: DDP wrappers for the models (which broadcast rank 0's parameters) and
        this rank's own stream for U (:func:`estimators.distributed.rank_generator`)."""
        for m in models:
            self._train_modules[id(m)] = data_parallel(m, self.device, self.group)
        self.generator = rank_generator(self.generator, self.device, self.group)

    def shard(self, idx: Tensor) -> Tensor:
        """This rank's part of a global batch's indices (:func:`estimators.distributed.shard`)."""
        return shard(idx, self.group)

    def set_propensities(self, propensities: Tensor) -> None:
        """Replace the propensity table (GPL's rounds refit the propensity model between joint-learning
        epochs, :mod:`estimators.training.gpl`): an (n_users, n_items) tensor of clipped
        propensities in (0, 1] on the learner's device; the models and their optimisers are kept."""
        if not isinstance(propensities, Tensor) or tuple(propensities.shape) != (self.n_users, self.n_items):
            raise ValueError(f"`propensities` must be an ({self.n_users}, {self.n_items}) tensor; got "
                             f"{getattr(propensities, 'shape', type(propensities).__name__)}")
        if propensities.device != self.device:
            raise ValueError(f"`propensities` is on {propensities.device} but the learner trains on {self.device}")
        if not bool(((propensities > 0) & (propensities <= 1)).all()):
            raise ValueError("`propensities` must lie in (0, 1]; clip them with propensity_table(..., gamma)")
        self.p_hat = propensities.detach().reshape(-1).to(torch.float32)
        self._by_pair = None

    def propensities_of(self, users: Tensor, items: Tensor) -> Tensor:
        """The clipped propensities ``p_hat`` of the pairs ``(users, items)``, float32."""
        if self._by_pair is not None:
            return self._by_pair(users, items)
        return self.p_hat[users * self.n_items + items]

    # ---- sampling -----------------------------------------------------------------------------
    def start_epoch(self) -> None:
        """Mark an epoch boundary: with ``sampling="permutation"`` the next step draws a fresh
        permutation of all pairs, whose consecutive slices are the epoch's U."""
        self._permutation = None

    def sample_pairs(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` user-item pairs drawn from all pairs, as ``config.sampling`` says."""
        if self.config.sampling == "uniform":
            return uniform_pairs(self.n_users, self.n_items, n, self.generator, self.device)
        total = self.n_users * self.n_items
        if total > _MAX_PERMUTED:
            raise ValueError(f"sampling='permutation' shuffles all {total} pairs each epoch, too many to list; use "
                             "sampling='uniform'")
        if n > total:
            raise ValueError(f"cannot draw {n} distinct pairs from {total}; lower G or the batch size")
        if self._permutation is None or self._position + n > total:  # a new epoch, or this one ran out
            self._permutation, self._position = _ext.randperm(total, self.generator, self.device), 0
        pairs = self._permutation[self._position:self._position + n]
        self._position += n
        return pairs // self.n_items, pairs % self.n_items

    def end_epoch(self) -> None:
        """Called by :func:`~estimators.training.fit.fit` after each epoch's steps; nothing here (a
        subclass's per-epoch stage: DCE's imputation calibration)."""

    # ---- one step -----------------------------------------------------------------------------
    def check_batch(self, users: Tensor, items: Tensor, r: Tensor) -> None:
        """Raise ``ValueError`` unless ``(users, items, r)`` is a clicked batch :meth:`step` takes:
        non-empty 1-D tensors of one shape on the learner's device, integer ids in range, 0/1 labels."""
        check_clicked_batch(users, items, r, self.n_users, self.n_items, self.device)

    def step(self, users: Tensor, items: Tensor, r: Tensor, *, validate: bool = True) -> dict[str, float]:
        """One joint-learning step on the clicked batch ``(users, items)`` with labels ``r``.

        Returns the prediction loss, the imputation loss (when there is an imputation model)
        and ``"monitor"``: ``sum_B w * l(y_hat', r)`` with ``y_hat'`` the prediction after the
        step (before it for the estimators without imputation model), the quantity the
        published early stopping sums over an epoch.  ``validate=False`` skips
        :meth:`check_batch` (for loops over batches checked once, as :func:`~estimators.training.fit.fit`).
        """
        if validate:
            self.check_batch(users, items, r)
        r = r.to(torch.float32)
        p_hat = self.propensities_of(users, items)
        if self.fast:
            return self._fast_step(users, items, r, p_hat)
        out = self._module_step(users, items, r, p_hat)
        if self.world_size > 1:
            out = self._global_values(out)
        return out

    def _global_values(self, out: dict[str, float]) -> dict[str, float]:
        """The global batch's losses and monitor (:func:`estimators.distributed.global_stats`)."""
        return global_stats(out, self.device, self.group)

    def _draw_u(self, users: Tensor, items: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """B then U (rows and columns), and the pairs the imputation loss differentiates: B and U
        for a loss that reads U (BADR's), else B."""
        users_u, items_u = self.sample_pairs(self.config.G * users.numel())
        rows, cols = torch.cat([users, users_u]), torch.cat([items, items_u])
        if self.kind.needs_u:
            return rows, cols, rows, cols
        return rows, cols, users, items

    # ---- the fast path: MF models, logits' gradients scattered by hand -----------------------------
    def _logits(self, model: MF, rows: Tensor, cols: Tensor) -> Tensor:
        return gather_dot_value(*self._tables[id(model)], rows, cols, self._compiled)

    def _update(self, model: MF, opt: Adam, grad_b: Optional[Tensor], grad_u: Optional[Tensor], b: int, rows: Tensor,
                cols: Tensor) -> None:
        """Scatter the gradients of the logits on B (then U) into the embeddings; one Adam step.

        ``rows`` and ``cols`` are B (then U); a part without gradient (None: the published BADR
        imputation loss has none on B, eq. 32 none on U) is not scattered.
        """
        if grad_b is None:
            grad, rows, cols = grad_u, rows[b:], cols[b:]
        elif grad_u is None:
            grad, rows, cols = grad_b, rows[:b], cols[:b]
        else:
            grad = torch.cat([grad_b, grad_u])
        grad_p, grad_q = gather_dot_grad(grad, *self._tables[id(model)], rows, cols, self._compiled)
        opt.step([grad_p, grad_q], self._compiled)

    def _prediction_grads(self, x: Tensor, b: int, r: Tensor, p_hat: Tensor, xt: Optional[Tensor]):
        """The prediction loss and its gradients on B (then U) from the logits ``x`` (and ``xt``)."""
        cfg = self.config
        x_b, x_u = (x, None) if xt is None else (x[:b], x[b:])
        xt_b, xt_u = (None, None) if xt is None else (xt[:b], xt[b:])
        if self._fused:  # the door's operator itself: no per-call checks on the per-step path
            return _ext.prediction_loss_and_grads(cfg.estimator, x_b, r, p_hat, x_u, xt_b, xt_u, cfg.cross_entropy)
        return prediction_loss_and_grads(cfg.estimator, x_b, r, p_hat, x_u, xt_b, xt_u, cfg.imputation,
                                         cfg.cross_entropy, validate=False)

    def _imputation_grads(self, xt: Tensor, x: Tensor, b: int, r: Tensor, p_hat: Tensor):
        """The imputation loss and its gradients on B (then U); ``xt`` and ``x`` cover B then U when
        the loss reads U, else B only."""
        cfg = self.config
        on_u = xt.numel() > b
        args = (xt[:b], x[:b], r, p_hat, xt[b:] if on_u else None, x[b:] if on_u else None, cfg.alpha)
        if self._fused:
            return _ext.imputation_loss_and_grads(cfg.imputation_loss, *args, cfg.cross_entropy, cfg.imputed_error)
        return imputation_loss_and_grads(cfg.imputation_loss, *args, cfg.imputation, cfg.cross_entropy,
                                         cfg.imputed_error, validate=False)

    def _fast_step(self, users: Tensor, items: Tensor, r: Tensor, p_hat: Tensor) -> dict[str, float]:
        cfg = self.config
        pred, imp = self.prediction, self.imputation
        # Whether this step's losses run on the fused operators (read once per step: the
        # per-call checks of the public loss functions cost more than a Coat-sized kernel).
        P = self._tables[id(pred)][0]
        self._fused = (cfg.imputation == "pseudo_label" and _ext.loss_kernels("prediction", cfg.estimator, P)
                       and (self.kind is None or _ext.loss_kernels("imputation", cfg.imputation_loss, P)))
        self._compiled = use_operator(P)
        b = users.numel()
        out: dict[str, float] = {}
        if imp is None:
            x_b = self._logits(pred, users, items)
            loss, grad_b, _ = self._prediction_grads(x_b, b, r, p_hat, None)
            self._update(pred, self.pred_opt, grad_b, None, b, users, items)
            out["prediction_loss"] = float(loss)
            out["monitor"] = self._monitor(x_b, r, p_hat)
            return out
        rows, cols, imp_rows, imp_cols = self._draw_u(users, items)
        if cfg.imputation_first:  # Algorithm 1's order
            x = self._logits(pred, rows, cols)
            xt = self._logits(imp, imp_rows, imp_cols)
            loss, grad_b, grad_u = self._imputation_grads(xt, x[:imp_rows.numel()], b, r, p_hat)
            self._update(imp, self.imp_opt, grad_b, grad_u, b, imp_rows, imp_cols)
            out["imputation_loss"] = float(loss)
            loss, grad_b, grad_u = self._prediction_grads(x, b, r, p_hat, self._logits(imp, rows, cols))
            self._update(pred, self.pred_opt, grad_b, grad_u, b, rows, cols)
            out["prediction_loss"] = float(loss)
            x_b = self._logits(pred, users, items)
        else:  # the published code's order; the imputation model is unchanged until its own update
            xt = self._logits(imp, rows, cols)
            loss, grad_b, grad_u = self._prediction_grads(self._logits(pred, rows, cols), b, r, p_hat, xt)
            self._update(pred, self.pred_opt, grad_b, grad_u, b, rows, cols)
            out["prediction_loss"] = float(loss)
            x = self._logits(pred, imp_rows, imp_cols)
            loss, grad_b, grad_u = self._imputation_grads(xt[:imp_rows.numel()], x, b, r, p_hat)
            self._update(imp, self.imp_opt, grad_b, grad_u, b, imp_rows, imp_cols)
            out["imputation_loss"] = float(loss)
            x_b = x[:b]
        out["monitor"] = self._monitor(x_b, r, p_hat)
        return out

    def _monitor(self, x_b: Tensor, r: Tensor, p_hat: Tensor) -> float:
        """``sum_B w * l(x_b, r)``: the IPS numerator, |B| times the fused IPS loss."""
        if self._fused:
            loss = _ext.prediction_loss_and_grads("ips", x_b, r, p_hat, None, None, None, self.config.cross_entropy)[0]
            return float(loss) * x_b.numel()
        return float(monitor(x_b, r, p_hat, self.form))

    # ---- the module path: any models, autograd and torch.optim ----------------------------------
    @staticmethod
    def _descend(opt: torch.optim.Optimizer, loss: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def _module_prediction_update(self, rows: Tensor, cols: Tensor, b: int, r: Tensor,
                                  p_hat: Tensor) -> tuple[float, Tensor]:
        """The prediction update; returns its loss and the prediction logits on B before it."""
        cfg = self.config
        x = self._train_modules[id(self.prediction)](rows, cols)
        if self.imputation is None:
            loss = prediction_loss(cfg.estimator, x, r, p_hat, None, None, None, cfg.imputation, cfg.cross_entropy,
                                   validate=False, reduction=self.reduction)
        else:
            with torch.no_grad():
                xt = self.imputation(rows, cols)
            loss = prediction_loss(cfg.estimator, x[:b], r, p_hat, x[b:], xt[:b], xt[b:], cfg.imputation,
                                   cfg.cross_entropy, validate=False, reduction=self.reduction)
        self._descend(self.pred_opt, loss)
        return float(loss.detach()), x[:b].detach()

    def _module_imputation_update(self, rows: Tensor, cols: Tensor, b: int, r: Tensor,
                                  p_hat: Tensor) -> tuple[float, Tensor]:
        """The imputation update; returns its loss and the prediction logits on B it used."""
        cfg = self.config
        with torch.no_grad():
            x = self.prediction(rows, cols)
        xt = self._train_modules[id(self.imputation)](rows, cols)
        on_u = self.kind.needs_u
        loss = imputation_loss(cfg.imputation_loss, xt[:b], x[:b], r, p_hat, xt[b:] if on_u else None,
                               x[b:] if on_u else None, cfg.alpha, cfg.imputation, cfg.cross_entropy,
                               cfg.imputed_error, validate=False, reduction=self.reduction)
        self._descend(self.imp_opt, loss)
        return float(loss.detach()), x[:b]

    def _module_step(self, users: Tensor, items: Tensor, r: Tensor, p_hat: Tensor) -> dict[str, float]:
        self.prediction.train()
        out: dict[str, float] = {}
        b = users.numel()
        if self.imputation is None:
            out["prediction_loss"], x_b = self._module_prediction_update(users, items, b, r, p_hat)
        else:
            self.imputation.train()
            rows, cols, imp_rows, imp_cols = self._draw_u(users, items)
            if self.config.imputation_first:
                out["imputation_loss"], _ = self._module_imputation_update(imp_rows, imp_cols, b, r, p_hat)
                out["prediction_loss"], _ = self._module_prediction_update(rows, cols, b, r, p_hat)
                with torch.no_grad():
                    x_b = self.prediction(users, items)
            else:
                out["prediction_loss"], _ = self._module_prediction_update(rows, cols, b, r, p_hat)
                out["imputation_loss"], x_b = self._module_imputation_update(imp_rows, imp_cols, b, r, p_hat)
        out["monitor"] = float(monitor(x_b, r, p_hat.to(x_b.dtype), self.form))
        return out

    # ---- prediction ---------------------------------------------------------------------------
    def predict(self, users: Tensor, items: Tensor) -> Tensor:
        """Predicted CVR ``sigmoid(logit)`` of the prediction model (in evaluation mode)."""
        return predict_probabilities(self.prediction, users, items)
