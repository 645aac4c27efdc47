"""Small-scale reproduction of the Karcher-merging collapse claims (arXiv:2603.04972, Fig. 1 and Fig. 2).

    python experiments/collapse/run.py [--seeds 0 1] [--work-dir /tmp/mgc-collapse] [--out experiments/collapse/results]

Per seed: pre-train a tiny Llama briefly on a mix of all tasks (the shared base), fine-tune one expert per
task from it with deliberately different learning rates and step counts, then merge the first m experts
(m = 2..N) with mgc by every method in merge.METHODS and score each merge on the m tasks' held-out sets.
At the largest m, per-layer activation variance and effective rank are taken on a fixed probe batch.
Writes table.md, accuracy_vs_m.png, layers.png and results.json under --out. Checkpoints and merges go
under --work-dir; trained checkpoints are reused when their training recipe is unchanged (--fresh retrains).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import merge as M  # noqa: E402
import train as T  # noqa: E402
from diagnostics import layer_statistics as own_layer_statistics, weight_geometry  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tasks import TASKS, batch, heldout  # noqa: E402

# The experts in merge order: (task, learning rate, steps). The step sizes differ on purpose, so the
# experts move different distances from the base (their relative task-vector norms are recorded).
EXPERTS: list[tuple[str, float, int]] = [
    ("copy", 1e-3, 200),
    ("sort", 1e-3, 300),
    ("cipher", 3e-3, 200),
    ("count", 5e-4, 200),
    ("reverse", 2e-3, 300),
    ("double", 1e-3, 150),
    ("increment", 3e-3, 300),
    ("brackets", 2e-3, 200),
]
PRETRAIN = dict(steps=800, lr=2e-3, batch_size=32, hide_tag=True)
FINETUNE_BATCH = 32
N_EVAL = 256  # held-out examples per task
PROBE_PER_TASK = 32  # probe batch for the diagnostics: this many held-out-style prompts of every task


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one full run (base, experts, merges) per seed")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/mgc-collapse"), help="checkpoints and merges")
    p.add_argument("--out", type=Path, default=HERE / "results", help="table.md, the PNGs and results.json")
    p.add_argument("--experts", type=int, default=len(EXPERTS), help="N: merge m = 2..N experts")
    p.add_argument("--lr-scale", type=float, default=1.0,
                   help="multiply every expert's learning rate (0.3: experts that move about 3x less from the base)")
    p.add_argument("--methods", nargs="+", default=list(M.METHODS), choices=list(M.METHODS))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest for this model size on a small, shared CPU)")
    p.add_argument("--fresh", action="store_true", help="retrain even when cached checkpoints match")
    p.add_argument("--keep-merges", action="store_true", help="keep every merged checkpoint under --work-dir")
    return p.parse_args(argv)


def probe_batch() -> dict[str, torch.Tensor]:
    """A fixed probe batch, the same for every seed and model: full sequences (tagged prompt, answer) of
    every task. `keep` marks the tokens the statistics use: all but padding and <bos> (whose state is
    the same in every sequence, as in mgc.diagnose)."""
    rows = []
    for t in TASKS.values():
        rows += [(t, p, a) for p, a in heldout(t, PROBE_PER_TASK, seed=10_000)]
    b = batch(rows)
    keep = b["attention_mask"].bool().clone()
    keep[:, 0] = False
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "keep": keep}


def pick_layer_statistics(base_model, probe) -> tuple[callable, str]:
    """mgc.diagnose.layer_statistics if it exists and agrees with ours on the base model, else ours.
    Returns (model -> per-layer statistics on the probe, where they come from)."""
    def ours(model):
        return own_layer_statistics(model, probe["input_ids"], probe["attention_mask"], keep=probe["keep"])

    mine = ours(base_model)
    try:
        from mgc.diagnose import layer_statistics as mgc_stats
    except Exception:  # noqa: BLE001 - not there (yet), or broken: use ours
        return ours, "experiments/collapse/diagnostics.py (mgc.diagnose not available)"

    def theirs(model):
        return mgc_stats(model, probe["input_ids"], attention_mask=probe["attention_mask"], keep=probe["keep"])

    try:
        got = theirs(base_model)
        agree = len(got) == len(mine) and all(
            abs(g[k] - o[k]) <= 1e-6 * max(1.0, abs(o[k]))
            for g, o in zip(got, mine) for k in ("layer", "variance", "effective_rank", "numerical_rank"))
    except Exception as e:  # noqa: BLE001
        return ours, f"experiments/collapse/diagnostics.py (mgc.diagnose failed: {e})"
    if agree:
        return theirs, "mgc.diagnose.layer_statistics (agrees with experiments/collapse/diagnostics.py on the base)"
    return ours, "experiments/collapse/diagnostics.py (mgc.diagnose disagrees on the base model)"


def run_seed(seed: int, args, probe, log) -> dict:
    work = args.work_dir / f"seed{seed}"
    if args.fresh and work.exists():
        shutil.rmtree(work)
    experts = [(task, lr * args.lr_scale, steps) for task, lr, steps in EXPERTS[: args.experts]]
    names = [task for task, _, _ in experts]
    all_names = list(TASKS)
    evalset = T.EvalSet(all_names, N_EVAL, seed)
    exclude = {n: {p for p, _ in heldout(TASKS[n], N_EVAL, seed)} | {p for p, _ in heldout(TASKS[n], PROBE_PER_TASK, 10_000)}
               for n in all_names}
    times = {}

    t0 = time.perf_counter()
    base_path = work / "base"
    base_meta = T.pretrain_base(base_path, seed=seed, exclude=exclude, **PRETRAIN)
    log(f"[seed {seed}] base: {base_meta.get('seconds')} s of training, loss {base_meta['final_loss']:.3f}")
    expert_paths, expert_meta = [], []
    for i, (task, lr, steps) in enumerate(experts):
        path = work / ("experts" if args.lr_scale == 1 else f"experts_lr{args.lr_scale:g}") / task
        meta = T.finetune_expert(base_path, path, TASKS[task], seed=seed * 100 + i, steps=steps, lr=lr,
                                 batch_size=FINETUNE_BATCH, exclude=exclude)
        expert_paths.append((task, path))
        expert_meta.append(meta)
        log(f"[seed {seed}] expert {task}: lr {lr} x {steps} steps, {meta.get('seconds')} s, loss {meta['final_loss']:.3f}")
    times["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    base = T.load(base_path)
    layer_statistics, stats_source = pick_layer_statistics(base, probe)
    diag = {"base": layer_statistics(base)}
    result = {"seed": seed, "stats_source": stats_source, "base": {"accuracy": T.evaluate(base, evalset, all_names),
                                                                   "meta": base_meta}, "experts": [],
              "reused_checkpoints": sum(bool(mt.get("cached")) for mt in [base_meta, *expert_meta])}
    expert_diags = []
    for (task, path), meta in zip(expert_paths, expert_meta):
        model = T.load(path)
        acc = T.evaluate(model, evalset, all_names)
        result["experts"].append({"task": task, "lr": meta["lr"], "steps": meta["steps"],
                                  "rel_task_vector_norm": T.task_vector_norm(base, model), "accuracy": acc,
                                  "train_seconds": meta.get("seconds")})
        expert_diags.append(layer_statistics(model))
        log(f"[seed {seed}] expert {task}: own exact {acc[task]['exact']:.3f}, "
            f"|d|/|base| {result['experts'][-1]['rel_task_vector_norm']:.3f}")
    diag["experts_mean"] = [
        {"layer": rows[0]["layer"], **{k: sum(r[k] for r in rows) / len(rows)
                                       for k in ("variance", "effective_rank", "numerical_rank")}}
        for rows in zip(*expert_diags)]

    merges = {}
    n = len(experts)
    for method in args.methods:
        merges[method] = {}
        for m in range(2, n + 1):
            out = work / "merges" / f"{method}_m{m}"
            secs = M.merge(method, base_path, expert_paths[:m], out)
            model = T.load(out)
            acc = T.evaluate(model, evalset, names[:m])
            merges[method][m] = {
                "accuracy": acc,
                "mean_exact": sum(a["exact"] for a in acc.values()) / m,
                "mean_token": sum(a["token"] for a in acc.values()) / m,
                "merge_seconds": secs,
            }
            if m == n:
                diag[method] = layer_statistics(model)
            elif not args.keep_merges:
                shutil.rmtree(out)
        log(f"[seed {seed}] {method:16s} mean exact by m: "
            + " ".join(f"{merges[method][m]['mean_exact']:.2f}" for m in range(2, n + 1)))
    times["merge_eval_s"] = time.perf_counter() - t0
    geometry = None
    if "linear" in merges and "karcher" in merges:
        sd = lambda p: load_file(str(p / "model.safetensors"))  # noqa: E731
        geometry = weight_geometry(sd(base_path), [sd(p) for _, p in expert_paths], sd(work / "merges" / f"linear_m{n}"),
                                   sd(work / "merges" / f"karcher_m{n}"))
        log(f"[seed {seed}] geometry at m = {n}: " + json.dumps(geometry))
    if not args.keep_merges:
        for method in args.methods:
            shutil.rmtree(work / "merges" / f"{method}_m{n}", ignore_errors=True)
    result.update(merges=merges, diagnostics=diag, geometry=geometry, times=times)
    return result


# ---------------------------------------------------------------------------------------------------
# Aggregation over seeds


def ceiling_floor(r: dict, names: list[str], m: int, key: str) -> tuple[float, float]:
    ceiling = sum(e["accuracy"][e["task"]][key] for e in r["experts"][:m]) / m
    floor = sum(r["base"]["accuracy"][t][key] for t in names[:m]) / m
    return ceiling, floor


def curves(runs: list[dict], methods: list[str], key: str) -> dict[str, list[list[float]]]:
    """name -> [per seed: [value at m = 2..N]] for every method, 'experts' (ceiling) and 'base' (floor)."""
    n = len(runs[0]["experts"])
    names = [e["task"] for e in runs[0]["experts"]]
    out = {meth: [[r["merges"][meth][m][f"mean_{key}"] for m in range(2, n + 1)] for r in runs] for meth in methods}
    out["experts"] = [[ceiling_floor(r, names, m, key)[0] for m in range(2, n + 1)] for r in runs]
    out["base"] = [[ceiling_floor(r, names, m, key)[1] for m in range(2, n + 1)] for r in runs]
    return out


def mean(xs):
    return sum(xs) / len(xs)


def fmt(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{mean(values):.{digits}f} ±{(max(values) - min(values)) / 2:.{digits}f}"


def write_table(runs: list[dict], methods: list[str], path: Path, total_s: float, command: str) -> str:
    n = len(runs[0]["experts"])
    seeds = [r["seed"] for r in runs]
    spread = "" if len(runs) == 1 else f" Each cell is the mean over seeds {seeds} ± half their range."
    n_reused = sum(r["reused_checkpoints"] for r in runs)
    reused = (f" ({n_reused} of {len(runs) * (n + 1)} trained checkpoints reused from the work dir, so that time "
              f"leaves out their training)") if n_reused else ""
    lines = [f"# Merging m = 2..{n} experts: small-scale reproduction of arXiv:2603.04972 Fig. 1–2", "",
             f"Generated by `{command}` in {total_s / 60:.1f} min{reused}.{spread}", "",
             "## The experts (in merge order)", "",
             "| # | task | lr | steps | ‖θᵢ − θ₀‖ / ‖θ₀‖ | expert exact (own task) | base exact (same task) |",
             "|---|---|---|---|---|---|---|"]
    for i in range(n):
        es = [r["experts"][i] for r in runs]
        task = es[0]["task"]
        lines.append(f"| {i + 1} | {task} | {es[0]['lr']:g} | {es[0]['steps']} | "
                     f"{fmt([e['rel_task_vector_norm'] for e in es], 3)} | "
                     f"{fmt([e['accuracy'][task]['exact'] for e in es])} | "
                     f"{fmt([r['base']['accuracy'][task]['exact'] for r in runs])} |")
    for key, title in (("exact", "exact-match accuracy"), ("token", "token accuracy")):
        c = curves(runs, methods, key)
        lines += ["", f"## Mean {title} over the first m tasks' held-out sets", "",
                  "| m | " + " | ".join(methods) + " | experts (ceiling) | base (floor) |",
                  "|---" * (len(methods) + 3) + "|"]
        for j, m in enumerate(range(2, n + 1)):
            vals = [[s[j] for s in c[k]] for k in methods + ["experts", "base"]]
            best = max(mean(v) for v in vals[: len(methods)])
            cells = [f"**{fmt(v)}**" if abs(mean(v) - best) < 1e-12 else fmt(v) for v in vals[: len(methods)]]
            lines.append(f"| {m} | " + " | ".join(cells + [fmt(v) for v in vals[len(methods):]]) + " |")
    lines += ["", f"## Per-layer diagnostics at m = {n} (probe batch: {PROBE_PER_TASK} sequences per task, all "
              f"{len(TASKS)} tasks)", "",
              "Activation variance (mean per-feature variance of each block's output), effective rank of its "
              "covariance and numerical rank (singular values above 1e-3 of the largest; hidden size "
              f"{T.MODEL['hidden_size']}), per layer.", ""]
    who = methods + ["experts_mean", "base"]
    L = len(runs[0]["diagnostics"]["base"])
    for key, title in (("variance", "variance"), ("effective_rank", "effective rank"), ("numerical_rank", "numerical rank")):
        lines += [f"| {title} | " + " | ".join(f"layer {i + 1}" for i in range(L)) + " |", "|---" * (L + 1) + "|"]
        for w in who:
            cells = [fmt([r["diagnostics"][w][i][key] for r in runs], {"variance": 3, "effective_rank": 1}.get(key, 0))
                     for i in range(L)]
            lines.append(f"| {w} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Statistics computed by {runs[0]['stats_source']}.")
    geos = [r["geometry"] for r in runs if r.get("geometry")]
    if geos:
        lines += ["", f"## Weight-space geometry of the {n} experts (why karcher and linear differ little)", "",
                  "| quantity | value |", "|---|---|",
                  f"| angle between two experts' versions of a tensor (degrees): median over all tensors and pairs | "
                  f"{fmt([g['angle_deg']['median'] for g in geos], 2)} (largest {fmt([g['angle_deg']['max'] for g in geos], 1)}) |",
                  f"| cosine between two experts' task vectors: median over all tensors and pairs | "
                  f"{fmt([g['tv_cosine']['median'] for g in geos], 3)} |",
                  f"| norm of the linear merge / norm of the karcher merge, per tensor: median (smallest) | "
                  f"{fmt([g['shrink']['median'] for g in geos], 4)} ({fmt([g['shrink']['min'] for g in geos], 3)}) |",
                  f"| ‖θ_karcher − θ_linear‖ / ‖θ_linear − θ₀‖, all parameters | "
                  f"{fmt([g['karcher_vs_linear'] for g in geos], 3)} |"]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


STYLE = {
    "linear": dict(color="#1f77b4", marker="o"),
    "task_arithmetic": dict(color="#ff7f0e", marker="s"),
    "ties": dict(color="#2ca02c", marker="^"),
    "dare_ties": dict(color="#9467bd", marker="v"),
    "model_stock": dict(color="#8c564b", marker="D"),
    "multislerp": dict(color="#e377c2", marker="P"),
    "karcher": dict(color="#d62728", marker="*", linewidth=2.6, markersize=10, zorder=5),
    "experts": dict(color="black", linestyle="--", linewidth=1.4),
    "experts_mean": dict(color="black", linestyle="--", linewidth=1.4),
    "base": dict(color="gray", linestyle=":", linewidth=1.6),
}
LABEL = {"experts": "experts, own task (ceiling)", "experts_mean": "experts (mean)", "base": "base (floor)"}
LAYER_LABEL = {"experts_mean": "experts (mean of their statistics)", "base": "base"}


def plot_accuracy(runs: list[dict], methods: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(runs[0]["experts"])
    ms = list(range(2, n + 1))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharex=True)
    for ax, key, title in zip(axes, ("exact", "token"), ("exact-match accuracy", "token accuracy")):
        c = curves(runs, methods, key)
        for name in methods + ["experts", "base"]:
            per_seed = c[name]
            mid = [mean([s[j] for s in per_seed]) for j in range(len(ms))]
            ax.plot(ms, mid, label=LABEL.get(name, name), **STYLE[name])
            if len(per_seed) > 1:
                lo = [min(s[j] for s in per_seed) for j in range(len(ms))]
                hi = [max(s[j] for s in per_seed) for j in range(len(ms))]
                ax.fill_between(ms, lo, hi, color=STYLE[name]["color"], alpha=0.12, linewidth=0)
        ax.set_xlabel("m, number of merged experts")
        ax.set_ylabel(f"mean {title} over the m tasks")
        ax.set_title(title)
        ax.set_xticks(ms)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    seeds = ", ".join(str(r["seed"]) for r in runs)
    fig.suptitle(f"Merging the first m of {n} experts (tiny Llama, synthetic tasks; seeds {seeds}, band = range)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layers(runs: list[dict], methods: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(runs[0]["experts"])
    L = len(runs[0]["diagnostics"]["base"])
    xs = list(range(L))
    layer_ids = [row["layer"] for row in runs[0]["diagnostics"]["base"]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, key, title in zip(axes, ("variance", "effective_rank"),
                              ("activation variance (log scale)", "effective rank of the activation covariance")):
        for name in methods + ["experts_mean", "base"]:
            per_seed = [[r["diagnostics"][name][i][key] for i in xs] for r in runs]
            mid = [mean([s[i] for s in per_seed]) for i in xs]
            ax.plot(layer_ids, mid, label=LAYER_LABEL.get(name, name), **STYLE[name])
            if len(per_seed) > 1:
                ax.fill_between(layer_ids, [min(s[i] for s in per_seed) for i in xs], [max(s[i] for s in per_seed) for i in xs],
                                color=STYLE[name]["color"], alpha=0.12, linewidth=0)
        ax.set_xlabel("decoder layer (output of the block)")
        ax.set_title(title)
        ax.set_xticks(layer_ids)
        ax.grid(alpha=0.3)
        if key == "variance":
            ax.set_yscale("log")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    fig.suptitle(f"Per-layer diagnostics of the m = {n} merges on a fixed probe batch (mean over seeds, band = range)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"{time.perf_counter() - t_start:7.1f}s  {msg}", flush=True)

    probe = probe_batch()
    runs = [run_seed(seed, args, probe, log) for seed in args.seeds]
    total = time.perf_counter() - t_start
    methods = args.methods
    command = "python experiments/collapse/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = write_table(runs, methods, args.out / "table.md", total, command.strip())
    plot_accuracy(runs, methods, args.out / "accuracy_vs_m.png")
    plot_layers(runs, methods, args.out / "layers.png")
    config = {
        "experts": EXPERTS[: args.experts], "pretrain": PRETRAIN, "finetune_batch": FINETUNE_BATCH,
        "model": T.MODEL, "n_eval": N_EVAL, "probe_per_task": PROBE_PER_TASK, "methods": M.METHODS,
        "seeds": args.seeds, "threads": args.threads, "lr_scale": args.lr_scale,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()},
        "total_seconds": round(total, 1),
    }
    (args.out / "results.json").write_text(json.dumps({"config": config, "runs": runs}, indent=1))
    print(text)
    log(f"done in {total / 60:.1f} min; results in {args.out}")


if __name__ == "__main__":
    main()
