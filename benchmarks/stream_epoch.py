"""``python -m benchmarks.stream_epoch --log DIR``: one training epoch streamed from a generated click log.

Trains the ESCM2 experiment's model (:class:`~estimators.training.models.MMoE` with the defaults of
:class:`reproduce.escm2.Protocol`) with one entire-space objective over the ``train`` split of a
``python -m simulate ctcvr`` folder, reading it chunk by chunk from its memory maps through
:class:`cvrdata.stream.ChunkedBatches` and ``torch.utils.data.DataLoader``, at each rank count of
``--ranks`` (gloo processes, the model in ``DistributedDataParallel``; each global batch split over
the ranks).  Prints, measured in this one run: seconds, exposures per second (all ranks together)
and each rank's peak resident memory; ``--json FILE`` writes them too.

The losses are batch means, so DDP's gradient averaging over equal local batches gives the
global batch's gradient.  ESCM2-BADR's normaliser is the local batch's here: this benchmark
measures throughput and memory, not estimator equivalence (``tests/test_distributed.py`` does).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def epoch(folder: Path, method: str, batch_size: int, seed: int, max_steps: Optional[int],
          rank: int = 0, world: int = 1) -> dict[str, Any]:
    """One epoch (or ``max_steps`` steps) on this rank; returns its timings and peak memory."""
    from torch.utils.data import DataLoader

    from cvrdata.stream import ChunkedBatches
    from estimators.training.optim import fused_adam
    from reproduce import escm2
    from simulate import ctcvr

    log = ctcvr.load_ctcvr(folder, split="train")
    p, m = escm2.Protocol(batch_size=batch_size), escm2.METHODS[method]
    torch.manual_seed(seed)  # the same initial model on every rank
    model = escm2.MMoE(len(log.user_fields), len(log.item_fields), tasks=m.towers, dim=p.dim, n_experts=p.n_experts,
                       expert_hidden=p.expert_hidden, expert_dim=p.expert_dim, tower_hidden=p.tower_hidden,
                       user_fields=np.array(log.user_fields), item_fields=np.array(log.item_fields))
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimiser = fused_adam(net.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    stream = escm2.batches(log, batch_size, np.random.default_rng([seed, 1]))
    if world > 1:  # the same stream, this rank's part of each global batch
        stream = ChunkedBatches(stream.columns, stream.dtypes, batch_size, np.random.default_rng([seed, 1]),
                                chunk=escm2.CHUNK, rank=rank, world_size=world)
    params = m.defaults()
    rows, steps, start = 0, 0, time.perf_counter()
    for users, items, o, r in DataLoader(stream, batch_size=None):
        loss = m.loss(net(users, items), o, r, params)["loss"]
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        rows, steps = rows + len(users), steps + 1
        if max_steps is not None and steps >= max_steps:
            break
    return {"rank": rank, "world": world, "steps": steps, "rows": rows, "seconds": time.perf_counter() - start,
            "peak_rss_mb": _rss_mb(), "train_rows": len(log)}


def _worker(rank: int, world: int, init: str, out: str, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result = epoch(*args, rank=rank, world=world)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:  # collects the DDP wrapper before its process group (see finish)
        from reproduce.distributed import finish
        finish()


def measure(folder: Path, method: str, batch_size: int, seed: int, max_steps: Optional[int], world: int
            ) -> dict[str, Any]:
    """Run one epoch at ``world`` ranks (1: in a fresh process too, so the peak memory is its own)."""
    args = (folder, method, batch_size, seed, max_steps)
    with tempfile.TemporaryDirectory() as out:
        init = "file://" + os.path.join(out, "rendezvous")
        torch.multiprocessing.spawn(_worker, args=(world, init, out, args), nprocs=world)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    seconds = max(r["seconds"] for r in ranks)
    rows = sum(r["rows"] for r in ranks)
    return {"world": world, "steps": ranks[0]["steps"], "exposures": rows, "train_rows": ranks[0]["train_rows"],
            "seconds": seconds, "exposures_per_second": rows / seconds,
            "peak_rss_mb": [r["peak_rss_mb"] for r in ranks]}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream_epoch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", required=True, type=Path, help="a folder written by python -m simulate ctcvr")
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    parser.add_argument("--method", default="escm2_dr", help="a method of reproduce escm2 (default escm2_dr)")
    parser.add_argument("--batch-size", type=int, default=4096, help="the global batch (default 4096)")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps")
    parser.add_argument("--json", type=Path, default=None, help="also write the records to this file")
    args = parser.parse_args(argv)
    if not (args.log / "summary.json").is_file():
        parser.error(f"--log {args.log}: not a folder of python -m simulate ctcvr (no summary.json)")
    from reproduce.escm2 import METHODS
    if args.method not in METHODS:
        parser.error(f"--method {args.method!r}: expected one of {', '.join(METHODS)}")
    try:
        ranks = [int(x) for x in args.ranks.split(",")]
        assert ranks and all(r >= 1 for r in ranks)
    except (ValueError, AssertionError):
        parser.error(f"--ranks {args.ranks!r}: expected positive integers such as 1,2")
    records = []
    print(f"{'ranks':>5} {'steps':>7} {'exposures':>12} {'seconds':>9} {'exposures/s':>12}  peak RSS per rank (MB)")
    for world in ranks:
        rec = measure(args.log, args.method, args.batch_size, args.seed, args.max_steps, world)
        records.append(rec)
        print(f"{world:>5} {rec['steps']:>7} {rec['exposures']:>12,} {rec['seconds']:>9.1f} "
              f"{rec['exposures_per_second']:>12,.0f}  {', '.join(f'{m:.0f}' for m in rec['peak_rss_mb'])}",
              flush=True)
    if len(records) > 1:
        base = records[0]["exposures_per_second"]
        print("throughput ratio to " + f"{records[0]['world']} rank(s): "
              + ", ".join(f"{r['world']} ranks {r['exposures_per_second'] / base:.2f}x" for r in records[1:]))
    if args.json:  # atomically: a killed run leaves the old file or the new one, never half of one
        from reproduce.files import replace
        replace(args.json, json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
