"""Models: ``torch.nn.Module``s that map a batch of user ids and item ids to logits.

Any module with ``forward(users, items) -> logits`` (1-D int64 ids in, one logit per pair out)
can be the prediction, the imputation or the propensity model of every estimator: the pairs U
of joint learning are sampled from ALL user-item pairs, so a model's inputs are the ids, and
side features are tables of the model indexed by them (:class:`TwoTower`).  Shipped:

- :class:`MF`, matrix factorisation of the BADR code (the trainers' fast path: fused
  gather-dot and fused Adam, chosen automatically);
- :class:`TwoTower`, an MLP tower per side over the id embedding and the side features, the
  logit their dot product;
- :class:`PropensityModel`, the BADR code's logistic regression on concatenated embeddings
  (the propensity fit's fast path);
- :class:`ESCM2`, shared embeddings with CTR, CVR and imputation towers (ESMM / ESCM2).

All return logits; probabilities are ``torch.sigmoid(logits)``; losses are computed from
logits (softplus forms) so that extreme scores stay finite.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gather import gather_dot


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


def _feature_table(features, n_rows: int, name: str) -> Optional[Tensor]:
    """Side features as a float32 (n_rows, d) tensor, or None."""
    if features is None:
        return None
    table = torch.as_tensor(np.asarray(features, dtype=np.float32) if not isinstance(features, Tensor) else features)
    if table.dim() != 2 or table.shape[0] != n_rows:
        raise ValueError(f"`{name}` must be a 2-D table with one row per id ({n_rows} rows); got shape "
                         f"{tuple(table.shape)}")
    if not bool(torch.isfinite(table).all()):
        raise ValueError(f"`{name}` contains NaN or inf")
    return table.to(torch.float32)


def _tower(in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class TwoTower(nn.Module):
    """Two towers with side features: ``logit(u, i) = <f([E_u ; x_u]), g([F_i ; y_i])> + b``.

    ``E`` and ``F`` are id embeddings of size ``dim`` (N(0, 0.1^2) at start), ``x_u`` and
    ``y_i`` the rows of the side-feature tables ``user_features`` (n_users, d_u) and
    ``item_features`` (n_items, d_i) (either may be None: the tower then sees the id embedding
    alone), ``f`` and ``g`` MLPs with ReLU hidden layers of the widths in ``hidden`` and an
    output of size ``dim``, ``b`` a scalar bias.  The feature tables are buffers: they move with
    ``.to(device)`` and are saved in the state dict.
    """

    def __init__(self, n_users: int, n_items: int, dim: int = 16, hidden: Sequence[int] = (32,),
                 user_features=None, item_features=None, dropout: float = 0.0) -> None:
        super().__init__()
        if min(n_users, n_items, dim) < 1 or any(w < 1 for w in hidden):
            raise ValueError(f"n_users, n_items, dim and the hidden widths must be positive; got {n_users}, "
                             f"{n_items}, {dim}, {tuple(hidden)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must lie in [0, 1); got {dropout}")
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)
        self.register_buffer("user_features", _feature_table(user_features, n_users, "user_features"))
        self.register_buffer("item_features", _feature_table(item_features, n_items, "item_features"))
        d_u = 0 if self.user_features is None else self.user_features.shape[1]
        d_i = 0 if self.item_features is None else self.item_features.shape[1]
        self.user_tower = _tower(dim + d_u, hidden, dim, dropout)
        self.item_tower = _tower(dim + d_i, hidden, dim, dropout)
        self.bias = nn.Parameter(torch.zeros(()))

    def _side(self, ids: Tensor, embedding: nn.Embedding, features: Optional[Tensor], tower: nn.Sequential) -> Tensor:
        x = embedding(ids)
        if features is not None:
            x = torch.cat([x, features[ids]], dim=-1)
        return tower(x)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        u = self._side(users, self.user, self.user_features, self.user_tower)
        v = self._side(items, self.item, self.item_features, self.item_tower)
        return (u * v).sum(-1) + self.bias


class ESCM2(nn.Module):
    """Shared user and item embeddings with a CTR, a CVR and an imputation tower (ESCM2 paper, Fig. 4).

    Each tower is an MLP on ``[U_u ; V_i]``; the imputation tower's output passes through
    softplus so that the imputed error ``delta_hat`` is non-negative, like a cross-entropy.
    ``forward`` returns ``(ctr_logit, cvr_logit, delta_hat)``, the inputs of
    :func:`estimators.escm2_loss`.
    """

    def __init__(self, n_users: int, n_items: int, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        if min(n_users, n_items, dim, hidden) < 1:
            raise ValueError("n_users, n_items, dim and hidden must be positive")
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)
        self.ctr, self.cvr, self.imputation = (_tower(2 * dim, (hidden,), 1, 0.0) for _ in range(3))

    def forward(self, users: Tensor, items: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = torch.cat([self.user(users), self.item(items)], dim=-1)
        return (self.ctr(x).squeeze(-1), self.cvr(x).squeeze(-1), F.softplus(self.imputation(x).squeeze(-1)))
