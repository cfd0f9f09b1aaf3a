"""The propensity cache of ``reproduce``: a hit gives the very run a fit gives."""
from __future__ import annotations

import pytest

from cvrdata import load_dataset
from reproduce.config import load_config
from reproduce.methods import get_method
from reproduce.train import PropensityCache, run_one


@pytest.fixture(scope="module")
def coat(data_dir):
    return load_dataset("coat", data_dir)


def test_hit_restores_the_run_exactly(coat, tmp_path):
    cfg = load_config("coat")
    method = get_method("dr_jl")
    params = cfg.method_params(method)
    cache = PropensityCache(tmp_path)
    runs = [run_one(coat, cfg, method, params, 2024, max_epochs=2, show_progress=False, propensity_cache=cache)
            for _ in range(2)]
    plain = run_one(coat, cfg, method, params, 2024, max_epochs=2, show_progress=False)
    assert [r["propensity_cached"] for r in runs] == [False, True] and not plain["propensity_cached"]
    assert len(list(tmp_path.glob("*.pt"))) == 1
    for key in ("auc", "ndcg", "recall", "propensity_epochs"):
        assert runs[0][key] == runs[1][key] == plain[key]
    # Another seed or other propensity settings are other entries.
    assert cache.key(coat, cfg, params, 2025) != cache.key(coat, cfg, params, 2024)
    assert cache.key(coat, cfg, {**params, "prop_lr": params["prop_lr"] * 2}, 2024) != \
        cache.key(coat, cfg, params, 2024)


def test_gamma_outside_the_unit_interval_is_a_value_error(coat):
    cfg = load_config("coat")
    method = get_method("ips")
    params = {**cfg.method_params(method), "gamma": 0.0}
    with pytest.raises(ValueError, match="gamma"):
        run_one(coat, cfg, method, params, 2024, max_epochs=1, show_progress=False)
