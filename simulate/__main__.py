"""``python -m simulate``: build the BADR paper's Section 4.8 semi-synthetic data set.

``python -m simulate ctcvr --exposures N --out DIR`` (the first argument ``ctcvr``) builds
instead the semi-synthetic click / conversion log of :mod:`simulate.ctcvr` (the ESCM2
setting, Ali-CCP style, with the true click and conversion probabilities of every
exposure); ``python -m simulate ctcvr --help`` lists its flags. Any other first argument is
the BADR command, whose flags and outputs are unchanged.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

from simulate import ctcvr
from simulate.protocol import MAX_RANK, MIN_EXPECTED, SOURCES, YAHOO_R3_MARGINALS, check_settings, generate
from simulate.sources import ML100K_URL, yahoo_r3_marginals
from simulate.writer import check_out, write

EPILOG = f"""\
propensities p = k * alpha^min(6 - r, 4), label y = 1[r >= 3]. Give at most two of
--density (mean propensity), --alpha and --k:
  --density D            k = 1, alpha solved        (paper, Table 6 right: --density 0.151)
  --alpha A              k = 1, density follows     (paper, Table 6 left:  --alpha 0.5)
  --density D --alpha A  k solved
  --density D --k K      alpha solved
  --alpha A --k K        density follows
  (none)                 alpha = 0.5, k = 1

sources: ml100k (default, as in the paper) reads DATA_ROOT/ml-100k/u.data, DATA_ROOT being
--data-dir or $CVR_DATA_DIR; ML-100K is published by GroupLens at {ML100K_URL}.
lowrank runs the same pipeline on a synthetic low-rank matrix of the same shape and
needs no download: use it for demos and tests.

--seed draws the clicks and the val/test split; --truth-seed the ground truth (MF split
and initialisation, low-rank source), so different --seed values are independent
exposure draws over the same labels.

Every flag is checked before any work; degenerate settings are refused (exit 2): labels
of one class only (--marginals), every propensity 1 (e.g. --density 1, --alpha 1 with
k = 1) or one of them 0, or a train / val / test split expecting fewer than {MIN_EXPECTED}
pairs of either label (e.g. --density 1e-6, --val-pct 1 with --density 0.9999).

--out appears whole or not at all (written into a hidden sibling folder, then renamed);
a non-empty --out is refused unless --overwrite, which replaces a folder this command
wrote (and only such a folder) so that a kill leaves the old folder or the new one.

examples:
  python -m simulate --density 0.15 --out out/sim-015 --data-dir ../shared/data
  python -m simulate --source lowrank --alpha 0.5 --seed 3 --out out/demo

The click / conversion log of the ESCM2 setting is another command:
  python -m simulate ctcvr --help
"""

CTCVR_EPILOG = f"""\
truth (simulate/ctcvr.py has the whole model): for an exposure e of user u and item i,
  t_e            = c(u,i) + sigma * eps_e           conversion tendency, eps_e ~ N(0, 1)
  p_click_e      = sigmoid(mu_o + a(u,i) + beta * t_e)
  p_conversion_e = sigmoid(mu_r + t_e)
  click o ~ Bernoulli(p_click), potential conversion r ~ Bernoulli(p_conversion),
  observed conversion o * r
with a, c from categorical user fields {"/".join(map(str, ctcvr.USER_FIELDS))} and item fields \
{"/".join(map(str, ctcvr.ITEM_FIELDS))}, ids and
latent vectors, each of unit standard deviation; beta = --mnar, sigma = --noise; mu_o, mu_r
solved so that the expected CTR is --ctr and the expected CVR over clicks --cvr. With
beta > 0 clicks are missing not at random: CVR over clicks > CVR over exposures.

--out gets {", ".join(f"{name}.npy" for name in ctcvr.EXPOSURE_FILES)}
({ctcvr.BYTES_PER_EXPOSURE} bytes per exposure), user_fields.npy, item_fields.npy and summary.json
(rates, splits, files), whole or not at all; a non-empty --out is refused unless
--overwrite, which replaces only a folder this command wrote. Read it with
simulate.ctcvr.load_ctcvr(DIR, split="train" | "val" | "test" | None).

--seed draws the exposures, --truth-seed the world (fields, latent vectors, intercepts).
The data do not depend on --chunk-size, which bounds memory (about 180 bytes per exposure of a chunk).

examples:
  python -m simulate ctcvr --exposures 1e6 --out out/ctcvr
  python -m simulate ctcvr --exposures 1e8 --mnar 2 --seed 1 --out out/ctcvr-1e8
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulate", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Semi-synthetic CVR data with known propensities and labels "
                    "(BADR paper, Section 4.8; MRDR's protocol after Schnabel et al. 2016).")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder (created if needed; if not empty, see --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out that an earlier run wrote")
    parser.add_argument("--source", choices=SOURCES, default="ml100k",
                        help="observed ratings to complete (default: ml100k)")
    parser.add_argument("--data-dir", metavar="DATA_ROOT",
                        help="folder holding ml-100k/ (and yahoo-r3/); default $CVR_DATA_DIR")
    parser.add_argument("--density", type=float, help="mean propensity in (0, 1]")
    parser.add_argument("--alpha", type=float, help="alpha in (0, 1]")
    parser.add_argument("--k", type=float, help="scale k > 0 (default 1 unless solved)")
    parser.add_argument("--seed", type=int, default=0, help="seed >= 0 of clicks and val/test split (default 0)")
    parser.add_argument("--truth-seed", type=int, default=0, help="seed >= 0 of the ground truth (default 0)")
    parser.add_argument("--val-pct", type=int, default=10,
                        help="percentage (1..99) of the unclicked pairs for validation, the rest is test "
                             "(default 10)")
    shares = parser.add_mutually_exclusive_group()
    shares.add_argument("--marginals", type=float, nargs=5, metavar="P",
                        default=list(YAHOO_R3_MARGINALS),
                        help="shares of ratings 1..5 after quantile mapping "
                             "(default: Yahoo! R3 random test set, %(default)s)")
    shares.add_argument("--marginals-from-yahoo", action="store_true",
                        help="recompute the shares from DATA_ROOT/yahoo-r3/"
                             "ydata-ymusic-rating-study-v1_0-test.txt")
    parser.add_argument("--rank", type=int, default=10,
                        help=f"rank (1..{MAX_RANK}) of the matrix factorisation (default 10)")
    return parser


def _count(text: str) -> int:
    """An argparse type: a whole number, written as an integer (1_000_000) or in floating notation (1e6)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}")
    return int(value)


def _ctcvr_parser() -> argparse.ArgumentParser:
    default = ctcvr.Settings(n_exposures=1)
    parser = argparse.ArgumentParser(
        prog="python -m simulate ctcvr", epilog=CTCVR_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A semi-synthetic click / conversion log with the true click and conversion "
                    "probabilities of every exposure (the ESCM2 setting, Ali-CCP style).")
    parser.add_argument("--exposures", type=_count, required=True, metavar="N",
                        help="number of exposures, e.g. 1000000 or 1e8")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder (created if needed; if not empty, see --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out that an earlier run of this command wrote")
    parser.add_argument("--seed", type=int, default=default.seed, help="seed >= 0 of the exposures (default 0)")
    parser.add_argument("--truth-seed", type=int, default=default.truth_seed,
                        help="seed >= 0 of the world: fields, latent vectors, intercepts (default 0)")
    parser.add_argument("--users", type=_count, default=default.n_users,
                        help=f"number of users (default {default.n_users})")
    parser.add_argument("--items", type=_count, default=default.n_items,
                        help=f"number of items (default {default.n_items})")
    parser.add_argument("--ctr", type=float, default=default.ctr,
                        help=f"expected click-through rate (default {default.ctr}, Ali-CCP's)")
    parser.add_argument("--cvr", type=float, default=default.cvr,
                        help=f"expected conversion rate over clicks (default {default.cvr}, Ali-CCP's)")
    parser.add_argument("--mnar", type=float, default=default.mnar, metavar="BETA",
                        help=f"weight of the conversion tendency in the click logit; 0: clicks independent of "
                             f"conversions (default {default.mnar})")
    parser.add_argument("--noise", type=float, default=default.noise, metavar="SIGMA",
                        help=f"standard deviation of the exposure-level shock shared by click and conversion "
                             f"(default {default.noise})")
    parser.add_argument("--split", type=int, nargs=3, default=list(default.split), metavar=("TRAIN", "VAL", "TEST"),
                        help="percentages of the exposures in train, validation and test (default 80 10 10)")
    parser.add_argument("--chunk-size", type=_count, default=default.chunk_size,
                        help=f"exposures per chunk, a multiple of {ctcvr.BLOCK} up to {ctcvr.MAX_CHUNK} "
                             f"(default {default.chunk_size}); changes memory, not the data")
    return parser


def ctcvr_main(argv: list[str]) -> int:
    """Run ``python -m simulate ctcvr`` (``argv`` without the word ``ctcvr``); as :func:`main`."""
    parser = _ctcvr_parser()
    args = parser.parse_args(argv)
    settings = ctcvr.Settings(
        n_exposures=args.exposures, seed=args.seed, truth_seed=args.truth_seed, n_users=args.users,
        n_items=args.items, ctr=args.ctr, cvr=args.cvr, mnar=args.mnar, noise=args.noise, split=tuple(args.split),
        chunk_size=args.chunk_size)
    try:
        ctcvr.check_settings(settings)
        check_out(args.out, args.overwrite, ours=ctcvr.OURS, command=ctcvr.COMMAND)
        ctcvr.check_space(settings, args.out)
    except ValueError as exc:
        parser.error(str(exc))
    start = time.perf_counter()
    try:
        summary = ctcvr.write_ctcvr(settings, args.out, overwrite=args.overwrite, log=print)
    except (ValueError, OSError) as exc:
        print(f"python -m simulate ctcvr: error: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    print(f"wrote {args.out}")
    for key in ("ctr", "ctr_expected", "cvr_clicked", "cvr_clicked_expected", "cvr_exposures",
                "cvr_exposures_expected", "ctcvr", "ctcvr_expected"):
        value = summary[key]
        print(f"  {key:<24}{'-' if value is None else f'{value:.6g}'}")
    print("  splits                  " + ", ".join(f"{name} {part['exposures']:,}"
                                                  for name, part in summary["splits"].items()))
    print(f"done in {seconds:.1f} s ({settings.n_exposures / seconds:,.0f} exposures/s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI.

    Every flag is checked first (:func:`simulate.check_settings`, :func:`simulate.check_out`):
    a bad or degenerate setting exits with status 2 and one line naming the flag, as
    argparse does. Errors in the data or the file system exit with status 1 and a message.
    ``ctcvr`` as the first argument runs :func:`ctcvr_main` instead.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["ctcvr"]:
        return ctcvr_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        # With --marginals-from-yahoo, args.marginals is the default: Yahoo! R3's shares to 4 places.
        check_settings(args.source, args.density, args.alpha, args.k, args.seed, args.val_pct,
                       truth_seed=args.truth_seed, marginals=args.marginals, rank=args.rank)
        check_out(args.out, args.overwrite)
    except ValueError as exc:
        parser.error(str(exc))
    start = time.perf_counter()
    try:
        marginals = yahoo_r3_marginals(args.data_dir) if args.marginals_from_yahoo else args.marginals
        sim = generate(args.source, args.density, args.alpha, args.k, args.seed, args.val_pct,
                       data_dir=args.data_dir, truth_seed=args.truth_seed, marginals=marginals,
                       rank=args.rank, log=print)
        out = write(sim, args.out, overwrite=args.overwrite)
    except (ValueError, OSError) as exc:
        print(f"python -m simulate: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    width = max(map(len, sim.summary))
    for key, value in sim.summary.items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        elif isinstance(value, list):
            value = " ".join(f"{v:.4f}" for v in value)
        print(f"  {key:<{width}}  {value}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
