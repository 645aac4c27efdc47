"""Per-layer activation statistics on a fixed probe batch (the paper's Fig. 2 / Table 7), and the
weight-space geometry that explains how far apart the spherical and the Euclidean means are.

`layer_statistics` has the signature and definitions of `mgc.diagnose.layer_statistics`; run.py uses
mgc's when it is importable and agrees with this one on the base model, and this one otherwise.

For each decoder layer's output (the residual stream after the block, layers 1..L, before the final
norm), over the kept tokens H (n × d) and Hc = H − mean(H):
  variance        mean over the d features of the per-feature variance (unbiased), trace(Cov(H))/d;
  effective_rank  exp(entropy of p = λ/Σλ), λ the singular values (= eigenvalues) of Cov(H) = HcᵀHc/(n−1);
  numerical_rank  #{singular values of Hc above 1e-3 · the largest}.
"""
from __future__ import annotations

import itertools
import math

import torch


@torch.no_grad()
def layer_statistics(model, input_ids, attention_mask=None, *, keep=None, rtol: float = 1e-3) -> list[dict]:
    captured: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
             for layer in model.model.layers]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in hooks:
            h.remove()
    if keep is None:
        keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    stats = []
    for i, h in enumerate(captured, start=1):
        x = h[keep].double()
        x = x - x.mean(0, keepdim=True)
        s = torch.linalg.svdvals(x)
        lam = s.square()
        p = lam / lam.sum()
        p = p[p > 0]
        stats.append({
            "layer": i,
            "variance": (lam.sum() / (x.shape[0] - 1) / x.shape[1]).item(),
            "effective_rank": torch.exp(-(p * p.log()).sum()).item(),
            "numerical_rank": int((s > rtol * s.max()).sum().item()),
        })
    return stats


@torch.no_grad()
def weight_geometry(base: dict, experts: list[dict], linear: dict, karcher: dict) -> dict:
    """How far apart the experts are, and how much the Euclidean mean shrinks, tensor by tensor.

    shrink          ‖mean θᵢ‖ / mean ‖θᵢ‖: the linear merge's norm relative to karcher's (= mean ‖θᵢ‖);
    angle_deg       mean pairwise angle between the experts' whole tensors (what the sphere sees);
    tv_cosine       mean pairwise cosine between the experts' task vectors θᵢ − θ₀;
    karcher_vs_linear  ‖θ_karcher − θ_linear‖ / ‖θ_linear − θ₀‖ over all parameters.
    """
    shrink, angle, tv_cos = [], [], []
    num = den = 0.0
    for name, b in base.items():
        xs = [e[name].double().flatten() for e in experts]
        norms = [x.norm() for x in xs]
        shrink.append((torch.stack(xs).mean(0).norm() / torch.stack(norms).mean()).item())
        for (x, nx), (y, ny) in itertools.combinations(zip(xs, norms), 2):
            angle.append(math.degrees(math.acos(max(-1.0, min(1.0, (x @ y / (nx * ny)).item())))))
        ds = [x - b.double().flatten() for x in xs]
        for x, y in itertools.combinations(ds, 2):
            tv_cos.append((x @ y / (x.norm() * y.norm()).clamp(min=1e-12)).item())
        num += (karcher[name].double() - linear[name].double()).pow(2).sum().item()
        den += (linear[name].double() - b.double()).pow(2).sum().item()

    def summary(v):
        v = sorted(v)
        return {"min": v[0], "median": v[len(v) // 2], "max": v[-1], "mean": sum(v) / len(v)}

    return {"shrink": summary(shrink), "angle_deg": summary(angle), "tv_cosine": summary(tv_cos),
            "karcher_vs_linear": math.sqrt(num / den)}
