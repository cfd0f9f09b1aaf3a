"""The BADR paper's experiments as plans of runs, and the one driver that trains a plan.

An experiment (:data:`EXPERIMENTS`) is a name, a plan (the runs it needs: a method with its
tuned hyperparameters, a data set, a seed and the options of the run that are not in the config:
the share of the clicked training pairs kept, the batch size, whether the loss on the test pairs
is recorded for Figure 2) and a renderer (:mod:`reproduce.report`) that turns the finished runs
into its table or figure.  Every experiment trains into the one results file of its ``--out``
folder (``results.csv``, with ``history.csv`` beside it), keyed by run, so experiments share
runs (Figure 1 and Figure 4 read Table 3's runs; Figure 2 reads Tables 3, 4 and 5's), a killed
job resumes where it stopped and ``all`` trains each run once.

Seeds: the config's (2024 on), as many as ``--seeds``.  Nothing here reads a test label to
choose anything: Figure 2's "strongest baseline" is chosen by validation AUC.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

from cvrdata import resolve_data_dir

from . import config as C
from .files import check_folder, locked, remove_stale_temporaries
from .methods import METHODS, Method
from .published import FIG3_BATCH_SIZES, SAMPLING_RATES, TABLE45_ROWS
from .distributed import is_writer, world_size
from .runs import Run, train_all
from .table import append_result, read_history, read_results, run_key, write_history
from .train import CHANCE_MARGIN

#: The methods of Tables 4 and 5 that are registered (the others are printed "not implemented").
SPARSITY_DATASETS = {"table4": "yahoo", "table5": "kuairec"}
#: Figure 1's bars, in the paper's order.
FIG1_METHODS = ("dr_jl", "badr_dr", "badr_v", "badr_b", "badr_m", "badr")
#: Table 6's runs: the paper's rows (MF, DCE-TDR, BADR) and DR-JL, the plain DR baseline.
TABLE6_METHODS = ("mf", "dr_jl", "dce_tdr", "badr")


@dataclass(frozen=True)
class SimSetting:
    """One setting of ``python -m simulate`` for Table 6 (Section 4.8), and why it is run."""

    name: str
    flags: dict[str, float]
    about: str
    source: str = "ml100k"  # simulate's source; "lowrank" needs no download (tests)


#: Table 6's data: the paper's two stated settings, the table header's density and the click rate
#: of the authors' public ML-100K splits.
TABLE6_SETTINGS = (
    SimSetting("sim-alpha0.5", {"alpha": 0.5}, "the text's left setting: k = 1, alpha = 0.5 (p_min 0.0625, mean 0.094)"),
    SimSetting("sim-density0.10", {"density": 0.10}, "the table header's left density, 10.00 % (alpha solved)"),
    SimSetting("sim-density0.1511", {"density": 0.1511}, "the right setting: density 15.11 % (p_min 0.113)"),
    SimSetting("sim-density0.012", {"density": 0.012}, "the click rate of the authors' public ML-100K splits "
                                                        "(mean propensity about 0.012)"),
)


@dataclass(frozen=True)
class Options:
    """What a ``python -m reproduce EXPERIMENT`` command was asked for, parsed once."""

    out: Path
    data_dir: Optional[str] = None
    config_dir: Optional[str] = None
    seeds: int = 5
    max_epochs: Optional[int] = None
    jobs: int = 1
    threads: Optional[int] = None
    device: str = "cpu"
    datasets: Optional[tuple[C.DataSource, ...]] = None  # None: the experiment's own
    methods: Optional[tuple[Method, ...]] = None          # None: the experiment's own
    render_only: bool = False
    strict_ndcg: bool = False
    propensity_cache: bool = True


@dataclass
class Plan:
    """Runs by key, each once; a run asked for with the test loss recorded by any experiment keeps it."""

    runs: dict[tuple, Run] = field(default_factory=dict)

    def add(self, run: Run) -> tuple:
        key = (run.dataset, run.method.name, run.seed, run.signature)
        old = self.runs.get(key)
        if old is None or (run.record_test_loss and not old.record_test_loss):
            self.runs[key] = run
        return key


class Context:
    """A job's configs and data sets, each read once, and its plan."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.plan = Plan()
        self._configs: dict[tuple[C.DataSource, float], C.Config] = {}
        self._fingerprints: dict[C.DataSource, str] = {}
        self._n_train: dict[C.DataSource, int] = {}

    def fresh(self) -> "Context":
        """A context with an empty plan that shares this one's configs and data-set facts (each
        read once per job, not once per part)."""
        other = Context(self.opts)
        other._configs, other._fingerprints, other._n_train = self._configs, self._fingerprints, self._n_train
        return other

    def config(self, source: C.DataSource, train_fraction: float = 1.0) -> C.Config:
        """``source``'s config, at a sampling rate its own where ``--config-dir`` has one."""
        if (source, train_fraction) not in self._configs:
            self._configs[source, train_fraction] = source.config(self.opts.config_dir, train_fraction)
        return self._configs[source, train_fraction]

    def n_train(self, source: C.DataSource) -> int:
        """The number of clicked training pairs (Figure 3's "full" batch)."""
        if source not in self._n_train:
            data_dir = None if source.path is not None else resolve_data_dir(self.opts.data_dir)
            self._n_train[source] = len(source.load(self.config(source), data_dir).x_train)
        return self._n_train[source]

    def seeds(self, cfg: C.Config) -> list[int]:
        n = self.opts.seeds
        return list(cfg.seeds[:n]) if n <= len(cfg.seeds) else list(range(cfg.seeds[0], cfg.seeds[0] + n))

    def runs(self, source: C.DataSource, methods: Sequence[Method], *, train_fraction: float = 1.0,
             batch_size: Optional[int] = None, record_test_loss: bool = False) -> set[tuple]:
        """Add to the plan the runs of ``methods`` on ``source`` (every seed) with these options;
        return their keys.  The signature is table3's for the same options, so runs are shared."""
        cfg = self.config(source, train_fraction).with_batch_size(batch_size)
        max_epochs = self.opts.max_epochs or cfg.max_epochs
        extra: dict[str, Any] = {}
        if train_fraction < 1:
            extra["train_fraction"] = train_fraction
        if source.path is not None:  # a user folder: its content is part of what decides a run
            if source not in self._fingerprints:
                self._fingerprints[source] = source.load(cfg, None).fingerprint()
            extra["data"] = self._fingerprints[source]
        if self.opts.device != "cpu":
            extra["device"] = self.opts.device
        if world_size() > 1:  # under torchrun: other U draws than one process, another run
            extra["world_size"] = world_size()
        keys = set()
        for method in methods:
            params = cfg.method_params(method)
            sig = C.run_signature(cfg, method, params, max_epochs, extra)
            for seed in self.seeds(cfg):
                keys.add(self.plan.add(Run(source, cfg, method, params, seed, sig, max_epochs, train_fraction,
                                           self.opts.device, record_test_loss)))
        return keys


@dataclass(frozen=True)
class Experiment:
    """A paper experiment: ``plan`` adds its runs to the context and returns what its renderer
    needs (the run keys by role); ``render`` writes its files from the finished runs and returns
    their paths and its Markdown section."""

    name: str
    title: str
    plan: Callable[[Context], Any]
    render: Callable[["Finished", Any, Options], tuple[list[Path], str]]


@dataclass
class Finished:
    """The finished runs of a results folder: rows and per-epoch history by run key."""

    rows: dict[tuple, dict[str, Any]]
    history: dict[tuple, list[dict[str, Any]]]

    @classmethod
    def read(cls, out: Path) -> "Finished":
        finished = cls({run_key(r): r for r in read_results(out / "results.csv")}, read_history(out / "history.csv"))
        for key, row in finished.rows.items():  # rows written before the chance-level check: from their history
            fit = finished.epochs(key)
            if row.get("val_auc") in (None, "") and fit and row.get("status") == "ok":
                row["val_auc"] = fit[-1]["val_auc"]
                if abs(row["val_auc"] - 0.5) < CHANCE_MARGIN:
                    row["status"] = "chance"
        return finished

    def epochs(self, key: tuple, column: str = "val_auc", stage: str = "fit") -> list[dict[str, Any]]:
        """The history rows of run ``key`` in ``stage`` that record ``column``, in epoch order."""
        return [h for h in self.history.get(key, []) if h.get("stage") == stage and h.get(column) is not None]

    def select(self, keys: set[tuple]) -> list[dict[str, Any]]:
        return [self.rows[k] for k in sorted(keys, key=str) if k in self.rows]


def execute(ctx: Context, on_row: Optional[Callable[[dict[str, Any]], None]] = None) -> int:
    """Train the runs of ``ctx.plan`` not finished in ``OUT/results.csv`` (a run that must record
    its test loss and was finished without it is trained again: its row is kept, its history
    replaced); each row and its history are written as its run finishes.  Returns the number of
    runs trained."""
    opts = ctx.opts
    out = check_folder(opts.out, "--out")
    csv_path, history_path = out / "results.csv", out / "history.csv"
    cache_root = out / "propensity-cache" if opts.propensity_cache else None
    for folder in (out, cache_root):  # what writers killed mid-write left
        if folder is not None and folder.is_dir():
            remove_stale_temporaries(folder)
    if opts.render_only:
        return 0
    done = {run_key(r) for r in read_results(csv_path)}
    with_test_loss = {k for k, rows in read_history(history_path).items()
                      if any(r.get("test_loss") not in (None, "") for r in rows)}
    todo = [run for key, run in ctx.plan.runs.items()
            if key not in done or (run.record_test_loss and key not in with_test_loss)]
    if len(todo) < len(ctx.plan.runs):
        print(f"{len(ctx.plan.runs) - len(todo)} finished run(s) found in {csv_path}, skipped "
              f"({len(todo)} of {len(ctx.plan.runs)} to train)", file=sys.stderr)
    if not todo:
        return 0
    data_dir = None if all(r.source.path is not None for r in todo) else resolve_data_dir(opts.data_dir)

    def record(row: dict[str, Any]) -> None:
        if not is_writer():  # under torchrun: rank 0 writes each run's one row
            return
        write_history(history_path, row, row.pop("history", []))
        # Not added: a run trained again for its test-loss history (its row is there already), or
        # one that another process on this --out finished first.
        if not append_result(csv_path, row) and run_key(row) not in done:
            print(f"{row['dataset']} {row['method']} seed {row['seed']}: another process recorded this run first; "
                  "its row is kept", file=sys.stderr)
        if on_row is not None:
            on_row(row)

    train_all(todo, data_dir, cache_root, record, opts.jobs, opts.threads)
    return len(todo)


# ---------------------------------------------------------------------------------------- the plans
def _builtin(ctx: Context, name: str) -> C.DataSource:
    """A built-in data set, unless ``--datasets`` names others (then the first of them)."""
    return ctx.opts.datasets[0] if ctx.opts.datasets else C.DataSource(name)


def _registered(rows: Sequence[str]) -> list[Method]:
    by_row = {m.table3_row: m for m in METHODS.values() if m.table3_row}
    return [by_row[TABLE45_ROWS.get(r, r)] for r in rows if TABLE45_ROWS.get(r, r) in by_row]


def plan_table3(ctx: Context) -> dict[str, set]:
    sources = ctx.opts.datasets or tuple(C.DataSource(d) for d in ("yahoo", "coat", "kuairec"))
    methods = ctx.opts.methods or tuple(METHODS.values())
    return {s.name: ctx.runs(s, methods) for s in sources}


def _sparsity_runs(ctx: Context, source: C.DataSource) -> dict[float, set]:
    """The registered methods of Tables 4 / 5 at full data and each sampling rate, with the test
    loss recorded for Figure 2."""
    methods = ctx.opts.methods or tuple(_registered(TABLE45_ROWS))
    return {rate: ctx.runs(source, methods, train_fraction=rate, record_test_loss=True)
            for rate in (1.0, *SAMPLING_RATES)}


def plan_sparsity(ctx: Context, table: str) -> dict[float, set]:
    """Table 4 (Yahoo! R3) or 5 (KuaiRec): :func:`_sparsity_runs`."""
    return _sparsity_runs(ctx, _builtin(ctx, SPARSITY_DATASETS[table]))


def plan_table6(ctx: Context) -> dict[str, set]:
    """Table 6: MF, DR-JL, DCE-TDR and BADR on each simulated folder (``--datasets``, else the
    settings of :data:`TABLE6_SETTINGS`, generated into ``OUT/data`` from ML-100K on first use)."""
    sources = ctx.opts.datasets or tuple(_simulated(ctx.opts, s) for s in TABLE6_SETTINGS)
    methods = ctx.opts.methods or tuple(METHODS[m] for m in TABLE6_METHODS)
    return {s.name: ctx.runs(s, methods) for s in sources}


def _simulated(opts: Options, setting: SimSetting) -> C.DataSource:
    import simulate

    folder = Path(opts.out) / "data" / setting.name
    if not (folder / "meta.json").is_file():
        if opts.render_only:
            raise ValueError(f"{folder}: no simulated data set; run without --table-only first")
        print(f"simulating {setting.name} ({setting.about}) into {folder}", file=sys.stderr)
        data_dir = resolve_data_dir(opts.data_dir) if setting.source == "ml100k" else None
        sim = simulate.generate(setting.source, data_dir=data_dir, seed=0, **setting.flags)
        simulate.write(sim, folder)
    return C.DataSource.parse(str(folder))


def plan_fig1(ctx: Context) -> dict[str, set]:
    sources = ctx.opts.datasets or tuple(C.DataSource(d) for d in ("yahoo", "coat", "kuairec"))
    return {s.name: ctx.runs(s, [METHODS[m] for m in FIG1_METHODS]) for s in sources}


def plan_fig2(ctx: Context) -> dict[str, dict[float, set]]:
    """Figure 2: Tables 4 and 5's runs (full data and every rate), whose test loss is recorded."""
    sources = ctx.opts.datasets or tuple(C.DataSource(SPARSITY_DATASETS[t]) for t in ("table4", "table5"))
    return {s.name: _sparsity_runs(ctx, s) for s in sources}


def plan_fig3(ctx: Context) -> dict[str, dict[int, set]]:
    """Figure 3: BADR at each batch size the paper lists ("full": every clicked training pair)."""
    sources = ctx.opts.datasets or tuple(C.DataSource(d) for d in ("yahoo", "coat", "kuairec"))
    out = {}
    for s in sources:
        sizes = FIG3_BATCH_SIZES.get(s.name, FIG3_BATCH_SIZES["coat"])
        out[s.name] = {}
        for size in sizes:
            b = ctx.n_train(s) if size == "full" else size
            out[s.name][b] = ctx.runs(s, [METHODS["badr"]], batch_size=b)
    return out


def plan_fig4(ctx: Context) -> dict[str, set]:
    sources = ctx.opts.datasets or tuple(C.DataSource(d) for d in ("yahoo", "coat", "kuairec"))
    return {s.name: ctx.runs(s, [METHODS["badr"]]) for s in sources}


def experiments() -> dict[str, Experiment]:
    """The registry of paper experiments, in the order ``all`` runs and reports them."""
    from . import report as R

    return {e.name: e for e in (
        Experiment("table3", "Table 3: the methods on Yahoo! R3, Coat and KuaiRec", plan_table3, R.render_table3),
        Experiment("table4", "Table 4: sparsity study on Yahoo! R3", lambda c: plan_sparsity(c, "table4"),
                   lambda f, p, o: R.render_sparsity(f, p, o, "table4")),
        Experiment("table5", "Table 5: sparsity study on KuaiRec", lambda c: plan_sparsity(c, "table5"),
                   lambda f, p, o: R.render_sparsity(f, p, o, "table5")),
        Experiment("table6", "Table 6: simulated ML-100K with higher propensities", plan_table6, R.render_table6),
        Experiment("fig1", "Figure 1: ablations", plan_fig1, R.render_fig1),
        Experiment("fig2", "Figure 2: loss on the unbiased data per epoch", plan_fig2, R.render_fig2),
        Experiment("fig3", "Figure 3: batch size", plan_fig3, R.render_fig3),
        Experiment("fig4", "Figure 4: BADR's training-loss curves", plan_fig4, R.render_fig4),
    )}


class Part(NamedTuple):
    """One experiment as :func:`run_experiments` ran it."""

    name: str
    files: list[Path]
    section: str  # its Markdown, for REPORT.md ("" on a torchrun rank that does not write)
    seconds: float  # wall time of this invocation: training its runs, then rendering
    runs: int  # the runs it reads
    trained: int  # of them, those this invocation trained (the others were finished before)


def run_experiments(names: Sequence[str], opts: Options) -> list[Part]:
    """For each experiment of ``names`` in order: plan it, train its runs not finished yet (a run
    shared with an earlier part is trained once, where it first appears), render it."""
    registry = experiments()
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown experiment(s) {', '.join(unknown)}; expected {', '.join(registry)} or all")
    # Plan every part first, so that a run shared by parts records what any of them needs (the
    # test loss of Figure 2's runs, which Table 3 trains first in ``all``), and is trained once.
    union = Context(opts)
    for name in names:
        registry[name].plan(union)
    done = []
    for name in names:
        start = time.perf_counter()
        ctx = union.fresh()
        keys = registry[name].plan(ctx)
        ctx.plan.runs = {key: union.plan.runs[key] for key in ctx.plan.runs}
        if is_writer():  # the part's bounds in the log, so that a killed and resumed job's parts can be timed
            print(f"== {name}: {registry[name].title}, {len(ctx.plan.runs)} run(s)", file=sys.stderr, flush=True)
        trained = execute(ctx)
        files, section = [], ""
        if is_writer():  # under torchrun: rank 0 logs and renders, from the rows it wrote
            print(f"== {name}: {trained} run(s) trained in {time.perf_counter() - start:.0f}s", file=sys.stderr,
                  flush=True)
            with locked(Path(opts.out) / f"{name}.md"):
                files, section = registry[name].render(Finished.read(Path(opts.out)), keys, opts)
        done.append(Part(name, files, section, time.perf_counter() - start, len(ctx.plan.runs), trained))
    return done
