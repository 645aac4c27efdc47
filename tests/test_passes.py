"""The optimization passes, on small hand-built tensor graphs and through recipes."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import networkx as nx
import pytest
import torch

import mgc.stdlib.karcher as karcher
import mgc.stdlib.linear as linear
import mgc.stdlib.passthrough as passthrough
import mgc.stdlib.slerp as slerp
import mgc.stdlib.task_arithmetic as task_arithmetic
from mgc.api import compile_recipe
from mgc.compiler.ir import Apply, Graph, Load, Save
from mgc.compiler.layers import leading_index
from mgc.compiler.passes import (
    PASSES, eliminate_common_subexpressions, eliminate_dead_nodes, fold_trivial_ops, schedule_blocks,
)

A = Path("/ckpt/a")
B = Path("/ckpt/b")
C = Path("/ckpt/c")
OUT = Path("/out/x")
SHAPE = (4, 4)


# ---------------------------------------------------------------- helpers


def load(g: Graph, ckpt: Path, tensor: str = "w", shape=SHAPE) -> int:
    return g.add(Load(ckpt, tensor, shape, torch.bfloat16))


def apply(g: Graph, op: str, params, inputs, tensor: str = "w", shape=SHAPE, has_base: bool = False) -> int:
    return g.add(Apply(op, params, has_base, tensor, shape), inputs)


def save(g: Graph, src: int, tensor: str = "w", out: Path = OUT, shape=SHAPE) -> int:
    return g.add(Save(out, tensor, shape, torch.bfloat16), (src,))


def applies(g: Graph) -> list[int]:
    return g.of_kind(Apply)


def assert_consistent(g: Graph) -> None:
    """`inputs` and the edges agree, every input exists, the graph is acyclic."""
    assert nx.is_directed_acyclic_graph(g)
    for n in g.nodes:
        for i in g.inputs(n):
            assert i in g.nodes, (n, i)
            assert g.has_edge(i, n), (n, i)
        for p in g.predecessors(n):
            assert p in g.inputs(n), (n, p)


def source_of_save(g: Graph, s: int) -> int:
    (src,) = g.inputs(s)
    return src


_RESULTS: dict = {}


def run(pass_, g: Graph) -> Graph:
    """The graph `pass_` returns; what it reported is kept for fired() and schedule_of()."""
    result = pass_(g)
    _RESULTS[id(result.graph), pass_.__name__] = result
    return result.graph


def fired(g: Graph, name: str) -> dict:
    return dict(_RESULTS[id(g), name].fired)


def schedule_of(g: Graph):
    return _RESULTS[id(g), "schedule_blocks"].schedule


# ---------------------------------------------------------------- common subexpressions


def test_cse_merges_identical_applies():
    g = Graph()
    a, b = load(g, A), load(g, B)
    s1 = apply(g, "slerp", slerp.Params(t=0.5), (a, b))
    s2 = apply(g, "slerp", slerp.Params(t=0.5), (a, b))
    o1 = save(g, s1, out=Path("/out/1"))
    o2 = save(g, s2, out=Path("/out/2"))
    g = run(eliminate_common_subexpressions, g)
    assert_consistent(g)
    assert len(applies(g)) == 1
    assert source_of_save(g, o1) == source_of_save(g, o2) in applies(g)
    assert g.inputs(source_of_save(g, o1)) == (a, b)
    assert len(g.of_kind(Save)) == 2  # saves are never merged
    assert fired(g, "eliminate_common_subexpressions") == {"apply": 1}


def test_cse_merges_identical_loads_and_then_their_users():
    g = Graph()
    l1, l2 = load(g, A, "w"), load(g, A, "w")
    p1 = apply(g, "passthrough", passthrough.Params(scale=2.0), (l1,))
    p2 = apply(g, "passthrough", passthrough.Params(scale=2.0), (l2,))
    o1 = save(g, p1, out=Path("/out/1"))
    o2 = save(g, p2, out=Path("/out/2"))
    g = run(eliminate_common_subexpressions, g)
    assert_consistent(g)
    assert len(g.of_kind(Load)) == 1
    assert len(applies(g)) == 1
    assert source_of_save(g, o1) == source_of_save(g, o2)
    assert fired(g, "eliminate_common_subexpressions") == {"load": 1, "apply": 1}


@pytest.mark.parametrize(
    "second",
    ["other_params", "swapped_inputs", "other_op"],
)
def test_cse_keeps_different_applies(second):
    g = Graph()
    a, b = load(g, A), load(g, B)
    s1 = apply(g, "slerp", slerp.Params(t=0.5), (a, b))
    if second == "other_params":
        s2 = apply(g, "slerp", slerp.Params(t=0.25), (a, b))
    elif second == "swapped_inputs":
        s2 = apply(g, "slerp", slerp.Params(t=0.5), (b, a))
    else:
        s2 = apply(g, "linear", linear.Params(), (a, b))
    save(g, s1, out=Path("/out/1"))
    save(g, s2, out=Path("/out/2"))
    g = run(eliminate_common_subexpressions, g)
    assert_consistent(g)
    assert sorted(applies(g)) == sorted([s1, s2])
    assert sum(fired(g, "eliminate_common_subexpressions").values()) == 0


def test_cse_keeps_loads_of_different_tensors_or_checkpoints():
    g = Graph()
    loads = [load(g, A, "w"), load(g, A, "v"), load(g, B, "w")]
    for k, n in enumerate(loads):
        save(g, n, out=Path(f"/out/{k}"))
    g = run(eliminate_common_subexpressions, g)
    assert sorted(g.of_kind(Load)) == sorted(loads)


def test_cse_params_with_lists_compare_by_value():
    g = Graph()
    a, b = load(g, A), load(g, B)
    k1 = apply(g, "karcher", karcher.Params(weights=[2.0, 1.0]), (a, b))
    k2 = apply(g, "karcher", karcher.Params(weights=[2, 1]), (a, b))
    k3 = apply(g, "karcher", karcher.Params(weights=[1.0, 2.0]), (a, b))
    for k, n in enumerate((k1, k2, k3)):
        save(g, n, out=Path(f"/out/{k}"))
    g = run(eliminate_common_subexpressions, g)
    assert sorted(applies(g)) == sorted([k1, k3])


# ---------------------------------------------------------------- folding


def _fold_one(op, params, n_inputs, same=False, has_base=False):
    """Build loads -> one apply -> save, fold, and return (graph, loads, save node, apply node)."""
    g = Graph()
    if same:
        a = load(g, A)
        loads = [a]
        inputs = (a,) * n_inputs
    else:
        loads = [load(g, ck) for ck in (A, B, C)[:n_inputs]]
        inputs = tuple(loads)
    n = apply(g, op, params, inputs, has_base=has_base)
    s = save(g, n)
    g = run(fold_trivial_ops, g)
    assert_consistent(g)
    return g, loads, s, n


@pytest.mark.parametrize(
    "op,params,n_inputs,same,result,rule",
    [
        ("slerp", slerp.Params(t=0.0), 2, False, 0, "slerp_t0"),
        ("slerp", slerp.Params(t=0), 2, False, 0, "slerp_t0"),
        ("slerp", slerp.Params(t=1.0), 2, False, 1, "slerp_t1"),
        ("linear", linear.Params(), 1, False, 0, "single_source"),
        ("linear", linear.Params(weights=[1.0], normalize=False), 1, False, 0, "single_source"),
        ("karcher", karcher.Params(), 1, False, 0, "single_source"),
        ("karcher", karcher.Params(weights=[5.0]), 1, False, 0, "single_source"),
        ("passthrough", passthrough.Params(scale=1.0), 1, False, 0, "identity_passthrough"),
        ("passthrough", passthrough.Params(), 1, False, 0, "identity_passthrough"),
    ],
)
def test_fold_rule_fires(op, params, n_inputs, same, result, rule):
    g, loads, s, n = _fold_one(op, params, n_inputs, same)
    assert n not in g.nodes
    assert applies(g) == []
    assert source_of_save(g, s) == loads[result]
    assert fired(g, "fold_trivial_ops") == {rule: 1}


@pytest.mark.parametrize(
    "op,params,n_inputs,same,has_base",
    [
        ("slerp", slerp.Params(t=0.5), 2, False, False),
        ("slerp", slerp.Params(t=1e-9), 2, False, False),
        ("linear", linear.Params(weights=[2.0], normalize=False), 1, False, False),
        ("linear", linear.Params(), 2, False, False),
        ("linear", linear.Params(normalize=False), 2, True, False),  # a + a = 2a, not a
        # mathematically the input, but not bit for bit in float32: (3·a)/3, 0.3·a + 0.7·a, ...
        ("linear", linear.Params(weights=[3.0]), 1, False, False),
        ("linear", linear.Params(), 2, True, False),
        ("linear", linear.Params(weights=[2.0, 1.0, 1.0]), 3, True, False),
        ("slerp", slerp.Params(t=0.3), 2, True, False),
        ("karcher", karcher.Params(weights=[2.0, 1.0, 1.0]), 3, True, False),
        ("karcher", karcher.Params(), 2, False, False),
        ("passthrough", passthrough.Params(scale=2.0), 1, False, False),
        ("passthrough", passthrough.Params(scale=-1.0), 1, False, False),
        # task arithmetic is not an average: base + (a - base) folds to nothing here
        ("task_arithmetic", task_arithmetic.Params(), 2, True, True),
    ],
)
def test_fold_leaves_non_trivial_ops(op, params, n_inputs, same, has_base):
    g, loads, s, n = _fold_one(op, params, n_inputs, same, has_base)
    assert applies(g) == [n]
    assert source_of_save(g, s) == n
    assert sum(fired(g, "fold_trivial_ops").values()) == 0


def test_fold_cascades():
    # karcher(slerp(a, b, t=1)) -> karcher(b) -> b; linear(that) -> b; passthrough(that) -> b
    g = Graph()
    a, b = load(g, A), load(g, B)
    s = apply(g, "slerp", slerp.Params(t=1.0), (a, b))
    k = apply(g, "karcher", karcher.Params(), (s,))
    lin = apply(g, "linear", linear.Params(), (k,))
    p = apply(g, "passthrough", passthrough.Params(scale=1.0), (lin,))
    o = save(g, p)
    g = run(fold_trivial_ops, g)
    assert_consistent(g)
    assert applies(g) == []
    assert source_of_save(g, o) == b
    assert fired(g, "fold_trivial_ops") == {
        "slerp_t1": 1, "single_source": 2, "identity_passthrough": 1,
    }
    # a is now unused and dead-code elimination removes it
    g = run(eliminate_dead_nodes, g)
    assert sorted(g.nodes) == sorted([b, o])


def test_fold_keeps_other_users_of_the_folded_node_correct():
    g = Graph()
    a, b = load(g, A), load(g, B)
    s = apply(g, "slerp", slerp.Params(t=0.0), (a, b))
    lin = apply(g, "linear", linear.Params(), (s, b))
    o1 = save(g, s, out=Path("/out/1"))
    o2 = save(g, lin, out=Path("/out/2"))
    g = run(fold_trivial_ops, g)
    assert_consistent(g)
    assert source_of_save(g, o1) == a
    assert g.inputs(source_of_save(g, o2)) == (a, b)


# ---------------------------------------------------------------- dead nodes


def test_dead_nodes_dropped():
    g = Graph()
    a, b, c = load(g, A), load(g, B), load(g, C)
    live = apply(g, "linear", linear.Params(), (a, b))
    dead1 = apply(g, "slerp", slerp.Params(t=0.5), (b, c))
    dead2 = apply(g, "passthrough", passthrough.Params(scale=3.0), (dead1,))
    o = save(g, live)
    g = run(eliminate_dead_nodes, g)
    assert_consistent(g)
    assert sorted(g.nodes) == sorted([a, b, live, o])
    assert dead1 not in g.nodes and dead2 not in g.nodes and c not in g.nodes
    assert fired(g, "eliminate_dead_nodes") == {"load": 1, "apply": 2}


def test_dead_nodes_unused_model_loads_disappear():
    g = Graph()
    used = [load(g, A, f"t{i}") for i in range(3)]
    unused = [load(g, B, f"t{i}") for i in range(3)]
    saves = [save(g, n, tensor=f"t{i}") for i, n in enumerate(used)]
    g = run(eliminate_dead_nodes, g)
    assert not any(n in g.nodes for n in unused)
    assert {g.payload(n).checkpoint for n in g.of_kind(Load)} == {A}
    assert sorted(g.nodes) == sorted(used + saves)


# ---------------------------------------------------------------- scheduling

NAMES = [
    "model.layers.10.mlp.weight", "lm_head.weight", "model.layers.2.mlp.weight", "model.layers.0.mlp.weight",
    "model.norm.weight", "model.layers.1.attn.weight", "model.layers.1.mlp.weight", "model.embed_tokens.weight",
    "model.layers.0.attn.weight",
]


def _block(name):
    i = leading_index(name)
    return -1 if i is None else i


def _check_schedule(g: Graph, schedule) -> list[int]:
    order = schedule.order
    assert len(order) == len(set(order)) == g.number_of_nodes()
    pos = {n: k for k, n in enumerate(order)}
    for n in g.nodes:
        for i in g.inputs(n):
            assert pos[i] < pos[n], (i, n)
    return order


def test_schedule_orders_blocks_and_inputs():
    g = Graph()
    for name in NAMES:  # scrambled insertion order
        a, b = load(g, A, name), load(g, B, name)
        save(g, apply(g, "slerp", slerp.Params(t=0.5), (a, b), tensor=name), tensor=name)
    g = run(schedule_blocks, g)
    order = _check_schedule(g, schedule_of(g))
    blocks = schedule_of(g).blocks
    seq = [blocks[n] for n in order]
    assert seq == sorted(seq)  # non-layer tensors, then layer 0, 1, 2, ..., 10 (numeric, not lexical)
    assert seq[0] == -1 and seq[-1] == 10
    for n in order:
        p = g.payload(n)
        assert blocks[n] == _block(p.tensor)
    saved = [g.payload(n).tensor for n in order if isinstance(g.payload(n), Save)]
    assert [_block(t) for t in saved] == sorted(_block(t) for t in NAMES)


def test_schedule_places_shared_nodes_once():
    g = Graph()
    shared = load(g, A, "model.embed_tokens.weight", shape=SHAPE)
    for name in ("model.layers.1.w", "model.layers.0.w", "lm_head.weight"):
        x = load(g, B, name)
        save(g, apply(g, "linear", linear.Params(), (shared, x), tensor=name), tensor=name)
    save(g, shared, tensor="model.embed_tokens.weight")
    g = run(schedule_blocks, g)
    order = _check_schedule(g, schedule_of(g))
    assert order.count(shared) == 1
    assert schedule_of(g).blocks[shared] == -1


def test_schedule_of_a_real_recipe_is_block_by_block(repo_root):
    plan = compile_recipe(repo_root / "examples" / "quickstart.merge")
    g = plan.graph
    order = _check_schedule(g, plan.schedule)
    blocks = [plan.schedule.blocks[n] for n in order]
    assert blocks == sorted(blocks)
    assert set(blocks) == {-1, *range(8)}
    # every node of a layer's block belongs to that layer's tensors
    for n in order:
        p = g.payload(n)
        assert plan.schedule.blocks[n] == _block(p.tensor)


# ---------------------------------------------------------------- through recipes

HEADER = """
base = model("{m}/base")
code = model("{m}/code")
math = model("{m}/math")
"""


def _compile(models, body, name="r.merge", **kw):
    text = HEADER.format(m=models) + body
    return compile_recipe(models.parent / name, text=text, **kw)


def test_optimize_runs_the_passes_in_order_and_reports(models, tmp_path):
    plan = _compile(models, f'save slerp(base, code, t = 0.5) to "{tmp_path}/o"\n')
    assert [r.name for r in plan.reports] == [p.__name__ for p in PASSES]
    for r in plan.reports:
        assert set(r.before) == set(r.after) == {"load", "apply", "save"}
    assert plan.reports[-1].after == plan.graph.counts() == {"load": 150, "apply": 75, "save": 75}


def test_recipe_same_call_twice_runs_once(models, tmp_path):
    body = f"""
a = slerp(base, code, t = 0.5)
b = slerp(base, code, t = 0.5)
save a to "{tmp_path}/a"
save b to "{tmp_path}/b"
"""
    unopt = _compile(models, body, optimize_graph=False)
    assert unopt.graph.counts()["apply"] == 150
    plan = _compile(models, body)
    assert plan.graph.counts() == {"load": 150, "apply": 75, "save": 150}
    cse = plan.reports[0]
    assert cse.before["apply"] == 150 and cse.after["apply"] == 75
    assert cse.fired == {"apply": 75}
    # each save pair reads the one shared slerp
    g = plan.graph
    by_tensor = Counter(source_of_save(g, s) for s in g.of_kind(Save))
    assert set(by_tensor.values()) == {2}


def test_recipe_cse_then_fold_cascade(models, tmp_path):
    # after CSE, karcher(a, b) is karcher(x, x); it is not folded (not exact), but computed once per tensor
    body = f"""
a = slerp(base, code, t = 0.5)
b = slerp(base, code, t = 0.5)
save karcher(a, b) to "{tmp_path}/o"
"""
    plan = _compile(models, body)
    counts = Counter(plan.graph.payload(n).op for n in plan.graph.of_kind(Apply))
    assert counts == {"slerp": 75, "karcher": 75}
    assert plan.reports[0].fired == {"apply": 75}


def test_recipe_slerp_t0_never_reads_the_second_model(models, tmp_path):
    plan = _compile(models, f'save slerp(base, code, t = 0) to "{tmp_path}/o"\n')
    g = plan.graph
    assert g.of_kind(Apply) == []
    assert {g.payload(n).checkpoint for n in g.of_kind(Load)} == {(models / "base").resolve()}
    assert plan.checkpoints_read() == [(models / "base").resolve()]
    assert plan.reports[1].fired == {"slerp_t0": 75}
    dead = next(r for r in plan.reports if r.name == "eliminate_dead_nodes")
    assert dead.fired == {"load": 75}  # code's loads were dead
    for s in g.of_kind(Save):
        assert g.payload(source_of_save(g, s)).tensor == g.payload(s).tensor


def test_recipe_slerp_t1_reads_only_the_second_model(models, tmp_path):
    plan = _compile(models, f'save slerp(base, code, t = 1) to "{tmp_path}/o"\n')
    assert plan.checkpoints_read() == [(models / "code").resolve()]
    assert plan.graph.counts() == {"load": 75, "apply": 0, "save": 75}


def test_recipe_unused_model_is_never_loaded(models, tmp_path):
    body = f"""
extra = slerp(code, math, t = 0.5)
save base to "{tmp_path}/o"
"""
    plan = _compile(models, body)
    assert "extra" in plan.program.unused
    assert "base" not in plan.program.unused
    assert plan.checkpoints_read() == [(models / "base").resolve()]
    assert plan.graph.counts() == {"load": 75, "apply": 0, "save": 75}
    assert "unused" in plan.summary() and "extra" in plan.summary()


def test_recipe_unoptimized_graph_keeps_everything(models, tmp_path):
    plan = _compile(models, f'save slerp(base, code, t = 0) to "{tmp_path}/o"\n', optimize_graph=False)
    assert plan.graph.counts() == {"load": 150, "apply": 75, "save": 75}
    _check_schedule(plan.graph, plan.schedule)
