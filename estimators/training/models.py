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
- :class:`ESCM2`, shared embeddings with CTR, CVR and imputation towers (ESMM / ESCM2);
- :class:`MMoE`, shared id and categorical-field embeddings, a multi-gate mixture of experts and
  one tower per task of an entire-space objective (:data:`estimators.registry.ENTIRE_SPACE`);
- :class:`EntireSpaceMF`, the same tasks as separate MFs (the MF backbone of Table 3's rows).

All return logits; probabilities are ``torch.sigmoid(logits)``; losses are computed from
logits (softplus forms) so that extreme scores stay finite.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import TOWERS
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
    :func:`estimators.escm2_loss`.  :class:`MMoE` is the general form (experts and gates,
    categorical fields, any towers of an entry of :data:`estimators.registry.ENTIRE_SPACE`).
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


# ---- entire-space multi-task models (ESMM, ESCM2, Multi-IPS / Multi-DR, DDPO) -------------------
#: The towers an entire-space model can carry: the registry's :data:`estimators.registry.TOWERS`.
ENTIRE_SPACE_TOWERS = TOWERS


def _check_towers(tasks: Sequence[str]) -> tuple[str, ...]:
    tasks = tuple(tasks)
    if list(tasks) != [t for t in ENTIRE_SPACE_TOWERS if t in tasks] or tasks[:2] != ("ctr", "cvr"):
        raise ValueError(f"`tasks` must list towers of {ENTIRE_SPACE_TOWERS} in that order, starting with 'ctr' and "
                         f"'cvr' (an entry's `towers` in estimators.registry.ENTIRE_SPACE); got {tasks}")
    return tasks


def _tower_output(task: str, logit: Tensor) -> Tensor:
    """The imputation tower outputs the imputed CVR error ``softplus(logit) >= 0`` (ESCM2 eq. 19, a
    cross-entropy is non-negative); the other towers output logits."""
    return F.softplus(logit) if task == "imputation" else logit


def _field_table(fields, n_rows: int, name: str) -> Optional[Tensor]:
    """Categorical feature fields as an int64 (n_rows, F) table of codes >= 0, or None."""
    if fields is None:
        return None
    table = torch.as_tensor(np.asarray(fields) if not isinstance(fields, Tensor) else fields)
    if table.dim() == 1:
        table = table[:, None]
    if table.dim() != 2 or table.shape[0] != n_rows or table.shape[1] == 0:
        raise ValueError(f"`{name}` must be a (n_rows, F) table of category codes, one row per id ({n_rows} rows); "
                         f"got shape {tuple(table.shape)}")
    if table.is_floating_point() and not bool((table == table.round()).all()):
        raise ValueError(f"`{name}` holds category codes: integers >= 0")
    table = table.to(torch.int64)
    if bool((table < 0).any()):
        raise ValueError(f"`{name}` holds category codes: integers >= 0; got a negative code")
    return table


class _FieldEmbeddings(nn.Module):
    """One embedding table per categorical field of a side (user or item), indexed through the id."""

    def __init__(self, table: Optional[Tensor], dim: int) -> None:
        super().__init__()
        self.register_buffer("codes", table)
        cards = [] if table is None else [int(c) + 1 for c in table.max(dim=0).values]
        self.tables = nn.ModuleList(nn.Embedding(c, dim) for c in cards)
        for t in self.tables:
            nn.init.normal_(t.weight, std=0.1)

    def forward(self, ids: Tensor) -> list[Tensor]:
        if self.codes is None:
            return []
        codes = self.codes[ids]
        return [table(codes[:, f]) for f, table in enumerate(self.tables)]


class MMoE(nn.Module):
    """Shared embeddings and a multi-gate mixture of experts (Ma et al., KDD 2018) with one tower per
    task: the backbone of the ESCM2 experiments (ESCM2 paper Section V-A; BADR Section 3.7).

    The input of a pair is ``x = [E_u ; F_i ; G_1[c_1(u)] ; ... ; H_1[d_1(i)] ; ...]``: the user and
    item id embeddings and one embedding per categorical feature field (``user_fields``: an
    (n_users, F_u) table of category codes, ``item_fields`` (n_items, F_i); cardinalities are the
    largest code + 1), all of size ``dim`` and shared by every task.  ``n_experts`` MLP experts
    (ReLU hidden layers ``expert_hidden``, output ``expert_dim``) read ``x``; task ``t`` mixes them
    with its gate ``softmax(W_t x)`` and its tower (hidden layers ``tower_hidden``) maps the mixture
    to one logit.  ``tasks`` are towers of :data:`ENTIRE_SPACE_TOWERS` (an entry's ``towers`` in
    :data:`estimators.registry.ENTIRE_SPACE`); ``forward(users, items)`` returns a dict by task:
    logits, except the imputed CVR error ``softplus(.)`` of the imputation tower.  The dict is what
    :class:`estimators.registry.EntireSpaceSpec` and
    :class:`estimators.training.losses.EntireSpaceLoss` take.
    """

    def __init__(self, n_users: int, n_items: int, tasks: Sequence[str] = ("ctr", "cvr"), dim: int = 16,
                 n_experts: int = 4, expert_hidden: Sequence[int] = (64,), expert_dim: int = 32,
                 tower_hidden: Sequence[int] = (32,), user_fields=None, item_fields=None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        widths = (*expert_hidden, *tower_hidden)
        if min(n_users, n_items, dim, n_experts, expert_dim) < 1 or any(w < 1 for w in widths):
            raise ValueError(f"n_users, n_items, dim, n_experts, expert_dim and the hidden widths must be positive; "
                             f"got {n_users}, {n_items}, {dim}, {n_experts}, {expert_dim}, {widths}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must lie in [0, 1); got {dropout}")
        self.tasks = _check_towers(tasks)
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)
        self.user_fields = _FieldEmbeddings(_field_table(user_fields, n_users, "user_fields"), dim)
        self.item_fields = _FieldEmbeddings(_field_table(item_fields, n_items, "item_fields"), dim)
        in_dim = dim * (2 + len(self.user_fields.tables) + len(self.item_fields.tables))
        self.experts = nn.ModuleList(nn.Sequential(_tower(in_dim, expert_hidden, expert_dim, dropout), nn.ReLU())
                                     for _ in range(n_experts))
        self.gates = nn.ModuleDict({t: nn.Linear(in_dim, n_experts) for t in self.tasks})
        self.towers = nn.ModuleDict({t: _tower(expert_dim, tower_hidden, 1, dropout) for t in self.tasks})

    def embed(self, users: Tensor, items: Tensor) -> Tensor:
        """The shared input ``x`` of the pairs, shape (B, dim * (2 + F_u + F_i))."""
        parts = [self.user(users), self.item(items), *self.user_fields(users), *self.item_fields(items)]
        return torch.cat(parts, dim=-1)

    def forward(self, users: Tensor, items: Tensor) -> dict[str, Tensor]:
        x = self.embed(users, items)
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # (B, n_experts, expert_dim)
        out = {}
        for t in self.tasks:
            gate = torch.softmax(self.gates[t](x), dim=-1)
            mixed = (gate.unsqueeze(-1) * experts).sum(dim=1)
            out[t] = _tower_output(t, self.towers[t](mixed).squeeze(-1))
        return out


class EntireSpaceMF(nn.Module):
    """The MF backbone of the multi-task rows of the BADR paper's Table 3 (footnote 6: only the
    debiasing components are kept): one :class:`MF` per task, sharing nothing but the data.

    CTR, CVR (and imputation / conversion) are separate dot products ``<U^t_u, V^t_i>``; the
    imputation task's output is the imputed CVR error ``softplus(<U_u, V_i>)``.  ``forward(users,
    items)`` returns a dict by task like :class:`MMoE`; ``self.models[t]`` is task ``t``'s MF.
    """

    def __init__(self, n_users: int, n_items: int, dim: int, tasks: Sequence[str] = ("ctr", "cvr")) -> None:
        super().__init__()
        self.tasks = _check_towers(tasks)
        self.models = nn.ModuleDict({t: MF(n_users, n_items, dim) for t in self.tasks})

    def forward(self, users: Tensor, items: Tensor) -> dict[str, Tensor]:
        return {t: _tower_output(t, self.models[t](users, items)) for t in self.tasks}
