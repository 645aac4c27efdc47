"""Create the small bundled example checkpoints: examples/models/{base,code,math,prose,chat,lora-code,lora-math}.

Each of base, code, math and prose is a tiny Llama-layout Hugging Face checkpoint (bf16
safetensors, config, generation config, byte-level BPE tokenizer). The base is saved in two
shards; the three experts are base + a distinct low-rank-plus-sparse delta of increasing size.
chat is a fine-tune with a vocabulary of its own, for examples/vocab_union.merge: base + such a delta, with the
two ChatML tokens <|im_start|> and <|im_end|> added as special tokens (ids 512 and 513, as transformers'
add_special_tokens stores them) and its embeddings and head resized to 514 rows (each new row the mean of the
existing rows plus a little seeded noise), and a ChatML chat template in tokenizer_config.json.
lora-code and lora-math are PEFT LoRA adapters on the base (adapter_config.json and
adapter_model.safetensors, fp32, as peft's save_pretrained writes them; written by hand, so
peft is not needed here), for examples/lora.merge.
Everything is deterministic: same bytes on every run and machine.

    python examples/make_models.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, as in Llama
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)
VOCAB_SIZE = 512

HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 8
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS

BASE_SEED = 1234
# name -> (seed, relative Frobenius norm of the delta on every matrix)
EXPERTS = {"code": (101, 0.05), "math": (202, 0.10), "prose": (303, 0.20)}
DELTA_RANK = 4
SPARSE_DENSITY = 0.02
NORM_DELTA_SCALE = 0.25  # norm-weight deltas are this fraction of the matrix ratio

# the chat fine-tune: (seed, relative delta norm) as an expert's, then its added tokens (ids VOCAB_SIZE, ...);
# each new row of its embedding and head is the mean of that matrix's rows plus noise of this standard deviation
CHAT = (404, 0.10)
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
CHAT_ROW_NOISE = 0.02
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")  # rows indexed by token id
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# LoRA adapters on the base: name -> (seed, r, lora_alpha, target modules, relative Frobenius norm of each
# adapted matrix's update scale·B·A). base_model_name_or_path is "models/base": lora("models/lora-code") in a
# recipe resolves it like model("models/base"), relative to the recipe's folder (examples/).
ADAPTERS = {
    "lora-code": (111, 4, 8, ("q_proj", "v_proj", "down_proj"), 0.05),
    "lora-math": (222, 4, 16, ("q_proj", "k_proj", "up_proj"), 0.10),
}
ADAPTER_BASE = "models/base"
PEFT_PREFIX = "base_model.model."  # peft's key prefix: base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight

CORPUS = """\
The quick brown fox jumps over the lazy dog. A merge graph combines several models into one.
Each fine-tuned model is the base model plus a task vector, and merging adds task vectors.
We compute the weighted average of the parameters, then trim small values and resolve signs.
The model reads a sentence, predicts the next token, and writes the answer one word at a time.
Small models are fast to load and easy to test, so the examples use a tiny network.
In the morning the river was quiet; by the evening the wind had turned and the rain came down.
She opened the book, read the first page, and smiled at the story of the old lighthouse keeper.
The theorem states that the sum of two even numbers is even. Proof: let a = 2m and b = 2n.
Then a + b = 2m + 2n = 2(m + n), which is even. The square of an odd number is odd.
Solve for x: 3x + 5 = 20, so 3x = 15 and x = 5. The derivative of x^2 is 2x.
The integral of 1/x is log(x), and the limit of (1 + 1/n)^n as n grows is e = 2.71828.
A matrix times a vector gives a vector; the rank of a matrix is the dimension of its column space.
def merge(models, weights):
    total = sum(weights)
    return {name: sum(w * m[name] for m, w in zip(models, weights)) / total for name in models[0]}

def fibonacci(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

class Tensor:
    def __init__(self, data, shape):
        self.data = data
        self.shape = shape

    def __repr__(self):
        return f"Tensor(shape={self.shape})"

for i in range(10):
    if i % 2 == 0:
        print("even", i)
    else:
        print("odd", i)

import torch
x = torch.zeros(4, 4)
y = x @ x.T + torch.eye(4)
result = [value * 2 for value in range(100) if value > 10]
with open("config.json") as f:
    config = json.load(f)
"""


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return tok


def chat_tokenizer(base: Tokenizer) -> Tokenizer:
    """The base tokenizer with CHAT_TOKENS added as special tokens, as transformers' add_special_tokens adds them."""
    tok = Tokenizer.from_str(base.to_str())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS])
    return tok


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Standard normal samples in float64 via Box-Muller on torch.rand.

    torch.randn picks SIMD or scalar kernels per CPU, which can change the last bits;
    uniform draws are exact and float64 math leaves no visible trace after rounding to bf16.
    """
    n = math.prod(shape)
    u = torch.rand(2, (n + 1) // 2, generator=gen, dtype=torch.float64)
    r = torch.sqrt(-2.0 * torch.log1p(-u[0]))  # 1 - u is in (0, 1], so log is finite
    theta = 2.0 * math.pi * u[1]
    return torch.cat([r * torch.cos(theta), r * torch.sin(theta)])[:n].reshape(shape)


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB_SIZE, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB_SIZE, HIDDEN)
    return shapes


def base_weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(BASE_SEED)
    return {
        name: _randn(gen, *shape) * 0.02 if len(shape) == 2 else torch.ones(shape, dtype=torch.float64)
        for name, shape in tensor_shapes().items()
    }


def expert_weights(base: dict[str, torch.Tensor], seed: int, rel: float) -> dict[str, torch.Tensor]:
    """Base plus a task-vector-like delta: low-rank + sparse, scaled to `rel` * ||W||."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in base.items():
        if w.dim() == 2:
            rows, cols = w.shape
            low_rank = _randn(gen, rows, DELTA_RANK) @ _randn(gen, DELTA_RANK, cols)
            sparse = _randn(gen, rows, cols) * (torch.rand(rows, cols, generator=gen, dtype=torch.float64) < SPARSE_DENSITY)
            delta = low_rank / low_rank.norm() + 0.5 * sparse / sparse.norm()
            delta *= rel * w.norm() / delta.norm()
        else:
            delta = _randn(gen, *w.shape)
            delta *= NORM_DELTA_SCALE * rel * w.norm() / delta.norm()
        out[name] = w + delta
    return out


def chat_weights(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An expert-like fine-tune whose embedding and head have a row more for each of CHAT_TOKENS."""
    seed, rel = CHAT
    out = expert_weights(base, seed, rel)
    gen = torch.Generator().manual_seed(seed + 1)
    for name in VOCAB_TENSORS:
        w = out[name]
        new = w.mean(dim=0) + CHAT_ROW_NOISE * _randn(gen, len(CHAT_TOKENS), w.shape[1])
        out[name] = torch.cat([w, new])
    return out


def _config(vocab_size: int = VOCAB_SIZE) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 256,
        "mlp_bias": False,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def _generation_config() -> dict:
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
    }


def _chat_tokenizer_config(tokenizer: Tokenizer) -> dict:
    """tokenizer_config.json as transformers 4 saves it after add_special_tokens: every added token in
    added_tokens_decoder, the new ones in additional_special_tokens, and the chat template."""
    decoder = {
        str(i): {k: getattr(t, k) for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for i, t in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    return {
        "added_tokens_decoder": decoder,
        **_tokenizer_config(),
        "additional_special_tokens": list(CHAT_TOKENS),
        "chat_template": CHAT_TEMPLATE,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _adapter_config(r: int, alpha: int, targets: tuple[str, ...]) -> dict:
    """adapter_config.json with every key peft 0.21's LoraConfig saves, at its defaults unless given."""
    config = {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": ADAPTER_BASE,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "peft_version": "0.21.2",
        "qalora_group_size": 16,
        "r": r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(targets),
        "target_parameters": None,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": False,
        "velora_config": None,
    }
    return dict(sorted(config.items()))


def adapter_weights(
    base: dict[str, torch.Tensor], seed: int, r: int, alpha: int, targets: tuple[str, ...], rel: float
) -> dict[str, torch.Tensor]:
    """lora_A [r, in] and lora_B [out, r] of each targeted module, under peft's keys.

    A is drawn as peft initialises it (uniform in ±1/√in); B, which peft starts at zero, is as if trained:
    normal, scaled so that the update (alpha/r)·B·A has `rel` times the base weight's Frobenius norm.
    """
    gen = torch.Generator().manual_seed(seed)
    scale = alpha / r
    out = {}
    for name, w in base.items():
        module = name.removesuffix(".weight")
        if w.dim() != 2 or module.rsplit(".", 1)[-1] not in targets:
            continue
        rows, cols = w.shape
        a = (2 * torch.rand(r, cols, generator=gen, dtype=torch.float64) - 1) / math.sqrt(cols)
        b = _randn(gen, rows, r)
        b *= rel * w.norm() / (scale * (b @ a).norm())
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
    return out


def write_adapter(folder: Path, weights: dict[str, torch.Tensor], r: int, alpha: int, targets: tuple[str, ...]) -> None:
    # peft keeps LoRA factors in float32 on a bf16 base (autocast_adapter_dtype) and saves them so
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: w.to(torch.float32).contiguous() for name, w in weights.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_json(folder / "adapter_config.json", _adapter_config(r, alpha, targets))


def write_checkpoint(
    folder: Path, weights: dict[str, torch.Tensor], tokenizer: Tokenizer, shards: int = 1, tokenizer_config: dict | None = None
) -> None:
    # Config and tokenizer files are written by hand, not via save_pretrained, so their
    # bytes do not depend on the installed transformers version.
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: w.to(torch.bfloat16).contiguous() for name, w in weights.items()}
    metadata = {"format": "pt"}
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata=metadata)
    else:
        names = list(tensors)
        per_shard = math.ceil(len(names) / shards)
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            chunk = names[s * per_shard : (s + 1) * per_shard]
            save_file({n: tensors[n] for n in chunk}, str(folder / file), metadata=metadata)
            weight_map |= {n: file for n in chunk}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(folder / "model.safetensors.index.json", index)
    tokenizer_config = tokenizer_config or _tokenizer_config()
    _write_json(folder / "config.json", _config(tokenizer.get_vocab_size()))
    _write_json(folder / "generation_config.json", _generation_config())
    tokenizer.save(str(folder / "tokenizer.json"), pretty=True)
    _write_json(folder / "tokenizer_config.json", tokenizer_config)
    special = {k: v for k, v in tokenizer_config.items() if k.endswith("_token") or k == "additional_special_tokens"}
    _write_json(folder / "special_tokens_map.json", special)


def make_models(out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    assert tokenizer.get_vocab_size() == VOCAB_SIZE, tokenizer.get_vocab_size()
    base = base_weights()
    paths = {"base": out_dir / "base"}
    write_checkpoint(paths["base"], base, tokenizer, shards=2)
    for name, (seed, rel) in EXPERTS.items():
        paths[name] = out_dir / name
        write_checkpoint(paths[name], expert_weights(base, seed, rel), tokenizer)
    chat = chat_tokenizer(tokenizer)
    assert [chat.token_to_id(t) for t in CHAT_TOKENS] == list(range(VOCAB_SIZE, VOCAB_SIZE + len(CHAT_TOKENS)))
    paths["chat"] = out_dir / "chat"
    write_checkpoint(paths["chat"], chat_weights(base), chat, tokenizer_config=_chat_tokenizer_config(chat))
    for name, (seed, r, alpha, targets, rel) in ADAPTERS.items():
        paths[name] = out_dir / name
        write_adapter(paths[name], adapter_weights(base, seed, r, alpha, targets, rel), r, alpha, targets)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "models")
    args = parser.parse_args()
    for name, folder in make_models(args.out).items():
        files = sorted(folder.iterdir())
        size = sum(f.stat().st_size for f in files)
        print(f"{name}: {folder} ({len(files)} files, {size / 1024:.0f} KiB)")
        for f in files:
            print(f"    {f.name}")


if __name__ == "__main__":
    main()
