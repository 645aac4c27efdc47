"""Run one apply node: an operator's merge() on its input tensors, in the way the operator declares (``runs``)."""
from __future__ import annotations

import hashlib
from typing import Optional

import torch

from mgc.compiler.ir import Apply
from mgc.core.errors import MergeRuntimeError, MgcError
from mgc.stdlib import RUNNABLE
from mgc.stdlib.operator import MergeContext, Operator
from mgc.stdlib.slices import SLICE, slice_size, spans


ELEMENTWISE_SLICE = SLICE  # entries per slice of a "slices" operator on the CPU


def run_apply(p: Apply, tensors: list[torch.Tensor], dev: torch.device, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Run one operation (emptying `tensors`, so the caller holds none of them). The result is float32, or
    `out_dtype` when it only goes to saves of that dtype and the operator fills its result ("slices" and
    "stored" operators), so that no whole float32 result exists."""
    op = RUNNABLE[p.op]
    if p.offset:
        return checked(p, _apply_shifted(op, p, tensors, dev))
    return checked(p, _RUNS[op.runs](op, p, tensors, dev, op.result_dtype(out_dtype).torch))


def _apply_shifted(op: Operator, p: Apply, tensors: list[torch.Tensor], dev: torch.device) -> torch.Tensor:
    """merge() of xᵢ + c for the models and the base (not Fisher weights), less c, for a tensor the model applies
    as c + w (Apply.offset). In float32, the result too; the inputs are copied, never changed in place (a loaded
    tensor may have other users)."""
    base, models, _ = p.split(list(range(len(tensors))))
    for k in ([base] if base is not None else []) + models:
        tensors[k] = tensors[k].to(device=dev, dtype=torch.float32) + p.offset
    return _RUNS[op.runs](op, p, tensors, dev, torch.float32).float() - p.offset


def _apply_stored(op: Operator, p: Apply, tensors: list[torch.Tensor], dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """merge() on the tensors as stored, filling a result of `dtype`."""
    for k, t in enumerate(tensors):
        tensors[k] = t.to(device=dev, non_blocking=True)
    return _call(op, p, tensors, out=torch.empty(p.shape, dtype=dtype, device=dev))


def _apply_in_slices(op: Operator, p: Apply, tensors: list[torch.Tensor], dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """merge() slice by slice: each input's float32 copy exists one slice at a time, small enough to be reused
    from the allocator's free lists, and the same elementwise arithmetic gives the same bytes as the whole-tensor
    call."""
    out = torch.empty(p.shape, dtype=dtype, device=dev)
    return _fill_in_slices(op, p, tensors, out, dev)


def _fill_in_slices(op: Operator, p: Apply, tensors: list, out, dev: torch.device):
    flat = [t.reshape(-1) for t in tensors]
    tensors.clear()
    dest = out.view(-1)
    for a, b in spans(dest.numel(), ELEMENTWISE_SLICE if dev.type == "cpu" else slice_size(dev)):
        dest[a:b].copy_(_apply_whole(op, p, [t[a:b] for t in flat], dev))
    return out


def run_apply_into(p: Apply, tensors: list, out) -> None:
    """Run one operation of an operator that streams (Operator.streams_with) on the CPU, into `out`, a result the
    caller gives and checks slice by slice as it is filled (runtime/streamed.py)."""
    op = RUNNABLE[p.op]
    if op.runs == "slices":
        _fill_in_slices(op, p, tensors, out, torch.device("cpu"))
    else:
        _call(op, p, tensors, out=out)


def _apply_whole(
    op: Operator, p: Apply, tensors: list[torch.Tensor], dev: torch.device, dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """merge() once on float32 copies of every input; the result is float32 (`dtype` is not used)."""
    # Pinned host tensors (the reader pins when the device is a GPU) copy without blocking; the op
    # runs on the same stream, after its copies.
    for k, t in enumerate(tensors):  # in place, dropping each stored-dtype tensor once converted
        tensors[k] = t.to(device=dev, non_blocking=True).float()
    del t
    return _call(op, p, tensors)


_RUNS = {"whole": _apply_whole, "slices": _apply_in_slices, "stored": _apply_stored}


def _call(op: Operator, p: Apply, tensors: list[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """op.merge on the graph inputs of `p` (emptying `tensors`, so the caller holds none of them)."""
    base, models, aux = p.split(tensors)
    tensors.clear()
    ctx = MergeContext(
        base=base,
        aux={name: aux.get(name) for name in op.model_params},
        generator=tensor_generator(p.params.seed, p.seed_tensor) if op.random else None,
        out=out,
    )
    try:
        return op.merge(models, p.params, ctx)
    except MgcError:
        raise
    except Exception as e:
        raise MergeRuntimeError(f"{p.op}() failed on tensor '{p.tensor}': {e}", p.span) from e


def checked(p: Apply, out: torch.Tensor) -> torch.Tensor:
    """`out`, refused when it holds NaN or Inf."""
    if not all_finite(out):
        narrow = out.dtype in (torch.float16, torch.bfloat16)
        raise MergeRuntimeError(
            f"{p.op}() produced NaN or Inf in tensor '{p.tensor}'" + (f" (computed for a {out.dtype} save)" if narrow else ""),
            p.span,
            "check the inputs and parameters of this operation for that tensor"
            + (f"; values beyond {out.dtype}'s range overflow to Inf: save in a wider dtype" if narrow else ""),
        )
    return out


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t. A sum is one pass with no bool tensor, and any NaN or Inf makes it non-finite;
    only when the sum itself is not finite (or overflowed) is every element looked at."""
    if t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def tensor_generator(seed: int, tensor: str) -> torch.Generator:
    """A CPU generator for one tensor: the same seed and name give the same numbers on any device."""
    digest = hashlib.sha256(f"{seed}:{tensor}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
