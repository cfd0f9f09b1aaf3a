"""Semi-synthetic CVR data with known propensities and a fully known label matrix.

The protocol of the BADR paper's Section 4.8 (Table 6), which follows MRDR's simulation
after Schnabel et al. (2016):

1. complete the 943 x 1682 ML-100K rating matrix by matrix factorisation fitted on its
   100,000 ratings (the held-out RMSE of a fit on 95 % of them is reported);
2. map the completed scores to ratings 1..5 by quantiles so that the rating shares equal
   those of Yahoo! R3's uniformly random test set, (0.5262, 0.2419, 0.1439, 0.0624, 0.0255);
3. propensities ``p = k * alpha ** min(6 - r, 4)``, conversion label ``y = 1[r >= 3]``;
4. clicks ``o ~ Bernoulli(p)``; train = clicked pairs with their labels, validation and
   test = 10 % / 90 % of the unclicked pairs.

Sources: ``ml100k`` (the default, as in the paper) reads ``<data root>/ml-100k/u.data``,
the data root being ``data_dir`` / ``--data-dir``, else ``$CVR_DATA_DIR``.  ``lowrank``
runs the same pipeline on 100,000 ratings drawn from a synthetic low-rank model of the
same shape; it needs no download and is the one to use for demos and tests.

Propensity settings: ``density`` (the mean propensity) alone solves alpha with k = 1;
``density`` with ``alpha`` solves k; ``density`` with ``k`` solves alpha; without
``density``, p uses ``alpha`` (default 0.5) and ``k`` (default 1) as given.  The paper's two
settings are ``alpha=0.5`` (p_min 0.0625, mean 0.094) and ``density=0.151`` (p_min 0.113).

Seeds: ``truth_seed`` fixes the ground truth (the MF held-out split and initialisation,
and the low-rank source); ``seed`` fixes the clicks and the validation/test split.  So
runs that differ only in ``seed`` are independent exposure draws over the same labels.

Every setting is checked before any work, and degenerate ones (one label only, every
propensity 1 or one of them 0, a split expecting fewer than 10 pairs of a label) are
refused: a ValueError naming the flag (:func:`check_settings`, and
:mod:`simulate.protocol` for the rule). ``write`` makes the output folder appear whole or
not at all and replaces a non-empty one only with ``overwrite=True`` (:mod:`simulate.writer`).

Python API::

    import simulate
    sim = simulate.generate("lowrank", density=0.15, seed=1)
    simulate.write(sim, "out/sim")          # the split files reproduce reads
    sim.summary["propensity_mean"]

Command line: ``python -m simulate --density 0.15 --out DIR`` (see ``--help``).

:mod:`simulate.ctcvr` (``python -m simulate ctcvr --exposures N --out DIR``) is the other
data set: a streamed, Ali-CCP style click / conversion log with the true click and
conversion probabilities of every exposure (the ESCM2 setting); ``simulate.ctcvr.load_ctcvr``
reads it.
"""
from simulate.completion import Factorisation, complete_ratings, fit_mf
from simulate.protocol import (
    MAX_RANK,
    MIN_EXPECTED,
    SOURCES,
    THRESHOLD,
    YAHOO_R3_MARGINALS,
    Simulation,
    Truth,
    check_settings,
    draw,
    generate,
    ground_truth,
    quantize,
    rating_counts,
    resolve_propensity,
)
from simulate.sources import (
    ML100K_URL,
    lowrank_ratings,
    read_ml100k,
    read_ratings,
    resolve_data_dir,
    yahoo_r3_marginals,
)
from simulate.writer import check_out, write

__all__ = [
    "MAX_RANK", "MIN_EXPECTED", "ML100K_URL", "SOURCES", "THRESHOLD", "YAHOO_R3_MARGINALS", "Factorisation",
    "Simulation", "Truth", "check_out", "check_settings", "complete_ratings", "draw", "fit_mf", "generate",
    "ground_truth", "lowrank_ratings", "quantize", "rating_counts", "read_ml100k", "read_ratings",
    "resolve_data_dir", "resolve_propensity", "write", "yahoo_r3_marginals",
]
