"""`moe(base, experts = [...], gate = ...)`: Mixtral, Qwen2-MoE and Qwen3-MoE checkpoints from tiny dense models,
loaded by transformers as their MoE classes; routing that follows the prompts; the gate math against direct
computations; the gate cache; and located errors for bad input."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mgc.gates
from mgc.api import compile_recipe, prepare, run
from mgc.compiler import gate_cache
from mgc.core.errors import CheckpointError, MgcError

from tiny_lms import WORDS, make_tokenizer, tensors, transformers

GROUPS = [WORDS[4 + 8 * k: 12 + 8 * k] for k in range(3)]  # three disjoint vocabularies, one per expert
PROMPTS = [[" ".join(g[:3]), " ".join(g[3:6])] for g in GROUPS]
MOE_CLASS = {"llama": "MixtralForCausalLM", "mistral": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM",
             "qwen3": "Qwen3MoeForCausalLM"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (see conftest.one_thread)."""


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MGC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make(folder: Path, kind: str, seed: int, *, intermediate: int = 32, hidden: int = 32, words=WORDS, **more) -> Path:
    """A tiny dense model; the base's embedding rows of each word group share one strong direction, so the
    hidden states of prompts from different groups point different ways."""
    torch.manual_seed(seed)
    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gpt2": "GPT2"}[kind]
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=len(WORDS), n_embd=hidden, n_layer=2, n_head=2, bos_token_id=1)
        model = transformers.GPT2LMHeadModel(config)
    else:
        extra = dict(more, head_dim=hidden // 2) if kind == "qwen3" else more
        config = getattr(transformers, f"{name}Config")(
            vocab_size=len(words), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1,
            eos_token_id=2, pad_token_id=3, **extra)
        model = getattr(transformers, f"{name}ForCausalLM")(config)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        for k, group in enumerate(GROUPS):
            for w in group:
                emb[WORDS.index(w)] = 4 * torch.nn.functional.one_hot(torch.tensor(k), hidden) + 0.3 * torch.randn(hidden)
    model.save_pretrained(folder)
    make_tokenizer(words).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("moe_models")
    for kind in ("llama", "mistral", "qwen2", "qwen3"):
        for i, role in enumerate(("base", "a", "b", "c")):
            make(root / f"{kind}_{role}", kind, 10 * i + len(kind))
    make(root / "llama_wide", "llama", 7, intermediate=48)
    make(root / "llama_big", "llama", 8, hidden=48)
    make(root / "gpt2", "gpt2", 9)
    make(root / "llama_bias", "llama", 6, attention_bias=True)
    make(root / "llama_vocab", "llama", 5, words=WORDS + ["<x>", "<y>"])
    make(root / "qwen2_tied", "qwen2", 4, tie_word_embeddings=True)
    return root


def recipe(tmp_path: Path, zoo: Path, kind: str, body: str) -> Path:
    header = "".join(f'{r} = model("{zoo / f"{kind}_{r}"}")\n' for r in ("base", "a", "b", "c"))
    path = tmp_path / "r.merge"
    path.write_text(header + body)
    return path


def hidden_gate(prompts=PROMPTS) -> str:
    return "hidden(prompts = [" + ", ".join("[" + ", ".join(f'"{p}"' for p in ps) + "]" for ps in prompts) + "])"


def moe_recipe(gate: str, *, experts="[a, b, c]", extra="") -> str:
    return f'save moe(base, experts = {experts}, gate = {gate}{extra}) to "out" {{ dtype = fp32 }}\n'


# --- end to end ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_moe_loads_as_its_moe_class_with_each_experts_mlp(kind, zoo, tmp_path):
    shared = ", shared_expert = base" if kind == "qwen2" else ""
    gate = hidden_gate()[:-1] + (f', shared_prompts = ["{WORDS[30]}"])' if kind == "qwen2" else ")")
    run(recipe(tmp_path, zoo, kind, moe_recipe(gate, extra=shared)), device="cpu")
    out = tmp_path / "out"
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == MOE_CLASS[kind]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False)
    written, base = tensors(out), tensors(zoo / f"{kind}_base")
    block = "block_sparse_moe" if kind in ("llama", "mistral") else "mlp"
    names = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"} if block == "block_sparse_moe" else {}
    for e, role in enumerate("abc"):
        expert = tensors(zoo / f"{kind}_{role}")
        for layer in range(2):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                got = written[f"model.layers.{layer}.{block}.experts.{e}.{names.get(proj, proj)}.weight"]
                assert torch.equal(got, expert[f"model.layers.{layer}.mlp.{proj}.weight"])
    for name, t in base.items():
        if ".mlp." not in name:
            assert torch.equal(written[name], t), name
    if kind == "qwen2":
        assert torch.equal(written["model.layers.1.mlp.shared_expert.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])
        assert written["model.layers.1.mlp.shared_expert_gate.weight"].shape == (1, 32)
    assert model.config.num_experts_per_tok == 2


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_hidden_gates_route_each_experts_prompts_to_it(kind, zoo, tmp_path):
    run(recipe(tmp_path, zoo, kind, moe_recipe(hidden_gate())), device="cpu")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for k, group in enumerate(GROUPS):
        ids = tok(" ".join(group[2:7]), return_tensors="pt").input_ids  # words of the group, not a prompt as given
        with torch.no_grad():
            logits = model(input_ids=ids, output_router_logits=True).router_logits
        share = torch.stack([torch.softmax(r.float(), dim=-1) for r in logits]).mean(dim=(0, 1))
        assert share.argmax().item() == k, share


def test_a_tied_base_gives_a_tied_mixture(zoo, tmp_path):
    text = moe_recipe("random()", extra=", shared_expert = base").replace("moe(base", f'moe(model("{zoo / "qwen2_tied"}")')
    run(recipe(tmp_path, zoo, "qwen2", text), device="cpu")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert model.config.tie_word_embeddings and "lm_head.weight" not in tensors(tmp_path / "out")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_experts_may_be_merges(zoo, tmp_path):
    run(recipe(tmp_path, zoo, "llama", moe_recipe(hidden_gate(), experts="[linear(a, b), b, c]")), device="cpu")
    got = tensors(tmp_path / "out")["model.layers.1.block_sparse_moe.experts.0.w3.weight"]
    a, b = (tensors(zoo / f"llama_{r}")["model.layers.1.mlp.up_proj.weight"] for r in "ab")
    torch.testing.assert_close(got, (a + b) / 2)


def test_only_the_bases_vocabulary_counts(zoo, tmp_path):
    """The experts' embeddings are not used, so an expert with other tokens is no vocabulary mismatch."""
    run(recipe(tmp_path, zoo, "llama", moe_recipe("random()", experts=f'[a, model("{zoo / "llama_vocab"}")]')),
        device="cpu")
    written, base = tensors(tmp_path / "out"), tensors(zoo / "llama_base")
    assert torch.equal(written["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab() == {w: i for i, w in enumerate(WORDS)}


# --- gate math ------------------------------------------------------------------------------------------------


def routers(out: Path, layers=2) -> torch.Tensor:
    t = tensors(out)
    return torch.stack([t[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(layers)])


def test_cheap_embed_is_the_normalised_sum_of_the_prompts_embeddings(zoo, tmp_path):
    run(recipe(tmp_path, zoo, "llama", moe_recipe(hidden_gate().replace("hidden", "cheap_embed"))), device="cpu")
    emb = tensors(zoo / "llama_base")["model.embed_tokens.weight"]
    for e, prompts in enumerate(PROMPTS):
        ids = [1] + [WORDS.index(w) for w in prompts[0].split()] + [1] + [WORDS.index(w) for w in prompts[1].split()]
        want = emb[ids].sum(0) / emb[ids].sum(0).norm()
        for layer in range(2):
            torch.testing.assert_close(routers(tmp_path / "out")[layer, e], want)


def test_negative_prompts_are_subtracted_before_the_unit_norm(zoo, tmp_path):
    gate = 'cheap_embed(prompts = [["w4 w5"], ["w12"], ["w20"]], negative_prompts = [["w12 w13"], [], []])'
    (spec,) = compile_recipe(recipe(tmp_path, zoo, "llama", moe_recipe(gate))).program.gates.values()
    got = mgc.gates.compute_gates(spec, "cpu")
    emb = tensors(zoo / "llama_base")["model.embed_tokens.weight"]

    def unit_sum(*words):
        v = emb[[1] + [WORDS.index(w) for w in words]].sum(0)
        return v / v.norm()

    want = unit_sum("w4", "w5") - unit_sum("w12", "w13")
    torch.testing.assert_close(got[1, 0], want / want.norm())
    torch.testing.assert_close(got[0, 1], unit_sum("w12"))


def test_hidden_is_mergekits_batched_last_token_state_per_layer(zoo, tmp_path):
    """mergekit: BOS + prompt, left-padded with BOS as padding, hidden_states[:-1] at the last position, mean
    over the prompts, unit norm per layer."""
    run(recipe(tmp_path, zoo, "llama", moe_recipe(hidden_gate())), device="cpu")
    base = zoo / "llama_base"
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(base)
    tok.padding_side, tok.pad_token_id = "left", tok.bos_token_id
    for e, prompts in enumerate(PROMPTS + [["w4", "w5 w6 w7 w8 w9"]]):
        batch = tok([tok.bos_token + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            states = torch.stack(model(**batch, output_hidden_states=True).hidden_states[:-1])[:, :, -1, :].mean(1)
        want = states / states.norm(dim=-1, keepdim=True)
        if e < 3:
            torch.testing.assert_close(routers(tmp_path / "out")[:, e], want, atol=1e-5, rtol=1e-4)
        else:  # prompts of different lengths: one at a time gives what the padded batch gives
            spec = compile_recipe(recipe(tmp_path, zoo, "llama", moe_recipe(hidden_gate([prompts] + PROMPTS[1:]))))
            (gate,) = spec.program.gates.values()
            torch.testing.assert_close(mgc.gates.compute_gates(gate, "cpu")[:, 0], want, atol=1e-5, rtol=1e-4)


def test_random_gates_are_seeded(zoo, tmp_path):
    got = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        (tmp_path / name).mkdir()
        run(recipe(tmp_path / name, zoo, "llama", moe_recipe(f"random(seed = {seed})")), device="cpu")
        got[name] = routers(tmp_path / name / "out")
    assert torch.equal(got["a"], got["b"]) and not torch.equal(got["a"], got["c"])
    torch.testing.assert_close(got["a"], torch.randn((2, 3, 32), generator=torch.Generator().manual_seed(0)))
    (tmp_path / "u").mkdir()
    run(recipe(tmp_path / "u", zoo, "llama", moe_recipe("uniform_random(seed = 0)")), device="cpu")
    want = torch.rand((2, 3, 32), generator=torch.Generator().manual_seed(0)) * 2 / 32**0.5 - 1 / 32**0.5
    torch.testing.assert_close(routers(tmp_path / "u" / "out"), want)


# --- the cache ----------------------------------------------------------------------------------------------------


def test_gates_are_cached_and_a_changed_prompt_file_recomputes(zoo, tmp_path, monkeypatch):
    files = []
    for k, group in enumerate(GROUPS):
        files.append(tmp_path / f"p{k}.txt")
        files[-1].write_text(f"{' '.join(group[:3])}\n\n{' '.join(group[3:6])}\n")
    path = recipe(tmp_path, zoo, "llama", moe_recipe('hidden(prompts = ["p0.txt", "p1.txt", "p2.txt"])'))
    plan = compile_recipe(path)
    assert "to compute" in plan.summary()
    assert set(prepare(plan, device="cpu").values()) == {"computed"}
    monkeypatch.setattr(mgc.gates, "compute_gates", lambda *a: pytest.fail("recomputed a cached gate"))
    plan = compile_recipe(path)
    assert "cached" in plan.summary() and set(prepare(plan, device="cpu").values()) == {"cached"}
    files[1].write_text("w12 w13\n")
    monkeypatch.undo()
    assert set(prepare(compile_recipe(path), device="cpu").values()) == {"computed"}


def test_a_cached_gate_folder_missing_the_shared_gates_is_refused(zoo, tmp_path):
    from safetensors.torch import load_file, save_file

    path = recipe(tmp_path, zoo, "qwen2", moe_recipe("random()", extra=", shared_expert = base"))
    plan = compile_recipe(path)
    prepare(plan, device="cpu")
    cache = next(iter(plan.program.gates))
    weights = next(cache.glob("*.safetensors"))
    kept = {k: v for k, v in load_file(weights).items() if "shared_gate" not in k}
    save_file(kept, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="the cached gates do not match"):
        prepare(compile_recipe(path), device="cpu")


# --- bad input ------------------------------------------------------------------------------------------------------

BAD = [
    (moe_recipe(hidden_gate(), experts="[a, b]"), "prompts has 3 entries but moe() has 2 experts", 5),
    (moe_recipe(hidden_gate(), extra=", experts_per_token = 0"), "experts_per_token is 0", 5),
    (moe_recipe(hidden_gate(), extra=", experts_per_token = 4"), "experts_per_token is 4 and moe() has 3", 5),
    (moe_recipe('hidden(prompts = [["w4"], [], ["w20"]])'), "list of prompts is empty", 5),
    (moe_recipe(hidden_gate()[:-1] + ', negative_prompts = [[]])'), "negative_prompts has 1 entry but", 5),
    (moe_recipe('hidden(prompts = [["w4"], "missing.txt", ["w20"]])'), "no prompt file at 'missing.txt'", 5),
    (moe_recipe('hidden(prompts = [["w4"], "empty.txt", ["w20"]])'), "holds no prompt", 5),
    (moe_recipe('hidden(prompts = [["w4"], ["w4"], ["w4"]])'), "every expert has the same prompts", 5),
    (moe_recipe('hiden(prompts = [["w4"], ["w5"], ["w20"]])'), "gate must be one of its gate modes", 5),
    (moe_recipe("random(seed = -1)"), "seed must be a whole number", 5),
    (moe_recipe("random()", extra=", shared_expert = base"), "MixtralForCausalLM has no shared expert", 5),
    (moe_recipe("random()", experts='[a, model("../gpt2")]'), "expert 1 is a 'gpt2' model", 5),
    (moe_recipe("random()", experts='[a, model("../llama_wide")]'), "expert 1's MLPs have 48 intermediate units", 5),
    (moe_recipe("random()", experts='[a, model("../llama_big")]'), "work on a hidden size of 48, the base's on 32", 5),
    ('save moe(model("../gpt2"), experts = [a, b], gate = random()) to "out"\n', "for a 'gpt2' model", 5),
    ('save moe(model("../llama_bias"), experts = [a, b], gate = random()) to "out"\n', "attention_bias = true", 5),
    (moe_recipe(hidden_gate()).replace("moe(base", "moe(linear(a, b)"), "need the base to be a checkpoint", 5),
    ('x = hidden(prompts = [["w4"]])\nsave a to "out"\n', "hidden() is only valid as moe()'s gate", 5),
    ('save moe(base, experts = [a, b]) to "out"\n', "moe() needs `gate = ...`", 5),
]


@pytest.mark.parametrize("body,message,line", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_input_is_a_located_error(body, message, line, zoo, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    sub = tmp_path / "r"
    sub.mkdir()
    path = recipe(sub, zoo, "llama", body.replace('"../', f'"{zoo}/'))
    with pytest.raises(MgcError) as info:
        compile_recipe(path, text=path.read_text().replace('"empty.txt"', f'"{tmp_path / "empty.txt"}"'))
    err = info.value
    assert message in err.message, err.render()
    assert err.span is not None and err.span.line == line, err.render()


def test_the_command_line_reports_bad_input_without_a_traceback(zoo, tmp_path):
    from click.testing import CliRunner

    from mgc.cli import main

    result = CliRunner().invoke(main, ["check", str(recipe(tmp_path, zoo, "llama", moe_recipe("cheap_embed()")))])
    assert result.exit_code == 1 and "cheap_embed() needs `prompts`" in result.output
    assert "Traceback" not in result.output


def test_the_same_expert_thrice_is_a_warning(zoo, tmp_path):
    plan = compile_recipe(recipe(tmp_path, zoo, "llama", moe_recipe("random()", experts="[a, a, a]")))
    assert any("every expert is the same model" in w.message for w in plan.program.warnings)


def test_qwen2_needs_a_shared_expert(zoo, tmp_path):
    with pytest.raises(MgcError, match="shared_expert = m"):
        compile_recipe(recipe(tmp_path, zoo, "qwen2", moe_recipe("random()")))


def test_plan_lists_the_gates(zoo, tmp_path):
    plan = compile_recipe(recipe(tmp_path, zoo, "llama", moe_recipe("random(seed = 3)")))
    assert "random(seed = 3): to compute" in plan.summary()
    assert gate_cache.gates_used(plan)[0].cache_path.parent.name == "gates"


# --- mgc import of a mergekit-moe configuration ---------------------------------------------------------------------


def test_a_mergekit_moe_config_imports_to_moe_and_runs(tmp_path):
    from mgc.mergekit_import import import_config

    repo = Path(__file__).resolve().parents[1]
    path = tmp_path / "r.merge"
    path.write_text(import_config(repo / "tests/fixtures/mergekit/moe.yml", output=path, root=repo))
    run(path, device="cpu")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "merged")
    assert config.model_type == "mixtral" and config.num_local_experts == 3 and config.num_experts_per_tok == 2


@pytest.mark.parametrize("yaml,message,line", [
    ("experts:\n  - source_model: a\n    positive_prompts: [x]\n    noise_scale: 0.1\n", "noise_scale", 5),
    ("gate_mode: hidden_avg\nexperts:\n  - source_model: a\n    positive_prompts: [x]\n", "hidden_avg", 2),
    ("experts:\n  - source_model: a\n", "no positive_prompts", 3),
])
def test_what_moe_cannot_express_is_refused_at_its_line(yaml, message, line, tmp_path):
    from mgc.mergekit_import import import_config

    with pytest.raises(MgcError) as info:
        import_config(tmp_path / "m.yml", text="base_model: b\n" + yaml, root=tmp_path)
    assert message in info.value.message and info.value.span.line == line, info.value.render()


def test_random_gates_import_seeded_with_a_note(tmp_path):
    from mgc.mergekit_import import import_config

    text = import_config(tmp_path / "m.yml", text="base_model: b\ngate_mode: random\nexperts:\n  - source_model: a\n",
                         root=tmp_path)
    assert "gate = random(seed = 0)" in text and "unseeded" in text
