"""Entire-space objectives (estimators/multitask.py, registry ENTIRE_SPACE, the loss modules and the
multi-task models).

1. Each objective (ESMM eq. 5; ESCM2-IPS eqs. 21, 34; ESCM2-DR eqs. 23-26, 34; ESCM2-BADR, BADR
   eqs. 13 and 32 as ESCM2's regulariser; Multi-IPS / Multi-DR; DDPO, our reading) against a direct
   numpy transcription of its equations, float64, rtol 1e-10, 1-D and 2-D (K batches) inputs, and
   the gradients the equations give in closed form.
2. The propensity weights (and BADR's normaliser, DDPO's pseudo-labels) are detached: the CVR
   terms send no gradient to the CTR tower.
3. NaN conversion labels on unclicked exposures change neither the value nor any gradient.
4. Bad input raises ``ValueError`` naming the argument.
5. ESCM2 Proposition 4 (and Proposition 7, and DDPO's expectation): with the true CTR as
   propensity the Monte Carlo mean of the regulariser over click draws is the ideal CVR loss on
   the generated truth, within a CLT tolerance from the closed-form variance (ESCM2 Lemmas 2, 3).
6. ESCM2 Proposition 1's direction on a synthetic log: the ESMM-implied CVR overestimates the CVR
   over the exposures when clicks correlate with conversion; IPS with the true CTR does not.
7. Models (MMoE with categorical fields, the MF backbone), the registry entries, the modules, and
   the README example.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import _mc
import estimators
from estimators import (ENTIRE_SPACE, ESTIMATORS, DDPOLoss, EntireSpaceLoss, EntireSpaceMF, ESCM2Loss, ESMMLoss, MMoE,
                        MultiDRLoss, MultiIPSLoss, ddpo_loss, escm2_loss, esmm_loss, multi_dr_loss, multi_ips_loss)
from estimators.registry import TOWERS, EntireSpaceSpec, get_entire_space

RTOL = 1e-10
REPO = Path(__file__).resolve().parents[1]
SHAPES = [(60,), (3, 40)]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Small tensors: one intra-op thread avoids contention on a busy shared machine."""
    with _mc.single_thread():
        yield


# ----------------------------------------------------------------------------------------------
# Direct numpy transcriptions of the equations (float64)
# ----------------------------------------------------------------------------------------------
def _sig(x):
    return 1 / (1 + np.exp(-x))


def _bce(p, t):
    """ESCM2 eq. (2): -t log p - (1 - t) log(1 - p)."""
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def _prop(a, gamma, p_ext=None):
    return np.clip(_sig(a) if p_ext is None else p_ext, gamma, 1)


def np_ctr(a, o):
    """ESCM2 eq. (35): mean over D of delta(o, o_hat)."""
    return _bce(_sig(a), o).mean()


def np_ctcvr(a, b, o, r):
    """ESCM2 eqs. (5), (36): mean over D of delta(o * r, o_hat * r_hat)."""
    return _bce(_sig(a) * _sig(b), o * np.nan_to_num(r)).mean()


def np_ips(a, b, o, r, gamma, p_ext=None):
    """ESCM2 eq. (21): (1/|D|) sum o delta / o_hat."""
    delta = _bce(_sig(b), np.nan_to_num(r))
    return np.where(o == 1, delta / _prop(a, gamma, p_ext), 0.0).mean()


def np_dr(a, b, o, r, d, gamma, p_ext=None):
    """ESCM2 eqs. (23), (25), (26): R_err + R_imp."""
    delta = _bce(_sig(b), np.nan_to_num(r))
    p = _prop(a, gamma, p_ext)
    err = (d + np.where(o == 1, (delta - d) / p, 0.0)).mean()
    imp = np.where(o == 1, (delta - d) ** 2 / p, 0.0).mean()
    return err, imp


def np_badr(a, b, o, r, d, gamma, p_ext=None):
    """BADR eq. (13) and eq. (32) per batch (row), w = o / p, S = sum w; mean over rows with a click."""
    a, b, o, r, d = (np.atleast_2d(x) for x in (a, b, o, r, d))
    p_ext = None if p_ext is None else np.atleast_2d(p_ext)
    errs, imps = [], []
    for k in range(o.shape[0]):
        p = _prop(a[k], gamma, None if p_ext is None else p_ext[k])
        w = np.where(o[k] == 1, 1 / p, 0.0)
        s = w.sum()
        if s == 0:
            continue
        delta = np.where(o[k] == 1, _bce(_sig(b[k]), np.nan_to_num(r[k])), 0.0)
        err = np.sum(d[k] + w * (delta - d[k])) / s                                     # eq. (13)
        e_hat_mean = np.sum(d[k]) / s
        imps.append(np.sum(w**2 * (delta - d[k] + e_hat_mean - err) ** 2) / s**2)   # eq. (32)
        errs.append(err)
    return (np.mean(errs), np.mean(imps)) if errs else (0.0, 0.0)


def np_escm2(reg, a, b, o, r, d, gamma=0.05, lc=0.1, lg=1.0, p_ext=None):
    """ESCM2 eq. (34): L_CTR + lambda_c R + lambda_g L_CTCVR."""
    if reg is None:
        cvr = 0.0
    elif reg == "ips":
        cvr = np_ips(a, b, o, r, gamma, p_ext)
    else:
        cvr = sum((np_dr if reg == "dr" else np_badr)(a, b, o, r, d, gamma, p_ext))
    return np_ctr(a, o) + lc * cvr + lg * np_ctcvr(a, b, o, r)


def np_ddpo(a, b, c, o, r, gamma=0.05, lc=1.0, lp=1.0, lg=1.0, sn=True):
    """DDPO eq. (18): L_o + lambda_c L_r + lambda_p L_c + lambda_g L_t; L_r eq. (10), with the
    self-normalised weights of eq. (15) per batch (row) when ``sn``; soft labels eq. (9)."""
    p, q = np.clip(_sig(a), gamma, 1), np.clip(1 - _sig(a), gamma, 1)
    r0 = np.where(o == 1, np.nan_to_num(r), 0.0)
    soft = np.where(r0 == 1, 1.0, _sig(c))
    w_o, w_n = np.where(o == 1, 1 / p, 0.0), np.where(o == 0, 1 / q, 0.0)
    if sn:
        rows = lambda w: np.atleast_2d(w)  # noqa: E731
        w_o = (rows(w_o) / np.where(rows(w_o).sum(-1, keepdims=True) > 0, rows(w_o).sum(-1, keepdims=True), 1)
               ).reshape(o.shape)
        w_n = (rows(w_n) / np.where(rows(w_n).sum(-1, keepdims=True) > 0, rows(w_n).sum(-1, keepdims=True), 1)
               ).reshape(o.shape)
    cvr = ((w_o + w_n) * _bce(_sig(b), soft)).mean()
    conv = np.where(o == 1, _bce(_sig(c), r0), 0.0).mean()
    return np_ctr(a, o) + lc * cvr + lp * conv + lg * np_ctcvr(a, b, o, r)


def _log(seed, shape, click_rate=0.3):
    rng = np.random.default_rng(seed)
    o = (rng.random(shape) < click_rate).astype(float)
    o.reshape(-1, shape[-1])[:, 0] = 1.0  # every batch has a click
    r = np.where(o == 1, rng.integers(0, 2, shape), np.nan)
    return dict(a=rng.normal(0, 1.5, shape), b=rng.normal(0, 1.5, shape), c=rng.normal(0, 1.5, shape), o=o, r=r,
                d=rng.uniform(0.05, 2.0, shape))


def _t(batch, grad=()):
    return {k: torch.tensor(v, dtype=torch.float64, requires_grad=k in grad) for k, v in batch.items()}


def _close(got, want):
    got = got.detach() if isinstance(got, torch.Tensor) else got
    assert float(got) == pytest.approx(float(want), rel=RTOL, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# 1. Against the numpy transcriptions
# ----------------------------------------------------------------------------------------------
@settings(max_examples=25)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES), gamma=st.floats(0.01, 1.0),
       lc=st.floats(0.0, 3.0), lg=st.floats(0.0, 3.0), reg=st.sampled_from([None, "ips", "dr", "badr"]))
def test_escm2_matches_numpy(seed, shape, gamma, lc, lg, reg):
    b = _log(seed, shape)
    t = _t(b)
    out = escm2_loss(t["a"], t["b"], t["o"], t["r"], regulariser=reg, delta_hat=t["d"], gamma=gamma, lambda_c=lc,
                     lambda_g=lg)
    _close(out["loss"], np_escm2(reg, b["a"], b["b"], b["o"], b["r"], b["d"], gamma, lc, lg))
    _close(out["ctr"], np_ctr(b["a"], b["o"]))
    _close(out["ctcvr"], np_ctcvr(b["a"], b["b"], b["o"], b["r"]))
    if reg in ("dr", "badr"):
        err, imp = (np_dr if reg == "dr" else np_badr)(b["a"], b["b"], b["o"], b["r"], b["d"], gamma)
        _close(out["cvr_err"], err)
        _close(out["cvr_imp"], imp)


@settings(max_examples=25)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES), gamma=st.floats(0.01, 1.0),
       lc=st.floats(0.0, 3.0), lp=st.floats(0.0, 3.0), lg=st.floats(0.0, 3.0))
def test_esmm_multi_and_ddpo_match_numpy(seed, shape, gamma, lc, lp, lg):
    b = _log(seed, shape)
    t = _t(b)
    a, bb, o, r, d = b["a"], b["b"], b["o"], b["r"], b["d"]
    _close(esmm_loss(t["a"], t["b"], t["o"], t["r"], lambda_g=lg)["loss"], np_ctr(a, o) + lg * np_ctcvr(a, bb, o, r))
    _close(multi_ips_loss(t["a"], t["b"], t["o"], t["r"], gamma=gamma, lambda_c=lc)["loss"],
           np_ctr(a, o) + lc * np_ips(a, bb, o, r, gamma))
    _close(multi_dr_loss(t["a"], t["b"], t["o"], t["r"], delta_hat=t["d"], gamma=gamma, lambda_c=lc)["loss"],
           np_ctr(a, o) + lc * sum(np_dr(a, bb, o, r, d, gamma)))
    for sn in (True, False):
        _close(ddpo_loss(t["a"], t["b"], t["o"], t["r"], conv_logit=t["c"], gamma=gamma, lambda_c=lc, lambda_p=lp,
                         lambda_g=lg, self_normalise=sn)["loss"], np_ddpo(a, bb, b["c"], o, r, gamma, lc, lp, lg, sn))


def test_external_propensity_replaces_the_ctr_tower():
    b = _log(5, (3, 40))
    t = _t(b)
    p = np.random.default_rng(1).uniform(0.02, 1.0, b["o"].shape)
    for reg in ("ips", "dr", "badr"):
        out = escm2_loss(t["a"], t["b"], t["o"], t["r"], regulariser=reg, delta_hat=t["d"], p_hat=torch.tensor(p))
        _close(out["loss"], np_escm2(reg, b["a"], b["b"], b["o"], b["r"], b["d"], p_ext=p))


def test_escm2_without_regulariser_is_esmm():
    t = _t(_log(2, (60,)))
    assert float(escm2_loss(t["a"], t["b"], t["o"], t["r"], regulariser=None)["loss"]) == pytest.approx(
        float(esmm_loss(t["a"], t["b"], t["o"], t["r"])["loss"]), rel=RTOL)


def test_badr_batch_without_click_contributes_nothing():
    """Row 1 has no click: eq. (13) is undefined there; it contributes 0 and the mean runs over the
    rows with a click (the numpy transcription skips it the same way)."""
    b = _log(9, (3, 30))
    b["o"][1] = 0.0
    b["r"][1] = np.nan
    t = _t(b, grad="bd")
    out = escm2_loss(t["a"], t["b"], t["o"], t["r"], regulariser="badr", delta_hat=t["d"])
    err, imp = np_badr(b["a"], b["b"], b["o"], b["r"], b["d"], 0.05)
    _close(out["cvr_err"], err)
    _close(out["cvr_imp"], imp)
    out["loss"].backward()
    assert torch.isfinite(t["b"].grad).all() and torch.isfinite(t["d"].grad).all()
    assert float(t["d"].grad[1].abs().max()) == 0.0
    single = _t({k: v[1] for k, v in b.items()})
    assert float(escm2_loss(single["a"], single["b"], single["o"], single["r"], regulariser="badr",
                            delta_hat=single["d"])["cvr"]) == 0.0


@pytest.mark.parametrize("shape", SHAPES)
def test_cvr_gradients_are_the_weighted_residuals(shape):
    """d R / d b in closed form: IPS ``o (r_hat - r) / (p N)``; BADR ``w (r_hat - r) / (S_k K)``
    (the normaliser a constant); DDPO ``[o (r_hat - r) / p + (1 - o)(r_hat - t) / q] / N``."""
    b = _log(11, shape)
    gamma = 0.05
    r_hat, r0 = _sig(b["b"]), np.nan_to_num(b["r"])
    p = np.clip(_sig(b["a"]), gamma, 1)
    n = b["o"].size
    t = _t(b, grad="b")
    escm2_loss(t["a"], t["b"], t["o"], t["r"], regulariser="ips", gamma=gamma)["cvr"].backward()
    np.testing.assert_allclose(t["b"].grad.numpy(), b["o"] * (r_hat - r0) / p / n, rtol=RTOL, atol=1e-15)

    t = _t(b, grad="b")
    escm2_loss(t["a"], t["b"], t["o"], t["r"], regulariser="badr", delta_hat=t["d"], gamma=gamma)["cvr_err"].backward()
    w = b["o"] / p
    s = np.atleast_2d(w).sum(-1, keepdims=True).reshape(*shape[:-1], 1)
    k = 1 if len(shape) == 1 else shape[0]
    np.testing.assert_allclose(t["b"].grad.numpy(), w * (r_hat - r0) / s / k, rtol=RTOL, atol=1e-15)

    t = _t(b, grad="b")
    ddpo_loss(t["a"], t["b"], t["o"], t["r"], conv_logit=t["c"], gamma=gamma)["cvr"].backward()
    q = np.clip(1 - _sig(b["a"]), gamma, 1)
    w_o, w_n = b["o"] / p, (1 - b["o"]) / q
    s_o = np.atleast_2d(w_o).sum(-1, keepdims=True).reshape(*shape[:-1], 1)
    s_n = np.atleast_2d(w_n).sum(-1, keepdims=True).reshape(*shape[:-1], 1)
    soft = np.where(b["o"] * r0 == 1, 1.0, _sig(b["c"]))
    want = (w_o / s_o + w_n / s_n) * (r_hat - soft) / n
    np.testing.assert_allclose(t["b"].grad.numpy(), want, rtol=RTOL, atol=1e-15)


# ----------------------------------------------------------------------------------------------
# 2. Detached weights, normaliser, pseudo-labels
# ----------------------------------------------------------------------------------------------
def _grad_or_none(value, x):
    (g,) = torch.autograd.grad(value, x, allow_unused=True, retain_graph=True)
    return g


@pytest.mark.parametrize("reg", ["ips", "dr", "badr"])
def test_propensity_weights_are_detached(reg):
    t = _t(_log(4, (3, 40)), grad="abcd")
    out = escm2_loss(t["a"], t["b"], t["o"], t["r"], regulariser=reg, delta_hat=t["d"])
    assert _grad_or_none(out["cvr"], t["a"]) is None  # no path from the regulariser to the CTR tower
    if reg != "ips":
        assert _grad_or_none(out["cvr_err"], t["d"]) is None  # delta_hat is fixed in the error term
        assert _grad_or_none(out["cvr_imp"], t["b"]) is None  # delta is the imputation term's target
    # the CTR tower's whole gradient is that of L_CTR + lambda_g * L_CTCVR
    g_total = _grad_or_none(out["loss"], t["a"])
    g_want = _grad_or_none(out["ctr"] + 1.0 * out["ctcvr"], t["a"])
    torch.testing.assert_close(g_total, g_want, rtol=1e-12, atol=1e-15)


def test_multi_and_ddpo_weights_and_pseudo_labels_are_detached():
    t = _t(_log(6, (50,)), grad="abcd")
    assert _grad_or_none(multi_ips_loss(t["a"], t["b"], t["o"], t["r"])["cvr"], t["a"]) is None
    assert _grad_or_none(multi_dr_loss(t["a"], t["b"], t["o"], t["r"], delta_hat=t["d"])["cvr"], t["a"]) is None
    out = ddpo_loss(t["a"], t["b"], t["o"], t["r"], conv_logit=t["c"])
    assert _grad_or_none(out["cvr"], t["a"]) is None and _grad_or_none(out["conv"], t["a"]) is None
    assert _grad_or_none(out["cvr"], t["c"]) is None  # pseudo-labels are constants for the CVR model
    assert _grad_or_none(out["conv"], t["b"]) is None


# ----------------------------------------------------------------------------------------------
# 3. Unclicked labels never leak
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ENTIRE_SPACE))
def test_nan_labels_on_unclicked_exposures_change_nothing(name):
    spec = ENTIRE_SPACE[name]
    b = _log(8, (3, 30))
    results = []
    for fill in (np.nan, 0.0, 1.0, 1e30):
        bb = dict(b, r=np.where(b["o"] == 1, b["r"], fill))
        t = _t(bb, grad="abcd")
        outputs = {"ctr": t["a"], "cvr": t["b"], "imputation": t["d"], "conversion": t["c"]}
        out = spec({k: outputs[k] for k in spec.towers}, t["o"], t["r"])
        used = [t[k] for k in "abcd" if {"a": "ctr", "b": "cvr", "c": "conversion", "d": "imputation"}[k]
                in spec.towers]
        grads = torch.autograd.grad(out["loss"], used)
        results.append((float(out["loss"].detach()), [g.clone() for g in grads]))
    loss0, grads0 = results[0]
    assert np.isfinite(loss0)
    for loss, grads in results[1:]:
        assert loss == loss0
        assert all(torch.equal(g, g0) for g, g0 in zip(grads, grads0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(ENTIRE_SPACE))
def test_dtypes_and_extreme_logits_stay_finite(name, dtype):
    """float32 and float64, logits of +-40 (probabilities that round to 0 or 1): finite value and
    gradients, in the input's dtype."""
    spec = ENTIRE_SPACE[name]
    b = _log(13, (2, 24))
    for k in "abc":
        b[k] = np.where(np.arange(b[k].size).reshape(b[k].shape) % 3 == 0, 40.0, np.where(b[k] > 0, -40.0, b[k]))
    t = {k: torch.tensor(v, dtype=dtype, requires_grad=k in "abcd") for k, v in b.items()}
    outputs = {"ctr": t["a"], "cvr": t["b"], "imputation": t["d"], "conversion": t["c"]}
    out = spec({k: outputs[k] for k in spec.towers}, t["o"], t["r"])
    assert out["loss"].dtype == dtype and bool(torch.isfinite(out["loss"]))
    out["loss"].backward()
    assert all(bool(torch.isfinite(t[k].grad).all()) for k in "abcd" if t[k].grad is not None)


# ----------------------------------------------------------------------------------------------
# 4. Bad input
# ----------------------------------------------------------------------------------------------
def _call(name, batch, **kw):
    spec = get_entire_space(name)
    outputs = {"ctr": batch["a"], "cvr": batch["b"], "imputation": batch["d"], "conversion": batch["c"]}
    return spec({k: outputs[k] for k in spec.towers}, batch["o"], batch["r"], **kw)


@pytest.mark.parametrize("name", sorted(ENTIRE_SPACE))
def test_bad_input_names_the_argument(name):
    spec = ENTIRE_SPACE[name]
    arg_of = {"a": "ctr_logit", "b": "cvr_logit", "d": "delta_hat", "c": "conv_logit"}
    tower_of = {"a": "ctr", "b": "cvr", "d": "imputation", "c": "conversion"}
    for k in "abcd":
        if tower_of[k] not in spec.towers:
            continue
        t = _t(_log(1, (20,)))
        t[k] = t[k][:-1]
        with pytest.raises(ValueError, match=f"`{arg_of[k]}` has shape"):
            _call(name, t)
        t = _t(_log(1, (20,)))
        t[k][3] = float("nan")
        with pytest.raises(ValueError, match=f"`{arg_of[k]}`"):
            _call(name, t)
    t = _t(_log(1, (20,)))
    t["r"][0] = 0.5  # o = 1 there
    with pytest.raises(ValueError, match="`r`"):
        _call(name, t)
    t = _t(_log(1, (20,)))
    t["o"][2] = 2.0
    with pytest.raises(ValueError, match="`o`"):
        _call(name, t)
    t = _t(_log(1, (20,)))
    for param in spec.params:
        if param.startswith("lambda"):
            for bad in (-0.1, float("nan"), float("inf")):
                with pytest.raises(ValueError, match=f"`{param}`"):
                    _call(name, t, **{param: bad})
    if "gamma" in spec.params:
        for bad in (0.0, -0.2, 1.5, float("nan")):
            with pytest.raises(ValueError, match="`gamma`"):
                _call(name, t, gamma=bad)
    if spec.uses_propensity:
        for bad in (0.0, 1.2, -0.1, float("nan")):
            with pytest.raises(ValueError, match="`p_hat`"):
                _call(name, t, p_hat=torch.full((20,), bad, dtype=torch.float64))
        with pytest.raises(ValueError, match="`p_hat` has shape"):
            _call(name, t, p_hat=torch.full((19,), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="takes the parameters"):
        _call(name, t, lambda_x=1.0)


def test_bad_names_and_missing_towers():
    t = _t(_log(1, (20,)))
    with pytest.raises(ValueError, match="`regulariser`"):
        escm2_loss(t["a"], t["b"], t["o"], t["r"], regulariser="snips")
    with pytest.raises(ValueError, match="delta_hat"):
        escm2_loss(t["a"], t["b"], t["o"], t["r"], regulariser="badr")
    with pytest.raises(ValueError, match="conv_logit"):
        ddpo_loss(t["a"], t["b"], t["o"], t["r"], conv_logit=None)
    with pytest.raises(ValueError, match="`regularizer`"):
        ESCM2Loss("mrdr")
    with pytest.raises(ValueError, match="unknown entire-space objective 'nope'"):
        EntireSpaceLoss("nope")
    with pytest.raises(ValueError, match="takes the parameters"):
        EntireSpaceLoss("esmm", gamma=0.1)
    with pytest.raises(ValueError, match="needs `delta_hat`"):
        ESCM2Loss("dr")(t["a"], t["b"], t["o"], t["r"])
    with pytest.raises(ValueError, match="`conv_logit` must be None"):
        ESCM2Loss("ips")(t["a"], t["b"], t["o"], t["r"], conv_logit=t["c"])
    with pytest.raises(ValueError, match="lacks"):
        get_entire_space("escm2_dr")({"ctr": t["a"], "cvr": t["b"]}, t["o"], t["r"])
    with pytest.raises(ValueError, match="`tasks`"):
        MMoE(3, 4, tasks=("cvr", "ctr"))
    with pytest.raises(ValueError, match="`tasks`"):
        EntireSpaceMF(3, 4, 2, tasks=("ctr", "cvr", "pctcvr"))
    with pytest.raises(ValueError, match="`user_fields`"):
        MMoE(3, 4, user_fields=[[0], [-1], [2]])
    with pytest.raises(ValueError, match="`towers`"):
        EntireSpaceSpec("bad", "", "", esmm_loss, ("cvr",))


# ----------------------------------------------------------------------------------------------
# 5. Propositions 4 and 7 (ESCM2), DDPO's expectation: Monte Carlo over click draws
# ----------------------------------------------------------------------------------------------
N_DRAWS, N_PAIRS, Z = 2000, 100, 4.5


def _truth(seed):
    """A small generated log: true CTR q, true conversion labels r on EVERY exposure, CVR logits b."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.05, 0.9, N_PAIRS)
    return rng, q, rng.integers(0, 2, N_PAIRS).astype(float), rng.normal(0, 1.5, N_PAIRS)


def _draw_clicks(rng, q):
    return (rng.random((N_DRAWS, q.size)) < q).astype(float)


def _assert_mc(values_mean, ideal, var_one_draw, what):
    se = np.sqrt(var_one_draw / N_DRAWS)
    assert abs(values_mean - ideal) <= Z * se, f"{what}: MC mean {values_mean:.6f}, ideal {ideal:.6f}, SE {se:.2e}"


@settings(max_examples=5)
@given(seed=st.integers(0, 2**32 - 1))
def test_proposition_4_ips_regulariser_is_unbiased_with_true_ctr(seed):
    """ESCM2 Proposition 4: with o_hat = q, E_O[R_IPS] = P = mean_D delta(r, r_hat) (eq. 1), on the
    generated truth.  Each row of the (K, |D|) input is one click draw; the mean over rows is the
    MC mean; Var of one draw is Lemma 2's |D|^-2 sum q (1 - q) delta^2 / q^2.  The CTR tower's
    logit is logit(q) (gamma below every q: no clipping)."""
    rng, q, r_true, b = _truth(seed)
    o = _draw_clicks(rng, q)
    r_seen = np.where(o == 1, r_true, np.nan)
    delta = _bce(_sig(b), r_true)
    ideal = delta.mean()                                       # full-exposure BCE vs the true labels
    a = np.log(q / (1 - q))
    args = [torch.tensor(np.broadcast_to(x, o.shape).copy()) for x in (a, b, o, r_seen)]
    reg = escm2_loss(*args, regulariser="ips", gamma=0.01)["cvr"]
    _assert_mc(float(reg), ideal, (q * (1 - q) * delta**2 / q**2).sum() / N_PAIRS**2, "R_IPS")
    # the same through an external propensity p_hat = q
    reg_p = escm2_loss(*args, regulariser="ips", gamma=0.01, p_hat=torch.tensor(np.broadcast_to(q, o.shape).copy()))
    assert float(reg_p["cvr"]) == pytest.approx(float(reg), rel=1e-12)


@settings(max_examples=5)
@given(seed=st.integers(0, 2**32 - 1))
def test_proposition_7_and_ddpo_expectations_with_true_ctr(seed):
    """ESCM2 Proposition 7: with o_hat = q, E_O[R_DR_err] = P for any imputation (Lemma 3's
    variance |D|^-2 sum q (1 - q) (delta - delta_hat)^2 / q^2).  DDPO (our reading): with o_hat = q,
    E_O[R_DDPO] = mean_D delta(r, r_hat) + mean_D delta(t, r_hat), one draw's variance
    |D|^-2 sum q (1 - q) (A / q - B / (1 - q))^2 with A = delta(r, r_hat), B = delta(t, r_hat)."""
    rng, q, r_true, b = _truth(seed)
    d_hat = rng.uniform(0.1, 2.0, N_PAIRS)
    c = rng.normal(0, 1.0, N_PAIRS)
    o = _draw_clicks(rng, q)
    r_seen = np.where(o == 1, r_true, np.nan)
    delta = _bce(_sig(b), r_true)
    full = lambda x: torch.tensor(np.broadcast_to(x, o.shape).copy())  # noqa: E731
    a = np.log(q / (1 - q))
    out = escm2_loss(full(a), full(b), full(o), full(r_seen), regulariser="dr", delta_hat=full(d_hat), gamma=0.01)
    _assert_mc(float(out["cvr_err"]), delta.mean(), (q * (1 - q) * (delta - d_hat) ** 2 / q**2).sum() / N_PAIRS**2,
               "R_DR_err")
    out = ddpo_loss(full(a), full(b), full(o), full(r_seen), conv_logit=full(c), gamma=0.01, self_normalise=False)
    clicked = _bce(_sig(b), np.where(r_true == 1, 1.0, _sig(c)))  # eq. (9): the soft label where r = 0
    pseudo = _bce(_sig(b), _sig(c))
    var = (q * (1 - q) * (clicked / q - pseudo / (1 - q)) ** 2).sum() / N_PAIRS**2
    _assert_mc(float(out["cvr"]), clicked.mean() + pseudo.mean(), var, "R_DDPO")


def test_ddpo_theorem_1_perfect_propensities_give_the_ideal_loss():
    """DDPO Theorem 1 (eq. 11): with o_hat = o and the conversion propensity equal to r, eq. (10)
    is the ideal CVR loss mean_D delta(r, r_hat), unclicked labels included; self-normalised
    (eq. 15), the two sides are the ideal loss's means over the clicked and the unclicked pairs."""
    rng = np.random.default_rng(11)
    o = (rng.random(400) < 0.3).astype(float)
    r_true = rng.integers(0, 2, 400).astype(float)
    b = rng.normal(0, 1.5, 400)
    a = np.where(o == 1, 40.0, -40.0)  # sigmoid is 1 or 0 to float64 rounding
    c = np.where(r_true == 1, 40.0, -40.0)
    args = [torch.tensor(x) for x in (a, b, o, np.where(o == 1, r_true, np.nan))]
    ideal = _bce(_sig(b), r_true)
    out = ddpo_loss(*args, conv_logit=torch.tensor(c), gamma=1e-30, self_normalise=False)
    assert float(out["cvr"]) == pytest.approx(ideal.mean(), rel=1e-12)
    out = ddpo_loss(*args, conv_logit=torch.tensor(c), gamma=1e-30)
    assert float(out["cvr"]) == pytest.approx((ideal[o == 1].mean() + ideal[o == 0].mean()) / 400, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# 6. Proposition 1's direction on a synthetic log
# ----------------------------------------------------------------------------------------------
def _fit_constant(loss_of, dtype=torch.float64):
    """Minimise ``loss_of(a, b)`` over two scalar logits (a constant CTR and CVR tower) by LBFGS."""
    a = torch.zeros((), dtype=dtype, requires_grad=True)
    b = torch.zeros((), dtype=dtype, requires_grad=True)
    opt = torch.optim.LBFGS([a, b], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss_of(a, b)
        value.backward()
        return value

    opt.step(closure)
    return float(torch.sigmoid(a.detach())), float(torch.sigmoid(b.detach()))


@settings(max_examples=5)
@given(seed=st.integers(0, 2**32 - 1), strength=st.floats(0.75, 1.75))
def test_proposition_1_esmm_overestimates_when_clicks_follow_conversion(seed, strength):
    """ESCM2 Proposition 1 (direction): a latent z raises both the CTR q and the CVR rho (clicks
    correlate with conversion, assumption (10): E_O[R] > E_D[R]).  ESMM (eq. 5) fitted with constant
    towers implies the CVR ``E_D[C] / E_D[O]``, the click-space rate, above the CVR over the
    exposures E_D[R]; ESCM2's IPS risk (eq. 21) with the true CTR, minimised over the CVR tower,
    lands closer to E_D[R] (a weighted click-space rate, unbiased for it)."""
    rng = np.random.default_rng(seed)
    n = 10000
    z = rng.normal(size=n)
    q, rho = _sig(-1.5 + strength * z), _sig(-0.5 + strength * z)
    o = (rng.random(n) < q).astype(float)
    r = (rng.random(n) < rho).astype(float)
    target = r.mean()                                          # E_D[R] on the generated truth
    assume(r[o == 1].mean() - target > 0.05)                   # assumption (10), with a margin
    o_t = torch.tensor(o)
    r_t = torch.tensor(np.where(o == 1, r, np.nan))
    ones = torch.ones(n, dtype=torch.float64)
    _, cvr_esmm = _fit_constant(lambda a, b: esmm_loss(a * ones, b * ones, o_t, r_t)["loss"])
    assert cvr_esmm == pytest.approx((o * r).sum() / o.sum(), abs=1e-6)  # E_D[C] / E_D[O]
    assert cvr_esmm - target > 0.05 - 0.02                               # overestimates
    q_t = torch.tensor(q)
    _, cvr_ips = _fit_constant(lambda a, b: escm2_loss(a * ones, b * ones, o_t, r_t, regulariser="ips", p_hat=q_t,
                                                       gamma=1e-6, lambda_c=1.0, lambda_g=0.0)["cvr"])
    assert abs(cvr_ips - target) < abs(cvr_esmm - target) / 2


# ----------------------------------------------------------------------------------------------
# 7. Registry, modules, models, README
# ----------------------------------------------------------------------------------------------
def test_registry_lists_every_entire_space_objective():
    assert estimators.ENTIRE_SPACE is ENTIRE_SPACE
    assert set(ENTIRE_SPACE) == {"esmm", "escm2_ips", "escm2_dr", "escm2_badr", "multi_ips", "multi_dr", "ddpo"}
    assert not set(ENTIRE_SPACE) & {"escm2_ips", "ddpo"} & set(ESTIMATORS)
    assert {n for n, s in ENTIRE_SPACE.items() if "imputation" in s.towers} == {"escm2_dr", "escm2_badr", "multi_dr"}
    assert {n for n, s in ENTIRE_SPACE.items() if not s.uses_propensity} == {"esmm"}
    assert all(set(s.towers) <= set(TOWERS) for s in ENTIRE_SPACE.values())
    with pytest.raises(TypeError):
        ENTIRE_SPACE["escm2_ips"].params["gamma"] = 0.5  # defaults are read-only


def test_modules_equal_the_functions():
    b = _log(12, (40,))
    t = _t(b)
    args = (t["a"], t["b"], t["o"], t["r"])
    pairs = [
        (ESMMLoss(lambda_g=0.5), esmm_loss(*args, lambda_g=0.5)),
        (ESCM2Loss("ips", lambda_c=0.3), escm2_loss(*args, regulariser="ips", lambda_c=0.3)),
        (ESCM2Loss("dr", gamma=0.1), escm2_loss(*args, regulariser="dr", delta_hat=t["d"], gamma=0.1)),
        (ESCM2Loss("badr"), escm2_loss(*args, regulariser="badr", delta_hat=t["d"])),
        (MultiIPSLoss(), multi_ips_loss(*args)),
        (MultiDRLoss(lambda_c=2.0), multi_dr_loss(*args, delta_hat=t["d"], lambda_c=2.0)),
        (DDPOLoss(lambda_g=1.0), ddpo_loss(*args, conv_logit=t["c"], lambda_g=1.0)),
    ]
    for module, want in pairs:
        kw = {"imputation": {"delta_hat": t["d"]}, "conversion": {"conv_logit": t["c"]}}
        extra = {k: v for tower in module.towers[2:] for k, v in kw[tower].items()}
        assert float(module(*args, **extra)) == pytest.approx(float(want["loss"]), rel=RTOL)
        assert set(module.last_parts) == set(want)


def test_mmoe_with_categorical_fields():
    torch.manual_seed(0)
    user_fields = np.array([[0, 2], [1, 0], [2, 1], [0, 0]])
    model = MMoE(4, 5, tasks=("ctr", "cvr", "imputation"), dim=3, n_experts=2, expert_hidden=(8,), expert_dim=4,
                 tower_hidden=(4,), user_fields=user_fields, item_fields=[0, 1, 1, 0, 3])
    out = model(torch.tensor([0, 3, 2]), torch.tensor([4, 0, 1]))
    assert set(out) == {"ctr", "cvr", "imputation"} and all(v.shape == (3,) for v in out.values())
    assert bool((out["imputation"] >= 0).all())
    assert model.embed(torch.tensor([0]), torch.tensor([0])).shape == (1, 3 * (2 + 2 + 1))
    # the embeddings are shared: the CVR tower's output depends on the user's field embeddings
    out["cvr"].sum().backward()
    assert model.user_fields.tables[0].weight.grad.abs().sum() > 0 and model.user.weight.grad.abs().sum() > 0


def test_mf_backbone_shares_nothing():
    torch.manual_seed(0)
    model = EntireSpaceMF(6, 7, 3, tasks=get_entire_space("escm2_dr").towers)
    ids = {id(p) for p in model.models["ctr"].parameters()}
    assert not ids & {id(p) for t in ("cvr", "imputation") for p in model.models[t].parameters()}
    out = model(torch.tensor([0, 5]), torch.tensor([6, 1]))
    out["cvr"].sum().backward()
    assert all(p.grad is None for t in ("ctr", "imputation") for p in model.models[t].parameters())
    with torch.no_grad():
        assert torch.equal(out["ctr"], model.models["ctr"](torch.tensor([0, 5]), torch.tensor([6, 1])))


@pytest.mark.parametrize("backbone", ["mmoe", "mf"])
@pytest.mark.parametrize("name", sorted(ENTIRE_SPACE))
def test_every_objective_trains_on_both_backbones(name, backbone):
    torch.manual_seed(0)
    loss_fn = EntireSpaceLoss(name)
    model = (MMoE(20, 30, tasks=loss_fn.towers, dim=4, n_experts=2, expert_hidden=(8,), expert_dim=8,
                  tower_hidden=(8,)) if backbone == "mmoe" else EntireSpaceMF(20, 30, 4, tasks=loss_fn.towers))
    users, items = torch.randint(20, (256,)), torch.randint(30, (256,))
    o = torch.bernoulli(torch.sigmoid((users % 3).float() - 1.5))
    r = torch.where(o == 1, (items % 2).float(), torch.nan)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(25):
        loss = loss_fn.from_outputs(model(users, items), o, r)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_readme_entire_space_example_runs():
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Entire-space losses", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    (block,) = re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)
    assert 5 <= len(block.strip().splitlines()) <= 12
    out = subprocess.run([sys.executable, "-c", block], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^escm2_badr loss \d+\.\d+", out.stdout, flags=re.M), out.stdout
