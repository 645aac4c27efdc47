"""Large tensors merged straight from the input files into their shard, a slice at a time.

An operation (or a copy of an input) that compiler/streaming.py chooses never holds its tensors whole: the operator reads slices of the
inputs from their files (runtime/file_tensor.py) and each slice of the result goes to the writer thread as it is
made. Its peak memory is the slices in flight, whatever the tensor's size; the bytes are those of the whole-tensor
run, which takes the same slices in the same order.
"""
from __future__ import annotations

from typing import Callable

from mgc.core.dtypes import torch_dtype
from mgc.compiler.ir import Apply, Graph, Load, Save

from .apply import all_finite, checked, run_apply_into
from .file_tensor import FileTensor, SliceSink
from .streams import WriterThread
from .writer import ShardedWriter


def run_streamed(graph: Graph, n: int, checkpoints, writer: ShardedWriter, writer_thread: WriterThread,
                 progress: Callable[[int, bool], None]) -> None:
    """Run apply node `n` (one of compiler/streaming.py's `applies`) and write its save, a slice at a time.
    `progress(nbytes, done)` is called on the writer thread as each slice is written (done: the tensor is complete)."""
    p: Apply = graph.payload(n)
    save: Save = graph.payload(next(iter(graph.successors(n))))
    inputs = [_file_tensor(checkpoints, graph.payload(i)) for i in graph.inputs(n)]

    def check(part):
        if not all_finite(part):  # a NaN or Inf in an input, further on, is the error of the whole-tensor run
            for x in inputs:
                x.check_all()
        return checked(p, part)

    _stream(save, writer, writer_thread, progress, lambda sink: run_apply_into(p, list(inputs), sink), check,
            f"{p.op}() on '{p.tensor}'")


def copy_streamed(graph: Graph, n: int, checkpoints, writer: ShardedWriter, writer_thread: WriterThread,
                  progress: Callable[[int, bool], None]) -> None:
    """Write save node `n` (one of compiler/streaming.py's `copies`): its input tensor, cast to the saved dtype a
    slice at a time. As a save of a whole input, the input is checked for NaN and Inf, the cast result is not."""
    source = _file_tensor(checkpoints, graph.payload(graph.inputs(n)[0]))
    save: Save = graph.payload(n)
    _stream(save, writer, writer_thread, progress, lambda sink: sink.copy_(source), lambda part: part,
            f"the copy of '{save.tensor}'")


def _file_tensor(checkpoints, load: Load) -> FileTensor:
    return FileTensor(checkpoints[load.checkpoint], load.tensor, all_finite)


def _stream(save: Save, writer: ShardedWriter, writer_thread: WriterThread, progress, fill, check, what: str) -> None:
    """fill(sink) writes the save's tensor into a SliceSink whose slices go, checked, to the writer thread."""
    stream = writer.stream(save.tensor)

    def emit(part) -> None:
        def job() -> None:
            stream.write(part)
            progress(part.numel() * part.element_size(), False)

        writer_thread.submit(job, part.numel() * part.element_size())

    sink = SliceSink(save.shape, torch_dtype(save.dtype), emit, check)
    fill(sink)
    if not sink.complete:
        raise RuntimeError(f"{what} filled {sink.filled} of {sink.numel()} entries")

    def finish() -> None:
        stream.close()
        progress(0, True)

    writer_thread.submit(finish)
