"""Speed and memory benchmark: mgc against mergekit 0.1.5 and against the I/O floor.

Run on demand, not in the test suite. Make the checkpoints first (about 3 GB, once):

    python bench/make_bench_models.py                          # 16 layers: base + 5 experts
    python bench/make_bench_models.py --layers 32 --experts 3  # only for --deep
    python bench/bench.py --mergekit-venv ../mk --deep

mergekit is never a dependency of mgc: it runs from its own virtual environment
(`python3 -m venv ../mk && ../mk/bin/pip install torch==2.13.0 mergekit==0.1.5`). Without
--mergekit-venv only the mgc and I/O-floor rows are printed.

Cases (all outputs bf16):
  linear     linear over 3 experts (equal weights)
  ties       ties over 3 experts with the base, density 0.5
  karcher    karcher over 5 experts, equal weights, max_iter 10, tol 1e-5
  slerp      slerp of the base and one expert, t = [0, 0.5, 1] across the layers
  two-stage  karcher of the 5 experts, then slerp with the base at t = 0.5: one mgc recipe;
             in mergekit two runs (karcher into a temporary folder, then slerp), timed together

Equal work. mgc always computes in float32 (karcher's iteration in float64) and is asked to
write bf16. mergekit is run with `dtype: float32` (compute) and `out_dtype: bfloat16`
(output), so both read the same bf16 inputs, compute in float32 and write the same number of
bf16 bytes. mergekit's default (no `dtype`) computes in the inputs' dtype, bf16 here:
`--mergekit-dtype native` runs that instead, for reference; it is not the same arithmetic.
mergekit is run with --no-copy-tokenizer (the checkpoints have none; mgc copies tokenizer
files only when they exist) and HF_HUB_OFFLINE=1. Its intermediate checkpoint in the
two-stage case is written in bf16, as a user would store it (the cheaper choice for mergekit).

What is measured, per case and tool, each run in its own process:
  wall s        time.perf_counter() around the subprocess (interpreter start-up and imports
                included, as a user sees it); best of --repeat runs.
  peak RSS MiB  ru_maxrss of the process (resource.getrusage(RUSAGE_CHILDREN) in a fresh
                `python -c` wrapper per run); largest over the --repeat runs. For the
                two-stage mergekit row, the larger of its two runs. The RSS breakdown table
                adds the peaks of RssAnon (heap) and RssFile (mapped file pages, e.g. mmapped
                safetensors), sampled every 50 ms from /proc over the process tree.
  input MB/s    bytes of every input safetensors file the case reads (1 MB = 1e6 bytes) / wall.
                The same byte count is used for both tools.
  × I/O floor   wall / floor. The floor, measured per case in the same run (best of
                max(3, --repeat)): read every input file once with readinto() into a
                preallocated buffer, then write the output's byte count once to a file in the
                output folder's file system and delete it.
  mgc/mergekit  mgc wall / mergekit wall.
  fixed cost    printed once: each tool's wall time on a linear merge of the bundled 2.8 MB example
                models (start-up, imports, bookkeeping). The "net" table subtracts it from each
                wall time: that part grows with model size, so its ratio is where larger merges go.
  agreement     the largest ‖mgc − mergekit‖ / ‖mergekit‖ over all output tensors (in float64,
                after both were rounded to bf16), and the share of bit-identical tensors.

Page cache: every input file is read once before anything is timed, so all runs and floors
see a warm cache (the models fit in RAM many times over). os.sync() is called before every
timed run, outside the timing, so that one run's dirty output pages are not written back
during the next. No tool fsyncs its output, and neither does the floor.

Tool processes run with the work folder as their working directory, so the mgc they import is
the installed one (or the one PYTHONPATH names). To benchmark a fixed mgc while others commit
to the repository, install a snapshot and put it first:

    git archive HEAD | tar -x -C /tmp/snap/src
    pip install --no-deps --no-build-isolation --target /tmp/snap/lib /tmp/snap/src
    PYTHONPATH=/tmp/snap/lib python bench/bench.py ...

--deep also runs the linear case on the 16- and 32-layer models and prints each tool's peak
RSS at both depths: a streaming merge's should not grow with the number of layers.
--profile runs each selected case once more under cProfile (mgc only) and prints the top
functions by own time and by cumulative time.
"""
from __future__ import annotations

import argparse
import cProfile  # noqa: F401  (checked to be importable before any long run)
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

CASES = ("linear", "ties", "karcher", "slerp", "two-stage")
ROLES = {
    "linear": ("e1", "e2", "e3"),
    "ties": ("base", "e1", "e2", "e3"),
    "karcher": ("e1", "e2", "e3", "e4", "e5"),
    "slerp": ("base", "e1"),
    "two-stage": ("base", "e1", "e2", "e3", "e4", "e5"),
}
DESCRIPTION = {
    "linear": "linear(e1, e2, e3)",
    "ties": "ties(e1, e2, e3, base = base, density = 0.5)",
    "karcher": "karcher(e1..e5, max_iter = 10, tol = 1e-5)",
    "slerp": "slerp(base, e1, t = [0, 0.5, 1])",
    "two-stage": "slerp(base, karcher(e1..e5), t = 0.5)",
}
KARCHER = "max_iter = 10, tol = 1e-5"
MIB = 2**20
TINY = Path(__file__).resolve().parents[1] / "examples" / "models"  # the bundled 2.8 MB example checkpoints

# Runs `argv[2:]`, waits, and writes the child's rusage (ru_maxrss in KiB on Linux) to argv[1].
WRAPPER = (
    "import json, resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "json.dump({'maxrss_kib': r.ru_maxrss, 'user': r.ru_utime, 'sys': r.ru_stime}, open(sys.argv[1], 'w'))\n"
    "sys.exit(rc)\n"
)


# --------------------------------------------------------------------------- recipes and configs

def mgc_recipe(case: str, m: dict[str, Path], out: Path) -> str:
    # absolute paths: a recipe's relative paths would resolve against its own folder (the work folder)
    lines = [f'{r} = model("{m[r].resolve()}")' for r in ROLES[case]]
    expr = {
        "linear": "linear(e1, e2, e3)",
        "ties": "ties(e1, e2, e3, base = base, density = 0.5)",
        "karcher": f"karcher(e1, e2, e3, e4, e5, {KARCHER})",
        "slerp": "slerp(base, e1, t = [0, 0.5, 1])",
        "two-stage": "slerp(base, experts, t = 0.5)",
    }[case]
    if case == "two-stage":
        lines.append(f"experts = karcher(e1, e2, e3, e4, e5, {KARCHER})")
    lines.append(f'merged = {expr}')
    lines.append(f'save merged to "{out.resolve()}" {{ dtype = bf16 }}')
    return "\n".join(lines) + "\n"


def mk_stages(case: str, m: dict[str, Path], out: Path, work: Path) -> list[tuple[dict, Path]]:
    """mergekit configs, run one after the other, and the output folder of each."""
    def models(*roles, **params):
        return [{"model": str(m[r]), **({"parameters": dict(params)} if params else {})} for r in roles]

    def karcher():
        return {"merge_method": "karcher", "models": models("e1", "e2", "e3", "e4", "e5"),
                "parameters": {"max_iter": 10, "tol": 1e-5}}

    if case == "linear":
        return [({"merge_method": "linear", "models": models("e1", "e2", "e3", weight=1.0)}, out)]
    if case == "ties":
        return [({"merge_method": "ties", "base_model": str(m["base"]),
                  "models": models("e1", "e2", "e3", weight=1.0, density=0.5)}, out)]
    if case == "karcher":
        return [(karcher(), out)]
    if case == "slerp":
        return [({"merge_method": "slerp", "base_model": str(m["base"]), "models": models("base", "e1"),
                  "parameters": {"t": [0, 0.5, 1]}}, out)]
    if case == "two-stage":
        stage1 = work / "mk-stage1"
        slerp = {"merge_method": "slerp", "base_model": str(m["base"]),
                 "models": [{"model": str(m["base"])}, {"model": str(stage1)}], "parameters": {"t": 0.5}}
        return [(karcher(), stage1), (slerp, out)]
    raise ValueError(case)


# --------------------------------------------------------------------------- measuring one process

@dataclass
class Run:
    wall: float
    maxrss_kib: int
    cpu: float  # user + sys seconds of the process tree
    anon_kib: int = 0  # sampled peak RssAnon (process tree)
    file_kib: int = 0  # sampled peak RssFile (process tree)
    other_cpu: float = 0.0  # CPU seconds that other processes used during the run
    iowait: float = 0.0  # CPU seconds idle waiting for I/O during the run (all CPUs)


class TreeSampler(threading.Thread):
    """Polls /proc for the peak RssAnon and RssFile summed over a process and its descendants."""

    def __init__(self, pid: int, period: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.anon = self.file = 0
        self.done = threading.Event()

    def _tree(self) -> list[int]:
        pids, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            pids.append(p)
            try:
                for task in os.listdir(f"/proc/{p}/task"):
                    with open(f"/proc/{p}/task/{task}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
        return pids

    def run(self) -> None:
        while not self.done.is_set():
            anon = file = 0
            for p in self._tree():
                try:
                    with open(f"/proc/{p}/status") as f:
                        for line in f:
                            if line.startswith("RssAnon:"):
                                anon += int(line.split()[1])
                            elif line.startswith("RssFile:"):
                                file += int(line.split()[1])
                except OSError:
                    pass
            self.anon, self.file = max(self.anon, anon), max(self.file, file)
            self.done.wait(self.period)


def cpu_times() -> tuple[float, float]:
    """(busy, iowait) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / hz, iowait / hz


QUIET_WAIT = 0.0  # set from --wait-quiet


def wait_quiet(max_wait: float, busy_limit: float = 0.15) -> None:
    """Wait (up to max_wait s) until the machine is at most busy_limit busy over one second."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, _ = cpu_times()
        time.sleep(1.0)
        busy = (cpu_times()[0] - b0) / (os.cpu_count() or 1)
        if busy <= busy_limit or time.monotonic() >= deadline:
            if busy > busy_limit:
                print(f"warning: the machine is {busy:.0%} busy with other work; timing anyway", file=sys.stderr)
            return


def measure(argv: list[str], log: Path, env: Optional[dict] = None) -> Run:
    """Run argv in a fresh wrapper process; return wall time, peak RSS and CPU time."""
    os.sync()  # the previous run's dirty pages are written back now, not during this run
    if QUIET_WAIT > 0:
        wait_quiet(QUIET_WAIT)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tf:
        usage = Path(tf.name)
    with open(log, "w") as lf:
        busy0, iow0 = cpu_times()
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", WRAPPER, str(usage), *argv], stdout=lf,
                                stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - start
        busy1, iow1 = cpu_times()
        sampler.done.set()
        sampler.join()
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-15:])
        raise RuntimeError(f"exit status {rc}: {' '.join(argv)}\n{tail}")
    r = json.loads(usage.read_text())
    usage.unlink()
    cpu = r["user"] + r["sys"]
    return Run(wall, r["maxrss_kib"], cpu, sampler.anon, sampler.file, max(0.0, busy1 - busy0 - cpu), iow1 - iow0)


def best(runs: list[Run]) -> Run:
    """Fastest wall time; the largest memory figures over all runs."""
    b = min(runs, key=lambda r: r.wall)
    return Run(b.wall, max(r.maxrss_kib for r in runs), b.cpu,
               max(r.anon_kib for r in runs), max(r.file_kib for r in runs), b.other_cpu, b.iowait)


def combine(stages: list[Run]) -> Run:
    """Runs done one after the other: times add, memory is the larger."""
    return Run(sum(r.wall for r in stages), max(r.maxrss_kib for r in stages), sum(r.cpu for r in stages),
               max(r.anon_kib for r in stages), max(r.file_kib for r in stages),
               sum(r.other_cpu for r in stages), sum(r.iowait for r in stages))


# --------------------------------------------------------------------------- the tools

def rm(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_mgc(case: str, m: dict[str, Path], out: Path, work: Path, device: str) -> Run:
    recipe = work / f"{case}.merge"
    recipe.write_text(mgc_recipe(case, m, out))
    rm(out)
    argv = [sys.executable, "-m", "mgc.cli", "run", str(recipe), "-o", str(out), "--force", "-q", "--device", device]
    return measure(argv, work / f"mgc-{case}.log")


def mgc_startup(case: str, m: dict[str, Path], out: Path, work: Path, device: str) -> float:
    """Wall seconds of `mgc run --dry-run`: start-up, imports, parsing, checking and planning, no tensor data."""
    recipe = work / f"{case}.merge"
    recipe.write_text(mgc_recipe(case, m, out))
    argv = [sys.executable, "-m", "mgc.cli", "run", str(recipe), "-o", str(out), "--force", "-q", "--device", device,
            "--dry-run"]
    return measure(argv, work / f"mgc-{case}-dry.log").wall


def mk_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_mergekit(venv: Path, case: str, m: dict[str, Path], out: Path, work: Path, device: str, dtype: str) -> Run:
    stages = []
    for k, (config, dest) in enumerate(mk_stages(case, m, out, work)):
        if dtype == "float32":
            config = {**config, "dtype": "float32", "out_dtype": "bfloat16"}
        cfg = work / f"{case}-{k}.yml"
        cfg.write_text(json.dumps(config, indent=2))  # JSON is YAML
        rm(dest)
        argv = [str(venv / "bin" / "mergekit-yaml"), str(cfg), str(dest), "--no-copy-tokenizer", "--quiet"]
        if device == "cuda":
            argv.append("--cuda")
        stages.append(measure(argv, work / f"mk-{case}-{k}.log", env=mk_env()))
    if len(stages) > 1:
        rm(work / "mk-stage1")
    return combine(stages)


def fixed_costs(venv: Optional[Path], work: Path, device: str, dtype: str, n: int) -> dict[str, float]:
    """Each tool's fixed cost: the wall time of a linear merge of the bundled tiny example models (2.8 MB),
    i.e. interpreter start-up, imports, config handling and output bookkeeping, with almost no tensor work."""
    m = {"e1": TINY / "code", "e2": TINY / "math", "e3": TINY / "prose"}
    if not all((p / "config.json").is_file() for p in m.values()):
        return {}
    out = {"mgc": min(run_mgc("linear", m, work / "tiny-mgc", work, device).wall for _ in range(n))}
    rm(work / "tiny-mgc")
    if venv is not None:
        out["mergekit"] = min(run_mergekit(venv, "linear", m, work / "tiny-mk", work, device, dtype).wall
                              for _ in range(n))
        rm(work / "tiny-mk")
    return out


# --------------------------------------------------------------------------- the I/O floor

def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def read_all(files: list[Path], buf: memoryview) -> int:
    total = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(buf)
                if not n:
                    break
                total += n
    return total


def io_floor(inputs: list[Path], out_bytes: int, out_dir: Path, buf: memoryview) -> float:
    """Seconds to read every input byte once and write out_bytes once (then delete the file)."""
    os.sync()
    if QUIET_WAIT > 0:
        wait_quiet(QUIET_WAIT)
    scratch = out_dir / ".io-floor.tmp"
    start = time.perf_counter()
    read_all(inputs, buf)
    with open(scratch, "wb", buffering=0) as fh:
        left = out_bytes
        while left:
            n = min(left, len(buf))
            fh.write(buf[:n])
            left -= n
    elapsed = time.perf_counter() - start
    scratch.unlink()
    return elapsed


# --------------------------------------------------------------------------- agreement

def load_index(folder: Path) -> dict[str, Path]:
    out = {}
    for f in shard_files(folder):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: f for k in h.keys()})
    return out


def agreement(a_dir: Path, b_dir: Path) -> tuple[float, float]:
    """(max over tensors of ‖a − b‖ / ‖b‖, share of bit-identical tensors), comparing every tensor."""
    a_idx, b_idx = load_index(a_dir), load_index(b_dir)
    if set(a_idx) != set(b_idx):
        only_a, only_b = sorted(set(a_idx) - set(b_idx)), sorted(set(b_idx) - set(a_idx))
        raise RuntimeError(f"tensor names differ: only mgc {only_a[:3]}, only mergekit {only_b[:3]}")
    handles: dict[Path, object] = {}

    def get(path: Path, name: str) -> torch.Tensor:
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(name)

    worst, same = 0.0, 0
    for name in sorted(a_idx):
        x, y = get(a_idx[name], name), get(b_idx[name], name)
        if x.shape != y.shape:
            raise RuntimeError(f"{name}: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
        if torch.equal(x, y):
            same += 1
            continue
        xd, yd = x.double(), y.double()
        worst = max(worst, (xd - yd).norm().item() / max(yd.norm().item(), 1e-30))
    return worst, same / len(a_idx)


# --------------------------------------------------------------------------- profile

def profile_mgc(case: str, m: dict[str, Path], work: Path, device: str, top: int) -> str:
    out = work / f"prof-{case}"
    recipe = work / f"{case}.merge"
    recipe.write_text(mgc_recipe(case, m, out))
    prof = work / f"{case}.prof"
    rm(out)
    os.sync()
    subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "mgc.cli", "run", str(recipe), "-o",
                    str(out), "--force", "-q", "--device", device], check=True, capture_output=True, cwd=work)
    rm(out)
    import io

    s = io.StringIO()
    st = pstats.Stats(str(prof), stream=s)
    st.strip_dirs().sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    return s.getvalue()


# --------------------------------------------------------------------------- main

@dataclass
class Row:
    case: str
    tool: str
    run: Optional[Run] = None
    floor: Optional[float] = None
    input_bytes: int = 0
    ratio: Optional[float] = None  # mgc / mergekit wall
    agree: Optional[str] = None
    startup: Optional[float] = None  # mgc --dry-run wall s
    failed: Optional[str] = None  # why the tool's run did not finish (e.g. killed for memory)


def _oom_note() -> str:
    """", killed for memory" when the kernel log's last line says the OOM killer ended a process."""
    try:
        tail = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[-3:]
    except (OSError, subprocess.SubprocessError):
        return ""
    return ", killed by the kernel for memory (OOM)" if any("Out of memory: Killed process" in line for line in tail) else ""


def model_paths(models: Path, prefix: str, roles) -> dict[str, Path]:
    m = {r: models / f"{prefix}{r}" for r in roles}
    missing = [str(p) for p in m.values() if not (p / "config.json").is_file()]
    if missing:
        raise SystemExit(f"missing checkpoints: {', '.join(missing)}\nmake them with bench/make_bench_models.py")
    return m


def fmt_table(rows: list[Row]) -> str:
    lines = ["| case | tool | wall s | peak RSS MiB | input MB/s | × I/O floor | mgc/mergekit | agreement |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.tool == "I/O floor":
            lines.append(f"| {r.case} | I/O floor | {r.floor:.2f} | | {r.input_bytes / 1e6 / r.floor:,.0f} | 1.00 | | |")
            continue
        if r.failed:
            lines.append(f"| {r.case} | {r.tool} | failed: {r.failed} | | | | | |")
            continue
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else ""
        lines.append(
            f"| {r.case} | {r.tool} | {r.run.wall:.2f} | {r.run.maxrss_kib / 1024:,.0f} | "
            f"{r.input_bytes / 1e6 / r.run.wall:,.0f} | {r.run.wall / r.floor:.1f} | {ratio} | {r.agree or ''} |")
    return "\n".join(lines)


def fmt_breakdown(rows: list[Row]) -> str:
    n = os.cpu_count() or 1
    lines = ["| case | tool | start-up s | CPU s (user+sys) | CPU / wall | other processes' CPU | iowait | "
             "peak RssAnon MiB | peak RssFile MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.run is None:
            continue
        startup = f"{r.startup:.2f}" if r.startup is not None else ""
        lines.append(f"| {r.case} | {r.tool} | {startup} | {r.run.cpu:.1f} | {r.run.cpu / r.run.wall:.2f} | "
                     f"{r.run.other_cpu / (n * r.run.wall):.0%} | {r.run.iowait / (n * r.run.wall):.0%} | "
                     f"{r.run.anon_kib / 1024:,.0f} | {r.run.file_kib / 1024:,.0f} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs{mem}, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def mgc_revision() -> str:
    """The mgc package's git commit, and whether its working tree has changes (read-only git calls)."""
    import mgc

    root = Path(mgc.__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return f"mgc imported from {Path(mgc.__file__).parent}"
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(root)
    return f"{root} at {head}" + (" with uncommitted changes" if dirty else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit-venv", type=Path, help="a venv with mergekit 0.1.5 (without it: mgc columns only)")
    ap.add_argument("--models", type=Path, default=Path("/tmp/mgc-bench/models"), help="from make_bench_models.py")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mgc-bench/work"), help="recipes, logs and outputs")
    ap.add_argument("--prefix", default="l16-", help="the checkpoints' folder prefix: l16- (default), or e.g. 8b-l4- "
                                                     "for make_bench_models.py --preset 8b --layers 4")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), metavar="CASE",
                    help=f"a subset of {', '.join(CASES)}")
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs (default 1)")
    ap.add_argument("--deep", action="store_true", help="also compare peak RSS on the 16- and 32-layer models")
    ap.add_argument("--mergekit-dtype", choices=("float32", "native"), default="float32",
                    help="float32: dtype float32 + out_dtype bfloat16 (equal work, default); "
                         "native: mergekit's default, computing in bf16")
    ap.add_argument("--wait-quiet", type=float, default=60.0, metavar="S",
                    help="before each timed run, wait up to S seconds for other processes to leave the CPUs "
                         "idle (at most 15%% busy over 1 s); 0 disables (default 60)")
    ap.add_argument("--profile", action="store_true", help="profile one extra mgc run per case with cProfile")
    ap.add_argument("--profile-top", type=int, default=25)
    args = ap.parse_args()
    global QUIET_WAIT
    QUIET_WAIT = args.wait_quiet

    venv = args.mergekit_venv
    if venv is not None and not (venv / "bin" / "mergekit-yaml").exists():
        print(f"no mergekit-yaml in {venv}/bin", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    m16 = model_paths(args.models, args.prefix, sorted({r for c in args.cases for r in ROLES[c]}))
    m32 = model_paths(args.models, "l32-", ROLES["linear"]) if args.deep else {}
    out_bytes = {16: sum(f.stat().st_size for f in shard_files(m16[next(iter(m16))]))}
    if m32:
        out_bytes[32] = sum(f.stat().st_size for f in shard_files(m32["e1"]))

    print(f"machine: {machine()}")
    print(f"mgc: {mgc_revision()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"device: {args.device}; mergekit: {venv or 'not run'}"
          + (f" (dtype {'float32, out_dtype bfloat16' if args.mergekit_dtype == 'float32' else 'native (bf16)'})"
             if venv else ""))
    all_files = [f for p in (*m16.values(), *m32.values()) for f in shard_files(p)]
    buf = memoryview(bytearray(max(64 * MIB, max(f.stat().st_size for f in all_files))))
    start = time.perf_counter()
    warm = read_all(all_files, buf)
    print(f"page cache: warm. Every input file ({warm / 1e9:.2f} GB in {len(all_files)} files) was read once "
          f"before timing ({time.perf_counter() - start:.1f} s); os.sync() before each timed run.")
    print(f"best of {args.repeat} run(s) for wall times; peak RSS is the largest over those runs.", flush=True)
    fixed = fixed_costs(venv, work, args.device, args.mergekit_dtype, max(2, args.repeat))
    if fixed:
        print("fixed cost per process (wall s of a linear merge of the 2.8 MB example models, best of "
              f"{max(2, args.repeat)}): " + ", ".join(f"{k} {v:.2f} s" for k, v in fixed.items()))
    print(flush=True)

    rows: list[Row] = []
    summary: list[tuple[str, Row, Optional[Row]]] = []
    for case in args.cases:
        files = [f for r in ROLES[case] for f in shard_files(m16[r])]
        nbytes = sum(f.stat().st_size for f in files)
        floor = min(io_floor(files, out_bytes[16], work, buf) for _ in range(max(3, args.repeat)))
        rows.append(Row(case, "I/O floor", floor=floor, input_bytes=nbytes))
        mgc_out, mk_out = work / f"mgc-{case}", work / f"mk-{case}"
        mgc_row = Row(case, "mgc", best([run_mgc(case, m16, mgc_out, work, args.device) for _ in range(args.repeat)]),
                      floor, nbytes)
        mgc_row.startup = min(mgc_startup(case, m16, mgc_out, work, args.device) for _ in range(args.repeat))
        rows.append(mgc_row)
        mk_row = None
        if venv is not None:
            label = "mergekit" + (" (2 runs)" if case == "two-stage" else "")
            try:
                mk_row = Row(case, label, best([run_mergekit(venv, case, m16, mk_out, work, args.device,
                                                             args.mergekit_dtype) for _ in range(args.repeat)]),
                             floor, nbytes)
            except RuntimeError as e:  # a run that fails (the OOM killer: exit status 247 or -9) is a result too
                status = str(e).split(":")[0]
                mk_row = Row(case, label, floor=floor, input_bytes=nbytes, failed=f"{status}{_oom_note()}")
            rows.append(mk_row)
            if mk_row.run is not None:
                mgc_row.ratio = mgc_row.run.wall / mk_row.run.wall
                try:
                    rel, same = agreement(mgc_out, mk_out)
                    mgc_row.agree = f"max rel {rel:.1e}, {same:.0%} identical"
                except Exception as e:  # report and go on
                    mgc_row.agree = f"error: {e}"
        summary.append((case, mgc_row, mk_row))
        rm(mgc_out)
        rm(mk_out)
        print(f"{case}: floor {floor:.2f} s, mgc {mgc_row.run.wall:.2f} s"
              + (f", mergekit {mk_row.run.wall:.2f} s" if mk_row and mk_row.run else
                 f", mergekit failed ({mk_row.failed})" if mk_row else ""), file=sys.stderr, flush=True)

    print("| case | recipe |\n|---|---|")
    for case in args.cases:
        print(f"| {case} | `{DESCRIPTION[case]}` |")
    print()
    print(fmt_table(rows))
    print("\nCPU and memory breakdown. Start-up: wall s of `mgc run --dry-run` (interpreter, imports, parse, "
          "check, plan; no tensor data), included in the mgc wall time above. CPU / wall: cores kept busy (of {n}). Other processes' CPU and iowait: "
          "share of the machine's CPU time during the run, from /proc/stat. Peaks sampled every 50 ms from "
          "/proc; RssFile counts mapped file pages (mmapped safetensors):\n".format(n=os.cpu_count()))
    print(fmt_breakdown(rows))

    if args.deep:
        deep_rows = []
        for layers, m in ((16, m16), (32, m32)):
            files = [f for r in ROLES["linear"] for f in shard_files(m[r])]
            nbytes = sum(f.stat().st_size for f in files)
            floor = min(io_floor(files, out_bytes[layers], work, buf) for _ in range(max(3, args.repeat)))
            tools = [("mgc", lambda out: run_mgc("linear", m, out, work, args.device))]
            if venv is not None:
                tools.append(("mergekit", lambda out: run_mergekit(venv, "linear", m, out, work, args.device,
                                                                    args.mergekit_dtype)))
            for tool, fn in tools:
                out = work / f"deep-{tool}-{layers}"
                run = best([fn(out) for _ in range(args.repeat)])
                rm(out)
                deep_rows.append((tool, layers, nbytes, floor, run))
        print("\nPeak RSS against depth: linear over 3 experts, 16 and 32 layers:\n")
        print("| tool | layers | input GB | wall s | × I/O floor | peak RSS MiB | peak RssAnon MiB | peak RssFile MiB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for tool, layers, nbytes, floor, run in deep_rows:
            print(f"| {tool} | {layers} | {nbytes / 1e9:.2f} | {run.wall:.2f} | {run.wall / floor:.1f} | "
                  f"{run.maxrss_kib / 1024:,.0f} | {run.anon_kib / 1024:,.0f} | {run.file_kib / 1024:,.0f} |")
        for tool in dict.fromkeys(t for t, *_ in deep_rows):
            r16, r32 = (next(r for t, l, *_, r in deep_rows if t == tool and l == n) for n in (16, 32))
            print(f"{tool}: peak RSS ×{r32.maxrss_kib / r16.maxrss_kib:.2f} from 16 to 32 layers "
                  f"(RssAnon ×{r32.anon_kib / max(r16.anon_kib, 1):.2f})")

    if venv is not None and len(fixed) == 2:
        print("\nMerge time net of each process's fixed cost (wall − fixed cost; mergekit's two-stage pays it "
              "twice). This part grows with model size, so its ratio is what larger merges tend to:\n")
        print("| case | mgc net s | mergekit net s | mgc/mergekit |\n|---|---:|---:|---:|")
        for case, g, k in summary:
            if k is None or k.run is None:
                continue
            gn = g.run.wall - fixed["mgc"]
            kn = k.run.wall - fixed["mergekit"] * (2 if case == "two-stage" else 1)
            print(f"| {case} | {gn:.2f} | {kn:.2f} | {gn / kn:.2f} |" if kn > 0 else f"| {case} | {gn:.2f} | {kn:.2f} | |")

    if venv is not None:
        print("\nTargets:\n")
        for case, g, k in summary:
            if k is None:
                continue
            if k.run is None:
                print(f"- {case}: mergekit did not finish ({k.failed}); mgc did, with a peak RSS of "
                      f"{g.run.maxrss_kib / 1024:,.0f} MiB")
                continue
            checks = [f"wall {g.run.wall / k.run.wall:.2f}× mergekit (target ≤ 0.5)",
                      f"peak RSS {g.run.maxrss_kib / k.run.maxrss_kib:.2f}× mergekit (target ≤ 0.5)"]
            if case in ("linear", "slerp"):
                checks.append(f"{g.run.wall / g.floor:.1f}× I/O floor (target ≤ 1.3 for linear-class)")
            if case == "two-stage":
                checks.append("one mgc run " + ("faster" if g.run.wall < k.run.wall else "NOT faster")
                              + " than two mergekit runs")
            print(f"- {case}: " + "; ".join(checks))

    if args.profile:
        for case in args.cases:
            print(f"\ncProfile of mgc, case {case}:\n")
            print(profile_mgc(case, m16, work, args.device, args.profile_top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
