"""Mutation check: every property test of tests/test_theorems_*.py must catch a broken estimator.

Each property is a plain function ``check_*(estimator, case)`` in its theorem module; the theorem
test runs it on the library's estimator (which must pass), and :func:`test_mutant_is_detected`
runs the same check, with the same Hypothesis strategy, on deliberately broken estimators (which
must fail).  A mutant counts as detected only by the property's own assertion: a failure of the
Monte Carlo machinery (``per-row extraction``) or any other exception type is not accepted.

The mutants follow the estimators' contract (same arguments, :func:`check_batch` validation and
masking, 1-D or (K, B) input) and are homogeneous in ``(e, e_hat)`` like the real ones, so each
differs from the real estimator only in the formula.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, given, settings

import test_theorems_badr as TB
import test_theorems_escm2 as TE
import test_theorems_table1 as T1
from estimators import badr, ips
from estimators._validation import check_batch

#: Examples Hypothesis may try before a mutant must have been caught.
MUTANT_EXAMPLES = 30


# ----------------------------------------------------------------------------------------------
# Mutants (deliberately broken estimators)
# ----------------------------------------------------------------------------------------------
def ips_missing_inverse(e, o, p_hat):
    """IPS without ``1 / p_hat``: the naive estimator (eq. 2)."""
    o, e, _, p_hat = check_batch(o, e=e, p_hat=p_hat)
    return (o * e).mean(-1).mean()


def ips_squared_inverse(e, o, p_hat):
    """IPS with ``1 / p_hat^2``."""
    o, e, _, p_hat = check_batch(o, e=e, p_hat=p_hat)
    return (o * e / p_hat**2).mean(-1).mean()


def ips_sum_normaliser(e, o, p_hat):
    """IPS with the batch sum instead of the mean (wrong normaliser ``1`` for ``1 / |D|``)."""
    o, e, _, p_hat = check_batch(o, e=e, p_hat=p_hat)
    return (o * e / p_hat).sum(-1).mean()


def dr_e_hat_not_subtracted(e, e_hat, o, p_hat):
    """DR with ``o e / p_hat`` instead of ``o (e - e_hat) / p_hat``."""
    o, e, e_hat, p_hat = check_batch(o, e=e, e_hat=e_hat, p_hat=p_hat)
    return (e_hat + o * e / p_hat).mean(-1).mean()


def dr_no_imputation_term(e, e_hat, o, p_hat):
    """DR without the imputed term ``e_hat``."""
    o, e, e_hat, p_hat = check_batch(o, e=e, e_hat=e_hat, p_hat=p_hat)
    return (o * (e - e_hat) / p_hat).mean(-1).mean()


def dr_missing_inverse(e, e_hat, o, p_hat):
    """DR without ``1 / p_hat`` on the correction."""
    o, e, e_hat, p_hat = check_batch(o, e=e, e_hat=e_hat, p_hat=p_hat)
    return (e_hat + o * (e - e_hat)).mean(-1).mean()


def dr_sum_normaliser(e, e_hat, o, p_hat):
    """DR with the batch sum instead of the mean."""
    o, e, e_hat, p_hat = check_batch(o, e=e, e_hat=e_hat, p_hat=p_hat)
    return (e_hat + o * (e - e_hat) / p_hat).sum(-1).mean()


def snips_click_normaliser(e, o, p_hat):
    """SNIPS normalised by the number of clicks instead of ``sum o / p_hat``."""
    o, e, _, p_hat = check_batch(o, e=e, p_hat=p_hat, need_click=True)
    return ((o * e / p_hat).sum(-1) / o.sum(-1)).mean()


def badr_click_normaliser(e, e_hat, o, p_hat):
    """BADR normalised by the number of clicks instead of ``sum o / p_hat``."""
    o, e, e_hat, p_hat = check_batch(o, e=e, e_hat=e_hat, p_hat=p_hat, need_click=True)
    return ((e_hat + o * (e - e_hat) / p_hat).sum(-1) / o.sum(-1)).mean()


def badr_e_hat_not_subtracted(e, e_hat, o, p_hat):
    """BADR with ``o e / p_hat`` instead of ``o (e - e_hat) / p_hat``."""
    o, e, e_hat, p_hat = check_batch(o, e=e, e_hat=e_hat, p_hat=p_hat, need_click=True)
    return ((e_hat + o * e / p_hat).sum(-1) / (o / p_hat).sum(-1)).mean()


def badr_batch_normaliser(e, e_hat, o, p_hat):
    """BADR with DR's ``1 / |D^(k)|`` instead of ``1 / sum o / p_hat`` (i.e. DR)."""
    o, e, e_hat, p_hat = check_batch(o, e=e, e_hat=e_hat, p_hat=p_hat, need_click=True)
    return (e_hat + o * (e - e_hat) / p_hat).mean(-1).mean()


def badr_missing_imputation(e, e_hat, o, p_hat):
    """BADR without the ``sum e_hat`` term in the numerator."""
    o, e, e_hat, p_hat = check_batch(o, e=e, e_hat=e_hat, p_hat=p_hat, need_click=True)
    return ((o * (e - e_hat) / p_hat).sum(-1) / (o / p_hat).sum(-1)).mean()


def _eq32_parts(e, e_hat, o, p_hat):
    o, e, e_hat, p_hat = check_batch(o, e=e, e_hat=e_hat, p_hat=p_hat, need_click=True)
    w = o / p_hat
    sum_w = w.sum(-1, keepdim=True)
    estimate = (e_hat + w * (e - e_hat)).sum(-1, keepdim=True) / sum_w
    resid = e - e_hat + e_hat.sum(-1, keepdim=True) / sum_w - estimate
    return w, sum_w.squeeze(-1), resid


def eq32_w_not_squared(e, e_hat, o, p_hat):
    """Eq. (32) with ``w`` for ``w^2``."""
    w, sum_w, resid = _eq32_parts(e, e_hat, o, p_hat)
    return ((w * resid**2).sum(-1) / sum_w**2).mean()


def eq32_unnormalised(e, e_hat, o, p_hat):
    """Eq. (32) without the ``(sum w)^2`` denominator."""
    w, _, resid = _eq32_parts(e, e_hat, o, p_hat)
    return (w**2 * resid**2).sum(-1).mean()


def eq32_estimate_not_subtracted(e, e_hat, o, p_hat):
    """Eq. (32) with ``e - e_hat + E_hat`` for ``e - e_hat + E_hat - L_BADR``."""
    o, e, e_hat, p_hat = check_batch(o, e=e, e_hat=e_hat, p_hat=p_hat, need_click=True)
    w = o / p_hat
    sum_w = w.sum(-1, keepdim=True)
    resid = e - e_hat + e_hat.sum(-1, keepdim=True) / sum_w
    return ((w**2 * resid**2).sum(-1) / sum_w.squeeze(-1) ** 2).mean()


def cvr_ratio_of_means(c_hat, o_hat):
    """An "ESMM" reporting ``E[C_hat] / E[O_hat]`` for every pair (no Jensen gap)."""
    return c_hat.mean() / o_hat.mean()


def cvr_product(c_hat, o_hat):
    """``c_hat * o_hat`` instead of ``c_hat / o_hat``."""
    return c_hat * o_hat


# ----------------------------------------------------------------------------------------------
# The matrix: (property test, its check, its strategy) x mutants it must catch
# ----------------------------------------------------------------------------------------------
def _matrix():
    rows = [
        ("test_ips_unbiased_when_p_hat_is_p", T1.check_ips_unbiased, T1.cases(p_hat_is_p=True),
         [ips_missing_inverse, ips_squared_inverse, ips_sum_normaliser]),
        ("test_dr_unbiased_when_p_hat_is_p", T1.check_dr_unbiased, T1.cases(p_hat_is_p=True),
         [dr_e_hat_not_subtracted, dr_no_imputation_term, dr_missing_inverse]),
        ("test_dr_unbiased_when_e_hat_is_e", T1.check_dr_exact_when_e_hat_is_e, T1.cases(e_hat_is_e=True),
         [dr_e_hat_not_subtracted, dr_no_imputation_term]),
        ("test_ips_bias_and_variance_match_table1", T1.check_ips_table1, T1.cases(),
         [ips_squared_inverse, ips_sum_normaliser]),
        ("test_dr_bias_and_variance_match_table1", T1.check_dr_table1, T1.cases(),
         [dr_missing_inverse, dr_e_hat_not_subtracted]),
        ("test_ips_generalization_bound_holds", T1.check_ips_bound, T1.cases(), [ips_sum_normaliser]),
        ("test_dr_generalization_bound_holds", T1.check_dr_bound, T1.cases(), [dr_sum_normaliser]),
        ("test_snips_is_badr_with_zero_imputation", TB.check_snips_is_badr_with_zero_imputation,
         TB.identity_cases(), [badr_click_normaliser, badr_batch_normaliser]),
        ("test_snips_is_badr_with_zero_imputation[snips]",
         lambda snips_fn, case: TB.check_snips_is_badr_with_zero_imputation(badr, case, snips_fn=snips_fn),
         TB.identity_cases(), [snips_click_normaliser, ips_sum_normaliser]),
        ("test_badr_is_dr_times_batch_factor", TB.check_badr_is_scaled_dr, TB.identity_cases(),
         [badr_click_normaliser, badr_e_hat_not_subtracted, badr_batch_normaliser]),
        ("test_badr_bias_is_order_one_over_b_when_p_hat_is_p", TB.check_bias_vanishes_when_p_hat_is_p,
         TB.templates(p_hat_is_p=True), [badr_click_normaliser, badr_missing_imputation]),
        ("test_badr_proportional_to_ideal_batch_loss_when_e_hat_is_e", TB.check_proportional_when_e_hat_is_e,
         TB.proportional_cases(), [badr_e_hat_not_subtracted, badr_missing_imputation]),
        ("test_theorem_3_1_bias_leading_order", TB.check_theorem_3_1, TB.templates(),
         [badr_click_normaliser, badr_e_hat_not_subtracted]),
        ("test_theorem_3_2_variance_leading_order", TB.check_theorem_3_2, TB.templates(),
         [badr_batch_normaliser, badr_missing_imputation]),
        ("test_corollary_3_1_bounded_badr_vs_diverging_dr", TB.check_corollary_3_1, TB.corollary_cases(),
         [badr_batch_normaliser]),
        ("test_theorem_3_5_eq32_estimates_what", TB.check_theorem_3_5, TB.templates(),
         [eq32_w_not_squared, eq32_unnormalised, eq32_estimate_not_subtracted]),
        ("test_theorem_3_5_kappa_rare_clicks", TB.check_eq32_rare_clicks, TB.rare_click_cases(),
         [eq32_estimate_not_subtracted]),
        ("test_lemma_2_ips_regulariser_bias_and_variance", TE.check_lemma_2, TE.escm2_cases(),
         [ips_squared_inverse, ips_missing_inverse]),
        ("test_lemma_3_dr_regulariser_bias_and_variance", TE.check_lemma_3, TE.escm2_cases(),
         [dr_missing_inverse, dr_no_imputation_term]),
        ("test_lemma_3_observation_dr_variance_below_ips",
         lambda dr_fn, case: TE.check_dr_variance_below_ips(ips, dr_fn, case), TE.observation_cases(),
         [dr_e_hat_not_subtracted]),
        ("test_proposition_4_ips_regulariser_unbiased_with_accurate_ctr",
         lambda ips_fn, case: T1.check_unbiased(ips_fn, T1.IPS_ARGS, case), TE.escm2_cases(p_hat_is_p=True),
         [ips_missing_inverse]),
        ("test_proposition_7_dr_regulariser_unbiased",
         lambda dr_fn, case: T1.check_unbiased(dr_fn, T1.DR_ARGS, case), TE.escm2_cases(e_hat_is_e=True),
         [dr_e_hat_not_subtracted]),
        ("test_proposition_1_esmm_overestimates_under_independence", TE.check_proposition_1, TE.populations(),
         [cvr_ratio_of_means, cvr_product]),
    ]
    for test_name, check, strategy, mutants in rows:
        for mutant in mutants:
            yield pytest.param(check, strategy, mutant, id=f"{test_name}--{mutant.__name__}")


MATRIX = list(_matrix())


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    import _mc

    with _mc.single_thread():
        yield


@pytest.mark.parametrize("check, strategy, mutant", MATRIX)
def test_mutant_is_detected(check, strategy, mutant):
    """The property ``check`` (the body of the named theorem test) fails on ``mutant`` within
    ``MUTANT_EXAMPLES`` Hypothesis examples (deterministic: derandomised, no shrinking)."""

    @settings(max_examples=MUTANT_EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def property_on_mutant(case):
        check(mutant, case)

    with pytest.raises(AssertionError) as info:
        property_on_mutant()
    assert "per-row extraction" not in str(info.value), f"detected by the MC machinery, not the property: {info.value}"


def test_every_property_test_has_a_mutant():
    """Every Hypothesis property test of the theorem modules appears in the mutation matrix."""
    import inspect

    names = {p.id.split("--")[0].split("[")[0] for p in MATRIX}
    for module in (T1, TB, TE):
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if name.startswith("test_") and getattr(fn, "hypothesis", None) is not None:
                assert name in names, f"{module.__name__}.{name} has no mutant in tests/test_mutations.py"
