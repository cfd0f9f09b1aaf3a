"""DCE-TDR (Kweon and Yu, WWW 2024, on the toolkit's TDR reading; BADR Table 3 row "DCE-TDR"): the
calibration experts (C1) and the calibration losses (C3, C4) against numpy transcriptions in
float64, their gradients, calibrated propensities in [gamma, 1], the per-user holdout (disjoint,
fixed by the seed), no validation, test or unclicked label reaching training, DCE with identity
calibrators = TDR-CL's step, bad input refused by name, the method registered and configured, and
one ``table3`` epoch end to end on Coat."""
import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch

from estimators.calibration import (CalibrationExperts, calibrated_logit, calibrated_propensity, gate_log_probs,
                                    holdout_clicked, imputation_calibration_loss, mf_logit_moments,
                                    propensity_calibration_loss, propensity_calibration_risk, user_logit_moments)
from estimators.training import DCEConfig, DCELearner, JointConfig, JointLearner, fit_propensity_calibration
from reproduce import config as C
from reproduce.methods import CALIBRATION_KEYS, METHODS, SEARCH_SPACE, TABLE3_ROWS, Method
from reproduce.train import DCE_HOLDOUT, calibration_split, run_one

pytestmark = pytest.mark.usefixtures("restore_runtime")


# ---- numpy transcriptions (float64) ----------------------------------------------------------------
def _np_sigmoid(z):
    return 1 / (1 + np.exp(-z))


def np_gate(gate_logits, T=1.0, gumbel=None):
    """pi = softmax((log softmax(g) + G) / T), row-wise."""
    g = gate_logits - gate_logits.max(axis=1, keepdims=True)
    log_sm = g - np.log(np.exp(g).sum(axis=1, keepdims=True))
    z = (log_sm + (0 if gumbel is None else gumbel)) / T
    z = z - z.max(axis=1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)


def np_experts(s, f, W, c, a, b):
    """(C1) C = sum_k pi_k sigmoid(a_k s + b_k), pi = softmax(W f + c)."""
    pi = np_gate(f @ W.T + c)
    return (pi * _np_sigmoid(s[:, None] * a[None, :] + b[None, :])).sum(axis=1)


def np_c3(C_v, C_m, z_m, n_pairs):
    """(C3) [sum_V -log C + (N / M) sum_M (1 - z)(-log(1 - C))] / |V|."""
    return (np.sum(-np.log(C_v)) + n_pairs / len(C_m) * np.sum((1 - z_m) * -np.log(1 - C_m))) / len(C_v)


def np_c4(C_v, r, w):
    """(C4) sum_V w BCE(C, r) / |V|."""
    return np.sum(w * -(r * np.log(C_v) + (1 - r) * np.log(1 - C_v))) / len(C_v)


@pytest.fixture
def experts64():
    torch.manual_seed(0)
    ex = CalibrationExperts(2, 4).double()
    with torch.no_grad():
        ex.a.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
        ex.b.copy_(torch.tensor([-2.0, -0.5, 0.3, 1.0]))
    n = 9
    s = torch.randn(n, dtype=torch.float64) * 3
    f = torch.randn(n, 2, dtype=torch.float64)
    return ex, s, f


def _np_params(ex):
    return [t.detach().numpy() for t in (ex.gate.weight, ex.gate.bias, ex.a, ex.b)]


# ---- C1 -------------------------------------------------------------------------------------------
def test_experts_match_numpy(experts64):
    ex, s, f = experts64
    want = np_experts(s.numpy(), f.numpy(), *_np_params(ex))
    got = torch.sigmoid(ex(s, f)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    log_c, log_1mc = ex.log_probs(s, f)
    np.testing.assert_allclose(log_1mc.exp().detach().numpy(), 1 - want, rtol=1e-12)
    assert bool(((got > 0) & (got < 1)).all())


def test_gate_with_gumbel_and_temperature_matches_numpy():
    torch.manual_seed(1)
    g = torch.randn(6, 3, dtype=torch.float64)
    gum = -torch.log(-torch.log(torch.rand(6, 3, dtype=torch.float64)))
    for T, noise in ((1.0, None), (0.3, gum), (1e-3, gum)):
        want = np_gate(g.numpy(), T, None if noise is None else noise.numpy())
        np.testing.assert_allclose(gate_log_probs(g, T, noise).exp().numpy(), want, rtol=1e-10, atol=1e-300)


def test_identity_calibrator_and_extreme_logits():
    s = torch.tensor([-800.0, -30.0, 0.0, 30.0, 800.0], dtype=torch.float64)
    one = torch.zeros(5, 1, dtype=torch.float64)
    unit, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    out = calibrated_logit(s, gate_log_probs(one), unit, zero)
    np.testing.assert_allclose(out.numpy(), s.numpy(), rtol=1e-12)
    ex = CalibrationExperts(1, 3).double()
    x = ex(s, torch.randn(5, 1, dtype=torch.float64))
    assert bool(torch.isfinite(x).all())
    loss = imputation_calibration_loss(x, torch.tensor([1.0, 0, 1, 0, 1], dtype=torch.float64),
                                       torch.ones(5, dtype=torch.float64))
    assert math.isfinite(float(loss.detach()))


# ---- C3, C4 ---------------------------------------------------------------------------------------
def test_calibration_losses_match_numpy(experts64):
    ex, s, f = experts64
    Cn = np_experts(s.numpy(), f.numpy(), *_np_params(ex))
    x = ex(s, f)
    v, m = slice(0, 3), slice(3, 9)
    z_m = torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.float64)
    got = propensity_calibration_loss(x[v], x[m], z_m, 1000)
    assert float(got) == pytest.approx(np_c3(Cn[v], Cn[m], z_m.numpy(), 1000), rel=1e-12)
    r = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.float64)
    w = 1 / torch.linspace(0.05, 1.0, 9, dtype=torch.float64)
    assert float(imputation_calibration_loss(x, r, w)) == pytest.approx(np_c4(Cn, r.numpy(), w.numpy()), rel=1e-12)
    # the fit's form: each side of C computed alone, the gate gathered from one row per user
    log_pi = ex.gate_log_probs(f)
    nll_v, nll_m = -ex.log_prob(s[v], log_pi[v], True), -ex.log_prob(s[m], log_pi[m], False)
    risk = propensity_calibration_risk(nll_v, nll_m, z_m, 1000)
    assert float(risk) == pytest.approx(np_c3(Cn[v], Cn[m], z_m.numpy(), 1000), rel=1e-12)


def test_c3_minimiser_is_the_membership_probability():
    """A constant calibrated probability c minimises C3 (in expectation) at |V| / N."""
    n_pairs, n_v, m = 1000, 40, 400
    gen = torch.Generator().manual_seed(0)
    z_m = (torch.rand(m, generator=gen, dtype=torch.float64) < n_v / n_pairs).to(torch.float64)
    grid = torch.linspace(0.01, 0.1, 901, dtype=torch.float64)
    vals = [float(propensity_calibration_loss(torch.full((n_v,), math.log(c / (1 - c)), dtype=torch.float64),
                                              torch.full((m,), math.log(c / (1 - c)), dtype=torch.float64), z_m,
                                              n_pairs)) for c in grid.tolist()]
    best = float(grid[int(np.argmin(vals))])
    # closed form of the sample loss's minimiser: n_v / (n_v + (N / M) * #{z = 0})
    assert best == pytest.approx(n_v / (n_v + n_pairs / m * float((1 - z_m).sum())), abs=1e-4)


def test_gradients(experts64):
    ex, s, f = experts64
    W, c, a, b = (t.detach().clone().requires_grad_() for t in (ex.gate.weight, ex.gate.bias, ex.a, ex.b))
    s_ = s.clone().requires_grad_()
    z_m = torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.float64)
    r = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.float64)
    w = torch.linspace(1.0, 5.0, 9, dtype=torch.float64)

    def logit(s_, W, c, a, b):
        return calibrated_logit(s_, gate_log_probs(f @ W.T + c), a, b)

    assert torch.autograd.gradcheck(logit, (s_, W, c, a, b))
    assert torch.autograd.gradcheck(lambda *p: propensity_calibration_loss(logit(*p)[:3], logit(*p)[3:], z_m, 50),
                                    (s_, W, c, a, b))
    assert torch.autograd.gradcheck(lambda *p: imputation_calibration_loss(logit(*p), r, w), (s_, W, c, a, b))


def test_user_logit_moments():
    t = torch.tensor([[0.0, 2.0], [1.0, 1.0], [4.0, 6.0]])
    f = user_logit_moments(t).double().numpy()
    raw = np.array([[1.0, 1.0], [1.0, 0.0], [5.0, 1.0]])
    want = (raw - raw.mean(0)) / raw.std(0)
    np.testing.assert_allclose(f, want, rtol=1e-6)


def test_mf_logit_moments_equal_the_table_moments():
    gen = torch.Generator().manual_seed(3)
    u, v = torch.randn(50, 8, generator=gen, dtype=torch.float64), torch.randn(30, 8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(mf_logit_moments(u, v), user_logit_moments(u @ v.T), rtol=1e-6, atol=1e-6)


# ---- propensity calibration ------------------------------------------------------------------------
def _synthetic(n_users=30, n_items=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.sigmoid(torch.randn(n_users, 1, generator=gen) + torch.randn(1, n_items, generator=gen) - 2.5)
    clicks = torch.rand(n_users, n_items, generator=gen) < p
    users, items = clicks.nonzero(as_tuple=True)
    labels = torch.full((n_users, n_items), float("nan"))  # unclicked labels: NaN, never read
    labels[clicks] = (torch.rand(int(clicks.sum()), generator=gen) < 0.4).float()
    return p, clicks, users, items, labels


def test_calibrated_propensity_in_gamma_1():
    p, clicks, users, items, _ = _synthetic()
    held = holdout_clicked(users, 0.1, torch.Generator().manual_seed(0))
    rho = float(held.double().mean())
    gamma = 0.05
    p_bar, ex, losses = fit_propensity_calibration(p, users[held], items[held], rho, gamma,
                                                   DCEConfig(n_experts=3, propcal_steps=50),
                                                   torch.Generator().manual_seed(0))
    assert p_bar.shape == p.shape and bool(torch.isfinite(p_bar).all())
    assert float(p_bar.min()) >= gamma and float(p_bar.max()) <= 1.0
    assert float(p_bar.min()) == pytest.approx(gamma)  # the floor binds for this data's small p
    assert len(losses) == 50 and losses[-1] < losses[0]
    np.testing.assert_allclose(calibrated_propensity(torch.tensor([0.0, 0.01, 0.5]), 0.1, 0.05).numpy(),
                               [0.05, 0.1, 1.0], rtol=1e-6)


# ---- the holdout --------------------------------------------------------------------------------
def test_holdout_is_per_user_disjoint_and_fixed_by_the_seed():
    users = torch.tensor([0] * 25 + [1] * 3 + [2] * 1 + [3] * 10, dtype=torch.int64)[torch.randperm(39)]
    m1 = holdout_clicked(users, 0.1, torch.Generator().manual_seed(5))
    m2 = holdout_clicked(users, 0.1, torch.Generator().manual_seed(5))
    assert torch.equal(m1, m2)
    counts = {u: int(m1[users == u].sum()) for u in range(4)}
    assert counts == {0: 3, 1: 1, 2: 0, 3: 1}  # min(ceil(0.1 n_u), n_u - 1)
    others = [holdout_clicked(users, 0.1, torch.Generator().manual_seed(s)) for s in range(6, 12)]
    assert any(not torch.equal(m1, o) for o in others)


def test_calibration_split_moves_training_pairs_only(coat_one_thread):
    cfg, data = coat_one_thread
    fit_data, (x_v, y_v), rho = calibration_split(data, 2024)
    again = calibration_split(data, 2024)
    np.testing.assert_array_equal(again[1][0], x_v)
    both = np.concatenate([fit_data.x_train, x_v])
    assert len(both) == len(data.x_train) and rho == pytest.approx(len(x_v) / len(data.x_train))
    key = lambda x: set(map(tuple, x.tolist()))  # noqa: E731
    assert key(fit_data.x_train).isdisjoint(key(x_v)) or len(key(data.x_train)) < len(data.x_train)
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, data.x_train.tolist()))
    for part in ("x_val", "y_val", "x_test", "y_test"):
        assert getattr(fit_data, part) is getattr(data, part)
    assert 0.09 < DCE_HOLDOUT * 0.9 < rho < 0.2


def test_training_reads_no_validation_or_test_label(coat_one_thread):
    """Flipping the validation (test) labels changes nothing a run trains: its test (validation)
    metrics are identical."""
    cfg, data = coat_one_thread
    method = METHODS["dce_tdr"]
    params = cfg.method_params(method)
    kw = dict(max_epochs=1, show_progress=False)
    base_test = run_one(data, cfg, method, params, 3, split="test", **kw)
    flipped_val = dataclasses.replace(data, y_val=1 - data.y_val)
    assert run_one(flipped_val, cfg, method, params, 3, split="test", **kw)["auc"] == base_test["auc"]
    base_val = run_one(data, cfg, method, params, 3, split="val", **kw)
    flipped_test = dataclasses.replace(data, y_test=1 - data.y_test)
    assert run_one(flipped_test, cfg, method, params, 3, split="val", **kw)["auc"] == base_val["auc"]


def _learner(p_bar, users, items, labels, dce=None, held=None):
    cfg = JointConfig(estimator="dr", imputation_loss="tdr_cl", dim=4, G=2, lr=0.01, imp_lr=0.01,
                      cross_entropy="clamped", sampling="uniform")
    if held is None:
        held = holdout_clicked(users, 0.2, torch.Generator().manual_seed(0))
    cal = (users[held], items[held], labels[users[held], items[held]])
    torch.manual_seed(0)
    learner = DCELearner(p_bar, cfg, dce or DCEConfig(n_experts=3, impcal_steps=4), cal,
                         generator=torch.Generator().manual_seed(0))
    return learner, held


def test_unclicked_labels_are_never_read():
    p, clicks, users, items, labels = _synthetic()
    learner, held = _learner(p.clamp(0.05, 1), users, items, labels)
    assert not bool(torch.isnan(learner.r_v).any())  # V's labels: clicked pairs only
    tr = ~held
    r = labels[users[tr], items[tr]]
    for _ in range(3):
        out = learner.step(users[tr][:16], items[tr][:16], r[:16])
        learner.end_epoch()
    assert all(math.isfinite(v) for v in out.values()) and math.isfinite(learner.impcal_losses[-1])
    assert all(bool(torch.isfinite(q).all()) for q in learner.imp_experts.parameters())


def test_gate_features_are_the_imputation_logits_moments():
    p, clicks, users, items, labels = _synthetic()
    learner, _ = _learner(p.clamp(0.05, 1), users, items, labels)
    uu, ii = torch.meshgrid(torch.arange(30), torch.arange(40), indexing="ij")
    with torch.no_grad():
        table = learner.imputation(uu.reshape(-1), ii.reshape(-1)).reshape(30, 40)
    torch.testing.assert_close(learner.imp_features, user_logit_moments(table), rtol=1e-5, atol=1e-5)


def test_identity_calibrators_give_tdr_cl_s_step():
    """With the imputation calibrator at the identity (one expert, a = 1, b = 0), a DCE step is the
    TDR-CL step (DR estimator + tdr_cl imputation loss) of JointLearner on the same propensities."""
    p, clicks, users, items, labels = _synthetic()
    p_bar = p.clamp(0.05, 1)
    learner, held = _learner(p_bar, users, items, labels, DCEConfig(n_experts=1))
    with torch.no_grad():
        learner.imp_experts.b.zero_()
    torch.manual_seed(0)
    ref = JointLearner(p_bar, learner.config, optimizer=torch.optim.Adam, generator=torch.Generator().manual_seed(0))
    ref.prediction.load_state_dict(learner.prediction.state_dict())
    ref.imputation.load_state_dict(learner.imputation.state_dict())
    tr = ~held
    b = (users[tr][:16], items[tr][:16], labels[users[tr][:16], items[tr][:16]])
    for _ in range(2):
        got, want = learner.step(*b), ref.step(*b)
        assert got == pytest.approx(want, rel=1e-6)
    for m1, m2 in ((learner.prediction, ref.prediction), (learner.imputation, ref.imputation)):
        for q1, q2 in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(q1, q2, rtol=1e-6, atol=1e-7)


def test_prediction_step_reads_the_calibrated_imputed_errors():
    """The prediction loss of a DCE step is DR (eq. 7, normaliser |U|) with p_bar and the
    calibrated imputed errors l(x, C(x_t, u)), C the imputation calibrator (numpy transcription)."""
    p, clicks, users, items, labels = _synthetic()
    p_bar = p.clamp(0.05, 1)
    learner, held = _learner(p_bar, users, items, labels)
    with torch.no_grad():  # a calibrator far from the identity
        learner.imp_experts.a.copy_(torch.tensor([0.3, 1.0, 2.5]))
        learner.imp_experts.b.copy_(torch.tensor([-2.0, 0.5, 1.5]))
    tr = ~held
    ub, ib = users[tr][:8], items[tr][:8]
    r = labels[ub, ib]
    uu, iu = torch.arange(16) % 30, (torch.arange(16) * 7) % 40
    rows, cols = torch.cat([ub, uu]), torch.cat([ib, iu])
    with torch.no_grad():
        x = learner.prediction(rows, cols).double().numpy()
        xt = learner.imputation(rows, cols).double().numpy()
    ex = learner.imp_experts
    cal = np_experts(xt, learner.imp_features[rows].double().numpy(),
                     *[t.detach().double().numpy() for t in (ex.gate.weight, ex.gate.bias, ex.a, ex.b)])
    q = _np_sigmoid(x)
    bce = lambda t: -(t * np.log(q) + (1 - t) * np.log(1 - q))  # noqa: E731
    e_hat = bce(cal)
    w = 1 / p_bar[ub, ib].double().numpy()
    e = bce(np.concatenate([r.double().numpy(), np.zeros(16)]))[:8]
    want = (np.sum(w * e) - np.sum(e_hat[:8]) + np.sum(e_hat[8:])) / 16
    got, _ = learner._module_prediction_update(rows, cols, 8, r, p_bar[ub, ib])
    assert got == pytest.approx(want, rel=1e-5)


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, match", [
    (lambda: CalibrationExperts(0, 3), "n_features"),
    (lambda: CalibrationExperts(2, 0), "n_experts"),
    (lambda: DCEConfig(n_experts=0), "n_experts"),
    (lambda: DCEConfig(impcal_lr=0.0), "impcal_lr"),
    (lambda: DCEConfig(propcal_weight_decay=-1.0), "propcal_weight_decay"),
    (lambda: holdout_clicked(torch.tensor([0, 1]), 1.5), "fraction"),
    (lambda: holdout_clicked(torch.tensor([0.0, 1.0]), 0.1), "users"),
    (lambda: propensity_calibration_loss(torch.zeros(2), torch.zeros(3), torch.tensor([0.0, 2.0, 1.0]), 10), "z_m"),
    (lambda: propensity_calibration_loss(torch.zeros(2), torch.zeros(3), torch.zeros(3), 0), "n_pairs"),
    (lambda: imputation_calibration_loss(torch.zeros(2), torch.zeros(3), torch.ones(2)), "r_v"),
    (lambda: imputation_calibration_loss(torch.zeros(2), torch.tensor([0.0, float("nan")]), torch.ones(2)), "r_v"),
    (lambda: fit_propensity_calibration(torch.zeros(3, 4), torch.tensor([0]), torch.tensor([1]), 0.1, 0.1,
                                        DCEConfig()), "propensities"),
    (lambda: calibrated_propensity(torch.ones(2), 0.0, 0.1), "rho"),
    (lambda: user_logit_moments(torch.tensor([[float("inf")]])), "logits"),
    (lambda: mf_logit_moments(torch.zeros(3, 2), torch.zeros(4, 5)), "users"),
    (lambda: mf_logit_moments(torch.zeros(3, 2), torch.full((4, 2), float("nan"))), "finite"),
    (lambda: propensity_calibration_risk(torch.zeros(2), torch.zeros(3), torch.zeros(2), 10), "nll_m"),
    (lambda: Method("bad", "Bad", "ips", None, None, "no imputation model", calibration=True), "calibration"),
])
def test_bad_input_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_learner_without_imputation_model_refused():
    with pytest.raises(ValueError, match="imputation model"):
        DCELearner(torch.full((2, 2), 0.5), JointConfig(estimator="ips", imputation_loss=None, dim=2), DCEConfig(),
                   (torch.tensor([0]), torch.tensor([1]), torch.tensor([1.0])))


# ---- registration, configs, end to end ----------------------------------------------------------------
def test_registered_as_the_dce_tdr_row():
    m = METHODS["dce_tdr"]
    assert m.table3_row == "DCE-TDR" and "DCE-TDR" in TABLE3_ROWS
    assert m.estimator == "dr" and m.imputation_loss == "tdr_cl" and m.calibration  # TDR-CL's reading of TDR
    assert set(CALIBRATION_KEYS) <= set(m.own_keys) and set(CALIBRATION_KEYS) <= set(SEARCH_SPACE)
    assert not any(k in METHODS["tdr_cl"].keys for k in CALIBRATION_KEYS)


def test_every_shipped_config_has_the_row():
    for path in sorted(C.CONFIG_DIR.glob("*.json")):
        entry = json.loads(path.read_text())["methods"]["dce_tdr"]
        assert entry["status"], path
        cfg = C.load_config(path.stem)
        params = cfg.method_params(METHODS["dce_tdr"])
        assert all(k in params for k in CALIBRATION_KEYS), path


def test_table3_trains_the_dce_tdr_row(coat_table3_rows):
    cells = coat_table3_rows(["dce_tdr"])["DCE-TDR"]
    ours, paper = cells[1], cells[2]
    assert " ± " in ours and 0.3 < float(ours.split(" ± ")[0]) < 1, cells
    assert paper not in ("—", ""), cells
