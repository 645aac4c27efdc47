"""Synthetic prompt -> answer tasks and the character-level tokenizer they share.

Every example is one token sequence

    <bos> TAG : prompt > answer <eos> <pad>...

where TAG is one upper-case letter naming the task. The loss (training) and the accuracy (evaluation)
are taken on the answer tokens and the closing <eos> only. Everything here is deterministic given a
`random.Random`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch

# ---------------------------------------------------------------------------------------------------
# Tokenizer: a fixed character vocabulary. The checkpoints carry it as `vocab.json` (see train.py).

SPECIALS = ["<pad>", "<bos>", "<eos>"]
PAD, BOS, EOS = 0, 1, 2
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
CHARS = DIGITS + LETTERS + "()[]:>" + "?" + "CRSBXNDI"  # "?": the hidden tag; the last group: task tags
VOCAB = SPECIALS + list(CHARS)
STOI = {c: i for i, c in enumerate(VOCAB)}
VOCAB_SIZE = 64  # >= len(VOCAB), rounded up
assert len(VOCAB) <= VOCAB_SIZE
MAX_LEN = 24  # longest sequence, <bos> .. <eos>


def encode(s: str) -> list[int]:
    return [STOI[c] for c in s]


def decode(ids) -> str:
    return "".join(VOCAB[i] for i in ids if i > EOS)


# ---------------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class Task:
    name: str
    tag: str
    sample: Callable[[random.Random], tuple[str, str]]  # rng -> (prompt, answer)


def _letters(rng: random.Random, lo: int, hi: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _copy(rng):
    s = _letters(rng, 3, 8)
    return s, s


def _reverse(rng):
    s = _letters(rng, 3, 8)
    return s, s[::-1]


def _sort(rng):
    s = _letters(rng, 3, 8, DIGITS)
    return s, "".join(sorted(s))


def _double(rng):
    s = _letters(rng, 3, 6)
    return s, "".join(c + c for c in s)


def _increment(rng):
    n = rng.randint(0, 998)
    return str(n), str(n + 1)


def _balanced(s: str) -> bool:
    stack = []
    for c in s:
        if c in "([":
            stack.append(c)
        elif not stack or stack.pop() != {")": "(", "]": "["}[c]:
            return False
    return not stack


def _brackets(rng):
    # Half the prompts are balanced by construction; the rest are random strings (almost all unbalanced).
    n = rng.randint(1, 5)
    if rng.random() < 0.5:
        s = ""
        for _ in range(n):  # build a balanced string by nesting or concatenating pairs
            o, c = rng.choice(["()", "[]"])
            s = o + s + c if rng.random() < 0.5 else s + o + c
    else:
        s = "".join(rng.choice("()[]") for _ in range(2 * n))
    return s, "y" if _balanced(s) else "n"


_SHIFT = {c: LETTERS[(i + 3) % 26] for i, c in enumerate(LETTERS)}  # a fixed substitution (Caesar +3)


def _cipher(rng):
    s = _letters(rng, 3, 8)
    return s, "".join(_SHIFT[c] for c in s)


def _count(rng):
    s = _letters(rng, 1, 9, "abc")
    return s, str(s.count("a"))


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("copy", "C", _copy),
        Task("reverse", "R", _reverse),
        Task("sort", "S", _sort),
        Task("brackets", "B", _brackets),
        Task("cipher", "X", _cipher),
        Task("count", "N", _count),
        Task("double", "D", _double),
        Task("increment", "I", _increment),
    ]
}


def render(task: Task, prompt: str, answer: str, hide_tag: bool = False) -> tuple[list[int], int]:
    """Token ids of one example and the index of its first answer token. With `hide_tag` the task's tag
    is replaced by "?", the same for every task."""
    head = [BOS] + encode(f"{'?' if hide_tag else task.tag}:{prompt}>")
    ids = head + encode(answer) + [EOS]
    assert len(ids) <= MAX_LEN, (task.name, prompt, answer)
    return ids, len(head)


def heldout(task: Task, n: int, seed: int) -> list[tuple[str, str]]:
    """`n` distinct held-out (prompt, answer) pairs, from their own random stream."""
    rng = random.Random(f"heldout/{task.name}/{seed}")
    seen, out = set(), []
    for _ in range(100 * n):
        p, a = task.sample(rng)
        if p not in seen:
            seen.add(p)
            out.append((p, a))
            if len(out) == n:
                break
    return out


def batch(examples: list[tuple[Task, str, str]], hide_tag: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 everywhere but the answer and <eos>).

    labels[i, j] is the target for position j (transformers shifts them inside the loss); we keep
    them unshifted like `transformers` expects.
    """
    rows = [render(t, p, a, hide_tag) for t, p, a in examples]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, start) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, start : len(ids)] = torch.tensor(ids[start:])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class Sampler:
    """An endless stream of training batches from a mix of tasks, skipping any held-out prompt."""

    def __init__(self, tasks: list[Task], seed: int, exclude: dict[str, set[str]], hide_tag: bool = False):
        self.tasks = tasks
        self.hide_tag = hide_tag
        self.rng = random.Random(f"train/{'+'.join(t.name for t in tasks)}/{seed}")
        self.exclude = exclude

    def __call__(self, size: int) -> dict[str, torch.Tensor]:
        out = []
        while len(out) < size:
            t = self.rng.choice(self.tasks)
            p, a = t.sample(self.rng)
            if p not in self.exclude.get(t.name, ()):
                out.append((t, p, a))
        return batch(out, self.hide_tag)
