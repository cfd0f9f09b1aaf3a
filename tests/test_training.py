"""The training layer for any model: losses as modules, models with side features, the propensity
fit and the joint learner on ``torch.nn.Module``s, the epoch loop, and the checks at its doors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from estimators import (BADRImputationLoss, BADRLoss, DRLoss, EIBLoss, IPSLoss, MF, MRDRImputationLoss, NaiveLoss,
                        PredictionLoss, SNIPSLoss, TwoTower, badr, badr_imputation_loss, dr, eib, fit_propensity,
                        imputation_loss, ips, mrdr_imputation_loss, naive, prediction_loss, propensity_table, snips)
from estimators.registry import ESTIMATORS
from estimators.training import Diverged, EpochStats, JointConfig, JointLearner, StableDRLoss, fit

F = torch.nn.functional


def _batch(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, xt = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    click = torch.zeros(n, dtype=torch.bool)
    click[torch.randperm(n, generator=g)[: n // 3]] = True
    labels = torch.randint(2, (n,), generator=g).double()
    r = torch.where(click, labels, torch.full((n,), math.nan, dtype=torch.float64))
    p = 0.1 + 0.8 * torch.rand(n, generator=g, dtype=torch.float64)
    return x, xt, click, r, p


# ---- losses as modules ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_prediction_modules_equal_the_functions(name):
    x, xt, _, _, p = _batch()
    r = (torch.arange(12) % 2).double()
    x_u, xt_u = torch.randn(24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    module = PredictionLoss(name, cross_entropy="clamped")
    args = (x, r, p, x_u, xt, xt_u) if ESTIMATORS[name].needs_u else (x, r, p)
    assert torch.equal(module(*args), prediction_loss(name, *args, cross_entropy="clamped"))
    named = {"naive": NaiveLoss, "ips": IPSLoss, "snips": SNIPSLoss, "eib": EIBLoss, "dr": DRLoss, "badr": BADRLoss,
             "stabledr": StableDRLoss}
    assert type(named[name]()).__mro__[1] is PredictionLoss and named[name]().estimator == name


@pytest.mark.parametrize("name, estimator", [("naive", naive), ("ips", ips), ("snips", snips), ("eib", eib),
                                             ("dr", dr), ("badr", badr)])
def test_a_batch_of_exposures_is_the_estimator_over_it(name, estimator):
    """With ``click``, the module is the estimator's equation over the exposures D (eqs. 2, 3, 37, 5, 7,
    13) with e = l(x, r) and e_hat = l(x, sigmoid(x_t)); the unclicked rows' NaN labels never leak."""
    x, xt, click, r, p = _batch()
    x = x.requires_grad_()
    e = (F.softplus(x) - r.nan_to_num(0.0) * x).masked_fill(~click, math.nan)
    e_hat = F.softplus(x) - torch.sigmoid(xt) * x
    args = {"naive": (e, click), "ips": (e, click, p), "snips": (e, click, p),
            "eib": (e, e_hat, click)}.get(name, (e, e_hat, click, p))
    got = PredictionLoss(name)(x, r, p, xt_b=xt, click=click)
    torch.testing.assert_close(got, estimator(*args), rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(got, x)
    assert torch.isfinite(grad).all()
    other = r.clone()
    other[~click] = 7.0  # whatever the unclicked rows hold
    assert torch.equal(PredictionLoss(name)(x, other, p, xt_b=xt, click=click), got)


def test_imputation_modules_over_exposures_are_their_equations():
    x, xt, click, r, p = _batch()
    e = (F.softplus(x) - r.nan_to_num(0.0) * x).masked_fill(~click, math.nan)
    for module, fn in ((MRDRImputationLoss(), mrdr_imputation_loss), (BADRImputationLoss(), badr_imputation_loss),
                       (BADRImputationLoss(variant="paper"), badr_imputation_loss)):
        xt_g = xt.clone().requires_grad_()
        got = module(xt_g, x, r, p, click=click)
        torch.testing.assert_close(got, fn(e, F.softplus(x) - torch.sigmoid(xt) * x, click, p), rtol=1e-12, atol=0)
        assert torch.isfinite(torch.autograd.grad(got, xt_g)[0]).all()
    swapped = MRDRImputationLoss(imputed_error="published")(xt, x, r, p, click=click)
    torch.testing.assert_close(swapped, mrdr_imputation_loss(e, F.softplus(xt) - torch.sigmoid(x) * xt, click, p))
    # joint learning: the function, on the fused kernels where they apply
    torch.testing.assert_close(BADRImputationLoss()(xt[click], x[click], r[click], p[click], xt, x),
                               imputation_loss("badr", xt[click], x[click], r[click], p[click], xt, x))
    assert BADRImputationLoss().kind == "badr" and BADRImputationLoss(variant="paper").kind == "badr_paper"
    with pytest.raises(ValueError, match="variant"):
        BADRImputationLoss(variant="printed")
    with pytest.raises(ValueError, match="do not pass logits on sampled pairs"):
        MRDRImputationLoss()(xt, x, r, p, xt, x, click=click)


@pytest.mark.parametrize("module, zero", [(BADRLoss(), True), (SNIPSLoss(), True), (IPSLoss(), True),
                                          (NaiveLoss(), True), (DRLoss(), False), (EIBLoss(), False)])
def test_a_batch_without_clicks(module, zero):
    """Self-normalised estimators are 0/0 there: a zero loss with zero gradients, no exception; naive
    and IPS observe nothing (zero too); DR and EIB give the mean imputed error over U."""
    x, xt, _, r, p = _batch()
    x = x.requires_grad_()
    none = torch.zeros(12, dtype=torch.bool)
    loss = module(x, torch.full_like(r, math.nan), p, xt_b=xt, click=none)
    (grad,) = torch.autograd.grad(loss, x)
    if zero:
        assert float(loss.detach()) == 0.0 and float(grad.abs().max()) == 0.0
    else:
        torch.testing.assert_close(loss, (F.softplus(x) - torch.sigmoid(xt) * x).mean())
    for kind in ("dr", "badr", "badr_paper"):
        xt_g = xt.clone().requires_grad_()
        imp = BADRImputationLoss(variant="paper") if kind == "badr_paper" else (
            BADRImputationLoss() if kind == "badr" else MRDRImputationLoss())
        value = imp(xt_g, x.detach(), r, p, click=none)
        assert float(value.detach()) == 0.0 and float(torch.autograd.grad(value, xt_g)[0].abs().max()) == 0.0


def test_losses_check_values_and_the_click_mask():
    x, xt, click, r, p = _batch()
    r1 = (torch.arange(12) % 2).double()
    for bad_p in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="p_hat_b"):
            prediction_loss("ips", x, r1, p.clone().fill_(bad_p))
    with pytest.raises(ValueError, match="r_b"):
        prediction_loss("ips", x, r1 * 2, p)
    with pytest.raises(ValueError, match="empty"):
        prediction_loss("ips", x[:0], r1[:0], p[:0])
    with pytest.raises(ValueError, match="alpha"):
        imputation_loss("dr_mse", xt, x, r1, p, alpha=5)
    with pytest.raises(ValueError, match="click"):
        IPSLoss()(x, r, p, click=click[:5])
    with pytest.raises(ValueError, match="click"):
        IPSLoss()(x, r, p, click=click.double() * 2)
    with pytest.raises(ValueError, match="unknown estimator"):
        PredictionLoss("ipw")
    # validate=False skips the checks (trainers' inner loops)
    assert torch.isfinite(prediction_loss("ips", x, r1, p, validate=False))


# ---- models -----------------------------------------------------------------------------------
def test_two_tower_reads_its_side_features():
    g = torch.Generator().manual_seed(0)
    user_f, item_f = torch.randn(5, 3, generator=g), torch.randn(4, 2, generator=g)
    torch.manual_seed(0)
    model = TwoTower(5, 4, dim=3, hidden=(6,), user_features=user_f, item_features=item_f.numpy())
    users, items = torch.tensor([0, 4, 2]), torch.tensor([3, 0, 1])
    out = model(users, items)
    assert out.shape == (3,) and out.dtype == torch.float32
    model.user_features[4] += 1.0  # another user's features: another logit for that user only
    changed = model(users, items)
    assert changed[0] == out[0] and changed[1] != out[1]
    assert "user_features" in model.state_dict()
    assert TwoTower(5, 4)(users, items).shape == (3,)  # without side features
    with pytest.raises(ValueError, match="user_features"):
        TwoTower(5, 4, user_features=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="item_features"):
        TwoTower(5, 4, item_features=torch.full((4, 1), math.nan))
    with pytest.raises(ValueError, match="dropout"):
        TwoTower(5, 4, dropout=1.0)


def test_propensity_fit_of_any_model():
    """A two-tower propensity model, fitted on autograd over all pairs, recovers which users and
    items click more (the additive rates of the planted model)."""
    gen = torch.Generator().manual_seed(0)
    a, b = 2 * torch.randn(30, 1, generator=gen), 2 * torch.randn(1, 20, generator=gen)
    clicks = torch.bernoulli(torch.sigmoid(-2 + a + b), generator=gen)
    torch.manual_seed(0)
    model = TwoTower(30, 20, dim=4, hidden=(8,))
    losses = []
    epochs = fit_propensity(model, clicks, lr=0.03, weight_decay=0.0, batch_size=100, max_epochs=40, loss="bce",
                            generator=torch.Generator().manual_seed(1), on_epoch=lambda e, v: losses.append(v))
    assert epochs == len(losses) and losses[-1] < losses[0]
    p = propensity_table(model, 30, 20, gamma=0.05)
    assert p.shape == (30, 20) and float(p.min()) >= 0.05 and float(p.max()) <= 1.0
    corr = np.corrcoef(p.mean(1).numpy(), a.squeeze(1).numpy())[0, 1]
    assert corr > 0.8
    with pytest.raises(ValueError, match="click matrix"):
        fit_propensity(model, clicks.reshape(-1), lr=0.1, weight_decay=0.0, batch_size=10)
    with pytest.raises(ValueError, match="lr"):
        fit_propensity(model, clicks, lr=-0.1, weight_decay=0.0, batch_size=10)
    with pytest.raises(ValueError, match="gamma"):
        propensity_table(model, 30, 20, gamma=0.0)


# ---- the joint learner on modules -------------------------------------------------------------------
@pytest.mark.parametrize("estimator, kind, imputation_first", [
    ("badr", "badr", False), ("dr", "mrdr", False), ("badr", "dr_bias", True), ("ips", None, False),
    ("badr", "badr_paper", False), ("naive", None, False)])
def test_module_path_follows_the_fast_path(estimator, kind, imputation_first):
    """MF trained on autograd with torch.optim.Adam (the path of any model) follows the MF fast path."""
    cfg = JointConfig(estimator=estimator, imputation_loss=kind, dim=4, G=3, lr=0.01, weight_decay=1e-4, imp_lr=0.05,
                      imp_weight_decay=1e-5, cross_entropy="clamped", imputation_first=imputation_first)
    p_hat = torch.rand(7, 9, generator=torch.Generator().manual_seed(3)).clamp(0.1, 1)
    params, monitors = [], []
    for optimizer in (None, torch.optim.Adam):
        torch.manual_seed(0)
        learner = JointLearner(p_hat, cfg, optimizer=optimizer, generator=torch.Generator().manual_seed(1))
        assert learner.fast == (optimizer is None)
        g = torch.Generator().manual_seed(2)
        seen = []
        for _ in range(20):
            u, i = torch.randint(7, (5,), generator=g), torch.randint(9, (5,), generator=g)
            seen.append(learner.step(u, i, torch.randint(2, (5,), generator=g).float())["monitor"])
        models = [learner.prediction] + ([learner.imputation] if learner.imputation is not None else [])
        params.append([t.detach().clone() for m in models for t in m.parameters()])
        monitors.append(seen)
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(monitors[0], monitors[1], rtol=1e-5)


def test_joint_learning_of_two_towers_fits_a_planted_signal():
    gen = torch.Generator().manual_seed(0)
    n_users, n_items = 40, 50
    user_f, item_f = torch.randn(n_users, 3, generator=gen), torch.randn(n_items, 3, generator=gen)
    truth = torch.sigmoid(2 * user_f @ item_f.T)
    users = torch.randint(n_users, (600,), generator=gen)
    items = torch.randint(n_items, (600,), generator=gen)
    r = torch.bernoulli(truth[users, items], generator=gen)
    torch.manual_seed(0)

    def tower():
        return TwoTower(n_users, n_items, dim=4, hidden=(8,), user_features=user_f, item_features=item_f)

    learner = JointLearner(torch.full((n_users, n_items), 0.2), JointConfig(G=2, lr=0.02, imp_lr=0.01),
                           prediction=tower(), imputation=tower(), generator=gen)
    assert not learner.fast
    history = fit(learner, users, items, r, batch_size=100, max_epochs=30, generator=gen)
    assert all(isinstance(h, EpochStats) for h in history) and history[-1].epoch == len(history)
    assert history[-1].prediction_loss < history[0].prediction_loss
    pred = learner.predict(users, items)
    auc = (pred[r == 1][:, None] > pred[r == 0][None, :]).double().mean()
    assert auc > 0.8


def test_joint_config_checks_every_value():
    good = dict(estimator="dr", imputation_loss="dr_mse")
    for field, value in (("lr", -0.01), ("lr", math.nan), ("lr", "0.03"), ("weight_decay", -1.0), ("imp_lr", 0.0),
                         ("imp_weight_decay", -1e-3), ("alpha", 7.0), ("G", 2.7), ("G", 0), ("dim", 0),
                         ("imputation_first", "yes")):
        with pytest.raises(ValueError, match=f"`{field}`"):
            JointConfig(**good, **{field: value})
    JointConfig(estimator="ips", imputation_loss=None, imp_lr=0.0)  # no imputation model: imp_lr unused


def test_learner_checks_its_models_and_batches():
    p = torch.full((3, 4), 0.5)
    with pytest.raises(ValueError, match="no imputation model"):
        JointLearner(p, JointConfig(estimator="ips", imputation_loss=None), imputation=MF(3, 4, 2))
    with pytest.raises(ValueError, match="torch.nn.Module"):
        JointLearner(p, JointConfig(estimator="ips", imputation_loss=None), prediction=lambda u, i: u)
    with pytest.raises(ValueError, match="move the model"):
        JointLearner(p, JointConfig(estimator="ips", imputation_loss=None), prediction=MF(3, 4, 2).to("meta"))
    learner = JointLearner(p, JointConfig(estimator="ips", imputation_loss=None, dim=2))
    with pytest.raises(ValueError, match="`users` holds id 3, outside 0..2"):
        learner.step(torch.tensor([0, 3]), torch.tensor([0, 1]), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="`items` holds id -1"):
        learner.step(torch.tensor([0, 1]), torch.tensor([0, -1]), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="`r`"):
        learner.step(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([2.0, 0.0]))
    with pytest.raises(ValueError, match="int64"):
        learner.step(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 1]), torch.tensor([1.0, 0.0]))


def test_fit_raises_diverged_on_a_non_finite_loss():
    torch.manual_seed(0)
    learner = JointLearner(torch.full((5, 6), 0.5), JointConfig(estimator="ips", imputation_loss=None, dim=2,
                                                               lr=1e30))
    users, items = torch.arange(5), torch.arange(5)
    with pytest.raises(Diverged, match="lower the learning rates"):
        fit(learner, users, items, torch.ones(5), batch_size=2, max_epochs=50, generator=torch.Generator())
    with pytest.raises(ValueError, match="batch_size"):
        fit(learner, users, items, torch.ones(5), batch_size=6)
