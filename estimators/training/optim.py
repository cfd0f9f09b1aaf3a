"""Adam stepped with explicit gradients, for the matrix-factorisation fast paths of the trainers
(:mod:`estimators.training.joint`, :mod:`estimators.training.propensity`).

Computes what ``torch.optim.Adam(params, lr, weight_decay=..., fused=True)`` computes (betas
0.9 / 0.999, eps 1e-8, L2 weight decay added to the gradient), bitwise, but takes the
gradients as arguments (the trainers compute them by hand, without ``.grad``) and skips
``Optimizer.step``'s bookkeeping (~0.35 ms per call, a fifth of a Coat step).  On CPU it runs
the compiled ``cvr::adam_`` (``csrc/adam.cpp``, through :mod:`estimators._ext`), which, unlike
``torch._fused_adam_``, updates a small tensor without entering a parallel region: on a loaded
2-core machine such a region can wait milliseconds for the busy core.  Elsewhere, or without the extension, it calls
``torch._fused_adam_``, the kernel of ``torch.optim.Adam(fused=True)``.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from .. import _ext


class Adam:
    """Adam over a fixed list of tensors; :meth:`step` takes one gradient per tensor (``None``: not updated)."""

    def __init__(self, params: Iterable[Tensor], lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = [p for p in params]
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = [0] * len(self.params)

    @torch.no_grad()
    def step(self, grads: Sequence[Optional[Tensor]], compiled: Optional[bool] = None) -> None:
        """One update of every tensor whose gradient is given; ``compiled``: whether to use
        ``cvr::adam_`` on CPU tensors (default: :func:`estimators._ext.table_kernels`)."""
        if len(grads) != len(self.params):
            raise ValueError(f"`grads` must hold one gradient (or None) per parameter, {len(self.params)}; "
                             f"got {len(grads)}")
        if compiled is None:
            compiled = _ext.table_kernels(_ext.adam_, torch.device("cpu"))
        compiled = compiled and _ext.adam_ is not None
        for k, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue
            self.steps[k] += 1
            if compiled and p.device.type == "cpu":
                _ext.adam_(p, g, self.exp_avg[k], self.exp_avg_sq[k], self.steps[k], self.lr, self.betas[0],
                      self.betas[1], self.weight_decay, self.eps)
            else:
                step = torch.tensor(float(self.steps[k]), device=p.device)
                torch._fused_adam_([p], [g], [self.exp_avg[k]], [self.exp_avg_sq[k]], [], [step], lr=self.lr,
                                   beta1=self.betas[0], beta2=self.betas[1], weight_decay=self.weight_decay,
                                   eps=self.eps, amsgrad=False, maximize=False)


def fused_adam(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)`` on torch's fused kernel
    (``fused=True``: one pass per tensor) when every parameter is a floating tensor on the CPU or
    a CUDA device, else on its default kernel.  The optimiser of every module-path trainer: the
    default single-tensor Adam makes six passes over each tensor, which on the dense embedding
    tables of an MF (Yahoo! R3's users x 64 per tower) cost seven times the fused pass and most of
    a step.  Both compute Adam; they differ by float rounding.  ``params`` is an iterable of
    tensors or of parameter groups (dicts with ``"params"``), as ``torch.optim.Adam`` takes."""
    # groups' "params" listed once: an iterator read here would reach torch.optim.Adam empty
    params = [{**g, "params": list(g["params"])} if isinstance(g, dict) else g for g in params]
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True if fused else None)
