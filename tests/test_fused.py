"""The fused DR-family losses (``estimators._C``, ``csrc/``) against the pure-PyTorch reference.

Tests that need the extension are skipped when it is not built, except under CI (``CI=true``),
which builds it with README's install line and where a missing extension is a failure.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from estimators import JointConfig, JointLearner, _ext, backend, imputation_loss, prediction_loss
from estimators.registry import ESTIMATORS
from estimators.registry import IMPUTATION_LOSSES as IMPUTATION_SPECS
from estimators.training.losses import (
    imputation_loss_and_grads,
    imputation_loss_reference,
    prediction_loss_and_grads,
    prediction_loss_reference,
)

# The registry entries the kernels implement (all of them when the extension is missing, so that the
# tests are collected and the `extension` fixture skips them, or fails them under CI).
PREDICTION_ESTIMATORS = tuple(n for n in ESTIMATORS if n in _ext.PREDICTION_KERNELS) or tuple(ESTIMATORS)
IMPUTATION_LOSSES = tuple(n for n in IMPUTATION_SPECS if n in _ext.IMPUTATION_KERNELS) or tuple(IMPUTATION_SPECS)
IMPUTATION_LOSSES_DR = tuple(k for k in IMPUTATION_LOSSES if IMPUTATION_SPECS[k].dr_family)

HAS_CUDA = _ext.with_cuda() and torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and an extension built with CUDA")
SEEDED_KINDS = [k for k in IMPUTATION_LOSSES if k != "badr"]
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]


@pytest.fixture
def extension():
    if not _ext.built():
        message = (f"estimators._C is not built ({_ext._IMPORT_ERROR}); "
                   "build it with `pip install --no-build-isolation -e .`")
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


needs_extension = pytest.mark.usefixtures("extension")


def make_inputs(B=300, G=5, dtype=torch.float32, extreme=True, seed=0, device="cpu"):
    """Logits ~ N(0, 3^2), a quarter of them at +-40 when `extreme`, and an eighth of the
    propensities at 1e-6 (the rest in [0.05, 1])."""
    g = torch.Generator().manual_seed(seed)
    logits = {name: 3 * torch.randn(n, generator=g, dtype=torch.float64)
              for name, n in (("x_b", B), ("xt_b", B), ("x_u", G * B), ("xt_u", G * B))}
    p_hat_b = 0.05 + 0.95 * torch.rand(B, generator=g, dtype=torch.float64)
    if extreme:
        for t in logits.values():
            idx = torch.randperm(t.numel(), generator=g)[: t.numel() // 4]
            t[idx] = 40 * torch.sign(torch.randn(idx.numel(), generator=g, dtype=torch.float64))
        p_hat_b[: max(1, B // 8)] = 1e-6
    r_b = (torch.rand(B, generator=g) < 0.5).double()
    return {k: v.to(device=device, dtype=dtype) for k, v in {**logits, "r_b": r_b, "p_hat_b": p_hat_b}.items()}


def _prediction(fn, est, d, cross_entropy="logits"):
    return fn(est, d["x_b"], d["r_b"], d["p_hat_b"], d["x_u"], d["xt_b"], d["xt_u"], cross_entropy=cross_entropy)


def _imputation(fn, kind, d, alpha=0.3, cross_entropy="logits", imputed_error="paper"):
    return fn(kind, d["xt_b"], d["x_b"], d["r_b"], d["p_hat_b"], d["xt_u"], d["x_u"], alpha,
              cross_entropy=cross_entropy, imputed_error=imputed_error)


def loss_and_grads(loss_fn, d, wrt):
    """The loss and the gradients of `wrt` (zeros where a logit does not reach the loss)."""
    d = {k: v.detach().clone().requires_grad_(k in wrt) for k, v in d.items()}
    loss = loss_fn(d)
    loss.backward()
    return loss.detach(), [d[k].grad if d[k].grad is not None else torch.zeros_like(d[k]) for k in wrt]


def assert_matches(fused, reference, rtol):
    """Loss to `rtol`; each gradient to `rtol` plus an absolute 0.1 * rtol of its largest entry
    (entries that cancel to ~0 carry the rounding of their larger terms)."""
    (loss_f, grads_f), (loss_r, grads_r) = fused, reference
    torch.testing.assert_close(loss_f, loss_r, rtol=rtol, atol=0.0)
    for g_f, g_r in zip(grads_f, grads_r):
        torch.testing.assert_close(g_f, g_r, rtol=rtol, atol=0.1 * rtol * float(g_r.abs().max()))


# ---- equality with the reference ---------------------------------------------------------

PRECISION = [(torch.float32, 1e-5), (torch.float64, 1e-10)]


CROSS_ENTROPIES = ["logits", "clamped"]


@needs_extension
@pytest.mark.parametrize("cross_entropy", CROSS_ENTROPIES)
@pytest.mark.parametrize("dtype,rtol", PRECISION)
@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("estimator", PREDICTION_ESTIMATORS)
def test_prediction_loss_matches_reference(estimator, extreme, dtype, rtol, cross_entropy):
    d = make_inputs(dtype=dtype, extreme=extreme)
    wrt = ("x_b", "x_u")
    fused = loss_and_grads(lambda t: _prediction(_ext.prediction_loss, estimator, t, cross_entropy), d, wrt)
    reference = loss_and_grads(lambda t: _prediction(prediction_loss_reference, estimator, t, cross_entropy), d, wrt)
    # Both forms have finite input gradients (the clamped one saturates to 0).
    assert torch.isfinite(fused[0]) and all(torch.isfinite(g).all() for g in fused[1])
    assert_matches(fused, reference, rtol)


@needs_extension
@pytest.mark.parametrize("cross_entropy", CROSS_ENTROPIES)
@pytest.mark.parametrize("dtype,rtol", PRECISION)
@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("kind,imputed_error", [(k, "paper") for k in IMPUTATION_LOSSES]
                         + [(k, "published") for k in IMPUTATION_LOSSES_DR])
def test_imputation_loss_matches_reference(kind, imputed_error, extreme, dtype, rtol, cross_entropy):
    """Every imputation loss, and the DR family with imputed_error="published" (e_hat = l(xt, s(x)),
    input and target swapped), in the kernels."""
    d = make_inputs(dtype=dtype, extreme=extreme)
    wrt = ("xt_b", "xt_u")

    def loss(fn, form):
        return lambda t: _imputation(fn, kind, t, cross_entropy=cross_entropy, imputed_error=form)

    fused = loss_and_grads(loss(_ext.imputation_loss, imputed_error), d, wrt)
    reference = loss_and_grads(loss(imputation_loss_reference, imputed_error), d, wrt)
    # Finite in both forms: the clamped form's target gradient is that of its clamped value.
    assert torch.isfinite(fused[0]) and all(torch.isfinite(g).all() for g in fused[1])
    assert_matches(fused, reference, rtol)
    if imputed_error == "paper":
        return
    if extreme:
        # assert_matches's absolute slack is set by the pairs with p_hat = 1e-6 (w^3 = 1e18);
        # the pairs with moderate propensities, saturated logits among them, match on their own.
        moderate = d["p_hat_b"] > 1e-3
        torch.testing.assert_close(fused[1][0][moderate], reference[1][0][moderate], rtol=rtol,
                                   atol=0.1 * rtol * float(reference[1][0][moderate].abs().max()))
    paper = loss_and_grads(loss(_ext.imputation_loss, "paper"), d, wrt)
    assert not torch.isclose(fused[0], paper[0])  # the option reaches the kernel


# ---- gradcheck -----------------------------------------------------------------------------

def _small(device="cpu"):
    """float64, moderate logits and propensities, so that finite differences are accurate."""
    return make_inputs(B=6, G=2, dtype=torch.float64, extreme=False, device=device)


@needs_extension
@pytest.mark.parametrize("cross_entropy", CROSS_ENTROPIES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator", PREDICTION_ESTIMATORS)
def test_prediction_loss_gradcheck(estimator, device, cross_entropy):
    d = _small(device)
    x_b, x_u = d["x_b"].requires_grad_(), d["x_u"].requires_grad_()
    assert torch.autograd.gradcheck(
        lambda xb, xu: _ext.prediction_loss(estimator, xb, d["r_b"], d["p_hat_b"], xu, d["xt_b"], d["xt_u"],
                                              cross_entropy),
        (x_b, x_u))


@needs_extension
@pytest.mark.parametrize("cross_entropy", CROSS_ENTROPIES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, imputed_error", [(k, "paper") for k in SEEDED_KINDS]
                         + [(k, "published") for k in IMPUTATION_LOSSES_DR])
def test_imputation_loss_gradcheck(kind, imputed_error, device, cross_entropy):
    """Every imputation loss (the DR family in both imputed-error forms) but the published BADR one:
    there L and e_hat on B are detached, so its gradient is not the derivative of its value (it is
    checked against the reference above)."""
    d = _small(device)
    xt_b, xt_u = d["xt_b"].requires_grad_(), d["xt_u"].requires_grad_()
    assert torch.autograd.gradcheck(
        lambda tb, tu: _ext.imputation_loss(kind, tb, d["x_b"], d["r_b"], d["p_hat_b"], tu, d["x_u"], 0.3,
                                              cross_entropy, imputed_error),
        (xt_b, xt_u))


# ---- the autograd kernels ----------------------------------------------------------------------

@needs_extension
def test_autograd_kernel_scales_saved_gradients_and_survives_retain_graph():
    """backward scales the saved gradients by grad_output (returned as they are when it is 1),
    a retained graph gives the same gradients again, and inference mode gives the same loss."""
    d = make_inputs(B=50, G=3, extreme=False)
    args = ("badr", d["r_b"], d["p_hat_b"], d["xt_b"], d["xt_u"])

    def loss_of(x_b, x_u):
        est, r_b, p_hat_b, xt_b, xt_u = args
        return _ext.prediction_loss(est, x_b, r_b, p_hat_b, x_u, xt_b, xt_u)

    x_b, x_u = d["x_b"].clone().requires_grad_(), d["x_u"].clone().requires_grad_()
    loss = loss_of(x_b, x_u)
    loss.backward(retain_graph=True)
    once = x_b.grad.clone(), x_u.grad.clone()
    loss.backward(retain_graph=True)
    torch.testing.assert_close(x_b.grad, 2 * once[0])
    torch.testing.assert_close(x_u.grad, 2 * once[1])
    x_b.grad = x_u.grad = None
    (3 * loss).backward()
    torch.testing.assert_close(x_b.grad, 3 * once[0])
    torch.testing.assert_close(x_u.grad, 3 * once[1])
    with torch.inference_mode():
        assert torch.equal(loss_of(d["x_b"], d["x_u"]), loss.detach())


# ---- numerics and determinism ----------------------------------------------------------------

@needs_extension
def test_nan_logits_give_nan_loss():
    d = make_inputs(B=20, extreme=False)
    for name in ("x_b", "xt_b", "x_u", "xt_u"):
        bad = {**d, name: d[name].clone().index_fill_(0, torch.tensor([3]), float("nan"))}
        assert torch.isnan(_prediction(_ext.prediction_loss, "badr", bad)), name
        assert torch.isnan(_imputation(_ext.imputation_loss, "badr", bad)), name


def _badr_losses_and_grads(d):
    return [
        *torch.ops.cvr.prediction_loss_and_grads("badr", d["x_b"], d["r_b"], d["p_hat_b"], d["x_u"], d["xt_b"], d["xt_u"]),
        *torch.ops.cvr.imputation_loss_and_grads("badr", d["xt_b"], d["x_b"], d["r_b"], d["p_hat_b"], d["xt_u"], d["x_u"],
                                                 0.5),
    ]


def _assert_same(expected, got):
    for a, b in zip(expected, got, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


@needs_extension
def test_result_does_not_depend_on_thread_count():
    # B and U both span more chunks than the kernels' grain, so with 2 threads every pass runs on the
    # claim loop's pool; float64, where a sum grouped otherwise changes the last bits (float32 rounds
    # such changes away).  Which thread computes which chunk varies from call to call (a pool thread
    # that starts late computes none, and late ones make the loops run on the caller alone for a
    # while), so the 2-thread calls repeat until a pool thread has computed some, each equal to the
    # 1-thread result.
    d = make_inputs(B=16384, G=8, dtype=torch.float64, extreme=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = _badr_losses_and_grads(d)
        torch.set_num_threads(2)
        before = _ext._C.claim_loop_stats()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            _assert_same(expected, _badr_losses_and_grads(d))
            now = _ext._C.claim_loop_stats()
            if now["helper_chunks"] > before["helper_chunks"]:
                break
            if now["serial_loops"] > before["serial_loops"]:
                time.sleep(0.05)  # backing off: let the machine settle
    finally:
        torch.set_num_threads(threads)
    after = _ext._C.claim_loop_stats()
    assert after["pooled_loops"] > before["pooled_loops"], "the passes did not run on the claim loop's pool"
    assert after["helper_chunks"] > before["helper_chunks"], "no pool thread computed a chunk in 60 s"


@needs_extension
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_runs_the_kernels_on_its_own_pool():
    # The parent's pool threads do not exist in a child; the child starts its own.  (The child
    # compares on one thread: ATen's OpenMP regions hang in a child forked after the parent used them.)
    d = make_inputs(B=16384, G=8, dtype=torch.float64, extreme=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        expected = _badr_losses_and_grads(d)  # the parent's pool is running
        pid = os.fork()
        if pid == 0:  # the child: exit status 0 when its results equal the parent's
            status = 1
            try:
                loops = _ext._C.claim_loop_stats()["pooled_loops"]
                got = _badr_losses_and_grads(d)
                status = 0 if _ext._C.claim_loop_stats()["pooled_loops"] > loops else 2
                torch.set_num_threads(1)
                _assert_same(expected, got)
            finally:
                os._exit(status)
    finally:
        torch.set_num_threads(threads)
    deadline = time.monotonic() + 120
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung")
    assert os.waitstatus_to_exitcode(done[1]) == 0


@needs_extension
def test_operator_rejects_bad_input():
    d = make_inputs(B=8, extreme=False)
    op = torch.ops.cvr.prediction_loss_and_grads
    with pytest.raises(ValueError, match="estimator must be one of naive, ips, snips, dr, badr; got 'snipz'"):
        op("snipz", d["x_b"], d["r_b"], d["p_hat_b"], None, None, None)
    with pytest.raises(RuntimeError, match="`xt_b` is required"):
        op("dr", d["x_b"], d["r_b"], d["p_hat_b"], d["x_u"], None, d["xt_u"])
    with pytest.raises(RuntimeError, match="one length"):
        op("ips", d["x_b"], d["r_b"][:5], d["p_hat_b"], None, None, None)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op("ips", d["x_b"].half(), d["r_b"].half(), d["p_hat_b"].half(), None, None, None)
    with pytest.raises(RuntimeError, match="one dtype"):
        op("ips", d["x_b"], d["r_b"].double(), d["p_hat_b"], None, None, None)
    with pytest.raises(RuntimeError, match="cross_entropy must be one of"):
        op("ips", d["x_b"], d["r_b"], d["p_hat_b"], None, None, None, "softmax")
    with pytest.raises(ValueError, match="kind must be one of"):
        torch.ops.cvr.imputation_loss_and_grads("drr", d["xt_b"], d["x_b"], d["r_b"], d["p_hat_b"], None, None, 0.5)


@needs_extension
@pytest.mark.parametrize("op", ["imputation_loss", "imputation_loss_and_grads"])
def test_operator_imputed_error_argument(op):
    """Trailing, defaulting to "paper" (calls without it are unchanged); a bad value, or
    "published" with a BADR loss, is a ValueError."""
    d = make_inputs(B=8, G=2, extreme=False)
    fn = getattr(torch.ops.cvr, op)
    args = (d["xt_b"], d["x_b"], d["r_b"], d["p_hat_b"], d["xt_u"], d["x_u"], 0.5, "logits")
    default, paper = fn("dr", *args), fn("dr", *args, "paper")
    for a, b in zip(*(((x,) if op == "imputation_loss" else x) for x in (default, paper))):
        assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(ValueError, match="imputed_error must be one of paper, published; got 'swapped'"):
        fn("dr", *args, "swapped")
    for kind in ("badr", "badr_paper"):
        with pytest.raises(ValueError, match="applies to the DR-family losses"):
            fn(kind, *args, "published")


# ---- backend selection -------------------------------------------------------------------------

def _grad_fn_name(loss):
    return loss.grad_fn.name()


def test_backend_follows_cvr_backend(monkeypatch):
    monkeypatch.setenv("CVR_BACKEND", "reference")
    assert backend() == "reference"
    d = make_inputs(B=8, extreme=False)
    x_b = d["x_b"].requires_grad_()
    assert "PredictionLoss" not in _grad_fn_name(prediction_loss("ips", x_b, d["r_b"], d["p_hat_b"]))
    monkeypatch.setenv("CVR_BACKEND", "gpu")
    with pytest.raises(ValueError, match="CVR_BACKEND"):
        backend()
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setenv("CVR_BACKEND", "fused")
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        backend()
    monkeypatch.delenv("CVR_BACKEND")
    assert backend() == "reference"


@needs_extension
def test_public_losses_dispatch_to_fused(monkeypatch):
    monkeypatch.delenv("CVR_BACKEND", raising=False)
    assert backend() == "fused"
    d = make_inputs(B=8, extreme=False)
    x_b, xt_b = d["x_b"].requires_grad_(), d["xt_b"].requires_grad_()
    assert _grad_fn_name(prediction_loss("badr", x_b, d["r_b"], d["p_hat_b"], d["x_u"], xt_b, d["xt_u"])) \
        == "torch::autograd::CppNode<cvr::ops::(anonymous namespace)::PredictionLoss>"
    assert _grad_fn_name(imputation_loss("badr", xt_b, x_b, d["r_b"], d["p_hat_b"], d["xt_u"], d["x_u"])) \
        == "torch::autograd::CppNode<cvr::ops::(anonymous namespace)::ImputationLoss>"
    # The "error" parameterisation, and logits of mixed dtypes, stay on the reference.
    assert "Imputation" not in _grad_fn_name(
        imputation_loss("dr", xt_b, x_b, d["r_b"], d["p_hat_b"], imputation="error"))
    mixed = prediction_loss("dr", x_b, d["r_b"], d["p_hat_b"], d["x_u"].double(), xt_b, d["xt_u"])
    torch.testing.assert_close(
        mixed, prediction_loss_reference("dr", x_b, d["r_b"], d["p_hat_b"], d["x_u"].double(), xt_b, d["xt_u"]))
    # Integer labels and float64 propensities are cast to the logits' dtype.
    torch.testing.assert_close(
        prediction_loss("snips", x_b, d["r_b"].long(), d["p_hat_b"].double()),
        prediction_loss_reference("snips", x_b, d["r_b"], d["p_hat_b"]))


@needs_extension
def test_joint_learning_step_is_the_same_on_both_backends(monkeypatch):
    propensities = 0.05 + 0.95 * torch.rand(7, 9, generator=torch.Generator().manual_seed(1))
    users, items = torch.tensor([0, 3, 5, 6]), torch.tensor([1, 8, 2, 2])
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    results = []
    for choice in ("reference", "fused"):
        monkeypatch.setenv("CVR_BACKEND", choice)
        torch.manual_seed(0)
        learner = JointLearner(propensities, JointConfig(dim=4, G=3), generator=torch.Generator().manual_seed(2))
        results.append((learner.step(users, items, r), learner.step(users, items, r)))
    (ref_1, ref_2), (fused_1, fused_2) = results
    for key in ref_1:
        assert fused_1[key] == pytest.approx(ref_1[key], rel=1e-5)
        assert fused_2[key] == pytest.approx(ref_2[key], rel=1e-5)


# ---- CUDA ----------------------------------------------------------------------------------------

@cuda_only
@pytest.mark.parametrize("cross_entropy", CROSS_ENTROPIES)
@pytest.mark.parametrize("dtype,rtol", PRECISION)
@pytest.mark.parametrize("B", [3000, 70000])  # 70000 * 9 pairs: more than one grid of the reduction
@pytest.mark.parametrize("name", [f"prediction/{e}" for e in PREDICTION_ESTIMATORS]
                         + [f"imputation/{k}" for k in IMPUTATION_LOSSES]
                         + [f"imputation/{k}/published" for k in IMPUTATION_LOSSES_DR])
def test_cuda_matches_cpu_and_is_deterministic(name, B, dtype, rtol, cross_entropy):
    family, which, *form = name.split("/")
    if family == "prediction":
        wrt, fn = ("x_b", "x_u"), lambda t: _prediction(_ext.prediction_loss, which, t, cross_entropy)
    else:
        wrt, fn = ("xt_b", "xt_u"), lambda t: _imputation(_ext.imputation_loss, which, t,
                                                          cross_entropy=cross_entropy,
                                                          imputed_error=form[0] if form else "paper")
    d = make_inputs(B=B, G=8, dtype=dtype)
    cpu = loss_and_grads(fn, d, wrt)
    gpu = loss_and_grads(fn, {k: v.cuda() for k, v in d.items()}, wrt)
    again = loss_and_grads(fn, {k: v.cuda() for k, v in d.items()}, wrt)
    assert_matches((gpu[0].cpu(), [g.cpu() for g in gpu[1]]), cpu, rtol=rtol)
    assert torch.equal(gpu[0], again[0]) and all(torch.equal(a, b) for a, b in zip(gpu[1], again[1]))


@needs_extension
@pytest.mark.parametrize("cross_entropy", CROSS_ENTROPIES)
@pytest.mark.parametrize("name", ["prediction/ips", "prediction/badr", "imputation/dr", "imputation/badr",
                                  "imputation/badr_paper", "imputation/dr/published", "imputation/dr_mse/published"])
def test_loss_and_grads_agree_on_both_backends(name, cross_entropy, monkeypatch):
    """The trainers' entry points: one fused call, or autograd on the reference; None for a
    gradient that is identically zero."""
    family, which, *form = name.split("/")
    imputed_error = form[0] if form else "paper"
    d = make_inputs(B=40, G=3, extreme=False)
    results = []
    for choice in ("fused", "reference"):
        monkeypatch.setenv("CVR_BACKEND", choice)
        if family == "prediction":
            results.append(prediction_loss_and_grads(which, d["x_b"], d["r_b"], d["p_hat_b"], d["x_u"], d["xt_b"],
                                                     d["xt_u"], cross_entropy=cross_entropy))
        else:
            results.append(imputation_loss_and_grads(which, d["xt_b"], d["x_b"], d["r_b"], d["p_hat_b"], d["xt_u"],
                                                     d["x_u"], 0.3, cross_entropy=cross_entropy,
                                                     imputed_error=imputed_error))
    (loss_f, *grads_f), (loss_r, *grads_r) = results
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-5, atol=0.0)
    for g_f, g_r in zip(grads_f, grads_r):
        if g_f is None:  # a gradient the kernels know to be zero; the reference's is (close to) zero
            assert g_r is None or float(g_r.abs().max()) < 1e-6
        else:
            torch.testing.assert_close(g_f, g_r, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="estimator"):
        prediction_loss_and_grads("dr", d["x_b"], d["r_b"], d["p_hat_b"])
    with pytest.raises(ValueError, match="xt_u and x_u"):
        imputation_loss_and_grads("badr", d["xt_b"], d["x_b"], d["r_b"], d["p_hat_b"])
    with pytest.raises(ValueError, match="cross_entropy"):
        prediction_loss_and_grads("ips", d["x_b"], d["r_b"], d["p_hat_b"], cross_entropy="softmax")
    with pytest.raises(ValueError, match="p_hat_b"):
        prediction_loss_and_grads("ips", d["x_b"], d["r_b"], d["p_hat_b"][:5])
    with pytest.raises(ValueError, match="imputed_error"):
        imputation_loss_and_grads("dr", d["xt_b"], d["x_b"], d["r_b"], d["p_hat_b"], imputed_error="swapped")


def test_clamped_cross_entropy_differentiates_its_clamped_value_in_the_target():
    """The target gradient of bce_clamped is -(max(log p, -100) - max(log(1 - p), -100)), finite
    where p rounds to 0 or 1 (torch's own, -logit(p), is infinite there); value and input
    gradient are F.binary_cross_entropy's."""
    from estimators.joint_loss import bce_clamped
    x = torch.tensor([-120.0, -30.0, 0.3, 17.0, 120.0])
    t = torch.full_like(x, 0.3, requires_grad=True)
    x_leaf = x.clone().requires_grad_()
    bce_clamped(x_leaf, t).sum().backward()
    p = torch.sigmoid(x)
    torch.testing.assert_close(t.grad, -(torch.log(p).clamp(min=-100) - torch.log1p(-p).clamp(min=-100)))
    assert torch.isfinite(t.grad).all()
    reference = x.clone().requires_grad_()
    value = torch.nn.functional.binary_cross_entropy(torch.sigmoid(reference), t.detach(), reduction="none")
    value.sum().backward()
    torch.testing.assert_close(bce_clamped(x, t.detach()), value.detach())
    torch.testing.assert_close(x_leaf.grad, reference.grad)
