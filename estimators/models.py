"""Models: matrix factorisation and the logistic-regression propensity model of the BADR code.

All models return logits; probabilities are ``torch.sigmoid(logits)``.  Losses are computed
from logits (softplus forms) so that extreme scores stay finite.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn


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
        return (self.user(users) * self.item(items)).sum(dim=-1)

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
) -> int:
    """Fit the propensity model on the click indicators of ALL user-item pairs (eq. 4).

    ``clicks`` is the flat (n_users * n_items,) 0/1 tensor, pair index ``u * n_items + i``.
    ``loss="bce"`` is eq. (4); ``loss="mse"`` is the published BADR code's squared error on
    ``sigmoid(logit)``.  Adam over batches of ``batch_size`` pairs from a fresh permutation each
    epoch (the last partial batch is dropped); stops when the relative decrease of the summed
    epoch loss has been below ``tol`` in ``patience`` epochs (not necessarily consecutive), as
    the published protocol does.  Returns the number of epochs run.
    """
    if loss not in ("mse", "bce"):
        raise ValueError(f"`loss` must be 'mse' (published code) or 'bce' (eq. 4); got {loss!r}")
    n_items = model.item.num_embeddings
    n = clicks.numel()
    if n != model.user.num_embeddings * n_items:
        raise ValueError(f"`clicks` must have n_users * n_items = {model.user.num_embeddings * n_items} "
                         f"entries (one per user-item pair); got {n}")
    if batch_size < 1 or batch_size > n:
        raise ValueError(f"`batch_size` must lie in [1, {n}]; got {batch_size}")
    target = clicks.to(torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    last, stalls = None, 0
    for epoch in range(1, max_epochs + 1):
        perm = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n - batch_size + 1, batch_size):
            idx = perm[start:start + batch_size]
            logit = model(idx // n_items, idx % n_items)
            t = target[idx]
            if loss == "mse":
                batch_loss = ((torch.sigmoid(logit) - t) ** 2).mean()
            else:
                batch_loss = nn.functional.binary_cross_entropy_with_logits(logit, t)
            opt.zero_grad(set_to_none=True)
            batch_loss.backward()
            opt.step()
            total += float(batch_loss.detach())
        if on_epoch is not None:
            on_epoch(epoch, total)
        if last is not None and (last - total) / (last + 1e-12) < tol:
            stalls += 1
            if stalls >= patience:
                return epoch
        last = total
    return max_epochs
