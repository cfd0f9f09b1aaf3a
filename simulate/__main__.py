"""``python -m simulate``: build the BADR paper's Section 4.8 semi-synthetic data set."""
from __future__ import annotations

import argparse
import sys
import time

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


def main(argv: list[str] | None = None) -> int:
    """Run the CLI.

    Every flag is checked first (:func:`simulate.check_settings`, :func:`simulate.check_out`):
    a bad or degenerate setting exits with status 2 and one line naming the flag, as
    argparse does. Errors in the data or the file system exit with status 1 and a message.
    """
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
