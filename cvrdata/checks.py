"""Argument checks shared by the loaders: each bad value is a ``ValueError`` naming the argument."""
from __future__ import annotations

import math
import numbers


def check_int(value: object, name: str, low: int, high: int | None = None) -> None:
    """Reject anything but an integer (bools included) in ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (
            high is not None and value > high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}; got {value!r}")


def check_fraction(value: object, name: str, *, allow_one: bool = False) -> None:
    """Reject anything but a real number in ``(0, 1)``, or in ``(0, 1]`` with ``allow_one``."""
    # Written so that NaN fails: every comparison with NaN is False.
    inside = isinstance(value, numbers.Real) and not isinstance(value, bool) and (
        0 < value <= 1 if allow_one else 0 < value < 1)
    if not inside:
        interval = "in (0, 1]" if allow_one else "strictly between 0 and 1"
        raise ValueError(f"{name} must be a number {interval}; got {value!r}")


def as_percent(val_fraction: float) -> int:
    """The ``V`` of the split file names for a validation fraction (0.2 -> 20)."""
    pct = round(val_fraction * 100)
    if not math.isclose(val_fraction * 100, pct, abs_tol=1e-9):
        raise ValueError(f"val_fraction={val_fraction} names no split file: the processed splits are "
                         "stored per whole percentage (V in x_train_T_V.txt), e.g. 0.1 -> V=10")
    return pct
