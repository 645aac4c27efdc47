"""Create the benchmark checkpoints: a Llama-like base and N experts of about 0.5 GB each (bf16).

These are for `bench/bench.py` and live outside the repository (default /tmp/mgc-bench/models).
Each checkpoint is a Hugging Face folder with a LlamaForCausalLM config.json, a
generation_config.json and its weights in two safetensors shards with a
model.safetensors.index.json, as real checkpoints are sharded. No tokenizer is written:
neither mgc nor mergekit (run with --no-copy-tokenizer) needs one to merge.

Shapes (defaults): hidden 1024, intermediate 2816, 16 heads, 8 kv heads (head_dim 64),
vocab 32000, untied lm_head. Per layer 11,798,528 parameters; embeddings and lm_head
32,768,000 each. With 16 layers that is 254,322,688 parameters = 508.6 MB in bf16
(485 MiB); with 32 layers 443,099,136 parameters = 886.2 MB.

Weights: the base is N(0, 0.02) for matrices and 1 + N(0, 0.02) for the RMSNorm weights.
Expert k is base + dense Gaussian noise whose norm is a distinct fraction of the base's
(2 %, 4 %, 6 %, 8 %, 10 %, ...) on every tensor. Everything is drawn from seeded CPU
torch.Generators in float32 chunks and cast to bf16, so a run is deterministic on a given
machine (torch's randn kernels can differ in the last bits between CPU types, which does not
matter for a benchmark).

    python bench/make_bench_models.py                          # l16-base, l16-e1 .. l16-e5
    python bench/make_bench_models.py --layers 32 --experts 3  # l32-base, l32-e1 .. l32-e3
    python bench/make_bench_models.py --experts 0 --tuned      # l16-base, l16-tuned (bench/extract_lora.py)
    python bench/make_bench_models.py --preset 8b --layers 4 --experts 3   # 8b-l4-base, 8b-l4-e1 .. e3 (3.9 GB each)

A checkpoint that already exists with the same generation spec is left alone, so running the
script again is cheap. Folders are written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN = 1024
INTERMEDIATE = 2816
HEADS = 16
KV_HEADS = 8
HEAD_DIM = HIDDEN // HEADS
VOCAB = 32000
# --preset 8b: the shapes of a current 8B model (Llama 3 8B), with as many layers as the disk allows
PRESETS = {
    "small": dict(HIDDEN=1024, INTERMEDIATE=2816, HEADS=16, KV_HEADS=8, VOCAB=32000),
    "8b": dict(HIDDEN=4096, INTERMEDIATE=14336, HEADS=32, KV_HEADS=8, VOCAB=128256),
}
PRESET = "small"


def use_preset(name: str) -> None:
    """Set the module's shapes to a preset's (the functions below read them)."""
    global PRESET, HEAD_DIM
    globals().update(PRESETS[name])
    PRESET = name
    HEAD_DIM = HIDDEN // HEADS
INIT_STD = 0.02
BASE_SEED = 20240
SPEC_VERSION = 1  # bump when the way weights are drawn changes
SPEC_FILE = "bench_spec.json"
CHUNK = 1 << 22  # elements drawn per randn call (16 MiB of float32)


def expert_rel(k: int) -> float:
    """Relative Frobenius norm of expert k's delta (k = 1, 2, ...): 2 %, 4 %, ..."""
    return 0.02 * k


def tensor_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        }
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def model_bytes(layers: int) -> int:
    return 2 * sum(math.prod(s) for s in tensor_shapes(layers).values())


def config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": INIT_STD,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 2048,
        "mlp_bias": False,
        "num_attention_heads": HEADS,
        "num_hidden_layers": layers,
        "num_key_value_heads": KV_HEADS,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def _randn_f32(gen: torch.Generator, n: int) -> torch.Tensor:
    """n standard normal float32 samples, drawn in fixed-size chunks (same numbers for any n split)."""
    out = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        out[start:stop] = torch.randn(stop - start, generator=gen, dtype=torch.float32)
    return out


def base_weights(layers: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(BASE_SEED)
    out = {}
    for name, shape in tensor_shapes(layers).items():
        x = _randn_f32(gen, math.prod(shape)).mul_(INIT_STD)
        if len(shape) == 1:
            x.add_(1.0)  # RMSNorm weights sit near 1
        out[name] = x.view(shape).to(torch.bfloat16)
    return out


def expert_weights(base: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Base plus dense Gaussian noise of relative norm expert_rel(k) on every tensor."""
    gen = torch.Generator().manual_seed(BASE_SEED + 1000 * k)
    rel = expert_rel(k)
    out = {}
    for name, w in base.items():
        w32 = w.float().reshape(-1)
        noise = _randn_f32(gen, w32.numel())
        # ||noise|| ~ sqrt(n); scale so that ||delta|| = rel * ||w||
        noise.mul_(rel * w32.norm().item() / math.sqrt(w32.numel()))
        out[name] = (w32 + noise).view(w.shape).to(torch.bfloat16)
    return out


TUNED_REL = 0.05  # relative Frobenius norm of the fine-tune's delta on each projection
TUNED_DECAY = 0.5  # its k-th singular value is proportional to k ** -TUNED_DECAY


def tuned_weights(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stand-in for a full fine-tune, for LoRA extraction: each 2-D projection in the layers gets a delta of
    relative norm TUNED_REL whose spectrum decays as a power law (σ_k ∝ k^-TUNED_DECAY, so the top 16 / 64 / 256
    directions hold about 45 % / 63 % / 81 % of its energy, as a full fine-tune's slow spectrum does); norms get
    small changes; the embeddings and head are unchanged (typical of fine-tunes that add no tokens)."""
    gen = torch.Generator().manual_seed(BASE_SEED + 777)
    out = {}
    for name, w in base.items():
        if name.startswith("model.layers.") and w.dim() == 2:
            m, n = w.shape
            k = min(m, n)
            a = _randn_f32(gen, m * k).view(m, k)
            b = _randn_f32(gen, k * n).view(k, n)
            s = torch.arange(1, k + 1, dtype=torch.float32).pow(-TUNED_DECAY)
            delta = (a * s) @ b
            w32 = w.float()
            delta.mul_(TUNED_REL * w32.norm() / delta.norm())
            out[name] = (w32 + delta).to(torch.bfloat16)
        elif w.dim() == 1:
            out[name] = (w.float() + 0.01 * _randn_f32(gen, w.numel())).to(torch.bfloat16)
        else:
            out[name] = w
    return out


def spec(layers: int, role: str) -> dict:
    rel = None if role == "base" else TUNED_REL if role == "tuned" else expert_rel(int(role[1:]))
    return {"version": SPEC_VERSION, "layers": layers, "role": role, "seed": BASE_SEED, "rel": rel,
            "bytes": model_bytes(layers), **({"preset": PRESET} if PRESET != "small" else {})}


def is_complete(folder: Path, want: dict) -> bool:
    try:
        if json.loads((folder / SPEC_FILE).read_text()) != want:
            return False
        if json.loads((folder / "config.json").read_text()) != config(want["layers"]):
            return False
        index = json.loads((folder / "model.safetensors.index.json").read_text())
    except (OSError, ValueError):
        return False
    files = set(index["weight_map"].values())
    data = sum((folder / f).stat().st_size for f in files if (folder / f).is_file())
    return all((folder / f).is_file() for f in files) and data >= want["bytes"]


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], layers: int, want: dict, shards: int = 2) -> None:
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    names = list(tensors)
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    total = sum(sizes)
    # split by bytes into `shards` contiguous groups, in HF order (embeddings first, lm_head last)
    groups: list[list[str]] = [[] for _ in range(shards)]
    acc = 0
    for n, s in zip(names, sizes):
        groups[min(shards - 1, int(acc * shards // total))].append(n)
        acc += s
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, str(tmp / file), metadata={"format": "pt"})
        weight_map |= {n: file for n in group}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(config(layers), indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")
    (tmp / SPEC_FILE).write_text(json.dumps(want, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def make_models(out: Path, layers: int, experts: int, name: str, tuned: bool = False) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    roles = ["base"] + [f"e{k}" for k in range(1, experts + 1)] + (["tuned"] if tuned else [])
    paths = {r: out / f"{name}{r}" for r in roles}
    todo = [r for r in roles if not is_complete(paths[r], spec(layers, r))]
    if not todo:
        return paths
    base = base_weights(layers)  # every expert is derived from the base, so it is always drawn
    for r in todo:
        start = time.perf_counter()
        tensors = base if r == "base" else tuned_weights(base) if r == "tuned" else expert_weights(base, int(r[1:]))
        write_checkpoint(paths[r], tensors, layers, spec(layers, r))
        print(f"wrote {paths[r]} ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
        del tensors
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/mgc-bench/models"), help="folder for the checkpoints")
    ap.add_argument("--layers", type=int, default=16, help="num_hidden_layers (default 16)")
    ap.add_argument("--experts", type=int, default=5, help="number of experts (default 5)")
    ap.add_argument("--name", default=None, help="folder name prefix (default 'l<layers>-', '8b-l<layers>-')")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small",
                    help="shapes: small (hidden 1024, the default) or 8b (hidden 4096, intermediate 14336, 32 heads, "
                         "8 KV heads, vocabulary 128,256)")
    ap.add_argument("--tuned", action="store_true", help="also a fine-tune of the base for LoRA extraction ('<prefix>tuned')")
    args = ap.parse_args()
    use_preset(args.preset)
    name = (f"l{args.layers}-" if args.preset == "small" else f"{args.preset}-l{args.layers}-") if args.name is None else args.name
    torch.set_num_threads(max(1, torch.get_num_threads()))
    paths = make_models(args.out, args.layers, args.experts, name, args.tuned)
    size = model_bytes(args.layers)
    print(f"{len(paths)} checkpoints of {size / 1e9:.3f} GB ({size / 2**20:.0f} MiB) each, {args.layers} layers:")
    for r, p in paths.items():
        print(f"  {r:5s} {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
