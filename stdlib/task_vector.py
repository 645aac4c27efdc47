"""The task vector of a fine-tuned model: x − base.

As a value, a model whose tensors are the difference between a fine-tune and its base, e.g. for
``linear(base, task_vector(code, base = base), weights = [1, 0.5], normalize = false)``. The opt-in
optimizer pass ``share_task_vectors`` (``--share-task-vectors``) inserts it where several task-vector operations over the same base
read the same model, so that x − base is computed once and shared; those operations then run their
``merge_deltas`` on it.

Reference: Ilharco et al., "Editing models with task arithmetic" (2023), arXiv:2212.04089.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .operator import Operator, OpParams


class Params(OpParams):
    pass


def merge(tensors: Sequence[torch.Tensor], params: Params, base: Optional[torch.Tensor]) -> torch.Tensor:
    return tensors[0] - base


OPERATOR = Operator(
    name="task_vector",
    params=Params,
    merge=merge,
    doc="x − base, the task vector of a fine-tuned model (the opt-in share_task_vectors pass inserts it)",
    reference="Ilharco et al. 2023, Editing models with task arithmetic, arXiv:2212.04089",
    min_models=1,
    max_models=1,
    base="required",
    elementwise=True,
)
