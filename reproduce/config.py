"""Per-data-set experiment configs (``reproduce/configs/<dataset>.json``): reading, checking, writing.

A config holds the protocol (split, sizes, epochs, early stopping, seeds), one "propensity" block
with the propensity model's settings (:data:`reproduce.methods.PROPENSITY_KEYS`, shared by the
methods that use propensities) and one entry per method under "methods" with that method's own
keys (:attr:`reproduce.methods.Method.own_keys`), written by the tuner.  An entry that sets
propensity keys overrides the block for that method (BADR and its ablations: the authors' values).
The optional protocol key "imputed_error" ("paper" when absent, or "published") is how the
methods with a DR-family imputation loss write the imputed error; a method's entry may override
it (:func:`imputed_error`).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from estimators.data import CVRData, load_dataset
from estimators.training_loss import IMPUTATION_LOSSES_DR, IMPUTED_ERRORS

from .methods import PROPENSITY_KEYS, Method

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DATASETS = ("coat", "yahoo", "kuairec")
_TOP_KEYS = ("split", "dim", "batch_size", "k", "max_epochs", "propensity_max_epochs", "propensity_loss",
             "early_stopping", "seeds", "propensity", "methods")


def config_path(dataset: str, config_dir: str | os.PathLike | None = None) -> Path:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    return Path(config_dir or CONFIG_DIR) / f"{dataset}.json"


def load_config(dataset: str, config_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The config of ``dataset``, checked to hold the protocol keys."""
    path = config_path(dataset, config_dir)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no config {path}; expected one per dataset in {path.parent}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    missing = [k for k in _TOP_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{path} lacks the keys {', '.join(missing)}")
    return cfg


def load_data(dataset: str, cfg: dict[str, Any], data_dir: str | os.PathLike | None) -> CVRData:
    """``dataset`` from ``data_dir``, split as its config says (threshold, validation share)."""
    split = cfg["split"]
    return load_dataset(dataset, data_dir, threshold=split["threshold"], val_fraction=split["val_pct"] / 100)


def method_params(cfg: dict[str, Any], method: Method) -> dict[str, Any]:
    """The hyperparameters ``method`` reads from ``cfg``: its own entry under ``methods``; for the
    propensity model's keys, the entry's value where it sets one, else the ``propensity`` block's."""
    name = cfg.get("dataset")
    entry = cfg["methods"].get(method.name)
    if entry is None:
        raise ValueError(f"config of {name!r} has no entry for method {method.name!r}; add one "
                         f"under 'methods' with the keys {', '.join(method.own_keys)}")
    if not method.uses_propensity and any(k in entry for k in PROPENSITY_KEYS):
        raise ValueError(f"config of {name!r}, method {method.name!r}: the method uses no propensity model; "
                         f"remove {', '.join(k for k in PROPENSITY_KEYS if k in entry)} from its entry")
    _check_entry_form(cfg, method)
    merged = {**cfg["propensity"], **entry}
    missing = [k if k in method.own_keys else f"propensity.{k}" for k in method.keys if k not in merged]
    if missing:
        raise ValueError(f"config of {name!r}, method {method.name!r}: missing {', '.join(missing)}")
    return {k: merged[k] for k in method.keys}


def _check_entry_form(cfg: dict[str, Any], method: Method) -> None:
    if "imputed_error" in cfg["methods"].get(method.name, {}) and method.imputation_loss not in IMPUTATION_LOSSES_DR:
        raise ValueError(f"config of {cfg.get('dataset')!r}, method {method.name!r}: 'imputed_error' applies only "
                         f"to the DR-family imputation losses; remove it from the entry")


def imputed_error(cfg: dict[str, Any], method: Method) -> str:
    """The form of the imputed error ``method`` trains with: its entry's "imputed_error", else the
    config's, else "paper", for a method whose imputation loss is of the DR family (dr_jl, mrdr,
    dr_bias, dr_mse and the ablations badr_dr, badr_v, badr_b, badr_m); "paper" for the others
    (BADR's own loss defines its imputed error; the methods without imputation model have none)."""
    entry = cfg["methods"].get(method.name, {})
    where = f"method {method.name!r}" if "imputed_error" in entry else "protocol"
    value = entry.get("imputed_error", cfg.get("imputed_error", "paper"))
    if value not in IMPUTED_ERRORS:
        raise ValueError(f"config of {cfg.get('dataset')!r}, {where}: 'imputed_error' must be one of "
                         f"{IMPUTED_ERRORS}; got {value!r}")
    _check_entry_form(cfg, method)
    return value if method.imputation_loss in IMPUTATION_LOSSES_DR else "paper"


def run_options(cfg: dict[str, Any], method: Method) -> dict[str, str]:
    """The data-set-level training options ``method``'s runs read, defaults filled in:
    ``cross_entropy`` ("clamped"), ``imputation`` ("pseudo_label"), and for the methods with an
    imputation model ``sampling`` of U ("uniform") and the imputed error's form
    (:func:`imputed_error`)."""
    options = {"cross_entropy": cfg.get("cross_entropy", "clamped"), "imputation": cfg.get("imputation", "pseudo_label")}
    if method.imputation_loss is not None:
        options["sampling"] = cfg.get("sampling", "uniform")
        options["imputed_error"] = imputed_error(cfg, method)
    return options


def run_signature(cfg: dict[str, Any], method: Method, params: dict[str, Any], max_epochs: int) -> str:
    """Short hash of everything that determines a run besides the seed (resume key): the fixed
    protocol keys, :func:`run_options`, the method and its hyperparameters."""
    fixed = {k: cfg[k] for k in ("split", "dim", "batch_size", "k", "propensity_max_epochs", "propensity_loss",
                                  "early_stopping")}
    blob = json.dumps({"fixed": fixed, "options": run_options(cfg, method),
                       "method": [method.estimator, method.imputation_loss], "params": params,
                       "max_epochs": max_epochs}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def save_method_params(dataset: str, method: Method, params: dict[str, Any], status: str,
                       config_dir: str | os.PathLike | None = None, propensity_status: str | None = None) -> Path:
    """Write ``params`` as ``method``'s entry of the dataset config: its own keys, the propensity
    keys it overrides and its "imputed_error" where it sets one.  With ``propensity_status``, the propensity keys go to the shared block instead
    (with that status).  Atomic replace; everything else is kept."""
    path = config_path(dataset, config_dir)
    cfg = load_config(dataset, config_dir)
    old = cfg["methods"].get(method.name, {})
    overrides = [] if propensity_status is not None else [k for k in PROPENSITY_KEYS if k in old]
    if propensity_status is not None:
        cfg["propensity"] = {"about": cfg["propensity"].get("about", ""), "status": propensity_status,
                             **{k: params[k] for k in PROPENSITY_KEYS}}
    kept = {"imputed_error": old["imputed_error"]} if "imputed_error" in old else {}
    cfg["methods"][method.name] = {"status": status, **kept,
                                   **{k: params[k] for k in method.own_keys + tuple(overrides)}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path
