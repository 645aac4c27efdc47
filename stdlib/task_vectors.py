"""The task-vector operators as one mechanism. With the task vectors δᵢ = xᵢ − base of the models,

    result = base + combine(keep(δ₁), …, keep(δₙ))

A keep rule (:class:`Keep`) says which entries of each δᵢ survive, with its per-model values (``density``
...); where it has ``rescale``, the survivors are then scaled back to the L1 norm of δᵢ (sparsify.py holds
the math):

* ``NONE``: every entry (task arithmetic);
* ``MAGNITUDE``: the int(density·numel) largest by |δᵢ| (TIES' trim);
* ``DARE``: each entry at random with probability density;
* ``DELLA``: each entry at random with a probability rising with its magnitude rank in its row (MagPrune);
* ``OUTLIERS``: the density fraction below the gamma fraction of largest |δᵢ| (Model Breadcrumbs).

A combine rule (:class:`Combine`) says how the kept task vectors δ̃ᵢ add up, with one weight wᵢ per model
and the scale λ:

* ``SUM``: λ·Σ wᵢδ̃ᵢ, divided by Σ wᵢ when ``normalize`` (by 1 when |Σ wᵢ| < 1e-8, as mergekit);
* ``TIES``: a sign elected per entry, γ = sign(Σ wᵢδ̃ᵢ) (a zero sum elects +), then λ·Σ wᵢδ̃ᵢ[sign = γ],
  divided by Σ wᵢ[sign = γ] when ``normalize`` (the disjoint mean; a zero divisor divides by 1).

Each operator module (task_arithmetic, ties, dare_linear, ...) names its pair in a :class:`Method`, which
gives it its Params (the weights, the keep rule's values, normalize, rescale, lambda, and seed for a random
keep rule), its ``merge_deltas(deltas, params, ctx)`` (the math above on given task vectors), its
``merge(tensors, params, ctx)`` (``merge_deltas`` of the xᵢ − base) and its OPERATOR.

A private helper module: it registers no operator. The math follows mergekit 0.1.5
(``merge_methods/generalized_task_arithmetic.py``); the keep rules' own departures from it are each rule's
``deviations``.
"""
from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

from mgc.core.lazy_torch import torch
from pydantic import Field, FiniteFloat, ValidationInfo, create_model, field_validator

from . import sparsify as sp
from .fields import Weights, weights_field
from .operator import MergeContext, Operator, OpParams


class TaskVectors(SequenceABC):
    """The task vectors δᵢ = xᵢ − base of the models, each computed when it is read.

    What an operator's ``merge`` hands its ``merge_deltas``: one that takes the task vectors one at a
    time (a weighted sum) then holds one at a time, and every δᵢ is the same float32 difference.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], base: torch.Tensor):
        self._tensors, self._base = tensors, base

    def __len__(self) -> int:
        return len(self._tensors)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._tensors[i] - self._base


def per_model(values: Optional[Sequence[float]], n: int, default: float, name: str, op: str) -> list[float]:
    """The list of one value per model, the default for each when the recipe gives none."""
    if values is None:
        return [default] * n
    if len(values) != n:
        raise ValueError(f"{op}: '{name}' has {len(values)} values for {n} models")
    return list(values)


def per_model_values(params, n: int, op: str, **defaults: float) -> list[list[float]]:
    """For each name given with its default, that per-model parameter of ``params`` as one value per model."""
    return [per_model(getattr(params, name), n, default, name, op) for name, default in defaults.items()]


# ---------------------------------------------------------------- combine rules


def sum_task_vectors(deltas: Iterable[torch.Tensor], weights: Sequence[float], normalize: bool, lambda_: float) -> torch.Tensor:
    """λ·Σ wᵢδᵢ, divided by Σ wᵢ when ``normalize`` (by 1 when |Σ wᵢ| < 1e-8, as mergekit).

    Accumulated model by model in float32, bit-identical to mergekit's sum over its stacked deltas.
    ``deltas`` may be a generator, so only one task vector is held at a time.
    """
    total: Optional[torch.Tensor] = None
    w: Optional[torch.Tensor] = None
    for i, d in enumerate(deltas):
        if total is None:
            w = torch.tensor(list(weights), dtype=d.dtype, device=d.device)
            total = torch.zeros_like(d)
        total += d * w[i]
    if normalize:
        divisor = w.sum()
        total /= torch.where(divisor.abs() < 1e-8, 1.0, divisor)
    if lambda_ != 1:
        total.mul_(lambda_)
    return total


def sign_agreement(stacked: torch.Tensor) -> torch.Tensor:
    """TIES' sign election ("sum" consensus) over dim 0: 1.0 where an entry's sign equals the sign of the
    sum over models (a zero sum elects +), else 0.0. Zero entries never agree."""
    elected = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0)
    return (stacked.sign() == elected).to(stacked.dtype)


def disjoint_merge(deltas: Iterable[torch.Tensor], weights: Sequence[float], normalize: bool, lambda_: float) -> torch.Tensor:
    """TIES' combination: λ·Σ wᵢδᵢ[agree] / Σ wᵢ[agree] (the disjoint mean; the plain agreeing sum without
    ``normalize``), the signs elected on the weighted task vectors; a zero divisor divides by 1.
    A list of deltas is emptied, so that their memory is freed as soon as they are stacked."""
    deltas = deltas if isinstance(deltas, list) else list(deltas)
    stacked = torch.stack(deltas)
    deltas.clear()  # the caller's copies are in `stacked` now
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    w = w.reshape(-1, *[1] * (stacked.dim() - 1))
    # In place where the values are not needed again: the same arithmetic, a third of the memory.
    weighted = stacked.mul_(w)
    agree = sign_agreement(weighted)
    mixed = weighted.mul_(agree).sum(dim=0)
    del weighted, stacked
    if normalize:
        divisor = agree.mul_(w).sum(dim=0)
        mixed /= torch.where(divisor == 0, 1.0, divisor)
    if lambda_ != 1:
        mixed *= lambda_
    return mixed


@dataclass(frozen=True)
class Combine:
    """How the kept task vectors add up."""

    # what `normalize` divides by, in words (the parameter's description)
    divisor: str
    # (kept task vectors, one at a time; weights; normalize; λ) -> the merged task vector
    combine: Callable[[Iterable[torch.Tensor], Sequence[float], bool, float], torch.Tensor]


SUM = Combine("the weights", sum_task_vectors)
TIES = Combine("the weights of the models agreeing with the elected sign", disjoint_merge)


# ---------------------------------------------------------------- keep rules

Density = Annotated[float, Field(gt=0.0, le=1.0)]
Gamma = Annotated[float, Field(ge=0.0, le=1.0)]
Epsilon = Annotated[float, Field(ge=0.0, lt=1.0)]
GAMMA = 0.01  # mergekit's default gamma
DELLA_EPSILON = 0.15  # mergekit's default epsilon


def _density(what: str) -> Callable[[], tuple]:
    return lambda: (Optional[list[Density]], Field(
        None, description=f"fraction of each task vector's entries kept{what}", json_schema_extra={"default_text": "1.0 each"}
    ))


def _gamma() -> tuple:
    return Optional[list[Gamma]], Field(
        None, description="fraction of each task vector's entries dropped as outliers, the largest by magnitude",
        json_schema_extra={"default_text": "0.01 each"},
    )


def _epsilon() -> tuple:
    return Optional[list[Epsilon]], Field(
        None, description="half-width of the range of keep probabilities, density ± epsilon, over magnitude ranks",
        json_schema_extra={"default_text": "0.15 each"}, validate_default=True,
    )


def check_della(density: Optional[Sequence[float]], epsilon: Optional[Sequence[float]]) -> None:
    """density ± epsilon must lie in (0, 1) for every model whose density is below 1."""
    densities = list(density) if density is not None else None
    epsilons = list(epsilon) if epsilon is not None else None
    if densities is None:
        return  # density 1 everywhere: nothing is pruned and epsilon is unused
    if epsilons is None:
        epsilons = [DELLA_EPSILON] * len(densities)
    elif len(epsilons) != len(densities):
        return  # lengths are checked against the models when merging
    for d, e in zip(densities, epsilons):
        if d < 1 and not (d - e > 0 and d + e < 1):
            raise ValueError(
                f"density ± epsilon must lie in (0, 1) wherever density < 1; got density {d:g}, epsilon {e:g}"
            )


def _della_range(cls, v: Optional[list[float]], info: ValidationInfo) -> Optional[list[float]]:
    check_della(info.data.get("density"), v)
    return v


# Said of every random keep rule, and of every sparsifying one, once.
_DRAWN = """\
* the masks are drawn on the CPU from the per-tensor ``generator`` (``seed`` and the tensor's name), so a
  seed gives the same masks on every device and in any order of work; mergekit draws ``torch.bernoulli``
  from the global torch RNG on the merge device. mgc's masks therefore differ from mergekit's draw for
  draw, but follow the same distribution ({what});
"""
_RESCALED = """\
* ``rescale`` is mergekit's: the kept entries are multiplied by ‖δᵢ‖₁ / ‖kept δᵢ‖₁ ({paper});
  mgc sums these two norms in float64 (mergekit: float32);
"""
_SPARSIFYING = """\
* ``weights`` defaults to 1.0 for each model (mergekit requires ``weight``);
* mergekit's ``int8_mask`` is left out: it only changes the dtype of mergekit's masks, never a result.
"""


@dataclass(frozen=True)
class Keep:
    """Which entries of each task vector are kept."""

    # its per-model values beside the weights, in the Params' order: (name, default for each model,
    # () -> the Params field's (annotation, Field))
    values: tuple[tuple[str, float, Callable[[], tuple]], ...]
    # (δ, params, generator, its values for this model, in order) -> the kept δ
    sparsify: Callable[..., torch.Tensor]
    # draws random numbers (from ctx.generator): its operators' Params get a `seed`
    random: bool = False
    # has a `rescale` parameter
    rescales: bool = True
    # pydantic validators its Params get
    validators: Mapping[str, Any] = field(default_factory=dict)
    # where it deliberately differs from mergekit (its operators' modules refer to this)
    deviations: str = ""

    def kept(
        self, deltas: Sequence[torch.Tensor], params: OpParams, generator: Optional[torch.Generator], op: str
    ) -> tuple[list[float], Iterator[torch.Tensor]]:
        """The weights, and the kept task vectors one at a time, in order (as a random rule draws)."""
        weights, *columns = per_model_values(
            params, len(deltas), op, weights=1.0, **{name: default for name, default, _ in self.values}
        )
        return weights, (self.sparsify(delta, params, generator, *v) for delta, *v in zip(deltas, *columns))


NONE = Keep(values=(), sparsify=lambda delta, params, generator: delta, rescales=False)

MAGNITUDE = Keep(
    values=(("density", 1.0, _density(", by magnitude")),),
    sparsify=lambda delta, params, generator, density: sp.magnitude(delta, density, params.rescale),
    deviations="""\
* of entries of exactly equal |δᵢ| at the cut, those at the lowest positions are kept, the same on every
  device; mergekit's unstable sort may keep others among them.
""",
)

DARE = Keep(
    values=(("density", 1.0, _density(", at random")),),
    sparsify=lambda delta, params, generator, density: sp.dare(delta, density, params.rescale, generator),
    random=True,
    deviations=_DRAWN.format(what="each entry kept independently with probability density")
    + _RESCALED.format(paper="whose expectation is the DARE paper's 1/density")
    + _SPARSIFYING,
)

DELLA = Keep(
    values=(
        ("density", 1.0, _density(" on average, the larger entries likelier kept")),
        ("epsilon", DELLA_EPSILON, _epsilon),
    ),
    sparsify=lambda delta, params, generator, density, epsilon: sp.della(delta, density, epsilon, params.rescale, generator),
    random=True,
    validators={"_range": field_validator("epsilon")(_della_range)},
    deviations=_DRAWN.format(what="each entry kept independently with its rank's probability")
    + """\
* entries of equal |δ| are ranked by position (a stable sort, the same on every device), where
  mergekit's unstable argsort may order them either way;
* a row of a single entry is kept with probability density (the middle of the range), where mergekit's
  rank normalisation divides 0 by 0 and torch.bernoulli fails;
"""
    + _RESCALED.format(paper="the DELLA paper rescales by 1/pᵢ per entry")
    + "* an invalid density/epsilon pair is refused when the parameters are checked, not mid-merge;\n"
    + _SPARSIFYING,
)

OUTLIERS = Keep(
    values=(("density", 1.0, _density(", below the outliers by magnitude")), ("gamma", GAMMA, _gamma)),
    sparsify=lambda delta, params, generator, density, gamma: sp.magnitude_outliers(delta, density, gamma, params.rescale),
    deviations=_SPARSIFYING,
)


# ---------------------------------------------------------------- operators


@dataclass(frozen=True)
class Method:
    """One task-vector operator: its name (that of its module), keep rule and combine rule."""

    name: str
    keep: Keep
    combine: Combine

    def params(
        self, *, normalize: bool, rescale: bool = False, extends: type[OpParams] = OpParams,
        texts: Optional[Mapping[str, str]] = None,
    ) -> type[OpParams]:
        """Its Params: weights, the keep rule's values, normalize and rescale (with these defaults), lambda,
        and seed for a random keep rule. ``extends``: the Params of the operator whose parameters these are,
        with another combine rule; ``texts``: descriptions other than the family's, by field name."""
        text = {
            "weights": "one weight per model, multiplying its sparsified task vector",
            "normalize": f"divide the merged task vector by the sum of {self.combine.divisor}",
            "rescale": "scale each sparsified task vector back to its original L1 norm",
            **(texts or {}),
        }
        fields: dict[str, tuple] = {"weights": (Weights, weights_field(text["weights"]))}
        fields.update({name: make() for name, _, make in self.keep.values})
        fields["normalize"] = (bool, Field(normalize, description=text["normalize"]))
        if self.keep.rescales:
            fields["rescale"] = (bool, Field(rescale, description=text["rescale"]))
        fields["lambda_"] = (FiniteFloat, Field(1.0, alias="lambda", description="scale of the merged task vector"))
        if self.keep.random:
            fields["seed"] = (int, Field(0, ge=0, description="seed of the random masks (combined with each tensor's name)"))
        return create_model(
            "Params", __base__=extends, __module__=f"{__package__}.{self.name}",
            __validators__=dict(self.keep.validators), **fields,
        )

    def merge_deltas(self, deltas: Sequence[torch.Tensor], params: OpParams, ctx: MergeContext) -> torch.Tensor:
        """base + combine(keep(δ₁), …, keep(δₙ)) for the given task vectors (read one at a time)."""
        weights, kept = self.keep.kept(deltas, params, ctx.generator, self.name)
        return ctx.base + self.combine.combine(kept, weights, params.normalize, params.lambda_)

    def merge(self, tensors: Sequence[torch.Tensor], params: OpParams, ctx: MergeContext) -> torch.Tensor:
        """``merge_deltas`` of the task vectors xᵢ − base."""
        return self.merge_deltas(TaskVectors(tensors, ctx.base), params, ctx)

    def operator(self, params: type[OpParams], *, doc: str, reference: str, **declared) -> Operator:
        """Its OPERATOR: one or more models and a required base, run "whole" unless ``declared`` says
        otherwise (as it may give its own ``merge``, ``runs`` and ``transient``). Shift-equivariant: the task
        vectors xᵢ − base do not change when every input moves by c, and the result is base + (…)."""
        return Operator(
            **{"merge": self.merge, "shift_equivariant": True, **declared}, name=self.name, params=params, doc=doc, reference=reference,
            min_models=1, base="required", per_model=("weights", *(name for name, _, _ in self.keep.values)),
        )
