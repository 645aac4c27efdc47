"""The options of `save merged to ...` from a mergekit configuration: the output dtype, the tokenizer (its
source, its tokens, pad_to_multiple_of) and the chat template (mgc/mergekit_chat.py)."""
from __future__ import annotations

import json
from typing import Optional

from mgc.mergekit_chat import chat_template_option
from mgc.mergekit_models import Importer
from mgc.mergekit_yaml import Y, mapping, refuse, string

DTYPES = {
    "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
    "float32": "fp32", "fp32": "fp32", "float": "fp32",
}


def save_options(imp: Importer, top: dict[str, Y], base: Optional[str]) -> dict[str, str]:
    opts = {}
    dt = top.get("out_dtype") or top.get("dtype")
    if dt is not None and dt.value is not None:
        d = string(dt, "dtype")
        if d not in DTYPES:
            refuse(dt, f"dtype '{d}' is not one mgc writes", "mgc writes bf16, fp16 or fp32")
        opts["dtype"] = DTYPES[d]
    if "dtype" in top and top["dtype"].value not in (None, "float32", "fp32", "float"):
        imp.notes.append(f"dtype: {top['dtype'].value} (mergekit's compute dtype; mgc computes in float32)")
    ts = top.get("tokenizer_source")
    tk = top.get("tokenizer")
    if ts is not None and tk is not None:
        refuse(tk, "give tokenizer_source or tokenizer, not both (mergekit refuses this too)", key=True)
    if tk is not None:
        f = mapping(tk, "tokenizer")
        for k in f:
            if k not in ("source", "tokens", "pad_to_multiple_of"):
                refuse(f[k], f"unknown key '{k}' in tokenizer", key=True)
        ts = f.get("source")
        if ts is None:
            opts["tokenizer"] = "union"  # mergekit's default source
        if "pad_to_multiple_of" in f:
            n = f["pad_to_multiple_of"].value
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                refuse(f["pad_to_multiple_of"], "pad_to_multiple_of must be a positive integer")
            opts["pad_to_multiple_of"] = str(n)
        if "tokens" in f:
            entries = []
            for tok, spec in mapping(f["tokens"], "tokens").items():
                s = mapping(spec, f"token {tok!r}") if isinstance(spec.value, dict) else None
                src = s.get("source") if s else None
                if s and s.get("force") is not None and s["force"].value:
                    refuse(s["force"], "force: true on a token is not supported", key=True)
                if src is None or not isinstance(src.value, str) or src.value in ("union", "base"):
                    refuse(spec, f"token {tok!r}: only `source: MODEL` is supported",
                            "mgc's tokens = { \"tok\": model } takes the token's rows from that model")
                entries.append(f"{json.dumps(tok, ensure_ascii=False)}: {imp.model(src)}")
            opts["tokens"] = "{ " + ", ".join(entries) + " }"
    if ts is not None and ts.value is not None:
        v = string(ts, "tokenizer_source")
        if v == "union":
            opts["tokenizer"] = "union"
        elif v == "base":
            if base is None:
                refuse(ts, "tokenizer_source: base without a base_model")
            opts["tokenizer"] = base
        else:
            opts["tokenizer"] = imp.model(ts)
    ct = top.get("chat_template")
    if ct is not None and ct.value is not None:
        template = chat_template_option(imp, top, ct)
        if template is not None:
            opts["chat_template"] = template
    return opts
