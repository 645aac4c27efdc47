"""LoRA extraction benchmark: `extract_lora` (full and randomized SVD) against `mergekit-extract-lora`.

Run on demand, not in the test suite. Make the checkpoints first (a 0.5 GB base and a fine-tune of it whose
deltas have a slowly decaying spectrum, as a full fine-tune's do):

    python bench/make_bench_models.py --experts 0 --tuned
    python bench/extract_lora.py --mergekit-venv ../mk          # ranks 16, 64, 256

For each rank, each tool runs in its own process (bench/bench.py's `measure`: wall time including start-up,
peak RSS). mgc writes bf16 factors, as mergekit does from bf16 inputs. Kept energy is computed here, independently
of both tools: for every adapted tensor, Δ = tuned − base in float64, and the factors read back from the adapter
with peft's scale; kept = 1 − ‖Δ − s·B·A‖² / ‖Δ‖², summed over tensors ("overall") and the lowest one ("worst").
"optimum" is the Eckart–Young bound at that rank, Σ of the top r σ² / ‖Δ‖², from torch.linalg.svdvals.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import MIB, Run, best, machine, measure, mgc_revision, mk_env, rm  # noqa: E402

from mgc.compiler.lora_config import rank_of  # noqa: E402

PREFIX = "base_model.model."


def tensors_of(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {n: folder / f for n, f in json.loads(index.read_text())["weight_map"].items()}
    return {n: folder / "model.safetensors" for n in _names(folder / "model.safetensors")}


def _names(file: Path) -> list[str]:
    with safe_open(str(file), "pt") as f:
        return list(f.keys())


def read(files: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(str(files[name]), "pt") as f:
        return f.get_tensor(name)


def deltas(base: Path, tuned: Path):
    """(name, Δ in float64) for each 2-D weight in the layers: the tensors both tools adapt by default."""
    b, t = tensors_of(base), tensors_of(tuned)
    for name in sorted(b):
        if name.startswith("model.layers.") and name.endswith(".weight"):
            x = read(b, name)
            if x.dim() == 2:
                yield name, read(t, name).double() - x.double()


def optimum(base: Path, tuned: Path, ranks: list[int]) -> dict[int, float]:
    kept = {r: 0.0 for r in ranks}
    total = 0.0
    for _, d in deltas(base, tuned):
        s2 = torch.linalg.svdvals(d.float()).double().pow(2)
        total += float(s2.sum())
        for r in ranks:
            kept[r] += float(s2[:r].sum())
    return {r: k / total for r, k in kept.items()}


def kept_energy(adapter: Path, base: Path, tuned: Path) -> tuple[float, float, int]:
    """(overall kept fraction, worst tensor's, adapter bytes)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    weights = adapter / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
        total = residual = 0.0
        worst = 1.0
        for name, d in deltas(base, tuned):
            module = name.removesuffix(".weight")
            a_key, b_key = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
            if a_key not in keys:
                approx = torch.zeros_like(d)
            else:
                approx = rank_of(config, module).factor * (f.get_tensor(b_key).double() @ f.get_tensor(a_key).double())
            e, r = float(d.pow(2).sum()), float((d - approx).pow(2).sum())
            total, residual = total + e, residual + r
            worst = min(worst, 1 - r / e if e else 1.0)
    return 1 - residual / total, worst, weights.stat().st_size


def mgc_recipe(base: Path, tuned: Path, rank: int, svd: str, out: Path) -> str:
    return (
        f'base = model("{base.resolve()}")\n'
        f'tuned = model("{tuned.resolve()}")\n'
        f'save extract_lora(tuned, base = base, rank = {rank}, svd = "{svd}") to "{out.resolve()}" {{ dtype = bf16 }}\n'
    )


def run_mgc(base: Path, tuned: Path, rank: int, svd: str, out: Path, work: Path, device: str) -> Run:
    recipe = work / f"extract-{svd}-{rank}.merge"
    recipe.write_text(mgc_recipe(base, tuned, rank, svd, out))
    rm(out)
    argv = [sys.executable, "-m", "mgc.cli", "run", str(recipe), "--force", "-q", "--device", device]
    return measure(argv, work / f"mgc-{svd}-{rank}.log")


def run_mergekit(venv: Path, base: Path, tuned: Path, rank: int, out: Path, work: Path, device: str) -> Run:
    rm(out)
    argv = [str(venv / "bin" / "mergekit-extract-lora"), "--model", str(tuned), "--base-model", str(base),
            "--out-path", str(out), "--max-rank", str(rank), "--quiet"]
    if device == "cuda":
        argv.append("--cuda")
    return measure(argv, work / f"mk-{rank}.log", env=mk_env())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=Path("/tmp/mgc-bench/models"))
    ap.add_argument("--prefix", default="l16-", help="checkpoint folder prefix (default l16-)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--svd", nargs="+", default=["full", "randomized", "auto"], help="mgc's svd modes to run")
    ap.add_argument("--mergekit-venv", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mgc-bench/extract"))
    args = ap.parse_args()
    base, tuned = args.models / f"{args.prefix}base", args.models / f"{args.prefix}tuned"
    if not (base / "config.json").is_file() or not (tuned / "config.json").is_file():
        print("make the checkpoints first: python bench/make_bench_models.py --experts 0 --tuned", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(f"machine: {machine()}")
    print(f"mgc: {mgc_revision()}")
    print(f"inputs: {base} and {tuned}, {size / 1e9:.2f} GB each; device {args.device}\n")
    best_kept = optimum(base, tuned, args.ranks)
    rows = []
    for rank in args.ranks:
        tools = [(f"mgc svd={svd}", lambda o, s=svd: run_mgc(base, tuned, rank, s, o, args.work, args.device))
                 for svd in args.svd]
        if args.mergekit_venv is not None:
            tools.append(("mergekit-extract-lora",
                          lambda o: run_mergekit(args.mergekit_venv, base, tuned, rank, o, args.work, args.device)))
        for label, runner in tools:
            out = args.work / f"out-{rank}-{label.split()[-1]}"
            run = best([runner(out) for _ in range(args.repeat)])
            overall, worst, nbytes = kept_energy(out, base, tuned)
            rows.append((rank, label, run, overall, worst, nbytes))
            print(f"  rank {rank:4d}  {label:22s} {run.wall:7.1f} s  {run.maxrss_kib / 1024:7.0f} MiB  kept {overall:.4f}",
                  file=sys.stderr, flush=True)
            rm(out)
    print("| rank | tool | wall s | peak RSS MiB | kept energy (overall) | worst tensor | optimum | adapter MiB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for rank, label, run, overall, worst, nbytes in rows:
        print(f"| {rank} | {label} | {run.wall:.1f} | {run.maxrss_kib / 1024:.0f} | {overall:.4f} | {worst:.4f} | "
              f"{best_kept[rank]:.4f} | {nbytes / MIB:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
