"""Corrupt or hostile checkpoints: every problem is a CheckpointError naming the file (and tensor), never a
traceback and never bytes read as a tensor that are not that tensor's. The safetensors header is checked as
strictly as the safetensors library checks it (tensors sorted by offset tile the data region exactly)."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mgc.core.errors import CheckpointError, Source, Span
from mgc.core.checkpoint import INDEX_FILE, Checkpoint
from mgc.core.paths import resolve_checkpoint_path

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"

# ---------------------------------------------------------------- helpers

# A small valid header: three tensors tiling 8 + 16 + 6 = 30 data bytes, and metadata.
VALID = {
    "__metadata__": {"format": "pt"},
    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    "b": {"dtype": "F16", "shape": [2, 4], "data_offsets": [8, 24]},
    "c": {"dtype": "U8", "shape": [6], "data_offsets": [24, 30]},
}
DATA = bytes(range(30))


def st_bytes(header: dict | str | bytes, data: bytes = DATA, pad: bool = True) -> bytes:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def folder_with(tmp_path: Path, content: bytes, name: str = "m") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    (folder / "model.safetensors").write_bytes(content)
    return folder


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def refused(folder: Path, *needles: str, **kw) -> CheckpointError:
    """Checkpoint.open(folder) raises a CheckpointError whose text holds every needle."""
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(folder, **kw)
    text = info.value.render()
    for needle in needles:
        assert needle in text, (needle, text)
    return info.value


def test_valid_header_round_trip(tmp_path):
    ckpt = Checkpoint.open(folder_with(tmp_path, st_bytes(VALID)))
    assert list(ckpt.tensors) == ["a", "b", "c"]
    assert ckpt.read("c").tolist() == list(range(24, 30))
    assert ckpt.read("b").shape == (2, 4)


# ---------------------------------------------------------------- the safetensors header

OFFSET_CASES = {
    # today's bug: begin -8 made the tensor the last 8 bytes of the header's JSON
    "negative offsets": ({"w": entry(offsets=(-8, 0))}, bytes(8), ["'w'", "non-negative"]),
    "overlap": ({"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}, bytes(12), ["'b'", "overlaps", "'a'"]),
    "hole": ({"a": entry(offsets=(0, 8)), "b": entry(offsets=(16, 24))}, bytes(24), ["'b'", "belong to no tensor"]),
    "hole at the start": ({"a": entry(offsets=(8, 16))}, bytes(16), ["'a'", "belong to no tensor"]),
    "bytes after the last tensor": ({"a": entry(offsets=(0, 8))}, bytes(16), ["data bytes 8..16 belong to no tensor"]),
    "begin after end": ({"w": entry(shape=(0,), offsets=(8, 0))}, bytes(8), ["'w'", "end before they begin"]),
    "same bytes twice": ({"a": entry(offsets=(0, 8)), "b": entry(offsets=(0, 8))}, bytes(8), ["overlaps"]),
}


@pytest.mark.parametrize("case", OFFSET_CASES)
def test_offsets_must_tile_the_data_exactly(tmp_path, case):
    header, data, needles = OFFSET_CASES[case]
    folder = folder_with(tmp_path, st_bytes(header, data))
    refused(folder, str(folder / "model.safetensors"), *needles)


def test_zero_size_tensors_may_share_an_offset(tmp_path):
    header = {"e": entry(shape=(0, 3), offsets=(8, 8)), "a": entry(offsets=(0, 8)), "z": entry(shape=(0,), offsets=(0, 0))}
    ckpt = Checkpoint.open(folder_with(tmp_path, st_bytes(header, bytes(8))))
    assert ckpt.read("e").shape == (0, 3) and ckpt.read("z").shape == (0,) and ckpt.read("a").tolist() == [0, 0]


ENTRY_CASES = {
    "negative dimensions": ('{"w": {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}}', "shape"),
    "Infinity in a shape": ('{"w": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 8]}}', "Infinity"),
    "NaN in offsets": ('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [NaN, 8]}}', "NaN"),
    "-Infinity in offsets": ('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, -Infinity]}}', "Infinity"),
    "a float in a shape": ('{"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}', "shape"),
    "a fraction in a shape": ('{"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}', "shape"),
    "a boolean in a shape": ('{"w": {"dtype": "F32", "shape": [true, 2], "data_offsets": [0, 8]}}', "shape"),
    "a boolean in offsets": ('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [false, 8]}}', "data_offsets"),
    "a string in a shape": ('{"w": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}', "shape"),
    "a float offset": ('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}}', "data_offsets"),
    "three offsets": ('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}', "data_offsets"),
    "a 5000-digit offset": ('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, ' + "9" * 5000 + "]}}", "JSON"),
    "an unknown dtype": ('{"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}', "dtype"),
    "a dtype that is a list": ('{"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}', "dtype"),
    "a missing field": ('{"w": {"dtype": "F32", "shape": [2]}}', "data_offsets"),
    "an entry that is a list": ('{"w": [1, 2]}', "not an object"),
    "a duplicate tensor": (
        '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
        ' "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "twice"),
    "a duplicate field": ('{"w": {"dtype": "F32", "dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}', "twice"),
    "__metadata__ of numbers": ('{"__metadata__": {"a": 1}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
                                "__metadata__"),
    "__metadata__ a list": ('{"__metadata__": ["a"], "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
                            "__metadata__"),
    "__metadata__ null": ('{"__metadata__": null, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
                          "__metadata__"),
}


@pytest.mark.parametrize("case", ENTRY_CASES)
def test_header_entries_are_checked_strictly(tmp_path, case):
    text, needle = ENTRY_CASES[case]
    folder = folder_with(tmp_path, st_bytes(text, bytes(8)))
    refused(folder, str(folder / "model.safetensors"), needle)


def test_header_nested_100000_deep(tmp_path):
    text = '{"w": ' + "[" * 100_000 + "]" * 100_000 + "}"
    folder = folder_with(tmp_path, st_bytes(text, b""))
    refused(folder, str(folder / "model.safetensors"), "nested too deeply")


@pytest.mark.parametrize("raw, needle", [
    (b'{"w\xff": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "not UTF-8"),
    # Python's json.loads(bytes) would detect UTF-16 and accept it; safetensors requires UTF-8
    (json.dumps({"w": entry()}).encode("utf-16"), "not UTF-8"),
    (json.dumps({"w": entry()}).encode("utf-16-le"), "not valid JSON"),  # valid UTF-8: '{', NUL, '"', NUL...
    (b"", "size is 0"),
    (b' {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "does not start with '{'"),
    (b'[{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}]', "does not start with '{'"),
])
def test_header_bytes(tmp_path, raw, needle):
    folder = folder_with(tmp_path, st_bytes(raw, bytes(8), pad=False))
    refused(folder, str(folder / "model.safetensors"), needle)


def test_shape_whose_element_count_overflows(tmp_path):
    """[2**40, 2**40, 0] holds no elements, but its running product overflows int64, as safetensors checks it."""
    header = {"w": entry(shape=(2**40, 2**40, 0), offsets=(0, 0)), "a": entry(offsets=(0, 8))}
    folder = folder_with(tmp_path, st_bytes(header, bytes(8)))
    refused(folder, "'w'", "overflows")


def test_file_truncated_after_opening(tmp_path):
    folder = folder_with(tmp_path, st_bytes(VALID))
    ckpt = Checkpoint.open(folder)
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="cut short") as info:
        ckpt.read("c")
    assert str(file) in info.value.message and "'c'" in info.value.message
    file.unlink()
    ckpt.close()
    with pytest.raises(CheckpointError, match="'a'"):
        ckpt.read("a")


def test_short_reads_are_continued(tmp_path, monkeypatch):
    """read(2) returns at most ~2 GiB on Linux, so a big tensor's bytes come in several reads (simulated)."""
    import mgc.core.checkpoint as checkpoint_module

    class Trickle:
        def __init__(self, f):
            self.f = f

        def readinto(self, view):
            return self.f.readinto(view[:3])

        def __getattr__(self, name):
            return getattr(self.f, name)

    ckpt = Checkpoint.open(folder_with(tmp_path, st_bytes(VALID)))
    monkeypatch.setattr(checkpoint_module, "open", lambda *a, **kw: Trickle(open(*a, **kw)), raising=False)
    assert ckpt.read("b").view(torch.uint8).flatten().tolist() == list(range(8, 24))
    ckpt.close()


def test_a_fifo_in_place_of_a_shard_is_refused_without_blocking(tmp_path):
    folder = folder_with(tmp_path, b"")
    file = folder / "model.safetensors"
    file.unlink()
    os.mkfifo(file)

    def hang(*_):
        raise RuntimeError("Checkpoint.open blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(5)
    try:
        refused(folder, str(file), "not a regular file")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- mutations of a valid header

def _mutations(rng: random.Random):
    """Damaged files: bytes flipped in the header JSON, JSON values replaced, data lengths changed."""
    text = json.dumps(VALID)
    values = [-1, -8, 0, 1, 7, 8, 24, 30, 31, 2**31, 2**63, 2**64, -2**63, 1.5, 8.0, True, False, None, "", "8",
              "F32", "F99", [], [8], [0, 8], [8, 0], [-8, 0], [0, 8, 16], {}, {"a": "b"}, {"a": 1}, [[1]], "\u00e9"]
    names = ["a", "b", "c", "__metadata__"]
    fields = ["dtype", "shape", "data_offsets"]
    for i in range(600):
        kind = i % 4
        if kind == 0:
            raw = bytearray(text.encode())
            for _ in range(rng.randint(1, 3)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            yield bytes(raw), DATA
        elif kind == 1:
            header = json.loads(text)
            name = rng.choice(names)
            if name == "__metadata__" or rng.random() < 0.2:
                header[name] = rng.choice(values)
            else:
                target = header[name]
                field = rng.choice(fields)
                value = rng.choice(values)
                if field != "dtype" and rng.random() < 0.5:  # one element of the list
                    target[field] = list(target[field]) or [0]
                    target[field][rng.randrange(len(target[field]))] = value
                else:
                    target[field] = value
            yield json.dumps(header).encode(), DATA
        elif kind == 2:
            cut = rng.randrange(len(DATA) + 8)
            yield text.encode(), (DATA + bytes(8))[:cut]
        else:
            raw = text.encode()
            tokens = ["[", "]", "{", "}", ",", ":", '"', "-", "0", "Infinity", "NaN", "true", "\\", "\x00", "1e400"]
            pos = rng.randrange(len(raw))
            yield raw[:pos] + rng.choice(tokens).encode() + raw[pos:], DATA


def test_mutated_headers_give_only_checkpoint_errors(tmp_path):
    rng = random.Random(1234)
    folder = folder_with(tmp_path, b"")
    file = folder / "model.safetensors"
    opened = refused_count = 0
    for raw, data in _mutations(rng):
        for pad in (True, False):
            content = st_bytes(raw, data, pad=pad)
            file.write_bytes(content)
            try:
                ckpt = Checkpoint.open(folder)
            except CheckpointError as err:
                assert str(file) in err.message, err.message
                refused_count += 1
                continue
            opened += 1
            # accepted: every tensor lies inside the data region, and they share no byte
            (n,) = struct.unpack("<Q", content[:8])
            start, extents = 8 + n, []
            for name, info in ckpt.tensors.items():
                assert start <= info.offset and info.offset + info.nbytes <= len(content), (name, raw)
                extents.append((info.offset, info.offset + info.nbytes))
                t = ckpt.read(name)
                assert t.dtype == info.dtype and tuple(t.shape) == info.shape
            extents.sort()
            assert all(a[1] <= b[0] for a, b in zip(extents, extents[1:])), raw
            ckpt.close()
    assert opened and refused_count > opened  # the loop exercised both outcomes


# ---------------------------------------------------------------- config.json

def test_config_nested_100000_deep(tmp_path):
    folder = folder_with(tmp_path, st_bytes(VALID))
    (folder / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(folder, str(folder / "config.json"), "nested too deeply")


@pytest.mark.parametrize("raw", [b'{"model_type": "ll\xe9ma"}', '{"model_type": "llama"}'.encode("utf-16")])
def test_config_not_utf8(tmp_path, raw):
    folder = folder_with(tmp_path, st_bytes(VALID))
    (folder / "config.json").write_bytes(raw)
    refused(folder, str(folder / "config.json"), "not UTF-8")


# ---------------------------------------------------------------- the index

@pytest.fixture
def sharded(tmp_path) -> Path:
    folder = tmp_path / "base"
    shutil.copytree(MODELS / "base", folder)
    return folder


def _write_index(folder: Path, weight_map) -> None:
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_index_not_utf8(sharded):
    (sharded / INDEX_FILE).write_bytes(b'{"weight_map": {"x\xff": "model-00001-of-00002.safetensors"}}')
    refused(sharded, str(sharded / INDEX_FILE), "not UTF-8")


@pytest.mark.parametrize("weight_map, needle", [
    (["model-00001-of-00002.safetensors"], "is a list"),
    ({"model.norm.weight": 3}, "'model.norm.weight' maps to a number"),
    ({"model.norm.weight": ["model-00001-of-00002.safetensors"]}, "maps to a list"),
    ({}, "lists no tensors"),
    ({"model.norm.weight": "model-00001-of-00002.bin"}, "not a .safetensors file"),
])
def test_index_weight_map_shape(sharded, weight_map, needle):
    _write_index(sharded, weight_map)
    refused(sharded, str(sharded / INDEX_FILE), needle)


def test_index_without_weight_map(sharded):
    (sharded / INDEX_FILE).write_text(json.dumps({"metadata": {}}))
    refused(sharded, str(sharded / INDEX_FILE), "weight_map")


def test_index_with_duplicate_keys(sharded):
    text = (sharded / INDEX_FILE).read_text()
    (sharded / INDEX_FILE).write_text(text.replace('"weight_map": {', '"weight_map": {"lm_head.weight": "x.safetensors", ', 1))
    refused(sharded, str(sharded / INDEX_FILE), "twice")


@pytest.mark.parametrize("escape", ["../outside.safetensors", "absolute", "sub/model.safetensors", ".."])
def test_index_shard_outside_the_folder_is_refused(sharded, escape):
    outside = sharded.parent / "outside.safetensors"
    shutil.copy(sharded / "model-00001-of-00002.safetensors", outside)
    shard = str(outside) if escape == "absolute" else escape
    index = json.loads((sharded / INDEX_FILE).read_text())
    index["weight_map"] = {k: (shard if v.startswith("model-00001") else v) for k, v in index["weight_map"].items()}
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    refused(sharded, str(sharded / INDEX_FILE), "not a file of the checkpoint folder")


def test_index_is_read_once(sharded, monkeypatch):
    reads = []
    for method in ("read_bytes", "read_text"):
        real = getattr(Path, method)

        def spy(self, *a, _real=real, **kw):
            if self.name == INDEX_FILE:
                reads.append(self)
            return _real(self, *a, **kw)

        monkeypatch.setattr(Path, method, spy)
    ckpt = Checkpoint.open(sharded)
    assert len(ckpt.files) == 2 and len(reads) == 1


# ---------------------------------------------------------------- paths

SPAN = Span(Source("r.merge", 'a = model("x")\n'), 1, 11, 1, 14)


def test_symlink_loop(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    err = refused(loop, str(loop), "symlink loop")
    with pytest.raises(CheckpointError, match="symlink loop") as info:
        resolve_checkpoint_path("loop", tmp_path, SPAN)
    assert info.value.span is SPAN and err.span is None
    with pytest.raises(CheckpointError, match="symlink loop"):
        resolve_checkpoint_path("loop/inside", tmp_path, SPAN)


def test_nul_byte_in_a_path(tmp_path):
    refused(tmp_path / "a\0b", "NUL byte", "a\\0b")
    with pytest.raises(CheckpointError, match="NUL byte") as info:
        resolve_checkpoint_path("a\0b", tmp_path, SPAN)
    assert info.value.span is SPAN


def test_over_long_name(tmp_path):
    name = "x" * 5000
    refused(tmp_path / name, "too long", str(tmp_path))
    with pytest.raises(CheckpointError, match="too long") as info:
        resolve_checkpoint_path(name, tmp_path, SPAN)
    assert info.value.span is SPAN and len(info.value.message) < 400


def test_resolve_checkpoint_path(tmp_path):
    real = folder_with(tmp_path, st_bytes(VALID), "real")
    (tmp_path / "link").symlink_to(real)
    assert resolve_checkpoint_path("link", tmp_path, SPAN) == real.resolve()
    assert resolve_checkpoint_path(str(real), "/elsewhere", SPAN) == real.resolve()
    missing = resolve_checkpoint_path("nope/../missing", tmp_path, SPAN)
    assert missing == (tmp_path / "missing").resolve() and not missing.exists()


# ---------------------------------------------------------------- pickle checkpoints

def pickle_folder(tmp_path: Path, obj, **save_kw) -> Path:
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    torch.save(obj, folder / "pytorch_model.bin", **save_kw)
    return folder


def test_legacy_pickle_format_loads_with_allow_pickle(tmp_path):
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    folder = pickle_folder(tmp_path, state, _use_new_zipfile_serialization=False)
    refused(folder, "--allow-pickle")
    ckpt = Checkpoint.open(folder, allow_pickle=True)
    assert ckpt.pickled and set(ckpt.tensors) == {"w", "b"}
    assert torch.equal(ckpt.read("w"), state["w"]) and ckpt.tensors["b"].dtype == torch.bfloat16


@pytest.mark.parametrize("obj, needle", [
    ([torch.ones(2)], "holds an object of type list, not a dict of tensors"),
    ({"w": torch.ones(2), "step": 3}, "'step' holds an object of type int, not a tensor"),
    ({"state_dict": {"w": torch.ones(2)}}, "'state_dict' holds an object of type dict"),
    ({"w": torch.ones(2, dtype=torch.complex64)}, "unsupported dtype"),
    ({1: torch.ones(2)}, "not a tensor name"),
])
def test_pickle_that_is_not_a_state_dict(tmp_path, obj, needle):
    folder = pickle_folder(tmp_path, obj)
    refused(folder, str(folder / "pytorch_model.bin"), needle, allow_pickle=True)


def test_pickle_that_is_not_a_pickle(tmp_path):
    folder = pickle_folder(tmp_path, {})
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    refused(folder, str(folder / "pytorch_model.bin"), "cannot load", allow_pickle=True)


def test_pickle_tensor_in_two_files(tmp_path):
    folder = pickle_folder(tmp_path, {"w": torch.ones(2)})
    torch.save({"w": torch.zeros(2)}, folder / "more.pt")
    refused(folder, "'w'", "stored in both", allow_pickle=True)


# ---------------------------------------------------------------- the Fisher's key reads stray files safely

def test_fisher_key_survives_a_hostile_stray_shard(sharded, tmp_path):
    from mgc.fisher import fisher_key

    (sharded / "stray.safetensors").write_bytes(st_bytes('{"w": ' + "[" * 100_000 + "]" * 100_000 + "}", b""))
    (tmp_path / "d.txt").write_text("hello world\n")
    Checkpoint.open(sharded)  # the index names the shards: the stray file is not part of the checkpoint
    assert len(fisher_key(sharded, tmp_path / "d.txt")) == 64
    (sharded / "stray.safetensors").write_bytes(st_bytes('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, Infinity]}}'))
    assert len(fisher_key(sharded, tmp_path / "d.txt")) == 64


# ---------------------------------------------------------------- transformers loads what mgc validated

@pytest.fixture
def beside_a_pickle(tmp_path) -> dict[str, Path]:
    """The code model's safetensors with the math model's weights in a pytorch_model.bin beside them: once under
    the name transformers looks for (model.safetensors), once under another name that mgc reads."""
    math = load_file(MODELS / "math" / "model.safetensors")
    folders = {}
    for key, name in (("standard", "model.safetensors"), ("renamed", "weights.safetensors")):
        folder = tmp_path / key
        shutil.copytree(MODELS / "code", folder)
        (folder / "model.safetensors").rename(folder / name)
        torch.save(math, folder / "pytorch_model.bin")
        folders[key] = folder
    return folders


def test_evaluate_loads_the_safetensors_mgc_merges(beside_a_pickle):
    pytest.importorskip("transformers")
    from mgc.evaluate import load

    code = load_file(MODELS / "code" / "model.safetensors")
    for allow_pickle in (False, True):
        model, _ = load(beside_a_pickle["standard"], allow_pickle=allow_pickle)
        state = model.state_dict()
        assert all(torch.equal(state[k], v.float()) for k, v in code.items() if k in state)
        # mgc reads weights.safetensors here; transformers would fall back to unpickling pytorch_model.bin
        with pytest.raises(CheckpointError, match="cannot load the model"):
            load(beside_a_pickle["renamed"], allow_pickle=allow_pickle)


def test_fisher_is_of_the_safetensors_mgc_merges(beside_a_pickle, tmp_path):
    pytest.importorskip("transformers")
    import mgc.fisher as fz

    (tmp_path / "d.txt").write_text("def add(a, b):\n    return a + b\n")
    got = fz.estimate_fisher(beside_a_pickle["standard"], tmp_path / "d.txt", samples=1, max_length=8, device="cpu")
    ref = fz.estimate_fisher(MODELS / "code", tmp_path / "d.txt", samples=1, max_length=8, device="cpu")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    # mgc merges weights.safetensors here; the Fisher was the pickle's, computed without --allow-pickle
    assert Checkpoint.open(beside_a_pickle["renamed"]).files[0].name == "weights.safetensors"
    with pytest.raises(CheckpointError, match="cannot load the model"):
        fz.estimate_fisher(beside_a_pickle["renamed"], tmp_path / "d.txt", samples=1, max_length=8, device="cpu")
