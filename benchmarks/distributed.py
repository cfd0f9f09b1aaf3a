"""Data-parallel joint learning at 1 and 2 ranks, in one run: throughput, memory, traffic.

``python -m benchmarks.distributed [--shape yahoo|coat] [--ranks 1,2] [--steps 40] [--warmup 5]
[--threads 1] [--estimator badr --imputation-loss badr] [--json]``

Each configuration trains BADR (eq. 13, imputation loss eq. 32, ``JointLearner``) on synthetic
clicked pairs at a data set's shape (Yahoo! R3: 15400 x 1000 MF tables, dim 64, global batch
4096, G = 8; Coat: 290 x 300, dim 16, batch 128, G = 5) in fresh processes (gloo on CPU):

- ``1 process (fast path)``: the default single-process learner (fused kernels, hand-scattered
  gradients, compiled Adam);
- ``1 process (module path)``: what each rank runs, in one process (autograd, ``torch.optim.Adam``,
  the pure-PyTorch losses);
- ``N ranks (DDP)``: ``torch.distributed`` with N gloo ranks, each with ``--threads`` threads, the
  global batch split across them (:mod:`estimators.distributed`).

For each it prints the global clicked pairs ("exposures" of the training split) per second over
``--steps`` timed steps after ``--warmup``, the speed relative to the module path in one process,
the peak resident set of each rank (``getrusage``; includes torch's own ~0.3 GB), and the bytes
all-reduced per step: DDP's gradient buckets (counted by a communication hook around DDP's own
all-reduce), the losses' normaliser sums (:data:`estimators.distributed.TRAFFIC`, a differentiable
all-reduce counted twice) and the step's reported values; and the milliseconds per step, of which
the optimisers' steps (Adam over the whole dense tables, a cost each rank pays in full whatever
the world size; not timed on the fast path, whose Adam is fused into its step).  Timings are of a shared machine: read
the ratios, not the absolute numbers.
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

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# (users, items, dim, global batch, G)
SHAPES = {"coat": (290, 300, 16, 128, 5), "yahoo": (15400, 1000, 64, 4096, 8)}


def _worker(rank: int, world: int, module_path: bool, args: dict, folder: str) -> None:
    from estimators.distributed import TRAFFIC
    from estimators.training import JointConfig, JointLearner

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    torch.set_num_threads(args["threads"])
    torch.set_flush_denormal(True)
    n_users, n_items, dim, batch, G = SHAPES[args["shape"]]
    steps, warmup = args["steps"], args["warmup"]
    g = torch.Generator().manual_seed(0)
    p_hat = torch.rand(n_users, n_items, generator=g) * 0.95 + 0.05
    n = batch * (steps + warmup)
    users, items = torch.randint(n_users, (n,), generator=g), torch.randint(n_items, (n,), generator=g)
    r = torch.bernoulli(torch.full((n,), 0.3), generator=g)
    config = JointConfig(args["estimator"], args["imputation_loss"], dim=dim, G=G, cross_entropy="clamped")
    torch.manual_seed(0)
    learner = JointLearner(p_hat, config, generator=torch.Generator().manual_seed(1),
                           optimizer=torch.optim.Adam if module_path else None)
    ddp_bytes = [0]

    def counting(state, bucket):  # DDP's own all-reduce, its bytes counted
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        ddp_bytes[0] += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(state, bucket)

    for module in learner.ddp_modules:
        module.register_comm_hook(None, counting)
    optimiser_seconds = [0.0]  # the optimisers' steps: dense Adam over whole tables, whatever W is

    def timed(step):
        def run(*a, **k):
            t = time.perf_counter()
            out = step(*a, **k)
            optimiser_seconds[0] += time.perf_counter() - t
            return out
        return run

    if module_path or world > 1:
        for opt in (learner.pred_opt, getattr(learner, "imp_opt", None)):
            if opt is not None:
                opt.step = timed(opt.step)
    for step in range(warmup + steps):
        if step == warmup:
            if world > 1:
                dist.barrier()
            TRAFFIC.reset()
            ddp_bytes[0], optimiser_seconds[0] = 0, 0.0
            start = time.perf_counter()
        idx = learner.shard(torch.arange(step * batch, (step + 1) * batch))
        learner.step(users[idx], items[idx], r[idx], validate=False)
    if world > 1:
        dist.barrier()
    seconds = time.perf_counter() - start
    record = {"rank": rank, "world": world, "seconds": seconds, "exposures": batch * steps,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "ddp_bytes_per_step": ddp_bytes[0] / steps, "loss_bytes_per_step": TRAFFIC.bytes / steps,
              "collectives_per_step": TRAFFIC.calls / steps, "fast": learner.fast,
              "optimiser_ms_per_step": 1e3 * optimiser_seconds[0] / steps,
              "state_mb": 4 * sum(p.numel() * p.element_size() for m in (learner.prediction, learner.imputation)
                                  for p in m.parameters()) / 2**20}
    Path(folder, f"rank{rank}.json").write_text(json.dumps(record))
    if world > 1:  # collects the DDP wrappers before their process group (see finish)
        from reproduce.distributed import finish
        finish()


def measure(world: int, module_path: bool, args: dict) -> list[dict]:
    """One configuration in fresh processes; each rank's record."""
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_worker, args=(world, module_path, args, folder), nprocs=world, join=True,
                           start_method="spawn")
        return [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]


def run(args: dict) -> list[dict]:
    """The rows: 1 process (fast path), 1 process (module path), then each of ``--ranks`` above 1."""
    configs = [(1, False, "1 process (fast path)"), (1, True, "1 process (module path)")]
    configs += [(w, True, f"{w} ranks (DDP)") for w in args["ranks"] if w > 1]
    rows = []
    for world, module_path, label in configs:
        ranks = measure(world, module_path, args)
        seconds = max(r["seconds"] for r in ranks)
        rows.append({"config": label, "world_size": world, "shape": args["shape"],
                     "exposures_per_s": ranks[0]["exposures"] / seconds,
                     "peak_rss_mb_per_rank": [round(r["peak_rss_mb"], 1) for r in ranks],
                     "ddp_bytes_per_step": ranks[0]["ddp_bytes_per_step"],
                     "loss_bytes_per_step": ranks[0]["loss_bytes_per_step"],
                     "collectives_per_step": ranks[0]["collectives_per_step"], "model_state_mb": ranks[0]["state_mb"],
                     "ms_per_step": 1e3 * seconds / args["steps"],
                     "optimiser_ms_per_step": ranks[0]["optimiser_ms_per_step"]})
    base = rows[1]["exposures_per_s"]
    for row in rows:
        row["vs_module_path_1"] = row["exposures_per_s"] / base
    return rows


#: Interconnects of the projection: (name, bandwidth in bytes/s per rank, latency per message in s).
FABRICS = (("NCCL, InfiniBand 200 Gb/s", 20e9, 10e-6), ("gloo, TCP 25 GbE", 2.5e9, 50e-6))
PROJECTED_RANKS = (8, 16, 32, 64)


def project(rows: list[dict], ranks=PROJECTED_RANKS, fabrics=FABRICS) -> list[dict]:
    """A PROJECTION (a model, not a measurement) of one step at ``ranks`` ranks from this run's
    measurements: ``T(W) = (T_1 - t_opt) / W + t_opt + t_grad(W) + n_c t_scalar(W)``, with ``T_1`` /
    ``t_opt`` the module path's step / optimiser milliseconds in one process (the per-pair work
    shrinks with W, the dense optimiser step over whole tables does not), ``t_grad`` an all-reduce
    of the DDP gradient bytes S, the faster of a ring (``2 (W-1)/W S / bandwidth + 2 (W-1)
    latency``) and a tree (``2 S / bandwidth + 2 log2(W) latency``), and
    ``n_c`` latency-bound scalar all-reduces (``2 log2(W) latency`` each).  Compute is per rank
    as measured here (one CPU core each); overlap of communication and compute is ignored."""
    import math

    one, dist_row = rows[1], next((r for r in rows if r["world_size"] > 1), None)
    if dist_row is None:
        return []
    t1, t_opt = one["ms_per_step"] / 1e3, one["optimiser_ms_per_step"] / 1e3
    size, n_c = dist_row["ddp_bytes_per_step"], dist_row["collectives_per_step"]
    batch = one["exposures_per_s"] * t1
    out = []
    for name, bandwidth, latency in fabrics:
        for w in ranks:
            t_grad = min(2 * (w - 1) / w * size / bandwidth + 2 * (w - 1) * latency,  # ring
                         2 * size / bandwidth + 2 * math.log2(w) * latency)        # tree (small messages)
            t_scalar = n_c * 2 * math.log2(w) * latency
            step = (t1 - t_opt) / w + t_opt + t_grad + t_scalar
            out.append({"fabric": name, "world_size": w, "ms_per_step": 1e3 * step, "exposures_per_s": batch / step,
                        "speedup_vs_1": t1 / step, "compute_ms": 1e3 * ((t1 - t_opt) / w + t_opt),
                        "gradient_allreduce_ms": 1e3 * t_grad, "scalar_allreduce_ms": 1e3 * t_scalar})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="yahoo")
    parser.add_argument("--ranks", default="1,2", help="comma-separated world sizes (default 1,2)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="threads per rank (default 1)")
    parser.add_argument("--estimator", default="badr")
    parser.add_argument("--imputation-loss", default="badr")
    parser.add_argument("--json", action="store_true")
    ns = parser.parse_args(argv)
    try:
        ranks = sorted({int(w) for w in ns.ranks.split(",")})
    except ValueError:
        parser.error(f"--ranks must be comma-separated integers; got {ns.ranks!r}")
    if min(ranks) < 1 or ns.steps < 1 or ns.warmup < 0 or ns.threads < 1:
        parser.error("--ranks, --steps and --threads must be positive, --warmup non-negative")
    args = {"shape": ns.shape, "ranks": ranks, "steps": ns.steps, "warmup": ns.warmup, "threads": ns.threads,
            "estimator": ns.estimator, "imputation_loss": ns.imputation_loss}
    rows = run(args)
    projection = project(rows)
    if ns.json:
        print(json.dumps({"measured": rows, "projection": projection}, indent=1))
        return 0
    n_users, n_items, dim, batch, G = SHAPES[ns.shape]
    print(f"{ns.shape}: {n_users} x {n_items} MF tables, dim {dim}, global batch {batch}, G {G}, "
          f"{ns.threads} thread(s) per rank, {ns.steps} steps, {os.cpu_count()} cores")
    print(f"{'config':26} {'exposures/s':>12} {'x module-1':>10} {'ms/step':>8} {'optim ms':>8} "
          f"{'peak RSS MB/rank':>18} {'DDP B/step':>12} {'loss B/step':>11} {'colls/step':>10}")
    for row in rows:
        rss = "/".join(f"{v:.0f}" for v in row["peak_rss_mb_per_rank"])
        print(f"{row['config']:26} {row['exposures_per_s']:12.0f} {row['vs_module_path_1']:10.2f} "
              f"{row['ms_per_step']:8.2f} {row['optimiser_ms_per_step']:8.2f} {rss:>18} "
              f"{row['ddp_bytes_per_step']:12.0f} {row['loss_bytes_per_step']:11.0f} "
              f"{row['collectives_per_step']:10.1f}")
    print(f"model + Adam state per rank: {rows[0]['model_state_mb']:.1f} MB (parameters, gradients, two moments)")
    if projection:
        print("\nPROJECTION (a model of a step from the numbers above, not a measurement; see project()):")
        print(f"{'fabric':28} {'ranks':>5} {'ms/step':>8} {'exposures/s':>12} {'x 1 process':>11} {'compute ms':>10} "
              f"{'grad AR ms':>10} {'scalar AR ms':>12}")
        for p in projection:
            print(f"{p['fabric']:28} {p['world_size']:5d} {p['ms_per_step']:8.2f} {p['exposures_per_s']:12.0f} "
                  f"{p['speedup_vs_1']:11.2f} {p['compute_ms']:10.2f} {p['gradient_allreduce_ms']:10.2f} "
                  f"{p['scalar_allreduce_ms']:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
