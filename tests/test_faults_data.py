"""Faults on the data side: bad bytes, huge ids, folders for files, repeated pairs (``cvrdata``);
degenerate or bad flags and interrupted writes (``simulate``)."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import simulate
import simulate.__main__ as simulate_cli
import simulate.protocol as protocol
import simulate.writer as writer
from cvrdata import CVRData, DataWarning, load_dataset, load_split

REPO = Path(__file__).resolve().parents[1]
SMALL = {
    "x_train_3_20.txt": "0 0\n0 1\n1 2\n",
    "y_train_3_20.txt": "1\n0\n1\n",
    "x_val_3_20.txt": "1 0\n",
    "y_val_3_20.txt": "0\n",
    "x_test_3_20.txt": "2 1\n0 2\n",
    "y_test_3_20.txt": "1\n0\n",
}
OUTPUT_FILES = {f"{xy}_{name}_3_10.txt" for xy in "xy" for name in ("train", "val", "test")} | {
    "meta.json", "summary.json", "labels.npy", "propensities.npy", "clicks.npy", "ratings.npy"}


def _folder(path: Path, files: dict[str, str | bytes] | None = None) -> Path:
    """SMALL in ``path``, with ``files`` (relative path: text or bytes) replaced or added."""
    path.mkdir(parents=True, exist_ok=True)
    for name, text in {**SMALL, **(files or {})}.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            target.write_bytes(text)
        else:
            target.write_text(text)
    return path


def _message(call, *patterns: str) -> str:
    """Run ``call``; its ValueError message must contain every regex pattern."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    return message


def _no_data_warning(call):
    """Run ``call`` with DataWarning turned into an error (it must not warn) and return its result."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        return call()


# --- 1. bytes that are not UTF-8 --------------------------------------------------------------

@pytest.mark.parametrize("name, text, line", [
    ("x_train_3_20.txt", b"0 0\n0 \xff1\n1 2\n", 2),
    ("y_val_3_20.txt", b"\xe9\n", 1),
    ("x_test_3_20.txt", b"2 1\n0 2\xc3\n", 2),  # a truncated two-byte sequence at the end
    ("meta.json", b'{"n_users": 3,\n "n_items": 3, "name": "caf\xe9"}\n', 2),
    ("user_features.txt", b"1\n0\n\x80\n", 3),
    ("user_feature_names.txt", b"gr\xf6\xdfe\n", 1),
])
def test_non_utf8_file_names_file_and_line(tmp_path: Path, name: str, text: bytes, line: int) -> None:
    extra = {"user_features.txt": "1\n0\n1\n"} if name == "user_feature_names.txt" else {}
    folder = _folder(tmp_path / "toy", {**extra, name: text})
    for load in (lambda: load_split(folder, 3, 20), lambda: load_dataset(folder)):
        _message(load, rf"{re.escape(name)}, line {line}: byte 0x[0-9a-f]{{2}} \(column \d+\) is not UTF-8 text",
                 r"UTF-8 or ASCII")


def test_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "toy", {"x_train_3_20.txt": b"\xef\xbb\xbf0 0\n0 1\n1 2\n",
                                        "meta.json": b'\xef\xbb\xbf{"n_users": 3, "n_items": 3}'})
    np.testing.assert_array_equal(load_split(folder, 3, 20).x_train, [[0, 0], [0, 1], [1, 2]])


def test_non_utf8_original_files(tmp_path: Path) -> None:
    coat = tmp_path / "coat"
    coat.mkdir()
    rows = ["0 " * 299 + "0"] * 290
    (coat / "test.ascii").write_text("\n".join(rows) + "\n")
    (coat / "train.ascii").write_bytes(("\n".join(rows[:2]) + "\n").encode() + b"\xa0" + rows[2].encode() + b"\n")
    _message(lambda: load_dataset("coat", tmp_path, source="original"),
             r"train\.ascii, line 3: byte 0xa0 \(column 1\) is not UTF-8 text")
    yahoo = tmp_path / "yahoo-r3"
    yahoo.mkdir()
    (yahoo / "ydata-ymusic-rating-study-v1_0-train.txt").write_bytes(b"1\t1\t5\n2\t2\t\xb34\n")
    (yahoo / "ydata-ymusic-rating-study-v1_0-test.txt").write_text("1\t1\t5\n")
    _message(lambda: load_dataset("yahoo", tmp_path, source="original"),
             r"-train\.txt, line 2: byte 0xb3 \(column 5\) is not UTF-8 text")


def test_non_utf8_u_data(tmp_path: Path) -> None:
    path = tmp_path / "ml-100k" / "u.data"
    path.parent.mkdir()
    path.write_bytes(b"196\t242\t3\t881250949\n186\t302\t3\t89171\xe97742\n")
    _message(lambda: simulate.read_ml100k(tmp_path), r"u\.data, line 2: byte 0xe9 \(column 16\) is not UTF-8 text")


def test_non_utf8_coat_features(tmp_path: Path) -> None:
    _folder(tmp_path / "coat", {"user_item_features/user_features.ascii": "1 0\n0 1\n1 1\n",
                                "user_item_features/user_features_map.txt": b"a\n\xffb\n"})
    _message(lambda: load_dataset("coat", tmp_path), r"user_features_map\.txt, line 2: byte 0xff")


# --- 2. ids that imply a huge shape -----------------------------------------------------------

@pytest.mark.parametrize("meta", [None, {"n_users": 3, "n_items": 3}])
def test_id_beyond_int32(tmp_path: Path, meta: dict | None) -> None:
    extra = {} if meta is None else {"meta.json": json.dumps(meta)}
    folder = _folder(tmp_path / "toy", {"x_val_3_20.txt": f"{2**40} 0\n", **extra})
    _message(lambda: load_split(folder, 3, 20), r"x_val_3_20\.txt, line 1: id 1099511627776 in '1099511627776 0' "
             r"is above the largest supported id 2147483647", r"int32")


def test_id_beyond_int64(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "toy", {"x_train_3_20.txt": f"0 0\n0 {2**70}\n1 2\n"})
    _message(lambda: load_split(folder, 3, 20), r"x_train_3_20\.txt, line 2: 1180591620717411303424 is out of the "
             r"64-bit integer range")


def test_ids_implying_too_many_pairs(tmp_path: Path) -> None:
    # Each id fits int32, but the inferred 2**31 x 3 shape holds 3 * 2**31 pairs.
    folder = _folder(tmp_path / "toy", {"x_test_3_20.txt": f"2 1\n{2**31 - 1} 2\n"})
    _message(lambda: load_split(folder, 3, 20), r"x_test_3_20\.txt, line 2: user id 2147483647 makes the data set "
             r"2,147,483,648 x 3 = 6,442,450,944 user-item pairs", r"limit of 2,147,483,648 \(2\*\*31\) pairs",
             r"meta\.json")
    # The same ids with a meta.json that gives the shape: the folder declares its size.
    (folder / "meta.json").write_text(json.dumps({"n_users": 2**31, "n_items": 3}))
    d = _no_data_warning(lambda: load_split(folder, 3, 20))
    assert (d.n_users, d.n_items) == (2**31, 3)
    (folder / "meta.json").write_text(json.dumps({"n_users": 2**31 + 1, "n_items": 3}))
    _message(lambda: load_split(folder, 3, 20), r"meta\.json: expected an integer in 1\.\.2147483648 under 'n_users'")


def test_shape_limit_boundary(tmp_path: Path) -> None:
    # 3 items: 715,827,882 users give 2,147,483,646 pairs (allowed), one more user 2,147,483,649.
    folder = _folder(tmp_path / "toy", {"x_test_3_20.txt": "2 1\n715827881 1\n"})
    assert load_split(folder, 3, 20).n_pairs == 715_827_882 * 3
    (folder / "x_test_3_20.txt").write_text("2 1\n715827882 1\n")
    _message(lambda: load_split(folder, 3, 20), r"line 2: user id 715827882 makes the data set 715,827,883 x 3")


def test_yahoo_original_huge_ids(tmp_path: Path) -> None:
    yahoo = tmp_path / "yahoo-r3"
    yahoo.mkdir()
    (yahoo / "ydata-ymusic-rating-study-v1_0-test.txt").write_text("1\t1\t5\n1\t2\t1\n2\t2\t3\n")
    train = yahoo / "ydata-ymusic-rating-study-v1_0-train.txt"
    train.write_text(f"1\t3\t3\n{2**40}\t1\t2\n")
    _message(lambda: load_dataset("yahoo", tmp_path, source="original", val_fraction=0.34),
             r"-train\.txt, line 2: id 1099511627776 .* is above the largest supported id 2147483648")
    train.write_text(f"1\t3\t3\n1\t{2**31}\t2\n")
    _message(lambda: load_dataset("yahoo", tmp_path, source="original", val_fraction=0.34),
             r"-train\.txt, line 2: item id 2147483648 makes the data set 2 x 2,147,483,648")


# --- 3. a folder where a file belongs ---------------------------------------------------------

@pytest.mark.parametrize("name", ["x_train_3_20.txt", "y_test_3_20.txt", "meta.json", "user_features.txt",
                                  "item_feature_names.txt"])
def test_folder_in_place_of_a_file(tmp_path: Path, name: str) -> None:
    folder = _folder(tmp_path / "toy")
    (folder / name).unlink(missing_ok=True)
    (folder / name).mkdir()
    for load in (lambda: load_split(folder, 3, 20), lambda: load_dataset(folder)):
        _message(load, rf"toy/{re.escape(name)} is a folder, not a file", r"remove or rename the folder")


def test_folder_in_place_of_coat_original(tmp_path: Path) -> None:
    (tmp_path / "coat" / "train.ascii").mkdir(parents=True)
    _message(lambda: load_dataset("coat", tmp_path, source="original"),
             r"coat/train\.ascii is a folder, not a file; expected a file holding a row of the 290 x 300 rating")


# --- 4. repeated pairs ------------------------------------------------------------------------

def test_duplicates_and_overlaps_warn_once(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "toy", {
        "x_train_3_20.txt": "0 0\n0 1\n0 1\n1 2\n0 1\n", "y_train_3_20.txt": "1\n0\n0\n1\n0\n",
        "x_val_3_20.txt": "1 0\n1 2\n", "y_val_3_20.txt": "0\n1\n",
        "x_test_3_20.txt": "1 0\n0 2\n0 0\n", "y_test_3_20.txt": "0\n0\n1\n"})
    for load in (lambda: load_split(folder, 3, 20), lambda: load_dataset(folder)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            d = load()
        assert [w.category for w in caught] == [DataWarning]
        assert caught[0].filename == __file__  # attributed to the caller's line
        message = str(caught[0].message)
        assert message.startswith("toy: 2 repeated pairs within train (e.g. user 0, item 1); "
                                  "1 pair in both train and val (e.g. user 1, item 2); "
                                  "1 pair in both train and test (e.g. user 0, item 0); "
                                  "1 pair in both val and test (e.g. user 1, item 0): "), message
        assert d.repeated_pairs() == {"train": (2, (0, 1)), "train/val": (1, (1, 2)), "train/test": (1, (0, 0)),
                                      "val/test": (1, (1, 0))}
    assert issubclass(DataWarning, UserWarning)


def test_clean_folder_does_not_warn(tmp_path: Path) -> None:
    d = _no_data_warning(lambda: load_dataset(_folder(tmp_path / "toy")))
    assert d.repeated_pairs() == {}


def test_repeated_pairs_beyond_int64_keys() -> None:
    big = 2**40  # n_users * n_items = 2**80: keys are compared as rows
    d = CVRData("wide", big, big, np.array([[big - 1, big - 1], [0, 5], [big - 1, big - 1]]), np.array([1, 0, 1]),
                np.array([[0, 5]]), np.array([0]), np.array([[1, 1]]), np.array([1]))
    assert d.repeated_pairs() == {"train": (1, (big - 1, big - 1)), "train/val": (1, (0, 5))}


@pytest.mark.parametrize("name, source", [("yahoo", "split"), ("kuairec", "split"), ("yahoo", "original")])
def test_shipped_data_sets_without_repeated_pairs(data_dir: Path, name: str, source: str) -> None:
    d = _no_data_warning(lambda: load_dataset(name, data_dir, source=source))
    assert d.repeated_pairs() == {}


def test_coat_overlap_is_real_and_warned(data_dir: Path) -> None:
    """Expected: Coat's random (unbiased) ratings include pairs the user also rated of their own choice.

    Split files: 73 of the 928 validation and 293 of the 3,712 test pairs are training
    pairs too, with the same labels; no pair repeats within a part or between val and test.
    The original files, split by seed 0, give 76 and 290.
    """
    with pytest.warns(DataWarning, match=r"^coat: 73 pairs in both train and val \(e\.g\. user \d+, item \d+\); "
                                         r"293 pairs in both train and test \(e\.g\. user \d+, item \d+\): "):
        d = load_dataset("coat", data_dir)
    assert {k: count for k, (count, _) in d.repeated_pairs().items()} == {"train/val": 73, "train/test": 293}
    labels = {tuple(p): y for p, y in zip(d.x_train.tolist(), d.y_train.tolist())}
    for part in ("val", "test"):
        x, y = getattr(d, f"x_{part}"), getattr(d, f"y_{part}")
        assert all(labels[tuple(p)] == label for p, label in zip(x.tolist(), y.tolist()) if tuple(p) in labels)
    with pytest.warns(DataWarning, match=r"^coat: 76 pairs in both train and val .*; 290 pairs in both train"):
        load_dataset("coat", data_dir, source="original")


# --- 5. simulate: every flag checked before any work, degenerate settings refused ---------------

BAD_FLAGS = [
    (["--seed", "-1"], r"--seed must be an integer >= 0, got -1"),
    (["--truth-seed", "-2"], r"--truth-seed must be an integer >= 0, got -2"),
    (["--rank", "5000"], r"--rank must be an integer in 1\.\.50, got 5000: the matrix factorisation holds"),
    (["--rank", "0"], r"--rank must be an integer in 1\.\.50, got 0"),
    (["--val-pct", "100"], r"--val-pct must be an integer percentage in 1\.\.99"),
    (["--density", "1"], r"--density 1 makes every propensity 1 .*validation and test empty; give --density below 1"),
    (["--alpha", "1"], r"--alpha 1 makes every propensity 1 .*lower --alpha or --k below 1"),
    (["--density", "1e-300"], r"--density 1e-300 gives the train split an expected 0 pairs with label 0 .*: raise the "
                              r"propensities"),
    (["--density", "1e-6"], r"--density 1e-06 gives the train split an expected .* pairs with label 0"),
    (["--density", "0.99999"], r"--density 0\.99999 gives the val split an expected 1\.33 pairs with label 0 .*: "
                               r"lower the propensities"),
    (["--density", "0.9999", "--val-pct", "1"], r"--val-pct 1 gives the val split .*: raise --val-pct"),
    (["--alpha", "1e-100"], r"--alpha 1e-100 gives the train split an expected 0 pairs"),
    (["--marginals", "1", "0", "0", "0", "0"], r"--marginals 1 0 0 0 0 leave no rating >= 3, so every label would "
                                               r"be 0"),
    (["--marginals", "0", "0", "0", "0", "1"], r"--marginals 0 0 0 0 1 leave no rating below 3, so every label would "
                                               r"be 1"),
    (["--marginals", "0.9999", "0", "0", "0", "0.0001"], r"--marginals 0\.9999 0 0 0 0\.0001 gives the val split .* "
                                                         r"label 1 .*a larger share in --marginals"),
    (["--density", "nan"], r"--density must be in \(0, 1\], got nan"),
    (["--k", "0"], r"--k must be positive, got 0"),
    (["--alpha", "0.9", "--k", "2"], r"--k 2 with alpha = 0\.9 makes the largest propensity"),
]


def _api_kwargs(flags: list[str]) -> dict:
    """The ``simulate.generate`` keywords of CLI ``flags``."""
    names = {"--seed": ("seed", int), "--truth-seed": ("truth_seed", int), "--rank": ("rank", int),
             "--val-pct": ("val_pct", int), "--density": ("density", float), "--alpha": ("alpha", float),
             "--k": ("k", float)}
    kwargs: dict = {"source": "lowrank"}
    i = 0
    while i < len(flags):
        if flags[i] == "--marginals":
            kwargs["marginals"] = [float(v) for v in flags[i + 1:i + 6]]
            i += 6
        else:
            name, kind = names[flags[i]]
            kwargs[name] = kind(flags[i + 1])
            i += 2
    return kwargs


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch):
    """Make any start of the real work (reading ratings, matrix completion, drawing) fail the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the flags were checked")
    for module, name in ((protocol, "lowrank_ratings"), (protocol, "read_ml100k"), (protocol, "complete_ratings"),
                         (simulate_cli, "generate"), (simulate_cli, "write")):
        monkeypatch.setattr(module, name, forbidden)


@pytest.mark.parametrize("flags, pattern", BAD_FLAGS)
def test_cli_refuses_bad_flags_before_work(tmp_path: Path, capsys: pytest.CaptureFixture, no_work,
                                           flags: list[str], pattern: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        simulate_cli.main(["--source", "lowrank", *flags, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    last = captured.err.strip().splitlines()[-1]
    assert re.match(rf"python -m simulate: error: {pattern}", last), last
    assert not (tmp_path / "out").exists()
    # The Python API raises the same message, before any work too.
    _message(lambda: simulate.generate(**_api_kwargs(flags)), "^" + pattern)
    _message(lambda: simulate.check_settings(**_api_kwargs(flags)), "^" + pattern)


def test_cli_exit_status_in_a_real_process(tmp_path: Path) -> None:
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "simulate", "--source", "lowrank", "--seed", "-1", "--out",
                          str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines()[-1] == "python -m simulate: error: --seed must be an integer >= 0, got -1"
    assert time.perf_counter() - start < 20  # no matrix completion (interpreter start-up only)


def _truth(size: int = 60, seed: int = 0) -> simulate.Truth:
    """A small ground truth for fast draws."""
    scores = np.random.default_rng(seed).normal(size=(size, size))
    return simulate.Truth(simulate.quantize(scores), "lowrank", seed, 0.0, simulate.YAHOO_R3_MARGINALS)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"density": 1.0}, r"^--density 1 makes every propensity 1"),
    ({"alpha": 1.0}, r"^--alpha 1 makes every propensity 1"),
    ({"density": 1e-300}, r"^--density 1e-300 gives the train split an expected 0 pairs"),
    ({"alpha": 0.5, "seed": -1}, r"^--seed must be an integer >= 0, got -1"),
    ({"alpha": 0.5, "seed": True}, r"^--seed must be an integer >= 0, got True"),
    ({"alpha": 0.5, "val_pct": 1}, r"^--val-pct 1 gives the val split an expected .* pairs"),
])
def test_draw_refuses_degenerate_settings(kwargs: dict, pattern: str) -> None:
    _message(lambda: simulate.draw(_truth(), **kwargs), pattern)


def test_draw_refuses_one_class_truth() -> None:
    truth = _truth()
    one_class = simulate.Truth(np.ones_like(truth.ratings), "lowrank", 0, 0.0, truth.marginals)
    _message(lambda: simulate.draw(one_class, alpha=0.5), r"^the ratings leave no rating >= 3, so every label would "
                                                          r"be 0")


def test_ground_truth_checks_before_work(no_work) -> None:
    _message(lambda: simulate.ground_truth("lowrank", truth_seed=-1), r"^--truth-seed must be an integer >= 0")
    _message(lambda: simulate.ground_truth("lowrank", rank=51), r"^--rank must be an integer in 1\.\.50, got 51")
    _message(lambda: simulate.ground_truth("lowrank", marginals=(0, 0, 1, 0, 0)), r"^--marginals 0 0 1 0 0 leave no "
                                                                                  r"rating below 3")


def test_fine_settings_pass(no_work) -> None:
    # A constant propensity (alpha = 1, k < 1) is MCAR, not degenerate; the paper's settings pass.
    for kwargs in ({"alpha": 1.0, "k": 0.5}, {"density": 0.151}, {"alpha": 0.5}, {"density": 0.999},
                   {"density": 0.005}):
        simulate.check_settings("lowrank", **kwargs)
    sim = simulate.draw(_truth(), alpha=1.0, k=0.5, seed=3)
    assert np.all(sim.propensities == 0.5) and all(len(y) for _, y in sim.splits.values())


def test_unlucky_draw_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # With the expectation rule off, a 4-pair truth draws empty or one-class splits.
    monkeypatch.setattr(protocol, "MIN_EXPECTED", 0)
    _message(lambda: simulate.draw(_truth(size=2), alpha=0.5, seed=0), r"^--seed 0 drew a \w+ split with ")


# --- 6. simulate's output folder: whole or not at all -----------------------------------------

@pytest.fixture(scope="module")
def truth() -> simulate.Truth:
    return simulate.ground_truth("lowrank")


@pytest.fixture(scope="module")
def reference(truth: simulate.Truth, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The complete output folders of seeds 1 and 2 (density 0.15), written by the API."""
    root = tmp_path_factory.mktemp("reference")
    return {seed: simulate.write(simulate.draw(truth, density=0.15, seed=seed), root / f"seed{seed}")
            for seed in (1, 2)}


def _complete_copy_of(folder: Path, reference: dict[int, Path]) -> int:
    """The seed of the reference folder that ``folder`` equals byte for byte (every file, no other)."""
    names = {p.name for p in folder.iterdir()}
    assert names == OUTPUT_FILES, f"{folder} holds {sorted(names)}"
    seed = json.loads((folder / "meta.json").read_text())["seed"]
    assert json.loads((folder / "summary.json").read_text())["seed"] == seed
    for name in OUTPUT_FILES:
        assert (folder / name).read_bytes() == (reference[seed] / name).read_bytes(), f"{name} is not seed {seed}'s"
    return seed


def _tiny(seed: int = 0) -> simulate.Simulation:
    return simulate.draw(_truth(), alpha=0.5, seed=seed)


def test_write_refuses_a_non_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture, no_work) -> None:
    out = simulate.write(_tiny(0), tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _message(lambda: simulate.write(_tiny(1), out), rf"^--out {re.escape(str(out))} is not empty \(it holds "
             r"clicks\.npy, labels\.npy, meta\.json and \d+ more\): pass --overwrite to replace it")
    with pytest.raises(SystemExit) as exit_:
        simulate_cli.main(["--source", "lowrank", "--out", str(out)])
    assert exit_.value.code == 2 and "error: --out" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # overwrite=True replaces it; an empty or missing folder needs nothing.
    assert json.loads((simulate.write(_tiny(1), out, overwrite=True) / "meta.json").read_text())["seed"] == 1
    (tmp_path / "empty").mkdir()
    simulate.write(_tiny(1), tmp_path / "empty")
    simulate.write(_tiny(1), tmp_path / "new" / "deeper")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_overwrite_replaces_only_a_simulate_folder(tmp_path: Path) -> None:
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _message(lambda: simulate.write(_tiny(), out, overwrite=True), r"--out .*work holds 'notes\.txt', which python -m "
             r"simulate does not write: --overwrite replaces only a folder it wrote")
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    _message(lambda: simulate.write(_tiny(), tmp_path / "file", overwrite=True),
             r"--out .*file is a file, not a folder")
    _message(lambda: simulate.write(_tiny(), tmp_path / "file" / "sub"), r"--out .*: .*file is a file, not a folder")


def test_write_honours_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        out = simulate.write(_tiny(), tmp_path / "out")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o640}


def test_failed_write_leaves_no_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = simulate.write(_tiny(0), tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(writer.np, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        simulate.write(_tiny(1), out, overwrite=True)
    with pytest.raises(OSError, match="No space left"):
        simulate.write(_tiny(1), tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_writers_are_cleaned(tmp_path: Path) -> None:
    host, dead = writer._HOST, _dead_pid()
    stale_tmp = tmp_path / f".out.simulate-{host}-{dead}-abc.tmp"
    stale_del = tmp_path / f".out.simulate-{host}-{dead}-abc.del"
    live = tmp_path / f".out.simulate-{host}-{os.getpid()}-xyz.tmp"  # a running writer's: kept
    other_host = tmp_path / f".out.simulate-elsewhere{host}-{dead}-abc.tmp"  # another machine's: kept
    for folder in (stale_tmp, stale_del, live, other_host):
        (folder / "x_train_3_10.txt").parent.mkdir()
        (folder / "x_train_3_10.txt").write_text("0 0\n")
    simulate.write(_tiny(), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, other_host.name])


def test_recover_restores_the_old_folder_of_a_writer_killed_between_renames(tmp_path: Path) -> None:
    # Killed between "rename out aside" and "rename new in": out is absent, both folders complete.
    dead = _dead_pid()
    for seed, kind in ((0, "old"), (1, "tmp")):
        simulate.write(_tiny(seed), tmp_path / "staging" / kind).rename(
            tmp_path / f".out.simulate-{writer._HOST}-{dead}-abc.{kind}")
    (tmp_path / "staging").rmdir()
    writer.recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["seed"] == 0


@pytest.mark.parametrize("mode, delay", [("overwrite", 0.0), ("overwrite", None), ("new", None)])
def test_kill_during_write_leaves_a_whole_folder(tmp_path: Path, reference: dict[int, Path], mode: str,
                                                 delay: float | None) -> None:
    """SIGKILL ``python -m simulate`` while it writes: DIR is the old complete folder or the new one."""
    out = tmp_path / "sim"
    if mode == "overwrite":
        shutil.copytree(reference[1], out)
    delay = random.uniform(0.0, 1.2) if delay is None else delay  # the write takes about 1 s
    command = [sys.executable, "-m", "simulate", "--source", "lowrank", "--density", "0.15", "--seed", "2",
               "--out", str(out)] + (["--overwrite"] if mode == "overwrite" else [])
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Poll until the write has begun: the temporary sibling exists (or, for a missing DIR, DIR itself).
        deadline = time.monotonic() + 120
        while child.poll() is None and time.monotonic() < deadline:
            if any(name.startswith(".sim.") for name in os.listdir(tmp_path)) or (mode == "new" and out.exists()):
                break
            time.sleep(0.001)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
    finally:
        _, stderr = child.communicate()
    finished = child.returncode == 0
    assert finished or child.returncode == -signal.SIGKILL, stderr.decode()
    context = f"(delay {delay:.3f} s, {'finished' if finished else 'killed'})"
    if not out.exists() and mode == "overwrite":
        writer.recover(tmp_path)  # killed in the two-rename window: the old folder is put back
    if mode == "new" and not out.exists():
        assert not finished, context
    else:
        seed = _complete_copy_of(out, reference)
        assert seed == 2 or (not finished and mode == "overwrite"), context
    # The dead writer's temporary folder goes with the next write into the same parent.
    simulate.write(_tiny(), tmp_path / "other")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], context
