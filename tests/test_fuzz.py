"""A recipe fuzzer: whatever the bytes of a recipe, `mgc check` and `mgc plan` end in an MgcError or succeed,
never in another exception (a traceback), and the command line exits 0 or 1, never 70 (internal error).

Recipes come from a seeded generator of two kinds: grammar-aware ones (statements over the example
checkpoints with real operators and random parameters of every shape) and mutations of valid recipes
(tokens deleted, duplicated, swapped or replaced; raw bytes, NUL and non-UTF-8 inserted; deep nesting;
huge numbers). A small fixed sample runs by default; `python -m pytest -m slow tests/test_fuzz.py` runs
100,000 (MGC_FUZZ_N and MGC_FUZZ_SEED override the count and the seed).
"""
from __future__ import annotations

import gc
import os
import random
import re
import time
import traceback
from pathlib import Path

import pytest
from click.testing import CliRunner

from mgc.api import compile_recipe
from mgc.cli import main
from mgc.core.errors import MgcError, MgcErrors
from mgc.stdlib import OPERATORS

from conftest import EXAMPLES

MODEL_NAMES = ("base", "code", "math", "prose")
TENSOR_WORDS = (
    "self_attn", "mlp", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
    "lm_head", "norm", "input_layernorm", "weight", "model", "layers", "nonexistent", "x",
)
TENSOR_STRINGS = (
    "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "*.mlp.*", "model.layers.3.*", "*",
    "model.layers.[0-3].*", "?", "[", "]", "[!a]", "*self_attn*", "", " ", "model.layers.99.mlp.down_proj.weight",
    "\\x00", "\\n", "\\u00e9", "\\N{GREEK SMALL LETTER ALPHA}", "é", "💥", "a" * 300,
)
ODD_BOUNDS = (
    "", "0", "1", "2", "4", "7", "8", "9", "-1", "-2", "-8", "-9", "+3", "100", "-100", "9223372036854775807",
    "-9223372036854775808", "9223372036854775808", "99999999999999999999999", "0" * 30 + "1",
)
HUGE_NUMBERS = (
    "9223372036854775807", "9223372036854775808", "-9223372036854775808", "-9223372036854775809",
    "18446744073709551616", "1" + "0" * 30, "9" * 400, "9" * 4301, "1e308", "1e309", "-1e309", "1e-400", "2e308",
    "1.7976931348623157e308", "1" + "0" * 400 + ".0", "0." + "0" * 400 + "1", "4" * 19, "0" * 5000 + "1",
)
ODD_NUMBERS = ("1.", ".5", "+3", "-0", "007", "-.25", "1E3", "0e0", "-0.0", "1e-5", "1e-8", "3.0", "2", "0", "1")
DTYPES = ("bf16", "fp16", "fp32", "bfloat16", "float32", '"bf16"', '"fp32"', "float64", "int8", "3", "true", "[bf16]", '"x"')
SHARDS = (
    '"2GB"', '"300KB"', '"1 MiB"', '"0.5KB"', '"1.5GiB"', '"5gb"', '"0"', '"-1GB"', '"GB"', '"1e9"', '"1TB"', '"8 EiB"',
    '"' + "9" * 400 + 'GB"', '"' + "9" * 20 + 'TB"', '"9223372036854775807"', '"9223372036854775808"',
    '"1.' + "0" * 5000 + 'KB"', "1000", "1", "0", "-1", "0.5", "1e309", "1e300", "9223372036854775807", "true",
    "[1, 2]", "{_: 1}", "base", '""', '"  3 kb  "', '"\\u0663GB"',
)
MODEL_PATHS = (
    "examples/models/base", "examples/models/code", "examples/models/math", "examples/models/prose",
    "examples/models/bse", "exampels/models/base", "examples/models", "examples", "examples/data/code.txt",
    "./examples/models/base", "examples/models/base/", "examples//models//base", "examples/models/../models/base",
    "models/base", "org/name", "meta-llama/Llama-3-8B", "hf://org/name", "hf://org/name@main", "hf://foo", "hf://",
    "./org/name", "../nope", "/nonexistent/x", "~", "~/nonexistent-mgc-fuzz", "", ".", "..", "/", "a" * 300,
    "a" * 5000, "x/" * 3000, "\\x00", "examples/models/base\\x00", "examples/models/base/config.json",
)
RAW_BYTES = (
    b"\x00", b"\xff", b"\xfe", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\r", b"\r\n", b"\t", b"\x0b",
    b"\x0c", b"\x1b", b"\x7f", b"\x80", b"\\", b'"', b"{", b"}", b"(", b")", b"[", b"]", b":", b",", b"=", b".",
    b"#", b"\n", "é".encode(), "\u2028".encode(), "💥".encode(), "\ufeff".encode(), b"'", b"*", b"+", b"-", b"@",
)
POOL_TOKENS = (
    "def", "save", "to", "with", "model", "ramp", "stack", "fisher", "layers", "base", "code", "_", "true", "false",
    "(", ")", "[", "]", "{", "}", ",", ":", "=", ".", '"out/x"', '""', "0", "1", "-1", "0.5", "linear", "slerp",
    "ties", "karcher", "t", "weights", "base = base", "layers[0:2]", ".layers[0:4]", "with {_: base}",
) + HUGE_NUMBERS + ODD_NUMBERS
TOKEN = re.compile(
    rb'"(?:[^"\\\n]|\\.)*"|#[^\n]*|[A-Za-z_][A-Za-z0-9_]*|[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|\s+|.',
    re.S,
)
SEED_RECIPES = sorted(EXAMPLES.glob("*.merge")) + sorted((EXAMPLES / "methods").glob("*.merge"))


class RecipeGen:
    """One random recipe: grammar-aware statements, possibly mutated afterwards."""

    def __init__(self, rng: random.Random):
        self.r = rng
        # how often a choice goes wrong on purpose: many recipes are clean, so that checking, lowering,
        # planning and running are reached, not only the first error
        self.chaos = rng.choice((0.0, 0.0, 0.0, 0.01, 0.03, 0.1, 0.3))
        self.models: list[str] = []  # names bound to models
        self.plain: list[str] = []  # names bound to plain values
        self.defs: dict[str, int] = {}  # name -> number of parameters
        self.saves = 0

    def odd(self, scale: float = 1.0) -> bool:
        return self.r.random() < self.chaos * scale

    # --- values ------------------------------------------------------------------------------

    def number(self, kind: str = "float", domains: bool = True) -> str:
        r = self.r
        if domains and r.random() < 0.04:  # a free parameter, of any shape (compiler/search_space.py)
            return self.domain(kind)
        if self.odd(0.5):
            return r.choice(HUGE_NUMBERS)
        if self.odd():
            return r.choice(ODD_NUMBERS)
        if kind == "int":
            return str(r.choice((0, 1, 2, 3, 10, 42, -1, 2**31, 2**62)))
        if kind == "unit":
            return f"{r.random():.3f}"
        return r.choice((f"{r.uniform(-2, 2):.4g}", f"{r.random():.3f}", str(r.randint(-3, 5)), f"{r.uniform(0, 1e-3):.2e}"))

    def domain(self, kind: str) -> str:
        r = self.r
        if r.random() < 0.3:
            return "search([" + ", ".join(self.number(kind, False) for _ in range(r.choice((0, 1, 2, 3)))) + "])"
        extra = r.choice(("", "", ", log = true", ", default = 0.5", ", name = \"t\"", ", log = 1", ", step = 2"))
        return f"search({self.number(kind, False)}, {self.number(kind, False)}{extra})"

    def gradient(self, kind: str) -> str:
        if self.r.random() < 0.2:
            return f"ramp({self.number(kind)}, {self.number(kind)})"
        n = self.r.choice((0, 1, 2, 2, 3, 5, 9)) if self.odd() else self.r.choice((1, 2, 2, 3, 5))
        return "[" + ", ".join(self.number(kind) for _ in range(n)) + "]"

    def string(self) -> str:
        if self.odd():
            return '"' + self.r.choice(TENSOR_STRINGS) + '"'
        return '"' + self.r.choice(TENSOR_STRINGS[:8]) + '"'

    def bounds(self) -> str:
        r = self.r
        if self.odd():
            return f"{r.choice(ODD_BOUNDS)}:{r.choice(ODD_BOUNDS)}"
        a = r.randint(-8, 7)
        b = r.choice(("", str(r.randint(a + 1 if a >= 0 else a + 9, 8)))) if a < 7 else ""
        return f"{a if a >= 0 or r.random() < 0.3 else ''}:{b}"

    def key(self) -> str:
        r = self.r
        x = r.random()
        if x < 0.2:
            return "_"
        if x < 0.45:
            return r.choice(TENSOR_WORDS if self.odd() else TENSOR_WORDS[:15])
        if x < 0.7:
            return self.string()
        if not self.odd(0.3):
            return f"layers[{self.bounds()}]"
        return r.choice(("mlp[0:2]", "layers[0]", "layers", "1", "layers[:]"))

    def table(self, depth: int, value) -> str:
        n = self.r.choice((0, 1, 1, 2, 3, 4)) if self.odd() else self.r.choice((1, 2, 3))
        entries = [f"{self.key()}: {value(depth + 1)}" for _ in range(n)]
        if not self.odd():
            entries.append(f"_: {value(depth + 1)}")
        return "{" + ", ".join(entries) + ("," if entries and self.r.random() < 0.1 else "") + "}"

    def param(self, kind: str, depth: int = 0) -> str:
        r = self.r
        x = r.random()
        if depth > 2 or x < 0.4:
            if kind == "bool":
                return r.choice(("true", "false", "1", "0", '"true"')) if self.odd() else r.choice(("true", "false"))
            return self.number(kind)
        if x < 0.6 and kind != "bool":
            return self.gradient(kind)
        if x < 0.8:
            return self.table(depth, lambda d: self.param(kind, d))
        if x < 0.85 and self.plain and kind == "unit":
            return r.choice(self.plain)
        if not self.odd(3):
            return self.number(kind)
        if x < 0.9:
            return self.string()
        if x < 0.95:
            return "[" + ", ".join(self.param(kind, depth + 1) for _ in range(r.randint(0, 3))) + "]"
        return self.model(depth + 1)  # a model where a parameter goes

    def per_model(self, kind: str, n: int, depth: int) -> str:
        r = self.r
        if r.random() < 0.4:
            return self.param(kind, depth)
        count = max(0, n + r.choice((-1, 1, 2))) if self.odd() else n
        return "[" + ", ".join(self.param(kind, depth + 1) for _ in range(count)) + "]"

    # --- models ------------------------------------------------------------------------------

    def model_path(self) -> str:
        r = self.r
        if not self.odd():
            name = r.choice(MODEL_NAMES)
            return f"examples/models/{name}" if r.random() < 0.8 else f"{EXAMPLES / 'models' / name}"
        return r.choice(MODEL_PATHS)

    def model(self, depth: int = 0) -> str:
        r = self.r
        x = r.random()
        if depth >= 3 or x < 0.35:
            if self.models and r.random() < 0.85:
                return r.choice(self.models)
            return f'model("{self.model_path()}")'
        if x < 0.7:
            return self.call(depth)
        if x < 0.78:
            entries = ", ".join(f"{self.key()}: {self.model(depth + 1)}" for _ in range(r.choice((0, 1, 1, 2))))
            return f"{self.model(depth + 1)} with {{{entries}}}"
        if x < 0.85:
            parts = []
            for _ in range(r.choice((0, 1, 2, 2, 3)) if self.odd() else r.choice((1, 2, 2, 3))):
                m = self.model(depth + 1)
                parts.append(m if r.random() < 0.2 else f"{m}.layers[{self.bounds()}]")
            return f"stack({', '.join(parts)})"
        if x < 0.9 and self.defs:
            name = r.choice(list(self.defs))
            n = self.defs[name] + (r.choice((-1, 1)) if self.odd() else 0)
            return f"{name}({', '.join(self.model(depth + 1) for _ in range(max(n, 0)))})"
        if x < 0.93:
            return f"({self.model(depth + 1)})"
        if x < 0.96 or not self.odd(3):
            return self.fisher(depth) if x < 0.96 else self.call(depth)
        return r.choice((self.number(), self.string(), "[]", "true", "ramp(0, 1)", "model", "nothing", "linear"))

    def fisher(self, depth: int) -> str:
        r = self.r
        checkpoints = [m for m in self.models if m in MODEL_NAMES] or ['model("examples/models/code")']
        args = [self.model(depth + 1) if self.odd() else r.choice(checkpoints)]
        if not self.odd():
            data = r.choice(("examples/data/code.txt", "examples/data/math.txt"))
            args.append(f'data = "{data if not self.odd() else r.choice(("nope.txt", "examples", ""))}"')
        if r.random() < 0.5:
            args.append(f"samples = {r.randint(1, 64) if not self.odd() else self.number('int')}")
        if r.random() < 0.3:
            args.append(f"max_length = {r.randint(2, 512) if not self.odd() else self.number('int')}")
        if self.odd(0.2):
            args.append("bogus = 1")
        return f"fisher({', '.join(args)})"

    def call(self, depth: int) -> str:
        r = self.r
        op = r.choice(list(OPERATORS.values()))
        hi = op.max_models if op.max_models is not None else op.min_models + 2
        n = r.randint(op.min_models, hi)
        if self.odd(0.5):
            n = max(0, n + r.choice((-1, 1)))
        args = [self.model(depth + 1) for _ in range(n)]
        if op.base == "required" and not self.odd(0.3) or op.base == "optional" and r.random() < 0.4:
            args.append(f"base = {self.model(depth + 1)}")
        elif op.base == "none" and self.odd(0.1):
            args.append(f"base = {self.model(depth + 1)}")
        for name in op.model_params:
            if name in op.required_model_params and not self.odd(0.3) or r.random() < 0.2:
                count = n if not self.odd(0.3) else n + 1
                args.append(f"{name} = [{', '.join(self.fisher(depth + 1) for _ in range(count))}]")
        for field, info in op.params.model_fields.items():
            if r.random() < 0.5 and not (info.is_required() and not self.odd(0.3)):
                continue
            text = str(info.annotation)
            kind = "bool" if "bool" in text else "int" if "int" in text else "unit" if "le=1.0" in text else "float"
            value = self.per_model(kind, n, depth + 1) if field in op.per_model else self.param(kind, depth + 1)
            args.append(f"{info.alias or field} = {value}")
        if self.odd(0.2):
            args.append(f"{r.choice(('weigths', 'tt', 'lambda_', 'seed', 'base', 'fisher'))} = {self.param('float', depth + 1)}")
        if self.odd(0.1) and args:
            args.append(r.choice(args))  # a duplicate, or a positional after a keyword
        if self.odd(0.1):
            r.shuffle(args)
        name = op.name if not self.odd(0.1) else r.choice(("lineer", "model", "ramp", "stack", "fisher", "save"))
        return f"{name}({', '.join(args)})"

    # --- statements --------------------------------------------------------------------------

    def deep(self) -> str:
        """One statement nested or chained around the parser's and checker's depth limits."""
        r = self.r
        k = r.choice((10, 40, 63, 64, 65, 66, 100, 200, 300, 1000, 5000))
        m = self.models[0] if self.models else 'model("examples/models/base")'
        kind = r.choice(("call", "list", "table", "with", "paren", "stack", "slice", "def", "flat", "withflat", "deflist"))
        if kind == "call":
            return f"deep = {'linear(' * k}{m}{')' * k}"
        if kind == "list":
            return f"deep = linear({m}, weights = {'[' * k}1{']' * k})"
        if kind == "table":
            return f"deep = linear({m}, weights = {'{_: ' * k}1{'}' * k})"
        if kind == "with":
            return f"deep = {m}{' with {mlp: ' + m + '}' * k}"
        if kind == "paren":
            return f"deep = {'(' * k}{m}{')' * k}"
        if kind == "stack":
            return f"deep = {'stack(' * k}{m}{')' * k}"
        if kind == "slice":
            return f"deep = {'stack(' * k}{m}{'.layers[0:8])' * k}"
        k = min(k, 700)
        if kind == "def":
            lines = ["def g0(x) = linear(x)"] + [f"def g{i}(x) = g{i - 1}(linear(x))" for i in range(1, k)]
            return "\n".join(lines) + f"\ndeep = g{k - 1}({m})"
        if kind == "deflist":
            lines = ["def h0(x) = linear(x, weights = [1])"] + [
                f"def h{i}(x) = linear(h{i - 1}(x), weights = {{_: [{i}]}})" for i in range(1, k)
            ]
            return "\n".join(lines) + f"\ndeep = h{k - 1}({m})"
        if kind == "flat":
            return "\n".join([f"f0 = {m}"] + [f"f{i} = linear(f{i - 1})" for i in range(1, k)]) + f"\ndeep = f{k - 1}"
        return "\n".join([f"w0 = {m}"] + [f"w{i} = w{i - 1} with {{mlp: {m}}}" for i in range(1, k)]) + f"\ndeep = w{k - 1}"

    def save(self) -> str:
        r = self.r
        self.saves += 1
        path = f"out/s{self.saves}" if not self.odd(0.5) else r.choice(
            ("out/s1", "out", "", ".", "out/" + "p" * 300, "out/" + "p/" * 2000, "out/\\x00", "out/\\n", "out/é", "~",
             "../escape", "/dev/null/x")
        )
        opts = []
        for name in ("dtype", "shard", "tokenizer"):
            if r.random() < 0.3:
                clean = not self.odd()
                value = (r.choice(DTYPES[:7] if clean else DTYPES) if name == "dtype"
                         else r.choice(SHARDS[:6] if clean else SHARDS) if name == "shard" else self.model(2))
                opts.append(f"{name} = {value}")
        if self.odd(0.2):
            opts.append(r.choice(("dtpye = bf16", "dtype = bf16", "compress = true")))
        options = f" {{ {', '.join(opts)} }}" if opts or r.random() < 0.1 else ""
        return f'save {self.model(1)} to "{path}"{options}'

    def recipe(self) -> str:
        r = self.r
        lines = []
        for name in r.sample(MODEL_NAMES, r.randint(1, 4)):
            lines.append(f'{name} = model("examples/models/{name}")')
            self.models.append(name)
        for i in range(r.randint(0, 6)):
            x = r.random()
            if x < 0.5:
                name = f"m{i}"
                lines.append(f"{name} = {self.model()}")
                self.models.append(name)
            elif x < 0.65:
                name = f"p{i}"
                lines.append(f"{name} = {self.param('unit')}")
                self.plain.append(name)
            elif x < 0.8:
                name = f"d{i}"
                params = [f"a{j}" for j in range(r.randint(0, 3))]
                saved, self.models = self.models, params + (self.models if r.random() < 0.2 else [])
                body = self.model(1) if params else self.model(3)
                self.models = saved
                lines.append(f"def {name}({', '.join(params)}) = {body}")
                self.defs[name] = len(params)
            elif x < 0.85 and (self.odd(0.3) or r.random() < 0.02):
                lines.append(self.deep())
                self.models.append("deep")
            else:
                lines.append(self.save())
        for _ in range(r.choice((0, 1, 1, 1, 2, 3)) if self.odd() else r.choice((1, 1, 2, 3))):
            lines.append(self.save())
        sep = r.choice(("\n", "\n", "\n", " ", "\n\n", "\r\n", "\n# a comment\n"))
        return sep.join(lines) + ("\n" if r.random() < 0.9 else "")


def mutate(data: bytes, rng: random.Random) -> bytes:
    """1 to 4 random edits of a recipe's bytes."""
    tokens = TOKEN.findall(data) or [b""]
    for _ in range(rng.choice((1, 1, 2, 3, 4))):
        i = rng.randrange(len(tokens))
        x = rng.random()
        if x < 0.15 and len(tokens) > 1:
            del tokens[i]
        elif x < 0.25:
            tokens.insert(i, tokens[i])
        elif x < 0.35:
            j = rng.randrange(len(tokens))
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif x < 0.5:
            tokens.insert(i, rng.choice(POOL_TOKENS).encode())
        elif x < 0.65:
            tokens.insert(i, b"".join(rng.choice(RAW_BYTES) for _ in range(rng.randint(1, 3))))
        elif x < 0.72:
            tokens[i] = bytes([rng.randrange(256)])
        elif x < 0.8:
            k = rng.choice((3, 64, 65, 100, 300, 2000))
            tok = tokens[i]
            tokens[i] = rng.choice((
                b"(" * k + tok + b")" * k, b"linear(" * k + tok + b")" * k, b"[" * k + tok + b"]" * k,
                b"{_: " * k + tok + b"}" * k, tok + b" with {_: base}" * k, b"(" * k, b"[" * k, b"}" * k,
            ))
        elif x < 0.88:
            numbers = [j for j, t in enumerate(tokens) if t[:1].isdigit() or t[:1] in b"+-."]
            tokens[rng.choice(numbers) if numbers else i] = rng.choice(HUGE_NUMBERS).encode()
        elif x < 0.95:
            strings = [j for j, t in enumerate(tokens) if t.startswith(b'"')]
            if strings:
                j = rng.choice(strings)
                body = tokens[j][1:-1]
                k = rng.randint(0, len(body))
                insert = rng.choice((b"\\x00", b"\\", b"\\N{NOPE}", b"\\u12", b"../", b"/", b"*", b"[", b"p" * 300, b"\\n"))
                tokens[j] = b'"' + body[:k] + insert + body[k:] + b'"'
        else:
            cut = rng.randrange(len(tokens) + 1)
            tokens = tokens[:cut] or [b""]
    return b"".join(tokens)


def make_recipe(rng: random.Random) -> bytes:
    x = rng.random()
    if x < 0.45:
        return RecipeGen(rng).recipe().encode()
    if x < 0.85:
        return mutate(RecipeGen(rng).recipe().encode(), rng)
    return mutate(rng.choice(SEED_RECIPES).read_bytes(), rng)


def _located(e: MgcError) -> bool:
    if isinstance(e, MgcErrors):
        return all(_located(x) for x in e.errors)
    return e.span is not None


def _show(data: bytes, limit: int = 3000) -> str:
    text = data.decode("utf-8", errors="backslashreplace")
    return text if len(text) <= limit else text[: limit // 2] + f"\n... ({len(text)} characters) ...\n" + text[-limit // 2:]


class Fuzzer:
    def __init__(self, workdir: Path, fetched: list[str]):
        self.dir = workdir
        self.fetched = fetched  # hub ids asked of (the fixture's fake) mgc.core.hub_checkpoint.open_remote
        self.runner = CliRunner()
        self.failures: list[str] = []
        self.counts = {"ok": 0, "error": 0, "cli": 0, "runs": 0}
        self.unlocated: dict[str, int] = {}

    def fail(self, what: str, index: int, seed: int, data: bytes, detail: str) -> None:
        again = f"make_recipe(random.Random({seed} * 1_000_003 + {index}))"
        self.failures.append(f"--- recipe {index} (seed {seed}; {again}): {what}\n{_show(data)}\n--- {detail}")

    def one(self, index: int, seed: int, cli_every: int, run_rate: float) -> None:
        rng = random.Random(seed * 1_000_003 + index)
        data = make_recipe(rng)
        path = self.dir / f"r{index % 4}.merge"
        path.write_bytes(data)
        plan = None
        fetches = len(self.fetched)
        try:
            plan = compile_recipe(path)
            plan.summary(explain=True)
            self.counts["ok"] += 1
        except MgcError as e:
            self.counts["error"] += 1
            e.render()
            if not _located(e):
                key = re.sub(r"'[^']*'", "'…'", e.message)[:120]
                self.unlocated[key] = self.unlocated.get(key, 0) + 1
        except Exception as e:  # noqa: BLE001 - any other exception is the bug this test looks for
            self.fail(type(e).__name__, index, seed, data, "".join(traceback.format_exception(e))[-3000:])
            return
        if len(self.fetched) > fetches and b"hf://" not in data:
            self.fail("fetched from the hub without hf://", index, seed, data, repr(self.fetched[fetches:]))
        # a merge is run only where every output lies under the fuzzer's folder (and no Fisher is to be computed)
        runnable = plan is not None and not plan.program.fishers and all(
            self.dir in s.path.parents for s in plan.program.saves
        )
        if runnable and rng.random() < run_rate:
            command = ["run", "-q", "--device", "cpu", "--force"]
            if rng.random() < 0.3:
                command += ["--max-memory", rng.choice(SHARDS).strip('"')]
            self.counts["runs"] += 1
            self.cli(command, index, seed, data, path)
        elif cli_every and index % cli_every == 0:
            command = rng.choice((["check"], ["plan"], ["plan", "--explain"], ["graph"], ["run", "--dry-run"]))
            self.cli(command, index, seed, data, path)

    def cli(self, command, index, seed, data, path) -> None:
        self.counts["cli"] += 1
        result = self.runner.invoke(main, command + [str(path)])
        gc.unfreeze()  # `mgc run` freezes the heap: in-process it would pile up over many runs
        ok = (0, 1, 2) if "--max-memory" in command else (0, 1)  # 2: click's usage error for a bad --max-memory
        if result.exit_code not in ok:
            self.fail(f"mgc {' '.join(command)} exited {result.exit_code}", index, seed, data, result.output[-3000:])


@pytest.fixture
def fuzz_dir(tmp_path, monkeypatch):
    """A working folder in tmp_path with `examples` linked in, so relative saves land under tmp_path; no network."""
    (tmp_path / "examples").symlink_to(EXAMPLES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MGC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # `~` in a path names a folder under tmp_path
    fetched: list[str] = []
    from mgc.core import hub_checkpoint
    from mgc.core.errors import CheckpointError

    def open_remote(text, opened):
        fetched.append(text)
        raise CheckpointError(f"no network in the fuzzer ({text})")

    monkeypatch.setattr(hub_checkpoint, "open_remote", open_remote)
    return tmp_path, fetched


def fuzz(workdir_and_fetched, n: int, seed: int, cli_every: int, run_rate: float) -> Fuzzer:
    workdir, fetched = workdir_and_fetched
    before = set(Path(workdir).parent.iterdir())
    f = Fuzzer(workdir, fetched)
    start = time.perf_counter()
    for i in range(n):
        f.one(i, seed, cli_every, run_rate)
    f.seconds = time.perf_counter() - start
    assert set(Path(workdir).parent.iterdir()) == before, "the fuzzer left files beside its folder"
    return f


def _report(f: Fuzzer, n: int) -> str:
    return (f"{n} recipes in {f.seconds:.1f} s: {f.counts['ok']} compiled, {f.counts['error']} MgcError, "
            f"{f.counts['cli']} CLI calls ({f.counts['runs']} runs), {len(f.failures)} failures")


def test_fuzz_sample(fuzz_dir):
    n = int(os.environ.get("MGC_FUZZ_SAMPLE", 2000))
    f = fuzz(fuzz_dir, n, int(os.environ.get("MGC_FUZZ_SEED", 20240601)), 25, 0.05)
    print(_report(f, n))
    assert not f.failures, _report(f, n) + "\n\n" + "\n\n".join(f.failures[:5])
    assert f.counts["ok"] > 0 and f.counts["error"] > 0 and f.counts["runs"] > 0  # every kind of outcome is reached


@pytest.mark.slow
def test_fuzz_large(fuzz_dir):
    n = int(os.environ.get("MGC_FUZZ_N", 100_000))
    f = fuzz(fuzz_dir, n, int(os.environ.get("MGC_FUZZ_SEED", 1)), 100, 0.03)
    print(_report(f, n))
    for message, count in sorted(f.unlocated.items(), key=lambda kv: -kv[1]):
        print(f"  error without a location ({count}x): {message}")
    assert not f.failures, _report(f, n) + "\n\n" + "\n\n".join(f.failures[:20])
