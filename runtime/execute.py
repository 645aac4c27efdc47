"""Run an optimized tensor graph: read, merge and write block by block.

Nodes run in the schedule's order; each input tensor is read lazily from its
checkpoint and every value is freed as soon as its last user has run. Merge math
runs in float32 on the chosen device; results are cast to the output dtype and
streamed into the staged output folders, which replace their targets only when
every output is complete.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

from mgc.core.errors import CheckpointError, MergeRuntimeError
from mgc.compiler.ir import Apply, Graph, Load, Rows, Save, saved_dtype_results
from mgc.compiler.plan import format_bytes
from mgc.compiler.streaming import streaming
from .apply import all_finite, run_apply
from .rows import run_rows

from .allocator import keep_freed_memory
from mgc.core.devices import resolve_device
from .distributed import SINGLE, World
from .outputs import Outputs
from .streamed import copy_streamed, run_streamed
from .streams import Prefetcher, WriterThread
from .writer import ShardedWriter
from .adapter_out import AdapterWriter


@dataclass
class RunStats:
    tensors_read: int = 0
    bytes_read: int = 0
    ops_run: int = 0
    tensors_written: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    adapters: dict = field(default_factory=dict)  # output folder -> runtime/adapter_out.py's AdapterReport


DEFAULT_PREFETCH = 64 << 20
WRITE_QUEUE_BYTES = 64 << 20


def execute(
    plan, device: str = "auto", force: bool = False, progress: bool = True, max_memory: Optional[int] = None,
    world: World = SINGLE,
) -> RunStats:
    """Execute `plan` (a mgc.compiler.plan.Plan) and write each of its saves.

    Input tensors are read ahead on a background thread, within `max_memory` less what the
    schedule itself holds (the plan's peak estimate; at most 4 × DEFAULT_PREFETCH), or DEFAULT_PREFETCH
    when no cap is given; finished tensors are written on another thread while the next ones compute,
    with at most WRITE_QUEUE_BYTES waiting.

    An output that an interrupted run of the same plan left is continued: only the tensors not yet on disk are
    computed (runtime/journal.py). Under torchrun (`world`), each rank computes its share (runtime/outputs.py).
    """
    start = time.perf_counter()
    keep_freed_memory()
    dev = world.device(resolve_device(device))
    graph: Graph = plan.graph
    prefetch = DEFAULT_PREFETCH
    if max_memory is not None:
        need = plan.peak_memory(dev.type)
        if need > max_memory:
            raise MergeRuntimeError(
                f"this merge needs about {format_bytes(need)} of tensor memory, more than --max-memory "
                f"{format_bytes(max_memory)}", hint="`mgc plan` shows the estimate; raise the cap",
            )
        prefetch = max(0, min(max_memory - need, 4 * DEFAULT_PREFETCH))
    queue_bytes = min(WRITE_QUEUE_BYTES, prefetch) if max_memory is not None else WRITE_QUEUE_BYTES
    checkpoints = plan.program.checkpoints
    result_dtypes = saved_dtype_results(graph)  # of the whole graph, whatever part of it this run computes
    outputs = Outputs(plan, plan.schedule.order, world, dev.type)
    values: dict[int, torch.Tensor] = {}
    stats = RunStats()
    reader = writer_thread = bar = None
    try:
        outputs.open(force)
        order = _needed(graph, plan.schedule.order, outputs.mine())
        uses = Counter(i for n in order for i in graph.inputs(n))
        writers = outputs.writers
        bar = _progress(graph, order, progress and world.rank == 0)
        streamed = streaming(graph, order, plan.program, dev.type)
        loads = [(n, graph.payload(n).nbytes, _reader(checkpoints, graph.payload(n))) for n in order
                 if isinstance(graph.payload(n), Load) and n not in streamed.unread]
        reader = Prefetcher(loads, prefetch, pin=dev.type == "cuda")
        writer_thread = WriterThread(max_bytes=queue_bytes)
        for n in order:
            p = graph.payload(n)
            inputs = graph.inputs(n)
            if isinstance(p, Load):
                if n not in streamed.unread:
                    values[n] = reader.take(n, p.nbytes)
                stats.tensors_read += 1
                stats.bytes_read += p.nbytes
            elif n in streamed.applies:
                save = graph.payload(next(iter(graph.successors(n))))
                run_streamed(graph, n, checkpoints, writers[save.output], writer_thread, _advancer(bar))
                stats.ops_run += 1
            elif isinstance(p, Apply):
                # An input whose last use this is leaves `values` now, so that its float32 copy
                # can replace it instead of joining it.
                args = [values[i] for i in inputs]
                for i in set(inputs):
                    if uses[i] == inputs.count(i):
                        values.pop(i)
                values[n] = run_apply(p, args, dev, result_dtypes.get(n, torch.float32))
                stats.ops_run += 1
            elif isinstance(p, Rows):  # a vocabulary alignment
                args = [values[i] for i in inputs]
                values[n] = run_rows(p, args, dev)
            elif n in streamed.copies:
                copy_streamed(graph, n, checkpoints, writers[p.output], writer_thread, _advancer(bar))
                stats.tensors_written += 1
                stats.bytes_written += p.nbytes
            elif isinstance(p, Save) and inputs[0] in streamed.applies:  # written as it was computed
                stats.tensors_written += 1
                stats.bytes_written += p.nbytes
            elif isinstance(p, Save):
                t = values[inputs[0]]  # an adapter's writer casts the factors it unpacks
                t = t if isinstance(writers[p.output], AdapterWriter) else _cast_for_save(t, p, graph.payload(inputs[0]))
                writer_thread.submit(_write_job(writers[p.output], p.tensor, t, bar, p.nbytes), p.nbytes)
                stats.tensors_written += 1
                stats.bytes_written += p.nbytes
            for i in inputs:
                uses[i] -= 1
                if uses[i] == 0:
                    values.pop(i, None)
        writer_thread.finish()
        outputs.finish(stats)
    except BaseException as e:
        if reader is not None:
            reader.close()
        try:
            if writer_thread is not None:
                writer_thread.finish()
        except BaseException:
            pass
        outputs.abort(e)
        raise
    finally:
        if reader is not None:
            reader.close()
        if bar is not None:
            bar.close()
        for ckpt in checkpoints.values():
            ckpt.close()
    if world.size > 1:  # the totals of every rank; also the last barrier, so that no rank ends before the commit
        parts = world.gather((stats.tensors_read, stats.bytes_read, stats.ops_run, stats.tensors_written,
                              stats.bytes_written))
        (stats.tensors_read, stats.bytes_read, stats.ops_run, stats.tensors_written,
         stats.bytes_written) = (sum(x) for x in zip(*parts))
    stats.seconds = time.perf_counter() - start
    return stats


def _needed(graph: Graph, order, saves: set[int]) -> list[int]:
    """The schedule's nodes that the given saves need, in its order (all of them where every save is given)."""
    if len(saves) == len(graph.of_kind(Save)):
        return list(order)
    live = graph.needed(saves)
    return [n for n in order if n in live]


def _cast_for_save(t: torch.Tensor, save: Save, source) -> torch.Tensor:
    """`t` in the save's dtype. A merged float32 result that overflows a float16 save is an error, as it
    is when the operator writes float16 itself (see saved_dtype_results), not a silent Inf."""
    if t.dtype == save.dtype:
        return t
    cast = t.to(dtype=save.dtype.torch)
    if isinstance(source, (Apply, Rows)) and save.dtype == torch.float16 and not all_finite(cast):
        raise MergeRuntimeError(
            f"tensor '{save.tensor}' overflows float16 when saved to {save.output}", source.span,
            "values beyond float16's range (±65504) become Inf: save in bf16 or float32",
        )
    return cast


def _reader(checkpoints, p: Load):
    def read() -> torch.Tensor:
        ckpt = checkpoints[p.checkpoint]
        t = ckpt.read(p.tensor)
        if t.is_floating_point() and not all_finite(t):
            raise CheckpointError(f"{ckpt.tensors[p.tensor].file}: tensor '{p.tensor}' holds NaN or Inf values")
        return t

    return read


def _write_job(writer: ShardedWriter, name: str, t: torch.Tensor, bar, nbytes: int):
    advance = _advancer(bar)

    def job() -> None:
        writer.write(name, t.to("cpu"))
        advance(nbytes, True)

    return job


def _advancer(bar):
    """progress(nbytes, done): moves the progress bar by bytes written, and by one tensor when `done`."""
    def advance(nbytes: int, done: bool) -> None:
        if bar is not None:
            bar.update(nbytes)
            if done:
                bar.tensors_done += 1
                bar.set_postfix_str(f"{bar.tensors_done}/{bar.tensors} tensors", refresh=False)

    return advance


def _progress(graph: Graph, order, enabled: bool) -> Optional[object]:
    if not enabled:
        return None
    from tqdm import tqdm

    saves = [p for p in (graph.payload(n) for n in order) if isinstance(p, Save)]
    bar = tqdm(total=sum(p.nbytes for p in saves), unit="B", unit_scale=True, unit_divisor=1024, desc="merging",
               dynamic_ncols=True)
    bar.tensors = len(saves)
    bar.tensors_done = 0
    return bar
