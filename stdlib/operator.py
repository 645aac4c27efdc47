"""The contract every merge operator module in mgc.stdlib fulfils.

An operator is a tensor-wise function lifted over models. Its module defines:

* ``Params``: a pydantic model of its parameters, validated once per distinct
  set of resolved values (a parameter written as a layer gradient or a selector
  table is resolved to a plain number for each output tensor first);
* ``merge(tensors, params, base, **extra)``: the math on float32 tensors of one shape (or, for a
  ``native_inputs`` operator, on tensors of any float dtype, with an ``out`` keyword);
* ``OPERATOR``: an :class:`Operator` naming the two and the arity.

``extra`` holds, by name, what an operator asks for beyond its models:

* for each name in ``model_params`` (keyword parameters that take one model per input
  model, such as ``fisher = [fa, fb]``), the list of those models' tensors, or None when
  the recipe does not give it;
* ``generator`` for a ``random`` operator: a CPU ``torch.Generator`` seeded from the
  recipe's ``seed`` and the tensor's name, so results do not depend on the order of work
  or the device. Draw random numbers on the CPU with it, then move them to the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Sequence, Tuple

import torch
from pydantic import BaseModel, ConfigDict

MergeFn = Callable[[Sequence[torch.Tensor], BaseModel, Optional[torch.Tensor]], torch.Tensor]
# (params, number of models, whether model-valued parameters such as Fisher weights are given) ->
# (index of the model input the result is, bit for bit; the rule's name for `mgc plan --explain`) or None
IdentityFn = Callable[[BaseModel, int, bool], Optional[Tuple[int, str]]]


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
    # keyword parameters that take one model per input model (lowered as extra graph inputs)
    model_params: tuple[str, ...] = field(default=())
    # those of model_params that must be given
    required_model_params: tuple[str, ...] = field(default=())
    # draws random numbers: its Params has an int `seed` and merge() gets a `generator`
    random: bool = False
    # each output entry depends only on the same entry of the inputs, so the runtime may run
    # merge() on slices of a large tensor and never hold whole float32 copies of its inputs
    elementwise: bool = False
    # merge() takes its tensors as stored (bf16, fp16, float32 ...) and widens them slice by slice, and
    # takes `out`: None (return float32) or a tensor of the result's shape to fill, in the dtype the result
    # is saved in, so the runtime makes no whole float32 copy of the inputs or of the result
    native_inputs: bool = False
    # when the result is exactly one of the model inputs (slerp at t = 0): the optimizer then reads that
    # input instead of running merge(). Only identities merge() computes bit for bit belong here.
    identity: Optional[IdentityFn] = None
    # bytes merge() holds beyond the runtime's own copies, for a result of `numel` entries: the plan's
    # peak-memory estimate adds them (ties' whole-tensor |δ| and masks while it finds its cut)
    scratch_bytes: Callable[[int], int] = field(default=lambda numel: 0)

    @property
    def runs_in_slices(self) -> bool:
        """The runtime may call merge() slice by slice: elementwise, and no random draws over the whole tensor."""
        return self.elementwise and not self.random

    @property
    def fills_output(self) -> bool:
        """The runtime can have this operator produce its result in the saved dtype, with no float32 copy."""
        return self.native_inputs or self.runs_in_slices

    def arity_text(self) -> str:
        if self.max_models is None:
            return f"{self.min_models} or more models"
        if self.min_models == self.max_models:
            return f"exactly {self.min_models} model{'s' if self.min_models != 1 else ''}"
        return f"{self.min_models} to {self.max_models} models"
