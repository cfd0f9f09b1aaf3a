"""TDR-CL (Li, Lyu, Zheng, Wu, ICLR 2023; BADR Table 3 row "TDR-CL"): the targeting regression (T3)
and the collaborative-learning imputation loss (C1) against a numpy transcription, the normal
equation that makes DR's bias term vanish, the identity "TDR's prediction gradient = DR-JL's with
eps_hat fixed", bad input refused by name, the pure-PyTorch path, the method registered as the row
and configured in every shipped config, and one ``table3`` epoch end to end on Coat."""
import math

import numpy as np
import pytest
import torch

from estimators import ESTIMATORS, IMPUTATION_LOSSES, _ext, tdr_cl_imputation_loss
from estimators.joint_loss import Form, dr_imputation_step, tdr_cl_imputation_step
from estimators.targeting import clever_covariate, targeting_epsilon
from estimators.training import JointConfig, JointLearner, TDRCLImputationLoss
from estimators.training.losses import imputation_loss, prediction_loss
from reproduce import config as C
from reproduce.methods import METHODS, TABLE3_ROWS

pytestmark = pytest.mark.usefixtures("restore_runtime")

RTOL = 1e-12


# ---- numpy transcription --------------------------------------------------------------------------
def _np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _np_bce(x, t):
    """l(sigmoid(x), t) as the cross-entropy of probabilities."""
    p = _np_sigmoid(x)
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def np_epsilon(e, e_hat, p_hat):
    """(T3) by numpy's least squares: e - e_hat regressed on h = 1/p_hat - 1, no weights, no intercept."""
    h = 1 / p_hat - 1
    if not np.any(h):
        return 0.0
    return float(np.linalg.lstsq(h[:, None], e - e_hat, rcond=None)[0][0])


def np_tdr_cl(e, e_hat, o, p_hat):
    """(C1) over one batch D: (1/|D|) sum_{o=1} (e - e_tilde)^2 / p_hat, e_tilde = e_hat + eps h."""
    c = o == 1
    eps = np_epsilon(e[c], e_hat[c], p_hat[c])
    e_tilde = e_hat[c] + eps * (1 / p_hat[c] - 1)
    return float(np.sum((e[c] - e_tilde) ** 2 / p_hat[c]) / o.size)


def np_tdr_cl_step(xt_b, x_b, r_b, p_hat_b, imputed_error="paper"):
    """(C1) on a clicked batch B from logits: sum_B w (e - e_hat - eps h)^2."""
    e = _np_bce(x_b, r_b)
    e_hat = _np_bce(xt_b, _np_sigmoid(x_b)) if imputed_error == "published" else _np_bce(x_b, _np_sigmoid(xt_b))
    eps = np_epsilon(e, e_hat, p_hat_b)
    return float(np.sum((e - e_hat - eps * (1 / p_hat_b - 1)) ** 2 / p_hat_b))


@pytest.fixture
def batch():
    rng = np.random.default_rng(3)
    n = 40
    o = (rng.random(n) < 0.4).astype(float)
    o[:2] = 1
    return dict(e=rng.random(n) * 3, e_hat=rng.random(n) * 3, o=o, p_hat=rng.uniform(0.02, 1, n))


@pytest.fixture
def step():
    rng = np.random.default_rng(7)
    b, g = 37, 3
    return dict(x_b=rng.normal(size=b) * 2, r_b=rng.integers(0, 2, b).astype(float), p_hat_b=rng.uniform(0.05, 1, b),
                x_u=rng.normal(size=g * b) * 2, xt_b=rng.normal(size=b), xt_u=rng.normal(size=g * b),
                p_hat_u=rng.uniform(0.05, 1, g * b))


def _t(d, **grad):
    return {k: torch.tensor(v, dtype=torch.float64).requires_grad_(grad.get(k, False)) for k, v in d.items()}


# ---- the loss -------------------------------------------------------------------------------------
def test_epsilon_is_least_squares_on_the_clicked_pairs(batch):
    c = batch["o"] == 1
    t = _t(batch)
    got = targeting_epsilon((t["e"] - t["e_hat"])[c], clever_covariate(t["p_hat"])[c])
    assert got.shape == (1,) and not got.requires_grad
    assert math.isclose(float(got), np_epsilon(batch["e"][c], batch["e_hat"][c], batch["p_hat"][c]), rel_tol=RTOL)
    # the corrected error e_tilde = e_hat + eps h on every pair, and eps = 0 when every h is 0
    e_tilde = t["e_hat"] + got * clever_covariate(t["p_hat"])
    np.testing.assert_allclose(e_tilde.numpy(), batch["e_hat"] + float(got) * (1 / batch["p_hat"] - 1), rtol=RTOL)
    zero = targeting_epsilon(torch.ones(3, dtype=torch.float64), clever_covariate(torch.ones(3, dtype=torch.float64)))
    assert float(zero) == 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_function_matches_numpy(batch, dtype):
    """(C1) over D, 1-D and 2-D (mean of per-batch values, eps fitted per batch), NaN errors on
    unclicked pairs ignored in value and gradient."""
    e = np.where(batch["o"] == 1, batch["e"], np.nan)
    args = [torch.tensor(a, dtype=dtype) for a in (e, batch["e_hat"], batch["o"], batch["p_hat"])]
    args[1].requires_grad_(True)
    value = tdr_cl_imputation_loss(*args)
    want = np_tdr_cl(batch["e"], batch["e_hat"], batch["o"], batch["p_hat"])
    assert math.isclose(float(value.detach()), want, rel_tol=RTOL if dtype == torch.float64 else 1e-5)
    (g,) = torch.autograd.grad(value, args[1])
    assert bool(torch.isfinite(g).all()) and bool((g[torch.tensor(batch["o"]) == 0] == 0).all())
    two = [a.detach().reshape(2, -1) for a in args]
    rows = [np_tdr_cl(*(a[k] for a in (batch["e"].reshape(2, -1), batch["e_hat"].reshape(2, -1),
                                        batch["o"].reshape(2, -1), batch["p_hat"].reshape(2, -1)))) for k in range(2)]
    assert math.isclose(float(tdr_cl_imputation_loss(*two)), np.mean(rows), rel_tol=1e-5)


@pytest.mark.parametrize("imputed_error", ["paper", "published"])
def test_step_matches_numpy_and_reuses_dr(step, imputed_error):
    """The step form on B against numpy, with DR-JL's eq. (6) step weights and imputed error: at
    eps = 0 (every p_hat = 1) it is exactly ``dr_imputation_step``."""
    t = _t(step, xt_b=True)
    got = imputation_loss("tdr_cl", t["xt_b"], t["x_b"], t["r_b"], t["p_hat_b"], imputed_error=imputed_error)
    want = np_tdr_cl_step(step["xt_b"], step["x_b"], step["r_b"], step["p_hat_b"], imputed_error)
    assert math.isclose(float(got), want, rel_tol=1e-10)
    module = TDRCLImputationLoss(imputed_error=imputed_error)
    assert float(module(t["xt_b"], t["x_b"], t["r_b"], t["p_hat_b"])) == float(got)
    # gradient into x_t with eps held fixed: -2 w (e - e_tilde) d e_hat / d x_t
    (g,) = torch.autograd.grad(got, t["xt_b"])
    x, xt, r, p = step["x_b"], step["xt_b"], step["r_b"], step["p_hat_b"]
    e = _np_bce(x, r)
    if imputed_error == "published":
        e_hat, de_hat = _np_bce(xt, _np_sigmoid(x)), _np_sigmoid(xt) - _np_sigmoid(x)
    else:
        e_hat, de_hat = _np_bce(x, _np_sigmoid(xt)), -x * _np_sigmoid(xt) * (1 - _np_sigmoid(xt))
    resid = e - e_hat - np_epsilon(e, e_hat, p) * (1 / p - 1)
    np.testing.assert_allclose(g.numpy(), -2 / p * resid * de_hat, rtol=1e-8)
    form, ones = Form(imputed_error=imputed_error), torch.ones_like(t["p_hat_b"])
    assert float(tdr_cl_imputation_step(t["xt_b"], t["x_b"], t["r_b"], ones, None, None, form)) == float(
        dr_imputation_step(t["xt_b"], t["x_b"], t["r_b"], ones, None, None, form))


def test_normal_equation_kills_the_dr_bias_term(batch):
    """sum_{o=1} h (e - e_tilde) = 0, so DR (eq. 7) with e_tilde equals EIB (eq. 5) with e_tilde."""
    t = _t(batch)
    c = t["o"] == 1
    h = clever_covariate(t["p_hat"])
    eps = targeting_epsilon((t["e"] - t["e_hat"])[c], h[c])
    e_tilde = t["e_hat"] + eps * h
    assert abs(float((h[c] * (t["e"] - e_tilde)[c]).sum())) < 1e-12
    dr_value = ESTIMATORS["dr"].function(t["e"], e_tilde, t["o"], t["p_hat"])
    eib_value = ESTIMATORS["eib"].function(t["e"], e_tilde, t["o"])
    assert math.isclose(float(dr_value), float(eib_value), rel_tol=RTOL)
    # with e_hat (not targeted) the bias term is not 0 here: the identity is the targeting's doing
    assert not math.isclose(float(ESTIMATORS["dr"].function(t["e"], t["e_hat"], t["o"], t["p_hat"])),
                            float(ESTIMATORS["eib"].function(t["e"], t["e_hat"], t["o"])), rel_tol=1e-6)


def test_tdr_prediction_gradient_is_dr_jl_s(step):
    """TDR's prediction loss, eq. (7) with e_tilde = e_hat + eps h on B and U (eps fitted on B,
    detached), has DR-JL's gradient in the prediction logits; the values differ by the constant
    eps (sum_U h - sum_B h) / |U|."""
    t = _t(step, x_b=True, x_u=True)
    form = Form()
    e = form.l(t["x_b"], t["r_b"])
    e_hat_b, e_hat_u = form.imputed(t["x_b"], t["xt_b"]), form.imputed(t["x_u"], t["xt_u"])
    h_b, h_u = clever_covariate(t["p_hat_b"]), clever_covariate(t["p_hat_u"])
    eps = targeting_epsilon(e - e_hat_b, h_b)
    assert float(eps) != 0.0
    tdr = ((e / t["p_hat_b"]).sum() - (e_hat_b + eps * h_b).sum() + (e_hat_u + eps * h_u).sum()) / t["x_u"].numel()
    dr = prediction_loss("dr", t["x_b"], t["r_b"], t["p_hat_b"], t["x_u"], t["xt_b"], t["xt_u"])
    g_tdr = torch.autograd.grad(tdr, (t["x_b"], t["x_u"]))
    g_dr = torch.autograd.grad(dr, (t["x_b"], t["x_u"]))
    for a, b in zip(g_tdr, g_dr):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    constant = float(eps) * (float(h_u.sum()) - float(h_b.sum())) / t["x_u"].numel()
    assert math.isclose(float(tdr) - float(dr), constant, rel_tol=1e-9, abs_tol=1e-12)


def test_all_propensities_one_is_finite_and_dr():
    """sum h^2 = 0: eps = 0, the loss is eq. (6) and its gradient finite."""
    e_hat = torch.tensor([0.2, 0.9, 0.4], dtype=torch.float64, requires_grad=True)
    e, o = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64), torch.tensor([1, 1, 0])
    p = torch.ones(3, dtype=torch.float64)
    value = tdr_cl_imputation_loss(e, e_hat, o, p)
    assert float(value) == float(IMPUTATION_LOSSES["dr"].function(e, e_hat, o, p))
    assert bool(torch.isfinite(torch.autograd.grad(value, e_hat)[0]).all())


@pytest.mark.parametrize("change, match", [
    ({"p_hat": [0.0, 0.5, 0.5]}, "`p_hat`"),
    ({"p_hat": [1e-99, 0.5, 0.5]}, "`p_hat`"),  # below p_hat_floor(float64, 2) on a clicked pair
    ({"o": [2.0, 1.0, 0.0]}, "`o`"),
    ({"e": [float("nan"), 1.0, 0.0]}, "`e`"),
    ({"e_hat": [float("inf"), 1.0, 0.0]}, "`e_hat`"),
    ({"e_hat": [0.1, 0.2]}, "`e_hat`"),
])
def test_bad_input_named(change, match):
    kw = {"e": [1.0, 0.5, 0.3], "e_hat": [0.2, 0.1, 0.4], "o": [1.0, 1.0, 0.0], "p_hat": [0.3, 0.5, 0.5]}
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        tdr_cl_imputation_loss(**{k: torch.tensor(v, dtype=torch.float64) for k, v in kw.items()})


def test_bad_step_input_named(step):
    t = _t(step)
    with pytest.raises(ValueError, match="`p_hat_b`"):
        imputation_loss("tdr_cl", t["xt_b"], t["x_b"], t["r_b"], torch.zeros_like(t["p_hat_b"]))
    with pytest.raises(ValueError, match="unknown imputation loss 'tdr'"):
        JointConfig(estimator="dr", imputation_loss="tdr")


# ---- training path --------------------------------------------------------------------------------
def test_trains_on_the_pure_pytorch_path(monkeypatch):
    """No fused kernel implements tdr_cl: a joint-learning step with it never reaches the
    extension's imputation operators and the step is not the fused one (DR-JL's is, when the
    extension is built); its prediction loss, DR's, may still take DR's own kernel."""
    assert "tdr_cl" not in _ext.IMPUTATION_KERNELS
    gen = torch.Generator().manual_seed(0)
    p_hat = torch.rand(6, 8, generator=gen).clamp(0.1, 1)
    users, items, r = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 4]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    fused = {}
    for kind in ("dr", "tdr_cl"):
        learner = JointLearner(p_hat, JointConfig(estimator="dr", imputation_loss=kind, dim=4, G=2),
                               generator=torch.Generator().manual_seed(1))
        if kind == "tdr_cl":
            def refuse(*args, **kwargs):
                raise AssertionError("a fused loss operator was called for tdr_cl")
            for op in ("imputation_loss_and_grads", "imputation_loss"):
                monkeypatch.setattr(_ext, op, refuse)
        out = learner.step(users, items, r)
        assert all(math.isfinite(v) for v in out.values()), out
        fused[kind] = getattr(learner, "_fused", False)
    assert fused["tdr_cl"] is False
    if _ext.built() and _ext.backend() == "fused":
        assert fused["dr"] is True


# ---- the method -----------------------------------------------------------------------------------
def test_registered_as_the_tdr_cl_row():
    method, dr_jl = METHODS["tdr_cl"], METHODS["dr_jl"]
    assert (method.label, method.table3_row) == ("TDR-CL", "TDR-CL") and "TDR-CL" in TABLE3_ROWS
    assert (method.estimator, method.imputation_loss) == ("dr", "tdr_cl")
    assert method.keys == dr_jl.keys and method.own_keys == dr_jl.own_keys
    spec = IMPUTATION_LOSSES["tdr_cl"]
    assert spec.function is tdr_cl_imputation_loss and spec.step is tdr_cl_imputation_step
    assert spec.dr_family and not spec.needs_u and spec.params == ()


def test_every_shipped_config_starts_from_dr_jl(shipped_entries):
    """An untuned entry is DR-JL's values (imputed_error included); a tuned one sets the same keys."""
    entries = shipped_entries("tdr_cl")
    assert {p.stem for p, *_ in entries} >= {"coat", "yahoo", "kuairec", "default", "kuairec@0.2", "kuairec@0.4",
                                            "kuairec@0.6", "kuairec@0.8"}
    for path, tdr, status, dr_jl in entries:
        if status.startswith("tuned"):
            assert set(tdr) == set(dr_jl) and tdr.get("imputed_error") == dr_jl.get("imputed_error"), path
        else:
            assert status == "untuned: DR-JL's tuned values" and tdr == dr_jl, path
        cfg = C.load_config(path.stem)
        assert cfg.run_options(METHODS["tdr_cl"]) == cfg.run_options(METHODS["dr_jl"])
        a = C.run_signature(cfg, METHODS["tdr_cl"], cfg.method_params(METHODS["tdr_cl"]), 3)
        assert a != C.run_signature(cfg, METHODS["dr_jl"], cfg.method_params(METHODS["dr_jl"]), 3)


def test_table3_trains_the_tdr_cl_row(coat_table3_rows):
    cells = coat_table3_rows(["tdr_cl"])["TDR-CL"]
    assert " ± " in cells[1] and 0.3 < float(cells[1].split(" ± ")[0]) < 1, cells  # trained, AUC measured
    assert cells[2].startswith("0.7571"), cells  # the paper's Coat AUC beside it