"""``python -m benchmarks.joint_at_scale --log DIR``: the Table 3 joint learner on a click log whose
users x items matrix is too large to enumerate.

Reads the ``train`` split of a ``python -m simulate ctcvr`` folder chunk by chunk from its memory
maps and keeps only its clicked exposures, each distinct (user, item) pair once with its first
conversion label (the MNAR matrix setting of Table 3: ``o = 1`` for a clicked pair).  Then, with no
``(n_users, n_items)`` table anywhere:

1. the propensity model (:class:`~estimators.training.models.PropensityModel`) is fitted on the
   clicked pairs and ``--negatives`` uniformly drawn pairs per click
   (:func:`~estimators.training.propensity.fit_propensity_sampled`);
2. a :class:`~estimators.training.joint.JointLearner` reads its clipped propensities pair by pair
   (:class:`~estimators.training.propensity.ModelPropensities`) and trains MF with ``--method``'s
   estimator and imputation loss over one epoch of the clicked pairs.

Prints, measured in this one run: the pairs, the bytes a dense float32 propensity table would
take, the seconds and pairs per second of each stage, and the process's peak resident memory;
``--json FILE`` writes them too (atomically).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

CHUNK = 1 << 22  # exposures read per chunk of the memory maps


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def clicked_pairs(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int, int]:
    """``(users, items, conversions, n_users, n_items, n_exposures)`` of the distinct clicked pairs of
    the train split, read chunk by chunk (memory: the clicks, not the exposures)."""
    from simulate import ctcvr

    log = ctcvr.load_ctcvr(folder, split="train")
    keys, conv = [], []
    n_users, n_items = len(log.user_fields), len(log.item_fields)
    for start in range(0, len(log), CHUNK):
        rows = slice(start, min(start + CHUNK, len(log)))
        hit = np.flatnonzero(np.asarray(log.click[rows]) == 1)
        keys.append(np.asarray(log.user[rows])[hit].astype(np.int64) * n_items + np.asarray(log.item[rows])[hit])
        conv.append(np.asarray(log.conversion[rows])[hit].astype(np.float32))
    key, first = np.unique(np.concatenate(keys), return_index=True)
    return key // n_items, key % n_items, np.concatenate(conv)[first], n_users, n_items, len(log)


def run(folder: Path, method: str, negatives: int, prop_epochs: int, batch_size: int, dim: int, seed: int,
        max_steps: Optional[int]) -> dict[str, Any]:
    from estimators.training import JointConfig, JointLearner, ModelPropensities, PropensityModel, fit_propensity_sampled
    from reproduce.methods import METHODS

    m = METHODS[method]
    t0 = time.perf_counter()
    users, items, r, n_users, n_items, n_exposures = clicked_pairs(folder)
    read_s = time.perf_counter() - t0
    u, i, r = torch.from_numpy(users), torch.from_numpy(items), torch.from_numpy(r)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    prop = PropensityModel(n_users, n_items, 16)
    t0 = time.perf_counter()
    epochs = fit_propensity_sampled(prop, u, i, n_users, n_items, negatives=negatives, lr=0.01, weight_decay=0.0,
                                    batch_size=min(65536, u.numel() * (1 + negatives)), max_epochs=prop_epochs, loss="bce", generator=gen)
    prop_s = time.perf_counter() - t0
    cfg = JointConfig(estimator=m.estimator, imputation_loss=m.imputation_loss, dim=dim, G=1, lr=0.002,
                      imp_lr=0.02, sampling="uniform")
    learner = JointLearner(ModelPropensities(prop, n_users, n_items, 0.05), cfg, generator=gen)
    order = torch.randperm(u.numel(), generator=gen)
    steps, rows, t0 = 0, 0, time.perf_counter()
    for start in range(0, order.numel() - batch_size + 1, batch_size):
        b = order[start:start + batch_size]
        learner.step(u[b], i[b], r[b], validate=steps == 0)
        steps, rows = steps + 1, rows + b.numel()
        if max_steps is not None and steps >= max_steps:
            break
    joint_s = time.perf_counter() - t0
    return {"method": method, "exposures": n_exposures, "clicked_pairs": int(u.numel()),
            "conversion_rate": float(r.mean()), "n_users": n_users, "n_items": n_items,
            "all_pairs": n_users * n_items, "dense_table_gb": n_users * n_items * 4 / 1e9,
            "read_seconds": read_s, "propensity_epochs": epochs, "propensity_seconds": prop_s,
            "propensity_pairs_per_second": epochs * u.numel() * (1 + negatives) / prop_s,
            "joint_steps": steps, "joint_seconds": joint_s, "joint_pairs_per_second": rows / joint_s,
            "peak_rss_mb": _rss_mb()}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.joint_at_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", required=True, type=Path, help="a folder written by python -m simulate ctcvr")
    parser.add_argument("--method", default="badr", help="a Table 3 method on a frozen propensity (default badr)")
    parser.add_argument("--negatives", type=int, default=4, help="drawn pairs per click in the propensity fit")
    parser.add_argument("--prop-epochs", type=int, default=1, help="epochs of the propensity fit (default 1)")
    parser.add_argument("--batch-size", type=int, default=4096, help="clicked pairs per joint step (default 4096)")
    parser.add_argument("--dim", type=int, default=64, help="MF embedding size (default 64)")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--max-steps", type=int, default=None, help="stop the joint epoch after this many steps")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the record to this file")
    args = parser.parse_args(argv)
    if not (args.log / "summary.json").is_file():
        parser.error(f"--log {args.log}: not a folder of python -m simulate ctcvr (no summary.json)")
    from reproduce.methods import METHODS
    m = METHODS.get(args.method)
    if m is None or not (m.uses_propensity and m.propensity_adjustment is None and not m.cycle and not m.calibration
                         and m.propensity_objective is None):
        parser.error(f"--method {args.method!r}: expected a method of the plain joint learner on a frozen propensity "
                     "(e.g. ips, snips, dr_jl, mrdr, badr)")
    for name in ("negatives", "prop_epochs", "batch_size", "dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer; got {getattr(args, name)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rec = run(args.log, args.method, args.negatives, args.prop_epochs, args.batch_size, args.dim, args.seed,
              args.max_steps)
    print(f"{rec['exposures']:,} train exposures -> {rec['clicked_pairs']:,} distinct clicked pairs of "
          f"{rec['n_users']:,} x {rec['n_items']:,} = {rec['all_pairs']:,} pairs "
          f"(a dense float32 propensity table: {rec['dense_table_gb']:.1f} GB; none is built)")
    print(f"read clicks     {rec['read_seconds']:8.1f} s")
    print(f"propensity fit  {rec['propensity_seconds']:8.1f} s  {rec['propensity_epochs']} epoch(s), "
          f"{rec['propensity_pairs_per_second']:,.0f} pairs/s")
    print(f"joint epoch     {rec['joint_seconds']:8.1f} s  {rec['joint_steps']} steps of {args.method}, "
          f"{rec['joint_pairs_per_second']:,.0f} clicked pairs/s")
    print(f"peak RSS        {rec['peak_rss_mb']:8.0f} MB")
    if args.json:  # atomically: a killed run leaves the old file or the new one, never half of one
        from reproduce.files import replace
        replace(args.json, json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
