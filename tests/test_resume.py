"""A run that dies is continued by the next run of the same recipe, whose output is byte-identical to an
uninterrupted run's; a changed recipe or input starts afresh, and a damaged tensor is written again
(runtime/journal.py, runtime/resume.py; docs/distributed.md)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mgc.runtime.journal import JOURNAL_DIR, read_entries

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"

RECIPE = """a = model("models/base")
b = model("models/code")
c = model("models/math")
save dare_ties(b, c, base = a, density = 0.5, seed = 7) to "out/merged" {{ shard = "200KB" }}
save slerp(a, b, t = {t}) to "out/plain" {{ dtype = bf16 }}
"""


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def mgc_run(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "MGC_JOURNAL_BYTES": "0", **env}
    return subprocess.run([sys.executable, "-m", "mgc", "run", "-q", "--device", "cpu", *args, "r.merge"], cwd=root,
                          env=full, capture_output=True, text=True, timeout=120)


def outputs(root: Path) -> dict[str, dict[str, bytes]]:
    return {name: snapshot(root / "out" / name) for name in ("merged", "plain")}


def staging(root: Path) -> list[Path]:
    return sorted(p for p in (root / "out").iterdir() if ".mgc-tmp-" in p.name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the example models, a recipe, and the output of an uninterrupted run of it."""
    root = tmp_path_factory.mktemp("resume")
    for name in ("base", "code", "math"):
        shutil.copytree(MODELS / name, root / "models" / name)
    (root / "r.merge").write_text(RECIPE.format(t=0.3))
    done = mgc_run(root)
    assert done.returncode == 0, done.stderr
    ref = outputs(root)
    assert len([f for f in ref["merged"] if f.endswith(".safetensors")]) > 2  # several shards
    shutil.rmtree(root / "out")
    return root, ref


@pytest.fixture
def root(reference) -> Path:
    """The reference's folder (outputs record their absolute paths), with no output; restored after the test."""
    folder = reference[0]
    weights = folder / "models" / "code" / "model.safetensors"
    data, st = weights.read_bytes(), weights.stat()
    yield folder
    shutil.rmtree(folder / "out", ignore_errors=True)
    (folder / "r.merge").write_text(RECIPE.format(t=0.3))
    if weights.read_bytes() != data:
        weights.write_bytes(data)
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("env", [  # the two outputs' tensors are written in turn, 150 in all
    {"MGC_TEST_KILL_AFTER": "1"},
    {"MGC_TEST_KILL_AFTER": "29"},
    {"MGC_TEST_KILL_AFTER": "149"},
    {"MGC_TEST_KILL_AFTER": "150"},  # the last one, before the writers close
    {"MGC_TEST_KILL_AFTER": "60", "MGC_JOURNAL_BYTES": "100000"},  # journaled in groups
    {"MGC_TEST_KILL_AT": "commit"},  # every tensor written, the journal still there
    {"MGC_TEST_KILL_AT": "move"},  # the journal removed, not yet moved into place
], ids=lambda env: "-".join(f"{k.lower().removeprefix('mgc_').removeprefix('test_')}={v}" for k, v in env.items()))
def test_a_killed_run_resumes_to_identical_bytes(reference, root, env):
    killed = mgc_run(root, **env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert staging(root)
    again = mgc_run(root)
    assert again.returncode == 0, again.stderr
    if env.get("MGC_TEST_KILL_AT") != "move":
        assert "resuming '" in again.stderr and "already written" in again.stderr, again.stderr
    assert outputs(root) == reference[1]
    assert sorted(os.listdir(root / "out")) == ["merged", "plain"]


def test_resuming_says_how_much_was_done(root):
    mgc_run(root, MGC_TEST_KILL_AFTER="30")
    again = mgc_run(root)
    for name in ("merged", "plain"):
        assert re.search(rf"resuming '.*/out/{name}': 15 of 75 tensors \([\d.]+ KiB of [\d.]+ KiB\) already written",
                         again.stderr), again.stderr


def test_a_sigterm_keeps_the_journaled_tensors_for_resuming(reference, root):
    stopped = mgc_run(root, MGC_TEST_KILL_AFTER="20", MGC_TEST_SIGNAL="SIGTERM")
    assert stopped.returncode == 143, stopped.stderr
    assert "stopped by SIGTERM; the tensors written so far are kept in" in stopped.stderr
    again = mgc_run(root)
    assert again.returncode == 0 and "resuming '" in again.stderr, again.stderr
    assert outputs(root) == reference[1]


def test_a_changed_recipe_starts_afresh(root):
    assert mgc_run(root, MGC_TEST_KILL_AFTER="100").returncode == -signal.SIGKILL
    (root / "r.merge").write_text(RECIPE.format(t=0.7))
    again = mgc_run(root)
    assert again.returncode == 0, again.stderr
    assert "starting '" in again.stderr and "afresh" in again.stderr and "resuming" not in again.stderr
    got = outputs(root)
    shutil.rmtree(root / "out")
    assert mgc_run(root).returncode == 0
    assert got == outputs(root)


def test_a_changed_input_starts_afresh(root):
    assert mgc_run(root, MGC_TEST_KILL_AFTER="100").returncode == -signal.SIGKILL
    weights = root / "models" / "code" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)  # the last tensor's data changes, its header does not
    weights.write_bytes(bytes(data))
    again = mgc_run(root)
    assert again.returncode == 0, again.stderr
    assert "afresh" in again.stderr and "resuming" not in again.stderr, again.stderr
    got = outputs(root)
    shutil.rmtree(root / "out")
    assert mgc_run(root).returncode == 0
    assert got == outputs(root)


def test_a_damaged_journaled_tensor_is_written_again(reference, root):
    assert mgc_run(root, MGC_TEST_KILL_AFTER="40").returncode == -signal.SIGKILL
    folder = next(p for p in staging(root) if p.name.startswith(".merged."))
    entries = read_entries(folder)
    entry = entries[3]
    with open(folder / entry.file, "r+b") as f:
        f.seek(entry.offset)
        f.write(bytes(min(8, entry.length)))
    again = mgc_run(root)
    assert again.returncode == 0, again.stderr
    assert f"{len(entries) - 1} of 75 tensors" in again.stderr and "1 tensor of the interrupted run did not match" in again.stderr
    assert outputs(root) == reference[1]


def test_a_torn_journal_line_is_ignored(reference, root):
    assert mgc_run(root, MGC_TEST_KILL_AFTER="10").returncode == -signal.SIGKILL
    folder = next(p for p in staging(root) if p.name.startswith(".merged."))
    journal = next((folder / JOURNAL_DIR).iterdir())
    assert len(read_entries(folder)) == 5
    with open(journal, "a") as f:
        f.write('{"tensor":"model.layers.0.mlp.up_proj.weight","file":"model-000')  # killed mid-line
    again = mgc_run(root)
    assert again.returncode == 0 and "merged': 5 of 75 tensors" in again.stderr, again.stderr
    assert outputs(root) == reference[1]


def test_a_run_killed_before_any_tensor_was_journaled_is_cleaned_up(reference, root):
    assert mgc_run(root, MGC_TEST_KILL_AFTER="5", MGC_JOURNAL_BYTES=str(1 << 30)).returncode == -signal.SIGKILL
    again = mgc_run(root)
    assert again.returncode == 0 and "resuming" not in again.stderr and "no longer running" in again.stderr
    assert outputs(root) == reference[1]


def test_a_killed_force_replacement_resumes_and_replaces(reference, root):
    for name in ("merged", "plain"):
        (root / "out" / name).mkdir(parents=True)
        (root / "out" / name / "old.txt").write_text("the old output\n")
    assert mgc_run(root, "--force", MGC_TEST_KILL_AFTER="50").returncode == -signal.SIGKILL
    assert (root / "out" / "merged" / "old.txt").is_file()  # untouched until the commit
    again = mgc_run(root, "--force")
    assert again.returncode == 0 and "resuming '" in again.stderr, again.stderr
    assert outputs(root) == reference[1]


@pytest.mark.parametrize("silent", [True, False])
def test_a_run_of_another_host_is_resumed_once_its_heartbeat_stopped(reference, root, silent):
    """Under SLURM a requeued job may run on other nodes of the shared file system: the interrupted run's owner
    file, touched every minute while it ran, tells whether it is over."""
    assert mgc_run(root, MGC_TEST_KILL_AFTER="50").returncode == -signal.SIGKILL
    for owner in (root / "out").glob(".*.mgc-owner-*"):
        record = json.loads(owner.read_text())
        owner.write_text(json.dumps({**record, "host": "node-7.example"}))
        if silent:
            os.utime(owner, (time.time() - 3600, time.time() - 3600))
    again = mgc_run(root)
    assert again.returncode == 0, again.stderr
    if silent:
        assert "resuming '" in again.stderr and sorted(os.listdir(root / "out")) == ["merged", "plain"]
    else:
        assert "resuming" not in again.stderr and "host 'node-7.example'" in again.stderr, again.stderr
    assert outputs(root) == reference[1]
