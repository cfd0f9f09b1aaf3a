"""ESCM2 paper (Wang et al., Sections II-IV and Appendix): claims 8 and 9 of tests/THEOREMS.md.

Notation of the paper -> library: CVR error ``delta_ui`` (eq. 20) -> ``e``; imputed error
``delta_hat`` (eq. 19) -> ``e_hat``; true CTR / propensity ``q_ui`` (eq. 6) -> ``p``; CTR
estimate ``o_hat_ui`` (eq. 17) -> ``p_hat``.  The IPS regulariser (eq. 21) is :func:`estimators.ips`
and the DR error regulariser (eq. 23) is :func:`estimators.dr`; the ideal objective ``P`` (eq. 1)
is ``mean(delta)``.  Expectations are over ``o ~ Bernoulli(q)`` (tests/_mc.py).

Proposition 1 is about expectations over the exposure space D (a finite population here), which
are computed exactly; the Monte Carlo part checks the click-space decomposition (12b).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import _mc
from _mc import DTYPE, Estimate, assert_mc_equal, assert_mc_nonzero, draw, mc_mean, mc_var, per_draw, t
from estimators import dr, ips
from test_theorems_table1 import DR_ARGS, IPS_ARGS, N_SIM, _float_scale, cases, check_pathwise_ideal, check_unbiased


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """All Monte Carlo work of this module on one intra-op thread (see ``_mc.single_thread``)."""
    with _mc.single_thread():
        yield


# ----------------------------------------------------------------------------------------------
# Lemmas 2 and 3 (Appendix eqs. 37-42), as printed and as restated
# ----------------------------------------------------------------------------------------------
def lemma2_bias_printed(d, q, o_hat) -> float:
    """Lemma 2 / eq. (38) as printed: ``|D|^-1 |sum delta q / o_hat|`` (the last step drops ``- delta``)."""
    return float((d * q / o_hat).sum().abs() / d.numel())


def lemma2_bias(d, q, o_hat) -> float:
    """Lemma 2 restated (the line before the last of eq. 38): ``|D|^-1 |sum delta (q - o_hat) / o_hat|``."""
    return float((d * (q - o_hat) / o_hat).sum().abs() / d.numel())


def lemma2_variance(d, q, o_hat) -> float:
    """Lemma 2, eq. (39): ``|D|^-2 sum q (1 - q) delta^2 / o_hat^2``."""
    return float((q * (1 - q) * d**2 / o_hat**2).sum() / d.numel() ** 2)


def lemma3_bias(d, d_hat, q, o_hat) -> float:
    """Lemma 3, eq. (41): ``|D|^-1 |sum (q - o_hat) (delta - delta_hat) / o_hat|``."""
    return float(((q - o_hat) * (d - d_hat) / o_hat).sum().abs() / d.numel())


def lemma3_variance_printed(d, d_hat, q, o_hat) -> float:
    """Lemma 3 / eqs. (24), (40) as printed: ``(delta_hat - delta_hat)^2`` in the numerator, i.e. 0."""
    return float((q * (1 - q) * (d_hat - d_hat) ** 2 / o_hat**2).sum() / d.numel() ** 2)


def lemma3_variance(d, d_hat, q, o_hat) -> float:
    """Lemma 3 restated (last line of eq. 42): ``|D|^-2 sum q (1 - q) (delta_hat - delta)^2 / o_hat^2``."""
    return float((q * (1 - q) * (d_hat - d) ** 2 / o_hat**2).sum() / d.numel() ** 2)


def _abs_bias(est: Estimate, ideal: float) -> Estimate:
    """``|E - P|`` with the SE of ``E`` (``|.|`` is 1-Lipschitz)."""
    return Estimate(abs(est.value - ideal), est.se)


def check_lemma_2(ips_fn, case) -> None:
    """Lemma 2 restated: ``Bias_O(R_IPS) = |D|^-1 |sum delta (q - o_hat) / o_hat|``, and eq. (39)."""
    d, q, o_hat = case["e"], case["p"], case["p_hat"]
    dr_ = draw(q, N_SIM, case["seed"])
    vals = per_draw(ips_fn, {"e": d, "p_hat": o_hat}, dr_.o[dr_.valid])
    ideal = float(d.mean())
    scale = _float_scale(case)
    assert_mc_equal(_abs_bias(mc_mean(vals, dr_), ideal), lemma2_bias(d, q, o_hat), "Lemma 2 bias (restated)",
                    scale=scale)
    assert_mc_equal(mc_var(vals, dr_), lemma2_variance(d, q, o_hat), "Lemma 2 variance")


def check_lemma_3(dr_fn, case) -> None:
    """Lemma 3: eq. (41) bias and the restated variance ``(delta_hat - delta)^2``."""
    d, d_hat, q, o_hat = case["e"], case["e_hat"], case["p"], case["p_hat"]
    dr_ = draw(q, N_SIM, case["seed"])
    vals = per_draw(dr_fn, {"e": d, "e_hat": d_hat, "p_hat": o_hat}, dr_.o[dr_.valid])
    ideal = float(d.mean())
    assert_mc_equal(_abs_bias(mc_mean(vals, dr_), ideal), lemma3_bias(d, d_hat, q, o_hat), "Lemma 3 bias",
                    scale=_float_scale(case))
    assert_mc_equal(mc_var(vals, dr_), lemma3_variance(d, d_hat, q, o_hat), "Lemma 3 variance (restated)")


def check_dr_variance_below_ips(ips_fn, dr_fn, case) -> None:
    """Observation 1) after Lemma 3: with ``0 < delta_hat < 2 delta`` on every pair,
    ``V(R_DR) <= V(R_IPS)``: the Monte Carlo difference ``Var_IPS - Var_DR`` (same draws) matches
    the Lemma 2 minus Lemma 3 formula, which is ``>= 0`` termwise."""
    d, d_hat, q, o_hat = case["e"], case["e_hat"], case["p"], case["p_hat"]
    dr_ = draw(q, N_SIM, case["seed"])
    o = dr_.o[dr_.valid]
    v_ips = per_draw(ips_fn, {"e": d, "p_hat": o_hat}, o)
    v_dr = per_draw(dr_fn, {"e": d, "e_hat": d_hat, "p_hat": o_hat}, o)
    diff = lemma2_variance(d, q, o_hat) - lemma3_variance(d, d_hat, q, o_hat)
    assert diff >= 0
    a, b = mc_var(v_ips, dr_), mc_var(v_dr, dr_)
    # |(a - b) - diff| <= z (SE_a + SE_b) with false-alarm rate at most 2 alpha (union bound)
    assert_mc_equal(Estimate(a.value - b.value, a.se + b.se), diff, "Var(R_IPS) - Var(R_DR) vs Lemma 2 - Lemma 3")


@st.composite
def escm2_cases(draw_, **kw):
    """ESCM2 cases: ``cases`` of tests/test_theorems_table1.py (CVR errors in [0, 5], CTR and CTR
    estimates down to 1e-6)."""
    return draw_(cases(**kw))


@given(case=escm2_cases())
def test_lemma_2_ips_regulariser_bias_and_variance(case):
    """ESCM2 Lemma 2 (eqs. 22, 37-39): bias and variance of the IPS regulariser (eq. 21) under an
    arbitrary CTR estimate ``o_hat``.

    As printed the bias is ``|D|^-1 |sum delta (q / o_hat)|``: the proof's last step drops the
    ``- delta_ui`` of the line before.  Verified: the Monte Carlo ``|E[R_IPS] - P|`` equals the
    restated ``|D|^-1 |sum delta (q - o_hat) / o_hat|`` and the Monte Carlo variance equals eq. (39)
    (= ``theory.ips_variance``).  Verdict: bias holds as restated (printed form fails, see
    ``test_lemma_2_printed_bias_fails``); variance holds.
    """
    check_lemma_2(ips, case)


def test_lemma_2_printed_bias_fails():
    """Lemma 2's printed bias ``|D|^-1 |sum delta q / o_hat|`` is ``mean(delta) > 0`` at an accurate CTR
    estimate, where the regulariser is unbiased (Proposition 4): the Monte Carlo bias is
    consistent with 0 and inconsistent with the printed value.  Verdict: fails as printed."""
    g = torch.Generator().manual_seed(2)
    d = 0.5 + torch.rand(20, generator=g, dtype=DTYPE)
    q = 0.05 + 0.9 * torch.rand(20, generator=g, dtype=DTYPE)
    dr_ = draw(q, N_SIM, 1)
    vals = per_draw(ips, {"e": d, "p_hat": q}, dr_.o)
    bias = _abs_bias(mc_mean(vals, dr_), float(d.mean()))
    assert_mc_equal(bias, lemma2_bias(d, q, q), "restated Lemma 2 bias (0)", scale=1.0)
    assert abs(bias.value - lemma2_bias_printed(d, q, q)) > _mc.Z * bias.se, "printed Lemma 2 bias not rejected"


@given(case=escm2_cases())
def test_lemma_3_dr_regulariser_bias_and_variance(case):
    """ESCM2 Lemma 3 (eqs. 24, 40-42): bias ``|D|^-1 |sum (q - o_hat)(delta - delta_hat) / o_hat|`` and
    variance of the DR error regulariser (eq. 23).

    As printed (eqs. 24 and 40) the variance has ``(delta_hat - delta_hat)^2`` -- identically 0 --
    while the proof ends with ``(delta_hat - delta)^2``.  Verified: Monte Carlo ``|E[R_DR] - P|``
    equals the printed bias; the Monte Carlo variance equals the restated variance
    (= ``theory.dr_variance``).  Verdict: bias holds; variance holds as restated.
    """
    check_lemma_3(dr, case)


def test_lemma_3_printed_variance_fails():
    """The printed Lemma 3 variance is 0; the Monte Carlo variance of R_DR is significantly
    positive whenever ``delta_hat != delta`` on a pair with ``0 < q < 1``.  Verdict: fails as printed."""
    g = torch.Generator().manual_seed(4)
    d, d_hat = torch.rand(15, generator=g, dtype=DTYPE), torch.rand(15, generator=g, dtype=DTYPE)
    q = 0.05 + 0.9 * torch.rand(15, generator=g, dtype=DTYPE)
    o_hat = q * 0.8
    assert lemma3_variance_printed(d, d_hat, q, o_hat) == 0.0
    dr_ = draw(q, N_SIM, 5)
    var = mc_var(per_draw(dr, {"e": d, "e_hat": d_hat, "p_hat": o_hat}, dr_.o), dr_)
    assert_mc_nonzero(var, "Var(R_DR)")
    assert_mc_equal(var, lemma3_variance(d, d_hat, q, o_hat), "restated Lemma 3 variance")


@st.composite
def observation_cases(draw_):
    case = draw_(cases())
    frac = t(draw_(_mc.vectors(case["e"].numel(), st.floats(0.01, 1.99)))).reshape(case["e"].shape)
    case["e"] = case["e"] + 0.01  # delta > 0
    case["e_hat"] = frac * case["e"]
    return case


@given(case=observation_cases())
def test_lemma_3_observation_dr_variance_below_ips(case):
    """ESCM2 Section IV-A, observation 1) after Lemma 3: "R_DR has a lower variance than R_IPS
    given 0 < delta_hat < 2 delta" (termwise ``(delta - delta_hat)^2 < delta^2``).  Verified: the
    Monte Carlo difference of the two variances on common draws equals Lemma 2 minus Lemma 3,
    which is non-negative.  Verdict: holds (``<=``; strict when some pair has ``0 < q < 1``)."""
    check_dr_variance_below_ips(ips, dr, case)


@given(case=escm2_cases(p_hat_is_p=True))
def test_proposition_4_ips_regulariser_unbiased_with_accurate_ctr(case):
    """ESCM2 Proposition 4: "given accurate CTR estimate o_hat = q, R_IPS = P holds".

    The equality holds in expectation over clicks, ``E_O[R_IPS] = P`` (verified by Monte Carlo,
    CTR down to 1e-6); ``R_IPS`` itself is random (its variance, eq. 39, is positive unless every
    ``q`` is 1 or ``delta = 0``).  Verdict: holds as restated (in expectation).
    """
    check_unbiased(ips, IPS_ARGS, case)


@given(case=st.one_of(escm2_cases(p_hat_is_p=True), escm2_cases(e_hat_is_e=True)))
def test_proposition_7_dr_regulariser_unbiased(case):
    """ESCM2 Proposition 7: "given accurate CTR estimate o_hat = q or imputation model
    delta_hat = delta, R_DR^err = P".

    Verified: with ``delta_hat = delta``, ``R_DR^err = P`` on every draw (pathwise); with
    ``o_hat = q``, ``E_O[R_DR^err] = P`` (Monte Carlo).  Verdict: holds (the CTR half in
    expectation only).
    """
    if bool(torch.equal(case["e_hat"], case["e"])):
        check_pathwise_ideal(dr, DR_ARGS, case)
    check_unbiased(dr, DR_ARGS, case)


# ----------------------------------------------------------------------------------------------
# Proposition 1 (Section III-A): ESMM overestimates CVR
# ----------------------------------------------------------------------------------------------
def esmm_cvr(c_hat, o_hat):
    """ESMM's CVR estimate ``r_hat = c_hat / o_hat`` (decomposition (4))."""
    return c_hat / o_hat


@st.composite
def populations(draw_):
    """A finite exposure space D of ``m1 * m2`` pairs with true CTR ``q`` and post-click CVR
    ``rho``, and a calibrated ESMM whose outputs are independent over D: pair ``(k, l)`` gets
    ``c_hat = a_k`` and ``o_hat = b_l`` (a product grid, so ``C_hat`` and ``O_hat`` are independent
    under the uniform distribution on D), with ``mean(b) = E_D[O] = mean(q)``,
    ``mean(a) = E_D[C] = mean(q rho)`` (eq. 11) and ``0 <= a <= min b``, ``b <= 1`` (so
    ``r_hat = a / b`` is in [0, 1])."""
    m1, m2 = draw_(st.integers(1, 5)), draw_(st.integers(1, 5))
    n = m1 * m2
    q = draw_(_mc.vectors(n, st.floats(0.01, 0.99)))
    rho = draw_(_mc.vectors(n, st.floats(0.0, 0.99)))
    o_bar, c_bar = q.mean(), (q * rho).mean()
    assume(o_bar - c_bar > 1e-3 and c_bar > 1e-3)

    def centred(m):
        z = draw_(_mc.vectors(m, st.floats(-1.0, 1.0)))
        z = z - z.mean()
        return z / max(1.0, np.abs(z).max())

    lam_b, lam_a = draw_(st.sampled_from([0.0, 0.3, 0.9])), draw_(st.floats(0.0, 0.9))
    b = o_bar + lam_b * min(o_bar - c_bar, 1 - o_bar) * centred(m2)
    a = c_bar + lam_a * min(c_bar, b.min() - c_bar) * centred(m1)
    return {"q": q, "rho": rho, "a": a, "b": b, "m1": m1, "m2": m2, "seed": draw_(_mc.seeds)}


def _esmm_over_D(pop):
    """``(c_hat, o_hat)`` on every pair of D (product grid)."""
    c_hat = np.repeat(pop["a"], pop["m2"])
    o_hat = np.tile(pop["b"], pop["m1"])
    return c_hat, o_hat


def check_proposition_1(cvr_fn, pop) -> None:
    """Proposition 1 as restated.  With ``O_hat`` independent of ``C_hat`` over D and a calibrated
    ESMM (eq. 11): ``E_D[R_hat] = E_D[C_hat / O_hat] >= E_D[C] / E_D[O]`` (13a-f), with the explicit
    Jensen margin ``E[C_hat] Var(O_hat) / max(O_hat)^3`` (``d^2/dx^2 1/x >= 2 / max^3``), so strict
    when ``Var(O_hat) > 0``; under assumption (10), ``E_O[R] > E_D[R]``, hence ``Bias > 0``.
    ``E_O[R] = E[C] / E[O]`` (12b) is checked by Monte Carlo over ``O ~ Bernoulli(q)``,
    ``R ~ Bernoulli(rho)``."""
    q, rho = pop["q"], pop["rho"]
    c_hat, o_hat = _esmm_over_D(pop)
    assert math.isclose(o_hat.mean(), q.mean(), rel_tol=1e-12) and math.isclose(c_hat.mean(), (q * rho).mean(),
                                                                                   rel_tol=1e-12)
    r_hat = np.asarray(cvr_fn(c_hat, o_hat), dtype=np.float64) * np.ones_like(c_hat)
    e_r_hat = float(r_hat.mean())
    click_cvr = float((q * rho).mean() / q.mean())  # E_O[R] = E[C] / E[O]
    margin = float(c_hat.mean() * o_hat.var() / o_hat.max() ** 3)
    slack = 1e-12 * (abs(e_r_hat) + 1)
    assert e_r_hat - click_cvr >= margin - slack, (
        f"E[C_hat/O_hat] - E[C]/E[O] = {e_r_hat - click_cvr:.3g} below the Jensen margin {margin:.3g}")
    if click_cvr > rho.mean():  # assumption (10)
        assert e_r_hat - rho.mean() > 0, f"Bias = {e_r_hat - rho.mean():.3g} <= 0 under assumption (10)"
    # (12b) by Monte Carlo: E[C] and E[O] with C = O R
    g = torch.Generator().manual_seed(int(pop["seed"]))
    qt, rt = t(q), t(rho)
    o = (torch.rand((N_SIM, q.size), generator=g, dtype=DTYPE) < qt).to(DTYPE)
    r = (torch.rand((N_SIM, q.size), generator=g, dtype=DTYPE) < rt).to(DTYPE)
    ones = _mc.Draws(o=o, ratio=torch.ones(N_SIM, dtype=DTYPE), valid=torch.ones(N_SIM, dtype=torch.bool), p_valid=1.0)
    assert_mc_equal(mc_mean((o * r).mean(-1), ones), float((q * rho).mean()), "E_D[C]")
    assert_mc_equal(mc_mean(o.mean(-1), ones), float(q.mean()), "E_D[O]")


@given(pop=populations())
def test_proposition_1_esmm_overestimates_under_independence(pop):
    """ESCM2 Proposition 1: "ESMM overestimates the CVR expectation over D, Bias = E_D[R_hat] - E_D[R] > 0,
    under assumption (10) E_O[R] > E_D[R]".

    The proof also needs ``O_hat`` independent of ``C_hat`` (step 13b, called "stringent" there)
    and a calibrated ESMM (eq. 11), which the statement omits.  Verified with both: the Jensen step
    ``E[C_hat / O_hat] >= E[C] / E[O]`` with an explicit positive margin when ``Var(O_hat) > 0``,
    ``Bias > 0`` whenever (10) holds, and the click-space identity (12b) by Monte Carlo.
    Verdict: holds as restated (with independence and calibration as hypotheses).
    """
    check_proposition_1(esmm_cvr, pop)


def test_proposition_1_fails_without_assumption_10():
    """Without (10) the conclusion fails.  Exposure space of 4 pairs: CTR ``q = (.9, .1, .9, .1)``,
    CVR ``rho = (.1, .9, .1, .9)`` (users click what they rarely buy: ``E_O[R] = 0.18 < E_D[R] = 0.5``);
    a calibrated ESMM with independent outputs and ``Var(O_hat) > 0``: ``o_hat in {0.4, 0.6}``,
    ``c_hat = 0.09``.  Then ``E_D[R_hat] = 0.1875`` and ``Bias = -0.3125 < 0``, although the
    Jensen step (13e) still holds.  Verdict: the conclusion needs (10)."""
    q, rho = np.array([0.9, 0.1, 0.9, 0.1]), np.array([0.1, 0.9, 0.1, 0.9])
    pop = {"q": q, "rho": rho, "a": np.array([0.09, 0.09]), "b": np.array([0.4, 0.6]), "m1": 2, "m2": 2, "seed": 0}
    check_proposition_1(esmm_cvr, pop)  # the Jensen step and calibration hold; (10) does not
    c_hat, o_hat = _esmm_over_D(pop)
    bias = float(esmm_cvr(c_hat, o_hat).mean() - rho.mean())
    assert (q * rho).mean() / q.mean() < rho.mean()
    assert math.isclose(bias, -0.3125, rel_tol=1e-12)


def test_proposition_1_fails_without_independence():
    """With (10) but without the independence of step (13b), the conclusion fails as well: the
    oracle ESMM ``o_hat = q``, ``r_hat = rho`` (``c_hat = q rho``) is calibrated (eq. 11), (10)
    holds (``q = rho = (.9, .1)``: ``E_O[R] = 0.82 > E_D[R] = 0.5``), and ``Bias = 0``, not ``> 0``.
    Verdict: Proposition 1 as stated (assumption (10) only) fails; it holds with (13b)."""
    q = rho = np.array([0.9, 0.1])
    c_hat, o_hat = q * rho, q
    assert math.isclose(o_hat.mean(), q.mean()) and math.isclose(c_hat.mean(), (q * rho).mean())
    assert (q * rho).mean() / q.mean() > rho.mean()
    assert float(esmm_cvr(c_hat, o_hat).mean() - rho.mean()) == 0.0
