"""``python -m reproduce escm2``: the ESCM2 paper's offline experiments on a simulated log with known truth.

The ESCM2 paper (Wang et al., TKDE, "ESCM2: Entire Space Counterfactual Multi-Task Model for
Post-Click Conversion Rate Estimation") compares CVR estimators trained over the exposure space
on Ali-CCP and an industrial log.  Neither log is here, and on a real log the conversion of an
unclicked exposure is never known; :mod:`simulate.ctcvr` draws an Ali-CCP style log whose truth
is known for every exposure, so that the CVR over the exposure space D (Proposition 1, Table VI)
is measured rather than bounded.  This module trains the methods of Tables II and III on it and
writes:

- ``tables.md``: Table II (CVR) and Table III (CTCVR): AUC, KS, Recall and F1 at the best
  threshold, mean ± std over seeds on the test split; plus the CVR AUC over ALL test exposures
  against the potential conversion ``r`` (only known truth allows it);
- ``ieb.csv`` and ``ieb.md``: Table VI, the intrinsic estimation bias: per method, seed and subset
  (train, test) the CVR over the clicks ("Label"), the true CVR over the clicks and over all
  exposures, and the average CVR estimate over all exposures; Proposition 1's verdict per seed;
- ``fig6.png`` / ``fig6.csv`` and ``fig7.png`` / ``fig7.csv``: the lambda_c and lambda_g sweeps
  of ESCM2-IPS and ESCM2-DR (Figures 6 and 7);
- ``results.csv`` (one row per finished run) and ``history.csv`` (one row per epoch), written as
  runs finish, atomically and under a lock (:mod:`reproduce.table`); a rerun skips finished runs.

Methods (:data:`METHODS`), all on one backbone, :class:`estimators.training.models.MMoE` (shared
id and field embeddings, multi-gate mixture of experts, one tower per task, ESCM2 Section V-A3):

- ``naive`` (Naive): the CTR tower by ``L_CTR`` over the exposures (eq. 35) and the CVR tower by
  the cross-entropy over the CLICKED exposures of the batch (eq. 3, the biased estimator):
  ``L = L_CTR + lambda_c * mean_O l(b, r)`` with ``lambda_c = 1``; 0 for a batch without a click.
  Defined here (it is no entire-space objective of :data:`estimators.registry.ENTIRE_SPACE`);
- ``esmm``, ``mtl_ips`` (Multi-IPS), ``mtl_dr`` (Multi-DR), ``escm2_ips``, ``escm2_dr``,
  ``escm2_badr``: the registry's objectives ``esmm``, ``multi_ips``, ``multi_dr``, ``escm2_*``
  with their defaults (ESCM2: lambda_c = 0.1, lambda_g = 1, the paper's; Multi-*: lambda_c = 1;
  propensities ``clip(o_hat, 0.05, 1)``, detached).

Protocol (ESCM2 Section V-A3): Adam with weight decay 1e-3 (``--weight-decay``), embeddings of
size 5 shared by the tasks, 4 experts; learning rate 1e-3 (``--lr``), not the paper's 1e-4, chosen on
the VALIDATION split: at 10^6 exposures after 4 epochs (780 steps) ESMM reached validation CVR /
CTCVR AUC 0.564 / 0.768 with 1e-3 and 0.497 / 0.613 with 1e-4 (ESCM2-DR: 0.568 / 0.769 and
0.528 / 0.625), 1e-4 still far from converged (training loss 0.180 against 0.162); the paper's 1e-4 goes with many more iterations than a
2-hour CPU budget allows; mini-batches of ``--batch-size`` exposures (default 4096)
streamed from the memory-mapped train split (chunks of 2^16 rows in a seeded random order, rows
shuffled within a chunk: exposures are i.i.d., so this is a uniform shuffle up to chunk locality);
after every epoch the model is scored on the VALIDATION split and the epoch with the best
validation score is kept (``--select``: ``cvr``, the CVR AUC over the clicked validation exposures
(default), or ``ctcvr``, the CTCVR AUC over all of them); training stops after ``--patience``
epochs without a better score (default 1) or at ``--max-epochs`` (default 2: at 10^7 exposures
two epochs are 3,900 steps and the whole default job about 1.6 hours, see Cost below; raise it
for smaller logs).  (The paper checks every 1000 iterations;
at 10^7 exposures and batch 4096 one epoch is 1953.)  No test label and no ``true_*`` array is
read before the model is chosen: the test split and the truth serve the final numbers only.

Metrics (Section V-A4): ``auc`` the ROC AUC (:func:`reproduce.metrics.auc`); ``ks`` the largest
``TPR - FPR`` over the thresholds (the best threshold on the ROC curve; the Kolmogorov-Smirnov
distance between the scores of the positives and the negatives when the model ranks positives
higher); ``f1`` the largest F1 over the thresholds (the best threshold on the precision-recall
curve) and ``recall`` the recall at that threshold (:func:`threshold_metrics`).  CVR: the CVR
estimate ``sigmoid(b)`` against the observed conversion over the clicked test exposures; CTCVR:
``sigmoid(a) sigmoid(b)`` against ``click * conversion`` over all test exposures.  F1 is a
fraction here (the paper prints it in percent).

Cost (measured at 10^6 exposures, one thread, ESCM2-DR, the heaviest objective with three towers):
one epoch over 8 * 10^5 training exposures took 7.5 s (107 k exposures per second) on a quiet
machine and 12.3-15.5 s (52-65 k/s) with other jobs or a second run on the two cores; two runs at
once gave 52 k/s each.  The default job at 10^7 (35 runs: 7 methods x 3 seeds, Figure 6's 6 and
Figure 7's 8 further points, 2 epochs each, ``--jobs 2``) took 54 min wall with a tuning job on the
same two cores: 82 s per epoch of 8 * 10^6 exposures (median), 97 k exposures per second per run,
849 MB peak resident memory per process.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cvrdata.stream import CHUNK as STREAM_CHUNK, ChunkedBatches
from estimators.distributed import Reduction, resolve
from estimators.registry import get_entire_space
from estimators.training.models import MMoE
from estimators.training.optim import fused_adam
from simulate import ctcvr

from .distributed import is_writer, world_size
from .files import check_folder, locked, remove_stale_temporaries, replace
from .metrics import auc
from .progress import Progress
from .report import pyplot, save_png, write_csv
from .table import append_result, mean_std, read_results, run_key, write_history

# ---------------------------------------------------------------------------------------- methods


def naive_loss(outputs: Mapping[str, torch.Tensor], o: torch.Tensor, r: torch.Tensor, *,
               lambda_c: float = 1.0, reduction: str | Reduction = "global") -> dict[str, torch.Tensor]:
    """Naive (ESCM2 Section V-A2): ``L = L_CTR + lambda_c * mean_O l(b, r)``, the CTR tower by the
    cross-entropy over all exposures (eq. 35), the CVR tower by the cross-entropy over the clicked
    exposures of the batch only (eq. 3, biased by the selection of clicks); a batch without a
    click contributes no CVR term.  ``r`` is read only where ``o = 1``.  ``reduction``: across
    data-parallel ranks, both means are the whole batch's and each rank returns its share
    (:mod:`estimators.distributed`); in one process it changes nothing."""
    red = resolve(reduction)
    a, b = outputs["ctr"], outputs["cvr"]
    clicked = o > 0
    if not red.active:
        ctr = F.binary_cross_entropy_with_logits(a, o)
        if bool(clicked.any()):
            cvr = F.binary_cross_entropy_with_logits(b[clicked], r[clicked])
        else:
            cvr = b.sum() * 0.0
        return {"loss": ctr + lambda_c * cvr, "ctr": ctr, "cvr": cvr}
    ctr = red.mean(F.binary_cross_entropy_with_logits(a, o, reduction="none"))
    n_clicked = red.total(int(clicked.sum()), like=b)
    per_click = F.binary_cross_entropy_with_logits(b[clicked], r[clicked], reduction="none")
    cvr = red.share(per_click.sum() / n_clicked) if float(n_clicked) > 0 else b.sum() * 0.0
    return {"loss": ctr + lambda_c * cvr, "ctr": ctr, "cvr": cvr}


@dataclass(frozen=True)
class Method:
    """A row of Tables II / III: a name, its label, the entire-space objective (None: Naive) and the
    objective's parameters (the registry's defaults unless given)."""

    name: str
    label: str
    objective: Optional[str]
    params: Mapping[str, float] = field(default_factory=dict, hash=False)

    @property
    def towers(self) -> tuple[str, ...]:
        return ("ctr", "cvr") if self.objective is None else get_entire_space(self.objective).towers

    def defaults(self) -> dict[str, float]:
        base = {"lambda_c": 1.0} if self.objective is None else dict(get_entire_space(self.objective).params)
        return {**base, **self.params}

    def loss(self, outputs, o, r, params: Mapping[str, float], reduction: str = "global") -> dict[str, torch.Tensor]:
        if self.objective is None:
            return naive_loss(outputs, o, r, **params, reduction=reduction)
        return get_entire_space(self.objective)(outputs, o, r, **params, reduction=reduction)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("naive", "Naive", None),
    Method("esmm", "ESMM", "esmm"),
    Method("mtl_ips", "MTL-IPS", "multi_ips"),
    Method("mtl_dr", "MTL-DR", "multi_dr"),
    Method("escm2_ips", "ESCM2-IPS", "escm2_ips", {"lambda_c": 0.1, "lambda_g": 1.0}),
    Method("escm2_dr", "ESCM2-DR", "escm2_dr", {"lambda_c": 0.1, "lambda_g": 1.0}),
    Method("escm2_badr", "ESCM2-BADR", "escm2_badr", {"lambda_c": 0.1, "lambda_g": 1.0}),
)}
SWEEP_METHODS = ("escm2_ips", "escm2_dr")  # Figures 6 and 7
LAMBDA_C_GRID = (0.0, 0.01, 0.1, 1.0)  # Figure 6 (the paper: [0, 3], suggests [0, 0.1])
LAMBDA_G_GRID = (0.0, 0.5, 1.0, 2.0, 3.0)  # Figure 7 (the paper: [0, 3])
PARTS = ("tables", "ieb", "fig6", "fig7")
SELECT = ("cvr", "ctcvr")
FIRST_SEED = 2024
CHUNK = STREAM_CHUNK  # rows read from the memory maps at a time
IEB_TRAIN_ROWS = 1_000_000
DEFAULT_EXPOSURES = 10_000_000  # Table VI's train subset: the first rows of the (i.i.d.) train split


def parse_methods(text: str) -> list[Method]:
    """``--methods``: comma-separated names of :data:`METHODS` (ValueError naming the flag)."""
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(f"--methods: unknown method(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"expected a comma-separated subset of {', '.join(METHODS)}")
    return [METHODS[n] for n in names]


# ---------------------------------------------------------------------------------------- metrics


def threshold_metrics(scores, labels) -> dict[str, float]:
    """KS, F1 and Recall at the best thresholds (ESCM2 Section V-A4).

    Predicting positive every exposure whose score is ``>= t``, for each distinct score ``t``:
    ``ks = max_t (TPR(t) - FPR(t))`` (0 at ``t = +inf``), ``f1 = max_t 2 TP / (2 TP + FP + FN)`` and
    ``recall = TP / P`` at the first ``t`` (the highest) reaching that F1.  Both classes needed.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if scores.ndim != 1 or labels.shape != scores.shape or scores.size == 0:
        raise ValueError(f"`scores` and `labels` must be 1-D of one non-zero length; got {scores.shape}, "
                         f"{labels.shape}")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"KS and F1 need both classes; got {n_pos} positives and {n_neg} negatives")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last row of each tie group: a threshold
    tp = np.cumsum(y)[last].astype(np.float64)
    fp = np.cumsum(~y)[last].astype(np.float64)
    ks = max(0.0, float((tp / n_pos - fp / n_neg).max()))
    f1 = 2 * tp / (tp + fp + n_pos)
    best = int(np.argmax(f1))
    return {"ks": ks, "f1": float(f1[best]), "recall": float(tp[best] / n_pos)}


def _scored(scores, labels) -> dict[str, float]:
    """AUC, KS, F1 and Recall (NaN where one class is missing, so a tiny split never fails a run)."""
    try:
        return {"auc": auc(scores, labels), **threshold_metrics(scores, labels)}
    except ValueError:
        return {"auc": math.nan, "ks": math.nan, "f1": math.nan, "recall": math.nan}


def ieb_numbers(log: ctcvr.CTCVRLog, p_cvr: np.ndarray, rows: int) -> dict[str, float]:
    """Table VI of the first ``rows`` exposures of ``log`` with the CVR estimates ``p_cvr`` there:
    ``label`` the observed CVR over the clicks (the paper's "Label"), ``true_clicks`` the mean true
    conversion probability over the clicks, ``true`` over all exposures (E_D[R], what the CVR
    estimate should average), ``estimate`` the mean CVR estimate over all exposures (E_D[R_hat])
    and ``bias = estimate - true``."""
    click = np.asarray(log.click[:rows]).astype(bool)
    conv = np.asarray(log.conversion[:rows], dtype=np.float64)
    p_true = np.asarray(log.true_p_conversion[:rows], dtype=np.float64)
    n_click = int(click.sum())
    out = {"exposures": rows, "clicks": n_click,
           "label": float(conv[click].mean()) if n_click else math.nan,
           "true_clicks": float(p_true[click].mean()) if n_click else math.nan,
           "true": float(p_true.mean()), "estimate": float(np.mean(p_cvr[:rows], dtype=np.float64))}
    out["bias"] = out["estimate"] - out["true"]
    return out


# ---------------------------------------------------------------------------------------- data


def data_folder(out: Path, exposures: Optional[int], data: Optional[str],
                log: Callable[[str], None] = lambda line: None) -> Path:
    """The ctcvr folder of a job: ``--data`` (checked) or ``OUT/data/ctcvr-N-seed0``, simulated with
    :mod:`simulate.ctcvr`'s defaults on first use and reused after."""
    if data is not None:
        folder = Path(data)
        try:
            ctcvr.load_ctcvr(folder)
        except ValueError as exc:
            raise ValueError(f"--data {folder} is not a log of `python -m simulate ctcvr`: {exc}") from None
        return folder
    if exposures is None or exposures < 1:
        raise ValueError(f"--exposures must be a positive integer, got {exposures!r}")
    folder = check_folder(out / "data", "--out's data folder") / f"ctcvr-{exposures}-seed0"
    if (folder / "summary.json").is_file():
        ctcvr.load_ctcvr(folder)  # a damaged folder is an error naming the fix, not a silent rebuild
        return folder
    settings = ctcvr.Settings(n_exposures=exposures)
    try:
        ctcvr.check_settings(settings)
    except ValueError as exc:  # e.g. too few exposures for a non-empty test split
        raise ValueError(f"--exposures: {exc}") from None
    log(f"simulating {exposures:,} exposures into {folder} (python -m simulate ctcvr, default settings)")
    ctcvr.write_ctcvr(settings, folder, log=log)
    return folder


def batches(log: ctcvr.CTCVRLog, batch_size: int, rng: np.random.Generator, rank: int = 0,
            world: int = 1) -> ChunkedBatches:
    """``(users, items, o, r)`` mini-batches of one epoch over ``log``, streamed from its memory maps
    (:class:`cvrdata.stream.ChunkedBatches`): chunks of :data:`CHUNK` rows in a random order, rows
    shuffled in each, drawn from ``rng``; on ``world`` ranks, rank ``rank``'s part of each."""
    return ChunkedBatches({"user": log.user, "item": log.item, "click": log.click, "conversion": log.conversion},
                          {"user": torch.int64, "item": torch.int64, "click": torch.float32,
                           "conversion": torch.float32}, batch_size, rng, chunk=CHUNK, rank=rank, world_size=world)


@torch.no_grad()
def predict(model: MMoE, log: ctcvr.CTCVRLog, rows: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(p_ctr, p_cvr)``, float32, of the first ``rows`` exposures of ``log`` (all by default)."""
    n = len(log) if rows is None else min(rows, len(log))
    p_ctr, p_cvr = np.empty(n, np.float32), np.empty(n, np.float32)
    was = model.training
    model.eval()
    for start in range(0, n, CHUNK):
        rows_ = slice(start, min(start + CHUNK, n))
        out = model(torch.from_numpy(np.asarray(log.user[rows_], dtype=np.int64)),
                    torch.from_numpy(np.asarray(log.item[rows_], dtype=np.int64)))
        p_ctr[rows_] = torch.sigmoid(out["ctr"]).numpy()
        p_cvr[rows_] = torch.sigmoid(out["cvr"]).numpy()
    model.train(was)
    return p_ctr, p_cvr


def observed_metrics(log: ctcvr.CTCVRLog, p_ctr: np.ndarray, p_cvr: np.ndarray) -> dict[str, float]:
    """What a real log allows: CVR over the clicked exposures, CTCVR and CTR over all of them."""
    click = np.asarray(log.click, dtype=bool)
    conv = np.asarray(log.conversion, dtype=bool)
    out = {f"cvr_{k}": v for k, v in _scored(p_cvr[click], conv[click]).items()}
    out.update({f"ctcvr_{k}": v for k, v in _scored(p_ctr.astype(np.float64) * p_cvr, click & conv).items()})
    out["ctr_auc"] = _scored(p_ctr, click)["auc"]
    return out


# ---------------------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Protocol:
    """Everything of a run besides its method, parameters and seed (all in its signature)."""

    lr: float = 1e-3  # tuned on validation (module docstring); the paper's 1e-4 is --lr 1e-4
    weight_decay: float = 1e-3
    batch_size: int = 4096
    max_epochs: int = 2
    patience: int = 1
    select: str = "cvr"
    dim: int = 5
    n_experts: int = 4
    expert_hidden: tuple[int, ...] = (64,)
    expert_dim: int = 32
    tower_hidden: tuple[int, ...] = (32,)


@dataclass(frozen=True)
class Run:
    method: Method
    params: tuple[tuple[str, float], ...]  # sorted (key, value): hashable
    seed: int
    protocol: Protocol
    dataset: str  # the data folder's name
    data_id: str  # its settings' fingerprint
    world_size: int = 1  # the torchrun ranks that train it together (their float sums round otherwise)

    @property
    def signature(self) -> str:
        what = {"method": self.method.name, "params": dict(self.params), "protocol": self.protocol.__dict__,
                "data": self.data_id}
        if self.world_size > 1:  # one process's signatures stay as they were
            what["world_size"] = self.world_size
        blob = json.dumps(what, sort_keys=True, default=list)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    @property
    def key(self) -> tuple:
        return (self.dataset, self.method.name, self.seed, self.signature)


def make_run(method: Method, seed: int, protocol: Protocol, folder: Path, **override: float) -> Run:
    summary = json.loads((folder / "summary.json").read_text())
    data_id = hashlib.sha1(json.dumps([summary["n_exposures"], summary["settings"]], sort_keys=True).encode()
                           ).hexdigest()[:12]
    params = {**method.defaults(), **override}
    return Run(method, tuple(sorted(params.items())), seed, protocol, folder.name, data_id, world_size())


LOSS_PARTS = ("loss", "ctr", "ctcvr", "cvr", "cvr_err", "cvr_imp")
#: Columns of results.csv: the run key, its settings, Tables II / III, Table VI, timings
#: (``seconds``: the whole run; ``seconds_per_epoch`` and ``exposures_per_second``: training only,
#: without the validation passes).
RESULT_COLUMNS = (
    "dataset", "method", "seed", "signature", "status", "lambda_c", "lambda_g", "params",
    "cvr_auc", "cvr_ks", "cvr_f1", "cvr_recall", "ctcvr_auc", "ctcvr_ks", "ctcvr_f1", "ctcvr_recall", "ctr_auc",
    "cvr_auc_exposures", "val_score", "select", "best_epoch", "epochs", "seconds", "seconds_per_epoch",
    "exposures_per_second", "threads", "batch_size", "lr", "weight_decay", "world_size",
    *(f"ieb_{s}_{k}" for s in ("train", "test") for k in ("exposures", "clicks", "label", "true_clicks", "true",
                                                         "estimate", "bias")))
#: Columns of history.csv: the run key, then one row per epoch.
HISTORY_COLUMNS = ("dataset", "method", "seed", "signature", "epoch", *(f"train_{p}" for p in LOSS_PARTS),
                   "val_cvr_auc", "val_ctcvr_auc", "val_ctr_auc", "val_score", "best", "seconds")
REQUIRED = ("dataset", "method", "seed", "signature", "status")


def train_run(folder: Path, run: Run, show_progress: bool = True) -> dict[str, Any]:
    """Train ``run`` on ``folder``'s train split, choose its epoch on the validation split, score it on
    the test split (and its IEB on train and test); return its results row with "history".

    Under ``torchrun`` (``run.world_size`` ranks) every rank trains the run together: the model in
    ``DistributedDataParallel``, each rank its part of every global batch
    (:class:`cvrdata.stream.ChunkedBatches`), the objective's means and ESCM2-BADR's normaliser over
    the global batch (``reduction="global"``), so each step is one process's step on the global batch
    up to float rounding; every rank scores the same model on validation and test (the same
    choices), and the caller writes rank 0's row."""
    import torch.distributed as dist

    world = world_size()
    if world != run.world_size:
        raise ValueError(f"run planned for {run.world_size} rank(s) but {world} are training it")
    rank = dist.get_rank() if world > 1 else 0
    train, val, test = (ctcvr.load_ctcvr(folder, split=s) for s in ctcvr.SPLITS)
    p, params = run.protocol, dict(run.params)
    torch.manual_seed(run.seed)  # the same initial model on every rank
    rng = np.random.default_rng([run.seed, 1])
    model = MMoE(len(train.user_fields), len(train.item_fields), tasks=run.method.towers, dim=p.dim,
                 n_experts=p.n_experts, expert_hidden=p.expert_hidden, expert_dim=p.expert_dim,
                 tower_hidden=p.tower_hidden, user_fields=np.array(train.user_fields),
                 item_fields=np.array(train.item_fields))  # copies: small tables, writable
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimiser = fused_adam(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    steps = -(-len(train) // p.batch_size)
    swept = {k: v for k, v in params.items() if run.method.defaults().get(k) != v}
    label = f"{run.method.label} seed {run.seed}" + "".join(f" {k}={v:g}" for k, v in swept.items())
    progress = Progress(label, p.max_epochs * steps) if show_progress and rank == 0 else None
    history: list[dict[str, Any]] = []
    best_score, best_epoch, best_state = -math.inf, 0, None
    status, start, train_seconds = "ok", time.perf_counter(), 0.0
    for epoch in range(1, p.max_epochs + 1):
        t0 = time.perf_counter()
        sums = dict.fromkeys(LOSS_PARTS, 0.0)
        seen = dict.fromkeys(LOSS_PARTS, 0)
        for step, (users, items, o, r) in enumerate(batches(train, p.batch_size, rng, rank, world), 1):
            parts = run.method.loss(net(users, items), o, r, params)
            loss = parts["loss"]
            finite = torch.isfinite(loss.detach()).to(torch.float64)
            if world > 1:  # every rank stops together
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not bool(finite):
                status = "diverged"
                break
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            for k, v in parts.items():
                if k in sums:
                    sums[k] += float(v.detach())
                    seen[k] += 1
            if progress:
                progress.update((epoch - 1) * steps + step, f"epoch {epoch}", f"loss {sums['loss'] / seen['loss']:.4f}")
        train_seconds += time.perf_counter() - t0
        if status != "ok":
            break
        if world > 1:  # the ranks' shares: their mean is the global batch's loss
            total = torch.tensor([sums[k] for k in LOSS_PARTS], dtype=torch.float64)
            dist.all_reduce(total)
            sums = dict(zip(LOSS_PARTS, (total / world).tolist()))
        scores = observed_metrics(val, *predict(model, val))
        score = scores[f"{p.select}_auc"]
        better = not math.isnan(score) and score > best_score
        if better or best_state is None:
            best_score, best_epoch = (score if not math.isnan(score) else best_score), epoch
            best_state = copy.deepcopy(model.state_dict())
        history.append({"epoch": epoch, **{f"train_{k}": sums[k] / seen[k] for k in LOSS_PARTS if seen[k]},
                        "val_cvr_auc": scores["cvr_auc"], "val_ctcvr_auc": scores["ctcvr_auc"],
                        "val_ctr_auc": scores["ctr_auc"], "val_score": score, "best": int(better),
                        "seconds": time.perf_counter() - t0})
        if epoch - best_epoch >= p.patience:
            break
    row: dict[str, Any] = {"dataset": run.dataset, "method": run.method.name, "seed": run.seed,
                           "signature": run.signature, "status": status, "lambda_c": params.get("lambda_c"),
                           "lambda_g": params.get("lambda_g"), "params": json.dumps(params, sort_keys=True),
                           "select": p.select, "best_epoch": best_epoch, "epochs": len(history),
                           "threads": torch.get_num_threads(), "batch_size": p.batch_size, "lr": p.lr,
                           "weight_decay": p.weight_decay, "world_size": world, "history": history}
    epochs_run = max(1, len(history))
    row["seconds_per_epoch"] = train_seconds / epochs_run
    row["exposures_per_second"] = len(train) * len(history) / train_seconds if history and train_seconds else None
    if status == "ok":
        model.load_state_dict(best_state)
        row["val_score"] = best_score if math.isfinite(best_score) else None
        p_ctr, p_cvr = predict(model, test)  # the test split: read only now, after the choice
        row.update(observed_metrics(test, p_ctr, p_cvr))
        row["cvr_auc_exposures"] = _scored(p_cvr, np.asarray(test.true_conversion))["auc"]
        row.update({f"ieb_test_{k}": v for k, v in ieb_numbers(test, p_cvr, len(test)).items()})
        rows = min(len(train), IEB_TRAIN_ROWS)
        row.update({f"ieb_train_{k}": v for k, v in ieb_numbers(train, predict(model, train, rows)[1], rows).items()})
    row["seconds"] = time.perf_counter() - start
    if progress:
        progress.close(f"{status}: {row['epochs']} epoch(s), best {best_epoch}, test CVR AUC "
                       f"{row.get('cvr_auc', math.nan):.4f}, {row['seconds']:.1f}s")
    return row


def _worker(folder: Path, run: Run) -> dict[str, Any]:
    return train_run(folder, run, show_progress=False)


# ---------------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """The runs of a job and which of them each output reads."""

    main: dict[str, list[Run]] = field(default_factory=dict)  # method -> its seeds' runs
    fig6: dict[tuple[str, float], list[Run]] = field(default_factory=dict)  # (method, lambda_c) -> runs
    fig7: dict[tuple[str, float], list[Run]] = field(default_factory=dict)  # (method, lambda_g) -> runs

    def runs(self) -> list[Run]:
        every = [r for rs in self.main.values() for r in rs] + [r for d in (self.fig6, self.fig7)
                                                                 for rs in d.values() for r in rs]
        return list({r.key: r for r in every}.values())


def plan(folder: Path, methods: Sequence[Method], seeds: int, protocol: Protocol, parts: Sequence[str],
         lambda_c_grid: Sequence[float] = LAMBDA_C_GRID, lambda_g_grid: Sequence[float] = LAMBDA_G_GRID,
         sweep_seeds: int = 1) -> Plan:
    out = Plan()
    if "tables" in parts or "ieb" in parts:
        ieb = [METHODS[n] for n in ("esmm", "escm2_ips", "escm2_dr")] if "ieb" in parts else []
        for m in {m.name: m for m in [*methods, *ieb]}.values():
            out.main[m.name] = [make_run(m, FIRST_SEED + s, protocol, folder) for s in range(seeds)]
    for part, key, grid in (("fig6", "lambda_c", lambda_c_grid), ("fig7", "lambda_g", lambda_g_grid)):
        if part in parts:
            target = getattr(out, part)
            for name in SWEEP_METHODS:
                for value in grid:
                    target[(name, float(value))] = [make_run(METHODS[name], FIRST_SEED + s, protocol, folder,
                                                             **{key: float(value)}) for s in range(sweep_seeds)]
    return out


def execute(folder: Path, runs: list[Run], out: Path, jobs: int = 1, threads: Optional[int] = None,
            on_row: Callable[[dict[str, Any]], None] = lambda row: None) -> int:
    """Train the runs of ``runs`` not yet in ``out/results.csv``; each row is written as its run
    finishes (results.csv and history.csv, atomically, under a lock).  Returns how many were trained."""
    from .runs import in_workers

    results, history = out / "results.csv", out / "history.csv"
    done = {run_key(r) for r in read_results(results, required=REQUIRED)}
    todo = [r for r in runs if r.key not in done]
    if len(todo) < len(runs):
        print(f"{len(runs) - len(todo)} of {len(runs)} run(s) already in {results}: skipped", file=sys.stderr)

    def record(row: dict[str, Any]) -> None:
        if not is_writer():  # under torchrun: rank 0 writes each run's one row
            return
        hist = row.pop("history")
        write_history(history, row, hist, columns=HISTORY_COLUMNS)
        append_result(results, row, columns=RESULT_COLUMNS)
        on_row(row)

    if world_size() > 1 and jobs != 1:
        raise ValueError("under torchrun the launched processes train each run together: use --jobs 1")
    if jobs == 1 or len(todo) < 2:
        for run in todo:
            record(train_run(folder, run))
    else:
        for n, row in enumerate(in_workers(_worker, [(r,) for r in todo], jobs, threads, shared=(folder,)), 1):
            record(row)
            print(f"[{n}/{len(todo)}] {row['method']} seed {row['seed']} {row['params']}: {row['status']}, test CVR "
                  f"AUC {row.get('cvr_auc', math.nan):.4f}, {row['seconds']:.1f}s", file=sys.stderr)
    return len(todo)


# ---------------------------------------------------------------------------------------- rendering


def _finished(rows: list[dict[str, Any]], runs: Sequence[Run]) -> list[dict[str, Any]]:
    keys = {r.key for r in runs}
    return [r for r in rows if run_key(r) in keys and r.get("status") == "ok"]


def _cell(values: Sequence[float]) -> str:
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return mean_std(values) if values else "—"


def render_tables(rows: list[dict[str, Any]], p: Plan, folder: Path) -> str:
    summary = json.loads((folder / "summary.json").read_text())
    out = ["# The ESCM2 paper's Tables II and III on a simulated log with known truth", "",
           f"Data: `{folder}` ({summary['n_exposures']:,} exposures of `python -m simulate ctcvr`, train / validation "
           f"/ test {' / '.join(str(summary['splits'][s]['stop'] - summary['splits'][s]['start']) for s in ctcvr.SPLITS)}"
           f" rows; CTR {summary.get('ctr', math.nan):.4f}, CVR over clicks {summary.get('cvr_clicked', math.nan):.4f}, "
           f"over all exposures {summary.get('cvr_exposures', math.nan):.4f}). "
           "Mean ± std over seeds (numpy std, ddof = 0), on the test split, each run's epoch chosen on the "
           "validation split.", ""]
    for title, prefix, extra in (("Table II: CVR estimation", "cvr", True), ("Table III: CTCVR estimation", "ctcvr",
                                                                              False)):
        head = "| method | Recall | F1 | KS | AUC |" + (" AUC over all exposures (true r) |" if extra else "") + " seeds |"
        out += [f"## {title}", "", head, "|" + "---|" * (head.count("|") - 1)]
        for name, runs in p.main.items():
            got = _finished(rows, runs)
            cells = [_cell([r.get(f"{prefix}_{k}") for r in got]) for k in ("recall", "f1", "ks", "auc")]
            if extra:
                cells.append(_cell([r.get("cvr_auc_exposures") for r in got]))
            out.append(f"| {METHODS[name].label} | " + " | ".join(cells) + f" | {len(got)}/{len(runs)} |")
        out.append("")
    out += ["CVR: the CVR estimate against the observed conversion over the clicked test exposures (all a real log "
            "allows); the last column scores it against the potential conversion `r` of EVERY test exposure, which "
            "only a simulated truth holds (the exposure space D the CVR model is meant for). CTCVR: the product of "
            "the CTR and CVR estimates against click and conversion over all test exposures. KS: the largest "
            "TPR - FPR over the thresholds; F1: the largest F1 over the thresholds; Recall: at that F1's threshold "
            "(F1 as a fraction; the paper prints percent).", "",
            "The paper's Tables II / III are on Ali-CCP and an industrial log (e.g. ESCM2-DR's CVR AUC 0.6142 on "
            "Ali-CCP); on other data they are not comparable to these numbers and are not shown beside them.", ""]
    return "\n".join(out)


IEB_COLUMNS = ("method", "seed", "subset", "exposures", "clicks", "label", "true_clicks", "true", "estimate", "bias")


def ieb_rows(rows: list[dict[str, Any]], p: Plan) -> list[dict[str, Any]]:
    out = []
    for name, runs in p.main.items():
        for r in sorted(_finished(rows, runs), key=lambda r: r["seed"]):
            for subset in ("train", "test"):
                out.append({"method": METHODS[name].label, "seed": r["seed"], "subset": subset,
                            **{k: r.get(f"ieb_{subset}_{k}") for k in IEB_COLUMNS[3:]}})
    return out


def render_ieb(table: list[dict[str, Any]]) -> str:
    by = {}
    for r in table:
        by.setdefault((r["subset"], r["method"]), []).append(r)
    methods = list(dict.fromkeys(r["method"] for r in table))
    out = ["# Table VI: intrinsic estimation bias (average CVR over the exposure space)", "",
           "| subset | Label (CVR over clicks) | true CVR over clicks | true CVR over exposures | "
           + " | ".join(f"{m} estimate" for m in methods) + " |",
           "|---|---|---|---|" + "---|" * len(methods)]
    for subset in ("train", "test"):
        ref = next((by[(subset, m)] for m in methods if (subset, m) in by), [])
        cells = [_cell([r["label"] for r in ref]), _cell([r["true_clicks"] for r in ref]),
                 _cell([r["true"] for r in ref])]
        cells += [_cell([r["estimate"] for r in by.get((subset, m), [])]) for m in methods]
        out.append(f"| {subset} | " + " | ".join(cells) + " |")
    out += ["", "Label: observed conversions / clicks (the paper's field); true CVR: the mean of the simulated "
            "conversion probability `true_p_conversion` over the clicks and over ALL exposures (E_D[R], what a CVR "
            f"model's average estimate should be); estimate: the mean CVR estimate over all exposures (E_D[R_hat]). "
            f"Train: the first {IEB_TRAIN_ROWS:,} rows of the train split, or all of a smaller one (exposures are i.i.d.). The labels (mean "
            "± std over the seeds) are the same data for every method.", ""]
    out += ["## Proposition 1 (ESMM over-estimates CVR over the exposure space) and how much ESCM2 shrinks the gap",
            ""]
    esmm = {(r["subset"], r["seed"]): r for r in table if r["method"] == "ESMM"}
    if not esmm:
        out += ["ESMM was not run: no verdict.", ""]
        return "\n".join(out)
    for subset in ("train", "test"):
        seeds = sorted(s for (sub, s) in esmm if sub == subset)
        holds = [esmm[(subset, s)]["estimate"] > esmm[(subset, s)]["true"] for s in seeds]
        per_seed = "; ".join(f"seed {s}: {esmm[(subset, s)]['estimate']:.5f} vs {esmm[(subset, s)]['true']:.5f} "
                             f"(gap {esmm[(subset, s)]['bias']:+.5f})" for s in seeds)
        verdict = "**holds**" if all(holds) else f"**does not hold** ({len(holds) - sum(holds)} of {len(holds)} seeds)"
        out.append(f"- {subset}: ESMM's average CVR estimate exceeds the true exposure-space CVR in every seed: "
                   f"{verdict} — {per_seed}.")
        gap = float(np.mean([esmm[(subset, s)]["bias"] for s in seeds]))
        for m in ("ESCM2-IPS", "ESCM2-DR", "ESCM2-BADR"):
            mine = [by_seed for by_seed in table if by_seed["method"] == m and by_seed["subset"] == subset]
            if not mine:
                continue
            other = float(np.mean([r["bias"] for r in mine]))
            shrink = abs(gap) - abs(other)
            pct = f" ({100 * abs(shrink) / abs(gap):.0f} % of ESMM's gap)" if gap else ""
            out.append(f"  - {m}: mean gap {other:+.5f} against ESMM's {gap:+.5f}: "
                       f"{'shrinks' if shrink > 0 else 'does not shrink: widens'} it by {abs(shrink):.5f}{pct}.")
    out += ["", "Gap: the average CVR estimate over the exposures minus the true exposure-space CVR, of the epoch "
            "each run chose on validation. It mixes the selection bias Proposition 1 is about with how far each "
            "CVR tower is from calibrated (ESMM trains it only through the CTCVR product); more epochs "
            "(`--max-epochs`) separate the two.", ""]
    return "\n".join(out)


SWEEP_METRICS = ("cvr_auc", "cvr_ks", "ctcvr_auc", "ctcvr_ks", "cvr_auc_exposures")


def sweep_rows(rows: list[dict[str, Any]], sweep: dict[tuple[str, float], list[Run]], key: str) -> list[dict]:
    out = []
    for (name, value), runs in sweep.items():
        got = _finished(rows, runs)
        row: dict[str, Any] = {"method": METHODS[name].label, key: value, "seeds": len(got)}
        for m in SWEEP_METRICS:
            vals = [float(r[m]) for r in got if r.get(m) is not None and not math.isnan(float(r[m]))]
            row[f"{m}_mean"] = float(np.mean(vals)) if vals else None
            row[f"{m}_std"] = float(np.std(vals)) if vals else None
        out.append(row)
    return out


def plot_sweep(table: list[dict[str, Any]], key: str, symbol: str, title: str, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9, 7))
    panels = (("cvr_auc", "CVR AUC (clicked test exposures)"), ("cvr_ks", "CVR KS"),
              ("ctcvr_auc", "CTCVR AUC (all test exposures)"), ("ctcvr_ks", "CTCVR KS"))
    for ax, (metric, name) in zip(axes.flat, panels):
        for method in dict.fromkeys(r["method"] for r in table):
            pts = sorted((r[key], r[f"{metric}_mean"], r[f"{metric}_std"] or 0.0) for r in table
                         if r["method"] == method and r[f"{metric}_mean"] is not None)
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=method)
        positive = sorted({r[key] for r in table if r[key] > 0})
        if positive and positive[-1] / positive[0] >= 20:  # a grid over decades (0, 0.01, ..., 1): log beyond the first
            ax.set_xscale("symlog", linthresh=positive[0], linscale=0.5)
        ax.set_xlabel(symbol)
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    fig.suptitle(title)
    return save_png(fig, path)


def render(out: Path, p: Plan, folder: Path, parts: Sequence[str]) -> list[Path]:
    """Write the outputs of ``parts`` from the finished runs of ``p`` in ``out/results.csv``."""
    rows = read_results(out / "results.csv", required=REQUIRED)
    written = []
    with locked(out / "tables.md"):
        if "tables" in parts:
            replace(out / "tables.md", render_tables(rows, p, folder))
            written.append(out / "tables.md")
        if "ieb" in parts:
            table = ieb_rows(rows, p)
            written += [write_csv(out / "ieb.csv", IEB_COLUMNS, table), out / "ieb.md"]
            replace(out / "ieb.md", render_ieb(table))
        for part, key, symbol, what in (("fig6", "lambda_c", "λ_c", "counterfactual risk weight λ_c"),
                                        ("fig7", "lambda_g", "λ_g", "global (CTCVR) risk weight λ_g")):
            if part in parts:
                table = sweep_rows(rows, getattr(p, part), key)
                columns = ("method", key, "seeds", *(f"{m}_{s}" for m in SWEEP_METRICS for s in ("mean", "std")))
                written.append(write_csv(out / f"{part}.csv", columns, table))
                written.append(plot_sweep(table, key, symbol, f"Figure {part[-1]}: test performance against the "
                                          f"{what}", out / f"{part}.png"))
    return written


# ---------------------------------------------------------------------------------------- command line


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _positive(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(float(text)) if "e" in text.lower() else int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a positive integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} takes a positive integer, got {text!r}")
        return value
    return parse


def _positive_float(flag: str, zero: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"{flag} takes a finite number {'>= 0' if zero else '> 0'}, got {text!r}")
        return value
    return parse


def _grid(flag: str) -> Callable[[str], list[float]]:
    one = _positive_float(flag, zero=True)

    def parse(text: str) -> list[float]:
        values = [one(t) for t in text.split(",") if t.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated numbers >= 0, got {text!r}")
        return list(dict.fromkeys(values))
    return parse


def _parts(text: str) -> list[str]:
    parts = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in parts if t not in PARTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"--parts takes a comma-separated subset of {', '.join(PARTS)}, got {text!r}")
    return parts


def _methods_flag(text: str) -> list[Method]:
    try:
        return parse_methods(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub, common: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """The ``escm2`` subcommand of ``python -m reproduce``."""
    p = sub.add_parser("escm2", help="the ESCM2 paper's Tables II, III, VI and Figures 6, 7 on a simulated log",
                       description=__doc__.split("\n\n")[0] + " Trains the runs not finished in OUT/escm2/results.csv "
                       "and writes tables.md, ieb.csv, ieb.md, fig6.png/csv and fig7.png/csv there.")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--exposures", type=_positive("--exposures"), default=None,
                      help="simulate this many exposures (python -m simulate ctcvr's defaults) into "
                           "OUT/data/ctcvr-N-seed0 on first use, reused after (default 10000000)")
    data.add_argument("--data", metavar="DIR", help="a folder written by python -m simulate ctcvr instead")
    p.add_argument("--methods", type=_methods_flag, default=list(METHODS.values()),
                   help=f"comma-separated subset of {', '.join(METHODS)} (default all); Table VI adds esmm, "
                        "escm2_ips and escm2_dr")
    p.add_argument("--seeds", type=_positive("--seeds"), default=3, help=f"seeds per method, from {FIRST_SEED} on "
                                                                         "(default 3)")
    p.add_argument("--sweep-seeds", type=_positive("--sweep-seeds"), default=1,
                   help="seeds per point of Figures 6 and 7 (default 1)")
    p.add_argument("--parts", type=_parts, default=list(PARTS), help=f"outputs to make, of {', '.join(PARTS)} "
                                                                      "(default all)")
    p.add_argument("--no-sweeps", action="store_true", help="same as --parts tables,ieb")
    p.add_argument("--lambda-c-grid", type=_grid("--lambda-c-grid"), default=list(LAMBDA_C_GRID),
                   help=f"Figure 6's lambda_c values (default {','.join(map(str, LAMBDA_C_GRID))})")
    p.add_argument("--lambda-g-grid", type=_grid("--lambda-g-grid"), default=list(LAMBDA_G_GRID),
                   help=f"Figure 7's lambda_g values (default {','.join(map(str, LAMBDA_G_GRID))})")
    p.add_argument("--batch-size", type=_positive("--batch-size"), default=Protocol.batch_size,
                   help=f"exposures per mini-batch (default {Protocol.batch_size})")
    p.add_argument("--lr", type=_positive_float("--lr"), default=Protocol.lr, help="Adam's learning rate (default 1e-3, "
                                                                                    "chosen on validation; the paper's: 1e-4)")
    p.add_argument("--weight-decay", type=_positive_float("--weight-decay", zero=True), default=Protocol.weight_decay,
                   help="Adam's weight decay (default 1e-3, the paper's)")
    p.add_argument("--patience", type=_positive("--patience"), default=Protocol.patience,
                   help=f"epochs without a better validation score before stopping (default {Protocol.patience})")
    p.add_argument("--select", choices=SELECT, default=Protocol.select,
                   help="validation score choosing the epoch: cvr (CVR AUC over clicked exposures, default) or ctcvr")
    p.add_argument("--jobs", type=_positive("--jobs"), default=_cores(),
                   help=f"runs trained at once in worker processes, --threads threads each (default: the cores, "
                        f"{_cores()} here, one thread each unless --threads); at one --threads the results do not depend "
                        "on it")
    p.add_argument("--out", default="results", help="output folder; files go to OUT/escm2 (default results)")
    p.add_argument("--table-only", action="store_true", help="train nothing: render from the finished runs")
    common(p)
    for action in p._actions:  # the shared flags, as this command reads them
        if "--max-epochs" in action.option_strings:
            action.help = f"epochs at most (default {Protocol.max_epochs})"
        elif "--device" in action.option_strings:
            action.help = "cpu (the only device this command trains on)"
        elif {"--data-dir", "--config-dir"} & set(action.option_strings):
            action.help = argparse.SUPPRESS  # the BADR paper's data sets and configs: not read here
    return p


def run_command(args: argparse.Namespace) -> int:
    if str(args.device) != "cpu":
        raise ValueError(f"--device {args.device}: escm2 trains on the CPU only")
    out_root = check_folder(args.out, "--out")
    out = check_folder(out_root / "escm2", "--out's escm2 folder")
    if is_writer():
        remove_stale_temporaries(out)
    parts = ["tables", "ieb"] if args.no_sweeps else args.parts
    exposures = args.exposures if args.exposures is not None or args.data else DEFAULT_EXPOSURES
    writer = is_writer()
    if writer:  # under torchrun rank 0 simulates a missing log while the others wait
        folder = data_folder(out_root, exposures, args.data, log=lambda line: print(line, file=sys.stderr))
    if world_size() > 1:
        torch.distributed.barrier()
        if not writer:
            folder = data_folder(out_root, exposures, args.data)
    protocol = Protocol(lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                        max_epochs=args.max_epochs or Protocol.max_epochs, patience=args.patience, select=args.select)
    the_plan = plan(folder, args.methods, args.seeds, protocol, parts, args.lambda_c_grid, args.lambda_g_grid,
                    args.sweep_seeds)
    runs = the_plan.runs()
    trained = 0
    if not args.table_only:
        if writer:
            print(f"escm2: {len(runs)} run(s) on {folder} ({', '.join(parts)})"
                  + (f", each on {world_size()} ranks" if world_size() > 1 else ""), file=sys.stderr)
        trained = execute(folder, runs, out, jobs=1 if world_size() > 1 else args.jobs, threads=args.threads,
                          on_row=lambda row: render(out, the_plan, folder, [t for t in parts if t in ("tables", "ieb")]))
    if not writer:  # rank 0 renders, from the rows it wrote
        return 0
    written = render(out, the_plan, folder, parts)
    for path in written:
        if path.suffix == ".md":
            print(path.read_text())
    print(f"trained {trained} run(s); wrote {', '.join(str(w) for w in written)}", file=sys.stderr)
    return 0
