"""A `save` statement checked into a SaveSpec: its folder, its options (dtype, shard size, tokenizer), the
dtype written when none is given, and the config.json it will write."""
from __future__ import annotations

import re
from decimal import Decimal
from typing import TYPE_CHECKING, Optional

from mgc.core.dtypes import DType, bfloat16, dtype_name, float16, float32, float64
from mgc.core.paths import relative_to_cwd
from mgc.core.errors import CheckpointError, MgcWarning, OutputError, RecipeNameError, RecipeTypeError, did_you_mean
from mgc.grammar import ast

from .extract_lora import AdapterValue, refuse_model_options
from .inputs import resolve_path
from .layers import layer_map
from .program import SaveSpec
from .values import ModelValue, Num, Str
from .vocab import output_vocabulary

if TYPE_CHECKING:
    from .interpreter import Checker

SAVE_DTYPES = {
    "bf16": bfloat16, "bfloat16": bfloat16, "fp16": float16, "f16": float16,
    "float16": float16, "fp32": float32, "f32": float32, "float32": float32,
}
SAVE_OPTIONS = ("dtype", "shard", "tokenizer", "tokens", "pad_to_multiple_of", "chat_template")
DEFAULT_SHARD = 5 * 10**9
MAX_SIZE = 2**63 - 1
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)


def check_save(checker: Checker, stmt: ast.Save, earlier: list[SaveSpec]) -> SaveSpec:
    value = checker.eval(stmt.value, {}, ())
    model = value if isinstance(value, AdapterValue) else checker.require_model(value, stmt.value, "what `save` writes")
    path, _ = resolve_path(stmt.path, checker.base_dir, "an output folder", OutputError, stmt.path_span)
    for other in earlier:
        if other.path == path:
            raise RecipeNameError(f"two saves write to '{stmt.path}'", stmt.path_span, f"the first is at {other.span}")
    opts = {}
    for o in stmt.options:
        if o.name not in SAVE_OPTIONS:
            raise RecipeNameError(
                f"save has no option '{o.name}'", o.span, did_you_mean(o.name, SAVE_OPTIONS) or f"options: {', '.join(SAVE_OPTIONS)}"
            )
        if o.name in opts:
            raise RecipeNameError(f"option '{o.name}' given twice", o.span)
        opts[o.name] = o
    dtype = _save_dtype(opts.get("dtype"))
    if isinstance(model, AdapterValue):
        refuse_model_options(opts)
        dtype = dtype or _common_dtype(checker, model, stmt)
        return SaveSpec(model, path, dtype, DEFAULT_SHARD, None, stmt.span, adapter=model.layout)
    shard = _save_shard(checker, opts.get("shard"))
    config = model.config()
    # the tokenizer, tokens, pad_to_multiple_of and chat_template options; a tied or untied head (compiler/vocab.py)
    vocab = output_vocabulary(checker, stmt, model, opts, config)
    if dtype is None:
        dtype = _common_dtype(checker, model, stmt)
    try:
        layer_map(config, model.tensors, f"the output '{stmt.path}'")
    except CheckpointError as err:  # a config that does not describe the tensors written is never saved
        raise RecipeTypeError(err.message, stmt.span, err.hint) from None
    return SaveSpec(model, path, dtype, shard, vocab.tokenizer, stmt.span, config, vocab)


def _common_dtype(checker: Checker, model: ModelValue, stmt: ast.Save) -> DType:
    """Without `dtype`, every floating tensor is saved in the dtype the input checkpoints share; where
    they disagree, in the widest of theirs (float16 with bfloat16 gives float32), with a warning."""
    by_dtype: dict[DType, list[str]] = {}
    for leaf in dict.fromkeys(model.leaves()):
        for dtype in dict.fromkeys(s.dtype for s in leaf.tensors.values() if s.dtype.is_floating_point):
            by_dtype.setdefault(dtype, []).append(relative_to_cwd(leaf.checkpoint.path))
    dtype = widest_dtype(by_dtype)
    if len(by_dtype) > 1:
        shown = "; ".join(f"{dtype_name(d)}: {', '.join(names)}" for d, names in by_dtype.items())
        checker.warnings.append(MgcWarning(
            f"the inputs of this save are stored in different dtypes ({shown}); writing "
            f"{dtype_name(dtype)}, which holds them all", stmt.span,
            "set the save's dtype to choose, e.g. { dtype = bf16 }",
        ))
    return dtype


def _save_dtype(option: Optional[ast.Option]) -> Optional[DType]:
    if option is None:
        return None
    v = option.value
    name = v.id if isinstance(v, ast.Name) else v.value if isinstance(v, ast.String) else None
    if name not in SAVE_DTYPES:
        raise RecipeTypeError(
            f"unknown dtype {name!r}" if name is not None else "dtype must be a name such as bf16", v.span,
            did_you_mean(str(name), SAVE_DTYPES) or "dtype is one of bf16, fp16, fp32",
        )
    return SAVE_DTYPES[name]


def _save_shard(checker: Checker, option: Optional[ast.Option]) -> int:
    if option is None:
        return DEFAULT_SHARD
    v = checker.eval(option.value, {}, ())
    if isinstance(v, Num) and 1 <= v.value <= MAX_SIZE:  # false for inf and NaN too
        return int(v.value)
    if isinstance(v, Str):
        size = parse_size(v.value)
        if size:
            return size
    raise RecipeTypeError(
        "shard must be a size such as \"2GB\", \"500MB\" or a byte count", option.value.span,
        "units are B, KB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of 1024); sizes run from 1 "
        "byte to 2**63 - 1 bytes" if isinstance(v, (Num, Str)) else None,
    )


def widest_dtype(dtypes) -> DType:
    """The narrowest floating dtype that holds every value of each of `dtypes` (float32 when there are none)."""
    dtypes = set(dtypes)
    if not dtypes:
        return float32
    if len(dtypes) == 1:
        return dtypes.pop()
    if float64 in dtypes:
        return float64
    return float32


def parse_size(text: str) -> Optional[int]:
    """Bytes in "2GB", "512MiB", "1000"; None unless it is a size from 1 byte to MAX_SIZE."""
    m = _SIZE.match(text)
    if not m:
        return None
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[:1] if unit[:1] in "KMGT" else ""]
    # Decimal: exact, and no float overflow or int digit limit for thousands of digits
    size = Decimal(m.group(1)) * base**power
    return int(size) if 1 <= size <= MAX_SIZE else None
