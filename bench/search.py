"""Search benchmark: the time of one `mgc search` trial (merge in memory, load into the model, evaluate) against one
trial done the mergekit-evolve way (write the candidate checkpoint to disk, load it back with transformers,
evaluate), on the 0.5 GB bench models.

    python bench/make_bench_models.py              # l16-base, l16-e1 .. l16-e5 (no tokenizer: one is added here)
    python bench/search.py --trials 6

Recipe: slerp(base, karcher(e1, e2), t = search(0, 1)). Both ways score the same candidates (the t values the
search tried, in order) on the same text with the same code (mgc/search_eval.py's Scorer), on the CPU, in one
process each. The disk way runs `mgc run --set save.t=T` into a fresh folder in the work folder's file system and
loads it with mgc.lm.load (transformers' from_pretrained). Neither way prunes, so every trial scores all the data.
The first mgc trial also computes the karcher merge that every later trial reuses; it is shown on its own.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import machine, mgc_revision  # noqa: E402

WORDS = 32000


def ensure_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over the bench vocabulary (t0 ... t31999), written beside the weights if absent."""
    if (folder / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2", pad_token="t3") \
        .save_pretrained(folder)


def write_data(path: Path, documents: int, words: int) -> None:
    rng = random.Random(0)
    docs = [" ".join(f"t{rng.randrange(4, WORDS)}" for _ in range(words)) for _ in range(documents)]
    path.write_text("\n\n".join(docs) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=Path("/tmp/mgc-bench/models"))
    ap.add_argument("--prefix", default="l16-")
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--documents", type=int, default=8, help="documents of evaluation text")
    ap.add_argument("--words", type=int, default=64, help="words per document")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mgc-bench/search"))
    args = ap.parse_args()
    m = {r: args.models / f"{args.prefix}{r}" for r in ("base", "e1", "e2")}
    if not all((p / "config.json").is_file() for p in m.values()):
        print("make the checkpoints first: python bench/make_bench_models.py", file=sys.stderr)
        return 2
    ensure_tokenizer(m["base"])
    work = args.work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    data = work / "eval.txt"
    write_data(data, args.documents, args.words)
    recipe = work / "search.merge"
    recipe.write_text(
        f'base = model("{m["base"]}")\ne1 = model("{m["e1"]}")\ne2 = model("{m["e2"]}")\n'
        f'save slerp(base, karcher(e1, e2), t = search(0, 1)) to "{work / "out"}" {{ dtype = bf16 }}\n'
    )
    print(f"machine: {machine()}\nmgc: {mgc_revision()}\n")

    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mgc.cli", "search", str(recipe), "--data", str(data), "--trials",
                    str(args.trials), "--no-prune", "--holdout", "0", "--device", "cpu", "-o", str(work / "results"),
                    "-q"], check=True, stdout=subprocess.DEVNULL)
    total = time.perf_counter() - start
    with open(work / "results" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    ts = [float(r["save.t"]) for r in rows]
    merge = [float(r["merge_s"]) for r in rows]
    evaluate = [float(r["eval_s"]) for r in rows]

    disk = []
    import transformers

    from mgc.lm import load

    transformers.utils.logging.disable_progress_bar()
    from mgc.search_eval import Scorer, limit_for, split_data

    for t in ts:
        out = work / "candidate"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mgc.cli", "run", str(recipe), "--set", f"save.t={t!r}", "-o", str(out),
                        "-q", "--force", "--device", "cpu"], check=True)
        t1 = time.perf_counter()
        model, tokenizer = load(out, "cpu")
        t2 = time.perf_counter()
        config = json.loads((out / "config.json").read_text())
        split = split_data(data, tokenizer, limit_for(config, 512), 0.0, 0)
        Scorer("perplexity", tokenizer, 8).score(model, split.search)
        t3 = time.perf_counter()
        disk.append((t1 - t0, t2 - t1, t3 - t2))
        del model
        shutil.rmtree(out)

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    later = slice(1, None)
    print(f"{len(rows)} trials of slerp(base, karcher(e1, e2), t = search(0, 1)) on {args.documents} documents "
          f"of {args.words} words; mgc search took {total:.1f} s in all (start-up, the shared part and the report "
          "included)\n")
    print("| per trial | merge | write | load | evaluate | total |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| mgc search, first trial (computes the shared karcher) | {merge[0]:.2f} | - | (in merge) | {evaluate[0]:.2f} | "
          f"{merge[0] + evaluate[0]:.2f} |")
    print(f"| mgc search, later trials (mean) | {mean(merge[later]):.2f} | - | (in merge) | {mean(evaluate[later]):.2f} | "
          f"{mean(merge[later]) + mean(evaluate[later]):.2f} |")
    print(f"| write + reload each candidate (mean) | {mean([d[0] for d in disk]):.2f} (mgc run, whole process) | "
          f"(in merge) | {mean([d[1] for d in disk]):.2f} | {mean([d[2] for d in disk]):.2f} | "
          f"{mean([sum(d) for d in disk]):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
