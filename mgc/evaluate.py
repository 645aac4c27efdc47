"""Evaluate checkpoints: perplexity, teacher-forced answer accuracy, and KL to teachers.

The KL is the seed paper's *function distance* (arXiv:2603.04972, Eq. 1-2): the mean over predicted
positions of KL(p_teacher(. | x) || p_model(. | x)) between next-token distributions, in nats.

Data files, documents, loading, the device and the tokenization of a document are those of `mgc.lm`,
shared with `mgc diagnose` and `fisher()`.

Conventions shared by every metric here
----------------------------------------
* Tokenization. Text is encoded without the tokenizer's own special tokens, and the tokenizer's BOS
  token (if it has one) is prepended by hand (`mgc.lm`). BOS is context only: it is never a predicted
  token. The first real token is predicted from BOS; a tokenizer without a BOS token leaves the first
  token unpredicted (context). No EOS is appended.
* Truncation. A sequence longer than `max_length` tokens (BOS included) is cut: a text document keeps
  its first `max_length` tokens (the rest is dropped, not scored in a second window); a prompt/answer
  record keeps its whole answer and drops tokens from the *start* of the prompt (and, only if the answer
  alone does not fit, the end of the answer). `max_length` is also capped at the model's
  `max_position_embeddings`. The number of truncated sequences is reported.
* Averaging. Every mean is a mean over tokens pooled over the whole data set (a micro-average),
  except exact match, which is a mean over records.
* Precision. Models are loaded and run in float32; log-probabilities, NLL and KL are computed in
  float64 from the float32 logits (a small KL is a difference of nearly equal log-probabilities, which
  float32 would round to a few parts in 1e4), a chunk of positions at a time to bound the memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch

from mgc.core.errors import CheckpointError
from mgc.lm import (  # noqa: F401  (MissingExtraError, require: still importable from here)
    DataError, Dataset, Item, MissingExtraError, Record, bos, context_length, encode_plain, encode_texts, load,
    read_data, require, resolve_device,
)


# -------------------------------------------------------------------------------------------- tokens


def encode_records(tokenizer, records: Iterable[Any], max_length: int) -> list[Item]:
    """BOS + prompt + answer; the answer's tokens are scored.

    As in lm-evaluation-harness, whitespace that ends the prompt is moved to the start of the answer
    (a byte-level BPE attaches a space to the word after it), and prompt and answer are encoded
    separately so that the answer's tokens are exactly the tokens of the answer text. Too long a record
    loses the start of its prompt first.
    """
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    items = []
    for r in records:
        prompt, answer = _prompt_answer(r)
        stripped = prompt.rstrip()
        prompt, answer = stripped, prompt[len(stripped):] + answer
        b, p, a = bos(tokenizer), encode_plain(tokenizer, prompt), encode_plain(tokenizer, answer)
        truncated = len(b) + len(p) + len(a) > max_length
        if truncated:
            room = max_length - len(b) - len(a)
            if room >= 0:
                p = p[len(p) - room:] if room else []
            else:
                p, a = [], a[: max_length - len(b)]
        ids = b + p + a
        start = max(len(b) + len(p), 1)
        if len(ids) > start:
            items.append(Item(ids, start, truncated))
    return items


def _prompt_answer(r: Any) -> tuple[str, str]:
    if isinstance(r, Record):
        return r.prompt, r.answer
    if isinstance(r, dict):
        return r["prompt"], r["answer"]
    prompt, answer = r
    return prompt, answer


def encode(tokenizer, data: Any, max_length: int) -> tuple[str, list[Item]]:
    """Encode a Dataset, a list of texts or a list of records (Record, dict or (prompt, answer))."""
    if isinstance(data, Dataset):
        kind, items = data.kind, data.items
    else:
        items = list(data)
        kind = "text" if all(isinstance(x, str) for x in items) else "qa"
    if kind == "qa":
        return kind, encode_records(tokenizer, items, max_length)
    return kind, encode_texts(tokenizer, items, max_length)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 1 on real tokens
    targets: torch.Tensor  # [B, T-1], input_ids shifted left
    scored: torch.Tensor  # [B, T-1] bool: targets[b, t] is scored (predicted by the logits at t)
    items: list[Item]


def batches(items: Sequence[Item], batch_size: int, pad_id: int, device: torch.device) -> Iterator[Batch]:
    """Right-padded batches, longest sequences first."""
    order = sorted(items, key=lambda it: -len(it.ids))
    for i in range(0, len(order), max(1, batch_size)):
        chunk = order[i : i + batch_size]
        width = max(len(it.ids) for it in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)
        for b, it in enumerate(chunk):
            n = len(it.ids)
            ids[b, :n] = torch.tensor(it.ids, dtype=torch.long)
            mask[b, :n] = 1
            scored[b, it.start : n] = True
        ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
        yield Batch(ids, mask, ids[:, 1:], scored[:, 1:], chunk)


def pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


ROWS = 1024  # positions per float64 log-softmax chunk: bounds the extra memory to ROWS * vocab * 8 bytes


@torch.no_grad()
def _logits(model, batch: Batch) -> torch.Tensor:
    """The logits at every scored position, [N, V] (N = batch.scored.sum()): row i predicts target i."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    return logits[batch.scored]


def _chunks(n: int) -> Iterator[slice]:
    for i in range(0, n, ROWS):
        yield slice(i, min(i + ROWS, n))


# ------------------------------------------------------------------------------------------- metrics


@dataclass
class TokenStats:
    nll: float = 0.0  # summed negative log-likelihood of the scored tokens, nats
    tokens: int = 0
    correct: int = 0  # scored tokens whose greedy (argmax) prediction is right
    sequences: int = 0
    exact: int = 0  # sequences whose every scored token is right
    truncated: int = 0


@torch.no_grad()
def token_stats(model, items: Sequence[Item], batch_size: int = 8, pad: int = 0) -> TokenStats:
    """Teacher-forced NLL and greedy accuracy of the scored tokens of `items`."""
    out = TokenStats(sequences=len(items), truncated=sum(it.truncated for it in items))
    device = _device_of(model)
    for batch in batches(items, batch_size, pad, device):
        logits = _logits(model, batch)
        target = batch.targets[batch.scored]
        for rows in _chunks(len(target)):
            logp = torch.log_softmax(logits[rows].double(), dim=-1)
            out.nll -= float(logp.gather(1, target[rows, None]).sum())
        right = logits.argmax(-1) == target
        out.tokens += int(target.numel())
        out.correct += int(right.sum())
        # per sequence: every scored token right (rows of `scored`, in the order of `right`)
        per_row = torch.zeros(batch.scored.shape, dtype=torch.bool, device=device)
        per_row[batch.scored] = ~right
        out.exact += int((~per_row.any(dim=1)).sum())
    return out


def perplexity(model, tokenizer, texts: Iterable[str], max_length: int = 512, batch_size: int = 8) -> float:
    """exp(mean NLL per predicted token) over all documents pooled.

    Each document is BOS + its tokens (BOS is context, not predicted), cut to `max_length` tokens
    (capped at the model's context length); the tokens beyond are dropped, not scored.
    """
    items = encode_texts(tokenizer, texts, context_length(model, max_length))
    s = token_stats(model, items, batch_size, pad_id(tokenizer))
    if s.tokens == 0:
        raise DataError("no tokens to predict: every document is empty")
    return math.exp(s.nll / s.tokens)


def answer_accuracy(model, tokenizer, records: Iterable[Any], max_length: int = 512, batch_size: int = 8) -> dict:
    """Teacher-forced answer scoring: BOS + prompt + answer, scoring the answer tokens only.

    Returns token_accuracy (share of answer tokens whose argmax prediction is the answer token, pooled
    over records), exact_match (share of records whose every answer token is right), answer_nll (mean
    NLL per answer token, nats), records, answer_tokens and truncated.
    """
    items = encode_records(tokenizer, records, context_length(model, max_length))
    s = token_stats(model, items, batch_size, pad_id(tokenizer))
    if s.tokens == 0:
        raise DataError("no answer tokens to score")
    return {
        "token_accuracy": s.correct / s.tokens,
        "exact_match": s.exact / s.sequences,
        "answer_nll": s.nll / s.tokens,
        "records": s.sequences,
        "answer_tokens": s.tokens,
        "truncated": s.truncated,
    }


@torch.no_grad()
def kl_sum(teacher, model, items: Sequence[Item], batch_size: int = 8, pad: int = 0) -> tuple[float, int]:
    """Sum over the scored positions of KL(p_teacher || p_model) in nats, and the number of positions."""
    total, count = 0.0, 0
    t_dev, m_dev = _device_of(teacher), _device_of(model)
    for batch in batches(items, batch_size, pad, m_dev):
        z_m = _logits(model, batch)
        z_t = _logits(teacher, _to(batch, t_dev)).to(m_dev)
        if z_t.shape[-1] != z_m.shape[-1]:
            raise CheckpointError(
                f"teacher and model have different vocabulary sizes ({z_t.shape[-1]} and {z_m.shape[-1]}): "
                "KL needs the same tokenizer"
            )
        for rows in _chunks(len(z_m)):
            lp_t = torch.log_softmax(z_t[rows].double(), dim=-1)
            lp_m = torch.log_softmax(z_m[rows].double(), dim=-1)
            total += float((lp_t.exp() * (lp_t - lp_m)).sum())
        count += len(z_m)
    return total, count


def _to(batch: Batch, device: torch.device) -> Batch:
    if batch.input_ids.device == device:
        return batch
    return Batch(*(t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.targets, batch.scored)), batch.items)


def mean_kl(teacher, model, tokenizer, data: Any, max_length: int = 512, batch_size: int = 8) -> float:
    """Mean over predicted positions of KL(p_teacher(.|x) || p_model(.|x)), nats: the function distance.

    `data` is a list of texts (every predicted position of every document, pooled), a list of records
    (Record, {"prompt", "answer"} dicts or pairs: the answer positions only), or a Dataset. Both models
    read the same tokens, encoded with `tokenizer`, so they must share a vocabulary.
    """
    limit = min(context_length(model, max_length), context_length(teacher, max_length))
    _, items = encode(tokenizer, data, limit)
    total, count = kl_sum(teacher, model, items, batch_size, pad_id(tokenizer))
    if count == 0:
        raise DataError("no positions to compare")
    return total / count


# ---------------------------------------------------------------------------------------- evaluate


def _same_vocabulary(a, b) -> bool:
    try:
        return a.get_vocab() == b.get_vocab()
    except Exception:  # a tokenizer without get_vocab: trust the vocabulary-size check in kl_sum
        return True


def evaluate(
    models: Sequence[Union[str, Path]],
    data: Union[str, Path, Dataset],
    teachers: Optional[Sequence[Union[str, Path]]] = None,
    device: Union[str, torch.device] = "auto",
    max_length: int = 512,
    batch_size: int = 8,
    allow_pickle: bool = False,
) -> list[dict]:
    """Evaluate each checkpoint folder in `models` on `data` (a path or a Dataset).

    One dict per model, in order: "model" (the path as given), "kind" ("text" or "qa"), then for text
    data "perplexity", "nll" (mean per token), "documents", "tokens"; for qa data "token_accuracy",
    "exact_match", "answer_nll", "records", "answer_tokens"; always "truncated" and "max_length"; with
    teachers, "kl" ({teacher path: mean KL(teacher || model)}) and "mean_kl" (their unweighted mean).
    The teachers are loaded once and kept in memory; each model is loaded, scored and released in turn.
    Each model is scored with its own tokenizer; the KL uses the model's tokenizer and requires each
    teacher's tokenizer to have the same vocabulary.
    """
    dataset = data if isinstance(data, Dataset) else read_data(data)
    dev = resolve_device(device)
    teachers = [str(t) for t in (teachers or [])]
    loaded_teachers = {t: load(t, dev, allow_pickle=allow_pickle) for t in dict.fromkeys(teachers)}
    results = []
    for path in models:
        path = str(path)
        model, tokenizer = loaded_teachers[path] if path in loaded_teachers else load(path, dev, allow_pickle=allow_pickle)
        limit = context_length(model, max_length)
        kind, items = encode(tokenizer, dataset, limit)
        pad = pad_id(tokenizer)
        s = token_stats(model, items, batch_size, pad)
        if s.tokens == 0:
            raise DataError(f"{dataset.path}: no tokens to score")
        row: dict[str, Any] = {"model": path, "kind": kind}
        if kind == "qa":
            row.update(
                token_accuracy=s.correct / s.tokens, exact_match=s.exact / s.sequences, answer_nll=s.nll / s.tokens,
                records=s.sequences, answer_tokens=s.tokens,
            )
        else:
            row.update(perplexity=math.exp(s.nll / s.tokens), nll=s.nll / s.tokens, documents=s.sequences, tokens=s.tokens)
        row.update(truncated=s.truncated, max_length=limit)
        if teachers:
            row["kl"] = {}
            for t in teachers:
                t_model, t_tok = loaded_teachers[t]
                if not _same_vocabulary(tokenizer, t_tok):
                    raise CheckpointError(
                        f"{t}: the teacher's tokenizer differs from that of {path}",
                        hint="KL between next-token distributions needs models that share a tokenizer",
                    )
                t_limit = min(limit, context_length(t_model, max_length))
                t_items = items if t_limit == limit else encode(tokenizer, dataset, t_limit)[1]
                total, count = kl_sum(t_model, model, t_items, batch_size, pad)
                row["kl"][t] = total / count
            row["mean_kl"] = sum(row["kl"].values()) / len(row["kl"])
        results.append(row)
        if path not in loaded_teachers:
            del model
    return results


def format_table(results: Sequence[dict]) -> str:
    """The results of `evaluate` as a text table, one row per model."""
    if not results:
        return ""
    kind = results[0]["kind"]
    headers = ["model"]
    if kind == "qa":
        headers += ["token acc", "exact match", "answer NLL"]
    else:
        headers += ["perplexity", "NLL/token"]
    teachers = list(results[0].get("kl", {}))
    headers += [f"KL({Path(t).name or t})" for t in teachers]
    if teachers:
        headers.append("mean KL")
    rows = []
    for r in results:
        row = [r["model"]]
        if kind == "qa":
            row += [f"{r['token_accuracy']:.4f}", f"{r['exact_match']:.4f}", f"{r['answer_nll']:.4f}"]
        else:
            row += [f"{r['perplexity']:.3f}", f"{r['nll']:.4f}"]
        row += [f"{r['kl'][t]:.5f}" for t in teachers]
        if teachers:
            row.append(f"{r['mean_kl']:.5f}")
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(out)
