"""`torchrun -m mgc run`: the ranks split the saved tensors, and the output is byte-identical to one process's; a
rank that fails fails the run, and the next run resumes (runtime/distributed.py, runtime/outputs.py)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mgc.runtime.distributed import World, share

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"

RECIPE = """a = model("models/base")
b = model("models/code")
c = model("models/math")
save dare_ties(b, c, base = a, density = 0.5, seed = 7) to "out/merged" { shard = "150KB" }
save slerp(a, b, t = 0.3) to "out/plain" { dtype = bf16 }
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def outputs(root: Path) -> dict[str, dict[str, bytes]]:
    return {name: snapshot(root / "out" / name) for name in ("merged", "plain")}


def mgc_run(root: Path, ranks: int = 1, *args: str, **env: str) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "mgc"]
    if ranks > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
                  "127.0.0.1", "--master-port", str(free_port()), "-m", "mgc"]
    full = {**os.environ, "OMP_NUM_THREADS": "1", "MGC_JOURNAL_BYTES": "0", **env}
    return subprocess.run([*launch, "run", "--device", "cpu", *args, "r.merge"], cwd=root, env=full,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("distributed")
    for name in ("base", "code", "math"):
        shutil.copytree(MODELS / name, root / "models" / name)
    (root / "r.merge").write_text(RECIPE)
    done = mgc_run(root, 1, "-q")
    assert done.returncode == 0, done.stderr
    ref = outputs(root)
    assert len([f for f in ref["merged"] if f.endswith(".safetensors")]) > 2
    shutil.rmtree(root / "out")
    return root, ref


@pytest.fixture
def root(reference) -> Path:
    yield reference[0]
    shutil.rmtree(reference[0] / "out", ignore_errors=True)


def test_two_ranks_write_what_one_process_writes(reference, root):
    done = mgc_run(root, 2)
    assert done.returncode == 0, done.stderr
    assert outputs(root) == reference[1]
    assert done.stdout.count("wrote ") == 2  # rank 0 speaks for the run
    assert "150 tensors" in done.stdout and "by 2 processes" in done.stdout, done.stdout
    assert sorted(os.listdir(root / "out")) == ["merged", "plain"]


def test_two_ranks_streaming_every_tensor_write_what_one_process_writes(reference, root):
    """slerp's tensors merged slice by slice from the files into shards the ranks share (runtime/streamed.py)."""
    done = mgc_run(root, 2, "-q", MGC_STREAM_BYTES="0")
    assert done.returncode == 0, done.stderr
    assert outputs(root) == reference[1]


def test_a_failed_rank_fails_the_run_and_the_next_run_resumes(reference, root):
    failed = mgc_run(root, 2, "-q", MGC_TEST_FAIL_AFTER="20", MGC_TEST_RANK="1")
    assert failed.returncode != 0
    assert "error: test failure after 20 tensors" in failed.stderr
    assert "run the same command again to resume" in failed.stderr, failed.stderr
    assert any(".mgc-tmp-" in n for n in os.listdir(root / "out"))
    again = mgc_run(root, 2, "-q")
    assert again.returncode == 0, again.stderr
    assert "resuming '" in again.stderr
    assert outputs(root) == reference[1]


def test_a_killed_rank_is_resumed_by_one_process(reference, root):
    killed = mgc_run(root, 2, "-q", MGC_TEST_KILL_AFTER="30", MGC_TEST_RANK="1")
    assert killed.returncode != 0
    again = mgc_run(root, 1, "-q")
    assert again.returncode == 0 and "resuming '" in again.stderr, again.stderr
    assert outputs(root) == reference[1]


def test_distributed_needs_torchrun(root):
    done = mgc_run(root, 1, "--distributed")
    assert done.returncode == 1 and "--distributed needs the environment torchrun sets" in done.stderr


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_the_shares_are_disjoint_complete_and_balanced(size):
    units = [(i, n) for i, n in enumerate([5, 1, 1, 9, 3, 3, 3, 7, 2, 2, 8, 1] * 4)]
    shares = [share(units, World(rank, size)) for rank in range(size)]
    assert sorted(k for s in shares for k in s) == [k for k, _ in units]
    sizes = dict(units)
    loads = [sum(sizes[k] for k in s) for s in shares]
    assert max(loads) - min(loads) <= 2 * max(sizes.values())
    for s in shares:  # each a run of consecutive units
        assert not s or sorted(s) == list(range(min(s), max(s) + 1))
