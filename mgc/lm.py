"""What `mgc eval`, `mgc diagnose` and `fisher()` share: the optional `transformers` import, the device, a
checkpoint loaded as a transformers model and tokenizer, data files read into documents, and the rule that
turns a document into token ids.

`transformers` is an optional dependency (the `mgc[eval]` extra); it is imported only inside the functions
that need it, so `import mgc` and the merge path never import it.

* Documents: see mgc.core.documents.
* Tokenization. A document is encoded without the tokenizer's own special tokens, and the tokenizer's BOS
  token (if it has one) is prepended by hand, so every tokenizer is treated the same way whatever its
  post-processor does. BOS is context only: it is never a predicted token; a tokenizer without a BOS
  token leaves the first token unpredicted (context). No EOS is appended. A sequence longer than
  `max_length` tokens (BOS included) keeps its first `max_length` tokens.
"""
from __future__ import annotations

import importlib
import json
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from mgc.core.devices import resolve_device  # noqa: F401  (re-exported: the one device choice)
from mgc.core.documents import DataError, read_documents, read_text, split_documents  # noqa: F401
from mgc.core.errors import CheckpointError, MgcError, Source, Span

EXTRA_HINT = "pip install 'mgc[eval]'"


class MissingExtraError(MgcError, ImportError):
    """An optional dependency of `mgc eval`, `mgc diagnose` or `fisher()` (the `mgc[eval]` extra) is missing."""


def require(module: str, user: str = "this command", extra: str = "eval"):
    """Import an optional dependency, or fail with a hint to install the `mgc[eval]` extra (or `extra`)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        hint = EXTRA_HINT if extra == "eval" else f"pip install 'mgc[{extra}]' (or pip install {top})"
        raise MissingExtraError(
            f"{user} needs the optional package '{top}', which is not installed ({e})", hint=hint
        ) from None


# --------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Record:
    """One prompt/answer pair from a .jsonl file (`line` is its 1-based line number there)."""

    prompt: str
    answer: str
    line: int = 0


@dataclass
class Dataset:
    """Evaluation data: plain-text documents (`kind == "text"`) or prompt/answer records (`"qa"`)."""

    path: str
    kind: str
    texts: list[str] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records) if self.kind == "qa" else len(self.texts)

    @property
    def items(self) -> Union[list[str], list[Record]]:
        return self.records if self.kind == "qa" else self.texts

    def documents(self) -> list[str]:
        """The data as plain text: the documents, or each record's prompt followed by its answer."""
        return [r.prompt + r.answer for r in self.records] if self.kind == "qa" else list(self.texts)


def read_data(path: Union[str, Path]) -> Dataset:
    """Read evaluation data.

    * `*.jsonl`: one JSON object per line with string fields "prompt" and "answer" (the answer must not
      be empty; other fields are ignored; blank lines are skipped). A malformed line is reported as
      `file:line:col` with the line and a caret.
    * any other file (`*.txt`): plain-text documents separated by blank lines (`split_documents`).
    """
    path = Path(path)
    text = read_text(path)
    if path.suffix.lower() == ".jsonl":
        data = Dataset(str(path), "qa", records=_read_jsonl(path, text))
    else:
        data = Dataset(str(path), "text", texts=split_documents(text))
    if len(data) == 0:
        raise DataError(f"{path}: no {'records' if data.kind == 'qa' else 'documents'} in the file")
    return data


def _read_jsonl(path: Path, text: str) -> list[Record]:
    source = Source(str(path), text)
    lines = text.split("\n")

    def fail(n: int, message: str, col: int = 1, hint: Optional[str] = None):
        line = lines[n - 1]
        end = col + 1 if col > 1 else max(2, len(line) + 1)
        raise DataError(message, Span(source, n, col, n, end), hint=hint)

    hint = 'each line must be a JSON object like {"prompt": "2+2=", "answer": "4"}'
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            fail(n, f"invalid JSON: {e.msg}", col=e.colno, hint=hint)
        if not isinstance(obj, dict):
            fail(n, f"expected a JSON object, got {type(obj).__name__}", hint=hint)
        for key in ("prompt", "answer"):
            if key not in obj:
                fail(n, f"the record has no \"{key}\" field", hint=hint)
            if not isinstance(obj[key], str):
                fail(n, f"\"{key}\" must be a string, got {type(obj[key]).__name__}", hint=hint)
        if not obj["answer"]:
            fail(n, "\"answer\" is empty: there is nothing to score", hint=hint)
        records.append(Record(obj["prompt"], obj["answer"], n))
    return records


# -------------------------------------------------------------------------------------------- models


def load(path: Union[str, Path], device: Union[str, torch.device] = "cpu", *, allow_pickle: bool = False):
    """Load a checkpoint folder as (model, tokenizer): AutoModelForCausalLM in float32, in eval mode, on `device`.

    Only safetensors weights are read unless `allow_pickle` (pickle `*.bin` files can run code).
    Any failure is a `CheckpointError` naming the folder.
    """
    transformers = require("transformers")
    folder = Path(path)
    dev = resolve_device(device)
    model = load_model(folder, allow_pickle=allow_pickle)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise CheckpointError(
            f"{folder}: cannot load the tokenizer: {_first_line(e)}",
            hint="a merged checkpoint needs tokenizer files: `save ... { tokenizer = base }`",
        ) from None
    model = model.to(device=dev, dtype=torch.float32).eval()
    return model, tokenizer


def load_model(folder: Union[str, Path], *, allow_pickle: bool = False):
    """AutoModelForCausalLM from a checkpoint folder, in float32 on the CPU, from the weights mgc reads.

    mgc reads a folder's safetensors files whenever it has any, and its pickle files only when it has none
    and pickles are allowed; transformers is told the same (`use_safetensors`). Left to itself, transformers
    falls back to a pytorch_model.bin beside safetensors files it does not look for (any name but
    model.safetensors and its index): it would unpickle that file, unasked, and run other weights than the
    ones mgc merges. Any failure is a `CheckpointError` naming the folder.
    """
    from mgc.core.paths import show_path, stat_path

    transformers = require("transformers")
    folder = Path(folder)
    st = stat_path(folder, None)
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{show_path(folder)}: no such checkpoint folder")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json in the checkpoint folder")
    has_safetensors = any(folder.glob("*.safetensors"))
    if not has_safetensors and not allow_pickle and any(folder.glob("*.bin")):
        raise CheckpointError(
            f"{folder}: only pickle (*.bin) weights, which are refused because loading them can run code",
            hint="pass --allow-pickle (allow_pickle=True) for a checkpoint you trust",
        )
    kwargs: dict[str, Any] = {"use_safetensors": has_safetensors or not allow_pickle}
    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    kwargs["dtype" if version >= (4, 56) else "torch_dtype"] = torch.float32
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, safetensors errors...
        raise CheckpointError(f"{folder}: cannot load the model: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def context_length(model, max_length: int) -> int:
    """`max_length`, capped at the model's `max_position_embeddings` when the config has one."""
    return capped_length(getattr(getattr(model, "config", None), "max_position_embeddings", None), max_length)


def capped_length(limit, max_length: int) -> int:
    """`max_length`, capped at `limit` (a config's `max_position_embeddings`) where that is a positive int."""
    return min(max_length, limit) if isinstance(limit, int) and limit > 0 else max_length


# -------------------------------------------------------------------------------------------- tokens


@dataclass
class Item:
    """One sequence: token ids, of which ids[start:] are scored (each predicted from the ids before it)."""

    ids: list[int]
    start: int
    truncated: bool = False


def encode_plain(tokenizer, text: str) -> list[int]:
    """The text's tokens, without the tokenizer's special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def bos(tokenizer) -> list[int]:
    """[the tokenizer's BOS id], or [] for a tokenizer without one."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    return [bos_id] if bos_id is not None else []


def encode_text(tokenizer, text: str, max_length: int) -> Optional[Item]:
    """BOS + the document's tokens, cut to `max_length`; every token after the first is scored.
    None for a document of fewer than 2 tokens, which predicts nothing."""
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    ids = bos(tokenizer) + encode_plain(tokenizer, text)
    item = Item(ids[:max_length], 1, len(ids) > max_length)
    return item if len(item.ids) >= 2 else None


def encode_texts(tokenizer, texts: Iterable[str], max_length: int) -> list[Item]:
    """`encode_text` of each document, leaving out those that predict nothing."""
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    return [it for it in (encode_text(tokenizer, t, max_length) for t in texts) if it is not None]
