"""One mergekit document as mgc statements: `models:` as one operator call; `slices:` as one merge a slice,
each over `stack(m.layers[a:b])` so the slice's gradients span its layers, stacked, with the final norm and
head taken from the last slice (mergekit's post_weights, named as mgc/mergekit_post.py finds them) where the
first slice's model differs."""
from __future__ import annotations

from mgc.mergekit_models import Importer, model_ref
from mgc.mergekit_options import save_options
from mgc.mergekit_params import merge_call, read_params, yaml_scalar
from mgc.mergekit_post import FALLBACK_NOTE, LLAMA_POST_WEIGHTS, post_weight_keys
from mgc.mergekit_yaml import Y, mapping, refuse, string
from mgc.stdlib import OPERATORS

# mergekit options that change no number: written as a comment
NO_OP_OPTIONS = {
    "int8_mask", "lazy_unpickle", "low_cpu_memory", "allow_crimes", "copy_tokenizer", "cuda", "device",
    "out_shard_size", "trust_remote_code", "safe_serialization", "write_model_card", "verbosity", "quiet",
    "read_to_gpu", "multi_gpu", "num_threads", "gpu_rich", "async_write", "write_threads", "clone_tensors",
    "transformers_cache", "lora_merge_cache", "random_seed",
}
TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "name", "modules"}


def translate(imp: Importer, doc: Y, var: str) -> tuple[str, dict[str, str]]:
    """The statements of one mergekit document; returns (expression lines, save options)."""
    top = mapping(doc, "a mergekit configuration")
    for k, v in top.items():
        if k == "random_seed":
            imp.notes.append(f"random_seed: {v.value} (mgc's random operators draw from their own seed = ...)")
        elif k in NO_OP_OPTIONS:
            imp.notes.append(f"{k}: {yaml_scalar(v.value)}")
        elif k not in TOP_KEYS:
            refuse(v, f"unknown mergekit key '{k}'", key=True)
    if "modules" in top:
        refuse(top["modules"], "mergekit's `modules:` (per-module merges of multimodal models) is not supported", key=True)
    if "merge_method" not in top:
        refuse(doc, "no merge_method")
    method_y = top["merge_method"]
    method = string(method_y, "merge_method")
    if method not in OPERATORS or method == "fisher_merge":
        refuse(method_y, f"mergekit's merge method '{method}' has no mgc operator",
                f"mgc's operators: {', '.join(n for n in OPERATORS if n != 'fisher_merge')}")
    op = OPERATORS[method]
    if ("models" in top) == ("slices" in top):
        refuse(doc, "give exactly one of models: and slices:")
    base_y = top.get("base_model")
    base = imp.model(model_ref(base_y)) if base_y is not None and base_y.value is not None else None
    global_params = read_params(imp, top.get("parameters"), op, method)
    out: list[str] = []
    if "models" in top:
        items = top["models"].value
        if not isinstance(items, list) or not items:
            refuse(top["models"], "models: must be a non-empty list")
        sources = []
        for item in items:
            f = mapping(item, "an entry of models:")
            for k in f:
                if k not in ("model", "parameters"):
                    refuse(f[k], f"unknown key '{k}' in a model entry", key=True)
            if "model" not in f:
                refuse(item, "a model entry has no model")
            sources.append((imp.model(model_ref(f["model"])), read_params(imp, f.get("parameters"), op, method), None))
        expr = merge_call(imp, op, method, method_y, base, sources, [global_params], one_layer=False, at=top["models"])
        out.append(f"{var} = {expr}")
    else:
        slices = top["slices"].value
        if not isinstance(slices, list) or not slices:
            refuse(top["slices"], "slices: must be a non-empty list")
        parts, first_ref = [], None
        for i, sl in enumerate(slices):
            f = mapping(sl, "a slice")
            for k in f:
                if k not in ("sources", "parameters", "base_model"):
                    refuse(f[k], f"'{k}' in a slice is not supported", key=True)
            slice_base = imp.model(model_ref(f["base_model"])) if "base_model" in f else base
            slice_params = read_params(imp, f.get("parameters"), op, method)
            srcs = f.get("sources")
            if srcs is None or not isinstance(srcs.value, list) or not srcs.value:
                refuse(sl, "a slice needs a non-empty list of sources")
            sources, lengths = [], set()
            for s in srcs.value:
                sf = mapping(s, "a source")
                for k in sf:
                    if k not in ("model", "layer_range", "parameters"):
                        refuse(sf[k], f"unknown key '{k}' in a slice source", key=True)
                if "model" not in sf or "layer_range" not in sf:
                    refuse(s, "a source needs model and layer_range")
                lr = sf["layer_range"]
                if not (isinstance(lr.value, list) and len(lr.value) == 2 and all(isinstance(x.value, int) and not isinstance(x.value, bool) for x in lr.value)):
                    refuse(lr, "layer_range must be [start, end], two integers")
                a, b = lr.value[0].value, lr.value[1].value
                if not 0 <= a < b:
                    refuse(lr, f"layer_range [{a}, {b}] is empty")
                lengths.add(b - a)
                if first_ref is None:
                    first_ref = string(model_ref(sf["model"]), "a model")
                sources.append((imp.model(model_ref(sf["model"])), read_params(imp, sf.get("parameters"), op, method), (a, b)))
            if len(lengths) > 1:
                refuse(srcs, "the sources of a slice must have the same number of layers (mergekit refuses this too)")
            one_layer = lengths == {1}
            if method == "passthrough" and len(sources) == 1 and not _has_params(slice_params, global_params, sources[0][1]):
                m, _, (a, b) = sources[0]
                parts.append((f"{m}.layers[{a}:{b}]", m))
                continue
            expr = merge_call(imp, op, method, top["merge_method"], slice_base, sources, [slice_params, global_params],
                          one_layer=one_layer, at=srcs)
            name = imp.var(f"{var}_slice{i}")
            out.append(f"{name} = {expr}")
            parts.append((name, name))
        last = parts[-1][1]
        if len(parts) == 1 and parts[0][0] == last:  # one merged slice: it is the result
            out[-1] = f"{var} = " + out[-1].split(" = ", 1)[1]
        else:
            body = ",\n    ".join(p for p, _ in parts)
            first_src = parts[0][1]
            keep = ""
            if last != first_src:  # the final norm and head from the last slice (mergekit's post_weights)
                keys = post_weight_keys(imp.local_checkpoint(first_ref))
                if keys is None:
                    keys = LLAMA_POST_WEIGHTS
                    out.append(FALLBACK_NOTE)
                if keys:
                    keep = " with { " + ", ".join(f"{k}: {last}" for k in keys) + " }"
            out.append(f"{var} = stack(\n    {body},\n){keep}")
    return "\n".join(out), save_options(imp, top, base)


def _has_params(*levels) -> bool:
    return any(levels)
