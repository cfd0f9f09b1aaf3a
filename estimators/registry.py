"""The registry: one table of every estimator of the ideal loss and every imputation-model loss.

An entry says what a name computes (the equation, the function of ``(e, e_hat, o, p_hat)`` in
:mod:`estimators.loss` / :mod:`estimators.imputation`, and its form in one joint-learning step
from logits in :mod:`estimators.joint_loss`) and what it needs (the inputs it reads, whether
its step reads the sampled pairs U, an imputation model, whether it is of the DR family).
Everything that iterates over estimators reads this table and nothing else:

- the public dicts :data:`ESTIMATORS` and :data:`IMPUTATION_LOSSES` are its two halves;
- the training losses (:mod:`estimators.training.losses`) take from an entry which tensors a
  call needs and which logits it differentiates, and run an entry on the fused kernels exactly
  when the extension implements its name (:data:`estimators._ext.PREDICTION_KERNELS`), else on
  its step form, so a new entry trains without a kernel;
- the joint learner (:mod:`estimators.training.joint`) builds an imputation model and samples U
  when the entries say so;
- ``reproduce``'s methods derive their config keys from it.

A third table, :data:`ENTIRE_SPACE`, lists the entire-space multi-task objectives
(:mod:`estimators.multitask`: ESMM, ESCM2-IPS / -DR / -BADR, Multi-IPS / Multi-DR, DDPO).  They
are not estimators of the ideal loss from ``(e, e_hat, o, p_hat)`` but whole training objectives
from the logits of a model's towers, so their entries (:class:`EntireSpaceSpec`) say which towers
a model needs (:data:`TOWERS`), which scalar parameters the objective takes with their defaults,
and whether it weighs by propensities; the training modules
(:class:`estimators.training.losses.EntireSpaceLoss`) and the models
(:class:`estimators.training.models.MMoE`, :class:`~estimators.training.models.EntireSpaceMF`)
read them.

A fourth, :data:`PROPENSITY_ADJUSTMENTS`, lists functions of the learned propensities that a
method applies to the clipped propensity table before training (:mod:`estimators.adjustment`:
D-DR's ``f(p_hat)^alpha``); each entry names its scalar parameters with their defaults.

A fifth, :data:`PROPENSITY_OBJECTIVES`, lists losses of the propensity model that read the CVR
models' DR residuals (:mod:`estimators.propensity_loss`: GPL's eq. 11, in the corrected and the
published normalisation of its variance term); a method naming one refits its propensity model
between rounds of joint learning (:mod:`estimators.training.gpl`).

A new estimator is one :func:`register_estimator` call with its two functions (see
``tests/test_registry.py``, which registers and trains a toy one).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, TypeVar

from torch import Tensor

from . import joint_loss as J
from .adjustment import ddr_propensity
from .imputation import (badr_imputation_loss, dr_bias_imputation_loss, dr_imputation_loss, dr_mse_imputation_loss,
                         mrdr_imputation_loss, tdr_cl_imputation_loss)
from .loss import badr, dr, eib, ips, naive, snips
from .multitask import ddpo_loss, escm2_loss, esmm_loss, multi_dr_loss, multi_ips_loss
from .propensity_free import cvib_loss, damf_loss, dib_loss
from .propensity_loss import VAR_NORMS, gpl_propensity_loss
from .stabledr import stabledr, stabledr_step

#: The arguments an entry's function may read, in the order it takes them.
INPUTS = ("e", "e_hat", "o", "p_hat")
#: What an estimator's step divides its summed errors by (:class:`EstimatorSpec`).
NORMALISERS = ("clicked", "sampled", "propensity")


@dataclass(frozen=True)
class EstimatorSpec:
    """An estimator of the ideal loss over all exposed pairs, used as the prediction model's loss.

    ``function(*inputs)`` computes it from the inputs named in ``reads`` (of :data:`INPUTS`, in
    that order); ``step`` is its joint-learning form from logits (:mod:`estimators.joint_loss`),
    None for an estimator that is not trained by joint learning.  ``needs_u``: the step reads the
    sampled pairs U and the imputation logits.  ``self_normalised``: it divides by
    ``sum(o / p_hat)`` over the batch, so a batch needs a click.  ``normaliser`` is what its step
    divides the summed errors by: ``"clicked"`` the clicked pairs ``|B|``, ``"sampled"`` the
    sampled pairs ``|U|``, ``"propensity"`` ``sum_B 1 / p_hat`` (the self-normalised ones).
    """

    name: str
    equation: str
    description: str
    function: Callable[..., Tensor]
    reads: tuple[str, ...]
    step: Optional[Callable[..., Tensor]] = None
    needs_u: bool = False
    normaliser: str = "clicked"

    def __post_init__(self) -> None:
        _check_entry(self)
        if self.normaliser not in NORMALISERS:
            raise ValueError(f"estimator {self.name!r}: `normaliser` must be one of {NORMALISERS}; "
                             f"got {self.normaliser!r}")
        if self.needs_imputation != self.needs_u:
            raise ValueError(f"estimator {self.name!r}: an estimator that reads e_hat samples U for it in "
                             "joint learning (needs_u) and only such a one does")

    @property
    def self_normalised(self) -> bool:
        """Whether it divides by ``sum(o / p_hat)`` over each batch (undefined without a click)."""
        return self.normaliser == "propensity"

    @property
    def uses_propensity(self) -> bool:
        """Whether it reads ``p_hat`` (so a run fits a propensity model)."""
        return "p_hat" in self.reads

    @property
    def needs_imputation(self) -> bool:
        """Whether it reads ``e_hat`` (so joint learning trains an imputation model)."""
        return "e_hat" in self.reads


@dataclass(frozen=True)
class ImputationLossSpec:
    """A loss of the imputation model.

    ``function(e, e_hat, o, p_hat, **params)`` computes it on one batch; ``step(xt_b, x_b, r_b,
    p_hat_b, xt_u, x_u, form, **params)`` is its joint-learning form from logits.  ``needs_u``: the
    step reads the sampled pairs U.  ``grad_on_b`` / ``grad_on_u``: which imputation logits its
    step differentiates.  ``dr_family``: the DR family's imputed error (``imputed_error``,
    :class:`estimators.joint_loss.Form`) applies.  ``params``: its keyword parameters (DR-MSE's
    ``alpha``).
    """

    name: str
    equation: str
    description: str
    function: Callable[..., Tensor]
    step: Callable[..., Tensor]
    needs_u: bool = False
    grad_on_b: bool = True
    grad_on_u: bool = False
    dr_family: bool = False
    params: tuple[str, ...] = ()
    reads: tuple[str, ...] = INPUTS

    def __post_init__(self) -> None:
        _check_entry(self)
        if self.grad_on_u and not self.needs_u:
            raise ValueError(f"imputation loss {self.name!r}: a gradient on U needs needs_u=True")


def _check_entry(entry) -> None:
    if not entry.name.isidentifier():
        raise ValueError(f"registry names are identifiers (they name config keys and CSV rows); got {entry.name!r}")
    bad = [r for r in entry.reads if r not in INPUTS]
    if bad or list(entry.reads) != [r for r in INPUTS if r in entry.reads]:
        raise ValueError(f"{entry.name!r}: `reads` must list inputs of {INPUTS} in that order; got {entry.reads}")


#: The towers of an entire-space model, in the order a model lists them: the CTR tower (its
#: probabilities are the propensities), the CVR tower, the imputation tower (imputed CVR error,
#: DR / BADR) and DDPO's conversion propensity network.
TOWERS = ("ctr", "cvr", "imputation", "conversion")
#: The keyword argument of an entire-space function that each tower beyond CTR / CVR feeds.
TOWER_ARGUMENTS = {"imputation": "delta_hat", "conversion": "conv_logit"}


@dataclass(frozen=True)
class EntireSpaceSpec:
    """An entire-space multi-task objective (:mod:`estimators.multitask`).

    ``function(ctr_logit, cvr_logit, o, r, **tower_inputs, p_hat=None, **params)`` returns a dict
    with ``loss`` and its parts; ``tower_inputs`` are the outputs of the towers beyond CTR and CVR
    under their argument names (:data:`TOWER_ARGUMENTS`: ``delta_hat`` for the imputation tower,
    ``conv_logit`` for the conversion tower).  ``towers``: the towers a model needs (of
    :data:`TOWERS`, in that order, always ``ctr`` and ``cvr``).  ``params``: the scalar
    parameters the objective takes with their defaults (``gamma``, ``lambda_c``, ...).
    ``uses_propensity``: the CVR term weighs clicked pairs by the clipped, detached CTR
    propensity (all but ESMM).
    """

    name: str
    equation: str
    description: str
    function: Callable[..., dict]
    towers: tuple[str, ...]
    params: Mapping[str, Any] = field(default_factory=dict)
    uses_propensity: bool = True

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"registry names are identifiers (they name config keys and CSV rows); got {self.name!r}")
        if list(self.towers) != [t for t in TOWERS if t in self.towers] or self.towers[:2] != ("ctr", "cvr"):
            raise ValueError(f"{self.name!r}: `towers` must list towers of {TOWERS} in that order, starting with "
                             f"'ctr' and 'cvr'; got {self.towers}")
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def __call__(self, outputs: Mapping[str, Any], o, r, *, p_hat=None, reduction="global", **params) -> dict:
        """The objective from a model's ``outputs`` (a dict by tower name, as :class:`~estimators.
        training.models.MMoE` returns); ``params`` override the defaults; ``reduction`` across
        data-parallel ranks (:mod:`estimators.distributed`)."""
        unknown = set(params) - set(self.params)
        if unknown:
            raise ValueError(f"entire-space objective {self.name!r} takes the parameters {tuple(self.params)}; "
                             f"got {sorted(unknown)}")
        missing = [t for t in self.towers if t not in outputs]
        if missing:
            raise ValueError(f"entire-space objective {self.name!r} needs the towers {self.towers}; `outputs` "
                             f"lacks {missing}")
        extra = {TOWER_ARGUMENTS[t]: outputs[t] for t in self.towers[2:]}
        if self.uses_propensity:
            extra["p_hat"] = p_hat
        elif p_hat is not None:
            raise ValueError(f"entire-space objective {self.name!r} weighs by no propensity; `p_hat` must be None")
        return self.function(outputs["ctr"], outputs["cvr"], o, r, **extra, **{**self.params, **params},
                             reduction=reduction)


@dataclass(frozen=True)
class PropensityFreeSpec:
    """A propensity-free method (:mod:`estimators.propensity_free`: CVIB, DIB, DAMF): no propensity
    and no imputation model, its own objective on the clicked pairs B (and pairs U drawn from all
    pairs).

    ``function`` is the objective's loss (its arguments are the method's own; see each
    function).  ``model`` names the model class that computes it in the training layer
    (:data:`estimators.training.propensity_free.MODELS`).  ``params``: the scalar parameters with
    their defaults (the published reference setting), of which ``model_params`` configure the
    model's construction rather than the loss.  ``needs_u``: each step draws ``G * |B|`` pairs U
    uniformly from all pairs.
    """

    name: str
    equation: str
    description: str
    function: Callable[..., Any]
    model: str
    params: Mapping[str, Any] = field(default_factory=dict)
    needs_u: bool = False
    model_params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"registry names are identifiers (they name config keys and CSV rows); got {self.name!r}")
        missing = [k for k in self.model_params if k not in self.params]
        if missing:
            raise ValueError(f"{self.name!r}: `model_params` {missing} need defaults in `params`")
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))


@dataclass(frozen=True)
class PropensityAdjustmentSpec:
    """A function of the learned propensities (:mod:`estimators.adjustment`), applied to the
    clipped table before joint learning: the estimator and the imputation loss then read
    ``function(p_hat, **params)`` wherever they read ``p_hat``.

    ``function(p_hat, **params)`` maps propensities in (0, 1] to propensities in (0, 1], pair by
    pair.  ``params``: its scalar parameters with their defaults (the paper's setting).
    """

    name: str
    equation: str
    description: str
    function: Callable[..., Tensor]
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"registry names are identifiers (they name config keys and CSV rows); got {self.name!r}")
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))


@dataclass(frozen=True)
class PropensityObjectiveSpec:
    """A loss of the propensity model that reads the DR residuals ``delta = e - e_hat`` of the
    current prediction and imputation models (GPL, BADR eq. 11).

    ``function(x, o, delta, *, var_norm, eps, base, **params)`` is the batch loss from propensity
    logits (:func:`estimators.propensity_loss.gpl_propensity_loss`); ``var_norm`` names how its
    variance term is normalised (:data:`estimators.propensity_loss.VAR_NORMS`: ``"paper"`` divides by
    ``|D|^2``, ``"published"`` by ``|B|^2`` per batch).  ``params``: its scalar parameters (the
    function's keyword names: ``lam`` is eq. 11's lambda) with their defaults (the GPL code's); a
    method's config keys for them are ``<prefix>_<param>`` (``gpl_lam``, ``gpl_beta``), one prefix for
    the variants of one objective.
    """

    name: str
    equation: str
    description: str
    function: Callable[..., Tensor]
    var_norm: str
    prefix: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or not self.prefix.isidentifier():
            raise ValueError(f"registry names and prefixes are identifiers (they name config keys); got "
                             f"{self.name!r}, {self.prefix!r}")
        if self.var_norm not in VAR_NORMS:
            raise ValueError(f"{self.name!r}: `var_norm` must be one of {VAR_NORMS}; got {self.var_norm!r}")
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))


Entry = TypeVar("Entry")


class Registry(dict[str, Entry]):
    """The entries of one concept by name: a dict that takes each name once (:meth:`register`) and
    names the registered ones when asked for another (:meth:`entry`)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, entry: Entry) -> Entry:
        """Add ``entry`` under its ``name``; ``ValueError`` if the name is taken."""
        if entry.name in self:
            raise ValueError(f"{self.kind} {entry.name!r} is registered already")
        self[entry.name] = entry
        return entry

    def entry(self, name: str) -> Entry:
        """The entry called ``name``; ``ValueError`` listing the registered names."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; expected one of {', '.join(self)}")
        return self[name]


#: Estimators of the ideal loss, by name.
ESTIMATORS: Registry[EstimatorSpec] = Registry("estimator")
#: Imputation-model losses, by name.
IMPUTATION_LOSSES: Registry[ImputationLossSpec] = Registry("imputation loss")
#: Entire-space multi-task objectives, by name.
ENTIRE_SPACE: Registry[EntireSpaceSpec] = Registry("entire-space objective")
#: Propensity-free methods' objectives, by name.
PROPENSITY_FREE: Registry[PropensityFreeSpec] = Registry("propensity-free objective")
#: Adjustments of the learned propensities, by name.
PROPENSITY_ADJUSTMENTS: Registry[PropensityAdjustmentSpec] = Registry("propensity adjustment")
#: Losses of the propensity model that read the CVR models' residuals, by name.
PROPENSITY_OBJECTIVES: Registry[PropensityObjectiveSpec] = Registry("propensity objective")


def register_estimator(entry: EstimatorSpec) -> EstimatorSpec:
    """Add ``entry`` to :data:`ESTIMATORS` (a name can be registered once)."""
    return ESTIMATORS.register(entry)


def register_imputation_loss(entry: ImputationLossSpec) -> ImputationLossSpec:
    """Add ``entry`` to :data:`IMPUTATION_LOSSES` (a name can be registered once)."""
    return IMPUTATION_LOSSES.register(entry)


def register_entire_space(entry: EntireSpaceSpec) -> EntireSpaceSpec:
    """Add ``entry`` to :data:`ENTIRE_SPACE` (a name can be registered once)."""
    return ENTIRE_SPACE.register(entry)


def register_propensity_free(entry: PropensityFreeSpec) -> PropensityFreeSpec:
    """Add ``entry`` to :data:`PROPENSITY_FREE` (a name can be registered once)."""
    return PROPENSITY_FREE.register(entry)


def register_propensity_adjustment(entry: PropensityAdjustmentSpec) -> PropensityAdjustmentSpec:
    """Add ``entry`` to :data:`PROPENSITY_ADJUSTMENTS` (a name can be registered once)."""
    return PROPENSITY_ADJUSTMENTS.register(entry)


def register_propensity_objective(entry: PropensityObjectiveSpec) -> PropensityObjectiveSpec:
    """Add ``entry`` to :data:`PROPENSITY_OBJECTIVES` (a name can be registered once)."""
    return PROPENSITY_OBJECTIVES.register(entry)


def get_estimator(name: str) -> EstimatorSpec:
    """The entry of estimator ``name``; ``ValueError`` listing the registered names."""
    return ESTIMATORS.entry(name)


def get_imputation_loss(name: str) -> ImputationLossSpec:
    """The entry of imputation loss ``name``; ``ValueError`` listing the registered names."""
    return IMPUTATION_LOSSES.entry(name)


def get_entire_space(name: str) -> EntireSpaceSpec:
    """The entry of entire-space objective ``name``; ``ValueError`` listing the registered names."""
    return ENTIRE_SPACE.entry(name)


def get_propensity_free(name: str) -> PropensityFreeSpec:
    """The entry of propensity-free objective ``name``; ``ValueError`` listing the registered names."""
    return PROPENSITY_FREE.entry(name)


def get_propensity_adjustment(name: str) -> PropensityAdjustmentSpec:
    """The entry of propensity adjustment ``name``; ``ValueError`` listing the registered names."""
    return PROPENSITY_ADJUSTMENTS.entry(name)


def get_propensity_objective(name: str) -> PropensityObjectiveSpec:
    """The entry of propensity objective ``name``; ``ValueError`` listing the registered names."""
    return PROPENSITY_OBJECTIVES.entry(name)


for _entry in (
    EstimatorSpec("naive", "eq. (2)", "naive: the errors of the clicked pairs, unweighted", naive, ("e", "o"),
                  J.naive_step),
    EstimatorSpec("ips", "eq. (3)", "inverse propensity scoring", ips, ("e", "o", "p_hat"), J.ips_step),
    EstimatorSpec("snips", "eq. (37)", "self-normalised IPS, per batch", snips, ("e", "o", "p_hat"), J.snips_step,
                  normaliser="propensity"),
    EstimatorSpec("eib", "eq. (5)", "error imputation: observed errors where clicked, imputed elsewhere", eib,
                  ("e", "e_hat", "o"), J.eib_step, needs_u=True, normaliser="sampled"),
    EstimatorSpec("dr", "eq. (7)", "doubly robust (DR-JL in joint learning)", dr, ("e", "e_hat", "o", "p_hat"),
                  J.dr_step, needs_u=True, normaliser="sampled"),
    EstimatorSpec("badr", "eq. (13)", "batch-adaptive doubly robust: DR normalised by sum o / p_hat per batch", badr,
                  ("e", "e_hat", "o", "p_hat"), J.badr_step, needs_u=True, normaliser="propensity"),
    # StableDR: its step trains the prediction on SNIPS's gradient (imputed errors held fixed); the
    # imputation model acts through the propensity, which the cycle learner updates (estimators/stabledr.py)
    EstimatorSpec("stabledr", "StableDR SDR-est (our label)", "stabilised DR: mean e_hat + the w-weighted mean of the "
                  "clicked residuals (a self-normalised DR)", stabledr, ("e", "e_hat", "o", "p_hat"), stabledr_step,
                  needs_u=True, normaliser="propensity"),
):
    register_estimator(_entry)

for _entry in (
    ImputationLossSpec("dr", "eq. (6)", "DR-JL: squared error weighted by 1 / p_hat", dr_imputation_loss,
                       J.dr_imputation_step, dr_family=True),
    ImputationLossSpec("mrdr", "eq. (8)", "MRDR: the DR estimator's variance", mrdr_imputation_loss,
                       J.mrdr_imputation_step, dr_family=True),
    ImputationLossSpec("dr_bias", "eq. (9)", "DR-BIAS: the DR estimator's bias", dr_bias_imputation_loss,
                       J.dr_bias_imputation_step, dr_family=True),
    ImputationLossSpec("dr_mse", "eq. (10)", "DR-MSE: alpha * DR-BIAS + (1 - alpha) * MRDR", dr_mse_imputation_loss,
                       J.dr_mse_imputation_step, dr_family=True, params=("alpha",)),
    ImputationLossSpec("tdr_cl", "TDR-CL (C1): eq. (6) with e_tilde = e_hat + eps_hat h (T1)-(T3)",
                       "TDR-CL: DR-JL's loss on the residual the targeting term eps_hat (1/p_hat - 1) leaves, eps_hat "
                       "refitted per batch by least squares on the clicked pairs (our reconstruction of the paper's "
                       "collaborative learning)", tdr_cl_imputation_loss, J.tdr_cl_imputation_step, dr_family=True),
    ImputationLossSpec("badr", "eq. (32)", "BADR's delta-method variance, trained as the published code does",
                       badr_imputation_loss, J.badr_imputation_step, needs_u=True, grad_on_b=False, grad_on_u=True),
    ImputationLossSpec("badr_paper", "eq. (32)", "BADR's delta-method variance, trained as the paper writes it",
                       badr_imputation_loss, J.badr_paper_imputation_step, needs_u=True),
):
    register_imputation_loss(_entry)

_ESCM2 = {"gamma": 0.05, "lambda_c": 0.1, "lambda_g": 1.0}
_MULTI = {"gamma": 0.05, "lambda_c": 1.0}
for _entry in (
    EntireSpaceSpec("esmm", "ESCM2 eq. (5)", "ESMM: CTR and CTCVR cross-entropies over the exposures", esmm_loss,
                    ("ctr", "cvr"), {"lambda_g": 1.0}, uses_propensity=False),
    EntireSpaceSpec("escm2_ips", "ESCM2 eqs. (21), (34)", "ESCM2-IPS: ESMM + lambda_c * IPS CVR risk",
                    functools.partial(escm2_loss, regulariser="ips"), ("ctr", "cvr"), _ESCM2),
    EntireSpaceSpec("escm2_dr", "ESCM2 eqs. (23)-(26), (34)", "ESCM2-DR: ESMM + lambda_c * DR CVR risk and "
                    "imputation risk", functools.partial(escm2_loss, regulariser="dr"), ("ctr", "cvr", "imputation"),
                    _ESCM2),
    EntireSpaceSpec("escm2_badr", "BADR eqs. (13), (32); ESCM2 eq. (34)", "ESCM2-BADR: ESMM + lambda_c * BADR CVR "
                    "risk (batch normaliser sum 1/p over clicks) and BADR imputation risk",
                    functools.partial(escm2_loss, regulariser="badr"), ("ctr", "cvr", "imputation"), _ESCM2),
    EntireSpaceSpec("multi_ips", "Zhang et al. 2020; BADR eq. (3)", "Multi-IPS: CTR task + IPS CVR task",
                    multi_ips_loss, ("ctr", "cvr"), _MULTI),
    EntireSpaceSpec("multi_dr", "Zhang et al. 2020; BADR eq. (7), ESCM2 eq. (25)", "Multi-DR: CTR task + DR CVR "
                    "task + imputation task", multi_dr_loss, ("ctr", "cvr", "imputation"), _MULTI),
    EntireSpaceSpec("ddpo", "Su et al. 2024, eqs. (6), (9), (10), (15)-(18)", "DDPO: click and conversion "
                    "propensity networks, self-normalised CVR loss over click and non-click spaces with soft labels",
                    ddpo_loss, ("ctr", "cvr", "conversion"),
                    {"gamma": 0.05, "lambda_c": 1.0, "lambda_p": 1.0, "lambda_g": 1.0}),
):
    register_entire_space(_entry)

for _entry in (
    PropensityFreeSpec("cvib", "Wang et al. 2020: factual risk + alpha * contrastive information loss + gamma * "
                       "output confidence penalty", "CVIB: counterfactual variational information bottleneck",
                       cvib_loss, "CVIBMF", {"alpha": 1.0, "gamma": 1e-5}, needs_u=True),
    PropensityFreeSpec("dib", "Liu et al. 2021, eq. (3) in its Section 5 form", "DIB: debiased information "
                       "bottleneck, unbiased and biased embeddings, prediction from the unbiased", dib_loss, "DIBMF",
                       {"alpha": 0.09, "gamma": 0.11}),
    PropensityFreeSpec("damf", "Saito and Nomura 2022: naive risk + beta * propensity matrix divergence",
                       "DAMF: domain-adversarial MF, a second MF maximises the divergence", damf_loss, "DAMFMF",
                       {"beta": 0.05, "lambda_pmd": 0.1}, needs_u=True, model_params=("lambda_pmd",)),
):
    register_propensity_free(_entry)

register_propensity_adjustment(PropensityAdjustmentSpec(
    "ddr", "Ha et al. 2024 eqs. (2), (5)", "D-DR: p_hat -> f(p_hat)^alpha, f(p) = log(1 + p) / log 2, alpha per pair "
    "in closed form with w = w2 / w1", ddr_propensity, {"w": 0.1}))

# GPL (Zhou et al., CIKM 2023): defaults lambda = beta = 0.7, the authors' code's.
_GPL = {"lam": 0.7, "beta": 0.7}
for _entry in (
    PropensityObjectiveSpec("gpl", "BADR eqs. (11)-(12); GPL eq. (28) with its authors' correction, Var over |D|^2",
                            "GPL: propensity loss + lambda [beta Bias_hat + (1 - beta) Var_hat] of the DR estimator",
                            gpl_propensity_loss, "paper", "gpl", _GPL),
    PropensityObjectiveSpec("gpl_published", "BADR eqs. (11)-(12), Var over |B|^2 per batch (the GPL code)",
                            "GPL as the published code normalises its variance term (per mini-batch)",
                            gpl_propensity_loss, "published", "gpl", _GPL),
):
    register_propensity_objective(_entry)
del _entry
