"""The plan's peak-memory estimate follows how the runtime holds tensors (compiler/plan.py)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from mgc.api import compile_recipe
from mgc.compiler.ir import Apply, Load
from mgc.compiler.plan import _transient
from mgc.runtime.execute import execute
from mgc.stdlib import OPERATORS
from mgc.stdlib.slices import GRAM_BUFFER, SLICE

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"
HEAD = "\n".join(f'{m} = model("{MODELS / m}")' for m in ("base", "code", "math", "prose")) + "\n"


def plan_for(expr: str, dtype: str = "bf16", out: str = "/tmp/mgc-never-written"):
    return compile_recipe("r.merge", text=HEAD + f'm = {expr}\nsave m to "{out}" {{ dtype = {dtype} }}\n')


def largest_load(plan) -> int:
    return max(math.prod(plan.graph.payload(n).shape) for n in plan.graph.of_kind(Load))


@pytest.mark.parametrize("expr", ["linear(code, math)", "karcher(code, math, prose)", "slerp(code, math, t = 0.3)",
                                  "ties(code, math, base = base, density = 0.5)"])
def test_a_result_written_in_the_saved_dtype_counts_at_that_size(expr):
    # the operators write bf16 directly: the float32 save holds 2 more bytes per entry at the peak
    narrow, wide = plan_for(expr, "bf16"), plan_for(expr, "float32")
    assert wide.peak_memory() - narrow.peak_memory() == 2 * largest_load(narrow)


def test_transient_memory_per_kind_of_operator():
    shape, numel = (4096, 1024), 4096 * 1024
    s = 4 * min(numel, SLICE)

    def apply(op, k_models, **kw):
        return Apply(op, OPERATORS[op].params(**kw), False, "t", shape)

    # stored-dtype operators: slices and gram()'s buffer, whatever the tensor's size
    assert _transient(apply("karcher", 3), OPERATORS["karcher"], 3) == 6 * s + min(GRAM_BUFFER, 8 * numel * 3)
    assert _transient(apply("linear", 3), OPERATORS["linear"], 3) == 6 * s + min(GRAM_BUFFER, 8 * numel * 3)
    # ties also holds the magnitude cut's slices: two float32, the bits as int32 and int64, and 2¹⁶ counts
    ties = Apply("ties", OPERATORS["ties"].params(), True, "t", shape)
    assert _transient(ties, OPERATORS["ties"], 4) == 7 * s + GRAM_BUFFER + 5 * s + (1 << 20)
    # karcher with Fisher models iterates on dense float64 copies
    fisher = Apply("karcher", OPERATORS["karcher"].params(), False, "t", shape, aux=(("fisher", 2),))
    assert _transient(fisher, OPERATORS["karcher"], 4) == 2 * 8 * numel * 4 + 4 * numel
    # an elementwise operator runs slice by slice; a whole-tensor one copies every input to float32
    ta = Apply("task_arithmetic", OPERATORS["task_arithmetic"].params(), True, "t", shape)
    assert _transient(ta, OPERATORS["task_arithmetic"], 3) == 5 * s
    stock = Apply("model_stock", OPERATORS["model_stock"].params(), True, "t", shape)
    assert _transient(stock, OPERATORS["model_stock"], 3) == 2 * 4 * numel * 3


def test_a_cap_at_the_estimate_runs_for_each_kind_of_operator(tmp_path):
    for k, expr in enumerate(["karcher(code, math, prose)", "ties(code, math, base = base, density = 0.5)",
                              "model_stock(code, math, base = base)"]):
        plan = plan_for(expr, out=str(tmp_path / f"o{k}"))
        execute(plan, device="cpu", progress=False, max_memory=plan.peak_memory())
        assert (tmp_path / f"o{k}" / "model.safetensors").is_file()
