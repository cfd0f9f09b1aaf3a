"""``load_dataset``: a built-in data set by name, or any split-format folder by path."""
from __future__ import annotations

import os
from pathlib import Path

from cvrdata.builtin import BUILTINS, DATASETS, load_builtin
from cvrdata.checks import as_percent, check_fraction, check_int
from cvrdata.dataset import CVRData
from cvrdata.splits import load_folder

SOURCES: tuple[str, ...] = ("split", "original")


def load_dataset(
    name: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    *,
    source: str = "split",
    threshold: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
) -> CVRData:
    """Load a built-in data set (``name`` in :data:`DATASETS`) or the split-format folder at path ``name``.

    Built-in (a string equal to a built-in name, even if a folder of that name exists), read
    from ``data_dir`` or ``$CVR_DATA_DIR``: ``source="split"`` reads the authors' processed
    splits (default ``T/V``: coat 3/20, yahoo 3/10, kuairec 2/10); ``threshold`` and
    ``val_fraction`` (e.g. 0.2 -> ``V = 20``) select the files. ``source="original"`` reads
    Coat's and Yahoo! R3's raw ratings, labels ``rating >= threshold`` (default 3) as a
    conversion and splits the unbiased data into validation (``val_fraction``, default 0.2
    coat / 0.1 yahoo) and test with the permutation ``numpy.random.default_rng(seed)``.
    KuaiRec exists only in split format. Coat comes with its user and item features.

    Path (any other string, or an ``os.PathLike``; relative to the working directory,
    ``data_dir`` unused): a folder in the split format (see :func:`cvrdata.load_split`),
    ``source="split"`` only. ``threshold`` / ``val_fraction`` default to ``meta.json``'s
    ``"threshold"`` / ``"val_pct"``, else to the folder's only split. The name is
    ``meta.json``'s ``"name"``, else the folder's name.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    if val_fraction is not None:
        check_fraction(val_fraction, "val_fraction")
    check_int(seed, "seed", low=0)
    spec = BUILTINS.get(name) if isinstance(name, str) else None
    if spec is not None:
        return load_builtin(spec, data_dir, source, threshold, val_fraction, seed)

    folder = _folder(name)
    if source != "split":
        with_original = ", ".join(n for n, b in BUILTINS.items() if b.original is not None)
        raise ValueError(f"source={source!r} exists only for the built-in data sets {with_original}; "
                         f"the folder {folder} is read in the split format: use source='split'")
    return load_folder(folder, threshold, None if val_fraction is None else as_percent(val_fraction))


def _folder(name: object) -> Path:
    """``name`` as the path of an existing folder, or the ValueError for an unknown data set."""
    expected = (f"expected one of {', '.join(DATASETS)} or the path of a folder in the split format "
                "({x,y}_{train,val,test}_{T}_{V}.txt, see cvrdata.load_split)")
    if not isinstance(name, (str, os.PathLike)):
        raise ValueError(f"dataset must be a name or a path; got {name!r}; {expected}")
    path = Path(name).expanduser()
    # Path("") is the working directory: an empty name is a mistake, not a request for it.
    if not os.fspath(name):
        raise ValueError(f"unknown dataset ''; {expected}")
    if not path.is_dir():
        raise ValueError(f"unknown dataset {os.fspath(name)!r}; {expected}; {path} is neither a built-in "
                         "name nor an existing folder")
    return path
