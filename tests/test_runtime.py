"""The runtime: the sharded writer, checkpoint reading and validation, failures that leave no trace, outputs."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mgc.core.safetensors_header as header_module
from mgc.api import run
from mgc.compiler.ir import Load
from mgc.core.errors import CheckpointError, MergeRuntimeError, MgcError, OutputError
from mgc.core.checkpoint import INDEX_FILE, Checkpoint
from mgc.core.safetensors_header import read_header
from mgc.runtime.writer import ShardedWriter, plan_shards

from conftest import without_provenance
from conftest import load_folder

# ---------------------------------------------------------------- helpers


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def comparable(files: dict[str, bytes]) -> dict[str, bytes]:
    """A snapshot without what records the recipe (its save paths differ between the runs compared): the model
    card, and the provenance in each shard's header (runtime/provenance.py)."""
    return {k: without_provenance(v) if k.endswith(".safetensors") else v for k, v in files.items()
            if Path(k).name != "README.md"}


def leftovers(root: Path) -> list[str]:
    """What the runtime makes beside an output while it runs (none may survive a run)."""
    return [str(p) for p in root.rglob("*") if any(f"mgc-{kind}" in p.name for kind in ("tmp", "old", "owner"))]



def write_recipe(tmp_path: Path, text: str, name: str = "r.merge") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def make_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], num_layers: int = 2) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": num_layers}))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def expect_checkpoint_error(path, *needles, **kw) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(path, **kw)
    text = info.value.render()
    for needle in needles:
        assert str(needle) in text, (needle, text)
    return info.value


# ---------------------------------------------------------------- the writer


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(10, 10, generator=g).to(torch.bfloat16),  # 200 B
        "b.weight": torch.randn(30, generator=g),  # 120 B
        "c.weight": torch.randn(25, 4, generator=g).to(torch.float16),  # 200 B
        "d.ids": torch.arange(7, dtype=torch.int64),  # 56 B
        "e.scalar": torch.tensor(3.5, dtype=torch.float32),  # 4 B
        "f.mask": torch.tensor([True, False, True]),  # 3 B
    }


def _specs(tensors):
    return [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


def test_plan_shards_splits_by_size_in_order():
    specs = [(f"t{i}", (25,), torch.float32) for i in range(7)]  # 100 B each
    shards = plan_shards(specs, 250)
    assert [[s[0] for s in shard] for shard in shards] == [["t0", "t1"], ["t2", "t3"], ["t4", "t5"], ["t6"]]
    assert plan_shards(specs, 300) == [specs[0:3], specs[3:6], specs[6:7]]  # exactly full shards are allowed
    assert plan_shards(specs, 10**9) == [specs]
    assert plan_shards([], 100) == []


def test_plan_shards_big_tensor_gets_its_own_shard():
    specs = [("small0", (10,), torch.float32), ("big", (1000,), torch.float32), ("small1", (10,), torch.float32),
             ("small2", (10,), torch.float32)]
    shards = plan_shards(specs, 100)
    assert [[s[0] for s in shard] for shard in shards] == [["small0"], ["big"], ["small1", "small2"]]
    assert plan_shards(specs[1:2], 100) == [specs[1:2]]


def test_writer_single_file(tmp_path):
    tensors = _tensors()
    w = ShardedWriter(tmp_path, _specs(tensors), 10**6)
    for name in reversed(list(tensors)):  # any order
        w.write(name, tensors[name])
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
    # the header is 8-byte aligned, as the format recommends
    (n,) = struct.unpack("<Q", (tmp_path / "model.safetensors").read_bytes()[:8])
    assert n % 8 == 0


def test_writer_shards_and_index(tmp_path):
    tensors = _tensors()
    w = ShardedWriter(tmp_path, _specs(tensors), 300)
    for name, t in tensors.items():
        w.write(name, t)
    w.close()
    expected_shards = plan_shards(_specs(tensors), 300)
    count = len(expected_shards)
    assert count == 3
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    for k, shard in enumerate(expected_shards, 1):
        fname = f"model-{k:05d}-of-{count:05d}.safetensors"
        with safe_open(str(tmp_path / fname), framework="pt") as f:
            assert sorted(f.keys()) == sorted(s[0] for s in shard)
            for name in f.keys():
                assert index["weight_map"][name] == fname
                assert torch.equal(f.get_tensor(name), tensors[name])
    # and the folder reads back as a checkpoint
    (tmp_path / "config.json").write_text("{}")
    ckpt = Checkpoint.open(tmp_path)
    for name, t in tensors.items():
        assert torch.equal(ckpt.read(name), t)


def test_writer_tensor_larger_than_a_shard(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(10, generator=g), "big": torch.randn(100, generator=g), "c": torch.randn(10, generator=g)}
    w = ShardedWriter(tmp_path, _specs(tensors), 100)
    for name, t in tensors.items():
        w.write(name, t)
    w.close()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    files = index["weight_map"]
    assert len(set(files.values())) == 3
    assert [n for n, f in files.items() if f == files["big"]] == ["big"]
    for f in set(files.values()):
        assert torch.equal(load_file(tmp_path / f)[next(n for n, x in files.items() if x == f)],
                           tensors[next(n for n, x in files.items() if x == f)])


def test_writer_refuses_wrong_tensors_and_missing_ones(tmp_path):
    w = ShardedWriter(tmp_path, [("a", (4,), torch.float32), ("b", (4,), torch.float32)], 10**6)
    with pytest.raises(ValueError):
        w.write("a", torch.zeros(4, dtype=torch.float16))
    with pytest.raises(ValueError):
        w.write("a", torch.zeros(5, dtype=torch.float32))
    w.write("a", torch.zeros(4))
    with pytest.raises(RuntimeError, match="never written"):
        w.close()


# ---------------------------------------------------------------- reading checkpoints


def test_open_reads_headers_only(models, monkeypatch):
    base = models / "base"
    opened: list[tuple[str, int]] = []
    real_open = open

    class Tracked:
        def __init__(self, f):
            self.f, self.n = f, 0

        def read(self, *a):
            data = self.f.read(*a)
            self.n += len(data)
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            opened.append((self.f.name, self.n))
            self.f.close()

    def tracking_open(file, mode="r", *a, **kw):
        return Tracked(real_open(file, mode, *a, **kw))

    def no_data(*a, **kw):
        raise AssertionError("tensor data was read while opening")

    import safetensors
    import safetensors.torch

    monkeypatch.setattr(header_module, "open", tracking_open, raising=False)
    monkeypatch.setattr(safetensors, "safe_open", no_data)
    monkeypatch.setattr(safetensors.torch, "load_file", no_data)
    ckpt = Checkpoint.open(base)
    monkeypatch.undo()

    shards = sorted(base.glob("*.safetensors"))
    assert len(shards) == 2 and ckpt.files == shards
    header_sizes = {str(f): 8 + struct.unpack("<Q", f.read_bytes()[:8])[0] for f in shards}
    assert sorted(opened) == sorted(header_sizes.items())  # exactly the length prefix and the header of each shard
    assert sum(header_sizes.values()) < sum(f.stat().st_size for f in shards) / 10

    index = json.loads((base / INDEX_FILE).read_text())["weight_map"]
    assert set(ckpt.tensors) == set(index)
    for name, info in ckpt.tensors.items():
        assert info.file.name == index[name]
        assert info.dtype == torch.bfloat16
    assert ckpt.tensors["model.embed_tokens.weight"].shape == (512, 64)
    assert ckpt.config["num_hidden_layers"] == 8
    assert not ckpt.pickled
    # data is read on demand, and matches what safetensors reads
    ref = load_folder(base)
    for name in ("lm_head.weight", "model.layers.7.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(ckpt.read(name), ref[name])
    with pytest.raises(CheckpointError, match="no tensor"):
        ckpt.read("nope")


def test_missing_folder(tmp_path):
    expect_checkpoint_error(tmp_path / "nowhere", tmp_path / "nowhere")


def test_path_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    expect_checkpoint_error(tmp_path / "f", tmp_path / "f", "not a folder")


def test_folder_without_config(models):
    folder = models / "code"
    (folder / "config.json").unlink()
    expect_checkpoint_error(folder, folder, "config.json")


def test_config_not_json(models):
    folder = models / "code"
    (folder / "config.json").write_text("{not json")
    expect_checkpoint_error(folder, folder / "config.json")


def test_folder_without_weights(models):
    folder = models / "code"
    (folder / "model.safetensors").unlink()
    expect_checkpoint_error(folder, folder, "no safetensors")


def _pickle_checkpoint(models: Path) -> Path:
    folder = models / "pickled"
    folder.mkdir()
    shutil.copy(models / "base" / "config.json", folder / "config.json")
    torch.save(load_folder(models / "base"), folder / "pytorch_model.bin")
    return folder


def test_pickle_refused_without_allow_pickle(models):
    folder = _pickle_checkpoint(models)
    err = expect_checkpoint_error(folder, folder, "pytorch_model.bin", "--allow-pickle")
    assert "--allow-pickle" in (err.hint or "")


def test_pickle_accepted_with_allow_pickle(models):
    folder = _pickle_checkpoint(models)
    ckpt = Checkpoint.open(folder, allow_pickle=True)
    assert ckpt.pickled
    ref = load_folder(models / "base")
    assert set(ckpt.tensors) == set(ref)
    for name, t in ref.items():
        assert ckpt.tensors[name].shape == tuple(t.shape) and ckpt.tensors[name].dtype == t.dtype
        assert torch.equal(ckpt.read(name), t)


def test_pickle_checkpoint_in_a_recipe(models, tmp_path):
    folder = _pickle_checkpoint(models)
    def recipe(first, out):
        return f'p = model("{first}")\ncode = model("{models / "code"}")\nsave slerp(p, code, t = 0.4) to "{out}"\n'

    text = recipe(folder, tmp_path / "out")
    with pytest.raises(CheckpointError) as info:
        run(tmp_path / "r.merge", text=text, device="cpu")
    assert "--allow-pickle" in info.value.render()
    assert info.value.span is not None and info.value.span.line == 1
    assert not (tmp_path / "out").exists()

    run(tmp_path / "r.merge", text=text, device="cpu", allow_pickle=True)
    run(tmp_path / "r2.merge", text=recipe(models / "base", tmp_path / "ref"), device="cpu")
    assert without_provenance(snapshot(tmp_path / "out")["model.safetensors"]) == \
        without_provenance(snapshot(tmp_path / "ref")["model.safetensors"])


def test_truncated_safetensors(models):
    file = models / "code" / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) * 2 // 3])
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    data_size = len(data) * 2 // 3 - 8 - n
    past_end = {k for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1] > data_size}
    assert past_end
    err = expect_checkpoint_error(models / "code", file, "truncated")
    assert any(f"'{name}'" in err.message for name in past_end), err.message


def test_truncated_inside_header(models):
    file = models / "code" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    expect_checkpoint_error(models / "code", file)


def test_empty_safetensors_file(models):
    file = models / "code" / "model.safetensors"
    file.write_bytes(b"")
    expect_checkpoint_error(models / "code", file)


def test_garbage_safetensors_file(models):
    file = models / "code" / "model.safetensors"
    file.write_bytes(bytes(range(256)) * 64)
    expect_checkpoint_error(models / "code", file)


@pytest.mark.parametrize("raw", [b"\xff\xfe garbage \x00\x01", b"{not json at all}", b"[1, 2, 3]", b"null", b'"text"'])
def test_corrupt_header(models, raw):
    file = models / "code" / "model.safetensors"
    raw = raw + b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(64))
    expect_checkpoint_error(models / "code", file)


def test_header_entry_unreadable(models):
    file = models / "code" / "model.safetensors"
    file.write_bytes(safetensors_bytes({"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)))
    expect_checkpoint_error(models / "code", file, "'w'")


def test_header_size_disagrees_with_dtype_and_shape(models):
    file = models / "code" / "model.safetensors"
    header = {
        "ok": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "bad": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 20]},  # 12 bytes for 16
    }
    file.write_bytes(safetensors_bytes(header, bytes(20)))
    err = expect_checkpoint_error(models / "code", file, "'bad'")
    assert "16" in err.message and "12" in err.message


def test_index_names_missing_shard(models):
    base = models / "base"
    (base / "model-00002-of-00002.safetensors").unlink()
    expect_checkpoint_error(base, base / INDEX_FILE, "model-00002-of-00002.safetensors")


def test_index_lists_tensor_not_stored(models):
    base = models / "base"
    index = json.loads((base / INDEX_FILE).read_text())
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors"
    (base / INDEX_FILE).write_text(json.dumps(index))
    expect_checkpoint_error(base, "model-00001-of-00002.safetensors", "'model.extra.weight'")


def test_bad_checkpoint_in_a_recipe_points_at_the_model_call(models, tmp_path):
    (models / "math" / "model.safetensors").write_bytes(b"\x00" * 4)
    text = f'a = model("{models / "base"}")\nb = model("{models / "math"}")\nsave linear(a, b) to "{tmp_path / "out"}"\n'
    with pytest.raises(CheckpointError) as info:
        run(tmp_path / "r.merge", text=text, device="cpu")
    assert str(models / "math" / "model.safetensors") in info.value.message
    assert info.value.span is not None and info.value.span.line == 2
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_read_header_direct(models):
    infos = read_header(models / "code" / "model.safetensors")
    assert len(infos) == 75
    assert infos["lm_head.weight"].nbytes == 512 * 64 * 2


# ---------------------------------------------------------------- failures while running leave no trace

NAN_TENSOR = "model.layers.3.mlp.up_proj.weight"


def _poison(folder: Path, name: str = NAN_TENSOR) -> Path:
    file = folder / "model.safetensors"
    tensors = load_file(file)
    t = tensors[name].clone()
    t[1, 2] = float("nan")
    tensors[name] = t
    save_file(tensors, str(file), metadata={"format": "pt"})
    return file


def test_nan_in_source_tensor(models, tmp_path):
    file = _poison(models / "code")
    out = tmp_path / "out"
    text = f'a = model("{models / "base"}")\nb = model("{models / "code"}")\nsave linear(a, b) to "{out}"\n'
    with pytest.raises(CheckpointError) as info:
        run(tmp_path / "r.merge", text=text, device="cpu")
    msg = info.value.render()
    assert str(file) in msg and f"'{NAN_TENSOR}'" in msg and "NaN" in msg
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_nan_in_source_tensor_that_is_copied_as_is(models, tmp_path):
    _poison(models / "code")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="NaN"):
        run(tmp_path / "r.merge", text=f'save model("{models / "code"}") to "{out}"\n', device="cpu")
    assert not out.exists() and leftovers(tmp_path) == []


def test_nan_in_a_model_nobody_reads_is_harmless(models, tmp_path):
    _poison(models / "code")
    out = tmp_path / "out"
    text = f'a = model("{models / "base"}")\nb = model("{models / "code"}")\nsave slerp(a, b, t = 0) to "{out}"\n'
    run(tmp_path / "r.merge", text=text, device="cpu")
    assert load_folder(out).keys() == load_folder(models / "base").keys()


def test_op_overflow_in_float32_data(tmp_path):
    names = ["lm_head.weight", "model.layers.0.mlp.weight", "model.layers.1.mlp.weight"]
    a = make_checkpoint(tmp_path / "a", {n: torch.full((4, 4), 3.0) for n in names})
    b = make_checkpoint(tmp_path / "b", {n: torch.full((4, 4), 3.0) for n in names})
    out = tmp_path / "out"
    text = (
        f'a = model("{a}")\n'
        f'b = model("{b}")\n'
        "\n"
        "m = linear(a, b, weights = [1e38, 1e38], normalize = false)\n"
        f'save m to "{out}"\n'
    )
    with pytest.raises(MergeRuntimeError) as info:
        run(tmp_path / "r.merge", text=text, device="cpu")
    err = info.value
    assert "'lm_head.weight'" in err.message  # the first tensor in schedule order
    assert err.span is not None and err.span.line == 4
    assert "r.merge:4:" in err.render()
    assert not out.exists() and leftovers(tmp_path) == []


def test_op_overflow_task_arithmetic_huge_lambda(models, tmp_path):
    out = tmp_path / "out"
    text = (
        f'base = model("{models / "base"}")\n'
        f'code = model("{models / "code"}")\n'
        "tv = task_arithmetic(code, base = base,\n"
        "                     lambda = 1e300)\n"
        f'save tv to "{out}"\n'
    )
    with pytest.raises(MergeRuntimeError) as info:
        run(tmp_path / "r.merge", text=text, device="cpu")
    err = info.value
    assert "task_arithmetic" in err.message and "'lm_head.weight'" in err.message
    assert err.span.line == 3 and "r.merge:3:" in err.render()
    assert not out.exists() and leftovers(tmp_path) == []


def _failing_recipe(models: Path, out: Path) -> str:
    return (
        f'base = model("{models / "base"}")\n'
        f'code = model("{models / "code"}")\n'
        f'save task_arithmetic(code, base = base, lambda = 1e300) to "{out}"\n'
    )


def _existing_output(out: Path) -> dict[str, bytes]:
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    (out / "model.safetensors").write_bytes(b"old weights")
    (out / "sub").mkdir()
    (out / "sub" / "x.bin").write_bytes(os.urandom(64))
    return snapshot(out)


def test_failure_leaves_existing_output_untouched(models, tmp_path):
    out = tmp_path / "out"
    before = _existing_output(out)
    with pytest.raises(MergeRuntimeError):
        run(tmp_path / "r.merge", text=_failing_recipe(models, out), device="cpu", force=True)
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_checkpoint_failure_leaves_existing_output_untouched(models, tmp_path):
    _poison(models / "code")
    out = tmp_path / "out"
    before = _existing_output(out)
    text = f'a = model("{models / "base"}")\nb = model("{models / "code"}")\nsave linear(a, b) to "{out}"\n'
    with pytest.raises(CheckpointError):
        run(tmp_path / "r.merge", text=text, device="cpu", force=True)
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_failure_with_several_outputs_leaves_none(models, tmp_path):
    out = tmp_path / "outs"
    text = (
        f'base = model("{models / "base"}")\n'
        f'code = model("{models / "code"}")\n'
        f'save base to "{tmp_path / "elsewhere" / "one"}"\n'
        f'save task_arithmetic(code, base = base, lambda = 1e300) to "{tmp_path / "elsewhere" / "two"}"\n'
    )
    with pytest.raises(MergeRuntimeError):
        run(tmp_path / "r.merge", text=text, device="cpu", output=out)
    assert not (out / "one").exists() and not (out / "two").exists()
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "elsewhere").exists()
    # `output=` names the folder the run writes: a failed run must not leave it behind either
    assert not out.exists()


def test_existing_output_refused_without_force(models, tmp_path):
    out = tmp_path / "out"
    before = _existing_output(out)
    text = f'save model("{models / "code"}") to "{out}"\n'
    with pytest.raises(OutputError) as info:
        run(tmp_path / "r.merge", text=text, device="cpu")
    assert "--force" in info.value.render()
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_existing_output_replaced_with_force(models, tmp_path):
    out = tmp_path / "out"
    _existing_output(out)
    text = f'save model("{models / "code"}") to "{out}"\n'
    run(tmp_path / "r.merge", text=text, device="cpu", force=True)
    files = sorted(p.name for p in out.iterdir())
    assert "notes.txt" not in files and "sub" not in files
    ref = load_folder(models / "code")
    got = load_folder(out)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert leftovers(tmp_path) == []


def test_existing_empty_output_folder_is_used(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    run(tmp_path / "r.merge", text=f'save model("{models / "code"}") to "{out}"\n', device="cpu")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_output_that_is_a_file_is_refused(models, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    with pytest.raises(OutputError):
        run(tmp_path / "r.merge", text=f'save model("{models / "code"}") to "{out}"\n', device="cpu", force=True)
    assert out.read_text() == "a file"


@pytest.mark.parametrize("device", ["tpu9", "cuda"])
def test_bad_device(models, tmp_path, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "out"
    with pytest.raises(MgcError):
        run(tmp_path / "r.merge", text=f'save model("{models / "code"}") to "{out}"\n', device=device)
    assert not out.exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------- devices and determinism

MIX = """
base  = model("{m}/base")
code  = model("{m}/code")
math  = model("{m}/math")
prose = model("{m}/prose")
experts = karcher(code, math, prose, weights = [2, 1, 1])
merged  = slerp(base, experts, t = ramp(0.3, 0.7))
save merged to "{o}/a" {{ dtype = bf16 }}
save ties(code, math, prose, base = base, density = 0.5) to "{o}/b" {{ dtype = fp32, shard = "500KB" }}
save task_arithmetic(code, math, base = base, weights = [0.7, 0.3]) to "{o}/c"
"""


def test_cpu_runs_and_is_deterministic(models, tmp_path):
    plan1, stats1 = run(tmp_path / "r.merge", text=MIX.format(m=models, o=tmp_path / "run1"), device="cpu")
    plan2, stats2 = run(tmp_path / "r.merge", text=MIX.format(m=models, o=tmp_path / "run2"), device="cpu")
    s1, s2 = comparable(snapshot(tmp_path / "run1")), comparable(snapshot(tmp_path / "run2"))
    assert s1.keys() == s2.keys()
    assert {k.split("/")[0] for k in s1} == {"a", "b", "c"}
    assert s1 == s2
    assert stats1.tensors_written == 3 * 75 == stats2.tensors_written
    assert stats1.tensors_read == len(plan1.graph.of_kind(Load)) == stats2.tensors_read
    # dtype options are honoured
    assert all(t.dtype == torch.bfloat16 for t in load_folder(tmp_path / "run1" / "a").values())
    assert all(t.dtype == torch.float32 for t in load_folder(tmp_path / "run1" / "b").values())
    assert all(t.dtype == torch.bfloat16 for t in load_folder(tmp_path / "run1" / "c").values())
    assert json.loads((tmp_path / "run1" / "b" / "config.json").read_text())["torch_dtype"] == "float32"
    assert len(list((tmp_path / "run1" / "b").glob("*.safetensors"))) > 1
    assert leftovers(tmp_path) == []
