"""mgc never loses a file: outputs never overlap what a run reads, the working folder or one another; a
signal cleans up; what a killed run leaves is cleaned up by the next run; a --force replacement always
leaves the old output or the new one in place; OS errors while writing are OutputErrors naming the output."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mgc.runtime.aside as aside_module
import mgc.runtime.exchange as exchange_module
import mgc.runtime.staging as staging_module
import mgc.runtime.writer as writer_module
from mgc.api import compile_recipe, run
from mgc.cli import main
from mgc.core.errors import MgcErrors, OutputError, Source, Span
from mgc.compiler.outputs import check_output_paths, program_inputs
from mgc.runtime.stale import clean_stale
from mgc.runtime.staging import StagedOutput
from mgc.runtime.signals import Terminated, terminate_on_signals

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "examples" / "models"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if ".mgc-" in p.name)


def recipe_text(models: Path, out) -> str:
    return f'a = model("{models / "base"}")\nb = model("{models / "code"}")\nsave linear(a, b) to "{out}"\n'


def old_output(out: Path) -> dict[str, bytes]:
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"old weights")
    (out / "notes.txt").write_text("keep me\n")
    return snapshot(out)


@pytest.fixture
def small(tmp_path) -> Path:
    """base and code of the example models, copied: tests here may point outputs at them."""
    dest = tmp_path / "models"
    for name in ("base", "code"):
        shutil.copytree(MODELS / name, dest / name)
    return dest


# ---------------------------------------------------------------- 1. outputs apart from the inputs


def test_save_to_the_working_folder_is_refused(small, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    text = f'a = model("{small / "base"}")\nsave a to "."\n'
    with pytest.raises(OutputError, match="is the working folder") as info:
        compile_recipe(work / "r.merge", text=text)
    assert info.value.span.line == 2
    # -o . as well, and with --force on the command line
    with pytest.raises(OutputError, match="is the working folder"):
        compile_recipe(work / "r.merge", text=f'save model("{small / "base"}") to "x"\n', output=".")
    (work / "r.merge").write_text(text)
    (work / "mine.txt").write_text("mine")
    result = CliRunner().invoke(main, ["run", "-q", "--force", "--device", "cpu", "r.merge"])
    assert result.exit_code == 1 and "working folder" in result.output
    assert sorted(p.name for p in work.iterdir()) == ["mine.txt", "r.merge"]


def test_output_over_an_input_is_refused_even_with_force(small, tmp_path):
    before = snapshot(small)
    for out, needle in [
        (small / "code", "is the input checkpoint"),  # -o expert_1 --force
        (small, "contains the input checkpoint"),
        (small / "code" / "merged", "lies inside the input checkpoint"),
    ]:
        with pytest.raises(OutputError, match=needle):
            run(tmp_path / "r.merge", text=recipe_text(small, tmp_path / "o"), output=out, force=True, device="cpu")
    assert snapshot(small) == before and leftovers(tmp_path) == []


def test_output_through_a_symlink_to_an_input_is_refused(small, tmp_path):
    (tmp_path / "link").symlink_to(small / "code")
    with pytest.raises(OutputError, match="is the input checkpoint"):
        compile_recipe(tmp_path / "r.merge", text=recipe_text(small, tmp_path / "link"))


def test_output_containing_the_recipe_or_the_working_folder_is_refused(small, tmp_path, monkeypatch):
    recipe = tmp_path / "recipes" / "r.merge"
    recipe.parent.mkdir()
    recipe.write_text(recipe_text(small, tmp_path / "recipes"))
    with pytest.raises(OutputError, match="contains the recipe"):
        compile_recipe(recipe)
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    with pytest.raises(OutputError, match="contains the working folder"):
        compile_recipe(tmp_path / "r.merge", text=recipe_text(small, tmp_path / "a"))
    compile_recipe(tmp_path / "r.merge", text=recipe_text(small, deep / "out"))  # inside the working folder: fine


@pytest.mark.parametrize("first,second", [("out/sub", "out"), ("out", "out/sub")])
def test_nested_saves_are_refused_at_the_later_save(small, tmp_path, first, second):
    text = (f'a = model("{small / "base"}")\nb = model("{small / "code"}")\n'
            f'save a to "{tmp_path / first}"\nsave b to "{tmp_path / second}"\n')
    with pytest.raises(OutputError) as info:
        compile_recipe(tmp_path / "r.merge", text=text)
    assert info.value.span.line == 4
    assert "another save" in info.value.message and ":3:" in info.value.hint


def test_check_and_plan_refuse_too(small, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.merge").write_text(f'save model("{small / "base"}") to "{small}"\n')
    for command in ("check", "plan"):
        result = CliRunner().invoke(main, [command, "r.merge"])
        assert result.exit_code == 1 and "contains the input checkpoint" in result.output, result.output


def test_fisher_cache_and_data_are_inputs(tmp_path):
    cache, data = tmp_path / "cache" / "k1", tmp_path / "data" / "code.txt"
    program = SimpleNamespace(checkpoints={}, fishers={cache: SimpleNamespace(data=data)})
    inputs = program_inputs(program)

    source = Source("r.merge", 'save a to "x"\nsave b to "y"\n')

    def save(path, line=1):
        return SimpleNamespace(path=path, span=Span(source, line, 1, line, 14))

    for out, needle in [(tmp_path / "cache", "Fisher cache folder"), (data, "Fisher data file"),
                        (tmp_path / "data", "Fisher data file")]:
        with pytest.raises(OutputError, match=needle):
            check_output_paths([save(out)], inputs, None, tmp_path / "elsewhere")
    with pytest.raises(MgcErrors):  # every bad save is reported
        check_output_paths([save(tmp_path / "cache"), save(tmp_path / "data", 2)], inputs, None, tmp_path / "w")
    check_output_paths([save(tmp_path / "out")], inputs, None, tmp_path / "w")


# ---------------------------------------------------------------- 2. signals


def test_terminate_on_signals_raises_and_restores():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as info:
        with terminate_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert info.value.signum == signal.SIGTERM and isinstance(info.value, BaseException)
    assert not isinstance(info.value, Exception)
    assert signal.getsignal(signal.SIGTERM) is before

    done = []

    def elsewhere():  # no handler can be set outside the main thread: a no-op there
        with terminate_on_signals():
            done.append(True)

    t = threading.Thread(target=elsewhere)
    t.start()
    t.join()
    assert done == [True]


@pytest.mark.parametrize("how,status,what", [("sigterm", 143, "SIGTERM"), ("ctrl-c", 130, "Ctrl-C")])
def test_cli_run_exit_status_after_a_signal(small, tmp_path, monkeypatch, how, status, what):
    real, sent = writer_module.ShardedWriter.write, []

    def write(self, name, tensor):  # runs on the writer thread: SIGTERM reaches the main thread, mid-merge
        if not sent:
            sent.append(name)
            if how == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
        real(self, name, tensor)

    def unhandled(signum, frame):  # in place of the default action, which would end pytest
        raise RuntimeError("mgc run left SIGTERM to its default action")

    monkeypatch.setattr(writer_module.ShardedWriter, "write", write)
    (tmp_path / "r.merge").write_text(recipe_text(small, tmp_path / "out"))
    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        result = CliRunner().invoke(main, ["run", "-q", "--device", "cpu", str(tmp_path / "r.merge")])
        assert signal.getsignal(signal.SIGTERM) is unhandled
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result.exit_code == status, result.output
    assert result.output.strip() == f"mgc: stopped by {what}; outputs not yet complete were removed"
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------- subprocess runs, killed mid-merge


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """Two checkpoints big enough (2 x 96 MiB) that a merge of them is still running when the test sees its
    staging folder appear."""
    root = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 24}))
        tensors = {f"model.layers.{i}.mlp.weight": torch.randn(1024, 1024, generator=g) for i in range(24)}
        save_file(tensors, str(root / name / "model.safetensors"), metadata={"format": "pt"})
    (root / "r.merge").write_text('a = model("a")\nb = model("b")\nsave linear(a, b) to "out/merged"\n')
    return root


def start_and_signal(big: Path, signum: int) -> subprocess.CompletedProcess:
    """Run mgc on the big recipe and send it `signum` as soon as its staging folder appears."""
    shutil.rmtree(big / "out", ignore_errors=True)
    (big / "out").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "mgc.cli", "run", "-q", "--device", "cpu", "r.merge"], cwd=big,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(".mgc-tmp-" in n for n in os.listdir(big / "out")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_sigterm_exits_143_and_leaves_nothing(big):
    done = start_and_signal(big, signal.SIGTERM)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip() == "mgc: stopped by SIGTERM; outputs not yet complete were removed"
    assert os.listdir(big / "out") == []


def test_a_run_after_sigkill_cleans_up_and_succeeds(big, capfd, monkeypatch):
    done = start_and_signal(big, signal.SIGKILL)
    assert done.returncode == -signal.SIGKILL
    left = sorted(os.listdir(big / "out"))
    assert any(".mgc-tmp-" in n for n in left) and any(".mgc-owner-" in n for n in left), left
    monkeypatch.chdir(big)
    capfd.readouterr()
    run(big / "r.merge", device="cpu")
    err = capfd.readouterr().err
    assert "removed '.merged.mgc-tmp-" in err and "no longer running" in err
    assert sorted(os.listdir(big / "out")) == ["merged"]
    got = load_file(big / "out" / "merged" / "model.safetensors")
    assert len(got) == 24


# ---------------------------------------------------------------- 3. leftovers of other runs


def owner_record(path: Path) -> dict:
    return json.loads(path.read_text())


def test_leftovers_of_live_runs_and_other_hosts_are_left_alone(tmp_path):
    out = tmp_path / "out"
    staged = StagedOutput(out).open()  # this process's own: never touched
    parent_pid = os.getppid()  # alive, and not this process
    (tmp_path / f".other.mgc-owner-{parent_pid}").write_text(json.dumps(aside_module.identity(parent_pid)))
    (tmp_path / f".other.mgc-tmp-{parent_pid}").mkdir()
    far = {**aside_module.identity(7), "host": "elsewhere.example"}
    (tmp_path / ".far.mgc-owner-7").write_text(json.dumps(far))
    (tmp_path / ".far.mgc-tmp-7").mkdir()
    (tmp_path / ".legacy.mgc-tmp-8").mkdir()  # made before owner files: nobody to ask
    notes = []
    clean_stale(out, notes.append)
    assert len(notes) == 3
    assert any(f"process {parent_pid} is still running" in n and "rm -rf" in n for n in notes)
    assert any("host 'elsewhere.example'" in n and ".far.mgc-tmp-7" in n for n in notes)
    assert any("no record" in n and ".legacy.mgc-tmp-8" in n for n in notes)
    assert staged.folder.is_dir() and staged.owner.is_file()
    assert len(leftovers(tmp_path)) == 7
    staged.abort()


def test_leftovers_of_a_reused_pid_are_removed(tmp_path):
    """The pid of a dead run may belong to another process now: its start time tells them apart."""
    parent_pid = os.getppid()
    record = {**aside_module.identity(parent_pid), "start": "1", "target": "out"}
    (tmp_path / f".out.mgc-owner-{parent_pid}").write_text(json.dumps(record))
    (tmp_path / f".out.mgc-tmp-{parent_pid}").mkdir()
    notes = []
    clean_stale(tmp_path / "out", notes.append)
    assert leftovers(tmp_path) == [] and len(notes) == 1 and "removed" in notes[0]


# ---------------------------------------------------------------- 4. --force replacement


def staged_new(out: Path) -> StagedOutput:
    staged = StagedOutput(out).open()
    (staged.folder / "model.safetensors").write_bytes(b"new weights")
    return staged


def test_force_replacement_exchanges_in_one_step(tmp_path, monkeypatch):
    out = tmp_path / "out"
    old_output(out)
    staged = staged_new(out)
    if exchange_module._renameat2() is None:
        pytest.skip("no renameat2 here")
    real, calls = staging_module.exchange, []
    monkeypatch.setattr(staging_module, "exchange", lambda a, b: calls.append(real(a, b)) or calls[-1])
    monkeypatch.setattr(staging_module.os, "rename", lambda *a: pytest.fail("renamed instead of exchanging"))
    staged.commit()
    assert calls == [True]
    assert snapshot(out) == {"model.safetensors": b"new weights"} and leftovers(tmp_path) == []


class Crash(BaseException):
    """The process dies: nothing after this runs."""


def renames_failing_after_the_first(monkeypatch, failure: BaseException, times: int = 10**9) -> None:
    """No atomic exchange, and the `times` renames after the first raise `failure`."""
    monkeypatch.setattr(staging_module, "exchange", lambda a, b: False, raising=False)
    real, calls = os.rename, []

    def rename(a, b):
        calls.append((a, b))
        if 1 < len(calls) <= 1 + times:
            raise failure
        real(a, b)

    monkeypatch.setattr(staging_module.os, "rename", rename)
    monkeypatch.setattr(staging_module.os, "replace", rename)


def test_force_replacement_by_renames_puts_the_old_output_back_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "out"
    before = old_output(out)
    staged = staged_new(out)
    renames_failing_after_the_first(monkeypatch, OSError(errno.EIO, "Input/output error"), times=1)
    with pytest.raises(OutputError, match="Input/output error"):
        staged.commit()
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_a_crash_between_the_renames_is_repaired_by_the_next_run(tmp_path, monkeypatch):
    out = tmp_path / "out"
    before = old_output(out)
    staged = staged_new(out)
    renames_failing_after_the_first(monkeypatch, Crash())
    monkeypatch.setattr(staged, "abort", lambda: None)  # a dead process cleans nothing
    with pytest.raises(Crash):
        staged.commit()
    monkeypatch.undo()
    assert not out.exists() and staged.old.is_dir()
    # the next run, in another process: the record's start time is no longer this process's
    owner = owner_record(staged.owner)
    staged.owner.write_text(json.dumps({**owner, "start": "1"}))
    notes = []
    clean_stale(out, notes.append)
    assert snapshot(out) == before and leftovers(tmp_path) == []
    assert len(notes) == 1 and f"put back '{out}'" in notes[0]


def test_a_file_system_without_exchange_falls_back_to_renames(tmp_path, monkeypatch):
    import ctypes

    def renameat2(*args):  # as the kernel answers where the file system has no RENAME_EXCHANGE
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(exchange_module, "_renameat2", lambda: renameat2)
    out = tmp_path / "out"
    old_output(out)
    staged_new(out).commit()
    assert snapshot(out) == {"model.safetensors": b"new weights"} and leftovers(tmp_path) == []


def test_an_old_output_is_not_deleted_when_the_target_was_remade_after_a_crash(tmp_path):
    out = tmp_path / "out"
    dead = {**aside_module.identity(os.getppid()), "start": "1", "target": "out"}
    (tmp_path / f".out.mgc-owner-{dead['pid']}").write_text(json.dumps(dead))
    (tmp_path / f".out.mgc-tmp-{dead['pid']}").mkdir()
    old = tmp_path / f".out.mgc-old-{dead['pid']}"
    before = old_output(old)
    out.mkdir()  # made by someone else since
    notes = []
    clean_stale(out, notes.append)
    assert snapshot(old) == before and not (tmp_path / f".out.mgc-tmp-{dead['pid']}").exists()
    assert any("left '.out.mgc-old-" in n for n in notes)


# ---------------------------------------------------------------- 5. OS errors while writing


def expect_output_error(small, tmp_path, out, *needles):
    with pytest.raises(OutputError) as info:
        run(tmp_path / "r.merge", text=recipe_text(small, out), device="cpu")
    text = info.value.render()
    for needle in needles:
        assert needle in text, text
    assert info.value.span is not None
    assert leftovers(tmp_path) == []
    return info.value


def test_parent_that_is_a_file(small, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    expect_output_error(small, tmp_path, tmp_path / "file.txt" / "a" / "out", "file.txt' is a file, not a folder",
                        f"output folder '{tmp_path / 'file.txt' / 'a' / 'out'}'")


def test_name_too_long(small, tmp_path):
    out = tmp_path / ("n" * 300)
    expect_output_error(small, tmp_path, out, str(out), "File name too long", "shorter")


def test_long_name_that_fits_gets_a_short_staging_name(small, tmp_path):
    out = tmp_path / ("n" * 250)
    run(tmp_path / "r.merge", text=recipe_text(small, out), device="cpu")
    assert (out / "model.safetensors").is_file() and leftovers(tmp_path) == []


def test_read_only_parent(small, tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() == 0:  # root writes anyway: refuse as the kernel would
        real = os.mkdir

        def mkdir(path, *a, **kw):
            if Path(path).parent == parent:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real(path, *a, **kw)

        monkeypatch.setattr(staging_module.os, "mkdir", mkdir)
    else:
        parent.chmod(0o555)
    try:
        expect_output_error(small, tmp_path, parent / "out", f"'{parent / 'out'}'", "Permission denied")
    finally:
        parent.chmod(0o755)
    assert os.listdir(parent) == []


def test_disk_full_while_writing_tensors(small, tmp_path, monkeypatch):
    class Full:
        def __init__(self, f):
            self.f = f
            self.writes = 0

        def write(self, data):
            self.writes += 1
            if self.writes > 2:  # past the header: tensor data
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(writer_module, "open", lambda *a, **kw: Full(open(*a, **kw)), raising=False)
    out = tmp_path / "out"
    expect_output_error(small, tmp_path, out, f"output folder '{out}'", "No space left on device", "free some space")
    assert not out.exists()
