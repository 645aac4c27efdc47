"""The reader and writer threads, and the memory cap."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from mgc.api import compile_recipe
from mgc.core.errors import MergeRuntimeError
from mgc.runtime.execute import execute
from mgc.runtime.streams import Prefetcher, WriterThread

ROOT = Path(__file__).parents[1]


def test_prefetcher_stays_within_its_budget_and_keeps_order():
    held = []
    lock = threading.Lock()
    p = None

    def reader(i):
        def read():
            with lock:
                held.append(p.held if p is not None else 0)
            return torch.full((10,), float(i))

        return read

    items = [(i, 40, reader(i)) for i in range(20)]
    p = Prefetcher(items, budget=100)
    got = [p.take(i, 40)[0].item() for i in range(20)]
    p.close()
    assert got == [float(i) for i in range(20)]
    assert max(held) <= 100  # never a third 40-byte tensor on top of two held ones


def test_prefetcher_hands_its_error_to_the_consumer():
    def boom():
        raise ValueError("disk on fire")

    p = Prefetcher([(0, 1, lambda: torch.zeros(1)), (1, 1, boom)], budget=10)
    assert p.take(0, 1).shape == (1,)
    with pytest.raises(ValueError, match="disk on fire"):
        p.take(1, 1)
    p.close()


def test_writer_thread_runs_jobs_in_order_and_reports_errors():
    done = []
    w = WriterThread(max_bytes=2)
    for i in range(10):
        w.submit(lambda i=i: done.append(i), 1)
    w.finish()
    assert done == list(range(10))

    w = WriterThread()
    w.submit(lambda: (_ for _ in ()).throw(OSError("no space left")))
    with pytest.raises(OSError, match="no space"):
        w.finish()


def test_max_memory_below_the_plan_estimate_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    plan = compile_recipe(ROOT / "examples" / "quickstart.merge", output=tmp_path / "q")
    with pytest.raises(MergeRuntimeError, match="max-memory"):
        execute(plan, device="cpu", progress=False, max_memory=plan.peak_memory() - 1)
    assert not (tmp_path / "q").exists()
    execute(plan, device="cpu", progress=False, max_memory=plan.peak_memory())
    assert (tmp_path / "q" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "passthrough"])
def test_elementwise_ops_on_large_tensors_run_in_slices_with_the_same_bytes(name, monkeypatch):
    from mgc.compiler.ir import Apply
    from mgc.runtime import apply as ex
    from mgc.stdlib import OPERATORS

    monkeypatch.setattr(ex, "ELEMENTWISE_SLICE", 1000)  # 10 slices, the last one partial
    g = torch.Generator().manual_seed(0)
    n = 9_500
    xs = [torch.randn(n, generator=g).bfloat16() for _ in range(1 if name == "passthrough" else 3)]
    params = OPERATORS[name].params(**({"scale": 0.5} if name == "passthrough" else {"weights": [1.0, 2.5]}
                                       if name == "task_arithmetic" else {"weights": [1.0, 2.0, 3.0]}))
    p = Apply(name, params, name == "task_arithmetic", "t", (95, 100))
    shaped = [x.reshape(95, 100) for x in xs]
    sliced = ex.run_apply(p, list(shaped), torch.device("cpu"))
    whole = ex._apply_whole(OPERATORS[name], p, list(shaped), torch.device("cpu"))
    assert sliced.shape == (95, 100)
    assert torch.equal(sliced, whole)
