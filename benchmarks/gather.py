"""Benchmark of the trainers' compiled building blocks against plain PyTorch, in one run.

``python -m benchmarks.gather [--threads N] [--repeats R]``

- ``gather_dot``: forward + backward of ``x[n] = <P[rows[n]], Q[cols[n]]>`` through
  :func:`estimators.training.gather.gather_dot` (``cvr::gather_dot``) against the plain
  ``(P[rows] * Q[cols]).sum(-1)`` with autograd's embedding backward;
- ``adam``: one update of both tables with :class:`estimators.training.optim.Adam` (``cvr::adam_``)
  against ``torch._fused_adam_`` (the kernel of ``torch.optim.Adam(fused=True)``);
- ``propensity step``: one step of the propensity fit (:func:`estimators.fit_propensity`) on
  ``cvr::propensity_step_`` against its ATen ops;
- ``randperm``: a permutation of all pairs, :func:`estimators._ext.randperm`
  (``cvr::randperm_``) against ``torch.randperm``;

at the shapes of one joint-learning step: Coat (290 x 300 tables, dim 16, b = 128, G = 5) and
Yahoo! R3 (15400 x 1000, dim 64, b = 4096, G = 8), pairs B and U together; the propensity
step at the configs' propensity batch (1024 and 32768) and dims.  The two variants
alternate within each repeat (the machine is shared, so both see the same load); each line
prints the medians in microseconds and their ratio (plain / compiled).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from estimators._ext import randperm
from estimators.training import gather
from estimators.training import optim as _adam
from estimators.training.models import PropensityModel
from estimators.training.propensity import _fused_epoch, _reference_epoch

# (users, items, dim, pairs of a joint-learning step, propensity batch)
SHAPES = {"coat": (290, 300, 16, 128 * 6, 1024), "yahoo": (15400, 1000, 64, 4096 * 9, 32768)}


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _pair(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Medians (us) of ``a`` and ``b``, interleaved, after one warm-up call each."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_time(a))
        tb.append(_time(b))
    return statistics.median(ta) * 1e6, statistics.median(tb) * 1e6


def bench(repeats: int) -> list[tuple[str, str, float, float]]:
    """``(dataset, op, compiled_us, plain_us)`` for every dataset shape and op."""
    records = []
    for name, (n_users, n_items, dim, n, prop_batch) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        P = torch.randn(n_users, dim, generator=g).requires_grad_()
        Q = torch.randn(n_items, dim, generator=g).requires_grad_()
        rows, cols = torch.randint(n_users, (n,), generator=g), torch.randint(n_items, (n,), generator=g)
        grad = torch.randn(n, generator=g)

        def compiled_gather():
            gather.gather_dot(P, Q, rows, cols).backward(grad)

        def plain_gather():
            gather.gather_dot_reference(P, Q, rows, cols).backward(grad)

        records.append((name, "gather_dot fwd+bwd", *_pair(compiled_gather, plain_gather, repeats)))

        params = [P.detach().clone(), Q.detach().clone()]
        grads = [torch.randn_like(p) for p in params]
        ours = _adam.Adam(params, lr=1e-3, weight_decay=1e-4)
        m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        steps = [torch.zeros(()) for _ in params]

        def torch_adam():
            for s in steps:
                s += 1
            torch._fused_adam_(params, grads, m, v, [], steps, lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=1e-4,
                               eps=1e-8, amsgrad=False, maximize=False)

        records.append((name, "adam (both tables)", *_pair(lambda: ours.step(grads), torch_adam, repeats)))

        clicks = (torch.rand(n_users * n_items, generator=g) < 0.02).float()
        batch = torch.randperm(n_users * n_items, generator=g)[:prop_batch]
        fused_step, plain_step = (fit(PropensityModel(n_users, n_items, dim), clicks, 1e-3, 1e-6, prop_batch, "mse")
                                  for fit in (_fused_epoch, _reference_epoch))
        with torch.no_grad():
            records.append((name, "propensity step", *_pair(lambda: fused_step(batch), lambda: plain_step(batch),
                                                            repeats)))
        records.append((name, "randperm (all pairs)",
                        *_pair(lambda: randperm(n_users * n_items, g),
                               lambda: torch.randperm(n_users * n_items, generator=g), max(1, repeats // 10))))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gather", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=50, help="timed repeats per variant (default 50)")
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be a positive integer; got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        parser.error(f"--repeats must be a positive integer; got {args.repeats}")
    if not gather.use_operator(torch.zeros(1, 1)):
        parser.error("the compiled operators are not in use (extension not built, or CVR_BACKEND=reference); "
                     "build with `python setup.py build_ext --inplace`")
    torch.set_flush_denormal(True)
    print(f"{torch.get_num_threads()} thread(s); medians of {args.repeats} interleaved repeats, microseconds")
    print(f"{'data':6} {'op':20} {'compiled':>10} {'plain':>10} {'plain/compiled':>15}")
    for name, op, ours, plain in bench(args.repeats):
        print(f"{name:6} {op:20} {ours:10.1f} {plain:10.1f} {plain / ours:15.2f}")


if __name__ == "__main__":
    main()
