"""Embedding tables sharded across ranks with TorchRec (optional: ``requirements-torchrec.txt``).

An MF model's only parameters are its user and item tables; at industrial scale (10^8 users or
items) they outgrow one device while the batch computation stays tiny.  :class:`ShardedMF` is
:class:`~estimators.training.models.MF` (``logit(u, i) = <U_u, V_i>``; with ``tasks``, one such
pair of tables per task of an entire-space objective, as
:class:`~estimators.training.models.EntireSpaceMF`) whose tables are one TorchRec
``EmbeddingBagCollection``: each id is a bag of length one, so a bag's pooled embedding is the
table's row.  Unsharded it is an ordinary module; :func:`shard` hands it to TorchRec's
``DistributedModelParallel``, which places the tables on the ranks by a sharding plan and looks
rows up with all-to-all collectives.  No communication code of our own.

What a user of the estimators must know:

- **Gradient semantics.**  TorchRec divides the gradients that reach a sharded table by the world
  size (``torchrec.distributed.comm_ops`` gradient division, on by default), as DDP averages
  dense gradients.  So the convention of the toolkit's data-parallel training holds for the
  tables too: each rank's loss is its share of the global-batch loss times the world size, and
  the update equals one process's on the concatenated batch (``tests/test_sharded.py`` checks
  this to float32 rounding for a step of SGD and of row-wise Adagrad).
- **Optimisers are fused into the backward pass** (fbgemm's table-batched kernels): the rows a
  batch touched are updated during ``backward()``; there is no ``optimizer.step()`` for the tables.
  fbgemm's CPU kernels offer SGD and the Adagrad family only (``"sgd"``, ``"adagrad"``,
  ``"rowwise_adagrad"``); ``"adam"`` needs a GPU.  fbgemm's Adam is sparse: rows a batch did not
  touch keep their moments and are not moved, where dense ``torch.optim.Adam`` keeps moving
  them by their momentum, so a sharded Adam run is not the dense MF's run step for step.
- **Initialisation** is N(0, 1) as :class:`MF`'s, drawn per block of
  :data:`INIT_BLOCK_ROWS` rows from a generator seeded by ``(seed, table, block)``: every shard
  fills its own rows without materialising the table, and the values do not depend on the plan
  or the world size (:meth:`ShardedMF.reference_tables` gives the whole tables, for tests).
- On CPU, TorchRec's planner offers the ``table_wise``, ``column_wise``, ``table_column_wise``
  and ``data_parallel`` shardings; ``row_wise`` (a table split by rows over the ranks) needs
  GPUs.
"""
from __future__ import annotations

import importlib.util
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

#: Rows per initialisation block (see the module docstring).
INIT_BLOCK_ROWS = 4096
#: The fused optimisers :func:`shard` accepts, by name, with the ``torch.optim`` class TorchRec maps
#: onto fbgemm's kernel.  ``rowwise_adagrad`` keeps one accumulator per row.
OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")
SHARDINGS = ("table_wise", "column_wise", "table_column_wise", "row_wise", "data_parallel")


def torchrec_available() -> bool:
    """Whether TorchRec and fbgemm are installed (``pip install --no-deps -r requirements-torchrec.txt``)."""
    return importlib.util.find_spec("torchrec") is not None and importlib.util.find_spec("fbgemm_gpu") is not None


def _require_torchrec() -> None:
    if not torchrec_available():
        raise ImportError("sharded embeddings need TorchRec and fbgemm: install the versions matched to torch 2.13 "
                          "with `pip install --no-deps -r requirements-torchrec.txt` (--no-deps keeps pip from "
                          "replacing torch)")


def _fill_rows(out: Tensor, row_offset: int, col_offset: int, seed: int, table: int) -> None:
    """Fill ``out`` with rows ``row_offset ...`` and columns ``col_offset ...`` of table ``table``'s
    N(0, 1) initialisation, drawn block by block (:data:`INIT_BLOCK_ROWS` rows each)."""
    if out.numel() == 0:  # a rank that holds none of the table
        return
    n_rows, n_cols = out.shape
    first, last = row_offset // INIT_BLOCK_ROWS, (row_offset + n_rows - 1) // INIT_BLOCK_ROWS
    with torch.no_grad():
        for block in range(first, last + 1):
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, table, block]).generate_state(1)[0]))
            start = block * INIT_BLOCK_ROWS
            lo, hi = max(start, row_offset), min(start + INIT_BLOCK_ROWS, row_offset + n_rows)
            # The block's rows are drawn whole at the table's full width, so a shard sees the same
            # values as the unsharded table whatever its column range.
            rows = torch.randn(hi - start, col_offset + n_cols, generator=g, dtype=torch.float32)
            out[lo - row_offset:hi - row_offset] = rows[lo - start:, col_offset:].to(out.dtype)


class ShardedMF(nn.Module):
    """Matrix factorisation on TorchRec tables: ``logit(u, i) = <U_u, V_i>`` (:class:`MF`'s).

    ``tasks=None`` gives one user and one item table and ``forward`` returns the logits; a
    sequence of task names gives a pair of tables per task and ``forward`` returns a dict of
    logits by task (the MF backbone of the entire-space rows; the caller applies the objective's
    output transforms, such as the imputation task's softplus).  ``dim`` is the embedding width;
    ``seed`` fixes the initialisation (module docstring).  ``device="meta"`` builds the tables
    without storage, for :func:`shard` to place them.
    """

    def __init__(self, n_users: int, n_items: int, dim: int, tasks: Optional[Sequence[str]] = None, *,
                 seed: int = 0, device: str | torch.device = "cpu") -> None:
        super().__init__()
        _require_torchrec()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

        for name, value in (("n_users", n_users), ("n_items", n_items), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}")
        if tasks is not None:
            tasks = tuple(tasks)
            if not tasks or len(set(tasks)) != len(tasks) or not all(isinstance(t, str) and t for t in tasks):
                raise ValueError(f"`tasks` must be distinct non-empty names, such as ('ctr', 'cvr'); got {tasks!r}")
        self.n_users, self.n_items, self.dim, self.tasks, self.seed = n_users, n_items, dim, tasks, int(seed)
        configs = []
        for k, (side, rows) in enumerate((s, r) for _ in (tasks or ("",)) for s, r in
                                         (("user", n_users), ("item", n_items))):
            task = (tasks or ("",))[k // 2]
            name = f"{task}_{side}" if task else side
            configs.append(EmbeddingBagConfig(
                name=name, embedding_dim=dim, num_embeddings=rows, feature_names=[name],
                pooling=PoolingType.SUM, init_fn=self._init_fn(k)))
        self.feature_names = [c.feature_names[0] for c in configs]
        self.tables = EmbeddingBagCollection(tables=configs, device=torch.device(device))

    def _init_fn(self, table: int):
        seed = self.seed

        def init(weight: Tensor) -> None:
            # TorchRec calls this on every local shard; a shard knows no offsets here, so a sharded
            # table is refilled by `shard` from the shards' metadata.  Unsharded: the whole table.
            _fill_rows(weight.data, 0, 0, seed, table)
        return init

    def reference_tables(self) -> list[Tensor]:
        """The whole initial tables in :attr:`feature_names` order (user, item per task), float32."""
        rows = [r for _ in (self.tasks or ("",)) for r in (self.n_users, self.n_items)]
        out = []
        for k, n in enumerate(rows):
            t = torch.empty(n, self.dim)
            _fill_rows(t, 0, 0, self.seed, k)
            out.append(t)
        return out

    def forward(self, users: Tensor, items: Tensor) -> Tensor | dict[str, Tensor]:
        from torchrec import KeyedJaggedTensor

        if users.shape != items.shape or users.dim() != 1:
            raise ValueError(f"`users` and `items` must be 1-D id tensors of one length; got shapes "
                             f"{tuple(users.shape)} and {tuple(items.shape)}")
        n_tasks = len(self.tasks or ("",))
        ids = torch.cat([torch.cat([users, items]) for _ in range(n_tasks)]).to(torch.int64)
        lengths = torch.ones(ids.numel(), dtype=torch.int32, device=ids.device)
        pooled = self.tables(KeyedJaggedTensor.from_lengths_sync(keys=self.feature_names, values=ids,
                                                                 lengths=lengths)).to_dict()
        logits = [(pooled[self.feature_names[2 * k]] * pooled[self.feature_names[2 * k + 1]]).sum(-1)
                  for k in range(n_tasks)]
        return logits[0] if self.tasks is None else dict(zip(self.tasks, logits))


def shard(model: ShardedMF, *, optimizer: str = "sgd", lr: float = 0.01, weight_decay: float = 0.0,
          sharding: str = "table_wise", device: str | torch.device = "cpu",
          process_group: Optional["torch.distributed.ProcessGroup"] = None) -> nn.Module:
    """``model`` in TorchRec's ``DistributedModelParallel`` over the initialised process group.

    ``optimizer`` (one of :data:`OPTIMIZERS`) with ``lr`` and ``weight_decay`` is fused into the
    tables' backward pass (``torchrec.optim.apply_optimizer_in_backward``); ``sharding`` (one of
    :data:`SHARDINGS`) constrains every table's placement.  Build ``model`` with
    ``device="meta"`` so that no rank allocates a whole table; each shard is then filled with the
    rows of the seeded initialisation it holds.  Every rank calls this collectively (the plan is
    made on rank 0 and broadcast).
    """
    _require_torchrec()
    import torch.distributed as dist
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.optim import apply_optimizer_in_backward

    if not isinstance(model, ShardedMF):
        raise ValueError(f"`model` must be a ShardedMF; got {type(model).__name__}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}; got {optimizer!r}")
    if sharding not in SHARDINGS:
        raise ValueError(f"`sharding` must be one of {SHARDINGS}; got {sharding!r}")
    if not (isinstance(lr, (int, float)) and lr > 0) or not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"`lr` must be > 0 and `weight_decay` >= 0; got {lr!r} and {weight_decay!r}")
    if not dist.is_initialized():
        raise ValueError("shard() needs an initialised process group: launch with torchrun and call "
                         "torch.distributed.init_process_group first")
    group = process_group or dist.group.WORLD
    device = torch.device(device)
    cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam}.get(optimizer)
    kwargs = {"lr": float(lr), "weight_decay": float(weight_decay)}
    if optimizer == "rowwise_adagrad":
        from torchrec.optim import RowWiseAdagrad
        cls = RowWiseAdagrad
    apply_optimizer_in_backward(cls, model.tables.parameters(), kwargs)
    topology = Topology(world_size=dist.get_world_size(group), compute_device=device.type)
    constraints = {name: ParameterConstraints(sharding_types=[sharding]) for name in model.feature_names}
    sharders = [EmbeddingBagCollectionSharder()]
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(
        model, sharders, group)
    sharded = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    _refill_shards(sharded, model)
    return sharded


def _refill_shards(sharded: nn.Module, model: ShardedMF) -> None:
    """Write into every local shard the rows and columns of the seeded initialisation it holds
    (TorchRec's ``init_fn`` sees a shard without its offsets)."""
    index = {name: k for k, name in enumerate(model.feature_names)}
    for key, value in sharded.state_dict().items():
        if not key.endswith(".weight") or not hasattr(value, "local_shards"):
            continue
        table = index[key.rsplit(".", 2)[-2]]
        for s in value.local_shards():
            row, col = s.metadata.shard_offsets
            _fill_rows(s.tensor, row, col, model.seed, table)
