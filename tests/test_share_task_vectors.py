"""The share_task_vectors pass: a task vector x − base that several task-vector operations read is
computed once, by a task_vector node, and those operations run merge_deltas on it, with the same bytes."""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import networkx as nx
import pytest
import torch

import mgc.stdlib.dare_ties as dare_ties
import mgc.stdlib.linear as linear
import mgc.stdlib.ties as ties
from mgc.api import compile_recipe, run
from mgc.compiler.ir import Apply, Graph, Load, Save
from mgc.compiler.passes import PASSES, eliminate_dead_nodes, pipeline, share_task_vectors
from mgc.stdlib import OPERATORS

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"
HEAD = "\n".join(f'{m} = model("{MODELS / m}")' for m in ("base", "code", "math", "prose")) + "\n"
WITH = pipeline(share_task_vectors=True)
DELTA_OPS = sorted(name for name, op in OPERATORS.items() if op.merge_deltas is not None)
SHAPE = (4, 4)


# ---------------------------------------------------------------- helpers


def consistent(g: Graph) -> None:
    """`inputs` and the edges agree and the graph is acyclic."""
    assert nx.is_directed_acyclic_graph(g)
    for n in g.nodes:
        assert set(g.predecessors(n)) == set(g.inputs(n)), n
        assert all(i in g.nodes for i in g.inputs(n))


def task_vector_pairs(g: Graph) -> Counter:
    """(tensor, base payload key, model payload key) of each task_vector node, counted."""
    return Counter(
        (g.payload(n).tensor, *(g.payload(i).key() for i in g.inputs(n)))
        for n in g.of_kind(Apply) if g.payload(n).op == "task_vector"
    )


def hand_graph(ops: list[tuple[str, object, tuple[str, ...]]], base: str = "b") -> tuple[Graph, dict, list[int]]:
    """Loads b, e1, e2, e3 and one apply per (op, params, models), each saved."""
    g = Graph()
    loads = {name: g.add(Load(Path(f"/ckpt/{name}"), "w", SHAPE, torch.bfloat16)) for name in ("b", "e1", "e2", "e3")}
    applies = []
    for k, (op, params, models) in enumerate(ops):
        has_base = OPERATORS[op].base != "none"
        inputs = ((loads[base],) if has_base else ()) + tuple(loads[m] for m in models)
        n = g.add(Apply(op, params, has_base, "w", SHAPE), inputs)
        g.add(Save(Path(f"/out/{k}"), "w", SHAPE, torch.bfloat16), (n,))
        applies.append(n)
    return g, loads, applies


def digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))).hexdigest()


def run_both(tmp_path: Path, body: str) -> dict[str, tuple[str, str]]:
    """Run `body` (saves into {out}/NAME) with the opt-in share_task_vectors pass and without it; returns
    {output name: (digest with, digest without)}, after checking that the pass fired in the first run."""
    digests: dict[str, list[str]] = {}
    for label in ("with", "without"):
        out = tmp_path / label
        plan, _ = run("r.merge", text=HEAD + body.replace("{out}", str(out)), device="cpu",
                      share_task_vectors=label == "with")
        shared = plan.graph.graph["fired"].get("share_task_vectors", {})
        assert bool(shared) == (label == "with"), shared
        for folder in sorted(out.iterdir()):
            digests.setdefault(folder.name, []).append(digest(folder))
    return {name: tuple(d) for name, d in digests.items()}


# ---------------------------------------------------------------- the pass on hand-built graphs


def test_two_operations_over_the_same_models_share_their_task_vectors():
    g, loads, (a, c) = hand_graph([
        ("ties", ties.Params(density=[0.5, 0.5]), ("e1", "e2")),
        ("dare_ties", dare_ties.Params(density=[0.5, 0.5], seed=1), ("e1", "e2")),
    ])
    share_task_vectors(g)
    consistent(g)
    vectors = [n for n in g.of_kind(Apply) if g.payload(n).op == "task_vector"]
    assert sorted(g.inputs(n) for n in vectors) == [(loads["b"], loads["e1"]), (loads["b"], loads["e2"])]
    for n in vectors:
        assert g.payload(n).has_base and not g.payload(n).deltas and g.payload(n).shape == SHAPE
    by_model = {g.inputs(n)[1]: n for n in vectors}
    for n in (a, c):
        assert g.payload(n).deltas
        assert g.inputs(n) == (loads["b"], by_model[loads["e1"]], by_model[loads["e2"]])
        assert g.payload(n).label().endswith(" on task vectors")
    assert g.graph["fired"]["share_task_vectors"] == {"shared_task_vector": 2, "merge_on_task_vectors": 2}


def test_every_model_of_a_sharing_operation_becomes_a_task_vector_and_each_pair_appears_once():
    g, loads, (a, c) = hand_graph([
        ("ties", ties.Params(), ("e1", "e2")),
        ("task_arithmetic", OPERATORS["task_arithmetic"].params(), ("e2", "e3", "e2")),
    ])
    share_task_vectors(g)
    consistent(g)
    vectors = {g.inputs(n)[1]: n for n in g.of_kind(Apply) if g.payload(n).op == "task_vector"}
    assert sorted(vectors) == sorted(loads[m] for m in ("e1", "e2", "e3"))  # e2 shared; e1, e3 for their op
    assert g.inputs(a) == (loads["b"], vectors[loads["e1"]], vectors[loads["e2"]])
    assert g.inputs(c) == (loads["b"], vectors[loads["e2"]], vectors[loads["e3"]], vectors[loads["e2"]])
    assert g.graph["fired"]["share_task_vectors"] == {"shared_task_vector": 1, "merge_on_task_vectors": 2}


@pytest.mark.parametrize(
    "ops, base",
    [
        ([("ties", ties.Params(), ("e1", "e2"))], "b"),  # one operation
        ([("ties", ties.Params(), ("e1", "e1"))], "b"),  # one operation reading a model twice
        ([("ties", ties.Params(), ("e1",)), ("ties", ties.Params(density=[0.5]), ("e2",))], "b"),  # other models
        ([("ties", ties.Params(), ("e1",)), ("linear", linear.Params(), ("e1", "e2"))], "b"),  # linear: no deltas
        ([("ties", ties.Params(), ("e1",)), ("model_stock", OPERATORS["model_stock"].params(), ("e1", "e2"))], "b"),
    ],
)
def test_nothing_is_shared_without_two_task_vector_operations_on_a_pair(ops, base):
    g, _, _ = hand_graph(ops, base)
    before = {n: (g.payload(n), g.inputs(n)) for n in g.nodes}
    share_task_vectors(g)
    assert {n: (g.payload(n), g.inputs(n)) for n in g.nodes} == before
    assert g.graph["fired"]["share_task_vectors"] == {}


def test_other_bases_do_not_share():
    g = Graph()
    b1, b2, e = (g.add(Load(Path(f"/ckpt/{x}"), "w", SHAPE, torch.bfloat16)) for x in ("b1", "b2", "e"))
    for k, b in enumerate((b1, b2)):
        n = g.add(Apply("ties", ties.Params(), True, "w", SHAPE), (b, e))
        g.add(Save(Path(f"/out/{k}"), "w", SHAPE, torch.bfloat16), (n,))
    share_task_vectors(g)
    assert not any(g.payload(n).op == "task_vector" for n in g.of_kind(Apply))


def test_a_task_vector_already_in_the_graph_is_reused():
    g, loads, (tv, a) = hand_graph([
        ("task_vector", OPERATORS["task_vector"].params(), ("e1",)),
        ("ties", ties.Params(), ("e1", "e2")),
    ])
    share_task_vectors(g)
    consistent(g)
    vectors = [n for n in g.of_kind(Apply) if g.payload(n).op == "task_vector"]
    assert len(vectors) == 2 and tv in vectors
    assert g.inputs(a)[:2] == (loads["b"], tv)
    assert share_task_vectors(g).graph["fired"]["share_task_vectors"] == {}  # nothing left to do


def test_aux_inputs_stay_after_the_task_vectors():
    g = Graph()
    b, e1, e2, f = (g.add(Load(Path(f"/ckpt/{x}"), "w", SHAPE, torch.bfloat16)) for x in ("b", "e1", "e2", "f"))
    payload = Apply("ties", ties.Params(), True, "w", SHAPE, aux=(("extra", 1),))
    a = g.add(payload, (b, e1, e2, f))
    c = g.add(Apply("ties", ties.Params(density=[0.5, 0.5]), True, "w", SHAPE), (b, e1, e2))
    for k, n in enumerate((a, c)):
        g.add(Save(Path(f"/out/{k}"), "w", SHAPE, torch.bfloat16), (n,))
    share_task_vectors(g)
    consistent(g)
    base, models, extra = g.payload(a).split(list(g.inputs(a)))
    assert base == b and extra == {"extra": [f]}
    assert [g.inputs(m) for m in models] == [(b, e1), (b, e2)]


def test_set_inputs_keeps_the_edges_in_step():
    g = Graph()
    x, y, z = (g.add(Load(Path(f"/ckpt/{k}"), "w", SHAPE, torch.bfloat16)) for k in "xyz")
    n = g.add(Apply("linear", linear.Params(), False, "w", SHAPE), (x, y, y))
    g.set_inputs(n, (z, y))
    assert g.inputs(n) == (z, y) and set(g.predecessors(n)) == {y, z}


def test_deltas_is_part_of_the_key():
    p = Apply("ties", ties.Params(), True, "w", SHAPE)
    q = Apply("ties", ties.Params(), True, "w", SHAPE, deltas=True)
    assert p.key() != q.key()
    assert q.label() == p.label() + " on task vectors"


# ---------------------------------------------------------------- through recipes


def test_the_pass_fires_on_a_recipe_and_each_pair_appears_once(tmp_path):
    body = f"""
a = ties(code, math, base = base, density = 0.5)
c = dare_ties(code, math, prose, base = base, density = 0.5, seed = 3)
save a to "{tmp_path}/a"
save c to "{tmp_path}/c"
"""
    plan = compile_recipe("r.merge", text=HEAD + body, share_task_vectors=True)
    g = plan.graph
    consistent(g)
    pairs = task_vector_pairs(g)
    n_tensors = len(g.of_kind(Save)) // 2
    assert len(pairs) == 3 * n_tensors and set(pairs.values()) == {1}  # code, math, prose: once per tensor
    assert {key[2][1] for key in pairs} == {MODELS / m for m in ("code", "math", "prose")}
    ops = [g.payload(n) for n in g.of_kind(Apply)]
    assert all(p.deltas for p in ops if p.op != "task_vector")
    assert g.graph["fired"]["share_task_vectors"] == {
        "shared_task_vector": 2 * n_tensors, "merge_on_task_vectors": 2 * n_tensors,
    }
    # every node is scheduled, after its inputs
    order = g.graph["order"]
    assert sorted(order) == sorted(g.nodes)
    position = {n: k for k, n in enumerate(order)}
    assert all(position[i] < position[n] for n in g.nodes for i in g.inputs(n))
    # the plan's figures and its DOT take the new nodes
    assert f"task_vector {3 * n_tensors}" in plan.summary(explain=True)
    assert "shared_task_vector" in plan.summary(explain=True)
    assert plan.peak_memory() > 0
    dot = plan.to_dot()
    assert "task_vector()" in dot and "on task vectors" in dot


def test_the_pass_does_not_fire_without_sharing(tmp_path):
    body = f"""
a = ties(code, math, base = base, density = 0.5)
c = dare_ties(prose, base = base, density = 0.5)
d = linear(code, math)
save a to "{tmp_path}/a"
save c to "{tmp_path}/c"
save d to "{tmp_path}/d"
"""
    plan = compile_recipe("r.merge", text=HEAD + body, share_task_vectors=True)
    assert not task_vector_pairs(plan.graph)
    assert not any(plan.graph.payload(n).deltas for n in plan.graph.of_kind(Apply))
    assert plan.graph.graph["fired"]["share_task_vectors"] == {}


def test_shared_and_unshared_runs_write_the_same_bytes(tmp_path):
    body = """
a = ties(code, math, base = base, density = 0.5, weights = [1, 0.7])
c = dare_ties(code, math, prose, base = base, density = [0.5, 0.6, 0.7], seed = 7)
n = task_arithmetic(ties(code, prose, base = base, density = 0.3), math, base = base, lambda = 0.8)
save a to "{out}/a" { dtype = fp32 }
save c to "{out}/c" { dtype = fp32 }
save n to "{out}/n" { dtype = fp32 }
"""
    digests = run_both(tmp_path, body)
    assert set(digests) == {"a", "c", "n"}
    for name, (shared, unshared) in digests.items():
        assert shared == unshared, name


def test_a_random_operator_writes_the_same_bytes_shared_or_not(tmp_path):
    body = """
a = dare_ties(code, math, base = base, density = 0.5, seed = 11)
c = dare_ties(code, math, base = base, density = 0.6, seed = 11)
save a to "{out}/a" { dtype = fp32 }
save c to "{out}/c" { dtype = fp32 }
"""
    digests = run_both(tmp_path, body)
    assert all(shared == unshared for shared, unshared in digests.values())
    assert digests["a"][0] != digests["c"][0]


PARAMS = {
    "task_arithmetic": "lambda = 0.9", "sce": "select_topk = 0.5",
    "breadcrumbs": "density = 0.5, gamma = 0.05", "breadcrumbs_ties": "density = 0.5, gamma = 0.05",
    "della": "density = 0.5, epsilon = 0.1, seed = 5", "della_linear": "density = 0.5, epsilon = 0.1, seed = 5",
    "dare_linear": "density = 0.5, seed = 5", "dare_ties": "density = 0.5, seed = 5", "ties": "density = 0.5",
}


def test_every_task_vector_operator_is_covered():
    assert set(PARAMS) == set(DELTA_OPS)


@pytest.mark.parametrize("op", DELTA_OPS)
def test_every_task_vector_operator_writes_the_same_bytes_shared_or_not(op, tmp_path):
    body = f"""
a = {op}(code, math, prose, base = base, {PARAMS[op]})
c = task_arithmetic(code, math, base = base)
save a to "{{out}}/a" {{ dtype = fp32 }}
save c to "{{out}}/c" {{ dtype = fp32 }}
"""
    digests = run_both(tmp_path, body)
    assert all(shared == unshared for shared, unshared in digests.values())


def test_the_pass_is_opt_in():
    assert share_task_vectors not in PASSES
    assert WITH.index(share_task_vectors) == WITH.index(eliminate_dead_nodes) - 1
    body = """
a = ties(code, math, base = base, density = 0.5)
c = task_arithmetic(code, math, base = base)
save a to "/tmp/never/a"
save c to "/tmp/never/c"
"""
    assert not task_vector_pairs(compile_recipe("r.merge", text=HEAD + body).graph)
    assert task_vector_pairs(compile_recipe("r.merge", text=HEAD + body, share_task_vectors=True).graph)
