"""moe()'s `gate = ...`: hidden(prompts = ...), cheap_embed(prompts = ...), random(seed = 0) or
uniform_random(seed = 0), checked into a GateSpec. These calls are read by moe() from its syntax tree: they are
not values, and anywhere else they are an error (interpreter.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from mgc.core.documents import decode_text
from mgc.core.errors import CheckpointError, MgcError, RecipeTypeError, Span, did_you_mean
from mgc.grammar import ast

from . import fisher_cache, gate_cache
from .call_args import named_options
from .gate_cache import MODES, PROMPT_MODES, GateSpec
from .inputs import resolve_path
from .values import CheckpointModel, ListV, ModelValue, Num, Str, Value, kind_of

if TYPE_CHECKING:
    from .interpreter import Checker

GATE_USAGE = ('gate = hidden(prompts = [["..."], ["..."]]), cheap_embed(prompts = [...]), random(seed = 0) '
              'or uniform_random(seed = 0)')


def outside_moe(e: ast.Call) -> MgcError:
    """The error for hidden(...) and the other gate modes called anywhere but as moe()'s gate."""
    return RecipeTypeError(f"{e.func}() is only valid as moe()'s gate", e.func_span,
                           f'write moe(base, experts = [...], gate = {e.func}(...))')


def check_gate(checker: Checker, node: ast.Expr, env, stack, base: ModelValue, experts: int, shared: bool,
               hidden: int) -> GateSpec:
    if not isinstance(node, ast.Call) or node.func not in MODES:
        raise RecipeTypeError("moe()'s gate must be one of its gate modes", node.span,
                              (did_you_mean(node.func, MODES) if isinstance(node, ast.Call) else None) or f"write {GATE_USAGE}")
    allowed = ("prompts", "negative_prompts", "shared_prompts") if node.func in PROMPT_MODES else ("seed",)
    if node.args:
        raise RecipeTypeError(f"{node.func}() takes only named parameters", node.args[0].span,
                              f"parameters: {', '.join(allowed)}")
    opts = named_options(node.func, node, allowed)
    prompts: tuple = ()
    negative: tuple = ()
    files: list = []
    seed = 0
    if node.func in PROMPT_MODES:
        prompts = _all_prompts(checker, node, opts, env, stack, experts, shared, files)
        if "negative_prompts" in opts:
            value = _per_expert(checker, opts["negative_prompts"], env, stack, experts)
            negative = tuple(_prompts_of(checker, item, files, empty=True) for item in value.items)
        _require_runnable_base(base, node)
    elif "seed" in opts:
        v = checker.eval(opts["seed"].value, env, stack)
        if not isinstance(v, Num) or not float(v.value).is_integer() or v.value < 0:
            raise RecipeTypeError(f"{node.func}()'s seed must be a whole number ≥ 0, not "
                                  f"{v.value if isinstance(v, Num) else kind_of(v)}", opts["seed"].value.span)
        seed = int(v.value)
    spec = GateSpec(node.func, prompts, seed, base if node.func in PROMPT_MODES else None, base.num_layers, hidden,
                    experts, shared, node.span, tuple(files), negative)
    try:
        spec.key = gate_cache.gate_key(spec)
    except OSError as err:
        raise CheckpointError(f"cannot read the base checkpoint: {err.strerror or err}", node.span) from None
    spec.cache_path = gate_cache.cache_path(spec.key)
    if (node.func in PROMPT_MODES and not gate_cache.is_cached(spec.cache_path)
            and not fisher_cache.transformers_available()):
        raise MgcError(f"{node.func}() needs the transformers package to compute gates that are not cached yet",
                       node.func_span, "pip install 'mgc[eval]' (or pip install transformers)")
    return checker.gates.setdefault(spec.cache_path, spec)


def _all_prompts(checker, node: ast.Call, opts, env, stack, experts: int, shared: bool, files: list) -> tuple:
    if "prompts" not in opts:
        raise RecipeTypeError(f"{node.func}() needs `prompts`: one list of prompts (or a prompt file) per expert",
                              node.span, f'write {node.func}(prompts = [["..."], ["..."]])')
    value = _per_expert(checker, opts["prompts"], env, stack, experts)
    found = [_prompts_of(checker, item, files) for item in value.items]
    if experts > 1 and len(set(found)) == 1:
        raise RecipeTypeError("every expert has the same prompts: the routers could not tell the experts apart",
                              value.span, "give each expert prompts like the inputs it should receive")
    if "shared_prompts" in opts:
        if not shared:
            raise RecipeTypeError("shared_prompts is for a shared expert, and this moe() has none",
                                  opts["shared_prompts"].span)
        found.append(_prompts_of(checker, checker.eval(opts["shared_prompts"].value, env, stack), files))
    elif shared:
        raise RecipeTypeError(f"{node.func}() needs `shared_prompts` for the shared expert's gate", node.span,
                              "give the prompts (or a prompt file) the shared expert should weigh most")
    return tuple(found)


def _per_expert(checker, kwarg: ast.Kwarg, env, stack, experts: int) -> ListV:
    value = checker.eval(kwarg.value, env, stack)
    if not isinstance(value, ListV):
        raise RecipeTypeError(f"{kwarg.name} must be a list with one entry per expert, not {kind_of(value)}", value.span)
    if len(value.items) != experts:
        raise RecipeTypeError(
            f"{kwarg.name} has {len(value.items)} entr{'y' if len(value.items) == 1 else 'ies'} but moe() has "
            f"{experts} experts", value.span,
            "give one list of prompts, or one prompt file, per expert, in the order of `experts`",
        )
    return value


def _prompts_of(checker, item: Value, files: list, empty: bool = False) -> tuple[str, ...]:
    if isinstance(item, Str):
        return _prompt_file(item.value, checker.base_dir, item.span, files)
    if not isinstance(item, ListV) or not all(isinstance(p, Str) for p in item.items):
        raise RecipeTypeError(f"an expert's prompts are a list of strings or a prompt file's path, not {kind_of(item)}",
                              item.span)
    if not item.items and not empty:
        raise RecipeTypeError("this expert's list of prompts is empty", item.span, "give at least one prompt")
    return tuple(p.value for p in item.items)


def _prompt_file(text: str, base_dir, span: Span, files: list) -> tuple[str, ...]:
    """A prompt file: one prompt per line that is not blank."""
    path, (is_file, exists) = resolve_path(
        text, base_dir, "a prompt file", CheckpointError, span, lambda p: (p.is_file(), p.exists())
    )
    if not is_file:
        raise CheckpointError(
            f"no prompt file at '{text}'" if not exists else f"prompts '{text}' is not a file", span,
            f"a string in prompts is the path of a text file, one prompt per line, relative to the recipe's folder; "
            f'to give the prompt itself, write a list: ["{text}"]',
        )
    try:
        lines = decode_text(path.read_bytes()).splitlines()
    except OSError as err:
        raise CheckpointError(f"cannot read prompt file '{text}': {err.strerror or err}", span) from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"prompt file '{text}' is not UTF-8 text (byte {err.start})", span) from None
    prompts = tuple(line for line in lines if line.strip())
    if not prompts:
        raise CheckpointError(f"prompt file '{text}' holds no prompt", span, "write one prompt per line")
    files.append(path)
    return prompts


def _require_runnable_base(base: ModelValue, node: ast.Call) -> None:
    """hidden() and cheap_embed() tokenize the prompts and run (or read) the base checkpoint."""
    if not isinstance(base, CheckpointModel):
        raise RecipeTypeError(
            f"{node.func}() gates need the base to be a checkpoint, not a merged or derived model", node.span,
            'pass a model("...") value as moe()\'s base, save the merge first and load it with model(...), '
            "or use gate = random(seed = 0)",
        )
    from mgc.core.hub_checkpoint import RemoteCheckpoint

    ckpt = base.checkpoint
    if isinstance(ckpt, RemoteCheckpoint):
        raise CheckpointError(
            f"{node.func}() gates need a local base checkpoint, and {ckpt.label} is on the hub", node.span,
            f"download it (hf download {ckpt.revision.repo_id} --revision {ckpt.revision.sha} --local-dir DIR) "
            'and write model("DIR")',
        )
    if not ckpt.tokenizer_files():
        raise CheckpointError(f"{ckpt.path}: no tokenizer files, which {node.func}() needs to tokenize the prompts",
                              node.span)
