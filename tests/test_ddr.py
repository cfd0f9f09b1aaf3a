"""D-DR (Ha et al., NeurIPS 2024, Table 3 row "D-DR"): the adjusted propensity f(p_hat)^alpha against
a numpy transcription of eqs. (2) and (5), its limits and bounds, bad input refused by name; the
method registered as the row, configured in every shipped config, trained end to end by ``table3``
on the adjusted table."""
import copy
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import reproduce.train as T
from estimators import PROPENSITY_ADJUSTMENTS, ddr_propensity
from estimators.adjustment import FUNCTIONS
from reproduce import config as C
from reproduce.methods import METHODS, SEARCH_SPACE, TABLE3_ROWS, Method

pytestmark = pytest.mark.usefixtures("restore_runtime")

#: Table 1's f(p), written again from the paper for the transcription.
F_NUMPY = {"identity": lambda p: p, "sin": lambda p: np.sin(p) / np.sin(1.0),
           "log": lambda p: np.log(1.0 + p) / np.log(2.0), "tanh": lambda p: np.tanh(p) / np.tanh(1.0)}


def alpha_numpy(p: np.ndarray, w1: float, w2: float, f: str) -> np.ndarray:
    """Eq. (5), pair by pair: alpha = min(max(ln(2 (w2 / w1) (1 - p)) / ln f(p), 0), 1), for p < 1."""
    out = np.empty_like(p)
    for k, pk in enumerate(p):
        raw = math.log(2.0 * w2 / w1 * (1.0 - pk)) / math.log(F_NUMPY[f](pk))
        out[k] = min(max(raw, 0.0), 1.0)
    return out


def adjusted_numpy(p: np.ndarray, w1: float, w2: float, f: str) -> np.ndarray:
    """The propensity of eq. (2)'s D-DR, f(p)^alpha with eq. (5)'s alpha, as a literal power."""
    return F_NUMPY[f](p) ** alpha_numpy(p, w1, w2, f)


P = np.concatenate([[1e-6, 1e-3, 0.01, 0.05, 0.1, 0.13, 0.2, 0.5, 0.9, 0.999],
                    np.random.default_rng(0).uniform(1e-4, 0.999, 200)])


# ---- the adjustment ---------------------------------------------------------------------------------
@pytest.mark.parametrize("f", list(FUNCTIONS))
@pytest.mark.parametrize("w", [0.02, 0.1, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_eq5_transcription(f, w, dtype):
    got = ddr_propensity(torch.tensor(P, dtype=dtype), w, f)
    assert got.dtype == dtype and got.shape == (len(P),)
    want = adjusted_numpy(P, 1.0, w, f)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    np.testing.assert_allclose(got.double().numpy(), want, rtol=tol, atol=0)


def test_alpha_transcription_is_theorem_3_5_minimiser():
    """Eq. (5) (as transcribed above) is the grid argmin of w1 h_B + w2 h_V over alpha in [0, 1]
    (Table 1: h_B = 1 - p / f^alpha, h_V = p (1 - p) / f^(2 alpha), p_hat = p)."""
    grid = np.linspace(0.0, 1.0, 20001)
    for f in FUNCTIONS:
        for w2 in (0.02, 0.1, 1.0):
            for p in (1e-3, 0.05, 0.13, 0.3, 0.7):
                fp = F_NUMPY[f](p)
                objective = (1.0 - p / fp**grid) + w2 * p * (1.0 - p) / fp ** (2 * grid)
                assert abs(grid[np.argmin(objective)] - alpha_numpy(np.array([p]), 1.0, w2, f)[0]) < 1e-4


def test_paper_setting_values_and_clamp_form():
    """w2 / w1 = 0.1, f = log: DR weights 1 / f^alpha = clamp(w1 / (2 w2 (1 - p)), 1, 1 / f(p)), about
    5 / (1 - p) below p ~ 0.13 (ddr.md's table: 5.03, 5.26, 5.56, 5.67), then 1 / f(p)."""
    p = torch.tensor(P, dtype=torch.float64)
    weight = 1.0 / ddr_propensity(p)
    clamp = torch.minimum((1.0 / (2 * 0.1 * (1 - p))).clamp(min=1.0), 1.0 / (torch.log1p(p) / math.log(2.0)))
    torch.testing.assert_close(weight, clamp, rtol=1e-13, atol=0)
    w = 1.0 / ddr_propensity(torch.tensor([0.005, 0.05, 0.1, 0.13, 0.2, 0.5], dtype=torch.float64))
    np.testing.assert_allclose(w.numpy(), [5.0251, 5.2632, 5.5556, 5.6714, 3.8018, 1.7095], atol=1e-4)


def test_limits_and_bounds():
    p = torch.tensor(P, dtype=torch.float64)
    # w2 / w1 -> 0: alpha = 1, the propensity f(p); with f the identity plain DR's p_hat (weight 1 / p_hat)
    for f, fn in FUNCTIONS.items():
        torch.testing.assert_close(ddr_propensity(p, 1e-12, f), fn(p), rtol=1e-13, atol=0)
    assert torch.equal(ddr_propensity(p, 1e-12, "identity"), p)
    # w2 / w1 >= 1 / (2 (1 - p)): alpha = 0, weight 1 (the imputation estimator's)
    assert torch.equal(ddr_propensity(p[p < 0.5], 1.0), torch.ones_like(p[p < 0.5]))
    # p_hat = 1: weight 1 for every w and f (eq. 5 reads 0 / 0 there; every alpha gives 1)
    for f in FUNCTIONS:
        for w in (1e-6, 0.1, 10.0):
            assert float(ddr_propensity(torch.tensor([1.0]), w, f)) == 1.0
    # Theorem 3.7: 1 <= 1 / f^alpha <= max(1, w1 / (2 w2 (1 - p))), and never above plain 1 / f(p) (<= 1 / p)
    for w in (0.02, 0.1, 0.3):
        weight = 1.0 / ddr_propensity(p, w)
        assert bool((weight >= 1).all())
        assert bool((weight <= torch.clamp(1.0 / (2 * w * (1 - p)), min=1.0) * (1 + 1e-12)).all())
        assert bool((weight <= 1.0 / p).all())


def test_monotone():
    """The weight falls as w2 / w1 grows (more variance penalty) and never rises with p_hat."""
    p = torch.linspace(1e-4, 1.0, 2001, dtype=torch.float64)
    ws = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    weights = torch.stack([1.0 / ddr_propensity(p, w) for w in ws])
    assert bool((weights[1:] <= weights[:-1]).all())
    for f in FUNCTIONS:
        for w in (1e-3, 0.1):  # 1 / f(p) falls in p; w1 / (2 w2 (1 - p)) rises, but only until it meets 1 / f(p)
            weight = 1.0 / ddr_propensity(p, w, f)
            changes = torch.sign(torch.diff(weight))
            assert bool((changes[torch.argmax(weight):] <= 0).all())


@pytest.mark.parametrize("kwargs, match", [
    ({"p_hat": torch.tensor([0.0, 0.5])}, r"`p_hat` must lie in \(0, 1\]"),
    ({"p_hat": torch.tensor([0.5, 1.5])}, r"`p_hat` must lie in \(0, 1\]"),
    ({"p_hat": torch.tensor([math.nan, 0.5])}, "`p_hat` contains NaN"),
    ({"p_hat": torch.tensor([0.5], dtype=torch.float16)}, "`p_hat` is torch.float16"),
    ({"p_hat": torch.tensor([1, 1])}, "`p_hat` must be a floating-point tensor"),
    ({"w": 0.0}, "`w` = w2 / w1 .* must be a finite positive number; got 0.0"),
    ({"w": -0.1}, "`w` = w2 / w1 .* must be a finite positive number; got -0.1"),
    ({"w": math.inf}, "`w` = w2 / w1"),
    ({"w": "0.1x"}, "`w` must be a real number"),
    ({"f": "exp"}, "`f` must name one of Table 1's functions"),
])
def test_bad_input_rejected_by_name(kwargs, match):
    args = {"p_hat": torch.tensor([0.1, 0.5]), "w": 0.1, "f": "log", **kwargs}
    with pytest.raises(ValueError, match=match):
        ddr_propensity(**args)


# ---- the method -------------------------------------------------------------------------------------
def test_registered_as_the_d_dr_row():
    method = METHODS["d_dr"]
    dr_jl = METHODS["dr_jl"]
    assert (method.label, method.table3_row) == ("D-DR", "D-DR") and "D-DR" in TABLE3_ROWS
    assert (method.estimator, method.imputation_loss) == (dr_jl.estimator, dr_jl.imputation_loss) == ("dr", "dr")
    assert method.propensity_adjustment == "ddr" and method.propensity_adjustment_spec is PROPENSITY_ADJUSTMENTS["ddr"]
    assert PROPENSITY_ADJUSTMENTS["ddr"].function is ddr_propensity and dict(PROPENSITY_ADJUSTMENTS["ddr"].params) == {
        "w": 0.1}
    assert method.adjustment_keys == {"ddr_w": "w"} and dr_jl.adjustment_keys == {}
    assert method.keys == dr_jl.keys + ("ddr_w",) and method.own_keys == dr_jl.own_keys + ("ddr_w",)
    assert SEARCH_SPACE["ddr_w"] == (0.01, 1.0, "log") and C.PARAM_RULES["ddr_w"] == (0.0, math.inf, True)
    with pytest.raises(ValueError, match="needs an estimator that reads propensities"):
        Method("bad", "Bad", "naive", None, None, "no propensities to adjust", propensity_adjustment="ddr")
    with pytest.raises(ValueError, match="unknown propensity adjustment 'dddr'"):
        Method("bad", "Bad", "dr", "dr", None, "no such adjustment", propensity_adjustment="dddr")


def test_every_shipped_config_starts_from_dr_jl(shipped_entries):
    """An untuned D-DR entry is DR-JL's plus the paper's w2/w1; a tuned one (Coat, Yahoo! R3,
    KuaiRec) sets the same keys and keeps DR-JL's form of the imputed error."""
    entries = shipped_entries("d_dr")
    assert {p.stem for p, *_ in entries} >= {"coat", "yahoo", "kuairec", "default", "kuairec@0.2", "kuairec@0.8"}
    tuned = set()
    for path, ddr, status, dr_jl in entries:
        if status.startswith("tuned on the validation split"):
            tuned.add(path.stem)
            assert set(ddr) == set(dr_jl) | {"ddr_w"} and ddr.get("imputed_error") == dr_jl.get("imputed_error"), path
        else:
            assert status == "untuned: DR-JL's tuned values, the paper's w2/w1 = 0.1", path
            assert ddr == {**dr_jl, "ddr_w": 0.1}, path  # imputed_error included where DR-JL sets it
        cfg = C.load_config(path.stem)
        assert cfg.run_options(METHODS["d_dr"]) == cfg.run_options(METHODS["dr_jl"])
        a = C.run_signature(cfg, METHODS["d_dr"], cfg.method_params(METHODS["d_dr"]), 3)
        assert a != C.run_signature(cfg, METHODS["dr_jl"], cfg.method_params(METHODS["dr_jl"]), 3)
    assert tuned == {"coat", "yahoo", "kuairec"}


@pytest.mark.parametrize("method, value, match", [
    ("d_dr", 0, "methods.d_dr.ddr_w must be a positive number; got 0"),
    ("d_dr", -0.1, "methods.d_dr.ddr_w must be a positive number; got -0.1"),
    ("d_dr", "0.1", "methods.d_dr.ddr_w must be a positive number; got '0.1'"),
    ("dr_jl", 0.1, "methods.dr_jl.ddr_w is not a key of method 'dr_jl'"),
])
def test_bad_config_value_rejected(method, value, match):
    raw = copy.deepcopy(dict(C.load_config("coat").raw))
    raw["methods"][method]["ddr_w"] = value
    with pytest.raises(ValueError, match="coat.json: " + match):
        C.parse_config(raw, Path("coat.json"))
    del raw["methods"]["d_dr"]["ddr_w"]
    if method == "d_dr":
        with pytest.raises(ValueError, match="coat.json: methods.d_dr lacks ddr_w"):
            C.parse_config(raw, Path("coat.json"))


class _Stop(Exception):
    pass


def test_joint_learning_reads_the_adjusted_table(data_dir, monkeypatch):
    """A run hands the JointLearner f(p_hat)^alpha of the clipped table that DR-JL's run gets.  (With
    Coat's clipping floor gamma = 0.199, 2 w (1 - p_hat) < f(p_hat) on every pair at w = 0.1: alpha = 1
    and the table is f(p_hat); at w = 0.5 it is 1 - p_hat.)"""
    tables = {}

    def capture(p_hat, jcfg, **kwargs):
        tables[len(tables)] = (p_hat.clone(), jcfg)
        raise _Stop

    monkeypatch.setattr(T, "JointLearner", capture)
    T.setup_runtime(1)
    cfg = C.load_config("coat")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Coat's pairs repeated across splits (cvrdata's DataWarning)
        data = C.DataSource("coat").load(cfg, data_dir)
    for name, w in (("dr_jl", None), ("d_dr", 0.1), ("d_dr", 0.5)):
        params = cfg.method_params(METHODS["dr_jl"])  # DR-JL's values for both (Coat's d_dr entry is tuned)
        params.update({} if w is None else {"ddr_w": w})
        with pytest.raises(_Stop):
            T.run_one(data, cfg, METHODS[name], params, 7, max_epochs=1, split="val", show_progress=False)
    (plain, cfg_dr), (adjusted, cfg_ddr), (adjusted2, _) = tables[0], tables[1], tables[2]
    assert cfg_ddr == cfg_dr  # same estimator, imputation loss, models and options
    assert float(plain.min()) >= cfg.method_params(METHODS["dr_jl"])["gamma"]
    torch.testing.assert_close(adjusted, ddr_propensity(plain, 0.1), rtol=0, atol=0)
    torch.testing.assert_close(adjusted2, ddr_propensity(plain, 0.5), rtol=0, atol=0)
    assert not torch.equal(adjusted, plain) and not torch.equal(adjusted, adjusted2)


def test_table3_trains_the_d_dr_row(coat_table3_rows):
    cells = coat_table3_rows(["d_dr"])["D-DR"]
    assert " ± " in cells[1] and 0.3 < float(cells[1].split(" ± ")[0]) < 1, cells  # trained, AUC measured
    assert cells[2].startswith("0.7556"), cells  # the paper's Coat AUC beside it