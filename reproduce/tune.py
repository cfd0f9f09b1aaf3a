"""Hyperparameter search with Optuna on the validation split only (never the test labels).

A :class:`Search` says what proposes the trials; both kinds start with the config's current values
(enqueued as trial 0), so tuning never returns something worse on validation than its start:

- :meth:`Search.tpe`: Optuna's TPE sampler, seeded by the search seed, over ``method``'s own keys
  (:attr:`reproduce.methods.Method.own_keys`) and, with ``propensity=True``, the propensity
  model's learning rate and weight decay (which the config's "propensity" block then shares
  across the baselines), each in its range of :data:`reproduce.methods.SEARCH_SPACE`: a "log"
  scale is ``suggest_float(log=True)``, "linear" ``suggest_float``, "int" ``suggest_int``;
- :meth:`Search.over_grid`: Optuna's GridSampler over the Cartesian product of the values given
  per key, the other keys kept (a local refinement around values TPE found, or one key fixed).

A start value outside the range the sampler draws from (e.g. DDPO with ``lambda_g = 0``, on a log scale)
is trained as it is but not shown to the sampler: TPE models that key from the other trials.

:func:`tune` trains one run per seed with the first ``n_seeds`` seeds of the config for each
trial and scores it by the mean validation AUC of the final models.  A trial with a diverged run
scores minus infinity and is told to Optuna as a finished trial with that value, not pruned or
failed: TPE then counts its region among the bad ones (it ignores failed trials and would
propose there again), the trial counts towards ``--trials`` as every other does, and the failed
state stays reserved for trials an interrupted search left behind.

The study is stored in SQLite (the ``study`` file, by default beside the tuning log:
``OUT/tune/DATASET-METHOD.db``) under a name that spells out the data set, the method, the
training fraction, the kind of search and its seed, followed by a digest of everything else the
scores depend on (:func:`study_name`), so that a search with other settings is another study.
Running the same search again resumes it: its finished trials are kept, and trials a killed
search left running are marked failed and queued again with the same values, so every proposal
is scored once.  One process at a time runs a study (a lock beside the file; a second one is
refused), so a running trial found at the start is always an orphan.

With a ``log``, every run is appended to that CSV as soon as it finishes, and a run already there
(same data set, method, seed and run signature) is read back instead of retrained: the runs of
a killed trial, and those of overlapping searches (two grids, a grid around TPE's best), are
trained once.  The log is the record of every run; the study is the record of the proposals.

Under ``torchrun`` (``--jobs 1``) every validation run is trained by all ranks together, as a
``table3`` run is (:mod:`reproduce.distributed`): rank 0 alone holds the study, its lock and the
log, proposes each trial and broadcasts its values (``torch.distributed.broadcast_object_list``)
to the other ranks, which train it with rank 0 and wait for the next; every rank reads the log
once at the start and keeps the same record of the runs, so they agree on which runs to reuse.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from cvrdata import CVRData

from .config import Config, run_signature
from .distributed import is_writer, world_size
from .files import locked
from .methods import SEARCH_SPACE, TUNED_PROPENSITY_KEYS, Method
from .runs import WorkerPool
from .table import TUNE_COLUMNS, append_result, read_results, run_key
from .train import PropensityCache, run_or_diverged

#: Trials TPE draws at random before it models the scores (Optuna's default, stated here because
#: ``--jobs`` changes the proposals after them; see :meth:`Search.batch`).
TPE_STARTUP_TRIALS = 10


def searchable_keys(method: Method, propensity: bool = False) -> tuple[str, ...]:
    """The keys a search may set: ``method``'s own, and with ``propensity`` the propensity model's."""
    if propensity and not method.uses_propensity:
        raise ValueError(f"--propensity: method {method.name!r} uses no propensity model")
    return method.own_keys + (TUNED_PROPENSITY_KEYS if propensity else ())


@dataclass(frozen=True)
class Search:
    """How a search proposes its trials: TPE (``grid`` None) for ``trials`` finished trials, or a
    grid (``{key: values}``) for each of its points and the start; ``base`` (the config's values)
    is the start, and gives the keys a trial does not set.  Build one with :meth:`tpe` or
    :meth:`over_grid`, which check the options."""

    method: Method
    base: dict[str, Any]
    propensity: bool = False
    trials: int = 1
    seed: int = 0
    grid: Optional[dict[str, tuple[float | int, ...]]] = None
    keys: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"--search-seed must be a non-negative integer; got {self.seed}")
        object.__setattr__(self, "keys", tuple(self.grid) if self.grid is not None
                           else searchable_keys(self.method, self.propensity))

    @classmethod
    def tpe(cls, method: Method, base: dict[str, Any], trials: int, seed: int = 0,
            propensity: bool = False) -> Search:
        """TPE over ``method``'s searchable keys until the study holds ``trials`` finished trials."""
        if trials < 1:
            raise ValueError(f"--trials must be a positive integer; got {trials}")
        return cls(method, dict(base), propensity, trials, seed)

    @classmethod
    def over_grid(cls, method: Method, base: dict[str, Any], grid: dict[str, Sequence[float]], seed: int = 0,
                  propensity: bool = False) -> Search:
        """The product of ``grid``'s values (``{key: values}``, each key searchable by ``method``),
        the other keys kept from ``base``; integer keys (G) must be given integral values.  ``seed``
        orders the points (GridSampler shuffles them)."""
        allowed = searchable_keys(method, propensity)
        if not grid:
            raise ValueError("--grid: give at least one KEY=V1,V2,...")
        for key, values in grid.items():
            if key not in allowed:
                hint = " (propensity keys need --propensity)" if key in TUNED_PROPENSITY_KEYS else ""
                raise ValueError(f"--grid: {method.name} has no searchable key {key!r}{hint}; "
                                 f"expected one of {', '.join(allowed)}")
            if not values:
                raise ValueError(f"--grid: no values for {key!r}; give KEY=V1,V2,...")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"--grid: {key!r} takes finite numbers; got {list(values)}")
            if SEARCH_SPACE[key][2] == "int" and any(float(v) != int(v) for v in values):
                raise ValueError(f"--grid: {key!r} takes integers; got {list(values)}")
        cast = {k: (int if SEARCH_SPACE[k][2] == "int" else float) for k in grid}
        points = {k: tuple(dict.fromkeys(cast[k](v) for v in values)) for k, values in grid.items()}
        return cls(method, dict(base), propensity, 1 + math.prod(len(v) for v in points.values()), seed, points)

    @property
    def kind(self) -> str:
        return "tpe" if self.grid is None else "grid"

    def distribution(self, key: str) -> tuple[float, float, str]:
        """``(low, high, scale)`` of ``key``: its :data:`SEARCH_SPACE` range under TPE, the span of
        its values in a grid (where GridSampler, not the range, gives the values)."""
        if self.grid is None:
            return SEARCH_SPACE[key]
        values = self.grid[key]
        return min(values), max(values), "int" if SEARCH_SPACE[key][2] == "int" else "linear"

    def in_range(self, key: str, value: Any) -> bool:
        """Whether the sampler's distribution of ``key`` holds ``value`` (a start value may not)."""
        low, high, scale = self.distribution(key)
        return low <= value <= high and (scale != "int" or float(value) == int(value))

    def sampler(self, before: int) -> optuna.samplers.BaseSampler:
        """The sampler that proposes the trial after ``before`` trials that did not fail.  TPE gets
        a seed drawn from the search seed and ``before`` for each trial, so a resumed study (its
        interrupted trials failed and queued again) proposes what an uninterrupted one would; one
        sampler per process would start its random stream over and repeat its proposals."""
        if self.grid is not None:
            return _GridSampler({k: list(v) for k, v in self.grid.items()}, seed=self.seed)
        seed = int(np.random.SeedSequence([self.seed, before]).generate_state(1)[0])
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP_TRIALS)

    def batch(self, jobs: int, n_seeds: int) -> int:
        """Trials proposed before any of them is scored, so that ``jobs`` workers have runs to
        train: a grid's points all at once; TPE's one at a time while a trial's seeds fill the
        workers, else ``ceil(jobs / n_seeds)`` (the running ones count for TPE as their mean, the
        constant liar; the proposals after the random startup trials then depend on ``jobs``)."""
        return self.trials if self.grid is not None else max(1, -(-jobs // n_seeds))

    def start(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The start trial: the values Optuna sees (the config's, where in range) and the user
        attributes that carry all of them."""
        return self.shown(self.base), {"params": json.dumps(self.base, sort_keys=True)}

    def shown(self, params: dict[str, Any]) -> dict[str, Any]:
        """The searched keys of ``params`` that the sampler's distributions hold."""
        return {k: params[k] for k in self.keys if self.in_range(k, params[k])}

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """``trial``'s hyperparameters: every key of ``base``, the searched ones from the sampler,
        or, for an enqueued trial (the start, a re-queued one), the values it was queued with."""
        queued = trial.user_attrs.get("params")
        params = dict(self.base) if queued is None else {**self.base, **json.loads(queued)}
        for key in self.keys:
            if queued is not None and not self.in_range(key, params[key]):
                continue  # kept, not shown to the sampler
            low, high, scale = self.distribution(key)
            if scale == "int":
                value: float | int = trial.suggest_int(key, int(low), int(high))
            else:
                value = trial.suggest_float(key, float(low), float(high), log=scale == "log")
            if queued is None:  # a queued trial keeps its own values (and their types) exactly
                params[key] = value
        if queued is None:
            trial.set_user_attr("params", json.dumps(params, sort_keys=True))
        return params

    def describe(self, finished: int, n_seeds: int) -> str:
        """The search in words, for the status of the config entry it writes."""
        if self.grid is None:
            return f"{finished} Optuna TPE trials (seed {self.seed}, {n_seeds} training seed(s) each)"
        axes = " x ".join(f"{k} in {{{', '.join(f'{v:g}' for v in vs)}}}" for k, vs in self.grid.items())
        return (f"grid of {self.trials - 1} points ({axes}; the config's values scored too; "
                f"via Optuna's GridSampler, {n_seeds} training seed(s) each)")


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler without its ``study.stop()`` once every point is taken: that call works
    inside ``Study.optimize`` only (``Study.tell`` raises it), and :func:`tune`'s ask-and-tell loop
    stops by its count of finished trials."""

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: TrialState,
                    values: Optional[Sequence[float]]) -> None:
        pass


def study_name(search: Search, dataset: str, train_fraction: float, settings: str, n_seeds: int) -> str:
    """``DATASET-METHOD-fF-KIND-seedS-DIGEST``: the digest covers what else the scores and the
    proposals depend on: ``settings`` (the run signature of the start: the config's protocol and
    values, the epochs, the data and device), the training seeds per trial, ``--propensity`` and
    the grid."""
    blob = {"settings": settings, "n_seeds": n_seeds, "propensity": search.propensity,
            "grid": None if search.grid is None else {k: list(v) for k, v in search.grid.items()}}
    digest = hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:10]
    return f"{dataset}-{search.method.name}-f{train_fraction:g}-{search.kind}-seed{search.seed}-{digest}"


class Best(NamedTuple):
    """A search's outcome: the best trial's values and mean validation AUC, and the number of
    finished trials of the study it was chosen from."""

    params: dict[str, Any]
    auc: float
    trials: int


def tune(data: CVRData, cfg: Config, search: Search, study: str | os.PathLike, *,
         max_epochs: Optional[int] = None, n_seeds: int = 1,
         on_trial: Optional[Callable[[int, dict[str, Any], float], None]] = None,
         propensity_cache: Optional[PropensityCache] = None,
         log: Optional[str | os.PathLike] = None, jobs: int = 1,
         threads: Optional[int] = None, device: str = "cpu",
         extra: Optional[dict[str, Any]] = None, train_fraction: float = 1.0) -> Best:
    """Run ``search`` on ``data``'s validation split in the Optuna study stored in the SQLite file
    ``study`` (created or resumed) until it holds ``search``'s finished trials; the best of them.

    ``device`` is where the runs train; ``extra`` goes into their signatures
    (:func:`reproduce.config.run_signature`); ``train_fraction`` below 1 trains each run on that
    share of the clicked training pairs, drawn by its seed as ``table3 --train-fraction`` does.
    ``on_trial(number, params, score)`` is called as each trial is scored.

    Trials that share propensity settings share their fits through ``propensity_cache``; runs
    found in ``log`` (a CSV of :data:`reproduce.table.TUNE_COLUMNS`) are reused, new ones appended.
    With ``jobs == 1`` a trial stops at its first diverged seed.  With ``jobs > 1`` the missing
    runs of a batch of trials (:meth:`Search.batch`) are trained in that many worker processes
    (:class:`reproduce.runs.WorkerPool`, ``threads`` each), each logged as it finishes, all seeds
    of a trial even after one diverged; every run seeds itself, so the scores are those of one
    process.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be a positive integer; got {jobs}")
    world, writer = world_size(), is_writer()
    if world > 1 and jobs != 1:
        raise ValueError("under torchrun the launched processes train each validation run together: use --jobs 1")
    if n_seeds < 1:
        raise ValueError(f"--tune-seeds must be a positive integer; got {n_seeds}")
    method = search.method
    max_epochs = cfg.max_epochs if max_epochs is None else max_epochs
    seeds = cfg.seeds[:n_seeds]
    done = {run_key(row): row for row in read_results(log)} if log is not None else {}

    def record(row: dict[str, Any]) -> None:
        done[run_key(row)] = row
        if log is not None and writer:
            append_result(log, row, TUNE_COLUMNS)

    def score(params: dict[str, Any], trial: int) -> float:
        sig = run_signature(cfg, method, params, max_epochs, extra)
        aucs = []
        for seed in seeds:
            row = done.get((data.name, method.name, seed, sig))
            if row is None:
                row = _validation_run(data, cfg, method, max_epochs, propensity_cache, device, params, seed, trial,
                                      sig, train_fraction=train_fraction)
                record(row)
            if row["status"] == "diverged":
                return -math.inf  # a learning rate too large for this method
            aucs.append(row["auc"])
        return float(np.mean(aucs))

    study = Path(study)
    name = study_name(search, data.name, train_fraction,
                      run_signature(cfg, method, search.base, max_epochs, extra), n_seeds)
    if not writer:  # under torchrun: train the trials rank 0 proposes, until it says the search is over
        while (proposal := _broadcast(None)) is not None:
            score(*proposal)
        return Best({}, math.nan, 0)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the trials' lines below are the progress
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locked(study.with_name(f"{study.name}.{name}"), wait=False))
        except BlockingIOError:
            raise ValueError(f"{study}: study {name!r} is being run by another process; wait for it to end "
                             "(this search then resumes it), or change --search-seed") from None
        storage = optuna.storages.RDBStorage(f"sqlite:///{study.resolve()}",
                                             engine_kwargs={"connect_args": {"timeout": 60}})
        runner = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True,
                                     sampler=search.sampler(0))
        _resume(runner, search, study)
        pool = (stack.enter_context(WorkerPool(jobs, threads, (data, cfg, method, max_epochs, propensity_cache,
                                                                device)))
                if jobs > 1 else None)
        while (finished := len(_finished(runner))) < search.trials:
            batch = []
            for _ in range(min(search.batch(jobs, n_seeds), search.trials - finished)):
                trials = runner.get_trials(deepcopy=False)
                runner.sampler = search.sampler(sum(t.state != TrialState.FAIL for t in trials))
                trial = runner.ask()
                batch.append((trial, search.suggest(trial)))
            if pool is not None:
                _train_batch(pool, batch, seeds, done, record, data.name, cfg, method, max_epochs, extra,
                             train_fraction)
            for trial, params in batch:
                if world > 1:
                    _broadcast((params, trial.number))
                value = score(params, trial.number)
                runner.tell(trial, value)
                if on_trial is not None:
                    on_trial(trial.number, params, value)
        trials = _finished(runner)
        if world > 1:
            _broadcast(None)
    best = max(trials, key=lambda t: t.value)  # the first of equals, in trial order
    if best.value == -math.inf:
        raise RuntimeError(f"every trial of {method.name} on {data.name} diverged (study {name!r} in {study})")
    return Best(json.loads(best.user_attrs["params"]), best.value, len(trials))


def _broadcast(proposal: Optional[tuple[dict[str, Any], int]]) -> Optional[tuple[dict[str, Any], int]]:
    """Rank 0's next trial (its values and number; None: the search is over), on every rank."""
    box = [proposal]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _resume(study: optuna.Study, search: Search, path: Path) -> None:
    """Queue the start trial in a new study; in an old one, fail the trials an interrupted search
    left running (this process holds the study's lock: no one else runs them) and queue each
    again with its values, so that it is scored once, from its runs in the log where it has them."""
    trials = study.get_trials(deepcopy=False)
    if not trials:
        shown, attrs = search.start()
        study.enqueue_trial(shown, user_attrs=attrs)
        return
    orphans = [t for t in trials if t.state == TrialState.RUNNING]
    for orphan in orphans:
        study.tell(orphan.number, state=TrialState.FAIL)
        params = json.loads(orphan.user_attrs.get("params") or json.dumps({**search.base, **orphan.params}))
        study.enqueue_trial(search.shown(params), user_attrs={"params": json.dumps(params, sort_keys=True)})
    finished = sum(t.state == TrialState.COMPLETE for t in trials)
    print(f"{path}: study {study.study_name!r} resumed: {finished} finished trial(s) kept"
          + (f", {len(orphans)} interrupted trial(s) queued again" if orphans else ""), file=sys.stderr)


def _train_batch(pool: WorkerPool, batch: list[tuple[optuna.Trial, dict[str, Any]]], seeds: Sequence[int],
                 done: dict[tuple, dict[str, Any]], record: Callable[[dict[str, Any]], None], dataset: str,
                 cfg: Config, method: Method, max_epochs: int, extra: Optional[dict[str, Any]],
                 train_fraction: float) -> None:
    """Train the runs of ``batch``'s trials not in ``done`` in ``pool``, each recorded as it finishes."""
    todo, seen = [], set()
    for trial, params in batch:
        sig = run_signature(cfg, method, params, max_epochs, extra)
        for seed in seeds:
            key = (dataset, method.name, seed, sig)
            if key not in done and key not in seen:
                seen.add(key)
                todo.append((params, seed, trial.number, sig, False, train_fraction))
    for n, row in enumerate(pool.completed(_validation_run, todo), 1):
        record(row)
        print(f"[{n}/{len(todo)}] {dataset} {method.name} trial {row['trial']} seed {row['seed']}: "
              f"{row['status']}, validation AUC {row['auc']:.4f}", file=sys.stderr)


def _validation_run(data: CVRData, cfg: Config, method: Method, max_epochs: int,
                    propensity_cache: Optional[PropensityCache], device: str, params: dict[str, Any], seed: int,
                    trial: int, sig: str, show_progress: bool = True, train_fraction: float = 1.0) -> dict[str, Any]:
    """One training run scored on the validation split, as a row of the tuning log (the arguments
    shared by a search's runs first, for :class:`reproduce.runs.WorkerPool`)."""
    if train_fraction < 1:
        data = data.subsample(train_fraction, seed)
    row = {"dataset": data.name, "method": method.name, "seed": seed, "max_epochs": max_epochs, "signature": sig,
           "threads": torch.get_num_threads(), "trial": trial, "params": json.dumps(params, sort_keys=True)}
    return {**row, **run_or_diverged(data, cfg, method, params, seed, max_epochs=max_epochs, split="val",
                                     label=f"tune {data.name} {method.name} trial {trial} seed {seed}",
                                     show_progress=show_progress, propensity_cache=propensity_cache,
                                     device=device)}
