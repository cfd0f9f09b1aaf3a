"""``python -m reproduce escm2`` (:mod:`reproduce.escm2`): a tiny end-to-end run, resume, the metric
and Table VI helpers against direct numpy transcriptions, selection blind to the test split, and
bad input rejected by name."""
import csv
import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import reproduce.__main__ as cli
from reproduce import escm2
from simulate import ctcvr

# The commands set process-wide state (threads, flush-to-zero): undone after each test, for the
# Hypothesis tests that follow (they need IEEE subnormals).
pytestmark = pytest.mark.usefixtures("restore_runtime")

# A small world with high rates: 20k exposures hold ~800 conversions, so every AUC is defined.
SETTINGS = dict(n_exposures=20_000, n_users=500, n_items=300, ctr=0.2, cvr=0.2, chunk_size=ctcvr.BLOCK)
METHODS = "naive,esmm,escm2_ips,escm2_dr"
ARGS = ["--seeds", "1", "--max-epochs", "2", "--batch-size", "512", "--lr", "1e-3", "--threads", "1", "--jobs", "1",
        "--lambda-c-grid", "0,0.1", "--lambda-g-grid", "1,2", "--methods", METHODS]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("escm2") / "ctcvr"
    ctcvr.write_ctcvr(ctcvr.Settings(**SETTINGS), folder)
    return folder


@pytest.fixture(scope="module")
def job(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("escm2-out")
    assert cli.main(["escm2", "--data", str(data), "--out", str(out), *ARGS]) == 0
    return out / "escm2"


def _csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def test_end_to_end_writes_every_file_with_its_columns(job):
    names = {p.name for p in job.iterdir() if not p.name.startswith(".")}
    assert {"results.csv", "history.csv", "tables.md", "ieb.csv", "ieb.md", "fig6.csv", "fig6.png", "fig7.csv",
            "fig7.png"} <= names
    header, rows = _csv(job / "results.csv")
    assert tuple(header) == escm2.RESULT_COLUMNS
    # 4 methods (esmm, escm2_ips, escm2_dr also serve Table VI) + Figure 6's lambda_c = 0 for IPS and DR
    # + Figure 7's lambda_g = 2 for IPS and DR; lambda_c = 0.1 and lambda_g = 1 are the main runs.
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        for col in ("cvr_auc", "cvr_ks", "cvr_f1", "cvr_recall", "ctcvr_auc", "ctcvr_ks", "ctcvr_f1", "ctcvr_recall",
                    "cvr_auc_exposures", "ieb_train_estimate", "ieb_test_true", "seconds_per_epoch",
                    "exposures_per_second"):
            assert 0 <= float(r[col]) < float("inf"), (col, r[col])
        assert 1 <= int(r["best_epoch"]) <= int(r["epochs"]) <= 2
    header, hist = _csv(job / "history.csv")
    assert tuple(header) == escm2.HISTORY_COLUMNS
    assert len(hist) == sum(int(r["epochs"]) for r in rows)
    assert all(h["val_cvr_auc"] and h["train_loss"] for h in hist)
    assert tuple(_csv(job / "ieb.csv")[0]) == escm2.IEB_COLUMNS
    _, ieb = _csv(job / "ieb.csv")
    assert {(r["method"], r["subset"]) for r in ieb} == {(m, s) for m in ("Naive", "ESMM", "ESCM2-IPS", "ESCM2-DR")
                                                         for s in ("train", "test")}
    for fig, key, grid in (("fig6", "lambda_c", {0.0, 0.1}), ("fig7", "lambda_g", {1.0, 2.0})):
        header, rows6 = _csv(job / f"{fig}.csv")
        assert header[:3] == ["method", key, "seeds"] and "cvr_auc_mean" in header and "ctcvr_ks_std" in header
        assert {(r["method"], float(r[key])) for r in rows6} == {(m, v) for m in ("ESCM2-IPS", "ESCM2-DR") for v in grid}
        assert all(r["seeds"] == "1" and r["cvr_auc_mean"] for r in rows6)
        assert (job / f"{fig}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = (job / "tables.md").read_text()
    assert "Table II" in tables and "Table III" in tables and "AUC over all exposures" in tables
    assert all(f"| {label} | 0." in tables for label in ("Naive", "ESMM", "ESCM2-IPS", "ESCM2-DR"))
    assert "(paper)" not in tables  # the paper's numbers are on other data: not beside ours
    ieb_md = (job / "ieb.md").read_text()
    assert "Proposition 1" in ieb_md and ("**holds**" in ieb_md or "**does not hold**" in ieb_md)


def test_resume_trains_nothing(job, data, monkeypatch, capsys):
    before = (job / "results.csv").read_bytes()

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(escm2, "train_run", fail)
    assert cli.main(["escm2", "--data", str(data), "--out", str(job.parent), *ARGS]) == 0
    assert "trained 0 run(s)" in capsys.readouterr().err
    assert (job / "results.csv").read_bytes() == before


def test_ieb_numbers_against_numpy(data, job):
    test = ctcvr.load_ctcvr(data, split="test")
    p_cvr = np.random.default_rng(0).random(len(test)).astype(np.float32)
    got = escm2.ieb_numbers(test, p_cvr, len(test))
    click = np.load(data / "click.npy")[test.start:] == 1
    conv = np.load(data / "conversion.npy")[test.start:]
    p_true = np.load(data / "true_p_conversion.npy")[test.start:].astype(np.float64)
    assert got["label"] == pytest.approx(conv[click].sum() / click.sum(), rel=1e-12)
    assert got["true_clicks"] == pytest.approx(p_true[click].mean(), rel=1e-12)
    assert got["true"] == pytest.approx(p_true.mean(), rel=1e-12)
    assert got["estimate"] == pytest.approx(p_cvr.astype(np.float64).mean(), rel=1e-9)
    assert got["bias"] == pytest.approx(got["estimate"] - got["true"], rel=1e-12)
    # The rows of the job: their truth columns are those of the test split and of the train split's start.
    _, rows = _csv(job / "results.csv")
    train = ctcvr.load_ctcvr(data, split="train")
    n = min(len(train), escm2.IEB_TRAIN_ROWS)
    p_train = np.load(data / "true_p_conversion.npy")[:n].astype(np.float64)
    for r in rows:
        assert float(r["ieb_test_true"]) == pytest.approx(p_true.mean(), rel=1e-5)
        assert float(r["ieb_test_label"]) == pytest.approx(conv[click].mean(), rel=1e-5)
        assert float(r["ieb_train_true"]) == pytest.approx(p_train.mean(), rel=1e-5)
        assert float(r["ieb_test_bias"]) == pytest.approx(float(r["ieb_test_estimate"]) - float(r["ieb_test_true"]),
                                                          abs=2e-6)


def _brute_force(scores, labels):
    """Every threshold, every pair: the definitions written out."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    auc = np.mean([(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)])
    ks, f1, recall = 0.0, -1.0, None
    for t in sorted(set(scores), reverse=True):
        pred = scores >= t
        tp, fp = np.sum(pred & (labels == 1)), np.sum(pred & (labels == 0))
        fn = np.sum(~pred & (labels == 1))
        ks = max(ks, tp / len(pos) - fp / len(neg))
        f = 2 * tp / (2 * tp + fp + fn)
        if f > f1:
            f1, recall = f, tp / (tp + fn)
    return {"auc": auc, "ks": ks, "f1": f1, "recall": recall}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_metrics_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random(300) < 0.3).astype(np.uint8)
    scores = np.round(rng.random(300) + 0.4 * labels, 1 + seed)  # seed 0: many ties
    want = _brute_force(scores, labels)
    got = escm2.threshold_metrics(scores, labels)
    for k in ("ks", "f1", "recall"):
        assert got[k] == pytest.approx(want[k], abs=1e-12), k
    assert escm2._scored(scores, labels)["auc"] == pytest.approx(want["auc"], abs=1e-12)


def test_auc_against_scikit_learn_where_installed():
    metrics = pytest.importorskip("sklearn.metrics")  # not installed here: the brute force above stands in
    rng = np.random.default_rng(4)
    labels = (rng.random(2000) < 0.1).astype(np.uint8)
    scores = np.round(rng.random(2000) + 0.3 * labels, 2)
    assert escm2._scored(scores, labels)["auc"] == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    assert escm2.threshold_metrics(scores, labels)["ks"] == pytest.approx(float(np.max(tpr - fpr)), abs=1e-12)


def test_observed_metrics_score_the_right_rows(data):
    val = ctcvr.load_ctcvr(data, split="val")
    rng = np.random.default_rng(3)
    p_ctr, p_cvr = rng.random(len(val)).astype(np.float32), rng.random(len(val)).astype(np.float32)
    got = escm2.observed_metrics(val, p_ctr, p_cvr)
    click, conv = np.asarray(val.click) == 1, np.asarray(val.conversion) == 1
    cvr = escm2.threshold_metrics(p_cvr[click], conv[click])
    ctcvr_ = escm2.threshold_metrics(p_ctr.astype(np.float64) * p_cvr, click & conv)
    assert got["cvr_ks"] == cvr["ks"] and got["cvr_f1"] == cvr["f1"]
    assert got["ctcvr_ks"] == ctcvr_["ks"] and got["ctcvr_recall"] == ctcvr_["recall"]
    sub = rng.choice(np.flatnonzero(click), 150, replace=False)  # brute-force AUC on a subset
    assert escm2._scored(p_cvr[sub], conv[sub])["auc"] == pytest.approx(_brute_force(p_cvr[sub], conv[sub])["auc"])


def test_selection_is_blind_to_test_labels_and_runs_are_deterministic(data, tmp_path):
    """Scrambling the test split's labels and truth changes no choice (epoch, validation score) and
    no training; the same run twice gives the same numbers."""
    torch.set_num_threads(1)
    other = tmp_path / "scrambled"
    shutil.copytree(data, other)
    test = ctcvr.load_ctcvr(data, split="test")
    for name in ("click", "conversion", "true_conversion", "true_p_conversion", "true_p_click"):
        array = np.load(data / f"{name}.npy")
        array[test.start:] = np.random.default_rng(9).permutation(array[test.start:])[::-1]
        np.save(other / f"{name}.npy", array)
    proto = escm2.Protocol(max_epochs=2, batch_size=512, lr=1e-3)
    rows = [escm2.train_run(f, escm2.make_run(escm2.METHODS["escm2_ips"], 2024, proto, f), show_progress=False)
            for f in (data, data, other)]
    assert rows[0]["cvr_auc"] == rows[1]["cvr_auc"] and rows[0]["ieb_test_estimate"] == rows[1]["ieb_test_estimate"]
    assert rows[0]["best_epoch"] == rows[2]["best_epoch"] and rows[0]["val_score"] == rows[2]["val_score"]
    assert [h["train_loss"] for h in rows[0]["history"]] == [h["train_loss"] for h in rows[2]["history"]]
    assert rows[0]["cvr_auc"] != rows[2]["cvr_auc"]  # the test numbers do read the test split


def test_worker_processes_give_the_rows_of_one_process(data, tmp_path):
    """``--jobs 2`` trains in spawned workers (reproduce.runs.in_workers); each row is the one the
    run gives in this process at the same thread count."""
    torch.set_num_threads(1)
    argv = ["escm2", "--data", str(data), "--out", str(tmp_path), "--methods", "esmm", "--seeds", "2", "--parts",
            "tables", "--max-epochs", "1", "--batch-size", "512", "--lr", "1e-3", "--threads", "1", "--jobs", "2"]
    assert cli.main(argv) == 0
    _, rows = _csv(tmp_path / "escm2" / "results.csv")
    assert sorted(int(r["seed"]) for r in rows) == [2024, 2025]
    here = escm2.train_run(data, escm2.make_run(escm2.METHODS["esmm"], 2025, escm2.Protocol(
        max_epochs=1, batch_size=512, lr=1e-3), data), show_progress=False)
    row = next(r for r in rows if r["seed"] == "2025")
    assert row["signature"] == escm2.make_run(escm2.METHODS["esmm"], 2025, escm2.Protocol(
        max_epochs=1, batch_size=512, lr=1e-3), data).signature
    assert float(row["cvr_auc"]) == pytest.approx(here["cvr_auc"], rel=5e-6)  # the CSV keeps 6 digits
    assert float(row["ieb_test_estimate"]) == pytest.approx(here["ieb_test_estimate"], rel=5e-6)


@pytest.mark.parametrize("argv, flag", [
    (["--exposures", "0"], "--exposures"),
    (["--exposures", "ten"], "--exposures"),
    (["--exposures", "5"], "--exposures"),  # too few for three splits
    (["--methods", "esmm,foo"], "--methods"),
    (["--parts", "tables,fig9"], "--parts"),
    (["--lambda-c-grid", "0,-1"], "--lambda-c-grid"),
    (["--lr", "0"], "--lr"),
    (["--seeds", "0"], "--seeds"),
    (["--device", "cuda", "--data", "/nonexistent"], "--device"),  # checked before any data
])
def test_bad_input_is_rejected_by_name(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["escm2", "--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_a_folder_that_is_not_a_ctcvr_log_is_rejected(tmp_path, capsys):
    (tmp_path / "notalog").mkdir()
    with pytest.raises(SystemExit):
        cli.main(["escm2", "--data", str(tmp_path / "notalog"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "--data" in err and "simulate ctcvr" in err
