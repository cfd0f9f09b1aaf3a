"""How a loss sums over its batch when the batch is split across processes (data parallel).

Under ``torch.distributed`` (``torchrun``; gloo on CPU, NCCL on GPU) with
``DistributedDataParallel``, each of the W ranks holds a shard B_r of the global batch
B = B_1 u ... u B_W (and a shard U_r of the sampled pairs U), computes a loss on it, and DDP
AVERAGES the ranks' parameter gradients.  A loss that divides by a batch quantity computed on
its own shard then silently changes meaning: SNIPS (eq. 37) and BADR (eq. 13) divide by
``sum_B 1 / p_hat``, BADR's imputation loss (eq. 32) by its square and holds ``sum_B``,
``sum_U`` terms inside its square, so a per-rank normaliser is the estimator of a W times
smaller batch (the BADR paper's Figure 3 shows the batch size matters).

A :class:`Reduction` fixes this without a communication layer of our own: every loss in
:mod:`estimators.loss`, :mod:`estimators.imputation` and the step forms of
:mod:`estimators.joint_loss` writes each sum that spans its batch through
:meth:`Reduction.total` and its result through :meth:`Reduction.share`:

- ``"global"`` (the default): :meth:`~Reduction.total` all-reduces (``torch.distributed.all_reduce``,
  SUM) the rank's partial sums, so every normaliser, estimate and regression coefficient is the
  global batch's.  A partial sum that carries no gradient (the normalisers: ``p_hat`` is
  detached) is all-reduced detached; one that carries a gradient (eq. 32's ``sum_B w (e -
  e_hat)`` and ``sum_U e_hat`` inside its square) goes through
  ``torch.distributed.nn.functional.all_reduce``, whose backward all-reduces the gradient, so
  the cross-rank terms of the gradient are exact too.  :meth:`~Reduction.share` multiplies the
  rank's part of the loss (its own pairs' terms over the global normaliser) by W.  Then, for any
  loss ``L = sum_r P_r(Q) / N`` (``Q``, ``N`` global sums), rank r's loss ``W P_r(Q) / N`` has
  gradient ``W dL/dx`` with respect to its own logits ``x``, and DDP's mean over ranks gives
  exactly the global batch's gradient (``tests/test_distributed.py`` checks it for every
  registry entry, float64, rtol 1e-10).  The values are the ranks' shares: their mean over the
  ranks is the global batch's loss (``JointLearner`` reports that mean).
- ``"local"``: each rank's loss is the single-process loss of its shard (its own normaliser),
  as wrapping the losses in DDP gives without this module: DDP then averages the per-shard
  gradients (for the sum-form losses, eqs. 6, 8-10, 1 / W of the global sum's gradient).

Outside ``torch.distributed`` (not initialised, or one rank) a reduction is inactive: ``total``
returns its arguments and ``share`` its argument unchanged, so single-process results are
bitwise those of the code without this module.  The fused kernels (:mod:`estimators._ext`) take
no external normaliser: an active reduction runs the losses on their pure-PyTorch step forms.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

#: The reduction modes: the global batch's normalisers, or each rank's own.
REDUCTIONS = ("global", "local")


@dataclass
class Traffic:
    """Collectives issued by active reductions in this process (for benchmarks): the calls and
    the bytes all-reduced, a differentiable all-reduce counted twice (its backward all-reduces
    the gradient, of the same size)."""

    calls: int = 0
    bytes: int = 0

    def reset(self) -> None:
        self.calls, self.bytes = 0, 0


#: This process's :class:`Traffic` counter.
TRAFFIC = Traffic()


@dataclass(frozen=True, eq=False)
class Reduction:
    """How a loss sums over a batch split across ``world_size`` ranks of ``group`` (module
    docstring); build one with :func:`resolve`.  Active (it communicates) only in ``"global"``
    mode with more than one rank."""

    mode: str = "global"
    group: Any = None
    world_size: int = 1

    @property
    def active(self) -> bool:
        """Whether sums are all-reduced and shares scaled (``"global"``, more than one rank)."""
        return self.mode == "global" and self.world_size > 1

    def total(self, *partials: Union[Tensor, int, float], like: Optional[Tensor] = None):
        """The global sums of the rank's ``partials`` (tensors of any shape, or Python numbers such
        as a batch's size), one all-reduce for all of them; one value for one partial, else a
        tuple.  Inactive: the partials themselves, untouched.  Numbers come back as tensors of the
        dtype and device of ``like`` (default: the first tensor partial); the sums are formed in
        float64."""
        if not self.active:
            return partials[0] if len(partials) == 1 else partials
        first = like if like is not None else next((p for p in partials if isinstance(p, Tensor)), None)
        if first is None:
            raise ValueError("Reduction.total: give `like`, a tensor whose dtype and device the numbers take")
        tensors = [p if isinstance(p, Tensor) else torch.tensor(p, dtype=first.dtype, device=first.device)
                   for p in partials]
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if differentiable:  # its backward all-reduces the gradient: the cross-rank terms
            import torch.distributed.nn.functional as dist_nn
            with warnings.catch_warnings():  # deprecated for a private successor; still the public one
                warnings.simplefilter("ignore", FutureWarning)
                summed = dist_nn.all_reduce(flat, group=self.group)
        else:
            import torch.distributed as dist
            summed = flat.detach().clone()
            dist.all_reduce(summed, group=self.group)
        TRAFFIC.calls += 1 + differentiable
        TRAFFIC.bytes += summed.numel() * summed.element_size() * (1 + differentiable)
        out, start = [], 0
        for t in tensors:
            out.append(summed[start:start + t.numel()].reshape(t.shape).to(t.dtype))
            start += t.numel()
        return out[0] if len(out) == 1 else tuple(out)

    def maximum(self, value: Tensor) -> Tensor:
        """The elementwise maximum of ``value`` over the ranks, detached (a shift that keeps a sum of
        exponentials in range: :func:`logsumexp`).  Inactive: ``value`` detached."""
        value = value.detach()
        if not self.active:
            return value
        import torch.distributed as dist
        out = value.clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        TRAFFIC.calls += 1
        TRAFFIC.bytes += out.numel() * out.element_size()
        return out

    def logsumexp(self, values: Tensor) -> Tensor:
        """``log sum exp(values)`` over the global batch (all ranks' ``values``, 1-D), with its
        gradient; inactive: ``torch.logsumexp(values, 0)``."""
        if not self.active:
            return torch.logsumexp(values, 0)
        shift = self.maximum(torch.logsumexp(values, 0))
        return torch.log(self.total(torch.exp(values - shift).sum())) + shift

    def share(self, value: Tensor) -> Tensor:
        """This rank's share of a global-batch loss whose part on its own pairs is ``value``
        (already over the global normaliser), scaled by the world size so that DDP's mean of
        the ranks' gradients is the global gradient.  Inactive: ``value`` itself."""
        return value * self.world_size if self.active else value

    def mean(self, per_pair: Tensor) -> Tensor:
        """``per_pair.mean()`` over the global batch, as this rank's share (inactive: exactly
        ``per_pair.mean()``)."""
        if not self.active:
            return per_pair.mean()
        return self.share(per_pair.sum() / self.total(per_pair.numel(), like=per_pair))

    def batch_mean(self, per_pair: Tensor) -> Tensor:
        """``per_pair.mean(dim=-1).mean()``: the mean of each batch (a row; its pairs split across
        the ranks), then the mean over the batches, as this rank's share."""
        if not self.active:
            return per_pair.mean(dim=-1).mean()
        return self.share((per_pair.sum(dim=-1) / self.total(per_pair.shape[-1], like=per_pair)).mean())


#: The reductions of a single process (inactive): the default, and the per-rank mode.
SINGLE = Reduction()
LOCAL = Reduction("local")


def resolve(reduction: Union[str, Reduction] = "global", group: Optional[Any] = None,
            name: str = "reduction") -> Reduction:
    """The :class:`Reduction` of mode ``reduction`` (:data:`REDUCTIONS`) over ``group`` (the
    default process group when None), read from ``torch.distributed`` now: inactive when it is
    not initialised or ``group`` has one rank.  A :class:`Reduction` is returned as it is.
    ``name``: the caller's argument, which a bad value's ``ValueError`` names."""
    if isinstance(reduction, Reduction):
        return reduction
    if reduction not in REDUCTIONS:
        raise ValueError(f"`{name}` must be one of {REDUCTIONS} (the global batch's normalisers across ranks, "
                         f"or each rank's own); got {reduction!r}")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return SINGLE if reduction == "global" else LOCAL
    return Reduction(reduction, group, torch.distributed.get_world_size(group))


def rank(group: Optional[Any] = None) -> int:
    """This process's rank in ``group`` (0 outside ``torch.distributed``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(group)
    return 0


def world_size(group: Optional[Any] = None) -> int:
    """The number of ranks of ``group`` (1 outside ``torch.distributed``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(group)
    return 1


# The data-parallel plumbing the learners share (JointLearner and its subclasses,
# PropensityFreeLearner): which part of a global batch a rank trains, its own stream of sampled
# pairs, the DDP wrapper and the step's global statistics.

def shard(idx: Tensor, group: Optional[Any] = None) -> Tensor:
    """This rank's part of a global batch's indices ``idx``: consecutive, of sizes differing by at
    most one (``tensor_split``); the whole batch in one process."""
    world = world_size(group)
    if world == 1:
        return idx
    if idx.numel() < world:
        raise ValueError(f"a batch of {idx.numel()} pairs cannot be shared by {world} ranks; the batch size (the "
                         "global batch) must be at least the world size")
    return idx.tensor_split(world)[rank(group)]


def data_parallel(module: torch.nn.Module, device: torch.device, group: Optional[Any] = None) -> torch.nn.Module:
    """``module`` wrapped in ``DistributedDataParallel`` over ``group`` (which broadcasts rank 0's
    parameters and averages the gradients), on ``device``."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, process_group=group)


def rank_generator(generator: Optional[torch.Generator], device: torch.device,
                   group: Optional[Any] = None) -> torch.Generator:
    """This rank's own generator for the sampled pairs U: seeded by one draw of the shared
    ``generator`` (alike on every rank) plus the rank, so that the ranks draw different pairs."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
    return torch.Generator(device).manual_seed(seed + rank(group))


def global_stats(stats: dict[str, float], device: torch.device, group: Optional[Any] = None) -> dict[str, float]:
    """A step's statistics for the global batch, in one all-reduce: the losses are the mean of the
    ranks' shares (under ``"local"``, of the ranks' own losses), ``"monitor"`` the sum of the ranks'."""
    world = world_size(group)
    if world == 1:
        return stats
    keys = sorted(stats)
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values, group=group)
    TRAFFIC.calls, TRAFFIC.bytes = TRAFFIC.calls + 1, TRAFFIC.bytes + values.numel() * values.element_size()
    return {k: float(v) if k == "monitor" else float(v) / world for k, v in zip(keys, values.tolist())}
