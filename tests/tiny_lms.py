"""Tiny causal LMs and tokenizers made with transformers' and tokenizers' own classes, for the vocabulary and
tied-head tests: a word-level tokenizer built here, fine-tunes that add tokens and resize their embeddings."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

transformers = __import__("pytest").importorskip("transformers")
tokenizers = __import__("pytest").importorskip("tokenizers")

WORDS = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(28)]  # 32 tokens
LLAMA = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=3)
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def make_tokenizer(words=WORDS):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )


def llama(folder: Path, seed: int, *, added=(), special=True, tied=False, cls="llama", template=None,
          words=WORDS) -> Path:
    """A tiny model with the word-level tokenizer, `added` tokens added to it (embeddings resized to match)."""
    torch.manual_seed(seed)
    tok = make_tokenizer(words)
    if cls == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=len(words), tie_word_embeddings=tied, **LLAMA))
    elif cls == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=len(words), tie_word_embeddings=tied, **LLAMA))
    elif cls == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(vocab_size=len(words), head_dim=8, **LLAMA))
    elif cls == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=len(words), n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2))
    else:
        raise ValueError(cls)
    if added:
        tok.add_tokens(list(added), special_tokens=special)
        model.resize_token_embeddings(len(tok))
        with torch.no_grad():  # rows of their own, not resize's mean
            emb = model.get_input_embeddings().weight
            emb[len(words):] = torch.randn(len(added), emb.shape[1])
            if not tied and model.get_output_embeddings() is not None and model.get_output_embeddings().weight is not emb:
                head = model.get_output_embeddings().weight
                head[len(words):] = torch.randn(len(added), head.shape[1])
    if template is not None:
        tok.chat_template = template
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def token_ids(folder: Path) -> dict[str, int]:
    return transformers.AutoTokenizer.from_pretrained(str(folder)).get_vocab()
