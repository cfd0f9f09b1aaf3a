"""The one registry (``estimators.registry``): what reads it, and a new estimator added by one entry.

A toy estimator, registered here and nowhere else (clipped IPS: the inverse propensities capped
at 4), trains through ``python -m reproduce table3`` with one registry entry, its two
functions and a method row; the kernels do not implement it, so it runs on its reference step
form instead of being refused.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import estimators
from estimators import _ext
from estimators._validation import check_batch
from estimators.joint_loss import Form
from estimators.registry import (ESTIMATORS, IMPUTATION_LOSSES, EstimatorSpec, ImputationLossSpec,
                                 get_estimator, register_estimator)
from estimators.training import JointConfig, JointLearner, prediction_loss
from reproduce import METHODS, Method, register_method
from reproduce import config as C
from reproduce.__main__ import main
from reproduce.table import read_results

# The commands set process-wide state (threads, flush-to-zero): undone after each test, for the
# Hypothesis tests that follow (they need IEEE subnormals).
pytestmark = pytest.mark.usefixtures("restore_runtime")

CAP = 4.0


def clipped_ips(e, o, p_hat):
    """``(1/|D|) sum o * e * min(1 / p_hat, 4)``."""
    o, e, _, p_hat = check_batch(o, e=e, p_hat=p_hat)
    return (o * e * (1 / p_hat).clamp(max=CAP)).mean(dim=-1).mean()


CALLS = []


def clipped_ips_step(x_b, r_b, p_hat_b, x_u, xt_b, xt_u, form: Form):
    CALLS.append(x_b.numel())
    return (form.l(x_b, r_b) * (1 / p_hat_b).clamp(max=CAP)).sum() / x_b.numel()


@pytest.fixture
def toy():
    """Register the toy estimator and its method for one test, then remove them."""
    spec = register_estimator(EstimatorSpec("clipped_ips", "toy", "IPS with weights capped at 4", clipped_ips,
                                            ("e", "o", "p_hat"), clipped_ips_step))
    method = register_method(Method("clipped_ips", "Clipped IPS", "clipped_ips", None, None, "toy: capped weights"))
    CALLS.clear()
    try:
        yield spec, method
    finally:
        ESTIMATORS.pop("clipped_ips")
        METHODS.pop("clipped_ips")


def test_public_dicts_are_the_registry():
    assert estimators.ESTIMATORS is ESTIMATORS and estimators.IMPUTATION_LOSSES is IMPUTATION_LOSSES
    assert all(isinstance(s, EstimatorSpec) for s in ESTIMATORS.values())
    assert all(isinstance(s, ImputationLossSpec) for s in IMPUTATION_LOSSES.values())
    needs_u = {name for name, spec in ESTIMATORS.items() if spec.needs_u}
    assert needs_u == {name for name, spec in ESTIMATORS.items() if spec.needs_imputation} == {"eib", "dr", "badr", "stabledr"}
    assert {n for n, s in ESTIMATORS.items() if s.self_normalised} == {"snips", "badr", "stabledr"}
    assert {n for n, s in IMPUTATION_LOSSES.items() if s.dr_family} == {"dr", "mrdr", "dr_bias", "dr_mse", "tdr_cl"}


def test_every_kernel_is_a_registry_entry():
    """The extension's one list of names (csrc/kernel_names.h) names registry entries only."""
    if not _ext.built():
        pytest.skip("the extension is not built")
    assert _ext.PREDICTION_KERNELS <= set(ESTIMATORS) and _ext.IMPUTATION_KERNELS <= set(IMPUTATION_LOSSES)
    assert "eib" not in _ext.PREDICTION_KERNELS  # an entry without a kernel: see the next test


def test_an_entry_without_a_kernel_trains_on_its_reference():
    """EIB has no kernel; the joint learner's MF fast path takes its reference step form."""
    torch.manual_seed(0)
    learner = JointLearner(torch.full((6, 7), 0.3), JointConfig(estimator="eib", imputation_loss="dr", dim=3, G=2),
                           generator=torch.Generator().manual_seed(0))
    out = learner.step(torch.tensor([0, 1, 5]), torch.tensor([2, 6, 0]), torch.tensor([1.0, 0.0, 1.0]))
    assert learner.fast and np.isfinite(out["prediction_loss"]) and np.isfinite(out["imputation_loss"])


def test_registration_is_checked(toy):
    spec, _ = toy
    with pytest.raises(ValueError, match="registered already"):
        register_estimator(spec)
    with pytest.raises(ValueError, match="`reads` must list inputs"):
        EstimatorSpec("bad", "", "", clipped_ips, ("o", "e"), clipped_ips_step)
    with pytest.raises(ValueError, match="needs_u"):
        EstimatorSpec("bad", "", "", clipped_ips, ("e", "e_hat", "o"), clipped_ips_step)
    with pytest.raises(ValueError, match="normaliser"):
        EstimatorSpec("bad", "", "", clipped_ips, ("e", "o"), clipped_ips_step, normaliser="batch")
    with pytest.raises(ValueError, match="unknown estimator 'nope'"):
        get_estimator("nope")
    with pytest.raises(ValueError, match="needs an imputation loss"):
        Method("m", "M", "badr", None, None, "")


def test_a_toy_estimator_trains_through_table3_with_one_entry(toy, data_dir, tmp_path):
    spec, method = toy
    # its training loss is the registry's: the public function and the module read the entry
    x, r, p = torch.tensor([0.3, -1.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.1, 0.5])
    want = float((torch.nn.functional.softplus(-x[0]) * 4 + torch.nn.functional.softplus(x[1]) * 2) / 2)
    assert float(prediction_loss("clipped_ips", x, r, p)) == pytest.approx(want)
    assert float(estimators.PredictionLoss("clipped_ips")(x, r, p)) == pytest.approx(want)
    # a config entry (in a copy of the configs: the shipped files are untouched), then table3
    raw = copy.deepcopy(dict(C.load_config("coat").raw))
    raw["methods"]["clipped_ips"] = {k: raw["methods"]["ips"][k] for k in ("lr", "weight_decay", "gamma")}
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "coat.json").write_text(json.dumps(raw))
    out = tmp_path / "run"
    assert main(["table3", "--datasets", "coat", "--methods", "clipped_ips", "--seeds", "1", "--max-epochs", "2",
                 "--config-dir", str(cfg_dir), "--data-dir", str(data_dir), "--out", str(out)]) == 0
    rows = read_results(out / "results.csv")
    assert [r["method"] for r in rows] == ["clipped_ips"] and rows[0]["status"] in ("ok", "chance")
    assert 0.5 < rows[0]["auc"] < 1 and CALLS  # trained, on the reference step form
    assert "| Clipped IPS |" in (out / "table3.md").read_text()
