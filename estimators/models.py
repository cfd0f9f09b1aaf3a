"""Models: matrix factorisation and the logistic-regression propensity model of the BADR code.

All models return logits; probabilities are ``torch.sigmoid(logits)``.  Losses are computed
from logits (softplus forms) so that extreme scores stay finite.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _fused
from ._adam import Adam
from .early_stopping import EarlyStopping
from .gather import gather_dot
from .permutation import randperm

_HAS_STEP = _fused._C is not None and hasattr(torch.ops.cvr, "propensity_step_")
if _HAS_STEP:
    _PROPENSITY_STEP = torch.ops.cvr.propensity_step_.default


class MF(nn.Module):
    """Matrix factorisation without biases: ``logit(u, i) = <U_u, V_i>``.

    Embeddings start from torch's default N(0, 1), as in the published BADR code.
    """

    def __init__(self, n_users: int, n_items: int, dim: int) -> None:
        super().__init__()
        if min(n_users, n_items, dim) < 1:
            raise ValueError(f"n_users, n_items and dim must be positive; got {n_users}, {n_items}, {dim}")
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        return gather_dot(self.user.weight, self.item.weight, users, items)

    @torch.no_grad()
    def predict(self, users: Tensor, items: Tensor) -> Tensor:
        """Probabilities ``sigmoid(<U_u, V_i>)`` without building a graph."""
        return torch.sigmoid(self(users, items))


class PropensityModel(nn.Module):
    """Logistic regression on concatenated user and item embeddings (BADR code).

    ``logit(u, i) = w^T [P_u; Q_i] + c``, which is the additive form
    ``a_u + b_i + c`` with ``a_u = w_1^T P_u`` and ``b_i = w_2^T Q_i``.  Scoring a pair therefore
    gathers two scalars, not two embeddings: same parameters and gradients, much less memory
    traffic when it is fitted over all ``n_users * n_items`` pairs.
    """

    def __init__(self, n_users: int, n_items: int, dim: int) -> None:
        super().__init__()
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)
        self.linear = nn.Linear(2 * dim, 1)

    def user_item_logits(self) -> tuple[Tensor, Tensor]:
        """``(a, b)`` with ``a[u] + b[i]`` the logit of (u, i); the intercept is folded into ``a``."""
        dim = self.user.embedding_dim
        w = self.linear.weight.squeeze(0)
        a = self.user.weight @ w[:dim] + self.linear.bias
        b = self.item.weight @ w[dim:]
        return a, b

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        a, b = self.user_item_logits()
        return a[users] + b[items]

    @torch.no_grad()
    def propensities(self, gamma: float) -> Tensor:
        """Clipped propensities ``clip(sigmoid(logit), gamma, 1)`` of all pairs, shape (n_users, n_items)."""
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"`gamma` (propensity clipping floor) must lie in (0, 1]; got {gamma}")
        a, b = self.user_item_logits()
        return torch.sigmoid(a[:, None] + b[None, :]).clamp(gamma, 1.0)


def fit_propensity(
    model: PropensityModel,
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
) -> int:
    """Fit the propensity model on the click indicators of ALL user-item pairs (eq. 4).

    ``clicks`` is the flat (n_users * n_items,) 0/1 tensor, pair index ``u * n_items + i``.
    Each epoch's permutation is :func:`estimators.permutation.randperm`.
    ``loss="bce"`` is eq. (4); ``loss="mse"`` is the published BADR code's squared error on
    ``sigmoid(logit)``.  Adam over batches of ``batch_size`` pairs from a fresh permutation each
    epoch (the last partial batch is dropped); stops when the relative decrease of the summed
    epoch loss has been below ``tol`` in ``patience`` epochs (not necessarily consecutive), as
    the published protocol does.  Returns the number of epochs run.

    The model is additive, ``logit(u, i) = a_u + b_i`` with ``a = P w_1 + c`` and ``b = Q w_2``,
    so the gradients are written out instead of taped: with ``g = dloss / dlogit`` on the batch,
    ``g_a = sum of g per user``, ``dP = g_a w_1^T``, ``dw_1 = P^T g_a``, ``dc = sum g`` (and likewise
    for items), into preallocated buffers; Adam as ``torch.optim.Adam`` (:class:`estimators._adam.Adam`).
    The parameters follow the autograd + ``torch.optim.Adam`` trajectory up to float rounding
    (``tests/test_models.py``).  ``fused`` (default: where the extension is built, the backend
    is ``"fused"`` and the model is on the CPU) runs each step as one ``cvr::propensity_step_``
    (``csrc/propensity.cpp``), which forms the rank-one gradients of ``P`` and ``Q`` row by row
    inside the Adam update and recomputes ``a`` and ``b`` in the same pass.
    """
    if loss not in ("mse", "bce"):
        raise ValueError(f"`loss` must be 'mse' (published code) or 'bce' (eq. 4); got {loss!r}")
    n_users, n_items = model.user.num_embeddings, model.item.num_embeddings
    n = clicks.numel()
    if n != n_users * n_items:
        raise ValueError(f"`clicks` must have n_users * n_items = {n_users * n_items} "
                         f"entries (one per user-item pair); got {n}")
    if batch_size < 1 or batch_size > n:
        raise ValueError(f"`batch_size` must lie in [1, {n}]; got {batch_size}")
    if not bool(((clicks == 0) | (clicks == 1)).all()):
        raise ValueError("`clicks` must hold 0/1 click indicators")
    if fused is None:
        fused = _HAS_STEP and _fused.backend() == "fused" and model.user.weight.device.type == "cpu"
    epoch_fn = (_fused_epoch if fused else _reference_epoch)(model, clicks, lr, weight_decay, batch_size, loss)
    n_full = n - n % batch_size  # the last partial batch is dropped
    stop = EarlyStopping(tol, patience)
    with torch.no_grad():
        for epoch in range(1, max_epochs + 1):
            total = epoch_fn(randperm(n, generator)[:n_full])
            if on_epoch is not None:
                on_epoch(epoch, total)
            if stop.should_stop(total):
                return epoch
    return max_epochs


def _reference_epoch(model: PropensityModel, clicks: Tensor, lr: float, weight_decay: float, batch_size: int,
                     loss: str) -> Callable[[Tensor], float]:
    """One epoch of :func:`fit_propensity` in ATen ops: ``epoch(perm)`` steps over the batches of
    ``perm`` and returns the summed batch losses."""
    n_users, n_items = model.user.num_embeddings, model.item.num_embeddings
    dim = model.user.embedding_dim
    P, Q = model.user.weight, model.item.weight
    W, c = model.linear.weight, model.linear.bias  # (1, 2 dim), (1,)
    target = clicks.to(P.dtype)
    opt = Adam([P, Q, W, c], lr, weight_decay)
    grads = [torch.empty_like(P), torch.empty_like(Q), torch.empty_like(W), torch.empty_like(c)]
    grad_p, grad_q, grad_w, grad_c = grads
    a, b = P.new_empty(n_users), P.new_empty(n_items)
    g_a, g_b = P.new_empty(n_users), P.new_empty(n_items)

    def epoch(perm: Tensor) -> float:
        t_epoch = target.index_select(0, perm)
        u_epoch, i_epoch = perm // n_items, perm % n_items
        total = torch.zeros((), dtype=torch.float64)
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

    def epoch(perm: Tensor) -> float:
        nonlocal steps
        total = 0.0
        for start in range(0, perm.numel(), batch_size):
            steps += 1
            total += _PROPENSITY_STEP(*tables, exp_avg, exp_avg_sq, a, b, perm[start:start + batch_size], clicks,
                                      steps, lr, weight_decay, loss)
        return total

    return epoch
