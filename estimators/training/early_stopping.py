"""The published early-stopping rule, shared by the propensity fit and the joint-learning fit."""
from __future__ import annotations

from typing import Optional


class EarlyStopping:
    """Stop once ``patience`` epochs (not necessarily consecutive: the count is never reset) have
    had a relative decrease of the summed epoch loss, ``(last - cur) / (last + 1e-12)``, below
    ``tol``: the rule of the published BADR code for both of its stages."""

    def __init__(self, tol: float = 1e-4, patience: int = 7) -> None:
        if patience < 1:
            raise ValueError(f"`patience` must be a positive integer; got {patience}")
        self.tol, self.patience = tol, patience
        self.last: Optional[float] = None
        self.stalls = 0

    def should_stop(self, loss: float) -> bool:
        """Record this epoch's summed loss; True once the rule says stop."""
        if self.last is not None and (self.last - loss) / (self.last + 1e-12) < self.tol:
            self.stalls += 1
        self.last = loss
        return self.stalls >= self.patience
