"""The runs of ``table3`` (each trained to its results.csv row) and the worker processes of
``--jobs`` (:class:`WorkerPool` and :func:`in_workers`, shared with ``tune``).

Each run seeds itself (:func:`reproduce.train.run_one`), so its row does not depend on the
process that trains it or on the order of the runs.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch

from cvrdata import CVRData

from .config import Config, DataSource
from .methods import Method
from .distributed import is_writer, world_size
from .train import PropensityCache, run_or_diverged, setup_runtime


class Run(NamedTuple):
    """One run still to do: a method with its hyperparameters, on a data set, with a seed, and the
    options of the job that are not in the config: the share of the clicked training pairs kept
    (``--train-fraction``, subsampled by the run's seed), the device, and whether the per-epoch
    test loss is recorded for figures."""

    source: DataSource
    cfg: Config
    method: Method
    params: dict[str, Any]
    seed: int
    signature: str
    max_epochs: int
    train_fraction: float = 1.0
    device: str = "cpu"
    record_test_loss: bool = False

    @property
    def dataset(self) -> str:
        return self.source.name


def train_row(data: CVRData, run: Run, cache: Optional[PropensityCache], show_progress: bool = True) -> dict[str, Any]:
    """``run`` trained and evaluated on the test split, as its results.csv row (a diverged run as
    :func:`reproduce.train.run_or_diverged` records it) with its per-epoch rows under "history".
    Under ``torchrun`` every rank trains the run together (:mod:`reproduce.distributed`); the row
    records the ``world_size``."""
    if run.train_fraction < 1:
        data = data.subsample(run.train_fraction, run.seed)
    result = run_or_diverged(data, run.cfg, run.method, run.params, run.seed, max_epochs=run.max_epochs,
                             propensity_cache=cache, show_progress=show_progress and is_writer(), device=run.device,
                             history=True, record_test_loss=run.record_test_loss)
    return {"dataset": run.dataset, "method": run.method.name, "seed": run.seed, **result,
            "max_epochs": run.max_epochs, "signature": run.signature, "threads": torch.get_num_threads(),
            "batch_size": _batch_size(run), "train_fraction": run.train_fraction, "device": run.device,
            "world_size": world_size()}


def _batch_size(run: Run) -> int:
    """The batch the run stepped on: exposures for the entire-space rows, clicked pairs for the others."""
    return run.cfg.entire_space.batch_size if run.method.entire_space is not None else run.cfg.batch_size


def train_all(runs: list[Run], data_dir: Optional[Path], cache_root: Optional[Path],
              record: Callable[[dict[str, Any]], None],
              jobs: int = 1, threads: Optional[int] = None) -> None:
    """Train ``runs`` and pass each row to ``record`` as soon as its run finishes.

    ``jobs == 1`` (or a single run): in this process, with its thread count, in order, with a
    progress bar per run and one data set in memory at a time.  ``jobs > 1``: in that many worker
    processes (:func:`in_workers`), a line per finished run; runs that would fit the same
    propensity model share it through the cache as in one process.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be a positive integer; got {jobs}")
    if world_size() > 1 and jobs > 1:
        raise ValueError("under torchrun the launched processes train each run together: use --jobs 1")
    if jobs == 1 or len(runs) < 2:
        cache = None if cache_root is None else PropensityCache(cache_root)
        data: dict[DataSource, CVRData] = {}
        for run in runs:
            if run.source not in data:
                data = {run.source: run.source.load(run.cfg, data_dir)}
            record(train_row(data[run.source], run, cache))
        return
    tasks = [(run,) for run in runs]
    for n, row in enumerate(in_workers(_worker_row, tasks, jobs, threads, shared=(data_dir, cache_root)), 1):
        record(row)
        print(f"[{n}/{len(runs)}] {row['dataset']} {row['method']} seed {row['seed']}: {row['status']}, "
              f"AUC {row['auc']:.4f}, {row['seconds']:.1f}s", file=sys.stderr)


class WorkerPool:
    """``jobs`` worker processes that run ``fn(*shared, *task)``, kept for as many batches of tasks
    as :meth:`completed` is given (``tune`` trains a batch of trials at a time in one pool).

    Workers start by spawning (no forked torch thread pools), with ``threads`` threads each
    (default: the cores shared out); ``shared`` (the data, say) is sent once per worker, not per
    task.  ``fn`` must be a module-level function (it is pickled by name).  A worker exits within
    a second of its parent's death, however the parent died (SIGKILL included): the kernel sends it
    SIGTERM (``PR_SET_PDEATHSIG`` on Linux) and a watchdog thread notices the new parent
    elsewhere; with the workers gone, multiprocessing's resource tracker sees its pipe close and
    exits too.  Use it as a context manager: leaving it cancels the tasks not started.
    """

    def __init__(self, jobs: int, threads: Optional[int] = None, shared: tuple = ()) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be a positive integer; got {jobs}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be a positive integer or None (the cores shared out); got {threads}")
        threads = threads or max(1, (os.cpu_count() or 1) // jobs)
        self._pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start_worker, initargs=(threads, shared, os.getpid()))

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(cancel_futures=True)

    def completed(self, fn: Callable[..., Any], tasks: list[tuple]) -> Iterator[Any]:
        """``fn(*shared, *task)`` for every task, yielded as each finishes; the tasks of this batch
        not started yet are cancelled when the caller stops early (an error, say)."""
        futures = [self._pool.submit(_call, fn, task) for task in tasks]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def in_workers(fn: Callable[..., Any], tasks: list[tuple], jobs: int, threads: Optional[int] = None,
               shared: tuple = ()) -> Iterator[Any]:
    """``fn(*shared, *task)`` for every task in one :class:`WorkerPool` of ``jobs`` processes
    (``threads`` threads each), yielded as each finishes."""
    with WorkerPool(jobs, threads, shared) as pool:
        yield from pool.completed(fn, tasks)


_SHARED: tuple = ()  # a worker's `shared` arguments
_WORKER_DATA: dict[DataSource, CVRData] = {}  # a table3 worker's data sets, loaded once each


def _start_worker(threads: int, shared: tuple, parent: int) -> None:
    global _SHARED
    _die_with(parent)
    setup_runtime(threads)
    _SHARED = shared


def _die_with(parent: int) -> None:
    """End this worker when process ``parent`` ends: SIGTERM from the kernel where it can send one,
    and a thread that exits once the worker has been handed to another parent."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the watchdog alone
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def _call(fn: Callable[..., Any], task: tuple) -> Any:
    return fn(*_SHARED, *task)


def _worker_row(data_dir: Optional[Path], cache_root: Optional[Path], run: Run) -> dict[str, Any]:
    if run.source not in _WORKER_DATA:
        _WORKER_DATA[run.source] = run.source.load(run.cfg, data_dir)
    cache = None if cache_root is None else PropensityCache(cache_root)
    return train_row(_WORKER_DATA[run.source], run, cache, show_progress=False)
