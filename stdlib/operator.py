"""The contract every merge operator module in mgc.stdlib fulfils.

An operator is a tensor-wise function lifted over models. Its module defines:

* ``Params``: a pydantic model of its parameters, validated once per distinct set of resolved values (a
  parameter written as a layer gradient or a selector table is resolved to a plain number for each output
  tensor first). An operator whose Params has a ``seed`` field draws random numbers (``Operator.random``);
* ``merge(tensors, params, ctx)``: the math on the models' tensors of one shape (``tensors``, in order),
  ``ctx`` a :class:`MergeContext` holding what some operators need besides them;
* ``OPERATOR``: an :class:`Operator` naming the two, the arity, and how the runtime may run merge().

How the runtime runs merge() (``Operator.runs``):

* ``"whole"``: every input is widened to float32 on the device and merge() is called once; it returns float32;
* ``"slices"``: each output entry depends only on the same entry of the inputs, so merge() is called on float32
  slices of the flattened inputs and the runtime fills the result slice by slice (in the dtype it is saved in),
  never holding whole float32 copies of the inputs. Never for a random operator: its draws would depend on the
  slicing;
* ``"stored"``: merge() gets the tensors as stored (bf16, fp16, float32 ...) on the device and ``ctx.out``, a
  tensor of the result's shape in the dtype it is saved in, to fill and return; it widens slice by slice itself
  (see slices.py), so no whole float32 copy of an input or of the result exists. With ``ctx.out`` None (a call
  outside the runtime) it returns a new float32 tensor.

Each operator also declares the bytes merge() holds while it runs, beyond its inputs and result
(``Operator.transient``), for the plan's peak-memory estimate; the default follows ``runs``.

An operator that reads its inputs only as flat slices (``t.reshape(-1)[a:b]``) and fills ``ctx.out`` only as
``out.view(-1)[a:b].copy_(part)``, in ascending order, declares ``streams``: the runtime may then hand it inputs
that stay in their files and a result that goes straight to its shard (runtime/file_tensor.py), so that a tensor of
any size is merged holding only the slices in flight. A "slices" operator always may.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Optional, Sequence, Tuple, Union

from mgc.core.dtypes import DType, as_dtype, float32
from mgc.core.lazy_torch import torch
from pydantic import BaseModel, ConfigDict

from .slices import GRAM_BUFFER, SLICE

Runs = Literal["whole", "slices", "stored"]
RUNS: tuple[Runs, ...] = ("whole", "slices", "stored")


@dataclass(frozen=True)
class MergeContext:
    """What merge() gets besides the models' tensors and the parameters."""

    # the `base = model` input's tensor, or None when the recipe gives none
    base: Optional[torch.Tensor] = None
    # for each name in Operator.model_params (keyword parameters taking one model per input model, such as
    # `fisher = [fa, fb]`): those models' tensors, in order; None (or absent) when the recipe does not give it
    aux: Mapping[str, Optional[Sequence[torch.Tensor]]] = field(default_factory=dict)
    # for a random operator: a CPU generator seeded from the recipe's `seed` and the tensor's name, so results
    # do not depend on the order of work or the device. Draw on the CPU with it, then move the numbers to the
    # device. None for the others
    generator: Optional[torch.Generator] = None
    # for a "stored" operator: None, or the tensor to fill with the result (the result's shape, saved dtype)
    out: Optional[torch.Tensor] = None


# merge(tensors, params, ctx) -> the result
MergeFn = Callable[[Sequence["torch.Tensor"], BaseModel, MergeContext], "torch.Tensor"]
# (params, number of models, whether model-valued parameters such as Fisher weights are given) ->
# (index of the model input the result is, bit for bit; the rule's name for `mgc plan --explain`) or None
IdentityFn = Callable[[BaseModel, int, bool], Optional[Tuple[int, str]]]
# (entries of the result, number of graph inputs (base, models and model-valued inputs), whether
# model-valued inputs are given) -> bytes merge() holds while it runs, beyond its inputs and result
TransientFn = Callable[[int, int, bool], int]
# (params, whether a base is given) -> whether merge() commutes with a shift of all its inputs (Operator.shift_equivariant)
ShiftFn = Callable[[BaseModel, bool], bool]
# (params, whether model-valued inputs are given) -> whether merge() streams (Operator.streams)
StreamsFn = Callable[[BaseModel, bool], bool]


def whole_transient(numel: int, inputs: int, aux: bool) -> int:
    """A "whole" operator: float32 copies of every input, and as much again for its own temporaries."""
    return 2 * 4 * numel * inputs


def slices_transient(numel: int, inputs: int, aux: bool) -> int:
    """A "slices" operator: float32 copies of one slice of each input, and two slices of temporaries."""
    return (inputs + 2) * 4 * min(numel, SLICE)


def stored_transient(numel: int, inputs: int, aux: bool) -> int:
    """A "stored" operator: a few float32 slices per input and gram()'s float64 buffer."""
    return (inputs + 3) * 4 * min(numel, SLICE) + min(GRAM_BUFFER, 8 * numel * inputs)


DEFAULT_TRANSIENT: dict[Runs, TransientFn] = {
    "whole": whole_transient, "slices": slices_transient, "stored": stored_transient,
}


class OpParams(BaseModel):
    """Base class of every operator's parameter schema: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


@dataclass(frozen=True)
class Operator:
    name: str
    params: type[OpParams]
    merge: MergeFn
    doc: str
    min_models: int = 1
    max_models: Optional[int] = None
    # "required": a `base = model` keyword must be given; "optional": may be; "none": refused.
    base: Literal["none", "optional", "required"] = "none"
    # parameters that take one value per input model (a list as long as the models)
    per_model: tuple[str, ...] = field(default=())
    reference: str = ""
    # keyword parameters that take one model per input model (lowered as extra graph inputs; ctx.aux)
    model_params: tuple[str, ...] = field(default=())
    # those of model_params that must be given
    required_model_params: tuple[str, ...] = field(default=())
    # how the runtime runs merge(): see the module docstring
    runs: Runs = "whole"
    # when the result is exactly one of the model inputs (slerp at t = 0): the optimizer then reads that
    # input instead of running merge(). Only identities merge() computes bit for bit belong here.
    identity: Optional[IdentityFn] = None
    # bytes merge() holds while it runs (see TransientFn); None: the default for `runs`
    transient: Optional[TransientFn] = None
    # whether merge() commutes with adding one constant c to every model input and the base, merge(xᵢ + c, base + c)
    # = merge(xᵢ, base) + c (mathematically): True, False, or a function of (params, whether a base is given). Where
    # it does not, a tensor a model applies as c + w (Gemma's norm weights: 1 + w) is merged as c + w and c taken off
    # after; where it does, it is merged as stored, bit for bit. False, the safe side, unless declared.
    shift_equivariant: Union[bool, ShiftFn] = False
    # whether merge() touches its inputs and ctx.out only in flat slices, in order (see the module docstring): True,
    # False, or a function of (params, whether model-valued inputs are given). Implied by runs="slices"
    streams: Union[bool, StreamsFn] = False

    def __post_init__(self) -> None:
        if self.runs not in RUNS:
            raise ValueError(f"{self.name}: runs must be one of {', '.join(RUNS)}, not {self.runs!r}")
        if self.runs == "slices" and self.random:
            raise ValueError(f"{self.name}: a random operator cannot run in slices (its draws would depend on them)")
        if self.transient is None:
            object.__setattr__(self, "transient", DEFAULT_TRANSIENT[self.runs])

    def commutes_with_shift(self, params: BaseModel, has_base: bool) -> bool:
        """`shift_equivariant` for these parameters."""
        rule = self.shift_equivariant
        return bool(rule(params, has_base) if callable(rule) else rule)

    def streams_with(self, params: BaseModel, aux: bool) -> bool:
        """`streams` for these parameters."""
        if self.runs == "slices":
            return True
        if self.runs == "whole":
            return False
        rule = self.streams
        return bool(rule(params, aux) if callable(rule) else rule)

    @property
    def random(self) -> bool:
        """Draws random numbers: its Params has a ``seed``, and merge() gets ``ctx.generator``."""
        return "seed" in self.params.model_fields

    def result_dtype(self, saved: Optional[DType]) -> DType:
        """The dtype of the result when its only users save it as `saved` (None: other users): an operator
        that fills its result ("slices", "stored") writes the saved dtype directly, the others float32.
        A DType (mgc/core/dtypes.py), also for a torch dtype given: the runtime hands torch its `.torch`."""
        return as_dtype(saved) if saved is not None and self.runs != "whole" else float32

    def arity_text(self) -> str:
        if self.max_models is None:
            return f"{self.min_models} or more models"
        if self.min_models == self.max_models:
            return f"exactly {self.min_models} model{'s' if self.min_models != 1 else ''}"
        return f"{self.min_models} to {self.max_models} models"
