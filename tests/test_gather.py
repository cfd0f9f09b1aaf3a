"""The gather-dot operator (``cvr::gather_dot``, ``csrc/gather_dot.*``) and the Adam update
(``cvr::adam_``) against their pure-PyTorch definitions.

Tests of the compiled operators are skipped when the extension is not built, except under CI
(``CI=true``), where a missing extension is a failure.
"""
from __future__ import annotations

import os

import pytest
import torch

from estimators import _ext
from estimators.training import gather
from estimators.training import optim as _adam
from estimators.training.gather import gather_dot, gather_dot_grad, gather_dot_reference


@pytest.fixture
def operator():
    if not _ext.gather_dot is not None:
        message = "estimators._C is not built with cvr::gather_dot; build it with `python setup.py build_ext --inplace`"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


needs_operator = pytest.mark.usefixtures("operator")


def _tables(n_rows=30, n_cols=20, dim=16, n=500, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(n_rows, dim, generator=g, dtype=dtype)
    Q = torch.randn(n_cols, dim, generator=g, dtype=dtype)
    rows, cols = torch.randint(n_rows, (n,), generator=g), torch.randint(n_cols, (n,), generator=g)
    return P, Q, rows, cols


@needs_operator
@pytest.mark.parametrize("dim", [1, 7, 16, 64])
def test_gradcheck_float64(dim):
    P, Q, rows, cols = _tables(n_rows=6, n_cols=5, dim=dim, n=40, dtype=torch.float64)
    P.requires_grad_(), Q.requires_grad_()
    assert torch.autograd.gradcheck(lambda p, q: gather_dot(p, q, rows, cols), (P, Q))


@needs_operator
@pytest.mark.parametrize("n, dim", [(500, 16), (40000, 64)])  # inline and parallel sizes
def test_equals_reference_in_float32(n, dim):
    P, Q, rows, cols = _tables(n_rows=300, n_cols=200, dim=dim, n=n)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(1))
    outs = []
    for fn in (gather_dot, gather_dot_reference):
        p, q = P.clone().requires_grad_(), Q.clone().requires_grad_()
        x = fn(p, q, rows, cols)
        x.backward(grad)
        outs.append((x.detach(), p.grad, q.grad))
    # Each gradient row sums ~n / 200 products of size ~1 in another order than index_add_:
    # float32 rounding of sums of magnitude up to ~50.
    close = dict(rtol=1e-5, atol=1e-3)
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, **close)
    dP, dQ = gather_dot_grad(grad, P, Q, rows, cols)
    torch.testing.assert_close(dP, outs[1][1], **close)
    torch.testing.assert_close(dQ, outs[1][2], **close)


@needs_operator
def test_deterministic_for_1_and_2_threads():
    P, Q, rows, cols = _tables(n_rows=300, n_cols=200, dim=64, n=40000)
    grad = torch.randn(40000, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            results.append((gather_dot(P, Q, rows, cols), *gather_dot_grad(grad, P, Q, rows, cols)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("mutate, match", [
    (lambda P, Q, r, c: (P, Q, r.clone().fill_(30), c), "rows"),
    (lambda P, Q, r, c: (P, Q, r, c.clone().fill_(-1)), "cols"),
    (lambda P, Q, r, c: (P, Q[:, :3], r, c), "embedding dimension"),
    (lambda P, Q, r, c: (P, Q, r, c[:-1]), "one length"),
    (lambda P, Q, r, c: (P[0], Q, r, c), "2-D"),
    (lambda P, Q, r, c: (P, Q.double(), r, c), "dtype"),
    (lambda P, Q, r, c: (P.int(), Q.int(), r, c), "float32 or float64"),
    (lambda P, Q, r, c: (P, Q, r.int(), c), "int64"),
])
def test_bad_input_raises_value_error(backend, mutate, match, monkeypatch):
    if backend == "fused" and not _ext.gather_dot is not None:
        pytest.skip("extension not built")
    monkeypatch.setenv("CVR_BACKEND", backend)
    with pytest.raises(ValueError, match=match):
        gather_dot(*mutate(*_tables()))


def test_reference_backend_is_the_definition(monkeypatch):
    monkeypatch.setenv("CVR_BACKEND", "reference")
    assert not gather.use_operator(torch.zeros(1, 1))
    P, Q, rows, cols = _tables()
    torch.testing.assert_close(gather_dot(P, Q, rows, cols), (P[rows] * Q[cols]).sum(-1), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("n", [4640, 1001])  # a Coat table; a length with a scalar tail
def test_adam_equals_torch_adam_bitwise(backend, n, monkeypatch):
    if backend == "fused" and not _ext.adam_ is not None:
        pytest.skip("extension not built")
    monkeypatch.setenv("CVR_BACKEND", backend)
    g = torch.Generator().manual_seed(0)
    p = torch.randn(n, generator=g)
    ours, theirs = p.clone(), p.clone().requires_grad_()
    opt = _adam.Adam([ours], lr=1e-2, weight_decay=1e-3)
    torch_opt = torch.optim.Adam([theirs], lr=1e-2, weight_decay=1e-3, fused=True)
    for _ in range(5):
        grad = torch.randn(n, generator=g)
        opt.step([grad])
        theirs.grad = grad.clone()
        torch_opt.step()
    assert torch.equal(ours, theirs.detach())
    with pytest.raises(ValueError, match="grads"):
        opt.step([])


@needs_operator
@pytest.mark.skipif(not (_ext.gather_dot is not None and torch.cuda.is_available() and _ext.with_cuda()),
                    reason="needs a GPU and an extension built with CUDA")
@pytest.mark.parametrize("dtype, close", [(torch.float64, dict(rtol=1e-10, atol=1e-10)),
                                          (torch.float32, dict(rtol=1e-5, atol=1e-3))])
def test_cuda_equals_cpu(dtype, close):
    """The CUDA kernel (atomic adds in its backward) against the CPU operator."""
    P, Q, rows, cols = _tables(n_rows=300, n_cols=200, dim=64, n=40000, dtype=dtype)
    grad = torch.randn(rows.numel(), generator=torch.Generator().manual_seed(1), dtype=dtype)
    outs = []
    for device in ("cpu", "cuda"):
        p, q = P.detach().to(device).requires_grad_(), Q.detach().to(device).requires_grad_()
        x = gather_dot(p, q, rows.to(device), cols.to(device))
        x.backward(grad.to(device))
        outs.append([t.detach().cpu() for t in (x, p.grad, q.grad)])
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, **close)
