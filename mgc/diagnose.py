"""Collapse diagnostics: per-layer activation variance, effective rank and numerical rank.

These are the diagnostics of the seed paper (arXiv:2603.04972, Fig. 2 and Table 7), which reports,
per transformer layer, the mean activation variance, the effective rank (EffRank) of the activation
covariance and the numerical rank (NumRank), and reads a drop in them as variance / rank collapse of
a merge. The paper names but does not spell out the formulas; the ones used here are:

* activations: the output of each decoder layer (the residual stream), for layers 1..L, at every
  non-padding token except BOS, stacked into a [tokens, hidden] matrix H. The embedding output
  (layer 0) is left out, as in the paper's plots of transformer layers. Layer L is the last decoder
  layer's output *before* the model's final norm, so that all L entries are the same quantity
  (transformers' `hidden_states[-1]` has the final norm applied, and it would make layer L jump).
  BOS is fed to the model but its position is not counted: its state is the same in every document
  (it attends only to itself) and is usually an outlier ("attention sink") that would dominate the
  statistics.
* activation variance: the mean over the hidden features of each feature's variance over tokens,
  (1/d) sum_j Var_t(H[t, j]) with the unbiased (n - 1) denominator, which is trace(Cov(H)) / d.
* effective rank: exp of the Shannon entropy of the normalised singular values of the centred
  activation covariance C = Hc^T Hc / (n - 1), Hc = H - mean(H). C is symmetric positive semidefinite,
  so its singular values are its eigenvalues lambda_i = s_i(Hc)^2 / (n - 1); with p_i = lambda_i / sum
  lambda, EffRank = exp(-sum p_i log p_i) (Roy & Vetterli 2007, applied to the covariance). It lies in
  [1, min(n - 1, d)]: d for isotropic activations, 1 when all variance is along one direction.
* numerical rank: the number of singular values of Hc above rtol * s_max, rtol = 1e-3 by default
  (equivalently, covariance eigenvalues above 1e-6 * lambda_max). The activations are float32, whose
  round-off sits near 1e-7 * s_max, so 1e-3 is well above the noise floor (an exactly rank-k matrix
  gives k) while still counting directions that carry a millionth of the top direction's variance.
  numpy's default (s_max * max(n, d) * eps) would measure round-off, not collapse: real activations
  are almost never exactly rank-deficient.

All SVDs run in float64 on the CPU. Both ranks are bounded by min(n - 1, d): use at least hidden + 1
tokens (`max_tokens`) for them to be able to reach the hidden size. With `bootstrap = B > 0`, each
statistic also gets a `*_std` over B resamples of the tokens with replacement, as in the paper's
Table 7 (mean +- std over bootstrap draws); the main values are those of the full sample. A resample
holds only about 63% distinct tokens, so the rank spreads are meaningful only with many more tokens than
the hidden size.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from mgc.evaluate import batches, pad_id
from mgc.lm import DataError, Dataset, context_length, encode_texts, load, read_data, require, resolve_device

DEFAULT_RTOL = 1e-3
STATISTICS = ("variance", "effective_rank", "numerical_rank")


# --------------------------------------------------------------------------------------- statistics


def _matrix(h: torch.Tensor) -> torch.Tensor:
    h = torch.as_tensor(h)
    if h.dim() != 2:
        h = h.reshape(-1, h.shape[-1])
    if h.shape[0] < 2:
        raise ValueError(f"need at least 2 tokens for activation statistics, got {h.shape[0]}")
    return h.detach().to("cpu", torch.float64)


def _centred_singular_values(h: torch.Tensor) -> torch.Tensor:
    x = _matrix(h)
    return torch.linalg.svdvals(x - x.mean(dim=0, keepdim=True))


def activation_variance(h: torch.Tensor) -> float:
    """Mean over hidden features of the per-feature variance over tokens (unbiased); h is [tokens, hidden]."""
    return float(_matrix(h).var(dim=0, correction=1).mean())


def _effective_rank_from_sv(s: torch.Tensor) -> float:
    lam = s.square()  # covariance eigenvalues, up to the common factor 1/(n-1), which p cancels
    total = lam.sum()
    if total <= 0:
        return 0.0  # constant activations: no variance in any direction
    p = lam / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _numerical_rank_from_sv(s: torch.Tensor, rtol: float) -> int:
    if s.numel() == 0 or s[0] <= 0:
        return 0
    return int((s > rtol * s.max()).sum())


def effective_rank(h: torch.Tensor) -> float:
    """exp(entropy of p_i = lambda_i / sum lambda), lambda_i the eigenvalues (= singular values) of the
    centred covariance of h ([tokens, hidden]); 0 for constant activations."""
    return _effective_rank_from_sv(_centred_singular_values(h))


def numerical_rank(h: torch.Tensor, rtol: float = DEFAULT_RTOL) -> int:
    """Number of singular values of the centred h ([tokens, hidden]) above rtol * the largest (float64 SVD)."""
    return _numerical_rank_from_sv(_centred_singular_values(h), rtol)


def statistics(h: torch.Tensor, rtol: float = DEFAULT_RTOL) -> dict:
    """variance, effective_rank and numerical_rank of one layer's activations, from one SVD."""
    x = _matrix(h)
    s = torch.linalg.svdvals(x - x.mean(dim=0, keepdim=True))
    return {
        "variance": float(x.var(dim=0, correction=1).mean()),
        "effective_rank": _effective_rank_from_sv(s),
        "numerical_rank": _numerical_rank_from_sv(s, rtol),
    }


# ------------------------------------------------------------------------------------- activations


def _decoder_layers(model) -> Optional[Sequence[torch.nn.Module]]:
    """The model's list of decoder layers, where it can be found (Llama, Qwen, Mistral, GPT-2, ...)."""
    candidates = []
    try:
        candidates.append(model.get_decoder())
    except Exception:
        pass
    candidates += [getattr(model, "model", None), getattr(model, "transformer", None), model]
    for c in candidates:
        for name in ("layers", "h", "blocks"):
            layers = getattr(c, name, None) if c is not None else None
            if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
                return layers
    return None


@torch.no_grad()
def hidden_states(
    model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *, keep: Optional[torch.Tensor] = None
) -> list[torch.Tensor]:
    """Per transformer layer 1..L (the embedding output is not included), the layer's output at the
    kept tokens, flattened to [tokens, hidden].

    Kept tokens: those where `keep` (a [batch, seq] bool mask) is true, by default the non-padding tokens
    of `attention_mask` (all tokens without one). Uses `output_hidden_states`; the last layer's entry is
    taken before the final norm (from a forward hook on the last decoder layer) when the decoder layers
    can be found, so that every entry is a decoder layer's residual-stream output.
    """
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    if keep is None:
        keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    keep = keep.to(device).bool()

    last: list[torch.Tensor] = []
    layers = _decoder_layers(model)
    handle = None
    if layers is not None:
        handle = layers[-1].register_forward_hook(
            lambda _m, _i, out: last.append(out[0] if isinstance(out, (tuple, list)) else out)
        )
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    finally:
        if handle is not None:
            handle.remove()
    states = list(out.hidden_states[1:])
    if layers is not None and len(layers) == len(states) and len(last) == 1 and last[0].shape == states[-1].shape:
        states[-1] = last[0]
    return [h[keep].float() for h in states]


def layer_statistics(
    model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
    rtol: float = DEFAULT_RTOL, keep: Optional[torch.Tensor] = None, bootstrap: int = 0, seed: int = 0,
) -> list[dict]:
    """One dict per layer 1..L: layer, variance, effective_rank, numerical_rank (and `*_std` over
    `bootstrap` token resamples when bootstrap > 0). One forward pass over the whole batch."""
    return stats_of(hidden_states(model, input_ids, attention_mask, keep=keep), rtol=rtol, bootstrap=bootstrap, seed=seed)


def stats_of(states: Sequence[torch.Tensor], *, rtol: float = DEFAULT_RTOL, bootstrap: int = 0, seed: int = 0) -> list[dict]:
    """layer_statistics for activations already collected, one [tokens, hidden] matrix per layer."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i, h in enumerate(states, start=1):
        row: dict[str, Any] = {"layer": i, **statistics(h, rtol)}
        if bootstrap > 0:
            draws = []
            for _ in range(bootstrap):
                idx = torch.randint(0, h.shape[0], (h.shape[0],), generator=gen)
                draws.append(statistics(h[idx.to(h.device)], rtol))
            for key in STATISTICS:
                values = torch.tensor([float(d[key]) for d in draws], dtype=torch.float64)
                row[f"{key}_std"] = float(values.std(correction=1)) if bootstrap > 1 else 0.0
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- diagnose


def _token_items(tokenizer, dataset: Dataset, max_tokens: int, max_length: int):
    """Documents (BOS + tokens, each cut to max_length) taken in order until `max_tokens` non-BOS tokens."""
    items, total = [], 0
    for it in encode_texts(tokenizer, dataset.documents(), max_length):
        if total >= max_tokens:
            break
        room = max_tokens - total
        if len(it.ids) - it.start > room:
            it.ids = it.ids[: it.start + room]
        total += len(it.ids) - it.start
        items.append(it)
    return items, total


def diagnose(
    models: Sequence[Union[str, Path]],
    data: Union[str, Path, Dataset],
    *,
    device: Union[str, torch.device] = "auto",
    max_tokens: int = 2048,
    max_length: int = 512,
    batch_size: int = 8,
    rtol: float = DEFAULT_RTOL,
    bootstrap: int = 0,
    seed: int = 0,
    allow_pickle: bool = False,
) -> dict:
    """Per-layer statistics of each model on the first `max_tokens` tokens of `data`.

    The documents (for .jsonl data, each record's prompt followed by its answer) are read in order,
    each cut to `max_length` tokens, until `max_tokens` tokens (BOS not counted) are collected. Returns
    {"data", "max_tokens", "rtol", "bootstrap", "models": [{"model", "tokens", "hidden_size", "layers":
    [layer_statistics rows]}]}. Activations are kept on the CPU in float32 until the statistics are
    computed: about max_tokens * hidden * layers * 4 bytes per model.
    """
    dataset = data if isinstance(data, Dataset) else read_data(data)
    if max_tokens < 2:
        raise ValueError("max_tokens must be at least 2")
    dev = resolve_device(device)
    out: dict[str, Any] = {"data": dataset.path, "max_tokens": max_tokens, "rtol": rtol, "bootstrap": bootstrap, "models": []}
    for path in models:
        model, tokenizer = load(path, dev, allow_pickle=allow_pickle)
        items, total = _token_items(tokenizer, dataset, max_tokens, context_length(model, max_length))
        if total < 2:
            raise DataError(f"{dataset.path}: fewer than 2 tokens to take statistics over")
        per_layer: Optional[list[list[torch.Tensor]]] = None
        for batch in batches(items, batch_size, pad_id(tokenizer), dev):
            keep = batch.attention_mask.bool()
            for b, it in enumerate(batch.items):
                keep[b, : it.start] = False  # BOS: fed to the model, not counted
            states = hidden_states(model, batch.input_ids, batch.attention_mask, keep=keep)
            if per_layer is None:
                per_layer = [[] for _ in states]
            for acc, h in zip(per_layer, states):
                acc.append(h.cpu())
        stacked = [torch.cat(acc) for acc in per_layer]
        out["models"].append({
            "model": str(path),
            "tokens": int(stacked[0].shape[0]),
            "hidden_size": int(stacked[0].shape[1]),
            "layers": stats_of(stacked, rtol=rtol, bootstrap=bootstrap, seed=seed),
        })
        del model, stacked, per_layer
    return out


def format_table(results: dict) -> str:
    """Per-layer tables (one per statistic, one column per model) of `diagnose` results."""
    models = results["models"]
    if not models:
        return ""
    names = [m["model"] for m in models]
    n_layers = max(len(m["layers"]) for m in models)
    blocks = []
    titles = {
        "variance": "activation variance (mean over features of the variance over tokens)",
        "effective_rank": "effective rank (exp entropy of the covariance spectrum)",
        "numerical_rank": f"numerical rank (singular values > {results.get('rtol', DEFAULT_RTOL):g} * max)",
    }
    for key in STATISTICS:
        headers = ["layer"] + names
        rows = []
        for i in range(n_layers):
            row = [str(i + 1)]
            for m in models:
                if i >= len(m["layers"]):
                    row.append("")
                    continue
                r = m["layers"][i]
                v = r[key]
                cell = f"{v:.4g}" if key == "variance" else (f"{v:.2f}" if key == "effective_rank" else str(v))
                if f"{key}_std" in r:
                    cell += f" ±{r[key + '_std']:.2g}"
                row.append(cell)
            rows.append(row)
        widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(headers)]
        lines = [titles[key]]
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [headers] + rows]
        blocks.append("\n".join(lines))
    shapes = {(m["tokens"], m["hidden_size"]) for m in models}
    if len(shapes) == 1:
        tokens, hidden = shapes.pop()
        info = f"{tokens} tokens, hidden size {hidden}"
    else:
        info = "; ".join(f"{m['model']}: {m['tokens']} tokens, hidden size {m['hidden_size']}" for m in models)
    note = ""
    if any(m["tokens"] <= m["hidden_size"] for m in models):
        note = "\nnote: fewer tokens than hidden size + 1: both ranks are capped at tokens - 1 (raise --max-tokens)"
    return f"data: {results['data']} ({info}){note}\n\n" + "\n\n".join(blocks)


def plot(results: dict, path: Union[str, Path]) -> Path:
    """Write a PNG with three panels, activation variance (log scale), effective rank and numerical rank
    against the layer, one line per model (Agg backend, no display needed)."""
    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(8, 9.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    labels = {
        "variance": "activation variance",
        "effective_rank": "effective rank",
        "numerical_rank": f"numerical rank (rtol {results.get('rtol', DEFAULT_RTOL):g})",
    }
    markers = "os^Dv<>p*hX"
    max_layer = 1
    for k, m in enumerate(results["models"]):
        layers = [r["layer"] for r in m["layers"]]
        max_layer = max([max_layer, *layers])
        for ax, key in zip(axes, STATISTICS):
            values = [r[key] for r in m["layers"]]
            std = [r.get(f"{key}_std") for r in m["layers"]]
            kw = dict(marker=markers[k % len(markers)], markersize=4, linewidth=1.5, label=m["model"])
            if all(s is not None for s in std) and std:
                ax.errorbar(layers, values, yerr=std, capsize=2, **kw)
            else:
                ax.plot(layers, values, **kw)
    all_var = [r["variance"] for m in results["models"] for r in m["layers"]]
    if all_var and all(v > 0 and math.isfinite(v) for v in all_var):
        axes[0].set_yscale("log")
    for ax, key in zip(axes, STATISTICS):
        ax.set_ylabel(labels[key])
        ax.grid(True, alpha=0.3)
    axes[2].yaxis.get_major_locator().set_params(integer=True)
    axes[-1].set_xlabel("transformer layer")
    step = max(1, math.ceil(max_layer / 16))
    axes[-1].set_xticks(list(range(1, max_layer + 1, step)))
    def values(key):
        return "/".join(map(str, sorted({m[key] for m in results["models"] if key in m})))

    about = ", ".join(f"{v} {what}" for v, what in ((values("tokens"), "tokens"), (values("hidden_size"), "hidden")) if v)
    title = "collapse diagnostics" + (f" on {Path(str(results['data'])).name}" if results.get("data") else "")
    fig.suptitle(title + (f" ({about})" if about else ""))
    axes[0].legend(fontsize="small", loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
