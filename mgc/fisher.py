"""`fisher(model, data = "file.txt", samples = 64, max_length = 256)`: a checkpoint's diagonal Fisher on a text file.

The estimator is the *empirical* diagonal Fisher on the data's own tokens:

    F = (1/N) Σₙ (∇_θ log p_θ(xₙ))²,     log p_θ(xₙ) = Σ_{t≥1} log p_θ(xₙ,ₜ | xₙ,<ₜ),

over the first N = `samples` documents xₙ of the file. Documents and tokens are those of `mgc eval` (`mgc.lm`):
documents are separated by blank lines; each is tokenized with the checkpoint's own tokenizer as BOS + its
tokens without the tokenizer's other special tokens, truncated to `max_length` tokens; documents of fewer than
2 tokens predict nothing and are skipped. The square is entrywise and of *per-sequence* gradients (batch size
1): the mean of squared per-example gradients, as in Matena & Raffel's Fisher merging, not the square of a
batch-mean gradient. The targets are the data's tokens, not tokens sampled from the model (the "true" Fisher
would draw y ~ p_θ): this is deterministic (no sampling, so the same inputs give the same Fisher and the cache
key below is meaningful), costs one forward and backward pass per document, and is what Fisher-merging
implementations commonly compute in practice. The model runs in float32 in eval mode (no dropout); the Fisher
is stored in float32.

The result has exactly the checkpoint's tensor names and shapes. A checkpoint tensor that is a parameter of
the transformers model gets that parameter's Fisher; when the model ties two names to one parameter (e.g.
lm_head to the embeddings) and the checkpoint stores both, both names get the same Fisher; a tied name the
checkpoint does not store is dropped. A checkpoint tensor that is a buffer of the model (e.g. rotary
``inv_freq``) gets zeros. A floating tensor the model cannot account for is an error.

Results are cached, as a Hugging Face-style folder (config.json copied from the model, model.safetensors of the
Fisher tensors, fisher.json describing the inputs), at ``$MGC_CACHE/fisher/<key>`` (default
``~/.cache/mgc/fisher/<key>``). The key is known without computing anything (see `fisher_key`), so `mgc check`
and `mgc plan` do no tensor work; `mgc run` computes the missing ones before the merge (`materialise`). A cache
folder is written in a temporary folder beside it and renamed into place, so a crash leaves no half cache.

transformers (the ``mgc[eval]`` extra) is imported only when a Fisher is actually computed.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from mgc.compiler.fisher_cache import (  # noqa: F401  (plan_lines: re-exported with the rest of fisher())
    DEFAULT_MAX_LENGTH, DEFAULT_SAMPLES, ESTIMATOR_VERSION, INFO_FILE, WEIGHTS_FILE, FisherError, PathLike,
    cache_path, fisher_key, fishers_used, inspect_data, is_cached, plan_lines,
)
from mgc.core.errors import CheckpointError, MergeRuntimeError, MgcError
from mgc.lm import encode_text, load, read_documents, require, resolve_device


# --- estimation ------------------------------------------------------------------------------------------


def estimate_fisher(
    model_dir: PathLike, data_path: PathLike, samples: int = DEFAULT_SAMPLES, max_length: int = DEFAULT_MAX_LENGTH,
    device: str = "auto", *, allow_pickle: bool = False, progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher of the checkpoint at `model_dir` on the first `samples` documents of
    `data_path` (see the module docstring): {checkpoint tensor name: float32 CPU tensor of its shape}."""
    return _estimate(model_dir, data_path, samples, max_length, device, allow_pickle, progress)[0]


def _estimate(model_dir, data_path, samples, max_length, device, allow_pickle, progress):
    from mgc.core.checkpoint import Checkpoint

    if samples < 1:
        raise FisherError(f"samples must be at least 1, got {samples}")
    if max_length < 2:
        raise FisherError(f"max_length must be at least 2 (one token predicted), got {max_length}")
    transformers = require("transformers", "fisher()")
    model_dir, data_path = Path(model_dir), Path(data_path)
    ckpt = Checkpoint.open(model_dir, allow_pickle=allow_pickle)
    ckpt.close()
    docs = read_documents(data_path)
    dev = resolve_device(device)
    start = time.perf_counter()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    # The weights mgc validated and merges: safetensors, or pickles only if that is what mgc opened.
    model, tokenizer = load(model_dir, dev, allow_pickle=ckpt.pickled)

    targets = _map_tensors(model, ckpt)
    unique: dict[int, torch.nn.Parameter] = {}
    for kind, p in targets.values():
        if kind == "param":
            unique.setdefault(id(p), p)
    params = list(unique.values())
    for p in model.parameters():
        p.requires_grad_(id(p) in unique)
    acc = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params}

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=samples, desc=f"fisher {model_dir.name}", unit="doc", dynamic_ncols=True)
    used = tokens = 0
    try:
        for doc in docs:
            if used == samples:
                break
            item = encode_text(tokenizer, doc, max_length)
            if item is None:
                continue
            ids = torch.tensor([item.ids], device=dev)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            loglik = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None]).sum()
            grads = torch.autograd.grad(loglik, params, allow_unused=True)
            for p, g in zip(params, grads):
                if g is not None:
                    acc[id(p)].addcmul_(g, g)
            used += 1
            tokens += ids.shape[1] - 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if used == 0:
        raise FisherError(
            f"data file '{data_path}' has no document of at least 2 tokens", hint="each document needs a token to predict"
        )
    out: dict[str, torch.Tensor] = {}
    for name, info in ckpt.tensors.items():
        kind, p = targets[name]
        if kind == "param":
            out[name] = (acc[id(p)] / used).to("cpu", torch.float32).contiguous()
        else:
            out[name] = torch.zeros(info.shape, dtype=torch.float32 if info.dtype.is_floating_point else info.dtype.torch)
    stats = {
        "documents_used": used, "tokens_predicted": tokens, "documents_in_file": len(docs),
        "device": str(dev), "seconds": round(time.perf_counter() - start, 3), "transformers": transformers.__version__,
    }
    return out, stats


def _map_tensors(model, ckpt) -> dict[str, tuple[str, object]]:
    """checkpoint tensor name -> ("param", the model's parameter) or ("zero", None)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    prefix = getattr(model, "base_model_prefix", "") or ""

    def candidates(name: str):
        yield name
        if prefix:
            yield f"{prefix}.{name}"
            if name.startswith(prefix + "."):
                yield name[len(prefix) + 1:]

    out, missing = {}, []
    for name, info in ckpt.tensors.items():
        found = None
        for cand in candidates(name):
            if cand in params:
                found = ("param", params[cand])
                break
            if cand in buffers or not info.dtype.is_floating_point:
                found = ("zero", None)
                break
        if found is None:
            missing.append(name)
            continue
        if found[0] == "param" and tuple(found[1].shape) != tuple(info.shape):
            raise FisherError(
                f"{ckpt.path}: tensor '{name}' has shape {list(info.shape)} in the checkpoint but "
                f"{list(found[1].shape)} in the transformers model"
            )
        out[name] = found
    if missing:
        shown = ", ".join(f"'{n}'" for n in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FisherError(
            f"{ckpt.path}: {len(missing)} checkpoint tensor{'s' if len(missing) != 1 else ''} match no parameter "
            f"of the transformers model: {shown}",
            hint="this architecture's parameter names differ from its checkpoint's (transformers renames or fuses "
            "them on load); fisher() cannot map its gradients back",
        )
    return out


# --- the cache ----------------------------------------------------------------------------------------------


def cached_fisher(
    model_dir: PathLike, data_path: PathLike, samples: int = DEFAULT_SAMPLES, max_length: int = DEFAULT_MAX_LENGTH,
    device: str = "auto", *, allow_pickle: bool = False, progress: bool = False,
) -> Path:
    """The cache folder of this Fisher, computed and written (atomically) first if it is not there yet."""
    model_dir, data_path = Path(model_dir).resolve(), Path(data_path).resolve()
    data = inspect_data(data_path)
    key = fisher_key(model_dir, data_path, samples, max_length, data_sha256=data.sha256)
    dest = cache_path(key)
    if is_cached(dest):
        return dest
    tensors, stats = _estimate(model_dir, data_path, samples, max_length, device, allow_pickle, progress)
    info = {
        "estimator": "empirical diagonal Fisher: mean over documents of the squared per-document gradient of "
        "sum_t log p(x_t | x_<t) on the data's own tokens (float32, batch size 1)",
        "version": ESTIMATOR_VERSION,
        "key": key,
        "model": str(model_dir),
        "data": str(data_path),
        "data_sha256": data.sha256,
        "samples": int(samples),
        "max_length": int(max_length),
        **stats,
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_atomically(dest, (model_dir / "config.json").read_bytes(), tensors, info)
    return dest


def write_atomically(dest: Path, config: bytes, tensors: dict[str, torch.Tensor], info: dict,
                     info_file: str = INFO_FILE, what: str = "diagonal fisher") -> None:
    """A cache folder (config.json, model.safetensors, `info_file`), written beside `dest` and renamed into place."""
    from safetensors.torch import save_file

    def complete(path: Path) -> bool:
        return all((path / n).is_file() for n in ("config.json", WEIGHTS_FILE, info_file))

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name[:16]}-", dir=dest.parent))
    try:
        (tmp / "config.json").write_bytes(config)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "mgc": what})
        (tmp / info_file).write_text(json.dumps(info, indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        if dest.exists() and not complete(dest):  # a damaged folder left by hand: replace it
            shutil.rmtree(dest)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not complete(dest):  # not a concurrent writer that got there first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- before a run ------------------------------------------------------------------------------------------


def materialise(plan, device: str = "auto", progress: bool = False) -> dict[Path, str]:
    """Compute every Fisher the plan loads that is not cached yet, then open each cache folder and register it
    in ``plan.program.checkpoints`` for the runtime. Returns {cache folder: "cached" | "computed"}."""
    from mgc.core.checkpoint import Checkpoint

    done: dict[Path, str] = {}
    for fm in fishers_used(plan):
        path = fm.cache_path
        if path in plan.program.checkpoints:
            done[path] = "cached"
            continue
        state = "cached" if is_cached(path) else "computed"
        ckpt = fm.model.checkpoint
        try:
            got = cached_fisher(
                ckpt.path, fm.data, fm.samples, fm.max_length, device, allow_pickle=ckpt.pickled, progress=progress,
            )
        except MgcError as err:
            if err.span is None:
                err.span = fm.span
            raise
        except OSError as e:
            raise MergeRuntimeError(f"fisher(): {e.strerror or e} ({e.filename or path.parent})", fm.span) from None
        except Exception as e:  # torch or transformers failing mid-estimate (out of memory, a bad input)
            raise MergeRuntimeError(f"fisher(): estimating the Fisher of {ckpt.path} failed: {e}", fm.span) from e
        if got != path:
            raise CheckpointError(
                f"the checkpoint {ckpt.path} or the data file {fm.data} changed after the recipe was checked",
                fm.span, "run again",
            )
        cache = Checkpoint.open(path, span=fm.span)
        for name, spec in fm.tensors.items():
            info = cache.tensors.get(name)
            if info is None or info.shape != spec.shape or info.dtype != spec.dtype:
                raise CheckpointError(
                    f"{path}: the cached Fisher does not match its model at tensor '{name}'", fm.span,
                    f"delete {path} to compute it again",
                )
        plan.program.checkpoints[path] = cache
        done[path] = state
    return done
