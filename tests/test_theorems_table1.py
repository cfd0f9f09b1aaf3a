"""BADR paper, Section 2.2 and Table 1 (IPS and DR columns): claims 1 and 2 of tests/THEOREMS.md.

Setting of every test: fixed errors ``e``, imputed errors ``e_hat``, true propensities ``p`` and
learned ``p_hat`` (drawn by Hypothesis, propensities down to 1e-6, one batch ``(B,)`` or K
batches ``(K, B)``); the randomness is ``o ~ Bernoulli(p)``, simulated by ``tests/_mc.py`` with
the tolerances derived there (CLT at false-alarm rate 1e-6 per comparison).

Sign convention.  Table 1 prints the bias as ``(p_hat - p) ...``, which is
``L_ideal - E[L]``; :mod:`estimators.theory` returns ``E[L] - L_ideal``.  The tests check the
printed formula against ``L_ideal - E_MC[L]`` and the library against ``E_MC[L] - L_ideal``.

Each check is a plain function of the estimator under test, so that ``tests/test_mutations.py``
runs the same check on deliberately broken estimators.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

import _mc
from _mc import FALSE_ALARM, RTOL, assert_mc_equal, draw, mc_mean, mc_var, per_draw, t
from estimators import dr, ips, theory

#: Monte Carlo draws per example (SE of a mean ~ sd / 141).
N_SIM = 20_000

IPS_ARGS = ("e", "p_hat")
DR_ARGS = ("e", "e_hat", "p_hat")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """All Monte Carlo work of this module on one intra-op thread (see ``_mc.single_thread``)."""
    with _mc.single_thread():
        yield


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
@st.composite
def cases(draw_, *, p_hat_is_p: bool = False, e_hat_is_e: bool = False, max_b: int = 30) -> dict:
    """One batch ``(B,)`` or K batches ``(K, B)`` of pairs with errors in [0, 5], propensities in
    [1e-6, 1] (log-uniform, uniform or 1), ``p_hat`` equal to ``p``, independent of it, or a
    multiple of it in [0.5 p, 2 p] (clipped to 1), and a Monte Carlo seed."""
    shape = (draw_(st.integers(1, max_b)),)
    if draw_(st.booleans()):
        shape = (draw_(st.integers(2, 3)), shape[0])
    n = int(np.prod(shape))
    p = draw_(_mc.vectors(n, _mc.propensity()))
    if p_hat_is_p:
        p_hat = p.copy()
    elif draw_(st.booleans()):
        p_hat = draw_(_mc.vectors(n, _mc.propensity()))
    else:
        p_hat = np.minimum(1.0, p * draw_(_mc.vectors(n, st.floats(0.5, 2.0))))
    e = draw_(_mc.vectors(n, _mc.errors(0.0, 5.0)))
    e_hat = e.copy() if e_hat_is_e else draw_(_mc.vectors(n, _mc.errors(0.0, 5.0)))
    out = {k: t(v).reshape(shape) for k, v in (("e", e), ("e_hat", e_hat), ("p", p), ("p_hat", p_hat))}
    out["seed"] = draw_(_mc.seeds)
    out["delta"] = draw_(st.sampled_from([0.01, 0.05, 0.1, 0.3]))
    return out


def _inputs(case: dict, names) -> dict:
    return {k: case[k] for k in names}


def _float_scale(case: dict) -> float:
    """Magnitude of the largest terms summed in one estimate (``(|e| + |e_hat|) / p_hat``): the
    floating-point allowance of exact comparisons is ``RTOL`` times this, not times the result."""
    return float(((case["e"].abs() + case["e_hat"].abs()) / case["p_hat"]).mean())


def _simulate(estimator, names, case, *, tilt: bool = True):
    d = draw(case["p"], N_SIM, case["seed"], tilt=tilt)
    return per_draw(estimator, _inputs(case, names), d.o[d.valid]), d


# ----------------------------------------------------------------------------------------------
# Table 1 as printed (direct transcriptions; |D| = number of pairs)
# ----------------------------------------------------------------------------------------------
def table1_ips_bias(e, p, p_hat) -> float:
    """Table 1, IPS bias as printed: ``|D|^-1 sum (p_hat - p) e / p_hat`` (= L_ideal - E[L])."""
    return float(((p_hat - p) * e / p_hat).sum() / e.numel())


def table1_dr_bias(e, e_hat, p, p_hat) -> float:
    """Table 1, DR bias as printed: ``|D|^-1 sum (p_hat - p) (e - e_hat) / p_hat``."""
    return float(((p_hat - p) * (e - e_hat) / p_hat).sum() / e.numel())


def table1_ips_variance(e, p, p_hat) -> float:
    """Table 1, IPS variance: ``|D|^-2 sum p (1 - p) e^2 / p_hat^2``."""
    return float((p * (1 - p) * e**2 / p_hat**2).sum() / e.numel() ** 2)


def table1_dr_variance(e, e_hat, p, p_hat) -> float:
    """Table 1, DR variance: ``|D|^-2 sum p (1 - p) (e - e_hat)^2 / p_hat^2``."""
    return float((p * (1 - p) * (e - e_hat) ** 2 / p_hat**2).sum() / e.numel() ** 2)


def table1_ips_bound(e, p_hat, delta) -> float:
    """Table 1, IPS generalisation bound ``sqrt(log(2/delta) / (2 |D|^2) sum (e / p_hat)^2)``."""
    return math.sqrt(math.log(2 / delta) / (2 * e.numel() ** 2) * float(((e / p_hat) ** 2).sum()))


def table1_dr_bound(e, e_hat, p_hat, delta) -> float:
    """Table 1, DR generalisation bound ``sqrt(log(2/delta) / (2 |D|^2) sum ((e - e_hat) / p_hat)^2)``."""
    return math.sqrt(math.log(2 / delta) / (2 * e.numel() ** 2) * float((((e - e_hat) / p_hat) ** 2).sum()))


# ----------------------------------------------------------------------------------------------
# Checks (plain functions of the estimator under test)
# ----------------------------------------------------------------------------------------------
def check_unbiased(estimator, names, case) -> None:
    """``E_o[L] = L_ideal = mean(e)`` (eq. 1), by Monte Carlo."""
    vals, d = _simulate(estimator, names, case)
    ideal = float(case["e"].mean())
    assert_mc_equal(mc_mean(vals, d), ideal, "E[L] vs L_ideal", scale=_float_scale(case))


def check_pathwise_ideal(estimator, names, case) -> None:
    """``L(o) = L_ideal`` for every draw (DR with ``e_hat = e``: ``o (e - e_hat) / p_hat = 0``)."""
    vals, _ = _simulate(estimator, names, case)
    ideal = float(case["e"].mean())
    worst = float((vals - ideal).abs().max())
    assert worst <= RTOL * _float_scale(case) + 1e-12, (
        f"L(o) differs from L_ideal = {ideal:.8g} by up to {worst:.3g} on some draw")


def check_bias_variance(estimator, names, case, *, printed_bias, printed_variance, library_bias,
                        library_variance) -> None:
    """Table 1 for arbitrary ``p_hat``: ``L_ideal - E[L]`` equals the printed bias, ``Var[L]`` the
    printed variance; the library's signed bias ``E[L] - L_ideal`` is its negation."""
    vals, d = _simulate(estimator, names, case)
    ideal = float(case["e"].mean())
    mean, var = mc_mean(vals, d), mc_var(vals, d)
    scale = _float_scale(case)
    assert_mc_equal(_mc.Estimate(ideal - mean.value, mean.se), printed_bias,
                    "Table 1 bias (printed, L_ideal - E[L])", scale=scale)
    assert_mc_equal(_mc.Estimate(mean.value - ideal, mean.se), library_bias,
                    "theory bias (E[L] - L_ideal)", scale=scale)
    assert_mc_equal(var, printed_variance, "Table 1 variance (printed)")
    assert_mc_equal(var, library_variance, "theory variance")


def check_generalization_bound(estimator, names, case, *, expected_value: float, bound: float) -> None:
    """Table 1 generalisation bound: ``P(|L - E_O[L]| > bound) <= delta``.

    ``E_O[L]`` is exact (the estimators are linear in ``o``).  The number of exceedances in
    ``n`` plain draws is Binomial(n, pi); the claim ``pi <= delta`` is rejected by the exact
    one-sided binomial test at the suite's false-alarm rate: ``P(Bin(n, delta) >= count) < alpha``.
    """
    delta = case["delta"]
    vals, d = _simulate(estimator, names, case, tilt=False)
    allowance = RTOL * (abs(expected_value) + _float_scale(case))  # floating point, not statistics
    exceed = int(((vals - expected_value).abs() > bound + allowance).sum())
    n = d.n
    p_value = float(stats.binom.sf(exceed - 1, n, delta))
    assert p_value >= FALSE_ALARM, (
        f"|L - E[L]| exceeded the bound {bound:.4g} in {exceed} of {n} draws ({exceed / n:.4f}); "
        f"delta = {delta}: P(Bin(n, delta) >= {exceed}) = {p_value:.2e} < {FALSE_ALARM:g}")


# ---- the checks with their claim, as called by the tests and by test_mutations.py ------------
def check_ips_unbiased(ips_fn, case) -> None:
    check_unbiased(ips_fn, IPS_ARGS, case)


def check_dr_unbiased(dr_fn, case) -> None:
    check_unbiased(dr_fn, DR_ARGS, case)


def check_dr_exact_when_e_hat_is_e(dr_fn, case) -> None:
    check_pathwise_ideal(dr_fn, DR_ARGS, case)
    check_unbiased(dr_fn, DR_ARGS, case)


def check_ips_table1(ips_fn, case) -> None:
    e, p, p_hat = case["e"], case["p"], case["p_hat"]
    check_bias_variance(ips_fn, IPS_ARGS, case,
                        printed_bias=table1_ips_bias(e, p, p_hat),
                        printed_variance=table1_ips_variance(e, p, p_hat),
                        library_bias=float(theory.ips_bias(e, p, p_hat)),
                        library_variance=float(theory.ips_variance(e, p, p_hat)))


def check_dr_table1(dr_fn, case) -> None:
    e, e_hat, p, p_hat = case["e"], case["e_hat"], case["p"], case["p_hat"]
    check_bias_variance(dr_fn, DR_ARGS, case,
                        printed_bias=table1_dr_bias(e, e_hat, p, p_hat),
                        printed_variance=table1_dr_variance(e, e_hat, p, p_hat),
                        library_bias=float(theory.dr_bias(e, e_hat, p, p_hat)),
                        library_variance=float(theory.dr_variance(e, e_hat, p, p_hat)))


def check_ips_bound(ips_fn, case) -> None:
    e, p, p_hat, delta = case["e"], case["p"], case["p_hat"], case["delta"]
    bound = table1_ips_bound(e, p_hat, delta)
    assert math.isclose(float(theory.ips_generalization_bound(e, p_hat, delta)), bound, rel_tol=1e-10)
    check_generalization_bound(ips_fn, IPS_ARGS, case, expected_value=float((p * e / p_hat).mean()), bound=bound)


def check_dr_bound(dr_fn, case) -> None:
    e, e_hat, p, p_hat, delta = case["e"], case["e_hat"], case["p"], case["p_hat"], case["delta"]
    bound = table1_dr_bound(e, e_hat, p_hat, delta)
    assert math.isclose(float(theory.dr_generalization_bound(e, e_hat, p_hat, delta)), bound, rel_tol=1e-10)
    expected = float((e_hat + p * (e - e_hat) / p_hat).mean())
    check_generalization_bound(dr_fn, DR_ARGS, case, expected_value=expected, bound=bound)


# ----------------------------------------------------------------------------------------------
# Claim 1: unbiasedness, double robustness, Table 1 bias and variance
# ----------------------------------------------------------------------------------------------
@given(case=cases(p_hat_is_p=True))
def test_ips_unbiased_when_p_hat_is_p(case):
    """Section 2.2.1: if ``p_hat = p`` for all pairs then ``E[L_IPS] = L_ideal`` (eq. 3 vs eq. 1).

    Verified: Monte Carlo mean of ``ips`` equals ``mean(e)`` within z*SE (alpha = 1e-6),
    propensities down to 1e-6 (rare pairs importance-tilted).  Verdict: holds.
    """
    check_ips_unbiased(ips, case)


@given(case=cases(p_hat_is_p=True))
def test_dr_unbiased_when_p_hat_is_p(case):
    """Section 2.2.3 (double robustness, propensity half): ``p_hat = p`` gives
    ``E[L_DR] = L_ideal`` whatever ``e_hat`` (eq. 7).  Verdict: holds."""
    check_dr_unbiased(dr, case)


@given(case=cases(e_hat_is_e=True))
def test_dr_unbiased_when_e_hat_is_e(case):
    """Section 2.2.3 (double robustness, imputation half): ``e_hat = e`` gives
    ``E[L_DR] = L_ideal`` whatever ``p_hat``.  Verified in the stronger form ``L_DR(o) = L_ideal``
    for every draw ``o``, and by the Monte Carlo mean.  Verdict: holds (pathwise)."""
    check_dr_exact_when_e_hat_is_e(dr, case)


@given(case=cases())
def test_ips_bias_and_variance_match_table1(case):
    """Table 1, IPS column, arbitrary ``p_hat``: ``L_ideal - E[L_IPS] = |D|^-1 sum (p_hat - p) e / p_hat``
    and ``Var[L_IPS] = |D|^-2 sum p (1 - p) e^2 / p_hat^2``.

    Verified: Monte Carlo mean and variance (batch-means SE of the variance) against the
    printed formulas and against ``theory.ips_bias`` (signed ``E[L] - L_ideal``) and
    ``theory.ips_variance``.  Verdict: holds (bias sign: Table 1 is ``L_ideal - E[L]``).
    """
    check_ips_table1(ips, case)


@given(case=cases())
def test_dr_bias_and_variance_match_table1(case):
    """Table 1, DR column, arbitrary ``p_hat`` and ``e_hat``:
    ``L_ideal - E[L_DR] = |D|^-1 sum (p_hat - p)(e - e_hat) / p_hat`` and
    ``Var[L_DR] = |D|^-2 sum p (1 - p)(e - e_hat)^2 / p_hat^2``.  Verdict: holds."""
    check_dr_table1(dr, case)


# ----------------------------------------------------------------------------------------------
# Claim 2: generalisation bounds
# ----------------------------------------------------------------------------------------------
@given(case=cases())
def test_ips_generalization_bound_holds(case):
    """Table 1, IPS generalisation bound: with probability at least ``1 - delta``,
    ``|L_IPS - E_O[L_IPS]| <= sqrt(log(2/delta) / (2|D|^2) sum (e / p_hat)^2)`` (Hoeffding: each
    summand ``o e / p_hat`` lies in an interval of length ``e / p_hat``).

    Verified: the exceedance frequency over 20 000 draws is not significantly above ``delta``
    (exact binomial test, alpha = 1e-6), delta in {0.01, 0.05, 0.1, 0.3}.  Verdict: holds.
    """
    check_ips_bound(ips, case)


@given(case=cases())
def test_dr_generalization_bound_holds(case):
    """Table 1, DR generalisation bound: with probability at least ``1 - delta``,
    ``|L_DR - E_O[L_DR]| <= sqrt(log(2/delta) / (2|D|^2) sum ((e - e_hat) / p_hat)^2)``.
    Verified as for IPS.  Verdict: holds."""
    check_dr_bound(dr, case)
