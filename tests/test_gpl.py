"""DR-MSE-GPL (Zhou, Feng, Liu, Zhu, CIKM 2023; BADR Table 3 row "DR-MSE-GPL"): GPL's propensity loss
(BADR eqs. 11-12) against a numpy transcription of the printed equations in both normalisations of the
variance term, its gradient, lambda = 0 and zero rounds giving DR-MSE exactly, unclicked pairs' labels
and residuals never read, bad input refused by name, determinism by seed, the method registered as the
row and configured in every shipped config, and one ``table3`` run end to end on Coat."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from estimators import PROPENSITY_OBJECTIVES, gpl_propensity_loss
from estimators.propensity_loss import gpl_residual, gpl_terms
from estimators.training import GPLTrainer, JointConfig, JointLearner, PropensityModel, fit, propensity_table
from reproduce import config as C
from reproduce.methods import METHODS, TABLE3_ROWS, get_method
from reproduce.train import PropensityCache, run_one

pytestmark = pytest.mark.usefixtures("restore_runtime")

EPS = 1e-4


# ---- numpy transcription of eqs. 11-12, float64 ------------------------------------------------------
def np_gpl(x, o, delta, *, lam, beta, n_norm, base="bce"):
    """Eq. 11 as printed, over one batch: p = max(sigmoid(x), 1e-4) in the GPL terms, unclicked residuals
    := 0 (their labels are unseen); mean l + lam [beta mean((o - 2op + p^2)/p^2 d^2) + (1 - beta)
    mean(o/p^2 d^2) / n_norm], n_norm = |D| (corrected eq. 28: 1/|D|^2 overall) or |B| (the code)."""
    x, o = np.asarray(x, np.float64), np.asarray(o, np.float64)
    d = np.where(o > 0, np.nan_to_num(np.asarray(delta, np.float64)), 0.0)
    s = 1 / (1 + np.exp(-x))
    fit_ = np.mean(-(o * np.log(s) + (1 - o) * np.log(1 - s))) if base == "bce" else np.mean((s - o) ** 2)
    p = np.maximum(s, EPS)
    bias = np.mean((o - 2 * o * p + p ** 2) / p ** 2 * d ** 2)
    var = np.mean(o / p ** 2 * d ** 2) / n_norm
    return fit_ + lam * (beta * bias + (1 - beta) * var)


def _batch(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 2.5 - 2.0
    o = torch.bernoulli(torch.sigmoid(x).clamp(0.05, 0.9), generator=g)
    delta = torch.randn(n, generator=g, dtype=torch.float64) * 1.5
    delta = torch.where(o > 0, delta, torch.full_like(delta, math.nan))  # unclicked residuals are unknown
    return x, o, delta


@pytest.mark.parametrize("objective", ["gpl", "gpl_published"])
@pytest.mark.parametrize("lam,beta", [(0.7, 0.7), (2.0, 0.0), (0.05, 1.0), (10.0, 0.3)])
@pytest.mark.parametrize("base", ["bce", "mse"])
def test_loss_matches_numpy(objective, lam, beta, base):
    x, o, delta = _batch()
    n_pairs = 87_000  # |D|: the whole data set's pairs, not the batch's
    n_norm = n_pairs if PROPENSITY_OBJECTIVES[objective].var_norm == "paper" else x.numel()
    got = PROPENSITY_OBJECTIVES[objective].function(x, o, delta, lam=lam, beta=beta, var_norm=float(n_norm),
                                                    base=base)
    want = np_gpl(x.numpy(), o.numpy(), delta.numpy(), lam=lam, beta=beta, n_norm=n_norm, base=base)
    assert got.dtype == torch.float64 and abs(got.item() - want) <= 1e-12 * abs(want)


def test_the_two_normalisations_differ_by_the_var_term_only():
    x, o, delta = _batch()
    n = x.numel()
    paper = gpl_propensity_loss(x, o, delta, lam=1.0, beta=0.0, var_norm=87_000.0)
    code = gpl_propensity_loss(x, o, delta, lam=1.0, beta=0.0, var_norm=float(n))
    _, v = gpl_terms(x, o, delta)
    assert torch.allclose(code - paper, v.mean() * (1 / n - 1 / 87_000), rtol=1e-12)
    assert torch.allclose(gpl_propensity_loss(x, o, delta, lam=1.0, beta=1.0, var_norm=87_000.0),
                          gpl_propensity_loss(x, o, delta, lam=1.0, beta=1.0, var_norm=float(n)), rtol=0, atol=0)


def test_gradient_matches_finite_differences_of_the_transcription():
    x, o, delta = _batch(120, seed=3)
    xg = x.clone().requires_grad_(True)
    kw = dict(lam=0.7, beta=0.7)
    (g,) = torch.autograd.grad(gpl_propensity_loss(xg, o, delta, var_norm=120.0, **kw), xg)
    h, xs = 1e-6, x.numpy()
    for k in range(x.numel()):
        xp, xm = xs.copy(), xs.copy()
        xp[k] += h
        xm[k] -= h
        fd = (np_gpl(xp, o.numpy(), delta.numpy(), n_norm=120, **kw)
              - np_gpl(xm, o.numpy(), delta.numpy(), n_norm=120, **kw)) / (2 * h)
        assert abs(fd - g[k].item()) <= 1e-6 * max(1.0, abs(fd)), (k, fd, g[k].item())
    # unclicked pairs get the base loss's gradient only; the GPL term only raises clicked propensities
    un = o == 0
    assert torch.allclose(g[un], torch.sigmoid(x[un]) / x.numel(), rtol=1e-12, atol=0)
    (gb,) = torch.autograd.grad(gpl_propensity_loss(xg, o, delta, var_norm=120.0, **kw)
                                - F.binary_cross_entropy_with_logits(xg, o), xg)
    assert (gb[o > 0] <= 0).all() and (gb[un] == 0).all()
    z = (torch.rand(48, dtype=torch.float64) * 8 - 4).requires_grad_(True)
    oz = (torch.arange(48) % 3 == 0).double()
    assert torch.autograd.gradcheck(lambda t: gpl_propensity_loss(t, oz, torch.randn(48, generator=torch.Generator()
                                                                                    .manual_seed(1),
                                                                                    dtype=torch.float64),
                                                                  lam=0.7, beta=0.7, var_norm=48.0), (z,))


def test_lambda_zero_is_the_base_loss_exactly():
    x, o, delta = _batch()
    assert torch.equal(gpl_propensity_loss(x, o, delta, lam=0.0, beta=0.7, var_norm=1.0),
                       F.binary_cross_entropy_with_logits(x, o))
    assert torch.equal(gpl_propensity_loss(x, o, delta, lam=0.0, beta=0.7, var_norm=1.0, base="mse"),
                       F.mse_loss(torch.sigmoid(x), o))


def test_unclicked_residuals_are_never_read_and_extremes_stay_finite():
    x, o, delta = _batch()
    xg = x.clone().requires_grad_(True)
    nan_out = gpl_propensity_loss(xg, o, delta, lam=1.0, beta=0.5, var_norm=400.0)
    (g1,) = torch.autograd.grad(nan_out, xg)
    zeros = torch.where(o > 0, delta, torch.zeros_like(delta))
    (g2,) = torch.autograd.grad(gpl_propensity_loss(xg, o, zeros, lam=1.0, beta=0.5, var_norm=400.0), xg)
    assert torch.isfinite(nan_out) and torch.equal(g1, g2)
    x32 = torch.tensor([-80.0, -9.0, 0.0, 30.0, 80.0], requires_grad=True)
    out = gpl_propensity_loss(x32, torch.tensor([1.0, 1, 1, 1, 0]), torch.tensor([3.0, -2, 1, 0.5, math.nan]),
                              lam=0.7, beta=0.7, var_norm=5.0)
    (g32,) = torch.autograd.grad(out, x32)
    assert torch.isfinite(out) and torch.isfinite(g32).all()


@pytest.mark.parametrize("kw,match", [
    (dict(lam=-1.0), "`lam`"), (dict(lam=math.nan), "`lam`"), (dict(beta=1.5), "`beta`"),
    (dict(var_norm=0.5), "`var_norm`"), (dict(eps=0.0), "`eps`"), (dict(base="hinge"), "`base`"),
])
def test_bad_loss_input_named(kw, match):
    x, o, delta = _batch(10)
    args = dict(lam=0.7, beta=0.7, var_norm=10.0) | kw
    with pytest.raises(ValueError, match=match):
        gpl_propensity_loss(x, o, delta, **args)
    with pytest.raises(ValueError, match="one shape"):
        gpl_propensity_loss(x, o[:5], delta, lam=0.7, beta=0.7, var_norm=10.0)


# ---- the rounds -----------------------------------------------------------------------------------
def _toy(seed=0, n_users=30, n_items=40):
    """A small problem: clicks, the clicked pairs' labels (the unclicked ones have none: NaN)."""
    g = torch.Generator().manual_seed(seed)
    clicks = torch.bernoulli(torch.full((n_users, n_items), 0.15), generator=g)
    labels = torch.where(clicks > 0, torch.bernoulli(torch.full((n_users, n_items), 0.4), generator=g),
                         torch.full((n_users, n_items), math.nan))
    u, i = clicks.nonzero(as_tuple=True)
    return clicks, u, i, labels[u, i]


def _trainer(seed, *, lam=1.0, objective="gpl", rounds=3, dim=4):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    clicks, u, i, r = _toy()
    model = PropensityModel(*clicks.shape, dim)
    learner = JointLearner(propensity_table(model, *clicks.shape, 0.05),
                           JointConfig("dr", "dr_mse", dim=dim, G=1, lr=0.05, imp_lr=0.05, sampling="permutation"),
                           generator=gen)
    fit(learner, u, i, r, batch_size=16, max_epochs=2, generator=gen)
    trainer = GPLTrainer(learner, model, clicks, objective=objective, lam=lam, beta=0.7, base="mse", prop_lr=0.05,
                         prop_weight_decay=0.0, prop_batch_size=64, gamma=0.05, generator=gen)
    hist = trainer.run(u, i, r, rounds=rounds, prop_epochs=2, joint_epochs=2, batch_size=16)
    return trainer, learner, model, hist, (clicks, u, i, r)


def test_residuals_are_the_dr_residual_on_clicked_pairs_only():
    trainer, learner, _, _, (clicks, u, i, r) = _trainer(0, rounds=1)
    delta = trainer.residuals(u, i, r)
    with torch.no_grad():
        x, xt = learner.prediction(u, i).double().numpy(), learner.imputation(u, i).double().numpy()
    s, st, rr = 1 / (1 + np.exp(-x)), 1 / (1 + np.exp(-xt)), r.double().numpy()
    e = -(rr * np.log(s) + (1 - rr) * np.log(1 - s))
    e_hat = -(st * np.log(s) + (1 - st) * np.log(1 - s))  # the DR estimator's e_hat = l(y_hat, y_tilde)
    flat = delta.reshape(clicks.shape)
    np.testing.assert_allclose(flat[u, i].numpy(), e - e_hat, rtol=1e-4, atol=1e-5)
    assert bool((flat[clicks == 0] == 0).all()) and torch.isfinite(delta).all()
    assert torch.equal(gpl_residual(torch.tensor([2.0]), torch.tensor([0.5])), torch.tensor([1.5]))


def test_rounds_are_deterministic_by_seed_and_raise_clicked_propensities():
    a, la, ma, ha, (clicks, *_) = _trainer(5)
    b, lb, mb, hb, _ = _trainer(5)
    assert torch.equal(la.p_hat, lb.p_hat) and [s.monitor for s in ha] == [s.monitor for s in hb]
    assert all(torch.equal(p, q) for p, q in zip(ma.parameters(), mb.parameters()))
    assert len(ha) == 3 * 2  # 3 rounds of 2 joint epochs
    _, l0, *_ = _trainer(5, lam=0.0)
    clicked = clicks.reshape(-1) > 0
    # the GPL term's gradient is <= 0 on clicked pairs: with lambda > 0 their propensities end up higher
    assert la.p_hat[clicked].mean() > l0.p_hat[clicked].mean()
    _, lc, *_ = _trainer(6)
    assert not torch.equal(la.p_hat, lc.p_hat)


def test_zero_rounds_change_nothing():
    _, learner, model, hist, _ = _trainer(2, rounds=0)
    _, ref, ref_model, _, _ = _trainer(2, rounds=1)
    assert hist == []
    torch.manual_seed(2)  # the learner's table after round 0 is the untouched model's
    clicks, *_ = _toy()
    assert torch.equal(learner.p_hat, propensity_table(model, *clicks.shape, 0.05).reshape(-1))
    assert not torch.equal(learner.p_hat, ref.p_hat)


def test_bad_trainer_input_named():
    clicks, u, i, r = _toy()
    model = PropensityModel(*clicks.shape, 4)
    table = propensity_table(model, *clicks.shape, 0.05)
    learner = JointLearner(table, JointConfig("dr", "dr_mse", dim=4, G=1))
    kw = dict(prop_lr=0.05, prop_weight_decay=0.0, prop_batch_size=64, gamma=0.05)
    with pytest.raises(ValueError, match="propensity objective 'nope'"):
        GPLTrainer(learner, model, clicks, objective="nope", **kw)
    with pytest.raises(ValueError, match="imputation model"):
        GPLTrainer(JointLearner(table, JointConfig("ips", None, dim=4)), model, clicks, **kw)
    with pytest.raises(ValueError, match="`gamma`"):
        GPLTrainer(learner, model, clicks, **(kw | dict(gamma=0.0)))
    with pytest.raises(ValueError, match="`beta`"):
        GPLTrainer(learner, model, clicks, beta=2.0, **kw)
    with pytest.raises(ValueError, match="`clicks`"):
        GPLTrainer(learner, model, clicks[:3], **kw)
    with pytest.raises(ValueError, match="`rounds`"):
        GPLTrainer(learner, model, clicks, **kw).run(u, i, r, rounds=-1, prop_epochs=1, joint_epochs=1, batch_size=8)
    with pytest.raises(ValueError, match="`propensities`"):
        learner.set_propensities(torch.zeros_like(table))
    raw = json.loads(C.config_path("coat").read_text())
    raw["methods"]["dr_mse_gpl"]["gpl_beta"] = 1.5
    with pytest.raises(ValueError, match=r"methods.dr_mse_gpl.gpl_beta must be a number in \[0, 1\]"):
        C.parse_config(raw, C.config_path("coat"))


# ---- the method in the toolkit ----------------------------------------------------------------------
def test_registered_as_the_row_and_configured_everywhere():
    m = METHODS["dr_mse_gpl"]
    assert m.table3_row == "DR-MSE-GPL" in TABLE3_ROWS and (m.estimator, m.imputation_loss) == ("dr", "dr_mse")
    assert m.propensity_objective == "gpl" and PROPENSITY_OBJECTIVES["gpl"].var_norm == "paper"
    assert METHODS["dr_mse_gpl_published"].propensity_objective_spec.var_norm == "published"
    assert set(m.propensity_objective_keys) == {"gpl_lam", "gpl_beta", "gpl_rounds", "gpl_prop_epochs",
                                                "gpl_joint_epochs"} <= set(m.own_keys)
    cfg = C.load_config("coat")
    sigs = {C.run_signature(cfg, get_method(n), cfg.method_params(get_method(n)), 100)
            for n in ("dr_mse", "dr_mse_gpl", "dr_mse_gpl_published")}
    assert len(sigs) == 3
    for path in sorted(C.CONFIG_DIR.glob("*.json")):
        cfg = C.load_config(path.stem)
        for name in ("dr_mse_gpl", "dr_mse_gpl_published"):
            entry = cfg.methods[name]
            assert entry.status, (path.name, name)
            assert cfg.imputed_error_of(get_method(name)) == cfg.imputed_error_of(get_method("dr_mse")), path.name


def test_zero_rounds_reproduce_dr_mse_and_the_cache_serves_no_refit(coat_one_thread, tmp_path):
    cfg, data = coat_one_thread
    ref = run_one(data, cfg, get_method("dr_mse"), cfg.method_params(get_method("dr_mse")), 2024, max_epochs=3,
                  split="val", show_progress=False)
    method = get_method("dr_mse_gpl")
    params = cfg.method_params(method) | {"gpl_rounds": 0}
    cache = PropensityCache(tmp_path / "cache")
    got = run_one(data, cfg, method, params, 2024, max_epochs=3, split="val", show_progress=False,
                  propensity_cache=cache)
    assert got["auc"] == ref["auc"] and got["epochs"] == ref["epochs"] == 3
    assert got["propensity_epochs"] == ref["propensity_epochs"] and not got["propensity_cached"]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # the entry holds the fitted model too
    params = params | {"gpl_rounds": 2, "gpl_prop_epochs": 1, "gpl_joint_epochs": 2, "gpl_lam": 1.0}
    one = run_one(data, cfg, method, params, 2024, max_epochs=3, split="val", show_progress=False, history=True)
    two = run_one(data, cfg, method, params, 2024, max_epochs=3, split="val", show_progress=False)
    # the rounds continue the cached model: the run equals a fit of its own, bitwise
    hit = run_one(data, cfg, method, params, 2024, max_epochs=3, split="val", show_progress=False,
                  propensity_cache=cache)
    assert hit["propensity_cached"] and hit["auc"] == one["auc"] and hit["epochs"] == one["epochs"]
    assert one["auc"] == two["auc"] != ref["auc"] and one["epochs"] == 3 + 2 * 2
    assert one["propensity_epochs"] == ref["propensity_epochs"] + 2
    fit_rows = [h["epoch"] for h in one["history"] if h["stage"] == "fit"]
    assert fit_rows == list(range(1, 8))


def test_table3_trains_the_dr_mse_gpl_row(coat_table3_rows):
    cells = coat_table3_rows(["dr_mse_gpl"])["DR-MSE-GPL"]
    assert " ± " in cells[1] and 0.3 < float(cells[1].split(" ± ")[0]) < 1, cells  # trained, AUC measured
    assert cells[2].startswith("0.7565"), cells  # the paper's Coat AUC beside it
