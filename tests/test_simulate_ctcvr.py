"""``python -m simulate ctcvr``: the semi-synthetic click / conversion log with known truth (``simulate.ctcvr``)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import simulate.__main__ as cli
from simulate import ctcvr

REPO = Path(__file__).resolve().parents[1]
SMALL_WORLD = {"n_users": 2000, "n_items": 1000}  # a world that builds in well under a second
# Rates high enough that 2e5 exposures hold thousands of conversions.
RATES = {"ctr": 0.1, "cvr": 0.1}
N = 200_000  # three blocks and a bit: chunks, block edges and split edges all cut somewhere
FILES = {f"{name}.npy" for name in (*ctcvr.EXPOSURE_FILES, *ctcvr.TABLE_FILES)} | {"summary.json"}


def _settings(**changes) -> ctcvr.Settings:
    return ctcvr.Settings(**{"n_exposures": N, **SMALL_WORLD, **RATES, "chunk_size": ctcvr.BLOCK, **changes})


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ctcvr") / "ref"
    ctcvr.write_ctcvr(_settings(), out)
    return out


# ---- determinism and streaming --------------------------------------------------------------------


def test_same_seed_same_bytes_whatever_the_chunk_size(reference: Path, tmp_path: Path) -> None:
    assert {p.name for p in reference.iterdir()} == FILES
    again = tmp_path / "again"
    ctcvr.write_ctcvr(_settings(chunk_size=4 * ctcvr.BLOCK), again)  # one chunk instead of four
    assert _bytes(again) == _bytes(reference)


def test_seeds_change_what_they_draw(reference: Path, tmp_path: Path) -> None:
    ref = _bytes(reference)
    ctcvr.write_ctcvr(_settings(seed=1), tmp_path / "seed")
    other = _bytes(tmp_path / "seed")
    assert other["user_fields.npy"] == ref["user_fields.npy"]  # same world
    for name in ("user.npy", "click.npy", "true_p_click.npy"):
        assert other[name] != ref[name], name
    ctcvr.write_ctcvr(_settings(truth_seed=1), tmp_path / "truth")
    assert _bytes(tmp_path / "truth")["user_fields.npy"] != ref["user_fields.npy"]


def test_a_shorter_log_is_a_prefix_of_a_longer_one(reference: Path, tmp_path: Path) -> None:
    short = ctcvr.write_ctcvr(_settings(n_exposures=70_001), tmp_path / "short")
    assert short["n_exposures"] == 70_001
    long_, head = ctcvr.load_ctcvr(reference), ctcvr.load_ctcvr(tmp_path / "short")
    for name in ctcvr.EXPOSURE_FILES:
        np.testing.assert_array_equal(getattr(head, name), getattr(long_, name)[:70_001], err_msg=name)


def test_alias_table_draws_the_shares() -> None:
    weights = np.array([5.0, 1.0, 0.1, 3.0, 0.9, 10.0, 0.0])
    table = ctcvr.Alias.of(weights)
    counts = np.bincount(table.draw(np.random.default_rng(0).random(1_000_000)), minlength=len(weights))
    shares = weights / weights.sum()
    assert counts[-1] == 0
    assert np.all(np.abs(counts / 1e6 - shares) <= 5 * np.sqrt(shares * (1 - shares) / 1e6) + 1e-9)


# ---- the truth --------------------------------------------------------------------------------------


def test_summary_matches_the_arrays(reference: Path) -> None:
    log = ctcvr.load_ctcvr(reference)
    summary = log.summary
    p_click = log.true_p_click.astype(np.float64)
    p_conv = log.true_p_conversion.astype(np.float64)
    click, conv, true_conv = (getattr(log, name).astype(np.int64) for name in
                              ("click", "conversion", "true_conversion"))
    expected = {
        "exposures": N, "clicks": click.sum(), "conversions": conv.sum(), "true_conversions": true_conv.sum(),
        "ctr": click.mean(), "ctr_expected": p_click.mean(),
        "cvr_clicked": conv.sum() / click.sum(), "cvr_clicked_expected": (p_click * p_conv).sum() / p_click.sum(),
        "cvr_exposures": true_conv.mean(), "cvr_exposures_expected": p_conv.mean(),
        "ctcvr": conv.mean(), "ctcvr_expected": (p_click * p_conv).mean(),
    }
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, rel=1e-9), key
    # The targets hold in expectation (calibration sample of 2^20 exposures, then N = 2e5 draws).
    assert summary["ctr_expected"] == pytest.approx(RATES["ctr"], rel=0.03)
    assert summary["cvr_clicked_expected"] == pytest.approx(RATES["cvr"], rel=0.05)
    # Splits: contiguous 80 / 10 / 10, their counts those of their rows.
    splits = summary["splits"]
    assert [(s["start"], s["stop"]) for s in splits.values()] == [(0, 160_000), (160_000, 180_000), (180_000, N)]
    for name, part in splits.items():
        rows = slice(part["start"], part["stop"])
        assert part["clicks"] == click[rows].sum() and part["conversions"] == conv[rows].sum(), name
        assert part["cvr_exposures_expected"] == pytest.approx(p_conv[rows].mean(), rel=1e-9), name
    assert summary["files"]["true_p_click.npy"] == {"dtype": "<f4", "shape": [N]}
    assert summary["files"]["user_fields.npy"] == {"dtype": "<i4", "shape": [2000, 3]}
    assert summary["settings"]["mnar"] == 1.0 and "chunk_size" not in summary["settings"]
    assert summary["model"]["user_fields"] == list(ctcvr.USER_FIELDS)


def test_clicks_are_missing_not_at_random(reference: Path, tmp_path: Path) -> None:
    """beta > 0: conversions are over-represented among clicks (ESCM2's assumption (10), E_O[R] > E_D[R])."""
    summary = ctcvr.load_ctcvr(reference).summary
    clicked, exposed = summary["cvr_clicked"], summary["cvr_exposures"]
    se = np.sqrt(clicked * (1 - clicked) / summary["clicks"] + exposed * (1 - exposed) / N)
    assert clicked - exposed > 10 * se and clicked > 1.3 * exposed, (clicked, exposed, se)
    assert summary["cvr_clicked_expected"] > 1.3 * summary["cvr_exposures_expected"]
    # Without the coupling, clicks say nothing about conversions: the two rates agree.
    mar = ctcvr.write_ctcvr(_settings(mnar=0.0), tmp_path / "mar")
    assert mar["cvr_clicked_expected"] == pytest.approx(mar["cvr_exposures_expected"], rel=0.05)
    stronger = ctcvr.write_ctcvr(_settings(mnar=2.0), tmp_path / "strong")
    gap = stronger["cvr_clicked_expected"] / stronger["cvr_exposures_expected"]
    assert gap > summary["cvr_clicked_expected"] / summary["cvr_exposures_expected"]


def test_unclicked_exposures_show_no_conversion(reference: Path) -> None:
    log = ctcvr.load_ctcvr(reference)
    np.testing.assert_array_equal(log.conversion, log.click & log.true_conversion)
    unclicked = log.click == 0
    assert not log.conversion[unclicked].any()
    assert log.true_conversion[unclicked].sum() > 1000  # the counterfactual truth is there
    assert set(np.unique(log.click)) == {0, 1} and set(np.unique(log.true_conversion)) == {0, 1}
    assert np.all((log.true_p_click > 0) & (log.true_p_click < 1))
    assert log.user.min() >= 0 and log.user.max() < 2000 and log.item.max() < 1000


# ---- the loader -------------------------------------------------------------------------------------


def test_loader_returns_splits_as_memory_mapped_views(reference: Path) -> None:
    whole = ctcvr.load_ctcvr(reference)
    parts = [ctcvr.load_ctcvr(reference, split=name) for name in ctcvr.SPLITS]
    assert [len(p) for p in parts] == [160_000, 20_000, 20_000] and len(whole) == N
    assert isinstance(parts[0].click, np.memmap) and not parts[0].click.flags.writeable
    np.testing.assert_array_equal(np.concatenate([p.true_p_conversion for p in parts]), whole.true_p_conversion)
    assert parts[2].start == 180_000 and parts[2].split == "test"
    features = parts[1].features(slice(0, 5))
    assert features.shape == (5, 6) and features.dtype == np.int32
    np.testing.assert_array_equal(features[:, :3], whole.user_fields[parts[1].user[:5]])
    in_memory = ctcvr.load_ctcvr(reference, split="val", mmap=False)
    assert not isinstance(in_memory.click, np.memmap)
    np.testing.assert_array_equal(in_memory.item, parts[1].item)


def _copy(reference: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in reference.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


@pytest.mark.parametrize("damage, pattern", [
    (lambda d: (d / "click.npy").unlink(), r"click\.npy: missing"),
    (lambda d: (d / "summary.json").unlink(), r"summary\.json: missing"),
    (lambda d: np.save(d / "item.npy", np.zeros(N - 1, dtype="<i4")), r"item\.npy: holds <i4 \[199999\]"),
    (lambda d: np.save(d / "true_p_click.npy", np.zeros(N, dtype="<f8")), r"true_p_click\.npy: holds <f8"),
    (lambda d: (d / "user.npy").write_bytes((d / "user.npy").read_bytes()[:1000]), r"user\.npy: unreadable"),
    (lambda d: (d / "summary.json").write_text("{"), r"summary\.json: unreadable"),
    (lambda d: (d / "summary.json").write_text('{"format": "other"}'), r"summary\.json: not a summary"),
    (lambda d: (d / "summary.json").write_text(json.dumps({"format": ctcvr.FORMAT, "n_exposures": N})),
     r"summary\.json: lacks the entry 'files'"),
])
def test_loader_names_the_damaged_file_and_the_fix(reference: Path, tmp_path: Path, damage, pattern) -> None:
    folder = _copy(reference, tmp_path / "copy")
    damage(folder)
    with pytest.raises(ValueError, match=pattern) as error:
        ctcvr.load_ctcvr(folder)
    assert f"--out {folder} --overwrite" in str(error.value)


def test_loader_rejects_a_bad_split_or_folder(reference: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"split must be one of train, val, test or None, got 'validation'"):
        ctcvr.load_ctcvr(reference, split="validation")
    with pytest.raises(ValueError, match=r"nowhere is not a folder: build one with python -m simulate ctcvr"):
        ctcvr.load_ctcvr(tmp_path / "nowhere")


# ---- the output folder ------------------------------------------------------------------------------


def test_a_non_empty_out_is_refused_without_overwrite(reference: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = _copy(reference, tmp_path / "out")
    before = _bytes(out)
    argv = ["ctcvr", "--exposures", "1000", "--users", "100", "--items", "100", "--out", str(out)]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert re.search(r"error: --out .*out is not empty \(it holds click\.npy, conversion\.npy, item\.npy and 7 "
                     r"more\): pass --overwrite", capsys.readouterr().err)
    assert _bytes(out) == before
    assert cli.main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["n_exposures"] == 1000
    # --overwrite replaces only a folder this command wrote.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds 'notes\.txt', which python -m simulate ctcvr does not write"):
        ctcvr.write_ctcvr(_settings(n_exposures=1000), out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_failure_mid_way_leaves_no_partial_folder(reference: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, overwrite: bool) -> None:
    out = _copy(reference, tmp_path / "out") if overwrite else tmp_path / "out"
    before = _bytes(out) if overwrite else None
    real, calls = ctcvr.draw_chunk, []

    def fails_after_one_chunk(*args, **kwargs):
        calls.append(args[2])
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)
    monkeypatch.setattr(ctcvr, "draw_chunk", fails_after_one_chunk)
    with pytest.raises(OSError, match="No space left"):
        ctcvr.write_ctcvr(_settings(), out, overwrite=overwrite)
    assert calls == [0, ctcvr.BLOCK]
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if overwrite else [])
    if overwrite:
        assert _bytes(out) == before


def test_files_honour_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        ctcvr.write_ctcvr(_settings(n_exposures=1000), tmp_path / "out")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == {0o640}


# ---- flags ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, pattern", [
    (["--exposures", "0"], r"--exposures must be a positive integer, got 0"),
    (["--exposures", "-5"], r"--exposures must be a positive integer, got -5"),
    (["--exposures", "1.5"], r"argument --exposures: must be a whole number, got '1\.5'"),
    (["--exposures", "many"], r"argument --exposures: must be a whole number, got 'many'"),
    (["--exposures", "3"], r"--exposures 3 leaves the val split empty with --split 80 10 10"),
    (["--ctr", "0"], r"--ctr \(the expected click-through rate\) must be in \[1e-05, 0\.99\], got 0\.0"),
    (["--ctr", "1.5"], r"--ctr .* got 1\.5"),
    (["--cvr", "nan"], r"--cvr \(the expected conversion rate over clicks\) must be in .* got nan"),
    (["--mnar", "-1"], r"--mnar must be a number in \[0, 10\], got -1\.0"),
    (["--noise", "inf"], r"--noise must be a number in \[0, 10\], got inf"),
    (["--users", "0"], r"--users must be an integer in 1\.\.1,000,000"),
    (["--items", "2e6"], r"--items must be an integer in 1\.\.1,000,000 .* got 2000000"),
    (["--seed", "-1"], r"--seed must be an integer >= 0, got -1"),
    (["--split", "80", "10", "5"], r"--split takes three integer percentages >= 1 .* got 80 10 5"),
    (["--split", "90", "10", "0"], r"--split takes three integer percentages"),
    (["--chunk-size", "1000"], r"--chunk-size must be a multiple of 65536 up to 4194304, got 1000"),
    (["--exposures", "1e15"], r"--exposures 1000000000000000 needs 19000000\.\d+ GB under --out"),
])
def test_bad_flags_are_refused_by_name_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture, flags, pattern) -> None:
    def no_work(*args, **kwargs):
        raise AssertionError("work began before the flags were checked")
    monkeypatch.setattr(ctcvr, "build_world", no_work)
    argv = ["ctcvr", "--exposures", "1000", "--out", str(tmp_path / "out"), *flags]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(rf"python -m simulate ctcvr: error: .*{pattern}", last), last
    assert not (tmp_path / "out").exists()


def test_the_api_refuses_the_same_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctcvr, "build_world", None)  # never reached
    with pytest.raises(ValueError, match=r"^--exposures must be a positive integer, got 2\.0"):
        ctcvr.write_ctcvr(_settings(n_exposures=2.0), tmp_path / "out")
    with pytest.raises(ValueError, match=r"^--split takes"):
        ctcvr.write_ctcvr(_settings(split=(50, 50)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_command_line_runs_and_the_badr_command_is_untouched(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "simulate", "ctcvr", "--exposures", "1e5", "--users", "500",
                          "--items", "300", "--out", str(tmp_path / "cli")],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert re.search(r"^  cvr_clicked +0\.\d+$", run.stdout, flags=re.M), run.stdout
    assert re.search(r"^done in [\d.]+ s \([\d,]+ exposures/s\)$", run.stdout, flags=re.M), run.stdout
    assert ctcvr.load_ctcvr(tmp_path / "cli", split="train").summary["n_exposures"] == 100_000
    # The first argument decides: anything else is the BADR command, with its own flags.
    run = subprocess.run([sys.executable, "-m", "simulate", "--exposures", "5", "--out", str(tmp_path / "x")],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2 and "unrecognized arguments: --exposures 5" in run.stderr
