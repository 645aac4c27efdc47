"""hf:// checkpoints against a stand-in of the hub's HTTP API on 127.0.0.1 (tests/hub_standin.py), serving small
sharded Llama checkpoints made with transformers: `mgc check` and `mgc plan` read only config.json, the index and
each shard's header (by range), `mgc run` downloads only the shards the plan reads, the revision is pinned to a
commit at check time, and every failure is a located error with a hint."""
from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from hub_standin import HubStandIn
from mgc.api import compile_recipe, prepare, run
from mgc.cli import main
from mgc.core.checkpoint import INDEX_FILE
from mgc.core.errors import CheckpointError, MgcError, RecipeTypeError
from mgc.runtime.execute import execute

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=64)


def _llama(folder: Path, seed: int, layers: int = 2) -> Path:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT, num_hidden_layers=layers))
    model.save_pretrained(folder, max_shard_size="8KB")  # 4 shards and an index
    return folder


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"t{i}": i for i in range(TEXT["vocab_size"])}, unk_token="t0")).save(
        str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')


TOKENIZER = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hubzoo")
    for name, seed, layers in (("a", 0, 2), ("b", 1, 2), ("b2", 2, 2), ("deep", 3, 3)):
        _llama(root / name, seed, layers)
    for name in ("a", "b"):
        _tokenizer(root / name)
    assert len(list((root / "a").glob("*.safetensors"))) == 4
    return root


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The stand-in, with huggingface_hub pointed at it (HF_ENDPOINT's constants) and a fresh hub cache."""
    from huggingface_hub import constants

    standin = HubStandIn().start()
    monkeypatch.setattr(constants, "ENDPOINT", standin.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", standin.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_standin_token")
    if hasattr(constants, "AGENT_HARNESSES_PATH"):  # huggingface_hub's own telemetry asks the endpoint for it
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    monkeypatch.chdir(tmp_path)
    yield standin
    standin.stop()


def recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.merge"
    path.write_text(text)
    return path


def header_bytes(file: Path) -> int:
    """8 + the header length of a local safetensors file: what a check may read of it."""
    with open(file, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def shards(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def assert_only_headers_served(hub: HubStandIn, repo_id: str, folder: Path) -> None:
    for shard in shards(folder):
        n = header_bytes(folder / shard)
        assert hub.ranges_served(repo_id, shard) == [(0, 8), (8, n)], shard
    assert hub.bytes_served(repo_id, "config.json") == (folder / "config.json").stat().st_size
    assert hub.bytes_served(repo_id, INDEX_FILE) == (folder / INDEX_FILE).stat().st_size


def same_tensors(a: Path, b: Path) -> None:
    ta = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    tb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def cli(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output and result.exit_code in (0, 1), result.output
    return result


# --- check and plan read headers only ----------------------------------------------------------------


def test_check_reads_only_config_index_and_shard_headers(hub, zoo, tmp_path):
    hub.push("org/a", zoo / "a")
    hub.push("org/b", zoo / "b")
    r = recipe(tmp_path, 'a = model("hf://org/a")\nb = model("hf://org/b")\nsave slerp(a, b, t = 0.5) to "out"\n')
    result = cli("check", str(r))
    assert result.exit_code == 0 and "ok (1 output, 2 checkpoints)" in result.output
    for repo, folder in (("org/a", zoo / "a"), ("org/b", zoo / "b")):
        assert_only_headers_served(hub, repo, zoo / folder.name)
    # one call to the API per repository pins the revision; nothing else of the repository was fetched
    api = [p for m, p, _ in hub.requests if p.startswith("/api/models/")]
    assert sorted(api) == ["/api/models/org/a/revision/main", "/api/models/org/b/revision/main"]
    # and the tokenizer files, to compare the two models' vocabularies whatever the cache holds
    assert {f for _, f in hub.files_served()} == {"config.json", INDEX_FILE, *shards(zoo / "a"), *TOKENIZER}
    assert not list((tmp_path / "hf-cache").rglob("*.safetensors"))


def test_plan_shows_the_pinned_commit_and_what_a_run_downloads(hub, zoo, tmp_path):
    sha = hub.push("org/a", zoo / "a")
    r = recipe(tmp_path, 'a = model("hf://org/a")\nsave a to "out"\n')
    result = cli("plan", str(r))
    assert result.exit_code == 0, result.output
    assert f"hf://org/a  commit {sha[:12]}: reads 4 of 4 shards, 4 to download" in result.output
    assert_only_headers_served(hub, "org/a", zoo / "a")


def test_hf_token_is_sent(hub, zoo, tmp_path):
    hub.push("org/a", zoo / "a")
    compile_recipe(recipe(tmp_path, 'save model("hf://org/a") to "out"\n'))
    asked = [h for _, p, h in hub.requests if "org/a" in p]
    assert asked and all(h.get("authorization") == "Bearer hf_standin_token" for h in asked)


@pytest.mark.parametrize("text, error, needle", [
    ('a = model("hf://org/a")\nd = model("hf://org/deep")\nsave linear(a, d) to "out"\n', MgcError, "checkpoint hf://org/a"),
    ('a = model("hf://org/a")\nb = model("hf://org/b")\nsave slerp(a, b, t = 2) to "out"\n', RecipeTypeError, "t"),
    ('a = model("hf://org/a")\nb = model("hf://org/b")\nsave slerp(a, b, tt = 0.5) to "out"\n', MgcError, "tt"),
    ('a = model("hf://org/a")\nsave a with { "model.no_such_tensor": a } to "out"\n', MgcError, "no_such_tensor"),
])
def test_a_recipe_error_is_reported_without_downloading_any_weights(hub, zoo, tmp_path, text, error, needle):
    for name in ("a", "b", "deep"):
        hub.push(f"org/{name}", zoo / name)
    with pytest.raises(error) as info:
        compile_recipe(recipe(tmp_path, text))
    assert needle in info.value.render()
    for repo, folder in (("org/a", "a"), ("org/b", "b"), ("org/deep", "deep")):
        for shard in shards(zoo / folder):
            assert hub.bytes_served(repo, shard) <= header_bytes(zoo / folder / shard)


def test_a_shape_mismatch_names_the_hub_checkpoint(hub, zoo, tmp_path):
    torch.manual_seed(0)
    wide = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(TEXT, intermediate_size=48), num_hidden_layers=2))
    wide.save_pretrained(tmp_path / "wide", max_shard_size="8KB")
    hub.push("org/a", zoo / "a")
    hub.push("org/wide", tmp_path / "wide")
    with pytest.raises(MgcError) as info:
        compile_recipe(recipe(tmp_path, 'a = model("hf://org/a")\nw = model("hf://org/wide")\nsave linear(a, w) to "out"\n'))
    text = info.value.render()
    assert "shape" in text and "r.merge:3" in text
    assert not list((tmp_path / "hf-cache").rglob("*.safetensors"))


# --- run downloads the shards it reads ---------------------------------------------------------------


def test_run_downloads_only_the_shards_the_plan_reads(hub, zoo, tmp_path):
    hub.push("org/a", zoo / "a")
    text = 'b = model("{b}")\nsave b with {{ layers[0:1]: model("{a}") }} to "{out}"\n'
    r = recipe(tmp_path, text.format(a="hf://org/a", b=zoo / "b", out=tmp_path / "out"))
    result = cli("run", "-q", "--device", "cpu", str(r))
    assert result.exit_code == 0, result.output
    index = json.loads((zoo / "a" / INDEX_FILE).read_text())["weight_map"]
    needed = {shard for name, shard in index.items() if name.startswith("model.layers.0.")}
    assert needed and needed < set(shards(zoo / "a"))
    downloaded = {p.name for p in (tmp_path / "hf-cache").rglob("*.safetensors")}
    assert downloaded == needed
    for shard in set(shards(zoo / "a")) - needed:  # never more than its header
        assert hub.bytes_served("org/a", shard) == header_bytes(zoo / "a" / shard)
    (tmp_path / "local").mkdir()
    run(recipe(tmp_path / "local", text.format(a=zoo / "a", b=zoo / "b", out=tmp_path / "local-out")), device="cpu")
    same_tensors(tmp_path / "out", tmp_path / "local-out")


def test_a_full_merge_downloads_every_shard_and_equals_the_local_merge(hub, zoo, tmp_path):
    hub.push("org/a", zoo / "a")
    hub.push("org/b", zoo / "b")
    text = 'a = model("{a}")\nb = model("{b}")\nsave slerp(a, b, t = 0.3) to "{out}" {{ tokenizer = a }}\n'
    plan, _ = run(recipe(tmp_path, text.format(a="hf://org/a", b="hf://org/b", out=tmp_path / "out")), device="cpu")
    for name in ("a", "b"):
        got = {p.name for p in (tmp_path / "hf-cache" / f"models--org--{name}").rglob("*.safetensors")}
        assert got == set(shards(zoo / name))
    (tmp_path / "local").mkdir()
    run(recipe(tmp_path / "local", text.format(a=zoo / "a", b=zoo / "b", out=tmp_path / "local-out")), device="cpu")
    same_tensors(tmp_path / "out", tmp_path / "local-out")
    # the tokenizer files are fetched for the save that copies them, and the generation config beside the config
    for name in TOKENIZER:
        assert (tmp_path / "out" / name).read_bytes() == (zoo / "a" / name).read_bytes()
    assert (tmp_path / "out" / "generation_config.json").is_file()


def test_vocabularies_of_hub_models_are_compared_even_with_nothing_cached(hub, zoo, tmp_path):
    """Same row counts, one token renamed: refused on the first check too, when no tokenizer file is cached
    (the check used to assume agreement then, and compare only once a run had cached the files)."""
    import shutil

    from tokenizers import Tokenizer, models

    renamed = tmp_path / "renamed"
    shutil.copytree(zoo / "a", renamed)
    words = {f"t{i}": i for i in range(TEXT["vocab_size"] - 1)} | {"<reserved>": TEXT["vocab_size"] - 1}
    Tokenizer(models.WordLevel(words, unk_token="t0")).save(str(renamed / "tokenizer.json"))
    hub.push("org/a", zoo / "a")
    hub.push("org/renamed", renamed)
    r = recipe(tmp_path, 'a = model("hf://org/a")\nb = model("hf://org/renamed")\nsave linear(a, b) to "out"\n')
    with pytest.raises(MgcError) as info:
        compile_recipe(r)
    assert "vocabularies" in info.value.message and "tokenizer = union" in (info.value.hint or "")


def test_check_fetches_no_tokenizer_files(hub, zoo, tmp_path):
    hub.push("org/a", zoo / "a")
    compile_recipe(recipe(tmp_path, 'a = model("hf://org/a")\nsave a to "out" { tokenizer = a }\n'))
    assert not {f for _, f in hub.files_served()} & set(TOKENIZER)


def test_a_second_check_reads_cached_shards_locally(hub, zoo, tmp_path):
    hub.push("org/a", zoo / "a")
    r = recipe(tmp_path, f'save model("hf://org/a") to "{tmp_path / "out"}"\n')
    run(r, device="cpu")
    hub.served.clear()
    compile_recipe(r)
    assert {f for _, f in hub.files_served()} == set()  # config, index and shards all from the hub cache


def test_weights_redirected_to_a_cdn_are_read_by_range_there_without_the_token(hub, zoo, tmp_path):
    """As on the hub, where /resolve/ of a weights file redirects to a CDN on another host."""
    hub.redirect_lfs = True
    hub.push("org/a", zoo / "a")
    r = recipe(tmp_path, f'save model("hf://org/a") to "{tmp_path / "out"}"\n')
    compile_recipe(r)
    assert_only_headers_served(hub, "org/a", zoo / "a")
    run(r, device="cpu")
    same_tensors(tmp_path / "out", zoo / "a")
    cdn = [h for _, p, h in hub.requests if p.startswith("/cdn/")]
    assert cdn and not any("authorization" in h for h in cdn)


def test_a_server_that_ignores_ranges_still_gives_the_headers(hub, zoo, tmp_path):
    hub.ignore_range = True
    hub.push("org/a", zoo / "a")
    plan = compile_recipe(recipe(tmp_path, 'save model("hf://org/a") to "out"\n'))
    (ckpt,) = plan.program.checkpoints.values()
    local = compile_recipe(recipe(tmp_path, f'save model("{zoo / "a"}") to "out"\n')).program.checkpoints
    (want,) = local.values()
    assert {n: (i.shape, i.dtype, i.offset) for n, i in ckpt.tensors.items()} == \
        {n: (i.shape, i.dtype, i.offset) for n, i in want.tensors.items()}


# --- the revision is pinned ----------------------------------------------------------------------------


def test_at_revision_pins_a_tag_a_branch_or_a_sha(hub, zoo, tmp_path):
    old = hub.push("org/a", zoo / "a", ref="v1")
    new = hub.push("org/a", zoo / "b")
    for rev, sha in (("@v1", old), ("", new), ("@main", new), (f"@{old}", old)):
        plan = compile_recipe(recipe(tmp_path, f'save model("hf://org/a{rev}") to "out"\n'))
        (ckpt,) = plan.program.checkpoints.values()
        assert ckpt.revision.sha == sha and ckpt.path.name == sha


def test_check_and_run_see_the_same_commit(hub, zoo, tmp_path):
    """A push between check and run does not change what the run reads: every download names the pinned sha."""
    sha = hub.push("org/a", zoo / "a")
    plan = compile_recipe(recipe(tmp_path, f'save model("hf://org/a") to "{tmp_path / "out"}"\n'))
    hub.push("org/a", zoo / "b2")  # main moves on
    hub.requests.clear()
    prepare(plan)
    execute(plan, device="cpu", progress=False)
    same_tensors(tmp_path / "out", zoo / "a")
    resolves = [p for _, p, _ in hub.requests if "/resolve/" in p]
    assert resolves and all(f"/resolve/{sha}/" in p for p in resolves)


# --- errors --------------------------------------------------------------------------------------------


def check_error(tmp_path: Path, text: str, *needles: str) -> str:
    """`mgc check` fails with exit status 1 and a located message holding every needle; no traceback."""
    result = cli("check", str(recipe(tmp_path, text)))
    assert result.exit_code == 1, result.output
    assert "r.merge:1:" in result.output and "hint:" in result.output, result.output
    for needle in needles:
        assert needle in result.output, result.output
    return result.output


def test_a_missing_repository(hub, tmp_path):
    check_error(tmp_path, 'save model("hf://org/nope") to "out"\n', "hf://org/nope", "no such model repository", "HF_TOKEN")


def test_a_missing_revision(hub, zoo, tmp_path):
    hub.push("org/a", zoo / "a")
    check_error(tmp_path, 'save model("hf://org/a@v9") to "out"\n', "hf://org/a@v9", "no such revision")


@pytest.mark.parametrize("status", [500, 503])
def test_a_server_error(hub, zoo, tmp_path, status):
    hub.push("org/a", zoo / "a")
    hub.fail[("org/a", "api")] = status
    check_error(tmp_path, 'save model("hf://org/a") to "out"\n', f"HTTP {status}", "try again later")


def test_a_gated_repository(hub, zoo, tmp_path):
    hub.push("org/a", zoo / "a")
    hub.fail[("org/a", "api")] = (403, "GatedRepo")
    check_error(tmp_path, 'save model("hf://org/a") to "out"\n', "hf://org/a is gated", "accept its terms at", "HF_TOKEN")


def test_a_server_error_on_a_header(hub, zoo, tmp_path):
    hub.push("org/a", zoo / "a")
    hub.fail[("org/a", "model-00002-of-00004.safetensors")] = 500
    check_error(tmp_path, 'save model("hf://org/a") to "out"\n', "HTTP 500", "model-00002-of-00004.safetensors")


def corrupted(zoo: Path, tmp_path: Path, damage) -> Path:
    folder = tmp_path / "damaged"
    shutil.copytree(zoo / "a", folder)
    shard = folder / "model-00003-of-00004.safetensors"
    shard.write_bytes(damage(shard.read_bytes()))
    return folder


def test_a_corrupt_header(hub, zoo, tmp_path):
    hub.push("org/a", corrupted(zoo, tmp_path, lambda b: b[:8] + b"[" + b[9:]))
    check_error(tmp_path, 'save model("hf://org/a") to "out"\n', "hf://org/a/model-00003-of-00004.safetensors")


def test_a_truncated_shard(hub, zoo, tmp_path):
    hub.push("org/a", corrupted(zoo, tmp_path, lambda b: b[:header_bytes(zoo / "a" / "model-00001-of-00004.safetensors") // 2]))
    out = check_error(tmp_path, 'save model("hf://org/a") to "out"\n', "hf://org/a/model-00003-of-00004.safetensors")
    assert "truncated" in out


def test_a_shard_with_data_cut_short(hub, zoo, tmp_path):
    hub.push("org/a", corrupted(zoo, tmp_path, lambda b: b[:-4]))
    check_error(tmp_path, 'save model("hf://org/a") to "out"\n', "model-00003-of-00004.safetensors", "truncated")


def test_an_index_naming_a_missing_shard(hub, zoo, tmp_path):
    files = {p.name: p.read_bytes() for p in (zoo / "a").iterdir()}
    del files["model-00004-of-00004.safetensors"]
    hub.push("org/a", files)
    check_error(tmp_path, 'save model("hf://org/a") to "out"\n', "names shard files that are not in the repository: "
                "model-00004-of-00004.safetensors", "another revision")


def test_a_repository_without_a_config(hub, zoo, tmp_path):
    hub.push("org/a", {p.name: p.read_bytes() for p in (zoo / "a").iterdir() if p.name != "config.json"})
    check_error(tmp_path, 'save model("hf://org/a") to "out"\n', "hf://org/a: no config.json in the repository")


def test_a_pickle_only_repository_is_refused(hub, tmp_path):
    hub.push("org/pkl", {"config.json": b"{}", "pytorch_model.bin": b"not read"})
    check_error(tmp_path, 'save model("hf://org/pkl") to "out"\n', "pickle", "safetensors")
    assert ("org/pkl", "pytorch_model.bin") not in hub.files_served()


def test_a_download_that_differs_from_the_checked_header(hub, zoo, tmp_path):
    sha = hub.push("org/a", zoo / "a")
    plan = compile_recipe(recipe(tmp_path, f'save model("hf://org/a") to "{tmp_path / "out"}"\n'))
    shard = "model-00002-of-00004.safetensors"
    hub.repos["org/a"]["commits"][sha][shard] += b"\0" * 8  # the file served changes after the check
    with pytest.raises(CheckpointError, match="differs from the one checked"):
        prepare(plan)
    assert not (tmp_path / "out").exists()


def test_a_failed_shard_download_leaves_no_output(hub, zoo, tmp_path):
    hub.push("org/a", zoo / "a")
    hub.fail_get[("org/a", "model-00001-of-00004.safetensors")] = 500
    r = recipe(tmp_path, f'save model("hf://org/a") to "{tmp_path / "out"}"\n')
    result = cli("run", "-q", "--device", "cpu", str(r))
    assert result.exit_code == 1 and "HTTP 500" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_offline_with_an_empty_cache(hub, zoo, tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub.push("org/a", zoo / "a")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    check_error(tmp_path, 'save model("hf://org/a") to "out"\n', "not in the local hub cache", "HF_HUB_OFFLINE")
    assert hub.requests == []


def test_offline_after_a_run_checks_and_runs_from_the_cache(hub, zoo, tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub.push("org/a", zoo / "a")
    r = recipe(tmp_path, f'save model("hf://org/a") to "{tmp_path / "out"}"\n')
    run(r, device="cpu")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    run(r, device="cpu", force=True)
    assert hub.requests == []
    same_tensors(tmp_path / "out", zoo / "a")


def test_offline_with_only_the_headers_checked(hub, zoo, tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub.push("org/a", zoo / "a")
    r = recipe(tmp_path, 'save model("hf://org/a") to "out"\n')
    compile_recipe(r)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    check_error(tmp_path, r.read_text(), "not in the local hub cache", "HF_HUB_OFFLINE")


def test_an_unreachable_hub(hub, zoo, tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub.push("org/a", zoo / "a")
    hub.stop()  # nothing listens on its port now
    check_error(tmp_path, 'save model("hf://org/a") to "out"\n', "cannot reach the hub", constants.ENDPOINT)


def test_an_unreachable_hub_falls_back_to_the_cache(hub, zoo, tmp_path):
    hub.push("org/a", zoo / "a")
    r = recipe(tmp_path, f'save model("hf://org/a") to "{tmp_path / "out"}"\n')
    run(r, device="cpu")
    hub.stop()
    run(r, device="cpu", force=True)
    same_tensors(tmp_path / "out", zoo / "a")


def test_fisher_of_a_hub_model_is_refused(hub, zoo, tmp_path):
    hub.push("org/a", zoo / "a")
    (tmp_path / "d.txt").write_text("some text\n")
    fa = 'fisher(a, data = "d.txt")'
    text = f'a = model("hf://org/a")\nsave fisher_merge(a, a, fisher = [{fa}, {fa}]) to "out"\n'
    result = cli("check", str(recipe(tmp_path, text)))
    assert result.exit_code == 1, result.output
    assert "fisher() needs a local checkpoint" in result.output and "hf download org/a" in result.output


def test_without_huggingface_hub_the_error_says_how_to_install_it(hub, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    check_error(tmp_path, 'save model("hf://org/a") to "out"\n', "huggingface_hub", "pip install huggingface_hub")


def test_bare_org_name_is_still_a_local_path(hub, zoo, tmp_path):
    hub.push("org/a", zoo / "a")
    out = check_error(tmp_path, 'save model("org/a") to "out"\n', "no checkpoint folder at 'org/a'", 'model("hf://org/a")')
    assert hub.requests == [] and "hf://" in out
