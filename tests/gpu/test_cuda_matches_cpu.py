"""The GPU tier: every example method merged on CUDA equals the CPU merge (skipped without CUDA).

Deterministic elementwise methods give the same bytes; reductions and sorts may round differently on
the device, so those are compared within float tolerance (see docs/operators.md)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mgc.api import run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).parents[2]
SAME_BYTES = {"linear", "task_arithmetic", "passthrough", "nearswap"}


@pytest.mark.parametrize("recipe", sorted((ROOT / "examples" / "methods").glob("*.merge")), ids=lambda p: p.stem)
def test_cuda_merge_matches_cpu(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run(recipe, output=tmp_path / "cpu", device="cpu")
    run(recipe, output=tmp_path / "cuda", device="cuda")
    cpu, cuda = (load_file(tmp_path / d / "model.safetensors") for d in ("cpu", "cuda"))
    assert cpu.keys() == cuda.keys()
    for name in cpu:
        if recipe.stem in SAME_BYTES:
            assert torch.equal(cpu[name], cuda[name]), name
        else:  # a sort can break a tie in magnitude the other way: allow a few entries to differ
            close = torch.isclose(cuda[name].float(), cpu[name].float(), rtol=2e-2, atol=1e-3)
            assert close.float().mean() > 0.999, name
