"""Reproduction of the BADR paper's experiments (Table 3, Figure 1 ablations).

``python -m reproduce table3 ...`` trains the registered methods (:mod:`reproduce.methods`) with
the per-data-set configs (``reproduce/configs/*.json``, parsed by :mod:`reproduce.config`) on the
built-in data sets or any split-format folder and writes ``results.csv``, ``history.csv`` and
``table3.md``; ``python -m reproduce tune METHOD DATASET --trials N`` tunes a method on the
validation split and writes the chosen values into its config.
"""
from .config import Config, DataSource, load_config
from .methods import METHODS, TABLE3_ROWS, Method, register_method
from .metrics import auc, ndcg_recall_at_k

__all__ = ["Config", "DataSource", "load_config", "METHODS", "TABLE3_ROWS", "Method", "register_method", "auc",
           "ndcg_recall_at_k"]
