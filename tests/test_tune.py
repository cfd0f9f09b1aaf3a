"""``python -m reproduce tune`` through Optuna: the studies it stores, resumes and proposes from.

The end-to-end test trains on Coat; the others replace the training run by a deterministic score
of the hyperparameters (``reproduce.train.run_one``), so that a search of a dozen trials takes
a second and every call of it is counted.
"""
import itertools
import json
import shutil
import types

import optuna
import pytest
from optuna.trial import TrialState

import reproduce.train
from reproduce import config as C
from reproduce import tune as T
from reproduce.__main__ import main
from reproduce.config import run_signature
from reproduce.files import locked
from reproduce.methods import METHODS, SEARCH_SPACE
from reproduce.table import read_results, run_key

pytestmark = pytest.mark.usefixtures("restore_runtime")

CFG = C.load_config("coat")
DATA = types.SimpleNamespace(name="coat")  # all tune reads of the data when run_one is replaced


class Killed(BaseException):
    """Stands for a SIGKILL: nothing catches it, so the trial it interrupts stays RUNNING."""


@pytest.fixture
def fake_runs(monkeypatch):
    """Replace training by a score of the hyperparameters; the list of ``(params, seed)`` trained."""
    calls = []

    def run(data, cfg, method, params, seed, **kw):
        assert kw["split"] == "val"  # never the test labels
        calls.append((json.dumps(params, sort_keys=True), seed))
        return {"auc": 0.5 + params["lr"] - 0.01 * params.get("G", 0), "ndcg": 0.1, "recall": 0.2, "k": 5,
                "seconds": 0.0}

    monkeypatch.setattr(reproduce.train, "run_one", run)
    return calls


def _study(path):
    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{path}")
    return optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{path}")


def _params(study, state=TrialState.COMPLETE):
    return [json.loads(t.user_attrs["params"]) for t in study.get_trials(states=(state,))]


def test_tune_on_coat_writes_the_config_and_stores_the_study(data_dir, tmp_path):
    cfg_dir = tmp_path / "configs"
    shutil.copytree(C.CONFIG_DIR, cfg_dir)
    assert main(["tune", "mf", "coat", "--trials", "3", "--max-epochs", "1", "--threads", "1", "--jobs", "1",
                 "--data-dir", str(data_dir), "--config-dir", str(cfg_dir), "--out", str(tmp_path / "out"),
                 "--force"]) == 0
    entry = json.loads((tmp_path / "out" / "configs" / "coat.json").read_text())["methods"]["mf"]
    assert entry["status"].startswith("tuned: 3 Optuna TPE trials (seed 0, 1 training seed(s) each) on the "
                                      "validation split, validation AUC ")
    study = _study(tmp_path / "out" / "tune" / "coat-mf.db")
    assert study.study_name.startswith("coat-mf-f1-tpe-seed0-")
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 3
    assert entry["lr"] == json.loads(max(trials, key=lambda t: t.value).user_attrs["params"])["lr"]
    assert f"validation AUC {study.best_value:.4f}" in entry["status"]
    rows = read_results(tmp_path / "out" / "tune" / "coat-mf.csv")
    assert sorted(r["trial"] for r in rows) == [0, 1, 2]
    assert {r["params"] for r in rows} == {t.user_attrs["params"] for t in trials}
    low, high, _ = SEARCH_SPACE["lr"]
    assert all(low <= p["lr"] <= high for p in _params(study)[1:])


@pytest.mark.parametrize("method", ["dr_jl", "ddpo"])
def test_the_first_trial_is_the_configs_values(tmp_path, fake_runs, method):
    """Trial 0 is the config's values exactly, a DDPO lambda_g = 0 (outside its log range) included."""
    base = CFG.method_params(METHODS[method])
    if method == "ddpo":
        base["lambda_g"] = 0.0  # the CTCVR task off: a start value the log-scale sampler cannot draw
    T.tune(DATA, CFG, T.Search.tpe(METHODS[method], base, 3), tmp_path / "t.db", log=tmp_path / "t.csv")
    first = _study(tmp_path / "t.db").trials[0]
    assert json.loads(first.user_attrs["params"]) == base
    assert json.loads(fake_runs[0][0]) == base
    assert {r["trial"]: json.loads(r["params"]) for r in read_results(tmp_path / "t.csv")}[0] == base


def test_same_search_seed_same_proposals(tmp_path, fake_runs):
    """Past TPE's random startup trials too; another seed proposes other values."""
    method = METHODS["dr_jl"]
    base = CFG.method_params(method)
    proposed = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        T.tune(DATA, CFG, T.Search.tpe(method, base, T.TPE_STARTUP_TRIALS + 3, seed), tmp_path / f"{name}.db")
        proposed[name] = _params(_study(tmp_path / f"{name}.db"))
    assert len(proposed["a"]) == T.TPE_STARTUP_TRIALS + 3
    assert proposed["a"] == proposed["b"] and proposed["a"][0] == proposed["c"][0] == base
    assert all(a != c for a, c in zip(proposed["a"][1:], proposed["c"][1:]))


def test_a_killed_search_resumes_its_study(tmp_path, fake_runs, monkeypatch):
    """Killed in trial 2: a rerun keeps trials 0 and 1, fails and re-queues trial 2, trains no run
    twice, and ends with the trials an uninterrupted search proposes."""
    method = METHODS["dr_jl"]
    search = T.Search.tpe(method, CFG.method_params(method), 5, seed=1)
    kwargs = dict(n_seeds=2, log=tmp_path / "t.csv")
    real = reproduce.train.run_one

    def killed_in_trial_2(*args, **kw):
        if len(fake_runs) == 5:  # trials 0 and 1 trained, and trial 2's first seed: killed at its second
            raise Killed()
        return real(*args, **kw)

    monkeypatch.setattr(reproduce.train, "run_one", killed_in_trial_2)
    with pytest.raises(Killed):
        T.tune(DATA, CFG, search, tmp_path / "t.db", **kwargs)
    study = _study(tmp_path / "t.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2 + [TrialState.RUNNING]
    interrupted = study.trials[2].user_attrs["params"]
    assert len(fake_runs) == len(read_results(tmp_path / "t.csv")) == 5  # trial 2's first seed is logged

    monkeypatch.setattr(reproduce.train, "run_one", real)
    best = T.tune(DATA, CFG, search, tmp_path / "t.db", **kwargs)
    study = _study(tmp_path / "t.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] + [TrialState.COMPLETE] * 3
    assert study.trials[3].user_attrs["params"] == interrupted
    # no run trained twice: the rerun trained trial 2's second seed and trials 4 and 5, not 0 and 1
    assert len(fake_runs) == len(set(fake_runs)) == 5 + 1 + 4
    rows = read_results(tmp_path / "t.csv")
    assert len(rows) == len({run_key(r) for r in rows}) == 10
    assert best.trials == 5

    T.tune(DATA, CFG, search, tmp_path / "whole.db", **{**kwargs, "log": tmp_path / "whole.csv"})
    assert _params(study) == _params(_study(tmp_path / "whole.db"))


def test_grid_scores_the_start_and_exactly_the_product(tmp_path, fake_runs):
    method = METHODS["dr_jl"]
    base = CFG.method_params(method)
    search = T.Search.over_grid(method, base, {"G": [1.0, 2.0], "lr": [0.01, 0.02, 0.03]})
    best = T.tune(DATA, CFG, search, tmp_path / "g.db")
    study = _study(tmp_path / "g.db")
    assert study.study_name.startswith("coat-dr_jl-f1-grid-seed0-")
    params = _params(study)
    assert len(params) == best.trials == 7 and params[0] == base
    assert sorted((p["G"], p["lr"]) for p in params[1:]) == sorted(itertools.product((1, 2), (0.01, 0.02, 0.03)))
    assert all(type(p["G"]) is int and {**p, "G": base["G"], "lr": base["lr"]} == base for p in params[1:])
    assert best.params == {**base, "G": 1, "lr": 0.03}
    assert search.describe(best.trials, 1) == ("grid of 6 points (G in {1, 2} x lr in {0.01, 0.02, 0.03}; the "
                                               "config's values scored too; via Optuna's GridSampler, 1 training "
                                               "seed(s) each)")
    calls = len(fake_runs)
    assert T.tune(DATA, CFG, search, tmp_path / "g.db") == best and len(fake_runs) == calls  # finished: nothing to do


def test_a_diverged_trial_scores_minus_infinity(tmp_path, monkeypatch):
    def diverge(*args, **kw):
        raise FloatingPointError("training loss is nan")

    monkeypatch.setattr(reproduce.train, "run_one", diverge)
    search = T.Search.tpe(METHODS["mf"], CFG.method_params(METHODS["mf"]), 2)
    with pytest.raises(RuntimeError, match="every trial of mf on coat diverged"):
        T.tune(DATA, CFG, search, tmp_path / "d.db")
    assert [t.value for t in _study(tmp_path / "d.db").trials] == [float("-inf")] * 2


def test_searches_into_one_out_keep_each_others_entries(data_dir, tmp_path, fake_runs, monkeypatch):
    """Searches of two methods at one rate, run at the same time into one --out: the one that ends
    last writes its entry beside the one the other wrote meanwhile, not over a copy read before."""
    out = tmp_path / "out"
    target = out / "configs" / "coat@0.5.json"
    real = T.tune

    def tune_while_another_ends(*args, **kw):
        best = real(*args, **kw)
        other = C.load_config(target.stem, target.parent) if target.is_file() else CFG
        C.save_method_params(other, METHODS["dr_jl"], {**CFG.method_params(METHODS["dr_jl"]), "lr": 0.0123},
                             "tuned: by the other search", target)
        return best

    monkeypatch.setattr(T, "tune", tune_while_another_ends)
    assert main(["tune", "mf", "coat", "--grid", "lr=0.01,0.02", "--train-fraction", "0.5", "--force",
                 "--data-dir", str(data_dir), "--out", str(out)]) == 0
    methods = json.loads(target.read_text())["methods"]
    assert methods["dr_jl"]["lr"] == 0.0123 and methods["dr_jl"]["status"] == "tuned: by the other search"
    assert methods["mf"]["status"].startswith("tuned: grid of 2 points")
    assert methods["mf"]["lr"] == CFG.method_params(METHODS["mf"])["lr"]  # the fake scores the largest lr best


def test_writing_dr_jl_updates_the_entries_that_copy_its_values(tmp_path):
    """TDR-CL and D-DR are "untuned: DR-JL's tuned values": a new DR-JL entry carries them along
    (D-DR keeps its own ddr_w); any other entry is left alone."""
    cfg, target = C.load_config("default"), tmp_path / "default.json"
    C.save_method_params(cfg, METHODS["dr_jl"], {**cfg.method_params(METHODS["dr_jl"]), "lr": 0.0123,
                                                  "weight_decay": 0.0456}, "tuned: test", target)
    methods = json.loads(target.read_text())["methods"]
    own = {k: v for k, v in methods["dr_jl"].items() if k != "status"}
    assert own["lr"] == 0.0123
    assert {k: v for k, v in methods["tdr_cl"].items() if k != "status"} == own
    assert {k: v for k, v in methods["d_dr"].items() if k != "status"} == {**own, "ddr_w": methods["d_dr"]["ddr_w"]}
    assert methods["mrdr"]["lr"] != 0.0123  # not a copy of DR-JL's values


def test_a_study_another_process_runs_is_refused(tmp_path, fake_runs):
    method = METHODS["mf"]
    search = T.Search.tpe(method, CFG.method_params(method), 2)
    name = T.study_name(search, "coat", 1.0, run_signature(CFG, method, search.base, CFG.max_epochs), 1)
    with locked(tmp_path / f"t.db.{name}"):
        with pytest.raises(ValueError, match="is being run by another process"):
            T.tune(DATA, CFG, search, tmp_path / "t.db")
    assert fake_runs == []


@pytest.mark.parametrize("options, match", [
    (["--trials", "0"], "--trials: expected a positive integer"),
    (["--trials", "2", "--search-seed", "-1"], "--search-seed must be a non-negative integer; got -1"),
    (["--grid", "nope=1"], "--grid: dr_jl has no searchable key 'nope'"),
    (["--grid", "G=1.5"], "--grid: 'G' takes integers"),
    (["--grid", "lr=0.01", "--grid", "lr=0.02"], "--grid: each key may be given once"),
    (["--grid", "prop_lr=0.01"], "(propensity keys need --propensity)"),
    (["--grid", "lr=nan"], "--grid: 'lr' takes finite numbers"),
    (["--trials", "2", "--log", "runs.db"], "give the log another suffix"),
])
def test_bad_options_are_refused_by_name(options, match, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["tune", "dr_jl", "coat", *options, "--out", str(tmp_path)])
    assert exc.value.code == 2 and match in capsys.readouterr().err
    assert not any(tmp_path.glob("**/*.db"))


def test_propensity_needs_a_method_that_uses_one():
    with pytest.raises(ValueError, match="--propensity: method 'mf' uses no propensity model"):
        T.Search.tpe(METHODS["mf"], CFG.method_params(METHODS["mf"]), 2, propensity=True)
