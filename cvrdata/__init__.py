"""The CVR data sets as numpy arrays: built-in ones (Coat, Yahoo! R3, KuaiRec) and any split-format folder.

- :func:`load_dataset` loads a built-in data set by name from the data directory
  (:func:`resolve_data_dir`: ``data_dir`` / ``--data-dir``, else ``$CVR_DATA_DIR``), in the
  authors' processed ``split`` format or from the ``original`` rating files, or a folder in
  the split format by path (e.g. the output of ``python -m simulate --out DIR``).
- :func:`load_split` reads one split ``{x,y}_{train,val,test}_{T}_{V}.txt`` of a folder.
- :class:`CVRData` holds the result: training (biased, clicked) and validation / test
  (unbiased) pairs and labels, the shape, optional side features; ``subsample`` and
  ``fingerprint`` serve the sparsity studies and run signatures.
- :class:`DataWarning` (a ``UserWarning``): issued once per load when a pair repeats within
  a part or appears in two parts (``CVRData.repeated_pairs`` lists them).

Modules: ``builtin`` (the table of built-in data sets), ``splits`` (the split format),
``original`` (Coat's and Yahoo! R3's rating files), ``features`` (side-feature files),
``formats`` (text-file parsing with errors naming file and line), ``dataset`` (``CVRData``),
``datadir`` (the data directory), ``checks`` (argument checks). Every problem is a
``ValueError`` naming the argument, file (and line) or key, and what was expected: files
that are not UTF-8 text, folders in place of files, ids above ``2**31 - 1`` or implying
more than ``2**31`` user-item pairs (see :mod:`cvrdata.splits`) included.
"""
from cvrdata.builtin import BUILTINS, DATASETS, Builtin
from cvrdata.datadir import ENV_VAR, resolve_data_dir
from cvrdata.dataset import CVRData, DataWarning
from cvrdata.features import GENERIC, FeatureFiles
from cvrdata.load import SOURCES, load_dataset
from cvrdata.splits import load_split, split_combinations

__all__ = [
    "BUILTINS", "DATASETS", "ENV_VAR", "GENERIC", "SOURCES", "Builtin", "CVRData", "DataWarning", "FeatureFiles",
    "load_dataset", "load_split", "resolve_data_dir", "split_combinations",
]
