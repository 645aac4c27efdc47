"""Run one apply node: an operator's merge() on its input tensors, in the way the operator declares."""
from __future__ import annotations

import hashlib

import torch

from mgc.compiler.ir import Apply
from mgc.core.errors import MergeRuntimeError, MgcError
from mgc.stdlib import OPERATORS
from mgc.stdlib.slices import SLICE, slice_size, spans


ELEMENTWISE_SLICE = SLICE  # entries per slice of an elementwise op


def run_apply(p: Apply, tensors: list[torch.Tensor], dev: torch.device, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Run one operation. The result is float32, or `out_dtype` when it only goes to saves of that dtype:
    operators that can fill it directly (native_inputs, or elementwise ones run slice by slice) then never
    hold a whole float32 result."""
    op = OPERATORS[p.op]
    if op.native_inputs:
        for k, t in enumerate(tensors):
            tensors[k] = t.to(device=dev, non_blocking=True)
        out = torch.empty(p.shape, dtype=out_dtype, device=dev)
        return _checked(p, _call(op, p, tensors, out=out))
    if op.runs_in_slices:
        # Slice by slice: each input's float32 copy exists one slice at a time, small enough to be reused
        # from the allocator's free lists, and the same elementwise arithmetic gives the same bytes as
        # the whole-tensor call.
        flat = [t.reshape(-1) for t in tensors]
        tensors.clear()
        out = torch.empty(p.shape, dtype=out_dtype, device=dev)
        dest = out.view(-1)
        for a, b in spans(dest.numel(), ELEMENTWISE_SLICE if dev.type == "cpu" else slice_size(dev)):
            dest[a:b].copy_(_apply_whole(op, p, [t[a:b] for t in flat], dev))
        return _checked(p, out)
    return _checked(p, _apply_whole(op, p, tensors, dev))


def _checked(p: Apply, out: torch.Tensor) -> torch.Tensor:
    if not all_finite(out):
        narrow = out.dtype in (torch.float16, torch.bfloat16)
        raise MergeRuntimeError(
            f"{p.op}() produced NaN or Inf in tensor '{p.tensor}'" + (f" (computed for a {out.dtype} save)" if narrow else ""),
            p.span,
            "check the inputs and parameters of this operation for that tensor"
            + (f"; values beyond {out.dtype}'s range overflow to Inf: save in a wider dtype" if narrow else ""),
        )
    return out


def _apply_whole(op, p: Apply, tensors: list[torch.Tensor], dev: torch.device) -> torch.Tensor:
    # Pinned host tensors (the reader pins when the device is a GPU) copy without blocking; the op
    # runs on the same stream, after its copies.
    xs = tensors
    for k, t in enumerate(xs):  # in place, dropping each stored-dtype tensor once converted
        xs[k] = t.to(device=dev, non_blocking=True).float()
    del t
    return _call(op, p, xs)


def _call(op, p: Apply, tensors: list[torch.Tensor], **kw) -> torch.Tensor:
    """op.merge on the graph inputs of `p` (emptying `tensors`, so the caller holds none of them)."""
    base, models, extra = p.split(tensors)
    tensors.clear()
    for name in op.model_params:
        extra.setdefault(name, None)
    if op.random:
        extra["generator"] = tensor_generator(p.params.seed, p.seed_tensor)
    try:
        return op.merge(models, p.params, base, **extra, **kw)
    except MgcError:
        raise
    except Exception as e:
        raise MergeRuntimeError(f"{p.op}() failed on tensor '{p.tensor}': {e}", p.span) from e


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
