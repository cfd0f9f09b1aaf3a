"""The propensity model where the users x items matrix cannot be enumerated: the sampled fit's
loss is unbiased for eq. (4)'s and lands near the enumerated fit, a frozen model gives the joint
learner the table's propensities pair by pair (same trajectory, bit for bit), a learner runs
on 10^12 pairs without a table, and bad input is refused by name."""
import math

import pytest
import torch

from estimators.training import (JointConfig, JointLearner, MF, ModelPropensities, PropensityModel, fit_propensity,
                                 fit_propensity_sampled, propensity_table)
from estimators.training.propensity import sampled_pairs


def _additive_clicks(n_users=120, n_items=90, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n_users, generator=gen) - 2.5
    b = torch.randn(n_items, generator=gen)
    truth = torch.sigmoid(a[:, None] + b[None, :])
    return torch.bernoulli(truth, generator=gen), truth


def test_sampled_pairs_estimate_the_sum_over_all_pairs():
    clicks, _ = _additive_clicks(12, 9)
    n_pairs = clicks.numel()
    clicked = torch.nonzero(clicks.reshape(-1)).squeeze(1)
    loss_of = torch.rand(n_pairs, generator=torch.Generator().manual_seed(1))  # l(p, 0) per pair
    loss_one = torch.rand(n_pairs, generator=torch.Generator().manual_seed(2))  # l(p, 1) per pair
    o = clicks.reshape(-1)
    want = float((o * loss_one + (1 - o) * loss_of).sum())
    gen = torch.Generator().manual_seed(3)
    estimates = []
    for _ in range(4000):
        pairs, target, weight = sampled_pairs(clicked, n_pairs, 15, gen)
        per_pair = torch.where(target == 1, loss_one[pairs], loss_of[pairs])
        estimates.append(float((weight * per_pair).sum()))
    est = torch.tensor(estimates, dtype=torch.float64)
    assert abs(float(est.mean()) - want) < 4 * float(est.std()) / math.sqrt(est.numel())
    assert float(est.std()) > 0  # a real estimate, not the sum itself
    pairs, target, weight = sampled_pairs(clicked, n_pairs, 15, gen)
    assert bool((weight[target == 0][o[pairs[target == 0]] == 1] == 0).all())  # a drawn click weighs 0


def test_sampled_fit_lands_near_the_enumerated_fit():
    clicks, truth = _additive_clicks()
    n_users, n_items = clicks.shape
    users, items = torch.nonzero(clicks, as_tuple=True)
    kw = dict(lr=0.05, weight_decay=0.0, loss="bce", max_epochs=60, tol=1e-5, patience=5)
    torch.manual_seed(0)
    full = PropensityModel(n_users, n_items, 4)
    fit_propensity(full, clicks, batch_size=512, generator=torch.Generator().manual_seed(0), **kw)
    torch.manual_seed(0)
    sampled = PropensityModel(n_users, n_items, 4)
    fit_propensity_sampled(sampled, users, items, n_users, n_items, negatives=20, batch_size=512,
                           generator=torch.Generator().manual_seed(0), **kw)
    p_full, p_sampled = propensity_table(full, n_users, n_items), propensity_table(sampled, n_users, n_items)
    err_full = float((p_full - truth).abs().mean())
    gap = float((p_sampled - p_full).abs().mean())
    assert gap < 0.25 * float(truth.mean()), (gap, err_full)
    assert float(torch.corrcoef(torch.stack([p_full.reshape(-1), p_sampled.reshape(-1)]))[0, 1]) > 0.97
    assert float((p_sampled - truth).abs().mean()) < 2 * err_full + 0.01
    # the mean click rate is matched, which a fit that ignored the weights would miss by ~ the sampling ratio
    assert float(p_sampled.mean()) == pytest.approx(float(clicks.mean()), rel=0.15)


def test_model_propensities_equal_the_clipped_table():
    torch.manual_seed(0)
    for model in (PropensityModel(7, 5, 3), MF(7, 5, 3)):
        table = propensity_table(model, 7, 5, 0.3)
        by_pair = ModelPropensities(model, 7, 5, 0.3)
        u, i = torch.meshgrid(torch.arange(7), torch.arange(5), indexing="ij")
        assert torch.equal(by_pair(u.reshape(-1), i.reshape(-1)).reshape(7, 5), table)
        assert torch.equal(by_pair.table(), table)


@pytest.mark.parametrize("estimator, imputation_loss", [("ips", None), ("snips", None), ("dr", "dr"),
                                                         ("badr", "badr"), ("dr", "mrdr")])
def test_learner_on_model_propensities_follows_the_table_trajectory(estimator, imputation_loss):
    torch.manual_seed(0)
    prop = PropensityModel(30, 20, 3)
    with torch.no_grad():
        prop.linear.bias.fill_(-1.0)
    cfg = JointConfig(estimator=estimator, imputation_loss=imputation_loss, dim=4, G=2)
    learners = []
    for source in (propensity_table(prop, 30, 20, 0.05), ModelPropensities(prop, 30, 20, 0.05)):
        torch.manual_seed(1)
        learners.append(JointLearner(source, cfg, generator=torch.Generator().manual_seed(2)))
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        u, i = torch.randint(30, (16,), generator=gen), torch.randint(20, (16,), generator=gen)
        r = torch.bernoulli(torch.full((16,), 0.4), generator=gen)
        out = [learner.step(u, i, r) for learner in learners]
        assert out[0] == out[1]
    for a, b in zip(learners[0].prediction.parameters(), learners[1].prediction.parameters()):
        assert torch.equal(a, b)


def test_a_learner_trains_on_a_trillion_pairs_without_a_table():
    """10^6 x 10^6 pairs: the table would take 4 TB; the fit and the learner hold O(users + items)."""
    n = 1_000_000
    gen = torch.Generator().manual_seed(0)
    users, items = torch.randint(n, (3000,), generator=gen), torch.randint(n, (3000,), generator=gen)
    keep = torch.unique(users * n + items)
    users, items = keep // n, keep % n
    torch.manual_seed(0)
    prop = PropensityModel(n, n, 1)
    epochs = fit_propensity_sampled(prop, users, items, n, n, negatives=4, lr=0.05, weight_decay=0.0,
                                    batch_size=4096, max_epochs=2, generator=gen)
    assert epochs == 2
    by_pair = ModelPropensities(prop, n, n, 0.05)
    learner = JointLearner(by_pair, JointConfig(estimator="badr", imputation_loss="badr", dim=2, G=2), generator=gen)
    assert learner.p_hat is None
    out = learner.step(users[:512], items[:512], torch.bernoulli(torch.full((512,), 0.3), generator=gen))
    assert all(math.isfinite(v) for v in out.values())
    with pytest.raises(ValueError, match="sampling='uniform'"):
        JointLearner(by_pair, JointConfig(estimator="ips", imputation_loss=None, dim=2, sampling="permutation"),
                     generator=gen).sample_pairs(8)


_U, _I = torch.tensor([0, 1, 2]), torch.tensor([1, 0, 2])
_KW = dict(negatives=2, lr=0.1, weight_decay=0.0, batch_size=4)


@pytest.mark.parametrize("call, match", [
    (lambda: fit_propensity_sampled(PropensityModel(3, 3, 2), _U, _I, 3, 3, **{**_KW, "negatives": 0}), "negatives"),
    (lambda: fit_propensity_sampled(PropensityModel(3, 3, 2), _U, _I, 3, 3, **{**_KW, "lr": float("nan")}), "lr"),
    (lambda: fit_propensity_sampled(PropensityModel(3, 3, 2), _U, _I[:2], 3, 3, **_KW), "users"),
    (lambda: fit_propensity_sampled(PropensityModel(3, 3, 2), _U, torch.tensor([1, 0, 3]), 3, 3, **_KW), "outside"),
    (lambda: fit_propensity_sampled(PropensityModel(3, 3, 2), torch.tensor([0, 0]), torch.tensor([1, 1]), 3, 3,
                                    **_KW), "repeat"),
    (lambda: fit_propensity_sampled(PropensityModel(3, 3, 2), _U, _I, 3, 3, **{**_KW, "batch_size": 100}),
     "batch_size"),
    (lambda: fit_propensity_sampled(PropensityModel(3, 3, 2), _U, _I, 3, 3, **{**_KW, "loss": "hinge"}), "loss"),
    (lambda: ModelPropensities(PropensityModel(3, 3, 2), 3, 3, 0.0), "gamma"),
    (lambda: ModelPropensities(PropensityModel(3, 3, 2), 4, 3, 0.1), "users"),
    (lambda: ModelPropensities("model", 3, 3, 0.1), "model"),
    (lambda: JointLearner("table", JointConfig(estimator="ips", imputation_loss=None)), "propensities"),
])
def test_bad_input_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_joint_at_scale_benchmark_reads_the_clicks_and_trains(tmp_path, capsys):
    """``python -m benchmarks.joint_at_scale``: the distinct clicked train pairs of a generated log
    (against the whole arrays), a propensity fit and joint steps without a table, its JSON record."""
    import json

    import numpy as np

    from benchmarks import joint_at_scale
    from simulate import ctcvr
    from simulate.__main__ import main as simulate_main

    assert simulate_main(["ctcvr", "--exposures", "20000", "--out", str(tmp_path / "log")]) == 0
    log = ctcvr.load_ctcvr(tmp_path / "log", split="train", mmap=False)
    old_chunk, joint_at_scale.CHUNK = joint_at_scale.CHUNK, 1000  # several chunks
    try:
        users, items, conv, n_users, n_items, n = joint_at_scale.clicked_pairs(tmp_path / "log")
    finally:
        joint_at_scale.CHUNK = old_chunk
    hit = np.flatnonzero(log.click == 1)
    keys = log.user[hit].astype(np.int64) * n_items + log.item[hit]
    want, first = np.unique(keys, return_index=True)
    np.testing.assert_array_equal(users * n_items + items, want)
    np.testing.assert_array_equal(conv, log.conversion[hit][first])
    assert n == len(log) and (n_users, n_items) == (len(log.user_fields), len(log.item_fields))
    assert joint_at_scale.main(["--log", str(tmp_path / "log"), "--batch-size", "64", "--max-steps", "3",
                                "--dim", "4", "--json", str(tmp_path / "rec.json")]) == 0
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rec["joint_steps"] == 3 and rec["clicked_pairs"] == want.size and rec["all_pairs"] == n_users * n_items
    assert "none is built" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        joint_at_scale.main(["--log", str(tmp_path / "log"), "--method", "esmm"])
    assert "--method 'esmm'" in capsys.readouterr().err


def test_readme_example_runs_as_written():
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    section = (repo / "README.md").read_text().split("### Propensities without a users × items table", 1)[1]
    block = re.search(r"^```python\n(.*?)^```$", section.split("\n### ", 1)[0], flags=re.S | re.M).group(1)
    out = subprocess.run([sys.executable, "-c", block], cwd=repo, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "BADR step without a propensity table: ['imputation_loss', 'monitor', 'prediction_loss']" in out.stdout
