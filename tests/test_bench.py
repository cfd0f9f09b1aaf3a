"""``python -m benchmarks.losses``: its records carry the keys the benchmark promises, ``--load`` starts and
stops its busy processes, and unstable timings are flagged."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import losses as bench
from estimators import _ext

# A missing extension fails tests/test_fused.py under CI; here it only skips.
pytestmark = pytest.mark.skipif(not _ext.built(), reason="the benchmark times the built extension")
REPO = Path(__file__).resolve().parents[1]


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


def test_spread_and_unstable_warning():
    assert bench.spread([5.0]) == 0.0
    assert bench.spread([10.0] * 8) == 0.0
    steady = bench.Timing(10.0, bench.spread([10.0, 10.1, 9.9, 10.0, 10.2]))
    assert bench.unstable_warning("prediction/badr B=4096 G=8 fused_us", steady) is None
    shaky = bench.Timing(12.0, bench.spread([10.0, 11.0, 12.0, 40.0, 9000.0]))
    assert shaky.spread > bench.UNSTABLE_SPREAD
    line = bench.unstable_warning("prediction/badr B=4096 G=8 fused_us", shaky)
    assert line.startswith("warning: unstable timing of prediction/badr B=4096 G=8 fused_us")
    assert f"{shaky.spread:.0%}" in line
    assert bench.unstable_warning("x", bench.Timing(10.0, 0.3), threshold=0.5) is None


def _gone(pid: int) -> bool:
    """Whether process `pid` has exited (reaped, or a zombie waiting for its new parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


linux_only = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")


@linux_only
def test_busy_processes_run_inside_the_block_only():
    with bench.busy_processes(2) as procs:
        assert len(procs) == 2 and all(p.poll() is None and not _gone(p.pid) for p in procs)
    assert all(p.poll() is not None and _gone(p.pid) for p in procs)
    with pytest.raises(RuntimeError), bench.busy_processes(1) as procs:
        raise RuntimeError("a failed measurement")
    assert procs[0].poll() is not None and _gone(procs[0].pid)


@linux_only
def test_busy_process_exits_with_its_parent():
    # A benchmark killed without cleanup leaves no spinning orphan.
    code = ("import os, sys; from benchmarks import losses as b; cm = b.busy_processes(1); "
            "print(cm.__enter__()[0].pid, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 30
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid)


@linux_only
def test_load_option_starts_and_stops_its_processes(capsys):
    assert bench.main(["--json", "--quick", "--load", "2", "--ops", "prediction/ips"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 4
    started = re.search(r"# --load 2: 2 busy processes running during the measurements \(pids ([\d ]+)\)", captured.err)
    assert started, captured.err
    pids = [int(p) for p in started.group(1).split()]
    assert len(pids) == 2 and all(_gone(p) for p in pids)
    assert "# --load 2: the busy processes are stopped" in captured.err


def test_negative_load_is_rejected(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--load", "-1"])
    assert "--load must not be negative" in capsys.readouterr().err
