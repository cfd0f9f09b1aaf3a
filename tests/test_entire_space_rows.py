"""The entire-space methods as Table 3 rows (issue 16, part 2): registered, configured, trained
end to end through ``table3`` on Coat, without reading an unclicked label, with detached
propensity weights; the existing methods' run signatures unchanged."""
import copy
import math
from pathlib import Path

import pytest
import torch

import reproduce.entire_space as ES
from reproduce import config as C
from reproduce.methods import METHODS, TABLE3_ROWS, Method
from reproduce.table import read_results
from reproduce.train import run_one

# The commands set process-wide state (threads, flush-to-zero): undone after each test, for the
# Hypothesis tests that follow (they need IEEE subnormals).
pytestmark = pytest.mark.usefixtures("restore_runtime")

#: The seven entire-space methods: name -> Table 3 row (None: an extra row).
ROWS = {"multi_ips": "Multi-IPS", "multi_dr": "Multi-DR", "escm2_ips": "ESCM2-IPS", "escm2_dr": "ESCM2-DR",
        "ddpo": "DDPO", "esmm": None, "escm2_badr": None}

#: ``run_signature`` of every method that existed before the entire-space rows, on every shipped
#: config, with the config's epochs and with 3 epochs and a training fraction of 0.5, computed
#: before the entire-space rows were added (commit 8583863): the resume keys of finished runs must
#: not move.
SIGNATURES = {
    "coat/mf": ("bb4bff6581", "da10d7150c"), "coat/ips": ("b4aa6fc272", "c019aeeed4"),
    "coat/snips": ("a1a4ae42d9", "739880750e"), "coat/dr_jl": ("4323c8d8e6", "b0f6aebf7b"),
    "coat/mrdr": ("9746aa9798", "79f1c72a86"), "coat/dr_bias": ("d212adaef4", "fc08aa96de"),
    "coat/dr_mse": ("b9004af8df", "776a6a1856"), "coat/badr": ("b3aed83ce5", "bd967d8c21"),
    "coat/badr_dr": ("4eaea04ae6", "aac6a15792"), "coat/badr_v": ("8231632658", "b891be17e7"),
    "coat/badr_b": ("7ac7e68693", "54e9764fce"), "coat/badr_m": ("affe240726", "5e62e2ef46"),
    "yahoo/mf": ("8455890132", "8d7292ff42"), "yahoo/ips": ("de250f9854", "1ceea616f1"),
    "yahoo/snips": ("7addf8d91f", "6be1c002fd"), "yahoo/dr_jl": ("ff10f946dc", "389c46029c"),
    "yahoo/mrdr": ("3dba202876", "2c97622ba6"), "yahoo/dr_bias": ("3744deadb6", "202cf639e9"),
    "yahoo/dr_mse": ("7257716603", "b2230859db"), "yahoo/badr": ("5216c1d8b7", "41d14739b3"),
    "yahoo/badr_dr": ("df7d0c9852", "357b66423c"), "yahoo/badr_v": ("a395ba2b90", "15f478904f"),
    "yahoo/badr_b": ("bb9c6270de", "a9bed8ab8c"), "yahoo/badr_m": ("9e9a06ac54", "59135448e6"),
    "kuairec/mf": ("4c99d8f0d5", "2a589b5128"), "kuairec/ips": ("3d6bd4f1c3", "889b39af06"),
    "kuairec/snips": ("42b6054ec8", "8ca9135749"), "kuairec/dr_jl": ("6d0289845b", "5f5069f2ad"),
    "kuairec/mrdr": ("8c2246c201", "211faad02d"), "kuairec/dr_bias": ("57485f7ac3", "8f9061416b"),
    "kuairec/dr_mse": ("1461e19460", "6ba5433dda"), "kuairec/badr": ("42169fbfc2", "b2623cf1c5"),
    "kuairec/badr_dr": ("a521e17fac", "9efce8ca48"), "kuairec/badr_v": ("6f98e86fc1", "9409200ace"),
    "kuairec/badr_b": ("3013707cf4", "e7323c83f9"), "kuairec/badr_m": ("cc7e969d13", "b34f6a4ac2"),
    "default/mf": ("a792ba1975", "70c95afe6a"), "default/ips": ("db56701b4c", "6cc6344d68"),
    "default/snips": ("9c2ecca3a2", "a883b51764"), "default/dr_jl": ("feb0bea8b7", "d9d81ffd9f"),
    "default/mrdr": ("bd51f4bcff", "91ac6499c0"), "default/dr_bias": ("125d57973e", "bec28a2f70"),
    "default/dr_mse": ("74fc4934be", "7cd6657b84"), "default/badr": ("ad380d2588", "026005c15c"),
    "default/badr_dr": ("f33e2241ec", "e4dc76ba85"), "default/badr_v": ("ba004aeb43", "d6ae053203"),
    "default/badr_b": ("a2542b413f", "aa3274b959"), "default/badr_m": ("c033b00c78", "8caea5c6ea"),
}


#: Rows of the joint-learning family added after the signatures were taken (tests/test_tdr_cl.py,
#: tests/test_stabledr.py, tests/test_dce_tdr.py, tests/test_gpl.py).
ADDED_SINCE = frozenset({"tdr_cl", "stabledr", "dce_tdr", "dr_mse_gpl", "dr_mse_gpl_published"})


def test_existing_signatures_unchanged():
    ref = SIGNATURES
    seen = set()
    for ds in ("coat", "yahoo", "kuairec", "default"):
        cfg = C.load_config(ds)
        for name, method in METHODS.items():
            if (method.entire_space is not None or method.propensity_free is not None
                    or method.propensity_adjustment is not None or name in ADDED_SINCE):  # rows added since
                continue
            params = cfg.method_params(method)
            got = (C.run_signature(cfg, method, params, cfg.max_epochs),
                   C.run_signature(cfg, method, params, 3, {"train_fraction": 0.5}))
            assert got == ref[f"{ds}/{name}"], f"{ds}/{name}"
            seen.add(f"{ds}/{name}")
    assert seen == set(ref)


def test_registered_as_rows():
    for name, row in ROWS.items():
        method = METHODS[name]
        assert method.entire_space == name and method.estimator is None and method.imputation_loss is None
        assert method.table3_row == row and not method.uses_propensity
        spec = method.entire_space_spec
        assert method.keys == ("lr", "weight_decay") + tuple(spec.params)
    assert {m.table3_row for m in METHODS.values() if m.entire_space} - {None} <= set(TABLE3_ROWS)
    with pytest.raises(ValueError, match="takes no estimator"):
        Method("bad", "Bad", "ips", None, None, "an estimator and an objective", entire_space="esmm")
    with pytest.raises(ValueError, match="unknown entire-space objective"):
        Method("bad", "Bad", None, None, None, "no such objective", entire_space="esmm2")
    # every signature of an entire-space method names its objective and the exposure protocol
    cfg = C.load_config("coat")
    sigs = {C.run_signature(cfg, METHODS[n], cfg.method_params(METHODS[n]), 100) for n in ROWS}
    assert len(sigs) == len(ROWS)
    wider = C.parse_config({**copy.deepcopy(dict(cfg.raw)), "entire_space": {"batch_size": 512}}, Path("coat.json"))
    assert C.run_signature(wider, METHODS["esmm"], cfg.method_params(METHODS["esmm"]), 100) not in sigs


def test_table3_trains_every_entire_space_method(coat_table3_rows, tmp_path):
    rows = coat_table3_rows(list(ROWS))
    # results.csv records the batch each run stepped on: exposures, not the clicked-pair batch
    exposures = C.load_config("coat").entire_space.batch_size
    assert {int(r["batch_size"]) for r in read_results(tmp_path / "out" / "results.csv")} == {exposures}
    for name, row in ROWS.items():
        cells = rows[METHODS[name].label]
        ours, paper = cells[1], cells[2]
        assert " ± " in ours and 0.3 < float(ours.split(" ± ")[0]) < 1, cells  # trained, AUC measured
        assert (paper == "—") == (row is None), cells  # the paper's number beside the five Table 3 rows
    assert not any("not implemented" in " ".join(rows[r]) for r in ROWS.values() if r)


def _short_run(data, cfg, name, **params):
    method = METHODS[name]
    p = {**cfg.method_params(method), **params}
    return run_one(data, cfg, method, p, 2024, max_epochs=2, split="val", show_progress=False, history=True)


@pytest.fixture(scope="module")
def coat(coat_one_thread):
    return coat_one_thread


def test_unclicked_labels_never_read(coat, monkeypatch):
    cfg, data = coat
    o, r = ES.exposure_space(data)
    assert int(o.sum()) == len(data.x_train) and bool(torch.isnan(r[o == 0]).all())
    assert set(r[o == 1].tolist()) <= {0.0, 1.0}
    for name in ("escm2_dr", "ddpo", "escm2_badr", "esmm"):
        clean = _short_run(data, cfg, name)
        for garbage in (1.0, -7.5):
            monkeypatch.setattr(ES, "UNCLICKED_LABEL", garbage)
            dirty = _short_run(data, cfg, name)
            for key in ("auc", "ndcg", "recall"):
                assert dirty[key] == clean[key], (name, garbage, key)
            assert [h["monitor"] for h in dirty["history"]] == [h["monitor"] for h in clean["history"]], name
        monkeypatch.setattr(ES, "UNCLICKED_LABEL", math.nan)


@pytest.mark.parametrize("name", [n for n in ROWS if METHODS[n].entire_space_spec.uses_propensity])
def test_propensity_weights_detached(coat, name):
    """The counterfactual terms reach the CTR tower only as constant weights: its gradient is that of
    the CTR and CTCVR terms alone (the regulariser's weight set to 0 changes nothing)."""
    cfg, data = coat
    method = METHODS[name]
    params = {**cfg.method_params(method), "gamma": 0.01}  # clipping binds nowhere: weights 1 / o_hat
    o, r = ES.exposure_space(data)
    idx = torch.randperm(data.n_pairs, generator=torch.Generator().manual_seed(0))[:2048]
    users, items = idx // data.n_items, idx % data.n_items

    def ctr_grads(**overrides):
        torch.manual_seed(0)
        model, objective = ES.build(method, {**params, **overrides}, data.n_users, data.n_items, cfg.dim)
        objective.from_outputs(model(users, items), o[idx], r[idx]).backward()
        cvr_trained = all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.models["cvr"].parameters())
        return [p.grad.clone() for p in model.models["ctr"].parameters()], cvr_trained

    full, cvr_trained = ctr_grads(lambda_c=5.0)
    assert cvr_trained  # the regulariser is live: it trains the CVR tower
    without, _ = ctr_grads(**{k: 0.0 for k in ("lambda_c", "lambda_p") if k in params})
    for g_full, g_without in zip(full, without):
        torch.testing.assert_close(g_full, g_without, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method, key, value, match", [
    ("escm2_ips", "lambda_c", -1, "methods.escm2_ips.lambda_c must be a number >= 0; got -1"),
    ("multi_dr", "gamma", 2, r"methods.multi_dr.gamma must be a number in \(0, 1\]; got 2"),
    ("ddpo", "lambda_p", math.inf, "methods.ddpo.lambda_p must be a number >= 0; got inf"),
    ("esmm", "gamma", 0.1, "methods.esmm.gamma is not a key of method 'esmm'"),
    ("escm2_dr", "prop_lr", 0.1, "methods.escm2_dr.prop_lr is a propensity setting, but the method uses no "
                                 "propensity model"),
])
def test_bad_config_values_rejected(method, key, value, match):
    raw = copy.deepcopy(dict(C.load_config("coat").raw))
    raw["methods"][method][key] = value
    with pytest.raises(ValueError, match="coat.json: " + match):
        C.parse_config(raw, Path("coat.json"))
    raw = copy.deepcopy(dict(C.load_config("coat").raw))
    del raw["methods"][method]["lr"]
    with pytest.raises(ValueError, match=f"coat.json: methods.{method} lacks lr"):
        C.parse_config(raw, Path("coat.json"))


@pytest.mark.parametrize("block, match", [
    ({"batch_size": 0}, "entire_space.batch_size must be an integer >= 1; got 0"),
    ({"exposures_per_epoch": "most"}, "entire_space.exposures_per_epoch must be an integer >= 1; got 'most'"),
    ({"steps": 3}, "entire_space.steps is not an entire-space setting"),
])
def test_bad_protocol_rejected(block, match):
    raw = copy.deepcopy(dict(C.load_config("coat").raw))
    raw["entire_space"] = {**raw["entire_space"], **block}
    with pytest.raises(ValueError, match="coat.json: " + match):
        C.parse_config(raw, Path("coat.json"))
