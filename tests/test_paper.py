"""The BADR paper's other experiments (``python -m reproduce table4 ... fig4 | all``): every
command end to end on a tiny budget (Coat, one seed, one or two epochs), the files each writes,
and the claims' verdicts and the figure's baseline choice on made-up runs."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from reproduce import experiments as E
from reproduce import report as R
from reproduce.__main__ import main
from reproduce.config import DataSource
from reproduce.methods import METHODS
from reproduce.published import SAMPLING_RATES, TABLE4, TABLE6, TABLE45_ROWS
from reproduce.table import read_history, read_results, run_key

COMMANDS = ("table3", "table4", "table5", "table6", "fig1", "fig2", "fig3", "fig4")


pytestmark = pytest.mark.usefixtures("restore_runtime")


@pytest.fixture(scope="module")
def all_out(tmp_path_factory, data_dir) -> Path:
    """``all`` on Coat with one seed and one epoch per run (train once, read by the tests below)."""
    out = tmp_path_factory.mktemp("paper")
    assert main(["all", "--datasets", "coat", "--seeds", "1", "--max-epochs", "1", "--jobs", "1", "--threads", "1",
                 "--data-dir", str(data_dir), "--out", str(out)]) == 0
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_all_writes_every_table_and_figure_and_the_report(all_out):
    for name in COMMANDS:
        assert (all_out / f"{name}.md").is_file(), name
        if name != "table3":
            assert _csv(all_out / f"{name}.csv"), name  # the numbers behind it
    for name in ("fig1", "fig2", "fig3", "fig4"):
        png = (all_out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name
    report = (all_out / "REPORT.md").read_text()
    for heading in ("Table 3", "Table 4", "Table 5", "Table 6", "Figure 1", "Figure 2", "Figure 3", "Figure 4"):
        assert heading in report
    assert "](fig2.png)" in report
    # each run once, however many parts use it, and counted in the part that trained it
    rows = read_results(all_out / "results.csv")
    assert len({run_key(r) for r in rows}) == len(rows)
    times = re.findall(r"^\| (\w+) \| (\d+) \| (\d+) \| (\d+) \|$", report, flags=re.M)
    assert [t[0] for t in times] == list(COMMANDS)
    assert sum(int(t[2]) for t in times) == len(rows) and all(int(t[2]) <= int(t[1]) for t in times)


def test_sparsity_runs_subsample_and_record_the_test_loss(all_out):
    rows = [r for r in read_results(all_out / "results.csv") if r["method"] == "badr" and r["batch_size"] == 128]
    assert sorted({r["train_fraction"] for r in rows}) == sorted({1.0, *SAMPLING_RATES})
    history = read_history(all_out / "history.csv")
    for r in rows:
        fit = [h for h in history[run_key(r)] if h["stage"] == "fit"]
        assert fit and all(h["test_loss"] is not None and h["test_loss"] > 0 for h in fit)
    table = (all_out / "table4.md").read_text()
    assert "## 80% of the training pairs" in table and "## 20% of the training pairs" in table
    assert f"| {TABLE4['MF'][0][0]:.4f}" in table  # the paper's MF AUC at 80 %, beside ours
    registered = {m.table3_row for m in METHODS.values()}
    unregistered = [row for row, t3 in TABLE45_ROWS.items() if t3 not in registered]
    assert all(f"| {row} | not implemented" in table for row in unregistered)  # e.g. GPL until it is added
    assert "| DCE-TDR | not implemented" not in table  # registered (tests/test_dce_tdr.py)
    assert "Impv-MF (%)" in table and "Impv (%)" in table
    assert "## The paper's claims" in table and ("**holds**" in table or "**does not hold**" in table)


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_resumes_from_the_shared_results(all_out, data_dir, capsys, name):
    """Every command on the folder ``all`` filled trains nothing and rewrites its files."""
    (all_out / f"{name}.md").unlink()
    assert main([name, "--datasets", "coat", "--seeds", "1", "--max-epochs", "1", "--jobs", "1",
                 "--data-dir", str(data_dir), "--out", str(all_out)]) == 0
    err = capsys.readouterr().err
    assert "to train)" not in err or "(0 of" in err
    assert "seed 2024: ok" not in err  # no run trained again
    if name != "table3":  # Table 3's own command; the others log their bounds (a resumed job is timed from its log)
        assert f"== {name}: 0 run(s) trained in " in err
    assert (all_out / f"{name}.md").is_file()


def test_fig3_plans_every_batch_size_and_the_full_batch(all_out):
    rows = [r for r in _csv(all_out / "fig3.csv") if r["dataset"] == "coat"]
    sizes = [int(r["batch_size"]) for r in rows]
    assert sizes[:6] == [32, 64, 128, 256, 512, 1024] and rows[-1]["full"] == "True"
    assert sizes[-1] > 1024  # every clicked training pair of Coat


def test_table6_generates_its_folders_and_reports_the_closest_setting(tmp_path, monkeypatch):
    """Without --datasets, table6 simulates its settings into OUT/data (here from the low-rank
    source, which needs no download) and compares our MF / BADR with both paper columns."""
    monkeypatch.setattr(E, "TABLE6_SETTINGS", (E.SimSetting("sim-a", {"alpha": 0.5}, "test", "lowrank"),
                                               E.SimSetting("sim-b", {"density": 0.15}, "test", "lowrank")))
    out = tmp_path / "t6"
    assert main(["table6", "--seeds", "1", "--max-epochs", "1", "--jobs", "1", "--out", str(out)]) == 0
    assert (out / "data" / "sim-a" / "summary.json").is_file() and (out / "data" / "sim-b" / "meta.json").is_file()
    text = (out / "table6.md").read_text()
    assert "## Ours: sim-a (mean propensity 0.09" in text and "Precision@50" in text
    assert "Closest setting to each paper column" in text and "15.11%/DCE-TDR: sim-" in text
    assert f"| DCE-TDR | 15.11% | {TABLE6['DCE-TDR'][0][7]:.4f} ± " in text  # the paper's row, beside ours
    rows = read_results(out / "results.csv")
    assert {r["method"] for r in rows} == {"mf", "dr_jl", "dce_tdr", "badr"}
    assert all(0 <= r["precision@5"] <= 1 and 0 <= r["ndcg@50"] <= 1 for r in rows)


# ---------------------------------------------------------------- verdicts on made-up finished runs
def _fake(rows: list[dict], history: dict | None = None) -> E.Finished:
    return E.Finished({run_key(r): r for r in rows}, history or {})


def _row(method, seed, auc, rate=1.0, ds="yahoo", sig="s"):
    return {"dataset": ds, "method": method, "seed": seed, "signature": f"{sig}{rate}", "auc": auc, "ndcg": auc,
            "recall": auc, "k": 5, "status": "ok", "train_fraction": rate}


def _sparsity(values: dict[str, float], tmp_path) -> str:
    rows, keys = [], {}
    for rate in (1.0, *SAMPLING_RATES):
        for method, auc in values.items():
            for seed in (1, 2, 3):
                r = _row(method, seed, auc - 0.02 * (1 - rate) + 0.0005 * seed, rate)
                rows.append(r)
                keys.setdefault(rate, set()).add(run_key(r))
    opts = E.Options(out=tmp_path)
    R.render_sparsity(_fake(rows), keys, opts, "table4")
    return (tmp_path / "table4.md").read_text()


def test_the_sparsity_claim_holds_only_when_badr_beats_every_baseline(tmp_path):
    text = _sparsity({"mf": 0.70, "dr_jl": 0.71, "mrdr": 0.712, "dr_bias": 0.711, "badr": 0.72}, tmp_path)
    assert "every metric*: **holds** (12 rate-metric cells checked)" in text
    assert "| Impv-MF (%) | 2.8" in text  # (0.7216 - 0.7016) / 0.7016 at 80 %
    text = _sparsity({"mf": 0.70, "dr_jl": 0.71, "mrdr": 0.725, "dr_bias": 0.711, "badr": 0.72}, tmp_path)
    assert "every metric*: **does not hold**" in text and "MRDR" in text.split("exceptions:")[1]


def test_sparsity_table_shows_where_badr_stopped_before_converging(tmp_path):
    """BADR's validation AUC leaves chance at epoch 10 on the full data and trains 20 epochs after;
    at 40 % it leaves chance at epoch 25 and stops at 30, still rising: only 40 % is named."""
    rows, keys, history = [], {}, {}
    for rate, left, stop in ((1.0, 10, 30), (0.8, 12, 30), (0.4, 25, 30)):
        for seed in (1, 2):
            r = {**_row("badr", seed, 0.7, rate), "max_epochs": 100}
            rows.append(r)
            keys.setdefault(rate, set()).add(run_key(r))
            history[run_key(r)] = [{"stage": "fit", "epoch": e, "val_auc": 0.5 if e < left else 0.5 + 0.01 * (e - left + 5)}
                                   for e in range(1, stop + 1)]
    R.render_sparsity(_fake(rows, history), keys, E.Options(out=tmp_path), "table4")
    text = (tmp_path / "table4.md").read_text()
    assert "| 100% | 30.0 (100) | 10.0 | 20.0 | 0.7500 | +0.0100 | 2 of 2 |" in text
    assert "| 40% | 30.0 (100) | 25.0 | 5.0 | 0.6000 | +0.0100 | 2 of 2 |" in text
    assert "on the full data (20.0), or never left it: 40%. There" in text


def test_fig2_picks_the_baseline_by_validation_auc_not_by_the_test_loss(tmp_path):
    rows, history, keys = [], {}, {"yahoo": {1.0: set()}}
    # dr_jl has the better validation AUC; mrdr the lower test loss: dr_jl must be drawn.
    for method, val_auc, test_loss in (("badr", 0.80, 0.40), ("dr_jl", 0.75, 0.60), ("mrdr", 0.70, 0.30)):
        r = _row(method, 1, 0.7)
        rows.append(r)
        keys["yahoo"][1.0].add(run_key(r))
        history[run_key(r)] = [{"stage": "fit", "epoch": e, "val_auc": val_auc, "test_loss": test_loss + 0.1 / e}
                               for e in (1, 2, 3)]
    R.render_fig2(_fake(rows, history), keys, E.Options(out=tmp_path))
    text = (tmp_path / "fig2.md").read_text()
    assert "strongest baseline by validation AUC at full data: DR-JL" in text
    assert "**holds**: Yahoo! R3 100% 0.4333 vs 0.6333" in text
    drawn = {r["method"] for r in csv.DictReader(open(tmp_path / "fig2.csv"))}
    assert drawn == {"badr", "dr_jl"}


def test_fig3_verdicts(tmp_path):
    keys, rows = {"yahoo": {}}, []
    for b, auc in ((256, 0.70), (1024, 0.73), (4096, 0.72), (300_000, 0.69)):
        r = {**_row("badr", 1, auc, sig=f"b{b}"), "batch_size": b}
        rows.append(r)
        keys["yahoo"][b] = {run_key(r)}
    R.render_fig3(_fake(rows), keys, E.Options(out=tmp_path))
    text = (tmp_path / "fig3.md").read_text()
    assert "*Worst AUC at the full batch*: **holds**" in text and "best at 1,024 (0.7300)" in text
    assert "Coat, as the paper says for it): **holds**" in text


def test_table6_gain_claims_judge_only_the_high_propensity_settings():
    """Claims 2 and 3 of Section 4.8 compare BADR's relative AUC gain on the simulated data with
    the real data's (Table 3's runs); a setting below Coat's mean propensity is not judged."""
    real = [_row(m, 1, auc) for m, auc in (("mf", 0.70), ("dce_tdr", 0.71), ("badr", 0.73))]  # +4.3 %, +2.8 %
    means = {"sim-high": {"mf": {"auc": 0.88}, "dce_tdr": {"auc": 0.885}, "badr": {"auc": 0.89}},  # +1.1 %, +0.6 %
             "sim-low": {"mf": {"auc": 0.60}, "dce_tdr": {"auc": 0.60}, "badr": {"auc": 0.70}}}  # +16.7 %
    claims = R._table6_claims(_fake(real), means, {"sim-high": 0.15, "sim-low": 0.012})
    assert "BADR over MF on the simulated data than on the real data* (the settings with a mean propensity" in claims[1]
    assert "not judged: sim-low): **holds**" in claims[1] and "**holds**" in claims[2]
    assert "**does not hold**" in R._table6_claims(_fake(real), means, {"sim-high": 0.15, "sim-low": 0.10})[1]


def test_paired_t_test():
    a = {s: 0.7 + 0.001 * s for s in range(5)}
    assert R._paired_p(a, {s: v - 0.01 + 0.0001 * (s % 2) for s, v in a.items()}) < 0.05
    rng = np.random.default_rng(0)
    b = {s: v + rng.normal(0, 0.01) for s, v in a.items()}
    assert R._paired_p(a, b) > 0.05 and R._paired_p(a, {0: 1.0}) is None


def test_bad_experiment_name_and_datasets_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown experiment"):
        E.run_experiments(["table9"], E.Options(out=tmp_path))
    with pytest.raises(SystemExit):
        main(["fig3", "--datasets", str(tmp_path / "absent"), "--out", str(tmp_path)])
    assert "--datasets" in capsys.readouterr().err


def test_a_run_at_chance_level_is_not_ok(monkeypatch, capsys):
    """A model whose final validation AUC is within CHANCE_MARGIN of 0.5 is recorded as "chance"."""
    import reproduce.train as T

    for val_auc, status in ((0.52, "chance"), (0.47, "chance"), (0.56, "ok"), (0.40, "ok")):
        monkeypatch.setattr(T, "run_one", lambda *a, **k: {"auc": 0.5, "val_auc": val_auc})
        data = type("D", (), {"name": "toy"})()
        method = type("M", (), {"name": "mf"})()
        assert T.run_or_diverged(data, None, method, {}, 1)["status"] == status
    assert "within 0.05 of chance" in capsys.readouterr().err
    rows = [{**_row("mf", s, 0.5), "status": "chance"} for s in (1, 2)] + [_row("badr", 1, 0.8)]
    assert R._seeds(rows[:2]) == "2 (2 at chance level)" and R._seeds(rows[2:]) == "1"


def test_all_plans_the_shared_runs_once_with_the_test_loss_figure_2_needs(tmp_path, monkeypatch, data_dir):
    """In ``all``, Table 3 trains first the full-data runs Figure 2 reads: it must record their
    test loss then, or Figure 2 would train them again."""
    first = {}  # run key -> the run as the first part holding it trains it

    def fake_execute(ctx, on_row=None):
        for key, run in ctx.plan.runs.items():
            first.setdefault(key, run)
        return 0

    monkeypatch.setattr(E, "execute", fake_execute)
    E.run_experiments(["table3", "fig2"], E.Options(out=tmp_path, data_dir=str(data_dir),
                                                     datasets=(DataSource("coat"),), seeds=1))
    full = [run for run in first.values() if run.train_fraction == 1.0]
    assert {run.method.name for run in full if run.record_test_loss} == {"mf", "dr_jl", "mrdr", "dr_bias", "tdr_cl",
                                                                            "dr_mse_gpl", "dce_tdr", "badr"}
    assert not any(run.record_test_loss for run in full if run.method.name in ("ips", "snips", "badr_v"))


def test_ranking_metrics_agree_with_scikit_learn():
    """NDCG@K against scikit-learn's ndcg_score (users with a positive item), AUC against
    roc_auc_score, Precision@K against a count."""
    from sklearn.metrics import ndcg_score, roc_auc_score

    from reproduce.metrics import auc, ranking_at_k

    rng = np.random.default_rng(3)
    n_users, n_items = 40, 30
    scores = rng.random((n_users, n_items))
    labels = (rng.random((n_users, n_items)) < 0.2).astype(int)
    labels[labels.sum(1) == 0, 0] = 1  # every user has a positive item
    users = np.repeat(np.arange(n_users), n_items)
    got = ranking_at_k(users, scores.ravel(), labels.ravel(), [5, 20])
    for k in (5, 20):
        assert got[k]["ndcg"] == pytest.approx(ndcg_score(labels, scores, k=k))
        top = np.argsort(-scores, axis=1)[:, :k]
        assert got[k]["precision"] == pytest.approx(np.take_along_axis(labels, top, 1).sum(1).mean() / k)
    assert auc(scores.ravel(), labels.ravel()) == pytest.approx(roc_auc_score(labels.ravel(), scores.ravel()))


def test_tune_at_a_sampling_rate(data_dir, tmp_path, monkeypatch):
    """``tune --train-fraction F`` trains each validation run on F of the clicked pairs (drawn by
    its seed), as a run of Tables 4 / 5 at that rate; its runs are other runs than at full data."""
    import reproduce.tune as T

    sizes = []
    real = T.run_or_diverged
    monkeypatch.setattr(T, "run_or_diverged", lambda data, *a, **k: sizes.append(len(data.x_train)) or real(data, *a, **k))
    argv = ["tune", "mf", "coat", "--trials", "1", "--max-epochs", "1", "--dry-run", "--data-dir", str(data_dir),
            "--out", str(tmp_path)]
    assert main(argv + ["--train-fraction", "0.5"]) == 0 and main(argv) == 0
    assert sizes[0] == round(0.5 * sizes[1])
    assert len({r["signature"] for r in read_results(tmp_path / "tune" / "coat-mf.csv")}) == 2


def test_runs_at_a_rate_read_the_values_tuned_at_that_rate(data_dir, tmp_path):
    """``tune --train-fraction F`` writes DATASET@F.json; the runs at rate F read it, the others not."""
    import shutil

    from reproduce import config as C

    configs = tmp_path / "configs"
    shutil.copytree(C.CONFIG_DIR, configs)
    assert main(["tune", "mf", "coat", "--train-fraction", "0.5", "--grid", "lr=0.0123", "--max-epochs", "1",
                 "--data-dir", str(data_dir), "--config-dir", str(configs), "--out", str(tmp_path), "--force"]) == 0
    raw = json.loads((configs / "coat@0.5.json").read_text())
    assert "tuned: grid" in raw["methods"]["mf"]["status"]
    raw["methods"]["mf"]["lr"] = 0.0777  # a value no other config holds
    (configs / "coat@0.5.json").write_text(json.dumps(raw))
    written = raw["methods"]["mf"]
    ctx = E.Context(E.Options(out=tmp_path, config_dir=str(configs), seeds=1))
    at_rate = ctx.plan.runs[next(iter(ctx.runs(DataSource("coat"), [METHODS["mf"]], train_fraction=0.5)))]
    full = ctx.plan.runs[next(iter(ctx.runs(DataSource("coat"), [METHODS["mf"]])))]
    other = ctx.plan.runs[next(iter(ctx.runs(DataSource("coat"), [METHODS["mf"]], train_fraction=0.8)))]
    assert at_rate.params["lr"] == written["lr"] and full.params == other.params == C.load_config("coat").method_params(
        METHODS["mf"])


def test_rows_written_before_the_chance_check_get_it_from_their_history(tmp_path):
    from reproduce.table import COLUMNS, append_result, write_history

    row = {**_row("mf", 2024, 0.51), "val_auc": ""}  # a row of an older version: no val_auc
    append_result(tmp_path / "results.csv", row)
    write_history(tmp_path / "history.csv", row, [{"stage": "fit", "epoch": 1, "val_auc": 0.52}])
    assert "val_auc" in COLUMNS
    assert next(iter(E.Finished.read(tmp_path).rows.values()))["status"] == "chance"


@pytest.mark.parametrize("argv, match", [
    (["tune", "mf", "coat", "--trials", "1", "--train-fraction", "0"], "(0, 1]"),
    (["tune", "mf", "coat", "--trials", "1", "--train-fraction", "1.5"], "(0, 1]"),
    (["table4", "--seeds", "0"], "positive integer"),
    (["fig3", "--jobs", "-1"], "positive integer"),
    (["table6", "--datasets", "no/such/folder"], "neither a built-in data set"),
])
def test_bad_options_of_the_new_commands(argv, match, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path)])
    assert exc.value.code == 2 and match in capsys.readouterr().err
