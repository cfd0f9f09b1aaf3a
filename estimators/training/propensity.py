"""Fitting the propensity model ``p_hat = P(o = 1 | u, i)`` on the click indicators of all pairs (eq. 4).

:func:`fit_propensity` fits any model of :mod:`estimators.training.models` (any module mapping
ids to logits) by Adam over batches of a fresh permutation of ALL user-item pairs each epoch, with
the published early stopping; the BADR code's :class:`~estimators.training.models.PropensityModel`
runs on a fast path (written-out gradients, one fused ``cvr::propensity_step_`` per batch on the
CPU).  :func:`propensity_table` then gives the clipped propensities of all pairs, the table the
joint learner reads.

Where the users x items matrix is too large to enumerate, :func:`fit_propensity_sampled` fits the
same loss from the clicked pairs and uniformly drawn pairs, and :class:`ModelPropensities` gives
the joint learner the fitted model's clipped propensities pair by pair, never as a table.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _ext
from .early_stopping import EarlyStopping
from .models import PropensityModel
from .optim import Adam, fused_adam

#: The propensity fit's losses: "mse", the published BADR code's squared error on sigmoid(logit),
#: and "bce", eq. (4).
PROPENSITY_LOSSES = ("mse", "bce")


def fit_propensity(
    model: nn.Module,
    clicks: Tensor,
    *,
    lr: float,
    weight_decay: float,
    batch_size: int,
    max_epochs: int = 200,
    loss: str = "mse",
    tol: float = 1e-4,
    patience: int = 7,
    generator: Optional[torch.Generator] = None,
    on_epoch: Optional[Callable[[int, float], None]] = None,
    fused: Optional[bool] = None,
    optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
) -> int:
    """Fit the propensity model on the click indicators of ALL user-item pairs (eq. 4).

    ``clicks`` is the (n_users, n_items) 0/1 click matrix, or its flat (n_users * n_items,) form
    (pair index ``u * n_items + i``; a :class:`PropensityModel` knows its shape, another model
    needs the 2-D form), on the model's device.  Each epoch's permutation is
    :func:`estimators._ext.randperm` drawn from ``generator``.
    ``loss="bce"`` is eq. (4); ``loss="mse"`` is the published BADR code's squared error on
    ``sigmoid(logit)``.  Adam over batches of ``batch_size`` pairs from a fresh permutation each
    epoch (the last partial batch is dropped); stops when the relative decrease of the summed
    epoch loss has been below ``tol`` in ``patience`` epochs (not necessarily consecutive), as
    the published protocol does.  Returns the number of epochs run.  ``on_epoch(epoch, loss)``
    is called after each epoch with its summed batch losses.

    Any model runs on autograd with ``optimizer(model.parameters(), lr=lr,
    weight_decay=weight_decay)`` (default :func:`~estimators.training.optim.fused_adam`), the squared error on
    ``sigmoid(logit)`` or the cross-entropy from logits.  A :class:`PropensityModel` with the
    default optimizer takes the fast path: the model is additive, ``logit(u, i) = a_u + b_i`` with
    ``a = P w_1 + c`` and ``b = Q w_2``, so the gradients are written out instead of taped: with
    ``g = dloss / dlogit`` on the batch, ``g_a = sum of g per user``, ``dP = g_a w_1^T``,
    ``dw_1 = P^T g_a``, ``dc = sum g`` (and likewise for items), into preallocated buffers; Adam as
    ``torch.optim.Adam`` (:class:`estimators.training.optim.Adam`).
    The parameters follow the autograd + ``torch.optim.Adam`` trajectory up to float rounding
    (``tests/test_models.py``).  ``fused`` (default: where the extension is built, the backend
    is ``"fused"`` and the model is on the CPU) runs each step as one ``cvr::propensity_step_``
    (``csrc/propensity.cpp``), which forms the rank-one gradients of ``P`` and ``Q`` row by row
    inside the Adam update and recomputes ``a`` and ``b`` in the same pass.
    """
    if loss not in PROPENSITY_LOSSES:
        raise ValueError(f"`loss` must be 'mse' (published code) or 'bce' (eq. 4); got {loss!r}")
    additive = type(model) is PropensityModel and optimizer is None
    if clicks.dim() == 2:
        n_users, n_items = clicks.shape
        clicks = clicks.reshape(-1)
    elif clicks.dim() == 1 and type(model) is PropensityModel:
        n_users, n_items = model.user.num_embeddings, model.item.num_embeddings
    else:
        raise ValueError(f"`clicks` must be the (n_users, n_items) click matrix (or, for a PropensityModel, its "
                         f"flat form); got shape {tuple(clicks.shape)}")
    if type(model) is PropensityModel and n_users * n_items != clicks.numel():
        raise ValueError(f"`clicks` must have n_users * n_items = {n_users * n_items} entries (one per user-item "
                         f"pair); got {clicks.numel()}")
    if type(model) is PropensityModel and (n_users, n_items) != (model.user.num_embeddings, model.item.num_embeddings):
        raise ValueError(f"`clicks` is a {n_users} x {n_items} matrix but the model has {model.user.num_embeddings} "
                         f"users and {model.item.num_embeddings} items")
    n = clicks.numel()
    if not (isinstance(batch_size, int) and 1 <= batch_size <= n):
        raise ValueError(f"`batch_size` must be an integer in [1, {n}]; got {batch_size!r}")
    if not (lr > 0 and weight_decay >= 0):  # False for NaN too
        raise ValueError(f"`lr` must be positive and `weight_decay` non-negative; got {lr}, {weight_decay}")
    if not bool(((clicks == 0) | (clicks == 1)).all()):
        raise ValueError("`clicks` must hold 0/1 click indicators")
    device = next(model.parameters()).device
    if additive:
        if fused is None:
            fused = _ext.table_kernels(_ext.propensity_step_, device)
        epoch_fn = (_fused_epoch if fused else _reference_epoch)(model, clicks, lr, weight_decay, batch_size, loss)
    else:
        epoch_fn = _module_epoch(model, clicks, n_items, lr, weight_decay, batch_size, loss,
                                 optimizer or fused_adam)
    n_full = n - n % batch_size  # the last partial batch is dropped
    stop = EarlyStopping(tol, patience)
    for epoch in range(1, max_epochs + 1):
        total = epoch_fn(_ext.randperm(n, generator, device)[:n_full])
        if on_epoch is not None:
            on_epoch(epoch, total)
        if stop.should_stop(total):
            return epoch
    return max_epochs


def fit_propensity_sampled(
    model: nn.Module,
    users: Tensor,
    items: Tensor,
    n_users: int,
    n_items: int,
    *,
    negatives: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    max_epochs: int = 200,
    loss: str = "bce",
    tol: float = 1e-4,
    patience: int = 7,
    generator: Optional[torch.Generator] = None,
    on_epoch: Optional[Callable[[int, float], None]] = None,
    optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
) -> int:
    """Fit the propensity model on the clicks and sampled pairs, never enumerating all pairs.

    Eq. (4) averages a loss ``l(p_hat, o)`` over all ``N = n_users * n_items`` pairs, which at
    industrial sizes cannot be listed.  Each epoch takes the ``C`` clicked pairs ``(users, items)``
    (distinct, each with ``o = 1``) and ``M = negatives * C`` pairs drawn uniformly from all
    pairs, with replacement (``o_j`` = whether the drawn pair is clicked), and weights them::

        L = [ sum_clicked l(p, 1)  +  (N / M) sum_{j <= M} (1 - o_j) l(p_j, 0) ] / N

    an unbiased estimate of the enumerated mean (a drawn click adds nothing: the clicks are
    summed exactly; the same construction as DCE's (C3), :mod:`estimators.calibration`).  The
    ``C + M`` weighted pairs are shuffled into batches of ``batch_size`` (the last partial batch
    dropped), each batch's loss ``(C + M) / N * mean_B(w l)``, whose expectation is ``L``; so a
    step has the scale of :func:`fit_propensity`'s batch mean.  Memory is ``O(C + M)`` besides
    the model.  ``loss``, ``lr``, ``weight_decay``, ``tol``, ``patience``, ``on_epoch`` and
    ``optimizer`` as :func:`fit_propensity` (autograd for every model); returns the epochs run.
    """
    if loss not in PROPENSITY_LOSSES:
        raise ValueError(f"`loss` must be 'mse' (published code) or 'bce' (eq. 4); got {loss!r}")
    for name, value in (("n_users", n_users), ("n_items", n_items), ("negatives", negatives),
                        ("max_epochs", max_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer; got {value!r}")
    if not (isinstance(users, Tensor) and isinstance(items, Tensor) and users.dim() == 1
            and users.shape == items.shape and users.numel() > 0 and not users.is_floating_point()
            and not items.is_floating_point()):
        raise ValueError("`users` and `items` (the clicked pairs) must be non-empty 1-D integer tensors of one "
                         "shape")
    if int(users.min()) < 0 or int(users.max()) >= n_users or int(items.min()) < 0 or int(items.max()) >= n_items:
        raise ValueError(f"`users` / `items` hold ids outside [0, {n_users}) x [0, {n_items}]")
    if not (lr > 0 and weight_decay >= 0):  # False for NaN too
        raise ValueError(f"`lr` must be positive and `weight_decay` non-negative; got {lr}, {weight_decay}")
    device = next(model.parameters()).device
    n_pairs = n_users * n_items
    clicked = torch.unique(users.to(device=device, dtype=torch.int64) * n_items + items.to(device, torch.int64))
    if clicked.numel() != users.numel():
        raise ValueError(f"`users` / `items` repeat {users.numel() - clicked.numel()} clicked pair(s); pass each "
                         "clicked pair once (o is an indicator)")
    n_c = clicked.numel()
    m = negatives * n_c
    n_epoch = n_c + m
    if not (isinstance(batch_size, int) and 1 <= batch_size <= n_epoch):
        raise ValueError(f"`batch_size` must be an integer in [1, {n_epoch}] (the clicks and their negatives); "
                         f"got {batch_size!r}")
    opt = (optimizer or fused_adam)(model.parameters(), lr=lr, weight_decay=weight_decay)
    scale = n_epoch / n_pairs
    n_full = n_epoch - n_epoch % batch_size
    stop = EarlyStopping(tol, patience)
    for epoch in range(1, max_epochs + 1):
        pairs, target, weight = sampled_pairs(clicked, n_pairs, m, generator)
        perm = _ext.randperm(n_epoch, generator, device)[:n_full]
        model.train()
        total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, n_full, batch_size):
            batch = perm[start:start + batch_size]
            pair = pairs[batch]
            logit = model(pair // n_items, pair % n_items)
            t, w = target[batch].to(logit.dtype), weight[batch].to(logit.dtype)
            per_pair = ((torch.sigmoid(logit) - t) ** 2 if loss == "mse"
                        else F.binary_cross_entropy_with_logits(logit, t, reduction="none"))
            value = scale * (w * per_pair).mean()
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            total += value.detach()
        if on_epoch is not None:
            on_epoch(epoch, float(total))
        if not math.isfinite(float(total)):
            raise ValueError(f"the sampled propensity fit diverged at epoch {epoch} (loss {float(total)}); lower `lr`")
        if stop.should_stop(float(total)):
            return epoch
    return max_epochs


def sampled_pairs(clicked: Tensor, n_pairs: int, m: int, generator: Optional[torch.Generator] = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """One epoch's pairs of :func:`fit_propensity_sampled`: ``(pairs, target, weight)``, the sorted
    distinct clicked pair indices ``clicked`` (``u * n_items + i``; target 1, weight 1) followed by
    ``m`` pairs drawn uniformly from ``range(n_pairs)`` (target 0, weight ``(1 - o) N / m``, so a
    drawn click weighs 0).  ``sum(weight * l(p, target))`` is unbiased for ``sum over all pairs of
    l(p, o)``."""
    device = clicked.device
    n_c = clicked.numel()
    drawn = torch.randint(n_pairs, (m,), generator=generator, device=device)
    o_drawn = clicked[torch.searchsorted(clicked, drawn).clamp_max(n_c - 1)] == drawn
    pairs = torch.cat([clicked, drawn])
    target = torch.cat([torch.ones(n_c, device=device), torch.zeros(m, device=device)])
    weight = torch.cat([torch.ones(n_c, device=device), (~o_drawn).to(torch.float32) * (n_pairs / m)])
    return pairs, target, weight


class ModelPropensities:
    """The clipped propensities ``clip(sigmoid(model(u, i)), gamma, 1)`` of a frozen propensity
    model, pair by pair: what :class:`~estimators.training.joint.JointLearner` reads in place of
    the ``(n_users, n_items)`` table where that table would not fit.

    A :class:`PropensityModel` (additive, ``a_u + b_i``) is stored as its two logit vectors,
    ``O(n_users + n_items)`` memory, and gives exactly the values of :func:`propensity_table`
    (the same float32 ``sigmoid(a_u + b_i)``, clipped); any other model is called under
    ``no_grad`` in evaluation mode on the pairs asked for.  ``model`` is not copied: do not train
    it while a learner reads it."""

    def __init__(self, model: nn.Module, n_users: int, n_items: int, gamma: float) -> None:
        for name, value in (("n_users", n_users), ("n_items", n_items)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}")
        if not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and 0.0 < gamma <= 1.0):
            raise ValueError(f"`gamma` (propensity clipping floor) must lie in (0, 1]; got {gamma!r}")
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module mapping (users, items) to logits; got "
                             f"{type(model).__name__}")
        self.shape = (n_users, n_items)
        self.gamma = float(gamma)
        self.device = next(model.parameters()).device
        self.model = model
        self._ab: Optional[tuple[Tensor, Tensor]] = None
        if type(model) is PropensityModel:
            if (model.user.num_embeddings, model.item.num_embeddings) != self.shape:
                raise ValueError(f"the PropensityModel has {model.user.num_embeddings} users and "
                                 f"{model.item.num_embeddings} items, not {n_users} x {n_items}")
            with torch.no_grad():
                self._ab = tuple(t.detach().clone() for t in model.user_item_logits())

    @torch.no_grad()
    def __call__(self, users: Tensor, items: Tensor) -> Tensor:
        """The clipped propensities of the pairs ``(users, items)`` (1-D, float32)."""
        if self._ab is not None:
            a, b = self._ab
            p = torch.sigmoid(a[users] + b[items])
        else:
            was_training = self.model.training
            self.model.eval()
            try:
                p = torch.sigmoid(self.model(users, items).float())
            finally:
                self.model.train(was_training)
        return p.clamp(self.gamma, 1.0)

    def table(self) -> Tensor:
        """All pairs' clipped propensities, ``(n_users, n_items)``: for small data and tests."""
        n_users, n_items = self.shape
        if self._ab is not None:
            a, b = self._ab
            return torch.sigmoid(a[:, None] + b[None, :]).clamp(self.gamma, 1.0)
        return propensity_table(self.model, n_users, n_items, self.gamma)


#: What a joint learner reads its propensities from: the (n_users, n_items) table, or a model pair by pair.
Propensities = Union[Tensor, ModelPropensities]


@torch.no_grad()
def propensity_table(model: nn.Module, n_users: int, n_items: int, gamma: Optional[float] = None,
                     chunk: int = 1 << 20) -> Tensor:
    """``sigmoid(model(u, i))`` of all pairs, shape (n_users, n_items), clipped to ``[gamma, 1]``
    when ``gamma`` is given (the clipping of the IPS / DR weights, ``0 < gamma <= 1``).  A
    :class:`PropensityModel` is scored in one broadcast (``a_u + b_i``), any other model in chunks
    of ``chunk`` pairs in evaluation mode."""
    if gamma is not None and not 0.0 < gamma <= 1.0:
        raise ValueError(f"`gamma` (propensity clipping floor) must lie in (0, 1]; got {gamma}")
    if type(model) is PropensityModel:
        a, b = model.user_item_logits()
        p = torch.sigmoid(a[:, None] + b[None, :])
    else:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            flat = torch.empty(n_users * n_items, device=device)
            for start in range(0, flat.numel(), chunk):
                pairs = torch.arange(start, min(start + chunk, flat.numel()), device=device)
                flat[start:start + pairs.numel()] = torch.sigmoid(model(pairs // n_items, pairs % n_items).float())
        finally:
            model.train(was_training)
        p = flat.reshape(n_users, n_items)
    return p if gamma is None else p.clamp(gamma, 1.0)


def _module_epoch(model: nn.Module, clicks: Tensor, n_items: int, lr: float, weight_decay: float, batch_size: int,
                  loss: str, optimizer: Callable[..., torch.optim.Optimizer]) -> Callable[[Tensor], float]:
    """One epoch of :func:`fit_propensity` for any model, on autograd."""
    opt = optimizer(model.parameters(), lr=lr, weight_decay=weight_decay)
    device = next(model.parameters()).device
    target = clicks.to(device=device, dtype=torch.float32)

    def epoch(perm: Tensor) -> float:
        model.train()
        total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, perm.numel(), batch_size):
            pairs = perm[start:start + batch_size]
            logit = model(pairs // n_items, pairs % n_items)
            t = target[pairs].to(logit.dtype)
            value = (F.mse_loss(torch.sigmoid(logit), t) if loss == "mse"
                     else F.binary_cross_entropy_with_logits(logit, t))
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            total += value.detach()
        return float(total)

    return epoch


def _reference_epoch(model: PropensityModel, clicks: Tensor, lr: float, weight_decay: float, batch_size: int,
                     loss: str) -> Callable[[Tensor], float]:
    """One epoch of :func:`fit_propensity` in ATen ops: ``epoch(perm)`` steps over the batches of
    ``perm`` and returns the summed batch losses."""
    n_users, n_items = model.user.num_embeddings, model.item.num_embeddings
    dim = model.user.embedding_dim
    P, Q = model.user.weight, model.item.weight
    W, c = model.linear.weight, model.linear.bias  # (1, 2 dim), (1,)
    target = clicks.to(device=P.device, dtype=P.dtype)
    opt = Adam([P, Q, W, c], lr, weight_decay)
    grads = [torch.empty_like(P), torch.empty_like(Q), torch.empty_like(W), torch.empty_like(c)]
    grad_p, grad_q, grad_w, grad_c = grads
    a, b = P.new_empty(n_users), P.new_empty(n_items)
    g_a, g_b = P.new_empty(n_users), P.new_empty(n_items)

    @torch.no_grad()
    def epoch(perm: Tensor) -> float:
        t_epoch = target.index_select(0, perm)
        u_epoch, i_epoch = perm // n_items, perm % n_items
        total = torch.zeros((), dtype=torch.float64, device=P.device)
        for start in range(0, perm.numel(), batch_size):
            u, i, t = u_epoch[start:start + batch_size], i_epoch[start:start + batch_size], \
                t_epoch[start:start + batch_size]
            w1, w2 = W[0, :dim], W[0, dim:]
            torch.addmv(c.expand(n_users), P, w1, out=a)
            torch.mv(Q, w2, out=b)
            prob = torch.sigmoid(a.index_select(0, u) + b.index_select(0, i))
            diff = prob - t
            if loss == "mse":
                total += (diff * diff).mean()
                g = diff * prob * (1 - prob) * (2.0 / batch_size)
            else:
                total += F.binary_cross_entropy(prob, t)
                g = diff * (1.0 / batch_size)
            g_a.zero_().index_add_(0, u, g)
            g_b.zero_().index_add_(0, i, g)
            torch.outer(g_a, w1, out=grad_p)
            torch.outer(g_b, w2, out=grad_q)
            torch.mv(P.t(), g_a, out=grad_w[0, :dim])
            torch.mv(Q.t(), g_b, out=grad_w[0, dim:])
            grad_c.copy_(g_a.sum())
            opt.step(grads)
        return float(total)

    return epoch


def _fused_epoch(model: PropensityModel, clicks: Tensor, lr: float, weight_decay: float, batch_size: int,
                 loss: str) -> Callable[[Tensor], float]:
    """:func:`_reference_epoch` with one ``cvr::propensity_step_`` per batch (same batches, same updates)."""
    # Views of the parameters' storage, which the kernel updates in place.
    tables = [p.detach() for p in (model.user.weight, model.item.weight, model.linear.weight, model.linear.bias)]
    exp_avg = [torch.zeros_like(t) for t in tables]
    exp_avg_sq = [torch.zeros_like(t) for t in tables]
    with torch.no_grad():
        a, b = (t.contiguous() for t in model.user_item_logits())  # the kernel keeps them current
    clicks = torch.from_numpy(np.packbits(clicks.cpu().numpy().astype(bool), bitorder="little"))
    steps = 0

    @torch.no_grad()
    def epoch(perm: Tensor) -> float:
        nonlocal steps
        total = 0.0
        for start in range(0, perm.numel(), batch_size):
            steps += 1
            total += _ext.propensity_step_(*tables, exp_avg, exp_avg_sq, a, b, perm[start:start + batch_size], clicks,
                                      steps, lr, weight_decay, loss)
        return total

    return epoch
