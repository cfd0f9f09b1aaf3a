"""Monte Carlo machinery and input strategies shared by the theorem tests (``test_theorems_*.py``).

The model of both papers' statistical claims: the errors ``e``, imputed errors ``e_hat`` and the
propensities ``p`` (true) and ``p_hat`` (learned) are fixed; the only randomness is the click
indicator ``o_ui ~ Bernoulli(p_ui)``, independent across pairs.  Everything here is float64.

Monte Carlo design
------------------
* :func:`draw` returns ``n`` independent click matrices, drawn at once as an ``(n, *shape)``
  tensor from a seeded generator (the seed is part of the Hypothesis example, so a failure is
  reproducible from the printed example alone).
* Rare pairs.  With ``p = 1e-6`` a plain sample of 10^4 draws never sees the click whose weight
  ``1 / p_hat = 10^6`` carries the pair's whole contribution to the mean, and the sample standard
  deviation misses it too: plain MC plus a CLT bound would raise a false alarm.  The same holds
  for a rare non-click (``p = 1 - 1e-6``).  :func:`draw` therefore samples pairs with
  ``p < 0.05`` from ``Bernoulli(f)`` and pairs with ``0.95 < p < 1`` from ``Bernoulli(1 - f)``
  instead, ``f = min(0.05, 1/m)`` for ``m`` such pairs, and returns the likelihood ratio
  ``prod (p/q)^o ((1-p)/(1-q))^(1-o)`` of each draw; every expectation below is the
  importance-sampling identity ``E_p[f] = E_q[ratio * f]``, unbiased, with ``E_q[ratio^2] <= e``.
* Self-normalised estimators (SNIPS, BADR, eq. 32) are undefined on a batch without clicks
  (they raise; callers skip such batches), so their expectations are conditional on every
  batch having a click: ``E_p[f | valid] = E_q[ratio * f * 1{valid}] / P_p(valid)`` with
  ``P_p(valid) = prod_k (1 - prod_{j in k} (1 - p_j))`` computed exactly.
* :func:`per_draw` evaluates the estimator under test on every draw in one vectorised call: it
  stacks the draws as the ``(rows, B)`` 2-D input (whose value is the mean of the per-row
  values, by the estimators' contract) and recovers each row's value with Euler's theorem for
  homogeneous functions: every estimator of the papers is homogeneous of degree 1 in
  ``(e, e_hat)`` (eq. 32 of degree 2), so ``value_row = sum_j (e_j dL/de_j + e_hat_j
  dL/de_hat_j) * rows / degree``.  Two rows are recomputed with a direct 1-D call and the mean
  is compared with the 2-D value, so a function that is not homogeneous is reported instead of
  being mis-evaluated.

Tolerances (derived, not tuned)
-------------------------------
* Mean: by the CLT, ``(mean - mu) / SE`` is approximately standard normal with
  ``SE = sd(ratio * f) / sqrt(n)``; a comparison passes when ``|mean - mu| <= z * SE`` with
  ``z = z_{1 - alpha/2}``.
* Variance: batch means.  The draws are split into 50 groups; each gives an exactly unbiased
  (importance-weighted) variance estimate; the value is their mean and the SE their standard
  deviation over ``sqrt(50)``, compared with Student's ``t_49`` quantile at the same rate (5.59
  instead of 4.89).  The delta-method SE ``sqrt((mu_4 - sigma^4) / n)`` was used first and
  rejected: it needs an estimate of ``mu_4 - sigma^4``, which is unreliable exactly when that is
  near 0 (a two-point distribution near ``p = 1/2``, e.g. a batch of one pair), where a long run
  found it 6 times too small.
* False-alarm rate ``alpha = 1e-6`` per comparison (``z = 4.89``).  A CI run makes about a
  thousand comparisons (a rate test of :func:`shrinks` / :func:`bounded` counts as three), so by
  Bonferroni the whole suite raises a false alarm with probability of order 1e-3 for random
  seeds; under the ``ci`` profile (``derandomize=True``) the run is identical every time.
* Floating point: identities that hold exactly are compared with ``rtol = 1e-9`` (float64); the
  same relative allowance is added to statistical comparisons of zero-variance quantities.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from hypothesis import settings
from hypothesis import strategies as st
from scipy import stats
from torch import Tensor

DTYPE = torch.float64
#: Per-comparison two-sided false-alarm rate of every Monte Carlo comparison.
FALSE_ALARM = 1e-6
#: Relative floating-point allowance for quantities that are equal in exact arithmetic.
RTOL = 1e-9
#: Rows x pairs per estimator call: small enough to stay in cache (measured fastest on CPU).
_CHUNK = 1 << 17


@contextlib.contextmanager
def single_thread():
    """Run torch on one intra-op thread, restoring the setting afterwards.  The Monte Carlo
    tensors are a few MB: on a small shared CI machine intra-op threads only add contention
    (measured 3-10x slower with 2 threads on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def z_value(alpha: float = FALSE_ALARM) -> float:
    """Two-sided normal quantile ``z_{1 - alpha/2}``."""
    return float(stats.norm.isf(alpha / 2))


Z = z_value()


def budget(fraction: float) -> int:
    """A share of the loaded Hypothesis profile's example budget (at least 2), for tests whose
    single example is expensive (long Monte Carlo runs over several batch sizes)."""
    return max(2, int(round(settings.default.max_examples * fraction)))


def t(x) -> Tensor:
    """float64 tensor."""
    return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=DTYPE)


# ----------------------------------------------------------------------------------------------
# Drawing clicks
# ----------------------------------------------------------------------------------------------
@dataclass
class Draws:
    """``n`` click matrices ``o`` of shape ``(n, *shape)`` with importance weights."""

    o: Tensor           # (n, *shape) float64 in {0, 1}
    ratio: Tensor       # (n,) likelihood ratio P_p(o) / P_q(o); all ones without tilting
    valid: Tensor       # (n,) bool: every batch (row of the last axis) has a click
    p_valid: float      # exact P_p(valid) (1.0 when clicks are not required)

    @property
    def n(self) -> int:
        return self.o.shape[0]


def p_every_batch_clicked(p: Tensor) -> float:
    """Exact probability that every batch (last axis) of ``p`` has at least one click."""
    p = p.reshape(-1, p.shape[-1])
    log_none = torch.log1p(-p.clamp(max=1.0)).sum(-1)  # log P(no click in batch k); -inf if some p = 1
    return float(torch.exp(torch.log1p(-torch.exp(log_none)).sum()))


def draw(p: Tensor, n: int, seed: int, *, need_click: bool = False, tilt: bool = True,
         floor: float = 0.05) -> Draws:
    """``n`` independent draws of ``o ~ Bernoulli(p)`` (vectorised, seeded).

    With ``tilt``, pairs with ``p < floor`` are drawn from ``Bernoulli(f)`` and pairs with
    ``1 - floor < p < 1`` (a rare non-click) from ``Bernoulli(1 - f)``, ``f = min(floor, 1/m)`` for
    ``m`` such pairs, and ``ratio`` holds the likelihood ratio.
    ``need_click`` marks draws in which some batch has no click as invalid (see module doc).
    """
    with single_thread():
        return _draw(p, n, seed, need_click=need_click, tilt=tilt, floor=floor)


def _draw(p, n, seed, *, need_click, tilt, floor):
    p = p.to(DTYPE)
    gen = torch.Generator().manual_seed(int(seed))
    low = (p < floor) if tilt else torch.zeros_like(p, dtype=torch.bool)
    high = ((1 - p < floor) & (p < 1)) if tilt else torch.zeros_like(p, dtype=torch.bool)
    rare = low | high
    m = int(rare.sum())
    q = p.clone()
    if m:
        f = min(floor, 1.0 / m)
        q = torch.where(low, torch.clamp(p, min=f), q)
        q = torch.where(high, torch.clamp(p, max=1 - f), q)
    u = torch.rand((n, *p.shape), generator=gen, dtype=DTYPE)
    o = (u < q).to(DTYPE)
    if m:
        pr, qr = p[rare], q[rare]
        orare = o[:, rare]
        log_ratio = (orare * torch.log(pr / qr) + (1 - orare) * (torch.log1p(-pr) - torch.log1p(-qr))).sum(-1)
        ratio = torch.exp(log_ratio)
    else:
        ratio = torch.ones(n, dtype=DTYPE)
    if need_click:
        valid = (o.reshape(n, -1, p.shape[-1]).sum(-1) > 0).all(-1)
        p_valid = p_every_batch_clicked(p)
    else:
        valid = torch.ones(n, dtype=torch.bool)
        p_valid = 1.0
    return Draws(o=o, ratio=ratio, valid=valid, p_valid=p_valid)


# ----------------------------------------------------------------------------------------------
# Evaluating an estimator on every draw
# ----------------------------------------------------------------------------------------------
_DIFFERENTIABLE = ("e", "e_hat")


def per_draw(fn: Callable[..., Tensor], inputs: Mapping[str, Tensor], o: Tensor, *,
             degree: int = 1, verify: bool = True) -> Tensor:
    """Value of ``fn(**inputs, o=o_s)`` for each draw ``o_s`` (``o`` of shape ``(n, *shape)``).

    ``fn`` follows the estimators' contract (keyword arguments ``e``, ``e_hat``, ``o``,
    ``p_hat``; 2-D input = mean of the per-row values) and is homogeneous of degree
    ``degree`` in its ``e``/``e_hat`` arguments.  For a ``(K, B)`` batch shape the value of a
    draw is the mean of its K rows (the K-batch estimator of eq. 13).
    """
    with single_thread():
        return _per_draw(fn, inputs, o, degree=degree, verify=verify)


def _per_draw(fn, inputs, o, *, degree, verify):
    n = o.shape[0]
    shape = o.shape[1:]
    b = shape[-1]
    rows = o.reshape(-1, b)
    n_rows = rows.shape[0]
    out = torch.empty(n_rows, dtype=DTYPE)
    step = max(1, _CHUNK // b)
    for start in range(0, n_rows, step):
        stop = min(n_rows, start + step)
        out[start:stop] = _rows_values(fn, inputs, rows[start:stop], start, shape, degree)
    if verify and n_rows:
        for i in sorted({0, n_rows - 1}):
            kw = {k: _row_of(v, shape, i) for k, v in inputs.items()}
            direct = float(fn(**kw, o=rows[i]).detach())
            assert math.isclose(float(out[i]), direct, rel_tol=1e-8, abs_tol=1e-10 * (1 + abs(direct))), (
                f"per-row extraction disagrees with a direct call ({float(out[i])!r} vs {direct!r}): "
                f"the function is not homogeneous of degree {degree} in (e, e_hat)")
    return out.reshape(n, -1).mean(-1)


def _row_of(v: Tensor, shape, i: int) -> Tensor:
    """Row ``i`` of the flattened ``(n * K, B)`` layout for an input of batch shape ``shape``."""
    flat = v.reshape(-1, shape[-1])
    return flat[i % flat.shape[0]]


def _rows_values(fn, inputs, rows: Tensor, start: int, shape, degree: int) -> Tensor:
    r, b = rows.shape
    k = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    idx = (torch.arange(start, start + r) % k)
    kw, leaves = {}, []
    for name, v in inputs.items():
        full = v.reshape(k, b)[idx].clone()
        if name in _DIFFERENTIABLE:
            full.requires_grad_(True)
            leaves.append(full)
        kw[name] = full
    value = fn(**kw, o=rows)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    acc = torch.zeros(r, dtype=DTYPE)
    for leaf, g in zip(leaves, grads):
        if g is not None:
            acc = acc + (leaf.detach() * g).sum(-1)
    per_row = acc * r / degree
    per_row = per_row.detach()
    value = float(value.detach())
    if not math.isclose(float(per_row.mean()), value, rel_tol=1e-8,
                        abs_tol=1e-10 * (1 + float(per_row.abs().mean()))):
        raise AssertionError(f"per-row extraction: mean of rows {float(per_row.mean())!r} != 2-D value "
                             f"{value!r}; the function is not homogeneous of degree {degree} in (e, e_hat)")
    return per_row


# ----------------------------------------------------------------------------------------------
# Moments with standard errors
# ----------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    value: float
    se: float

    def __iter__(self):
        return iter((self.value, self.se))


def _full(values: Tensor, d: Draws) -> Tensor:
    y = torch.zeros(d.n, dtype=DTYPE)
    y[d.valid] = values.to(DTYPE)
    return y


def mc_mean(values: Tensor, d: Draws, *, control: Optional[Tensor] = None, control_mean: float = 0.0) -> Estimate:
    """``E_p[f | valid]`` and its SE from the values on the valid draws.

    ``control`` (on all draws) is a control variate with known ``E_p[control * 1{valid}] =
    control_mean``: the estimate uses ``f - control`` (same expectation up to the known term,
    smaller variance when ``control`` tracks ``f``).
    """
    y = _full(values, d)
    if control is not None:
        y = y - control * d.valid.to(DTYPE)
    wy = d.ratio * y
    mean = float(wy.mean())
    if control is not None:
        mean += control_mean
    se = float(wy.std(correction=1)) / math.sqrt(d.n)
    return Estimate(mean / d.p_valid, se / d.p_valid)


#: Batch-means groups of :func:`mc_var` and the matching t quantile.
GROUPS = 50
T_GROUPS = float(stats.t.isf(FALSE_ALARM / 2, GROUPS - 1))


def mc_var(values: Tensor, d: Draws) -> Estimate:
    """``Var_p(f | valid)`` with a batch-means standard error (see module docstring).

    The draws are split into ``G = 50`` groups of ``m``; in each, with a fixed centre ``c``,
    ``A = mean(ratio (f-c))``, ``M = mean(ratio (f-c)^2)`` and ``s^2`` the sample variance of
    ``ratio (f-c)``, the estimate ``M / P - (A / P)^2 + s^2 / (m P^2)`` is exactly unbiased
    (``E[A^2] = E[A]^2 + Var(ratio (f-c)) / m``).  The value is the mean of the G estimates and
    the SE their standard deviation over ``sqrt(G)``, multiplied by ``t_{G-1} / z`` so that every
    comparison can use ``z`` (Student's t with G - 1 degrees of freedom at the same rate).
    """
    y = _full(values, d)
    v = d.valid.to(DTYPE)
    w = d.ratio
    P = d.p_valid
    c = float((w * y).sum() / max(float((w * v).sum()), 1e-300))  # a constant centre
    g = (y - c) * v
    groups = min(GROUPS, d.n // 2)
    m = d.n // groups
    a = (w * g)[: groups * m].reshape(groups, m)
    b2 = (w * g**2)[: groups * m].reshape(groups, m)
    est = b2.mean(1) / P - (a.mean(1) / P) ** 2 + a.var(1, correction=1) / (m * P**2)
    t_q = float(stats.t.isf(FALSE_ALARM / 2, groups - 1)) if groups != GROUPS else T_GROUPS
    se = float(est.std(correction=1)) / math.sqrt(groups) * t_q / Z
    return Estimate(float(est.mean()), se)


# ----------------------------------------------------------------------------------------------
# Assertions
# ----------------------------------------------------------------------------------------------
def assert_mc_equal(est: Estimate, target: float, what: str, *, alpha: float = FALSE_ALARM,
                    scale: Optional[float] = None) -> None:
    """``|est - target| <= z_{1-alpha/2} SE`` (+ float allowance ``RTOL * scale``)."""
    z = z_value(alpha)
    scale = abs(target) if scale is None else scale
    tol = z * est.se + RTOL * (scale + 1e-300) + 1e-13
    diff = est.value - target
    assert abs(diff) <= tol, (f"{what}: Monte Carlo {est.value:.8g} (SE {est.se:.3g}) vs claimed {target:.8g}; "
                              f"|difference| {abs(diff):.3g} > z*SE = {z:.2f}*{est.se:.3g} (+float allowance) "
                              f"at false-alarm rate {alpha:g}")


def assert_mc_nonzero(est: Estimate, what: str, *, alpha: float = FALSE_ALARM) -> None:
    """``|est| > z SE``: the quantity is significantly different from zero."""
    z = z_value(alpha)
    assert abs(est.value) > z * est.se, (f"{what}: Monte Carlo {est.value:.6g} (SE {est.se:.3g}) is not "
                                         f"distinguishable from 0 at false-alarm rate {alpha:g}")


def shrinks(errors: Sequence[float], ses: Sequence[float], *, factor: float = 0.5) -> tuple[bool, str]:
    """Rate check used for asymptotic claims over batch sizes ``B_1 < ... < B_L``.

    ``errors[i] >= 0`` is a (scaled) discrepancy at ``B_i`` with standard error ``ses[i]``.  The
    claim "the discrepancy vanishes as B grows" is accepted when the discrepancy at the largest B,
    lowered by its MC allowance, is at most ``factor`` times the largest discrepancy seen at the
    smaller batch sizes raised by theirs::

        errors[-1] - z ses[-1]  <=  factor * max_i<L (errors[i] + z ses[i]).

    Only the decay is tested, not its constant.  The default ``factor = 1/2`` over a 16-fold
    range of B asks for a rate of at least ``B^-1/4``: far below the ``B^-1`` that the expansions
    predict (so the unknown next-order constant at small B cannot fail the test), yet a
    discrepancy that does not vanish (rate 0) fails it.
    """
    lhs = errors[-1] - Z * ses[-1]
    rhs = factor * max(e + Z * s for e, s in zip(errors[:-1], ses[:-1]))
    return lhs <= rhs, f"discrepancy at largest B {errors[-1]:.4g} (SE {ses[-1]:.2g}); at smaller B {list(np.round(errors[:-1], 6))}"


def bounded(errors: Sequence[float], ses: Sequence[float], *, factor: float = 2.0) -> tuple[bool, str]:
    """Companion of :func:`shrinks` for claims "the discrepancy is O(B^-r)", tested on the
    discrepancy scaled by ``B^r``: at the largest B it may exceed the largest scaled discrepancy
    at the smaller B at most ``factor``-fold (MC allowances as in :func:`shrinks`).  With the
    tests' levels (each B 4 times the previous), ``factor = 2`` admits a growth like ``B^1/2``
    (room for a scaled discrepancy that approaches its limit from below); a discrepancy one order
    larger than claimed grows 4-fold per level and fails."""
    lhs = errors[-1] - Z * ses[-1]
    rhs = factor * max(e + Z * s for e, s in zip(errors[:-1], ses[:-1]))
    return lhs <= rhs, f"scaled discrepancy at largest B {errors[-1]:.4g} (SE {ses[-1]:.2g}); at smaller B {list(np.round(errors[:-1], 6))}"


# ----------------------------------------------------------------------------------------------
# Hypothesis strategies
# ----------------------------------------------------------------------------------------------
def log_uniform(lo: float, hi: float) -> st.SearchStrategy[float]:
    """Floats spread evenly in log10 between ``lo`` and ``hi``."""
    return st.floats(math.log10(lo), math.log10(hi)).map(lambda x: min(hi, max(lo, 10.0**x)))


def propensity(lo: float = 1e-6, hi: float = 1.0) -> st.SearchStrategy[float]:
    """Propensities in ``[lo, hi]``: log-uniform (reaching ``lo = 1e-6``), uniform, ``hi``, or
    (for ``hi = 1``) within ``1e-6 .. 0.1`` of 1, where a non-click is the rare event."""
    near_one = st.floats(-6.0, -1.0).map(lambda x: 1.0 - 10.0**x)
    parts = [log_uniform(lo, hi), st.floats(max(lo, 0.05), hi), st.just(hi)]
    return st.one_of(*parts, near_one) if hi == 1.0 else st.one_of(*parts)


def errors(lo: float, hi: float) -> st.SearchStrategy[float]:
    """Prediction / imputed errors in ``[lo, hi]``; magnitudes below 1e-12 become 0 (squares of
    ~1e-300 underflow, which tests the float format, not the theorems)."""
    return st.floats(lo, hi).map(lambda x: 0.0 if abs(x) < 1e-12 else x)


seeds = st.integers(0, 2**32 - 1)


@st.composite
def vectors(draw, size: int, elements: st.SearchStrategy[float]) -> np.ndarray:
    return np.asarray(draw(st.lists(elements, min_size=size, max_size=size)), dtype=np.float64)
