"""Benchmark of the fused DR-family losses against the eager pure-PyTorch reference.

``python -m benchmarks.losses [--json] [--device cpu|cuda] [--quick] [--threads N] [--load N] [--ops NAME ...]``

For every operator (the prediction loss of each estimator, ``prediction/<estimator>``, and
each imputation loss, ``imputation/<kind>``) and every batch size B in {128, 4096, 65536,
1048576} with G in {5, 8} (|U| = G B), it times, in the same run, on random logits, labels and
propensities in [0.05, 1], the time of one call within a stream of back-to-back calls (the
median over blocks of calls after warm-up, synchronised with the device only at the ends of a
block, as a training loop runs its losses):

- ``fused_us``: the fused operator ``cvr::*_loss_and_grads``, which returns the loss and its
  gradients (loss + backward) from one call;
- ``fused_autograd_us``: the differentiable operator ``cvr::*_loss`` followed by
  ``loss.backward()`` (what a training step that calls ``backward`` on this loss alone pays);
- ``reference_us``: the eager reference (``*_reference`` in :mod:`estimators.training.losses`)
  followed by ``loss.backward()``.

Both ``backward`` timings contain the autograd engine's fixed cost per call, which no loss can
avoid and a training step pays once for all its losses (measured alone as ``engine_us``, the
backward of a one-element sum); on a slow-to-wake machine it is larger than the fused
arithmetic.  ``speedup`` is reference / fused, ``autograd_speedup`` reference / fused_autograd.
``gbps`` is the bytes the fused operator must move (every input it reads and every gradient it
writes, once) divided by ``fused_us``; ``copy_gbps`` the bandwidth of a large device-to-device
copy (bytes read plus bytes written) measured in the same run, the ceiling ``gbps`` is
compared with.  ``--json`` prints the list of records instead of the table; ``--quick`` runs
B in {128, 4096} only.

``--load N`` starts N busy processes (Python loops) before the measurements and kills them after
(also on an error or Ctrl-C), to time the operators on a machine whose cores are taken, as
other jobs take them on a shared machine.  A measurement whose blocks spread more than
UNSTABLE_SPREAD (interquartile range over median) prints a warning to stderr; each record
carries these spreads under ``spread``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Callable, NamedTuple

import torch

from estimators import _ext
from estimators.registry import ESTIMATORS, IMPUTATION_LOSSES
from estimators.training.losses import imputation_loss_reference, prediction_loss_reference

SIZES = (128, 4096, 65536, 1048576)
QUICK_SIZES = (128, 4096)
GROUPS = (5, 8)
#: Wall-clock seconds spent on the repeats of one measurement (at least MIN_REPEATS of them),
#: each a block of back-to-back calls lasting about BLOCK_S.
BUDGET_S = 0.25
BLOCK_S = 0.002
MIN_REPEATS, MAX_REPEATS = 3, 300
#: Interquartile range over median of a measurement's blocks above which it is reported unstable.
UNSTABLE_SPREAD = 0.25

# A busy process of --load: spins until killed, or until its parent (whose pid is its argument)
# is gone, so that a benchmark killed without cleanup leaves no spinning orphan behind.
_BUSY_LOOP = """import os, sys
parent = int(sys.argv[1])
print("ready", flush=True)
while os.getppid() == parent:
    for _ in range(100000):
        pass
"""


class Timing(NamedTuple):
    """A measurement: the median time of one call (microseconds) and the spread of its blocks."""
    us: float
    spread: float


def spread(samples: list[float]) -> float:
    """Interquartile range over median of a measurement's block times (0 for fewer than two)."""
    if len(samples) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(samples)


def unstable_warning(label: str, timing: Timing, threshold: float = UNSTABLE_SPREAD) -> str | None:
    """The warning line for a measurement whose spread exceeds ``threshold``, else None."""
    if timing.spread <= threshold:
        return None
    return (f"warning: unstable timing of {label}: its blocks spread {timing.spread:.0%} "
            f"(interquartile range / median, median {timing.us:.1f} us); the machine is busy?")


def _report(label: str, timing: Timing) -> Timing:
    warning = unstable_warning(label, timing)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return timing


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[list[subprocess.Popen]]:
    """``n`` busy processes (Python loops), running once entered and killed (and reaped) on exit,
    whatever ends the block."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", _BUSY_LOOP, str(os.getpid())],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE))
        for p in procs:  # each spins once it has said so
            p.stdout.readline()
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
            p.stdout.close()


def _inputs(B: int, G: int, device: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    def logits(n: int) -> torch.Tensor:
        return (2 * torch.randn(n, generator=generator)).to(device)

    return {
        "x_b": logits(B), "xt_b": logits(B), "x_u": logits(G * B), "xt_u": logits(G * B),
        "r_b": (torch.rand(B, generator=generator) < 0.5).float().to(device),
        "p_hat_b": (0.05 + 0.95 * torch.rand(B, generator=generator)).to(device),
    }


def _operators() -> list[tuple[str, Callable, Callable, Callable, Callable]]:
    """(name, fused loss and gradients, differentiable fused loss, reference loss, bytes moved) of
    every operator; the losses take the inputs of :func:`_inputs` with the differentiated logits
    requiring grad."""
    ops = []
    for est in (name for name in ESTIMATORS if name in _ext.PREDICTION_KERNELS):
        uses_u = ESTIMATORS[est].needs_u

        def with_grads(d, est=est):
            return _ext.prediction_loss_and_grads(est, d["x_b"], d["r_b"], d["p_hat_b"], d["x_u"], d["xt_b"], d["xt_u"])

        def fused(d, est=est):
            return _ext.prediction_loss(est, d["x_b"], d["r_b"], d["p_hat_b"], d["x_u"], d["xt_b"], d["xt_u"])

        def reference(d, est=est):
            return prediction_loss_reference(est, d["x_b"], d["r_b"], d["p_hat_b"], d["x_u"], d["xt_b"], d["xt_u"])

        def moved(B, G, uses_u=uses_u):  # read x, r, p_hat (and xt) on B, x and xt on U; write the gradients
            return 4 * B + (B + 3 * G * B if uses_u else 0)

        ops.append((f"prediction/{est}", with_grads, fused, reference, moved))
    for kind in (name for name in IMPUTATION_LOSSES if name in _ext.IMPUTATION_KERNELS):
        def with_grads(d, kind=kind):
            return _ext.imputation_loss_and_grads(kind, d["xt_b"], d["x_b"], d["r_b"], d["p_hat_b"], d["xt_u"], d["x_u"], 0.5)

        def fused(d, kind=kind):
            return _ext.imputation_loss(kind, d["xt_b"], d["x_b"], d["r_b"], d["p_hat_b"], d["xt_u"], d["x_u"], 0.5)

        def reference(d, kind=kind):
            return imputation_loss_reference(kind, d["xt_b"], d["x_b"], d["r_b"], d["p_hat_b"], d["xt_u"], d["x_u"],
                                             0.5)

        def moved(B, G, kind=kind):  # read xt, x, r, p_hat on B (and xt, x on U); write one gradient
            if IMPUTATION_LOSSES[kind].grad_on_u:  # the published BADR loss: x and xt read, xt's gradient written on U
                return 4 * B + 3 * G * B
            return 5 * B

        ops.append((f"imputation/{kind}", with_grads, fused, reference, moved))
    return ops


def _measure(call: Callable[[], object], device: str) -> Timing:
    """Median time in microseconds of one ``call()`` within a stream of back-to-back calls, and
    the spread of the blocks' times.

    The calls run in blocks of ``k`` (about BLOCK_S a block), synchronised with the device only
    at the ends of a block, as a training loop that does not wait for its losses runs them: on a
    GPU the host's launch and allocation overhead then overlaps the kernels of the call before,
    so where the device is the bottleneck this is its time per call.  ``copy_gbps`` is timed the
    same way.  Python's garbage collector is paused, as :mod:`timeit` does (its passes over
    torch's objects would land in random blocks).
    """
    def block(k: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(k):
            call()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / k

    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        first = block(1)
        k = max(1, min(1000, int(BLOCK_S / max(first, 1e-9))))
        block(max(1, min(20, int(0.05 / max(first, 1e-9)))))  # warm-up
        repeats = max(MIN_REPEATS, min(MAX_REPEATS, int(BUDGET_S / max(k * first, 1e-9))))
        samples = [1e6 * block(k) for _ in range(repeats)]
        return Timing(statistics.median(samples), spread(samples))
    finally:
        if gc_was_enabled:
            gc.enable()


def _time(fn: Callable, inputs: dict[str, torch.Tensor], wrt: tuple[str, ...], device: str,
          backward: bool = True) -> Timing:
    """Time of ``fn(inputs)`` (then ``.backward()`` on its result when ``backward``), as
    :func:`_measure` measures it; the gradients of ``wrt`` are reset before each call."""
    params = [inputs[name] for name in wrt]

    def once() -> None:
        for p in params:
            p.grad = None
        out = fn(inputs)
        if backward:
            out.backward()

    return _measure(once, device)


def engine_us(device: str) -> float:
    """The autograd engine's fixed cost: forward and backward of a one-element sum."""
    x = torch.ones(1, device=device, requires_grad=True)
    return _report("the autograd engine's fixed cost", _time(lambda d: d["x"].sum(), {"x": x}, ("x",), device)).us


def copy_gbps(device: str, nbytes: int = 1 << 28) -> float:
    """Bandwidth of ``dst.copy_(src)`` over ``nbytes``, counting bytes read plus bytes written."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _report("the copy", _measure(lambda: dst.copy_(src), device)).us / 1e3


def run(device: str = "cpu", sizes=SIZES, groups=GROUPS, only: tuple[str, ...] = ()) -> list[dict]:
    """The benchmark records (see the module docstring)."""
    generator = torch.Generator().manual_seed(0)
    ceiling = round(copy_gbps(device), 1)
    engine = round(engine_us(device), 1)
    records = []
    for B in sizes:
        for G in groups:
            data = _inputs(B, G, device, generator)
            for name, with_grads, fused, reference, moved in _operators():
                if only and name not in only:
                    continue
                wrt = ("x_b", "x_u") if name.startswith("prediction") else ("xt_b", "xt_u")
                inputs = {k: v.detach().requires_grad_(k in wrt) for k, v in data.items()}
                timings = {
                    key: _report(f"{name} B={B} G={G} {key}",
                                 _time(fn, inputs, wrt, device, backward=key != "fused_us"))
                    for key, fn in (("fused_us", with_grads), ("fused_autograd_us", fused), ("reference_us", reference))
                }
                fused_us, autograd_us, reference_us = (timings[k].us for k in timings)
                nbytes = moved(B, G) * data["x_b"].element_size()
                records.append({
                    "op": name, "B": B, "G": G, "device": device,
                    "fused_us": round(fused_us, 1), "fused_autograd_us": round(autograd_us, 1),
                    "reference_us": round(reference_us, 1), "speedup": round(reference_us / fused_us, 2),
                    "autograd_speedup": round(reference_us / autograd_us, 2),
                    "gbps": round(nbytes / fused_us / 1e3, 3), "copy_gbps": ceiling, "engine_us": engine,
                    "spread": {k: round(t.spread, 3) for k, t in timings.items()},
                })
    return records


def format_table(records: list[dict]) -> str:
    header = (f"{'op':22s} {'B':>7s} {'G':>2s} {'device':>6s} {'fused_us':>9s} {'autograd_us':>11s} "
              f"{'reference_us':>12s} {'speedup':>7s} {'autograd':>8s} {'gbps':>8s} {'of copy':>7s}")
    lines = [header, "-" * len(header)]
    for r in records:
        lines.append(f"{r['op']:22s} {r['B']:7d} {r['G']:2d} {r['device']:>6s} {r['fused_us']:9.1f} "
                     f"{r['fused_autograd_us']:11.1f} {r['reference_us']:12.1f} {r['speedup']:7.2f} "
                     f"{r['autograd_speedup']:8.2f} {r['gbps']:8.2f} {r['gbps'] / r['copy_gbps']:7.1%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.losses", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the records as a JSON list")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="B in {128, 4096} only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="run N busy processes during the measurements (default 0)")
    parser.add_argument("--ops", nargs="+", default=(), metavar="NAME",
                        help="only these operators, e.g. prediction/badr imputation/badr")
    args = parser.parse_args(argv)
    if not _ext.built():
        parser.error(f"the extension estimators._C is not built ({_ext._IMPORT_ERROR}); "
                     "build it with `pip install --no-build-isolation -e .`")
    if args.device == "cuda" and not (torch.cuda.is_available() and _ext.with_cuda()):
        parser.error("--device cuda needs a GPU and an extension built with CUDA")
    known = [name for name, *_ in _operators()]
    unknown = sorted(set(args.ops) - set(known))
    if unknown:
        parser.error(f"unknown operators {unknown}; choose from {known}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be positive; got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.load < 0:
        parser.error(f"--load must not be negative; got {args.load}")
    with busy_processes(args.load) as procs:
        if procs:
            print(f"# --load {args.load}: {len(procs)} busy processes running during the measurements "
                  f"(pids {' '.join(str(p.pid) for p in procs)})", file=sys.stderr, flush=True)
        records = run(args.device, QUICK_SIZES if args.quick else SIZES, GROUPS, tuple(args.ops))
    if procs:
        print(f"# --load {args.load}: the busy processes are stopped", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, CPU kernels for "
              f"{_ext._C.cpu_capability}; medians; device-to-device copy "
              f"{records[0]['copy_gbps']:.0f} GB/s; autograd engine's fixed cost {records[0]['engine_us']:.1f} us"
              + (f"; {args.load} busy processes" if args.load else ""))
        print(format_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
