"""extract_lora(tuned, base = b): the difference of two models as a PEFT LoRA adapter. The math is checked against
float64 SVDs computed here; the adapters against peft itself (PeftModel.from_pretrained, merge_and_unload) on tiny
models made with transformers' own classes, and against mgc's own lora() reading them back."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from mgc.api import compile_recipe, run
from mgc.core.errors import MgcError
from mgc.stdlib import INTERNAL_OPERATORS, OPERATORS
from mgc.stdlib.lora_extract import Params, auto_randomized

from conftest import call_merge, load_folder

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

OP = INTERNAL_OPERATORS["extract_lora"]
SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1)


def with_spectrum(sigma, rows, cols, seed=0) -> torch.Tensor:
    """U·diag(σ)·Vᵀ with random orthonormal U, V: a matrix whose singular values are σ."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, len(sigma), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, len(sigma), generator=g, dtype=torch.float64)).Q
    return u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ v.T


def factors(delta: torch.Tensor, generator=None, base=None, **params):
    """(B, A, ‖Δ‖², kept) from the operator, on base + Δ and base."""
    base = torch.zeros_like(delta, dtype=torch.float32) if base is None else base
    packed = call_merge(OP, [base + delta.float()], Params(**params), base=base,
                        generator=generator or torch.Generator().manual_seed(0))
    r = packed.shape[0] - 1
    out, inn = (delta.shape[1], delta.shape[0]) if params.get("transpose") else delta.shape
    return packed[:r, inn:].T, packed[:r, :inn], float(packed[r, 0]), float(packed[r, 1])


def test_factors_are_the_truncated_svd_and_the_error_is_the_discarded_spectrum():
    torch.manual_seed(1)
    delta = torch.randn(24, 40, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    for rank in (1, 3, 8, 24):
        b, a, total, kept = factors(delta, rank=rank, svd="full")
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        torch.testing.assert_close((b @ a).double(), best, rtol=0, atol=2e-5)
        error = float((delta - (b @ a).double()).square().sum())
        assert error == pytest.approx(float(s[rank:].square().sum()), rel=1e-4, abs=1e-8)
        assert total == pytest.approx(float(delta.square().sum()), rel=1e-6)
        assert kept == pytest.approx(float(s[:rank].square().sum()), rel=1e-5)
        assert b.shape == (24, rank) and a.shape == (rank, 40)
        torch.testing.assert_close(b.T @ b, a @ a.T, rtol=1e-4, atol=1e-4)  # √S on each side


def test_transposed_tensors_give_factors_of_the_transpose():
    delta = with_spectrum([3.0, 1.0], 10, 6)  # stored [in, out] = [10, 6], as GPT-2's Conv1D
    b, a, _, _ = factors(delta, rank=2, svd="full", transpose=True)
    assert b.shape == (6, 2) and a.shape == (2, 10)
    torch.testing.assert_close((b @ a).double(), delta.T, rtol=0, atol=1e-5)


@pytest.mark.parametrize("energy, rank", [(0.5, 1), (16 / 21, 1), (0.77, 2), (20 / 21, 2), (0.96, 3), (1.0, 3)])
def test_energy_keeps_the_smallest_rank_holding_the_fraction(energy, rank):
    delta = with_spectrum([4.0, 2.0, 1.0], 12, 9)  # σ² = 16, 4, 1 of 21
    b, a, total, kept = factors(delta, energy=energy, svd="full")
    assert a.shape[0] == rank
    assert total == pytest.approx(21, rel=1e-5)
    assert kept == pytest.approx([16, 20, 21][rank - 1], rel=1e-5)


def test_energy_under_a_rank_cap_and_a_zero_delta():
    delta = with_spectrum([4.0, 2.0, 1.0], 12, 9)
    assert factors(delta, energy=1.0, rank=2, svd="full")[1].shape[0] == 2
    b, a, total, kept = factors(torch.zeros(5, 7), energy=0.9)
    assert a.shape == (0, 7) and total == kept == 0


def test_randomized_equals_full_on_a_fast_decaying_spectrum_and_is_deterministic():
    sigma = [2.0 ** -k for k in range(40)]
    delta = with_spectrum(sigma, 200, 120)
    full_b, full_a, _, _ = factors(delta, rank=4, svd="full")
    runs = [factors(delta, rank=4, svd="randomized", generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    (b, a, _, kept), (b2, a2, _, _) = runs
    torch.testing.assert_close(b @ a, full_b @ full_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(b, full_b, rtol=0, atol=1e-4)  # the signs are fixed, not the routine's
    assert torch.equal(b, b2) and torch.equal(a, a2)
    assert kept == pytest.approx(sum(s * s for s in sigma[:4]), rel=1e-5)


def test_auto_takes_the_randomized_svd_only_for_a_small_rank():
    assert auto_randomized(16, 10, 4096) and not auto_randomized(16, 10, 64)
    assert not auto_randomized(1024, 10, 4096)
    # by default the sketch is 2·rank columns, and auto wants it at most a quarter of the smaller side
    assert auto_randomized(128, None, 1024) and not auto_randomized(129, None, 1024)


def test_randomized_with_its_defaults_keeps_what_the_full_svd_keeps_on_a_slow_spectrum():
    """A full fine-tune's delta decays slowly (σ_k ∝ k^-1/2), the hard case for a sketch: at the defaults (2r
    columns, 4 power iterations) the randomized SVD keeps within 0.1 % of the Eckart–Young optimum."""
    gen = torch.Generator().manual_seed(3)
    k = 96
    delta = (torch.randn(256, k, generator=gen) * torch.arange(1, k + 1).pow(-0.5)) @ torch.randn(k, 192, generator=gen)
    for rank in (4, 16):
        _, _, total, best = factors(delta, rank=rank, svd="full")
        _, _, _, kept = factors(delta, rank=rank, svd="randomized", generator=torch.Generator().manual_seed(1))
        assert best * 0.999 <= kept <= best * (1 + 1e-6), (rank, kept / best)


def test_whole_mode_flags_a_tensor_equal_to_the_base():
    base = torch.randn(4, 3)
    same = call_merge(OP, [base.clone()], Params(mode="whole"), base=base)
    assert torch.equal(same, torch.cat([base.reshape(-1), torch.zeros(1)]))
    other = base.clone()
    other[0, 0] = -other[0, 0] if other[0, 0] != 0 else 1.0
    assert torch.equal(call_merge(OP, [other], Params(mode="whole"), base=base), torch.cat([other.reshape(-1), torch.ones(1)]))
    zeros = torch.zeros(3)
    assert call_merge(OP, [-zeros], Params(mode="whole"), base=zeros)[-1] == 1  # bit for bit: -0.0 is not 0.0


def test_params():
    with pytest.raises(ValueError):
        Params(rank=0)
    with pytest.raises(ValueError):
        Params(energy=1.5)
    with pytest.raises(ValueError, match="rank or energy"):
        Params()
    assert "extract_lora" in INTERNAL_OPERATORS and "extract_lora" not in OPERATORS


# --- end to end, against peft --------------------------------------------------------------------------------

def _model(kind: str, tied: bool = False):
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(tie_word_embeddings=tied, **SMALL))
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(tie_word_embeddings=tied, **SMALL))
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32))


def _tune(model, seed: int, rank: int = 2):
    """The model plus a rank-`rank` delta on each 2-D weight of its layers, a changed final norm, embeddings and
    (where the model has them) attention biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and (".layers." in name or ".h." in name):
                p.add_(0.3 * torch.randn(p.shape[0], rank, generator=g) @ torch.randn(rank, p.shape[1], generator=g))
            elif name.endswith(("norm.weight", "ln_f.weight", "embed_tokens.weight", "wte.weight", "q_proj.bias")):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    for kind, tied in (("llama", False), ("qwen2", True), ("gpt2", True)):
        torch.manual_seed(0)
        model = _model(kind, tied)
        model.save_pretrained(root / f"base-{kind}")
        _tune(model, 1).save_pretrained(root / f"tuned-{kind}")
        _tune(_model(kind, tied).from_pretrained(root / f"base-{kind}"), 2).save_pretrained(root / f"other-{kind}")
    return root


def _run(root: Path, name: str, body: str) -> Path:
    recipe = root / f"{name}.merge"
    recipe.write_text(body)
    run(recipe)
    return root / name


def _peft(root: Path, kind: str, adapter: Path):
    """(peft's merge_and_unload() state dict, the PeftModel's logits), with the warnings that name keys."""
    base = transformers.AutoModelForCausalLM.from_pretrained(str(root / f"base-{kind}"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(adapter))
    keys = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not keys, keys
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        logits = model(ids).logits
    return model.merge_and_unload().state_dict(), logits


def _logits(folder: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 13, 2]])).logits


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_peft_loads_the_adapter_and_reproduces_the_tuned_model(zoo, kind):
    out = _run(zoo, f"adapter-{kind}", f'base = model("base-{kind}")\n'
               f'save extract_lora(model("tuned-{kind}"), base = base, rank = 2) to "adapter-{kind}"\n')
    merged, logits = _peft(zoo, kind, out)
    tuned = load_folder(zoo / f"tuned-{kind}")
    for name, t in tuned.items():
        torch.testing.assert_close(merged[name], t, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(logits, _logits(zoo / f"tuned-{kind}"), rtol=1e-4, atol=1e-4)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 2 and config["base_model_name_or_path"] == str(zoo / f"base-{kind}")
    assert config["fan_in_fan_out"] is (kind == "gpt2")
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "- lora" in card and "extract_lora" in card


def test_qwen2_biases_and_tied_embeddings_as_peft_saves_them(zoo):
    out = zoo / "adapter-qwen2"
    config = json.loads((out / "adapter_config.json").read_text())
    keys = set(load_folder(out))
    assert config["bias"] == "lora_only" and config["ensure_weight_tying"] is True
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in keys
    assert "base_model.model.model.layers.0.self_attn.k_proj.base_layer.bias" not in keys  # unchanged: left out
    assert "base_model.model.model.embed_tokens.weight" in keys
    assert {"model.embed_tokens", "model.norm"} <= set(config["modules_to_save"])
    assert not any("proj" in m for m in config["modules_to_save"])


def test_rank_one_keeps_the_top_singular_value_and_mgc_reads_it_back(zoo):
    out = _run(zoo, "rank1", 'base = model("base-llama")\nsave extract_lora(model("tuned-llama"), base = base, '
               'rank = 1) to "rank1"\n')
    written = load_folder(out)
    name = "model.layers.1.mlp.down_proj.weight"
    delta = (load_folder(zoo / "tuned-llama")[name] - load_folder(zoo / "base-llama")[name]).double()
    s = torch.linalg.svdvals(delta)
    b = written["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].double()
    a = written["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].double()
    kept = 1 - float((delta - b @ a).square().sum()) / float(delta.square().sum())
    assert kept == pytest.approx(float(s[0] ** 2 / s.square().sum()), rel=1e-4)
    card = (out / "README.md").read_text()
    assert f"`{name}` | 1 |" in card
    again = _run(zoo, "read-back", 'base = model("base-llama")\nsave lora("rank1", base = base) to "read-back"\n')
    merged, _ = _peft(zoo, "llama", out)
    for key, t in load_folder(again).items():
        torch.testing.assert_close(t, merged[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_merge_expression_as_tuned_and_per_layer_ranks(zoo):
    out = _run(zoo, "merged-adapter", 'base = model("base-llama")\nt = linear(model("tuned-llama"), model("other-llama"))\n'
               'save t to "merged"\n'
               'save extract_lora(t, base = base, rank = { layers[0:1]: 4, k_proj: 3, v_proj: 3, _: 2 }) '
               'to "merged-adapter"\n')
    merged, _ = _peft(zoo, "llama", out)
    for name, t in load_folder(zoo / "merged").items():
        if ".layers.0." in name and name.endswith("proj.weight"):
            torch.testing.assert_close(merged[name], t, rtol=1e-4, atol=1e-5, msg=name)  # rank 4 ≥ the sum's
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"][r"^model\.layers\.1\.mlp\.up_proj"] == 2  # 7 modules at 4
    assert config["alpha_pattern"] == config["rank_pattern"] and len(config["rank_pattern"]) == 7
    written = load_folder(out)
    assert written["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"].shape[0] == 4
    assert written["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"].shape[0] == 3
    assert written["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"].shape[0] == 2


def test_a_rank_gradient_is_rounded_per_layer(zoo):
    (zoo / "ramp.merge").write_text('base = model("base-llama")\n'
                                    'save extract_lora(model("tuned-llama"), base = base, rank = [1, 2.6]) to "ramp"\n')
    layout = compile_recipe(zoo / "ramp.merge").program.saves[0].adapter
    assert layout.tensors["model.layers.0.mlp.up_proj.weight"].params.rank == 1
    assert layout.tensors["model.layers.1.mlp.up_proj.weight"].params.rank == 3


def test_two_runs_write_the_same_bytes(zoo):
    body = ('base = model("base-llama")\nsave extract_lora(model("tuned-llama"), base = base, rank = 2, '
            'svd = "randomized", targets = ["mlp"], whole = false) to "{}"\n')
    a, b = (_run(zoo, n, body.format(n)) for n in ("same-a", "same-b"))
    assert set(load_folder(a)) == {k for k in load_folder(a) if ".mlp." in k}
    for key, t in load_folder(a).items():
        assert torch.equal(t, load_folder(b)[key]), key


def test_plan_and_stats_report_the_adapter(zoo):
    (zoo / "report.merge").write_text('base = model("base-llama")\n'
                                      'save extract_lora(model("tuned-llama"), base = base, energy = 0.9) to "report"\n')
    plan, stats = run(zoo / "report.merge")
    assert "tensors get factors" in plan.summary()
    report = stats.adapters[zoo / "report"]
    assert report.kept >= 0.9 and report.energy_mode
    assert "keep" in report.summary()


# --- bad input: located errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    ("rank = 0", "greater than or equal to 1"),
    ("rank = { mlp: 2.5, _: 2 }", "whole number"),
    ("rank = 9", "rank 9 is more than tensor"),
    ("energy = 1.5", "less than or equal to 1"),
    ("rank = 2, targets = [\"nothing_here\"]", "matches no tensor"),
    ("rank = 2, targets = [\"embed\"]", "an embedding or head"),
    ("rank = 2, targets = []", "targets name no tensor"),
    ("rank = 2, svd = \"exact\"", "svd"),
    ("rank = 2, whole = 1", "true or false"),
    ("rank = 2, rnak = 3", "unknown parameter"),
    ("", "needs `rank = ...` or `energy = ...`"),
])
def test_bad_options_are_located_errors(zoo, call, message):
    err = _error(zoo, f'save extract_lora(model("tuned-llama"), base = model("base-llama"){", " if call else ""}{call}) '
                 'to "never"')
    assert message in err.message, err.render()


def test_other_misuses_are_located_errors(zoo):
    assert "missing from the base" in _error(zoo, 'save extract_lora(model("tuned-qwen2"), base = model("base-gpt2"), '
                                                 'rank = 1) to "never"').message
    a = 'a = extract_lora(model("tuned-llama"), base = model("base-llama"), rank = 2)\n'
    err = _error(zoo, a + 'save linear(a, model("base-llama")) to "never"')
    assert "an adapter" in err.message and "merge the models first" in err.hint
    err = _error(zoo, a + 'save a to "never" { tokenizer = base }')
    assert "is for a model" in err.message


def test_a_vocabulary_mismatch_is_refused(zoo):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SMALL, "vocab_size": 80}))
    model.save_pretrained(zoo / "bigger-vocab")
    err = _error(zoo, 'save extract_lora(model("bigger-vocab"), base = model("base-llama"), rank = 1) to "never"')
    assert "vocabularies differ" in err.message and "cannot resize" in err.hint


def test_whole_false_warns_and_a_computed_base_has_no_name(zoo):
    (zoo / "warn.merge").write_text('b = linear(model("base-llama"))\nsave extract_lora(model("tuned-llama"), '
                                    'base = b, rank = 2, whole = false) to "never"\n')
    plan = compile_recipe(zoo / "warn.merge", optimize_graph=False)
    shown = " ".join(w.message for w in plan.program.warnings)
    assert "will not reproduce" in shown and "base_model_name_or_path: null" in shown


def _error(root: Path, body: str) -> MgcError:
    recipe = root / "bad.merge"
    recipe.write_text(body + "\n")
    with pytest.raises(MgcError) as info:
        compile_recipe(recipe)
    err = info.value
    assert err.span is not None and "^" in err.render(), err.render()
    return err


def test_the_command_line_reports_the_adapter_and_reads_its_recipe_back(zoo):
    from click.testing import CliRunner

    from mgc.cli import main

    recipe = zoo / "cli.merge"
    recipe.write_text('base = model("base-llama")\nsave extract_lora(model("tuned-llama"), base = base, rank = 1) to "cli"\n')
    checked = CliRunner().invoke(main, ["check", str(recipe)])
    assert checked.exit_code == 0 and "14 tensors get factors at rank 1" in checked.output, checked.output
    ran = CliRunner().invoke(main, ["run", "-q", str(recipe)])
    assert ran.exit_code == 0, ran.output
    ran = CliRunner().invoke(main, ["run", "--force", str(recipe)])
    assert "keep" in ran.output and "of ‖tuned − base‖²" in ran.output, ran.output
    shown = CliRunner().invoke(main, ["recipe", str(zoo / "cli")])
    assert shown.exit_code == 0 and "extract_lora(" in shown.output


def test_the_plan_counts_the_svd_working_memory(zoo):
    (zoo / "memory.merge").write_text('base = model("base-llama")\n'
                                      'save extract_lora(model("tuned-llama"), base = base, rank = 2) to "memory"\n')
    plan = compile_recipe(zoo / "memory.merge")
    largest = max(16 * 32, 64 * 16)  # entries of the largest tensor: an MLP projection, or the embeddings
    assert plan.peak_memory() >= OP.transient(largest, 2, False) > 2 * 2 * 4 * largest


def test_an_adapter_of_a_model_with_itself_loads_and_changes_nothing(zoo):
    out = _run(zoo, "nothing", 'base = model("base-llama")\nsave extract_lora(base, base = base, energy = 0.9) to "nothing"\n')
    merged, _ = _peft(zoo, "llama", out)
    for name, t in load_folder(zoo / "base-llama").items():
        assert torch.equal(merged[name], t), name
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] is None
