"""Fault injection for ``reproduce``: concurrent writers, torn files, a damaged or planted propensity
cache, the umask, killed parents, diverging runs and bad paths.  Each case failed before its fix."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from cvrdata import load_dataset
from reproduce import config as C
from reproduce.__main__ import main
from reproduce.files import remove_stale_temporaries, replace
from reproduce.methods import METHODS
from reproduce.table import append_result, read_results
from reproduce.train import PropensityCache, run_one

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("restore_runtime")


def _row(method="mf", seed=2024, **kw):
    return {"dataset": "coat", "method": method, "seed": seed, "auc": 0.7, "ndcg": 0.6, "recall": 0.5, "k": 5,
            "seconds": 1.0, "signature": "s", "status": "ok", **kw}


def _cli(*argv, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "reproduce", *map(str, argv)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


# ---- concurrent writers -----------------------------------------------------------------------------
def test_concurrent_table3_processes_lose_and_duplicate_nothing(data_dir, tmp_path):
    """Four processes, one method each, and the same plan twice at once, on one --out: one row per run."""
    out = tmp_path / "run"
    common = ["table3", "--datasets", "coat", "--seeds", "3", "--max-epochs", "1", "--threads", "1",
              "--data-dir", data_dir, "--out", out, "--no-propensity-cache"]
    procs = [_cli(*common, "--methods", m) for m in ("mf", "ips", "snips", "dr_jl")]
    procs += [_cli(*common, "--methods", "mf,ips") for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    rows = read_results(out / "results.csv")
    keys = [(r["method"], r["seed"]) for r in rows]
    assert sorted(keys) == sorted((m, s) for m in ("mf", "ips", "snips", "dr_jl") for s in (2024, 2025, 2026))
    with open(out / "results.csv") as f:
        assert len(f.read().splitlines()) == 1 + 12  # header + one line per run, nothing hidden by the reader
    table = (out / "table3.md").read_text()
    assert "| MF | " in table and re.search(r"\| 3( \(\d at chance level\))? \|", table) and "| 6" not in table


def _append_many(path: str, method: str, n: int) -> None:
    for seed in range(n):
        append_result(path, _row(method=method, seed=seed))


def test_concurrent_appends_lose_nothing(tmp_path):
    """Four processes appending 40 rows each to one file: all 160 rows, each once."""
    import multiprocessing

    path = str(tmp_path / "results.csv")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(path, m, 40)) for m in ("mf", "ips", "snips", "dr_jl")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = read_results(path)
    assert len(rows) == 160 and len({(r["method"], r["seed"]) for r in rows}) == 160


def test_append_keeps_the_first_row_of_a_run(tmp_path):
    path = tmp_path / "results.csv"
    assert append_result(path, _row(auc=0.7))
    assert not append_result(path, _row(auc=0.9))  # another process's row of the same run
    assert append_result(path, _row(seed=2025))
    assert [(r["seed"], r["auc"]) for r in read_results(path)] == [(2024, 0.7), (2025, 0.7)]


def test_a_torn_last_line_is_dropped_not_glued_to_the_next_row(tmp_path):
    path = tmp_path / "results.csv"
    append_result(path, _row(seed=2024))
    with open(path, "a") as f:  # a writer killed mid-line on a file system without atomic renames
        f.write("coat,ips,2024,0.71")
    with pytest.warns(UserWarning, match="line 3 is torn"):
        assert [r["method"] for r in read_results(path)] == ["mf"]
    with pytest.warns(UserWarning, match="torn"):
        append_result(path, _row(method="snips"))
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and lines[2].startswith("coat,snips,2024,") and "0.71" not in path.read_text()
    path.write_text(path.read_text() + "coat,dr_jl,2024\n")  # a hand-edited line: too few fields
    with pytest.warns(UserWarning, match="line 4 has 3 fields"):
        assert len(read_results(path)) == 2


def test_results_files_that_are_not_ours_are_named(tmp_path):
    folder = tmp_path / "results.csv"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        read_results(folder)
    bad = tmp_path / "bad.csv"
    append_result(bad, _row())
    bad.write_text(bad.read_text().replace("0.7,", "zero,", 1))
    with pytest.raises(ValueError, match=r"bad.csv, line 2: column 'auc' holds 'zero', not a number"):
        read_results(bad)


def test_cli_refuses_an_out_that_is_a_file_or_a_results_folder(data_dir, tmp_path, capsys):
    a_file = tmp_path / "out"
    a_file.write_text("")
    argv = ["table3", "--datasets", "coat", "--methods", "mf", "--seeds", "1", "--max-epochs", "1",
            "--data-dir", str(data_dir)]
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--out", str(a_file)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--out" in err and "is a file, not a folder" in err
    out = tmp_path / "run"
    (out / "results.csv").mkdir(parents=True)
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "results.csv is a folder" in err
    assert not (out / "history.csv").exists()  # refused before training, not after


def test_table_only_does_not_claim_to_write_results(tmp_path, capsys):
    assert main(["table3", "--datasets", "coat", "--methods", "mf", "--table-only", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "table3.md" in err and "results.csv" not in err and not (tmp_path / "results.csv").exists()


# ---- files: umask and temporaries -------------------------------------------------------------------
def test_files_honour_the_umask_and_leave_no_temporaries(tmp_path):
    old = os.umask(0o022)
    try:
        replace(tmp_path / "a.txt", "x")
        append_result(tmp_path / "results.csv", _row())
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "results.csv").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        replace(tmp_path / "b.txt", "x")
        assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".results.csv.{int(dead.stdout)}.abc123.tmp"
    mine = tmp_path / f".results.csv.{os.getpid()}.def456.tmp"
    stale.write_text("half a row")
    mine.write_text("being written")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and mine.exists()


# ---- the propensity cache -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coat(data_dir):
    return load_dataset("coat", data_dir)


def _ips_run(coat, cache, **kw):
    cfg = C.load_config("coat")
    method = METHODS["ips"]
    return run_one(coat, cfg, method, cfg.method_params(method), 2024, max_epochs=1, show_progress=False,
                   propensity_cache=cache, **kw)


@pytest.mark.parametrize("damage", ["empty", "truncated", "constant", "other key", "garbage"])
def test_a_damaged_cache_entry_is_refitted_with_a_warning(coat, tmp_path, damage):
    cache = PropensityCache(tmp_path)
    plain = _ips_run(coat, None)
    _ips_run(coat, cache)
    (entry,) = tmp_path.glob("*.pt")
    if damage == "empty":
        entry.write_bytes(b"")
    elif damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:1000])
    elif damage == "garbage":
        entry.write_bytes(os.urandom(5000))
    else:
        saved = torch.load(entry, weights_only=True)
        if damage == "constant":  # planted constant propensities with the right key
            saved["propensities"] = torch.full_like(saved["propensities"], 0.5)
        else:
            saved["key"] = "coat-2025-0000"
        torch.save(saved, entry)
    with pytest.warns(UserWarning, match="is unusable .* refitted"):
        again = _ips_run(coat, cache)
    assert not again["propensity_cached"] and again["auc"] == plain["auc"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the refit rewrote a good entry
        assert _ips_run(coat, cache)["propensity_cached"]


def test_a_link_planted_at_a_cache_name_is_never_followed(coat, tmp_path):
    cache = PropensityCache(tmp_path / "cache")
    cfg = C.load_config("coat")
    key = cache.key(coat, cfg, cfg.method_params(METHODS["ips"]), 2024)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"{key}.pt").symlink_to(victim)
    with pytest.warns(UserWarning, match="not a regular file"):
        run = _ips_run(coat, cache)
    assert not run["propensity_cached"] and victim.read_text() == "keep me"
    assert not (tmp_path / "cache" / f"{key}.pt").is_symlink()  # replaced by a real entry
    assert not list((tmp_path / "cache").glob(".*.tmp"))


# ---- processes ------------------------------------------------------------------------------------------
def _session(sid: int) -> list[int]:
    """The live processes of session ``sid`` (zombies left out)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_parent_leaves_no_worker_behind(data_dir, tmp_path, sig):
    proc = _cli("table3", "--datasets", "coat", "--methods", "mf,ips", "--seeds", "40", "--jobs", "2", "--threads",
                "1", "--data-dir", data_dir, "--out", tmp_path, start_new_session=True)
    # Killed once the workers are at work (a row written): a worker still importing torch when its
    # parent dies (seconds on a loaded machine) exits only once that import is over.
    deadline = time.monotonic() + 180
    while not (len(_session(proc.pid)) >= 4 and read_results(Path(tmp_path) / "results.csv")) \
            and time.monotonic() < deadline and proc.poll() is None:  # the parent, the tracker, two workers
        time.sleep(0.2)
    assert len(_session(proc.pid)) >= 4, proc.stderr.read() if proc.poll() is not None else "no workers"
    os.kill(proc.pid, sig)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _session(proc.pid)
    for pid in left:  # do not leak them into the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"


# ---- values nobody checked ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("name, value", [("x_b", float("inf")), ("x_b", -float("inf")), ("xt_u", float("nan")),
                                         ("x_u", float("inf"))])
def test_training_losses_refuse_non_finite_logits_on_both_backends(backend, name, value, monkeypatch):
    from estimators import _ext, imputation_loss, prediction_loss

    if backend == "fused" and not _ext.built():
        pytest.skip("the extension is not built")
    monkeypatch.setenv("CVR_BACKEND", backend)
    g = torch.Generator().manual_seed(0)
    t = {k: torch.randn(n, generator=g) for k, n in (("x_b", 6), ("xt_b", 6), ("x_u", 12), ("xt_u", 12))}
    t[name][2] = value
    r, p = torch.tensor([1.0, 0, 1, 1, 0, 1]), torch.full((6,), 0.3)
    with pytest.raises(ValueError, match=f"`{name}` \\(logits\\) contains NaN or inf"):
        prediction_loss("badr", t["x_b"], r, p, t["x_u"], t["xt_b"], t["xt_u"])
    with pytest.raises(ValueError, match=f"`{name}` \\(logits\\) contains NaN or inf"):
        imputation_loss("badr", t["xt_b"], t["x_b"], r, p, t["xt_u"], t["x_u"])


@pytest.mark.parametrize("method, key, value, reason", [
    ("mf", "lr", 100.0, "times a constant predictor's"),
    ("ips", "lr", 1e4, "times a constant predictor's"),
    ("ips", "prop_lr", 100.0, "the propensity model diverged"),
])
def test_a_diverging_run_is_recorded_as_diverged_not_ok(coat, method, key, value, reason, capsys):
    """Learning rates far too large used to give status "ok" with AUC 0.48-0.54."""
    from reproduce.train import run_or_diverged

    cfg = C.load_config("coat")
    params = {**cfg.method_params(METHODS[method]), key: value}
    result = run_or_diverged(coat, cfg, METHODS[method], params, 2024, max_epochs=20, show_progress=False)
    assert result["status"] == "diverged" and reason in capsys.readouterr().err


def _save_entry(root: str, key: str, value: float, rounds: int) -> None:
    cache = PropensityCache(root)
    generator = torch.Generator().manual_seed(0)
    for _ in range(rounds):
        cache.save(key, torch.full((30, 40), value), 3, [1.0, 0.9, 0.8], generator)


def test_workers_saving_one_cache_entry_at_once_never_collide(tmp_path):
    """Two workers fitting the same propensity model write its entry at the same time (they used to
    race on one temporary name): each write is whole, and the entry read is one of them."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_save_entry, args=(str(tmp_path), "coat-2024-abc", v, 30)) for v in (0.25, 0.5)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    hit = PropensityCache(tmp_path).load("coat-2024-abc", torch.Generator(), (30, 40))
    assert hit is not None and float(hit[0].unique()) in (0.25, 0.5)
    assert [p.name for p in tmp_path.iterdir()] == ["coat-2024-abc.pt"]


def test_repeated_datasets_and_methods_are_trained_once(data_dir, tmp_path):
    assert main(["table3", "--datasets", "coat,coat", "--methods", "mf,mf", "--seeds", "1", "--max-epochs", "1",
                 "--jobs", "1", "--data-dir", str(data_dir), "--out", str(tmp_path)]) == 0
    assert [(r["dataset"], r["method"]) for r in read_results(tmp_path / "results.csv")] == [("coat", "mf")]


def test_an_entry_without_the_fitted_model_is_refitted_for_gpl_and_serves_the_table_rows(coat, tmp_path):
    """An entry written before the cache kept the fitted model (or with a damaged one) still serves
    the rows that read the table; DR-MSE-GPL, which continues the model, refits with a warning."""
    cfg = C.load_config("coat")
    cache = PropensityCache(tmp_path)
    _ips_run(coat, cache)
    (entry,) = tmp_path.glob("*.pt")
    saved = torch.load(entry, weights_only=True)
    gpl = METHODS["dr_mse_gpl"]
    params = cfg.method_params(gpl) | {"gpl_rounds": 1, "gpl_prop_epochs": 1, "gpl_joint_epochs": 1}
    plain = run_one(coat, cfg, gpl, params, 2024, max_epochs=1, show_progress=False)
    for damage, message in (("missing", "holds no model parameters"), ("shape", "not a finite tensor of shape")):
        if damage == "missing":
            del saved["model"]
        else:
            saved["model"] = {k: v[:1] for k, v in saved_model.items()}
        torch.save(saved, entry)
        assert _ips_run(coat, cache)["propensity_cached"]
        with pytest.warns(UserWarning, match=message):
            run = run_one(coat, cfg, gpl, params, 2024, max_epochs=1, show_progress=False, propensity_cache=cache)
        assert not run["propensity_cached"] and run["auc"] == plain["auc"]
        saved_model = torch.load(entry, weights_only=True)["model"]  # the refit wrote it back
