"""The reproduction CLI (``python -m reproduce``): metrics, registry/configs, end to end."""
import copy
import csv
import dataclasses
import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from estimators.joint_loss import bce_clamped, bce_with_logits
from estimators.training import PropensityModel, fit_propensity
from reproduce import config as C
from reproduce.__main__ import main
from reproduce.methods import METHODS, PROPENSITY_KEYS, SEARCH_SPACE, TABLE3_ROWS, parse_methods
from reproduce.metrics import auc, ndcg_recall_at_k
from reproduce.table import COLUMNS, PUBLISHED, read_results

# ``main`` calls ``setup_runtime`` (threads, flush-to-zero): undone for the tests that follow, which
# rely on IEEE subnormals (Hypothesis checks for them).
pytestmark = pytest.mark.usefixtures("restore_runtime")


# ------------------------------------------------------------------------------------------ metrics
def test_auc_hand_computed():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of the 4 pairs ordered correctly
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auc([0.5, 0.5, 0.5], [0, 1, 1]) == pytest.approx(0.5)  # ties count one half
    assert auc([0.9, 0.1], [1, 0]) == 1.0


def test_ndcg_recall_hand_computed():
    users = [0, 0, 0, 1, 1]
    scores = [0.9, 0.8, 0.1, 0.3, 0.2]
    labels = [0, 1, 1, 0, 0]  # user 1 has no positive test item
    d = 1 / np.log2(3)
    ndcg0, recall0 = d / (1 + d), 0.5  # top 2 of user 0: a miss, then a hit; 2 positives
    ndcg, recall = ndcg_recall_at_k(users, scores, labels, k=2)
    assert ndcg == pytest.approx((ndcg0 + 1.0) / 2)  # published: NDCG = 1 for user 1
    assert recall == pytest.approx((recall0 + 0.0) / 2)  # recall = hits / max(1, 0) = 0
    ndcg_s, recall_s = ndcg_recall_at_k(users, scores, labels, k=2, variant="strict")
    assert (ndcg_s, recall_s) == pytest.approx((ndcg0, recall0))
    # k beyond a user's list ranks all of its items; the input order does not matter
    perm = [4, 2, 0, 3, 1]
    got = ndcg_recall_at_k(np.array(users)[perm], np.array(scores)[perm], np.array(labels)[perm], k=10)
    ideal = 1 + d
    dcg = d + 1 / np.log2(4)  # hits at ranks 2 and 3
    assert got == pytest.approx(((dcg / ideal + 1.0) / 2, (1.0 + 0.0) / 2))


def test_metrics_match_brute_force():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 20, 400)
    scores, labels = rng.random(400), rng.random(400) < 0.3
    ndcgs, recalls = [], []
    for u in np.unique(users):
        y = labels[users == u][np.argsort(-scores[users == u], kind="stable")]
        disc = 1 / np.log2(np.arange(2, len(y) + 2))
        ideal = disc[:min(5, y.sum())].sum()
        ndcgs.append((y[:5] * disc[:5]).sum() / ideal if ideal else 1.0)
        recalls.append(y[:5].sum() / max(1, y.sum()))
    assert ndcg_recall_at_k(users, scores, labels, 5) == pytest.approx((np.mean(ndcgs), np.mean(recalls)))
    pos, neg = scores[labels], scores[~labels]
    assert auc(scores, labels) == pytest.approx((pos[:, None] > neg[None, :]).mean())


@pytest.mark.parametrize("call, match", [
    (lambda: auc([0.1, 0.2], [1, 1]), "both classes"),
    (lambda: auc([0.1, 0.2], [1]), "one length"),
    (lambda: auc([0.1, np.nan], [0, 1]), "NaN"),
    (lambda: auc([0.1, 0.2], [0, 2]), "only 0 and 1"),
    (lambda: ndcg_recall_at_k([0, 0], [0.1, 0.2], [0, 1], k=0), "positive integer"),
    (lambda: ndcg_recall_at_k([0, 0], [0.1, 0.2], [0, 1], k=1, variant="loose"), "variant"),
    (lambda: ndcg_recall_at_k([0.5, 0], [0.1, 0.2], [0, 1], k=1), "integer array"),
    (lambda: ndcg_recall_at_k([0, 0], [0.1, 0.2], [0, 0], k=1, variant="strict"), "no test user"),
])
def test_metric_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------------ registry and configs
def test_configs_cover_registry_and_badr_values():
    expected = {"yahoo": (0.05451, 8, 0.002431, 2.380e-5, 0.02221, 2.319e-4, 5.501e-4, 2.346e-7, 32768),
                "coat": (0.08850, 5, 0.002382, 4.626e-4, 0.09988, 3.394e-7, 0.03177, 0.006550, 1024),
                "kuairec": (0.07641, 5, 0.006153, 1.071e-4, 0.07647, 1.418e-4, 0.04798, 0.9424, 32768)}
    for ds, values in expected.items():
        cfg = C.load_config(ds)
        assert (cfg.dim, cfg.batch_size) == {"yahoo": (64, 4096), "coat": (16, 128), "kuairec": (64, 4096)}[ds]
        for method in METHODS.values():
            cfg.method_params(method)  # every method has all its keys
        p = cfg.method_params(METHODS["badr"])
        keys = ("gamma", "G", "lr", "weight_decay", "imp_lr", "imp_weight_decay", "prop_lr", "prop_weight_decay",
                "prop_batch_size")
        assert tuple(p[k] for k in keys) == pytest.approx(values)
    assert set(PUBLISHED) == set(TABLE3_ROWS)
    assert {m.table3_row for m in METHODS.values() if m.table3_row} <= set(TABLE3_ROWS)


def _raw(name="coat"):
    """A deep copy of a shipped config's JSON, to edit and parse."""
    return copy.deepcopy(dict(C.load_config(name).raw))


def _parse(raw, name="coat"):
    return C.parse_config(raw, Path(f"{name}.json"))


def test_propensity_block_shared_unless_overridden():
    cfg = C.load_config("coat")
    for method in METHODS.values():
        params, entry = cfg.method_params(method), cfg.methods[method.name].params
        if not method.uses_propensity:
            assert not set(PROPENSITY_KEYS) & set(params)
            continue
        source = entry if method.estimator == "badr" else cfg.propensity  # BADR: the authors' values
        assert {k: params[k] for k in PROPENSITY_KEYS} == {k: source[k] for k in PROPENSITY_KEYS}
    raw = _raw()
    raw["methods"]["mf"]["prop_lr"] = 0.01
    with pytest.raises(ValueError, match="coat.json: methods.mf.prop_lr is a propensity setting, but the method uses "
                                         "no propensity model"):
        _parse(raw)
    raw = _raw()
    del raw["propensity"]["prop_lr"]
    with pytest.raises(ValueError, match="coat.json: methods.ips lacks propensity.prop_lr"):
        _parse(raw)
    raw["methods"] = {name: raw["methods"][name] for name in ("mf", "badr")}
    assert _parse(raw).method_params(METHODS["badr"])["prop_lr"] == 0.03177  # BADR overrides the block


def test_large_propensity_weight_decay_fits_a_constant():
    """Why KuaiRec's baselines do not share the BADR authors' propensity block: Adam's coupled weight
    decay 0.94 shrinks every weight and the intercept, so p_hat is one constant for all pairs (0.447
    on KuaiRec, click rate 0.043); BADR's self-normalised estimator is blind to a constant, IPS and
    DR-JL are not.  A small weight decay keeps the users' and items' click rates apart."""
    gen = torch.Generator().manual_seed(0)
    n_users, n_items = 60, 50
    rate = torch.sigmoid(-3.0 + 1.5 * torch.randn(n_users, 1, generator=gen) + 1.5 * torch.randn(1, n_items, generator=gen))
    clicks = torch.bernoulli(rate, generator=gen).reshape(-1)
    spread = {}
    for wd in (0.9424, 1e-7):
        torch.manual_seed(0)
        model = PropensityModel(n_users, n_items, 8)
        fit_propensity(model, clicks, lr=0.05, weight_decay=wd, batch_size=500, max_epochs=60,
                       generator=torch.Generator().manual_seed(1))
        spread[wd] = float(model.propensities(1e-6).std())
    assert spread[0.9424] < 1e-3 < 0.02 < spread[1e-7]


def test_kuairec_baselines_propensity_block_tuned_badr_keeps_authors():
    cfg = C.load_config("kuairec")
    assert cfg.raw["propensity"]["status"].startswith("tuned:")
    assert cfg.propensity["prop_weight_decay"] < 1e-3  # not the authors' 0.9424, which fits a constant
    assert cfg.method_params(METHODS["badr"])["prop_weight_decay"] == pytest.approx(0.9424)


def test_parse_methods():
    assert [m.name for m in parse_methods("mf, badr")] == ["mf", "badr"]
    assert [m.name for m in parse_methods("mf,badr,mf")] == ["mf", "badr"]  # each once
    assert len(parse_methods("all")) == len(METHODS)
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("mf,stable_dr")


def test_bce_clamped_is_the_published_cross_entropy():
    x = torch.tensor([-3.0, 0.0, 2.5, 40.0, -200.0])
    t = torch.tensor([1.0, 0.3, 0.0, 0.0, 1.0])
    # moderate logits: the exact value; saturated ones: the log clamped at -100, as torch's BCE
    torch.testing.assert_close(bce_clamped(x[:3], t[:3]), bce_with_logits(x[:3], t[:3]))
    assert bce_clamped(x[3:], t[3:]).tolist() == [100.0, 100.0]


def test_imputed_error_key_reaches_the_dr_family_and_the_signature():
    """"imputed_error" (default "paper" when absent) applies to the DR-family imputation losses;
    absent and "paper" give one signature, "published" gives those methods new ones; "sampling"
    reaches the signatures of the methods that draw U, and only theirs."""
    raw = _raw_without_entry_forms()
    cfg = _parse(raw)
    absent = _parse({k: v for k, v in raw.items() if k != "imputed_error"})
    published = _parse({**raw, "imputed_error": "published"})
    other = "uniform" if cfg.sampling == "permutation" else "permutation"
    resampled_cfg = _parse({**raw, "sampling": other})
    for method in METHODS.values():
        params = cfg.method_params(method)
        sigs = [C.run_signature(c, method, params, 100) for c in (absent, cfg, published)]
        assert sigs[0] == sigs[1]
        dr_family = method.imputation_loss in ("dr", "mrdr", "dr_bias", "dr_mse", "tdr_cl")
        assert published.imputed_error_of(method) == ("published" if dr_family else "paper")
        assert (sigs[2] != sigs[1]) == dr_family, method.name
        resampled = C.run_signature(resampled_cfg, method, params, 100)
        assert (resampled != sigs[1]) == (method.imputation_loss is not None), method.name
    with pytest.raises(ValueError, match="coat.json: imputed_error must be one of paper, published; got 'swapped'"):
        _parse({**raw, "imputed_error": "swapped"})


def _raw_without_entry_forms() -> dict:
    """Coat's config with the methods' own "imputed_error" overrides removed (the protocol key stays)."""
    raw = _raw()
    raw["methods"] = {m: {k: v for k, v in e.items() if k != "imputed_error"} for m, e in raw["methods"].items()}
    return raw


def test_a_method_entry_overrides_the_imputed_error(tmp_path):
    """A DR-family method's entry may set its own form (and its signature follows it); the entry
    of a method without a DR-family imputation loss may not; the tuner keeps the override."""
    raw = _raw_without_entry_forms()
    raw["imputed_error"] = "paper"
    cfg = _parse(raw)
    own_raw = copy.deepcopy(raw)
    own_raw["methods"]["badr_dr"]["imputed_error"] = "published"
    own = _parse(own_raw)
    assert own.imputed_error_of(METHODS["badr_dr"]) == "published"
    assert own.imputed_error_of(METHODS["dr_jl"]) == "paper"
    params = cfg.method_params(METHODS["badr_dr"])
    signature = C.run_signature
    assert signature(own, METHODS["badr_dr"], params, 100) != signature(cfg, METHODS["badr_dr"], params, 100)
    for name, value, match in (("badr", "published", "only to the DR-family"),
                               ("ips", "paper", "only to the DR-family"),
                               ("dr_jl", "swapped", "methods.dr_jl.imputed_error must be one of")):
        bad = copy.deepcopy(raw)
        bad["methods"][name]["imputed_error"] = value
        with pytest.raises(ValueError, match=match):
            _parse(bad)
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "coat.json").write_text(json.dumps(own_raw))
    C.save_method_params(C.load_config("coat", cfg_dir), METHODS["badr_dr"], params, "tuned")
    assert C.load_config("coat", cfg_dir).methods["badr_dr"].imputed_error == "published"


def test_run_one_trains_with_the_configured_imputed_error(data_dir, monkeypatch):
    import reproduce.train as T
    from cvrdata import load_dataset

    seen = []

    class Recording(T.JointLearner):
        def __init__(self, p_hat, config, **kwargs):
            seen.append(config.imputed_error)
            super().__init__(p_hat, config, **kwargs)

    monkeypatch.setattr(T, "JointLearner", Recording)
    cfg = C.load_config("coat")
    data = load_dataset("coat", data_dir, threshold=cfg.split.threshold, val_fraction=cfg.split.val_pct / 100)
    for name in ("dr_jl", "badr"):
        method = METHODS[name]
        for form in ("paper", "published"):
            T.run_one(data, dataclasses.replace(cfg, imputed_error=form), method, cfg.method_params(method), 2024,
                      max_epochs=1, split="val", show_progress=False)
    assert seen == ["paper", "published", "paper", "paper"]


# ------------------------------------------------------------------------------------------- end to end
def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_table3_end_to_end_and_resume(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["table3", "--datasets", "coat", "--seeds", "1", "--max-epochs", "2", "--threads", "1",
            "--data-dir", str(data_dir), "--out", str(out)]
    assert main(argv + ["--methods", "mf"]) == 0
    rows = _rows(out / "results.csv")
    assert [(r["dataset"], r["method"], r["seed"]) for r in rows] == [("coat", "mf", "2024")]
    assert set(COLUMNS) <= set(rows[0])
    assert int(rows[0]["k"]) == 5 and float(rows[0]["seconds"]) > 0 and 0 <= float(rows[0]["auc"]) <= 1

    # resume: mf is skipped, only ips runs
    capsys.readouterr()
    assert main(argv + ["--methods", "mf,ips"]) == 0
    err = capsys.readouterr().err
    assert "1 finished run(s)" in err and "coat mf seed 2024" not in err and "coat ips seed 2024" in err
    rows = _rows(out / "results.csv")
    assert [r["method"] for r in rows] == ["mf", "ips"]
    assert len(read_results(out / "results.csv")) == 2

    table = (out / "table3.md").read_text()
    assert "## Coat" in table and "| MF | " in table and "| IPS | " in table
    assert "0.6983 ± 0.0088" in table  # the paper's MF AUC on Coat, beside ours
    implemented = {m.table3_row for m in METHODS.values()}
    assert all(f"| {row} | not implemented" in table for row in TABLE3_ROWS if row not in implemented)
    assert "| StableDR | not run" in table and "| BADR | not run" in table
    assert "ddof = 0" in table and "NDCG = 1" in table

    # a changed setting (epochs) is a different run, not a finished one
    assert main(argv[:-4] + ["--max-epochs", "1", "--data-dir", str(data_dir), "--out", str(out),
                             "--methods", "mf"]) == 0
    assert len(_rows(out / "results.csv")) == 3


def test_table3_jobs_give_the_rows_of_one_process(data_dir, tmp_path, capsys):
    """--jobs trains in spawned workers; every run seeds itself, so the rows are those of one process."""
    argv = ["table3", "--datasets", "coat", "--methods", "mf,ips", "--seeds", "2", "--max-epochs", "2",
            "--threads", "1", "--data-dir", str(data_dir)]
    rows = {}
    for jobs in (1, 2):
        assert main(argv + ["--jobs", str(jobs), "--out", str(tmp_path / f"jobs{jobs}")]) == 0
        rows[jobs] = {(r["method"], r["seed"]): r for r in _rows(tmp_path / f"jobs{jobs}" / "results.csv")}
    assert "[4/4] coat" in capsys.readouterr().err  # a line per finished run from the pool
    assert set(rows[1]) == set(rows[2]) == {(m, s) for m in ("mf", "ips") for s in ("2024", "2025")}
    for key, row in rows[1].items():
        for column in ("auc", "ndcg", "recall", "signature", "threads", "status"):
            assert rows[2][key][column] == row[column], (key, column)


def _scratch(tmp_path):
    """A tune's output folder, log and propensity cache, kept out of the working directory; --force
    lets these short searches replace the shipped entries (their refusal: test_tune_keeps_...)."""
    return ["--out", str(tmp_path / "out"), "--force", "--log", str(tmp_path / "tune.csv"), "--propensity-cache",
            str(tmp_path / "propensity-cache")]


def _written(tmp_path, cfg_dir):
    """The config a tune wrote under --out; the configs it read (in ``cfg_dir``) are untouched."""
    assert (cfg_dir / "coat.json").read_text() == (C.CONFIG_DIR / "coat.json").read_text()
    return json.loads((tmp_path / "out" / "configs" / "coat.json").read_text())


def test_tune_writes_config_from_validation(data_dir, tmp_path):
    cfg_dir = tmp_path / "configs"
    shutil.copytree(C.CONFIG_DIR, cfg_dir)
    assert main(["tune", "mf", "coat", "--trials", "2", "--max-epochs", "1", "--threads", "1",
                 "--data-dir", str(data_dir), "--config-dir", str(cfg_dir), *_scratch(tmp_path)]) == 0
    entry = _written(tmp_path, cfg_dir)["methods"]["mf"]
    assert entry["status"].startswith("tuned: 2 Optuna TPE trials") and "validation AUC" in entry["status"]
    rows = read_results(tmp_path / "tune.csv")
    assert [r["trial"] for r in rows] == [0, 1] and {r["status"] for r in rows} <= {"ok", "chance"}
    assert all(r["dataset"] == "coat" and r["method"] == "mf" and json.loads(r["params"]) for r in rows)
    low, high, _ = SEARCH_SPACE["lr"]
    assert low <= entry["lr"] <= high or entry["lr"] == C.load_config("coat").methods["mf"].params["lr"]


def test_tune_log_resumes_and_records_divergence(tmp_path, monkeypatch):
    import reproduce.train
    from reproduce import tune as T

    cfg, method = C.load_config("coat"), METHODS["ips"]
    base = cfg.method_params(method)
    search = T.Search.over_grid(method, base, {"lr": [0.01, 0.05]})
    calls = []

    def fake_run(data, cfg, method, params, seed, **kw):
        assert kw["split"] == "val"
        calls.append((params["lr"], seed))
        if params["lr"] == 0.05:
            raise FloatingPointError("diverged")
        return {"auc": 0.5 + params["lr"] + (seed - 2024) * 1e-3, "ndcg": 0.1, "recall": 0.2, "k": 5, "seconds": 1.0}

    monkeypatch.setattr(reproduce.train, "run_one", fake_run)
    data, log = types.SimpleNamespace(name="coat"), tmp_path / "tune.csv"
    best = T.tune(data, cfg, search, tmp_path / "tune.db", n_seeds=2, log=log)
    assert best == ({**base, "lr": 0.01}, pytest.approx(0.5105), 3)
    # the diverged trial stops at its first seed and is logged as such
    assert sorted(calls) == sorted([(base["lr"], 2024), (base["lr"], 2025), (0.01, 2024), (0.01, 2025), (0.05, 2024)])
    assert sorted(r["status"] for r in read_results(log)) == ["diverged"] + ["ok"] * 4

    calls.clear()  # another study over the same log trains nothing; a third seed trains only that seed
    assert T.tune(data, cfg, search, tmp_path / "other.db", n_seeds=2, log=log) == best
    assert calls == []
    T.tune(data, cfg, search, tmp_path / "tune.db", n_seeds=3, log=log)
    assert sorted(calls) == sorted([(base["lr"], 2026), (0.01, 2026)])
    assert len(read_results(log)) == 7


def test_tune_jobs_log_the_runs_of_one_process(data_dir, tmp_path, capsys):
    """tune --jobs trains each trial's seeds in spawned workers (one pool for the search); the log and the choice
    are those of one process."""
    argv = ["tune", "ips", "coat", "--trials", "2", "--tune-seeds", "2", "--max-epochs", "2", "--threads", "1",
            "--dry-run", "--data-dir", str(data_dir), "--propensity-cache", str(tmp_path / "propensity-cache")]
    logged, best = {}, {}
    for jobs in (1, 2):
        capsys.readouterr()
        assert main(argv + ["--jobs", str(jobs), "--log", str(tmp_path / f"jobs{jobs}.csv")]) == 0
        out, err = capsys.readouterr()
        best[jobs] = out
        logged[jobs] = sorted((r["trial"], r["seed"], r["auc"], r["signature"]) for r in read_results(tmp_path / f"jobs{jobs}.csv"))
    assert "[2/2] coat ips trial 1 seed" in err  # a line per finished run of a trial from the pool
    assert len(logged[1]) == 4 and logged[1] == logged[2]
    assert best[1].split("(")[0] == best[2].split("(")[0]  # same best values and AUC; the seconds differ


def test_jobs_and_threads_rejected_by_the_python_api(tmp_path):
    from reproduce import runs, tune as T

    with pytest.raises(ValueError, match="jobs must be a positive integer"):
        next(runs.in_workers(abs, [(-1,)], jobs=0))
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        next(runs.in_workers(abs, [(-1,)], jobs=2, threads=0))
    with pytest.raises(ValueError, match="jobs must be a positive integer"):
        runs.train_all([], tmp_path, None, print, jobs=0)
    cfg, method = C.load_config("coat"), METHODS["mf"]
    with pytest.raises(ValueError, match="jobs must be a positive integer"):
        T.tune(types.SimpleNamespace(name="coat"), cfg, T.Search.tpe(method, cfg.method_params(method), 1),
               tmp_path / "tune.db", jobs=0)


def test_tune_grid_writes_the_best_point(data_dir, tmp_path):
    cfg_dir = tmp_path / "configs"
    shutil.copytree(C.CONFIG_DIR, cfg_dir)
    assert main(["tune", "mf", "coat", "--grid", "lr=0.002,0.05", "--grid", "weight_decay=0.001", "--max-epochs", "1",
                 "--threads", "1", "--data-dir", str(data_dir), "--config-dir", str(cfg_dir), *_scratch(tmp_path)]) == 0
    entry = _written(tmp_path, cfg_dir)["methods"]["mf"]
    assert entry["status"].startswith("tuned: grid of 2 points (lr in {0.002, 0.05} x weight_decay in {0.001};")
    old = C.load_config("coat").methods["mf"].params
    assert (entry["lr"], entry["weight_decay"]) in {(0.002, 0.001), (0.05, 0.001), (old["lr"], old["weight_decay"])}


@pytest.mark.parametrize("method, propensity", [("ips", False), ("ips", True), ("badr_dr", False)])
def test_tune_writes_own_keys_and_the_propensity_block(data_dir, tmp_path, method, propensity):
    cfg_dir = tmp_path / "configs"
    shutil.copytree(C.CONFIG_DIR, cfg_dir)
    old = C.load_config("coat").raw
    assert main(["tune", method, "coat", "--trials", "3", "--max-epochs", "1", "--threads", "1",
                 "--data-dir", str(data_dir), "--config-dir", str(cfg_dir), *_scratch(tmp_path)]
                + ["--propensity"] * propensity) == 0
    new = _written(tmp_path, cfg_dir)
    overrides = {k for k in PROPENSITY_KEYS if k in old["methods"][method]}
    form = {"imputed_error"} & set(old["methods"][method])  # a method's own form survives tuning
    assert set(new["methods"][method]) == {"status", *METHODS[method].own_keys, *overrides, *form}
    assert {k: new["methods"][method][k] for k in overrides} == {k: old["methods"][method][k] for k in overrides}
    if propensity:
        assert new["propensity"]["status"].startswith("tuned: 3 Optuna TPE trials")
        assert new["propensity"]["prop_batch_size"] == old["propensity"]["prop_batch_size"]
    else:
        assert new["propensity"] == old["propensity"]


def test_tune_keeps_a_better_documented_choice_without_force(data_dir, tmp_path, capsys):
    """A short search does not replace an entry whose status records a better validation AUC, nor one
    that records none (the BADR authors' values) — unless --force; the config it read is never written."""
    argv = ["--max-epochs", "1", "--threads", "1", "--data-dir", str(data_dir), "--out", str(tmp_path / "out"),
            "--log", str(tmp_path / "tune.csv"), "--propensity-cache", str(tmp_path / "cache")]
    with pytest.raises(SystemExit) as exc:
        main(["tune", "mf", "coat", "--trials", "1", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "methods.mf records validation AUC 0.7327" in err and "--force" in err
    assert not (tmp_path / "out" / "configs" / "coat.json").exists()
    with pytest.raises(SystemExit) as exc:  # refused before any training
        main(["tune", "badr", "coat", "--trials", "1", *argv])
    assert "records no validation AUC ('tuned by the BADR authors')" in capsys.readouterr().err
    assert main(["tune", "mf", "coat", "--trials", "1", "--force", *argv]) == 0
    written = json.loads((tmp_path / "out" / "configs" / "coat.json").read_text())
    assert written["methods"]["mf"]["status"].startswith("tuned: 1 Optuna TPE trials")


def test_tune_propensity_refused_for_an_override(data_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tune", "badr_dr", "coat", "--trials", "1", "--propensity", "--data-dir", str(data_dir)])
    assert exc.value.code == 2 and "overrides the shared propensity block" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["table3", "--methods", "mf,nope"], "unknown method"),
    (["table3", "--datasets", "coat,movielens"], "'movielens' is neither a built-in data set"),
    (["table3", "--seeds", "0"], "positive integer"),
    (["table3", "--jobs", "0"], "positive integer"),
    (["tune", "mf", "coat", "--trials", "2", "--jobs", "0"], "positive integer"),
    (["tune", "badr", "coat"], "--trials"),
    (["tune", "mf", "coat", "--trials", "2", "--grid", "lr=0.01"], "not allowed with"),
    (["tune", "mf", "coat", "--grid", "lr=fast"], "KEY=V1,V2"),
])
def test_bad_arguments(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_missing_data_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CVR_DATA_DIR", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["table3", "--datasets", "coat", "--methods", "mf", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "CVR_DATA_DIR" in capsys.readouterr().err


def test_diverged_run_is_recorded_not_fatal(data_dir, tmp_path, monkeypatch):
    import reproduce.train

    def diverge(*args, **kwargs):
        raise FloatingPointError("training loss is nan at epoch 3; lower the learning rates")

    monkeypatch.setattr(reproduce.train, "run_one", diverge)
    out = tmp_path / "run"
    assert main(["table3", "--datasets", "coat", "--methods", "dr_jl", "--seeds", "1", "--max-epochs", "1",
                 "--data-dir", str(data_dir), "--out", str(out)]) == 0
    rows = _rows(out / "results.csv")
    assert [(r["method"], r["status"]) for r in rows] == [("dr_jl", "diverged")]
    assert "| DR-JL | diverged |" in (out / "table3.md").read_text()


def test_table_only_renders_without_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["table3", "--datasets", "kuairec", "--methods", "badr", "--table-only", "--out", str(out)]) == 0
    table = (out / "table3.md").read_text()
    assert "## KuaiRec" in table and "NDCG@50" in table and "| BADR | not run | 0.8391 ± 0.0011" in table
    assert not (out / "results.csv").exists()


def test_results_file_of_older_version_is_migrated(tmp_path):
    from reproduce.table import append_result

    path = tmp_path / "results.csv"
    path.write_text("dataset,method,seed,auc,ndcg,recall,k,seconds\ncoat,mf,2024,0.7,0.6,0.5,5,1.0\n")
    append_result(path, {"dataset": "coat", "method": "ips", "seed": 2024, "auc": 0.71, "ndcg": 0.6, "recall": 0.5,
                         "k": 5, "seconds": 2.0, "status": "ok"})
    rows = read_results(path)
    assert list(rows[0]) == list(COLUMNS) and [r["method"] for r in rows] == ["mf", "ips"]
    assert rows[1]["status"] == "ok" and rows[0]["auc"] == 0.7
