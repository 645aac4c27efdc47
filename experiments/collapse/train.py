"""The tiny Llama base model, its brief pre-training on all tasks, the experts' fine-tuning, evaluation.

Checkpoints are Hugging Face folders (config.json with "architectures", model.safetensors, and the
character vocabulary as vocab.json), so mgc reads them like any fine-tuned LLM.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tasks import BOS, EOS, MAX_LEN, PAD, TASKS, VOCAB, VOCAB_SIZE, Sampler, Task, batch, heldout

MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=4)


def make_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_LEN, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, architectures=["LlamaForCausalLM"],
        torch_dtype="float32", **MODEL,
    )


def save(model: LlamaForCausalLM, path: Path, meta: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    (path / "vocab.json").write_text(json.dumps(VOCAB))
    (path / "train_meta.json").write_text(json.dumps(meta, indent=1))


def load(path: Path) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def cached(path: Path, meta: dict) -> bool:
    """Whether `path` holds a checkpoint trained with exactly this recipe (then training is skipped)."""
    f = path / "train_meta.json"
    if not (f.exists() and (path / "model.safetensors").exists()):
        return False
    old = json.loads(f.read_text())
    return {k: old.get(k) for k in meta} == meta


def train(model: LlamaForCausalLM, sampler: Sampler, *, steps: int, lr: float, batch_size: int, seed: int,
          warmup: int = 20) -> list[float]:
    """AdamW with linear warm-up and cosine decay, loss on the answer tokens. Returns the loss curve."""
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses = []
    for _ in range(steps):
        out = model(**sampler(batch_size))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    model.eval()
    return losses


def pretrain_base(path: Path, *, seed: int, steps: int, lr: float, batch_size: int, hide_tag: bool, exclude) -> dict:
    """Pre-trains the shared base on an even mix of all tasks. With `hide_tag` every example carries the
    same tag "?", so the base learns the formats and skills but not which task a tag asks for."""
    meta = {"kind": "base", "seed": seed, "steps": steps, "lr": lr, "batch_size": batch_size, "hide_tag": hide_tag,
            "model": MODEL, "tasks": list(TASKS)}
    if cached(path, meta):
        return {**json.loads((path / "train_meta.json").read_text()), "cached": True}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(make_config())
    t0 = time.perf_counter()
    losses = train(model, Sampler(list(TASKS.values()), seed, exclude, hide_tag), steps=steps, lr=lr,
                   batch_size=batch_size, seed=seed)
    meta.update(seconds=round(time.perf_counter() - t0, 1), final_loss=sum(losses[-20:]) / 20)
    save(model, path, meta)
    return meta


def finetune_expert(base: Path, path: Path, task: Task, *, seed: int, steps: int, lr: float, batch_size: int,
                    exclude) -> dict:
    meta = {"kind": "expert", "task": task.name, "seed": seed, "steps": steps, "lr": lr,
            "batch_size": batch_size, "base": str(base), "base_meta": json.loads((base / "train_meta.json").read_text())}
    if cached(path, meta):
        return {**json.loads((path / "train_meta.json").read_text()), "cached": True}
    model = load(base)
    t0 = time.perf_counter()
    losses = train(model, Sampler([task], seed, exclude), steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    meta.update(seconds=round(time.perf_counter() - t0, 1), final_loss=sum(losses[-20:]) / 20)
    save(model, path, meta)
    return meta


def task_vector_norm(base: LlamaForCausalLM, expert: LlamaForCausalLM) -> float:
    """‖θ_expert − θ_base‖ / ‖θ_base‖ over all parameters."""
    num = den = 0.0
    eb = dict(expert.named_parameters())
    for name, p in base.named_parameters():
        num += (eb[name].detach() - p.detach()).double().pow(2).sum().item()
        den += p.detach().double().pow(2).sum().item()
    return math.sqrt(num / den)


# ---------------------------------------------------------------------------------------------------
# Evaluation


class EvalSet:
    """The held-out examples of each task, batched once."""

    def __init__(self, names: list[str], n: int, seed: int):
        self.batches = {name: batch([(TASKS[name], p, a) for p, a in heldout(TASKS[name], n, seed)]) for name in names}


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, evalset: EvalSet, names: list[str]) -> dict[str, dict[str, float]]:
    """Exact match and token accuracy per task, with teacher forcing.

    Under teacher forcing, every answer token (and the closing <eos>) being the argmax is exactly the
    condition for greedy decoding to reproduce the answer, so "exact" equals greedy exact-match accuracy.
    """
    out = {}
    for name in names:
        b = evalset.batches[name]
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        pred = logits[:, :-1].argmax(-1)
        target = b["labels"][:, 1:]
        scored = target != -100
        correct = (pred == target) & scored
        exact = (correct.sum(1) == scored.sum(1)).float().mean().item()
        token = (correct.sum() / scored.sum()).item()
        out[name] = {"exact": exact, "token": token}
    return out
