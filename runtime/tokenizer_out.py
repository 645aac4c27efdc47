"""A save's tokenizer files: its tokenizer model's, copied, then edited where the save asks (compiler/vocab.py):
the union's new tokens added at the ids the merged rows have, a chosen chat template, and generation_config.json's
special token ids following their tokens. The files are edited as JSON, keeping the tokenizer's own format."""
from __future__ import annotations

import json
from pathlib import Path

from mgc.core.errors import CheckpointError, OutputError

from .staging import StagedOutput

GENERATION_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def write_tokenizer(out: StagedOutput, save) -> None:
    if save.tokenizer is not None:
        out.copy_files(save.tokenizer.checkpoint.tokenizer_files())
    vocab = getattr(save, "vocab", None)
    if vocab is None:
        return
    try:
        if vocab.added:
            _add_tokens(out.folder, vocab.added, vocab.n_tokens - len(vocab.added))
        if vocab.chat_template is not None:
            _set_template(out.folder, vocab.chat_template)
        if vocab.id_remap:
            _remap_generation_config(out.folder / "generation_config.json", vocab.id_remap)
    except OSError as e:
        raise out.error(e) from None


def _load(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{file.name} of the tokenizer is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file.name} of the tokenizer is not a JSON object")
    return data


def _dump(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _add_tokens(folder: Path, added: tuple[dict, ...], first_id: int) -> None:
    """Add the tokens at ids first_id, first_id + 1, ...; the merged rows assume exactly those ids."""
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        from tokenizers import AddedToken, Tokenizer  # checked at check time: reading the vocabularies needed it

        tok = Tokenizer.from_file(str(tokenizer_json))
        for i, spec in enumerate(added):
            tok.add_tokens([AddedToken(spec["content"], single_word=spec["single_word"], lstrip=spec["lstrip"],
                                       rstrip=spec["rstrip"], normalized=spec["normalized"], special=spec["special"])])
            got = tok.token_to_id(spec["content"])
            if got != first_id + i:
                raise OutputError(
                    f"adding token {spec['content']!r} to the tokenizer gave it id {got}, not {first_id + i} as the "
                    "merged embeddings assume", hint="the base tokenizer's ids are not contiguous; use tokenizer = NAME",
                )
        tok.save(str(tokenizer_json), pretty=True)
    else:  # a tokenizer without tokenizer.json (sentencepiece, vocab.json): added_tokens.json
        file = folder / "added_tokens.json"
        table = _load(file) if file.is_file() else {}
        table.update({spec["content"]: first_id + i for i, spec in enumerate(added)})
        _dump(file, table)
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        config = _load(config_file)
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for i, spec in enumerate(added):
                decoder[str(first_id + i)] = dict(spec)
            _dump(config_file, config)


def _set_template(folder: Path, text: str) -> None:
    """The same template in every place a transformers version may read it from."""
    (folder / "chat_template.jinja").write_text(text)
    for name in ("tokenizer_config.json", "chat_template.json"):
        file = folder / name
        if file.is_file():
            data = _load(file)
            data["chat_template"] = text
            _dump(file, data)


def _remap_generation_config(file: Path, remap: dict) -> None:
    if not file.is_file():
        return
    data = _load(file)

    def fix(v):
        if isinstance(v, list):
            return [fix(x) for x in v]
        return remap.get(v, v) if isinstance(v, int) and not isinstance(v, bool) else v

    for key in GENERATION_ID_KEYS:
        if key in data:
            data[key] = fix(data[key])
    _dump(file, data)
