"""``reproduce`` on data sets as data: split-format folders, the sparsity and batch-size options,
per-epoch history, typed configs and their errors, the device option."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import simulate
from cvrdata import load_dataset
from reproduce import config as C
from reproduce.__main__ import main
from reproduce.methods import METHODS
from reproduce.table import read_results, write_history


pytestmark = pytest.mark.usefixtures("restore_runtime")


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory) -> Path:
    """A freshly simulated split-format folder (low-rank source: no download)."""
    out = tmp_path_factory.mktemp("data") / "lowrank-sim"
    simulate.write(simulate.generate("lowrank", density=0.05, seed=1), out)
    return out


def _quick_config(tmp_path: Path, name: str) -> Path:
    """A config folder holding ``name``.json: the default config with a short propensity fit."""
    raw = copy.deepcopy(dict(C.load_config("default").raw))
    raw["propensity_max_epochs"] = 2
    folder = tmp_path / "configs"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(raw))
    return folder


def test_table3_trains_on_a_simulated_folder(sim_dir, tmp_path):
    """A new data set needs no code: a folder path in --datasets, its config NAME.json (else the default)."""
    out = tmp_path / "run"
    argv = ["table3", "--datasets", str(sim_dir), "--seeds", "1", "--max-epochs", "2", "--out", str(out), "--jobs", "1"]
    assert main(argv + ["--methods", "mf,badr", "--config-dir", str(_quick_config(tmp_path, "lowrank-sim"))]) == 0
    rows = read_results(out / "results.csv")
    assert [(r["dataset"], r["method"]) for r in rows] == [("lowrank-sim", "mf"), ("lowrank-sim", "badr")]
    assert all(r["status"] in ("ok", "chance") for r in rows)  # two epochs: chance level is possible
    assert all(0 < r["auc"] < 1 for r in rows)  # two epochs from N(0, 1) embeddings: near chance yet
    table = (out / "table3.md").read_text()
    assert "## lowrank-sim" in table and "| BADR | " in table
    # history: the propensity epochs and every fit epoch, with the validation loss and AUC
    history = read_results_history(out / "history.csv")
    badr = [h for h in history if h["method"] == "badr"]
    assert [h["epoch"] for h in badr if h["stage"] == "propensity"] == [1, 2]
    fit = [h for h in badr if h["stage"] == "fit"]
    assert [h["epoch"] for h in fit] == [1, 2] and all(0 < float(h["val_auc"]) < 1 for h in fit)
    assert all(h["imputation_loss"] != "" and h["test_loss"] == "" for h in fit)
    # the folder's content is in the signature: the default config (no NAME.json) is another run
    assert main(argv + ["--methods", "mf"]) == 0
    rows = read_results(out / "results.csv")
    assert len(rows) == 3 and rows[2]["signature"] != rows[0]["signature"]


def read_results_history(path):
    import csv
    with open(path, newline="") as f:
        return [{**r, "epoch": int(r["epoch"])} for r in csv.DictReader(f)]


def test_train_fraction_batch_size_and_test_loss(data_dir, tmp_path):
    out = tmp_path / "run"
    base = ["table3", "--datasets", "coat", "--methods", "mf", "--seeds", "1", "--max-epochs", "2",
            "--data-dir", str(data_dir), "--out", str(out)]
    assert main(base) == 0
    assert main(base + ["--train-fraction", "0.5", "--batch-size", "64", "--record-test-loss"]) == 0
    full, half = read_results(out / "results.csv")
    assert (full["train_fraction"], full["batch_size"]) == (1.0, 128)
    assert (half["train_fraction"], half["batch_size"]) == (0.5, 64)
    assert half["signature"] != full["signature"] and half["auc"] != full["auc"]
    history = read_results_history(out / "history.csv")
    assert all(h["test_loss"] != "" for h in history if h["signature"] == half["signature"])
    assert all(h["test_loss"] == "" for h in history if h["signature"] == full["signature"])
    # the run saw half the clicked pairs, drawn by its seed: same subsample, same epochs' length
    coat = load_dataset("coat", data_dir)
    assert len(coat.subsample(0.5, 2024).x_train) == round(0.5 * len(coat.x_train))


def test_history_rows_of_a_rerun_replace_the_old_ones(tmp_path):
    path = tmp_path / "history.csv"
    row = {"dataset": "coat", "method": "mf", "seed": 2024, "signature": "abc"}
    write_history(path, row, [{"stage": "fit", "epoch": 1, "monitor": 3.0}])
    write_history(path, {**row, "seed": 2025}, [{"stage": "fit", "epoch": 1, "monitor": 4.0}])
    write_history(path, row, [{"stage": "fit", "epoch": e, "monitor": 2.0} for e in (1, 2)])
    rows = read_results_history(path)
    assert [(r["seed"], r["epoch"], r["monitor"]) for r in rows] == [("2025", 1, "4"), ("2024", 1, "2"),
                                                                     ("2024", 2, "2")]


# ---- typed configs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path, value, message", [
    (("methods", "ips", "lr"), -0.1, "methods.ips.lr must be a positive number; got -0.1"),
    (("methods", "ips", "lr"), "0.03", "methods.ips.lr must be a positive number; got '0.03'"),
    (("methods", "ips", "lr"), None, "methods.ips.lr must be a positive number; got None"),
    (("methods", "ips", "weight_decay"), -1e-4, "methods.ips.weight_decay must be a number >= 0"),
    (("methods", "dr_jl", "imp_lr"), -0.05, "methods.dr_jl.imp_lr must be a positive number"),
    (("methods", "badr", "prop_lr"), 0, "methods.badr.prop_lr must be a positive number"),
    (("methods", "dr_mse", "alpha"), 7, r"methods.dr_mse.alpha must be a number in \[0, 1\]; got 7"),
    (("methods", "dr_jl", "G"), 2.7, "methods.dr_jl.G must be an integer >= 1; got 2.7"),
    (("methods", "ips", "gamma"), 0.0, r"methods.ips.gamma must be a number in \(0, 1\]"),
    (("methods", "ips", "learning_rate"), 0.1, "methods.ips.learning_rate is not a key of method 'ips'"),
    (("propensity_max_epochs",), 0, "propensity_max_epochs must be an integer >= 1; got 0"),
    (("batch_size",), 0, "batch_size must be an integer >= 1; got 0"),
    (("batch_size",), "128", "batch_size must be an integer >= 1; got '128'"),
    (("seeds",), [], "seeds must be a non-empty list of integers"),
    (("early_stopping",), {}, "early_stopping.tol must be a number >= 0; got None"),
    (("propensity_loss",), "hinge", "propensity_loss must be one of mse, bce"),
    (("sampling",), "bootstrap", "sampling must be one of uniform, permutation"),
    (("methods", "nope"), {}, "methods.nope names no registered method"),
    (("learning_rate",), 0.1, "learning_rate unknown"),
])
def test_a_bad_config_value_is_named_with_its_file_and_key(tmp_path, path, value, message):
    raw = copy.deepcopy(dict(C.load_config("coat").raw))
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "coat.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=f"coat.json: {message}"):
        C.load_config("coat", folder)


def test_a_bad_config_stops_the_cli_with_one_line(tmp_path, capsys):
    folder = tmp_path / "configs"
    folder.mkdir()
    raw = copy.deepcopy(dict(C.load_config("coat").raw))
    raw["methods"]["mf"]["lr"] = -1
    (folder / "coat.json").write_text(json.dumps(raw))
    with pytest.raises(SystemExit) as exc:
        main(["table3", "--datasets", "coat", "--methods", "mf", "--config-dir", str(folder), "--out",
              str(tmp_path / "out"), "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "coat.json: methods.mf.lr must be a positive number; got -1" in err


def test_shipped_configs_parse_and_default_covers_every_method():
    at_rates = [path.stem for path in C.CONFIG_DIR.glob("*@*.json")]  # values tuned at a sampling rate
    simulated = [path.stem for path in C.CONFIG_DIR.glob("sim-*.json")]  # Table 6's settings, tuned there
    assert at_rates and simulated
    for name in ("coat", "yahoo", "kuairec", "default", *at_rates, *simulated):
        cfg = C.load_config(name)
        assert set(cfg.methods) == set(METHODS), name
    for name in ("default", *simulated):
        assert C.load_config(name).split is None, name  # a folder's split comes from the folder


@pytest.mark.parametrize("argv, match", [
    (["--device", "tpu"], "--device"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "cuda"),
    (["--train-fraction", "0"], "(0, 1]"),
    (["--train-fraction", "1.5"], "(0, 1]"),
    (["--batch-size", "0"], "positive integer"),
    (["--datasets", "coat,no/such/folder"], "neither a built-in data set"),
])
def test_bad_options(argv, match, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["table3", "--methods", "mf", "--seeds", "1", "--out", str(tmp_path), *argv])
    assert exc.value.code == 2 and match in capsys.readouterr().err


def test_tune_on_a_folder_writes_its_own_config(sim_dir, tmp_path):
    """Tuning a folder's data set writes OUT/configs/NAME.json, never the shared default."""
    default_before = C.config_path("default").read_text()
    assert main(["tune", "mf", str(sim_dir), "--trials", "1", "--max-epochs", "1", "--threads", "1",
                 "--out", str(tmp_path / "out"), "--propensity-cache", str(tmp_path / "cache")]) == 0
    written = C.load_config("lowrank-sim", tmp_path / "out" / "configs")
    assert written.methods["mf"].status.startswith("tuned: 1 Optuna TPE trials")
    assert C.config_path("default").read_text() == default_before


def test_progress_is_readable_in_a_log_file():
    """On a terminal one line is redrawn in place; in a log, whole lines, at most one per interval."""
    import io

    from reproduce.progress import Progress

    log = io.StringIO()
    progress = Progress("coat mf seed 2024", 10, stream=log, log_interval=0.0)
    progress.update(3, "fit epochs", "loss 1.5")
    progress.close("done: AUC 0.7")
    lines = log.getvalue().split("\n")
    assert "\r" not in log.getvalue() and lines[0].startswith("coat mf seed 2024 [######") and "3/10" in lines[0]
    assert lines[1] == "coat mf seed 2024 done: AUC 0.7"

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    Progress("x", 2, stream=screen, interval=0.0).update(1, "fit epochs")
    assert screen.getvalue().startswith("\rx [##########")
    quiet = io.StringIO()
    Progress("x", 2, stream=quiet).update(1, "fit epochs")  # within the first 10 s of a log: nothing yet
    assert quiet.getvalue() == ""


def test_train_fraction_subsamples_the_clicked_pairs_by_the_run_seed(data_dir, monkeypatch):
    import reproduce.runs as R

    seen = {}

    def capture(data, cfg, method, params, seed, **kwargs):
        seen[seed] = data.x_train.copy()
        return {"auc": 0.5, "status": "ok", "history": []}

    monkeypatch.setattr(R, "run_or_diverged", capture)
    coat, cfg = load_dataset("coat", data_dir), C.load_config("coat")
    source = C.DataSource("coat")
    for seed in (2024, 2025):
        R.train_row(coat, R.Run(source, cfg, METHODS["mf"], {}, seed, "sig", 1, train_fraction=0.25), None)
    assert len(seen[2024]) == len(seen[2025]) == round(0.25 * len(coat.x_train))
    assert not (seen[2024] == seen[2025]).all()  # each seed its own draw
    assert (seen[2024] == coat.subsample(0.25, 2024).x_train).all()
