"""The semi-synthetic data set of the BADR paper, Section 4.8 (``simulate``)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import simulate
from simulate.protocol import EXPONENTS

REPO = Path(__file__).resolve().parents[1]
SPLIT_FILES = {f"{xy}_{name}_3_10.txt" for xy in "xy" for name in ("train", "val", "test")}
OUTPUT_FILES = SPLIT_FILES | {"meta.json", "summary.json", "labels.npy", "propensities.npy",
                              "clicks.npy", "ratings.npy"}
SUMMARY_KEYS = {"density", "propensity_min", "propensity_mean", "propensity_max", "cvr_clicked",
                "cvr_all", "alpha", "k", "seed", "mf_heldout_rmse"}


@pytest.fixture(scope="module")
def ml100k_truth(data_dir):
    return simulate.ground_truth("ml100k", data_dir)


@pytest.fixture(scope="module")
def lowrank_truth():
    return simulate.ground_truth("lowrank")


@pytest.fixture(scope="module")
def lowrank_sim(lowrank_truth):
    return simulate.draw(lowrank_truth, density=0.15, seed=1)


def _within_3_se(summary):
    return abs(summary["density"] - summary["propensity_mean"]) <= 3 * summary["density_se"]


@pytest.mark.parametrize("setting, mean, mean_tol, p_min, min_tol", [
    ({"density": 0.15}, 0.150, 0.002, 0.113, 0.005),
    ({"density": 0.151}, 0.151, 0.002, 0.113, 0.005),  # Table 6, right half
    ({"alpha": 0.5}, 0.094, 0.003, 0.0625, 1e-12),  # Table 6, left half
])
def test_table6_settings_on_ml100k(ml100k_truth, setting, mean, mean_tol, p_min, min_tol):
    summary = simulate.draw(ml100k_truth, **setting, seed=0).summary
    assert summary["propensity_mean"] == pytest.approx(mean, abs=mean_tol)
    assert summary["propensity_min"] == pytest.approx(p_min, abs=min_tol)
    assert summary["k"] == 1.0
    assert _within_3_se(summary)


def test_ml100k_completion(data_dir, ml100k_truth):
    users, items, ratings = simulate.read_ml100k(data_dir)
    assert len(ratings) == 100_000 and users.max() == 942 and items.max() == 1681
    assert ml100k_truth.ratings.shape == (943, 1682) and ml100k_truth.ratings.dtype == np.int8
    assert 0.85 < ml100k_truth.mf_heldout_rmse < 0.95


def test_yahoo_marginals_equal_the_constant(data_dir):
    recomputed = simulate.yahoo_r3_marginals(data_dir)
    assert [round(m, 4) for m in recomputed] == list(simulate.YAHOO_R3_MARGINALS)


def test_quantize_matches_marginals_exactly():
    scores = np.random.default_rng(0).normal(size=(31, 17))
    ratings = simulate.quantize(scores, simulate.YAHOO_R3_MARGINALS)
    shares = np.array(simulate.YAHOO_R3_MARGINALS) / sum(simulate.YAHOO_R3_MARGINALS)
    expected = np.diff(np.rint(np.cumsum(shares) * scores.size), prepend=0)
    np.testing.assert_array_equal(np.bincount(ratings.ravel(), minlength=6)[1:], expected)
    order = np.argsort(scores, axis=None)
    assert np.all(np.diff(ratings.ravel()[order]) >= 0)  # monotone in the score


def test_lowrank_truth(lowrank_truth):
    shares = np.bincount(lowrank_truth.ratings.ravel(), minlength=6)[1:] / lowrank_truth.ratings.size
    np.testing.assert_allclose(shares, simulate.YAHOO_R3_MARGINALS, atol=1e-4)
    assert lowrank_truth.mf_heldout_rmse < 0.7


def test_propensities_and_labels_follow_the_protocol(lowrank_sim):
    s = lowrank_sim.summary
    expected = s["k"] * s["alpha"] ** np.minimum(6 - lowrank_sim.ratings.astype(np.int64), 4)
    np.testing.assert_array_equal(lowrank_sim.propensities, expected)
    np.testing.assert_array_equal(lowrank_sim.labels, lowrank_sim.ratings >= 3)
    assert s["propensity_mean"] == pytest.approx(0.15, abs=1e-12)
    assert s["propensity_min"] == pytest.approx(0.113, abs=0.005)
    assert _within_3_se(s)
    assert s["cvr_all"] == pytest.approx(lowrank_sim.labels.mean())
    assert s["cvr_clicked"] == pytest.approx(lowrank_sim.labels[lowrank_sim.clicks].mean())


def test_splits_partition_the_matrix(lowrank_sim):
    flat = {name: x[:, 0] * 1682 + x[:, 1] for name, (x, _) in lowrank_sim.splits.items()}
    np.testing.assert_array_equal(flat["train"], np.flatnonzero(lowrank_sim.clicks))
    unclicked = np.union1d(flat["val"], flat["test"])
    np.testing.assert_array_equal(unclicked, np.flatnonzero(~lowrank_sim.clicks))
    assert len(flat["val"]) + len(flat["test"]) == len(unclicked)
    assert len(flat["val"]) == round(0.1 * len(unclicked))
    for name, (_, y) in lowrank_sim.splits.items():
        np.testing.assert_array_equal(y, lowrank_sim.labels.ravel()[flat[name]])


def test_cli_matches_api_and_seeds(tmp_path, lowrank_truth):
    cli = tmp_path / "cli"
    run = subprocess.run([sys.executable, "-m", "simulate", "--source", "lowrank", "--density", "0.15",
                          "--seed", "1", "--out", str(cli)], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "held-out RMSE" in run.stdout and "propensity_mean" in run.stdout
    assert {p.name for p in cli.iterdir()} == OUTPUT_FILES

    same = simulate.write(simulate.draw(lowrank_truth, density=0.15, seed=1), tmp_path / "api")
    for name in OUTPUT_FILES:
        assert (cli / name).read_bytes() == (same / name).read_bytes(), name
    meta = json.loads((cli / "meta.json").read_text())
    assert {"n_users": 943, "n_items": 1682, "threshold": 3, "val_pct": 10}.items() <= meta.items()
    assert SUMMARY_KEYS <= json.loads((cli / "summary.json").read_text()).keys()
    x_train = np.loadtxt(cli / "x_train_3_10.txt", dtype=np.int64)
    np.testing.assert_array_equal(np.load(cli / "clicks.npy")[x_train[:, 0], x_train[:, 1]], True)

    other = simulate.draw(lowrank_truth, density=0.15, seed=2)
    assert not np.array_equal(other.clicks, np.load(cli / "clicks.npy"))
    np.testing.assert_array_equal(other.labels, np.load(cli / "labels.npy"))


def test_val_pct_names_the_files(tmp_path, lowrank_truth):
    sim = simulate.draw(lowrank_truth, alpha=0.5, seed=0, val_pct=20)
    out = simulate.write(sim, tmp_path)
    assert json.loads((out / "meta.json").read_text())["val_pct"] == 20
    for name, (x, _) in sim.splits.items():
        lines = (out / f"y_{name}_3_20.txt").read_text().splitlines()
        assert len(lines) == len(x)
    assert sim.summary["n_val"] == round(0.2 * (sim.summary["n_val"] + sim.summary["n_test"]))
    assert not list(out.glob(".*.tmp"))


def test_propensity_settings_solve_the_missing_one(lowrank_truth):
    ratings = lowrank_truth.ratings
    shares = np.bincount(ratings.ravel(), minlength=6)[1:] / ratings.size
    alpha, k = simulate.resolve_propensity(ratings, density=0.2, alpha=0.6)
    assert alpha == 0.6 and k * np.sum(shares * 0.6 ** EXPONENTS) == pytest.approx(0.2)
    alpha, k = simulate.resolve_propensity(ratings, density=0.1, k=0.8)
    assert k == 0.8 and k * np.sum(shares * alpha ** EXPONENTS) == pytest.approx(0.1)
    assert simulate.resolve_propensity(ratings) == (0.5, 1.0)


@pytest.mark.parametrize("setting, flag", [
    ({"density": 0.0}, "--density"), ({"density": 1.5}, "--density"), ({"density": math.nan}, "--density"),
    ({"alpha": 0.0}, "--alpha"), ({"alpha": 1.2}, "--alpha"), ({"k": -1.0}, "--k"),
    ({"density": 0.1, "alpha": 0.5, "k": 1.0}, "at most two"),
    ({"alpha": 0.9, "k": 2.0}, "--k 2"), ({"density": 0.6, "alpha": 0.3}, "needs k"),
    ({"density": 0.5, "k": 0.4}, "exceeds --k"),
])
def test_bad_propensity_settings(lowrank_truth, setting, flag):
    with pytest.raises(ValueError, match=flag):
        simulate.resolve_propensity(lowrank_truth.ratings, **setting)


@pytest.mark.parametrize("kwargs, flag", [
    ({"val_pct": 0}, "--val-pct"), ({"val_pct": 100}, "--val-pct"), ({"val_pct": 12.5}, "--val-pct"),
    ({"marginals": (0.5, 0.5)}, "--marginals"), ({"marginals": (0.5, 0.5, 0.5, 0.0, 0.0)}, "--marginals"),
    ({"source": "ml1m"}, "--source"),
])
def test_bad_generate_arguments(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        simulate.generate(**{"source": "lowrank", **kwargs})


@pytest.mark.parametrize("bad_line, complaint", [
    ("1\t2\t3", "expected 4 .* got 3"),
    ("1\t2\t3\t4\t5", "expected 4 .* got 5"),
    ("1\tx\t3\t881250949", "non-integer"),
    ("1\t2\t3.5\t881250949", "non-integer"),
    ("0\t2\t3\t881250949", "user id 0 outside 1..943"),
    ("944\t2\t3\t881250949", "user id 944 outside 1..943"),
    ("1\t1683\t3\t881250949", "item id 1683 outside 1..1682"),
    ("1\t2\t6\t881250949", "rating 6 outside 1..5"),
    ("196\t242\t4\t881250949", "user 196 rated item 242 already on line 1"),
])
def test_malformed_u_data(tmp_path, bad_line, complaint):
    path = tmp_path / "ml-100k" / "u.data"
    path.parent.mkdir()
    path.write_text(f"196\t242\t3\t881250949\n{bad_line}\n186\t302\t3\t891717742\n")
    with pytest.raises(ValueError, match=rf"u\.data, line 2: {complaint}"):
        simulate.read_ml100k(tmp_path)


def test_missing_u_data_says_where_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="u.data not found") as missing:
        simulate.read_ml100k(tmp_path)
    for hint in (simulate.ML100K_URL, "--data-dir", "CVR_DATA_DIR", "--source lowrank"):
        assert hint in str(missing.value)
    monkeypatch.delenv("CVR_DATA_DIR", raising=False)
    with pytest.raises(ValueError, match="--data-dir or set CVR_DATA_DIR") as unset:
        simulate.generate("ml100k")
    assert simulate.ML100K_URL in str(unset.value)
