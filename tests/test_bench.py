"""``python -m benchmarks.losses``: its records carry the keys the benchmark promises."""
from __future__ import annotations

import json

import pytest

from benchmarks import losses as bench
from estimators import _ext

# A missing extension fails tests/test_fused.py under CI; here it only skips.
pytestmark = pytest.mark.skipif(not _ext.built(), reason="the benchmark times the built extension")


def test_records_and_json(capsys):
    records = bench.run("cpu", sizes=(128,), groups=(5,), only=("prediction/badr", "imputation/badr"))
    assert [(r["op"], r["B"], r["G"], r["device"]) for r in records] == [
        ("prediction/badr", 128, 5, "cpu"), ("imputation/badr", 128, 5, "cpu")]
    for r in records:
        assert {"fused_us", "reference_us", "speedup", "gbps", "copy_gbps", "engine_us"} <= r.keys()
        assert r["fused_us"] > 0 and r["reference_us"] > 0 and r["copy_gbps"] > 0
        assert r["speedup"] == pytest.approx(r["reference_us"] / r["fused_us"], rel=0.02)
    assert bench.main(["--json", "--quick", "--ops", "prediction/ips"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {(r["op"], r["B"], r["G"]) for r in printed} == {("prediction/ips", b, g) for b in (128, 4096) for g in (5, 8)}


def test_unknown_operator_is_rejected(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--ops", "prediction/nope"])
    assert "unknown operators" in capsys.readouterr().err


def test_nonpositive_threads_are_rejected(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--threads", "0"])
    assert "--threads must be positive" in capsys.readouterr().err
