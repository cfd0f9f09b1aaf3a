"""Command line: ``python -m reproduce table3 | table4 | table5 | table6 | fig1 | fig2 | fig3 | fig4 |
all ...`` (the BADR paper's experiments, :mod:`reproduce.experiments`), ``python -m reproduce
tune ...`` and ``python -m reproduce escm2 ...`` (the ESCM2 paper's, :mod:`reproduce.escm2`)."""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from cvrdata import DATASETS, resolve_data_dir

from . import config as C
from . import escm2
from .methods import METHODS, PROPENSITY_KEYS, get_method, parse_methods
from .experiments import Context, Options, execute, experiments, run_experiments
from .files import check_folder, locked
from .report import write_report
from .table import read_results, render_table, write_table
from .distributed import finish, is_writer, launch, world_size
from .train import PropensityCache, resolve_device, setup_runtime


def _cores() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _datasets(text: str) -> list[C.DataSource]:
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))  # in order, once each
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of built-in data sets "
                                         f"({', '.join(DATASETS)}) or split-format folders")
    try:
        sources = [C.DataSource.parse(n) for n in names]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    labels = [s.name for s in sources]
    if len(set(labels)) < len(labels):
        raise argparse.ArgumentTypeError(f"two data sets of --datasets share a name ({', '.join(labels)}); "
                                         "give each folder its own name")
    return sources


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], the share of the clicked training pairs "
                                         f"kept; got {text!r}")
    return value


def _methods(text: str):
    try:
        return parse_methods(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dataset(text: str) -> C.DataSource:
    try:
        return C.DataSource.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _method(text: str):
    try:
        return get_method(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _grid_axis(text: str) -> tuple[str, list[float]]:
    key, sep, values = text.partition("=")
    try:
        parsed = [float(v) for v in values.split(",")]
    except ValueError:
        parsed = []
    if not sep or not key.strip() or not parsed:
        raise argparse.ArgumentTypeError(f"expected KEY=V1,V2,... with numeric values, got {text!r}")
    return key.strip(), parsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reproduce", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", help="folder holding coat/, yahoo-r3/, kuairec/ (default: $CVR_DATA_DIR)")
        p.add_argument("--config-dir", help="folder of the per-data-set configs (default: reproduce/configs)")
        p.add_argument("--max-epochs", type=_positive, help="cap on the fit epochs (default: the config's, 100)")
        p.add_argument("--threads", type=_positive, help="torch intra-op threads (default: torch's choice)")
        p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the models, the data and the "
                                                          "sampling live")

    t3 = sub.add_parser("table3", help="train and print Table 3 (ours beside the paper's numbers)")
    t3.add_argument("--datasets", type=_datasets, default=[C.DataSource(d) for d in DATASETS],
                    help=f"comma-separated built-in data sets ({', '.join(DATASETS)}; default all) or paths of "
                         "split-format folders (simulate's output, say; their config is CONFIG_DIR/NAME.json, "
                         "else configs/default.json)")
    t3.add_argument("--methods", type=_methods, default=list(METHODS.values()),
                    help=f"comma-separated subset of {', '.join(METHODS)} (default all)")
    t3.add_argument("--seeds", type=_positive, default=5, help="number of seeds, from 2024 on (default 5)")
    t3.add_argument("--out", default="results", help="output folder for results.csv and table3.md")
    t3.add_argument("--table-only", action="store_true",
                    help="train nothing: render table3.md from the finished runs in results.csv")
    t3.add_argument("--strict-ndcg", action="store_true",
                    help="exclude users without a positive test item from NDCG/Recall (published: NDCG = 1)")
    t3.add_argument("--jobs", type=_positive, default=_cores(),
                    help=f"runs trained at once, in worker processes (default: the cores, {_cores()} here); each "
                         "worker uses --threads threads (default: the cores divided by the jobs); the results do not "
                         "depend on it")
    t3.add_argument("--no-propensity-cache", action="store_true",
                    help="fit every run's propensity model (default: share fits through OUT/propensity-cache; "
                         "the runs are the same either way)")
    t3.add_argument("--train-fraction", type=_fraction, default=1.0, metavar="F",
                    help="keep this share of the clicked training pairs, drawn by each run's seed (the sparsity "
                         "studies; default 1)")
    t3.add_argument("--batch-size", type=_positive, help="override the configs' batch size")
    t3.add_argument("--record-test-loss", action="store_true",
                    help="add the loss on the test pairs per epoch to OUT/history.csv, for figures only (it drives "
                         "no stopping or selection)")
    common(t3)

    tu = sub.add_parser("tune", help="tune a method on the validation split and write its config")
    tu.add_argument("method", type=_method, help=", ".join(METHODS))
    tu.add_argument("dataset", type=_dataset, help=f"a built-in data set ({', '.join(DATASETS)}) or a split-format "
                                                   "folder")
    how = tu.add_mutually_exclusive_group(required=True)
    how.add_argument("--trials", type=_positive,
                     help="finished trials of Optuna's TPE sampler (the first: the config's values); a study that "
                          "holds fewer, killed or stopped earlier, is continued")
    how.add_argument("--grid", type=_grid_axis, action="append", metavar="KEY=V1,V2,...",
                     help="search a grid instead (Optuna's GridSampler): the product of the values given per key "
                          "(repeat the option, one key each), the other keys kept from the config; the config's "
                          "values are scored too")
    tu.add_argument("--search-seed", type=int, default=0,
                    help="seed of the TPE sampler (a grid: the order of its points); default 0")
    tu.add_argument("--tune-seeds", type=_positive, default=1,
                    help="training seeds per trial, scored by their mean validation AUC (default 1)")
    tu.add_argument("--propensity", action="store_true",
                    help="also search the propensity model's lr and weight decay and write them to the config's "
                         "shared 'propensity' block (used by every method that does not override it)")
    tu.add_argument("--out", default="results", metavar="DIR",
                    help="output folder: the chosen values go to DIR/configs/DATASET.json (a copy of the config "
                         "read, or the file an earlier search wrote there; pass --config-dir DIR/configs to train "
                         "with it), the runs to DIR/tune/ (default results)")
    tu.add_argument("--force", action="store_true",
                    help="replace an entry whose status records a validation AUC this search does not beat, or "
                         "records no AUC at all (e.g. the BADR authors' values)")
    tu.add_argument("--dry-run", action="store_true", help="report the best values without writing the config")
    tu.add_argument("--log", metavar="FILE",
                    help="CSV of every validation run, written as each finishes; runs already there are reused "
                         "(default OUT/tune/DATASET-METHOD.csv); the Optuna study is stored beside it in SQLite "
                         "(FILE with the suffix .db), so a search run again resumes its study")
    tu.add_argument("--propensity-cache", metavar="DIR",
                    help="where trials share their propensity fits (default OUT/propensity-cache)")
    tu.add_argument("--no-propensity-cache", action="store_true", help="fit the propensity model in every trial")
    tu.add_argument("--train-fraction", type=_fraction, default=1.0, metavar="F",
                    help="train each validation run on this share of the clicked training pairs, drawn by its seed "
                         "as table3 --train-fraction does, and write the values to OUT/configs/DATASET@F.json, which "
                         "the runs at that rate read (Tables 4 and 5, with --config-dir OUT/configs); default 1")
    tu.add_argument("--jobs", type=_positive, default=1,
                    help="validation runs trained at once, in worker processes (default 1): a trial's seeds, and "
                         "with fewer seeds than jobs, several TPE trials proposed at once (a grid: all its points); "
                         "each worker uses --threads threads (default: the cores divided by the jobs); the scores "
                         "do not depend on it, TPE's proposals after its 10 random startup trials do")
    common(tu)

    paper = {"table4": "Table 4: sparsity study on Yahoo! R3 (80/60/40/20 %% of the clicked training pairs)",
             "table5": "Table 5: sparsity study on KuaiRec", "table6": "Table 6: simulated ML-100K (Section 4.8)",
             "fig1": "Figure 1: ablations (Table 3's runs)", "fig2": "Figure 2: loss on the unbiased data per epoch",
             "fig3": "Figure 3: BADR's AUC against the batch size", "fig4": "Figure 4: BADR's training-loss curves",
             "all": "Table 3 and everything above, then OUT/REPORT.md"}
    for name, about in paper.items():
        p = sub.add_parser(name, help=about, description=f"{about}. Trains the runs not finished in OUT/results.csv "
                                                         f"(shared by every command on one --out), then writes "
                                                         f"OUT/{name if name != 'all' else 'REPORT'}.md with the CSV "
                                                         "(and PNG) behind it.")
        p.add_argument("--datasets", type=_datasets,
                       help="data sets instead of the experiment's own (table6: simulated folders; default: generated "
                            "into OUT/data from ML-100K)")
        p.add_argument("--seeds", type=_positive, default=5, help="number of seeds, from 2024 on (default 5)")
        p.add_argument("--jobs", type=_positive, default=_cores(),
                       help=f"runs trained at once, in worker processes (default: the cores, {_cores()} here)")
        p.add_argument("--out", default="results", help="output folder (default results)")
        p.add_argument("--table-only", action="store_true", help="train nothing: render from the finished runs")
        common(p)
    escm2.add_parser(sub, common)
    return parser


def _options(args: argparse.Namespace, **more: Any) -> Options:
    # Under torchrun the launched processes train each run together, one run at a time.
    jobs = 1 if world_size() > 1 else args.jobs
    return Options(out=check_folder(args.out, "--out"), data_dir=args.data_dir, config_dir=args.config_dir,
                   seeds=args.seeds, max_epochs=args.max_epochs, jobs=jobs, threads=args.threads,
                   device=str(resolve_device(args.device)), render_only=args.table_only, **more)


def cmd_table3(args: argparse.Namespace) -> int:
    opts = _options(args, strict_ndcg=args.strict_ndcg, propensity_cache=not args.no_propensity_cache,
                    datasets=tuple(args.datasets), methods=tuple(args.methods))
    ctx = Context(opts)
    keys: set = set()
    for source in args.datasets:
        keys |= ctx.runs(source, args.methods, train_fraction=args.train_fraction, batch_size=args.batch_size,
                         record_test_loss=args.record_test_loss)
    out = opts.out
    csv_path, md_path = out / "results.csv", out / "table3.md"
    names = [source.name for source in args.datasets]

    def render(_row: Optional[dict[str, Any]] = None) -> str:
        with locked(md_path):  # the last table written reads the latest results.csv
            text = render_table(read_results(csv_path), names, strict=args.strict_ndcg, keys=keys)
            write_table(md_path, text)
        return text

    if not is_writer():  # under torchrun: rank 0 writes the rows and the table
        execute(ctx)
        return 0
    trained = execute(ctx, on_row=render)
    print(render())
    print(f"wrote {md_path}" + (f" and the rows of {trained} run(s) to {csv_path} and {out / 'history.csv'}"
                                if trained else ""), file=sys.stderr)
    return 0


def cmd_paper(args: argparse.Namespace) -> int:
    """``table4`` ... ``fig4`` and ``all`` (:mod:`reproduce.experiments`)."""
    opts = _options(args, datasets=tuple(args.datasets) if args.datasets else None)
    names = list(experiments()) if args.command == "all" else [args.command]
    parts = run_experiments(names, opts)
    if not is_writer():
        return 0
    for part in parts:
        print(f"{part.name}: {part.seconds:.0f}s, wrote {', '.join(str(f) for f in part.files)}", file=sys.stderr)
    if args.command == "all":
        path = write_report(opts.out, parts, timed=not args.table_only)
        print(f"wrote {path}", file=sys.stderr)
    else:
        print(parts[0].section)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .tune import Search, tune

    source, method = args.dataset, args.method
    device = str(resolve_device(args.device))
    data_dir = None if source.path is not None else resolve_data_dir(args.data_dir)
    cfg = source.config(args.config_dir, args.train_fraction)
    base = cfg.method_params(method)
    overrides = [k for k in PROPENSITY_KEYS if k in cfg.entry(method).params]
    if args.propensity and overrides:
        raise ValueError(f"--propensity: method {method.name!r} overrides the shared propensity block on "
                         f"{source.name!r} ({', '.join(overrides)}); tune the block with a method that uses it")
    if args.grid:
        grid = dict(args.grid)
        if len(grid) < len(args.grid):
            raise ValueError("--grid: each key may be given once")
        search = Search.over_grid(method, base, grid, args.search_seed, args.propensity)
    else:
        search = Search.tpe(method, base, args.trials, args.search_seed, args.propensity)
    out = check_folder(args.out, "--out")
    # At a sampling rate, the values go to NAME@F.json (read by the runs at that rate), a copy of
    # the config read until a search writes there.
    target = out / "configs" / f"{C.rate_config_name(source.name, args.train_fraction)}.json"

    def replaceable_target(best_auc: Optional[float]) -> C.Config:
        """The target as it is now (else the config read), once _check_replaceable lets
        best_auc replace its entry."""
        saved = C.load_config(target.stem, target.parent) if target.is_file() else cfg
        # The default config standing in for a folder's data set holds placeholders, nothing to
        # keep; neither does the full-data config standing in for a rate's.
        if not args.force and saved.path.stem == target.stem:
            _check_replaceable(saved, method, args.propensity, best_auc)
        return saved

    if not args.dry_run:  # refuse before the search, not after it
        replaceable_target(None)
    log = Path(args.log or out / "tune" / f"{source.name}-{method.name}.csv")
    study = log.with_suffix(".db")  # the Optuna study beside the runs' log
    if study == log:
        raise ValueError(f"--log {log}: the Optuna study is stored beside the log as {study}; give the log "
                         "another suffix (.csv)")
    check_folder(log.parent, "--log's folder")
    data = source.load(cfg, data_dir)
    extra = {}
    if source.path is not None:
        extra["data"] = data.fingerprint()
    if device != "cpu":
        extra["device"] = device
    if args.train_fraction < 1:
        extra["train_fraction"] = args.train_fraction
    if world_size() > 1:  # under torchrun: other U draws than one process, other runs
        extra["world_size"] = world_size()
    earlier = sum(r["dataset"] == source.name and r["method"] == method.name for r in read_results(log))
    if earlier and is_writer():
        print(f"{log}: {earlier} earlier validation run(s) of {method.name} on {source.name}; "
              "those with the same settings are reused", file=sys.stderr)
    start = time.perf_counter()

    def on_trial(trial: int, params: dict[str, Any], score: float) -> None:
        print(f"trial {trial}: validation AUC {score:.4f}  {params}", file=sys.stderr)

    best = tune(data, cfg, search, study, max_epochs=args.max_epochs, n_seeds=args.tune_seeds, on_trial=on_trial,
                log=log, jobs=args.jobs, threads=args.threads, device=device, extra=extra,
                train_fraction=args.train_fraction,
                propensity_cache=None if args.no_propensity_cache else PropensityCache(
                    args.propensity_cache or out / "propensity-cache"))
    if not is_writer():  # under torchrun: rank 0 reports and writes the config
        return 0
    print(f"best validation AUC {best.auc:.4f} with {best.params} ({time.perf_counter() - start:.0f}s; "
          f"runs in {log}, trials in {study})")
    if not args.dry_run:
        status = (f"tuned: {search.describe(best.trials, args.tune_seeds)} on the validation split, "
                  f"validation AUC {best.auc:.4f}")
        prop_status = f"{status}, jointly with {method.name}'s own keys" if args.propensity else None
        check_folder(target.parent, "--out's configs folder")
        # Read the file again under its lock: searches of other methods at this rate, run at the
        # same time into the same --out, write their entries there too, and a copy read before
        # the search would drop the entries they wrote meanwhile.
        with locked(target):
            path = C.save_method_params(replaceable_target(best.auc), method, best.params, status, target,
                                        prop_status)
        print(f"wrote {path}; train with it: --config-dir {target.parent}")
    return 0


def _recorded_auc(status: str) -> Optional[float]:
    found = re.search(r"validation AUC (\d+(?:\.\d+)?)", status)
    return float(found.group(1)) if found else None


def _check_replaceable(cfg: C.Config, method, propensity: bool, best_auc: Optional[float]) -> None:
    """Refuse (``ValueError``) to replace a better-documented choice: an entry (or, with
    ``propensity``, the shared block) whose status records a validation AUC ``best_auc`` does not
    beat, or no AUC at all; ``best_auc`` None checks only the latter, before a search."""
    statuses = [("methods." + method.name, cfg.methods[method.name].status if method.name in cfg.methods else "")]
    if propensity:
        statuses.append(("propensity", cfg.raw["propensity"].get("status", "")))
    for where, status in statuses:
        if not status:
            continue
        recorded = _recorded_auc(status)
        if recorded is None:
            raise ValueError(f"{cfg.path}: {where} records no validation AUC ({status!r}); a search would replace "
                             "that choice: pass --force to allow it, or --dry-run")
        if best_auc is not None and best_auc <= recorded:
            raise ValueError(f"{cfg.path}: {where} records validation AUC {recorded:.4f} ({status!r}); this search's "
                             f"best, {best_auc:.4f}, does not beat it, so the config is not written (the runs are in "
                             "the log); pass --force to replace it")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_runtime(args.threads)
    joined = False
    try:
        joined = launch(args.device)  # under torchrun: one process group, each run trained by all
        if args.command == "table3":
            return cmd_table3(args)
        if args.command == "escm2":
            return escm2.run_command(args)
        return cmd_tune(args) if args.command == "tune" else cmd_paper(args)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    finally:
        if joined:
            finish()


if __name__ == "__main__":
    sys.exit(main())
