"""Resume and torchrun benchmark: the same merge by one process, by N ranks (torchrun), and killed half-way then
resumed, with the outputs checked byte for byte against each other.

Run on demand, not in the test suite, on the checkpoints of bench/make_bench_models.py:

    python bench/make_bench_models.py                   # /tmp/mgc-bench/models/l16-base, l16-e1 .. l16-e5
    python bench/resume_distributed.py [--ranks 2] [--experts 3]

Each run is a fresh process (wall time including start-up; torchrun's own start-up included for the ranks). The
killed run is stopped with SIGKILL after half of the tensors were written (MGC_TEST_KILL_AFTER, the hook of
tests/test_resume.py), with the default journaling (groups of 256 MiB or 10 s), so the resumed run redoes what
the last group had not journaled yet.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

RECIPE = """base = model("{models}/l16-base")
{experts}
save ties({names}, base = base, density = 0.5) to "{out}" {{ shard = "200MB" }}
"""


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def timed(argv: list[str], env: dict, cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    os.sync()  # the previous run's dirty pages are written back now, not during this run
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - start, done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, default=Path("/tmp/mgc-bench/models"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/mgc-bench/resume"))
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    models = args.models.resolve()
    if not (models / "l16-base").is_dir():
        print(f"no {models}/l16-base: run bench/make_bench_models.py first", file=sys.stderr)
        return 1
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = work / "out" / "merged"
    names = [f"e{k}" for k in range(1, args.experts + 1)]
    experts = "\n".join(f'{n} = model("{models}/l16-{n}")' for n in names)
    (work / "r.merge").write_text(RECIPE.format(models=models, experts=experts, names=", ".join(names), out=out))
    cores = os.cpu_count() or 1
    env = {**os.environ}
    mgc = [sys.executable, "-m", "mgc", "run", "-q", "--device", args.device, "r.merge"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
                "-m", "mgc", "run", "-q", "--device", args.device, "r.merge"]
    rows, digests = [], {}

    def run(label: str, argv: list[str], extra: dict) -> subprocess.CompletedProcess:
        seconds, done = timed(argv, {**env, **extra}, work)
        rows.append((label, seconds, done))
        return done

    def check(label: str) -> None:
        digests[label] = digest(out)
        shutil.rmtree(work / "out")

    done = run("1 process", mgc, {})
    assert done.returncode == 0, done.stderr
    check("1 process")
    done = run(f"{args.ranks} ranks (torchrun)", torchrun, {"OMP_NUM_THREADS": str(max(1, cores // args.ranks))})
    assert done.returncode == 0, done.stderr
    check(f"{args.ranks} ranks")
    total = 3 + 9 * 16  # tensors of an l16 model: embeddings, final norm, head, 9 per layer
    done = run("killed half-way", mgc, {"MGC_TEST_KILL_AFTER": str(total // 2)})
    assert done.returncode == -signal.SIGKILL, done.stderr
    done = run("resumed", mgc, {})
    assert done.returncode == 0, done.stderr
    said = re.search(r"resuming '.*': (.*) already written", done.stderr)
    check("killed + resumed")

    print(f"ties of {args.experts} experts on l16 models (486 MiB each), device {args.device}, {cores} CPU cores")
    print(f"{'run':24s} {'wall s':>8s}")
    for label, seconds, _ in rows:
        print(f"{label:24s} {seconds:8.2f}")
    print(f"resumed run: {said.group(1) if said else 'nothing resumed'} already written")
    same = len({tuple(sorted(d.items())) for d in digests.values()}) == 1
    print(f"outputs byte-identical ({', '.join(digests)}): {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
