"""Tensors that stay in their files: an input read a slice at a time, and a result written a slice at a time.

An operator that declares ``streams`` (mgc/stdlib/operator.py) touches its inputs only as ``t.reshape(-1)[a:b]``
and fills ``ctx.out`` only as ``out.view(-1)[a:b].copy_(part)``, in order. Handed a :class:`FileTensor` and a
:class:`SliceSink`, it then holds only the slices in flight, whatever the tensor's size. Anything else done to a
FileTensor (a torch function, a method it does not define) reads it whole first, so the result is always right;
only the memory bound depends on the operator keeping its word.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from mgc.core.dtypes import torch_dtype
from mgc.core.errors import CheckpointError
from mgc.stdlib.slices import spans


READ_AHEAD = 4  # slices asked of the kernel ahead of the one read


class FileTensor:
    """A stored tensor of a safetensors checkpoint, or a flat range of one, read on demand."""

    def __init__(self, ckpt, name: str, check: Callable[[torch.Tensor], bool], start: int = 0,
                 stop: Optional[int] = None, shape: Optional[tuple[int, ...]] = None):
        info = ckpt.tensors[name]
        self.ckpt, self.name, self.check = ckpt, name, check
        self.start = start
        self.stop = math.prod(info.shape) if stop is None else stop
        self.shape = torch.Size(info.shape if shape is None else shape)
        self.dtype = torch_dtype(info.dtype)
        self.device = torch.device("cpu")
        self.whole_reads = 0  # how often it was read whole, for tests of the memory bound

    def numel(self) -> int:
        return self.stop - self.start

    def dim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def _flat(self, start: int, stop: int) -> "FileTensor":
        return FileTensor(self.ckpt, self.name, self.check, start, stop, (stop - start,))

    def reshape(self, *shape) -> "FileTensor | torch.Tensor":
        if _dims(shape) in ((-1,), (self.numel(),)):
            return self._flat(self.start, self.stop)
        return self.read().reshape(*shape)

    view = reshape

    def __getitem__(self, key):
        if len(self.shape) == 1 and isinstance(key, slice) and key.step in (None, 1):
            a, b, _ = key.indices(self.numel())
            return self._read(self.start + a, self.start + max(a, b))
        return self.read()[key]

    def read(self) -> torch.Tensor:
        """The whole tensor (or range), in memory."""
        self.whole_reads += 1
        return self._read(self.start, self.stop).reshape(self.shape)

    def check_all(self) -> None:
        """Read every slice, raising the CheckpointError of the first that holds NaN or Inf."""
        for a, b in spans(self.numel(), SINK_SLICE):
            self._read(self.start + a, self.start + b)

    def _read(self, start: int, stop: int) -> torch.Tensor:
        n = stop - start
        if n < self.stop - self.start:  # the next slices are read from the disk while this one is used: the whole
            # window at the first slice, then the one slice that enters it (the others were asked for already)
            self.ckpt.will_read(self.name, stop if start == self.start else stop + (READ_AHEAD - 1) * n,
                                stop + READ_AHEAD * n)
        t = self.ckpt.read_flat(self.name, start, stop)
        if t.is_floating_point() and not self.check(t):
            info = self.ckpt.tensors[self.name]
            raise CheckpointError(f"{info.file}: tensor '{self.name}' holds NaN or Inf values")
        return t

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("ckpt", "name", "start", "stop", "shape"):  # copies, pickles, __init__
            raise AttributeError(name)
        return getattr(self.read(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def whole(x):
            if isinstance(x, FileTensor):
                return x.read()
            if isinstance(x, (list, tuple)):
                return type(x)(whole(y) for y in x)
            return x

        return func(*whole(tuple(args)), **{k: whole(v) for k, v in (kwargs or {}).items()})

    def __repr__(self) -> str:
        return f"FileTensor({self.name!r}, entries {self.start}:{self.stop} of {self.ckpt.path})"


class SliceSink:
    """The result of one streamed operation: each slice copied into it (in order) is checked, cast to the saved
    dtype and handed to `emit`, which writes it into the output's shard. It is a flat view of itself."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, emit: Callable[[torch.Tensor], None],
                 check: Callable[[torch.Tensor], torch.Tensor]):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.device = torch.device("cpu")
        self.emit, self.check = emit, check
        self.filled = 0
        self._numel = math.prod(shape)

    def numel(self) -> int:
        return self._numel

    def view(self, *shape) -> "SliceSink":
        dims = _dims(shape)
        if dims not in ((-1,), (self._numel,), tuple(self.shape)):
            raise TypeError(f"a streamed result is written flat, not as {dims}")
        return self

    reshape = view

    def __getitem__(self, key) -> "_SinkSlice":
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a streamed result is written in flat slices")
        a, b, _ = key.indices(self._numel)
        return _SinkSlice(self, a, max(a, b))

    def put(self, start: int, part: torch.Tensor) -> None:
        if start != self.filled:
            raise RuntimeError(f"a streamed result is written in order: entry {start} came after {self.filled}")
        # a copy, always: the operator reuses its slice buffers, and the writer thread writes this one later
        part = self.check(part.reshape(-1).to(self.dtype, copy=True))
        self.emit(part)
        self.filled += part.numel()

    def copy_(self, source) -> "SliceSink":
        """The whole result from `source` (a tensor or a FileTensor), a slice at a time."""
        flat = source.reshape(-1)
        for a, b in spans(self._numel, SINK_SLICE):
            self.put(a, flat[a:b])
        return self

    def zero_(self) -> "SliceSink":
        zeros = torch.zeros(min(SINK_SLICE, self._numel), dtype=self.dtype)
        for a, b in spans(self._numel, SINK_SLICE):
            self.put(a, zeros[: b - a])
        return self

    @property
    def complete(self) -> bool:
        return self.filled == self._numel


SINK_SLICE = 1 << 20


def _dims(shape: tuple) -> tuple:
    """reshape(*shape)'s dimensions, given as reshape(a, b) or reshape((a, b))."""
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape


class _SinkSlice:
    def __init__(self, sink: SliceSink, start: int, stop: int):
        self.sink, self.start, self.stop = sink, start, stop

    def copy_(self, part: torch.Tensor) -> None:
        if part.numel() != self.stop - self.start:
            raise RuntimeError(f"a slice of {self.stop - self.start} entries got {part.numel()}")
        self.sink.put(self.start, part)
