"""Reliability faults on the maths side (estimators/_validation.py, loss.py, imputation.py,
theory.py, multitask.py); each test failed before its fix.

1. Half precision (float16, bfloat16) is refused with a ``ValueError`` naming the argument.
2. No NaN or inf for any propensity the validation accepts: a property test over ``p_hat`` from
   1 down to the dtype's smallest normal number (and 1e-300 in float64, 1e-38 in float32), on a
   clicked and on an unclicked pair, for every estimator, imputation loss and closed form.
   Where ``o = 0`` the pair's term is exactly 0 for any ``p_hat``; where ``o = 1`` (and everywhere
   in the closed forms) ``p_hat`` is either accepted, with a finite value and finite gradients,
   or below the documented floor ``p_hat_floor(dtype, k)`` and refused naming ``p_hat`` and the
   floor.
3. ``estimators.theory``: empty input, strings, tensors on mismatched devices raise ``ValueError``
   naming the argument.
4. ``escm2_loss``: every bad input raises ``ValueError`` naming the argument the user passed;
   labels where ``o = 0`` never leak.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from estimators import ESTIMATORS, IMPUTATION_LOSSES, escm2_loss, theory
from estimators._validation import p_hat_floor

DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]

#: The highest power of ``1 / p_hat`` each function forms (its floor is ``p_hat_floor(dtype, k)``).
ESTIMATOR_POWER = {"ips": 1, "snips": 1, "dr": 1, "badr": 1}
IMPUTATION_POWER = {"dr": 1, "mrdr": 2, "dr_bias": 3, "dr_mse": 3, "badr": 2, "badr_paper": 2, "tdr_cl": 2}
WITH_P_HAT = [pytest.param(ESTIMATORS[n].function, ESTIMATORS[n].reads, k, id=f"estimator-{n}")
              for n, k in ESTIMATOR_POWER.items()] + [
    pytest.param(IMPUTATION_LOSSES[n].function, IMPUTATION_LOSSES[n].reads, k, id=f"imputation-{n}")
    for n, k in IMPUTATION_POWER.items()]
ALL_FUNCTIONS = [pytest.param(s.function, s.reads, id=f"estimator-{n}") for n, s in ESTIMATORS.items()] + [
    pytest.param(s.function, s.reads, id=f"imputation-{n}") for n, s in IMPUTATION_LOSSES.items()]


def _inputs(dtype, names, p_test=0.5, clicked=True, errors=0):
    """A batch of 5 pairs: pair 0 is clicked at an ordinary propensity, pair 1 is the pair under
    test (propensity ``p_test``, clicked or not); ``errors`` picks one of three error patterns."""
    e = [[0.7, 2.5, 0.1, 4.0, 1.3], [5.0, -5.0, 3.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0]][errors]
    e_hat = [[0.2, 1.0, 3.0, 0.5, 1.3], [-5.0, 5.0, 0.0, 1.0, 4.0], [1.0, 1.0, 1.0, 1.0, 1.0]][errors]
    o = [1.0, 1.0 if clicked else 0.0, 0.0, 1.0, 0.0]
    p_hat = [0.3, p_test, 0.05, 0.9, 1.0]
    full = {"e": e, "e_hat": e_hat, "o": o, "p_hat": p_hat}
    kw = {n: torch.tensor(full[n], dtype=torch.float64).to(dtype) for n in names}
    if not clicked and "e" in kw:
        kw["e"][1] = float("nan")  # unseen there
    for n in ("e", "e_hat", "p_hat"):
        if n in kw:
            kw[n].requires_grad_(True)
    return kw


def _p_grid(dtype):
    """Propensities from 1 down to the smallest normal number, the floors and their neighbours,
    and 1e-300 (float64) / 1e-38 (float32, a subnormal)."""
    info = torch.finfo(dtype)
    grid = {float(x) for x in np.logspace(0.0, math.log10(info.tiny), 40)}
    grid |= {info.tiny, 1e-300 if dtype == torch.float64 else 1e-38, 1.0 - info.eps}
    for k in (1, 2, 3):
        floor = p_hat_floor(dtype, k)
        grid |= {floor, floor * (1 - info.eps), floor * (1 + info.eps)}
    out = sorted({float(torch.tensor(p, dtype=dtype)) for p in grid})
    assert all(0.0 < p <= 1.0 for p in out)
    return out


def _value_and_grads(fn, kw):
    value = fn(**kw)
    leaves = [kw[n] for n in ("e", "e_hat", "p_hat") if n in kw]
    return value, torch.autograd.grad(value, leaves)


# ----------------------------------------------------------------------------------------------
# 1. Half precision refused
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("fn, names", ALL_FUNCTIONS)
def test_half_precision_refused(fn, names, half):
    """At p_hat = 0.003 half precision made MRDR inf and DR-BIAS / eq. 32 NaN: every estimator and
    imputation loss now refuses a half-precision argument, naming it, whether all inputs are half
    or only that one."""
    floats = [n for n in ("e", "e_hat", "p_hat") if n in names]
    base = {n: t.detach() for n, t in _inputs(torch.float32, names, p_test=0.003).items()}
    with pytest.raises(ValueError, match=rf"`{floats[0]}`.*float32 or float64"):
        fn(**{n: (t.to(half) if n in floats else t) for n, t in base.items()})
    for arg in floats:
        with pytest.raises(ValueError, match=rf"`{arg}` is torch\.(float16|bfloat16).*float32 or float64"):
            fn(**{n: (t.to(half) if n == arg else t) for n, t in base.items()})


# ----------------------------------------------------------------------------------------------
# 2. No NaN or inf for any accepted propensity
# ----------------------------------------------------------------------------------------------
def test_floors_are_the_documented_ones():
    """The floors the docstrings print (powers of two, so exact in every dtype)."""
    documented = {torch.float32: (2.2e-16, 5.8e-11, 1.5e-8), torch.float64: (1.0e-146, 5.9e-98, 1.4e-73)}
    for dtype, floors in documented.items():
        for k, want in zip((1, 2, 3), floors):
            floor = p_hat_floor(dtype, k)
            assert math.isclose(floor, want, rel_tol=0.03), (dtype, k, floor)
            assert math.log2(floor).is_integer()
            big = torch.tensor(1 / floor, dtype=dtype) ** (k + 1) / torch.finfo(dtype).eps
            assert bool(torch.isfinite(big))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn, names, power", WITH_P_HAT)
def test_unclicked_tiny_p_hat_is_exactly_ignored(fn, names, power, dtype):
    """Where o = 0 (e NaN there) any p_hat in (0, 1] is accepted and the pair's term is exactly
    0: the value is bitwise the one at p_hat = 0.5, every gradient is finite and the gradient in
    that p_hat is 0 (float32 at p_hat = 1e-13 made DR-BIAS NaN, float64 at 1e-300 MRDR, DR-BIAS
    and eq. 32)."""
    for errors in range(3):
        ref = fn(**_inputs(dtype, names, 0.5, clicked=False, errors=errors))
        assert bool(torch.isfinite(ref))
        for p in _p_grid(dtype):
            kw = _inputs(dtype, names, p, clicked=False, errors=errors)
            value, grads = _value_and_grads(fn, kw)
            assert value.item() == ref.item(), (p, value.item(), ref.item())
            assert all(bool(torch.isfinite(g).all()) for g in grads), (p, grads)
            assert float(grads[-1][1]) == 0.0, p  # d value / d p_hat of the unclicked pair


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn, names, power", WITH_P_HAT)
def test_clicked_tiny_p_hat_is_finite_or_refused(fn, names, power, dtype):
    """Where o = 1, p_hat at or above ``p_hat_floor(dtype, k)`` gives a finite value and finite
    gradients (e, e_hat and p_hat) with errors up to 5 in size; below it, a ``ValueError`` names
    ``p_hat`` and the floor."""
    floor = p_hat_floor(dtype, power)
    for errors in range(3):
        for p in _p_grid(dtype):
            kw = _inputs(dtype, names, p, clicked=True, errors=errors)
            if p < floor:
                with pytest.raises(ValueError, match=rf"`p_hat` is .* below {floor:.3g}"):
                    fn(**kw)
                continue
            value, grads = _value_and_grads(fn, kw)
            assert bool(torch.isfinite(value)), (p, float(value))
            assert all(bool(torch.isfinite(g).all()) for g in grads), (p, grads)


@pytest.mark.parametrize("fn, names, power", WITH_P_HAT)
def test_two_d_input_floor_per_clicked_pair(fn, names, power):
    """(K, B) input: a tiny p_hat on an unclicked pair of one batch is ignored, on a clicked pair
    refused."""
    kw = {n: t.detach() for n, t in _inputs(torch.float64, names, 1e-300, clicked=False).items()}
    two = {n: torch.stack([t, t.flip(0)]) for n, t in kw.items()}
    assert bool(torch.isfinite(fn(**two)))
    two["o"] = torch.ones_like(two["o"])
    if "e" in two:
        two["e"] = two["e"].nan_to_num(0.5)
    with pytest.raises(ValueError, match="`p_hat`"):
        fn(**two)


def _old_formulas(e, e_hat, o, p_hat, p):
    """The formulas as written before the overflow fix (``x / p_hat**k`` with autograd's gradient,
    ``p_hat`` read on unclicked pairs too)."""
    e = torch.where(o == 1, e, torch.zeros((), dtype=e.dtype))
    w = o / p_hat
    sum_w = w.sum(-1, keepdim=True)
    dr_terms = e_hat + o * (e - e_hat) / p_hat
    estimate = dr_terms.sum(-1, keepdim=True) / sum_w
    resid = e - e_hat + e_hat.sum(-1, keepdim=True) / sum_w - estimate
    eq8 = (o * (1 - p_hat) * (e_hat - e) ** 2 / p_hat**2).sum(-1).mean()
    eq9 = (o * (o - p_hat) ** 2 * (e_hat - e) ** 2 / p_hat**3).sum(-1).mean()
    delta = e_hat - e
    return {
        "ips": (o * e / p_hat).mean(-1).mean(),
        "snips": ((o * e / p_hat).sum(-1) / (o / p_hat).sum(-1)).mean(),
        "dr": dr_terms.mean(-1).mean(),
        "badr": (dr_terms.sum(-1) / (o / p_hat).sum(-1)).mean(),
        "eq6": (o * (e_hat - e) ** 2 / p_hat).mean(dim=-1).mean(),
        "eq8": eq8, "eq9": eq9, "eq10": 0.5 * eq9 + (1 - 0.5) * eq8,
        "eq32": ((w**2 * resid**2).sum(-1) / sum_w.squeeze(-1) ** 2).mean(),
        "ips_variance": (p * (1 - p) * e_hat**2 / p_hat**2).sum() / e.numel() ** 2,
        "dr_variance": (p * (1 - p) * delta**2 / p_hat**2).sum() / e.numel() ** 2,
        "dr_bound": torch.sqrt(math.log(2 / 0.1) / (2 * e.numel() ** 2) * ((delta / p_hat) ** 2).sum()),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_bitwise_unchanged_on_ordinary_inputs(dtype):
    """Reading p_hat only where clicked and the overflow-safe gradient of ``x / p_hat**k`` leave
    the values bitwise as before (float32 and float64, 1-D and 2-D), and the gradients in e and
    e_hat within rounding."""
    rng = np.random.default_rng(5)
    for shape in ((50,), (4, 30)):
        o = torch.tensor(rng.random(shape) < 0.4, dtype=dtype)
        o[..., 0] = 1
        e, e_hat = (torch.tensor(rng.random(shape) * 3, dtype=dtype).requires_grad_(True) for _ in range(2))
        p_hat = torch.tensor(10 ** rng.uniform(-6, 0, shape), dtype=dtype)
        p = torch.tensor(rng.uniform(0.01, 1, shape), dtype=dtype)
        old = _old_formulas(e, e_hat, o, p_hat, p)
        d = e_hat - torch.where(o == 1, e, 0.0)
        new = {
            "ips": ESTIMATORS["ips"].function(e, o, p_hat), "snips": ESTIMATORS["snips"].function(e, o, p_hat),
            "dr": ESTIMATORS["dr"].function(e, e_hat, o, p_hat),
            "badr": ESTIMATORS["badr"].function(e, e_hat, o, p_hat),
            **{eq: IMPUTATION_LOSSES[n].function(e, e_hat, o, p_hat)
               for eq, n in (("eq6", "dr"), ("eq8", "mrdr"), ("eq9", "dr_bias"), ("eq10", "dr_mse"), ("eq32", "badr"))},
            "ips_variance": theory.ips_variance(e_hat, p, p_hat),
            "dr_variance": theory.dr_variance(torch.where(o == 1, e, 0.0), e_hat, p, p_hat),
            "dr_bound": theory.dr_generalization_bound(d, torch.zeros_like(d), p_hat, 0.1),
        }
        for name, want in old.items():
            assert new[name].item() == want.item(), (name, new[name].item(), want.item())
            g_new = torch.autograd.grad(new[name], [e, e_hat], allow_unused=True, retain_graph=True)
            g_old = torch.autograd.grad(want, [e, e_hat], allow_unused=True, retain_graph=True)
            for a, b in zip(g_new, g_old):
                if a is not None and b is not None:
                    torch.testing.assert_close(a, b, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0.0)


# Closed forms: (function, argument names, divisions by p_hat)
THEORY = [
    pytest.param(theory.ips_bias, ("e", "p", "p_hat"), 1, id="ips_bias"),
    pytest.param(theory.ips_variance, ("e", "p", "p_hat"), 2, id="ips_variance"),
    pytest.param(theory.dr_bias, ("e", "e_hat", "p", "p_hat"), 1, id="dr_bias"),
    pytest.param(theory.dr_variance, ("e", "e_hat", "p", "p_hat"), 2, id="dr_variance"),
    pytest.param(lambda e, p_hat: theory.ips_generalization_bound(e, p_hat, 0.05), ("e", "p_hat"), 2,
                 id="ips_generalization_bound"),
    pytest.param(lambda e, e_hat, p_hat: theory.dr_generalization_bound(e, e_hat, p_hat, 0.05),
                 ("e", "e_hat", "p_hat"), 2, id="dr_generalization_bound"),
    pytest.param(theory.badr_bias, ("e", "e_hat", "p", "p_hat"), 2, id="badr_bias"),
    pytest.param(lambda **kw: theory.badr_bias(**kw, variant="paper"), ("e", "e_hat", "p", "p_hat"), 2,
                 id="badr_bias_paper"),
    pytest.param(theory.badr_variance, ("e", "e_hat", "p", "p_hat"), 2, id="badr_variance"),
    pytest.param(lambda **kw: theory.badr_variance(**kw, variant="paper"), ("e", "e_hat", "p", "p_hat"), 2,
                 id="badr_variance_paper"),
]


def _theory_inputs(dtype, names, p_hat_test, p_test, errors):
    e = [[0.7, 2.5, 0.1, 4.0, 1.3], [5.0, -5.0, 3.0, 0.5, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0]][errors]
    e_hat = [[0.2, 1.0, 3.0, 0.5, 1.3], [-5.0, 5.0, 0.0, 1.0, 4.0], [1.0, 1.0, 1.0, 1.0, 1.0]][errors]
    full = {"e": e, "e_hat": e_hat, "p": [0.3, p_test, 0.05, 0.9, 1.0], "p_hat": [0.2, p_hat_test, 0.1, 0.8, 1.0]}
    return {n: torch.tensor(full[n], dtype=torch.float64).to(dtype).requires_grad_(True) for n in names}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn, names, power", THEORY)
def test_theory_tiny_p_hat_is_finite_or_refused(fn, names, power, dtype):
    """Every closed form, ``p_hat`` of one pair over the grid, that pair's true ``p`` equal to it,
    0.5 or 1: at or above ``p_hat_floor(dtype, k)`` the value and the gradients (in e, e_hat, p,
    p_hat) are finite; below it a ``ValueError`` names ``p_hat`` and the floor (float64 at
    p_hat = 1e-300 gave inf or NaN)."""
    floor = p_hat_floor(dtype, power)
    for errors in range(3):
        for q in _p_grid(dtype):
            for p in (q, 0.5, 1.0):
                kw = _theory_inputs(dtype, names, q, p, errors)
                if q < floor:
                    with pytest.raises(ValueError, match=rf"`p_hat` is .* below {floor:.3g}"):
                        fn(**kw)
                    continue
                value = fn(**kw)
                assert bool(torch.isfinite(value)), (q, p, float(value))
                grads = torch.autograd.grad(value, list(kw.values()))
                assert all(bool(torch.isfinite(g).all()) for g in grads), (q, p, grads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn", [theory.badr_bias, theory.badr_variance])
@pytest.mark.parametrize("variant", ["corrected", "paper"])
def test_badr_theory_overflow_refused(fn, variant, dtype):
    """A batch whose true propensities are all tiny has an expected click weight
    ``E[W] = sum(p / p_hat)`` so small that the corrected BADR expansion (which divides
    ``sum e_hat`` by it) and the variance (divided by ``E[W]^2``) overflow: ``ValueError`` (they
    returned inf or NaN).  The paper's bias (a weighted mean of ``e - e_hat``) and the IPS / DR
    closed forms (``p`` only multiplies) stay finite there."""
    tiny = 1e-300 if dtype == torch.float64 else 1e-38
    e, e_hat = torch.tensor([1.0, 2.0, 0.5], dtype=dtype), torch.tensor([0.3, 0.1, 0.2], dtype=dtype)
    p, p_hat = torch.full((3,), tiny, dtype=dtype), torch.full((3,), 0.5, dtype=dtype)
    if variant == "paper" and fn is theory.badr_bias:
        assert bool(torch.isfinite(fn(e, e_hat, p, p_hat, variant=variant)))
    else:
        with pytest.raises(ValueError, match="overflows.*`p`"):
            fn(e, e_hat, p, p_hat, variant=variant)
    for value in (theory.ips_bias(e, p, p_hat), theory.ips_variance(e, p, p_hat),
                  theory.dr_bias(e, e_hat, p, p_hat), theory.dr_variance(e, e_hat, p, p_hat)):
        assert bool(torch.isfinite(value))


# ----------------------------------------------------------------------------------------------
# 3. estimators.theory: empty input, strings, devices
# ----------------------------------------------------------------------------------------------
THEORY_ARGS = [pytest.param(fn, names, id=id_) for fn, names, id_ in (
    (theory.ips_bias, ("e", "p", "p_hat"), "ips_bias"),
    (theory.ips_variance, ("e", "p", "p_hat"), "ips_variance"),
    (theory.dr_bias, ("e", "e_hat", "p", "p_hat"), "dr_bias"),
    (theory.dr_variance, ("e", "e_hat", "p", "p_hat"), "dr_variance"),
    (lambda e, p_hat: theory.ips_generalization_bound(e, p_hat, 0.1), ("e", "p_hat"), "ips_bound"),
    (lambda e, e_hat, p_hat: theory.dr_generalization_bound(e, e_hat, p_hat, 0.1), ("e", "e_hat", "p_hat"),
     "dr_bound"),
    (theory.badr_bias, ("e", "e_hat", "p", "p_hat"), "badr_bias"),
    (theory.badr_variance, ("e", "e_hat", "p", "p_hat"), "badr_variance"),
)]


@pytest.mark.parametrize("fn, names", THEORY_ARGS)
def test_theory_bad_input_names_the_argument(fn, names):
    """Empty input (NaN or ZeroDivisionError before), a string (TypeError before) and a tensor on
    another device (RuntimeError before) raise ``ValueError`` naming the argument."""
    good = {n: torch.full((4,), 0.5, dtype=torch.float64) for n in names}
    assert bool(torch.isfinite(fn(**good)))
    for shape in ((0,), (2, 0)):
        with pytest.raises(ValueError, match="`e` is empty"):
            fn(**{n: torch.empty(shape, dtype=torch.float64) for n in names})
    for arg in names:
        for bad in ("0.5", ["a", "b", "c", "d"], None, {"x": 1}, torch.full((4,), 0.5 + 0.5j)):
            with pytest.raises(ValueError, match=f"`{arg}`"):
                fn(**{**good, arg: bad})
    other = torch.device("cuda") if torch.cuda.is_available() else torch.device("meta")
    last = names[-1]
    with pytest.raises(ValueError, match=f"`{last}` is on {other.type}"):
        fn(**{**good, last: good[last].to(other)})
    # numpy arrays and lists are fine (on the CPU)
    assert bool(torch.isfinite(fn(**{n: [0.5] * 4 for n in names})))


def test_theory_scalar_arguments_name_themselves():
    e = torch.full((4,), 0.5, dtype=torch.float64)
    for delta in ("x", None, [0.1, 0.2]):
        with pytest.raises(ValueError, match="`delta`"):
            theory.ips_generalization_bound(e, e, delta)
    with pytest.raises(ValueError, match="`variant`"):
        theory.badr_bias(e, e, e, e, variant=None)


# ----------------------------------------------------------------------------------------------
# 4. escm2_loss
# ----------------------------------------------------------------------------------------------
def _escm2_batch(dtype=torch.float64, n=12):
    rng = np.random.default_rng(7)
    o = (rng.random(n) < 0.5).astype(float)
    o[0], o[1] = 1.0, 0.0
    r = np.where(o == 1, rng.integers(0, 2, n), np.nan)
    arrays = {"ctr_logit": rng.normal(size=n), "cvr_logit": rng.normal(size=n), "o": o, "r": r,
              "delta_hat": rng.uniform(0.1, 2, n)}
    return {k: torch.tensor(v, dtype=dtype) for k, v in arrays.items()}


def _escm2(b, regulariser="dr", **kw):
    return escm2_loss(b["ctr_logit"], b["cvr_logit"], b["o"], b["r"], regulariser=regulariser,
                      delta_hat=b["delta_hat"], **kw)


def test_escm2_bad_tensors_name_the_argument():
    """NaN / inf logits or ``delta_hat`` (a silent NaN loss before), bad labels, shapes, dtypes
    and devices: the message names the argument the caller passed (``r``, ``cvr_logit``, not
    check_batch's ``e`` / ``e_hat``)."""
    nan, inf = float("nan"), float("inf")
    for arg, bad_value in (("ctr_logit", nan), ("ctr_logit", inf), ("cvr_logit", nan), ("cvr_logit", -inf),
                           ("delta_hat", nan), ("delta_hat", inf)):
        for at in (0, 1):  # a clicked and an unclicked pair
            b = _escm2_batch()
            b[arg][at] = bad_value
            with pytest.raises(ValueError, match=f"`{arg}`"):
                _escm2(b)
    for bad_label in (nan, 2.0, 0.5, -1.0, inf):
        b = _escm2_batch()
        b["r"][0] = bad_label  # o = 1 there
        with pytest.raises(ValueError, match="`r`"):
            _escm2(b)
    b = _escm2_batch()
    b["o"][2] = 0.5
    with pytest.raises(ValueError, match="`o`"):
        _escm2(b)
    for arg in ("ctr_logit", "cvr_logit", "r", "delta_hat"):
        b = _escm2_batch()
        b[arg] = b[arg][:-1]
        with pytest.raises(ValueError, match=f"`{arg}` has shape"):
            _escm2(b)
        b = _escm2_batch()
        b[arg] = b[arg].to(torch.float16)
        with pytest.raises(ValueError, match=f"`{arg}` is torch.float16.*float32 or float64"):
            _escm2(b)
        b = _escm2_batch()
        b[arg] = b[arg].float()
        with pytest.raises(ValueError, match=f"`{arg}` torch.float32"):
            _escm2(b)
        b = _escm2_batch()
        b[arg] = b[arg].to("meta")
        with pytest.raises(ValueError, match=f"`{arg}` is on meta"):
            _escm2(b)
    b = _escm2_batch()
    b["r"] = b["r"].nan_to_num(0.0).long()
    with pytest.raises(ValueError, match="`r` must be a floating-point tensor"):
        _escm2(b)


@pytest.mark.parametrize("regulariser", [None, "ips", "dr"])
def test_escm2_bad_scalars_name_the_argument(regulariser):
    """NaN, inf or negative ``lambda_c`` / ``lambda_g`` (a silent NaN loss or a loss to maximise
    before), ``gamma`` outside (0, 1] or below the float32 floor, non-numbers."""
    b = _escm2_batch()
    for arg in ("lambda_c", "lambda_g"):
        for bad in (float("nan"), float("inf"), -float("inf"), -0.1, "x", None):
            with pytest.raises(ValueError, match=f"`{arg}`"):
                _escm2(b, regulariser, **{arg: bad})
        assert bool(torch.isfinite(_escm2(b, regulariser, **{arg: 0.0})["loss"]))
    for bad in (0.0, -0.1, 1.5, float("nan"), float("inf"), "x", None):
        with pytest.raises(ValueError, match="`gamma`"):
            _escm2(b, regulariser, gamma=bad)
    b32 = _escm2_batch(torch.float32)
    with pytest.raises(ValueError, match="`gamma`"):
        _escm2(b32, regulariser, gamma=1e-40)  # a float32 subnormal: 1 / gamma = inf
    assert bool(torch.isfinite(_escm2(b32, regulariser, gamma=p_hat_floor(torch.float32, 1))["loss"]))


@pytest.mark.parametrize("regulariser", [None, "ips", "dr"])
def test_escm2_unclicked_labels_never_leak(regulariser):
    """``r`` may be anything where o = 0: the value and every gradient are bitwise the same for
    NaN, inf, 5 or 0 there."""
    results = []
    for unseen in (float("nan"), float("inf"), -float("inf"), 5.0, 0.0):
        b = _escm2_batch()
        b["r"] = torch.where(b["o"] == 1, b["r"], unseen)
        leaves = [b[k].requires_grad_(True) for k in ("ctr_logit", "cvr_logit", "delta_hat")]
        b["r"].requires_grad_(True)
        out = _escm2(b, regulariser)
        grads = torch.autograd.grad(out["loss"], [*leaves, b["r"]], allow_unused=True)
        assert all(g is None or bool(torch.isfinite(g).all()) for g in grads)
        results.append((out["loss"].item(), [None if g is None else g.tolist() for g in grads]))
    assert all(r == results[0] for r in results[1:])
    assert math.isfinite(results[0][0])
