"""Tiny models whose best merge is known by construction, for `mgc search`: a base and experts, each trained for a
few steps on text of its own domain (word sequences from disjoint parts of the vocabulary), so that each expert
predicts its domain far better than the base and the others do."""
from __future__ import annotations

import random
from pathlib import Path

import torch

from tiny_lms import LLAMA, WORDS, make_tokenizer, transformers

DOMAINS = {"code": range(4, 12), "math": range(12, 20), "prose": range(20, 28)}
STEPS = 40


def domain_text(domain: str, documents: int, seed: int) -> str:
    """Documents of 12 words of the domain, each word followed by the next of the domain's cycle half the time."""
    rng = random.Random(seed)
    words = [WORDS[i] for i in DOMAINS[domain]]
    docs = []
    for _ in range(documents):
        i = rng.randrange(len(words))
        doc = []
        for _ in range(12):
            doc.append(words[i])
            i = (i + 1) % len(words) if rng.random() < 0.8 else rng.randrange(len(words))
        docs.append(" ".join(doc))
    return "\n\n".join(docs) + "\n"


def _save(model, tok, folder: Path) -> Path:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_models(root: Path) -> dict[str, Path]:
    """base (untrained) and one expert per domain, trained from the base; deterministic."""
    torch.manual_seed(0)
    tok = make_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(WORDS), tie_word_embeddings=False, **LLAMA)
    base = transformers.LlamaForCausalLM(config)
    out = {"base": _save(base, tok, root / "base")}
    for k, domain in enumerate(DOMAINS):
        torch.manual_seed(100 + k)
        model = transformers.LlamaForCausalLM(config)
        model.load_state_dict(base.state_dict())
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        docs = domain_text(domain, 32, seed=k).strip().split("\n\n")
        ids = torch.tensor([[1] + tok.convert_tokens_to_ids(d.split()) for d in docs])
        model.train()
        for _ in range(STEPS):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        out[domain] = _save(model, tok, root / domain)
    return out
