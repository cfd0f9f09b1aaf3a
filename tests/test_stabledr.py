"""StableDR (Li, Zheng, Wu, ICLR 2023; BADR Table 3 row "StableDR"): the estimator SDR-est, its
prediction step and the balancing propensity loss SDR-prop against independent numpy
transcriptions (float64); SDR-prop's gradient; the cycle learner (propensities never below gamma,
no label but the clicked batch's reaches any update, deterministic by seed, SNIPS when the
propensity is frozen); bad input refused by name; the method registered and configured in every
shipped config; one ``table3`` epoch end to end on Coat.  Equation labels (SDR-*) are ours
(estimators/stabledr.py: the paper's Sections 3-4 could not be read)."""
import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch

from estimators import ESTIMATORS
from estimators.joint_loss import Form
from estimators.stabledr import stabledr, stabledr_propensity_loss, stabledr_step
from estimators.training import (AdditivePropensity, CycleConfig, CycleLearner, JointConfig, JointLearner,
                                 PropensityModel, fit, prediction_loss, propensity_table)
from reproduce import config as C
from reproduce.methods import CYCLE_KEYS, METHODS, SEARCH_SPACE, TABLE3_ROWS, Method
from reproduce.train import run_one

pytestmark = pytest.mark.usefixtures("restore_runtime")

RTOL = 1e-12


# ---- numpy transcriptions (written from the equations, probabilities, loops) ----------------------
def _np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _np_bce(p, t):
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def np_sdr_est(e, e_hat, o, p_hat):
    """SDR-est over one batch D: mean_D e_hat* with e_hat* = e_hat + c and c from SDR-con,
    sum o (e - e_hat - c) / p_hat = 0 solved for c."""
    num = den = 0.0
    for k in range(len(o)):
        if o[k] == 1:
            num += (e[k] - e_hat[k]) / p_hat[k]
            den += 1 / p_hat[k]
    c = num / den
    return float(np.mean(e_hat + c))


def np_sdr_step(x_b, r_b, p_hat_b, x_u, xt_b, xt_u):
    """The step's value: mean_U e_hat + sum_B w (e - e_hat) / sum_B w, e_hat = l(sigmoid(x), sigmoid(x_t))."""
    w = 1 / p_hat_b
    e = _np_bce(_np_sigmoid(x_b), r_b)
    e_hat_b = _np_bce(_np_sigmoid(x_b), _np_sigmoid(xt_b))
    e_hat_u = _np_bce(_np_sigmoid(x_u), _np_sigmoid(xt_u))
    return float(np.mean(e_hat_u) + np.sum(w * (e - e_hat_b)) / np.sum(w))


def np_sdr_prop(z, o, e_hat, eta, gamma, reduction="sum"):
    """SDR-prop: sum_U l(p, o) + eta [sum_U (1 - o / max(p, gamma)) (e_hat - mean e_hat)]^2 (or means)."""
    p = _np_sigmoid(z)
    balance = [(1 - o[j] / max(p[j], gamma)) * (e_hat[j] - np.mean(e_hat)) for j in range(len(z))]
    if reduction == "sum":
        return float(np.sum(_np_bce(p, o)) + eta * np.sum(balance) ** 2)
    return float(np.mean(_np_bce(p, o)) + eta * np.mean(balance) ** 2)


@pytest.fixture
def batch():
    rng = np.random.default_rng(3)
    n = 60
    o = (rng.random(n) < 0.3).astype(float)
    o[0] = 1
    e = np.where(o == 1, rng.random(n) * 3, np.nan)  # unclicked errors do not exist
    return dict(e=e, e_hat=rng.random(n) * 2, o=o, p_hat=rng.uniform(1e-3, 1, n))


@pytest.fixture
def step():
    rng = np.random.default_rng(5)
    b, u = 23, 69
    return dict(x_b=rng.normal(size=b) * 2, r_b=rng.integers(0, 2, b).astype(float), p_hat_b=rng.uniform(0.02, 1, b),
                x_u=rng.normal(size=u) * 2, xt_b=rng.normal(size=b), xt_u=rng.normal(size=u))


def _t(d):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in d.items()}


# ---- the estimator -----------------------------------------------------------------------------------
def test_estimate_matches_numpy_and_is_registered(batch):
    assert ESTIMATORS["stabledr"].function is stabledr and ESTIMATORS["stabledr"].step is stabledr_step
    t = _t(batch)
    e = t["e"].clone().requires_grad_()
    value = stabledr(e, t["e_hat"], t["o"], t["p_hat"])
    assert math.isclose(float(value.detach()), np_sdr_est(**batch), rel_tol=RTOL)
    value.backward()
    assert torch.isfinite(e.grad).all() and (e.grad[t["o"] == 0] == 0).all()  # NaN errors never reached
    # (K, B): the mean of the per-batch values
    two = {k: np.stack([v, v[::-1]]) for k, v in batch.items()}
    two["o"][1, 0] = 1
    two["e"][1, 0] = 0.5
    expected = np.mean([np_sdr_est(*(two[k][i] for k in ("e", "e_hat", "o", "p_hat"))) for i in range(2)])
    assert math.isclose(float(stabledr(**_t(two))), expected, rel_tol=RTOL)


def test_estimate_is_snips_dr_and_bounded(batch):
    """SDR-est = SNIPS when e_hat = 0, = DR when sum o / p_hat = |D|, and stays within
    mean e_hat + [min, max] of the clicked residuals however small a clicked pair's p_hat."""
    t = _t(batch)
    o, e, e_hat = t["o"], torch.nan_to_num(t["e"]), t["e_hat"]
    assert torch.isclose(stabledr(t["e"], torch.zeros_like(e_hat), o, t["p_hat"]),
                         ESTIMATORS["snips"].function(t["e"], o, t["p_hat"]), rtol=RTOL)
    p_dr = torch.full_like(o, float(o.sum()) / o.numel())  # sum o / p = |D|
    assert torch.isclose(stabledr(t["e"], e_hat, o, p_dr), ESTIMATORS["dr"].function(t["e"], e_hat, o, p_dr),
                         rtol=RTOL)
    tiny = t["p_hat"].clone()
    tiny[0] = 1e-100
    value = float(stabledr(t["e"], e_hat, o, tiny))
    resid = (e - e_hat)[o == 1]
    assert float(e_hat.mean() + resid.min()) - 1e-12 <= value <= float(e_hat.mean() + resid.max()) + 1e-12
    assert abs(float(ESTIMATORS["dr"].function(t["e"], e_hat, o, tiny))) > 1e90  # DR is not bounded


def test_step_value_matches_numpy_and_its_gradient_is_snips(step):
    t = {k: v.requires_grad_(k in ("x_b", "x_u")) for k, v in _t(step).items()}
    value = prediction_loss("stabledr", t["x_b"], t["r_b"], t["p_hat_b"], t["x_u"], t["xt_b"], t["xt_u"])
    assert math.isclose(float(value.detach()), np_sdr_step(**step), rel_tol=RTOL)
    value.backward()
    assert t["x_u"].grad is None or bool((t["x_u"].grad == 0).all())  # no imputed error trains the prediction
    x = t["x_b"].detach().clone().requires_grad_()
    prediction_loss("snips", x, t["r_b"], t["p_hat_b"]).backward()
    torch.testing.assert_close(t["x_b"].grad, x.grad, rtol=1e-12, atol=0)
    form = Form()  # the registry's step, called directly, is the same quantity
    assert math.isclose(float(stabledr_step(*(t[k].detach() for k in ("x_b", "r_b", "p_hat_b", "x_u", "xt_b", "xt_u")),
                                            form)), np_sdr_step(**step), rel_tol=RTOL)


# ---- the propensity loss -----------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_propensity_loss_matches_numpy(reduction):
    rng = np.random.default_rng(11)
    for _ in range(20):
        n = int(rng.integers(5, 80))
        z, e_hat = rng.normal(size=n) * 3, rng.random(n) * 2
        o = (rng.random(n) < 0.3).astype(float)
        eta, gamma = float(rng.uniform(0, 50)), float(rng.uniform(0.01, 0.3))
        got = stabledr_propensity_loss(*(torch.tensor(a) for a in (z, o, e_hat)), eta=eta, gamma=gamma,
                                       reduction=reduction)
        assert math.isclose(float(got), np_sdr_prop(z, o, e_hat, eta, gamma, reduction), rel_tol=RTOL)


def test_propensity_loss_gradient():
    """gradcheck in float64 (away from the clip's kink), and autograd against central differences of
    the numpy transcription; e_hat is detached (no gradient to the imputation model)."""
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(40, dtype=torch.float64, generator=gen) * 2
    z[z < -2.5] = 0.5  # sigmoid(z) above gamma = 0.05 (logit -2.94)
    z.requires_grad_()
    o = (torch.rand(40, dtype=torch.float64, generator=gen) < 0.4).double()
    e_hat = torch.rand(40, dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: stabledr_propensity_loss(a, o, e_hat, eta=3.0, gamma=0.05), (z,))
    loss = stabledr_propensity_loss(z, o, e_hat, eta=3.0, gamma=0.05)
    (g,) = torch.autograd.grad(loss, (z,))
    assert e_hat.grad is None and not loss.grad_fn is None
    zn, on, hn, eps = z.detach().numpy(), o.numpy(), e_hat.detach().numpy(), 1e-6
    for i in range(len(zn)):
        zp, zm = zn.copy(), zn.copy()
        zp[i] += eps
        zm[i] -= eps
        fd = (np_sdr_prop(zp, on, hn, 3.0, 0.05) - np_sdr_prop(zm, on, hn, 3.0, 0.05)) / (2 * eps)
        assert abs(fd - float(g[i])) <= 1e-6 * max(1.0, abs(fd)), i


def test_propensity_loss_balances_and_reduces_to_bce():
    """eta = 0, or imputed errors constant: the click cross-entropy; the balancing term is zero
    exactly when the self-normalised IPS mean of e_hat over the clicks equals its mean over U."""
    z = torch.tensor([0.3, -1.0, 2.0, -0.5], dtype=torch.float64)
    o = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, o, reduction="sum")
    assert torch.isclose(stabledr_propensity_loss(z, o, torch.rand(4, dtype=torch.float64), eta=0.0, gamma=0.05), bce)
    assert torch.isclose(stabledr_propensity_loss(z, o, torch.full((4,), 0.7, dtype=torch.float64), eta=9.0,
                                                  gamma=0.05), bce)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):  # balance = sum_U o w * (mean_U e_hat - SNIPS mean of e_hat over the clicks)
        e_hat = torch.rand(4, dtype=torch.float64, generator=gen)
        w = o / torch.sigmoid(z)
        snips_mean = (w * e_hat).sum() / w.sum()
        expected = bce + 9.0 * (w.sum() * (e_hat.mean() - snips_mean)) ** 2
        assert torch.isclose(stabledr_propensity_loss(z, o, e_hat, eta=9.0, gamma=0.05), expected, rtol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(eta=-1.0), "`eta`"), (dict(eta=float("nan")), "`eta`"), (dict(gamma=0.0), "`gamma`"),
    (dict(gamma=1.0), "`gamma`"), (dict(reduction="max"), "`reduction`"), (dict(o=[1.0, 2.0, 0.0]), "`o_u`"),
    (dict(z=[0.0, float("inf"), 1.0]), "`z_u`"), (dict(e_hat=[0.1, 0.2]), "one shape"),
    (dict(e_hat=[0.1, float("nan"), 0.3]), "`e_hat_u`"), (dict(across="all"), "`across`"),
])
def test_propensity_loss_rejects_bad_input_by_name(kwargs, match):
    args = dict(z=[0.0, 1.0, -1.0], o=[1.0, 0.0, 0.0], e_hat=[0.1, 0.2, 0.3], eta=1.0, gamma=0.05, reduction="sum",
                across="global")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        stabledr_propensity_loss(torch.tensor(args["z"]), torch.tensor(args["o"]), torch.tensor(args["e_hat"]),
                                 eta=args["eta"], gamma=args["gamma"], reduction=args["reduction"],
                                 across=args["across"])


# ---- the cycle learner -------------------------------------------------------------------------------
N_USERS, N_ITEMS = 30, 40


def _problem(seed=0):
    """A fitted-looking additive propensity table, the click matrix and the clicked pairs' labels;
    every unclicked pair's label is NaN (it does not exist)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(N_USERS, generator=gen), torch.randn(N_ITEMS, generator=gen)
    p = torch.sigmoid(a[:, None] + b[None, :] - 1.5)
    clicks = torch.bernoulli(p, generator=gen)
    truth = torch.sigmoid(torch.randn(N_USERS, 3, generator=gen) @ torch.randn(3, N_ITEMS, generator=gen))
    labels = torch.where(clicks == 1, torch.bernoulli(truth, generator=gen), torch.full_like(truth, float("nan")))
    users, items = clicks.nonzero(as_tuple=True)
    return p, clicks, users, items, labels[users, items]


def _learner(p, clicks, seed=1, **cycle):
    torch.manual_seed(seed)
    cfg = JointConfig(estimator="stabledr", imputation_loss="dr", dim=4, G=2, lr=0.05, imp_lr=0.05,
                      imputed_error="published")
    return CycleLearner(p, clicks, cfg, CycleConfig(**{"eta": 10.0, "prop_lr": 0.05, "gamma": 0.1, **cycle}),
                        generator=torch.Generator().manual_seed(seed))


def test_additive_propensity_starts_from_the_prefit_table():
    torch.manual_seed(0)
    model = PropensityModel(N_USERS, N_ITEMS, 8)
    table = propensity_table(model, N_USERS, N_ITEMS)
    start = AdditivePropensity.from_propensities(table)
    torch.testing.assert_close(start.propensities(), table, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="not the table of an additive logistic model"):
        AdditivePropensity.from_propensities(table.clamp(0.4, 1.0) if float(table.min()) < 0.4 else torch.rand(5, 6))
    with pytest.raises(ValueError, match="`propensities`"):
        AdditivePropensity.from_propensities(torch.zeros(3, 4))


def test_propensities_never_below_gamma():
    """A propensity step that pushes every p_hat down (large lr, no clicks in U's balance) leaves
    every propensity the other models see, and the table, at gamma or above."""
    p, clicks, users, items, r = _problem()
    learner = _learner(p, clicks, eta=1e4, prop_lr=1.0, gamma=0.1)
    seen = []
    for name in ("_module_imputation_update", "_module_prediction_update"):
        original = getattr(learner, name)

        def spy(rows, cols, b, r_b, p_hat, _original=original):
            seen.append(float(p_hat.min()))
            return _original(rows, cols, b, r_b, p_hat)
        setattr(learner, name, spy)
    for _ in range(30):
        learner.step(users[:16], items[:16], r[:16])
    assert seen and min(seen) >= 0.1
    assert float(learner.propensity_table().min()) >= 0.1
    assert float(torch.sigmoid(learner.propensity(users, items)).min()) < 0.1  # the clip was needed


def test_no_label_but_the_batch_reaches_an_update():
    """The learner holds no label: from all pairs it keeps only the 0/1 click matrix, and a step is
    given B's labels; trained from a label matrix whose unclicked pairs are NaN, every update stays
    finite.  (That no validation or test label reaches training: the next test.)"""
    p, clicks, users, items, r = _problem()
    learner = _learner(p, clicks)
    held = [v for v in vars(learner).values() if torch.is_tensor(v) and v.numel() == N_USERS * N_ITEMS]
    assert held and all(bool(((t == 0) | (t == 1)).all()) or bool(((t > 0) & (t <= 1)).all()) for t in held)
    assert torch.equal(learner.o, clicks.reshape(-1))
    fit(learner, users, items, r, batch_size=16, max_epochs=2, generator=torch.Generator().manual_seed(0))
    assert all(bool(torch.isfinite(prm).all()) for m in (learner.prediction, learner.imputation, learner.propensity)
               for prm in m.parameters())


def test_run_reads_no_validation_or_test_label(data_dir, coat_one_thread):
    """A Coat run's training is the same with every validation and test label flipped: the
    propensity model learns from clicks only (CVRData refuses NaN labels, so flips stand in)."""
    cfg, data = coat_one_thread
    method = METHODS["stabledr"]
    params = cfg.method_params(method)
    altered = dataclasses.replace(data, y_val=1 - data.y_val, y_test=1 - data.y_test)
    histories = []
    for d in (data, altered):
        result = run_one(d, cfg, method, params, 2024, max_epochs=2, split="val", show_progress=False, history=True)
        histories.append([(h["prediction_loss"], h["imputation_loss"], h["monitor"]) for h in result["history"]
                          if h["stage"] == "fit"])
        assert result["epochs"] == 2
    assert histories[0] == histories[1]


def test_deterministic_by_seed():
    p, clicks, users, items, r = _problem()

    def trained(seed):
        learner = _learner(p, clicks, seed=seed)
        fit(learner, users, items, r, batch_size=16, max_epochs=3, generator=torch.Generator().manual_seed(seed))
        return learner.propensity_table(), learner.predict(users, items)

    first, again, other = trained(4), trained(4), trained(5)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], other[1])
    assert not torch.equal(first[0], torch.as_tensor(p).clamp(0.1, 1))  # the propensity did learn


def test_frozen_propensity_gives_snips_prediction_step():
    """With eta = 0 and a vanishing propensity lr, a cycle step moves the prediction model exactly as
    SNIPS's step does from the same parameters (the imputation model never reaches it)."""
    p, clicks, users, items, r = _problem()
    learner = _learner(p, clicks, eta=0.0, prop_lr=1e-30)
    snips = JointLearner(p.clamp(0.1, 1), JointConfig(estimator="snips", imputation_loss=None, dim=4, lr=0.05),
                         optimizer=torch.optim.Adam)
    snips.prediction.load_state_dict(learner.prediction.state_dict())
    for k in range(0, 48, 16):
        learner.step(users[k:k + 16], items[k:k + 16], r[k:k + 16])
        snips.step(users[k:k + 16], items[k:k + 16], r[k:k + 16])
    for a, b in zip(learner.prediction.parameters(), snips.prediction.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, match", [
    (dict(cycle=dict(eta=-1.0)), "`eta`"), (dict(cycle=dict(prop_lr=0.0)), "`prop_lr`"),
    (dict(cycle=dict(prop_weight_decay=-1e-3)), "`prop_weight_decay`"), (dict(cycle=dict(gamma=1.0)), "`gamma`"),
    (dict(cycle=dict(reduction="max")), "`reduction`"), (dict(clicks="short"), "`clicks`"),
    (dict(clicks="two"), "`clicks`"), (dict(estimator="dr_jl"), None), (dict(estimator="eib"), "estimator"),
])
def test_cycle_learner_rejects_bad_input_by_name(change, match):
    p, clicks, *_ = _problem()
    if change.get("clicks") == "short":
        clicks = clicks.reshape(-1)[:-1]
    elif change.get("clicks") == "two":
        clicks = clicks * 2
    estimator = {"dr_jl": "dr", "eib": "eib"}.get(change.get("estimator"), "stabledr")
    cfg = JointConfig(estimator=estimator, imputation_loss="dr", dim=4)
    if match is None:  # any estimator reading p_hat and e_hat trains by cycle learning (DR here)
        CycleLearner(p, clicks, cfg, CycleConfig())
        return
    with pytest.raises(ValueError, match=match):
        CycleLearner(p, clicks, cfg, CycleConfig(**change.get("cycle", {})))


# ---- the method --------------------------------------------------------------------------------------
def test_registered_as_the_stabledr_row():
    method = METHODS["stabledr"]
    assert (method.label, method.table3_row) == ("StableDR", "StableDR") and "StableDR" in TABLE3_ROWS
    assert (method.estimator, method.imputation_loss, method.cycle) == ("stabledr", "dr", True)
    assert method.keys == METHODS["dr_jl"].keys + CYCLE_KEYS
    assert set(CYCLE_KEYS) <= set(SEARCH_SPACE) and set(CYCLE_KEYS) <= set(method.own_keys)
    assert not any(m.cycle for n, m in METHODS.items() if n != "stabledr")
    with pytest.raises(ValueError, match="cycle learning"):
        Method("bad", "Bad", "snips", None, None, "no imputation model", cycle=True)


def test_every_shipped_config_has_an_entry():
    paths = sorted(C.CONFIG_DIR.glob("*.json"))
    assert {p.stem for p in paths} >= {"coat", "yahoo", "kuairec", "default", "kuairec@0.2", "kuairec@0.4",
                                       "kuairec@0.6", "kuairec@0.8"}
    for path in paths:
        entry = json.loads(path.read_text())["methods"]["stabledr"]
        assert entry["status"].startswith(("tuned", "untuned", "Coat", "KuaiRec", "Yahoo")), path
        assert set(entry) - {"status", "imputed_error"} == set(METHODS["stabledr"].own_keys), path
        cfg = C.load_config(path.stem)
        cfg.method_params(METHODS["stabledr"])


def test_table3_trains_the_stabledr_row(coat_table3_rows):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cells = coat_table3_rows(["stabledr"])["StableDR"]
    assert " ± " in cells[1] and 0.3 < float(cells[1].split(" ± ")[0]) < 1, cells  # trained, AUC measured
    assert cells[2].startswith("0.7538"), cells  # the paper's Coat AUC beside it
