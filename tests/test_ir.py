"""The tensor graph's contract: a node's identity is everything the runtime reads, graphs are frozen once
built, and every pass returns what it produced instead of changing its input."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import networkx as nx
import pytest
import torch

import mgc.stdlib.dare_linear as dare_linear
import mgc.stdlib.slerp as slerp
from mgc.api import compile_recipe
from mgc.compiler.ir import Apply, Graph, Load, Save
from mgc.compiler.passes import PASSES, Schedule, optimize
from mgc.runtime.apply import run_apply

A, B, OUT = Path("/ckpt/a"), Path("/ckpt/b"), Path("/out/x")


def small_graph() -> Graph:
    g = Graph()
    a, b = g.add(Load(A, "w", (4,), torch.float32)), g.add(Load(B, "w", (4,), torch.float32))
    s1 = g.add(Apply("slerp", slerp.Params(t=0.5), False, "w", (4,)), (a, b))
    s2 = g.add(Apply("slerp", slerp.Params(t=0.5), False, "w", (4,)), (a, b))
    g.add(Save(OUT, "w", (4,), torch.float32), (s1,))
    g.add(Save(OUT, "v", (4,), torch.float32), (s2,))
    return g


def test_only_labels_are_left_out_of_a_nodes_identity():
    nodes = [Load(A, "w", (1,), torch.float32), Apply("slerp", slerp.Params(t=0), False, "w", (1,)),
             Save(OUT, "w", (1,), torch.float32)]
    for node in nodes:
        labels = {f.name for f in dataclasses.fields(node) if f.metadata.get("label")}
        assert labels == ({"tensor", "span"} if isinstance(node, Apply) else set())
        assert len(node.key()) == 1 + len(dataclasses.fields(node)) - len(labels)


def test_labels_do_not_change_what_a_node_computes():
    """Two random nodes that differ only in their label run to the same bytes; the seed tensor is identity."""
    params = dare_linear.Params(density=[0.5], seed=3)
    base, x = torch.randn(64, generator=torch.Generator().manual_seed(0)), torch.randn(64)
    one = Apply("dare_linear", params, True, "model.layers.0.w", (64,), seed_tensor="model.layers.0.w")
    other = dataclasses.replace(one, tensor="elsewhere")
    assert one.key() == other.key()
    cpu = torch.device("cpu")
    assert torch.equal(run_apply(one, [base, x], cpu), run_apply(other, [base, x], cpu))
    reseeded = dataclasses.replace(one, seed_tensor="model.layers.1.w")
    assert reseeded.key() != one.key()
    assert not torch.equal(run_apply(reseeded, [base, x], cpu), run_apply(one, [base, x], cpu))


def test_passes_return_their_product_and_leave_their_input_alone():
    g = small_graph().freeze()
    before = (sorted(g.nodes), {n: g.inputs(n) for n in g.nodes})
    for p in PASSES:
        result = p(g)
        assert (sorted(g.nodes), {n: g.inputs(n) for n in g.nodes}) == before, p.__name__
        assert nx.is_frozen(result.graph)
    with pytest.raises(nx.NetworkXError):
        g.add(Load(A, "x", (1,), torch.float32))
    with pytest.raises(nx.NetworkXError):
        g.replace(2, 3)


def test_the_schedule_is_a_value_of_the_plan(repo_root):
    plan = compile_recipe(repo_root / "examples" / "quickstart.merge")
    assert isinstance(plan.schedule, Schedule)
    assert sorted(plan.schedule.order) == sorted(plan.graph.nodes)
    assert "order" not in plan.graph.graph and "blocks" not in plan.graph.graph and "fired" not in plan.graph.graph
    unoptimized = compile_recipe(repo_root / "examples" / "quickstart.merge", optimize_graph=False)
    assert sorted(unoptimized.schedule.order) == sorted(unoptimized.graph.nodes)


def test_optimize_schedules_the_final_graph_even_without_the_scheduling_pass():
    optimized = optimize(small_graph(), passes=PASSES[:-1])
    assert sorted(optimized.schedule.order) == sorted(optimized.graph.nodes)
    assert optimized.graph.counts() == {"load": 2, "apply": 1, "save": 2}
