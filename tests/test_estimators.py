"""Unit tests of the estimator core (estimators/loss.py, imputation.py, theory.py, _validation.py).

1. Each estimator (eqs. 2, 3, 37, 5, 7, 13), imputation loss (eqs. 6, 8, 9, 10, 32) and theory
   function (Table 1, Theorems 3.1-3.2 as printed and corrected) against a direct numpy
   transcription of its equation, float64, rtol 1e-10; 1-D ``(B,)`` and 2-D ``(K, B)`` inputs
   (2-D = mean of the K per-batch values); propensities down to 1e-6; NaN errors on unclicked
   pairs, which must reach neither the value nor the gradient.
2. Validation: every bad input raises ``ValueError`` whose message names the argument.
3. Common tests over the registries ``ESTIMATORS`` and ``IMPUTATION_LOSSES`` (after
   scikit-learn's): float32 and float64, CPU and CUDA (skipped without a GPU), finite gradients,
   NaN in unclicked errors ignored, bad input rejected, dtype and device preserved.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import _mc
from estimators import ESTIMATORS, IMPUTATION_LOSSES, badr, badr_imputation_loss, dr_mse_imputation_loss, snips, theory

RTOL = 1e-10
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
DEVICES = ["cpu", CUDA]
DTYPES = [torch.float32, torch.float64]


# ----------------------------------------------------------------------------------------------
# Direct numpy transcriptions (per batch along the last axis, then the mean over batches)
#
# Each takes ``mag``: with ``mag=True`` it evaluates the same expression with every input and
# every difference replaced by absolute values (``a - b -> |a| + |b|``).  That is the scale of
# the floating-point error of the sum, so comparisons allow ``RTOL * (|value| + magnitude)``
# and stay at rtol 1e-10 even where terms cancel (signed errors, p_hat = 1e-6).
# ----------------------------------------------------------------------------------------------
def _rows(*xs):
    return [np.atleast_2d(np.asarray(x, dtype=np.float64)) for x in xs]


def _clicked(e, o):
    """``o * e`` as the papers write it, with ``e`` undefined (NaN) where ``o = 0``."""
    return np.where(o == 1, e, 0.0)


def _a(x, mag):
    return np.abs(x) if mag else x


def _sub(x, y, mag):
    return np.abs(x) + np.abs(y) if mag else x - y


def np_naive(e, o, mag=False):
    """Eq. (2): (1/|D|) sum o e."""
    e, o = _rows(e, o)
    return np.mean([np.sum(oo * _a(_clicked(ee, oo), mag)) / oo.size for ee, oo in zip(e, o)])


def np_ips(e, o, p_hat, mag=False):
    """Eq. (3): (1/|D|) sum o e / p_hat."""
    e, o, p_hat = _rows(e, o, p_hat)
    return np.mean([np.sum(oo * _a(_clicked(ee, oo), mag) / pp) / oo.size for ee, oo, pp in zip(e, o, p_hat)])


def np_snips(e, o, p_hat, mag=False):
    """Eq. (37): sum o e / p_hat / sum o / p_hat (per batch)."""
    e, o, p_hat = _rows(e, o, p_hat)
    return np.mean([np.sum(oo * _a(_clicked(ee, oo), mag) / pp) / np.sum(oo / pp) for ee, oo, pp in zip(e, o, p_hat)])


def np_eib(e, e_hat, o, mag=False):
    """Eq. (5): (1/|D|) sum o e + (1 - o) e_hat."""
    e, e_hat, o = _rows(e, e_hat, o)
    return np.mean([np.sum(oo * _a(_clicked(ee, oo), mag) + (1 - oo) * _a(hh, mag)) / oo.size
                    for ee, hh, oo in zip(e, e_hat, o)])


def _dr_terms(e, e_hat, o, p_hat, mag):
    return _a(e_hat, mag) + o * _sub(_clicked(e, o), e_hat, mag) / p_hat


def np_dr(e, e_hat, o, p_hat, mag=False):
    """Eq. (7): (1/|D|) sum e_hat + o (e - e_hat) / p_hat."""
    e, e_hat, o, p_hat = _rows(e, e_hat, o, p_hat)
    return np.mean([np.sum(_dr_terms(*r, mag)) / r[2].size for r in zip(e, e_hat, o, p_hat)])


def _np_badr_batch(e, e_hat, o, p_hat, mag=False):
    return np.sum(_dr_terms(e, e_hat, o, p_hat, mag)) / np.sum(o / p_hat)


def np_badr(e, e_hat, o, p_hat, mag=False):
    """Eq. (13): (1/K) sum_k [sum_k e_hat + o (e - e_hat) / p_hat] / sum_k o / p_hat."""
    e, e_hat, o, p_hat = _rows(e, e_hat, o, p_hat)
    return np.mean([_np_badr_batch(*r, mag) for r in zip(e, e_hat, o, p_hat)])


def np_eq6(e, e_hat, o, p_hat, mag=False):
    """Eq. (6) with l = squared error: (1/|D|) sum o (e_hat - e)^2 / p_hat."""
    e, e_hat, o, p_hat = _rows(e, e_hat, o, p_hat)
    return np.mean([np.sum(oo * _sub(hh, _clicked(ee, oo), mag) ** 2 / pp) / oo.size
                    for ee, hh, oo, pp in zip(e, e_hat, o, p_hat)])


def np_eq8(e, e_hat, o, p_hat, mag=False):
    """Eq. (8): sum o (1 - p_hat) (e_hat - e)^2 / p_hat^2 (per batch)."""
    e, e_hat, o, p_hat = _rows(e, e_hat, o, p_hat)
    return np.mean([np.sum(oo * (1 - pp) * _sub(hh, _clicked(ee, oo), mag) ** 2 / pp**2)
                    for ee, hh, oo, pp in zip(e, e_hat, o, p_hat)])


def np_eq9(e, e_hat, o, p_hat, mag=False):
    """Eq. (9): sum o (o - p_hat)^2 (e_hat - e)^2 / p_hat^3 (per batch)."""
    e, e_hat, o, p_hat = _rows(e, e_hat, o, p_hat)
    return np.mean([np.sum(oo * (oo - pp) ** 2 * _sub(hh, _clicked(ee, oo), mag) ** 2 / pp**3)
                    for ee, hh, oo, pp in zip(e, e_hat, o, p_hat)])


def np_eq10(e, e_hat, o, p_hat, alpha=0.5, mag=False):
    """Eq. (10): alpha eq. (9) + (1 - alpha) eq. (8)."""
    return alpha * np_eq9(e, e_hat, o, p_hat, mag) + (1 - alpha) * np_eq8(e, e_hat, o, p_hat, mag)


def np_eq32(e, e_hat, o, p_hat, mag=False):
    """Eq. (32): sum w^2 (e - e_hat + E_hat - L_BADR)^2 / (sum w)^2, w = o / p_hat,
    E_hat = sum e_hat / sum w (per batch)."""
    e, e_hat, o, p_hat = _rows(e, e_hat, o, p_hat)
    out = []
    for ee, hh, oo, pp in zip(e, e_hat, o, p_hat):
        w = oo / pp
        big_e = np.sum(_a(hh, mag)) / np.sum(w)
        loss = _np_badr_batch(ee, hh, oo, pp, mag)
        if mag:
            resid = np.abs(_clicked(ee, oo)) + np.abs(hh) + big_e + loss
        else:
            resid = _clicked(ee, oo) - hh + big_e - loss
        out.append(np.sum(w**2 * resid**2) / np.sum(w) ** 2)
    return np.mean(out)


def np_tdr_cl(e, e_hat, o, p_hat, mag=False):
    """TDR-CL's (C1): (1/|D|) sum o (e - e_hat - eps h)^2 / p_hat, h = 1/p_hat - 1, eps the OLS
    slope of e - e_hat on h over the clicked pairs of the batch (0 if sum h^2 = 0)."""
    e, e_hat, o, p_hat = _rows(e, e_hat, o, p_hat)
    out = []
    for ee, hh, oo, pp in zip(e, e_hat, o, p_hat):
        c = oo == 1
        d = _sub(ee[c], hh[c], mag)
        h = 1 / pp[c] - 1
        den = float(np.dot(h, h))
        eps = float(np.dot(h, d)) / den if den > 0 else 0.0
        resid = np.abs(d) + abs(eps) * h if mag else d - eps * h
        out.append(np.sum(resid**2 / pp[c]) / oo.size)
    return np.mean(out)


def np_stabledr(e, e_hat, o, p_hat, mag=False):
    """StableDR's SDR-est (tests/test_stabledr.py): (1/K) sum_k [mean_k e_hat + sum_k o (e - e_hat) / p_hat /
    sum_k o / p_hat]."""
    e, e_hat, o, p_hat = _rows(e, e_hat, o, p_hat)
    return np.mean([np.mean(_a(hh, mag)) + np.sum(oo * _sub(_clicked(ee, oo), hh, mag) / pp) / np.sum(oo / pp)
                    for ee, hh, oo, pp in zip(e, e_hat, o, p_hat)])


REFERENCE_ESTIMATORS = {"naive": np_naive, "ips": np_ips, "snips": np_snips, "eib": np_eib, "dr": np_dr, "badr": np_badr,
                        "stabledr": np_stabledr}
# badr and badr_paper are one quantity, eq. (32), trained in two ways (tests/test_joint.py checks both).
REFERENCE_IMPUTATION = {"dr": np_eq6, "mrdr": np_eq8, "dr_bias": np_eq9, "dr_mse": np_eq10, "badr": np_eq32,
                        "badr_paper": np_eq32, "tdr_cl": np_tdr_cl}


# Theory: Table 1 (signed E[L] - L_ideal, i.e. minus the printed (p_hat - p) form), eqs. (16), (20), (25)-(26)
def np_ips_bias(e, p, p_hat, mag=False):
    return -np.mean(_sub(p_hat, p, mag) * _a(e, mag) / p_hat)


def np_ips_variance(e, p, p_hat, mag=False):
    return np.sum(p * (1 - p) * e**2 / p_hat**2) / np.size(e) ** 2


def np_dr_bias(e, e_hat, p, p_hat, mag=False):
    return -np.mean(_sub(p_hat, p, mag) * _sub(e, e_hat, mag) / p_hat)


def np_dr_variance(e, e_hat, p, p_hat, mag=False):
    return np.sum(p * (1 - p) * _sub(e, e_hat, mag) ** 2 / p_hat**2) / np.size(e) ** 2


def np_ips_bound(e, p_hat, delta, mag=False):
    return math.sqrt(math.log(2 / delta) / (2 * np.size(e) ** 2) * np.sum((e / p_hat) ** 2))


def np_dr_bound(e, e_hat, p_hat, delta, mag=False):
    return math.sqrt(math.log(2 / delta) / (2 * np.size(e) ** 2) * np.sum((_sub(e, e_hat, mag) / p_hat) ** 2))


def np_badr_bias_paper(e, e_hat, p, p_hat, mag=False):
    """Eq. (16) without the absolute value, signed E[L] - L_ideal:
    (1/|D|) sum_k sum_(k) (sum q delta / sum q - delta)."""
    e, e_hat, p, p_hat = _rows(e, e_hat, p, p_hat)
    total = 0.0
    for ee, hh, pp, qq in zip(e, e_hat, p, p_hat):
        delta, q = _sub(ee, hh, mag), pp / qq
        term = np.sum(_sub(delta, np.sum(delta * q) / np.sum(q), mag))
        total += term if mag else -term  # mag: the size of the summands, for the tolerance
    return total / e.size


def np_badr_bias_corrected(e, e_hat, p, p_hat, mag=False):
    """Eq. (20) for v_bar = (sum e_hat + sum o delta / p_hat) / B, w_bar = sum o / p_hat / B:
    mu_v / mu_w - Cov(v_bar, w_bar) / mu_w^2 + Var(w_bar) mu_v / mu_w^3, minus the batch's ideal loss."""
    e, e_hat, p, p_hat = _rows(e, e_hat, p, p_hat)
    out = []
    for ee, hh, pp, qq in zip(e, e_hat, p, p_hat):
        b = ee.size
        delta = _sub(ee, hh, mag)
        mu_v = (np.sum(_a(hh, mag)) + np.sum(pp * delta / qq)) / b
        mu_w = np.sum(pp / qq) / b
        cov = np.sum(pp * (1 - pp) * delta / qq**2) / b**2
        var = np.sum(pp * (1 - pp) / qq**2) / b**2
        if mag:
            out.append(mu_v / mu_w + cov / mu_w**2 + var * mu_v / mu_w**3 + np.mean(np.abs(ee)))
        else:
            out.append(mu_v / mu_w - cov / mu_w**2 + var * mu_v / mu_w**3 - np.mean(ee))
    return np.mean(out)


def np_badr_variance(e, e_hat, p, p_hat, corrected, mag=False):
    """Eqs. (25)-(26): (1/K^2) sum_k sum p (1-p) h^2 / p_hat^2 / (sum p / p_hat)^2, h of eq. (26);
    corrected: h = delta - (sum e_hat + sum q delta) / sum q."""
    e, e_hat, p, p_hat = _rows(e, e_hat, p, p_hat)
    k = e.shape[0]
    total = 0.0
    for ee, hh, pp, qq in zip(e, e_hat, p, p_hat):
        delta, q = _sub(ee, hh, mag), pp / qq
        centre = (np.sum(_a(hh, mag)) * corrected + np.sum(q * delta)) / np.sum(q)
        h = _sub(delta, centre, mag)
        total += np.sum(pp * (1 - pp) * h**2 / qq**2) / np.sum(q) ** 2
    return total / k**2


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
@st.composite
def batches(draw, *, p_lo=1e-6, nan_unclicked=True, max_b=25):
    """(e, e_hat, o, p_hat, p) as float64 numpy arrays of shape (B,) or (K, B); every batch has a
    click; ``e`` NaN on unclicked pairs (sometimes)."""
    shape = (draw(st.integers(1, max_b)),)
    if draw(st.booleans()):
        shape = (draw(st.integers(2, 4)), shape[0])
    n = int(np.prod(shape))
    o = np.asarray(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=np.float64).reshape(shape)
    o.reshape(-1, shape[-1])[:, draw(st.integers(0, shape[-1] - 1))] = 1.0
    e = draw(_mc.vectors(n, _mc.errors(-3.0, 5.0))).reshape(shape)
    if nan_unclicked and draw(st.booleans()):
        e = np.where(o == 1, e, np.nan)
    e_hat = draw(_mc.vectors(n, _mc.errors(-3.0, 5.0))).reshape(shape)
    p_hat = draw(_mc.vectors(n, _mc.propensity(p_lo))).reshape(shape)
    p = draw(_mc.vectors(n, _mc.propensity(p_lo))).reshape(shape)
    return e, e_hat, o, p_hat, p


def _call(fn, names, arrays, dtype=torch.float64, device="cpu", grad=False):
    e, e_hat, o, p_hat = arrays[:4]
    full = {"e": e, "e_hat": e_hat, "o": o, "p_hat": p_hat}
    kw = {k: torch.tensor(full[k], dtype=dtype, device=device) for k in names}
    if grad:
        for k in ("e", "e_hat"):
            if k in kw:
                kw[k].requires_grad_(True)
    return fn(**kw), kw


def _close(got, ref_fn, *args, rtol=RTOL, **kw) -> bool:
    """``|got - ref| <= rtol (|ref| + magnitude)`` with the transcription ``ref_fn`` evaluated
    plainly and with ``mag=True`` (the floating-point scale of its sums)."""
    want = ref_fn(*args, **kw)
    scale = abs(want) + abs(ref_fn(*args, **kw, mag=True))
    ok = abs(float(got) - want) <= rtol * scale
    assert ok, f"{ref_fn.__name__}: library {float(got)!r} vs equation {want!r} (scale {scale:.3g})"
    return ok


# ----------------------------------------------------------------------------------------------
# 1. Against the transcriptions (float64, rtol 1e-10)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(REFERENCE_ESTIMATORS))
@given(data=batches())
def test_estimator_matches_equation(name, data):
    """Each estimator equals the numpy transcription of its equation (float64, rtol 1e-10), and
    NaN errors on unclicked pairs reach neither the value nor the gradient."""
    fn, names = ESTIMATORS[name].function, ESTIMATORS[name].reads
    value, kw = _call(fn, names, data, grad=True)
    e, e_hat, o, p_hat, _ = data
    _close(value.detach(), REFERENCE_ESTIMATORS[name], *[{"e": e, "e_hat": e_hat, "o": o, "p_hat": p_hat}[k] for k in names])
    leaves = [kw[k] for k in ("e", "e_hat") if k in kw]
    for g in torch.autograd.grad(value, leaves):
        assert bool(torch.isfinite(g).all())


@pytest.mark.parametrize("name", sorted(REFERENCE_IMPUTATION))
@given(data=batches())
def test_imputation_loss_matches_equation(name, data):
    """Each imputation loss equals its equation (eqs. 6, 8, 9, 10 with alpha = 0.5, 32): float64,
    rtol 1e-10, finite gradients in ``e_hat`` with NaN errors on unclicked pairs."""
    fn = IMPUTATION_LOSSES[name].function
    value, kw = _call(fn, ("e", "e_hat", "o", "p_hat"), data, grad=True)
    e, e_hat, o, p_hat, _ = data
    _close(value.detach(), REFERENCE_IMPUTATION[name], e, e_hat, o, p_hat)
    for g in torch.autograd.grad(value, [kw["e"], kw["e_hat"]]):
        assert bool(torch.isfinite(g).all())


@given(data=batches(), alpha=st.floats(0.0, 1.0))
def test_dr_mse_alpha(data, alpha):
    """Eq. (10) for every alpha in [0, 1]."""
    e, e_hat, o, p_hat, _ = data
    value, _ = _call(lambda **kw: dr_mse_imputation_loss(**kw, alpha=alpha), ("e", "e_hat", "o", "p_hat"), data)
    _close(value, np_eq10, e, e_hat, o, p_hat, alpha)


@given(data=batches(nan_unclicked=False), delta=st.floats(1e-6, 0.999))
def test_theory_matches_equations(data, delta):
    """``estimators.theory`` against Table 1 (signed ``E[L] - L_ideal``), eq. (16) (no absolute
    value), eq. (20), eqs. (25)-(26) and their corrected forms; 1-D and (K, B)."""
    e, e_hat, _, p_hat, p = data
    te, th, tp, tq = (torch.tensor(x) for x in (e, e_hat, p, p_hat))
    _close(theory.ips_bias(te, tp, tq), np_ips_bias, e, p, p_hat)
    _close(theory.ips_variance(te, tp, tq), np_ips_variance, e, p, p_hat)
    _close(theory.dr_bias(te, th, tp, tq), np_dr_bias, e, e_hat, p, p_hat)
    _close(theory.dr_variance(te, th, tp, tq), np_dr_variance, e, e_hat, p, p_hat)
    _close(theory.ips_generalization_bound(te, tq, delta), np_ips_bound, e, p_hat, delta)
    _close(theory.dr_generalization_bound(te, th, tq, delta), np_dr_bound, e, e_hat, p_hat, delta)
    _close(theory.badr_bias(te, th, tp, tq, variant="paper"), np_badr_bias_paper, e, e_hat, p, p_hat)
    _close(theory.badr_bias(te, th, tp, tq), np_badr_bias_corrected, e, e_hat, p, p_hat)
    _close(theory.badr_variance(te, th, tp, tq, variant="paper"), np_badr_variance, e, e_hat, p, p_hat, False)
    _close(theory.badr_variance(te, th, tp, tq), np_badr_variance, e, e_hat, p, p_hat, True)


def test_two_d_is_mean_of_batches():
    """The (K, B) input is the mean of the K per-batch values for every estimator and loss."""
    rng = np.random.default_rng(0)
    o = (rng.random((3, 7)) < 0.5).astype(float)
    o[:, 0] = 1
    arrays = (rng.random((3, 7)), rng.random((3, 7)), o, 0.05 + 0.95 * rng.random((3, 7)))
    fns = [(spec.function, spec.reads) for spec in (*ESTIMATORS.values(), *IMPUTATION_LOSSES.values())]
    for fn, names in fns:
        whole = float(_call(fn, names, arrays)[0])
        rows = [float(_call(fn, names, tuple(a[k] for a in arrays))[0]) for k in range(3)]
        assert math.isclose(whole, float(np.mean(rows)), rel_tol=RTOL), fn.__name__


# ----------------------------------------------------------------------------------------------
# 2. Validation errors name the argument
# ----------------------------------------------------------------------------------------------
def _good(b=5, k=None):
    shape = (b,) if k is None else (k, b)
    o = torch.zeros(shape, dtype=torch.float64)
    o[..., 0] = 1
    return {"e": torch.full(shape, 0.5, dtype=torch.float64), "e_hat": torch.full(shape, 0.2, dtype=torch.float64),
            "o": o, "p_hat": torch.full(shape, 0.5, dtype=torch.float64)}


ALL_FUNCTIONS = [pytest.param(s.function, s.reads, id=f"estimator-{name}") for name, s in ESTIMATORS.items()] + [
    pytest.param(s.function, s.reads, id=f"imputation-{name}") for name, s in IMPUTATION_LOSSES.items()]


@pytest.mark.parametrize("fn, names", ALL_FUNCTIONS)
@pytest.mark.parametrize("shape", [(5,), (3, 5)], ids=["1d", "2d"])
def test_validation_errors_name_the_argument(fn, names, shape):
    """Shape mismatch, ``p_hat`` outside (0, 1] (0, negative, > 1, NaN, inf), ``o`` not 0/1
    (2, 0.5, -1, NaN), NaN ``e`` on a clicked pair and non-finite ``e_hat`` raise ``ValueError``
    whose message names the argument."""
    variants = _bad_variants(names, shape, torch.float64, "cpu")
    assert len(variants) >= 5
    for arg, kw in variants:
        with pytest.raises(ValueError, match=f"`{arg}`"):
            fn(**kw)


@pytest.mark.parametrize("fn, names", [pytest.param(snips, ("e", "o", "p_hat"), id="snips"),
                                       pytest.param(badr, ("e", "e_hat", "o", "p_hat"), id="badr"),
                                       pytest.param(badr_imputation_loss, ("e", "e_hat", "o", "p_hat"), id="eq32")])
@pytest.mark.parametrize("k", [None, 3])
def test_no_click_batch_rejected(fn, names, k):
    """Self-normalised functions divide by ``sum o / p_hat``: a batch without clicks raises a
    ``ValueError`` naming ``o.sum()`` (1-D, and one empty batch of a (K, B) input)."""
    g = _good(k=k)
    if k is None:
        g["o"] = torch.zeros_like(g["o"])
    else:
        g["o"][1] = 0
    with pytest.raises(ValueError, match=r"o\.sum\(\)"):
        fn(**{n: g[n] for n in names})


@pytest.mark.parametrize("alpha", [-0.1, 1.1, float("nan")])
def test_dr_mse_rejects_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match="`alpha`"):
        dr_mse_imputation_loss(**_good(), alpha=alpha)


def test_theory_validation():
    """Theory functions reject probabilities outside (0, 1], a mismatched shape, delta outside
    (0, 1), an unknown variant and BADR inputs that are not 1-D or 2-D."""
    e, h, p = torch.ones(4), torch.zeros(4), torch.full((4,), 0.5)
    for bad in (torch.tensor([0.0, 0.5, 0.5, 0.5]), torch.tensor([1.2, 0.5, 0.5, 0.5]),
                torch.tensor([float("nan"), 0.5, 0.5, 0.5])):
        with pytest.raises(ValueError, match="p_hat"):
            theory.dr_bias(e, h, p, bad)
        with pytest.raises(ValueError, match="`p`"):
            theory.ips_variance(e, bad, p)
    with pytest.raises(ValueError):
        theory.ips_bias(e, p, torch.full((5,), 0.5))
    for delta in (0.0, 1.0, -1.0):
        with pytest.raises(ValueError, match="delta"):
            theory.ips_generalization_bound(e, p, delta)
    with pytest.raises(ValueError, match="variant"):
        theory.badr_bias(e, h, p, p, variant="printed")
    with pytest.raises(ValueError, match="variant"):
        theory.badr_variance(e, h, p, p, variant="printed")
    with pytest.raises(ValueError):
        theory.badr_variance(e.reshape(1, 2, 2), h.reshape(1, 2, 2), p.reshape(1, 2, 2), p.reshape(1, 2, 2))


# ----------------------------------------------------------------------------------------------
# 3. Common tests over the registries
# ----------------------------------------------------------------------------------------------
REGISTRY = [pytest.param(s.function, s.reads, REFERENCE_ESTIMATORS.get(name), id=f"estimator-{name}")
            for name, s in ESTIMATORS.items()] + [
    pytest.param(s.function, s.reads, REFERENCE_IMPUTATION.get(name), id=f"imputation-{name}")
    for name, s in IMPUTATION_LOSSES.items()]


def test_every_registered_function_has_a_reference():
    """A newly registered estimator or imputation loss needs a numpy transcription here."""
    assert set(ESTIMATORS) <= set(REFERENCE_ESTIMATORS), set(ESTIMATORS) - set(REFERENCE_ESTIMATORS)
    assert set(IMPUTATION_LOSSES) <= set(REFERENCE_IMPUTATION), set(IMPUTATION_LOSSES) - set(REFERENCE_IMPUTATION)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("fn, names, reference", REGISTRY)
@pytest.mark.parametrize("k", [None, 3], ids=["1d", "2d"])
def test_common_contract(fn, names, reference, dtype, device, k):
    """The contract every registered function obeys (scikit-learn-style common test)."""
    rng = np.random.default_rng(1)
    shape = (9,) if k is None else (k, 9)
    o = (rng.random(shape) < 0.4).astype(np.float64)
    o[..., 0] = 1
    e = 0.5 + 0.5 * rng.random(shape)
    e_hat = 0.4 * rng.random(shape)
    p_hat = 0.2 + 0.8 * rng.random(shape)
    arrays = (e, e_hat, o, p_hat)
    # value: finite, right dtype and device, equal to the float64 transcription
    value, kw = _call(fn, names, arrays, dtype=dtype, device=device, grad=True)
    assert value.dtype == dtype and value.device.type == device and value.dim() == 0
    assert bool(torch.isfinite(value))
    if reference is not None:
        want = reference(*[{"e": e, "e_hat": e_hat, "o": o, "p_hat": p_hat}[n] for n in names])
        tol = RTOL if dtype == torch.float64 else 1e-4
        assert math.isclose(float(value.detach()), want, rel_tol=tol, abs_tol=1e-6 if dtype == torch.float32 else 0.0)
    # gradients finite
    leaves = [kw[n] for n in ("e", "e_hat") if n in kw]
    assert all(bool(torch.isfinite(g).all()) for g in torch.autograd.grad(value, leaves))
    # NaN (and inf) in unclicked errors ignored: same value, finite gradient
    for poison in (float("nan"), float("inf")):
        e_bad = np.where(o == 1, e, poison)
        value_bad, kw_bad = _call(fn, names, (e_bad, e_hat, o, p_hat), dtype=dtype, device=device, grad=True)
        assert float(value_bad.detach()) == float(value.detach())
        grads = torch.autograd.grad(value_bad, [kw_bad[n] for n in ("e", "e_hat") if n in kw_bad])
        assert all(bool(torch.isfinite(g).all()) for g in grads)
    # bool and integer click indicators are accepted
    for o_alt in (torch.tensor(o == 1, device=device), torch.tensor(o, device=device).long()):
        kw_alt = {n: (o_alt if n == "o" else kw[n].detach()) for n in names}
        assert math.isclose(float(fn(**kw_alt)), float(value.detach()), rel_tol=1e-6)
    # bad input rejected, the message naming the argument
    for arg, bad_kw in _bad_variants(names, shape, dtype, device):
        with pytest.raises(ValueError, match=f"`{arg}`"):
            fn(**bad_kw)
    # mixed dtypes rejected
    if dtype == torch.float32 and "p_hat" in names:
        with pytest.raises(ValueError, match="dtype"):
            fn(**{n: (kw[n].detach().double() if n == "p_hat" else kw[n].detach()) for n in names})


def _bad_variants(names, shape, dtype, device):
    """(argument, keyword arguments) for every validation rule, on inputs of ``shape``."""
    def good():
        o = torch.zeros(shape, dtype=dtype, device=device)
        o[..., 0] = 1
        vals = {"e": 0.7, "e_hat": 0.1, "p_hat": 0.5}
        return {n: (o if n == "o" else torch.full(shape, vals[n], dtype=dtype, device=device)) for n in names}

    out = []
    for arg in ("e", "e_hat", "p_hat"):
        if arg in names:
            kw = good()
            kw[arg] = torch.full(shape[:-1] + (shape[-1] + 1,), 0.5, dtype=dtype, device=device)
            out.append((arg, kw))
    if "p_hat" in names:
        for bad in (0.0, -0.1, 1.5, float("nan"), float("inf")):
            kw = good()
            kw["p_hat"][..., 1] = bad
            out.append(("p_hat", kw))
    for bad in (2.0, 0.5, -1.0, float("nan")):
        kw = good()
        kw["o"][..., 2] = bad
        out.append(("o", kw))
    if "e" in names:
        kw = good()
        kw["e"][..., 0] = float("nan")  # o = 1 there
        out.append(("e", kw))
    if "e_hat" in names:
        for bad in (float("nan"), float("inf")):
            kw = good()
            kw["e_hat"][..., 3] = bad
            out.append(("e_hat", kw))
    return out


@pytest.mark.parametrize("fn, names", [
    (theory.ips_bias, ("e", "p", "p_hat")),
    (theory.dr_variance, ("e", "e_hat", "p", "p_hat")),
    (theory.badr_bias, ("e", "e_hat", "p", "p_hat")),
])
def test_theory_rejects_mismatched_or_non_finite_input(fn, names):
    good = {n: torch.full((4,), 0.5, dtype=torch.float64) for n in names}
    last = names[-1]
    with pytest.raises(ValueError, match=f"`{last}` has shape"):
        fn(**{**good, last: good[last][:3]})
    with pytest.raises(ValueError, match="`e` contains NaN"):
        fn(**{**good, "e": torch.tensor([0.5, float("nan"), 0.5, 0.5], dtype=torch.float64)})
