"""Large tensors merged straight from the input files into their shard, a slice at a time.

An operation that compiler/streaming.py chooses never holds its tensors whole: the operator reads slices of the
inputs from their files (runtime/file_tensor.py) and each slice of the result goes to the writer thread as it is
made. Its peak memory is the slices in flight, whatever the tensor's size; the bytes are those of the whole-tensor
run, which takes the same slices in the same order.
"""
from __future__ import annotations

from typing import Callable

from mgc.core.dtypes import torch_dtype
from mgc.compiler.ir import Apply, Graph, Save

from .apply import all_finite, checked, run_apply_into
from .file_tensor import FileTensor, SliceSink
from .streams import WriterThread
from .writer import ShardedWriter


def run_streamed(graph: Graph, n: int, checkpoints, writer: ShardedWriter, writer_thread: WriterThread,
                 progress: Callable[[int, bool], None]) -> None:
    """Run apply node `n` (one of compiler/streaming.py's streamed_applies) and write its save, a slice at a time. `progress(nbytes, done)`
    is called on the writer thread as each slice is written (done: the tensor is complete)."""
    p: Apply = graph.payload(n)
    save: Save = graph.payload(next(iter(graph.successors(n))))
    inputs = [FileTensor(checkpoints[x.checkpoint], x.tensor, all_finite) for x in map(graph.payload, graph.inputs(n))]
    stream = writer.stream(save.tensor)

    def emit(part) -> None:
        def job() -> None:
            stream.write(part)
            progress(part.numel() * part.element_size(), False)

        writer_thread.submit(job, part.numel() * part.element_size())

    sink = SliceSink(save.shape, torch_dtype(save.dtype), emit, lambda part: checked(p, part))
    run_apply_into(p, inputs, sink)
    if not sink.complete:
        raise RuntimeError(f"{p.op}() filled {sink.filled} of {sink.numel()} entries of '{p.tensor}'")

    def finish() -> None:
        stream.close()
        progress(0, True)

    writer_thread.submit(finish)
