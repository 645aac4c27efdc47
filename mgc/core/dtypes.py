"""Tensor dtypes without torch: what the compiler knows of a dtype (its name, its safetensors code, its size, whether
it is floating point), so that `mgc check`, `mgc plan` and `mgc graph` never import torch (about a second of
start-up). The runtime hands torch the real dtype: `dtype.torch`, or `torch_dtype(d)` where `d` may be either.

A DType prints as torch's dtype does ("torch.bfloat16"), so every message, journal key and hash that formats one
is as it was with torch's; it compares equal to torch's dtype of the same name (both ways: torch.dtype's __eq__
answers NotImplemented for other types, and Python asks the DType). Hashes differ from torch's, so a dict keyed by
dtypes is keyed by DTypes only: `as_dtype` turns a torch dtype into its DType, and `DTypeTable` (DTYPE_NAMES,
safetensors_header.DTYPE_CODES) looks a torch dtype up as its DType.

Also the names of floating dtypes as config.json's torch_dtype spells them: one table for messages and configs."""
from __future__ import annotations

from typing import Any


class DType:
    """One dtype: one object per name (`DType.named`, `as_dtype`), equal to another DType or torch dtype of its name."""

    __slots__ = ("name", "code", "itemsize", "is_floating_point")
    _BY_NAME: dict[str, "DType"] = {}

    def __init__(self, name: str, code: str | None, itemsize: int, is_floating_point: bool):
        self.name, self.code, self.itemsize, self.is_floating_point = name, code, itemsize, is_floating_point

    @classmethod
    def named(cls, name: str) -> "DType":
        return cls._BY_NAME[name]

    @classmethod
    def _register(cls, name: str, code: str | None, itemsize: int, is_floating_point: bool) -> "DType":
        cls._BY_NAME[name] = cls(name, code, itemsize, is_floating_point)
        return cls._BY_NAME[name]

    @property
    def torch(self) -> Any:
        """torch's dtype of this name (imports torch)."""
        import torch

        return getattr(torch, self.name)

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DType):
            return self.name == other.name
        if _is_torch_dtype(other):
            return repr(other) == repr(self)
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self) -> int:
        return hash(self.name)

    def __reduce__(self):
        return (_dtype_named, (self.name,))

    def __copy__(self) -> "DType":
        return self

    def __deepcopy__(self, memo: dict) -> "DType":
        return self


def _dtype_named(name: str) -> DType:
    """A DType from its name (unpickling): the same object, also for a dtype registered from torch's."""
    d = DType._BY_NAME.get(name)
    if d is None:
        import torch

        d = as_dtype(getattr(torch, name))
    return d


def _is_torch_dtype(value: object) -> bool:
    t = type(value)
    return t.__name__ == "dtype" and t.__module__ == "torch"


# The dtypes a safetensors header names (in the order of the errors' "mgc reads ..." list), then torch's other names.
float64 = DType._register("float64", "F64", 8, True)
float32 = DType._register("float32", "F32", 4, True)
float16 = DType._register("float16", "F16", 2, True)
bfloat16 = DType._register("bfloat16", "BF16", 2, True)
int64 = DType._register("int64", "I64", 8, False)
int32 = DType._register("int32", "I32", 4, False)
int16 = DType._register("int16", "I16", 2, False)
int8 = DType._register("int8", "I8", 1, False)
uint8 = DType._register("uint8", "U8", 1, False)
bool_ = DType._register("bool", "BOOL", 1, False)
float8_e4m3fn = DType._register("float8_e4m3fn", "F8_E4M3", 1, True)
float8_e5m2 = DType._register("float8_e5m2", "F8_E5M2", 1, True)
SAFETENSORS = tuple(DType._BY_NAME.values())


def as_dtype(dtype: Any) -> DType:
    """The DType of a DType or of a torch dtype (one torch has and this table lacks is added to it)."""
    if type(dtype) is DType:
        return dtype
    if not _is_torch_dtype(dtype):
        raise TypeError(f"not a dtype: {dtype!r}")
    name = repr(dtype).removeprefix("torch.")
    found = DType._BY_NAME.get(name)
    if found is None:
        found = DType._register(name, None, dtype.itemsize, dtype.is_floating_point)
    return found


def keep_dtype(obj: Any) -> None:
    """In a frozen dataclass's __post_init__: its `dtype` field, given as torch's dtype (a pickle's tensor, a test's
    payload), becomes the DType."""
    object.__setattr__(obj, "dtype", as_dtype(obj.dtype))


def torch_dtype(dtype: Any) -> Any:
    """torch's dtype for a DType or a torch dtype (imports torch): for a torch call at the runtime's boundary."""
    return dtype.torch if type(dtype) is DType else dtype


class DTypeTable(dict):
    """A dict keyed by DTypes that also answers for torch's dtypes (looked up as their DType)."""

    def __getitem__(self, key: Any) -> Any:
        return super().__getitem__(_key(key))

    def __contains__(self, key: object) -> bool:
        return super().__contains__(_key(key))

    def get(self, key: Any, default: Any = None) -> Any:
        return super().get(_key(key), default)


def _key(key: Any) -> Any:
    return as_dtype(key) if _is_torch_dtype(key) else key


DTYPE_NAMES = DTypeTable({bfloat16: "bfloat16", float16: "float16", float32: "float32", float64: "float64"})


def dtype_name(dtype: Any) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype))
