"""ESMM / ESCM2 losses (ESCM2 paper eqs. 5, 21, 23, 25, 26, 34, 35) against numpy, and the model."""
import numpy as np
import pytest
import torch

from estimators import ESCM2, escm2_loss


def _sig(x):
    return 1 / (1 + np.exp(-x))


def _bce(p, t):
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


@pytest.fixture
def batch():
    rng = np.random.default_rng(3)
    n = 200
    o = rng.integers(0, 2, n).astype(float)
    r = np.where(o == 1, rng.integers(0, 2, n), np.nan)
    return dict(a=rng.normal(size=n), b=rng.normal(size=n), o=o, r=r, d=rng.uniform(0.1, 2, n))


def _numpy(reg, a, b, o, r, d, gamma=0.05, lc=0.1, lg=1.0):
    r0 = np.nan_to_num(r)
    ctr = _bce(_sig(a), o).mean()
    ctcvr = _bce(_sig(a) * _sig(b), o * r0).mean()
    w = o / np.clip(_sig(a), gamma, 1)
    delta = _bce(_sig(b), r0)
    cvr = {None: 0.0, "ips": (w * delta).mean(),
           "dr": (d + w * (delta - d)).mean() + (w * (delta - d) ** 2).mean()}[reg]
    return ctr + lc * cvr + lg * ctcvr


@pytest.mark.parametrize("reg", [None, "ips", "dr"])
def test_escm2_loss_matches_numpy(reg, batch):
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in batch.items()}
    out = escm2_loss(t["a"], t["b"], t["o"], t["r"], regulariser=reg, delta_hat=t["d"])
    np.testing.assert_allclose(float(out["loss"]), _numpy(reg, **batch), rtol=1e-10)


def test_nan_labels_and_ctr_weights_stay_out_of_gradients(batch):
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=k in "abd") for k, v in batch.items()}
    out = escm2_loss(t["a"], t["b"], t["o"], t["r"], regulariser="dr", delta_hat=t["d"])
    out["loss"].backward()
    assert all(torch.isfinite(t[k].grad).all() for k in "abd")
    t["a"].grad = None
    escm2_loss(t["a"], t["b"], t["o"], t["r"], regulariser="ips")["cvr"].backward()
    assert t["a"].grad is None  # the CTR estimate is a detached weight in the regulariser


def test_extreme_logits_are_finite():
    a = torch.tensor([40.0, -40.0, 40.0], requires_grad=True)
    b = torch.tensor([40.0, 40.0, -40.0], requires_grad=True)
    out = escm2_loss(a, b, torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, float("nan"), 0.0]))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_escm2_validation(batch):
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in batch.items()}
    with pytest.raises(ValueError, match="regulariser"):
        escm2_loss(t["a"], t["b"], t["o"], t["r"], regulariser="snips")
    with pytest.raises(ValueError, match="delta_hat"):
        escm2_loss(t["a"], t["b"], t["o"], t["r"], regulariser="dr")
    with pytest.raises(ValueError, match="gamma"):
        escm2_loss(t["a"], t["b"], t["o"], t["r"], gamma=0.0)
    with pytest.raises(ValueError, match="`r`"):  # a NaN label on a clicked pair
        escm2_loss(t["a"], t["b"], t["o"], torch.full_like(t["r"], float("nan")))
    with pytest.raises(ValueError, match="`r`"):
        escm2_loss(t["a"], t["b"], t["o"], torch.where(t["o"] == 1, 2.0, 0.0).double())


def test_escm2_model_trains():
    torch.manual_seed(0)
    model = ESCM2(20, 30, dim=4, hidden=8)
    users, items = torch.randint(20, (256,)), torch.randint(30, (256,))
    o = torch.bernoulli(torch.full((256,), 0.3))
    r = torch.where(o == 1, (users % 2).float(), torch.nan)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(100):
        ctr, cvr, d = model(users, items)
        loss = escm2_loss(ctr, cvr, o, r, regulariser="dr", delta_hat=d)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
