"""The one door to the compiled extension ``estimators._C`` (``csrc/``).

No other module touches ``torch.ops.cvr``: this one loads the extension, makes the one backend
decision (:func:`backend`), says which calls the kernels can take (:func:`loss_kernels`,
:func:`table_kernels`) and holds the operators' handles, ``None`` where the extension is not
built.  The operators (schemas in ``csrc/*.cpp``):

- ``prediction_loss`` / ``imputation_loss``: the joint-learning losses of
  :mod:`estimators.joint_loss` as differentiable operators (C++ autograd kernels);
  ``prediction_loss_and_grads`` / ``imputation_loss_and_grads``: the same loss with its gradients
  with respect to the logits, from one call.  They implement the registry entries named in
  :data:`PREDICTION_KERNELS` and :data:`IMPUTATION_KERNELS` (``csrc/kernel_names.h``); every
  other entry runs on its pure-PyTorch reference.
- ``gather_dot`` / ``gather_dot_backward``: the MF logits ``<P[rows], Q[cols]>`` and their
  deterministic scatter gradient (:mod:`estimators.training.gather`).
- ``adam_``: torch's fused Adam update, bitwise, without a parallel region for small tensors
  (:class:`estimators.training.optim.Adam`).
- ``propensity_step_`` and ``randperm_``: one Adam step of the additive propensity model and a
  cache-friendly uniform permutation (:func:`estimators.training.propensity.fit_propensity`).

The backend follows the environment variable ``CVR_BACKEND``: ``"fused"`` (an error if the
extension is not built), ``"reference"``, or unset (fused when built).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

try:
    from . import _C
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR: Optional[ImportError] = exc
else:
    _IMPORT_ERROR = None

BACKENDS = ("fused", "reference")
_DTYPES = (torch.float32, torch.float64)


def _op(name: str):
    """The default overload of ``torch.ops.cvr.<name>``, or None.  Calling the overload itself
    skips the packet's Python-level overload resolution, a few microseconds per call that a
    small batch would notice."""
    if _C is None or not hasattr(torch.ops.cvr, name):
        return None
    return getattr(torch.ops.cvr, name).default


prediction_loss = _op("prediction_loss")
imputation_loss = _op("imputation_loss")
prediction_loss_and_grads = _op("prediction_loss_and_grads")
imputation_loss_and_grads = _op("imputation_loss_and_grads")
gather_dot = _op("gather_dot")
gather_dot_backward = _op("gather_dot_backward")
adam_ = _op("adam_")
propensity_step_ = _op("propensity_step_")
_randperm_ = _op("randperm_")

#: Registry names (:mod:`estimators.registry`) the fused loss kernels implement; empty when the
#: extension is not built.
PREDICTION_KERNELS: frozenset[str] = frozenset(getattr(_C, "prediction_kernels", ()))
IMPUTATION_KERNELS: frozenset[str] = frozenset(getattr(_C, "imputation_kernels", ()))


def built() -> bool:
    """Whether the extension is importable."""
    return _C is not None


def with_cuda() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return _C is not None and bool(_C.with_cuda)


def backend() -> str:
    """``"fused"`` when the compiled operators are used, else ``"reference"``.

    Follows ``CVR_BACKEND`` (``"fused"``, ``"reference"`` or unset for "fused when built").
    """
    choice = os.environ.get("CVR_BACKEND", "")
    if choice == "reference" or (choice == "" and _C is None):
        return "reference"
    if choice not in ("", "fused"):
        raise ValueError(f"CVR_BACKEND must be one of {BACKENDS} or unset; got {choice!r}")
    if _C is None:
        raise RuntimeError(
            "CVR_BACKEND=fused but the extension estimators._C is not built "
            f"({_IMPORT_ERROR}); build it with `pip install --no-build-isolation -e .` "
            "(needs a C++ compiler), or unset CVR_BACKEND to use the pure-PyTorch reference")
    return "fused"


def _device_built(device: torch.device) -> bool:
    return device.type == "cpu" or (device.type == "cuda" and with_cuda())


def supports(*tensors: Optional[Tensor]) -> bool:
    """Whether the compiled loss kernels take these logits: one float32/float64 dtype and one
    device the extension was built for (CPU; CUDA when compiled with it)."""
    present = [t for t in tensors if t is not None]
    first = present[0]
    if first.dtype not in _DTYPES or not _device_built(first.device):
        return False
    return all(t.dtype == first.dtype and t.device == first.device for t in present)


def loss_kernels(kind: str, name: str, *logits: Optional[Tensor]) -> bool:
    """Whether the joint-learning loss ``name`` (``kind`` "prediction" or "imputation") runs on the
    fused kernels for these logits: the backend is "fused", the kernels implement ``name`` and
    :func:`supports` holds."""
    names = PREDICTION_KERNELS if kind == "prediction" else IMPUTATION_KERNELS
    return name in names and backend() == "fused" and supports(*logits)


def table_kernels(op, device: torch.device) -> bool:
    """Whether the table operator ``op`` (one of this module's handles: :data:`gather_dot`,
    :data:`adam_`, :data:`propensity_step_`) runs for tensors on ``device``."""
    if op is None or backend() != "fused":
        return False
    if op is adam_ or op is propensity_step_:  # CPU kernels only
        return device.type == "cpu"
    return _device_built(device)


def randperm(n: int, generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None) -> Tensor:
    """A uniformly random permutation of ``0..n-1`` (int64) on ``device`` (the generator's by default).

    On the CPU with the "fused" backend it is ``cvr::randperm_``, seeded by one draw from
    ``generator``: each element goes to a cache-sized bucket drawn uniformly, then every bucket
    is shuffled (a permutation of Yahoo! R3's 15.4M pairs in a fraction of ``torch.randperm``'s
    time, whose Fisher-Yates pass misses the cache at every element).  Elsewhere it is
    ``torch.randperm``.  Both are deterministic by seed; they are different draws, so a run's
    permutations depend on the backend.
    """
    if n < 0:
        raise ValueError(f"`n` must be non-negative; got {n}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type != "cpu" or _randperm_ is None or backend() != "fused":
        return torch.randperm(n, generator=generator, device=device)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    out = torch.empty(n, dtype=torch.int64)
    _randperm_(out, seed)
    return out
