"""The propensity-free methods CVIB, DIB and DAMF (issue 19): each loss against a numpy
transcription of its equations written from the formulas (probabilities, explicit pair
matrices, scalar loops), bad input refused by name, DAMF's adversarial gradients, the models'
regularisation, and the rows trained end to end through ``table3``."""
import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from estimators import propensity_free as P
from estimators.joint_loss import bce_clamped
from estimators.registry import PROPENSITY_FREE
from estimators.training import PropensityFreeConfig, PropensityFreeLearner, fit
from estimators.training.propensity_free import DAMFMF, DIBMF, reverse_gradient
from reproduce import config as C
from reproduce.methods import METHODS, TABLE3_ROWS, Method
from reproduce.train import run_one

pytestmark = pytest.mark.usefixtures("restore_runtime")

ROWS = {"cvib": "CVIB", "dib": "DIB", "damf": "DAMF"}


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _bce(p, t):
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def _draw(rng, n_b, n_u=None):
    x_b = rng.normal(0, 2, n_b)
    r = (rng.random(n_b) < 0.4).astype(np.float64)
    x_u = None if n_u is None else rng.normal(-1, 2, n_u)
    return x_b, r, x_u


def _t(a):
    return torch.tensor(a, dtype=torch.float64)


# ---- the losses against their equations ---------------------------------------------------------
def cvib_numpy(x_b, r, x_u, alpha, gamma):
    """CVIB: factual BCE + alpha * H(mean factual prediction, mean counterfactual prediction) +
    gamma * mean_B sum_y p log p."""
    p, q = _sigmoid(x_b), _sigmoid(x_u)
    m_plus, m_minus = p.mean(), q.mean()
    factual = np.mean([_bce(pi, ri) for pi, ri in zip(p, r)])
    contrastive = -(m_plus * math.log(m_minus) + (1 - m_plus) * math.log(1 - m_minus))
    confidence = np.mean([pi * math.log(pi) + (1 - pi) * math.log(1 - pi) for pi in p])
    return factual + alpha * contrastive + gamma * confidence


def dib_numpy(x_z, x_r, r, alpha, gamma):
    """DIB eq. (3) in its mutual-information form, each I(.; y) = H(y) - H(y | .) with H(y | .) the
    cross-entropy of that component's logit, and I(z; r) = I(z; y) - H(y | r) + H(y | z, r)."""
    h_y = 5.0  # any constant: it cancels
    h_z = np.mean(_bce(_sigmoid(x_z), r))
    h_r = np.mean(_bce(_sigmoid(x_r), r))
    h_zr = np.mean(_bce(_sigmoid(x_z + x_r), r))
    i_zy, i_ry = h_y - h_z, h_y - h_r
    i_zr = i_zy - h_r + h_zr
    # eq. (3) without beta I(z; x) (the optimiser's weight decay), less its constant part -(1 + alpha - gamma) H(y)
    return (-i_zy + gamma * i_zr - alpha * i_ry) + (1 + alpha - gamma) * h_y


def damf_numpy(x_b, r, x_u, xd_b, xd_u, beta):
    """DAMF: naive risk on B + beta * (mean over U - mean over B of the squared probability gap)."""
    gap = lambda a, b: (_sigmoid(a) - _sigmoid(b)) ** 2  # noqa: E731
    naive = sum(_bce(_sigmoid(a), t) for a, t in zip(x_b, r)) / len(x_b)
    target = sum(gap(a, b) for a, b in zip(x_u, xd_u)) / len(x_u)
    source = sum(gap(a, b) for a, b in zip(x_b, xd_b)) / len(x_b)
    return naive + beta * (target - source)


@pytest.mark.parametrize("seed", range(5))
def test_losses_match_their_equations(seed):
    rng = np.random.default_rng(seed)
    n_b, n_u = int(rng.integers(1, 40)), int(rng.integers(1, 120))
    x_b, r, x_u = _draw(rng, n_b, n_u)
    alpha, gamma = float(rng.uniform(0, 2)), float(rng.uniform(0, 1))
    got = P.cvib_loss(_t(x_b), _t(r), _t(x_u), alpha=alpha, gamma=gamma)["loss"]
    assert float(got) == pytest.approx(cvib_numpy(x_b, r, x_u, alpha, gamma), rel=1e-12, abs=1e-12)

    x_r = rng.normal(0, 2, n_b)
    got = P.dib_loss(_t(x_b), _t(x_r), _t(r), alpha=alpha / 4, gamma=gamma)["loss"]
    assert float(got) == pytest.approx(dib_numpy(x_b, x_r, r, alpha / 4, gamma), rel=1e-12, abs=1e-12)

    xd_b, xd_u = rng.normal(0, 2, n_b), rng.normal(0, 2, n_u)
    got = P.damf_loss(_t(x_b), _t(r), _t(x_u), _t(xd_b), _t(xd_u), beta=alpha)["loss"]
    assert float(got) == pytest.approx(damf_numpy(x_b, r, x_u, xd_b, xd_u, alpha), rel=1e-12, abs=1e-12)


def test_loss_gradients_and_limits():
    rng = np.random.default_rng(7)
    x_b, r, x_u = _draw(rng, 16, 48)
    xb, xu = _t(x_b).requires_grad_(), _t(x_u).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: P.cvib_loss(a, _t(r), b, alpha=0.7, gamma=0.3)["loss"], (xb, xu))
    # CVIB's contrastive term trains the counterfactual pairs too
    P.cvib_loss(xb, _t(r), xu, alpha=1.0, gamma=0.0)["loss"].backward()
    assert float(xu.grad.abs().sum()) > 0
    # without their extra terms, CVIB and DAMF are the factual cross-entropy and DIB (gamma = alpha = 0) too
    plain = torch.nn.functional.binary_cross_entropy_with_logits(_t(x_b), _t(r))
    assert float(P.cvib_loss(_t(x_b), _t(r), _t(x_u), alpha=0.0, gamma=0.0)["loss"]) == pytest.approx(float(plain))
    assert float(P.dib_loss(_t(x_b), _t(x_u[:16]), _t(r), alpha=0.0, gamma=0.0)["loss"]) == pytest.approx(float(plain))
    assert float(P.damf_loss(_t(x_b), _t(r), _t(x_u), _t(x_u[:16]), _t(x_u[::-1].copy()),
                             beta=0.0)["loss"]) == pytest.approx(float(plain))
    # extreme logits stay finite, value and gradient
    big = torch.tensor([800.0, -800.0, 30.0], requires_grad=True)
    lab = torch.tensor([0.0, 1.0, 1.0])
    for out in (P.cvib_loss(big, lab, -big, alpha=1.0, gamma=0.1), P.dib_loss(big, -big, lab),
                P.damf_loss(big, lab, big, -big, -big)):
        out["loss"].backward()
        assert math.isfinite(out["loss"].item()) and bool(torch.isfinite(big.grad).all())
        big.grad = None


@pytest.mark.parametrize("call, match", [
    (lambda x, r: P.cvib_loss(x, r, x, alpha=-1.0), "`alpha` must be a finite number >= 0; got -1.0"),
    (lambda x, r: P.cvib_loss(x, r, x, gamma=math.nan), "`gamma` must be a finite number >= 0; got nan"),
    (lambda x, r: P.cvib_loss(x, r[:2], x), "`x_b` has 4 logits but `r` 2 labels"),
    (lambda x, r: P.cvib_loss(x, r, x[:0]), "`x_u` must be a non-empty 1-D floating tensor"),
    (lambda x, r: P.cvib_loss(x, torch.tensor([0.0, 1.0, math.nan, 1.0]), x), r"`r` \(conversion labels"),
    (lambda x, r: P.dib_loss(x, x, r * 2), "must hold only 0 and 1"),
    (lambda x, r: P.dib_loss(x, x, r, gamma=1.5), r"`gamma` must be a finite number \[0, 1\]; got 1.5"),
    (lambda x, r: P.dib_loss(x, x.long(), r), "`x_r_b` must be a non-empty 1-D floating tensor"),
    (lambda x, r: P.damf_loss(x, r, x, x, x[:3]), "`x_u` and `xd_u` must cover the same pairs U"),
    (lambda x, r: P.damf_loss(x, r, x, x, x, kind="abs"), "`kind` must be one of"),
    (lambda x, r: P.damf_loss(x, r, x * math.inf, x, x), "`x_u` holds a NaN or infinite logit"),
])
def test_bad_input_rejected_by_name(call, match):
    x, r = torch.tensor([0.3, -1.2, 2.0, 0.1]), torch.tensor([0.0, 1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match=match):
        call(x, r)


def test_damf_players_get_their_own_gradients():
    """Through the gradient-reversal layer, one backward pass gives the predictor the gradient of
    factual + beta * PMD and the second hypothesis minus the gradient of PMD; a small step of the
    second hypothesis raises PMD, one of the predictor lowers it."""
    torch.manual_seed(0)
    model = DAMFMF(20, 30, 4).double()
    ub, ib, uu, iu = (torch.randint(n, (k,)) for n, k in ((20, 32), (30, 32), (20, 96), (30, 96)))
    r = torch.bernoulli(torch.full((32,), 0.3, dtype=torch.float64))
    beta = 0.2
    model.objective(ub, ib, r, uu, iu, P.bce_with_logits, beta=beta)["loss"].backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    def pmd():
        xd = lambda u, i: (model.user_d(u) * model.item_d(i)).sum(-1)  # noqa: E731
        return P.damf_loss(model(ub, ib), r, model(uu, iu), xd(ub, ib), xd(uu, iu), beta=1.0)["pmd"]

    params = dict(model.named_parameters())
    d_pmd = dict(zip(params, torch.autograd.grad(pmd(), list(params.values()))))
    factual = P.damf_loss(model(ub, ib), r, model(uu, iu), model(uu, iu)[:32], model(uu, iu), beta=0.0)["factual"]
    d_fact = dict(zip(["user.weight", "item.weight"],
                      torch.autograd.grad(factual, [params["user.weight"], params["item.weight"]])))
    for name in ("user.weight", "item.weight"):
        torch.testing.assert_close(got[name], d_fact[name] + beta * d_pmd[name])
    for name in ("user_d.weight", "item_d.weight"):
        torch.testing.assert_close(got[name], -d_pmd[name])
    before = float(pmd())
    with torch.no_grad():
        for name in ("user_d.weight", "item_d.weight"):
            params[name] -= 1e-2 * got[name]
    raised = float(pmd())
    with torch.no_grad():
        for name in ("user.weight", "item.weight"):
            params[name] -= 1e-2 * d_pmd[name]
    assert raised > before and float(pmd()) < raised
    x = torch.randn(5, requires_grad=True)
    reverse_gradient(x, 3.0).sum().backward()
    assert torch.equal(x.grad, torch.full((5,), -3.0))


def test_models_regularise_as_their_papers():
    """DIB decays its unbiased tables only (eq. 3's compression of z) and predicts from them; DAMF's
    second hypothesis has its own fixed decay; CVIB decays its one MF."""
    dib = DIBMF(5, 6, 3)
    groups = dib.param_groups(0.01)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert {id(p) for p in groups[0]["params"]} == {id(dib.user.weight), id(dib.item.weight)}
    users, items = torch.tensor([0, 4]), torch.tensor([5, 1])
    torch.testing.assert_close(dib(users, items), (dib.user.weight[users] * dib.item.weight[items]).sum(-1))
    damf = DAMFMF(5, 6, 3, lambda_pmd=0.3)
    assert [g["weight_decay"] for g in damf.param_groups(0.01)] == [0.01, 0.3]


def _toy(seed=0, n_users=30, n_items=40, n=600):
    g = torch.Generator().manual_seed(seed)
    users, items = torch.randint(n_users, (n,), generator=g), torch.randint(n_items, (n,), generator=g)
    r = (torch.rand(n, generator=g) < torch.sigmoid((users % 3 - items % 2).float())).float()
    return users, items, r


@pytest.mark.parametrize("name", list(ROWS))
def test_learner_trains_deterministically(name):
    users, items, r = _toy()

    def train(seed):
        torch.manual_seed(seed)
        learner = PropensityFreeLearner(30, 40, PropensityFreeConfig(name, dim=4, G=2, lr=0.05),
                                        generator=torch.Generator().manual_seed(seed))
        history = fit(learner, users, items, r, batch_size=64, max_epochs=15, generator=learner.generator)
        return [h.monitor for h in history], learner.predict(users, items)

    monitors, scores = train(3)
    again, scores_again = train(3)
    assert monitors == again and torch.equal(scores, scores_again)
    assert monitors[-1] < monitors[0]  # it learns the factual labels


@pytest.mark.parametrize("kwargs, match", [
    ({"objective": "cvib2"}, "unknown propensity-free objective 'cvib2'; expected one of cvib, dib, damf"),
    ({"G": 0}, "`G` must be a positive integer; got 0"),
    ({"lr": 0.0}, "`lr` must be a finite number > 0; got 0.0"),
    ({"params": {"beta": 0.1}}, r"`params`: \['beta'\] are not parameters of 'cvib'"),
    ({"params": {"alpha": -2.0}}, r"`params\['alpha'\]` of 'cvib' must be a finite number >= 0; got -2.0"),
    ({"cross_entropy": "exact"}, "`cross_entropy` must be one of"),
])
def test_bad_config_rejected_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PropensityFreeConfig(**{"objective": "cvib", **kwargs})


def test_learner_rejects_bad_batches():
    learner = PropensityFreeLearner(3, 4, PropensityFreeConfig("damf", dim=2))
    with pytest.raises(ValueError, match="`items` holds id 4, outside 0..3"):
        learner.step(torch.tensor([0, 1]), torch.tensor([1, 4]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="must hold only 0 and 1"):
        learner.step(torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0.0, math.nan]))


# ---- the rows ----------------------------------------------------------------------------------
def test_registered_as_rows():
    assert set(PROPENSITY_FREE) == set(ROWS)
    for name, row in ROWS.items():
        method = METHODS[name]
        assert method.propensity_free == name and method.table3_row == row and row in TABLE3_ROWS
        assert not method.uses_propensity and method.estimator is None and method.entire_space is None
        spec = method.propensity_free_spec
        assert method.keys == ("lr", "weight_decay") + (("G",) if spec.needs_u else ()) + tuple(
            f"{name}_{p}" for p in spec.params)
    with pytest.raises(ValueError, match="takes no estimator"):
        Method("bad", "Bad", "ips", None, None, "both", propensity_free="cvib")
    cfg = C.load_config("coat")
    sigs = {C.run_signature(cfg, METHODS[n], cfg.method_params(METHODS[n]), 100) for n in ROWS}
    assert len(sigs) == len(ROWS)


@pytest.mark.parametrize("method, key, value, match", [
    ("cvib", "cvib_alpha", -1, "methods.cvib.cvib_alpha must be a number >= 0; got -1"),
    ("dib", "dib_gamma", 2, r"methods.dib.dib_gamma must be a number in \[0, 1\]; got 2"),
    ("damf", "gamma", 0.1, "methods.damf.gamma is not a key of method 'damf'"),
    ("dib", "prop_lr", 0.1, "methods.dib.prop_lr is a propensity setting, but the method uses no propensity model"),
])
def test_bad_config_values_rejected(method, key, value, match):
    raw = copy.deepcopy(dict(C.load_config("coat").raw))
    raw["methods"][method][key] = value
    with pytest.raises(ValueError, match="coat.json: " + match):
        C.parse_config(raw, Path("coat.json"))


@pytest.fixture(scope="module")
def coat(coat_one_thread):
    return coat_one_thread


def test_clamped_cross_entropy_is_the_configs(coat):
    """Coat's config computes cross-entropies as the published code (clamped): the runs use it."""
    cfg, data = coat
    assert cfg.cross_entropy == "clamped"
    method = METHODS["cvib"]
    params = cfg.method_params(method)
    a = run_one(data, cfg, method, params, 2024, max_epochs=1, split="val", show_progress=False, history=True)
    logits = C.parse_config({**copy.deepcopy(dict(cfg.raw)), "cross_entropy": "logits"}, cfg.path)
    b = run_one(data, logits, method, params, 2024, max_epochs=1, split="val", show_progress=False, history=True)
    # the clamped form rounds saturated probabilities: the first epoch's loss differs in its last digits
    assert a["history"][-1]["monitor"] != b["history"][-1]["monitor"]
    assert C.run_signature(cfg, method, params, 2) != C.run_signature(logits, method, params, 2)
    x, t = torch.tensor([40.0, -3.0]), torch.tensor([0.0, 1.0])
    assert float(P.cvib_loss(x, t, x, l=bce_clamped)["factual"]) != float(P.cvib_loss(x, t, x)["factual"])


def test_table3_trains_every_propensity_free_method(coat_table3_rows):
    rows = coat_table3_rows(list(ROWS), max_epochs=2)
    for name, row in ROWS.items():
        cells = rows[METHODS[name].label]
        assert " ± " in cells[1] and 0.3 < float(cells[1].split(" ± ")[0]) < 1, cells  # trained, AUC measured
        assert cells[2] != "—", cells  # the paper's number beside it
        assert "not implemented" not in " ".join(rows[row]), cells