"""mergekit's `chat_template:` as the save's `chat_template = ...`.

mergekit (merge.py, `_set_chat_template`) reads the value three ways: `auto`, the most common template among the
models the merge names (each stripped; models without one, or whose tokenizer does not load, are skipped; with
none, the output keeps its tokenizer's own); a short name without `{` or a newline, one of the templates bundled
as `mergekit/_data/chat_templates/NAME.jinja`; and otherwise the template's Jinja text, refused when shorter
than 20 characters or without `{`.

The text becomes `chat_template = "..."`. `auto` becomes `chat_template = MODEL`, a model holding the most common
template, where every named model is a local folder whose template mgc reads as it would for that option, and
one template is more common than every other (mergekit breaks a tie by the order of a Python set: it is not
determined). The bundled templates are LGPL-3.0 files of mergekit and are not copied into mgc: a name is
refused with a hint saying where its text is."""
from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace
from typing import Optional

from mgc.compiler.vocab_options import chat_template_of
from mgc.core.errors import MgcError
from mgc.mergekit_models import Importer, model_ref
from mgc.mergekit_yaml import Y, refuse, string

# mergekit 0.1.5's mergekit/_data/chat_templates/*.jinja
BUNDLED = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def chat_template_option(imp: Importer, top: dict[str, Y], ct: Y) -> Optional[str]:
    """The value of the save's chat_template option, or None where mergekit sets none."""
    v = string(ct, "chat_template")
    if v == "auto":
        return _auto(imp, top, ct)
    if len(v) < 256 and "\n" not in v and "{" not in v and v in BUNDLED:
        refuse(ct, f"chat_template: {v} names a template bundled with mergekit "
                   f"(mergekit/_data/chat_templates/{v}.jinja, LGPL-3.0), which mgc import does not copy",
               "paste that file's Jinja text into the recipe's save, chat_template = \"...\", or name the model "
               "whose template to keep, chat_template = MODEL")
    if len(v) < 20 or "{" not in v:
        refuse(ct, f"chat_template '{v}' is neither one of mergekit's bundled templates nor Jinja text "
                   "(mergekit refuses it too)",
               f"mergekit's bundled templates: {', '.join(BUNDLED)} and auto")
    return json.dumps(v, ensure_ascii=False)


def referenced(top: dict[str, Y]) -> list[str]:
    """The model references of a mergekit document, in order, each once (mergekit's referenced_models)."""
    found: list[str] = []

    def add(y: Optional[Y]):
        if y is not None and y.value is not None:
            r = string(model_ref(y), "a model").strip()
            if r not in found:
                found.append(r)

    add(top.get("base_model"))
    for entry in (top["models"].value if "models" in top and isinstance(top["models"].value, list) else []):
        if isinstance(entry.value, dict):
            add(entry.value.get("model"))
    for sl in (top["slices"].value if "slices" in top and isinstance(top["slices"].value, list) else []):
        srcs = sl.value.get("sources") if isinstance(sl.value, dict) else None
        for s in (srcs.value if srcs is not None and isinstance(srcs.value, list) else []):
            if isinstance(s.value, dict):
                add(s.value.get("model"))
    return found


def _auto(imp: Importer, top: dict[str, Y], ct: Y) -> Optional[str]:
    templates: list[tuple[str, str]] = []  # (reference, stripped template)
    for ref in referenced(top):
        folder = imp.local_checkpoint(ref)
        if folder is None:
            refuse(ct, f"chat_template: auto picks the most common chat template among the merged models, and "
                       f"mgc import cannot read the template of '{ref}' (not a local folder)",
                   "name the model whose template to keep in the recipe's save, chat_template = MODEL")
        try:
            text = chat_template_of(SimpleNamespace(path=folder), None)
        except MgcError as e:
            refuse(ct, f"chat_template: auto: {e.message}",
                   "name the model whose template to keep in the recipe's save, chat_template = MODEL")
        if text and text.strip():
            templates.append((ref, text.strip()))
    if not templates:
        imp.notes.append("chat_template: auto (no merged model has a chat template)")
        return None
    counts = Counter(t for _, t in templates).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        tied = [r for r, t in templates if counts[[c for c, _ in counts].index(t)][1] == counts[0][1]]
        refuse(ct, f"chat_template: auto: the merged models' chat templates are equally common "
                   f"({', '.join(tied)}), and mergekit's choice among them is not determined",
               "name the model whose template to keep in the recipe's save, chat_template = MODEL")
    winner = next(r for r, t in templates if t == counts[0][0])
    return imp.ref(winner)
