"""Shared fixtures for the pass, runtime and end-to-end tests."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
MODELS = EXAMPLES / "models"


@pytest.fixture
def repo_root(monkeypatch) -> Path:
    """Run with the repository root as working directory (recipes name examples/models/... relative to it)."""
    monkeypatch.chdir(REPO)
    return REPO


@pytest.fixture
def models(tmp_path) -> Path:
    """A private copy of examples/models (base, code, math, prose) that a test may damage."""
    dest = tmp_path / "models"
    shutil.copytree(MODELS, dest)
    return dest


@pytest.fixture(scope="module")
def one_thread():
    """The tiny example models run several times faster on one thread (thread overhead dominates)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def call_merge(op, tensors, params, base=None, *, generator=None, out=None, **aux):
    """``op.merge(tensors, params, ctx)`` (op: an Operator or an operator's module) with the context built from
    keywords as the runtime builds it: ``base``, ``generator``, ``out``, and model-valued inputs by name."""
    from mgc.stdlib.operator import MergeContext

    return op.merge(tensors, params, MergeContext(base=base, aux=aux, generator=generator, out=out))


def without_provenance(data: bytes) -> bytes:
    """A safetensors file's bytes with the provenance mgc writes into its header (`mgc.*` keys of `__metadata__`:
    the recipe's text, name and folder, the inputs) taken out, for comparing the tensors two runs of recipes that
    differ only in their save paths wrote (runtime/provenance.py)."""
    import json

    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__", {})
    header["__metadata__"] = {k: v for k, v in meta.items() if not k.startswith("mgc.")}
    return json.dumps(header, sort_keys=True).encode() + b"\0" + data[8 + n:]


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, from all its safetensors shards."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(f)
    return out
