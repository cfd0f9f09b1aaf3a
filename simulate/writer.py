"""Write a :class:`~simulate.protocol.Simulation` in the split format ``reproduce`` reads.

``x_{train,val,test}_3_{V}.txt`` hold one ``user item`` pair per line (0-based),
``y_..._3_{V}.txt`` one 0/1 label per line, as in the BADR authors' processed splits;
``meta.json`` describes the matrix; ``labels.npy``, ``propensities.npy``, ``clicks.npy``
and ``ratings.npy`` are the full ground truth; ``summary.json`` the statistics.  Every
file is written to a temporary name in ``out_dir`` and moved into place with ``os.replace``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, IO

import numpy as np

from simulate.protocol import THRESHOLD, Simulation


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _text(lines: str) -> Callable[[IO[bytes]], None]:
    return lambda handle: handle.write(lines.encode("ascii"))


def _json(obj: dict) -> Callable[[IO[bytes]], None]:
    return _text(json.dumps(obj, indent=2) + "\n")


def _npy(array: np.ndarray) -> Callable[[IO[bytes]], None]:
    return lambda handle: np.save(handle, array, allow_pickle=False)


def write(sim: Simulation, out_dir: str | os.PathLike) -> Path:
    """Write ``sim`` to ``out_dir`` (created if needed) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"{THRESHOLD}_{sim.val_pct}"
    for name, (x, y) in sim.splits.items():
        _atomic_write(out / f"x_{name}_{suffix}.txt", _text(("%d %d\n" * len(x)) % tuple(x.ravel().tolist())))
        _atomic_write(out / f"y_{name}_{suffix}.txt", _text(("%d\n" * len(y)) % tuple(y.tolist())))
    meta = {key: sim.summary[key] for key in ("n_users", "n_items", "threshold", "val_pct", "source",
                                              "seed", "truth_seed", "alpha", "k")}
    _atomic_write(out / "meta.json", _json(meta))
    _atomic_write(out / "labels.npy", _npy(sim.labels))
    _atomic_write(out / "propensities.npy", _npy(sim.propensities))
    _atomic_write(out / "clicks.npy", _npy(sim.clicks))
    _atomic_write(out / "ratings.npy", _npy(sim.ratings))
    _atomic_write(out / "summary.json", _json(sim.summary))
    return out
