"""Parity with mergekit: run the same merges through mgc and mergekit 0.1.5 and compare every tensor.

mergekit is never a dependency of mgc: this script installs nothing and takes the path of a
virtual environment where mergekit is installed, e.g.

    python3 -m venv ../mk && ../mk/bin/pip install torch==2.13.0 mergekit==0.1.5
    python bench/parity_mergekit.py --mergekit-venv ../mk

Both sides compute and write float32, from the bundled bf16 example models. Printed per method:
the largest relative difference ‖a − b‖ / ‖b‖ over all tensors, the largest absolute difference,
and the share of tensors that are bit-identical.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "models"


def mk_model(name: str, **params) -> dict:
    entry = {"model": str(MODELS / name)}
    if params:
        entry["parameters"] = params
    return entry


# name -> (mgc expression, mergekit config without dtype/out_dtype)
CASES: dict[str, tuple[str, dict]] = {
    "linear": (
        "linear(code, math, prose, weights = [1, 2, 3])",
        {"merge_method": "linear", "models": [mk_model("code", weight=1), mk_model("math", weight=2), mk_model("prose", weight=3)]},
    ),
    "slerp": (
        "slerp(base, code, t = [0.2, 0.8])",
        {"merge_method": "slerp", "base_model": str(MODELS / "base"), "models": [mk_model("base"), mk_model("code")],
         "parameters": {"t": [0.2, 0.8]}},
    ),
    "multislerp": (
        "multislerp(code, math, prose, weights = [1, 2, 3])",
        {"merge_method": "multislerp", "models": [mk_model("code", weight=1), mk_model("math", weight=2), mk_model("prose", weight=3)]},
    ),
    "multislerp_base": (
        "multislerp(code, math, prose, base = base, weights = [1, 2, 3])",
        {"merge_method": "multislerp", "base_model": str(MODELS / "base"),
         "models": [mk_model("code", weight=1), mk_model("math", weight=2), mk_model("prose", weight=3)]},
    ),
    "nuslerp": (
        "nuslerp(code, math, weights = [1, 3])",
        {"merge_method": "nuslerp", "models": [mk_model("code", weight=1), mk_model("math", weight=3)]},
    ),
    "nuslerp_base": (
        "nuslerp(code, math, base = base, weights = [1, 3])",
        {"merge_method": "nuslerp", "base_model": str(MODELS / "base"),
         "models": [mk_model("code", weight=1), mk_model("math", weight=3)]},
    ),
    "karcher (equal weights)": (
        "karcher(code, math, prose)",
        {"merge_method": "karcher", "models": [mk_model("code"), mk_model("math"), mk_model("prose")]},
    ),
    "task_arithmetic": (
        "task_arithmetic(code, math, prose, base = base, weights = [0.5, 0.3, 0.2])",
        {"merge_method": "task_arithmetic", "base_model": str(MODELS / "base"),
         "models": [mk_model("code", weight=0.5), mk_model("math", weight=0.3), mk_model("prose", weight=0.2)]},
    ),
    "ties": (
        "ties(code, math, prose, base = base, density = 0.5, weights = [1, 0.5, 0.7])",
        {"merge_method": "ties", "base_model": str(MODELS / "base"),
         "models": [mk_model("code", weight=1, density=0.5), mk_model("math", weight=0.5, density=0.5),
                    mk_model("prose", weight=0.7, density=0.5)]},
    ),
    "breadcrumbs": (
        "breadcrumbs(code, math, prose, base = base, density = 0.8, gamma = 0.05)",
        {"merge_method": "breadcrumbs", "base_model": str(MODELS / "base"),
         "models": [mk_model(m, weight=1, density=0.8, gamma=0.05) for m in ("code", "math", "prose")]},
    ),
    "breadcrumbs_ties": (
        "breadcrumbs_ties(code, math, prose, base = base, density = 0.8, gamma = 0.05)",
        {"merge_method": "breadcrumbs_ties", "base_model": str(MODELS / "base"),
         "models": [mk_model(m, weight=1, density=0.8, gamma=0.05) for m in ("code", "math", "prose")]},
    ),
    "model_stock": (
        "model_stock(code, math, prose, base = base)",
        {"merge_method": "model_stock", "base_model": str(MODELS / "base"),
         "models": [mk_model("code"), mk_model("math"), mk_model("prose")]},
    ),
    "sce": (
        "sce(code, math, prose, base = base, select_topk = 0.5)",
        {"merge_method": "sce", "base_model": str(MODELS / "base"),
         "models": [mk_model("code"), mk_model("math"), mk_model("prose")], "parameters": {"select_topk": 0.5}},
    ),
    "arcee_fusion": (
        "arcee_fusion(code, base = base)",
        {"merge_method": "arcee_fusion", "base_model": str(MODELS / "base"), "models": [mk_model("base"), mk_model("code")]},
    ),
    "nearswap": (
        "nearswap(code, base = base, t = 0.002)",
        {"merge_method": "nearswap", "base_model": str(MODELS / "base"), "models": [mk_model("base"), mk_model("code")],
         "parameters": {"t": 0.002}},
    ),
    "ram": (
        "ram(code, math, prose, base = base)",
        {"merge_method": "ram", "base_model": str(MODELS / "base"),
         "models": [mk_model("code"), mk_model("math"), mk_model("prose")]},
    ),
    "ram (epsilon = 1e-3)": (
        "ram(code, math, prose, base = base, epsilon = 1e-3)",
        {"merge_method": "ram", "base_model": str(MODELS / "base"),
         "models": [mk_model("code"), mk_model("math"), mk_model("prose")], "parameters": {"epsilon": 1e-3}},
    ),
    "ramplus_tl": (
        "ramplus_tl(code, math, prose, base = base)",
        {"merge_method": "ramplus_tl", "base_model": str(MODELS / "base"),
         "models": [mk_model("code"), mk_model("math"), mk_model("prose")]},
    ),
    "ramplus_tl (r = 0.05, alpha = 1000, epsilon = 1e-3)": (
        "ramplus_tl(code, math, prose, base = base, r = 0.05, alpha = 1000, epsilon = 1e-3)",
        {"merge_method": "ramplus_tl", "base_model": str(MODELS / "base"),
         "models": [mk_model("code"), mk_model("math"), mk_model("prose")],
         "parameters": {"r": 0.05, "alpha": 1000.0, "epsilon": 1e-3}},
    ),
}

RECIPE_HEAD = "\n".join(f'{m} = model("{MODELS / m}")' for m in ("base", "code", "math", "prose"))


def run_mgc(expr: str, out: Path) -> float:
    from mgc.api import run

    text = f'{RECIPE_HEAD}\nmerged = {expr}\nsave merged to "{out}" {{ dtype = fp32 }}\n'
    start = time.perf_counter()
    run("parity.merge", text=text, device="cpu")
    return time.perf_counter() - start


def run_mergekit(venv: Path, config: dict, out: Path, work: Path) -> float:
    cfg = work / f"{out.name}.yml"
    cfg.write_text(json.dumps({**config, "dtype": "float32", "out_dtype": "float32"}, indent=2))
    start = time.perf_counter()
    proc = subprocess.run(
        [str(venv / "bin" / "mergekit-yaml"), str(cfg), str(out), "--lazy-unpickle", "--quiet"] if False else
        [str(venv / "bin" / "mergekit-yaml"), str(cfg), str(out)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "mergekit failed")
    return time.perf_counter() - start


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def compare(a: dict, b: dict) -> tuple[float, float, float]:
    if set(a) != set(b):
        raise RuntimeError(f"tensor names differ: only mgc {sorted(set(a) - set(b))[:3]}, only mergekit {sorted(set(b) - set(a))[:3]}")
    rel = absd = 0.0
    same = 0
    for k in a:
        x, y = a[k].double(), b[k].double()
        d = (x - y).norm().item()
        rel = max(rel, d / max(y.norm().item(), 1e-30))
        absd = max(absd, (x - y).abs().max().item())
        same += int(torch.equal(a[k], b[k]))
    return rel, absd, same / len(a)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit-venv", type=Path, required=True, help="a venv with mergekit 0.1.5 installed")
    ap.add_argument("--only", nargs="*", help="run only these cases")
    args = ap.parse_args()
    if not (args.mergekit_venv / "bin" / "mergekit-yaml").exists():
        print(f"no mergekit-yaml in {args.mergekit_venv}/bin", file=sys.stderr)
        return 2
    print(f"| method | mgc expression | max rel. diff | max abs. diff | identical tensors |")
    print(f"|---|---|---|---|---|")
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, (expr, config) in CASES.items():
            if args.only and name not in args.only:
                continue
            slug = re.sub(r"\W+", "_", name).strip("_")  # unique per case
            try:
                run_mgc(expr, work / f"mgc-{slug}")
                run_mergekit(args.mergekit_venv, config, work / f"mk-{slug}", work)
                rel, absd, same = compare(read_all(work / f"mgc-{slug}"), read_all(work / f"mk-{slug}"))
                print(f"| {name} | `{expr}` | {rel:.2e} | {absd:.2e} | {same:.0%} |", flush=True)
            except Exception as e:  # report and go on with the other methods
                failed += 1
                print(f"| {name} | `{expr}` | error: {e} | | |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
