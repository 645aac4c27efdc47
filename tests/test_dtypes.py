"""mgc/core/dtypes.py: the compiler's torch-free dtypes stand for torch's wherever they meet (equality both ways,
the same text in messages and hashes, the same sizes), and the runtime gets torch's back."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

from mgc.compiler.ir import Load, Save
from mgc.compiler.values import TensorSpec
from mgc.core import dtypes
from mgc.core.dtypes import DTYPE_NAMES, DType, as_dtype, dtype_name, torch_dtype
from mgc.core.safetensors_header import DTYPE_CODES, DTYPES, TensorInfo

ALL = list(DTYPES.values())


@pytest.mark.parametrize("d", ALL, ids=str)
def test_a_dtype_is_torchs_in_text_size_and_kind(d):
    t = getattr(torch, d.name)
    assert str(d) == str(t) and repr(d) == repr(t) and f"{d}" == f"{t}"
    assert d.itemsize == torch.empty((), dtype=t).element_size()
    assert d.is_floating_point == t.is_floating_point
    assert d.torch is t and torch_dtype(d) is t and torch_dtype(t) is t


@pytest.mark.parametrize("d", ALL, ids=str)
def test_a_dtype_equals_torchs_both_ways(d):
    t = getattr(torch, d.name)
    assert d == t and t == d and not (d != t) and not (t != d)
    others = [getattr(torch, o.name) for o in ALL if o is not d]
    assert all(d != o and o != d and not (d == o) for o in others)
    assert t in [d] and d in [t]


@pytest.mark.parametrize("d", ALL, ids=str)
def test_a_dtype_round_trips(d):
    t = getattr(torch, d.name)
    assert as_dtype(t) is d and as_dtype(d) is d and DType.named(d.name) is d
    assert pickle.loads(pickle.dumps(d)) is d
    assert copy.copy(d) is d and copy.deepcopy({"x": d})["x"] is d
    assert DTYPES[d.code] is d and DTYPE_CODES[d] == d.code


def test_the_header_table_is_the_safetensors_codes():
    assert list(DTYPES) == ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"]
    assert (dtypes.float32, dtypes.bfloat16, dtypes.bool_) == (DTYPES["F32"], DTYPES["BF16"], DTYPES["BOOL"])


def test_tables_keyed_by_dtype_also_answer_for_torchs():
    assert DTYPE_CODES[torch.bfloat16] == "BF16" and torch.float16 in DTYPE_CODES
    assert DTYPE_CODES.get(torch.complex64, "none") == "none" and torch.complex64 not in DTYPE_CODES
    assert DTYPE_NAMES[torch.float32] == "float32" and torch.int8 not in DTYPE_NAMES
    assert dtype_name(torch.bfloat16) == dtype_name(dtypes.bfloat16) == "bfloat16"
    assert dtype_name(dtypes.int8) == dtype_name(torch.int8) == "torch.int8"


def test_a_dtype_the_table_lacks_is_taken_from_torch():
    d = as_dtype(torch.complex64)
    assert type(d) is DType and d == torch.complex64 and d.torch is torch.complex64
    assert (str(d), d.itemsize, d.is_floating_point, d.code) == ("torch.complex64", 8, False, None)
    assert as_dtype(torch.complex64) is d
    with pytest.raises(TypeError):
        as_dtype("float32")


def test_values_given_torch_dtypes_hold_dtypes():
    """Tests (and pickles' tensors) build specs and payloads with torch's dtypes: they hold the DType, so that a dict
    or a node key holding one is equal, and hashes alike, to one built from a header."""
    infos = [TensorInfo("w", None, torch.float16, (2,)), TensorInfo("w", None, dtypes.float16, (2,))]
    specs = [TensorSpec((2,), torch.float16), TensorSpec((2,), dtypes.float16)]
    loads = [Load(None, "w", (2,), torch.float16), Load(None, "w", (2,), dtypes.float16)]
    saves = [Save(None, "w", (2,), torch.float16), Save(None, "w", (2,), dtypes.float16)]
    for a, b in (infos, specs, loads, saves):
        assert a.dtype is b.dtype is dtypes.float16 and a == b and hash(a) == hash(b)
    assert loads[0].nbytes == infos[0].nbytes == 4
    assert loads[0].key() == loads[1].key() and repr(loads[0].key()) == repr(loads[1].key())
