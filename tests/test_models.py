"""MF and the logistic-regression propensity model."""
import pytest
import torch

from estimators import MF, PropensityModel, fit_propensity


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
        perm = torch.randperm(clicks.numel(), generator=generator)
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


def test_fit_propensity_follows_the_plain_trajectory():
    clicks = (torch.rand(6 * 8, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    models, epochs = [], []
    for fit in (_plain_fit, fit_propensity):
        torch.manual_seed(0)
        model = PropensityModel(6, 8, 3)
        epochs.append(fit(model, clicks, lr=0.05, weight_decay=1e-4, batch_size=10, max_epochs=30,
                          generator=torch.Generator().manual_seed(1)))
        models.append(model)
    assert epochs[0] == epochs[1]
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
