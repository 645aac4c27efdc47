"""Run a Rows node (compiler/ir.py): a tensor assembled from rows of its inputs, to align a vocabulary."""
from __future__ import annotations

import numpy as np
import torch

from mgc.compiler.ir import Rows


def _ints(raw: bytes, dev: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(raw, dtype="<i4").astype(np.int64)).to(dev)


def run_rows(p: Rows, tensors: list[torch.Tensor], dev: torch.device) -> torch.Tensor:
    """Copies stay in the inputs' dtype (the widest of them); means are taken in float32."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    inputs = [t.to(device=dev, non_blocking=True) for t in tensors]
    tensors.clear()
    out = torch.empty(p.shape, dtype=dtype, device=dev)
    source = np.frombuffer(p.source, dtype="<i4")
    index = np.frombuffer(p.index, dtype="<i4")
    copied = np.nonzero(source >= 0)[0]
    for k, t in enumerate(inputs):
        rows = copied[source[copied] == k]
        if rows.size:
            out[torch.from_numpy(rows.astype(np.int64)).to(dev)] = t[_ints(index[rows].tobytes(), dev)].to(dtype)
    filled = np.zeros(len(source), dtype=bool)
    for out_rows, terms in p.means:
        acc = None
        for k, rows in terms:
            part = inputs[k][_ints(rows, dev)].float()
            acc = part if acc is None else acc + part
        out[_ints(out_rows, dev)] = (acc / len(terms)).to(dtype)
        filled[np.frombuffer(out_rows, dtype="<i4")] = True
    rest = np.nonzero((source < 0) & ~filled)[0]
    if rest.size:
        mean = out[torch.from_numpy(copied.astype(np.int64)).to(dev)].float().mean(dim=0) if copied.size else 0.0
        out[torch.from_numpy(rest.astype(np.int64)).to(dev)] = torch.as_tensor(mean, device=dev).to(dtype)
    return out
