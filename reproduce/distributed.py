"""``python -m reproduce`` under ``torchrun``: one training run spread over the launched processes.

``torchrun --nproc-per-node N -m reproduce table3 ...`` starts N processes with the launcher's
environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...).  :func:`launch` joins them in one
process group (gloo on CPU, NCCL with ``--device cuda``, one GPU per local rank) before any run;
then every process plans the same runs and trains each of them together: the joint learner
(:class:`estimators.training.JointLearner`) wraps its models in ``DistributedDataParallel``, each
rank trains its shard of every clicked batch, and the losses take their normalisers over the
global batch (:mod:`estimators.distributed`).  Runs are trained one at a time (``--jobs 1``);
only rank 0 writes ``results.csv``, ``history.csv`` and the tables, one row per run with its
``world_size``, which is also part of the run's signature (a run on W ranks draws other pairs U
than one process and is another row).  Without the launcher's environment, or with one process,
nothing here does anything.
"""
from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist


def launched_world_size() -> int:
    """The world size the launcher set (``WORLD_SIZE``), 1 without a launcher."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer (torchrun sets it); got "
                         f"{os.environ['WORLD_SIZE']!r}") from None


def launch(device: str = "cpu") -> bool:
    """Join the process group of a ``torchrun`` launch (gloo on CPU, NCCL for ``cuda``, the GPU
    of ``LOCAL_RANK``); return whether this call joined one (False without a launcher, with one
    process, or when the caller has initialised ``torch.distributed`` itself)."""
    if launched_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed; run without torchrun")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def world_size() -> int:
    """The ranks training each run (1 in one process)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_writer() -> bool:
    """Whether this process writes the results: rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def finish() -> None:
    """Leave the process group (when :func:`launch` joined one).  The runs' DDP wrappers, which a
    learner may hold in reference cycles, are collected first: destroyed after their process group,
    at interpreter exit, their reducer can abort the process ("terminate called without an active
    exception") after every row is written."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def check_ranks_agree(what: str, *tensors: torch.Tensor) -> None:
    """Under ``torchrun``: raise ``RuntimeError`` unless every rank holds the same ``tensors`` (their
    float64 sums and sums of squares, all-gathered), e.g. a run's models after training, which DDP
    and the ranks' identical replicated steps must keep alike.  One process: nothing."""
    if world_size() <= 1:
        return
    mine = torch.tensor([v for t in tensors for v in (float(t.double().sum()), float(t.double().square().sum()))],
                        dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(every, mine)
    if not all(torch.equal(every[0], other) for other in every[1:]):
        raise RuntimeError(f"the ranks' {what} differ after training: a step ran outside the data-parallel path")
