"""moe()'s routers, computed before the run into the gate cache (compiler/gate_cache.py), as mergekit-moe computes
them (mergekit/moe/router.py), for E experts (then the shared expert, if any), L layers and hidden size H:

* hidden: each prompt is tokenized as the tokenizer's BOS token text + the prompt, without the tokenizer's own
  special tokens, and run through the base model with output_hidden_states. Layer l's vector is the mean, over
  the expert's prompts, of hidden_states[l] at the prompt's last token: the residual stream entering decoder
  layer l (index 0 is the embedding output; the final norm's output is never used). Each layer's vector is then
  scaled to unit L2 norm. Every layer gets its own vector.
* cheap_embed: the sum of the base's input embedding rows of every token of every prompt of the expert (BOS
  included), scaled to unit L2 norm; the same vector for every layer.
* negative_prompts (both modes): the expert's vector before the final scaling, less the same computed over its
  negative prompts, then scaled to unit norm.
* random: standard normal entries, shape [L, E, H] drawn at once from a generator seeded with `seed`; unscaled.
* uniform_random: uniform in [-1/sqrt(H), 1/sqrt(H)], torch.nn.Linear's default initialisation; seeded the same way.

Two choices differ from mergekit's, on purpose: the base runs in float32, not bfloat16, and each prompt runs
alone rather than in one left-padded batch; with rotary positions a prompt's hidden states do not depend on the
padding before it, so both give the same vectors up to rounding, and these are reproducible across batch sizes.
"""
from __future__ import annotations

import math
import time

import torch

from mgc.compiler.gate_cache import INFO_FILE, GATES_VERSION, GateSpec, gates_used, is_cached
from mgc.core.errors import CheckpointError, MergeRuntimeError, MgcError

GATE_CONFIG = b'{"model_type": "mgc_moe_gates"}\n'


def compute_gates(spec: GateSpec, device: str = "auto") -> torch.Tensor:
    """The routers as one float32 tensor [layers, experts (+ shared), hidden]."""
    count = spec.experts + int(spec.shared)
    shape = (spec.num_layers, count, spec.hidden)
    if spec.mode in ("random", "uniform_random"):
        g = torch.Generator().manual_seed(spec.seed)
        if spec.mode == "random":
            return torch.randn(shape, generator=g, dtype=torch.float32)
        scale = math.sqrt(1.0 / spec.hidden)
        return torch.rand(shape, generator=g, dtype=torch.float32) * 2 * scale - scale
    from mgc.lm import load, require

    transformers = require("transformers", "moe()'s gate")
    path = spec.base.checkpoint.path
    if spec.mode == "cheap_embed":
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        embed = spec.base.checkpoint.read("model.embed_tokens.weight").float()
        run = None
    else:
        model, tokenizer = load(path, device, allow_pickle=spec.base.checkpoint.pickled)
        run = model

    def vector(prompts) -> torch.Tensor:
        ids = [_tokens(tokenizer, p) for p in prompts]
        if run is None:
            return _unit(embed[torch.tensor([i for seq in ids for i in seq])].sum(dim=0)).repeat(spec.num_layers, 1)
        return torch.stack([_last_hidden(run, seq) for seq in ids]).mean(dim=0)

    vectors = []
    for i, prompts in enumerate(spec.prompts):
        v = vector(prompts)
        if i < len(spec.negative) and spec.negative[i]:
            v = v - vector(spec.negative[i])
        vectors.append(_unit(v))
    return torch.stack(vectors).permute(1, 0, 2).contiguous()


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def _tokens(tokenizer, prompt: str) -> list[int]:
    ids = list(tokenizer((tokenizer.bos_token or "") + prompt, add_special_tokens=False)["input_ids"])
    if not ids:
        raise MgcError(f"the prompt {prompt!r} has no tokens", hint="give prompts with text in them")
    return ids


def _last_hidden(model, ids: list[int]) -> torch.Tensor:
    """[layers, hidden]: the hidden state entering each decoder layer at the last token."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True, use_cache=False)
    return torch.stack(out.hidden_states[:-1])[:, 0, -1, :].float().cpu()


def gate_tensors(spec: GateSpec, gates: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for layer in range(spec.num_layers):
        out[spec.gate_name(layer)] = gates[layer, : spec.experts].contiguous()
        if spec.shared:
            out[spec.shared_name(layer)] = gates[layer, spec.experts:].contiguous()
    return out


def materialise_gates(plan, device: str = "auto") -> dict:
    """Compute every gate the plan loads that is not cached yet, then open each cache folder and register it in
    ``plan.program.checkpoints``. Returns {cache folder: "cached" | "computed"}."""
    from mgc.core.checkpoint import Checkpoint
    from mgc.fisher import write_atomically

    done = {}
    for spec in gates_used(plan):
        path = spec.cache_path
        state = "cached" if is_cached(path) else "computed"
        if state == "computed":
            start = time.perf_counter()
            try:
                tensors = gate_tensors(spec, compute_gates(spec, device))
            except MgcError as err:
                if err.span is None:
                    err.span = spec.span
                raise
            except Exception as e:  # torch or transformers failing (out of memory, a tokenizer that will not load)
                raise MergeRuntimeError(f"moe(): computing the {spec.mode} gates failed: {e}", spec.span) from e
            info = {"version": GATES_VERSION, "key": spec.key, "mode": spec.mode, "seed": spec.seed,
                    "base": str(spec.base.checkpoint.path) if spec.base is not None else None,
                    "prompts": [list(p) for p in spec.prompts], "negative_prompts": [list(p) for p in spec.negative],
                    "layers": spec.num_layers, "experts": spec.experts,
                    "shared_expert": spec.shared, "seconds": round(time.perf_counter() - start, 3),
                    "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            try:
                write_atomically(path, GATE_CONFIG, tensors, info, INFO_FILE, "moe gates")
            except OSError as e:
                raise MergeRuntimeError(f"moe(): {e.strerror or e} ({e.filename or path.parent})", spec.span) from None
        cache = Checkpoint.open(path, span=spec.span)
        expected = {spec.gate_name(layer): (spec.experts, spec.hidden) for layer in range(spec.num_layers)}
        if spec.shared:
            expected.update({spec.shared_name(layer): (1, spec.hidden) for layer in range(spec.num_layers)})
        for name, shape in expected.items():
            info = cache.tensors.get(name)
            if info is None or tuple(info.shape) != shape:
                raise CheckpointError(f"{path}: the cached gates do not match this moe()", spec.span,
                                      f"delete {path} to compute them again")
        plan.program.checkpoints[path] = cache
        done[path] = state
    return done
