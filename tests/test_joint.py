"""Joint-learning losses (from logits) and the JointLearner step.

The training-level losses are checked against a direct numpy transcription of the formulas
in ``estimators.joint_loss`` (which follow ../shared/notes/published-protocols.md and the
paper's eqs. 6-10, 13, 32), in float64.
"""
import numpy as np
import pytest
import torch

from estimators import JointConfig, JointLearner, badr_imputation_loss, imputation_loss, prediction_loss
from estimators.registry import ESTIMATORS
from estimators.registry import IMPUTATION_LOSSES as IMPUTATION_SPECS
from estimators.training.losses import imputation_loss_and_grads, imputation_loss_reference

PREDICTION_ESTIMATORS = tuple(ESTIMATORS)
IMPUTATION_LOSSES = tuple(IMPUTATION_SPECS)
IMPUTATION_LOSSES_DR = tuple(k for k, spec in IMPUTATION_SPECS.items() if spec.dr_family)

RTOL = 1e-10


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _bce(x, t):
    """l(sigmoid(x), t) written as the cross-entropy of probabilities."""
    p = _sigmoid(x)
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


@pytest.fixture
def step_inputs():
    rng = np.random.default_rng(7)
    b, g = 37, 4
    return dict(
        x_b=rng.normal(size=b) * 2, r_b=rng.integers(0, 2, b).astype(float), p_hat_b=rng.uniform(0.02, 1, b),
        x_u=rng.normal(size=g * b) * 2, xt_b=rng.normal(size=b), xt_u=rng.normal(size=g * b),
    )


def _t(d):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in d.items()}


def _numpy_prediction(estimator, x_b, r_b, p_hat_b, x_u, xt_b, xt_u):
    w = 1 / p_hat_b
    e = _bce(x_b, r_b)
    if estimator == "naive":
        return e.mean()
    if estimator == "ips":
        return (w * e).sum() / len(e)
    if estimator == "snips":
        return (w * e).sum() / w.sum()
    if estimator == "stabledr":  # SDR-est with U standing for D (tests/test_stabledr.py)
        return _bce(x_u, _sigmoid(xt_u)).mean() + (w * (e - _bce(x_b, _sigmoid(xt_b)))).sum() / w.sum()
    if estimator == "eib":  # eq. (5): DR with w = 1
        w = np.ones_like(w)
    num = (w * e).sum() - _bce(x_b, _sigmoid(xt_b)).sum() + _bce(x_u, _sigmoid(xt_u)).sum()
    return num / (w.sum() if estimator == "badr" else len(x_u))


def _dr_family_weights(kind, p_hat_b, alpha=0.3):
    """c of sum_B c (e - e_hat)^2 (eqs. 6, 8, 9, 10)."""
    w = 1 / p_hat_b
    mrdr, bias = w**2 * (1 - p_hat_b), w**3 * (1 - p_hat_b) ** 2
    return {"dr": w, "mrdr": mrdr, "dr_bias": bias, "dr_mse": alpha * bias + (1 - alpha) * mrdr, "tdr_cl": w}[kind]


def _dr_family_residual(kind, e, e_hat, p_hat_b):
    """The residual a DR-family loss squares: e - e_hat, and for TDR-CL e - e_hat - eps h with eps
    the OLS slope of e - e_hat on h = 1/p_hat - 1 over B."""
    d = e - e_hat
    if kind != "tdr_cl":
        return d
    h = 1 / p_hat_b - 1
    return d - np.dot(h, d) / np.dot(h, h) * h


def _numpy_imputation(kind, x_b, r_b, p_hat_b, x_u, xt_b, xt_u, alpha=0.3, imputed_error="paper"):
    w = 1 / p_hat_b
    e = _bce(x_b, r_b)
    if imputed_error == "published":  # the DR family, input and target swapped
        resid = _dr_family_residual(kind, e, _bce(xt_b, _sigmoid(x_b)), p_hat_b)
        return (_dr_family_weights(kind, p_hat_b, alpha) * resid**2).sum()
    if kind == "tdr_cl":
        return (w * _dr_family_residual(kind, e, _bce(x_b, _sigmoid(xt_b)), p_hat_b) ** 2).sum()
    if kind == "badr":
        e_hat_b = _bce(xt_b, _sigmoid(x_b))
        e_hat_u = _bce(xt_u, _sigmoid(x_u))
        est = ((w * e).sum() - e_hat_b.sum() + e_hat_u.sum()) / w.sum()
        return (w**2 * (e - e_hat_b + e_hat_u.mean() - est) ** 2).sum() / len(x_u)
    e_hat = _bce(x_b, _sigmoid(xt_b))
    sq = (e - e_hat) ** 2
    mrdr = (w**2 * (1 - p_hat_b) * sq).sum()
    bias = (w**3 * (1 - p_hat_b) ** 2 * sq).sum()
    if kind == "badr_paper":
        e_hat_u = _bce(x_u, _sigmoid(xt_u))
        big_e = e_hat_u.sum() / w.sum()
        est = (e_hat_u.sum() + (w * (e - e_hat)).sum()) / w.sum()
        return (w**2 * (e - e_hat + big_e - est) ** 2).sum() / w.sum() ** 2
    return {"dr": (w * sq).sum(), "mrdr": mrdr, "dr_bias": bias, "dr_mse": alpha * bias + (1 - alpha) * mrdr}[kind]


@pytest.mark.parametrize("estimator", PREDICTION_ESTIMATORS)
def test_prediction_loss_matches_numpy(estimator, step_inputs):
    t = _t(step_inputs)
    got = prediction_loss(estimator, t["x_b"], t["r_b"], t["p_hat_b"], t["x_u"], t["xt_b"], t["xt_u"])
    np.testing.assert_allclose(float(got), _numpy_prediction(estimator, **step_inputs), rtol=RTOL)


@pytest.mark.parametrize("kind", IMPUTATION_LOSSES)
def test_imputation_loss_matches_numpy(kind, step_inputs):
    t = _t(step_inputs)
    got = imputation_loss(kind, t["xt_b"], t["x_b"], t["r_b"], t["p_hat_b"], t["xt_u"], t["x_u"], alpha=0.3)
    np.testing.assert_allclose(float(got), _numpy_imputation(kind, alpha=0.3, **step_inputs), rtol=RTOL)


@pytest.mark.parametrize("kind", IMPUTATION_LOSSES_DR)
def test_published_imputed_error_matches_numpy(kind, step_inputs):
    """imputed_error="published": e_hat = l(x_t, sigmoid(x)), the gradient through the input:
    d/dx_t c (e - e_hat)^2 = -2 c (e - e_hat) (sigmoid(x_t) - sigmoid(x))."""
    t = {k: v.requires_grad_(k == "xt_b") for k, v in _t(step_inputs).items()}
    got = imputation_loss(kind, t["xt_b"], t["x_b"], t["r_b"], t["p_hat_b"], t["xt_u"], t["x_u"], alpha=0.3,
                          imputed_error="published")
    expected = _numpy_imputation(kind, imputed_error="published", **step_inputs)
    np.testing.assert_allclose(float(got.detach()), expected, rtol=RTOL)
    got.backward()
    x_b, xt_b, r_b = step_inputs["x_b"], step_inputs["xt_b"], step_inputs["r_b"]
    d = _dr_family_residual(kind, _bce(x_b, r_b), _bce(xt_b, _sigmoid(x_b)), step_inputs["p_hat_b"])
    expected = -2 * _dr_family_weights(kind, step_inputs["p_hat_b"]) * d * (_sigmoid(xt_b) - _sigmoid(x_b))
    np.testing.assert_allclose(t["xt_b"].grad.numpy(), expected, rtol=1e-8)
    paper = imputation_loss(kind, t["xt_b"], t["x_b"], t["r_b"], t["p_hat_b"], alpha=0.3)
    assert not torch.isclose(got, paper)  # a different loss, not a relabelling


@pytest.mark.parametrize("cross_entropy", ["logits", "clamped"])
def test_imputed_error_is_moot_in_error_mode(cross_entropy, step_inputs):
    """With imputation="error", e_hat = x_t in both forms."""
    t = _t(step_inputs)
    args = ("mrdr", t["xt_b"], t["x_b"], t["r_b"], t["p_hat_b"])
    paper = imputation_loss(*args, imputation="error", cross_entropy=cross_entropy)
    published = imputation_loss(*args, imputation="error", cross_entropy=cross_entropy, imputed_error="published")
    assert torch.equal(paper, published)


@pytest.mark.parametrize("fn", [imputation_loss, imputation_loss_and_grads, imputation_loss_reference])
def test_imputed_error_rejects_bad_names_and_badr_kinds(fn, step_inputs):
    t = _t(step_inputs)
    with pytest.raises(ValueError, match=r"`imputed_error` must be one of \('paper', 'published'\)"):
        fn("dr", t["xt_b"], t["x_b"], t["r_b"], t["p_hat_b"], imputed_error="swapped")
    for kind in ("badr", "badr_paper"):  # the BADR losses define their own imputed error
        with pytest.raises(ValueError, match="applies to the DR-family imputation losses"):
            fn(kind, t["xt_b"], t["x_b"], t["r_b"], t["p_hat_b"], t["xt_u"], t["x_u"], imputed_error="published")


def test_badr_paper_imputation_is_eq32_on_b_and_u(step_inputs):
    """badr_paper is eq. (32) on the batch B u U with o = 1 on B and o = 0 on U."""
    t = _t(step_inputs)
    got = imputation_loss("badr_paper", t["xt_b"], t["x_b"], t["r_b"], t["p_hat_b"], t["xt_u"], t["x_u"])
    bce = lambda x, q: torch.nn.functional.softplus(x) - q * x  # noqa: E731
    nu = t["x_u"].numel()
    e = torch.cat([bce(t["x_b"], t["r_b"]), torch.full((nu,), float("nan"), dtype=torch.float64)])
    e_hat = torch.cat([bce(t["x_b"], torch.sigmoid(t["xt_b"])), bce(t["x_u"], torch.sigmoid(t["xt_u"]))])
    o = torch.cat([torch.ones_like(t["x_b"]), torch.zeros(nu, dtype=torch.float64)])
    p_hat = torch.cat([t["p_hat_b"], torch.full((nu,), 0.5, dtype=torch.float64)])
    torch.testing.assert_close(got, badr_imputation_loss(e, e_hat, o, p_hat), rtol=RTOL, atol=0)


def test_gradients_reach_only_the_trained_model(step_inputs):
    t = {k: v.requires_grad_() for k, v in _t(step_inputs).items()}
    loss = prediction_loss("badr", t["x_b"], t["r_b"], t["p_hat_b"], t["x_u"], t["xt_b"], t["xt_u"])
    loss.backward()
    assert t["x_b"].grad is not None and t["x_u"].grad is not None
    assert t["xt_b"].grad is None and t["xt_u"].grad is None and t["p_hat_b"].grad is None
    t = {k: v.detach().requires_grad_() for k, v in t.items()}
    imputation_loss("badr", t["xt_b"], t["x_b"], t["r_b"], t["p_hat_b"], t["xt_u"], t["x_u"]).backward()
    assert t["x_b"].grad is None and t["x_u"].grad is None and t["p_hat_b"].grad is None
    # the published BADR imputation loss reaches the imputation model only through E_U
    assert t["xt_b"].grad is None and torch.isfinite(t["xt_u"].grad).all()


def test_extreme_logits_stay_finite():
    x = torch.tensor([-40.0, 40.0, 0.0], requires_grad=True)
    r = torch.tensor([1.0, 0.0, 1.0])
    p_hat = torch.tensor([1e-6, 1.0, 0.5])
    xt = torch.tensor([40.0, -40.0, 3.0])
    loss = prediction_loss("badr", x, r, p_hat, x.detach().repeat(2), xt, xt.repeat(2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("bad, match", [
    (dict(estimator="ipw"), "estimator"),
    (dict(imputation="regression"), "imputation"),
    (dict(cross_entropy="probabilities"), "cross_entropy"),
])
def test_prediction_loss_rejects_bad_names(bad, match, step_inputs):
    t = _t(step_inputs)
    kw = dict(estimator="dr", imputation="pseudo_label", cross_entropy="logits") | bad
    with pytest.raises(ValueError, match=match):
        prediction_loss(kw["estimator"], t["x_b"], t["r_b"], t["p_hat_b"], t["x_u"], t["xt_b"], t["xt_u"],
                        imputation=kw["imputation"], cross_entropy=kw["cross_entropy"])


@pytest.mark.parametrize("estimator", PREDICTION_ESTIMATORS)
def test_clamped_cross_entropy_equals_logits_form_for_moderate_logits(estimator, step_inputs):
    """The published (clamped, probability-space) form agrees with the exact one away from saturation."""
    t = _t(step_inputs)
    args = (estimator, t["x_b"], t["r_b"], t["p_hat_b"], t["x_u"], t["xt_b"], t["xt_u"])
    torch.testing.assert_close(prediction_loss(*args, cross_entropy="clamped"), prediction_loss(*args))


def test_losses_reject_shape_mismatch_and_missing_u(step_inputs):
    t = _t(step_inputs)
    with pytest.raises(ValueError, match="r_b"):
        prediction_loss("ips", t["x_b"], t["r_b"][:-1], t["p_hat_b"])
    with pytest.raises(ValueError, match="x_u"):
        prediction_loss("badr", t["x_b"], t["r_b"], t["p_hat_b"])
    with pytest.raises(ValueError, match="xt_u"):
        imputation_loss("badr", t["xt_b"], t["x_b"], t["r_b"], t["p_hat_b"])
    with pytest.raises(ValueError, match="unknown imputation loss 'ips'"):
        imputation_loss("ips", t["xt_b"], t["x_b"], t["r_b"], t["p_hat_b"])


@pytest.mark.parametrize("estimator, imp", [("naive", None), ("snips", None), ("dr", "mrdr"), ("badr", "badr")])
def test_joint_learner_fits_a_planted_signal(estimator, imp):
    """A few hundred steps on a planted low-rank CVR lower the loss and rank positives first."""
    gen = torch.Generator().manual_seed(0)
    n_users, n_items = 40, 50
    u_true, v_true = torch.randn(n_users, 3, generator=gen), torch.randn(n_items, 3, generator=gen)
    truth = torch.sigmoid(2 * u_true @ v_true.T)
    p = torch.full((n_users, n_items), 0.2)
    torch.manual_seed(0)
    learner = JointLearner(p, JointConfig(estimator=estimator, imputation_loss=imp, dim=8, G=2, lr=0.05, imp_lr=0.05),
                           generator=gen)
    users = torch.randint(n_users, (400,), generator=gen)
    items = torch.randint(n_items, (400,), generator=gen)
    r = torch.bernoulli(truth[users, items], generator=gen)
    first = learner.step(users, items, r)["prediction_loss"]
    for _ in range(300):
        last = learner.step(users, items, r)["prediction_loss"]
    assert last < first
    pred = learner.predict(users, items)
    auc = (pred[r == 1][:, None] > pred[r == 0][None, :]).double().mean()
    assert auc > 0.8


def test_joint_config_and_learner_validation():
    with pytest.raises(ValueError, match="imputation_loss"):
        JointConfig(estimator="badr", imputation_loss=None)
    with pytest.raises(ValueError, match="imputation_loss"):
        JointConfig(estimator="ips", imputation_loss="dr")
    with pytest.raises(ValueError, match="cross_entropy"):
        JointConfig(estimator="ips", imputation_loss=None, cross_entropy="exact")
    with pytest.raises(ValueError, match="`imputed_error` must be one of"):
        JointConfig(estimator="dr", imputation_loss="dr", imputed_error="swapped")
    for estimator, kind in (("badr", "badr"), ("badr", "badr_paper"), ("ips", None)):
        with pytest.raises(ValueError, match="imputed_error"):
            JointConfig(estimator=estimator, imputation_loss=kind, imputed_error="published")
    assert JointConfig(estimator="badr", imputation_loss="dr_mse", imputed_error="published").imputed_error \
        == "published"
    with pytest.raises(ValueError, match="propensities"):
        JointLearner(torch.zeros(3, 4), JointConfig(estimator="ips", imputation_loss=None))
    learner = JointLearner(torch.full((3, 4), 0.5), JointConfig(estimator="ips", imputation_loss=None, dim=2))
    with pytest.raises(ValueError, match="users"):
        learner.step(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([1.0, 0.0]))


# --------------------------------------------- the learner against the plain PyTorch trajectory
class _PlainJointLearner:
    """Algorithm 1 written the plain way, as the published code runs it: ``nn.Embedding``
    lookups taped by autograd and ``torch.optim.Adam``; the random draws in the learner's order."""

    def __init__(self, p_hat, cfg, *, generator):
        self.cfg, self.generator = cfg, generator
        self.n_users, self.n_items = p_hat.shape
        self.p_hat = p_hat.reshape(-1)
        self.prediction = torch.nn.ModuleList([torch.nn.Embedding(self.n_users, cfg.dim),
                                               torch.nn.Embedding(self.n_items, cfg.dim)])
        self.pred_opt = torch.optim.Adam(self.prediction.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.imputation = None
        if cfg.imputation_loss is not None:
            self.imputation = torch.nn.ModuleList([torch.nn.Embedding(self.n_users, cfg.dim),
                                                   torch.nn.Embedding(self.n_items, cfg.dim)])
            self.imp_opt = torch.optim.Adam(self.imputation.parameters(), lr=cfg.imp_lr,
                                            weight_decay=cfg.imp_weight_decay)

    @staticmethod
    def logits(model, users, items):
        return (model[0](users) * model[1](items)).sum(-1)

    def _prediction_step(self, users, items, r, p_hat, users_u, items_u):
        cfg = self.cfg
        x_b = self.logits(self.prediction, users, items)
        if self.imputation is None:
            loss = prediction_loss(cfg.estimator, x_b, r, p_hat, cross_entropy=cfg.cross_entropy)
        else:
            with torch.no_grad():
                xt_b, xt_u = self.logits(self.imputation, users, items), self.logits(self.imputation, users_u, items_u)
            loss = prediction_loss(cfg.estimator, x_b, r, p_hat, self.logits(self.prediction, users_u, items_u), xt_b,
                                   xt_u, cfg.imputation, cfg.cross_entropy)
        self.pred_opt.zero_grad()
        loss.backward()
        self.pred_opt.step()

    def _imputation_step(self, users, items, r, p_hat, users_u, items_u):
        cfg = self.cfg
        with torch.no_grad():
            x_b, x_u = self.logits(self.prediction, users, items), self.logits(self.prediction, users_u, items_u)
        loss = imputation_loss(cfg.imputation_loss, self.logits(self.imputation, users, items), x_b, r, p_hat,
                               self.logits(self.imputation, users_u, items_u), x_u, cfg.alpha, cfg.imputation,
                               cfg.cross_entropy, cfg.imputed_error)
        self.imp_opt.zero_grad()
        loss.backward()
        self.imp_opt.step()

    def step(self, users, items, r):
        p_hat = self.p_hat[users * self.n_items + items]
        users_u = items_u = None
        if self.imputation is not None:
            users_u = torch.randint(self.n_users, (self.cfg.G * users.numel(),), generator=self.generator)
            items_u = torch.randint(self.n_items, (self.cfg.G * users.numel(),), generator=self.generator)
            users_u = users_u.sort(stable=True).values  # the learner's order: users ascending
        args = (users, items, r, p_hat, users_u, items_u)
        if self.imputation is not None and self.cfg.imputation_first:
            self._imputation_step(*args)
        self._prediction_step(*args)
        if self.imputation is not None and not self.cfg.imputation_first:
            self._imputation_step(*args)


@pytest.mark.parametrize("estimator, kind, cross_entropy, imputation_first, imputed_error", [
    ("badr", "badr", "logits", False, "paper"), ("badr", "badr", "clamped", False, "paper"),
    ("dr", "dr", "logits", False, "paper"), ("badr", "mrdr", "clamped", False, "paper"),
    ("badr", "badr_paper", "logits", False, "paper"), ("ips", None, "logits", False, "paper"),
    ("naive", None, "logits", False, "paper"), ("badr", "badr", "clamped", True, "paper"),
    ("dr", "dr_mse", "logits", True, "paper"), ("dr", "dr", "clamped", False, "published"),
    ("badr", "dr_bias", "logits", True, "published"),
])
def test_learner_follows_the_plain_trajectory(estimator, kind, cross_entropy, imputation_first, imputed_error):
    """Same draws, same losses, same update order: the plain trajectory's parameters up to rounding."""
    cfg = JointConfig(estimator=estimator, imputation_loss=kind, dim=4, G=3, lr=0.01, weight_decay=1e-4,
                      imp_lr=0.05, imp_weight_decay=1e-5, cross_entropy=cross_entropy,
                      imputation_first=imputation_first, imputed_error=imputed_error)
    p_hat = torch.rand(7, 9, generator=torch.Generator().manual_seed(3)).clamp(0.1, 1)
    params = []
    for cls in (_PlainJointLearner, JointLearner):
        torch.manual_seed(0)
        learner = cls(p_hat, cfg, generator=torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(2)
        for _ in range(20):
            u, i = torch.randint(7, (5,), generator=g), torch.randint(9, (5,), generator=g)
            learner.step(u, i, torch.randint(2, (5,), generator=g).float())
        models = [learner.prediction] + ([learner.imputation] if learner.imputation is not None else [])
        params.append([t.detach().clone() for m in models for t in m.parameters()])
    assert len(params[0]) == len(params[1])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_learner_reports_the_published_monitor():
    """``monitor`` is sum_B w * l(y_hat', r) with the prediction after the step."""
    cfg = JointConfig(estimator="badr", imputation_loss="badr", dim=4, G=2, cross_entropy="clamped")
    torch.manual_seed(0)
    learner = JointLearner(torch.full((5, 6), 0.25), cfg, generator=torch.Generator().manual_seed(0))
    u, i, r = torch.tensor([0, 3, 4]), torch.tensor([5, 1, 2]), torch.tensor([1.0, 0.0, 1.0])
    out = learner.step(u, i, r)
    x = learner.prediction(u, i).detach()
    expected = (torch.nn.functional.binary_cross_entropy(torch.sigmoid(x), r, reduction="none") / 0.25).sum()
    assert out["monitor"] == pytest.approx(float(expected), rel=1e-6)


def test_permutation_sampling_draws_distinct_pairs_per_epoch():
    """sampling="permutation": consecutive slices of one permutation of all pairs per epoch."""
    propensities = torch.full((6, 5), 0.5)
    learner = JointLearner(propensities, JointConfig(dim=2, G=2, sampling="permutation"),
                           generator=torch.Generator().manual_seed(0))
    learner.start_epoch()
    drawn = [learner.sample_pairs(7) for _ in range(4)]  # 28 of the 30 pairs
    ids = torch.cat([u * 5 + i for u, i in drawn])
    assert ids.unique().numel() == 28 and int(ids.max()) < 30
    u, i = learner.sample_pairs(7)  # runs past the end: a fresh permutation
    assert (u * 5 + i).unique().numel() == 7
    learner.start_epoch()
    assert not torch.equal(torch.cat(learner.sample_pairs(7)), torch.cat(drawn[0]))
    with pytest.raises(ValueError, match="distinct pairs"):
        learner.sample_pairs(31)
    with pytest.raises(ValueError, match="sampling"):
        JointConfig(sampling="bootstrap")
