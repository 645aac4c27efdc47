"""The optimized plan: the checked program, its tensor graph after the passes, and figures."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from mgc.stdlib import RUNNABLE

from mgc.core.dtypes import DType, float32
from mgc.core.paths import relative_to_cwd
from mgc.grammar import ast
from .check import Program
from .fisher_cache import plan_lines
from .ir import Apply, Graph, Load, Rows, Save, _itemsize, saved_dtype_results
from .passes import PassReport, Schedule
from .streaming import streaming


def _transient(p: Apply, op, k: int) -> int:
    """Bytes an operation holds while it runs, beyond its inputs and result (k graph inputs): what the
    operator declares (``Operator.transient``; by default, from how the runtime runs it)."""
    return op.transient(math.prod(p.shape), k, bool(p.aux))


@dataclass
class Plan:
    recipe: ast.Recipe
    program: Program
    graph: Graph
    schedule: Schedule
    reports: list[PassReport]

    @property
    def bytes_read(self) -> int:
        return sum(self.graph.payload(n).nbytes for n in self.graph.of_kind(Load))

    @property
    def bytes_written(self) -> int:
        return sum(self.graph.payload(n).nbytes for n in self.graph.of_kind(Save))

    def checkpoints_read(self) -> list:
        return sorted({self.graph.payload(n).checkpoint for n in self.graph.of_kind(Load)})

    def peak_memory(self, device_type: str = "cpu") -> int:
        """Estimated peak bytes of tensor data held while running the schedule, as the runtime works on a device
        of this type.

        Loaded tensors count at their stored size. A merge's result counts at float32, or at the saved
        dtype where its only users are saves and the operator writes that dtype directly. While a merge
        runs, its transient memory is added: see ``_transient``. A save adds a cast copy when its
        input is not already in the saved dtype. A streamed merge (compiler/streaming.py) holds only its
        transient memory, the slices in flight, and its inputs are not read whole; a streamed copy holds a slice.
        """
        g = self.graph
        streamed = streaming(g, self.schedule.order, self.program, device_type)
        uses = Counter(i for n in g.nodes for i in g.inputs(n))
        direct = saved_dtype_results(g)
        held: dict[int, int] = {}
        dtypes: dict[int, DType] = {}
        live = peak = 0
        for n in self.schedule.order:
            p = g.payload(n)
            inputs = g.inputs(n)
            transient = 0
            if isinstance(p, Load):
                held[n], dtypes[n] = (0 if n in streamed.unread else p.nbytes), p.dtype
            elif isinstance(p, Apply):
                op = RUNNABLE[p.op]
                dtypes[n] = op.result_dtype(direct.get(n))
                held[n] = 0 if n in streamed.applies else math.prod(p.shape) * _itemsize(dtypes[n])
                transient = _transient(p, op, len(inputs))
            elif isinstance(p, Rows):  # in its inputs' dtype, at most float32
                held[n], dtypes[n] = p.nbytes, float32
            elif dtypes.get(inputs[0]) != p.dtype and n not in streamed.copies:
                transient = p.nbytes
            live += held.get(n, 0)
            peak = max(peak, live + transient)
            for i in inputs:
                uses[i] -= 1
                if uses[i] == 0:
                    live -= held.pop(i, 0)
        return peak

    def summary(self, explain: bool = False) -> str:
        lines = [f"plan for {self.recipe.source.name}", "", "passes (load/apply/save nodes):"]
        for r in self.reports:
            b, a = r.before, r.after
            lines.append(
                f"  {r.name:34s} {b['load']:>5}/{b['apply']:>5}/{b['save']:>5} -> {a['load']:>5}/{a['apply']:>5}/{a['save']:>5}"
            )
            if explain:
                for rule, count in sorted(r.fired.items()):
                    lines.append(f"      {rule}: {count}")
        ops = Counter(self.graph.payload(n).op for n in self.graph.of_kind(Apply))
        lines += ["", "work:"]
        lines.append(f"  operations     {sum(ops.values())}" + (f" ({', '.join(f'{k} {v}' for k, v in sorted(ops.items()))})" if ops else ""))
        if self.graph.of_kind(Rows):
            lines.append(f"  row gathers    {len(self.graph.of_kind(Rows))} (vocabularies aligned)")
        lines.append(f"  tensors read   {len(self.graph.of_kind(Load))} from {len(self.checkpoints_read())} checkpoints")
        lines.append(f"  bytes to read  {format_bytes(self.bytes_read)}")
        lines.append(f"  bytes to write {format_bytes(self.bytes_written)}")
        lines.append(f"  peak memory    {format_bytes(self.peak_memory())} (estimate, tensor data)")
        lines += ["", "outputs:"]
        for s in self.program.saves:
            n = sum(1 for x in self.graph.of_kind(Save) if self.graph.payload(x).output == s.path)
            lines.append(f"  {relative_to_cwd(s.path)}  ({n} tensors)")
            if getattr(s, "adapter", None) is not None:
                lines.append(f"    {s.adapter.describe()}")
        if self.program.unused:
            lines += ["", "unused (never read): " + ", ".join(self.program.unused)]
        if getattr(self.program, "fishers", None):
            lines += plan_lines(self)
        if getattr(self.program, "gates", None):
            from .gate_cache import plan_lines as gate_lines

            lines += gate_lines(self)
        from .hub_plan import hub_lines  # hf:// checkpoints: the commits pinned, the shards a run downloads

        lines += hub_lines(self)
        return "\n".join(lines)

    def to_dot(self) -> str:
        g = self.graph
        out = ["digraph mgc {", "  rankdir=LR;", '  node [fontname="monospace", fontsize=10];']
        shapes = {Load: "box", Apply: "ellipse", Save: "note", Rows: "trapezium"}
        for n in self.schedule.order:
            p = g.payload(n)
            label = p.label() if not isinstance(p, Apply) else f"{p.label()}\\n{p.tensor}"
            out.append(f'  n{n} [shape={shapes[type(p)]}, label="{_escape(label)}"];')
        for n in g.nodes:
            for pos, i in enumerate(g.inputs(n)):
                out.append(f'  n{i} -> n{n} [label="{pos}"];' if len(g.inputs(n)) > 1 else f"  n{i} -> n{n};")
        out.append("}")
        return "\n".join(out)


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\\\\n", "\\n")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover
