"""Experiment configs (``reproduce/configs/<dataset>.json``), parsed once into typed objects.

A config holds the protocol (split, sizes, epochs, early stopping, seeds, the training options),
one "propensity" block with the propensity model's settings (:data:`reproduce.methods.PROPENSITY_KEYS`,
shared by the methods that use propensities) and one entry per method under "methods" with that
method's own keys (:attr:`reproduce.methods.Method.own_keys`), written by the tuner.  An entry that
sets propensity keys overrides the block for that method (BADR and its ablations: the authors'
values).  The optional protocol keys "imputation" ("pseudo_label"), "cross_entropy" ("clamped"),
"sampling" ("uniform") and "imputed_error" ("paper") have those defaults; a DR-family method's
entry may override "imputed_error" (:meth:`Config.imputed_error`).  The optional block
"entire_space" holds the protocol of the entire-space methods (:class:`EntireSpaceProtocol`:
the exposures per step and per epoch, see :mod:`reproduce.entire_space`).

:func:`load_config` reads and checks a file once: every value has its type and range checked,
every method entry its keys, and an error names the file and the key (``coat.json:
methods.ips.lr must be a positive number; got -0.1``).  The rest of ``reproduce`` reads the typed
:class:`Config`.  A data set without a config of its own (a split-format folder given to
``--datasets``) takes ``configs/default.json``.  Runs on a share F < 1 of the clicked training
pairs (Tables 4 and 5) read ``NAME@F.json`` where there is one: the values ``tune --train-fraction
F`` chose at that rate on the validation split (``configs/kuairec@0.8.json`` ... ``@0.2.json``).
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional

from cvrdata import DATASETS, CVRData, load_dataset
from estimators.joint_loss import CROSS_ENTROPIES, IMPUTATIONS, IMPUTED_ERRORS
from estimators.training import PROPENSITY_LOSSES, SAMPLINGS

from . import files
from .methods import METHODS, PROPENSITY_KEYS, Method

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: The config of a data set that has none of its own.
DEFAULT_CONFIG = "default"
#: Keys of a method entry besides its hyperparameters.
_ENTRY_NOTES = ("status", "about")


# ---- value checks ------------------------------------------------------------------------------
class _Checker:
    """Checks the values of one file, each error naming the file and the key's path."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, message: str) -> ValueError:
        return ValueError(f"{self.path}: {key} {message}")

    def integer(self, value: Any, key: str, low: int = 1, high: Optional[int] = None) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (
                high is not None and value > high):
            bound = f"in {low}..{high}" if high is not None else f">= {low}"
            raise self.fail(key, f"must be an integer {bound}; got {value!r}")
        return int(value)

    def real(self, value: Any, key: str, low: float, high: float = math.inf, *, open_low: bool = False) -> Any:
        ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
              and (low < value if open_low else low <= value) and value <= high)
        if not ok:
            if open_low and low == 0 and high == math.inf:
                what = "a positive number"
            elif low == 0 and high == math.inf:
                what = "a number >= 0"
            else:
                what = f"a number in {'(' if open_low else '['}{low:g}, {high:g}]"
            raise self.fail(key, f"must be {what}; got {value!r}")
        return value  # as written: the run signature hashes the values as the file has them

    def choice(self, value: Any, key: str, allowed: tuple) -> Any:
        if value not in allowed:
            raise self.fail(key, f"must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value

    def mapping(self, value: Any, key: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be an object {{...}}; got {value!r}")
        return value

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string; got {value!r}")
        return value


#: How each hyperparameter is checked: (low, high, open_low) for numbers, "int" for integers >= 1.
PARAM_RULES: dict[str, Any] = {
    "lr": (0.0, math.inf, True), "weight_decay": (0.0, math.inf, False),
    "imp_lr": (0.0, math.inf, True), "imp_weight_decay": (0.0, math.inf, False),
    "gamma": (0.0, 1.0, True), "alpha": (0.0, 1.0, False), "G": "int",
    "prop_batch_size": "int", "prop_lr": (0.0, math.inf, True), "prop_weight_decay": (0.0, math.inf, False),
    # the entire-space objectives' weights (estimators.registry.ENTIRE_SPACE): finite, >= 0
    "lambda_c": (0.0, math.inf, False), "lambda_g": (0.0, math.inf, False), "lambda_p": (0.0, math.inf, False),
    # the propensity-free objectives' parameters (estimators.registry.PROPENSITY_FREE), prefixed by the objective
    "cvib_alpha": (0.0, math.inf, False), "cvib_gamma": (0.0, math.inf, False),
    "dib_alpha": (0.0, math.inf, False), "dib_gamma": (0.0, 1.0, False),
    "damf_beta": (0.0, math.inf, False), "damf_lambda_pmd": (0.0, math.inf, False),
    # the propensity adjustments' parameters (estimators.registry.PROPENSITY_ADJUSTMENTS), prefixed: D-DR's w2 / w1
    "ddr_w": (0.0, math.inf, True),
    # StableDR's cycle learning (reproduce.methods.CYCLE_KEYS): eta >= 0, the propensity's Adam
    "cycle_eta": (0.0, math.inf, False), "cycle_prop_lr": (0.0, math.inf, True),
    "cycle_prop_weight_decay": (0.0, math.inf, False),
    # DCE's calibrators (reproduce.methods.CALIBRATION_KEYS, estimators.training.DCEConfig)
    "dce_experts": "int", "dce_propcal_lr": (0.0, math.inf, True), "dce_propcal_weight_decay": (0.0, math.inf, False),
    "dce_impcal_lr": (0.0, math.inf, True), "dce_impcal_weight_decay": (0.0, math.inf, False),
    "dce_impcal_steps": "int",
    # the propensity objectives' parameters and rounds (estimators.registry.PROPENSITY_OBJECTIVES), prefixed: GPL's
    "gpl_lam": (0.0, math.inf, False), "gpl_beta": (0.0, 1.0, False), "gpl_rounds": "int",
    "gpl_prop_epochs": "int", "gpl_joint_epochs": "int",
}


def check_param(check: _Checker, key: str, value: Any, where: str) -> Any:
    """``value`` of hyperparameter ``key`` checked by :data:`PARAM_RULES` (``where`` names it in errors)."""
    rule = PARAM_RULES.get(key)
    if rule is None:
        raise check.fail(where, f"is not a hyperparameter of any method; expected one of {', '.join(PARAM_RULES)}")
    if rule == "int":
        return check.integer(value, where)
    low, high, open_low = rule
    return check.real(value, where, low, high, open_low=open_low)


# ---- the typed config --------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """Which processed split files a built-in data set reads: threshold T and validation share V (%)."""

    threshold: int
    val_pct: int


@dataclass(frozen=True)
class EarlyStop:
    """The published early-stopping rule's tolerance and patience."""

    tol: float
    patience: int


@dataclass(frozen=True)
class EntireSpaceProtocol:
    """How the entire-space methods walk the exposure space D (every user-item pair): steps of
    ``batch_size`` exposures, ``exposures_per_epoch`` of them per epoch (None: all of D, a fresh
    permutation each epoch; a number: the first that many of a fresh permutation)."""

    batch_size: int = 4096
    exposures_per_epoch: Optional[int] = None

    def option(self) -> dict[str, Any]:
        return {"exposure_batch_size": self.batch_size,
                "exposures_per_epoch": "all" if self.exposures_per_epoch is None else self.exposures_per_epoch}


@dataclass(frozen=True)
class MethodEntry:
    """A method's entry: its hyperparameters as written, its status line, its "imputed_error" if set."""

    params: Mapping[str, Any]
    status: str = ""
    imputed_error: Optional[str] = None


@dataclass(frozen=True)
class Config:
    """One data set's experiment config, checked (see the module docstring)."""

    path: Path
    dataset: str
    split: Optional[Split]
    dim: int
    batch_size: int
    k: int
    max_epochs: int
    propensity_max_epochs: int
    propensity_loss: str
    early_stopping: EarlyStop
    seeds: tuple[int, ...]
    propensity: Mapping[str, Any]
    methods: Mapping[str, MethodEntry]
    imputation: str = "pseudo_label"
    cross_entropy: str = "clamped"
    sampling: str = "uniform"
    imputed_error: str = "paper"
    entire_space: EntireSpaceProtocol = EntireSpaceProtocol()
    raw: Mapping[str, Any] = field(default=None, repr=False, compare=False)

    # -- per method ---------------------------------------------------------------------------
    def entry(self, method: Method) -> MethodEntry:
        if method.name not in self.methods:
            raise ValueError(f"{self.path}: no entry for method {method.name!r} under 'methods'; add one with the "
                             f"keys {', '.join(method.own_keys)}")
        return self.methods[method.name]

    def method_params(self, method: Method) -> dict[str, Any]:
        """The hyperparameters ``method`` trains with: its entry's, and for the propensity model's
        keys the entry's value where it sets one, else the "propensity" block's."""
        merged = {**self.propensity, **self.entry(method).params}
        return {k: merged[k] for k in method.keys}

    def imputed_error_of(self, method: Method) -> str:
        """The form of the imputed error ``method`` trains with: its entry's "imputed_error", else the
        config's, for a method whose imputation loss is of the DR family; "paper" for the others."""
        if method.imputation_spec is None or not method.imputation_spec.dr_family:
            return "paper"
        entry = self.entry(method)
        return entry.imputed_error or self.imputed_error

    def run_options(self, method: Method) -> dict[str, str]:
        """The data-set-level training options ``method``'s runs read: ``cross_entropy``,
        ``imputation``, and for the methods with an imputation model the sampling of U and the
        imputed error's form."""
        if method.entire_space is not None:  # its own protocol: no pseudo-labels, exact cross-entropies
            return self.entire_space.option()
        if method.propensity_free is not None:  # no imputation: the factual cross-entropy's form only
            return {"cross_entropy": self.cross_entropy}
        options = {"cross_entropy": self.cross_entropy, "imputation": self.imputation}
        if method.imputation_loss is not None:
            options["sampling"] = self.sampling
            options["imputed_error"] = self.imputed_error_of(method)
        return options

    def with_batch_size(self, batch_size: Optional[int]) -> "Config":
        """This config with its batch size replaced (``--batch-size``), checked."""
        if batch_size is None:
            return self
        _Checker(Path("--batch-size")).integer(batch_size, "value")
        return replace(self, batch_size=batch_size)


def run_signature(cfg: Config, method: Method, params: Mapping[str, Any], max_epochs: int,
                  extra: Optional[Mapping[str, Any]] = None) -> str:
    """Short hash of everything that determines a run besides the seed (resume key): the fixed
    protocol keys, :meth:`Config.run_options`, the method and its hyperparameters, and ``extra``
    (what a run sets beyond the config: a training fraction below 1, a user folder's data
    fingerprint, a device other than the CPU; absent keys keep the signatures of earlier runs)."""
    fixed = {"split": None if cfg.split is None else {"threshold": cfg.split.threshold, "val_pct": cfg.split.val_pct},
             "dim": cfg.dim, "batch_size": cfg.batch_size, "k": cfg.k,
             "propensity_max_epochs": cfg.propensity_max_epochs, "propensity_loss": cfg.propensity_loss,
             "early_stopping": {"tol": cfg.early_stopping.tol, "patience": cfg.early_stopping.patience}}
    what = (["entire_space", method.entire_space] if method.entire_space is not None
            else ["propensity_free", method.propensity_free] if method.propensity_free is not None
            else [method.estimator, method.imputation_loss])
    if method.propensity_adjustment is not None:  # absent otherwise: the earlier methods' signatures stay
        what = what + [method.propensity_adjustment]
    if method.propensity_objective is not None:  # likewise
        what = what + [method.propensity_objective]
    blob = {"fixed": fixed, "options": cfg.run_options(method), "method": what, "params": dict(params),
            "max_epochs": max_epochs}
    if extra:
        blob["extra"] = dict(extra)
    return hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:10]


# ---- reading --------------------------------------------------------------------------------------
_REQUIRED = ("dim", "batch_size", "k", "max_epochs", "propensity_max_epochs", "propensity_loss", "early_stopping",
             "seeds", "propensity", "methods")
_OPTIONAL = {"imputation": IMPUTATIONS, "cross_entropy": CROSS_ENTROPIES, "sampling": SAMPLINGS,
             "imputed_error": IMPUTED_ERRORS}
_KNOWN = set(_REQUIRED) | set(_OPTIONAL) | {"dataset", "about", "split", "entire_space"}


def config_path(name: str, config_dir: str | os.PathLike | None = None) -> Path:
    """``<config_dir>/<name>.json`` (default folder: the package's ``configs``)."""
    return Path(config_dir or CONFIG_DIR) / f"{name}.json"


def parse_config(raw: Any, path: Path) -> Config:
    """Check the JSON ``raw`` of the file ``path`` and return its :class:`Config`."""
    c = _Checker(path)
    raw = c.mapping(raw, "the top level")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"{path} lacks the keys {', '.join(missing)}")
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        raise c.fail(", ".join(unknown), f"unknown; a config's keys are {', '.join(sorted(_KNOWN))}")
    split = None
    if "split" in raw:
        s = c.mapping(raw["split"], "split")
        split = Split(c.integer(s.get("threshold"), "split.threshold", 0),
                      c.integer(s.get("val_pct"), "split.val_pct", 1, 99))
    stop = c.mapping(raw["early_stopping"], "early_stopping")
    early = EarlyStop(c.real(stop.get("tol"), "early_stopping.tol", 0.0),
                      c.integer(stop.get("patience"), "early_stopping.patience"))
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise c.fail("seeds", f"must be a non-empty list of integers; got {seeds!r}")
    seeds = tuple(c.integer(s, f"seeds[{i}]", -2**63) for i, s in enumerate(seeds))
    if len(set(seeds)) != len(seeds):
        raise c.fail("seeds", f"must not repeat a seed; got {list(seeds)}")
    block = c.mapping(raw["propensity"], "propensity")
    propensity = {}
    for key, value in block.items():
        if key in _ENTRY_NOTES:
            c.text(value, f"propensity.{key}")
        elif key in PROPENSITY_KEYS:
            propensity[key] = check_param(c, key, value, f"propensity.{key}")
        else:
            raise c.fail(f"propensity.{key}", f"is not a propensity setting; expected {', '.join(PROPENSITY_KEYS)}")
    options = {key: c.choice(raw.get(key, default), key, allowed)
               for (key, allowed), default in zip(_OPTIONAL.items(), ("pseudo_label", "clamped", "uniform", "paper"))}
    es = EntireSpaceProtocol()
    if "entire_space" in raw:
        block = c.mapping(raw["entire_space"], "entire_space")
        for key, value in block.items():
            if key in _ENTRY_NOTES:
                c.text(value, f"entire_space.{key}")
            elif key == "batch_size":
                es = replace(es, batch_size=c.integer(value, "entire_space.batch_size"))
            elif key == "exposures_per_epoch":
                es = replace(es, exposures_per_epoch=None if value == "all"
                             else c.integer(value, "entire_space.exposures_per_epoch"))
            else:
                raise c.fail(f"entire_space.{key}", "is not an entire-space setting; expected batch_size, "
                             "exposures_per_epoch")
    cfg = Config(
        path=path, dataset=c.text(raw.get("dataset", path.stem), "dataset"), split=split,
        dim=c.integer(raw["dim"], "dim"), batch_size=c.integer(raw["batch_size"], "batch_size"),
        k=c.integer(raw["k"], "k"), max_epochs=c.integer(raw["max_epochs"], "max_epochs"),
        propensity_max_epochs=c.integer(raw["propensity_max_epochs"], "propensity_max_epochs"),
        propensity_loss=c.choice(raw["propensity_loss"], "propensity_loss", PROPENSITY_LOSSES),
        early_stopping=early, seeds=seeds, propensity=propensity, methods={}, entire_space=es, raw=raw, **options)
    methods = {}
    for name, entry in c.mapping(raw["methods"], "methods").items():
        methods[name] = _parse_entry(c, cfg, name, entry)
    return replace(cfg, methods=methods)


def _parse_entry(c: _Checker, cfg: Config, name: str, entry: Any) -> MethodEntry:
    where = f"methods.{name}"
    if name not in METHODS:
        raise c.fail(where, f"names no registered method; expected one of {', '.join(METHODS)}")
    method = METHODS[name]
    entry = c.mapping(entry, where)
    params, status, imputed = {}, "", None
    for key, value in entry.items():
        if key in _ENTRY_NOTES:
            text = c.text(value, f"{where}.{key}")
            status = text if key == "status" else status
        elif key == "imputed_error":
            if method.imputation_spec is None or not method.imputation_spec.dr_family:
                raise c.fail(f"{where}.imputed_error", "applies only to the DR-family imputation losses; remove it "
                             "from the entry")
            imputed = c.choice(value, f"{where}.imputed_error", IMPUTED_ERRORS)
        elif key in PROPENSITY_KEYS and not method.uses_propensity:
            raise c.fail(f"{where}.{key}", "is a propensity setting, but the method uses no propensity model; "
                         "remove it")
        elif key in method.keys:
            params[key] = check_param(c, key, value, f"{where}.{key}")
        else:
            raise c.fail(f"{where}.{key}", f"is not a key of method {name!r}; its keys are {', '.join(method.keys)}")
    merged = {**cfg.propensity, **params}
    missing = [k if k in method.own_keys else f"propensity.{k}" for k in method.keys if k not in merged]
    if missing:
        raise c.fail(where, f"lacks {', '.join(missing)}")
    return MethodEntry(params, status, imputed)


def rate_config_name(name: str, train_fraction: float = 1.0) -> str:
    """The name of data set ``name``'s config for runs on a share ``train_fraction`` of the clicked
    training pairs: ``name`` itself at 1, else ``name@F`` (``yahoo@0.4``)."""
    return name if train_fraction >= 1 else f"{name}@{train_fraction:g}"


def load_config(name: str, config_dir: str | os.PathLike | None = None, *, fallback: bool = False) -> Config:
    """The config of data set ``name`` from ``config_dir`` (default: the package's), checked.

    With ``fallback`` (a data set given as a folder), a missing ``<name>.json`` falls back to
    ``<config_dir>/default.json``, then to the package's ``default.json``.
    """
    path = config_path(name, config_dir)
    if fallback and not path.is_file():
        path = config_path(DEFAULT_CONFIG, config_dir)
        if not path.is_file():
            path = config_path(DEFAULT_CONFIG)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        where = path.parent
        raise ValueError(f"no config {path}; expected one per data set in {where} (pass --config-dir)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the config {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    return parse_config(raw, path)


# ---- data sets ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSource:
    """One entry of ``--datasets``: a built-in data set (``path`` None) or a split-format folder."""

    name: str
    path: Optional[Path] = None

    @staticmethod
    def parse(text: str) -> "DataSource":
        """A built-in name (:data:`cvrdata.DATASETS`) or the path of a split-format folder."""
        if text in DATASETS:
            return DataSource(text)
        path = Path(text).expanduser()
        if not path.is_dir():
            raise ValueError(f"--datasets: {text!r} is neither a built-in data set ({', '.join(DATASETS)}) nor a "
                             "folder in the split format (x_/y_{train,val,test}_T_V.txt, as `python -m simulate` "
                             "writes)")
        name = path.resolve().name
        meta = path / "meta.json"
        if meta.is_file():
            try:
                name = json.loads(meta.read_text()).get("name", name)
            except (json.JSONDecodeError, AttributeError, OSError, UnicodeDecodeError):
                pass  # the loader reports a bad meta.json with its reason
        if name in DATASETS:
            raise ValueError(f"--datasets: the folder {path} is named {name!r} like a built-in data set; rename it "
                             "or set another \"name\" in its meta.json")
        return DataSource(str(name), path.resolve())

    def config(self, config_dir: str | os.PathLike | None = None, train_fraction: float = 1.0) -> Config:
        """Its config: the built-in one, or for a folder ``<name>.json`` of ``config_dir``, else the
        default; for runs on a share ``train_fraction`` < 1 of the clicked pairs, ``<name>@<F>.json``
        of ``config_dir`` where there is one (values tuned at that rate, ``tune --train-fraction``)."""
        at_rate = rate_config_name(self.name, train_fraction)
        if at_rate != self.name and config_path(at_rate, config_dir).is_file():
            return load_config(at_rate, config_dir)
        return load_config(self.name, config_dir, fallback=self.path is not None)

    def load(self, cfg: Config, data_dir: str | os.PathLike | None) -> CVRData:
        """The data: a built-in set split as its config says, or the folder (its meta.json / files say)."""
        if self.path is not None:
            return load_dataset(self.path)
        if cfg.split is None:
            raise ValueError(f"{cfg.path}: lacks the key split (threshold and val_pct of the processed split files)")
        return load_dataset(self.name, data_dir, threshold=cfg.split.threshold,
                            val_fraction=cfg.split.val_pct / 100)


# ---- writing ----------------------------------------------------------------------------------
def save_method_params(cfg: Config, method: Method, params: Mapping[str, Any], status: str,
                       path: str | os.PathLike | None = None, propensity_status: Optional[str] = None) -> Path:
    """Write ``params`` as ``method``'s entry of ``cfg`` to ``path`` (default: the file ``cfg`` was
    read from): its own keys, the propensity keys it overrides and its "imputed_error" where it
    sets one.  With ``propensity_status``, the propensity keys go to the shared block instead (with
    that status).  An entry whose status says it is "untuned: LABEL's tuned values" of ``method``
    takes the new values too.  Everything else of ``cfg`` is kept; the result is checked, then
    written by an atomic replace."""
    raw = json.loads(json.dumps(cfg.raw))  # a deep copy
    old = raw["methods"].get(method.name, {})
    overrides = [] if propensity_status is not None else [k for k in PROPENSITY_KEYS if k in old]
    if propensity_status is not None:
        raw["propensity"] = {"about": raw["propensity"].get("about", ""), "status": propensity_status,
                             **{k: params[k] for k in PROPENSITY_KEYS}}
    kept = {"imputed_error": old["imputed_error"]} if "imputed_error" in old else {}
    entry = {**kept, **{k: params[k] for k in method.own_keys + tuple(overrides)}}
    raw["methods"][method.name] = {"status": status, **entry}
    # Entries that declare themselves copies of this method's values (TDR-CL and D-DR start from
    # DR-JL's) follow them, or they would silently keep the values this search replaced.
    mirror = f"untuned: {method.label}'s tuned values"
    for name, other in raw["methods"].items():
        if name != method.name and str(other.get("status", "")).startswith(mirror):
            other.update(entry)
    path = cfg.path if path is None else Path(path)
    raw["dataset"] = path.stem
    parse_config(raw, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.replace(path, json.dumps(raw, indent=2) + "\n")
    return path
