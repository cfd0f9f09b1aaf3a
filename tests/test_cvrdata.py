"""Tests of ``cvrdata``'s folder loading, side features, ``CVRData.subsample`` and
``CVRData.fingerprint`` (the reference data and the split format's basics: test_data.py)."""
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import simulate
from cvrdata import DATASETS, CVRData, load_dataset, load_split, split_combinations

# Coat's train / val / test overlap is real and warned on every load (tests/test_faults_data.py::
# test_coat_overlap_is_real_and_warned); here it is noise.
pytestmark = pytest.mark.filterwarnings(r"ignore:coat. \d+ pairs in both train:cvrdata.DataWarning")

SMALL = {
    "x_train_3_20.txt": "0 0\n0 1\n1 2\n",
    "y_train_3_20.txt": "1\n0\n1\n",
    "x_val_3_20.txt": "1 0\n",
    "y_val_3_20.txt": "0\n",
    "x_test_3_20.txt": "2 1\n0 2\n",
    "y_test_3_20.txt": "1\n0\n",
}


def _folder(path: Path, files: dict[str, str] = SMALL, suffix: str = "3_20", **extra: str) -> Path:
    """Write ``files`` (their ``3_20`` renamed to ``suffix``) and ``extra`` (``name=text``) into ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    for file, text in files.items():
        (path / file.replace("3_20", suffix)).write_text(text)
    for file, text in extra.items():
        (path / file).write_text(text)
    return path


def _message(call, *patterns: str) -> str:
    """Run ``call`` and check its ValueError message contains every regex pattern."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    return message


def _same(a: CVRData, b: CVRData) -> None:
    assert (a.name, a.n_users, a.n_items) == (b.name, b.n_users, b.n_items)
    for field in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test", "user_features", "item_features"):
        left, right = getattr(a, field), getattr(b, field)
        assert (left is None) == (right is None), field
        if left is not None:
            np.testing.assert_array_equal(left, right, err_msg=field)
    assert (a.user_feature_names, a.item_feature_names) == (b.user_feature_names, b.item_feature_names)


# --- load_dataset on a folder ---------------------------------------------------------------

@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate.write(simulate.generate("lowrank", density=0.15, seed=1), tmp_path_factory.mktemp("s") / "sim")


def test_simulated_folder(sim: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # data_dir is not needed for a path: no CVR_DATA_DIR either.
    monkeypatch.delenv("CVR_DATA_DIR", raising=False)
    meta = json.loads((sim / "meta.json").read_text())
    d = load_dataset(sim)
    assert (d.name, d.n_users, d.n_items) == ("sim", meta["n_users"], meta["n_items"])
    _same(d, load_split(sim, meta["threshold"], meta["val_pct"]))
    _same(load_dataset(str(sim)), d)
    assert d.user_features is None and d.item_features is None
    assert len(d.x_train) == int((sim / "x_train_3_10.txt").read_text().count("\n"))


def test_folder_single_split_and_basename(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "toy", suffix="4_30")
    d = load_dataset(folder)
    assert (d.name, d.n_users, d.n_items) == ("toy", 3, 3)
    np.testing.assert_array_equal(d.x_test, [[2, 1], [0, 2]])
    _same(d, load_split(folder, 4, 30))
    # Arguments that agree with the only split are fine too.
    _same(load_dataset(folder, threshold=4, val_fraction=0.3), d)


def test_folder_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _folder(tmp_path / "toy")
    monkeypatch.chdir(tmp_path)
    assert load_dataset("toy").name == "toy"
    monkeypatch.chdir(tmp_path / "toy")
    assert load_dataset(".").name == "toy"


def test_folder_arguments_pick_among_several(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "toy")
    _folder(folder, {**SMALL, "y_train_3_20.txt": "0\n0\n0\n"}, suffix="4_20")
    _folder(folder, suffix="4_10")
    assert split_combinations(folder) == [(3, 20), (4, 10), (4, 20)]
    assert load_dataset(folder, threshold=3).y_train.tolist() == [1, 0, 1]
    assert load_dataset(folder, threshold=4, val_fraction=0.2).y_train.tolist() == [0, 0, 0]
    _message(lambda: load_dataset(folder), r"toy holds 3 splits: it has threshold=3 val_pct=20, "
             r"threshold=4 val_pct=10, threshold=4 val_pct=20; choose one with threshold= and val_fraction=")
    _message(lambda: load_dataset(folder, threshold=4), r"holds 2 splits with threshold=4")
    _message(lambda: load_dataset(folder, val_fraction=0.3), r"holds no split with val_pct=30: it has threshold=3")


def test_folder_meta_picks_split_and_name(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "toy")
    _folder(folder, {**SMALL, "y_train_3_20.txt": "0\n0\n0\n"}, suffix="4_20")
    (folder / "meta.json").write_text(json.dumps({"n_users": 4, "n_items": 3, "threshold": 4, "val_pct": 20,
                                                  "name": "my toy"}))
    d = load_dataset(folder)
    assert (d.name, d.n_users, d.y_train.tolist()) == ("my toy", 4, [0, 0, 0])
    # Arguments win over meta.json; load_split takes meta.json's name too.
    assert load_dataset(folder, threshold=3).y_train.tolist() == [1, 0, 1]
    assert load_split(folder, 3, 20).name == "my toy"
    assert load_split(folder, 3, 20, name="x").name == "x"
    # meta.json's split must exist.
    (folder / "meta.json").write_text(json.dumps({"n_users": 4, "n_items": 3, "threshold": 5, "val_pct": 20}))
    _message(lambda: load_dataset(folder), r"missing x_train_5_20\.txt", r"threshold=3 val_pct=20")


def test_folder_meta_without_split_keys_falls_to_files(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "toy", **{"meta.json": json.dumps({"n_users": 4, "n_items": 3})})
    d = load_dataset(folder)
    assert (d.n_users, d.name, d.y_train.tolist()) == (4, "toy", [1, 0, 1])


@pytest.mark.parametrize("meta, pattern", [
    ({"threshold": -1}, r"integer >= 0 under 'threshold'; got -1"),
    ({"threshold": 2.5}, r"'threshold'; got 2\.5"),
    ({"val_pct": 100}, r"integer in 1\.\.99 under 'val_pct'; got 100"),
    ({"val_pct": "10"}, r"'val_pct'; got '10'"),
    ({"name": ""}, r"non-empty string under 'name'; got ''"),
    ({"name": 3}, r"'name'; got 3"),
])
def test_meta_json_bad_optional_keys(tmp_path: Path, meta: dict, pattern: str) -> None:
    folder = _folder(tmp_path / "toy")
    (folder / "meta.json").write_text(json.dumps({"n_users": 3, "n_items": 3, **meta}))
    _message(lambda: load_dataset(folder), r"meta\.json", pattern)
    _message(lambda: load_split(folder, 3, 20), r"meta\.json", pattern)


def test_meta_json_not_an_object(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "toy", **{"meta.json": "[3, 3]"})
    _message(lambda: load_split(folder, 3, 20), r"meta\.json: expected a JSON object with 'n_users'.*got a list")


def test_folder_without_splits(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert split_combinations(tmp_path / "empty") == []
    _message(lambda: split_combinations(tmp_path / "nope"), r"folder .*nope does not exist")
    _message(lambda: load_dataset(tmp_path / "empty"), r"empty holds no split files",
             re.escape("{x,y}_{train,val,test}_{T}_{V}.txt"))


def test_builtin_name_wins_over_folder(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _folder(tmp_path / "coat")
    monkeypatch.chdir(tmp_path)
    assert len(load_dataset("coat", data_dir).x_train) == 6_960
    # A path object is always a path.
    assert len(load_dataset(Path("coat"), data_dir).x_train) == 3


@pytest.mark.parametrize("name, pattern", [
    ("nope", r"unknown dataset '.*nope'; expected one of coat, yahoo, kuairec or the path of a folder in the "
             r"split format.*nope is neither a built-in name nor an existing folder"),
    ("", r"unknown dataset ''; expected one of coat, yahoo, kuairec or the path of a folder"),
    ("file.txt", r"file\.txt is neither a built-in name nor an existing folder"),
    (None, r"dataset must be a name or a path; got None; expected one of coat, yahoo, kuairec"),
    (3, r"got 3"),
])
def test_unknown_dataset(tmp_path: Path, name: object, pattern: str) -> None:
    (tmp_path / "file.txt").write_text("0 0\n")
    if name in ("nope", "file.txt"):
        name = str(tmp_path / name)
    _message(lambda: load_dataset(name), pattern)
    if isinstance(name, str) and name:
        _message(lambda: load_dataset(Path(name)), pattern)


def test_folder_source_original(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "toy")
    _message(lambda: load_dataset(folder, source="original"),
             r"source='original' exists only for the built-in data sets coat, yahoo; the folder .*toy is read "
             r"in the split format: use source='split'")


@pytest.mark.parametrize("seed", [-1, 1.5, None, True])
def test_load_dataset_bad_seed(tmp_path: Path, seed: object) -> None:
    # Checked before the disk is touched: tmp_path holds no data.
    _message(lambda: load_dataset("coat", tmp_path, source="original", seed=seed),
             rf"seed must be an integer >= 0; got {re.escape(repr(seed))}")


# --- side features --------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["split", "original"])
def test_coat_features(data_dir: Path, source: str) -> None:
    d = load_dataset("coat", data_dir, source=source)
    root = data_dir / "coat" / "user_item_features"
    for side, n_rows, d_side in (("user", 290, 14), ("item", 300, 33)):
        features = getattr(d, f"{side}_features")
        assert features.shape == (n_rows, d_side) and features.dtype == np.float32
        np.testing.assert_array_equal(features, np.loadtxt(root / f"{side}_features.ascii"))
        # One-hot per attribute: 4 attributes (users: gender, age, location, interest;
        # items: gender, type, colour, on front page) give 4 ones per row.
        assert set(np.unique(features)) == {0.0, 1.0} and (features.sum(axis=1) == 4).all()
        names = getattr(d, f"{side}_feature_names")
        assert len(names) == d_side and names[:2] == ("gender:men", "gender:women")
    assert d.user_feature_names[-1] == "fashioninterest:very" and d.item_feature_names[-1] == "onfrontpage:no"


def test_no_features_elsewhere(data_dir: Path) -> None:
    d = load_dataset("kuairec", data_dir)
    assert d.user_features is d.item_features is d.user_feature_names is None


def test_generic_features(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "toy", **{
        "user_features.txt": "1 0.5\n0 2\n-1 3e2\n", "item_features.txt": "1\n2\n3\n4\n",
        "user_feature_names.txt": "a\nb\n", "meta.json": json.dumps({"n_users": 3, "n_items": 4})})
    for d in (load_split(folder, 3, 20), load_dataset(folder)):
        assert d.user_features.dtype == d.item_features.dtype == np.float32
        np.testing.assert_array_equal(d.user_features, [[1, 0.5], [0, 2], [-1, 300]])
        np.testing.assert_array_equal(d.item_features, [[1], [2], [3], [4]])
        assert (d.user_feature_names, d.item_feature_names) == (("a", "b"), None)
    (folder / "user_features.txt").unlink()
    (folder / "user_feature_names.txt").unlink()
    d = load_dataset(folder)
    assert d.user_features is None and d.item_features.shape == (4, 1)


@pytest.mark.parametrize("files, patterns", [
    ({"user_features.txt": "1 0\n0 1 1\n1 1\n"},
     [r"user_features\.txt, line 2: expected one whitespace-separated row of numbers per user",
      r"2 fields, as on line 1\), found 3 fields"]),
    ({"item_features.txt": "1\n\n2\n"}, [r"item_features\.txt, line 2", r"found 0 fields"]),
    ({"user_features.txt": "1 0\n0 x\n1 1\n"}, [r"user_features\.txt, line 2: 'x' is not a number"]),
    ({"user_features.txt": "1 0\n0 1\n1 nan\n"},
     [r"user_features\.txt, line 3: features must be finite numbers; found nan"]),
    ({"item_features.txt": "1\n-inf\n2\n"}, [r"item_features\.txt, line 2: .*finite numbers; found -inf"]),
    ({"user_features.txt": ""}, [r"user_features\.txt is empty"]),
    ({"user_features.txt": "1\n0\n"},
     [r"user_features\.txt has 2 rows; expected 3, one per user", r"no meta\.json", r"n_users"]),
    ({"item_features.txt": "1\n0\n1\n1\n"}, [r"item_features\.txt has 4 rows; expected 3, one per item"]),
    ({"user_feature_names.txt": "a\n"}, [r"user_feature_names\.txt names user features but user_features\.txt "
                                         r"is missing in .*toy; add it or remove user_feature_names\.txt"]),
    ({"user_features.txt": "1\n0\n1\n", "user_feature_names.txt": "a\nb\n"},
     [r"user_feature_names\.txt names 2 features but user_features\.txt has 1 columns"]),
    ({"item_features.txt": "1 2\n0 2\n1 2\n", "item_feature_names.txt": "a\n\n"},
     [r"item_feature_names\.txt, line 2: empty feature name"]),
])
def test_generic_features_malformed(tmp_path: Path, files: dict[str, str], patterns: list[str]) -> None:
    folder = _folder(tmp_path / "toy", **files)
    _message(lambda: load_dataset(folder), *patterns)


def test_features_row_count_with_meta(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "toy", **{"user_features.txt": "1\n0\n1\n",
                                          "meta.json": json.dumps({"n_users": 5, "n_items": 3})})
    _message(lambda: load_split(folder, 3, 20), r"user_features\.txt has 3 rows; expected 5, one per user",
             r"as .*meta\.json gives")


def test_coat_features_checked(tmp_path: Path) -> None:
    folder = tmp_path / "coat"
    _folder(folder)
    _folder(folder / "user_item_features", **{"user_features.ascii": "1 0\n" * 3,
                                              "user_features_map.txt": "a\nb\nc\n"})
    _message(lambda: load_dataset("coat", tmp_path), r"user_features_map\.txt names 3 features but "
                                                     r"user_features\.ascii has 2 columns")
    (folder / "user_item_features" / "user_features_map.txt").write_text("a\nb")
    d = load_dataset("coat", tmp_path)
    assert d.user_features.shape == (3, 2) and d.user_feature_names == ("a", "b") and d.item_features is None


# --- CVRData features -----------------------------------------------------------------------

def _data(**replace: object) -> CVRData:
    fields = dict(name="toy", n_users=3, n_items=2, x_train=np.array([[0, 1], [2, 0]]), y_train=np.array([1, 0]),
                  x_val=np.array([[1, 0]]), y_val=np.array([0]), x_test=np.array([[1, 1]]), y_test=np.array([1]))
    fields.update(replace)
    return CVRData(**fields)


def test_cvrdata_features_normalised() -> None:
    d = _data(user_features=np.arange(6).reshape(3, 2), item_features=[[0.5], [1.5]],
              item_feature_names=["w"])
    assert d.user_features.dtype == d.item_features.dtype == np.float32
    np.testing.assert_array_equal(d.item_features, [[0.5], [1.5]])
    assert d.item_feature_names == ("w",)


@pytest.mark.parametrize("replace, pattern", [
    ({"user_features": np.zeros(3)}, r"toy: user_features must be a 2-D \(n_users, d\) numeric array.*shape \(3,\)"),
    ({"item_features": np.zeros((2, 0))}, r"item_features must be a 2-D .*d >= 1.*shape \(2, 0\)"),
    ({"user_features": np.array([["a"], ["b"], ["c"]])}, r"user_features must be a 2-D .*numeric"),
    ({"user_features": np.ones((3, 1), dtype=bool)}, r"user_features must be a 2-D .*dtype bool"),
    ({"user_features": np.zeros((2, 4))}, r"user_features has 2 rows; expected n_users = 3"),
    ({"item_features": np.zeros((3, 4))}, r"item_features has 3 rows; expected n_items = 2"),
    ({"item_features": np.array([[0.0], [np.inf]])}, r"item_features must be finite; row 1 \(item id 1\)"),
    ({"user_features": np.array([[0.0], [0.0], [np.nan]])}, r"user_features must be finite; row 2"),
    ({"user_feature_names": ("a",)}, r"user_feature_names given without user_features"),
    ({"item_features": np.zeros((2, 2)), "item_feature_names": ("a",)},
     r"item_feature_names has 1 names but item_features has 2 columns"),
    ({"item_features": np.zeros((2, 1)), "item_feature_names": "a"}, r"item_feature_names must be a tuple or list"),
    ({"item_features": np.zeros((2, 1)), "item_feature_names": ("",)}, r"item_feature_names must be .*non-empty"),
    ({"item_features": np.zeros((2, 1)), "item_feature_names": (1,)}, r"item_feature_names must be .*strings"),
])
def test_cvrdata_rejects_features(replace: dict, pattern: str) -> None:
    _message(lambda: _data(**replace), pattern)


# --- subsample ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big() -> CVRData:
    rng = np.random.default_rng(0)
    flat = rng.choice(50 * 40, size=500, replace=False)  # distinct pairs, so rows can be traced
    return CVRData("big", 50, 40, np.column_stack([flat // 40, flat % 40]), rng.integers(0, 2, 500),
                   np.array([[0, 0], [1, 1]]), np.array([0, 1]), np.array([[2, 2]]), np.array([1]),
                   user_features=rng.normal(size=(50, 3)))


@pytest.mark.parametrize("fraction, expected", [(0.1, 50), (0.333, 166), (0.001, 1), (1e-9, 1), (0.999, 500)])
def test_subsample(big: CVRData, fraction: float, expected: int) -> None:
    s = big.subsample(fraction, seed=3)
    assert len(s.x_train) == len(s.y_train) == expected
    # The kept rows are original rows with their own labels, in file order.
    position = {tuple(p): i for i, p in enumerate(big.x_train.tolist())}
    rows = np.array([position[tuple(p)] for p in s.x_train.tolist()])
    assert (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(s.y_train, big.y_train[rows])
    # Pinned: the draw of the sparsity studies; changing it changes every subsampled run.
    np.testing.assert_array_equal(rows, np.sort(np.random.default_rng(3).choice(500, expected, replace=False)))
    # Everything else is unchanged.
    assert (s.name, s.n_users, s.n_items) == (big.name, big.n_users, big.n_items)
    for field in ("x_val", "y_val", "x_test", "y_test", "user_features"):
        np.testing.assert_array_equal(getattr(s, field), getattr(big, field))
    assert s.item_features is None


@pytest.mark.parametrize("n, expected", [(5, 2), (7, 4)])
def test_subsample_rounds_half_to_even(n: int, expected: int) -> None:
    # round() as Python rounds: 2.5 -> 2, 3.5 -> 4.
    d = _data(n_users=n, n_items=1, x_train=np.column_stack([np.arange(n), np.zeros(n, dtype=int)]),
              y_train=np.ones(n), x_val=np.array([[0, 0]]), x_test=np.array([[0, 0]]))
    assert len(d.subsample(0.5, 0).x_train) == expected


def test_subsample_deterministic(big: CVRData) -> None:
    a, b, c = big.subsample(0.3, 11), big.subsample(0.3, 11), big.subsample(0.3, 12)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert not np.array_equal(a.x_train, c.x_train)


def test_subsample_whole(big: CVRData) -> None:
    s = big.subsample(1, seed=5)
    _same(s, big)
    assert s.fingerprint() == big.subsample(1.0, seed=6).fingerprint() == big.fingerprint()


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.0001, 2, float("nan"), float("inf"), True, "0.5", None])
def test_subsample_bad_fraction(big: CVRData, fraction: object) -> None:
    _message(lambda: big.subsample(fraction, 0),
             rf"fraction must be a number in \(0, 1\]; got {re.escape(repr(fraction))}")


@pytest.mark.parametrize("seed", [-1, 0.5, None, "1"])
def test_subsample_bad_seed(big: CVRData, seed: object) -> None:
    _message(lambda: big.subsample(0.5, seed), rf"seed must be an integer >= 0; got {re.escape(repr(seed))}")


def test_subsample_no_training_pairs() -> None:
    d = _data(x_train=np.zeros((0, 2), dtype=int), y_train=np.zeros(0))
    _message(lambda: d.subsample(0.5, 0), r"toy: there are no training pairs to subsample")


# --- fingerprint ----------------------------------------------------------------------------

def test_fingerprint_equal_data() -> None:
    a = _data(user_features=np.eye(3, 2))
    f = a.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", f)
    # Equal data: other input dtypes, another name, -0.0 for 0.0, feature names.
    b = _data(name="other", x_train=np.array([[0, 1], [2, 0]], dtype=np.int32), y_train=np.array([1.0, -0.0]),
              user_features=np.eye(3, 2, dtype=np.int64), user_feature_names=("a", "b"))
    assert b.fingerprint() == f
    assert _data(user_features=np.where(np.eye(3, 2) == 0, -0.0, 1.0)).fingerprint() == f


def test_fingerprint_loaded_data(data_dir: Path, sim: Path) -> None:
    assert load_dataset("coat", data_dir).fingerprint() == load_dataset("coat", data_dir).fingerprint()
    assert load_dataset(sim).fingerprint() == load_split(sim, 3, 10, name="x").fingerprint()
    # Coat's side features are part of what is hashed.
    coat = load_dataset("coat", data_dir)
    assert replace(coat, user_features=None, user_feature_names=None).fingerprint() != coat.fingerprint()


@pytest.mark.parametrize("replace", [
    {"n_users": 4},
    {"n_items": 3},
    {"x_train": np.array([[0, 1], [2, 1]])},
    {"x_train": np.array([[2, 0], [0, 1]]), "y_train": np.array([0, 1])},  # the same pairs in another order
    {"y_train": np.array([1, 1])},
    {"x_train": np.array([[0, 1]]), "y_train": np.array([1])},
    {"x_val": np.array([[1, 1]])},
    {"y_val": np.array([1])},
    {"x_test": np.array([[0, 1]])},
    {"y_test": np.array([0])},
    # A pair moved from validation to test.
    {"x_val": np.zeros((0, 2), dtype=int), "y_val": np.zeros(0), "x_test": np.array([[1, 0], [1, 1]]),
     "y_test": np.array([0, 1])},
    {"user_features": np.eye(3, 2)},
    {"item_features": np.eye(2, 3)},
])
def test_fingerprint_any_change(replace: dict) -> None:
    assert _data(**replace).fingerprint() != _data().fingerprint()


def test_fingerprint_feature_changes() -> None:
    base = _data(user_features=np.eye(3, 2)).fingerprint()
    changed = [_data(user_features=np.eye(3, 2) + np.array([[0, 1e-6], [0, 0], [0, 0]])),
               _data(user_features=np.eye(3, 4)),
               _data(user_features=np.eye(3, 2)[::-1]),
               _data(item_features=np.eye(2, 3)),  # user features absent
               _data(user_features=np.eye(3, 2), item_features=np.zeros((2, 1)))]
    prints = {base, *(d.fingerprint() for d in changed)}
    assert len(prints) == 1 + len(changed)
    # The same bytes as user vs item features, or reshaped, are other data.
    flat = np.arange(6.0)
    assert len({_data(user_features=flat.reshape(3, 2)).fingerprint(),
                _data(item_features=flat.reshape(2, 3)).fingerprint(),
                _data(user_features=flat.reshape(3, 2), item_features=np.zeros((2, 1))).fingerprint()}) == 3
    # The same 13 numbers split 3 + 10 or 9 + 4 between user and item features.
    blob = np.arange(13.0)
    assert _data(user_features=blob[:3].reshape(3, 1), item_features=blob[3:].reshape(2, 5)).fingerprint() != \
        _data(user_features=blob[:9].reshape(3, 3), item_features=blob[9:].reshape(2, 2)).fingerprint()


def test_datasets_constant() -> None:
    assert DATASETS == ("coat", "yahoo", "kuairec")
