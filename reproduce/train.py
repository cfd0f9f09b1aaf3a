"""One run of one method on one data set with one seed, as the published protocol does it.

1. ``torch.manual_seed(seed)``; one ``torch.Generator`` seeded with ``seed`` drives every
   permutation and every sampled pair.
2. Propensities (all methods but MF): logistic regression on concatenated user and item
   embeddings (size ``dim``), fitted on the click indicators of ALL user-item pairs with the
   squared error (``propensity_loss``), Adam, batches of ``prop_batch_size`` from a fresh
   permutation per epoch, at most ``propensity_max_epochs`` epochs with the published early
   stopping; then frozen and clipped to ``[gamma, 1]``.  A method with a propensity adjustment
   (:attr:`reproduce.methods.Method.propensity_adjustment`; D-DR) then replaces the clipped
   table by the adjustment of it, ``f(p_hat)^alpha`` (Ha et al. 2024, eqs. 2 and 5), with its
   parameters from the method's prefixed keys (``ddr_w``); joint learning reads that table.
3. Joint learning (:class:`estimators.JointLearner`, :func:`estimators.fit`): each epoch
   shuffles the clicked training pairs and walks them in batches of ``batch_size`` (the last
   partial batch dropped, as the published code does), one step per batch; at most
   ``max_epochs`` (100) epochs with the published early stopping on the epoch sum of
   ``sum_B w * l(y_hat', r)`` (training loss only: no validation-based selection).  Every
   cross-entropy is computed on probabilities as the published code does (``"cross_entropy": "clamped"`` in the configs; see
   :func:`estimators.joint_loss.bce_clamped`): with the exact logit form the imputation model
   of the tuned BADR runs diverges and Coat's AUC drops from 0.76 to 0.62.  The published code
   takes each step's G*b pairs U as consecutive slices of one permutation of all pairs per
   epoch (``"sampling": "permutation"``, Coat's config); ``"uniform"`` draws them independently
   with replacement (the same probability per pair and step) and returns them in user order,
   which on Yahoo! R3 saves a permutation of 15.4M pairs per epoch and makes every pass over U
   read the user tables in order (BADR, seed 2024: AUC 0.7330, paper 0.7332).  On Coat the
   published draw is measurably better (BADR, 5 seeds: AUC 0.7664 +- 0.0044 permutation,
   0.7632 +- 0.0029 uniform; paper 0.7694).  Every option that decides a run is in its
   signature (:func:`reproduce.config.run_options`).
   ``"imputed_error"`` (default ``"paper"`` when absent) is how the methods with a DR-family
   imputation loss (DR-JL, MRDR, DR-BIAS, DR-MSE and BADR's Figure 1 ablations) write the
   imputed error in the imputation step: ``"paper"``, ``l(y_hat, y_tilde)`` with the gradient
   through the target; ``"published"``, ``l(y_tilde, y_hat)``, input and target swapped as the
   published DR-JL lineage code (behind the baselines' numbers in Table 3) does.  BADR's own
   loss ignores the key (it defines its own, swapped, form); see
   :func:`reproduce.config.imputed_error`.  The configs' protocol key stays ``"paper"``: on
   Coat, DR-JL re-tuned with ``"published"`` (60 trials x 2 seeds, search seeds 1 and 11) kept
   the values tuned with ``"paper"`` and scored lower (5 seeds: validation AUC 0.7095 vs 0.7215,
   test 0.7196 +- 0.0029 vs 0.7348 +- 0.0020; IPS 0.7545).  The entries that override it chose
   ``"published"`` on the validation split (their statuses give the scores): MRDR, DR-BIAS and
   DR-MSE on all three data sets, DR-JL on Yahoo! R3, the Figure 1 ablations on Coat and
   Yahoo! R3.
   KuaiRec and Yahoo! R3 (the baselines' configs): the BADR authors' KuaiRec propensity weight
   decay (0.94) fits a constant ``p_hat = 0.447`` for every pair (click rate 0.043, propensity
   AUC 0.50), harmless to BADR's self-normalised estimator but not to IPS (then MF with a
   rescaled loss) or DR-JL (clicked errors weighted 2.2 instead of ~1/p); the shared block is
   tuned there with IPS (``p_hat`` 0.005-0.41, AUC 0.70).  Yahoo! R3's block ranks the pairs
   well (``p_hat`` 0.001-0.89, AUC 0.80) but is nearly flat where the clicks are (seed 2024: median
   0.032 over the clicked pairs, 94 % of them below 0.2): an additive user + item logit sees
   activity and popularity, not Yahoo! R3's rating-dependent missingness, and IPS there
   approaches MF from below as clipping weakens its correction (ips's status in
   ``configs/yahoo.json``).  The imputation MF starts at N(0, 1) embeddings of
   size 64, logits of sd 8: its pseudo-labels on all pairs are random 0/1 labels, its
   ``"paper"`` gradient (through ``sigmoid(x_t)``) vanishes (KuaiRec: imputation AUC 0.50
   for 20-30 epochs), and the squared loss, minimised at ``sigmoid(x_t) = r``, then drives the
   logits to |x_t| ~ 900.  DR-JL's tuned values there keep G = 1 and shrink the imputation MF
   with a large ``imp_weight_decay`` (KuaiRec 0.4, Yahoo! R3 0.3), which random search over the
   paper's ranges rarely drew.
   StableDR (:attr:`reproduce.methods.Method.cycle`) trains by cycle learning instead
   (:class:`estimators.training.CycleLearner`): its propensity model starts from the UNCLIPPED
   table of step 2 (fitted or cached alike) and keeps learning, every step, from the click matrix
   and the imputed errors (never a label); every propensity that weighs is clipped at ``gamma``.
   DCE-TDR (:attr:`reproduce.methods.Method.calibration`) first holds out :data:`DCE_HOLDOUT` of
   each user's clicked training pairs (:func:`calibration_split`, drawn by the seed): steps 2-3 see
   only the other pairs; between them the propensity model's calibrator is fitted on the held-out
   clicks and clips to ``[gamma, 1]`` in place of ``p_hat``, and :class:`estimators.training.DCELearner`
   calibrates the imputation model on the held-out conversions after every epoch
   (:mod:`estimators.training.dce`).
4. Evaluation of the final model on the test (or, for tuning, the validation) pairs.

The propensity-free methods (:attr:`reproduce.methods.Method.propensity_free`: CVIB, DIB, DAMF)
skip step 2: step 3 trains their own model and objective
(:class:`estimators.training.PropensityFreeLearner`, pairs U drawn uniformly from all pairs
where the objective reads them) with the same loop, early stopping on the factual cross-entropy
of the clicked pairs (weights 1, the MF row's monitor), history and evaluation.

The entire-space methods (:attr:`reproduce.methods.Method.entire_space`: ESMM, Multi-IPS / -DR,
ESCM2-IPS / -DR / -BADR, DDPO) skip steps 2-3: :func:`run_one` hands them to
:func:`reproduce.entire_space.run_entire_space`, which trains the MF backbone's towers over the
exposures with the same seeding, early-stopping rule, history rows and evaluation.

A run may also record its history (:data:`HISTORY_COLUMNS`): one row per propensity epoch (its
loss) and one per fit epoch (the mean prediction and imputation losses, the monitored sum, and
the loss and AUC of the model on the validation pairs, which are read for the record only and
drive nothing).  The loss on the test pairs per epoch is recorded only when asked
(``record_test_loss``, for figures); it too drives nothing.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from cvrdata import CVRData
from estimators import backend
from estimators.calibration import holdout_clicked
from estimators.training import (CycleConfig, CycleLearner, DCEConfig, DCELearner, Diverged, EpochStats,
                                 JointConfig, JointLearner, PropensityFreeConfig, PropensityFreeLearner,
                                 PropensityModel, fit, fit_propensity, fit_propensity_calibration,
                                 propensity_table)

from .config import Config
from .distributed import check_ranks_agree
from .files import replace_with
from .methods import Method
from .metrics import auc, ranking_at_k
from .progress import Progress

#: Columns of a run's history rows (``history.csv`` adds the run's key in front).
HISTORY_COLUMNS = ("stage", "epoch", "propensity_loss", "prediction_loss", "imputation_loss", "monitor", "val_loss",
                   "val_auc", "test_loss", "seconds")


def setup_runtime(threads: Optional[int] = None) -> None:
    """Thread count, flush-to-zero for denormals and a malloc that keeps big buffers.

    Denormals: Adam's second-moment estimates of rarely updated rows decay into the denormal
    range, where CPU arithmetic is ~100x slower (one ``sqrt`` over Coat's embeddings took 5 ms).
    Allocator: each step allocates several ~10 MB temporaries; glibc returns them to the OS and
    page-faults them back in on every step unless the mmap / trim thresholds are raised.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be a positive integer; got {threads}")
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device that exists here (``ValueError`` naming ``--device`` otherwise)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device: {device!r} is not a device name such as cpu or cuda ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda; got {device}")
    return device


def fit_propensities(data: CVRData, cfg: Config, params: dict[str, Any], generator: torch.Generator,
                     progress: Optional[Progress] = None, device: torch.device = torch.device("cpu"),
                     model: Optional[PropensityModel] = None) -> tuple[torch.Tensor, int, list[float]]:
    """Unclipped propensities ``(n_users, n_items)`` of the published LR model, its epoch count and
    the loss of each epoch.  ``model``: the model to fit (default: a fresh one, created first, as a
    caller that keeps the model creates it: DR-MSE-GPL refits it in its rounds)."""
    model = PropensityModel(data.n_users, data.n_items, cfg.dim).to(device) if model is None else model
    clicks = torch.from_numpy(data.click_matrix()).to(device)
    losses: list[float] = []

    def on_epoch(epoch: int, loss: float) -> None:
        losses.append(loss)
        if progress is not None:
            progress.update(0, f"propensity epoch {epoch}", f"loss {loss:.4g}")

    epochs = fit_propensity(model, clicks, lr=params["prop_lr"], weight_decay=params["prop_weight_decay"],
                            batch_size=params["prop_batch_size"], max_epochs=cfg.propensity_max_epochs,
                            loss=cfg.propensity_loss, tol=cfg.early_stopping.tol, patience=cfg.early_stopping.patience,
                            generator=generator, on_epoch=on_epoch)
    p = propensity_table(model, data.n_users, data.n_items)
    # A learning rate far too large sends the logits to +-1e3 or beyond at random (Coat, prop_lr 100:
    # 94 % of the pairs past +-30); a fitted logistic model saturates no pair's sigmoid.
    saturated = float(((p <= 1e-13) | (p >= 1.0) | ~torch.isfinite(p)).float().mean())
    if saturated > 0.5:
        raise Diverged(f"the propensity model diverged: {saturated:.0%} of the pairs' propensities are saturated at "
                       "0 or 1 (or not finite); lower prop_lr")
    return p, epochs, losses


def _data_signature(data: CVRData) -> str:
    """The data a propensity fit reads: the shape and the clicked training pairs."""
    digest = hashlib.sha256(np.ascontiguousarray(data.x_train).tobytes()).hexdigest()[:16]
    return f"{data.name}:{data.n_users}x{data.n_items}:{digest}"


class PropensityCache:
    """Fitted propensity models shared by the runs that would fit the same one.

    The fit depends only on the data, the seed, the propensity settings, the thread count and the
    device, and every baseline of a data set shares one propensity block (BADR and its ablations
    share the authors'), so a table of 12 methods needs 2 fits per data set and seed, not 11.  An
    entry stores the unclipped propensities with their shape and digest, the fitted model's
    parameters (DR-MSE-GPL continues the model in its rounds), the key they were fitted for, the
    epochs' losses and the states of the seeded generator and of torch's global generator
    after the fit, which a hit restores: the run then makes exactly the draws it would have made
    after fitting (same parameters, bitwise).  Entries are written whole or not at all
    (:func:`reproduce.files.replace_with`: a unique temporary file, fsynced, renamed; never through
    a planted link) and checked when read: an entry that is unreadable, truncated, a link, fitted
    for another key or shape, or holds propensities that are not finite numbers in (0, 1] or do
    not match their digest is refitted (and rewritten) with a warning, never used.  ``seconds`` of a
    run that hits counts the load only and its ``propensity_cached`` column says so.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def key(self, data: CVRData, cfg: Config, params: dict[str, Any], seed: int,
            device: torch.device = torch.device("cpu")) -> str:
        # The backend decides the epochs' permutations (estimators._ext.randperm) and the fit's kernels.
        fields = {"data": _data_signature(data), "seed": seed, "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "backend": backend(), "dim": cfg.dim, "loss": cfg.propensity_loss,
                  "max_epochs": cfg.propensity_max_epochs,
                  "early_stopping": {"tol": cfg.early_stopping.tol, "patience": cfg.early_stopping.patience},
                  **{k: params[k] for k in ("prop_lr", "prop_weight_decay", "prop_batch_size")}}
        if device.type != "cpu":
            fields["device"] = str(device)
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
        return f"{data.name}-{seed}-{digest}"

    def load(self, key: str, generator: torch.Generator, shape: tuple[int, int],
             device: torch.device = torch.device("cpu"),
             model: Optional[torch.nn.Module] = None) -> Optional[tuple[torch.Tensor, int, list[float]]]:
        """The entry of ``key`` (propensities of ``shape`` on ``device``, epochs, losses), the
        generators' states restored and, given ``model``, the fitted parameters loaded into it; None
        when there is none or it fails its checks (warned)."""
        path = self.root / f"{key}.pt"
        if not path.exists() and not path.is_symlink():
            return None
        try:
            propensities, epochs, losses, states, saved = self._checked(path, key, shape, generator)
            if model is not None:
                _check_state(saved, model)
        except ValueError as exc:
            warnings.warn(f"propensity cache: {path} is unusable ({exc}); the propensity model is refitted")
            return None
        if model is not None:
            model.load_state_dict(saved)
        generator.set_state(states[0])
        torch.set_rng_state(states[1])
        return propensities.to(device), epochs, losses

    @staticmethod
    def _checked(path: Path, key: str, shape: tuple[int, int],
                 generator: torch.Generator) -> tuple[torch.Tensor, int, list[float], tuple, Any]:
        if path.is_symlink() or not path.is_file():
            raise ValueError("not a regular file")
        try:
            entry = torch.load(path, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated, empty or foreign: any failure means unusable
            first = (str(exc).splitlines() or [""])[0]  # torch's unpickling errors run over many lines
            raise ValueError(f"cannot be read: {type(exc).__name__}: {first}") from None
        if not isinstance(entry, dict) or entry.get("key") != key:
            raise ValueError("it was not written for this key")
        p = entry.get("propensities")
        if not isinstance(p, torch.Tensor) or not p.is_floating_point() or tuple(p.shape) != tuple(shape):
            raise ValueError(f"its propensities are not a float tensor of shape {tuple(shape)}")
        if not bool(torch.isfinite(p).all()) or not bool(((p > 0) & (p <= 1)).all()):
            raise ValueError("its propensities are not all finite numbers in (0, 1]")
        if entry.get("digest") != _digest(p):
            raise ValueError("its propensities do not match their digest")
        epochs, losses = entry.get("epochs"), entry.get("losses")
        if not isinstance(epochs, int) or epochs < 1 or not isinstance(losses, list) or len(losses) != epochs:
            raise ValueError("its epoch count or losses are missing")
        states = (entry.get("generator"), entry.get("global_rng"))
        try:  # on scratch generators: a bad state must not touch the run's
            torch.Generator(generator.device).set_state(states[0])
            torch.Generator().set_state(states[1])
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"its generator states are unusable ({exc})") from None
        return p, epochs, [float(v) for v in losses], states, entry.get("model")

    def save(self, key: str, propensities: torch.Tensor, epochs: int, losses: list[float],
             generator: torch.Generator, model: Optional[torch.nn.Module] = None) -> None:
        """Write the entry of ``key``: the fit's unclipped ``propensities``, ``epochs`` and
        ``losses``, the generators' states now and the fitted ``model``'s parameters."""
        self.root.mkdir(parents=True, exist_ok=True)
        p = propensities.detach().cpu().contiguous()
        entry = {"key": key, "propensities": p, "digest": _digest(p), "epochs": epochs, "losses": list(losses),
                 "generator": generator.get_state(), "global_rng": torch.get_rng_state()}
        if model is not None:
            entry["model"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        replace_with(self.root / f"{key}.pt", lambda f: torch.save(entry, f))


def _check_state(saved: Any, model: torch.nn.Module) -> None:
    """That ``saved`` holds a finite parameter of the right shape for each of ``model``'s."""
    if not isinstance(saved, dict):
        raise ValueError("it holds no model parameters (written by a version that kept the table only)")
    expected = model.state_dict()
    if set(saved) != set(expected):
        raise ValueError(f"its model parameters are {sorted(saved)}, not {sorted(expected)}")
    for name, value in saved.items():
        if not (isinstance(value, torch.Tensor) and value.shape == expected[name].shape
                and bool(torch.isfinite(value).all())):
            raise ValueError(f"its model parameter {name!r} is not a finite tensor of shape "
                             f"{tuple(expected[name].shape)}")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _scores(learner: JointLearner, x: np.ndarray) -> torch.Tensor:
    xt = torch.from_numpy(x).to(learner.device)
    return learner.predict(xt[:, 0], xt[:, 1]).to(torch.float64).cpu()


def _log_loss(scores: torch.Tensor, y: np.ndarray) -> float:
    """Mean cross-entropy of the predicted CVR against 0/1 labels (logs clamped at -100)."""
    return float(torch.nn.functional.binary_cross_entropy(scores, torch.from_numpy(y).to(torch.float64)))


#: The cut-offs of Table 6's ranking metrics, recorded for every run as ``ndcg@K``, ``recall@K`` and
#: ``precision@K`` (published variant) beside the data set's own ``ndcg`` and ``recall`` at ``k``.
RANKING_KS = (5, 50)
#: The result keys of :data:`RANKING_KS`.
RANKING_COLUMNS = tuple(f"{m}@{k}" for k in RANKING_KS for m in ("ndcg", "recall", "precision"))


def evaluate(learner: JointLearner, x: np.ndarray, y: np.ndarray, k: int) -> dict[str, float]:
    """AUC, NDCG@k and Recall@k (both variants) of the prediction model on pairs ``x``, and the
    ranking metrics at :data:`RANKING_KS` (:data:`RANKING_COLUMNS`)."""
    scores = _scores(learner, x).numpy()
    published = ranking_at_k(x[:, 0], scores, y, (k, *RANKING_KS))
    strict = ranking_at_k(x[:, 0], scores, y, [k], variant="strict")[k]
    return {"auc": auc(scores, y), "ndcg": published[k]["ndcg"], "recall": published[k]["recall"],
            "ndcg_strict": strict["ndcg"], "recall_strict": strict["recall"],
            **{f"{m}@{c}": published[c][m] for c in RANKING_KS for m in ("ndcg", "recall", "precision")}}


def final_val_auc(learner: Any, data: CVRData, split: str, metrics: dict[str, float],
                  history: list[dict[str, Any]]) -> float:
    """The final model's validation AUC, for the chance-level check (:func:`run_or_diverged`):
    ``metrics``' AUC when they are on the validation split, else the last history row's, else
    computed."""
    if split == "val":
        return metrics["auc"]
    if history and history[-1].get("stage") == "fit" and history[-1].get("val_auc") is not None:
        return history[-1]["val_auc"]
    return auc(_scores(learner, data.x_val).numpy(), data.y_val)


#: DCE's calibration split (:attr:`reproduce.methods.Method.calibration`): the share of each user's
#: clicked training pairs held out to calibrate (the public DCE code's 10 %).
DCE_HOLDOUT = 0.1


def calibration_split(data: CVRData, seed: int) -> tuple[CVRData, tuple[np.ndarray, np.ndarray], float]:
    """DCE's protocol: ``data`` with :data:`DCE_HOLDOUT` of each user's clicked training pairs held out
    (:func:`estimators.calibration.holdout_clicked`, drawn by its own generator seeded with ``seed``, so
    the split is fixed by the seed and leaves the run's draws alone), the held-out pairs and labels
    ``(x_v, y_v)``, and their share ``rho`` of the clicked pairs.  Only training pairs move: the
    validation and test splits are untouched and never read here."""
    x, y = data.x_train, data.y_train
    held = holdout_clicked(torch.from_numpy(np.ascontiguousarray(x[:, 0])).long(), DCE_HOLDOUT,
                           torch.Generator().manual_seed(seed)).numpy()
    fit_data = dataclasses.replace(data, x_train=x[~held], y_train=y[~held])
    return fit_data, (x[held], y[held]), float(held.mean())


def run_one(data: CVRData, cfg: Config, method: Method, params: dict[str, Any], seed: int, *,
            max_epochs: Optional[int] = None, split: str = "test", label: str = "", show_progress: bool = True,
            propensity_cache: Optional[PropensityCache] = None, device: str | torch.device = "cpu",
            history: bool = False, record_test_loss: bool = False) -> dict[str, Any]:
    """Train ``method`` with ``params`` on ``data`` with ``seed``; return metrics on ``split`` and timings.

    With ``propensity_cache``, a propensity model fitted before (same data, seed, settings, thread
    count and device) is loaded instead of refitted; the run is the same either way.  With
    ``history``, the result's ``"history"`` holds the run's per-epoch rows (:data:`HISTORY_COLUMNS`);
    ``record_test_loss`` adds the loss on the test pairs to them (for figures: it drives nothing).
    Raises :class:`estimators.training.Diverged` when the training loss stops being finite.
    """
    if split not in ("test", "val"):
        raise ValueError(f"`split` must be 'test' or 'val'; got {split!r}")
    max_epochs = cfg.max_epochs if max_epochs is None else max_epochs
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be a positive integer; got {max_epochs}")
    device = resolve_device(device)
    if method.entire_space is not None:  # the multi-task rows: their own loop over the exposures
        from .entire_space import run_entire_space

        return run_entire_space(data, cfg, method, params, seed, max_epochs=max_epochs, split=split, label=label,
                                show_progress=show_progress, device=device, history=history,
                                record_test_loss=record_test_loss)
    start = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator(device).manual_seed(seed)
    progress = Progress(label or f"{data.name} {method.name} seed {seed}", max_epochs) if show_progress else None
    rows: list[dict[str, Any]] = []
    train_data = data
    if method.calibration:  # DCE: 10 % of each user's clicked pairs calibrate, the rest train
        train_data, (x_v, y_v), rho = calibration_split(data, seed)
        dce = DCEConfig(n_experts=int(params["dce_experts"]), propcal_lr=params["dce_propcal_lr"],
                        propcal_weight_decay=params["dce_propcal_weight_decay"], impcal_lr=params["dce_impcal_lr"],
                        impcal_weight_decay=params["dce_impcal_weight_decay"],
                        impcal_steps=int(params["dce_impcal_steps"]))
        xv = torch.from_numpy(x_v).to(device)
        calibration = (xv[:, 0].contiguous(), xv[:, 1].contiguous(), torch.from_numpy(y_v).to(device))

    prop_epochs, cached = 0, False
    # DR-MSE-GPL refits its propensity model after round 0: it keeps the model, which a cache hit
    # loads from the entry; its round-0 fit is the DR-MSE row's, draw for draw.
    prop_model = (PropensityModel(data.n_users, data.n_items, cfg.dim).to(device)
                  if method.propensity_objective is not None else None)
    if method.uses_propensity:
        if not 0.0 < params["gamma"] <= 1.0:
            raise ValueError(f"gamma (propensity clipping floor) must lie in (0, 1]; got {params['gamma']}")
        key = None if propensity_cache is None else propensity_cache.key(train_data, cfg, params, seed, device)
        hit = (None if key is None
               else propensity_cache.load(key, generator, (data.n_users, data.n_items), device, model=prop_model))
        if hit is None:
            # created first, as fit_propensities would: a cache entry then holds the fitted model too
            model = (prop_model if prop_model is not None
                     else PropensityModel(train_data.n_users, train_data.n_items, cfg.dim).to(device))
            try:
                p_hat, prop_epochs, prop_losses = fit_propensities(train_data, cfg, params, generator, progress,
                                                                   device, model=model)
            except Diverged as exc:
                raise Diverged(f"{data.name} {method.name} seed {seed}: {exc}") from None
            if key is not None:
                propensity_cache.save(key, p_hat, prop_epochs, prop_losses, generator, model=model)
        else:
            (p_hat, prop_epochs, prop_losses), cached = hit, True
        rows += [{"stage": "propensity", "epoch": e, "propensity_loss": loss}
                 for e, loss in enumerate(prop_losses, start=1)]
        p_fitted = p_hat  # unclipped: cycle learning (StableDR) starts its propensity model from it
        if method.calibration:  # DCE (C3): p_bar = clip(C / rho, gamma, 1) from the held-out clicks
            p_hat = fit_propensity_calibration(p_hat, calibration[0], calibration[1], rho, params["gamma"], dce,
                                               generator)[0]
        p_hat = p_hat.clamp(params["gamma"], 1.0)
        adjustment = method.propensity_adjustment_spec
        if adjustment is not None:  # D-DR: f(p_hat)^alpha of the clipped table, eqs. (2), (5)
            p_hat = adjustment.function(p_hat, **{p: params[key] for key, p in method.adjustment_keys.items()})
    elif method.propensity_free is None:  # MF: no propensity model; w = 1 everywhere
        p_hat = torch.ones(data.n_users, data.n_items, device=device)
    prop_seconds = time.perf_counter() - start

    if method.propensity_free is not None:  # its own model and objective on the clicked pairs (and U)
        pcfg = PropensityFreeConfig(method.propensity_free, cfg.dim, int(params.get("G", 1)), params["lr"],
                                    params["weight_decay"],
                                    params={p: params[key] for key, p in method.objective_keys.items()},
                                    **cfg.run_options(method))
        learner = PropensityFreeLearner(data.n_users, data.n_items, pcfg, generator=generator, device=device)
    else:
        needs_imp = method.imputation_loss is not None
        jcfg = JointConfig(estimator=method.estimator, imputation_loss=method.imputation_loss, dim=cfg.dim,
                           G=int(params["G"]) if needs_imp else 1, lr=params["lr"],
                           weight_decay=params["weight_decay"], imp_lr=params.get("imp_lr", 0.02),
                           imp_weight_decay=params.get("imp_weight_decay", 0.0), alpha=params.get("alpha", 0.5),
                           **cfg.run_options(method))
        if method.cycle:  # StableDR: the propensity model keeps learning, from the click matrix only
            ccfg = CycleConfig(eta=params["cycle_eta"], prop_lr=params["cycle_prop_lr"],
                               prop_weight_decay=params["cycle_prop_weight_decay"], gamma=params["gamma"])
            learner = CycleLearner(p_fitted, torch.from_numpy(train_data.click_matrix()).to(device), jcfg, ccfg,
                                   generator=generator)
        elif method.calibration:
            learner = DCELearner(p_hat, jcfg, dce, calibration, generator=generator)
        else:
            learner = JointLearner(p_hat, jcfg, generator=generator)
    x = torch.from_numpy(train_data.x_train).to(device)
    users, items, r = x[:, 0].contiguous(), x[:, 1].contiguous(), torch.from_numpy(train_data.y_train).to(device)

    def on_epoch(stats: EpochStats) -> None:
        if progress is not None:
            progress.update(stats.epoch, "fit epochs", f"loss {stats.monitor:.5g}")
        if history:
            row = {"stage": "fit", "epoch": stats.epoch, "prediction_loss": stats.prediction_loss,
                   "imputation_loss": stats.imputation_loss, "monitor": stats.monitor,
                   "seconds": prop_seconds + stats.seconds}
            scores = _scores(learner, data.x_val)
            row["val_loss"], row["val_auc"] = _log_loss(scores, data.y_val), auc(scores.numpy(), data.y_val)
            if record_test_loss:
                row["test_loss"] = _log_loss(_scores(learner, data.x_test), data.y_test)
            rows.append(row)

    try:
        epochs = fit(learner, users, items, r, batch_size=cfg.batch_size, max_epochs=max_epochs,
                     tol=cfg.early_stopping.tol, patience=cfg.early_stopping.patience, generator=generator,
                     on_epoch=on_epoch)
        if prop_model is not None:  # DR-MSE-GPL: rounds of propensity refits and joint epochs after round 0
            from .gpl import gpl_rounds

            more, gpl_prop_epochs = gpl_rounds(learner, prop_model, train_data, cfg, method, params, generator, users,
                                               items, r, epochs, rows, on_epoch, prop_epochs, prop_seconds)
            epochs, prop_epochs = epochs + more, prop_epochs + gpl_prop_epochs
    except Diverged as exc:
        if progress is not None:
            progress.close(f"diverged: {exc}")
        raise Diverged(f"{data.name} {method.name} seed {seed}: {exc}") from None
    epoch = len(epochs)
    models = [m for m in (learner.prediction, getattr(learner, "imputation", None), getattr(learner, "propensity", None))
              if m is not None]
    check_ranks_agree(f"{method.name} models and propensities", *(p.detach() for m in models for p in m.parameters()),
                      *([] if getattr(learner, "p_hat", None) is None else [learner.p_hat]))
    fit_seconds = time.perf_counter() - start - prop_seconds
    x_eval, y_eval = (data.x_test, data.y_test) if split == "test" else (data.x_val, data.y_val)
    metrics = evaluate(learner, x_eval, y_eval, cfg.k)
    val_auc = final_val_auc(learner, data, split, metrics, rows)
    seconds = time.perf_counter() - start
    if progress is not None:
        progress.close(f"done: AUC {metrics['auc']:.4f} NDCG@{cfg.k} {metrics['ndcg']:.4f} "
                       f"Recall@{cfg.k} {metrics['recall']:.4f}  {epoch} epochs, {seconds:.1f}s "
                       f"(propensity {prop_seconds:.1f}s)")
    result = {**metrics, "val_auc": val_auc, "k": cfg.k, "seconds": seconds, "epochs": epoch,
              "propensity_epochs": prop_epochs,
              "propensity_seconds": prop_seconds, "propensity_cached": cached, "fit_seconds": fit_seconds}
    if history:
        result["history"] = rows
    return result


#: A run whose final validation AUC lies within this of 0.5 ranks no better than chance: it is
#: recorded with status "chance" (kept in the means, counted in the tables), never as "ok".
CHANCE_MARGIN = 0.05


def run_or_diverged(data: CVRData, cfg: Config, method: Method, params: dict[str, Any], seed: int,
                    **kwargs: Any) -> dict[str, Any]:
    """:func:`run_one`'s result with ``status`` "ok", or "chance" when the final model's
    validation AUC is within :data:`CHANCE_MARGIN` of 0.5 (said on stderr); a run whose training
    diverges is not raised but said on stderr and returned with NaN metrics and ``status``
    "diverged", so that a resumed ``table3`` or search records it instead of retrying it."""
    start = time.perf_counter()
    try:
        result = run_one(data, cfg, method, params, seed, **kwargs)
    except FloatingPointError as exc:  # Diverged, from run_one
        print(exc, file=sys.stderr)
        nan = float("nan")
        return {"auc": nan, "ndcg": nan, "recall": nan, "ndcg_strict": nan, "recall_strict": nan,
                **{c: nan for c in RANKING_COLUMNS}, "k": cfg.k,
                "seconds": time.perf_counter() - start, "status": "diverged"}
    if result.get("val_auc") is not None and abs(result["val_auc"] - 0.5) < CHANCE_MARGIN:
        print(f"{data.name} {method.name} seed {seed}: validation AUC {result['val_auc']:.4f}, within "
              f"{CHANCE_MARGIN} of chance: recorded with status 'chance'", file=sys.stderr)
        return {**result, "status": "chance"}
    return {**result, "status": "ok"}
