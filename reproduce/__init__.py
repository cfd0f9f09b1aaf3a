"""Reproduction of the BADR paper's experiments (Tables 3-6, Figures 1-4).

``python -m reproduce table4 | table5 | table6 | fig1 | fig2 | fig3 | fig4 | all`` plan, train
and render the paper's other results (:mod:`reproduce.experiments`, :mod:`reproduce.report`);
``python -m reproduce table3 ...`` trains the registered methods (:mod:`reproduce.methods`) with
the per-data-set configs (``reproduce/configs/*.json``, parsed by :mod:`reproduce.config`) on the
built-in data sets or any split-format folder and writes ``results.csv``, ``history.csv`` and
``table3.md``; ``python -m reproduce tune METHOD DATASET --trials N`` tunes a method on the
validation split and writes the chosen values into its config.  ``python -m reproduce escm2 ...``
runs the ESCM2 paper's Tables II, III, VI and Figures 6, 7 on a simulated click / conversion log
with known truth (:mod:`reproduce.escm2`).
"""
from .config import Config, DataSource, load_config
from .methods import METHODS, TABLE3_ROWS, Method, register_method
from .metrics import auc, ndcg_recall_at_k, ranking_at_k

__all__ = ["Config", "DataSource", "load_config", "METHODS", "TABLE3_ROWS", "Method", "register_method", "auc",
           "ndcg_recall_at_k", "ranking_at_k"]
