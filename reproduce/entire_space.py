"""One run of an entire-space method (ESMM, Multi-IPS / -DR, ESCM2-IPS / -DR / -BADR, DDPO) with
the MF backbone: the Table 3 rows of the multi-task baselines, debiasing components only (BADR
paper, footnote 6).

The data.  The exposure space D is every user-item pair of the training matrix: the clicked
training pairs (``o = 1``, with their conversion labels ``r``) and every other pair (``o = 0``,
its label unknown).  The label tensor holds :data:`UNCLICKED_LABEL` (NaN) at the unclicked pairs;
the objectives (:mod:`estimators.multitask`) replace it by 0 before any arithmetic, so it reaches
neither a loss nor a gradient (``tests/test_entire_space_rows.py`` trains with garbage there and
gets bit-identical results).  No validation or test label is read by the training.

The model.  :class:`estimators.training.EntireSpaceMF`: one bias-free MF per tower (CTR, CVR, and
the imputation tower of Multi-DR / ESCM2-DR / ESCM2-BADR or DDPO's conversion tower), of the
config's ``dim``, torch's N(0, 1) initial embeddings like the other rows' MFs; one Adam over all
towers with the entry's ``lr`` and ``weight_decay``.  The CTR tower is the propensity: the
counterfactual terms weigh the clicked pairs by ``1 / clip(sigmoid(ctr), gamma, 1)``, detached
(the CTR tower is trained by the CTR and CTCVR terms only), ``gamma`` the entry's clipping floor
(weights at most ``1 / gamma``).  The objective is the ENTIRE_SPACE entry named by the method,
with the entry's ``lambda_c`` / ``lambda_g`` / ``lambda_p``.

Sampling.  Each epoch draws one permutation of D from the run's seeded generator and walks its
first ``exposures_per_epoch`` pairs (the config's "entire_space" block; "all": the whole
permutation) in steps of ``batch_size`` exposures, the last partial step dropped as the other
rows' epochs drop theirs.  A uniform sample of D keeps the natural click rate in expectation, so
every step's mean over its exposures is an unbiased estimate of the objective's mean over D (the
objectives are written as means over D; a sample enriched in clicks would change them).  Coat
walks all of D (87,000 pairs) each epoch; Yahoo! R3 (15.4M pairs) and KuaiRec (4.7M) a fixed
number per epoch, about 10 times their clicked pairs, so that an epoch costs about what it
costs the DR rows.

Stopping.  The published rule of the other rows (:class:`estimators.training.EarlyStopping`,
the config's ``tol`` and ``patience``) on the epoch sum of the steps' objective, at most
``max_epochs`` epochs: training loss only, no validation-based selection.  The validation loss
and AUC per epoch are recorded in the history (``history``) and drive nothing.  A loss or a
parameter that stops being finite raises :class:`estimators.training.Diverged`.

Data parallel.  Under ``torchrun`` every rank walks the same permutation and trains its
``tensor_split`` part of each step's exposures, the towers in ``DistributedDataParallel`` and the
objective's means (and ESCM2-BADR's normaliser) over the global step (``reduction="global"``,
:mod:`estimators.distributed`), so a step is one process's step on the whole batch up to float
rounding; the epoch's monitor is the ranks' shares summed, the same on every rank.

Evaluation.  The CVR tower's ``sigmoid`` on the test (or, for tuning, validation) pairs, by
:func:`reproduce.train.evaluate`, exactly as the other rows.

Tuning.  Each data set's entries were tuned on the validation split (lr and weight decay; the
lambdas at the papers' values), as their ``status`` in ``reproduce/configs`` records; ``table3``
prints the rows beside the paper's.  Test AUC, 5 seeds, ours (the paper's Table 3), Coat / Yahoo!
R3 / KuaiRec: ESCM2-IPS 0.737 (0.739) / 0.697 (0.711) / 0.773 (0.777); ESCM2-DR 0.738 (0.734) /
0.697 (0.717) / 0.779 (0.781); Multi-IPS 0.690 (0.734) / 0.666 (0.711) / 0.762 (0.768); Multi-DR
0.704 (0.756) / 0.678 (0.717) / 0.760 (0.777); DDPO 0.669 (0.761) / 0.643 (0.720) / 0.717 (0.817);
extra rows ESMM 0.666 / 0.645 / 0.716, ESCM2-BADR 0.733 / 0.624 / 0.767.  ESCM2 is reproduced on
Coat and KuaiRec and 0.014-0.020 short on Yahoo! R3; Multi-IPS / -DR and above all DDPO are not.
A protocol difference we know of: their papers' towers share embeddings, which footnote 6's
debiasing-components-only MF leaves out (untested as the explanation).  DDPO as its paper writes
it scores below our earlier, partial reading of it (0.698 / 0.664 / 0.763).

Two consequences of the MF backbone (towers that share nothing), seen on Coat:

- The DR regularisers (Multi-DR, ESCM2-DR) give the CVR tower the gradient of their IPS
  counterparts: ``delta_hat`` is detached in the error term and is no function of the CVR logit,
  so ``d/db mean_D [delta_hat + o (delta - delta_hat) / p] = d/db mean_D o delta / p``.  With the
  same seed and hyperparameters the CVR towers of Multi-DR and Multi-IPS (ESCM2-DR and ESCM2-IPS)
  are the same; only the monitored loss, hence the stopping epoch, differs.  In the ESCM2 paper
  the imputation tower acts on the CVR tower through shared embeddings, which footnote 6's
  "debiasing components only" leaves out.
- The objectives are means over D, where the clicked pairs are a few per cent, so an embedding
  row's data gradient is small beside coupled L2 weight decay: Adam then drives the rows to 0, a
  saddle of the dot product, and every prediction becomes 0.5 (validation AUC 0.5000 at weight
  decay 1e-4 on Coat), while a little less decay (5e-5) is the best tuned value.  On Yahoo! R3
  and KuaiRec, whose clicked pairs are a smaller share of D, 1e-5 already does it to ESMM and
  ESCM2-IPS / -DR (validation AUC 0.50), whose tuned values there are 1e-6 to 3e-6.
"""
from __future__ import annotations

import math
import time
from typing import Any, Optional

import numpy as np
import torch

from cvrdata import CVRData
from estimators import _ext
from estimators.training import Diverged, EarlyStopping, EntireSpaceLoss, EntireSpaceMF
from estimators.training.optim import fused_adam

from .config import Config
from .distributed import world_size
from .methods import Method
from .metrics import auc
from .progress import Progress

#: The label stored at the unclicked exposures: never read (the objectives mask it before use).
UNCLICKED_LABEL = math.nan


def exposure_space(data: CVRData, device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor]:
    """Click indicators ``o`` and labels ``r`` of every pair of D, flat in row-major order
    (``u * n_items + i``): ``o = 1`` and the training label at the clicked training pairs, ``o = 0``
    and :data:`UNCLICKED_LABEL` elsewhere."""
    o = torch.from_numpy(data.click_matrix()).to(device)
    r = torch.full((data.n_pairs,), UNCLICKED_LABEL, dtype=torch.float32)
    r[torch.from_numpy(data.flat_index(data.x_train))] = torch.from_numpy(np.asarray(data.y_train, np.float32))
    return o, r.to(device)


def build(method: Method, params: dict[str, Any], n_users: int, n_items: int,
          dim: int) -> tuple[EntireSpaceMF, EntireSpaceLoss]:
    """The MF backbone with the towers ``method``'s objective reads, and the objective with the
    entry's parameters (``gamma``, ``lambda_c``, ...), as a run trains them."""
    spec = method.entire_space_spec
    objective = EntireSpaceLoss(method.entire_space, **{k: params[k] for k in spec.params})
    return EntireSpaceMF(n_users, n_items, dim, objective.towers), objective


class CVRTower:
    """The CVR tower of an entire-space model as :func:`reproduce.train.evaluate` reads a learner."""

    def __init__(self, model: EntireSpaceMF, device: torch.device) -> None:
        self.model, self.device = model, device

    @torch.no_grad()
    def predict(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model.models["cvr"](users, items))


def run_entire_space(data: CVRData, cfg: Config, method: Method, params: dict[str, Any], seed: int, *,
                     max_epochs: int, split: str = "test", label: str = "", show_progress: bool = True,
                     device: torch.device = torch.device("cpu"), history: bool = False,
                     record_test_loss: bool = False) -> dict[str, Any]:
    """Train the entire-space ``method`` with ``params`` (module docstring); return the metrics on
    ``split`` and the timings, with the keys of :func:`reproduce.train.run_one`'s result."""
    from .train import _log_loss, _scores, evaluate, final_val_auc  # train imports this module lazily

    spec = method.entire_space_spec
    if spec is None:
        raise ValueError(f"method {method.name!r} is not an entire-space method")
    if "gamma" in spec.params and not 0.0 < params["gamma"] <= 1.0:
        raise ValueError(f"gamma (propensity clipping floor) must lie in (0, 1]; got {params['gamma']}")
    start = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator(device).manual_seed(seed)
    progress = Progress(label or f"{data.name} {method.name} seed {seed}", max_epochs) if show_progress else None

    model, objective = build(method, params, data.n_users, data.n_items, cfg.dim)
    model = model.to(device)
    world = world_size()
    rank = torch.distributed.get_rank() if world > 1 else 0
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimiser = fused_adam(model.parameters(), lr=params["lr"], weight_decay=params["weight_decay"])
    o, r = exposure_space(data, device)
    n_pairs = data.n_pairs
    per_epoch = min(cfg.entire_space.exposures_per_epoch or n_pairs, n_pairs)
    b = cfg.entire_space.batch_size
    n_steps = per_epoch // b
    if n_steps == 0:
        raise ValueError(f"{cfg.path}: entire_space.batch_size {b} exceeds the {per_epoch} exposures per epoch")
    learner = CVRTower(model, device)
    stop = EarlyStopping(cfg.early_stopping.tol, cfg.early_stopping.patience)
    rows: list[dict[str, Any]] = []
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        # the extension's cache-friendly shuffle: torch.randperm of Yahoo! R3's 15.4M pairs took a sixth of an epoch
        perm = _ext.randperm(n_pairs, generator, device)[:per_epoch]
        monitor = 0.0
        for j in range(n_steps):
            idx = perm[j * b:(j + 1) * b]
            if world > 1:  # this rank's part of the step's exposures
                idx = idx.tensor_split(world)[rank]
            users, items = idx // data.n_items, idx % data.n_items
            loss = objective.from_outputs(net(users, items), o[idx], r[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            monitor += float(loss.detach())
        if world > 1:  # each rank's share of every step's loss: their mean is the global monitor
            total = torch.tensor(monitor, dtype=torch.float64, device=device)
            torch.distributed.all_reduce(total)
            monitor = float(total) / world
        if not math.isfinite(monitor):
            _diverged(progress, f"{data.name} {method.name} seed {seed}: training loss is {monitor} at epoch "
                                f"{epoch}; lower the learning rate")
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            _diverged(progress, f"{data.name} {method.name} seed {seed}: a model parameter is NaN or infinite "
                                f"after epoch {epoch}; lower the learning rate")
        if progress is not None:
            progress.update(epoch, "fit epochs", f"loss {monitor:.5g}")
        if history:
            row = {"stage": "fit", "epoch": epoch, "prediction_loss": monitor / n_steps, "monitor": monitor,
                   "seconds": time.perf_counter() - start}
            scores = _scores(learner, data.x_val)
            row["val_loss"], row["val_auc"] = _log_loss(scores, data.y_val), auc(scores.numpy(), data.y_val)
            if record_test_loss:
                row["test_loss"] = _log_loss(_scores(learner, data.x_test), data.y_test)
            rows.append(row)
        if stop.should_stop(monitor):
            break
    fit_seconds = time.perf_counter() - start
    x_eval, y_eval = (data.x_test, data.y_test) if split == "test" else (data.x_val, data.y_val)
    metrics = evaluate(learner, x_eval, y_eval, cfg.k)
    seconds = time.perf_counter() - start
    if progress is not None:
        progress.close(f"done: AUC {metrics['auc']:.4f} NDCG@{cfg.k} {metrics['ndcg']:.4f} "
                       f"Recall@{cfg.k} {metrics['recall']:.4f}  {epoch} epochs, {seconds:.1f}s")
    result = {**metrics, "val_auc": final_val_auc(learner, data, split, metrics, rows), "k": cfg.k,
              "seconds": seconds, "epochs": epoch, "propensity_epochs": 0,
              "propensity_seconds": 0.0, "propensity_cached": False, "fit_seconds": fit_seconds}
    if history:
        result["history"] = rows
    return result


def _diverged(progress: Optional[Progress], message: str) -> None:
    if progress is not None:
        progress.close(f"diverged: {message}")
    raise Diverged(message)
