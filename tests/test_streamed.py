"""Large tensors merged straight from the files into their shard, a slice at a time (runtime/streamed.py,
runtime/file_tensor.py): the bytes are the whole-tensor run's, no input is read whole, and errors, resume and ranks
behave as in the whole-tensor run. MGC_STREAM_BYTES=0 streams every tensor of the small example models."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mgc.runtime.apply as apply_module
import mgc.runtime.file_tensor as file_tensor
import mgc.runtime.streamed as streamed
import mgc.stdlib.slices as slices
from mgc.api import run
from mgc.core.checkpoint import Checkpoint
from mgc.core.errors import CheckpointError, MergeRuntimeError

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"
SLICE = 4096  # entries: every tensor of the example models takes several slices

OPS = {
    "linear": "linear(b, c, weights = [0.3, 0.7])",
    "slerp": "slerp(b, c, t = 0.4)",
    "ties": "ties(b, c, base = a, density = 0.5, weights = [0.6, 0.4])",
    "karcher": "karcher(a, b, c, weights = [1, 2, 3])",
    "task_arithmetic": "task_arithmetic(b, c, base = a, weights = [0.5, 0.8])",  # runs="slices"
    "ties_by_layer": "ties(b, c, base = a, density = [0.2, 0.9])",
}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def recipe(tmp_path: Path, expr: str, options: str = "") -> Path:
    models = "\n".join(f'{v} = model("{MODELS / n}")' for v, n in (("a", "base"), ("b", "code"), ("c", "math")))
    path = tmp_path / "r.merge"
    path.write_text(f'{models}\nsave {expr} to "{tmp_path / "out"}"{options}\n')
    return path


@pytest.fixture
def small_slices(monkeypatch):
    monkeypatch.setattr(slices, "SLICE", SLICE)
    monkeypatch.setattr(apply_module, "ELEMENTWISE_SLICE", SLICE)
    monkeypatch.setattr(file_tensor, "SINK_SLICE", SLICE)


class Watch:
    """Counts the streamed operations, and records the size of every read of a streamed input."""

    def __init__(self, monkeypatch):
        self.ops, self.copies, self.reads, self.whole = 0, 0, [], 0
        original_run, original_copy = streamed.run_streamed, streamed.copy_streamed
        original_read = file_tensor.FileTensor._read

        def run_streamed(*args, **kw):
            self.ops += 1
            return original_run(*args, **kw)

        def copy_streamed(*args, **kw):
            self.copies += 1
            return original_copy(*args, **kw)

        def read(ft, start, stop):
            self.reads.append(stop - start)
            return original_read(ft, start, stop)

        def whole(ft):
            self.whole += 1
            raise AssertionError(f"{ft} was read whole")

        monkeypatch.setattr(streamed, "run_streamed", run_streamed)
        monkeypatch.setattr(file_tensor.FileTensor, "_read", read)
        monkeypatch.setattr(file_tensor.FileTensor, "read", whole)
        import mgc.runtime.execute as execute_module
        monkeypatch.setattr(execute_module, "run_streamed", run_streamed)
        monkeypatch.setattr(execute_module, "copy_streamed", copy_streamed)


@pytest.mark.parametrize("dtype", ["", ' { dtype = fp16, shard = "200KB" }', " { dtype = fp32 }"])
@pytest.mark.parametrize("op", list(OPS))
def test_a_streamed_merge_writes_the_bytes_of_the_whole_tensor_merge(tmp_path, monkeypatch, small_slices, op, dtype):
    path = recipe(tmp_path, OPS[op], dtype)
    plan, _ = run(path, device="cpu")
    whole = snapshot(tmp_path / "out")
    applies = sum(1 for n in plan.graph.nodes if type(plan.graph.payload(n)).__name__ == "Apply")
    assert applies > 20

    watch = Watch(monkeypatch)
    monkeypatch.setenv("MGC_STREAM_BYTES", "0")
    run(path, device="cpu", force=True)
    assert snapshot(tmp_path / "out") == whole
    assert watch.ops == applies  # every operation streamed,
    assert watch.whole == 0  # no input was read whole,
    assert watch.reads and max(watch.reads) <= SLICE  # and every read was at most a slice


def test_only_large_tensors_stream_by_default(tmp_path, monkeypatch, small_slices):
    watch = Watch(monkeypatch)
    run(recipe(tmp_path, OPS["linear"]), device="cpu")
    assert watch.ops == 0
    monkeypatch.setenv("MGC_STREAM_BYTES", str(200_000))  # the embeddings and MLP weights, not the norms
    plan, _ = run(recipe(tmp_path, OPS["linear"]), device="cpu", force=True)
    assert 0 < watch.ops < len(plan.graph.nodes) / 3


def test_operators_that_do_not_stream_read_whole(tmp_path, monkeypatch):
    """dare draws random numbers over the whole tensor; karcher with Fisher weights needs dense units; ties with
    rescale needs whole trimmed task vectors."""
    watch = Watch(monkeypatch)
    monkeypatch.setenv("MGC_STREAM_BYTES", "0")
    run(recipe(tmp_path, "dare_ties(b, c, base = a, density = 0.5, seed = 3)"), device="cpu")
    run(recipe(tmp_path, "ties(b, c, base = a, density = 0.5, rescale = true)"), device="cpu", force=True)
    assert watch.ops == 0


def errors_whole_and_streamed(path: Path, monkeypatch, kind: type) -> tuple[Exception, Exception]:
    """The error (of `kind`) of a run of `path` reading whole, then of one streaming every tensor."""
    errors = []
    for threshold in (str(1 << 40), "0"):
        monkeypatch.setenv("MGC_STREAM_BYTES", threshold)
        with pytest.raises(kind) as e:
            run(path, device="cpu")
        errors.append(e.value)
    return errors[0], errors[1]


@pytest.mark.parametrize("overflow", [False, True])
def test_a_nan_in_a_streamed_input_names_the_file_and_tensor(tmp_path, monkeypatch, small_slices, overflow):
    """Also where an earlier slice of the result overflows the fp16 save: the input's NaN is the error, as in the
    whole-tensor run, which checks each input as it reads it."""
    bad = tmp_path / "models" / "code"
    shutil.copytree(MODELS / "code", bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith("mlp.up_proj.weight"))
    tensors[name].view(-1)[-1] = float("nan")
    if overflow:
        tensors[name].view(-1)[:10] = 2e5  # (a + b) / 2 beyond float16 (65504), in the first slice
    save_file(tensors, shard, metadata={"format": "pt"})
    path = tmp_path / "r.merge"
    path.write_text(f'a = model("{MODELS / "base"}")\nb = model("{bad}")\nsave linear(a, b) to "{tmp_path / "out"}" '
                    '{ dtype = fp16 }\n')
    whole, e = errors_whole_and_streamed(path, monkeypatch, CheckpointError)
    assert str(e) == str(whole)
    assert str(shard) in str(e) and f"'{name}'" in str(e) and "NaN or Inf" in str(e)
    assert not (tmp_path / "out").exists()


def test_an_overflowing_slice_is_the_error_of_the_whole_tensor_run(tmp_path, monkeypatch):
    path = recipe(tmp_path, "linear(b, c, weights = [3000000, 3000000], normalize = false)", " { dtype = fp16 }")
    whole, streamed_error = errors_whole_and_streamed(path, monkeypatch, MergeRuntimeError)
    assert str(streamed_error) == str(whole)
    assert "NaN or Inf" in str(whole) and "float16" in str(whole)
    assert not (tmp_path / "out").exists()


def test_a_killed_streamed_run_resumes_to_the_same_bytes(tmp_path):
    path = recipe(tmp_path, OPS["ties"], ' { shard = "200KB" }')
    env = {**os.environ, "MGC_JOURNAL_BYTES": "0", "MGC_STREAM_BYTES": "0"}

    def mgc_run(**extra):
        return subprocess.run([sys.executable, "-m", "mgc", "run", "-q", "--device", "cpu", str(path)],
                              env={**env, **extra}, capture_output=True, text=True, timeout=120)

    assert mgc_run().returncode == 0
    whole = snapshot(tmp_path / "out")
    shutil.rmtree(tmp_path / "out")
    killed = mgc_run(MGC_TEST_KILL_AFTER="40")
    assert killed.returncode == -9, killed.stderr
    resumed = subprocess.run([sys.executable, "-m", "mgc", "run", "--device", "cpu", str(path)], env=env,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout + resumed.stderr
    assert snapshot(tmp_path / "out") == whole


def test_read_flat_reads_any_range_of_a_tensor():
    ckpt = Checkpoint.open(MODELS / "code")
    name = next(n for n in ckpt.tensors if n.endswith("mlp.down_proj.weight"))
    whole = ckpt.read(name).reshape(-1)
    for a, b in [(0, 1), (5, 4099), (whole.numel() - 3, whole.numel()), (0, whole.numel())]:
        assert torch.equal(ckpt.read_flat(name, a, b), whole[a:b])
    ckpt.close()


def test_the_plan_estimate_of_a_streamed_merge_is_its_slices_in_flight(tmp_path, monkeypatch):
    from mgc.api import compile_recipe
    from mgc.compiler.ir import Apply
    from mgc.stdlib import RUNNABLE

    path = recipe(tmp_path, OPS["karcher"])
    whole = compile_recipe(path).peak_memory()
    monkeypatch.setenv("MGC_STREAM_BYTES", "0")
    plan = compile_recipe(path)
    g = plan.graph
    applies = [(n, g.payload(n)) for n in g.nodes if isinstance(g.payload(n), Apply)]
    slices_in_flight = max(RUNNABLE[p.op].transient(math.prod(p.shape), len(g.inputs(n)), False) for n, p in applies)
    assert plan.peak_memory() == slices_in_flight < whole
    assert plan.peak_memory("cuda") == whole  # on a GPU nothing streams


def test_a_file_tensor_used_as_a_tensor_is_read_whole_and_gives_the_tensors_answer():
    """An operator that does more than slice gets the right numbers (at the cost of reading whole)."""
    ckpt = Checkpoint.open(MODELS / "code")
    name = next(n for n in ckpt.tensors if n.endswith("mlp.down_proj.weight"))
    whole = ckpt.read(name)
    ft = file_tensor.FileTensor(ckpt, name, lambda t: True)
    assert ft.shape == whole.shape and ft.dtype == whole.dtype and ft.numel() == whole.numel()
    assert torch.equal(ft.float(), whole.float())
    assert torch.equal(torch.add(ft, 1), whole + 1)
    assert torch.equal(torch.stack([ft, ft]), torch.stack([whole, whole]))
    assert torch.equal(ft.reshape(whole.shape[1], -1), whole.reshape(whole.shape[1], -1))
    assert torch.equal(ft.reshape(-1)[3:700], whole.reshape(-1)[3:700]) and ft.whole_reads == 5
    assert torch.equal(ft[1], whole[1])
    ckpt.close()


@pytest.mark.parametrize("options", ["", " { dtype = fp32 }"])
def test_a_kept_input_tensor_is_copied_a_slice_at_a_time(tmp_path, monkeypatch, small_slices, options):
    """slerp at t = 0 and t = 1 keeps one input's tensor: saved from its file slice by slice (cast to fp32 when asked),
    with the bytes of the whole-tensor copy."""
    path = recipe(tmp_path, "slerp(a, b, t = [0, 0.5, 1])", options)
    plan, _ = run(path, device="cpu")
    whole = snapshot(tmp_path / "out")
    kept = sum(1 for n in plan.graph.nodes if type(plan.graph.payload(n)).__name__ == "Save"
               and type(plan.graph.payload(plan.graph.inputs(n)[0])).__name__ == "Load")
    assert kept > 10

    watch = Watch(monkeypatch)
    monkeypatch.setenv("MGC_STREAM_BYTES", "0")
    run(path, device="cpu", force=True)
    assert snapshot(tmp_path / "out") == whole
    assert watch.copies == kept and watch.ops > 0 and watch.whole == 0
    assert max(watch.reads) <= SLICE


def test_without_positioned_reads_ranges_read_the_same(monkeypatch):
    """Where os.preadv is missing (Windows), a range is read with a seek and a read under a lock."""
    ckpt = Checkpoint.open(MODELS / "code")
    name = next(n for n in ckpt.tensors if n.endswith("mlp.down_proj.weight"))
    want = [ckpt.read(name), ckpt.read_flat(name, 5, 4099)]
    monkeypatch.delattr(os, "preadv")
    got = [ckpt.read(name), ckpt.read_flat(name, 5, 4099)]
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    ckpt.close()
