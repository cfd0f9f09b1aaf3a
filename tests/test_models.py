"""MF and the logistic-regression propensity model."""
import functools

import pytest
import torch

from estimators import MF, PropensityModel, fit_propensity
from estimators import _ext
from estimators._ext import randperm
from estimators.training.early_stopping import EarlyStopping

needs_step = pytest.mark.skipif(not (_ext.propensity_step_ is not None and _ext.backend() == "fused"),
                                reason="cvr::propensity_step_ is not built (or CVR_BACKEND=reference)")


def test_mf_logits_are_dot_products():
    torch.manual_seed(0)
    mf = MF(5, 6, 3)
    u, i = torch.tensor([0, 4, 2]), torch.tensor([5, 0, 2])
    expected = (mf.user.weight[u] * mf.item.weight[i]).sum(-1)
    torch.testing.assert_close(mf(u, i), expected)
    torch.testing.assert_close(mf.predict(u, i), torch.sigmoid(expected))
    with pytest.raises(ValueError, match="positive"):
        MF(0, 6, 3)


def test_propensity_model_is_lr_on_concatenated_embeddings():
    """The additive form a_u + b_i equals w^T [P_u; Q_i] + c."""
    torch.manual_seed(0)
    model = PropensityModel(7, 9, 4)
    u, i = torch.arange(7).repeat_interleave(9), torch.arange(9).repeat(7)
    concat = torch.cat([model.user.weight[u], model.item.weight[i]], dim=1)
    torch.testing.assert_close(model(u, i), model.linear(concat).squeeze(-1))
    p = model.propensities(gamma=0.3)
    assert p.shape == (7, 9) and float(p.min()) >= 0.3
    torch.testing.assert_close(p.reshape(-1), torch.sigmoid(model(u, i)).clamp(0.3, 1))


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_fit_propensity_recovers_additive_click_rates(loss):
    """Clicks drawn from an additive user + item logit: the fit ranks pairs by true propensity."""
    gen = torch.Generator().manual_seed(1)
    n_users, n_items = 60, 80
    true_logit = torch.randn(n_users, 1, generator=gen) + torch.randn(1, n_items, generator=gen) - 2
    clicks = torch.bernoulli(torch.sigmoid(true_logit), generator=gen).reshape(-1)
    torch.manual_seed(1)
    model = PropensityModel(n_users, n_items, 4)
    epochs = fit_propensity(model, clicks, lr=0.05, weight_decay=0.0, batch_size=512, max_epochs=60, loss=loss,
                            generator=gen)
    assert 1 <= epochs <= 60
    fitted = torch.logit(model.propensities(gamma=1e-6)).reshape(-1)
    corr = torch.corrcoef(torch.stack([fitted, true_logit.reshape(-1)]))[0, 1]
    assert corr > 0.8


def test_early_stopping_counts_stalls_without_reset():
    # The published rule: the count of epochs whose loss fell by less than tol (relative) is
    # never reset by a later improvement; stop at the patience-th.
    stop = EarlyStopping(tol=0.1, patience=2)
    decisions = [stop.should_stop(loss) for loss in (10.0, 9.5, 5.0, 4.9, 1.0)]
    assert decisions == [False, False, False, True, True]
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)


def test_fit_propensity_validation():
    model = PropensityModel(3, 4, 2)
    with pytest.raises(ValueError, match="loss"):
        fit_propensity(model, torch.zeros(12), lr=0.1, weight_decay=0.0, batch_size=4, loss="hinge")
    with pytest.raises(ValueError, match="clicks"):
        fit_propensity(model, torch.zeros(11), lr=0.1, weight_decay=0.0, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        fit_propensity(model, torch.zeros(12), lr=0.1, weight_decay=0.0, batch_size=0)
    with pytest.raises(ValueError, match="gamma"):
        model.propensities(gamma=0.0)


def _plain_fit(model, clicks, *, lr, weight_decay, batch_size, max_epochs, generator):
    """The published propensity fit written the plain way: autograd on ``w^T [P_u; Q_i] + c`` and
    ``torch.optim.Adam``, squared error on the probabilities, the same stopping rule."""
    n_items = model.item.num_embeddings
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    last, stalls = None, 0
    for epoch in range(1, max_epochs + 1):
        perm = randperm(clicks.numel(), generator)
        total = 0.0
        for start in range(0, clicks.numel() - batch_size + 1, batch_size):
            idx = perm[start:start + batch_size]
            concat = torch.cat([model.user(idx // n_items), model.item(idx % n_items)], dim=1)
            loss = ((torch.sigmoid(model.linear(concat).squeeze(-1)) - clicks[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
        if last is not None and (last - total) / (last + 1e-12) < 1e-4:
            stalls += 1
            if stalls >= 7:
                return epoch
        last = total
    return max_epochs


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_step)])
def test_fit_propensity_follows_the_plain_trajectory(fused):
    clicks = (torch.rand(6 * 8, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    models, epochs = [], []
    for fit in (_plain_fit, functools.partial(fit_propensity, fused=fused)):
        torch.manual_seed(0)
        model = PropensityModel(6, 8, 3)
        epochs.append(fit(model, clicks, lr=0.05, weight_decay=1e-4, batch_size=10, max_epochs=30,
                          generator=torch.Generator().manual_seed(1)))
        models.append(model)
    assert epochs[0] == epochs[1]
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_step
@pytest.mark.parametrize("loss", ["mse", "bce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_propensity_fit_equals_the_reference(loss, dtype):
    """One cvr::propensity_step_ per batch equals the ATen steps, on tables larger than a parallel
    chunk (several row chunks, a partial last one) and with a batch of several pair chunks."""
    n_users, n_items = 700, 33
    gen = torch.Generator().manual_seed(2)
    true_logit = torch.randn(n_users, 1, generator=gen) + torch.randn(1, n_items, generator=gen) - 1.5
    clicks = torch.bernoulli(torch.sigmoid(true_logit), generator=gen).reshape(-1)
    models, epochs = [], []
    for fused in (False, True):
        torch.manual_seed(3)
        model = PropensityModel(n_users, n_items, 5).to(dtype)
        epochs.append(fit_propensity(model, clicks, lr=0.02, weight_decay=1e-3, batch_size=9000, max_epochs=4,
                                     loss=loss, generator=torch.Generator().manual_seed(4), fused=fused))
        models.append(model)
    assert epochs[0] == epochs[1] == 4
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_step
def test_propensity_step_rejects_bad_pairs():
    model = PropensityModel(3, 4, 2)
    tables = [p.detach() for p in model.parameters()]
    states = [torch.zeros_like(t) for t in tables]
    a, b = (t.detach().contiguous() for t in model.user_item_logits())
    clicks = torch.zeros(2, dtype=torch.uint8)  # the bitset of 12 pairs
    with pytest.raises(ValueError, match="pairs"):
        torch.ops.cvr.propensity_step_(*tables, states, states, a, b, torch.tensor([0, 12]), clicks, 1, 0.1, 0.0,
                                       "mse")
    with pytest.raises(ValueError, match="clicks"):
        torch.ops.cvr.propensity_step_(*tables, states, states, a, b, torch.tensor([0, 11]), clicks[:1], 1, 0.1,
                                       0.0, "mse")
    with pytest.raises(ValueError, match="loss"):
        torch.ops.cvr.propensity_step_(*tables, states, states, a, b, torch.tensor([0, 11]), clicks, 1, 0.1, 0.0,
                                       "hinge")


def test_randperm_rejects_bad_input():
    with pytest.raises(ValueError, match="`n`"):
        randperm(-1)
    if _ext.propensity_step_ is not None:
        with pytest.raises(ValueError, match="`out`"):
            torch.ops.cvr.randperm_(torch.empty(4, dtype=torch.int32), 0)


def test_fit_propensity_rejects_non_binary_clicks():
    with pytest.raises(ValueError, match="0/1"):
        fit_propensity(PropensityModel(3, 4, 2), torch.full((12,), 0.5), lr=0.1, weight_decay=0.0, batch_size=4)


@pytest.mark.parametrize("n", [0, 1, 7, 3 * 2**15 + 5])
def test_randperm_is_a_permutation_determined_by_the_seed(n):
    perm = randperm(n, torch.Generator().manual_seed(0))
    assert perm.dtype == torch.int64
    assert torch.equal(perm.sort().values, torch.arange(n))
    assert torch.equal(perm, randperm(n, torch.Generator().manual_seed(0)))
    if n > 7:
        assert not torch.equal(perm, randperm(n, torch.Generator().manual_seed(1)))


def test_randperm_mixes_across_buckets():
    """Where an element lands is uniform: over 16 draws of a permutation of 2^17 elements (four
    buckets of the compiled shuffle), the element quarter x position quarter table is flat."""
    n, draws = 2**17, 16
    gen = torch.Generator().manual_seed(5)
    counts = torch.zeros(4, 4)
    quarter = torch.arange(n) * 4 // n
    for _ in range(draws):
        perm = randperm(n, gen)  # perm[position] = element
        counts.index_put_((quarter[perm], quarter), torch.ones(n), accumulate=True)
    expected = n * draws / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 40.0  # 9 degrees of freedom: P(chi2 > 40) < 1e-5


@needs_step
def test_propensity_fit_and_randperm_do_not_depend_on_the_thread_count():
    """Fixed chunks, in-order partial sums and per-bucket random streams: bitwise the same fit
    and permutation with one thread or two."""
    clicks = (torch.rand(900 * 40, generator=torch.Generator().manual_seed(6)) < 0.1).float()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(7)
            model = PropensityModel(900, 40, 6)
            fit_propensity(model, clicks, lr=0.01, weight_decay=1e-4, batch_size=20000, max_epochs=2,
                           generator=torch.Generator().manual_seed(8), fused=True)
            results.append([p.detach().clone() for p in model.parameters()]
                           + [randperm(3 * 2**15, torch.Generator().manual_seed(9))])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_fused_adam_is_torch_adam_on_the_fused_kernel():
    """The module-path trainers' optimiser (estimators.training.optim.fused_adam): Adam with the given
    lr and weight decay, over tensors or parameter groups, fused where torch has the kernel."""
    from estimators.training.optim import fused_adam

    torch.manual_seed(0)
    start = [torch.randn(50, 8), torch.randn(7)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(20)]

    def trajectory(make):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = make(params)
        for g in grads:
            for p, gp in zip(params, g):
                p.grad = gp.clone()
            opt.step()
        return opt, params

    ref_opt, ref = trajectory(lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.3))
    opt, ours = trajectory(lambda ps: fused_adam(ps, lr=0.05, weight_decay=0.3))
    assert opt.defaults["fused"] is True and not ref_opt.defaults["fused"]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    groups, _ = trajectory(lambda ps: fused_adam([{"params": ps[:1], "weight_decay": 0.3}, {"params": ps[1:]}],
                                                 lr=0.05))
    assert groups.param_groups[0]["weight_decay"] == 0.3 and groups.param_groups[1]["weight_decay"] == 0.0
    assert not fused_adam([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64).to("meta"))], lr=0.1).defaults["fused"]
